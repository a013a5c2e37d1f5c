"""A small but real Ollama HTTP server for tests, following the documented API (docs/ollama.md, API).

It listens on 127.0.0.1 on a free port in a background thread and serves ``/api/version``,
``/api/ps``, ``/api/show`` and ``/api/generate`` with Ollama's field names and behaviour:
NDJSON streaming by default (chunked, ``application/x-ndjson``), one JSON object with
``"stream": false``, metric durations in nanoseconds with zero fields omitted (Go's
``omitempty``), ``{"error": ...}`` bodies with 404 for unknown models and 400 for options of
the wrong type, a prompt-less generate that loads a model and ``keep_alive: 0`` that unloads it.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from velollm_patch.ollama.api import keep_alive_seconds

GIB = 1024**3

# Option types as api.Options declares them; the API fails a request whose value has the wrong
# JSON type ("option \"num_ctx\" must be of type integer") and ignores unknown keys.
_OPTION_TYPES = {
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "num_thread": int,
    "draft_num_predict": int, "num_keep": int, "seed": int, "num_predict": int, "top_k": int,
    "repeat_last_n": int, "use_mmap": bool, "top_p": float, "min_p": float, "typical_p": float,
    "temperature": float, "repeat_penalty": float, "presence_penalty": float,
    "frequency_penalty": float, "stop": list,
}
_TYPE_WORDS = {int: "integer", float: "float32", bool: "boolean", list: "array"}


@dataclass
class FakeModel:
    name: str
    template: str = "{{ .Prompt }}"
    system: str = ""
    parameters: str = ""
    model_info: dict[str, Any] = field(default_factory=dict)
    family: str = "llama"
    parameter_size: str = "8.0B"
    quantization_level: str = "Q4_K_M"
    size: int = 6 * GIB
    size_vram: int = 6 * GIB
    context_length: int = 4096
    reply: str = "Hello there, how can I help you today?"

    def details(self) -> dict[str, Any]:
        return {"parent_model": "", "format": "gguf", "family": self.family, "families": [self.family],
                "parameter_size": self.parameter_size, "quantization_level": self.quantization_level}


def llama31_8b() -> FakeModel:
    """A model shaped like llama3.1:8b (GGUF keys as /api/show reports them)."""
    return FakeModel(
        name="llama3.1:8b",
        template="{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
                 "<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>",
        parameters='stop                           "<|start_header_id|>"\n'
                   'stop                           "<|end_header_id|>"\n'
                   'stop                           "<|eot_id|>"\n'
                   "temperature                    0.6\n"
                   "num_ctx                        8192",
        model_info={
            "general.architecture": "llama", "general.parameter_count": 8030261248,
            "llama.block_count": 32, "llama.context_length": 131072, "llama.embedding_length": 4096,
            "llama.attention.head_count": 32, "llama.attention.head_count_kv": 8,
        },
        size=int(5.5 * GIB), size_vram=int(5.5 * GIB), context_length=4096,
    )


class BackgroundHTTPServer:
    """An HTTP server on a free 127.0.0.1 port, served by a thread while used as a context manager;
    subclasses provide the request handler class."""

    def __init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        # A short poll interval keeps shutdown (and so every test using a server) fast.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError


class FakeOllama(BackgroundHTTPServer):
    """Use as a context manager; ``url`` is the base URL, ``requests`` records (method, path, body)."""

    def __init__(self, models: list[FakeModel] | None = None, version: str = "0.33.0") -> None:
        self.version = version
        self.models = {m.name: m for m in (models or [])}
        self.loaded: dict[str, dt.datetime | None] = {}  # name -> expiry (None: forever)
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        super().__init__()

    def load(self, name: str) -> None:
        self.loaded[name] = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
                pass

            def _body(self) -> dict[str, Any] | None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    data = json.loads(raw or b"{}")
                except ValueError:
                    return None
                return data if isinstance(data, dict) else None

            def _json(self, status: int, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _ndjson(self, chunks: Iterator[dict[str, Any]]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for chunk in chunks:
                    data = json.dumps(chunk).encode() + b"\n"
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, {}))
                if self.path == "/":
                    body = b"Ollama is running"
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path == "/api/version":
                    self._json(200, {"version": fake.version})
                elif self.path == "/api/ps":
                    self._json(200, {"models": [fake._ps_entry(n) for n in fake.loaded]})
                else:
                    self._json(404, {"error": "404 page not found"})

            def do_POST(self) -> None:
                body = self._body()
                fake.requests.append(("POST", self.path, body or {}))
                if body is None:
                    self._json(400, {"error": "invalid JSON body"})
                    return
                if self.path == "/api/show":
                    model = fake.models.get(str(body.get("model") or ""))
                    if model is None:
                        self._json(404, {"error": f"model '{body.get('model')}' not found"})
                        return
                    self._json(200, fake._show(model))
                elif self.path == "/api/generate":
                    fake._generate(self, body)
                else:
                    self._json(404, {"error": "404 page not found"})

        return Handler

    def _ps_entry(self, name: str) -> dict[str, Any]:
        model = self.models[name]
        expiry = self.loaded[name]
        expires = (expiry or dt.datetime(2318, 1, 1, tzinfo=dt.UTC)).isoformat()
        return {"name": name, "model": name, "size": model.size, "digest": "sha256:" + "0" * 64,
                "details": model.details(), "expires_at": expires, "size_vram": model.size_vram,
                "context_length": model.context_length}

    def _show(self, model: FakeModel) -> dict[str, Any]:
        modelfile = f"FROM {model.name}\nTEMPLATE \"\"\"{model.template}\"\"\"\n"
        payload: dict[str, Any] = {
            "modelfile": modelfile, "template": model.template, "details": model.details(),
            "model_info": model.model_info, "capabilities": ["completion"],
            "modified_at": "2026-08-01T12:00:00Z",
        }
        if model.parameters:
            payload["parameters"] = model.parameters
        if model.system:
            payload["system"] = model.system
        return payload

    def _generate(self, handler: Any, body: dict[str, Any]) -> None:
        name = str(body.get("model") or "")
        model = self.models.get(name)
        if model is None:
            handler._json(404, {"error": f"model '{name}' not found"})
            return
        options = body.get("options") or {}
        for key, value in options.items():
            expected = _OPTION_TYPES.get(key)
            if expected is None:
                continue  # the API logs "invalid option provided" and ignores unknown keys
            ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
            if expected is float:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            if expected is int and isinstance(value, float):
                ok = True  # JSON numbers arrive as float64 and are truncated
            if not ok:
                handler._json(400, {"error": f'option "{key}" must be of type {_TYPE_WORDS[expected]}'})
                return
        now = dt.datetime.now(dt.UTC).isoformat()
        was_loaded = name in self.loaded
        keep_alive = keep_alive_seconds(body["keep_alive"]) if "keep_alive" in body else 300.0
        prompt = str(body.get("prompt") or "")
        if not prompt:
            if keep_alive == 0:
                self.loaded.pop(name, None)
                done_reason = "unload"
            else:
                self._keep(name, keep_alive)
                done_reason = "load"
            handler._json(200, {"model": name, "created_at": now, "response": "", "done": True,
                                "done_reason": done_reason})
            return
        self._keep(name, keep_alive)
        words = model.reply.split(" ")
        limit = options.get("num_predict")
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(words)]
        reason = "stop"
        if isinstance(limit, int | float) and 0 <= limit < len(pieces):
            pieces, reason = pieces[: int(limit)], "length"
        prompt_tokens = len(prompt.split()) + 1
        metrics = {
            "load_duration": 0 if was_loaded else 1_250_000_000,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": prompt_tokens * 2_000_000,
            "eval_count": len(pieces),
            "eval_duration": len(pieces) * 20_000_000,  # 50 tokens/s
        }
        # Go measures total_duration around the whole request: the parts plus some overhead.
        metrics["total_duration"] = (metrics["load_duration"] + metrics["prompt_eval_duration"]
                                     + metrics["eval_duration"] + 3_000_000)
        final = {"model": name, "created_at": now, "response": "", "done": True, "done_reason": reason,
                 "context": [1, 2, 3], **{k: v for k, v in metrics.items() if v}}
        if body.get("stream", True) is False:
            handler._json(200, {**final, "response": "".join(pieces)})
            return
        chunks = [{"model": name, "created_at": now, "response": p, "done": False} for p in pieces]
        handler._ndjson(iter([*chunks, final]))

    def _keep(self, name: str, seconds: float | None) -> None:
        if seconds == 0:
            self.loaded.pop(name, None)
            return
        self.loaded[name] = None if seconds is None else dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
