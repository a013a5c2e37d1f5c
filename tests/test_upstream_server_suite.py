"""ci/upstream_server_tests.py: llama.cpp's own server test suite on our build, test by test against vanilla (#35).

The units (configurations, deselection, the mirrored suite and its offline model cache, the comparison, the
plugin inside upstream's pytest on a small fake suite) run everywhere; the CI entry runs upstream's real suite,
the budgeted subset (``CI_SUBSET``), on the patched build with everything off and on vanilla, and fails on any
test that differs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ci import upstream_server_tests as ust
from velollm_patch import demo_models
from velollm_patch.builds import InstalledBuild
from velollm_patch.patches import all_series
from velollm_patch.paths import Paths

ROOT = Path(__file__).resolve().parent.parent


def _build(patches: list[dict[str, Any]], tree: str = "/nonexistent") -> InstalledBuild:
    return InstalledBuild(Path("/nonexistent"), {"build_id": "x", "patches": patches,
                                                 "source": {"tree": tree, "commit": "c"}})


# --- configurations -------------------------------------------------------------------------------------


def test_everything_off_covers_every_switch_of_every_series() -> None:
    for series in all_series():
        build = _build([p.to_dict() for p in series.patches])
        env = ust.off_env(build)
        switches = {p.env for p in series.patches if p.env}
        assert switches <= set(env), f"series {series.pin}: no off value for {switches - set(env)}"
        for patch_name, extra, value in ust.EXTRA_OFF:
            if any(p.name == patch_name for p in series.patches):
                assert env[extra] == value
        # the kernels' switches are part of "off": the promise covers them too
        kernels = {"cpu-repack-q4-1": "GGML_CPU_REPACK_Q4_1", "spec-batch-invariant": "LLAMA_ARG_SPEC_BATCH_INVARIANT"}
        for name, var in kernels.items():
            if any(p.name == name for p in series.patches):
                assert env[var] == ust.OFF_VALUES[var] and env[var] in ("0", "off")


def test_a_switch_without_an_off_value_stops_the_lane() -> None:
    build = _build([{"name": "new-feature", "env": "LLAMA_ARG_SOMETHING_NEW"}])
    with pytest.raises(Exception, match="LLAMA_ARG_SOMETHING_NEW.*OFF_VALUES"):
        ust.off_env(build)


def test_configurations(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "d", tmp_path / "c")
    patched = _build([{"name": "cpu-repack-q4-1", "env": "GGML_CPU_REPACK_Q4_1"}])
    assert ust.config_env("off", patched, paths) == {"GGML_CPU_REPACK_Q4_1": "0"}
    assert ust.config_env("defaults", patched, paths) == {}
    assert ust.config_env("features", patched, paths) == dict(ust.FEATURES_ENV)
    assert ust.config_env("off", _build([]), paths) == {}  # vanilla runs as it is
    assert ust.config_env("tuned", _build([]), paths) == {}


@pytest.mark.slow
def test_the_tuned_configuration_is_the_tuners_plan_less_the_tests_own_shape(
    patched_build: InstalledBuild, paths: Paths
) -> None:
    env = ust.tuned_env(paths, patched_build)
    assert not set(env) & ust.TUNED_LEFT_TO_THE_TEST
    assert all(k.startswith("LLAMA_ARG_") for k in env)
    # the knobs the tuner turns on this build: its patches' features and the performance settings
    assert env["LLAMA_ARG_KV_ON_DEMAND"] == "1" and env["LLAMA_ARG_FLASH_ATTN"] == "on"
    assert {"LLAMA_ARG_THREADS", "LLAMA_ARG_UBATCH"} <= set(env)


# --- deselection ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("nodeid", "fixtures", "deselected"), [
    ("unit/test_vision_api.py::test_vision_chat_completion[x]", (), True),
    ("unit/test_lora.py::test_lora[0.0-x]", (), True),
    ("unit/test_router.py::test_router_download_model", (), True),
    ("unit/test_basic.py::test_load_split_model", (), True),
    ("unit/test_slot_save.py::test_slot_save_restore_with_image", ("mmproj_server",), True),
    ("unit/test_compat_anthropic.py::test_anthropic_vision_base64", ("vision_server", "create_server"), True),
    ("unit/test_basic.py::test_server_start_simple", ("create_server",), False),
    ("unit/test_router.py::test_router_props", (), False),
    ("unit/test_vision_api.pyx::test", (), False),  # a prefix ends at a separator
])
def test_deselection(nodeid: str, fixtures: tuple[str, ...], deselected: bool) -> None:
    reason = ust.deselection_reason(nodeid, fixtures)
    assert (reason is not None) == deselected
    if reason is not None:
        assert len(reason) > 10  # a reason, not a flag


# --- the mirrored suite and its offline cache -----------------------------------------------------------


def test_the_suite_is_copied_where_its_relative_paths_still_work(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "tools/server/tests/unit").mkdir(parents=True)
    (tree / "tools/server/tests/conftest.py").write_text("# upstream's\n")
    (tree / "tools/server/tests/unit/test_x.py").write_text("def test_x(): pass\n")
    (tree / "tools/server/tests/tmp").mkdir()  # a stale cache is not copied
    (tree / "tools/server/server.cpp").write_text("")
    (tree / "tools/mtmd").mkdir()
    (tree / "models/templates").mkdir(parents=True)
    suite = ust.prepare_suite(tree, tmp_path / "work")
    assert suite == tmp_path / "work/tools/server/tests"
    assert not suite.is_symlink() and (suite / "unit/test_x.py").is_file() and not (suite / "tmp").exists()
    # what the tests reach: ../../../models/templates, ../../../tools/mtmd, and the tree stays untouched
    assert (suite / "../../../models/templates").resolve() == (tree / "models/templates").resolve()
    assert (suite / "../../../tools/mtmd").resolve() == (tree / "tools/mtmd").resolve()
    (suite / "new").write_text("x")
    assert not (tree / "tools/server/tests/new").exists()
    assert ust.prepare_suite(tree, tmp_path / "work") == suite and not (suite / "new").exists()  # fresh each run


def test_the_cache_holds_our_models_under_upstream_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched: list[str] = []

    def fake_fetch(paths: Paths, name: str = demo_models.DEFAULT_MODEL) -> Path:
        fetched.append(name)
        path = tmp_path / "models" / demo_models.known_model(name).filename
        path.parent.mkdir(exist_ok=True)
        path.write_text(name)
        return path

    monkeypatch.setattr(demo_models, "fetch_model", fake_fetch)
    cache = tmp_path / "cache"
    cache.mkdir()
    placed = ust.prepare_cache(Paths(tmp_path / "d", tmp_path / "c"), cache)
    assert sorted(set(fetched)) == ["gemma3-270m", "smollm2-135m"]
    for sub in ust.SUBSTITUTES:
        repo = cache / ("models--" + sub.repo.replace("/", "--"))
        commit = (repo / "refs/main").read_text()
        assert re.fullmatch(r"[0-9a-f]{40}", commit)  # hf-cache.cpp skips other refs
        file = repo / "snapshots" / commit / sub.file
        assert file.is_symlink() and file.read_text() == sub.model
        assert placed[f"{sub.repo}/{sub.file}"] == demo_models.known_model(sub.model).filename
    # the names the suite's lookups need: the preset's tag Q8_0, the router's ids with tag F32
    gemma = next(s for s in ust.SUBSTITUTES if s.repo == "ggml-org/tinygemma3-GGUF")
    assert re.search(r"Q8_0[.-]", gemma.file)
    stories = next(s for s in ust.SUBSTITUTES if s.repo == "ggml-org/test-model-stories260K")
    assert "-F32." in stories.file
    assert (cache / "stories15M-q4_0.gguf").read_text() == "smollm2-135m"


# --- comparing ------------------------------------------------------------------------------------------


def _t(outcome: str, message: str = "") -> dict[str, Any]:
    return {"outcome": outcome, "message": message, "seconds": 1.0}


def test_compare_counts_only_differences_that_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    vanilla = {"a": _t("passed"), "b": _t("passed"), "c": _t("failed", "assert 1 == 2"), "d": _t("passed"),
               "e": _t("failed", "took 1.5 s"), "f": _t("failed", "expected 'x'")}
    ours = {"a": _t("passed"), "b": _t("failed", "500"), "c": _t("failed", "assert 1 == 2"), "d": _t("error", "t/o"),
            "e": _t("failed", "took 2.25 s"), "f": _t("failed", "expected 'y'"), "g": _t("passed")}
    rerun_vanilla = {"b": _t("passed"), "d": _t("passed"), "g": _t("passed")}
    rerun_ours = {"b": _t("failed", "500"), "d": _t("passed"), "g": _t("passed")}
    verdict = ust.compare("off", vanilla, ours, rerun_vanilla, rerun_ours)
    assert [d["test"] for d in verdict["differences"]] == ["b"]
    assert [d["test"] for d in verdict["noise"]] == ["d", "g"]  # g ran on both sides in the rerun
    assert verdict["result"] == "failed" and verdict["unexplained"] == 1
    # failing alike but for numbers is alike; other text is reported (not a failure of the lane)
    assert [f["test"] for f in verdict["failed_alike_other_message"]] == ["f"]
    # an unlisted difference fails every configuration
    for config in ("defaults", "features", "tuned"):
        assert ust.compare(config, vanilla, ours, rerun_vanilla, rerun_ours)["result"] == "failed"
    # a listed text difference is explained wherever our kernels run, never under off
    monkeypatch.setattr(ust, "DEFAULTS_TEXT_DIFFERENCES", {"b": "our kernels write other text"})
    for config in ("defaults", "features", "tuned"):
        explained = ust.compare(config, vanilla, ours, rerun_vanilla, rerun_ours)
        assert explained["result"] == "passed" and explained["differences"][0]["explained"]
    assert ust.compare("off", vanilla, ours, rerun_vanilla, rerun_ours)["result"] == "failed"


def test_a_listed_difference_covers_its_test_and_its_parameters_only() -> None:
    table = {"unit/t.py::test_a": "why a", "unit/t.py::test_b[256-": "why b"}
    assert ust.expected_difference("unit/t.py::test_a", table) == "why a"
    assert ust.expected_difference("unit/t.py::test_a_other", table) is None
    assert ust.expected_difference("unit/t.py::test_b[256-4-x]", table) == "why b"
    assert ust.expected_difference("unit/t.py::test_b[128-4-x]", table) is None


@pytest.mark.slow
@pytest.mark.parametrize("table", ["DEFAULTS_TEXT_DIFFERENCES", "FLAKY"])
def test_every_listed_test_exists_in_upstreams_suite(table: str, patched_build: InstalledBuild) -> None:
    """A listed test that upstream renamed would explain nothing: each key names a test of the pinned suite."""
    suite = ust.source_tree(patched_build) / ust.SUITE
    for key, reason in getattr(ust, table).items():
        file, _, test = key.partition("::")
        name = re.match(r"\w+", test)
        assert name is not None and len(reason) > 20, key
        assert f"def {name.group()}(" in (suite / file).read_text(), f"{key}: no such test in {suite / file}"


def test_a_race_is_reported_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ust, "FLAKY", {"unit/t.py::race[3]": "parallel requests race for the last cells"})
    vanilla = {"unit/t.py::race[3]": _t("failed", "assert 89 == 90"), "unit/t.py::other": _t("passed")}
    ours = {"unit/t.py::race[3]": _t("passed"), "unit/t.py::other": _t("passed")}
    race = "unit/t.py::race[3]"
    verdict = ust.compare("off", vanilla, ours, {race: _t("failed")}, {race: _t("passed")})
    assert verdict["result"] == "passed" and not verdict["differences"]
    assert verdict["noise"][0]["flaky"] == "parallel requests race for the last cells"
    assert "a race: parallel requests" in ust.markdown({
        "config": "off", "result": "passed", "verdict": verdict, "env": {}, "subset": "full", "deselected": {},
        "ours": {"build_id": "p", "summary": "", "seconds": 1}, "finished": "now", "wall_seconds": 1, "cache": {},
        "vanilla": {"build_id": "v", "summary": "", "seconds": 1}})


def test_the_report_names_each_difference_with_both_outcomes(tmp_path: Path) -> None:
    verdict = ust.compare("off", {"t": _t("passed")}, {"t": _t("failed", "kv_reserved_bytes 0 | x")}, {}, {})
    report = {"config": "off", "result": verdict["result"], "verdict": verdict, "env": {"GGML_CPU_REPACK_Q4_1": "0"},
              "ours": {"build_id": "p", "summary": "1 failed", "seconds": 1}, "finished": "now", "wall_seconds": 2,
              "vanilla": {"build_id": "v", "summary": "1 passed", "seconds": 1}, "subset": "full",
              "deselected": {"x": "vision: y", "z": "vision: y"}, "cache": {"r/f": "m"}}
    text = ust.markdown(report)
    assert "| `t` | passed:  | failed: kv_reserved_bytes 0 \\| x | — |" in text
    assert "`GGML_CPU_REPACK_Q4_1=0`" in text and "- 2 × vision: y" in text
    json_file, md_file = ust.write_report(report, Paths(tmp_path / "d", tmp_path / "c"))
    assert json.loads(json_file.read_text())["result"] == "failed" and md_file.read_text() == text


# --- the plugin inside upstream's pytest ----------------------------------------------------------------

FAKE_UTILS = '''
import wget

class ServerPreset:
    @staticmethod
    def load_all():
        raise AssertionError("load_all must not run: it downloads every preset")

def download_file(url):
    return wget.download(url, out="tmp")
'''

FAKE_CONFTEST = '''
import pytest
from utils import *

@pytest.fixture(scope="session", autouse=True)
def load_server_presets():
    ServerPreset.load_all()

@pytest.fixture
def broken_server():
    raise RuntimeError("Server process died with return code 1")
'''

FAKE_TESTS = '''
import pytest
from utils import *

def test_passes():
    pass

def test_fails():
    assert "text" == "other text"

def test_downloads():
    download_file("https://huggingface.co/x/y.gguf")

def test_server_does_not_start(broken_server):
    pass

@pytest.mark.skip(reason="upstream skips it")
def test_skipped():
    pass

@pytest.mark.slow
def test_slow():
    pass
'''


def test_the_plugin_records_outcomes_deselects_and_stays_offline(tmp_path: Path) -> None:
    suite = tmp_path / "tests"
    (suite / "unit").mkdir(parents=True)
    (suite / "utils.py").write_text(FAKE_UTILS)
    (suite / "conftest.py").write_text(FAKE_CONFTEST)
    (suite / "unit/test_fake.py").write_text(FAKE_TESTS)
    (suite / "unit/test_vision_api.py").write_text("def test_image():\n    pass\n")
    outcomes = tmp_path / "outcomes.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), ust.OUTCOMES_ENV: str(outcomes)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", ust.PLUGIN, "-p", "no:cacheprovider",
                             "-m", "not slow", "-o", "addopts=", "-q"],
                            cwd=suite, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(outcomes.read_text())
    tests = data["tests"]
    assert {n: t["outcome"] for n, t in tests.items()} == {
        "unit/test_fake.py::test_passes": "passed",
        "unit/test_fake.py::test_fails": "failed",
        "unit/test_fake.py::test_downloads": "failed",
        "unit/test_fake.py::test_server_does_not_start": "error",
        "unit/test_fake.py::test_skipped": "skipped",
    }
    assert "other text" in tests["unit/test_fake.py::test_fails"]["message"]
    assert "no network" in tests["unit/test_fake.py::test_downloads"]["message"]
    assert "return code 1" in tests["unit/test_fake.py::test_server_does_not_start"]["message"]
    assert tests["unit/test_fake.py::test_skipped"]["message"] == "Skipped: upstream skips it"
    assert data["deselected"] == {"unit/test_vision_api.py::test_image": ust.DESELECTED[0][1]}


# --- the CI entry: upstream's suite, budgeted subset, everything off vs vanilla ---------------------------


@pytest.mark.slow
def test_upstream_server_suite_everything_off_matches_vanilla(
    patched_build: InstalledBuild, vanilla_build: InstalledBuild, paths: Paths
) -> None:
    """CI_SUBSET of llama.cpp's server tests (about 8 minutes for both builds on 2 cores; the whole suite, about
    25, runs with ``python -m ci.upstream_server_tests`` before an issue that touches the server or the kernels
    is resolved): every test's outcome on our build with every switch off is vanilla's."""
    pytest.importorskip("requests", reason="upstream's suite needs requests: pip install -e '.[dev]'")
    report = ust.run_lane(paths, patched_build, vanilla_build, "off", "ci")
    differences = "\n".join(
        f"{d['test']}: vanilla {d['vanilla']['outcome']} ({d['vanilla']['message'][:200]}), "
        f"ours {d['ours']['outcome']} ({d['ours']['message'][:200]})" for d in report["verdict"]["differences"])
    assert report["result"] == "passed", differences
    ran = report["runs"]["ours"]["tests"]
    assert len(ran) > 50 and sum(t["outcome"] == "passed" for t in ran.values()) > 30  # it really ran
