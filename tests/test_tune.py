"""The tuner (issue #6): server flag parsing, KV-type rules, planner decisions on recorded machines
with real GGUF metadata, draft auto-selection on real GGUFs, and plans the real server accepts.

The fast tests read the options from HELP_EXCERPT, lines copied verbatim from the pinned
llama-server's ``--help``; ``test_help_excerpt_matches_the_real_server`` keeps the copy honest
against the installed binary.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import get_args

import pytest
from click.testing import CliRunner

from tests.helpers import CPU_REPACK_Q4_1_PATCH, recorded_hardware, write_gguf
from velollm_patch import proc, serve, tune
from velollm_patch.bench.scenarios import PROMPTS_DIR
from velollm_patch.build import TUNABLE_KV_PAIRS
from velollm_patch.builds import InstalledBuild
from velollm_patch.cli import main
from velollm_patch.drafts import find_draft_candidates
from velollm_patch.errors import VelollmError
from velollm_patch.hardware import HardwareInfo, HostLoad, VulkanDevice
from velollm_patch.model import ModelInfo, inspect_model
from velollm_patch.ollama.modelfile import tuned_parameters
from velollm_patch.paths import Paths
from velollm_patch.serve import Device
from velollm_patch.server_flags import ServerFlags, parse_help, read_server_flags
from velollm_patch.tune import (
    AMX_WIDEN_PATCH,
    CPU_REPACK_Q8_0_PATCH,
    RUNTIME_BASE_BYTES,
    VOCAB_HEAP_BYTES_PER_TOKEN,
    BuildFacts,
    ChoiceKey,
    Plan,
    Speculation,
    TuneRequest,
    _fit_wanted,
    amx_tied_output_bytes,
    best_draft_length,
    expected_speedup,
    fit_print,
    kv_pair_problem,
    lazy_embedding_bytes,
    plan,
    repacked_tied_output_bytes,
    server_outputs,
    widened_q5_0_extra_bytes,
)
from velollm_patch.units import GiB, MiB

HELP_EXCERPT = """\
----- common params -----

-h,    --help, --usage                  print usage and exit
-t,    --threads N                      number of CPU threads to use during generation (default: -1)
                                        (env: LLAMA_ARG_THREADS)
-tb,   --threads-batch N                number of threads to use during batch and prompt processing (default:
                                        same as --threads)
--poll <0...100>                        use polling level to wait for work (0 - no polling, default: 50)
-c,    --ctx-size N                     size of the prompt context (default: 0, 0 = loaded from model)
                                        (env: LLAMA_ARG_CTX_SIZE)
--kv-unified-per-slot N                 context limit per parallel slot (default: unset, behavior unchanged).
                                        when set without -c/--ctx-size, the shared KV pool is sized to
                                        n_parallel*N
                                        (env: LLAMA_ARG_KV_UNIFIED_PER_SLOT)
-b,    --batch-size N                   logical maximum batch size (default: 2048)
                                        (env: LLAMA_ARG_BATCH)
-ub,   --ubatch-size N                  physical maximum batch size (default: 512)
                                        (env: LLAMA_ARG_UBATCH)
-kvu,  --kv-unified, -no-kvu, --no-kv-unified
                                        use single unified KV buffer shared across all sequences (default:
                                        enabled if number of slots is auto)
                                        (env: LLAMA_ARG_KV_UNIFIED)
-fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto', default: 'auto')
                                        (env: LLAMA_ARG_FLASH_ATTN)
-ctk,  --cache-type-k TYPE              KV cache data type for K
                                        allowed values: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1
                                        (default: f16)
                                        (env: LLAMA_ARG_CACHE_TYPE_K)
-ctv,  --cache-type-v TYPE              KV cache data type for V
                                        allowed values: f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1
                                        (default: f16)
                                        (env: LLAMA_ARG_CACHE_TYPE_V)
-ngl,  --gpu-layers, --n-gpu-layers N   max. number of layers to store in VRAM, either an exact number,
                                        'auto', or 'all' (default: auto)
                                        (env: LLAMA_ARG_N_GPU_LAYERS)
-m,    --model FNAME                    model path to load
                                        (env: LLAMA_ARG_MODEL)
-cram, --cache-ram N                    set the maximum cache size in MiB (default: 8192, -1 - no limit, 0 -
                                        disable)[(more
                                        info)](https://github.com/ggml-org/llama.cpp/pull/16391)
                                        (env: LLAMA_ARG_CACHE_RAM)
-ctxcp, --ctx-checkpoints, --swa-checkpoints N
                                        max number of context checkpoints to create per slot (default:
                                        32)[(more info)](https://github.com/ggml-org/llama.cpp/pull/15293)
                                        (env: LLAMA_ARG_CTX_CHECKPOINTS)


----- speculative params -----

--spec-draft-model, -md, --model-draft FNAME
                                        draft model for speculative decoding (default: unused)
                                        (env: LLAMA_ARG_SPEC_DRAFT_MODEL)
--spec-type none,draft-simple,draft-eagle3,draft-mtp,draft-dflash,draft-dspark,ngram-simple,ngram-map-k,ngram-map-k4v,ngram-mod,ngram-cache
                                        comma-separated list of types of speculative decoding to use (default:
                                        none)
                                        (env: LLAMA_ARG_SPEC_TYPE)
--spec-draft-n-max N                    number of tokens to draft for speculative decoding (default: 3)
                                        (env: LLAMA_ARG_SPEC_DRAFT_N_MAX)
--spec-draft-p-min, --draft-p-min P     minimum speculative decoding probability (greedy) (default: 0.00)
                                        (env: LLAMA_ARG_SPEC_DRAFT_P_MIN)
--draft, --draft-n, --draft-max N       the argument has been removed. use --spec-draft-n-max or
                                        --spec-ngram-mod-n-max
                                        (env: LLAMA_ARG_DRAFT_MAX)


----- example-specific params -----

-np,   --parallel N                     number of server slots (default: -1, -1 = auto)
                                        (env: LLAMA_ARG_N_PARALLEL)
--metrics                               enable prometheus compatible metrics endpoint (default: disabled)
                                        (env: LLAMA_ARG_ENDPOINT_METRICS)
"""  # noqa: E501 (the --spec-type line is as long as upstream prints it)

KV_ON_DEMAND_HELP = """\
--kv-on-demand                          commit KV cache memory on demand (needs -fa on)
                                        (env: LLAMA_ARG_KV_ON_DEMAND)
"""

SPEC_ADAPTIVE_HELP = """\
--spec-adaptive, --no-spec-adaptive     choose the draft length per slot and step from the measured acceptance
                                        and the cost of drafting (default: disabled)
                                        (env: LLAMA_ARG_SPEC_ADAPTIVE)
--spec-adaptive-min N                   smallest draft length chosen by --spec-adaptive (default: 1)
                                        (env: LLAMA_ARG_SPEC_ADAPTIVE_MIN)
"""

SPEC_BATCH_INVARIANT_HELP = """\
--spec-batch-invariant {on,off,auto}    CPU: compute each token of a batch exactly as alone, so that
                                        speculative decoding
                                        gives plain greedy decoding's text bit for bit (single tokens get
                                        slower)
                                        (default: auto = on when a --spec-type is set)
                                        (env: LLAMA_ARG_SPEC_BATCH_INVARIANT)
"""


@pytest.fixture(scope="module")
def flags() -> ServerFlags:
    return ServerFlags("excerpt", tuple(parse_help(HELP_EXCERPT)))


def facts(
    flags: ServerFlags, backend: str = "cpu", patches: tuple[str, ...] = (),
    fa_kv_pairs: tuple[str, ...] | None = None,
) -> BuildFacts:
    """A build as the planner sees it, without llama-fit-params: the arithmetic path."""
    if backend == "cuda" and fa_kv_pairs is None:
        fa_kv_pairs = TUNABLE_KV_PAIRS
    return BuildFacts(f"test-{backend}", backend, patches, fa_kv_pairs, flags, None)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> ModelInfo:
    return inspect_model(smollm2_gguf)


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf: Path) -> ModelInfo:
    return inspect_model(gemma3_gguf)


@pytest.fixture(autouse=True)
def no_local_model_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Draft searches see only the directories a test passes, not this machine's model stores."""
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "no-ollama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hf"))


def choice(p: Plan, key: str) -> str:
    found = [c for c in p.choices if c.key == key]
    assert found, f"no choice {key} in {[c.key for c in p.choices]}"
    assert found[0].reason, key
    return found[0].value


def arg(p: Plan, name: str) -> str | None:
    args = list(p.args)
    return args[args.index(name) + 1] if name in args else None


# --------------------------------------------------------------------------------------------
# server flags
# --------------------------------------------------------------------------------------------


def test_parse_help_names_values_env(flags: ServerFlags) -> None:
    threads = flags.get("-t")
    assert threads is not None and threads.names == ("-t", "--threads") and threads.value_hint == "N"
    assert threads.env == "LLAMA_ARG_THREADS"
    assert flags.get("--threads-batch") is not None and flags.get("-tb").env is None  # type: ignore[union-attr]
    kvu = flags.get("--no-kv-unified")
    assert kvu is not None and kvu.names == ("-kvu", "--kv-unified") and kvu.negative == ("-no-kvu", "--no-kv-unified")
    assert flags.get("-ngl").names == ("-ngl", "--gpu-layers", "--n-gpu-layers")  # type: ignore[union-attr]
    assert flags.get("-fa").choices() == ("on", "off", "auto")  # type: ignore[union-attr]
    spec = flags.get("--spec-type")
    assert spec is not None and "ngram-mod" in spec.choices() and "draft-simple" in spec.choices()
    assert flags.first("--model-draft", "-md") == "--model-draft"
    assert flags.get("--kv-unified-per-slot").env == "LLAMA_ARG_KV_UNIFIED_PER_SLOT"  # type: ignore[union-attr]
    assert not flags.accepts("--help-me")


def test_removed_flags_are_not_accepted(flags: ServerFlags) -> None:
    # Upstream lists --draft-max only to tell users it is gone; passing it is a hard error.
    assert not flags.accepts("--draft-max")
    assert flags.first("--draft-max", "--spec-draft-n-max") == "--spec-draft-n-max"


def test_env_assignment(flags: ServerFlags) -> None:
    assert flags.env_assignment("-c", "4096") == ("LLAMA_ARG_CTX_SIZE", "4096")
    assert flags.env_assignment("--kv-unified", None) == ("LLAMA_ARG_KV_UNIFIED", "1")
    assert flags.env_assignment("-no-kvu", None) == ("LLAMA_ARG_KV_UNIFIED", "0")
    assert flags.env_assignment("--metrics", None) == ("LLAMA_ARG_ENDPOINT_METRICS", "1")
    assert flags.env_assignment("-tb", "2") is None
    with pytest.raises(VelollmError, match="needs a value"):
        flags.env_assignment("-c", None)


# --------------------------------------------------------------------------------------------
# KV type rules
# --------------------------------------------------------------------------------------------


def test_quantized_v_needs_flash_attention(smollm2: ModelInfo) -> None:
    problem = kv_pair_problem(smollm2, "cpu", "q8_0", "q8_0", flash_attn=False, fa_kv_pairs=None)
    assert problem is not None and "flash attention" in problem
    # A quantized K alone works without it.
    assert kv_pair_problem(smollm2, "cpu", "q8_0", "f16", flash_attn=False, fa_kv_pairs=None) is None


def test_head_dims_must_fit_the_quantization_block(smollm2: ModelInfo) -> None:
    odd = dataclasses.replace(smollm2, head_dim_k=80, head_dim_k_swa=80, head_dim_v=80, head_dim_v_swa=80)
    assert not odd.head_dims_allow_quantized_kv()
    problem = kv_pair_problem(odd, "cpu", "q8_0", "q8_0", flash_attn=True, fa_kv_pairs=None)
    assert problem is not None and "head sizes" in problem
    assert kv_pair_problem(odd, "cpu", "f16", "f16", flash_attn=True, fa_kv_pairs=None) is None


def test_cuda_only_compiled_pairs_and_never_iq4_nl(smollm2: ModelInfo) -> None:
    pairs = ("f16-f16", "q8_0-q8_0")
    assert kv_pair_problem(smollm2, "cuda", "q8_0", "q8_0", flash_attn=True, fa_kv_pairs=pairs) is None
    problem = kv_pair_problem(smollm2, "cuda", "q8_0", "q4_0", flash_attn=True, fa_kv_pairs=pairs)
    assert problem is not None and "compiled" in problem
    problem = kv_pair_problem(smollm2, "cuda", "iq4_nl", "iq4_nl", flash_attn=True, fa_kv_pairs=None)
    assert problem is not None and "iq4_nl" in problem
    # The CPU and Vulkan run any pair.
    assert kv_pair_problem(smollm2, "cpu", "q8_0", "q4_0", flash_attn=True, fa_kv_pairs=pairs) is None
    assert kv_pair_problem(smollm2, "vulkan", "iq4_nl", "q4_0", flash_attn=True, fa_kv_pairs=None) is None


def test_metal_needs_equal_k_and_v(smollm2: ModelInfo) -> None:
    problem = kv_pair_problem(smollm2, "metal", "q8_0", "q4_0", flash_attn=True, fa_kv_pairs=None)
    assert problem is not None and "Metal" in problem
    assert kv_pair_problem(smollm2, "metal", "q4_0", "q4_0", flash_attn=True, fa_kv_pairs=None) is None


# --------------------------------------------------------------------------------------------
# planner decisions on recorded machines
# --------------------------------------------------------------------------------------------


def test_cpu_2core_box(smollm2: ModelInfo, flags: ServerFlags) -> None:
    p = plan(smollm2, recorded_hardware("cpu-2core"), facts(flags))
    assert p.backend == "cpu" and "no GPU" in p.reason("backend")
    assert (arg(p, "--threads"), arg(p, "--threads-batch")) == ("2", "2")
    assert "--gpu-layers" not in p.args
    # Balanced on the CPU keeps f16 K/V (no conversion per step) with flash attention on.
    assert (arg(p, "--cache-type-k"), arg(p, "--cache-type-v"), arg(p, "--flash-attn")) == ("f16", "f16", "on")
    assert choice(p, "kv_types") == "f16/f16"
    assert arg(p, "--parallel") == "4" and "--kv-unified" in p.args
    # 4 slots x 4096 would reserve more than upstream's default; without on-demand KV the pool is
    # capped at the trained context (8192 for SmolLM2).
    assert arg(p, "--ctx-size") == "8192" and arg(p, "--kv-unified-per-slot") == "4096"
    assert (arg(p, "--batch-size"), arg(p, "--ubatch-size")) == ("2048", "512")
    assert p.settings.speculation is None and choice(p, "speculation") == "off"
    assert p.memory.method == "arithmetic" and p.memory.device_bytes == 0
    assert p.memory.kv_bytes == smollm2.kv_bytes(8192, 4, "f16", "f16")
    assert p.memory.weights_bytes == smollm2.file_size
    assert p.env["LLAMA_ARG_MODEL"] == str(smollm2.path) and p.env["LLAMA_ARG_CTX_SIZE"] == "8192"
    assert p.env["LLAMA_ARG_KV_UNIFIED"] == "1" and p.env["LLAMA_ARG_ENDPOINT_METRICS"] == "1"
    assert p.not_applied == ()


def test_plan_memory_counts_what_the_server_holds(smollm2: ModelInfo, gemma3: ModelInfo, flags: ServerFlags) -> None:
    hw = recorded_hardware("cpu-2core")
    # SmolLM2 has no sliding window: no checkpoints are made, so none are planned or set.
    p = plan(smollm2, hw, facts(flags, "cpu"))
    assert p.settings.ctx_checkpoints is None and "--ctx-checkpoints" not in p.args
    assert p.memory.checkpoint_bytes == 0
    assert p.memory.runtime_bytes == RUNTIME_BASE_BYTES + VOCAB_HEAP_BYTES_PER_TOKEN * 49152
    # gemma3 (SWA): the slots' checkpoints are bounded and counted, each a copy of 15 layers x 512 cells
    g = plan(gemma3, hw, facts(flags, "cpu"))
    assert arg(g, "--ctx-checkpoints") == "4" and "upstream keeps up to 32" in g.reason("ctx_checkpoints")
    assert g.memory.checkpoint_bytes == 4 * 4 * gemma3.swa_checkpoint_bytes()
    m = g.memory
    parts = m.weights_bytes + m.kv_bytes + m.compute_bytes + m.draft_bytes + m.checkpoint_bytes + m.runtime_bytes
    assert m.total_bytes == parts + m.repack_bytes + m.prompt_cache_bytes
    assert "checkpoints" in "\n".join(g.describe())
    assert "7.5 MiB copy" in g.reason("ctx_checkpoints")
    # the memory profile keeps only the last request's two, each the size of its smaller KV types
    small = plan(gemma3, hw, facts(flags, "cpu"), TuneRequest(profile="memory"))
    assert arg(small, "--ctx-checkpoints") == "2"
    k, v = small.settings.cache_type_k, small.settings.cache_type_v
    assert (k, v) != ("f16", "f16")
    assert f"{gemma3.swa_checkpoint_bytes(k, v) / MiB:.1f} MiB copy" in small.reason("ctx_checkpoints")
    assert small.memory.checkpoint_bytes == 1 * 2 * gemma3.swa_checkpoint_bytes(k, v)
    # the compute estimate reserves logits for the 4 slots' outputs, not for the whole 512-token ubatch
    assert m.compute_bytes < 4 * 512 * 262144


def test_prompt_cache_holds_one_copy_of_the_slots(gemma3: ModelInfo, smollm2: ModelInfo, flags: ServerFlags) -> None:
    hw = recorded_hardware("cpu-2core")
    # a saved slot is its KV and its checkpoints: the cache holds one such copy of every slot, and is counted
    g = plan(gemma3, hw, facts(flags, "cpu"))
    m = g.memory
    assert arg(g, "--cache-ram") == str((m.kv_bytes + m.checkpoint_bytes) // MiB)
    assert m.prompt_cache_bytes == int(arg(g, "--cache-ram") or 0) * MiB > 0
    assert "one saved copy of every slot's KV" in g.reason("cache_ram") and "8192 MiB" in g.reason("cache_ram")
    assert "prompt cache" in "\n".join(g.describe())
    assert g.env["LLAMA_ARG_CACHE_RAM"] == arg(g, "--cache-ram")
    # with little RAM left it takes what the budget leaves, never more
    p = plan(smollm2, hw, facts(flags, "cpu"))
    need = p.memory.total_bytes - p.memory.prompt_cache_bytes
    budget = need + max(GiB, need // 9) + 10 * MiB  # leaves 10 MiB after the 1 GiB (or 10 %) margin
    tight = dataclasses.replace(hw, memory=dataclasses.replace(hw.memory, available_bytes=budget))
    t = plan(smollm2, tight, facts(flags, "cpu"))
    assert 0 < int(arg(t, "--cache-ram") or 0) <= 10 < p.memory.prompt_cache_bytes // MiB
    assert "what RAM has left" in t.reason("cache_ram")
    # the memory profile turns it off; a server without a prompt cache gets no flag and nothing is counted
    assert arg(plan(smollm2, hw, facts(flags, "cpu"), TuneRequest(profile="memory")), "--cache-ram") == "0"
    old_flags = ServerFlags("old", tuple(f for f in flags.flags if "--cache-ram" not in f.all_names))
    o = plan(smollm2, hw, facts(old_flags, "cpu"))
    assert "--cache-ram" not in o.args and o.memory.prompt_cache_bytes == 0 and o.settings.cache_ram_mib is None


def test_amx_copy_of_a_tied_output_matrix(smollm2: ModelInfo, gemma3: ModelInfo) -> None:
    # both demo models tie their output to Q8_0 embeddings; AMX packs Q8_0 with 4 more bytes a 32-value block
    assert gemma3.tied_embedding == ("Q8_0", 170 * MiB)
    for widen in (False, True):
        assert amx_tied_output_bytes(gemma3, widen) == 170 * MiB + 640 // 32 * 262144 * 4 == 190 * MiB
        assert smollm2.tied_embedding is not None and smollm2.tied_embedding[0] == "Q8_0"
        assert amx_tied_output_bytes(smollm2, widen) == smollm2.tied_embedding[1] + 576 // 32 * 49152 * 4
        # an output matrix of its own is multiplied in place: no duplicate
        assert amx_tied_output_bytes(dataclasses.replace(gemma3, tied_embedding=None), widen) == 0
    # a type AMX has no kernel for stays out, unless the build widens it (Q5_0, 22 bytes, as packed Q8_0: 38)
    q5_0 = dataclasses.replace(gemma3, tied_embedding=("Q5_0", 640 // 32 * 262144 * 22))
    assert amx_tied_output_bytes(q5_0, widen=False) == 0
    assert amx_tied_output_bytes(q5_0, widen=True) == 640 // 32 * 262144 * 38


def test_cpu_repack_copy_of_a_tied_output_matrix(smollm2: ModelInfo, gemma3: ModelInfo) -> None:
    """Patch cpu-repack-q8-0 (x86 with VNNI, no AMX): a tied Q8_0 or Q5_0 output matrix gets a CPU_REPACK copy of
    Q8_0 blocks, and the Q5_0 matrices are held widened, 12 more bytes a block."""
    cpu = dataclasses.replace(facts(ServerFlags("test", ()), "cpu"), cpu_repack_q8_0=True)
    assert repacked_tied_output_bytes(cpu, gemma3) == 640 // 32 * 262144 * 34 == 170 * MiB
    assert smollm2.tied_embedding is not None
    assert repacked_tied_output_bytes(cpu, smollm2) == smollm2.tied_embedding[1] == 576 // 32 * 49152 * 34
    q5_0 = dataclasses.replace(gemma3, tied_embedding=("Q5_0", 640 // 32 * 262144 * 22))
    assert repacked_tied_output_bytes(cpu, q5_0) == 170 * MiB
    assert repacked_tied_output_bytes(cpu, dataclasses.replace(gemma3, tied_embedding=None)) == 0
    assert widened_q5_0_extra_bytes(cpu, gemma3) == gemma3.q5_0_rows8_blocks * 12 > 0
    assert widened_q5_0_extra_bytes(cpu, smollm2) == 0
    # without the patch (or without VNNI) the output product reads the embedding itself
    plain = dataclasses.replace(cpu, cpu_repack_q8_0=False)
    assert repacked_tied_output_bytes(plain, gemma3) == widened_q5_0_extra_bytes(plain, gemma3) == 0
    # on AMX builds the AMX buffer takes those types first
    amx = dataclasses.replace(cpu, amx=True, patches=(AMX_WIDEN_PATCH,))
    assert repacked_tied_output_bytes(amx, gemma3) == amx_tied_output_bytes(gemma3, widen=True)
    assert widened_q5_0_extra_bytes(amx, gemma3) == gemma3.q5_0_matrix_blocks * 16


def test_widened_q5_0_matrices_and_the_lazy_embedding(gemma3: ModelInfo, smollm2: ModelInfo) -> None:
    # gemma3-270m Q4_K_M: attn_q, attn_k, ffn_gate, ffn_up and half the attn_v are Q5_0 (640-wide rows are no
    # multiple of 256)
    assert gemma3.q5_0_matrix_blocks == (18 * 640 * (1024 + 256 + 2048 + 2048) + 9 * 640 * 256) // 32
    assert smollm2.q5_0_matrix_blocks == 0
    # their row counts are multiples of 8 too, which is what CPU_REPACK asks of them
    assert gemma3.q5_0_rows8_blocks == gemma3.q5_0_matrix_blocks
    assert smollm2.q5_0_rows8_blocks == 0
    # SmolLM2 Q4_1: every layer matrix is Q4_1 (30 layers of q, k, v, o and three FFN matrices; 20 bytes per 32
    # values), the tied Q8_0 embedding is not; gemma3-270m has none
    assert smollm2.q4_1_matrix_bytes == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) * 20 // 32
    assert gemma3.q4_1_matrix_bytes == 0
    assert gemma3.embedding_bytes == 170 * MiB
    # a page per distinct token, a quarter of the context; never more than the tensor
    assert lazy_embedding_bytes(gemma3, 16384) == 4096 * 4096
    assert lazy_embedding_bytes(gemma3, 1 << 30) == gemma3.embedding_bytes


def test_server_outputs_follow_the_server_limits() -> None:
    assert server_outputs(None, 4, 2048) == 4
    assert server_outputs(Speculation(("ngram-mod",)), 4, 2048) == 4 * 65
    assert server_outputs(Speculation(("ngram-mod",)), 64, 2048) == 2048  # at most a batch
    assert server_outputs(Speculation(("draft-simple",), draft_n_max=5), 2, 2048) == 2 * 6
    # an adaptive draft model may draft up to 16 tokens whatever its starting length
    assert server_outputs(Speculation(("draft-simple",), draft_n_max=5, adaptive_flag="--spec-adaptive"), 2, 2048) == 34


def test_cpu_box_with_little_ram_fails_clearly(smollm2: ModelInfo, flags: ServerFlags) -> None:
    hw = recorded_hardware("cpu-2core")
    tiny = dataclasses.replace(hw, memory=dataclasses.replace(hw.memory, available_bytes=1 * GiB + 64 * MiB))
    with pytest.raises(VelollmError, match="RAM is available"):
        plan(smollm2, tiny, facts(flags))


def test_rtx3060(smollm2: ModelInfo, flags: ServerFlags) -> None:
    p = plan(smollm2, recorded_hardware("rtx3060"), facts(flags, "cuda"))
    assert "RTX 3060" in p.reason("backend")
    assert arg(p, "--gpu-layers") == str(smollm2.n_layers + 1) and choice(p, "gpu_layers") == "all"
    # Balanced on a GPU: q8_0 K/V, one of the pairs compiled into the build.
    assert (arg(p, "--cache-type-k"), arg(p, "--cache-type-v")) == ("q8_0", "q8_0")
    # All on the GPU: a few threads feed it.
    assert arg(p, "--threads") == "4"
    # 11.3 GiB free: not enough to prefer 1024-token ubatches.
    assert arg(p, "--ubatch-size") == "512"
    assert p.memory.device_bytes > 0


def test_rtx4090_and_h100_use_large_ubatches(smollm2: ModelInfo, gemma3: ModelInfo, flags: ServerFlags) -> None:
    for machine in ("rtx4090", "h100"):
        for model in (smollm2, gemma3):
            p = plan(model, recorded_hardware(machine), facts(flags, "cuda"))
            assert arg(p, "--ubatch-size") == "1024", machine
            assert choice(p, "gpu_layers") == "all"


def test_h100_quality_profile(gemma3: ModelInfo, flags: ServerFlags) -> None:
    p = plan(gemma3, recorded_hardware("h100"), facts(flags, "cuda"), TuneRequest(profile="quality"))
    assert (arg(p, "--cache-type-k"), arg(p, "--cache-type-v")) == ("f16", "f16")
    # Each slot may use the full trained context of the shared pool.
    assert arg(p, "--ctx-size") == str(gemma3.n_ctx_train) and "--kv-unified-per-slot" not in p.args
    assert "full trained context" in p.reason("ctx_per_slot")


def test_m2max_memory_profile(smollm2: ModelInfo, flags: ServerFlags) -> None:
    p = plan(smollm2, recorded_hardware("m2max"), facts(flags, "metal"), TuneRequest(profile="memory"))
    # q8_0 K / q4_0 V is the memory profile's first pick, but Metal needs K == V.
    assert choice(p, "kv_types") == "q4_0/q4_0"
    assert "Metal" in p.reason("kv_types")
    assert arg(p, "--parallel") == "1" and "--kv-unified" not in p.args and "--no-kv-unified" not in p.args
    assert arg(p, "--ubatch-size") == "256"


def test_cuda_memory_profile_respects_the_compiled_pairs(smollm2: ModelInfo, flags: ServerFlags) -> None:
    build = facts(flags, "cuda", fa_kv_pairs=("f16-f16", "q8_0-q8_0", "q4_0-q4_0"))
    p = plan(smollm2, recorded_hardware("rtx3060"), build, TuneRequest(profile="memory"))
    assert choice(p, "kv_types") == "q4_0/q4_0"
    assert "compiled" in p.reason("kv_types")
    default = plan(smollm2, recorded_hardware("rtx3060"), facts(flags, "cuda"), TuneRequest(profile="memory"))
    assert choice(default, "kv_types") == "q8_0/q4_0"


def test_partial_offload_from_arithmetic(gemma3: ModelInfo, flags: ServerFlags) -> None:
    hw = recorded_hardware("rtx3060")
    gpu = dataclasses.replace(hw.gpus[0], vram_free_bytes=1024 * MiB + 200 * MiB)
    small = dataclasses.replace(hw, gpus=(gpu,))
    p = plan(gemma3, small, facts(flags, "cuda"))
    layers = int(arg(p, "--gpu-layers") or "-1")
    assert 0 < layers < gemma3.n_layers + 1
    assert "the rest run on the CPU" in p.reason("gpu_layers")
    # Layers stay on the CPU, so its threads matter again.
    assert arg(p, "--threads") == str(hw.cpu.physical_cores)
    assert arg(p, "--threads-batch") == str(hw.cpu.logical_cores)


# --------------------------------------------------------------------------------------------
# a busy machine
# --------------------------------------------------------------------------------------------


def load(*per_cpu: float, own: float = 0.0) -> HostLoad:
    return HostLoad(per_cpu, own, 1.0)


def test_a_core_busy_with_another_program_is_left_to_it(smollm2: ModelInfo, flags: ServerFlags) -> None:
    hw = recorded_hardware("cpu-2core")
    p = plan(smollm2, hw, facts(flags), load=load(100.0, 4.0))
    assert (arg(p, "--threads"), arg(p, "--threads-batch"), arg(p, "--poll")) == ("1", "1", "0")
    assert "1 of 2 cores are taken" in p.reason("threads") and "1.0 CPUs busy" in p.reason("threads")
    assert "sleep" in p.reason("poll")
    assert p.settings.poll == 0


def test_a_quiet_machine_keeps_todays_plan(smollm2: ModelInfo, flags: ServerFlags) -> None:
    hw = recorded_hardware("cpu-2core")
    unmeasured = plan(smollm2, hw, facts(flags))
    for quiet in (load(30.0, 10.0), load(100.0, 0.0, own=100.0)):  # the planner's own work is not load
        p = plan(smollm2, hw, facts(flags), load=quiet)
        assert p.args == unmeasured.args and "--poll" not in p.args
        assert [c.key for c in p.choices] == [c.key for c in unmeasured.choices]
    assert arg(unmeasured, "--threads") == "2" and arg(unmeasured, "--threads-batch") == "2"


def test_machine_shared_and_dedicated(smollm2: ModelInfo, flags: ServerFlags) -> None:
    hw = recorded_hardware("cpu-2core")
    shared = plan(smollm2, hw, facts(flags), TuneRequest(machine="shared"))
    assert (arg(shared, "--threads"), arg(shared, "--poll")) == ("1", "0")
    assert "--machine shared" in shared.reason("threads")
    busy = load(100.0, 100.0)
    dedicated = plan(smollm2, hw, facts(flags), TuneRequest(machine="dedicated"), load=busy)
    assert arg(dedicated, "--threads") == "2" and "--poll" not in dedicated.args
    # Both cores taken: one thread still runs, and says so.
    full = plan(smollm2, hw, facts(flags), load=busy)
    assert arg(full, "--threads") == "1" and "(at least one)" in full.reason("threads")
    with pytest.raises(VelollmError, match="unknown machine"):
        plan(smollm2, hw, facts(flags), TuneRequest(machine="laptop"))


def test_busy_logical_cpus_count_as_their_share_of_a_core(smollm2: ModelInfo, flags: ServerFlags) -> None:
    """On 24 cores / 32 threads (rtx4090's host), two busy hardware threads are 1.5 cores' worth: one core
    taken; a single one (0.75 of a core) takes one too, half of one (0.375) none."""
    hw = recorded_hardware("rtx4090")
    cpu = facts(flags, "cpu")
    rest = (0.0,) * 30
    assert arg(plan(smollm2, hw, cpu, load=load(100.0, 100.0, *rest)), "--threads") == "23"
    assert arg(plan(smollm2, hw, cpu, load=load(100.0, 0.0, *rest)), "--threads") == "23"
    assert arg(plan(smollm2, hw, cpu, load=load(50.0, 0.0, *rest)), "--threads") == "24"


def test_cpu_build_on_a_gpu_machine_plans_for_the_cpu(smollm2: ModelInfo, flags: ServerFlags) -> None:
    p = plan(smollm2, recorded_hardware("rtx4090"), facts(flags, "cpu"))
    assert p.backend == "cpu" and "--gpu-layers" not in p.args
    assert "CPU-only" in p.reason("backend")


def test_gpu_build_without_its_gpu_is_an_error(smollm2: ModelInfo, flags: ServerFlags) -> None:
    with pytest.raises(VelollmError, match="no nvidia GPU"):
        plan(smollm2, recorded_hardware("cpu-2core"), facts(flags, "cuda"))


LLVMPIPE = "llvmpipe (LLVM 15.0.6, 256 bits)"


def vulkan_facts(flags: ServerFlags, free_mib: int = 2048) -> BuildFacts:
    """A Vulkan build whose server lists Mesa's software device, as with GGML_VK_VISIBLE_DEVICES=0."""
    device = Device("Vulkan0", LLVMPIPE, 2048 * MiB, free_mib * MiB)
    return dataclasses.replace(facts(flags, "vulkan"), devices=(device,))


def llvmpipe_machine() -> HardwareInfo:
    return dataclasses.replace(recorded_hardware("cpu-2core"), vulkan_devices=(VulkanDevice(0, LLVMPIPE, "cpu"),))


def test_vulkan_plans_for_the_devices_its_build_lists(smollm2: ModelInfo, flags: ServerFlags) -> None:
    p = plan(smollm2, llvmpipe_machine(), vulkan_facts(flags))
    assert p.backend == "vulkan"
    assert LLVMPIPE in p.reason("backend") and "software device" in p.reason("backend")
    # 2 GiB less the 1 GiB margin holds SmolLM2 and its default context: every layer goes to the device
    assert choice(p, "gpu_layers") == "all" and arg(p, "--gpu-layers") == str(smollm2.n_layers + 1)
    assert arg(p, "--flash-attn") == "on" and p.memory.device_bytes > 0


def test_vulkan_long_context_is_split_between_device_and_cpu(smollm2: ModelInfo, flags: ServerFlags) -> None:
    # a 64K-token f16 KV cache alone is ~1.4 GiB: more than the software device's 2 GiB less the margin
    p = plan(smollm2, llvmpipe_machine(), vulkan_facts(flags), TuneRequest(ctx=65536, profile="quality"))
    layers = int(arg(p, "--gpu-layers") or "-1")
    assert 0 < layers < smollm2.n_layers + 1, layers
    assert "the rest run on the CPU" in p.reason("gpu_layers")


def test_vulkan_build_that_sees_no_device_is_an_error(smollm2: ModelInfo, flags: ServerFlags) -> None:
    # ggml-vulkan skips CPU-type devices unless GGML_VK_VISIBLE_DEVICES names them: the build lists none
    no_device = dataclasses.replace(facts(flags, "vulkan"), devices=())
    with pytest.raises(VelollmError, match="sees no Vulkan device.*GGML_VK_VISIBLE_DEVICES"):
        plan(smollm2, llvmpipe_machine(), no_device)


def test_code_workload_uses_ngram_speculation(smollm2: ModelInfo, flags: ServerFlags) -> None:
    p = plan(smollm2, recorded_hardware("cpu-2core"), facts(flags), TuneRequest(workload="code"))
    assert arg(p, "--spec-type") == "ngram-mod"
    assert choice(p, "spec_ngram") == "ngram-mod"
    assert p.env["LLAMA_ARG_SPEC_TYPE"] == "ngram-mod"
    # Code needs more context per slot than chat.
    assert arg(p, "--kv-unified-per-slot") is None and arg(p, "--ctx-size") == "8192"


def test_adaptive_draft_length_when_the_build_has_it(smollm2: ModelInfo, flags: ServerFlags) -> None:
    with_flag = ServerFlags("excerpt+adaptive", (*flags.flags, *parse_help(SPEC_ADAPTIVE_HELP)))
    patched = facts(with_flag, patches=("spec-adaptive",))
    p = plan(smollm2, recorded_hardware("cpu-2core"), patched, TuneRequest(workload="edit"))
    assert arg(p, "--spec-type") == "ngram-mod" and "--spec-adaptive" in p.args
    assert "--no-spec-adaptive" not in p.args and p.env["LLAMA_ARG_SPEC_ADAPTIVE"] == "1"
    assert choice(p, "spec_adaptive") == "--spec-adaptive"
    # ... and may stop drafting where drafts do not pay
    assert arg(p, "--spec-adaptive-min") == "0" and p.env["LLAMA_ARG_SPEC_ADAPTIVE_MIN"] == "0"
    assert choice(p, "spec_adaptive_min") == "0"
    # chat with no draft model: nothing to adapt
    p = plan(smollm2, recorded_hardware("cpu-2core"), patched)
    assert "--spec-adaptive" not in p.args and "--spec-adaptive-min" not in p.args
    # the flag without the patch in the manifest: fixed lengths, as upstream
    p = plan(smollm2, recorded_hardware("cpu-2core"), facts(with_flag), TuneRequest(workload="edit"))
    assert "--spec-adaptive" not in p.args


def test_lossless_speculation_when_the_build_has_it(smollm2: ModelInfo, flags: ServerFlags) -> None:
    with_flag = ServerFlags("excerpt+invariant", (*flags.flags, *parse_help(SPEC_BATCH_INVARIANT_HELP)))
    patched = facts(with_flag, patches=("spec-batch-invariant",))
    p = plan(smollm2, recorded_hardware("cpu-2core"), patched, TuneRequest(workload="edit"))
    assert arg(p, "--spec-batch-invariant") == "on" and p.env["LLAMA_ARG_SPEC_BATCH_INVARIANT"] == "on"
    assert choice(p, "spec_batch_invariant") == "on"
    assert p.to_dict()["settings"]["speculation"]["batch_invariant"] is True
    # no speculation (chat, no draft model): nothing to verify
    assert "--spec-batch-invariant" not in plan(smollm2, recorded_hardware("cpu-2core"), patched).args
    # the flag without the patch in the manifest, as upstream
    p = plan(smollm2, recorded_hardware("cpu-2core"), facts(with_flag), TuneRequest(workload="edit"))
    assert "--spec-batch-invariant" not in p.args


def test_requested_context_and_slots(gemma3: ModelInfo, flags: ServerFlags) -> None:
    p = plan(gemma3, recorded_hardware("cpu-2core"), facts(flags), TuneRequest(ctx=2048, slots=2))
    assert (arg(p, "--ctx-size"), arg(p, "--parallel"), arg(p, "--kv-unified-per-slot")) == ("4096", "2", "2048")
    assert choice(p, "slots") == "2" and "as requested" in p.reason("slots")
    with pytest.raises(VelollmError, match="too small"):
        plan(gemma3, recorded_hardware("cpu-2core"), facts(flags), TuneRequest(ctx=16))


def test_kv_on_demand_when_the_build_has_it(smollm2: ModelInfo, flags: ServerFlags) -> None:
    with_flag = ServerFlags("excerpt+kv", (*flags.flags, *parse_help(KV_ON_DEMAND_HELP)))
    p = plan(smollm2, recorded_hardware("cpu-2core"), facts(with_flag, patches=("kv-on-demand",)))
    assert "--kv-on-demand" in p.args and choice(p, "kv_on_demand") == "on"
    assert p.env["LLAMA_ARG_KV_ON_DEMAND"] == "1"
    # Committed on demand, so every slot gets its whole context.
    assert arg(p, "--ctx-size") == str(4 * 4096) and p.memory.kv_on_demand
    # The patch without a server flag for it (renamed upstream, or an older build): not used.
    p = plan(smollm2, recorded_hardware("cpu-2core"), facts(flags, patches=("kv-on-demand",)))
    assert "--kv-on-demand" not in p.args and choice(p, "kv_on_demand") == "off"
    # The flag without the patch recorded in the manifest: not used either.
    p = plan(smollm2, recorded_hardware("cpu-2core"), facts(with_flag))
    assert "--kv-on-demand" not in p.args


def test_flags_the_server_lacks_are_reported_not_emitted(smollm2: ModelInfo, flags: ServerFlags) -> None:
    older = ServerFlags("older", tuple(f for f in flags.flags if "--kv-unified-per-slot" not in f.names))
    p = plan(smollm2, recorded_hardware("cpu-2core"), facts(older))
    assert "--kv-unified-per-slot" not in p.args
    assert any("--kv-unified-per-slot" in n for n in p.not_applied)


def test_plan_json_and_describe(smollm2: ModelInfo, flags: ServerFlags) -> None:
    p = plan(smollm2, recorded_hardware("cpu-2core"), facts(flags))
    data = p.to_dict()
    assert data["args"] == list(p.args) and data["env"] == p.env
    assert data["memory"]["total_bytes"] == p.memory.total_bytes
    assert all(c["reason"] for c in data["choices"])
    text = "\n".join(p.describe())
    assert "memory:" in text and "command: llama-server -m" in text


def test_the_choice_keys_are_the_ones_the_planner_notes() -> None:
    """mypy checks each key noted or read (Plan.reason) against ChoiceKey; this checks ChoiceKey against the
    planner, so a key renamed where it is noted, with the old name still listed for its readers, fails here."""
    tree = ast.parse(Path(tune.__file__).read_text(encoding="utf-8"))
    noted = {
        node.args[0].value for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "note"
        and isinstance(node.args[0], ast.Constant)
    }
    assert noted == set(get_args(ChoiceKey))


def test_a_modelfile_carries_the_plans_reasons(smollm2: ModelInfo, flags: ServerFlags, tmp_path: Path) -> None:
    """The PARAMETERs and DRAFT a plan becomes in a Modelfile are commented with the reasons of their choices:
    a key renamed on one side only fails here, as Plan.reason raises on a key the plan has no choice for."""
    target = inspect_model(write_gguf(tmp_path / "target.gguf", n_layers=8, n_embd=256))
    given = TuneRequest(draft=str(write_gguf(tmp_path / "draft.gguf")))
    drafted = plan(target, recorded_hardware("cpu-2core"), facts(flags), given)
    on_gpu = plan(smollm2, recorded_hardware("rtx3060"), facts(flags, "cuda"))
    read_by: tuple[tuple[Plan, dict[str, ChoiceKey]], ...] = (
        (drafted, {"num_ctx": "ctx_per_slot", "num_thread": "threads", "draft": "spec_draft"}),
        (on_gpu, {"num_ctx": "ctx_per_slot", "num_thread": "threads", "num_gpu": "gpu_layers"}),
    )
    for p, read in read_by:
        noted = {c.key: c.reason for c in p.choices}
        _, reasons, _ = tuned_parameters(p)
        assert {name: reasons[name] for name in read} == {name: noted[key] for name, key in read.items()}
    with pytest.raises(KeyError, match="no 'gpu_layers' choice"):
        drafted.reason("gpu_layers")  # a CPU plan offloads nothing


def test_draft_length_grows_as_the_draft_gets_cheaper() -> None:
    lengths = [best_draft_length(0.75, cost) for cost in (0.5, 0.3, 0.1, 0.03, 0.01)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    assert best_draft_length(0.9, 0.1) > best_draft_length(0.6, 0.1)
    # No draft at all is a speed-up of 1; a free, always-right draft of k tokens gives k + 1.
    assert expected_speedup(0.0, 0.0, 4) == 1.0
    assert expected_speedup(0.999999, 0.0, 4) == pytest.approx(5.0, rel=1e-3)


# --------------------------------------------------------------------------------------------
# real build: flags, memory oracle, drafts, plans the server accepts
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_facts(patched_build: InstalledBuild, paths: Paths) -> BuildFacts:
    return BuildFacts.from_build(patched_build, paths)


@pytest.fixture(scope="module")
def smollm2_f16(patched_build: InstalledBuild, smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 requantized to F16 by the build's llama-quantize: a bigger target the Q4_1 original drafts for."""
    out = tmp_path_factory.mktemp("targets") / "smollm2-135m-f16.gguf"
    proc.run(
        [patched_build.bin("llama-quantize"), "--allow-requantize", smollm2_gguf, out, "F16"],
        timeout=600, what="llama-quantize",
    )
    return out


@pytest.mark.slow
def test_help_excerpt_matches_the_real_server(patched_server: Path, paths: Paths, flags: ServerFlags) -> None:
    real = read_server_flags(patched_server, paths)
    for spec in flags.flags:
        if spec.removed:
            continue
        found = real.get(spec.names[-1])
        assert found is not None, spec.names
        assert (found.names, found.negative, found.env) == (spec.names, spec.negative, spec.env)
    # upstream removed --draft-max; the spec-legacy-flags patch accepts it again (with a deprecation warning)
    assert real.accepts("--draft-max")
    assert real.get("--spec-type") is not None and "ngram-mod" in real.get("--spec-type").choices()  # type: ignore[union-attr]
    # Cached per binary digest: a second read does not run the binary again.
    cached = list((paths.cache / "server-flags").glob("*.json"))
    assert any(p.stem == real.binary_sha256 for p in cached)
    assert read_server_flags(patched_server, paths) == real


@pytest.mark.slow
def test_memory_oracle_on_the_real_build(
    real_facts: BuildFacts, smollm2: ModelInfo, live_hardware: HardwareInfo
) -> None:
    assert real_facts.fit_params is not None
    p = plan(smollm2, live_hardware, real_facts)
    assert p.memory.method == "llama-fit-params"
    # The dry run's KV matches the GGUF arithmetic (it reports whole MiB).
    s = p.settings
    expected = smollm2.kv_bytes(s.ctx_total, s.slots, s.cache_type_k, s.cache_type_v)
    assert abs(p.memory.kv_bytes - expected) <= MiB
    assert p.memory.weights_bytes > 0 and p.memory.compute_bytes > 0


@pytest.mark.slow
def test_memory_oracle_estimates_the_servers_buffers(
    real_facts: BuildFacts, gemma3: ModelInfo, live_hardware: HardwareInfo
) -> None:
    """Patch 0003: the dry run takes -kvu and reserves logits for the slots' outputs, as llama-server does."""
    p = plan(gemma3, live_hardware, real_facts, TuneRequest(ctx=4096, slots=4))
    assert p.memory.method == "llama-fit-params" and p.settings.kv_unified
    s = p.settings
    # unified: the SWA layers share one window pool of PAD(4 x 512 + 512) cells
    expected = gemma3.kv_bytes(s.ctx_total, s.slots, s.cache_type_k, s.cache_type_v, n_ubatch=s.ubatch, unified=True)
    assert abs(p.memory.kv_bytes - expected) <= MiB
    wanted = [w for w in _fit_wanted(s) if w[0] != "--fit-outputs"]
    whole_batch = fit_print(real_facts, gemma3.path, [*wanted, ("--fit-outputs", "0")])
    # a whole ubatch of 262,144-wide logits rows (512 MiB) against the four rows the server reserves
    assert sum(r.compute for r in whole_batch) >= 512 * MiB > 8 * p.memory.compute_bytes
    # the repacked copies of CPU weights are counted; their originals are read to repack them and, with the weights
    # read rather than mapped (planned for that reason), not held afterwards
    tied = repacked_tied_output_bytes(real_facts, gemma3)
    widened = widened_q5_0_extra_bytes(real_facts, gemma3)
    assert p.memory.repack_bytes > 0 and p.settings.load_mode_none
    # the token embedding stays mapped (patch lazy-token-embd), so that only the rows the lookup reads are held,
    # unless the output product reads all of it: gemma3 ties its output to the embedding, which AMX builds and
    # x86 builds with VNNI and patch cpu-repack-q8-0 give a copy of their own (tied > 0); other CPUs multiply
    # from the embedding itself
    assert p.settings.lazy_embeddings == (tied > 0)
    assert arg(p, "--lazy-mode") == ("embd" if tied > 0 else None)
    lazy_saved = gemma3.embedding_bytes - lazy_embedding_bytes(gemma3, s.ctx_total) if tied > 0 else 0
    assert p.memory.weights_bytes + lazy_saved + p.memory.repack_bytes - tied - widened == gemma3.tensor_bytes


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["smollm2", "gemma3"])
def test_plan_counts_the_repacked_weights_the_server_allocates(
    real_facts: BuildFacts, live_hardware: HardwareInfo, start_patched_server: Callable[..., serve.RunningServer],
    model_name: str, request: pytest.FixtureRequest,
) -> None:
    """The dry run leaves the weights that go to a repacking buffer type (CPU_REPACK, or AMX on AMX CPUs) out of
    every row; the plan adds them back. Checked against the buffer sizes the real server logs, with the plan's
    load mode: read (--load-mode none, planned when weights are repacked), only the copies and the weights
    that are not repacked are held; mapped, the originals of the repacked ones are there too."""
    model: ModelInfo = request.getfixturevalue(model_name)
    p = plan(model, live_hardware, real_facts)
    held = {}
    for load_mode in ("mmap", "none"):
        server = start_patched_server(model.path, "-c", "4096", "-fa", "on", "-v", "--load-mode", load_mode)
        logged = re.findall(r"load_tensors: +(\S+) model buffer size = +([\d.]+) MiB", server.log_text())
        server.stop()
        repacked = sum(float(mib) for name, mib in logged if name in ("CPU_REPACK", "AMX")) * MiB
        as_in_file = sum(float(mib) for name, mib in logged if name in ("CPU", "CPU_Mapped")) * MiB
        assert logged and as_in_file > 0, logged
        assert abs(p.memory.repack_bytes - repacked) <= 2 * MiB, (p.memory.repack_bytes / MiB, logged)
        held[load_mode] = as_in_file
    # what mapping holds more: the originals of the repacked weights (not of a tied output's copy: its original
    # is the embedding table, which the lookup reads)
    originals = held["mmap"] - held["none"]
    tied = repacked_tied_output_bytes(real_facts, model)
    widened = widened_q5_0_extra_bytes(real_facts, model)
    assert abs(originals - (p.memory.repack_bytes - tied - widened)) <= 2 * MiB, (originals / MiB, held)
    assert p.settings.load_mode_none == (originals >= 2 * MiB)
    assert ("--load-mode" in p.args) == p.settings.load_mode_none
    expected = held["none"] if p.settings.load_mode_none else held["mmap"]
    if p.settings.lazy_embeddings:  # a buffer the size of the tensor, of which only the rows read are held
        expected -= model.embedding_bytes - lazy_embedding_bytes(model, p.settings.ctx_total)
    assert abs(p.memory.weights_bytes - expected) <= 2 * MiB, (p.memory.weights_bytes / MiB, held)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["smollm2", "gemma3"])
def test_lazy_embedding_saves_at_least_what_the_plan_says(
    real_facts: BuildFacts, live_hardware: HardwareInfo, start_patched_server: Callable[..., serve.RunningServer],
    model_name: str, request: pytest.FixtureRequest,
) -> None:
    """Patch lazy-token-embd: with the weights read, --lazy-mode embd keeps the token embedding mapped, and a
    served request faults in only the rows it reads. The server's RSS drops by at least what the plan takes
    off, and by no more than the tensor; the greedy completion is the same."""
    model: ModelInfo = request.getfixturevalue(model_name)
    p = plan(model, live_hardware, real_facts)
    if not p.settings.lazy_embeddings:
        pytest.skip(f"the plan reads {model_name}'s weights whole on this build ({p.settings.load_mode_none=})")
    rss, text = {}, {}
    for lazy in ("auto", "embd"):
        server = start_patched_server(model.path, "-c", "4096", "--load-mode", "none", "--lazy-mode", lazy)
        text[lazy] = serve.complete(server, "def fibonacci(n):", n_predict=32)["content"]
        rss[lazy] = server.rss_bytes()
        server.stop()
    saved = rss["auto"] - rss["embd"]
    planned = model.embedding_bytes - lazy_embedding_bytes(model, p.settings.ctx_total)
    # (a few MiB of the process's other memory differ between the two servers: 0.2 to 2.4 MiB on the EPYC VM,
    # with the level-15 and level-17 builds alike)
    assert planned <= saved <= model.embedding_bytes + 4 * MiB, (saved / MiB, planned / MiB)
    assert text["embd"] == text["auto"]


def _perplexity(build: InstalledBuild, model: Path, env: dict[str, str], *args: str) -> str:
    """The log of ``llama-perplexity`` on MODEL (256-token chunks, flash attention, 2 threads, buffer sizes logged)
    with ENV added to the environment."""
    command = [str(build.bin("llama-perplexity")), "-m", str(model), "-c", "256", "-b", "256", "-fa", "on", "-t", "2",
               "-v", *args]  # fmt: skip
    return proc.run(command, env={**os.environ, **env}).output


def _model_buffer_bytes(log: str, buffer: str) -> float:
    """The size of the BUFFER model buffer a run logged last (the memory-fit dry run logs its empty buffers
    first); 0 when it logged none."""
    sizes = re.findall(rf"{buffer} model buffer size = +([\d.]+) MiB", log)
    return float(sizes[-1]) * MiB if sizes else 0.0


def _code_edit_text(tmp_path: Path) -> Path:
    text = tmp_path / "text.txt"
    text.write_text((PROMPTS_DIR / "code_edit_source.txt").read_text() * 2)
    return text


@pytest.mark.slow
def test_amx_widened_q5_0_matrices(
    real_facts: BuildFacts, patched_build: InstalledBuild, gemma3: ModelInfo, tmp_path: Path
) -> None:
    """Patch amx-widen-q5-0: on an AMX build gemma3's Q5_0 matrices go to the AMX buffer as Q8_0 (the plan's
    extra bytes), and the model computes the same numbers: perplexity within 0.5 % of GGML_AMX_WIDEN=0 (only
    the float summation order differs; a wrong bit in the widening moves it by orders of magnitude)."""
    if not real_facts.amx or AMX_WIDEN_PATCH not in real_facts.patches:
        pytest.skip("not an AMX build with the widening patch (needs a CPU with AMX)")
    text = _code_edit_text(tmp_path)
    results = {}
    for widen in ("0", "1"):
        out = _perplexity(patched_build, gemma3.path, {"GGML_AMX_WIDEN": widen}, "-f", str(text))
        ppl = re.search(r"Final estimate: PPL = ([\d.]+)", out)
        amx = _model_buffer_bytes(out, "AMX")
        assert ppl and amx, out[-2000:]
        results[widen] = (float(ppl.group(1)), amx)
    (ppl_off, amx_off), (ppl_on, amx_on) = results["0"], results["1"]
    assert abs(ppl_on / ppl_off - 1) < 0.005, results
    q5_0_bytes = gemma3.q5_0_matrix_blocks * 22
    assert abs(amx_on - amx_off - q5_0_bytes - gemma3.q5_0_matrix_blocks * 16) <= MiB, results


@pytest.mark.slow
def test_q4_1_matrices_repacked_on_avx2(
    real_facts: BuildFacts, patched_build: InstalledBuild, live_hardware: HardwareInfo, smollm2: ModelInfo,
    tmp_path: Path,
) -> None:
    """Patch cpu-repack-q4-1: on an x86 CPU with AVX2, SmolLM2's Q4_1 matrices go to the CPU_REPACK buffer
    (every one with a multiple of 8 rows), and the model computes the same numbers as with
    GGML_CPU_REPACK_Q4_1=0: measured against the same weights dequantized to F32 (what both kernels approximate,
    each quantizing the activations to 8 bits), the repacked kernel's mean KL divergence is no more than a quarter
    above upstream's. A wrong nibble or a lost minimum multiplies it. (Perplexity itself moves either way by about
    0.5 % with the activations' rounding: on a 2-vCPU AVX2 EPYC, -0.04 % upstream and +0.53 % repacked, at mean KLD
    0.00283 and 0.00277.)"""
    if CPU_REPACK_Q4_1_PATCH not in real_facts.patches or not live_hardware.cpu.has("avx2"):
        pytest.skip("needs an x86 CPU with AVX2 and a build with the Q4_1 repacking patch")
    if real_facts.amx:  # seen on a Xeon guest: CPU_REPACK held 0 bytes with the switch on and off
        pytest.skip("an AMX build's AMX buffer takes Q4_1 matrices before the CPU_REPACK buffer")
    q4_1_bytes = smollm2.q4_1_matrix_bytes
    text = _code_edit_text(tmp_path)
    reference, logits = tmp_path / "dequantized.gguf", tmp_path / "reference.kld"
    proc.run([str(patched_build.bin("llama-quantize")), "--allow-requantize", str(smollm2.path), str(reference), "F32"])
    _perplexity(patched_build, reference, {}, "-f", str(text), "--kl-divergence-base", str(logits))
    results = {}
    for repack in ("0", "1"):
        out = _perplexity(patched_build, smollm2.path, {"GGML_CPU_REPACK_Q4_1": repack},
                          "--kl-divergence-base", str(logits), "--kl-divergence")
        kld = re.search(r"Mean +KLD: +([\d.]+)", out)
        assert kld, out[-2000:]
        results[repack] = (float(kld.group(1)), _model_buffer_bytes(out, "CPU_REPACK"))
    (kld_off, repacked_off), (kld_on, repacked_on) = results["0"], results["1"]
    assert kld_on <= 1.25 * kld_off, results
    assert abs(repacked_on - repacked_off - q4_1_bytes) <= MiB, (results, q4_1_bytes / MiB)


@pytest.mark.slow
def test_q8_0_and_q5_0_matrices_repacked_on_vnni(
    real_facts: BuildFacts, patched_build: InstalledBuild, live_hardware: HardwareInfo, gemma3: ModelInfo,
    tmp_path: Path,
) -> None:
    """Patch cpu-repack-q8-0: on an x86 CPU with VNNI (and no AMX), gemma3-270m's Q8_0 matrices, its Q5_0 ones
    (widened to Q8_0) and the copy of its tied Q8_0 output go to the CPU_REPACK buffer, and the model computes
    what it computes with GGML_CPU_REPACK_Q8_0=0. The kernels' products equal the regular ones to the last
    float bit or so, but gemma3 amplifies such differences: upstream's own Q4_K repacking (on vs --no-repack)
    moves its next-token distributions on this text by a mean KL divergence of 0.007 and its perplexity by
    0.6 %, and ours by 0.008 and 1 %. A wrong bit in the widening or a lost offset gives divergences of 0.1
    and more."""
    vnni = live_hardware.cpu.has("avx512_vnni") or live_hardware.cpu.has("avx_vnni")
    has_patch = CPU_REPACK_Q8_0_PATCH in real_facts.patches
    assert real_facts.cpu_repack_q8_0 == (has_patch and vnni and not real_facts.amx)
    if not real_facts.cpu_repack_q8_0:
        pytest.skip("needs an x86 CPU with VNNI and without AMX, and a build with the Q8_0 repacking patch")
    base = ("--kl-divergence-base", str(tmp_path / "logits.bin"))
    outputs = {
        "0": _perplexity(patched_build, gemma3.path, {"GGML_CPU_REPACK_Q8_0": "0"}, *base,
                         "-f", str(_code_edit_text(tmp_path))),
        "1": _perplexity(patched_build, gemma3.path, {"GGML_CPU_REPACK_Q8_0": "1"}, *base, "--kl-divergence"),
    }  # fmt: skip
    repacked = {k: _model_buffer_bytes(out, "CPU_REPACK") for k, out in outputs.items()}
    kld = re.search(r"Mean +KLD: +([\d.]+)", outputs["1"])
    same_top = re.search(r"Same top p: +([\d.]+)", outputs["1"])
    assert kld and same_top, outputs["1"][-2000:]
    assert float(kld.group(1)) < 0.02 and float(same_top.group(1)) > 90, (kld.group(0), same_top.group(0))
    # the nine Q8_0 attn_v matrices (640 x 256), the Q5_0 ones as Q8_0 blocks, the output copy
    q8_0_bytes = 9 * 640 * 256 // 32 * 34
    q5_0_widened = gemma3.q5_0_rows8_blocks * 34
    tied = repacked_tied_output_bytes(real_facts, gemma3)
    assert abs(repacked["1"] - repacked["0"] - (q8_0_bytes + q5_0_widened + tied)) <= MiB, repacked


@pytest.mark.slow
def test_draft_auto_selection_compatible_pair(
    real_facts: BuildFacts, smollm2_f16: Path, smollm2_gguf: Path, live_hardware: HardwareInfo,
) -> None:
    target = inspect_model(smollm2_f16)
    found = find_draft_candidates(target, [smollm2_gguf.parent])
    assert [c.path for c in found] == [smollm2_gguf]
    p = plan(target, live_hardware, real_facts, TuneRequest(draft_dirs=(smollm2_gguf.parent,)))
    spec = p.settings.speculation
    assert spec is not None and spec.draft is not None and spec.draft.path == smollm2_gguf
    assert arg(p, "--spec-type") == "draft-simple"
    assert arg(p, "--spec-draft-model") == str(smollm2_gguf)
    # The Q4_1 file costs about a third of the F16 one per token: short drafts pay off most.
    assert spec.draft_n_max == best_draft_length(0.65, spec.draft.bytes_ratio) == int(arg(p, "--spec-draft-n-max") or 0)
    assert "expected" in p.reason("spec_draft")
    assert arg(p, "--spec-draft-p-min") == "0.75"
    assert "same BPE vocabulary" in p.reason("spec_draft")
    # The draft's weights and KV (arithmetic: the dry run does not load drafts) are part of the plan.
    assert p.memory.draft_bytes > 0


@pytest.mark.slow
def test_draft_auto_selection_incompatible_pair(
    real_facts: BuildFacts, gemma3_gguf: Path, smollm2_gguf: Path, live_hardware: HardwareInfo,
) -> None:
    target = inspect_model(gemma3_gguf)
    assert find_draft_candidates(target, [smollm2_gguf.parent]) == []
    p = plan(target, live_hardware, real_facts, TuneRequest(draft_dirs=(smollm2_gguf.parent,)))
    assert p.settings.speculation is None and "--spec-draft-model" not in p.args
    with pytest.raises(VelollmError, match="cannot draft"):
        plan(target, live_hardware, real_facts, TuneRequest(draft=str(smollm2_gguf)))


@pytest.fixture
def started(patched_server: Path) -> Iterator[list[serve.RunningServer]]:
    running: list[serve.RunningServer] = []
    yield running
    for server in running:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["chat", "code"])
def test_the_real_server_accepts_the_plan(
    real_facts: BuildFacts, patched_server: Path, smollm2: ModelInfo, live_hardware: HardwareInfo, workload: str,
    started: list[serve.RunningServer],
) -> None:
    p = plan(smollm2, live_hardware, real_facts, TuneRequest(workload=workload))
    server = serve.start_server(serve.ServerConfig(binary=patched_server, model=smollm2.path, args=p.args))
    started.append(server)
    result = serve.complete(server, "def fibonacci(n):", n_predict=16)
    assert result["content"]
    props = server.request("GET", "/props").json()
    assert props["total_slots"] == p.settings.slots


@pytest.mark.slow
def test_the_real_server_accepts_the_plan_as_environment(
    real_facts: BuildFacts, patched_server: Path, smollm2: ModelInfo, live_hardware: HardwareInfo,
    started: list[serve.RunningServer],
) -> None:
    p = plan(smollm2, live_hardware, real_facts, TuneRequest(workload="edit"))
    # Only the environment carries the plan; start_server passes -m itself.
    env = {k: v for k, v in p.env.items() if k != "LLAMA_ARG_MODEL"}
    assert not any(k.startswith("LLAMA_ARG_") for k in os.environ)
    server = serve.start_server(serve.ServerConfig(binary=patched_server, model=smollm2.path, env=env))
    started.append(server)
    props = server.request("GET", "/props").json()
    assert props["total_slots"] == p.settings.slots
    assert serve.complete(server, "Hello", n_predict=4)["content"] is not None


@pytest.mark.slow
def test_draft_plan_runs_on_the_real_server(
    real_facts: BuildFacts, patched_server: Path, smollm2_f16: Path, smollm2_gguf: Path,
    live_hardware: HardwareInfo, started: list[serve.RunningServer],
) -> None:
    target = inspect_model(smollm2_f16)
    p = plan(target, live_hardware, real_facts, TuneRequest(workload="code", draft_dirs=(smollm2_gguf.parent,)))
    assert arg(p, "--spec-type") == "ngram-mod,draft-simple"
    server = serve.start_server(serve.ServerConfig(binary=patched_server, model=smollm2_f16, args=p.args))
    started.append(server)
    result = serve.complete(server, "def add(a, b):\n    return a + b\n\ndef sub(a, b):", n_predict=24)
    assert result["content"]


# --------------------------------------------------------------------------------------------
# the commands
# --------------------------------------------------------------------------------------------


def test_inspect_command(gemma3_gguf: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", str(gemma3_gguf), "--ctx", "8192", "--slots", "4"])
    assert result.exit_code == 0, result.output
    assert "gemma3" in result.output and "sliding window 512" in result.output and "q8_0" in result.output
    result = runner.invoke(main, ["inspect", str(gemma3_gguf), "--ctx", "8192", "--slots", "4", "--json"])
    data = json.loads(result.output)
    info = inspect_model(gemma3_gguf)
    assert data["kv"]["types"]["f16"]["bytes"] == info.kv_bytes(8192, 4)
    assert data["kv"]["types"]["q8_0"]["bytes_per_token"] == info.kv_bytes_per_token("q8_0", "q8_0")
    by_name = runner.invoke(main, ["inspect", "gemma3-270m", "--ctx", "8192", "--slots", "4", "--json"])
    assert json.loads(by_name.output) == data  # the name `up` and `bench` take means the same file here
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    result = runner.invoke(main, ["inspect", str(junk)])
    assert result.exit_code == 1 and "not a GGUF file" in result.output


@pytest.mark.slow
def test_tune_command(patched_build: InstalledBuild, smollm2_gguf: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["tune", str(smollm2_gguf), "--workload", "code", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["build_id"] == patched_build.build_id and "--spec-type" in data["args"]
    assert all(c["reason"] for c in data["choices"]) and data["memory"]["method"] == "llama-fit-params"
    result = runner.invoke(main, ["tune", str(smollm2_gguf), "--env"])
    assert result.exit_code == 0 and "export LLAMA_ARG_CTX_SIZE=" in result.output
    result = runner.invoke(main, ["tune", str(smollm2_gguf)])
    assert result.exit_code == 0 and "kv_types" in result.output and "command: llama-server" in result.output
    result = runner.invoke(main, ["tune", str(smollm2_gguf), "--machine", "shared", "--json"])
    assert result.exit_code == 0, result.output
    assert "--poll" in json.loads(result.output)["args"]
    result = runner.invoke(main, ["tune", str(smollm2_gguf), "--profile", "turbo"])
    assert result.exit_code == 2
