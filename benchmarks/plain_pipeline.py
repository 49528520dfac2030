"""What a user would write instead of curate for the non-model path: one process, whole columns.

Read every ``*.jsonl`` shard with pyarrow's JSON reader, drop exact duplicates (a 64-bit hash of
the normalized prompt and response, first source then first row kept), drop near duplicates
(curate's own numpy MinHash signatures, the same bands and rows, LSH by sorting each band's
keys, candidate pairs verified by estimated Jaccard, scipy's connected components, the longest
response kept), select ``random`` 25% of what is left, write Parquet. The same steps and keep
rules as ``curate run`` with exact and near dedup and ``random``, so the counts agree to within
the rows whose ties the two break differently (row ids differ). It is the baseline of
``benchmarks.throughput``: ``python -m benchmarks.plain_pipeline POOL_FOLDER OUT_FILE``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curate.dedup.minhash import signatures
from curate.dedup.near import band_keys, optimal_bands_rows
from curate.records import normalize_text


def read(folder: str) -> pa.Table:
    tables = []
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        t = pajson.read_json(path)
        tables.append(t.append_column("source", pa.array([os.path.basename(path)[:-6]] * len(t))))
    return pa.concat_tables(tables, promote_options="default")


def exact_keep(prompts: list[str], responses: list[str]) -> np.ndarray:
    """Boolean mask: the first row of each (normalized prompt, response) group."""
    keys = np.fromiter((int.from_bytes(hashlib.blake2b(
        (normalize_text(p) + "\x1f" + normalize_text(r)).encode(), digest_size=8).digest(), "little")
        for p, r in zip(prompts, responses)), dtype=np.uint64, count=len(prompts))
    _, first = np.unique(keys, return_index=True)
    keep = np.zeros(len(keys), bool)
    keep[first] = True
    return keep


def near_keep(texts: list[str], response_len: np.ndarray, threshold: float = 0.8, num_perm: int = 128,
              seed: int = 0) -> np.ndarray:
    """Boolean mask: one row per near-duplicate component (the longest response, then the first)."""
    n = len(texts)
    sigs = signatures(texts, num_perm, seed, 5, "word")
    bands, rows = optimal_bands_rows(threshold, num_perm)
    keys = band_keys(sigs, bands, rows)
    src, dst = [], []
    for b in range(bands):  # a bucket's members are a run of equal keys after sorting
        order = np.argsort(keys[:, b], kind="stable")
        k = keys[order, b]
        start = np.concatenate([[True], k[1:] != k[:-1]])
        head = order[np.maximum.accumulate(np.where(start, np.arange(n), 0))]
        pair = ~start
        src.append(head[pair])
        dst.append(order[pair])
    src, dst = np.concatenate(src), np.concatenate(dst)
    if len(src):
        pairs = np.unique(np.stack([src, dst], 1), axis=0)
        ok = (sigs[pairs[:, 0]] == sigs[pairs[:, 1]]).mean(axis=1) >= threshold
        src, dst = pairs[ok, 0], pairs[ok, 1]
    graph = coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    order = np.lexsort((np.arange(n), -response_len, label))  # by component, longest first
    first = np.concatenate([[True], label[order][1:] != label[order][:-1]])
    keep = np.zeros(n, bool)
    keep[order[first]] = True
    return keep


def main(folder: str, out: str, fraction: float = 0.25, seed: int = 0) -> dict:
    t = read(folder)
    instruction = t.column("instruction").to_pylist()
    extra = t.column("input").to_pylist() if "input" in t.column_names else [""] * len(t)
    response = t.column("output").to_pylist()
    prompt = [i + ("\n\n" + x if x and x.strip() else "") for i, x in zip(instruction, extra)]
    keep_exact = exact_keep(prompt, response)
    idx = np.flatnonzero(keep_exact)
    lengths = np.array([len(response[i]) for i in idx])
    keep_near = near_keep([prompt[i] + "\n" + response[i] for i in idx], lengths, seed=seed)
    left = idx[keep_near]
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(left, int(round(fraction * len(left))), replace=False))
    pq.write_table(t.take(pa.array(chosen)), out)
    return {"rows_in": len(t), "exact_duplicate": int((~keep_exact).sum()),
            "near_duplicate": int((~keep_near).sum()), "selected": len(chosen)}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
