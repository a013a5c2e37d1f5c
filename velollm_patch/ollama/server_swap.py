"""Run our patched llama-server under Ollama, and put Ollama's own back.

Ollama 0.30+ starts an upstream ``llama-server`` for every GGUF model and finds it next to its
own executable: ``<prefix>/lib/ollama/llama-server`` on Linux (prefix = the directory above
``bin/ollama``), the executable's directory on macOS and ``<exe dir>/lib/ollama`` on Windows.
No environment variable overrides that path, so the binary itself is swapped.

The swap refuses a build of a different upstream llama.cpp commit than Ollama's (Ollama's
compat patches and CLI contract are pinned to it) unless forced, keeps the original as
``llama-server.velollm-orig`` (never overwritten), replaces the binary atomically, runs the new
one to verify it, and undoes every step if anything fails.
"""

from __future__ import annotations

import filecmp
import os
import platform
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from velollm_patch import proc
from velollm_patch.errors import VelollmError

BACKUP_SUFFIX = ".velollm-orig"
# Names of the shared libraries we added next to Ollama's binary, so restore can remove them.
LIBS_MANIFEST_SUFFIX = ".velollm-libs"
VERSION_TIMEOUT_S = 60.0

# `llama-server --version` prints to stderr "version: 0.5.0-dev (build N, commit X)"; older
# builds printed "version: N (sha)". Our patch adds "velollm patch level: L".
_VERSION_NEW = re.compile(r"^version:\s*(\S+)\s+\(build\s+(\d+),\s*commit\s+([^)\s]+)\)", re.M)
_VERSION_OLD = re.compile(r"^version:\s*(\d+)\s+\(([^)\s]+)\)", re.M)
_PATCH_LEVEL = re.compile(r"^velollm patch level:\s*(\S+)", re.M)
_HEX_PREFIX = re.compile(r"[0-9a-fA-F]{7,40}")
# Shared libraries a llama.cpp build produces; anything else a binary links is the system's.
_LLAMA_LIB = re.compile(r"lib(?:llama|ggml|mtmd)[\w.+-]*\.so(?:\.[\d.]+)?")


@dataclass(frozen=True)
class ServerVersion:
    """What ``llama-server --version`` reports."""

    build: int
    commit: str
    release: str = ""  # "0.5.0-dev"; empty in the older format
    patch_level: str = ""  # ours only

    @property
    def upstream_commit(self) -> str | None:
        """The llama.cpp commit the build is from: the hex prefix of ``commit`` (our builds
        stamp e.g. ``0c1e570+velollm-v1``); None for ``unknown`` (built without git)."""
        match = _HEX_PREFIX.match(self.commit)
        return match.group(0).lower() if match else None

    def same_upstream(self, other: ServerVersion) -> bool:
        mine, theirs = self.upstream_commit, other.upstream_commit
        if mine is None or theirs is None:
            return False
        return mine.startswith(theirs) or theirs.startswith(mine)

    def __str__(self) -> str:
        text = f"build {self.build}, commit {self.commit}"
        if self.release:
            text = f"{self.release} ({text})"
        return f"{text}, velollm patch level {self.patch_level}" if self.patch_level else text


def parse_server_version(output: str) -> ServerVersion | None:
    level = _PATCH_LEVEL.search(output)
    patch_level = level.group(1) if level else ""
    new = _VERSION_NEW.search(output)
    if new:
        return ServerVersion(int(new.group(2)), new.group(3), new.group(1), patch_level)
    old = _VERSION_OLD.search(output)
    if old:
        return ServerVersion(int(old.group(1)), old.group(2), "", patch_level)
    return None


def server_version(binary: Path) -> ServerVersion:
    """Run ``binary --version`` and parse it; a binary that cannot run or says no version is
    an error (that is also how a missing shared library shows up)."""
    result = proc.run([binary, "--version"], check=False, timeout=VERSION_TIMEOUT_S,
                      what=f"{binary} --version")
    version = parse_server_version(result.output)
    if version is None:
        last = result.tail(1).strip() or "no output"
        raise VelollmError(f"{binary} --version gave no version (exit {result.returncode}): {last}")
    return version


def bundled_server_path(prefix: Path, system: str | None = None) -> Path:
    """Where Ollama looks for llama-server (``llm/llama_binary.go``)."""
    system = system or platform.system()
    if system == "Darwin":
        return prefix / "llama-server"
    if system == "Windows":
        return prefix / "lib" / "ollama" / "llama-server.exe"
    return prefix / "lib" / "ollama" / "llama-server"


def default_prefix(system: str | None = None) -> Path:
    """The prefix of the ``ollama`` on PATH: the directory above ``bin/`` on Linux, the
    executable's own directory on macOS and Windows."""
    system = system or platform.system()
    found = shutil.which("ollama")
    if found is None:
        raise VelollmError("ollama is not on PATH: pass --prefix with the Ollama install directory")
    exe_dir = Path(found).resolve().parent
    return exe_dir if system in ("Darwin", "Windows") else exe_dir.parent


def _bundled(prefix: Path, system: str | None) -> Path:
    target = bundled_server_path(prefix, system)
    if target.is_file():
        return target
    if not prefix.is_dir():
        raise VelollmError(f"{prefix} does not exist: pass the Ollama install prefix")
    if target.parent.is_dir():
        raise VelollmError(
            f"{target} does not exist: Ollama before 0.30 has no separate llama-server; upgrade Ollama")
    raise VelollmError(f"{prefix} holds no Ollama 0.30+ install: {target} does not exist")


def _require_writable(directory: Path) -> None:
    if not os.access(directory, os.W_OK | os.X_OK):
        raise VelollmError(f"no permission to write {directory} (run with sudo)")


def _libs_to_copy(ours: Path, dest_dir: Path) -> list[tuple[Path, Path]]:
    """Shared libraries from our llama.cpp build that ``ours`` loads (per ``ldd``) and that are
    not already next to Ollama's binary. A static build (BUILD_SHARED_LIBS=OFF) needs none.
    A library Ollama ships under the same name with other contents is never replaced."""
    try:
        result = proc.run(["ldd", ours], check=False, timeout=30, what="ldd")
    except VelollmError:
        return []  # no ldd: the verification run after the swap still catches a missing library
    tree = ours.parent.parent
    pairs: list[tuple[Path, Path]] = []
    for line in result.output.splitlines():
        name, arrow, where = line.strip().partition(" => ")
        if not arrow or not _LLAMA_LIB.fullmatch(name):
            continue
        location = where.split(" (", 1)[0].strip()
        if location == "not found":
            source = ours.parent / name
            if not source.is_file():
                raise VelollmError(f"{ours} needs {name}, which is neither installed nor next to it")
        else:
            source = Path(location).resolve()
            if not source.is_relative_to(tree.resolve()):
                continue
        dest = dest_dir / name
        if dest.exists():
            if filecmp.cmp(source, dest, shallow=False):
                continue
            raise VelollmError(
                f"{ours} needs its own {name}, but Ollama ships a different {dest}: build llama-server"
                " with BUILD_SHARED_LIBS=OFF")
        pairs.append((source, dest))
    return pairs


def _link_or_copy(source: Path, dest: Path) -> None:
    """A second name for ``source`` that never replaces an existing ``dest``: a hard link, or
    an exclusive-create copy where the file system has no hard links."""
    try:
        os.link(source, dest)
    except FileExistsError:
        raise  # an existing dest is never replaced, not even by the copy below
    except OSError:
        with source.open("rb") as src, dest.open("xb") as out:
            shutil.copyfileobj(src, out)
        shutil.copystat(source, dest)


@dataclass(frozen=True)
class InstallResult:
    target: Path
    backup: Path
    original: ServerVersion
    installed: ServerVersion
    libraries: tuple[Path, ...] = ()
    forced: bool = False  # the upstream commits differ and --force allowed it
    changed: bool = True


def install_server(prefix: Path, our_server: Path, force: bool = False, *,
                   system: str | None = None) -> InstallResult:
    """Make Ollama under ``prefix`` run ``our_server`` instead of its bundled llama-server."""
    target = _bundled(prefix, system)
    backup = target.with_name(target.name + BACKUP_SUFFIX)
    ours = our_server.resolve()
    if not ours.is_file() or not os.access(ours, os.X_OK):
        raise VelollmError(f"{our_server} is not an executable llama-server")
    if ours == target.resolve():
        raise VelollmError(f"{our_server} is Ollama's installed llama-server itself")
    original = server_version(backup if backup.exists() else target)
    mine = server_version(ours)
    if not original.same_upstream(mine) and not force:
        raise VelollmError(
            f"Ollama's llama-server is llama.cpp {original.upstream_commit or original.commit}, ours is"
            f" {mine.upstream_commit or mine.commit}: Ollama's patches and flags are pinned to its"
            " commit; rebuild from it, or pass --force to install anyway")
    if backup.exists() and filecmp.cmp(ours, target, shallow=False):
        return InstallResult(target, backup, original, mine, forced=not original.same_upstream(mine),
                             changed=False)
    libs = _libs_to_copy(ours, target.parent) if (system or platform.system()) == "Linux" else []
    _require_writable(target.parent)
    prev = target.with_name(f".{target.name}.velollm-prev")
    new = target.with_name(f".{target.name}.velollm-new")
    if prev.exists():
        raise VelollmError(f"{prev} is left from an interrupted install: check it, then remove it")
    created: list[Path] = []
    try:
        if not backup.exists():
            _link_or_copy(target, backup)
            created.append(backup)
        for source, dest in libs:
            shutil.copy2(source, new)
            os.replace(new, dest)
            created.append(dest)
        _link_or_copy(target, prev)
        shutil.copy2(ours, new)
        os.chmod(new, target.stat().st_mode & 0o7777 | 0o111)
        os.replace(new, target)
        installed = server_version(target)
        if (installed.build, installed.commit) != (mine.build, mine.commit):
            raise VelollmError(f"the installed binary reports {installed}, expected {mine}")
        if libs:
            _add_to_manifest(target, [dest.name for _, dest in libs])
        prev.unlink()
    except (OSError, VelollmError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        try:
            if prev.exists():
                os.replace(prev, target)
            new.unlink(missing_ok=True)
            for path in reversed(created):
                path.unlink(missing_ok=True)
        except OSError as undo:
            raise VelollmError(
                f"installing {ours} failed ({reason}) and so did undoing it ({undo.strerror or undo}):"
                f" copy {backup} back to {target} by hand") from exc
        raise VelollmError(f"installing {ours} failed and was undone: {reason}") from exc
    return InstallResult(target, backup, original, installed, tuple(dest for _, dest in libs),
                         forced=not original.same_upstream(mine))


def _manifest(target: Path) -> Path:
    return target.with_name(target.name + LIBS_MANIFEST_SUFFIX)


def _add_to_manifest(target: Path, names: list[str]) -> None:
    path = _manifest(target)
    existing = path.read_text(encoding="utf-8").split() if path.exists() else []
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{n}\n" for n in dict.fromkeys([*existing, *names])), encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True)
class RestoreResult:
    target: Path
    restored: ServerVersion
    removed_libraries: tuple[Path, ...] = ()


def restore_server(prefix: Path, *, system: str | None = None) -> RestoreResult:
    """Put Ollama's original llama-server back and remove the libraries we added."""
    target = bundled_server_path(prefix, system)
    backup = target.with_name(target.name + BACKUP_SUFFIX)
    if not backup.is_file():
        if not target.is_file():
            _bundled(prefix, system)  # raises the "no Ollama here" error
        raise VelollmError(f"no {backup.name} next to {target}: Ollama's llama-server was never replaced")
    _require_writable(target.parent)
    version = server_version(backup)
    manifest = _manifest(target)
    names = manifest.read_text(encoding="utf-8").split() if manifest.exists() else []
    try:
        os.replace(backup, target)
    except OSError as exc:
        raise VelollmError(f"cannot restore {target}: {exc.strerror or exc}") from exc
    removed = []
    for name in names:
        lib = target.parent / name
        lib.unlink(missing_ok=True)
        removed.append(lib)
    manifest.unlink(missing_ok=True)
    return RestoreResult(target, version, tuple(removed))
