#!/usr/bin/env python3
"""Benchmark: a Modelfile DRAFT with a classic draft model, launched exactly as Ollama 0.30+ launches it.

Ollama passes every DRAFT as ``--spec-type draft-mtp`` (velollm_patch/ollama/launch.py transcribes its argument
list); patch ``spec-mtp-fallback`` runs a draft without MTP layers as draft-simple, by default with an adaptive
length up to ``draft_num_predict``. Variants, all with Ollama's arguments and environment:

- ``no DRAFT``: the model without a draft, what an Ollama user runs today (the speed reference);
- ``no DRAFT, batch-invariant``: the same with ``LLAMA_ARG_SPEC_BATCH_INVARIANT=on``, the kernels speculation
  runs on (patch 0013): the text every DRAFT variant must reproduce byte for byte;
- ``DRAFT adaptive``: ``DRAFT`` + ``draft_num_predict`` N (the patch's default mode);
- ``DRAFT fixed``: the same with ``LLAMA_ARG_SPEC_MTP_FALLBACK=fixed`` (N tokens every step).

Prompts: the product's own benchmark sets (velollm_patch/prompts, rendered as ChatML the way Ollama renders a
SmolLM2 template), greedy. Each round starts every variant's server in turn, warms it up with one request and
runs every prompt; the variant order is reversed on every other round. Decode speed is timings.predicted_n /
timings.predicted_ms summed over the prompts; the reported ratio is the median over rounds, with its range.

    python bench/ollama_draft.py --server PATH --target SmolLM2-135M-Instruct.F32.gguf \
        --draft SmolLM2-135M-Instruct.Q4_1.gguf --rounds 3 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velollm_patch.bench.runner import round_order
from velollm_patch.bench.scenarios import Prompt, load_scenario
from velollm_patch.ollama.launch import OllamaOptions, start_like_ollama


@dataclass(frozen=True)
class Variant:
    name: str
    draft: bool
    env: dict[str, str]


def variants() -> list[Variant]:
    return [
        Variant("no DRAFT", False, {}),
        Variant("no DRAFT, batch-invariant", False, {"LLAMA_ARG_SPEC_BATCH_INVARIANT": "on"}),
        Variant("DRAFT adaptive", True, {}),
        Variant("DRAFT fixed", True, {"LLAMA_ARG_SPEC_MTP_FALLBACK": "fixed"}),
    ]


def chatml(prompt: Prompt) -> str:
    """The chat as SmolLM2's ChatML template renders it, which is what Ollama sends to /completion."""
    turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in prompt)
    return turns + "<|im_start|>assistant\n"


def prompts(names: list[str], limit: int) -> list[tuple[str, int]]:
    """(ChatML prompt, n_predict) for the first ``limit`` prompts of each named set."""
    out: list[tuple[str, int]] = []
    for name in names:
        scenario = load_scenario(name)
        out += [(chatml(p), scenario.n_predict) for p in scenario.prompts[:limit]]
    return out


def run_variant(server: Path, target: Path, draft: Path, variant: Variant, options: OllamaOptions,
                work: list[tuple[str, int]], log_dir: Path) -> dict[str, Any]:
    env = {**os.environ, **variant.env}
    log = log_dir / f"{variant.name.replace(' ', '_').replace(',', '')}.log"
    with start_like_ollama(server, target, log, options, draft=draft if variant.draft else None,
                           ollama_environment=env) as running:
        def complete(prompt: str, n_predict: int) -> dict[str, Any]:
            response = running.request("POST", "/completion", json={
                "prompt": prompt, "n_predict": n_predict, "temperature": 0, "cache_prompt": False})
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

        complete(work[0][0], 16)  # warm-up
        results = [complete(prompt, n_predict) for prompt, n_predict in work]
    n = sum(r["timings"]["predicted_n"] for r in results)
    ms = sum(r["timings"]["predicted_ms"] for r in results)
    return {
        "decode_tps": n / (ms / 1000),
        "predicted_n": n,
        "drafted": sum(r["timings"].get("draft_n", 0) for r in results),
        "accepted": sum(r["timings"].get("draft_n_accepted", 0) for r in results),
        "texts": [r["content"] for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", type=Path, required=True, help="llama-server with patch spec-mtp-fallback")
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--draft", type=Path, required=True)
    parser.add_argument("--draft-num-predict", type=int, default=4, help="Ollama's default is 4")
    parser.add_argument("--sets", default="short,code_gen,conversation", help="prompt sets (velollm_patch/prompts)")
    parser.add_argument("--per-set", type=int, default=2, help="prompts taken from each set")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    options = OllamaOptions(draft_num_predict=args.draft_num_predict)
    work = prompts(args.sets.split(","), args.per_set)
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="ollama-draft-") as tmp:
        for i in range(args.rounds):
            measured = {v.name: run_variant(args.server, args.target, args.draft, v, options, work, Path(tmp))
                        for v in round_order(variants(), i)}
            rounds.append(measured)
            line = ", ".join(f"{name} {m['decode_tps']:.1f} tok/s" for name, m in measured.items())
            print(f"round {i + 1}: {line}", flush=True)

    reference = rounds[0]["no DRAFT, batch-invariant"]["texts"]
    summary: dict[str, Any] = {}
    for variant in variants():
        ratios = [r[variant.name]["decode_tps"] / r["no DRAFT"]["decode_tps"] for r in rounds]
        drafted = sum(r[variant.name]["drafted"] for r in rounds)
        summary[variant.name] = {
            "decode_tps_median": statistics.median(r[variant.name]["decode_tps"] for r in rounds),
            "ratio_vs_no_draft_median": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "acceptance": sum(r[variant.name]["accepted"] for r in rounds) / drafted if drafted else None,
            "identical_to_reference": all(r[variant.name]["texts"] == reference for r in rounds),
        }
    print(f"\n{len(work)} prompts ({args.sets}, {args.per_set} each), {args.rounds} rounds, "
          f"draft_num_predict {args.draft_num_predict}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print("| variant | decode tok/s (median) | x no DRAFT (median, range) | acceptance | text = reference |")
    print("|---|---:|---:|---:|---|")
    for name, s in summary.items():
        acc = f"{s['acceptance']:.2f}" if s["acceptance"] is not None else "-"
        lo, hi = s["ratio_range"]
        print(f"| {name} | {s['decode_tps_median']:.1f} | x{s['ratio_vs_no_draft_median']:.2f} ({lo:.2f}-{hi:.2f}) "
              f"| {acc} | {'yes' if s['identical_to_reference'] else 'NO'} |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
                                        "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
