"""The patch series mechanism on small real trees: parsing, selection, check, all-or-nothing apply."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from velollm_patch import patches
from velollm_patch.errors import VelollmError

SERIES_TOML = """
[series]
upstream = "llama.cpp"
pin = "abc1234"
upstream_commit = "abc1234000000000000000000000000000000000"
level = 3
supports = ["abc1234", "def5678"]

[[patch]]
file = "0001-one.patch"
name = "one"
summary = "first change"
flag = "--one"

[[patch]]
file = "0002-two.patch"
name = "two"
summary = "second change, on top of the first"
requires = ["one"]
"""


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _make_patch(tree: Path, rel: str, old: str, new: str) -> str:
    """A real git diff that changes ``old`` into ``new`` in ``tree/rel`` (tree is left unchanged)."""
    repo = tree.parent / f".diff-{rel.replace('/', '_')}"
    subprocess.run(["cp", "-a", str(tree), str(repo)], check=True)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base")
    target = repo / rel
    target.write_text(target.read_text().replace(old, new))
    return _git(repo, "diff")


@pytest.fixture
def series_dir(tmp_path: Path) -> tuple[Path, Path]:
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "a.cpp").write_text("".join(f"line {i}\n" for i in range(40)))
    (tree / "README").write_text("upstream readme\n")
    one = _make_patch(tree, "src/a.cpp", "line 10\n", "line 10 patched\n")
    # patch two is made on top of patch one, so it only applies after it
    (tree / "src" / "a.cpp").write_text((tree / "src" / "a.cpp").read_text().replace("line 10\n", "line 10 patched\n"))
    two = _make_patch(tree, "src/a.cpp", "line 30\n", "line 30 patched\n")
    (tree / "src" / "a.cpp").write_text((tree / "src" / "a.cpp").read_text().replace("line 10 patched\n", "line 10\n"))
    sdir = tmp_path / "patches" / "llama.cpp" / "abc1234"
    sdir.mkdir(parents=True)
    (sdir / "series.toml").write_text(SERIES_TOML)
    (sdir / "0001-one.patch").write_text(one)
    (sdir / "0002-two.patch").write_text(two)
    return sdir, tree


def test_load_series_reads_every_field(series_dir: tuple[Path, Path]) -> None:
    sdir, _ = series_dir
    series = patches.load_series(sdir)
    assert (series.pin, series.level, series.supports) == ("abc1234", 3, ("abc1234", "def5678"))
    assert [p.name for p in series.patches] == ["one", "two"]
    assert series.patches[0].flag == "--one"
    assert len(series.patches[0].sha256) == 64
    assert series.level_string(series.patches) == "velollm-3:one,two"
    assert series.level_string(()) == ""


def test_select(series_dir: tuple[Path, Path]) -> None:
    series = patches.load_series(series_dir[0])
    assert series.select("all") == series.patches
    assert series.select("none") == ()
    assert [p.name for p in series.select("two,one")] == ["one", "two"]  # series order, not argument order
    with pytest.raises(VelollmError, match="unknown patch nope.*available: one, two"):
        series.select("one,nope")
    assert series.patches[1].requires == ("one",)
    with pytest.raises(VelollmError, match="patch two builds on one: add one to --patches"):
        series.select("two")


def test_a_requirement_must_come_earlier(series_dir: tuple[Path, Path]) -> None:
    sdir = series_dir[0]
    text = (sdir / "series.toml").read_text()
    (sdir / "series.toml").write_text(text.replace('requires = ["one"]', 'requires = ["three"]'))
    with pytest.raises(VelollmError, match="two requires three, not listed before it"):
        patches.load_series(sdir)


def test_find_series_by_commit(series_dir: tuple[Path, Path]) -> None:
    root = series_dir[0].parent
    assert patches.find_series("def5678aaaa", root).pin == "abc1234"
    with pytest.raises(VelollmError, match="no patch series supports llama.cpp 1234567.*series exist for abc1234"):
        patches.find_series("1234567890", root)
    with pytest.raises(VelollmError, match="commit is unknown"):
        patches.find_series(None, root)


def test_malformed_series_is_a_clear_error(tmp_path: Path) -> None:
    sdir = tmp_path / "bad"
    sdir.mkdir()
    (sdir / "series.toml").write_text("[series]\npin = 'x'\n")
    with pytest.raises(VelollmError, match="malformed"):
        patches.load_series(sdir)
    (sdir / "series.toml").write_text(SERIES_TOML)
    with pytest.raises(VelollmError, match="lists 0001-one.patch, which does not exist"):
        patches.load_series(sdir)
    (sdir / "series.toml").write_text("not toml [")
    with pytest.raises(VelollmError, match="cannot read patch series"):
        patches.load_series(sdir)


def test_apply_in_order_and_detect_already_applied(series_dir: tuple[Path, Path]) -> None:
    sdir, tree = series_dir
    series = patches.load_series(sdir)
    done = patches.apply(series, series.patches, tree)
    assert [s.state for s in done] == ["applies", "applies"]
    text = (tree / "src" / "a.cpp").read_text()
    assert "line 10 patched" in text and "line 30 patched" in text
    again = patches.apply(series, series.patches, tree)
    assert [s.state for s in again] == ["applied", "applied"]


def test_conflict_names_patch_file_hunk_and_pin(series_dir: tuple[Path, Path]) -> None:
    sdir, tree = series_dir
    series = patches.load_series(sdir)
    # upstream moved on: the context of patch two no longer matches
    (tree / "src" / "a.cpp").write_text((tree / "src" / "a.cpp").read_text().replace("line 29\n", "line twenty-nine\n"))
    with pytest.raises(VelollmError) as err:
        patches.apply(series, series.patches, tree)
    message = str(err.value)
    assert "0002-two.patch (two) does not apply" in message
    assert "src/a.cpp hunk #1" in message
    assert "made for llama.cpp abc1234" in message
    assert "\n" not in message


def test_missing_file_is_named(series_dir: tuple[Path, Path]) -> None:
    sdir, tree = series_dir
    (tree / "src" / "a.cpp").unlink()
    series = patches.load_series(sdir)
    statuses = patches.check(series, series.patches[:1], tree)
    assert statuses[0].state == "conflict"
    assert "src/a.cpp does not exist in this tree" in statuses[0].detail


def test_apply_ignores_an_enclosing_git_repository(series_dir: tuple[Path, Path], tmp_path: Path) -> None:
    # A tree inside someone's checkout must still be patched (git would otherwise skip its paths).
    sdir, tree = series_dir
    _git(tmp_path, "init", "-q")
    series = patches.load_series(sdir)
    patches.apply(series, series.patches[:1], tree)
    assert "line 10 patched" in (tree / "src" / "a.cpp").read_text()


def test_shipped_series_is_well_formed() -> None:
    for series in patches.all_series():
        assert series.patches, f"series {series.pin} is empty"
        assert series.upstream_commit.startswith(series.pin)
        for patch in series.patches:
            text = patch.file.read_text()
            assert text.startswith("From "), f"{patch.file.name} is not git format-patch style"
            assert "Subject: [PATCH" in text
            assert patch.file.name[:4].isdigit()
