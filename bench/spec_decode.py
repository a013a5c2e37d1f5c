#!/usr/bin/env python3
"""Benchmark: speculative decoding that tunes itself (patches 0010-0013, issue #4).

Runs real llama-server processes on 127.0.0.1, greedy, the same prompts for every variant, alternating the
variants ABAB (the order is reversed on every other repetition):

1. draft-model workload (chat / code generation): SmolLM2-135M F16 target + the Q4_1 original as the draft
   (same weights).  One server with ``--spec-type draft-simple --spec-draft-n-max 16 --spec-draft-p-min 0``;
   the fixed lengths are per-request settings so they run interleaved on the same process: fixed n_max 1..16
   (``adaptive=false, n_max=N``; n_max 3 is the upstream default).  Plain decoding runs on a server without
   the draft, adaptive (``adaptive=true``, cap 16) on a server of its own, so that its step-time model learns
   only from its own requests.
2. code-edit workload ("fast apply": the prompt holds a ~150-line file, the answer rewrites it with small
   changes) with n-gram speculation.  Long-lived servers per configuration, each warmed up with one run of the
   same edit, then measured in turn: no speculation, ``--spec-default`` (ngram-mod 24/48/64), ngram-simple,
   ngram-map-k, ngram-map-k4v (upstream defaults), ngram-mod with ``--spec-adaptive`` (and with
   ``--spec-adaptive-min 0``, as the tuner plans it), and ngram-mod with fixed n_max (per request).
3. draft context: RSS of a -c 32768 server with the draft, with and without ``--spec-draft-ctx 2048``.

Every run checks that the generated text is byte-identical to the no-speculation run (lossless). Speculation
turns the batch-invariant CPU kernels on (patch 0013, ``--spec-batch-invariant auto``), which compute a token
the same whether alone or in a verification batch, but not always as upstream's single-token kernels do; so the
reference text comes from "plain-bi", a server without speculation started with ``--spec-batch-invariant on``
(where the server has the flag), and "plain" (upstream's kernels) sets the speed ratios.
Decode speed is timings.predicted_n / timings.predicted_ms summed over the prompts.

    python bench/spec_decode.py --server PATH --draft SmolLM2-135M-Instruct.Q4_1.gguf --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from velollm_patch import serve
from velollm_patch.bench.load import CONDITIONS, bench_condition
from velollm_patch.bench.runner import round_order
from velollm_patch.paths import get_paths
from velollm_patch.server_flags import read_server_flags
from velollm_patch.units import MiB

# no speculation, with the kernels speculation runs on (patch 0013): the lossless reference
BATCH_INVARIANT = ["--spec-batch-invariant", "on"]

GEN_PROMPTS = [
    "<|im_start|>user\nWrite a Python class for a bank account with deposit, withdraw and a transaction history. "
    "Include docstrings.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nExplain how a hash table works and when to use one instead of a list.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a C function that reverses a singly linked list, and a main() that tests it."
    "<|im_end|>\n<|im_start|>assistant\n",
]


def code_file(n_funcs: int = 25) -> str:
    """A ~150-line Python module (6 lines per function)."""
    out = ['"""Inventory helpers."""', "", "import math", ""]
    for i in range(n_funcs):
        out += [
            f"def compute_item_{i}(inventory, factor):",
            f'    """Return the adjusted stock of item {i}."""',
            f"    count = inventory.get('item_{i}', 0)",
            f"    weight = math.sqrt(count + {i})",
            f"    return round(count * factor + weight, {i % 4})",
            "",
        ]
    return "\n".join(out)


def code_edit_prompt() -> str:
    return (
        "<|im_start|>user\nHere is a Python file:\n\n```python\n"
        + code_file()
        + "\n```\n\nRewrite the whole file, renaming the parameter `factor` to `scale` in every function. "
        "Output the complete file.<|im_end|>\n<|im_start|>assistant\n```python\n"
    )


def has_batch_invariant(binary: Path) -> bool:
    return read_server_flags(binary, get_paths()).accepts(BATCH_INVARIANT[0])


def start(binary: Path, model: Path, args: list[str], log_dir: Path, name: str) -> serve.RunningServer:
    config = serve.ServerConfig(binary=binary, model=model, args=tuple(args), log_file=log_dir / f"{name}.log")
    return serve.start_server(config, timeout=300)


def command(server: serve.RunningServer) -> str:
    return shlex.join([str(server.config.binary), "-m", str(server.config.model), *server.config.args])


def complete(server: serve.RunningServer, prompt: str, n_predict: int, **extra: Any) -> dict[str, Any]:
    return serve.complete(server, prompt, n_predict, timeout=900, **extra)


def slot0(server: serve.RunningServer) -> dict[str, Any]:
    return server.slots()[0]


def run_prompts(srv: serve.RunningServer, prompts: list[str], n_predict: int, **extra: Any) -> dict[str, Any]:
    n = 0
    ms = 0.0
    drafted = 0
    accepted = 0
    texts = []
    for p in prompts:
        res = complete(srv, p, n_predict, **extra)
        t = res["timings"]
        n += int(t["predicted_n"])
        ms += float(t["predicted_ms"])
        drafted += int(t.get("draft_n", 0))
        accepted += int(t.get("draft_n_accepted", 0))
        texts.append(res["content"])
    return {"tokens": n, "ms": ms, "tps": 1000.0 * n / ms if ms else 0.0, "draft_n": drafted,
            "draft_n_accepted": accepted, "texts": texts}  # fmt: skip


def measure_alternating(servers: dict[str, list[serve.RunningServer]], requests: dict[str, dict[str, Any]],
                        prompts: list[str], n_predict: int, reps: int, subject: str,
                        tag: str) -> dict[str, list[dict[str, Any]]]:
    """The measured runs: every variant's servers in turn, the order reversed on every other rep (ABAB), each
    run with the variant's per-request fields; ``subject``'s runs also keep its slot statistics."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    for rep in range(reps):
        for name in round_order(list(servers), rep):
            for i, server in enumerate(servers[name]):
                r = run_prompts(server, prompts, n_predict, **requests[name])
                if name == subject:
                    r["slot"] = slot0(server).get("speculative_stats")
                runs[name].append(r)
                print(f"[{tag}] rep {rep} {name:20s}#{i} {r['tps']:7.2f} t/s  drafted {r['draft_n']:5d} "
                      f"accepted {r['draft_n_accepted']:5d}", flush=True)  # fmt: skip
    return runs


def summarize(runs: dict[str, list[dict[str, Any]]], reference: str, subject: str) -> dict[str, Any]:
    """Per variant: mean tokens/s, acceptance, losslessness against ``reference`` (the texts of plain-bi
    where it ran, "same_text_as_plain" against upstream's kernels), and ``subject``'s tokens/s over the
    variant's within each rep (adjacent runs of the ABAB order), whose median shrugs off the host's drift and
    the odd slow run that move a mean of a few reps by more than the margins compared."""
    plain_texts = runs[reference][0]["texts"]
    ref_texts = runs["plain-bi"][0]["texts"] if "plain-bi" in runs else plain_texts
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        tps = [r["tps"] for r in rs]
        drafted = sum(r["draft_n"] for r in rs)
        acc = sum(r["draft_n_accepted"] for r in rs)
        paired = [a["tps"] / r["tps"] for a, r in zip(runs[subject], rs, strict=True) if r["tps"] > 0]
        out[name] = {
            "tps_mean": statistics.fmean(tps),
            "tps_runs": tps,
            "acceptance": acc / drafted if drafted else None,
            "draft_n": drafted,
            "lossless": all(r["texts"] == ref_texts for r in rs),
            "same_text_as_plain": all(r["texts"] == plain_texts for r in rs),
            "tokens": rs[0]["tokens"],
            f"{subject}_over_this_per_rep": paired,
            f"{subject}_over_this_median": statistics.median(paired) if paired else None,
        }
    return out


def print_paired(res: dict[str, Any], subject: str) -> None:
    subject_mean = res[subject]["tps_mean"]
    for name, r in res.items():
        median = r[f"{subject}_over_this_median"]
        if name != subject and median is not None and r["tps_mean"] > 0:
            print(f"  {subject} / {name}: x{subject_mean / r['tps_mean']:.3f} (means), x{median:.3f} (median of "
                  f"the per-rep ratios)", flush=True)  # fmt: skip


def bench_draft(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    sweep = [int(x) for x in args.sweep.split(",")]
    srv_args = ["-t", str(args.threads), "-c", "4096", "-np", "1", "--cache-ram", "0", "--no-warmup",
                "-md", str(args.draft), "--spec-type", "draft-simple", "--spec-draft-p-min", "0",
                "--spec-draft-n-max", str(max(sweep))]  # fmt: skip
    # "plain" runs on a second server without a draft model: with speculative.enabled=false the draft model
    # still ingests every token (it keeps its KV cache in step with the target), so it is not plain decoding
    variants: dict[str, dict[str, Any]] = {"plain": {}}
    invariant = has_batch_invariant(args.server)
    if invariant:
        variants["plain-bi"] = {}
    for n in sweep:
        variants[f"fixed-{n}"] = {"speculative": {"adaptive": False, "n_max": n}}
    variants["adaptive"] = {"speculative": {"adaptive": True}}
    no_draft = srv_args[: srv_args.index("-md")]
    # "draft" serves the fixed lengths; the adaptive policy keeps its step-time model per slot across requests: on
    # the sweep's server it would learn the cost of every length from the fixed runs, which a real server does not
    # get for free, so it has a server of its own
    server_args = {"draft": srv_args, "plain": no_draft, "adaptive": srv_args}
    if invariant:
        server_args["plain-bi"] = no_draft + BATCH_INVARIANT
    started: dict[str, serve.RunningServer] = {}
    try:
        for name, flags in server_args.items():
            started[name] = start(args.server, args.target, flags, log_dir, name)
        for server in started.values():
            complete(server, GEN_PROMPTS[0], 16)  # warm-up
        runs = measure_alternating({name: [started.get(name, started["draft"])] for name in variants}, variants,
                                   GEN_PROMPTS, args.n_predict, args.reps, "adaptive", "draft")  # fmt: skip
    finally:
        for server in started.values():
            server.stop()
    res = summarize(runs, "plain", "adaptive")
    print_paired(res, "adaptive")
    res["adaptive"]["slot_stats_last"] = runs["adaptive"][-1].get("slot")
    return {"server_cmd": command(started["draft"]), "plain_cmd": command(started["plain"]),
            "adaptive_cmd": command(started["adaptive"]),
            "variants": variants, "results": res}  # fmt: skip


# name -> (server flags, per-request fields)
UPSTREAM_NGRAM: dict[str, tuple[list[str], dict[str, Any]]] = {
    "plain": ([], {}),
    "spec-default": (["--spec-default"], {}),
    "ngram-simple": (["--spec-type", "ngram-simple"], {}),
    "ngram-map-k": (["--spec-type", "ngram-map-k"], {}),
    "ngram-map-k4v": (["--spec-type", "ngram-map-k4v"], {}),
}
ADAPTIVE_NGRAM: tuple[list[str], dict[str, Any]] = (["--spec-type", "ngram-mod", "--spec-adaptive"], {})


def edit_configs(sweep: list[int], upstream: list[str]) -> dict[str, tuple[list[str], dict[str, Any]]]:
    configs = {name: UPSTREAM_NGRAM[name] for name in ["plain", *upstream]}
    configs["ngram-mod-adaptive"] = ADAPTIVE_NGRAM
    # what the tuner plans: adaptive may also stop drafting where drafts do not pay
    configs["ngram-mod-adaptive-min0"] = ([*ADAPTIVE_NGRAM[0], "--spec-adaptive-min", "0"], {})
    for n in sweep:
        configs[f"ngram-mod-fixed-{n}"] = (ADAPTIVE_NGRAM[0], {"speculative": {"adaptive": False, "n_max": n}})
    return configs


def bench_code_edit(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Every configuration on ``--edit-servers`` long-lived servers of its own, each warmed up with one run of
    the same edit (n-gram tables such as ngram-mod's learn from earlier generations, so a cold first request and
    a warm later one differ a lot; giving every server the same history keeps the comparison fair), then the
    measured runs alternate between the servers ABAB.  A fresh server per measured run, as this bench did up to
    level 20, put two servers of one configuration up to 12 % apart; long-lived servers alternated agree within
    about 1 % (docs/benchmarks/speculative.md, level 20)."""
    base = ["-t", str(args.threads), "-c", "8192", "-np", "1", "--cache-ram", "0", "--no-warmup"]
    prompts = [code_edit_prompt()]
    upstream = [name for name in args.edit_upstream.split(",") if name]
    configs = edit_configs([int(x) for x in args.edit_sweep.split(",") if x], upstream)
    if has_batch_invariant(args.server):
        configs = {"plain": configs.pop("plain"), "plain-bi": (BATCH_INVARIANT, {}), **configs}
    cold: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    servers: dict[str, list[serve.RunningServer]] = {k: [] for k in configs}
    try:
        for name, (flags, extra) in configs.items():
            for i in range(args.edit_servers):
                srv = start(args.server, args.target, base + flags, log_dir, f"edit-{name}-{i}")
                servers[name].append(srv)
                c = run_prompts(srv, prompts, args.n_predict_edit, **extra)  # warm-up: same task, same settings
                cold[name].append(c)
                print(f"[edit] warm-up {name:20s}#{i} {c['tps']:7.2f} t/s", flush=True)
        runs = measure_alternating(servers, {k: v[1] for k, v in configs.items()}, prompts, args.n_predict_edit,
                                   args.reps, "ngram-mod-adaptive", "edit")  # fmt: skip
    finally:
        for group in servers.values():
            for srv in group:
                srv.stop()
    res = summarize(runs, "plain", "ngram-mod-adaptive")
    print_paired(res, "ngram-mod-adaptive")
    res["ngram-mod-adaptive"]["slot_stats_last"] = runs["ngram-mod-adaptive"][-1].get("slot")
    return {"server_cmds": {k: command(v[0]) for k, v in servers.items()},
            "per_request": {k: v[1] for k, v in configs.items()}, "servers_per_config": args.edit_servers,
            "results": res, "cold_first_request": summarize(cold, "plain", "ngram-mod-adaptive"),
            "prompt_chars": len(prompts[0]), "file_lines": code_file().count("\n") + 1}  # fmt: skip


def bench_draft_ctx(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    base = ["-t", str(args.threads), "-c", "32768", "-np", "1", "--cache-ram", "0", "--no-warmup",
            "-md", str(args.draft), "--spec-type", "draft-simple", "--spec-draft-p-min", "0"]  # fmt: skip
    configs = {"draft-ctx-default": [], "draft-ctx-2048": ["--spec-draft-ctx", "2048"]}
    out: dict[str, Any] = {}
    for rep in range(args.reps):
        for name in round_order(list(configs), rep):
            srv = start(args.server, args.target, base + configs[name], log_dir, f"ctx-{name}-{rep}")
            try:
                idle = srv.rss_bytes()
                r = run_prompts(srv, GEN_PROMPTS[:1], 64)
                after = srv.rss_bytes()
            finally:
                srv.stop()
            out.setdefault(name, {"cmd": command(srv), "idle_rss_mib": [], "rss_after_mib": [], "tps": []})
            out[name]["idle_rss_mib"].append(idle / MiB)
            out[name]["rss_after_mib"].append(after / MiB)
            out[name]["tps"].append(r["tps"])
            out[name]["text"] = r["texts"][0]
            print(f"[ctx]   rep {rep} {name:18s} idle {idle / MiB:8.1f} MiB after {after / MiB:8.1f} MiB", flush=True)
    out["lossless"] = out["draft-ctx-default"]["text"] == out["draft-ctx-2048"]["text"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", type=Path, required=True, help="patched llama-server (full series)")
    ap.add_argument("--draft", type=Path, required=True, help="SmolLM2-135M-Instruct Q4_1 GGUF (the draft)")
    ap.add_argument("--target", type=Path, help="target, same weights (F16, F32); made from --draft (F16) if missing")
    ap.add_argument("--quantize", type=Path, help="llama-quantize (default: next to --server)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=2, help="ABAB repetitions (default 2)")
    ap.add_argument("--n-predict", type=int, default=192, help="tokens per prompt, draft-model workload")
    ap.add_argument("--n-predict-edit", type=int, default=1024, help="tokens per prompt, code-edit workload")
    ap.add_argument("--sweep", default="1,2,3,4,5,6,8,10,12,16", help="fixed n_max values, draft-model workload")
    ap.add_argument("--edit-sweep", default="4,8,16,32,64", help="fixed ngram-mod n_max values, code-edit workload")
    ap.add_argument("--edit-servers", type=int, default=1,
                    help="long-lived servers per configuration, code-edit workload (default 1)")
    ap.add_argument("--edit-upstream", default=",".join(list(UPSTREAM_NGRAM)[1:]),
                    help="upstream n-gram configurations to compare, code-edit workload")
    ap.add_argument("--threads", type=int, default=max(1, psutil.cpu_count(logical=False) or 1))
    ap.add_argument("--skip", default="", help="comma separated: draft,edit,ctx")
    ap.add_argument("--condition", choices=CONDITIONS, default="quiet",
                    help="busy: one core kept busy by a spinning process for the whole run (issue #34)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="spec-bench-"))
    if args.target is None:
        args.target = tmp / "smollm2-f16.gguf"
    if not args.target.is_file():
        quantize = args.quantize or args.server.parent / "llama-quantize"
        subprocess.run([str(quantize), "--allow-requantize", str(args.draft), str(args.target), "F16"],
                       check=True, capture_output=True)  # fmt: skip

    skip = set(filter(None, args.skip.split(",")))
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpu": platform.processor(),
            "cores": psutil.cpu_count(),
            "threads": args.threads,
        },
        "argv": sys.argv,
        "logs": str(tmp),
    }
    t0 = time.monotonic()
    with bench_condition(args.condition) as condition:
        result["condition"] = condition.to_dict()
        if "draft" not in skip:
            result["draft"] = bench_draft(args, tmp)
        if "edit" not in skip:
            result["code_edit"] = bench_code_edit(args, tmp)
        if "ctx" not in skip:
            result["draft_ctx"] = bench_draft_ctx(args, tmp)
    result["wall_s"] = time.monotonic() - t0
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({result['wall_s']:.0f} s); logs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
