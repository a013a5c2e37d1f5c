"""Bench conditions: a quiet machine, or a busy one with a bounded background load on one core.

People run these servers on laptops and shared boxes, where another program keeps a core busy. llama.cpp's
threads spin at every barrier, so a thread that shares its core with another process stalls all the others
(issue #34: ``-t 2`` decoded at 2.5–10.8 tok/s beside another job where ``-t 1`` gave 184). The ``busy``
condition reproduces that: one spinning process pinned to one core, started before the measured server
(and before a tuned plan is made, so the tuner sees it) and killed when the run ends.

The load bounds itself: it exits after ``max_seconds`` and as soon as the process that started it is gone,
so neither a crashed bench nor a SIGKILL can leave a core spinning.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from velollm_patch.errors import VelollmError

CONDITIONS = ("quiet", "busy")
# Long enough for a whole A/B of the suite at its shipped lengths; the load stops with the bench anyway.
DEFAULT_MAX_SECONDS = 4 * 3600.0

# The spinning process: plain Python arithmetic (one core's worth of work, no memory traffic to speak of), with a
# look at the clock and at its parent every few milliseconds.
_SPIN = """\
import os, sys, time
deadline = time.monotonic() + float(sys.argv[1])
parent = int(sys.argv[2])
while time.monotonic() < deadline and os.getppid() == parent:
    for _ in range(20000):
        pass
"""


@dataclass(frozen=True)
class Condition:
    """What the machine was doing besides the measured server, as result.json records it."""

    name: str
    core: int | None = None
    """The core the load is pinned to; None when quiet, or where the OS cannot pin a process."""
    max_seconds: float | None = None

    def describe(self) -> str:
        if self.name == "quiet":
            return "quiet (no load started by the bench)"
        where = f"pinned to CPU {self.core}" if self.core is not None else "not pinned (the OS cannot pin here)"
        return f"busy: one spinning process {where}, for at most {self.max_seconds:.0f} s"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Condition:
        if not isinstance(data, dict):
            return QUIET
        return cls(str(data.get("name") or "quiet"), data.get("core"), data.get("max_seconds"))


QUIET = Condition("quiet")


def default_core() -> int:
    """The highest-numbered core this process may run on (core 0 often takes the OS's interrupts)."""
    return max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0


class BackgroundLoad:
    """One process spinning on one core, in its own process group. Use as a context manager."""

    def __init__(self, core: int | None = None, max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
        if max_seconds <= 0:
            raise VelollmError("the background load needs a positive time limit")
        self.core = default_core() if core is None else core
        self.max_seconds = max_seconds
        self.process: subprocess.Popen[bytes] | None = None
        self.pinned = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running():
            return
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _SPIN, str(self.max_seconds), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() kills it and nothing else
            )
        except OSError as exc:
            raise VelollmError(f"cannot start the background load: {exc}") from exc
        if hasattr(os, "sched_setaffinity"):
            try:
                os.sched_setaffinity(self.process.pid, {self.core})
                self.pinned = True
            except OSError as exc:
                self.stop()
                raise VelollmError(f"cannot pin the background load to CPU {self.core}: {exc}") from exc

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def condition(self) -> Condition:
        return Condition("busy", self.core if self.pinned else None, self.max_seconds)

    def __enter__(self) -> BackgroundLoad:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def bench_condition(name: str, max_seconds: float = DEFAULT_MAX_SECONDS) -> Iterator[Condition]:
    """Run the body under condition ``name``: ``quiet`` starts nothing, ``busy`` a :class:`BackgroundLoad`
    that is killed when the body ends, however it ends."""
    if name not in CONDITIONS:
        raise VelollmError(f"unknown bench condition '{name}': choose one of {', '.join(CONDITIONS)}")
    if name == "quiet":
        yield QUIET
        return
    with BackgroundLoad(max_seconds=max_seconds) as load:
        yield load.condition()
