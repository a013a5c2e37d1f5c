"""Start, health-check and stop a llama-server process.

Used by the smoke test of every build, by ``up``/``serve``, by the benchmarks and by the tests, so
that there is one way to run the server: on 127.0.0.1, on a free port unless one is given, with its
log in a file whose tail explains a failed start.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil

from velollm_patch import proc
from velollm_patch.errors import VelollmError
from velollm_patch.proc import format_command

LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class ServerConfig:
    binary: Path
    model: Path
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port
    log_file: Path | None = None


@dataclass(frozen=True)
class Device:
    """A device a build offloads to, as its ``llama-server --list-devices`` names it."""

    name: str  # "Vulkan0", "CUDA0"
    description: str
    total_bytes: int
    free_bytes: int


_DEVICE_LINE = re.compile(r"^\s*(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)\s*$")
# Listing devices initializes each backend (a Vulkan instance, the CUDA runtime): seconds, not minutes.
LIST_DEVICES_TIMEOUT_S = 120


def list_devices(binary: Path, env: Mapping[str, str] | None = None) -> tuple[Device, ...]:
    """The devices ``binary`` offloads to in this environment, where GGML_VK_VISIBLE_DEVICES,
    CUDA_VISIBLE_DEVICES and the like decide what it sees (common/arg.cpp: the CPU is not listed)."""
    result = proc.run([str(binary), "--list-devices"], env=dict(env or {}), check=False,
                      timeout=LIST_DEVICES_TIMEOUT_S)
    if result.returncode != 0 or "Available devices:" not in result.output:
        raise VelollmError(f"{binary} --list-devices failed (exit {result.returncode}): {result.tail(2)}")
    matches = (_DEVICE_LINE.match(line) for line in result.output.split("Available devices:", 1)[1].splitlines())
    return tuple(
        Device(m[1], m[2], int(m[3]) * 1024**2, int(m[4]) * 1024**2) for m in matches if m is not None
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RunningServer:
    """A llama-server child process. Use as a context manager, or call :meth:`stop`."""

    def __init__(self, config: ServerConfig, process: subprocess.Popen[bytes], port: int, log_file: Path) -> None:
        self.config = config
        self.process = process
        self.port = port
        self.log_file = log_file
        self.url = f"http://{config.host}:{port}"
        # one connection pool for every request to this server (httpx clients are thread-safe)
        self._http = httpx.Client(base_url=self.url, timeout=300)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_healthy(self, timeout: float = 120) -> None:
        """Poll /health until the model is loaded; raise with the log tail if the server dies."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise VelollmError(
                        f"llama-server exited with code {self.process.returncode} while starting; "
                        f"last log lines:\n{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        self.stop()
        raise VelollmError(f"llama-server did not become healthy within {timeout:.0f}s; log: {self.log_file}")

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._http.request(method, path, **kwargs)

    def get_json(self, path: str) -> Any:
        response = self.request("GET", path)
        response.raise_for_status()
        return response.json()

    def metrics(self) -> dict[str, float]:
        """The ``llamacpp:*`` series of /metrics (the server needs ``--metrics``), by name without the prefix."""
        response = self.request("GET", "/metrics")
        response.raise_for_status()
        series = parse_prometheus(response.text)
        return {name.removeprefix("llamacpp:"): value for name, value in series.items() if name.startswith("llamacpp:")}

    def slots(self) -> list[dict[str, Any]]:
        return list(self.get_json("/slots"))

    def tokenize(self, text: str) -> list[int]:
        response = self.request("POST", "/tokenize", json={"content": text})
        response.raise_for_status()
        return list(response.json()["tokens"])

    def erase_slot(self, slot: int) -> None:
        """Drop what the slot holds (the server needs ``--slot-save-path``)."""
        self.request("POST", f"/slots/{slot}", params={"action": "erase"}).raise_for_status()

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._http.close()
        return int(self.process.returncode)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has Linux send the server SIGTERM when velollm-patch dies, even by SIGKILL (which
    runs no cleanup and used to leave the server holding its port and memory).

    The signal fires when the *thread* that spawned the child exits, so it is set only for servers started
    from the main thread (the CLI, the bench, the supervisor's restarts); a server started from another
    thread is left as before.
    """
    if _LIBC is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl = _LIBC.prctl
    parent = os.getpid()

    def set_pdeathsig() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return set_pdeathsig


def start_server(
    config: ServerConfig, *, wait: bool = True, timeout: float = 120, argv: Sequence[str] | None = None,
) -> RunningServer:
    """Start ``config.binary`` with ``-m``, ``--host`` and ``--port`` from ``config`` followed by its
    ``args``; or, to reproduce another launcher's command line exactly, with ``argv`` alone (which must then
    name ``config.model`` and ``config.port`` itself)."""
    if not config.model.is_file():
        raise VelollmError(f"model {config.model} does not exist: pass a GGUF path or a known model name")
    port = config.port or free_port(config.host)
    if config.log_file:
        log_file = config.log_file
        log_file.parent.mkdir(parents=True, exist_ok=True)
    else:
        handle, name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        os.close(handle)
        log_file = Path(name)
    if argv is not None and not config.port:
        raise ValueError("a server started with its own argv needs config.port")
    if argv is None:
        argv = ["-m", str(config.model), "--host", config.host, "--port", str(port), *config.args]
    command = [str(config.binary), *argv]
    with log_file.open("ab") as log_handle:
        log_handle.write(f"$ {format_command(command)}\n".encode())
        log_handle.flush()
        try:
            process = subprocess.Popen(
                command, stdout=log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **config.env}, preexec_fn=_die_with_parent(),
            )
        except OSError as exc:
            raise VelollmError(f"cannot run {config.binary}: {exc}") from exc
    server = RunningServer(config, process, port, log_file)
    if wait:
        try:
            server.wait_healthy(timeout)
        except BaseException:
            server.stop()
            raise
    return server


def parse_prometheus(text: str) -> dict[str, float]:
    """``name{labels} value`` lines of a /metrics page; the key keeps the labels as written."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.rpartition(" ")
        try:
            values[name.strip()] = float(rest)
        except ValueError:
            continue
    return values


def complete(
    server: RunningServer, prompt: str, n_predict: int = 16, *, timeout: float = 300, **params: Any
) -> dict[str, Any]:
    """One greedy /completion request; returns the JSON body."""
    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "seed": 42, "cache_prompt": False, **params}
    response = server.request("POST", "/completion", json=body, timeout=timeout)
    if response.status_code != 200:
        raise VelollmError(f"llama-server answered {response.status_code} to /completion: {response.text[:200]}")
    result: dict[str, Any] = response.json()
    return result


# --- supervision -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartPolicy:
    """How :class:`Supervisor` reacts to a crashed or hung server.

    A crash is followed by a restart after ``backoff_initial_s``, doubling with each further crash
    in the last ``window_s`` up to ``backoff_max_s``; more than ``max_restarts`` crashes in the
    window means the server cannot stay up (a bad flag, a GPU fault), and the supervisor gives up
    rather than loop forever.
    """

    max_restarts: int = 5
    window_s: float = 600.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    health_interval_s: float = 2.0
    health_failures: int = 3
    """Consecutive failed /health checks of a live process that count as a hang."""
    health_timeout_s: float = 5.0
    start_timeout_s: float = 600.0


# A few tokens of a short prompt: loads the weights into the page cache and allocates the compute
# buffers, so the first real request does not pay for them.
WARMUP_PROMPT = "Hello"
WARMUP_TOKENS = 4


def warm_up(server: RunningServer) -> None:
    complete(server, WARMUP_PROMPT, n_predict=WARMUP_TOKENS)


class Supervisor:
    """Keeps one llama-server up: start, warm up, watch /health, restart after a crash with bounded
    exponential backoff, stop cleanly.

    The port is fixed at the first start so the URL stays valid across restarts. :meth:`run`
    blocks (it is meant for the main thread, where Ctrl-C interrupts it); :meth:`stop` may be
    called from any thread.
    """

    def __init__(
        self, config: ServerConfig, policy: RestartPolicy | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.config = replace(config, port=config.port or free_port(config.host))
        self.policy = policy or RestartPolicy()
        self.restarts = 0
        self._on_event = on_event or (lambda message: None)
        self._server: RunningServer | None = None
        self._crashes: deque[float] = deque()
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def server(self) -> RunningServer | None:
        return self._server

    def start(self) -> RunningServer:
        """Start the server, wait for /health and warm it up; raise VelollmError if it cannot."""
        server = start_server(self.config, timeout=self.policy.start_timeout_s)
        try:
            warm_up(server)
        except BaseException:
            server.stop()
            raise
        with self._lock:
            self._server = server
            if self._stopping.is_set():
                # stop() ran while this one was starting: it must not outlive the supervisor.
                server.stop()
        return server

    def run(self) -> None:
        """Watch the server until :meth:`stop`; raises VelollmError once restarts are exhausted."""
        if self._server is None:
            self.start()
        failures = 0
        while not self._stopping.wait(self.policy.health_interval_s):
            server = self._server
            assert server is not None
            code = server.process.poll()
            if code is None:
                if self._healthy(server):
                    failures = 0
                    continue
                failures += 1
                if failures < self.policy.health_failures:
                    continue
                self._on_event(f"llama-server (pid {server.pid}) stopped answering /health; restarting it")
                server.stop()
            else:
                self._on_event(f"llama-server (pid {server.pid}) exited with code {code}")
            failures = 0
            self._restart(server)

    def _healthy(self, server: RunningServer) -> bool:
        try:
            return server.request("GET", "/health", timeout=self.policy.health_timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def _restart(self, crashed: RunningServer) -> None:
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self.policy.window_s:
            self._crashes.popleft()
        if len(self._crashes) > self.policy.max_restarts:
            raise VelollmError(
                f"llama-server crashed {len(self._crashes)} times within {self.policy.window_s:.0f}s; giving up. "
                f"Last log lines:\n{crashed.log_tail()}"
            )
        delay = min(self.policy.backoff_max_s, self.policy.backoff_initial_s * 2 ** (len(self._crashes) - 1))
        self._on_event(f"restarting llama-server in {delay:.1f}s")
        if self._stopping.wait(delay):
            return
        try:
            server = self.start()
        except VelollmError as exc:
            # The dead process stays current, so the next check counts this as another crash.
            self._on_event(f"restart failed: {exc}")
            return
        self.restarts += 1
        self._on_event(f"llama-server restarted (pid {server.pid}) at {self.url}")

    def stop(self) -> int | None:
        """Stop watching and stop the server; returns its exit code (None if it never started)."""
        self._stopping.set()
        with self._lock:
            server = self._server
        return server.stop() if server is not None else None

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
