"""One cell of the CI matrix, run inside its container by ``ci/matrix.py``: build with velollm-patch's own
library (:func:`plan_build`, :func:`run_build`, as ``velollm-patch build`` does), then smoke-test.

cpu and vulkan cells start llama-server on the demo model (SmolLM2) and ask it for a completion over HTTP;
the Vulkan one offloads every layer to the container's Vulkan device (Mesa's llvmpipe). cuda cells only
compile: a container has no GPU, so ``llama-server --version`` must run and the binary link the CUDA
runtime and cuBLAS. The outcome goes to a JSON file, and a failure names the stage that failed with the patch
and hunk that did not apply or the first compiler error. :func:`failure_detail` is shared with the host.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from velollm_patch import cuda, demo_models, hardware, proc, serve
from velollm_patch.build import BuildOptions, elf_dynamic_section, plan_build, run_build
from velollm_patch.errors import VelollmError, one_line
from velollm_patch.paths import Paths, get_paths

SMOKE_PROMPT = "The capital of France is"
# Stages as run_build reports them (its progress callback), then the matrix's own smoke test.
STAGES = {"copying source": "copy", "applying patches": "apply", "configuring": "configure",
          "compiling": "compile", "smoke test": "build smoke test"}
_COMPILER_ERROR = re.compile(
    r"^(?:(?P<gcc>\S+?:\d+(?::\d+)?: (?:fatal )?error: .*)"  # gcc/clang: file:line:col: error: ...
    r"|(?P<nvcc>\S+\(\d+\): error.*)"  # nvcc: file(line): error: ...
    r"|(?P<cmake>CMake Error.*)"
    r"|(?P<ld>.*undefined reference to .*)"
    r"|(?P<ninja>ninja: build stopped: .*))$"
)
_APPLY_FAILURE = re.compile(r"(patch \S+ \(\S+\) does not apply: [^;]+)")


def first_compiler_error(log_text: str) -> str | None:
    """The first line of a build log that says why the compile failed (a CMake error counts too)."""
    for line in log_text.splitlines():
        match = _COMPILER_ERROR.match(line.strip())
        if match and not match.group("ninja"):
            return line.strip()
    for line in log_text.splitlines():  # nothing better: ninja's own verdict
        if line.startswith("ninja: build stopped:"):
            return line.strip()
    return None


def failure_detail(stage: str, error: str, log_text: str) -> str:
    """What a failed cell's report says: the patch and hunk for an apply, the first compiler error for a
    configure or compile, the error itself otherwise."""
    if stage == "apply" and (match := _APPLY_FAILURE.search(error)):
        return match.group(1)
    if stage in ("configure", "compile"):
        found = first_compiler_error(log_text)
        if found:
            return one_line(found, 400)
    return one_line(error, 400)


def ccache_stats() -> dict[str, int]:
    """Hits and misses since the cell zeroed the counters (``ccache --print-stats``, ccache 4.x)."""
    result = proc.run(["ccache", "--print-stats"], check=False, timeout=60)
    counters = dict(line.split("\t", 1) for line in result.output.splitlines() if "\t" in line)

    def count(*names: str) -> int:
        return sum(int(counters.get(name, "0")) for name in names)

    return {"hits": count("direct_cache_hit", "preprocessed_cache_hit"), "misses": count("cache_miss")}


def smoke_serve(server_bin: Path, model: Path, backend: str, log_file: Path) -> dict[str, Any]:
    """Serve ``model`` and get a completion over HTTP; on Vulkan every layer goes to the Vulkan device."""
    args = ["-c", "512", "-np", "1", "-t", str(min(4, os.cpu_count() or 1))]
    env: dict[str, str] = {}
    smoke: dict[str, Any] = {"prompt": SMOKE_PROMPT}
    if backend == "vulkan":
        env["GGML_VK_VISIBLE_DEVICES"] = "0"  # ggml-vulkan takes a CPU-type device (llvmpipe) only when named
        devices = serve.list_devices(server_bin, env)
        if not devices:
            raise VelollmError(f"{server_bin} --list-devices lists no Vulkan device in this container")
        smoke["device"] = devices[0].description
        args += ["-ngl", "99", "-lv", "4"]  # the server logs how many layers it offloaded from -lv 4 on
    config = serve.ServerConfig(binary=server_bin, model=model, args=tuple(args), env=env, log_file=log_file)
    started = time.monotonic()
    with serve.start_server(config, timeout=300) as server:
        answer = serve.complete(server, SMOKE_PROMPT, n_predict=8).get("content", "")
        log_text = server.log_text()
    if not answer.strip():
        raise VelollmError(f"llama-server answered an empty completion (log: {log_file})")
    smoke.update(answer=answer, seconds=round(time.monotonic() - started, 1))
    if backend == "vulkan":
        offloaded = re.search(r"offloaded (\d+)/(\d+) layers to GPU", log_text)
        if not offloaded or offloaded.group(1) == "0":
            raise VelollmError(f"llama-server offloaded no layer to {smoke['device']} (log: {log_file})")
        smoke["offloaded"] = f"{offloaded.group(1)}/{offloaded.group(2)} layers"
    return smoke


def smoke_version(server_bin: Path, driver_stub: Path | None) -> dict[str, Any]:
    """``llama-server --version`` of a CUDA build on a machine without a driver (the toolkit's stub, where it has
    one, stands in for libcuda.so.1, as in velollm-patch's own smoke test), and the CUDA libraries it links."""
    env: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="driver-stub-") as shim:
        if driver_stub is not None:
            (Path(shim) / "libcuda.so.1").symlink_to(driver_stub)
            env["LD_LIBRARY_PATH"] = shim
        result = proc.run([server_bin, "--version"], check=False, timeout=120, env=env)
    if result.returncode != 0 or "version:" not in result.output:
        raise VelollmError(f"{server_bin} --version failed: {one_line(result.tail(3))}")
    version = [line for line in result.output.splitlines() if line.startswith(("version:", "built with"))]
    linked = elf_dynamic_section(server_bin) or {"needed": []}
    cuda_libraries = [name for name in linked["needed"] if name.startswith(("libcudart", "libcublas"))]
    if not cuda_libraries:
        raise VelollmError(f"{server_bin} does not link the CUDA runtime (it needs {', '.join(linked['needed'])})")
    return {"version": "; ".join(version), "links": cuda_libraries}


def run_cell(spec: str, backend: str, patches: str, arch: str, paths: Paths) -> dict[str, Any]:
    result: dict[str, Any] = {"stage": "plan", "error": None, "detail": None}
    started = time.monotonic()

    def progress(stage: str, done: int, total: int) -> None:
        name = STAGES.get(stage, stage)
        if name != result["stage"]:
            result["stage"] = name
            print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)

    try:
        hw = hardware.detect(build_dir=paths.cache)
        toolkit = None
        if backend == "cuda":
            cuda.check_nvcc(hw.toolchain.nvcc)
            toolkit = cuda.inspect_toolkit(hw.toolchain.nvcc, paths)
        options = BuildOptions(gpu=backend, arch=(arch,) if backend == "cuda" else (), patches=patches, source=spec,
                               make_current=False, targets=("llama-server",))
        plan = plan_build(options, hw, paths, fetch=False, toolkit=toolkit)
        for line in plan.describe():
            print(line, flush=True)
        result.update(build_id=plan.build_id, patch_level=plan.patch_level or None,
                      patches_applied=[p.name for p in plan.selected])
        proc.run(["ccache", "--zero-stats"], check=False, timeout=60)
        installed = run_build(plan, hw, paths, on_progress=progress)
        result["build_seconds"] = installed.manifest.get("build_seconds")
        result["ccache"] = ccache_stats()
        server_bin = plan.install_dir / "bin" / "llama-server"
        result["stage"] = "smoke test"
        print(f"[{time.strftime('%H:%M:%S')}] smoke test", flush=True)
        if backend == "cuda":
            result["smoke"] = smoke_version(server_bin, plan.smoke.driver_stub)
        else:
            model = demo_models.fetch_model(paths)
            result["smoke"] = smoke_serve(server_bin, model, backend, paths.logs / "smoke-server.log")
        result["stage"] = "done"
    except VelollmError as exc:
        result["error"] = str(exc)
        result["detail"] = failure_detail(result["stage"], str(exc), _build_log_text(paths))
        result.setdefault("ccache", ccache_stats())
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _build_log_text(paths: Paths) -> str:
    logs = sorted(paths.logs.glob("build-*.log"), key=lambda p: p.stat().st_mtime) if paths.logs.is_dir() else []
    return logs[-1].read_text(errors="replace") if logs else ""


@click.command()
@click.option("--source", "spec", required=True, help="The source spec, e.g. pypi:llama-cpp-python==0.3.36.")
@click.option("--backend", type=click.Choice(["cpu", "vulkan", "cuda"]), required=True)
@click.option("--patches", type=click.Choice(["all", "none"]), required=True)
@click.option("--arch", default="8.9", show_default=True, help="The CUDA compute capability (cuda cells).")
@click.option("--result", "result_file", type=click.Path(dir_okay=False, path_type=Path), required=True)
def main(spec: str, backend: str, patches: str, arch: str, result_file: Path) -> None:
    """Build and smoke-test one matrix cell here (inside its container); write the outcome as JSON."""
    result = run_cell(spec, backend, patches, arch, get_paths())
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(result_file)
    if result["error"]:
        print(f"error ({result['stage']}): {result['detail']}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
