"""Ollama's own parser and parameter tests, transcribed case for case.

Sources (ollama/ollama v0.33.0-rc2): ``parser/parser_test.go``
(TestParseFile*, TestCreateRequest*) and ``api/types_test.go`` (TestUseMmapFormatParams,
TestMainGPUFormatParams, TestKeepAliveParsingFromJSON), plus the Go ``strconv``/``semver``
cases the create step's value checks depend on.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest

from velollm_patch.errors import VelollmError
from velollm_patch.ollama.api import keep_alive_seconds
from velollm_patch.ollama.gosyntax import parse_float32, parse_int, semver_is_valid
from velollm_patch.ollama.parser import (
    ERR_INVALID_COMMAND,
    ERR_INVALID_ROLE,
    ERR_MISSING_FROM,
    Command,
    ModelfileError,
    ParameterError,
    create_request,
    format_param,
    parse_modelfile,
)

C = Command
LLAMA3_TEMPLATE = (
    "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
)


def commands(text: str | bytes) -> list[Command]:
    return list(parse_modelfile(text).commands)


def parse_error(text: str | bytes) -> str:
    with pytest.raises(ModelfileError) as info:
        parse_modelfile(text)
    return str(info.value)


def test_parse_file_file() -> None:
    text = f"""
FROM model1
ADAPTER adapter1
LICENSE MIT
PARAMETER param1 value1
PARAMETER param2 value2
TEMPLATE \"\"\"{LLAMA3_TEMPLATE}\"\"\"    
"""  # noqa: W291 - the trailing spaces after the closing quotes are part of the case
    assert commands(text) == [
        C("model", "model1"), C("adapter", "adapter1"), C("license", "MIT"),
        C("param1", "value1"), C("param2", "value2"), C("template", LLAMA3_TEMPLATE),
    ]


def test_parse_file_draft() -> None:
    modelfile = parse_modelfile("\nFROM base\nDRAFT ./assistant\n")
    assert list(modelfile.commands) == [C("model", "base"), C("draft", "./assistant")]
    assert "DRAFT ./assistant" in str(modelfile)


def test_create_request_draft_files(tmp_path: Path) -> None:
    draft = tmp_path / "draft.gguf"
    draft.write_bytes(b"draft")
    request = create_request(parse_modelfile("\nFROM base\nDRAFT ./draft.gguf\n"), tmp_path)
    assert request.draft_files == (str(draft),)
    assert request.from_model == "base"


def test_create_request_draft_rejects_same_file(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"model")
    modelfile = parse_modelfile("\nFROM ./model.gguf\nDRAFT ./model.gguf\n")
    with pytest.raises(ModelfileError, match="DRAFT must not reference the same local path as FROM"):
        create_request(modelfile, tmp_path)


def test_create_request_draft_rejects_same_directory(tmp_path: Path) -> None:
    directory = tmp_path.resolve()
    (directory / "model.gguf").write_bytes(bytes(512))
    modelfile = parse_modelfile("\nFROM .\nDRAFT .\n")
    with pytest.raises(ModelfileError, match="DRAFT must not reference the same local path as FROM"):
        create_request(modelfile, directory)


def test_parse_file_trim_space() -> None:
    text = f"""
FROM "     model 1"
ADAPTER      adapter3
LICENSE "MIT       "
PARAMETER param1        value1
PARAMETER param2    value2
TEMPLATE \"\"\"   {LLAMA3_TEMPLATE}   \"\"\"    
"""  # noqa: W291
    assert commands(text) == [
        C("model", "     model 1"), C("adapter", "adapter3"), C("license", "MIT       "),
        C("param1", "value1"), C("param2", "value2"), C("template", f"   {LLAMA3_TEMPLATE}   "),
    ]


@pytest.mark.parametrize(("text", "expected"), [
    ('FROM "FOO  BAR  "', [C("model", "FOO  BAR  ")]),
    ('FROM "FOO BAR"\nPARAMETER param1 value1', [C("model", "FOO BAR"), C("param1", "value1")]),
    ("FROM     FOOO BAR    ", [C("model", "FOOO BAR")]),
    ("FROM /what/is/the path ", [C("model", "/what/is/the path")]),
    ("FROM foo", [C("model", "foo")]),
    ("FROM /path/to/model", [C("model", "/path/to/model")]),
    ("FROM /path/to/model/fp16.bin", [C("model", "/path/to/model/fp16.bin")]),
    ("FROM llama3:latest", [C("model", "llama3:latest")]),
    ("FROM llama3:7b-instruct-q4_K_M", [C("model", "llama3:7b-instruct-q4_K_M")]),
    ("", None),
    ("PARAMETER param1 value1", None),
    ("PARAMETER param1 value1\nFROM foo", [C("param1", "value1"), C("model", "foo")]),
    ("PARAMETER what the \nFROM lemons make lemonade ",
     [C("what", "the"), C("model", "lemons make lemonade")]),
])
def test_parse_file_from(text: str, expected: list[Command] | None) -> None:
    if expected is None:
        assert parse_error(text) == ERR_MISSING_FROM
    else:
        assert commands(text) == expected


def test_parse_file_parameters_missing_value() -> None:
    assert parse_error("\nFROM foo\nPARAMETER param1\n") == "unexpected EOF: param1"


def test_parse_file_bad_command() -> None:
    assert parse_error("\nFROM foo\nBADCOMMAND param1 value1\n") == f"(line 3): {ERR_INVALID_COMMAND}"


def test_parse_file_renderer() -> None:
    assert commands("\nFROM foo\nRENDERER renderer1\n") == [C("model", "foo"), C("renderer", "renderer1")]


def test_parse_file_parser() -> None:
    assert commands("\nFROM foo\nPARSER parser1\n") == [C("model", "foo"), C("parser", "parser1")]


@pytest.mark.parametrize(("text", "expected"), [
    ("\nFROM foo\nMESSAGE system You are a file parser. Always parse things.\n",
     [C("model", "foo"), C("message", "system: You are a file parser. Always parse things.")]),
    ("\nFROM foo\nMESSAGE system You are a file parser. Always parse things.",
     [C("model", "foo"), C("message", "system: You are a file parser. Always parse things.")]),
    ("\nFROM foo\nMESSAGE system You are a file parser. Always parse things.\nMESSAGE user Hey there!\n"
     "MESSAGE assistant Hello, I want to parse all the things!\n",
     [C("model", "foo"), C("message", "system: You are a file parser. Always parse things."),
      C("message", "user: Hey there!"), C("message", "assistant: Hello, I want to parse all the things!")]),
    ('\nFROM foo\nMESSAGE system """\nYou are a multiline file parser. Always parse things.\n"""\n\t\t\t',
     [C("model", "foo"), C("message", "system: \nYou are a multiline file parser. Always parse things.\n")]),
    ("\nFROM foo\nMESSAGE badguy I'm a bad guy!\n", f"(line 3): {ERR_INVALID_ROLE}"),
    ("\nFROM foo\nMESSAGE system\n", "unexpected EOF: system"),
    ("\nFROM foo\nMESSAGE system", "unexpected EOF"),
])
def test_parse_file_messages(text: str, expected: list[Command] | str) -> None:
    if isinstance(expected, str):
        assert parse_error(text) == expected
    else:
        assert commands(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ('\nFROM foo\nSYSTEM """\nThis is a\nmultiline system.\n"""\n\t\t\t',
     [C("model", "foo"), C("system", "\nThis is a\nmultiline system.\n")]),
    ('\nFROM foo\nSYSTEM """\nThis is a\nmultiline system."""\n\t\t\t',
     [C("model", "foo"), C("system", "\nThis is a\nmultiline system.")]),
    ('\nFROM foo\nSYSTEM """This is a\nmultiline system."""\n\t\t\t',
     [C("model", "foo"), C("system", "This is a\nmultiline system.")]),
    ('\nFROM foo\nSYSTEM """This is a multiline system."""\n\t\t\t',
     [C("model", "foo"), C("system", "This is a multiline system.")]),
    ('\nFROM foo\nSYSTEM """This is a multiline system.""\n\t\t\t', "unexpected EOF"),
    ('\nFROM foo\nSYSTEM "\n\t\t\t', "unexpected EOF"),
    ('\nFROM foo\nSYSTEM """\nThis is a multiline system with "quotes".\n"""\n',
     [C("model", "foo"), C("system", '\nThis is a multiline system with "quotes".\n')]),
    ('\nFROM foo\nSYSTEM """"""\n', [C("model", "foo"), C("system", "")]),
    ('\nFROM foo\nSYSTEM ""\n', [C("model", "foo"), C("system", "")]),
    ("\nFROM foo\nSYSTEM \"'\"\n", [C("model", "foo"), C("system", "'")]),
    ('\nFROM foo\nSYSTEM """\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'"""\n',
     [C("model", "foo"), C("system", "''\"'\"\"'\"\"'\"'''''\"\"'\"\"'")]),
    ('\nFROM foo\nTEMPLATE """\n{{ .Prompt }}\n"""',
     [C("model", "foo"), C("template", "\n{{ .Prompt }}\n")]),
])
def test_parse_file_quoted(text: str, expected: list[Command] | str) -> None:
    if isinstance(expected, str):
        assert parse_error(text) == expected
    else:
        assert commands(text) == expected


@pytest.mark.parametrize(("line", "name", "value"), [
    ("numa true", "numa", "true"),
    ("num_ctx 1", "num_ctx", "1"),
    ("num_batch 1", "num_batch", "1"),
    ("num_gqa 1", "num_gqa", "1"),
    ("num_gpu 1", "num_gpu", "1"),
    ("main_gpu 1", "main_gpu", "1"),
    ("use_mmap true", "use_mmap", "true"),
    ("num_thread 1", "num_thread", "1"),
    ("num_keep 1", "num_keep", "1"),
    ("seed 1", "seed", "1"),
    ("num_predict 1", "num_predict", "1"),
    ("top_k 1", "top_k", "1"),
    ("top_p 1.0", "top_p", "1.0"),
    ("min_p 0.05", "min_p", "0.05"),
    ("typical_p 1.0", "typical_p", "1.0"),
    ("repeat_last_n 1", "repeat_last_n", "1"),
    ("temperature 1.0", "temperature", "1.0"),
    ("repeat_penalty 1.0", "repeat_penalty", "1.0"),
    ("presence_penalty 1.0", "presence_penalty", "1.0"),
    ("frequency_penalty 1.0", "frequency_penalty", "1.0"),
    ("penalize_newline true", "penalize_newline", "true"),
    ("stop ### User:", "stop", "### User:"),
    ("stop ### User: ", "stop", "### User:"),
    ('stop "### User:"', "stop", "### User:"),
    ('stop "### User: "', "stop", "### User: "),
    ('stop """### User:"""', "stop", "### User:"),
    ('stop """### User:\n"""', "stop", "### User:\n"),
    ("stop <|endoftext|>", "stop", "<|endoftext|>"),
    ("stop <|eot_id|>", "stop", "<|eot_id|>"),
    ("stop </s>", "stop", "</s>"),
])
def test_parse_file_parameters(line: str, name: str, value: str) -> None:
    assert commands(f"FROM foo\nPARAMETER {line}\n") == [C("model", "foo"), C(name, value)]


def test_parse_file_comments() -> None:
    assert commands("\n# comment\nFROM foo\n\t") == [C("model", "foo")]


@pytest.mark.parametrize("text", [
    """
FROM foo
ADAPTER adapter1
LICENSE MIT
PARAMETER param1 value1
PARAMETER param2 value2
TEMPLATE template1
MESSAGE system You are a file parser. Always parse things.
MESSAGE user Hey there!
MESSAGE assistant Hello, I want to parse all the things!
""",
    """
FROM foo
ADAPTER adapter1
LICENSE MIT
PARAMETER param1 value1
PARAMETER param2 value2
TEMPLATE template1
MESSAGE system \"\"\"
You are a store greeter. Always respond with "Hello!".
\"\"\"
MESSAGE user Hey there!
MESSAGE assistant Hello, I want to parse all the things!
""",
    """
FROM foo
ADAPTER adapter1
LICENSE \"\"\"
Very long and boring legal text.
Blah blah blah.
"Oh look, a quote!"
\"\"\"

PARAMETER param1 value1
PARAMETER param2 value2
TEMPLATE template1
MESSAGE system \"\"\"
You are a store greeter. Always respond with "Hello!".
\"\"\"
MESSAGE user Hey there!
MESSAGE assistant Hello, I want to parse all the things!
""",
    '\nFROM foo\nSYSTEM ""\n',
])
def test_parse_file_format_parse_file(text: str) -> None:
    first = parse_modelfile(text)
    assert parse_modelfile(str(first)) == first


UTF16_DATA = "FROM bob\nPARAMETER param1 1\nPARAMETER param2 4096\nSYSTEM You are a utf16 file.\n"
UTF16_EXPECTED = [C("model", "bob"), C("param1", "1"), C("param2", "4096"),
                  C("system", "You are a utf16 file.")]


def test_parse_file_utf16_le() -> None:
    assert commands(b"\xff\xfe" + UTF16_DATA.encode("utf-16-le")) == UTF16_EXPECTED


def test_parse_file_utf16_be() -> None:
    assert commands(b"\xfe\xff" + UTF16_DATA.encode("utf-16-be")) == UTF16_EXPECTED


@pytest.mark.parametrize("encoded", [
    "FROM test\n\tSYSTEM 你好👋".encode(),
    b"\xff\xfe" + "FROM test\n\tSYSTEM 你好👋".encode("utf-16-le"),
    b"\xfe\xff" + "FROM test\n\tSYSTEM 你好👋".encode("utf-16-be"),
], ids=["utf8", "utf16le", "utf16be"])
def test_parse_multi_byte(encoded: bytes) -> None:
    assert commands(encoded) == [C("model", "test"), C("system", "你好👋")]


@pytest.mark.parametrize(("text", "expected"), [
    ("FROM test", {"from_model": "test"}),
    ("FROM test\nTEMPLATE some template\n", {"from_model": "test", "template": "some template"}),
    ("FROM test\nLICENSE single license\nPARAMETER temperature 0.5\nMESSAGE user Hello\n",
     {"from_model": "test", "license": ("single license",), "parameters": {"temperature": 0.5},
      "messages": (("user", "Hello"),)}),
    ("FROM test\nPARAMETER temperature 0.5\nPARAMETER top_k 1\nSYSTEM You are a bot.\n"
     "LICENSE license1\nLICENSE license2\nMESSAGE user Hello there!\nMESSAGE assistant Hi! How are you?\n",
     {"from_model": "test", "license": ("license1", "license2"), "system": "You are a bot.",
      "parameters": {"temperature": 0.5, "top_k": 1},
      "messages": (("user", "Hello there!"), ("assistant", "Hi! How are you?"))}),
])
def test_create_request(text: str, expected: dict[str, object], tmp_path: Path) -> None:
    request = create_request(parse_modelfile(text), tmp_path)
    for name, value in expected.items():
        assert getattr(request, name) == value
    assert type(request.parameters.get("top_k", 0)) is int  # int64 in Go, never a float


def test_create_request_files(tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path, data in ((first, b"first"), (second, b"second")):
        path.parent.mkdir()
        path.write_bytes(data)
    assert create_request(parse_modelfile(f"FROM {first}"), tmp_path).files == (str(first),)
    both = create_request(parse_modelfile(f"FROM {first}\nFROM {second}"), tmp_path)
    assert both.files == (str(first), str(second))
    assert both.from_model == ""


@pytest.mark.parametrize(("value", "expected"), [
    ("true", True), ("false", False), ("1", True), ("0", False),
])
def test_use_mmap_format_params(value: str, expected: bool) -> None:
    assert format_param("use_mmap", value) is expected


def test_use_mmap_format_params_invalid() -> None:
    with pytest.raises(ParameterError, match=r"^invalid bool value \[foo\]$"):
        format_param("use_mmap", "foo")


def test_main_gpu_format_params() -> None:
    assert format_param("main_gpu", "0") == 0


@pytest.mark.parametrize(("value", "seconds"), [
    (42, 42.0), (42.5, 42.5), ("42m", 2520.0), (-1, None), (-3.14, None), ("-1m", None),
])
def test_keep_alive_parsing_from_json(value: int | float | str, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


def test_keep_alive_rejects_what_ollama_rejects() -> None:
    with pytest.raises(VelollmError, match="not a duration"):
        keep_alive_seconds("5 minutes")


# --- the Go parsers behind FormatParams and REQUIRES (strconv and x/mod/semver test tables) -------

@pytest.mark.parametrize(("text", "expected"), [
    ("1", 1.0), ("+1", 1.0), ("1e23", 1e23), ("625e-3", 0.625), ("-0", -0.0),
    ("0x1p-2", 0.25), ("0x1fFe2.p0", 131042.0), ("-0x1_ep-1", -15.0), ("0x_1_2.3_4_5p+1_2", 74565.0),
    ("1_23.50_0_0e+1_2", 1.235e14), ("inf", math.inf), ("-Infinity", -math.inf), ("+INF", math.inf),
    ("1e-400000", 0.0), ("340282346638528859811704183484516925440", 3.4028234663852886e38),
    ("3.402823567e38", 3.4028234663852886e38), ("0x.ffffff7fp128", 3.4028234663852886e38),
])
def test_parse_float32_accepts(text: str, expected: float) -> None:
    # Go's table lists float64 results; ParseFloat(s, 32) returns them rounded to float32.
    assert parse_float32(text) == struct.unpack("<f", struct.pack("<f", expected))[0]


@pytest.mark.parametrize("text", [
    "", "1x", "1.1.", "1e", "1e-", ".e-1", "0x", "0x.", "0x1", "0x1e2", "1p2", "0x1p", "+nan", "infin",
    "-_123.5e+12", "_123.5e+12", "1__23.5e+12", "123_.5e+12", "123._5e+12", "123.5_e+12", "123.5e_+12",
    "123.5e+12_", "0x__12.345p+12", "0x12.345p+12_", " 1", "1 ",
    "3.4028236e38", "3.4028235678e38", "0x1.0p128", "0x.ffffff8p128", "1e+18446744073709551616",
])
def test_parse_float32_rejects(text: str) -> None:
    assert parse_float32(text) is None


def test_parse_float32_nan() -> None:
    assert math.isnan(parse_float32("NaN") or 0.0)


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("+5", 5), ("0010", 10), ("-9223372036854775808", -(2**63)),
    ("4096.0", None), ("4_096", None), ("9223372036854775808", None), ("", None), (" 1", None),
])
def test_parse_int(text: str, expected: int | None) -> None:
    assert parse_int(text) == expected


@pytest.mark.parametrize(("version", "valid"), [
    ("v0.14.0", True), ("v1", True), ("v1.2", True), ("v1.2.3-rc.1+build.5", True), ("v1.2.3-x-y", True),
    ("v01.2.3", False), ("v1.2.3-01", False), ("v1.2.3-", False), ("v1.2.3+", False),
    ("v1.2-rc", False), ("v1.2.3.4", False), ("vv1", False), ("v", False), ("1.2.3", False),
])
def test_semver_is_valid(version: str, valid: bool) -> None:
    assert semver_is_valid(version) is valid
