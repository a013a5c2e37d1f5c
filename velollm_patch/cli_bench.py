"""``velollm-patch bench``: measure a server, A/B two of them, compare saved runs, list the history.

Thin commands over :mod:`velollm_patch.bench`. Every run saves ``result.json``, ``report.md`` and
the charts in its own directory under the bench directory (or ``--out``) and adds a history row.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich import progress as rich_progress
from rich.table import Table

from velollm_patch import hardware, terminal, tune
from velollm_patch.bench import history
from velollm_patch.bench.load import CONDITIONS, bench_condition
from velollm_patch.bench.metrics import RequestSample, ScenarioResult
from velollm_patch.bench.report import (
    REPORT_NAME,
    charts_missing,
    compare_markdown,
    format_ratio,
    format_value,
    verdict,
    write_report,
)
from velollm_patch.bench.runner import (
    ABResult,
    BenchConfig,
    Progress,
    RunResult,
    compare,
    load_result,
    run_ab,
    run_bench,
    save_result,
)
from velollm_patch.bench.scenarios import Scenario, parse_names
from velollm_patch.bench.targets import TargetSpec, open_target, parse_target
from velollm_patch.builds import find_build
from velollm_patch.calibrate import check_against_bench
from velollm_patch.errors import VelollmError
from velollm_patch.model_ref import resolve_model
from velollm_patch.paths import get_paths

console = terminal.stderr

RESULT_NAME = "result.json"
# --quick: every scenario, small enough to finish in a minute or two on a laptop CPU.
QUICK = {"repeats": 1, "n_predict": 32, "concurrency": (1, 2), "max_context": 4096}


class RichProgress(Progress):
    """A bar per scenario with the last measured decode rate, drawn on stderr."""

    def __init__(self, display: rich_progress.Progress) -> None:
        self._display = display
        self._task: rich_progress.TaskID | None = None
        self._label = ""

    def scenario_started(self, target: str, scenario: Scenario, total: int | None) -> None:
        self._label = f"{target} · {scenario.title}"
        self._task = self._display.add_task(self._label, total=total, rate="")

    def set_total(self, total: int) -> None:
        if self._task is not None:
            self._display.update(self._task, total=total)

    def request_done(self, sample: RequestSample | None) -> None:
        if self._task is None:
            return
        rate = f"{sample.decode_tps:,.1f} tok/s" if sample is not None and sample.decode_tps else ""
        self._display.update(self._task, advance=1, rate=rate or "warm-up")

    def scenario_finished(self, result: ScenarioResult) -> None:
        if self._task is not None:
            mark = "✓" if result.status == "ok" else result.status
            self._display.update(self._task, description=f"{self._label} {mark}")
            self._display.stop_task(self._task)
        self._task = None

    def note(self, text: str) -> None:
        self._display.console.print(text)


def _display() -> rich_progress.Progress:
    return rich_progress.Progress(
        terminal.plain_column("{task.description}"), rich_progress.BarColumn(),
        rich_progress.MofNCompleteColumn(), terminal.plain_column("{task.fields[rate]}"),
        rich_progress.TimeElapsedColumn(), console=console,
    )


def _int_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise VelollmError(f"expected a comma list of numbers such as 1,2,4,8, not '{text}'") from None


def _config(options: dict[str, Any]) -> BenchConfig:
    quick: dict[str, Any] = dict(QUICK) if options["quick"] else {}
    chosen = {
        "repeats": options["repeats"], "n_predict": options["n_predict"],
        "concurrency": _int_list(options["concurrency"]), "max_context": options["max_context"],
    }
    return BenchConfig(
        scenarios=parse_names(options["scenarios"]),
        warmup=options["warmup"], seed=options["seed"], request_timeout=options["timeout"],
        **{key: value if value is not None else quick.get(key) for key, value in chosen.items()},
    )


TUNED_HELP = "WORKLOAD[:PROFILE], e.g. code or chat:speed (profile default: balanced)"


def _tuned_option(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, str] | None:
    """``--tuned chat`` or ``--tuned chat:speed`` → (workload, profile)."""
    if value is None:
        return None
    workload, _, profile = value.partition(":")
    if workload not in tune.WORKLOADS or (profile and profile not in tune.PROFILES):
        raise click.BadParameter(
            f"'{value}' is not WORKLOAD[:PROFILE] with a workload of {', '.join(tune.WORKLOADS)} "
            f"and a profile of {', '.join(tune.PROFILES)}", ctx, param,
        )
    return workload, profile or "balanced"


def _spec(
    text: str, model: str | None, args: str | None, tuned: tuple[str, str] | None = None
) -> tuple[TargetSpec, tune.Plan | None]:
    """The target as given, and the plan; with ``tuned`` (workload, profile), a build started with the tuner's plan
    for this machine, the model and that build (the plan's flags first, then ``args``)."""
    server_args = tuple(shlex.split(args)) if args else ()
    parsed = parse_target(text)
    build = find_build(get_paths(), parsed.ref) if parsed.kind == "build" else None  # fails before a download
    if tuned and build is None:
        raise VelollmError(f"--tuned needs an installed build as the target (vanilla, current, a build id), not {text}")
    if parsed.starts_server:
        model = str(resolve_model(get_paths(), model))
    tuned_label = tuned and ("tuned:" + tuned[0] + ("" if tuned[1] == "balanced" else f":{tuned[1]}"))
    label = " ".join(part for part in (text, tuned_label, shlex.join(server_args)) if part)
    plan = None
    if tuned and build is not None and model is not None:
        paths = get_paths()
        hw = hardware.detect(build_dir=paths.cache)
        plan = tune.plan_for(model, hw, build, paths, tune.TuneRequest(workload=tuned[0], profile=tuned[1]))
        server_args = (*plan.args, *server_args)
    return parse_target(text, model=model, server_args=server_args, label=label), plan


def _run_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--model", help="GGUF path or known model name for started servers (default: smollm2-135m); "
                                     "the model name for a URL or Ollama target."),
        click.option("--scenarios", help="Comma list of short, conversation, code_gen, code_edit, concurrency, "
                                         "context_fill (default: all)."),
        click.option("--repeats", type=int, help="Measured requests per scenario (per client, per context size)."),
        click.option("--warmup", type=int, default=1, show_default=True, help="Unmeasured requests per scenario."),
        click.option("--n-predict", type=int, help="Tokens to generate per request, for every scenario."),
        click.option("--concurrency", help="Client counts for the concurrency scenario (default 1,2,4,8)."),
        click.option("--max-context", type=int, help="Largest context-fill size in tokens (default: the server's)."),
        click.option("--seed", type=int, default=42, show_default=True),
        click.option("--timeout", type=float, default=600, show_default=True, help="Seconds allowed per request."),
        click.option("--condition", type=click.Choice(CONDITIONS), default="quiet", show_default=True,
                     help="busy: keep one core busy with a spinning process for the whole run (started before a "
                          "--tuned plan is made, killed at the end), as on a shared machine or a laptop."),
        click.option("--quick", is_flag=True, help="A short run: 1 repeat, 32 tokens, 1-2 clients, up to 4K context."),
        click.option("--out", type=click.Path(path_type=Path), help="Directory for the result (default: under the "
                                                                     "bench directory, one per run)."),
        click.option("--no-charts", is_flag=True, help="Skip the PNG charts (drawn where matplotlib is installed)."),
        click.option("--json", "as_json", is_flag=True, help="Print the result JSON on stdout."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _save(result: RunResult | ABResult, out: Path | None, charts: bool) -> Path:
    paths = get_paths()
    directory = out or paths.bench / result.id
    json_path = save_result(result, directory / RESULT_NAME)
    files = write_report(result, directory, charts=charts)
    history.record(paths.bench / history.DB_NAME, history.entry_for(result, json_path))
    console.print(f"saved {json_path} and {', '.join(f.name for f in files)}")
    if charts and (missing := charts_missing()):
        console.print(missing)
    return json_path


def _finish(result: RunResult | ABResult, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif isinstance(result, RunResult):
        _print_run(result)
    else:
        _print_ratios(result)
    if result.status == "interrupted":
        console.print("interrupted: the results measured so far are saved")
        sys.exit(130)
    if result.status != "complete":
        console.print(terminal.labelled(f"status {result.status}:", "yellow", "see the report for what failed"))
        sys.exit(1)


def _print_run(run: RunResult) -> None:
    table = Table(title=f"{run.target.label} ({run.status})")
    for column in ("scenario", "point", "decode tok/s", "prompt tok/s", "TTFT p50", "latency p50", "aggregate tok/s",
                   "peak RSS", "KV committed"):
        table.add_column(column, justify="left" if column in ("scenario", "point") else "right")
    for scenario in run.scenarios:
        if not scenario.points:
            table.add_row(scenario.title, scenario.status, *[""] * 7)
        for point in scenario.points:
            head = point.headline()
            table.add_row(
                scenario.title, point.label, *(format_value(m, head.get(m)) for m in (
                    "decode_tps", "prompt_tps", "ttft_s", "latency_p50_s", "aggregate_tps", "peak_rss_bytes",
                    "kv_committed_bytes")),
            )
    terminal.stdout.print(table)


def _print_ratios(ab: ABResult) -> None:
    table = Table(title=f"B/A: {ab.b.label} over {ab.a.label} ({ab.status})")
    for column in ("point", "metric", "A", "B", "B/A [min–max]", "B is"):
        table.add_column(column, justify="left" if column in ("point", "metric", "B is") else "right")
    for ratio in ab.ratios():
        point, _, metric = ratio.key.rpartition(".")
        table.add_row(point, metric, format_value(metric, ratio.a_median), format_value(metric, ratio.b_median),
                      format_ratio(ratio), verdict(ratio))
    terminal.stdout.print(table)
    if ab.error:
        console.print(terminal.labelled("stopped:", "red", ab.error))


def _hardware() -> dict[str, Any]:
    return hardware.detect(build_dir=get_paths().cache).to_dict()


@click.group("bench")
def bench() -> None:
    """Measure llama-server builds, A/B them, and keep the history."""


@bench.command("run")
@click.argument("target")
@click.option("--server-args", help="Extra llama-server flags for a started server, e.g. \"-c 8192 -fa on\".")
@click.option("--tuned", callback=_tuned_option, metavar="WORKLOAD[:PROFILE]",
              help="Start the build with the tuner's plan (as `velollm-patch tune` prints it): " + TUNED_HELP + ".")
@_run_options
def bench_run(target: str, server_args: str | None, tuned: tuple[str, str] | None, **options: Any) -> None:
    """Run the scenarios against TARGET.

    TARGET: vanilla, patched, current, a build id, a llama-server path, http://HOST:PORT (a
    running llama-server or OpenAI-compatible server) or ollama:http://HOST:PORT.
    """
    config = _config(options)
    with bench_condition(options["condition"]) as condition:
        spec, plan = _spec(target, options["model"], server_args, tuned)
        opened = open_target(spec, get_paths(), request_timeout=config.request_timeout)
        hw = _hardware()
        with _display() as display:
            result = run_bench(opened, config, hardware=hw, progress=RichProgress(display), condition=condition)
    _save(result, options["out"], not options["no_charts"])
    if plan is not None and plan.calibration is not None and not server_args:
        # The prediction is for the plan's flags; with more flags it is not this run's.
        checked = check_against_bench(plan.calibration, result.scenarios)
        if checked:
            console.print(f"the calibration (tune --measure) vs this run: {checked}")
    _finish(result, options["as_json"])


@bench.command("ab")
@click.argument("target_a")
@click.argument("target_b")
@click.option("--rounds", type=int, default=3, show_default=True, help="A/B rounds (AB, BA, AB, ...).")
@click.option("--server-args", help="llama-server flags for both started servers.")
@click.option("--a-args", help="Extra flags for A only (after --server-args).")
@click.option("--b-args", help="Extra flags for B only (after --server-args).")
@click.option("--a-tuned", callback=_tuned_option, metavar="WORKLOAD[:PROFILE]",
              help="Start A with the tuner's plan: " + TUNED_HELP + ".")
@click.option("--b-tuned", callback=_tuned_option, metavar="WORKLOAD[:PROFILE]",
              help="Start B with the tuner's plan: " + TUNED_HELP + ".")
@_run_options
def bench_ab(
    target_a: str, target_b: str, rounds: int, server_args: str | None, a_args: str | None, b_args: str | None,
    a_tuned: tuple[str, str] | None, b_tuned: tuple[str, str] | None, **options: Any,
) -> None:
    """Alternate TARGET_A and TARGET_B for --rounds rounds and report each metric's ratio B/A.

    Each run starts a fresh server and only one runs at a time; the order alternates between
    rounds so that drift on a busy machine cancels out of the median ratio.
    """
    config = _config(options)
    joined_a = " ".join(a for a in (server_args, a_args) if a) or None
    joined_b = " ".join(a for a in (server_args, b_args) if a) or None
    with bench_condition(options["condition"]) as condition:
        spec_a, _ = _spec(target_a, options["model"], joined_a, a_tuned)
        spec_b, _ = _spec(target_b, options["model"], joined_b, b_tuned)
        if spec_a.label == spec_b.label:
            raise VelollmError("A and B are the same target with the same flags: use other builds or --a-args/--b-args")
        paths = get_paths()
        for spec in (spec_a, spec_b):
            # Look up both builds and models now, not after the first round has run for minutes.
            open_target(spec, paths).stop()
        hw = _hardware()
        with _display() as display:
            result = run_ab(spec_a, spec_b, config, rounds, paths=paths, hardware=hw, progress=RichProgress(display),
                            condition=condition)
    if not any(r.complete for r in result.rounds) and result.status == "failed":
        raise VelollmError(result.error or "the A/B run failed")
    _save(result, options["out"], not options["no_charts"])
    _finish(result, options["as_json"])


@bench.command("compare")
@click.argument("old", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the ratios as JSON.")
def bench_compare(old: Path, new: Path, as_json: bool) -> None:
    """Ratio NEW/OLD of every metric two saved runs share (result.json files of `bench run`)."""
    results = [load_result(path) for path in (old, new)]
    runs = [r for r in results if isinstance(r, RunResult)]
    if len(runs) != 2:
        raise VelollmError("compare takes two `bench run` results; an A/B result already holds its ratios")
    ratios = compare(runs[0], runs[1])
    if not ratios:
        raise VelollmError("the two runs have no scenario and metric in common")
    if as_json:
        click.echo(json.dumps([
            {"key": r.key, "old": r.a_median, "new": r.b_median, "ratio": r.stats.median, "verdict": verdict(r)}
            for r in ratios
        ], indent=2))
    else:
        click.echo(compare_markdown(runs[0], runs[1], ratios))


@bench.command("history")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_history(limit: int, as_json: bool) -> None:
    """Past runs and A/Bs, newest first."""
    found = history.entries(get_paths().bench / history.DB_NAME, limit)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in found], indent=2))
        return
    if not found:
        console.print("no bench runs yet: try `velollm-patch bench run patched --quick`")
        return
    table = Table()
    for column in ("id", "kind", "target", "model", "status", "summary", "result"):
        table.add_column(column)
    for entry in found:
        table.add_row(entry.id, entry.kind, entry.target, entry.model, entry.status, entry.summary, entry.path)
    terminal.stdout.print(table)


@bench.command("report")
@click.argument("result_file", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Directory for report.md and charts (default: beside "
                                                             "the result).")
@click.option("--no-charts", is_flag=True)
def bench_report(result_file: Path, out: Path | None, no_charts: bool) -> None:
    """Write report.md and the charts again for a saved result."""
    result = load_result(result_file)
    files = write_report(result, out or result_file.parent, charts=not no_charts)
    for path in files:
        click.echo(path)
    if not no_charts and len(files) == 1:
        console.print(charts_missing() or f"no charts: {REPORT_NAME} only (the result has nothing to plot)")
