"""Which llama.cpp each Ollama release runs, and which llama.cpp release each known commit is.

Ollama 0.30+ builds its bundled ``llama-server`` from the upstream release tag in its ``LLAMA_CPP_VERSION``
file (``llama/server/CMakeLists.txt`` fetches that tag, shallow, and applies ``llama/compat/``). The table
below was read with ``git show <tag>:LLAMA_CPP_VERSION`` for every tag from v0.30.0-rc0 to v0.33.0-rc2 of
ollama/ollama (104 tags; HEAD fb30760 = v0.33.0-rc2).

llama.cpp names a release ``bNNNN``, NNNN being master's commit count (``cmake/build-info.cmake`` stamps the
same count as the build number into ``--version``). A build from a shallow clone or a source tarball has no
history and reports build 1 or 0, so a server is identified by its commit, and the table of known releases
turns a commit into the tag people name it by.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from velollm_patch.ollama.versions import OllamaVersion


@dataclass(frozen=True)
class LlamaCppRelease:
    """An upstream llama.cpp release: its tag number and, where a source names it, its commit."""

    build: int
    commit: str = ""  # a hex prefix (7+ digits) or the full sha; empty when no source names it

    @property
    def tag(self) -> str:
        return f"b{self.build}"

    def matches(self, commit: str) -> bool:
        """Whether ``commit`` (a hex prefix of 7+ digits) names this release's commit."""
        mine, theirs = self.commit.lower(), commit.lower()
        return bool(mine) and len(theirs) >= 7 and (mine.startswith(theirs) or theirs.startswith(mine))

    def __str__(self) -> str:
        return f"{self.tag} ({self.commit[:9]})" if self.commit else self.tag


# Releases whose commit a source names. Sources:
# - b10454 = 4df29be4f4c3: the tree llama-cpp-python 0.3.35 vendors (velollm-patch issue #31); a record of a
#   build of it reads "llama.cpp commit: 4df29be4f4c3673f428170fda944a5b19f743bb8, llama.cpp build: 10454".
# - b10488 = 9d77fa172: the b10488 release binaries print "version: 0.1.2-dev (build 10488, commit 9d77fa172)"
#   (quoted alike by several users of the release assets).
# - b11312 = 0c1e57098bba: the tree llama-cpp-python 0.3.36 vendors (velollm_patch/source.py PINS); servers built
#   from git at that commit print "build 11312" ("b11312-0c1e57098" in the records of two projects).
KNOWN_RELEASES: tuple[LlamaCppRelease, ...] = (
    LlamaCppRelease(10454, "4df29be4f4c3673f428170fda944a5b19f743bb8"),
    LlamaCppRelease(10488, "9d77fa172"),
    LlamaCppRelease(11312, "0c1e57098bba43ac29e6e3b677cdceebdd22334f"),
)

# (first Ollama release, llama.cpp tag number) in release order: a release runs the pin of the last entry at or
# before it. Each pin after 0.30.0 first shipped in a -rc0 and stayed until the next entry (0.30.12-rc0 has no
# final release, 0.31.0 kept its pin; 0.33.0-rc0..rc2 kept 0.32.15's). The 0.30.0 release candidates ran older
# pins (b9048..b9409) and are left out: they sort before 0.30.0, so they read as unknown.
_OLLAMA_PINS: tuple[tuple[OllamaVersion, int], ...] = tuple(
    (OllamaVersion.parse(version), build) for version, build in (
        ("0.30.0", 9452), ("0.30.1-rc0", 9479), ("0.30.4-rc0", 9493), ("0.30.5-rc0", 9509),
        ("0.30.9-rc0", 9626), ("0.30.10-rc0", 9672), ("0.30.11-rc0", 9781), ("0.30.12-rc0", 9840),
        ("0.31.2-rc0", 9888), ("0.32.2-rc0", 10069), ("0.32.3-rc0", 10091), ("0.32.6-rc0", 10242),
        ("0.32.8-rc0", 10353), ("0.32.10-rc0", 10380), ("0.32.14-rc0", 10434), ("0.32.15-rc0", 10488),
    )
)
# The newest release the table was read up to (v0.33.0-rc2); a later one may have moved the pin.
PINS_READ_UP_TO = OllamaVersion.parse("0.33.0")


def known_release(*, commit: str = "", build: int = 0) -> LlamaCppRelease | None:
    """The known release a ``--version``'s commit (or, failing that, its build number) names."""
    for release in KNOWN_RELEASES:
        if commit and release.matches(commit):
            return release
    # Build numbers 0 and 1 come from trees without history (source tarballs, shallow clones).
    if build > 1:
        return next((r for r in KNOWN_RELEASES if r.build == build), LlamaCppRelease(build))
    return None


def ollama_pin(version: OllamaVersion) -> LlamaCppRelease | None:
    """The llama.cpp release Ollama ``version`` bundles, or None when the table does not say (before 0.30.0,
    the 0.30.0 release candidates, or after :data:`PINS_READ_UP_TO`)."""
    if version > PINS_READ_UP_TO:
        return None
    index = bisect.bisect_right([start for start, _ in _OLLAMA_PINS], version) - 1
    if index < 0:
        return None
    build = _OLLAMA_PINS[index][1]
    return next((r for r in KNOWN_RELEASES if r.build == build), LlamaCppRelease(build))
