"""A row's 64-bit locator and the compact forms the batch path moves between steps.

A locator is ``unit << SHIFT | place``: the read unit (a piece of an input file, numbered when the
graph is built) and the row's place among the rows that unit yields, which are the same on every
read. Sets of locators travel as sorted int64 arrays; batches of text as compressed Arrow IPC.
"""
from __future__ import annotations

import zlib
from collections import defaultdict

import numpy as np
import pyarrow as pa

SHIFT = 32  # a locator is unit << SHIFT | the row's place among the unit's rows


def chunks(items, size: int):
    """Lists of ``size`` items (the last one shorter) from any iterable."""
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def positions_by_shard(shards) -> list[tuple[int, np.ndarray]]:
    """(shard, positions) for each shard present in ``shards`` (one shard number per item), the
    positions in their order: how a batch's arrays are cut into one element per shard."""
    shards = np.asarray(shards, dtype=np.int64)
    order = np.argsort(shards, kind="stable")
    present, starts = np.unique(shards[order], return_index=True)
    return [(int(s), part) for s, part in zip(present, np.split(order, starts[1:]))]


def stable_shard(text: str, shards: int) -> int:
    """A shard from the text alone (Python's ``hash`` is salted per process)."""
    return zlib.crc32(text.encode("utf-8")) % shards


def by_unit(pairs) -> list[tuple[int, list]]:
    """(loc, value) pairs -> (unit, [(loc, value), ...]) elements, one per unit: Apply joins by unit."""
    out = defaultdict(list)
    for loc, value in pairs:
        out[int(loc) >> SHIFT].append((int(loc), value))
    return list(out.items())


def member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Which of ``values`` are in ``sorted_set`` (sorted, distinct)."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def sorted_side_input(fn, values) -> np.ndarray:
    """A side input's list of locator arrays as one sorted array, built once per list (the runner
    hands the same list to each element of a bundle). Arrays, not one locator per element: the
    in-process runner encodes, and measures the size of, a side input element by element."""
    if fn._sorted_cache[0] is not values:
        fn._sorted_cache = (values, sorted_union(values))
    return fn._sorted_cache[1]


def sorted_union(parts) -> np.ndarray:
    """The distinct locators of some locator arrays, sorted (``member``'s set)."""
    parts = [np.asarray(v, dtype=np.int64).ravel() for v in parts]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def pack(table: pa.Table) -> bytes:
    """A table as zstd-compressed Arrow IPC: the near text waits in the runner's memory from Scan
    until the candidates' signatures are computed, at about a third of its size."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def unpack(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()
