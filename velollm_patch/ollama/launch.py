"""How Ollama starts llama-server for a GGUF model: the argument list and environment, transcribed.

Source: ollama/ollama at fb30760 (tag v0.33.0-rc2, LLAMA_CPP_VERSION b10488), ``llm/llama_server.go``:
``startLlamaServer`` builds the arguments in this order (``appendLlamaServerLogArgs``, ``appendJinjaArgs``,
``appendMMProjArgs``, ``appendDraftArgs``, ``qwenVLServerArgs``, ``--lora``, ``appendLoadModeArgs``,
``--cache-type-k/-v``, ``appendFlashAttentionArgs``, ``appendBatchArgs``, ``-ngl``, ``-t``,
``appendMainGPUArgs``, ``appendContextShiftArgs``) and ``SetupLlamaServerCommandEnv`` passes Ollama's whole
environment on, with ``LD_LIBRARY_PATH`` led by the server's own directory. The option defaults are
``api.DefaultOptions`` (``api/types.go``); ``NewLlamaServerRunner`` picks the draft type
(``externalDraftType``: ``draft-dflash`` for a dflash GGUF, else ``draft-mtp``) and
``server/routes.go`` ``llamaServerConfigForModel`` sets ``DisableJinja`` for models Ollama renders itself.

Only what a CPU-only machine and a text model reach is transcribed: no projector, LoRA, main GPU or
integrated-GPU direct I/O. The tests and benchmarks start servers with :func:`start_like_ollama` to meet exactly
what a real Ollama would send; a change of Ollama's launch is a change here, with the new tag.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from velollm_patch import serve
from velollm_patch.model import inspect_model

OLLAMA_SOURCE = "ollama/ollama v0.33.0-rc2 (fb30760), llm/llama_server.go"


@dataclass(frozen=True)
class OllamaOptions:
    """The ``api.Options`` runner fields that reach the command line, with ``api.DefaultOptions`` values."""

    num_ctx: int = 4096  # envconfig.ContextLength() is 0: Ollama picks 4k below 24 GiB of VRAM (and on CPUs)
    num_batch: int = 512
    num_gpu: int = -1  # -1: not passed, llama-server decides
    num_thread: int = 0  # 0: not passed
    num_keep: int = 4
    draft_num_predict: int = 4
    use_mmap: bool | None = None  # False: --load-mode none


def draft_type(draft: Path) -> str:
    """``externalDraftType``: a DRAFT is a dflash draft when its architecture says so, else an MTP draft."""
    return "draft-dflash" if inspect_model(draft).architecture == "dflash" else "draft-mtp"


def ollama_argv(
    model: Path, port: int, options: OllamaOptions = OllamaOptions(), *, num_parallel: int = 1,
    draft: Path | None = None, kv_cache_type: str = "", flash_attention: bool | None = None,
    disable_jinja: bool = True, context_shift: bool = True,
) -> list[str]:
    """The arguments after the executable, in Ollama's order. ``kv_cache_type`` is ``OLLAMA_KV_CACHE_TYPE``
    (lower-cased, unvalidated), ``flash_attention`` is ``OLLAMA_FLASH_ATTENTION`` (None: unset, so ``auto``
    on devices that support it, which CPUs do)."""
    args = [
        "--model", str(model), "--port", str(port), "--host", "127.0.0.1", "--no-webui", "--offline",
        "-c", str(options.num_ctx * num_parallel), "-np", str(num_parallel),
        "--log-verbosity", "4", "--no-log-prefix", "--no-log-timestamps",
    ]
    if disable_jinja:
        args += ["--no-jinja", "--chat-template", "chatml"]
    if draft is not None and options.draft_num_predict > 0:
        kind = draft_type(draft)
        args += ["--spec-type", kind, "--spec-draft-n-max", str(options.draft_num_predict)]
        if kind == "draft-mtp":
            args.append("--spec-draft-backend-sampling")
        args += ["--spec-draft-model", str(draft)]
    if options.use_mmap is False:
        args += ["--load-mode", "none"]
    if kv_cache_type:
        args += ["--cache-type-k", kv_cache_type.lower(), "--cache-type-v", kv_cache_type.lower()]
    args += ["--flash-attn", {None: "auto", True: "on", False: "off"}[flash_attention]]
    if options.num_batch > 0:
        args += ["-b", str(options.num_batch), "-ub", str(options.num_batch)]
    if options.num_gpu >= 0:
        args += ["-ngl", str(options.num_gpu)]
    if options.num_thread > 0:
        args += ["-t", str(options.num_thread)]
    if context_shift:
        args.append("--context-shift")
        if options.num_keep > 0:
            args += ["--keep", str(options.num_keep)]
    return args


def ollama_env(server: Path, inherited: Mapping[str, str]) -> dict[str, str]:
    """``SetupLlamaServerCommandEnv`` on a CPU-only machine: Ollama's environment, a fresh media marker, and
    ``LD_LIBRARY_PATH`` led by the server's directory."""
    env = dict(inherited)
    env["LLAMA_MEDIA_MARKER"] = f"<__media_{secrets.token_hex(8)}__>"
    library_path = [str(server.parent), *(p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dict.fromkeys(library_path))
    return env


def start_like_ollama(
    server: Path, model: Path, log_file: Path, options: OllamaOptions = OllamaOptions(), *,
    draft: Path | None = None, num_parallel: int = 1, kv_cache_type: str = "", flash_attention: bool | None = None,
    ollama_environment: Mapping[str, str] | None = None, timeout: float = 300,
) -> serve.RunningServer:
    """Start ``server`` as Ollama would for ``model``: exactly :func:`ollama_argv`, in :func:`ollama_env`,
    with ``ollama_environment`` (default: this process's) as the environment Ollama itself runs in."""
    port = serve.free_port()
    argv = ollama_argv(model, port, options, num_parallel=num_parallel, draft=draft, kv_cache_type=kv_cache_type,
                       flash_attention=flash_attention)
    env = ollama_env(server, os.environ if ollama_environment is None else ollama_environment)
    config = serve.ServerConfig(binary=server, model=model, env=env, port=port, log_file=log_file)
    return serve.start_server(config, argv=argv, timeout=timeout)
