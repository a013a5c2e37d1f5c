"""CUDA builds without a GPU: nvcc's version and targets, where cuBLAS and libcuda come from, what the plan
decides from them (CMake flags, the reduced smoke test), and the one-line refusals for bad input.

nvcc's answers are replayed from tests/data/cuda (recorded from CUDA 13.0.88), through a fake nvcc where
the code runs it, so these tests need no toolkit.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import (
    CUDA_DATA,
    LIST_GPU_ARCH_13_0,
    cu13_wheel,
    make_toolkit,
    recorded_hardware,
    toolkit_tree,
    touch,
)
from velollm_patch import cuda
from velollm_patch.build import BuildOptions, BuildPlan, parse_readelf_dynamic, plan_build
from velollm_patch.errors import VelollmError
from velollm_patch.hardware import HardwareInfo, Tool
from velollm_patch.paths import Paths

VERBOSE_13_0 = (CUDA_DATA / "13.0-v-dryrun.txt").read_text()


@pytest.fixture
def tmp_paths(tmp_path: Path) -> Paths:
    return Paths(data=tmp_path / "data", cache=tmp_path / "cache")


def with_nvcc(hw: HardwareInfo, version: str | None, path: str | None = "/usr/local/cuda/bin/nvcc") -> HardwareInfo:
    nvcc = Tool("nvcc", path, version)
    return dataclasses.replace(hw, toolchain=dataclasses.replace(hw.toolchain, nvcc=nvcc))


def plan_for(hw: HardwareInfo | str, paths: Paths, toolkit: cuda.CudaToolkit, **options: object) -> BuildPlan:
    machine = recorded_hardware(hw) if isinstance(hw, str) else hw
    return plan_build(BuildOptions(**options), machine, paths, fetch=False, toolkit=toolkit)  # type: ignore[arg-type]


# --- what nvcc says ---------------------------------------------------------------------------


def test_gpu_archs_from_the_recorded_list() -> None:
    archs = cuda.parse_gpu_archs(LIST_GPU_ARCH_13_0)
    # CUDA 13 lists 103 after 110; the plan shows them in numeric order
    assert archs == ("75", "80", "86", "87", "88", "89", "90", "100", "103", "110", "120", "121")
    assert [cuda.capability_of(a) for a in archs[:2]] == ["7.5", "8.0"]
    assert cuda.capability_of("121") == "12.1"


def test_toolkit_directories_from_nvcc_verbose() -> None:
    # nvcc here is a wrapper script in /usr/local/bin: the toolkit's directories come from what it passes on
    includes, libraries = cuda.parse_nvcc_dirs(VERBOSE_13_0)
    top = Path("/usr/local/cuda-13.0/bin/../targets/x86_64-linux")
    assert includes == ((top / "include").resolve(), (top / "include/cccl").resolve())
    assert libraries == ((top / "lib/stubs").resolve(), (top / "lib").resolve())


@pytest.mark.parametrize(("capabilities", "refused"), [(("6.1",), "6.1"), (("8.9", "7.0"), "7.0")])
def test_archs_nvcc_cannot_target_are_refused_with_its_list(
    tmp_path: Path, tmp_paths: Paths, capabilities: tuple[str, ...], refused: str
) -> None:
    toolkit = make_toolkit(tmp_path)
    with pytest.raises(VelollmError) as err:
        plan_for("cpu-2core", tmp_paths, toolkit, gpu="cuda", arch=capabilities)
    message = str(err.value)
    assert message.startswith(f"CUDA arch {refused} cannot be built by nvcc 13.0")
    assert "targets 7.5, 8.0, 8.6, 8.7, 8.8, 8.9, 9.0, 10.0, 10.3, 11.0, 12.0, 12.1" in message
    assert "\n" not in message


def test_supported_archs_pass_and_blackwell_keeps_its_a_variant(tmp_path: Path, tmp_paths: Paths) -> None:
    plan = plan_for("cpu-2core", tmp_paths, make_toolkit(tmp_path), gpu="cuda", arch=("8.9", "12.0"))
    assert "-DCMAKE_CUDA_ARCHITECTURES=89-real;120a-real" in plan.cmake_args


def test_arch_list_is_asked_once_per_nvcc_path_and_version(tmp_path: Path, tmp_paths: Paths) -> None:
    calls = tmp_path / "calls"
    (tmp_path / "list.txt").write_text(LIST_GPU_ARCH_13_0)
    (tmp_path / "verbose.txt").write_text(VERBOSE_13_0)
    nvcc = tmp_path / "bin/nvcc"
    touch(nvcc).write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n'
        f'case "$1" in --list-gpu-arch) cat {tmp_path}/list.txt;; -v) cat {tmp_path}/verbose.txt;; esac\n'
    )
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    first = cuda.inspect_toolkit(Tool("nvcc", str(nvcc), "13.0"), tmp_paths, site_dirs=[], system_dirs=[])
    again = cuda.inspect_toolkit(Tool("nvcc", str(nvcc), "13.0"), tmp_paths, site_dirs=[], system_dirs=[])
    assert first.gpu_archs == again.gpu_archs == cuda.parse_gpu_archs(LIST_GPU_ARCH_13_0)
    assert calls.read_text().splitlines() == ["--list-gpu-arch", "-v --dryrun velollm-probe.cu"]
    # another version at the same path (a toolkit upgraded in place) is asked again
    cuda.inspect_toolkit(Tool("nvcc", str(nvcc), "13.1"), tmp_paths, site_dirs=[], system_dirs=[])
    assert len(calls.read_text().splitlines()) == 4


def test_an_nvcc_that_cannot_list_its_targets_leaves_them_unchecked(tmp_path: Path, tmp_paths: Paths) -> None:
    nvcc = touch(tmp_path / "bin/nvcc")
    nvcc.write_text("#!/bin/sh\nexit 1\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    toolkit = cuda.inspect_toolkit(Tool("nvcc", str(nvcc), "13.0"), tmp_paths, site_dirs=[], system_dirs=[])
    assert toolkit.gpu_archs is None
    cuda.check_archs(("6.1",), toolkit)  # nvcc itself will say at compile time


# --- a missing or too old toolchain -----------------------------------------------------------


def test_missing_nvcc_names_the_package_and_the_minimum(tmp_path: Path, tmp_paths: Paths) -> None:
    with pytest.raises(VelollmError) as err:
        plan_build(BuildOptions(gpu="cuda", arch=("8.9",)), with_nvcc(recorded_hardware("cpu-2core"), None, None),
                   tmp_paths, fetch=False)
    message = str(err.value)
    assert "needs nvcc from the CUDA toolkit 12.4 or newer, which was not found" in message
    assert "install NVIDIA's cuda-toolkit package" in message and "or use --gpu cpu" in message


@pytest.mark.parametrize("version", ["11.8", "12.3", "9.2"])
def test_too_old_nvcc_is_refused_before_anything_runs(tmp_path: Path, tmp_paths: Paths, version: str) -> None:
    hw = with_nvcc(recorded_hardware("rtx3060"), version)
    with pytest.raises(VelollmError) as err:
        # no toolkit is given: a too old nvcc must be refused before it is asked anything
        plan_build(BuildOptions(gpu="cuda"), hw, tmp_paths, fetch=False)
    message = str(err.value)
    assert message.startswith(f"nvcc {version} (/usr/local/cuda/bin/nvcc) is too old")
    assert "CUDA toolkit 12.4 or newer" in message and "cuda-toolkit package 12.4+" in message
    assert not tmp_paths.cache.exists() and not tmp_paths.data.exists()


def test_nvcc_without_a_readable_version(tmp_paths: Paths) -> None:
    with pytest.raises(VelollmError, match="did not print a CUDA release: reinstall NVIDIA's cuda-toolkit"):
        plan_build(BuildOptions(gpu="cuda"), with_nvcc(recorded_hardware("rtx3060"), None), tmp_paths, fetch=False)


def test_the_oldest_supported_nvcc_passes() -> None:
    cuda.check_nvcc(Tool("nvcc", "/opt/cuda-12.4/bin/nvcc", "12.4"))
    cuda.check_nvcc(Tool("nvcc", "/usr/local/bin/nvcc", "13.0"))


# --- cuBLAS and libcuda -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "requirement"),
    [("13.0", "nvidia-cublas==13.0.*"), ("13.2", "nvidia-cublas==13.2.*"), ("12.4", "nvidia-cublas-cu12==12.4.*")],
)
def test_cublas_wheel_for_a_toolkit(version: str, requirement: str) -> None:
    assert cuda.cublas_requirement(version) == requirement


def test_cublas_from_the_toolkit_comes_first(tmp_path: Path) -> None:
    include, lib, stubs = toolkit_tree(tmp_path / "cuda", cublas=True)
    site = tmp_path / "site"
    cu13_wheel(site)
    found = cuda.find_cublas(13, (include,), (stubs, lib), (site,))
    assert found is not None and found.origin == "toolkit" and not found.from_pip
    assert found.library == lib / "libcublas.so" and found.include_dir == include


def test_cublas_from_the_cuda13_wheel(tmp_path: Path) -> None:
    include, lib, stubs = toolkit_tree(tmp_path / "cuda")
    wheel = cu13_wheel(tmp_path / "site")
    found = cuda.find_cublas(13, (include,), (stubs, lib), (tmp_path / "elsewhere", tmp_path / "site"))
    assert found is not None and found.from_pip and found.origin.startswith("pip wheel nvidia-cublas")
    assert found.library == wheel / "lib/libcublas.so.13"
    assert found.lt_library == wheel / "lib/libcublasLt.so.13"
    assert found.include_dir == wheel / "include"


def test_cublas_from_the_cuda12_wheel_layout(tmp_path: Path) -> None:
    site = tmp_path / "site"
    for name in ("lib/libcublas.so.12", "lib/libcublasLt.so.12", "include/cublas_v2.h"):
        touch(site / "nvidia/cublas" / name)
    found = cuda.find_cublas(12, (), (), (site,))
    assert found is not None and found.library == site / "nvidia/cublas/lib/libcublas.so.12"
    assert found.origin.startswith("pip wheel nvidia-cublas-cu12")


def test_cublas_of_another_major_or_without_its_header_is_not_taken(tmp_path: Path) -> None:
    cu13_wheel(tmp_path / "site")
    assert cuda.find_cublas(12, (), (), (tmp_path / "site",)) is None
    (tmp_path / "site/nvidia/cu13/include/cublas_v2.h").unlink()
    assert cuda.find_cublas(13, (), (), (tmp_path / "site",)) is None


def test_driver_library_prefers_an_installed_driver_to_the_stub(tmp_path: Path) -> None:
    _, lib, stubs = toolkit_tree(tmp_path / "cuda", stub=True)
    system = tmp_path / "usr-lib"
    assert cuda.find_driver_library((stubs, lib), (system,)) == stubs / "libcuda.so"
    touch(system / "libcuda.so.1")
    assert cuda.find_driver_library((stubs, lib), (system,)) == system / "libcuda.so.1"
    assert cuda.find_driver_library((lib,), ()) is None


def test_missing_cublas_is_one_line_naming_the_wheel_and_the_toolkit_package(
    tmp_path: Path, tmp_paths: Paths
) -> None:
    toolkit = make_toolkit(tmp_path, cublas=None)
    assert toolkit.cublas is None
    with pytest.raises(VelollmError) as err:
        plan_for("cpu-2core", tmp_paths, toolkit, gpu="cuda", arch=("8.9",))
    message = str(err.value)
    assert message.startswith("cuBLAS for CUDA 13 was not found in the toolkit")
    assert f"`{sys.executable} -m pip install 'nvidia-cublas==13.0.*'`" in message
    assert "NVIDIA's libcublas-dev-13-0 package" in message and "\n" not in message


# --- the plan for a machine without a GPU -----------------------------------------------------


def test_plan_without_gpu_takes_cublas_from_the_wheel_and_reduces_the_smoke_test(
    tmp_path: Path, tmp_paths: Paths
) -> None:
    toolkit = make_toolkit(tmp_path, cublas="pip", driver=None)
    plan = plan_for("cpu-2core", tmp_paths, toolkit, gpu="cuda", arch=("8.9",))
    wheel = tmp_path / "site-packages/nvidia/cu13"
    args = plan.cmake_args
    assert f"-DCUDA_cublas_LIBRARY={wheel}/lib/libcublas.so.13" in args
    assert f"-DCUDA_cublasLt_LIBRARY={wheel}/lib/libcublasLt.so.13" in args
    assert f"-DCMAKE_CUDA_STANDARD_INCLUDE_DIRECTORIES={wheel}/include" in args
    assert f"-DCMAKE_CUDA_COMPILER={toolkit.nvcc}" in args
    # no driver and no stub to link: ggml's virtual-memory pool (the only user of libcuda) is off
    assert "-DGGML_CUDA_NO_VMM=ON" in args and not any(a.startswith("-DCUDA_cuda_driver_LIBRARY") for a in args)
    assert plan.smoke.level == "reduced" and "no NVIDIA GPU here" in plan.smoke.reason
    described = "\n".join(plan.describe())
    assert "smoke:    reduced: no NVIDIA GPU here" in described
    assert "note:     cuBLAS from the pip wheel nvidia-cublas" in described
    assert "note:     no libcuda to link" in described and "GGML_CUDA_NO_VMM=ON" in described
    assert "libcudart.so.13, libcublas.so.13, libcublasLt.so.13" in described
    assert "nvcc:     13.0" in described and "targets 7.5, 8.0" in described
    data = plan.to_dict()
    assert data["smoke_test"]["level"] == "reduced" and data["cuda"]["cublas"]["origin"].startswith("pip wheel")


def test_plan_links_the_toolkit_stub_and_loads_it_for_the_smoke_test(tmp_path: Path, tmp_paths: Paths) -> None:
    toolkit = make_toolkit(tmp_path, cublas="toolkit", driver="stub")
    plan = plan_for("cpu-2core", tmp_paths, toolkit, gpu="cuda", arch=("8.9",))
    stub = tmp_path / "cuda/lib/stubs/libcuda.so"
    assert f"-DCUDA_cuda_driver_LIBRARY={stub}" in plan.cmake_args
    assert "-DGGML_CUDA_NO_VMM=ON" not in plan.cmake_args
    assert not any("STANDARD_INCLUDE_DIRECTORIES" in a for a in plan.cmake_args)  # the toolkit has the header
    assert plan.smoke.level == "reduced" and plan.smoke.driver_stub == stub


def test_plan_with_a_gpu_keeps_the_full_smoke_test(tmp_path: Path, tmp_paths: Paths) -> None:
    toolkit = make_toolkit(tmp_path, cublas="toolkit", driver="system")
    plan = plan_for("rtx4090", tmp_paths, toolkit)
    assert "-DCMAKE_CUDA_ARCHITECTURES=89-real" in plan.cmake_args
    assert f"-DCUDA_cuda_driver_LIBRARY={tmp_path}/system-lib/libcuda.so.1" in plan.cmake_args
    assert plan.smoke.level == "full" and plan.smoke.driver_stub is None
    cpu = plan_build(BuildOptions(gpu="cpu"), recorded_hardware("cpu-2core"), tmp_paths, fetch=False)
    assert cpu.smoke.level == "full" and cpu.cuda is None


def test_where_cublas_comes_from_is_part_of_the_build_id(tmp_path: Path, tmp_paths: Paths) -> None:
    from_pip = plan_for("cpu-2core", tmp_paths, make_toolkit(tmp_path / "a", cublas="pip"), gpu="cuda", arch=("8.9",))
    from_toolkit = plan_for("cpu-2core", tmp_paths, make_toolkit(tmp_path / "b", cublas="toolkit"),
                            gpu="cuda", arch=("8.9",))
    assert from_pip.build_id != from_toolkit.build_id


def test_readelf_dynamic_section() -> None:
    recorded = (CUDA_DATA / "llama-server-readelf-d.txt").read_text()
    linked = parse_readelf_dynamic(recorded)
    # recorded from the cuda-compile lane's llama-server (CUDA 13.0, cuBLAS from the pip wheel, GGML_CUDA_NO_VMM)
    assert {"libcudart.so.13", "libcublas.so.13"} <= set(linked["needed"])  # libcublas loads libcublasLt itself
    assert "libcuda.so.1" not in linked["needed"]  # without the VMM pool only cudart loads the driver
    assert linked["runpath"] == ["/usr/local/cuda-13.0/lib",
                                 "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/nvidia/cu13/lib"]
    assert parse_readelf_dynamic("not an ELF file") == {"needed": [], "runpath": []}


# --- the command line -------------------------------------------------------------------------


def _fake_nvcc_on_path(tmp_path: Path, release: str) -> dict[str, str]:
    (tmp_path / "list.txt").write_text(LIST_GPU_ARCH_13_0)
    (tmp_path / "verbose.txt").write_text(VERBOSE_13_0)
    nvcc = touch(tmp_path / "bin/nvcc")
    nvcc.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --version) echo "Cuda compilation tools, release {release}, V{release}.1";;\n'
        f"  --list-gpu-arch) cat {tmp_path}/list.txt;; -v) cat {tmp_path}/verbose.txt;; esac\n"
    )
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "VELOLLM_HOME": str(tmp_path / "home")}


@pytest.mark.parametrize(
    ("release", "arch", "message"),
    [
        ("11.8", "8.6", "error: nvcc 11.8 ("),
        ("13.0", "6.1", "error: CUDA arch 6.1 cannot be built by nvcc 13.0"),
    ],
)
def test_cli_refuses_in_one_line_and_builds_nothing(tmp_path: Path, release: str, arch: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "velollm_patch", "build", "--gpu", "cuda", "--arch", arch],
        capture_output=True, text=True, timeout=120, env=_fake_nvcc_on_path(tmp_path, release),
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tmp_path / "home/data/builds").exists() and not (tmp_path / "home/cache/work").exists()


# --- the CI lane (ci/cuda_compile.py); its real compile is too long for the suite ---------------


def test_ci_lane_refuses_a_too_old_toolkit_in_one_line(tmp_path: Path) -> None:
    env = _fake_nvcc_on_path(tmp_path, "11.8")
    result = subprocess.run(
        [sys.executable, "-m", "ci.cuda_compile", "--arch", "8.9", "--home", str(tmp_path / "home")],
        capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
    assert result.stderr.startswith("error: nvcc 11.8 (") and "CUDA toolkit 12.4 or newer" in result.stderr
    assert not (tmp_path / "home/data").exists()


def test_ci_lane_report_says_what_was_built_and_how_long_it_took(tmp_path: Path, tmp_paths: Paths) -> None:
    from ci import cuda_compile

    hw = recorded_hardware("cpu-2core")
    plan = plan_for(hw, tmp_paths, make_toolkit(tmp_path), gpu="cuda", arch=("8.9",))
    report = cuda_compile.build_report(plan, hw, arch="8.9", patches="all", wall_seconds=5025.04, manifest=None,
                                       error="build failed (exit 1): nvcc died", reinstalled=False)
    assert report["result"] == "failed" and report["wall_seconds"] == 5025.0
    assert report["build_id"] == plan.build_id and report["cmake_args"] == list(plan.cmake_args)
    assert report["smoke_test"]["level"] == "reduced"
    json_file, md_file = cuda_compile.write_report(report, tmp_paths)
    assert json_file.parent == tmp_paths.ci_reports
    text = md_file.read_text()
    assert text.startswith("# CI lane cuda-compile: failed") and "(83.8 min)" in text
    assert "- error: build failed (exit 1): nvcc died" in text and "-DGGML_CUDA_NO_VMM=ON" in text
