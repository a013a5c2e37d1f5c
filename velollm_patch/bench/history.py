"""The bench history: one SQLite row per saved run or A/B, so `bench history` can list past
measurements (and where their result files are) without opening every JSON file."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velollm_patch.bench.metrics import split_key
from velollm_patch.bench.runner import ABResult, RunResult
from velollm_patch.errors import VelollmError

DB_NAME = "history.sqlite"
SCHEMA_VERSION = 1

_CREATE = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    path TEXT NOT NULL,
    summary TEXT NOT NULL,
    metrics TEXT NOT NULL
)
"""
_COLUMNS = ("id", "created", "kind", "target", "model", "status", "path", "summary", "metrics")


@dataclass(frozen=True)
class HistoryEntry:
    """``metrics``: the headline numbers of a run, or the median B/A ratios of an A/B."""

    id: str
    created: str
    kind: str
    target: str
    model: str
    status: str
    path: str
    summary: str
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _COLUMNS}


@contextmanager
def _connect(db: Path) -> Iterator[sqlite3.Connection]:
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Several benches may finish at once (one per terminal); wait for the writer instead of failing.
        with closing(sqlite3.connect(db, timeout=30)) as conn, conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise VelollmError(f"{db} was written by a newer velollm-patch; upgrade to read it")
            conn.execute(_CREATE)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            yield conn
    except sqlite3.Error as exc:
        raise VelollmError(f"bench history {db} cannot be used: {exc}") from exc


def record(db: Path, entry: HistoryEntry) -> None:
    with _connect(db) as conn:
        conn.execute(
            f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
            (entry.id, entry.created, entry.kind, entry.target, entry.model, entry.status, entry.path,
             entry.summary, json.dumps(entry.metrics)),
        )


def entries(db: Path, limit: int | None = None) -> list[HistoryEntry]:
    """Newest first."""
    if not db.is_file():
        return []
    query = f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY created DESC, id DESC"
    params: tuple[int, ...] = ()
    if limit is not None:
        query += " LIMIT ?"
        params = (limit,)
    with _connect(db) as conn:
        rows = conn.execute(query, params).fetchall()
    return [
        HistoryEntry(**dict(zip(_COLUMNS[:-1], row[:-1], strict=True)),
                     metrics={str(k): float(v) for k, v in json.loads(row[-1]).items()})
        for row in rows
    ]


def _model_name(model: str | None) -> str:
    return Path(model).name if model and "/" in model else (model or "")


def _is_decode(key: str) -> bool:
    """The decode rate of a one-point scenario: what the one-line summaries show."""
    return key.endswith(".decode_tps") and "@" not in key


def entry_for(result: RunResult | ABResult, path: Path) -> HistoryEntry:
    if isinstance(result, RunResult):
        headline = result.headline()
        decode = [f"{split_key(k)[0]} {v:.1f}" for k, v in headline.items() if _is_decode(k)]
        return HistoryEntry(
            id=result.id, created=result.created, kind="run", target=result.target.label,
            model=_model_name(result.target.model), status=result.status, path=str(path),
            summary=("decode tok/s: " + ", ".join(decode)) if decode else "no decode measured",
            metrics=headline,
        )
    ratios = {r.key: r.stats.median for r in result.ratios()}
    decode = [f"{split_key(k)[0]} ×{v:.3f}" for k, v in ratios.items() if _is_decode(k)]
    rounds = sum(1 for r in result.rounds if r.complete)
    return HistoryEntry(
        id=result.id, created=result.created, kind="ab", target=f"{result.a.label} vs {result.b.label}",
        model=_model_name(result.b.model or result.a.model), status=result.status, path=str(path),
        summary=f"{rounds} rounds; decode B/A: " + (", ".join(decode) if decode else "none measured"),
        metrics=ratios,
    )
