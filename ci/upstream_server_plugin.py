"""pytest plugin loaded into llama.cpp's own server test suite by ci/upstream_server_tests.py (``-p``).

It runs inside upstream's pytest process (cwd: a copy of ``tools/server/tests``), and does four things:

- ``wget`` (upstream's ``download_file``) is replaced by a stub that fails: every file the suite downloads is
  either pre-filled (the speculative draft) or its tests are deselected, so a download attempt is a mistake in
  the substitutes, and it must fail the test on both builds alike instead of hanging on an unreachable host;
- ``ServerPreset.load_all`` (a session fixture that starts every preset online to fill the model cache) does
  nothing: the cache is pre-filled and there is no network;
- the tests that need what cannot be substituted are deselected, each with its reason
  (``DESELECTED`` in ci/upstream_server_tests.py); the list goes into the outcomes file;
- every test's outcome (passed, failed, error, skipped, with the failure's one-line message) is written to the
  JSON file named by ``VELOLLM_UST_OUTCOMES``, so the runner compares builds test by test.
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from ci import upstream_server_tests as ust


def _offline_download(url: str, out: str | None = None, bar: object = None) -> str:
    raise RuntimeError(f"velollm upstream lane: no network, and no local substitute for {url}")


# Before upstream's conftest imports utils (which imports wget at the top): -p plugins load first.
_wget = types.ModuleType("wget")
_wget.download = _offline_download  # type: ignore[attr-defined]
sys.modules["wget"] = _wget


class _Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tests: dict[str, dict[str, Any]] = {}
        self.deselected: dict[str, str] = {}
        self.started = time.time()

    def record(self, report: pytest.TestReport) -> None:
        entry = self.tests.setdefault(report.nodeid, {"outcome": "passed", "message": "", "seconds": 0.0})
        entry["seconds"] = round(entry["seconds"] + report.duration, 2)
        outcome: str
        if report.when == "call":
            outcome = report.outcome
        elif report.outcome == "failed":
            # a fixture failed (the server did not start, a teardown raised): not the test's assertions
            outcome = "error" if entry["outcome"] == "passed" else entry["outcome"]
        elif report.outcome == "skipped":
            outcome = "skipped"
        else:
            return
        if outcome != entry["outcome"]:
            entry["outcome"] = outcome
            entry["message"] = _message(report)

    def write(self) -> None:
        data = {"tests": self.tests, "deselected": self.deselected, "seconds": round(time.time() - self.started, 1)}
        self.path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def _message(report: pytest.TestReport) -> str:
    if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr or "")
    return " ".join(text.split())[:600]


_recorder: _Recorder | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _recorder
    path = os.environ.get(ust.OUTCOMES_ENV)
    if path:
        _recorder = _Recorder(Path(path))


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = [], []
    for item in items:
        reason = ust.deselection_reason(item.nodeid, tuple(getattr(item, "fixturenames", ())))
        if reason is None:
            kept.append(item)
        else:
            dropped.append(item)
            if _recorder is not None:
                _recorder.deselected[item.nodeid] = reason
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    # upstream's conftest imported utils by now; load_all runs later, in the first test's setup
    utils = sys.modules.get("utils")
    if utils is not None:
        utils.ServerPreset.load_all = staticmethod(lambda: None)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _recorder is not None:
        _recorder.record(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _recorder is not None:
        _recorder.write()
