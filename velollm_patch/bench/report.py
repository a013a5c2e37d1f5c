"""Markdown reports and PNG charts for bench results.

Charts are what a person looks at first: tokens/s per scenario, the latency distribution, memory
as the context grows, and throughput under concurrency. For a single run the whiskers span the
individual requests; for an A/B they span the rounds (one median per round), which is the spread
that matters when deciding whether B is really faster.

Charts are optional: matplotlib comes with the ``bench`` extra, not with the base install, so it is
imported only when a chart is drawn, and a report without it says how to get them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from velollm_patch.bench.metrics import METRICS, PointResult, RatioStats, geometric_means, percentile, split_key
from velollm_patch.bench.runner import ABResult, RunResult
from velollm_patch.bench.targets import TargetInfo
from velollm_patch.errors import VelollmError
from velollm_patch.hardware import HardwareInfo
from velollm_patch.units import MiB

CHART_DPI = 110
REPORT_NAME = "report.md"

# label → that target's runs: one for `bench run`, one per round for an A/B
Series = Mapping[str, Sequence[RunResult]]


def format_value(metric: str, value: float | None) -> str:
    if value is None:
        return "–"
    unit = METRICS[metric].unit if metric in METRICS else ""
    if unit == "bytes":
        return f"{value / MiB:,.1f} MiB"
    if unit == "s":
        return f"{value * 1000:,.0f} ms" if value < 10 else f"{value:,.1f} s"
    if metric == "spec_acceptance":
        return f"{value:.1%}"
    return f"{value:,.1f}"


def format_ratio(ratio: RatioStats) -> str:
    stats = ratio.stats
    if stats.n == 1:
        return f"×{stats.median:.3f}"
    return f"×{stats.median:.3f} [{stats.min:.3f}–{stats.max:.3f}]"


def verdict(ratio: RatioStats, threshold: float = 0.02) -> str:
    """better / worse / same for B against A, by the metric's direction; ``same`` when the
    spread of the rounds straddles 1 or the change is under ``threshold``."""
    stats = ratio.stats
    info = METRICS.get(ratio.metric)
    if info is None or abs(stats.median - 1) < threshold or (stats.n > 1 and stats.min <= 1 <= stats.max):
        return "same"
    return "better" if (stats.median > 1) == info.higher_is_better else "worse"


def _machine(hardware: Mapping[str, Any]) -> str:
    try:
        hw = HardwareInfo.from_dict(dict(hardware))
    except VelollmError:
        return "unknown machine"
    gpus = ", ".join(g.name for g in hw.gpus) or "no GPU"
    return (
        f"{hw.cpu.model} ({hw.cpu.physical_cores} cores / {hw.cpu.logical_cores} threads), "
        f"{hw.memory.total_bytes / 1024**3:.0f} GiB RAM, {gpus}, {hw.os}"
    )


def _target_lines(info: TargetInfo) -> list[str]:
    lines = [f"- target: {info.kind} `{info.spec}`" + (f" ({info.api})" if info.api else "")]
    if info.build:
        level = info.build.get("patch_level") or "vanilla (no patches)"
        lines.append(f"- build: `{info.build.get('build_id')}`, {level}")
    if info.version:
        lines.append(f"- server version: {info.version}")
    if info.command:
        lines.append(f"- server command: `{info.command}`")
    if info.model:
        size = f" ({info.model_bytes / MiB:,.0f} MiB)" if info.model_bytes else ""
        lines.append(f"- model: `{info.model}`{size}")
    if info.n_ctx:
        slots = f", {info.slots} slots" if info.slots else ""
        lines.append(f"- context: {info.n_ctx} tokens per request{slots}")
    return lines


def _settings_line(run: RunResult) -> str:
    config = run.config
    return (
        f"- settings: greedy (temperature 0, seed {config.seed}), {config.warmup} warm-up request(s) per "
        "scenario excluded, prompt cache off, repeats "
        + (str(config.repeats) if config.repeats else "per scenario")
        + (f", n_predict {config.n_predict}" if config.n_predict else "")
    )


def _point_name(point: PointResult, scenario: str) -> str:
    if not point.label:
        return ""
    if scenario == "concurrency":
        return _clients(point.label)
    tokens = percentile([s.prompt_tokens for s in point.samples], 50) if point.samples else point.param
    return f"{tokens:,.0f} tokens"


def _clients(label: str) -> str:
    return f"{label} client" + ("" if label == "1" else "s")


def run_markdown(run: RunResult, charts: Sequence[Path] = ()) -> str:
    lines = [
        f"# velollm-patch bench: {run.target.label}", "",
        f"- run `{run.id}`, {run.created}, status **{run.status}**, {run.duration_s:,.0f} s",
        *_target_lines(run.target),
        f"- machine: {_machine(run.hardware)}",
        f"- condition: {run.condition.describe()}",
        _settings_line(run), "",
        "| scenario | point | n | decode tok/s min / median / max | prompt tok/s | TTFT p50 | latency p50 / p95 "
        "| aggregate tok/s | peak RSS | KV committed | draft acceptance |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    failures: list[str] = []
    for scenario in run.scenarios:
        if not scenario.points:
            lines.append(f"| {scenario.title} | {scenario.status} | 0 | | | | | | | | |")
        for point in scenario.points:
            head = point.headline()
            decode = point.stats("decode_tps")
            decode_text = f"{decode.min:,.1f} / {decode.median:,.1f} / {decode.max:,.1f}" if decode else "–"
            lines.append(
                f"| {scenario.title} | {_point_name(point, scenario.name)} | {len(point.samples)} | {decode_text} "
                f"| {format_value('prompt_tps', head.get('prompt_tps'))} "
                f"| {format_value('ttft_s', head.get('ttft_s'))} "
                f"| {format_value('latency_p50_s', head.get('latency_p50_s'))} / "
                f"{format_value('latency_p95_s', head.get('latency_p95_s'))} "
                f"| {format_value('aggregate_tps', head.get('aggregate_tps'))} "
                f"| {format_value('peak_rss_bytes', head.get('peak_rss_bytes'))} "
                f"| {format_value('kv_committed_bytes', head.get('kv_committed_bytes'))} "
                f"| {format_value('spec_acceptance', head.get('spec_acceptance'))} |"
            )
        if scenario.error:
            failures.append(f"- **{scenario.title}** {scenario.status}:\n\n```\n{scenario.error}\n```")
    if failures:
        lines += ["", "## Problems", "", *failures]
    if run.events:
        lines += ["", "## Events", "", *(f"- {event}" for event in run.events)]
    lines += _chart_lines(charts)
    return "\n".join(lines) + "\n"


def _chart_lines(charts: Sequence[Path]) -> list[str]:
    if not charts:
        return []
    return ["", "## Charts", "", *(f"![{chart.stem.replace('_', ' ')}]({chart.name})" for chart in charts)]


def ratio_rows(ratios: Sequence[RatioStats]) -> list[str]:
    rows = ["| scenario | metric | A | B | B/A median [min–max] | B is |", "|---|---|---:|---:|---:|---|"]
    for ratio in ratios:
        point, metric = split_key(ratio.key)
        title = METRICS[metric].title if metric in METRICS else metric
        rows.append(
            f"| {point} | {title} | {format_value(metric, ratio.a_median)} | {format_value(metric, ratio.b_median)} "
            f"| {format_ratio(ratio)} | {verdict(ratio)} |"
        )
    return rows


def geomean_rows(ratios: Sequence[RatioStats]) -> list[str]:
    rows = ["| metric | B/A geometric mean | scenarios |", "|---|---:|---:|"]
    for metric, (mean, count) in geometric_means(ratios).items():
        title = METRICS[metric].title if metric in METRICS else metric
        rows.append(f"| {title} | ×{mean:.3f} | {count} |")
    return rows


def ab_markdown(ab: ABResult, charts: Sequence[Path] = ()) -> str:
    complete = sum(1 for r in ab.rounds if r.complete)
    first = next((run for run in (*ab.runs("a"), *ab.runs("b"))), None)
    lines = [
        f"# velollm-patch bench A/B: {ab.a.label} (A) vs {ab.b.label} (B)", "",
        f"- A/B `{ab.id}`, {ab.created}, status **{ab.status}**, {complete} of {ab.rounds_planned} rounds, "
        f"{ab.duration_s:,.0f} s; order {' '.join(r.order for r in ab.rounds)} (a fresh server per run)",
        f"- machine: {_machine(ab.hardware)}",
        f"- condition: {ab.condition.describe()}",
    ]
    if first is not None:
        lines.append(_settings_line(first))
    lines += ["", "## A", "", *_target_lines(ab.a), "", "## B", "", *_target_lines(ab.b), ""]
    if ab.error:
        lines += [f"**Stopped:** {ab.error}", ""]
    lines += [
        "## B/A per metric", "",
        "A and B columns are medians over rounds; the ratio is taken within each round, then summarized.", "",
        *ratio_rows(ab.ratios()),
        "", "## Over the whole suite", "",
        "Each metric's median B/A above, combined over the scenarios by geometric mean.", "",
        *geomean_rows(ab.ratios()),
    ]
    problems = [
        f"- round {n + 1} {side.upper()}: {s.title} {s.status}: {_first_line(s.error)}"
        for n, r in enumerate(ab.rounds) for side, run in (("a", r.a), ("b", r.b)) if run is not None
        for s in run.scenarios if s.error
    ]
    if problems:
        lines += ["", "## Problems", "", *problems]
    lines += _chart_lines(charts)
    return "\n".join(lines) + "\n"


def _first_line(text: str | None) -> str:
    return (text or "").splitlines()[0] if text else ""


def compare_markdown(old: RunResult, new: RunResult, ratios: Sequence[RatioStats]) -> str:
    lines = [
        f"# velollm-patch bench compare: {old.target.label} → {new.target.label}", "",
        f"- old (A): `{old.id}` ({old.created}), {_machine(old.hardware)}",
        f"- new (B): `{new.id}` ({new.created}), {_machine(new.hardware)}",
    ]
    if old.hardware != new.hardware:
        lines.append("- note: the two runs were measured on different hardware readings")
    lines += ["", *ratio_rows(ratios), "", *geomean_rows(ratios)]
    return "\n".join(lines) + "\n"


# --- charts --------------------------------------------------------------------------------------


def charts_missing() -> str | None:
    """Why this installation draws no charts, or None when it can."""
    if importlib.util.find_spec("matplotlib") is None:
        return "no charts: they need matplotlib (pip install matplotlib, or install velollm-patch with its bench extra)"
    return None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI, and no GUI toolkit to import
    import matplotlib.pyplot as plt  # after use(): the backend is fixed when pyplot loads

    return plt


def _point(run: RunResult, scenario: str, label: str) -> PointResult | None:
    found = run.scenario(scenario)
    if found is None:
        return None
    return next((p for p in found.points if p.label == label), None)


def _values(runs: Sequence[RunResult], scenario: str, label: str, metric: str) -> list[float]:
    """Per-request values for one run; one headline value per run (round) for several."""
    if len(runs) == 1:
        point = _point(runs[0], scenario, label)
        if point is None:
            return []
        return [v for s in point.samples if (v := getattr(s, metric)) is not None]
    values: list[float] = []
    for run in runs:
        point = _point(run, scenario, label)
        if point is not None and (value := point.headline().get(metric)) is not None:
            values.append(value)
    return values


def _single_scenarios(series: Series) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for runs in series.values():
        for run in runs:
            for scenario in run.scenarios:
                if any(not p.label for p in scenario.points):
                    seen.setdefault(scenario.name, scenario.title)
    return list(seen.items())


def _spread_note(series: Series) -> str:
    several = any(len(runs) > 1 for runs in series.values())
    return "bars: median; whiskers: min–max over " + ("rounds" if several else "requests")


def chart_tokens(series: Series, path: Path) -> Path | None:
    scenarios = _single_scenarios(series)
    if not scenarios:
        return None
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(series))
    for ax, metric, title in ((axes[0], "decode_tps", "decode tokens/s"), (axes[1], "prompt_tps", "prompt tokens/s")):
        for index, (label, runs) in enumerate(series.items()):
            xs, heights, low, high = [], [], [], []
            for position, (name, _) in enumerate(scenarios):
                values = _values(runs, name, "", metric)
                if not values:
                    continue
                median = percentile(values, 50)
                xs.append(position + (index - (len(series) - 1) / 2) * width)
                heights.append(median)
                low.append(median - min(values))
                high.append(max(values) - median)
            ax.bar(xs, heights, width, yerr=[low, high], capsize=3, label=label)
        ax.set_xticks(range(len(scenarios)), [title for _, title in scenarios], rotation=15)
        ax.set_title(title)
        ax.set_ylabel("tokens/s (higher is better)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(_spread_note(series), fontsize=9)
    return _save(fig, path)


def chart_latency(series: Series, path: Path) -> Path | None:
    groups: list[tuple[str, str, str]] = []  # (scenario, point label, x tick)
    for runs in series.values():
        for run in runs:
            for result in run.scenarios:
                if result.name == "context_fill":
                    continue  # one request per size: a distribution says nothing there
                for point in result.points:
                    tick = result.title + (f"\n{_clients(point.label)}" if point.label else "")
                    if (result.name, point.label, tick) not in groups:
                        groups.append((result.name, point.label, tick))
    if not groups:
        return None
    from matplotlib import ticker

    fig, ax = _pyplot().subplots(figsize=(max(7, 1.3 * len(groups) * max(1, len(series))), 4.5))
    width = 0.8 / max(1, len(series))
    handles = []
    for index, (label, runs) in enumerate(series.items()):
        data, positions = [], []
        for position, (scenario, point_label, _) in enumerate(groups):
            values = [
                s.latency_s for run in runs if (p := _point(run, scenario, point_label)) is not None for s in p.samples
            ]
            if values:
                data.append(values)
                positions.append(position + (index - (len(series) - 1) / 2) * width)
        if not data:
            continue
        boxes = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, manage_ticks=False)
        color = f"C{index}"
        for box in boxes["boxes"]:
            box.set_facecolor(color)
            box.set_alpha(0.6)
        handles.append((boxes["boxes"][0], label))
    ax.set_xticks(range(len(groups)), [tick for _, _, tick in groups], fontsize=8)
    ax.set_yscale("log")
    plain = ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("end-to-end latency, s (log scale, lower is better)")
    ax.set_title("latency per request (all rounds pooled)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend([h for h, _ in handles], [name for _, name in handles])
    return _save(fig, path)


def _curve(runs: Sequence[RunResult], scenario: str, metric: str) -> list[tuple[float, float]]:
    """(prompt tokens, value) per point; values are medians over runs, x the median prompt size."""
    labels: dict[str, tuple[list[float], list[float]]] = {}
    for run in runs:
        found = run.scenario(scenario)
        for point in found.points if found else ():
            value = point.headline().get(metric)
            if value is None or not point.samples:
                continue
            xs, ys = labels.setdefault(point.label, ([], []))
            x = percentile([s.prompt_tokens for s in point.samples], 50) if scenario == "context_fill" else point.param
            xs.append(float(x or 0))
            ys.append(value)
    return sorted((percentile(xs, 50), percentile(ys, 50)) for xs, ys in labels.values())


def chart_memory(series: Series, path: Path) -> Path | None:
    curves = {
        label: (_curve(runs, "context_fill", "peak_rss_bytes"), _curve(runs, "context_fill", "kv_committed_bytes"))
        for label, runs in series.items()
    }
    if not any(rss or kv for rss, kv in curves.values()):
        return None
    fig, ax = _pyplot().subplots(figsize=(8, 4.5))
    for index, (label, (rss, kv)) in enumerate(curves.items()):
        if rss:
            ax.plot([x for x, _ in rss], [y / MiB for _, y in rss], "o-", color=f"C{index}", label=f"{label}: peak RSS")
        if kv:
            ax.plot([x for x, _ in kv], [y / MiB for _, y in kv], "s--", color=f"C{index}",
                    label=f"{label}: KV committed")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)  # from zero, so the gap between two lines reads as the real difference
    ax.set_xlabel("prompt tokens in the context")
    ax.set_ylabel("MiB (lower is better)")
    ax.set_title("server memory as the context fills")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def chart_concurrency(series: Series, path: Path) -> Path | None:
    curves = {label: (_curve(runs, "concurrency", "aggregate_tps"), _curve(runs, "concurrency", "latency_p50_s"))
              for label, runs in series.items()}
    if not any(tps for tps, _ in curves.values()):
        return None
    fig, (left, right) = _pyplot().subplots(1, 2, figsize=(11, 4.2))
    for index, (label, (tps, latency)) in enumerate(curves.items()):
        left.plot([x for x, _ in tps], [y for _, y in tps], "o-", color=f"C{index}", label=label)
        right.plot([x for x, _ in latency], [y for _, y in latency], "o-", color=f"C{index}", label=label)
    left.set_title("aggregate generated tokens/s")
    left.set_ylabel("tokens/s (higher is better)")
    right.set_title("latency p50 per request")
    right.set_ylabel("s (lower is better)")
    for ax in (left, right):
        ax.set_xlabel("concurrent clients")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    left.legend()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=CHART_DPI)
    _pyplot().close(fig)
    return path


def write_charts(series: Series, out_dir: Path) -> list[Path]:
    written = [
        chart_tokens(series, out_dir / "tokens_per_s.png"),
        chart_latency(series, out_dir / "latency.png"),
        chart_memory(series, out_dir / "memory_vs_context.png"),
        chart_concurrency(series, out_dir / "concurrency.png"),
    ]
    return [path for path in written if path is not None]


def series_of(result: RunResult | ABResult) -> dict[str, list[RunResult]]:
    if isinstance(result, RunResult):
        return {result.target.label: [result]}
    a_label, b_label = result.a.label, result.b.label
    if a_label == b_label:
        a_label, b_label = f"{a_label} (A)", f"{b_label} (B)"
    return {a_label: result.runs("a"), b_label: result.runs("b")}


def write_report(result: RunResult | ABResult, out_dir: Path, *, charts: bool = True) -> list[Path]:
    """report.md and, where matplotlib is installed, the charts in ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = write_charts(series_of(result), out_dir) if charts and charts_missing() is None else []
    text = run_markdown(result, images) if isinstance(result, RunResult) else ab_markdown(result, images)
    report = out_dir / REPORT_NAME
    report.write_text(text, encoding="utf-8")
    return [report, *images]
