"""The versioned patch series: which patches exist for which upstream pin, and applying them.

Layout: ``patches/<upstream>/<pin>/series.toml`` lists ``NNNN-slug.patch`` files in order (see the
series file itself for the fields). Applying is all or nothing on a fresh copy of the tree: every
patch is checked first, and a failure names the patch, the file and hunk, and the pin it was made
for. The cached upstream tree is never touched.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from velollm_patch import proc
from velollm_patch.errors import VelollmError
from velollm_patch.paths import resource_dir

UPSTREAM = "llama.cpp"


@dataclass(frozen=True)
class Patch:
    file: Path
    name: str
    summary: str
    flag: str  # runtime switch that turns the feature off/on; "" when there is nothing to switch
    env: str
    upstream_refs: tuple[str, ...]
    requires: tuple[str, ...] = ()  # patches of the series this one builds on (its code calls theirs)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.file.read_bytes()).hexdigest()

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "file": self.file.name, "summary": self.summary, "flag": self.flag,
            "env": self.env, "upstream_refs": list(self.upstream_refs), "sha256": self.sha256,
        }


@dataclass(frozen=True)
class Unavailable:
    """A patch of the series that this pin does not have, and why (written by ``patches rebase``)."""

    name: str
    reason: str


@dataclass(frozen=True)
class Series:
    directory: Path
    upstream: str
    pin: str
    upstream_commit: str
    level: int
    supports: tuple[str, ...]
    patches: tuple[Patch, ...]
    unavailable: tuple[Unavailable, ...] = ()

    def supports_commit(self, commit: str) -> bool:
        return any(commit.startswith(s) or s.startswith(commit) for s in self.supports) and len(commit) >= 7

    def select(self, selection: str) -> tuple[Patch, ...]:
        """``all``, ``none`` or a comma list of patch names, in series order."""
        if selection == "all":
            return self.patches
        if selection == "none":
            return ()
        wanted = [n.strip() for n in selection.split(",") if n.strip()]
        for gone in self.unavailable:
            if gone.name in wanted:
                raise VelollmError(f"patch {gone.name} is not available for llama.cpp {self.pin} ({gone.reason})")
        known = {p.name for p in self.patches}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise VelollmError(
                f"unknown patch {', '.join(unknown)} for llama.cpp {self.pin}; "
                f"available: {', '.join(sorted(known))} (or all, none)"
            )
        selected = tuple(p for p in self.patches if p.name in wanted)
        for patch in selected:
            missing = [r for r in patch.requires if r not in wanted]
            if missing:
                raise VelollmError(
                    f"patch {patch.name} builds on {', '.join(missing)}: add {', '.join(missing)} to --patches"
                )
        return selected

    def level_string(self, selected: Sequence[Patch]) -> str:
        """What the build stamps into llama-server; empty for a vanilla build."""
        if not selected:
            return ""
        return f"velollm-{self.level}:" + ",".join(p.name for p in selected)


def series_root() -> Path:
    """``$VELOLLM_PATCHES/<upstream>`` when set (for developing a series), else the shipped one."""
    override = os.environ.get("VELOLLM_PATCHES")
    return (Path(override) if override else resource_dir("patches")) / UPSTREAM


def load_series(directory: Path) -> Series:
    series_file = directory / "series.toml"
    try:
        data = tomllib.loads(series_file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise VelollmError(f"cannot read patch series {series_file}: {exc}") from exc
    try:
        head = data["series"]
        patches = []
        for entry in data.get("patch", []):
            path = directory / entry["file"]
            if not path.is_file():
                raise VelollmError(f"{series_file} lists {entry['file']}, which does not exist")
            patches.append(
                Patch(
                    file=path, name=entry["name"], summary=entry["summary"], flag=entry.get("flag", ""),
                    env=entry.get("env", ""), upstream_refs=tuple(entry.get("upstream_refs", [])),
                    requires=tuple(entry.get("requires", [])),
                )
            )
        series = Series(
            directory=directory, upstream=head["upstream"], pin=head["pin"],
            upstream_commit=head["upstream_commit"], level=int(head["level"]),
            supports=tuple(head["supports"]), patches=tuple(patches),
            unavailable=tuple(Unavailable(u["name"], u["reason"]) for u in data.get("unavailable", [])),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise VelollmError(f"{series_file} is malformed (missing or bad field {exc})") from exc
    names = [p.name for p in series.patches]
    if len(set(names)) != len(names):
        raise VelollmError(f"{series_file} names a patch twice")
    for patch in series.patches:
        earlier = names[: names.index(patch.name)]
        unknown = [r for r in patch.requires if r not in earlier]
        if unknown:
            raise VelollmError(f"{series_file}: {patch.name} requires {', '.join(unknown)}, not listed before it")
    return series


def all_series(root: Path | None = None) -> list[Series]:
    base = root or series_root()
    return [load_series(d) for d in sorted(base.iterdir()) if (d / "series.toml").is_file()]


def find_series(commit: str | None, root: Path | None = None) -> Series:
    """The series made for ``commit``; a clear error naming the supported pins otherwise."""
    candidates = all_series(root)
    pins = ", ".join(s.pin for s in candidates) or "none"
    if not commit:
        raise VelollmError(
            f"the source's llama.cpp commit is unknown, so no patch series can be chosen (series exist for {pins}); "
            "use a git checkout or the pinned sdist, or build with --patches none"
        )
    for series in candidates:
        if series.supports_commit(commit):
            return series
    raise VelollmError(
        f"no patch series supports llama.cpp {commit[:7]} (series exist for {pins}); "
        "use the default source or build with --patches none"
    )


@dataclass(frozen=True)
class PatchStatus:
    patch: Patch
    state: str  # "applies" | "applied" | "conflict"
    detail: str = ""


def check(series: Series, selected: Sequence[Patch], tree: Path) -> list[PatchStatus]:
    """Report for each patch whether it applies to ``tree``, is already applied, or conflicts.

    Later patches may depend on earlier ones, so only the first patch that neither applies nor is
    already applied is meaningful; the rest are reported relative to the unchanged tree.
    """
    return [_status(series, p, tree) for p in selected]


def apply(series: Series, selected: Sequence[Patch], tree: Path) -> list[PatchStatus]:
    """Apply ``selected`` in order to ``tree``, which must be a disposable copy.

    Already-applied patches are skipped. The first conflict raises, naming the patch, file and hunk;
    the caller throws the copy away, so a half-patched tree never survives.
    """
    done: list[PatchStatus] = []
    for patch in selected:
        status = _status(series, patch, tree)
        if status.state == "conflict":
            raise VelollmError(status.detail)
        if status.state == "applies":
            _git_apply(tree, patch, check_only=False)
        done.append(status)
    return done


def _status(series: Series, patch: Patch, tree: Path) -> PatchStatus:
    forward = _git_apply(tree, patch, check_only=True)
    if forward.returncode == 0:
        return PatchStatus(patch, "applies")
    if _git_apply(tree, patch, check_only=True, reverse=True).returncode == 0:
        return PatchStatus(patch, "applied", "already applied")
    where = _conflict_location(forward.output, patch.file)
    return PatchStatus(
        patch, "conflict",
        f"patch {patch.file.name} ({patch.name}) does not apply: {where}; it was made for llama.cpp "
        f"{series.pin} (series supports {', '.join(series.supports)}): use that pin or update the patch",
    )


def _git_apply(tree: Path, patch: Patch, *, check_only: bool, reverse: bool = False) -> proc.Result:
    args: list[str | Path] = ["git", "apply", "--verbose", "--whitespace=nowarn"]
    if check_only:
        args.append("--check")
    if reverse:
        args.append("--reverse")
    args.append(patch.file.resolve())
    # Without a ceiling, git would find an enclosing repository (e.g. a checkout holding the cache)
    # and silently skip paths outside the current directory.
    env = {"GIT_CEILING_DIRECTORIES": str(tree.resolve().parent)}
    return proc.run(args, cwd=tree, env=env, check=False)


def _conflict_location(output: str, patch_file: Path) -> str:
    """Turn git apply's first error into "file hunk #N at line L" (or "file does not exist")."""
    for line in output.splitlines():
        failed = re.match(r"error: patch failed: (\S+):(\d+)", line)
        if failed:
            file, start = failed.group(1), int(failed.group(2))
            hunk = _hunk_number(patch_file.read_text(errors="replace"), file, start)
            return f"{file} hunk #{hunk} (line {start})" if hunk else f"{file} at line {start}"
        missing = re.match(r"error: (\S+): No such file or directory", line)
        if missing:
            return f"{missing.group(1)} does not exist in this tree"
    lines = output.strip().splitlines()
    return lines[-1] if lines else "git apply failed"


def _hunk_number(patch_text: str, file: str, old_start: int) -> int | None:
    # git reports the failing hunk by its old start line; count hunks in that file's section.
    section = re.split(r"^diff --git ", patch_text, flags=re.M)
    for part in section:
        if part.startswith(f"a/{file} "):
            starts = [int(m) for m in re.findall(r"^@@ -(\d+)", part, flags=re.M)]
            if old_start in starts:
                return starts.index(old_start) + 1
    return None
