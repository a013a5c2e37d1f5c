"""The Vulkan backend: its toolchain checks, and real Vulkan builds on Mesa's software device (llvmpipe).

llvmpipe is a real Vulkan 1.3 implementation that runs on the CPU, so the Vulkan backend, our patches next to
it and the tuner's offload plans can be tested on any machine (ci/install-vulkan-toolchain.sh installs it).
ggml-vulkan skips CPU-type devices unless GGML_VK_VISIBLE_DEVICES names them; these tests name it. Speed on
llvmpipe means nothing; outputs, memory placement and plans do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import _server_starter
from tests.helpers import recorded_hardware
from velollm_patch import hardware, serve, tune
from velollm_patch.bench.runner import RunResult, load_result
from velollm_patch.build import BuildOptions, plan_build, run_build
from velollm_patch.builds import InstalledBuild
from velollm_patch.cli import main
from velollm_patch.errors import VelollmError
from velollm_patch.hardware import HardwareInfo, Tool
from velollm_patch.model import inspect_model
from velollm_patch.paths import Paths
from velollm_patch.tune import BuildFacts, TuneRequest
from velollm_patch.units import MiB

VULKAN_CORE_H = """\
#define VK_HEADER_VERSION {patch}
#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION(0, 1, {minor}, VK_HEADER_VERSION)
"""


def write_vulkan_headers(include: Path, minor: int, patch: int) -> Path:
    (include / "vulkan").mkdir(parents=True)
    (include / "vulkan" / "vulkan.h").write_text("#include \"vulkan_core.h\"\n")
    (include / "vulkan" / "vulkan_core.h").write_text(VULKAN_CORE_H.format(minor=minor, patch=patch))
    return include


def test_header_version_is_read_from_vulkan_core_h(tmp_path: Path) -> None:
    assert hardware.vulkan_header_version(write_vulkan_headers(tmp_path / "a", 3, 239)) == "1.3.239"
    assert hardware.vulkan_header_version(write_vulkan_headers(tmp_path / "b", 4, 309)) == "1.4.309"
    assert hardware.vulkan_header_version(tmp_path / "none") is None


def test_vulkan_sdk_headers_come_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CMake's FindVulkan searches $VULKAN_SDK/include before the system's, and so must the check
    write_vulkan_headers(tmp_path / "sdk" / "include", 4, 309)
    monkeypatch.setenv("VULKAN_SDK", str(tmp_path / "sdk"))
    assert hardware.probe_vulkan_headers() == Tool("vulkan_headers", str(tmp_path / "sdk" / "include"), "1.4.309")


def test_spirv_headers_config_is_found_with_its_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "sdk" / "share" / "cmake" / "SPIRV-Headers"
    config.mkdir(parents=True)
    (config / "SPIRV-HeadersConfig.cmake").write_text("")
    (config / "SPIRV-HeadersConfigVersion.cmake").write_text('set(PACKAGE_VERSION "1.5.5")\n')
    monkeypatch.setenv("VULKAN_SDK", str(tmp_path / "sdk"))
    assert hardware.probe_spirv_headers() == Tool("spirv_headers", str(config), "1.5.5")


# --- build plans -------------------------------------------------------------------------------


def vulkan_toolchain(hw: HardwareInfo, **changes: Tool) -> HardwareInfo:
    tools = {
        "glslc": Tool("glslc", "/usr/bin/glslc", "2023.2"),
        "glslang": Tool("glslang", "/usr/bin/glslangValidator", "12.0.0"),
        "vulkan_headers": Tool("vulkan_headers", "/usr/local/include", "1.4.309"),
        "spirv_headers": Tool("spirv_headers", "/usr/share/cmake/SPIRV-Headers", "1.5.5"),
    }
    return dataclasses.replace(hw, toolchain=dataclasses.replace(hw.toolchain, **(tools | changes)))


@pytest.fixture
def tmp_paths(tmp_path: Path) -> Paths:
    return Paths(data=tmp_path / "data", cache=tmp_path / "cache")


def test_vulkan_plan_names_the_headers_it_checked(tmp_paths: Paths) -> None:
    plan = plan_build(BuildOptions(gpu="vulkan"), vulkan_toolchain(recorded_hardware("cpu-2core")), tmp_paths,
                      fetch=False)
    assert plan.backend == "vulkan" and plan.build_id.split("-")[1] == "vulkan"
    assert {"-DGGML_VULKAN=ON", "-DVulkan_INCLUDE_DIR=/usr/local/include"} <= set(plan.cmake_args)


@pytest.mark.parametrize(
    ("tool", "message"),
    [
        (Tool("vulkan_headers", None, None), "needs the Vulkan headers and loader.*install libvulkan-dev 1.3.261"),
        (Tool("vulkan_headers", "/usr/include", "1.3.239"),
         "Vulkan headers in /usr/include are version 1.3.239, older than this llama.cpp needs \\(1.3.261"),
        (Tool("vulkan_headers", "/usr/include", None), "version unknown, older than"),
        (Tool("glslc", None, None), "needs glslc .*install glslc"),
        (Tool("glslang", None, None), "needs glslangValidator.*install glslang-tools"),
        (Tool("spirv_headers", None, None), "needs SPIRV-Headers.*install spirv-headers"),
    ],
)
def test_a_missing_or_old_vulkan_toolchain_is_one_line(tmp_paths: Paths, tool: Tool, message: str) -> None:
    hw = vulkan_toolchain(recorded_hardware("cpu-2core"), **{tool.name: tool})
    with pytest.raises(VelollmError, match=message) as raised:
        plan_build(BuildOptions(gpu="vulkan"), hw, tmp_paths, fetch=False)
    assert "\n" not in str(raised.value) and "--gpu cpu" in str(raised.value)
    assert not (tmp_paths.cache / "work").exists()


# --- real Vulkan builds on llvmpipe (slow) -----------------------------------------------------


@pytest.fixture(scope="module")
def llvmpipe_env(live_hardware: HardwareInfo) -> dict[str, str]:
    """The environment that makes a Vulkan build use this machine's software Vulkan device."""
    software = [d for d in live_hardware.vulkan_devices if d.is_software]
    tools = live_hardware.toolchain
    missing = [t.name for t in (tools.glslc, tools.glslang, tools.vulkan_headers, tools.spirv_headers)
               if not t.present]
    if not software or missing:
        lacking = ", ".join(missing) or "llvmpipe"
        why = f"no software Vulkan device ({lacking} missing): run ci/install-vulkan-toolchain.sh"
        if os.environ.get("VELOLLM_REQUIRE_VULKAN"):  # CI installs it, so there a skip would hide a failure
            pytest.fail(why)
        pytest.skip(why)
    return {"GGML_VK_VISIBLE_DEVICES": str(software[0].index)}


def _vulkan_build(paths: Paths, hw: HardwareInfo, model: Path, patches: str, *targets: str) -> InstalledBuild:
    # only the tools these tests run: the Vulkan lane's two builds are the longest part of CI
    options = BuildOptions(gpu="vulkan", patches=patches, smoke_model=model, make_current=False, wait=3600,
                           targets=("llama-server", *targets))
    return run_build(plan_build(options, hw, paths), hw, paths)


@pytest.fixture(scope="module")
def vulkan_patched(
    llvmpipe_env: dict[str, str], paths: Paths, live_hardware: HardwareInfo, smollm2_gguf: Path,
    patched_build: InstalledBuild,
) -> InstalledBuild:
    """The whole series built for Vulkan (after the CPU build, so ccache shares the CPU objects)."""
    return _vulkan_build(paths, live_hardware, smollm2_gguf, "all", "llama-fit-params")  # the tuner's oracle


@pytest.fixture(scope="module")
def vulkan_vanilla(
    llvmpipe_env: dict[str, str], paths: Paths, live_hardware: HardwareInfo, smollm2_gguf: Path,
    vulkan_patched: InstalledBuild,
) -> InstalledBuild:
    return _vulkan_build(paths, live_hardware, smollm2_gguf, "none")


@pytest.fixture
def start_vulkan(tmp_path: Path, llvmpipe_env: dict[str, str]) -> Iterator[Callable[..., serve.RunningServer]]:
    """``start(build, model, *args)``: a server of ``build`` on the software device; stopped after the test."""
    starters: list[Iterator[Callable[..., serve.RunningServer]]] = []

    def start(build: InstalledBuild, model: Path, *args: str, env: dict[str, str] | None = None) -> serve.RunningServer:
        starter = _server_starter(build.bin("llama-server"), tmp_path, f"{build.build_id}-{len(starters)}")
        starters.append(starter)
        return next(starter)(model, *args, "-lv", "4", env={**llvmpipe_env, **(env or {})})

    yield start
    for starter in starters:
        next(starter, None)  # stops its servers


def _offloaded(server: serve.RunningServer) -> tuple[int, int]:
    """"offloaded N/M layers to GPU" from the load log (the server logs it from -lv 4 on)."""
    match = re.search(r"offloaded (\d+)/(\d+) layers to GPU", server.log_text())
    assert match, server.log_tail()
    return int(match[1]), int(match[2])


# General prompts, none of them the bench's: greedy text must match token for token.
PROMPTS = (
    "The three primary colors are",
    "def is_prime(n):\n",
    "Q: Why is the sky blue?\nA:",
)
N_PREDICT = 16


@pytest.mark.slow
def test_detect_reports_the_software_device(llvmpipe_env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["detect", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    devices = [d for d in data["vulkan_devices"] if d["device_type"] == "cpu"]
    assert devices and "llvmpipe" in devices[0]["name"]
    assert data["vulkan"] is False  # a software device is not a GPU to build for ...
    plan = CliRunner().invoke(main, ["build", "--gpu", "auto", "--dry-run"])
    assert plan.exit_code == 0 and "backend:  cpu" in plan.output  # ... so --gpu auto stays on the CPU


@pytest.mark.slow
def test_builds_see_the_device_only_when_it_is_named(
    vulkan_patched: InstalledBuild, vulkan_vanilla: InstalledBuild, llvmpipe_env: dict[str, str]
) -> None:
    for build in (vulkan_patched, vulkan_vanilla):
        (device,) = serve.list_devices(build.bin("llama-server"), llvmpipe_env)
        assert device.name == "Vulkan0" and "llvmpipe" in device.description and device.total_bytes > 0
        assert serve.list_devices(build.bin("llama-server"), {"GGML_VK_VISIBLE_DEVICES": ""}) == ()
    assert vulkan_patched.manifest["backend"] == "vulkan" and vulkan_patched.patch_names
    assert not vulkan_vanilla.patch_names


@pytest.mark.slow
@pytest.mark.parametrize("layers", ["99", "12"], ids=["all-layers", "partial"])
def test_greedy_text_is_the_same_on_vanilla_and_patched(
    start_vulkan: Callable[..., serve.RunningServer], vulkan_patched: InstalledBuild,
    vulkan_vanilla: InstalledBuild, smollm2_gguf: Path, smollm2_f16_gguf: Path, layers: str,
) -> None:
    # All layers: the quantized model, every matrix on the device. Partial: the CPU runs the other layers, where
    # the patched build's Q4_1 repack kernels round differently (as on a CPU build), so the F16 model is used.
    model = smollm2_gguf if layers == "99" else smollm2_f16_gguf
    texts = []
    for build in (vulkan_vanilla, vulkan_patched):
        server = start_vulkan(build, model, "-ngl", layers, "-c", "1024", "-np", "1")
        n, total = _offloaded(server)
        assert (n == total) if layers == "99" else (n == int(layers) < total), (n, total)
        texts.append([serve.complete(server, p, n_predict=N_PREDICT)["content"] for p in PROMPTS])
        server.stop()
    vanilla, patched = texts
    assert all(len(t) > 0 for t in vanilla)
    assert patched == vanilla


@pytest.mark.slow
def test_kv_on_demand_next_to_offloaded_layers(
    start_vulkan: Callable[..., serve.RunningServer], vulkan_patched: InstalledBuild, smollm2_gguf: Path,
) -> None:
    """Host-side layers' KV is reserved and committed on demand; the device-side layers' KV is preallocated on
    the device as upstream does, and with every layer on the device the flag says it had nothing to do."""
    n_layers = inspect_model(smollm2_gguf).n_layers
    common = ("-c", "8192", "-np", "1", "-fa", "on", "--kv-on-demand")
    on_cpu = start_vulkan(vulkan_patched, smollm2_gguf, "-ngl", "0", *common)
    reserved_all = on_cpu.metrics()["kv_reserved_bytes"]
    on_cpu.stop()

    # -ngl 12: the output layer and the last 11 repeating layers on the device, the first 19 on the CPU
    partial = start_vulkan(vulkan_patched, smollm2_gguf, "-ngl", "12", *common)
    assert _offloaded(partial) == (12, n_layers + 1)
    device_share = 11 / n_layers
    log = partial.log_text()
    assert re.search(r"CPU KV buffer size = .* \(reserved, committed on demand\)", log), log
    assert re.search(r"Vulkan0 KV buffer size = ", log), log
    idle = partial.metrics()
    assert idle["kv_on_demand"] == 1
    # the gauges count the whole cache: reserved is every layer's KV; committed is the device layers' KV
    # (preallocated there, as upstream) plus the host pages in use, none yet
    assert idle["kv_reserved_bytes"] == pytest.approx(reserved_all, rel=0.01)
    assert idle["kv_committed_bytes"] == pytest.approx(reserved_all * device_share, rel=0.02)
    # a short prompt: llvmpipe computes a 600-token prompt in minutes
    serve.complete(partial, " ".join(["The quick brown fox jumps over the lazy dog."] * 12), n_predict=2)
    used = partial.metrics()
    host_bytes_per_cell = reserved_all * (1 - device_share) / idle["kv_cells"]
    grown = used["kv_committed_bytes"] - idle["kv_committed_bytes"]
    assert used["kv_high_water_cells"] >= 100
    # the host layers' pages follow the cells written (plus at most a page per region)
    assert used["kv_high_water_cells"] * host_bytes_per_cell <= grown
    assert grown <= (used["kv_high_water_cells"] + 256) * host_bytes_per_cell
    partial.stop()

    all_on_device = start_vulkan(vulkan_patched, smollm2_gguf, "-ngl", "99", *common)
    assert "no KV buffer was allocated on demand" in all_on_device.log_text()
    assert all_on_device.metrics()["kv_on_demand"] == 0
    assert serve.complete(all_on_device, PROMPTS[0], n_predict=4)["content"]


@pytest.mark.slow
def test_the_tuners_plan_splits_a_long_context_and_the_server_takes_it(
    start_vulkan: Callable[..., serve.RunningServer], vulkan_patched: InstalledBuild, smollm2_gguf: Path,
    live_hardware: HardwareInfo, paths: Paths, llvmpipe_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in llvmpipe_env.items():
        monkeypatch.setenv(name, value)
    facts = BuildFacts.from_build(vulkan_patched, paths)
    (device,) = facts.devices
    model = inspect_model(smollm2_gguf)
    # 8 slots of 8192 tokens, f16: a 1.4 GiB KV cache, more than the device's 2 GiB less llama-fit-params' margin
    plan = tune.plan(model, live_hardware, facts, TuneRequest(ctx=8192, slots=8, profile="quality", draft="none"))
    layers = int(plan.args[plan.args.index("--gpu-layers") + 1])
    assert 0 < layers < model.n_layers + 1, plan.describe()
    assert "llama-fit-params" in plan.reason("gpu_layers")
    assert "llvmpipe" in plan.reason("backend")

    server = start_vulkan(vulkan_patched, smollm2_gguf, *plan.args, env=plan.env)
    assert _offloaded(server) == (layers, model.n_layers + 1)
    assert serve.complete(server, PROMPTS[2], n_predict=8)["content"]
    # what the device holds, by the server's own account at exit (common_memory_breakdown_print: MiB of
    # "self = model + context + compute"), against the plan's device share from llama-fit-params
    server.stop()
    breakdown = re.search(r"- Vulkan0 .*?\|\s*\d+ = \s*\d+ \+ \(\s*(\d+) =", server.log_text())
    assert breakdown, server.log_tail()
    device_used = int(breakdown[1]) * MiB
    print(f"vulkan plan {layers}/{model.n_layers + 1} layers: device planned {plan.memory.device_bytes / MiB:.0f} MiB, "
          f"used {device_used / MiB:.0f} MiB of {device.total_bytes / MiB:.0f} MiB")
    assert plan.memory.device_bytes <= device.free_bytes
    assert abs(device_used - plan.memory.device_bytes) <= 0.02 * plan.memory.device_bytes + MiB  # MiB rounding


@pytest.mark.slow
def test_adaptive_speculation_and_bench_on_the_vulkan_build(
    start_vulkan: Callable[..., serve.RunningServer], vulkan_patched: InstalledBuild, smollm2_gguf: Path,
    smollm2_f16_gguf: Path, llvmpipe_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    server = start_vulkan(
        vulkan_patched, smollm2_f16_gguf, "-ngl", "99", "-c", "1024", "-np", "1",
        "-md", str(smollm2_gguf), "-ngld", "99", "--spec-type", "draft-simple", "--spec-adaptive",
    )
    result = serve.complete(server, PROMPTS[1], n_predict=32)
    assert result["timings"]["draft_n"] > 0 and result["timings"]["draft_n_accepted"] > 0
    stats = server.slots()[0]["speculative_stats"]
    assert stats["adaptive"] is True and stats["n_steps"] > 0
    server.stop()

    for name, value in llvmpipe_env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "bench"
    run = CliRunner().invoke(main, [
        "bench", "run", vulkan_patched.build_id, "--tuned", "chat", "--server-args", "-c 2048",
        "--scenarios", "short", "--repeats", "1", "--warmup", "0", "--n-predict", "8", "--out", str(out),
        "--no-charts",
    ])
    assert run.exit_code == 0, run.output
    saved = load_result(out / "result.json")
    assert isinstance(saved, RunResult) and saved.status == "complete"
    assert "--gpu-layers" in (saved.target.command or "")
