"""Near-duplicate removal on the batch path: band keys, candidates, edges and clusters in arrays.

The row path's rules (``curate.dedup.near``: LSH buckets, star edges to the smallest id, edges
verified by the signatures' estimated Jaccard, clusters named by their smallest id, the longest
response kept), on elements that each carry many rows:

    band keys + locators by bucket shard -> buckets of >= 2 live rows (locators, in numpy)
    -> candidates (their sorted locators) -> their ids, lengths and signatures (computed again)
    -> star edges (one worker: candidates only) -> verified by verify shard, in vectors
    -> clusters by union-find and the keep rule (one worker: verified edges only)
"""
from __future__ import annotations

import logging
from collections import defaultdict

import apache_beam as beam
import numpy as np
import pyarrow as pa

from curate.dedup import minhash
from curate.dedup.near import UnionFind, bucket_edges, keep_order, size_histogram
from pipelines.locators import member, sorted_side_input, sorted_union, stable_shard, unpack
from pipelines.stage import STATS, StageFn

log = logging.getLogger("curate")

VERIFY_SHARDS = 16  # edges and candidate signatures meet in this many parts


def _vshard(rid: str) -> int:
    return stable_shard(rid, VERIFY_SHARDS)


def _by_vshard(items, key):
    """{shard: [item, ...]} by ``key(item)``'s id."""
    out = defaultdict(list)
    for item in items:
        out[_vshard(key(item))].append(item)
    return out


class BucketsFn(StageFn):
    """One band-key shard, in arrays: the rows still live (not rejected, not an exact duplicate),
    and for each bucket of two or more of them its members' locators (``buckets``, one list per
    shard) and all those locators (``ends``: the candidates whose signatures are computed again).
    No id travels with a band key; the star edges are drawn once the candidates' ids are known
    (``StarEdgesFn``)."""

    stage = "near_dedup"
    metrics = ("big_buckets",)

    def __init__(self, max_bucket):
        self.max_bucket = max_bucket
        self._sorted_cache = (None, None)

    def handle(self, element, gone):
        _, parts = element
        parts = list(parts)
        keys = np.concatenate([k for k, _ in parts]) if parts else np.zeros(0, np.uint64)
        locs = np.concatenate([loc for _, loc in parts]) if parts else np.zeros(0, np.int64)
        keep = ~member(locs, sorted_side_input(self, gone)) & (keys != minhash.EMPTY)
        keys, locs = keys[keep], locs[keep]
        order = np.lexsort((locs, keys))
        keys, locs = keys[order], locs[order]
        once = np.concatenate([[True], (keys[1:] != keys[:-1]) | (locs[1:] != locs[:-1])]) if len(keys) else keys > 0
        keys, locs = keys[once], locs[once]  # a row twice under one key (two bands alike) counts once
        starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])) if len(keys) else np.zeros(0, int)
        sizes = np.diff(np.append(starts, len(keys)))
        in_bucket = np.repeat(sizes >= 2, sizes)  # buckets of one row have no edge
        sizes = sizes[sizes >= 2]
        for size in sizes[sizes > self.max_bucket] if self.max_bucket else ():
            log.warning("near_dedup: a bucket of %d documents (above max_bucket_size %d)", size, self.max_bucket)
        if self.max_bucket and (sizes > self.max_bucket).any():
            self.count("big_buckets", int((sizes > self.max_bucket).sum()))
        if len(sizes):
            members = locs[in_bucket]  # each bucket's locators, sorted, buckets in key order
            yield members, sizes.astype(np.int64)  # two arrays, not one per bucket
            yield beam.pvalue.TaggedOutput("ends", np.unique(members))


class StarEdgesFn(beam.DoFn):
    """Every bucket's members by id on one worker (the buckets and the candidates' ids are the
    near-duplicate candidates only): star edges (smallest id, other), as
    ``curate.dedup.near.bucket_edges`` draws them, as lists keyed by the verify shard of the
    first id."""

    def process(self, buckets, infos):
        id_of = {loc: rid for part in infos for rid, loc, _, _ in part}
        edges = set()
        for members, sizes in buckets:  # a bucket's key here is its place in the list
            keys = np.repeat(np.arange(len(sizes), dtype=np.uint64), sizes)
            edges |= bucket_edges(keys, [id_of[loc] for loc in members.tolist()])[0]
        for vs, part in sorted(_by_vshard(edges, lambda e: e[0]).items()):
            yield vs, sorted(part)


class NearRowsFn(StageFn):
    """The rows on a candidate edge (``candidates``: their sorted locators, 8 bytes a row on an
    edge, about 1.6 MB at a million rows): their signatures (when verifying, by verify shard) and
    what the keep rule reads (``info``: id, locator, response length, source)."""

    stage = "near_dedup"
    metrics = ("rows", "signatures_recomputed")

    def __init__(self, p, verify: bool):
        self.p, self.verify = p, verify
        self._sorted_cache = (None, None)

    def handle(self, element, candidates, changes, gone):
        source, data = element
        rows = unpack(data)
        locs = rows.column("loc").to_numpy()
        live = ~member(locs, sorted_side_input(self, gone))
        self.count("rows", int(live.sum()))
        chosen = np.flatnonzero(live & member(locs, candidates))
        if not len(chosen):
            return
        ids, lengths = rows.column("id").to_pylist(), rows.column("length").to_numpy()
        pick = [(int(j), changes.get(int(locs[j]), ids[j]), int(locs[j])) for j in chosen]
        yield beam.pvalue.TaggedOutput("info", [(rid, loc, int(lengths[j]), source) for j, rid, loc in pick])
        if self.verify:
            p = self.p
            texts = rows.column("text").take(pa.array(chosen, pa.int64())).to_pylist()
            sigs = minhash.signatures(texts, p.num_perm, p.seed, p.ngram, p.unit)
            self.count("signatures_recomputed", len(pick))
            for vs, part in _by_vshard(range(len(pick)), lambda i: pick[i][1]).items():
                yield vs, ([pick[i][1] for i in part], sigs[part])


def _sig_lookup(sig_parts) -> tuple[dict, np.ndarray | None]:
    ids, mats = [], []
    for part_ids, mat in sig_parts:
        ids += part_ids
        mats.append(mat)
    return {rid: i for i, rid in enumerate(ids)}, (np.concatenate(mats) if mats else None)


def _check_signed(where: dict, ids) -> None:
    """Every id on an edge is a candidate, so its signature is here; a missing one is a bug, said
    in one line rather than an edge lost without a trace."""
    missing = [rid for rid in ids if rid not in where]
    if missing:
        raise RuntimeError(f"near_dedup: no signature for {len(missing)} row(s) on a candidate edge "
                           f"(first: {missing[0]!r}); please report this with the job file")


def _first_half(element):
    """One verify shard: each distinct edge (a, b) with a's signature, sent to b's shard; the
    shard's own signatures go on beside them, so the second step reads them from here rather
    than from a second copy the runner would keep of the signatures."""
    shard, joined = element
    where, sigs = _sig_lookup(joined["sig"])
    edges = sorted({tuple(e) for part in joined["edges"] for e in part})
    _check_signed(where, (a for a, _ in edges))
    for vs, part in _by_vshard(edges, lambda e: e[1]).items():
        yield vs, ("half", part, sigs[[where[a] for a, _ in part]])
    if sigs is not None:
        yield shard, ("sig", list(where), sigs)


class VerifyEdgesFn(StageFn):
    """One verify shard: the estimated Jaccard of each edge whose second id lives here
    (``minhash.estimate_jaccard``, in vectors); edges at or above the threshold go on."""

    stage = "near_dedup"
    metrics = ("edges_verified", "edges_rejected")

    def __init__(self, threshold: float):
        self.threshold = threshold

    def handle(self, element):
        _, items = element
        items = list(items)
        where, sigs = _sig_lookup([(ids, mat) for kind, ids, mat in items if kind == "sig"])
        out = []
        for edges, sig_a in ((e, m) for kind, e, m in items if kind == "half"):
            _check_signed(where, (b for _, b in edges))
            sig_b = sigs[[where[b] for _, b in edges]]
            j = np.mean(sig_a == sig_b, axis=1)
            empty = np.all(sig_a == minhash.EMPTY, axis=1) | np.all(sig_b == minhash.EMPTY, axis=1)
            j[empty] = 0.0
            ok = j >= self.threshold
            self.count("edges_verified", int(ok.sum()))
            self.count("edges_rejected", int((~ok).sum()))
            out += [(a, b, float(x)) for (a, b), x, keep in zip(edges, j, ok) if keep]
        if out:
            yield out


class ClustersFn(StageFn):
    """Every verified edge and the candidates' keep-rule facts on one worker: components by
    union-find (``curate.dedup.near.UnionFind``: a cluster is named by its smallest id), then in
    each cluster the longest response kept, then the smallest id (``curate.dedup.near.keep_key``).
    Why one worker: the edges are the near-duplicate pairs only (two ids each, about one edge for
    every ten rows in the scale pools); the row path's label rounds spread a pool of hundreds of
    millions of rows."""

    stage = "near_dedup"
    metrics = ("dropped", "clusters")

    def handle(self, edges, infos):
        uf = UnionFind()
        for part in edges:
            for a, b, _ in part:
                uf.union(a, b)
        clusters = uf.clusters()
        members = defaultdict(list)
        for part in infos:
            for rid, loc, length, source in part:
                if rid in clusters:
                    members[clusters[rid]].append((keep_order(length, rid), loc, source))
        for size, n in sorted(size_histogram(clusters).items()):
            self.count("clusters", n, reason=f"size_{size}")
        out = []
        for cluster, group in members.items():
            group.sort()
            keeper = group[0][0][1]
            for (_, rid), loc, source in group:
                if rid != keeper:
                    self.count("dropped", source=source)
                out.append((loc, (cluster, None if rid == keeper else keeper)))
        yield out


def _examples(edges) -> tuple:
    smallest = sorted((j if j is not None else -1.0, a, b) for part in edges for a, b, j in part)[:5]
    return ("near_dedup.examples", [{"a": a, "b": b, "estimated_jaccard": round(j, 4) if j >= 0 else None}
                                    for j, a, b in smallest])


class Near(beam.PTransform):
    """Band-key arrays -> lists of (loc, (cluster, near_dup_of)) for every row in a cluster, the
    stats and the examples report; ids are the renumbered ones, rows gone earlier take no part.
    Every element is a list or an array of many rows, edges or signatures."""

    def __init__(self, p, changes, gone, near_rows):
        super().__init__()
        self.p, self.changes, self.gone, self.near_rows = p, changes, gone, near_rows

    def expand(self, bands):
        p, changes, gone = self.p, beam.pvalue.AsDict(self.changes), beam.pvalue.AsList(self.gone)
        bucket = (bands | "GroupShards" >> beam.GroupByKey()
                  | "Buckets" >> beam.ParDo(BucketsFn(p.max_bucket_size), gone).with_outputs(
                      STATS, "ends", main="buckets"))
        candidates = bucket.ends | "Candidates" >> beam.CombineGlobally(sorted_union)
        rows = self.near_rows | "CandidateRows" >> beam.ParDo(
            NearRowsFn(p, p.verify), beam.pvalue.AsSingleton(candidates), changes, gone).with_outputs(
            STATS, "info", main="sigs")
        star = (bucket.buckets | "AllBuckets" >> beam.combiners.ToList()
                | "StarEdges" >> beam.ParDo(StarEdgesFn(), beam.pvalue.AsList(rows.info)))
        stats = [bucket[STATS], rows[STATS]]
        if p.verify:
            half = ({"edges": star, "sig": rows.sigs} | "JoinFirst" >> beam.CoGroupByKey()
                    | "FirstHalf" >> beam.FlatMap(_first_half))
            verified = (half | "JoinSecond" >> beam.GroupByKey()
                        | "Verify" >> beam.ParDo(VerifyEdgesFn(p.threshold)).with_outputs(STATS, main="edges"))
            stats.append(verified[STATS])
            kept = verified.edges
        else:
            kept = (star | "EdgesByShard" >> beam.GroupByKey()
                    | "Unverified" >> beam.MapTuple(
                        lambda _, parts: [(a, b, None) for a, b in sorted({tuple(e) for x in parts for e in x})]))
        all_edges = kept | "AllEdges" >> beam.combiners.ToList()
        resolved = all_edges | "Clusters" >> beam.ParDo(
            ClustersFn(), beam.pvalue.AsList(rows.info)).with_outputs(STATS, main="decisions")
        stats.append(resolved[STATS])
        examples = all_edges | "Examples" >> beam.Map(_examples)
        return {"decisions": resolved.decisions, "stats": stats | "NearStats" >> beam.Flatten(), "reports": examples}
