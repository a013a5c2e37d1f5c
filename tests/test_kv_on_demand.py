"""On-demand (paged) KV memory for host KV buffers: patch 0002-kv-on-demand (issue #3).

These tests start the real patched llama-server on 127.0.0.1 and check the memory behaviour through the
KV gauges the patch adds to /metrics (llamacpp:kv_reserved_bytes, llamacpp:kv_committed_bytes, ...), the
per-slot "kv" object in /slots, and the resident set size of the server process (psutil):

- idle with -c 32768: committed << reserved, and the RSS is close to that of a -c 2048 server;
- committed bytes and RSS grow with the tokens a slot holds and drop back when the slot is erased;
- greedy completions are byte-identical with the switch on and off (also with -np 4 --no-kv-unified and
  with the SWA model gemma3);
- with flash attention off the server warns and uses the preallocated (vanilla) KV cache.

No timing thresholds: only memory sizes and outputs are asserted.

Inputs: the fixtures ``patched_server`` (llama-server binary of a build with the full series), ``smollm2_gguf``
and ``gemma3_gguf`` from tests/conftest.py. VELOLLM_TEST_PATCHED_SERVER / VELOLLM_TEST_SMOLLM2 /
VELOLLM_TEST_GEMMA3, when set, take precedence (to test a hand-built llama-server or local models).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = pytest.mark.slow

MiB = 1024 * 1024

# A fixed prompt; repeated to fill the KV cache with a known number of tokens.
PROMPT = "The quick brown fox jumps over the lazy dog. Write a short story about a fox and a dog.\n"
FILL_TEXT = (
    "In the quiet valley the river ran slowly past the old mill, and the miller counted the sacks of "
    "grain one by one while the children played by the water. "
)


# --------------------------------------------------------------------------------------------------------------
# inputs: conftest fixtures, or these env-based fallbacks
# --------------------------------------------------------------------------------------------------------------


def _input(request: pytest.FixtureRequest, fixture: str, env: str) -> Path:
    """A conftest fixture, unless the environment variable points at a file (a hand-built binary or a local model)."""
    value = os.environ.get(env)
    if value:
        path = Path(value)
        if not path.is_file():
            pytest.skip(f"{env}={value} does not exist")
        return path
    try:
        return Path(request.getfixturevalue(fixture))
    except pytest.FixtureLookupError:
        pytest.skip(f"neither the {fixture} fixture nor {env} is available")


@pytest.fixture
def server_bin(request: pytest.FixtureRequest) -> Path:
    return _input(request, "patched_server", "VELOLLM_TEST_PATCHED_SERVER")


@pytest.fixture
def smollm2(request: pytest.FixtureRequest) -> Path:
    return _input(request, "smollm2_gguf", "VELOLLM_TEST_SMOLLM2")


@pytest.fixture
def gemma3(request: pytest.FixtureRequest) -> Path:
    return _input(request, "gemma3_gguf", "VELOLLM_TEST_GEMMA3")


# --------------------------------------------------------------------------------------------------------------
# a real llama-server process
# --------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    client: httpx.Client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss(self) -> int:
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def metrics(self) -> dict[str, float]:
        r = self.client.get("/metrics")
        r.raise_for_status()
        out: dict[str, float] = {}
        for line in r.text.splitlines():
            m = re.match(r"^llamacpp:(\w+) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def slots(self) -> list[dict]:
        r = self.client.get("/slots")
        r.raise_for_status()
        return list(r.json())

    def complete(self, prompt: str, n_predict: int, **extra: object) -> dict:
        body = {
            "prompt": prompt,
            "n_predict": n_predict,
            "temperature": 0.0,
            "top_k": 1,
            "seed": 42,
            "cache_prompt": True,
            **extra,
        }
        r = self.client.post("/completion", json=body, timeout=600)
        r.raise_for_status()
        return dict(r.json())

    def erase(self, slot: int) -> None:
        r = self.client.post(f"/slots/{slot}", params={"action": "erase"})
        r.raise_for_status()


def _start(server_bin: Path, model: Path, args: list[str], tmp_path: Path, name: str) -> Server:
    port = _free_port()
    log_path = tmp_path / f"{name}.log"
    slot_dir = tmp_path / f"{name}-slots"
    slot_dir.mkdir(exist_ok=True)
    cmd = [
        str(server_bin),
        "-m", str(model),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--metrics",
        "--slot-save-path", str(slot_dir) + os.sep,
        "--no-warmup",
        "-t", "2",
        *args,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=60)
    server = Server(proc, url, log_path, client)
    deadline = time.monotonic() + 300  # readiness wait only, not a performance threshold
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if client.get("/health").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            _stop(server)
            raise RuntimeError(f"llama-server did not become ready:\n{server.log()[-4000:]}")
        time.sleep(0.2)


def _stop(server: Server) -> None:
    server.client.close()
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture
def start_server(tmp_path: Path, server_bin: Path) -> Iterator:
    """Start llama-server processes; all of them are stopped when the test ends."""
    servers: list[Server] = []

    def start(model: Path, *args: str, name: str = "server") -> Server:
        s = _start(server_bin, model, list(args), tmp_path, f"{name}-{len(servers)}")
        servers.append(s)
        return s

    try:
        yield start
    finally:
        for s in servers:
            _stop(s)


def _settle_rss(server: Server) -> int:
    """RSS after the server has been idle for a moment (frees are not always synchronous)."""
    time.sleep(1.0)
    return server.rss()


def _fill_prompt(server: Server, n_tokens: int) -> str:
    """A prompt of about n_tokens tokens (counted with the server's tokenizer)."""
    r = server.client.post("/tokenize", json={"content": FILL_TEXT})
    r.raise_for_status()
    per_chunk = max(1, len(r.json()["tokens"]))
    return FILL_TEXT * max(1, n_tokens // per_chunk)


# --------------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------------


def test_idle_committed_much_less_than_reserved(start_server, smollm2: Path) -> None:
    small = start_server(smollm2, "-c", "2048", "-np", "1", "-fa", "on", "--kv-on-demand", name="c2048")
    rss_small = _settle_rss(small)

    big = start_server(smollm2, "-c", "32768", "-np", "1", "-fa", "on", "--kv-on-demand", name="c32768")
    rss_big = _settle_rss(big)
    m = big.metrics()

    assert m["kv_on_demand"] == 1
    assert m["kv_cells"] >= 32768
    assert m["kv_cells_used"] == 0
    assert m["kv_high_water_cells"] == 0
    # 32768 cells of SmolLM2-135M f16 K+V are 720 MiB reserved
    assert m["kv_reserved_bytes"] >= 600 * MiB
    assert m["kv_committed_bytes"] <= m["kv_reserved_bytes"] / 100

    # the idle server with a 16x larger context is about as big as the small one (issue #3 target: <= 1.10x)
    assert rss_big <= 1.10 * rss_small + 16 * MiB, (rss_big, rss_small)
    assert rss_big - rss_small < m["kv_reserved_bytes"] / 10

    slot = big.slots()[0]
    assert slot["kv"]["on_demand"] is True
    assert slot["kv"]["cells_used"] == 0
    assert slot["kv"]["committed_bytes"] == 0


def test_committed_grows_with_tokens_and_drops_after_erase(start_server, smollm2: Path) -> None:
    s = start_server(smollm2, "-c", "32768", "-np", "1", "-fa", "on", "--kv-on-demand", "--cache-ram", "0")
    rss_idle = _settle_rss(s)
    m_idle = s.metrics()
    bytes_per_cell = m_idle["kv_reserved_bytes"] / m_idle["kv_cells"]

    # SmolLM2 is trained for 8192 tokens: the server caps the slot there
    s.complete(_fill_prompt(s, 6000), n_predict=4)
    m_full = s.metrics()
    rss_full = _settle_rss(s)

    assert m_full["kv_cells_used"] >= 5000
    assert m_full["kv_high_water_cells"] >= m_full["kv_cells_used"]
    # committed follows the high-water mark (plus at most one page per region)
    assert m_full["kv_committed_bytes"] >= m_full["kv_high_water_cells"] * bytes_per_cell
    assert m_full["kv_committed_bytes"] <= (m_full["kv_high_water_cells"] + 256) * bytes_per_cell
    assert m_full["kv_committed_bytes"] < m_full["kv_reserved_bytes"] / 2
    # ... and so does the process: at least 3/4 of the committed KV bytes show up in the RSS
    assert rss_full - rss_idle >= 0.75 * (m_full["kv_committed_bytes"] - m_idle["kv_committed_bytes"])

    slot = s.slots()[0]
    assert slot["kv"]["cells_used"] == m_full["kv_cells_used"]
    assert slot["kv"]["cells_high_water"] == m_full["kv_high_water_cells"]
    assert slot["kv"]["committed_bytes"] == m_full["kv_committed_bytes"]

    s.erase(0)
    m_erased = s.metrics()
    rss_erased = _settle_rss(s)

    assert m_erased["kv_cells_used"] == 0
    assert m_erased["kv_high_water_cells"] == 0
    assert m_erased["kv_committed_bytes"] == 0
    # the pages went back to the OS: the RSS drops by (nearly) the KV bytes; what stays above the idle RSS are
    # pages of the compute buffer touched while the prompt was processed (not KV memory)
    kv_delta = m_full["kv_committed_bytes"] - m_idle["kv_committed_bytes"]
    assert rss_full - rss_erased >= 0.75 * kv_delta, (rss_idle, rss_full, rss_erased)
    assert rss_erased < rss_full


def _greedy(server: Server, prompts: list[str], n_predict: int = 48) -> list[str]:
    return [server.complete(p, n_predict=n_predict)["content"] for p in prompts]


def test_greedy_output_identical_on_off(start_server, smollm2: Path) -> None:
    prompts = [PROMPT, "Once upon a time", PROMPT + "The fox said:"]
    common = ("-c", "4096", "-np", "1", "-fa", "on")

    off = start_server(smollm2, *common, name="off")
    out_off = _greedy(off, prompts)
    assert off.metrics()["kv_on_demand"] == 0

    on = start_server(smollm2, *common, "--kv-on-demand", name="on")
    out_on = _greedy(on, prompts)
    assert on.metrics()["kv_on_demand"] == 1

    assert out_on == out_off
    assert all(out_off)


def test_parallel_slots_non_unified(start_server, smollm2: Path) -> None:
    common = ("-c", "16384", "-np", "4", "--no-kv-unified", "-fa", "on", "--cache-ram", "0")
    prompts = [f"{PROMPT} Story number {i}: " + FILL_TEXT * (5 + 10 * i) for i in range(4)]

    # one request per slot, one after the other: with concurrent requests the batch composition depends on
    # timing, and so do the logits (also in vanilla llama.cpp), so outputs are compared sequentially
    def run(server: Server) -> list[str]:
        return [server.complete(p, 32, id_slot=i)["content"] for i, p in enumerate(prompts)]

    off = start_server(smollm2, *common, name="off")
    out_off = run(off)

    on = start_server(smollm2, *common, "--kv-on-demand", name="on")
    m_idle = on.metrics()
    assert m_idle["kv_committed_bytes"] == 0
    out_on = run(on)
    assert out_on == out_off

    m = on.metrics()
    slots = on.slots()
    assert len(slots) == 4
    per_stream = m["kv_reserved_bytes"] / 4
    for slot in slots:
        kv = slot["kv"]
        assert kv["cells_used"] > 0
        assert kv["reserved_bytes"] == pytest.approx(per_stream, rel=0.01)
        assert 0 < kv["committed_bytes"] < per_stream / 2
    # each slot holds its own stream: the total is the sum of the slots
    assert m["kv_committed_bytes"] == sum(s["kv"]["committed_bytes"] for s in slots)

    # erasing a slot gives back the memory of its stream only
    on.erase(3)
    after = {s["id"]: s["kv"] for s in on.slots()}
    assert after[3]["committed_bytes"] == 0
    for i in range(3):
        assert after[i]["committed_bytes"] == next(s["kv"] for s in slots if s["id"] == i)["committed_bytes"]
    for i in range(3):
        on.erase(i)
    assert on.metrics()["kv_committed_bytes"] == 0

    # concurrent conversations: memory grows per slot and is given back
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(on.complete, p, 32, id_slot=i) for i, p in enumerate(prompts)]
        assert all(f.result()["content"] for f in futs)
    assert all(s["kv"]["committed_bytes"] > 0 for s in on.slots())
    for i in range(4):
        on.erase(i)
    assert on.metrics()["kv_committed_bytes"] == 0


def test_gemma3_swa(start_server, gemma3: Path) -> None:
    common = ("-c", "32768", "-np", "1", "-fa", "on", "--cache-ram", "0", "--ctx-checkpoints", "0")
    prompts = [PROMPT, "Once upon a time", FILL_TEXT * 40 + "Summarize the text above."]

    off = start_server(gemma3, *common, name="off")
    out_off = _greedy(off, prompts)
    m_off = off.metrics()
    assert m_off["kv_committed_bytes"] == m_off["kv_reserved_bytes"]

    on = start_server(gemma3, *common, "--kv-on-demand", name="on")
    m_idle = on.metrics()
    assert m_idle["kv_on_demand"] == 1
    assert m_idle["kv_reserved_bytes"] == m_off["kv_reserved_bytes"]
    assert m_idle["kv_committed_bytes"] <= m_idle["kv_reserved_bytes"] / 100

    out_on = _greedy(on, prompts)
    assert out_on == out_off

    m_used = on.metrics()
    assert m_used["kv_committed_bytes"] > m_idle["kv_committed_bytes"]
    assert m_used["kv_committed_bytes"] < m_used["kv_reserved_bytes"] / 4

    on.erase(0)
    assert on.metrics()["kv_committed_bytes"] == 0


def test_flash_attention_off_warns_and_preallocates(start_server, smollm2: Path) -> None:
    s = start_server(smollm2, "-c", "8192", "-np", "1", "-fa", "off", "--kv-on-demand")
    log = s.log()
    assert "kv_on_demand requires flash attention" in log
    assert "committed on demand" not in log

    m = s.metrics()
    assert m["kv_on_demand"] == 0
    assert m["kv_reserved_bytes"] > 0
    assert m["kv_committed_bytes"] == m["kv_reserved_bytes"]

    # vanilla path: the whole KV buffer is resident from the start
    assert s.rss() >= m["kv_reserved_bytes"]
    assert s.complete(PROMPT, n_predict=8)["content"]
