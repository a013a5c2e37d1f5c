"""Small file helpers shared by the modules that download, verify, read and install things."""

from __future__ import annotations

import hashlib
from pathlib import Path

from velollm_patch.errors import VelollmError


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_limited(path: Path, limit: int, what: str) -> bytes:
    """The bytes of ``path``, which the user names as ``what`` (a Modelfile, ...): one larger than ``limit``
    is refused after reading ``limit`` bytes, so a device such as /dev/zero or a mistaken multi-GB file
    costs a bounded read, not all memory."""
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise VelollmError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise VelollmError(f"{path} is larger than {limit:,} bytes, which no {what} is: check the path")
    return data
