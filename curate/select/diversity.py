"""Diversity-aware policies over embeddings: facility_location, superfiltering_diverse, deita.

Facility location (Superfiltering.D, methods.md 1.7): maximise F(S) = sum_i max_{j in S} s_ij
with the reference kernel s_ij = exp(-||x_i - x_j|| / d) (Euclidean, not squared; d the
embedding dimension), greedily, ties by id: gains within 1e-7 per pool row of the best are ties
(``TIE``), so float noise from other kernels (another CPU, a GPU) does not decide between
near-identical rows. Lazy greedy gives the same picks as plain greedy (a stale gain is an upper
bound by submodularity).

For large pools a dense n x n kernel does not fit, so the ``knn`` kernel keeps each row's
``neighbors`` nearest rows (FAISS, exact inner-product search) and shifts the kernel by its
floor c = exp(-2 r / d) (r the largest norm, so s - c >= 0). The shift changes every gain of
a step by the same constant, so with all neighbours it gives the dense kernel's picks
exactly; with fewer it drops only the smallest similarities. The reference kernel is almost
flat (s in [0.9948, 1] for unit vectors at d = 384), which is why the shift matters.

DEITA's repr filter (methods.md 6b): walk rows in score order, accept a row iff its cosine
similarity to every accepted row is <= threshold (strict >, as the reference), stop at the
budget. Rows are looked up in blocks (one FAISS search per block against the rows accepted
before it, then an exact check against those accepted earlier in the block), which gives the
one-row-at-a-time result for any block size (the reference's batched check does not).
"""
from __future__ import annotations

import heapq

import numpy as np
import pyarrow as pa

from curate.select.base import Budget, Param, Policy, Pool, Selection, ranked
from curate.select.scored import Random, Superfiltering, TopK, numeric_column

KERNEL = Param((str,), "auto", "dense (exact n x n), knn (sparse, FAISS) or auto (dense up to dense_max rows)",
               choices=("auto", "dense", "knn"))
NEIGHBORS = Param((int,), 64, "neighbours per row for the knn kernel", minimum=1)
DENSE_MAX = Param((int,), 4096, "auto uses the dense kernel up to this many rows", minimum=1)


def dense_kernel(x: np.ndarray) -> np.ndarray:
    """s_ij = exp(-||x_i - x_j|| / d), the reference's Euclidean kernel."""
    sq = np.einsum("ij,ij->i", x, x)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0))
    return np.exp(-dist / x.shape[1])


def knn_kernel(x: np.ndarray, neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``neighbors`` nearest rows (itself included) and their shifted similarities
    s - c, as (n x k) index and weight arrays."""
    import faiss

    n, d = x.shape
    k = min(neighbors + 1, n)
    index = faiss.IndexFlatL2(d)
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    sqdist, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), k)
    r = float(np.sqrt(np.einsum("ij,ij->i", x, x).max())) if n else 0.0
    floor = np.exp(-2.0 * r / d)
    weights = np.exp(-np.sqrt(np.maximum(sqdist, 0.0)) / d) - floor
    return idx, np.maximum(weights, 0.0)


# Gains closer than TIE per pool row are ties, broken by id. The reference kernel is nearly flat,
# so a gain is a sum of small differences of numbers near 1, and two near-identical rows can
# differ by 1e-11 while another CPU's (or a GPU's) kernels move every gain by about 1e-9:
# without a tolerance the pick between them follows the hardware (seen: AVX-512 vs AVX2).
TIE = 1e-7


def lazy_greedy(n: int, gain, take, budget: int, tie: float) -> list[int]:
    """Greedy maximisation of a submodular function by stale upper bounds (lazy greedy):
    ``gain(j)`` the current gain of j, ``take(j)`` adds j. Each step picks the smallest index
    among the candidates whose gain is within ``tie`` of the best one."""
    heap = [(-gain(j), j) for j in range(n)]
    heapq.heapify(heap)
    picked: list[int] = []
    while heap and len(picked) < budget:
        while True:  # refresh the top until it stays on top: then it holds the best gain
            _, j = heapq.heappop(heap)
            best = gain(j)
            if not heap or -heap[0][0] <= best:
                break
            heapq.heappush(heap, (-best, j))
        near = [(best, j)]  # a stale bound is at least the gain, so every tie is popped here
        while heap and -heap[0][0] >= best - tie:
            _, k = heapq.heappop(heap)
            near.append((gain(k), k))
        chosen = min(k for g, k in near if g >= best - tie)
        for g, k in near:
            if k != chosen:
                heapq.heappush(heap, (-g, k))
        picked.append(chosen)
        take(chosen)
    return picked


def greedy_dense(sim: np.ndarray, budget: int, tie: float = TIE) -> list[int]:
    """Lazy greedy facility location on a dense kernel; gains within ``tie`` per row are ties,
    which go to the smaller index."""
    n = sim.shape[0]
    cur = np.zeros(n)

    def take(j: int) -> None:
        np.maximum(cur, sim[:, j], out=cur)

    return lazy_greedy(n, lambda j: float(np.maximum(sim[:, j] - cur, 0.0).sum()), take, budget, tie * n)


def greedy_sparse(idx: np.ndarray, weights: np.ndarray, budget: int, tie: float = TIE) -> list[int]:
    """Lazy greedy facility location on a kNN kernel: row i is covered by its neighbours only."""
    n = idx.shape[0]
    rows = np.repeat(np.arange(n), idx.shape[1])
    cols, w = idx.ravel(), weights.ravel()
    keep = cols >= 0
    rows, cols, w = rows[keep], cols[keep], w[keep]
    order = np.argsort(cols, kind="stable")
    rows, cols, w = rows[order], cols[order], w[order]
    starts = np.searchsorted(cols, np.arange(n + 1))
    cur = np.zeros(n)

    def gain(j: int) -> float:
        a, b = starts[j], starts[j + 1]
        return float(np.maximum(w[a:b] - cur[rows[a:b]], 0.0).sum())

    def take(j: int) -> None:
        a, b = starts[j], starts[j + 1]
        cur[rows[a:b]] = np.maximum(cur[rows[a:b]], w[a:b])

    return lazy_greedy(n, gain, take, budget, tie * n)


class FacilityLocation(Policy):
    name = "facility_location"
    at_scale = "shortlist: a seeded random sample of select.max_candidates rows"
    summary = "greedy facility location on the embeddings down to the budget (Superfiltering.D's second step)"
    params = {"kernel": KERNEL, "neighbors": NEIGHBORS, "dense_max": DENSE_MAX}
    needs_embeddings = True
    needs_budget = True

    def choose(self, pool: Pool) -> Selection:
        k = pool.rows_budget(self.name)
        n = len(pool)
        if n == 0 or k == 0:
            return pool.take_in_order([])
        kernel = self.p["kernel"]
        if kernel == "auto":
            kernel = "dense" if n <= self.p["dense_max"] else "knn"
        x = pool.embeddings.astype(np.float64)
        if kernel == "dense":
            picked = greedy_dense(dense_kernel(x), k)
        else:
            picked = greedy_sparse(*knn_kernel(pool.embeddings, self.p["neighbors"]), k)
        return pool.take_in_order(picked, over="not_chosen")

    def shortlist(self) -> Policy:
        return Random()  # a seeded uniform sample: its coverage estimates the pool's without bias


class SuperfilteringDiverse(Policy):
    name = "superfiltering_diverse"
    at_scale = "shortlist: superfiltering's select.max_candidates highest-IFD rows"
    summary = ("Superfiltering.D: IFD filter to the top ifd_fraction of the pool, then facility location "
               "on the embeddings down to the budget (methods.md 1.7)")
    params = {"column": Superfiltering.params["column"], "upper": Superfiltering.params["upper"],
              "lower": Superfiltering.params["lower"],
              "ifd_fraction": Param((int, float), 0.2, "share of the pool kept by the IFD step (the README's 20%)",
                                    minimum=0.0, maximum=1.0),
              "kernel": KERNEL, "neighbors": NEIGHBORS, "dense_max": DENSE_MAX}
    needs_embeddings = True
    needs_budget = True
    keeps_step_names = True

    def required_columns(self):
        return (self.p["column"],)

    def shortlist(self) -> Policy:
        return Superfiltering(column=self.p["column"], upper=self.p["upper"], lower=self.p["lower"])

    def choose(self, pool: Pool) -> Selection:
        p = self.p
        first = Superfiltering(column=p["column"], upper=p["upper"], lower=p["lower"])
        step = first.run(pool.table, Budget(fraction=float(p["ifd_fraction"])), pool.seed, pool.embeddings,
                         pool.start_size)
        kept = set(step.selected)
        keep = [i for i, rid in enumerate(pool.ids) if rid in kept]
        fl = FacilityLocation(kernel=p["kernel"], neighbors=p["neighbors"], dense_max=p["dense_max"])
        second = fl.run(pool.table.take(pa.array(keep, pa.int64())), pool.budget, pool.seed, pool.embeddings[keep],
                        pool.start_size)
        return Selection(second.selected, {**step.dropped, **second.dropped})


class Deita(Policy):
    name = "deita"
    at_scale = "shortlist: top_k by its column, the select.max_candidates rows its walk visits first"
    summary = ("DEITA's score-first, diversity-aware greedy: in score order, accept a row iff its cosine "
               "similarity to every accepted row is <= threshold (methods.md 6b)")
    params = {"column": Param((str,), None, "score column to walk in order (DEITA: complexity x quality; "
                                             "here any score, e.g. ifd_loss)", required=True),
              "higher_is_better": Param((bool,), True, "true: larger scores first"),
              "threshold": Param((int, float), 0.9, "cosine similarity above which a row is too similar",
                                 minimum=-1.0, maximum=1.0)}
    needs_embeddings = True
    BLOCK = 256  # rows looked up in one FAISS search; any value gives the same selection

    def required_columns(self):
        return (self.p["column"],)

    def shortlist(self) -> Policy:
        return TopK(column=self.p["column"], higher_is_better=self.p["higher_is_better"])  # its walk's order

    def choose(self, pool: Pool) -> Selection:
        import faiss

        keys = numeric_column(pool, self.p["column"], self.name)
        x = pool.embeddings.astype(np.float32) if len(pool) else np.zeros((0, 1), np.float32)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        # normalise (DEITA's normalize_emb); rows already of unit length are left as they are, so a
        # float32 rounding of the norm cannot push a similarity across the threshold
        x = np.ascontiguousarray(np.where(np.abs(norms - 1.0) > 1e-6, x / np.where(norms > 0, norms, 1.0), x))
        index = faiss.IndexFlatIP(x.shape[1])
        cap, room, tau = pool.max_rows, pool.budget.tokens, self.p["threshold"]
        tokens = pool.tokens()
        chosen, dropped = [], {}
        order = ranked(keys, self.p["higher_is_better"])
        for start in range(0, len(order), self.BLOCK):
            block = order[start:start + self.BLOCK]
            if cap is not None and len(chosen) >= cap:  # budget spent: no lookups needed
                dropped.update({pool.ids[i]: "score_nan" if np.isnan(keys[i]) else "over_budget" for i in block})
                continue
            # one FAISS search for the whole block against the rows accepted before it ...
            before = index.search(x[block], 1)[0][:, 0] if index.ntotal else np.full(len(block), -np.inf)
            new: list[int] = []
            for j, i in enumerate(block):
                rid = pool.ids[i]
                if np.isnan(keys[i]):
                    dropped[rid] = "score_nan"
                elif cap is not None and len(chosen) >= cap:
                    dropped[rid] = "over_budget"
                elif before[j] > tau or (new and float((x[new] @ x[i]).max()) > tau):
                    # ... and an exact check against the rows accepted earlier in this block, so the
                    # result is the one-row-at-a-time walk whatever the block size
                    dropped[rid] = "too_similar"
                elif room is not None and tokens[i] > room:
                    dropped[rid] = "over_budget"
                else:
                    if room is not None:
                        room -= int(tokens[i])
                    chosen.append(rid)
                    new.append(int(i))
            if new:
                index.add(x[new])
        return Selection(chosen, dropped)
