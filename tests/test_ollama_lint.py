"""The Modelfile linter: Ollama's verdicts and texts, the traps it warns about, and `ollama lint`."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from velollm_patch.cli_ollama import ollama
from velollm_patch.errors import VelollmError
from velollm_patch.ollama.parser import ERR_INVALID_COMMAND, ERR_INVALID_ROLE, LintIssue, LintResult, lint_modelfile
from velollm_patch.ollama.versions import OllamaVersion


def lint(text: str | bytes, version: str | None = None, relative_dir: Path | None = None) -> LintResult:
    return lint_modelfile(text, relative_dir=relative_dir,
                          ollama_version=OllamaVersion.parse(version) if version else None)


def messages(issues: tuple[LintIssue, ...]) -> list[str]:
    return [issue.message for issue in issues]


def warning_containing(result: LintResult, fragment: str) -> str:
    found = [w for w in messages(result.warnings) if fragment in w]
    assert found, f"no warning with {fragment!r} in {messages(result.warnings)}"
    return found[0]


def test_clean_file_has_no_findings(tmp_path: Path) -> None:
    result = lint('FROM llama3.1:8b\nPARAMETER num_ctx 8192\nPARAMETER stop "<|eot_id|>"\n'
                  'SYSTEM """You are terse."""\n', relative_dir=tmp_path)
    assert result.ok and not result.warnings
    assert result.request is not None and result.request.parameters["num_ctx"] == 8192


@pytest.mark.parametrize(("text", "error"), [
    ("FROM foo\nPARAMETER NUM_CTX 8\n", "unknown parameter 'NUM_CTX'"),
    ("FROM foo\nPARAMETER num_ctx 4096.0\n", "invalid int value [4096.0]"),
    ("FROM foo\nPARAMETER num_ctx 4_096\n", "invalid int value [4_096]"),
    ("FROM foo\nPARAMETER num_ctx 8 # eight\n", "invalid int value [8 # eight]"),
    ("FROM foo\nPARAMETER temperature warm\n", "invalid float value [warm]"),
    ("FROM foo\nPARAMETER use_mmap yes\n", "invalid bool value [yes]"),
    ("FROM foo\nPARAMETER  num_ctx 8\n", "unknown parameter ''"),
    ("FROM foo\nPARAMETER tfs_z 1.0\n", "unknown parameter 'tfs_z'"),
    ("FROM foo\nPARAMETER numa true\n", "unknown parameter 'numa'"),
    ("FROM foo\nPARAMETER kv_cache_type q8_0\n", "unknown parameter 'kv_cache_type'"),
    ("FROM foo\nREQUIRES latest\n", "requires must be a valid semver (e.g. 0.14.0)"),
    ("FROM foo\nREQUIRES 0.14.00\n", "requires must be a valid semver (e.g. 0.14.0)"),
    ("FROM foo\nDRAFT ./nope.gguf\n", "stat {dir}/nope.gguf: no such file or directory"),
    ("FROM foo\nADAPTER ./nope\n", "stat {dir}/nope: no such file or directory"),
])
def test_create_step_errors_use_ollamas_text(text: str, error: str, tmp_path: Path) -> None:
    result = lint(text, relative_dir=tmp_path)
    assert not result.ok
    assert messages(result.errors)[0] == error.format(dir=tmp_path)
    assert result.errors[0].line == 2


@pytest.mark.parametrize("text", [
    "FROM foo\nREQUIRES 0.14.0\n", "FROM foo\nREQUIRES v0.14\n", "FROM foo\nREQUIRES 1\n",
    "FROM foo\nPARAMETER temperature 0x1p-1\n", "FROM foo\nPARAMETER temperature 1_0.5\n",
    "FROM foo\nPARAMETER use_mmap F\n", "FROM foo\nPARAMETER seed -1\n",
    "from foo\nparameter num_ctx 8\nSyStEm hi\n",
])
def test_what_ollama_accepts(text: str) -> None:
    assert lint(text).ok


def test_every_error_is_listed_with_ollamas_first(tmp_path: Path) -> None:
    result = lint("FROM foo\nPARAMETER num_ctx x\nPARAMETER top_k y\n", relative_dir=tmp_path)
    assert messages(result.errors) == ["invalid int value [x]", "invalid int value [y]"]


def test_deprecated_parameter_is_accepted_with_ollamas_warning() -> None:
    result = lint("FROM foo\nPARAMETER mirostat 2\nPARAMETER penalize_newline true\n")
    assert result.ok
    assert "warning: parameter mirostat is deprecated" in messages(result.warnings)
    assert result.request is not None and result.request.deprecated == ("mirostat", "penalize_newline")
    assert "mirostat" not in result.request.parameters


def test_parse_error_lines_double_on_crlf() -> None:
    result = lint("FROM foo\r\nBAD x\r\n")
    assert messages(result.errors) == [f"(line 3): {ERR_INVALID_COMMAND}"]
    assert result.errors[0].line == 2  # the physical line
    warning_containing(result, "CR line endings")


def test_utf16_file_is_read_like_ollama() -> None:
    assert lint(b"\xff\xfe" + "FROM foo\nSYSTEM héllo\n".encode("utf-16-le")).ok


@pytest.mark.parametrize(("text", "hint"), [
    ("FROM foo\nSYSTEM\nhello\n", "must be followed by a space"),
    ("FROM foo\nMESSAGE System hi\n", "roles are case-sensitive: write system"),
    ("FROM foo\nMESSAGE  user hi\n", "exactly one space after MESSAGE"),
    ("FROM foo\nPARAMETER num-ctx 8\n", "letters, digits and '_'"),
    ("FROM foo\nPARAMETER num_ctx\n", "num_ctx has no value"),
    ('FROM foo\nSYSTEM "never closed\nmore\n', "never closed"),
])
def test_parse_errors_come_with_a_hint(text: str, hint: str) -> None:
    result = lint(text)
    assert not result.ok
    warning_containing(result, hint)


def test_role_error_text() -> None:
    assert messages(lint("FROM foo\nMESSAGE System hi\n").errors) == [f"(line 2): {ERR_INVALID_ROLE}"]


def test_hash_after_a_value_is_part_of_it() -> None:
    result = lint("FROM foo\nSYSTEM You are Mario # persona\n")
    assert result.ok and result.request is not None
    assert result.request.system == "You are Mario # persona"
    warning_containing(result, "'#' starts a comment only at the start of a line")


def test_text_after_a_closing_quote_swallows_following_lines() -> None:
    result = lint('FROM foo\nPARAMETER stop "a" x\nPARAMETER num_ctx 8\nSYSTEM "hi"\n')
    assert result.ok and result.request is not None  # Ollama accepts it ...
    assert result.request.parameters["stop"] == ['a" x\nPARAMETER num_ctx 8\nSYSTEM "hi']  # ... like this
    assert "num_ctx" not in result.request.parameters
    warning_containing(result, "swallowed the following lines")


def test_interior_triple_quote_ends_the_value_early() -> None:
    result = lint('FROM foo\nTEMPLATE """{{ .Prompt }}\nsay """\nmore"""\n')
    assert messages(result.errors) == [f"(line 4): {ERR_INVALID_COMMAND}"]
    warning_containing(result, 'ended on line 3 because that line ends with """')


def test_invisible_characters_are_reported() -> None:
    result = lint("FROM foo\nSYSTEM a\u00a0b\u200dc\n")
    assert result.request is not None and result.request.system == "abc"
    warning_containing(result, "U+00A0")
    warning_containing(result, "U+200D")


def test_double_space_after_parameter() -> None:
    warning_containing(lint("FROM foo\nPARAMETER  num_ctx 8\n"), "two spaces after PARAMETER")


def test_uppercase_parameter_name() -> None:
    warning_containing(lint("FROM foo\nPARAMETER NUM_CTX 8\n"), "write num_ctx, not NUM_CTX")


@pytest.mark.parametrize(("value", "hint"), [
    ("4096.0", "write 4096 rather than 4096.0"), ("4_096", "write 4096 rather than 4_096"),
    ("4e3", "write 4000 rather than 4e3"), ("8.5", "use a whole number rather than 8.5"),
])
def test_integer_written_another_way(value: str, hint: str) -> None:
    warning_containing(lint(f"FROM foo\nPARAMETER num_ctx {value}\n"), hint)


def test_single_quotes_are_not_quotes() -> None:
    result = lint("FROM foo\nSYSTEM 'hello'\n")
    assert result.request is not None and result.request.system == "'hello'"
    warning_containing(result, "single quotes are not quotes")


def test_removed_parameter_explains_itself() -> None:
    warning_containing(lint("FROM foo\nPARAMETER tfs_z 1.0\n"), "removed in Ollama 0.5.2")


def test_missing_from_path_becomes_a_model_name(tmp_path: Path) -> None:
    result = lint("FROM ./models/llama.gguf\n", relative_dir=tmp_path)
    assert result.ok and result.request is not None
    assert result.request.from_model == "./models/llama.gguf"
    warning_containing(result, "treats it as a model name")


def test_existing_from_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    result = lint("FROM ./m.gguf\n", relative_dir=tmp_path)
    assert result.ok and not result.warnings
    assert result.request is not None and result.request.files == (str(tmp_path / "m.gguf"),)


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    result = lint("FROM ./weights\n", relative_dir=tmp_path)
    assert messages(result.errors) == ["no Modelfile or safetensors files found"]


@pytest.mark.parametrize(("text", "version", "error"), [
    ("FROM foo\nDRAFT ./d.gguf\n", "0.23.0", "DRAFT needs Ollama 0.23.1 or newer (target is 0.23.0)"),
    ("FROM foo\nREQUIRES 0.14.0\n", "0.13.5", "REQUIRES needs Ollama 0.14.0 or newer (target is 0.13.5)"),
    ("FROM foo\nRENDERER x\n", "0.11.0", "RENDERER needs Ollama 0.12.0 or newer (target is 0.11.0)"),
    ("FROM foo\nPARAMETER draft_num_predict 4\n", "0.29.9", "unknown parameter 'draft_num_predict'"),
    ("FROM foo\nPARAMETER tfs_z 1.0\n", "0.5.2", "unknown parameter 'tfs_z'"),
])
def test_target_version_decides_what_exists(text: str, version: str, error: str, tmp_path: Path) -> None:
    (tmp_path / "d.gguf").write_bytes(b"GGUF")
    assert messages(lint(text, version, tmp_path).errors) == [error]


@pytest.mark.parametrize(("text", "version"), [
    ("FROM foo\nPARAMETER tfs_z 1.0\n", "0.5.1"),
    ("FROM foo\nPARAMETER draft_num_predict 4\n", "0.30.0"),
])
def test_older_and_newer_names_valid_in_their_releases(text: str, version: str) -> None:
    assert lint(text, version).ok


def test_requires_newer_than_target() -> None:
    warning_containing(lint("FROM foo\nREQUIRES 0.40.0\n", "0.33.0"), "newer than the target")


def test_cli_lint_ok(tmp_path: Path) -> None:
    path = tmp_path / "Modelfile"
    path.write_text("FROM foo\nPARAMETER num_ctx 8192\n")
    result = CliRunner().invoke(ollama, ["lint", str(path)])
    assert result.exit_code == 0, result.output
    assert "accepts it" in result.output


def test_cli_lint_reports_and_fails(tmp_path: Path) -> None:
    path = tmp_path / "Modelfile"
    path.write_text("FROM foo\nPARAMETER num_ctx 8 # eight\n")
    result = CliRunner().invoke(ollama, ["lint", str(path)])
    assert result.exit_code == 1
    assert f"{path}:2: error: invalid int value [8 # eight]" in result.output
    assert f"{path}:2: warning: '#' starts a comment" in result.output


def test_cli_lint_unreadable_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(ollama, ["lint", str(tmp_path / "missing")])
    assert isinstance(result.exception, VelollmError)
    assert "cannot read" in str(result.exception) and "\n" not in str(result.exception)


def test_cli_lint_resolves_paths_next_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "draft.gguf").write_bytes(b"GGUF")
    path = tmp_path / "Modelfile"
    path.write_text("FROM foo\nDRAFT ./draft.gguf\n")
    result = CliRunner().invoke(ollama, ["lint", str(path)])
    assert result.exit_code == 0, result.output
