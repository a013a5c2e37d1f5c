"""The reports of the CI lanes: a JSON file for tools and a Markdown file for people, side by side."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from velollm_patch.paths import Paths, ensure_dir


def stamped(paths: Paths, name: str) -> Path:
    """``<data>/ci/<name>-<local time>.json``: a lane's report that later runs do not overwrite."""
    return paths.ci_reports / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def write_pair(json_file: Path, report: Mapping[str, Any], markdown: str) -> tuple[Path, Path]:
    """``json_file`` and the same name with ``.md``, each replaced whole: a reader (a long run's report is read
    while it goes on) never sees half a file."""
    ensure_dir(json_file.parent)
    md_file = json_file.with_suffix(".md")
    for path, text in ((json_file, json.dumps(report, indent=2, default=str) + "\n"), (md_file, markdown)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return json_file, md_file
