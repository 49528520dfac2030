"""Embeddings (RunInference), k-means clusters (FAISS) and semantic dedup, in Beam.

    live records -> CachedInference(SentenceTransformerHandler) -> record + vector
        -> (rank, id, vector) of the rows ranked below a cutoff set by the row count (about
           max_sample of them) -> CombineGlobally(smallest ranks) -> train k-means  (one step)
        -> centroids (side input) -> batched nearest-centroid assignment
        -> GroupByKey(cluster_id) -> SemDeDup inside each cluster + eps sweep counts
Rows dropped by an earlier stage go around all three and keep null columns.
"""
from __future__ import annotations

import heapq
import logging
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa

from curate import cluster as clustering
from curate.cluster import COLUMNS as CLUSTER_COLUMNS
from curate.dedup import semantic
from curate.dedup.semantic import COLUMNS as SEMANTIC_COLUMNS
from curate.embed import embed_text, encode, load_embedder, text_hash
from curate.settings import Cluster as ClusterSettings
from curate.settings import Embed as EmbedSettings
from curate.settings import Job
from curate.settings import SemanticDedup as SemanticSettings
from pipelines.cached import CachedInference, StageHandler
from pipelines.stage import STATS, LiveStage, StageFn

log = logging.getLogger("curate")


class SentenceTransformerHandler(StageHandler):
    """Records in, ``{"embedding": unit vector}`` out. Loading is separate from running (Beam
    shares the loaded model across the worker's threads); the batch size is the handler's."""

    stage = "embed"

    def __init__(self, e: EmbedSettings, device: str, dtype: str, linear: str = "torch"):
        super().__init__(min_batch_size=e.batch_size, max_batch_size=e.batch_size)
        self.model, self.device, self.dtype, self.linear = e.model, device, dtype, linear
        self.max_seq_length, self.text = e.max_seq_length, e.text

    def load_model(self):
        log.info("embed: loading %s on %s (%s, %s linears)", self.model, self.device, self.dtype, self.linear)
        return load_embedder(self.model, self.device, self.dtype, self.max_seq_length, self.linear)

    def infer(self, batch, model, progress):
        vectors = encode(model, [embed_text(r, self.text) for r in batch])
        progress(len(batch))
        return [{"embedding": v} for v in vectors]

    def get_metrics_namespace(self) -> str:
        return "curate.embed"


def _vector(record: dict) -> dict:
    """A new dict: the record is also read by the cache writer (Beam inputs are never mutated)."""
    out = {k: v for k, v in record.items() if k != "embedding"}
    out["_vector"] = np.asarray(record["embedding"], dtype=np.float32)
    return out


class CountEmbedFn(StageFn):
    stage = "embed"
    metrics = ("rows",)

    def handle(self, record):
        self.count("rows")
        yield record


class SmallestRanks(beam.CombineFn):
    """The ``size`` items of smallest rank: a seeded sample, the same in any order."""

    def __init__(self, size: int):
        self.size = size

    def create_accumulator(self):
        return []

    def add_input(self, acc, item):
        acc.append(item)
        if len(acc) > 2 * self.size:
            acc = heapq.nsmallest(self.size, acc, key=lambda t: (t[0], t[1]))
        return acc

    def merge_accumulators(self, accs):
        merged = [item for acc in accs for item in acc]
        return heapq.nsmallest(self.size, merged, key=lambda t: (t[0], t[1]))

    def extract_output(self, acc):
        return sorted(heapq.nsmallest(self.size, acc, key=lambda t: (t[0], t[1])), key=lambda t: (t[0], t[1]))


def _ranked_below(record: dict, seed: int, cutoff: int):
    """(rank, id, vector) of a row whose sample rank is below ``cutoff``; nothing otherwise."""
    rank = clustering.sample_rank(seed, record["id"])
    if rank < cutoff:
        yield rank, record["id"], record["_vector"]


def _train(sample, n_rows: int, p: ClusterSettings, use_gpu: bool):
    if len(sample) < min(p.max_sample, n_rows):  # the cutoff's ten-sigma margin fell short
        raise RuntimeError(f"cluster: only {len(sample)} of {n_rows} rows ranked below the sample cutoff, "
                           f"fewer than the sample of {min(p.max_sample, n_rows)}; rerun with another cluster.seed")
    k = p.k or clustering.default_k(n_rows, p.k_min, p.k_max)
    take = min(len(sample), p.sample_per_centroid * k)
    x = np.stack([s[2] for s in sample[:take]]) if take else np.zeros((0, 1), np.float32)
    if take == 0:
        return {"centroids": None, "k": 0, "sample": 0}
    centroids = clustering.train(x, k, p.seed, p.niter, use_gpu)
    return {"centroids": centroids, "k": int(len(centroids)), "sample": int(take)}


class AssignFn(StageFn):
    stage = "cluster"
    metrics = ("rows",)

    def __init__(self, use_gpu: bool):
        self.use_gpu = use_gpu

    def handle(self, batch, model):
        x = np.stack([r["_vector"] for r in batch])
        ids, sims = clustering.assign(x, model["centroids"], self.use_gpu)
        for rec, cid, sim in zip(batch, ids.tolist(), sims.tolist()):
            rec["cluster_id"], rec["cluster_sim"] = int(cid), float(sim)
            yield rec
        self.count("rows", len(batch), progress=True)


class SemanticDedupFn(StageFn):
    stage = "semantic_dedup"
    metrics = ("sweep", "dropped", "rows")

    def __init__(self, p: SemanticSettings):
        self.p = p

    def handle(self, element):
        _, records = element
        records = list(records)
        x = np.stack([r["_vector"] for r in records])
        eps = self.p.eps if self.p.enabled else None
        records, sweep = semantic.dedup_cluster(records, x, eps, self.p.keep, semantic.SWEEP_EPS,
                                                self.p.block_size)
        for e, n in sweep.items():
            self.count("sweep", n, reason=f"eps_{e}")
        for rec in records:
            if rec.get("semantic_dup_of"):
                self.count("dropped", source=rec["source"])
        self.count("rows", len(records))
        yield from records


def _cluster_sizes(record: dict):
    return record["cluster_id"], 1


class Embed(beam.PTransform):
    """Records to records with ``_vector``: sentence-transformers through the cached-inference
    block (``pipelines.cached``), keyed by the hash of the embedded text. ``rt``: the stage's
    run-time choices (device, dtype, linear kernel, dim, cache folder and files, which include
    a reused earlier run's embeddings/ when its settings match)."""

    def __init__(self, e: EmbedSettings, rt: dict, run_id: str = "run", handler=None):
        super().__init__()
        self.e, self.rt, self.run_id = e, rt, run_id
        self.handler = handler or SentenceTransformerHandler(e, rt["device"], rt["dtype"], rt["linear"])

    def expand(self, records):
        mode = self.e.text
        columns = [pa.field("embedding", pa.list_(pa.float32(), self.rt["dim"]), nullable=False)]
        out = records | "Infer" >> CachedInference(
            "embed", self.handler, lambda r: text_hash(embed_text(r, mode)), columns, self.rt.get("cache"),
            self.rt.get("cache_files"), self.run_id, key_column="text_hash")
        counted = (out["records"] | "Vector" >> beam.Map(_vector)
                   | "Count" >> beam.ParDo(CountEmbedFn()).with_outputs(STATS, main="records"))
        return {"records": counted.records, "stats": (out["stats"], counted[STATS]) | "EmbedStats" >> beam.Flatten()}


class Cluster(beam.PTransform):
    """Records with ``_vector`` to records with ``cluster_id`` and ``cluster_sim`` (see ``curate.cluster``)."""

    def __init__(self, c: ClusterSettings, use_gpu: bool):
        super().__init__()
        self.c, self.use_gpu = c, use_gpu

    def expand(self, vectors):
        c, seed, use_gpu = self.c, self.c.seed, self.use_gpu
        n_rows = vectors | "Count" >> beam.combiners.Count.Globally()
        # The cutoff is an unsigned 64-bit rank bound (up to 2**64). ``-> int`` would give it Beam's
        # VarIntCoder, which holds signed 64-bit values only (Beam 2.78 raises on larger ones), so it
        # travels with the generic coder, which keeps any Python int.
        cutoff = n_rows | "Cutoff" >> beam.Map(clustering.sample_cutoff, c.max_sample).with_output_types(Any)
        sample = (vectors
                  | "Rank" >> beam.FlatMap(_ranked_below, seed, beam.pvalue.AsSingleton(cutoff))
                  | "Sample" >> beam.CombineGlobally(SmallestRanks(c.max_sample)))
        model = sample | "TrainKMeans" >> beam.Map(_train, beam.pvalue.AsSingleton(n_rows), c, use_gpu)
        assigned = (vectors
                    | "Batch" >> beam.BatchElements(min_batch_size=1024, max_batch_size=1024)
                    | "Assign" >> beam.ParDo(AssignFn(use_gpu), beam.pvalue.AsSingleton(model)).with_outputs(
                        STATS, main="records"))
        sizes = (assigned.records
                 | "SizeKeys" >> beam.Map(_cluster_sizes)
                 | "SizeCount" >> beam.CombinePerKey(sum)
                 | "SizeList" >> beam.combiners.ToList()
                 | "SizeReport" >> beam.Map(lambda kv: ("cluster.sizes", sorted(n for _, n in kv))))
        info = model | "ModelReport" >> beam.Map(lambda m: ("cluster.model", {"k": m["k"], "sample": m["sample"]}))
        return {"records": assigned.records, "stats": assigned[STATS],
                "reports": (sizes, info) | "Reports" >> beam.Flatten()}


class SemanticDedup(beam.PTransform):
    """SemDeDup inside each cluster, and the eps sweep counts (see ``curate.dedup.semantic``)."""

    def __init__(self, s: SemanticSettings):
        super().__init__()
        self.s = s

    def expand(self, clustered):
        out = (clustered
               | "ByCluster" >> beam.Map(lambda r: (r["cluster_id"], r))
               | "GroupCluster" >> beam.GroupByKey()
               | "SemDeDup" >> beam.ParDo(SemanticDedupFn(self.s)).with_outputs(STATS, main="records"))
        return {"records": out.records, "stats": out[STATS]}


class EmbedClusterDedup(LiveStage):
    """Embed, Cluster and SemanticDedup over the rows still in play (see ``LiveStage``).

    Returns records, stats, reports and the (id, text_hash, embedding) rows for embeddings/.
    ``rt``: the run-time choices of ``pipelines.runtime.resolve_runtime`` ("embed", "cluster")."""

    columns = CLUSTER_COLUMNS.names + SEMANTIC_COLUMNS.names
    extra_outputs = ("reports", "embeddings")

    def __init__(self, cfg: Job, rt: dict, run_id: str = "run", handler=None):
        super().__init__()
        self.e, self.c, self.s = cfg.embed, cfg.cluster, cfg.dedup.semantic
        self.rt, self.run_id, self.handler = rt, run_id, handler
        self.use_gpu = rt.get("cluster", {}).get("faiss_gpu", False)
        self.enabled = self.e.enabled or bool(self.c.column)

    def expand_live(self, live):
        if self.c.column:  # the input's own clusters: no k-means
            column = self.c.column
            live = live | "GivenCluster" >> beam.Map(
                lambda r: {**r, "cluster_id": clustering.given_cluster(r.get("original"), column), "cluster_sim": None})
            if not self.e.enabled:
                return {"records": live}
        emb = live | "Embed" >> Embed(self.e, self.rt["embed"], self.run_id, self.handler)
        embeddings = emb["records"] | "EmbeddingRows" >> beam.Map(
            lambda r: {"id": r["id"], "text_hash": r["_embed_key"], "embedding": r["_vector"]})
        if not self.c.enabled and not self.c.column:
            return {"records": emb["records"], "stats": emb["stats"], "embeddings": embeddings}
        if self.c.column:  # semantic dedup within the given clusters
            sem = emb["records"] | "SemanticDedup" >> SemanticDedup(self.s)
            return {"records": sem["records"], "stats": (emb["stats"], sem["stats"]) | "ECStats" >> beam.Flatten(),
                    "embeddings": embeddings}
        clu = emb["records"] | "Cluster" >> Cluster(self.c, self.use_gpu)
        sem = clu["records"] | "SemanticDedup" >> SemanticDedup(self.s)
        return {"records": sem["records"],
                "stats": (emb["stats"], clu["stats"], sem["stats"]) | "ECStats" >> beam.Flatten(),
                "reports": clu["reports"], "embeddings": embeddings}
