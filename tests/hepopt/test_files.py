import json
import subprocess
import sys
from pathlib import Path

import pytest

from hepopt.files import FILE_MODE, atomic_writer, write_atomically, write_json_atomically


def test_writes_replace_the_file_readable_by_others(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    write_json_atomically(target, {"a": 1})
    write_atomically(target, b'{"a": 2}')
    assert json.loads(target.read_text()) == {"a": 2}
    assert target.stat().st_mode & 0o777 == FILE_MODE
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_an_error_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_writer(target, binary=False) as stream:
        stream.write("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_process_killed_mid_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    script = ("import os, signal, sys\nfrom hepopt.files import atomic_writer\n"
              "with atomic_writer(sys.argv[1]) as s:\n    s.write(b'half')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", script, str(target)], check=False)
    assert target.read_text() == "old"
