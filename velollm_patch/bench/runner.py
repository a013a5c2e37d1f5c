"""Run the scenarios against a target, and A/B two targets in alternating rounds.

Faults are contained where they happen: a request that fails (the server crashed, answered an
error, timed out) fails its scenario, keeps the points measured before it, and a crashed server
the bench started is restarted for the next scenario. Ctrl-C ends the run with what was measured
so far marked ``interrupted``, so the caller can still save it.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from velollm_patch.bench.load import QUIET, Condition
from velollm_patch.bench.metrics import (
    KV_COMMITTED_METRIC,
    MemorySampler,
    PointResult,
    RatioStats,
    RequestSample,
    ScenarioResult,
    metric_total,
    ratio_table,
)
from velollm_patch.bench.scenarios import SCENARIO_NAMES, Prompt, Scenario, load_scenarios
from velollm_patch.bench.targets import Target, TargetInfo, TargetSpec, open_target, slug
from velollm_patch.errors import VelollmError
from velollm_patch.paths import Paths

_T = TypeVar("_T")

RUN_SCHEMA = "velollm-bench-run/1"
AB_SCHEMA = "velollm-bench-ab/1"

# Warm-up requests use the scenario's own prompt, so the prompt-sized compute buffers are allocated
# and the weights paged in, but stop after a few tokens: decoding is warm after the first ones.
WARMUP_TOKENS = 8
# Room left below the context size for the generated tokens and the chat template's tokenization
# drift, so the largest context-fill request is not rejected for a few tokens too many.
CONTEXT_MARGIN_TOKENS = 64
CALIBRATION_CHARS = 4000


@dataclass(frozen=True)
class BenchConfig:
    """How much to run. None means the scenario's own default from its prompt set."""

    scenarios: tuple[str, ...] = SCENARIO_NAMES
    repeats: int | None = None
    warmup: int = 1
    n_predict: int | None = None
    concurrency: tuple[int, ...] | None = None
    max_context: int | None = None
    seed: int = 42
    request_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.repeats is not None and self.repeats < 1:
            raise VelollmError("--repeats must be at least 1")
        if self.warmup < 0:
            raise VelollmError("--warmup cannot be negative")
        if self.n_predict is not None and self.n_predict < 1:
            raise VelollmError("--n-predict must be at least 1")
        if self.concurrency is not None and (not self.concurrency or min(self.concurrency) < 1):
            raise VelollmError("--concurrency takes client counts of at least 1, e.g. 1,2,4,8")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scenarios"] = list(self.scenarios)
        data["concurrency"] = list(self.concurrency) if self.concurrency is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchConfig:
        values = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        values["scenarios"] = tuple(data.get("scenarios") or SCENARIO_NAMES)
        if data.get("concurrency") is not None:
            values["concurrency"] = tuple(data["concurrency"])
        return cls(**values)


class Progress:
    """What the runner reports while it works; the CLI draws it with rich, tests record it."""

    def scenario_started(self, target: str, scenario: Scenario, total: int | None) -> None:
        """``total`` requests, warm-up included; None until known (context fill calibrates first)."""

    def set_total(self, total: int) -> None:
        """The current scenario's request count, once known."""

    def request_done(self, sample: RequestSample | None) -> None:
        """One request finished; None for a warm-up request, which is not measured."""

    def scenario_finished(self, result: ScenarioResult) -> None:
        """The scenario ended, whatever its status."""

    def note(self, text: str) -> None:
        """Something worth telling the user (a restart, the start of an A/B round)."""


@dataclass
class RunResult:
    """``status``: complete, partial (some scenario failed) or interrupted (Ctrl-C)."""

    id: str
    created: str
    target: TargetInfo
    hardware: Mapping[str, Any]
    config: BenchConfig
    scenarios: list[ScenarioResult] = field(default_factory=list)
    status: str = "complete"
    duration_s: float = 0.0
    events: list[str] = field(default_factory=list)
    condition: Condition = QUIET
    """What else the machine was running (``--condition busy``: a load the bench started)."""

    def headline(self) -> dict[str, float]:
        """Every measured point's headline numbers, keyed ``scenario[@label].metric``."""
        out: dict[str, float] = {}
        for scenario in self.scenarios:
            out.update(scenario.headline())
        return out

    def scenario(self, name: str) -> ScenarioResult | None:
        return next((s for s in self.scenarios if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": RUN_SCHEMA, "kind": "run", "id": self.id, "created": self.created, "status": self.status,
            "duration_s": self.duration_s, "target": self.target.to_dict(), "hardware": dict(self.hardware),
            "config": self.config.to_dict(), "events": list(self.events), "condition": self.condition.to_dict(),
            "scenarios": [s.to_dict() for s in self.scenarios],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunResult:
        return cls(
            id=str(data["id"]), created=str(data["created"]), target=TargetInfo.from_dict(data["target"]),
            hardware=dict(data.get("hardware") or {}), config=BenchConfig.from_dict(data.get("config") or {}),
            scenarios=[ScenarioResult.from_dict(s) for s in data.get("scenarios") or ()],
            status=str(data.get("status") or "complete"), duration_s=float(data.get("duration_s") or 0),
            events=[str(e) for e in data.get("events") or ()], condition=Condition.from_dict(data.get("condition")),
        )


def new_id(*labels: str) -> str:
    name = "-vs-".join(slug(label) for label in labels)
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class _Session:
    """The state one run's scenarios share: the target, the memory sampler and the nonce counter."""

    def __init__(self, target: Target, config: BenchConfig, sampler: MemorySampler, progress: Progress) -> None:
        self.target = target
        self.config = config
        self.sampler = sampler
        self.progress = progress
        self._nonce = itertools.count(1)
        self._lock = threading.Lock()

    def request(self, prompt: Prompt, n_predict: int, *, measured: bool = True, client: int = 0) -> RequestSample:
        with self._lock:
            nonce = next(self._nonce)
        sample = self.target.generate(prompt, n_predict, seed=self.config.seed, nonce=nonce)
        if client:
            sample = replace(sample, client=client)
        self.progress.request_done(sample if measured else None)
        return sample

    def start_point(self) -> float:
        self.sampler.reset()
        return time.perf_counter()

    def finish_point(
        self, label: str, param: int | None, samples: Sequence[RequestSample], started: float
    ) -> PointResult:
        wall = time.perf_counter() - started
        rss, vram = self.sampler.peaks()
        kv = metric_total(self.target.server_metrics(), KV_COMMITTED_METRIC)
        return PointResult(
            label=label, param=param, samples=tuple(samples), wall_s=wall, peak_rss_bytes=rss,
            peak_vram_bytes=vram, kv_committed_bytes=int(kv) if kv is not None else None,
        )

    def n_predict(self, scenario: Scenario) -> int:
        return self.config.n_predict or scenario.n_predict

    def repeats(self, scenario: Scenario) -> int:
        return self.config.repeats or scenario.repeats

    def warm_up(self, prompts: Sequence[Prompt], n_predict: int) -> None:
        for i in range(self.config.warmup):
            self.request(prompts[i % len(prompts)], min(n_predict, WARMUP_TOKENS), measured=False)


def _run_single(session: _Session, scenario: Scenario, result: ScenarioResult) -> None:
    n_predict, repeats = session.n_predict(scenario), session.repeats(scenario)
    session.progress.set_total(session.config.warmup + repeats)
    session.warm_up(scenario.prompts, n_predict)
    started = session.start_point()
    samples = [session.request(scenario.prompts[i % len(scenario.prompts)], n_predict) for i in range(repeats)]
    result.points.append(session.finish_point("", None, samples, started))


def _run_concurrency(session: _Session, scenario: Scenario, result: ScenarioResult) -> None:
    n_predict, repeats = session.n_predict(scenario), session.repeats(scenario)
    levels = session.config.concurrency or scenario.clients
    session.progress.set_total(session.config.warmup + sum(c * repeats for c in levels))
    session.warm_up(scenario.prompts, n_predict)
    for clients in levels:
        started = session.start_point()
        samples = _concurrent_requests(session, scenario.prompts, n_predict, clients, repeats)
        result.points.append(session.finish_point(str(clients), clients, samples, started))


def _concurrent_requests(
    session: _Session, prompts: Sequence[Prompt], n_predict: int, clients: int, per_client: int
) -> list[RequestSample]:
    """``clients`` threads, each sending ``per_client`` requests back to back.

    Daemon threads joined with a timeout keep Ctrl-C responsive: the main thread gets the
    interrupt, tells the clients to stop, and the in-flight requests die with the server.
    """
    samples: list[RequestSample] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(index: int) -> None:
        try:
            for k in range(per_client):
                if stop.is_set():
                    return
                sample = session.request(prompts[(index + k) % len(prompts)], n_predict, client=index + 1)
                with lock:
                    samples.append(sample)
        except Exception as exc:  # handed to the main thread, which raises it as the scenario's failure
            with lock:
                errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=client, args=(i,), name=f"bench-client-{i + 1}", daemon=True)
               for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.2)
    except KeyboardInterrupt:
        stop.set()
        raise
    if errors:
        raise errors[0]
    return samples


def _run_context_fill(session: _Session, scenario: Scenario, result: ScenarioResult) -> None:
    n_predict, repeats = session.n_predict(scenario), session.repeats(scenario)
    # Tokens per character of this model's tokenizer and chat template, measured rather than assumed:
    # the instruction alone gives the fixed overhead, a short sample a first estimate. These requests
    # double as the warm-up (and load the model on Ollama, which then reports its context size).
    overhead = session.request(scenario.fill_prompt(0), 1, measured=False).prompt_tokens

    def measure(chars: int) -> float:
        tokens = session.request(scenario.fill_prompt(chars), 1, measured=False).prompt_tokens
        if tokens <= overhead:
            raise VelollmError("the server reported no prompt tokens, so context sizes cannot be set")
        return (tokens - overhead) / chars

    tokens_per_char = measure(CALIBRATION_CHARS)
    limits = [n for n in (session.target.context_size(), session.config.max_context) if n]
    if not limits:
        result.status = "skipped"
        result.error = "the server does not report its context size; pass --max-context TOKENS"
        return
    top = min(limits) - n_predict - CONTEXT_MARGIN_TOKENS
    if top <= overhead + CALIBRATION_CHARS * tokens_per_char:
        raise VelollmError(f"a context of {min(limits)} tokens leaves too little room to fill")
    # Then one whole round of the filler, or as much of it as fits, since prose and code differ in
    # density: the largest level, which must not overshoot the context, is sized from this estimate.
    calibrated = min(len(scenario.filler), int((top - overhead) / tokens_per_char * 0.9))
    if calibrated > CALIBRATION_CHARS:
        tokens_per_char = measure(calibrated)
    levels = sorted({level for level in scenario.levels if level < top} | {top})
    session.progress.set_total(3 + len(levels) * repeats)
    for level in levels:
        # 2% short of the estimate: tokenization is not exactly linear in characters.
        chars = max(0, int((level - overhead) / tokens_per_char * 0.98))
        prompt = scenario.fill_prompt(chars)
        started = session.start_point()
        samples = [session.request(prompt, n_predict) for _ in range(repeats)]
        result.points.append(session.finish_point(str(level), level, samples, started))
        if chars > calibrated and samples[0].prompt_tokens > overhead:
            # A longer stretch than any before: the better estimate for the levels still to come.
            tokens_per_char, calibrated = (samples[0].prompt_tokens - overhead) / chars, chars


_RUNNERS: dict[str, Callable[[_Session, Scenario, ScenarioResult], None]] = {
    "single": _run_single,
    "concurrency": _run_concurrency,
    "context_fill": _run_context_fill,
}


def run_bench(
    target: Target,
    config: BenchConfig,
    *,
    hardware: Mapping[str, Any],
    progress: Progress | None = None,
    run_id: str | None = None,
    condition: Condition = QUIET,
) -> RunResult:
    """Start the target, run the configured scenarios, stop it.

    A target that cannot start raises VelollmError (with the server's log tail); anything after
    that ends up in the result. Ctrl-C returns the result so far with status ``interrupted``.
    """
    progress = progress or Progress()
    scenarios = load_scenarios(config.scenarios)
    result = RunResult(
        id=run_id or new_id(target.spec.label), created=_now(), target=target.info, hardware=hardware, config=config,
        condition=condition,
    )
    started = time.monotonic()
    sampler = MemorySampler(target.pids)
    session = _Session(target, config, sampler, progress)
    try:
        target.start()
        result.target = target.info
        sampler.start()
        for scenario in scenarios:
            _run_scenario(session, scenario, result)
    except KeyboardInterrupt:
        result.status = "interrupted"
    finally:
        sampler.stop()
        target.stop()
        result.target = target.info
        result.duration_s = time.monotonic() - started
    if result.status != "interrupted" and any(s.status == "failed" for s in result.scenarios):
        result.status = "partial"
    return result


def _run_scenario(session: _Session, scenario: Scenario, result: RunResult) -> None:
    outcome = ScenarioResult(scenario.name, scenario.title)
    result.scenarios.append(outcome)
    try:
        event = session.target.ensure_running()
    except VelollmError as exc:
        outcome.status, outcome.error = "failed", f"not run: the server could not be restarted: {exc}"
        session.progress.scenario_finished(outcome)
        return
    if event:
        result.events.append(event)
        session.progress.note(event)
    session.progress.scenario_started(session.target.spec.label, scenario, None)
    started = time.monotonic()
    try:
        _RUNNERS[scenario.kind](session, scenario, outcome)
    except VelollmError as exc:
        outcome.status, outcome.error = "failed", str(exc)
    except KeyboardInterrupt:
        outcome.status = "interrupted"
        raise
    finally:
        outcome.duration_s = time.monotonic() - started
        session.progress.scenario_finished(outcome)


@dataclass
class ABRound:
    order: str  # "AB" or "BA"
    a: RunResult | None = None
    b: RunResult | None = None

    @property
    def complete(self) -> bool:
        return self.a is not None and self.b is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "order": self.order,
            "a": self.a.to_dict() if self.a else None,
            "b": self.b.to_dict() if self.b else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ABRound:
        return cls(
            order=str(data.get("order") or "AB"),
            a=RunResult.from_dict(data["a"]) if data.get("a") else None,
            b=RunResult.from_dict(data["b"]) if data.get("b") else None,
        )


@dataclass
class ABResult:
    """``status``: complete, partial (a run had failed scenarios), interrupted, or failed (a target
    could not start; ``error`` says which and why, and the rounds before it are kept)."""

    id: str
    created: str
    a: TargetInfo
    b: TargetInfo
    hardware: Mapping[str, Any]
    config: BenchConfig
    rounds_planned: int
    rounds: list[ABRound] = field(default_factory=list)
    status: str = "complete"
    error: str | None = None
    duration_s: float = 0.0
    condition: Condition = QUIET

    def ratios(self) -> list[RatioStats]:
        pairs = [(r.a.headline(), r.b.headline()) for r in self.rounds if r.a is not None and r.b is not None]
        return ratio_table(pairs)

    def runs(self, side: str) -> list[RunResult]:
        return [run for r in self.rounds if (run := (r.a if side == "a" else r.b)) is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": AB_SCHEMA, "kind": "ab", "id": self.id, "created": self.created, "status": self.status,
            "error": self.error, "duration_s": self.duration_s, "rounds_planned": self.rounds_planned,
            "a": self.a.to_dict(), "b": self.b.to_dict(), "hardware": dict(self.hardware),
            "config": self.config.to_dict(), "condition": self.condition.to_dict(),
            # derived, for readers of the JSON; from_dict recomputes them from the rounds
            "ratios": [
                {"key": r.key, "a_median": r.a_median, "b_median": r.b_median, "ratios": list(r.ratios),
                 "ratio": r.stats.to_dict()}
                for r in self.ratios()
            ],
            "rounds": [r.to_dict() for r in self.rounds],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ABResult:
        return cls(
            id=str(data["id"]), created=str(data["created"]), a=TargetInfo.from_dict(data["a"]),
            b=TargetInfo.from_dict(data["b"]), hardware=dict(data.get("hardware") or {}),
            config=BenchConfig.from_dict(data.get("config") or {}),
            rounds_planned=int(data.get("rounds_planned") or 0),
            rounds=[ABRound.from_dict(r) for r in data.get("rounds") or ()],
            status=str(data.get("status") or "complete"), error=data.get("error"),
            duration_s=float(data.get("duration_s") or 0), condition=Condition.from_dict(data.get("condition")),
        )


def round_order(variants: Sequence[_T], number: int) -> list[_T]:
    """The order to run ``variants`` in, in round ``number`` (from 0): as given, then reversed (AB BA, ABC CBA).
    With one fixed order a steady drift (a warming CPU, a background job winding down) always favours the same
    variant; alternating makes its effect change sign from round to round and cancel in the median."""
    return list(variants) if number % 2 == 0 else list(reversed(variants))


def run_ab(
    spec_a: TargetSpec,
    spec_b: TargetSpec,
    config: BenchConfig,
    rounds: int,
    *,
    paths: Paths,
    hardware: Mapping[str, Any],
    progress: Progress | None = None,
    condition: Condition = QUIET,
) -> ABResult:
    """``rounds`` rounds of A and B, one at a time, each run on a freshly started server.

    A fresh server per run, rather than both kept warm: memory is part of the measurement and only
    ever grows within a process (peak RSS, lazily committed KV), so a run must not inherit the
    previous round's high-water mark; and never two servers at once, which on a small machine
    would compete for the same cores. The order alternates, AB then BA (:func:`round_order`).
    """
    if rounds < 1:
        raise VelollmError("--rounds must be at least 1")
    progress = progress or Progress()
    started = time.monotonic()
    ab = ABResult(
        id=new_id(spec_a.label, spec_b.label), created=_now(), a=TargetInfo(spec_a.kind, spec_a.ref, spec_a.label),
        b=TargetInfo(spec_b.kind, spec_b.ref, spec_b.label), hardware=hardware, config=config, rounds_planned=rounds,
        condition=condition,
    )
    try:
        for number in range(rounds):
            current = ABRound(order="".join(round_order("AB", number)))
            ab.rounds.append(current)
            for side in current.order.lower():
                spec = spec_a if side == "a" else spec_b
                progress.note(f"round {number + 1}/{rounds}: {side.upper()} = {spec.label}")
                try:
                    run = run_bench(open_target(spec, paths, request_timeout=config.request_timeout), config,
                                    hardware=hardware, progress=progress, run_id=f"{ab.id}-r{number + 1}{side}",
                                    condition=condition)
                except VelollmError as exc:
                    ab.status, ab.error = "failed", f"{side.upper()} ({spec.label}) in round {number + 1}: {exc}"
                    return ab
                if side == "a":
                    current.a, ab.a = run, run.target
                else:
                    current.b, ab.b = run, run.target
                if run.status == "interrupted":
                    ab.status = "interrupted"
                    return ab
        if any(run.status != "complete" for r in ab.rounds for run in (r.a, r.b) if run is not None):
            ab.status = "partial"
        return ab
    finally:
        ab.duration_s = time.monotonic() - started


def compare(old: RunResult, new: RunResult) -> list[RatioStats]:
    """new/old per headline key: an A/B of one round between two saved runs."""
    return ratio_table([(old.headline(), new.headline())])


def load_result(path: Path) -> RunResult | ABResult:
    """A result file written by `bench run` or `bench ab`."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise VelollmError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise VelollmError(f"{path} is not JSON: {exc}") from exc
    schema = data.get("schema") if isinstance(data, dict) else None
    try:
        if schema == RUN_SCHEMA:
            return RunResult.from_dict(data)
        if schema == AB_SCHEMA:
            return ABResult.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise VelollmError(f"{path} is a damaged bench result ({type(exc).__name__}: {exc})") from exc
    raise VelollmError(f"{path} is not a velollm-patch bench result (schema {schema!r})")


def save_result(result: RunResult | ABResult, path: Path) -> Path:
    """Write the JSON next to its final name and rename it, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
