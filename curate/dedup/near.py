"""Near-duplicate clustering from MinHash signatures: LSH bands, star edges, union-find, keep rule.

Pure functions over numpy arrays and dicts; ``pipelines.transforms.NearDedup``
wires them into Beam.

- LSH parameters: ``optimal_bands_rows`` picks (bands, rows) with bands x rows <=
  num_perm minimizing ``fp_weight * FP + fn_weight * FN``, the areas under the
  S-curve ``1 - (1 - s**rows)**bands`` below and above the threshold.
- Buckets: a document's band k falls in bucket ``mix(hash of its rows, k[, source])``.
  Within a bucket, edges form a star to the member with the smallest id: O(k)
  edges per bucket of k, never all pairs.
- Verification (default on): an edge is kept only if the signature-estimated
  Jaccard of its two ends is >= the threshold.
- Clusters: connected components. A union-find's accumulator is mergeable, so partial
  results combine in any order to the same clusters; the Beam step first runs rounds of
  min-label propagation by id (``components_in_rounds``), so the union-find sees only the
  labels still linked. A cluster's id is its smallest member id.
- Keep rule: one member per cluster, the longest response, then the smallest id.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from curate.columns import Column, StageColumns
from curate.dedup import keep_one
from curate.dedup.minhash import EMPTY, splitmix64

COLUMNS = StageColumns("dedup.near", ("dedup.near.enabled",), (
    Column("near_dup_cluster", pa.string(),
           "near-duplicate cluster (its smallest member id) this row belongs to, else null"),
    Column("near_dup_of", pa.string(), "id of the cluster member kept in place of this row, else null"),
))

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _integrate(f, a: float, b: float, steps: int = 200) -> float:
    if b <= a:
        return 0.0
    x = np.linspace(a, b, steps + 1)
    y = f(x)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def false_positive_area(threshold: float, bands: int, rows: int) -> float:
    return _integrate(lambda s: 1 - (1 - s ** rows) ** bands, 0.0, threshold)


def false_negative_area(threshold: float, bands: int, rows: int) -> float:
    return _integrate(lambda s: (1 - s ** rows) ** bands, threshold, 1.0)


def optimal_bands_rows(threshold: float, num_perm: int, fp_weight: float = 0.5,
                       fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimizing the weighted false-positive and false-negative areas."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    best, best_err = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            err = (fp_weight * false_positive_area(threshold, bands, rows)
                   + fn_weight * false_negative_area(threshold, bands, rows))
            if err < best_err - 1e-12:
                best, best_err = (bands, rows), err
    return best


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """Chance that two documents of this Jaccard share at least one bucket (the S-curve)."""
    return 1 - (1 - similarity ** rows) ** bands


def source_salt(source: str) -> np.uint64:
    import hashlib

    return np.uint64(int.from_bytes(hashlib.blake2b(source.encode(), digest_size=8).digest(), "little"))


def band_keys(sigs: np.ndarray, bands: int, rows: int, salts: np.ndarray | None = None) -> np.ndarray:
    """(docs x bands) uint64 bucket keys; ``salts`` (one per doc) separates scopes (sources).

    An empty signature (a text with no shingle) gets no bucket: its keys are EMPTY
    and ``bucket_edges`` skips them.
    """
    n = len(sigs)
    consts = splitmix64(np.arange(1, rows + 1, dtype=np.uint64) * _GOLDEN) | np.uint64(1)
    keys = np.empty((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(bands):
            block = sigs[:, k * rows:(k + 1) * rows]
            acc = (block * consts[None, :]).sum(axis=1, dtype=np.uint64)
            acc += np.uint64(k + 1) * _GOLDEN
            if salts is not None:
                acc ^= salts
            keys[:, k] = splitmix64(acc)
    keys[np.all(sigs == EMPTY, axis=1)] = EMPTY
    return keys


def bucket_edges(keys: np.ndarray, ids: list[str], max_bucket: int | None = None
                 ) -> tuple[set[tuple[str, str]], list[int]]:
    """Star edges (smallest id, other) for every bucket of >= 2 members.

    ``keys``: flat bucket keys; ``ids``: the document id of each key. Returns the
    edges and the sizes of buckets larger than ``max_bucket`` (still processed:
    a star has only k - 1 edges; the sizes are for the log).
    """
    edges: set[tuple[str, str]] = set()
    big: list[int] = []
    if len(keys) == 0:
        return edges, big
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    boundaries = np.flatnonzero(np.diff(sk)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(sk)]])
    for s, e in zip(starts[(ends - starts) >= 2], ends[(ends - starts) >= 2]):
        if sk[s] == EMPTY:
            continue
        members = sorted({ids[i] for i in order[s:e]})
        if len(members) < 2:
            continue
        if max_bucket and len(members) > max_bucket:
            big.append(len(members))
        center = members[0]
        edges.update((center, m) for m in members[1:])
    return edges, big


class UnionFind:
    """Union-find over string ids; the root of a set is its smallest id (order-independent)."""

    def __init__(self, parent: dict[str, str] | None = None):
        self.parent: dict[str, str] = dict(parent or {})

    def find(self, x: str) -> str:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            if a not in self.parent:
                self.parent[a] = ra
            return
        lo, hi = (ra, rb) if ra < rb else (rb, ra)
        self.parent[hi] = lo
        self.parent.setdefault(lo, lo)

    def merge(self, other: "UnionFind") -> None:
        for x, p in other.parent.items():
            self.union(x, p)

    def clusters(self) -> dict[str, str]:
        """id -> cluster id (the smallest id of its component), for every id seen."""
        return {x: self.find(x) for x in self.parent}


def adjacency(edges) -> dict[str, list[str]]:
    """id -> its neighbours, both ways, from (a, b, ...) edges."""
    adjacent: dict[str, list[str]] = {}
    for a, b, *_ in edges:
        adjacent.setdefault(a, []).append(b)
        adjacent.setdefault(b, []).append(a)
    return adjacent


def first_labels(adjacent: dict[str, list[str]]) -> dict[str, str]:
    """Each id's first label: the smallest id among itself and its neighbours."""
    return {v: min(v, *ns) for v, ns in adjacent.items()}


def spread_labels(labels: dict[str, str], adjacent: dict[str, list[str]]) -> dict[str, str]:
    """One round of min-label propagation: each id takes the smallest label among itself and its
    neighbours."""
    out = dict(labels)
    for u, label in labels.items():
        for v in adjacent.get(u, ()):
            if label < out[v]:
                out[v] = label
    return out


def contracted_edges(labels: dict[str, str], edges) -> set[tuple[str, str]]:
    """The edges between different labels, as (smaller, larger) label pairs: what is left to join
    after the rounds (nothing, once every component has one label)."""
    out = set()
    for a, b in edges:
        la, lb = labels[a], labels[b]
        if la != lb:
            out.add((la, lb) if la < lb else (lb, la))
    return out


def components_in_rounds(edges, rounds: int = 2) -> dict[str, str]:
    """id -> smallest id of its component (``UnionFind.clusters``), found the way the Beam step
    finds it without holding the graph on one worker: every id starts from the smallest id among
    itself and its neighbours, ``rounds`` rounds of min-label propagation follow (each a join by
    id), and a union-find joins only the labels still linked by an edge (components wider than the
    rounds reach). Every label is an id of its component and the component's smallest id is its own
    label, so the union-find's root of a label is that smallest id."""
    edges = [tuple(e[:2]) for e in edges]
    adjacent = adjacency(edges)
    labels = first_labels(adjacent)
    for _ in range(rounds):
        labels = spread_labels(labels, adjacent)
    joined = UnionFind()
    for a, b in contracted_edges(labels, edges):
        joined.union(a, b)
    roots = joined.clusters()
    return {v: roots.get(label, label) for v, label in labels.items()}


def keep_key(record: dict) -> tuple:
    """Smaller is kept: the longest response, then the smallest id."""
    return keep_order(len(record["response"]), record["id"])


def keep_order(response_length: int, rid: str) -> tuple:
    """``keep_key`` from a row's response length and id (the batch path carries no text)."""
    return (-response_length, rid)


def resolve_cluster(records: list[dict], cluster_id: str) -> list[dict]:
    """Mark all but one member of a near-duplicate cluster; returns the same dicts."""
    for rec in records:
        rec["near_dup_cluster"] = cluster_id
    keep_one(records, keep_key, "near_dup_of", "near_duplicate")
    return records


def size_histogram(clusters: dict[str, str]) -> dict[int, int]:
    """Cluster size -> number of clusters, from an id -> cluster id map."""
    sizes: dict[str, int] = {}
    for root in clusters.values():
        sizes[root] = sizes.get(root, 0) + 1
    hist: dict[int, int] = {}
    for size in sizes.values():
        hist[size] = hist.get(size, 0) + 1
    return dict(sorted(hist.items()))
