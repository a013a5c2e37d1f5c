"""Speculative decoding that tunes itself: patches 0010-0012 (issue #4).

These tests start the real patched llama-server on 127.0.0.1 with SmolLM2-135M as an F16 target (made from the
Q4_1 demo model with the patched build's llama-quantize, so both share the same weights) and the Q4_1 original as
the draft model, and check:

- lossless: greedy outputs with speculation (draft-simple fixed and adaptive, a windowed draft context, ngram-mod
  adaptive, per-request off) are byte-identical to a server without speculation;
- per-request ``speculative.*`` fields (nested object and flat keys) change the draft lengths observably;
- bad values get HTTP 400 with a message naming the field (/completion and /v1/chat/completions);
- the deprecated --draft-max/--draft-min flags and -md without --spec-type start the server with a deprecation
  warning; --no-spec-legacy-flags restores the upstream error;
- /slots reports per-slot acceptance rate, mean accepted length and the current (adaptive) draft length, and the
  response timings keep draft_n / draft_n_accepted.

No timing thresholds: only outputs, counters and messages are asserted.

Inputs: the fixtures ``patched_server`` and ``smollm2_gguf`` from tests/conftest.py.
VELOLLM_TEST_PATCHED_SERVER / VELOLLM_TEST_SMOLLM2, when set, take precedence (a hand-built llama-server, whose
directory must also hold llama-quantize, or a local model).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

N_PREDICT = 64

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number, with a docstring.\n",
    "Explain in three sentences why the sky is blue.\n",
]

# a prompt longer than the windowed draft context used below (--spec-draft-ctx 256)
LONG_PROMPT = (
    "Here is a list of facts about rivers. "
    + " ".join(f"Fact {i}: the river number {i} flows into the sea near the town of Port {i}." for i in range(40))
    + "\nSummarize the list in one sentence.\n"
)

CODE_FILE = "\n".join(
    f"def handler_{i}(request):\n    value = request.get('field_{i}')\n    return value * {i}\n" for i in range(12)
)
CODE_EDIT_PROMPT = (
    "Rewrite the following file, renaming `request` to `req` everywhere. Output only the file.\n\n"
    + CODE_FILE
    + "\n\nRewritten file:\n"
)


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------


def _input(request: pytest.FixtureRequest, fixture: str, env: str) -> Path:
    value = os.environ.get(env)
    if value:
        path = Path(value)
        if not path.is_file():
            pytest.skip(f"{env}={value} does not exist")
        return path
    return Path(request.getfixturevalue(fixture))


@pytest.fixture(scope="session")
def spec_server_bin(request: pytest.FixtureRequest) -> Path:
    return _input(request, "patched_server", "VELOLLM_TEST_PATCHED_SERVER")


@pytest.fixture(scope="session")
def spec_draft_gguf(request: pytest.FixtureRequest) -> Path:
    return _input(request, "smollm2_gguf", "VELOLLM_TEST_SMOLLM2")


@pytest.fixture(scope="session")
def spec_target_gguf(
    spec_server_bin: Path, spec_draft_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """SmolLM2-135M as F16, requantized from the Q4_1 demo model with the patched build's llama-quantize.

    Same weights as the Q4_1 draft (so acceptance is high), but a different, slower target.
    """
    quantize = spec_server_bin.parent / "llama-quantize"
    if not quantize.is_file():
        pytest.fail(f"{quantize} is missing: the patched build must include llama-quantize")
    out = tmp_path_factory.mktemp("spec-models") / "smollm2-135m-f16.gguf"
    proc = subprocess.run(
        [str(quantize), "--allow-requantize", str(spec_draft_gguf), str(out), "F16"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


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
    log_path: Path
    client: httpx.Client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def slot0(self) -> dict:
        r = self.client.get("/slots")
        r.raise_for_status()
        return dict(r.json()[0])

    def post(self, path: str, body: dict) -> httpx.Response:
        return self.client.post(path, json=body, timeout=600)

    def complete(self, prompt: str, n_predict: int = N_PREDICT, **extra: object) -> dict:
        body = {
            "prompt": prompt,
            "n_predict": n_predict,
            "temperature": 0.0,
            "top_k": 1,
            "seed": 42,
            "cache_prompt": False,
            **extra,
        }
        r = self.post("/completion", body)
        assert r.status_code == 200, r.text
        return dict(r.json())


def _start(server_bin: Path, model: Path, args: list[str], log_path: Path, env_extra: dict[str, str]) -> Server:
    port = _free_port()
    cmd = [
        str(server_bin),
        "-m", str(model),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--no-warmup",
        "-t", "2",
        "-c", "2048",
        "-np", "1",
        "--cache-ram", "0",
        *args,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    env.update(env_extra)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    server = Server(proc, log_path, client)
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
def start_server(tmp_path: Path, spec_server_bin: Path) -> Iterator:
    servers: list[Server] = []

    def start(model: Path, *args: str, env: dict[str, str] | None = None) -> Server:
        s = _start(spec_server_bin, model, list(args), tmp_path / f"server-{len(servers)}.log", env or {})
        servers.append(s)
        return s

    try:
        yield start
    finally:
        for s in servers:
            _stop(s)


def _draft_args(draft: Path, *extra: str) -> list[str]:
    return ["-md", str(draft), "--spec-type", "draft-simple", "--spec-draft-p-min", "0", *extra]


# --------------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------------


def test_speculation_is_lossless(start_server, spec_target_gguf: Path, spec_draft_gguf: Path) -> None:
    prompts = [*PROMPTS, LONG_PROMPT, CODE_EDIT_PROMPT]

    plain = start_server(spec_target_gguf)
    reference = [plain.complete(p)["content"] for p in prompts]
    _stop(plain)

    # draft model, adaptive, and a draft context smaller than the long prompt (sliding window)
    spec = start_server(spec_target_gguf, *_draft_args(spec_draft_gguf, "--spec-adaptive", "--spec-draft-ctx", "256"))
    assert "sliding window" in spec.log()
    drafted = 0
    for prompt, ref in zip(prompts, reference, strict=True):
        adaptive = spec.complete(prompt)
        assert adaptive["content"] == ref
        drafted += adaptive["timings"].get("draft_n", 0)
        fixed = spec.complete(prompt, speculative={"adaptive": False, "n_max": 5})
        assert fixed["content"] == ref
        off = spec.complete(prompt, speculative={"enabled": False})
        assert off["content"] == ref
        assert off["timings"].get("draft_n", 0) == 0
    assert drafted > 0
    _stop(spec)

    # n-gram speculation with the adaptive draft length
    ngram = start_server(spec_target_gguf, "--spec-type", "ngram-mod", "--spec-adaptive")
    for prompt, ref in zip(prompts, reference, strict=True):
        assert ngram.complete(prompt)["content"] == ref


def test_request_overrides_change_draft_lengths(start_server, spec_target_gguf: Path, spec_draft_gguf: Path) -> None:
    server = start_server(spec_target_gguf, *_draft_args(spec_draft_gguf, "--spec-draft-n-max", "8"))

    # n_max 1 (nested object): every step drafts at most one token
    one = server.complete(PROMPTS[0], speculative={"n_max": 1})
    st = server.slot0()["speculative_stats"]
    assert st["n_steps"] > 0
    assert st["n_drafted"] <= st["n_steps"]
    assert st["n_max"] == 1
    assert one["timings"]["draft_n"] == st["n_drafted"]

    # n_max 8 (flat key): longer drafts
    eight = server.complete(PROMPTS[0], **{"speculative.n_max": 8})
    st8 = server.slot0()["speculative_stats"]
    assert st8["n_drafted"] > st8["n_steps"]
    assert st8["n_max"] == 8
    assert eight["content"] == one["content"]

    # a confidence cut-off and a minimum draft length are accepted and keep the output unchanged
    strict = server.complete(PROMPTS[0], speculative={"p_min": 0.9, "n_min": 2, "n_max": 6})
    assert strict["content"] == one["content"]
    st_strict = server.slot0()["speculative_stats"]
    assert st_strict["n_drafted"] >= 2 * st_strict["n_steps"]  # drafts shorter than n_min were discarded

    # off for one request, on again for the next (settings do not leak between requests)
    off = server.complete(PROMPTS[0], speculative=False)
    assert off["timings"].get("draft_n", 0) == 0
    again = server.complete(PROMPTS[0])
    assert again["timings"].get("draft_n", 0) > 0

    # the OpenAI-compatible endpoint passes the fields through
    chat = server.post(
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Count from 1 to 20."}],
            "max_tokens": 32,
            "temperature": 0.0,
            "speculative": {"n_max": 1},
        },
    )
    assert chat.status_code == 200, chat.text
    st_chat = server.slot0()["speculative_stats"]
    assert st_chat["n_drafted"] <= st_chat["n_steps"]


BAD_VALUES = [
    ({"speculative": {"n_max": -1}}, "n_max"),
    ({"speculative": {"n_max": 1000}}, "n_max"),
    ({"speculative": {"n_max": "eight"}}, "n_max"),
    ({"speculative": {"n_max": 2.5}}, "n_max"),
    ({"speculative": {"p_min": 1.5}}, "p_min"),
    ({"speculative": {"enabled": "yes"}}, "enabled"),
    ({"speculative": {"n_min": 6, "n_max": 2}}, "n_min"),
    ({"speculative": {"draft_len": 4}}, "draft_len"),
    ({"speculative": "fast"}, "speculative"),
    ({"speculative.n_max": -3}, "speculative.n_max"),
    ({"speculative.p_min": -0.1}, "speculative.p_min"),
]


def test_bad_values_get_400(start_server, spec_target_gguf: Path, spec_draft_gguf: Path) -> None:
    server = start_server(spec_target_gguf, *_draft_args(spec_draft_gguf, "--spec-draft-n-max", "8"))
    for extra, needle in BAD_VALUES:
        r = server.post("/completion", {"prompt": "Hello", "n_predict": 4, **extra})
        assert r.status_code == 400, (extra, r.text)
        message = r.json()["error"]["message"]
        assert needle in message, (extra, message)

        r = server.post(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **extra},
        )
        assert r.status_code == 400, (extra, r.text)
        assert needle in r.json()["error"]["message"]

    # the limit is the server's maximum draft length
    r = server.post("/completion", {"prompt": "Hello", "n_predict": 4, "speculative": {"n_max": 9}})
    assert r.status_code == 400
    assert "between 0 and 8" in r.json()["error"]["message"]


def test_legacy_flags_map_with_a_warning(start_server, spec_target_gguf: Path, spec_draft_gguf: Path) -> None:
    # -md alone (no --spec-type) with the removed --draft-max/--draft-min flags
    server = start_server(spec_target_gguf, "-md", str(spec_draft_gguf), "--draft-max", "4", "--draft-min", "1")
    log = server.log()
    assert "--draft/--draft-n/--draft-max is deprecated, mapped to --spec-draft-n-max 4" in log
    assert "--draft-min/--draft-n-min is deprecated, mapped to --spec-draft-n-min 1" in log
    assert "-md/--model-draft without --spec-type is deprecated" in log
    res = server.complete(PROMPTS[0])
    assert res["timings"].get("draft_n", 0) > 0
    st = server.slot0()["speculative_stats"]
    assert st["n_max_cap"] == 4
    _stop(server)

    # the short aliases and the environment form
    server = start_server(spec_target_gguf, "-md", str(spec_draft_gguf), "--draft", "3", env={"LLAMA_ARG_DRAFT_MIN": "0"})
    assert "mapped to --spec-draft-n-max 3" in server.log()
    assert server.slot0()["speculative_stats"]["n_max_cap"] == 3
    _stop(server)

    # --no-spec-legacy-flags: the upstream behaviour (hard error)
    with pytest.raises(RuntimeError, match="has been removed"):
        start_server(spec_target_gguf, "-md", str(spec_draft_gguf), "--draft-max", "4", "--no-spec-legacy-flags")


def test_slot_statistics(start_server, spec_target_gguf: Path, spec_draft_gguf: Path) -> None:
    server = start_server(spec_target_gguf, *_draft_args(spec_draft_gguf, "--spec-adaptive", "--spec-adaptive-max", "12"))

    # before any request: present, zero
    st = server.slot0()["speculative_stats"]
    assert st["n_steps"] == 0
    assert st["adaptive"] is True

    res = server.complete(PROMPTS[0], n_predict=128)
    slot = server.slot0()
    assert slot["speculative"] is True
    st = slot["speculative_stats"]
    assert st["n_steps"] > 0
    assert 0.0 <= st["acceptance_rate"] <= 1.0
    assert st["acceptance_rate"] == pytest.approx(st["n_accepted"] / st["n_drafted"])
    assert 1.0 <= st["mean_accepted_length"] <= st["n_max_cap"] + 1
    assert st["mean_accepted_length"] == pytest.approx(1 + st["n_accepted"] / st["n_steps"])
    assert st["n_max_cap"] == 12
    ad = st["adaptive_state"]
    assert ad["n_min"] <= st["n_max"] <= 12
    assert ad["n_min"] <= ad["n_current"] <= 12
    assert ad["verify_ms_base"] > 0
    assert ad["draft_ms_per_token"] > 0
    assert len(st["acceptance_per_pos"]) <= 12
    assert all(0.0 <= p <= 1.0 for p in st["acceptance_per_pos"])

    # the response timings keep the upstream counters, and they agree with /slots
    assert res["timings"]["draft_n"] == st["n_drafted"]
    assert res["timings"]["draft_n_accepted"] == st["n_accepted"]

    # totals accumulate across requests, the per-request counters restart
    server.complete(PROMPTS[1], n_predict=32)
    st2 = server.slot0()["speculative_stats"]
    assert st2["n_drafted_total"] == st["n_drafted"] + st2["n_drafted"]
