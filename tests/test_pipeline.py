"""End to end, for real: the pinned sdist, the patch series, a CPU build, the installed llama-server
answering over HTTP, and every failure path of the spine (conflicting patch, corrupt sdist, a build
killed mid-way, two builds at once) leaving the cache and `current` intact."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from velollm_patch import builds, hardware, proc, serve, source
from velollm_patch.build import BuildOptions, plan_build, run_build
from velollm_patch.builds import InstalledBuild
from velollm_patch.files import sha256_file
from velollm_patch.paths import Paths

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "velollm_patch"]


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def _installed_ids(paths: Paths) -> list[str]:
    return [b.build_id for b in builds.list_builds(paths)]


def _current_id(paths: Paths) -> str | None:
    current = builds.current_build(paths)
    return current.build_id if current else None


def _cached_tree(paths: Paths) -> source.Source:
    return source.fetch(source.DEFAULT_SOURCE, paths)


def test_patched_build_is_installed_with_a_manifest(patched_build: InstalledBuild, paths: Paths) -> None:
    manifest = patched_build.manifest
    assert manifest["source"]["commit"].startswith("0c1e570")
    assert manifest["patch_level"].startswith("velollm-") and "build-stamp" in manifest["patch_level"]
    assert manifest["patches"][0]["name"] == "build-stamp"
    assert all(len(p["sha256"]) == 64 for p in manifest["patches"])
    assert manifest["backend"] == "cpu" and manifest["hardware"]["cpu"]["logical_cores"] >= 1
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in manifest["cmake_args"]
    for name, digest in manifest["binaries"].items():
        assert sha256_file(patched_build.bin(name)) == digest
    assert _current_id(paths) == patched_build.build_id


def test_server_reports_patch_level_and_answers(patched_build: InstalledBuild, smollm2_gguf: Path) -> None:
    version = subprocess.run([patched_build.bin("llama-server"), "--version"], capture_output=True, text=True)
    assert f"velollm patch level: {patched_build.manifest['patch_level']}" in version.stderr + version.stdout
    config = serve.ServerConfig(binary=patched_build.bin("llama-server"), model=smollm2_gguf, args=("-c", "1024"))
    with serve.start_server(config) as server:
        answer = serve.complete(server, "Paris is the capital of", n_predict=12)
        assert answer["content"].strip()
        assert answer["tokens_predicted"] == 12
        props = server.request("GET", "/props").json()
        assert props["velollm_patch_level"] == patched_build.manifest["patch_level"]
        chat = server.request(
            "POST", "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "temperature": 0},
        ).json()
        assert chat["choices"][0]["message"]["content"]


@pytest.mark.parametrize("flavour", ["patched", "vanilla"])
def test_builds_evaluate_small_batches(
    flavour: str, request: pytest.FixtureRequest, smollm2_gguf: Path, tmp_path: Path
) -> None:
    # batches of 2+ rows (prompts, draft verification, parallel decoding) take upstream's AMX kernels on AMX CPUs,
    # which fault without patch amx-tile-config: the patched build has the fix, the vanilla build no AMX
    build: InstalledBuild = request.getfixturevalue(f"{flavour}_build")
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    cmd: list[str | Path] = [build.bin("llama-perplexity"), "-m", smollm2_gguf, "-f", text, "-c", "128", "-b", "128",
                             "-ub", "4", "--chunks", "1", "-t", "2"]  # fmt: skip
    output = proc.run(cmd, timeout=300).output  # a crash raises, with its exit status
    assert "Final estimate: PPL" in output


def test_identical_inputs_reuse_the_installed_build(
    patched_build: InstalledBuild, paths: Paths, live_hardware: hardware.HardwareInfo
) -> None:
    before = (patched_build.directory / builds.MANIFEST).stat().st_mtime_ns
    plan = plan_build(BuildOptions(gpu="cpu"), live_hardware, paths)
    again = run_build(plan, live_hardware, paths)
    assert again.build_id == patched_build.build_id
    assert (again.directory / builds.MANIFEST).stat().st_mtime_ns == before


def test_dry_run_prints_a_cuda_plan_and_changes_nothing(patched_build: InstalledBuild, paths: Paths) -> None:
    before = sorted(p.name for p in paths.builds.iterdir())
    result = _cli("build", "--gpu", "cuda", "--arch", "9.0", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "-DGGML_CUDA=ON" in result.stdout and "-DCMAKE_CUDA_ARCHITECTURES=90-real" in result.stdout
    assert "0001-build-info-velollm-patch-level.patch" in result.stdout
    assert "install:" in result.stdout
    assert sorted(p.name for p in paths.builds.iterdir()) == before


def test_conflicting_patch_fails_cleanly(patched_build: InstalledBuild, paths: Paths, tmp_path: Path) -> None:
    series_src = Path(__file__).resolve().parent.parent / "patches"
    shutil.copytree(series_src, tmp_path / "patches")
    series_dir = next((tmp_path / "patches" / "llama.cpp").iterdir())
    (series_dir / "9999-conflict.patch").write_text(
        "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
        "Subject: [PATCH] conflict\n---\n"
        "diff --git a/common/build-info.h b/common/build-info.h\n"
        "--- a/common/build-info.h\n+++ b/common/build-info.h\n"
        "@@ -1,3 +1,3 @@\n-#pragma twice\n+#pragma thrice\n \n #include <cstdio>\n"
    )
    with (series_dir / "series.toml").open("a") as toml:
        toml.write('\n[[patch]]\nfile = "9999-conflict.patch"\nname = "conflict"\nsummary = "does not apply"\n')
    cached = _cached_tree(paths)
    header = cached.tree / "common" / "build-info.h"
    digest_before = sha256_file(header)
    ids_before, current_before = _installed_ids(paths), _current_id(paths)

    result = _cli("build", "--gpu", "cpu", env={"VELOLLM_PATCHES": str(tmp_path / "patches")})

    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, result.stderr
    assert "9999-conflict.patch (conflict) does not apply: common/build-info.h hunk #1" in error[0]
    assert "made for llama.cpp 0c1e570" in error[0]
    assert sha256_file(header) == digest_before
    assert (_installed_ids(paths), _current_id(paths)) == (ids_before, current_before)
    assert not paths.work.is_dir() or not any(paths.work.iterdir())
    assert not [p for p in paths.builds.iterdir() if p.name.startswith(".staging-")]


def test_corrupt_sdist_is_refused(patched_build: InstalledBuild, paths: Paths, tmp_path: Path) -> None:
    real = paths.downloads / "llama_cpp_python-0.3.36.tar.gz"
    assert real.is_file()
    flipped = tmp_path / "flipped" / real.name
    flipped.parent.mkdir()
    data = bytearray(real.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = tmp_path / "truncated" / real.name
    truncated.parent.mkdir()
    truncated.write_bytes(bytes(data[: len(data) // 3]))
    sources_before = sorted(p.name for p in paths.sources.iterdir())
    for bad in (flipped, truncated):
        result = _cli("source", "fetch", f"sdist:{bad}")
        assert result.returncode == 1
        assert "has sha256" in result.stderr and "corrupt" in result.stderr
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in paths.sources.iterdir()) == sources_before


def _start_build(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, "build", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env={**os.environ, **env},
    )


def _wait_for_compiling(work: Path, process: subprocess.Popen[str], timeout: float = 600) -> None:
    """Until the build is past configure and ninja has compiled something."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the build ended before it could be interrupted"
        if any(len(log.read_text().splitlines()) > 2 for log in work.glob("*/build/.ninja_log")):
            return
        time.sleep(0.5)
    raise AssertionError("the build never started compiling")


@pytest.mark.parametrize("how", ["sigterm", "sigkill-group"])
def test_build_killed_midway_installs_nothing(
    how: str, paths: Paths, patched_build: InstalledBuild, tmp_path: Path
) -> None:
    # A home of its own, so the interrupted build is never one the session has installed already;
    # the pinned sdist comes from the session's download cache, so nothing is fetched again.
    home = tmp_path / "home"
    scratch = Paths(data=home / "data", cache=home / "cache")
    sdist = paths.downloads / "llama_cpp_python-0.3.36.tar.gz"
    process = _start_build(["--gpu", "cpu", "--source", f"sdist:{sdist}"], {"VELOLLM_HOME": str(home)})
    try:
        _wait_for_compiling(scratch.work, process)
        if how == "sigterm":
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=120)
            assert process.returncode == 143, output
            assert "interrupted" in output
            assert not any(scratch.work.iterdir())
        else:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert builds.list_builds(scratch) == []
    assert builds.current_build(scratch) is None
    with builds.BuildLock(scratch, wait=10):  # the lock died with the process
        builds.remove_leftovers(scratch)
    assert not scratch.builds.is_dir() or not [p for p in scratch.builds.iterdir() if p.name.startswith(".")]
    assert not any(scratch.work.iterdir())
    assert source.list_sources(scratch)[0].commit == patched_build.manifest["source"]["commit"]  # cache intact


def test_two_builds_at_once(patched_build: InstalledBuild, paths: Paths) -> None:
    with builds.BuildLock(paths):
        busy = _cli("build", "--gpu", "cpu")
        assert busy.returncode == 3
        assert "another velollm-patch build is running" in busy.stderr and "--wait" in busy.stderr
        waited = _cli("build", "--gpu", "cpu", "--wait", "1")
        assert waited.returncode == 3
    free = _cli("build", "--gpu", "cpu")
    assert free.returncode == 0, free.stderr
    assert f"installed {patched_build.build_id}" in free.stdout


def test_up_serves_the_default_model_and_stops_on_ctrl_c(patched_build: InstalledBuild, smollm2_gguf: Path) -> None:
    port = serve.free_port()
    process = subprocess.Popen(
        [*CLI, "up", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = ""
        deadline = time.monotonic() + 300
        while "serving" not in line and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line or process.poll() is None, process.stderr.read() if process.stderr else ""
        assert f"http://127.0.0.1:{port}" in line
        assert "curl" in process.stdout.readline()
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0},
            timeout=120,
        )
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130  # docs/usage.md's exit code for Ctrl-C
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
