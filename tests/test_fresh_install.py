"""The README's first command on a fresh machine: a new virtual environment, the package installed exactly as the
README's first line installs it (no other extras, so no matplotlib), and every command starting from there.

The commands that need a build and a model use the session's (``patched_build``, ``smollm2_gguf``), so this adds
the install's seconds, not a rebuild.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.helpers import run_result
from velollm_patch.bench.runner import save_result
from velollm_patch.builds import InstalledBuild

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def readme_install_args() -> list[str]:
    """What the README's first command gives ``pip install``: ``pip install '.[demo]' && velollm-patch up``."""
    first = re.search(r"^pip install (.+?) && velollm-patch up", (REPO / "README.md").read_text(), re.M)
    assert first is not None, "the README no longer starts with `pip install ... && velollm-patch up`"
    return shlex.split(first.group(1))


@pytest.fixture(scope="module")
def fresh_cli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``velollm-patch`` in a new virtual environment, installed from a copy of this checkout's files (a clean
    clone's: tracked and not ignored), in the README's words."""
    root = tmp_path_factory.mktemp("fresh")
    checkout = root / "checkout"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a file deleted in the working tree but still in the index is not there
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            (checkout / name).write_bytes(source.read_bytes())
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    subprocess.run([env_dir / "bin" / "pip", "install", "-q", *readme_install_args()], cwd=checkout, check=True,
                   timeout=900)
    return env_dir / "bin" / "velollm-patch"


def run(cli: Path, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([cli, *args], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "VELOLLM_HOME": str(home)})
    assert result.returncode == 0, f"velollm-patch {shlex.join(args)}: {result.stderr}"
    assert "Traceback" not in result.stderr
    return result


def test_the_install_is_the_base_one(fresh_cli: Path, tmp_path: Path) -> None:
    python = fresh_cli.parent / "python"
    # Run from elsewhere: `python -c` puts the working directory, this checkout, first on the path.
    missing = subprocess.run([python, "-c", "import matplotlib"], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode != 0, "matplotlib came with the README's install: the no-charts path goes untested"
    own = subprocess.run([python, "-c", "import velollm_patch; print(velollm_patch.__file__)"],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "site-packages" in own.stdout and sys.prefix not in own.stdout


def test_every_command_starts(fresh_cli: Path, velollm_home: Path, patched_build: InstalledBuild,
                              smollm2_gguf: Path, tmp_path: Path) -> None:
    assert "Usage: velollm-patch" in run(fresh_cli, "--help", home=velollm_home).stdout
    detected = json.loads(run(fresh_cli, "detect", "--json", home=velollm_home).stdout)
    assert detected["cpu"]["logical_cores"] >= 1
    assert "GGML_" in run(fresh_cli, "build", "--dry-run", home=velollm_home).stdout
    assert "plan for" in run(fresh_cli, "tune", str(smollm2_gguf), home=velollm_home).stdout
    modelfile = run(fresh_cli, "ollama", "modelfile", str(smollm2_gguf), "--tuned", home=velollm_home).stdout
    assert modelfile.startswith("#") and "PARAMETER num_ctx" in modelfile
    assert "ab" in run(fresh_cli, "bench", "--help", home=velollm_home).stdout
    # Charts are the bench extra's: without matplotlib the report is written and says how to get them.
    result = save_result(run_result("patched", 100.0), tmp_path / "result.json")
    report = run(fresh_cli, "bench", "report", str(result), home=velollm_home)
    assert report.stdout.splitlines() == [str(tmp_path / "report.md")]
    assert "no charts: they need matplotlib" in report.stderr
