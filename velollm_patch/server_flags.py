"""Which flags and ``LLAMA_ARG_*`` variables the installed llama-server accepts, read from its ``--help``.

Upstream renames and removes flags often (``--draft-max`` became ``--spec-draft-n-max``; a removed
flag is a hard error at start-up), so the tuner never assumes a flag exists: it asks this module,
which parses the help text of the exact binary it will run. The help is printed by
``common_arg::to_string`` (common/arg.cpp): an option starts at column 0 with its names and value
hint, padded to column 40 where the help text starts; continuation lines are indented by 40 spaces;
``set_env`` appends ``(env: NAME)`` as a line of its own. Parsing takes a few hundred milliseconds
of process start-up, so the result is cached per binary content (sha256) in the cache directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from velollm_patch import proc
from velollm_patch.errors import VelollmError
from velollm_patch.files import sha256_file
from velollm_patch.paths import Paths, ensure_dir

log = logging.getLogger("velollm_patch.server_flags")

CACHE_SCHEMA = 1
HELP_COLUMN = 40
# A value-less option's names take at most this many columns before the help moves to a new line.
_NAMES_WIDTH = HELP_COLUMN - 3
_ENV_RE = re.compile(r"\(env: ([A-Z0-9_]+)\)")
_NAME_RE = re.compile(r"-{1,2}[A-Za-z0-9][A-Za-z0-9_-]*")
# Upstream keeps removed flags in the help so that using them prints a pointer to the new ones.
_REMOVED_MARKER = "argument has been removed"
# --help loads no model; it only guards against a binary that hangs (a broken GPU driver).
HELP_TIMEOUT_S = 60


@dataclass(frozen=True)
class FlagSpec:
    """One option of llama-server's ``--help``."""

    names: tuple[str, ...]
    """Positive names first (``-kvu``, ``--kv-unified``), in help order."""
    negative: tuple[str, ...]
    """Names that switch a boolean off (``-no-kvu``, ``--no-kv-unified``)."""
    value_hint: str | None
    """``N``, ``TYPE``, ``[on|off|auto]``...; None for a switch."""
    env: str | None
    help: str
    removed: bool
    """Still listed, but using it is an error that points to its replacement."""

    @property
    def takes_value(self) -> bool:
        return self.value_hint is not None

    @property
    def all_names(self) -> tuple[str, ...]:
        return self.names + self.negative

    def choices(self) -> tuple[str, ...]:
        """The values a ``[a|b|c]`` or ``a,b,c`` hint lists (``-fa``, ``--spec-type``); () otherwise."""
        hint = (self.value_hint or "").strip()
        if hint[:1] + hint[-1:] in ("[]", "{}"):
            hint = hint[1:-1]
        parts = [p for p in re.split(r"[|,]", hint) if p]
        if len(parts) < 2 or not all(re.fullmatch(r"[a-z0-9][a-z0-9_-]*", p) for p in parts):
            return ()
        return tuple(parts)


def _is_negative(name: str) -> bool:
    return name.lstrip("-").startswith("no")


def _split_names(text: str) -> tuple[list[str], str | None]:
    """``-t, --threads N`` → (["-t", "--threads"], "N")."""
    names: list[str] = []
    rest = text.strip()
    while True:
        match = _NAME_RE.match(rest)
        if match is None:
            break
        names.append(match.group(0))
        rest = rest[match.end():]
        if rest.startswith(","):
            rest = rest[1:].lstrip()
            continue
        rest = rest.strip()
        break
    return names, (rest or None)


def parse_help(text: str) -> list[FlagSpec]:
    """Every option in a llama-server ``--help`` output; lines that are not options are skipped."""
    blocks: list[tuple[str, list[str]]] = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("-") and not line.startswith("-----"):
            head, first_help = line, ""
            # Names short enough are padded to the help column and followed by the help text.
            if len(line) > HELP_COLUMN and line[_NAMES_WIDTH:HELP_COLUMN] == " " * (HELP_COLUMN - _NAMES_WIDTH):
                head, first_help = line[:HELP_COLUMN], line[HELP_COLUMN:]
            blocks.append((head, [first_help] if first_help else []))
        elif blocks and line.startswith(" " * HELP_COLUMN):
            blocks[-1][1].append(line.strip())
        elif blocks and not line:
            continue
        elif blocks:
            # A section header or other prose ends the current option.
            blocks.append(("", []))
    flags: list[FlagSpec] = []
    for head, help_lines in blocks:
        names, hint = _split_names(head)
        if not names:
            continue
        help_text = " ".join(help_lines)
        env_match = _ENV_RE.search(help_text)
        positive = tuple(n for n in names if not _is_negative(n))
        negative = tuple(n for n in names if _is_negative(n))
        if not positive:
            # A switch that only exists in its "no-" form (--no-warmup alone) is a plain switch.
            positive, negative = negative, ()
        flags.append(
            FlagSpec(
                names=positive,
                negative=negative if hint is None else (),
                value_hint=hint,
                env=env_match.group(1) if env_match else None,
                help=_ENV_RE.sub("", help_text).strip(),
                removed=_REMOVED_MARKER in help_text,
            )
        )
    return flags


@dataclass(frozen=True)
class ServerFlags:
    """The options one llama-server binary accepts."""

    binary_sha256: str
    flags: tuple[FlagSpec, ...]

    def _index(self) -> dict[str, FlagSpec]:
        return {name: spec for spec in self.flags for name in spec.all_names}

    def get(self, name: str) -> FlagSpec | None:
        """The option ``name`` belongs to, unless the binary no longer accepts it."""
        spec = self._index().get(name)
        return None if spec is None or spec.removed else spec

    def accepts(self, name: str) -> bool:
        return self.get(name) is not None

    def first(self, *names: str) -> str | None:
        """The first of ``names`` (newest spelling first) this binary accepts."""
        return next((n for n in names if self.accepts(n)), None)

    def find(self, word: str) -> list[FlagSpec]:
        """Accepted options with ``word`` in one of their names (e.g. a patch's new switch)."""
        return [s for s in self.flags if not s.removed and any(word in n for n in s.all_names)]

    def env_names(self) -> frozenset[str]:
        """The ``LLAMA_ARG_*`` (and other) variables this binary's options read."""
        return frozenset(spec.env for spec in self.flags if spec.env and not spec.removed)

    def env_assignment(self, name: str, value: str | None) -> tuple[str, str] | None:
        """(variable, value) that has the effect of ``name [value]`` on the command line; None when
        the option has no environment variable. A switch reads 1 or 0 (common_arg_utils::is_truthy)."""
        spec = self.get(name)
        if spec is None or spec.env is None:
            return None
        if spec.takes_value:
            if value is None:
                raise VelollmError(f"llama-server option {name} needs a value")
            return spec.env, value
        return spec.env, "0" if name in spec.negative else "1"

    def to_dict(self) -> dict[str, Any]:
        return {"schema": CACHE_SCHEMA, "binary_sha256": self.binary_sha256, "flags": [asdict(f) for f in self.flags]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServerFlags:
        flags = tuple(
            FlagSpec(
                names=tuple(f["names"]), negative=tuple(f["negative"]), value_hint=f["value_hint"], env=f["env"],
                help=f["help"], removed=bool(f["removed"]),
            )
            for f in data["flags"]
        )
        return cls(str(data["binary_sha256"]), flags)


def _cache_file(paths: Paths, digest: str) -> Path:
    return paths.cache / "server-flags" / f"{digest}.json"


def read_server_flags(binary: Path, paths: Paths) -> ServerFlags:
    """The options ``binary`` accepts, from the cache or by running ``binary --help``."""
    if not binary.is_file():
        raise VelollmError(f"{binary} does not exist; rebuild with `velollm-patch build`")
    digest = sha256_file(binary)
    cached = _cache_file(paths, digest)
    try:
        data = json.loads(cached.read_text())
        if data.get("schema") == CACHE_SCHEMA:
            return ServerFlags.from_dict(data)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("ignoring unreadable flag cache %s: %s", cached, exc)
    result = proc.run([binary, "--help"], check=False, timeout=HELP_TIMEOUT_S)
    flags = tuple(parse_help(result.output))
    if not any("--model" in f.names or "-m" in f.names for f in flags):
        raise VelollmError(f"`{binary} --help` did not list its options (exit {result.returncode}): {result.tail(3)}")
    found = ServerFlags(digest, flags)
    ensure_dir(cached.parent)
    # Written aside and renamed, so a concurrent reader never sees half a file.
    tmp = cached.with_name(f".{digest}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(found.to_dict(), indent=1) + "\n")
    tmp.replace(cached)
    return found


# How llama-server words a variable it cannot take (common_params_parse_ex in common/arg.cpp).
_ENV_ERROR = re.compile(r'error while handling environment variable "([A-Z0-9_]+)": *(.*)', re.IGNORECASE)


def llama_arg_problem(binary: Path, flags: ServerFlags, name: str, value: str) -> str | None:
    """Why ``binary`` started with ``name=value`` in its environment would not get that setting, or None
    when it does. No option reads a variable missing from the help, so llama-server silently ignores it (a
    patched-only variable under an upstream server). A value the option cannot take (a patched-only value,
    a word for a number) stops the server before it loads anything: llama-server reads the environment
    before the command line, so ``--version`` with the variable set tries the value without a model."""
    if name not in flags.env_names():
        return f"{binary} has no option that reads {name}, so it would be ignored"
    # Only this variable of llama-server's: one inherited from this process must not decide the answer.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    env[name] = value
    try:
        result = subprocess.run([binary, "--version"], env=env, capture_output=True, text=True, errors="replace",
                                timeout=HELP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VelollmError(f"cannot run {binary} --version: {exc}") from exc
    if result.returncode == 0:
        return None
    output = result.stdout + result.stderr
    match = _ENV_ERROR.search(output)
    if match is not None and match.group(1) == name:
        # std::stoi/stof name themselves in the exception llama-server prints for a non-number.
        detail = match.group(2).strip()
        detail = "not a number" if detail in ("stoi", "stof", "stoul", "stoull") else detail or "invalid value"
        return f"{binary} refuses {name}={value} ({detail}) and would not start"
    last = (output.strip().splitlines() or ["no output"])[-1]
    raise VelollmError(f"{binary} --version failed (exit {result.returncode}) with {name}={value}: {last}")
