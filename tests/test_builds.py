"""Installed builds: manifest reading, atomic `current`, removal, leftovers and the build lock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from velollm_patch import builds
from velollm_patch.errors import VelollmError
from velollm_patch.paths import Paths


@pytest.fixture
def tmp_paths(tmp_path: Path) -> Paths:
    return Paths(data=tmp_path / "data", cache=tmp_path / "cache")


def _install(paths: Paths, build_id: str, patches: list[str], created: str, backend: str = "cpu",
             commit: str = "0c1e570") -> builds.InstalledBuild:
    staging = builds.staging_dir(paths, build_id)
    (staging / "bin").mkdir(parents=True)
    (staging / "bin" / "llama-server").write_text("#!/bin/sh\n")
    manifest = {"build_id": build_id, "created": created, "patches": [{"name": n} for n in patches],
                "patch_level": "velollm-1:" + ",".join(patches) if patches else "", "backend": backend,
                "source": {"commit": commit}}
    (staging / builds.MANIFEST).write_text(json.dumps(manifest))
    return builds.install_staged(paths, staging, build_id)


def test_install_list_and_switch_current(tmp_paths: Paths) -> None:
    assert builds.current_build(tmp_paths) is None
    first = _install(tmp_paths, "aaa-cpu-patched-1", ["build-stamp"], "2026-11-01T00:00:00")
    second = _install(tmp_paths, "bbb-cpu-vanilla-2", [], "2026-11-02T00:00:00")
    assert [b.build_id for b in builds.list_builds(tmp_paths)] == [first.build_id, second.build_id]
    assert not builds.staging_dir(tmp_paths, first.build_id).exists()
    builds.set_current(tmp_paths, first)
    current = builds.current_build(tmp_paths)
    assert current is not None and current.build_id == first.build_id
    builds.set_current(tmp_paths, second)
    current = builds.current_build(tmp_paths)
    assert current is not None and current.build_id == second.build_id
    assert tmp_paths.current_build.is_symlink()
    assert not list(tmp_paths.builds.glob(".current-*"))


def test_find_build_by_prefix_and_flavour(tmp_paths: Paths) -> None:
    _install(tmp_paths, "aaa-cpu-patched-1", ["build-stamp"], "2026-11-01")
    _install(tmp_paths, "aab-cpu-vanilla-2", [], "2026-11-02")
    assert builds.find_build(tmp_paths, "aaa").build_id == "aaa-cpu-patched-1"
    assert builds.find_build(tmp_paths, "vanilla").build_id == "aab-cpu-vanilla-2"
    assert builds.find_build(tmp_paths, "patched").build_id == "aaa-cpu-patched-1"
    with pytest.raises(VelollmError, match="matches several builds"):
        builds.find_build(tmp_paths, "aa")
    with pytest.raises(VelollmError, match="no build 'zzz'"):
        builds.find_build(tmp_paths, "zzz")
    with pytest.raises(VelollmError, match="no build is current yet"):
        builds.find_build(tmp_paths, "current")


def test_vanilla_and_patched_prefer_the_current_builds_backend_and_pin(tmp_paths: Paths) -> None:
    cpu_vanilla = _install(tmp_paths, "a-cpu-vanilla", [], "2026-11-01")
    current = _install(tmp_paths, "a-cpu-patched", ["build-stamp"], "2026-11-02")
    _install(tmp_paths, "b-cpu-vanilla", [], "2026-11-03", commit="4df29be")
    _install(tmp_paths, "a-vulkan-vanilla", [], "2026-11-04", backend="vulkan")
    assert builds.find_build(tmp_paths, "vanilla").build_id == "a-vulkan-vanilla"  # no current: the newest
    builds.set_current(tmp_paths, current)
    assert builds.find_build(tmp_paths, "vanilla") == cpu_vanilla
    builds.remove_build(tmp_paths, cpu_vanilla)
    assert builds.find_build(tmp_paths, "vanilla").build_id == "b-cpu-vanilla"  # the same backend, another pin
    builds.set_current(tmp_paths, _install(tmp_paths, "c-rocm-patched", ["build-stamp"], "2026-11-05", "rocm"))
    assert builds.find_build(tmp_paths, "vanilla").build_id == "a-vulkan-vanilla"  # none alike: the newest


def test_remove_refuses_current_without_force(tmp_paths: Paths) -> None:
    build = _install(tmp_paths, "aaa-cpu-patched-1", ["build-stamp"], "2026-11-01")
    builds.set_current(tmp_paths, build)
    with pytest.raises(VelollmError, match="is current"):
        builds.remove_build(tmp_paths, build)
    assert build.directory.is_dir()
    builds.remove_build(tmp_paths, build, force=True)
    assert not build.directory.exists()
    assert builds.current_build(tmp_paths) is None


def test_leftovers_of_interrupted_runs_are_removed(tmp_paths: Paths) -> None:
    kept = _install(tmp_paths, "aaa-cpu-patched-1", ["build-stamp"], "2026-11-01")
    (builds.staging_dir(tmp_paths, "half") / "bin").mkdir(parents=True)
    (tmp_paths.work / "half" / "src").mkdir(parents=True)
    removed = builds.remove_leftovers(tmp_paths)
    assert len(removed) == 2
    assert [b.build_id for b in builds.list_builds(tmp_paths)] == [kept.build_id]
    assert not any(p.name.startswith(".staging-") for p in tmp_paths.builds.iterdir())


def test_unreadable_manifest_is_a_clear_error(tmp_paths: Paths) -> None:
    broken = tmp_paths.builds / "broken"
    broken.mkdir(parents=True)
    (broken / builds.MANIFEST).write_text("{not json")
    with pytest.raises(VelollmError, match="no readable manifest.json"):
        builds.list_builds(tmp_paths)


def test_second_build_lock_fails_with_a_clear_message(tmp_paths: Paths) -> None:
    # The lock is held by another real process, as during a concurrent `velollm-patch build`.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from velollm_patch.builds import BuildLock\n"
         "from velollm_patch.paths import Paths\n"
         f"paths = Paths(data=__import__('pathlib').Path({str(tmp_paths.data)!r}), "
         f"cache=__import__('pathlib').Path({str(tmp_paths.cache)!r}))\n"
         "with BuildLock(paths):\n"
         "    print('locked', flush=True)\n"
         "    sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(VelollmError, match=r"another velollm-patch build is running \(pid \d+") as err,
            builds.BuildLock(tmp_paths, wait=0.5),
        ):
            pass
        assert err.value.exit_code == 3
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    with builds.BuildLock(tmp_paths, wait=5):
        pass  # released when the other process finished
