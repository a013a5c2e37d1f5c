"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

from velollm_patch.hardware import HardwareInfo

HARDWARE_DATA = Path(__file__).parent / "data" / "hardware"

# The patch that repacks Q4_1 weights on x86 CPUs with AVX2. The planner needs no knowledge of it (its dry run
# shows the repacked copies), but tests that compare kernels or buffers do.
CPU_REPACK_Q4_1_PATCH = "cpu-repack-q4-1"


def recorded_hardware(name: str) -> HardwareInfo:
    """A machine recorded in tests/data/hardware/NAME.json (h100, rtx3060, rtx4090, m2max, ...)."""
    return HardwareInfo.from_dict(json.loads((HARDWARE_DATA / f"{name}.json").read_text()))
