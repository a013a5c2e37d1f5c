"""The bench's busy condition: a real spinning process, pinned, bounded, stopped; and how a result records it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import run_result
from velollm_patch.bench.load import QUIET, BackgroundLoad, Condition, bench_condition, default_core
from velollm_patch.bench.report import run_markdown
from velollm_patch.bench.runner import RunResult, load_result, save_result
from velollm_patch.errors import VelollmError

linux_only = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning needs sched_setaffinity")


def gone(pid: int, within: float = 30.0) -> bool:
    """Whether ``pid`` has exited (or is a zombie nobody reaped yet) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


@linux_only
def test_the_load_spins_pinned_in_its_own_group_and_stops() -> None:
    with BackgroundLoad() as load:
        assert load.running() and load.pid is not None
        pid = load.pid
        process = psutil.Process(pid)
        assert process.cpu_affinity() == [default_core()]
        assert os.getpgid(pid) == pid != os.getpgid(0)
        process.cpu_percent(None)
        time.sleep(0.5)
        assert process.cpu_percent(None) > 0  # it works, whatever share of the core it gets here
        assert load.condition() == Condition("busy", default_core(), load.max_seconds)
    assert not load.running() and load.pid is None
    assert gone(pid)


def test_the_load_ends_by_itself_after_its_time() -> None:
    load = BackgroundLoad(max_seconds=0.5)
    load.start()
    assert load.process is not None
    assert load.process.wait(timeout=60) == 0
    load.stop()


def test_the_load_ends_when_the_bench_dies() -> None:
    """A bench killed with SIGKILL runs no cleanup; the load notices its parent is gone and exits."""
    script = (
        "import os, sys\n"
        "from velollm_patch.bench.load import BackgroundLoad\n"
        "load = BackgroundLoad(core=0)\n"
        "load.start()\n"
        "print(load.pid, flush=True)\n"
        "os._exit(0)\n"  # no stop(), no finally
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1], check=True)
    assert gone(int(out.stdout.strip()))


def test_a_condition_stops_its_load_however_the_body_ends() -> None:
    with pytest.raises(RuntimeError), bench_condition("busy") as condition:
        assert condition.name == "busy"
        pids = [p.pid for p in psutil.Process().children() if "import os, sys, time" in " ".join(p.cmdline())]
        assert len(pids) == 1
        raise RuntimeError("the bench failed")
    assert gone(pids[0])
    with bench_condition("quiet") as quiet:
        assert quiet == QUIET and "no load" in quiet.describe()
    with pytest.raises(VelollmError, match="unknown bench condition"), bench_condition("noisy"):
        pass
    with pytest.raises(VelollmError, match="positive time limit"):
        BackgroundLoad(max_seconds=0)


def test_a_result_records_its_condition(tmp_path: Path) -> None:
    busy = Condition("busy", 1, 600.0)
    run = dataclasses.replace(run_result("patched", 100.0), condition=busy)
    loaded = load_result(save_result(run, tmp_path / "result.json"))
    assert isinstance(loaded, RunResult) and loaded.condition == busy
    assert "- condition: busy: one spinning process pinned to CPU 1, for at most 600 s" in run_markdown(loaded)
    # Results saved before conditions existed were measured without a load the bench started.
    data = run.to_dict()
    del data["condition"]
    assert RunResult.from_dict(data).condition == QUIET
