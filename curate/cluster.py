"""Spherical k-means with FAISS on a seeded sample, and nearest-centroid assignment. No Beam.

- Sample: every row gets a rank ``blake2b(seed, id)``; the rows of smallest rank
  form the training sample (a seeded uniform sample that does not depend on input
  order, batching or runner). Its size is ``min(N, sample_per_centroid * k,
  max_sample)``.
- k: the job's ``k``, else ``round(sqrt(N))`` clipped to [k_min, k_max] and to N.
- Training: ``faiss.Kmeans(spherical=True, seed=seed)`` on the sample ordered by
  rank; a GPU when FAISS has one (``curate.device``).
- Assignment: the centroid of largest inner product (cosine, as vectors and
  centroids are unit length), ties to the lower cluster id; ``cluster_sim`` is
  that cosine.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa

from curate.columns import Column, StageColumns

COLUMNS = StageColumns("cluster", ("cluster.enabled", "embed.enabled"), (
    Column("cluster_id", pa.int32(), "k-means cluster of the row's embedding (or the input field cluster.column "
                                     "names), null for rows dropped before clustering"),
    Column("cluster_sim", pa.float32(), "cosine similarity of the row's embedding to its cluster centroid (null "
                                        "with cluster.column)"),
))


def given_cluster(original: str, column: str) -> int | None:
    """The cluster id an input row carries in ``column`` (``cluster.column``): an integer, or a
    string of one, that fits ``cluster_id``'s int32; None when the field is missing, null, not an
    integer or out of that range."""
    import json

    row = json.loads(original) if original else None
    value = row.get(column) if isinstance(row, dict) else None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if -2**31 <= value < 2**31 else None


def default_k(n: int, k_min: int = 2, k_max: int = 1024) -> int:
    return int(max(1, min(n, max(k_min, min(k_max, round(math.sqrt(n)))))))


def sample_rank(seed: int, row_id: str) -> int:
    h = hashlib.blake2b(row_id.encode("utf-8"), digest_size=8, key=str(seed).encode())
    return int.from_bytes(h.digest(), "big")


def sample_cutoff(n_rows: int, size: int) -> int:
    """A rank below which the ``size`` smallest of ``n_rows`` ranks lie, all but surely: the ranks
    are uniform 64-bit numbers, so the count below it is binomial, and the margin is ten of its
    standard deviations. Only the rows below it travel to the sampling step, about ``size`` of
    them instead of every row (each with its embedding). 2**64 lets every row through."""
    keep = size + 10 * math.isqrt(size) + 64
    return 1 << 64 if keep >= n_rows else (keep << 64) // n_rows


def train(x: np.ndarray, k: int, seed: int, niter: int = 20, use_gpu: bool = False) -> np.ndarray:
    """(k x d) unit-length float32 centroids."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    k = min(k, len(x))
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=True, gpu=use_gpu, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(1, len(x)))
    km.train(x)
    c = np.asarray(km.centroids, dtype=np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def assign(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(cluster ids int64, cosine to the centroid float32) for each row of x."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sims, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return ids[:, 0].astype(np.int64), sims[:, 0].astype(np.float32)
