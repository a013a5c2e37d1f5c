"""Shared fixtures: an isolated velollm home, the real demo models, and real builds of llama.cpp.

The builds are session-scoped: the patched build (full series) is made once per test run and
reused by every test that needs a server. ``VELOLLM_TEST_HOME`` points the session at a persistent
home so developers can reuse builds between runs; CI leaves it unset and builds from scratch.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fake_ollama_install import FakeOllamaInstall, StoredModel, add_model, make_fake_install
from velollm_patch import demo_models, hardware, proc, serve
from velollm_patch.build import BuildOptions, plan_build, run_build
from velollm_patch.builds import InstalledBuild
from velollm_patch.paths import Paths, get_paths


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background of a non-interactive shell (`cmd &`, as CI runners may) inherits
    # SIGINT ignored, and an ignored signal stays ignored across exec: the CLI processes that tests stop
    # with SIGINT (Ctrl-C) would never see it. Handling it here lets children start with the default.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def velollm_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = Path(os.environ.get("VELOLLM_TEST_HOME") or tmp_path_factory.mktemp("velollm-home"))
    previous = os.environ.get("VELOLLM_HOME")
    os.environ["VELOLLM_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("VELOLLM_HOME", None)
    else:
        os.environ["VELOLLM_HOME"] = previous


@pytest.fixture(scope="session")
def paths(velollm_home: Path) -> Paths:
    return get_paths()


@pytest.fixture(scope="session")
def live_hardware(paths: Paths) -> hardware.HardwareInfo:
    return hardware.detect(build_dir=paths.cache)


@pytest.fixture(scope="session")
def smollm2_gguf(paths: Paths) -> Path:
    return demo_models.fetch_model(paths, "smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_gguf(paths: Paths) -> Path:
    return demo_models.fetch_model(paths, "gemma3-270m")


@pytest.fixture(scope="session")
def patched_build(paths: Paths, live_hardware: hardware.HardwareInfo, smollm2_gguf: Path) -> InstalledBuild:
    """The CPU build with the whole patch series, installed and current."""
    plan = plan_build(BuildOptions(gpu="cpu", smoke_model=smollm2_gguf, wait=3600), live_hardware, paths)
    return run_build(plan, live_hardware, paths)


@pytest.fixture(scope="session")
def vanilla_build(
    paths: Paths, live_hardware: hardware.HardwareInfo, smollm2_gguf: Path, patched_build: InstalledBuild
) -> InstalledBuild:
    """Upstream at the same pin, no patches; built after the patched one so ccache shares objects."""
    options = BuildOptions(gpu="cpu", patches="none", smoke_model=smollm2_gguf, make_current=False, wait=3600)
    return run_build(plan_build(options, live_hardware, paths), live_hardware, paths)


@pytest.fixture(scope="session")
def patched_server(patched_build: InstalledBuild) -> Path:
    return patched_build.bin("llama-server")


@pytest.fixture(scope="session")
def vanilla_server(vanilla_build: InstalledBuild) -> Path:
    return vanilla_build.bin("llama-server")


def _requantized(patched_build: InstalledBuild, source: Path, out: Path, ftype: str) -> Path:
    """``source`` converted to ``ftype`` by llama-quantize, once (kept in the models directory)."""
    if not out.is_file():
        partial = out.with_suffix(".partial")
        quantize = patched_build.bin("llama-quantize")
        proc.run([str(quantize), "--allow-requantize", str(source), str(partial), ftype])
        partial.replace(out)
    return out


@pytest.fixture(scope="session")
def smollm2_f16_gguf(patched_build: InstalledBuild, smollm2_gguf: Path, paths: Paths) -> Path:
    """SmolLM2-135M as F16, requantized from the Q4_1 demo model: the same weights as the Q4_1 model, so the
    pair is a speculative-decoding target (F16) and draft (Q4_1) with high acceptance."""
    return _requantized(patched_build, smollm2_gguf, paths.models / "SmolLM2-135M-Instruct.F16.gguf", "F16")


@pytest.fixture(scope="session")
def smollm2_f32_gguf(patched_build: InstalledBuild, smollm2_gguf: Path, paths: Paths) -> Path:
    """SmolLM2-135M as F32 from the Q4_1 demo model: a target whose Q4_1 draft has the same weights."""
    return _requantized(patched_build, smollm2_gguf, paths.models / "SmolLM2-135M-Instruct.F32.gguf", "F32")


@pytest.fixture(scope="session")
def smollm2_ollama_store(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> StoredModel:
    """SmolLM2 as ``smollm2:135m`` in an Ollama model store of its own, written as ``ollama create`` writes it
    (see tests/fake_ollama_install.py). Shared by the session: a test that breaks a store makes its own."""
    return add_model(tmp_path_factory.mktemp("ollama-store"), "smollm2:135m", smollm2_gguf)


@pytest.fixture(scope="session")
def fake_ollama_install(
    tmp_path_factory: pytest.TempPathFactory, vanilla_server: Path, smollm2_gguf: Path
) -> FakeOllamaInstall:
    """A Linux Ollama 0.33 install whose bundled llama-server is the upstream build and whose store holds
    ``smollm2:135m`` (see tests/fake_ollama_install.py). Shared by the session: a test that changes it (an
    install-server) makes its own with ``make_fake_install``."""
    root = tmp_path_factory.mktemp("ollama-install")
    return make_fake_install(root, vanilla_server, [("smollm2:135m", smollm2_gguf)])


def _server_starter(binary: Path, tmp_path: Path, name: str) -> Iterator[Callable[..., serve.RunningServer]]:
    """Start llama-servers of ``binary`` on 127.0.0.1 (metrics on, slot erase allowed, no warm-up); they are
    all stopped when the test ends. Call it as ``start(model, *args, env={...})``."""
    started: list[serve.RunningServer] = []

    def start(model: Path, *args: str, env: dict[str, str] | None = None) -> serve.RunningServer:
        label = f"{name}-{len(started)}"
        slot_dir = tmp_path / f"{label}-slots"
        slot_dir.mkdir()
        config = serve.ServerConfig(
            binary=binary,
            model=model,
            args=("--metrics", "--slot-save-path", f"{slot_dir}{os.sep}", "--no-warmup", "-t", "2", *args),
            env=env or {},
            log_file=tmp_path / f"{label}.log",
        )
        running = serve.start_server(config, timeout=300)  # a readiness wait, not a performance threshold
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def start_patched_server(tmp_path: Path, patched_server: Path) -> Iterator[Callable[..., serve.RunningServer]]:
    """Start patched llama-servers: see _server_starter."""
    yield from _server_starter(patched_server, tmp_path, "patched")


@pytest.fixture
def start_vanilla_server(tmp_path: Path, vanilla_server: Path) -> Iterator[Callable[..., serve.RunningServer]]:
    """Start upstream (unpatched) llama-servers: see _server_starter."""
    yield from _server_starter(vanilla_server, tmp_path, "vanilla")
