"""KV cache types: the names llama-server accepts for -ctk/-ctv (and Ollama passes on from OLLAMA_KV_CACHE_TYPE),
their block sizes, and the rule that a quantized type's block must divide the head size (docs/llama-cpp.md, KV
types and flash attention)."""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from velollm_patch.errors import VelollmError

# common/arg.cpp kv_cache_types.
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
_UNQUANTIZED = ("f32", "f16", "bf16")


def is_quantized(kv_type: str) -> bool:
    return kv_type not in _UNQUANTIZED


def kv_block(kv_type: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a KV cache type."""
    key = kv_type.lower()
    if key not in KV_CACHE_TYPES:
        raise VelollmError(f"unknown KV cache type '{kv_type}'; choose one of {', '.join(KV_CACHE_TYPES)}")
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[key.upper()]]
    return int(block), int(size)


def head_size_mismatch(head_k: int, head_v: int, type_k: str, type_v: str) -> tuple[str, int, int] | None:
    """("K" or "V", head size, block size) of the first head size its cache type's block does not divide, which
    llama_init_from_model refuses; None when both fit."""
    for which, size, kv_type in (("K", head_k, type_k), ("V", head_v, type_v)):
        block = kv_block(kv_type)[0]
        if size % block:
            return which, size, block
    return None
