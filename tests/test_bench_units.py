"""The bench's pure parts: statistics, A/B ratios, prompt sets, result files, history, reports, charts, CLI."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.helpers import request_sample, run_result
from velollm_patch import serve
from velollm_patch.bench import history
from velollm_patch.bench.metrics import (
    PointResult,
    RatioStats,
    geometric_means,
    metric_total,
    percentile,
    ratio_table,
    summarize,
)
from velollm_patch.bench.report import ab_markdown, compare_markdown, run_markdown, verdict, write_report
from velollm_patch.bench.runner import (
    ABResult,
    ABRound,
    BenchConfig,
    RunResult,
    compare,
    load_result,
    save_result,
)
from velollm_patch.bench.scenarios import SCENARIO_NAMES, load_scenario, parse_names, render_transcript
from velollm_patch.bench.targets import parse_target
from velollm_patch.cli import main
from velollm_patch.errors import VelollmError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([4.0, 1.0, 3.0, 2.0, 5.0], 50) == 3.0
    assert percentile([float(v) for v in range(1, 101)], 95) == pytest.approx(95.05)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_ignores_unmeasured_values() -> None:
    stats = summarize([2.0, None, 6.0, 4.0])
    assert stats is not None
    assert (stats.n, stats.min, stats.median, stats.max, stats.mean) == (3, 2.0, 4.0, 6.0, 4.0)
    assert summarize([None, None]) is None


def test_point_headline_uses_medians_percentiles_and_aggregate() -> None:
    point = PointResult(
        label="", param=None, wall_s=4.0, peak_rss_bytes=300, kv_committed_bytes=None,
        samples=(request_sample(10, 1.0, drafted=10, accepted=5), request_sample(30, 3.0, drafted=10, accepted=9),
                 request_sample(20, 2.0)),
    )
    head = point.headline()
    assert head["decode_tps"] == 20
    assert head["latency_p50_s"] == 2.0
    assert head["latency_p95_s"] == pytest.approx(2.9)
    assert head["aggregate_tps"] == 150 / 4.0
    assert head["spec_acceptance"] == pytest.approx(14 / 20)
    assert head["peak_rss_bytes"] == 300
    assert "kv_committed_bytes" not in head and "peak_vram_bytes" not in head


def test_ratio_table_takes_ratios_within_rounds() -> None:
    # Round 2 ran on a machine twice as slow; A and B slowed down together, so B/A is unaffected.
    rounds = [({"s.decode_tps": 100.0}, {"s.decode_tps": 110.0}),
              ({"s.decode_tps": 50.0}, {"s.decode_tps": 56.0}),
              ({"s.decode_tps": 100.0, "s.kv": 5.0}, {"s.decode_tps": 108.0})]
    (ratio,) = ratio_table(rounds)
    assert ratio.key == "s.decode_tps"
    assert ratio.ratios == pytest.approx((1.10, 1.12, 1.08))
    assert (ratio.stats.min, ratio.stats.median, ratio.stats.max) == pytest.approx((1.08, 1.10, 1.12))
    assert ratio.a_median == 100.0 and ratio.b_median == 108.0
    assert verdict(ratio) == "better"


def test_verdict_is_same_when_the_spread_straddles_one_and_respects_direction() -> None:
    straddling = ratio_table([({"s.decode_tps": 1.0}, {"s.decode_tps": 1.2}),
                              ({"s.decode_tps": 1.0}, {"s.decode_tps": 0.9})])[0]
    assert verdict(straddling) == "same"
    memory = ratio_table([({"s.peak_rss_bytes": 100.0}, {"s.peak_rss_bytes": 50.0})])[0]
    assert verdict(memory) == "better"  # less memory is better
    latency = ratio_table([({"s.latency_p50_s": 1.0}, {"s.latency_p50_s": 1.5})])[0]
    assert verdict(latency) == "worse"


def test_prometheus_parsing_and_label_totals() -> None:
    text = (
        "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n"
        "# TYPE llamacpp:prompt_tokens_total counter\n"
        "llamacpp:prompt_tokens_total 1234\n"
        'llamacpp:kv_committed_bytes{device="0"} 1048576\n'
        'llamacpp:kv_committed_bytes{device="1"} 2097152\n'
        "llamacpp:broken notanumber\n"
    )
    values = serve.parse_prometheus(text)
    assert values["llamacpp:prompt_tokens_total"] == 1234
    assert metric_total(values, "llamacpp:kv_committed_bytes") == 3 * 1048576
    assert metric_total(values, "llamacpp:absent") is None
    assert "llamacpp:broken" not in values


def test_every_shipped_scenario_loads() -> None:
    scenarios = {name: load_scenario(name) for name in SCENARIO_NAMES}
    assert scenarios["short"].n_predict == 50 and len(scenarios["short"].prompts) >= 3
    assert scenarios["conversation"].n_predict == 500
    assert scenarios["code_gen"].n_predict == 200
    assert scenarios["concurrency"].clients == (1, 2, 4, 8)
    assert scenarios["concurrency"].prompts == scenarios["short"].prompts
    # the code-edit prompt carries the whole shipped source file
    edit = scenarios["code_edit"].prompts[0][-1].content
    assert "class Fetcher" in edit and "{{file:" not in edit and edit.count("\n") > 150
    fill = scenarios["context_fill"]
    assert fill.levels[:3] == (1024, 4096, 16384)
    prompt = fill.fill_prompt(50_000)
    assert len(prompt[0].content) == len(fill.instruction) + 50_000 and "Part 2." in prompt[0].content


def test_scenario_names_are_validated() -> None:
    assert parse_names(None) == SCENARIO_NAMES
    assert parse_names("code_edit, short") == ("short", "code_edit")  # report order
    with pytest.raises(VelollmError, match="unknown scenario nope"):
        parse_names("short,nope")


def test_transcript_for_single_prompt_endpoints() -> None:
    short = load_scenario("short").prompts[0]
    assert render_transcript(short) == short[0].content
    conversation = render_transcript(load_scenario("conversation").prompts[0])
    assert conversation.startswith("System: ") and "\n\nAssistant: " in conversation
    assert conversation.endswith("Assistant:")


def test_target_parsing() -> None:
    assert parse_target("patched").kind == "build"
    assert parse_target("./bin/llama-server").kind == "binary"
    url = parse_target("http://127.0.0.1:8080/", model="m")
    assert (url.kind, url.ref, url.model) == ("url", "http://127.0.0.1:8080", "m")
    ollama = parse_target("ollama:http://box:11434", model="llama3")
    assert (ollama.kind, ollama.ref) == ("ollama", "http://box:11434")
    assert parse_target("ollama:").ref == "http://127.0.0.1:11434"
    assert parse_target("vanilla", server_args=["-c", "4096"]).server_args == ("-c", "4096")
    with pytest.raises(VelollmError, match="only applies to servers the bench starts"):
        parse_target("http://127.0.0.1:8080", server_args=["-c", "4096"])


def test_run_result_round_trips_through_json(tmp_path: Path) -> None:
    run = run_result("patched", 100.0)
    path = save_result(run, tmp_path / "out" / "result.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "velollm-bench-run/1"
    assert data["scenarios"][0]["points"][0]["summary"]["headline"]["decode_tps"] == pytest.approx(105.0)
    loaded = load_result(path)
    assert isinstance(loaded, RunResult)
    assert loaded.to_dict() == run.to_dict()
    assert loaded.headline() == run.headline()
    assert not list(path.parent.glob(".*.tmp"))


def _ab() -> ABResult:
    rounds = [ABRound("AB", run_result("vanilla", 100.0, run_id="a1"), run_result("patched", 110.0, run_id="b1")),
              ABRound("BA", run_result("vanilla", 90.0, run_id="a2"), run_result("patched", 95.0, run_id="b2"))]
    assert rounds[0].a is not None and rounds[0].b is not None
    return ABResult(id="ab1", created="2026-11-23T11:00:00+0000", a=rounds[0].a.target, b=rounds[0].b.target,
                    hardware={}, config=BenchConfig(repeats=2), rounds_planned=2, rounds=rounds, status="partial")


def test_ab_result_round_trips_and_reports_ratios(tmp_path: Path) -> None:
    ab = _ab()
    loaded = load_result(save_result(ab, tmp_path / "ab.json"))
    assert isinstance(loaded, ABResult)
    assert loaded.to_dict() == ab.to_dict()
    by_key = {r.key: r for r in loaded.ratios()}
    decode = by_key["short.decode_tps"]
    assert decode.ratios == pytest.approx((1.1, 95 / 90))
    assert by_key["context_fill@4096.kv_committed_bytes"].stats.median == pytest.approx(1.0)
    text = ab_markdown(loaded)
    assert "vanilla (A) vs patched (B)" in text and "×1.078 [1.056–1.100]" in text
    assert "round 1 A: Code edit failed: llama-server exited with code -9" in text
    assert "## Over the whole suite" in text and "| decode | ×1.078 | 5 |" in text


def test_geometric_mean_over_scenarios_combines_median_ratios() -> None:
    ratios = [
        RatioStats("short.decode_tps", 10.0, 20.0, (2.0,)),
        RatioStats("conversation.decode_tps", 10.0, 5.0, (0.4, 0.5, 0.6)),  # median 0.5
        RatioStats("code_gen.decode_tps", 10.0, 13.0, (1.3,)),
        RatioStats("short.peak_rss_bytes", 1.0, 0.5, (0.5,)),
    ]
    means = geometric_means(ratios)
    assert means["decode_tps"][0] == pytest.approx(1.3 ** (1 / 3)) and means["decode_tps"][1] == 3
    assert means["peak_rss_bytes"][0] == pytest.approx(0.5) and means["peak_rss_bytes"][1] == 1


def test_load_result_rejects_other_files(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text('{"hello": 1}')
    with pytest.raises(VelollmError, match="not a velollm-patch bench result"):
        load_result(other)
    with pytest.raises(VelollmError, match="cannot read"):
        load_result(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(VelollmError, match="is not JSON"):
        load_result(broken)


def test_history_records_and_lists_newest_first(tmp_path: Path) -> None:
    db = tmp_path / "bench" / history.DB_NAME
    assert history.entries(db) == []
    older = run_result("vanilla", 100.0, run_id="20261123-100000-vanilla")
    newer = run_result("patched", 120.0, run_id="20261123-110000-patched")
    newer.created = "2026-11-23T11:00:00+0000"
    history.record(db, history.entry_for(older, tmp_path / "a.json"))
    history.record(db, history.entry_for(newer, tmp_path / "b.json"))
    history.record(db, history.entry_for(_ab(), tmp_path / "ab.json"))
    listed = history.entries(db)
    assert [e.id for e in listed] == ["ab1", newer.id, older.id]
    assert listed[1].summary == "decode tok/s: short 126.0"
    assert listed[1].metrics["short.decode_tps"] == pytest.approx(126.0)
    assert listed[1].model == "SmolLM2.gguf"
    assert listed[0].kind == "ab" and listed[0].target == "vanilla vs patched"
    assert listed[0].summary.startswith("2 rounds; decode B/A: short ×1.0")
    assert len(history.entries(db, limit=1)) == 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == history.SCHEMA_VERSION


def test_history_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / history.DB_NAME
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(VelollmError, match="newer velollm-patch"):
        history.entries(db)


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_run_report_and_charts(tmp_path: Path) -> None:
    files = write_report(run_result("patched", 100.0), tmp_path)
    names = sorted(f.name for f in files)
    assert names == ["concurrency.png", "latency.png", "memory_vs_context.png", "report.md", "tokens_per_s.png"]
    for path in files:
        if path.suffix == ".png":
            _assert_png(path)
    text = (tmp_path / "report.md").read_text()
    assert "| Short completion |  | 2 | 100.0 / 105.0 / 110.0 |" in text
    assert "| Context fill | 4,000 tokens |" in text and "96.0 MiB" in text
    assert "## Problems" in text and "exited with code -9" in text
    assert "![memory vs context](memory_vs_context.png)" in text


def test_ab_charts_and_markdown_without_charts(tmp_path: Path) -> None:
    files = write_report(_ab(), tmp_path / "ab")
    assert {f.name for f in files} >= {"report.md", "tokens_per_s.png", "memory_vs_context.png"}
    for path in files:
        if path.suffix == ".png":
            _assert_png(path)
    only = write_report(_ab(), tmp_path / "plain", charts=False)
    assert [f.name for f in only] == ["report.md"]
    assert "## Charts" not in run_markdown(run_result("x", 1.0))


def test_compare_lines_up_shared_metrics() -> None:
    old, new = run_result("vanilla", 100.0), run_result("patched", 125.0)
    ratios = {r.key: r for r in compare(old, new)}
    assert ratios["short.decode_tps"].stats.median == pytest.approx(1.25)
    assert ratios["concurrency@2.latency_p50_s"].stats.median == pytest.approx(1.0)
    assert "vanilla → patched" in compare_markdown(old, new, list(ratios.values()))


def test_cli_compare_history_and_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VELOLLM_HOME", str(tmp_path / "home"))
    old = save_result(run_result("vanilla", 100.0), tmp_path / "old.json")
    new = save_result(run_result("patched", 120.0), tmp_path / "new" / "result.json")
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "compare", str(old), str(new), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["key"]: row for row in json.loads(result.output)}
    assert rows["short.decode_tps"]["ratio"] == pytest.approx(1.2) and rows["short.decode_tps"]["verdict"] == "better"
    ab_file = save_result(_ab(), tmp_path / "ab.json")
    refused = runner.invoke(main, ["bench", "compare", str(old), str(ab_file)])
    assert refused.exit_code == 1 and "compare takes two `bench run` results" in refused.output
    assert "Traceback" not in refused.output
    report = runner.invoke(main, ["bench", "report", str(new)])
    assert report.exit_code == 0, report.output
    assert (tmp_path / "new" / "report.md").is_file() and (tmp_path / "new" / "tokens_per_s.png").is_file()
    empty = runner.invoke(main, ["bench", "history", "--json"])
    assert empty.exit_code == 0 and json.loads(empty.output) == []


def test_cli_unreachable_url_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VELOLLM_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["bench", "run", "http://127.0.0.1:9", "--quick"])
    assert result.exit_code == 1
    assert "error: cannot reach http://127.0.0.1:9" in result.output and "is the server running?" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_rejects_bad_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VELOLLM_HOME", str(tmp_path))
    runner = CliRunner()
    bad = runner.invoke(main, ["bench", "run", "http://127.0.0.1:9", "--concurrency", "1,x"])
    assert bad.exit_code == 1 and "comma list of numbers" in bad.output
    same = runner.invoke(main, ["bench", "ab", "http://127.0.0.1:9", "http://127.0.0.1:9"])
    assert same.exit_code == 1 and "A and B are the same target" in same.output
    missing = runner.invoke(main, ["bench", "run", "no-such-build"])
    assert missing.exit_code == 1 and "no build 'no-such-build'" in missing.output
    tuned_url = runner.invoke(main, ["bench", "run", "http://127.0.0.1:9", "--tuned", "code"])
    assert tuned_url.exit_code == 1 and "--tuned needs an installed build" in tuned_url.output
    bad_profile = runner.invoke(main, ["bench", "run", "current", "--tuned", "code:fastest"])
    assert bad_profile.exit_code == 2 and "'code:fastest' is not WORKLOAD[:PROFILE]" in bad_profile.output
