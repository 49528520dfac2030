"""PASER: select the rows that best repair a compressed model (arXiv 2502.12594; methods.md §5).

1. Clusters of the rows' instruction embeddings: spectral clusters on a sparse kNN graph
   (``clusters: spectral``, the paper's semantic-structural clustering done at O(n k) memory) or
   the run's k-means clusters (``clusters: kmeans``).
2. Each cluster's budget is proportional to its mean degradation (CDS, ``degradation_jsd``),
   whole numbers summing to the budget by largest remainder, capped at the cluster's size with
   the excess shared among the others (``curate.select.quotas.allocate``).
3. Within a cluster, rows in order of IES = jsd / ln((prompt + response tokens)^2).
4. The concept-consistency filter: a row whose key phrases are all known but not all linked to
   each other in the graph of accepted rows is rejected (it would pull the model between
   concepts it has learned apart); accepted rows link their phrases. Clusters are processed in
   descending CDS order (deterministic, unlike the reference's dict order). A cluster that
   cannot fill its quota after the filter is backfilled with its best rejected rows, so the
   budget is used; rows so taken keep no drop reason, and the rejections that stand are
   recorded as ``paser:concept_conflict``.

Key phrases: RAKE (Rose et al. 2010) written here (split at stop words and punctuation, score
phrases by word degree / frequency), at most ``max_concepts`` per row, lower-cased. The
``rake-nltk`` package needs NLTK's stop-word corpus downloaded at run time, which curate does
not do; scikit-learn's English stop-word list serves instead.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

import numpy as np

from curate.select.base import Param, Policy, PolicyError, Pool, Selection
from curate.select.quotas import allocate
from curate.select.scored import Random

_SPLIT = re.compile(r"[^\w'+-]+")


def _stop_words() -> frozenset:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def rake(text: str, max_phrases: int = 5, max_words: int = 3, stop: frozenset | None = None) -> list[str]:
    """The top key phrases of ``text`` by RAKE score, best first (ties by phrase)."""
    stop = stop if stop is not None else _stop_words()
    phrases: list[list[str]] = []
    for chunk in re.split(r"[.,;:!?()\[\]{}\"\n\t/\\|<>=*#`]+", text.lower()):
        current: list[str] = []
        for word in _SPLIT.split(chunk):
            if not word or word in stop or word.isdigit() or len(word) < 2:
                if current:
                    phrases.append(current)
                current = []
            else:
                current.append(word)
        if current:
            phrases.append(current)
    phrases = [p[:max_words] for p in phrases]
    freq, degree = defaultdict(int), defaultdict(int)
    for p in phrases:
        for w in p:
            freq[w] += 1
            degree[w] += len(p)
    scored = {}
    for p in phrases:
        key = " ".join(p)
        scored[key] = sum(degree[w] / freq[w] for w in p)
    return [k for k, _ in sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))[:max_phrases]]


class ConceptGraph:
    """Concepts seen in accepted rows and the links between concepts that appeared together."""

    def __init__(self):
        self.nodes: set[str] = set()
        self.edges: set[tuple[str, str]] = set()

    def consistent(self, concepts: list[str]) -> bool:
        """False when two known concepts of the row were never linked (methods.md §5.1 step 5)."""
        known = sorted(c for c in set(concepts) if c in self.nodes)
        return all((a, b) in self.edges for i, a in enumerate(known) for b in known[i + 1:])

    def add(self, concepts: list[str]) -> None:
        cs = sorted(set(concepts))
        self.nodes.update(cs)
        self.edges.update((a, b) for i, a in enumerate(cs) for b in cs[i + 1:])


def ies(jsd: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """jsd / ln(L^2) with L the row's prompt + response tokens (NaN when undefined)."""
    t = np.asarray(tokens, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(t > 1, np.asarray(jsd, dtype=np.float64) / (2.0 * np.log(np.maximum(t, 2))), np.nan)


def spectral_clusters(x: np.ndarray, k: int, neighbours: int = 15, seed: int = 0) -> np.ndarray:
    """Spectral clusters of unit vectors ``x``: a symmetric kNN graph with self-tuning widths
    (sigma_i = distance to the 7th neighbour), the symmetric normalised Laplacian's ``k`` smallest
    eigenvectors (row-normalised), then seeded k-means on them. Labels are renumbered by each
    cluster's smallest row index, so they do not depend on the eigen-solver's sign or order."""
    import faiss
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    n = len(x)
    if n <= k:
        return np.arange(n)
    nb = min(neighbours + 1, n)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    d2, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), nb)
    d = np.sqrt(np.maximum(d2, 0.0))
    sigma = d[:, min(7, nb - 1)] + 1e-12
    rows = np.repeat(np.arange(n), nb)
    cols = idx.ravel()
    w = np.exp(-(d.ravel() ** 2) / (sigma[rows] * sigma[cols]))
    a = sp.coo_matrix((w, (rows, cols)), shape=(n, n)).tocsr()
    a = a.maximum(a.T)
    a.setdiag(0)
    deg = np.asarray(a.sum(axis=1)).ravel()
    dinv = sp.diags(1.0 / np.sqrt(np.maximum(deg, 1e-12)))
    lap = sp.identity(n) - dinv @ a @ dinv
    # the smallest eigenvalues of L are the largest of 2I - L (well separated for Lanczos)
    v0 = np.random.default_rng(seed).standard_normal(n)
    vals, vecs = eigsh(2 * sp.identity(n) - lap, k=k, which="LA", v0=v0)
    emb = vecs[:, np.argsort(-vals)]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12
    km = faiss.Kmeans(k, k, niter=50, seed=seed, nredo=3, verbose=False, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(emb, dtype=np.float32))
    _, lab = km.index.search(np.ascontiguousarray(emb, dtype=np.float32), 1)
    lab = lab.ravel()
    first = {}
    for i, c in enumerate(lab):
        first.setdefault(int(c), len(first))
    return np.array([first[int(c)] for c in lab])


class Paser(Policy):
    name = "paser"
    at_scale = "shortlist: a seeded random sample of select.max_candidates rows"
    summary = ("PASER: budget per cluster by mean degradation under compression, rows by IES, "
               "concept-consistency filter with backfill (methods.md 5.2)")
    params = {
        "column": Param((str,), "degradation_jsd", "degradation score per row (the degradation stage's JSD)"),
        "clusters": Param((str,), "spectral", "spectral (kNN graph of the embeddings) or kmeans (the run's clusters)",
                          choices=("spectral", "kmeans")),
        "k": Param((int,), None, "spectral clusters (default: sqrt(rows / 2), between 2 and 64)", minimum=2),
        "neighbours": Param((int,), 15, "kNN graph degree for spectral clustering", minimum=2),
        "max_concepts": Param((int,), 5, "key phrases per row for the consistency filter", minimum=1),
        "consistency": Param((bool,), True, "apply the concept-consistency filter"),
    }
    needs_budget = True
    needs_text = True
    scopes = ("global",)  # it splits the budget between its own clusters by their degradation

    def required_columns(self) -> tuple[str, ...]:
        return (self.p["column"],) + (("cluster_id",) if self.p["clusters"] == "kmeans" else ())

    def wants_embeddings(self) -> bool:
        return self.p["clusters"] == "spectral"

    def shortlist(self) -> Policy:
        return Random()  # a seeded uniform sample: the clusters' degradation means stay unbiased

    def labels(self, pool: Pool) -> np.ndarray:
        if self.p["clusters"] == "kmeans":
            return np.nan_to_num(pool.values("cluster_id"), nan=-1).astype(np.int64)
        k = self.p["k"] or int(min(64, max(2, round(math.sqrt(len(pool) / 2)))))
        return spectral_clusters(pool.embeddings, min(k, max(len(pool) - 1, 1)), self.p["neighbours"], pool.seed)

    def choose(self, pool: Pool) -> Selection:
        budget = pool.rows_budget(self.name)
        jsd = pool.values(self.p["column"])
        dropped = {pool.ids[i]: "no_degradation_score" for i in range(len(pool)) if np.isnan(jsd[i])}
        ok = [i for i in range(len(pool)) if not np.isnan(jsd[i])]
        if not ok:
            return pool.take_in_order([], dropped)
        labels = self.labels(pool)
        members = defaultdict(list)
        for i in ok:
            members[int(labels[i])].append(i)
        cds = {c: float(np.mean(jsd[m])) for c, m in members.items()}
        quota = allocate(budget, {c: len(m) for c, m in members.items()}, {c: max(v, 1e-12) for c, v in cds.items()})
        prio = ies(jsd, pool.tokens())
        texts = pool.texts or [""] * len(pool)
        stop = _stop_words()
        graph = ConceptGraph()
        order: list[int] = []
        for c in sorted(members, key=lambda c: (-cds[c], c)):
            ranked_rows = sorted(members[c], key=lambda i: (-np.nan_to_num(prio[i], nan=-np.inf), pool.ids[i]))
            taken, rejected = [], []
            for i in ranked_rows:
                if len(taken) >= quota[c]:
                    break
                concepts = rake(texts[i], self.p["max_concepts"], stop=stop) if self.p["consistency"] else []
                if graph.consistent(concepts):
                    graph.add(concepts)
                    taken.append(i)
                else:
                    rejected.append(i)
            backfill = rejected[:max(quota[c] - len(taken), 0)]
            for i in rejected[len(backfill):]:
                dropped[pool.ids[i]] = "concept_conflict"
            order += taken + backfill
        self.last_report = {"clusters": {str(c): {"size": len(m), "cds": round(cds[c], 6), "quota": quota[c]}
                                         for c, m in sorted(members.items())}}
        return pool.take_in_order(order, dropped, over="over_cluster_budget")

    def validate(self) -> None:
        if self.p["clusters"] == "kmeans" and self.p["k"] is not None:
            raise PolicyError("policy paser: k applies to clusters: spectral only")
