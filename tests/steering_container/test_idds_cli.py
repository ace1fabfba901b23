"""The steering CLI driven the way iDDS drives it: a command template with %IN/%OUT/%NUM_POINTS/%MAX_POINTS."""

import json
import shlex
import subprocess
import sys

import pytest

TEMPLATE = (f"{sys.executable} -m steering_container generate --infile %IN --outfile %OUT "
            "--n_point %NUM_POINTS --max_point %MAX_POINTS --method {method} --seed 3")
SPACE = {"lr": {"method": "loguniform", "dimension": {"low": 1e-6, "high": 3e-2}},
         "bin_size": {"method": "categorical", "dimension": {"categories": [8, 16, 32, 64, 128]}},
         "dropout": {"type": "Scalar", "bounds": [0, 0.5]}}
DONE = {"lr": 1e-3, "bin_size": 16, "dropout": 0.1}
BEST = {"lr": 2e-3, "bin_size": 32, "dropout": 0.2}
DEFAULT_METHOD = "tpe"
PENDING = {"lr": 1e-4, "bin_size": 64, "dropout": 0.3}


def run_steering(tmp_path, doc, n, m, method=DEFAULT_METHOD, raw=None):
    """Write idds_input.json, substitute the placeholders as iDDS does, run, return (rc, points, stderr)."""
    infile, outfile = tmp_path / "idds_input.json", tmp_path / "idds_output.json"
    infile.write_text(raw if raw is not None else json.dumps(doc))
    command = (TEMPLATE.format(method=method).replace("%IN", str(infile)).replace("%OUT", str(outfile))
               .replace("%NUM_POINTS", str(n)).replace("%MAX_POINTS", str(m)))
    proc = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120)
    points = json.loads(outfile.read_text()) if outfile.exists() else None
    return proc.returncode, points, proc.stderr


@pytest.mark.parametrize("method", ["tpe", "random", "nevergrad:NGOpt"])
def test_new_points_respect_budget_pending_points_and_zero_loss(tmp_path, method):
    doc = {"points": [[DONE, 0.7], [BEST, 0.0], [PENDING, None]], "opt_space": SPACE}
    rc, points, err = run_steering(tmp_path, doc, n=4, m=6, method=method)
    assert rc == 0, err
    assert len(points) == 3  # min(4, 6 - 3)
    known = [json.dumps(p, sort_keys=True) for p in (DONE, BEST, PENDING)]
    proposed = [json.dumps(p, sort_keys=True) for p in points]
    assert len(set(proposed)) == 3 and not set(proposed) & set(known)
    for p in points:
        assert set(p) == set(SPACE) and 1e-6 <= p["lr"] <= 3e-2 and p["bin_size"] in (8, 16, 32, 64, 128)


def test_same_input_same_seed_same_output(tmp_path):
    doc = {"points": [[DONE, 0.7], [PENDING, None]], "opt_space": SPACE}
    first = run_steering(tmp_path, doc, 2, 10)[1]
    assert first == run_steering(tmp_path, doc, 2, 10)[1]


def test_exhausted_budget_writes_an_empty_list(tmp_path):
    doc = {"points": [[DONE, 0.7], [BEST, 0.0], [PENDING, None]], "opt_space": SPACE}
    rc, points, err = run_steering(tmp_path, doc, n=2, m=3)
    assert (rc, points) == (0, []), err


def test_segmented_input_gives_model_id_pairs_within_each_segment_budget(tmp_path):
    other = {"units": {"method": "categorical", "dimension": {"categories": [32, 64, 128]}}}
    doc = {"points": [[[0, DONE], 0.5], [[0, BEST], None], [[1, {"units": 64}], 0.0]],
           "opt_space": [{"model_id": 0, "search_space": SPACE}, {"model_id": 1, "search_space": other}]}
    rc, points, err = run_steering(tmp_path, doc, n=2, m=3)
    assert rc == 0, err
    by_model = {0: [], 1: []}
    for model_id, point in points:
        by_model[model_id].append(point)
    assert len(by_model[0]) == 1  # min(2, 3 - 2)
    assert sorted(p["units"] for p in by_model[1]) == [32, 128]  # the two values not yet tried
    assert all(set(p) == set(SPACE) for p in by_model[0])


def test_a_failed_point_is_accepted_and_never_reproposed(tmp_path):
    finite = {"a": {"method": "categorical", "dimension": {"categories": [1, 2, 3]}}}
    doc = {"points": [[{"a": 1}, None, "failed"], [{"a": 2}, 0.0]], "opt_space": finite}
    rc, points, err = run_steering(tmp_path, doc, n=5, m=10)
    assert (rc, points) == (0, [{"a": 3}]), err


@pytest.mark.parametrize("raw, doc, expected", [
    ("", None, "empty"),
    ('{"points": [[{"lr": 0.001', None, "invalid JSON at line 1"),
    (None, {"points": []}, "missing key(s) ['opt_space']"),
    (None, {"points": [[DONE, "0.5"]], "opt_space": SPACE}, "points[0][1]: loss must be a number or null"),
    (None, {"points": [[{**DONE, "bin_size": 7}, 0.5]], "opt_space": SPACE}, "points[0][0].bin_size"),
    (None, {"points": [[{"lr": 1e-3}, 0.5]], "opt_space": SPACE}, "missing hyperparameter(s)"),
    (None, {"points": [], "opt_space": {"lr": {"method": "loguniform", "dimension": {"low": 0, "high": 1}}}},
     "opt_space.lr.dimension.low"),
    (None, {"points": [[[5, DONE], 0.1]], "opt_space": [{"model_id": 0, "search_space": SPACE}]},
     "model_id 5 is not in opt_space"),
    (None, {"points": "none", "opt_space": SPACE}, "points: expected a list"),
])
def test_bad_input_exits_non_zero_names_the_problem_and_writes_nothing(tmp_path, raw, doc, expected):
    rc, points, err = run_steering(tmp_path, doc, 2, 10, raw=raw)
    assert rc == 2
    assert points is None
    assert expected in err
    assert "idds_input.json" in err


def test_unknown_method_and_negative_counts_are_refused(tmp_path):
    doc = {"points": [], "opt_space": SPACE}
    rc, points, err = run_steering(tmp_path, doc, 2, 10, method="bayes")
    assert (rc, points) == (2, None) and "unknown method 'bayes'" in err
    rc, points, err = run_steering(tmp_path, doc, -1, 10)
    assert (rc, points) == (2, None) and "--n_point" in err


def test_hepopt_entry_runs_the_same_contract(tmp_path):
    infile, outfile = tmp_path / "in.json", tmp_path / "out.json"
    infile.write_text(json.dumps({"points": [[DONE, 0.1]], "opt_space": SPACE}))
    proc = subprocess.run([sys.executable, "-m", "hepopt", "steer", "--infile", str(infile), "--outfile",
                           str(outfile), "--n_point", "2", "--max_point", "5", "--method", "random"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(outfile.read_text())) == 2
