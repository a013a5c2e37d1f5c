"""Run our patched llama-server under Ollama, and put Ollama's own back.

Ollama 0.30+ starts an upstream ``llama-server`` for every GGUF model and finds it next to its
own executable: ``<prefix>/lib/ollama/llama-server`` on Linux (prefix = the directory above
``bin/ollama``), the executable's directory on macOS and ``<exe dir>/lib/ollama`` on Windows
(``llm/llama_binary.go``). No environment variable overrides that path, so the binary itself is swapped.

What is installed: our llama-server alone, as the static binary ``velollm-patch build`` makes
(BUILD_SHARED_LIBS=OFF, GGML_BACKEND_DL=OFF, its CPU and GPU backend compiled in), and nothing else in
``lib/ollama`` changes: Ollama's ``libggml-*`` and ``libllama`` stay, with every CPU variant and GPU backend
folder (``cuda_v12``, ``cuda_v13``, ``rocm_v*``, ``vulkan``), because Ollama's own executable still loads them (its
``gpu-discover`` probe dlopens ``lib/ollama/libggml-base.so`` and each backend; ``discover/native_probe_linux.go``).
Sources: ollama/ollama v0.33.0-rc2 and the llama.cpp tree of our pin. Ollama starts the server with
``LD_LIBRARY_PATH`` = its directory plus the GPU folder and ``GGML_BACKEND_PATH`` = that folder's backend
(``llm/llama_server.go`` ``SetupLlamaServerCommandEnv``). A static server loads no backend library while it
serves: ``llama_backend_init`` loads them only when none is compiled in, and of the options that load them
anyway (``--device``, ``-ot``, ``--list-devices``) Ollama's model launch passes none. So it serves with its own
ggml, which tests/test_ollama_server_swap.py checks on the real server started Ollama's way (its memory map holds
no library of Ollama's). Upstream's ``--list-devices``, which Ollama's GPU discovery runs, does load Ollama's
(``common_print_available_devices`` calls ``ggml_backend_load_all``, which scans the executable's directory and
loads ``GGML_BACKEND_PATH``) and lists devices the server will not use; our patch static-build-own-devices makes
a static build list only its own. So a build without the GPU backend Ollama would use on this machine would
move every model to the CPU: install refuses it unless forced. A build with shared libraries (Ollama's
presets) would instead have to replace Ollama's ``libggml-base``, which its GPU backends and its own executable
link against; any library of ours that Ollama ships under the same name is refused.

Before anything changes, ``install_server`` checks, each failure one line:

- the install: ``<prefix>/bin/ollama --version`` is 0.30 or newer and no newer than the newest release
  known here (:data:`~velollm_patch.ollama.versions.LATEST_KNOWN`; ``force`` passes a newer one), and the
  layout is Ollama's (a regular ``llama-server`` file beside ``libggml-base`` on Linux);
- the llama.cpp pins: Ollama's server (``--version``; :mod:`.pins` names its release) against ours: Ollama's
  compat patches and server flags are made for its own commit, so a different one is refused unless
  forced, naming a ``--source`` of ours built from Ollama's pin when a patch series supports it;
- the GPU: see above;
- the models: a model in Ollama's store that only Ollama's compat layer can load (:mod:`.compat`) would
  fail with our server, so its presence refuses the swap unless forced, naming the models and why.

Ollama's installer (``scripts/install.sh``) deletes ``lib/ollama`` before it unpacks a new release, so
upgrading Ollama drops our binary and our backup together.

The swap keeps the original as ``llama-server.velollm-orig`` (never overwritten), replaces the binary
atomically, runs the new one to verify it, and undoes every step if anything fails; restore-server puts
the original back, so ``lib/ollama`` is then byte for byte what Ollama installed.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from velollm_patch import hardware, patches, proc, source
from velollm_patch.errors import VelollmError
from velollm_patch.ollama.compat import scan_stores
from velollm_patch.ollama.pins import LlamaCppRelease, known_release, ollama_pin
from velollm_patch.ollama.store import ollama_stores
from velollm_patch.ollama.versions import ERA_C_START, LATEST_KNOWN, OllamaVersion

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


def ollama_executable(prefix: Path, system: str | None = None) -> Path:
    """The ``ollama`` executable of the install at ``prefix`` (the layouts of ``bundled_server_path``)."""
    system = system or platform.system()
    if system == "Darwin":
        return prefix / "ollama"
    if system == "Windows":
        return prefix / "ollama.exe"
    return prefix / "bin" / "ollama"


# `ollama --version` (cmd/cmd.go versionHandler) prints "ollama version is X" for the *server* that answers on
# OLLAMA_HOST, then "Warning: client version is Y" when the executable itself is another release.
_CLIENT_VERSION = re.compile(r"client version is\s+(\S+)")
_SERVER_VERSION = re.compile(r"ollama version is\s+(\S+)")
# A closed port: no server answers, so the output names the executable's own version (an Ollama serving on
# OLLAMA_HOST may be another install).
_NO_SERVER = {"OLLAMA_HOST": "127.0.0.1:9"}


@dataclass(frozen=True)
class OllamaInstall:
    prefix: Path
    executable: Path
    version: OllamaVersion | None  # None: a build from source, which says 0.0.0
    pin: LlamaCppRelease | None  # the llama.cpp release this version bundles (pins.py), if known

    def __str__(self) -> str:
        return f"Ollama {self.version or '0.0.0'}"


def parse_ollama_version(output: str) -> str | None:
    match = _CLIENT_VERSION.search(output) or _SERVER_VERSION.search(output)
    return match.group(1) if match else None


def inspect_ollama(prefix: Path, system: str | None = None) -> OllamaInstall:
    """The Ollama installed at ``prefix``, by its own ``--version``; a prefix without one is an error."""
    if not prefix.is_dir():
        raise VelollmError(f"{prefix} does not exist: pass the Ollama install prefix")
    exe = ollama_executable(prefix, system)
    if not exe.is_file():
        raise VelollmError(f"{prefix} holds no Ollama ({exe} does not exist): pass --prefix with the directory"
                           " Ollama is installed in")
    result = proc.run([exe, "--version"], env=_NO_SERVER, check=False, timeout=VERSION_TIMEOUT_S,
                      what=f"{exe} --version")
    text = parse_ollama_version(result.output)
    try:
        version = OllamaVersion.parse(text or "")
    except VelollmError:
        last = result.tail(1).strip() or "no output"
        raise VelollmError(f"{exe} --version gave no Ollama version (exit {result.returncode}): {last}") from None
    known = None if (version.major, version.minor, version.patch) == (0, 0, 0) else version
    return OllamaInstall(prefix, exe, known, ollama_pin(known) if known else None)


def _check_release(ollama: OllamaInstall, force: bool) -> str | None:
    """Refuse an Ollama without a separate llama-server; a release newer than the newest known, or one that
    does not say, only with ``force`` (then the returned line says what was overridden)."""
    where = f"{ollama} at {ollama.prefix}"
    if ollama.version is not None and ollama.version < ERA_C_START:
        raise VelollmError(f"{where} is older than {ERA_C_START} and runs no separate llama-server to replace:"
                           " upgrade Ollama")
    if ollama.version is None:
        problem = (f"Ollama at {ollama.prefix} reports version 0.0.0 (a build from source), so its release and"
                   " llama.cpp pin cannot be checked")
    elif ollama.version > LATEST_KNOWN:
        problem = (f"{where} is newer than the newest release velollm-patch knows ({LATEST_KNOWN}): its layout and"
                   " llama.cpp pin are unchecked")
    else:
        return None
    if not force:
        raise VelollmError(f"{problem}; update velollm-patch, or pass --force to install anyway")
    return problem


def _bundled(prefix: Path, system: str | None) -> Path:
    """Ollama's llama-server in a layout this module knows: a regular file, beside Ollama's shared ggml on
    Linux and Windows (``llama/server/CMakeLists.txt``: llama-server, libggml-base, libggml, libllama and the
    CPU variants in lib/ollama; GPU backends in sub-folders). Anything else is refused unchanged."""
    target = bundled_server_path(prefix, system)
    if not prefix.is_dir():
        raise VelollmError(f"{prefix} does not exist: pass the Ollama install prefix")
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise VelollmError(f"{target} is not a regular file, a layout velollm-patch does not know: install by hand")
    if not target.is_file():
        if target.parent.is_dir():
            raise VelollmError(f"{target} does not exist, a layout velollm-patch does not know (Ollama before 0.30"
                               " has no separate llama-server): upgrade Ollama, or check --prefix")
        raise VelollmError(f"{prefix} holds no Ollama 0.30+ install: {target} does not exist")
    system = system or platform.system()
    base = {"Linux": "libggml-base.so*", "Windows": "ggml-base.dll"}.get(system)
    if base and not any(target.parent.glob(base)):
        raise VelollmError(f"{target.parent} has no {base.rstrip('*')} beside llama-server, a layout velollm-patch"
                           " does not know: install by hand")
    return target


def describe_server(version: ServerVersion) -> str:
    """A llama-server's llama.cpp as people name it: ``b10488 (9d77fa172)``, else its commit."""
    release = known_release(commit=version.upstream_commit or "", build=version.build)
    if release is not None and (release.commit or not version.upstream_commit):
        return str(release)
    if version.upstream_commit:
        return f"{version.upstream_commit}" + (f" (build {version.build})" if version.build > 1 else "")
    return version.commit


def source_for(commit: str) -> str | None:
    """A ``--source`` of ours for llama.cpp ``commit``: a pinned sdist whose tree a patch series supports."""
    commit = commit.lower()
    for pin in source.PINS.values():
        if len(commit) >= 7 and (pin.commit.startswith(commit) or commit.startswith(pin.commit)):
            try:
                patches.find_series(pin.commit)
            except VelollmError:
                continue
            return f"pypi:{source.SDIST_PACKAGE}=={pin.version}"
    return None


def _check_pins(ollama: OllamaInstall, original: ServerVersion, mine: ServerVersion, force: bool) -> str | None:
    """Ours must be built from the llama.cpp Ollama's server was built from: Ollama's compat patches and the
    flags it passes are made for that commit. The line names both and what to do."""
    # A server built without git says "commit unknown"; then the release's pin says what it was built from.
    commit = original.upstream_commit or (ollama.pin.commit if ollama.pin else "")
    if commit and mine.same_upstream(ServerVersion(original.build, commit)):
        return None
    theirs = describe_server(original)
    if not original.upstream_commit and ollama.pin is not None:
        theirs = f"{ollama.pin} per its LLAMA_CPP_VERSION"
    problem = (f"{ollama}'s llama-server is llama.cpp {theirs} and ours is {describe_server(mine)}: Ollama's"
               " compat patches and server flags are made for its own")
    if force:
        return problem
    spec = source_for(commit) if commit else None
    if spec:
        raise VelollmError(f"{problem}; build ours from it with `velollm-patch build --source {spec}`, or pass --force"
                           " to install anyway")
    pins = ", ".join(s.pin for s in patches.all_series()) or "none"
    tag = known_release(commit=commit, build=original.build)
    raise VelollmError(f"{problem}; velollm-patch has no patch series for {tag.tag if tag else theirs} (series exist"
                       f" for {pins}), so pass --force to install anyway")


# GPU backend folders in lib/ollama (llama/server/CMakePresets.json OLLAMA_RUNNER_DIR) and the family each
# serves; the libraries a server linking that family's runtime needs.
_GPU_FOLDERS = ((re.compile(r"cuda_(?:v\d+|jetpack\d+)"), "cuda"), (re.compile(r"rocm(?:_v\w+)?"), "rocm"),
                (re.compile(r"vulkan"), "vulkan"))
_GPU_RUNTIMES = ((re.compile(r"lib(?:cuda|cudart|cublas)\.so"), "cuda"),
                 (re.compile(r"lib(?:amdhip64|hipblas|rocblas)\.so"), "rocm"), (re.compile(r"libvulkan\.so"), "vulkan"))


def ollama_gpu_folders(lib_dir: Path) -> dict[str, list[str]]:
    """Ollama's GPU backend folders beside its llama-server, by family (``cuda``: ``cuda_v12``, ...)."""
    found: dict[str, list[str]] = {}
    for entry in sorted(lib_dir.iterdir()):
        for pattern, family in _GPU_FOLDERS:
            if entry.is_dir() and pattern.fullmatch(entry.name):
                found.setdefault(family, []).append(entry.name)
    return found


def gpu_families_from_ldd(output: str) -> frozenset[str]:
    """The GPU backend families whose runtimes an ``ldd`` listing shows."""
    return frozenset(family for pattern, family in _GPU_RUNTIMES if pattern.search(output))


def server_gpu_families(binary: Path) -> frozenset[str]:
    """The GPU backends compiled into a static llama-server, by the GPU runtimes it links (per ``ldd``)."""
    try:
        return gpu_families_from_ldd(proc.run(["ldd", binary], check=False, timeout=30, what="ldd").output)
    except VelollmError:
        return frozenset()


def machine_gpu_families(probes: hardware.Probes | None = None) -> frozenset[str]:
    """The GPU backend families this machine has a device for: NVIDIA (CUDA), AMD (ROCm), and a Vulkan GPU
    (not a software rasterizer, which ggml-vulkan skips unless named)."""
    p = probes or hardware.Probes()
    vendors = {gpu.vendor for gpu in (*p.nvidia(), *p.amd())}
    families = {family for vendor, family in (("nvidia", "cuda"), ("amd", "rocm")) if vendor in vendors}
    if any(not device.is_software for device in p.vulkan()):
        families.add("vulkan")
    return frozenset(families)


def _check_gpu(lib_dir: Path, ours: Path, machine: frozenset[str], force: bool) -> str | None:
    """Refuse a server that lacks every GPU backend Ollama would run this machine's GPU with: it would load
    none of Ollama's while serving, so every model would move to the CPU."""
    folders = ollama_gpu_folders(lib_dir)
    usable = {family: names for family, names in folders.items() if family in machine}
    if not usable:
        return None
    have = server_gpu_families(ours)
    if have & usable.keys():
        return None
    names = ", ".join(name for names in usable.values() for name in names)
    built = "/".join(sorted(have)) or "CPU-only"
    problem = (f"this machine's GPU runs under Ollama on its {names} backend, which our {built} llama-server lacks"
               " (a static server loads none of Ollama's): every model would run on the CPU")
    if force:
        return problem
    raise VelollmError(f"{problem}; build ours with `velollm-patch build --gpu {sorted(usable)[0]}`, or pass --force"
                       " to install anyway")


def _check_models(stores: Sequence[Path], force: bool) -> tuple[str | None, tuple[str, ...]]:
    """Refuse while Ollama's store holds models only Ollama's compat layer loads; also say what could not be
    read (those stay unchecked)."""
    scan = scan_stores(stores)
    unchecked = tuple(f"could not check {what}" for what in scan.unreadable)
    if not scan.needs_compat:
        return None, unchecked
    listed = "; ".join(f"{m.name}: {m.reason}" for m in scan.needs_compat)
    problem = (f"{len(scan.needs_compat)} model(s) in Ollama's store load only through Ollama's llama.cpp compat"
               f" layer, which our llama-server lacks ({listed})")
    if force:
        return problem, unchecked
    raise VelollmError(f"{problem}; remove them, or re-create them from llama.cpp-converted GGUFs, or pass --force"
                       " to install anyway")


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
    overridden: tuple[str, ...] = ()  # the refusals --force passed
    changed: bool = True
    ollama: OllamaInstall | None = None
    unchecked: tuple[str, ...] = ()  # what could not be checked (an unreadable model)

    @property
    def forced(self) -> bool:
        return bool(self.overridden)


def install_server(prefix: Path, our_server: Path, force: bool = False, *, system: str | None = None,
                   on_recovery: Callable[[str], None] | None = None, stores: Sequence[Path] | None = None,
                   machine_gpus: frozenset[str] | None = None) -> InstallResult:
    """Make Ollama under ``prefix`` run ``our_server`` instead of its bundled llama-server.

    Every check (module docstring) runs before anything changes; ``force`` passes those that allow it.
    ``stores`` are the model stores to search (default: :func:`~velollm_patch.ollama.store.ollama_stores`),
    ``machine_gpus`` the GPU families this machine has (default: :func:`machine_gpu_families`). What an
    interrupted earlier run left is finished or undone afterwards, and told to ``on_recovery``."""
    system = system or platform.system()
    ollama = inspect_ollama(prefix, system)
    overridden = [p for p in (_check_release(ollama, force),) if p]
    target = _bundled(prefix, system)
    files = _files(target)
    ours = our_server.resolve()
    if not ours.is_file() or not os.access(ours, os.X_OK):
        raise VelollmError(f"{our_server} is not an executable llama-server")
    if ours == target.resolve():
        raise VelollmError(f"{our_server} is Ollama's installed llama-server itself")
    # The backup, when there is one, is Ollama's original (never overwritten), also before recovery.
    original = server_version(files.backup if files.backup.exists() else target)
    mine = server_version(ours)
    pins = _check_pins(ollama, original, mine, force)
    gpu = None
    if system == "Linux":
        machine = machine_gpu_families() if machine_gpus is None else machine_gpus
        gpu = _check_gpu(target.parent, ours, machine, force)
    models, unchecked = _check_models(ollama_stores() if stores is None else stores, force)
    overridden += [p for p in (pins, gpu, models) if p]
    libs = _libs_to_copy(ours, target.parent) if system == "Linux" else []
    _require_writable(target.parent)
    _heal(files, on_recovery)
    if files.backup.exists() and filecmp.cmp(ours, target, shallow=False):
        return InstallResult(target, files.backup, original, mine, overridden=tuple(overridden), changed=False,
                             ollama=ollama, unchecked=unchecked)
    try:
        if not files.backup.exists():
            _link_or_copy(target, files.backup, files.new)
        _link_or_copy(target, files.prev, files.new)
        if libs:
            listed = _names(files.manifest)
            _write_names(files.prev_manifest, listed, files.new)
            # Listed before they are copied, so no interruption leaves a library of ours unlisted.
            _write_names(files.manifest, [*listed, *(dest.name for _, dest in libs)], files.new)
            for source_lib, dest in libs:
                shutil.copy2(source_lib, files.new)
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
                         overridden=tuple(overridden), ollama=ollama, unchecked=unchecked)


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
