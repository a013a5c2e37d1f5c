"""The benchmark scenarios and their prompt sets, shipped as JSON in ``velollm_patch/prompts``.

Prompts are chat messages, so every target applies the model's own chat template (llama-server
and OpenAI-compatible servers through /v1/chat/completions, Ollama through its template) and the
measured prompt is what a user of that server would send. A message may pull in a shipped file
with ``{{file:NAME}}``, which keeps the code-edit source readable as a file of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velollm_patch.errors import VelollmError

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"

# Report order; also the order `bench run` runs them in.
SCENARIO_NAMES = ("short", "conversation", "code_gen", "code_edit", "concurrency", "context_fill")
KINDS = ("single", "concurrency", "context_fill")

_FILE_REF = re.compile(r"\{\{file:([\w.-]+)\}\}")


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


Prompt = tuple[Message, ...]


@dataclass(frozen=True)
class Scenario:
    """One scenario. ``repeats`` is measured requests (per client for concurrency, per level for
    context fill); ``clients`` and ``levels`` are used by their kinds only."""

    name: str
    title: str
    description: str
    kind: str
    prompts: tuple[Prompt, ...]
    n_predict: int
    repeats: int
    clients: tuple[int, ...] = ()
    levels: tuple[int, ...] = ()
    instruction: str = ""
    filler: str = ""

    def fill_prompt(self, chars: int) -> Prompt:
        """The instruction followed by ``chars`` characters of filler text, repeated in numbered parts."""
        parts: list[str] = []
        length = 0
        number = 1
        while length < chars:
            part = f"Part {number}.\n{self.filler}\n\n"
            parts.append(part)
            length += len(part)
            number += 1
        return (Message("user", self.instruction + "".join(parts)[:chars]),)


def render_transcript(prompt: Prompt) -> str:
    """A chat as plain text, for endpoints that take one prompt string (Ollama /api/generate)."""
    if len(prompt) == 1 and prompt[0].role == "user":
        return prompt[0].content
    return "\n\n".join(f"{m.role.capitalize()}: {m.content}" for m in prompt) + "\n\nAssistant:"


def _read_set(name: str, directory: Path) -> dict[str, Any]:
    path = directory / f"{name}.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise VelollmError(f"prompt set {path} cannot be read ({exc}); reinstall velollm-patch") from exc
    except ValueError as exc:
        raise VelollmError(f"prompt set {path} is not valid JSON: {exc}") from exc
    return data


def _expand(content: str, directory: Path) -> str:
    def include(match: re.Match[str]) -> str:
        try:
            return (directory / match.group(1)).read_text(encoding="utf-8")
        except OSError as exc:
            raise VelollmError(f"prompt file {directory / match.group(1)} cannot be read ({exc})") from exc

    return _FILE_REF.sub(include, content)


def _prompts(data: dict[str, Any], directory: Path) -> tuple[Prompt, ...]:
    return tuple(
        tuple(Message(str(m["role"]), _expand(str(m["content"]), directory)) for m in prompt)
        for prompt in data.get("prompts") or ()
    )


def _interleave(sources: Sequence[Sequence[str]]) -> str:
    """The paragraphs of all sources merged so that each source is used up at the same pace: every
    stretch of the filler then has the mix of prose and code of the whole, and so its tokens per
    character, which is what lets a short calibration sample size the long context-fill prompts."""
    keyed: list[tuple[float, str]] = []
    for paragraphs in sources:
        total = sum(len(p) for p in paragraphs)
        done = 0
        for paragraph in paragraphs:
            keyed.append(((done + len(paragraph) / 2) / total, paragraph))
            done += len(paragraph)
    return "\n\n".join(paragraph for _, paragraph in sorted(keyed, key=lambda item: item[0]))


def load_scenario(name: str, directory: Path = PROMPTS_DIR) -> Scenario:
    if name not in SCENARIO_NAMES:
        raise VelollmError(f"unknown scenario '{name}': choose from {', '.join(SCENARIO_NAMES)}")
    data = _read_set(name, directory)
    kind = str(data.get("kind") or "single")
    if kind not in KINDS:
        raise VelollmError(f"prompt set {name}: kind must be one of {', '.join(KINDS)}, not '{kind}'")
    prompts = _prompts(data, directory)
    if "prompts_from" in data:
        prompts = _prompts(_read_set(str(data["prompts_from"]), directory), directory)
    filler = _interleave([
        [paragraph for prompt in _prompts(_read_set(str(source), directory), directory) for message in prompt
         for paragraph in message.content.split("\n\n") if paragraph.strip()]
        for source in data.get("filler_from") or ()
    ])
    if kind != "context_fill" and not prompts:
        raise VelollmError(f"prompt set {name} has no prompts")
    if kind == "context_fill" and not filler:
        raise VelollmError(f"prompt set {name} has no filler text (filler_from)")
    return Scenario(
        name=name,
        title=str(data.get("title") or name),
        description=str(data.get("description") or ""),
        kind=kind,
        prompts=prompts,
        n_predict=int(data["n_predict"]),
        repeats=int(data.get("repeats") or 1),
        clients=tuple(int(c) for c in data.get("clients") or ()),
        levels=tuple(int(level) for level in data.get("levels") or ()),
        instruction=str(data.get("instruction") or ""),
        filler=filler,
    )


def parse_names(text: str | None) -> tuple[str, ...]:
    """``short,code_edit`` → validated names in report order; None or ``all`` → every scenario."""
    if text is None or text.strip() in ("", "all"):
        return SCENARIO_NAMES
    wanted = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in SCENARIO_NAMES]
    if unknown:
        raise VelollmError(f"unknown scenario {', '.join(unknown)}: choose from {', '.join(SCENARIO_NAMES)}")
    return tuple(n for n in SCENARIO_NAMES if n in wanted)


def load_scenarios(names: Sequence[str], directory: Path = PROMPTS_DIR) -> list[Scenario]:
    return [load_scenario(name, directory) for name in names]
