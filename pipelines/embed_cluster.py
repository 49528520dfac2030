"""Embeddings (RunInference), k-means clusters (FAISS) and semantic dedup, in Beam.

    live records -> RunInference(SentenceTransformerHandler) -> record + vector
        -> (rank, id, vector) -> CombineGlobally(smallest ranks) -> train k-means  (one step)
        -> centroids (side input) -> batched nearest-centroid assignment
        -> GroupByKey(cluster_id) -> SemDeDup inside each cluster + eps sweep counts
Rows dropped by an earlier stage go around all three and keep null columns.
"""
from __future__ import annotations

import heapq
import logging
import time

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from curate import cluster as clustering
from curate.dedup import semantic
from curate.embed import embed_text, encode, load_embedder, text_hash
from pipelines.stage import STATS, StageFn

log = logging.getLogger("curate")


class SentenceTransformerHandler(ModelHandler[dict, np.ndarray, object]):
    """Records in, unit vectors out. Loading is separate from running (Beam shares the
    loaded model across the worker's threads); the batch size is the handler's."""

    def __init__(self, model: str, device: str, dtype: str, max_seq_length: int, text: str, batch_size: int,
                 linear: str = "torch"):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self.model, self.device, self.dtype, self.linear = model, device, dtype, linear
        self.max_seq_length, self.text = max_seq_length, text

    def load_model(self):
        log.info("embed: loading %s on %s (%s, %s linears)", self.model, self.device, self.dtype, self.linear)
        return load_embedder(self.model, self.device, self.dtype, self.max_seq_length, self.linear)

    def run_inference(self, batch, model, inference_args=None):
        start = time.perf_counter()
        vectors = encode(model, [embed_text(r, self.text) for r in batch])
        per_row = (time.perf_counter() - start) / max(len(batch), 1)
        return [PredictionResult(r, (v, per_row)) for r, v in zip(batch, vectors)]

    def get_metrics_namespace(self) -> str:
        return "curate.embed"


class AttachVectorFn(StageFn):
    stage = "embed"
    metrics = ("rows", "model_rows", "model_s")

    def handle(self, result):
        record = result.example
        record["_vector"], seconds = result.inference
        self.count("rows", progress=True)
        self.count("model_rows")
        self.count("model_s", seconds)
        yield record


class ReuseFn(StageFn):
    """Rows whose text was embedded by an earlier run with the same settings take that vector."""

    stage = "embed"
    metrics = ("rows", "reused")
    NEW = "new"

    def __init__(self, text_mode: str):
        self.text_mode = text_mode

    def handle(self, record, stored):
        record["_text_hash"] = h = text_hash(embed_text(record, self.text_mode))
        vector = stored.get(h)
        if vector is None:
            yield beam.pvalue.TaggedOutput(self.NEW, record)
        else:
            record["_vector"] = np.asarray(vector, dtype=np.float32)
            self.count("rows", progress=True)
            self.count("reused")
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


def _train(sample, n_rows: int, p: dict, use_gpu: bool):
    k = p["k"] or clustering.default_k(n_rows, p["k_min"], p["k_max"])
    take = min(len(sample), p["sample_per_centroid"] * k)
    x = np.stack([s[2] for s in sample[:take]]) if take else np.zeros((0, 1), np.float32)
    if take == 0:
        return {"centroids": None, "k": 0, "sample": 0}
    centroids = clustering.train(x, k, p["seed"], p["niter"], use_gpu)
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

    def __init__(self, p: dict):
        self.p = p

    def handle(self, element):
        _, records = element
        records = list(records)
        x = np.stack([r["_vector"] for r in records])
        eps = self.p["eps"] if self.p["enabled"] else None
        records, sweep = semantic.dedup_cluster(records, x, eps, self.p["keep"], semantic.SWEEP_EPS,
                                                self.p["block_size"])
        for e, n in sweep.items():
            self.count("sweep", n, reason=f"eps_{e}")
        for rec in records:
            if rec.get("semantic_dup_of"):
                self.count("dropped", source=rec["source"])
        self.count("rows", len(records))
        yield from records


def _null_columns(record: dict) -> dict:
    for name in ("cluster_id", "cluster_sim", "semantic_dup_of"):
        record.setdefault(name, None)
    return record


def _cluster_sizes(record: dict):
    return record["cluster_id"], 1


class Embed(beam.PTransform):
    """Records to records with ``_vector`` (RunInference over sentence-transformers).

    ``reuse``: (text_hash, vector) pairs from an earlier run made with the same
    settings; rows whose text hash is among them skip the model.
    """

    def __init__(self, e: dict, device: str, dtype: str, reuse: str | None = None, linear: str = "torch"):
        super().__init__()
        self.handler = SentenceTransformerHandler(e["model"], device, dtype, e["max_seq_length"], e["text"],
                                                  e["batch_size"], linear)
        self.text_mode, self.reuse = e["text"], reuse

    def expand(self, records):
        stats = []
        if self.reuse:
            stored = (records.pipeline
                      | "ReadStored" >> beam.io.ReadFromParquet(f"{self.reuse}/*.parquet",
                                                                columns=["text_hash", "embedding"])
                      | "StoredPairs" >> beam.Map(lambda r: (r["text_hash"], r["embedding"])))
            split = records | "Reuse" >> beam.ParDo(ReuseFn(self.text_mode), beam.pvalue.AsDict(stored)).with_outputs(
                ReuseFn.NEW, STATS, main="reused")
            records, reused = split[ReuseFn.NEW], split.reused
            stats.append(split[STATS])
        out = (records
               | "RunInference" >> RunInference(self.handler)
               | "AttachVector" >> beam.ParDo(AttachVectorFn()).with_outputs(STATS, main="records"))
        stats.append(out[STATS])
        vectors = out.records
        if self.reuse:
            vectors = (reused, vectors) | "AllVectors" >> beam.Flatten()
        return {"records": vectors, "stats": stats | "EmbedStats" >> beam.Flatten()}


class Cluster(beam.PTransform):
    """Records with ``_vector`` to records with ``cluster_id`` and ``cluster_sim`` (see ``curate.cluster``)."""

    def __init__(self, c: dict, use_gpu: bool):
        super().__init__()
        self.c, self.use_gpu = c, use_gpu

    def expand(self, vectors):
        c, seed, use_gpu = self.c, self.c["seed"], self.use_gpu
        n_rows = vectors | "Count" >> beam.combiners.Count.Globally()
        sample = (vectors
                  | "Rank" >> beam.Map(lambda r: (clustering.sample_rank(seed, r["id"]), r["id"], r["_vector"]))
                  | "Sample" >> beam.CombineGlobally(SmallestRanks(c["max_sample"])))
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

    def __init__(self, s: dict):
        super().__init__()
        self.s = s

    def expand(self, clustered):
        out = (clustered
               | "ByCluster" >> beam.Map(lambda r: (r["cluster_id"], r))
               | "GroupCluster" >> beam.GroupByKey()
               | "SemDeDup" >> beam.ParDo(SemanticDedupFn(self.s)).with_outputs(STATS, main="records"))
        return {"records": out.records, "stats": out[STATS]}


class EmbedClusterDedup(beam.PTransform):
    """Embed, Cluster and SemanticDedup over the rows still in play; the others pass around.

    Returns records, stats, reports and the (id, embedding) rows for embeddings/."""

    def __init__(self, cfg: dict, device: str, dtype: str, use_gpu: bool, reuse: str | None = None,
                 linear: str = "torch"):
        super().__init__()
        self.e, self.c, self.s = cfg["embed"], cfg["cluster"], cfg["dedup"]["semantic"]
        self.device, self.dtype, self.use_gpu, self.reuse, self.linear = device, dtype, use_gpu, reuse, linear

    def expand(self, records):
        p = records.pipeline
        if not self.e["enabled"]:
            empty = p | "NoEmbedOutputs" >> beam.Create([])
            return {"records": records | "NoEmbed" >> beam.Map(_null_columns), "stats": empty,
                    "reports": empty, "embeddings": empty}
        live = records | "Live" >> beam.Filter(lambda r: r.get("drop_reason") is None)
        done = (records | "Dropped" >> beam.Filter(lambda r: r.get("drop_reason") is not None)
                | "NullColumns" >> beam.Map(_null_columns))
        emb = live | "Embed" >> Embed(self.e, self.device, self.dtype, self.reuse, self.linear)
        mode = self.e["text"]
        embeddings = emb["records"] | "EmbeddingRows" >> beam.Map(
            lambda r: {"id": r["id"], "text_hash": r.get("_text_hash") or text_hash(embed_text(r, mode)),
                       "embedding": r["_vector"]})
        stats = [emb["stats"]]
        if not self.c["enabled"]:
            out = (done, emb["records"] | "NoCluster" >> beam.Map(_null_columns)) | "EmbedOut" >> beam.Flatten()
            return {"records": out, "stats": stats | "EStats" >> beam.Flatten(),
                    "reports": p | "NoReports" >> beam.Create([]), "embeddings": embeddings}
        clu = emb["records"] | "Cluster" >> Cluster(self.c, self.use_gpu)
        sem = clu["records"] | "SemanticDedup" >> SemanticDedup(self.s)
        stats += [clu["stats"], sem["stats"]]
        out = (done, sem["records"]) | "ClusterOut" >> beam.Flatten()
        return {"records": out, "stats": stats | "ECStats" >> beam.Flatten(), "reports": clu["reports"],
                "embeddings": embeddings}
