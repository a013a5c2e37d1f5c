"""The second supported pin: llama.cpp 4df29be (llama-cpp-python 0.3.35, b10454, days before Ollama 0.33's b10488).

Its series (patches/llama.cpp/4df29be) was written by `patches rebase` from the 0c1e570 series, with the build
stamp ported by hand; the patches that do not apply there are listed in it as unavailable, with the reason. The
build must pick that series from the source alone, serve, carry exactly those patches, and the tuner must plan
only flags that build accepts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from velollm_patch import hardware, patches, rebase, serve, source, tune
from velollm_patch.build import BuildOptions, plan_build, run_build
from velollm_patch.builds import InstalledBuild
from velollm_patch.model import inspect_model
from velollm_patch.ollama.server_swap import server_version
from velollm_patch.paths import Paths
from velollm_patch.server_flags import read_server_flags

SECOND_PIN_SOURCE = "pypi:llama-cpp-python==0.3.35"


@pytest.fixture(scope="session")
def second_pin_build(paths: Paths, live_hardware: hardware.HardwareInfo, smollm2_gguf: Path) -> InstalledBuild:
    options = BuildOptions(gpu="cpu", source=SECOND_PIN_SOURCE, smoke_model=smollm2_gguf, make_current=False,
                           wait=3600)
    return run_build(plan_build(options, live_hardware, paths), live_hardware, paths)


def test_the_second_series_is_well_formed() -> None:
    series = {s.pin: s for s in patches.all_series()}
    second, first = series["4df29be"], series["0c1e570"]
    assert second.upstream_commit == source.PINS["0.3.35"].commit
    names = [p.name for p in second.patches] + [u.name for u in second.unavailable]
    assert sorted(names) == sorted(p.name for p in first.patches)  # every patch is either there or says why not
    assert all(u.reason for u in second.unavailable)
    by_name = {p.name: p for p in first.patches}
    for patch in second.patches:  # the same switches as on the first pin
        assert (patch.flag, patch.env, patch.summary) == (by_name[patch.name].flag, by_name[patch.name].env,
                                                         by_name[patch.name].summary)


@pytest.mark.slow
def test_build_picks_the_series_of_its_source_and_serves(
    second_pin_build: InstalledBuild, smollm2_gguf: Path, tmp_path: Path,
) -> None:
    version = server_version(second_pin_build.bin("llama-server"))
    assert version.upstream_commit == "4df29be"
    series = next(s for s in patches.all_series() if s.pin == "4df29be")
    assert version.patches == {p.name for p in series.patches}
    config = serve.ServerConfig(binary=second_pin_build.bin("llama-server"), model=smollm2_gguf,
                                args=("--no-warmup",), log_file=tmp_path / "server.log")
    with serve.start_server(config, timeout=300) as server:
        assert serve.complete(server, "Once upon a time", 8)["tokens_predicted"] == 8
        assert server.get_json("/props")["velollm_patch_level"].startswith(f"velollm-{series.level}:build-stamp,")


@pytest.mark.slow
def test_the_tuner_plans_only_what_the_second_pin_has(
    second_pin_build: InstalledBuild, smollm2_gguf: Path, live_hardware: hardware.HardwareInfo, paths: Paths,
) -> None:
    flags = read_server_flags(second_pin_build.bin("llama-server"), paths)
    assert not flags.accepts("--kv-on-demand") and not flags.accepts("--spec-adaptive")
    facts = tune.BuildFacts.from_build(second_pin_build, paths)
    for workload in tune.WORKLOADS:
        plan = tune.plan(inspect_model(smollm2_gguf), live_hardware, facts, tune.TuneRequest(workload=workload))
        options = [a for a in plan.args if a.startswith("-")]
        assert options and all(flags.accepts(a) for a in options), options
        assert set(plan.env) <= flags.env_names() | {"GGML_CPU_REPACK_Q4_1"}, plan.env


@pytest.mark.slow
def test_rebase_reports_each_patch_on_the_real_trees(paths: Paths) -> None:
    first = next(s for s in patches.all_series() if s.pin == "0c1e570")
    pin_tree = source.fetch(source.DEFAULT_SOURCE, paths).tree
    target = source.fetch(SECOND_PIN_SOURCE, paths)
    assert target.commit is not None
    states = {s.patch.name: s.state for s in rebase.rebase(first, pin_tree, target.tree, target.commit).statuses}
    applied = {name for name, state in states.items() if state in ("clean", "offsets", "merged")}
    assert applied == {"fit-server-outputs", "amx-tile-config", "cpu-repack-q4-1", "spec-draft-fits-batch",
                       "static-build-own-devices", "fa-f16-transpose"}
    # 4df29be is older than the pin: what does not apply waits for upstream code or for a patch that does not
    assert {states[name] for name in states.keys() - applied} == {"needs"}
