"""Build planning for recorded machines: backend choice, CMake flags, and the errors for bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.helpers import make_toolkit, recorded_hardware
from velollm_patch.build import TARGETS, BuildOptions, cuda_arch, plan_build
from velollm_patch.errors import VelollmError
from velollm_patch.hardware import HardwareInfo, Tool
from velollm_patch.paths import Paths


@pytest.fixture
def tmp_paths(tmp_path: Path) -> Paths:
    return Paths(data=tmp_path / "data", cache=tmp_path / "cache")


def _plan(machine: str | HardwareInfo, tmp_paths: Paths, **options: object) -> list[str]:
    hw = recorded_hardware(machine) if isinstance(machine, str) else machine
    # a recorded machine's toolkit is not this machine's: CUDA plans get one with the toolkit's own cuBLAS
    toolkit = make_toolkit(tmp_paths.data.parent / "toolkit", cublas="toolkit", driver="system")
    plan = plan_build(BuildOptions(**options), hw, tmp_paths, fetch=False, toolkit=toolkit)  # type: ignore[arg-type]
    return list(plan.cmake_args)


@pytest.mark.parametrize(
    ("capability", "arch"),
    [("8.6", "86-real"), ("9.0", "90-real"), ("8.9", "89-real"), ("7.5", "75-real"), ("12.0", "120a-real")],
)
def test_cuda_arch_mapping(capability: str, arch: str) -> None:
    assert cuda_arch(capability) == arch


def test_cuda_arch_rejects_garbage() -> None:
    with pytest.raises(VelollmError, match="not a compute capability"):
        cuda_arch("sm90")


def test_h100_plan_is_cuda_for_its_capability(tmp_paths: Paths) -> None:
    args = _plan("h100", tmp_paths)
    assert "-DGGML_CUDA=ON" in args
    assert "-DCMAKE_CUDA_ARCHITECTURES=90-real" in args
    assert not any("native" in a for a in args if "CUDA_ARCHITECTURES" in a)
    fa = next(a for a in args if a.startswith("-DGGML_CUDA_FA_QUANTS="))
    assert set(fa.split("=", 1)[1].split(";")) >= {"f16-f16", "q8_0-q8_0", "q4_0-q4_0"}
    assert "-DGGML_AVX512=ON" in args and "-DGGML_AMX_TILE=ON" in args
    # every ISA flag the recorded Sapphire Rapids CPU reports reaches its CMake option
    assert {"-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON"} <= set(args)


@pytest.mark.parametrize("selection", ["none", "build-stamp,kv-on-demand"])
def test_amx_stays_off_without_the_tile_config_fix(tmp_paths: Paths, selection: str) -> None:
    # upstream's AMX kernels fault on every batch of 2+ rows (patch amx-tile-config fixes it): no AMX without it
    args = _plan("h100", tmp_paths, patches=selection)
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert "-DGGML_AVX512_VNNI=ON" in args


def test_rtx3060_plan(tmp_paths: Paths) -> None:
    args = _plan("rtx3060", tmp_paths)
    assert "-DCMAKE_CUDA_ARCHITECTURES=86-real" in args
    assert "-DGGML_AVX512=OFF" in args


def test_explicit_arch_wins_over_detection(tmp_paths: Paths) -> None:
    args = _plan("cpu-2core", tmp_paths, gpu="cuda", arch=("9.0", "8.6"))
    assert "-DCMAKE_CUDA_ARCHITECTURES=90-real;86-real" in args


def test_every_plan_is_offline_safe_and_stamped(tmp_paths: Paths) -> None:
    for machine in ("h100", "rtx3060", "rtx4090", "m2max", "cpu-2core", "rx7900xtx"):
        args = _plan(machine, tmp_paths)
        for flag in ("-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_NUMBER=0"):
            assert flag in args, (machine, flag)
        assert any(a.startswith("-DLLAMA_BUILD_COMMIT=0c1e570+velollm.") for a in args)
        assert any(a.startswith("-DVELOLLM_PATCH_LEVEL=velollm-") for a in args)


def test_backends_per_machine(tmp_paths: Paths) -> None:
    assert "-DGGML_METAL=ON" in _plan("m2max", tmp_paths)
    rocm = _plan("rx7900xtx", tmp_paths)
    assert "-DGGML_HIP=ON" in rocm and "-DGPU_TARGETS=gfx1100" in rocm
    cpu = _plan("cpu-2core", tmp_paths)
    assert "-DGGML_CUDA=OFF" in cpu and "-DGGML_AVX2=ON" in cpu and "-DGGML_NATIVE=OFF" in cpu


def test_vanilla_plan_has_no_stamp_and_a_different_id(tmp_paths: Paths) -> None:
    hw = recorded_hardware("cpu-2core")
    patched = plan_build(BuildOptions(), hw, tmp_paths, fetch=False)
    vanilla = plan_build(BuildOptions(patches="none"), hw, tmp_paths, fetch=False)
    assert vanilla.selected == () and vanilla.patch_level == ""
    assert not any(a.startswith("-DVELOLLM_PATCH_LEVEL") for a in vanilla.cmake_args)
    assert "-DLLAMA_BUILD_COMMIT=0c1e570" in vanilla.cmake_args
    assert vanilla.build_id != patched.build_id
    assert "vanilla" in vanilla.build_id and "patched" in patched.build_id
    # identical inputs give the identical id, so an installed build is reused
    assert plan_build(BuildOptions(), hw, tmp_paths, fetch=False).build_id == patched.build_id


def test_unknown_gpu(tmp_paths: Paths) -> None:
    with pytest.raises(VelollmError, match="unknown --gpu 'tpu': choose one of auto, cuda"):
        _plan("cpu-2core", tmp_paths, gpu="tpu")


def _without_tool(hw: HardwareInfo, name: str) -> HardwareInfo:
    toolchain = dataclasses.replace(hw.toolchain, **{name: Tool(name, None, None)})
    return dataclasses.replace(hw, toolchain=toolchain)


def test_cuda_without_nvcc(tmp_paths: Paths) -> None:
    hw = _without_tool(recorded_hardware("rtx3060"), "nvcc")
    with pytest.raises(VelollmError, match="needs nvcc from the CUDA toolkit 12.4 or newer.*or use --gpu cpu"):
        _plan(hw, tmp_paths, gpu="cuda")


def test_cuda_without_gpu_or_arch(tmp_paths: Paths) -> None:
    with pytest.raises(VelollmError, match="pass --arch"):
        _plan("cpu-2core", tmp_paths, gpu="cuda")


def test_missing_cmake_and_compiler(tmp_paths: Paths) -> None:
    with pytest.raises(VelollmError, match="cmake was not found"):
        _plan(_without_tool(recorded_hardware("cpu-2core"), "cmake"), tmp_paths)
    with pytest.raises(VelollmError, match="no C/C\\+\\+ compiler"):
        _plan(_without_tool(recorded_hardware("cpu-2core"), "cxx"), tmp_paths)


def test_full_disk(tmp_paths: Paths) -> None:
    hw = dataclasses.replace(recorded_hardware("cpu-2core"), disk_free_bytes=200 * 1024**2)
    with pytest.raises(VelollmError, match="only 0.2 GiB free") as err:
        _plan(hw, tmp_paths)
    assert err.value.exit_code == 4


def test_unknown_patch_and_unknown_pin(tmp_paths: Paths) -> None:
    with pytest.raises(VelollmError, match="unknown patch nope"):
        _plan("cpu-2core", tmp_paths, patches="nope")
    with pytest.raises(VelollmError, match="not fetched yet"):
        _plan("cpu-2core", tmp_paths, source="pypi:llama-cpp-python==0.0.1")


def test_metal_needs_macos(tmp_paths: Paths) -> None:
    with pytest.raises(VelollmError, match="needs macOS"):
        _plan("cpu-2core", tmp_paths, gpu="metal")


def test_only_the_asked_targets_are_built_and_llama_server_always(tmp_paths: Paths) -> None:
    hw = recorded_hardware("cpu-2core")
    full = plan_build(BuildOptions(gpu="cpu"), hw, tmp_paths, fetch=False)
    some = plan_build(BuildOptions(gpu="cpu", targets=("llama-fit-params",)), hw, tmp_paths, fetch=False)
    assert some.targets == ("llama-server", "llama-fit-params")
    assert some.build_id != full.build_id  # another set of binaries is another build
    assert plan_build(BuildOptions(gpu="cpu", targets=TARGETS), hw, tmp_paths, fetch=False).build_id == full.build_id
    with pytest.raises(VelollmError, match="unknown build target llama-cli: choose from llama-server"):
        plan_build(BuildOptions(gpu="cpu", targets=("llama-cli",)), hw, tmp_paths, fetch=False)
