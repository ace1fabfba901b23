"""Search spaces in the two dialects phpo/iDDS users have, normalised into one form.

hpogrid dialect::

    {"lr": {"method": "loguniform", "dimension": {"low": 1e-6, "high": 3e-2}}}

nevergrad dialect (as iDDS passes it; ``type`` is the ``nevergrad.p`` class, ``params`` its
keyword arguments, ``bounds`` an optional ``[lower, upper]``)::

    {"A": {"type": "Choice", "params": {"choices": [1, 4]}}, "B": {"type": "Scalar", "bounds": [0, 5]}}

Both become a :class:`SearchSpace` of scalar :class:`Dimension` objects. A nevergrad ``Array`` becomes
one dimension per element, named ``name[i]``, and is reassembled into a list in every point handed out.
Only the standard library is used here: the core must not pull numerical packages into every room.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hepopt.errors import SpecError

#: Kinds whose values form a finite set: a grid search can enumerate them.
FINITE_KINDS = frozenset({"categorical", "fixed", "uniformint", "quniform", "qloguniform"})
#: Every kind of the internal form (the hpogrid method names).
KINDS = FINITE_KINDS | {"uniform", "loguniform", "normal", "qnormal", "lognormal", "qlognormal"}
#: Largest number of values a single quantised dimension may enumerate for a grid.
MAX_GRID_VALUES_PER_DIMENSION = 100_000
#: Relative slack allowed when checking that a stored value lies inside its bounds.
BOUNDS_TOLERANCE = 1e-9

_HPOGRID_PARAMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (required dimension keys, optional dimension keys)
    "categorical": (("categories",), ("grid_search",)),
    "fixed": (("value",), ()),
    "uniform": (("low", "high"), ()),
    "uniformint": (("low", "high"), ()),
    "quniform": (("low", "high", "q"), ()),
    "loguniform": (("low", "high"), ("base",)),
    "qloguniform": (("low", "high", "q"), ("base",)),
    "normal": (("mu", "sigma"), ()),
    "qnormal": (("mu", "sigma", "q"), ()),
    "lognormal": (("mu", "sigma"), ()),
    "qlognormal": (("mu", "sigma", "q"), ()),
}
_NEVERGRAD_TYPES = ("Choice", "TransitionChoice", "Scalar", "Log", "Array")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integral(value: float) -> bool:
    return float(value).is_integer()


@dataclass(frozen=True)
class Dimension:
    """One scalar hyperparameter in the internal form.

    ``kind`` is an hpogrid method name. ``choices`` holds categories (``ordered`` for nevergrad's
    ``TransitionChoice``); ``low``/``high``/``q``/``mu``/``sigma`` the numeric parameters; ``value``
    the constant of a ``fixed`` dimension; ``integer`` says values are handed out as ``int``.
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    q: float | None = None
    mu: float | None = None
    sigma: float | None = None
    choices: tuple[Any, ...] = ()
    ordered: bool = False
    value: Any = None
    integer: bool = False

    @property
    def is_finite(self) -> bool:
        return self.kind in FINITE_KINDS

    @property
    def is_log(self) -> bool:
        return self.kind in ("loguniform", "qloguniform", "lognormal", "qlognormal")

    # --- sampling -------------------------------------------------------------------------------
    def sample(self, rng: random.Random) -> Any:
        """Draw one value from the prior of this dimension."""
        kind = self.kind
        if kind == "categorical":
            return self.choices[rng.randrange(len(self.choices))]
        if kind == "fixed":
            return self.value
        if kind == "uniformint":
            return rng.randint(int(self.low), int(self.high))
        if kind in ("uniform", "quniform"):
            return self.quantize(rng.uniform(self.low, self.high))
        if kind in ("loguniform", "qloguniform"):
            return self.quantize(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        if kind in ("normal", "qnormal"):
            return self.quantize(rng.gauss(self.mu, self.sigma))
        return self.quantize(math.exp(rng.gauss(self.mu, self.sigma)))

    def quantize(self, x: float) -> float | int:
        """Round a raw draw onto the values this dimension can take (q-grid, bounds, integers)."""
        if self.q is not None:
            x = round(x / self.q) * self.q
            if self.low is not None:
                lo, hi = self._q_index_range()
                x = min(max(round(x / self.q), lo), hi) * self.q
        elif self.low is not None:
            x = min(max(x, self.low), self.high)
        if self.integer:
            return round(x)
        return float(x)

    def _q_index_range(self) -> tuple[int, int]:
        lo = math.ceil(self.low / self.q - BOUNDS_TOLERANCE)
        hi = math.floor(self.high / self.q + BOUNDS_TOLERANCE)
        if self.is_log:
            lo = max(lo, 1)  # a log-scaled value is never zero
        return lo, hi

    # --- enumeration (grid search) --------------------------------------------------------------
    def grid_values(self) -> list[Any]:
        """Every value of a finite dimension, in order. Continuous dimensions raise SpecError."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "fixed":
            return [self.value]
        if self.kind == "uniformint":
            return list(range(int(self.low), int(self.high) + 1))
        if self.kind in ("quniform", "qloguniform"):
            lo, hi = self._q_index_range()
            if hi - lo + 1 > MAX_GRID_VALUES_PER_DIMENSION:
                raise SpecError([(self.name, f"{hi - lo + 1} grid values; at most "
                                  f"{MAX_GRID_VALUES_PER_DIMENSION} can be enumerated")])
            return [self.quantize(k * self.q) for k in range(lo, hi + 1)]
        raise SpecError([(self.name, f"'{self.kind}' is continuous and has no grid; use categorical, "
                          "uniformint, quniform or qloguniform for grid search")])

    # --- checking values ------------------------------------------------------------------------
    def canonical(self, value: Any) -> Any:
        """A hashable, normalised form of ``value`` used to detect duplicate points."""
        if self.kind == "categorical":
            index = _choice_index(value, self.choices)
            return ("c", index) if index is not None else ("v", repr(value))
        if self.kind == "fixed":
            return repr(value)
        return float(value)

    def check(self, value: Any) -> str | None:
        """Why ``value`` cannot belong to this dimension, or None when it can."""
        if self.kind == "categorical":
            return None if _in_choices(value, self.choices) else f"{value!r} is not one of {list(self.choices)}"
        if self.kind == "fixed":
            return None if value == self.value else f"{value!r} differs from the fixed value {self.value!r}"
        if not _is_number(value):
            return f"{value!r} is not a finite number"
        if self.integer and not _is_integral(value):
            return f"{value!r} is not an integer"
        if self.low is not None:
            slack = BOUNDS_TOLERANCE * max(1.0, abs(self.low), abs(self.high))
            if not self.low - slack <= value <= self.high + slack:
                return f"{value!r} is outside [{self.low}, {self.high}]"
        return None


def _choice_index(value: Any, choices: tuple[Any, ...]) -> int | None:
    # 1 == True in Python; a bool category must not match an int value or the reverse.
    for i, c in enumerate(choices):
        if value == c and isinstance(value, bool) == isinstance(c, bool):
            return i
    return None


def _in_choices(value: Any, choices: tuple[Any, ...]) -> bool:
    return _choice_index(value, choices) is not None


class SearchSpace:
    """An ordered set of dimensions, plus the arrays that group some of them."""

    def __init__(self, dimensions: list[Dimension], arrays: Mapping[str, int] | None = None):
        if not dimensions:
            raise SpecError([("", "the search space is empty")])
        self.dimensions: tuple[Dimension, ...] = tuple(dimensions)
        self.arrays: dict[str, int] = dict(arrays or {})
        self._by_name = {d.name: d for d in self.dimensions}
        #: The keys of a user-facing point (arrays as one key each), checked for every history point.
        self._point_keys = frozenset(
            {d.name for d in self.dimensions} - {f"{a}[{i}]" for a, n in self.arrays.items() for i in range(n)}
            | set(self.arrays))

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: Any, where: str = "searchSpace") -> SearchSpace:
        """Build a space from either dialect (both may be mixed); errors name ``where.<key>``."""
        if not isinstance(spec, Mapping):
            raise SpecError([(where, f"a search space is a JSON object, got {type(spec).__name__}")])
        if not spec:
            raise SpecError([(where, "the search space is empty: give at least one hyperparameter")])
        dims: list[Dimension] = []
        arrays: dict[str, int] = {}
        problems: list[tuple[str, str]] = []
        for name, entry in spec.items():
            try:
                parsed, size = _parse_entry(str(name), entry)
            except SpecError as exc:
                problems.extend(exc.within(where).problems)
                continue
            dims.extend(parsed)
            if size is not None:
                arrays[str(name)] = size
        if problems:
            raise SpecError(problems)
        return cls(dims, arrays)

    def to_dict(self) -> dict[str, Any]:
        """The space in hpogrid dialect (arrays in nevergrad dialect); parse() reads it back."""
        out: dict[str, Any] = {}
        for dim in self.dimensions:
            array = _array_name(dim.name)
            if array in self.arrays:
                out[array] = {"type": "Array", "params": {"shape": [self.arrays[array]]},
                              "bounds": [dim.low, dim.high]}
                continue
            out[dim.name] = _to_hpogrid(dim)
        return out

    # --- points ---------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dimensions)

    def __getitem__(self, name: str) -> Dimension:
        return self._by_name[name]

    def __len__(self) -> int:
        return len(self.dimensions)

    def sample(self, rng: random.Random) -> dict[str, Any]:
        return self.assemble({d.name: d.sample(rng) for d in self.dimensions})

    def assemble(self, flat: Mapping[str, Any]) -> dict[str, Any]:
        """A user-facing point from flat dimension values: arrays become lists."""
        if not self.arrays:
            return dict(flat)
        out: dict[str, Any] = {}
        for name, value in flat.items():
            array = _array_name(name)
            if array in self.arrays:
                out.setdefault(array, []).append(value)
            else:
                out[name] = value
        return out

    def flatten(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of assemble(); assumes the point passed check_point()."""
        flat = dict(point)
        for array, size in self.arrays.items():
            values = flat.pop(array)
            flat.update({f"{array}[{i}]": values[i] for i in range(size)})
        return flat

    def check_point(self, point: Any, where: str) -> dict[str, Any]:
        """Validate a user-facing point; returns its flat form or raises SpecError naming ``where``."""
        if not isinstance(point, Mapping):
            raise SpecError([(where, f"a point is a JSON object, got {type(point).__name__}")])
        problems = [] if point.keys() == self._point_keys else self._key_problems(point, where)
        for array, size in self.arrays.items():
            value = point.get(array)
            if array in point and (not isinstance(value, list) or len(value) != size):
                problems.append((f"{where}.{array}", f"expected a list of {size} numbers"))
        if problems:
            raise SpecError(problems)
        flat = self.flatten(point)
        for dim in self.dimensions:
            why = dim.check(flat[dim.name])
            if why:
                problems.append((f"{where}.{dim.name}", why))
        if problems:
            raise SpecError(problems)
        return flat

    def _key_problems(self, point: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
        missing = sorted(self._point_keys - set(point))
        unknown = sorted(set(point) - self._point_keys)
        return ([(where, f"missing hyperparameter(s) {missing}")] if missing else []) + (
            [(where, f"unknown hyperparameter(s) {unknown}")] if unknown else [])

    def key(self, flat: Mapping[str, Any]) -> tuple[Any, ...]:
        """Hashable identity of a flat point: equal keys mean duplicate points."""
        return tuple(d.canonical(flat[d.name]) for d in self.dimensions)

    # --- grids ----------------------------------------------------------------------------------
    @property
    def is_finite(self) -> bool:
        return all(d.is_finite for d in self.dimensions)

    def grid_size(self) -> int:
        return math.prod(len(d.grid_values()) for d in self.dimensions)

    def iter_grid(self) -> Iterator[dict[str, Any]]:
        """Every flat point of a finite space, in lexicographic order of the dimensions."""
        values = [d.grid_values() for d in self.dimensions]
        for combo in itertools.product(*values):
            yield dict(zip(self.names, combo, strict=True))


def _array_name(flat_name: str) -> str:
    return flat_name.split("[", 1)[0]


def _parse_entry(name: str, entry: Any) -> tuple[list[Dimension], int | None]:
    if not isinstance(entry, Mapping):
        raise SpecError([(name, "expected an object with 'method' (hpogrid dialect) or 'type' "
                          f"(nevergrad dialect), got {type(entry).__name__}")])
    if "method" in entry:
        return [_parse_hpogrid(name, entry)], None
    if "type" in entry:
        return _parse_nevergrad(name, entry)
    raise SpecError([(name, "expected 'method' (hpogrid dialect) or 'type' (nevergrad dialect)")])


def _parse_hpogrid(name: str, entry: Mapping[str, Any]) -> Dimension:
    method = entry["method"]
    if method not in _HPOGRID_PARAMS:
        raise SpecError([(f"{name}.method", f"unknown method {method!r}; known: {sorted(_HPOGRID_PARAMS)}")])
    extra = sorted(set(entry) - {"method", "dimension"})
    if extra:
        raise SpecError([(name, f"unknown key(s) {extra}; expected 'method' and 'dimension'")])
    params = entry.get("dimension", {})
    if not isinstance(params, Mapping):
        raise SpecError([(f"{name}.dimension", "expected an object")])
    required, optional = _HPOGRID_PARAMS[method]
    where = f"{name}.dimension"
    missing = [k for k in required if k not in params]
    if missing:
        raise SpecError([(where, f"method {method!r} needs {missing}")])
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown:
        raise SpecError([(where, f"unknown key(s) {unknown} for method {method!r}")])
    if method == "categorical":
        return _categorical(name, params["categories"], where + ".categories", ordered=False)
    if method == "fixed":
        return Dimension(name, "fixed", value=params["value"])
    numbers = _numbers(params, [k for k in required + optional if k in params and k != "grid_search"], where)
    if "base" in numbers and (numbers["base"] <= 0 or numbers["base"] == 1):
        raise SpecError([(f"{where}.base", f"a logarithm base must be positive and not 1, got {numbers['base']}")])
    return _numeric(name, method, numbers, where)


def _numbers(params: Mapping[str, Any], keys: list[str], where: str) -> dict[str, float]:
    problems = [(f"{where}.{k}", f"expected a finite number, got {params[k]!r}")
                for k in keys if not _is_number(params[k])]
    if problems:
        raise SpecError(problems)
    return {k: params[k] for k in keys}


def _numeric(name: str, kind: str, p: dict[str, float], where: str) -> Dimension:
    """Validate numeric parameters and build the dimension."""
    low, high, q = p.get("low"), p.get("high"), p.get("q")
    if low is not None and not low < high:
        raise SpecError([(where, f"low must be < high, got low={low}, high={high}")])
    if kind in ("loguniform", "qloguniform") and low <= 0:
        raise SpecError([(f"{where}.low", f"log-scaled bounds must be positive, got low={low}")])
    if q is not None and q <= 0:
        raise SpecError([(f"{where}.q", f"q must be positive, got {q}")])
    if "sigma" in p and p["sigma"] <= 0:
        raise SpecError([(f"{where}.sigma", f"sigma must be positive, got {p['sigma']}")])
    if kind == "uniformint":
        if not (_is_integral(low) and _is_integral(high)):
            raise SpecError([(where, f"uniformint bounds must be integers, got low={low}, high={high}")])
        return Dimension(name, kind, low=int(low), high=int(high), integer=True)
    integer = q is not None and _is_integral(q) and all(_is_integral(v) for v in (low, high) if v is not None)
    dim = Dimension(name, kind, low=low, high=high, q=q, mu=p.get("mu"), sigma=p.get("sigma"), integer=integer)
    if q is not None and low is not None:
        lo, hi = dim._q_index_range()
        if lo > hi:
            raise SpecError([(where, f"no multiple of q={q} lies in [{low}, {high}]")])
    return dim


def _categorical(name: str, choices: Any, where: str, ordered: bool) -> Dimension:
    if not isinstance(choices, list) or not choices:
        raise SpecError([(where, "categories must be a non-empty list")])
    seen: list[Any] = []
    for c in choices:
        if _in_choices(c, tuple(seen)):
            raise SpecError([(where, f"category {c!r} appears twice")])
        seen.append(c)
    return Dimension(name, "categorical", choices=tuple(choices), ordered=ordered)


def _parse_nevergrad(name: str, entry: Mapping[str, Any]) -> tuple[list[Dimension], int | None]:
    kind = entry["type"]
    if kind not in _NEVERGRAD_TYPES:
        raise SpecError([(f"{name}.type", f"unknown type {kind!r}; known: {list(_NEVERGRAD_TYPES)}")])
    extra = sorted(set(entry) - {"type", "params", "bounds", "integer"})
    if extra:
        raise SpecError([(name, f"unknown key(s) {extra}; expected 'type', 'params', 'bounds', 'integer'")])
    params = dict(entry.get("params") or {})
    if kind in ("Choice", "TransitionChoice"):
        if "choices" not in params:
            raise SpecError([(f"{name}.params", f"{kind} needs 'choices'")])
        return [_categorical(name, params["choices"], f"{name}.params.choices", kind == "TransitionChoice")], None
    lower, upper = _nevergrad_bounds(name, entry, params)
    integer = entry.get("integer", False)
    if not isinstance(integer, bool):
        raise SpecError([(f"{name}.integer", f"expected true or false, got {integer!r}")])
    if kind == "Array":
        return _nevergrad_array(name, params, lower, upper), _array_size(name, params)
    if kind == "Log":
        if lower is None:
            raise SpecError([(name, "Log needs bounds: 'bounds': [lower, upper] or params lower/upper")])
        spec = {"low": lower, "high": upper} | ({"q": 1} if integer else {})
        return [_numeric(name, "qloguniform" if integer else "loguniform", spec, name)], None
    if lower is None:
        init = params.get("init", 0.0)
        sigma = params.get("sigma", 1.0)
        return [_numeric(name, "normal", _numbers({"mu": init, "sigma": sigma}, ["mu", "sigma"], f"{name}.params"),
                         name)], None
    if integer:
        return [_numeric(name, "uniformint", {"low": math.ceil(lower), "high": math.floor(upper)}, name)], None
    return [_numeric(name, "uniform", {"low": lower, "high": upper}, name)], None


def _nevergrad_bounds(name: str, entry: Mapping[str, Any], params: dict[str, Any]) -> tuple[Any, Any]:
    if "bounds" in entry:
        bounds = entry["bounds"]
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise SpecError([(f"{name}.bounds", f"expected [lower, upper], got {bounds!r}")])
        values = {"lower": bounds[0], "upper": bounds[1]}
        where = f"{name}.bounds"
    elif "lower" in params or "upper" in params:
        values = {k: params.get(k) for k in ("lower", "upper")}
        where = f"{name}.params"
    else:
        return None, None
    numbers = _numbers(values, ["lower", "upper"], where)
    return numbers["lower"], numbers["upper"]


def _array_size(name: str, params: Mapping[str, Any]) -> int:
    shape = params.get("shape")
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = [shape]
    if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 1):
        raise SpecError([(f"{name}.params.shape", f"expected a positive length such as [3], got {shape!r}")])
    return shape[0]


def _nevergrad_array(name: str, params: Mapping[str, Any], lower: Any, upper: Any) -> list[Dimension]:
    if lower is None:
        raise SpecError([(name, "Array needs bounds: 'bounds': [lower, upper]")])
    size = _array_size(name, params)
    return [_numeric(f"{name}[{i}]", "uniform", {"low": lower, "high": upper}, name) for i in range(size)]


def _to_hpogrid(dim: Dimension) -> dict[str, Any]:
    if dim.kind == "categorical":
        if dim.ordered:
            return {"type": "TransitionChoice", "params": {"choices": list(dim.choices)}}
        return {"method": "categorical", "dimension": {"categories": list(dim.choices)}}
    if dim.kind == "fixed":
        return {"method": "fixed", "dimension": {"value": dim.value}}
    keys = _HPOGRID_PARAMS[dim.kind][0]
    return {"method": dim.kind, "dimension": {k: getattr(dim, k) for k in keys}}
