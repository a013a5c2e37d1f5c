"""Ollama release versions and the feature boundaries between them.

Ollama changed its inference engine twice (docs/ollama.md, Eras): era A ran an
``ollama_llama_server`` subprocess, era B linked llama.cpp into an ``ollama runner`` subprocess,
and era C (0.30.0+) runs upstream ``llama-server``. Which Modelfile commands, parameters and
environment variables mean anything depends on the release, so every generator and checker
here takes a target version and asks this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from velollm_patch.errors import VelollmError

_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?")


class Era(Enum):
    A = "A"  # <= 0.3.x: ollama_llama_server subprocess
    B = "B"  # 0.4.0 - 0.24.x: `ollama runner` with cgo llama.cpp or the Go engine
    C = "C"  # 0.30.0+: upstream llama-server subprocess for every GGUF model


@dataclass(frozen=True, order=True)
class OllamaVersion:
    """A release number; a pre-release sorts before its release (0.30.0-rc1 < 0.30.0)."""

    major: int
    minor: int
    patch: int
    # Field order is comparison order: a pre-release (final=False) sorts before its release.
    final: bool = True
    prerelease: str = ""

    @classmethod
    def parse(cls, text: str) -> OllamaVersion:
        match = _VERSION.fullmatch(text.strip())
        if not match:
            raise VelollmError(f"not an Ollama version: {text!r} (expected e.g. 0.30.1)")
        major, minor, patch, pre = match.groups()
        return cls(int(major), int(minor), int(patch), final=not pre, prerelease=pre or "")

    @property
    def era(self) -> Era:
        if self < ERA_B_START:
            return Era.A
        if self < ERA_C_START:
            return Era.B
        return Era.C

    def __str__(self) -> str:
        base = f"{self.major}.{self.minor}.{self.patch}"
        return f"{base}-{self.prerelease}" if self.prerelease else base


def parse_reported_version(text: str) -> OllamaVersion | None:
    """The version ``/api/version`` reports, or None when it says nothing usable.

    Source builds without release ldflags report Ollama's placeholder ``0.0.0``; treating that as
    a real (ancient) release would refuse every feature, so it counts as unknown.
    """
    version = OllamaVersion.parse(text)
    return None if (version.major, version.minor, version.patch) == (0, 0, 0) else version


ERA_B_START = OllamaVersion(0, 4, 0)
ERA_C_START = OllamaVersion(0, 30, 0)
# The Modelfile state machine is byte-identical from 0.5.0 on; only the command set grew.
PARSER_STABLE_SINCE = OllamaVersion(0, 5, 0)
RENDERER_PARSER_SINCE = OllamaVersion(0, 12, 0)
REQUIRES_SINCE = OllamaVersion(0, 14, 0)
DRAFT_SINCE = OllamaVersion(0, 23, 1)
KV_CACHE_TYPE_SINCE = OllamaVersion(0, 5, 0)
# The release docs/ollama.md was read at (tag v0.33.0-rc2); the default target for generators.
LATEST_KNOWN = OllamaVersion(0, 33, 0)
