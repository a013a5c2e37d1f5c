"""Plan and run a build of llama.cpp for this machine, then install it.

:func:`plan_build` turns options + detected hardware into a :class:`BuildPlan` (source, patches,
CMake flags, targets, install path) without changing anything; ``--dry-run`` prints it.
:func:`run_build` carries it out: fresh copy → patches → configure → build → stage → smoke test →
atomic install, under a lock, and reuses an existing build when every input is identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from velollm_patch import __version__, builds, cuda, demo_models, patches, proc, serve, source
from velollm_patch.errors import VelollmError
from velollm_patch.files import sha256_file
from velollm_patch.hardware import HardwareInfo, Toolchain
from velollm_patch.paths import Paths, ensure_dir

log = logging.getLogger("velollm_patch.build")

GPU_CHOICES = ("auto", "cuda", "rocm", "metal", "vulkan", "cpu")
TARGETS = ("llama-server", "llama-bench", "llama-perplexity", "llama-quantize", "llama-fit-params")
# K/V cache type pairs the tuner may choose. CUDA only compiles flash-attention vec kernels for the
# pairs named in GGML_CUDA_FA_QUANTS; others fall back to a slow f16 conversion.
TUNABLE_KV_PAIRS = ("f16-f16", "q8_0-q8_0", "q8_0-q4_0", "q4_0-q4_0")
MIN_FREE_DISK_BYTES = 3 * 1024**3  # source copy + objects + staged binaries, with headroom
# x86 ISA flags we pass explicitly instead of GGML_NATIVE, so the plan is reproducible and can be
# made for recorded hardware too. The names are Linux's /proc/cpuinfo spellings ("avx512vbmi" has no
# underscore, "avx512_vnni" has one).
X86_ISA_OPTIONS = (
    ("sse4_2", "GGML_SSE42"), ("avx", "GGML_AVX"), ("avx2", "GGML_AVX2"), ("bmi2", "GGML_BMI2"),
    ("fma", "GGML_FMA"), ("f16c", "GGML_F16C"), ("avx_vnni", "GGML_AVX_VNNI"), ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"), ("avx512_vnni", "GGML_AVX512_VNNI"), ("avx512_bf16", "GGML_AVX512_BF16"),
    ("amx_tile", "GGML_AMX_TILE"), ("amx_int8", "GGML_AMX_INT8"), ("amx_bf16", "GGML_AMX_BF16"),
)
# Upstream's AMX matrix kernels fault (illegal instruction) on any batch of 2+ rows when GCC drops the
# stores of their tile config; this patch fixes it, and a build without it gets no AMX kernels.
AMX_FIX_PATCH = "amx-tile-config"
# ggml_vk_instance_init (ggml-vulkan.cpp) uses vk::LayerSettingEXT from VK_EXT_layer_settings, first in the
# 1.3.261 headers; Debian 12's 1.3.239 fail to compile it.
VULKAN_MIN_HEADERS = (1, 3, 261)


@dataclass(frozen=True)
class BuildOptions:
    gpu: str = "auto"
    arch: tuple[str, ...] = ()  # CUDA compute capabilities ("8.6") or ROCm gfx targets ("gfx1100")
    patches: str = "all"  # "all", "none" or a comma list of patch names
    source: str = source.DEFAULT_SOURCE
    jobs: int | None = None
    build_type: str = "Release"
    wait: float = 0  # seconds to wait for another build's lock
    smoke_model: Path | None = None  # GGUF for the smoke test (default: the demo model)
    make_current: bool = True
    targets: tuple[str, ...] = TARGETS  # a subset saves compile time; llama-server is always built
    timeout_s: float | None = None  # configure + compile; past it the build stops and nothing is installed


@dataclass(frozen=True)
class SmokePlan:
    """What the smoke test can run here. Without the backend's GPU (a CUDA build for another machine) it
    still runs ``--version`` and a completion, which the backend, finding no device, leaves to the CPU."""

    gpu_kernels: bool = True
    reason: str = ""  # why the GPU kernels are not run
    driver_stub: Path | None = None  # loaded as libcuda.so.1 where no driver is installed

    @property
    def level(self) -> str:
        return "full" if self.gpu_kernels else "reduced"

    def describe(self) -> str:
        if self.gpu_kernels:
            return "full (--version, then a model loaded and a completion)"
        return f"reduced: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "reason": self.reason or None,
                "driver_stub": str(self.driver_stub) if self.driver_stub else None}


@dataclass(frozen=True)
class BuildPlan:
    options: BuildOptions
    backend: str
    source: source.Source
    series: patches.Series | None
    selected: tuple[patches.Patch, ...]
    patch_level: str
    cmake_args: tuple[str, ...]
    targets: tuple[str, ...]
    generator: str
    jobs: int
    build_id: str
    install_dir: Path
    cuda: cuda.CudaToolkit | None = None
    notes: tuple[str, ...] = ()  # decisions the plan took for this machine, one line each
    smoke: SmokePlan = SmokePlan()

    def describe(self) -> list[str]:
        lines = [
            f"source:   {self.source.spec} (llama.cpp {self.source.short_commit or 'unknown commit'}, "
            f"version {self.source.llama_version or '?'})",
            f"backend:  {self.backend}",
        ]
        if self.selected:
            assert self.series is not None
            lines.append(f"patches:  series {self.series.pin} level {self.series.level} ({self.patch_level})")
            lines += [f"          {p.file.name}: {p.summary}" for p in self.selected]
        else:
            lines.append("patches:  none (vanilla upstream)")
        lines.append(f"generator: {self.generator}, {self.jobs} jobs")
        lines.append("cmake:    " + " ".join(self.cmake_args))
        lines.append("targets:  " + " ".join(self.targets))
        if self.cuda is not None:
            archs = ", ".join(cuda.capability_of(a) for a in self.cuda.gpu_archs or ()) or "not listed"
            lines.append(f"nvcc:     {self.cuda.version} ({self.cuda.nvcc}), targets {archs}")
        lines += [f"note:     {note}" for note in self.notes]
        lines.append(f"smoke:    {self.smoke.describe()}")
        lines.append(f"install:  {self.install_dir}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "build_id": self.build_id,
            "backend": self.backend,
            "source": self.source.to_dict(),
            "series": str(self.series.directory) if self.series else None,
            "patch_level": self.patch_level,
            "patches": [p.to_dict() for p in self.selected],
            "cmake_args": list(self.cmake_args),
            "targets": list(self.targets),
            "generator": self.generator,
            "jobs": self.jobs,
            "cuda": self.cuda.to_dict() if self.cuda else None,
            "notes": list(self.notes),
            "smoke_test": self.smoke.to_dict(),
            "install_dir": str(self.install_dir),
        }


def cuda_arch(capability: str) -> str:
    """``"8.6"`` → ``"86-real"``; Blackwell ``"12.0"`` → ``"120a-real"`` (ggml needs the ``a`` variant)."""
    match = re.fullmatch(r"(\d+)\.(\d+)", capability.strip())
    if not match:
        raise VelollmError(f"CUDA arch '{capability}' is not a compute capability like 8.6 or 9.0")
    major, minor = match.groups()
    suffix = "a" if major == "12" else ""
    return f"{major}{minor}{suffix}-real"


def choose_backend(gpu: str, hw: HardwareInfo) -> str:
    if gpu not in GPU_CHOICES:
        raise VelollmError(f"unknown --gpu '{gpu}': choose one of {', '.join(GPU_CHOICES)}")
    return hw.backend() if gpu == "auto" else gpu


def cmake_args_for(
    backend: str, hw: HardwareInfo, arch: tuple[str, ...], toolkit: cuda.CudaToolkit | None = None
) -> list[str]:
    """Backend-specific CMake flags for ``hw``; raises when a toolchain is missing."""
    tools = hw.toolchain
    args: list[str] = []
    if backend == "cuda":
        assert toolkit is not None, "plan_build inspects the CUDA toolkit first"
        args += _cuda_args(hw, arch, toolkit)
    elif backend == "rocm":
        if not tools.hipcc.present:
            raise VelollmError("a ROCm build needs hipcc, which was not found: install ROCm or use --gpu vulkan|cpu")
        targets = arch or tuple(sorted({g.gfx_target for g in hw.gpus if g.vendor == "amd" and g.gfx_target}))
        if not targets:
            raise VelollmError("no AMD GPU was detected to take the gfx target from: pass --arch, e.g. --arch gfx1100")
        bad = [t for t in targets if not re.fullmatch(r"gfx[0-9a-f]+", t)]
        if bad:
            raise VelollmError(f"ROCm arch {', '.join(bad)} is not a gfx target like gfx1100")
        args += ["-DGGML_HIP=ON", "-DGPU_TARGETS=" + ";".join(targets)]
    elif backend == "metal":
        if hw.os != "Darwin":
            raise VelollmError("a Metal build needs macOS; use --gpu cpu or vulkan here")
        args += ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]
    elif backend == "vulkan":
        args += _vulkan_args(tools)
    elif backend == "cpu":
        args += ["-DGGML_CUDA=OFF", "-DGGML_METAL=OFF"]
    if backend != "metal":
        args += _cpu_isa_args(hw)
    return args


def _vulkan_args(tools: Toolchain) -> list[str]:
    """ggml-vulkan's needs, checked before a 15-minute build fails on them; the headers CMake will use are
    named explicitly, so the version checked is the version compiled against."""
    minimum = _dotted(VULKAN_MIN_HEADERS)
    needs = (
        (tools.vulkan_headers, "the Vulkan headers and loader", f"libvulkan-dev {minimum} or newer"),
        (tools.glslc, "glslc (the shader compiler)", "glslc"),
        (tools.glslang, "glslangValidator", "glslang-tools"),
        (tools.spirv_headers, "SPIRV-Headers", "spirv-headers"),
    )
    for tool, what, package in needs:
        if not tool.present:
            raise VelollmError(
                f"a Vulkan build needs {what}, which were not found: install {package} (Debian/Ubuntu) "
                "or the Vulkan SDK with VULKAN_SDK set, or use --gpu cpu"
            )
    headers = tools.vulkan_headers
    if _version_tuple(headers.version) < VULKAN_MIN_HEADERS:
        raise VelollmError(
            f"the Vulkan headers in {headers.path} are version {headers.version or 'unknown'}, older than this "
            f"llama.cpp needs ({_dotted(VULKAN_MIN_HEADERS)}, for VK_EXT_layer_settings): install libvulkan-dev "
            f"{_dotted(VULKAN_MIN_HEADERS)} or newer (Debian 13, Ubuntu 24.04) or the Vulkan SDK with VULKAN_SDK "
            "set, or use --gpu cpu"
        )
    return ["-DGGML_VULKAN=ON", f"-DVulkan_INCLUDE_DIR={headers.path}"]


def _version_tuple(version: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version or ""))


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _cuda_args(hw: HardwareInfo, arch: tuple[str, ...], toolkit: cuda.CudaToolkit) -> list[str]:
    detected = {g.compute_capability for g in hw.gpus if g.vendor == "nvidia" and g.compute_capability}
    caps = arch or tuple(sorted(detected))
    if not caps:
        raise VelollmError("no NVIDIA GPU was detected to take the CUDA arch from: pass --arch, e.g. --arch 8.6")
    archs = [cuda_arch(c) for c in caps]  # validates the spelling before nvcc's list is consulted
    cuda.check_archs(caps, toolkit)
    if toolkit.cublas is None:
        raise VelollmError(cuda.missing_cublas_message(toolkit))
    args = [
        "-DGGML_CUDA=ON",
        f"-DCMAKE_CUDA_COMPILER={toolkit.nvcc}",  # the nvcc whose version and targets were checked
        "-DCMAKE_CUDA_ARCHITECTURES=" + ";".join(archs),
        "-DGGML_CUDA_FA_QUANTS=" + ";".join(TUNABLE_KV_PAIRS),
        # FindCUDAToolkit only searches the toolkit: name cuBLAS (a wheel's has no unversioned .so link)
        f"-DCUDA_cublas_LIBRARY={toolkit.cublas.library}",
        f"-DCUDA_cublasLt_LIBRARY={toolkit.cublas.lt_library}",
    ]
    if toolkit.cublas.from_pip:
        # the imported cuBLAS target carries the toolkit's include directory, which lacks cublas_v2.h
        args.append(f"-DCMAKE_CUDA_STANDARD_INCLUDE_DIRECTORIES={toolkit.cublas.include_dir}")
    if toolkit.driver_library is not None:
        args.append(f"-DCUDA_cuda_driver_LIBRARY={toolkit.driver_library}")
    else:
        # ggml calls the driver API (cuMem*) only for its virtual-memory pool; without libcuda to link
        # against (no driver, no toolkit stubs/) the pool falls back to cudaMalloc'd buffers.
        args.append("-DGGML_CUDA_NO_VMM=ON")
    return args


def cuda_notes(toolkit: cuda.CudaToolkit) -> list[str]:
    """The plan's CUDA decisions that depend on what this machine has, said in words."""
    notes = []
    if toolkit.cublas is not None:
        notes.append(f"cuBLAS from the {toolkit.cublas.origin} ({toolkit.cublas.library.parent})")
    if toolkit.driver_library is None:
        notes.append(
            "no libcuda to link (no NVIDIA driver, no toolkit stubs/): GGML_CUDA_NO_VMM=ON, so the GPU memory "
            "pool uses cudaMalloc instead of virtual memory; the stub that keeps it is in NVIDIA's "
            f"cuda-driver-dev-{toolkit.version.replace('.', '-')} package"
        )
    elif toolkit.driver_is_stub:
        notes.append(f"libcuda linked from the toolkit stub {toolkit.driver_library}; a driver provides it at run time")
    runtime = f"libcudart.so.{toolkit.major}, libcublas.so.{toolkit.major}, libcublasLt.so.{toolkit.major}"
    notes.append(
        f"at run time the binaries need {runtime} (the build directories are their RUNPATH; elsewhere put them on "
        f"the library path, e.g. pip's nvidia-cuda-runtime and {cuda.cublas_requirement(toolkit.version)}) and "
        f"an NVIDIA driver for CUDA {toolkit.version}+ (libcuda.so.1)"
    )
    return notes


def smoke_plan(backend: str, hw: HardwareInfo, toolkit: cuda.CudaToolkit | None) -> SmokePlan:
    if backend != "cuda" or any(g.vendor == "nvidia" for g in hw.gpus):
        return SmokePlan()
    stub = toolkit.driver_library if toolkit is not None and toolkit.driver_is_stub else None
    reason = ("no NVIDIA GPU here, so the CUDA kernels do not run: --version and a completion on the CPU "
              "(the CUDA backend finds no device) are what is tested")
    if stub is not None:
        reason += "; libcuda.so.1 is the toolkit's stub, as no driver is installed"
    return SmokePlan(gpu_kernels=False, reason=reason, driver_stub=stub)


def _cpu_isa_args(hw: HardwareInfo) -> list[str]:
    if hw.cpu.arch in ("x86_64", "AMD64", "amd64"):
        isa = [f"-D{option}={'ON' if hw.cpu.has(flag) else 'OFF'}" for flag, option in X86_ISA_OPTIONS]
        return ["-DGGML_NATIVE=OFF", *isa]
    # ARM feature strings differ between compilers; let ggml ask the compiler for this CPU.
    return ["-DGGML_NATIVE=ON"]


def plan_build(
    options: BuildOptions, hw: HardwareInfo, paths: Paths, *, fetch: bool = True,
    toolkit: cuda.CudaToolkit | None = None,
) -> BuildPlan:
    """Decide everything about a build. With ``fetch`` false, an uncached source is an error.

    A CUDA plan inspects the toolkit behind ``hw``'s nvcc unless ``toolkit`` is given (a recorded one).
    """
    backend = choose_backend(options.gpu, hw)
    tools = hw.toolchain
    if not tools.cmake.present:
        raise VelollmError("cmake was not found: install cmake (3.14 or newer), e.g. `apt-get install cmake`")
    if not (tools.cxx.present and tools.cc.present):
        raise VelollmError(
            "no C/C++ compiler was found: install gcc/g++ or clang, e.g. `apt-get install build-essential`"
        )
    if hw.disk_free_bytes < MIN_FREE_DISK_BYTES:
        raise VelollmError(
            f"only {hw.disk_free_bytes / 1024**3:.1f} GiB free where builds go ({paths.cache}); "
            f"free {MIN_FREE_DISK_BYTES / 1024**3:.0f} GiB or set VELOLLM_HOME to a larger disk",
            exit_code=4,
        )
    targets = _targets(options.targets)
    notes: list[str] = []
    if backend == "cuda":
        cuda.check_nvcc(tools.nvcc)
        toolkit = toolkit or cuda.inspect_toolkit(tools.nvcc, paths)
    else:
        toolkit = None
    backend_args = cmake_args_for(backend, hw, options.arch, toolkit)
    if toolkit is not None:
        notes += cuda_notes(toolkit)
    src = source.fetch(options.source, paths) if fetch else _cached_source(options.source, paths)
    series: patches.Series | None = None
    selected: tuple[patches.Patch, ...] = ()
    if options.patches != "none":
        series = patches.find_series(src.commit)
        selected = series.select(options.patches)
    if AMX_FIX_PATCH not in {p.name for p in selected}:
        backend_args = [re.sub(r"^(-DGGML_AMX_\w+)=ON$", r"\1=OFF", a) for a in backend_args]
    patch_level = series.level_string(selected) if series else ""
    commit_stamp = (src.short_commit or "unknown") + (f"+velollm.{series.level}" if selected and series else "")
    generator = "Ninja" if tools.ninja.present else "Unix Makefiles"
    args = [
        f"-G{generator}",
        f"-DCMAKE_BUILD_TYPE={options.build_type}",
        "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary per tool: a clean drop-in anywhere
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # it would download the web UI at build time
        "-DLLAMA_BUILD_NUMBER=0", f"-DLLAMA_BUILD_COMMIT={commit_stamp}",
        *([f"-DVELOLLM_PATCH_LEVEL={patch_level}"] if patch_level else []),
        *backend_args,
    ]
    if tools.ccache.present:
        args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        if backend == "cuda":
            args.append("-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache")
    jobs = options.jobs or max(1, hw.cpu.logical_cores)
    identity = {
        "source": [src.spec, src.commit, src.sdist_sha256],
        "patches": [p.sha256 for p in selected],
        "patch_level": patch_level,
        # the generator and ccache change how we build, not what: keep them out of the identity
        "cmake": sorted(a for a in args if not a.startswith(("-G", "-DCMAKE_C_COMPILER_LAUNCHER",
                                                             "-DCMAKE_CXX_COMPILER_LAUNCHER",
                                                             "-DCMAKE_CUDA_COMPILER_LAUNCHER"))),
        "targets": list(targets),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    flavour = "vanilla" if not selected else "patched"
    build_id = f"{src.short_commit or 'local'}-{backend}-{flavour}-{digest}"
    return BuildPlan(
        options=options, backend=backend, source=src, series=series, selected=selected, patch_level=patch_level,
        cmake_args=tuple(args), targets=targets, generator=generator, jobs=jobs, build_id=build_id,
        install_dir=paths.builds / build_id, cuda=toolkit, notes=tuple(notes),
        smoke=smoke_plan(backend, hw, toolkit),
    )


def _targets(wanted: tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(wanted) - set(TARGETS))
    if unknown:
        raise VelollmError(f"unknown build target {', '.join(unknown)}: choose from {', '.join(TARGETS)}")
    # the smoke test and every command run llama-server; the order is TARGETS' so the identity is stable
    return tuple(t for t in TARGETS if t in wanted or t == "llama-server")


def _cached_source(spec: str, paths: Paths) -> source.Source:
    parsed = source.SourceSpec.parse(spec)
    if parsed.kind == "path":
        return source.fetch(spec, paths)
    for cached in source.list_sources(paths):
        if cached.spec == str(parsed):
            return cached
    if parsed.kind == "pypi" and parsed.location in source.PINS:
        # Not fetched yet, but the pin tells us everything a plan needs.
        pin = source.PINS[parsed.location]
        return source.Source(
            spec=str(parsed), tree=paths.sources / parsed.cache_id / "tree", commit=pin.commit,
            llama_version=None, sdist_sha256=pin.sha256, fetched_at="(not fetched yet)",
        )
    raise VelollmError(f"source {spec} is not fetched yet: run `velollm-patch source fetch {spec}` first")


ProgressCallback = Callable[[str, int, int], None]  # (stage description, done, total)


def run_build(
    plan: BuildPlan, hw: HardwareInfo, paths: Paths, *, on_progress: ProgressCallback | None = None,
    on_line: Callable[[str], None] | None = None,
) -> builds.InstalledBuild:
    """Build, smoke-test and install ``plan``; make it current. Reuses an identical installed build."""
    report = on_progress or (lambda stage, done, total: None)
    with builds.BuildLock(paths, wait=plan.options.wait):
        existing = plan.install_dir / builds.MANIFEST
        if existing.is_file():
            installed = builds.read_build(plan.install_dir)
            log.info("build %s is already installed; reusing it", plan.build_id)
        else:
            builds.remove_leftovers(paths)
            installed = _build_and_install(plan, hw, paths, report, on_line)
        if plan.options.make_current:
            builds.set_current(paths, installed)
        return installed


def _build_and_install(
    plan: BuildPlan, hw: HardwareInfo, paths: Paths, report: ProgressCallback,
    on_line: Callable[[str], None] | None,
) -> builds.InstalledBuild:
    work = ensure_dir(paths.work) / plan.build_id
    staging = builds.staging_dir(paths, plan.build_id)
    log_file = ensure_dir(paths.logs) / f"build-{plan.build_id}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    started = time.monotonic()
    try:
        report("copying source", 0, 0)
        tree = source.fresh_copy(plan.source, work / "src")
        if plan.selected:
            assert plan.series is not None
            report("applying patches", 0, len(plan.selected))
            patches.apply(plan.series, plan.selected, tree)
        report("configuring", 0, 0)
        build_dir = work / "build"
        env = {"CCACHE_BASEDIR": str(work), "CCACHE_NOHASHDIR": "1"}
        limit = plan.options.timeout_s
        proc.run(["cmake", "-S", tree, "-B", build_dir, *plan.cmake_args], env=env, log_file=log_file,
                 on_line=on_line, what="cmake configure", timeout=limit)
        left = None if limit is None else max(1.0, limit - (time.monotonic() - started))
        _compile(plan, build_dir, env, log_file, report, on_line, left)
        report("smoke test", 0, 0)
        _stage(plan, hw, build_dir, staging, started)
        smoke_env: dict[str, str] = {}
        if plan.smoke.driver_stub is not None:
            # The binaries need libcuda.so.1, which only a driver installs; the stub (libcuda.so) answers
            # every call with an error, so the CUDA backend reports no device and the CPU runs the test.
            shim = ensure_dir(work / "driver-stub")
            (shim / "libcuda.so.1").symlink_to(plan.smoke.driver_stub)
            smoke_env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(shim), os.environ.get("LD_LIBRARY_PATH")]))
        if not plan.smoke.gpu_kernels:
            log.warning("smoke test reduced: %s", plan.smoke.reason)
            with log_file.open("a", encoding="utf-8") as handle:
                handle.write(f"velollm-patch: smoke test reduced: {plan.smoke.reason}\n")
        smoke_test(staging, plan.patch_level, plan.options.smoke_model or _default_model(paths), log_file,
                   env=smoke_env)
        installed = builds.install_staged(paths, staging, plan.build_id)
    except BaseException:
        # Ctrl-C, kill (SIGTERM is turned into an exception by the CLI) or failure: nothing half-done stays.
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    log.info("build log: %s", log_file)
    return installed


def _compile(
    plan: BuildPlan, build_dir: Path, env: dict[str, str], log_file: Path, report: ProgressCallback,
    on_line: Callable[[str], None] | None, timeout: float | None,
) -> None:
    step = re.compile(r"^\[(\d+)/(\d+)\]")  # ninja's "[n/N]" (make prints "[ 42%]", handled below)
    percent = re.compile(r"^\[\s*(\d+)%\]")

    def follow(line: str) -> None:
        if match := step.match(line):
            report("compiling", int(match.group(1)), int(match.group(2)))
        elif match := percent.match(line):
            report("compiling", int(match.group(1)), 100)
        if on_line:
            on_line(line)

    proc.run(
        ["cmake", "--build", build_dir, "--config", plan.options.build_type, "-j", str(plan.jobs),
         "--target", *plan.targets],
        env=env, log_file=log_file, on_line=follow, what="build", timeout=timeout,
    )


def _stage(plan: BuildPlan, hw: HardwareInfo, build_dir: Path, staging: Path, started: float) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    bin_dir = ensure_dir(staging / "bin")
    binaries: dict[str, str] = {}
    for target in plan.targets:
        built = build_dir / "bin" / target
        if not built.is_file():
            raise VelollmError(f"the build did not produce {target}; see the build log")
        shutil.copy2(built, bin_dir / target)
        binaries[target] = sha256_file(bin_dir / target)
    manifest = {
        **plan.to_dict(),
        "install_dir": str(plan.install_dir),
        "velollm_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
        "hardware": hw.to_dict(),
        "toolchain": hw.to_dict().get("toolchain"),
        "binaries": binaries,
        "fa_kv_pairs": list(TUNABLE_KV_PAIRS) if plan.backend == "cuda" else None,
        # what the loader must find on the machine that runs them (CUDA's libraries, for one)
        "dynamic_linking": elf_dynamic_section(bin_dir / "llama-server"),
    }
    (staging / builds.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def elf_dynamic_section(binary: Path) -> dict[str, Any] | None:
    """The shared libraries ``binary`` needs and its RUNPATH, from ``readelf -d`` (None where there is none)."""
    try:
        result = proc.run(["readelf", "-d", binary], check=False, timeout=60)
    except (VelollmError, OSError) as exc:  # no binutils, or not an ELF platform
        log.debug("readelf: %s", exc)
        return None
    if result.returncode != 0:
        return None
    return parse_readelf_dynamic(result.output)


def parse_readelf_dynamic(output: str) -> dict[str, Any]:
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", output)
    runpath = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[([^\]]*)\]", output)
    # CMake ends a build tree's RUNPATH with ':', an empty entry that means nothing to the loader
    return {"needed": needed, "runpath": [d for d in runpath.group(1).split(":") if d] if runpath else []}


def smoke_test(
    build_dir: Path, patch_level: str, model: Path, log_file: Path, *, env: dict[str, str] | None = None
) -> None:
    """``--version`` must run and report our patch level; the server must load ``model`` and answer."""
    server_bin = build_dir / "bin" / "llama-server"
    version = proc.run([server_bin, "--version"], check=False, timeout=60, env=env)
    if version.returncode != 0 or "version:" not in version.output:
        raise VelollmError(f"smoke test: {server_bin} --version failed: {version.tail(3)}")
    if patch_level and f"velollm patch level: {patch_level}" not in version.output:
        raise VelollmError(f"smoke test: {server_bin} does not report patch level {patch_level}")
    config = serve.ServerConfig(
        binary=server_bin, model=model, args=("-c", "512", "-np", "1", "-t", str(min(4, os.cpu_count() or 1))),
        log_file=log_file, env=env or {},
    )
    with serve.start_server(config, timeout=300) as server:
        result = serve.complete(server, "The capital of France is", n_predict=8)
        if not result.get("content"):
            raise VelollmError(f"smoke test: llama-server answered an empty completion; log: {log_file}")
        props = server.request("GET", "/props").json()
        if props.get("velollm_patch_level", "") != patch_level:
            raise VelollmError(f"smoke test: /props reports patch level {props.get('velollm_patch_level')!r}")


def _default_model(paths: Paths) -> Path:
    return demo_models.fetch_model(paths)
