"""The bench against the real llama-server builds with the real SmolLM2, briefly: every scenario,
an A/B of vanilla against patched, a crash mid-run, Ctrl-C, and a server that cannot start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from velollm_patch.bench.metrics import RequestSample, ScenarioResult
from velollm_patch.bench.report import write_report
from velollm_patch.bench.runner import BenchConfig, Progress, RunResult, load_result, run_ab, run_bench, save_result
from velollm_patch.bench.scenarios import SCENARIO_NAMES, Scenario
from velollm_patch.bench.targets import ManagedServerTarget, open_target, parse_target
from velollm_patch.builds import InstalledBuild
from velollm_patch.cli import main
from velollm_patch.errors import VelollmError
from velollm_patch.paths import Paths

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# Small enough for a busy 2-core machine, large enough for the long-conversation prompt (~1900 tokens).
SERVER_ARGS = ["-c", "2048"]


def _server_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.name() == "llama-server"]


class Recorder(Progress):
    """Records what the runner reports; optional hooks act at a given point of the run."""

    def __init__(self) -> None:
        self.current = ""
        self.warmups: dict[str, int] = {}
        self.servers_at_start: list[int] = []
        self.notes: list[str] = []

    def scenario_started(self, target: str, scenario: Scenario, total: int | None) -> None:
        self.current = scenario.name
        self.servers_at_start.append(len(_server_children()))

    def request_done(self, sample: RequestSample | None) -> None:
        if sample is None:
            self.warmups[self.current] = self.warmups.get(self.current, 0) + 1

    def note(self, text: str) -> None:
        self.notes.append(text)


def _managed(paths: Paths, binary: Path, model: Path, args: list[str] = SERVER_ARGS) -> ManagedServerTarget:
    target = open_target(parse_target(str(binary), model=str(model), server_args=args), paths)
    assert isinstance(target, ManagedServerTarget)
    return target


def test_every_scenario_against_the_patched_server(
    paths: Paths, patched_server: Path, smollm2_gguf: Path, tmp_path: Path
) -> None:
    config = BenchConfig(repeats=1, warmup=1, n_predict=4, concurrency=(1, 2))
    recorder = Recorder()
    result = run_bench(_managed(paths, patched_server, smollm2_gguf), config, hardware={}, progress=recorder)

    assert result.status == "complete", [(s.name, s.error) for s in result.scenarios]
    assert [s.name for s in result.scenarios] == list(SCENARIO_NAMES)
    assert result.target.api == "llama-server" and result.target.n_ctx == 2048
    assert result.target.version is not None and "velollm" in result.target.version  # the build stamp
    assert result.target.command is not None and "--metrics" in result.target.command
    # warm-up requests ran and were left out of the samples
    assert all(recorder.warmups.get(name, 0) >= 1 for name in SCENARIO_NAMES)
    expected_prompt = {"short": (80, 130), "conversation": (1700, 2100), "code_gen": (420, 650),
                       "code_edit": (1200, 1800)}
    for scenario in result.scenarios:
        assert scenario.status == "ok" and scenario.points
        for point in scenario.points:
            assert point.peak_rss_bytes is not None and point.peak_rss_bytes > 50 * 1024**2
            for sample in point.samples:
                assert sample.timing_source == "server"
                assert sample.completion_tokens == 4  # ignore_eos: every request does the same work
                assert sample.decode_tps is not None and sample.prompt_tps is not None
                assert sample.ttft_s is not None and 0 < sample.ttft_s <= sample.latency_s
        if scenario.name in expected_prompt:
            low, high = expected_prompt[scenario.name]
            (sample,) = scenario.points[0].samples
            assert low <= sample.prompt_tokens <= high, (scenario.name, sample.prompt_tokens)

    concurrency = result.scenario("concurrency")
    assert concurrency is not None and [p.param for p in concurrency.points] == [1, 2]
    assert len(concurrency.points[1].samples) == 2
    fill = result.scenario("context_fill")
    assert fill is not None and [p.param for p in fill.points] == [1024, 2048 - 4 - 64]
    for point in fill.points:
        assert point.param is not None
        tokens = point.samples[0].prompt_tokens
        assert 0.9 * point.param <= tokens <= 2048 - 4, (point.param, tokens)

    saved = load_result(save_result(result, tmp_path / "result.json"))
    assert isinstance(saved, RunResult) and saved.headline() == result.headline()
    names = {p.name for p in write_report(saved, tmp_path)}
    assert {"report.md", "tokens_per_s.png", "latency.png", "memory_vs_context.png", "concurrency.png"} <= names
    assert not _server_children()


def test_ab_vanilla_against_patched(
    paths: Paths, vanilla_build: InstalledBuild, patched_build: InstalledBuild, smollm2_gguf: Path
) -> None:
    spec_a = parse_target(vanilla_build.build_id, model=str(smollm2_gguf), server_args=SERVER_ARGS, label="vanilla")
    spec_b = parse_target(patched_build.build_id, model=str(smollm2_gguf), server_args=SERVER_ARGS, label="patched")
    recorder = Recorder()
    config = BenchConfig(scenarios=("short",), repeats=2, warmup=1, n_predict=8)
    ab = run_ab(spec_a, spec_b, config, 2, paths=paths, hardware={}, progress=recorder)

    assert ab.status == "complete", ab.error
    assert [r.order for r in ab.rounds] == ["AB", "BA"] and all(r.complete for r in ab.rounds)
    assert recorder.notes == ["round 1/2: A = vanilla", "round 1/2: B = patched",
                              "round 2/2: B = patched", "round 2/2: A = vanilla"]
    # one server at a time, each run on a freshly started one
    assert recorder.servers_at_start == [1, 1, 1, 1]
    assert ab.a.build is not None and ab.a.build["build_id"] == vanilla_build.build_id
    assert ab.b.build is not None and ab.b.build["build_id"] == patched_build.build_id
    assert ab.b.version is not None and "velollm" in ab.b.version
    assert ab.a.version is not None and "velollm" not in ab.a.version
    ratios = {r.key: r for r in ab.ratios()}
    decode = ratios["short.decode_tps"]
    assert len(decode.ratios) == 2 and decode.stats.min <= decode.stats.median <= decode.stats.max
    for run in (*ab.runs("a"), *ab.runs("b")):
        (point,) = run.scenarios[0].points
        assert len(point.samples) == 2
    assert not _server_children()


class _KillDuring(Recorder):
    """SIGKILLs the server shortly after the warm-up of ``scenario``, during its measured request."""

    def __init__(self, target: ManagedServerTarget, scenario: str) -> None:
        super().__init__()
        self.target = target
        self.scenario = scenario
        self.killed_pid: int | None = None

    def request_done(self, sample: RequestSample | None) -> None:
        super().request_done(sample)
        if sample is None and self.current == self.scenario and self.killed_pid is None:
            assert self.target.server is not None
            self.killed_pid = self.target.server.pid
            threading.Timer(0.3, os.kill, args=(self.killed_pid, signal.SIGKILL)).start()


def test_server_crash_fails_that_scenario_and_keeps_the_others(
    paths: Paths, patched_server: Path, smollm2_gguf: Path
) -> None:
    target = _managed(paths, patched_server, smollm2_gguf)
    killer = _KillDuring(target, "code_gen")
    config = BenchConfig(scenarios=("short", "code_gen", "concurrency"), repeats=1, n_predict=64, concurrency=(1,))
    result = run_bench(target, config, hardware={}, progress=killer)

    assert result.status == "partial"
    statuses = {s.name: s.status for s in result.scenarios}
    assert statuses == {"short": "ok", "code_gen": "failed", "concurrency": "ok"}
    failed = result.scenario("code_gen")
    assert failed is not None and failed.error is not None
    assert "llama-server exited with code -9" in failed.error and "last log lines" in failed.error
    assert len(result.events) == 1 and "restarted" in result.events[0]
    assert killer.killed_pid is not None and not psutil.pid_exists(killer.killed_pid)
    short = result.scenario("short")
    assert short is not None and len(short.points[0].samples) == 1
    assert not _server_children()


class _InterruptIn(Recorder):
    def __init__(self, scenario: str) -> None:
        super().__init__()
        self.scenario = scenario

    def request_done(self, sample: RequestSample | None) -> None:
        super().request_done(sample)
        if self.current == self.scenario:
            raise KeyboardInterrupt  # what Ctrl-C does to the main thread at this point


def test_ctrl_c_returns_partial_results_and_stops_the_server(
    paths: Paths, patched_server: Path, smollm2_gguf: Path
) -> None:
    target = _managed(paths, patched_server, smollm2_gguf)
    config = BenchConfig(scenarios=("short", "code_gen", "code_edit"), repeats=1, n_predict=4)
    result = run_bench(target, config, hardware={}, progress=_InterruptIn("code_gen"))
    assert result.status == "interrupted"
    assert [(s.name, s.status) for s in result.scenarios] == [("short", "ok"), ("code_gen", "interrupted")]
    assert target.server is not None and target.server.process.poll() is not None


def _bench_cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "velollm_patch", "bench", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _answered(logs: Path) -> int:
    """Requests the bench's servers have finished, from their logs (print_timing writes one "total time" line
    per request, among its other lines)."""
    return sum(p.read_text(errors="replace").count("total time =") for p in logs.glob("*.log"))


def test_cli_ctrl_c_saves_partial_results(
    paths: Paths, patched_server: Path, smollm2_gguf: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    out = tmp_path / "out"
    env = {**os.environ, "VELOLLM_HOME": str(home)}
    process = _bench_cli("run", str(patched_server), "--model", str(smollm2_gguf), "--server-args", "-c 2048",
                         "--scenarios", "short,code_gen,code_edit", "--repeats", "2", "--n-predict", "4",
                         "--out", str(out), "--no-charts", env=env)
    # Interrupt once the server has answered four requests: the warm-up and both measured requests of
    # `short`, and the warm-up of `code_gen`; so `short` is complete and `code_gen` is under way.
    logs = home / "data" / "logs" / "bench"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and process.poll() is None and _answered(logs) < 4:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "partial" in stderr or "interrupted" in stderr
    assert "Traceback" not in stderr
    saved = load_result(out / "result.json")
    assert isinstance(saved, RunResult) and saved.status == "interrupted"
    short = saved.scenario("short")
    assert short is not None and short.status == "ok" and len(short.points[0].samples) == 2
    assert (out / "report.md").is_file()
    assert not _server_children()


def test_server_that_cannot_start_reports_its_log_tail(
    paths: Paths, patched_server: Path, smollm2_gguf: Path
) -> None:
    target = _managed(paths, patched_server, smollm2_gguf, ["--no-such-flag"])
    with pytest.raises(VelollmError, match="exited with code") as raised:
        run_bench(target, BenchConfig(scenarios=("short",)), hardware={})
    assert "no-such-flag" in str(raised.value)  # the server's own complaint, from its log


def test_scenario_failures_do_not_hide_earlier_points(paths: Paths, patched_server: Path, smollm2_gguf: Path) -> None:
    # A context too small for the long conversation: llama-server rejects that one request, and
    # the scenarios around it are measured as usual.
    target = _managed(paths, patched_server, smollm2_gguf, ["-c", "1024"])
    config = BenchConfig(scenarios=("short", "conversation", "code_gen"), repeats=1, n_predict=4)
    result = run_bench(target, config, hardware={})
    statuses: dict[str, ScenarioResult] = {s.name: s for s in result.scenarios}
    assert statuses["short"].status == "ok" and statuses["code_gen"].status == "ok"
    assert statuses["conversation"].status == "failed"
    assert "HTTP 400" in (statuses["conversation"].error or "")
    assert result.events == []  # the server did not crash, so nothing was restarted


def test_cli_run_with_the_tuners_plan(paths: Paths, patched_build: InstalledBuild, tmp_path: Path) -> None:
    """`bench run current --tuned edit` starts the build with what `velollm-patch tune --workload edit` plans."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "bench", "run", patched_build.build_id, "--tuned", "edit", "--server-args", "-c 4096", "--scenarios", "short",
        "--repeats", "1", "--n-predict", "4", "--out", str(out), "--no-charts",
    ])
    assert result.exit_code == 0, result.output
    saved = load_result(out / "result.json")
    assert isinstance(saved, RunResult) and saved.status == "complete"
    assert saved.target.label == f"{patched_build.build_id} tuned:edit -c 4096"
    command = saved.target.command or ""
    # the plan's choices for an edit workload on this build, then the extra flags
    assert "--spec-type ngram-mod" in command and "--spec-adaptive" in command and "--flash-attn on" in command
    assert command.endswith("-c 4096")
