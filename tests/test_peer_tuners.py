"""bench/peer_tuners.py's parsing of the peers' output and of llama-server's --help (no peer or server runs here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from velollm_patch.errors import VelollmError


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "peer_tuners.py"
    spec = importlib.util.spec_from_file_location("peer_tuners", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["peer_tuners"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


pt = _load()

# Lines of `llama-server --help` at 0c1e570, as printed (names padded to a column, wrapped descriptions).
HELP = """\
----- common params -----

-h,    --help, --usage                  print usage and exit
-t,    --threads N                      number of CPU threads to use during generation (default: -1)
-c,    --ctx-size N                     size of the prompt context (default: 0, 0 = loaded from model)
-fa,   --flash-attn [on|off|auto]       set Flash Attention use ('on', 'off', or 'auto', default: 'auto')
--prio N                                set process/thread priority : low(-1), normal(0), medium(1), high(2),
-fit,  --fit [on|off]                   whether to adjust unset arguments to fit in device memory ('on' or
-fitt, --fit-target MiB0,MiB1,MiB2,...
                                        target margin per device for --fit, comma-separated list of values,
-kvu,  --kv-unified, -no-kvu, --no-kv-unified
--metrics                               enable prometheus compatible metrics endpoint (default: disabled)
"""


def test_accepted_flags_reads_names_and_whether_they_take_a_value() -> None:
    flags = pt.accepted_flags(HELP)
    assert flags["-t"] and flags["--threads"] and flags["-fa"] and flags["--fit"] and flags["-fitt"]
    assert not flags["-kvu"] and not flags["--no-kv-unified"] and not flags["--metrics"] and not flags["--usage"]
    assert "-----" not in flags and "target" not in flags


def test_usable_args_drops_what_this_server_rejects_and_the_bench_owns() -> None:
    # clanker-gguf's command for ik_llama.cpp: a bare --fit and its --fit-margin, which mainline lacks
    raw = ["-m", "x.gguf", "--fit", "--fit-margin", "1664", "-c", "8192", "-t", "1", "--prio", "-1", "-kvu",
           "--metrics", "--port", "8080"]  # fmt: skip
    args, dropped = pt.usable_args(raw, pt.accepted_flags(HELP))
    assert args == ["-c", "8192", "-t", "1", "--prio", "-1", "-kvu"]
    assert dropped == ["--fit: this llama-server needs a value for it",
                       "--fit-margin 1664: not a flag of this llama-server"]  # fmt: skip


def test_group_flags_refuses_a_leading_value() -> None:
    with pytest.raises(VelollmError, match="start with a value"):
        pt.group_flags(["8192", "-c"])


def test_parse_mdl_takes_the_first_pick() -> None:
    out = {"picks": [{"argv": ["llama-server", "-m", "/m/a b.gguf", "-c", "8192", "-fa", "on", "--metrics"]},
                     {"argv": ["llama-server", "-m", "/m/a b.gguf", "-c", "4096"]}]}  # fmt: skip
    assert pt.parse_mdl(json.dumps(out)) == ["-m", "/m/a b.gguf", "-c", "8192", "-fa", "on", "--metrics"]
    with pytest.raises(VelollmError, match="no pick"):
        pt.parse_mdl(json.dumps({"picks": []}))


def test_parse_clanker_takes_its_last_command_line() -> None:
    out = ("⚠ no nvidia gpu detected; generating cpu-only command\n║  Mode: FITT (keep 1664 MB free)\n\n"
           "llama-server -m /m/x.gguf --fit --fit-margin 1664 -c 8192 -np 1 -ctk q8_0 -t 1 -ub 2048\n")  # fmt: skip
    assert pt.parse_clanker(out)[-4:] == ["-t", "1", "-ub", "2048"]
    with pytest.raises(VelollmError, match="no llama-server command"):
        pt.parse_clanker("model: llama | 30 layers\n")


def test_parse_optimus_reads_its_server_line() -> None:
    line = " $LLAMA_BIN/llama-server --model $MODEL -t 2 --batch-size 3309 --ubatch-size 1473 -ngl 0 --flash-attn "
    assert pt.optimus_server_line(line)
    accepted = {"-t": True, "--batch-size": True, "--ubatch-size": True, "-ngl": True, "--flash-attn": True}
    args, dropped = pt.usable_args(pt.parse_optimus(line), accepted)
    assert args == ["-t", "2", "--batch-size", "3309", "--ubatch-size", "1473", "-ngl", "0"]
    assert dropped == ["--flash-attn: this llama-server needs a value for it"]
