"""Which GGUFs only Ollama's compat layer loads, on files written in Ollama's old layouts and in llama.cpp's.

Each old-layout case carries the marker ``detect_ollama_<arch>`` (llama/compat/llama-ollama-compat.cpp at
ollama/ollama v0.33.0-rc2) looks for; each llama.cpp case is the same architecture as llama.cpp's converter
writes it, which the compat layer leaves alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import add_ollama_model, write_layout_gguf
from velollm_patch.ollama.compat import compat_reason, scan_stores

RMS = {"gemma3.attention.layer_norm_rms_epsilon": 1e-6}
DIMENSION_SECTIONS = {"qwen3vl.rope.dimension_sections": [24, 20, 20, 0]}

# (id, architecture, key-values, tensors (ne0 first), what the reason says; None: llama.cpp's own layout)
CASES: list[tuple[str, str, dict[str, Any], dict[str, tuple[int, ...]], str | None]] = [
    ("gemma3-no-eps", "gemma3", {}, {}, "gemma3 in Ollama's layout: no gemma3.attention.layer_norm_rms_epsilon"),
    ("gemma3-vision", "gemma3", {**RMS, "gemma3.mm.tokens_per_image": 256},
     {"token_embd.weight": (8, 4), "v.patch_embd.weight": (8, 2), "mm.input_projection.weight": (8, 8)},
     "gemma3 in Ollama's layout: embedded v.* tensors, mm.* tensors"),
    ("gemma3-rope-keys", "gemma3", {**RMS, "gemma3.rope.global.freq_base": 1e6}, {},
     "gemma3 in Ollama's layout: gemma3.rope.global.freq_base key"),
    ("gemma3-llama.cpp", "gemma3", RMS, {}, None),
    ("embeddinggemma", "gemma3", RMS, {"token_embd.weight": (8, 4), "dense.0.weight": (8, 16)},
     "gemma3 in Ollama's layout: EmbeddingGemma with dense.0/dense.1 tensors"),
    ("gemma3n", "gemma3n", {}, {"token_embd.weight": (8, 6), "per_layer_token_embd.weight": (16, 4)},
     "token_embd has 6 rows but per_layer_token_embd 4"),
    ("gemma3n-llama.cpp", "gemma3n", {}, {"token_embd.weight": (8, 4), "per_layer_token_embd.weight": (16, 4)},
     None),
    ("gemma4-audio", "gemma4", {}, {"token_embd.weight": (8, 4), "a.conv1d.0.weight": (8, 2)},
     "gemma4 in Ollama's layout: embedded a.* tensors"),
    ("gemma4-tokenizer", "gemma4", {"tokenizer.ggml.model": "llama"}, {}, "tokenizer.ggml.model llama"),
    ("gemma4-llama.cpp", "gemma4", {"tokenizer.ggml.model": "gemma4"}, {}, None),
    ("qwen35moe", "qwen35moe", {"qwen35moe.ssm.v_head_reordered": True, "qwen35moe.feed_forward_length": 64}, {},
     "qwen35moe in Ollama's layout: qwen35moe.ssm.v_head_reordered, qwen35moe.feed_forward_length keys"),
    ("qwen35-mtp", "qwen35", {}, {"token_embd.weight": (8, 4), "mtp.layers.0.fc.weight": (8, 8)},
     "qwen35 in Ollama's layout: embedded mtp.* tensors"),
    ("qwen35-llama.cpp", "qwen35", {}, {"token_embd.weight": (8, 4), "blk.0.nextn.eh_proj.weight": (8, 8)}, None),
    ("qwen3next", "qwen3next", {}, {"token_embd.weight": (8, 4), "blk.0.ssm_dt": (4,)},
     "SSM tensors named blk.0.ssm_dt (llama.cpp reads .ssm_dt.bias)"),
    ("qwen3next-llama.cpp", "qwen3next", {}, {"token_embd.weight": (8, 4), "blk.0.ssm_dt.bias": (4,)}, None),
    ("qwen3vl", "qwen3vl", {}, {}, "qwen3vl in Ollama's layout: no qwen3vl.rope.dimension_sections"),
    ("qwen3vl-llama.cpp", "qwen3vl", DIMENSION_SECTIONS, {}, None),
    ("gptoss", "gptoss", {}, {}, "gptoss in Ollama's layout: Ollama's architecture name (llama.cpp knows it as"
     " gpt-oss)"),
    ("olmo3", "olmo3", {}, {}, "llama.cpp knows it as olmo2"),
    ("qwen25vl", "qwen25vl", {}, {}, "llama.cpp knows it as qwen2vl"),
    ("glm4moelite", "glm4moelite", {}, {}, "llama.cpp knows it as deepseek2"),
    ("deepseekocr", "deepseekocr", {}, {}, "llama.cpp knows it as deepseek2-ocr"),
    ("lfm2", "lfm2", {}, {"token_embd.weight": (8, 4), "output_norm.weight": (8,)},
     "output_norm.weight where llama.cpp reads token_embd_norm.weight"),
    ("lfm2-llama.cpp", "lfm2", {}, {"token_embd.weight": (8, 4), "token_embd_norm.weight": (8,)}, None),
    ("mistral3", "mistral3", {"mistral3.rope.scaling.beta_fast": 32.0}, {},
     "mistral3 in Ollama's layout: mistral3.rope.scaling.beta_fast key"),
    ("mistral3-llama.cpp", "mistral3", {"mistral3.rope.scaling.yarn_beta_fast": 32.0}, {}, None),
    ("laguna", "laguna", {}, {"token_embd.weight": (8, 4), "blk.0.attn_g.weight": (8, 8)},
     "attention gates named attn_g"),
    ("nemotron_h_moe", "nemotron_h_moe", {}, {"token_embd.weight": (8, 4), "blk.0.ffn_latent_in.weight": (8, 4)},
     "latent FFN tensors named ffn_latent_in/out"),
    ("nemotron_h_omni", "nemotron_h_omni", {}, {"token_embd.weight": (8, 4), "a.blk.0.weight": (8, 4)},
     "embedded a.* tensors"),
    ("llama4", "llama4", {}, {"token_embd.weight": (8, 4), "v.blk.0.attn_q.weight": (8, 8)},
     "llama4 in Ollama's layout: embedded v.* tensors"),
    ("llama4-llama.cpp", "llama4", {}, {}, None),
    ("snowflake-arctic-embed2", "bert", {"tokenizer.ggml.model": "t5",
                                         "tokenizer.ggml.precompiled_charsmap": list("AAEC")}, {},
     "tokenizer.ggml.precompiled_charsmap stored as base64 strings"),
    ("llava-projector", "clip", {"clip.has_vision_encoder": True}, {"v.patch_embd.weight": (8, 4)},
     "clip in Ollama's layout: a LLaVA projector without clip.projector_type"),
    ("llava-projector-llama.cpp", "clip", {"clip.has_vision_encoder": True, "clip.projector_type": "mlp"},
     {"v.patch_embd.weight": (8, 4)}, None),
]


@pytest.mark.parametrize(("arch", "kv", "tensors", "expected"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_compat_markers(tmp_path: Path, arch: str, kv: dict[str, Any], tensors: dict[str, tuple[int, ...]],
                        expected: str | None) -> None:
    path = write_layout_gguf(tmp_path / "model.gguf", arch, kv, tensors or None)
    reason = compat_reason(path)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason and reason.startswith(f"{arch} in Ollama's layout: ")


def llama3_tokens(n: int = 128256) -> list[str]:
    tokens = [f"t{i}" for i in range(n)]
    tokens[128001], tokens[128006], tokens[128009] = "<|end_of_text|>", "<|start_header_id|>", "<|eot_id|>"
    return tokens


@pytest.mark.parametrize(("kv", "expected"), [
    ({}, "Llama 3 chat vocabulary with no tokenizer.ggml.pre: llama-server would not stop at <|eot_id|>"),
    ({"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.eos_token_id": 128001},
     "Llama 3 chat vocabulary with EOS <|end_of_text|>"),
    ({"tokenizer.ggml.pre": "default", "tokenizer.ggml.eos_token_id": 128009}, "with no tokenizer.ggml.pre"),
    ({"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.eos_token_id": 128009}, None),  # llama.cpp's converter
], ids=["no-pre", "eos-end-of-text", "default-pre", "llama.cpp"])
def test_llama3_metadata_gap(tmp_path: Path, kv: dict[str, Any], expected: str | None) -> None:
    path = write_layout_gguf(tmp_path / "llama3.gguf", "llama", {"tokenizer.ggml.model": "gpt2", **kv},
                             tokens=llama3_tokens())
    reason = compat_reason(path)
    assert (reason is None) if expected is None else (reason is not None and expected in reason)


def test_a_small_llama_vocabulary_is_not_llama3(tmp_path: Path) -> None:
    path = write_layout_gguf(tmp_path / "small.gguf", "llama", {}, tokens=[f"t{i}" for i in range(100)])
    assert compat_reason(path) is None


def test_scan_store(tmp_path: Path) -> None:
    store = tmp_path / "models"
    add_ollama_model(store, "library/gemma3:4b", model=write_layout_gguf(tmp_path / "a.gguf", "gemma3"))
    add_ollama_model(store, "library/gemma3:270m", model=write_layout_gguf(tmp_path / "b.gguf", "gemma3", RMS))
    add_ollama_model(store, "library/llava:7b", model=write_layout_gguf(tmp_path / "c.gguf", "llama"),
              projector=write_layout_gguf(tmp_path / "d.gguf", "clip", {"clip.has_vision_encoder": True}))
    add_ollama_model(store, "someone/mine:latest", model=write_layout_gguf(tmp_path / "e.gguf", "gptoss"))
    broken = tmp_path / "f.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00")
    add_ollama_model(store, "library/broken:latest", model=broken)
    scan = scan_stores([store, tmp_path / "missing-store"])
    assert [(m.name, m.reason.split(":")[0]) for m in scan.needs_compat] == [
        ("gemma3:4b", "gemma3 in Ollama's layout"), ("llava:7b (projector)", "clip in Ollama's layout"),
        ("someone/mine:latest", "gptoss in Ollama's layout")]
    assert len(scan.unreadable) == 1 and scan.unreadable[0].startswith("broken:latest (") and "truncated" in \
        scan.unreadable[0]
