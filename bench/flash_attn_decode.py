#!/usr/bin/env python3
"""Benchmark: decode and prompt speed at a long context with flash attention on, auto and off.

Whether a CPU plan should turn flash attention off: on the pinned tree the CPU flash-attention kernel
slows down faster with the context than the plain attention path when decoding, while prompts process
faster with it. One fresh server per configuration, ABAB order, each answering a ~2.8K-token prompt
(prompt cache off) twice; the server's own timings give ms per token.

    python bench/flash_attn_decode.py --patched PATCHED/bin/llama-server --vanilla VANILLA/bin/llama-server \
        --model SmolLM2-135M-Instruct.Q4_1.gguf --out fa.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from velollm_patch import serve
from velollm_patch.bench.runner import round_order

# the tuner's balanced CPU plan for SmolLM2 (chat workload), without its flash-attention and KV choices
BASE = [
    "--threads", "2", "--threads-batch", "2", "--ctx-size", "16384", "--parallel", "4", "--kv-unified",
    "--kv-unified-per-slot", "4096", "--cache-type-k", "f16", "--cache-type-v", "f16",
    "--batch-size", "2048", "--ubatch-size", "512",
]  # fmt: skip


def prompt() -> str:
    text = " ".join(f"Sentence number {i} talks about topic {i * 7 % 13} and item {i * 3 % 11}." for i in range(180))
    return f"<|im_start|>user\nSummarize this text:\n{text}<|im_end|>\n<|im_start|>assistant\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patched", type=Path, required=True, help="llama-server with the series (kv-on-demand)")
    ap.add_argument("--vanilla", type=Path, required=True, help="llama-server without patches")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=2, help="ABAB repetitions (default 2)")
    ap.add_argument("--n-predict", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    configs: dict[str, tuple[Path, list[str]]] = {
        "vanilla defaults (fa auto)": (args.vanilla, []),
        "fa on + kv-on-demand (balanced plan)": (args.patched, [*BASE, "--flash-attn", "on", "--kv-on-demand"]),
        "fa on": (args.patched, [*BASE, "--flash-attn", "on"]),
        "fa off": (args.patched, [*BASE, "--flash-attn", "off"]),
    }
    logs = Path(tempfile.mkdtemp(prefix="fa-bench-"))
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    for rep in range(args.reps):
        for index, name in enumerate(round_order(list(configs), rep)):
            binary, flags = configs[name]
            config = serve.ServerConfig(binary, args.model, tuple(flags), log_file=logs / f"{rep}-{index}.log")
            with serve.start_server(config, timeout=120) as server:
                serve.warm_up(server)
                for i in range(2):
                    # complete() sends cache_prompt=false: each request evaluates the whole prompt
                    timings = serve.complete(server, f"{i} {prompt()}", args.n_predict, timeout=600)["timings"]
                    samples[name].append({"prompt_n": timings["prompt_n"], "prompt_ms": timings["prompt_per_token_ms"],
                                          "decode_ms": timings["predicted_per_token_ms"]})  # fmt: skip
            print(name, [f"{s['prompt_ms']:.2f}/{s['decode_ms']:.1f}" for s in samples[name][-2:]], flush=True)
    summary = {
        name: {"prompt_tokens": rows[0]["prompt_n"],
               "prompt_ms_per_token": statistics.median(r["prompt_ms"] for r in rows),
               "decode_ms_per_token": statistics.median(r["decode_ms"] for r in rows),
               "cmd_flags": configs[name][1]}
        for name, rows in samples.items()
    }
    for name, row in summary.items():
        print(f"{name:38s} prompt {row['prompt_ms_per_token']:6.2f} ms/token  "
              f"decode {row['decode_ms_per_token']:6.2f} ms/token")
    result = {"argv": sys.argv, "summary": summary, "samples": samples, "logs": str(logs)}
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
