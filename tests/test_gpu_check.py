"""ci/gpu_check.py and its model writer: budgets and stages, the reports, the models it makes (tiny shapes)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, quants

from ci import gpu_check as gc
from ci import gpu_check_models as gcm
from tests.helpers import write_gguf
from velollm_patch import serve
from velollm_patch.builds import InstalledBuild
from velollm_patch.errors import VelollmError
from velollm_patch.model import inspect_model
from velollm_patch.units import MiB


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_budget_gives_each_stage_what_it_asks_for_or_what_is_left() -> None:
    clock = FakeClock()
    budget = gc.Budget(300, clock=clock)
    assert budget.limit(120) == 120
    assert budget.limit(120, keep_s=200) == 100  # what the later stages need is kept back
    clock.now += 250
    assert (budget.elapsed(), budget.left(), budget.limit(120)) == (250, 50, 50)
    clock.now += 100
    assert (budget.left(), budget.limit(120)) == (0, 0)
    deadline = gc.Deadline(5, clock=clock)
    deadline.check("a request")
    clock.now += 6
    assert deadline.left() == 0
    with pytest.raises(VelollmError, match="out of time before a request"):
        deadline.check("a request")


def test_a_stage_that_finishes_reports_its_data_and_one_that_raises_is_failed() -> None:
    budget = gc.Budget(60)

    def fills(deadline: gc.Deadline, data: dict[str, Any]) -> None:
        data["left"] = deadline.left()

    done = gc.run_stage("fills", fills, budget=budget, wanted_s=20, min_s=1)
    assert done.status == "ok" and 0 < done.data["left"] <= 20 and done.limit_s == 20

    def raises(deadline: gc.Deadline, data: dict[str, Any]) -> None:
        data["measured"] = 1
        raise VelollmError("llama-server exited with code 1\nlast log lines")

    failed = gc.run_stage("raises", raises, budget=budget, wanted_s=20, min_s=1)
    assert (failed.status, failed.detail, failed.data) == ("failed", "llama-server exited with code 1 last log lines",
                                                           {"measured": 1})


def test_a_stage_past_its_limit_is_stopped_and_keeps_what_it_measured() -> None:
    released = threading.Event()

    def hangs(deadline: gc.Deadline, data: dict[str, Any]) -> None:
        data["before"] = True
        released.wait()  # a request to a server that never answers, until the server is stopped

    started = time.monotonic()
    result = gc.run_stage("hangs", hangs, budget=gc.Budget(60), wanted_s=0.5, min_s=0.1, on_timeout=released.set,
                          grace_s=5)
    assert time.monotonic() - started < 5
    assert (result.status, result.data) == ("timeout", {"before": True})
    assert "limit of 0s" in result.detail or "limit of 1s" in result.detail


def test_stages_are_skipped_without_what_they_need_or_without_time() -> None:
    ran: list[str] = []

    def body(deadline: gc.Deadline, data: dict[str, Any]) -> None:
        ran.append("body")

    budget = gc.Budget(30)
    build = gc.StageResult("build-vanilla", "timeout")
    skipped = gc.run_stage("identity", body, budget=budget, wanted_s=10, needs={"build-vanilla": build}, min_s=1)
    assert (skipped.status, skipped.detail) == ("skipped", "needs build-vanilla, which timeout")
    never = gc.run_stage("kv", body, budget=budget, wanted_s=10, needs={"models": None}, min_s=1)
    assert never.detail == "needs models, which did not run"
    late = gc.run_stage("spec", body, budget=budget, wanted_s=60, keep_s=29, min_s=5)
    assert late.status == "skipped" and late.detail.startswith("out of time")
    assert ran == []


def test_stop_servers_of_kills_only_children_running_those_binaries(tmp_path: Path) -> None:
    # a copy: the stage's server binary is its build's own file, another program is another file
    sleeper = tmp_path / "sleeper"
    shutil.copy2(shutil.which("sleep") or "/bin/sleep", sleeper)
    ours = subprocess.Popen(["sh", "-c", f"{sleeper} 30; true"])  # a grandchild, as the bench's servers are
    other = subprocess.Popen(["sleep", "30"])
    time.sleep(0.3)
    try:
        gc.stop_servers_of([sleeper])()
        assert ours.wait(timeout=5) == 0  # its child was killed, so the shell went on
        assert other.poll() is None
    finally:
        for process in (ours, other):
            process.kill()
            process.wait()


def test_first_difference() -> None:
    assert gc.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert gc.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert gc.first_difference([1, 2], [1, 2, 3]) == 2


def test_summarize_spec_rates_acceptance_and_losslessness() -> None:
    def run(tokens: int, ms: float, drafted: int, accepted: int, text: str) -> dict[str, Any]:
        return {"tokens": tokens, "ms": ms, "draft_n": drafted, "draft_n_accepted": accepted, "texts": [text]}

    summary = gc.summarize_spec({
        "plain": [run(100, 1000, 0, 0, "a"), run(100, 1000, 0, 0, "a")],
        "fixed-4": [run(100, 500, 80, 60, "a"), run(100, 500, 80, 60, "a")],
        "adaptive": [run(100, 400, 50, 45, "a"), run(100, 400, 50, 45, "b")],
    })
    assert summary["plain"] == {"tps": 100.0, "acceptance": None, "draft_n": 0, "same_as_plain": True, "runs": 2,
                                "vs_plain": 1.0}
    assert (summary["fixed-4"]["tps"], summary["fixed-4"]["acceptance"], summary["fixed-4"]["vs_plain"]) == (
        200.0, 0.75, 2.0)
    assert summary["adaptive"]["same_as_plain"] is False and summary["adaptive"]["acceptance"] == 0.9
    # with the batch-invariant kernels' plain run, texts are compared with it; speed still with upstream's plain
    with_bi = gc.summarize_spec({"plain": [run(100, 1000, 0, 0, "upstream")], "plain-bi": [run(100, 1250, 0, 0, "a")],
                                 "fixed-4": [run(100, 500, 80, 60, "a")]})
    assert (with_bi["plain"]["same_as_plain"], with_bi["fixed-4"]["same_as_plain"]) == (False, True)
    assert (with_bi["plain-bi"]["vs_plain"], with_bi["fixed-4"]["vs_plain"]) == (0.8, 2.0)


def _report() -> dict[str, Any]:
    stages = [
        gc.StageResult("setup", "ok", 2, 120, data={"nvidia_smi": "NVIDIA H100 80GB HBM3, 81559 MiB, 0 MiB, 580"}),
        gc.StageResult("build-patched", "ok", 250, 330, data={"build_id": "0c1e570-cuda-patched-1", "build_seconds":
                       240.0, "progress": {"stage": "smoke test", "done": 0, "total": 0}}),
        gc.StageResult("build-vanilla", "timeout", 200, 200, "stopped at its limit of 200s",
                       data={"build_id": "0c1e570-cuda-vanilla-2", "progress": {"stage": "compiling", "done": 97,
                                                                               "total": 145}}),
        gc.StageResult("identity", "skipped", detail="needs build-vanilla, which timeout"),
        gc.StageResult("kv", "ok", 40, 75, data={
            "model": "synthetic-8b-q4_0.gguf", "fill_tokens": 4096, "preallocated_note": "fallback | noted",
            "device_memory_source": "NVML, per process",
            "variants": {"on-demand": {"build": "patched", "idle": {"rss_bytes": 300 * MiB, "device_bytes":
                                       4500 * MiB, "kv_reserved_bytes": 4096 * MiB},
                                       "filled": {"rss_bytes": 310 * MiB, "kv_committed_bytes": 512 * MiB}}}}),
        gc.StageResult("spec", "ok", 60, 75, data={
            "target": "t.gguf", "draft": "d.gguf", "reps": 2, "prompts": 3, "n_predict": 128, "best_fixed": "fixed-4",
            "adaptive_vs_best_fixed": 1.05,
            "variants": {"fixed-4": {"tps": 210.5, "vs_plain": 1.4, "acceptance": 0.8, "draft_n": 500,
                                     "same_as_plain": True}}}),
        gc.StageResult("tune-ab", "failed", 30, 100, "bench ab ended partial", data={
            "a_label": "defaults", "b_label": "tuned", "status": "partial", "plan": ["plan for synthetic"],
            "ratios": [{"key": "short.decode_tps", "a_median": 100.0, "b_median": 120.0, "ratios": [1.2, 1.2]}]}),
    ]
    return {"schema": gc.REPORT_SCHEMA, "gpu": "cuda", "created": "2026-12-07T12:00:00+00:00", "budget_s": 480,
            "elapsed_s": 470.0, "status": "incomplete", "source": "path:/tmp/src",
            "device": gc._device_summary({s.name: s for s in stages}),
            "stages": [asdict(s) for s in stages]}


def test_reports_are_one_json_and_one_markdown_with_every_section(tmp_path: Path) -> None:
    json_path, md_path = gc.write_reports(_report(), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu-check.json", "gpu-check.md"]
    assert json.loads(json_path.read_text())["stages"][2]["status"] == "timeout"
    text = md_path.read_text()
    assert text.startswith("# GPU check: cuda on NVIDIA H100 80GB HBM3, 81559 MiB")
    assert "| build-vanilla | timeout | 200 / 200 | stopped at its limit of 200s |" in text
    assert "| vanilla | 0c1e570-cuda-vanilla-2 | – | compiling 97/145 |" in text
    assert "| identity | skipped | 0 / 0 | needs build-vanilla, which timeout |" in text
    assert "| on-demand | patched | 300.0 MiB | 310.0 MiB | 4,500.0 MiB | – | 4,096.0 MiB | 512.0 MiB |" in text
    assert "fallback | noted" in text  # prose, outside a table
    assert "| fixed-4 | 210.5 | 1.400 | 0.800 | 500 | yes |" in text
    assert "Adaptive over the best fixed length (fixed-4): x1.050." in text
    assert "| short | decode | 100.0 | 120.0 | ×1.200 [1.200–1.200] | better |" in text  # the bench's own rows
    assert "```\nplan for synthetic\n```" in text


def _tokenizer_source(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "vocab.gguf", tokens=[f"t{i}" for i in range(300)], tokenizer="gpt2",
                      extra={"tokenizer.chat_template": "{{ messages }}"})


def test_synthetic_llama_has_the_shape_asked_for_and_the_tokenizer_given(tmp_path: Path) -> None:
    shape = gcm.SHAPES["tiny"]
    path = gcm.write_synthetic_llama(tmp_path / "tiny.gguf", shape, _tokenizer_source(tmp_path), seed=1)
    info = inspect_model(path)
    assert (info.architecture, info.n_layers, info.n_embd, info.n_head, sorted(set(info.n_head_kv))) == (
        "llama", shape.n_layers, shape.n_embd, shape.n_head, [shape.n_head_kv])
    assert (info.n_ctx_train, info.vocab.n_tokens if info.vocab else None, info.chat_template) == (
        shape.n_ctx_train, 300, "{{ messages }}")
    assert info.n_params == shape.parameters(300)
    reader = GGUFReader(path)
    q = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight")
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert q.tensor_type == GGMLQuantizationType.Q4_0 and [int(n) for n in down.shape] == [shape.n_ff, shape.n_embd]
    # weights of standard deviation 1/sqrt(fan-in): activations keep their size through the layers
    for tensor, fan_in in ((q, shape.n_embd), (down, shape.n_ff)):
        values = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        assert abs(values.std() * fan_in**0.5 - 1) < 0.1
    layer_0 = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert not np.array_equal(np.asarray(layer_0.data), np.asarray(q.data))  # layers are not copies of one another
    square = gcm.LlamaShape(n_layers=1, n_embd=256, n_head=4, n_head_kv=2, n_ff=256, n_ctx_train=512)  # one pool
    square_model = gcm.write_synthetic_llama(tmp_path / "square.gguf", square, tmp_path / "vocab.gguf")
    assert inspect_model(square_model).n_layers == 1
    with pytest.raises(ValueError, match="multiples of 32"):
        gcm.write_synthetic_llama(tmp_path / "bad.gguf", gcm.LlamaShape(1, 100, 4, 2, 256, 512),
                                  tmp_path / "vocab.gguf")


def test_truncated_requantized_and_f16_copies_keep_the_weights(tmp_path: Path) -> None:
    original = gcm.write_synthetic_llama(tmp_path / "tiny.gguf", gcm.SHAPES["tiny"], _tokenizer_source(tmp_path))
    f16 = gcm.dequantize_to_f16(original, tmp_path / "tiny-f16.gguf")
    cut = gcm.truncate_requantize(f16, tmp_path / "tiny-1layer.gguf", 1)
    assert inspect_model(cut).n_layers == 1 and inspect_model(f16).n_layers == 2
    assert "(first 1 layers, Q4_0)" in inspect_model(cut).name

    def weights(path: Path, name: str) -> np.ndarray:
        tensor = next(t for t in GGUFReader(path).tensors if t.name == name)
        return np.asarray(quants.dequantize(np.asarray(tensor.data), tensor.tensor_type), dtype=np.float32)

    names = {t.name for t in GGUFReader(cut).tensors}
    assert "blk.0.attn_q.weight" in names and not any(n.startswith("blk.1.") for n in names)
    before = weights(original, "blk.0.attn_q.weight")
    assert np.allclose(weights(f16, "blk.0.attn_q.weight"), before, rtol=1e-3, atol=1e-6)
    # Q4_0 again from values that were Q4_0: where a block's largest code is not the one the scale came from the
    # grid moves, so the error is a fraction of a step, not zero
    error = np.linalg.norm(weights(cut, "blk.0.attn_q.weight") - before) / np.linalg.norm(before)
    assert 0 <= error < 0.1
    with pytest.raises(ValueError, match="has 2 layers; cannot keep 3"):
        gcm.truncate_requantize(original, tmp_path / "x.gguf", 3)


def test_layers_that_fit_grow_with_the_budget(tmp_path: Path) -> None:
    model = gcm.write_synthetic_llama(tmp_path / "tiny.gguf", gcm.SHAPES["tiny"], _tokenizer_source(tmp_path))
    assert gcm.q4_0_layers_that_fit(model, 1024) == 0
    assert gcm.q4_0_layers_that_fit(model, 64 * MiB) == 2
    shared = 4 * MiB + 2 * 300 * 256 // 32 * 18 + 256 * 4  # header allowance, token_embd + output, norm
    per_layer = (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512) // 32 * 18 + 2 * 256 * 4  # matrices, F32 norms
    assert gcm.q4_0_layers_that_fit(model, shared + per_layer) == 1
    assert gcm.q4_0_layers_that_fit(model, shared + per_layer - 1) == 0


def test_travelling_tree_counts_what_git_would_send(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "prepared").mkdir(parents=True)
    (repo / ".gitignore").write_text("/ignored/\n")
    (repo / "tracked.txt").write_bytes(b"x" * 100)
    (repo / "untracked.txt").write_bytes(b"y" * 10)
    (repo / "ignored").mkdir()
    (repo / "ignored" / "big").write_bytes(b"z" * 1000)
    (repo / "prepared" / "model").write_bytes(b"m" * 500)
    for args in (["init", "-q"], ["add", "tracked.txt", ".gitignore"]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    assert gc.travelling_tree_bytes(repo, repo / "prepared") == 100 + 10 + len("/ignored/\n")
    assert gc.folder_bytes(repo / "prepared") == 500


@pytest.mark.slow
def test_a_tiny_synthetic_model_loads_in_the_real_server_and_answers(
    patched_build: InstalledBuild, smollm2_gguf: Path, tmp_path: Path
) -> None:
    model = gcm.write_synthetic_llama(tmp_path / "tiny.gguf", gcm.SHAPES["tiny"], smollm2_gguf)
    config = serve.ServerConfig(binary=patched_build.bin("llama-server"), model=model,
                                args=("-c", "512", "-np", "1", "-t", "2"), log_file=tmp_path / "server.log")
    with serve.start_server(config, timeout=120) as server:
        result = serve.complete(server, gc.PROMPTS[0], 8, return_tokens=True)
        assert len(result["tokens"]) == 8 and result["timings"]["predicted_n"] == 8
        assert server.get_json("/props")["default_generation_settings"]["n_ctx"] == 512
