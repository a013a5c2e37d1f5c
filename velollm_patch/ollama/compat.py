"""Models in Ollama's store that only Ollama's own llama.cpp can load.

Ollama 0.30+ builds llama-server with ``llama/compat/``: hooks in llama.cpp's model loader that translate GGUF
blobs Ollama published in its own layout (before it ran upstream llama.cpp) in memory, at load. A llama-server
without that layer fails on them ("unknown model architecture", "wrong number of tensors", a missing key, a
tensor of the wrong shape) or, for one Llama 3 case, loads but does not stop generating. So before our server
replaces Ollama's, the store is searched for such blobs.

The markers are transcribed from the ``detect_ollama_*`` functions and the dispatch in ``translate_metadata``
and ``translate_clip_metadata`` of ``llama/compat/llama-ollama-compat.cpp`` at ollama/ollama v0.33.0-rc2
(fb30760). A file matching none of them is one the layer leaves alone (its README: "Files that do not match a
supported published-model marker are left unchanged"), so upstream llama.cpp reads it as Ollama's does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from velollm_patch.errors import VelollmError
from velollm_patch.model import GGUFLayout, read_gguf_layout

log = logging.getLogger("velollm_patch.ollama.compat")

COMPAT_SOURCE = "ollama/ollama v0.33.0-rc2, llama/compat/llama-ollama-compat.cpp"

# The manifest layers that hold GGUFs llama-server loads: the weights (--model), a projector (--mmproj) and a
# DRAFT (--spec-draft-model); media types from server/create.go and manifest/layer.go.
GGUF_MEDIA_TYPES = (
    "application/vnd.ollama.image.model",
    "application/vnd.ollama.image.projector",
    "application/vnd.ollama.image.draft",
)

_Marker = tuple[bool, str]


def _first(markers: Iterable[_Marker]) -> str | None:
    return next((what for present, what in markers if present), None)


def _embedded(g: GGUFLayout, *prefixes: str) -> _Marker:
    found = [p for p in prefixes if g.has_tensor_prefix(p)]
    return bool(found), "embedded " + ", ".join(f"{p}* tensors" for p in found)


def _keys(g: GGUFLayout, *keys: str) -> _Marker:
    found = [k for k in keys if g.has(k)]
    return bool(found), ", ".join(found) + (" keys" if len(found) > 1 else " key")


def _gemma3(g: GGUFLayout) -> str | None:
    # detect_ollama_embeddinggemma, then detect_ollama_gemma3
    if "dense.0.weight" in g.tensors:
        return "EmbeddingGemma with dense.0/dense.1 tensors (llama.cpp loads it as gemma-embedding)"
    return _first((
        _embedded(g, "v.", "mm."),
        _keys(g, "gemma3.mm.tokens_per_image", "gemma3.rope.global.freq_base", "gemma3.rope.local.freq_base",
              "tokenizer.ggml.add_padding_token", "tokenizer.ggml.add_unknown_token"),
        (not g.has("gemma3.attention.layer_norm_rms_epsilon"), "no gemma3.attention.layer_norm_rms_epsilon"),
    ))


def _gemma3n(g: GGUFLayout) -> str | None:
    embd, per_layer = g.tensors.get("token_embd.weight"), g.tensors.get("per_layer_token_embd.weight")
    if embd and per_layer and len(embd) > 1 and len(per_layer) > 1 and embd[1] != per_layer[1]:
        return f"token_embd has {embd[1]} rows but per_layer_token_embd {per_layer[1]}"
    return None


def _bert(g: GGUFLayout) -> str | None:
    # handle_snowflake_arctic_embed2: the charsmap as base64 characters, where llama.cpp wants bytes
    if g.string("tokenizer.ggml.model") == "t5" and g.is_string_array("tokenizer.ggml.precompiled_charsmap"):
        return "tokenizer.ggml.precompiled_charsmap stored as base64 strings (Snowflake Arctic Embed 2)"
    return None


def _gemma4(g: GGUFLayout) -> str | None:
    return _first((
        _embedded(g, "a.", "v.", "mm.", "model.vision_tower."),
        (g.string("tokenizer.ggml.model") == "llama", "tokenizer.ggml.model llama"),
    ))


def _qwen35(arch: str) -> Callable[[GGUFLayout], str | None]:
    keys = [f"{arch}.vision.block_count", f"{arch}.image_token_id", f"{arch}.ssm.v_head_reordered",
            f"{arch}.rope.mrope_interleaved"]
    if arch == "qwen35moe":
        keys.append("qwen35moe.feed_forward_length")
    return lambda g: _first((_keys(g, *keys), _embedded(g, "mtp.", "v.")))


def _qwen3next(g: GGUFLayout) -> str | None:
    dt = [name for name in g.tensors if name.endswith(".ssm_dt")]
    return f"SSM tensors named {dt[0]} (llama.cpp reads .ssm_dt.bias)" if dt else None


def _laguna(g: GGUFLayout) -> str | None:
    return _first((
        _keys(g, "laguna.rope.swa.dimension_count", "laguna.rope.swa.freq_base"),
        ("blk.0.attn_g.weight" in g.tensors, "attention gates named attn_g"),
    ))


def _lfm2(g: GGUFLayout) -> str | None:
    if "output_norm.weight" in g.tensors and "token_embd_norm.weight" not in g.tensors:
        return "output_norm.weight where llama.cpp reads token_embd_norm.weight"
    return None


def _mistral3(g: GGUFLayout) -> str | None:
    return _first((
        _embedded(g, "v.", "mm."),
        _keys(g, "mistral3.rope.scaling.beta_fast", "mistral3.rope.scaling.mscale_all_dim",
              "mistral3.rope.scaling_beta"),
    ))


def _qwen3vl(arch: str) -> Callable[[GGUFLayout], str | None]:
    key = f"{arch}.rope.dimension_sections"
    return lambda g: None if g.has(key) else f"no {key}"


def _nemotron_h_moe(g: GGUFLayout) -> str | None:
    latent = "blk.0.ffn_latent_in" if g.has_tensor_prefix("blk.0.ffn_latent_in") else "blk.1.ffn_latent_in"
    return _first((
        (g.has_tensor_prefix(latent), "latent FFN tensors named ffn_latent_in/out"),
        _embedded(g, "mtp."),
    ))


def _llama(g: GGUFLayout) -> str | None:
    # detect_ollama_llama3_metadata_gap: a Llama 3 vocabulary whose metadata never names <|eot_id|> as the end
    if g.token_text(128009) != b"<|eot_id|>":
        return None
    template = g.string("tokenizer.chat_template") or ""
    chat = (g.token_text(128006) == b"<|start_header_id|>"
            or "<|start_header_id|>" in template or "<|eot_id|>" in template)
    pre = g.fields.get("tokenizer.ggml.pre")
    no_pre = pre is None or pre in ("", "default")
    if chat and (no_pre or g.uint("tokenizer.ggml.eos_token_id") == 128001):
        what = "no tokenizer.ggml.pre" if no_pre else "EOS <|end_of_text|>"
        return f"Llama 3 chat vocabulary with {what}: llama-server would not stop at <|eot_id|>"
    return None


def _embedded_only(*prefixes: str) -> Callable[[GGUFLayout], str | None]:
    return lambda g: _first((_embedded(g, *prefixes),))


def _renamed(upstream: str) -> Callable[[GGUFLayout], str | None]:
    return lambda g: f"Ollama's architecture name (llama.cpp knows it as {upstream})"


def _clip(g: GGUFLayout) -> str | None:
    # needs_default_llava_projector_type (translate_clip_metadata)
    if g.fields.get("clip.has_vision_encoder") is True and not (
            g.has("clip.projector_type") or g.has("clip.vision.projector_type")):
        return "a LLaVA projector without clip.projector_type"
    return None


# general.architecture -> the detector for it (translate_metadata's dispatch, plus the clip side).
_DETECTORS: dict[str, Callable[[GGUFLayout], str | None]] = {
    "gemma3": _gemma3,
    "bert": _bert,
    "gemma3n": _gemma3n,
    "gemma4": _gemma4,
    "qwen35moe": _qwen35("qwen35moe"),
    "qwen35": _qwen35("qwen35"),
    "qwen3next": _qwen3next,
    "laguna": _laguna,
    "gptoss": _renamed("gpt-oss"),
    "lfm2": _lfm2,
    "olmo3": _renamed("olmo2"),
    "mistral3": _mistral3,
    "qwen25vl": _renamed("qwen2vl"),
    "qwen3vl": _qwen3vl("qwen3vl"),
    "qwen3vlmoe": _qwen3vl("qwen3vlmoe"),
    "glm4moelite": _renamed("deepseek2"),
    "deepseekocr": _renamed("deepseek2-ocr"),
    "nemotron_h_omni": _embedded_only("v.", "a.", "mm."),
    "nemotron_h_moe": _nemotron_h_moe,
    "llama": _llama,
    "llama4": _embedded_only("v.", "mm."),
    "glmocr": _renamed("glm4"),
    "clip": _clip,
}


def compat_reason(path: Path) -> str | None:
    """Why ``path`` needs Ollama's compat layer ("<arch> in Ollama's layout: <marker>"), or None."""
    layout = read_gguf_layout(path)
    arch = layout.string("general.architecture")
    detector = _DETECTORS.get(arch or "")
    marker = detector(layout) if detector else None
    return f"{arch} in Ollama's layout: {marker}" if marker else None


@dataclass(frozen=True)
class CompatModel:
    name: str  # "gemma3:4b"; a projector or draft says so: "llava:7b (projector)"
    blob: Path
    reason: str


@dataclass(frozen=True)
class StoreScan:
    needs_compat: tuple[CompatModel, ...]
    unreadable: tuple[str, ...]  # what could not be checked, and why


def _model_name(manifests: Path, manifest: Path) -> str:
    host, namespace, model, tag = manifest.relative_to(manifests).parts
    short = f"{model}:{tag}"
    if host != "registry.ollama.ai":
        return f"{host}/{namespace}/{short}"
    return short if namespace == "library" else f"{namespace}/{short}"


def _layers(manifest: Path) -> list[tuple[str, str]]:
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    layers = doc.get("layers") if isinstance(doc, dict) else None
    found = []
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, dict) and layer.get("mediaType") in GGUF_MEDIA_TYPES:
            digest = str(layer.get("digest", ""))
            if digest.startswith("sha256:"):
                found.append((str(layer["mediaType"]).rsplit(".", 1)[-1], digest.removeprefix("sha256:")))
    return found


def scan_stores(stores: Sequence[Path]) -> StoreScan:
    """Every GGUF the models in ``stores`` load (weights, projector, draft), checked with :func:`compat_reason`.
    A blob shared by several models is read once. What cannot be read is listed, not guessed at."""
    needs: list[CompatModel] = []
    unreadable: list[str] = []
    verdicts: dict[Path, str | None] = {}
    for store in stores:
        manifests = store / "manifests"
        try:
            if not manifests.is_dir():
                continue
            paths = sorted(p for p in manifests.glob("*/*/*/*") if p.is_file())
        except OSError as exc:
            unreadable.append(f"{manifests} ({exc.strerror or exc})")
            continue
        for manifest in paths:
            name = _model_name(manifests, manifest)
            try:
                layers = _layers(manifest)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                unreadable.append(f"{name} ({exc})")
                continue
            for kind, digest in layers:
                blob = store / "blobs" / f"sha256-{digest}"
                label = name if kind == "model" else f"{name} ({kind})"
                if blob not in verdicts:
                    try:
                        verdicts[blob] = compat_reason(blob)
                    except VelollmError as exc:
                        log.debug("cannot check %s: %s", blob, exc)
                        unreadable.append(f"{label} ({exc})")
                        continue
                reason = verdicts[blob]
                if reason:
                    needs.append(CompatModel(label, blob, reason))
    return StoreScan(tuple(needs), tuple(unreadable))
