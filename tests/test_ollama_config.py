"""Ollama server settings: reading, recommending (per era and model), writing, and the CLI."""

from __future__ import annotations

import datetime as dt
import json
import os
import plistlib
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.fake_ollama import FakeModel, FakeOllama, llama31_8b
from tests.helpers import recorded_hardware
from velollm_patch import hardware
from velollm_patch.cli_ollama import ollama
from velollm_patch.errors import VelollmError
from velollm_patch.ollama.api import OllamaClient, ShowResponse
from velollm_patch.ollama.config import (
    GIB,
    ConfigFormat,
    ConfigPlan,
    LoadedModel,
    RecommendationInputs,
    Setting,
    apply_config,
    collect_current,
    fit_context,
    kv_type_problem,
    loaded_model_from_show,
    read_config_file,
    read_systemd_dropins,
    recommend,
    render_config,
)
from velollm_patch.ollama.versions import OllamaVersion


@pytest.fixture(autouse=True)
def empty_ollama_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep any models pulled on this machine out of the tests."""
    store = tmp_path / "ollama-store"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    return store


LLAMA = LoadedModel("llama3.1:8b", "llama", size_bytes=int(5.5 * GIB), context_length=4096,
                    head_count_kv=(8,) * 32, key_length=128, value_length=128, train_context=131072)


def plan_for(version: str | None = "0.33.0", models: tuple[LoadedModel, ...] = (LLAMA,),
             current: dict[str, str] | None = None, **inputs: object) -> ConfigPlan:
    base = RecommendationInputs(vram_bytes=24 * GIB, ram_bytes=64 * GIB, cpu_cores=16,
                                models=models, ollama_version=version)
    settings = {k: Setting(v, "environment") for k, v in (current or {}).items()}
    return recommend(replace(base, **inputs), settings)  # type: ignore[arg-type]


def rec(plan: ConfigPlan, name: str) -> tuple[str | None, str]:
    (found,) = [r for r in plan.recommendations if r.name == name]
    return found.value, found.why


def test_llama_kv_geometry_from_show() -> None:
    show = ShowResponse(model_info=llama31_8b().model_info)
    model = loaded_model_from_show("llama3.1:8b", show)
    assert model.head_dims == (128, 128) and model.head_count_kv == (8,) * 32
    assert model.kv_bytes_per_token() == 128 * 1024
    assert model.kv_bytes_per_token("q8_0") == 68 * 1024


def test_per_layer_kv_heads_and_explicit_head_dims() -> None:
    info = {"general.architecture": "gemma3", "gemma3.block_count": 3, "gemma3.attention.head_count": 8,
            "gemma3.attention.head_count_kv": [4, 4, 0], "gemma3.embedding_length": 640,
            "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256}
    model = loaded_model_from_show("g", ShowResponse(model_info=info))
    assert model.head_count_kv == (4, 4, 0) and model.head_dims == (256, 256)
    assert model.kv_bytes_per_token() == 8 * 512 * 2


def test_era_c_recommendation_for_a_24_gib_gpu() -> None:
    plan = plan_for()
    assert plan.values() == {
        "OLLAMA_HOST": "127.0.0.1:11434",
        "OLLAMA_KV_CACHE_TYPE": "q8_0",
        "OLLAMA_FLASH_ATTENTION": "1",
        "OLLAMA_NUM_PARALLEL": "1",
        "OLLAMA_CONTEXT_LENGTH": "131072",
        "OLLAMA_MAX_LOADED_MODELS": "1",
        "OLLAMA_KEEP_ALIVE": "30m",
    }
    assert "halves KV memory" in rec(plan, "OLLAMA_KV_CACHE_TYPE")[1]
    assert "128/128" in rec(plan, "OLLAMA_KV_CACHE_TYPE")[1]
    assert "quantized V cache needs flash attention" in rec(plan, "OLLAMA_FLASH_ATTENTION")[1]
    assert all(r.why and "\n" not in r.why for r in plan.recommendations)


def test_context_fits_weights_plus_kv() -> None:
    # 12 GiB: 11 GiB usable; weights 5.5 GiB less the 0.5 GiB f16 KV at 4096 = 5 GiB; q8_0 KV is
    # 68 KiB/token, so 65536 tokens (4.25 GiB) fit and 131072 (8.5 GiB) do not.
    assert rec(plan_for(vram_bytes=12 * GIB), "OLLAMA_CONTEXT_LENGTH")[0] == "65536"
    assert fit_context(5 * GIB, 68 * 1024, 11 * GIB, 1, 131072) == 65536
    assert fit_context(5 * GIB, 68 * 1024, 11 * GIB, 2, 131072) == 32768
    assert fit_context(int(10.9 * GIB), 68 * 1024, 11 * GIB, 1, None) is None
    assert fit_context(1 * GIB, 1024, 100 * GIB, 1, 8192) == 8192


def test_parallel_slots_share_the_budget() -> None:
    plan = plan_for(vram_bytes=12 * GIB, parallel_requests=2)
    assert rec(plan, "OLLAMA_NUM_PARALLEL")[0] == "2"
    assert rec(plan, "OLLAMA_CONTEXT_LENGTH")[0] == "32768"


def test_model_too_big_for_the_gpu() -> None:
    value, why = rec(plan_for(vram_bytes=6 * GIB), "OLLAMA_CONTEXT_LENGTH")
    assert value == "4096" and "spill to the CPU" in why


def test_cpu_only_sizes_against_ram() -> None:
    plan = plan_for(vram_bytes=0, ram_bytes=16 * GIB)
    value, why = rec(plan, "OLLAMA_CONTEXT_LENGTH")
    assert value == "65536" and "of RAM" in why
    assert "on 16 cores" in rec(plan, "OLLAMA_NUM_PARALLEL")[1]


@pytest.mark.parametrize(("model", "reason"), [
    (replace(LLAMA, name="odd", key_length=72, value_length=72), "72/72"),
    (replace(LLAMA, name="oss", architecture="gptoss"), "#11685"),
])
def test_kv_type_never_set_where_a_model_cannot_take_it(model: LoadedModel, reason: str) -> None:
    plan = plan_for(models=(LLAMA, model))
    value, why = rec(plan, "OLLAMA_KV_CACHE_TYPE")
    assert value is None and reason in why
    assert "OLLAMA_KV_CACHE_TYPE" not in render_config(plan, ConfigFormat.SYSTEMD)


def test_kv_type_needs_known_head_dims_and_version() -> None:
    assert rec(plan_for(models=(LoadedModel("x", size_bytes=GIB),)), "OLLAMA_KV_CACHE_TYPE")[0] is None
    value, why = rec(plan_for(version=None), "OLLAMA_KV_CACHE_TYPE")
    assert value is None and "version is unknown" in why
    assert rec(plan_for(version="0.0.0"), "OLLAMA_KV_CACHE_TYPE")[0] is None  # a source build


@pytest.mark.parametrize(("kv", "version", "fragment"), [
    ("q4_1", "0.20.0", "accepts only f16, q8_0, q4_0"),
    ("q8_0", "0.4.5", "has no OLLAMA_KV_CACHE_TYPE"),
    ("q3_k", "0.33.0", "does not know q3_k"),
])
def test_kv_type_problems(kv: str, version: str, fragment: str) -> None:
    problem = kv_type_problem(kv, OllamaVersion.parse(version), [LLAMA])
    assert problem is not None and fragment in problem
    assert kv_type_problem("q8_0", OllamaVersion.parse("0.33.0"), [LLAMA]) is None
    assert kv_type_problem("Q4_0", OllamaVersion.parse("0.20.0"), [LLAMA]) is None


def test_era_b_turns_flash_attention_on_and_ignores_llama_args() -> None:
    plan = plan_for(version="0.20.0", llama_args={"LLAMA_ARG_FIT_TARGET": "512"})
    assert rec(plan, "OLLAMA_FLASH_ATTENTION")[0] == "1"
    assert rec(plan, "OLLAMA_KV_CACHE_TYPE")[0] == "q8_0"
    value, why = rec(plan, "LLAMA_ARG_FIT_TARGET")
    assert value is None and "does not run llama-server" in why


def test_era_c_leaves_flash_attention_on_auto_with_f16() -> None:
    value, why = rec(plan_for(models=()), "OLLAMA_FLASH_ATTENTION")
    assert value is None and "auto" in why


def test_era_c_passes_llama_args_ollama_does_not_set() -> None:
    plan = plan_for(llama_args={"LLAMA_ARG_FIT_TARGET": "512", "LLAMA_ARG_CTX_SIZE": "8192"})
    assert rec(plan, "LLAMA_ARG_FIT_TARGET")[0] == "512"
    value, why = rec(plan, "LLAMA_ARG_CTX_SIZE")
    assert value is None and "sets this llama-server option itself" in why


def test_unchecked_server_gets_only_the_llama_args_ollama_documents() -> None:
    # Without a look at the llama-server Ollama runs, a patched-only variable could be one an upstream server
    # ignores (LLAMA_ARG_KV_ON_DEMAND) or one whose value stops it (LLAMA_ARG_LAZY_MODE=embd).
    plan = plan_for(llama_args={"LLAMA_ARG_FIT": "on", "LLAMA_ARG_KV_ON_DEMAND": "1", "LLAMA_ARG_LAZY_MODE": "embd"})
    assert rec(plan, "LLAMA_ARG_FIT")[0] == "on"
    for name in ("LLAMA_ARG_KV_ON_DEMAND", "LLAMA_ARG_LAZY_MODE"):
        value, why = rec(plan, name)
        assert value is None and "was not checked" in why
    assert set(plan.values()) >= {"LLAMA_ARG_FIT"} and "LLAMA_ARG_LAZY_MODE" not in plan.values()


def test_llama_args_the_server_does_not_take_are_not_recommended() -> None:
    checked: list[tuple[str, str]] = []

    def check(name: str, value: str) -> str | None:
        checked.append((name, value))
        return "the server has no such option" if name == "LLAMA_ARG_KV_ON_DEMAND" else None

    plan = plan_for(llama_args={"LLAMA_ARG_FIT_TARGET": "512", "LLAMA_ARG_KV_ON_DEMAND": "1",
                                "LLAMA_ARG_CACHE_RAM": "360", "LLAMA_ARG_THREADS": "2"},
                    llama_arg_check=check)
    assert rec(plan, "LLAMA_ARG_KV_ON_DEMAND") == (None, "the server has no such option")
    assert rec(plan, "LLAMA_ARG_FIT_TARGET")[0] == "512" and rec(plan, "LLAMA_ARG_CACHE_RAM")[0] == "360"
    # What Ollama owns is refused before the server is asked.
    assert ("LLAMA_ARG_THREADS", "2") not in checked and rec(plan, "LLAMA_ARG_THREADS")[0] is None


def test_a_per_slot_context_cap_is_ollamas() -> None:
    # llama-server caps each slot at LLAMA_ARG_KV_UNIFIED_PER_SLOT even with -c and -np given, below the num_ctx
    # Ollama sized the slots for.
    value, why = rec(plan_for(llama_args={"LLAMA_ARG_KV_UNIFIED_PER_SLOT": "2048"},
                              llama_arg_check=lambda name, value: None), "LLAMA_ARG_KV_UNIFIED_PER_SLOT")
    assert value is None and "sets this llama-server option itself" in why


def test_not_a_llama_arg() -> None:
    with pytest.raises(VelollmError, match="not a llama-server environment variable"):
        plan_for(llama_args={"CUDA_VISIBLE_DEVICES": "0"})


def test_too_old_ollama_is_refused() -> None:
    with pytest.raises(VelollmError, match=r"Ollama 0\.3\.14 is too old"):
        plan_for(version="0.3.14")


@pytest.mark.parametrize(("current", "expected", "warned"), [
    ("http://0.0.0.0", "0.0.0.0:80", True),
    ("0.0.0.0", "0.0.0.0:11434", False),
    ("[::]:9000", "[::]:9000", False),
    (None, "127.0.0.1:11434", False),
])
def test_host_gets_an_explicit_port(current: str | None, expected: str, warned: bool) -> None:
    plan = plan_for(current={"OLLAMA_HOST": current} if current else {})
    value, why = rec(plan, "OLLAMA_HOST")
    assert value == expected and "port written out" in why
    assert any("reads as port 80, not 11434" in w for w in plan.warnings) is warned


def test_warnings_about_current_values() -> None:
    plan = plan_for(version="0.20.0", current={
        "OLLAMA_KV_CACHE_TYPE": "q5_1", "OLLAMA_FLASH_ATTENTION": "yes", "OLLAMA_KEEP_ALIVE": "forever"})
    text = "\n".join(plan.warnings)
    assert "OLLAMA_KV_CACHE_TYPE=q5_1" in text and "accepts only" in text
    assert "counts an unreadable value as true" in text
    assert "OLLAMA_KEEP_ALIVE=forever" in text


def test_removal_is_recommended_when_we_leave_a_set_variable_unset() -> None:
    plan = plan_for(models=(), current={"OLLAMA_FLASH_ATTENTION": "0"})
    assert any("OLLAMA_FLASH_ATTENTION=0 from environment stays in effect" in w for w in plan.warnings)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_systemd_dropins_in_order(tmp_path: Path) -> None:
    write(tmp_path / "override.conf", '[Service]\nEnvironment="OLLAMA_HOST=0.0.0.0" "OLLAMA_DEBUG=1"\n'
                                      "Environment=OLLAMA_KEEP_ALIVE=10m\n[Unit]\nEnvironment=OLLAMA_X=1\n")
    write(tmp_path / "velollm.conf", "[Service]\n# comment\nEnvironment='OLLAMA_HOST=127.0.0.1:11434'\n"
                                     "Environment=PATH=/bin OLLAMA_KV_CACHE_TYPE=q8_0 \\\n  OLLAMA_NUM_PARALLEL=2\n")
    write(tmp_path / "notes.txt", "[Service]\nEnvironment=OLLAMA_IGNORED=1\n")
    settings, files, notes = read_systemd_dropins(tmp_path)
    assert {k: v.value for k, v in settings.items()} == {
        "OLLAMA_HOST": "127.0.0.1:11434", "OLLAMA_DEBUG": "1", "OLLAMA_KEEP_ALIVE": "10m",
        "OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_NUM_PARALLEL": "2"}
    assert settings["OLLAMA_DEBUG"].source == str(tmp_path / "override.conf")
    assert [f.name for f in files] == ["override.conf", "velollm.conf"] and not notes


def test_empty_environment_resets(tmp_path: Path) -> None:
    write(tmp_path / "a.conf", "[Service]\nEnvironment=OLLAMA_HOST=x\nEnvironmentFile=/etc/ollama.env\n")
    write(tmp_path / "b.conf", "[Service]\nEnvironment=\nEnvironment=OLLAMA_DEBUG=2\n")
    settings, _, notes = read_systemd_dropins(tmp_path)
    assert list(settings) == ["OLLAMA_DEBUG"]
    assert "EnvironmentFile" in notes[0]


def test_collect_current_reads_server_and_geometry(tmp_path: Path) -> None:
    with FakeOllama([llama31_8b(), FakeModel("plain")], version="0.31.2") as server:
        server.load("llama3.1:8b")
        server.load("plain")
        with OllamaClient(server.url) as client:
            state = collect_current(environ={"OLLAMA_HOST": "x", "HOME": "/root"},
                                    systemd_dir=tmp_path / "none", client=client)
    assert state.server_version == "0.31.2" and state.server_error is None
    by_name = {m.name: m for m in state.models}
    assert by_name["llama3.1:8b"].kv_bytes_per_token() == 128 * 1024
    assert by_name["llama3.1:8b"].context_length == 4096
    assert by_name["plain"].kv_bytes_per_token() is None
    assert list(state.environment) == ["OLLAMA_HOST"]
    assert state.values_for(ConfigFormat.SYSTEMD) == {}


def test_collect_current_reads_weights_from_the_local_store(empty_ollama_store: Path) -> None:
    blob = write(empty_ollama_store / "blobs" / ("sha256-" + "ab" * 32), "GGUF" + "x" * 96)
    manifest = {"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:" + "ab" * 32}]}
    write(empty_ollama_store / "manifests" / "registry.ollama.ai" / "library" / "llama3.1" / "8b",
          json.dumps(manifest))
    with FakeOllama([llama31_8b()]) as server:
        server.load("llama3.1:8b")
        with OllamaClient(server.url) as client:
            state = collect_current(environ={}, systemd_dir=empty_ollama_store, client=client)
    (model,) = state.models
    assert model.weights_bytes == blob.stat().st_size == 100
    assert model.estimated_weights() == 100


def test_weights_estimate_subtracts_one_f16_slot() -> None:
    assert LLAMA.estimated_weights() == int(5.5 * GIB) - 4096 * 128 * 1024
    assert LoadedModel("x", size_bytes=7).estimated_weights() == 7


def test_collect_current_without_a_server(tmp_path: Path) -> None:
    with OllamaClient("127.0.0.1:9", timeout=1) as client:
        state = collect_current(environ={}, systemd_dir=tmp_path, client=client)
    assert state.server_version is None and state.server_error is not None


def test_apply_writes_then_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "ollama.service.d" / "velollm.conf"
    plan = plan_for()
    first = apply_config(plan, ConfigFormat.SYSTEMD, path)
    assert first.changed and first.backup is None
    text = path.read_text()
    assert 'Environment="OLLAMA_KV_CACHE_TYPE=q8_0"' in text and text.startswith("# Written by")
    assert text.splitlines()[4] == "[Service]"
    settings, _, _ = read_systemd_dropins(path.parent)
    assert {k: v.value for k, v in settings.items()} == plan.values()
    again = apply_config(plan, ConfigFormat.SYSTEMD, path)
    assert not again.changed and again.backup is None
    assert sorted(p.name for p in path.parent.iterdir()) == ["velollm.conf"]


def test_apply_keeps_a_timestamped_backup(tmp_path: Path) -> None:
    path = write(tmp_path / "velollm.conf", "[Service]\nEnvironment=OLLAMA_DEBUG=1\n")
    os.chmod(path, 0o640)
    when = dt.datetime(2026, 9, 1, 12, 30, 5)
    result = apply_config(plan_for(), ConfigFormat.SYSTEMD, path, now=when)
    assert result.backup == tmp_path / "velollm.conf.velollm-20260901-123005.bak"
    assert result.backup.read_text() == "[Service]\nEnvironment=OLLAMA_DEBUG=1\n"
    assert path.stat().st_mode & 0o777 == 0o640
    second = apply_config(plan_for(vram_bytes=12 * GIB), ConfigFormat.SYSTEMD, path, now=when)
    assert second.backup == tmp_path / "velollm.conf.velollm-20260901-123005-1.bak"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_apply_to_an_unusable_path_changes_nothing(tmp_path: Path) -> None:
    blocker = write(tmp_path / "file", "x")
    with pytest.raises(VelollmError, match="is not a directory"):
        apply_config(plan_for(), ConfigFormat.ENV, blocker / "sub" / "ollama.env")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and blocker.read_text() == "x"


def test_apply_without_permission_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "d" / "velollm.conf", "old\n")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == path.parent else real_access(p, mode))
    with pytest.raises(VelollmError, match="no permission to write"):
        apply_config(plan_for(), ConfigFormat.SYSTEMD, path)
    assert path.read_text() == "old\n" and sorted(p.name for p in path.parent.iterdir()) == ["velollm.conf"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_apply_into_a_read_only_directory(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        with pytest.raises(VelollmError, match="no permission"):
            apply_config(plan_for(), ConfigFormat.ENV, directory / "ollama.env")
    finally:
        directory.chmod(0o755)
    assert list(directory.iterdir()) == []


def test_values_that_formats_cannot_carry_are_refused() -> None:
    plan = plan_for(llama_args={"LLAMA_ARG_ALIAS": "a b%"}, llama_arg_check=lambda name, value: None)
    with pytest.raises(VelollmError, match="cannot carry"):
        render_config(plan, ConfigFormat.SYSTEMD)


def test_env_format() -> None:
    lines = [line for line in render_config(plan_for(), ConfigFormat.ENV).splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "OLLAMA_HOST=127.0.0.1:11434" and "OLLAMA_KV_CACHE_TYPE=q8_0" in lines


def test_powershell_format() -> None:
    text = render_config(plan_for(), ConfigFormat.POWERSHELL)
    assert "[Environment]::SetEnvironmentVariable('OLLAMA_KEEP_ALIVE', '30m', 'User')" in text


def test_launchd_format_is_a_valid_plist() -> None:
    data = plistlib.loads(render_config(plan_for(), ConfigFormat.LAUNCHD).encode())
    assert data["Label"] == "com.velollm-patch.ollama-env" and data["RunAtLoad"] is True
    script = data["ProgramArguments"][2]
    assert "/bin/launchctl setenv OLLAMA_KV_CACHE_TYPE q8_0" in script


def test_platform_defaults() -> None:
    assert ConfigFormat.for_platform("linux") is ConfigFormat.SYSTEMD
    assert ConfigFormat.for_platform("darwin") is ConfigFormat.LAUNCHD
    assert ConfigFormat.for_platform("win32") is ConfigFormat.POWERSHELL


def test_inputs_from_recorded_hardware() -> None:
    machine = recorded_hardware("rtx4090")
    inputs = RecommendationInputs.from_hardware(machine)
    assert inputs.vram_bytes == sum(g.vram_total_bytes for g in machine.gpus) > 20 * GIB
    assert inputs.gpus == len(machine.gpus) and inputs.ram_bytes == machine.memory.total_bytes


def run_config(args: list[str], server: FakeOllama, systemd_dir: Path) -> str:
    result = CliRunner().invoke(ollama, ["config", "--host", server.url, "--systemd-dir", str(systemd_dir),
                                         "--format", "systemd", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_cli_dry_run_then_apply(tmp_path: Path) -> None:
    dropins = tmp_path / "ollama.service.d"
    write(dropins / "override.conf", "[Service]\nEnvironment=OLLAMA_FLASH_ATTENTION=0\n")
    with FakeOllama([llama31_8b()], version="0.33.0") as server:
        server.load("llama3.1:8b")
        dry = run_config(["--vram-gib", "24"], server, dropins)
        assert "Ollama 0.33.0 at" in dry and "1 model(s) loaded" in dry
        assert "* OLLAMA_KV_CACHE_TYPE" in dry and "(unset) -> q8_0" in dry
        assert "* OLLAMA_FLASH_ATTENTION" in dry and "0 -> 1" in dry
        assert "Dry run: nothing written" in dry
        assert sorted(p.name for p in dropins.iterdir()) == ["override.conf"]
        applied = run_config(["--vram-gib", "24", "--apply"], server, dropins)
        assert f"wrote {dropins / 'velollm.conf'}" in applied and "daemon-reload" in applied
        again = run_config(["--vram-gib", "24", "--apply"], server, dropins)
        assert "nothing changed" in again
        assert "  OLLAMA_KV_CACHE_TYPE" in again and "q8_0 -> q8_0" in again
    assert sorted(p.name for p in dropins.iterdir()) == ["override.conf", "velollm.conf"]


def test_cli_detects_hardware_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "detect", lambda: recorded_hardware("rtx4090"))
    with FakeOllama([llama31_8b()]) as server:
        server.load("llama3.1:8b")
        output = run_config([], server, tmp_path)
    assert "OLLAMA_CONTEXT_LENGTH" in output and "(unset) -> 131072" in output


def test_cli_apply_with_too_old_ollama_changes_nothing(tmp_path: Path) -> None:
    with FakeOllama([], version="0.3.14") as server:
        result = CliRunner().invoke(ollama, ["config", "--apply", "--host", server.url, "--vram-gib", "8",
                                             "--format", "env", "--path", str(tmp_path / "ollama.env")])
    assert isinstance(result.exception, VelollmError) and "too old" in str(result.exception)
    assert list(tmp_path.iterdir()) == []


# --- Editing a file that is there: the user's lines stay -------------------------------------------

USER_ENV = (
    "# proxy for model pulls\n"
    "HTTPS_PROXY=http://proxy.example:3128\n"
    "OLLAMA_MODELS=/srv/ollama/models\n"
    "\n"
    "# four users share this box\n"
    "OLLAMA_NUM_PARALLEL=4\n"
)


def backups(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.endswith(".bak"))


def test_cli_env_file_keeps_the_users_lines(tmp_path: Path) -> None:
    env = write(tmp_path / "ollama.env", USER_ENV)
    args = ["config", "--vram-gib", "24", "--format", "env", "--path", str(env),
            "--systemd-dir", str(tmp_path / "no-dropins")]
    with FakeOllama([llama31_8b()], version="0.33.0") as server:
        server.load("llama3.1:8b")

        def run(*extra: str) -> str:
            result = CliRunner().invoke(ollama, [*args, "--host", server.url, *extra])
            assert result.exit_code == 0, (result.output, result.exception)
            return result.output

        dry = run()
        assert "* OLLAMA_NUM_PARALLEL" in dry and f"4 -> 1  (from {env})" in dry
        assert env.read_text() == USER_ENV
        applied = run("--apply")
        text = env.read_text()
        again = run("--apply")
    # Ours changed in place, every other line and comment as it was, new settings appended with their why.
    kept = USER_ENV.replace("OLLAMA_NUM_PARALLEL=4", "OLLAMA_NUM_PARALLEL=1")
    assert text.startswith(kept)
    appended = text[len(kept):].splitlines()
    assert appended[0].startswith("# the address") and appended[1] == "OLLAMA_HOST=127.0.0.1:11434"
    assert all(c.startswith("# ") and "=" in line for c, line in zip(appended[::2], appended[1::2], strict=True))
    assert read_config_file(ConfigFormat.ENV, env)["OLLAMA_MODELS"].value == "/srv/ollama/models"
    assert "changed: OLLAMA_NUM_PARALLEL" in applied and "added: OLLAMA_HOST, OLLAMA_KV_CACHE_TYPE" in applied
    assert "4 other line(s) kept as they were" in applied
    assert "nothing changed" in again and "1 -> 1  (from" in again and "* " not in again
    assert env.read_text() == text
    (backup,) = backups(tmp_path)
    assert backup.read_text() == USER_ENV


USER_DROPIN = (
    "[Unit]\n"
    "# restart quickly\n"
    "StartLimitBurst=10\n"
    "\n"
    "[Service]\n"
    "# raised for many clients\n"
    "LimitNOFILE=65536\n"
    "Environment=\"OLLAMA_DEBUG=1\" OLLAMA_NUM_PARALLEL=4 'HTTPS_PROXY=http://proxy.example:3128'\n"
    "Environment=OLLAMA_FLASH_ATTENTION=0 \\\n"
    "    OLLAMA_ORIGINS=*\n"
    "\n"
    "[Install]\n"
    "WantedBy=default.target\n"
)


def test_systemd_dropin_keeps_the_users_lines(tmp_path: Path) -> None:
    dropins = tmp_path / "ollama.service.d"
    path = write(dropins / "velollm.conf", USER_DROPIN)
    inputs = RecommendationInputs(vram_bytes=24 * GIB, ram_bytes=64 * GIB, cpu_cores=16, ollama_version="0.33.0")

    def plan_now() -> ConfigPlan:
        state = collect_current(environ={}, systemd_dir=dropins, client=None, target=(ConfigFormat.SYSTEMD, path))
        return recommend(inputs, state.values_for(ConfigFormat.SYSTEMD))

    plan = plan_now()
    (parallel,) = [r for r in plan.recommendations if r.name == "OLLAMA_NUM_PARALLEL"]
    assert (parallel.current, parallel.after, parallel.source) == ("4", "1", str(path))
    # Era C without a loaded model: flash attention is best left on auto, so --apply removes it
    # here, and does not tell the user to remove it by hand.
    assert rec(plan, "OLLAMA_FLASH_ATTENTION")[0] is None and not plan.warnings
    result = apply_config(plan, ConfigFormat.SYSTEMD, path)
    assert result.keys.changed == ("OLLAMA_NUM_PARALLEL",) and result.keys.removed == ("OLLAMA_FLASH_ATTENTION",)
    assert result.keys.added == ("OLLAMA_HOST", "OLLAMA_KEEP_ALIVE")
    assert path.read_text() == (
        "[Unit]\n# restart quickly\nStartLimitBurst=10\n\n[Service]\n# raised for many clients\nLimitNOFILE=65536\n"
        "Environment=\"OLLAMA_DEBUG=1\" \"OLLAMA_NUM_PARALLEL=1\" 'HTTPS_PROXY=http://proxy.example:3128'\n"
        "Environment=OLLAMA_ORIGINS=*\n"
        f"# {rec(plan, 'OLLAMA_HOST')[1]}\nEnvironment=\"OLLAMA_HOST=127.0.0.1:11434\"\n"
        f"# {rec(plan, 'OLLAMA_KEEP_ALIVE')[1]}\nEnvironment=\"OLLAMA_KEEP_ALIVE=30m\"\n"
        "\n[Install]\nWantedBy=default.target\n"
    )
    settings, _, _ = read_systemd_dropins(dropins)
    assert {k: v.value for k, v in settings.items()} == {
        "OLLAMA_DEBUG": "1", "OLLAMA_NUM_PARALLEL": "1", "OLLAMA_ORIGINS": "*",
        "OLLAMA_HOST": "127.0.0.1:11434", "OLLAMA_KEEP_ALIVE": "30m"}
    again = plan_now()
    assert not [r.name for r in again.recommendations if r.changes]
    assert not apply_config(again, ConfigFormat.SYSTEMD, path).changed
    assert len(backups(dropins)) == 1


def test_systemd_target_elsewhere_counts_as_the_last_dropin(tmp_path: Path) -> None:
    dropins = tmp_path / "ollama.service.d"
    write(dropins / "override.conf", "[Service]\nEnvironment=OLLAMA_NUM_PARALLEL=2 OLLAMA_DEBUG=1\n")
    target = write(tmp_path / "staged.conf", "[Service]\nEnvironment=OLLAMA_NUM_PARALLEL=4\n")
    state = collect_current(environ={}, systemd_dir=dropins, client=None, target=(ConfigFormat.SYSTEMD, target))
    values = state.values_for(ConfigFormat.SYSTEMD)
    assert values["OLLAMA_NUM_PARALLEL"] == Setting("4", str(target), in_target=True)
    assert values["OLLAMA_DEBUG"] == Setting("1", str(dropins / "override.conf"))


def test_systemd_dropin_without_a_service_section_gets_one(tmp_path: Path) -> None:
    path = write(tmp_path / "velollm.conf", "[Unit]\nDescription=mine")
    apply_config(plan_for(), ConfigFormat.SYSTEMD, path)
    settings, _, _ = read_systemd_dropins(tmp_path)
    assert {k: v.value for k, v in settings.items()} == plan_for().values()
    assert path.read_text().startswith("[Unit]\nDescription=mine\n[Service]\n# ")


USER_PS1 = (
    b"# set up by hand\r\n"
    b"[Environment]::SetEnvironmentVariable('OLLAMA_ORIGINS', 'app://*', 'User')\r\n"
    b"[Environment]::SetEnvironmentVariable('OLLAMA_NUM_PARALLEL', '4', 'User')\r\n"
    b"Write-Host 'done'\r\n"
)


def test_powershell_script_keeps_the_users_lines(tmp_path: Path) -> None:
    path = tmp_path / "ollama-env.ps1"
    path.write_bytes(USER_PS1)
    current = read_config_file(ConfigFormat.POWERSHELL, path)
    assert current["OLLAMA_NUM_PARALLEL"] == Setting("4", str(path), in_target=True)
    assert current["OLLAMA_ORIGINS"].value == "app://*"
    plan = plan_for()
    result = apply_config(plan, ConfigFormat.POWERSHELL, path)
    data = path.read_bytes()
    head = USER_PS1.replace(b"'4'", b"'1'").removesuffix(b"Write-Host 'done'\r\n")
    assert data.startswith(head) and data.endswith(b"')\r\nWrite-Host 'done'\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")  # the file's CRLF line ends, new lines included
    assert b"[Environment]::SetEnvironmentVariable('OLLAMA_KEEP_ALIVE', '30m', 'User')\r\n" in data
    assert {k: v.value for k, v in read_config_file(ConfigFormat.POWERSHELL, path).items()} == {
        "OLLAMA_ORIGINS": "app://*", **plan.values()}
    assert result.keys.changed == ("OLLAMA_NUM_PARALLEL",) and result.keys.other_lines == 3
    assert not apply_config(plan, ConfigFormat.POWERSHELL, path).changed
    assert len(backups(tmp_path)) == 1


def test_launchd_agent_keeps_the_users_commands(tmp_path: Path) -> None:
    mine = "/bin/launchctl setenv HTTPS_PROXY http://proxy.example:3128"
    old = render_config(plan_for(vram_bytes=12 * GIB), ConfigFormat.LAUNCHD).replace(
        "<string>/bin/launchctl", f"<string>{mine} ; /bin/launchctl", 1)
    path = write(tmp_path / "agent.plist", old)
    assert read_config_file(ConfigFormat.LAUNCHD, path)["OLLAMA_CONTEXT_LENGTH"].value == "65536"
    result = apply_config(plan_for(), ConfigFormat.LAUNCHD, path)
    assert result.keys.changed == ("OLLAMA_CONTEXT_LENGTH",) and result.keys.other_lines == 1
    script = plistlib.loads(path.read_bytes())["ProgramArguments"][2]
    assert script.startswith(f"{mine} ; ") and "setenv OLLAMA_CONTEXT_LENGTH 131072 ;" in script
    # Only the script changed; the comments around it are the user's to keep.
    before, after = old.split("<string>/bin/sh</string>")
    assert path.read_text().startswith(before) and path.read_text().endswith(after[after.index("</array>"):])
    assert not apply_config(plan_for(), ConfigFormat.LAUNCHD, path).changed


def test_launchd_file_that_is_no_agent_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.plist", plistlib.dumps({"Label": "x", "Program": "/bin/true"}).decode())
    before = path.read_text()
    with pytest.raises(VelollmError, match="is not a launchd agent whose ProgramArguments"):
        apply_config(plan_for(), ConfigFormat.LAUNCHD, path)
    assert path.read_text() == before and backups(tmp_path) == []


def test_unset_advice_removes_a_line_but_what_cannot_be_judged_stays(tmp_path: Path) -> None:
    path = write(tmp_path / "ollama.env",
                 "OLLAMA_FLASH_ATTENTION=0\nOLLAMA_CONTEXT_LENGTH=8192\nLLAMA_ARG_CTX_SIZE=8192\n")
    inputs = RecommendationInputs(vram_bytes=24 * GIB, ollama_version="0.33.0",
                                  llama_args={"LLAMA_ARG_CTX_SIZE": "4096"})
    plan = recommend(inputs, read_config_file(ConfigFormat.ENV, path))
    # No model loaded: nothing to size the context against, so the user's 8192 stays.
    (context,) = [r for r in plan.recommendations if r.name == "OLLAMA_CONTEXT_LENGTH"]
    assert context.keep and context.after == "8192" and not context.changes
    assert not plan.warnings  # the advised removals happen in the file --apply writes
    result = apply_config(plan, ConfigFormat.ENV, path)
    assert result.keys.removed == ("OLLAMA_FLASH_ATTENTION", "LLAMA_ARG_CTX_SIZE")
    assert result.keys.kept == ("OLLAMA_CONTEXT_LENGTH",)
    assert path.read_text().startswith("OLLAMA_CONTEXT_LENGTH=8192\n# ")
    assert set(read_config_file(ConfigFormat.ENV, path)) == {
        "OLLAMA_CONTEXT_LENGTH", "OLLAMA_HOST", "OLLAMA_NUM_PARALLEL", "OLLAMA_KEEP_ALIVE"}


def test_a_kept_kv_type_still_gets_flash_attention() -> None:
    plan = plan_for(version=None, current={"OLLAMA_KV_CACHE_TYPE": "q8_0"})
    (kv,) = [r for r in plan.recommendations if r.name == "OLLAMA_KV_CACHE_TYPE"]
    assert kv.keep and kv.after == "q8_0" and "version is unknown" in kv.why
    assert rec(plan, "OLLAMA_FLASH_ATTENTION")[0] == "1"
    assert not any("stays in effect" in w for w in plan.warnings)


def test_symlink_path_writes_the_file_it_points_to(tmp_path: Path) -> None:
    real = write(tmp_path / "etc" / "ollama.env", "HTTPS_PROXY=http://proxy.example:3128\n")
    link = tmp_path / "home" / "ollama.env"
    link.parent.mkdir()
    link.symlink_to(real)
    when = dt.datetime(2026, 9, 1, 12, 30, 5)
    result = apply_config(plan_for(), ConfigFormat.ENV, link, now=when)
    assert result.path == real and result.backup == real.parent / "ollama.env.velollm-20260901-123005.bak"
    assert link.is_symlink() and link.readlink() == real
    assert real.read_text().startswith("HTTPS_PROXY=http://proxy.example:3128\n# the address")
    assert read_config_file(ConfigFormat.ENV, link)["OLLAMA_HOST"].value == "127.0.0.1:11434"
    assert list(link.parent.iterdir()) == [link]
    assert not apply_config(plan_for(), ConfigFormat.ENV, link).changed
    dangling = tmp_path / "home" / "new.env"
    dangling.symlink_to(tmp_path / "etc" / "new.env")
    apply_config(plan_for(), ConfigFormat.ENV, dangling)
    assert dangling.is_symlink() and (tmp_path / "etc" / "new.env").read_text().startswith("# Written by")


def test_a_symlink_loop_is_refused(tmp_path: Path) -> None:
    loop = tmp_path / "a.env"
    loop.symlink_to(tmp_path / "b.env")
    (tmp_path / "b.env").symlink_to(loop)
    with pytest.raises(VelollmError, match="cannot follow the symlink"):
        apply_config(plan_for(), ConfigFormat.ENV, loop)
