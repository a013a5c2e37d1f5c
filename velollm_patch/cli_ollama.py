"""``velollm-patch ollama ...``: thin commands over :mod:`velollm_patch.ollama`.

Every decision lives in the library; these commands gather inputs from options, the
environment and a running server, call it, and print. Failures are :class:`VelollmError`
one-liners that the top-level CLI prints.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import click
import psutil

from velollm_patch import hardware, tune
from velollm_patch.builds import current_build
from velollm_patch.errors import VelollmError
from velollm_patch.ollama.api import OllamaClient
from velollm_patch.ollama.config import (
    GIB,
    SYSTEMD_DROPIN_DIR,
    ConfigFormat,
    ConfigPlan,
    CurrentState,
    KeyChanges,
    RecommendationInputs,
    apply_config,
    collect_current,
    default_config_path,
    recommend,
)
from velollm_patch.ollama.modelfile import ModelfileRequest, compose_modelfile, render_modelfile
from velollm_patch.ollama.parser import lint_modelfile, read_modelfile
from velollm_patch.ollama.server_swap import default_prefix, install_server, restore_server
from velollm_patch.ollama.versions import OllamaVersion
from velollm_patch.paths import get_paths


@click.group("ollama")
def ollama() -> None:
    """Tune Ollama: Modelfiles, server settings, and our llama-server under Ollama."""


def _version_option(value: str | None) -> str | None:
    return str(OllamaVersion.parse(value)) if value else None


def _tuner_plan(model: str, request: tune.TuneRequest) -> tune.Plan:
    """The tuner's plan for ``model`` on this machine with the current build. A Modelfile outlives the moment it
    is written in, so its threads are not cut for a load that happens to run while it is made (``machine``
    dedicated unless the request says shared)."""
    paths = get_paths()
    build = current_build(paths)
    if build is None:
        raise VelollmError("--tuned reads the installed llama-server's flags: run `velollm-patch build` first")
    if request.machine == "auto":
        request = replace(request, machine="dedicated")
    return tune.plan_for(model, hardware.detect(build_dir=paths.cache), build, paths, request)


@ollama.command("modelfile")
@click.argument("model")
@click.option("--num-ctx", type=click.IntRange(min=1), help="Context window per request slot.")
@click.option("--num-batch", type=click.IntRange(min=1), help="Prompt batch size.")
@click.option("--num-thread", type=click.IntRange(min=0), help="CPU threads (0: automatic).")
@click.option("--num-gpu", type=click.IntRange(min=-1), help="Layers on the GPU (-1: automatic).")
@click.option("--draft", type=click.Path(exists=True, path_type=Path),
              help="Draft model file or directory for speculative decoding (Ollama 0.23.1+).")
@click.option("--draft-num-predict", type=click.IntRange(min=0),
              help="Tokens the draft proposes per step (Ollama 0.30+).")
@click.option("--ollama-version", help="Ollama release the Modelfile is for (default: the server's,"
              " else the newest known).")
@click.option("--from-server", "server", is_flag=False, flag_value="", default=None, metavar="[URL]",
              help="Carry TEMPLATE, SYSTEM, stop values and parameters over from MODEL on this server"
              " (without URL: OLLAMA_HOST).")
@click.option("--tuned", is_flag=True, help="Start from the tuner's plan for MODEL on this machine (the options"
              " above override it); MODEL is then an Ollama model name or a GGUF path.")
@click.option("--profile", type=click.Choice(tune.PROFILES),
              help="Tuner profile (implies --tuned; default: balanced).")
@click.option("--workload", type=click.Choice(tune.WORKLOADS),
              help="Tuner workload (implies --tuned; default: chat).")
@click.option("--ollama-prefix", type=click.Path(file_okay=False, path_type=Path),
              help="The Ollama install whose llama-server decides whether a classic DRAFT loads (default: the"
              " ollama on PATH).")
@click.option("--comment", "comments", multiple=True, help="A comment line for the top of the file.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here instead of stdout.")
def modelfile_cmd(
    model: str, num_ctx: int | None, num_batch: int | None, num_thread: int | None,
    num_gpu: int | None, draft: Path | None, draft_num_predict: int | None,
    ollama_version: str | None, server: str | None, tuned: bool, profile: str | None, workload: str | None,
    ollama_prefix: Path | None, comments: tuple[str, ...], output: Path | None,
) -> None:
    """Write a Modelfile deriving from MODEL with the tuner's settings (--tuned) or the given ones."""
    request = ModelfileRequest(
        model,
        parameters={name: value for name, value in (
            ("num_ctx", num_ctx), ("num_batch", num_batch), ("num_thread", num_thread),
            ("num_gpu", num_gpu), ("draft_num_predict", draft_num_predict),
        ) if value is not None},
        draft=draft, ollama_version=_version_option(ollama_version), ollama_prefix=ollama_prefix, comments=comments,
    )
    tuned_plan = None
    if tuned or profile or workload:
        wanted = tune.TuneRequest(profile=profile or "balanced", workload=workload or "chat")
        tuned_plan = partial(_tuner_plan, model, wanted)
    with OllamaClient(server or None) if server is not None else nullcontext() as client:
        spec = compose_modelfile(request, server=client, tuned=tuned_plan)
    text = render_modelfile(spec)
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise VelollmError(f"cannot write {output}: {exc.strerror or exc}") from exc
    click.echo(f"wrote {output}", err=True)


@ollama.command("lint")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ollama-version", help="Ollama release to check against (default: the newest known).")
@click.pass_context
def lint_cmd(ctx: click.Context, file: Path, ollama_version: str | None) -> None:
    """Check FILE the way `ollama create` would; exit 1 if Ollama would refuse it."""
    data = read_modelfile(file)
    version = _version_option(ollama_version)
    result = lint_modelfile(data, relative_dir=file.resolve().parent,
                            ollama_version=OllamaVersion.parse(version) if version else None)
    for kind, issues in (("error", result.errors), ("warning", result.warnings)):
        for issue in issues:
            where = f"{file}:{issue.line}" if issue.line else str(file)
            click.echo(f"{where}: {kind}: {issue.message}")
    if not result.ok:
        ctx.exit(1)
    suffix = f" ({len(result.warnings)} warning(s))" if result.warnings else ""
    click.echo(f"{file}: `ollama create` accepts it{suffix}")


def _print_plan(state: CurrentState, plan: ConfigPlan, fmt: ConfigFormat, path: Path) -> None:
    if state.server_version is not None:
        click.echo(f"Ollama {state.server_version} at {state.server_url},"
                   f" {len(state.models)} model(s) loaded")
    elif state.server_error is not None:
        click.echo(f"No server answered: {state.server_error}")
    click.echo(f"Settings for {fmt.value} ({path}):")
    width = max(len(r.name) for r in plan.recommendations)
    for rec in plan.recommendations:
        current = rec.current if rec.current is not None else "(unset)"
        value = rec.after if rec.after is not None else "(unset)"
        mark = "  " if not rec.changes else "* "
        origin = f"  (from {rec.source})" if rec.source else ""
        click.echo(f"{mark}{rec.name:<{width}}  {current} -> {value}{origin}")
        click.echo(f"  {'':<{width}}  why: {rec.why}")
    for note in (*state.notes, *plan.warnings):
        click.echo(f"warning: {note}")


_NEXT_STEPS = {
    ConfigFormat.SYSTEMD: "sudo systemctl daemon-reload && sudo systemctl restart ollama",
    ConfigFormat.LAUNCHD: "launchctl load -w {path}, then quit and reopen the Ollama app",
    ConfigFormat.ENV: "pass it with `docker run --env-file {path}` or EnvironmentFile={path}",
    ConfigFormat.POWERSHELL: "powershell -File {path}, then quit Ollama from the tray and start it again",
}


def _describe(keys: KeyChanges) -> str:
    parts = [f"{label}: {', '.join(names)}" for label, names in (
        ("added", keys.added), ("changed", keys.changed), ("removed", keys.removed), ("unchanged", keys.kept),
    ) if names]
    if keys.other_lines:
        parts.append(f"{keys.other_lines} other line(s) kept as they were")
    return "; ".join(parts)


@ollama.command("config")
@click.option("--dry-run/--apply", "dry_run", default=True,
              help="Show current -> recommended -> why (default), or write the settings.")
@click.option("--format", "fmt_name", type=click.Choice([f.value for f in ConfigFormat]),
              help="How the server gets its settings (default: this platform's).")
@click.option("--path", type=click.Path(dir_okay=False, path_type=Path),
              help="File to write (default depends on --format).")
@click.option("--systemd-dir", type=click.Path(file_okay=False, path_type=Path),
              default=SYSTEMD_DROPIN_DIR, show_default=True, help="The ollama.service drop-in directory.")
@click.option("--host", help="Ollama server to ask (default: OLLAMA_HOST).")
@click.option("--ollama-version", help="Ollama release, when no server answers.")
@click.option("--vram-gib", type=click.FloatRange(min=0),
              help="Total GPU memory, 0 for none (default: detect this machine's GPUs).")
@click.option("--gpus", type=click.IntRange(min=0), help="Number of GPUs with --vram-gib (default: 1).")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Requests that should run at once.")
def config_cmd(
    dry_run: bool, fmt_name: str | None, path: Path | None, systemd_dir: Path, host: str | None,
    ollama_version: str | None, vram_gib: float | None, gpus: int | None, parallel: int,
) -> None:
    """Recommend Ollama server settings and, with --apply, write them (with a backup)."""
    fmt = ConfigFormat(fmt_name) if fmt_name else ConfigFormat.for_platform()
    target = path or default_config_path(fmt, systemd_dir=systemd_dir)
    with OllamaClient(host) as client:
        state = collect_current(environ=os.environ, systemd_dir=systemd_dir, client=client, target=(fmt, target))
    if vram_gib is None:
        machine = RecommendationInputs.from_hardware(hardware.detect())
    else:
        machine = RecommendationInputs(
            vram_bytes=int(vram_gib * GIB), ram_bytes=int(psutil.virtual_memory().total),
            cpu_cores=psutil.cpu_count(logical=False), gpu_count=gpus)
    inputs = replace(machine, models=state.models, parallel_requests=parallel,
                     ollama_version=_version_option(ollama_version) or state.server_version)
    plan = recommend(inputs, state.values_for(fmt))
    _print_plan(state, plan, fmt, target)
    if dry_run:
        click.echo("Dry run: nothing written; --apply writes it.")
        return
    result = apply_config(plan, fmt, target)
    if not result.changed:
        click.echo(f"{target} already holds these settings; nothing changed.")
        return
    backup = f" (previous version kept as {result.backup})" if result.backup else ""
    click.echo(f"wrote {result.path}{backup}")
    if result.path != target:
        click.echo(f"  {target} is a symlink to it and stays one")
    click.echo(f"  {_describe(result.keys)}")
    click.echo("next: " + _NEXT_STEPS[fmt].format(path=target))


@ollama.command("install-server")
@click.option("--prefix", type=click.Path(file_okay=False, path_type=Path),
              help="Ollama install prefix (default: from the ollama on PATH).")
@click.option("--server", "server_bin", type=click.Path(dir_okay=False, path_type=Path),
              help="Our llama-server (default: the current build's bin/llama-server).")
@click.option("--force", is_flag=True, help="Install even though the llama.cpp commits differ, the Ollama release"
              " is newer than known, the GPU backend is missing or models need Ollama's compat layer.")
def install_server_cmd(prefix: Path | None, server_bin: Path | None, force: bool) -> None:
    """Make Ollama (0.30+) run our patched llama-server; the original is kept."""
    if server_bin is None:
        build = current_build(get_paths())
        if build is None:
            raise VelollmError("no current build: build one with `velollm-patch build`, or pass --server")
        server_bin = build.bin("llama-server")
    ours = server_bin
    result = install_server(prefix or default_prefix(), ours, force, on_recovery=click.echo)
    for problem in result.overridden:
        click.echo(f"warning (--force): {problem}")
    for note in result.unchecked:
        click.echo(f"warning: {note}")
    if not result.changed:
        click.echo(f"{result.target} already is this llama-server ({result.installed}); nothing changed.")
        return
    click.echo(f"installed {ours} as {result.target}")
    click.echo(f"  Ollama's: {result.original} (kept as {result.backup.name})")
    click.echo(f"  now:      {result.installed}")
    for lib in result.libraries:
        click.echo(f"  added {lib}")
    click.echo("Restart Ollama so new models load with it; `velollm-patch ollama restore-server` undoes this.")


@ollama.command("restore-server")
@click.option("--prefix", type=click.Path(file_okay=False, path_type=Path),
              help="Ollama install prefix (default: from the ollama on PATH).")
def restore_server_cmd(prefix: Path | None) -> None:
    """Put Ollama's original llama-server back."""
    result = restore_server(prefix or default_prefix(), on_recovery=click.echo)
    click.echo(f"restored {result.target}: {result.restored}")
    for lib in result.removed_libraries:
        click.echo(f"  removed {lib}")
