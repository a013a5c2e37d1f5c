"""The CI matrix (ci/matrix.py): cell selection, failure extraction, the report, a missing engine, and one
real cell built and smoke-tested in its Debian container."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ci import matrix, matrix_cell, matrix_images
from velollm_patch import patches, proc, source
from velollm_patch.errors import VelollmError

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ci.matrix", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_every_pin_backend_and_flavour_is_a_cell() -> None:
    cells = matrix.all_cells()
    assert len(cells) == len(source.PINS) * 3 * 2
    assert len({c.name for c in cells}) == len(cells)
    names = {c.name for c in cells}
    for pin in source.PINS.values():
        for backend in ("cpu", "vulkan", "cuda"):
            assert {f"{pin.commit[:7]}-{backend}-vanilla", f"{pin.commit[:7]}-{backend}-patched"} <= names
    patched = next(c for c in cells if c.name == "0c1e570-cpu-patched")
    assert (patched.spec, patched.patches) == ("pypi:llama-cpp-python==0.3.36", "all")
    assert next(c for c in cells if c.name == "4df29be-cuda-vanilla").patches == "none"


def test_select_cells_by_word_and_glob() -> None:
    cells = matrix.all_cells()
    assert matrix.select_cells((), cells) == cells
    assert {c.name for c in matrix.select_cells(("0c1e570-cpu",), cells)} == {"0c1e570-cpu-vanilla",
                                                                             "0c1e570-cpu-patched"}
    chosen = matrix.select_cells(("*-vulkan-patched", "4df29be-cpu-vanilla"), cells)
    assert [c.name for c in chosen] == ["0c1e570-vulkan-patched", "4df29be-cpu-vanilla", "4df29be-vulkan-patched"]
    assert all(c.backend == "cuda" for c in matrix.select_cells(("cuda",), cells))


def test_unknown_cell_is_one_line_listing_the_cells() -> None:
    with pytest.raises(VelollmError) as err:
        matrix.select_cells(("cpu", "rocm"), matrix.all_cells())
    assert "no cell matches 'rocm'" in str(err.value) and "0c1e570-cpu-vanilla" in str(err.value)
    result = _cli("--cells", "rocm")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no cell matches 'rocm': the cells are ")


def test_list_prints_the_selected_cells() -> None:
    result = _cli("--cells", "4df29be-*-patched", "--list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4df29be-cpu-patched", "4df29be-vulkan-patched", "4df29be-cuda-patched"]


def test_missing_engine_says_how_to_start_one(tmp_path: Path) -> None:
    # no engine behind DOCKER_HOST and no dockerd on PATH: the one line says how to get one
    only_python = tmp_path / "bin"
    only_python.mkdir()
    (only_python / "python").symlink_to(sys.executable)
    env = {"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", "PATH": str(only_python)}
    result = _cli("--cells", "0c1e570-cpu-vanilla", "--home", str(tmp_path / "home"), env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no docker engine is running here and dockerd is not installed" in lines[0]
    assert "apt-get install -y docker.io && dockerd &" in lines[0]
    assert not (tmp_path / "home" / "data" / "ci").exists()  # nothing written


def test_apply_failure_names_patch_and_hunk(tmp_path: Path) -> None:
    # a real series whose patch no longer applies to the tree, as a cell's apply stage meets it
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "a.cpp").write_text("".join(f"line {i}\n" for i in range(40)))
    (tree / "src" / "b.cpp").write_text("".join(f"line {i}\n" for i in range(40)))
    proc.run(["git", "init", "-q", tree])
    proc.run(["git", "-C", tree, "add", "."])
    for path in ("src/a.cpp", "src/b.cpp"):
        (tree / path).write_text((tree / path).read_text().replace("line 30\n", "line 30 patched\n"))
    diff = proc.run(["git", "-C", tree, "diff"]).output
    series_dir = tmp_path / "patches" / "llama.cpp" / "abc1234"
    series_dir.mkdir(parents=True)
    (series_dir / "0001-one.patch").write_text(diff)
    (series_dir / "series.toml").write_text(
        '[series]\nupstream = "llama.cpp"\npin = "abc1234"\nupstream_commit = "abc1234"\nlevel = 1\n'
        'supports = ["abc1234"]\n[[patch]]\nfile = "0001-one.patch"\nname = "one"\nsummary = "s"\n'
    )
    proc.run(["git", "-C", tree, "checkout", "-q", "."])
    (tree / "src" / "b.cpp").write_text((tree / "src" / "b.cpp").read_text().replace("line 29\n", "line 29 moved\n"))
    series = patches.load_series(series_dir)
    with pytest.raises(VelollmError) as err:
        patches.apply(series, series.patches, tree)
    detail = matrix_cell.failure_detail("apply", str(err.value), "")
    assert detail == "patch 0001-one.patch (one) does not apply: src/b.cpp hunk #1 (line 28)"


COMPILE_LOG = """\
$ cmake --build /velollm/cache/work/x/build --config Release -j 2 --target llama-server
[1/213] Building C object ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o
[2/213] Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o
FAILED: src/CMakeFiles/llama.dir/llama.cpp.o
ccache /usr/bin/c++ -DGGML_BUILD -I../src/include -O3 -c ../src/src/llama.cpp
In file included from ../src/src/llama.cpp:3:
../src/src/llama-velollm.h:12:5: error: 'foo' was not declared in this scope
   12 |     foo();
../src/src/llama.cpp:40:1: error: expected ';' before '}' token
ninja: build stopped: subcommand failed.
"""


def test_compile_failure_names_the_first_compiler_error() -> None:
    detail = matrix_cell.failure_detail("compile", "build failed (exit 1): ninja: build stopped", COMPILE_LOG)
    assert detail == "../src/src/llama-velollm.h:12:5: error: 'foo' was not declared in this scope"
    nvcc = "[5/90] Building CUDA object x.cu.o\n/src/ggml/src/ggml-cuda/fattn.cu(12): error: identifier \"x\"\n"
    assert matrix_cell.first_compiler_error(nvcc) == '/src/ggml/src/ggml-cuda/fattn.cu(12): error: identifier "x"'
    cmake = "-- Found Vulkan\nCMake Error at ggml/src/ggml-vulkan/CMakeLists.txt:10 (message):\n"
    assert matrix_cell.failure_detail("configure", "cmake configure failed", cmake).startswith("CMake Error at ggml")
    # nothing recognisable: ninja's verdict, or else the error itself
    assert matrix_cell.first_compiler_error("[1/2] x\nninja: build stopped: interrupted by user.\n") == (
        "ninja: build stopped: interrupted by user.")
    smoke = matrix_cell.failure_detail("smoke test", "llama-server exited\nat start", "")
    assert smoke == "llama-server exited at start"


def _report(cells: list[dict[str, object]]) -> dict[str, object]:
    return {"lane": "matrix", "started": "2026-12-07T19:30:00+00:00", "finished": "2026-12-07T20:10:05+00:00",
            "wall_seconds": 2405.0, "timeout_s": 3600.0, "images": {}, "cells": cells,
            "machine": {"cpu": "Some CPU", "logical_cores": 2, "os": "Linux x86_64"}}


def test_markdown_table_shows_answers_failures_and_timeouts(tmp_path: Path) -> None:
    log_file = tmp_path / "0c1e570-cuda-patched.log"
    log_file.write_text("plan lines\n[19:40:00] copy\n[19:40:01] apply\n[19:40:02] configure\n[19:40:09] compile\n")
    timed_out = matrix._cell_record(matrix.all_cells()[5], tmp_path / "no-home", log_file, 600.4, True, 600)
    assert timed_out["result"] == "timed out"
    assert timed_out["detail"] == "ran past --timeout 600 s while in compile"
    cells = [
        {"cell": "0c1e570-cpu-patched", "result": "passed", "wall_seconds": 312.2, "build_seconds": 290.0,
         "ccache": {"hits": 200, "misses": 13},
         "smoke": {"prompt": "The capital of France is", "answer": " Paris.\nThe"}},
        {"cell": "0c1e570-vulkan-patched", "result": "passed", "wall_seconds": 65.0, "build_seconds": 50.0,
         "ccache": {"hits": 1, "misses": 0},
         "smoke": {"prompt": "P", "answer": "A", "device": "llvmpipe (LLVM 15.0.6, 256 bits)",
                   "offloaded": "31/31 layers"}},
        {"cell": "4df29be-cpu-patched", "result": "failed", "stage": "apply", "wall_seconds": 4.0,
         "detail": "patch 0003-x.patch (x) does not apply: src/a.cpp hunk #2 (line 7)"},
        {"cell": "4df29be-cuda-vanilla", "result": "passed", "wall_seconds": 4000.0, "build_seconds": 3990.0,
         "ccache": {"hits": 0, "misses": 400}, "smoke": {"version": "version: 0 (4df29be); built with cc",
                                                        "links": ["libcudart.so.13", "libcublas.so.13"]}},
        timed_out,
    ]
    text = matrix.markdown(_report(cells))
    lines = text.splitlines()
    assert lines[0] == ("CI matrix, 2026-12-07 20:10 UTC, on Some CPU (2 logical cores, Linux x86_64); "
                        "wall time 40 min 05 s, cell timeout 60 min 00 s.")
    assert ("| 0c1e570-cpu-patched | passed | 5 min 12 s | 4 min 50 s | 200/13 "
            "| The capital of France is → “Paris. The” |") in lines
    assert any(line.startswith("| 0c1e570-vulkan-patched | passed | 1 min 05 s") and "(31/31 layers on llvmpipe" in line
               for line in lines)
    assert ("| 4df29be-cpu-patched | failed | 4 s | – | – | apply: patch 0003-x.patch (x) does not apply: "
            "src/a.cpp hunk #2 (line 7) |") in lines
    assert "`--version`: version: 0 (4df29be); built with cc; links libcudart.so.13, libcublas.so.13" in text
    assert ("| 0c1e570-cuda-patched | timed out | 10 min 00 s | – | – "
            "| ran past --timeout 600 s while in compile |") in lines


def test_report_files_are_written_whole(tmp_path: Path) -> None:
    json_file, md_file = matrix.write_report(_report([]), tmp_path)
    assert json.loads(json_file.read_text())["lane"] == "matrix"
    assert md_file.read_text().startswith("CI matrix, ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["matrix.json", "matrix.md"]


def test_image_tag_follows_the_recipe() -> None:
    cpu, vulkan = matrix_images.recipe("cpu"), matrix_images.recipe("vulkan")
    assert cpu.tag.startswith("velollm-ci/cpu:") and vulkan.tag.startswith("velollm-ci/vulkan:")
    assert matrix_images.recipe("cpu").tag == cpu.tag  # stable, so a re-run finds the image
    assert "install-vulkan-toolchain.sh" in vulkan.dockerfile and "vulkan" not in cpu.dockerfile
    assert all(f"'{req}'" in cpu.dockerfile for req in matrix_images.python_requirements())


def _engine_or_skip() -> None:
    try:
        matrix_images.connect()
    except VelollmError as exc:
        pytest.skip(f"no docker engine could be reached or started: {exc}")
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed (apt-get install debootstrap): the base image cannot be made")


@pytest.mark.slow
def test_one_real_cell_builds_and_answers(velollm_home: Path) -> None:
    _engine_or_skip()
    # a cold cell compiles llama.cpp (up to half an hour on 2 busy cores): the cell's own timeout, and a margin
    result = _cli("--cells", "0c1e570-cpu-patched", "--home", str(velollm_home), "--timeout", "5400", timeout=5700)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report_line = result.stdout.strip().splitlines()[-1]
    json_file = Path(report_line.removeprefix("report: ").split(" and ")[0])
    report = json.loads(json_file.read_text())
    (cell,) = report["cells"]
    assert cell["cell"] == "0c1e570-cpu-patched" and cell["result"] == "passed"
    assert cell["patch_level"].startswith("velollm-") and cell["patches_applied"]
    assert cell["smoke"]["answer"].strip()
    assert "| 0c1e570-cpu-patched | passed |" in json_file.with_suffix(".md").read_text()


def test_a_cell_writes_only_its_home_and_the_ccache(tmp_path: Path) -> None:
    cells = {c.name: c for c in matrix.all_cells()}
    src = source.Source(spec="pypi:llama-cpp-python==0.3.36", tree=tmp_path / "sources" / "pypi-0.3.36" / "tree",
                        commit=source.PINS["0.3.36"].commit, llama_version=None, sdist_sha256="", fetched_at="")
    model, home, repo = tmp_path / "m.gguf", tmp_path / "home", tmp_path / "repo"
    cpu = matrix.cell_mounts(cells["0c1e570-cpu-patched"], home, src, model, repo)
    writable = {bind["bind"] for bind in cpu.values() if bind["mode"] == "rw"}
    assert writable == {matrix.HOME_IN_CELL, matrix_images.CCACHE_MOUNT}
    assert cpu[str(src.tree.parent)]["bind"] == f"{matrix.HOME_IN_CELL}/cache/sources/pypi-0.3.36"
    assert cpu[str(model)]["bind"] == f"{matrix.HOME_IN_CELL}/cache/models/m.gguf"
    assert cpu[str(repo)]["bind"] == matrix.REPO_IN_CELL
    assert not any(bind["bind"] == str(matrix.CUDA_HOME) for bind in cpu.values())
    cuda = matrix.cell_mounts(cells["0c1e570-cuda-patched"], home, src, model, repo)
    assert cuda[str(matrix.CUDA_HOME.resolve())] == {"bind": str(matrix.CUDA_HOME), "mode": "ro"}


def test_snapshot_leaves_git_and_caches_behind(tmp_path: Path) -> None:
    snapshot = matrix.snapshot_repo(tmp_path / "repo")
    assert (snapshot / "ci" / "matrix_cell.py").is_file() and (snapshot / "patches" / "llama.cpp").is_dir()
    assert not (snapshot / ".git").exists() and not list(snapshot.rglob("__pycache__"))


def test_background_cgroup_is_made_idle(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()  # cgroup v1's cpu hierarchy
    group = matrix.background_cgroup("cgroupfs", root=tmp_path)
    assert group == tmp_path / "cpu" / matrix.BACKGROUND_CGROUP
    assert (group / "cpu.idle").read_text() == "1\n"
    assert matrix.background_cgroup("cgroupfs", root=tmp_path) == group  # a second run finds it


def test_background_needs_cgroupfs(tmp_path: Path) -> None:
    with pytest.raises(VelollmError, match="cgroup driver is systemd.*run without --background"):
        matrix.background_cgroup("systemd", root=tmp_path)
    assert not (tmp_path / matrix.BACKGROUND_CGROUP).exists()
