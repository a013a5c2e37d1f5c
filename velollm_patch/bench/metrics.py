"""What one request measured, statistics over many, and the memory readings taken while they ran.

A scenario is a list of *points* (one per concurrency level or context size, or a single one);
each point keeps its raw per-request samples so that every summary (min/median/max, p50/p95,
A/B ratios) is recomputed from the same data when a result file is read back.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

log = logging.getLogger("velollm_patch.bench")

# The KV-on-demand patch exports how much of the KV cache is physically committed; upstream
# llama-server has no KV metric at all, so absence is normal and reads as null.
KV_COMMITTED_METRIC = "llamacpp:kv_committed_bytes"


@dataclass(frozen=True)
class Stats:
    n: int
    min: float
    median: float
    p95: float
    max: float
    mean: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), so p50 of 2 values is their mean."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Iterable[float | None]) -> Stats | None:
    """Stats over the values that were measured; None when none were."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None
    return Stats(
        n=len(kept), min=min(kept), median=percentile(kept, 50), p95=percentile(kept, 95), max=max(kept),
        mean=sum(kept) / len(kept),
    )


@dataclass(frozen=True)
class RequestSample:
    """One measured request.

    ``timing_source`` says where the token rates come from: ``server`` (llama-server ``timings`` or
    Ollama's metrics, which exclude network and queueing) or ``client`` (stream chunk arrival times,
    for OpenAI-compatible servers that report nothing).
    """

    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float | None
    decode_tps: float | None
    prompt_tps: float | None
    timing_source: str
    draft_tokens: int | None = None
    draft_accepted: int | None = None
    client: int = 0

    @property
    def spec_acceptance(self) -> float | None:
        if not self.draft_tokens or self.draft_accepted is None:
            return None
        return self.draft_accepted / self.draft_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestSample:
        values: dict[str, Any] = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        return cls(**values)


@dataclass(frozen=True)
class MetricInfo:
    title: str
    unit: str
    higher_is_better: bool


# Every headline number a point can have, in report order. Keys of `PointResult.headline`.
METRICS: dict[str, MetricInfo] = {
    "decode_tps": MetricInfo("decode", "tok/s", True),
    "prompt_tps": MetricInfo("prompt", "tok/s", True),
    "aggregate_tps": MetricInfo("aggregate", "tok/s", True),
    "ttft_s": MetricInfo("TTFT p50", "s", False),
    "latency_p50_s": MetricInfo("latency p50", "s", False),
    "latency_p95_s": MetricInfo("latency p95", "s", False),
    "peak_rss_bytes": MetricInfo("peak RSS", "bytes", False),
    "peak_vram_bytes": MetricInfo("peak VRAM", "bytes", False),
    "kv_committed_bytes": MetricInfo("KV committed", "bytes", False),
    "spec_acceptance": MetricInfo("draft acceptance", "", True),
}


@dataclass(frozen=True)
class PointResult:
    """The requests of one configuration (a concurrency level, a context size, or the scenario itself)."""

    label: str
    param: int | None
    samples: tuple[RequestSample, ...]
    wall_s: float
    peak_rss_bytes: int | None = None
    peak_vram_bytes: int | None = None
    kv_committed_bytes: int | None = None

    def stats(self, name: str) -> Stats | None:
        return summarize(getattr(s, name) for s in self.samples)

    @property
    def aggregate_tps(self) -> float | None:
        """Generated tokens of all clients over the wall time of the point: throughput under load."""
        if self.wall_s <= 0 or not self.samples:
            return None
        return sum(s.completion_tokens for s in self.samples) / self.wall_s

    @property
    def spec_acceptance(self) -> float | None:
        drafted = sum(s.draft_tokens or 0 for s in self.samples)
        accepted = sum(s.draft_accepted or 0 for s in self.samples)
        return accepted / drafted if drafted else None

    def headline(self) -> dict[str, float]:
        """One number per metric (medians for rates, p50/p95 for latency), leaving out what was not measured."""
        latency = self.stats("latency_s")
        values: dict[str, float | None] = {
            "decode_tps": _median(self.stats("decode_tps")),
            "prompt_tps": _median(self.stats("prompt_tps")),
            "aggregate_tps": self.aggregate_tps,
            "ttft_s": _median(self.stats("ttft_s")),
            "latency_p50_s": latency.median if latency else None,
            "latency_p95_s": latency.p95 if latency else None,
            "peak_rss_bytes": _float(self.peak_rss_bytes),
            "peak_vram_bytes": _float(self.peak_vram_bytes),
            "kv_committed_bytes": _float(self.kv_committed_bytes),
            "spec_acceptance": self.spec_acceptance,
        }
        return {k: v for k, v in values.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "param": self.param,
            "wall_s": self.wall_s,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_vram_bytes": self.peak_vram_bytes,
            "kv_committed_bytes": self.kv_committed_bytes,
            # derived, for readers of the JSON; from_dict recomputes it from the samples
            "summary": {
                "headline": self.headline(),
                **{name: s.to_dict() for name in _SAMPLE_STATS if (s := self.stats(name)) is not None},
            },
            "samples": [s.to_dict() for s in self.samples],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PointResult:
        return cls(
            label=str(data.get("label") or ""),
            param=data.get("param"),
            samples=tuple(RequestSample.from_dict(s) for s in data.get("samples") or ()),
            wall_s=float(data.get("wall_s") or 0),
            peak_rss_bytes=data.get("peak_rss_bytes"),
            peak_vram_bytes=data.get("peak_vram_bytes"),
            kv_committed_bytes=data.get("kv_committed_bytes"),
        )


_SAMPLE_STATS = ("decode_tps", "prompt_tps", "ttft_s", "latency_s", "prompt_tokens", "completion_tokens")


def _median(stats: Stats | None) -> float | None:
    return stats.median if stats else None


def _float(value: int | None) -> float | None:
    return float(value) if value is not None else None


@dataclass
class ScenarioResult:
    """``status``: ok, failed (error says why; points finished before the failure are kept),
    skipped (the target cannot run it), or interrupted (Ctrl-C)."""

    name: str
    title: str
    status: str = "ok"
    error: str | None = None
    points: list[PointResult] = field(default_factory=list)
    duration_s: float = 0.0

    def headline(self) -> dict[str, float]:
        """``scenario[@label].metric`` → value, the keys that A/B ratios and `compare` line up."""
        out: dict[str, float] = {}
        for point in self.points:
            prefix = f"{self.name}@{point.label}" if point.label else self.name
            for metric, value in point.headline().items():
                out[f"{prefix}.{metric}"] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "title": self.title, "status": self.status, "error": self.error,
            "duration_s": self.duration_s, "points": [p.to_dict() for p in self.points],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScenarioResult:
        return cls(
            name=str(data["name"]), title=str(data.get("title") or data["name"]),
            status=str(data.get("status") or "ok"), error=data.get("error"),
            points=[PointResult.from_dict(p) for p in data.get("points") or ()],
            duration_s=float(data.get("duration_s") or 0),
        )


def split_key(key: str) -> tuple[str, str]:
    """``short.decode_tps`` → (``short``, ``decode_tps``); labels may contain dots, metrics do not."""
    point, _, metric = key.rpartition(".")
    return point, metric


@dataclass(frozen=True)
class RatioStats:
    """B/A for one headline key over the A/B rounds: the per-round ratios and their spread."""

    key: str
    a_median: float
    b_median: float
    ratios: tuple[float, ...]

    @property
    def stats(self) -> Stats:
        result = summarize(self.ratios)
        assert result is not None  # constructed only with at least one ratio
        return result

    @property
    def metric(self) -> str:
        return split_key(self.key)[1]


def ratio_table(pairs: Sequence[tuple[Mapping[str, float], Mapping[str, float]]]) -> list[RatioStats]:
    """Per-key ratio B/A of each round's (A, B) headlines, in first-seen key order.

    Ratios are taken within a round and only then summarized, so drift between rounds (another job
    starting, thermal throttling) moves A and B together and cancels out of the ratio.
    """
    per_key: dict[str, list[tuple[float, float]]] = {}
    for a, b in pairs:
        for key, a_value in a.items():
            b_value = b.get(key)
            if b_value is not None and a_value > 0:
                per_key.setdefault(key, []).append((a_value, b_value))
    return [
        RatioStats(
            key=key,
            a_median=percentile([a for a, _ in values], 50),
            b_median=percentile([b for _, b in values], 50),
            ratios=tuple(b / a for a, b in values),
        )
        for key, values in per_key.items()
    ]


def geometric_means(ratios: Sequence[RatioStats]) -> dict[str, tuple[float, int]]:
    """Per metric, the geometric mean of its median B/A over the scenarios that measured it, with
    their count: the one number for "how much faster over the whole suite" (a ×2 and a ×0.5 cancel)."""
    logs: dict[str, list[float]] = {}
    for ratio in ratios:
        median = ratio.stats.median
        if median > 0:
            logs.setdefault(ratio.metric, []).append(math.log(median))
    return {metric: (math.exp(sum(values) / len(values)), len(values)) for metric, values in logs.items()}


def metric_total(metrics: Mapping[str, float], name: str) -> float | None:
    """Sum of a metric over all its label sets (e.g. one series per device); None if absent."""
    found = [v for k, v in metrics.items() if k == name or k.startswith(name + "{")]
    return sum(found) if found else None


class _Nvml:
    """Per-process GPU memory through NVML; every failure (no driver, no GPU, a container that hides
    host pids) reads as "not measured" rather than 0, which would claim the server used no VRAM."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml: Any = pynvml
        except Exception as exc:  # the library raises NVMLError subclasses and OSError for a missing .so
            log.debug("NVML unavailable, VRAM will not be measured: %s", exc)

    def used_bytes(self, pids: set[int]) -> int | None:
        total: int | None = None
        for handle in self._handles:
            try:
                processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except Exception as exc:
                log.debug("NVML process query failed: %s", exc)
                continue
            for process in processes:
                used = getattr(process, "usedGpuMemory", None)
                if process.pid in pids and used is not None:
                    total = (total or 0) + int(used)
        return total


def process_tree(pids: Iterable[int]) -> list[psutil.Process]:
    """The processes and their descendants (Ollama runs each model in a child runner)."""
    found: list[psutil.Process] = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            found.extend([root, *root.children(recursive=True)])
        except psutil.Error:
            continue
    return found


class MemorySampler:
    """Samples RSS (whole process tree) and VRAM of the server in a daemon thread.

    Peaks are kept since the last :meth:`reset`, so each point reports its own peak. ``pids`` is a
    callable because a crashed server is restarted under a new pid.
    """

    def __init__(self, pids: Callable[[], list[int]], interval_s: float = 0.1) -> None:
        self._pids = pids
        self._interval = interval_s
        self._nvml = _Nvml()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_rss: int | None = None
        self._peak_vram: int | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="bench-memory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def reset(self) -> None:
        with self._lock:
            self._peak_rss = None
            self._peak_vram = None
        self.sample()

    def peaks(self) -> tuple[int | None, int | None]:
        """(peak RSS, peak VRAM) since the last reset, taking one more reading first."""
        self.sample()
        with self._lock:
            return self._peak_rss, self._peak_vram

    def sample(self) -> None:
        processes = process_tree(self._pids())
        rss: int | None = None
        for process in processes:
            try:
                rss = (rss or 0) + int(process.memory_info().rss)
            except psutil.Error:
                continue
        vram = self._nvml.used_bytes({p.pid for p in processes}) if processes else None
        with self._lock:
            if rss is not None:
                self._peak_rss = max(self._peak_rss or 0, rss)
            if vram is not None:
                self._peak_vram = max(self._peak_vram or 0, vram)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()
