"""Selection policies at scale: facility location and DEITA's filter against the plain approaches.

- facility_location: the sparse kNN kernel (FAISS) vs the dense n x n kernel that the
  reference uses (submodlib's ``mode="dense"``, re-implemented: same kernel, lazy greedy). Time,
  kernel memory, and the quality of the sparse picks measured with the *dense* objective.
  Then the kNN kernel alone on a pool where the dense kernel would not fit in memory.
- deita: curate's policy (FAISS lookups per block of rows, exact within a block) vs a numpy
  loop over the accepted rows (what a user writes first); the picks must be the same. The
  policy also labels every row it does not take.

Embeddings are synthetic (a seeded mixture of 200 Gaussian clusters on the unit sphere, d=384,
the default embedder's dimension), so the sizes can go past what 2 cores embed in minutes.
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks.common import emit
from curate.select.diversity import dense_kernel, greedy_dense, greedy_sparse, knn_kernel

DEITA_THRESHOLD = 0.9  # the reference's default


def vectors(n: int, d: int = 384, clusters: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, d))
    x = centers[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def objective(sim: np.ndarray, picked: list[int]) -> float:
    return float(sim[:, picked].max(axis=1).sum())


def deita_numpy(x: np.ndarray, order: np.ndarray, threshold: float, cap: int) -> list[int]:
    chosen: list[int] = []
    for i in order:
        if len(chosen) >= cap:
            break
        if not chosen or float((x[chosen] @ x[i]).max()) <= threshold:
            chosen.append(int(i))
    return chosen


def deita_setup(x: np.ndarray, order: np.ndarray, threshold: float):
    """curate's deita policy and a features table whose scores walk the rows in ``order``."""
    from curate.select import features_table, make

    rank = np.empty(len(order))
    rank[order] = np.arange(len(order), 0, -1)  # first in order = highest score
    table = features_table([{"id": f"{i:07d}", "ifd_loss": float(rank[i])} for i in range(len(order))])
    return make("deita", {"column": "ifd_loss", "threshold": threshold}), table


def run(quick: bool):
    n, k = (1500, 75) if quick else (4000, 200)
    x = vectors(n)
    t = time.perf_counter()
    sim = dense_kernel(x.astype(np.float64))
    dense_pick = greedy_dense(sim, k)
    dense_s = time.perf_counter() - t
    t = time.perf_counter()
    knn_pick = greedy_sparse(*knn_kernel(x, 64), k)
    knn_s = time.perf_counter() - t
    emit("select", "facility_location_knn64_vs_dense", "seconds", knn_s, "dense_kernel_lazy_greedy", dense_s, n=n,
         higher_is_better=False, budget=k, dense_kernel_mb=round(sim.nbytes / 2**20, 1),
         objective_ratio=round(objective(sim, knn_pick) / objective(sim, dense_pick), 6),
         same_picks=len(set(knn_pick) & set(dense_pick)))
    big = 20_000 if quick else 100_000
    xb = vectors(big, seed=1)
    t = time.perf_counter()
    picked = greedy_sparse(*knn_kernel(xb, 64), big // 50)
    emit("select", "facility_location_knn64_large", "seconds", time.perf_counter() - t, n=big,
         higher_is_better=False, budget=len(picked),
         dense_kernel_would_need_gb=round(big * big * 8 / 2**30, 1))
    m = 20_000 if quick else 100_000
    xd = vectors(m, seed=2)
    order = np.random.default_rng(3).permutation(m)
    cap = m // 10
    from curate.select import Budget

    policy, table = deita_setup(xd, order, DEITA_THRESHOLD)
    t = time.perf_counter()
    ours = [int(i) for i in policy.run(table, Budget(rows=cap), 0, xd).selected]
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    plain = deita_numpy(xd, order, DEITA_THRESHOLD, cap)
    plain_s = time.perf_counter() - t
    emit("select", "deita_faiss_vs_numpy_loop", "seconds", ours_s, "numpy_loop", plain_s, n=m,
         higher_is_better=False, selected=len(ours), same_picks=ours == plain)
