#!/usr/bin/env python3
"""Benchmark: on-demand KV memory (--kv-on-demand, patch 0002, issue #3) vs. the preallocated KV cache.

Runs real llama-server processes on 127.0.0.1 and measures, alternating the two variants ABAB:

- idle RSS at -c 2048 and -c 32768;
- RSS with 1K/4K/16K/32K tokens held (4 slots, see bench_fill), and after clearing them (/slots/N?action=erase);
- 4 slots with -c 131072 (32768 per slot, --no-kv-unified) and 4 concurrent 2K-token conversations;
- prompt and decode tokens/s with the switch off and on;
- a soak of the on-demand server: many requests of random lengths over 4 slots (see bench_soak).

Variants: "vanilla" is --vanilla-server (an unpatched build) when given, else the patched server without the
switch; "off" is the patched server without the switch; "on-demand" is the patched server with --kv-on-demand.
The slot context is capped at the trained length by llama-server, so the model's <arch>.context_length is
overridden to 131072 (--override-kv): rope scaling is irrelevant for memory, the generated text beyond the
trained length is not.

    python bench/kv_memory.py --server PATH --model PATH [--vanilla-server PATH] --out results.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from velollm_patch import serve
from velollm_patch.bench.runner import round_order
from velollm_patch.units import MiB

FILL_TEXT = (
    "In the quiet valley the river ran slowly past the old mill, and the miller counted the sacks of "
    "grain one by one while the children played by the water. "
)

BASE_ARGS = ["-fa", "on", "--cache-ram", "0", "--no-warmup", "--metrics"]


def model_arch(model: Path) -> str:
    try:
        import gguf

        reader = gguf.GGUFReader(str(model))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception:
        return "llama"


def start(binary: Path, model: Path, args: list[str], workdir: Path, threads: int) -> serve.RunningServer:
    slots = workdir / "slots"
    slots.mkdir(exist_ok=True)
    config = serve.ServerConfig(
        binary=binary,
        model=model,
        log_file=workdir / f"server-{time.time_ns()}.log",
        args=("-t", str(threads), "--slot-save-path", f"{slots}{os.sep}", *args),
    )
    return serve.start_server(config, timeout=600)


def rss(server: serve.RunningServer, settle: float = 1.0) -> int:
    """The RSS after a moment's rest (freed pages are not always given back synchronously)."""
    time.sleep(settle)
    return server.rss_bytes()


def complete(server: serve.RunningServer, prompt: str, n_predict: int, **extra: Any) -> dict[str, Any]:
    params = {"cache_prompt": True, "ignore_eos": True, **extra}
    return serve.complete(server, prompt, n_predict, timeout=1800, **params)


def fill_text(server: serve.RunningServer, n_tokens: int) -> str:
    per = len(server.tokenize(FILL_TEXT))
    return FILL_TEXT * max(1, n_tokens // per)


def kv(m: dict[str, float]) -> dict[str, float]:
    return {k: m.get(k, float("nan")) for k in ("kv_reserved_bytes", "kv_committed_bytes", "kv_cells_used",
                                                   "kv_high_water_cells", "kv_on_demand")}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------


def bench_idle(binary: Path, model: Path, extra: list[str], ctx: int, wd: Path, threads: int) -> dict[str, Any]:
    with start(binary, model, ["-c", str(ctx), "-np", "1", *BASE_ARGS, *extra], wd, threads) as s:
        return {"rss": rss(s, 2.0), **kv(s.metrics())}


def bench_fill(binary: Path, model: Path, extra: list[str], sizes: list[int], wd: Path, threads: int) -> dict[str, Any]:
    """Tokens held by a 4-slot server (-c 131072, one 32K stream per slot, --no-kv-unified).

    Up to 4K tokens are held by slot 0; larger sizes are spread evenly over the 4 slots (16K = 4 x 4K,
    32K = 4 x 8K). Prompt processing time grows with the square of the sequence length (one 32K prompt takes
    more than 10 minutes on two CPU cores, and in a unified cache every sequence attends over the whole used
    range), while the memory only depends on the number of cells written, so this keeps the run short.
    """
    args = ["-c", "131072", "-np", "4", "--no-kv-unified", *BASE_ARGS, *extra]
    out: dict[str, Any] = {"fill": {}}
    with start(binary, model, args, wd, threads) as s:
        out["idle_rss"] = rss(s, 2.0)
        held = [0, 0, 0, 0]
        for n in sizes:
            target = [n, 0, 0, 0] if n <= 4096 else [n // 4] * 4
            for slot, want in enumerate(target):
                if want > held[slot]:
                    # the same prefix each time: only the new tokens are processed
                    complete(s, f"Part {slot}. " + fill_text(s, want - 16), n_predict=4, id_slot=slot)
                    held[slot] = want
            out["fill"][str(n)] = {"rss": rss(s), "held": list(held), **kv(s.metrics())}
        for slot in range(4):
            s.erase_slot(slot)
        out["cleared"] = {"rss": rss(s, 2.0), **kv(s.metrics())}
    return out


def bench_slots(binary: Path, model: Path, extra: list[str], wd: Path, threads: int, n_tok: int) -> dict[str, Any]:
    args = ["-c", "131072", "-np", "4", "--no-kv-unified", *BASE_ARGS, *extra]
    out: dict[str, Any] = {}
    with start(binary, model, args, wd, threads) as s:
        out["idle"] = {"rss": rss(s, 2.0), **kv(s.metrics())}
        prompts = [f"Conversation {i}. " + fill_text(s, n_tok) for i in range(4)]
        peak = 0

        def converse(i: int) -> None:
            # two turns: the second turn extends the first (prompt cache reuse)
            first = complete(s, prompts[i], n_predict=32, id_slot=i)
            complete(s, prompts[i] + first["content"] + " And then?", n_predict=32, id_slot=i)

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(converse, i) for i in range(4)]
            while not all(f.done() for f in futs):
                peak = max(peak, s.rss_bytes())
                time.sleep(0.2)
            for f in futs:
                f.result()
        out["after"] = {"rss": rss(s), "rss_peak": peak, **kv(s.metrics())}
        for i in range(4):
            s.erase_slot(i)
        out["cleared"] = {"rss": rss(s, 2.0), **kv(s.metrics())}
    return out


def bench_speed(
    binary: Path, model: Path, extra: list[str], wd: Path, threads: int, n_prompt: int, n_predict: int
) -> dict[str, Any]:
    with start(binary, model, ["-c", "32768", "-np", "1", *BASE_ARGS, *extra], wd, threads) as s:
        prompt = fill_text(s, n_prompt)
        complete(s, "warm up", n_predict=8, cache_prompt=False)
        res = complete(s, prompt, n_predict=n_predict, cache_prompt=False)
        t = res["timings"]
        return {"prompt_n": t["prompt_n"], "prompt_tps": t["prompt_per_second"],
                "decode_n": t["predicted_n"], "decode_tps": t["predicted_per_second"]}  # fmt: skip


def bench_soak(
    binary: Path, model: Path, extra: list[str], wd: Path, threads: int, n_requests: int, seed: int
) -> dict[str, Any]:
    """Many requests with random prompt and generation lengths on 4 slots, 4 clients at once.

    Each client keeps to its slot and sends prefixes of one text of random length (1 to 16 chunks of about
    30 tokens), so the prompt cache makes every request grow or cut the slot's sequence: cells are written,
    removed (seq_rm) and written again, which is what the page accounting must survive. Probe prompts are
    answered on a clean slot before and after the soak: a corrupted cache changes them.
    """
    args = ["-c", "16384", "-np", "4", "--no-kv-unified", *BASE_ARGS, *extra]
    probes = [FILL_TEXT * k + "Summarize the text above." for k in (1, 4, 12)]
    rng = random.Random(seed)
    jobs = [(i % 4, rng.randint(1, 16), rng.randint(1, 32)) for i in range(n_requests)]
    out: dict[str, Any] = {"requests": n_requests, "seed": seed}
    with start(binary, model, args, wd, threads) as s:
        out["idle"] = {"rss": rss(s, 2.0), **kv(s.metrics())}

        def probe() -> list[str]:
            texts = [str(complete(s, p, 24, id_slot=0, cache_prompt=False)["content"]) for p in probes]
            s.erase_slot(0)
            return texts

        out["probes_before"] = probe()
        errors: list[str] = []

        def client(slot: int) -> int:
            done = 0
            for job_slot, chunks, n_predict in jobs:
                if job_slot != slot:
                    continue
                try:
                    r = complete(s, f"Client {slot}. " + FILL_TEXT * chunks, n_predict, id_slot=slot)
                    if r["tokens_predicted"] != n_predict or not r["content"]:
                        errors.append(f"slot {slot}: {r['tokens_predicted']} of {n_predict} tokens")
                except Exception as exc:  # every failure is counted; the soak goes on
                    errors.append(f"slot {slot}: {exc}")
                done += 1
            return done

        peak = 0
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(client, slot) for slot in range(4)]
            while not all(f.done() for f in futs):
                peak = max(peak, s.rss_bytes())
                time.sleep(0.2)
            out["completed"] = sum(f.result() for f in futs)
        out["wall_s"] = time.monotonic() - t0
        out["errors"] = errors
        out["busy"] = {"rss": s.rss_bytes(), "rss_peak": peak, **kv(s.metrics())}
        for slot in range(4):
            s.erase_slot(slot)
        out["probes_after"] = probe()
        out["cleared"] = {"rss": rss(s, 2.0), **kv(s.metrics())}
    out["probes_identical"] = out["probes_before"] == out["probes_after"]
    return out


# --------------------------------------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", type=Path, required=True, help="patched llama-server (with --kv-on-demand)")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--vanilla-server", type=Path, help="unpatched llama-server (default: --server without the switch)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=2, help="rounds of the idle and speed runs (default 2)")
    ap.add_argument("--heavy-reps", type=int, default=1, help="rounds of the fill and 4-slot runs (default 1)")
    ap.add_argument("--fill", default="1024,4096,16384,32768", help="fill sizes in tokens")
    ap.add_argument("--variants", default="vanilla,on-demand",
                    help="comma list of vanilla, off (patched, switch off), on-demand (default: vanilla,on-demand)")
    ap.add_argument("--conv-tokens", type=int, default=2048, help="prompt tokens per conversation (4 slots)")
    ap.add_argument("--speed-prompt", type=int, default=2048, help="prompt tokens for the speed test")
    ap.add_argument("--speed-predict", type=int, default=128, help="generated tokens for the speed test")
    ap.add_argument("--threads", type=int, default=max(1, psutil.cpu_count(logical=False) or 1))
    ap.add_argument("--soak-requests", type=int, default=500, help="requests of the on-demand soak (default 500)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the soak's random lengths")
    ap.add_argument("--skip", default="", help="comma separated: idle,fill,slots,speed,soak")
    args = ap.parse_args()

    vanilla_bin = args.vanilla_server or args.server
    override = ["--override-kv", f"{model_arch(args.model)}.context_length=int:131072"]
    variants = {
        "vanilla": (vanilla_bin, override),
        "off": (args.server, override),  # the patched build without the switch
        "on-demand": (args.server, [*override, "--kv-on-demand"]),
    }
    skip = set(filter(None, args.skip.split(",")))
    sizes = [int(x) for x in args.fill.split(",") if x]
    selected = [v for v in variants if v in args.variants.split(",")]
    variants = {v: variants[v] for v in selected}
    # rounds of every variant, the order reversed every other round (AB BA ..., ABC CBA ...) so drift cancels
    order = [(rep, v) for rep in range(max(args.reps, args.heavy_reps)) for v in round_order(selected, rep)]

    results: dict[str, Any] = {
        "model": str(args.model),
        "server": str(args.server),
        "vanilla_server": str(vanilla_bin),
        "vanilla_is_patched_switch_off": args.vanilla_server is None,
        "host": {"platform": platform.platform(), "cpus": psutil.cpu_count(), "ram": psutil.virtual_memory().total},
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "base_args": BASE_ARGS,
        "override": override,
        "runs": {v: {"idle": {}, "fill": [], "slots": [], "speed": []} for v in variants},
    }

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvbench-") as tmp:
        wd = Path(tmp)
        for rep, v in order:
            binary, extra = variants[v]
            runs = results["runs"][v]
            heavy = rep < args.heavy_reps
            light = rep < args.reps
            if "idle" not in skip and light:
                for ctx in (2048, 32768):
                    runs["idle"].setdefault(str(ctx), []).append(
                        bench_idle(binary, args.model, extra, ctx, wd, args.threads)
                    )
            if "fill" not in skip and heavy:
                runs["fill"].append(bench_fill(binary, args.model, extra, sizes, wd, args.threads))
            if "slots" not in skip and heavy:
                runs["slots"].append(bench_slots(binary, args.model, extra, wd, args.threads, args.conv_tokens))
            if "speed" not in skip and light:
                runs["speed"].append(
                    bench_speed(binary, args.model, extra, wd, args.threads, args.speed_prompt, args.speed_predict)
                )
            print(f"[{time.monotonic() - t0:6.0f}s] {v} done", file=sys.stderr, flush=True)
        if "soak" not in skip and "on-demand" in variants and args.soak_requests > 0:
            binary, extra = variants["on-demand"]
            soak = bench_soak(binary, args.model, extra, wd, args.threads, args.soak_requests, args.seed)
            results["soak"] = soak
            print(f"[{time.monotonic() - t0:6.0f}s] soak: {soak['completed']} requests, {len(soak['errors'])} errors, "
                  f"probes identical: {soak['probes_identical']}", file=sys.stderr, flush=True)

    # summary: medians over the repetitions
    summary: dict[str, Any] = {}
    for v, runs in results["runs"].items():
        s: dict[str, Any] = {}
        for ctx, xs in runs["idle"].items():
            s[f"idle_rss_c{ctx}_mib"] = median([x["rss"] for x in xs]) / MiB
            s[f"idle_committed_c{ctx}_mib"] = median([x["kv_committed_bytes"] for x in xs]) / MiB
            s[f"reserved_c{ctx}_mib"] = median([x["kv_reserved_bytes"] for x in xs]) / MiB
        if runs["fill"]:
            s["fill_idle_rss_mib"] = median([r["idle_rss"] for r in runs["fill"]]) / MiB
            for n in sizes:
                s[f"fill_{n}_rss_mib"] = median([r["fill"][str(n)]["rss"] for r in runs["fill"]]) / MiB
                s[f"fill_{n}_committed_mib"] = (
                    median([r["fill"][str(n)]["kv_committed_bytes"] for r in runs["fill"]]) / MiB
                )
            s["fill_cleared_rss_mib"] = median([r["cleared"]["rss"] for r in runs["fill"]]) / MiB
        if runs["slots"]:
            for k in ("idle", "after", "cleared"):
                s[f"slots4_{k}_rss_mib"] = median([r[k]["rss"] for r in runs["slots"]]) / MiB
            s["slots4_peak_rss_mib"] = median([r["after"]["rss_peak"] for r in runs["slots"]]) / MiB
            s["slots4_after_committed_mib"] = median([r["after"]["kv_committed_bytes"] for r in runs["slots"]]) / MiB
        if runs["speed"]:
            s["prompt_tps"] = median([r["prompt_tps"] for r in runs["speed"]])
            s["decode_tps"] = median([r["decode_tps"] for r in runs["speed"]])
        summary[v] = s
    results["summary"] = summary

    a, b = summary.get("vanilla", {}), summary.get("on-demand", {})
    ratios: dict[str, float] = {}
    for k in a:
        if k in b and a[k] and a[k] == a[k]:
            ratios[k] = b[k] / a[k]
    for name, v in (("on-demand", b), ("vanilla", a)):
        if "idle_rss_c2048_mib" in v and "idle_rss_c32768_mib" in v:
            ratios[f"{name} idle rss c32768/c2048"] = v["idle_rss_c32768_mib"] / v["idle_rss_c2048_mib"]
    if "idle_rss_c2048_mib" in a and "idle_rss_c32768_mib" in b:
        ratios["on-demand c32768 / vanilla c2048 idle rss"] = b["idle_rss_c32768_mib"] / a["idle_rss_c2048_mib"]
    results["ratios_on_demand_over_vanilla"] = ratios
    results["wall_s"] = time.monotonic() - t0

    args.out.write_text(json.dumps(results, indent=2))

    off = summary.get("off", {})
    results["ratios_off_over_vanilla"] = {k: off[k] / a[k] for k in a if k in off and a[k] and a[k] == a[k]}

    print(f"{'metric':34} {'vanilla':>12} {'off':>12} {'on-demand':>12} {'on/vanilla':>10} {'off/vanilla':>11}")
    nan = float("nan")
    for k in dict.fromkeys([*a, *off, *b]):
        print(f"{k:34} {a.get(k, nan):12.1f} {off.get(k, nan):12.1f} {b.get(k, nan):12.1f} "
              f"{ratios.get(k, nan):10.3f} {results['ratios_off_over_vanilla'].get(k, nan):11.3f}")
    for k, r in ratios.items():
        if k not in a:
            print(f"{k:60} {r:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
