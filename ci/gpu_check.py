"""A one-shot check of the patch series on a GPU machine with no network (issue #30, part 3).

Two steps. Here, with the network::

    python -m ci.gpu_check prepare --to .gpucheck

gathers what the lent machine lacks into ``.gpucheck/`` (git-ignored, carried with the working tree): the
trimmed llama.cpp source (``source export --trimmed``, which records its commit), wheels of our dependencies
that the machine's image does not have (gguf and platformdirs; KINDS.md lists its packages), and a real model
small enough to travel (SmolLM2-135M cut to its first layers and re-quantized to Q4_0, as many layers as the
64 MiB limit on the travelling tree leaves room for; every size is measured and printed). There::

    python -m ci.gpu_check --gpu cuda --from .gpucheck --out $OUT

builds the series vanilla and patched (llama-server and llama-fit-params only; CUDA for compute capability 9.0,
the H100 and H200), makes its models (a random-weight Q4_0 llama of a real 8B shape written with numpy, 4.2 GB;
the travelled real model at F16 as a speculation target), and measures: greedy outputs vanilla vs patched token
by token, the tuner's plan vs upstream's defaults (``bench ab`` through the product's library), KV memory at a
32K context (vanilla's preallocation vs ``--kv-on-demand``, host RSS and device memory, with the KV on the
device and in host memory), and ``--spec-adaptive`` vs fixed draft lengths with a draft model. Every stage has
a time limit within one budget (``--budget-s``); a stage that runs out is stopped with its servers and
compiles, what needed it is skipped and says so, and one JSON and one Markdown report are written into
``--out`` after every stage, so a run cut short still leaves them. On a GPU the patched build runs first and
the vanilla one (at a lower priority) while the stages that need only the patched build measure; ``--gpu cpu``
builds both first and runs the same flow with a 4-layer model of the same widths (2 cores: ~8 minutes with the
builds in ccache).

The command for the device tool's ``run`` (kind nvidia-h100-x1; its python3 is 3.12 with every dependency but
the carried wheels; ``carry``: [".gpucheck"]; ``timeout_s``: 600, the budget's 480 s plus the wheels, the
interpreter and the reports)::

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target
    /tmp/site .gpucheck/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && { nvidia-smi -L;
    python3 -m ci.gpu_check --gpu cuda --arch 9.0 --from .gpucheck --out $OUT --home /tmp/gpu-check
    --budget-s 480 2>&1 | tee $OUT/gpu-check.log; }

(one line; the breaks are for reading). ``gpu-check.json``, ``gpu-check.md`` and the log come back. Two CUDA
builds of this tree may not fit 480 s on 16 cores (nobody has timed one there yet): the report gives each
build's time or its last ``[n/N]`` at the cut. If vanilla's was cut, the same command again on the still-warm
machine (within its 30 s) reuses every installed build under ``--home`` (identical inputs), so its minutes go
to vanilla's build and the stages that need it; the 15 minutes of device time hold the start and two such runs
only if the first stays under about 8 minutes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import psutil

from ci import gpu_check_models as gcm
from ci import reports
from velollm_patch import builds, demo_models, hardware, proc, serve, source, tune
from velollm_patch.bench.metrics import MemorySampler, RatioStats, geometric_means
from velollm_patch.bench.report import geomean_rows, ratio_rows
from velollm_patch.bench.runner import BenchConfig, run_ab
from velollm_patch.bench.targets import TargetSpec
from velollm_patch.build import BuildOptions, plan_build, run_build
from velollm_patch.errors import VelollmError, one_line
from velollm_patch.model import inspect_model
from velollm_patch.paths import Paths, ensure_dir, get_paths
from velollm_patch.server_flags import read_server_flags
from velollm_patch.units import MiB

REPORT_SCHEMA = "velollm-gpu-check/1"
REPORT_JSON = "gpu-check.json"
REPORT_MD = "gpu-check.md"
PREPARED_MANIFEST = "prepared.json"
DEFAULT_PREPARED = Path(".gpucheck")
# The device tool's limit on the working tree that travels (tracked and untracked-not-ignored files plus carry).
TRAVEL_LIMIT_BYTES = 64 * MiB
# Room kept under that limit for what the tree gains between prepare and the call (a few edited files).
TRAVEL_MARGIN_BYTES = 4 * MiB
REAL_MODEL = "smollm2-135m"
# Our dependencies that the lent machines' image ('cuda', KINDS.md as read on 2026-11-17) does not hold; the
# others (click, httpx, jinja2, psutil, nvidia-ml-py, filelock, rich, numpy and gguf's needs) are there.
DEVICE_MISSING_PACKAGES = ("gguf", "platformdirs")
DEVICE_PYTHON = "3.12"
# What the check runs: the server, and the tuner's memory oracle.
CHECK_TARGETS = ("llama-server", "llama-fit-params")
FLAVOURS = ("patched", "vanilla")
# A stage is not started with less than this left: a server start alone takes seconds.
MIN_STAGE_S = 10.0
# After a stage's limit: time for its thread to notice its servers were stopped.
STAGE_GRACE_S = 10.0
KV_CONTEXT = 32768
# Where cuBLAS (which a CUDA build links) may be: the toolkit, the system, or the nvidia-cublas wheel.
CUBLAS_GLOBS = ("/usr/local/cuda*/lib64/libcublas.so*", "/usr/local/cuda*/include/cublas_v2.h",
                "/usr/lib/x86_64-linux-gnu/libcublas.so*")
# Greedy prompts for the output comparison and speculation (SmolLM2's chat format, which both models use).
PROMPTS = (
    "<|im_start|>user\nWrite a Python function that checks whether a string is a palindrome, with a docstring."
    "<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nExplain in three sentences why the sky is blue.<|im_end|>\n<|im_start|>assistant\n",
    "The three most important rules of writing a clear bug report are",
)
FILL_SENTENCE = "The river ran past the old mill while the miller counted sacks of grain one by one. "


@dataclass(frozen=True)
class Sizing:
    """What each stage may spend, per backend: a lent GPU machine has 16 cores and the budget is its minutes;
    here (2 cores) the same flow runs smaller."""

    budget_s: float
    build_s: float
    models_s: float
    identity_s: float
    kv_s: float
    ab_s: float
    spec_s: float
    shape: str
    n_predict: int
    spec_sweep: tuple[int, ...]
    kv_fill_tokens: int
    ab_rounds: int
    overlap: bool
    """Measure with the patched build while the vanilla one compiles (at a lower priority). On a GPU the servers
    need little CPU; on a few cores their threads and the compilers share them and decoding crawls (1 token/s
    for a 70M model on 2 cores, measured), so there the check builds both first."""


SIZINGS = {
    # models_s: writing the 8B model (3.9 GiB) took 67 s on this project's 2-core VM beside a build; on the lent
    # machine it runs beside the patched build, which takes longer, so a generous limit costs nothing
    "cuda": Sizing(budget_s=480, build_s=330, models_s=180, identity_s=60, kv_s=75, ab_s=100, spec_s=75,
                   shape="8b", n_predict=128, spec_sweep=(2, 4, 8, 16), kv_fill_tokens=4096, ab_rounds=2,
                   overlap=True),
    "cpu": Sizing(budget_s=2400, build_s=900, models_s=120, identity_s=240, kv_s=180, ab_s=300, spec_s=400,
                  shape="8b-4layers", n_predict=24, spec_sweep=(2, 8), kv_fill_tokens=512, ab_rounds=1,
                  overlap=False),
}
# How much lower the vanilla build runs than the check while stages measure beside it.
BUILD_NICENESS = 10


# --------------------------------------------------------------------------------------------------------------
# Budget and stages
# --------------------------------------------------------------------------------------------------------------


class Budget:
    """The run's whole time allowance; each stage gets what it asks for, or what is left."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s = total_s
        self._clock = clock
        self._started = clock()

    def elapsed(self) -> float:
        return self._clock() - self._started

    def left(self) -> float:
        return max(0.0, self.total_s - self.elapsed())

    def limit(self, wanted_s: float, keep_s: float = 0.0) -> float:
        """Seconds a stage wanting ``wanted_s`` gets, keeping ``keep_s`` for the stages after it."""
        return max(0.0, min(wanted_s, self.left() - keep_s))


class Deadline:
    """One stage's end, for the timeouts of every blocking call inside it."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._end = clock() + seconds

    def left(self) -> float:
        return max(0.0, self._end - self._clock())

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise VelollmError(f"out of time before {what}")


@dataclass
class StageResult:
    """``status``: ok, failed (``detail`` says why), timeout (stopped at its limit) or skipped (not started:
    ``detail`` names the stage it needed or the time that was left)."""

    name: str
    status: str
    seconds: float = 0.0
    limit_s: float = 0.0
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


StageBody = Callable[[Deadline, dict[str, Any]], None]


def run_stage(
    name: str, body: StageBody, *, budget: Budget, wanted_s: float, keep_s: float = 0.0,
    needs: Mapping[str, StageResult | None] | None = None, on_timeout: Callable[[], None] | None = None,
    grace_s: float = STAGE_GRACE_S, min_s: float = MIN_STAGE_S,
) -> StageResult:
    """Run ``body(deadline, data)`` within its share of ``budget``; never longer than that plus ``grace_s``.

    The body runs in a thread and fills ``data`` as it goes, so a stage stopped at its limit still reports what
    it measured. At the limit ``on_timeout`` stops what the body waits on (its servers), which ends the body's
    blocking calls; a body that still does not return is left behind (a daemon thread) and the run goes on.
    """
    for needed, result in (needs or {}).items():
        if result is None or result.status != "ok":
            state = "did not run" if result is None else result.status
            return StageResult(name, "skipped", detail=f"needs {needed}, which {state}")
    limit = budget.limit(wanted_s, keep_s)
    if limit < min_s:
        left = f"out of time: {budget.left():.0f}s of the budget left"
        return StageResult(name, "skipped", limit_s=limit, detail=left)
    outcome = StageResult(name, "ok", limit_s=round(limit, 1))
    failure: list[BaseException] = []

    def work() -> None:
        try:
            body(Deadline(limit), outcome.data)
        except BaseException as exc:  # reported as the stage's failure; the run goes on with the next stage
            failure.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=work, name=f"stage-{name}", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        outcome.status, outcome.detail = "timeout", f"stopped at its limit of {limit:.0f}s"
        if on_timeout is not None:
            on_timeout()
        worker.join(grace_s)
    elif failure:
        exc = failure[0]
        outcome.status, outcome.detail = "failed", one_line(str(exc), 600) or type(exc).__name__
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


def stop_servers_of(binaries: Sequence[Path]) -> Callable[[], None]:
    """An ``on_timeout`` that kills this process's descendants running one of ``binaries``: the servers a
    stopped stage left, wherever in the library it started them (the builds' smoke tests run other copies)."""
    wanted = {str(b) for b in binaries}

    def stop() -> None:
        for child in psutil.Process().children(recursive=True):
            try:
                if child.exe() in wanted:
                    child.kill()
            except psutil.Error:
                continue

    return stop


def stop_descendants() -> list[int]:
    """Kill every process this one started that still runs: a stage left behind at its limit, or the vanilla
    build still compiling when the budget ran out (its compilers run in their own process group, which
    nothing else would end); returns their pids."""
    killed = []
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
            killed.append(child.pid)
        except psutil.Error:
            continue
    return killed


# --------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------


def write_reports(report: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """``gpu-check.json`` and ``gpu-check.md`` in ``out``."""
    return reports.write_pair(out / REPORT_JSON, report, markdown(report))


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def _mib(value: Any) -> str:
    return _fmt(value / MiB if isinstance(value, int | float) else None, " MiB")


def markdown(report: Mapping[str, Any]) -> str:
    stages: list[dict[str, Any]] = list(report.get("stages") or ())
    lines = [
        f"# GPU check: {report.get('gpu')} on {report.get('device', {}).get('summary', '?')}", "",
        f"- {report.get('created')}, {report.get('elapsed_s', 0):.0f} s of a {report.get('budget_s', 0):.0f} s "
        f"budget, status **{report.get('status')}**",
        f"- host: {report.get('device', {}).get('host', '?')}",
        f"- source: {report.get('source', '?')}", "",
        "## Stages", "",
        "| stage | status | seconds / limit | detail |", "|---|---|---:|---|",
    ]
    for stage in stages:
        detail = str(stage.get("detail") or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {stage['name']} | {stage['status']} | {stage.get('seconds', 0):.0f} / "
                     f"{stage.get('limit_s', 0):.0f} | {detail} |")
    by_name = {s["name"]: s.get("data") or {} for s in stages}
    for title, section in (("Builds", _builds_md), ("Models", _models_md), ("Greedy outputs, vanilla vs patched",
                           _identity_md), ("KV memory at a 32K context", _kv_md),
                           ("Tuner's plan vs upstream's defaults", _ab_md),
                           ("Adaptive vs fixed draft lengths", _spec_md)):  # fmt: skip
        body = section(by_name)
        if body:
            lines += ["", f"## {title}", "", *body]
    return "\n".join(lines) + "\n"


def _builds_md(data: Mapping[str, Mapping[str, Any]]) -> list[str]:
    rows = []
    for flavour in FLAVOURS:
        d = data.get(f"build-{flavour}")
        if d:
            progress = d.get("progress") or {}
            rows.append(f"| {flavour} | {d.get('build_id', '–')} | {_fmt(d.get('build_seconds'), ' s')} | "
                        f"{progress.get('stage', '–')} {progress.get('done', '')}/{progress.get('total', '')} |")
    if not rows:
        return []
    return ["| build | id | build time | last progress |", "|---|---|---:|---|", *rows]


def _models_md(data: Mapping[str, Mapping[str, Any]]) -> list[str]:
    files = (data.get("models") or {}).get("files") or {}
    rows = [f"| {role} | {f.get('name')} | {_mib(f.get('bytes'))} | {_fmt(f.get('seconds'), ' s')} |"
            for role, f in files.items()]
    return ["| role | file | size | made in |", "|---|---|---:|---:|", *rows] if rows else []


def _identity_md(data: Mapping[str, Mapping[str, Any]]) -> list[str]:
    per_model = (data.get("identity") or {}).get("models") or {}
    lines = []
    for model, d in per_model.items():
        for i, prompt in enumerate(d.get("prompts") or ()):
            first = prompt.get("first_difference")
            lines.append(f"| {model} | {i + 1} | {prompt.get('tokens')} | "
                         f"{'identical' if first is None else f'differ from token {first}'} |")
    if not lines:
        return []
    speeds = [f"- {model}: decode {_fmt(d.get('decode_tps', {}).get('vanilla'), ' tok/s')} vanilla, "
              f"{_fmt(d.get('decode_tps', {}).get('patched'), ' tok/s')} patched (one pass, not a benchmark)"
              for model, d in per_model.items()]
    return ["| model | prompt | tokens | vanilla vs patched |", "|---|---:|---:|---|", *lines, "", *speeds]


def _kv_md(data: Mapping[str, Mapping[str, Any]]) -> list[str]:
    kv = data.get("kv") or {}
    variants: dict[str, dict[str, Any]] = kv.get("variants") or {}
    if not variants:
        return []
    lines = [f"Model {kv.get('model')}, `-c {KV_CONTEXT} -np 1 -fa on`; 'filled' after a "
             f"{kv.get('fill_tokens')}-token prompt. {kv.get('preallocated_note', '')}", "",
             "| variant | build | host RSS idle | host RSS filled | device idle | device filled | KV reserved | "
             "KV committed filled |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in variants.items():
        idle, filled = v.get("idle") or {}, v.get("filled") or {}
        lines.append(f"| {name} | {v.get('build')} | {_mib(idle.get('rss_bytes'))} | {_mib(filled.get('rss_bytes'))} "
                     f"| {_mib(idle.get('device_bytes'))} | {_mib(filled.get('device_bytes'))} | "
                     f"{_mib(idle.get('kv_reserved_bytes'))} | {_mib(filled.get('kv_committed_bytes'))} |")
    if kv.get("device_memory_source"):
        lines += ["", f"Device memory: {kv['device_memory_source']}."]
    return lines


def _ab_md(data: Mapping[str, Mapping[str, Any]]) -> list[str]:
    ab = data.get("tune-ab") or {}
    if not ab:
        return []
    lines = [f"A = {ab.get('a_label')}, B = {ab.get('b_label')}; status {ab.get('status')}"
             + (f" ({ab.get('error')})" if ab.get("error") else ""), ""]
    if ab.get("plan"):
        lines += ["Plan:", "", "```", *ab["plan"], "```", ""]
    ratios = [RatioStats(r["key"], r["a_median"], r["b_median"], tuple(r["ratios"])) for r in ab.get("ratios") or ()]
    if ratios:
        lines += [*ratio_rows(ratios), "", *geomean_rows(ratios)]
    return lines


def _spec_md(data: Mapping[str, Mapping[str, Any]]) -> list[str]:
    spec = data.get("spec") or {}
    variants: dict[str, dict[str, Any]] = spec.get("variants") or {}
    if not variants:
        return []
    lines = [f"Target {spec.get('target')}, draft {spec.get('draft')}; {spec.get('reps')} alternating reps of "
             f"{spec.get('prompts')} prompts x {spec.get('n_predict')} tokens.", "",
             "Speed is compared with plain decoding (`plain`), text with plain decoding on the kernels speculation "
             "runs on (`plain-bi`, where the build has them).", "",
             "| variant | decode tok/s | vs plain | acceptance | drafted | same text as plain-bi |",
             "|---|---:|---:|---:|---:|---|"]
    for name, v in variants.items():
        lines.append(f"| {name} | {_fmt(v.get('tps'))} | {_fmt(v.get('vs_plain'), '', 3)} | "
                     f"{_fmt(v.get('acceptance'), '', 3)} | {_fmt(v.get('draft_n'))} | "
                     f"{_fmt(v.get('same_as_plain'))} |")
    if spec.get("adaptive_vs_best_fixed") is not None:
        lines += ["", f"Adaptive over the best fixed length ({spec.get('best_fixed')}): "
                      f"x{spec['adaptive_vs_best_fixed']:.3f}."]
    return lines


# --------------------------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def travelling_tree_bytes(root: Path, exclude: Path) -> int:
    """Bytes of what the device tool sends besides ``carry``: tracked files and untracked ones git does not
    ignore, less anything under ``exclude`` (the prepared folder, counted on its own)."""
    listed = proc.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).output
    total = 0
    for name in filter(None, listed.split("\0")):
        path = root / name
        if path.is_file() and not path.is_relative_to(exclude):
            total += path.stat().st_size
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def download_wheels(names: Sequence[str], dest: Path) -> list[Path]:
    """Wheels of the installed versions of ``names`` for the machine's Python (pure-Python wheels)."""
    ensure_dir(dest)
    for name in names:
        version = importlib.metadata.version(name)
        proc.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                  "--python-version", DEVICE_PYTHON, "-d", dest, f"{name}=={version}"],
                 timeout=600, what=f"pip download {name}=={version}")
    return sorted(dest.glob("*.whl"))


def prepare(to: Path, *, limit_bytes: int = TRAVEL_LIMIT_BYTES, margin_bytes: int = TRAVEL_MARGIN_BYTES,
            real_layers: int | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Gather what the check needs on a machine with no network into ``to``; returns its manifest."""
    paths = get_paths()
    to = to.resolve()
    if to.exists():
        shutil.rmtree(to)
    ensure_dir(to)
    fetched = source.fetch(source.DEFAULT_SOURCE, paths)
    tarball = source.export_trimmed(fetched, to / f"llama.cpp-{fetched.short_commit}-trimmed.tar.gz")
    wheels = download_wheels(DEVICE_MISSING_PACKAGES, to / "wheels")
    tree = travelling_tree_bytes(repo_root(), to)
    room = limit_bytes - margin_bytes - tree - tarball.stat().st_size - sum(w.stat().st_size for w in wheels)
    original = demo_models.fetch_model(paths, REAL_MODEL)
    layers = real_layers or gcm.q4_0_layers_that_fit(original, room)
    if layers < 1:
        raise VelollmError(f"no room for a real model: {room / MiB:.1f} MiB left under the limit")
    real = gcm.truncate_requantize(original, to / "models" / f"{REAL_MODEL}-{layers}layers-q4_0.gguf", layers)
    files = {
        "source": tarball, "real_model": real, **{f"wheel:{w.name.split('-')[0]}": w for w in wheels},
    }
    manifest: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": {"spec": fetched.spec, "commit": fetched.commit},
        "real_model": {"from": REAL_MODEL, "layers": layers, "of_layers": inspect_model(original).n_layers},
        "files": {role: {"path": str(p.relative_to(to)), "bytes": p.stat().st_size, "sha256": _sha256(p)}
                  for role, p in files.items()},
    }
    (to / PREPARED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    carried = folder_bytes(to)
    total = tree + carried
    for role, entry in manifest["files"].items():
        echo(f"{role:<22} {entry['bytes'] / MiB:8.2f} MiB  {entry['path']}")
    echo(f"{'working tree':<22} {tree / MiB:8.2f} MiB  (tracked and untracked files git does not ignore)")
    echo(f"{'travels in all':<22} {total / MiB:8.2f} MiB  of {limit_bytes / MiB:.0f} MiB")
    if total > limit_bytes:
        raise VelollmError(f"{total / MiB:.1f} MiB would travel, over the {limit_bytes / MiB:.0f} MiB limit: "
                           "pass --real-layers with fewer layers")
    manifest["travel_bytes"] = total
    return manifest


# --------------------------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    """What the stages share: options, places, the builds as they finish, the models once made."""

    gpu: str
    sizing: Sizing
    prepared: Path
    out: Path
    paths: Paths
    arch: tuple[str, ...]
    jobs: int | None
    hw: hardware.HardwareInfo | None = None
    source_spec: str = ""
    real_model: Path | None = None
    built: dict[str, builds.InstalledBuild] = field(default_factory=dict)
    build_done: dict[str, threading.Event] = field(default_factory=lambda: {f: threading.Event() for f in FLAVOURS})
    model_files: dict[str, Path] = field(default_factory=dict)

    @property
    def gpu_args(self) -> tuple[str, ...]:
        # every layer on the GPU, as a user of one card would run an 8B model (the CPU build has no such flag)
        return ("-ngl", "999") if self.gpu != "cpu" else ()

    @property
    def threads(self) -> str:
        return str(min(8, os.cpu_count() or 1))

    def server_binaries(self) -> list[Path]:
        return [b.directory / "bin" / "llama-server" for b in self.built.values()]


def nvidia_smi(fields: str, *, with_units: bool = False) -> str:
    """``nvidia-smi --query-gpu=FIELDS`` as CSV (the first GPU's line first); empty when it cannot answer."""
    units = "csv,noheader" if with_units else "csv,noheader,nounits"
    try:
        result = proc.run(["nvidia-smi", f"--query-gpu={fields}", f"--format={units}"], check=False, timeout=30)
    except VelollmError:  # not installed
        return ""
    return result.output.strip() if result.returncode == 0 else ""


def cublas_files() -> list[str]:
    """cuBLAS libraries and headers on this machine, for the report: a CUDA build that fails to link says why."""
    found = [p for pattern in CUBLAS_GLOBS for p in Path("/").glob(pattern.lstrip("/"))]
    for entry in sys.path:
        found += Path(entry).glob("nvidia/*/lib/libcublas.so*")
        found += Path(entry).glob("nvidia/*/include/cublas_v2.h")
    return sorted({str(p) for p in found})


def _read_prepared(prepared: Path) -> dict[str, Any]:
    manifest_file = prepared / PREPARED_MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as exc:
        raise VelollmError(f"{manifest_file} is missing or unreadable ({exc}): run `python -m ci.gpu_check "
                           "prepare` where there is a network, and carry its folder") from exc
    for role, entry in manifest["files"].items():
        path = prepared / entry["path"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            raise VelollmError(f"{path} ({role}) is missing or not the file prepare wrote; prepare again")
    return manifest


def stage_setup(ctx: Context, manifest: dict[str, Any]) -> StageBody:
    def body(deadline: Deadline, data: dict[str, Any]) -> None:
        files = manifest["files"]
        tarball = ctx.prepared / files["source"]["path"]
        # keyed by the tarball's digest: a home reused with a newer export must not build the older tree
        tree_root = ensure_dir(ctx.paths.cache / "exported" / files["source"]["sha256"][:12])
        with tarfile.open(tarball) as tar:
            top = tar.getnames()[0].split("/")[0]
            if not (tree_root / top / "CMakeLists.txt").is_file():
                tar.extractall(tree_root, filter="data")
        ctx.source_spec = f"path:{tree_root / top}"
        ctx.real_model = ctx.prepared / files["real_model"]["path"]
        ctx.hw = hardware.detect(build_dir=ctx.paths.cache)
        data["source"] = source.fetch(ctx.source_spec, ctx.paths).to_dict()
        data["hardware"] = ctx.hw.to_dict()
        if ctx.gpu == "cuda":
            data["nvidia_smi"] = nvidia_smi("name,memory.total,memory.used,driver_version", with_units=True)
            # where CMake may find cuBLAS, which the CUDA build links: the toolkit, or the pip wheel (nvidia-cublas)
            data["cublas"] = cublas_files()
            if not ctx.hw.toolchain.nvcc.present:
                raise VelollmError("nvcc was not found (looked on PATH, CUDA_HOME and /usr/local/cuda)")

    return body


def stage_build(ctx: Context, flavour: str, *, niced: bool) -> StageBody:
    def body(deadline: Deadline, data: dict[str, Any]) -> None:
        assert ctx.hw is not None
        if niced:
            # The measuring stages run meanwhile: the compilers (children of this thread) yield to the servers.
            thread = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + BUILD_NICENESS))
        options = BuildOptions(
            gpu=ctx.gpu, arch=ctx.arch, patches="all" if flavour == "patched" else "none", source=ctx.source_spec,
            jobs=ctx.jobs, smoke_model=ctx.real_model, make_current=False, targets=CHECK_TARGETS,
            timeout_s=max(1.0, deadline.left() - 30),  # the smoke test's server start after the compile
        )
        plan = plan_build(options, ctx.hw, ctx.paths)
        data.update(build_id=plan.build_id, cmake_args=list(plan.cmake_args), jobs=plan.jobs)

        def progress(stage: str, done: int, total: int) -> None:
            data["progress"] = {"stage": stage, "done": done, "total": total, "at_s": round(time.monotonic() - t0)}

        t0 = time.monotonic()
        try:
            installed = run_build(plan, ctx.hw, ctx.paths, on_progress=progress)
        except VelollmError as exc:
            raise VelollmError(f"{exc}; last build log lines: {_build_log_tail(ctx.paths, plan.build_id)}") from exc
        data["build_seconds"] = installed.manifest.get("build_seconds")
        ctx.built[flavour] = installed

    return body


def _build_log_tail(paths: Paths, build_id: str, lines: int = 12) -> str:
    logs = sorted(paths.logs.glob(f"build-{build_id}-*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return "(no log)"
    return " / ".join(logs[-1].read_text(errors="replace").splitlines()[-lines:])


def stage_models(ctx: Context) -> StageBody:
    def body(deadline: Deadline, data: dict[str, Any]) -> None:
        assert ctx.real_model is not None
        made = ensure_dir(ctx.paths.cache / "check-models")
        files: dict[str, Any] = {}
        data["files"] = files

        def record(role: str, path: Path, started: float) -> None:
            ctx.model_files[role] = path
            seconds = round(time.monotonic() - started, 1)
            files[role] = {"name": path.name, "bytes": path.stat().st_size, "seconds": seconds}

        record("real", ctx.real_model, time.monotonic())  # travelled as it is: the draft, and compared as it is
        started = time.monotonic()
        record("real_f16", gcm.dequantize_to_f16(ctx.real_model, made / f"{ctx.real_model.stem}-f16.gguf"), started)
        deadline.check("the synthetic model")
        shape = gcm.SHAPES[ctx.sizing.shape]
        started = time.monotonic()
        synthetic = gcm.write_synthetic_llama(made / f"synthetic-{ctx.sizing.shape}-q4_0.gguf", shape, ctx.real_model)
        record("synthetic", synthetic, started)
        data["synthetic_shape"] = asdict(shape)

    return body


def _start(ctx: Context, binary: Path, model: Path, args: Sequence[str], name: str,
           deadline: Deadline) -> serve.RunningServer:
    config = serve.ServerConfig(binary=binary, model=model, args=("-t", ctx.threads, *ctx.gpu_args, *args),
                                log_file=ctx.paths.logs / "gpu-check" / f"{name}-{time.strftime('%H%M%S')}.log")
    return serve.start_server(config, timeout=max(1.0, deadline.left()))


def _complete(server: serve.RunningServer, prompt: str, n_predict: int, deadline: Deadline,
              **params: Any) -> dict[str, Any]:
    return serve.complete(server, prompt, n_predict, timeout=max(1.0, deadline.left()), **params)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where two generations part, their common length when one is a prefix of
    the other and they differ in length, None when identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def stage_identity(ctx: Context) -> StageBody:
    def body(deadline: Deadline, data: dict[str, Any]) -> None:
        per_model: dict[str, Any] = {}
        data["models"] = per_model
        for role in ("real", "synthetic"):
            model = ctx.model_files[role]
            tokens: dict[str, list[list[int]]] = {}
            speeds: dict[str, float | None] = {}
            for flavour in FLAVOURS:
                binary = ctx.built[flavour].bin("llama-server")
                with _start(ctx, binary, model, ("-c", "4096", "-np", "1", "--cache-ram", "0"),
                            f"identity-{role}-{flavour}", deadline) as server:
                    results = [_complete(server, p, ctx.sizing.n_predict, deadline, return_tokens=True)
                               for p in PROMPTS]
                tokens[flavour] = [list(r.get("tokens") or ()) for r in results]
                timings = [r.get("timings") or {} for r in results]
                n = sum(int(t.get("predicted_n") or 0) for t in timings)
                ms = sum(float(t.get("predicted_ms") or 0) for t in timings)
                speeds[flavour] = round(1000 * n / ms, 1) if ms else None
            if not all(tokens["vanilla"]):
                raise VelollmError("the server returned no token ids (return_tokens): cannot compare")
            prompts = [{"tokens": len(v), "first_difference": first_difference(v, p)}
                       for v, p in zip(tokens["vanilla"], tokens["patched"], strict=True)]
            per_model[role] = {"model": model.name, "identical": all(p["first_difference"] is None for p in prompts),
                               "prompts": prompts, "decode_tps": speeds}
        data["identical"] = all(m["identical"] for m in per_model.values())

    return body


class _DeviceMemory:
    """Device memory a server holds: NVML's per-process figure (the bench's sampler), else the card's used
    memory less what was used before the server started (nvidia-smi). None on a CPU build."""

    def __init__(self, gpu: str) -> None:
        self.gpu = gpu
        self.baseline = self._card_used() if gpu == "cuda" else None
        self.source = ""

    @staticmethod
    def _card_used() -> int | None:
        try:
            return int(nvidia_smi("memory.used").split()[0]) * MiB
        except (IndexError, ValueError):
            return None

    def read(self, server: serve.RunningServer) -> tuple[int | None, int | None]:
        """(host RSS, device bytes) of ``server`` now."""
        sampler = MemorySampler(lambda: [server.pid])
        rss, vram = sampler.peaks()
        if self.gpu != "cuda":
            return rss, None
        if vram is not None:
            self.source = "NVML, per process"
            return rss, vram
        used = self._card_used()
        if used is None or self.baseline is None:
            return rss, None
        self.source = "nvidia-smi, the card's used memory less what was used before the first server"
        return rss, used - self.baseline


def stage_kv(ctx: Context) -> StageBody:
    def body(deadline: Deadline, data: dict[str, Any]) -> None:
        model = ctx.model_files["synthetic"]
        patched = ctx.built["patched"].bin("llama-server")
        if "vanilla" in ctx.built:
            reference, reference_build, note = ctx.built["vanilla"].bin("llama-server"), "vanilla", ""
        else:
            # the series keeps upstream's behaviour unless the flag is given: the fallback when vanilla is not built
            reference, reference_build = patched, "patched, no --kv-on-demand"
            note = "The vanilla build was not there in time: 'preallocated' ran the patched build without the flag."
        data.update(model=model.name, fill_tokens=ctx.sizing.kv_fill_tokens, preallocated_note=note)
        base = ("-c", str(KV_CONTEXT), "-np", "1", "-fa", "on", "--cache-ram", "0", "--metrics", "--no-warmup")
        variants: list[tuple[str, Path, str, tuple[str, ...]]] = [
            ("preallocated", reference, reference_build, base),
            ("on-demand", patched, "patched", (*base, "--kv-on-demand")),
        ]
        if ctx.gpu != "cpu":
            # KV on the device is allocated by the GPU backend, which the patch does not change; in host memory
            # (-nkvo) it is what --kv-on-demand commits as tokens arrive
            variants += [("preallocated, KV in host memory", reference, reference_build, (*base, "-nkvo")),
                         ("on-demand, KV in host memory", patched, "patched", (*base, "-nkvo", "--kv-on-demand"))]
        device = _DeviceMemory(ctx.gpu)
        results: dict[str, Any] = {}
        data["variants"] = results
        for name, binary, build_name, args in variants:
            deadline.check(name)
            with _start(ctx, binary, model, args, f"kv-{name.replace(' ', '-').replace(',', '')}", deadline) as server:
                time.sleep(1.0)  # freed start-up pages are not always given back at once
                entry: dict[str, Any] = {"build": build_name, "args": list(args)}
                entry["idle"] = _memory(server, device)
                prompt = FILL_SENTENCE * max(1, ctx.sizing.kv_fill_tokens // len(server.tokenize(FILL_SENTENCE)))
                _complete(server, prompt, 1, deadline)
                entry["filled"] = _memory(server, device)
                results[name] = entry
        data["device_memory_source"] = device.source

    return body


def _memory(server: serve.RunningServer, device: _DeviceMemory) -> dict[str, Any]:
    rss, device_bytes = device.read(server)
    metrics = server.metrics()
    return {"rss_bytes": rss, "device_bytes": device_bytes,
            **{k: int(metrics[k]) for k in ("kv_reserved_bytes", "kv_committed_bytes") if k in metrics}}


def stage_tune_ab(ctx: Context) -> StageBody:
    def body(deadline: Deadline, data: dict[str, Any]) -> None:
        assert ctx.hw is not None
        patched = ctx.built["patched"]
        model = ctx.model_files["synthetic"]
        plan = tune.plan(inspect_model(model), ctx.hw, tune.BuildFacts.from_build(patched, ctx.paths),
                         tune.TuneRequest(workload="chat"))
        data["plan"] = plan.describe()
        spec_a = TargetSpec(kind="build", ref=patched.build_id, model=str(model),
                            label="patched build, upstream defaults")
        spec_b = TargetSpec(kind="build", ref=patched.build_id, model=str(model), server_args=plan.args,
                            label="patched build, tuned:chat")
        data.update(a_label=spec_a.label, b_label=spec_b.label)
        config = BenchConfig(scenarios=("short", "code_gen", "concurrency"), repeats=1, n_predict=32,
                             concurrency=(1, 4), warmup=1, request_timeout=max(1.0, deadline.left()))
        result = run_ab(spec_a, spec_b, config, ctx.sizing.ab_rounds, paths=ctx.paths,
                        hardware=ctx.hw.to_dict())
        ratios = result.ratios()
        data.update(
            status=result.status, error=result.error,
            ratios=[{"key": r.key, "a_median": r.a_median, "b_median": r.b_median, "ratios": list(r.ratios)}
                    for r in ratios],
            geomeans={metric: mean for metric, (mean, _) in geometric_means(ratios).items()},
        )
        if result.status not in ("complete",):
            raise VelollmError(f"bench ab ended {result.status}: {result.error or 'a scenario failed'}")

    return body


def stage_spec(ctx: Context) -> StageBody:
    def body(deadline: Deadline, data: dict[str, Any]) -> None:
        binary = ctx.built["patched"].bin("llama-server")
        target, draft = ctx.model_files["real_f16"], ctx.model_files["real"]
        sweep = ctx.sizing.spec_sweep
        common: tuple[str, ...] = ("-c", "4096", "-np", "1", "--cache-ram", "0", "--no-warmup")
        drafting = (*common, "-md", str(draft), "--spec-type", "draft-simple", "--spec-draft-p-min", "0",
                    "--spec-draft-n-max", str(max(sweep)), *(("-ngld", "999") if ctx.gpu != "cpu" else ()))
        # "plain" is upstream's decoding, the speed reference; speculation runs the batch-invariant CPU kernels
        # (patch 0013), so the text reference is plain decoding on those ("plain-bi"), where the build has them
        server_args: dict[str, tuple[str, ...]] = {"plain": common}
        if read_server_flags(binary, ctx.paths).accepts("--spec-batch-invariant"):
            server_args["plain-bi"] = (*common, "--spec-batch-invariant", "on")
        server_args["draft"] = drafting
        # its own server: the adaptive policy learns step times per slot, and must not learn from the fixed runs
        server_args["adaptive"] = (*drafting, "--spec-adaptive")
        requests: dict[str, dict[str, Any]] = {name: {} for name in server_args if name.startswith("plain")}
        requests.update({f"fixed-{n}": {"speculative": {"adaptive": False, "n_max": n}} for n in sweep})
        requests["adaptive"] = {}
        data.update(target=target.name, draft=draft.name, n_predict=ctx.sizing.n_predict, prompts=len(PROMPTS),
                    reps=2, server_args={name: list(args) for name, args in server_args.items()})
        servers: dict[str, serve.RunningServer] = {}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in requests}
        try:
            for name, args in server_args.items():
                servers[name] = _start(ctx, binary, target, args, f"spec-{name}", deadline)
            for server in servers.values():
                _complete(server, PROMPTS[0], 8, deadline)  # warm-up
            order = list(requests)
            for rep in range(2):  # alternating order: a drift of the machine favours no variant
                for name in order if rep % 2 == 0 else reversed(order):
                    server = servers[name if name in servers else "draft"]
                    runs[name].append(_spec_run(server, ctx.sizing.n_predict, deadline, requests[name]))
        finally:
            for server in servers.values():
                server.stop()
        data["variants"] = summarize_spec(runs)
        fixed = {n: v["tps"] for n, v in data["variants"].items() if n.startswith("fixed-") and v["tps"]}
        if fixed and data["variants"]["adaptive"]["tps"]:
            best = max(fixed, key=lambda n: fixed[n])
            ratio = data["variants"]["adaptive"]["tps"] / fixed[best]
            data.update(best_fixed=best, adaptive_vs_best_fixed=round(ratio, 4))

    return body


def _spec_run(server: serve.RunningServer, n_predict: int, deadline: Deadline, extra: dict[str, Any]) -> dict[str, Any]:
    tokens, ms, drafted, accepted, texts = 0, 0.0, 0, 0, []
    for prompt in PROMPTS:
        result = _complete(server, prompt, n_predict, deadline, **extra)
        timings = result.get("timings") or {}
        tokens += int(timings.get("predicted_n") or 0)
        ms += float(timings.get("predicted_ms") or 0)
        drafted += int(timings.get("draft_n") or 0)
        accepted += int(timings.get("draft_n_accepted") or 0)
        texts.append(str(result.get("content")))
    return {"tokens": tokens, "ms": ms, "draft_n": drafted, "draft_n_accepted": accepted, "texts": texts}


def summarize_spec(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per variant: decode tokens/s over all its runs, the ratio to plain decoding's ("plain"), draft acceptance,
    and whether every text equals plain decoding's on the kernels speculation uses ("plain-bi" where it ran,
    else "plain"): lossless speculation."""
    plain_runs = runs.get("plain-bi") or runs.get("plain") or ()
    plain_texts = plain_runs[0]["texts"] if plain_runs else None
    out: dict[str, dict[str, Any]] = {}
    for name, variant_runs in runs.items():
        tokens = sum(r["tokens"] for r in variant_runs)
        ms = sum(r["ms"] for r in variant_runs)
        drafted = sum(r["draft_n"] for r in variant_runs)
        out[name] = {
            "tps": round(1000 * tokens / ms, 2) if ms else None,
            "acceptance": round(sum(r["draft_n_accepted"] for r in variant_runs) / drafted, 4) if drafted else None,
            "draft_n": drafted,
            "same_as_plain": None if plain_texts is None or not variant_runs
            else all(r["texts"] == plain_texts for r in variant_runs),
            "runs": len(variant_runs),
        }
    plain_tps = out.get("plain", {}).get("tps")
    for entry in out.values():
        entry["vs_plain"] = round(entry["tps"] / plain_tps, 4) if entry["tps"] and plain_tps else None
    return out


def _device_summary(stages: Mapping[str, StageResult]) -> dict[str, str]:
    setup = stages.get("setup")
    smi = str(setup.data.get("nvidia_smi", "")) if setup else ""
    cpu = f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 1024**3:.0f} GiB"
    return {"summary": smi.splitlines()[0] if smi else cpu, "host": f"{platform.node()}: {cpu}"}


def check(gpu: str, prepared: Path, out: Path, home: Path, *, budget_s: float | None = None, shape: str | None = None,
          arch: tuple[str, ...] = (), jobs: int | None = None, overlap: bool | None = None,
          echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage within the budget and write the reports (after each stage); returns the report."""
    base = SIZINGS[gpu]
    chosen = {"budget_s": budget_s, "shape": shape, "overlap": overlap}
    sizing = Sizing(**{**asdict(base), **{k: v for k, v in chosen.items() if v is not None}})
    os.environ["VELOLLM_HOME"] = str(home)  # what library calls that read the paths themselves see
    ctx = Context(gpu=gpu, sizing=sizing, prepared=prepared.resolve(), out=out, paths=get_paths(), arch=arch, jobs=jobs)
    budget = Budget(sizing.budget_s)
    stages: dict[str, StageResult] = {}
    lock = threading.Lock()
    report: dict[str, Any] = {"schema": REPORT_SCHEMA, "gpu": gpu, "budget_s": sizing.budget_s,
                              "created": datetime.now(UTC).isoformat(timespec="seconds"), "sizing": asdict(sizing)}

    def record(result: StageResult) -> StageResult:
        """Keep a stage's result and rewrite the reports with it (the builds' thread records too)."""
        with lock:
            stages[result.name] = result
            report.update(stages=[asdict(s) for s in stages.values()], elapsed_s=round(budget.elapsed(), 1),
                          device=_device_summary(stages), status=_overall(stages), source=ctx.source_spec)
            write_reports(report, out)
        echo(f"[{budget.elapsed():6.0f}s] {result.name}: {result.status} ({result.seconds:.0f}s) {result.detail}")
        return result

    try:
        manifest = _read_prepared(ctx.prepared)
    except VelollmError as exc:
        record(StageResult("setup", "failed", detail=str(exc)))
        return report
    try:
        _run_stages(ctx, manifest, budget, stages, report, record)
    except KeyboardInterrupt:  # Ctrl-C or kill: the reports say so, with every stage recorded before it
        with lock:
            report.update(status="interrupted", elapsed_s=round(budget.elapsed(), 1))
            write_reports(report, out)
        raise
    return report


def _run_stages(
    ctx: Context, manifest: dict[str, Any], budget: Budget, stages: dict[str, StageResult], report: dict[str, Any],
    record: Callable[[StageResult], StageResult],
) -> None:
    """The stages in their order: the builds in a thread of their own, the models and measurements here."""
    sizing = ctx.sizing
    report["prepared"] = manifest
    setup = record(run_stage("setup", stage_setup(ctx, manifest), budget=budget, wanted_s=120))

    def build_all() -> None:
        for flavour in FLAVOURS:
            try:
                niced = flavour == "vanilla" and sizing.overlap
                # vanilla's build must leave time for the stages that run after it
                after = sizing.identity_s + sizing.kv_s + (0 if sizing.overlap else sizing.spec_s + sizing.ab_s)
                keep = after if flavour == "vanilla" else 0.0
                # every stage that uses vanilla compares it with patched: without patched it is not worth minutes
                needs: dict[str, StageResult | None] = {"setup": setup}
                if flavour == "vanilla":
                    needs["build-patched"] = stages.get("build-patched")
                record(run_stage(f"build-{flavour}", stage_build(ctx, flavour, niced=niced), budget=budget,
                                 wanted_s=sizing.build_s, keep_s=keep, needs=needs))
            finally:
                ctx.build_done[flavour].set()

    builder = threading.Thread(target=build_all, name="builds", daemon=True)
    builder.start()
    models_stage = record(run_stage("models", stage_models(ctx), budget=budget, wanted_s=sizing.models_s,
                                    needs={"setup": setup}))

    def wait_for(flavour: str) -> StageResult | None:
        ctx.build_done[flavour].wait(budget.left())
        return stages.get(f"build-{flavour}")

    if not sizing.overlap:
        wait_for("vanilla")
    patched = wait_for("patched")
    servers = ctx.server_binaries
    record(run_stage("spec", stage_spec(ctx), budget=budget, wanted_s=sizing.spec_s,
                     keep_s=sizing.identity_s + sizing.kv_s, needs={"build-patched": patched, "models": models_stage},
                     on_timeout=lambda: stop_servers_of(servers())()))
    record(run_stage("tune-ab", stage_tune_ab(ctx), budget=budget, wanted_s=sizing.ab_s,
                     keep_s=sizing.identity_s + sizing.kv_s, needs={"build-patched": patched, "models": models_stage},
                     on_timeout=lambda: stop_servers_of(servers())()))
    vanilla = wait_for("vanilla")
    record(run_stage("identity", stage_identity(ctx), budget=budget, wanted_s=sizing.identity_s, keep_s=sizing.kv_s,
                     needs={"build-patched": patched, "build-vanilla": vanilla, "models": models_stage},
                     on_timeout=lambda: stop_servers_of(servers())()))
    record(run_stage("kv", stage_kv(ctx), budget=budget, wanted_s=sizing.kv_s,
                     needs={"build-patched": patched, "models": models_stage},
                     on_timeout=lambda: stop_servers_of(servers())()))


def _overall(stages: Mapping[str, StageResult]) -> str:
    statuses = {s.status for s in stages.values()}
    return "ok" if statuses <= {"ok"} else "incomplete"


# --------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------


@click.group(invoke_without_command=True)
@click.option("--gpu", type=click.Choice(sorted(SIZINGS)), help="The backend to build and measure.")
@click.option("--from", "prepared", type=click.Path(path_type=Path), default=DEFAULT_PREPARED, show_default=True,
              help="The folder `prepare` wrote.")
@click.option("--out", type=click.Path(path_type=Path), help="Where gpu-check.json and gpu-check.md go.")
@click.option("--home", type=click.Path(path_type=Path), default=Path("/tmp/velollm-gpu-check"), show_default=True,
              help="VELOLLM_HOME of the check: its builds, models and logs.")
@click.option("--budget-s", type=float, help="Seconds for the whole check (default: 480 on cuda, 2400 on cpu).")
@click.option("--shape", type=click.Choice(sorted(gcm.SHAPES)), help="The synthetic model's shape.")
@click.option("--arch", multiple=True, help="CUDA compute capability, e.g. 9.0 (default: the detected GPU's).")
@click.option("--jobs", type=int, help="Compile jobs per build (default: every core).")
@click.option("--overlap/--no-overlap", default=None,
              help="Measure with the patched build while vanilla compiles (default: on cuda, not on cpu).")
@click.pass_context
def main(ctx: click.Context, gpu: str | None, prepared: Path, out: Path | None, home: Path, budget_s: float | None,
         shape: str | None, arch: tuple[str, ...], jobs: int | None, overlap: bool | None) -> None:
    """Build the series and measure it on this machine from a prepared folder (see `prepare`)."""
    if ctx.invoked_subcommand is not None:
        return
    if gpu is None or out is None:
        raise click.UsageError("give --gpu cuda|cpu and --out DIR (or the subcommand prepare)")
    # `kill` (or the device tool's limit) ends the check like Ctrl-C: through the cleanup below
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = check(gpu, prepared, out, home.resolve(), budget_s=budget_s, shape=shape, arch=arch, jobs=jobs,
                       overlap=overlap, echo=click.echo)
    except KeyboardInterrupt:
        click.echo(f"interrupted: the reports in {out} hold the stages recorded before")
        sys.exit(130)
    finally:
        stop_descendants()
    click.echo(f"report: {out / REPORT_MD} ({report.get('status')})")
    sys.exit(0 if report.get("status") == "ok" else 1)


@main.command("prepare")
@click.option("--to", type=click.Path(path_type=Path), default=DEFAULT_PREPARED, show_default=True)
@click.option("--real-layers", type=int, help="Layers of the real model to keep (default: as many as fit).")
@click.option("--limit-mib", type=float, default=TRAVEL_LIMIT_BYTES / MiB, show_default=True,
              help="What may travel to the lent machine in all.")
def prepare_cmd(to: Path, real_layers: int | None, limit_mib: float) -> None:
    """Gather the source, wheels and a small real model for a machine with no network."""
    try:
        manifest = prepare(to, limit_bytes=int(limit_mib * MiB), real_layers=real_layers, echo=click.echo)
    except VelollmError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"prepared {to} ({manifest['travel_bytes'] / MiB:.1f} MiB travel with the working tree)")


if __name__ == "__main__":
    main()
