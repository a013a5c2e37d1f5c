"""Generated Modelfiles: content, quoting, version rules, carry-over from /api/show, the CLI."""

from __future__ import annotations

import random
import re
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.fake_ollama import FakeModel, FakeOllama, llama31_8b
from tests.helpers import recorded_hardware, write_gguf
from velollm_patch import hardware, tune
from velollm_patch.builds import InstalledBuild
from velollm_patch.cli import main
from velollm_patch.cli_ollama import ollama
from velollm_patch.errors import VelollmError
from velollm_patch.model import inspect_model
from velollm_patch.ollama.api import OllamaClient, ShowResponse
from velollm_patch.ollama.config import fit_context
from velollm_patch.ollama.modelfile import (
    CLASSIC_DRAFT_PATCH,
    ModelfileRequest,
    ModelfileSpec,
    compose_modelfile,
    draft_problem,
    loadable_draft,
    parse_show_parameters,
    quote_value,
    render_modelfile,
    spec_from_base,
)
from velollm_patch.ollama.parser import CreateRequest, lint_modelfile, parse_modelfile
from velollm_patch.ollama.versions import OllamaVersion
from velollm_patch.paths import Paths
from velollm_patch.server_flags import ServerFlags

REPO = Path(__file__).resolve().parents[1]


def created(text: str, version: str | None = None) -> CreateRequest:
    result = lint_modelfile(text, ollama_version=OllamaVersion.parse(version) if version else None)
    assert result.ok, result.errors
    assert result.request is not None
    return result.request


def test_full_spec_renders_and_reads_back() -> None:
    spec = ModelfileSpec(
        "llama3.1:8b",
        parameters={"num_ctx": 32768, "num_batch": 1024, "num_gpu": -1, "num_thread": 8,
                    "temperature": 0.6, "use_mmap": False},
        stop=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        template="{{ if .System }}{{ .System }}{{ end }}\n{{ .Prompt }}",
        system="You are terse.\nAnswer in one line.",
        comments=("Tuned for a 12 GiB GPU",),
        reasons={"num_ctx": "fits next to the weights"},
    )
    text = render_modelfile(spec)
    request = created(text)
    assert request.from_model == "llama3.1:8b"
    assert request.template == spec.template and request.system == spec.system
    assert request.parameters["stop"] == list(spec.stop)
    assert request.parameters["num_ctx"] == 32768 and request.parameters["use_mmap"] is False
    assert not lint_modelfile(text).warnings
    assert "# fits next to the weights\nPARAMETER num_ctx 32768\n" in text
    assert text.startswith("# Tuned for a 12 GiB GPU\n")


def test_comments_only_at_line_start_and_never_after_a_value() -> None:
    text = render_modelfile(ModelfileSpec(
        "m", parameters={"num_ctx": 4096}, stop=("### User:",), comments=("two\nlines",),
        reasons={"num_ctx": "why # with a hash", "stop": "multi\r\nline reason"}))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        assert not re.search(r"\s#\s", line) or line.startswith("PARAMETER stop"), line
    assert "# two\n# lines\n" in text and "# multi\n# line reason\n" in text


def test_every_stop_is_emitted_in_order() -> None:
    stops = ("</s>", "<|im_end|>", "### User: ", '"quoted"', "line\nbreak", "")
    request = created(render_modelfile(ModelfileSpec("m", stop=stops)))
    assert request.parameters["stop"] == list(stops)


def test_stop_given_as_a_parameter_list_joins_the_stop_field() -> None:
    spec = ModelfileSpec("m", parameters={"stop": ["b", "a"]}, stop=("a",))
    assert created(render_modelfile(spec)).parameters["stop"] == ["a", "b"]


def test_draft_brings_requires(tmp_path: Path) -> None:
    draft = tmp_path / "draft.gguf"
    draft.write_bytes(b"GGUF")
    text = render_modelfile(ModelfileSpec("qwen3:8b", draft=str(draft), parameters={"draft_num_predict": 6}))
    request = created(text)
    assert request.draft_files == (str(draft),)
    assert request.requires == "0.30.0"  # draft_num_predict needs more than DRAFT's 0.23.1
    assert re.search(r"# PARAMETER draft_num_predict needs Ollama 0\.30\.0 or newer.*\nREQUIRES 0\.30\.0\n", text)


def test_draft_alone_requires_0_23_1(tmp_path: Path) -> None:
    (tmp_path / "d.gguf").write_bytes(b"GGUF")
    text = render_modelfile(ModelfileSpec("m", draft=str(tmp_path / "d.gguf"), ollama_version="0.25.0"))
    assert created(text, "0.25.0").requires == "0.23.1"


def test_no_requires_without_a_feature() -> None:
    assert "REQUIRES" not in render_modelfile(ModelfileSpec("m", parameters={"num_ctx": 8192}))


def test_explicit_requires_kept_when_higher() -> None:
    assert created(render_modelfile(ModelfileSpec("m", requires="v0.31.2"))).requires == "0.31.2"


@pytest.mark.parametrize(("spec", "error"), [
    (ModelfileSpec("m", draft="/x", ollama_version="0.23.0"), "DRAFT needs Ollama 0.23.1 or newer"),
    (ModelfileSpec("m", parameters={"draft_num_predict": 4}, ollama_version="0.29.0"),
     "has no parameter 'draft_num_predict'"),
    (ModelfileSpec("m", requires="0.14.0", ollama_version="0.13.0"), "needs Ollama 0.14.0 or newer"),
    (ModelfileSpec("m", requires="latest"), "requires must be a valid semver"),
    (ModelfileSpec("m", parameters={"num_ctx": 4096.0}), "num_ctx takes int, not 4096.0"),
    (ModelfileSpec("m", parameters={"num_ctx": True}), "takes int, not a boolean"),
    (ModelfileSpec("m", parameters={"temperature": "hot"}), "invalid float value [hot]"),
    (ModelfileSpec("m", parameters={"temperature": float("inf")}), "not a finite float32"),
    (ModelfileSpec("m", parameters={"temperature": 1e39}), "not a finite float32"),
    (ModelfileSpec("m", parameters={"NUM_CTX": 8}), "has no parameter 'NUM_CTX'"),
    (ModelfileSpec("m", parameters={"mirostat": 1}), "deprecated"),
    (ModelfileSpec("m", parameters={"tfs_z": 1.0}), "removed in Ollama 0.5.2"),
    (ModelfileSpec("m", parameters={"num ctx": 1}), "not a parameter name"),
    (ModelfileSpec(" "), "needs a FROM model"),
    (ModelfileSpec("m", system="a\u200db"), "contains U+200D"),
    (ModelfileSpec("m", template='x"""\ny"\nz'), "cannot be written to a Modelfile"),
])
def test_specs_ollama_would_not_take_are_refused(spec: ModelfileSpec, error: str) -> None:
    with pytest.raises(VelollmError, match=re.escape(error)):
        render_modelfile(spec)


def test_old_target_gets_only_old_names() -> None:
    text = render_modelfile(ModelfileSpec("m", parameters={"tfs_z": 0.9}, ollama_version="0.5.1"))
    assert created(text, "0.5.1").parameters["tfs_z"] == pytest.approx(0.9)


def test_era_c_comments_say_what_llama_server_gets() -> None:
    assert "-b N -ub N" in render_modelfile(ModelfileSpec("m", parameters={"num_batch": 512}))
    assert "-ub" not in render_modelfile(ModelfileSpec("m", parameters={"num_batch": 512},
                                                        ollama_version="0.20.0"))


AWKWARD = [
    "", " ", "\t", "\n", "\r\n", "\r", '"', '""', '"""', '""""', "'", "''", "#", "# not a comment",
    "a # b", " lead", "trail ", '"quoted"', '"unbalanced', 'ends"', 'x"""y', '"""x', 'x"""',
    "line\nline", "line\n", "\nline", 'a"\nb', 'a"""\nb', 'a\n"""', '"\n', '""\n', '"""\n', "\n\n\n",
    "tab\tinside", "trailing tab\t", "  \n  ", "FROM other\nPARAMETER num_ctx 1", "#\n#", "é✓ 你好 👋",
    "{{ .System }}\n{{ .Prompt }}", '"a" x', "x\r\ny\rz", 'a"""  \nb',
]


def quoting_options(value: str) -> list[str]:
    """Every quoted form a Modelfile could hold: if none reads back as ``value``, nothing can."""
    return [value, f'"{value}"', f'"""{value}"""']


def reads_back(line_value: str, value: str) -> bool:
    try:
        modelfile = parse_modelfile(f"FROM m\nSYSTEM {line_value}\n")
    except VelollmError:
        return False
    return [c.args for c in modelfile.commands if c.name == "system"] == [value]


def check_round_trip(value: str) -> None:
    try:
        text = render_modelfile(ModelfileSpec("m", system=value, template=value, stop=(value,)))
    except VelollmError:
        assert not any(reads_back(q, value) for q in quoting_options(value)), (
            f"refused {value!r}, but it can be written")
        return
    request = created(text)
    assert (request.system, request.template, request.parameters["stop"]) == (value, value, [value])
    assert quote_value(value, what="v", always=True) in text


@pytest.mark.parametrize("value", AWKWARD)
def test_awkward_values_read_back_exactly(value: str) -> None:
    check_round_trip(value)


def test_random_values_read_back_exactly() -> None:
    alphabet = ['"', '"', '"', "'", " ", "\t", "\n", "\r", "#", "a", "b", "é", "{", "}", "\\"]
    rng = random.Random(7)
    for _ in range(3000):
        check_round_trip("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))))


def test_plain_values_stay_unquoted() -> None:
    assert quote_value("llama3.1:8b", what="FROM") == "llama3.1:8b"
    assert quote_value("a b", what="FROM") == "a b"
    assert quote_value(" a", what="FROM") == '""" a"""'


SHOW = ShowResponse(
    template="{{ .Prompt }}",
    system="Be brief.",
    parameters=('stop                           "<|im_start|>"\n'
                'stop                           "line\\nbreak \\"q\\""\n'
                "temperature                    0.7\n"
                "num_ctx                        4096\n"
                "seed                           1e+06\n"
                "mirostat                       2\n"
                "tfs_z                          1"),
)


def test_parse_show_parameters_unquotes_go_strings() -> None:
    pairs = parse_show_parameters(SHOW.parameters)
    assert pairs[:2] == [("stop", "<|im_start|>"), ("stop", 'line\nbreak "q"')]


def test_spec_from_base_carries_template_system_stops_and_parameters() -> None:
    spec = spec_from_base(SHOW, "qwen2.5:7b")
    assert spec.template == "{{ .Prompt }}" and spec.system == "Be brief."
    assert spec.stop == ("<|im_start|>", 'line\nbreak "q"')
    assert dict(spec.parameters) == {"temperature": "0.7", "num_ctx": 4096, "seed": 1000000}
    assert "Left out (unknown to Ollama 0.33.0): mirostat 2; tfs_z 1" in spec.comments[1]
    tuned = spec.with_parameters({"num_ctx": 16384}, {"num_ctx": "tuned"})
    request = created(render_modelfile(tuned))
    assert request.parameters["num_ctx"] == 16384
    assert request.parameters["stop"] == ["<|im_start|>", 'line\nbreak "q"']
    assert request.template == "{{ .Prompt }}" and request.system == "Be brief."


def test_spec_from_base_keeps_the_base_requires() -> None:
    spec = spec_from_base(replace(SHOW, requires="0.20.0"), "m")
    assert created(render_modelfile(spec)).requires == "0.20.0"
    with pytest.raises(VelollmError, match="needs Ollama 0.20.0 or newer; the target is 0.19.0"):
        render_modelfile(spec_from_base(replace(SHOW, requires="0.20.0"), "m", ollama_version="0.19.0"))


def test_spec_from_base_keeps_old_names_for_old_targets() -> None:
    assert spec_from_base(SHOW, "m", ollama_version="0.5.0").parameters["tfs_z"] == "1"


def test_cli_modelfile_to_stdout() -> None:
    result = CliRunner().invoke(ollama, ["modelfile", "llama3.1:8b", "--num-ctx", "8192", "--num-gpu", "-1"])
    assert result.exit_code == 0, result.output
    request = created(result.output)
    assert request.parameters == {"num_ctx": 8192, "num_gpu": -1}


def test_cli_modelfile_from_server(tmp_path: Path) -> None:
    out = tmp_path / "Modelfile"
    with FakeOllama([llama31_8b()], version="0.31.0") as server:
        result = CliRunner().invoke(ollama, ["modelfile", "llama3.1:8b", "--from-server", server.url,
                                             "--num-ctx", "16384", "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    request = created(text, "0.31.0")
    assert request.parameters["stop"] == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert request.parameters["num_ctx"] == 16384
    assert request.template == llama31_8b().template


def test_cli_modelfile_from_server_uses_ollama_host(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOllama([FakeModel("tiny")]) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        result = CliRunner().invoke(ollama, ["modelfile", "tiny", "--from-server"])
    assert result.exit_code == 0, result.output
    assert 'TEMPLATE """{{ .Prompt }}"""' in result.output


def test_cli_modelfile_unknown_model(tmp_path: Path) -> None:
    out = tmp_path / "Modelfile"
    with FakeOllama([]) as server:
        result = CliRunner().invoke(ollama, ["modelfile", "nope:1b", "--from-server", server.url,
                                             "-o", str(out)])
    assert isinstance(result.exception, VelollmError)
    assert "does not have model 'nope:1b'" in str(result.exception)
    assert not out.exists()


def test_cli_modelfile_draft_needs_new_enough_ollama(tmp_path: Path) -> None:
    draft = tmp_path / "d.gguf"
    draft.write_bytes(b"GGUF")
    out = tmp_path / "Modelfile"
    result = CliRunner().invoke(ollama, ["modelfile", "m", "--draft", str(draft), "--ollama-version",
                                         "0.20.0", "-o", str(out)])
    assert isinstance(result.exception, VelollmError)
    assert not out.exists()


# --- DRAFT under Ollama 0.30+, which launches every DRAFT as an MTP draft --------------------------


@pytest.fixture
def classic_draft(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "small-draft.gguf")


def test_a_classic_draft_would_not_load_under_ollama_0_30(classic_draft: Path, tmp_path: Path) -> None:
    problem = draft_problem(classic_draft, OllamaVersion.parse("0.30.0"))
    assert problem is not None and "--spec-type draft-mtp" in problem and "no MTP layers" in problem
    # before 0.30 Ollama's own runner ran the draft; an MTP or dflash model loads as an MTP draft
    assert draft_problem(classic_draft, OllamaVersion.parse("0.25.0")) is None
    mtp = write_gguf(tmp_path / "mtp.gguf", extra={"llama.nextn_predict_layers": 1})
    assert draft_problem(mtp, OllamaVersion.parse("0.33.0")) is None
    dflash = write_gguf(tmp_path / "dflash.gguf", arch="dflash")
    assert draft_problem(dflash, OllamaVersion.parse("0.33.0")) is None


def test_the_tuners_classic_draft_is_left_out_with_the_reason(classic_draft: Path) -> None:
    tuned = {"num_ctx": 4096, "draft_num_predict": 6}
    kept, draft, note = loadable_draft(tuned, str(classic_draft), OllamaVersion.parse("0.33.0"))
    assert draft is None and kept == {"num_ctx": 4096}
    assert note is not None and note.startswith("no DRAFT: Ollama 0.33.0 runs a DRAFT as an MTP draft")
    kept, draft, note = loadable_draft(tuned, str(classic_draft), OllamaVersion.parse("0.25.0"))
    assert (kept, draft, note) == (tuned, str(classic_draft), None)


def test_cli_refuses_a_classic_draft_for_ollama_0_30(classic_draft: Path, tmp_path: Path) -> None:
    out = tmp_path / "Modelfile"
    result = CliRunner().invoke(main, ["ollama", "modelfile", "m", "--draft", str(classic_draft), "-o", str(out)])
    assert result.exit_code == 1 and not out.exists()
    (line,) = result.output.strip().splitlines()
    assert "no MTP layers" in line and "--ollama-version" in line


def ollama_running(root: Path, patch_level: str) -> Path:
    """An Ollama prefix whose bundled llama-server answers --version like one built with ``patch_level``."""
    server = root / "lib" / "ollama" / "llama-server"
    server.parent.mkdir(parents=True)
    lines = ["version: 0.5.0-dev (build 0, commit 0c1e570+velollm.22)"]
    lines += [f"velollm patch level: {patch_level}"] if patch_level else []
    server.write_text("#!/bin/sh\n" + "".join(f"echo '{line}' >&2\n" for line in lines))
    server.chmod(0o755)
    (server.parent / "libggml-base.so").write_bytes(b"")  # Ollama's shared ggml beside it
    return root


def test_a_classic_draft_is_kept_for_an_ollama_running_our_server(
    classic_draft: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    tuned = {"num_ctx": 4096, "draft_num_predict": 6}
    kept, draft, note = loadable_draft(tuned, str(classic_draft), OllamaVersion.parse("0.33.0"), classic_drafts=True)
    assert (kept, draft, note) == (tuned, str(classic_draft), None)

    ours = ollama_running(tmp_path / "ours", f"velollm-22:spec-adaptive,{CLASSIC_DRAFT_PATCH}")
    stock = ollama_running(tmp_path / "stock", "")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no ollama on PATH: only --ollama-prefix names one
    out = tmp_path / "Modelfile"
    args = ["ollama", "modelfile", "m", "--draft", str(classic_draft), "--ollama-version", "0.33.0", "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--ollama-prefix", str(ours)])
    assert result.exit_code == 0, result.output
    assert f"DRAFT {classic_draft}" in out.read_text()
    out.unlink()
    for refused in ([*args, "--ollama-prefix", str(stock)], args):
        result = CliRunner().invoke(main, refused)
        assert result.exit_code == 1 and not out.exists()
        (line,) = result.output.strip().splitlines()
        assert "no MTP layers" in line and "install-server" in line
    result = CliRunner().invoke(main, [*args, "--ollama-prefix", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "pass the Ollama install prefix" in result.output


def test_a_draft_of_another_vocabulary_is_refused(tmp_path: Path) -> None:
    target = write_gguf(tmp_path / "target.gguf")
    other = write_gguf(tmp_path / "other.gguf", tokenizer="gpt2")
    out = tmp_path / "Modelfile"
    result = CliRunner().invoke(main, ["ollama", "modelfile", str(target), "--draft", str(other),
                                       "--ollama-version", "0.25.0", "-o", str(out)])
    assert result.exit_code == 1 and not out.exists()
    (line,) = result.output.strip().splitlines()
    assert "DRAFT other.gguf cannot draft for" in line and "vocab types differ" in line
    same = write_gguf(tmp_path / "same.gguf")
    result = CliRunner().invoke(main, ["ollama", "modelfile", str(target), "--draft", str(same),
                                       "--ollama-version", "0.25.0", "-o", str(out)])
    assert result.exit_code == 0, result.output


# --- composing: the base on a server, the tuner's plan, the request ----------------------------------


@pytest.fixture
def tiny_plan(tmp_path: Path) -> tune.Plan:
    """A plan made without a build: a tiny model on a recorded 2-core machine, a server with no known flags."""
    model = inspect_model(write_gguf(tmp_path / "tiny.gguf"))
    build = tune.BuildFacts("no-flags", "cpu", (), None, ServerFlags("no flags", ()), None)
    return tune.plan(model, recorded_hardware("cpu-2core"), build, tune.TuneRequest(workload="code"))


def test_compose_puts_the_plan_over_the_base_and_the_request_over_both(tiny_plan: tune.Plan) -> None:
    request = ModelfileRequest("llama3.1:8b", parameters={"num_ctx": 1024}, comments=("mine",))
    with FakeOllama([llama31_8b()], version="0.31.0") as server, OllamaClient(server.url) as client:
        spec = compose_modelfile(request, server=client, tuned=lambda: tiny_plan)
    assert spec.from_model == "llama3.1:8b" and spec.ollama_version == "0.31.0"
    assert spec.template == llama31_8b().template and "<|eot_id|>" in spec.stop
    assert spec.parameters["num_ctx"] == 1024 and spec.parameters["num_thread"] == tiny_plan.settings.threads
    assert spec.reasons["num_thread"] == tiny_plan.reason("threads")
    assert spec.comments[:2] == ("mine", "tuned by velollm-patch for this machine: balanced profile, code workload")
    assert spec.comments[2].startswith("Derived from llama3.1:8b")
    assert created(render_modelfile(spec), "0.31.0").parameters["num_ctx"] == 1024


def test_compose_asks_the_server_before_the_tuner(tiny_plan: tune.Plan) -> None:
    asked: list[str] = []

    def tuned() -> tune.Plan:
        asked.append("plan")
        return tiny_plan

    with (FakeOllama([]) as server, OllamaClient(server.url) as client,
          pytest.raises(VelollmError, match="does not have model 'nope:1b'")):
        compose_modelfile(ModelfileRequest("nope:1b"), server=client, tuned=tuned)
    assert asked == []


def test_compose_derives_a_demo_model_from_the_planned_file(tiny_plan: tune.Plan) -> None:
    spec = compose_modelfile(ModelfileRequest("smollm2-135m"), tuned=lambda: tiny_plan)
    assert spec.from_model == str(tiny_plan.model.path)
    assert compose_modelfile(ModelfileRequest("smollm2-135m")).from_model == "smollm2-135m"


# --- the Modelfiles shipped in modelfiles/ --------------------------------------------------------

# (file, weights bytes, layers, KV heads, head dim, trained context, GPU GiB), as README.md derives.
SHIPPED = [
    ("llama3.1-8b-8gb.Modelfile", 4.9e9, 32, 8, 128, 131072, 8),
    ("llama3.1-8b-12gb.Modelfile", 4.9e9, 32, 8, 128, 131072, 12),
    ("llama3.1-8b-24gb.Modelfile", 4.9e9, 32, 8, 128, 131072, 24),
    ("qwen2.5-7b-8gb.Modelfile", 4.7e9, 28, 4, 128, 32768, 8),
]


def readme_commands() -> dict[str, list[str]]:
    text = (REPO / "modelfiles" / "README.md").read_text()
    commands: dict[str, list[str]] = {}
    for block in re.findall(r"velollm-patch ollama (modelfile .*?)(?<!\\)\n", text, re.S):
        args = shlex.split(block.replace("\\\n", " "))
        commands[Path(args[args.index("-o") + 1]).name] = args
    return commands


@pytest.mark.parametrize(("name", "weights", "layers", "kv_heads", "head_dim", "train", "gib"), SHIPPED)
def test_shipped_modelfile_follows_its_derivation(
    name: str, weights: float, layers: int, kv_heads: int, head_dim: int, train: int, gib: int,
    tmp_path: Path,
) -> None:
    path = REPO / "modelfiles" / name
    text = path.read_text()
    result = lint_modelfile(text)
    assert result.ok and not result.warnings and result.request is not None
    per_token = layers * kv_heads * 2 * head_dim * 2  # K and V, f16
    budget = gib * 1024**3 - 1024**3
    assert result.request.parameters["num_ctx"] == fit_context(int(weights), per_token, budget, 1, train)
    args = readme_commands()[name]
    args[args.index("-o") + 1] = str(tmp_path / name)
    run = CliRunner().invoke(ollama, args)
    assert run.exit_code == 0, run.output
    assert (tmp_path / name).read_text() == text, "modelfiles/README.md no longer reproduces the file"


def test_cli_tuned_modelfile_needs_a_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VELOLLM_HOME", str(tmp_path))
    result = CliRunner().invoke(main, ["ollama", "modelfile", "llama3.1:8b", "--tuned"])
    assert result.exit_code == 1 and "run `velollm-patch build` first" in result.output


@pytest.mark.slow
def test_cli_tuned_modelfile_carries_the_plan(patched_build: InstalledBuild, smollm2_gguf: Path, paths: Paths) -> None:
    """`--tuned` (implied by --workload) writes the tuner's choices as PARAMETERs; the file passes the linter;
    options override it."""
    hw = hardware.detect(build_dir=paths.cache)
    # a Modelfile is planned for the machine, not for the load of the moment (machine dedicated)
    wanted = tune.TuneRequest(workload="code", machine="dedicated")
    plan = tune.plan_for(str(smollm2_gguf), hw, patched_build, paths, wanted)
    result = CliRunner().invoke(main, ["ollama", "modelfile", str(smollm2_gguf), "--workload", "code"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"PARAMETER num_ctx {plan.settings.ctx_per_slot}" in re.sub(r" +", " ", text)
    assert f"PARAMETER num_thread {plan.settings.threads}" in re.sub(r" +", " ", text)
    assert f"PARAMETER num_batch {plan.settings.ubatch}" in re.sub(r" +", " ", text)
    assert "num_gpu" not in text  # a CPU plan leaves the layers to Ollama
    assert "code workload" in text
    assert lint_modelfile(text).errors == ()
    overridden = CliRunner().invoke(main, ["ollama", "modelfile", str(smollm2_gguf), "--tuned", "--num-ctx", "1024"])
    assert "PARAMETER num_ctx 1024" in re.sub(r" +", " ", overridden.stdout)
    # A demo-model name means nothing to Ollama: FROM names the file the plan was made for.
    by_name = CliRunner().invoke(main, ["ollama", "modelfile", "smollm2-135m", "--tuned"])
    assert f"FROM {smollm2_gguf}" in by_name.stdout
