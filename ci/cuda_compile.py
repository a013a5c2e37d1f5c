"""CI lane: compile the patch series with CUDA for one GPU arch, on a machine that needs no GPU.

``python -m ci.cuda_compile [--arch 8.9] [--patches all|none] [--home DIR]`` goes through the product's
own library (:func:`plan_build`, :func:`run_build`), as ``velollm-patch build --gpu cuda --arch`` does,
so what it proves is what users run. It installs cuBLAS from NVIDIA's pip wheel when the toolkit lacks it
(or says in one line what is missing), compiles, smoke-tests what a machine without a GPU can test,
and writes a JSON and a Markdown report: wall time, build id, CMake flags, binaries, smoke test.
The compile takes long (every CUDA kernel for the arch): that is why it is a lane, not a test.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from ci import reports
from velollm_patch import builds, cuda, hardware, proc
from velollm_patch.build import BuildOptions, BuildPlan, plan_build, run_build
from velollm_patch.errors import VelollmError, plain
from velollm_patch.paths import Paths, get_paths

log = logging.getLogger("ci.cuda_compile")
LANE = "cuda-compile"


def ensure_cublas(toolkit: cuda.CudaToolkit, nvcc: hardware.Tool, paths: Paths) -> cuda.CudaToolkit:
    """The toolkit with cuBLAS: installed from NVIDIA's pip wheel for its CUDA version when it has none."""
    if toolkit.cublas is not None:
        return toolkit
    requirement = cuda.cublas_requirement(toolkit.version)
    log.info("cuBLAS is not in the toolkit: installing %s from PyPI into %s", requirement, sys.prefix)
    proc.run([sys.executable, "-m", "pip", "install", "--no-deps", requirement], what=f"pip install {requirement}")
    installed = cuda.inspect_toolkit(nvcc, paths)
    if installed.cublas is None:
        raise VelollmError(f"pip installed {requirement}, yet " + cuda.missing_cublas_message(installed))
    return installed


def _progress(stage: str, done: int, total: int, last: dict[str, Any]) -> None:
    # A CI log wants a line when the stage changes and every 5 %, not a redrawn bar.
    percent = done * 100 // total if total else 0
    if stage != last.get("stage") or percent >= last.get("percent", 0) + 5:
        last.update(stage=stage, percent=percent)
        suffix = f" {done}/{total} ({percent} %)" if total else ""
        print(f"[{time.strftime('%H:%M:%S')}] {stage}{suffix}", flush=True)


def build_report(
    plan: BuildPlan | None, hw: hardware.HardwareInfo, *, arch: str, patches: str, wall_seconds: float,
    manifest: dict[str, Any] | None, error: str | None, reinstalled: bool,
) -> dict[str, Any]:
    binaries = {}
    if manifest is not None:
        bin_dir = Path(manifest["install_dir"]) / "bin"
        binaries = {name: {"sha256": digest, "bytes": (bin_dir / name).stat().st_size}
                    for name, digest in manifest.get("binaries", {}).items() if (bin_dir / name).is_file()}
    return {
        "lane": LANE,
        "result": "failed" if error else "passed",
        "error": error,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "arch": arch,
        "patches": patches,
        "wall_seconds": round(wall_seconds, 1),
        "build_seconds": manifest.get("build_seconds") if manifest else None,
        "replaced_installed_build": reinstalled,
        "machine": {"cpu": hw.cpu.model, "logical_cores": hw.cpu.logical_cores, "os": f"{hw.os} {platform.machine()}",
                    "nvidia_gpus": [g.name for g in hw.gpus if g.vendor == "nvidia"]},
        "build_id": plan.build_id if plan else None,
        "cuda": plan.cuda.to_dict() if plan and plan.cuda else None,
        "cmake_args": list(plan.cmake_args) if plan else [],
        "notes": list(plan.notes) if plan else [],
        "smoke_test": plan.smoke.to_dict() if plan else None,
        "dynamic_linking": manifest.get("dynamic_linking") if manifest else None,
        "binaries": binaries,
        "install_dir": manifest.get("install_dir") if manifest else None,
    }


def markdown(report: dict[str, Any]) -> str:
    minutes = report["wall_seconds"] / 60
    lines = [
        f"# CI lane {LANE}: {report['result']}",
        "",
        f"- arch {report['arch']}, patches {report['patches']}, finished {report['finished']}",
        f"- wall time: {report['wall_seconds']} s ({minutes:.1f} min) on {report['machine']['cpu']}, "
        f"{report['machine']['logical_cores']} logical cores; NVIDIA GPUs: "
        f"{', '.join(report['machine']['nvidia_gpus']) or 'none'}",
        f"- build id: `{report['build_id']}`",
    ]
    if report["error"]:
        lines.append(f"- error: {report['error']}")
    if report["cuda"]:
        lines.append(f"- nvcc {report['cuda']['version']} ({report['cuda']['nvcc']})")
    if report["smoke_test"]:
        smoke = report["smoke_test"]
        lines.append(f"- smoke test: {smoke['level']}" + (f" ({smoke['reason']})" if smoke["reason"] else ""))
    lines += [f"- note: {note}" for note in report["notes"]]
    if report["dynamic_linking"]:
        linked = report["dynamic_linking"]
        lines.append(f"- llama-server needs {', '.join(linked['needed'])}; RUNPATH {':'.join(linked['runpath'])}")
    lines += ["", "## CMake", "", "```", " ".join(report["cmake_args"]), "```", ""]
    if report["binaries"]:
        lines += ["## Binaries", "", "| binary | bytes | sha256 |", "|---|---|---|"]
        lines += [f"| {name} | {info['bytes']:,} | `{info['sha256'][:16]}…` |"
                  for name, info in sorted(report["binaries"].items())]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], paths: Paths) -> tuple[Path, Path]:
    return reports.write_pair(reports.stamped(paths, LANE), report, markdown(report))


def run_lane(arch: str, patches: str, paths: Paths) -> dict[str, Any]:
    hw = hardware.detect(build_dir=paths.cache)
    nvcc = hw.toolchain.nvcc
    cuda.check_nvcc(nvcc)
    toolkit = ensure_cublas(cuda.inspect_toolkit(nvcc, paths), nvcc, paths)
    options = BuildOptions(gpu="cuda", arch=(arch,), patches=patches, make_current=False, wait=3600)
    plan = plan_build(options, hw, paths, toolkit=toolkit)
    for line in plan.describe():
        print(line, flush=True)
    reinstalled = (plan.install_dir / builds.MANIFEST).is_file()
    if reinstalled:
        # the lane measures a compile: an installed build with these inputs would be reused, not compiled
        with builds.BuildLock(paths, wait=3600):
            builds.remove_build(paths, builds.read_build(plan.install_dir), force=True)
    started = time.monotonic()
    last: dict[str, Any] = {}
    error: str | None = None
    manifest: dict[str, Any] | None = None
    try:
        installed = run_build(plan, hw, paths, on_progress=lambda s, d, t: _progress(s, d, t, last))
        manifest = installed.manifest
    except VelollmError as exc:
        error = str(exc)
    report = build_report(plan, hw, arch=arch, patches=patches, wall_seconds=time.monotonic() - started,
                          manifest=manifest, error=error, reinstalled=reinstalled)
    json_file, md_file = write_report(report, paths)
    print(f"report: {json_file} and {md_file}", flush=True)
    return report


@click.command()
@click.option("--arch", default="8.9", show_default=True, help="The CUDA compute capability to compile for.")
@click.option("--patches", type=click.Choice(["all", "none"]), default="all", show_default=True)
@click.option("--home", type=click.Path(file_okay=False, path_type=Path),
              help="velollm home for the build (VELOLLM_HOME); default: the user's.")
def main(arch: str, patches: str, home: Path | None) -> None:
    """Compile llama.cpp with CUDA for one arch through velollm-patch's build, and report it."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if home is not None:
        os.environ["VELOLLM_HOME"] = str(home)
    try:
        report = run_lane(arch, patches, get_paths())
    except VelollmError as exc:
        print(f"error: {plain(str(exc), 8192)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    if report["result"] != "passed":
        print(f"error: {plain(str(report['error']), 8192)}", file=sys.stderr)
        sys.exit(1)
    print(f"{LANE}: passed in {report['wall_seconds']} s ({report['build_id']})")


if __name__ == "__main__":
    main()
