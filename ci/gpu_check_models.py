"""The models of the GPU check, written with the ``gguf`` package, no network and no llama.cpp tools needed.

* :func:`write_synthetic_llama`: a llama-architecture model of a real 7-8B shape (32 layers, 4096 wide, 32
  heads over 8 KV heads, 14336 FFN) with random weights, written as Q4_0 blocks straight from numpy. Random
  weights are as fast and as large as trained ones, which is all a speed and memory check needs; the
  tokenizer (and chat template) is copied from a real model, so prompts tokenize as they would.
* :func:`truncate_requantize`: a real model cut to its first layers and re-quantized, small enough to travel
  to a machine with no network inside the working tree's size limit.
* :func:`dequantize_to_f16`: the same weights at F16, the target of a draft-model speculation whose draft is
  the quantized file (the pairing ``bench/spec_decode.py`` uses: same weights, so drafts are often accepted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    quants,
)

Q4_0 = GGMLQuantizationType.Q4_0
Q4_0_BLOCK_VALUES, Q4_0_BLOCK_BYTES = GGML_QUANT_SIZES[Q4_0]
# Q4_0 stores a weight as (q - 8) * d with q a 4-bit code: uniform codes have a standard deviation of ~4.6 d.
Q4_0_CODE_STD = 4.61
# Keys the writer sets itself, or that describe the file rather than the model.
_WRITER_KEYS = ("GGUF.", "general.architecture", "general.file_type")


@dataclass(frozen=True)
class LlamaShape:
    """The hyperparameters that size a llama model (the vocabulary comes with the tokenizer)."""

    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    rope_freq_base: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def parameters(self, n_vocab: int) -> int:
        kv = self.n_head_kv * self.head_dim
        per_layer = 2 * self.n_embd * self.n_embd + 2 * self.n_embd * kv + 3 * self.n_embd * self.n_ff + 2 * self.n_embd
        return self.n_layers * per_layer + 2 * n_vocab * self.n_embd + self.n_embd


# Llama-3-8B's shape (with the tokenizer's vocabulary instead of its 128K one) and its 128K trained context.
SHAPE_8B = LlamaShape(n_layers=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_ctx_train=131072)
SHAPES = {
    "8b": SHAPE_8B,
    # the same widths with 4 layers: what 2 CPU cores can load and answer in seconds
    "8b-4layers": replace(SHAPE_8B, n_layers=4, n_ctx_train=32768),
    # for tests: every code path, a few MiB
    "tiny": LlamaShape(n_layers=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_ctx_train=4096),
}


def tokenizer_fields(reader: GGUFReader) -> Iterator[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
    """``tokenizer.*`` key-value pairs of a GGUF as (key, value, type, array element type)."""
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            yield _field_entry(field)


def _field_entry(field: Any) -> tuple[str, Any, GGUFValueType, GGUFValueType | None]:
    vtype = field.types[0]
    sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
    return field.name, field.contents(), vtype, sub_type


def _vocab_size(reader: GGUFReader) -> int:
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError("the tokenizer source has no tokenizer.ggml.tokens")
    return len(tokens.data)


def _q4_0_pool(rng: np.random.Generator, n_blocks: int, scale: float) -> np.ndarray:
    """``n_blocks`` Q4_0 blocks with random codes and the scale ``scale``: the bytes every tensor of that
    fan-in is cut from (a view each, so a 4 GiB model needs a few hundred MiB of memory to write)."""
    pool = np.empty((n_blocks, Q4_0_BLOCK_BYTES), dtype=np.uint8)
    pool[:, :2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    pool[:, 2:] = rng.integers(0, 256, size=(n_blocks, Q4_0_BLOCK_BYTES - 2), dtype=np.uint8)
    return pool


def write_synthetic_llama(path: Path, shape: LlamaShape, tokenizer_from: Path, *, seed: int = 0) -> Path:
    """Write a Q4_0 llama model of ``shape`` with random weights and the tokenizer of ``tokenizer_from``."""
    for width in (shape.n_embd, shape.n_ff):
        if width % Q4_0_BLOCK_VALUES:
            raise ValueError(f"Q4_0 rows hold multiples of {Q4_0_BLOCK_VALUES} values; {width} is not one")
    source = GGUFReader(tokenizer_from)
    n_vocab = _vocab_size(source)
    kv_width = shape.n_head_kv * shape.head_dim
    # (name, rows, fan-in) of every matrix, in file order
    matrices = [("token_embd", n_vocab, shape.n_embd), ("output", n_vocab, shape.n_embd)]
    for i in range(shape.n_layers):
        matrices += [
            (f"blk.{i}.attn_q", shape.n_embd, shape.n_embd), (f"blk.{i}.attn_k", kv_width, shape.n_embd),
            (f"blk.{i}.attn_v", kv_width, shape.n_embd), (f"blk.{i}.attn_output", shape.n_embd, shape.n_embd),
            (f"blk.{i}.ffn_gate", shape.n_ff, shape.n_embd), (f"blk.{i}.ffn_up", shape.n_ff, shape.n_embd),
            (f"blk.{i}.ffn_down", shape.n_embd, shape.n_ff),
        ]  # fmt: skip
    rng = np.random.default_rng(seed)
    # Weights of standard deviation 1/sqrt(fan-in) keep activations near unit size through every layer. A pool
    # per fan-in, twice its largest matrix, so that matrices cut at random offsets differ.
    most_rows: dict[int, int] = {}
    for _, rows, fan_in in matrices:
        most_rows[fan_in] = max(rows, most_rows.get(fan_in, 0))
    pools = {
        fan_in: _q4_0_pool(rng, 2 * rows * fan_in // Q4_0_BLOCK_VALUES, 1.0 / (Q4_0_CODE_STD * fan_in**0.5))
        for fan_in, rows in sorted(most_rows.items())
    }

    def matrix(rows: int, fan_in: int) -> np.ndarray:
        n_blocks = rows * fan_in // Q4_0_BLOCK_VALUES
        start = int(rng.integers(0, len(pools[fan_in]) - n_blocks + 1))  # matrices differ, layers too
        return pools[fan_in][start:start + n_blocks].reshape(rows, -1)

    ones = np.ones(shape.n_embd, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    writer = GGUFWriter(tmp, "llama")
    writer.add_name(f"synthetic llama {shape.n_layers}x{shape.n_embd} (random weights)")
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_0)
    writer.add_block_count(shape.n_layers)
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_freq_base)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    for key, value, vtype, sub_type in tokenizer_fields(source):
        writer.add_key_value(key, value, vtype, sub_type)
    for name, rows, fan_in in matrices:
        writer.add_tensor(f"{name}.weight", matrix(rows, fan_in), raw_dtype=Q4_0)
    writer.add_tensor("output_norm.weight", ones)
    for i in range(shape.n_layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
    _write(writer)
    tmp.replace(path)
    return path


def _write(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else None


def _rewrite(
    src: Path, dst: Path, *, n_layers: int | None, file_type: LlamaFileType, name_suffix: str,
    convert: Callable[[np.ndarray, GGMLQuantizationType], tuple[np.ndarray, GGMLQuantizationType | None]],
) -> Path:
    """Copy ``src`` to ``dst``: every key but the layer count (``n_layers``, when given) and the file type,
    every tensor of the first ``n_layers`` layers and outside them, each through ``convert``."""
    reader = GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    layers_key = f"{arch}.block_count"
    kept_layers = int(reader.fields[layers_key].contents())
    if n_layers is not None:
        if not 1 <= n_layers <= kept_layers:
            raise ValueError(f"{src.name} has {kept_layers} layers; cannot keep {n_layers}")
        kept_layers = n_layers
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    writer = GGUFWriter(tmp, arch)
    writer.add_file_type(file_type)
    for field in reader.fields.values():
        if field.name.startswith(_WRITER_KEYS):
            continue
        key, value, vtype, sub_type = _field_entry(field)
        if key == layers_key:
            value = kept_layers
        elif key == "general.name":
            value = f"{value} {name_suffix}"
        writer.add_key_value(key, value, vtype, sub_type)
    for tensor in reader.tensors:
        layer = _layer(tensor.name)
        if layer is not None and layer >= kept_layers:
            continue
        data, raw_type = convert(np.asarray(tensor.data), tensor.tensor_type)
        writer.add_tensor(tensor.name, data, raw_dtype=raw_type)
    _write(writer)
    tmp.replace(dst)
    return dst


def truncate_requantize(src: Path, dst: Path, n_layers: int) -> Path:
    """The first ``n_layers`` layers of ``src``, its quantized matrices re-quantized to Q4_0 (4.5 bits a
    weight, the smallest type llama.cpp takes for rows that are not a multiple of 256)."""

    def to_q4_0(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType | None]:
        if qtype in (GGMLQuantizationType.F32, Q4_0) or data.ndim < 2:
            return data, qtype
        return quants.quantize(quants.dequantize(data, qtype), Q4_0), Q4_0

    return _rewrite(src, dst, n_layers=n_layers, file_type=LlamaFileType.MOSTLY_Q4_0,
                    name_suffix=f"(first {n_layers} layers, Q4_0)", convert=to_q4_0)


def dequantize_to_f16(src: Path, dst: Path) -> Path:
    """``src`` with every quantized matrix stored as F16 (norms stay F32)."""

    def to_f16(data: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType | None]:
        if qtype == GGMLQuantizationType.F32:
            return data, qtype
        return quants.dequantize(data, qtype).astype(np.float16), None

    return _rewrite(src, dst, n_layers=None, file_type=LlamaFileType.MOSTLY_F16, name_suffix="(F16)", convert=to_f16)


def q4_0_layers_that_fit(src: Path, budget_bytes: int) -> int:
    """How many layers of ``src`` fit in ``budget_bytes`` once re-quantized to Q4_0 (header and norms
    counted roughly: the file is measured after writing anyway)."""
    reader = GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    n_layers = int(reader.fields[f"{arch}.block_count"].contents())
    shared = 0
    per_layer = [0] * n_layers
    for tensor in reader.tensors:
        values = int(np.prod([int(n) for n in tensor.shape]))
        size = values * 4 if tensor.tensor_type == GGMLQuantizationType.F32 else (
            values // Q4_0_BLOCK_VALUES * Q4_0_BLOCK_BYTES)
        layer = _layer(tensor.name)
        if layer is None:
            shared += size
        else:
            per_layer[layer] += size
    header = 4 * 1024 * 1024  # the tokenizer's strings and merges, with room to spare
    used = shared + header
    fits = 0
    for size in per_layer:
        if used + size > budget_bytes:
            break
        used += size
        fits += 1
    return fits
