"""Where llama.cpp comes from: fetch a tree once, keep it read-only in the cache, hand out fresh copies.

Source specs:

* ``pypi:llama-cpp-python==0.3.36`` (the default): the tree vendored in llama-cpp-python's sdist,
  downloaded with pip (so the user's index settings apply) and checked against :data:`PINS`.
* ``sdist:PATH``: the same sdist already on disk, for machines without PyPI.
* ``git:URL@REF``: a git checkout, for users who track upstream.
* ``path:DIR``: a local llama.cpp directory, used as it is.

A fetched tree is never modified; builds patch a fresh copy (:func:`fresh_copy`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from velollm_patch import proc
from velollm_patch.errors import VelollmError
from velollm_patch.files import sha256_file
from velollm_patch.paths import Paths, ensure_dir


@dataclass(frozen=True)
class SdistPin:
    """A llama-cpp-python release whose sdist we trust, and the llama.cpp commit it vendors."""

    version: str
    sha256: str
    commit: str


# The one place that pins upstream. Add a release here to support its tree.
PINS: dict[str, SdistPin] = {
    # llama.cpp b10454 (mid-August 2026), days before Ollama 0.32.15-0.33's b10488 (ollama/pins.py).
    "0.3.35": SdistPin(
        version="0.3.35",
        sha256="1139dbb54509074b70893fab8554e3b079aa9f4d312058ce4018ef0019e3de12",
        commit="4df29be4f4c3673f428170fda944a5b19f743bb8",
    ),
    "0.3.36": SdistPin(
        version="0.3.36",
        sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
        commit="0c1e57098bba43ac29e6e3b677cdceebdd22334f",
    ),
}
DEFAULT_PIN = "0.3.36"
DEFAULT_SOURCE = f"pypi:llama-cpp-python=={DEFAULT_PIN}"
SDIST_PACKAGE = "llama-cpp-python"
VENDOR_DIR = "vendor/llama.cpp"

# What a build of our targets needs; everything else (docs, models, tests, UI sources) stays behind. All of
# tools/: its CMakeLists.txt adds every tool's directory, and configuring fails on any one missing (the small
# ones add ~0.2 MB to the tarball); the script that embeds the web UI into llama-server.
TRIMMED_PATHS = (
    "CMakeLists.txt", "cmake", "common", "ggml", "include", "src", "vendor", "licenses", "LICENSE", "tools",
    "scripts/ui-assets.cmake",
)
# Written into a trimmed export: the tree has no .git, and without its upstream commit a ``path:`` source of
# it could not be patched (the series is chosen by commit) on the machine it was shipped to.
EXPORT_MARKER = "velollm-source.json"


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "pypi" | "sdist" | "git" | "path"
    location: str  # version, file, URL or directory
    ref: str | None = None  # git ref

    @classmethod
    def parse(cls, text: str) -> SourceSpec:
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise VelollmError(
                f"source '{text}' is not understood: use pypi:llama-cpp-python==VERSION, sdist:FILE, "
                "git:URL@REF or path:DIR"
            )
        if kind == "pypi":
            name, _, version = rest.partition("==")
            if name != SDIST_PACKAGE or not version:
                raise VelollmError(f"source '{text}': only pypi:{SDIST_PACKAGE}==VERSION is supported")
            return cls("pypi", version)
        if kind == "sdist":
            return cls("sdist", str(Path(rest).expanduser().resolve()))
        if kind == "git":
            url, at, ref = rest.rpartition("@")
            # "git@host:repo" has an @ before the path; a ref never contains "/" followed by ":".
            if not at or not url or ":" in ref or not ref:
                raise VelollmError(f"source '{text}': give a ref, as git:URL@REF (a tag, branch or commit)")
            return cls("git", url, ref)
        if kind == "path":
            return cls("path", str(Path(rest).expanduser().resolve()))
        raise VelollmError(f"source kind '{kind}' is unknown: use pypi:, sdist:, git: or path:")

    def __str__(self) -> str:
        if self.kind == "pypi":
            return f"pypi:{SDIST_PACKAGE}=={self.location}"
        if self.kind == "git":
            return f"git:{self.location}@{self.ref}"
        return f"{self.kind}:{self.location}"

    @property
    def cache_id(self) -> str:
        """A directory name that is stable for the same spec."""
        if self.kind == "pypi":
            return f"pypi-{self.location}"
        digest = hashlib.sha256(str(self).encode()).hexdigest()[:12]
        return f"{self.kind}-{digest}"


@dataclass(frozen=True)
class Source:
    """A fetched llama.cpp tree. ``tree`` is read-only (except ``path:`` trees, which are the user's)."""

    spec: str
    tree: Path
    commit: str | None  # full upstream commit when known
    llama_version: str | None  # LLAMA_VERSION from CMakeLists.txt
    sdist_sha256: str | None
    fetched_at: str

    @property
    def short_commit(self) -> str | None:
        return self.commit[:7] if self.commit else None

    def to_dict(self) -> dict[str, str | None]:
        data = asdict(self)
        data["tree"] = str(self.tree)
        return data


def fetch(spec_text: str, paths: Paths) -> Source:
    """Return the cached tree for ``spec_text``, fetching it first if needed.

    Fetching happens in a temporary directory inside the cache and is moved into place only once
    complete and verified, so an interrupted or failed fetch leaves the cache as it was.
    """
    spec = SourceSpec.parse(spec_text)
    if spec.kind == "path":
        return _local_source(spec)
    entry = paths.sources / spec.cache_id
    meta_file = entry / "source.json"
    if meta_file.is_file():
        return _read_meta(meta_file)
    ensure_dir(paths.sources)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.cache_id}-", dir=paths.sources))
    try:
        if spec.kind == "pypi":
            sdist = _download_sdist(spec.location, tmp, paths)
            source = _extract_sdist(sdist, spec, tmp / "tree")
        elif spec.kind == "sdist":
            source = _extract_sdist(Path(spec.location), spec, tmp / "tree")
        else:
            source = _clone_git(spec, tmp / "tree")
        _make_files_read_only(tmp / "tree")
        final = replace(source, tree=entry / "tree")
        (tmp / "source.json").write_text(json.dumps(final.to_dict(), indent=2) + "\n")
        try:
            os.replace(tmp, entry)
        except OSError:
            # Another process fetched the same source meanwhile; theirs is as good as ours.
            if not meta_file.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _read_meta(meta_file)


def list_sources(paths: Paths) -> list[Source]:
    if not paths.sources.is_dir():
        return []
    found = [
        _read_meta(entry / "source.json")
        for entry in sorted(paths.sources.iterdir())
        if (entry / "source.json").is_file()
    ]
    return found


def fresh_copy(source: Source, dest: Path) -> Path:
    """Copy the tree to ``dest`` (which must not exist) as ordinary writable files."""
    shutil.copytree(source.tree, dest, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    for path in dest.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return dest


def export_trimmed(source: Source, out: Path, tree: Path | None = None) -> Path:
    """Write a ``.tar.gz`` of what a build needs, for shipping the tree to another machine.

    ``tree`` lets a caller export a patched copy instead of the pristine cached tree.
    """
    root = tree or source.tree
    missing = [p for p in ("CMakeLists.txt", "ggml", "src") if not (root / p).exists()]
    if missing:
        raise VelollmError(f"{root} does not look like a llama.cpp tree (missing {', '.join(missing)})")
    out = out.resolve()
    ensure_dir(out.parent)
    tmp = out.with_name(out.name + ".partial")
    prefix = f"llama.cpp-{source.short_commit or 'local'}"
    marker = json.dumps(
        {"commit": source.commit, "llama_version": source.llama_version, "exported_from": source.spec}, indent=2
    ).encode() + b"\n"
    # The same tree gives the same bytes (no time stamp in the gzip header or the marker), so a machine that
    # was sent the tarball before recognizes it, and builds made from it are reused.
    with (
        tmp.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w") as tar,
    ):
        for rel in TRIMMED_PATHS:
            if (root / rel).exists():
                tar.add(root / rel, arcname=f"{prefix}/{rel}", filter=_skip_bulk)
        info = tarfile.TarInfo(f"{prefix}/{EXPORT_MARKER}")
        info.size, info.mode, info.mtime = len(marker), 0o644, int((root / "CMakeLists.txt").stat().st_mtime)
        tar.addfile(info, io.BytesIO(marker))
    os.replace(tmp, out)
    return out


def _skip_bulk(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    # Test data, the web UI's node sources and git metadata are large and unused by a build.
    parts = info.name.split("/")
    if any(p in {".git", "node_modules", "tests", "docs"} for p in parts):
        return None
    info.mode |= stat.S_IWUSR
    return info


def _download_sdist(version: str, dest: Path, paths: Paths) -> Path:
    pin = PINS.get(version)
    if pin is None:
        known = ", ".join(sorted(PINS))
        raise VelollmError(
            f"no pin for {SDIST_PACKAGE} {version} (known: {known}); add its sha256 and commit to "
            "PINS in velollm_patch/source.py, or use git:URL@REF"
        )
    cached = paths.downloads / f"llama_cpp_python-{version}.tar.gz"
    if cached.is_file() and sha256_file(cached) == pin.sha256:
        return cached
    download_dir = ensure_dir(dest / "download")
    result = proc.run(
        ["python3", "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"{SDIST_PACKAGE}=={version}", "-d", download_dir],
        check=False, timeout=1800,
    )
    files = sorted(download_dir.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not files:
        reason = result.tail(1).strip() or "pip printed nothing"
        raise VelollmError(
            f"could not download {SDIST_PACKAGE}=={version} from the package index: {reason}; "
            "check the network or pass sdist:FILE"
        )
    ensure_dir(paths.downloads)
    os.replace(files[0], cached)
    return cached


def _extract_sdist(sdist: Path, spec: SourceSpec, dest: Path) -> Source:
    if not sdist.is_file():
        raise VelollmError(f"sdist {sdist} does not exist: pass the path of a llama-cpp-python .tar.gz")
    match = re.match(r"llama_cpp_python-(.+)\.tar\.gz$", sdist.name)
    if not match:
        raise VelollmError(f"{sdist.name} is not a llama-cpp-python sdist (expected llama_cpp_python-X.tar.gz)")
    version = match.group(1)
    pin = PINS.get(version)
    if pin is None:
        raise VelollmError(f"no pin for {SDIST_PACKAGE} {version}; add it to PINS in velollm_patch/source.py")
    digest = sha256_file(sdist)
    if digest != pin.sha256:
        raise VelollmError(
            f"{sdist} has sha256 {digest[:16]}…, expected {pin.sha256[:16]}… for {SDIST_PACKAGE} {version}: "
            "the file is corrupt or not the published release; delete it and fetch again"
        )
    staging = ensure_dir(dest.parent / "extract")
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise VelollmError(f"{sdist} could not be unpacked ({exc}); delete it and fetch again") from exc
    vendored = staging / f"llama_cpp_python-{version}" / VENDOR_DIR
    if not (vendored / "CMakeLists.txt").is_file():
        raise VelollmError(f"{sdist} has no {VENDOR_DIR}; this release does not vendor llama.cpp")
    # The sdist keeps llama.cpp's submodule ".git" file, which points at a gitdir that does not
    # exist; git and CMake would trip over it.
    (vendored / ".git").unlink(missing_ok=True)
    os.replace(vendored, dest)
    shutil.rmtree(staging)
    return Source(
        spec=str(spec), tree=dest, commit=pin.commit, llama_version=_llama_version(dest),
        sdist_sha256=digest, fetched_at=_now(),
    )


def _clone_git(spec: SourceSpec, dest: Path) -> Source:
    assert spec.ref is not None
    proc.run(["git", "init", "-q", dest], what="git init")
    proc.run(["git", "-C", dest, "remote", "add", "origin", spec.location], what="git remote add")
    fetched = proc.run(["git", "-C", dest, "fetch", "--depth", "1", "origin", spec.ref], check=False, timeout=1800)
    if fetched.returncode != 0:
        raise VelollmError(
            f"could not fetch {spec.ref} from {spec.location}: {fetched.tail(1).strip()}; check the URL and ref"
        )
    proc.run(["git", "-C", dest, "checkout", "-q", "FETCH_HEAD"], what="git checkout")
    commit = proc.run(["git", "-C", dest, "rev-parse", "HEAD"]).output.strip()
    shutil.rmtree(dest / ".git")
    return Source(
        spec=str(spec), tree=dest, commit=commit, llama_version=_llama_version(dest),
        sdist_sha256=None, fetched_at=_now(),
    )


def _local_source(spec: SourceSpec) -> Source:
    tree = Path(spec.location)
    if not (tree / "CMakeLists.txt").is_file() or not (tree / "ggml").is_dir():
        raise VelollmError(f"{tree} is not a llama.cpp source directory (no CMakeLists.txt and ggml/)")
    commit = None
    if (tree / ".git").exists():
        result = proc.run(["git", "-C", tree, "rev-parse", "HEAD"], check=False)
        if result.returncode == 0:
            commit = result.output.strip()
    elif (tree / EXPORT_MARKER).is_file():
        commit = _exported_commit(tree / EXPORT_MARKER)
    return Source(
        spec=str(spec), tree=tree, commit=commit, llama_version=_llama_version(tree),
        sdist_sha256=None, fetched_at=_now(),
    )


def _exported_commit(marker: Path) -> str | None:
    """The upstream commit a trimmed export recorded; None when the marker is unreadable or says none."""
    try:
        commit = json.loads(marker.read_text(encoding="utf-8")).get("commit")
    except (OSError, ValueError, AttributeError):
        return None
    return commit if isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{7,40}", commit) else None


def _llama_version(tree: Path) -> str | None:
    cmake = tree / "CMakeLists.txt"
    match = re.search(r'set\(LLAMA_VERSION\s+"?([^")\s]+)', cmake.read_text(errors="replace"))
    return match.group(1) if match else None


def _read_meta(meta_file: Path) -> Source:
    data = json.loads(meta_file.read_text())
    data["tree"] = meta_file.parent / "tree"
    return Source(**data)



def _make_files_read_only(root: Path) -> None:
    # Files only: read-only directories would stop a user from simply deleting the cache.
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
