#!/usr/bin/env python3
"""Benchmark: the tuner's plan on a busy (or quiet) machine against fixed thread and poll settings (issue #34).

Under ``--condition busy`` (one core kept busy by a spinning process, velollm_patch/bench/load.py) the plan is
made while the load runs, as `velollm-patch tune` would make it there, and compared with the same plan made for a
machine of its own (``--machine dedicated``: today's plan) with ``-t``/``-tb`` and ``--poll`` replaced by each fixed
alternative: ``-t 1`` or ``-t 2`` (``-tb`` the same) × ``--poll 0`` or 50. Every variant runs on a freshly started
server of the same build, one at a time, in an order that alternates from round to round (ABC.. then ..CBA), and
the plan's tokens/s over the best alternative's is taken within each round.

    python bench/busy_machine.py --condition busy --rounds 2 --out busy.json

Prints, per metric, each variant's median over the rounds and the plan over the best alternative (median and
min-max over the rounds), and writes everything to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from velollm_patch import hardware, tune
from velollm_patch.bench.load import CONDITIONS, bench_condition
from velollm_patch.bench.runner import BenchConfig, round_order, run_bench
from velollm_patch.bench.targets import open_target, parse_target
from velollm_patch.builds import find_build
from velollm_patch.model_ref import resolve_model
from velollm_patch.paths import get_paths

METRICS = ("short.decode_tps", "concurrency@4.aggregate_tps", "short.prompt_tps")


def without_threads(args: tuple[str, ...]) -> list[str]:
    """``args`` less the thread and poll settings, which each variant sets itself."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-t", "--threads", "-tb", "--threads-batch", "--poll"):
            skip = True
        else:
            out.append(arg)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="current")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workload", default="chat", choices=tune.WORKLOADS)
    ap.add_argument("--condition", default="busy", choices=CONDITIONS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="measured requests per scenario point")
    ap.add_argument("--n-predict", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    paths = get_paths()
    build = find_build(paths, args.build)
    model = str(resolve_model(paths, args.model))
    hw = hardware.detect(build_dir=paths.cache)
    config = BenchConfig(scenarios=("short", "concurrency"), repeats=args.repeats, n_predict=args.n_predict,
                         concurrency=(4,), max_context=4096)
    started = time.monotonic()
    with bench_condition(args.condition) as condition:
        time.sleep(1)  # let the load reach its core before the tuner samples it
        planned = tune.plan_for(model, hw, build, paths, tune.TuneRequest(workload=args.workload))
        today = tune.plan_for(model, hw, build, paths, tune.TuneRequest(workload=args.workload, machine="dedicated"))
        base = without_threads(today.args)
        variants: dict[str, list[str]] = {"plan": list(planned.args)}
        for threads in (1, 2):
            for poll in (0, 50):
                fixed = ["-t", str(threads), "-tb", str(threads), "--poll", str(poll)]
                variants[f"t{threads}-poll{poll}"] = [*base, *fixed]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for number in range(args.rounds):
            for name in round_order(list(variants), number):
                spec = parse_target(args.build, model=model, server_args=variants[name], label=name)
                run = run_bench(open_target(spec, paths), config, hardware=hw.to_dict(), condition=condition)
                head = run.headline()
                runs[name].append(head)
                print(f"round {number + 1} {name:12s} " + "  ".join(
                    f"{key} {head.get(key, float('nan')):7.1f}" for key in METRICS), flush=True)
    summary: dict[str, Any] = {}
    for key in METRICS:
        medians = {name: statistics.median(r[key] for r in rs if key in r) for name, rs in runs.items()}
        per_round = []
        for number in range(args.rounds):
            others = [runs[name][number][key] for name in variants if name != "plan" and key in runs[name][number]]
            if others and key in runs["plan"][number]:
                per_round.append(runs["plan"][number][key] / max(others))
        summary[key] = {"medians": medians, "plan_over_best_fixed_per_round": per_round,
                        "plan_over_best_fixed_median": statistics.median(per_round) if per_round else None}
        ratio = summary[key]["plan_over_best_fixed_median"]
        spread = f" [{min(per_round):.3f}-{max(per_round):.3f}]" if per_round else ""
        print(f"{key}: " + ", ".join(f"{n} {v:.1f}" for n, v in medians.items())
              + (f"; plan / best fixed x{ratio:.3f}{spread}" if ratio else ""))
    result = {
        "condition": condition.to_dict(), "build": build.build_id, "model": model, "rounds": args.rounds,
        "config": config.to_dict(), "plan_args": list(planned.args),
        "plan_threads_reason": planned.reason("threads"), "variants": variants, "runs": runs, "summary": summary,
        "wall_s": time.monotonic() - started,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"plan: {' '.join(planned.args)}\n  threads: {planned.reason('threads')}\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
