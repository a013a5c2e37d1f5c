"""The one place that runs subprocesses: every command is logged, output can be streamed line by
line to a callback (progress bars read ``[n/N]`` from it) and kept in a log file."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from velollm_patch.errors import VelollmError

log = logging.getLogger("velollm_patch.proc")

TAIL_LINES = 20


@dataclass(frozen=True)
class Result:
    args: list[str]
    returncode: int
    output: str

    def tail(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


class CommandFailed(VelollmError):
    """A command exited non-zero; ``result`` keeps its output for callers that explain it."""

    def __init__(self, message: str, result: Result) -> None:
        super().__init__(message)
        self.result = result


def format_command(args: Sequence[str | os.PathLike[str]]) -> str:
    return shlex.join(str(a) for a in args)


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float | None = None,
    on_line: Callable[[str], None] | None = None,
    log_file: Path | None = None,
    what: str | None = None,
    inherit_env: bool = True,
) -> Result:
    """Run ``args`` and return its combined stdout+stderr.

    ``env`` entries are added to the current environment (``inherit_env=False``: ``env`` is the whole
    environment, for a command that must not see some of ours). With ``on_line`` or ``log_file`` the
    output is streamed (a long build stays observable); otherwise it is captured whole. When
    ``check`` is true a non-zero exit raises :class:`CommandFailed` naming ``what`` failed.
    """
    argv = [str(a) for a in args]
    full_env = dict(env or {}) if not inherit_env else {**os.environ, **env} if env else None
    log.debug("run: %s%s", format_command(argv), f" (in {cwd})" if cwd else "")
    try:
        if on_line is None and log_file is None:
            proc = subprocess.run(
                argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace", timeout=timeout, check=False,
            )
            result = Result(argv, proc.returncode, proc.stdout)
        else:
            result = _run_streaming(argv, cwd, full_env, timeout, on_line, log_file)
    except FileNotFoundError as exc:
        raise VelollmError(f"{argv[0]} not found: install it or put it on PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise VelollmError(f"{what or argv[0]} did not finish within {timeout:.0f}s") from exc
    if check and result.returncode != 0:
        label = what or format_command(argv)
        last = result.tail(1).strip() or "no output"
        where = f"; full log: {log_file}" if log_file else ""
        raise CommandFailed(f"{label} failed (exit {result.returncode}): {last}{where}", result)
    return result


def _run_streaming(
    argv: list[str],
    cwd: Path | None,
    env: Mapping[str, str] | None,
    timeout: float | None,
    on_line: Callable[[str], None] | None,
    log_file: Path | None,
) -> Result:
    kept: deque[str] = deque(maxlen=2000)
    # line-buffered so `tail -f` on a build log follows the build
    log_handle = log_file.open("a", encoding="utf-8", buffering=1) if log_file else None
    timed_out = threading.Event()
    try:
        if log_handle:
            log_handle.write(f"$ {format_command(argv)}\n")
            log_handle.flush()
        # Its own process group, so that a timeout or Ctrl-C ends what it started too (cmake --build runs
        # ninja, which runs the compilers: killing cmake alone left them compiling). No terminal input: a
        # process group other than the foreground one would be stopped if it read the terminal.
        with subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", bufsize=1, process_group=0,
        ) as proc:
            # The output loop blocks until the command closes its output, so the timeout is a timer.
            watchdog = threading.Timer(timeout, _kill_group, (proc, timed_out)) if timeout is not None else None
            try:
                if watchdog is not None:
                    watchdog.daemon = True
                    watchdog.start()
                assert proc.stdout is not None
                for line in proc.stdout:
                    kept.append(line)
                    if log_handle:
                        log_handle.write(line)
                    if on_line:
                        on_line(line.rstrip("\n"))
                returncode = proc.wait()
            except BaseException:
                # Ctrl-C or a callback error: do not leave the command or its children running behind us.
                _kill_group(proc, None)
                proc.wait()
                raise
            finally:
                if watchdog is not None:
                    watchdog.cancel()
    finally:
        if log_handle:
            log_handle.close()
    if timed_out.is_set():
        assert timeout is not None
        raise subprocess.TimeoutExpired(argv, timeout, output="".join(kept))
    return Result(argv, returncode, "".join(kept))


def _kill_group(proc: subprocess.Popen[str], flag: threading.Event | None) -> None:
    if flag is not None:
        flag.set()
    with contextlib.suppress(ProcessLookupError):  # already gone, with every process of its group
        os.killpg(proc.pid, signal.SIGKILL)
