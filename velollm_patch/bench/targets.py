"""What a benchmark runs against, and how one measured request is sent to it.

Four kinds of target, written on the command line as:

* ``vanilla``, ``patched``, ``current`` or a build id: an installed build whose llama-server the
  bench starts and stops itself (through :func:`velollm_patch.serve.start_server`);
* a path to a llama-server binary: the same, for a build made elsewhere;
* ``http://host:port``: a running llama-server or any OpenAI-compatible server;
* ``ollama:http://host:port`` (or just ``ollama:``): an Ollama server, through ``/api/generate``.

A started server gets ``TargetSpec.server_args``, which is where a tuner plan plugs in.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

from velollm_patch import serve
from velollm_patch.bench.metrics import RequestSample
from velollm_patch.bench.scenarios import Prompt, render_transcript
from velollm_patch.builds import InstalledBuild, find_build
from velollm_patch.errors import VelollmError, one_line
from velollm_patch.ollama.api import OllamaClient
from velollm_patch.paths import Paths
from velollm_patch.proc import format_command

log = logging.getLogger("velollm_patch.bench")

KINDS = ("build", "binary", "url", "ollama")
OLLAMA_PREFIX = "ollama:"
# A big model on a slow disk takes minutes to load; a broken one fails fast with a log tail anyway.
SERVER_START_TIMEOUT_S = 600


@dataclass(frozen=True)
class TargetSpec:
    """A target as the user named it. ``model`` is a GGUF path for started servers and a model
    name for URLs; ``server_args`` are extra llama-server flags (a tuner plan's output)."""

    kind: str
    ref: str
    model: str | None = None
    server_args: tuple[str, ...] = ()
    label: str = ""

    @property
    def starts_server(self) -> bool:
        return self.kind in ("build", "binary")


def parse_target(
    text: str, *, model: str | None = None, server_args: Sequence[str] = (), label: str | None = None
) -> TargetSpec:
    text = text.strip()
    if not text:
        raise VelollmError("empty target: give vanilla, patched, current, a build id, a llama-server path or a URL")
    if text.startswith(OLLAMA_PREFIX):
        ref = text[len(OLLAMA_PREFIX):] or "http://127.0.0.1:11434"
        kind = "ollama"
    elif text.startswith(("http://", "https://")):
        ref, kind = text.rstrip("/"), "url"
    elif "/" in text or Path(text).is_file():
        ref, kind = str(Path(text).expanduser()), "binary"
    else:
        ref, kind = text, "build"
    if server_args and kind not in ("build", "binary"):
        raise VelollmError(f"--server-args only applies to servers the bench starts, not to {text}")
    return TargetSpec(kind=kind, ref=ref, model=model, server_args=tuple(server_args), label=label or text)


@dataclass(frozen=True)
class TargetInfo:
    """What was measured, as recorded in the result file: the build manifest, the exact server
    command line, the model, and what the server reported about itself once started."""

    kind: str
    spec: str
    label: str
    api: str = ""  # llama-server | openai | ollama
    url: str | None = None
    model: str | None = None
    model_bytes: int | None = None
    server_args: tuple[str, ...] = ()
    command: str | None = None
    build: Mapping[str, Any] | None = None
    version: str | None = None
    n_ctx: int | None = None
    slots: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["server_args"] = list(self.server_args)
        data["build"] = dict(self.build) if self.build is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetInfo:
        values: dict[str, Any] = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        values["server_args"] = tuple(data.get("server_args") or ())
        return cls(**values)


class Target(ABC):
    """A server that answers measured requests. Use as a context manager, or start()/stop()."""

    def __init__(self, spec: TargetSpec, info: TargetInfo, request_timeout: float) -> None:
        self.spec = spec
        self.info = info
        self.request_timeout = request_timeout

    @abstractmethod
    def start(self) -> None:
        """Start or connect; raise a one-line VelollmError if the target cannot be used."""

    @abstractmethod
    def stop(self) -> None:
        """Release what start() took; a server the bench started is stopped."""

    def ensure_running(self) -> str | None:
        """Bring a crashed server back before the next scenario; returns what happened, if anything."""
        return None

    @abstractmethod
    def generate(self, prompt: Prompt, n_predict: int, *, seed: int, nonce: int) -> RequestSample:
        """One greedy streamed request. ``nonce`` is unique per request, for servers whose prompt
        cache cannot be switched off. Failures raise VelollmError."""

    def server_metrics(self) -> dict[str, float]:
        """The /metrics page, where the server has one."""
        return {}

    def pids(self) -> list[int]:
        """Processes whose memory is the server's (empty when it cannot be known)."""
        return []

    def context_size(self) -> int | None:
        """Tokens one request may use, where the server tells."""
        return self.info.n_ctx

    def __enter__(self) -> Target:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _chat_body(prompt: Prompt, n_predict: int, seed: int, *, model: str | None, llama_server: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [m.to_dict() for m in prompt],
        "max_tokens": n_predict,
        "temperature": 0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    if llama_server:
        # Every repeat must do the same work: no prompt reuse from the previous request, and exactly
        # n_predict tokens even where greedy decoding would hit end-of-sequence early.
        body["cache_prompt"] = False
        body["ignore_eos"] = True
    return body


def stream_chat(http: httpx.Client, url: str, body: Mapping[str, Any], timeout: float) -> RequestSample:
    """POST a streamed /v1/chat/completions and measure it.

    Token rates come from llama-server's ``timings`` (server-side, excluding HTTP and queueing)
    when the final chunk carries them; otherwise from chunk arrival times and ``usage``.
    """
    started = time.perf_counter()
    first: float | None = None
    last: float | None = None
    pieces = 0
    usage: Mapping[str, Any] = {}
    timings: Mapping[str, Any] = {}
    with http.stream("POST", f"{url}/v1/chat/completions", json=dict(body), timeout=timeout) as response:
        if response.status_code != 200:
            response.read()
            raise VelollmError(
                f"{url} answered HTTP {response.status_code} to /v1/chat/completions: {one_line(response.text)}"
            )
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise VelollmError(f"{url} sent a stream chunk that is not JSON: {data[:80]!r}") from exc
            if chunk.get("error"):
                raise VelollmError(f"{url} failed the request: {one_line(json.dumps(chunk['error']))}")
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("reasoning_content"):
                    last = time.perf_counter()
                    first = first or last
                    pieces += 1
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
    ended = time.perf_counter()
    return _sample_from_stream(started, first, last, ended, pieces, usage, timings)


def _sample_from_stream(
    started: float, first: float | None, last: float | None, ended: float, pieces: int,
    usage: Mapping[str, Any], timings: Mapping[str, Any],
) -> RequestSample:
    ttft = first - started if first is not None else None
    if timings:
        prompt_tokens = int(timings.get("prompt_n") or 0) + int(timings.get("cache_n") or 0)
        completion = int(timings.get("predicted_n") or 0)
        draft_n = timings.get("draft_n")
        return RequestSample(
            prompt_tokens=prompt_tokens, completion_tokens=completion, latency_s=ended - started, ttft_s=ttft,
            decode_tps=_positive(timings.get("predicted_per_second")),
            prompt_tps=_positive(timings.get("prompt_per_second")),
            timing_source="server",
            draft_tokens=int(draft_n) if draft_n is not None else None,
            draft_accepted=int(timings["draft_n_accepted"]) if "draft_n_accepted" in timings else None,
        )
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or pieces)
    decode_tps = None
    if first is not None and last is not None and last > first and completion > 1:
        # The first token's time is prompt processing; the rest arrive at the decode rate.
        decode_tps = (completion - 1) / (last - first)
    prompt_tps = prompt_tokens / ttft if ttft and prompt_tokens else None
    return RequestSample(
        prompt_tokens=prompt_tokens, completion_tokens=completion, latency_s=ended - started, ttft_s=ttft,
        decode_tps=decode_tps, prompt_tps=prompt_tps, timing_source="client",
    )


def _positive(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


class _ChatTarget(Target):
    """llama-server (native extras, ``timings``) or any OpenAI-compatible chat endpoint."""

    def __init__(self, spec: TargetSpec, info: TargetInfo, request_timeout: float) -> None:
        super().__init__(spec, info, request_timeout)
        self._http = httpx.Client(timeout=httpx.Timeout(request_timeout, connect=5.0))
        self._url = ""
        self._llama_server = False
        self._model_name: str | None = spec.model if spec.kind == "url" else None

    def generate(self, prompt: Prompt, n_predict: int, *, seed: int, nonce: int) -> RequestSample:
        if not self._llama_server:
            # Other servers cache prompt prefixes and offer no switch; a unique first line makes
            # every request process its whole prompt, as the llama-server requests do.
            first = prompt[0]
            prompt = (replace(first, content=f"(request {nonce})\n{first.content}"), *prompt[1:])
        body = _chat_body(prompt, n_predict, seed, model=self._model_name, llama_server=self._llama_server)
        try:
            return stream_chat(self._http, self._url, body, self.request_timeout)
        except httpx.HTTPError as exc:
            raise self._request_failed(exc) from exc

    def _request_failed(self, exc: httpx.HTTPError) -> VelollmError:
        return VelollmError(f"request to {self._url} failed: {one_line(str(exc)) or type(exc).__name__}")

    def server_metrics(self) -> dict[str, float]:
        if not self._llama_server:
            return {}
        try:
            response = self._http.get(f"{self._url}/metrics", timeout=10)
        except httpx.HTTPError:
            return {}
        return serve.parse_prometheus(response.text) if response.status_code == 200 else {}

    def _read_props(self) -> dict[str, Any] | None:
        """llama-server's /props, or None when the server is not a llama-server."""
        response = self._http.get(f"{self._url}/props", timeout=10)
        if response.status_code != 200:
            return None
        try:
            props = response.json()
        except ValueError:
            return None
        return props if isinstance(props, dict) and "default_generation_settings" in props else None

    def _apply_props(self, props: Mapping[str, Any]) -> None:
        self._llama_server = True
        settings = props.get("default_generation_settings") or {}
        self.info = replace(
            self.info, api="llama-server", url=self._url, version=str(props.get("build_info") or "") or None,
            n_ctx=int(settings["n_ctx"]) if settings.get("n_ctx") else None,
            slots=int(props["total_slots"]) if props.get("total_slots") else None,
            model=self.info.model or str(props.get("model_path") or "") or None,
        )

    def stop(self) -> None:
        self._http.close()


class ManagedServerTarget(_ChatTarget):
    """A llama-server the bench starts itself, from an installed build or a binary path."""

    def __init__(
        self, spec: TargetSpec, binary: Path, model: Path, *, build: InstalledBuild | None, log_dir: Path,
        request_timeout: float,
    ) -> None:
        args = list(spec.server_args)
        if "--metrics" not in args:
            # /metrics carries KV committed bytes (patched builds) and the speculative counters.
            args.append("--metrics")
        info = TargetInfo(
            kind=spec.kind, spec=spec.ref, label=spec.label, api="llama-server", model=str(model),
            model_bytes=model.stat().st_size if model.is_file() else None, server_args=tuple(args),
            build=build.manifest if build is not None else None,
        )
        super().__init__(spec, info, request_timeout)
        self._config = serve.ServerConfig(
            binary=binary, model=model, args=tuple(args),
            log_file=log_dir / f"{slug(spec.label)}-{time.strftime('%Y%m%d-%H%M%S')}.log",
        )
        self.server: serve.RunningServer | None = None

    def start(self) -> None:
        self.server = serve.start_server(self._config, timeout=SERVER_START_TIMEOUT_S)
        self._url = self.server.url
        argv = [str(self._config.binary), "-m", str(self._config.model), *self._config.args]
        self.info = replace(self.info, command=format_command(argv))
        props = self._read_props()
        if props is None:
            raise VelollmError(f"{self._config.binary} answered /health but not /props: is it a llama-server?")
        self._apply_props(props)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        super().stop()

    def ensure_running(self) -> str | None:
        if self.server is None or self.server.process.poll() is None:
            return None
        code = self.server.process.returncode
        self.start()
        return f"llama-server had exited with code {code}; restarted it (log: {self._config.log_file})"

    def pids(self) -> list[int]:
        if self.server is None or self.server.process.poll() is not None:
            return []
        return [self.server.pid]

    def _request_failed(self, exc: httpx.HTTPError) -> VelollmError:
        if self.server is not None:
            try:
                # The socket closes as the process dies; give the kernel a moment to report the exit.
                code = self.server.process.wait(timeout=2)
            except Exception:
                return super()._request_failed(exc)
            return VelollmError(
                f"llama-server exited with code {code} during the request; last log lines:\n{self.server.log_tail()}"
            )
        return super()._request_failed(exc)


class UrlTarget(_ChatTarget):
    """A server someone else runs: llama-server (recognized by /props) or OpenAI-compatible."""

    def __init__(self, spec: TargetSpec, request_timeout: float) -> None:
        info = TargetInfo(kind="url", spec=spec.ref, label=spec.label, url=spec.ref, model=spec.model)
        super().__init__(spec, info, request_timeout)
        self._url = spec.ref
        self._pids: list[int] = []

    def start(self) -> None:
        try:
            props = self._read_props()
            if props is not None:
                self._apply_props(props)
            else:
                self._probe_openai()
        except httpx.HTTPError as exc:
            raise VelollmError(
                f"cannot reach {self._url} ({one_line(str(exc)) or type(exc).__name__}): is the server running?"
            ) from None
        self._pids = listening_pids(self._url)

    def _probe_openai(self) -> None:
        response = self._http.get(f"{self._url}/v1/models", timeout=10)
        if response.status_code != 200:
            raise VelollmError(
                f"{self._url} is neither a llama-server (/props) nor OpenAI-compatible (/v1/models answered "
                f"HTTP {response.status_code})"
            )
        if self._model_name is None:
            try:
                models = response.json().get("data") or []
                self._model_name = str(models[0]["id"]) if models else None
            except (ValueError, AttributeError, KeyError, TypeError):
                self._model_name = None
        self.info = replace(self.info, api="openai", model=self._model_name)

    def pids(self) -> list[int]:
        return [p for p in self._pids if psutil.pid_exists(p)]


class OllamaTarget(Target):
    """An Ollama server, measured with the metrics of /api/generate (docs/ollama.md, API)."""

    def __init__(self, spec: TargetSpec, request_timeout: float) -> None:
        info = TargetInfo(kind="ollama", spec=spec.ref, label=spec.label, api="ollama", model=spec.model)
        super().__init__(spec, info, request_timeout)
        self._client = OllamaClient(spec.ref, generate_timeout=request_timeout)
        self._model = spec.model or ""
        self._pids: list[int] = []

    def start(self) -> None:
        version = self._client.version()
        self._client.show(self._model)  # a one-line error naming `ollama pull` if the model is missing
        self.info = replace(self.info, url=self._client.base_url, version=version or None)
        self._pids = listening_pids(self._client.base_url)

    def stop(self) -> None:
        self._client.close()

    def generate(self, prompt: Prompt, n_predict: int, *, seed: int, nonce: int) -> RequestSample:
        first: float | None = None

        def on_chunk(_: str) -> None:
            nonlocal first
            first = first or time.perf_counter()

        # Ollama always reuses cached prompt prefixes, and in era C reports prompt_eval_count with
        # the cached tokens included but prompt_eval_duration without them (llamaServerTimings): a unique first line
        # makes the whole prompt evaluated, so the prompt rate is honest.
        text = f"(request {nonce})\n{render_transcript(prompt)}"
        # The same options on every request: changing a runner option would reload the model.
        options = {"temperature": 0, "seed": seed, "num_predict": n_predict}
        started = time.perf_counter()
        result = self._client.generate(self._model, text, options, stream=True, on_chunk=on_chunk)
        ended = time.perf_counter()
        metrics = result.metrics
        return RequestSample(
            prompt_tokens=metrics.prompt_eval_count, completion_tokens=metrics.eval_count,
            latency_s=ended - started, ttft_s=first - started if first is not None else None,
            decode_tps=metrics.eval_tokens_per_s, prompt_tps=metrics.prompt_tokens_per_s, timing_source="server",
        )

    def context_size(self) -> int | None:
        """The runner's per-slot context from /api/ps, known once the model is loaded (after warm-up)."""
        for running in self._client.ps():
            if self._model in (running.name, running.model) and running.context_length:
                self.info = replace(self.info, n_ctx=running.context_length)
                return running.context_length
        return None

    def pids(self) -> list[int]:
        return [p for p in self._pids if psutil.pid_exists(p)]


def listening_pids(url: str) -> list[int]:
    """The local process listening on the URL's port, so RSS can be sampled for servers the bench
    did not start. Remote hosts, or a system that will not tell (no permission), give []."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            return []
    except ValueError:
        return []
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError) as exc:
        log.debug("cannot list sockets to find the server process: %s", exc)
        return []
    return sorted({
        c.pid for c in connections
        if c.pid and c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    })


def slug(text: str, limit: int = 40) -> str:
    """A file-name fragment for a label; labels can carry whole flag lists, hence the length cap."""
    kept = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text)
    return "-".join(part for part in kept.split("-") if part)[:limit] or "target"


def open_target(spec: TargetSpec, paths: Paths, *, request_timeout: float = 600.0) -> Target:
    """The runtime object for ``spec``: a build is looked up now, the server starts in start()."""
    if spec.kind == "url":
        return UrlTarget(spec, request_timeout)
    if spec.kind == "ollama":
        if not spec.model:
            raise VelollmError("an Ollama target needs --model NAME (a model Ollama has pulled)")
        return OllamaTarget(spec, request_timeout)
    if spec.model is None:
        raise VelollmError(f"{spec.label}: a started llama-server needs a model (--model GGUF or name)")
    model = Path(spec.model)
    if not model.is_file():
        raise VelollmError(f"model {model} does not exist")
    build: InstalledBuild | None = None
    if spec.kind == "build":
        build = find_build(paths, spec.ref)
        binary = build.bin("llama-server")
    else:
        binary = Path(spec.ref)
        if not binary.is_file():
            raise VelollmError(f"{binary} is not a file: give an installed build (vanilla, patched, an id) or a path")
    return ManagedServerTarget(
        spec, binary, model, build=build, log_dir=paths.logs / "bench", request_timeout=request_timeout,
    )

