"""Installed builds: one directory per build under ``<data>/builds/<id>`` with ``manifest.json``,
and a ``current`` symlink that is switched atomically.

A build directory only ever appears complete: the build is staged next to it and renamed into
place after its smoke test, so an interrupted build leaves nothing that looks installed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from velollm_patch.errors import VelollmError
from velollm_patch.paths import Paths, ensure_dir

MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"


@dataclass(frozen=True)
class InstalledBuild:
    directory: Path
    manifest: dict[str, Any]

    @property
    def build_id(self) -> str:
        return str(self.manifest["build_id"])

    @property
    def patch_names(self) -> list[str]:
        return [p["name"] for p in self.manifest.get("patches", [])]

    @property
    def is_vanilla(self) -> bool:
        return not self.patch_names

    def bin(self, name: str) -> Path:
        path = self.directory / "bin" / name
        if not path.is_file():
            raise VelollmError(f"build {self.build_id} has no {name}; rebuild with velollm-patch build")
        return path

    def has_patch(self, name: str) -> bool:
        return name in self.patch_names

    @property
    def backend(self) -> str:
        return str(self.manifest.get("backend", "cpu"))

    @property
    def upstream_commit(self) -> str:
        return str(self.manifest.get("source", {}).get("commit", ""))


def read_build(directory: Path) -> InstalledBuild:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise VelollmError(f"{directory} has no readable {MANIFEST} ({exc}); remove it with `builds rm`") from exc
    return InstalledBuild(directory, manifest)


def list_builds(paths: Paths) -> list[InstalledBuild]:
    if not paths.builds.is_dir():
        return []
    found = []
    for entry in sorted(paths.builds.iterdir()):
        if entry.is_symlink() or entry.name.startswith(".") or not (entry / MANIFEST).is_file():
            continue
        found.append(read_build(entry))
    return sorted(found, key=lambda b: str(b.manifest.get("created", "")))


def find_build(paths: Paths, build_id: str) -> InstalledBuild:
    """A build by id or unique id prefix, or ``current``, ``vanilla``/``patched``: the newest of each, among
    those of the current build's backend and upstream commit first (``bench ab vanilla current`` compares like
    with like when a Vulkan or an older pin's build is newer), then of its backend, then any."""
    builds = list_builds(paths)
    if build_id == "current":
        current = current_build(paths)
        if current is None:
            raise VelollmError("no build is current yet: run `velollm-patch build` first")
        return current
    if build_id in ("vanilla", "patched"):
        wanted = [b for b in builds if b.is_vanilla == (build_id == "vanilla")]
        if not wanted:
            hint = "--patches none" if build_id == "vanilla" else ""
            raise VelollmError(f"no {build_id} build is installed: run `velollm-patch build {hint}`".rstrip())
        current = current_build(paths)
        if current is not None:
            for alike in (lambda b: (b.backend, b.upstream_commit) == (current.backend, current.upstream_commit),
                          lambda b: b.backend == current.backend):
                if preferred := [b for b in wanted if alike(b)]:
                    return preferred[-1]
        return wanted[-1]
    matches = [b for b in builds if b.build_id.startswith(build_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise VelollmError(f"no build '{build_id}': see `velollm-patch builds list`")
    raise VelollmError(f"'{build_id}' matches several builds; give more of the id")


def current_build(paths: Paths) -> InstalledBuild | None:
    link = paths.current_build
    if not link.is_symlink() or not (link / MANIFEST).is_file():
        return None
    return read_build(link.resolve())


def set_current(paths: Paths, build: InstalledBuild) -> None:
    """Point ``current`` at ``build`` atomically: a new link is made beside it and renamed over it."""
    ensure_dir(paths.builds)
    tmp = paths.builds / f".current-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(build.directory.name)
    os.replace(tmp, paths.current_build)


def install_staged(paths: Paths, staging: Path, build_id: str) -> InstalledBuild:
    """Move a complete, smoke-tested staging directory into place under its id."""
    final = paths.builds / build_id
    if final.exists():
        raise VelollmError(f"build {build_id} is already installed")
    os.replace(staging, final)
    return read_build(final)


def staging_dir(paths: Paths, build_id: str) -> Path:
    return paths.builds / f"{STAGING_PREFIX}{build_id}"


def remove_build(paths: Paths, build: InstalledBuild, *, force: bool = False) -> None:
    current = current_build(paths)
    if current is not None and current.build_id == build.build_id and not force:
        raise VelollmError(
            f"build {build.build_id} is current; `builds use` another one first, or pass --force"
        )
    # Rename first so a half-deleted directory never looks like an installed build.
    doomed = paths.builds / f".removing-{build.build_id}-{int(time.time())}"
    os.replace(build.directory, doomed)
    if current is not None and current.build_id == build.build_id:
        paths.current_build.unlink(missing_ok=True)
    shutil.rmtree(doomed)


def remove_leftovers(paths: Paths) -> list[Path]:
    """Delete staging and half-removed directories left by interrupted runs.

    Only call this while holding the build lock: then no other process is using them.
    """
    removed: list[Path] = []
    if paths.builds.is_dir():
        for entry in paths.builds.iterdir():
            if entry.name.startswith((STAGING_PREFIX, ".removing-", ".current-")):
                if entry.is_symlink() or entry.is_file():
                    entry.unlink()
                else:
                    shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    if paths.work.is_dir():
        for entry in paths.work.iterdir():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


class BuildLock:
    """Serializes builds: one per velollm home at a time.

    ``wait`` seconds to wait for another build (0: fail at once with a clear message).
    """

    def __init__(self, paths: Paths, wait: float = 0) -> None:
        ensure_dir(paths.locks)
        self._lock = FileLock(paths.locks / "build.lock")
        self._owner = paths.locks / "build.owner"
        self._wait = wait

    def __enter__(self) -> BuildLock:
        try:
            self._lock.acquire(timeout=self._wait)
        except Timeout:
            owner = self._owner.read_text().strip() if self._owner.is_file() else "another process"
            raise VelollmError(
                f"another velollm-patch build is running ({owner}); wait for it to finish or pass --wait SECONDS",
                exit_code=3,
            ) from None
        self._owner.write_text(f"pid {os.getpid()}, started {time.strftime('%H:%M:%S')}\n")
        return self

    def __exit__(self, *exc: object) -> None:
        self._owner.unlink(missing_ok=True)
        self._lock.release()
