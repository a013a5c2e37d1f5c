"""Bad input on any command, in any group, is one line on stderr and a non-zero exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build", "--gpu", "tpu", "--dry-run"], "unknown --gpu 'tpu'"),
        (["ollama", "lint", "/nonexistent/Modelfile"], "cannot read /nonexistent/Modelfile"),
        (["inspect", "/nonexistent.gguf"], "nonexistent"),
        (["builds", "use", "no-such-build"], "no build 'no-such-build'"),
        (["source", "fetch", "svn:x"], "source kind 'svn' is unknown"),
        (["models", "fetch", "gpt-17"], "unknown model 'gpt-17'"),
    ],
)
def test_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "velollm_patch", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "VELOLLM_HOME": str(tmp_path)},
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
