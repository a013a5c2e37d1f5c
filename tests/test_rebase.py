"""`patches rebase`: a series replayed onto another tree, each patch's state, and the series written for it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from velollm_patch import patches, rebase
from velollm_patch.cli import main
from velollm_patch.errors import VelollmError

SERIES_TOML = """
[series]
upstream = "llama.cpp"
pin = "abc1234"
upstream_commit = "abc1234000000000000000000000000000000000"
level = 7
supports = ["abc1234"]
"""


def numbered(prefix: str, n: int = 40) -> str:
    return "".join(f"{prefix} line {i}\n" for i in range(n))


def diff(tree: Path, edits: dict[str, tuple[str, str]]) -> str:
    """A git diff of ``edits`` (file -> (old, new) text replacements) against ``tree``, which is left as it was."""
    repo = tree.parent / f".diff-{len(list(tree.parent.iterdir()))}"
    subprocess.run(["cp", "-a", str(tree), str(repo)], check=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=repo, check=True)
    for name, (old, new) in edits.items():
        path = repo / name
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))
    return subprocess.run(["git", "diff"], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def trees(tmp_path: Path) -> tuple[patches.Series, Path, Path]:
    pin = tmp_path / "pin"
    (pin / "src").mkdir(parents=True)
    for name in "abcd":
        (pin / "src" / f"{name}.cpp").write_text(numbered(name))
    changes = {
        "clean": {"src/c.cpp": ("c line 30\n", "c line 30 ours\n")},
        "offsets": {"src/a.cpp": ("a line 30\n", "a line 30 ours\n")},
        "merged": {"src/b.cpp": ("b line 20\n", "b line 20 ours\n")},
        "upstream": {"src/c.cpp": ("c line 5\n", "c line 5 fixed\n")},
        "conflict": {"src/d.cpp": ("d line 12\n", "d line 12 changed by our conflicting patch\n")},
        "needs": {"src/d.cpp": ("d line 30\n", "d line 30 needing the conflict one\n")},
        # edits the line "conflict" wrote, without saying it requires "conflict"
        "context": {"src/d.cpp": ("by our conflicting patch\n", "by our conflicting patch, edited\n")},
    }
    sdir = tmp_path / "patches" / "llama.cpp" / "abc1234"
    sdir.mkdir(parents=True)
    toml = SERIES_TOML
    # each patch is made on top of the previous ones, as a series is
    work = tmp_path / "work"
    subprocess.run(["cp", "-a", str(pin), str(work)], check=True)
    for number, (name, edits) in enumerate(changes.items(), start=1):
        text = diff(work, edits)
        (sdir / f"{number:04d}-{name}.patch").write_text(f"From 0 Mon Sep 17 00:00:00 2001\nSubject: [PATCH] {name}\n\n"
                                                         f"Why {name}.\n---\n{text}")
        for file, (old, new) in edits.items():
            (work / file).write_text((work / file).read_text().replace(old, new))
        requires = 'requires = ["conflict"]\n' if name == "needs" else ""
        toml += (f'\n[[patch]]\nfile = "{number:04d}-{name}.patch"\nname = "{name}"\nsummary = "the {name} one"\n'
                 f'flag = "--{name}"\n{requires}')
    (sdir / "series.toml").write_text(toml)

    target = tmp_path / "target"
    subprocess.run(["cp", "-a", str(pin), str(target)], check=True)
    a = target / "src" / "a.cpp"
    a.write_text("upstream header 1\nupstream header 2\n" + a.read_text())  # every hunk of a.cpp moves down
    b = target / "src" / "b.cpp"
    b.write_text(b.read_text().replace("b line 22\n", "b line 22 upstream\n"))  # in "merged"'s context
    c = target / "src" / "c.cpp"
    c.write_text(c.read_text().replace("c line 5\n", "c line 5 fixed\n"))  # "upstream"'s change is there
    d = target / "src" / "d.cpp"
    d.write_text(d.read_text().replace("d line 12\n", "d line 12 upstream\n"))  # the line "conflict" changes
    return patches.load_series(sdir), pin, target


def test_each_patch_gets_its_state(trees: tuple[patches.Series, Path, Path]) -> None:
    series, pin, target = trees
    result = rebase.rebase(series, pin, target, "def5678" + "0" * 33)
    states = {s.patch.name: s.state for s in result.statuses}
    assert states == {"clean": "clean", "offsets": "offsets", "merged": "merged", "upstream": "upstream",
                      "conflict": "conflict", "needs": "needs", "context": "needs"}
    detail = {s.patch.name: s.detail for s in result.statuses}
    assert detail["conflict"] == ("src/d.cpp: upstream 'd line 12 upstream', "
                                  "patch 'd line 12 changed by our conflicting patch'")
    assert detail["needs"] == "builds on conflict, unavailable on this tree"
    assert detail["context"] == "its context includes lines of conflict, unavailable here"


def test_the_series_for_the_target(trees: tuple[patches.Series, Path, Path], tmp_path: Path) -> None:
    series, pin, target = trees
    result = rebase.rebase(series, pin, target, "def5678" + "0" * 33)
    root = series.directory.parent
    written = patches.load_series(rebase.write_series(result, root, "def5678"))
    assert (written.pin, written.level, written.supports) == ("def5678", 7, ("def5678",))
    assert [p.name for p in written.patches] == ["clean", "offsets", "merged"]
    assert written.patches[0].flag == "--clean"
    assert {u.name: u.reason.split(":")[0] for u in written.unavailable} == {
        "upstream": "upstream", "conflict": "conflict", "needs": "needs", "context": "needs"}
    with pytest.raises(VelollmError, match="patch conflict is not available for llama.cpp def5678 \\(conflict: "):
        written.select("clean,conflict")
    # the regenerated patches keep their message and apply to the target, in order
    work = tmp_path / "check"
    subprocess.run(["cp", "-a", str(target), str(work)], check=True)
    assert patches.apply(written, written.patches, work)
    assert "a line 30 ours" in (work / "src" / "a.cpp").read_text()
    assert (written.directory / "0001-clean.patch").read_text().startswith("From 0 Mon Sep 17")
    with pytest.raises(VelollmError, match="already exists"):
        rebase.write_series(result, root, "def5678")


def test_a_tree_that_is_not_llama_cpp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VELOLLM_HOME", str(tmp_path / "home"))
    (tmp_path / "tree").mkdir()
    result = CliRunner().invoke(main, ["patches", "rebase", "--onto", f"path:{tmp_path / 'tree'}"])
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert "is not a llama.cpp source directory" in line
