"""A Linux Ollama install for tests, as real as a machine without Ollama allows.

What ``scripts/install.sh`` and ``ollama create`` leave on a Linux machine, rebuilt under a temporary root
from the ollama/ollama sources at tag v0.33.0-rc2. install.sh unpacks into the directory above the first of
/usr/local/bin, /usr/bin and /bin on PATH, usually ``/usr/local``:

``usr/local/bin/ollama``
    A stand-in for the Go CLI that answers ``ollama --version`` / ``ollama -v`` exactly as
    ``versionHandler`` (``cmd/cmd.go``) does, asking the server ``envconfig.Host()`` names
    (``OLLAMA_HOST``) for its version. Every other command fails with one line saying it is a stand-in.
``usr/local/lib/ollama/llama-server``
    A real llama-server (the upstream build stands for Ollama's own, which is upstream llama.cpp with a
    small compat patch), where ``llm/llama_binary.go`` looks for it on Linux (``../lib/ollama`` from the
    executable's directory), with every llama.cpp shared library it loads copied beside it as Ollama ships
    ``libggml-base.so`` and friends (``llama/server/CMakeLists.txt``). A static build
    (``BUILD_SHARED_LIBS=OFF``, what velollm-patch builds) loads none, so then there are none.
``usr/share/ollama/.ollama/models``
    The model store of the system service (the ``ollama`` user's home is ``/usr/share/ollama``):
    ``manifests/<host>/<namespace>/<model>/<tag>`` and ``blobs/sha256-<hex>``, written the way
    ``ollama create`` writes them (``manifest.WriteManifest``, ``manifest.NewLayer``,
    ``createConfigLayer`` and ``detectChatTemplate`` in ``server/``): every blob is named by the
    sha256 of its bytes, JSON is encoded as Go's ``json.Encoder`` does (compact, ``<``/``>``/``&``
    escaped, a trailing newline), and a GGUF whose chat template Ollama recognises as ChatML gets
    Ollama's ``template/chatml.gotmpl`` and ``chatml.json`` stop words.

:func:`ollama_launch_kwargs` reads an Ollama server environment the way Ollama does when it starts a
llama-server, for :func:`tests.ollama_launch.start_like_ollama`; :data:`OLLAMA_SERVER_VARIABLES` is the
set of variables the Ollama server knows (``envconfig.AsMap``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fake_ollama import FakeModel
from velollm_patch.model import inspect_model
from velollm_patch.ollama.launch import OllamaOptions

# The release the install stands for (version.Version of the CLI stand-in); FakeOllama reports the same.
OLLAMA_VERSION = "0.33.0"

REGISTRY = "registry.ollama.ai"
LIBRARY = "library"

MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
TEMPLATE_MEDIA_TYPE = "application/vnd.ollama.image.template"
PARAMS_MEDIA_TYPE = "application/vnd.ollama.image.params"
LICENSE_MEDIA_TYPE = "application/vnd.ollama.image.license"

# template/chatml.gotmpl and template/chatml.json, byte for byte: what detectChatTemplate (server/model.go)
# stores for a GGUF whose tokenizer.chat_template is within 100 edits of one of index.json's ChatML entries,
# as SmolLM2's is.
CHATML_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)
CHATML_PARAMETERS: dict[str, Any] = {"stop": ["<|im_start|>", "<|im_end|>"]}
# A LICENSE the Modelfile gave (setLicense in server/create.go stores the text as it is); the first lines of
# SmolLM2's Apache-2.0, enough to be one.
APACHE_2_0 = "Apache License\nVersion 2.0, January 2004\nhttp://www.apache.org/licenses/\n"

# envconfig.AsMap() on Linux (envconfig/config.go): every variable the Ollama server reads and documents.
# Variables outside it reach Ollama's children (llama-server) only through the inherited environment.
OLLAMA_SERVER_VARIABLES = frozenset({
    "OLLAMA_DEBUG", "OLLAMA_DEBUG_LOG_REQUESTS", "OLLAMA_GO_TEMPLATE", "OLLAMA_FLASH_ATTENTION",
    "OLLAMA_KV_CACHE_TYPE", "OLLAMA_GPU_OVERHEAD", "OLLAMA_IGPU_ENABLE", "LLAMA_ARG_FIT", "LLAMA_ARG_FIT_TARGET",
    "OLLAMA_HOST", "OLLAMA_KEEP_ALIVE", "OLLAMA_LLM_LIBRARY", "OLLAMA_LOAD_TIMEOUT", "OLLAMA_MAX_LOADED_MODELS",
    "OLLAMA_MAX_TRANSFER_STREAMS", "OLLAMA_MAX_QUEUE", "OLLAMA_MODELS", "OLLAMA_NO_CLOUD", "OLLAMA_NOHISTORY",
    "OLLAMA_NOPRUNE", "OLLAMA_NUM_PARALLEL", "OLLAMA_ORIGINS", "OLLAMA_SCHED_SPREAD", "OLLAMA_CONTEXT_LENGTH",
    "OLLAMA_EDITOR", "OLLAMA_REMOTES", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
    "no_proxy", "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "GGML_VK_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL", "HSA_OVERRIDE_GFX_VERSION", "OLLAMA_VULKAN",
})

# The shared libraries a llama.cpp build produces (the rest of what ldd lists is the system's).
_LLAMA_LIBRARY = re.compile(r"lib(?:llama|ggml|mtmd)[\w.+-]*\.so(?:\.[\d.]+)?")


def go_json(value: Any) -> bytes:
    """``value`` as Go's ``json.NewEncoder(w).Encode`` writes it: compact, UTF-8, HTML-safe escapes for
    ``<``, ``>``, ``&`` (and U+2028/U+2029), then a newline. Dicts keep their order, which is the struct
    field order for the structs written here."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return (text + "\n").encode("utf-8")


def human_number(n: int) -> str:
    """format.HumanNumber (format/format.go): what ``ollama show`` calls the parameter size."""
    for unit, scale, decimals in (("B", 1_000_000_000, 1), ("M", 1_000_000, 2)):
        if n >= scale:
            number = n / scale
            return f"{number:.0f}{unit}" if number == int(number) else f"{number:.{decimals}f}{unit}"
    return f"{n / 1000:.0f}K" if n >= 1000 else str(n)


@dataclass(frozen=True)
class Layer:
    """A manifest layer (manifest.Layer): its media type, ``sha256:<hex>`` digest and size."""

    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def blob_path(store: Path, digest: str) -> Path:
    """manifest.BlobsPath: ``sha256:<hex>`` is stored as ``blobs/sha256-<hex>``."""
    return store / "blobs" / digest.replace(":", "-")


def _store_bytes(store: Path, data: bytes, media_type: str) -> Layer:
    """manifest.NewLayer for bytes: named by their sha256, mode 0644."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(store, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
        path.chmod(0o644)
    return Layer(media_type, digest, len(data))


def _store_file(store: Path, source: Path, media_type: str) -> Layer:
    """manifest.NewLayer for a file: hard-linked into the store where the file system allows (a GGUF is
    hundreds of MiB and the blob holds the same bytes), copied otherwise."""
    sha = hashlib.sha256()
    with source.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    digest = "sha256:" + sha.hexdigest()
    path = blob_path(store, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        try:
            os.link(source, path)
        except OSError:
            shutil.copyfile(source, path)
            path.chmod(0o644)
    return Layer(media_type, digest, source.stat().st_size)


@dataclass(frozen=True)
class StoredModel:
    """One model in an Ollama store."""

    name: str
    """As Ollama shows it (``smollm2:135m``)."""
    store: Path
    manifest: Path
    config: Layer
    layers: tuple[Layer, ...]

    def blob(self, media_type: str = MODEL_MEDIA_TYPE) -> Path:
        """The blob of the first layer of ``media_type`` (default: the weights)."""
        layer = next(layer for layer in self.layers if layer.media_type == media_type)
        return blob_path(self.store, layer.digest)

    @property
    def weights(self) -> Path:
        return self.blob()

    def config_json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(blob_path(self.store, self.config.digest).read_bytes())
        return data


def add_model(store: Path, name: str, gguf: Path, *, license_text: str | None = APACHE_2_0) -> StoredModel:
    """Put ``gguf`` into ``store`` as ``name`` (``model:tag`` or ``namespace/model:tag``), as ``ollama create``
    from a Modelfile ``FROM <gguf>`` (plus ``LICENSE`` when ``license_text`` is given) writes it."""
    path, _, tag = name.partition(":")
    namespace, _, model = path.rpartition("/")
    namespace, tag = namespace or LIBRARY, tag or "latest"
    info = inspect_model(gguf)
    layers = [_store_file(store, gguf, MODEL_MEDIA_TYPE)]
    parameters = None
    if info.chat_template and "<|im_start|>" in info.chat_template:
        layers.append(_store_bytes(store, CHATML_TEMPLATE.encode(), TEMPLATE_MEDIA_TYPE))
        parameters = CHATML_PARAMETERS
    if license_text is not None:
        layers.append(_store_bytes(store, license_text.encode(), LICENSE_MEDIA_TYPE))
    if parameters is not None:
        # setParameters re-encodes the params layer last (server/create.go).
        layers.append(_store_bytes(store, go_json(parameters), PARAMS_MEDIA_TYPE))
    # model.ConfigV2 (types/model/config.go) as createModel fills it for a GGUF: empty omitempty fields left
    # out, OS and Architecture as CreateHandler sets them.
    config = {
        "model_format": "gguf",
        "model_family": info.architecture,
        "model_families": [info.architecture],
        "model_type": human_number(info.n_params),
        # KV.FileType (fs/ggml/ggml.go) takes general.file_type 0 (all F32) for "not set": "unknown".
        "file_type": "unknown" if info.file_type in (None, "F32") else info.file_type,
        "architecture": "amd64",
        "os": "linux",
    }
    config_layer = _store_bytes(store, go_json(config), CONFIG_MEDIA_TYPE)
    manifest = store / "manifests" / REGISTRY / namespace / model / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_bytes(go_json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config_layer.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }))
    shown = name if ":" in name else f"{name}:latest"
    return StoredModel(shown, store, manifest, config_layer, tuple(layers))


# The `ollama` stand-in. envconfig.Host() and versionHandler transcribed; it must not import velollm_patch,
# whose own OLLAMA_HOST parsing is what the tests check against it.
_OLLAMA_SCRIPT = r'''#!{python}
"""Stand-in for the ollama {version} CLI of a fake install made by velollm-patch's tests."""
import ipaddress
import json
import os
import sys
import urllib.request

VERSION = "{version}"


def host():
    # envconfig.Host (envconfig/config.go)
    s = os.environ.get("OLLAMA_HOST", "").strip().strip("\"'")
    default_port = "11434"
    scheme, sep, hostport = s.partition("://")
    if not sep:
        scheme, hostport = "http", s
        if s == "ollama.com":
            scheme, hostport = "https", "ollama.com:443"
    elif scheme == "http":
        default_port = "80"
    elif scheme == "https":
        default_port = "443"
    hostport, _, path = hostport.partition("/")
    name, port = None, None
    if hostport.startswith("["):
        end = hostport.find("]")
        if end > 0 and hostport[end + 1:end + 2] == ":":
            name, port = hostport[1:end], hostport[end + 2:]
    elif hostport.count(":") == 1:
        name, port = hostport.split(":")
    if name is None:
        name, port = "127.0.0.1", default_port
        try:
            name = str(ipaddress.ip_address(hostport.strip("[]")))
        except ValueError:
            if hostport:
                name = hostport
    if not port.isdigit() or int(port) > 65535:
        port = default_port
    if ":" in name:
        name = "[" + name + "]"
    return scheme + "://" + name + ":" + port + ("/" + path if path else "")


def server_version():
    try:
        with urllib.request.urlopen(host() + "/api/version", timeout=5) as response:
            return str(json.load(response).get("version", ""))
    except Exception:
        return None


def main(argv):
    if argv in (["-v"], ["--version"]):
        # versionHandler (cmd/cmd.go)
        reported = server_version()
        if reported is None:
            print("Warning: could not connect to a running Ollama instance")
        if reported:
            print("ollama version is " + reported)
        if reported != VERSION:
            print("Warning: client version is " + VERSION)
        return 0
    print("Error: this ollama is a test stand-in; it only answers --version", file=sys.stderr)
    return 1


sys.exit(main(sys.argv[1:]))
'''


def write_ollama_cli(path: Path, version: str = OLLAMA_VERSION) -> Path:
    """The ``ollama`` stand-in at ``path``: an executable answering ``--version``/``-v`` as ``ollama`` ``version``
    does (it runs with this interpreter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_OLLAMA_SCRIPT.format(python=sys.executable, version=version))
    path.chmod(0o755)
    return path


def _llama_libraries(server: Path) -> list[Path]:
    """The llama.cpp shared libraries ``server`` loads, per ldd (none for a static build)."""
    result = subprocess.run(["ldd", str(server)], capture_output=True, text=True, check=False, timeout=60)
    found: list[Path] = []
    for line in result.stdout.splitlines():
        name, arrow, where = line.strip().partition(" => ")
        location = where.split(" (", 1)[0].strip()
        if arrow and _LLAMA_LIBRARY.fullmatch(name):
            source = server.parent / name if location == "not found" else Path(location)
            found.append(source.resolve())
    return found


@dataclass(frozen=True)
class FakeOllamaInstall:
    root: Path
    version: str
    models: tuple[StoredModel, ...]

    @property
    def prefix(self) -> Path:
        """What install.sh installs into (``/usr/local``): ``bin/ollama`` and ``lib/ollama``."""
        return self.root / "usr" / "local"

    @property
    def ollama(self) -> Path:
        return self.prefix / "bin" / "ollama"

    @property
    def lib_dir(self) -> Path:
        return self.prefix / "lib" / "ollama"

    @property
    def server(self) -> Path:
        return self.lib_dir / "llama-server"

    @property
    def libraries(self) -> tuple[Path, ...]:
        return tuple(sorted(p for p in self.lib_dir.iterdir() if _LLAMA_LIBRARY.fullmatch(p.name)))

    @property
    def store(self) -> Path:
        return self.root / "usr" / "share" / "ollama" / ".ollama" / "models"

    def model(self, name: str) -> StoredModel:
        return next(m for m in self.models if m.name == name)

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with the install's ``ollama`` first on PATH and its
        store as OLLAMA_MODELS (the service finds it as its user's ``~/.ollama/models``, which a test is not)."""
        env = dict(os.environ if base is None else base)
        path = [p for p in env.get("PATH", "").split(os.pathsep) if p]
        env["PATH"] = os.pathsep.join([str(self.ollama.parent), *path])
        env["OLLAMA_MODELS"] = str(self.store)
        return env


def make_fake_install(
    root: Path, server: Path, models: Sequence[tuple[str, Path]], *, version: str = OLLAMA_VERSION,
) -> FakeOllamaInstall:
    """An Ollama install under ``root`` whose bundled llama-server is a copy of ``server`` and whose store
    holds ``models`` ((name, GGUF) pairs)."""
    install = FakeOllamaInstall(root, version, ())
    write_ollama_cli(install.ollama, version)
    install.lib_dir.mkdir(parents=True)
    shutil.copy2(server, install.server)
    for library in _llama_libraries(server):
        shutil.copy2(library, install.lib_dir / library.name)
    stored = tuple(add_model(install.store, name, gguf) for name, gguf in models)
    return FakeOllamaInstall(root, version, stored)


def api_model(stored: StoredModel, *, context_length: int = OllamaOptions().num_ctx) -> FakeModel:
    """``stored`` as tests.fake_ollama serves it: /api/show's details from the config blob, its
    ``model_info`` from the GGUF's keys (what ``ollama show`` reports for it) and its template and stop
    words from their layers; /api/ps sizes from the weights at ``context_length``."""
    config = stored.config_json()
    info = inspect_model(stored.weights)
    arch = info.architecture
    kv_heads: int | list[int] = list(info.n_head_kv)
    if len(set(info.n_head_kv)) == 1:
        kv_heads = info.n_head_kv[0]
    model_info: dict[str, Any] = {
        "general.architecture": arch, "general.parameter_count": info.n_params,
        f"{arch}.block_count": info.n_layers, f"{arch}.context_length": info.n_ctx_train,
        f"{arch}.embedding_length": info.n_embd, f"{arch}.attention.head_count": info.n_head,
        f"{arch}.attention.head_count_kv": kv_heads,
    }
    if info.head_dim_k != info.n_embd // info.n_head or info.head_dim_v != info.head_dim_k:
        model_info[f"{arch}.attention.key_length"] = info.head_dim_k
        model_info[f"{arch}.attention.value_length"] = info.head_dim_v
    template = ""
    parameters: list[str] = []
    for layer in stored.layers:
        data = blob_path(stored.store, layer.digest).read_bytes() if layer.size < 1 << 20 else b""
        if layer.media_type == TEMPLATE_MEDIA_TYPE:
            template = data.decode()
        elif layer.media_type == PARAMS_MEDIA_TYPE:
            for key, value in json.loads(data).items():
                for item in value if isinstance(value, list) else [value]:
                    shown = json.dumps(item) if isinstance(item, str) else str(item)
                    parameters.append(f"{key:<30} {shown}")
    kv_bytes = context_length * sum(info.n_head_kv) * (info.head_dim_k + info.head_dim_v) * 2
    size = info.file_size + kv_bytes
    return FakeModel(
        name=stored.name, template=template, parameters="\n".join(parameters), model_info=model_info,
        family=str(config["model_family"]), parameter_size=str(config["model_type"]),
        quantization_level=str(config["file_type"]), size=size, size_vram=0, context_length=context_length,
    )


def _go_bool(value: str) -> bool | None:
    """strconv.ParseBool, None where it fails."""
    word = value.strip().strip("\"'")
    if word in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if word in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def ollama_launch_kwargs(environment: Mapping[str, str], *, n_ctx_train: int | None = None) -> dict[str, Any]:
    """The :func:`tests.ollama_launch.start_like_ollama` arguments an Ollama server running in
    ``environment`` gives a model (trained for ``n_ctx_train`` tokens) on a machine without a GPU.

    - ``OLLAMA_CONTEXT_LENGTH``: the default ``num_ctx`` (api.DefaultOptions, ``api/types.go``), capped at
      the trained context by NewLlamaServer (``llm/server.go``); unset or 0, 4096 below 24 GiB of VRAM.
    - ``OLLAMA_NUM_PARALLEL``: slots, at least 1 (``server/sched.go``).
    - ``OLLAMA_KV_CACHE_TYPE``: lower-cased, passed unchecked (NewLlamaServer).
    - ``OLLAMA_FLASH_ATTENTION``: ``on``/``off`` where it parses as a bool (envconfig.BoolWithDefault counts
      an unparsable value as true), ``auto`` when unset (LlamaServerFlashAttention, ``llm/llama_server.go``).
    """
    def var(name: str) -> str:
        return environment.get(name, "").strip().strip("\"'")

    num_ctx = OllamaOptions().num_ctx
    if var("OLLAMA_CONTEXT_LENGTH").isdigit() and int(var("OLLAMA_CONTEXT_LENGTH")) > 0:
        num_ctx = int(var("OLLAMA_CONTEXT_LENGTH"))
    if n_ctx_train:
        num_ctx = min(num_ctx, n_ctx_train)
    parallel = int(var("OLLAMA_NUM_PARALLEL")) if var("OLLAMA_NUM_PARALLEL").isdigit() else 1
    flash: bool | None = None
    if "OLLAMA_FLASH_ATTENTION" in environment and var("OLLAMA_FLASH_ATTENTION"):
        parsed = _go_bool(var("OLLAMA_FLASH_ATTENTION"))
        flash = True if parsed is None else parsed
    return {
        "options": OllamaOptions(num_ctx=num_ctx),
        "num_parallel": max(parallel, 1),
        "kv_cache_type": var("OLLAMA_KV_CACHE_TYPE").lower(),
        "flash_attention": flash,
    }
