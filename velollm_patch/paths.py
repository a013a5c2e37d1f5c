"""The one place that decides where velollm-patch keeps things.

Everything lives under two roots chosen by platformdirs: a data directory (installed builds, bench
history) and a cache directory (downloaded sources, models, build work trees). ``VELOLLM_HOME``
puts both under one directory, which is what tests and CI use to stay isolated.
"""

from __future__ import annotations

import os
import platform
import site
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "velollm-patch"


@dataclass(frozen=True)
class Paths:
    data: Path
    cache: Path

    @property
    def builds(self) -> Path:
        """Installed builds, one directory each, plus the ``current`` link."""
        return self.data / "builds"

    @property
    def current_build(self) -> Path:
        return self.builds / "current"

    @property
    def logs(self) -> Path:
        return self.data / "logs"

    @property
    def bench(self) -> Path:
        """Bench result files and the SQLite history."""
        return self.data / "bench"

    @property
    def sources(self) -> Path:
        """Read-only extracted upstream trees, keyed by source id."""
        return self.cache / "sources"

    @property
    def downloads(self) -> Path:
        return self.cache / "downloads"

    @property
    def models(self) -> Path:
        return self.cache / "models"

    @property
    def work(self) -> Path:
        """Fresh, patched copies of a source tree and their build directories."""
        return self.cache / "work"

    @property
    def calibrations(self) -> Path:
        """Speed calibrations (``tune --measure``), one file per build x model."""
        return self.cache / "calibrations"

    @property
    def locks(self) -> Path:
        return self.cache / "locks"

    @property
    def ci_reports(self) -> Path:
        """Reports of the CI lanes in ``ci/`` (time, build id, binaries), JSON and Markdown."""
        return self.data / "ci"

    @property
    def toolchain_probes(self) -> Path:
        """What slow toolchain queries answered (nvcc's target list), one file per tool path and version."""
        return self.cache / "toolchain"


def get_paths() -> Paths:
    home = os.environ.get("VELOLLM_HOME")
    if home:
        root = Path(home).expanduser().resolve()
        return Paths(data=root / "data", cache=root / "cache")
    return Paths(
        data=Path(platformdirs.user_data_dir(APP_NAME)),
        cache=Path(platformdirs.user_cache_dir(APP_NAME)),
    )


def python_site_dirs() -> list[Path]:
    """This Python's site-packages directories, where pip puts NVIDIA's library wheels (``nvidia/...``)."""
    found = [*site.getsitepackages(), site.getusersitepackages(), *sysconfig.get_paths().values()]
    dirs: list[Path] = []
    for entry in found:
        path = Path(entry)
        if path.name in ("site-packages", "dist-packages") and path not in dirs:
            dirs.append(path)
    return dirs


def system_library_dirs() -> list[Path]:
    """Where a Linux NVIDIA driver puts libcuda: the multiarch directory, the lib64/lib ones and WSL's."""
    return [Path(f"/usr/lib/{platform.machine()}-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib"),
            Path("/usr/lib/wsl/lib")]


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def resource_dir(name: str) -> Path:
    """``patches`` or ``templates``: inside the package when installed from a wheel, else the checkout's."""
    packaged = Path(__file__).parent / "_data" / name
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / name
