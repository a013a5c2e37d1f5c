"""What a GGUF file says about a model as llama.cpp reads it: shape, vocabulary, and KV-cache sizing.

GGUF headers are parsed here with the ``gguf`` package's constants rather than with
``gguf.GGUFReader``. The reader turns every array element into a numpy object up front (3.4 s for
SmolLM2's 49k-token vocabulary, 19 s for Gemma 3's 262k) and trusts the counts it reads, so one
corrupt count makes it spin for a very long time or index past the end of the file. This parser walks
the same format, checks every count and length against the bytes left in the file before it uses
them, and only records where big arrays (token texts, merges, scores) are; token texts are read
when a draft compatibility check needs them.

The rules mirror the pinned llama.cpp tree (docs/llama-cpp.md, KV sizing and Speculative decoding): KV sizing
follows ``llama_context`` / ``llama_kv_cache_iswa``, the SWA layer pattern follows
``load_swa_pattern`` and vocabulary defaults follow ``llama_vocab::impl::load``, which the draft check
(:mod:`velollm_patch.drafts`) compares.
"""

from __future__ import annotations

import functools
import math
import mmap
import re
import stat
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from velollm_patch.errors import VelollmError, plain
from velollm_patch.kv_types import KV_CACHE_TYPES, head_size_mismatch, is_quantized, kv_block

# Limits llama.cpp itself enforces (ggml/src/gguf.cpp, src/llama-hparams.h); a file beyond them
# would not load there either, so they are safe bounds against crafted counts.
_MAX_STRING_LENGTH = 1 << 30
_MAX_ARRAY_ELEMENTS = 1 << 30
_MAX_DIMS = 4
_MAX_TENSOR_NAME = 64
# Ours, not llama.cpp's (it reads keys up to _MAX_STRING_LENGTH): real keys are dotted identifiers of a few
# dozen bytes, so a longer one is a corrupt length field, refused before its bytes are copied.
_MAX_KEY_LENGTH = 1 << 16
# llama.cpp's architecture names (LLM_ARCH_NAMES in src/llama-arch.cpp) are short lowercase words; the name
# prefixes the keys read below and is shown by `inspect`, so a garbled one is refused here.
_ARCH_NAME = re.compile(r"[a-z0-9][a-z0-9._+-]{0,63}")
_MAX_LAYERS = 512
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# Numeric arrays up to this length (per-layer values, SWA patterns) are kept as tuples; longer
# ones (token types, scores) are only located, since nothing here reads them.
_MAX_INLINE_ARRAY = _MAX_LAYERS * 8

_SCALAR_FORMATS: dict[int, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}

# Cells are allocated in multiples of this (GGML_PAD(n_ctx, 256) in llama_context).
KV_CELL_PAD = 256


@dataclass(frozen=True)
class _SwaDefault:
    pattern: int
    dense_first: bool = False
    window: int = 0


# Architectures whose llama.cpp loader calls load_swa_pattern(ml, pattern, dense_first) once a
# sliding window is set: an explicit `{arch}.attention.sliding_window_pattern` (bool per layer, or
# a period) wins, otherwise this default applies. With period n and dense_first false, layer il
# is SWA unless il % n == n - 1, so gemma3 (n=6) has a global layer every 6th layer (5, 11, ...).
# gemma2 is the one that assumes a window when the key is missing. Architectures with bespoke
# rules (llama4 chunked attention, exaone4, gemma4, ...) and unknown ones are treated as having
# no SWA layers unless the file carries a pattern, which over-estimates their KV, never under.
_SWA_DEFAULTS: dict[str, _SwaDefault] = {
    "gemma2": _SwaDefault(2, window=4096),
    "gemma3": _SwaDefault(6),
    "gemma3n": _SwaDefault(5),
    "gemma-embedding": _SwaDefault(6),
    "cohere2": _SwaDefault(4),
    "cohere2moe": _SwaDefault(4, dense_first=True),
    "olmo2": _SwaDefault(4),
    "gpt-oss": _SwaDefault(2),
    "mellum": _SwaDefault(4),
    "plamo3": _SwaDefault(8),
    "afmoe": _SwaDefault(4),
    "laguna": _SwaDefault(4, dense_first=True),
    "muse-glimmer": _SwaDefault(4),
}

# tokenizer.ggml.model -> llama_vocab_type name (llama_vocab::impl::load).
_VOCAB_TYPES = {
    "no_vocab": "NONE",
    "none": "NONE",
    "llama": "SPM",
    "bert": "WPM",
    "gpt2": "BPE",
    "hybriddna": "BPE",
    "whitespace": "BPE",
    "gemma4": "BPE",
    "t5": "UGM",
    "rwkv": "RWKV",
    "plamo2": "PLAMO2",
    "test": "TEST",
}
# (bos, eos) defaults before tokenizer.ggml.*_token_id override them; -1 is LLAMA_TOKEN_NULL.
_SPECIAL_DEFAULTS = {
    "NONE": (-1, -1),
    "SPM": (1, 2),
    "WPM": (101, -1),
    "BPE": (11, 11),
    "UGM": (-1, 1),
    "RWKV": (-1, -1),
    "PLAMO2": (1, 2),
    "TEST": (-1, -1),
}
# (add_bos, add_eos) defaults per vocab type; BPE depends on the pre-tokenizer (below).
_ADD_DEFAULTS = {
    "SPM": (True, False),
    "WPM": (True, False),
    "UGM": (False, True),
}
_BPE_PRE_ADD_BOS = frozenset(
    {
        "llama3",
        "llama-v3",
        "llama-bpe",
        "falcon3",
        "falcon-h1",
        "pixtral",
        "midm-2.0",
        "lfm2",
        "jina-v5-nano",
        "tekken",
        "chameleon",
    }
)
_BPE_PRE_NO_BOS = frozenset({"chatglm-bpe", "glm4", "glm5"})
# Gemma 4 pre-tokenizers force add_bos on even when the file says otherwise (llama.cpp PR #21500).
_BPE_PRE_FORCE_BOS = frozenset({"gemma4", "granite-embed-multi-311m"})


# --------------------------------------------------------------------------------------------
# GGUF parsing
# --------------------------------------------------------------------------------------------


# Details name keys and tensors through plain(), so they stay short; this caps the rest of the sentence.
_DETAIL_LIMIT = 400


class _FormatError(Exception):
    """A structural problem; ``predicate`` completes "<path> ..." in the user-facing message."""

    predicate = "is corrupt"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = plain(detail, _DETAIL_LIMIT)


class _Truncated(_FormatError):
    predicate = "is truncated"


class _BadMagic(_FormatError):
    predicate = "is not a GGUF file (bad magic)"


class _Unsupported(_FormatError):
    predicate = "uses an unsupported GGUF version"


@dataclass(frozen=True)
class _ArrayRef:
    """Where a large array lives in the file, so it can be read on demand (only token texts are)."""

    offset: int
    count: int
    elem_type: int


_Value = int | float | bool | str | tuple[Any, ...] | _ArrayRef


@dataclass(frozen=True)
class _Tensor:
    name: str
    ggml_type: int
    n_elements: int
    n_bytes: int
    offset: int
    dims: tuple[int, ...]


@dataclass(frozen=True)
class _Header:
    version: int
    byte_order: str
    fields: dict[str, _Value]
    tensors: list[_Tensor]
    file_size: int
    mtime_ns: int


class _Reader:
    """Sequential reads over a mapped file that never step past its end."""

    def __init__(self, buf: mmap.mmap, byte_order: str, pos: int) -> None:
        self.buf = buf
        self.size = len(buf)
        self.order = byte_order
        self.pos = pos

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _Truncated(f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size}")

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        s = struct.Struct(self.order + fmt)
        self.need(s.size, what)
        values = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return values

    def u32(self, what: str) -> int:
        return int(self.unpack("I", what)[0])

    def u64(self, what: str) -> int:
        return int(self.unpack("Q", what)[0])

    def count(self, what: str, min_item_size: int) -> int:
        return self.check_count(self.u64(f"{what} count"), what, min_item_size)

    def check_count(self, n: int, what: str, min_item_size: int, limit: int = _MAX_ARRAY_ELEMENTS) -> int:
        """Prove the remaining bytes could hold ``n`` elements, so a loop over them is bounded by
        the file size and never allocates more than the file could describe."""
        if n > limit:
            raise _FormatError(f"{what} declares {n} entries (at most {limit} are allowed)")
        needed = n * min_item_size
        if needed > self.size - self.pos:
            raise _Truncated(
                f"{what} declares {n} entries, which need at least {needed} bytes, "
                f"but only {self.size - self.pos} remain"
            )
        return n

    def string(self, what: str, limit: int = _MAX_STRING_LENGTH) -> bytes:
        n = self.u64(f"{what} length")
        if n > limit:
            raise _FormatError(f"{what} declares a length of {n} bytes (at most {limit} are allowed)")
        self.need(n, what)
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data


def _text(data: bytes) -> str:
    # llama.cpp does not validate UTF-8; replacing bad bytes keeps such files readable here too.
    return data.decode("utf-8", errors="replace")


def _type_name(vtype: int) -> str:
    try:
        return str(GGUFValueType(vtype).name).lower()
    except ValueError:
        return f"type {vtype}"


def _read_value(r: _Reader, vtype: int, key: str) -> _Value:
    """The value of type ``vtype`` at the reader's position; ``key`` (already through plain()) names it in errors."""
    if vtype == GGUFValueType.STRING:
        return _text(r.string(f"value of '{key}'"))
    fmt = _SCALAR_FORMATS.get(vtype)
    if fmt is not None:
        value = r.unpack(fmt, f"value of '{key}'")[0]
        return bool(value) if vtype == GGUFValueType.BOOL else value
    if vtype != GGUFValueType.ARRAY:
        raise _FormatError(f"key '{key}' has unknown value type {vtype}")
    elem_type = r.u32(f"element type of '{key}'")
    if elem_type == GGUFValueType.STRING:
        count = r.count(f"array '{key}'", 8)
        offset = r.pos
        # Token and merge lists hold up to a million strings, so this loop avoids the generic reads.
        unpack_length = struct.Struct(r.order + "Q").unpack_from
        for i in range(count):
            r.need(8, f"length of '{key}'[{i}]")
            (n,) = unpack_length(r.buf, r.pos)
            if n > _MAX_STRING_LENGTH:
                raise _FormatError(f"'{key}'[{i}] declares a length of {n} bytes")
            r.pos += 8 + n
            if r.pos > r.size:
                raise _Truncated(f"'{key}'[{i}] ends at byte {r.pos} but the file ends at byte {r.size}")
        return _ArrayRef(offset, count, elem_type)
    elem_fmt = _SCALAR_FORMATS.get(elem_type)
    if elem_fmt is None:
        # llama.cpp has no nested arrays either.
        raise _FormatError(f"array '{key}' has unsupported element type {_type_name(elem_type)}")
    item = struct.calcsize(elem_fmt)
    count = r.count(f"array '{key}'", item)
    offset = r.pos
    if count > _MAX_INLINE_ARRAY:
        r.pos += count * item
        return _ArrayRef(offset, count, elem_type)
    values = r.unpack(f"{count}{elem_fmt}", f"array '{key}'")
    if elem_type == GGUFValueType.BOOL:
        return tuple(bool(v) for v in values)
    return values


def _parse_tensor_infos(r: _Reader, declared: int) -> list[_Tensor]:
    # Smallest possible tensor info: empty name (8), n_dims (4), type (4), offset (8).
    n_tensors = r.check_count(declared, "tensor list", 24)
    tensors: list[_Tensor] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = _text(r.string(f"name of tensor {i}", _MAX_TENSOR_NAME - 1))
        if name in seen:
            raise _FormatError(f"tensor '{name}' appears twice")
        seen.add(name)
        n_dims = r.u32(f"dimension count of tensor '{name}'")
        if n_dims > _MAX_DIMS:
            raise _FormatError(f"tensor '{name}' has {n_dims} dimensions (at most {_MAX_DIMS})")
        dims = r.unpack(f"{n_dims}Q", f"shape of tensor '{name}'")
        if any(d >= 1 << 63 for d in dims):
            raise _FormatError(f"tensor '{name}' has a negative dimension")
        raw_type = r.u32(f"type of tensor '{name}'")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise _FormatError(f"tensor '{name}' has unknown ggml type {raw_type}") from None
        if dims and dims[0] % block != 0:
            raise _FormatError(f"tensor '{name}' rows of {dims[0]} values do not fit {block}-value blocks")
        n_elements = math.prod(dims)
        if n_elements >= 1 << 63:
            raise _FormatError(f"tensor '{name}' has {n_elements} elements")
        offset = r.u64(f"data offset of tensor '{name}'")
        tensors.append(_Tensor(name, raw_type, n_elements, n_elements // block * type_size, offset, tuple(dims)))
    return tensors


def _check_tensor_data(tensors: list[_Tensor], data_start: int, alignment: int, file_size: int) -> None:
    # gguf.cpp requires tensors laid out back to back, each padded to the alignment.
    expected = 0
    for t in tensors:
        if t.offset != expected:
            raise _FormatError(f"tensor '{t.name}' has data offset {t.offset}, expected {expected}")
        expected += _pad(t.n_bytes, alignment)
    for t in tensors:
        end = data_start + t.offset + t.n_bytes
        if end > file_size:
            raise _Truncated(f"data of tensor '{t.name}' ends at byte {end} but the file has {file_size} bytes")


def _parse_header(buf: mmap.mmap, file_size: int, mtime_ns: int) -> _Header:
    raw_version = struct.unpack_from("<I", buf, 4)[0]
    byte_order = "<"
    # A version whose low half is zero is a file written on a big-endian host (as GGUFReader reads it).
    if raw_version & 0xFFFF == 0:
        byte_order = ">"
        raw_version = struct.unpack_from(">I", buf, 4)[0]
    if raw_version == 1:
        raise _Unsupported("GGUF v1 is no longer read by llama.cpp; re-convert the model")
    if raw_version not in _SUPPORTED_VERSIONS:
        raise _Unsupported(f"version {raw_version} (supported: 2 and 3)")
    r = _Reader(buf, byte_order, 8)
    # The tensor count comes first but can only be checked against what follows the key-values.
    n_tensors = r.u64("tensor count")
    # Smallest possible key-value: empty key (8), type (4), one-byte value.
    n_kv = r.count("key-value list", 13)
    fields: dict[str, _Value] = {}
    for i in range(n_kv):
        key = _text(r.string(f"key {i}", _MAX_KEY_LENGTH))
        if not key:
            raise _FormatError(f"key {i} is empty")
        shown = plain(key)
        if key in fields:
            raise _FormatError(f"key '{shown}' appears twice")
        vtype = r.u32(f"type of '{shown}'")
        fields[key] = _read_value(r, vtype, shown)
    tensors = _parse_tensor_infos(r, n_tensors)
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0:
        raise _FormatError(f"general.alignment is {alignment!r}")
    if alignment & (alignment - 1):
        raise _FormatError(f"general.alignment {alignment} is not a power of two")
    if tensors:
        _check_tensor_data(tensors, _pad(r.pos, alignment), alignment, file_size)
    return _Header(raw_version, byte_order, fields, tensors, file_size, mtime_ns)


def _pad(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


_LFS_POINTER = b"version https://git-lfs"


def _read_header(path: Path) -> _Header:
    """Parse ``path``'s GGUF header, turning every way it can fail into a one-line VelollmError."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VelollmError(f"model file {path} not found") from None
    except OSError as e:
        raise VelollmError(f"cannot read {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise VelollmError(f"{path} is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise VelollmError(f"{path} is not a regular file")
    try:
        with path.open("rb") as f:
            head = f.read(len(_LFS_POINTER))
            if not head.startswith(b"GGUF"):
                raise _BadMagic(_describe_start(head))
            if len(head) < 8:
                raise _Truncated(f"the file has only {len(head)} bytes")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_header(buf, st.st_size, st.st_mtime_ns)
    except _FormatError as e:
        raise VelollmError(f"{path} {e.predicate}: {e.detail}") from None
    except OSError as e:
        raise VelollmError(f"cannot read {path}: {e.strerror or e}") from None


def _describe_start(head: bytes) -> str:
    if not head:
        return "the file is empty"
    # A common way to end up with a "model" of a few hundred bytes: a clone without git-lfs.
    if head == _LFS_POINTER:
        return "it is a Git LFS pointer; fetch the real file with `git lfs pull`"
    return f"it starts with {head[:4]!r} instead of b'GGUF'"


class _Meta:
    """Typed access to header fields; a value of the wrong type is a corrupt file."""

    def __init__(self, fields: dict[str, _Value]) -> None:
        self.fields = fields

    def _wrong(self, key: str, expected: str) -> _FormatError:
        value = self.fields[key]
        got = "array" if isinstance(value, tuple | _ArrayRef) else type(value).__name__
        return _FormatError(f"key '{plain(key)}' is {got}, expected {expected}")

    def uint(self, key: str, default: int | None = None) -> int:
        value = self.fields.get(key)
        if value is None:
            if default is None:
                raise _FormatError(f"required key '{plain(key)}' is missing")
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(key, "an integer")
        if value < 0:
            raise _FormatError(f"key '{plain(key)}' is negative ({value})")
        return value

    def per_layer(self, key: str, n_layers: int, default: tuple[int, ...]) -> tuple[int, ...]:
        """A per-layer value stored either once for all layers or as one entry per layer."""
        value = self.fields.get(key)
        if not isinstance(value, tuple):
            return (self.uint(key),) * n_layers if value is not None else default
        if len(value) != n_layers:
            raise _FormatError(f"key '{plain(key)}' has {len(value)} entries for {n_layers} layers")
        if any(isinstance(v, bool | float) or v < 0 for v in value):
            raise self._wrong(key, "non-negative integers")
        return tuple(int(v) for v in value)

    def string(self, key: str) -> str | None:
        value = self.fields.get(key)
        if value is not None and not isinstance(value, str):
            raise self._wrong(key, "a string")
        return value

    def flag(self, key: str) -> bool | None:
        value = self.fields.get(key)
        if value is not None and not isinstance(value, bool):
            raise self._wrong(key, "a bool")
        return value

    def number(self, key: str) -> float | None:
        value = self.fields.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong(key, "a number")
        return float(value)


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TokenSource:
    path: Path
    offset: int
    count: int
    byte_order: str
    file_size: int
    mtime_ns: int


@functools.lru_cache(maxsize=4)
def _read_token_texts(src: _TokenSource) -> tuple[bytes, ...]:
    # Cached because a draft search compares every candidate against the same target vocabulary.
    try:
        st = src.path.stat()
        if (st.st_size, st.st_mtime_ns) != (src.file_size, src.mtime_ns):
            raise VelollmError(f"{src.path} changed after it was inspected; run the command again")
        with src.path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            length = struct.Struct(src.byte_order + "Q")
            pos = src.offset
            texts: list[bytes] = []
            for i in range(src.count):
                (n,) = length.unpack_from(buf, pos)
                raw = buf[pos + 8 : pos + 8 + n]
                pos += 8 + n
                # llama.cpp builds token texts from C strings and renames empty ones
                # (llama_vocab::impl::load), so compare exactly what it would compare.
                text = raw.split(b"\0", 1)[0]
                texts.append(text or b"[EMPTY_%d]" % i)
            return tuple(texts)
    except (OSError, struct.error) as e:
        raise VelollmError(f"cannot read the token list of {src.path}: {e}") from None


@dataclass(frozen=True)
class VocabInfo:
    """The vocabulary as llama.cpp sees it once loaded: defaults per tokenizer type, then the
    file's overrides (llama_vocab::impl::load)."""

    model: str
    """``tokenizer.ggml.model``: llama, gpt2, t5, ..."""
    pre: str | None
    type: str
    """llama.cpp's vocab type: SPM, BPE, WPM, UGM, RWKV, PLAMO2, TEST, NONE, or "unknown"."""
    n_tokens: int
    bos_id: int
    """-1 when the model has no BOS token."""
    eos_id: int
    add_bos: bool
    add_eos: bool
    _tokens: _TokenSource | None = field(default=None, repr=False, compare=False)

    def token_texts(self) -> tuple[bytes, ...]:
        """Token texts as raw bytes, read from the file on first use."""
        if self._tokens is None:
            raise VelollmError(f"the {self.type} vocabulary has no token list")
        return _read_token_texts(self._tokens)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "pre": self.pre,
            "type": self.type,
            "n_tokens": self.n_tokens,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
        }


def _special_id(meta: _Meta, key: str, default: int, n_tokens: int) -> int:
    # Defaults outside the vocabulary are disabled; overrides outside it are ignored with a warning.
    if default >= n_tokens:
        default = -1
    value = meta.fields.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_tokens:
        return value
    return default


def _build_vocab(meta: _Meta, arch: str, header: _Header, path: Path) -> VocabInfo | None:
    model = meta.string("tokenizer.ggml.model")
    if model is None:
        return None
    pre = meta.string("tokenizer.ggml.pre")
    vtype = _VOCAB_TYPES.get(model, "unknown")
    if model == "gemma4":
        pre = "gemma4"
    source: _TokenSource | None = None
    if vtype == "NONE":
        n_tokens = meta.uint(f"{arch}.vocab_size", 0)
    else:
        tokens = meta.fields.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, _ArrayRef) or tokens.elem_type != GGUFValueType.STRING:
            raise _FormatError("tokenizer.ggml.tokens is missing or is not a list of strings")
        n_tokens = tokens.count
        source = _TokenSource(path, tokens.offset, tokens.count, header.byte_order, header.file_size, header.mtime_ns)
    bos, eos = _SPECIAL_DEFAULTS.get(vtype, (-1, -1))
    add_bos, add_eos = _ADD_DEFAULTS.get(vtype, (False, False))
    if vtype == "BPE" and pre is not None:
        add_bos = add_bos or pre in _BPE_PRE_ADD_BOS
        if pre in _BPE_PRE_NO_BOS:
            bos = -1
    explicit_bos = meta.flag("tokenizer.ggml.add_bos_token")
    explicit_eos = meta.flag("tokenizer.ggml.add_eos_token")
    add_bos = add_bos if explicit_bos is None else explicit_bos
    add_eos = add_eos if explicit_eos is None else explicit_eos
    if vtype == "BPE" and pre in _BPE_PRE_FORCE_BOS:
        add_bos = True
    return VocabInfo(
        model=model,
        pre=pre,
        type=vtype,
        n_tokens=n_tokens,
        bos_id=_special_id(meta, "tokenizer.ggml.bos_token_id", bos, n_tokens),
        eos_id=_special_id(meta, "tokenizer.ggml.eos_token_id", eos, n_tokens),
        add_bos=add_bos,
        add_eos=add_eos,
        _tokens=source,
    )


# --------------------------------------------------------------------------------------------
# Model info and KV sizing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What a GGUF header says about a model, with the KV-cache arithmetic llama.cpp applies."""

    path: Path
    file_size: int
    gguf_version: int
    architecture: str
    name: str
    """``general.name``, or the file name when the header has none."""
    n_params: int
    """Sum of the element counts of all tensors."""
    tensor_bytes: int
    """Bytes of tensor data (what llama.cpp maps); the rest of the file is the header."""
    file_type: str | None
    """``general.file_type`` as llama.cpp names it (Q4_K_M, F16, ...); None when absent."""
    tensor_type: str | None
    """The ggml type holding the most weights (by element count)."""
    n_layers: int
    n_embd: int
    n_head: int
    """Attention heads of the first layer (llama.cpp's n_head())."""
    n_head_kv: tuple[int, ...]
    """KV heads per layer."""
    head_dim_k: int
    head_dim_v: int
    head_dim_k_swa: int
    head_dim_v_swa: int
    n_swa: int
    """Sliding window size in tokens; 0 without SWA."""
    swa_layers: tuple[bool, ...]
    """Per layer: True where the layer uses the sliding window (and so the small SWA cache)."""
    n_ctx_train: int
    n_expert: int
    n_expert_used: int
    rope_freq_base: float | None
    rope_dim: int | None
    vocab: VocabInfo | None
    chat_template: str | None = field(repr=False)
    split_count: int
    """How many files the model is split into (llama.cpp ``split.count``); 1 for a single file."""
    tied_embedding: tuple[str, int] | None = None
    """(ggml type, bytes) of ``token_embd.weight`` when the file has no ``output.weight``: llama.cpp then
    multiplies by a duplicate of the embeddings, which a repacking buffer type (AMX, CPU_REPACK) may hold as a
    copy."""
    embedding_bytes: int = 0
    """Bytes of ``token_embd.weight``, which only the embedding lookup reads (unless the output is tied)."""
    q5_0_matrix_blocks: int = 0
    """Q5_0 blocks of the matrices whose dimensions are both multiples of 32, ``token_embd`` left out: what
    an AMX build with the widening patch holds as Q8_0 copies."""
    q5_0_rows8_blocks: int = 0
    """Q5_0 blocks of the plain matrices whose rows come in multiples of 8, ``token_embd`` left out: what a
    build with patch cpu-repack-q8-0 holds widened to Q8_0 on an x86 CPU with VNNI."""
    q4_1_matrix_bytes: int = 0
    """Bytes of the Q4_1 matrices whose rows come in multiples of 8: what a build with patch cpu-repack-q4-1
    holds as repacked copies on an x86 CPU with AVX2."""
    n_mtp_layers: int = 0
    """Multi-token-prediction layers (``<arch>.nextn_predict_layers``): what an MTP draft context needs
    (llama_init_from_model refuses ``LLAMA_CONTEXT_TYPE_MTP`` without them)."""

    @property
    def has_swa(self) -> bool:
        return any(self.swa_layers)

    def _head_dims(self, il: int) -> tuple[int, int]:
        if self.swa_layers[il]:
            return self.head_dim_k_swa, self.head_dim_v_swa
        return self.head_dim_k, self.head_dim_v

    def head_dims_allow_quantized_kv(self) -> bool:
        """Whether every layer's K and V head size is a whole number of 32-value blocks, which all
        quantized KV cache types need (llama_init_from_model refuses them otherwise)."""
        return all(not self._kv_problem(t, t) for t in KV_CACHE_TYPES if is_quantized(t))

    def _kv_problem(self, type_k: str, type_v: str) -> str | None:
        for il in range(self.n_layers):
            mismatch = head_size_mismatch(*self._head_dims(il), type_k, type_v)
            if mismatch:
                which, size, block = mismatch
                return f"{which} head size {size} of layer {il} is not a multiple of the {block}-value block"
        return None

    def _kv_types(self, type_k: str, type_v: str) -> tuple[tuple[int, int], tuple[int, int]]:
        k, v = kv_block(type_k), kv_block(type_v)
        problem = self._kv_problem(type_k, type_v)
        if problem:
            raise VelollmError(f"{self.name} cannot use a {type_k}/{type_v} KV cache: {problem}")
        return k, v

    def kv_bytes_per_token(self, type_k: str = "f16", type_v: str = "f16") -> float:
        """KV bytes one token occupies across all layers, ignoring the SWA cap."""
        (bk, sk), (bv, sv) = self._kv_types(type_k, type_v)
        total = 0.0
        for il in range(self.n_layers):
            dk, dv = self._head_dims(il)
            total += self.n_head_kv[il] * (dk * sk / bk + dv * sv / bv)
        return total

    def kv_bytes(
        self,
        n_ctx: int,
        n_slots: int = 1,
        type_k: str = "f16",
        type_v: str = "f16",
        *,
        swa_full: bool = False,
        n_ubatch: int = 512,
        unified: bool = True,
    ) -> int:
        """Bytes llama.cpp allocates for the KV cache of a context of ``n_ctx`` tokens (0: the
        trained context) shared by ``n_slots`` sequences.

        Cells are padded to 256. A unified cache (the server default with ``-np`` auto) is one
        pool of n_ctx cells; otherwise each slot gets PAD(n_ctx / n_slots, 256) cells. SWA layers
        hold only PAD(min(cells, n_swa * slots_sharing + n_ubatch), 256) cells unless
        ``swa_full`` (llama_kv_cache_iswa).
        """
        if n_ctx < 0 or n_slots < 1 or n_ubatch < 1:
            raise VelollmError(f"invalid KV size request: n_ctx={n_ctx}, n_slots={n_slots}, n_ubatch={n_ubatch}")
        if n_ctx == 0:
            if self.n_ctx_train == 0:
                raise VelollmError(f"{self.name} does not declare a trained context length; pass n_ctx")
            n_ctx = self.n_ctx_train
        (bk, sk), (bv, sv) = self._kv_types(type_k, type_v)
        n_ctx = _pad(n_ctx, KV_CELL_PAD)
        if unified:
            n_stream, cells = 1, n_ctx
        elif n_ctx // n_slots == 0:
            raise VelollmError(f"a context of {n_ctx} tokens cannot be split across {n_slots} slots")
        else:
            n_stream, cells = n_slots, _pad(n_ctx // n_slots, KV_CELL_PAD)
        cells_swa = cells
        if not swa_full:
            sharing = n_slots if unified else 1
            cells_swa = _pad(min(cells, self.n_swa * sharing + n_ubatch), KV_CELL_PAD)
        total = 0
        for il in range(self.n_layers):
            row = self._cell_bytes(il, (bk, sk), (bv, sv))
            total += row * (cells_swa if self.swa_layers[il] else cells) * n_stream
        return total

    def _cell_bytes(self, il: int, k: tuple[int, int], v: tuple[int, int]) -> int:
        """K + V bytes of one cell of layer ``il``, for (block size, bytes per block) types ``k`` and ``v``."""
        dk, dv = self._head_dims(il)
        return self.n_head_kv[il] * dk // k[0] * k[1] + self.n_head_kv[il] * dv // v[0] * v[1]

    def swa_checkpoint_bytes(self, type_k: str = "f16", type_v: str = "f16") -> int:
        """Bytes of one llama-server context checkpoint of a sequence: the SWA layers' last ``n_swa`` cells,
        the part of the cache that cannot be rolled back (``LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY``); 0 without SWA.
        Measured on gemma3-270m with f16 K/V: 7.506 MiB, the 512 cells of its 15 SWA layers."""
        k, v = self._kv_types(type_k, type_v)
        return sum(self._cell_bytes(il, k, v) for il in range(self.n_layers) if self.swa_layers[il]) * self.n_swa

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (token texts and the chat template's body are left out)."""
        return {
            "path": str(self.path),
            "file_size": self.file_size,
            "gguf_version": self.gguf_version,
            "architecture": self.architecture,
            "name": self.name,
            "n_params": self.n_params,
            "tensor_bytes": self.tensor_bytes,
            "file_type": self.file_type,
            "tensor_type": self.tensor_type,
            "n_layers": self.n_layers,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_head_kv": list(self.n_head_kv),
            "head_dim_k": self.head_dim_k,
            "head_dim_v": self.head_dim_v,
            "head_dim_k_swa": self.head_dim_k_swa,
            "head_dim_v_swa": self.head_dim_v_swa,
            "n_swa": self.n_swa,
            "swa_layers": [il for il, swa in enumerate(self.swa_layers) if swa],
            "n_ctx_train": self.n_ctx_train,
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "rope_freq_base": self.rope_freq_base,
            "rope_dim": self.rope_dim,
            "vocab": self.vocab.to_dict() if self.vocab else None,
            "has_chat_template": self.chat_template is not None,
            "split_count": self.split_count,
            "tied_embedding": self.tied_embedding[0] if self.tied_embedding else None,
            "embedding_bytes": self.embedding_bytes,
            "kv_bytes_per_token_f16": self.kv_bytes_per_token(),
            "quantized_kv_ok": self.head_dims_allow_quantized_kv(),
        }


def _file_type_name(value: int) -> str:
    guessed = value & LlamaFileType.GUESSED
    try:
        name = str(LlamaFileType(value & ~LlamaFileType.GUESSED).name)
    except ValueError:
        return f"unknown ({value})"
    name = name.removeprefix("MOSTLY_").removeprefix("ALL_")
    return f"{name} (guessed)" if guessed else name


def _swa_layers(meta: _Meta, arch: str, n_layers: int) -> tuple[int, tuple[bool, ...]]:
    default = _SWA_DEFAULTS.get(arch)
    n_swa = meta.uint(f"{arch}.attention.sliding_window", default.window if default else 0)
    if n_swa == 0:
        return 0, (False,) * n_layers
    pattern = meta.fields.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, tuple):
        # An explicit per-layer list; llama.cpp leaves layers past its end as full attention.
        flags = tuple(bool(v) for v in pattern[:n_layers])
        return n_swa, flags + (False,) * (n_layers - len(flags))
    if pattern is not None:
        period = meta.uint(f"{arch}.attention.sliding_window_pattern")
        dense_first = default.dense_first if default else False
    elif default is not None:
        period, dense_first = default.pattern, default.dense_first
    else:
        return n_swa, (False,) * n_layers
    # llama_hparams::set_swa_pattern; a period of 0 makes every layer SWA.
    if dense_first:
        return n_swa, tuple(period == 0 or il % period != 0 for il in range(n_layers))
    return n_swa, tuple(period == 0 or il % period < period - 1 for il in range(n_layers))


def _build_info(path: Path, header: _Header) -> ModelInfo:
    meta = _Meta(header.fields)
    arch = meta.string("general.architecture")
    if arch is None:
        raise VelollmError(f"{path} has no general.architecture; it is not a model GGUF")
    if not _ARCH_NAME.fullmatch(arch):
        raise _FormatError(f"general.architecture '{plain(arch)}' is not an architecture name")
    kind = meta.string("general.type")
    if kind not in (None, "model"):
        raise VelollmError(f"{path} is a GGUF {plain(kind)}, not a model")
    n_layers = meta.uint(f"{arch}.block_count")
    if n_layers > _MAX_LAYERS:
        raise _FormatError(f"{plain(arch)}.block_count is {n_layers} (llama.cpp allows at most {_MAX_LAYERS})")
    n_embd = meta.uint(f"{arch}.embedding_length")
    heads = meta.per_layer(f"{arch}.attention.head_count", n_layers, (0,) * n_layers)
    n_head_kv = meta.per_layer(f"{arch}.attention.head_count_kv", n_layers, heads)
    n_head = heads[0] if heads else 0
    # Architectures without attention heads (recurrent ones) have no head size and no KV here.
    default_dim = n_embd // n_head if n_head else 0
    head_k = meta.uint(f"{arch}.attention.key_length", default_dim)
    head_v = meta.uint(f"{arch}.attention.value_length", default_dim)
    n_swa, swa_layers = _swa_layers(meta, arch, n_layers)
    rope_dim = meta.fields.get(f"{arch}.rope.dimension_count")
    weights: Counter[int] = Counter()
    for t in header.tensors:
        weights[t.ggml_type] += t.n_elements
    file_type = meta.fields.get("general.file_type")
    return ModelInfo(
        path=path,
        file_size=header.file_size,
        gguf_version=header.version,
        architecture=arch,
        name=plain(meta.string("general.name") or path.name),
        n_params=sum(t.n_elements for t in header.tensors),
        tensor_bytes=sum(t.n_bytes for t in header.tensors),
        file_type=None if file_type is None else _file_type_name(meta.uint("general.file_type")),
        tensor_type=(str(GGMLQuantizationType(weights.most_common(1)[0][0]).name) if weights else None),
        n_layers=n_layers,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_k,
        head_dim_v=head_v,
        head_dim_k_swa=meta.uint(f"{arch}.attention.key_length_swa", head_k),
        head_dim_v_swa=meta.uint(f"{arch}.attention.value_length_swa", head_v),
        n_swa=n_swa,
        swa_layers=swa_layers,
        n_ctx_train=meta.uint(f"{arch}.context_length", 0),
        n_expert=meta.uint(f"{arch}.expert_count", 0),
        n_expert_used=meta.uint(f"{arch}.expert_used_count", 0),
        rope_freq_base=meta.number(f"{arch}.rope.freq_base"),
        rope_dim=None if rope_dim is None else meta.uint(f"{arch}.rope.dimension_count"),
        vocab=_build_vocab(meta, arch, header, path),
        chat_template=meta.string("tokenizer.chat_template"),
        split_count=meta.uint("split.count", 1),
        tied_embedding=_tied_embedding(header.tensors),
        embedding_bytes=sum(t.n_bytes for t in header.tensors if t.name == "token_embd.weight"),
        q5_0_matrix_blocks=sum(
            t.n_elements // GGML_QUANT_SIZES[GGMLQuantizationType.Q5_0][0] for t in header.tensors
            if t.ggml_type == GGMLQuantizationType.Q5_0 and t.name != "token_embd.weight"
            and len(t.dims) == 2 and t.dims[0] % 32 == 0 and t.dims[1] % 32 == 0
        ),
        q5_0_rows8_blocks=sum(
            t.n_elements // GGML_QUANT_SIZES[GGMLQuantizationType.Q5_0][0] for t in header.tensors
            if t.ggml_type == GGMLQuantizationType.Q5_0 and t.name != "token_embd.weight"
            and len(t.dims) == 2 and t.dims[1] % 8 == 0
        ),
        q4_1_matrix_bytes=sum(
            t.n_bytes for t in header.tensors
            if t.ggml_type == GGMLQuantizationType.Q4_1 and len(t.dims) >= 2 and t.dims[1] % 8 == 0
        ),
        n_mtp_layers=meta.uint(f"{arch}.nextn_predict_layers", 0),
    )


def _tied_embedding(tensors: Sequence[_Tensor]) -> tuple[str, int] | None:
    by_name = {t.name: t for t in tensors}
    embd = by_name.get("token_embd.weight")
    if embd is None or "output.weight" in by_name:
        return None
    return GGMLQuantizationType(embd.ggml_type).name, embd.n_bytes


def inspect_model(path: Path) -> ModelInfo:
    """Read a GGUF file's header. Any unreadable, truncated or corrupt file raises VelollmError."""
    path = Path(path)
    header = _read_header(path)
    try:
        return _build_info(path, header)
    except _FormatError as e:
        raise VelollmError(f"{path} {e.predicate}: {e.detail}") from None


@dataclass(frozen=True)
class GGUFLayout:
    """A GGUF file's key-values and tensor shapes as written, for checks of which converter wrote a file
    (its key names and tensor layout) rather than of what llama.cpp makes of it."""

    path: Path
    fields: dict[str, _Value]
    tensors: dict[str, tuple[int, ...]]  # name -> shape, ne0 first (as ggml and the file list it)
    _header: _Header = field(repr=False)

    def has(self, key: str) -> bool:
        return key in self.fields

    def string(self, key: str) -> str | None:
        value = self.fields.get(key)
        return value if isinstance(value, str) else None

    def uint(self, key: str) -> int | None:
        value = self.fields.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    def is_string_array(self, key: str) -> bool:
        value = self.fields.get(key)
        return isinstance(value, _ArrayRef) and value.elem_type == GGUFValueType.STRING

    def has_tensor_prefix(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self.tensors)

    def token_text(self, index: int) -> bytes | None:
        """Token ``index`` of ``tokenizer.ggml.tokens`` as llama.cpp reads it; None when there is none."""
        tokens = self.fields.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, _ArrayRef) or tokens.elem_type != GGUFValueType.STRING or index >= tokens.count:
            return None
        h = self._header
        return _read_token_texts(
            _TokenSource(self.path, tokens.offset, tokens.count, h.byte_order, h.file_size, h.mtime_ns))[index]


def read_gguf_layout(path: Path) -> GGUFLayout:
    """Read ``path``'s GGUF header (checked as :func:`inspect_model` checks it) without interpreting it."""
    header = _read_header(Path(path))
    return GGUFLayout(Path(path), header.fields, {t.name: t.dims for t in header.tensors}, header)
