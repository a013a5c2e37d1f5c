"""The local Ollama model store: where it is, the names Ollama files models under, and the GGUF weights a
name's manifest points to."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from velollm_patch.errors import VelollmError
from velollm_patch.files import read_limited

log = logging.getLogger("velollm_patch.ollama.store")

# What a name without a host, a namespace or a tag stands for.
_DEFAULT_HOST = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"
_DEFAULT_TAG = "latest"
_MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
# Ollama's isValidPart (types/model/name.go, tag v0.33.0-rc2): a part starts with a letter, digit or "_" and
# goes on with those and "-", "." (not in a namespace) and ":" (only in a host); hosts have up to 350
# characters, the other parts 80. A name outside these rules is one Ollama never stores.
_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_PART_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")  # a model or a tag
# manifest.BlobsPath (manifest/paths.go) takes either case and names the blob sha256-<hex> as written.
_DIGEST_RE = re.compile(r"sha256:([0-9a-fA-F]{64})")
# A manifest lists a few layers in a few hundred bytes; the bound keeps a wrong file from being read whole.
_MAX_MANIFEST_BYTES = 1 << 20


@dataclass(frozen=True)
class OllamaName:
    host: str
    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        short = f"{self.model}:{self.tag}"
        if self.host != _DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{short}"
        return short if self.namespace == _DEFAULT_NAMESPACE else f"{self.namespace}/{short}"


def parse_ollama_name(ref: str) -> OllamaName | None:
    """Ollama's ``[host/][namespace/]model[:tag]``; None when ``ref`` is not such a name."""
    rest, tag = ref, _DEFAULT_TAG
    if ":" in ref.rsplit("/", 1)[-1]:
        rest, tag = ref.rsplit(":", 1)
    parts = rest.split("/")
    if len(parts) == 1:
        host, namespace, model = _DEFAULT_HOST, _DEFAULT_NAMESPACE, parts[0]
    elif len(parts) == 2:
        host, (namespace, model) = _DEFAULT_HOST, parts
    elif len(parts) == 3:
        host, namespace, model = parts
    else:
        return None
    ok = (
        _HOST_RE.fullmatch(host)
        and _NAMESPACE_RE.fullmatch(namespace)
        and _PART_RE.fullmatch(model)
        and _PART_RE.fullmatch(tag)
    )
    return OllamaName(host, namespace, model, tag) if ok else None


def ollama_stores() -> list[Path]:
    """Where Ollama keeps models: ``$OLLAMA_MODELS``, else the per-user store and the store of the
    Linux system service (which runs as the ``ollama`` user)."""
    env = os.environ.get("OLLAMA_MODELS")
    if env:
        return [Path(env).expanduser()]
    return [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def _ollama_blob(store: Path, manifest: Path, name: str) -> Path:
    """The model blob a manifest points to (manifest.Manifest in manifest/manifest.go: a Docker v2 manifest
    whose layer of media type application/vnd.ollama.image.model holds the GGUF)."""
    again = f"run `ollama pull {name}` to fetch it again"
    try:
        doc = json.loads(read_limited(manifest, _MAX_MANIFEST_BYTES, "Ollama manifest").decode("utf-8"))
    except VelollmError as e:
        raise VelollmError(f"{e}; {again}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VelollmError(f"the Ollama manifest {manifest} is not JSON ({e}); {again}") from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, dict) and layer.get("mediaType") == _MODEL_MEDIA_TYPE:
            match = _DIGEST_RE.fullmatch(str(layer.get("digest", "")))
            if match is None:
                raise VelollmError(f"the Ollama manifest {manifest} has a malformed model digest; {again}")
            blob = store / "blobs" / f"sha256-{match.group(1)}"
            if not blob.is_file():
                raise VelollmError(
                    f"the Ollama store at {store} lacks the weights of '{name}' ({blob.name}); run `ollama pull {name}`"
                )
            return blob
    if not isinstance(layers, list):
        raise VelollmError(f"the Ollama manifest {manifest} lists no layers; {again}")
    raise VelollmError(f"'{name}' has no GGUF weights (its manifest {manifest} has no model layer); pass a GGUF file")


def ollama_model_blob(name: OllamaName) -> Path:
    """The GGUF weights of ``name`` in the first Ollama store that has it."""
    stores = ollama_stores()
    for store in stores:
        manifest = store / "manifests" / name.host / name.namespace / name.model / name.tag
        if manifest.is_file():
            return _ollama_blob(store, manifest, str(name))
    where = " or ".join(str(s) for s in stores)
    raise VelollmError(
        f"model '{name}' not found in the Ollama store at {where}; run `ollama pull {name}` or pass a GGUF path"
    )


def list_ollama_models() -> list[tuple[str, Path]]:
    """(name, weights blob) of every model in the Ollama stores; broken entries are skipped."""
    found: list[tuple[str, Path]] = []
    for store in ollama_stores():
        manifests = store / "manifests"
        if not manifests.is_dir():
            continue
        for manifest in sorted(manifests.glob("*/*/*/*")):
            if not manifest.is_file():
                continue
            name = OllamaName(*manifest.relative_to(manifests).parts)
            try:
                found.append((str(name), _ollama_blob(store, manifest, str(name))))
            except VelollmError as e:
                log.debug("skipping Ollama model %s: %s", name, e)
    return found
