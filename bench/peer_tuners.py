#!/usr/bin/env python3
"""Benchmark: the tuner's plan against the flags other tuners on PyPI recommend for the same model (issue #34).

For one model, each peer's recommended llama-server flags are obtained from the peer itself, installed in its
own virtual environment (``--peers-venv``; never in ours) with a temporary HOME each and the vanilla build's
binaries first on PATH:

    mdl            (llama-mdl)            ran: ``mdl fit MODEL --json --profile chat``, its first pick's argv
    llama-optimus                         ran: its Optuna search over llama-bench (``--trials`` bounded here),
                                          the llama-server line it prints; stopped before its own closing bench
    fituna                                its logic as shipped: ``fituna.report.build_server_command`` for the
                                          config its search returns on a machine without a GPU (``ngl`` 0, the
                                          CLI's default ``--ctx`` 4096; the search only picks a quant and ngl)
    clanker        (clanker-gguf)         ran: ``clanker run MODEL --backend llama`` (a dry run), the command
    localllm       (make-localllm-easier) its logic as shipped: ``localllm.runtime.server_args`` as ``localllm
                                          serve`` calls it without a GPU (lean profile, 8192 context); its
                                          ``tune`` command exits "no GPU found to tune"

Flags this llama-server does not accept (not in its ``--help``, or a flag that needs a value given none) are
dropped and listed; ``-m``, ``--host``, ``--port`` and ``--metrics`` are the bench's own. Then, one locked
``velollm-patch bench ab`` per distinct flag set: A = the vanilla build with the peer's flags, B = the same build
with the tuner's plan (``--b-tuned chat``), and once more with B on the patched build against the strongest peer.
Every run is resumable: a peer already in ``flags.json`` is not asked again, and a comparison whose
``result.json`` exists is not run again (a second call only rewrites the summary).

    python bench/peer_tuners.py --model smollm2-135m --out runs/peers/smollm2 --lock /work/shared/cpu.lock

Writes ``flags.json`` (each peer's raw output, flags, what was dropped and how they were obtained), one bench
directory per comparison and ``summary.json`` + ``summary.md`` (the geometric means over the scenarios).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from velollm_patch import builds, proc
from velollm_patch.bench.metrics import geometric_means, ratio_table
from velollm_patch.bench.runner import ABResult, load_result
from velollm_patch.errors import VelollmError
from velollm_patch.model_ref import resolve_model
from velollm_patch.paths import get_paths

PEERS = ("mdl", "llama-optimus", "fituna", "clanker", "localllm")
# Set by the bench for every started server (model, address) or added by it (--metrics).
BENCH_OWN = {"-m": "the bench passes the model", "--model": "the bench passes the model",
             "--host": "the bench picks the address", "--port": "the bench picks the port",
             "--metrics": "the bench adds it"}  # fmt: skip
METRICS = ("aggregate_tps", "decode_tps", "prompt_tps", "peak_rss_bytes")
_NUMBER = re.compile(r"-\d")


@dataclass
class PeerFlags:
    peer: str
    how: str  # the command that was run, or the function whose logic was called
    raw: list[str]  # llama-server arguments as the peer gave them
    args: list[str] = field(default_factory=list)  # what the vanilla server is started with
    dropped: list[str] = field(default_factory=list)  # "FLAG VALUES: why"


# -- parsing (pure, unit-tested) --------------------------------------------------------------------------------


def accepted_flags(help_text: str) -> dict[str, bool]:
    """Every flag ``llama-server --help`` lists, and whether it takes a value (``-t, --threads N``: both do)."""
    flags: dict[str, bool] = {}
    for line in help_text.splitlines():
        if not line.startswith("-") or line.startswith("-----"):
            continue
        # "-t,    --threads N      number of ...": the names are padded to a column, the description after it
        names = re.split(r"\s{2,}", re.sub(r",\s+", ", ", line.strip()), maxsplit=1)[0]
        items = [item.split() for item in names.split(", ") if item.strip()]
        takes_value = any(len(item) > 1 for item in items)
        for item in items:
            flags[item[0]] = takes_value
    return flags


def group_flags(argv: Sequence[str]) -> list[list[str]]:
    """``-c 8192 -fa on --no-mmap`` → ``[["-c", "8192"], ["-fa", "on"], ["--no-mmap"]]`` (a negative number
    is a value, not a flag)."""
    groups: list[list[str]] = []
    for token in argv:
        if token.startswith("-") and not _NUMBER.match(token):
            groups.append([token])
        elif groups:
            groups[-1].append(token)
        else:
            raise VelollmError(f"a peer's flags start with a value, not a flag: {shlex.join(argv)}")
    return groups


def usable_args(raw: Sequence[str], accepted: dict[str, bool]) -> tuple[list[str], list[str]]:
    """The peer's flags this server takes, and the dropped ones with the reason."""
    args: list[str] = []
    dropped: list[str] = []
    for group in group_flags(raw):
        flag, values = group[0], group[1:]
        text = shlex.join(group)
        if flag in BENCH_OWN:
            continue
        if flag not in accepted:
            dropped.append(f"{text}: not a flag of this llama-server")
        elif accepted[flag] and not values:
            dropped.append(f"{text}: this llama-server needs a value for it")
        elif not accepted[flag] and values:
            dropped.append(f"{text}: this llama-server takes no value for {flag}")
        else:
            args += group
    return args, dropped


def server_argv(line: str) -> list[str]:
    """The arguments after ``llama-server`` (or a path ending in it) in one printed command line."""
    words = shlex.split(line)
    for i, word in enumerate(words):
        if word.rsplit("/", 1)[-1] == "llama-server":
            return words[i + 1 :]
    raise VelollmError(f"no llama-server in: {line}")


def parse_mdl(json_text: str) -> list[str]:
    """``mdl fit --json``: the first (recommended, "★") pick's argv."""
    picks = json.loads(json_text).get("picks") or []
    if not picks:
        raise VelollmError("mdl fit returned no pick")
    return server_argv(shlex.join(picks[0]["argv"]))


def parse_clanker(output: str) -> list[str]:
    """``clanker run``: the last line that is a llama-server command."""
    lines = [line for line in output.splitlines() if line.strip().startswith("llama-server ")]
    if not lines:
        raise VelollmError("clanker printed no llama-server command")
    return server_argv(lines[-1])


def optimus_server_line(line: str) -> bool:
    return "$LLAMA_BIN/llama-server" in line


def parse_optimus(line: str) -> list[str]:
    """llama-optimus's ``$LLAMA_BIN/llama-server --model $MODEL -t 2 --batch-size ...`` line."""
    return server_argv(line.replace("$LLAMA_BIN/", ""))


def summary_rows(results: dict[str, ABResult]) -> dict[str, dict[str, float]]:
    """Per comparison, the geometric mean of each metric's median B/A over the scenarios."""
    return {name: {m: v for m, (v, _n) in geometric_means(ab.ratios()).items() if m in METRICS}
            for name, ab in results.items()}  # fmt: skip


def round_spread(ab: ABResult, metric: str = "aggregate_tps") -> list[float]:
    """The same geometric mean for each round alone: how far two rounds of one comparison disagree."""
    pairs = [(r.a.headline(), r.b.headline()) for r in ab.rounds if r.a is not None and r.b is not None]
    return [geometric_means(ratio_table([pair])).get(metric, (math.nan, 0))[0] for pair in pairs]


# -- running the peers ------------------------------------------------------------------------------------------


def locked(lock: Path | None, argv: list[str]) -> list[str]:
    """``argv`` run once ``lock`` is free: other jobs on a shared machine take turns with each measurement."""
    return ["flock", str(lock), *argv] if lock else argv


class _Found(Exception):
    """Raised from the output callback to stop llama-optimus once it has printed its command."""


@dataclass(frozen=True)
class Context:
    venv: Path
    vanilla_bin: Path
    model: Path
    lock: Path | None
    optimus_trials: int
    work: Path  # the peers' temporary HOMEs
    logs: Path  # where a peer's own search output is kept

    def env(self, peer: str) -> dict[str, str]:
        home = tempfile.mkdtemp(prefix=f"home-{peer}-", dir=self.work)
        path = f"{self.vanilla_bin}{os.pathsep}{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        return {"HOME": home, "PATH": path, "LLAMA_BIN": str(self.vanilla_bin), "NO_COLOR": "1"}

    def python(self, peer: str, code: str) -> str:
        return proc.run([str(self.venv / "bin" / "python"), "-c", code], env=self.env(peer), what=peer).output


def _mdl(ctx: Context) -> PeerFlags:
    argv = ["mdl", "fit", str(ctx.model), "--json", "--profile", "chat"]
    out = proc.run(argv, env=ctx.env("mdl"), what="mdl fit", timeout=300).output
    return PeerFlags("mdl", f"ran `{shlex.join(argv)}` (llama-mdl 0.14.0), first pick", parse_mdl(out[out.find("{") :]))


def _clanker(ctx: Context) -> PeerFlags:
    argv = ["clanker", "run", str(ctx.model), "--backend", "llama"]
    out = proc.run(argv, env=ctx.env("clanker"), what="clanker run", timeout=120).output
    return PeerFlags("clanker", f"ran `{shlex.join(argv)}` (clanker-gguf 1.2.0, a dry run)", parse_clanker(out))


def _optimus(ctx: Context) -> PeerFlags:
    # --ngl-max 0: no GPU, so its -ngl bisection is skipped; --metric mean: prompt and decode, as a chat uses both
    argv = ["llama-optimus", "--llama-bin", str(ctx.vanilla_bin), "--model", str(ctx.model),
            "--trials", str(ctx.optimus_trials), "--metric", "mean", "--repeat", "1", "--n-tokens", "70",
            "--ngl-max", "0", "--no-warmup"]  # fmt: skip
    found: list[str] = []

    def on_line(line: str) -> None:
        if optimus_server_line(line):
            found.append(line)
            raise _Found  # what follows is its own before/after llama-bench, minutes we do not need

    with contextlib.suppress(_Found):
        proc.run(locked(ctx.lock, argv), env=ctx.env("llama-optimus"), what="llama-optimus", timeout=1800,
                 on_line=on_line, log_file=ctx.logs / "llama-optimus-search.log")  # fmt: skip
    if not found:
        raise VelollmError("llama-optimus printed no llama-server command")
    return PeerFlags("llama-optimus", f"ran `{shlex.join(argv)}` (llama-optimus 0.1.9) under the CPU lock",
                     parse_optimus(found[0]))  # fmt: skip


def _fituna(ctx: Context) -> PeerFlags:
    code = (
        "import json, pathlib\n"
        "from fituna.config import CandidateConfig\n"
        "from fituna.report import build_server_command\n"
        f"c = CandidateConfig(quant='as-given', ngl=0, ctx=4096)\n"
        f"print(json.dumps(build_server_command(pathlib.Path({str(ctx.model)!r}), c)))\n"
    )
    raw = server_argv(shlex.join(json.loads(ctx.python("fituna", code).strip().splitlines()[-1])))
    return PeerFlags("fituna", "logic: fituna/report.py build_server_command (fituna 0.3.6) for ngl 0 (--gpu none) "
                     "and ctx 4096 (fituna/cli.py: run --ctx default)", raw)  # fmt: skip


def _localllm(ctx: Context) -> PeerFlags:
    code = (
        "import json, pathlib\n"
        "from localllm import runtime\n"
        f"print(json.dumps(runtime.server_args(pathlib.Path({str(ctx.model)!r}), None, 8080, 8192, False, "
        "profile='lean')))\n"
    )
    raw = json.loads(ctx.python("localllm", code).strip().splitlines()[-1])
    return PeerFlags("localllm", "logic: localllm/runtime.py server_args (make-localllm-easier 0.7.1) as localllm/"
                     "cli.py _launch calls it without a GPU: device None, lean profile's 8192 context, no MTP; "
                     "RAM read from this machine", raw)  # fmt: skip


OBTAIN: dict[str, Callable[[Context], PeerFlags]] = {
    "mdl": _mdl,
    "llama-optimus": _optimus,
    "fituna": _fituna,
    "clanker": _clanker,
    "localllm": _localllm,
}


# -- the comparisons --------------------------------------------------------------------------------------------


def _bench_ab(
    lock: Path | None, model: str, targets: tuple[str, str], a_args: list[str], out: Path, rounds: int
) -> ABResult:
    result = out / "result.json"
    if not result.is_file():
        argv = [sys.executable, "-m", "velollm_patch", "bench", "ab", *targets, f"--a-args={shlex.join(a_args)}",
                "--b-tuned", "chat", "--model", model, "--quick", "--rounds", str(rounds), "--no-charts",
                "--out", str(out)]  # fmt: skip
        print(f"$ {shlex.join(argv)}", flush=True)
        proc.run(locked(lock, argv), what=f"bench ab ({out.name})", log_file=out.parent / f"{out.name}.log")
    loaded = load_result(result)
    if not isinstance(loaded, ABResult):
        raise VelollmError(f"{result} is not an A/B result")
    return loaded


def _markdown(
    flags: list[PeerFlags], rows: dict[str, dict[str, float]], spread: dict[str, list[float]],
    runs: dict[str, list[str]],
) -> str:  # fmt: skip
    lines = ["| A (vanilla build) | B | aggregate B/A [per round] | decode B/A | prompt B/A | peak RSS B/A |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, row in rows.items():
        peers, target = runs[name]
        cells = [f"×{row[m]:.3f}" if m in row else "–" for m in METRICS]
        cells[0] += " [" + ", ".join(f"{r:.2f}" for r in spread[name]) + "]"
        lines.append(f"| {peers} | {target} | " + " | ".join(cells) + " |")
    lines += ["", "| peer | flags (vanilla llama-server) | dropped | how obtained |", "|---|---|---|---|"]
    for f in flags:
        lines.append(f"| {f.peer} | `{shlex.join(f.args)}` | {'; '.join(f.dropped) or '–'} | {f.how} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    try:
        return _main()
    except VelollmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="GGUF path or known model name")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)}")
    ap.add_argument("--peers-venv", type=Path, default=Path("/work/peers-venv"))
    ap.add_argument(
        "--vanilla",
        default="vanilla",
        help="the build every peer and our plan run on (`vanilla` is the "
        "newest vanilla build of any backend: name a CPU one by id where a GPU build is newer)",
    )
    ap.add_argument("--patched", default="current", help="the build our plan runs on last ('' to skip)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--optimus-trials", type=int, default=6, help="llama-optimus trials per stage (its default: 35)")
    ap.add_argument("--lock", type=Path, help="run each measurement under `flock LOCK` (a shared machine; or run "
                    "the whole script under flock to take one turn per model)")
    ap.add_argument("--flags-only", action="store_true", help="obtain and check the peers' flags, run nothing")
    args = ap.parse_args()

    names = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := [p for p in names if p not in OBTAIN]:
        print(f"unknown peer(s) {', '.join(unknown)}: choose from {', '.join(PEERS)}", file=sys.stderr)
        return 2
    paths = get_paths()
    vanilla = builds.find_build(paths, args.vanilla)
    model = resolve_model(paths, args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    accepted = accepted_flags(proc.run([str(vanilla.bin("llama-server")), "--help"], what="llama-server --help").output)

    flags_file = args.out / "flags.json"
    known = {f["peer"]: PeerFlags(**f) for f in json.loads(flags_file.read_text())} if flags_file.is_file() else {}
    flags: list[PeerFlags] = []
    with tempfile.TemporaryDirectory(prefix="peer-tuners-") as work:  # the peers' HOMEs, gone afterwards
        ctx = Context(args.peers_venv, vanilla.bin("llama-server").parent, model, args.lock, args.optimus_trials,
                      Path(work), args.out)  # fmt: skip
        for name in names:
            got = known.get(name) or OBTAIN[name](ctx)
            got.args, got.dropped = usable_args(got.raw, accepted)
            flags.append(got)
            print(f"{name}: {shlex.join(got.args)}" + (f"  (dropped {'; '.join(got.dropped)})" if got.dropped else ""))
            flags_file.write_text(json.dumps([asdict(f) for f in flags], indent=2))
    if args.flags_only:
        return 0

    by_args: dict[tuple[str, ...], list[str]] = {}
    for f in flags:
        by_args.setdefault(tuple(f.args), []).append(f.peer)
    results: dict[str, ABResult] = {}
    runs: dict[str, list[str]] = {}
    for a_args, peers in by_args.items():
        key = "+".join(peers)
        results[key] = _bench_ab(
            args.lock, str(model), (vanilla.build_id, vanilla.build_id), list(a_args), args.out / key, args.rounds
        )
        runs[key] = [", ".join(peers), f"{vanilla.build_id} + tuned:chat"]
    rows = summary_rows(results)
    # the strongest peer is the one our plan gains least over
    strongest = min(rows, key=lambda k: rows[k].get("aggregate_tps", float("inf")))
    if args.patched:
        patched = builds.find_build(paths, args.patched)
        key = f"patched-vs-{strongest}"
        strongest_args = next(a for a, p in by_args.items() if "+".join(p) == strongest)
        targets = (vanilla.build_id, patched.build_id)
        results[key] = _bench_ab(args.lock, str(model), targets, list(strongest_args), args.out / key, args.rounds)
        runs[key] = [strongest, f"{patched.build_id} + tuned:chat"]
        rows = summary_rows(results)
    summary: dict[str, Any] = {
        "model": str(model), "vanilla": vanilla.build_id, "strongest_peer": strongest, "geomeans": rows,
        "aggregate_per_round": {k: round_spread(ab) for k, ab in results.items()},
        "commands": {k: {"a": ab.a.command, "b": ab.b.command} for k, ab in results.items()},
    }  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    markdown = _markdown(flags, rows, summary["aggregate_per_round"], runs)
    (args.out / "summary.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
