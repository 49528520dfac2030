"""Semantic dedup (SemDeDup) inside one k-means cluster. No Beam.

Rows whose cosine similarity is >= 1 - eps are linked; each connected component
is a duplicate group and exactly one member is kept (never both sides dropped,
unlike distilabel's EmbeddingDedup or SemDeDup's released code). Keep rules:

- ``least_similar_to_centroid`` (SemDeDup's default: the least prototypical copy),
- ``most_similar_to_centroid``,
- ``longest_response``;
ties broken by the smallest id. Others get ``semantic_dup_of`` and
``drop_reason = semantic_duplicate``.

Similarities are computed in square tiles of ``block`` rows, so memory stays
bounded (block x block floats) whatever the cluster size.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from curate.columns import Column, StageColumns
from curate.dedup import keep_one
from curate.dedup.near import UnionFind

COLUMNS = StageColumns("dedup.semantic", ("dedup.semantic.enabled", "cluster.enabled", "embed.enabled"), (
    Column("semantic_dup_of", pa.string(),
           "id of the row kept in place of this semantic duplicate (SemDeDup), else null"),
))

KEEP_RULES = ("least_similar_to_centroid", "most_similar_to_centroid", "longest_response")
SWEEP_EPS = (0.005, 0.01, 0.02, 0.05, 0.1)


def similar_pairs(x: np.ndarray, threshold: float, block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine) for i < j with cosine >= threshold, tile by tile."""
    n = len(x)
    out_i, out_j, out_s = [], [], []
    for a in range(0, n, block):
        xa = x[a:a + block]
        for b in range(a, n, block):
            sims = xa @ x[b:b + block].T
            i, j = np.nonzero(sims >= threshold)
            gi, gj = i + a, j + b
            keep = gi < gj
            out_i.append(gi[keep])
            out_j.append(gj[keep])
            out_s.append(sims[i[keep], j[keep]])
    if not out_i:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)


def _groups(n: int, i: np.ndarray, j: np.ndarray) -> list[list[int]]:
    uf = UnionFind()
    for a, b in zip(i.tolist(), j.tolist()):
        uf.union(f"{a:012d}", f"{b:012d}")
    comps: dict[str, list[int]] = {}
    for node, root in uf.clusters().items():
        comps.setdefault(root, []).append(int(node))
    return [sorted(c) for c in comps.values() if len(c) > 1]


def _sweep(n: int, i: np.ndarray, j: np.ndarray, s: np.ndarray, eps_list) -> dict[float, int]:
    out = {}
    for eps in eps_list:
        m = s >= 1 - eps
        out[eps] = sum(len(g) - 1 for g in _groups(n, i[m], j[m]))
    return out


def removed_per_eps(x: np.ndarray, eps_list=SWEEP_EPS, block: int = 2048) -> dict[float, int]:
    """How many rows each eps would remove (group members beyond the one kept)."""
    return _sweep(len(x), *similar_pairs(x, 1 - max(eps_list), block), eps_list)


def _keep_key(record: dict, rule: str) -> tuple:
    if rule == "least_similar_to_centroid":
        return (record["cluster_sim"], record["id"])
    if rule == "most_similar_to_centroid":
        return (-record["cluster_sim"], record["id"])
    return (-len(record["response"]), record["id"])


def dedup_cluster(records: list[dict], x: np.ndarray, eps: float | None, keep: str = "least_similar_to_centroid",
                  eps_list=SWEEP_EPS, block: int = 2048) -> tuple[list[dict], dict[float, int]]:
    """(records ordered by id, rows each sweep eps would remove); with ``eps`` set, all but one
    member of each group at that eps is marked. Similarities are computed once, at the loosest
    threshold, for both the sweep and the removal."""
    order = sorted(range(len(records)), key=lambda k: records[k]["id"])  # input order never matters
    records = [records[k] for k in order]
    x = x[order]
    loosest = max([*eps_list, eps or 0.0])
    i, j, s = similar_pairs(x, 1 - loosest, block)
    sweep = _sweep(len(records), i, j, s, eps_list)
    for rec in records:
        rec["semantic_dup_of"] = None
    if eps is not None:
        m = s >= 1 - eps
        for group in _groups(len(records), i[m], j[m]):
            keep_one([records[k] for k in group], lambda r: _keep_key(r, keep), "semantic_dup_of",
                     "semantic_duplicate")
    return records, sweep


def resolve(records: list[dict], x: np.ndarray, eps: float, keep: str = "least_similar_to_centroid",
            block: int = 2048) -> list[dict]:
    """Mark all but one member of each duplicate group; returns the same dicts (ordered by id)."""
    return dedup_cluster(records, x, eps, keep, (), block)[0]
