"""Machine detection: recorded machines replayed through the probes, parsers fed real tool output,
and one live run on whatever machine the tests are on."""

from __future__ import annotations

import dataclasses
import json
import platform
import stat
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from velollm_patch import hardware
from velollm_patch.errors import VelollmError
from velollm_patch.hardware import (
    TOOL_NAMES,
    CPUInfo,
    GPUInfo,
    HardwareInfo,
    MemoryInfo,
    Probes,
    Tool,
    Toolchain,
    VulkanDevice,
)
from velollm_patch.units import GiB

DATA = Path(__file__).parent / "data" / "hardware"
RECORDED = sorted(DATA.glob("*.json"))


def load(name: str) -> HardwareInfo:
    return HardwareInfo.from_dict(json.loads((DATA / f"{name}.json").read_text()))


def absent_tool(name: str) -> Tool:
    return Tool(name, None, None)


def replay(hw: HardwareInfo) -> Probes:
    """Probes that read back a recorded machine."""
    return Probes(
        system=lambda: hw.os,
        nvidia=lambda: [g for g in hw.gpus if g.vendor == "nvidia"],
        amd=lambda: [g for g in hw.gpus if g.vendor == "amd"],
        apple=lambda: [g for g in hw.gpus if g.vendor == "apple"],
        vulkan=lambda: hw.vulkan_devices,
        cpu=lambda: hw.cpu,
        memory=lambda: hw.memory,
        disk_free=lambda _path: hw.disk_free_bytes,
        tool=lambda name: getattr(hw.toolchain, name),
    )


# --- recorded machines -------------------------------------------------------------------------


def test_all_expected_recordings_exist() -> None:
    names = {path.stem for path in RECORDED}
    assert {"h100", "rtx3060", "rtx4090", "m2max", "cpu-2core", "rx7900xtx"} <= names


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_recording_round_trips(path: Path) -> None:
    data = json.loads(path.read_text())
    hw = HardwareInfo.from_dict(data)
    assert hw.to_dict() == data
    assert HardwareInfo.from_dict(json.loads(json.dumps(hw.to_dict()))) == hw
    # Complete: every tool is recorded, present or not, and flags are stored sorted.
    assert set(data["toolchain"]) == set(TOOL_NAMES)
    assert data["cpu"]["flags"] == sorted(data["cpu"]["flags"])
    assert hw.cpu.physical_cores <= hw.cpu.logical_cores
    assert 0 < hw.memory.available_bytes <= hw.memory.total_bytes


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
def test_detect_replays_recording(path: Path) -> None:
    hw = HardwareInfo.from_dict(json.loads(path.read_text()))
    assert hardware.detect(replay(hw), build_dir=Path("/nonexistent")) == hw


@pytest.mark.parametrize(
    ("name", "backend"),
    [("h100", "cuda"), ("rtx3060", "cuda"), ("rtx4090", "cuda"), ("m2max", "metal"),
     ("rx7900xtx", "rocm"), ("cpu-2core", "cpu")],
)
def test_recorded_backend(name: str, backend: str) -> None:
    assert load(name).backend() == backend


@pytest.mark.parametrize(
    ("name", "capability", "vram"),
    [("h100", "9.0", 85520809984), ("rtx3060", "8.6", 12884901888), ("rtx4090", "8.9", 25757220864)],
)
def test_recorded_nvidia_machines(name: str, capability: str, vram: int) -> None:
    hw = load(name)
    (gpu,) = hw.gpus
    assert (gpu.vendor, gpu.compute_capability, gpu.vram_total_bytes) == ("nvidia", capability, vram)
    assert gpu.cuda_driver_version and gpu.driver_version
    assert hw.toolchain.nvcc.present and not hw.toolchain.hipcc.present


def test_recorded_h100_details() -> None:
    hw = load("h100")
    assert hw.gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert hw.gpus[0].cuda_driver_version == "12.8"
    assert hw.gpus[0].driver_version.startswith("570.")  # type: ignore[union-attr]
    for flag in ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8"):
        assert hw.cpu.has(flag), flag
    assert hw.memory.total_bytes > 1900 * GiB


def test_recorded_consumer_cpus() -> None:
    ryzen = load("rtx3060").cpu
    assert ryzen.has("avx2") and ryzen.has("fma") and not ryzen.has("avx512f")
    assert (ryzen.physical_cores, ryzen.logical_cores) == (6, 12)
    assert load("rtx3060").memory.total_bytes // GiB == 31  # 32 GiB installed, less firmware


def test_recorded_m2max() -> None:
    hw = load("m2max")
    (gpu,) = hw.gpus
    assert (hw.os, hw.cpu.arch, hw.apple_chip) == ("Darwin", "arm64", "Apple M2 Max")
    assert gpu.unified_memory and gpu.vram_free_bytes is None
    assert gpu.vram_total_bytes == hardware.metal_working_set_bytes(hw.memory.total_bytes)
    assert hw.memory.total_bytes == 32 * GiB
    for flag in ("neon", "dotprod", "i8mm", "fp16", "bf16"):
        assert hw.cpu.has(flag), flag
    assert not hw.toolchain.nvcc.present


def test_recorded_rx7900xtx() -> None:
    hw = load("rx7900xtx")
    (gpu,) = hw.gpus
    assert (gpu.vendor, gpu.gfx_target, gpu.vram_total_bytes) == ("amd", "gfx1100", 24560 * 1024**2)
    assert hw.toolchain.hipcc.present and hw.toolchain.hipcc.version == "6.2.41133"


def test_recorded_cpu_only_machine() -> None:
    hw = load("cpu-2core")
    assert hw.gpus == () and hw.total_vram_bytes == 0 and not hw.vulkan
    assert (hw.cpu.arch, hw.cpu.physical_cores) == ("x86_64", 2)
    assert hw.cpu.has("avx2") and not hw.cpu.has("avx512f")


# --- the data model ----------------------------------------------------------------------------


def nvidia_gpu(index: int = 0, vram: int = 8 * GiB) -> GPUInfo:
    return GPUInfo("nvidia", index, "NVIDIA Test", vram, vram, compute_capability="8.6")


@pytest.mark.parametrize(
    ("vendors", "vulkan", "backend"),
    [
        (["nvidia"], False, "cuda"),
        (["amd", "nvidia"], True, "cuda"),
        (["amd"], True, "rocm"),
        (["apple"], False, "metal"),
        ([], True, "vulkan"),
        ([], False, "cpu"),
    ],
)
def test_backend_choice(vendors: list[str], vulkan: bool, backend: str) -> None:
    gpus = tuple(GPUInfo(v, i, v, GiB, None) for i, v in enumerate(vendors))
    devices = (VulkanDevice(0, "a GPU", "discrete"),) if vulkan else ()
    hw = dataclasses.replace(load("cpu-2core"), gpus=gpus, vulkan_devices=devices)
    assert hw.backend() == backend


def test_a_software_vulkan_device_is_not_a_backend() -> None:
    # llvmpipe is a real Vulkan device, but slower than the CPU backend: --gpu auto builds for the CPU
    llvmpipe = VulkanDevice(0, "llvmpipe (LLVM 15.0.6, 256 bits)", "cpu", "1.3.230", "Mesa 22.3.6")
    hw = dataclasses.replace(load("cpu-2core"), vulkan_devices=(llvmpipe,))
    assert not hw.vulkan and hw.backend() == "cpu"
    (line,) = [line for line in hardware.summary_lines(hw) if line.startswith("Vulkan")]
    assert "llvmpipe" in line and "software, CPU type" in line and "GGML_VK_VISIBLE_DEVICES=0" in line


def test_records_from_before_the_vulkan_device_list_still_load() -> None:
    data = load("rtx3060").to_dict()
    for name in ("glslc", "glslang", "vulkan_headers", "spirv_headers"):
        del data["toolchain"][name]
    del data["vulkan_devices"]
    old = HardwareInfo.from_dict({**data, "vulkan": True})
    assert old.vulkan and old.backend() == "cuda" and not old.toolchain.glslc.present
    assert not HardwareInfo.from_dict({**data, "vulkan": False}).vulkan_devices


def test_total_vram_sums_all_gpus() -> None:
    hw = dataclasses.replace(load("cpu-2core"), gpus=(nvidia_gpu(0, 8 * GiB), nvidia_gpu(1, 12 * GiB)))
    assert hw.total_vram_bytes == 20 * GiB


def test_cpu_has_is_case_insensitive() -> None:
    cpu = CPUInfo("x", "x86_64", 1, 1, frozenset({"avx2"}), None)
    assert cpu.has("AVX2") and not cpu.has("avx512f")


def test_from_dict_defaults_optional_fields() -> None:
    data = load("cpu-2core").to_dict()
    del data["apple_chip"]
    data["gpus"] = [{"vendor": "amd", "index": 0, "name": "x", "vram_total_bytes": 1, "vram_free_bytes": None}]
    hw = HardwareInfo.from_dict(data)
    assert hw.apple_chip is None and hw.gpus[0].gfx_target is None and not hw.gpus[0].unified_memory


@pytest.mark.parametrize("damage", ["drop_cpu", "extra_gpu_field", "tool_not_object"])
def test_from_dict_rejects_malformed_record(damage: str) -> None:
    data = load("h100").to_dict()
    if damage == "drop_cpu":
        del data["cpu"]
    elif damage == "extra_gpu_field":
        data["gpus"][0]["bogus"] = 1
    else:
        data["toolchain"]["cmake"] = "3.25"
    with pytest.raises(VelollmError, match="malformed"):
        HardwareInfo.from_dict(data)


# --- NVIDIA through a fake pynvml --------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


def fake_nvml(
    devices: list[dict[str, Any]] | None = None,
    *,
    init_error: bool = False,
    cuda: int = 12080,
) -> ModuleType:
    """A stand-in for the ``pynvml`` module; device dicts say what each GPU answers."""
    module = ModuleType("fake_pynvml")
    devices = devices or []
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def fail_or(device: dict[str, Any], key: str) -> Any:
        value = device[key]
        if isinstance(value, Exception):
            raise value
        return value

    module.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    module.nvmlSystemGetDriverVersion = lambda: "570.124.06"  # type: ignore[attr-defined]
    module.nvmlSystemGetCudaDriverVersion = lambda: cuda  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(devices)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: devices[i]  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda d: fail_or(d, "name")  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda d: fail_or(d, "memory")  # type: ignore[attr-defined]
    module.nvmlDeviceGetCudaComputeCapability = lambda d: fail_or(d, "cc")  # type: ignore[attr-defined]
    return module


H100_DEVICE = {
    "name": b"NVIDIA H100 80GB HBM3",  # older nvidia-ml-py returns bytes
    "memory": SimpleNamespace(total=85520809984, free=84958904320, used=561905664),
    "cc": (9, 0),
}


def test_nvidia_probe_reads_devices() -> None:
    odd = {
        "name": "NVIDIA Odd GPU",
        "memory": SimpleNamespace(total=8 * GiB, free=7 * GiB, used=GiB),
        "cc": FakeNVMLError("Not Supported"),
    }
    nvml = fake_nvml([H100_DEVICE, odd])
    gpus = hardware.probe_nvidia(nvml)
    assert gpus[0] == load("h100").gpus[0]
    assert (gpus[1].index, gpus[1].name, gpus[1].compute_capability) == (1, "NVIDIA Odd GPU", None)
    assert nvml.calls == ["init", "shutdown"]


@pytest.mark.parametrize(("raw", "version"), [(12040, "12.4"), (13000, "13.0"), (11080, "11.8"), (0, None)])
def test_nvidia_cuda_driver_version(raw: int, version: str | None) -> None:
    (gpu,) = hardware.probe_nvidia(fake_nvml([H100_DEVICE], cuda=raw))
    assert gpu.cuda_driver_version == version


def test_nvidia_lost_gpu_is_skipped() -> None:
    lost = {"name": FakeNVMLError("GPU is lost"), "memory": None, "cc": None}
    gpus = hardware.probe_nvidia(fake_nvml([lost, H100_DEVICE]))
    assert [g.index for g in gpus] == [1]


def test_nvidia_without_driver_reads_as_no_gpu() -> None:
    nvml = fake_nvml([H100_DEVICE], init_error=True)
    assert hardware.probe_nvidia(nvml) == []
    assert nvml.calls == ["init"]


def test_nvidia_probe_with_real_pynvml_never_raises() -> None:
    # Whatever this machine has (usually no driver), the real module must not raise.
    gpus = hardware.probe_nvidia()
    assert all(g.vendor == "nvidia" and g.vram_total_bytes > 0 for g in gpus)


def test_nvidia_probe_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_module(name: str) -> ModuleType:
        raise ImportError(name)

    monkeypatch.setattr("importlib.import_module", no_module)
    assert hardware.probe_nvidia() == []


# --- AMD ---------------------------------------------------------------------------------------


ROCM_SMI_JSON = """WARNING: AMD GPU device(s) is/are in a low-power state. Check power control/runtime_status
{"card0": {"VRAM Total Memory (B)": "25753026560", "VRAM Total Used Memory (B)": "335544320",
  "Card Series": "Radeon RX 7900 XTX", "Card Model": "0x744c",
  "Card Vendor": "Advanced Micro Devices, Inc. [AMD/ATI]", "GFX Version": "gfx1100"},
 "card1": {"VRAM Total Memory (B)": "536870912", "VRAM Total Used Memory (B)": "41943040",
  "Card series": "Raphael", "GFX Version": "N/A"},
 "system": {"Driver version": "6.8.5"}}
"""


def test_parse_rocm_smi() -> None:
    xtx, igpu = hardware.parse_rocm_smi(ROCM_SMI_JSON)
    assert xtx == load("rx7900xtx").gpus[0]
    assert (igpu.index, igpu.name, igpu.gfx_target, igpu.vram_free_bytes) == (1, "Raphael", None, 494927872)


@pytest.mark.parametrize(
    "size", [{"value": 24560, "unit": "MB"}, "24560 MB"], ids=["value-unit", "string"]
)
@pytest.mark.parametrize("wrapped", [False, True])
def test_parse_amd_smi(size: Any, wrapped: bool) -> None:
    gpus = [{
        "gpu": 0,
        "asic": {"market_name": "Radeon RX 7900 XTX", "target_graphics_version": "gfx1100"},
        "vram": {"type": "GDDR6", "size": size},
        "driver": {"name": "amdgpu", "version": "6.8.5"},
    }]
    (gpu,) = hardware.parse_amd_smi(json.dumps({"gpu_data": gpus} if wrapped else gpus))
    assert gpu == dataclasses.replace(load("rx7900xtx").gpus[0], vram_free_bytes=None)


@pytest.mark.parametrize("output", [None, "", "not json", "{}", "[1, 2]", '{"card0": "N/A"}'])
def test_amd_tools_with_unusable_output(output: str | None) -> None:
    assert hardware.parse_amd_smi(output) == []
    assert hardware.parse_rocm_smi(output) == []


@pytest.mark.parametrize(
    ("version", "target"), [(110000, "gfx1100"), (100300, "gfx1030"), (90010, "gfx90a"), (90402, "gfx942"), (0, None)]
)
def test_gfx_target_from_version(version: int, target: str | None) -> None:
    assert hardware.gfx_target_from_version(version) == target


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def fake_amd_sysfs(root: Path) -> None:
    pci = root / "sys/devices/pci0000:00"
    amd = pci / "0000:03:00.0"
    write(amd / "vendor", "0x1002")
    write(amd / "device", "0x744c")
    write(amd / "mem_info_vram_total", "25753026560")
    write(amd / "mem_info_vram_used", "335544320")
    nv = pci / "0000:01:00.0"
    write(nv / "vendor", "0x10de")
    drm = root / "sys/class/drm"
    for link, target in (("card0", nv), ("card1", amd), ("renderD129", amd)):
        (drm / link).mkdir(parents=True)
        (drm / link / "device").symlink_to(target)
    (drm / "card1-DP-1").mkdir()  # connectors share the prefix but are not cards
    nodes = root / "sys/class/kfd/kfd/topology/nodes"
    write(nodes / "0/properties", "cpu_cores_count 16\ngfx_target_version 0\ndrm_render_minor 0")
    write(nodes / "1/properties", "simd_count 192\ngfx_target_version 110000\ndrm_render_minor 129")
    write(root / "sys/module/amdgpu/version", "6.8.5")


def test_amd_sysfs(tmp_path: Path) -> None:
    fake_amd_sysfs(tmp_path)
    (gpu,) = hardware.probe_amd_sysfs(tmp_path)
    expected = dataclasses.replace(load("rx7900xtx").gpus[0], name="AMD GPU 0x744c")
    assert gpu == expected


def test_amd_sysfs_absent(tmp_path: Path) -> None:
    assert hardware.probe_amd_sysfs(tmp_path) == []


def test_amd_probe_falls_back_to_sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_amd_sysfs(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert [g.gfx_target for g in hardware.probe_amd(tmp_path)] == ["gfx1100"]


# --- Apple -------------------------------------------------------------------------------------


def test_metal_working_set() -> None:
    # llama.cpp logs recommendedMaxWorkingSetSize = 21845.34 MB on a 32 GiB M2 Max.
    assert round(hardware.metal_working_set_bytes(32 * GiB) / 1024**2, 2) == 21845.33
    assert hardware.metal_working_set_bytes(64 * GiB) == 48 * GiB


def fake_darwin(monkeypatch: pytest.MonkeyPatch, sysctl: dict[str, str]) -> None:
    monkeypatch.setattr("platform.system", lambda: "Darwin")
    monkeypatch.setattr(hardware, "_sysctl", sysctl.get)


def test_apple_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_darwin(monkeypatch, {"machdep.cpu.brand_string": "Apple M2 Max", "hw.memsize": str(32 * GiB)})
    assert hardware.probe_apple() == list(load("m2max").gpus)


def test_apple_probe_honours_wired_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    sysctl = {"machdep.cpu.brand_string": "Apple M2 Max", "hw.memsize": str(32 * GiB),
              "iogpu.wired_limit_mb": "28672"}
    fake_darwin(monkeypatch, sysctl)
    assert hardware.probe_apple()[0].vram_total_bytes == 28 * GiB


def test_apple_probe_on_intel_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_darwin(monkeypatch, {"machdep.cpu.brand_string": "Intel(R) Core(TM) i9-9980HK", "hw.memsize": "1"})
    assert hardware.probe_apple() == []


def test_apple_probe_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.system", lambda: "Linux")
    assert hardware.probe_apple() == []


# --- Vulkan ------------------------------------------------------------------------------------


VULKAN_SUMMARY = """Devices:
========
GPU0:
\tapiVersion         = 1.3.277
\tvendorID           = 0x10de
\tdeviceType         = PHYSICAL_DEVICE_TYPE_DISCRETE_GPU
\tdeviceName         = NVIDIA GeForce RTX 4090
GPU1:
\tvendorID           = 0x10005
\tdeviceType         = PHYSICAL_DEVICE_TYPE_CPU
\tdeviceName         = llvmpipe (LLVM 17.0.6, 256 bits)
"""


def test_vulkan_summary() -> None:
    gpu, llvmpipe = hardware.parse_vulkan_summary(VULKAN_SUMMARY)
    assert (gpu.index, gpu.name, gpu.device_type, gpu.is_software) == (0, "NVIDIA GeForce RTX 4090", "discrete", False)
    assert (llvmpipe.index, llvmpipe.device_type, llvmpipe.is_software) == (1, "cpu", True)
    assert llvmpipe.name == "llvmpipe (LLVM 17.0.6, 256 bits)"
    assert hardware.parse_vulkan_summary("Devices:\n========\n") == ()


@pytest.mark.parametrize(
    ("icds", "loader", "expected"),
    [(["nvidia_icd.json"], True, ["other"]), (["nvidia_icd.json"], False, []),
     (["lvp_icd.x86_64.json"], True, ["cpu"]), (["lvp_icd.x86_64.json", "nvidia_icd.json"], True, ["other", "cpu"]),
     ([], True, [])],
)
def test_vulkan_without_vulkaninfo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, icds: list[str], loader: bool, expected: list[str]
) -> None:
    for name in icds:
        write(tmp_path / "usr/share/vulkan/icd.d" / name, "{}")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr("platform.system", lambda: "Linux")
    monkeypatch.setattr(hardware, "_vulkan_loader_loadable", lambda: loader)
    devices = hardware.probe_vulkan(tmp_path)
    assert [d.device_type for d in devices] == expected
    assert [d.index for d in devices] == list(range(len(expected)))


# --- CPU ---------------------------------------------------------------------------------------


X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model\t\t: 33
model name\t: AMD Ryzen 5 5600X 6-Core Processor
flags\t\t: fpu sse sse2 avx avx2 fma f16c
vmx flags\t: not_a_flag

processor\t: 1
model name\t: AMD Ryzen 5 5600X 6-Core Processor
flags\t\t: fpu sse sse2 avx avx2 fma f16c
"""

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop \
asimddp sve i8mm bf16 sve2
CPU implementer\t: 0x41
CPU part\t: 0xd4f
"""


def test_parse_x86_cpuinfo() -> None:
    model, flags = hardware.parse_cpuinfo(X86_CPUINFO)
    assert model == "AMD Ryzen 5 5600X 6-Core Processor"
    assert flags == {"fpu", "sse", "sse2", "avx", "avx2", "fma", "f16c"}


def test_parse_arm_cpuinfo_adds_compiler_names() -> None:
    model, flags = hardware.parse_cpuinfo(ARM_CPUINFO)
    assert model is None  # no name in ARM server cpuinfo: the probe falls back
    assert {"asimd", "neon", "asimddp", "dotprod", "asimdhp", "fp16", "sve", "sve2", "i8mm", "bf16"} <= flags


def test_parse_raspberry_pi_model() -> None:
    model, _ = hardware.parse_cpuinfo("Features\t: fp asimd\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
    assert model == "Raspberry Pi 4 Model B Rev 1.4"


def test_parse_darwin_optional() -> None:
    output = (
        "hw.optional.arm.FEAT_DotProd: 1\nhw.optional.arm.FEAT_I8MM: 1\nhw.optional.arm.FEAT_SME: 0\n"
        "hw.optional.neon: 1\nhw.optional.AdvSIMD: 1\nhw.optional.avx2_0: 1\nhw.optional.avx1_0: 1\n"
        "hw.optional.avx512vnni: 1\nhw.optional.breakpoint: 6\n"
    )
    assert hardware.parse_darwin_optional(output) == {
        "dotprod", "i8mm", "neon", "avx2", "avx", "avx512_vnni",
    }


def test_linux_cpu_probe_reads_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.system", lambda: "Linux")
    write(tmp_path / "proc/cpuinfo", X86_CPUINFO)
    cache = tmp_path / "sys/devices/system/cpu/cpu0/cache"
    for index, (level, size) in enumerate([("1", "32K"), ("2", "512K"), ("3", "32768K")]):
        write(cache / f"index{index}/level", level)
        write(cache / f"index{index}/size", size)
    cpu = hardware.probe_cpu(tmp_path)
    assert cpu.model == "AMD Ryzen 5 5600X 6-Core Processor"
    assert cpu.l3_cache_bytes == 32 * 1024**2 and cpu.has("avx2")
    assert cpu.arch == platform.machine() and 1 <= cpu.physical_cores <= cpu.logical_cores


def test_linux_cpu_probe_on_bare_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("platform.system", lambda: "Linux")
    cpu = hardware.probe_cpu(tmp_path)
    assert cpu.model and cpu.flags == frozenset() and cpu.l3_cache_bytes is None


def test_darwin_cpu_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_darwin(monkeypatch, {"machdep.cpu.brand_string": "Apple M2 Max", "hw.l3cachesize": "0"})
    monkeypatch.setattr(hardware, "_output", lambda args: "hw.optional.neon: 1\nhw.optional.arm.FEAT_DotProd: 1\n")
    cpu = hardware.probe_cpu()
    assert (cpu.model, cpu.flags, cpu.l3_cache_bytes) == ("Apple M2 Max", frozenset({"neon", "dotprod"}), None)


# --- memory, disk ------------------------------------------------------------------------------


def test_disk_free_of_a_directory_not_yet_created(tmp_path: Path) -> None:
    assert hardware.probe_disk_free(tmp_path / "not" / "yet" / "there") > 0


def test_memory_probe() -> None:
    memory = hardware.probe_memory()
    assert 0 < memory.available_bytes <= memory.total_bytes


# --- toolchain ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "output", "version"),
    [
        ("cmake", "cmake version 3.25.1\n\nCMake suite maintained and supported by Kitware", "3.25.1"),
        ("ninja", "1.11.1\n", "1.11.1"),
        ("cc", "cc (Debian 12.2.0-14+deb12u1) 12.2.0\nCopyright (C) 2022", "12.2.0"),
        ("cc", "gcc (GCC) 13.2.1 20230801\n", "13.2.1"),
        ("cxx", "Ubuntu clang version 18.1.3 (1ubuntu1)\nTarget: x86_64-pc-linux-gnu", "18.1.3"),
        ("cc", "Apple clang version 15.0.0 (clang-1500.3.9.4)\nTarget: arm64-apple-darwin23.5.0", "15.0.0"),
        ("nvcc", "nvcc: NVIDIA (R) Cuda compiler driver\nCopyright (c) 2005-2025 NVIDIA Corporation\n"
                 "Built on Wed_Aug_20_01:58:59_PM_PDT_2025\n"
                 "Cuda compilation tools, release 13.0, V13.0.88\n", "13.0"),
        ("hipcc", "HIP version: 6.2.41133-dd7f95766\nAMD clang version 18.0.0git", "6.2.41133"),
        ("ccache", "ccache version 4.7.5\nFeatures: file-storage http-storage", "4.7.5"),
        ("git", "git version 2.39.3 (Apple Git-146)", "2.39.3"),
        ("cmake", "usage: something odd", None),
        ("nvcc", "", None),
    ],
)
def test_parse_tool_version(name: str, output: str, version: str | None) -> None:
    assert hardware.parse_tool_version(name, output) == version


def fake_tool(directory: Path, name: str, script: str) -> Path:
    path = directory / name
    write(path, f"#!/bin/sh\n{script}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_missing_tool_reads_as_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    tool = hardware.probe_tool("cmake")
    assert tool == Tool("cmake", None, None) and not tool.present


def test_tool_whose_version_fails_is_present_without_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = fake_tool(tmp_path, "ninja", "echo broken; exit 3")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert hardware.probe_tool("ninja") == Tool("ninja", str(path), None)


def test_cc_honours_environment_with_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The launcher gets the configured arguments before --version.
    path = fake_tool(tmp_path, "mycc", 'echo "mycc version 9.1.0 args: $*"')
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CC", "mycc -m64")
    tool = hardware.probe_tool("cc")
    assert tool == Tool("cc", str(path), "9.1.0")


def test_nvcc_found_outside_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = fake_tool(tmp_path / "cuda/bin", "nvcc", 'echo "Cuda compilation tools, release 12.4, V12.4.131"')
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert hardware.probe_tool("nvcc") == Tool("nvcc", str(path), "12.4")


# --- detect ------------------------------------------------------------------------------------


def test_detect_with_no_driver_and_no_tools() -> None:
    probes = Probes(
        system=lambda: "Linux",
        nvidia=lambda: hardware.probe_nvidia(fake_nvml([H100_DEVICE], init_error=True)),
        amd=list,
        apple=list,
        vulkan=tuple,
        cpu=lambda: CPUInfo("Test CPU", "x86_64", 2, 4, frozenset({"avx2"}), None),
        memory=lambda: MemoryInfo(8 * GiB, 6 * GiB),
        disk_free=lambda _path: 10 * GiB,
        tool=absent_tool,
    )
    hw = hardware.detect(probes, build_dir=Path("/tmp"))
    assert hw.gpus == () and hw.backend() == "cpu" and hw.apple_chip is None
    assert not any(getattr(hw.toolchain, name).present for name in TOOL_NAMES)
    assert hw.toolchain == Toolchain(*(absent_tool(name) for name in TOOL_NAMES))


def test_detect_names_the_apple_chip_after_its_gpu() -> None:
    m2 = load("m2max")
    hw = hardware.detect(dataclasses.replace(replay(m2), apple=lambda: list(m2.gpus)))
    assert hw.apple_chip == "Apple M2 Max"


def test_detect_measures_disk_where_builds_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VELOLLM_HOME", str(tmp_path))
    seen: list[Path] = []

    def disk_free(path: Path) -> int:
        seen.append(path)
        return GiB

    probes = dataclasses.replace(replay(load("cpu-2core")), disk_free=disk_free)
    hardware.detect(probes)
    hardware.detect(probes, build_dir=tmp_path / "builds")
    assert seen == [tmp_path.resolve() / "cache", tmp_path / "builds"]


def test_live_detect_on_this_machine(tmp_path: Path) -> None:
    hw = hardware.detect(build_dir=tmp_path / "build")
    assert hw.os == platform.system()
    assert 1 <= hw.cpu.physical_cores <= hw.cpu.logical_cores
    assert hw.cpu.model and hw.cpu.arch == platform.machine()
    assert 0 < hw.memory.available_bytes <= hw.memory.total_bytes
    assert hw.disk_free_bytes > 0
    assert hw.toolchain.cmake.present and hw.toolchain.cmake.version
    assert hw.backend() in {"cuda", "rocm", "metal", "vulkan", "cpu"}
    assert HardwareInfo.from_dict(json.loads(json.dumps(hw.to_dict()))) == hw


# --- summary -----------------------------------------------------------------------------------


def test_summary_for_h100() -> None:
    text = "\n".join(hardware.summary_lines(load("h100")))
    assert "NVIDIA H100 80GB HBM3 — 79.6 GiB VRAM" in text
    assert "compute 9.0" in text and "CUDA 12.8" in text and "driver 570.124.06" in text
    assert "Intel(R) Xeon(R) Platinum 8480+ — 112 cores / 224 threads, L3 105 MiB" in text
    assert "amx_tile" in text and "avx512f" in text
    assert "Backend: cuda" in text
    assert any(line.split() == ["nvcc", "12.8", "/usr/local/cuda/bin/nvcc"] for line in text.splitlines())
    assert any(line.split() == ["hipcc", "absent"] for line in text.splitlines())


def test_summary_for_mac_and_cpu_only() -> None:
    mac = "\n".join(hardware.summary_lines(load("m2max")))
    assert "Apple M2 Max — 21.3 GiB unified memory for Metal" in mac and "neon dotprod i8mm" in mac
    cpu = hardware.summary_lines(load("cpu-2core"))
    assert "GPU: none" in cpu and "Backend: cpu" in cpu


def test_summary_for_tool_without_version() -> None:
    hw = load("cpu-2core")
    hw = dataclasses.replace(hw, toolchain=dataclasses.replace(hw.toolchain, git=Tool("git", "/x/git", None)))
    assert any(line.split() == ["git", "version", "unknown", "/x/git"] for line in hardware.summary_lines(hw))
