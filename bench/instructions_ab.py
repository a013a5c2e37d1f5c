#!/usr/bin/env python3
"""Benchmark: instructions executed by two llama.cpp builds for the same work, counted by valgrind (callgrind).

Used for issue #3's "switch off >= 0.99x vanilla" target. On a shared VM tokens/s drift by 2-3 % between
minutes even for one binary against itself (``llama_bench_ab.py``'s null test), and there are no hardware
counters (``perf stat``: not supported), so a 1 % bound cannot be resolved by timing. Callgrind counts the
instructions a program executes; for the same binary, model and arguments the count is the same on every run,
whatever else the machine is doing. It does not see time spent in the kernel (page faults) or cache effects,
so it shows what the code does, next to the timed A/Bs, not instead of them.

Each test is one ``llama-bench`` run (one thread, one repetition, no warm-up) under callgrind, counting only
inside ``llama_context::decode`` (``--toggle-collect``; a toggle on the C wrapper ``llama_decode`` counted
nothing): prompt processing, decoding from an empty context, and a 512-token prompt followed by decoding (``-d``
fills the context through the same function, so that test counts both). Order A, B, A: the second A run checks
that the count repeats.

valgrind does not run AVX-512 code, so both builds must be made without it, for example:

    cmake -S SRC -B BUILD -GNinja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON \
        -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF && cmake --build BUILD --target llama-bench
    python bench/instructions_ab.py --a VANILLA_BUILD/bin/llama-bench --b PATCHED_BUILD/bin/llama-bench \
        --model SmolLM2-135M-Instruct.Q4_1.gguf --out ir.json

(``velollm-patch patches apply --patches none|all --out SRC`` writes the two source trees.)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# name -> llama-bench arguments; small sizes, because callgrind runs the program ~50x slower
TESTS: dict[str, list[str]] = {
    "prompt 128": ["-p", "128", "-n", "0"],
    "decode 16 from an empty context": ["-p", "0", "-n", "16"],
    "prompt 512 then decode 16": ["-p", "0", "-n", "16", "-d", "512"],
}

TOTALS = re.compile(r"^(?:totals|summary):\s+(\d+)", re.MULTILINE)


def count_instructions(binary: Path, model: Path, bench_args: list[str], extra: list[str], workdir: Path) -> int:
    """Instructions executed inside llama_context::decode by one llama-bench run."""
    out_file = workdir / "callgrind.out"
    cmd = [
        "valgrind", "--tool=callgrind", "--toggle-collect=llama_context::decode*", f"--callgrind-out-file={out_file}",
        str(binary), "-m", str(model), "-t", "1", "-r", "1", "--no-warmup", "-fa", "1", *bench_args, *extra,
    ]  # fmt: skip
    # not velollm_patch.proc.run: this is a measurement of someone else's binary, and valgrind's log is stderr
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"{binary} under valgrind failed (exit {done.returncode}): " + " | ".join(tail))
    found = TOTALS.search(out_file.read_text())
    if found is None:
        raise SystemExit(f"no instruction total in {out_file}: is this valgrind's callgrind output?")
    out_file.unlink()
    return int(found.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=Path, required=True, help="llama-bench of build A (e.g. vanilla)")
    ap.add_argument("--b", type=Path, required=True, help="llama-bench of build B (e.g. patched)")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--tests", default=",".join(TESTS), help="comma list of: " + ", ".join(TESTS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("extra", nargs="*", help="more llama-bench arguments for both builds (after --)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind was not found: install it (apt-get install valgrind)")
    names = [t.strip() for t in args.tests.split(",") if t.strip()]
    unknown = [t for t in names if t not in TESTS]
    if unknown:
        raise SystemExit(f"unknown test {unknown[0]!r}: choose from {', '.join(TESTS)}")

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="velollm-ir-") as tmp:
        for name in names:
            runs = {
                label: count_instructions(getattr(args, label[0]), args.model, TESTS[name], args.extra, Path(tmp))
                for label in ("a", "b", "a again")
            }
            results[name] = {**runs, "b_over_a": runs["b"] / runs["a"], "a_repeat_over_a": runs["a again"] / runs["a"]}
            print(f"{name:>36}: A {runs['a']:,}  B {runs['b']:,}  B/A x{results[name]['b_over_a']:.5f}  "
                  f"(A again x{results[name]['a_repeat_over_a']:.5f})", flush=True)  # fmt: skip
    args.out.write_text(json.dumps({"argv": sys.argv, "tests": TESTS, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
