"""The near-duplicate stage in Beam: signatures, LSH buckets, verified star edges, union-find.

Graph (rows already dropped upstream go around the stage untouched):

    records -> batches -> signatures -> (shard, bucket keys, ids) -> GroupByKey(shard)
                                     -> star edges -> Distinct
    verify: ids on an edge -> GroupByKey(filter shard) -> Bloom filter parts (side input)
            -> signatures again, for those ids only (and the filter's rare false positives)
            -> CoGroupByKey x2 with the edges -> estimated Jaccard >= threshold
    verified edges -> components: labels (min per id) -> 2 x [CoGroupByKey(id) -> min per id]
                   -> labels still linked by an edge -> CombineGlobally(union-find) -> (id, cluster)
    records --CoGroupByKey(id)--> in a cluster -> GroupByKey(cluster) -> keep rule; others pass.

Bucket entries travel as one element per (batch, shard) (numpy arrays, ~70 entries),
not one per (document, band), since Beam costs tens of microseconds per element. Only
documents that share a bucket with another are verified, so their signatures are
recomputed (about 50k documents/s) rather than every signature being shuffled. Which
documents those are reaches every worker as a Bloom filter (``curate.dedup.bloom``, 10 bits a
candidate, built shard by shard), not as a set of ids. The components are found by label
propagation joined by id (``Components``): the union-find on one worker sees only the labels that
two rounds left linked, a few per cluster wider than the rounds reach.
"""
from __future__ import annotations

import logging

import apache_beam as beam
import numpy as np

from curate.dedup import bloom, minhash
from curate.dedup.near import COLUMNS as NEAR_COLUMNS
from curate.dedup.near import (UnionFind, band_keys, bucket_edges, resolve_cluster,
                               source_salt)
from curate.settings import Job
from curate.settings import NearDedup as NearDedupSettings
from curate.stats import stat_key
from pipelines.locators import positions_by_shard
from pipelines.stage import STATS, LiveStage, StageFn

log = logging.getLogger("curate")
# Bucket entries are grouped by shard (a bucket key's residue), so one shard's group holds
# rows x bands / N_SHARDS entries of the whole pool: 512 keeps it near 20k entries (2 MB of work)
# at a million rows and 2M at a hundred million (16 shards held 563k entries, 61 MB of work, at a
# million). A batch spreads its rows x bands entries over the shards, so the
# signatures run on batches of at least SIGNATURE_BATCH rows: about 70 entries per element.
N_SHARDS = 512
SIGNATURE_BATCH = 4096
BUCKETS, CLUSTERED = "buckets", "clustered"
STAGE = "near_dedup"


def near_text(record: dict, which: str) -> str:
    return record["response"] if which == "response" else record["prompt"] + "\n" + record["response"]


def _signatures(batch: list[dict], p: NearDedupSettings) -> np.ndarray:
    return minhash.signatures([near_text(r, p.text) for r in batch], p.num_perm, p.seed,
                              p.ngram, p.unit)


class SignatureFn(StageFn):
    stage = STAGE
    metrics = ("rows",)

    def __init__(self, p: NearDedupSettings):
        self.p = p

    def handle(self, batch):
        p = self.p
        sigs = _signatures(batch, p)
        salts = (np.array([source_salt(r["source"]) for r in batch], dtype=np.uint64)
                 if p.scope == "source" else None)
        keys = band_keys(sigs, p.bands, p.rows, salts)
        yield from (beam.pvalue.TaggedOutput(BUCKETS, entry) for entry in shard_entries(keys, [r["id"] for r in batch]))
        self.count("rows", len(batch), progress=True)


def shard_entries(keys: np.ndarray, ids: list[str], shards: int = N_SHARDS):
    """(shard, (bucket keys, their documents' ids)) for each shard a batch's (docs x bands) keys
    reach; a bucket's keys all land in one shard (the key decides it)."""
    flat = keys.ravel()
    owner = np.repeat(np.arange(len(ids)), keys.shape[1])
    for s, part in positions_by_shard((flat % np.uint64(shards)).astype(np.int64)):
        yield s, (flat[part], [ids[i] for i in owner[part]])


class CandidateSignatureFn(StageFn):
    """(id, signature bytes) for the records on a candidate edge, as far as the candidates' Bloom
    filter tells: its rare false positives get a signature that then meets no edge."""

    stage = STAGE
    metrics = ("signatures_recomputed",)

    def __init__(self, p: NearDedupSettings):
        self.p = p

    def handle(self, batch, candidates):
        batch = [r for r in batch if bloom.might_contain(candidates, r["id"])]
        if batch:
            for rec, sig in zip(batch, _signatures(batch, self.p)):
                yield rec["id"], sig.tobytes()
            self.count("signatures_recomputed", len(batch))


class BucketEdgesFn(StageFn):
    stage = STAGE
    metrics = ("big_buckets",)

    def __init__(self, max_bucket: int):
        self.max_bucket = max_bucket

    def handle(self, element):
        shard, chunks = element
        chunks = list(chunks)
        keys = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.uint64)
        ids = [i for c in chunks for i in c[1]]
        edges, big = bucket_edges(keys, ids, self.max_bucket)
        for size in big:
            log.warning("near_dedup: a bucket of %d documents (above max_bucket_size %d) in shard %d",
                        size, self.max_bucket, shard)
        if big:
            self.count("big_buckets", len(big))
        yield from sorted(edges)


def _fan_out(element):
    """(a, {sig: [sig_a], to: [b...]}) -> (b, (a, sig_a)) for each edge a-b."""
    a, grouped = element
    if grouped["to"] and grouped["sig"]:
        sig_a = grouped["sig"][0]
        for b in grouped["to"]:
            yield b, (a, sig_a)


class VerifyFn(StageFn):
    stage = STAGE
    metrics = ("edges_verified", "edges_rejected")

    def __init__(self, threshold: float):
        self.threshold = threshold

    def handle(self, element):
        b, grouped = element
        if not grouped["sig"]:
            return
        sig_b = np.frombuffer(grouped["sig"][0], dtype=np.uint64)
        for a, sig_a in grouped["from"]:
            j = minhash.estimate_jaccard(np.frombuffer(sig_a, dtype=np.uint64), sig_b)
            if j >= self.threshold:
                self.count("edges_verified")
                yield a, b, j
            else:
                self.count("edges_rejected")


class UnionFindFn(beam.CombineFn):
    """Edges to {id: cluster id}; accumulators merge in any order to the same clusters."""

    def create_accumulator(self):
        return UnionFind()

    def add_input(self, acc, edge):
        acc.union(edge[0], edge[1])
        return acc

    def merge_accumulators(self, accs):
        accs = iter(accs)
        first = next(accs)
        for other in accs:
            first.merge(other)
        return first

    def extract_output(self, acc):
        return acc.clusters()


LABEL_ROUNDS = 2  # rounds of min-label propagation before the union-find of what is left


class Components(beam.PTransform):
    """Verified edges (a, b, j) -> (id, smallest id of its component), for every id on an edge,
    without the graph on one worker (``curate.dedup.near.components_in_rounds`` in one process):
    each id's label starts as the smallest id among itself and its neighbours, ``rounds`` rounds of
    min-label propagation follow (a join by id and a min per id each), and a union-find on one
    worker joins only the labels still linked by an edge, a few per component wider than the rounds
    reach (none in most pools: near-duplicate clusters are small stars)."""

    def __init__(self, rounds: int = LABEL_ROUNDS):
        super().__init__()
        self.rounds = rounds

    def expand(self, edges):
        adjacent = edges | "BothWays" >> beam.FlatMap(lambda e: [(e[0], e[1]), (e[1], e[0])])
        labels = (adjacent | "NearestLabel" >> beam.CombinePerKey(min)
                  | "OwnLabel" >> beam.MapTuple(lambda v, m: (v, min(v, m))))

        def spread(kv):
            u, joined = kv
            label = next(iter(joined["label"]))
            yield u, label
            for v in joined["adjacent"]:
                yield v, label

        for r in range(self.rounds):
            labels = ({"label": labels, "adjacent": adjacent} | f"JoinLabels{r}" >> beam.CoGroupByKey()
                      | f"Spread{r}" >> beam.FlatMap(spread) | f"MinLabel{r}" >> beam.CombinePerKey(min))

        def across(kv):  # neighbours' labels that differ from this id's own: the edges left to join
            _, joined = kv
            label = next(iter(joined["label"]))
            for other in joined["heard"]:
                if other != label:
                    yield (label, other) if label < other else (other, label)

        heard = ({"label": labels, "adjacent": adjacent} | "JoinLast" >> beam.CoGroupByKey()
                 | "Heard" >> beam.FlatMap(lambda kv: [(v, next(iter(kv[1]["label"]))) for v in kv[1]["adjacent"]]))
        roots = ({"label": labels, "heard": heard} | "JoinHeard" >> beam.CoGroupByKey()
                 | "Across" >> beam.FlatMap(across) | "DistinctAcross" >> beam.Distinct()
                 | "UnionFind" >> beam.CombineGlobally(UnionFindFn())  # labels left linked only
                 | "Roots" >> beam.FlatMap(lambda m: m.items()))

        def settle(kv):
            label, joined = kv
            root = next(iter(joined["root"]), label)
            for v in joined["ids"]:
                yield v, root

        return ({"ids": labels | "ByLabel" >> beam.MapTuple(lambda v, label: (label, v)), "root": roots}
                | "JoinRoots" >> beam.CoGroupByKey() | "Settle" >> beam.FlatMap(settle))


def _cluster_sizes(pairs):
    """(id, cluster) pairs -> (stat key, clusters of that size), as ``size_histogram`` counts them."""
    return (pairs | "PerCluster" >> beam.MapTuple(lambda _, c: (c, 1)) | "ClusterSizes" >> beam.CombinePerKey(sum)
            | "SizeOf" >> beam.MapTuple(lambda _, n: n) | "SizeCounts" >> beam.combiners.Count.PerElement()
            | "SizeStats" >> beam.MapTuple(size_stat))


def _with_near_fields(record: dict) -> dict:
    record.setdefault("near_dup_cluster", None)
    record.setdefault("near_dup_of", None)
    return record


class RouteFn(beam.DoFn):
    """(id, {rec: [record], cluster: [cluster id] or []}) to the record alone, or tagged with its
    cluster: a join by id, so no worker holds the whole cluster map."""

    def process(self, element):
        _, joined = element
        cluster = next(iter(joined["cluster"]), None)
        for record in joined["rec"]:
            if cluster is None:
                yield _with_near_fields(record)
            else:
                yield beam.pvalue.TaggedOutput(CLUSTERED, (cluster, record))


class ResolveClusterFn(StageFn):
    stage = STAGE
    metrics = ("dropped",)

    def handle(self, element):
        cluster, records = element
        for rec in resolve_cluster(list(records), cluster):
            if rec["near_dup_of"] is not None:
                self.count("dropped", source=rec["source"])
            yield rec


def size_stat(size: int, clusters: int) -> tuple[str, int]:
    """The stat for ``clusters`` near-duplicate clusters of ``size`` rows."""
    return stat_key(STAGE, "clusters", f"size_{size}"), clusters


class NearDedup(LiveStage):
    """Mark near-duplicates (MinHash LSH, see ``curate.dedup.near``); keep one per cluster."""

    columns = NEAR_COLUMNS.names
    extra_outputs = ("reports",)

    def __init__(self, cfg: Job):
        super().__init__()
        self.p = cfg.dedup.near
        self.batch_size = cfg.batch_size
        self.enabled = self.p.enabled

    def expand_live(self, live):
        p = self.p
        size = max(self.batch_size, SIGNATURE_BATCH)
        batches = live | "Batch" >> beam.BatchElements(min_batch_size=size, max_batch_size=size)
        sig = batches | "Signatures" >> beam.ParDo(SignatureFn(p)).with_outputs(BUCKETS, STATS)
        bucket = (sig[BUCKETS]
                  | "GroupShards" >> beam.GroupByKey()
                  | "StarEdges" >> beam.ParDo(BucketEdgesFn(p.max_bucket_size)).with_outputs(STATS, main="edges"))
        edges = bucket.edges | "DistinctEdges" >> beam.Distinct()
        stats = [sig[STATS], bucket[STATS]]
        if p.verify:
            candidates = (edges
                          | "EdgeEnds" >> beam.FlatMap(lambda e: ((bloom.shard_of(rid), rid) for rid in e))
                          | "GroupFilterShards" >> beam.GroupByKey()
                          | "ShardFilters" >> beam.MapTuple(lambda shard, ids: (shard, bloom.shard_filter(ids))))
            cand = batches | "CandidateSignatures" >> beam.ParDo(
                CandidateSignatureFn(p), beam.pvalue.AsDict(candidates)).with_outputs(STATS, main="sigs")
            stats.append(cand[STATS])
            to_b = ({"sig": cand.sigs, "to": edges | "ByFirst" >> beam.Map(tuple)}
                    | "JoinFirst" >> beam.CoGroupByKey() | "FanOut" >> beam.FlatMap(_fan_out))
            verified = ({"sig": cand.sigs, "from": to_b}
                        | "JoinSecond" >> beam.CoGroupByKey()
                        | "Verify" >> beam.ParDo(VerifyFn(p.threshold)).with_outputs(STATS, main="edges"))
            stats.append(verified[STATS])
            kept_edges = verified.edges
        else:
            kept_edges = edges | "Unverified" >> beam.Map(lambda e: (e[0], e[1], None))
        clusters = kept_edges | "Components" >> Components()
        joined = ({"rec": live | "ById" >> beam.Map(lambda r: (r["id"], r)), "cluster": clusters}
                  | "JoinClusters" >> beam.CoGroupByKey())
        routed = joined | "Route" >> beam.ParDo(RouteFn()).with_outputs(CLUSTERED, main="single")
        resolved = (routed[CLUSTERED]
                    | "GroupClusters" >> beam.GroupByKey()
                    | "KeepRule" >> beam.ParDo(ResolveClusterFn()).with_outputs(STATS, main="records"))
        stats += [resolved[STATS], _cluster_sizes(clusters)]
        examples = (kept_edges
                    | "ExampleKeys" >> beam.Map(lambda e: (e[2] if e[2] is not None else -1.0, e[0], e[1]))
                    | "Examples" >> beam.combiners.Top.Smallest(5)
                    | "ExampleReport" >> beam.Map(lambda xs: ("near_dedup.examples", [
                        {"a": a, "b": b, "estimated_jaccard": round(j, 4) if j >= 0 else None}
                        for j, a, b in xs])))
        out = (routed.single, resolved.records) | "NearOut" >> beam.Flatten()
        return {"records": out, "stats": stats | "NearStats" >> beam.Flatten(), "reports": examples}
