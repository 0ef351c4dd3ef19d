"""Where the result goes: a path that cannot take it fails before the run, and one that fails after it
loses nothing (the result is kept in the temporary directory and the message says where)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from infer_bench.errors import UsageError
from infer_bench.result import MIN_FREE_BYTES, check_writable, write_result
from test_cli import run_cli

UNREACHABLE = "TARGET=http://127.0.0.1:1"  # nothing listens there: a run that started would fail otherwise


def _scenario(tmp_path: Path) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(
        "target: ${TARGET}\nscenarios:\n  one: {executor: per-vu-iterations, iterations: 1, protocol: sse}\n"
    )
    return path


@pytest.mark.parametrize(
    ("out", "message"),
    [
        pytest.param("{tmp}/missing/r.json", "the directory {tmp}/missing does not exist", id="missing-directory"),
        pytest.param("/sys/r.json", "cannot write in /sys (Permission denied)", id="unwritable-directory"),
    ],
)
def test_an_output_path_that_cannot_take_the_result_fails_before_the_run(
    out: str, message: str, tmp_path: Path
) -> None:
    if out.startswith("/sys") and not os.path.isdir("/sys"):
        pytest.skip("no /sys on this system to stand for an unwritable directory")
    proc = run_cli("run", str(_scenario(tmp_path)), "-q", "-e", UNREACHABLE, "--out", out.format(tmp=tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message.format(tmp=tmp_path) in " ".join(proc.stderr.split())  # rich may wrap a long line
    assert "127.0.0.1:1" not in proc.stderr  # the target was never tried
    assert "Traceback" not in proc.stderr


def test_a_nearly_full_filesystem_is_reported_before_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The disk is an edge we do not own: report it nearly full rather than fill a real one.
    full = shutil.disk_usage(tmp_path)._replace(free=MIN_FREE_BYTES // 4)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: full)
    with pytest.raises(UsageError, match=r"only 4096 KB free where it goes; a result needs up to 16 MB"):
        check_writable(tmp_path / "r.json")


def test_a_result_that_cannot_be_written_after_the_run_is_kept_in_the_temporary_directory(tmp_path: Path) -> None:
    blocked = tmp_path / "r.json"
    blocked.mkdir()  # passes for a path at the start, but a directory cannot be replaced by the file
    result = {"schema": "infer-bench.result", "headline": {"requests": 3}}
    with pytest.raises(UsageError, match=r"cannot write the result to .*r\.json \(.*\); it was kept in (\S+)") as err:
        write_result(blocked, result)
    kept = Path(str(err.value).rsplit(" ", 1)[1])
    try:
        assert kept.parent == Path(tempfile.gettempdir())
        assert json.loads(kept.read_text()) == result
        assert not list(tmp_path.glob(".*.tmp"))  # no half-written temporary left beside it
    finally:
        kept.unlink()
