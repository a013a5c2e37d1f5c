"""What machine are we on: GPUs, CPU features, memory, disk and the build toolchain.

Every reading goes through one callable in :class:`Probes`, so tests (and the tuner's and build
module's tests) can replay recorded machines instead of the one they run on. A missing driver,
library or tool always reads as "absent": detection must work on any machine, because its whole
point is to find out what that machine lacks.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import json
import logging
import os
import platform
import re
import shlex
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from velollm_patch import proc
from velollm_patch.errors import VelollmError
from velollm_patch.paths import get_paths
from velollm_patch.units import GiB, MiB

log = logging.getLogger("velollm_patch.hardware")


# Every helper tool answers --version or a query in well under a second; the limit only guards
# against a hung driver stack (rocm-smi waiting on a wedged GPU) stalling `detect` forever.
PROBE_TIMEOUT_S = 20

TOOL_NAMES = (
    "cmake", "ninja", "cc", "cxx", "nvcc", "hipcc", "ccache", "git",
    # what a Vulkan build needs besides a compiler (ggml-vulkan's CMakeLists: find_package(Vulkan COMPONENTS glslc),
    # find_package(SPIRV-Headers CONFIG), and glslangValidator for its shader-extension checks)
    "glslc", "glslang", "vulkan_headers", "spirv_headers",
)

# ISA extensions that change how llama.cpp is built or how fast it runs, in display order.
KEY_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "amx_tile", "amx_int8", "amx_bf16",
    "neon", "dotprod", "i8mm", "fp16", "bf16", "sve", "sve2",
)

# Linux on ARM names features after the kernel hwcaps; the build module asks for the names the
# compiler's -march uses, so add those next to the originals.
_FLAG_ALIASES = {"asimd": "neon", "asimddp": "dotprod", "asimdhp": "fp16"}

AMD_PCI_VENDOR = "0x1002"


@dataclass(frozen=True)
class GPUInfo:
    vendor: str  # "nvidia" | "amd" | "apple" | "intel"
    index: int
    name: str
    vram_total_bytes: int
    vram_free_bytes: int | None
    compute_capability: str | None = None  # NVIDIA, e.g. "9.0"
    gfx_target: str | None = None  # AMD, e.g. "gfx1100"
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # highest CUDA the driver supports, e.g. "12.4"
    unified_memory: bool = False  # Apple Silicon: VRAM is a share of system RAM


@dataclass(frozen=True)
class CPUInfo:
    model: str
    arch: str  # platform.machine(): "x86_64", "aarch64", "arm64"
    physical_cores: int
    logical_cores: int
    flags: frozenset[str]  # normalized lower-case ISA names
    l3_cache_bytes: int | None

    def has(self, flag: str) -> bool:
        return flag.lower() in self.flags


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class Tool:
    name: str
    path: str | None  # None = absent
    version: str | None

    @property
    def present(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class Toolchain:
    cmake: Tool
    ninja: Tool
    cc: Tool
    cxx: Tool
    nvcc: Tool
    hipcc: Tool
    ccache: Tool
    git: Tool
    glslc: Tool
    glslang: Tool  # glslangValidator
    vulkan_headers: Tool  # path: the include directory a build would use
    spirv_headers: Tool  # path: the directory of SPIRV-HeadersConfig.cmake


@dataclass(frozen=True)
class VulkanDevice:
    """A device the Vulkan loader lists (``vulkaninfo --summary``)."""

    index: int
    name: str
    device_type: str  # "discrete", "integrated", "virtual", "cpu" (a software rasterizer), "other"
    api_version: str | None = None
    driver: str | None = None

    @property
    def is_software(self) -> bool:
        """A CPU-type device (Mesa's llvmpipe, SwiftShader): ggml-vulkan uses it only when it is named in
        ``GGML_VK_VISIBLE_DEVICES``, and it is never faster than the CPU backend."""
        return self.device_type == "cpu"


@dataclass(frozen=True)
class HardwareInfo:
    os: str  # platform.system(): "Linux", "Darwin", "Windows"
    cpu: CPUInfo
    memory: MemoryInfo
    gpus: tuple[GPUInfo, ...]
    vulkan_devices: tuple[VulkanDevice, ...]
    disk_free_bytes: int  # free space where builds go
    toolchain: Toolchain
    apple_chip: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # JSON has no sets or tuples; sorting keeps recorded files stable under diff.
        data["cpu"]["flags"] = sorted(self.cpu.flags)
        data["gpus"] = [dataclasses.asdict(gpu) for gpu in self.gpus]
        data["vulkan_devices"] = [dataclasses.asdict(device) for device in self.vulkan_devices]
        data["vulkan"] = self.vulkan  # what records before the device list held
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareInfo:
        try:
            cpu = {**data["cpu"], "flags": frozenset(data["cpu"]["flags"])}
            # Records made before a tool was probed read it as absent.
            tools = {name: Tool(name, None, None) for name in TOOL_NAMES}
            tools |= {key: Tool(**value) for key, value in data["toolchain"].items()}
            if "vulkan_devices" in data:
                vulkan_devices = tuple(VulkanDevice(**device) for device in data["vulkan_devices"])
            else:  # recorded as a yes/no: a GPU-type device of unknown name, or none
                vulkan_devices = (VulkanDevice(0, "unknown", "other"),) if data["vulkan"] else ()
            return cls(
                os=data["os"],
                cpu=CPUInfo(**cpu),
                memory=MemoryInfo(**data["memory"]),
                gpus=tuple(GPUInfo(**gpu) for gpu in data["gpus"]),
                vulkan_devices=vulkan_devices,
                disk_free_bytes=data["disk_free_bytes"],
                toolchain=Toolchain(**tools),
                apple_chip=data.get("apple_chip"),
            )
        except (KeyError, TypeError) as exc:
            raise VelollmError(
                f"hardware record is malformed ({exc!r}): run `velollm-patch detect` to record it again"
            ) from exc

    @property
    def vulkan(self) -> bool:
        """A Vulkan device worth building for: a GPU, not a software rasterizer."""
        return any(not device.is_software for device in self.vulkan_devices)

    @property
    def total_vram_bytes(self) -> int:
        return sum(gpu.vram_total_bytes for gpu in self.gpus)

    def backend(self) -> str:
        """The llama.cpp backend that will run fastest here, judged by the hardware alone."""
        vendors = {gpu.vendor for gpu in self.gpus}
        if "nvidia" in vendors:
            return "cuda"
        if "amd" in vendors:
            return "rocm"
        if "apple" in vendors:
            return "metal"
        if self.vulkan:
            return "vulkan"
        return "cpu"


# --- small helpers ---------------------------------------------------------------------------


def _output(args: list[str]) -> str | None:
    """Output of a successful command, or None when it is missing, fails or hangs."""
    try:
        result = proc.run(args, check=False, timeout=PROBE_TIMEOUT_S)
    except (VelollmError, OSError) as exc:  # OSError: found but not executable
        log.debug("probe %s: %s", args[0], exc)
        return None
    if result.returncode != 0:
        log.debug("probe %s exited %d: %s", args[0], result.returncode, result.tail(1))
        return None
    return result.output


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _load_json(text: str | None) -> Any:
    """Parse the JSON document in a tool's output; SMI tools print warnings ahead of it."""
    if text is None:
        return None
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        return None
    try:
        return json.JSONDecoder().raw_decode(text[min(starts):])[0]
    except json.JSONDecodeError:
        return None


def _sysctl(key: str) -> str | None:
    out = _output(["sysctl", "-n", key])
    return out.strip() if out is not None else None


# --- NVIDIA ----------------------------------------------------------------------------------


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else value


def probe_nvidia(nvml: ModuleType | None = None) -> list[GPUInfo]:
    """NVIDIA GPUs through NVML; ``nvml`` replaces the ``pynvml`` module (tests pass a fake)."""
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            return []
    try:
        nvml.nvmlInit()
    except (nvml.NVMLError, OSError) as exc:  # no driver, or libnvidia-ml missing
        log.debug("NVML unavailable: %s", exc)
        return []
    try:
        return _nvml_devices(nvml)
    except nvml.NVMLError as exc:
        log.debug("NVML query failed: %s", exc)
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            log.debug("nvmlShutdown: %s", exc)


def _nvml_optional(nvml: ModuleType, fn: Callable[..., Any], *args: Any) -> Any:
    """A reading some drivers or GPUs do not support (NOT_SUPPORTED) is unknown, not fatal."""
    try:
        return fn(*args)
    except nvml.NVMLError as exc:
        log.debug("NVML %s: %s", getattr(fn, "__name__", fn), exc)
        return None


def _nvml_devices(nvml: ModuleType) -> list[GPUInfo]:
    driver = _nvml_optional(nvml, nvml.nvmlSystemGetDriverVersion)
    cuda = _nvml_optional(nvml, nvml.nvmlSystemGetCudaDriverVersion)
    # NVML encodes CUDA 12.8 as 12080.
    cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) and cuda > 0 else None
    gpus: list[GPUInfo] = []
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = _text(nvml.nvmlDeviceGetName(handle))
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except nvml.NVMLError as exc:  # e.g. GPU_IS_LOST: skip that GPU, keep the others
            log.debug("NVML device %d: %s", index, exc)
            continue
        capability = _nvml_optional(nvml, nvml.nvmlDeviceGetCudaComputeCapability, handle)
        gpus.append(
            GPUInfo(
                vendor="nvidia",
                index=index,
                name=name,
                vram_total_bytes=int(memory.total),
                vram_free_bytes=int(memory.free),
                compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
                driver_version=_text(driver) if driver is not None else None,
                cuda_driver_version=cuda_version,
            )
        )
    return gpus


# --- AMD -------------------------------------------------------------------------------------


def probe_amd(root: Path = Path("/")) -> list[GPUInfo]:
    """AMD GPUs: the ROCm SMI tools name the cards best; sysfs works without ROCm installed."""
    if shutil.which("amd-smi"):
        gpus = parse_amd_smi(_output(["amd-smi", "static", "--asic", "--vram", "--driver", "--json"]))
        if gpus:
            return gpus
    if shutil.which("rocm-smi"):
        gpus = parse_rocm_smi(
            _output(["rocm-smi", "--showproductname", "--showmeminfo", "vram", "--showdriverversion", "--json"])
        )
        if gpus:
            return gpus
    return probe_amd_sysfs(root)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _amd_smi_bytes(size: Any) -> int | None:
    # amd-smi changed its JSON between ROCm releases: {"value": 24560, "unit": "MB"} or "24560 MB".
    if isinstance(size, dict):
        value, unit = size.get("value"), str(size.get("unit", "MB"))
    elif isinstance(size, str) and len(size.split()) == 2:
        value, unit = size.split()
    else:
        return None
    number = _int(str(value))
    scale = {"B": 1, "KB": 1024, "MB": MiB, "GB": GiB}.get(unit.upper())
    return number * scale if number is not None and scale is not None else None


def parse_amd_smi(output: str | None) -> list[GPUInfo]:
    """GPUs from ``amd-smi static --asic --vram --driver --json``."""
    data = _load_json(output)
    if isinstance(data, dict):  # some releases wrap the list: {"gpu_data": [...]}
        data = data.get("gpu_data")
    if not isinstance(data, list):
        return []
    gpus: list[GPUInfo] = []
    for position, entry in enumerate(data):
        if not isinstance(entry, dict):
            continue
        # Sections a GPU does not support read "N/A" instead of an object.
        asic, vram, driver = (_dict(entry.get(key)) for key in ("asic", "vram", "driver"))
        total = _amd_smi_bytes(vram.get("size"))
        if total is None:
            continue
        gfx = asic.get("target_graphics_version")
        gpus.append(
            GPUInfo(
                vendor="amd",
                index=entry["gpu"] if isinstance(entry.get("gpu"), int) else position,
                name=str(asic.get("market_name") or "AMD GPU"),
                vram_total_bytes=total,
                vram_free_bytes=None,  # `static` carries no usage; a second call is not worth it
                gfx_target=gfx if isinstance(gfx, str) and gfx.startswith("gfx") else None,
                driver_version=driver.get("version") if isinstance(driver.get("version"), str) else None,
            )
        )
    return gpus


def parse_rocm_smi(output: str | None) -> list[GPUInfo]:
    """GPUs from ``rocm-smi --showproductname --showmeminfo vram --showdriverversion --json``."""
    data = _load_json(output)
    if not isinstance(data, dict):
        return []
    driver = _dict(data.get("system")).get("Driver version")
    cards = sorted(
        ((int(key[4:]), value) for key, value in data.items()
         if re.fullmatch(r"card\d+", key) and isinstance(value, dict)),
        key=lambda item: item[0],
    )
    gpus: list[GPUInfo] = []
    for position, (_, fields) in enumerate(cards):
        # Key capitalisation changed across ROCm releases ("Card series" vs "Card Series").
        lower = {str(k).lower(): str(v) for k, v in fields.items()}
        total = _int(lower.get("vram total memory (b)"))
        if total is None:
            continue
        used = _int(lower.get("vram total used memory (b)"))
        gfx = lower.get("gfx version", "")
        gpus.append(
            GPUInfo(
                vendor="amd",
                index=position,
                name=lower.get("card series") or lower.get("device name") or "AMD GPU",
                vram_total_bytes=total,
                vram_free_bytes=total - used if used is not None else None,
                gfx_target=gfx if gfx.startswith("gfx") else None,
                driver_version=driver if isinstance(driver, str) else None,
            )
        )
    return gpus


def gfx_target_from_version(version: int) -> str | None:
    """KFD's ``gfx_target_version`` (major*10000 + minor*100 + stepping) as a gfx name.

    110000 -> gfx1100, 90010 -> gfx90a, 90402 -> gfx942: minor and stepping are hex digits.
    """
    if version <= 0:
        return None
    major, minor, stepping = version // 10000, version // 100 % 100, version % 100
    return f"gfx{major}{minor:x}{stepping:x}"


def _kfd_gfx_targets(root: Path) -> dict[Path, str]:
    """gfx target per PCI device directory, from the KFD topology (what ROCm itself reads)."""
    targets: dict[Path, str] = {}
    for properties in sorted((root / "sys/class/kfd/kfd/topology/nodes").glob("*/properties")):
        fields = dict(
            line.split(maxsplit=1) for line in (_read(properties) or "").splitlines()
            if len(line.split()) == 2
        )
        gfx = gfx_target_from_version(_int(fields.get("gfx_target_version")) or 0)
        minor = fields.get("drm_render_minor")
        if gfx and minor:  # CPU nodes report version 0 and no render node
            targets[(root / f"sys/class/drm/renderD{minor}/device").resolve()] = gfx
    return targets


def probe_amd_sysfs(root: Path = Path("/")) -> list[GPUInfo]:
    """AMD GPUs from the amdgpu driver's sysfs files; ``root`` lets tests supply a fake tree."""
    drm = root / "sys/class/drm"
    cards = sorted(
        (path for path in drm.glob("card*") if re.fullmatch(r"card\d+", path.name)),
        key=lambda path: int(path.name[4:]),
    )
    gfx_targets = _kfd_gfx_targets(root)
    # Only the DKMS (ROCm-packaged) amdgpu module reports a version; the in-kernel one does not.
    driver = _read(root / "sys/module/amdgpu/version")
    gpus: list[GPUInfo] = []
    for card in cards:
        device = card / "device"
        if _read(device / "vendor") != AMD_PCI_VENDOR:
            continue
        total = _int(_read(device / "mem_info_vram_total"))
        if total is None:
            continue
        used = _int(_read(device / "mem_info_vram_used"))
        product = _read(device / "product_name")
        gpus.append(
            GPUInfo(
                vendor="amd",
                index=len(gpus),
                name=product or f"AMD GPU {_read(device / 'device') or 'unknown'}",
                vram_total_bytes=total,
                vram_free_bytes=total - used if used is not None else None,
                gfx_target=gfx_targets.get(device.resolve()),
                driver_version=driver or None,
            )
        )
    return gpus


# --- Apple -----------------------------------------------------------------------------------


def metal_working_set_bytes(ram_bytes: int) -> int:
    """How much of unified memory Metal lets the GPU use (``recommendedMaxWorkingSetSize``).

    macOS keeps the rest for the system, so this, not RAM, is what a model must fit in. Reported
    values are 2/3 of RAM up to 32 GiB (21845 MiB on a 32 GiB M2 Max) and 3/4 above (48 GiB on
    64 GiB machines).
    """
    return ram_bytes * 2 // 3 if ram_bytes <= 32 * GiB else ram_bytes * 3 // 4


def probe_apple() -> list[GPUInfo]:
    """The Apple Silicon GPU, which shares the chip's name and its RAM."""
    if platform.system() != "Darwin":
        return []
    chip = _sysctl("machdep.cpu.brand_string")
    memsize = _int(_sysctl("hw.memsize"))
    if not chip or not chip.startswith("Apple") or not memsize:  # Intel Macs: no Apple GPU
        return []
    # `sudo sysctl iogpu.wired_limit_mb=N` raises Metal's limit; honour it when someone has.
    wired_limit_mb = _int(_sysctl("iogpu.wired_limit_mb"))
    vram = wired_limit_mb * MiB if wired_limit_mb else metal_working_set_bytes(memsize)
    return [
        GPUInfo(
            vendor="apple", index=0, name=chip, vram_total_bytes=vram, vram_free_bytes=None,
            unified_memory=True,
        )
    ]


# --- Vulkan ----------------------------------------------------------------------------------


_VULKAN_DEVICE_TYPES = {
    "PHYSICAL_DEVICE_TYPE_DISCRETE_GPU": "discrete", "PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU": "integrated",
    "PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU": "virtual", "PHYSICAL_DEVICE_TYPE_CPU": "cpu",
}


def parse_vulkan_summary(output: str) -> tuple[VulkanDevice, ...]:
    """The devices in ``vulkaninfo --summary``'s "Devices:" section (blocks "GPU<n>:" of ``key = value``)."""
    devices: list[VulkanDevice] = []
    blocks = re.split(r"^GPU(\d+):\s*$", output.split("Devices:", 1)[-1], flags=re.MULTILINE)
    for index, body in zip(blocks[1::2], blocks[2::2], strict=True):
        fields = dict(re.findall(r"^\s*(\w+)\s*=\s*(.*?)\s*$", body, flags=re.MULTILINE))
        devices.append(VulkanDevice(
            index=int(index),
            name=fields.get("deviceName", "unknown"),
            device_type=_VULKAN_DEVICE_TYPES.get(fields.get("deviceType", ""), "other"),
            api_version=fields.get("apiVersion"),
            driver=fields.get("driverInfo") or fields.get("driverName"),
        ))
    return tuple(devices)


def _vulkan_loader_loadable() -> bool:
    try:
        ctypes.CDLL("libvulkan.so.1")
    except OSError:
        return False
    return True


def probe_vulkan(root: Path = Path("/")) -> tuple[VulkanDevice, ...]:
    if shutil.which("vulkaninfo"):
        summary = _output(["vulkaninfo", "--summary"])
        if summary is not None:
            return parse_vulkan_summary(summary)
    if platform.system() != "Linux" or not _vulkan_loader_loadable():
        return ()
    # Without vulkaninfo: the loader plus a driver's ICD manifest. Which devices a GPU driver serves is
    # unknown; Lavapipe's manifest (lvp_icd*) is Mesa's software rasterizer, one CPU-type device.
    icd_dirs = [root / "usr/share/vulkan/icd.d", root / "etc/vulkan/icd.d"]
    icds = sorted(p for d in icd_dirs for p in d.glob("*.json"))
    gpu_drivers = [p.name.split("_icd")[0] for p in icds if not p.name.startswith("lvp_")]
    devices = [VulkanDevice(0, f"a device of the {gpu_drivers[0]} driver", "other")] if gpu_drivers else []
    if any(p.name.startswith("lvp_") for p in icds):
        devices.append(VulkanDevice(len(devices), "llvmpipe", "cpu", driver="Mesa lavapipe"))
    return tuple(devices)


# --- CPU -------------------------------------------------------------------------------------


def normalize_flags(raw: Iterable[str]) -> frozenset[str]:
    flags = {flag.strip().lower() for flag in raw if flag.strip()}
    flags |= {_FLAG_ALIASES[flag] for flag in flags if flag in _FLAG_ALIASES}
    return frozenset(flags)


def parse_cpuinfo(text: str) -> tuple[str | None, frozenset[str]]:
    """Model name and ISA flags from /proc/cpuinfo (x86 ``flags``, ARM ``Features``)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        # Every core repeats the same block; the first occurrence describes the machine.
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("hardware") or fields.get("model")
    # x86 "model" is a bare family number, not a name.
    if model is not None and model.isdigit():
        model = None
    raw_flags = fields.get("flags") or fields.get("features") or ""
    return model, normalize_flags(raw_flags.split())


def _parse_cache_size(text: str | None) -> int | None:
    match = re.fullmatch(r"(\d+)\s*([KMG]?)", text or "")
    if not match:
        return None
    return int(match.group(1)) * {"": 1, "K": 1024, "M": MiB, "G": GiB}[match.group(2)]


def _linux_l3(root: Path) -> int | None:
    for index in sorted((root / "sys/devices/system/cpu/cpu0/cache").glob("index*")):
        if _read(index / "level") == "3":
            return _parse_cache_size(_read(index / "size"))
    return None


def darwin_flag(key: str) -> str:
    """ISA name for a ``hw.optional.*`` sysctl key, e.g. ``arm.FEAT_DotProd`` -> ``dotprod``."""
    name = key.removeprefix("hw.optional.").lower().removeprefix("arm.").removeprefix("feat_")
    name = name.removesuffix("_0")  # x86 keys: avx1_0, avx2_0
    return {"avx1": "avx", "advsimd": "neon", "avx512vnni": "avx512_vnni"}.get(name, name)


def parse_darwin_optional(output: str) -> frozenset[str]:
    """Flags from ``sysctl hw.optional`` lines such as ``hw.optional.arm.FEAT_I8MM: 1``."""
    flags: set[str] = set()
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip() == "1":
            flags.add(darwin_flag(key.strip()))
    return frozenset(flags)


def _core_counts() -> tuple[int, int]:
    logical = psutil.cpu_count(logical=True) or 1
    physical = psutil.cpu_count(logical=False) or logical
    return int(physical), int(logical)


def probe_cpu(root: Path = Path("/")) -> CPUInfo:
    arch = platform.machine()
    physical, logical = _core_counts()
    if platform.system() == "Darwin":
        l3 = _int(_sysctl("hw.l3cachesize"))
        return CPUInfo(
            model=_sysctl("machdep.cpu.brand_string") or platform.processor() or arch,
            arch=arch,
            physical_cores=physical,
            logical_cores=logical,
            flags=parse_darwin_optional(_output(["sysctl", "hw.optional"]) or ""),
            l3_cache_bytes=l3 or None,  # Apple Silicon reports no L3 (0 or absent)
        )
    model, flags = parse_cpuinfo(_read(root / "proc/cpuinfo") or "")
    return CPUInfo(
        model=model or platform.processor() or arch,
        arch=arch,
        physical_cores=physical,
        logical_cores=logical,
        flags=flags,
        l3_cache_bytes=_linux_l3(root),
    )


# --- memory and disk -------------------------------------------------------------------------


def probe_memory() -> MemoryInfo:
    vm = psutil.virtual_memory()
    return MemoryInfo(total_bytes=int(vm.total), available_bytes=int(vm.available))


def probe_disk_free(path: Path) -> int:
    """Free bytes on the filesystem that will hold ``path``, which need not exist yet."""
    target = path.expanduser().absolute()
    for candidate in (target, *target.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError as exc:
                log.debug("disk usage of %s: %s", candidate, exc)
                return 0
    return 0


# --- toolchain -------------------------------------------------------------------------------


def parse_tool_version(name: str, output: str) -> str | None:
    """The version number in a tool's ``--version`` output."""
    if name == "nvcc":
        # The banner's first lines are copyright and build dates; "release 13.0," is the version.
        match = re.search(r"release (\d+\.\d+)", output)
        return match.group(1) if match else None
    lines = output.strip().splitlines()
    first = lines[0] if lines else ""
    match = re.search(r"version:?\s+v?(\d+(?:\.\d+)+)", first, re.IGNORECASE)
    if match:
        return match.group(1)
    # gcc prints "gcc (Debian 12.2.0-14) 12.2.0": the last dotted number is its own version.
    dotted = re.findall(r"\d+(?:\.\d+)+", first)
    return dotted[-1] if dotted else None


def vulkan_header_version(include_dir: Path) -> str | None:
    """``1.3.239`` from ``include_dir/vulkan/vulkan_core.h`` (VK_HEADER_VERSION_COMPLETE's major.minor and
    VK_HEADER_VERSION, the patch level), or None when it is not there."""
    text = _read(include_dir / "vulkan" / "vulkan_core.h")
    if text is None:
        return None
    complete = re.search(r"#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION\(\s*0\s*,\s*(\d+)\s*,\s*(\d+)", text)
    patch = re.search(r"#define VK_HEADER_VERSION (\d+)", text)
    if complete is None or patch is None:
        return None
    return f"{complete[1]}.{complete[2]}.{patch[1]}"


def _vulkan_sdk() -> list[Path]:
    sdk = os.environ.get("VULKAN_SDK")
    return [Path(sdk)] if sdk else []


def probe_vulkan_headers() -> Tool:
    """The Vulkan headers a build would compile with: CMake's FindVulkan looks in $VULKAN_SDK first, then the
    system prefixes (/usr/local before /usr, as the compiler does)."""
    for include in [*(sdk / "include" for sdk in _vulkan_sdk()), Path("/usr/local/include"), Path("/usr/include")]:
        if (include / "vulkan" / "vulkan.h").is_file():
            return Tool("vulkan_headers", str(include), vulkan_header_version(include))
    return Tool("vulkan_headers", None, None)


def probe_spirv_headers() -> Tool:
    """SPIRV-Headers' CMake package, which ggml-vulkan finds with find_package(SPIRV-Headers CONFIG)."""
    prefixes = [*_vulkan_sdk(), Path("/usr/local"), Path("/usr")]
    for prefix in prefixes:
        config_dirs = sorted(prefix.glob("*/cmake/SPIRV-Headers")) + sorted(prefix.glob("lib/*/cmake/SPIRV-Headers"))
        for config_dir in config_dirs:
            if (config_dir / "SPIRV-HeadersConfig.cmake").is_file():
                version_file = _read(config_dir / "SPIRV-HeadersConfigVersion.cmake") or ""
                version = re.search(r'set\(PACKAGE_VERSION "([\d.]+)"\)', version_file)
                return Tool("spirv_headers", str(config_dir), version[1] if version else None)
    return Tool("spirv_headers", None, None)


def _tool_command(name: str) -> list[str]:
    """How to invoke a tool; $CC/$CXX may carry a launcher or flags ("ccache gcc") as for make."""
    if name in ("cc", "cxx"):
        configured = os.environ.get(name.upper())
        if configured and configured.strip():
            return shlex.split(configured)
        return ["cc" if name == "cc" else "c++"]
    if name == "glslang":
        return ["glslangValidator"]
    return [name]


def _fallback_locations(name: str) -> list[Path]:
    # CUDA and ROCm install outside PATH by default, and CMake finds them there; so must we.
    if name == "nvcc":
        homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    elif name == "hipcc":
        homes = [os.environ.get("ROCM_PATH"), "/opt/rocm"]
    else:
        return []
    return [Path(home) / "bin" / name for home in homes if home]


def probe_tool(name: str) -> Tool:
    if name == "vulkan_headers":
        return probe_vulkan_headers()
    if name == "spirv_headers":
        return probe_spirv_headers()
    command = _tool_command(name)
    path = shutil.which(command[0])
    if path is None:
        path = next((str(p) for p in _fallback_locations(name) if shutil.which(str(p))), None)
    if path is None:
        return Tool(name, None, None)
    output = _output([path, *command[1:], "--version"])
    return Tool(name, path, parse_tool_version(name, output) if output is not None else None)


# --- load ------------------------------------------------------------------------------------

# How long the tuner watches the CPUs before planning: long enough to average over a scheduler's time slices
# and a bursty job's gaps, short enough not to be noticed at start-up.
LOAD_SAMPLE_S = 1.0


@dataclass(frozen=True)
class HostLoad:
    """How busy the CPUs were with other programs over a short sample, taken when a plan is made (not part of
    :class:`HardwareInfo`, which describes the machine rather than the moment)."""

    per_cpu_percent: tuple[float, ...]
    """Utilisation of each logical CPU, 0-100, everything on the machine included."""
    own_percent: float
    """This process's share over the same sample (100 = one CPU), which is not load on the server's behalf."""
    interval_s: float

    @property
    def busy_cpus(self) -> float:
        """Logical CPUs' worth of work that other programs did during the sample."""
        return max(0.0, (sum(self.per_cpu_percent) - self.own_percent) / 100)

    def describe(self) -> str:
        per_cpu = " ".join(f"{p:.0f}%" for p in self.per_cpu_percent)
        return f"{self.busy_cpus:.1f} CPUs busy with other programs over {self.interval_s:.1f} s ({per_cpu})"


def probe_host_load(interval_s: float = LOAD_SAMPLE_S) -> HostLoad:
    """Sample every CPU's utilisation and this process's own for ``interval_s`` (blocking)."""
    me = psutil.Process()
    me.cpu_percent(None)
    psutil.cpu_percent(None, percpu=True)
    time.sleep(interval_s)
    per_cpu = psutil.cpu_percent(None, percpu=True)
    return HostLoad(tuple(float(p) for p in per_cpu), float(me.cpu_percent(None)), interval_s)


# --- detection -------------------------------------------------------------------------------


@dataclass
class Probes:
    """The readings :func:`detect` takes; replace any of them to replay a recorded machine."""

    system: Callable[[], str] = platform.system
    nvidia: Callable[[], list[GPUInfo]] = probe_nvidia
    amd: Callable[[], list[GPUInfo]] = probe_amd
    apple: Callable[[], list[GPUInfo]] = probe_apple
    vulkan: Callable[[], tuple[VulkanDevice, ...]] = probe_vulkan
    cpu: Callable[[], CPUInfo] = probe_cpu
    memory: Callable[[], MemoryInfo] = probe_memory
    disk_free: Callable[[Path], int] = probe_disk_free
    tool: Callable[[str], Tool] = probe_tool


def detect(probes: Probes | None = None, build_dir: Path | None = None) -> HardwareInfo:
    """Read this machine; ``build_dir`` is where builds go (default: the cache directory)."""
    p = probes or Probes()
    gpus = (*p.nvidia(), *p.amd(), *p.apple())
    return HardwareInfo(
        os=p.system(),
        cpu=p.cpu(),
        memory=p.memory(),
        gpus=gpus,
        vulkan_devices=p.vulkan(),
        disk_free_bytes=p.disk_free(build_dir if build_dir is not None else get_paths().cache),
        toolchain=Toolchain(**{name: p.tool(name) for name in TOOL_NAMES}),
        # On Apple Silicon the GPU is the chip, so its name is the chip's.
        apple_chip=next((gpu.name for gpu in gpus if gpu.vendor == "apple"), None),
    )


# --- summary ---------------------------------------------------------------------------------


def _gib(value: int) -> str:
    return f"{value / GiB:.1f} GiB"


def _gpu_line(gpu: GPUInfo) -> str:
    memory = f"{_gib(gpu.vram_total_bytes)} {'unified memory for Metal' if gpu.unified_memory else 'VRAM'}"
    if gpu.vram_free_bytes is not None:
        memory += f" ({_gib(gpu.vram_free_bytes)} free)"
    details = [memory]
    if gpu.compute_capability:
        details.append(f"compute {gpu.compute_capability}")
    if gpu.gfx_target:
        details.append(gpu.gfx_target)
    if gpu.driver_version:
        details.append(f"driver {gpu.driver_version}")
    if gpu.cuda_driver_version:
        details.append(f"CUDA {gpu.cuda_driver_version}")
    return f"GPU {gpu.index} ({gpu.vendor}): {gpu.name} — {', '.join(details)}"


def _vulkan_line(device: VulkanDevice) -> str:
    kind = "software, CPU type" if device.is_software else f"{device.device_type} GPU"
    details = [kind, *([f"Vulkan {device.api_version}"] if device.api_version else []),
               *([device.driver] if device.driver else [])]
    line = f"Vulkan {device.index}: {device.name} — {', '.join(details)}"
    if device.is_software:
        line += (f"; --gpu auto builds for the CPU instead, and a Vulkan build uses it only when named "
                 f"(GGML_VK_VISIBLE_DEVICES={device.index})")
    return line


def summary_lines(hw: HardwareInfo) -> list[str]:
    """What ``velollm-patch detect`` prints."""
    cpu = hw.cpu
    l3 = f", L3 {cpu.l3_cache_bytes // MiB} MiB" if cpu.l3_cache_bytes else ""
    isa = [flag for flag in KEY_FLAGS if flag in cpu.flags]
    lines = [
        f"OS: {hw.os} ({cpu.arch})" + (f", {hw.apple_chip}" if hw.apple_chip else ""),
        f"CPU: {cpu.model} — {cpu.physical_cores} cores / {cpu.logical_cores} threads{l3}",
        f"  ISA: {' '.join(isa) if isa else 'none of note'}",
        f"RAM: {_gib(hw.memory.total_bytes)} total, {_gib(hw.memory.available_bytes)} available",
    ]
    lines += [_gpu_line(gpu) for gpu in hw.gpus] or ["GPU: none"]
    lines += [
        *(_vulkan_line(device) for device in hw.vulkan_devices),
        *(["Vulkan: no device"] if not hw.vulkan_devices else []),
        f"Disk free for builds: {_gib(hw.disk_free_bytes)}",
        f"Backend: {hw.backend()}",
        "Toolchain:",
    ]
    for field in dataclasses.fields(hw.toolchain):
        tool: Tool = getattr(hw.toolchain, field.name)
        if tool.present:
            lines.append(f"  {tool.name:<14} {tool.version or 'version unknown':<10} {tool.path}")
        else:
            lines.append(f"  {tool.name:<14} absent")
    return lines
