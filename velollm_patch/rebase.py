"""Carry a patch series onto another upstream tree (``velollm-patch patches rebase --onto SOURCE``).

A patch that does not apply to another llama.cpp commit mostly fails on context: upstream moved or rewrote
lines near ours. ``git apply`` alone cannot tell that from a real conflict, so the rebase replays the series
the way ``git rebase`` would, in a scratch repository:

1. the series' own pin is committed, then each patch on top of it, so every patch's preimage exists;
2. the target tree is committed beside them, and each patch is cherry-picked onto it in series order, a
   three-way merge with the patch's own base.

Each patch ends up in one state, reported per patch:

``clean``       ``git apply`` takes it as it is;
``offsets``     it applies with its hunks at other lines;
``merged``      only the three-way merge places it (upstream changed lines near ours);
``upstream``    the target already has the change (the patch applies in reverse);
``conflict``    upstream changed the lines themselves: the file, the hunk and both sides are reported;
``needs``       its context is upstream code the target does not have yet (the target is older than the pin),
                or the patch builds on one that is unavailable.

What applies is written as ``patches/llama.cpp/<target>/``: the same files, names, flags and level, each diff
regenerated against the target, and an ``[[unavailable]]`` entry with the reason for each patch that is not
there. The directory appears complete or not at all.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from velollm_patch import proc
from velollm_patch.errors import VelollmError
from velollm_patch.ollama.pins import known_release
from velollm_patch.patches import Patch, Series

STATES = ("clean", "offsets", "merged", "upstream", "conflict", "needs")
_GIT_IDENTITY = ("-c", "user.name=velollm-patch", "-c", "user.email=patches@velollm.invalid")
# A conflict as merge.conflictStyle=diff3 writes it: upstream's side, the patch's base, the patch's side.
_CONFLICT = re.compile(
    r"^<<<<<<< [^\n]*\n(.*?)^\|\|\|\|\|\|\| [^\n]*\n(.*?)^=======\n(.*?)^>>>>>>> [^\n]*\n", re.M | re.S)


@dataclass(frozen=True)
class RebaseStatus:
    patch: Patch
    state: str  # one of STATES
    detail: str = ""
    diff: str = ""  # the patch regenerated against the target (applied states only)

    @property
    def applied(self) -> bool:
        return self.state in ("clean", "offsets", "merged")


@dataclass(frozen=True)
class RebaseResult:
    series: Series
    target_commit: str
    statuses: tuple[RebaseStatus, ...]


class _Repo:
    """A scratch git repository; every command runs with git's identity and no enclosing repository."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {"GIT_CEILING_DIRECTORIES": str(root.parent)}

    def git(self, *args: str | Path, check: bool = True) -> proc.Result:
        return proc.run(["git", *_GIT_IDENTITY, *args], cwd=self.root, env=self.env, check=check,
                        what=f"git {args[0]}")

    def commit_tree(self, tree: Path, message: str) -> str:
        """Make the work tree exactly ``tree`` and commit it."""
        for entry in self.root.iterdir():
            if entry.name != ".git":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        shutil.copytree(tree, self.root, symlinks=True, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
        self.git("add", "-A", "-f")
        self.git("commit", "-q", "--allow-empty", "-m", message)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").output.strip()


def rebase(series: Series, pin_tree: Path, target_tree: Path, target_commit: str,
           on_patch: Callable[[RebaseStatus], None] | None = None) -> RebaseResult:
    """Replay ``series`` (made for ``pin_tree``) onto ``target_tree``; nothing outside a scratch directory
    changes."""
    with tempfile.TemporaryDirectory(prefix="velollm-rebase-") as scratch:
        repo = _Repo(Path(scratch) / "repo")
        repo.root.mkdir()
        repo.git("init", "-q")
        repo.commit_tree(pin_tree, f"llama.cpp {series.pin}")
        patched: dict[str, str] = {}  # patch name -> its commit on the pin
        for patch in series.patches:
            applied = repo.git("apply", "--index", "--whitespace=nowarn", patch.file.resolve(), check=False)
            if applied.returncode != 0:
                raise VelollmError(
                    f"{patch.file.name} does not apply to its own pin {series.pin}: the series is broken")
            repo.git("commit", "-q", "-m", patch.name)
            patched[patch.name] = repo.head()
        repo.git("checkout", "-q", "--orphan", "target")
        repo.commit_tree(target_tree, f"llama.cpp {target_commit}")
        older = _is_older(target_commit, series.upstream_commit)
        statuses: list[RebaseStatus] = []
        unavailable: list[Patch] = []
        for patch in series.patches:
            status = _replay(repo, patch, patched[patch.name], older, unavailable)
            if not status.applied:
                unavailable.append(patch)
            statuses.append(status)
            if on_patch:
                on_patch(status)
    return RebaseResult(series, target_commit, tuple(statuses))


def _is_older(commit: str, than: str) -> bool | None:
    """Whether upstream ``commit`` predates ``than``, from the release numbers known for both; None if unknown."""
    mine, theirs = known_release(commit=commit), known_release(commit=than)
    return None if mine is None or theirs is None else mine.build < theirs.build


def _replay(repo: _Repo, patch: Patch, commit: str, older: bool | None,
            unavailable_patches: list[Patch]) -> RebaseStatus:
    unavailable = [p.name for p in unavailable_patches]
    builds_on = [name for name in patch.requires if name in unavailable]
    if builds_on:
        return RebaseStatus(patch, "needs", f"builds on {', '.join(builds_on)}, unavailable on this tree")
    file = patch.file.resolve()
    if repo.git("apply", "--check", "--reverse", "--whitespace=nowarn", file, check=False).returncode == 0:
        return RebaseStatus(patch, "upstream", "the target already has this change")
    plain = repo.git("apply", "--check", "--verbose", "--whitespace=nowarn", file, check=False)
    before = repo.head()
    picked = repo.git("-c", "merge.conflictStyle=diff3", "cherry-pick", "--no-rerere-autoupdate", commit, check=False)
    if picked.returncode == 0:
        diff = repo.git("diff", "--no-color", before, "HEAD").output
        if plain.returncode != 0:
            return RebaseStatus(patch, "merged", "placed by a three-way merge", diff)
        offsets = re.findall(r"Hunk #\d+ succeeded at \d+ \(offset -?\d+ lines?\)", plain.output)
        if offsets:
            return RebaseStatus(patch, "offsets", f"{len(offsets)} hunk(s) at other lines", diff)
        return RebaseStatus(patch, "clean", "", diff)
    conflicted = repo.git("diff", "--name-only", "--diff-filter=U").output.split()
    blocks = {name: _CONFLICT.findall(_read(repo.root / name)) for name in conflicted}
    repo.git("cherry-pick", "--abort", check=False)
    if not conflicted:
        return RebaseStatus(patch, "conflict", picked.tail(1).strip() or "git cherry-pick failed")
    # A hunk's context may be an earlier patch's lines: with that patch missing, this one cannot apply either.
    base_lines = {line.strip() for found in blocks.values() for _, base, _ in found for line in base.splitlines()}
    before_it = [p.name for p in unavailable_patches if base_lines & _added_lines(p)]
    if before_it:
        return RebaseStatus(patch, "needs", f"its context includes lines of {', '.join(before_it)}, unavailable here")
    conflicts = "; ".join(_describe(name, blocks[name]) for name in conflicted)
    if older:
        return RebaseStatus(patch, "needs", f"patches upstream code the target does not have yet ({conflicts})")
    return RebaseStatus(patch, "conflict", conflicts)


def _added_lines(patch: Patch) -> set[str]:
    """The lines ``patch`` adds that are long enough to be its own (not a brace, an #endif or a blank)."""
    added = (line[1:].strip() for line in patch.file.read_text(errors="replace").splitlines()
             if line.startswith("+") and not line.startswith("+++"))
    return {line for line in added if len(line) > 20}


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _describe(name: str, blocks: list[tuple[str, str, str]]) -> str:
    """``name``: both sides of its first conflict."""
    if not blocks:
        return f"{name} (deleted or added on one side)"
    ours, _, theirs = blocks[0]
    return f"{name}: upstream {_first_line(ours)!r}, patch {_first_line(theirs)!r}"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0][:80] + (" …" if len(lines) > 1 else "")) if lines else "(nothing)"


def write_series(result: RebaseResult, root: Path, pin: str) -> Path:
    """Write what applied as ``root/<pin>/`` (complete, or not at all); refuses an existing series."""
    dest = root / pin
    if dest.exists():
        raise VelollmError(f"{dest} already exists: remove it to rebase again")
    applied = [s for s in result.statuses if s.applied]
    if not applied:
        raise VelollmError(f"no patch of series {result.series.pin} applies to llama.cpp {pin}: nothing written")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{pin}-", dir=root))
    try:
        for status in applied:
            text = _with_header(status.patch.file, status.diff)
            (staging / status.patch.file.name).write_text(text, encoding="utf-8")
        (staging / "series.toml").write_text(_series_toml(result, pin), encoding="utf-8")
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _with_header(original: Path, diff: str) -> str:
    """The original patch's message (everything before its first diff) with the regenerated diff."""
    text = original.read_text(encoding="utf-8")
    head = text[: text.index("\ndiff --git ") + 1] if "\ndiff --git " in text else ""
    return head + diff


def _series_toml(result: RebaseResult, pin: str) -> str:
    source = result.series
    lines = [
        f"# velollm-patch series for llama.cpp {pin}, rebased from series {source.pin} level {source.level}",
        "# by `velollm-patch patches rebase`; the patches listed as unavailable did not apply (reason given).",
        "",
        "[series]",
        f'upstream = "{source.upstream}"',
        f'pin = "{pin}"',
        f'upstream_commit = "{result.target_commit}"',
        f"level = {source.level}",
        f'supports = ["{pin}"]',
    ]
    for status in result.statuses:
        patch = status.patch
        if status.applied:
            lines += ["", "[[patch]]", f'file = "{patch.file.name}"', f"name = {_toml(patch.name)}",
                      f"summary = {_toml(patch.summary)}", f"flag = {_toml(patch.flag)}"]
            if patch.env:
                lines.append(f"env = {_toml(patch.env)}")
            lines.append("upstream_refs = [" + ", ".join(_toml(r) for r in patch.upstream_refs) + "]")
            if patch.requires:
                lines.append("requires = [" + ", ".join(_toml(r) for r in patch.requires) + "]")
        else:
            lines += ["", "[[unavailable]]", f"name = {_toml(patch.name)}",
                      f"reason = {_toml(f'{status.state}: {status.detail}')}"]
    return "\n".join(lines) + "\n"


def _toml(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
    return f'"{escaped}"'
