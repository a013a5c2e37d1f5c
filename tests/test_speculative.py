"""Speculative decoding that tunes itself: patches 0010-0014 (issue #4).

These tests start the real patched llama-server on 127.0.0.1 with SmolLM2-135M as an F16 target (made from the
Q4_1 demo model with the patched build's llama-quantize, so both share the same weights) and the Q4_1 original as
the draft model, and check:

- lossless: greedy outputs with speculation (draft-simple fixed and adaptive, a windowed draft context, ngram-mod
  adaptive, per-request off) are byte-identical to a server without speculation on the same (batch-invariant)
  kernels;
- per-request ``speculative.*`` fields (nested object and flat keys) change the draft lengths observably;
- bad values get HTTP 400 with a message naming the field (/completion and /v1/chat/completions);
- the deprecated --draft-max/--draft-min flags and -md without --spec-type start the server with a deprecation
  warning; --no-spec-legacy-flags restores the upstream error;
- /slots reports per-slot acceptance rate, mean accepted length and the current (adaptive) draft length, and the
  response timings keep draft_n / draft_n_accepted.
- batch invariance (patch 0013): with --spec-batch-invariant (on by default when speculating) a token's
  logits are the same bits whether it is computed alone or in a batch, checked on gemma3-270m (whose
  Q4_K/Q6_K/Q5_0/Q8_0 mix and flash attention hit every batch-dependent CPU kernel upstream has), and n-gram
  speculation with gemma3 is lossless too, with a batch smaller than ngram-mod's longest draft (patch 0014
  caps the draft; upstream aborts).

No timing thresholds: only outputs, counters and messages are asserted.

Inputs: the session fixtures ``start_patched_server``, ``smollm2_f16_gguf`` (target), ``smollm2_gguf`` (draft) and
``gemma3_gguf`` from tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from velollm_patch import serve
from velollm_patch.errors import VelollmError
from velollm_patch.serve import RunningServer

StartServer = Callable[..., RunningServer]

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

# a prompt whose answer repeats it: n-gram drafts for any model
COPY_PROMPT = "Copy the following file exactly, line by line.\n\n" + CODE_FILE + "\n\nCopy:\n"

# --------------------------------------------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def start_server(start_patched_server: StartServer) -> StartServer:
    """A patched server with one slot, a 2K context and no prompt cache (so every request drafts afresh)."""

    def start(model: Path, *args: str, env: dict[str, str] | None = None) -> RunningServer:
        return start_patched_server(model, "-c", "2048", "-np", "1", "--cache-ram", "0", *args, env=env)

    return start


def _complete(server: RunningServer, prompt: str, n_predict: int = N_PREDICT, **extra: Any) -> dict[str, Any]:
    return serve.complete(server, prompt, n_predict, **extra)


def _post(server: RunningServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return server.request("POST", path, json=body)


def _slot0(server: RunningServer) -> dict[str, Any]:
    return server.slots()[0]


def _draft_args(draft: Path, *extra: str) -> list[str]:
    return ["-md", str(draft), "--spec-type", "draft-simple", "--spec-draft-p-min", "0", *extra]


# --------------------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------------------


def test_speculation_is_lossless(start_server: StartServer, smollm2_f16_gguf: Path, smollm2_gguf: Path) -> None:
    prompts = [*PROMPTS, LONG_PROMPT, CODE_EDIT_PROMPT]

    # the reference: no speculation, on the batch-invariant kernels that speculation turns on (see below)
    plain = start_server(smollm2_f16_gguf, "--spec-batch-invariant", "on")
    reference = [_complete(plain, p)["content"] for p in prompts]
    plain.stop()

    # draft model, adaptive, and a draft context smaller than the long prompt (sliding window)
    spec = start_server(smollm2_f16_gguf, *_draft_args(smollm2_gguf, "--spec-adaptive", "--spec-draft-ctx", "256"))
    assert "sliding window" in spec.log_text()
    drafted = 0
    for prompt, ref in zip(prompts, reference, strict=True):
        adaptive = _complete(spec, prompt)
        assert adaptive["content"] == ref
        drafted += adaptive["timings"].get("draft_n", 0)
        fixed = _complete(spec, prompt, speculative={"adaptive": False, "n_max": 5})
        assert fixed["content"] == ref
        off = _complete(spec, prompt, speculative={"enabled": False})
        assert off["content"] == ref
        assert off["timings"].get("draft_n", 0) == 0
    assert drafted > 0
    spec.stop()

    # n-gram speculation with the adaptive draft length
    ngram = start_server(smollm2_f16_gguf, "--spec-type", "ngram-mod", "--spec-adaptive")
    for prompt, ref in zip(prompts, reference, strict=True):
        assert _complete(ngram, prompt)["content"] == ref


def _top_logprobs(server: RunningServer, prompt: str, n_predict: int) -> list[list[tuple[int, float]]]:
    """(token id, logprob) of the 10 likeliest tokens at each generated position, as the server computed them."""
    res = _complete(server, prompt, n_predict, n_probs=10)
    return [[(t["id"], t["logprob"]) for t in pos["top_logprobs"]] for pos in res["completion_probabilities"]]


def test_batched_tokens_are_computed_as_alone(start_server: StartServer, gemma3_gguf: Path) -> None:
    prompts = [PROMPTS[0], CODE_EDIT_PROMPT]
    # one prompt token per batch (the way plain decoding computes every generated token) ...
    alone = start_server(gemma3_gguf, "--spec-batch-invariant", "on", "-b", "64", "-ub", "1")
    assert "batch-invariant CPU kernels on" in alone.log_text()
    expected = [_top_logprobs(alone, p, 4) for p in prompts]
    alone.stop()
    # ... and 64 per batch (the way a draft is verified): the same bits for the first generated token, which is
    # computed from the prompt's last row, and for the ones after it
    batched = start_server(gemma3_gguf, "--spec-batch-invariant", "on", "-b", "64", "-ub", "64")
    for prompt, exp in zip(prompts, expected, strict=True):
        assert _top_logprobs(batched, prompt, 4) == exp

    # off by default without speculation (upstream's kernels), ...
    assert "batch-invariant" not in start_server(gemma3_gguf, "-b", "64").log_text()
    # ... on by default with it: n-gram speculation reproduces plain greedy decoding on the same kernels, both
    # on a server without speculation and with speculation off per request. ngram-mod drafts up to 64 tokens,
    # which with -b 64 must be capped at 63 (patch 0014; upstream aborts).
    ngram = start_server(gemma3_gguf, "-b", "64", "--spec-type", "ngram-mod", "--spec-adaptive")
    assert "batch-invariant CPU kernels on" in ngram.log_text()
    drafted = 0
    for prompt in [*prompts, COPY_PROMPT]:
        plain = _complete(batched, prompt, 160)["content"]
        res = _complete(ngram, prompt, 160)
        assert res["content"] == plain
        assert _complete(ngram, prompt, 160, speculative={"enabled": False})["content"] == plain
        drafted += res["timings"].get("draft_n", 0)
    assert drafted > 0


def test_request_overrides_change_draft_lengths(
    start_server: StartServer, smollm2_f16_gguf: Path, smollm2_gguf: Path
) -> None:
    server = start_server(smollm2_f16_gguf, *_draft_args(smollm2_gguf, "--spec-draft-n-max", "8"))

    # n_max 1 (nested object): every step drafts at most one token
    one = _complete(server, PROMPTS[0], speculative={"n_max": 1})
    st = _slot0(server)["speculative_stats"]
    assert st["n_steps"] > 0
    assert st["n_drafted"] <= st["n_steps"]
    assert st["n_max"] == 1
    assert one["timings"]["draft_n"] == st["n_drafted"]

    # n_max 8 (flat key): longer drafts
    eight = _complete(server, PROMPTS[0], **{"speculative.n_max": 8})
    st8 = _slot0(server)["speculative_stats"]
    assert st8["n_drafted"] > st8["n_steps"]
    assert st8["n_max"] == 8
    assert eight["content"] == one["content"]

    # a confidence cut-off and a minimum draft length are accepted and keep the output unchanged
    strict = _complete(server, PROMPTS[0], speculative={"p_min": 0.9, "n_min": 2, "n_max": 6})
    assert strict["content"] == one["content"]
    st_strict = _slot0(server)["speculative_stats"]
    assert st_strict["n_drafted"] >= 2 * st_strict["n_steps"]  # drafts shorter than n_min were discarded

    # off for one request, on again for the next (settings do not leak between requests)
    off = _complete(server, PROMPTS[0], speculative=False)
    assert off["timings"].get("draft_n", 0) == 0
    again = _complete(server, PROMPTS[0])
    assert again["timings"].get("draft_n", 0) > 0

    # the OpenAI-compatible endpoint passes the fields through
    chat = _post(
        server,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Count from 1 to 20."}],
            "max_tokens": 32,
            "temperature": 0.0,
            "speculative": {"n_max": 1},
        },
    )
    assert chat.status_code == 200, chat.text
    st_chat = _slot0(server)["speculative_stats"]
    assert st_chat["n_drafted"] <= st_chat["n_steps"]


BAD_VALUES: list[tuple[dict[str, Any], str]] = [
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


def test_bad_values_get_400(start_server: StartServer, smollm2_f16_gguf: Path, smollm2_gguf: Path) -> None:
    server = start_server(smollm2_f16_gguf, *_draft_args(smollm2_gguf, "--spec-draft-n-max", "8"))
    for extra, needle in BAD_VALUES:
        r = _post(server, "/completion", {"prompt": "Hello", "n_predict": 4, **extra})
        assert r.status_code == 400, (extra, r.text)
        message = r.json()["error"]["message"]
        assert needle in message, (extra, message)

        r = _post(
            server,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **extra},
        )
        assert r.status_code == 400, (extra, r.text)
        assert needle in r.json()["error"]["message"]

    # the limit is the server's maximum draft length
    r = _post(server, "/completion", {"prompt": "Hello", "n_predict": 4, "speculative": {"n_max": 9}})
    assert r.status_code == 400
    assert "between 0 and 8" in r.json()["error"]["message"]


def test_legacy_flags_map_with_a_warning(start_server: StartServer, smollm2_f16_gguf: Path, smollm2_gguf: Path) -> None:
    # -md alone (no --spec-type) with the removed --draft-max/--draft-min flags
    server = start_server(smollm2_f16_gguf, "-md", str(smollm2_gguf), "--draft-max", "4", "--draft-min", "1")
    log = server.log_text()
    assert "--draft/--draft-n/--draft-max is deprecated, mapped to --spec-draft-n-max 4" in log
    assert "--draft-min/--draft-n-min is deprecated, mapped to --spec-draft-n-min 1" in log
    assert "-md/--model-draft without --spec-type is deprecated" in log
    res = _complete(server, PROMPTS[0])
    assert res["timings"].get("draft_n", 0) > 0
    st = _slot0(server)["speculative_stats"]
    assert st["n_max_cap"] == 4
    server.stop()

    # the short aliases and the environment form
    server = start_server(smollm2_f16_gguf, "-md", str(smollm2_gguf), "--draft", "3", env={"LLAMA_ARG_DRAFT_MIN": "0"})
    assert "mapped to --spec-draft-n-max 3" in server.log_text()
    assert _slot0(server)["speculative_stats"]["n_max_cap"] == 3
    server.stop()

    # --no-spec-legacy-flags: the upstream behaviour (hard error)
    with pytest.raises(VelollmError, match="has been removed"):
        start_server(smollm2_f16_gguf, "-md", str(smollm2_gguf), "--draft-max", "4", "--no-spec-legacy-flags")


def test_slot_statistics(start_server: StartServer, smollm2_f16_gguf: Path, smollm2_gguf: Path) -> None:
    server = start_server(smollm2_f16_gguf, *_draft_args(smollm2_gguf, "--spec-adaptive", "--spec-adaptive-max", "12"))

    # before any request: present, zero
    st = _slot0(server)["speculative_stats"]
    assert st["n_steps"] == 0
    assert st["adaptive"] is True

    res = _complete(server, PROMPTS[0], n_predict=128)
    slot = _slot0(server)
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
    assert ad["step_ms_base"] > 0
    # the long-run rate of the chosen policy (tokens per second), positive once the policy has chosen a length
    assert ad["tokens_per_s_estimate"] > 0
    # the measured step time per drafted length: 0..cap, null where a length was not drafted within the policy's
    # memory of step times (never, or not in the last few hundred steps)
    measured = ad["step_ms_measured"]
    assert len(measured) == 12 + 1
    assert any(t is not None and t > 0 for t in measured)
    assert ad["draft_ms_per_token"] > 0
    assert len(st["acceptance_per_pos"]) <= 12
    assert all(0.0 <= p <= 1.0 for p in st["acceptance_per_pos"])

    # the response timings keep the upstream counters, and they agree with /slots
    assert res["timings"]["draft_n"] == st["n_drafted"]
    assert res["timings"]["draft_n_accepted"] == st["n_accepted"]

    # totals accumulate across requests, the per-request counters restart
    _complete(server, PROMPTS[1], n_predict=32)
    st2 = _slot0(server)["speculative_stats"]
    assert st2["n_drafted_total"] == st["n_drafted"] + st2["n_drafted"]


def test_synthetic_rates_sized_to_the_draft_maximum_work_with_adaptive(
    start_server: StartServer, smollm2_f16_gguf: Path, smollm2_gguf: Path
) -> None:
    """Upstream's benchmarking mode gives one synthetic acceptance rate per draft position up to
    --spec-draft-n-max (upstream's test_speculative does); --spec-adaptive's automatic maximum stays there when
    rates are given, so the same rates work; an explicit --spec-adaptive-max asks for that many (issue #35)."""
    rates = ",".join(["1.0"] * 8)
    synth = _draft_args(smollm2_gguf, "--spec-draft-n-max", "8", "--spec-synth-rates", rates)
    server = start_server(smollm2_f16_gguf, *synth, "--spec-adaptive")
    res = _complete(server, PROMPTS[0], n_predict=32)
    # every drafted token is accepted (a drafted end of generation would not be: code, 32 tokens, has none)
    assert 0 < res["timings"]["draft_n_accepted"] == res["timings"]["draft_n"]
    assert _slot0(server)["speculative_stats"]["n_max_cap"] == 8
    server.stop()

    with pytest.raises(VelollmError, match="must contain 12 values, one per draft position up to "
                                           "--spec-adaptive-max 12, got 8"):
        start_server(smollm2_f16_gguf, *synth, "--spec-adaptive", "--spec-adaptive-max", "12")
