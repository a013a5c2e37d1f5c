"""A typed client for the parts of the Ollama HTTP API that tuning and benchmarking need.

Covers ``/api/version``, ``/api/ps``, ``/api/show`` and ``/api/generate`` (docs/ollama.md, API).
The base URL follows ``OLLAMA_HOST`` exactly as Ollama's own ``envconfig.Host()`` reads it, so
``http://box`` means port 80 and ``box`` means port 11434. Every failure (server down, unknown
model, a request Ollama rejects) becomes a one-line :class:`VelollmError`.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from velollm_patch.errors import VelollmError, one_line
from velollm_patch.ollama.gosyntax import parse_duration

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
_SCHEME_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class OllamaHost:
    """``OLLAMA_HOST`` parsed: where the server listens and where a client should connect."""

    scheme: str
    host: str
    port: int
    path: str = ""
    # False when the port came from a default: 11434, or 80/443 for an http(s):// scheme.
    explicit_port: bool = False

    @property
    def hostport(self) -> str:
        """``host:port`` as Go's ``net.JoinHostPort`` writes it (brackets around IPv6)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def client_url(self) -> str:
        """The URL to connect to. A server bound to every interface is reached on loopback,
        because connecting to 0.0.0.0 or :: is not portable (Windows refuses it)."""
        host = self.host
        if host in ("", "0.0.0.0"):
            host = DEFAULT_HOST
        elif host == "::":
            host = "::1"
        netloc = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        suffix = f"/{self.path}" if self.path else ""
        return f"{self.scheme}://{netloc}{suffix}"


def _go_split_host_port(hostport: str) -> tuple[str, str] | None:
    """``net.SplitHostPort``: None where Go returns an error (no port, too many colons)."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or not hostport[end + 1:].startswith(":"):
            return None
        host, port = hostport[1:end], hostport[end + 2:]
        if "[" in port or "]" in port:
            return None
        return host, port
    colon = hostport.rfind(":")
    if colon < 0 or ":" in hostport[:colon] or "[" in hostport or "]" in hostport:
        return None
    return hostport[:colon], hostport[colon + 1:]


def _go_parse_ip(text: str) -> str | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)  # Go prints v4-in-v6 addresses in dotted form
    return str(address)


def parse_ollama_host(value: str | None) -> OllamaHost:
    """Read an ``OLLAMA_HOST`` value the way ``envconfig.Host()`` does.

    ``[scheme://]host[:port][/path]``; surrounding spaces and quotes are stripped (``Var()``);
    without a scheme the port defaults to 11434, with ``http://`` to 80 and ``https://`` to 443;
    an unparsable or out-of-range port falls back to that default, as Ollama does.
    """
    text = (value or "").strip().strip("\"'").strip()
    scheme, sep, hostport = text.partition("://")
    default_port = DEFAULT_PORT
    if not sep:
        scheme, hostport = "http", text
    else:
        default_port = _SCHEME_DEFAULT_PORTS.get(scheme, DEFAULT_PORT)
    hostport, _, path = hostport.partition("/")
    split = _go_split_host_port(hostport)
    if split is None:
        host, port_text = DEFAULT_HOST, str(default_port)
        ip = _go_parse_ip(hostport.strip("[]"))
        if ip is not None:
            host = ip
        elif hostport:
            host = hostport
    else:
        host, port_text = split
    port = default_port
    explicit = split is not None and port_text.isascii() and port_text.isdigit() and int(port_text) <= 65535
    if explicit:
        port = int(port_text)
    return OllamaHost(scheme=scheme, host=host, port=port, path=path, explicit_port=explicit)


def keep_alive_seconds(value: str | int | float) -> float | None:
    """How long Ollama keeps a model loaded for a request's ``keep_alive`` (``api.Duration``):
    a number is seconds, a string a Go duration ("10m"); negative means forever (None).
    Raises VelollmError for a string Ollama would reject."""
    if isinstance(value, bool):
        raise VelollmError(f"keep_alive must be seconds or a duration such as 10m, not {value}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        parsed = parse_duration(value)
        if parsed is None:
            raise VelollmError(f"keep_alive {value!r} is not a duration such as 10m or 1h30m")
        seconds = parsed
    return None if seconds < 0 else seconds


@dataclass(frozen=True)
class ModelDetails:
    format: str = ""
    family: str = ""
    families: tuple[str, ...] = ()
    parameter_size: str = ""
    quantization_level: str = ""
    parent_model: str = ""

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ModelDetails:
        data = data or {}
        return cls(
            format=str(data.get("format") or ""),
            family=str(data.get("family") or ""),
            families=tuple(str(f) for f in data.get("families") or ()),
            parameter_size=str(data.get("parameter_size") or ""),
            quantization_level=str(data.get("quantization_level") or ""),
            parent_model=str(data.get("parent_model") or ""),
        )


@dataclass(frozen=True)
class RunningModel:
    """One entry of ``/api/ps``."""

    name: str
    model: str
    size: int
    size_vram: int
    digest: str = ""
    details: ModelDetails = field(default_factory=ModelDetails)
    expires_at: str = ""
    # The runner's effective per-slot num_ctx; absent from servers older than 2025-07 (#11331).
    context_length: int | None = None

    @property
    def partly_on_cpu(self) -> bool:
        """``size_vram < size`` means some layers run on the CPU."""
        return self.size_vram < self.size

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunningModel:
        ctx = data.get("context_length")
        return cls(
            name=str(data.get("name") or data.get("model") or ""),
            model=str(data.get("model") or data.get("name") or ""),
            size=int(data.get("size") or 0),
            size_vram=int(data.get("size_vram") or 0),
            digest=str(data.get("digest") or ""),
            details=ModelDetails.from_json(data.get("details")),
            expires_at=str(data.get("expires_at") or ""),
            context_length=int(ctx) if ctx else None,
        )


@dataclass(frozen=True)
class ShowResponse:
    """``/api/show``. ``parameters`` is Ollama's text form (one ``name value`` per line, string
    values Go-quoted); :func:`velollm_patch.ollama.modelfile.spec_from_base` reads it."""

    modelfile: str = ""
    parameters: str = ""
    template: str = ""
    system: str = ""
    renderer: str = ""
    parser: str = ""
    requires: str = ""
    details: ModelDetails = field(default_factory=ModelDetails)
    model_info: Mapping[str, Any] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()
    modified_at: str = ""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShowResponse:
        return cls(
            modelfile=str(data.get("modelfile") or ""),
            parameters=str(data.get("parameters") or ""),
            template=str(data.get("template") or ""),
            system=str(data.get("system") or ""),
            renderer=str(data.get("renderer") or ""),
            parser=str(data.get("parser") or ""),
            requires=str(data.get("requires") or ""),
            details=ModelDetails.from_json(data.get("details")),
            model_info=dict(data.get("model_info") or {}),
            capabilities=tuple(str(c) for c in data.get("capabilities") or ()),
            messages=tuple(
                (str(m.get("role", "")), str(m.get("content", ""))) for m in data.get("messages") or ()
            ),
            modified_at=str(data.get("modified_at") or ""),
        )


@dataclass(frozen=True)
class GenerateMetrics:
    """The ``Metrics`` block of a final ``/api/generate`` object; durations in nanoseconds.

    Ollama omits zero fields (``omitempty``), so absent means 0. In era C ``prompt_eval_count``
    includes prompt tokens served from the cache while ``prompt_eval_duration`` covers only the
    evaluated ones, so :attr:`prompt_tokens_per_s` is inflated on cache hits: benchmark prompt
    speed with cold, unique prompts.
    """

    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GenerateMetrics:
        return cls(**{name: int(data.get(name) or 0) for name in cls.__dataclass_fields__})

    @property
    def eval_tokens_per_s(self) -> float | None:
        return self.eval_count / (self.eval_duration / 1e9) if self.eval_duration > 0 else None

    @property
    def prompt_tokens_per_s(self) -> float | None:
        if self.prompt_eval_duration <= 0:
            return None
        return self.prompt_eval_count / (self.prompt_eval_duration / 1e9)


@dataclass(frozen=True)
class GenerateResult:
    model: str
    response: str
    done_reason: str
    metrics: GenerateMetrics


class OllamaClient:
    """Talks to one Ollama server. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout: float = 30.0,
        generate_timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """``base_url`` takes any ``OLLAMA_HOST`` spelling; None reads ``OLLAMA_HOST`` itself."""
        raw = base_url if base_url is not None else os.environ.get("OLLAMA_HOST")
        self.host = parse_ollama_host(raw)
        self.base_url = self.host.client_url
        self._generate_timeout = generate_timeout
        self._http = httpx.Client(
            base_url=self.base_url, timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OllamaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, path: str, exc: httpx.HTTPError) -> VelollmError:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return VelollmError(
                f"Ollama is not reachable at {self.base_url} ({one_line(str(exc)) or 'connection failed'}):"
                " start it with `ollama serve` or point OLLAMA_HOST at it"
            )
        if isinstance(exc, httpx.TimeoutException):
            return VelollmError(f"Ollama at {self.base_url} did not answer {path} in time")
        return VelollmError(f"request to Ollama at {self.base_url}{path} failed: {one_line(str(exc))}")

    def _check(self, path: str, response: httpx.Response, model: str | None = None) -> None:
        if response.status_code < 400:
            return
        try:
            message = str(response.json().get("error") or "")
        except (ValueError, AttributeError):
            message = response.text
        message = one_line(message) or response.reason_phrase
        if response.status_code == 404 and model is not None:
            raise VelollmError(
                f"Ollama at {self.base_url} does not have model '{model}' ({message}):"
                f" pull it with `ollama pull {model}`"
            )
        raise VelollmError(f"Ollama {path} failed (HTTP {response.status_code}): {message}")

    def _json(self, method: str, path: str, body: Mapping[str, Any] | None = None,
              model: str | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise self._fail(path, exc) from exc
        self._check(path, response, model)
        try:
            return response.json()
        except ValueError as exc:
            raise VelollmError(f"Ollama {path} answered with something that is not JSON") from exc

    def version(self) -> str:
        data = self._json("GET", "/api/version")
        return str(data.get("version") or "")

    def ps(self) -> list[RunningModel]:
        data = self._json("GET", "/api/ps")
        return [RunningModel.from_json(m) for m in data.get("models") or ()]

    def show(self, model: str, *, verbose: bool = False) -> ShowResponse:
        data = self._json("POST", "/api/show", {"model": model, "verbose": verbose}, model=model)
        return ShowResponse.from_json(data)

    def generate(
        self,
        model: str,
        prompt: str,
        options: Mapping[str, Any] | None = None,
        stream: bool = False,
        *,
        keep_alive: str | int | None = None,
        on_chunk: Callable[[str], None] | None = None,
    ) -> GenerateResult:
        """Run one completion and return its text and metrics.

        With ``stream`` the NDJSON chunks are read as they arrive (``on_chunk`` sees each piece
        of text); without it Ollama sends one object. Both end in the same result.
        """
        body: dict[str, Any] = {"model": model, "prompt": prompt, "stream": stream}
        if options:
            body["options"] = dict(options)
        if keep_alive is not None:
            keep_alive_seconds(keep_alive)  # fail here, in one line, rather than with Ollama's 400
            body["keep_alive"] = keep_alive
        path = "/api/generate"
        try:
            with self._http.stream(
                "POST", path, json=body, timeout=httpx.Timeout(self._generate_timeout, connect=5.0)
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(path, response, model)
                final = self._read_generate(response.iter_lines(), on_chunk)
        except httpx.HTTPError as exc:
            raise self._fail(path, exc) from exc
        return final

    @staticmethod
    def _read_generate(lines: Iterator[str], on_chunk: Callable[[str], None] | None) -> GenerateResult:
        pieces: list[str] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                chunk = json.loads(line)
            except ValueError as exc:
                raise VelollmError(f"Ollama /api/generate sent a line that is not JSON: {line[:80]!r}") from exc
            if chunk.get("error"):
                raise VelollmError(f"Ollama /api/generate failed: {one_line(str(chunk['error']))}")
            text = str(chunk.get("response") or "")
            if text:
                pieces.append(text)
                if on_chunk is not None:
                    on_chunk(text)
            if chunk.get("done"):
                return GenerateResult(
                    model=str(chunk.get("model") or ""),
                    response="".join(pieces),
                    done_reason=str(chunk.get("done_reason") or ""),
                    metrics=GenerateMetrics.from_json(chunk),
                )
        raise VelollmError("Ollama /api/generate ended without a final (done) message")
