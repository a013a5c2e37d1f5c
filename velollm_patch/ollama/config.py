"""Ollama server settings: what is set now, what to set, and writing it safely.

The knobs are environment variables of ``ollama serve`` (envconfig/config.go). Which ones matter, and
what values they may take, depends on the Ollama release (docs/ollama.md): a quantized KV cache needs
Ollama 0.5.0+, era B only knows f16/q8_0/q4_0 and needs flash attention switched on, era C
passes the type unchecked to llama-server, which dies when a model's head dims do not divide
the type's block size. ``LLAMA_ARG_*`` variables reach llama-server only in era C, and only
for flags Ollama does not pass itself.

:func:`recommend` turns a small, explicit :class:`RecommendationInputs` (hardware totals, the
loaded models' KV geometry, the Ollama version) into a :class:`ConfigPlan`: current value,
recommended value and one line of why for each variable. :func:`apply_config` writes the plan
in one of four formats with a timestamped backup, idempotently; in a file that exists it changes
only the variables the plan manages and keeps every other line as it was.
"""

from __future__ import annotations

import datetime as dt
import html
import os
import plistlib
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import escape

from velollm_patch.errors import VelollmError
from velollm_patch.files import read_limited
from velollm_patch.hardware import HardwareInfo
from velollm_patch.kv_types import KV_CACHE_TYPES, head_size_mismatch, kv_block
from velollm_patch.model_ref import resolve_local_model
from velollm_patch.ollama.api import (
    DEFAULT_PORT,
    OllamaClient,
    RunningModel,
    ShowResponse,
    parse_ollama_host,
)
from velollm_patch.ollama.gosyntax import parse_duration, parse_int
from velollm_patch.ollama.templates import render_template
from velollm_patch.ollama.versions import (
    KV_CACHE_TYPE_SINCE,
    Era,
    OllamaVersion,
    parse_reported_version,
)
from velollm_patch.paths import get_paths

GIB = 1024**3
# Below this release the settings here either do not exist (OLLAMA_KV_CACHE_TYPE arrived in
# 0.5.0) or behave in ways docs/ollama.md does not cover.
MIN_OLLAMA = KV_CACHE_TYPE_SINCE
# llama-server's --fit keeps 1024 MiB free per device by default; plans keep the same margin.
FIT_MARGIN_BYTES = GIB
# Without a GPU the model and its KV live in RAM next to everything else on the machine.
CPU_RAM_SHARE = 0.75
CONTEXT_STEPS = (4096, 8192, 16384, 32768, 65536, 131072, 262144)
DEFAULT_KEEP_ALIVE = "30m"

MANAGED = (
    "OLLAMA_HOST", "OLLAMA_FLASH_ATTENTION", "OLLAMA_KV_CACHE_TYPE", "OLLAMA_NUM_PARALLEL",
    "OLLAMA_CONTEXT_LENGTH", "OLLAMA_MAX_LOADED_MODELS", "OLLAMA_KEEP_ALIVE",
)

# Era B validated the type against this list and silently used f16 for anything else.
ERA_B_KV_TYPES = ("f16", "q8_0", "q4_0")
# gpt-oss must keep an f16 KV cache (ollama #11685); its GGUF architecture is "gptoss".
NO_KV_QUANT_ARCHS = ("gptoss", "gpt-oss")
# The quantized type recommended when every loaded model can take it: half of f16's memory.
RECOMMENDED_KV_TYPE = "q8_0"

# llama-server options Ollama >= 0.30 sets on the command line (or leaves unset on purpose so
# llama-server's auto-fit decides, as with -ngl for num_gpu -1). An explicit flag beats the
# environment, and an inherited value for the rest would override Ollama's own choice for
# every model, so these are never passed through. LLAMA_ARG_KV_UNIFIED_PER_SLOT is no flag Ollama
# passes, but it caps every slot below the num_ctx Ollama sizes them for with -c and -np
# (llama-server logs "capping per-slot context"), so it is Ollama's too.
OLLAMA_OWNED_LLAMA_ARGS = frozenset((
    "LLAMA_ARG_MODEL", "LLAMA_ARG_HOST", "LLAMA_ARG_PORT", "LLAMA_ARG_CTX_SIZE",
    "LLAMA_ARG_N_PARALLEL", "LLAMA_ARG_BATCH", "LLAMA_ARG_UBATCH", "LLAMA_ARG_N_GPU_LAYERS",
    "LLAMA_ARG_SPLIT_MODE", "LLAMA_ARG_MAIN_GPU", "LLAMA_ARG_THREADS", "LLAMA_ARG_CACHE_TYPE_K",
    "LLAMA_ARG_CACHE_TYPE_V", "LLAMA_ARG_FLASH_ATTN", "LLAMA_ARG_SPEC_TYPE", "LLAMA_ARG_KV_UNIFIED_PER_SLOT",
))
# The llama-server variables Ollama documents itself (envconfig.AsMap in envconfig/config.go, tag
# v0.33.0-rc2): every llama-server an Ollama 0.30+ runs reads them, so they need no check of that server.
OLLAMA_DOCUMENTED_LLAMA_ARGS = frozenset(("LLAMA_ARG_FIT", "LLAMA_ARG_FIT_TARGET"))
_LLAMA_ARG = re.compile(r"LLAMA_ARG_[A-Z0-9_]+")
# Characters every output format can carry without quoting rules of its own (systemd treats
# % and \ specially, env files have no quoting at all).
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.:/@+,=\[\]-]+")


# --- Inputs --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadedModel:
    """A model the server has loaded, with its KV-cache geometry where ``/api/show`` gave it.

    ``head_count_kv`` has one entry per layer (0 for layers without attention KV), because
    some architectures vary it per layer. ``size_bytes`` is ``/api/ps`` ``size`` at the per-slot
    ``context_length``; ``weights_bytes`` is the GGUF file's size when the model's blob could be
    read from the local Ollama store.
    """

    name: str
    architecture: str = ""
    size_bytes: int = 0
    context_length: int | None = None
    head_count_kv: tuple[int, ...] = ()
    key_length: int | None = None
    value_length: int | None = None
    train_context: int | None = None
    weights_bytes: int | None = None

    @property
    def head_dims(self) -> tuple[int, int] | None:
        if self.key_length is None or self.value_length is None:
            return None
        return self.key_length, self.value_length

    def kv_bytes_per_token(self, kv_type: str = "f16") -> float | None:
        """KV bytes one token costs in one slot (SWA layers are counted at full size)."""
        dims = self.head_dims
        if dims is None or not self.head_count_kv:
            return None
        block, size = kv_block(kv_type)
        return sum(self.head_count_kv) * (dims[0] + dims[1]) * (size / block)

    def estimated_weights(self) -> int:
        """The weights' size: the GGUF file's when known, else ``/api/ps`` ``size`` less one
        slot of f16 KV at ``context_length``. Ollama's size prediction counts the KV as f16
        whatever OLLAMA_KV_CACHE_TYPE says (llm/llama_server.go PredictServerVRAM), so this does not depend on the
        settings the server runs with; with several slots it over-estimates, which is safe."""
        if self.weights_bytes is not None:
            return self.weights_bytes
        per_token = self.kv_bytes_per_token("f16")
        if per_token is None or not self.context_length:
            return self.size_bytes
        return max(0, self.size_bytes - int(per_token * self.context_length))


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def loaded_model_from_show(name: str, show: ShowResponse, running: RunningModel | None = None) -> LoadedModel:
    """Read the GGUF keys of ``/api/show`` ``model_info`` that size the KV cache (docs/ollama.md, API)."""
    info = show.model_info
    arch = str(info.get("general.architecture") or "")
    blocks = _int_or_none(info.get(f"{arch}.block_count"))
    heads = _int_or_none(info.get(f"{arch}.attention.head_count"))
    kv_raw = info.get(f"{arch}.attention.head_count_kv")
    kv_heads: tuple[int, ...] = ()
    per_model = _int_or_none(kv_raw)
    if isinstance(kv_raw, list):
        kv_heads = tuple(int(n) for n in kv_raw)
    elif per_model is not None and blocks:
        kv_heads = (per_model,) * blocks
    embedding = _int_or_none(info.get(f"{arch}.embedding_length"))
    default_dim = embedding // heads if embedding and heads else None
    key = _int_or_none(info.get(f"{arch}.attention.key_length")) or default_dim
    value = _int_or_none(info.get(f"{arch}.attention.value_length")) or default_dim
    return LoadedModel(
        name=name,
        architecture=arch,
        size_bytes=running.size if running else 0,
        context_length=running.context_length if running else None,
        head_count_kv=kv_heads,
        key_length=key,
        value_length=value,
        train_context=_int_or_none(info.get(f"{arch}.context_length")),
    )


@dataclass(frozen=True)
class RecommendationInputs:
    """Everything a recommendation depends on. ``vram_bytes`` is the total over all GPUs (0: no
    GPU; None: unknown), ``models`` the loaded models, ``parallel_requests`` how many requests
    should run at once, ``llama_args`` the ``LLAMA_ARG_*`` settings our patched llama-server's
    features want passed through. ``llama_arg_check`` says why the llama-server Ollama runs would not
    take ``NAME=value`` (None when it takes it; see :func:`velollm_patch.server_flags.llama_arg_problem`):
    an upstream server reads no patched-only variable and refuses patched-only values. Without it only
    :data:`OLLAMA_DOCUMENTED_LLAMA_ARGS` are recommended."""

    vram_bytes: int | None = None
    ram_bytes: int | None = None
    cpu_cores: int | None = None
    gpu_count: int | None = None
    models: tuple[LoadedModel, ...] = ()
    ollama_version: str | None = None
    parallel_requests: int = 1
    llama_args: Mapping[str, str] = field(default_factory=dict, hash=False)
    llama_arg_check: Callable[[str, str], str | None] | None = field(default=None, hash=False, compare=False)

    @property
    def gpus(self) -> int:
        if self.gpu_count is not None:
            return self.gpu_count
        return 1 if self.vram_bytes else 0

    @classmethod
    def from_hardware(cls, hardware: HardwareInfo) -> RecommendationInputs:
        """Inputs holding the machine's totals from :func:`velollm_patch.hardware.detect`; set
        the rest (models, ollama_version, ...) with :func:`dataclasses.replace`."""
        return cls(
            vram_bytes=sum(gpu.vram_total_bytes for gpu in hardware.gpus),
            ram_bytes=hardware.memory.total_bytes,
            cpu_cores=hardware.cpu.physical_cores,
            gpu_count=len(hardware.gpus),
        )


# --- Current settings ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    value: str
    source: str  # "environment" or the file that sets it
    in_target: bool = False  # set in the file --apply writes, which --apply edits


@dataclass(frozen=True)
class CurrentState:
    """What is set now. ``systemd`` is the service's environment from its drop-ins (last one
    wins, as systemd applies them), ``environment`` this process's ``OLLAMA_*``/``LLAMA_ARG_*``."""

    environment: Mapping[str, Setting]
    systemd: Mapping[str, Setting]
    # What the file --apply writes sets, for the formats other than systemd (whose drop-ins
    # include that file in their order).
    written: Mapping[str, Setting] = field(default_factory=dict)
    systemd_files: tuple[Path, ...] = ()
    server_url: str | None = None
    server_version: str | None = None
    server_error: str | None = None
    models: tuple[LoadedModel, ...] = ()
    notes: tuple[str, ...] = ()

    def values_for(self, fmt: ConfigFormat) -> dict[str, Setting]:
        """The settings the server started by ``fmt``'s mechanism sees: a systemd service gets
        its drop-ins, not the shell's environment; the other mechanisms use the environment, with
        what the file --apply writes on top."""
        if fmt is ConfigFormat.SYSTEMD:
            return dict(self.systemd)
        return {**self.environment, **self.written}


def _relevant(name: str) -> bool:
    return name.startswith("OLLAMA_") or bool(_LLAMA_ARG.fullmatch(name))


def read_environment(environ: Mapping[str, str]) -> dict[str, Setting]:
    return {k: Setting(v, "environment") for k, v in sorted(environ.items()) if _relevant(k)}


def _lines(text: str) -> list[str]:
    """The physical lines of ``text`` as written, line ends included (only "\\n" ends a line, as
    for systemd; a "\\r" before it stays part of the line)."""
    return re.findall(r"[^\n]*\n|[^\n]+\Z", text)


def _unit_lines(text: str) -> Iterable[tuple[str, str]]:
    """A unit file's logical lines: the text as written (continuation lines included) and the line
    systemd reads (stripped, continuations joined)."""
    raw = pending = ""
    for physical in _lines(text):
        raw += physical
        line = physical.strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield raw, pending + line
        raw = pending = ""
    if raw:
        yield raw, pending


# A word of an Environment= value as systemd splits it: unquoted runs, "double" and 'single'
# quoted parts, backslash escapes. Whatever is between two words must be whitespace.
_UNIT_WORD = re.compile(r"""(?:[^\s"'\\]|\\.|"(?:[^"\\]|\\.)*"|'[^']*')+""")


@dataclass(frozen=True)
class _Word:
    """One assignment of a config file. ``name`` is "" for a word that assigns nothing (systemd
    ignores it); ``raw`` is the text as written, kept verbatim wherever the value stays."""

    name: str
    value: str
    raw: str


@dataclass(frozen=True)
class _Piece:
    """A line of a config file (a logical line of a unit file, a command of the launchd script)."""

    text: str  # as written
    words: tuple[_Word, ...] = ()
    anchor: bool = False  # new settings may follow it (an assignment; systemd's [Service] header)
    reset: bool = False  # systemd's empty Environment=, which drops every earlier assignment
    note: str | None = None  # what could not be used


def _environment_words(value: str) -> tuple[_Word, ...]:
    """The words of an Environment= value; ValueError where a quote is left open."""
    words: list[_Word] = []
    end = 0
    for match in _UNIT_WORD.finditer(value):
        if value[end:match.start()].strip():
            raise ValueError(value)
        end = match.end()
        name, eq, val = shlex.split(match.group())[0].partition("=")
        words.append(_Word(name if eq else "", val, match.group()))
    if value[end:].strip():
        raise ValueError(value)
    return tuple(words)


def _systemd_pieces(text: str) -> Iterable[_Piece]:
    section = ""
    for raw, line in _unit_lines(text):
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            yield _Piece(raw, anchor=section == "Service")
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not line or line[0] in "#;" or section != "Service" or not sep:
            yield _Piece(raw)
        elif key == "EnvironmentFile":
            yield _Piece(raw, note=f"loads {value.strip()}; variables from EnvironmentFile= are not shown")
        elif key != "Environment":
            yield _Piece(raw)
        elif not value.strip():
            yield _Piece(raw, anchor=True, reset=True)
        else:
            try:
                yield _Piece(raw, _environment_words(value), anchor=True)
            except ValueError:
                yield _Piece(raw, anchor=True, note=f"cannot read {line!r}")


_ENV_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)")


def _assignment_lines(text: str, pattern: re.Pattern[str], unquote: Callable[[str], str]) -> Iterable[_Piece]:
    """Lines that ``pattern`` reads as one assignment (its groups: name, value, each passed through
    ``unquote``); anything else (comments, blank lines, the user's own commands) is kept as it is."""
    for line in _lines(text):
        match = pattern.fullmatch(line.strip())
        if match is None:
            yield _Piece(line)
        else:
            yield _Piece(line, (_Word(unquote(match[1]), unquote(match[2]), line.strip()),), anchor=True)


# A PowerShell string literal: 'single quoted' ('' is a quote), or "double quoted" without the
# $ and ` that would make it expand.
_PS_STRING = r"'(?:[^']|'')*'" + r'|"[^"$`]*"'
# User-level assignments, as the template writes them; other targets (Machine) and other forms
# of the call are lines of the user's own, kept as they are.
_PS_LINE = re.compile(rf"\[(?:System\.)?Environment\]::SetEnvironmentVariable\(\s*({_PS_STRING})\s*,"
                      rf"\s*({_PS_STRING})\s*,\s*(?:'User'|\"User\")\s*\)\s*;?", re.IGNORECASE)


def _ps_unquote(literal: str) -> str:
    return literal[1:-1].replace("''", "'") if literal[0] == "'" else literal[1:-1]


# A command of a `sh -c` script up to the next ";" outside quotes.
_SH_COMMAND = re.compile(r"""(?:[^;"'\\]|\\.|"(?:[^"\\]|\\.)*"|'[^']*')*""")


def _launchd_pieces(script: str) -> Iterable[_Piece]:
    """The commands of the agent's script; ``launchctl setenv NAME VALUE`` ones are assignments."""
    pos = 0
    while pos < len(script):
        match = _SH_COMMAND.match(script, pos)
        end = match.end() if match else pos
        if end < len(script) and script[end] != ";":
            end = len(script)  # a quote left open: the rest is one command
        command = script[pos:end]
        pos = end + 1
        try:
            argv = shlex.split(command)
        except ValueError:
            argv = []
        if len(argv) == 4 and argv[0] in ("launchctl", "/bin/launchctl") and argv[1] == "setenv":
            yield _Piece(command, (_Word(argv[2], argv[3], command.strip()),), anchor=True)
        else:
            yield _Piece(command)


def _launchd_script(text: str, path: Path) -> tuple[int, int, str]:
    """Where the agent's ``/bin/sh -c`` script is in the plist's text, and the script."""
    unusable = (f"{path} is not a launchd agent whose ProgramArguments are /bin/sh -c SCRIPT;"
                " move it aside or pass another --path")
    try:
        data = plistlib.loads(text.encode("utf-8"))
    except (ValueError, ExpatError) as exc:
        raise VelollmError(unusable) from exc
    args = data.get("ProgramArguments") if isinstance(data, dict) else None
    if not (isinstance(args, list) and len(args) == 3 and args[1] == "-c" and isinstance(args[2], str)):
        raise VelollmError(unusable)
    for match in reversed(list(re.finditer(r"<string>(.*?)</string>", text, re.DOTALL))):
        if html.unescape(match[1]) == args[2]:
            return match.start(1), match.end(1), args[2]
    raise VelollmError(unusable)


def _pieces(fmt: ConfigFormat, text: str, path: Path) -> list[_Piece]:
    if fmt is ConfigFormat.SYSTEMD:
        return list(_systemd_pieces(text))
    if fmt is ConfigFormat.ENV:
        return list(_assignment_lines(text, _ENV_LINE, str.strip))
    if fmt is ConfigFormat.POWERSHELL:
        return list(_assignment_lines(text, _PS_LINE, _ps_unquote))
    return list(_launchd_pieces(_launchd_script(text, path)[2]))


def _fold(pieces: Iterable[_Piece], source: Path, settings: dict[str, Setting], notes: list[str],
          in_target: bool) -> None:
    """Apply one file's assignments to ``settings`` in order, as its reader (systemd, a shell) does."""
    for piece in pieces:
        if piece.reset:
            settings.clear()
        if piece.note is not None:
            notes.append(f"{source}: {piece.note}")
        for word in piece.words:
            if _relevant(word.name):
                settings[word.name] = Setting(word.value, str(source), in_target)


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def read_systemd_dropins(directory: Path, target: Path | None = None,
                         ) -> tuple[dict[str, Setting], tuple[Path, ...], list[str]]:
    """The ``Environment=`` assignments of ``directory/*.conf`` in systemd's order.

    ``target`` is the drop-in --apply writes: its settings are marked, and where it lies outside
    ``directory`` it is read last, as if it were installed as the last drop-in.
    Returns the effective values, the files read, and notes about what could not be used.
    """
    settings: dict[str, Setting] = {}
    notes: list[str] = []
    files: tuple[Path, ...] = ()
    if directory.is_dir():
        files = tuple(sorted(p for p in directory.glob("*.conf") if p.is_file()))
    if target is not None and target.is_file() and not any(_same_file(f, target) for f in files):
        files = (*files, target)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            notes.append(f"cannot read {path}: {exc.strerror or exc}")
            continue
        _fold(_systemd_pieces(text), path, settings, notes,
              in_target=target is not None and _same_file(path, target))
    return settings, files, notes


# A settings file is a few dozen lines; the bound keeps a wrong --path (a device, a disk image) from being read whole.
_MAX_CONFIG_BYTES = 1 << 20


def _read_text(path: Path) -> str | None:
    """The file's text exactly as written (no newline translation), or None when there is none."""
    if not path.exists():
        return None
    data = read_limited(path, _MAX_CONFIG_BYTES, "settings file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VelollmError(f"{path} is not UTF-8 text; save it as UTF-8 or pass another --path") from exc


def read_config_file(fmt: ConfigFormat, path: Path) -> dict[str, Setting]:
    """The settings the file --apply writes holds now ({} when there is no such file)."""
    text = _read_text(path)
    settings: dict[str, Setting] = {}
    if text is not None:
        _fold(_pieces(fmt, text, path), path, settings, [], in_target=True)
    return settings


def _local_weights(name: str) -> int | None:
    """The size of the model's GGUF blob in a local Ollama store, or None where it is not
    readable here (a remote server, another user's store)."""
    try:
        return resolve_local_model(name).stat().st_size
    except (VelollmError, OSError):
        return None


def collect_current(
    *,
    environ: Mapping[str, str],
    systemd_dir: Path,
    client: OllamaClient | None,
    target: tuple[ConfigFormat, Path] | None = None,
) -> CurrentState:
    """Read the environment, the systemd drop-ins, the file --apply writes (``target``: its
    format and path) and, when ``client``'s server answers, its version and loaded models (with
    their KV geometry from ``/api/show``)."""
    fmt, path = target if target is not None else (None, None)
    # A systemd target is one of the drop-ins, which apply in their order; for the other formats
    # the file comes on top of the environment.
    systemd, files, notes = read_systemd_dropins(systemd_dir, path if fmt is ConfigFormat.SYSTEMD else None)
    written: dict[str, Setting] = {}
    if fmt is not None and path is not None and fmt is not ConfigFormat.SYSTEMD:
        written = read_config_file(fmt, path)
    version = error = url = None
    models: list[LoadedModel] = []
    if client is not None:
        url = client.base_url
        try:
            version = client.version()
            for running in client.ps():
                try:
                    show = client.show(running.model or running.name)
                except VelollmError as exc:
                    notes.append(f"no geometry for {running.name}: {exc}")
                    models.append(LoadedModel(running.name, size_bytes=running.size,
                                              context_length=running.context_length))
                    continue
                models.append(replace(loaded_model_from_show(running.name, show, running),
                                      weights_bytes=_local_weights(running.model or running.name)))
        except VelollmError as exc:
            error = str(exc)
    return CurrentState(
        environment=read_environment(environ), systemd=systemd, written=written, systemd_files=files,
        server_url=url, server_version=version, server_error=error, models=tuple(models),
        notes=tuple(notes),
    )


# --- Recommendations -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Recommendation:
    name: str
    current: str | None
    value: str | None  # None: leave unset, i.e. Ollama's default
    why: str
    source: str | None = None  # where the current value comes from
    # Too little is known to advise (no server, no model to size against): whatever is set stays,
    # where a None value without it advises removing what is set.
    keep: bool = False

    @property
    def after(self) -> str | None:
        """The value once the plan is applied."""
        return self.current if self.keep else self.value

    @property
    def changes(self) -> bool:
        return self.current != self.after


@dataclass(frozen=True)
class ConfigPlan:
    recommendations: tuple[Recommendation, ...]
    version: OllamaVersion | None
    warnings: tuple[str, ...] = ()

    def values(self) -> dict[str, str]:
        """The variables a freshly written config sets, in plan order."""
        return {r.name: r.value for r in self.recommendations if r.value is not None}


def kv_type_problem(kv_type: str, version: OllamaVersion | None,
                    models: Sequence[LoadedModel]) -> str | None:
    """Why ``OLLAMA_KV_CACHE_TYPE=kv_type`` would misbehave on this Ollama with these models,
    or None when nothing known speaks against it."""
    kv = kv_type.strip().lower()
    if kv in ("", "f16"):
        return None
    if version is not None and version < KV_CACHE_TYPE_SINCE:
        return f"Ollama {version} has no OLLAMA_KV_CACHE_TYPE (added in {KV_CACHE_TYPE_SINCE})"
    if version is not None and version.era is Era.B and kv not in ERA_B_KV_TYPES:
        return f"Ollama {version} accepts only {', '.join(ERA_B_KV_TYPES)} and silently uses f16 for {kv}"
    if kv not in KV_CACHE_TYPES:
        return f"llama-server does not know {kv}; the model fails to load (ollama #16554)"
    for model in models:
        if model.architecture in NO_KV_QUANT_ARCHS:
            return f"{model.name} ({model.architecture}) must keep an f16 KV cache (ollama #11685)"
        dims = model.head_dims
        if dims is None:
            continue
        mismatch = head_size_mismatch(*dims, kv, kv)
        if mismatch is not None:
            return (f"{model.name} has K/V head dims {dims[0]}/{dims[1]}, which {kv}'s block of {mismatch[2]}"
                    " does not divide; llama-server exits when loading it (ollama #16245)")
    return None


def fit_context(weights_bytes: int, kv_bytes_per_token: float, budget_bytes: int, parallel: int,
                train_context: int | None) -> int | None:
    """The largest of :data:`CONTEXT_STEPS` whose KV cache for ``parallel`` slots fits next to
    the weights in ``budget_bytes`` (and does not exceed the trained context), or None."""
    free = budget_bytes - weights_bytes
    best = None
    for ctx in CONTEXT_STEPS:
        if train_context and ctx > train_context:
            break
        if ctx * parallel * kv_bytes_per_token <= free:
            best = ctx
    return best


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _current(current: Mapping[str, Setting], name: str) -> tuple[str | None, str | None]:
    setting = current.get(name)
    return (setting.value, setting.source) if setting else (None, None)


class _Planner:
    def __init__(self, inputs: RecommendationInputs, current: Mapping[str, Setting]) -> None:
        self.inputs = inputs
        self.current = current
        self.version = parse_reported_version(inputs.ollama_version) if inputs.ollama_version else None
        if self.version is not None and self.version < MIN_OLLAMA:
            raise VelollmError(
                f"Ollama {self.version} is too old for these settings (needs {MIN_OLLAMA} or newer):"
                " upgrade Ollama first")
        self.recs: list[Recommendation] = []
        self.warnings: list[str] = []
        self.parallel = max(1, inputs.parallel_requests)
        self.sized = [m for m in inputs.models if m.kv_bytes_per_token() is not None]
        if inputs.vram_bytes is None:
            self.budget: int | None = None
        elif inputs.vram_bytes > 0:
            self.budget = inputs.vram_bytes - FIT_MARGIN_BYTES * max(1, inputs.gpus)
        elif inputs.ram_bytes:
            self.budget = int(inputs.ram_bytes * CPU_RAM_SHARE)
        else:
            self.budget = None

    def add(self, name: str, value: str | None, why: str, *, keep: bool = False) -> None:
        current, source = _current(self.current, name)
        self.recs.append(Recommendation(name, current, value, why, source, keep))

    def plan(self) -> ConfigPlan:
        self.host()
        kv = self.kv_cache()
        self.flash_attention(kv)
        self.num_parallel()
        ctx = self.context_length(kv)
        self.max_loaded(kv, ctx)
        self.keep_alive()
        self.llama_args()
        self.check_current()
        return ConfigPlan(tuple(self.recs), self.version, tuple(self.warnings))

    def host(self) -> None:
        value, source = _current(self.current, "OLLAMA_HOST")
        host = parse_ollama_host(value)
        if value is not None and not host.explicit_port and host.port != DEFAULT_PORT:
            self.warnings.append(f"OLLAMA_HOST={value} ({source}) has no port, which Ollama reads as port"
                                 f" {host.port}, not {DEFAULT_PORT}; the recommendation keeps {host.port}")
        self.add("OLLAMA_HOST", host.hostport,
                 "the address the server listens on, with the port written out: without one,"
                 " http://host means port 80 and https://host 443")

    def kv_cache(self) -> str:
        name = "OLLAMA_KV_CACHE_TYPE"
        if self.version is None:
            self.add(name, None, "Ollama's version is unknown (no server answered and none was given):"
                                 " left as it is, f16 when unset; a wrong quantized type stops models loading",
                     keep=True)
            return self.kept_kv()
        if not self.sized:
            self.add(name, None, "no loaded model with known head dims: left as it is, f16 when unset (a"
                                 " quantized KV cache crashes llama-server when they do not divide its block"
                                 " size); load your models and run this again", keep=True)
            return self.kept_kv()
        problem = kv_type_problem(RECOMMENDED_KV_TYPE, self.version, self.sized)
        if problem is not None:
            self.add(name, None, f"stays f16: {problem}")
            return "f16"
        largest = max(self.sized, key=lambda m: m.size_bytes)
        f16 = largest.kv_bytes_per_token("f16") or 0.0
        q8 = largest.kv_bytes_per_token(RECOMMENDED_KV_TYPE) or 0.0
        dims = sorted({f"{d[0]}/{d[1]}" for d in (m.head_dims for m in self.sized) if d is not None})
        self.add(name, RECOMMENDED_KV_TYPE,
                 f"halves KV memory ({largest.name}: {f16 / 1024:.0f} -> {q8 / 1024:.0f} KiB per token)"
                 f" at near-f16 quality; every loaded model's head dims ({', '.join(dims)}) divide"
                 f" {RECOMMENDED_KV_TYPE}'s block of {kv_block(RECOMMENDED_KV_TYPE)[0]}")
        return RECOMMENDED_KV_TYPE

    def kept_kv(self) -> str:
        """The KV cache type a kept OLLAMA_KV_CACHE_TYPE gives, so that the settings planned after it
        (flash attention, context) fit the cache the server will really have."""
        value, _ = _current(self.current, "OLLAMA_KV_CACHE_TYPE")
        kv = (value or "").strip().strip("\"'").lower()
        return kv if kv in KV_CACHE_TYPES else "f16"

    def flash_attention(self, kv: str) -> None:
        name = "OLLAMA_FLASH_ATTENTION"
        if kv != "f16":
            why = ("a quantized V cache needs flash attention: Ollama before 0.30 silently falls back"
                   " to f16 without it, llama-server refuses to start")
            self.add(name, "1", why)
        elif self.version is not None and self.version.era is Era.C:
            self.add(name, None, "unset means auto: llama-server enables it wherever every GPU supports it")
        elif self.version is not None and self.inputs.gpus:
            self.add(name, "1", "Ollama before 0.30 enables flash attention only for some architectures"
                                " unless asked; it cuts attention memory at long contexts")
        else:
            self.add(name, None, "no GPU or unknown Ollama version: left as it is (Ollama's default when unset)",
                     keep=True)

    def num_parallel(self) -> None:
        n = self.parallel
        if n == 1:
            cores = f" on {self.inputs.cpu_cores} cores" if self.inputs.cpu_cores and not self.inputs.gpus else ""
            why = (f"one request slot{cores}: KV memory is num_ctx x parallel, so a single user gets the"
                   " whole context (Ollama's default since 0.11)")
        else:
            why = f"{n} requests run at once; each slot costs a full num_ctx of KV memory"
        self.add("OLLAMA_NUM_PARALLEL", str(n), why)

    def context_length(self, kv: str) -> int | None:
        name = "OLLAMA_CONTEXT_LENGTH"
        if self.budget is None:
            self.add(name, None, "memory size unknown (pass the VRAM size): left as it is (Ollama's VRAM"
                                 " tier when unset)", keep=True)
            return None
        if not self.sized:
            self.add(name, None, "no loaded model to size against: left as it is (Ollama's VRAM tier when"
                                 " unset)", keep=True)
            return None
        largest = max(self.sized, key=lambda m: m.estimated_weights())
        weights = largest.estimated_weights()
        per_token = largest.kv_bytes_per_token(kv) or 0.0
        ctx = fit_context(weights, per_token, self.budget, self.parallel, largest.train_context)
        where = "VRAM" if self.inputs.vram_bytes else "RAM"
        if ctx is None:
            self.add(name, str(CONTEXT_STEPS[0]),
                     f"{largest.name} ({_gib(weights)}) leaves no room for even {CONTEXT_STEPS[0]} tokens"
                     f" of KV in {_gib(self.budget)} of {where}: layers will spill to the CPU")
            return CONTEXT_STEPS[0]
        kv_total = ctx * self.parallel * per_token
        self.add(name, str(ctx),
                 f"{largest.name}: {_gib(weights)} weights + {_gib(kv_total)} {kv} KV for {ctx} tokens"
                 f" x {self.parallel} slot(s) fit the {_gib(self.budget)} of {where} usable"
                 " (1 GiB per GPU kept free, the margin llama-server's fit step keeps)")
        return ctx

    def max_loaded(self, kv: str, ctx: int | None) -> None:
        name = "OLLAMA_MAX_LOADED_MODELS"
        if self.budget is None or ctx is None or not self.sized:
            self.add(name, None, "nothing to size against: left as it is (Ollama's default, 3 per GPU, when"
                                 " unset)", keep=True)
            return
        footprint = max(m.estimated_weights() + ctx * self.parallel * (m.kv_bytes_per_token(kv) or 0.0)
                        for m in self.sized)
        fits = max(1, int(self.budget // footprint)) if footprint > 0 else 1
        count = min(fits, 3 * max(1, self.inputs.gpus))
        self.add(name, str(count),
                 f"{count} model(s) of up to {_gib(footprint)} (weights + KV at {ctx} tokens) fit;"
                 " loading more evicts models or pushes layers to the CPU")

    def keep_alive(self) -> None:
        self.add("OLLAMA_KEEP_ALIVE", DEFAULT_KEEP_ALIVE,
                 "the 5m default unloads a model after a short pause and every reload costs its load"
                 " time; 30m keeps it through a working session and still frees memory when idle")

    def llama_args(self) -> None:
        check = self.inputs.llama_arg_check
        for name, value in self.inputs.llama_args.items():
            if not _LLAMA_ARG.fullmatch(name):
                raise VelollmError(f"not a llama-server environment variable: {name}")
            if self.version is None or self.version.era is not Era.C:
                release = f"Ollama {self.version}" if self.version else "an Ollama of unknown version"
                self.add(name, None, f"{release} does not run llama-server (0.30+ does), so {name}"
                                     " would reach nothing")
            elif name in OLLAMA_OWNED_LLAMA_ARGS:
                self.add(name, None, f"Ollama sets this llama-server option itself for each model;"
                                     f" {name} would fight it")
            elif check is None and name not in OLLAMA_DOCUMENTED_LLAMA_ARGS:
                self.add(name, None, "the llama-server Ollama runs was not checked for it, and an upstream one"
                                     " ignores a patched-only variable or stops at a patched-only value")
            elif check is not None and (problem := check(name, value)) is not None:
                self.add(name, None, problem)
            else:
                self.add(name, value, "passed through to llama-server: Ollama 0.30+ starts it with the"
                                      " server's environment and does not set this option itself")

    def check_current(self) -> None:
        kv_value, kv_source = _current(self.current, "OLLAMA_KV_CACHE_TYPE")
        if kv_value:
            problem = kv_type_problem(kv_value.strip("\"'"), self.version, self.inputs.models)
            if problem is not None:
                self.warnings.append(f"current OLLAMA_KV_CACHE_TYPE={kv_value} ({kv_source}): {problem}")
        fa_value, fa_source = _current(self.current, "OLLAMA_FLASH_ATTENTION")
        if fa_value is not None:
            word = fa_value.strip().strip("\"'")
            if word and word.lower() not in ("1", "0", "t", "f", "true", "false"):
                self.warnings.append(
                    f"OLLAMA_FLASH_ATTENTION={fa_value} ({fa_source}) is not a boolean Ollama can read;"
                    " Ollama counts an unreadable value as true")
        keep, keep_source = _current(self.current, "OLLAMA_KEEP_ALIVE")
        if keep is not None:
            word = keep.strip().strip("\"'")
            if word and parse_duration(word) is None and parse_int(word) is None:
                self.warnings.append(f"OLLAMA_KEEP_ALIVE={keep} ({keep_source}) is neither a duration"
                                     " nor seconds; Ollama ignores it and uses 5m")
        for rec in self.recs:
            setting = self.current.get(rec.name)
            # --apply removes a value it advises against from the file it writes; elsewhere the
            # user has to.
            if rec.after is None and setting is not None and not setting.in_target:
                self.warnings.append(
                    f"{rec.name}={rec.current} from {rec.source} stays in effect; the recommendation is"
                    " to remove it there")


def recommend(inputs: RecommendationInputs, current: Mapping[str, Setting]) -> ConfigPlan:
    """Recommended server settings for ``inputs``, compared with ``current``.

    Raises VelollmError when the given Ollama version is older than :data:`MIN_OLLAMA`.
    """
    return _Planner(inputs, current).plan()


# --- Writing -------------------------------------------------------------------------------------

class ConfigFormat(Enum):
    SYSTEMD = "systemd"
    LAUNCHD = "launchd"
    ENV = "env"
    POWERSHELL = "powershell"

    @classmethod
    def for_platform(cls, platform: str = sys.platform) -> ConfigFormat:
        if platform == "darwin":
            return cls.LAUNCHD
        if platform.startswith("win"):
            return cls.POWERSHELL
        return cls.SYSTEMD


SYSTEMD_DROPIN_DIR = Path("/etc/systemd/system/ollama.service.d")
# Drop-ins apply in file-name order and a later assignment wins; "velollm.conf" sorts after
# "override.conf" (what `systemctl edit` writes), so it takes precedence without editing it.
SYSTEMD_DROPIN_NAME = "velollm.conf"
LAUNCHD_LABEL = "com.velollm-patch.ollama-env"

_TEMPLATES = {
    ConfigFormat.SYSTEMD: "ollama-systemd-override.conf.j2",
    ConfigFormat.LAUNCHD: "ollama-launchd.plist.j2",
    ConfigFormat.ENV: "ollama.env.j2",
    ConfigFormat.POWERSHELL: "ollama-env.ps1.j2",
}


def default_config_path(fmt: ConfigFormat, *, systemd_dir: Path = SYSTEMD_DROPIN_DIR) -> Path:
    if fmt is ConfigFormat.SYSTEMD:
        return systemd_dir / SYSTEMD_DROPIN_NAME
    if fmt is ConfigFormat.LAUNCHD:
        return Path.home() / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    name = "ollama.env" if fmt is ConfigFormat.ENV else "ollama-env.ps1"
    return get_paths().data / "ollama" / name


class _Entry(NamedTuple):
    name: str
    value: str
    why: str


def _entries(plan: ConfigPlan, fmt: ConfigFormat) -> list[_Entry]:
    """The variables the plan sets, checked to be writable in ``fmt``."""
    entries = [_Entry(r.name, r.value, r.why) for r in plan.recommendations if r.value is not None]
    for entry in entries:
        if not _SAFE_VALUE.fullmatch(entry.value):
            raise VelollmError(f"{entry.name}={entry.value!r} holds characters a {fmt.value} file cannot carry")
    return entries


def _word(fmt: ConfigFormat, name: str, value: str) -> str:
    """One assignment as ``fmt`` writes it (for systemd, a word of an Environment= line)."""
    if fmt is ConfigFormat.SYSTEMD:
        return f'"{name}={value}"'
    if fmt is ConfigFormat.POWERSHELL:
        return f"[Environment]::SetEnvironmentVariable('{name}', '{value}', 'User')"
    if fmt is ConfigFormat.LAUNCHD:
        return f"/bin/launchctl setenv {name} {shlex.quote(value)}"
    return f"{name}={value}"


def _line(fmt: ConfigFormat, words: Sequence[str]) -> str:
    """A line holding these assignments: an Environment= line takes several, the others one."""
    return f"Environment={' '.join(words)}" if fmt is ConfigFormat.SYSTEMD else words[0]


def _assignment(fmt: ConfigFormat, name: str, value: str) -> str:
    return _line(fmt, [_word(fmt, name, value)])


def render_config(plan: ConfigPlan, fmt: ConfigFormat) -> str:
    """The file a plan gives where there is none yet."""
    entries = _entries(plan, fmt)
    return render_template(
        _TEMPLATES[fmt],
        entries=entries,
        line=partial(_assignment, fmt),
        label=LAUNCHD_LABEL,
        script=" ; ".join(_assignment(fmt, e.name, e.value) for e in entries),
    )


@dataclass(frozen=True)
class KeyChanges:
    """What applying a plan does to a file: the variables it adds, changes and removes, those it
    manages that stay as they are, and how many of the file's other lines it keeps (launchd: the
    other commands of its script)."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    other_lines: int = 0

    @property
    def edits(self) -> bool:
        return bool(self.added or self.changed or self.removed)


def _rewrite(fmt: ConfigFormat, piece: _Piece, raws: Sequence[str]) -> str:
    """``piece`` holding the assignments ``raws``: verbatim when they are its own, gone when none
    is left (an empty Environment= would reset every assignment before it)."""
    if list(raws) == [word.raw for word in piece.words]:
        return piece.text
    if not raws:
        return ""
    lead = piece.text[:len(piece.text) - len(piece.text.lstrip())]
    tail = piece.text[len(piece.text.rstrip()):]
    return lead + _line(fmt, raws) + tail


def _edit(pieces: Sequence[_Piece], plan: ConfigPlan, fmt: ConfigFormat) -> tuple[list[str], KeyChanges]:
    """The pieces' texts with the plan's variables set, and what that changes.

    Only the variables the plan has an opinion on are touched: one it sets gets its value (every
    line that assigns it, so a duplicate cannot win later); one it advises leaving unset loses its
    lines, since the plan shows that removal and the file is the one --apply writes; one it cannot
    judge (``keep``: no server, nothing to size against) stays as the user set it. Variables the
    file does not set yet are left for the caller to add.
    """
    recs = {r.name: r for r in plan.recommendations}
    texts: list[str] = []
    found: set[str] = set()
    changed: set[str] = set()
    removed: set[str] = set()
    others = 0
    for piece in pieces:
        if piece.reset:
            found.clear()  # what was assigned before is gone: set it again after
        if not any(word.name in recs for word in piece.words):
            texts.append(piece.text)
            others += bool(piece.text.strip())
            continue
        raws: list[str] = []
        for word in piece.words:
            rec = recs.get(word.name)
            if rec is None or rec.keep or rec.value == word.value:
                raws.append(word.raw)
            elif rec.value is None:
                removed.add(word.name)
            else:
                raws.append(_word(fmt, word.name, rec.value))
                changed.add(word.name)
            if rec is not None:
                found.add(word.name)
        texts.append(_rewrite(fmt, piece, raws))
    order = [r.name for r in plan.recommendations]
    added = {e.name for e in _entries(plan, fmt)} - found
    return texts, KeyChanges(
        added=tuple(n for n in order if n in added),
        changed=tuple(n for n in order if n in changed),
        removed=tuple(n for n in order if n in removed),
        kept=tuple(n for n in order if n in found - changed - removed),
        other_lines=others,
    )


def _edit_config(old: str, plan: ConfigPlan, fmt: ConfigFormat, path: Path) -> tuple[str, KeyChanges]:
    """``old`` with the plan applied: new variables go after the file's last assignment (into
    its last [Service] section for systemd), with their why as a comment as in a fresh file;
    every other line stays byte for byte."""
    script_span = _launchd_script(old, path) if fmt is ConfigFormat.LAUNCHD else None
    pieces = list(_launchd_pieces(script_span[2])) if script_span else _pieces(fmt, old, path)
    texts, changes = _edit(pieces, plan, fmt)
    if not changes.edits:
        return old, changes
    anchors = [i for i, piece in enumerate(pieces) if piece.anchor]
    at = anchors[-1] + 1 if anchors else len(texts)
    new = [e for e in _entries(plan, fmt) if e.name in changes.added]
    if script_span is not None:
        texts[at:at] = [_assignment(fmt, e.name, e.value) for e in new]
        script = " ; ".join(t.strip() for t in texts if t.strip())
        return old[:script_span[0]] + escape(script) + old[script_span[1]:], changes
    nl = "\r\n" if "\r\n" in old else "\n"
    block = "".join(f"# {e.why}{nl}{_assignment(fmt, e.name, e.value)}{nl}" for e in new)
    if new and fmt is ConfigFormat.SYSTEMD and not anchors:
        block = f"[Service]{nl}{block}"
    texts.insert(at, block)
    text = ""
    for piece_text in texts:
        if piece_text and text and not text.endswith("\n"):
            text += nl  # the file's last line had no line end, and something now follows it
        text += piece_text
    return text, changes


@dataclass(frozen=True)
class ApplyResult:
    path: Path  # the file written: where a symlink points, the link itself stays
    changed: bool
    backup: Path | None = None
    keys: KeyChanges = field(default_factory=KeyChanges)


def _follow(path: Path) -> Path:
    """The file ``path`` names: where it points when it is a symlink, so the link stays a link."""
    if not path.is_symlink():
        return path
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "its links form a loop"
        raise VelollmError(f"cannot follow the symlink {path} ({reason}); pass the file itself with --path") from exc


def _writable_dir(directory: Path) -> None:
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise VelollmError(f"cannot write into {directory}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise VelollmError(f"no permission to write {directory} (run with sudo, or pass --path)")


def apply_config(plan: ConfigPlan, fmt: ConfigFormat, path: Path, *,
                 now: dt.datetime | None = None) -> ApplyResult:
    """Write ``plan`` to ``path`` atomically, keeping a timestamped copy of what was there.

    A file that exists keeps everything but the variables the plan manages (see :func:`_edit`);
    a symlink is followed and the file it points to written, with the backup beside it. A file
    that already holds exactly this content is left alone (no rewrite, no backup), so applying
    twice changes nothing. On any failure no file is changed.
    """
    path = _follow(path)
    if path.is_dir():
        raise VelollmError(f"{path} is a directory; pass the file to write")
    old = _read_text(path)
    if old is None:
        text, keys = render_config(plan, fmt), KeyChanges(added=tuple(plan.values()))
    else:
        text, keys = _edit_config(old, plan, fmt, path)
    if old == text:
        return ApplyResult(path, changed=False, keys=keys)
    _writable_dir(path.parent)
    if old is not None and not os.access(path, os.W_OK):
        raise VelollmError(f"no permission to replace {path} (run with sudo, or pass --path)")
    backup = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if old is not None:
            stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
            backup = path.with_name(f"{path.name}.velollm-{stamp}.bak")
            counter = 1
            while backup.exists():
                backup = path.with_name(f"{path.name}.velollm-{stamp}-{counter}.bak")
                counter += 1
            shutil.copy2(path, backup)
        mode = path.stat().st_mode & 0o7777 if old is not None else 0o644
        tmp: Path | None = None
        try:
            # newline="": the kept lines keep their line ends (CRLF included) byte for byte.
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", newline="", dir=path.parent, delete=False,
                                             prefix=f".{path.name}.", suffix=".tmp") as handle:
                tmp = Path(handle.name)
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        if backup is not None:
            backup.unlink(missing_ok=True)
        raise VelollmError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return ApplyResult(path, changed=True, backup=backup, keys=keys)
