"""velollm_patch.proc: the one place that runs commands."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from velollm_patch import proc
from velollm_patch.errors import VelollmError


def test_a_streamed_command_is_stopped_at_its_timeout_with_what_it_started(tmp_path: Path) -> None:
    # cmake --build runs ninja, which runs the compilers: a timeout must end all of them, also while the
    # command prints nothing (the output loop alone would wait for the command to close its output).
    pid_file = tmp_path / "grandchild.pid"
    script = f"sleep 30 & echo $! > {pid_file}; echo started; wait"
    lines: list[str] = []
    started = time.monotonic()
    with pytest.raises(VelollmError, match="did not finish within 1s"):
        proc.run(["sh", "-c", script], timeout=1, on_line=lines.append, log_file=tmp_path / "log", what="sleeper")
    assert time.monotonic() - started < 10
    assert lines == ["started"]
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the command's child outlived the timeout"
        time.sleep(0.05)


def test_a_streamed_command_within_its_timeout_returns_its_output(tmp_path: Path) -> None:
    result = proc.run(["sh", "-c", "echo one; echo two >&2"], timeout=30, log_file=tmp_path / "log")
    assert (result.returncode, result.output.split()) == (0, ["one", "two"])
    assert "one" in (tmp_path / "log").read_text()
