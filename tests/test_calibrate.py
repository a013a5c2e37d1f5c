"""``tune --measure`` (issue #34): the calibration's cache key and cache, the planner using a calibration, and
bad input. The planner tests build a calibration by hand from a table; the slow test measures for real with
the patched build's llama-bench, and asserts what was measured and used, never how fast it was."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.helpers import recorded_hardware, run_result
from velollm_patch import calibrate, serve, tune
from velollm_patch.builds import InstalledBuild, read_build
from velollm_patch.calibrate import BenchPoint, Calibration, CalibrationKey, Measurement
from velollm_patch.cli import main
from velollm_patch.errors import VelollmError
from velollm_patch.hardware import HardwareInfo, HostLoad
from velollm_patch.model import ModelInfo, inspect_model
from velollm_patch.paths import Paths
from velollm_patch.server_flags import ServerFlags, read_server_flags
from velollm_patch.tune import BuildFacts, TuneRequest, plan
from velollm_patch.units import GiB, MiB

MACHINE = recorded_hardware("cpu-2core")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> ModelInfo:
    return inspect_model(smollm2_gguf)


@pytest.fixture(scope="module")
def flags(patched_server: Path, paths: Paths) -> ServerFlags:
    return read_server_flags(patched_server, paths)


@pytest.fixture
def store(tmp_path: Path) -> Paths:
    """A cache of its own: calibrations made here never reach the shared test home's plans."""
    return Paths(data=tmp_path / "data", cache=tmp_path / "cache")


def facts(flags: ServerFlags) -> BuildFacts:
    return BuildFacts("test-cpu", "cpu", (), None, flags, None)


def calibration(
    key: CalibrationKey, *, threads: int = 1, threads_batch: int = 2, fa: bool = True, kv: str = "f16",
    ubatch: int = 256, poll: int = 0, repack: bool = True,
) -> Calibration:
    """A calibration as measure() would return it, with a row per value of each knob (the chosen ones fastest)."""
    base = BenchPoint(threads=threads, poll=poll, ubatch=ubatch, flash_attn=fa, type_k=kv, type_v=kv, repack=repack)
    other_kv = "q8_0" if kv == "f16" else "f16"
    rows = [
        Measurement("threads", "-t 1", replace(base, threads=1), 900.0 if threads_batch == 1 else 600.0,
                    180.0 if threads == 1 else 120.0),
        Measurement("threads", "-t 2", replace(base, threads=2), 900.0 if threads_batch == 2 else 600.0,
                    180.0 if threads == 2 else 120.0),
        Measurement("poll", f"--poll {poll}", base, 900.0, 180.0),
        Measurement("poll", f"--poll {50 - poll}", replace(base, poll=50 - poll), 850.0, 150.0),
        Measurement("ubatch", f"-ub {ubatch}", base, 950.0, None),
        Measurement("ubatch", "-ub 512" if ubatch != 512 else "-ub 128", base, 900.0, None),
        Measurement("flash_attn", "-fa on" if fa else "-fa off", base, 900.0, 180.0),
        Measurement("flash_attn", "-fa off" if fa else "-fa on", replace(base, flash_attn=not fa), 700.0, 150.0),
        Measurement("repack", "on" if repack else "off", base, 900.0, 180.0),
        Measurement("repack", "off" if repack else "on", replace(base, repack=not repack), 500.0, 140.0),
        Measurement("final", "chosen", base, 910.0, 181.0),
    ]
    if fa:
        rows += [
            Measurement("kv_types", f"{kv}/{kv}", base, 900.0, 180.0),
            Measurement("kv_types", f"{other_kv}/{other_kv}", replace(base, type_k=other_kv, type_v=other_kv),
                        800.0, 160.0),
        ]
    return Calibration(
        key=key, created="2026-12-07T23:00:00+00:00", duration_s=60.0, chosen=base, threads_batch=threads_batch,
        decode_tps=181.0, prompt_tps=910.0, prompt_tokens=calibrate.PROMPT_TOKENS, gen_tokens=calibrate.GEN_TOKENS,
        repeats=calibrate.REPEATS, table=tuple(rows),
    )


def key_for(model: Path, build_id: str = "test-cpu", machine: str = "a machine") -> CalibrationKey:
    st = model.stat()
    return CalibrationKey(build_id, str(model.resolve()), st.st_size, st.st_mtime_ns, machine)


# --------------------------------------------------------------------------------------------
# The key and the cache
# --------------------------------------------------------------------------------------------


def test_the_key_names_build_model_file_and_machine(patched_build: InstalledBuild, smollm2_gguf: Path,
                                                    live_hardware: HardwareInfo) -> None:
    key = CalibrationKey.create(patched_build, smollm2_gguf, live_hardware)
    assert key.build_id == patched_build.build_id
    assert key.model_path == str(smollm2_gguf.resolve()) and key.model_bytes == smollm2_gguf.stat().st_size
    assert live_hardware.cpu.model in key.machine and "cpu build" in key.machine
    assert key.mismatch(key) is None
    other_machine = CalibrationKey.create(patched_build, smollm2_gguf, MACHINE)
    assert "another machine" in (other_machine.mismatch(key) or "")
    assert "build" in (replace(key, build_id="other").mismatch(key) or "")
    assert "changed" in (replace(key, model_mtime_ns=1).mismatch(key) or "")


def test_a_saved_calibration_loads_for_its_key_only(store: Paths, tmp_path: Path, smollm2_gguf: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    model = shutil.copy(smollm2_gguf, tmp_path / "model.gguf")
    key = key_for(Path(model))
    saved = calibrate.save(store, calibration(key))
    assert saved.parent == store.calibrations and [p.name for p in store.calibrations.iterdir()] == [saved.name]
    assert calibrate.load(store, key) == calibration(key)
    with caplog.at_level(logging.INFO, logger="velollm_patch.calibrate"):
        assert calibrate.load(store, replace(key, build_id="another-build")) is None
    assert "ignoring the speed calibration of model.gguf" in caplog.text and "build test-cpu" in caplog.text
    caplog.clear()
    os.utime(model, ns=(key.model_mtime_ns + 10**9, key.model_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO, logger="velollm_patch.calibrate"):
        assert calibrate.load(store, key_for(Path(model))) is None
    assert "the model file changed" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="velollm_patch.calibrate"):
        assert calibrate.load(store, key_for(smollm2_gguf)) is None  # another model: nothing to say
    assert caplog.text == ""


def test_a_calibration_replaces_the_old_one_whole(store: Paths, smollm2_gguf: Path) -> None:
    key = key_for(smollm2_gguf)
    calibrate.save(store, calibration(key, threads=2))
    calibrate.save(store, calibration(key, threads=1))
    assert [p.name for p in store.calibrations.iterdir()] == [key.file_name()]  # no temporary file left
    loaded = calibrate.load(store, key)
    assert loaded is not None and loaded.chosen.threads == 1


def test_an_unreadable_calibration_is_ignored_with_a_note(store: Paths, smollm2_gguf: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    key = key_for(smollm2_gguf)
    store.calibrations.mkdir(parents=True)
    (store.calibrations / key.file_name()).write_text(json.dumps({"format": 0}))
    with caplog.at_level(logging.INFO, logger="velollm_patch.calibrate"):
        assert calibrate.load(store, key) is None
    assert "unreadable" in caplog.text


# --------------------------------------------------------------------------------------------
# The planner with a calibration
# --------------------------------------------------------------------------------------------


def test_without_a_calibration_the_plan_is_unchanged(smollm2: ModelInfo, flags: ServerFlags) -> None:
    p = plan(smollm2, MACHINE, facts(flags))
    assert p.calibration is None and p.predicted() is None and "predicted" not in p.to_dict()
    assert "--poll" not in p.args and "--no-repack" not in p.args
    assert not any(c.key in ("poll", "repack") for c in p.choices)


def test_measured_values_replace_the_guesses_and_cite_the_measurement(smollm2: ModelInfo, flags: ServerFlags,
                                                                       smollm2_gguf: Path) -> None:
    cal = calibration(key_for(smollm2_gguf), threads=1, threads_batch=2, ubatch=256, poll=0)
    p = plan(smollm2, MACHINE, facts(flags), TuneRequest(), cal)
    s = p.settings
    assert (s.threads, s.threads_batch, s.ubatch, s.poll, s.flash_attn) == (1, 2, 256, 0, True)
    assert p.reason("threads").startswith("measured: -t 1 decodes 180 tok/s (120 at -t 2)")
    assert "-t 2 processes prompts at 900 tok/s" in p.reason("threads")
    assert p.reason("batch") == "measured: -ub 256 processes prompts at 950 tok/s (900 at -ub 512)"
    assert p.reason("poll").startswith("measured: --poll 0 decodes 180 tok/s (150 at --poll 50)")
    assert "measured: -fa on" in p.reason("flash_attn") and "measured: on" in p.reason("repack")
    assert "measured: f16/f16" in p.reason("kv_types")
    args = " ".join(p.args)
    assert "--threads 1 --threads-batch 2 --poll 0" in args and "--ubatch-size 256" in args
    assert "--no-repack" not in p.args
    predicted = p.to_dict()["predicted"]
    assert predicted["decode_tps"] == 181.0 and predicted["prompt_tps"] == 910.0 and predicted["differs"] == []
    assert any(line.startswith("  predicted: decode 181 tok/s, prompts 910 tok/s") for line in p.describe())


def test_a_measured_kv_pair_goes_first_for_speed_and_balanced_only(smollm2: ModelInfo, flags: ServerFlags,
                                                                    smollm2_gguf: Path) -> None:
    cal = calibration(key_for(smollm2_gguf), kv="q8_0")
    balanced = plan(smollm2, MACHINE, facts(flags), TuneRequest(), cal)
    assert (balanced.settings.cache_type_k, balanced.settings.cache_type_v) == ("q8_0", "q8_0")
    assert "measured: q8_0/q8_0 decodes 180 tok/s (160 at f16/f16)" in balanced.reason("kv_types")
    quality = plan(smollm2, MACHINE, facts(flags), TuneRequest(profile="quality"), cal)
    assert quality.settings.cache_type_k == "f16"
    assert "kv_types f16/f16 (measured q8_0/q8_0)" in quality.to_dict()["predicted"]["differs"]


def test_flash_attention_measured_off_turns_off_what_needs_it(smollm2: ModelInfo, flags: ServerFlags,
                                                               smollm2_gguf: Path) -> None:
    cal = calibration(key_for(smollm2_gguf), fa=False)
    p = plan(smollm2, MACHINE, facts(flags), TuneRequest(), cal)
    assert not p.settings.flash_attn and not p.settings.kv_on_demand
    assert p.settings.cache_type_v == "f16"
    assert "-fa off decodes 180 tok/s" in p.reason("flash_attn") and "--flash-attn off" in " ".join(p.args)


def test_repacking_measured_slower_is_turned_off(smollm2: ModelInfo, flags: ServerFlags, smollm2_gguf: Path) -> None:
    p = plan(smollm2, MACHINE, facts(flags), TuneRequest(), calibration(key_for(smollm2_gguf), repack=False))
    assert not p.settings.repack and "--no-repack" in p.args
    assert p.reason("repack").startswith("measured: off decodes 180 tok/s (140 at on)")


def test_cores_taken_now_outrank_the_calibrations_threads(smollm2: ModelInfo, flags: ServerFlags,
                                                          smollm2_gguf: Path) -> None:
    """A calibration is measured on a quiet machine; another program's load when planning decides -t and --poll."""
    cal = calibration(key_for(smollm2_gguf), threads=2, threads_batch=2, poll=50)
    busy = plan(smollm2, MACHINE, facts(flags), TuneRequest(), cal, HostLoad((100.0, 3.0), 0.0, 1.0))
    assert (busy.settings.threads, busy.settings.threads_batch, busy.settings.poll) == (1, 1, 0)
    assert "cores are taken" in busy.reason("threads") and busy.calibration is cal
    assert "threads 1 (measured 2)" in busy.to_dict()["predicted"]["differs"]


def test_the_memory_profile_keeps_its_small_ubatch(smollm2: ModelInfo, flags: ServerFlags,
                                                   smollm2_gguf: Path) -> None:
    cal = calibration(key_for(smollm2_gguf), ubatch=512)
    p = plan(smollm2, MACHINE, facts(flags), TuneRequest(profile="memory"), cal)
    assert p.settings.ubatch == 256 and "the fastest, measured: -ub 512" in p.reason("batch")
    assert "ubatch 256 (measured 512)" in p.to_dict()["predicted"]["differs"]


def test_plan_for_reads_the_cache(store: Paths, patched_build: InstalledBuild, smollm2_gguf: Path,
                                  live_hardware: HardwareInfo) -> None:
    """Every consumer (tune, serve, up, bench --tuned, ollama modelfile --tuned) plans through plan_for."""
    key = CalibrationKey.create(patched_build, smollm2_gguf, live_hardware)
    calibrate.save(store, calibration(key, threads=1, threads_batch=1))
    # machine dedicated: this machine's live load would rightly outrank the calibration's threads
    tuned = tune.plan_for(str(smollm2_gguf), live_hardware, patched_build, store, TuneRequest(machine="dedicated"))
    assert tuned.calibration is not None and tuned.reason("threads").startswith("measured: -t 1")


def test_a_setting_replaces_the_default_only_when_clearly_faster() -> None:
    """Faster by more than 5 % and by more than the two spreads; for knobs that serve both, no slower at either."""
    point = BenchPoint(threads=2)

    def row(pp: float, tg: float, sd: float = 1.0) -> Measurement:
        return Measurement("poll", f"{pp}/{tg}", point, pp, tg, sd, sd)

    default = row(1000, 100)
    assert calibrate._choose([default, row(1040, 104)], "both") is default  # within 5 %
    assert calibrate._choose([default, row(1100, 100)], "both").prompt_tps == 1100
    assert calibrate._choose([default, row(1100, 100, sd=120)], "both") is default  # within the spreads
    assert calibrate._choose([default, row(1300, 90)], "both") is default  # slower at decoding
    assert calibrate._choose([default, row(1300, 90)], "prompt").prompt_tps == 1300
    assert calibrate._choose([default, row(900, 120), row(900, 140)], "decode").decode_tps == 140


def test_the_prediction_is_checked_against_a_bench_run(smollm2_gguf: Path) -> None:
    """Decoding at the single request with the shortest prompt, prompts at the one nearest the calibration's."""
    run = run_result("tuned", 100.0)
    checked = calibrate.check_against_bench(calibration(key_for(smollm2_gguf)), run.scenarios)
    assert checked == (
        "decode 181 tok/s predicted, 105 in short (x0.58); "
        "prompts 910 tok/s predicted at 512 tokens, 1050 in short at 100 (x1.15)"
    )
    assert calibrate.check_against_bench(calibration(key_for(smollm2_gguf)), []) is None


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def install_copy(builds_dir: Path, build: InstalledBuild, binaries: tuple[str, ...]) -> InstalledBuild:
    """``build`` installed again under ``builds_dir`` with only ``binaries`` (links to its own)."""
    directory = builds_dir / build.build_id
    (directory / "bin").mkdir(parents=True)
    shutil.copy(build.directory / "manifest.json", directory / "manifest.json")
    for name in binaries:
        (directory / "bin" / name).symlink_to(build.bin(name))
    return read_build(directory)


def test_a_build_without_llama_bench_is_refused(tmp_path: Path, patched_build: InstalledBuild, smollm2: ModelInfo,
                                                live_hardware: HardwareInfo) -> None:
    without = install_copy(tmp_path, patched_build, ("llama-server", "llama-fit-params"))
    with pytest.raises(VelollmError, match="has no llama-bench"):
        calibrate.measure(without, smollm2, live_hardware)


def test_tune_measure_with_a_build_without_llama_bench_says_so_in_one_line(
    tmp_path: Path, patched_build: InstalledBuild, smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    home = tmp_path / "home"
    install_copy(home / "data" / "builds", patched_build, ("llama-server", "llama-fit-params"))
    monkeypatch.setenv("VELOLLM_HOME", str(home))
    result = CliRunner().invoke(main, ["tune", str(smollm2_gguf), "--measure", "--build", patched_build.build_id])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [
        f"error: build {patched_build.build_id} has no llama-bench; rebuild with velollm-patch build"
    ]
    assert not (home / "cache" / "calibrations").exists()


def test_a_model_that_does_not_fit_says_which_quantization_would(smollm2: ModelInfo) -> None:
    small = replace(MACHINE, memory=replace(MACHINE.memory, available_bytes=1 * GiB + 100 * MiB))
    with pytest.raises(VelollmError, match=r"needs 94 MiB of weights, .* 83 MiB of RAM to spare; a Q4_K_M quantization "
                                           r"\(about 79 MiB\) would"):
        calibrate.check_fits(smollm2, small)
    none = replace(MACHINE, memory=replace(MACHINE.memory, available_bytes=1 * GiB))
    with pytest.raises(VelollmError, match="no quantization of it would"):
        calibrate.check_fits(smollm2, none)
    calibrate.check_fits(smollm2, MACHINE)


def test_an_interrupted_calibration_keeps_nothing(tmp_path: Path, patched_build: InstalledBuild,
                                                  smollm2_gguf: Path) -> None:
    """Ctrl-C while llama-bench runs: exit 130, no calibration and no temporary file in the cache."""
    home = tmp_path / "home"
    install_copy(home / "data" / "builds", patched_build, ("llama-server", "llama-fit-params", "llama-bench"))
    model = Path(shutil.copy(smollm2_gguf, tmp_path / "interrupted.gguf"))  # a path only this test's llama-bench has
    env = {**os.environ, "VELOLLM_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    child = subprocess.Popen(
        [sys.executable, "-m", "velollm_patch", "tune", str(model), "--measure", "--build", patched_build.build_id],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 120  # until llama-bench runs: a readiness wait, not a performance threshold
    while time.monotonic() < deadline and child.poll() is None and not _benchmarking(model):
        time.sleep(0.1)
    child.send_signal(signal.SIGINT)
    output, _ = child.communicate(timeout=60)
    assert child.returncode == 130, output
    assert "interrupted" in output
    calibrations = home / "cache" / "calibrations"
    assert not calibrations.exists() or not any(calibrations.iterdir())
    assert not _benchmarking(model)


def _benchmarking(model: Path) -> bool:
    """Whether a llama-bench of ``model`` is running."""
    wanted = str(model).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"llama-bench") and wanted in argv:
                return True
    return False


# --------------------------------------------------------------------------------------------
# A real calibration
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_calibration_is_kept_and_planned_with(store: Paths, patched_build: InstalledBuild,
                                                     smollm2: ModelInfo, live_hardware: HardwareInfo,
                                                     paths: Paths) -> None:
    steps: list[tuple[str, int, int]] = []
    measured = calibrate.measure(patched_build, smollm2, live_hardware, lambda *step: steps.append(step))
    assert steps[-1][1] == steps[-1][2] and [s[1] for s in steps] == sorted(s[1] for s in steps)
    knobs = {m.knob for m in measured.table}
    assert knobs == {"threads", "poll", "ubatch", "flash_attn", "kv_types", "repack", "final"}
    assert all(m.decode_tps or m.prompt_tps for m in measured.table)
    assert measured.decode_tps > 0 and measured.prompt_tps > 0
    calibrate.save(store, measured)
    loaded = calibrate.load(store, CalibrationKey.create(patched_build, smollm2.path, live_hardware))
    assert loaded == measured
    p = plan(smollm2, live_hardware, BuildFacts.from_build(patched_build, paths), TuneRequest(), loaded)
    assert p.settings.threads == measured.chosen.threads and p.settings.ubatch == measured.chosen.ubatch
    assert p.reason("threads").startswith("measured:") and p.to_dict()["predicted"]["differs"] == []


@pytest.mark.slow
def test_the_real_server_accepts_a_calibrated_plan(patched_build: InstalledBuild, smollm2: ModelInfo,
                                                   live_hardware: HardwareInfo, paths: Paths) -> None:
    """The flags only a calibration plans (``--poll``, ``--no-repack``) and its memory estimate without repacking."""
    cal = calibration(CalibrationKey.create(patched_build, smollm2.path, live_hardware), poll=0, repack=False)
    p = plan(smollm2, live_hardware, BuildFacts.from_build(patched_build, paths), TuneRequest(), cal)
    assert "--no-repack" in p.args and "--poll" in p.args
    assert p.memory.repack_bytes == 0 and not p.settings.load_mode_none  # nothing repacked: nothing read instead
    server = serve.start_server(serve.ServerConfig(binary=patched_build.bin("llama-server"), model=smollm2.path,
                                                   args=p.args))
    try:
        assert serve.complete(server, "Hello", n_predict=4)["content"] is not None
    finally:
        server.stop()
