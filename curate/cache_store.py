"""A folder of Parquet shards holding the results of a costly per-row computation. No Beam import.

One folder per settings fingerprint (``<root>/<kind>/<fingerprint>/``), rows keyed by a
content hash. Why shards written as the stage runs rather than a file moved in at the end:
a run that dies after the costly stage (or half way through it) keeps what it computed,
and the rerun reads it. Each shard is written under a dot-name and renamed into place, so a
reader never sees half a file; a shard holds whole rows only.

    staged-<run>-<n>.parquet   written while a run is going (complete files, readable at once)
    part-<run>.parquet         the same rows merged by ``compact`` once the run succeeded

Rows with the same key are the same result (same settings, same text), so a reader takes the
first it meets; a retried bundle that writes a key twice does no harm.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from curate import storage

log = logging.getLogger("curate")
KEY = "key"
STAGED = "staged-"


def files(folder: str | None) -> list[str]:
    """Every complete shard in ``folder`` (committed and staged), sorted; [] if none."""
    if not folder or not storage.isdir(folder):
        return []
    return [p for p in storage.glob(storage.join(folder, "*.parquet")) if not os.path.basename(p).startswith(".")]


def _write(table: pa.Table, folder: str, name: str) -> str:
    """A whole file or nothing: a dot-name renamed into place on a disk; one object PUT on a store
    (an object appears whole, and a store has no rename)."""
    final = storage.join(folder, name)
    if storage.is_remote(folder):
        with storage.open_file(final, "wb") as fh:
            pq.write_table(table, fh)
        return final
    storage.makedirs(folder)
    tmp = os.path.join(folder, "." + name)
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def write_shard(folder: str, rows: list[dict], schema: pa.Schema, run_id: str) -> str | None:
    """Write ``rows`` as one staged shard, atomically; returns its path (None when empty)."""
    if not rows:
        return None
    name = f"{STAGED}{run_id}-{uuid.uuid4().hex[:12]}.parquet"
    return _write(pa.Table.from_pylist(rows, schema=schema), folder, name)


def compact(folder: str | None, run_id: str) -> int:
    """Merge this run's staged shards into one ``part-<run>.parquet``; returns the rows merged.

    Only this run's shards: another run sharing the cache may be reading its own."""
    mine = [p for p in files(folder) if os.path.basename(p).startswith(f"{STAGED}{run_id}-")]
    if not mine:
        return 0
    table = pa.concat_tables([storage.read_table(p) for p in mine], promote_options="default")
    _write(table, folder, f"part-{run_id}.parquet")
    for p in mine:
        storage.remove(p)
    return table.num_rows


def fingerprint(spec: dict) -> str:
    """A short stable hash of the settings a cached result depends on (the cache folder's name)."""
    text = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


class ShardWriter:
    """Buffers result rows and writes a shard every ``rows`` rows or ``seconds`` seconds, so an
    interrupted run loses at most that much work."""

    def __init__(self, folder: str, schema: pa.Schema, run_id: str, rows: int = 64, seconds: float = 30.0):
        self.folder, self.schema, self.run_id = folder, schema, run_id
        self.rows, self.seconds = rows, seconds
        self.buffer: list[dict] = []
        self.last = time.monotonic()
        self.written = 0

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.rows or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            write_shard(self.folder, self.buffer, self.schema, self.run_id)
            self.written += len(self.buffer)
            self.buffer = []
        self.last = time.monotonic()
