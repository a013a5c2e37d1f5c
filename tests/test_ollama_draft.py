"""A Modelfile DRAFT with a classic draft model, under the exact launch of Ollama 0.30+.

Ollama passes every DRAFT that is not a DFlash model as ``--spec-type draft-mtp`` (tests/ollama_launch.py
transcribes its argument list); upstream's server then exits at load when the draft has no MTP layers. Patch
``spec-mtp-fallback`` runs such a draft as draft-simple with an adaptive length up to ``draft_num_predict``.
The target is SmolLM2-135M F32 and the draft the Q4_1 demo model (the same weights); greedy text with the draft
must be byte-identical to Ollama's launch without it, on the batch-invariant kernels that speculation turns on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import write_gguf
from velollm_patch import serve
from velollm_patch.errors import VelollmError
from velollm_patch.ollama.launch import OllamaOptions, ollama_argv, start_like_ollama

FALLBACK_LINE = "has no MTP layers: running it as a classic draft model"
# user turns as Ollama renders SmolLM2's ChatML template before it calls /completion
PROMPTS = [
    f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n" for question in (
        "Write a Python function that returns the n-th Fibonacci number, with a docstring.",
        "List five facts about the planet Mars.",
        "Translate to French: The weather is nice today and we are going to the beach.",
        "Explain in two sentences why the sky is blue.",
    )
]


def complete(server: serve.RunningServer, prompt: str) -> dict[str, Any]:
    response = server.request("POST", "/completion", json={
        "prompt": prompt, "n_predict": 64, "temperature": 0, "cache_prompt": False,
    })
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def with_env(**values: str) -> dict[str, str]:
    return {**os.environ, **values}


def test_ollama_argv_for_a_draft(tmp_path: Path) -> None:
    draft = write_gguf(tmp_path / "draft.gguf")
    argv = ollama_argv(Path("/m.gguf"), 4242, draft=draft)
    assert argv[:10] == ["--model", "/m.gguf", "--port", "4242", "--host", "127.0.0.1", "--no-webui", "--offline",
                         "-c", "4096"]
    spec = argv.index("--spec-type")
    assert argv[spec:spec + 7] == ["--spec-type", "draft-mtp", "--spec-draft-n-max", "4",
                                   "--spec-draft-backend-sampling", "--spec-draft-model", str(draft)]
    assert argv[-3:] == ["--context-shift", "--keep", "4"]
    dflash = write_gguf(tmp_path / "dflash.gguf", arch="dflash")
    assert "draft-dflash" in ollama_argv(Path("/m.gguf"), 1, draft=dflash)
    assert "--spec-draft-backend-sampling" not in ollama_argv(Path("/m.gguf"), 1, draft=dflash)
    # draft_num_predict 0 turns speculation off: no --spec-* argument at all
    off = ollama_argv(Path("/m.gguf"), 1, OllamaOptions(draft_num_predict=0), draft=draft)
    assert not any(a.startswith("--spec") for a in off)


@pytest.mark.slow
def test_a_classic_draft_runs_under_ollamas_arguments_and_changes_no_token(
    patched_server: Path, smollm2_f32_gguf: Path, smollm2_gguf: Path, tmp_path: Path,
) -> None:
    # the reference: Ollama's launch without DRAFT, on the batch-invariant kernels speculation turns on
    plain_env = with_env(LLAMA_ARG_SPEC_BATCH_INVARIANT="on")
    with start_like_ollama(patched_server, smollm2_f32_gguf, tmp_path / "plain.log",
                           ollama_environment=plain_env) as plain:
        expected = [complete(plain, p)["content"] for p in PROMPTS]

    with start_like_ollama(patched_server, smollm2_f32_gguf, tmp_path / "draft.log", draft=smollm2_gguf) as drafted:
        log = drafted.log_text()
        assert log.count(FALLBACK_LINE) == 1
        assert "adaptive draft length up to 4 tokens" in log
        results = [complete(drafted, p) for p in PROMPTS]
        slots = drafted.slots()
    assert [r["content"] for r in results] == expected
    assert all(text for text in expected)
    assert sum(r["timings"].get("draft_n_accepted", 0) for r in results) > 0
    # adaptive, and Ollama's draft_num_predict is the ceiling
    stats = slots[0]["speculative_stats"]
    assert stats["adaptive"] is True and stats["n_max_cap"] == 4


@pytest.mark.slow
def test_fixed_mode_and_draft_num_predict(patched_server: Path, smollm2_f32_gguf: Path, smollm2_gguf: Path,
                                          tmp_path: Path) -> None:
    env = with_env(LLAMA_ARG_SPEC_MTP_FALLBACK="fixed")
    with start_like_ollama(patched_server, smollm2_f32_gguf, tmp_path / "fixed.log", OllamaOptions(draft_num_predict=6),
                           draft=smollm2_gguf, ollama_environment=env) as server:
        assert "(--spec-type draft-simple, draft length 6 tokens)" in server.log_text()
        assert complete(server, PROMPTS[0])["timings"]["draft_n"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("who", ["upstream", "fallback off"])
def test_without_the_fallback_the_model_fails_to_load(
    who: str, patched_server: Path, vanilla_server: Path, smollm2_f32_gguf: Path, smollm2_gguf: Path, tmp_path: Path,
) -> None:
    server, env = (vanilla_server, None) if who == "upstream" else (patched_server,
                                                                    with_env(LLAMA_ARG_SPEC_MTP_FALLBACK="off"))
    log = tmp_path / "server.log"
    with pytest.raises(VelollmError):
        start_like_ollama(server, smollm2_f32_gguf, log, draft=smollm2_gguf, ollama_environment=env, timeout=120)
    text = log.read_text()
    assert "doesn't contain MTP layers" in text and FALLBACK_LINE not in text


@pytest.mark.slow
def test_a_draft_of_another_vocabulary_is_refused_as_upstream_does(
    patched_server: Path, smollm2_f32_gguf: Path, gemma3_gguf: Path, tmp_path: Path,
) -> None:
    # draft-simple's vocabulary check refuses the draft; upstream's server then serves without speculation
    with start_like_ollama(patched_server, smollm2_f32_gguf, tmp_path / "server.log", draft=gemma3_gguf) as server:
        log = server.log_text()
        assert FALLBACK_LINE in log and "the target and draft vocabs are not compatible" in log
        result = complete(server, PROMPTS[0])
    assert result["content"] and result["timings"].get("draft_n", 0) == 0


@pytest.mark.slow
def test_a_draft_with_mtp_layers_stays_an_mtp_draft(patched_server: Path, smollm2_f32_gguf: Path,
                                                    tmp_path: Path) -> None:
    # metadata only: the loader fails on it either way, but the fallback must leave draft-mtp in place
    mtp = write_gguf(tmp_path / "mtp-draft.gguf", extra={"llama.nextn_predict_layers": 1})
    log = tmp_path / "server.log"
    with pytest.raises(VelollmError):
        start_like_ollama(patched_server, smollm2_f32_gguf, log, draft=mtp, timeout=120)
    assert FALLBACK_LINE not in log.read_text()
