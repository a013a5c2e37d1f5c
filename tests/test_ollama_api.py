"""The Ollama API client against a real local HTTP server that follows the documented API."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.fake_ollama import FakeModel, FakeOllama, llama31_8b
from velollm_patch.errors import VelollmError
from velollm_patch.ollama.api import OllamaClient, parse_ollama_host


@pytest.mark.parametrize(("value", "hostport", "client_url"), [
    (None, "127.0.0.1:11434", "http://127.0.0.1:11434"),
    ("", "127.0.0.1:11434", "http://127.0.0.1:11434"),
    ("0.0.0.0", "0.0.0.0:11434", "http://127.0.0.1:11434"),
    ("0.0.0.0:8080", "0.0.0.0:8080", "http://127.0.0.1:8080"),
    ("http://box", "box:80", "http://box:80"),
    ("https://box", "box:443", "https://box:443"),
    ("https://box:8443", "box:8443", "https://box:8443"),
    ("box", "box:11434", "http://box:11434"),
    ("box:1234", "box:1234", "http://box:1234"),
    (" 'box:1234' ", "box:1234", "http://box:1234"),
    ('"http://box:5"', "box:5", "http://box:5"),
    ("[::1]:8080", "[::1]:8080", "http://[::1]:8080"),
    ("::1", "[::1]:11434", "http://[::1]:11434"),
    ("::", "[::]:11434", "http://[::1]:11434"),
    ("box:99999", "box:11434", "http://box:11434"),
    ("box:", "box:11434", "http://box:11434"),
    ("http://box:x", "box:80", "http://box:80"),
    (":11434", ":11434", "http://127.0.0.1:11434"),
    ("http://box:9/ollama", "box:9", "http://box:9/ollama"),
])
def test_ollama_host_follows_envconfig(value: str | None, hostport: str, client_url: str) -> None:
    host = parse_ollama_host(value)
    assert (host.hostport, host.client_url) == (hostport, client_url)


def test_explicit_port_is_recorded() -> None:
    assert parse_ollama_host("box:80").explicit_port
    assert not parse_ollama_host("http://box").explicit_port


@pytest.fixture
def server() -> Iterator[FakeOllama]:
    with FakeOllama([llama31_8b(), FakeModel("tiny:1b", reply="one two three four")], version="0.32.4") as fake:
        yield fake


def test_version(server: FakeOllama) -> None:
    with OllamaClient(server.url) as client:
        assert client.version() == "0.32.4"


def test_client_reads_ollama_host(server: FakeOllama, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", server.url.removeprefix("http://"))
    with OllamaClient() as client:
        assert client.version() == "0.32.4"


def test_ps_lists_loaded_models(server: FakeOllama) -> None:
    with OllamaClient(server.url) as client:
        assert client.ps() == []
        client.generate("llama3.1:8b", "")  # a prompt-less generate loads the model
        (model,) = client.ps()
    assert model.name == "llama3.1:8b" and model.context_length == 4096
    assert model.details.quantization_level == "Q4_K_M"
    assert not model.partly_on_cpu


def test_show(server: FakeOllama) -> None:
    with OllamaClient(server.url) as client:
        show = client.show("llama3.1:8b")
    assert show.template == llama31_8b().template
    assert show.model_info["llama.attention.head_count_kv"] == 8
    assert 'stop                           "<|eot_id|>"' in show.parameters
    assert show.details.family == "llama" and show.capabilities == ("completion",)
    assert server.requests[-1] == ("POST", "/api/show", {"model": "llama3.1:8b", "verbose": False})


def test_show_unknown_model_is_one_line(server: FakeOllama) -> None:
    with OllamaClient(server.url) as client, pytest.raises(VelollmError) as info:
        client.show("nope:1b")
    message = str(info.value)
    assert "does not have model 'nope:1b'" in message and "ollama pull nope:1b" in message
    assert "\n" not in message


@pytest.mark.parametrize("stream", [True, False])
def test_generate_metrics(server: FakeOllama, stream: bool) -> None:
    pieces: list[str] = []
    with OllamaClient(server.url) as client:
        result = client.generate("tiny:1b", "count to four please", {"temperature": 0.0}, stream,
                                 on_chunk=pieces.append)
        warm = client.generate("tiny:1b", "again", stream=stream)
    assert result.response == "one two three four" and result.done_reason == "stop"
    assert pieces == (["one", " two", " three", " four"] if stream else ["one two three four"])
    metrics = result.metrics
    assert metrics.eval_count == 4 and metrics.eval_duration == 80_000_000
    assert metrics.eval_tokens_per_s == pytest.approx(50.0)
    assert metrics.prompt_eval_count == 5 and metrics.prompt_tokens_per_s == pytest.approx(500.0)
    assert metrics.load_duration == 1_250_000_000
    assert metrics.total_duration > metrics.load_duration + metrics.eval_duration
    assert warm.metrics.load_duration == 0  # omitted by the server once loaded (omitempty)
    assert server.requests[-2][2]["stream"] is stream


def test_generate_length_limit(server: FakeOllama) -> None:
    with OllamaClient(server.url) as client:
        result = client.generate("tiny:1b", "hi", {"num_predict": 2})
    assert result.response == "one two" and result.done_reason == "length"


def test_generate_rejected_option_is_one_line(server: FakeOllama) -> None:
    with OllamaClient(server.url) as client, pytest.raises(VelollmError) as info:
        client.generate("tiny:1b", "hi", {"num_ctx": "4096"}, stream=True)
    assert str(info.value) == 'Ollama /api/generate failed (HTTP 400): option "num_ctx" must be of type integer'


def test_keep_alive_zero_unloads(server: FakeOllama) -> None:
    with OllamaClient(server.url) as client:
        client.generate("tiny:1b", "")
        assert [m.name for m in client.ps()] == ["tiny:1b"]
        result = client.generate("tiny:1b", "", keep_alive=0)
        assert result.done_reason == "unload" and client.ps() == []


def test_invalid_keep_alive_fails_before_sending(server: FakeOllama) -> None:
    with OllamaClient(server.url) as client, pytest.raises(VelollmError, match="not a duration"):
        client.generate("tiny:1b", "hi", keep_alive="soon")
    assert all(path != "/api/generate" for _, path, _ in server.requests)


def test_generate_unknown_model(server: FakeOllama) -> None:
    with OllamaClient(server.url) as client, pytest.raises(VelollmError, match="does not have model 'x'"):
        client.generate("x", "hi", stream=True)


def test_unreachable_server_is_one_line() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with OllamaClient(f"127.0.0.1:{port}", timeout=2) as client, pytest.raises(VelollmError) as info:
        client.version()
    message = str(info.value)
    assert message.startswith(f"Ollama is not reachable at http://127.0.0.1:{port}")
    assert "ollama serve" in message and "\n" not in message
