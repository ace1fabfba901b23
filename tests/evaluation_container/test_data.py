import bz2
import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from evaluation_container.data import (
    DataError,
    cache,
    default_dataset,
    generate_dataset,
    generate_events,
    iter_events,
    load_dataset,
    read_file,
    read_input_ds,
)
from evaluation_container.data import format as fmt
from evaluation_container.data import generator as gen
from hepopt.errors import HepoptError
from hepopt.files import write_atomically

REPO = Path(__file__).resolve().parents[2]
SMALL = {"events_per_file": 5, "min_elements": 30, "max_elements": 60}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Two files of 20 events, read back: the sample for the physics checks."""
    out = tmp_path_factory.mktemp("toy")
    generate_dataset(out, files=2, events_per_file=20, seed=11, min_elements=100, max_elements=400)
    dataset = load_dataset(out)
    stack = {key: np.vstack([getattr(event, key) for event in dataset]) for key in fmt.KEYS}
    return dataset, stack


def _write(path: Path, content: object) -> Path:
    path.write_bytes(bz2.compress(pickle.dumps(content)))
    return path


def _valid_content(n_events: int = 3, n_elements: int = 4) -> dict:
    events = generate_events(np.random.default_rng(0), n_events, n_elements, n_elements)
    return {key: [getattr(event, key) for event in events] for key in fmt.KEYS}


# --- generator ------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = generate_dataset(tmp_path / "a", files=2, seed=5, **SMALL)
    again = generate_dataset(tmp_path / "b", files=2, seed=5, **SMALL)
    other = generate_dataset(tmp_path / "c", files=2, seed=6, **SMALL)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert first[0].read_bytes() != other[0].read_bytes()
    assert first[0].read_bytes() != first[1].read_bytes()


def test_files_follow_zenodo_names(tmp_path):
    files = generate_dataset(tmp_path, files=3, seed=0, **SMALL)
    assert [p.name for p in files] == [f"tev14_pythia8_ttbar_0_{j}.pkl.bz2" for j in range(3)]
    assert fmt.file_name(57) == "tev14_pythia8_ttbar_1_7.pkl.bz2"


def test_round_trip_generator_to_reader(tmp_path):
    events = generate_events(np.random.default_rng(3), 4, 50, 80)
    path = tmp_path / fmt.file_name(0)
    write_atomically(path, gen.encode_events(events))
    back = read_file(path)
    assert len(back) == 4
    for written, read in zip(events, back, strict=True):
        for key in fmt.KEYS:
            assert np.array_equal(getattr(written, key), getattr(read, key))


def test_shapes_row_for_row_and_element_counts(toy):
    dataset, _ = toy
    assert len(dataset) == 40 and len(dataset.files) == 2
    for event in dataset:
        n = len(event)
        assert 100 <= n <= 400
        assert event.X.shape == (n, fmt.N_X_COLUMNS) and event.X.dtype == np.float32
        assert event.ygen.shape == event.ycand.shape == (n, fmt.N_Y_COLUMNS)


def test_tracks_are_central_charged_particles(toy):
    _, s = toy
    x, ygen, ycand = s["X"], s["ygen"], s["ycand"]
    track = x[:, fmt.X_TYPE] == fmt.TYPE_TRACK
    assert track.any()
    assert np.abs(ygen[track, fmt.Y_ETA]).max() < gen.TRACKER_ETA_MAX
    assert np.abs(x[track, fmt.X_ETA]).max() < gen.TRACKER_ETA_MAX + 10 * gen.TRACK_ANGLE_RES
    assert set(np.unique(ygen[track, fmt.Y_CLASS])) <= set(fmt.CHARGED_CLASSES)
    assert np.array_equal(ygen[track, fmt.Y_CHARGE], x[track, fmt.X_CHARGE])
    assert set(np.unique(x[track, fmt.X_CHARGE])) == {-1.0, 1.0}
    assert np.array_equal(x[track, fmt.X_IS_GEN_MUON] == 1, ygen[track, fmt.Y_CLASS] == fmt.CLASS_MUON)
    assert np.array_equal(x[track, fmt.X_IS_GEN_ELECTRON] == 1, ygen[track, fmt.Y_CLASS] == fmt.CLASS_ELECTRON)
    assert set(np.unique(ycand[track, fmt.Y_CLASS])) <= set(fmt.CHARGED_CLASSES)
    assert np.array_equal(ycand[track, fmt.Y_CHARGE], x[track, fmt.X_CHARGE])
    resolution = np.std(x[track, fmt.X_PT] / ygen[track, fmt.Y_PT] - 1)
    assert 0.005 < resolution < 0.05


def test_tower_targets_follow_the_dataset_rules(toy):
    _, s = toy
    x, ygen, ycand = s["X"], s["ygen"], s["ycand"]
    tower = x[:, fmt.X_TYPE] == fmt.TYPE_TOWER
    assert np.allclose(x[tower, fmt.X_E], x[tower, fmt.X_E_EM] + x[tower, fmt.X_E_HAD], rtol=1e-5)
    assert not x[tower, fmt.X_E_HAD + 1:].any()
    classes = ygen[tower, fmt.Y_CLASS]
    assert set(np.unique(classes)) == {0, 1, 2, 3, 4}  # muons leave no deposit, so never a tower target
    untracked_charged = np.isin(classes, (fmt.CLASS_CHARGED_HADRON, fmt.CLASS_ELECTRON))
    assert np.abs(ygen[tower][untracked_charged, fmt.Y_ETA]).min() > gen.TRACKER_ETA_MAX - gen.TOWER_DETA
    neutral_hadron = classes == fmt.CLASS_NEUTRAL_HADRON
    assert ygen[tower][neutral_hadron, fmt.Y_E].min() >= gen.NEUTRAL_HADRON_MIN_E
    assert np.all((classes != 0) | ~ygen[tower].any(axis=1))  # class 0 rows are all zero
    assert set(np.unique(ycand[tower, fmt.Y_CLASS])) <= {0, fmt.CLASS_NEUTRAL_HADRON, fmt.CLASS_PHOTON}
    photon = classes == fmt.CLASS_PHOTON
    assert np.median(x[tower][photon, fmt.X_E_EM] / x[tower][photon, fmt.X_E]) > 0.9


def test_kinematics_are_consistent(toy):
    _, s = toy
    x = s["X"]
    assert np.all(x[:, fmt.X_E] >= x[:, fmt.X_PT] * (1 - 1e-5))
    assert np.allclose(x[:, fmt.X_SIN_PHI] ** 2 + x[:, fmt.X_COS_PHI] ** 2, 1, atol=1e-5)
    for key in fmt.TARGET_KEYS:
        y = s[key][s[key][:, fmt.Y_CLASS] > 0]
        assert np.all(y[:, fmt.Y_E] >= y[:, fmt.Y_PT] * (1 - 1e-5))
        assert np.all(y[:, fmt.Y_PT] > 0)
        assert np.allclose(y[:, fmt.Y_SIN_PHI] ** 2 + y[:, fmt.Y_COS_PHI] ** 2, 1, atol=1e-4)


def test_class_balance_and_falling_spectrum(toy):
    dataset, s = toy
    counts = dataset.class_counts("ygen")
    assert counts.min() > 0
    _, charged, neutral, photon, electron, muon = counts
    assert charged > photon > neutral > max(electron, muon)
    ygen = s["ygen"]
    pt = ygen[ygen[:, fmt.Y_CLASS] > 0, fmt.Y_PT]
    per_bin = np.histogram(pt, bins=[0.5, 1, 2, 4, 8, 16])[0]
    assert np.all(np.diff(per_bin) < 0)


def test_element_range_is_respected_even_when_fixed():
    events = generate_events(np.random.default_rng(1), 5, 37, 37)
    assert [len(event) for event in events] == [37] * 5


@pytest.mark.parametrize("settings, option", [
    ({"files": 0}, "--files"),
    ({"seed": -1}, "--seed"),
    ({"min_elements": 50, "max_elements": 10}, "--max-elements"),
])
def test_generator_refuses_bad_settings(tmp_path, settings, option):
    with pytest.raises(HepoptError, match=option):
        generate_dataset(tmp_path, **{"files": 1, **settings})


# --- reader refusals -----------------------------------------------------------------------------


def _make_bad(kind: str, path: Path) -> Path:
    content = _valid_content()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_bz2":
        path.write_bytes(pickle.dumps(content))
    elif kind == "truncated_bz2":
        data = bz2.compress(pickle.dumps(content))
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not_a_pickle":
        path.write_bytes(bz2.compress(b"this is not a pickle"))
    elif kind == "not_a_dict":
        _write(path, content["X"])
    elif kind == "missing_key":
        del content["ycand"]
        _write(path, content)
    elif kind == "list_lengths":
        content["ygen"] = content["ygen"][:-1]
        _write(path, content)
    elif kind == "columns":
        content["X"][1] = content["X"][1][:, :11]
        _write(path, content)
    elif kind == "nan":
        content["ygen"][2][1, fmt.Y_PT] = np.nan
        _write(path, content)
    elif kind == "row_counts":
        content["ycand"][1] = content["ycand"][1][:-1]
        _write(path, content)
    elif kind == "element_type":
        content["X"][0][2, fmt.X_TYPE] = 3
        _write(path, content)
    elif kind == "class":
        content["ycand"][2][0, fmt.Y_CLASS] = 6
        _write(path, content)
    return path


@pytest.mark.parametrize("kind, event, expected", [
    ("empty", None, "empty file"),
    ("not_bz2", None, "not a bz2 file"),
    ("truncated_bz2", None, "truncated bz2"),
    ("not_a_pickle", None, "not a valid data pickle"),
    ("not_a_dict", None, "expected a dict with keys"),
    ("missing_key", None, "missing key(s) 'ycand'"),
    ("list_lengths", None, "lists of different lengths"),
    ("columns", 1, "11 columns; expected a 2-D numeric array with 12 columns"),
    ("nan", 2, "non-finite value nan at row 1, column 2"),
    ("row_counts", 1, "row counts differ"),
    ("element_type", 0, "element type (column 0) 3 at row 2; expected one of [1, 2]"),
    ("class", 2, "class (column 0) 6 at row 0; expected one of [0, 1, 2, 3, 4, 5]"),
])
def test_reader_refuses_malformed_files(tmp_path, kind, event, expected):
    path = _make_bad(kind, tmp_path / f"bad_{kind}.pkl.bz2")
    with pytest.raises(DataError) as caught:
        read_file(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert expected in message
    assert caught.value.event == event
    if event is not None:
        assert f"event {event}" in message


def test_reader_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = _write(tmp_path / "evil.pkl.bz2", {"X": [Payload()], "ygen": [], "ycand": []})
    with pytest.raises(DataError, match="forbidden global"):
        read_file(path)
    assert not marker.exists()


def test_reader_accepts_float64_and_numpy1_module_names(tmp_path):
    content = _valid_content()
    content = {key: [array.astype(np.float64) for array in arrays] for key, arrays in content.items()}
    payload = pickle.dumps(content, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path = tmp_path / "old.pkl.bz2"
    path.write_bytes(bz2.compress(payload))
    events = read_file(path)
    assert events[0].X.dtype == np.float32 and len(events) == 3


# --- file lists ----------------------------------------------------------------------------------


def test_input_ds_json_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    files = generate_dataset(tmp_path / "data", files=2, seed=1, **SMALL)
    (tmp_path / "input_ds.json").write_text(json.dumps([f"data/{p.name}" for p in reversed(files)]))
    monkeypatch.chdir(tmp_path)
    dataset = load_dataset("input_ds.json")
    assert [p.name for p in dataset.files] == [files[1].name, files[0].name]
    assert len(dataset) == 10


@pytest.mark.parametrize("text, expected", [
    ("[\"a.pkl.bz2\",", "invalid JSON at line 1"),
    ("{\"files\": []}", "expected a non-empty JSON list"),
    ("[]", "expected a non-empty JSON list"),
    ("[\"ok.pkl.bz2\", 3]", "[1]: expected a path string, got int"),
    ("[\"absent.pkl.bz2\"]", "absent.pkl.bz2: no such data file"),
])
def test_input_ds_json_errors(tmp_path, monkeypatch, text, expected):
    (tmp_path / "input_ds.json").write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HepoptError) as caught:
        load_dataset("input_ds.json")
    assert expected in str(caught.value)


def test_missing_input_ds_json_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_input_ds(tmp_path / "input_ds.json")
    with pytest.raises(DataError, match="holds no"):
        load_dataset(tmp_path)


def test_directory_is_read_in_natural_order(tmp_path):
    generate_dataset(tmp_path, files=12, events_per_file=1, seed=0, min_elements=5, max_elements=5)
    names = [p.name for p in load_dataset(tmp_path).files]
    assert names[-3:] == ["tev14_pythia8_ttbar_0_9.pkl.bz2", "tev14_pythia8_ttbar_0_10.pkl.bz2",
                          "tev14_pythia8_ttbar_0_11.pkl.bz2"]


# --- command line --------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "evaluation_container.data", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_generate_writes_zenodo_files_and_check_reads_them(tmp_path):
    out = tmp_path / "gen"
    done = _cli("generate", "--out", str(out), "--files", "2", "--events-per-file", "3", "--seed", "4",
                "--min-elements", "20", "--max-elements", "40")
    assert done.returncode == 0, done.stderr
    names = ["tev14_pythia8_ttbar_0_0.pkl.bz2", "tev14_pythia8_ttbar_0_1.pkl.bz2"]
    assert sorted(p.name for p in out.iterdir()) == names
    assert all(name in done.stdout for name in names)
    checked = _cli("check", str(out))
    assert checked.returncode == 0, checked.stderr
    assert "2 file(s), 6 events" in checked.stdout


def test_cli_reports_bad_input_without_traceback(tmp_path):
    done = _cli("generate", "--out", str(tmp_path), "--min-elements", "50", "--max-elements", "10")
    assert done.returncode == 2 and "--max-elements" in done.stderr and "Traceback" not in done.stderr
    bad = _make_bad("nan", tmp_path / "bad.pkl.bz2")
    checked = _cli("check", str(bad))
    assert checked.returncode == 2 and "event 2" in checked.stderr and "Traceback" not in checked.stderr


# --- default dataset -----------------------------------------------------------------------------


def test_default_dataset_is_created_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.DATA_DIR_ENV, str(tmp_path))
    first = default_dataset(**SMALL)
    assert first.parent == tmp_path / cache.CACHE_SUBDIR
    manifest = json.loads((first / cache.MANIFEST).read_text())
    assert len(load_dataset(first)) == len(manifest["files"]) * SMALL["events_per_file"]

    def refuse(*args, **kwargs):
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(cache, "generate_dataset", refuse)
    assert default_dataset(**SMALL) == first


def test_concurrent_first_uses_agree(tmp_path):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_dataset(tmp_path, seed=2, **SMALL)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert [p.name for p in results[0].parent.iterdir()] == [results[0].name]  # no staging leftovers
    assert len(load_dataset(results[0])) == cache.DEFAULT_SETTINGS["files"] * SMALL["events_per_file"]


def test_iter_events_streams_the_same_events(tmp_path):
    generate_dataset(tmp_path, files=2, seed=3, **SMALL)
    streamed = list(iter_events(tmp_path))
    loaded = load_dataset(tmp_path)
    assert len(streamed) == len(loaded) == 10
    assert all(np.array_equal(a.X, b.X) for a, b in zip(streamed, loaded, strict=True))
