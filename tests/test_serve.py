"""``serve`` against the real patched llama-server and SmolLM2 (issue #6): the supervisor restarts a
killed server on the same URL, gives up after a bounded number of crashes, and the CLI command
serves the tuned plan and exits 130 on Ctrl-C and 143 on SIGTERM, as docs/usage.md's Errors section says.
No timing thresholds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from velollm_patch import serve
from velollm_patch.builds import InstalledBuild
from velollm_patch.errors import VelollmError

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "velollm_patch"]
# Fast health checks and restarts keep the tests short; the bounds are what is under test.
QUICK = serve.RestartPolicy(
    max_restarts=2, window_s=600, backoff_initial_s=0.2, backoff_max_s=1, health_interval_s=0.3,
)
WAIT_S = 300


def chat(url: str) -> str:
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    content: str = reply.json()["choices"][0]["message"]["content"]
    return content


class Running:
    """A supervisor whose run() loop is in a background thread, as the CLI's main thread would be."""

    def __init__(self, supervisor: serve.Supervisor) -> None:
        self.supervisor = supervisor
        self.error: BaseException | None = None
        supervisor.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.supervisor.run()
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def wait_for(self, condition: str, predicate: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"gave up waiting for {condition}")


@pytest.fixture
def config(patched_server: Path, smollm2_gguf: Path, tmp_path: Path) -> serve.ServerConfig:
    return serve.ServerConfig(
        binary=patched_server, model=smollm2_gguf, args=("-c", "2048", "-np", "1"), log_file=tmp_path / "server.log",
    )


@pytest.fixture
def events() -> list[str]:
    return []


@pytest.fixture
def running(config: serve.ServerConfig, events: list[str]) -> Iterator[Running]:
    supervisor = serve.Supervisor(config, QUICK, on_event=events.append)
    handle = Running(supervisor)
    yield handle
    supervisor.stop()
    handle.thread.join(timeout=WAIT_S)


def test_supervisor_restarts_a_killed_server(running: Running, events: list[str]) -> None:
    supervisor = running.supervisor
    assert chat(supervisor.url)
    first = supervisor.server
    assert first is not None
    os.kill(first.pid, signal.SIGKILL)
    running.wait_for("the restart", lambda: supervisor.restarts == 1)
    second = supervisor.server
    assert second is not None and second.pid != first.pid
    # Same URL as before the crash, and it answers again.
    assert second.url == first.url == supervisor.url
    assert chat(supervisor.url)
    assert any("exited with code" in e for e in events) and any("restarted" in e for e in events)
    code = supervisor.stop()
    running.thread.join(timeout=WAIT_S)
    assert not running.thread.is_alive() and running.error is None
    assert code is not None and second.process.poll() is not None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{supervisor.url}/health", timeout=2)


def test_supervisor_gives_up_after_bounded_restarts(running: Running) -> None:
    supervisor = running.supervisor
    for crash in range(1, QUICK.max_restarts + 2):
        server = supervisor.server
        assert server is not None
        os.kill(server.pid, signal.SIGKILL)
        if crash <= QUICK.max_restarts:
            def restarted(n: int = crash) -> bool:
                return supervisor.restarts == n

            running.wait_for(f"restart {crash}", restarted)
    running.thread.join(timeout=WAIT_S)
    assert isinstance(running.error, VelollmError)
    assert f"crashed {QUICK.max_restarts + 1} times" in str(running.error)


def test_supervisor_start_fails_cleanly_on_a_bad_flag(config: serve.ServerConfig) -> None:
    bad = serve.ServerConfig(binary=config.binary, model=config.model, args=("--no-such-flag",))
    supervisor = serve.Supervisor(bad, QUICK)
    with pytest.raises(VelollmError, match="exited with code"):
        supervisor.start()
    assert supervisor.server is None and supervisor.stop() is None


def _serve(smollm2_gguf: Path, port: int) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [*CLI, "serve", str(smollm2_gguf), "--port", str(port), "--draft", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    line = ""
    deadline = time.monotonic() + WAIT_S
    while "serving" not in line and time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line or process.poll() is None, process.stderr.read() if process.stderr else ""
    assert "curl" in process.stdout.readline()
    return process, line


@pytest.mark.parametrize(("how", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_serve_command(
    patched_build: InstalledBuild, smollm2_gguf: Path, tmp_path: Path, how: signal.Signals, exit_code: int,
) -> None:
    # The model's path looks like console markup and an emoji code: the plan lines print it as it is.
    odd = tmp_path / "odd[" / "red] [bold]:smile:" / "model[x].gguf"  # the path holds "[/red]"
    odd.parent.mkdir(parents=True)
    try:
        os.link(smollm2_gguf, odd)  # not a symlink: the CLI resolves those to the real file's name
    except OSError:
        shutil.copyfile(smollm2_gguf, odd)
    port = serve.free_port()
    process, line = _serve(odd, port)
    try:
        url = f"http://127.0.0.1:{port}"
        assert url in line
        assert chat(url)
        server_pids = [c.pid for c in psutil.Process(process.pid).children() if "llama-server" in c.name()]
        assert len(server_pids) == 1
        process.send_signal(how)
        assert process.wait(timeout=60) == exit_code
        assert process.stderr is not None
        err = process.stderr.read()
        assert "[/red]" in str(odd) and str(odd) in err and "model[x].gguf" in line, err
        # The plan, with its reasons and planned memory, went to stderr ahead of the URL.
        assert "kv_types" in err and "memory:" in err and "measured RSS" in err
        assert not psutil.pid_exists(server_pids[0])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_serve_killed_takes_its_server_along(patched_build: InstalledBuild, smollm2_gguf: Path) -> None:
    # SIGKILL runs no cleanup in velollm-patch: the server must go on its own (PR_SET_PDEATHSIG on Linux)
    # rather than stay behind holding the port and the model's memory.
    port = serve.free_port()
    process, _ = _serve(smollm2_gguf, port)
    server = next(c for c in psutil.Process(process.pid).children() if "llama-server" in c.name())
    process.kill()
    process.wait()
    try:
        server.wait(timeout=60)
    except psutil.TimeoutExpired:
        server.kill()
        raise AssertionError("llama-server outlived the velollm-patch process that started it") from None
