#!/usr/bin/env python3
"""Benchmark: the tuner's planned memory against the server's measured RSS (issue #6).

The plan's memory figure is the worst case the budget must hold: weights + a KV cache with every slot full +
compute buffers (by ``llama-fit-params``, the build's own dry run, or arithmetic from GGUF metadata). This
script starts an installed build (``--build``, default: the newest patched one) with the plan
(``velollm_patch.tune.plan_for``, no draft model), reads the RSS of the server process idle, then fills every
slot to its planned context with concurrent requests (one per slot, ``id_slot``), samples the RSS while they
run, and reports measured / planned at that point. For a sliding-window model every slot is filled in as many
growing turns as it takes to make the planned number of context checkpoints (two per completion), so that they
too are at their worst case. When the plan has a prompt cache (``--cache-ram``), a second set of conversations
then fills the slots again, which saves the first set into the cache up to its planned limit. With on-demand KV
(patch 0002) the idle server holds no KV, no checkpoints and no cached prompts, so the idle RSS is also compared
with ``total - kv - checkpoints - prompt cache``.

    python bench/plan_memory.py --model smollm2-135m --workload chat --out plan-memory.json
    python bench/plan_memory.py --model smollm2-135m --workload chat --ctx 2048 --slots 2 --out small.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kv_memory import fill_text  # bench/kv_memory.py, beside this script

from velollm_patch import builds, hardware, serve, tune
from velollm_patch.bench.metrics import MemorySampler
from velollm_patch.paths import get_paths
from velollm_patch.units import MiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="GGUF path, demo-model or Ollama name")
    ap.add_argument("--workload", default="chat", choices=tune.WORKLOADS)
    ap.add_argument("--profile", default="balanced", choices=tune.PROFILES)
    ap.add_argument("--ctx", type=int, help="context per slot (default: the tuner's choice)")
    ap.add_argument("--slots", type=int, help="slots (default: the tuner's choice)")
    ap.add_argument("--build", default="patched", help="build id, current, vanilla or patched")
    ap.add_argument("--n-predict", type=int, default=16, help="tokens generated per slot after its prompt")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    paths = get_paths()
    hw = hardware.detect(build_dir=paths.cache)
    build = builds.find_build(paths, args.build)
    request = tune.TuneRequest(args.profile, args.workload, args.ctx, args.slots, draft="none")
    plan = tune.plan_for(args.model, hw, build, paths, request)
    for line in plan.describe():
        print(line)
    s = plan.settings
    mem = plan.memory
    log = Path(tempfile.mkdtemp(prefix="plan-memory-")) / "server.log"
    config = serve.ServerConfig(binary=build.bin("llama-server"), model=plan.model.path, args=plan.args,
                                log_file=log)  # fmt: skip
    server = serve.start_server(config, timeout=300)
    try:
        serve.warm_up(server)
        time.sleep(1.0)
        idle = server.rss_bytes()
        # every slot asks for its whole planned context: prompt + n_predict (a few tokens of headroom)
        n_prompt = s.ctx_per_slot - args.n_predict - 8
        prompts = [f"Story {i}. " + fill_text(server, n_prompt) for i in range(s.slots)]
        # each turn extends the previous one's prompt, as a conversation does, so its checkpoints stay valid
        turns = max(1, math.ceil((s.ctx_checkpoints or 0) / 2))
        # with a prompt cache, a second set of conversations takes the slots over: the first set is saved to the
        # cache (slots go idle or start a new prompt), which then holds a copy of every slot, the planned limit
        rounds = 2 if s.cache_ram_mib else 1
        for i in range(s.slots, s.slots * rounds):
            prompts.append(f"Story {i}. " + fill_text(server, n_prompt))
        sampler = MemorySampler(lambda: [server.pid], interval_s=0.05)
        sampler.start()
        t0 = time.monotonic()
        try:
            with concurrent.futures.ThreadPoolExecutor(s.slots) as pool:
                for r in range(rounds):
                    for turn in range(1, turns + 1):
                        cut = [p[: len(p) * turn // turns] for p in prompts[r * s.slots : (r + 1) * s.slots]]
                        futures = [pool.submit(serve.complete, server, p, args.n_predict, timeout=3600, id_slot=i,
                                               cache_prompt=True) for i, p in enumerate(cut)]  # fmt: skip
                        results = [f.result() for f in futures]
            fill_s = time.monotonic() - t0
            peak_rss = sampler.peaks()[0] or server.rss_bytes()
        finally:
            sampler.stop()
        held = sum(int(r["timings"].get(k, 0)) for r in results for k in ("cache_n", "prompt_n", "predicted_n"))
        metrics = server.metrics() if "--metrics" in plan.args else {}
    finally:
        server.stop()

    planned_idle = (
        mem.total_bytes - mem.checkpoint_bytes - mem.prompt_cache_bytes - (mem.kv_bytes if mem.kv_on_demand else 0)
    )
    report: dict[str, Any] = {
        "argv": sys.argv,
        "plan": plan.to_dict(),
        "turns": turns,
        "rounds": rounds,
        "tokens_held": held,
        "tokens_planned": s.ctx_per_slot * s.slots,
        "fill_s": fill_s,
        "idle_rss_bytes": idle,
        "full_peak_rss_bytes": peak_rss,
        "planned_total_bytes": mem.total_bytes,
        "planned_idle_bytes": planned_idle,
        "full_over_planned": peak_rss / mem.total_bytes,
        "idle_over_planned_idle": idle / planned_idle,
        "kv_committed_bytes": metrics.get("kv_committed_bytes"),
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"tokens held {held} of {s.ctx_per_slot * s.slots} planned ({fill_s:.0f} s)")
    print(f"full: RSS {peak_rss / MiB:.1f} MiB vs planned {mem.total_bytes / MiB:.1f} MiB "
          f"(x{report['full_over_planned']:.3f})")  # fmt: skip
    print(f"idle: RSS {idle / MiB:.1f} MiB vs planned {planned_idle / MiB:.1f} MiB "
          f"(x{report['idle_over_planned_idle']:.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
