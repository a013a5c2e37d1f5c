"""What a MODEL argument names, turned into a GGUF file in one place: a path, a demo model
(:mod:`velollm_patch.demo_models`) or an Ollama model name in the local store (:mod:`velollm_patch.ollama.store`)."""

from __future__ import annotations

from pathlib import Path

from velollm_patch.demo_models import KNOWN_MODELS, fetch_model
from velollm_patch.errors import VelollmError
from velollm_patch.ollama.store import ollama_model_blob, parse_ollama_name
from velollm_patch.paths import Paths


def is_demo_model(ref: str) -> bool:
    """Whether ``ref`` names a demo model: a known name, unless a file of that name is there."""
    return ref in KNOWN_MODELS and not Path(ref).exists()


def resolve_model(paths: Paths, ref: str | None = None) -> Path:
    """What every command's MODEL argument means: a GGUF path, a demo model (fetched on first use), or an
    Ollama model name in the local store; no argument means the default demo model."""
    if ref is None:
        return fetch_model(paths)
    if is_demo_model(ref):
        return fetch_model(paths, ref)
    return resolve_local_model(ref)


def _looks_like_path(ref: str) -> bool:
    return ref.lower().endswith(".gguf") or ref.startswith(("/", ".", "~")) or "\\" in ref or ref.count("/") > 2


def resolve_local_model(ref: str) -> Path:
    """A GGUF path, or the weights blob of an Ollama model name (``llama3.2``, ``qwen2.5:0.5b``,
    ``library/x:tag``, ``registry/ns/x:tag``). An existing file always wins over a model name.

    Demo-model names mean nothing here: a Modelfile's FROM and the names an Ollama server reports are paths or
    Ollama names, and looking one up must not start a download."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path.resolve()
    if path.exists():
        raise VelollmError(f"{ref} is not a file; pass a GGUF file or an Ollama model name")
    if _looks_like_path(ref):
        raise VelollmError(f"model file {ref} not found")
    name = parse_ollama_name(ref)
    if name is None:
        raise VelollmError(f"'{ref}' is neither a GGUF file nor a valid Ollama model name")
    return ollama_model_blob(name)
