"""Ollama Modelfiles: a faithful parser and create-step checker, a linter, and a generator.

``ollama create`` parses the Modelfile on the client (``parser.ParseFile``), turns it into a
request (``Modelfile.CreateRequest``) and types each PARAMETER (``api.FormatParams``); the
server never sees the text. This module ports those three steps from Ollama v0.33.0-rc2 rune for
rune (the state machine is unchanged since 0.5.0), so :func:`lint_modelfile` accepts and rejects
exactly what ``ollama create`` does, with Ollama's own error texts, and adds warnings for the
traps that parse fine but mean something other than what the author wrote.

:func:`render_modelfile` writes a Modelfile from a :class:`ModelfileSpec` through
``templates/Modelfile.j2``, choosing quotes that read back as the exact value, and runs the
linter on its own output before returning it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from types import MappingProxyType

from velollm_patch.errors import VelollmError
from velollm_patch.files import read_limited
from velollm_patch.model import draft_compatibility, inspect_model, resolve_model
from velollm_patch.ollama.api import ShowResponse
from velollm_patch.ollama.gosyntax import (
    go_unquote,
    parse_bool,
    parse_float32,
    parse_int,
    semver_is_valid,
)
from velollm_patch.ollama.templates import render_template
from velollm_patch.ollama.versions import (
    DRAFT_SINCE,
    ERA_C_START,
    LATEST_KNOWN,
    PARSER_STABLE_SINCE,
    RENDERER_PARSER_SINCE,
    REQUIRES_SINCE,
    Era,
    OllamaVersion,
)
from velollm_patch.tune import Plan

# --- Ollama's error texts (parser/parser.go, api/types.go) -------------------------------------

ERR_INVALID_COMMAND = (
    'command must be one of "from", "license", "template", "system", "adapter", "draft", '
    '"renderer", "parser", "parameter", "message", or "requires"'
)
ERR_INVALID_ROLE = 'message role must be one of "system", "user", or "assistant"'
ERR_MISSING_FROM = "no FROM line"
ERR_UNEXPECTED_EOF = "unexpected EOF"
ERR_REQUIRES = "requires must be a valid semver (e.g. 0.14.0)"
ERR_MODEL_NOT_FOUND = "no Modelfile or safetensors files found"

_COMMAND_WORDS = frozenset(
    ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
     "parameter", "message", "requires")
)
# Command names as CreateRequest switches on them; any other name is a PARAMETER.
_COMMAND_NAMES = frozenset(
    ("model", "license", "template", "system", "adapter", "draft", "renderer", "parser",
     "message", "requires")
)
_COMMAND_SINCE = {
    "renderer": RENDERER_PARSER_SINCE,
    "parser": RENDERER_PARSER_SINCE,
    "requires": REQUIRES_SINCE,
    "draft": DRAFT_SINCE,
}
_ROLES = ("system", "user", "assistant")
_SPACE = " \t"
_NEWLINE = "\r\n"
_WHITESPACE = " \t\r\n"


# --- PARAMETER names and types -------------------------------------------------------------------

class ParamType(Enum):
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    STRINGS = "[]string"


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: ParamType
    since: OllamaVersion | None = None  # first release that accepts it; None: every release modelled
    until: OllamaVersion | None = None  # first release that rejects it

    def valid_for(self, target: OllamaVersion) -> bool:
        return (self.since is None or target >= self.since) and (self.until is None or target < self.until)


_I, _F, _B = ParamType.INT, ParamType.FLOAT, ParamType.BOOL
# Ordered as a generated Modelfile lists them: load-time (Runner) options first, then sampling.
PARAMETERS: Mapping[str, ParamSpec] = MappingProxyType({p.name: p for p in (
    ParamSpec("num_ctx", _I),
    ParamSpec("num_batch", _I),
    ParamSpec("num_gpu", _I),
    ParamSpec("main_gpu", _I),
    ParamSpec("use_mmap", _B),
    ParamSpec("num_thread", _I),
    ParamSpec("draft_num_predict", _I, since=ERA_C_START),
    ParamSpec("num_keep", _I),
    ParamSpec("seed", _I),
    ParamSpec("num_predict", _I),
    ParamSpec("top_k", _I),
    ParamSpec("top_p", _F),
    ParamSpec("min_p", _F),
    ParamSpec("typical_p", _F),
    ParamSpec("repeat_last_n", _I),
    ParamSpec("temperature", _F),
    ParamSpec("repeat_penalty", _F),
    ParamSpec("presence_penalty", _F),
    ParamSpec("frequency_penalty", _F),
    ParamSpec("stop", ParamType.STRINGS),
    ParamSpec("tfs_z", _F, until=OllamaVersion(0, 5, 5)),
)})

# Accepted with "warning: parameter X is deprecated" and dropped (parser.go deprecatedParameters).
DEPRECATED_PARAMETERS = (
    "penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
    "mirostat", "mirostat_tau", "mirostat_eta",
)
# Names that no longer exist and fail with "unknown parameter". docs/ollama.md dates only
# tfs_z's removal, so the others are treated as unknown for every target.
REMOVED_PARAMETERS: Mapping[str, str] = MappingProxyType({
    "tfs_z": "tfs_z was removed in Ollama 0.5.5",
    "numa": "numa no longer exists in Ollama",
    "num_gqa": "num_gqa no longer exists in Ollama",
    "rope_frequency_base": "rope_frequency_base no longer exists in Ollama",
    "rope_frequency_scale": "rope_frequency_scale no longer exists in Ollama",
})

# What each load-time knob does, for the comments of generated Modelfiles; the second part is
# how Ollama >= 0.30 passes it to llama-server (llm/llama_server.go startLlamaServer; docs/ollama.md).
_PARAMETER_EFFECTS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "num_ctx": ("context window per request slot; KV memory grows with num_ctx x OLLAMA_NUM_PARALLEL",
                "llama-server gets -c num_ctx*parallel -np parallel"),
    "num_batch": ("prompt tokens processed per batch",
                  "llama-server gets -b N -ub N, so this also sets the micro-batch"),
    "num_gpu": ("layers offloaded to the GPU (-1 automatic, 0 CPU only)",
                "-1 passes no -ngl and lets llama-server fit the layers itself"),
    "main_gpu": ("the GPU that holds the model", "pins the model to that GPU: --split-mode none --main-gpu N"),
    "use_mmap": ("memory-map the model file", "false passes --load-mode none"),
    "num_thread": ("CPU threads (0 automatic)", "passed as -t N when above 0"),
    "draft_num_predict": ("tokens the draft proposes per step", "passed as --spec-draft-n-max"),
})

ParamValue = int | float | str | list[str]
TypedParam = int | float | bool | list[str]


def known_parameter(name: str, target: OllamaVersion = LATEST_KNOWN) -> ParamSpec | None:
    """The spec of a parameter ``target``'s FormatParams accepts, or None (unknown there)."""
    spec = PARAMETERS.get(name)
    return spec if spec is not None and spec.valid_for(target) else None


class ParameterError(ValueError):
    """A FormatParams failure; the message is Ollama's text."""


def format_param(name: str, value: str, target: OllamaVersion = LATEST_KNOWN) -> TypedParam:
    """``api.FormatParams`` for one ``PARAMETER name value``: the typed value Ollama stores."""
    spec = known_parameter(name, target)
    if spec is None:
        raise ParameterError(f"unknown parameter '{name}'")
    if spec.type is ParamType.INT:
        number = parse_int(value)
        if number is None:
            raise ParameterError(f"invalid int value [{value}]")
        return number
    if spec.type is ParamType.FLOAT:
        real = parse_float32(value)
        if real is None:
            raise ParameterError(f"invalid float value [{value}]")
        return real
    if spec.type is ParamType.BOOL:
        flag = parse_bool(value)
        if flag is None:
            raise ParameterError(f"invalid bool value [{value}]")
        return flag
    return [value]


# --- Decoding and parsing ------------------------------------------------------------------------

# Ollama reads a Modelfile whole and sets no limit; a real one (a template, a system prompt, a few
# MESSAGEs) is kilobytes, so this bound only stops a wrong path such as /dev/zero.
MAX_MODELFILE_BYTES = 16 << 20


def read_modelfile(path: Path) -> bytes:
    return read_limited(path, MAX_MODELFILE_BYTES, "Modelfile")


def decode_modelfile(data: bytes) -> str:
    """``unicode.BOMOverride(UTF8)``: a UTF-8 or UTF-16 BOM picks the encoding, else UTF-8.
    Undecodable bytes become U+FFFD, as Go's decoder does; they never fail the read."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace")
    if data.startswith(b"\xff\xfe"):
        return data[2:].decode("utf-16-le", errors="replace")
    if data.startswith(b"\xfe\xff"):
        return data[2:].decode("utf-16-be", errors="replace")
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Command:
    """One parsed command. ``name`` is ``model`` for FROM, the lower-case keyword for other
    commands, or the parameter name as written (case kept). ``args`` is the unquoted value; for
    MESSAGE it is ``role: text``. The remaining fields locate the command for diagnostics."""

    name: str
    args: str
    line: int = field(default=0, compare=False)
    end_line: int = field(default=0, compare=False)
    quote: str = field(default="", compare=False)  # '"""', '"' or '' as written
    raw: str = field(default="", compare=False)  # the trimmed value before unquoting

    @property
    def is_parameter(self) -> bool:
        return self.name not in _COMMAND_NAMES

    def __str__(self) -> str:
        """``Command.String()``: the line ``ollama show --modelfile`` prints."""
        if self.name == "model":
            return f"FROM {self.args}"
        if self.name == "message":
            role, _, message = self.args.partition(": ")
            return f"MESSAGE {role} {ollama_quote(message)}"
        if self.name in _COMMAND_NAMES:
            return f"{self.name.upper()} {ollama_quote(self.args)}"
        return f"PARAMETER {self.name} {ollama_quote(self.args)}"


@dataclass(frozen=True)
class Modelfile:
    commands: tuple[Command, ...]

    def __str__(self) -> str:
        return "".join(f"{command}\n" for command in self.commands)


def ollama_quote(value: str) -> str:
    """Ollama's ``quote()``: quotes only values with a newline or edge spaces, and uses triple
    quotes when the value holds a quote. Lossy on purpose-built inputs; the generator below
    uses :func:`quote_value` instead."""
    if "\n" in value or value.startswith(" ") or value.endswith(" "):
        return f'"""{value}"""' if '"' in value else f'"{value}"'
    return value


def unquote(value: str) -> tuple[str, bool]:
    """Ollama's ``unquote()``: only the first and last 3 (or 1) characters are looked at."""
    if value[:3] == '"""':
        if len(value) >= 6 and value[-3:] == '"""':
            return value[3:-3], True
        return "", False
    if value[:1] == '"':
        if len(value) >= 2 and value[-1] == '"':
            return value[1:-1], True
        return "", False
    return value, True


class ModelfileError(VelollmError):
    """Ollama would refuse this Modelfile; the message is Ollama's own error text."""

    def __init__(self, message: str, *, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


_NIL, _NAME, _VALUE, _PARAMETER, _MESSAGE, _COMMENT = range(6)


def _is_alpha(ch: str) -> bool:
    return "a" <= ch <= "z" or "A" <= ch <= "Z"


def _step(ch: str, state: int) -> tuple[int, str, str | None]:
    """``parseRuneForState``: (next state, rune to keep or "" for Go's 0, error kind)."""
    if state == _NIL:
        if ch == "#":
            return _COMMENT, "", None
        if ch in _WHITESPACE:
            return _NIL, "", None
        return _NAME, ch, None
    if state == _NAME:
        if _is_alpha(ch):
            return _NAME, ch, None
        if ch in _SPACE:
            return _VALUE, "", None
        return _NIL, "", "invalid"
    if state == _VALUE:
        if ch in _WHITESPACE:
            return _NIL, ch, None
        return _VALUE, ch, None
    if state in (_PARAMETER, _MESSAGE):
        if _is_alpha(ch) or (state == _PARAMETER and ("0" <= ch <= "9" or ch == "_")):
            return state, ch, None
        if ch in _SPACE:
            return _VALUE, "", None
        return _NIL, "", "eof"
    if ch in _NEWLINE:
        return _NIL, "", None
    return _COMMENT, "", None


@dataclass
class _Parsed:
    commands: list[Command] = field(default_factory=list)
    error: str | None = None
    error_line: int | None = None
    error_char: str = ""  # the rune that raised a parser error, for hints
    error_word: str = ""  # the buffer at a parser error, for hints
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (line, char) Ollama discards


def _parse(text: str) -> _Parsed:
    """``ParseFile`` without raising: the commands read so far and the first error, if any."""
    if text.startswith("\ufeff"):
        text = text[1:]  # what decoding the file's bytes with BOMOverride would have removed
    out = _Parsed()
    state = _NIL
    ollama_line = 1  # counts \r and \n separately, as Ollama's error messages do
    line = 1  # physical line, for our own locations
    buf: list[str] = []
    name = ""
    role = ""
    start_line = 0
    for i, ch in enumerate(text):
        char_line = line
        if ch == "\n" or (ch == "\r" and text[i + 1:i + 2] != "\n"):
            line += 1
        if ch in _NEWLINE:
            ollama_line += 1
        nxt, kept, err = _step(ch, state)
        if err == "eof":
            out.error, out.error_line = f"{ERR_UNEXPECTED_EOF}: {''.join(buf)}", char_line
            out.error_char, out.error_word = ch, "".join(buf)
            return out
        if err == "invalid":
            out.error, out.error_line = f"(line {ollama_line}): {ERR_INVALID_COMMAND}", char_line
            out.error_char, out.error_word = ch, "".join(buf)
            return out
        if nxt != state:
            if state == _NAME:
                word = "".join(buf)
                if word.lower() not in _COMMAND_WORDS:
                    out.error, out.error_line = f"(line {ollama_line}): {ERR_INVALID_COMMAND}", char_line
                    out.error_char, out.error_word = ch, word
                    return out
                lowered = word.lower()
                if lowered == "from":
                    name = "model"
                elif lowered == "parameter":
                    nxt = _PARAMETER
                else:
                    if lowered == "message":
                        nxt = _MESSAGE
                    name = lowered
            elif state == _PARAMETER:
                name = "".join(buf)
            elif state == _MESSAGE:
                word = "".join(buf)
                if word not in _ROLES:
                    out.error, out.error_line = f"(line {ollama_line}): {ERR_INVALID_ROLE}", char_line
                    out.error_char, out.error_word = ch, word
                    return out
                role = word
            elif state == _VALUE:
                if kept in _SPACE or not _unquotes(buf):
                    buf.append(kept)
                    continue
                raw = "".join(buf).strip(_WHITESPACE)
                value, _ = unquote(raw)
                if role:
                    value, role = f"{role}: {value}", ""
                out.commands.append(_command(name, value, start_line, char_line, raw))
            if state == _NIL and nxt == _NAME:
                start_line = char_line
            buf.clear()
            state = nxt
        if kept:
            if kept.isprintable():
                buf.append(kept)
            elif kept not in _WHITESPACE:
                out.dropped.append((char_line, kept))
    if state == _VALUE:
        raw = "".join(buf).strip(_WHITESPACE)
        value, ok = unquote(raw)
        if not ok:
            out.error, out.error_line, out.error_word = ERR_UNEXPECTED_EOF, start_line, raw
            return out
        if role:
            value = f"{role}: {value}"
        out.commands.append(_command(name, value, start_line, line, raw))
    elif state not in (_NIL, _COMMENT):
        out.error, out.error_line = ERR_UNEXPECTED_EOF, line
        out.error_word = "".join(buf)
        return out
    if not any(c.name == "model" for c in out.commands):
        out.error, out.error_line = ERR_MISSING_FROM, None
    return out


def _unquotes(buf: list[str]) -> bool:
    """Whether ``unquote(TrimSpace(buffer))`` would succeed, decided from the ends of the buffer
    alone: Ollama re-checks at every line break of a value, and joining a long multi-line value
    each time would make parsing quadratic."""
    start, end = 0, len(buf)
    while start < end and buf[start] in _WHITESPACE:
        start += 1
    while end > start and buf[end - 1] in _WHITESPACE:
        end -= 1
    length = end - start
    if length >= 3 and buf[start] == buf[start + 1] == buf[start + 2] == '"':
        return length >= 6 and buf[end - 3] == buf[end - 2] == buf[end - 1] == '"'
    if length >= 1 and buf[start] == '"':
        return length >= 2 and buf[end - 1] == '"'
    return True


def _command(name: str, value: str, start: int, end: int, raw: str) -> Command:
    quote = '"""' if raw.startswith('"""') else '"' if raw.startswith('"') else ""
    return Command(name, value, line=start, end_line=end, quote=quote, raw=raw)


def parse_modelfile(data: str | bytes) -> Modelfile:
    """``parser.ParseFile``; raises :class:`ModelfileError` with Ollama's message."""
    parsed = _parse(decode_modelfile(data) if isinstance(data, bytes) else data)
    if parsed.error is not None:
        raise ModelfileError(parsed.error, line=parsed.error_line)
    return Modelfile(tuple(parsed.commands))


# --- The create step -----------------------------------------------------------------------------

@dataclass(frozen=True)
class CreateRequest:
    """What ``Modelfile.CreateRequest`` sends to ``/api/create`` (files as paths, not digests)."""

    from_model: str = ""
    files: tuple[str, ...] = ()
    draft_files: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()
    template: str = ""
    system: str = ""
    renderer: str = ""
    parser: str = ""
    requires: str = ""
    license: tuple[str, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()
    parameters: Mapping[str, TypedParam] = field(default_factory=dict)
    deprecated: tuple[str, ...] = ()


class _CreateError(Exception):
    """A CreateRequest failure; the message is Ollama's text."""


def _expand_path(path: str, relative_dir: Path) -> str:
    """``expandPath``: absolute, ``~``, ``~user`` or relative to the Modelfile's directory."""
    if os.path.isabs(path) or path.startswith(("\\", "/")):
        return os.path.abspath(path)
    if path.startswith("~"):
        if path == "~" or path.startswith("~/"):
            home, rest = os.path.expanduser("~"), path[1:]
        else:
            user, _, tail = path[1:].partition("/")
            home = os.path.expanduser(f"~{user}")
            if home == f"~{user}":
                raise _CreateError(f"failed to find user '{user}': user: unknown user {user}")
            rest = f"/{tail}" if tail else ""
        # filepath.Join(home, "/x") is home/x; Python's join would restart at "/x".
        return os.path.abspath(os.path.normpath(f"{home}/{rest}"))
    return os.path.abspath(os.path.join(relative_dir, path))


def _stat_error(path: str, exc: OSError) -> _CreateError:
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return _CreateError(f"stat {path}: {reason}")


def _model_files(path: str) -> list[str]:
    """``fileDigestMap``'s file selection (without hashing or content sniffing, which only
    rejects unresolved git-lfs pointers). FileNotFoundError means "not a local path"."""
    if not os.path.isdir(path):
        os.stat(path)
        return [path]
    patterns = ("model*.safetensors", "consolidated*.safetensors", "pytorch_model*.bin",
                "consolidated*.pth", "*.gguf", "*.bin")
    root = Path(path)
    for pattern in patterns:
        found = sorted(str(p) for p in root.glob(pattern))
        if found:
            if pattern == "model*.safetensors":
                found += sorted(str(p) for p in root.glob(f"*/{pattern}"))
            break
    else:
        raise _CreateError(ERR_MODEL_NOT_FOUND)
    for file in found:
        rel = os.path.relpath(os.path.realpath(file), path)
        if rel.startswith("..") or os.path.isabs(rel):
            raise _CreateError(f"insecure path: {rel}")
    return found


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.abspath(a)) == os.path.realpath(os.path.abspath(b))


@dataclass
class _Creation:
    request: CreateRequest
    errors: list[tuple[Command, str]]
    warnings: list[tuple[Command, str]]


def _create(modelfile: Iterable[Command], relative_dir: Path, target: OllamaVersion, *,
            stop_at_first: bool) -> _Creation:
    """``CreateRequestWithProgress`` over ``commands``; with ``stop_at_first`` it ends where
    Ollama ends (the first error), otherwise it records every error and carries on."""
    errors: list[tuple[Command, str]] = []
    warnings: list[tuple[Command, str]] = []
    fields: dict[str, str] = {}
    files: list[str] = []
    draft_files: list[str] = []
    adapters: list[str] = []
    model_paths: list[str] = []
    draft_paths: list[str] = []
    licenses: list[str] = []
    messages: list[tuple[str, str]] = []
    deprecated: list[str] = []
    params: dict[str, TypedParam] = {}
    for command in modelfile:
        try:
            _create_one(command, relative_dir, target, fields, params, deprecated, licenses,
                        messages, files, draft_files, adapters, model_paths, draft_paths, warnings)
        except _CreateError as exc:
            errors.append((command, str(exc)))
            if stop_at_first:
                break
    request = CreateRequest(
        from_model=fields.get("from", ""), files=tuple(files), draft_files=tuple(draft_files),
        adapters=tuple(adapters), template=fields.get("template", ""), system=fields.get("system", ""),
        renderer=fields.get("renderer", ""), parser=fields.get("parser", ""),
        requires=fields.get("requires", ""), license=tuple(licenses), messages=tuple(messages),
        parameters=params, deprecated=tuple(deprecated),
    )
    return _Creation(request, errors, warnings)


def _create_one(
    c: Command, relative_dir: Path, target: OllamaVersion, fields: dict[str, str],
    params: dict[str, TypedParam], deprecated: list[str], licenses: list[str],
    messages: list[tuple[str, str]], files: list[str], draft_files: list[str], adapters: list[str],
    model_paths: list[str], draft_paths: list[str], warnings: list[tuple[Command, str]],
) -> None:
    since = _COMMAND_SINCE.get(c.name)
    # A release older than the command rejects it while parsing, listing its own (shorter) set of
    # commands; only the current list is transcribed (errInvalidCommand), so this message is ours.
    if since is not None and target < since:
        raise _CreateError(f"{c.name.upper()} needs Ollama {since} or newer (target is {target})")
    if c.name in ("model", "draft", "adapter"):
        path = _expand_path(c.args, relative_dir)
        try:
            found = _model_files(path)
        except FileNotFoundError as exc:
            if c.name == "model":
                fields["from"] = c.args
                if c.quote == "" and _PATHLIKE.search(c.args):
                    warnings.append((c, f"FROM {c.args} looks like a path but {path} does not exist;"
                                        " Ollama silently treats it as a model name"))
                return
            raise _stat_error(path, exc) from exc
        except OSError as exc:
            raise _stat_error(path, exc) from exc
        if c.name == "adapter":
            adapters[:] = found
            return
        others = draft_paths if c.name == "model" else model_paths
        if any(_same_path(path, other) for other in others):
            raise _CreateError(f"DRAFT must not reference the same local path as FROM: {path}")
        (model_paths if c.name == "model" else draft_paths).append(path)
        merged = files if c.name == "model" else draft_files
        merged.extend(f for f in found if f not in merged)
    elif c.name in ("template", "system", "renderer", "parser"):
        fields[c.name] = c.args
    elif c.name == "license":
        licenses.append(c.args)
    elif c.name == "requires":
        requires = c.args if c.args.startswith("v") else f"v{c.args}"
        if not semver_is_valid(requires):
            raise _CreateError(ERR_REQUIRES)
        fields["requires"] = requires[1:]
    elif c.name == "message":
        role, _, content = c.args.partition(": ")
        messages.append((role, content))
    elif c.name in DEPRECATED_PARAMETERS:
        deprecated.append(c.name)
        warnings.append((c, f"warning: parameter {c.name} is deprecated"))
    else:
        try:
            value = format_param(c.name, c.args, target)
        except ParameterError as exc:
            raise _CreateError(str(exc)) from exc
        existing = params.get(c.name)
        if isinstance(existing, list) and isinstance(value, list):
            params[c.name] = existing + value
        else:
            params[c.name] = value


def create_request(modelfile: Modelfile, relative_dir: Path | None = None, *,
                   ollama_version: OllamaVersion | None = None) -> CreateRequest:
    """``Modelfile.CreateRequest``: raises :class:`ModelfileError` at Ollama's first error.
    Paths resolve against ``relative_dir`` (the Modelfile's directory; default: cwd)."""
    target = ollama_version or LATEST_KNOWN
    result = _create(modelfile.commands, relative_dir or Path.cwd(), target, stop_at_first=True)
    if result.errors:
        command, message = result.errors[0]
        raise ModelfileError(message, line=command.line or None)
    return result.request


# --- Linting -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LintIssue:
    """``message`` is Ollama's own text for errors Ollama raises; ``line`` is the physical line."""

    message: str
    line: int | None = None

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclass(frozen=True)
class LintResult:
    errors: tuple[LintIssue, ...]
    warnings: tuple[LintIssue, ...]
    modelfile: Modelfile | None = None
    request: CreateRequest | None = None

    @property
    def ok(self) -> bool:
        """True when ``ollama create`` would accept the file."""
        return not self.errors


_PATHLIKE = re.compile(r"^(?:\.{1,2}[/\\]|[/\\~]|[A-Za-z]:[/\\])|\.(?:gguf|bin|safetensors)$")


def lint_modelfile(data: str | bytes, *, relative_dir: Path | None = None,
                   ollama_version: OllamaVersion | None = None) -> LintResult:
    """Check a Modelfile the way ``ollama create`` would, plus warnings for its traps.

    ``errors`` holds what Ollama would refuse: the parser stops at its first error (as Ollama
    does); past the parser every create-step error is listed, the first being the one Ollama
    reports. ``warnings`` never make Ollama fail; they flag files that mean something other than
    they appear to. ``ollama_version`` is the target release (default: the newest docs/ollama.md
    covers); parameters and commands that release lacks are errors.
    """
    target = ollama_version or LATEST_KNOWN
    text = decode_modelfile(data) if isinstance(data, bytes) else data
    parsed = _parse(text)
    warnings: list[LintIssue] = []
    if target < PARSER_STABLE_SINCE:
        warnings.append(LintIssue(
            f"Ollama {target} predates the 0.5.0 parser these checks follow; results may differ"))
    for line, ch in parsed.dropped:
        warnings.append(LintIssue(
            f"invisible character U+{ord(ch):04X} is silently dropped by Ollama", line))
    if "\r" in text:
        warnings.append(LintIssue(
            "CR line endings: Ollama counts \\r and \\n separately, so its error line numbers are"
            " doubled, and a multi-line quoted value keeps its CR characters"))
    for command in parsed.commands:
        warnings.extend(_command_warnings(command, target))
    if parsed.error is not None:
        warnings.extend(_parse_error_hints(parsed))
        return LintResult((LintIssue(parsed.error, parsed.error_line),), tuple(warnings))
    modelfile = Modelfile(tuple(parsed.commands))
    creation = _create(modelfile.commands, relative_dir or Path.cwd(), target, stop_at_first=False)
    errors = [LintIssue(message, command.line or None) for command, message in creation.errors]
    warnings.extend(LintIssue(message, command.line or None) for command, message in creation.warnings)
    for command, message in creation.errors:
        warnings.extend(_create_error_hints(command, message))
    requires = creation.request.requires
    if requires and not creation.errors:
        try:
            needed = OllamaVersion.parse(requires)
        except VelollmError:
            needed = None
        if needed is not None and needed > target:
            warnings.append(LintIssue(f"REQUIRES {requires} is newer than the target Ollama {target}"))
    return LintResult(tuple(errors), tuple(warnings), modelfile, creation.request)


def _command_warnings(c: Command, target: OllamaVersion) -> list[LintIssue]:
    found: list[LintIssue] = []
    if c.quote == "" and re.search(r"[ \t]#", c.args):
        found.append(LintIssue(
            "'#' starts a comment only at the start of a line; here it is part of the value"
            f" {c.args!r}", c.line))
    if c.quote == "" and len(c.args) >= 2 and c.args[0] == c.args[-1] == "'":
        found.append(LintIssue(
            "single quotes are not quotes in a Modelfile; they stay part of the value", c.line))
    if c.quote == '"' and c.end_line > c.line:
        first = re.split(r"\r\n|\r|\n", c.raw, maxsplit=1)[0]
        if '"' in first[1:]:
            found.append(LintIssue(
                f"the value opened with \" on line {c.line} runs to line {c.end_line}: a quoted value"
                " continues until a line ends with the closing quote, so text after the quote on"
                f" line {c.line} swallowed the following lines", c.line))
    if c.quote and c.end_line > c.line and c.is_parameter and c.name != "stop":
        found.append(LintIssue(
            f"PARAMETER {c.name} spans lines {c.line}-{c.end_line}; its value holds line breaks", c.line))
    if c.is_parameter and c.name == "":
        found.append(LintIssue(
            f"two spaces after PARAMETER: Ollama reads an empty parameter name and the value"
            f" {c.args!r}; write exactly one space", c.line))
    if c.is_parameter and c.name and c.name != c.name.lower() and known_parameter(c.name.lower(), target):
        found.append(LintIssue(
            f"parameter names are case-sensitive: write {c.name.lower()}, not {c.name}", c.line))
    spec = known_parameter(c.name, target) if c.is_parameter else None
    if spec is not None and spec.type is ParamType.INT and parse_int(c.args) is None:
        real = parse_float32(c.args)  # a number, just not in the plain form ParseInt takes
        if real is not None and math.isfinite(real):
            plain = f"write {int(real)}" if real.is_integer() else "use a whole number"
            found.append(LintIssue(f"{c.name} takes a plain integer: {plain} rather than {c.args}", c.line))
    return found


def _parse_error_hints(parsed: _Parsed) -> list[LintIssue]:
    hints: list[LintIssue] = []
    line = parsed.error_line
    word = parsed.error_word
    if parsed.error and ERR_INVALID_COMMAND in parsed.error and word.lower() in _COMMAND_WORDS:
        hints.append(LintIssue(
            f"{word} must be followed by a space and a value on the same line"
            f" (write {word.upper()} \"\" for an empty value)", line))
    if parsed.error and ERR_INVALID_ROLE in parsed.error:
        if word.lower() in _ROLES:
            hints.append(LintIssue(f"message roles are case-sensitive: write {word.lower()}", line))
        elif word == "":
            hints.append(LintIssue("write exactly one space after MESSAGE", line))
    if parsed.error and parsed.error.startswith(f"{ERR_UNEXPECTED_EOF}:"):
        if parsed.error_char in _NEWLINE:
            hints.append(LintIssue(f"{word} has no value on its line", line))
        else:
            hints.append(LintIssue(
                f"parameter names and message roles use only letters, digits and '_' (found"
                f" {parsed.error_char!r})", line))
    if parsed.error == ERR_UNEXPECTED_EOF and parsed.error_word.startswith('"'):
        hints.append(LintIssue(
            f"the quoted value that starts on line {line} is never closed: a value that starts"
            " with a quote runs until a line ends with the same quote", line))
    last = parsed.commands[-1] if parsed.commands else None
    if (last is not None and last.quote == '"""' and last.end_line > last.line
            and parsed.error and parsed.error != ERR_MISSING_FROM):
        hints.append(LintIssue(
            f"the \"\"\" value that starts on line {last.line} ended on line {last.end_line} because"
            " that line ends with \"\"\"; everything after it was read as new commands", last.end_line))
    return hints


def _create_error_hints(c: Command, message: str) -> list[LintIssue]:
    if message.startswith("unknown parameter") and c.name in REMOVED_PARAMETERS:
        return [LintIssue(REMOVED_PARAMETERS[c.name], c.line or None)]
    return []


# --- Generating ----------------------------------------------------------------------------------

_TRIPLE_UNSAFE = re.compile(r'"""[ \t\r\n]*[\r\n]')
_SINGLE_UNSAFE = re.compile(r'"[ \t\r\n]*[\r\n]')
_PARAM_NAME = re.compile(r"[A-Za-z0-9_]+")


def _check_representable(what: str, value: str) -> None:
    for ch in value:
        if ch not in _WHITESPACE and not ch.isprintable():
            raise VelollmError(
                f"{what} contains U+{ord(ch):04X}, which Ollama drops while reading a Modelfile;"
                " remove it")


def quote_value(value: str, *, what: str, always: bool = False) -> str:
    """Write ``value`` so that Ollama's parser reads back exactly ``value``.

    Values that need it (empty, multi-line, edge whitespace, a leading quote) or all values when
    ``always`` are quoted: triple quotes unless an interior line would end with ``\"\"\"`` (which
    closes the value early); then plain quotes if no interior line ends with ``\"``; otherwise no
    quoting can represent the value and VelollmError says so. ``what`` names the value there.
    """
    _check_representable(what, value)
    multiline = any(ch in _NEWLINE for ch in value)
    if not (always or multiline or value == "" or value.strip(_WHITESPACE) != value
            or value.startswith('"')):
        return value
    if not multiline or not _TRIPLE_UNSAFE.search(value):
        return f'"""{value}"""'
    if not value.startswith('""') and not _SINGLE_UNSAFE.search(value):
        return f'"{value}"'
    raise VelollmError(
        f"{what} cannot be written to a Modelfile: one of its lines ends with \"\"\" and another"
        " with \", and Ollama's quoting has no escapes")


def _quote_stop(value: str) -> str:
    """Stop strings always quoted, in the ``"..."`` form ``ollama show`` prints where possible."""
    if value and not value.startswith('"') and not any(ch in _NEWLINE for ch in value):
        _check_representable("a stop value", value)
        return f'"{value}"'
    return quote_value(value, what="a stop value", always=True)


def _comment_lines(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in re.split(r"\r\n|\r|\n", text)]


@dataclass(frozen=True)
class ModelfileSpec:
    """Everything a generated Modelfile says. ``parameters`` maps PARAMETER names to values
    (``str`` values are taken as written and must parse as the parameter's type); ``stop`` is
    the complete stop list (a derived model's list replaces its base's, so list every stop);
    ``reasons`` maps a parameter name or ``from``/``draft``/``requires``/``stop``/``template``/
    ``system`` to the comment written above it; ``comments`` open the file. ``ollama_version``
    is the release the file is for (default: the newest docs/ollama.md covers)."""

    from_model: str
    parameters: Mapping[str, ParamValue] = field(default_factory=dict, hash=False)
    draft: str | None = None
    template: str | None = None
    system: str | None = None
    stop: tuple[str, ...] = ()
    requires: str | None = None
    ollama_version: str | None = None
    comments: tuple[str, ...] = ()
    reasons: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Callers pass lists and dicts; freeze copies so a spec cannot change after it is made.
        object.__setattr__(self, "parameters", MappingProxyType(dict(self.parameters)))
        object.__setattr__(self, "reasons", MappingProxyType(dict(self.reasons)))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "comments", tuple(self.comments))

    def with_parameters(self, parameters: Mapping[str, ParamValue],
                        reasons: Mapping[str, str] | None = None) -> ModelfileSpec:
        """This spec with ``parameters`` set over the existing ones (a tuner's plan)."""
        return replace(self, parameters={**self.parameters, **parameters},
                       reasons={**self.reasons, **(reasons or {})})

    def target(self) -> OllamaVersion:
        return OllamaVersion.parse(self.ollama_version) if self.ollama_version else LATEST_KNOWN


@dataclass(frozen=True)
class _Entry:
    comments: tuple[str, ...]
    line: str


def _param_text(name: str, value: ParamValue, target: OllamaVersion) -> str:
    spec = known_parameter(name, target)
    if spec is None:
        if name in DEPRECATED_PARAMETERS:
            raise VelollmError(f"PARAMETER {name} is deprecated: Ollama ignores it")
        hint = REMOVED_PARAMETERS.get(name) or f"Ollama {target} has no parameter {name!r}"
        raise VelollmError(f"cannot write PARAMETER {name}: {hint}")
    if isinstance(value, bool):
        if spec.type is not ParamType.BOOL:
            raise VelollmError(f"PARAMETER {name} takes {spec.type.value}, not a boolean")
        return "true" if value else "false"
    if isinstance(value, int):
        if spec.type not in (ParamType.INT, ParamType.FLOAT):
            raise VelollmError(f"PARAMETER {name} takes {spec.type.value}, not an integer")
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if spec.type is not ParamType.FLOAT:
            raise VelollmError(f"PARAMETER {name} takes {spec.type.value}, not {text}")
        if parse_float32(text) is None or value != value or value in (float("inf"), float("-inf")):
            raise VelollmError(f"PARAMETER {name}: {text} is not a finite float32")
        return text
    if isinstance(value, str):
        if spec.type is ParamType.STRINGS:
            raise VelollmError(f"pass {name} values in ModelfileSpec.stop")
        try:
            format_param(name, value, target)
        except ParameterError as exc:
            raise VelollmError(f"PARAMETER {name}: {exc}") from exc
        return value
    raise VelollmError(f"PARAMETER {name} takes {spec.type.value}, not a list")


def _stops(spec: ModelfileSpec) -> list[str]:
    extra = spec.parameters.get("stop", [])
    if isinstance(extra, str | int | float):
        raise VelollmError("PARAMETER stop takes a list of strings")
    stops: list[str] = []
    for value in (*spec.stop, *extra):
        if value not in stops:
            stops.append(value)
    return stops


def _default_reason(name: str, target: OllamaVersion) -> str:
    effect = _PARAMETER_EFFECTS.get(name)
    if effect is None:
        return ""
    general, llama_server = effect
    return f"{name}: {general} ({llama_server})" if target.era is Era.C else f"{name}: {general}"


def render_modelfile(spec: ModelfileSpec) -> str:
    """The Modelfile text for ``spec``, checked by :func:`lint_modelfile` before it is returned.

    Only parameters and commands the target release knows are written; a DRAFT, or a parameter
    that needs a newer Ollama than the target, is an error. When a feature needs a minimum Ollama
    version, a REQUIRES line says so (Ollama 0.14.0+ reads it).
    """
    target = spec.target()
    if not spec.from_model.strip():
        raise VelollmError("a Modelfile needs a FROM model")

    def reason(key: str, default: str = "") -> tuple[str, ...]:
        text = spec.reasons.get(key, default)
        return tuple(_comment_lines(text)) if text else ()

    minimum: list[tuple[OllamaVersion, str]] = []
    parameters: list[_Entry] = []
    for name in sorted(spec.parameters, key=lambda n: (list(PARAMETERS).index(n) if n in PARAMETERS else 99, n)):
        if name == "stop":
            continue
        if not _PARAM_NAME.fullmatch(name):
            raise VelollmError(f"not a parameter name: {name!r}")
        text = _param_text(name, spec.parameters[name], target)
        since = PARAMETERS[name].since
        if since is not None:
            minimum.append((since, f"PARAMETER {name}"))
        parameters.append(_Entry(reason(name, _default_reason(name, target)), f"PARAMETER {name} {text}"))

    draft = None
    if spec.draft is not None:
        if target < DRAFT_SINCE:
            raise VelollmError(f"DRAFT needs Ollama {DRAFT_SINCE} or newer; the target is {target}")
        minimum.append((DRAFT_SINCE, "DRAFT"))
        draft = _Entry(reason("draft"), f"DRAFT {quote_value(spec.draft, what='the DRAFT path')}")

    requires = _requires_entry(spec, target, minimum)
    stops = _stops(spec)
    stop_entries = [
        _Entry(reason("stop", "a derived model's stop list replaces its base's: every stop is listed")
               if i == 0 else (), f"PARAMETER stop {_quote_stop(value)}")
        for i, value in enumerate(stops)
    ]
    text = render_template(
        "Modelfile.j2",
        header=[line for comment in spec.comments for line in _comment_lines(comment)],
        from_=_Entry(reason("from"), f"FROM {quote_value(spec.from_model, what='the FROM model')}"),
        draft=draft,
        requires=requires,
        parameters=parameters,
        stops=stop_entries,
        template=None if spec.template is None else _Entry(
            reason("template"), f"TEMPLATE {quote_value(spec.template, what='TEMPLATE', always=True)}"),
        system=None if spec.system is None else _Entry(
            reason("system"), f"SYSTEM {quote_value(spec.system, what='SYSTEM', always=True)}"),
    )
    result = lint_modelfile(text, ollama_version=target)
    if not result.ok:
        raise VelollmError(f"the generated Modelfile would not pass `ollama create`: {result.errors[0]}")
    return text


def _requires_entry(spec: ModelfileSpec, target: OllamaVersion,
                    minimum: list[tuple[OllamaVersion, str]]) -> _Entry | None:
    if spec.requires is not None:
        explicit = spec.requires if spec.requires.startswith("v") else f"v{spec.requires}"
        if not semver_is_valid(explicit):
            raise VelollmError(ERR_REQUIRES)
        minimum.append((OllamaVersion.parse(explicit), "the spec's REQUIRES"))
    if not minimum:
        return None
    needed, because = max(minimum, key=lambda item: item[0])
    if needed > target:
        raise VelollmError(f"{because} needs Ollama {needed} or newer; the target is {target}")
    if target < REQUIRES_SINCE:
        # Features this old need no REQUIRES; an explicit one cannot be written for this target.
        if spec.requires is not None:
            raise VelollmError(f"REQUIRES needs Ollama {REQUIRES_SINCE} or newer; the target is {target}")
        return None
    version = str(needed)
    default = f"{because} needs Ollama {version} or newer; older servers refuse to run this model"
    return _Entry(tuple(_comment_lines(spec.reasons.get("requires", default))), f"REQUIRES {version}")


def parse_show_parameters(text: str) -> list[tuple[str, str]]:
    """Read ``/api/show``'s ``parameters`` text: ``name<spaces>value`` lines where string values
    are Go-quoted (``%#v``) and repeat once per list element (every ``stop``)."""
    pairs: list[tuple[str, str]] = []
    for line in text.splitlines():
        name, _, rest = line.strip().partition(" ")
        if not name:
            continue
        rest = rest.strip()
        if rest.startswith('"'):
            unquoted = go_unquote(rest)
            if unquoted is None:
                raise VelollmError(f"cannot read the model's parameter line {line.strip()!r}")
            rest = unquoted
        pairs.append((name, rest))
    return pairs


def _typed_show_value(spec: ParamSpec, text: str) -> ParamValue | None:
    """A parameter value as /api/show prints it. Numbers come from JSON, so Go prints an int
    parameter stored as float64 1000000 as ``1e+06``; such integral floats count as ints."""
    if spec.type is ParamType.INT:
        number = parse_int(text)
        if number is None:
            real = parse_float32(text)
            number = int(real) if real is not None and real.is_integer() else None
        return number
    if spec.type is ParamType.FLOAT:
        real = parse_float32(text)
        return text if real is not None else None
    if spec.type is ParamType.BOOL:
        return text if parse_bool(text) is not None else None
    return None


def spec_from_base(show: ShowResponse, from_model: str, *,
                   ollama_version: str | None = None) -> ModelfileSpec:
    """A spec that derives from ``from_model`` and carries over what ``/api/show`` reports:
    TEMPLATE, SYSTEM, every stop value, the parameters the target release accepts, and the
    base's REQUIRES (a derived model needs at least what its base needs).

    Parameters the target does not know are left out and named in the header comments.
    """
    target = OllamaVersion.parse(ollama_version) if ollama_version else LATEST_KNOWN
    params: dict[str, ParamValue] = {}
    stops: list[str] = []
    dropped: list[str] = []
    for name, text in parse_show_parameters(show.parameters):
        if name == "stop":
            stops.append(text)
            continue
        spec = known_parameter(name, target)
        value = _typed_show_value(spec, text) if spec is not None else None
        if value is None:
            dropped.append(f"{name} {text}")
            continue
        params[name] = value
    carried = [part for part, present in (("TEMPLATE", show.template), ("SYSTEM", show.system),
                                          (f"{len(stops)} stop values", stops),
                                          ("parameters " + ", ".join(params), params)) if present]
    comments = [f"Derived from {from_model}; carried over from its /api/show: "
                + ("; ".join(carried) if carried else "nothing")]
    if dropped:
        comments.append(f"Left out (unknown to Ollama {target}): " + "; ".join(dropped))
    return ModelfileSpec(
        from_model=from_model,
        parameters=params,
        template=show.template or None,
        system=show.system or None,
        stop=tuple(stops),
        requires=show.requires or None,
        ollama_version=ollama_version,
        comments=tuple(comments),
    )


# Our patch that runs a draft model without MTP layers, passed as --spec-type draft-mtp, as a classic draft.
CLASSIC_DRAFT_PATCH = "spec-mtp-fallback"


def draft_problem(draft: Path, target: OllamaVersion, *, classic_drafts: bool = False) -> str | None:
    """Why Ollama ``target`` would fail to load a model with ``DRAFT draft``; None when it would not.

    Ollama 0.30+ passes every DRAFT to llama-server as ``--spec-type draft-mtp --spec-draft-model X``
    (``draft-dflash`` for a dflash model; llm/llama_server.go ``appendDraftArgs``), and a stock server exits at
    load when X has no MTP layers: a classic small draft model of the same vocabulary makes the whole model fail
    to load. ``classic_drafts``: Ollama runs our server with :data:`CLASSIC_DRAFT_PATCH`, which runs it."""
    if classic_drafts or target.era is not Era.C or not draft.is_file():  # a directory is converted by Ollama
        return None
    info = inspect_model(draft)
    if info.architecture == "dflash" or info.n_mtp_layers > 0:
        return None
    return (
        f"Ollama {target} runs a DRAFT as an MTP draft (--spec-type draft-mtp) and {draft.name} "
        f"({info.architecture}) has no MTP layers, so with Ollama's own llama-server the model would fail to load"
    )


def draft_vocabulary_problem(from_model: str, draft: Path) -> str | None:
    """Why ``draft`` cannot draft for ``from_model`` (llama.cpp's vocabulary check, which makes the server run
    without speculation); None when they match or ``from_model`` is neither a local GGUF nor in the local
    Ollama store, so there is nothing to compare."""
    if not draft.is_file():
        return None
    try:
        target = resolve_model(from_model)
    except VelollmError:
        return None
    compat = draft_compatibility(target, draft)
    return None if compat.ok else f"DRAFT {draft.name} cannot draft for {from_model}: {compat.reason}"


def loadable_draft(
    parameters: Mapping[str, ParamValue], draft: str | None, target: OllamaVersion, *, classic_drafts: bool = False,
) -> tuple[dict[str, ParamValue], str | None, str | None]:
    """The tuner's DRAFT and draft_num_predict, or neither with a comment saying why, when Ollama ``target``
    would fail to load the model with that draft (see :func:`draft_problem`)."""
    problem = draft_problem(Path(draft), target, classic_drafts=classic_drafts) if draft else None
    if problem is None:
        return dict(parameters), draft, None
    kept = {name: value for name, value in parameters.items() if name != "draft_num_predict"}
    return kept, None, f"no DRAFT: {problem} (`velollm-patch ollama install-server` puts in one that runs it)"


def tuned_parameters(plan: Plan) -> tuple[dict[str, ParamValue], dict[str, str], str | None]:
    """The PARAMETERs (with their reasons) and the DRAFT path that carry a tuner plan into a Modelfile.

    Ollama passes ``num_batch`` as both ``-b`` and ``-ub`` (appendBatchArgs), so it gets the plan's ubatch:
    the plan's larger logical batch would also grow the compute buffer. Slots, KV types and flash
    attention are server-wide in Ollama (``ollama config``), not Modelfile parameters."""
    s = plan.settings
    why = {c.key: c.reason for c in plan.choices}
    params: dict[str, ParamValue] = {"num_ctx": s.ctx_per_slot, "num_batch": s.ubatch, "num_thread": s.threads}
    reasons = {
        "num_ctx": why.get("ctx_per_slot", "the tuner's context per slot"),
        "num_batch": "Ollama sets -b and -ub from num_batch: the tuner's ubatch",
        "num_thread": why.get("threads", "the tuner's thread count"),
    }
    if s.gpu_layers is not None:
        params["num_gpu"] = s.gpu_layers
        reasons["num_gpu"] = why.get("gpu_layers", "the tuner's GPU layers")
    if s.load_mode_none:
        params["use_mmap"] = "false"
        reasons["use_mmap"] = why.get("load_mode", "the weights are read rather than mapped")
    spec = s.speculation
    draft = None
    if spec is not None and spec.draft is not None and spec.draft_n_max is not None:
        draft = str(spec.draft.path)
        params["draft_num_predict"] = spec.draft_n_max
        reasons["draft"] = why.get("spec_draft", "a compatible smaller model of the same vocabulary")
        reasons["draft_num_predict"] = "the draft length the tuner expects to pay off"
    return params, reasons, draft
