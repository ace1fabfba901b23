"""Physically plausible toy events in the Zenodo Delphes MLPF format, for tests and demos.

Physics choices (a CMS-like detector, simplified; all numbers are named constants below):

* Particles of the five classes are drawn with fixed fractions (mostly charged hadrons and photons,
  as in pileup-dominated events), flat in η over the calorimeter acceptance |η| < 5, flat in φ, and
  with falling power-law spectra dN/dpT ∝ pT^-n above a minimum pT (leptons harder, as from W decays).
* Charged particles within |η| < 2.5 and above 0.5 GeV become tracks: pT smeared by 1 % ⊕ 0.02 %·pT,
  η and φ by 2 mrad; the outer-surface position follows the helix in a 3.8 T field to the tracker
  barrel (r = 1.29 m) or endcap (|z| = 3 m). Particles that curl up before leaving never reach the
  calorimeter.
* Calorimeter towers form a 115 × 72 grid in η × φ (Δη ≈ Δφ ≈ 0.087). Photons and electrons deposit
  all energy in the EM part, hadrons a uniform 0–40 % (their π0 content), the rest hadronic; muons
  deposit nothing (the MIP signal is neglected). Deposits are smeared with log-normal responses of
  width 5 %/√E ⊕ 1 % (EM) and 100 %/√E ⊕ 5 % (hadronic). Charged particles hit the tower at their
  tracker exit point, neutral ones along their direction.
* Targets follow the dataset's rules: a track's target is its particle; a tower's target is the
  untracked species with the most energy in it (summed four-momentum of that species), so towers
  holding only tracked particles have none; neutral hadrons under 1 GeV are dropped.
* ``ycand`` is a rule-based particle flow: tracks are charged candidates (lepton flags give the
  species), towers keep their energy minus that of the tracks pointing at them, and a remainder
  above threshold becomes a photon (EM-dominated tower) or a neutral hadron.

Towers come first in an event, then tracks. Each file draws from its own generator seeded by
``(seed, file index)``, so a file does not depend on how many files were generated before it.
"""

from __future__ import annotations

import bz2
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hepopt.errors import SpecError
from hepopt.files import write_atomically

from . import format as fmt
from .reader import Event

GENERATOR_VERSION = 1
PICKLE_PROTOCOL = 4
BZ2_LEVEL = 9
DEFAULT_MIN_ELEMENTS = 100
DEFAULT_MAX_ELEMENTS = 400

# Particle content: class → (fraction, mass GeV, minimum pT GeV, spectral index n of dN/dpT ∝ pT^-n).
SPECIES = {
    fmt.CLASS_CHARGED_HADRON: (0.55, 0.1396, 0.5, 3.5),
    fmt.CLASS_NEUTRAL_HADRON: (0.12, 0.4976, 0.5, 3.5),
    fmt.CLASS_PHOTON: (0.29, 0.0, 0.3, 3.5),
    fmt.CLASS_ELECTRON: (0.02, 0.000511, 1.0, 2.5),
    fmt.CLASS_MUON: (0.02, 0.1057, 1.0, 2.5),
}
PT_MAX = 1000.0
PION_MASS = 0.1396

CALO_ETA_MAX = 5.0
N_ETA_TOWERS = 115
N_PHI_TOWERS = 72
TOWER_DETA = 2 * CALO_ETA_MAX / N_ETA_TOWERS
TOWER_DPHI = 2 * np.pi / N_PHI_TOWERS

TRACKER_ETA_MAX = 2.5
TRACK_MIN_PT = 0.5
TRACKER_RADIUS = 1.29  # m
TRACKER_HALF_LENGTH = 3.0  # m
B_FIELD = 3.8  # T
CURVATURE_CONSTANT = 0.3  # pT [GeV] = 0.3 · B [T] · R [m]
TRACK_PT_RES_CONSTANT = 0.01
TRACK_PT_RES_SLOPE = 2e-4  # per GeV
TRACK_ANGLE_RES = 0.002

HADRON_EM_FRACTION_MAX = 0.4
EM_STOCHASTIC, EM_CONSTANT = 0.05, 0.01
HAD_STOCHASTIC, HAD_CONSTANT = 1.0, 0.05
MAX_RELATIVE_RESOLUTION = 1.0

NEUTRAL_HADRON_MIN_E = 1.0  # GeV: lighter neutral hadrons are no target (and no candidate)
PHOTON_CANDIDATE_MIN_E = 0.5  # GeV
MAX_POOL_ROUNDS = 100


@dataclass
class Particles:
    """Generator-level particles plus the detector randoms drawn with them (columns of equal length)."""

    cls: np.ndarray
    charge: np.ndarray
    pt: np.ndarray
    eta: np.ndarray
    phi: np.ndarray
    mass: np.ndarray
    em_fraction: np.ndarray
    noise: np.ndarray  # (n, 5): EM response, hadronic response, track pT, η, φ

    def __len__(self) -> int:
        return len(self.cls)

    def take(self, index: np.ndarray) -> Particles:
        return Particles(*(getattr(self, name)[index] for name in self.__dataclass_fields__))

    @property
    def energy(self) -> np.ndarray:
        return np.sqrt((self.pt * np.cosh(self.eta)) ** 2 + self.mass**2)

    @property
    def tracked(self) -> np.ndarray:
        return (self.charge != 0) & (np.abs(self.eta) < TRACKER_ETA_MAX) & (self.pt > TRACK_MIN_PT)


def draw_particles(rng: np.random.Generator, n: int) -> Particles:
    """``n`` particles with the class fractions, spectra and angular ranges of SPECIES."""
    classes = np.array(list(SPECIES), dtype=np.int64)
    table = np.array(list(SPECIES.values()))
    kind = rng.choice(len(classes), size=n, p=table[:, 0] / table[:, 0].sum())
    _, mass, pt_min, index = table[kind].T
    pt = np.minimum(pt_min * (1.0 - rng.random(n)) ** (-1.0 / (index - 1.0)), PT_MAX)
    cls = classes[kind]
    charged = np.isin(cls, fmt.CHARGED_CLASSES)
    charge = np.where(charged, rng.choice([-1.0, 1.0], size=n), 0.0)
    hadron = np.isin(cls, (fmt.CLASS_CHARGED_HADRON, fmt.CLASS_NEUTRAL_HADRON))
    em_fraction = np.where(hadron, rng.uniform(0.0, HADRON_EM_FRACTION_MAX, n), 1.0)
    em_fraction[cls == fmt.CLASS_MUON] = 0.0
    return Particles(
        cls=cls, charge=charge, pt=pt,
        eta=rng.uniform(-CALO_ETA_MAX, CALO_ETA_MAX, n), phi=rng.uniform(-np.pi, np.pi, n),
        mass=mass, em_fraction=em_fraction, noise=rng.standard_normal((n, 5)),
    )


def helix_exit(pt: np.ndarray, eta: np.ndarray, phi: np.ndarray, charge: np.ndarray) -> tuple[np.ndarray, ...]:
    """Where a particle from the origin leaves the tracker: (η, φ) of the position, and whether it does.

    Transverse arc length s to the barrel or the endcap, whichever comes first; a particle that would
    need more than half a turn curls up inside.
    """
    radius = np.where(charge != 0, pt / (CURVATURE_CONSTANT * B_FIELD), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        reach = TRACKER_RADIUS / (2 * radius)
        s_barrel = np.where(reach <= 1, 2 * radius * np.arcsin(np.minimum(reach, 1)), np.inf)
        s_barrel = np.where(np.isinf(radius), TRACKER_RADIUS, s_barrel)
        s_endcap = TRACKER_HALF_LENGTH / np.abs(np.sinh(eta))
        s = np.minimum(s_barrel, s_endcap)
        escapes = s <= np.pi * radius
        s = np.minimum(s, np.pi * radius)  # a curler's last position: the far side of its circle
        half_angle = np.where(np.isinf(radius), 0.0, s / (2 * radius))
        r = np.where(np.isinf(radius), s, 2 * radius * np.sin(half_angle))
    eta_exit = np.arcsinh(s * np.sinh(eta) / np.maximum(r, 1e-9))
    phi_exit = _wrap(phi - charge * half_angle)
    return eta_exit, phi_exit, escapes


def _wrap(phi: np.ndarray) -> np.ndarray:
    return (phi + np.pi) % (2 * np.pi) - np.pi


def tower_index(eta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Flat tower number ``i_eta · N_PHI_TOWERS + i_phi`` of the cell holding (η, φ)."""
    i_eta = np.clip(np.floor((eta + CALO_ETA_MAX) / TOWER_DETA), 0, N_ETA_TOWERS - 1).astype(np.int64)
    i_phi = np.floor((_wrap(phi) + np.pi) / TOWER_DPHI).astype(np.int64) % N_PHI_TOWERS
    return i_eta * N_PHI_TOWERS + i_phi


def tower_center(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    i_eta, i_phi = np.divmod(index, N_PHI_TOWERS)
    return -CALO_ETA_MAX + (i_eta + 0.5) * TOWER_DETA, -np.pi + (i_phi + 0.5) * TOWER_DPHI


def calo_impact(p: Particles) -> tuple[np.ndarray, np.ndarray]:
    """Tower hit by each particle, and whether it deposits energy at all."""
    eta_exit, phi_exit, escapes = helix_exit(p.pt, p.eta, p.phi, p.charge)
    charged = p.charge != 0
    towers = tower_index(np.where(charged, eta_exit, p.eta), np.where(charged, phi_exit, p.phi))
    deposits = escapes & (p.cls != fmt.CLASS_MUON)
    return towers, deposits


def _response(energy: np.ndarray, noise: np.ndarray, stochastic: float, constant: float) -> np.ndarray:
    """Log-normal smearing: positive, mean-preserving, relative width stochastic/√E ⊕ constant."""
    with np.errstate(divide="ignore"):
        sigma = np.minimum(np.hypot(stochastic / np.sqrt(energy), constant), MAX_RELATIVE_RESOLUTION)
    return energy * np.exp(sigma * noise - sigma**2 / 2)


def select_particles(rng: np.random.Generator, n_elements: int) -> Particles:
    """Particles that together make exactly ``n_elements`` elements (tracks + distinct towers)."""
    pool = draw_particles(rng, 0)
    chosen: list[int] = []
    seen: set[int] = set()
    count = 0
    for _ in range(MAX_POOL_ROUNDS):
        start = len(pool)
        pool = _concat(pool, draw_particles(rng, max(n_elements, 64)))
        towers, deposits = calo_impact(pool)
        tracked = pool.tracked
        for i in range(start, len(pool)):
            new_tower = bool(deposits[i]) and int(towers[i]) not in seen
            added = int(tracked[i]) + int(new_tower)
            if count + added > n_elements:  # particles adding no element still add energy
                continue
            chosen.append(i)
            count += added
            if new_tower:
                seen.add(int(towers[i]))
            if count == n_elements:
                return pool.take(np.array(chosen, dtype=np.int64))
    raise RuntimeError(f"could not assemble {n_elements} elements")  # unreachable for sane sizes


def _concat(a: Particles, b: Particles) -> Particles:
    return Particles(*(np.concatenate([getattr(a, n), getattr(b, n)]) for n in a.__dataclass_fields__))


def _four_vector_rows(cls: np.ndarray, charge: np.ndarray, px: np.ndarray, py: np.ndarray, pz: np.ndarray,
                      energy: np.ndarray) -> np.ndarray:
    """Target rows (7 columns) from summed momenta."""
    pt = np.hypot(px, py)
    safe_pt = np.where(pt > 0, pt, 1.0)
    rows = np.zeros((len(cls), fmt.N_Y_COLUMNS))
    rows[:, fmt.Y_CLASS] = cls
    rows[:, fmt.Y_CHARGE] = charge
    rows[:, fmt.Y_PT] = pt
    rows[:, fmt.Y_ETA] = np.arcsinh(pz / safe_pt)
    rows[:, fmt.Y_SIN_PHI] = py / safe_pt
    rows[:, fmt.Y_COS_PHI] = px / safe_pt
    rows[:, fmt.Y_E] = energy
    return rows


def simulate_event(p: Particles) -> Event:
    """Detector response, ``ygen`` and ``ycand`` of one event's particles."""
    towers, deposits = calo_impact(p)
    tower_ids, slot = np.unique(towers[deposits], return_inverse=True)
    x_towers = _tower_features(p, deposits, tower_ids, slot)
    gen_towers = _tower_targets(p, deposits, len(tower_ids), slot)
    track_rows = np.flatnonzero(p.tracked)
    x_tracks = _track_features(p.take(track_rows))
    gen_tracks = _particle_rows(p.take(track_rows))
    x = np.vstack([x_towers, x_tracks])
    ygen = np.vstack([gen_towers, gen_tracks])
    ycand = np.vstack([_tower_candidates(x_towers, tower_ids, x_tracks), _track_candidates(x_tracks)])
    return Event(X=x.astype(np.float32), ygen=ygen.astype(np.float32), ycand=ycand.astype(np.float32))


def _tower_features(p: Particles, deposits: np.ndarray, tower_ids: np.ndarray, slot: np.ndarray) -> np.ndarray:
    energy = p.energy[deposits]
    noise = p.noise[deposits]
    em = _response(energy * p.em_fraction[deposits], noise[:, 0], EM_STOCHASTIC, EM_CONSTANT)
    had = _response(energy * (1 - p.em_fraction[deposits]), noise[:, 1], HAD_STOCHASTIC, HAD_CONSTANT)
    e_em = np.bincount(slot, em, minlength=len(tower_ids))
    e_had = np.bincount(slot, had, minlength=len(tower_ids))
    eta, phi = tower_center(tower_ids)
    x = np.zeros((len(tower_ids), fmt.N_X_COLUMNS))
    x[:, fmt.X_TYPE] = fmt.TYPE_TOWER
    x[:, fmt.X_E] = e_em + e_had
    x[:, fmt.X_PT] = x[:, fmt.X_E] / np.cosh(eta)
    x[:, fmt.X_ETA] = eta
    x[:, fmt.X_SIN_PHI] = np.sin(phi)
    x[:, fmt.X_COS_PHI] = np.cos(phi)
    x[:, fmt.X_E_EM] = e_em
    x[:, fmt.X_E_HAD] = e_had
    return x


def _tower_targets(p: Particles, deposits: np.ndarray, n_towers: int, slot: np.ndarray) -> np.ndarray:
    """The energy-dominant untracked species of each tower, as the sum of its particles there."""
    in_tower = np.flatnonzero(deposits)
    untracked = ~p.tracked[in_tower]
    members, where = in_tower[untracked], slot[untracked]
    energy = p.energy[members]
    by_species = np.bincount(where * fmt.N_CLASSES + p.cls[members], energy, minlength=n_towers * fmt.N_CLASSES)
    dominant = by_species.reshape(n_towers, fmt.N_CLASSES).argmax(axis=1)
    keep = p.cls[members] == dominant[where]
    members, where, energy = members[keep], where[keep], energy[keep]
    pz = p.pt[members] * np.sinh(p.eta[members])
    sums = [np.bincount(where, w, minlength=n_towers) for w in (
        p.charge[members] * energy, p.pt[members] * np.cos(p.phi[members]),
        p.pt[members] * np.sin(p.phi[members]), pz, energy)]
    charge = np.sign(sums[0])
    cls = np.where(sums[4] > 0, dominant, fmt.CLASS_NONE)
    rows = _four_vector_rows(cls, charge, *sums[1:])
    dropped = (cls == fmt.CLASS_NONE) | ((cls == fmt.CLASS_NEUTRAL_HADRON) & (sums[4] < NEUTRAL_HADRON_MIN_E))
    rows[dropped] = 0.0
    return rows


def _track_features(p: Particles) -> np.ndarray:
    eta_exit, phi_exit, _ = helix_exit(p.pt, p.eta, p.phi, p.charge)
    resolution = np.hypot(TRACK_PT_RES_CONSTANT, TRACK_PT_RES_SLOPE * p.pt)
    pt = p.pt * np.abs(1 + resolution * p.noise[:, 2])
    eta = p.eta + TRACK_ANGLE_RES * p.noise[:, 3]
    phi = p.phi + TRACK_ANGLE_RES * p.noise[:, 4]
    x = np.zeros((len(p), fmt.N_X_COLUMNS))
    x[:, fmt.X_TYPE] = fmt.TYPE_TRACK
    x[:, fmt.X_PT] = pt
    x[:, fmt.X_ETA] = eta
    x[:, fmt.X_SIN_PHI] = np.sin(phi)
    x[:, fmt.X_COS_PHI] = np.cos(phi)
    x[:, fmt.X_E] = pt * np.cosh(eta)
    x[:, fmt.X_ETA_OUTER] = eta_exit
    x[:, fmt.X_SIN_PHI_OUTER] = np.sin(phi_exit)
    x[:, fmt.X_COS_PHI_OUTER] = np.cos(phi_exit)
    x[:, fmt.X_CHARGE] = p.charge
    x[:, fmt.X_IS_GEN_MUON] = p.cls == fmt.CLASS_MUON
    x[:, fmt.X_IS_GEN_ELECTRON] = p.cls == fmt.CLASS_ELECTRON
    return x


def _particle_rows(p: Particles) -> np.ndarray:
    """One target row per particle: its own class, charge and kinematics."""
    pz = p.pt * np.sinh(p.eta)
    return _four_vector_rows(p.cls, p.charge, p.pt * np.cos(p.phi), p.pt * np.sin(p.phi), pz, p.energy)


def _track_candidates(x: np.ndarray) -> np.ndarray:
    """Charged candidates: species from the lepton flags, kinematics from the track."""
    cls = np.full(len(x), fmt.CLASS_CHARGED_HADRON)
    cls[x[:, fmt.X_IS_GEN_ELECTRON] > 0] = fmt.CLASS_ELECTRON
    cls[x[:, fmt.X_IS_GEN_MUON] > 0] = fmt.CLASS_MUON
    mass = np.where(cls == fmt.CLASS_CHARGED_HADRON, PION_MASS, 0.0)
    rows = np.zeros((len(x), fmt.N_Y_COLUMNS))
    rows[:, fmt.Y_CLASS] = cls
    rows[:, fmt.Y_CHARGE] = x[:, fmt.X_CHARGE]
    rows[:, fmt.Y_PT:fmt.Y_COS_PHI + 1] = x[:, fmt.X_PT:fmt.X_COS_PHI + 1]
    rows[:, fmt.Y_E] = np.hypot(x[:, fmt.X_E], mass)
    return rows


def _tower_candidates(towers: np.ndarray, tower_ids: np.ndarray, tracks: np.ndarray) -> np.ndarray:
    """Neutral candidates from the tower energy left after subtracting the tracks pointing at it."""
    phi_outer = np.arctan2(tracks[:, fmt.X_SIN_PHI_OUTER], tracks[:, fmt.X_COS_PHI_OUTER])
    hit = tower_index(tracks[:, fmt.X_ETA_OUTER], phi_outer)
    calorimetric = tracks[:, fmt.X_IS_GEN_MUON] == 0
    slot = np.searchsorted(tower_ids, hit)
    linked = calorimetric & (slot < len(tower_ids)) & (tower_ids[np.minimum(slot, len(tower_ids) - 1)] == hit)
    track_energy = np.bincount(slot[linked], tracks[linked, fmt.X_E], minlength=len(tower_ids))
    residual = towers[:, fmt.X_E] - track_energy
    photon = (towers[:, fmt.X_E_EM] > towers[:, fmt.X_E_HAD]) & (residual >= PHOTON_CANDIDATE_MIN_E)
    hadron = ~photon & (residual >= NEUTRAL_HADRON_MIN_E)
    rows = np.zeros((len(towers), fmt.N_Y_COLUMNS))
    rows[:, fmt.Y_CLASS] = np.select([photon, hadron], [fmt.CLASS_PHOTON, fmt.CLASS_NEUTRAL_HADRON], fmt.CLASS_NONE)
    made = photon | hadron
    eta = towers[:, fmt.X_ETA]
    rows[made, fmt.Y_PT] = residual[made] / np.cosh(eta[made])
    rows[made, fmt.Y_ETA] = eta[made]
    rows[made, fmt.Y_SIN_PHI] = towers[made, fmt.X_SIN_PHI]
    rows[made, fmt.Y_COS_PHI] = towers[made, fmt.X_COS_PHI]
    rows[made, fmt.Y_E] = residual[made]
    return rows


def generate_events(rng: np.random.Generator, n_events: int, min_elements: int = DEFAULT_MIN_ELEMENTS,
                    max_elements: int = DEFAULT_MAX_ELEMENTS) -> list[Event]:
    """``n_events`` events, each with a uniformly drawn number of elements in [min, max]."""
    sizes = rng.integers(min_elements, max_elements + 1, size=n_events)
    return [simulate_event(select_particles(rng, int(size))) for size in sizes]


def encode_events(events: list[Event]) -> bytes:
    """The file content: a bz2 pickle of ``{"X": [...], "ygen": [...], "ycand": [...]}``."""
    content = {key: [getattr(event, key) for event in events] for key in fmt.KEYS}
    return bz2.compress(pickle.dumps(content, protocol=PICKLE_PROTOCOL), compresslevel=BZ2_LEVEL)


def check_settings(files: int, events_per_file: int, seed: int, min_elements: int, max_elements: int) -> None:
    """Refuse impossible settings up front, naming the option."""
    problems = [(name, f"expected an integer ≥ {low}, got {value!r}") for name, value, low in (
        ("--files", files, 1), ("--events-per-file", events_per_file, 1), ("--seed", seed, 0),
        ("--min-elements", min_elements, 1), ("--max-elements", max_elements, 1))
        if isinstance(value, bool) or not isinstance(value, int) or value < low]
    if not problems and max_elements < min_elements:
        problems.append(("--max-elements", f"expected ≥ --min-elements ({min_elements}), got {max_elements}"))
    if problems:
        raise SpecError(problems)


def generate_dataset(out: str | Path, files: int, events_per_file: int = fmt.EVENTS_PER_FILE, seed: int = 0,
                     min_elements: int = DEFAULT_MIN_ELEMENTS, max_elements: int = DEFAULT_MAX_ELEMENTS,
                     ) -> list[Path]:
    """Write ``files`` Zenodo-named files into ``out``; returns their paths. Deterministic per seed."""
    check_settings(files, events_per_file, seed, min_elements, max_elements)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(files):
        rng = np.random.default_rng([seed, index])
        path = out / fmt.file_name(index)
        write_atomically(path, encode_events(generate_events(rng, events_per_file, min_elements, max_elements)))
        written.append(path)
    return written
