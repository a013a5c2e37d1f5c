"""CI lane: llama.cpp's own server test suite on our patched build, test by test against vanilla (issue #35).

``python -m ci.upstream_server_tests --build PATCHED --vanilla VANILLA [--config off|defaults|features]
[--subset full|ci] [--vanilla-outcomes FILE] [--home DIR]``

The pinned tree ships the suite (``tools/server/tests``, pytest; the server binary comes from
``LLAMA_SERVER_BIN_PATH``). Its models come from Hugging Face, unreachable here, so the lane

1. copies the suite out of the build's source tree (read-only) into a work directory that mirrors the tree
   around it (the tests reach ``../../../models`` and ``../../../tools``);
2. fills its model cache (``LLAMA_CACHE``, laid out as Hugging Face's) with our demo models under the
   repository and file names the suite asks for (``SUBSTITUTES``), and the speculative draft where
   ``download_file`` would put it;
3. runs the suite serially (upstream's own CI selection, ``-m "not slow"``) once per build with
   ci/upstream_server_plugin.py loaded: it deselects what cannot be substituted (``DESELECTED``, each with
   its reason), keeps the suite offline and records every test's outcome;
4. compares the outcomes test by test; each test that differs is run again on both builds, once, and only a
   difference that repeats counts (a timeout on a busy machine is noise, and says so in the report);
5. writes a JSON and a Markdown report into ``<home>/data/ci`` (``upstream-server-tests-<config>-<time>``).

Configurations of the patched build (vanilla always runs as it is):

- ``off``: every switch our patches add turned to upstream's behaviour (``off_env``: the server flags'
  environment forms and the kernels' ``GGML_*`` switches, read from the build's patch list). It must match
  vanilla on every test: that is the promise that vanilla is one switch away.
- ``defaults``: the build as installed. It may differ only where our kernels make the model write other text;
  each such test is listed in ``DEFAULTS_TEXT_DIFFERENCES`` with its cause. Any other difference fails.
- ``features``: our opt-in features on (``FEATURES_ENV``), on the kernels of ``defaults``.
- ``tuned``: the tuner's plan for the suite's main substitute model on this machine and build (``tuned_env``),
  as ``LLAMA_ARG_*``: what ``velollm-patch serve`` would set, less what shapes a test's server (the model,
  context, slots; each test passes its own, and its arguments win over the environment).

``features`` and ``tuned`` keep ``defaults``' rule: they run the same kernels, so the same text may differ, and
any difference not in ``DEFAULTS_TEXT_DIFFERENCES`` fails the lane (a feature must not change an answer).

The whole suite takes about 7.5 minutes per build on 2 quiet cores (over an hour when other jobs share them);
``--subset ci`` (``CI_SUBSET``) is what the test suite's CI entry runs (tests/test_upstream_server_suite.py),
and the full suite is run before an issue that touches the server or the kernels is resolved.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from ci import reports
from velollm_patch import builds, demo_models, hardware, proc, serve, tune
from velollm_patch.errors import VelollmError, plain
from velollm_patch.paths import Paths, ensure_dir, get_paths

LANE = "upstream-server-tests"
REPORT_SCHEMA = "velollm-upstream-server-tests/1"
REPO_ROOT = Path(__file__).resolve().parent.parent
SUITE = Path("tools/server/tests")
PLUGIN = "ci.upstream_server_plugin"
OUTCOMES_ENV = "VELOLLM_UST_OUTCOMES"
# A cache commit for the substitutes: hf-cache.cpp wants a 40-hex ref in refs/main and a snapshot under it.
CACHE_COMMIT = "0" * 39 + "1"


@dataclass(frozen=True)
class Substitute:
    repo: str  # the Hugging Face repository the suite asks for
    file: str  # the file inside it: the suite's --hf-file, or a name the repository's tag selects
    model: str  # one of velollm_patch.demo_models.KNOWN_MODELS
    why: str


SUBSTITUTES: tuple[Substitute, ...] = (
    Substitute("ggml-org/test-model-stories260K", "stories260K-F32.gguf", "smollm2-135m",
               "the tinyllama2 preset (most tests) and the router's ggml-org/test-model-stories260K:F32"),
    Substitute("ggml-org/test-model-stories260K-infill", "stories260K-infill-F32.gguf", "smollm2-135m",
               "the router's second text model (ggml-org/test-model-stories260K-infill:F32); the infill tests "
               "themselves are deselected"),
    Substitute("ggml-org/stories15M_MOE", "stories15M_MOE-F16.gguf", "smollm2-135m",
               "the stories15m_moe preset: test_speculative's target"),
    Substitute("ggml-org/models", "tinyllamas/stories260K.gguf", "smollm2-135m",
               "ServerProcess's default model"),
    Substitute("ggml-org/models", "bert-bge-small/ggml-model-f16.gguf", "smollm2-135m",
               "the bert_bge_small presets (embeddings): a causal model pools too"),
    Substitute("ggml-org/models", "jina-reranker-v1-tiny-en/ggml-model-f16.gguf", "smollm2-135m",
               "the jina_reranker_tiny preset (reranking)"),
    # the preset asks for the tag Q8_0: find_best_model wants "Q8_0" followed by '.' or '-' in the name
    Substitute("ggml-org/tinygemma3-GGUF", "tinygemma3-Q8_0.gguf", "gemma3-270m",
               "the tinygemma3 preset (text only: no mmproj, the vision tests are deselected)"),
)

# Files upstream's download_file() would fetch into the suite's tmp/ (name, model, why).
LOCAL_FILES: tuple[tuple[str, str, str], ...] = (
    ("stories15M-q4_0.gguf", "smollm2-135m", "test_speculative's draft model (MODEL_DRAFT_FILE_URL)"),
)

# Node id prefixes that cannot run offline with our models, and why.
DESELECTED: tuple[tuple[str, str], ...] = (
    ("unit/test_vision_api.py", "vision: tinygemma3's mmproj and test images from Hugging Face; gemma3-270m "
                                "has no vision tower"),
    ("unit/test_lora.py", "LoRA: adapters downloaded from Hugging Face, made for stories15M_MOE"),
    ("unit/test_infill.py", "infill: needs fill-in-the-middle tokens (stories260K-infill); SmolLM2 has none"),
    ("unit/test_basic.py::test_load_split_model", "split GGUF downloaded from Hugging Face"),
    ("unit/test_router.py::test_router_remote_preset", "remote download: a preset repository on Hugging Face"),
    ("unit/test_router.py::test_router_download", "remote download: a model from Hugging Face"),
    ("unit/test_security.py::test_local_media_file", "vision: an image for tinygemma3's mmproj"),
)
# Fixtures that start a multimodal server (upstream's own names), and why their tests are deselected.
DESELECTED_FIXTURES: Mapping[str, str] = {
    "vision_server": "vision: tinygemma3's mmproj and an image from Hugging Face",
    "mmproj_server": "vision: tinygemma3's mmproj and images from Hugging Face",
}

# The value of each patch's switch (series.toml's env) that gives upstream's behaviour. A patch with a
# switch that is not here stops the lane: "everything off" must cover every switch of the series.
OFF_VALUES: Mapping[str, str] = {
    "LLAMA_ARG_KV_ON_DEMAND": "off",
    "LLAMA_ARG_FIT_OUTPUTS": "0",  # llama-fit-params only; the server ignores it
    "GGML_AMX": "0",  # AMX CPUs: our builds have upstream's AMX kernels (patch 0004 makes them work), vanilla none
    "GGML_AMX_WIDEN": "0",
    "LLAMA_ARG_LAZY_MODE": "auto",  # upstream's default; only our "embd" differs
    "GGML_CPU_REPACK_Q4_1": "0",
    "GGML_CPU_REPACK_Q8_0": "0",
    "LLAMA_ARG_SPEC_DRAFT_CTX": "0",
    "LLAMA_ARG_SPEC_ADAPTIVE": "off",
    "LLAMA_ARG_SPEC_LEGACY_FLAGS": "off",
    "LLAMA_ARG_SPEC_BATCH_INVARIANT": "off",
    "LLAMA_ARG_SPEC_MTP_FALLBACK": "off",
    "GGML_BACKEND_DL_SCAN": "1",
}
# Second switches of a patch that series.toml's single env field does not name: (patch, env, off value).
EXTRA_OFF: tuple[tuple[str, str, str], ...] = (
    ("spec-adaptive", "LLAMA_ARG_SPEC_REQUEST_PARAMS", "off"),  # speculative.* request fields, as upstream
)
# Our opt-in features (config "features"); flash attention stays at upstream's auto, which is on for the CPU.
FEATURES_ENV: Mapping[str, str] = {
    "LLAMA_ARG_KV_ON_DEMAND": "on",
    "LLAMA_ARG_SPEC_ADAPTIVE": "on",
}

# Under "defaults", tests whose outcome may differ from vanilla's because our build computes other floats and
# the model writes other text (or other scores): upstream's AMX kernels on a CPU with AMX (patch 0004 makes them
# work; vanilla builds have none), our repacked Q4_1 kernel (0007) on one without, and batch-invariant kernels
# while speculating (0013). Each returns to vanilla's outcome under "off". Seen on a 2-vCPU Xeon with AMX, with
# and without GGML_AMX=0, and on a 2-vCPU EPYC (issue #35). Node id prefix -> cause.
_KERNEL_TEXT = ("our kernels' floats (AMX on a CPU with AMX, the repacked Q4_1 kernel without) make SmolLM2 write "
                "other text; ")
DEFAULTS_TEXT_DIFFERENCES: Mapping[str, str] = {
    "unit/test_completion.py::test_completion_unified[256-4-":
        _KERNEL_TEXT + "one of the four parallel answers reaches end of generation at 40 tokens where more were "
        "asked (stop type eos; without AMX)",
    "unit/test_speculative.py::test_with_and_without_draft":
        "speculation turns batch-invariant kernels on (--spec-batch-invariant auto) and the server without a draft "
        "decodes on upstream's single-row kernels; the logprobs differ by a few hundredths and the sampled text "
        "differs from the tenth token (without AMX); with --spec-batch-invariant on for both servers they agree "
        "bit for bit (docs/upstream-server-tests.md, Decisions)",
    "unit/test_speculative.py::test_synth_ignores_target_tokens":
        _KERNEL_TEXT + "the answer ends at end of generation after 17 tokens, so 2 of the 16 drafted tokens come "
        "after the end and are not accepted (with AMX)",
    "unit/test_tool_call.py::test_completion_without_tool_call_fast[meta-llama-Llama-3.3-70B-Instruct-128-tools1-":
        _KERNEL_TEXT + "its answer does not parse as the template's tool-call format (500, 'does not match the "
        "expected peg-native format'); vanilla's does (without AMX)",
    "unit/test_compat_anthropic.py::test_anthropic_tool_result":
        _KERNEL_TEXT + "vanilla's answer is empty and fails, ours is not",
    "unit/test_ctx_shift.py::test_ctx_shift_disabled_stream":
        _KERNEL_TEXT + "vanilla's stream ends with a stop where the test wants none, ours runs to the limit "
        "(without AMX)",
    **dict.fromkeys(("unit/test_rerank.py::test_rerank", "unit/test_rerank.py::test_rerank_tei_format"),
                    "our kernels' floats change SmolLM2's rerank scores (it stands in for a reranker): vanilla's "
                    "order of the documents fails the test, ours passes"),
}

# The CI entry's budget: the files that exercise what our patches touch (completion text and our kernels,
# embeddings, metrics and the KV gauges, sleep, speculation, slots, context shift, bad input): about 3 of the
# whole suite's 7.5 minutes per build on 2 quiet cores, so about 6 minutes for both builds.
CI_SUBSET: tuple[str, ...] = (
    "unit/test_basic.py",
    "unit/test_completion.py",
    "unit/test_ctx_shift.py",
    "unit/test_embedding.py",
    "unit/test_kv_keep_only_active.py",
    "unit/test_metrics.py",
    "unit/test_security.py",
    "unit/test_sleep.py",
    "unit/test_slot_save.py",
    "unit/test_speculative.py",
    "unit/test_tokenize.py",
)

# Tests whose outcome is a race on both builds: they run, and a difference in their outcome is reported but not
# counted. Node id prefix -> why, with how often each build failed it.
FLAKY: Mapping[str, str] = {
    "unit/test_completion.py::test_completion_unified[256-4-n_predict_vals3-expected_success3]":
        "four parallel requests (90, 90, 40, 75 tokens) fill a unified 256-cell cache; whether the last one ends "
        "at 89 tokens with 200 (the test fails) or gets its 90 depends on when each request joins the batch: "
        "SmolLM2 is slow enough to make it a race (8 runs each, everything off: vanilla failed 4, ours 5)",
}

# What the tuner sets that the suite's tests choose for themselves: a test's server has its own model,
# context and slots (its arguments win over the environment only where it passes them), and /metrics off
# unless it asks (test_metrics checks that it is off by default).
TUNED_LEFT_TO_THE_TEST = frozenset({
    "LLAMA_ARG_MODEL", "LLAMA_ARG_CTX_SIZE", "LLAMA_ARG_N_PARALLEL", "LLAMA_ARG_KV_UNIFIED",
    "LLAMA_ARG_KV_UNIFIED_PER_SLOT", "LLAMA_ARG_ENDPOINT_METRICS",
})

CONFIGS = ("off", "defaults", "features", "tuned")


def deselection_reason(nodeid: str, fixtures: Sequence[str]) -> str | None:
    """Why a test cannot run offline with our models, or None when it runs."""
    for prefix, reason in DESELECTED:
        if nodeid == prefix or (nodeid.startswith(prefix) and nodeid[len(prefix)] in ":[_"):
            return reason
    for fixture in fixtures:
        if fixture in DESELECTED_FIXTURES:
            return DESELECTED_FIXTURES[fixture]
    return None


def expected_difference(nodeid: str, table: Mapping[str, str]) -> str | None:
    """The reason ``table`` gives for ``nodeid``: keyed by node id, or by the start of a parametrized one (up to
    a ``[`` or ``-``), so that a listed test does not cover another whose name merely starts alike."""
    for key, reason in table.items():
        if nodeid == key or (key.endswith(("[", "-")) and nodeid.startswith(key)):
            return reason
    return None


# --- the configurations ---------------------------------------------------------------------------------


def off_env(build: builds.InstalledBuild) -> dict[str, str]:
    """Every switch of the build's patches at upstream's behaviour."""
    env: dict[str, str] = {}
    for patch in build.manifest.get("patches", []):
        name, var = patch["name"], patch.get("env", "")
        if var:
            if var not in OFF_VALUES:
                raise VelollmError(f"patch {name} has the switch {var}, and the upstream lane has no value that "
                                   f"turns it off: add it to OFF_VALUES in ci/upstream_server_tests.py")
            env[var] = OFF_VALUES[var]
        env.update({extra: value for patch_name, extra, value in EXTRA_OFF if patch_name == name})
    return env


def tuned_env(paths: Paths, build: builds.InstalledBuild) -> dict[str, str]:
    """The tuner's plan (``velollm-patch tune``, default profile and workload) for SmolLM2 with ``build``."""
    plan = tune.plan_for(SUBSTITUTES[0].model, hardware.detect(build_dir=paths.cache), build, paths,
                         tune.TuneRequest())
    return {k: v for k, v in plan.env.items() if k not in TUNED_LEFT_TO_THE_TEST}


def config_env(config: str, build: builds.InstalledBuild, paths: Paths) -> dict[str, str]:
    if build.is_vanilla or config == "defaults":
        return {}
    if config == "off":
        return off_env(build)
    if config == "features":
        return dict(FEATURES_ENV)
    if config == "tuned":
        return tuned_env(paths, build)
    raise VelollmError(f"unknown configuration {config}: one of {', '.join(CONFIGS)}")


# --- the suite and its offline cache --------------------------------------------------------------------


def source_tree(build: builds.InstalledBuild) -> Path:
    tree = Path(build.manifest.get("source", {}).get("tree", ""))
    if not (tree / SUITE / "conftest.py").is_file():
        raise VelollmError(f"build {build.build_id}: its source tree {tree} has no {SUITE}; "
                           f"fetch the source again (velollm-patch build does)")
    return tree


def prepare_suite(tree: Path, work: Path) -> Path:
    """A copy of the suite at its place in a mirror of ``tree`` (links to everything else); the suite dir."""
    if work.exists():
        shutil.rmtree(work)
    here, source = ensure_dir(work), tree
    for part in SUITE.parts[:-1]:
        for entry in source.iterdir():
            if entry.name != part:
                (here / entry.name).symlink_to(entry)
        here, source = ensure_dir(here / part), source / part
    for entry in source.iterdir():
        if entry.name != SUITE.name:
            (here / entry.name).symlink_to(entry)
    suite = here / SUITE.name
    shutil.copytree(source / SUITE.name, suite, ignore=shutil.ignore_patterns("tmp", "__pycache__", ".pytest_cache"))
    return suite


def prepare_cache(paths: Paths, cache: Path) -> dict[str, str]:
    """The suite's model cache, Hugging Face's layout, pre-filled with links to our models; what went where."""
    placed: dict[str, str] = {}
    fetched: dict[str, Path] = {}
    for sub in SUBSTITUTES:
        if sub.model not in fetched:
            fetched[sub.model] = demo_models.fetch_model(paths, sub.model)
        model = fetched[sub.model]
        repo_dir = cache / ("models--" + sub.repo.replace("/", "--"))
        ensure_dir(repo_dir / "refs")
        (repo_dir / "refs" / "main").write_text(CACHE_COMMIT)
        target = repo_dir / "snapshots" / CACHE_COMMIT / sub.file
        ensure_dir(target.parent)
        target.symlink_to(model)
        placed[f"{sub.repo}/{sub.file}"] = model.name
    for name, model_name, _ in LOCAL_FILES:
        model = fetched.get(model_name) or demo_models.fetch_model(paths, model_name)
        (cache / name).symlink_to(model)
        placed[f"tmp/{name}"] = model.name
    return placed


def _clean_environ() -> dict[str, str]:
    # a developer's LLAMA_ARG_* or GGML_* would reach both servers and hide or fake a difference
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("LLAMA_ARG_", "GGML_", "LLAMA_CACHE", "LLAMA_SERVER_", "HF_"))}


@dataclass
class SuiteRun:
    label: str
    binary: str
    env: dict[str, str]
    tests: dict[str, dict[str, Any]]
    deselected: dict[str, str]
    seconds: float
    exit_code: int
    log: str


def run_suite(paths: Paths, build: builds.InstalledBuild, env: Mapping[str, str], work: Path, label: str,
              select: Sequence[str] = (), *, timeout: float = 3 * 3600) -> SuiteRun:
    """Upstream's suite against ``build``'s llama-server with ``env`` added, serially; its outcomes."""
    binary = build.bin("llama-server")
    suite = prepare_suite(source_tree(build), work / label)
    cache = ensure_dir(suite / "tmp")
    prepare_cache(paths, cache)
    outcomes = work / f"{label}.outcomes.json"
    log = work / f"{label}.log"
    full_env = {
        **_clean_environ(), **env,
        "LLAMA_SERVER_BIN_PATH": str(binary),
        "LLAMA_CACHE": str(cache),
        "PORT": str(serve.free_port()),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        OUTCOMES_ENV: str(outcomes),
    }
    cmd = [sys.executable, "-m", "pytest", "-p", PLUGIN, "-p", "no:cacheprovider", "-m", "not slow",
           "-o", "addopts=", "-q", *select]
    print(f"[{time.strftime('%H:%M:%S')}] {label}: upstream's suite against {build.build_id}"
          + (f" with {' '.join(f'{k}={v}' for k, v in env.items())}" if env else ""), flush=True)
    started = time.monotonic()
    log.unlink(missing_ok=True)
    # the suite's servers write their logs to its stdout: into the log file, not the lane's output; its own
    # process group, so that a timeout or Ctrl-C stops the servers the suite started too
    result = proc.run(cmd, cwd=suite, env=full_env, inherit_env=False, check=False, timeout=timeout,
                      log_file=log, what=f"{label}: upstream's suite")
    seconds = time.monotonic() - started
    # the copy and its cache are links and upstream's small files; the log and the outcomes stay
    shutil.rmtree(work / label, ignore_errors=True)
    if not outcomes.is_file():
        raise VelollmError(f"{label}: upstream's suite wrote no outcomes (exit {result.returncode}); see {log}")
    data = json.loads(outcomes.read_text())
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {summary(data['tests'])} in {seconds:.0f} s", flush=True)
    return SuiteRun(label, str(binary), dict(env), data["tests"], data["deselected"], round(seconds, 1),
                    result.returncode, str(log))


def summary(tests: Mapping[str, Mapping[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for entry in tests.values():
        counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))


# --- comparing ------------------------------------------------------------------------------------------


def differing(vanilla: Mapping[str, Mapping[str, Any]], ours: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Node ids whose outcome differs (a test that ran on one side only differs too)."""
    missing = {"outcome": "not run", "message": ""}
    return sorted(n for n in set(vanilla) | set(ours)
                  if vanilla.get(n, missing)["outcome"] != ours.get(n, missing)["outcome"])


# what changes from run to run in a message: numbers (timings, ports, addresses) and generated ids (resp_…)
_VOLATILE = re.compile(r"0x[0-9a-f]+|\b\d+(\.\d+)?\b|\b[A-Za-z]+[-_][A-Za-z0-9]{16,}\b", re.IGNORECASE)


def same_failure(a: str, b: str) -> bool:
    """Two failure messages alike but for numbers and generated ids."""
    def norm(text: str) -> str:
        # pytest names the exception in one report and not in another for the same assertion
        return _VOLATILE.sub("#", text.removeprefix("AssertionError: "))
    return norm(a) == norm(b)


def compare(config: str, vanilla: Mapping[str, Mapping[str, Any]], ours: Mapping[str, Mapping[str, Any]],
            rerun_vanilla: Mapping[str, Mapping[str, Any]], rerun_ours: Mapping[str, Mapping[str, Any]],
            ) -> dict[str, Any]:
    """The verdict: differences that repeated (explained or not), noise, and failures alike on both sides."""
    missing = {"outcome": "not run", "message": ""}
    differences, noise = [], []
    for nodeid in differing(vanilla, ours):
        row: dict[str, Any] = {"test": nodeid, "vanilla": vanilla.get(nodeid, missing),
                               "ours": ours.get(nodeid, missing)}
        if nodeid in rerun_vanilla or nodeid in rerun_ours:
            row["rerun"] = {"vanilla": rerun_vanilla.get(nodeid, missing), "ours": rerun_ours.get(nodeid, missing)}
            if row["rerun"]["vanilla"]["outcome"] == row["rerun"]["ours"]["outcome"]:
                noise.append(row)
                continue
        flaky = expected_difference(nodeid, FLAKY)
        if flaky:
            row["flaky"] = flaky
            noise.append(row)
            continue
        reason = expected_difference(nodeid, DEFAULTS_TEXT_DIFFERENCES) if config != "off" else None
        row["explained"] = reason
        differences.append(row)
    unexplained = [d for d in differences if not d["explained"]]
    both_failed_otherwise = [
        {"test": n, "vanilla": vanilla[n]["message"], "ours": ours[n]["message"]}
        for n in sorted(set(vanilla) & set(ours))
        if vanilla[n]["outcome"] == ours[n]["outcome"] in ("failed", "error")
        and not same_failure(vanilla[n]["message"], ours[n]["message"])
    ]
    passed = not unexplained
    return {"result": "passed" if passed else "failed", "differences": differences, "noise": noise,
            "unexplained": len(unexplained), "failed_alike_other_message": both_failed_otherwise}


# --- reports --------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# CI lane {LANE} ({report['config']}): {report['result']}",
        "",
        f"- ours: `{report['ours']['build_id']}` ({report['ours']['summary']}, {report['ours']['seconds']} s)",
        f"- vanilla: `{report['vanilla']['build_id']}` ({report['vanilla']['summary']}, "
        f"{report['vanilla']['seconds']} s)",
        f"- configuration `{report['config']}`: "
        + (" ".join(f"`{k}={v}`" for k, v in report["env"].items()) or "the build as installed"),
        f"- subset: {report['subset']}; {len(report['deselected'])} tests deselected (reasons below)",
        f"- finished {report['finished']}, {report['wall_seconds']} s in all",
        "",
    ]
    verdict = report["verdict"]
    if verdict["differences"]:
        lines += ["## Differences (repeated on a rerun)", "",
                  "| test | vanilla | ours | explained by |", "|---|---|---|---|"]
        for d in verdict["differences"]:
            lines.append(f"| `{d['test']}` | {d['vanilla']['outcome']}: {_cell(d['vanilla']['message'])} | "
                         f"{d['ours']['outcome']}: {_cell(d['ours']['message'])} | "
                         f"{_cell(d.get('explained') or '—')} |")
        lines.append("")
    else:
        lines += ["No test differs from vanilla.", ""]
    if verdict["noise"]:
        lines += ["## Differences not counted: they did not repeat, or the test is a race (`FLAKY`)", ""]
        for d in verdict["noise"]:
            why = f"a race: {d['flaky']}" if d.get("flaky") else f"on the rerun both {d['rerun']['ours']['outcome']}"
            lines.append(f"- `{d['test']}`: vanilla {d['vanilla']['outcome']}, ours {d['ours']['outcome']}; {why}")
        lines.append("")
    if verdict["failed_alike_other_message"]:
        lines += ["## Failed on both, with other messages (the same outcome; often other generated text)", ""]
        lines += [f"- `{f['test']}`: vanilla: {_cell(f['vanilla'])}; ours: {_cell(f['ours'])}"
                  for f in verdict["failed_alike_other_message"]]
        lines.append("")
    reasons: dict[str, int] = {}
    for reason in report["deselected"].values():
        reasons[reason] = reasons.get(reason, 0) + 1
    lines += ["## Deselected", ""] + [f"- {n} × {reason}" for reason, n in sorted(reasons.items())]
    lines += ["", "## Model substitutes", ""] + [f"- `{where}` → {model}" for where, model in report["cache"].items()]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return plain(text, 200).replace("|", "\\|")


def write_report(report: dict[str, Any], paths: Paths) -> tuple[Path, Path]:
    return reports.write_pair(reports.stamped(paths, f"{LANE}-{report['config']}"), report, markdown(report))


# --- the lane -------------------------------------------------------------------------------------------


def _selection(subset: str) -> tuple[str, ...]:
    if subset == "full":
        return ()
    if subset == "ci":
        return CI_SUBSET
    return tuple(s for s in subset.split(",") if s)


def _vanilla_run(paths: Paths, vanilla: builds.InstalledBuild, work: Path, select: Sequence[str],
                 stored: Path | None) -> SuiteRun:
    if stored is not None:
        data = json.loads(stored.read_text())
        run = SuiteRun(**data)
        if not select:
            return run
        keep = {n: e for n, e in run.tests.items() if any(n.startswith(s) for s in select)}
        return SuiteRun(**{**data, "tests": keep})
    return run_suite(paths, vanilla, {}, work, "vanilla", select)


def run_lane(paths: Paths, build: builds.InstalledBuild, vanilla: builds.InstalledBuild, config: str,
             subset: str, *, stored_vanilla: Path | None = None, rerun: bool = True,
             extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    if not vanilla.is_vanilla:
        raise VelollmError(f"{vanilla.build_id} is not a vanilla build (it has patches)")
    if build.manifest.get("source", {}).get("commit") != vanilla.manifest.get("source", {}).get("commit"):
        raise VelollmError(f"{build.build_id} and {vanilla.build_id} are not built from the same upstream commit")
    started = time.monotonic()
    select = _selection(subset)
    env = {**config_env(config, build, paths), **(extra_env or {})}
    # not under paths.work (every build empties it), and one directory per run: runs may overlap
    work = ensure_dir(paths.cache / LANE / f"{time.strftime('%Y%m%d-%H%M%S')}-{config}-{os.getpid()}")
    base_vanilla = _vanilla_run(paths, vanilla, work, select, stored_vanilla)
    ours = run_suite(paths, build, env, work, f"ours-{config}", select)
    changed = differing(base_vanilla.tests, ours.tests)
    rerun_vanilla: dict[str, dict[str, Any]] = {}
    rerun_ours: dict[str, dict[str, Any]] = {}
    if changed and rerun:
        rerun_vanilla = run_suite(paths, vanilla, {}, work, "vanilla-rerun", changed).tests
        rerun_ours = run_suite(paths, build, env, work, f"ours-{config}-rerun", changed).tests
    verdict = compare(config, base_vanilla.tests, ours.tests, rerun_vanilla, rerun_ours)
    report = {
        "schema": REPORT_SCHEMA,
        "lane": LANE,
        "config": config,
        "result": verdict["result"],
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(time.monotonic() - started, 1),
        "subset": subset if not select else ", ".join(select),
        "env": env,
        "ours": {"build_id": build.build_id, "summary": summary(ours.tests), "seconds": ours.seconds},
        "vanilla": {"build_id": vanilla.build_id, "summary": summary(base_vanilla.tests),
                    "seconds": base_vanilla.seconds, "stored": str(stored_vanilla) if stored_vanilla else None},
        "verdict": verdict,
        "deselected": ours.deselected,
        "cache": {f"{s.repo}/{s.file}": s.model for s in SUBSTITUTES}
        | {f"tmp/{name}": model for name, model, _ in LOCAL_FILES},
        "runs": {"vanilla": base_vanilla.__dict__, "ours": ours.__dict__},
    }
    json_file, md_file = write_report(report, paths)
    (work / "vanilla.run.json").write_text(json.dumps(base_vanilla.__dict__, indent=1) + "\n")
    print(f"report: {json_file} and {md_file}; vanilla's run for --vanilla-outcomes: {work / 'vanilla.run.json'}",
          flush=True)
    return report


def _find(paths: Paths, ref: str) -> builds.InstalledBuild:
    path = Path(ref)
    if (path / builds.MANIFEST).is_file():
        return builds.read_build(path)
    return builds.find_build(paths, ref)


@click.command()
@click.option("--build", "build_ref", required=True, help="The patched build: its id or directory.")
@click.option("--vanilla", "vanilla_ref", required=True, help="The vanilla build at the same pin: id or directory.")
@click.option("--config", type=click.Choice(CONFIGS), default="off", show_default=True)
@click.option("--subset", default="full", show_default=True,
              help="full, ci (the CI entry's files), or a comma list of test files or node ids.")
@click.option("--vanilla-outcomes", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A stored vanilla run (vanilla.run.json in an earlier run's directory, "
                   "<home>/cache/upstream-server-tests/<run>/) instead of running vanilla again.")
@click.option("--no-rerun", is_flag=True, help="Do not run differing tests again.")
@click.option("--env", "extra_env", multiple=True, metavar="KEY=VALUE",
              help="More environment for our build, after the configuration's: GGML_AMX=0 runs the kernels a CPU "
                   "without AMX runs (repeatable).")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path),
              help="velollm home with both builds (VELOLLM_HOME); default: the user's.")
def main(build_ref: str, vanilla_ref: str, config: str, subset: str, vanilla_outcomes: Path | None,
         no_rerun: bool, extra_env: tuple[str, ...], home: Path | None) -> None:
    """Run llama.cpp's server test suite on a patched build and on vanilla, and compare test by test."""
    bad = [item for item in extra_env if "=" not in item or not item.split("=", 1)[0]]
    if bad:
        raise click.BadParameter(f"{bad[0]!r} is not KEY=VALUE (e.g. --env GGML_AMX=0)", param_hint="--env")
    if home is not None:
        os.environ["VELOLLM_HOME"] = str(home)
    try:
        paths = get_paths()
        report = run_lane(paths, _find(paths, build_ref), _find(paths, vanilla_ref), config, subset,
                          stored_vanilla=vanilla_outcomes, rerun=not no_rerun,
                          extra_env=dict(item.split("=", 1) for item in extra_env))
    except VelollmError as exc:
        print(f"error: {plain(str(exc), 8192)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    for d in report["verdict"]["differences"]:
        print(f"differs: {d['test']}: vanilla {d['vanilla']['outcome']}, ours {d['ours']['outcome']} "
              f"({plain(d['ours']['message'] or d['vanilla']['message'], 300)})"
              + (f" — explained: {d['explained']}" if d.get("explained") else ""))
    print(f"{LANE} ({config}): {report['result']}")
    if report["result"] != "passed":
        sys.exit(1)


if __name__ == "__main__":
    main()
