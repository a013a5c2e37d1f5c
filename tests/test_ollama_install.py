"""velollm-patch against a fake Linux Ollama install (tests/fake_ollama_install.py), issue #31.

The store is written as Ollama writes it, so ``inspect``, ``tune`` and ``ollama modelfile`` take Ollama's
model names; the install's llama-server is a real one, started with Ollama's exact argv and environment
(tests/ollama_launch.py); and what ``ollama config`` recommends is checked against what Ollama
(``envconfig.AsMap``) and that server (its ``--help``, and a start) take.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests.fake_ollama import FakeOllama
from tests.fake_ollama_install import (
    CHATML_TEMPLATE,
    CONFIG_MEDIA_TYPE,
    LICENSE_MEDIA_TYPE,
    MODEL_MEDIA_TYPE,
    OLLAMA_SERVER_VARIABLES,
    OLLAMA_VERSION,
    PARAMS_MEDIA_TYPE,
    TEMPLATE_MEDIA_TYPE,
    FakeOllamaInstall,
    StoredModel,
    add_model,
    api_model,
    blob_path,
    human_number,
    make_fake_install,
    ollama_launch_kwargs,
    write_ollama_cli,
)
from tests.helpers import write_gguf
from velollm_patch import hardware, serve
from velollm_patch.bench.load import bench_condition
from velollm_patch.builds import InstalledBuild
from velollm_patch.cli import main
from velollm_patch.model import inspect_model
from velollm_patch.model_ref import resolve_local_model
from velollm_patch.ollama.api import OllamaClient
from velollm_patch.ollama.config import (
    MANAGED,
    ConfigFormat,
    ConfigPlan,
    RecommendationInputs,
    collect_current,
    read_config_file,
    recommend,
)
from velollm_patch.ollama.launch import start_like_ollama
from velollm_patch.ollama.server_swap import bundled_server_path, default_prefix
from velollm_patch.ollama.store import list_ollama_models
from velollm_patch.paths import Paths
from velollm_patch.server_flags import llama_arg_problem, read_server_flags

# SmolLM2's template, close enough to one of Ollama's ChatML entries (template/index.json) to be taken as ChatML.
CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _one_error_line(result: Result) -> str:
    """The command failed with exactly one line, ``error: ...``, on stderr; that line."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- the store, as `ollama create` writes it --------------------------------------------------------------


@pytest.fixture
def tiny_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StoredModel:
    """A tiny GGUF with a ChatML template as ``tiny:1m``, the store being OLLAMA_MODELS."""
    gguf = write_gguf(tmp_path / "tiny.gguf", file_type=1, extra={"tokenizer.chat_template": CHATML_JINJA})
    stored = add_model(tmp_path / "models", "tiny:1m", gguf)
    monkeypatch.setenv("OLLAMA_MODELS", str(stored.store))
    return stored


def test_store_is_written_as_ollama_writes_it(tiny_store: StoredModel, tmp_path: Path) -> None:
    store = tiny_store.store
    assert tiny_store.manifest == store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "1m"
    # manifest.WriteManifest: Go's json.Encoder, compact with a trailing newline, fields in struct order.
    raw = tiny_store.manifest.read_bytes()
    assert raw.endswith(b"}\n") and b" " not in raw
    manifest = json.loads(raw)
    assert list(manifest) == ["schemaVersion", "mediaType", "config", "layers"]
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert manifest["config"]["mediaType"] == CONFIG_MEDIA_TYPE
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        MODEL_MEDIA_TYPE, TEMPLATE_MEDIA_TYPE, LICENSE_MEDIA_TYPE, PARAMS_MEDIA_TYPE]
    # Every blob is named by the sha256 of its bytes and has the size the manifest gives.
    for layer in [manifest["config"], *manifest["layers"]]:
        blob = store / "blobs" / layer["digest"].replace(":", "-")
        data = blob.read_bytes()
        assert layer["digest"] == "sha256:" + hashlib.sha256(data).hexdigest() and layer["size"] == len(data)
    assert sorted(p.name for p in (store / "blobs").iterdir()) == sorted(
        layer["digest"].replace(":", "-") for layer in [manifest["config"], *manifest["layers"]])
    assert tiny_store.weights.read_bytes() == (tmp_path / "tiny.gguf").read_bytes()
    assert tiny_store.blob(TEMPLATE_MEDIA_TYPE).read_text() == CHATML_TEMPLATE
    # detectChatTemplate re-encodes template/chatml.json with json.Encoder, which escapes < and >.
    assert tiny_store.blob(PARAMS_MEDIA_TYPE).read_bytes() == (
        b'{"stop":["\\u003c|im_start|\\u003e","\\u003c|im_end|\\u003e"]}\n')
    assert blob_path(store, tiny_store.config.digest).read_bytes() == (
        b'{"model_format":"gguf","model_family":"llama","model_families":["llama"],'
        + f'"model_type":"{human_number(inspect_model(tiny_store.weights).n_params)}",'.encode()
        + b'"file_type":"F16","architecture":"amd64","os":"linux"}\n')
    assert resolve_local_model("tiny:1m") == tiny_store.weights
    assert list_ollama_models() == [("tiny:1m", tiny_store.weights)]


@pytest.mark.parametrize(("n", "shown"), [
    # format/format_test.go TestHumanNumber
    (0, "0"), (999, "999"), (1000, "1K"), (1001, "1K"), (1_000_000, "1M"), (125_000_000, "125M"),
    (500_500_000, "500.50M"), (500_550_000, "500.55M"), (1_000_000_000, "1B"), (2_800_000_000, "2.8B"),
    (2_850_000_000, "2.9B"), (1_000_000_000_000, "1000B"),
    # SmolLM2-135M, as the registry's smollm2:135m config says
    (134_515_008, "134.52M"),
])
def test_parameter_sizes_are_shown_as_ollama_shows_them(n: int, shown: str) -> None:
    assert human_number(n) == shown


def test_cli_takes_ollama_names(tiny_store: StoredModel) -> None:
    shown = _cli("inspect", "tiny:1m")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines()[0].endswith(f"({tiny_store.weights})")
    report = json.loads(_cli("inspect", "registry.ollama.ai/library/tiny:1m", "--json").stdout)
    assert report["architecture"] == "llama"
    # Without --tuned the Modelfile derives from the name as Ollama knows it.
    written = _cli("ollama", "modelfile", "tiny:1m", "--num-ctx", "2048")
    assert written.exit_code == 0 and "FROM tiny:1m\n" in written.stdout


def _broken_store(store: Path, gguf: Path) -> None:
    """Models in ``store`` that cannot be used, each in its own way."""
    add_model(store, "gone:1m", gguf)
    blob_path(store, json.loads((store / "manifests/registry.ollama.ai/library/gone/1m").read_text())
              ["layers"][0]["digest"]).unlink()
    junk = store / "manifests/registry.ollama.ai/library/junk/1m"
    junk.parent.mkdir(parents=True)
    junk.write_text('{"schemaVersion":2,"layers":[')
    for name, layers in (
        # a safetensors model (x/imagegen, the MLX runner) has tensor layers and no GGUF
        ("tensors", [{"mediaType": "application/vnd.ollama.image.tensor", "digest": "sha256:" + "1" * 64}]),
        ("baddigest", [{"mediaType": MODEL_MEDIA_TYPE, "digest": "sha256:../../etc/passwd"}]),
        ("nolayers", None),
    ):
        path = store / "manifests/registry.ollama.ai/library" / name / "1m"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))


# (model reference, what the one error line says)
BAD_MODELS = [
    ("nosuch:1m", "model 'nosuch:1m' not found in the Ollama store at {store}; run `ollama pull nosuch:1m`"),
    ("bad name!", "'bad name!' is neither a GGUF file nor a valid Ollama model name"),
    ("my.ns/x", "'my.ns/x' is neither a GGUF file nor a valid Ollama model name"),
    ("gone:1m", "the Ollama store at {store} lacks the weights of 'gone:1m' (sha256-"),
    ("junk:1m", "library/junk/1m is not JSON (Expecting value: line 1 column 30 (char 29)); run `ollama pull junk:1m`"),
    ("tensors:1m", "'tensors:1m' has no GGUF weights (its manifest"),
    ("baddigest:1m", "has a malformed model digest; run `ollama pull baddigest:1m` to fetch it again"),
    ("nolayers:1m", "library/nolayers/1m lists no layers; run `ollama pull nolayers:1m` to fetch it again"),
]


@pytest.mark.parametrize(("ref", "message"), BAD_MODELS)
def test_bad_ollama_models_are_one_line(
    ref: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "models"
    _broken_store(store, write_gguf(tmp_path / "tiny.gguf"))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert message.format(store=store) in _one_error_line(_cli("inspect", ref))


def test_ollama_stand_in_answers_version_as_ollama_does(tmp_path: Path) -> None:
    ollama = write_ollama_cli(tmp_path / "bin" / "ollama", "0.33.0")

    def version(*args: str, host: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "OLLAMA_HOST": host}
        return subprocess.run([str(ollama), *args], capture_output=True, text=True, env=env, timeout=60)

    # versionHandler (cmd/cmd.go): no server, then the same release, then another one.
    nobody = version("-v", host=f"127.0.0.1:{serve.free_port()}")
    assert (nobody.returncode, nobody.stdout) == (
        0, "Warning: could not connect to a running Ollama instance\nWarning: client version is 0.33.0\n")
    with FakeOllama(version="0.33.0") as same:
        assert version("--version", host=same.url.removeprefix("http://")).stdout == "ollama version is 0.33.0\n"
    with FakeOllama(version="0.32.1") as other:
        assert version("-v", host=other.url).stdout == (
            "ollama version is 0.32.1\nWarning: client version is 0.33.0\n")
    refused = version("serve", host="127.0.0.1:9")
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1


# --- the install, with a real llama-server ------------------------------------------------------------------


@pytest.mark.slow
def test_install_is_where_velollm_looks(
    fake_ollama_install: FakeOllamaInstall, monkeypatch: pytest.MonkeyPatch
) -> None:
    install = fake_ollama_install
    assert bundled_server_path(install.prefix, "Linux") == install.server
    monkeypatch.setenv("PATH", install.environment()["PATH"])
    assert default_prefix("Linux") == install.prefix
    # The bundled server runs from where it is, with the llama.cpp libraries it loads beside it.
    ldd = subprocess.run(["ldd", str(install.server)], capture_output=True, text=True, check=True, timeout=60)
    assert "not found" not in ldd.stdout
    loaded = {line.split()[0] for line in ldd.stdout.splitlines() if re.match(r"\s*lib(llama|ggml|mtmd)", line)}
    assert {lib.name for lib in install.libraries} == loaded
    with FakeOllama(version=install.version) as api:
        env = {**install.environment(), "OLLAMA_HOST": api.url}
        shown = subprocess.run(["ollama", "-v"], capture_output=True, text=True, env=env, timeout=60, check=True)
    assert shown.stdout == f"ollama version is {OLLAMA_VERSION}\n"


@pytest.mark.slow
def test_cli_takes_ollama_names_of_the_install(
    smollm2_ollama_store: StoredModel, patched_build: InstalledBuild, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = smollm2_ollama_store
    monkeypatch.setenv("OLLAMA_MODELS", str(stored.store))
    shown = _cli("inspect", "smollm2:135m")
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.splitlines()[0].endswith(f"({stored.weights})")
    assert "architecture  llama, 134.5M parameters, Q4_1" in shown.stdout
    tuned = _cli("tune", "smollm2:135m", "--json")
    assert tuned.exit_code == 0, tuned.output
    assert json.loads(tuned.stdout)["env"]["LLAMA_ARG_MODEL"] == str(stored.weights)
    modelfile = _cli("ollama", "modelfile", "smollm2:135m", "--tuned")
    assert modelfile.exit_code == 0, modelfile.output
    assert "\nFROM smollm2:135m\n" in modelfile.stdout and "\nPARAMETER num_ctx " in modelfile.stdout


@pytest.mark.slow
def test_a_tuned_modelfile_keeps_its_threads_on_a_busy_machine(
    smollm2_ollama_store: StoredModel, patched_build: InstalledBuild, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tune` and `serve` plan for the load they see; a Modelfile outlives the moment it is written in."""
    physical = hardware.detect().cpu.physical_cores
    if physical < 2:
        pytest.skip("one core: no thread to leave to another program")
    monkeypatch.setenv("OLLAMA_MODELS", str(smollm2_ollama_store.store))
    with bench_condition("busy"):
        tuned = _cli("tune", "smollm2:135m", "--json")
        modelfile = _cli("ollama", "modelfile", "smollm2:135m", "--tuned")
    assert tuned.exit_code == 0 and modelfile.exit_code == 0, (tuned.output, modelfile.output)
    assert json.loads(tuned.stdout)["settings"]["threads"] < physical  # the load was seen
    assert f"\nPARAMETER num_thread {physical}\n" in modelfile.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("ref", "message"), BAD_MODELS)
@pytest.mark.parametrize("command", [["tune"], ["ollama", "modelfile", "--tuned"]], ids=["tune", "modelfile"])
def test_bad_ollama_models_are_one_line_for_tune_and_modelfile(
    command: list[str], ref: str, message: str, patched_build: InstalledBuild, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = tmp_path / "models"
    _broken_store(store, write_gguf(tmp_path / "tiny.gguf"))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    assert message.format(store=store) in _one_error_line(_cli(*command, ref))


@pytest.mark.slow
def test_bundled_server_answers_when_started_as_ollama_starts_it(
    fake_ollama_install: FakeOllamaInstall, tmp_path: Path
) -> None:
    install = fake_ollama_install
    model = install.model("smollm2:135m")
    server = start_like_ollama(install.server, model.weights, tmp_path / "server.log",
                               ollama_environment=install.environment())
    try:
        # What the process really got: Ollama's binary, the blob as --model, its directory leading LD_LIBRARY_PATH.
        assert Path(f"/proc/{server.pid}/exe").resolve() == install.server.resolve()
        argv = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--model") + 1] == str(model.weights).encode()
        environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
                       if b"=" in item)
        assert environ[b"LD_LIBRARY_PATH"].split(b":")[0] == str(install.lib_dir).encode()
        assert environ[b"OLLAMA_MODELS"] == str(install.store).encode()
        answer = serve.complete(server, "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", 8)
        assert answer["tokens_predicted"] > 0 and answer["content"]
    finally:
        server.stop()


# --- what `ollama config` recommends, against Ollama and the server it runs --------------------------------


def _log_has(pattern: str) -> Callable[[serve.RunningServer], bool]:
    return lambda server: re.search(pattern, server.log_text()) is not None


def _launch(install: FakeOllamaInstall, settings: Mapping[str, str], log: Path) -> serve.RunningServer:
    """The install's server for smollm2:135m, as an Ollama running with ``settings`` in its environment starts it."""
    model = install.model("smollm2:135m")
    kwargs = ollama_launch_kwargs(settings, n_ctx_train=inspect_model(model.weights).n_ctx_train)
    environment = {**install.environment(), **settings}
    return start_like_ollama(install.server, model.weights, log, ollama_environment=environment, **kwargs)


def _check_ollama_settings(server: serve.RunningServer, settings: Mapping[str, str]) -> None:
    """The settings Ollama turns into llama-server flags took effect in ``server``."""
    launch = ollama_launch_kwargs(settings, n_ctx_train=8192)
    slots = server.get_json("/slots")
    assert len(slots) == launch["num_parallel"]
    assert {slot["n_ctx"] for slot in slots} == {launch["options"].num_ctx}
    if launch["kv_cache_type"]:
        kv = re.escape(launch["kv_cache_type"])
        assert re.search(rf"K \({kv}\):.*V \({kv}\):", server.log_text()), server.log_tail()
    if launch["flash_attention"] is not None:
        state = "enabled" if launch["flash_attention"] else "disabled"
        assert re.search(rf"flash_attn\s*=\s*{state}", server.log_text()), server.log_tail()
    assert serve.complete(server, "Hello", 4)["tokens_predicted"] > 0


@pytest.mark.slow
def test_ollama_config_recommends_what_ollama_and_its_server_take(
    fake_ollama_install: FakeOllamaInstall, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install = fake_ollama_install
    for name in [*MANAGED, "OLLAMA_MODELS"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OLLAMA_MODELS", str(install.store))
    written = tmp_path / "ollama.env"
    with FakeOllama([api_model(install.model("smollm2:135m"))], version=install.version) as api:
        api.load("smollm2:135m")
        result = _cli("ollama", "config", "--apply", "--host", api.url, "--format", "env", "--path", str(written),
                      "--systemd-dir", str(tmp_path / "no-systemd"))
    assert result.exit_code == 0, result.output
    # For this machine, with SmolLM2 loaded: what `ollama config --apply` wrote.
    settings = {name: setting.value for name, setting in read_config_file(ConfigFormat.ENV, written).items()}
    assert settings["OLLAMA_KV_CACHE_TYPE"] == "q8_0" and settings["OLLAMA_FLASH_ATTENTION"] == "1"
    assert set(settings) <= OLLAMA_SERVER_VARIABLES, set(settings) - OLLAMA_SERVER_VARIABLES
    server = _launch(install, settings, tmp_path / "server.log")
    try:
        _check_ollama_settings(server, settings)
    finally:
        server.stop()


def test_every_variable_ollama_config_manages_is_one_ollama_knows() -> None:
    assert set(MANAGED) <= OLLAMA_SERVER_VARIABLES


@pytest.mark.slow
def test_llama_arg_problems_are_what_the_server_says(
    vanilla_server: Path, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = read_server_flags(vanilla_server, paths)
    # A value the server cannot parse stops it at start-up; this process's own LLAMA_ARG_* play no part.
    monkeypatch.setenv("LLAMA_ARG_LAZY_MODE", "embd")
    assert llama_arg_problem(vanilla_server, flags, "LLAMA_ARG_CACHE_RAM", "lots") == (
        f"{vanilla_server} refuses LLAMA_ARG_CACHE_RAM=lots (not a number) and would not start")
    assert llama_arg_problem(vanilla_server, flags, "LLAMA_ARG_LAZY_MODE", "on") is None
    assert llama_arg_problem(vanilla_server, flags, "LLAMA_ARG_NO_SUCH_THING", "1") == (
        f"{vanilla_server} has no option that reads LLAMA_ARG_NO_SUCH_THING, so it would be ignored")


# llama-server settings the patched server's features want, with how each shows in a server that has it.
LLAMA_ARGS: dict[str, tuple[str, Callable[[serve.RunningServer], bool] | None]] = {
    "LLAMA_ARG_FIT_TARGET": ("512", _log_has(r">= 512 MiB of (system|device) memory")),  # Ollama documents it
    "LLAMA_ARG_CACHE_RAM": ("360", _log_has(r"prompt cache is enabled, size limit: 360 MiB")),
    "LLAMA_ARG_ENDPOINT_METRICS": ("1", lambda server: server.request("GET", "/metrics").status_code == 200),
    "LLAMA_ARG_KV_ON_DEMAND": ("1", _log_has(r"KV buffer size = .*committed on demand")),  # patched only
    "LLAMA_ARG_LAZY_MODE": ("embd", _log_has(r"token_embd\.weight .*lazy read enabled")),  # a patched-only value
    "LLAMA_ARG_THREADS": ("2", None),  # Ollama's (-t from num_thread)
    "LLAMA_ARG_KV_UNIFIED_PER_SLOT": ("2048", None),  # would cap Ollama's num_ctx
}
EXPECTED = {
    "upstream": {"LLAMA_ARG_FIT_TARGET", "LLAMA_ARG_CACHE_RAM", "LLAMA_ARG_ENDPOINT_METRICS"},
    "patched": {"LLAMA_ARG_FIT_TARGET", "LLAMA_ARG_CACHE_RAM", "LLAMA_ARG_ENDPOINT_METRICS",
                "LLAMA_ARG_KV_ON_DEMAND", "LLAMA_ARG_LAZY_MODE"},
}


def _install_with(kind: str, fake_ollama_install: FakeOllamaInstall, patched_server: Path,
                  tmp_path: Path) -> FakeOllamaInstall:
    """The shared install (Ollama's upstream server), or one running our patched server as install-server
    leaves it."""
    if kind == "upstream":
        return fake_ollama_install
    weights = fake_ollama_install.model("smollm2:135m").weights
    return make_fake_install(tmp_path / "patched-install", patched_server, [("smollm2:135m", weights)])


def _plan(install: FakeOllamaInstall, llama_args: Mapping[str, str], paths: Paths, tmp_path: Path) -> ConfigPlan:
    """recommend() for this machine, Ollama 0.33 with smollm2:135m loaded and the install's server checked."""
    check = partial(llama_arg_problem, install.server, read_server_flags(install.server, paths))
    with FakeOllama([api_model(install.model("smollm2:135m"))], version=install.version) as api:
        api.load("smollm2:135m")
        with OllamaClient(api.url) as client:
            state = collect_current(environ={}, systemd_dir=tmp_path / "no-systemd", client=client)
    inputs = replace(RecommendationInputs.from_hardware(hardware.detect()), models=state.models,
                     ollama_version=state.server_version, llama_args=dict(llama_args), llama_arg_check=check)
    return recommend(inputs, {})


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["upstream", "patched"])
def test_recommended_llama_args_are_ones_the_server_takes(
    kind: str, fake_ollama_install: FakeOllamaInstall, patched_server: Path, paths: Paths, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install = _install_with(kind, fake_ollama_install, patched_server, tmp_path)
    monkeypatch.setenv("OLLAMA_MODELS", str(install.store))
    plan = _plan(install, {name: value for name, (value, _) in LLAMA_ARGS.items()}, paths, tmp_path)
    settings = plan.values()
    recommended = {name for name in settings if name.startswith("LLAMA_ARG_")}
    assert recommended == EXPECTED[kind], {r.name: r.why for r in plan.recommendations}
    whys = {r.name: r.why for r in plan.recommendations}
    if kind == "upstream":
        assert "has no option that reads LLAMA_ARG_KV_ON_DEMAND" in whys["LLAMA_ARG_KV_ON_DEMAND"]
        assert "refuses LLAMA_ARG_LAZY_MODE=embd (invalid value)" in whys["LLAMA_ARG_LAZY_MODE"]
    # Each is read by an option of the server's --help, and Ollama knows every other one.
    env_names = read_server_flags(install.server, paths).env_names()
    assert recommended <= env_names
    assert set(settings) - recommended <= OLLAMA_SERVER_VARIABLES
    server = _launch(install, settings, tmp_path / "server.log")
    try:
        _check_ollama_settings(server, settings)
        for name in sorted(recommended):
            effect = LLAMA_ARGS[name][1]
            assert effect is not None and effect(server), f"{name}: {server.log_tail()}"
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["upstream", "patched"])
def test_the_tuners_llama_args_pass_to_ollama_only_where_the_server_takes_them(
    kind: str, fake_ollama_install: FakeOllamaInstall, patched_server: Path, patched_build: InstalledBuild,
    paths: Paths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The tuner's whole plan as LLAMA_ARG_* (for the patched build): what Ollama owns is dropped, what the server
    # does not take is dropped, and the server comes up with the rest in Ollama's environment.
    install = _install_with(kind, fake_ollama_install, patched_server, tmp_path)
    monkeypatch.setenv("OLLAMA_MODELS", str(install.store))
    tuned = _cli("tune", "smollm2:135m", "--json")
    assert tuned.exit_code == 0, tuned.output
    llama_args = json.loads(tuned.stdout)["env"]
    plan = _plan(install, llama_args, paths, tmp_path)
    settings = plan.values()
    recommended = {name for name in settings if name.startswith("LLAMA_ARG_")}
    flags = read_server_flags(install.server, paths)
    assert recommended <= flags.env_names()
    for name in recommended:
        assert llama_arg_problem(install.server, flags, name, settings[name]) is None
    server = _launch(install, settings, tmp_path / "server.log")
    try:
        _check_ollama_settings(server, settings)
    finally:
        server.stop()
