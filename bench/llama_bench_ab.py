#!/usr/bin/env python3
"""Benchmark: two llama.cpp builds side by side with upstream's own ``llama-bench``, alternated (ABBA...).

Used for issue #3's "switch off >= 0.99x vanilla" target: with ``--kv-on-demand`` not given, the patched build
runs upstream's KV allocation unchanged, so any difference from the vanilla build is the machine's noise or a
side effect of the series; a shared 2-core VM drifts by more than 1 % between minutes, so the two builds run
alternately and the ratio is taken within each round, then summarized by its geometric mean.

    python bench/llama_bench_ab.py --a VANILLA/bin/llama-bench --b PATCHED/bin/llama-bench \
        --model SmolLM2-135M-Instruct.Q4_1.gguf --rounds 6 --out ab.json -- -p 512 -n 128 -d 0,2048 -fa 1 -r 3

Everything after ``--`` goes to llama-bench as it is (``-m``, ``-o`` and ``-t`` are set here).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from velollm_patch.bench.runner import round_order


def run_bench(binary: Path, model: Path, threads: int, extra: list[str]) -> dict[str, float]:
    """tokens/s per test name, e.g. ``pp512`` or ``tg128@d2048``."""
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-o", "json", *extra]
    # not velollm_patch.proc.run: it merges stderr (llama-bench's log) into the output, and the JSON is stdout alone
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res: dict[str, float] = {}
    for row in json.loads(out):
        name = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        if row.get("n_depth"):
            name += f"@d{row['n_depth']}"
        res[name] = float(row["avg_ts"])
    return res


def geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=Path, required=True, help="llama-bench of build A (e.g. vanilla)")
    ap.add_argument("--b", type=Path, required=True, help="llama-bench of build B (e.g. patched)")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("extra", nargs="*", help="llama-bench arguments (after --)")
    args = ap.parse_args()

    rounds: list[dict[str, Any]] = []
    for i in range(args.rounds):
        order = round_order(("a", "b"), i)
        got = {k: run_bench(getattr(args, k), args.model, args.threads, args.extra) for k in order}
        ratios = {t: got["b"][t] / got["a"][t] for t in got["a"]}
        rounds.append({"order": "".join(order), "a": got["a"], "b": got["b"], "ratio": ratios})
        print(f"round {i} ({''.join(order)}): " + "  ".join(f"{t} {got['a'][t]:.1f}/{got['b'][t]:.1f} "
              f"x{r:.3f}" for t, r in ratios.items()), flush=True)  # fmt: skip
    tests = list(rounds[0]["ratio"])
    summary = {
        t: {
            "a_median": statistics.median(r["a"][t] for r in rounds),
            "b_median": statistics.median(r["b"][t] for r in rounds),
            "ratio_geomean": geomean([r["ratio"][t] for r in rounds]),
            "ratio_min": min(r["ratio"][t] for r in rounds),
            "ratio_max": max(r["ratio"][t] for r in rounds),
        }
        for t in tests
    }
    for t, s in summary.items():
        print(f"{t:>12}: A {s['a_median']:.1f} t/s, B {s['b_median']:.1f} t/s, B/A x{s['ratio_geomean']:.3f} "
              f"(rounds x{s['ratio_min']:.3f}-x{s['ratio_max']:.3f})")  # fmt: skip
    args.out.write_text(json.dumps({"argv": sys.argv, "rounds": rounds, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
