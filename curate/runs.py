"""Reading a finished run's folder (annotated/, selected/, embeddings/, manifest.json) for
``curate select``, ``curate export``, ``curate report`` and the notebook."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from curate import storage
from curate.errors import CurateError


class RunError(CurateError):
    """The folder is not a finished run, or lacks what was asked for (one-line message)."""


def _files(folder: str, name: str) -> list[str]:
    finished(folder)
    files = storage.glob(storage.join(folder, name, "*.parquet"))
    if not files:
        raise RunError(f"{folder}: no {name}/ Parquet files (is it a finished curate run?)")
    return files


def _parquet(folder: str, name: str, columns: list[str] | None = None) -> pa.Table:
    tables = list(parquet_parts(folder, name, columns))
    return pa.concat_tables([t for t in tables if t.num_rows] or tables[:1])


def parquet_parts(folder: str, name: str, columns: list[str] | None = None):
    """The tables of ``name``/ one file at a time (``columns`` only)."""
    for f in _files(folder, name):
        yield storage.read_table(f, columns)


def parquet_columns(folder: str, name: str) -> list[str]:
    """The column names of ``name``/ (from its first file's schema, no data read)."""
    import pyarrow.parquet as pq

    with storage.open_file(_files(folder, name)[0], "rb") as fh:
        return pq.read_schema(fh).names


def finished(folder: str) -> str:
    """The path of the run's manifest.json; a job writes it last, so a folder without it (a run
    that crashed or is still writing) is refused, whatever else it holds."""
    path = storage.join(folder, "manifest.json")
    if not storage.isfile(path):
        raise RunError(f"{folder}: no manifest.json (not a finished curate run)")
    return path


def manifest(folder: str) -> dict:
    with storage.open_file(finished(folder), "r", encoding="utf-8") as fh:
        return json.load(fh)


def annotated(folder: str, columns: list[str] | None = None) -> pa.Table:
    return _parquet(folder, "annotated", columns)


def selected(folder: str) -> pa.Table:
    """selected/ in rank order (rows without a rank last, by id)."""
    t = _parquet(folder, "selected")
    if not t.num_rows:
        return t
    return t.sort_by([("rank", "ascending"), ("id", "ascending")])


def has_embeddings(folder: str) -> bool:
    return bool(storage.glob(storage.join(folder, "embeddings", "*.parquet")))


def embedding_matrix(folder: str) -> tuple[dict[str, int], np.ndarray]:
    """All of the run's embeddings: (id -> row, float32 matrix)."""
    if not has_embeddings(folder):
        raise RunError(f"{folder}: no embeddings/ (the run had the embed stage off)")
    t = _parquet(folder, "embeddings", ["id", "embedding"])
    col = t.column("embedding").combine_chunks()
    matrix = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    return {rid: i for i, rid in enumerate(t.column("id").to_pylist())}, matrix.astype(np.float32)


def embeddings(folder: str, ids: list[str]) -> np.ndarray:
    """The run's embeddings for ``ids``, in that order (RunError when a run has none or misses ids)."""
    where, matrix = embedding_matrix(folder)
    missing = [rid for rid in ids if rid not in where]
    if missing:
        raise RunError(f"{folder}: embeddings/ lacks {len(missing)} of the ids (first: {missing[0]})")
    return matrix[[where[rid] for rid in ids]]
