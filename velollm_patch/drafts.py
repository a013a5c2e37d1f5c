"""Draft models for speculative decoding: llama.cpp's check that a draft can pair with a target
(``common_speculative_are_compatible``; docs/llama-cpp.md, Speculative decoding), and the search for compatible,
clearly smaller drafts among local GGUFs, the Ollama store and the Hugging Face cache."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velollm_patch.errors import VelollmError, plain
from velollm_patch.model import ModelInfo, inspect_model
from velollm_patch.ollama.store import list_ollama_models

log = logging.getLogger("velollm_patch.drafts")

# common/speculative.cpp
SPEC_VOCAB_MAX_SIZE_DIFFERENCE = 128
SPEC_VOCAB_CHECK_START_TOKEN_ID = 5


@dataclass(frozen=True)
class Compat:
    ok: bool
    reason: str
    """One line: why the pair can or cannot be used for speculative decoding."""


def _as_info(model: ModelInfo | Path) -> ModelInfo:
    return model if isinstance(model, ModelInfo) else inspect_model(Path(model))


def _show(token: bytes) -> str:
    return repr(token.decode("utf-8", errors="replace"))


def draft_compatibility(target: ModelInfo | Path, draft: ModelInfo | Path) -> Compat:
    """llama.cpp's ``common_speculative_are_compatible``: the check that makes
    ``--spec-type draft-simple`` refuse a draft model."""
    t, d = _as_info(target), _as_info(draft)
    tv, dv = t.vocab, d.vocab
    if tv is None or dv is None:
        which = "target" if tv is None else "draft"
        return Compat(False, f"the {which} model has no tokenizer")
    for v, which in ((tv, "target"), (dv, "draft")):
        if v.type == "unknown":
            return Compat(False, f"llama.cpp does not know the {which} tokenizer {plain(repr(v.model))}")
    if tv.type != dv.type:
        return Compat(
            False,
            f"vocab types differ: target {tv.type} ({plain(tv.model)}), draft {dv.type} ({plain(dv.model)})",
        )
    if tv.add_bos != dv.add_bos or (tv.add_bos and tv.bos_id != dv.bos_id):
        return Compat(
            False,
            f"BOS handling differs: target add_bos={tv.add_bos} bos={tv.bos_id}, "
            f"draft add_bos={dv.add_bos} bos={dv.bos_id}",
        )
    if tv.add_eos != dv.add_eos or (tv.add_eos and tv.eos_id != dv.eos_id):
        return Compat(
            False,
            f"EOS handling differs: target add_eos={tv.add_eos} eos={tv.eos_id}, "
            f"draft add_eos={dv.add_eos} eos={dv.eos_id}",
        )
    diff = abs(tv.n_tokens - dv.n_tokens)
    if diff > SPEC_VOCAB_MAX_SIZE_DIFFERENCE:
        return Compat(
            False,
            f"vocab sizes differ by {diff} (target {tv.n_tokens}, draft {dv.n_tokens}; "
            f"llama.cpp allows {SPEC_VOCAB_MAX_SIZE_DIFFERENCE})",
        )
    # A NONE vocabulary has only empty placeholder tokens, which always compare equal.
    if tv.type != "NONE":
        a, b = tv.token_texts(), dv.token_texts()
        n, start = min(len(a), len(b)), SPEC_VOCAB_CHECK_START_TOKEN_ID
        if a[start:n] != b[start:n]:
            i = next(i for i in range(start, n) if a[i] != b[i])
            return Compat(False, f"token {i} differs: target {_show(a[i])}, draft {_show(b[i])}")
    sizes = f"{tv.n_tokens} tokens" if diff == 0 else f"{tv.n_tokens} and {dv.n_tokens} tokens"
    return Compat(True, f"same {tv.type} vocabulary ({sizes}) and special tokens")


@dataclass(frozen=True)
class DraftCandidate:
    path: Path
    label: str
    """An Ollama name, ``hf:org/repo/file``, or the path."""
    info: ModelInfo
    params_ratio: float
    bytes_ratio: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "label": self.label,
            "name": self.info.name,
            "n_params": self.info.n_params,
            "file_size": self.info.file_size,
            "file_type": self.info.file_type,
            "params_ratio": self.params_ratio,
            "bytes_ratio": self.bytes_ratio,
            "reason": self.reason,
        }


# A draft pays off only when it is much cheaper to run than the target.
MAX_DRAFT_RATIO = 0.5


def _judge_draft(target: ModelInfo, draft: ModelInfo, label: str) -> DraftCandidate | None:
    if draft.split_count > 1 or draft.n_params == 0 or target.n_params == 0:
        return None
    params_ratio = draft.n_params / target.n_params
    bytes_ratio = draft.file_size / target.file_size
    if params_ratio <= MAX_DRAFT_RATIO:
        size = f"{params_ratio:.2f}x the parameters, {bytes_ratio:.2f}x the bytes"
    elif params_ratio <= 1.0 and bytes_ratio <= MAX_DRAFT_RATIO:
        # The same weights quantized harder still draft well and cost a fraction of the bandwidth.
        quant = draft.file_type or draft.tensor_type
        size = f"{params_ratio:.2f}x the parameters at {quant}, {bytes_ratio:.2f}x the bytes"
    else:
        return None
    compat = draft_compatibility(target, draft)
    if not compat.ok:
        log.debug("draft %s rejected: %s", label, compat.reason)
        return None
    return DraftCandidate(draft.path, label, draft, params_ratio, bytes_ratio, f"{size}; {compat.reason}")


def _hf_hub_cache() -> Path:
    # The same precedence huggingface_hub uses.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "huggingface" / "hub"


def _gguf_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(".gguf"):
                yield Path(dirpath) / name


def _hf_label(path: Path, hub: Path) -> str:
    # hub/models--org--name/snapshots/<revision>/<file>
    parts = path.relative_to(hub).parts
    if len(parts) >= 4 and parts[0].startswith("models--") and parts[1] == "snapshots":
        repo = parts[0].removeprefix("models--").replace("--", "/")
        return f"hf:{repo}/{'/'.join(parts[3:])}"
    return str(path)


def _draft_sources(search_dirs: Sequence[Path]) -> Iterator[tuple[Path, str]]:
    """(file, label) of every GGUF a draft could come from; missing directories are skipped."""
    for root in search_dirs:
        for path in _gguf_files(Path(root).expanduser()):
            yield path, str(path)
    for name, blob in list_ollama_models():
        yield blob, name
    hub = _hf_hub_cache()
    for path in _gguf_files(hub):
        yield path, _hf_label(path, hub)


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def find_draft_candidates(target: ModelInfo | Path, search_dirs: Sequence[Path] = ()) -> list[DraftCandidate]:
    """Compatible, clearly smaller draft models for ``target`` among the GGUFs under
    ``search_dirs``, the Ollama store and the Hugging Face cache; cheapest (smallest file) first,
    since a draft's cost per token follows the bytes it reads."""
    t = _as_info(target)
    seen = {_file_key(t.path)}
    found: list[DraftCandidate] = []
    for path, label in _draft_sources(search_dirs):
        key = _file_key(path)
        if key is None or key in seen:
            continue
        seen.add(key)
        try:
            candidate = _judge_draft(t, inspect_model(path), label)
        except VelollmError as e:
            log.debug("skipping %s: %s", path, e)
            continue
        if candidate is not None:
            found.append(candidate)
    found.sort(key=lambda c: (c.bytes_ratio, c.params_ratio, str(c.path)))
    return found
