"""Run our patched llama-server under Ollama, and put Ollama's own back.

Ollama 0.30+ starts an upstream ``llama-server`` for every GGUF model and finds it next to its
own executable: ``<prefix>/lib/ollama/llama-server`` on Linux (prefix = the directory above
``bin/ollama``), the executable's directory on macOS and ``<exe dir>/lib/ollama`` on Windows.
No environment variable overrides that path, so the binary itself is swapped.

The swap refuses a build of a different upstream llama.cpp commit than Ollama's (Ollama's
compat patches and CLI contract are pinned to it) unless forced, keeps the original as
``llama-server.velollm-orig`` (never overwritten), replaces the binary atomically, runs the new
one to verify it, and undoes every step if anything fails.

Interruptions. A ``kill -9``, a closed terminal or a power cut can stop a run between any two
of its steps, and nothing runs the undo then. So every change to a name that matters is one
rename, link or unlink (copies are staged under a temporary name), and the names present say how
far the run got: the next install-server or restore-server finishes or rolls it back before its
own work, and prints a line saying which. At every point the target path holds a complete
llama-server, and Ollama's original is the target or the backup; a binary put back there has
answered ``--version`` first. The names, next to llama-server, in the order install creates them:

``llama-server.velollm-orig``
    The backup, made (as a hard link) before anything changes. Identical to the target it backs
    nothing up: left by an install stopped before the swap, or by an older restore that renamed
    a hard link onto its own file (POSIX does nothing then). Removed.
``.llama-server.velollm-prev``
    The binary being replaced, kept until the new one has run. While it exists the install has
    not committed, so it is rolled back: the new binary was never verified, install-server redoes
    the whole swap afterwards (finishing instead would only skip the check), and restore-server
    wants the original anyway.
``.llama-server.velollm-libs.velollm-prev``
    The library manifest before an install that brings libraries. Rollback removes the libraries not listed there.
    Present without ``-prev``: the run was stopped inside its commit (deleting ``-prev``, then
    this), after verification, so the install is finished.
``llama-server.velollm-libs``
    The libraries we added, rewritten *before* they are copied, so none of ours is ever unlisted.
    Without a backup it is what a restore stopped after putting the original back had left to
    delete, so that restore is finished.
``.llama-server.velollm-new``
    The one staging name for every copy (the backup or ``-prev`` where hard links fail, the
    manifests, each library, the new binary), renamed into place when complete. Any copy found
    there is unfinished: deleted.

Canonical layouts are never-installed (the target alone) and installed (target, a different
backup, manifest if any libraries); recovery always ends in one of them.
"""

from __future__ import annotations

import filecmp
import os
import platform
import re
import shutil
from collections.abc import Callable
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

    @property
    def patches(self) -> frozenset[str]:
        """The names of our patches the build carries (``velollm-L:name,name,...``); empty for others."""
        _, _, names = self.patch_level.partition(":")
        return frozenset(n for n in names.split(",") if n)

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


def installed_server(prefix: Path | None = None, *, system: str | None = None) -> ServerVersion | None:
    """The llama-server the Ollama under ``prefix`` runs (default: the ``ollama`` on PATH); None when no
    prefix is given and no ollama is on PATH."""
    if prefix is None:
        if shutil.which("ollama") is None:
            return None
        prefix = default_prefix(system)
    return server_version(_bundled(prefix, system))


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


@dataclass(frozen=True)
class _Files:
    """The names a swap uses next to Ollama's llama-server; the module docstring says why each."""

    target: Path
    backup: Path
    prev: Path
    new: Path
    manifest: Path
    prev_manifest: Path


def _files(target: Path) -> _Files:
    manifest = target.with_name(target.name + LIBS_MANIFEST_SUFFIX)
    return _Files(target, target.with_name(target.name + BACKUP_SUFFIX),
                  target.with_name(f".{target.name}.velollm-prev"), target.with_name(f".{target.name}.velollm-new"),
                  manifest, manifest.with_name(f".{manifest.name}.velollm-prev"))


def _reason(exc: OSError | VelollmError) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _same(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` hold the same bytes; hard links of one file do without a read."""
    return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)


def _put_back(saved: Path, target: Path) -> None:
    """Move ``saved`` onto ``target``. Renaming a hard link onto another name of the same file
    does nothing on POSIX and leaves both names, so then ``saved`` is just removed."""
    if target.exists() and os.path.samefile(saved, target):
        saved.unlink()
    else:
        os.replace(saved, target)


def _link_or_copy(source: Path, dest: Path, tmp: Path) -> None:
    """A second, complete copy of ``source`` appearing at ``dest`` in one step, so that recovery
    never finds half a binary under a name it trusts: a hard link, or where the file system has
    none, a copy to ``tmp`` renamed into place."""
    try:
        os.link(source, dest)
    except FileExistsError:
        raise  # an existing dest is never replaced, not even by the copy below
    except OSError:
        shutil.copy2(source, tmp)
        os.replace(tmp, dest)


def _names(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split() if path.exists() else []


def _write_names(path: Path, names: list[str], tmp: Path) -> None:
    tmp.write_text("".join(f"{n}\n" for n in dict.fromkeys(names)), encoding="utf-8")
    os.replace(tmp, path)


def _remove_our_libraries(files: _Files) -> tuple[Path, ...]:
    """Delete the libraries the manifest lists, then the manifest, which until then says what is
    left to delete."""
    removed = tuple(files.target.parent / name for name in _names(files.manifest))
    for lib in removed:
        lib.unlink(missing_ok=True)
    files.manifest.unlink(missing_ok=True)
    return removed


def _roll_back(files: _Files) -> None:
    """Undo an install that has not committed. Each step can be repeated and leaves a state this
    undoes too, so a rollback that is itself interrupted is finished by the next run."""
    files.new.unlink(missing_ok=True)
    if files.prev_manifest.exists():
        before = _names(files.prev_manifest)
        for name in set(_names(files.manifest)) - set(before):
            (files.target.parent / name).unlink(missing_ok=True)
        if before:
            os.replace(files.prev_manifest, files.manifest)
        else:
            files.manifest.unlink(missing_ok=True)
            files.prev_manifest.unlink()
    if files.prev.exists():
        _put_back(files.prev, files.target)
    # Only now that the target is the binary the install replaced: a backup identical to it
    # backs nothing up (the install started from Ollama's own), and until then it may have been
    # the one copy of the original besides -prev.
    if files.backup.exists() and _same(files.backup, files.target):
        files.backup.unlink()


def _recover(files: _Files) -> str | None:
    """Finish or undo what an interrupted install-server or restore-server left, ending in an
    installed or a never-installed layout; say which, or None when nothing was left."""
    if files.prev.exists():
        swapped = not _same(files.prev, files.target)
        if swapped:
            # Only a binary that runs is put back; -prev appears complete in one step, so one that
            # does not run was not left by this code, and a person has to look.
            try:
                server_version(files.prev)
            except (OSError, VelollmError) as exc:
                raise VelollmError(
                    f"{files.prev} is left from an interrupted install-server but does not run ({_reason(exc)}):"
                    f" check that {files.target} runs, then remove {files.prev}") from exc
        _roll_back(files)
        if swapped:
            return "rolled back an install-server interrupted before its new llama-server was verified"
        return "rolled back an install-server interrupted before it replaced llama-server"
    if files.prev_manifest.exists():
        files.prev_manifest.unlink()
        return "finished an install-server interrupted after its new llama-server was verified"
    if files.manifest.exists() and not files.backup.exists():
        removed = _remove_our_libraries(files)
        return ("finished a restore-server interrupted after Ollama's llama-server was back: removed"
                f" {', '.join(lib.name for lib in removed)}")
    leftovers = [files.new] if files.new.exists() else []
    if files.backup.exists() and _same(files.backup, files.target):
        leftovers.append(files.backup)
    if leftovers:
        _roll_back(files)
        return f"removed {', '.join(p.name for p in leftovers)}, left by an interrupted run"
    return None


def _heal(files: _Files, on_recovery: Callable[[str], None] | None) -> str | None:
    try:
        note = _recover(files)
    except OSError as exc:
        raise VelollmError(
            f"cannot clean up after an interrupted install-server or restore-server in {files.target.parent}"
            f" ({_reason(exc)}): run it again with permission to write there (sudo)") from exc
    if note and on_recovery:
        on_recovery(note)
    return note


@dataclass(frozen=True)
class InstallResult:
    target: Path
    backup: Path
    original: ServerVersion
    installed: ServerVersion
    libraries: tuple[Path, ...] = ()
    forced: bool = False  # the upstream commits differ and --force allowed it
    changed: bool = True


def install_server(prefix: Path, our_server: Path, force: bool = False, *, system: str | None = None,
                   on_recovery: Callable[[str], None] | None = None) -> InstallResult:
    """Make Ollama under ``prefix`` run ``our_server`` instead of its bundled llama-server. What
    an interrupted earlier run left is finished or undone first, and told to ``on_recovery``."""
    target = _bundled(prefix, system)
    files = _files(target)
    ours = our_server.resolve()
    if not ours.is_file() or not os.access(ours, os.X_OK):
        raise VelollmError(f"{our_server} is not an executable llama-server")
    if ours == target.resolve():
        raise VelollmError(f"{our_server} is Ollama's installed llama-server itself")
    _heal(files, on_recovery)
    original = server_version(files.backup if files.backup.exists() else target)
    mine = server_version(ours)
    if not original.same_upstream(mine) and not force:
        raise VelollmError(
            f"Ollama's llama-server is llama.cpp {original.upstream_commit or original.commit}, ours is"
            f" {mine.upstream_commit or mine.commit}: Ollama's patches and flags are pinned to its"
            " commit; rebuild from it, or pass --force to install anyway")
    if files.backup.exists() and filecmp.cmp(ours, target, shallow=False):
        return InstallResult(target, files.backup, original, mine, forced=not original.same_upstream(mine),
                             changed=False)
    libs = _libs_to_copy(ours, target.parent) if (system or platform.system()) == "Linux" else []
    _require_writable(target.parent)
    try:
        if not files.backup.exists():
            _link_or_copy(target, files.backup, files.new)
        _link_or_copy(target, files.prev, files.new)
        if libs:
            listed = _names(files.manifest)
            _write_names(files.prev_manifest, listed, files.new)
            # Listed before they are copied, so no interruption leaves a library of ours unlisted.
            _write_names(files.manifest, [*listed, *(dest.name for _, dest in libs)], files.new)
            for source, dest in libs:
                shutil.copy2(source, files.new)
                os.replace(files.new, dest)
        shutil.copy2(ours, files.new)
        os.chmod(files.new, target.stat().st_mode & 0o7777 | 0o111)
        os.replace(files.new, target)
        installed = server_version(target)
        if (installed.build, installed.commit) != (mine.build, mine.commit):
            raise VelollmError(f"the installed binary reports {installed}, expected {mine}")
        files.prev.unlink()  # the commit: from here on an interrupted install is finished, not undone
        files.prev_manifest.unlink(missing_ok=True)
    except (OSError, VelollmError, KeyboardInterrupt) as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else _reason(exc)
        try:
            _roll_back(files)
        except OSError as undo:
            raise VelollmError(
                f"installing {ours} failed ({reason}) and so did undoing it ({_reason(undo)}): fix that, then run"
                " `velollm-patch ollama restore-server`") from exc
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise VelollmError(f"installing {ours} failed and was undone: {reason}") from exc
    return InstallResult(target, files.backup, original, installed, tuple(dest for _, dest in libs),
                         forced=not original.same_upstream(mine))


@dataclass(frozen=True)
class RestoreResult:
    target: Path
    restored: ServerVersion
    removed_libraries: tuple[Path, ...] = ()


def restore_server(prefix: Path, *, system: str | None = None,
                   on_recovery: Callable[[str], None] | None = None) -> RestoreResult:
    """Put Ollama's original llama-server back and remove the libraries we added. What an
    interrupted earlier run left is finished or undone first, and told to ``on_recovery``."""
    target = _bundled(prefix, system)
    files = _files(target)
    healed = _heal(files, on_recovery)
    if not files.backup.is_file():
        if healed:  # what was interrupted started from Ollama's own, and that is in place again
            return RestoreResult(target, server_version(target))
        raise VelollmError(f"no {files.backup.name} next to {target}: Ollama's llama-server was never replaced")
    _require_writable(target.parent)
    version = server_version(files.backup)
    try:
        # The binary first: our libraries must stay until the target no longer needs them.
        _put_back(files.backup, target)
        removed = _remove_our_libraries(files)
    except OSError as exc:
        raise VelollmError(
            f"cannot restore {target}: {_reason(exc)}; fix that, then run restore-server again") from exc
    return RestoreResult(target, version, removed)
