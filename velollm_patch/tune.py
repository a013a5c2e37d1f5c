"""The tuner: from the machine, the model and the installed build, choose every llama-server knob
that upstream leaves to the user, with a one-line reason for each.

Upstream's ``--fit`` only fits context and GPU layers to free device memory; it never picks KV
types, flash attention, batch sizes, slots or speculation, and it ignores system RAM
(``common_fit_params`` in common/fit.h; docs/llama-cpp.md, Fit). The planner decides those from facts it can check:

* the hardware (:mod:`velollm_patch.hardware`, or a recorded machine in tests);
* the GGUF header (:mod:`velollm_patch.model`: KV bytes per token, head sizes, SWA, vocabulary);
* the installed build: its backend, its patches, the CUDA flash-attention K/V pairs compiled into
  it (manifest ``fa_kv_pairs``), the flags its llama-server accepts (:mod:`server_flags`) and its
  ``llama-fit-params``, which is the memory oracle whenever it is there.

A :class:`Plan` renders to llama-server arguments, to the equivalent ``LLAMA_ARG_*`` environment and
to JSON, and carries the memory it expects the server to use so ``serve`` can compare with RSS.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from velollm_patch import calibrate, proc, serve
from velollm_patch.builds import InstalledBuild
from velollm_patch.calibrate import Calibration
from velollm_patch.drafts import DraftCandidate, draft_compatibility, find_draft_candidates
from velollm_patch.errors import VelollmError
from velollm_patch.hardware import GPUInfo, HardwareInfo, HostLoad, probe_host_load
from velollm_patch.kv_types import KV_CACHE_TYPES, is_quantized
from velollm_patch.model import ModelInfo, inspect_model
from velollm_patch.model_ref import resolve_model
from velollm_patch.paths import Paths
from velollm_patch.server_flags import ServerFlags, read_server_flags
from velollm_patch.units import GiB, MiB

log = logging.getLogger("velollm_patch.tune")

PROFILES = ("speed", "balanced", "quality", "memory")
WORKLOADS = ("chat", "code", "edit")
# Whose CPUs: ``auto`` measures other programs' load when planning, ``shared`` assumes another program keeps a
# core busy (a laptop, a shared box, whatever the moment of planning shows), ``dedicated`` ignores any load.
MACHINES = ("auto", "shared", "dedicated")

# Patches of our series the planner knows how to use (patches/llama.cpp/<pin>/series.toml names).
KV_ON_DEMAND_PATCH = "kv-on-demand"
SPEC_ADAPTIVE_PATCH = "spec-adaptive"
SPEC_BATCH_INVARIANT_PATCH = "spec-batch-invariant"
AMX_WIDEN_PATCH = "amx-widen-q5-0"
CPU_REPACK_Q8_0_PATCH = "cpu-repack-q8-0"
LAZY_EMBEDDING_PATCH = "lazy-token-embd"
# The page the embedding lookup faults in per row it reads from the mapped file (x86-64, arm64 Linux).
PAGE_BYTES = 4096
SPEC_ADAPTIVE_MIN_FLAG = "--spec-adaptive-min"
SPEC_BATCH_INVARIANT_FLAG = "--spec-batch-invariant"

# GGML_CUDA_FA_QUANTS' default (ggml/CMakeLists.txt); builds that did not record their own list
# (ROCm builds share the CUDA flash-attention code) have exactly these vec kernels.
UPSTREAM_FA_KV_PAIRS = ("q4_0-q4_0", "q8_0-q8_0", "f16-f16", "bf16-bf16")
# llama-fit-params' default free-memory margin per device (common/fit.cpp, --fit-target).
DEVICE_MARGIN_BYTES = 1024 * MiB
# System RAM the server must leave to the OS and to other programs.
HOST_MARGIN_BYTES = 1 * GiB
HOST_MARGIN_FRACTION = 0.10
# Per-slot context the workload needs by default: chat turns are short; code generation and edits
# carry whole files and their rewrites.
WORKLOAD_CONTEXT = {"chat": 4096, "code": 8192, "edit": 8192}
# Below this a context is too small to be useful; the planner fails rather than going lower.
MIN_CONTEXT = 1024
DEFAULT_SLOTS = 4
# Expected draft acceptance per workload, for choosing the draft length (code repeats itself more).
DRAFT_ACCEPTANCE = {"chat": 0.65, "code": 0.75, "edit": 0.8}
MAX_DRAFT_TOKENS = 16
# A draft model costs memory and CPU/GPU time of its own; below this expected gain it is left out.
MIN_DRAFT_SPEEDUP = 1.1
# Stop a draft when the draft model's top token is less likely than this: the draft length is then
# adaptive per step, and wasted verification of improbable tokens is avoided. 0.75 is the value
# upstream used before it changed the default to 0 (ggml-org/llama.cpp#26100).
DRAFT_P_MIN = 0.75
# n-gram types in the order we prefer them (ngram-mod is the one --spec-default picks, common/arg.cpp).
NGRAM_TYPES = ("ngram-mod", "ngram-map-k", "ngram-simple")
# Tokens a step may draft, per speculative type, as llama-server reserves output rows for them
# (common_speculative_n_max with common.h's defaults; an adaptive draft model may draft up to 16).
SPEC_TYPE_DRAFT_TOKENS = {"ngram-mod": 64, "ngram-map-k": 48, "ngram-map-k4v": 48, "ngram-simple": 48, "ngram-cache": 8}
ADAPTIVE_DRAFT_CAP = 16
# Context checkpoints per slot for models with a sliding window (llama-server keeps up to 32, each a copy of
# the SWA layers' last n_swa cells; every completion adds two near the end of its prompt, so 2 keep the last
# request restorable and each further pair one more).
CTX_CHECKPOINTS = {"memory": 2, "balanced": 4, "quality": 8, "speed": 8}
UPSTREAM_CTX_CHECKPOINTS = 32
# llama-server's --cache-ram default (MiB): the host-RAM prompt cache that keeps saved slot states.
UPSTREAM_CACHE_RAM_MIB = 8192
# What a running llama-server holds besides its buffers, read from /proc/PID/smaps on the CPU build
# (docs/benchmarks/tuner.md, "planned vs measured"): code pages, libraries, thread stacks and heap, plus the
# vocabulary's token texts, scores and lookup maps (~150 bytes a token).
RUNTIME_BASE_BYTES = 20 * MiB
VOCAB_HEAP_BYTES_PER_TOKEN = 150
# A core counts as taken by other programs from 0.75 of one core's worth of their work on it (after the
# sampled CPUs are converted to physical cores): below that a thread there still gets most of its time slices.
BUSY_CORE_FRACTION = 0.75


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildFacts:
    """What the planner needs to know about the installed llama.cpp build."""

    build_id: str
    backend: str
    patches: tuple[str, ...]
    fa_kv_pairs: tuple[str, ...] | None
    """CUDA flash-attention K/V pairs compiled in (``k-v``), from the manifest; None if not recorded."""
    flags: ServerFlags
    fit_params: Path | None
    """``llama-fit-params`` of this build, when it has one."""
    fit_params_flags: ServerFlags | None = None
    amx: bool = False
    """Built with upstream's AMX kernels (planned only for CPUs that have AMX, with patch 0004)."""
    cpu_repack_q8_0: bool = False
    """Q8_0 and Q5_0 matrices go to the CPU_REPACK buffer: patch cpu-repack-q8-0 in an x86 build with VNNI
    (its kernels need it) and without AMX (whose buffer takes those types first)."""
    devices: tuple[serve.Device, ...] = ()
    """What a Vulkan build's server offloads to here (``--list-devices``): which devices ggml-vulkan takes
    depends on their type and GGML_VK_VISIBLE_DEVICES, so only the build can say."""

    @classmethod
    def from_build(cls, build: InstalledBuild, paths: Paths) -> BuildFacts:
        fit: Path | None = None
        fit_flags: ServerFlags | None = None
        try:
            fit = build.bin("llama-fit-params")
            fit_flags = read_server_flags(fit, paths)
        except VelollmError as exc:
            log.debug("no memory oracle: %s", exc)
            fit = None
        pairs = build.manifest.get("fa_kv_pairs")
        cmake_args = set(build.manifest.get("cmake_args", ()))
        amx = "-DGGML_AMX_INT8=ON" in cmake_args
        backend = build.backend
        return cls(
            build_id=build.build_id,
            backend=backend,
            patches=tuple(build.patch_names),
            fa_kv_pairs=tuple(pairs) if pairs else None,
            flags=read_server_flags(build.bin("llama-server"), paths),
            fit_params=fit,
            fit_params_flags=fit_flags,
            amx=amx,
            cpu_repack_q8_0=CPU_REPACK_Q8_0_PATCH in build.patch_names and not amx and (
                "-DGGML_AVX_VNNI=ON" in cmake_args
                or {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON"} <= cmake_args  # GGML_AVX512 brings AVX512-VL
            ),
            devices=serve.list_devices(build.bin("llama-server")) if backend == "vulkan" else (),
        )

    def has_patch(self, name: str) -> bool:
        return name in self.patches


@dataclass(frozen=True)
class TuneRequest:
    profile: str = "balanced"
    workload: str = "chat"
    ctx: int | None = None
    """Context per slot in tokens; None: chosen from the workload and the model."""
    slots: int | None = None
    draft: str = "auto"
    """``auto`` (search local models), ``none``, or a GGUF path."""
    draft_dirs: tuple[Path, ...] = ()
    machine: str = "auto"
    """One of :data:`MACHINES`: plan for other programs' CPU load as measured, assumed, or not at all."""

    def validate(self) -> None:
        if self.machine not in MACHINES:
            raise VelollmError(f"unknown machine '{self.machine}': choose one of {', '.join(MACHINES)}")
        if self.profile not in PROFILES:
            raise VelollmError(f"unknown profile '{self.profile}': choose one of {', '.join(PROFILES)}")
        if self.workload not in WORKLOADS:
            raise VelollmError(f"unknown workload '{self.workload}': choose one of {', '.join(WORKLOADS)}")
        if self.ctx is not None and self.ctx < MIN_CONTEXT:
            raise VelollmError(f"--ctx {self.ctx} is too small; use at least {MIN_CONTEXT}")
        if self.slots is not None and not 1 <= self.slots <= 256:
            raise VelollmError(f"--slots {self.slots} must be between 1 and 256")


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


ChoiceKey = Literal[
    "backend", "threads", "ctx_per_slot", "slots", "ctx_total", "flash_attn", "batch", "ctx_checkpoints",
    "cache_ram", "load_mode", "lazy_embeddings", "kv_on_demand", "kv_types", "gpu_layers", "speculation",
    "spec_ngram", "spec_draft", "spec_draft_p_min", "spec_adaptive", "spec_adaptive_min", "spec_batch_invariant",
    "poll", "repack",
]
"""The decisions the planner explains. Typed so that mypy ties the key a reason is read by (a Modelfile's
comments) to the key it is noted under: a key renamed on one side only is a type error."""


@dataclass(frozen=True)
class Choice:
    key: ChoiceKey
    value: str
    reason: str


@dataclass(frozen=True)
class Speculation:
    types: tuple[str, ...]
    draft: DraftCandidate | None = None
    draft_n_max: int | None = None
    draft_p_min: float | None = None
    adaptive_flag: str | None = None
    adaptive_min: int | None = None  # with adaptive: the smallest draft length (0 lets the server stop drafting)
    batch_invariant: bool = False
    """CPU kernels compute each token of a verification batch as alone (patch spec-batch-invariant): lossless."""


@dataclass(frozen=True)
class Settings:
    """The chosen values, independent of how a given llama-server spells them."""

    threads: int
    threads_batch: int
    gpu_layers: int | None
    """None on a CPU build (nothing to offload)."""
    tensor_split: str | None
    tensor_overrides: str | None
    ctx_per_slot: int
    slots: int
    ctx_total: int
    kv_unified: bool
    cache_type_k: str
    cache_type_v: str
    flash_attn: bool
    batch: int
    ubatch: int
    kv_on_demand: bool
    cache_ram_mib: int | None
    """The host-RAM prompt cache (``--cache-ram``) in MiB, 0 turns it off; None: the server has none."""
    speculation: Speculation | None
    ctx_checkpoints: int | None = None
    """Context checkpoints per slot; None (models without SWA): upstream's default, and none are made."""
    load_mode_none: bool = False
    """``--load-mode none``: weights are read into memory instead of mapped (planned when weights are repacked)."""
    lazy_embeddings: bool = False
    """``--lazy-mode embd`` (patch lazy-token-embd): the token embedding stays mapped, its rows read on demand."""
    poll: int | None = None
    """``--poll``: how long idle threads spin for work (0-100), as measured by ``tune --measure``, or 0 on a busy
    machine; None: the server's default (50)."""
    repack: bool = True
    """Weights repacked for this CPU (the server's default); False (``--no-repack``) only where measured faster."""


@dataclass(frozen=True)
class MemoryEstimate:
    """What the server holds with every slot full, by part; ``device_bytes + host_bytes`` is the sum of them."""

    weights_bytes: int
    """The tensor data held as in the file, mapped or read (on a GPU, the offloaded share lives on the device)."""
    kv_bytes: int
    compute_bytes: int
    draft_bytes: int
    device_bytes: int
    """Planned on GPU devices (0 on a CPU build)."""
    host_bytes: int
    method: str
    """``llama-fit-params`` (the build's own dry run) or ``arithmetic`` (from GGUF metadata)."""
    kv_on_demand: bool
    """KV pages are committed as tokens arrive, so an idle server holds far less than ``kv_bytes``."""
    repack_bytes: int = 0
    """Repacked copies of CPU weights (CPU_REPACK, AMX)."""
    repack_originals_bytes: int = 0
    """The originals of those copies that nothing reads after repacking; resident while the file is mapped."""
    checkpoint_bytes: int = 0
    """SWA context checkpoints of all slots at their planned count."""
    runtime_bytes: int = 0
    """Code, libraries, threads and heap (the vocabulary's included): host memory no buffer shows."""
    prompt_cache_bytes: int = 0
    """The host-RAM prompt cache at its limit (``--cache-ram``): saved copies of slots' KV and checkpoints."""

    @property
    def total_bytes(self) -> int:
        return self.device_bytes + self.host_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


@dataclass(frozen=True)
class Plan:
    model: ModelInfo
    build_id: str
    backend: str
    profile: str
    workload: str
    settings: Settings
    args: tuple[str, ...]
    """llama-server arguments, without ``-m MODEL`` (and without host/port, which ``serve`` adds)."""
    env: dict[str, str]
    """The same plan as ``LLAMA_ARG_*`` variables, ``-m`` included."""
    choices: tuple[Choice, ...]
    memory: MemoryEstimate
    not_applied: tuple[str, ...] = field(default=())
    """Choices this llama-server has no flag for (upstream renamed or removed it)."""
    calibration: Calibration | None = None
    """The speed calibration (``tune --measure``) the plan used: its prediction is the plan's."""

    def predicted(self) -> dict[str, Any] | None:
        """Tokens/s one request should see with this plan, from the calibration; None without one. ``differs``
        names the settings of the plan that are not those measured (the prediction is then for those)."""
        cal = self.calibration
        if cal is None:
            return None
        s, c = self.settings, cal.chosen
        planned = {
            "threads": (s.threads, c.threads), "threads_batch": (s.threads_batch, cal.threads_batch),
            "ubatch": (s.ubatch, c.ubatch), "flash_attn": (s.flash_attn, c.flash_attn),
            "kv_types": (f"{s.cache_type_k}/{s.cache_type_v}", f"{c.type_k}/{c.type_v}"),
            "repack": (s.repack, c.repack),
        }
        return {
            "decode_tps": cal.decode_tps, "prompt_tps": cal.prompt_tps, "prompt_tokens": cal.prompt_tokens,
            "gen_tokens": cal.gen_tokens, "measured": cal.created,
            "differs": [f"{k} {mine} (measured {theirs})" for k, (mine, theirs) in planned.items() if mine != theirs],
        }

    def reason(self, key: ChoiceKey) -> str:
        """Why the planner chose what it did for ``key``; KeyError when the plan made no such choice."""
        for choice in self.choices:
            if choice.key == key:
                return choice.reason
        raise KeyError(f"the plan for {self.model.name} has no {key!r} choice, only {[c.key for c in self.choices]}")

    def command(self, binary: Path | str = "llama-server") -> str:
        return proc.format_command([str(binary), "-m", str(self.model.path), *self.args])

    def to_dict(self) -> dict[str, Any]:
        spec = self.settings.speculation
        settings = asdict(replace(self.settings, speculation=None))
        settings["speculation"] = None if spec is None else {
            "types": list(spec.types),
            "draft": spec.draft.to_dict() if spec.draft else None,
            "draft_n_max": spec.draft_n_max,
            "draft_p_min": spec.draft_p_min,
            "adaptive_flag": spec.adaptive_flag,
            "adaptive_min": spec.adaptive_min,
            "batch_invariant": spec.batch_invariant,
        }
        return {
            "model": str(self.model.path),
            "model_name": self.model.name,
            "build_id": self.build_id,
            "backend": self.backend,
            "profile": self.profile,
            "workload": self.workload,
            "args": list(self.args),
            "env": self.env,
            "command": self.command(),
            "settings": settings,
            "choices": [asdict(c) for c in self.choices],
            "memory": self.memory.to_dict(),
            "not_applied": list(self.not_applied),
            **({"predicted": self.predicted()} if self.calibration else {}),
        }

    def describe(self) -> list[str]:
        """Human-readable plan: one line per choice with its reason, then memory and the command."""
        width = max(len(c.key) for c in self.choices)
        lines = [f"plan for {self.model.name} on {self.backend} ({self.profile} profile, {self.workload} workload)"]
        lines += [f"  {c.key:<{width}}  {c.value:<18} {c.reason}" for c in self.choices]
        lines += [f"  not applied: {n}" for n in self.not_applied]
        m = self.memory
        parts = f"weights {_mib(m.weights_bytes)} + KV {_mib(m.kv_bytes)} + compute {_mib(m.compute_bytes)}"
        for label, n in (("repacked", m.repack_bytes), ("checkpoints", m.checkpoint_bytes),
                         ("draft", m.draft_bytes), ("prompt cache", m.prompt_cache_bytes),
                         ("runtime", m.runtime_bytes)):  # fmt: skip
            if n:
                parts += f" + {label} {_mib(n)}"
        where = f"device {_mib(m.device_bytes)}, host {_mib(m.host_bytes)}" if m.device_bytes else "host"
        lines.append(f"  memory: {parts} = {_mib(m.total_bytes)} ({where}; by {m.method})")
        if m.kv_on_demand:
            lines.append("          KV is committed on demand: an idle server holds far less than the KV figure")
        predicted = self.predicted()
        if predicted is not None:
            lines.append(
                f"  predicted: decode {predicted['decode_tps']:.0f} tok/s, prompts {predicted['prompt_tps']:.0f} tok/s "
                f"(one request, a {predicted['prompt_tokens']}-token prompt; measured {predicted['measured']})"
            )
            if predicted["differs"]:
                differs = ", ".join(predicted["differs"])
                lines.append(f"          for the measured settings; this plan differs: {differs}")
        lines.append(f"  command: {self.command()}")
        return lines


def _mib(n: int) -> str:
    return f"{n / MiB:.0f} MiB"


# --------------------------------------------------------------------------------------------
# KV cache types
# --------------------------------------------------------------------------------------------


def kv_pair_problem(
    model: ModelInfo, backend: str, type_k: str, type_v: str, *, flash_attn: bool,
    fa_kv_pairs: Sequence[str] | None,
) -> str | None:
    """Why llama.cpp would refuse (or run slowly with) this K/V pair here; None when it is fine.

    The rules are those of the pinned tree (docs/llama-cpp.md, KV types): a quantized V needs flash attention;
    quantized types need head sizes divisible by their block; CUDA runs flash attention at full
    speed only for the compiled vec pairs and has no iq4_nl kernel at all (it falls back to the
    CPU); Metal needs K and V of the same type.
    """
    for t in (type_k, type_v):
        if t not in KV_CACHE_TYPES:
            return f"{t} is not a KV cache type llama.cpp knows"
    if is_quantized(type_v) and not flash_attn:
        return f"a {type_v} V cache needs flash attention, which is off"
    if (is_quantized(type_k) or is_quantized(type_v)) and not model.head_dims_allow_quantized_kv():
        return "the model's head sizes are not multiples of the 32-value quantization block"
    if backend in ("cuda", "rocm"):
        if "iq4_nl" in (type_k, type_v):
            return "CUDA has no iq4_nl flash-attention kernel (it would run attention on the CPU)"
        pairs = tuple(fa_kv_pairs) if fa_kv_pairs else UPSTREAM_FA_KV_PAIRS
        if flash_attn and f"{type_k}-{type_v}" not in pairs:
            return f"the build compiled flash-attention kernels only for {', '.join(pairs)}"
    if backend == "metal" and type_k != type_v:
        return "Metal flash attention needs K and V of the same type"
    return None


# K/V pairs each profile tries, best first; later ones save memory when the first does not fit.
_KV_PREFERENCES = {
    "quality": (("f16", "f16"),),
    "speed": (("f16", "f16"), ("q8_0", "q8_0")),
    "balanced": (("q8_0", "q8_0"), ("f16", "f16"), ("q8_0", "q4_0"), ("q4_0", "q4_0")),
    "memory": (("q8_0", "q4_0"), ("q4_0", "q4_0"), ("q8_0", "q8_0"), ("f16", "f16")),
}


def _kv_candidates(profile: str, backend: str) -> list[tuple[tuple[str, str], str]]:
    """(pair, why) in the order to try them for ``profile`` on ``backend``."""
    if profile == "balanced" and backend == "cpu":
        # The CPU reads f16 K/V directly; quantized ones cost a conversion per step, which only pays
        # off when memory (not compute) is the limit.
        return [
            (("f16", "f16"), "f16 K/V: on the CPU quantized KV costs a conversion every step"),
            (("q8_0", "q8_0"), "q8_0 K/V: f16 did not fit; q8_0 halves the KV with ~no quality loss"),
            (("q8_0", "q4_0"), "q8_0 K / q4_0 V: smaller KV types did not fit"),
        ]
    reasons = {
        ("f16", "f16"): "f16 K/V: full precision",
        ("q8_0", "q8_0"): "q8_0 K/V: half the KV memory and bandwidth of f16 with ~no quality loss",
        ("q8_0", "q4_0"): "q8_0 K / q4_0 V: V tolerates 4 bits far better than K",
        ("q4_0", "q4_0"): "q4_0 K/V: the smallest pair with fast kernels",
    }
    return [(pair, reasons[pair]) for pair in _KV_PREFERENCES[profile]]


# --------------------------------------------------------------------------------------------
# Memory: llama-fit-params as the oracle, GGUF arithmetic as the fallback
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DeviceMemory:
    name: str
    model: int
    context: int
    compute: int


_FIT_LINE = re.compile(r"^(\S+) (\d+) (\d+) (\d+)\s*$")
_FIT_ARGS = re.compile(r"-c (\d+) -ngl (-?\d+)(?: -ts (\S+))?(?: -ot \"?([^\"\n]+)\"?)?")
# Dry runs load only the model's metadata; a large model on a slow disk still opens in seconds.
FIT_TIMEOUT_S = 300


def _fit_argv(build: BuildFacts, model: Path, wanted: Sequence[tuple[str, str | None]]) -> list[str]:
    assert build.fit_params is not None and build.fit_params_flags is not None
    argv = [str(build.fit_params), "-m", str(model)]
    for name, value in wanted:
        # llama-fit-params parses a smaller option set than the server (no -kvu, no speculation).
        if build.fit_params_flags.accepts(name):
            argv += [name] if value is None else [name, value]
    return argv


def fit_print(build: BuildFacts, model: Path, wanted: Sequence[tuple[str, str | None]]) -> list[_DeviceMemory]:
    """``llama-fit-params --fit-print``: the build's own no-alloc dry run, per device and host, in MiB."""
    assert build.fit_params_flags is not None
    spec = build.fit_params_flags.get("--fit-print")
    if spec is None:
        raise VelollmError(f"{build.fit_params} has no --fit-print")
    switch = ["--fit-print", "on"] if spec.takes_value else ["--fit-print"]
    result = proc.run([*_fit_argv(build, model, wanted), *switch], check=False, timeout=FIT_TIMEOUT_S)
    rows = [_FIT_LINE.match(line) for line in result.output.splitlines()]
    found = [_DeviceMemory(m[1], int(m[2]) * MiB, int(m[3]) * MiB, int(m[4]) * MiB) for m in rows if m]
    if result.returncode != 0 or not found:
        raise VelollmError(f"llama-fit-params --fit-print failed (exit {result.returncode}): {result.tail(2)}")
    return found


@dataclass(frozen=True)
class _Fitted:
    gpu_layers: int
    tensor_split: str | None
    tensor_overrides: str | None


def fit_layers(build: BuildFacts, model: Path, wanted: Sequence[tuple[str, str | None]]) -> _Fitted | None:
    """``llama-fit-params``: GPU layers (and MoE expert overrides, tensor split) that leave the
    default margin free on every device; None when nothing fits."""
    result = proc.run(_fit_argv(build, model, wanted), check=False, timeout=FIT_TIMEOUT_S)
    match = _FIT_ARGS.search(result.output)
    if result.returncode != 0 or match is None:
        log.debug("llama-fit-params: %s", result.tail(3))
        return None
    return _Fitted(int(match.group(2)), match.group(3), match.group(4))


def server_outputs(spec: Speculation | None, slots: int, batch: int) -> int:
    """Logits rows llama-server reserves per batch: one per slot plus its longest draft
    (server_output_limits), at most a batch."""
    n_draft = 0
    for t in spec.types if spec else ():
        if t == "draft-simple" and spec is not None:
            n_max = spec.draft_n_max or 3
            n_draft = max(n_draft, max(n_max, ADAPTIVE_DRAFT_CAP) if spec.adaptive_flag else n_max)
        else:
            n_draft = max(n_draft, SPEC_TYPE_DRAFT_TOKENS.get(t, 0))
    return min(batch, slots * (1 + n_draft))


def compute_bytes_estimate(model: ModelInfo, ubatch: int, ctx_total: int, flash_attn: bool, outputs: int) -> int:
    """A compute-buffer estimate from metadata: the f32 logits of the ``outputs`` rows (a whole ubatch
    when llama-server does not limit them) and a few embedding rows per token of the ubatch (what the
    dry runs of SmolLM2 and Gemma 3 show), plus, without flash attention, the score matrix over the
    whole context."""
    n_vocab = model.vocab.n_tokens if model.vocab else 0
    activations = 4 * (min(ubatch, outputs) * n_vocab + ubatch * 4 * model.n_embd)
    scores = 0 if flash_attn else 4 * ubatch * ctx_total * max(1, model.n_head)
    return activations + scores


def runtime_bytes_estimate(model: ModelInfo) -> int:
    n_vocab = model.vocab.n_tokens if model.vocab else 0
    return RUNTIME_BASE_BYTES + VOCAB_HEAP_BYTES_PER_TOKEN * n_vocab


def checkpoint_bytes_estimate(model: ModelInfo, s: Settings) -> int:
    """SWA context checkpoints at their planned count in every slot (speculation adds none: SWA caches
    roll rejected drafts back in place)."""
    if not model.has_swa or s.ctx_checkpoints is None:
        return 0
    return s.slots * s.ctx_checkpoints * model.swa_checkpoint_bytes(s.cache_type_k, s.cache_type_v)


# --------------------------------------------------------------------------------------------
# Speculation
# --------------------------------------------------------------------------------------------


def expected_speedup(acceptance: float, cost_ratio: float, n_draft: int) -> float:
    """Expected decoding speed-up of drafting ``n_draft`` tokens per step with a per-token acceptance
    rate and a draft/target cost ratio (Leviathan et al. 2023): (1 - a^(k+1)) / ((1 - a)(1 + k c))."""
    return (1 - acceptance ** (n_draft + 1)) / ((1 - acceptance) * (1 + n_draft * cost_ratio))


def best_draft_length(acceptance: float, cost_ratio: float) -> int:
    """The draft length that maximizes :func:`expected_speedup`."""
    return max(range(1, MAX_DRAFT_TOKENS + 1), key=lambda k: expected_speedup(acceptance, cost_ratio, k))


def _spec_types(flags: ServerFlags) -> tuple[str, ...]:
    spec = flags.get("--spec-type")
    return spec.choices() if spec else ()


# --------------------------------------------------------------------------------------------
# The planner
# --------------------------------------------------------------------------------------------


class _ServerPlanner:
    """Plans llama-server's settings for one model on one machine and build (ollama/config.py plans Ollama's)."""

    def __init__(
        self, model: ModelInfo, hw: HardwareInfo, build: BuildFacts, request: TuneRequest,
        calibration: Calibration | None = None, load: HostLoad | None = None,
    ) -> None:
        self.model = model
        self.hw = hw
        self.build = build
        self.req = request
        self.calibration = calibration
        """What ``tune --measure`` measured here: its values replace the guesses for the knobs it measured."""
        self.load = load
        """Other programs' CPU load when planning; None: not measured."""
        self.choices: list[Choice] = []

    def note(self, key: ChoiceKey, value: object, reason: str) -> None:
        self.choices.append(Choice(key, str(value), reason))

    # -- backend and budgets ------------------------------------------------------------------

    def backend(self) -> str:
        backend = self.build.backend
        gpu_vendor = {"cuda": "nvidia", "rocm": "amd", "metal": "apple"}.get(backend)
        if gpu_vendor and not any(g.vendor == gpu_vendor for g in self.hw.gpus):
            raise VelollmError(
                f"the installed build {self.build.build_id} is for {backend}, but no {gpu_vendor} GPU is visible; "
                "rebuild with `velollm-patch build --gpu auto`"
            )
        if backend == "vulkan" and not self.build.devices:
            raise VelollmError(
                f"the installed Vulkan build {self.build.build_id} sees no Vulkan device (a software device such as "
                "llvmpipe counts only when GGML_VK_VISIBLE_DEVICES names it); rebuild with `velollm-patch build "
                "--gpu auto`"
            )
        if backend == "vulkan":
            device = self.build.devices[0]
            software = any(d.is_software and d.name == device.description for d in self.hw.vulkan_devices)
            slow = ": a software device, slower than the CPU backend" if software else ""
            self.note(
                "backend", backend,
                f"the installed build offloads to {device.description} "
                f"({device.name}, {_mib(device.total_bytes)}){slow}",
            )
        elif backend == "cpu" and self.hw.gpus:
            self.note("backend", backend, f"the installed build is CPU-only although {self.hw.gpus[0].name} is present")
        elif backend == "cpu":
            self.note("backend", backend, "no GPU: everything runs on the CPU")
        else:
            gpu = self._gpus()[0]
            self.note("backend", backend, f"the installed build offloads to {gpu.name}")
        return backend

    def _gpus(self) -> list[GPUInfo]:
        vendor = {"cuda": "nvidia", "rocm": "amd", "metal": "apple"}.get(self.build.backend)
        return [g for g in self.hw.gpus if vendor is None or g.vendor == vendor]

    def device_budget(self) -> int:
        """Free device memory less llama-fit-params' margin per device."""
        if self.build.backend == "vulkan":
            return sum(max(0, d.free_bytes - DEVICE_MARGIN_BYTES) for d in self.build.devices)
        return sum(
            max(0, (g.vram_free_bytes if g.vram_free_bytes is not None else g.vram_total_bytes) - DEVICE_MARGIN_BYTES)
            for g in self._gpus()
        )

    def host_budget(self) -> int:
        available = self.hw.memory.available_bytes
        return max(0, available - max(HOST_MARGIN_BYTES, int(available * HOST_MARGIN_FRACTION)))

    # -- the decisions --------------------------------------------------------------------------

    def busy_cores(self) -> tuple[int, str] | None:
        """Physical cores that other programs keep busy, and how the planner knows; None: the CPUs are ours."""
        if self.req.machine == "dedicated":
            return None
        cpu = self.hw.cpu
        physical = max(1, cpu.physical_cores)
        logical = max(physical, cpu.logical_cores)
        measured = 0
        if self.load is not None:
            # Work on a logical CPU takes its share of a physical core (half of one with two threads per core).
            measured = math.floor(self.load.busy_cpus * physical / logical + 1 - BUSY_CORE_FRACTION)
        if self.req.machine == "shared" and measured < 1:
            return 1, "--machine shared: another program may keep a core busy"
        if measured < 1 or self.load is None:
            return None
        return min(measured, physical), f"measured when planning: {self.load.describe()}"

    def threads(self, backend: str, all_on_gpu: bool) -> tuple[int, int, int | None]:
        """``-t``, ``-tb`` and ``--poll`` (None: upstream's)."""
        cpu = self.hw.cpu
        physical = max(1, cpu.physical_cores)
        logical = max(physical, cpu.logical_cores)
        busy = self.busy_cores()
        if busy is not None:
            taken, how = busy
            threads = max(1, physical - taken)
            if all_on_gpu:
                threads = min(threads, 4)
            self.note(
                "threads", f"-t {threads} -tb {threads}",
                f"{taken} of {physical} cores are taken ({how}): llama.cpp's threads wait for each other at every "
                "step, and one that shares a core with another program stalls them all, so one thread per free core"
                + ("" if physical > taken else " (at least one)"),
            )
            self.note(
                "poll", 0, "idle threads sleep instead of spinning, leaving their time slices to the other programs",
            )
            return threads, threads, 0
        if all_on_gpu:
            # The CPU only schedules GPU work; more threads just spin in the thread pool's barrier.
            threads = min(physical, 4)
            self.note("threads", f"-t {threads} -tb {threads}", "all layers on the GPU: the CPU only feeds it")
            return threads, threads, None
        threads, batch = physical, logical
        self.note(
            "threads", f"-t {threads} -tb {batch}",
            f"generation is memory-bound: one thread per physical core ({physical}); prompt processing is "
            f"compute-bound and uses every hardware thread ({logical})",
        )
        return threads, batch, None

    def context(self) -> tuple[int, int]:
        m, req = self.model, self.req
        train = m.n_ctx_train or WORKLOAD_CONTEXT["edit"]
        if req.ctx is not None:
            ctx = req.ctx
            why = "as requested"
            if ctx > train:
                why += f"; beyond the trained {train} tokens quality degrades"
        elif req.profile == "quality":
            ctx, why = train, "the model's full trained context"
        else:
            ctx = min(train, WORKLOAD_CONTEXT[req.workload])
            why = f"enough for a {req.workload} session" + (" (the model's trained context)" if ctx == train else "")
        if req.slots is not None:
            slots, slot_why = req.slots, "as requested"
        elif req.profile == "memory":
            slots, slot_why = 1, "one request at a time keeps the KV cache smallest"
        else:
            slots = DEFAULT_SLOTS
            slot_why = "concurrent requests decode in one batch: the weights are read once per step for all of them"
        self.note("ctx_per_slot", ctx, why)
        self.note("slots", slots, slot_why)
        return ctx, slots

    def pool(self, ctx: int, slots: int, on_demand: bool) -> tuple[int, bool]:
        """Cells of the KV pool and whether it is one unified pool shared by all slots."""
        if slots == 1:
            return ctx, False
        train = self.model.n_ctx_train or ctx
        if on_demand:
            total = ctx * slots
            why = f"every slot can hold {ctx} tokens at once; pages are committed only as tokens arrive"
        else:
            # Preallocated: never reserve more than upstream's default (the trained context for all
            # slots together), but give each slot at least its own context.
            total = max(ctx, min(ctx * slots, train))
            why = (
                f"one pool shared by the {slots} slots (each may use up to {ctx}); preallocated, so sized like "
                f"upstream's default" if total < ctx * slots else f"{ctx} tokens for each of the {slots} slots"
            )
        self.note("ctx_total", f"-c {total} -kvu", why)
        return total, True

    def flash_attention(self, backend: str) -> bool:
        cal = self.calibration
        if cal is not None and (why := cal.evidence("flash_attn", "-fa on" if cal.chosen.flash_attn else "-fa off")):
            if not cal.chosen.flash_attn:
                why += "; without it V stays f16 and KV is allocated at start-up"
            self.note("flash_attn", "on" if cal.chosen.flash_attn else "off", why)
            return cal.chosen.flash_attn
        if backend == "cpu":
            # Off would decode faster at long context on the CPU kernel, but prompts process slower and short
            # contexts decode slower: over the bench suite it lost (docs/benchmarks/tuner.md, flash attention).
            why = "quantized V and on-demand KV need it, and it avoids the n_ctx x n_ubatch score matrix"
        else:
            why = f"fused attention kernels on {backend}; needed for quantized V and on-demand KV"
        self.note("flash_attn", "on", why)
        return True

    def batches(self, backend: str) -> tuple[int, int]:
        cal = self.calibration
        measured = cal.evidence("ubatch", f"-ub {cal.chosen.ubatch}", "prompt") if cal is not None else None
        if cal is not None and measured is not None:
            ub, why = cal.chosen.ubatch, measured
            if self.req.profile == "memory" and ub > 256:
                ub, why = 256, f"a smaller ubatch halves the compute buffer (the fastest, {measured})"
        elif self.req.profile == "memory":
            ub, why = 256, "a smaller ubatch halves the compute buffer; prompts process a little slower"
        elif backend in ("cuda", "rocm") and self.device_budget() >= 16 * GiB:
            ub, why = 1024, "a large GPU processes 1024-token ubatches faster, and has room for the buffer"
        else:
            ub, why = 512, "upstream's ubatch: the CPU/GPU matrix kernels saturate at this size"
        batch = max(2048, ub)
        self.note("batch", f"-b {batch} -ub {ub}", why)
        return batch, ub

    def checkpoints(self) -> int | None:
        """Context checkpoints per slot; only sliding-window models make them (noted with their size by
        ``note_checkpoints`` once the KV types are chosen)."""
        return CTX_CHECKPOINTS[self.req.profile] if self.model.has_swa else None

    def note_checkpoints(self, n: int, type_k: str, type_v: str) -> None:
        size = self.model.swa_checkpoint_bytes(type_k, type_v)
        self.note(
            "ctx_checkpoints", n,
            f"each is a {size / MiB:.1f} MiB copy of the sliding-window layers; upstream keeps up to "
            f"{UPSTREAM_CTX_CHECKPOINTS} a slot, and {n} keep the last {n // 2} request(s) of a slot restorable",
        )

    def prompt_cache(self, s: Settings, memory: MemoryEstimate) -> int | None:
        """``--cache-ram`` in MiB: room for one saved copy of every slot's state (its KV, checkpoints and the
        draft's KV, what llama-server saves of a slot), within what the host budget leaves beside ``memory``.
        None when the server has no prompt cache (older pins)."""
        if not self.build.flags.accepts("--cache-ram"):
            return None
        if self.req.profile == "memory":
            self.note("cache_ram", "0", "no host-RAM prompt cache: idle slots do not keep copies of their KV")
            return 0
        state = memory.kv_bytes + memory.checkpoint_bytes + _draft_kv_bytes(s)
        room = self.host_budget() - memory.host_bytes
        mib = max(0, min(state, room)) // MiB
        if mib < 1:
            self.note("cache_ram", "0", "no RAM left for a prompt cache once the model, KV and buffers are held")
            return 0
        self.note(
            "cache_ram", mib,
            ("one saved copy of every slot's KV" if room >= state else "what RAM has left")
            + ": a conversation whose slot was reused resumes from RAM without reprocessing its prompt; "
            f"upstream's default is {UPSTREAM_CACHE_RAM_MIB} MiB, whatever the machine has",
        )
        return mib

    def load_mode(self, s: Settings, memory: MemoryEstimate) -> tuple[Settings, MemoryEstimate]:
        """Read the weights instead of mapping them when some are repacked into buffers of their own (CPU_REPACK,
        AMX): the repacking reads their mapped originals, whose pages then stay resident beside the copies and
        are never read again. Read, only the copies are held (upstream suggests the same for CPU overrides)."""
        originals = memory.repack_originals_bytes
        if originals < MiB or not self.build.flags.accepts("--load-mode"):
            return s, memory
        self.note(
            "load_mode", "none",
            f"{_mib(memory.repack_bytes)} of weights are repacked for this CPU; mapped, their {_mib(originals)} "
            "of originals would stay resident beside the copies",
        )
        smaller = replace(
            memory, weights_bytes=memory.weights_bytes - originals, host_bytes=memory.host_bytes - originals,
            repack_originals_bytes=0,
        )
        return self.lazy_embeddings(replace(s, load_mode_none=True), smaller)

    def lazy_embeddings(self, s: Settings, memory: MemoryEstimate) -> tuple[Settings, MemoryEstimate]:
        """Read weights hold all of the token embedding, though the lookup reads only the rows of the tokens
        seen (a few hundred of gemma3's 262k); kept mapped, those rows are all it costs. Not when the output
        matrix is the embedding itself in the plain CPU buffer: the output product reads every row."""
        model = self.model
        if model.embedding_bytes < MiB or not self.build.has_patch(LAZY_EMBEDDING_PATCH):
            return s, memory
        if not self.build.flags.accepts("--lazy-mode"):
            return s, memory
        if model.tied_embedding is not None and not repacked_tied_output_bytes(self.build, model):
            return s, memory
        touched = lazy_embedding_bytes(model, s.ctx_total)
        self.note(
            "lazy_embeddings", "on",
            f"the lookup reads the token embedding ({_mib(model.embedding_bytes)}) a row per token: mapped, "
            f"about {_mib(touched)} of it is resident with every slot full",
        )
        saved = model.embedding_bytes - touched
        smaller = replace(memory, weights_bytes=memory.weights_bytes - saved, host_bytes=memory.host_bytes - saved)
        return replace(s, lazy_embeddings=True), smaller

    def kv_on_demand(self, flash_attn: bool) -> bool:
        if not self.build.has_patch(KV_ON_DEMAND_PATCH):
            return False
        if not self.build.flags.accepts("--kv-on-demand"):
            self.note("kv_on_demand", "off", "the build has the patch but its llama-server lists no --kv-on-demand")
            return False
        if not flash_attn:
            self.note("kv_on_demand", "off", "needs flash attention (V must not be transposed)")
            return False
        self.note("kv_on_demand", "on", "KV memory is committed as tokens arrive instead of all at start-up")
        return True

    def kv_types(self, backend: str, flash_attn: bool, fits: Callable[[str, str], bool]) -> tuple[str, str, str]:
        """The first allowed pair of the profile's preference that fits the memory budget; when none
        does, the smallest allowed one (on a GPU it lets the most layers stay on the device)."""
        rejected: list[str] = []
        fallback: tuple[str, str, str] | None = None
        for (k, v), why in self._measured_kv_order(_kv_candidates(self.req.profile, backend)):
            problem = kv_pair_problem(
                self.model, backend, k, v, flash_attn=flash_attn, fa_kv_pairs=self.build.fa_kv_pairs,
            )
            if problem:
                rejected.append(f"{k}/{v}: {problem}")
                continue
            fallback = (k, v, why + "; nothing larger fits in memory")
            if fits(k, v):
                if rejected:
                    why += f" (not {rejected[0]})"
                return k, v, why
        if fallback is None:
            raise VelollmError(f"no KV cache type pair is usable for {self.model.name} on {backend}: {rejected}")
        return fallback

    def _measured_kv_order(
        self, candidates: list[tuple[tuple[str, str], str]]
    ) -> list[tuple[tuple[str, str], str]]:
        """With a calibration, the speed and balanced profiles try the pair measured fastest first; the reason
        of each measured pair cites the measurement."""
        cal = self.calibration
        if cal is None:
            return candidates
        fastest = (cal.chosen.type_k, cal.chosen.type_v)
        cited = []
        for pair, why in candidates:
            measured = cal.evidence("kv_types", "/".join(pair))
            cited.append((pair, f"{why}; {measured}" if measured else why))
        if self.req.profile in ("speed", "balanced") and cal.evidence("kv_types", "/".join(fastest)):
            cited.sort(key=lambda candidate: candidate[0] != fastest)
        return cited

    def measured_threads(self, cal: Calibration) -> tuple[int, int]:
        """The decode and prompt threads ``tune --measure`` found fastest (kept apart from :meth:`threads`,
        the guess without a measurement)."""
        threads, batch = cal.chosen.threads, cal.threads_batch
        decode = cal.evidence("threads", f"-t {threads}", "decode") or "measured"
        prompt = (cal.evidence("threads", f"-t {batch}", "prompt") or "").removeprefix("measured: ")
        self.note("threads", f"-t {threads} -tb {batch}", f"{decode}; {prompt}" if prompt else decode)
        return threads, batch

    def measured_switches(self, cal: Calibration) -> tuple[int | None, bool]:
        """``--poll`` and weight repacking as measured (the server's defaults where not measured)."""
        poll: int | None = None
        if self.build.flags.accepts("--poll") and (why := cal.evidence("poll", f"--poll {cal.chosen.poll}")):
            poll = cal.chosen.poll
            self.note("poll", poll, why)
        repack = True
        if self.build.flags.accepts("--no-repack") and (why := cal.evidence("repack", "on" if cal.chosen.repack
                                                                             else "off")):
            repack = cal.chosen.repack
            self.note("repack", "on" if repack else "off", why)
        return poll, repack

    def speculation(self) -> Speculation | None:
        req, flags = self.req, self.build.flags
        offered = _spec_types(flags)
        if not offered:
            self.note("speculation", "off", "this llama-server has no --spec-type")
            return None
        types: list[str] = []
        if req.workload in ("code", "edit"):
            ngram = next((t for t in NGRAM_TYPES if t in offered), None)
            if ngram:
                types.append(ngram)
                self.note("spec_ngram", ngram, f"{req.workload} output repeats its input: n-gram drafts cost no model")
        draft = self._draft(offered)
        n_max = p_min = None
        if draft is not None:
            acceptance = DRAFT_ACCEPTANCE[req.workload]
            n_max = best_draft_length(acceptance, draft.bytes_ratio)
            gain = expected_speedup(acceptance, draft.bytes_ratio, n_max)
            model = (
                f"{acceptance:.0%} acceptance and {draft.bytes_ratio:.2f}x the target's cost per token: "
                f"{n_max} tokens per draft, expected {gain:.2f}x"
            )
            if gain < MIN_DRAFT_SPEEDUP and req.draft == "auto":
                self.note("spec_draft", "none", f"{draft.label} is compatible, but at {model} it is not worth it")
                draft = None
            else:
                types.append("draft-simple")
                p_min = DRAFT_P_MIN
                self.note("spec_draft", draft.label, f"{draft.reason}; at {model}")
                self.note("spec_draft_p_min", p_min, "stop a draft where the draft model is unsure")
        if not types:
            if not any(c.key == "spec_draft" for c in self.choices):
                self.note("speculation", "off", f"{req.workload} workload and no compatible smaller draft model found")
            return None
        adaptive: str | None = None
        adaptive_min: int | None = None
        if self.build.has_patch(SPEC_ADAPTIVE_PATCH):
            # Fixed n-gram draft lengths (ngram-mod: up to 64 tokens) cost more than they return when the
            # output stops repeating the input, and under concurrency on a CPU; adaptive lengths do not.
            switches = [s for s in flags.find("adaptive") if not s.takes_value and s.names[0].startswith("--spec")]
            if switches:
                adaptive = switches[0].names[-1]
                self.note("spec_adaptive", adaptive, "the build adapts the draft length to the acceptance it measures")
                if flags.accepts(SPEC_ADAPTIVE_MIN_FLAG):
                    # The default minimum (1) keeps drafting even where every draft costs more than it
                    # returns (a batched verification dearer than its accepted tokens, as on small CPUs).
                    adaptive_min = 0
                    self.note(
                        "spec_adaptive_min", adaptive_min,
                        "stop drafting where drafts cost more than they return (the server still tries a draft "
                        "length every 32 steps)",
                    )
        # Upstream's CPU kernels sum a token of a verification batch in another order than the same token
        # alone; at a near-tie greedy decoding then picks another token and the text changes.
        batch_invariant = (
            self.build.backend == "cpu"
            and self.build.has_patch(SPEC_BATCH_INVARIANT_PATCH)
            and flags.accepts(SPEC_BATCH_INVARIANT_FLAG)
        )
        if batch_invariant:
            self.note(
                "spec_batch_invariant", "on",
                "verification batches are computed bit for bit as single tokens, so speculation gives plain "
                "greedy decoding's text",
            )
        return Speculation(tuple(types), draft, n_max, p_min, adaptive, adaptive_min, batch_invariant)

    def _draft(self, offered: tuple[str, ...]) -> DraftCandidate | None:
        req = self.req
        if req.draft == "none":
            self.note("spec_draft", "none", "disabled with --draft none")
            return None
        if "draft-simple" not in offered:
            return None
        if req.draft != "auto":
            path = Path(req.draft).expanduser()
            info = inspect_model(path)
            compat = draft_compatibility(self.model, info)
            if not compat.ok:
                raise VelollmError(f"{path} cannot draft for {self.model.name}: {compat.reason}")
            return DraftCandidate(
                path, str(path), info, info.n_params / max(1, self.model.n_params),
                info.file_size / max(1, self.model.file_size), f"given with --draft; {compat.reason}",
            )
        found = find_draft_candidates(self.model, req.draft_dirs)
        return found[0] if found else None


def _arg_table(s: Settings) -> list[tuple[str, tuple[str, ...], str | None]]:
    """(setting, accepted spellings newest first, value or None for a switch), in command order."""
    rows: list[tuple[str, tuple[str, ...], str | None]] = [
        ("threads", ("--threads", "-t"), str(s.threads)),
        ("threads_batch", ("--threads-batch", "-tb"), str(s.threads_batch)),
        *([("poll", ("--poll",), str(s.poll))] if s.poll is not None else []),
        ("ctx_total", ("--ctx-size", "-c"), str(s.ctx_total)),
        ("slots", ("--parallel", "-np"), str(s.slots)),
    ]
    if s.slots > 1:
        rows.append(("kv_unified", ("--kv-unified", "-kvu") if s.kv_unified else ("--no-kv-unified", "-no-kvu"), None))
        if s.kv_unified and s.ctx_total > s.ctx_per_slot:
            rows.append(("ctx_per_slot", ("--kv-unified-per-slot",), str(s.ctx_per_slot)))
    if s.gpu_layers is not None:
        rows.append(("gpu_layers", ("--gpu-layers", "--n-gpu-layers", "-ngl"), str(s.gpu_layers)))
    if s.tensor_split:
        rows.append(("tensor_split", ("--tensor-split", "-ts"), s.tensor_split))
    if s.tensor_overrides:
        rows.append(("tensor_overrides", ("--override-tensor", "-ot"), s.tensor_overrides))
    rows += [
        ("flash_attn", ("--flash-attn", "-fa"), "on" if s.flash_attn else "off"),
        ("cache_type_k", ("--cache-type-k", "-ctk"), s.cache_type_k),
        ("cache_type_v", ("--cache-type-v", "-ctv"), s.cache_type_v),
        ("batch", ("--batch-size", "-b"), str(s.batch)),
        ("ubatch", ("--ubatch-size", "-ub"), str(s.ubatch)),
    ]
    if s.kv_on_demand:
        rows.append(("kv_on_demand", ("--kv-on-demand",), None))
    if s.cache_ram_mib is not None:
        rows.append(("cache_ram", ("--cache-ram", "-cram"), str(s.cache_ram_mib)))
    if not s.repack:
        rows.append(("repack", ("--no-repack", "-nr"), None))
    if s.load_mode_none:
        rows.append(("load_mode", ("--load-mode", "-lm"), "none"))
    if s.lazy_embeddings:
        rows.append(("lazy_embeddings", ("--lazy-mode", "-lzm"), "embd"))
    if s.ctx_checkpoints is not None:
        rows.append(("ctx_checkpoints", ("--ctx-checkpoints", "-ctxcp", "--swa-checkpoints"), str(s.ctx_checkpoints)))
    spec = s.speculation
    if spec is not None:
        rows.append(("spec_type", ("--spec-type",), ",".join(spec.types)))
        if spec.draft is not None:
            rows += [
                ("spec_draft", ("--spec-draft-model", "--model-draft", "-md"), str(spec.draft.path)),
                ("spec_draft_n_max", ("--spec-draft-n-max",), str(spec.draft_n_max)),
                ("spec_draft_p_min", ("--spec-draft-p-min", "--draft-p-min"), f"{spec.draft_p_min:.2f}"),
                ("spec_draft_type_k", ("--spec-draft-type-k", "-ctkd", "--cache-type-k-draft"), s.cache_type_k),
                ("spec_draft_type_v", ("--spec-draft-type-v", "-ctvd", "--cache-type-v-draft"), s.cache_type_v),
            ]
            if s.gpu_layers is not None:
                rows.append(("spec_draft_ngl", ("--spec-draft-ngl", "-ngld", "--gpu-layers-draft"), "all"))
        if spec.adaptive_flag:
            rows.append(("spec_adaptive", (spec.adaptive_flag,), None))
        if spec.adaptive_min is not None:
            rows.append(("spec_adaptive_min", (SPEC_ADAPTIVE_MIN_FLAG,), str(spec.adaptive_min)))
        if spec.batch_invariant:
            rows.append(("spec_batch_invariant", (SPEC_BATCH_INVARIANT_FLAG,), "on"))
    # /metrics carries the speculation and (with the on-demand patch) KV gauges serve and bench read.
    rows.append(("metrics", ("--metrics",), None))
    return rows


def render(
    s: Settings, model: ModelInfo, flags: ServerFlags
) -> tuple[tuple[str, ...], dict[str, str], tuple[str, ...]]:
    """Arguments, ``LLAMA_ARG_*`` environment and the settings this server has no flag for."""
    args: list[str] = []
    env: dict[str, str] = {}
    missing: list[str] = []
    model_flag = flags.first("--model", "-m")
    if model_flag:
        assignment = flags.env_assignment(model_flag, str(model.path))
        if assignment:
            env[assignment[0]] = assignment[1]
    for key, names, value in _arg_table(s):
        name = flags.first(*names)
        if name is None:
            missing.append(f"{key}: this llama-server accepts none of {', '.join(names)}")
            continue
        args += [name] if value is None else [name, value]
        assignment = flags.env_assignment(name, value)
        if assignment:
            env[assignment[0]] = assignment[1]
    return tuple(args), env, tuple(missing)


def _fit_wanted(s: Settings) -> list[tuple[str, str | None]]:
    wanted: list[tuple[str, str | None]] = [
        ("-c", str(s.ctx_total)), ("-np", str(s.slots)), ("-fa", "on" if s.flash_attn else "off"),
        ("-ctk", s.cache_type_k), ("-ctv", s.cache_type_v), ("-b", str(s.batch)), ("-ub", str(s.ubatch)),
        ("-t", str(s.threads)),
        # patch 0003: estimate the compute buffer for the logits rows the server reserves, not a whole ubatch
        ("--fit-outputs", str(server_outputs(s.speculation, s.slots, s.batch))),
    ]
    if s.kv_unified and s.slots > 1:
        wanted.append(("-kvu", None))
    if not s.repack:
        wanted.append(("--no-repack", None))
    if s.gpu_layers is not None:
        wanted.append(("-ngl", str(s.gpu_layers)))
    if s.tensor_split:
        wanted.append(("-ts", s.tensor_split))
    if s.tensor_overrides:
        wanted.append(("-ot", s.tensor_overrides))
    return wanted


def _draft_bytes(s: Settings) -> int:
    """The draft model's weights and its KV cache, which mirrors the target's context (common/speculative.cpp).
    llama-fit-params of the pinned tree does not load a draft, so this is always arithmetic."""
    spec = s.speculation
    if spec is None or spec.draft is None:
        return 0
    return spec.draft.info.file_size + _draft_kv_bytes(s)


def _draft_kv_bytes(s: Settings) -> int:
    spec = s.speculation
    if spec is None or spec.draft is None:
        return 0
    return spec.draft.info.kv_bytes(
        s.ctx_total, s.slots, s.cache_type_k, s.cache_type_v, n_ubatch=s.ubatch, unified=s.kv_unified or s.slots == 1,
    )


def _arithmetic_memory(model: ModelInfo, s: Settings, backend: str, on_demand: bool) -> MemoryEstimate:
    kv = model.kv_bytes(
        s.ctx_total, s.slots, s.cache_type_k, s.cache_type_v, n_ubatch=s.ubatch, unified=s.kv_unified or s.slots == 1,
    )
    compute = compute_bytes_estimate(
        model, s.ubatch, s.ctx_total, s.flash_attn, server_outputs(s.speculation, s.slots, s.batch),
    )
    weights = model.file_size
    draft = _draft_bytes(s)
    checkpoints = checkpoint_bytes_estimate(model, s)
    runtime = runtime_bytes_estimate(model)
    device = 0
    if backend != "cpu" and s.gpu_layers:
        share = min(1.0, s.gpu_layers / (model.n_layers + 1))
        device = int((weights + kv + draft) * share) + compute
    total = weights + kv + compute + draft + checkpoints + runtime
    return MemoryEstimate(
        weights_bytes=weights, kv_bytes=kv, compute_bytes=compute, draft_bytes=draft, device_bytes=device,
        host_bytes=total - device, method="arithmetic", kv_on_demand=on_demand, checkpoint_bytes=checkpoints,
        runtime_bytes=runtime,
    )


# ggml-cpu/amx: the types its matrix kernels take, with the bytes its packed copy adds to a block (scales and
# compensation, get_row_size in mmq.cpp) and the multiple the row length must be (supports_op in amx.cpp).
_AMX_BLOCK_EXTRA = {"Q4_0": 0, "Q4_1": 0, "Q8_0": 4, "Q4_K": 4, "Q5_K": 4, "Q6_K": 0, "IQ4_XS": 2, "F16": 0}
_AMX_ROW_MULTIPLE = {"Q4_0": 32, "Q4_1": 32, "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256,
                     "F16": 16}  # fmt: skip
# Patch amx-widen-q5-0 stores a Q5_0 block (22 bytes) as a packed Q8_0 block: 34 bytes and 4 of compensation.
_AMX_WIDENED_Q5_0_EXTRA = 34 + _AMX_BLOCK_EXTRA["Q8_0"] - 22
# Patch cpu-repack-q8-0 stores a Q5_0 block as a Q8_0 one (34 bytes) in the CPU_REPACK buffer.
_CPU_WIDENED_Q5_0_EXTRA = 34 - 22


def amx_tied_output_bytes(model: ModelInfo, widen: bool) -> int:
    """Bytes of the AMX copy of a tied output matrix, which ``llama-fit-params`` counts in no row.

    With tied embeddings llama.cpp multiplies by a duplicate of ``token_embd``; on an AMX build that duplicate
    goes to the AMX buffer (a packed copy) while the original stays mapped for the embedding lookup. For
    gemma3-270m that copy is 190 MiB, beside a 241 MiB file (its Q8_0 embeddings). ``widen``: the build
    widens Q5_0 into the AMX buffer (patch amx-widen-q5-0)."""
    if model.tied_embedding is None or model.vocab is None:
        return 0
    ggml_type, n_bytes = model.tied_embedding
    if widen and ggml_type == "Q5_0":
        extra, multiple = _AMX_WIDENED_Q5_0_EXTRA, 32
    elif ggml_type in _AMX_BLOCK_EXTRA:
        extra, multiple = _AMX_BLOCK_EXTRA[ggml_type], _AMX_ROW_MULTIPLE[ggml_type]
    else:
        return 0
    if model.n_embd % multiple or model.vocab.n_tokens % 32:
        return 0
    block, _ = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    return n_bytes + model.n_embd // block * model.vocab.n_tokens * extra


def repacked_tied_output_bytes(build: BuildFacts, model: ModelInfo) -> int:
    """Bytes of the repacked copy (AMX, or CPU_REPACK with patch cpu-repack-q8-0) of a tied output matrix, which
    ``llama-fit-params`` counts in no row; 0 when the output product reads the embedding itself."""
    if build.amx:
        return amx_tied_output_bytes(model, build.has_patch(AMX_WIDEN_PATCH))
    if not build.cpu_repack_q8_0 or model.tied_embedding is None or model.vocab is None:
        return 0
    ggml_type, _ = model.tied_embedding
    if ggml_type not in ("Q8_0", "Q5_0") or model.n_embd % 32 or model.vocab.n_tokens % 8:
        return 0
    return model.n_embd // 32 * model.vocab.n_tokens * 34  # Q8_0 blocks, a Q5_0 one widened


def widened_q5_0_extra_bytes(build: BuildFacts, model: ModelInfo) -> int:
    """What storing the Q5_0 matrices widened to Q8_0 adds to their repacked copies (the dry run counts them at
    their file size)."""
    if build.amx:
        return model.q5_0_matrix_blocks * _AMX_WIDENED_Q5_0_EXTRA if build.has_patch(AMX_WIDEN_PATCH) else 0
    return model.q5_0_rows8_blocks * _CPU_WIDENED_Q5_0_EXTRA if build.cpu_repack_q8_0 else 0


def lazy_embedding_bytes(model: ModelInfo, ctx_total: int) -> int:
    """What a lazily read token embedding holds: a page per distinct token, with as many distinct tokens as
    a quarter of the context (at most the vocabulary), capped at the whole tensor."""
    n_vocab = model.vocab.n_tokens if model.vocab else 0
    if not n_vocab:
        return model.embedding_bytes
    row = model.embedding_bytes // n_vocab
    pages_per_row = max(1, -(-row // PAGE_BYTES))
    return min(model.embedding_bytes, min(n_vocab, ctx_total // 4) * pages_per_row * PAGE_BYTES)


def _oracle_memory(build: BuildFacts, model: ModelInfo, s: Settings, on_demand: bool) -> MemoryEstimate | None:
    try:
        rows = fit_print(build, model.path, _fit_wanted(s))
    except VelollmError as exc:
        log.warning("memory oracle unavailable, using arithmetic: %s", exc)
        return None
    weights = sum(r.model for r in rows)
    kv = sum(r.context for r in rows)
    compute = sum(r.compute for r in rows)
    device = sum(r.model + r.context + r.compute for r in rows if r.name != "Host")
    host = sum(r.model + r.context + r.compute for r in rows if r.name == "Host")
    repack = originals = 0
    if device == 0:
        # The dry run counts the repacked copies (CPU_REPACK, AMX) of the weights in no row, and counts their
        # mapped originals out of the model row; both are resident while the file is mapped (the originals are
        # read to repack them; _ServerPlanner.load_mode plans reading instead and takes them out again).
        repack = model.tensor_bytes - weights
        repack = repack if repack >= MiB else 0  # the rows are whole MiB: less is rounding, not repacking
        weights += repack
        host += 2 * repack
        originals = repack
        tied = repacked_tied_output_bytes(build, model) if s.repack else 0
        widened = widened_q5_0_extra_bytes(build, model) if s.repack else 0
        repack += tied + widened
        host += tied + widened  # a tied original stays mapped for the embedding lookup: it is in the weights
    draft = _draft_bytes(s)
    # The draft goes where the target's layers go (-ngld all on a GPU build).
    if s.gpu_layers:
        device += draft
    else:
        host += draft
    checkpoints = checkpoint_bytes_estimate(model, s)
    runtime = runtime_bytes_estimate(model)
    host += checkpoints + runtime
    return MemoryEstimate(
        weights_bytes=weights, kv_bytes=kv, compute_bytes=compute, draft_bytes=draft, device_bytes=device,
        host_bytes=host, method="llama-fit-params", kv_on_demand=on_demand, repack_bytes=repack,
        repack_originals_bytes=originals,
        checkpoint_bytes=checkpoints, runtime_bytes=runtime,
    )


def plan(
    model: ModelInfo, hw: HardwareInfo, build: BuildFacts, request: TuneRequest | None = None,
    calibration: Calibration | None = None,
    load: HostLoad | None = None,
) -> Plan:
    """Choose every knob for serving ``model`` on ``hw`` with ``build``; every choice carries its reason. With a
    ``calibration`` (``tune --measure``), the knobs it measured take its values and the plan predicts tokens/s.
    ``load``: other programs' CPU load when planning (None: not measured, the CPUs count as free unless
    ``machine`` is ``shared``); cores it takes outrank the calibration's threads and ``--poll``."""
    req = request or TuneRequest()
    req.validate()
    p = _ServerPlanner(model, hw, build, req, calibration, load)
    backend = p.backend()
    ctx, slots = p.context()
    flash_attn = p.flash_attention(backend)
    on_demand = p.kv_on_demand(flash_attn)
    ctx_total, unified = p.pool(ctx, slots, on_demand)
    batch, ubatch = p.batches(backend)
    spec = p.speculation()
    checkpoints = p.checkpoints()
    weights = model.file_size + (spec.draft.info.file_size if spec and spec.draft else 0)
    compute = compute_bytes_estimate(model, ubatch, ctx_total, flash_attn, server_outputs(spec, slots, batch))
    budget = p.device_budget() if backend != "cpu" else p.host_budget()

    def fits(k: str, v: str) -> bool:
        kv = model.kv_bytes(ctx_total, slots, k, v, n_ubatch=ubatch, unified=unified or slots == 1)
        if checkpoints is not None and backend == "cpu":  # checkpoints are host copies, also on a GPU build
            kv += slots * checkpoints * model.swa_checkpoint_bytes(k, v)
        # With on-demand KV a full reservation is the worst case, not the start-up cost, but the
        # budget must still hold it when every slot fills up.
        return weights + kv + compute <= budget

    type_k, type_v, kv_why = p.kv_types(backend, flash_attn, fits)
    p.note("kv_types", f"{type_k}/{type_v}", kv_why)
    if checkpoints is not None:
        p.note_checkpoints(checkpoints, type_k, type_v)
    if backend == "cpu" and not fits(type_k, type_v):
        need = weights + model.kv_bytes(ctx_total, slots, type_k, type_v, n_ubatch=ubatch, unified=unified)
        raise VelollmError(
            f"{model.name} needs about {_mib(need + compute)} with a {ctx_total}-token KV cache, but only "
            f"{_mib(budget)} of RAM is available; pass a smaller --ctx or --slots, or use --profile memory"
        )
    settings = Settings(
        threads=1, threads_batch=1, gpu_layers=None, tensor_split=None, tensor_overrides=None,
        ctx_per_slot=ctx, slots=slots, ctx_total=ctx_total, kv_unified=unified, cache_type_k=type_k,
        cache_type_v=type_v, flash_attn=flash_attn, batch=batch, ubatch=ubatch, kv_on_demand=on_demand,
        cache_ram_mib=None, speculation=spec, ctx_checkpoints=checkpoints,
    )
    all_on_gpu = False
    if backend != "cpu":
        settings, all_on_gpu = _offload(p, model, settings, fits(type_k, type_v))
    if calibration is not None and p.busy_cores() is None:
        threads, threads_batch = p.measured_threads(calibration)
        poll, repack = p.measured_switches(calibration)
        settings = replace(settings, poll=poll, repack=repack)
    else:
        # A calibration is measured on a quiet machine: cores other programs take now decide threads and --poll.
        threads, threads_batch, poll = p.threads(backend, all_on_gpu)
        settings = replace(settings, poll=poll)
    settings = replace(settings, threads=threads, threads_batch=threads_batch)
    memory = None
    if build.fit_params is not None:
        memory = _oracle_memory(build, model, settings, on_demand)
    if memory is None:
        memory = _arithmetic_memory(model, settings, backend, on_demand)
    settings, memory = p.load_mode(settings, memory)
    # The prompt cache takes what the budget leaves, so it is sized once the rest is known; it changes nothing
    # that the memory oracle estimates.
    cache_ram_mib = p.prompt_cache(settings, memory)
    settings = replace(settings, cache_ram_mib=cache_ram_mib)
    cache_bytes = (cache_ram_mib or 0) * MiB
    memory = replace(memory, prompt_cache_bytes=cache_bytes, host_bytes=memory.host_bytes + cache_bytes)
    args, env, missing = render(settings, model, build.flags)
    return Plan(
        model=model, build_id=build.build_id, backend=backend, profile=req.profile, workload=req.workload,
        settings=settings, args=args, env=env, choices=tuple(p.choices), memory=memory, not_applied=missing,
        calibration=calibration,
    )


def _offload(p: _ServerPlanner, model: ModelInfo, s: Settings, fits_fully: bool) -> tuple[Settings, bool]:
    """GPU layers: the build's llama-fit-params decides when present; otherwise the arithmetic."""
    n_offloadable = model.n_layers + 1  # the output layer is offloaded as one more "layer"
    build = p.build
    if build.fit_params is not None:
        wanted = [w for w in _fit_wanted(s) if w[0] not in ("-ngl", "-ts", "-ot")]
        # The dry run does not load the draft model, so keep its share free on the device too.
        wanted.append(("-fitt", str((DEVICE_MARGIN_BYTES + _draft_bytes(s)) // MiB)))
        fitted = fit_layers(build, model.path, wanted)
        if fitted is not None:
            ngl = min(fitted.gpu_layers, n_offloadable) if fitted.gpu_layers >= 0 else n_offloadable
            all_on = ngl >= n_offloadable and not fitted.tensor_overrides
            p.note(
                "gpu_layers", ngl if not all_on else "all",
                "llama-fit-params' dry run with these KV types, ubatch and slots"
                + ("" if all_on else f": {ngl} of {n_offloadable} layers fit, the rest run on the CPU"),
            )
            return replace(
                s, gpu_layers=ngl, tensor_split=fitted.tensor_split, tensor_overrides=fitted.tensor_overrides,
            ), all_on
    if fits_fully:
        p.note("gpu_layers", "all", f"weights, KV and compute fit in {_mib(p.device_budget())} of free device memory")
        return replace(s, gpu_layers=n_offloadable), True
    kv = model.kv_bytes(s.ctx_total, s.slots, s.cache_type_k, s.cache_type_v, n_ubatch=s.ubatch, unified=s.kv_unified)
    per_layer = (model.file_size + kv) / n_offloadable
    outputs = server_outputs(s.speculation, s.slots, s.batch)
    room = p.device_budget() - compute_bytes_estimate(model, s.ubatch, s.ctx_total, s.flash_attn, outputs)
    ngl = max(0, min(n_offloadable, math.floor(room / per_layer))) if per_layer > 0 else 0
    p.note(
        "gpu_layers", ngl,
        f"{ngl} of {n_offloadable} layers ({_mib(int(per_layer))} each with their KV) fit in "
        f"{_mib(p.device_budget())}; the rest run on the CPU",
    )
    return replace(s, gpu_layers=ngl), False


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def model_report(info: ModelInfo, ctx: int | None, slots: int) -> dict[str, Any]:
    """``inspect``'s JSON: the header summary plus KV bytes per token and for ``ctx`` x ``slots``."""
    n_ctx = ctx or info.n_ctx_train
    per_type: dict[str, Any] = {}
    for t in KV_CACHE_TYPES:
        try:
            per_token = info.kv_bytes_per_token(t, t)
            total = info.kv_bytes(n_ctx, slots, t, t) if n_ctx else None
        except VelollmError as exc:
            per_type[t] = {"error": str(exc)}
            continue
        per_type[t] = {"bytes_per_token": per_token, "bytes": total}
    return {
        **info.to_dict(),
        "kv": {"ctx": n_ctx, "slots": slots, "unified": True, "types": per_type},
    }


def describe_model(info: ModelInfo, ctx: int | None, slots: int) -> list[str]:
    report = model_report(info, ctx, slots)
    v = info.vocab
    heads = sorted(set(info.n_head_kv))
    swa = f", sliding window {info.n_swa} on {sum(info.swa_layers)} of {info.n_layers} layers" if info.has_swa else ""
    lines = [
        f"{info.name}  ({info.path})",
        f"  architecture  {info.architecture}, {info.n_params / 1e6:.1f}M parameters, "
        f"{info.file_type or info.tensor_type or '?'}, {info.file_size / MiB:.1f} MiB, GGUF v{info.gguf_version}",
        f"  layers        {info.n_layers}, embedding {info.n_embd}, heads {info.n_head}, "
        f"KV heads {'/'.join(map(str, heads))}, head dims K {info.head_dim_k} V {info.head_dim_v}",
        f"  context       trained {info.n_ctx_train}{swa}",
    ]
    if info.n_expert:
        lines.append(f"  experts       {info.n_expert} ({info.n_expert_used} used per token)")
    if v is not None:
        lines.append(
            f"  vocabulary    {v.type} ({v.model}{', ' + v.pre if v.pre else ''}), {v.n_tokens} tokens, "
            f"BOS {v.bos_id}{' (added)' if v.add_bos else ''}, EOS {v.eos_id}{' (added)' if v.add_eos else ''}"
        )
    lines.append(f"  chat template {'yes' if info.chat_template else 'none'}")
    kv = report["kv"]
    lines.append(f"  KV cache      per token, and for {kv['ctx']} tokens x {kv['slots']} slot(s) (unified):")
    for t, row in kv["types"].items():
        if "error" in row:
            lines.append(f"    {t:<7} not usable: {row['error']}")
        else:
            total = f"{row['bytes'] / MiB:9.1f} MiB" if row["bytes"] is not None else "?"
            lines.append(f"    {t:<7} {row['bytes_per_token'] / 1024:8.2f} KiB/token  {total}")
    return lines


def plan_for(
    model_ref: str | None, hw: HardwareInfo, build: InstalledBuild, paths: Paths, request: TuneRequest
) -> Plan:
    """The CLI's entry: resolve the model (see :func:`~velollm_patch.model_ref.resolve_model`), read the build's
    facts, measure other programs' CPU load (``machine`` auto or shared), plan."""
    request.validate()
    info = inspect_model(resolve_model(paths, model_ref))
    calibration = calibrate.load(paths, calibrate.CalibrationKey.create(build, info.path, hw))
    load = probe_host_load() if request.machine != "dedicated" else None
    return plan(info, hw, BuildFacts.from_build(build, paths), request, calibration, load)


def shell_env(env: dict[str, str]) -> list[str]:
    """``export NAME=value`` lines for a shell."""
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
