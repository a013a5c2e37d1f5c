"""install-server / restore-server on real directory layouts with real executables.

Ollama's bundled llama-server is stood in for by a shell script that answers ``--version`` on
stderr the way llama-server does. ``test_install_real_patched_server`` swaps in the real patched
llama-server that the test session builds. Interrupted runs are real SIGKILLs: of a forked run at
each of its changes to Ollama's directory in turn, and of the CLI while it verifies the new binary.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import mmap
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.helpers import add_ollama_model, write_layout_gguf
from velollm_patch import serve
from velollm_patch.cli_ollama import ollama
from velollm_patch.errors import VelollmError
from velollm_patch.model import inspect_model
from velollm_patch.ollama import server_swap
from velollm_patch.ollama.compat import compat_reason
from velollm_patch.ollama.launch import ollama_env, start_like_ollama
from velollm_patch.ollama.pins import LlamaCppRelease, ollama_pin
from velollm_patch.ollama.server_swap import (
    ServerVersion,
    bundled_server_path,
    gpu_families_from_ldd,
    install_server,
    parse_ollama_version,
    parse_server_version,
    restore_server,
    server_version,
)
from velollm_patch.ollama.versions import OllamaVersion

OLLAMA_LINE = "version: 0.5.0-dev (build 1, commit 0c1e570)"
OURS_LINE = "version: 0.5.0-dev (build 4242, commit 0c1e570+velollm-v1)"
# What Ollama 0.32.15+ bundles: llama.cpp b10488, as its release binaries print it.
B10488_LINE = "version: 0.1.2-dev (build 10488, commit 9d77fa172)"
DATA = Path(__file__).parent / "data" / "ollama"


def script(path: Path, version_lines: list[str], guard: str = "") -> Path:
    """An executable that prints ``version_lines`` to stderr for --version, like llama-server."""
    path.parent.mkdir(parents=True, exist_ok=True)
    echoes = "\n".join(f"  echo '{line}' >&2" for line in version_lines)
    path.write_text(f"#!/bin/sh\n{guard}if [ \"$1\" = --version ]; then\n{echoes}\n"
                    "  echo 'built with cc for x86_64-linux-gnu' >&2\n  exit 0\nfi\nexit 1\n")
    path.chmod(0o755)
    return path


def ollama_cli(path: Path, version: str) -> Path:
    """``ollama --version`` as cmd/cmd.go prints it when no server answers (install-server points it at none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n[ \"$1\" = --version ] || exit 1\n"
                    "echo 'Warning: could not connect to a running Ollama instance'\n"
                    f"echo 'Warning: client version is {version}'\n")
    path.chmod(0o755)
    return path


# lib/ollama of a Linux Ollama 0.30+ (llama/server/CMakeLists.txt "Install layout under lib/ollama"): the
# server, the shared ggml with its version links, every CPU variant, and one folder per GPU backend.
CPU_VARIANTS = ("x64", "sse42", "sandybridge", "haswell", "skylakex", "icelake", "alderlake", "sapphirerapids")
GPU_LIBS = ("cuda_v12/libggml-cuda.so", "cuda_v12/libcublas.so.12", "cuda_v13/libggml-cuda.so",
            "rocm_v7_2/libggml-hip.so", "vulkan/libggml-vulkan.so")


def ollama_prefix(root: Path, line: str = OLLAMA_LINE, version: str = "0.33.0") -> Path:
    prefix = root / "usr"
    ollama_cli(prefix / "bin" / "ollama", version)
    lib_dir = bundled_server_path(prefix, "Linux").parent
    script(lib_dir / "llama-server", [line])
    for name in ("libggml-base", "libggml", "libllama"):
        (lib_dir / f"{name}.so.0.9.7").write_bytes(f"Ollama's own {name}".encode())
        (lib_dir / f"{name}.so.0").symlink_to(f"{name}.so.0.9.7")
        (lib_dir / f"{name}.so").symlink_to(f"{name}.so.0")
    for variant in CPU_VARIANTS:
        (lib_dir / f"libggml-cpu-{variant}.so").write_bytes(f"Ollama's CPU backend for {variant}".encode())
    for name in GPU_LIBS:
        (lib_dir / name).parent.mkdir(exist_ok=True)
        (lib_dir / name).write_bytes(f"Ollama's {name}".encode())
    return prefix


def our_server(root: Path, line: str = OURS_LINE) -> Path:
    return script(root / "build" / "bin" / "llama-server", [line, "velollm patch level: 1"])


def snapshot(directory: Path) -> dict[str, tuple[object, ...]]:
    """Everything under ``directory``: each file's bytes and mode, each link's target, each folder's mode."""
    state: dict[str, tuple[object, ...]] = {}
    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        if path.is_symlink():
            state[name] = ("link", os.readlink(path))
        elif path.is_dir():
            state[name] = ("dir", stat.S_IMODE(path.stat().st_mode))
        else:
            state[name] = ("file", path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
    return state


def version_of(binary: Path) -> str:
    run = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    return run.stderr.splitlines()[0]


@pytest.fixture(autouse=True)
def no_models_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty model store and a machine without GPUs, unless a test says otherwise (the real ones would
    make the outcome depend on the machine)."""
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-models"))
    monkeypatch.setattr(server_swap, "machine_gpu_families", lambda: frozenset())


@pytest.mark.parametrize(("output", "expected"), [
    (f"{OLLAMA_LINE}\nbuilt with cc for x86_64\n", ServerVersion(1, "0c1e570", "0.5.0-dev")),
    ("version: 4034 (d5a409e5)\nbuilt with clang\n", ServerVersion(4034, "d5a409e5")),
    (f"{OURS_LINE}\nvelollm patch level: 3\n", ServerVersion(4242, "0c1e570+velollm-v1", "0.5.0-dev", "3")),
    ("usage: llama-server [options]\n", None),
])
def test_parse_server_version(output: str, expected: ServerVersion | None) -> None:
    assert parse_server_version(output) == expected


def test_upstream_commit_comparison() -> None:
    ours = ServerVersion(4242, "0c1e570+velollm-v1")
    assert ours.upstream_commit == "0c1e570"
    assert ours.same_upstream(ServerVersion(1, "0C1E57098bba43ac"))
    assert not ours.same_upstream(ServerVersion(1, "1f2e3d4"))
    assert not ours.same_upstream(ServerVersion(0, "unknown"))


@pytest.mark.parametrize(("system", "expected"), [
    ("Linux", "lib/ollama/llama-server"), ("Darwin", "llama-server"), ("Windows", "lib/ollama/llama-server.exe"),
])
def test_where_ollama_looks(system: str, expected: str) -> None:
    assert bundled_server_path(Path("/p"), system) == Path("/p") / expected


def test_install_then_restore(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)
    target = bundled_server_path(prefix, "Linux")
    original = target.read_bytes()
    ours = our_server(tmp_path)

    result = install_server(prefix, ours, system="Linux")
    assert result.changed and not result.forced and result.libraries == ()
    assert result.original == ServerVersion(1, "0c1e570", "0.5.0-dev")
    assert result.installed.patch_level == "1"
    assert version_of(target) == OURS_LINE
    assert target.read_bytes() == ours.read_bytes() and os.access(target, os.X_OK)
    backup = target.with_name("llama-server.velollm-orig")
    assert result.backup == backup and backup.read_bytes() == original
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []

    again = install_server(prefix, ours, system="Linux")
    assert not again.changed and backup.read_bytes() == original

    restored = restore_server(prefix, system="Linux")
    assert restored.restored == result.original
    assert target.read_bytes() == original and not backup.exists()
    assert version_of(target) == OLLAMA_LINE


def test_second_install_keeps_the_first_backup(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)
    target = bundled_server_path(prefix, "Linux")
    original = target.read_bytes()
    install_server(prefix, our_server(tmp_path), system="Linux")
    newer = our_server(tmp_path / "v2", "version: 0.5.0-dev (build 4243, commit 0c1e570+velollm-v2)")
    result = install_server(prefix, newer, system="Linux")
    assert result.original.commit == "0c1e570"  # compared with Ollama's original, not our first build
    assert target.with_name("llama-server.velollm-orig").read_bytes() == original
    assert restore_server(prefix, system="Linux").restored.build == 1


def test_commit_mismatch_names_the_source_that_matches(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)  # Ollama's server is 0c1e570, which our 0.3.36 source and series are
    ours = our_server(tmp_path, "version: 0.5.0-dev (build 9, commit 1f2e3d4)")
    before = snapshot(prefix)
    with pytest.raises(VelollmError) as info:
        install_server(prefix, ours, system="Linux")
    assert str(info.value) == (
        "Ollama 0.33.0's llama-server is llama.cpp b11312 (0c1e57098) and ours is 1f2e3d4 (build 9): Ollama's compat"
        " patches and server flags are made for its own; build ours from it with `velollm-patch build --source"
        " pypi:llama-cpp-python==0.3.36`, or pass --force to install anyway")
    assert snapshot(prefix) == before
    result = install_server(prefix, ours, force=True, system="Linux")
    assert result.forced and result.overridden == (str(info.value).split(";")[0],)
    assert version_of(bundled_server_path(prefix, "Linux")).endswith("commit 1f2e3d4)")


@pytest.mark.parametrize("line", [B10488_LINE, "version: 0.1.2-dev (build 1, commit 9d77fa172)"],
                         ids=["release-build", "shallow-clone"])
def test_ollamas_b10488_against_our_pin(tmp_path: Path, line: str) -> None:
    """What Ollama 0.33 really bundles against what our series supports: no source of ours matches it yet."""
    prefix = ollama_prefix(tmp_path, line)
    before = snapshot(prefix)
    with pytest.raises(VelollmError) as info:
        install_server(prefix, our_server(tmp_path, "version: 0.5.0-dev (build 0, commit 0c1e570+velollm.21)"),
                       system="Linux")
    assert str(info.value) == (
        "Ollama 0.33.0's llama-server is llama.cpp b10488 (9d77fa172) and ours is b11312 (0c1e57098): Ollama's"
        " compat patches and server flags are made for its own; velollm-patch has no patch series for b10488"
        " (series exist for 0c1e570, 4df29be), so pass --force to install anyway")
    assert snapshot(prefix) == before


def test_a_server_built_without_git_is_taken_for_its_releases_pin(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path, "version: 0.1.2-dev (build 0, commit unknown)")
    assert install_server(prefix, our_server(tmp_path, "version: 0.1.2-dev (build 0, commit 9d77fa172+velollm.1)"),
                          system="Linux").overridden == ()
    restore_server(prefix, system="Linux")
    with pytest.raises(VelollmError, match="^Ollama 0.33.0's llama-server is llama.cpp b10488 \\(9d77fa172\\) per its"
                       " LLAMA_CPP_VERSION and ours is b11312 \\(0c1e57098\\): .*no patch series for b10488"):
        install_server(prefix, our_server(tmp_path), system="Linux")


def test_pins_of_every_ollama_release() -> None:
    """The table against LLAMA_CPP_VERSION as read at every v0.30+ tag of ollama/ollama."""
    lines = [line.split() for line in (DATA / "llama_cpp_version_by_tag.txt").read_text().splitlines()
             if not line.startswith("#")]
    assert len(lines) == 104
    for tag, pin in lines:
        version = OllamaVersion.parse(tag)
        expected = None if version < OllamaVersion(0, 30, 0) else pin  # the 0.30.0 release candidates
        found = ollama_pin(version)
        assert (found.tag if found else None) == expected, tag
    assert ollama_pin(OllamaVersion.parse("0.33.0")) == LlamaCppRelease(10488, "9d77fa172")
    assert ollama_pin(OllamaVersion.parse("0.33.1")) is None  # newer than the table was read
    assert ollama_pin(OllamaVersion.parse("0.24.3")) is None


@pytest.mark.parametrize(("output", "expected"), [
    ("ollama version is 0.33.0\n", "0.33.0"),
    ("ollama version is 0.34.2\nWarning: client version is 0.33.0\n", "0.33.0"),  # another Ollama answered
    ("Warning: could not connect to a running Ollama instance\nWarning: client version is 0.30.1\n", "0.30.1"),
    ("command not found\n", None),
])
def test_parse_ollama_version(output: str, expected: str | None) -> None:
    assert parse_ollama_version(output) == expected


@pytest.mark.parametrize(("version", "message"), [
    ("0.29.2", "Ollama 0.29.2 at {prefix} is older than 0.30.0 and runs no separate llama-server to replace:"
               " upgrade Ollama"),
    ("0.24.0", "Ollama 0.24.0 at {prefix} is older than 0.30.0 and runs no separate llama-server to replace:"
               " upgrade Ollama"),
    ("0.34.0", "Ollama 0.34.0 at {prefix} is newer than the newest release velollm-patch knows (0.33.0): its layout"
               " and llama.cpp pin are unchecked; update velollm-patch, or pass --force to install anyway"),
    ("0.0.0", "Ollama at {prefix} reports version 0.0.0 (a build from source), so its release and llama.cpp pin"
              " cannot be checked; update velollm-patch, or pass --force to install anyway"),
])
def test_ollama_release_policy(tmp_path: Path, version: str, message: str) -> None:
    prefix = ollama_prefix(tmp_path, version=version)
    before = snapshot(prefix)
    result = CliRunner().invoke(ollama, ["install-server", "--prefix", str(prefix), "--server",
                                         str(our_server(tmp_path))])
    assert result.exit_code != 0
    assert isinstance(result.exception, VelollmError) and str(result.exception) == message.format(prefix=prefix)
    assert snapshot(prefix) == before


@pytest.mark.parametrize("version", ["0.34.0", "0.0.0"])
def test_an_unknown_release_installs_with_force(tmp_path: Path, version: str) -> None:
    prefix = ollama_prefix(tmp_path, version=version)
    result = CliRunner().invoke(ollama, ["install-server", "--prefix", str(prefix), "--server",
                                         str(our_server(tmp_path)), "--force"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("warning (--force): Ollama")
    assert version_of(bundled_server_path(prefix, "Linux")) == OURS_LINE


def test_prefix_without_ollama(tmp_path: Path) -> None:
    with pytest.raises(VelollmError, match="holds no Ollama .*bin/ollama does not exist.*pass --prefix"):
        install_server(tmp_path, our_server(tmp_path), system="Linux")
    with pytest.raises(VelollmError, match="does not exist: pass the Ollama install prefix"):
        install_server(tmp_path / "nope", our_server(tmp_path), system="Linux")
    ollama_cli(tmp_path / "odd" / "bin" / "ollama", "").write_text("#!/bin/sh\necho 'no version here'\n")
    with pytest.raises(VelollmError, match="--version gave no Ollama version \\(exit 0\\): no version here"):
        install_server(tmp_path / "odd", our_server(tmp_path), system="Linux")


def layout_without_server(prefix: Path) -> None:
    bundled_server_path(prefix, "Linux").unlink()


def layout_with_linked_server(prefix: Path) -> None:
    target = bundled_server_path(prefix, "Linux")
    target.rename(target.with_name("llama-server-real"))
    target.symlink_to("llama-server-real")


def layout_without_shared_ggml(prefix: Path) -> None:
    for lib in bundled_server_path(prefix, "Linux").parent.glob("libggml-base.so*"):
        lib.unlink()


@pytest.mark.parametrize(("change", "message"), [
    (layout_without_server, "llama-server does not exist, a layout velollm-patch does not know"),
    (layout_with_linked_server, "llama-server is not a regular file, a layout velollm-patch does not know"),
    (layout_without_shared_ggml, "has no libggml-base.so beside llama-server, a layout velollm-patch does not know"),
])
def test_a_layout_we_do_not_know_is_left_alone(tmp_path: Path, change: Callable[[Path], None], message: str) -> None:
    prefix = ollama_prefix(tmp_path)
    change(prefix)
    before = snapshot(prefix)
    with pytest.raises(VelollmError, match=message):
        install_server(prefix, our_server(tmp_path), system="Linux")
    assert snapshot(prefix) == before


def test_models_only_ollamas_compat_layer_loads_refuse_the_swap(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    add_ollama_model(store, "library/gemma3:4b", model=write_layout_gguf(tmp_path / "old.gguf", "gemma3"))
    add_ollama_model(store, "library/gemma3:270m", model=write_layout_gguf(
        tmp_path / "new.gguf", "gemma3", {"gemma3.attention.layer_norm_rms_epsilon": 1e-6}))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    prefix = ollama_prefix(tmp_path)
    before = snapshot(prefix)
    args = ["install-server", "--prefix", str(prefix), "--server", str(our_server(tmp_path))]
    refused = CliRunner().invoke(ollama, args)
    assert refused.exit_code != 0 and isinstance(refused.exception, VelollmError)
    assert str(refused.exception) == (
        "1 model(s) in Ollama's store load only through Ollama's llama.cpp compat layer, which our llama-server lacks"
        " (gemma3:4b: gemma3 in Ollama's layout: no gemma3.attention.layer_norm_rms_epsilon); remove them, or"
        " re-create them from llama.cpp-converted GGUFs, or pass --force to install anyway")
    assert snapshot(prefix) == before
    forced = CliRunner().invoke(ollama, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert forced.output.splitlines()[0] == f"warning (--force): {str(refused.exception).split(';')[0]}"


def test_an_unreadable_model_is_reported_not_guessed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(write_layout_gguf(tmp_path / "whole.gguf", "llama").read_bytes()[:40])
    add_ollama_model(store, "library/cut:latest", model=truncated)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    prefix = ollama_prefix(tmp_path)
    result = CliRunner().invoke(ollama, ["install-server", "--prefix", str(prefix), "--server",
                                         str(our_server(tmp_path))])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("warning: could not check cut:latest (")


@pytest.mark.parametrize(("machine", "ours", "refused"), [
    ({"cuda"}, set(), "cuda_v12, cuda_v13 backend, which our CPU-only llama-server lacks"),
    ({"rocm", "vulkan"}, set(), "rocm_v7_2, vulkan backend, which our CPU-only llama-server lacks"),
    ({"vulkan"}, {"vulkan"}, None),
    ({"cuda", "vulkan"}, {"vulkan"}, None),  # the GPU still runs, through our Vulkan backend
    (set(), set(), None),  # no GPU: Ollama's GPU folders serve nothing here
], ids=["nvidia-cpu-build", "amd-cpu-build", "vulkan-build", "nvidia-vulkan-build", "no-gpu"])
def test_a_gpu_ollama_would_use_must_stay_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 machine: set[str], ours: set[str], refused: str | None) -> None:
    monkeypatch.setattr(server_swap, "machine_gpu_families", lambda: frozenset(machine))
    monkeypatch.setattr(server_swap, "server_gpu_families", lambda binary: frozenset(ours))
    prefix = ollama_prefix(tmp_path)
    before = snapshot(prefix)
    if refused is None:
        assert install_server(prefix, our_server(tmp_path), system="Linux").changed
        return
    with pytest.raises(VelollmError) as info:
        install_server(prefix, our_server(tmp_path), system="Linux")
    assert refused in str(info.value)
    gpu = sorted(machine)[0]
    assert str(info.value).endswith(f"every model would run on the CPU; build ours with `velollm-patch build --gpu"
                                    f" {gpu}`, or pass --force to install anyway")
    assert snapshot(prefix) == before
    assert install_server(prefix, our_server(tmp_path), force=True, system="Linux").forced


def test_gpu_families_from_ldd() -> None:
    # ldd of the Vulkan build in this project's test home (0c1e570-vulkan-patched), trimmed.
    vulkan_build = ("\tlibgomp.so.1 => /lib/x86_64-linux-gnu/libgomp.so.1 (0x00007f6b355e3000)\n"
                    "\tlibvulkan.so.1 => /lib/x86_64-linux-gnu/libvulkan.so.1 (0x00007f6b35573000)\n"
                    "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f6b3241e000)\n")
    assert gpu_families_from_ldd(vulkan_build) == {"vulkan"}
    assert gpu_families_from_ldd("\tlibcublas.so.13 => /usr/local/cuda/lib64/libcublas.so.13 (0x1)\n"
                                 "\tlibcuda.so.1 => not found\n") == {"cuda"}
    assert gpu_families_from_ldd("\tlibamdhip64.so.6 => /opt/rocm/lib/libamdhip64.so.6 (0x1)\n") == {"rocm"}
    assert gpu_families_from_ldd("\tnot a dynamic executable\n") == frozenset()


def test_ollamas_gpu_folders(tmp_path: Path) -> None:
    lib_dir = bundled_server_path(ollama_prefix(tmp_path), "Linux").parent
    (lib_dir / "cuda_jetpack6").mkdir()
    (lib_dir / "mlx_cuda_v13").mkdir()  # Ollama's MLX runner, not a llama-server backend
    assert server_swap.ollama_gpu_folders(lib_dir) == {
        "cuda": ["cuda_jetpack6", "cuda_v12", "cuda_v13"], "rocm": ["rocm_v7_2"], "vulkan": ["vulkan"]}


def test_the_whole_of_lib_ollama_comes_back(tmp_path: Path) -> None:
    """Ollama's shared ggml (with its version links), every CPU variant and every GPU folder are left as they
    are, and after restore-server the prefix is byte for byte, mode for mode, link for link what it was."""
    prefix = ollama_prefix(tmp_path)
    lib_dir = bundled_server_path(prefix, "Linux").parent
    (lib_dir / "libggml-cpu-haswell.so").chmod(0o755)
    pristine = snapshot(prefix)
    result = install_server(prefix, our_server(tmp_path), system="Linux")
    installed = snapshot(prefix)
    changed = {name for name in installed if installed[name] != pristine.get(name)}
    assert changed == {"lib/ollama/llama-server", "lib/ollama/llama-server.velollm-orig"}
    assert result.libraries == ()
    restore_server(prefix, system="Linux")
    assert snapshot(prefix) == pristine


def test_no_write_permission_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = ollama_prefix(tmp_path)
    lib_dir = bundled_server_path(prefix, "Linux").parent
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == lib_dir else real_access(p, mode))
    before = snapshot(prefix)
    with pytest.raises(VelollmError, match="no permission to write .* \\(run with sudo\\)"):
        install_server(prefix, our_server(tmp_path), system="Linux")
    assert snapshot(prefix) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_ollama_directory(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)
    lib_dir = bundled_server_path(prefix, "Linux").parent
    before = snapshot(prefix)
    lib_dir.chmod(0o555)
    try:
        with pytest.raises(VelollmError, match="no permission"):
            install_server(prefix, our_server(tmp_path), system="Linux")
    finally:
        lib_dir.chmod(0o755)
    assert snapshot(prefix) == before


def test_failed_verification_rolls_everything_back(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)
    before = snapshot(prefix)
    # Answers --version only where it was built, like a binary whose libraries stay behind.
    guard = 'case "$0" in */build/bin/*) ;; *) echo "error while loading shared libraries" >&2; exit 127;; esac\n'
    ours = script(tmp_path / "build" / "bin" / "llama-server", [OURS_LINE], guard)
    with pytest.raises(VelollmError) as info:
        install_server(prefix, ours, system="Linux")
    assert "failed and was undone" in str(info.value) and "error while loading shared libraries" in str(info.value)
    assert "\n" not in str(info.value)
    assert snapshot(prefix) == before


def test_ctrl_c_while_verifying_undoes_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = ollama_prefix(tmp_path)
    target = bundled_server_path(prefix, "Linux")
    before = snapshot(prefix)
    real = server_swap.server_version

    def interrupted(binary: Path) -> ServerVersion:
        if binary == target and target.read_bytes() == ours.read_bytes():  # the check after the swap
            raise KeyboardInterrupt
        return real(binary)

    ours = our_server(tmp_path)
    monkeypatch.setattr(server_swap, "server_version", interrupted)
    with pytest.raises(KeyboardInterrupt):
        install_server(prefix, ours, system="Linux")
    assert snapshot(prefix) == before


def test_our_binary_must_run(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)
    broken = script(tmp_path / "build" / "bin" / "llama-server", ["not a version"])
    with pytest.raises(VelollmError, match="--version gave no version"):
        install_server(prefix, broken, system="Linux")
    with pytest.raises(VelollmError, match="is not an executable llama-server"):
        install_server(prefix, tmp_path / "missing", system="Linux")


def test_restore_without_backup(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)
    with pytest.raises(VelollmError, match="was never replaced"):
        restore_server(prefix, system="Linux")
    with pytest.raises(VelollmError, match="holds no Ollama"):
        restore_server(tmp_path, system="Linux")


def test_a_prev_that_does_not_run_is_not_put_back(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)
    target = bundled_server_path(prefix, "Linux")
    target.with_name(".llama-server.velollm-prev").write_bytes(b"?")  # not what this code leaves
    before = snapshot(prefix)
    with pytest.raises(VelollmError, match="left from an interrupted install-server but does not run"):
        install_server(prefix, our_server(tmp_path), system="Linux")
    assert snapshot(prefix) == before


def test_restore_drops_a_hard_linked_backup(tmp_path: Path) -> None:
    # The layout an install killed right after its backup leaves, and the one an older restore-server
    # left: a rename of a hard link onto its own file does nothing on POSIX.
    prefix = ollama_prefix(tmp_path)
    target = bundled_server_path(prefix, "Linux")
    pristine = snapshot(prefix)
    os.link(target, target.with_name("llama-server.velollm-orig"))
    restored = CliRunner().invoke(ollama, ["restore-server", "--prefix", str(prefix)])
    assert restored.exit_code == 0, restored.output
    assert restored.output.splitlines()[0] == "removed llama-server.velollm-orig, left by an interrupted run"
    assert "restored" in restored.output and "build 1, commit 0c1e570" in restored.output
    assert snapshot(prefix) == pristine and version_of(target) == OLLAMA_LINE


OUR_LIB = "libggml-cuda.so"


@pytest.fixture
def swap_with_a_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every install also brings OUR_LIB from next to our binary, as an ldd of a shared build would."""
    monkeypatch.setattr(server_swap, "_libs_to_copy",
                        lambda ours, dest_dir: [(ours.parent / OUR_LIB, dest_dir / OUR_LIB)])


def swap_setup(root: Path) -> tuple[Path, Path]:
    prefix = ollama_prefix(root)
    ours = our_server(root)
    (ours.parent / OUR_LIB).write_bytes(b"our CUDA backend")
    return prefix, ours


def die_at(step: int, directory: Path) -> None:
    """Make this process SIGKILL itself at its ``step``-th change in ``directory``: just before a
    link, rename, unlink or chmod there, or before or halfway through writing a file there."""
    count = 0

    def reached(*args: object) -> bool:
        nonlocal count
        if not any(isinstance(a, (str, os.PathLike)) and Path(a).parent == directory for a in args):
            return False
        count += 1
        return count == step

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def before(real: Callable[..., Any]) -> Callable[..., Any]:
        def change(*args: Any, **kwargs: Any) -> Any:
            if reached(*args[:2]):
                die()
            return real(*args, **kwargs)
        return change

    def writing(dest: Any, data: Callable[[], bytes]) -> None:
        if reached(dest):
            die()
        if reached(dest):
            Path(dest).write_bytes(data()[: len(data()) // 2])
            die()

    real_copy2, real_write_text = shutil.copy2, Path.write_text

    def copy2(source: Any, dest: Any, **kwargs: Any) -> Any:
        writing(dest, Path(source).read_bytes)
        return real_copy2(source, dest, **kwargs)

    def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        writing(self, data.encode)
        return real_write_text(self, data, *args, **kwargs)

    # Set by name like the os functions: this runs in a forked child that never returns to pytest.
    for owner, name, replacement in ((shutil, "copy2", copy2), (Path, "write_text", write_text),
                                     *((os, name, before(getattr(os, name)))
                                       for name in ("link", "replace", "unlink", "chmod"))):
        setattr(owner, name, replacement)


def killed_at(step: int, directory: Path, action: Callable[[], object]) -> bool:
    """Run ``action`` in a forked child killed with SIGKILL at its ``step``-th change in
    ``directory`` (see die_at); False when it finished first."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            die_at(step, directory)
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, f"the run failed on its own before step {step}"
    return False


def heal(then: str, prefix: Path, ours: Path, notes: list[str]) -> None:
    if then == "install-server":
        install_server(prefix, ours, system="Linux", on_recovery=notes.append)
    else:
        restore_server(prefix, system="Linux", on_recovery=notes.append)


def no_hard_links(source: object, dest: object) -> None:
    raise PermissionError(1, "Operation not permitted")  # what FAT and exFAT say


@pytest.mark.usefixtures("swap_with_a_library")
@pytest.mark.parametrize("then", ["install-server", "restore-server"])
@pytest.mark.parametrize("links", [True, False], ids=["hard-links", "copies"])
def test_install_killed_at_every_step_heals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, then: str,
                                            links: bool) -> None:
    if not links:
        monkeypatch.setattr(os, "link", no_hard_links)
    prefix, ours = swap_setup(tmp_path / "reference")
    pristine = snapshot(prefix)
    install_server(prefix, ours, system="Linux")
    installed = snapshot(prefix)
    expected = installed if then == "install-server" else pristine
    for step in itertools.count(1):
        prefix, ours = swap_setup(tmp_path / f"step{step}")
        target = bundled_server_path(prefix, "Linux")
        if not killed_at(step, target.parent, functools.partial(install_server, prefix, ours, system="Linux")):
            break
        left = snapshot(prefix)
        notes: list[str] = []
        if then == "restore-server" and left == pristine:
            with pytest.raises(VelollmError, match="was never replaced"):
                heal(then, prefix, ours, notes)
        else:
            heal(then, prefix, ours, notes)
        assert snapshot(prefix) == expected, f"killed at step {step}, left {sorted(left)}, then {then}: {notes}"
        assert version_of(target) == (OURS_LINE if then == "install-server" else OLLAMA_LINE)
        assert len(notes) == int(left not in (pristine, installed)), f"step {step}: {notes}"
    assert step > 15  # so the harness saw them all: links, manifests, library, binary, commit


@pytest.mark.usefixtures("swap_with_a_library")
@pytest.mark.parametrize("then", ["install-server", "restore-server"])
def test_restore_killed_at_every_step_heals(tmp_path: Path, then: str) -> None:
    prefix, ours = swap_setup(tmp_path / "reference")
    pristine = snapshot(prefix)
    install_server(prefix, ours, system="Linux")
    installed = snapshot(prefix)
    for step in itertools.count(1):
        prefix, ours = swap_setup(tmp_path / f"step{step}")
        target = bundled_server_path(prefix, "Linux")
        install_server(prefix, ours, system="Linux")
        if not killed_at(step, target.parent, functools.partial(restore_server, prefix, system="Linux")):
            break
        left = snapshot(prefix)
        notes: list[str] = []
        heal(then, prefix, ours, notes)
        assert snapshot(prefix) == (installed if then == "install-server" else pristine), f"step {step}: {notes}"
        assert len(notes) == int(left not in (pristine, installed)), f"step {step}: {notes}"
    assert step > 3  # the binary back, the library gone, the manifest gone


@pytest.mark.parametrize("then", ["install-server", "restore-server"])
def test_install_killed_while_verifying_heals(tmp_path: Path, then: str) -> None:
    """The reported case, with a real kill -9 of the CLI: while the new llama-server answers --version."""
    prefix = ollama_prefix(tmp_path)
    target = bundled_server_path(prefix, "Linux")
    pristine = snapshot(prefix)
    ollamas_names = {p.name for p in target.parent.iterdir()}
    verifying = tmp_path / "verifying"
    # Ours hangs the first time it runs from Ollama's directory (the install's check), saying its pid.
    hang = (f'case "$0" in */lib/ollama/*) if [ ! -e "{verifying}" ]; then echo $$ > "{verifying}.tmp";'
            f' mv "{verifying}.tmp" "{verifying}"; exec sleep 600; fi;; esac\n')
    ours = script(tmp_path / "build" / "bin" / "llama-server", [OURS_LINE, "velollm patch level: 1"], hang)
    cli = subprocess.Popen([sys.executable, "-m", "velollm_patch", "ollama", "install-server",
                            "--prefix", prefix, "--server", ours], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not verifying.exists():
            assert cli.poll() is None and time.monotonic() < deadline, "install-server never verified"
            time.sleep(0.02)
    finally:
        cli.kill()
        cli.wait()
        if verifying.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(verifying.read_text()), signal.SIGKILL)
    assert target.read_bytes() == ours.read_bytes()
    assert target.with_name(".llama-server.velollm-prev").read_bytes() == target.with_name(
        "llama-server.velollm-orig").read_bytes()

    args = ["--server", str(ours)] if then == "install-server" else []
    healed = CliRunner().invoke(ollama, [then, "--prefix", str(prefix), *args])
    assert healed.exit_code == 0, healed.output
    lines = healed.output.splitlines()
    assert lines[0] == "rolled back an install-server interrupted before its new llama-server was verified"
    if then == "install-server":
        assert lines[1] == f"installed {ours} as {target}" and version_of(target) == OURS_LINE
        assert {p.name for p in target.parent.iterdir()} == ollamas_names | {"llama-server.velollm-orig"}
    else:
        assert lines[1].startswith("restored") and snapshot(prefix) == pristine


needs_cc = pytest.mark.skipif(shutil.which("cc") is None or shutil.which("ldd") is None,
                              reason="needs a C compiler and ldd to build a dynamically linked stand-in")


def dynamic_server(root: Path, tag: str, lib: str = "ggml-base") -> Path:
    """A real ELF llama-server stand-in linked against lib<lib>.so next to it ($ORIGIN rpath),
    the layout a BUILD_SHARED_LIBS=ON build of llama.cpp has."""
    bin_dir = root / "build" / "bin"
    bin_dir.mkdir(parents=True)
    (root / "lib.c").write_text(f'const char *ggml_tag(void) {{ return "{tag}"; }}\n')
    (root / "main.c").write_text(
        "#include <stdio.h>\nconst char *ggml_tag(void);\n"
        'int main(void) { fprintf(stderr, "' + OURS_LINE + '\\nvelollm patch level: %s\\n", ggml_tag());'
        " return 0; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", bin_dir / f"lib{lib}.so", root / "lib.c"], check=True)
    subprocess.run(["cc", "-o", bin_dir / "llama-server", root / "main.c", f"-L{bin_dir}", f"-l{lib}",
                    "-Wl,-rpath,$ORIGIN"], check=True)
    return bin_dir / "llama-server"


@needs_cc
def test_shared_libraries_come_along_and_go_again(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)
    lib_dir = bundled_server_path(prefix, "Linux").parent
    pristine = snapshot(prefix)
    ours = dynamic_server(tmp_path / "ours", "7", lib="mtmd")  # a library this Ollama does not ship
    result = install_server(prefix, ours, system="Linux")
    assert result.libraries == (lib_dir / "libmtmd.so",)
    assert result.installed.patch_level == "7"
    shutil.rmtree(tmp_path / "ours")  # the installed copy must not depend on the build tree
    assert "velollm patch level: 7" in subprocess.run(
        [lib_dir / "llama-server", "--version"], capture_output=True, text=True).stderr
    restored = restore_server(prefix, system="Linux")
    assert restored.removed_libraries == (lib_dir / "libmtmd.so",)
    assert snapshot(prefix) == pristine


@needs_cc
def test_ollamas_own_library_is_never_replaced(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)
    before = snapshot(prefix)
    with pytest.raises(VelollmError, match="ships a different .*libggml-base.so.*BUILD_SHARED_LIBS=OFF"):
        install_server(prefix, dynamic_server(tmp_path / "ours", "7"), system="Linux")
    assert snapshot(prefix) == before


def test_cli_install_and_restore(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)
    ours = our_server(tmp_path)
    runner = CliRunner()
    installed = runner.invoke(ollama, ["install-server", "--prefix", str(prefix), "--server", str(ours)])
    assert installed.exit_code == 0, installed.output
    assert "kept as llama-server.velollm-orig" in installed.output
    assert "build 4242, commit 0c1e570+velollm-v1" in installed.output
    restored = runner.invoke(ollama, ["restore-server", "--prefix", str(prefix)])
    assert restored.exit_code == 0, restored.output
    assert "restored" in restored.output and "build 1, commit 0c1e570" in restored.output


def test_cli_install_without_a_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VELOLLM_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(ollama, ["install-server", "--prefix", str(ollama_prefix(tmp_path))])
    assert isinstance(result.exception, VelollmError) and "no current build" in str(result.exception)


@pytest.mark.slow
def test_install_real_patched_server(tmp_path: Path, patched_server: Path) -> None:
    real_server_bin = patched_server
    ours = server_version(real_server_bin)
    assert ours.upstream_commit, f"{real_server_bin} reports no upstream commit: {ours}"
    # Ollama's binary for the same upstream commit, as its --version would read.
    prefix = ollama_prefix(tmp_path, f"version: {ours.release or '0.0.0'} (build 1, commit {ours.upstream_commit})")
    target = bundled_server_path(prefix, "Linux")
    original = target.read_bytes()
    result = install_server(prefix, real_server_bin, system="Linux")
    assert result.installed == ours and server_version(target) == ours
    restore_server(prefix, system="Linux")
    assert target.read_bytes() == original


# A stand-in for one of Ollama's own ggml libraries: a real shared object that says when it is loaded (its
# constructor runs at dlopen) and answers the backend registry's probes as a backend that cannot start.
FOREIGN_GGML = """#include <stdio.h>
__attribute__((constructor)) static void loaded(void) { fprintf(stderr, "foreign ggml library loaded: %s\\n", NAME); }
int ggml_backend_score(void) { return 1; }
void *ggml_backend_init(void) { return 0; }
"""


def foreign_ggml(lib_dir: Path, root: Path) -> None:
    """Make Ollama's libraries in the stand-in ``lib_dir`` real ELF objects: the shared ggml, each CPU variant
    (linked against libggml-base, as Ollama's are) and each GPU backend."""
    (root / "foreign.c").write_text(FOREIGN_GGML)

    def cc(out: Path, *extra: str) -> None:
        subprocess.run(["cc", "-shared", "-fPIC", f'-DNAME="{out.name}"', "-o", out, root / "foreign.c", *extra],
                       check=True)

    for name in ("libggml-base", "libggml", "libllama"):
        cc(lib_dir / f"{name}.so.0.9.7", f"-Wl,-soname,{name}.so.0")
    for variant in CPU_VARIANTS:
        cc(lib_dir / f"libggml-cpu-{variant}.so", f"-L{lib_dir}", "-Wl,--no-as-needed", "-lggml-base",
           "-Wl,-rpath,$ORIGIN")
    for name in GPU_LIBS:
        cc(lib_dir / name)


def mapped_files(pid: int, under: Path) -> set[str]:
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in maps if len(line.split(maxsplit=5)) == 6
            and line.split(maxsplit=5)[5].startswith(f"{under}/")}


@pytest.mark.slow
@needs_cc
def test_static_server_in_ollamas_lib_dir(tmp_path: Path, patched_server: Path, smollm2_gguf: Path) -> None:
    """Why the static server is what is installed, measured: started the way Ollama starts it (its argv, its
    LD_LIBRARY_PATH, GGML_BACKEND_PATH naming its CUDA backend), it maps no library of Ollama's and serves; and
    `--list-devices`, which Ollama's GPU discovery runs, loads none either (patch static-build-own-devices), where
    upstream's loads Ollama's CPU variants and GPU backend (GGML_BACKEND_DL_SCAN=1 restores that)."""
    ours = server_version(patched_server)
    prefix = ollama_prefix(tmp_path, f"version: 0.1.2-dev (build 1, commit {ours.upstream_commit})")
    target = bundled_server_path(prefix, "Linux")
    lib_dir = target.parent
    foreign_ggml(lib_dir, tmp_path)
    install_server(prefix, patched_server, system="Linux")
    cuda = lib_dir / "cuda_v12"
    environment = {**os.environ, "LD_LIBRARY_PATH": str(cuda), "GGML_BACKEND_PATH": str(cuda / "libggml-cuda.so")}

    with start_like_ollama(target, smollm2_gguf, tmp_path / "serve.log", ollama_environment=environment) as server:
        assert mapped_files(server.pid, prefix) == {str(target)}
        assert serve.complete(server, "Once upon a time", 4)["tokens_predicted"] == 4
        assert "foreign ggml library loaded" not in server.log_text()

    def discovery(extra: dict[str, str]) -> tuple[set[str], str]:
        run = subprocess.run([target, "--list-devices", "--offline", "--verbose"], capture_output=True, text=True,
                             env=ollama_env(target, {**environment, **extra}), cwd=tmp_path, timeout=120)
        assert "Available devices:" in run.stdout
        return {line.rsplit(": ", 1)[1] for line in run.stderr.splitlines()
                if line.startswith("foreign ggml library loaded: ")}, run.stdout

    loaded, devices = discovery({})
    assert loaded == set(), devices
    loaded, _ = discovery({"GGML_BACKEND_DL_SCAN": "1"})
    assert loaded >= {"libggml-base.so.0.9.7", "libggml-cpu-haswell.so", "libggml-cuda.so"}


def without_key(source: Path, dest: Path, key: str) -> Path:
    """Copy a little-endian GGUF leaving out one key-value; the tensor data is copied unchanged."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
    with source.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        def u32(at: int) -> int:
            return int(struct.unpack_from("<I", buf, at)[0])

        def u64(at: int) -> int:
            return int(struct.unpack_from("<Q", buf, at)[0])

        def value_end(at: int, vtype: int) -> int:
            if vtype == 8:
                return at + 8 + u64(at)
            if vtype == 9:
                elem, count, at = u32(at), u64(at + 4), at + 12
                if elem != 8:
                    return at + count * sizes[elem]
                for _ in range(count):
                    at += 8 + u64(at)
                return at
            return at + sizes[vtype]

        n_tensors, n_kv, pos = u64(8), u64(16), 24
        span, alignment = (0, 0), 32
        for _ in range(n_kv):
            start, name = pos, bytes(buf[pos + 8: pos + 8 + u64(pos)]).decode()
            pos += 8 + u64(pos)
            vtype = u32(pos)
            if name == "general.alignment":
                alignment = u32(pos + 4)
            pos = value_end(pos + 4, vtype)
            if name == key:
                span = (start, pos)
        for _ in range(n_tensors):
            pos += 8 + u64(pos)
            pos += 4 + 8 * u32(pos) + 4 + 8
        data = -(-pos // alignment) * alignment
        assert span != (0, 0), f"{source} has no {key}"
        header = bytes(buf[:16]) + struct.pack("<Q", n_kv - 1) + bytes(buf[24:span[0]]) + bytes(buf[span[1]:pos])
        with dest.open("wb") as out:
            out.write(header + b"\0" * (-len(header) % alignment))
            out.write(buf[data:])
    return dest


@pytest.mark.slow
def test_our_server_cannot_load_an_old_ollama_gemma3(tmp_path: Path, patched_server: Path,
                                                     gemma3_gguf: Path) -> None:
    """Ollama's published gemma3 blobs omit layer_norm_rms_epsilon (the compat layer injects it): our server
    exits on such a file, and the check finds it first."""
    old = without_key(gemma3_gguf, tmp_path / "gemma3-ollama-layout.gguf", "gemma3.attention.layer_norm_rms_epsilon")
    assert compat_reason(gemma3_gguf) is None
    assert compat_reason(old) == "gemma3 in Ollama's layout: no gemma3.attention.layer_norm_rms_epsilon"
    assert inspect_model(old).n_params == inspect_model(gemma3_gguf).n_params
    log = tmp_path / "old.log"
    with pytest.raises(VelollmError, match="exited with code"):
        start_like_ollama(patched_server, old, log, timeout=120)
    assert "key not found in model: gemma3.attention.layer_norm_rms_epsilon" in log.read_text()
