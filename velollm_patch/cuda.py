"""What a CUDA build can use from the installed toolkit: nvcc's version and GPU targets, cuBLAS and libcuda.

A CUDA build does not need a GPU, only nvcc, cuBLAS and (for ggml's virtual-memory pool) libcuda to link
against. Machines that build for another machine (an image for a GPU server) often have nvcc without
cuBLAS, which NVIDIA also ships as a pip wheel (``nvidia-cublas`` for CUDA 13, ``nvidia-cublas-cu12``
for CUDA 12): :func:`inspect_toolkit` looks in the toolkit first and then in this Python's site-packages,
and says which it found, so that the build plan can tell CMake where it is.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velollm_patch import proc
from velollm_patch.errors import VelollmError
from velollm_patch.hardware import Tool
from velollm_patch.paths import Paths, ensure_dir, python_site_dirs, system_library_dirs

log = logging.getLogger("velollm_patch.cuda")

# The oldest CUDA that llama.cpp's own CI builds at the pinned commit 0c1e570 (.github/workflows/build.yml:
# 12.4 on Windows, 12.6 in the Ubuntu container, 13.4): older toolkits are not known to compile it.
MIN_CUDA_VERSION = (12, 4)
TOOLKIT_PACKAGE = "NVIDIA's cuda-toolkit package"
# nvcc answers in well under a second; the limit guards against a broken install hanging a plan.
NVCC_PROBE_TIMEOUT_S = 60


@dataclass(frozen=True)
class Cublas:
    """cuBLAS and cuBLASLt (ggml links both) and the directory holding ``cublas_v2.h``."""

    library: Path
    lt_library: Path
    include_dir: Path
    origin: str  # "toolkit" or "pip wheel nvidia-cublas 13.0.2.14"

    @property
    def from_pip(self) -> bool:
        return self.origin.startswith("pip")


@dataclass(frozen=True)
class CudaToolkit:
    nvcc: Path
    version: str  # "13.0"
    include_dirs: tuple[Path, ...]
    library_dirs: tuple[Path, ...]  # the toolkit's, in nvcc's order (its stubs/ directory among them)
    gpu_archs: tuple[str, ...] | None  # "75", "89", "120" from `nvcc --list-gpu-arch`; None: nvcc did not say
    cublas: Cublas | None
    driver_library: Path | None  # libcuda to link: the driver's, or the toolkit's stub

    @property
    def major(self) -> int:
        return parse_version(self.version)[0]

    @property
    def driver_is_stub(self) -> bool:
        return self.driver_library is not None and "stubs" in self.driver_library.parts

    def to_dict(self) -> dict[str, Any]:
        return {
            "nvcc": str(self.nvcc),
            "version": self.version,
            "gpu_archs": list(self.gpu_archs) if self.gpu_archs is not None else None,
            "cublas": None if self.cublas is None else {
                "library": str(self.cublas.library), "lt_library": str(self.cublas.lt_library),
                "include_dir": str(self.cublas.include_dir), "origin": self.cublas.origin,
            },
            "driver_library": str(self.driver_library) if self.driver_library else None,
        }


def parse_version(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
    if not match:
        raise VelollmError(f"CUDA version '{text}' is not a version like 12.4")
    return int(match.group(1)), int(match.group(2))


def _min_version() -> str:
    return f"{MIN_CUDA_VERSION[0]}.{MIN_CUDA_VERSION[1]}"


def check_nvcc(nvcc: Tool) -> None:
    """A missing, unreadable or too old nvcc is refused in one line naming what to install."""
    need = f"CUDA toolkit {_min_version()} or newer"
    if not nvcc.present:
        raise VelollmError(
            f"a CUDA build needs nvcc from the {need}, which was not found: install {TOOLKIT_PACKAGE} "
            f"({_min_version()}+, or set CUDA_HOME to a toolkit) or use --gpu cpu"
        )
    if nvcc.version is None or not re.fullmatch(r"\d+\.\d+", nvcc.version):
        raise VelollmError(
            f"`{nvcc.path} --version` did not print a CUDA release: reinstall {TOOLKIT_PACKAGE} ({need})"
        )
    if parse_version(nvcc.version) < MIN_CUDA_VERSION:
        raise VelollmError(
            f"nvcc {nvcc.version} ({nvcc.path}) is too old: this llama.cpp needs the {need}; install "
            f"{TOOLKIT_PACKAGE} {_min_version()}+ and put its bin/ first on PATH, or use --gpu cpu"
        )


def parse_gpu_archs(text: str) -> tuple[str, ...]:
    """``nvcc --list-gpu-arch`` (``compute_75`` a line) as ``("75", ...)`` in numeric order."""
    found = {m.group(1) for m in re.finditer(r"^compute_(\d+)[a-z]?\s*$", text, re.MULTILINE)}
    return tuple(sorted(found, key=int))


def capability_of(arch: str) -> str:
    """``"121"`` → ``"12.1"``: nvcc's arch numbers are the compute capability without its dot."""
    return f"{arch[:-1]}.{arch[-1]}"


def parse_nvcc_dirs(verbose: str) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """Include and library directories from ``nvcc -v``'s ``#$ INCLUDES=`` and ``#$ LIBRARIES=`` lines.

    nvcc may be a wrapper script (``exec /usr/local/cuda-13.0/bin/nvcc``), so its own path does not say
    where the toolkit is; what nvcc passes to the compiler and linker does (CMake's FindCUDAToolkit asks
    it the same way).
    """
    includes: list[Path] = []
    libraries: list[Path] = []
    for line in verbose.splitlines():
        key, sep, value = line.removeprefix("#$ ").partition("=")
        if not sep or key.strip() not in ("INCLUDES", "SYSTEM_INCLUDES", "LIBRARIES"):
            continue
        target = libraries if key.strip() == "LIBRARIES" else includes
        flag = "-L" if target is libraries else "-I"
        for word in re.findall(r'"([^"]*)"|(\S+)', value):
            item = word[0] or word[1]
            if item.startswith(flag) and len(item) > 2:
                path = Path(item[2:]).resolve()
                if path not in target:
                    target.append(path)
            elif target is includes and item != "-isystem" and item.startswith("/"):
                path = Path(item).resolve()  # SYSTEM_INCLUDES: "-isystem" "/dir"
                if path not in target:
                    target.append(path)
    return tuple(includes), tuple(libraries)


def cublas_requirement(version: str) -> str:
    """The pip requirement for the cuBLAS wheel matching a toolkit: its major (the library's soname) and minor."""
    major, minor = parse_version(version)
    name = "nvidia-cublas" if major >= 13 else f"nvidia-cublas-cu{major}"
    return f"{name}=={major}.{minor}.*"


def _cublas_in(lib_dir: Path, include_dir: Path, major: int, origin: str) -> Cublas | None:
    def first(stem: str) -> Path | None:
        # A toolkit has the unversioned development link; a wheel has only the soname.
        return next((p for p in (lib_dir / f"{stem}.so", lib_dir / f"{stem}.so.{major}") if p.is_file()), None)

    library, lt_library = first("libcublas"), first("libcublasLt")
    if library is None or lt_library is None or not (include_dir / "cublas_v2.h").is_file():
        return None
    return Cublas(library=library, lt_library=lt_library, include_dir=include_dir, origin=origin)


def _wheel_origin(major: int) -> str:
    name = cublas_requirement(f"{major}.0").split("==")[0]
    try:
        return f"pip wheel {name} {importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return f"pip wheel {name} (version unknown)"


def find_cublas(
    major: int, include_dirs: Sequence[Path], library_dirs: Sequence[Path], site_dirs: Sequence[Path]
) -> Cublas | None:
    """cuBLAS for CUDA ``major``: the toolkit's own first, then a pip wheel in ``site_dirs``.

    Wheel layouts: CUDA 13's ``nvidia/cu13/{lib,include}`` (every CUDA 13 wheel shares it), CUDA 12's
    ``nvidia/cublas/{lib,include}``. The soname carries the major version, so another major is never taken.
    """
    for lib_dir in library_dirs:
        if lib_dir.name == "stubs":
            continue
        for include_dir in include_dirs:
            if found := _cublas_in(lib_dir, include_dir, major, "toolkit"):
                return found
    for site_dir in site_dirs:
        for wheel_dir in (site_dir / "nvidia" / f"cu{major}", site_dir / "nvidia" / "cublas"):
            if found := _cublas_in(wheel_dir / "lib", wheel_dir / "include", major, _wheel_origin(major)):
                return found
    return None


def find_driver_library(library_dirs: Sequence[Path], system_dirs: Sequence[Path]) -> Path | None:
    """libcuda to link against: an installed driver's first, else the toolkit's stub (``stubs/libcuda.so``)."""
    real = [d for d in library_dirs if d.name != "stubs"]
    stubs = [d for d in library_dirs if d.name == "stubs"]
    for directory in (*real, *system_dirs):
        for name in ("libcuda.so", "libcuda.so.1"):
            if (directory / name).is_file():
                return directory / name
    return next((d / "libcuda.so" for d in stubs if (d / "libcuda.so").is_file()), None)


def missing_cublas_message(toolkit: CudaToolkit) -> str:
    where = ", ".join(str(d) for d in toolkit.library_dirs if d.name != "stubs") or "no library directory"
    major, minor = parse_version(toolkit.version)
    return (
        f"cuBLAS for CUDA {major} was not found in the toolkit ({where}) or this Python's site-packages: run "
        f"`{sys.executable} -m pip install '{cublas_requirement(toolkit.version)}'` or install the toolkit's "
        f"cuBLAS (NVIDIA's libcublas-dev-{major}-{minor} package)"
    )


def check_archs(capabilities: Sequence[str], toolkit: CudaToolkit) -> None:
    """Refuse compute capabilities this nvcc cannot compile for (CUDA 13 dropped everything below 7.5)."""
    if toolkit.gpu_archs is None:
        return
    wanted = {cap: cap.replace(".", "") for cap in capabilities}
    bad = [cap for cap, number in wanted.items() if number not in toolkit.gpu_archs]
    if bad:
        supported = ", ".join(capability_of(a) for a in toolkit.gpu_archs)
        raise VelollmError(
            f"CUDA arch {', '.join(bad)} cannot be built by nvcc {toolkit.version} ({toolkit.nvcc}), which "
            f"targets {supported}: pass one of those, or use an older CUDA toolkit for older GPUs"
        )


# --- asking nvcc, with a cache ----------------------------------------------------------------


def _probe_cache_file(nvcc: Tool, paths: Paths) -> Path:
    key = hashlib.sha256(f"{nvcc.path}\0{nvcc.version}".encode()).hexdigest()[:16]
    return paths.toolchain_probes / f"nvcc-{nvcc.version}-{key}.json"


def ask_nvcc(nvcc: Tool, paths: Paths) -> dict[str, str | None]:
    """``nvcc --list-gpu-arch`` and ``nvcc -v``'s directories, cached per nvcc path and version.

    The answers only change with the toolkit, and every plan (``--dry-run`` too) needs them.
    """
    assert nvcc.path is not None
    cache = _probe_cache_file(nvcc, paths)
    try:
        cached = json.loads(cache.read_text())
        if isinstance(cached, dict) and cached.get("nvcc") == nvcc.path and cached.get("version") == nvcc.version:
            return cached
    except (OSError, ValueError):
        pass
    archs = proc.run([nvcc.path, "--list-gpu-arch"], check=False, timeout=NVCC_PROBE_TIMEOUT_S)
    # `-v --dryrun` prints the steps nvcc would take (#$ lines with its directories) and runs none of them.
    verbose = proc.run([nvcc.path, "-v", "--dryrun", "velollm-probe.cu"], check=False, timeout=NVCC_PROBE_TIMEOUT_S)
    answer: dict[str, str | None] = {
        "nvcc": nvcc.path,
        "version": nvcc.version,
        "list_gpu_arch": archs.output if archs.returncode == 0 else None,
        "verbose": verbose.output,
    }
    if archs.returncode != 0:
        log.warning("%s --list-gpu-arch failed (%s): its targets are not checked", nvcc.path, archs.tail(1))
    ensure_dir(cache.parent)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(answer, indent=2) + "\n")
    tmp.replace(cache)
    return answer


def inspect_toolkit(
    nvcc: Tool, paths: Paths, *, site_dirs: Sequence[Path] | None = None,
    system_dirs: Sequence[Path] | None = None,
) -> CudaToolkit:
    """The toolkit behind ``nvcc`` (checked by :func:`check_nvcc` first) and the libraries a build links."""
    check_nvcc(nvcc)
    assert nvcc.path is not None and nvcc.version is not None
    answer = ask_nvcc(nvcc, paths)
    include_dirs, library_dirs = parse_nvcc_dirs(answer.get("verbose") or "")
    listed = answer.get("list_gpu_arch")
    major = parse_version(nvcc.version)[0]
    return CudaToolkit(
        nvcc=Path(nvcc.path),
        version=nvcc.version,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        gpu_archs=parse_gpu_archs(listed) if listed else None,
        cublas=find_cublas(major, include_dirs, library_dirs,
                           python_site_dirs() if site_dirs is None else site_dirs),
        driver_library=find_driver_library(library_dirs, system_library_dirs() if system_dirs is None else system_dirs),
    )
