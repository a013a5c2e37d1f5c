"""The bench against servers it did not start: Ollama (the fake from tests/fake_ollama.py, which
follows the documented /api/generate fields) and a minimal OpenAI-compatible streaming server."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.fake_ollama import BackgroundHTTPServer, FakeModel, FakeOllama
from velollm_patch.bench import history
from velollm_patch.bench.runner import BenchConfig, RunResult, load_result, run_bench
from velollm_patch.bench.targets import open_target, parse_target
from velollm_patch.cli import main
from velollm_patch.errors import VelollmError
from velollm_patch.paths import Paths

MODEL = "smol:135m"


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    reply = " ".join(f"word{i}" for i in range(40))
    with FakeOllama([FakeModel(name=MODEL, reply=reply, context_length=4096)]) as fake:
        yield fake


def _generate_bodies(fake: FakeOllama) -> list[dict[str, Any]]:
    return [body for method, path, body in fake.requests if path == "/api/generate" and body.get("prompt")]


def test_ollama_target_uses_generate_metrics(ollama: FakeOllama, tmp_path: Path) -> None:
    spec = parse_target(f"ollama:{ollama.url}", model=MODEL)
    target = open_target(spec, Paths(tmp_path / "d", tmp_path / "c"))
    config = BenchConfig(scenarios=("short", "concurrency", "context_fill"), repeats=1, n_predict=4,
                         concurrency=(1, 2))
    result = run_bench(target, config, hardware={})
    assert result.status == "complete", [s.error for s in result.scenarios]
    assert result.target.api == "ollama" and result.target.version == "0.33.0"
    assert result.target.n_ctx == 4096  # from /api/ps once the model was loaded

    short = result.scenario("short")
    assert short is not None and short.status == "ok"
    (sample,) = short.points[0].samples
    # the fake spends 20 ms per generated token and 2 ms per prompt token (durations in ns)
    assert sample.decode_tps == pytest.approx(50.0)
    assert sample.prompt_tps == pytest.approx(500.0)
    assert sample.completion_tokens == 4 and sample.timing_source == "server"
    assert sample.ttft_s is not None and sample.latency_s >= sample.ttft_s
    assert short.points[0].peak_rss_bytes is not None  # the fake listens in this very process

    concurrency = result.scenario("concurrency")
    assert concurrency is not None
    assert [p.param for p in concurrency.points] == [1, 2]
    assert sorted(s.client for s in concurrency.points[1].samples) == [1, 2]

    fill = result.scenario("context_fill")
    assert fill is not None and fill.status == "ok"
    assert [p.param for p in fill.points] == [1024, 4096 - 4 - 64]
    for point in fill.points:
        assert point.param is not None
        assert abs(point.samples[0].prompt_tokens - point.param) < 0.05 * point.param

    bodies = _generate_bodies(ollama)
    prompts = [b["prompt"] for b in bodies]
    assert len(set(prompts)) == len(prompts), "every request must defeat Ollama's prompt cache"
    # identical options apart from the length, so Ollama never reloads the model between requests
    assert {json.dumps({k: v for k, v in b["options"].items() if k != "num_predict"}) for b in bodies} == {
        json.dumps({"temperature": 0, "seed": 42})
    }
    assert all(b["stream"] is True for b in bodies)


def test_ollama_missing_model_is_a_clear_error(ollama: FakeOllama, tmp_path: Path) -> None:
    spec = parse_target(f"ollama:{ollama.url}", model="nope:1b")
    target = open_target(spec, Paths(tmp_path / "d", tmp_path / "c"))
    with pytest.raises(VelollmError, match="ollama pull nope:1b"):
        run_bench(target, BenchConfig(scenarios=("short",)), hardware={})


def test_ollama_target_needs_a_model(tmp_path: Path) -> None:
    with pytest.raises(VelollmError, match="needs --model"):
        open_target(parse_target("ollama:"), Paths(tmp_path / "d", tmp_path / "c"))


def test_cli_run_against_ollama_saves_result_report_and_history(
    ollama: FakeOllama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VELOLLM_HOME", str(tmp_path / "home"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench",
        "run", f"ollama:{ollama.url}", "--model", MODEL, "--scenarios", "short,code_gen", "--repeats", "2",
        "--n-predict", "3", "--out", str(out), "--json",
    ])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert [s["name"] for s in printed["scenarios"]] == ["short", "code_gen"]
    saved = load_result(out / "result.json")
    assert isinstance(saved, RunResult) and saved.id == printed["id"]
    assert saved.hardware["cpu"]["logical_cores"] >= 1  # the machine is recorded with the result
    assert (out / "report.md").is_file() and (out / "tokens_per_s.png").is_file()
    (entry,) = history.entries(tmp_path / "home" / "data" / "bench" / history.DB_NAME)
    assert entry.id == saved.id and entry.path == str(out / "result.json")
    assert entry.summary == "decode tok/s: short 50.0, code_gen 50.0"


class _FakeOpenAI(BackgroundHTTPServer):
    """An OpenAI-compatible server with no llama-server extras: /v1/models and a streamed
    /v1/chat/completions that sends one word per chunk and ``usage`` at the end when asked."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        super().__init__()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _json(self, status: int, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
                else:
                    self._json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
                n = int(body["max_tokens"])
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
                for i in range(n):
                    self._event({"choices": [{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}]})
                self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
                if body.get("stream_options", {}).get("include_usage"):
                    self._event({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                                          "total_tokens": prompt_tokens + n}})
                self.wfile.write(b"data: [DONE]\n\n")

            def _event(self, payload: dict[str, Any]) -> None:
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()

        return Handler


def test_openai_compatible_url_measures_from_the_stream(tmp_path: Path) -> None:
    with _FakeOpenAI() as fake:
        target = open_target(parse_target(fake.url), Paths(tmp_path / "d", tmp_path / "c"))
        config = BenchConfig(scenarios=("short", "context_fill"), repeats=2, n_predict=6)
        result = run_bench(target, config, hardware={})
        assert target.pids() == [os.getpid()]
    assert result.target.api == "openai" and result.target.model == "fake-model"
    short = result.scenario("short")
    assert short is not None and short.status == "ok"
    for sample in short.points[0].samples:
        assert sample.timing_source == "client"
        assert sample.completion_tokens == 6 and sample.prompt_tokens > 50
        assert sample.ttft_s is not None and sample.decode_tps is not None
    # no context size from an OpenAI server: the curve needs --max-context
    fill = result.scenario("context_fill")
    assert fill is not None and fill.status == "skipped" and "--max-context" in (fill.error or "")
    assert result.status == "complete"
    assert all(b["model"] == "fake-model" and "cache_prompt" not in b for b in fake.bodies)
    firsts = [b["messages"][0]["content"].split("\n", 1)[0] for b in fake.bodies]
    assert len(set(firsts)) == len(firsts) and firsts[0].startswith("(request ")


def test_openai_context_fill_with_max_context(tmp_path: Path) -> None:
    with _FakeOpenAI() as fake:
        target = open_target(parse_target(fake.url), Paths(tmp_path / "d", tmp_path / "c"))
        config = BenchConfig(scenarios=("context_fill",), n_predict=2, max_context=2048)
        result = run_bench(target, config, hardware={})
    fill = result.scenario("context_fill")
    assert fill is not None and fill.status == "ok", fill
    assert [p.param for p in fill.points] == [1024, 2048 - 2 - 64]
