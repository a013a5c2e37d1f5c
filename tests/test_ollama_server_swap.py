"""install-server / restore-server on real directory layouts with real executables.

Ollama's bundled llama-server is stood in for by a shell script that answers ``--version`` on
stderr the way llama-server does. ``test_install_real_patched_server`` swaps in the real patched
llama-server that the test session builds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from velollm_patch.cli_ollama import ollama
from velollm_patch.errors import VelollmError
from velollm_patch.ollama.server_swap import (
    ServerVersion,
    bundled_server_path,
    install_server,
    parse_server_version,
    restore_server,
    server_version,
)

OLLAMA_LINE = "version: 0.5.0-dev (build 1, commit 0c1e570)"
OURS_LINE = "version: 0.5.0-dev (build 4242, commit 0c1e570+velollm-v1)"


def script(path: Path, version_lines: list[str], guard: str = "") -> Path:
    """An executable that prints ``version_lines`` to stderr for --version, like llama-server."""
    path.parent.mkdir(parents=True, exist_ok=True)
    echoes = "\n".join(f"  echo '{line}' >&2" for line in version_lines)
    path.write_text(f"#!/bin/sh\n{guard}if [ \"$1\" = --version ]; then\n{echoes}\n"
                    "  echo 'built with cc for x86_64-linux-gnu' >&2\n  exit 0\nfi\nexit 1\n")
    path.chmod(0o755)
    return path


def ollama_prefix(root: Path, line: str = OLLAMA_LINE) -> Path:
    prefix = root / "usr"
    script(prefix / "bin" / "ollama", ["ollama version is 0.33.0"])
    script(bundled_server_path(prefix, "Linux"), [line])
    (prefix / "lib" / "ollama" / "libggml-base.so").write_bytes(b"ollama's own library")
    return prefix


def our_server(root: Path, line: str = OURS_LINE) -> Path:
    return script(root / "build" / "bin" / "llama-server", [line, "velollm patch level: 1"])


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def version_of(binary: Path) -> str:
    run = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    return run.stderr.splitlines()[0]


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


def test_commit_mismatch_is_refused_unless_forced(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)
    ours = our_server(tmp_path, "version: 0.5.0-dev (build 9, commit 1f2e3d4)")
    before = snapshot(prefix)
    with pytest.raises(VelollmError) as info:
        install_server(prefix, ours, system="Linux")
    assert "llama.cpp 0c1e570, ours is 1f2e3d4" in str(info.value) and "--force" in str(info.value)
    assert snapshot(prefix) == before
    result = install_server(prefix, ours, force=True, system="Linux")
    assert result.forced and version_of(bundled_server_path(prefix, "Linux")).endswith("commit 1f2e3d4)")


def test_prefix_without_ollama(tmp_path: Path) -> None:
    with pytest.raises(VelollmError, match="holds no Ollama 0.30"):
        install_server(tmp_path, our_server(tmp_path), system="Linux")
    with pytest.raises(VelollmError, match="does not exist: pass the Ollama install prefix"):
        install_server(tmp_path / "nope", our_server(tmp_path), system="Linux")


def test_ollama_before_0_30(tmp_path: Path) -> None:
    (tmp_path / "usr" / "lib" / "ollama").mkdir(parents=True)
    with pytest.raises(VelollmError, match="before 0.30 has no separate llama-server"):
        install_server(tmp_path / "usr", our_server(tmp_path), system="Linux")


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


def test_interrupted_install_is_not_guessed_at(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)
    target = bundled_server_path(prefix, "Linux")
    target.with_name(".llama-server.velollm-prev").write_bytes(b"?")
    with pytest.raises(VelollmError, match="interrupted install"):
        install_server(prefix, our_server(tmp_path), system="Linux")


needs_cc = pytest.mark.skipif(shutil.which("cc") is None or shutil.which("ldd") is None,
                              reason="needs a C compiler and ldd to build a dynamically linked stand-in")


def dynamic_server(root: Path, tag: str) -> Path:
    """A real ELF llama-server stand-in linked against libggml-base.so next to it ($ORIGIN rpath),
    the layout a BUILD_SHARED_LIBS=ON build of llama.cpp has."""
    bin_dir = root / "build" / "bin"
    bin_dir.mkdir(parents=True)
    (root / "lib.c").write_text(f'const char *ggml_tag(void) {{ return "{tag}"; }}\n')
    (root / "main.c").write_text(
        "#include <stdio.h>\nconst char *ggml_tag(void);\n"
        'int main(void) { fprintf(stderr, "' + OURS_LINE + '\\nvelollm patch level: %s\\n", ggml_tag());'
        " return 0; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", bin_dir / "libggml-base.so", root / "lib.c"], check=True)
    subprocess.run(["cc", "-o", bin_dir / "llama-server", root / "main.c", f"-L{bin_dir}", "-lggml-base",
                    "-Wl,-rpath,$ORIGIN"], check=True)
    return bin_dir / "llama-server"


@needs_cc
def test_shared_libraries_come_along_and_go_again(tmp_path: Path) -> None:
    prefix = ollama_prefix(tmp_path)
    lib_dir = bundled_server_path(prefix, "Linux").parent
    (lib_dir / "libggml-base.so").unlink()  # this Ollama ships no library of that name
    ours = dynamic_server(tmp_path / "ours", "7")
    result = install_server(prefix, ours, system="Linux")
    assert result.libraries == (lib_dir / "libggml-base.so",)
    assert result.installed.patch_level == "7"
    shutil.rmtree(tmp_path / "ours")  # the installed copy must not depend on the build tree
    assert "velollm patch level: 7" in subprocess.run(
        [lib_dir / "llama-server", "--version"], capture_output=True, text=True).stderr
    restored = restore_server(prefix, system="Linux")
    assert restored.removed_libraries == (lib_dir / "libggml-base.so",)
    assert not (lib_dir / "libggml-base.so").exists()
    assert not (lib_dir / "llama-server.velollm-libs").exists()


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
