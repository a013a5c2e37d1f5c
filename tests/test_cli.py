"""Bad input on any command, in any group, is one line on stderr and a non-zero exit code; text from the user
or a file is printed as it is, never read as console markup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_gguf


def _cli(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "velollm_patch", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "VELOLLM_HOME": str(home)},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build", "--gpu", "tpu", "--dry-run"], "unknown --gpu 'tpu'"),
        (["ollama", "lint", "/nonexistent/Modelfile"], "cannot read /nonexistent/Modelfile"),
        (["ollama", "lint", "/dev/zero"], "/dev/zero is larger than 16,777,216 bytes"),
        (["inspect", "/nonexistent.gguf"], "nonexistent"),
        (["builds", "use", "no-such-build"], "no build 'no-such-build'"),
        (["source", "fetch", "svn:x"], "source kind 'svn' is unknown"),
        (["models", "fetch", "gpt-17"], "unknown model 'gpt-17'"),
        # What looks like rich markup or an emoji code is the user's text, shown as given.
        (["inspect", "/tmp/nope[/x].gguf"], "model file /tmp/nope[/x].gguf not found"),
        (["builds", "use", "[/x]"], "no build '[/x]'"),
        (["builds", "use", "abc[bold]def"], "no build 'abc[bold]def'"),
        (["inspect", ":smile: [red]"], "':smile: [red]' is neither"),
        (["ollama", "lint", "/nonexistent/[/b]Modelfile"], "cannot read /nonexistent/[/b]Modelfile"),
    ],
)
def test_errors_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    result = _cli(args, tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]


def test_gguf_metadata_is_printed_as_it_is(tmp_path: Path) -> None:
    name = "[/red] [bold]:smile:"
    model = write_gguf(tmp_path / "model.gguf", name=name)
    shown = _cli(["inspect", str(model)], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"{name}  ({model})")
    not_a_model = write_gguf(tmp_path / "adapter.gguf", extra={"general.type": "[/red]"})
    refused = _cli(["inspect", str(not_a_model)], tmp_path)
    assert refused.returncode == 1
    assert refused.stderr == f"error: {not_a_model} is a GGUF [/red], not a model\n"


def test_a_long_message_stays_one_line(tmp_path: Path) -> None:
    # A path is the user's and is named whole; a newline in it is escaped, not printed.
    odd = tmp_path / ("x" * 200 + "\nsecond line")
    result = _cli(["inspect", str(odd)], tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "x" * 200 + "\\nsecond line" in result.stderr
