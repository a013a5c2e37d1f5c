"""``tune --measure``: the speed knobs measured on this machine, build and model instead of guessed.

A bounded coordinate descent with the build's own ``llama-bench``: the decode and prompt threads first,
then ``--poll``, the ubatch, flash attention, the KV types and weight repacking, each tried with the
best of the knobs before it, and a last run of the chosen settings that gives the plan its predicted
tokens/s (llama-bench's: a server request, with its HTTP and sampling, sees less; docs/benchmarks/tuner.md).
A candidate replaces the default only when it is faster by more than :data:`TIE_FRACTION` and by more than
the repetitions' spread: two runs of the same settings differ by a few percent on a quiet machine, and a
default that ties keeps the plan as the planner would choose it without a measurement.

What is measured is kept under the cache directory, one file per build x model, with the key it was
made for (build id, the model file's path, size and mtime, the machine's fingerprint). :func:`load`
returns it only for that key: a file made for another build, model file or machine is ignored with a
note. A calibration is written whole, once complete (a temporary file renamed), so an interrupted one
leaves nothing.

Slots are not measured: they are a server property (requests decoded in one batch), not a llama-bench
parameter, and the bench's concurrency scenario is what measures them; the planner keeps planning them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from velollm_patch import proc
from velollm_patch.bench.metrics import ScenarioResult
from velollm_patch.builds import InstalledBuild
from velollm_patch.errors import VelollmError
from velollm_patch.hardware import HardwareInfo, probe_host_load
from velollm_patch.model import ModelInfo
from velollm_patch.paths import Paths, ensure_dir
from velollm_patch.units import GiB, MiB

log = logging.getLogger("velollm_patch.calibrate")

FORMAT_VERSION = 1
# Tokens of the prompt test and of the decode test: short enough that a 135M model's whole calibration stays
# within a minute or two on two cores; the prompt fills the largest ubatch tried, so that ubatches differ.
PROMPT_TOKENS = 512
GEN_TOKENS = 32
REPEATS = 3
# A candidate must beat the current choice by this much (and by the spreads) to replace it.
TIE_FRACTION = 0.05
# llama-bench's defaults (common/common.h, tools/llama-bench): the starting point of the search.
DEFAULT_POLL = 50
DEFAULT_UBATCH = 512
POLL_CANDIDATES = (DEFAULT_POLL, 0)
UBATCH_CANDIDATES = (DEFAULT_UBATCH, 256, 128)
# Other programs' work above this share of the hardware threads, before measuring, means they compete.
BUSY_LOAD = 0.5
# One llama-bench run loads the model and runs a few short tests; a model that needs longer is not one a
# calibration of minutes can measure.
BENCH_TIMEOUT_S = 600
# RAM left to the OS and other programs while measuring (as the planner leaves for serving).
HOST_MARGIN_BYTES = 1 * GiB
# Bits per weight of common GGUF quantizations, for saying which would fit when a model does not.
_QUANT_BITS = (("Q8_0", 8.5), ("Q6_K", 6.6), ("Q4_K_M", 4.9), ("Q3_K_M", 3.9), ("Q2_K", 3.0))

Knob = Literal["threads", "poll", "ubatch", "flash_attn", "kv_types", "repack", "final"]
ProgressCallback = Callable[[str, int, int], None]  # (what is being measured, done, total)


@dataclass(frozen=True)
class CalibrationKey:
    """What a calibration was measured with: it holds only for the same build, model file and machine."""

    build_id: str
    model_path: str
    model_bytes: int
    model_mtime_ns: int
    machine: str
    """CPU model, physical/logical cores, total memory, GPUs and the build's backend."""

    @classmethod
    def create(cls, build: InstalledBuild, model: Path, hw: HardwareInfo) -> CalibrationKey:
        path = model.resolve()
        st = path.stat()
        return cls(build.build_id, str(path), st.st_size, st.st_mtime_ns, machine_fingerprint(build, hw))

    def file_name(self) -> str:
        digest = hashlib.sha256(f"{self.build_id}\0{self.model_path}".encode()).hexdigest()[:12]
        return f"{Path(self.model_path).stem}-{digest}.json"

    def mismatch(self, wanted: CalibrationKey) -> str | None:
        """Why this key's calibration does not hold for ``wanted``; None when it does."""
        if self.build_id != wanted.build_id:
            return f"it was measured with build {self.build_id}, not {wanted.build_id}"
        if (self.model_bytes, self.model_mtime_ns) != (wanted.model_bytes, wanted.model_mtime_ns):
            return "the model file changed since it was measured"
        if self.machine != wanted.machine:
            return f"it was measured on another machine ({self.machine})"
        return None


def machine_fingerprint(build: InstalledBuild, hw: HardwareInfo) -> str:
    cpu = hw.cpu
    gpus = ", ".join(g.name for g in hw.gpus) or "no GPU"
    backend = build.backend
    return (
        f"{cpu.model}, {cpu.physical_cores} cores/{cpu.logical_cores} threads, "
        f"{round(hw.memory.total_bytes / GiB)} GiB, {gpus}, {backend} build"
    )


@dataclass(frozen=True)
class BenchPoint:
    """One llama-bench configuration: the knobs the calibration varies."""

    threads: int
    poll: int = DEFAULT_POLL
    ubatch: int = DEFAULT_UBATCH
    flash_attn: bool = True
    type_k: str = "f16"
    type_v: str = "f16"
    repack: bool = True

    def args(self) -> list[str]:
        return [
            "-t", str(self.threads), "--poll", str(self.poll), "-ub", str(self.ubatch),
            "-fa", "on" if self.flash_attn else "off", "-ctk", self.type_k, "-ctv", self.type_v,
            "--repack", "1" if self.repack else "0",
        ]


@dataclass(frozen=True)
class Measurement:
    """A row of the calibration's table: ``value`` of ``knob`` (as a server flag) and what it gave."""

    knob: Knob
    value: str
    point: BenchPoint
    prompt_tps: float | None
    decode_tps: float | None
    prompt_sd: float = 0.0
    """The standard deviation of the repetitions (llama-bench's ``stddev_ts``)."""
    decode_sd: float = 0.0


@dataclass(frozen=True)
class Calibration:
    key: CalibrationKey
    created: str
    duration_s: float
    chosen: BenchPoint
    """The winning settings; ``chosen.threads`` is the decode threads."""
    threads_batch: int
    decode_tps: float
    """Predicted: one request decoding ``gen_tokens`` after a short prompt, at the chosen settings."""
    prompt_tps: float
    """Predicted: a ``prompt_tokens`` prompt processed at the chosen settings."""
    prompt_tokens: int
    gen_tokens: int
    repeats: int
    table: tuple[Measurement, ...]

    def rows(self, knob: Knob) -> list[Measurement]:
        return [m for m in self.table if m.knob == knob]

    def evidence(self, knob: Knob, chosen: str, metric: Literal["decode", "prompt", "both"] = "both") -> str | None:
        """``measured: -t 2 decodes 184 tok/s (120 at -t 1)``: the chosen value's rates against the others';
        None when ``knob`` was not measured."""
        rows = self.rows(knob)
        mine = next((m for m in rows if m.value == chosen), None)
        if mine is None:
            return None
        parts = []
        for name, verb in (("decode", "decodes"), ("prompt", "processes prompts at")):
            if metric not in (name, "both"):
                continue
            rate = mine.decode_tps if name == "decode" else mine.prompt_tps
            if rate is None:
                continue
            others = [
                f"{r:.0f} at {m.value}" for m in rows
                if m is not mine and (r := m.decode_tps if name == "decode" else m.prompt_tps) is not None
            ]
            parts.append(f"{verb} {rate:.0f} tok/s" + (f" ({', '.join(others)})" if others else ""))
        return f"measured: {chosen} " + " and ".join(parts) if parts else None

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {data.get('format')!r}, this version reads {FORMAT_VERSION}")
        fields = {k: v for k, v in data.items() if k != "format"}
        fields["key"] = CalibrationKey(**fields["key"])
        fields["chosen"] = BenchPoint(**fields["chosen"])
        fields["table"] = tuple(
            Measurement(**{**row, "point": BenchPoint(**row["point"])}) for row in fields["table"]
        )
        return cls(**fields)


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def save(paths: Paths, calibration: Calibration) -> Path:
    """Write ``calibration`` whole: a temporary file in the same directory, renamed over the old one."""
    directory = ensure_dir(paths.calibrations)
    target = directory / calibration.key.file_name()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(calibration.to_dict(), handle, indent=2)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def load(paths: Paths, key: CalibrationKey) -> Calibration | None:
    """The calibration made for ``key``; None when there is none. One made for the same model file with
    another build, on another machine, or before the file changed is ignored with a note (logged)."""
    if not paths.calibrations.is_dir():
        return None
    foreign: list[tuple[str, str]] = []
    for file in sorted(paths.calibrations.glob("*.json")):
        try:
            found = Calibration.from_dict(json.loads(file.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            if file.name.startswith(Path(key.model_path).stem):
                foreign.append((file.name, f"it is unreadable ({exc})"))
            continue
        if found.key.model_path != key.model_path:
            continue
        why = found.key.mismatch(key)
        if why is None:
            return found
        foreign.append((found.created, why))
    if foreign:
        _, why = max(foreign)
        log.info(
            "note: ignoring the speed calibration of %s: %s; `velollm-patch tune %s --measure` measures this one",
            Path(key.model_path).name, why, key.model_path,
        )
    return None


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def preflight(build: InstalledBuild, model: ModelInfo, hw: HardwareInfo) -> Path:
    """The build's llama-bench, once the build has one and the model fits here; a plain error otherwise, before
    anything runs."""
    binary = build.bin("llama-bench")
    check_fits(model, hw)
    return binary


def check_fits(model: ModelInfo, hw: HardwareInfo) -> None:
    """A model whose weights do not fit in the RAM available cannot be measured (nor served) here; say which
    quantization of it would."""
    kv = model.kv_bytes(PROMPT_TOKENS + GEN_TOKENS, 1)
    room = hw.memory.available_bytes - HOST_MARGIN_BYTES - kv
    if model.file_size <= room:
        return
    fitting = [(name, model.n_params * bits / 8) for name, bits in _QUANT_BITS if model.n_params * bits / 8 <= room]
    would = f"a {fitting[0][0]} quantization (about {_size(fitting[0][1])}) would" if fitting else (
        "no quantization of it would: use a smaller model"
    )
    raise VelollmError(
        f"{model.name} needs {_size(model.file_size)} of weights, but this machine has {_size(max(0, room))} "
        f"of RAM to spare; {would}"
    )


def _size(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def thread_candidates(hw: HardwareInfo) -> list[int]:
    """Decode is memory-bound and may peak below the core count; prompts are compute-bound and may gain from
    SMT. A handful of counts, the planner's guess (one per physical core) first."""
    physical = max(1, hw.cpu.physical_cores)
    logical = max(physical, hw.cpu.logical_cores)
    found = [physical]
    for n in (physical // 2, logical, 1 if physical <= 4 else physical // 4):
        if n >= 1 and n not in found:
            found.append(n)
    return found


class _Bench:
    """Runs llama-bench for one model and counts the settings it has measured, for the progress display."""

    def __init__(self, binary: Path, model: Path, progress: ProgressCallback | None, total: int) -> None:
        self.binary = binary
        self.model = model
        self.progress = progress
        self.total = total
        self.done = 0

    def measure(self, knob: Knob, value: str, point: BenchPoint, batch_threads: int, *, prompt: bool = True,
                decode: bool = True) -> Measurement:
        """``point``'s prompt and decode rates, prompts with ``batch_threads`` (as the server runs them)."""
        what = "the chosen settings" if knob == "final" else f"{knob} {value}"
        if self.progress:
            self.progress(f"measuring {what}", self.done, self.total)
        if prompt and decode and point.threads == batch_threads:
            rates = self._run(what, point, prompt=True, decode=True)
        else:
            rates = {}
            if prompt:
                rates.update(self._run(what, replace(point, threads=batch_threads), prompt=True, decode=False))
            if decode:
                rates.update(self._run(what, point, prompt=False, decode=True))
        self.done += 1
        pp, tg = rates.get("prompt"), rates.get("decode")
        return Measurement(
            knob, value, point, pp[0] if pp else None, tg[0] if tg else None, pp[1] if pp else 0.0,
            tg[1] if tg else 0.0,
        )

    def _run(self, what: str, point: BenchPoint, *, prompt: bool, decode: bool) -> dict[str, tuple[float, float]]:
        """``prompt`` and/or ``decode``: (mean, standard deviation) tokens/s over the repetitions."""
        argv = [
            str(self.binary), "-m", str(self.model), *point.args(),
            "-p", str(PROMPT_TOKENS if prompt else 0), "-n", str(GEN_TOKENS if decode else 0),
            "-r", str(REPEATS), "-o", "jsonl",
        ]
        result = proc.run(argv, check=False, timeout=BENCH_TIMEOUT_S, what="llama-bench")
        rows = _parse_rows(result.output)
        if result.returncode != 0 or not rows:
            last = result.tail(1).strip() or "no output"
            raise VelollmError(f"llama-bench failed measuring {what} (exit {result.returncode}): {last}")
        rates = {}
        for row in rows:
            test = "prompt" if row.get("n_prompt") and not row.get("n_gen") else "decode" if row.get("n_gen") else None
            if test:
                rates[test] = (float(row["avg_ts"]), float(row.get("stddev_ts") or 0.0))
        return rates


def _parse_rows(output: str) -> list[dict[str, Any]]:
    """llama-bench's JSON lines (``-o jsonl``, one line a test); proc.run merges its log lines from stderr."""
    rows = []
    for line in output.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict) and "avg_ts" in row:
                    rows.append(row)
    return rows


Metric = Literal["decode", "prompt", "both"]


def _wins(candidate: Measurement, best: Measurement, metric: Metric) -> bool:
    """Whether ``candidate`` clearly beats ``best`` at ``metric``: faster by more than :data:`TIE_FRACTION` and
    by more than the two spreads together; with ``both``, clearly at one of the two rates and no slower (beyond
    the tie) at the other."""
    def gain(a: float | None, a_sd: float, b: float | None, b_sd: float) -> float:
        """The gain, 0 when the difference is within the spreads (or a rate is missing)."""
        if not a or not b or abs(a - b) <= a_sd + b_sd:
            return 0.0
        return a / b - 1

    pp = gain(candidate.prompt_tps, candidate.prompt_sd, best.prompt_tps, best.prompt_sd)
    tg = gain(candidate.decode_tps, candidate.decode_sd, best.decode_tps, best.decode_sd)
    if metric == "prompt":
        return pp > TIE_FRACTION
    if metric == "decode":
        return tg > TIE_FRACTION
    return max(pp, tg) > TIE_FRACTION and min(pp, tg) > -TIE_FRACTION


def _choose(rows: Sequence[Measurement], metric: Metric) -> Measurement:
    """The first row (the current choice) unless another clearly beats it."""
    best = rows[0]
    for row in rows[1:]:
        if _wins(row, best, metric):
            best = row
    return best


def measure(
    build: InstalledBuild, model: ModelInfo, hw: HardwareInfo, progress: ProgressCallback | None = None,
) -> Calibration:
    """Measure the speed knobs of ``build`` serving ``model`` here (see the module's docstring). Nothing is
    written: :func:`save` keeps the result."""
    binary = preflight(build, model, hw)
    key = CalibrationKey.create(build, model.path, hw)
    load = probe_host_load()  # the tuner's own measure of other programs' load (tune.py: busy cores)
    if load.busy_cpus > BUSY_LOAD * hw.cpu.logical_cores:
        # Spinning threads of two programs slow each other several times over: the figures would be the busy
        # machine's, and the threads chosen fewer than a quiet machine wants.
        log.warning("note: the machine is busy (%s); the calibration measures it as it is", load.describe())
    threads = thread_candidates(hw)
    quantized_kv = model.head_dims_allow_quantized_kv()
    total = len(threads) + len(POLL_CANDIDATES) + len(UBATCH_CANDIDATES) + 2 + (2 if quantized_kv else 0) + 2 + 1
    bench = _Bench(binary, model.path, progress, total)
    started = time.monotonic()
    table: list[Measurement] = []

    def stage(knob: Knob, options: Sequence[tuple[str, BenchPoint]], batch_threads: int, metric: Metric,
              ) -> Measurement:
        rows = [bench.measure(knob, value, point, batch_threads, decode=metric != "prompt") for value, point in options]
        table.extend(rows)
        return _choose(rows, metric)

    # Threads: each count for decoding and prompts alike; the two are chosen apart (the server's -t and -tb).
    rows = [bench.measure("threads", f"-t {n}", BenchPoint(threads=n), n) for n in threads]
    table.extend(rows)
    point = _choose(rows, "decode").point
    batch_threads = _choose(rows, "prompt").point.threads
    point = stage("poll", [(f"--poll {p}", replace(point, poll=p)) for p in POLL_CANDIDATES], batch_threads,
                  "both").point
    # The ubatch splits prompts only: decoding never fills one.
    point = stage("ubatch", [(f"-ub {u}", replace(point, ubatch=u)) for u in UBATCH_CANDIDATES], batch_threads,
                  "prompt").point
    point = stage("flash_attn", [("-fa on", replace(point, flash_attn=True)),
                                 ("-fa off", replace(point, flash_attn=False))], batch_threads, "both").point
    if quantized_kv and point.flash_attn:  # a quantized V cache needs flash attention
        point = stage("kv_types", [("f16/f16", replace(point, type_k="f16", type_v="f16")),
                                   ("q8_0/q8_0", replace(point, type_k="q8_0", type_v="q8_0"))],
                      batch_threads, "both").point
    else:
        bench.total -= 2
    point = stage("repack", [("on", replace(point, repack=True)), ("off", replace(point, repack=False))],
                  batch_threads, "both").point
    # The chosen settings once more, as the server will run them: the plan's prediction.
    final = bench.measure("final", "chosen", point, batch_threads)
    table.append(final)
    prompt_tps, decode_tps = final.prompt_tps, final.decode_tps
    if progress:
        progress("measured", bench.total, bench.total)
    if decode_tps is None or prompt_tps is None:
        raise VelollmError("llama-bench reported no prompt or no decode rate for the chosen settings")
    return Calibration(
        key=key, created=datetime.now(UTC).isoformat(timespec="seconds"),
        duration_s=round(time.monotonic() - started, 1), chosen=point, threads_batch=batch_threads,
        decode_tps=round(decode_tps, 1), prompt_tps=round(prompt_tps, 1), prompt_tokens=PROMPT_TOKENS,
        gen_tokens=GEN_TOKENS, repeats=REPEATS, table=tuple(table),
    )


def check_against_bench(calibration: Calibration, scenarios: Sequence[ScenarioResult]) -> str | None:
    """How close a bench run of the calibrated plan came to the prediction: decoding at the single request with the
    shortest prompt, prompts at the single request whose prompt is nearest the calibration's; None when the run
    has no single request."""
    single = [
        (scenario.name, point) for scenario in scenarios for point in scenario.points
        if point.samples and (scenario.name != "concurrency" or point.param == 1)
    ]
    if not single:
        return None

    def prompt_tokens(entry: tuple[str, Any]) -> float:
        stats = entry[1].stats("prompt_tokens")
        return float(stats.median) if stats else math.inf

    parts = []
    name, point = min(single, key=prompt_tokens)
    decode = point.headline().get("decode_tps")
    if decode:
        parts.append(f"decode {calibration.decode_tps:.0f} tok/s predicted, {decode:.0f} in {name} "
                     f"(x{decode / calibration.decode_tps:.2f})")
    name, point = min(single, key=lambda entry: abs(prompt_tokens(entry) - calibration.prompt_tokens))
    prompt = point.headline().get("prompt_tps")
    if prompt:
        ratio = prompt / calibration.prompt_tps
        parts.append(f"prompts {calibration.prompt_tps:.0f} tok/s predicted at {calibration.prompt_tokens} tokens, "
                     f"{prompt:.0f} in {name} at {prompt_tokens((name, point)):.0f} (x{ratio:.2f})")
    return "; ".join(parts) or None
