"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from velollm_patch import cuda
from velollm_patch.bench.metrics import PointResult, RequestSample, ScenarioResult
from velollm_patch.bench.runner import BenchConfig, RunResult
from velollm_patch.bench.targets import TargetInfo
from velollm_patch.hardware import HardwareInfo

HARDWARE_DATA = Path(__file__).parent / "data" / "hardware"
CUDA_DATA = Path(__file__).parent / "data" / "cuda"  # what CUDA 13.0.88's tools answered
LIST_GPU_ARCH_13_0 = (CUDA_DATA / "13.0-list-gpu-arch.txt").read_text()

# The patch that repacks Q4_1 weights on x86 CPUs with AVX2. The planner needs no knowledge of it (its dry run
# shows the repacked copies), but tests that compare kernels or buffers do.
CPU_REPACK_Q4_1_PATCH = "cpu-repack-q4-1"


def recorded_hardware(name: str) -> HardwareInfo:
    """A machine recorded in tests/data/hardware/NAME.json (h100, rtx3060, rtx4090, m2max, ...)."""
    return HardwareInfo.from_dict(json.loads((HARDWARE_DATA / f"{name}.json").read_text()))


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def toolkit_tree(root: Path, *, cublas: bool = False, stub: bool = False) -> tuple[Path, Path, Path]:
    """A toolkit's include, lib and lib/stubs directories, with cuBLAS and the libcuda stub when asked."""
    include, lib = root / "include", root / "lib"
    touch(include / "cuda_runtime.h")
    touch(lib / "libcudart.so.13")
    if cublas:
        for name in ("libcublas.so", "libcublasLt.so", "libcublas.so.13", "libcublasLt.so.13"):
            touch(lib / name)
        touch(include / "cublas_v2.h")
    if stub:
        touch(lib / "stubs" / "libcuda.so")
    (lib / "stubs").mkdir(exist_ok=True)
    return include, lib, lib / "stubs"


def cu13_wheel(site: Path) -> Path:
    """What `pip install nvidia-cublas==13.0.*` unpacks: nvidia/cu13/{lib,include}, sonames only."""
    touch(site / "nvidia/cu13/lib/libcublas.so.13")
    touch(site / "nvidia/cu13/lib/libcublasLt.so.13")
    touch(site / "nvidia/cu13/include/cublas_v2.h")
    return site / "nvidia/cu13"


def make_toolkit(
    tmp_path: Path, *, version: str = "13.0", cublas: str | None = "pip", driver: str | None = None
) -> cuda.CudaToolkit:
    """A CUDA 13.0 toolkit (nvcc's recorded target list) with cuBLAS from "toolkit" or "pip" (or none) and
    libcuda from the "system" driver or the toolkit's "stub" (or none), found by the real search."""
    include, lib, stubs = toolkit_tree(tmp_path / "cuda", cublas=cublas == "toolkit", stub=driver == "stub")
    site = tmp_path / "site-packages"
    if cublas == "pip":
        cu13_wheel(site)
    system = tmp_path / "system-lib"
    if driver == "system":
        touch(system / "libcuda.so.1")
    major = cuda.parse_version(version)[0]
    return cuda.CudaToolkit(
        nvcc=tmp_path / "cuda/bin/nvcc", version=version, include_dirs=(include,), library_dirs=(stubs, lib),
        gpu_archs=cuda.parse_gpu_archs(LIST_GPU_ARCH_13_0),
        cublas=cuda.find_cublas(major, (include,), (stubs, lib), (site,)),
        driver_library=cuda.find_driver_library((stubs, lib), (system,)),
    )


def default_tokens(n: int) -> list[str]:
    return ["<unk>", "<s>", "</s>"] + [f"tok{i}" for i in range(3, n)]


def add_key_values(writer: gguf.GGUFWriter, values: dict[str, Any]) -> None:
    """Key-values typed by their Python type: bool, int as uint32, float as float32, str, else an array."""
    for key, value in values.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    n_layers: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int | Sequence[int] = 2,
    tokens: Sequence[str] | None = None,
    tokenizer: str = "llama",
    bos: int | None = 1,
    eos: int | None = 2,
    add_bos: bool | None = None,
    ctx: int = 2048,
    qtype: Any = gguf.GGMLQuantizationType.F32,
    file_type: int | None = None,
    extra: dict[str, Any] | None = None,
    endianess: Any = gguf.GGUFEndian.LITTLE,
    name: str | None = None,
) -> Path:
    """A tiny llama-like model: embeddings, per-layer attention weights, a small vocabulary."""
    tokens = list(tokens) if tokens is not None else default_tokens(96)
    w = gguf.GGUFWriter(path, arch, endianess=endianess)
    w.add_name(path.stem if name is None else name)
    w.add_block_count(n_layers)
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_embd * 2)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(tokens)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if file_type is not None:
        w.add_file_type(file_type)
    add_key_values(w, extra or {})

    def tensor(name: str, rows: int, cols: int) -> None:
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, np.ones((rows, cols), dtype=np.float32))
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            w.add_tensor(name, np.zeros((rows, cols // block * size), dtype=np.uint8), raw_dtype=qtype)

    kv_dim = n_embd // n_head * (n_head_kv if isinstance(n_head_kv, int) else max(n_head_kv))
    tensor("token_embd.weight", len(tokens), n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    for il in range(n_layers):
        w.add_tensor(f"blk.{il}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        tensor(f"blk.{il}.attn_q.weight", n_embd, n_embd)
        tensor(f"blk.{il}.attn_k.weight", kv_dim, n_embd)
        tensor(f"blk.{il}.attn_v.weight", kv_dim, n_embd)
        tensor(f"blk.{il}.ffn_up.weight", n_embd * 2, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_layout_gguf(path: Path, arch: str, kv: dict[str, Any] | None = None,
                      tensors: dict[str, tuple[int, ...]] | None = None, tokens: Sequence[str] | None = None) -> Path:
    """A GGUF with exactly these key-values and tensors (zeros of the given shape, ne0 first): the layout a
    converter wrote, for checks that look at layouts and load nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch)
    if tokens is not None:
        w.add_token_list(list(tokens))
    add_key_values(w, kv or {})
    for name, shape in (tensors or {"token_embd.weight": (8, 4)}).items():
        w.add_tensor(name, np.zeros(tuple(reversed(shape)), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _ollama_blob(store: Path, path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    path.replace(store / "blobs" / f"sha256-{digest}")
    return f"sha256:{digest}"


def add_ollama_model(store: Path, name: str, **layers: Path) -> None:
    """A manifest under ``store`` (``name`` = namespace/model:tag) with a layer per GGUF: model, projector, draft."""
    model, tag = name.split(":")
    manifest = store / "manifests" / "registry.ollama.ai" / model / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": f"application/vnd.ollama.image.{kind}", "digest": _ollama_blob(store, path), "size": 1}
        for kind, path in layers.items()
    ] + [{"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 1}]}))


def request_sample(decode: float, latency: float = 1.0, *, drafted: int | None = None, accepted: int | None = None,
                   prompt_tokens: int = 100, completion: int = 50) -> RequestSample:
    return RequestSample(
        prompt_tokens=prompt_tokens, completion_tokens=completion, latency_s=latency, ttft_s=latency / 10,
        decode_tps=decode, prompt_tps=decode * 10, timing_source="server", draft_tokens=drafted,
        draft_accepted=accepted,
    )


def run_result(label: str, decode: float, *, run_id: str = "r1") -> RunResult:
    """A `bench run` result with every kind of point (plain, clients, context sizes) and a failed scenario."""
    info = TargetInfo(kind="build", spec=label, label=label, api="llama-server", model="/m/SmolLM2.gguf",
                      model_bytes=100 * 1024**2, n_ctx=8192, slots=4, build={"build_id": f"{label}-1", "patches": []})
    sample = request_sample
    scenarios = [
        ScenarioResult("short", "Short completion", points=[
            PointResult("", None, (sample(decode, 0.5), sample(decode * 1.1, 0.6)), 1.1, 200 * 1024**2)]),
        ScenarioResult("concurrency", "Concurrent users", points=[
            PointResult("1", 1, (sample(decode, 0.5),), 0.5, 210 * 1024**2),
            PointResult("2", 2, (sample(decode, 0.7), sample(decode, 0.8)), 0.8, 220 * 1024**2)]),
        ScenarioResult("context_fill", "Context fill", points=[
            PointResult("1024", 1024, (sample(decode, 1, prompt_tokens=1000),), 1, 230 * 1024**2, None, 64 * 1024**2),
            PointResult("4096", 4096, (sample(decode, 2, prompt_tokens=4000),), 2, 260 * 1024**2, None, 96 * 1024**2),
        ]),
        ScenarioResult("code_edit", "Code edit", status="failed",
                       error="llama-server exited with code -9 during the request; last log lines:\nboom"),
    ]
    return RunResult(id=run_id, created="2026-11-23T10:00:00+0000", target=info, hardware={},
                     config=BenchConfig(repeats=2), scenarios=scenarios, status="partial", duration_s=12.0,
                     events=["llama-server had exited with code -9; restarted it"])
