"""Reading a finished run's folder (annotated/, selected/, embeddings/, manifest.json) for
``curate select``, ``curate export``, ``curate report`` and the notebook."""
from __future__ import annotations

import json
import logging
import os

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


def selected_columns(folder: str) -> list[str]:
    """The columns of the run's selected/: from its manifest (runs since schema 2.0 record them),
    else from its first file, else every column (an empty selected/ of an older run)."""
    listed = manifest(folder).get("outputs", {}).get("columns", {}).get("selected")
    if listed:
        return listed
    try:
        return parquet_columns(folder, "selected")
    except (RunError, OSError):  # no selected/ Parquet files
        from curate.schema import SELECTED

        return SELECTED.names


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


def _require_embeddings(folder: str) -> None:
    if not has_embeddings(folder):
        raise RunError(f"{folder}: no embeddings/ (the run had the embed stage off)")


def embedding_ids(folder: str) -> pa.Array:
    """The ids that have an embedding (the id column only)."""
    _require_embeddings(folder)
    return _parquet(folder, "embeddings", ["id"]).column("id").combine_chunks()


def embeddings(folder: str, ids: list[str]) -> np.ndarray:
    """The run's embeddings for ``ids``, in that order (RunError when a run has none or misses ids).
    Read one file at a time, keeping only the rows asked for: a report's map wants 5,000 of a
    million rows, not a 1.5 GB matrix."""
    import pyarrow.compute as pc

    _require_embeddings(folder)
    want = pa.array(sorted(set(ids)), pa.string())
    where: dict[str, np.ndarray] = {}
    dim = 0
    for part in parquet_parts(folder, "embeddings", ["id", "embedding"]):
        dim = part.schema.field("embedding").type.list_size
        hit = part.filter(pc.is_in(part.column("id"), value_set=want))
        if hit.num_rows:
            col = hit.column("embedding").combine_chunks()
            rows = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
            where.update(zip(hit.column("id").to_pylist(), rows.astype(np.float32)))
    missing = [rid for rid in ids if rid not in where]
    if missing:
        raise RunError(f"{folder}: embeddings/ lacks {len(missing)} of the ids (first: {missing[0]})")
    if not ids:
        return np.zeros((0, dim), np.float32)
    return np.stack([where[rid] for rid in ids])


def read_rows(path: str) -> list[dict]:
    """Instruction rows (id, source, prompt, response, messages) from a finished run (its
    annotated/ rows that no dedup stage dropped), a ``curate select`` folder or run's selected/,
    or a json / jsonl / parquet file of Alpaca or chat rows (bad rows are skipped with a count)."""
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "annotated")):
            import pyarrow.compute as pc

            from curate.select.features import DEDUP_REASONS

            t = annotated(path, ["id", "source", "prompt", "response", "messages", "drop_reason"])
            keep = pc.fill_null(pc.invert(pc.is_in(t.column("drop_reason"), pa.array(DEDUP_REASONS))), True)
            return t.filter(keep).to_pylist()
        raise RunError(f"{path}: not a finished curate run (no annotated/)")
    from curate.io import SourceReadError, detect_format, iter_file
    from curate.records import RowSpec, convert

    try:
        fmt = detect_format(path, "auto")
    except SourceReadError as err:
        raise RunError(str(err)) from None
    spec, rows, bad = RowSpec(source=os.path.splitext(os.path.basename(path))[0]), [], 0
    for raw in iter_file(path, fmt):
        kind, item = ("reject", None) if raw.bad_reason else convert(raw.value, spec, path, raw.row_number)
        if kind == "record":
            rows.append(item)
        else:
            bad += 1
    if bad:
        logging.getLogger("curate").warning("%s: %d rows could not be read and were skipped", path, bad)
    return rows
