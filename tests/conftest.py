"""Shared fixtures: an isolated velollm home, the real demo models, and real builds of llama.cpp.

The builds are session-scoped: the patched build (full series) is made once per test run and
reused by every test that needs a server. ``VELOLLM_TEST_HOME`` points the session at a persistent
home so developers can reuse builds between runs; CI leaves it unset and builds from scratch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from velollm_patch import hardware, models
from velollm_patch.build import BuildOptions, plan_build, run_build
from velollm_patch.builds import InstalledBuild
from velollm_patch.paths import Paths, get_paths


@pytest.fixture(scope="session")
def velollm_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = Path(os.environ.get("VELOLLM_TEST_HOME") or tmp_path_factory.mktemp("velollm-home"))
    previous = os.environ.get("VELOLLM_HOME")
    os.environ["VELOLLM_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("VELOLLM_HOME", None)
    else:
        os.environ["VELOLLM_HOME"] = previous


@pytest.fixture(scope="session")
def paths(velollm_home: Path) -> Paths:
    return get_paths()


@pytest.fixture(scope="session")
def live_hardware(paths: Paths) -> hardware.HardwareInfo:
    return hardware.detect(build_dir=paths.cache)


@pytest.fixture(scope="session")
def smollm2_gguf(paths: Paths) -> Path:
    return models.fetch_model(paths, "smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_gguf(paths: Paths) -> Path:
    return models.fetch_model(paths, "gemma3-270m")


@pytest.fixture(scope="session")
def patched_build(paths: Paths, live_hardware: hardware.HardwareInfo, smollm2_gguf: Path) -> InstalledBuild:
    """The CPU build with the whole patch series, installed and current."""
    plan = plan_build(BuildOptions(gpu="cpu", smoke_model=smollm2_gguf, wait=3600), live_hardware, paths)
    return run_build(plan, live_hardware, paths)


@pytest.fixture(scope="session")
def vanilla_build(
    paths: Paths, live_hardware: hardware.HardwareInfo, smollm2_gguf: Path, patched_build: InstalledBuild
) -> InstalledBuild:
    """Upstream at the same pin, no patches; built after the patched one so ccache shares objects."""
    options = BuildOptions(gpu="cpu", patches="none", smoke_model=smollm2_gguf, make_current=False, wait=3600)
    return run_build(plan_build(options, live_hardware, paths), live_hardware, paths)


@pytest.fixture(scope="session")
def patched_server(patched_build: InstalledBuild) -> Path:
    return patched_build.bin("llama-server")


@pytest.fixture(scope="session")
def vanilla_server(vanilla_build: InstalledBuild) -> Path:
    return vanilla_build.bin("llama-server")
