"""Start, health-check and stop a llama-server process.

Used by the smoke test of every build, by ``up``/``serve``, by the benchmarks and by the tests, so
that there is one way to run the server: on 127.0.0.1, on a free port unless one is given, with its
log in a file whose tail explains a failed start.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil

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

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

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
        with httpx.Client(timeout=kwargs.pop("timeout", 300)) as client:
            return client.request(method, f"{self.url}{path}", **kwargs)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_server(config: ServerConfig, *, wait: bool = True, timeout: float = 120) -> RunningServer:
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
    argv = [str(config.binary), "-m", str(config.model), "--host", config.host, "--port", str(port), *config.args]
    with log_file.open("ab") as log_handle:
        log_handle.write(f"$ {format_command(argv)}\n".encode())
        log_handle.flush()
        try:
            process = subprocess.Popen(
                argv, stdout=log_handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **config.env},
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


def complete(server: RunningServer, prompt: str, n_predict: int = 16, **params: Any) -> dict[str, Any]:
    """One greedy /completion request; returns the JSON body."""
    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "seed": 42, "cache_prompt": False, **params}
    response = server.request("POST", "/completion", json=body)
    if response.status_code != 200:
        raise VelollmError(f"llama-server answered {response.status_code} to /completion: {response.text[:200]}")
    result: dict[str, Any] = response.json()
    return result
