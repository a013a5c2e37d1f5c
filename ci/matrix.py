"""CI matrix: every pin × {cpu, vulkan, cuda (compile only)} × {vanilla, patched}, each cell built and
smoke-tested in a clean Debian container through velollm-patch's own build.

``python -m ci.matrix [--cells PATTERN...] [--timeout S] [--home DIR]`` makes the images when they are
missing (``ci/matrix_images.py``: debootstrap'd Debian 12 plus each backend's toolchain), then runs the
selected cells one after the other (the compiles would only compete for the same cores). A cell's container
has no network: the host fetches the source trees and the demo model into its velollm home and mounts them
read-only, with a snapshot of the checkout (the cell runs ``ci/matrix_cell.py`` from it) and the ccache volume
shared by all cells and runs. cuda cells mount the host's CUDA toolkit (/usr/local/cuda) and the cuBLAS
wheel from this Python's site-packages, read-only, as Debian 12 has no CUDA 13.

The report (JSON and Markdown, into the home's ``data/ci``) gives per cell the outcome, the wall time, the
build time, ccache's hits and misses and the smoke test's answer, or what failed: the patch and hunk, the
first compiler error, or that the cell ran past ``--timeout`` (the other cells still run).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import click

from ci import matrix_images as images
from ci import reports
from velollm_patch import demo_models, hardware, source
from velollm_patch.errors import VelollmError, one_line, plain
from velollm_patch.paths import Paths, ensure_dir, get_paths, python_site_dirs

log = logging.getLogger("ci.matrix")

BACKENDS = ("cpu", "vulkan", "cuda")
FLAVOURS = {"vanilla": "none", "patched": "all"}  # the cell's word → velollm-patch build --patches
CUDA_ARCH = "8.9"  # one arch: every CUDA kernel is compiled once per arch
CUDA_HOME = Path("/usr/local/cuda")
DEFAULT_TIMEOUT_S = 3 * 3600
# --background: the cells' containers go under this cgroup, made idle (the kernel's cpu.idle, 5.15+: it runs
# only when nothing else wants the CPU). docker's cpu_shares would not do it: a container's weight counts only
# against its sibling containers, and all of them together weigh as much as one process outside.
BACKGROUND_CGROUP = "velollm-ci-background"
CGROUP_ROOT = Path("/sys/fs/cgroup")
HOME_IN_CELL = "/velollm"
REPO_IN_CELL = "/repo"


@dataclass(frozen=True)
class Cell:
    version: str  # the llama-cpp-python release whose sdist vendors the pin
    commit: str  # the pinned llama.cpp commit, short (the series directory's name)
    backend: str
    flavour: str

    @property
    def name(self) -> str:
        return f"{self.commit}-{self.backend}-{self.flavour}"

    @property
    def spec(self) -> str:
        return f"pypi:{source.SDIST_PACKAGE}=={self.version}"

    @property
    def patches(self) -> str:
        return FLAVOURS[self.flavour]


def all_cells() -> list[Cell]:
    """Every cell, newest pin first."""
    pins = sorted(source.PINS.values(), key=lambda p: tuple(int(n) for n in p.version.split(".")), reverse=True)
    return [Cell(pin.version, pin.commit[:7], backend, flavour)
            for pin in pins for backend in BACKENDS for flavour in FLAVOURS]


def select_cells(patterns: tuple[str, ...], cells: list[Cell]) -> list[Cell]:
    """The cells whose names match any pattern (a glob; a bare word matches anywhere in the name, so ``cpu``
    or ``0c1e570-vulkan`` select several). A pattern matching nothing is an error naming the cells."""
    if not patterns:
        return cells
    chosen: set[str] = set()
    for pattern in patterns:
        glob = pattern if any(ch in pattern for ch in "*?[") else f"*{pattern}*"
        matched = [c.name for c in cells if fnmatch.fnmatchcase(c.name, glob)]
        if not matched:
            raise VelollmError(
                f"no cell matches '{plain(pattern)}': the cells are {', '.join(c.name for c in cells)}",
                exit_code=2,
            )
        chosen.update(matched)
    return [c for c in cells if c.name in chosen]


# --- one cell ------------------------------------------------------------------------------------


def cell_mounts(cell: Cell, home: Path, src: source.Source, model: Path, repo: Path) -> dict[str, dict[str, str]]:
    """What a cell's container sees: its own velollm home, and read-only the fetched source, the demo model,
    the repository snapshot and (cuda) the host's toolkit and cuBLAS wheel."""
    cache = f"{HOME_IN_CELL}/cache"
    mounts = {
        str(home): {"bind": HOME_IN_CELL, "mode": "rw"},
        str(src.tree.parent): {"bind": f"{cache}/sources/{src.tree.parent.name}", "mode": "ro"},
        str(model): {"bind": f"{cache}/models/{model.name}", "mode": "ro"},
        str(repo): {"bind": REPO_IN_CELL, "mode": "ro"},
        images.CCACHE_VOLUME: {"bind": images.CCACHE_MOUNT, "mode": "rw"},
    }
    if cell.backend == "cuda":
        mounts[str(CUDA_HOME.resolve())] = {"bind": str(CUDA_HOME), "mode": "ro"}
        site_packages = f"{images.VENV}/lib/python3.11/site-packages"
        for found in cublas_wheel():
            inside = found.name if found.name.endswith(".dist-info") else f"nvidia/{found.name}"
            mounts[str(found)] = {"bind": f"{site_packages}/{inside}", "mode": "ro"}
    return mounts


def cublas_wheel() -> list[Path]:
    """NVIDIA's pip cuBLAS for the host toolkit's major version (``nvidia/cu13``, as ci/cuda_compile installs
    it) and its metadata (the build plan names the wheel's version), or nothing."""
    for site_dir in python_site_dirs():
        for wheel in sorted((site_dir / "nvidia").glob("cu[0-9]*")):
            if (wheel / "lib").is_dir():
                return [wheel, *sorted(site_dir.glob("nvidia_cublas-*.dist-info"))]
    return []


def snapshot_repo(dest: Path) -> Path:
    """A copy of the checkout (its files as they are now, without .git and caches), so every cell of a run
    tests the same code even when the checkout changes while the run goes on."""
    shutil.rmtree(dest, ignore_errors=True)
    skip = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".venv", ".*_cache", ".velollm", ".gpucheck")
    shutil.copytree(images.REPO_ROOT, dest, symlinks=True, ignore=skip)
    return dest


def run_cell(client: Any, cell: Cell, image: str, paths: Paths, src: source.Source, model: Path,
             timeout: float, out_dir: Path, repo: Path, background: bool = False) -> dict[str, Any]:
    """Run one cell's container to its end or its timeout; its output goes to ``out_dir/<cell>.log``.
    ``background``: the container runs in the idle cgroup that ``background_cgroup`` made."""
    home = paths.cache / "ci-matrix" / cell.name  # fresh per run: the build is compiled, not reused
    shutil.rmtree(home, ignore_errors=True)
    ensure_dir(home)
    log_file = out_dir / f"{cell.name}.log"
    env = {"VELOLLM_HOME": HOME_IN_CELL, "CCACHE_DIR": images.CCACHE_MOUNT, "PYTHONPATH": REPO_IN_CELL,
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
           # ccache hashes LANG (it changes the compiler's messages): the host's usual value, so the entries
           # a seeded volume got from the host's ccache can hit
           "LANG": os.environ.get("LANG", "C.UTF-8")}
    if cell.backend == "cuda":
        env["PATH"] = f"{images.VENV}/bin:{CUDA_HOME}/bin:/usr/local/bin:/usr/bin:/bin"
    command = ["python", "-m", "ci.matrix_cell", "--source", cell.spec, "--backend", cell.backend,
               "--patches", cell.patches, "--arch", CUDA_ARCH, "--result", f"{HOME_IN_CELL}/result.json"]
    started = time.monotonic()
    container = client.containers.run(
        image, command, detach=True, network_mode="none", working_dir=REPO_IN_CELL, environment=env,
        volumes=cell_mounts(cell, home, src, model, repo), name=f"velollm-ci-{cell.name}-{os.getpid()}",
        cgroup_parent=f"/{BACKGROUND_CGROUP}" if background else None,
    )
    follower = threading.Thread(target=_follow, args=(container, cell.name, log_file), daemon=True)
    follower.start()
    timed_out = False
    try:
        container.wait(timeout=timeout)
    except Exception:  # the SDK raises requests' ReadTimeout (or ConnectionError) when the wait runs out
        timed_out = True
    finally:
        # past the timeout, or on Ctrl-C/SIGTERM: stop it first, which ends its log stream
        with contextlib.suppress(Exception):  # it has exited already
            container.kill()
        follower.join(timeout=30)
        container.remove(force=True)
    wall = round(time.monotonic() - started, 1)
    record = _cell_record(cell, home, log_file, wall, timed_out, timeout)
    for build_log in sorted((home / "data" / "logs").glob("*.log")):  # the build's and the server's
        shutil.copy2(build_log, out_dir / f"{cell.name}-{build_log.name}")
    shutil.rmtree(home, ignore_errors=True)
    return record


def _follow(container: Any, name: str, log_file: Path) -> None:
    with log_file.open("wb") as handle:
        for chunk in container.logs(stream=True, follow=True):
            handle.write(chunk)
            handle.flush()
            for line in chunk.decode(errors="replace").splitlines():
                if line.startswith("[") or line.startswith("error"):
                    print(f"  {name}: {line}", flush=True)


def _cell_record(cell: Cell, home: Path, log_file: Path, wall: float, timed_out: bool,
                 timeout: float) -> dict[str, Any]:
    record: dict[str, Any] = {"cell": cell.name, "pin": cell.commit, "source": cell.spec, "backend": cell.backend,
                              "flavour": cell.flavour, "wall_seconds": wall, "log": str(log_file)}
    result_file = home / "result.json"
    inside: dict[str, Any] = json.loads(result_file.read_text()) if result_file.is_file() else {}
    record.update(inside)
    if timed_out:
        stage = last_stage(log_file.read_text(errors="replace")) if log_file.is_file() else None
        record.update(result="timed out", detail=f"ran past --timeout {timeout:.0f} s"
                      + (f" while in {stage}" if stage else ""))
    elif not inside:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] if log_file.is_file() else []
        record.update(result="failed", stage="container",
                      detail=one_line(tail[0] if tail else "the container wrote no result", 400))
    else:
        record["result"] = "failed" if inside.get("error") else "passed"
    return record


def last_stage(cell_output: str) -> str | None:
    """The last stage a cell's output announced (``[12:00:00] compile``)."""
    stages = [line.split("] ", 1)[1] for line in cell_output.splitlines() if line.startswith("[") and "] " in line]
    return stages[-1] if stages else None


# --- the report ----------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"CI matrix, {report['finished'][:16].replace('T', ' ')} UTC, on {report['machine']['cpu']} "
        f"({report['machine']['logical_cores']} logical cores, {report['machine']['os']}); "
        f"wall time {_duration(report['wall_seconds'])}, cell timeout {_duration(report['timeout_s'])}.",
        "",
        "| cell | result | wall | build | ccache hits/misses | smoke test, or what failed |",
        "|---|---|---|---|---|---|",
    ]
    for cell in report["cells"]:
        ccache = cell.get("ccache")
        hits = f"{ccache['hits']}/{ccache['misses']}" if ccache else "–"
        build = _duration(cell["build_seconds"]) if cell.get("build_seconds") else "–"
        lines.append(f"| {cell['cell']} | {cell['result']} | {_duration(cell['wall_seconds'])} | {build} | {hits} "
                     f"| {_md_cell(_outcome(cell))} |")
    return "\n".join(lines) + "\n"


def _outcome(cell: dict[str, Any]) -> str:
    if cell["result"] != "passed":
        stage = f"{cell['stage']}: " if cell.get("stage") and cell["result"] == "failed" else ""
        return f"{stage}{cell.get('detail') or ''}"
    smoke = cell.get("smoke") or {}
    if "version" in smoke:
        return f"`--version`: {smoke['version']}; links {', '.join(smoke.get('links', []))}"
    text = f"{smoke.get('prompt', '')} → “{' '.join(str(smoke.get('answer', '')).split())}”"
    if "device" in smoke:
        text += f" ({smoke['offloaded']} on {smoke['device']})"
    return text


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    return reports.write_pair(out_dir / "matrix.json", report, markdown(report))


# --- the run -------------------------------------------------------------------------------------


def background_cgroup(driver: str, root: Path = CGROUP_ROOT) -> Path:
    """Make (or find) the idle cgroup the cells run in with ``--background``, for docker's cgroup ``driver``;
    one plain error when the driver, the kernel, the cgroup layout or our rights do not allow it."""
    v1 = root / "cpu"
    group = (v1 if v1.is_dir() else root) / BACKGROUND_CGROUP
    try:
        if driver != "cgroupfs":
            raise OSError(f"docker's cgroup driver is {driver or 'unknown'}, not cgroupfs")
        group.mkdir(exist_ok=True)
        (group / "cpu.idle").write_text("1\n")
    except OSError as exc:
        raise VelollmError(f"--background needs an idle cgroup at {group} (root, cgroupfs, Linux 5.15+) and "
                           f"could not make it ({exc}); run without --background") from exc
    return group


def run_matrix(cells: list[Cell], timeout: float, paths: Paths, background: bool = False) -> dict[str, Any]:
    client = images.connect()
    if background:
        group = background_cgroup(client.info().get("CgroupDriver", ""))
        print(f"cells run in the idle cgroup {group}: only on CPU time nothing else wants", flush=True)
    wanted_backends = [b for b in BACKENDS if any(c.backend == b for c in cells)]
    if "cuda" in wanted_backends and not (CUDA_HOME / "bin" / "nvcc").is_file():
        raise VelollmError(f"cuda cells mount the host's CUDA toolkit, and {CUDA_HOME}/bin/nvcc is not there: "
                           "install the CUDA toolkit or leave the cuda cells out (--cells cpu --cells vulkan)")
    started_at = datetime.now(UTC)
    started = time.monotonic()
    tags = {backend: images.ensure_backend_image(client, backend) for backend in wanted_backends}
    images.ensure_ccache_volume(client, tags[wanted_backends[0]], images.host_ccache_dir())
    model = demo_models.fetch_model(paths)
    out_dir = ensure_dir(paths.ci_reports / f"matrix-{started_at.strftime('%Y%m%d-%H%M%S')}")
    hw = hardware.detect(build_dir=paths.cache)
    report: dict[str, Any] = {
        "lane": "matrix",
        "started": started_at.isoformat(timespec="seconds"),
        "timeout_s": timeout,
        "background": background,
        "machine": {"cpu": hw.cpu.model, "logical_cores": hw.cpu.logical_cores,
                    "os": f"{hw.os} {platform.machine()}"},
        "images": tags,
        "ccache_volume": images.CCACHE_VOLUME,
        "cells": [],
    }
    repo = snapshot_repo(paths.cache / "ci-matrix" / f"repo-{os.getpid()}")
    try:
        for cell in cells:
            print(f"[{time.strftime('%H:%M:%S')}] cell {cell.name}", flush=True)
            src = source.fetch(cell.spec, paths)  # on the host: the containers have no network
            record = run_cell(client, cell, tags[cell.backend], paths, src, model, timeout, out_dir, repo,
                              background)
            print(f"[{time.strftime('%H:%M:%S')}] cell {cell.name}: {record['result']} in "
                  f"{_duration(record['wall_seconds'])}" + (f" ({record['detail']})" if record.get("detail") else ""),
                  flush=True)
            report["cells"].append(record)
            report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
            report["wall_seconds"] = round(time.monotonic() - started, 1)
            write_report(report, out_dir)  # after every cell, so a long run can be read while it goes on
    finally:
        shutil.rmtree(repo, ignore_errors=True)
    return report


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # `kill` must remove the running cell's container as Ctrl-C does (run_cell's finally)
    raise KeyboardInterrupt


@click.command()
@click.option("--cells", "patterns", multiple=True, metavar="PATTERN",
              help="Run only the cells matching this glob or word (repeatable), e.g. cpu, '0c1e570-*-patched'.")
@click.option("--timeout", type=float, default=DEFAULT_TIMEOUT_S, show_default=True,
              help="Seconds a cell may run; past it the cell is reported as timed out and the next one runs.")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path),
              help="velollm home for sources, the model and the reports (VELOLLM_HOME); default: the user's.")
@click.option("--background", is_flag=True,
              help="Run the cells' containers in an idle cgroup: they take only the CPU time nothing else on the "
                   "machine wants (cells take longer on a busy machine, and their times are not comparable).")
@click.option("--list", "list_only", is_flag=True, help="Print the cells and exit.")
def main(patterns: tuple[str, ...], timeout: float, home: Path | None, background: bool, list_only: bool) -> None:
    """Build and smoke-test pins × backends × {vanilla, patched} in clean Debian containers, and report."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if home is not None:
        os.environ["VELOLLM_HOME"] = str(home)
    try:
        if timeout <= 0:
            raise VelollmError(f"--timeout must be a positive number of seconds, not {timeout:g}", exit_code=2)
        cells = select_cells(patterns, all_cells())
        if list_only:
            print("\n".join(c.name for c in cells))
            return
        report = run_matrix(cells, timeout, get_paths(), background)
    except VelollmError as exc:
        print(f"error: {plain(str(exc), 8192)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted: the running cell's container was removed; the cells done are in the report",
              file=sys.stderr)
        sys.exit(130)
    out_dir = Path(report["cells"][0]["log"]).parent
    print(markdown(report))
    print(f"report: {out_dir / 'matrix.json'} and {out_dir / 'matrix.md'}")
    if any(cell["result"] != "passed" for cell in report["cells"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
