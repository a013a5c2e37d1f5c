"""Ollama's Modelfile parser, create-step checks and a linter, ported.

``ollama create`` parses the Modelfile on the client (``parser.ParseFile``), turns it into a
request (``Modelfile.CreateRequest``) and types each PARAMETER (``api.FormatParams``); the
server never sees the text. This module ports those three steps from Ollama v0.33.0-rc2 rune for
rune (the state machine is unchanged since 0.5.0), so :func:`lint_modelfile` accepts and rejects
exactly what ``ollama create`` does, with Ollama's own error texts, and adds warnings for the
traps that parse fine but mean something other than what the author wrote.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType

from velollm_patch.errors import VelollmError
from velollm_patch.files import read_limited
from velollm_patch.ollama.gosyntax import (
    parse_bool,
    parse_float32,
    parse_int,
    semver_is_valid,
)
from velollm_patch.ollama.versions import (
    DRAFT_SINCE,
    ERA_C_START,
    LATEST_KNOWN,
    PARSER_STABLE_SINCE,
    RENDERER_PARSER_SINCE,
    REQUIRES_SINCE,
    OllamaVersion,
)

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
NEWLINE = "\r\n"
WHITESPACE = " \t\r\n"


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
    ParamSpec("tfs_z", _F, until=OllamaVersion(0, 5, 2)),
)})

# Accepted with "warning: parameter X is deprecated" and dropped (parser.go deprecatedParameters).
DEPRECATED_PARAMETERS = (
    "penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
    "mirostat", "mirostat_tau", "mirostat_eta",
)
# Names that no longer exist and fail with "unknown parameter". docs/ollama.md dates only
# tfs_z's removal, so the others are treated as unknown for every target.
REMOVED_PARAMETERS: Mapping[str, str] = MappingProxyType({
    "tfs_z": "tfs_z was removed in Ollama 0.5.2",
    "numa": "numa no longer exists in Ollama",
    "num_gqa": "num_gqa no longer exists in Ollama",
    "rope_frequency_base": "rope_frequency_base no longer exists in Ollama",
    "rope_frequency_scale": "rope_frequency_scale no longer exists in Ollama",
})

# What each load-time knob does, for the comments of generated Modelfiles; the second part is
# how Ollama >= 0.30 passes it to llama-server (llm/llama_server.go startLlamaServer; docs/ollama.md).
PARAMETER_EFFECTS: Mapping[str, tuple[str, str]] = MappingProxyType({
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
        if ch in WHITESPACE:
            return _NIL, "", None
        return _NAME, ch, None
    if state == _NAME:
        if _is_alpha(ch):
            return _NAME, ch, None
        if ch in _SPACE:
            return _VALUE, "", None
        return _NIL, "", "invalid"
    if state == _VALUE:
        if ch in WHITESPACE:
            return _NIL, ch, None
        return _VALUE, ch, None
    if state in (_PARAMETER, _MESSAGE):
        if _is_alpha(ch) or (state == _PARAMETER and ("0" <= ch <= "9" or ch == "_")):
            return state, ch, None
        if ch in _SPACE:
            return _VALUE, "", None
        return _NIL, "", "eof"
    if ch in NEWLINE:
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
        if ch in NEWLINE:
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
                raw = "".join(buf).strip(WHITESPACE)
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
            elif kept not in WHITESPACE:
                out.dropped.append((char_line, kept))
    if state == _VALUE:
        raw = "".join(buf).strip(WHITESPACE)
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
    while start < end and buf[start] in WHITESPACE:
        start += 1
    while end > start and buf[end - 1] in WHITESPACE:
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
        if parsed.error_char in NEWLINE:
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


