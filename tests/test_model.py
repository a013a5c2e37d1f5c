"""GGUF inspection and KV sizing (velollm_patch.model), draft compatibility and search (velollm_patch.drafts), and
resolving model references (velollm_patch.model_ref, velollm_patch.ollama.store)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path

import gguf
import pytest

from tests.helpers import default_tokens, write_gguf
from velollm_patch.drafts import draft_compatibility, find_draft_candidates
from velollm_patch.errors import VelollmError
from velollm_patch.model import ModelInfo, inspect_model
from velollm_patch.model_ref import resolve_local_model
from velollm_patch.ollama.store import list_ollama_models
from velollm_patch.tune import describe_model


@pytest.fixture(autouse=True)
def _isolated_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the user's real Ollama store and Hugging Face cache out of every test."""
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama-empty"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-empty"))


# ---------------------------------------------------------------------------------------------
# Synthetic models
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf")


# ---------------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------------


def test_synthetic_model_matches_gguf_reader(tiny: Path) -> None:
    info = inspect_model(tiny)
    reader = gguf.GGUFReader(tiny)
    assert info.n_params == sum(t.n_elements for t in reader.tensors) > 0
    assert info.architecture == reader.fields["general.architecture"].contents() == "llama"
    assert info.file_size == tiny.stat().st_size
    assert info.vocab is not None
    texts = [t.decode() for t in info.vocab.token_texts()]
    assert texts == reader.fields["tokenizer.ggml.tokens"].contents()
    assert (info.n_layers, info.n_embd, info.n_head, info.n_head_kv) == (2, 64, 4, (2, 2))
    assert (info.head_dim_k, info.head_dim_v) == (16, 16)
    assert info.n_ctx_train == 2048
    assert info.tensor_type == "F32"
    assert info.file_type is None
    assert not info.has_swa
    # SPM defaults: add BOS, not EOS
    assert (info.vocab.type, info.vocab.add_bos, info.vocab.add_eos) == ("SPM", True, False)
    assert (info.vocab.bos_id, info.vocab.eos_id, info.vocab.n_tokens) == (1, 2, 96)
    json.dumps(info.to_dict())


def test_big_endian_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG)
    info = inspect_model(path)
    assert (info.n_layers, info.n_embd, info.n_ctx_train) == (2, 64, 2048)
    assert info.vocab is not None and info.vocab.token_texts()[5] == b"tok5"


def test_file_type_names(tmp_path: Path) -> None:
    q = write_gguf(tmp_path / "q.gguf", file_type=gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert inspect_model(q).file_type == "Q4_K_M"
    f = write_gguf(tmp_path / "f.gguf", file_type=gguf.LlamaFileType.ALL_F32)
    assert inspect_model(f).file_type == "F32"
    g = write_gguf(tmp_path / "g.gguf", file_type=gguf.LlamaFileType.MOSTLY_F16 | gguf.LlamaFileType.GUESSED)
    assert inspect_model(g).file_type == "F16 (guessed)"


def test_smollm2(smollm2_gguf: Path) -> None:
    info = inspect_model(smollm2_gguf)
    assert info.architecture == "llama"
    assert (info.n_layers, info.n_head, info.n_head_kv[0], info.head_dim_k) == (30, 9, 3, 64)
    assert info.n_ctx_train == 8192
    assert info.n_params == 134_515_008
    assert info.file_type == "Q4_1"
    assert info.vocab is not None
    assert (info.vocab.type, info.vocab.n_tokens, info.vocab.add_bos) == ("BPE", 49152, False)
    assert (info.vocab.bos_id, info.vocab.eos_id) == (1, 2)
    assert info.chat_template is not None and "im_start" in info.chat_template
    # 30 layers x 3 KV heads x 64 x (K + V) x 2 bytes
    assert info.kv_bytes_per_token() == 23040
    assert info.kv_bytes_per_token("q8_0", "q8_0") == 23040 * 34 / 64
    assert info.kv_bytes(8192) == 23040 * 8192
    assert info.kv_bytes(1000) == 23040 * 1024
    assert info.head_dims_allow_quantized_kv()


def test_gemma3_swa(gemma3_gguf: Path) -> None:
    info = inspect_model(gemma3_gguf)
    assert info.architecture == "gemma3"
    assert info.n_swa == 512
    # sliding_window_pattern is absent, so llama.cpp's gemma3 default applies: every 6th layer global
    assert [il for il, swa in enumerate(info.swa_layers) if not swa] == [5, 11, 17]
    assert info.file_type == "Q4_K_M"
    assert info.n_params == 268_098_176
    assert info.kv_bytes_per_token() == 18 * 1 * 256 * 2 * 2
    per_cell = 1 * 256 * 2 * 2
    # 3 global layers hold every cell; 15 SWA layers hold PAD(min(ctx, 512 + 512), 256) = 1024
    assert info.kv_bytes(32768) == 3 * per_cell * 32768 + 15 * per_cell * 1024
    # unified with 4 slots: the SWA part is shared, so it holds 4 windows
    assert info.kv_bytes(32768, n_slots=4) == 3 * per_cell * 32768 + 15 * per_cell * 2560
    assert info.kv_bytes(32768, swa_full=True) == 18 * per_cell * 32768
    # a server context checkpoint holds the SWA layers' last n_swa cells (llama-server logs 7.506 MiB with f16)
    assert info.swa_checkpoint_bytes() == 15 * per_cell * 512 == int(7.5 * 1024 * 1024)
    assert info.swa_checkpoint_bytes("q8_0", "q8_0") == 15 * 2 * 256 // 32 * 34 * 512
    assert 0 < info.tensor_bytes < info.file_size
    assert info.vocab is not None and info.vocab.type == "SPM" and info.vocab.n_tokens == 262144


# ---------------------------------------------------------------------------------------------
# KV sizing
# ---------------------------------------------------------------------------------------------


def test_kv_per_layer_heads_and_head_dims(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf",
        n_layers=3,
        n_head_kv=[1, 2, 4],
        extra={"llama.attention.key_length": 64, "llama.attention.value_length": 32},
    )
    info = inspect_model(path)
    assert info.n_head_kv == (1, 2, 4)
    assert (info.head_dim_k, info.head_dim_v) == (64, 32)
    assert info.kv_bytes_per_token() == 7 * (64 + 32) * 2
    assert info.kv_bytes_per_token("f32", "q4_0") == 7 * (64 * 4 + 32 * 18 / 32)
    assert info.kv_bytes(300) == 7 * (64 + 32) * 2 * 512
    # non-unified: each of 3 slots gets PAD(1024 / 3, 256) = 512 cells
    assert info.kv_bytes(1024, n_slots=3, unified=False) == 7 * (64 + 32) * 2 * 512 * 3


def test_kv_quantized_needs_block_multiple(tmp_path: Path) -> None:
    # head size 72 = 576 / 8, like the models that crash Ollama with q8_0 (ollama#16245)
    info = inspect_model(write_gguf(tmp_path / "m.gguf", n_embd=576, n_head=8, n_head_kv=8))
    assert info.head_dim_k == 72
    assert not info.head_dims_allow_quantized_kv()
    assert info.kv_bytes_per_token("f16", "f16") == 2 * 8 * 72 * 2 * 2
    with pytest.raises(VelollmError, match="not a multiple of the 32-value block"):
        info.kv_bytes_per_token("q8_0", "q8_0")
    with pytest.raises(VelollmError, match="unknown KV cache type 'q3_k'"):
        info.kv_bytes(1024, type_k="q3_k")


def test_kv_swa_pattern_keys(tmp_path: Path) -> None:
    explicit = write_gguf(
        tmp_path / "e.gguf",
        arch="gemma3",
        n_layers=4,
        extra={"gemma3.attention.sliding_window": 128, "gemma3.attention.sliding_window_pattern": [True, False]},
    )
    info = inspect_model(explicit)
    assert info.swa_layers == (True, False, False, False)
    period = write_gguf(
        tmp_path / "p.gguf",
        arch="gemma3",
        n_layers=4,
        extra={"gemma3.attention.sliding_window": 128, "gemma3.attention.sliding_window_pattern": 2},
    )
    assert inspect_model(period).swa_layers == (True, False, True, False)
    no_window = write_gguf(tmp_path / "n.gguf", arch="gemma3", n_layers=4)
    assert inspect_model(no_window).swa_layers == (False,) * 4
    # gemma2 assumes a 4096 window when the key is missing; odd layers are global
    gemma2 = inspect_model(write_gguf(tmp_path / "g2.gguf", arch="gemma2", n_layers=4))
    assert (gemma2.n_swa, gemma2.swa_layers) == (4096, (True, False, True, False))
    per_cell = 2 * 16 * 2 * 2
    assert gemma2.kv_bytes(8192) == 2 * per_cell * 8192 + 2 * per_cell * _pad256(4096 + 512)
    # an unknown architecture with a window but no pattern counts every layer as full
    other = write_gguf(tmp_path / "o.gguf", arch="llama", extra={"llama.attention.sliding_window": 128})
    assert not inspect_model(other).has_swa


def _pad256(n: int) -> int:
    return (n + 255) // 256 * 256


def test_kv_bytes_rejects_bad_requests(tiny: Path) -> None:
    info = inspect_model(tiny)
    assert info.kv_bytes(0) == info.kv_bytes(2048)
    with pytest.raises(VelollmError):
        info.kv_bytes(1024, n_slots=0)
    with pytest.raises(VelollmError, match="cannot be split"):
        info.kv_bytes(256, n_slots=300, unified=False)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _raw_gguf(
    kvs: Sequence[bytes] = (),
    tensors: Sequence[bytes] = (),
    *,
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    head = b"GGUF" + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    return head + b"".join(kvs) + b"".join(tensors)


def _s(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def _kv_str(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", gguf.GGUFValueType.STRING) + _s(value)


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<II", gguf.GGUFValueType.UINT32, value)


def _tensor_info(name: str, dims: Sequence[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


_MINIMAL = [
    _kv_str("general.architecture", "llama"),
    _kv_u32("llama.block_count", 1),
    _kv_u32("llama.embedding_length", 8),
]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is not a GGUF file (bad magic): the file is empty"),
        (b"PK\x03\x04rest", "is not a GGUF file (bad magic): it starts with b'PK\\x03\\x04'"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS pointer"),
        (b"GGUF\x03\x00", "is truncated"),
        (_raw_gguf(version=1), "GGUF v1 is no longer read"),
        (_raw_gguf(version=4), "unsupported GGUF version: version 4"),
        (_raw_gguf(n_kv=1 << 62), "key-value list declares"),
        (_raw_gguf(n_kv=1000), "is truncated: key-value list declares 1000 entries"),
        (_raw_gguf([_s("k") + struct.pack("<IQ", 8, 1 << 62)]), "declares a length of"),
        (_raw_gguf([_s("k") + struct.pack("<IIQ", 9, 4, 1 << 40)]), "array 'k' declares"),
        (_raw_gguf([_s("k") + struct.pack("<IIQ", 9, 8, 1 << 29)]), "is truncated: array 'k' declares"),
        (_raw_gguf([_s("k") + struct.pack("<IIQ", 9, 9, 1)]), "unsupported element type array"),
        (_raw_gguf([_s("k") + struct.pack("<I", 77)]), "unknown value type 77"),
        (_raw_gguf([_kv_u32("k", 1), _kv_u32("k", 2)]), "key 'k' appears twice"),
        (_raw_gguf(_MINIMAL, n_tensors=1 << 62), "tensor list declares"),
        (_raw_gguf(_MINIMAL, [_tensor_info("t", [1, 1, 1, 1, 1])]), "has 5 dimensions"),
        (_raw_gguf(_MINIMAL, [_tensor_info("t", [32], ggml_type=99)]), "unknown ggml type 99"),
        (_raw_gguf(_MINIMAL, [_tensor_info("t", [33], ggml_type=8)]), "do not fit 32-value blocks"),
        (_raw_gguf(_MINIMAL, [_tensor_info("t", [1 << 63])]), "negative dimension"),
        (_raw_gguf(_MINIMAL, [_tensor_info("t", [8], offset=64)]), "has data offset 64, expected 0"),
        (_raw_gguf(_MINIMAL, [_tensor_info("t", [8]), _tensor_info("t", [8], offset=32)]), "appears twice"),
        (_raw_gguf(_MINIMAL, [_tensor_info("t", [1 << 20])]), "is truncated: data of tensor 't' ends at byte"),
        (_raw_gguf([_kv_u32("general.alignment", 3)]), "not a power of two"),
        (_raw_gguf([_kv_u32("llama.block_count", 1)]), "has no general.architecture"),
        (_raw_gguf([*_MINIMAL[:1], _kv_str("general.type", "adapter")]), "is a GGUF adapter, not a model"),
        (_raw_gguf(_MINIMAL[:2]), "required key 'llama.embedding_length' is missing"),
        (_raw_gguf([*_MINIMAL[:1], _kv_str("llama.block_count", "x")]), "'llama.block_count' is str, expected an"),
        (_raw_gguf([*_MINIMAL[:1], _kv_u32("llama.block_count", 4096)]), "at most 512"),
        (_raw_gguf([*_MINIMAL, _kv_str("tokenizer.ggml.model", "llama")]), "tokenizer.ggml.tokens is missing"),
    ],
)
def test_malformed_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(VelollmError) as err:
        inspect_model(path)
    assert message in str(err.value)
    assert str(err.value).startswith(str(path))
    assert "\n" not in str(err.value)


def test_minimal_header_parses(tmp_path: Path) -> None:
    path = tmp_path / "min.gguf"
    path.write_bytes(_raw_gguf(_MINIMAL))
    info = inspect_model(path)
    assert (info.n_params, info.n_head, info.head_dim_k, info.vocab) == (0, 0, 0, None)
    assert info.kv_bytes(1024) == 0


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(VelollmError, match="not found"):
        inspect_model(tmp_path / "nope.gguf")
    with pytest.raises(VelollmError, match="is a directory"):
        inspect_model(tmp_path)


def test_truncated_real_layout(tiny: Path, tmp_path: Path) -> None:
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(VelollmError, match=r"cut.gguf is truncated: data of tensor"):
        inspect_model(cut)


def test_file_changed_before_tokens_are_read(tiny: Path) -> None:
    info = inspect_model(tiny)
    assert info.vocab is not None
    os.utime(tiny, ns=(0, 0))
    with pytest.raises(VelollmError, match="changed after it was inspected"):
        info.vocab.token_texts()


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging when a parse loops (SIGALRM is POSIX-only; elsewhere no guard)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"parse took longer than {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _length_fields(reader: gguf.GGUFReader) -> list[int]:
    """Offsets of the u64 length fields in the header: every key's, and every string value's."""
    found = []
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        found.append(f.offset)
        if f.types == [gguf.GGUFValueType.STRING]:
            found.append(f.offset + 8 + len(name) + 4)
    return found


def _mutations(
    data: bytes, header_end: int, lengths: Sequence[int], tokens_count_at: int
) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(20240611)
    # Truncation every 7 bytes through the header and a few cuts into the tensor data.
    for n in range(0, header_end, 7):
        yield f"truncate@{n}", data[:n]
    for n in range(header_end, len(data), max(1, (len(data) - header_end) // 10)):
        yield f"truncate@{n}", data[:n]
    # Random byte flips, mostly in the header, where they change structure rather than weights.
    for i in range(120):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(header_end if i % 4 else len(data))] = rng.randrange(256)
        yield f"flip#{i}", bytes(buf)
    # One flipped bit anywhere in the header: what a bad disk or a bad download does.
    for i in range(1600):
        at, bit = rng.randrange(header_end), rng.randrange(8)
        buf = bytearray(data)
        buf[at] ^= 1 << bit
        yield f"bit#{i}@{at}.{bit}", bytes(buf)
    # Every bit of every key and string length: the reads that once copied megabytes into one message.
    for at in lengths:
        for bit in range(64):
            value = struct.unpack_from("<Q", data, at)[0] ^ (1 << bit)
            yield f"length@{at}^bit{bit}", data[:at] + struct.pack("<Q", value) + data[at + 8 :]
    # Huge counts and lengths: at the known count fields, then at random header positions.
    huge = [1 << 63, (1 << 64) - 1, 1 << 32, 1 << 40, 0x7FFFFFFF]
    for at in (8, 16, tokens_count_at):
        for value in huge:
            yield f"huge@{at}={value}", data[:at] + struct.pack("<Q", value) + data[at + 8 :]
    for i in range(60):
        at = rng.randrange(4, header_end - 8)
        yield f"huge#{i}@{at}", data[:at] + struct.pack("<Q", rng.choice(huge)) + data[at + 8 :]


# What an error may add to the file's path: our sentence and short quotes (velollm_patch.errors.QUOTE_LIMIT).
_MESSAGE_ALLOWANCE = 600


def _inspect_everything(path: Path, base_info: ModelInfo) -> None:
    """Everything `inspect` and the draft search do with a model: the result, its report, its KV sizes, its
    vocabulary against the base model's."""
    info = inspect_model(path)
    info.to_dict()
    describe_model(info, None, 1)
    with contextlib.suppress(VelollmError):
        info.kv_bytes(4096, n_slots=2, type_k="q8_0", type_v="q4_0")
    with contextlib.suppress(VelollmError):
        draft_compatibility(base_info, info)


def _check_bounded(label: str, path: Path, base_info: ModelInfo) -> str:
    """Run :func:`_inspect_everything` under a time and a memory watchdog: ``parsed``, or ``rejected`` with one
    short line, and never another exception, a hang, or memory out of proportion to the file."""
    size = path.stat().st_size
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    outcome = "parsed"
    with _deadline(10):  # a hang guard, not a speed requirement: a case takes milliseconds
        try:
            _inspect_everything(path, base_info)
        except VelollmError as e:
            message = str(e)
            assert "\n" not in message, label
            assert len(message) <= len(str(path)) + _MESSAGE_ALLOWANCE, f"{label}: {len(message)} characters"
            outcome = "rejected"
        except Exception as e:  # pragma: no cover - the assertion message is the point
            pytest.fail(f"{label}: {type(e).__name__}: {e}")
    peak = tracemalloc.get_traced_memory()[1] - before
    # Strings decoded from the file and the token list read for the draft check are a few times its size.
    assert peak <= 16 * size + (16 << 20), f"{label}: {peak / 2**20:.0f} MiB for a {size}-byte file"
    return outcome


@pytest.fixture
def _traced_memory() -> Iterator[None]:
    tracemalloc.start()
    yield
    tracemalloc.stop()


@pytest.mark.usefixtures("_traced_memory")
def test_fuzzed_files_parse_or_fail_cleanly(tmp_path: Path) -> None:
    base = write_gguf(
        tmp_path / "base.gguf",
        n_layers=2,
        n_embd=32,
        n_head=2,
        n_head_kv=1,
        tokens=default_tokens(40),
        extra={"llama.attention.sliding_window": 64},
    )
    base_info = inspect_model(base)
    data = base.read_bytes()
    reader = gguf.GGUFReader(base)
    header_end = reader.data_offset
    # the array's element count follows its key (length + text), value type and element type
    tokens_count_at = reader.fields["tokenizer.ggml.tokens"].offset + 8 + len("tokenizer.ggml.tokens") + 4 + 4
    assert struct.unpack_from("<Q", data, tokens_count_at)[0] == 40
    cases = list(_mutations(data, header_end, _length_fields(reader), tokens_count_at))
    assert len(cases) >= 3000
    outcomes = {"parsed": 0, "rejected": 0}
    path = tmp_path / "case.gguf"
    for label, content in cases:
        path.write_bytes(content)
        outcomes[_check_bounded(label, path, base_info)] += 1
    assert outcomes["parsed"] > 0 and outcomes["rejected"] > 0


@pytest.fixture(scope="module")
def large_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A 100k-token vocabulary and its embeddings: a file of ~14 MB, so a flipped length bit up to 2**23 still
    # points inside it and the bytes after it are read as a key or a name.
    return write_gguf(tmp_path_factory.mktemp("large") / "large.gguf", n_embd=32, n_head=2, n_head_kv=1,
                      tokens=default_tokens(100_000))


@pytest.mark.usefixtures("_traced_memory")
@pytest.mark.parametrize("field", ["general.architecture", "general.name"])
@pytest.mark.parametrize("bit", [14, 22])
def test_a_flipped_length_in_a_large_file_stays_bounded(tmp_path: Path, large_gguf: Path, field: str, bit: int) -> None:
    base = large_gguf
    base_info = inspect_model(base)
    reader = gguf.GGUFReader(base)
    key_at = reader.fields[field].offset
    at = key_at if field == "general.architecture" else key_at + 8 + len(field) + 4  # the key's, the value's length
    data = bytearray(base.read_bytes())
    assert 1 << bit < len(data)
    data[at : at + 8] = struct.pack("<Q", struct.unpack_from("<Q", data, at)[0] | 1 << bit)
    path = tmp_path / "flipped.gguf"
    path.write_bytes(bytes(data))
    assert _check_bounded(f"{field} length bit {bit}", path, base_info) == "rejected"


# ---------------------------------------------------------------------------------------------
# Draft compatibility
# ---------------------------------------------------------------------------------------------


def test_compatible_pair(tmp_path: Path) -> None:
    target = write_gguf(tmp_path / "t.gguf", n_layers=4)
    draft = write_gguf(tmp_path / "d.gguf", n_layers=1)
    compat = draft_compatibility(target, draft)
    assert compat.ok, compat.reason
    assert "same SPM vocabulary (96 tokens)" in compat.reason


def test_token_text_differences(tmp_path: Path) -> None:
    target = inspect_model(write_gguf(tmp_path / "t.gguf"))
    late = default_tokens(96)
    late[40] = "other"
    compat = draft_compatibility(target, write_gguf(tmp_path / "late.gguf", tokens=late))
    assert not compat.ok
    assert compat.reason == "token 40 differs: target 'tok40', draft 'other'"
    # llama.cpp starts comparing at id 5, so the first special tokens may differ
    early = default_tokens(96)
    early[4] = "different"
    assert draft_compatibility(target, write_gguf(tmp_path / "early.gguf", tokens=early)).ok


def test_special_token_rules(tmp_path: Path) -> None:
    target = inspect_model(write_gguf(tmp_path / "t.gguf", add_bos=True))
    other_bos = write_gguf(tmp_path / "b.gguf", add_bos=True, bos=3)
    compat = draft_compatibility(target, other_bos)
    assert not compat.ok and "BOS handling differs" in compat.reason
    # BOS ids matter only when BOS is added
    no_bos_t = write_gguf(tmp_path / "nt.gguf", add_bos=False)
    no_bos_d = write_gguf(tmp_path / "nd.gguf", add_bos=False, bos=3)
    assert draft_compatibility(no_bos_t, no_bos_d).ok
    assert not draft_compatibility(target, no_bos_t).ok
    # UGM (t5) adds EOS by default
    t5_t = write_gguf(tmp_path / "ut.gguf", tokenizer="t5", eos=1)
    t5_d = write_gguf(tmp_path / "ud.gguf", tokenizer="t5", eos=2)
    compat = draft_compatibility(t5_t, t5_d)
    assert not compat.ok and "EOS handling differs" in compat.reason


def test_vocab_size_and_type_rules(tmp_path: Path) -> None:
    target = inspect_model(write_gguf(tmp_path / "t.gguf", tokens=default_tokens(300)))
    close = write_gguf(tmp_path / "c.gguf", tokens=default_tokens(300 - 128))
    assert draft_compatibility(target, close).ok
    far = write_gguf(tmp_path / "f.gguf", tokens=default_tokens(300 - 129))
    compat = draft_compatibility(target, far)
    assert not compat.ok and "vocab sizes differ by 129" in compat.reason
    gpt2 = write_gguf(
        tmp_path / "g.gguf", tokens=default_tokens(300), tokenizer="gpt2", extra={"tokenizer.ggml.merges": ["a b"]}
    )
    compat = draft_compatibility(target, gpt2)
    assert not compat.ok and compat.reason == "vocab types differ: target SPM (llama), draft BPE (gpt2)"
    weird = write_gguf(tmp_path / "w.gguf", tokenizer="sentencepiece-ish")
    assert "does not know the draft tokenizer" in draft_compatibility(target, weird).reason


def test_bpe_pre_tokenizer_defaults(tmp_path: Path) -> None:
    llama3 = inspect_model(
        write_gguf(tmp_path / "l3.gguf", tokenizer="gpt2", extra={"tokenizer.ggml.pre": "llama-bpe"})
    )
    assert llama3.vocab is not None and llama3.vocab.add_bos
    glm = inspect_model(
        write_gguf(tmp_path / "glm.gguf", tokenizer="gpt2", bos=None, extra={"tokenizer.ggml.pre": "glm4"})
    )
    assert glm.vocab is not None and glm.vocab.bos_id == -1
    # an out-of-range BOS override is ignored, keeping the BPE default id 11
    odd = inspect_model(write_gguf(tmp_path / "odd.gguf", tokenizer="gpt2", bos=5000))
    assert odd.vocab is not None and odd.vocab.bos_id == 11


def test_empty_and_nul_tokens_compare_like_llama_cpp(tmp_path: Path) -> None:
    a = default_tokens(20)
    b = default_tokens(20)
    a[7], b[7] = "", "[EMPTY_7]"
    a[8], b[8] = "x\0tail", "x"
    assert draft_compatibility(write_gguf(tmp_path / "a.gguf", tokens=a), write_gguf(tmp_path / "b.gguf", tokens=b)).ok


# ---------------------------------------------------------------------------------------------
# Draft search
# ---------------------------------------------------------------------------------------------


def test_find_draft_candidates(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    target = write_gguf(models / "target.gguf", n_layers=4, n_embd=128, n_head=4)
    write_gguf(models / "sub" / "small.gguf", n_layers=1, n_embd=64, n_head=4)
    # same weights, quantized: same parameter count in about a seventh of the bytes
    write_gguf(
        models / "target-q4_0.gguf",
        n_layers=4,
        n_embd=128,
        n_head=4,
        qtype=gguf.GGMLQuantizationType.Q4_0,
        file_type=gguf.LlamaFileType.MOSTLY_Q4_0,
    )
    # same size as the target: no speed-up
    write_gguf(models / "twin.gguf", n_layers=4, n_embd=128, n_head=4)
    bad_tokens = default_tokens(96)
    bad_tokens[50] = "nope"
    write_gguf(models / "other-vocab.gguf", n_layers=1, tokens=bad_tokens)
    (models / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    found = find_draft_candidates(target, [models, tmp_path / "missing"])
    assert sorted(c.path.name for c in found) == ["small.gguf", "target-q4_0.gguf"]
    assert found == sorted(found, key=lambda c: c.bytes_ratio)
    quant = next(c for c in found if c.path.name == "target-q4_0.gguf")
    assert quant.params_ratio == 1.0 and quant.bytes_ratio <= 0.5
    assert "at Q4_0" in quant.reason and "same SPM vocabulary" in quant.reason
    small = next(c for c in found if c.path.name == "small.gguf")
    assert small.params_ratio <= 0.5
    json.dumps([c.to_dict() for c in found])


def _ollama_store(root: Path, name: tuple[str, str, str, str], gguf_file: Path) -> Path:
    digest = "ab" * 32
    blob = root / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(gguf_file.read_bytes())
    manifest = root / "manifests" / Path(*name)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "layers": [
                    {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32},
                    {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": 1},
                ],
            }
        )
    )
    return blob


def test_draft_search_covers_ollama_and_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = write_gguf(tmp_path / "target.gguf", n_layers=4, n_embd=128, n_head=4)
    small = write_gguf(tmp_path / "small.gguf.src", n_layers=1)
    store = tmp_path / "ollama"
    _ollama_store(store, ("registry.ollama.ai", "library", "tiny", "0.1b"), small)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    hub = tmp_path / "hf"
    snap = hub / "models--org--tiny-GGUF" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    write_gguf(snap / "tiny-q8.gguf", n_layers=1, n_embd=32, n_head=2)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    labels = sorted(c.label for c in find_draft_candidates(target, []))
    assert labels == ["hf:org/tiny-GGUF/tiny-q8.gguf", "tiny:0.1b"]


# ---------------------------------------------------------------------------------------------
# Resolving model references
# ---------------------------------------------------------------------------------------------


def test_resolve_paths(tiny: Path, tmp_path: Path) -> None:
    assert resolve_local_model(str(tiny)) == tiny.resolve()
    with pytest.raises(VelollmError, match="model file .*missing.gguf not found"):
        resolve_local_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(VelollmError, match="is not a file"):
        resolve_local_model(str(tmp_path))


@pytest.mark.parametrize(
    ("ref", "parts"),
    [
        ("llama3.2", ("registry.ollama.ai", "library", "llama3.2", "latest")),
        ("qwen2.5:0.5b", ("registry.ollama.ai", "library", "qwen2.5", "0.5b")),
        ("library/x:tag", ("registry.ollama.ai", "library", "x", "tag")),
        ("someone/x", ("registry.ollama.ai", "someone", "x", "latest")),
        ("hub.example.com:5000/ns/x:q4_K_M", ("hub.example.com:5000", "ns", "x", "q4_K_M")),
        # isValidPart (types/model/name.go) lets a part start with "_"
        ("_ns/_x:_t", ("registry.ollama.ai", "_ns", "_x", "_t")),
    ],
)
def test_resolve_ollama_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: Path, ref: str, parts: tuple[str, str, str, str]
) -> None:
    store = tmp_path / "store"
    blob = _ollama_store(store, parts, tiny)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert resolve_local_model(ref) == blob
    assert inspect_model(resolve_local_model(ref)).n_params == inspect_model(tiny).n_params


def test_resolve_ollama_default_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: Path) -> None:
    monkeypatch.delenv("OLLAMA_MODELS")
    monkeypatch.setenv("HOME", str(tmp_path))
    blob = _ollama_store(tmp_path / ".ollama" / "models", ("registry.ollama.ai", "library", "m", "latest"), tiny)
    assert resolve_local_model("m") == blob
    assert list_ollama_models() == [("m:latest", blob)]


def test_resolve_ollama_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: Path) -> None:
    store = tmp_path / "store"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    with pytest.raises(VelollmError) as err:
        resolve_local_model("x:y")
    assert str(err.value) == (
        f"model 'x:y' not found in the Ollama store at {store}; run `ollama pull x:y` or pass a GGUF path"
    )
    # Names Ollama never stores (types/model/name.go): a space, a "." in a namespace, a tag over 80 characters.
    for bad in ("bad name!", "my.ns/x", "x:" + "t" * 81):
        with pytest.raises(VelollmError, match="neither a GGUF file nor a valid Ollama model name"):
            resolve_local_model(bad)
    blob = _ollama_store(store, ("registry.ollama.ai", "library", "gone", "latest"), tiny)
    blob.unlink()
    with pytest.raises(VelollmError, match=r"lacks the weights of 'gone:latest'.*run `ollama pull gone:latest`"):
        resolve_local_model("gone")
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "junk" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{not json")
    with pytest.raises(VelollmError, match=r"manifest .*junk/latest is not JSON .*run `ollama pull junk:latest`"):
        resolve_local_model("junk")
    assert list_ollama_models() == []


def test_model_info_is_frozen(tiny: Path) -> None:
    info = inspect_model(tiny)
    with pytest.raises(AttributeError):
        info.n_layers = 3  # type: ignore[misc]
    assert isinstance(info, ModelInfo)
