"""The non-model path with batches as elements: decisions are shuffled, rows are not.

Why: the row path (``pipelines.graph`` with ``path: row``) moves one Python dict per row through
every shuffle and keeps each materialized collection in memory, about 32 KB a row on the
in-process runner. Here a row never crosses a shuffle:

    units (pieces of the input files)
      Scan: read + validate each unit in batches; per batch, compact arrays only:
            ids, exact keys, LSH band keys (with a 64-bit locator, unit << 32 | row),
            the near text of the rows (for the candidates' signatures), selection features
      Ids:   (id, locator) arrays by id shard -> repeated ids numbered / rejected
      Exact: (key, id, locator) arrays by key shard -> one kept per key
      Near:  band keys by bucket shard -> star edges -> verified (signatures again for the
             candidates only) -> components (``pipelines.near_dedup.Components``) -> keep rule
      Select (keyed policies): row keys per batch -> quotas, cut points, ranges -> ranks
      Apply: every decision grouped by unit; each unit is read again, its rows get their
             decisions and leave as Arrow tables for ``WriteToParquetBatched``.

A unit is read twice (reading and validating cost about a tenth of the path); in exchange no
collection holds the rows' text, only a few numbers a row and the near text of the batch.
Decisions that later steps need (renamed or rejected ids, rows already dropped) reach them as
side inputs keyed by locator: they cover the rows that changed, a small share of the pool.

The rules are the row path's (``curate.ids``, ``curate.dedup``, ``curate.select.keyed``), so the
outputs are the same (tests/test_batched.py compares the two); the path runs when no model or
rewrite stage is on and the policy is keyed (``eligible``), else the row path runs.
"""
from __future__ import annotations

import logging
import zlib
from collections import Counter, defaultdict

import apache_beam as beam
import numpy as np
import pyarrow as pa

from curate.dedup import minhash
from curate.dedup.exact import dedup_key
from curate.dedup.near import UnionFind, band_keys, source_salt
from curate.io import SourceReadError, iter_file, sample_rows
from curate.records import convert, make_reject
from curate.select import keyed as K
from curate.select import scope as S
from curate.select.features import FEATURES, cluster_name, features_batch
from curate.settings import Job
from curate.stats import stat_key
from pipelines import transforms as T
from pipelines.near_dedup import N_SHARDS, SIGNATURE_BATCH
from pipelines.select import _Report, policy_from
from pipelines.stage import STATS, StageFn

log = logging.getLogger("curate")
SHIFT = 32  # a locator is unit << SHIFT | the row's place among the unit's rows
KEY_SHARDS = 64  # id and exact-key arrays are grouped in this many parts
MODEL_STAGES = ("embed", "cluster", "score", "rds", "less", "degradation", "rewrite")
IDS, EXACT, BANDS, NEAR_ROWS, FEATS, REJECTS = "ids", "exact", "bands", "near_rows", "feats", "rejects"
# the columns a row has before any decision (the record's own)
BASE_COLUMNS = ("id", "source", "prompt", "response", "instruction", "input", "messages", "original")


def _base_schema() -> pa.Schema:
    from curate.schema import ANNOTATED

    return pa.schema([pa.field("_loc", pa.int64()), *(ANNOTATED.field(c) for c in BASE_COLUMNS)])


_BASE_SCHEMA = _base_schema()


def eligible(cfg: Job, rt: dict) -> str | None:
    """None when the batch path can run the job, else why not (the row path runs it)."""
    if cfg.path == "row":
        return "path: row"
    on = [k for k in MODEL_STAGES if k in rt]
    if on:
        return f"model or rewrite stages on ({', '.join(on)})"
    if cfg.cluster.column:
        return "cluster.column is set"
    policy, budget, _ = policy_from(cfg)
    if cfg.select.scope != "global" or not K.applies(policy, budget):
        return f"policy {policy.name} with scope {cfg.select.scope} is not keyed"
    return None


def stable_shard(text: str, shards: int) -> int:
    """A shard from the text alone (Python's ``hash`` is salted per process)."""
    return zlib.crc32(text.encode("utf-8")) % shards


def unit_rows(unit: dict, spec, sample, on_file=None):
    """(place, kind, item) for each row of a unit, in the same order on every read: ``kind`` is
    ``record`` (with ``_file``/``_row``) or ``reject``. ``on_file(file)`` is told each file started."""
    piece = unit.get("range")

    def raws():
        for f in unit["files"]:
            if on_file is not None and (piece is None or piece[0] == 0):
                on_file(f)
            yield from iter_file(f.path, f.format, piece)

    s = sample
    try:
        for i, raw in enumerate(sample_rows(raws(), unit["source"], s.mode, s.n, s.fraction, s.seed)):
            if raw.bad_reason:
                yield i, "reject", make_reject(unit["source"], raw.file, raw.row_number, raw.bad_reason,
                                               raw.bad_detail, raw.raw_text)
                continue
            kind, item = convert(raw.value, spec, raw.file, raw.row_number)
            if kind == "record":
                item["_file"], item["_row"] = raw.file, raw.row_number
            yield i, kind, item
    except SourceReadError as err:
        raise SourceReadError(T.INPUT_ERROR + str(err)) from None


def _chunks(items, size):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def near_text(rec: dict, which: str) -> str:
    return rec["response"] if which == "response" else rec["prompt"] + "\n" + rec["response"]


class ScanFn(StageFn):
    """A unit's rows to compact per-batch arrays (and its rejects); counts as read and validate."""

    stage = "read"
    metrics = ("files", "rows", "rows_seen")

    def __init__(self, cfg: Job):
        self.specs = T.row_specs(cfg)
        self.sample, self.size = cfg.sample, max(cfg.batch_size, SIGNATURE_BATCH)
        self.exact, self.near = cfg.dedup.exact, cfg.dedup.near
        self.rank = {s.source: i for i, s in enumerate(cfg.inputs)}
        self.user_ids = frozenset(s.source for s in cfg.inputs if s.id_field)

    def _other(self, stage, metric, n=1, reason=None, source=None):
        self._stats[stat_key(stage, metric, reason, source)] += n

    def handle(self, unit):
        source, base = unit["source"], unit["index"] << SHIFT
        seen = [0]

        def rows():
            for i, kind, item in unit_rows(unit, self.specs[source], self.sample,
                                           lambda f: self.count("files", source=source)):
                seen[0] += 1
                yield (i, item, None) if kind == "record" else (i, None, item)

        for chunk in _chunks(rows(), self.size):
            yield from self._flush()
            self.count("rows", len(chunk), source=source, progress=True)
            for _, _, rej in chunk:
                if rej is not None:
                    self._other("validate", "rejected", reason=rej["reason"], source=source)
                    yield beam.pvalue.TaggedOutput(REJECTS, rej)
            recs = [(base | i, rec) for i, rec, _ in chunk if rec is not None]
            self._other("validate", "records", len(recs), source=source)
            if recs:
                out, self._pending = self._arrays(source, [loc for loc, _ in recs], [rec for _, rec in recs])
                yield from out
        self.count("rows_seen", seen[0], source=source)

    def _flush(self):
        """The previous batch's band keys (its signatures ran in a thread while this batch, or the
        next unit, was read): kept across units, given out at the latest in ``finish_bundle``."""
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None:
            yield from pending()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        for out in self._flush():
            yield beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
        yield from super().finish_bundle()

    def _bands(self, source, locs, texts):
        """Start the batch's signatures in a thread (numpy lets go of the GIL for most of the work,
        so the next batch's reading and validation go on beside it); the returned function gives
        the band-key entries by shard once they are done."""
        from concurrent.futures import ThreadPoolExecutor

        p = self.near
        if getattr(self, "_pool", None) is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="curate-signatures")
        future = self._pool.submit(minhash.signatures, texts, p.num_perm, p.seed, p.ngram, p.unit)

        def entries():
            salts = np.full(len(texts), source_salt(source), dtype=np.uint64) if p.scope == "source" else None
            keys = band_keys(future.result(), p.bands, p.rows, salts)
            flat = keys.ravel()
            owner = np.repeat(np.arange(len(texts)), keys.shape[1])
            for shard, part in _split((flat % np.uint64(N_SHARDS)).astype(np.int64)):
                yield beam.pvalue.TaggedOutput(BANDS, (shard, (flat[part], locs[owner[part]])))

        return entries

    def teardown(self):
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)

    def _arrays(self, source, locs, recs) -> tuple[list, object]:
        """A batch's compact outputs, and the function that gives its band keys (or None)."""
        out, ids = [], [r["id"] for r in recs]
        locs = np.array(locs, dtype=np.int64)
        user = source in self.user_ids
        extra = ([r["original"] for r in recs], [r["_file"] for r in recs], [r["_row"] for r in recs]) if user else None
        for shard, part in _split([stable_shard(i, KEY_SHARDS) for i in ids]):
            out.append(beam.pvalue.TaggedOutput(IDS, (shard, (source, [ids[j] for j in part], locs[part],
                                                              extra and tuple([col[j] for j in part] for col in extra)))))
        if self.exact.enabled:
            keys = np.array([bytes.fromhex(dedup_key(r["prompt"], r["response"], source, self.exact.scope))
                             for r in recs], dtype="S16")
            for shard, part in _split(keys.view(">u8")[::2] % np.uint64(KEY_SHARDS)):
                out.append(beam.pvalue.TaggedOutput(EXACT, (shard, (self.rank[source], keys[part],
                                                                    [ids[j] for j in part], locs[part]))))
        bands = None
        if self.near.enabled:
            texts = [near_text(r, self.near.text) for r in recs]
            bands = self._bands(source, locs, texts)
            out.append(beam.pvalue.TaggedOutput(NEAR_ROWS, (source, pack(pa.table({
                "id": pa.array(ids, pa.string()), "loc": locs, "text": pa.array(texts, pa.large_string()),
                "length": pa.array([len(r["response"]) for r in recs], pa.int64())})))))
        feats = features_batch(recs)  # only the columns with a value travel (no score in this path)
        out.append(beam.pvalue.TaggedOutput(FEATS, (locs, feats.select(
            [c for c in feats.column_names if feats.column(c).null_count < feats.num_rows]))))
        return out, bands


def _split(shards):
    """(shard, positions) for each shard present, positions in their order."""
    shards = np.asarray(shards, dtype=np.int64)
    order = np.argsort(shards, kind="stable")
    present, starts = np.unique(shards[order], return_index=True)
    return [(int(s), part) for s, part in zip(present, np.split(order, starts[1:]))]


def _by_unit(pairs) -> list[tuple[int, list]]:
    """(loc, value) pairs -> (unit, [(loc, value), ...]) elements, one per unit: Apply joins by unit."""
    out = defaultdict(list)
    for loc, value in pairs:
        out[int(loc) >> SHIFT].append((int(loc), value))
    return list(out.items())


class IdsFn(StageFn):
    """One id shard: rows sharing an id numbered or rejected as ``curate.ids.resolve_ids`` does."""

    stage = "ids"
    metrics = ("rows", "renumbered", "rejected")

    def handle(self, element):
        _, parts = element
        members = defaultdict(list)
        n = 0
        for source, ids, locs, extra in parts:
            n += len(ids)
            for j, (rid, loc) in enumerate(zip(ids, locs)):
                members[(source, rid)].append((extra[0][j] if extra else "", int(loc), j, extra, source))
        self.count("rows", n)
        changes = []
        for (source, rid), group in members.items():
            if len(group) == 1:
                continue
            group.sort(key=lambda m: (m[0], m[1]))  # content first, then place: identical rows interchange
            first, kept = group[0][0], []
            for original, loc, j, extra, src in group:
                if extra and original != first:
                    rej = make_reject(src, extra[1][j], extra[2][j], "duplicate_id",
                                      f"id {rid!r} is also used by another row", original)
                    self.count("rejected", reason="duplicate_id", source=src)
                    yield beam.pvalue.TaggedOutput(REJECTS, rej)
                    changes.append((loc, None))
                else:
                    kept.append(loc)
            self.count("renumbered", len(kept) - 1)
            changes += [(loc, f"{rid}#{n}") for n, loc in enumerate(kept[1:], start=2)]
        yield from changes


class ExactFn(StageFn):
    """One key shard: per key, keep the row of the first source, then the smallest id."""

    stage = "exact_dedup"
    metrics = ("rows", "groups", "dropped")

    def __init__(self, sources: list[str]):
        self.sources = sources

    def handle(self, element, changes):
        _, parts = element
        parts = list(parts)
        keys = np.concatenate([k for _, k, _, _ in parts])
        locs = np.concatenate([loc for _, _, _, loc in parts])
        ranks = np.concatenate([np.full(len(k), r, np.int64) for r, k, _, _ in parts])
        ids = [rid for _, _, part_ids, _ in parts for rid in part_ids]
        rejected = np.array(sorted(loc for loc, new in changes.items() if new is None), np.int64)
        live = np.flatnonzero(~_member(locs, rejected))
        keys, locs, ranks = keys[live], locs[live], ranks[live]
        uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        self.count("rows", len(keys))
        self.count("groups", len(uniq))
        groups = defaultdict(list)
        for j in np.flatnonzero(counts[inverse] > 1):  # only the rows of a key seen twice or more
            loc = int(locs[j])
            groups[inverse[j]].append((int(ranks[j]), changes.get(loc, ids[live[j]]), loc))
        out = []
        for members in groups.values():
            members.sort()
            keeper = members[0][1]
            for rank, _, loc in members[1:]:
                self.count("dropped", source=self.sources[rank])
                out.append((loc, keeper))
        yield from out


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
        self._gone = (None, None)

    def handle(self, element, gone):
        _, parts = element
        parts = list(parts)
        keys = np.concatenate([k for k, _ in parts]) if parts else np.zeros(0, np.uint64)
        locs = np.concatenate([loc for _, loc in parts]) if parts else np.zeros(0, np.int64)
        keep = ~_member(locs, _sorted(self, gone)) & (keys != minhash.EMPTY)
        keys, locs = keys[keep], locs[keep]
        order = np.lexsort((locs, keys))
        keys, locs = keys[order], locs[order]
        starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])) if len(keys) else np.zeros(0, int)
        sizes = np.diff(np.append(starts, len(keys)))
        buckets = [np.unique(locs[s:s + n]) for s, n in zip(starts[sizes >= 2], sizes[sizes >= 2])]
        buckets = [m for m in buckets if len(m) >= 2]
        big = [len(m) for m in buckets if self.max_bucket and len(m) > self.max_bucket]
        for size in big:
            log.warning("near_dedup: a bucket of %d documents (above max_bucket_size %d)", size, self.max_bucket)
        if big:
            self.count("big_buckets", len(big))
        if buckets:
            members = np.concatenate(buckets)
            yield members, np.array([len(m) for m in buckets], np.int64)  # two arrays, not one per bucket
            yield beam.pvalue.TaggedOutput("ends", np.unique(members))


def _sorted(fn, values) -> np.ndarray:
    """A side input's list of locators as a sorted array, built once per list (the runner hands
    the same list to each element of a bundle)."""
    if fn._gone[0] is not values:
        fn._gone = (values, np.unique(np.asarray(values, dtype=np.int64)))
    return fn._gone[1]


class StarEdgesFn(StageFn):
    """Every bucket's members by id on one worker (the buckets and the candidates' ids are the
    near-duplicate candidates only): star edges (smallest id, other), as
    ``curate.dedup.near.bucket_edges`` draws them, as lists keyed by the verify shard of the
    first id."""

    stage = "near_dedup"
    metrics = ()

    def handle(self, buckets, infos):
        id_of = {loc: rid for part in infos for rid, loc, _, _ in part}
        edges = set()
        for members, sizes in buckets:
            for bucket in np.split(members, np.cumsum(sizes)[:-1]):
                ids = sorted({id_of[loc] for loc in bucket.tolist()})
                edges.update((ids[0], m) for m in ids[1:])
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
        self._gone = (None, None)

    def handle(self, element, candidates, changes, gone):
        source, data = element
        rows = unpack(data)
        locs = rows.column("loc").to_numpy()
        live = ~_member(locs, _sorted(self, gone))
        self.count("rows", int(live.sum()))
        chosen = np.flatnonzero(live & _member(locs, candidates))
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


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Which of ``values`` are in ``sorted_set`` (sorted, distinct)."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


def _sorted_union(parts) -> np.ndarray:
    parts = list(parts)
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _sig_lookup(sig_parts) -> tuple[dict, np.ndarray | None]:
    ids, mats = [], []
    for part_ids, mat in sig_parts:
        ids += part_ids
        mats.append(mat)
    return {rid: i for i, rid in enumerate(ids)}, (np.concatenate(mats) if mats else None)


def _first_half(element):
    """One verify shard: each distinct edge (a, b) with a's signature, sent to b's shard; the
    shard's own signatures go on beside them, so the second step reads them from here rather
    than from a second copy the runner would keep of the signatures."""
    shard, joined = element
    where, sigs = _sig_lookup(joined["sig"])
    edges = sorted({tuple(e) for part in joined["edges"] for e in part})
    edges = [e for e in edges if e[0] in where]  # every edge's ends are candidates: all of them
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
    Why one worker: the edges are the near-duplicate pairs only (about a tenth of the rows at
    most, 16 bytes of ids each); the row path's label rounds spread a pool of hundreds of
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
                    members[clusters[rid]].append((-length, rid, loc, source))
        sizes = Counter(len(m) for m in members.values())
        for size, n in sorted(sizes.items()):
            self.count("clusters", n, reason=f"size_{size}")
        out = []
        for cluster, group in members.items():
            group.sort()
            keeper = group[0][1]
            for _, rid, loc, source in group:
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
        candidates = bucket.ends | "Candidates" >> beam.CombineGlobally(_sorted_union)
        rows = self.near_rows | "CandidateRows" >> beam.ParDo(
            NearRowsFn(p, p.verify), beam.pvalue.AsSingleton(candidates), changes, gone).with_outputs(
            STATS, "info", main="sigs")
        star = (bucket.buckets | "AllBuckets" >> beam.combiners.ToList()
                | "StarEdges" >> beam.ParDo(StarEdgesFn(), beam.pvalue.AsList(rows.info)).with_outputs(
                    STATS, main="edges"))
        stats = [bucket[STATS], rows[STATS], star[STATS]]
        if p.verify:
            half = ({"edges": star.edges, "sig": rows.sigs} | "JoinFirst" >> beam.CoGroupByKey()
                    | "FirstHalf" >> beam.FlatMap(_first_half))
            verified = (half | "JoinSecond" >> beam.GroupByKey()
                        | "Verify" >> beam.ParDo(VerifyEdgesFn(p.threshold)).with_outputs(STATS, main="edges"))
            stats.append(verified[STATS])
            kept = verified.edges
        else:
            kept = (star.edges | "EdgesByShard" >> beam.GroupByKey()
                    | "Unverified" >> beam.MapTuple(
                        lambda _, parts: [(a, b, None) for a, b in sorted({tuple(e) for x in parts for e in x})]))
        all_edges = kept | "AllEdges" >> beam.combiners.ToList()
        resolved = all_edges | "Clusters" >> beam.ParDo(
            ClustersFn(), beam.pvalue.AsList(rows.info)).with_outputs(STATS, main="decisions")
        stats.append(resolved[STATS])
        examples = all_edges | "Examples" >> beam.Map(_examples)
        return {"decisions": resolved.decisions, "stats": stats | "NearStats" >> beam.Flatten(), "reports": examples}


class LiveFeaturesFn(beam.DoFn):
    """A batch's features without the rows gone earlier, with the ids as renumbered."""

    def __init__(self):
        self._gone = (None, None)

    def process(self, element, changes, gone):
        locs, feats = element
        keep = np.flatnonzero(~_member(locs, _sorted(self, gone)))
        if not len(keep):
            return
        t = feats.take(pa.array(keep, pa.int64()))
        ids = [changes.get(int(loc), rid) for loc, rid in zip(locs[keep], t.column("id").to_pylist())]
        yield locs[keep], t.set_column(t.schema.get_field_index("id"), t.schema.field("id"), pa.array(ids, pa.string()))


class KeyedSelect(beam.PTransform):
    """``pipelines.select._KeyedCut`` and ``_NumberInOrder`` on batches: the same keys, quotas, cut
    points, ranges and numbering (``curate.select.keyed``), with one element per batch or range
    instead of one per row. Live feature batches -> {"decisions": (loc, (rank, reason)) lists,
    "report": ("select", report)}."""

    def __init__(self, cfg: Job):
        super().__init__()
        self.cfg = cfg

    def expand(self, feats):
        policy, budget, seed = policy_from(self.cfg)
        name = lambda why: K.reason(policy, why)  # noqa: E731
        per_range = S.RANK_BUCKET_ROWS
        required = tuple(policy.required_columns())
        absent = {f.name: None for f in FEATURES}

        def row_keys(element):
            locs, table = element
            rows = [{**absent, **r} for r in table.to_pylist()]
            out = {"n": len(rows), "drops": [], "eligible": [], "sizes": Counter(), "present": set(), "samples": []}
            for loc, r in zip(locs.tolist(), rows):
                about = (r["source"], cluster_name(r))
                got = policy.row_key(r, seed)
                if isinstance(got, str):
                    out["drops"].append((loc, name(got), about))
                else:
                    key = (got[1], r["id"])
                    out["eligible"].append((got[0], key, loc, about))
                    out["sizes"][got[0]] += 1
                    if K.sampled(r["id"], per_range):
                        out["samples"].append((got[0], key))
                out["present"].update(c for c in required if r.get(c) is not None)
            return out

        def quotas(n, sizes, present):
            K.missing_columns(policy, n, set(present))
            q = policy.quotas(n, dict(sizes), budget)
            return {"quota": q, "index": K.group_order(q)}

        def to_ranges(k, cuts):
            ranges = defaultdict(list)
            for group, key, loc, about in k["eligible"]:
                ranges[(group, K.range_of(group, key, cuts))].append((key, loc, about))
            return list(ranges.items())

        def decide(kv, offsets, q):
            (group, r), parts = kv
            items = [item for part in parts for item in part]
            where = {key[1]: (loc, about) for key, loc, about in items}
            kept, over = K.decide_range([key for key, _, _ in items], offsets[(group, r)], q["quota"].get(group, 0))
            why = name(policy.over_reason)
            outcomes = Counter()
            kept_keys = []
            for rid, pos in kept:
                loc, about = where[rid]
                kept_keys.append((K.order_key(q["index"][group], pos), loc))
                outcomes[(*about, None)] += 1
            dropped = []
            for rid in over:
                loc, about = where[rid]
                dropped.append((loc, (None, why)))
                outcomes[(*about, why)] += 1
            yield beam.pvalue.TaggedOutput("kept", kept_keys)
            yield beam.pvalue.TaggedOutput("over", dropped)
            yield from outcomes.items()

        keys = feats | "RowKeys" >> beam.Map(row_keys)
        count = keys | "CountCandidates" >> beam.Map(lambda k: k["n"]) | "Count" >> beam.CombineGlobally(sum)
        sizes = (keys | "GroupCounts" >> beam.FlatMap(lambda k: k["sizes"].items())
                 | "GroupSizes" >> beam.CombinePerKey(sum) | "AllGroups" >> beam.combiners.ToList())
        present = (keys | "NonNull" >> beam.FlatMap(lambda k: k["present"]) | "Present" >> beam.Distinct()
                   | "AllPresent" >> beam.combiners.ToList())
        quota = count | "Quotas" >> beam.Map(quotas, beam.pvalue.AsSingleton(sizes), beam.pvalue.AsSingleton(present))
        cuts = (keys | "Sample" >> beam.FlatMap(lambda k: k["samples"]) | "AllSamples" >> beam.combiners.ToList()
                | "CutPoints" >> beam.Map(lambda sample, sz: K.cut_points(sample, dict(sz), per_range),
                                          beam.pvalue.AsSingleton(sizes)))
        ranged = keys | "ToRanges" >> beam.FlatMap(to_ranges, beam.pvalue.AsSingleton(cuts))
        offsets = (ranged | "RangeCounts" >> beam.MapTuple(lambda gr, items: (gr, len(items)))
                   | "RangeSizes" >> beam.CombinePerKey(sum) | "AllRanges" >> beam.combiners.ToList()
                   | "RangeOffsets" >> beam.Map(K.range_offsets))
        decided = (ranged | "ByRange" >> beam.GroupByKey()
                   | "DecideRange" >> beam.FlatMap(decide, beam.pvalue.AsSingleton(offsets),
                                                   beam.pvalue.AsSingleton(quota)).with_outputs("kept", "over",
                                                                                                  main="outcomes"))
        ranks = decided.kept | "Number" >> _NumberBatches(quota)
        drops = keys | "Drops" >> beam.Map(lambda k: [(loc, (None, why)) for loc, why, _ in k["drops"]])
        drop_outcomes = keys | "DropOutcomes" >> beam.FlatMap(
            lambda k: Counter((*about, why) for _, why, about in k["drops"]).items())
        report = ((decided.outcomes, drop_outcomes) | "Outcomes" >> beam.Flatten()
                  | _Report(policy, budget, seed))
        decisions = (ranks, drops, decided.over) | "AllDecisions" >> beam.Flatten()
        return {"decisions": decisions, "report": report}


class _NumberBatches(beam.PTransform):
    """Lists of (order key, loc) of selected rows -> lists of (loc, (global rank, None)), numbered
    range by range as ``pipelines.select._NumberInOrder`` numbers single rows."""

    def __init__(self, quota):
        super().__init__()
        self.quota = quota

    def expand(self, kept):
        bounds = self.quota | "Boundaries" >> beam.Map(
            lambda q: S.rank_boundaries(K.rank_shapes(q["quota"]), S.RANK_BUCKET_ROWS))

        def split(items, b):
            parts = defaultdict(list)
            for item in items:
                parts[S.bucket_of(item[0], b)].append(item)
            return list(parts.items())

        keyed = kept | "ToBuckets" >> beam.FlatMap(split, beam.pvalue.AsSingleton(bounds))
        offsets = (keyed | "BucketCounts" >> beam.MapTuple(lambda b, items: (b, len(items)))
                   | "BucketSizes" >> beam.CombinePerKey(sum) | "AllBuckets" >> beam.combiners.ToList()
                   | "BucketOffsets" >> beam.Map(S.bucket_offsets))
        return (keyed | "GroupBuckets" >> beam.GroupByKey()
                | "Ranks" >> beam.FlatMap(lambda kv, off: _chunks(
                    [(loc, (rank, None)) for loc, rank in S.ranks_in_bucket(
                        [item for part in kv[1] for item in part], off[kv[0]])], 65536),
                    beam.pvalue.AsSingleton(offsets)))


def base_table(locs: np.ndarray, records: list[dict]) -> pa.Table:
    """A batch's rows as read: their locators and the record's own output columns
    (``instruction``/``input`` from the record's ``_`` fields), built column by column."""
    from curate.schema import ANNOTATED

    arrays = [pa.array(locs, pa.int64())]
    for name in BASE_COLUMNS:
        key = name if name in records[0] else "_" + name
        arrays.append(pa.array([r[key] for r in records], ANNOTATED.field(name).type))
    return pa.Table.from_arrays(arrays, schema=_BASE_SCHEMA)


def pack(table: pa.Table) -> bytes:
    """A table as zstd-compressed Arrow IPC: the near text waits in the runner's memory from Scan
    until the candidates' signatures are computed, at about a third of its size."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def unpack(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


class ApplyFn(StageFn):
    """A unit read again (the same rows in the same order, ``unit_rows``); its rows get their
    decisions and leave as Arrow tables (annotated on the main output, the selected rows' columns
    on ``selected``). Reading twice costs a tenth of the path; carrying the rows from Scan to here
    would hold them all in the runner's memory meanwhile (about 1 KB a row compressed)."""

    stage = "write"
    metrics = ("selected", "dropped")

    def __init__(self, cfg: Job, selected_schema: pa.Schema):
        from curate import schema

        self.specs, self.sample = T.row_specs(cfg), cfg.sample
        self.size = max(cfg.batch_size, SIGNATURE_BATCH)
        self.annotated, self.selected_schema = schema.ANNOTATED, selected_schema

    def handle(self, element):
        _, joined = element
        unit = joined["unit"][0]
        dec = defaultdict(dict)
        for kind, pairs in joined["dec"]:
            dec[kind].update(pairs)
        base = unit["index"] << SHIFT
        records = ((base | i, rec) for i, kind, rec in unit_rows(unit, self.specs[unit["source"]], self.sample)
                   if kind == "record")
        for chunk in _chunks(records, self.size):
            table = self._decide(base_table(np.array([loc for loc, _ in chunk], np.int64),
                                            [rec for _, rec in chunk]), dec)
            if table.num_rows == 0:
                continue
            yield table
            chosen = table.filter(table.column("selected"))
            if chosen.num_rows:
                yield beam.pvalue.TaggedOutput("selected",
                                               chosen.select(self.selected_schema.names).cast(self.selected_schema))

    def _decide(self, base: pa.Table, dec: dict) -> pa.Table:
        ids, exact, near, chosen = dec["id"], dec["exact"], dec["near"], dec["select"]
        locs = base.column("_loc").to_pylist()
        keep = [j for j, loc in enumerate(locs) if not (loc in ids and ids[loc] is None)]  # rejects/ has the rest
        if len(keep) < len(locs):
            base = base.take(pa.array(keep, pa.int64()))
            locs = [locs[j] for j in keep]
        sources = base.column("source").to_pylist()
        new_ids = [ids.get(loc, rid) for loc, rid in zip(locs, base.column("id").to_pylist())]
        cols = {"id": new_ids, "exact_dup_of": [], "near_dup_cluster": [], "near_dup_of": [], "rank": [],
                "drop_reason": [], "selected": []}
        tally = Counter()
        for loc, source in zip(locs, sources):
            dup = exact.get(loc)
            cluster, near_of = near.get(loc, (None, None))
            if dup is not None:
                rank, reason = None, "exact_duplicate"
            elif near_of is not None:
                rank, reason = None, "near_duplicate"
            else:
                rank, reason = chosen[loc]
            for name, value in (("exact_dup_of", dup), ("near_dup_cluster", cluster), ("near_dup_of", near_of),
                                ("rank", rank), ("drop_reason", reason), ("selected", reason is None)):
                cols[name].append(value)
            tally[(reason, source)] += 1
        for (reason, source), n in tally.items():
            if reason is None:
                self.count("selected", n, source=source)
            else:
                self.count("dropped", n, reason=reason, source=source)
        arrays = []
        for f in self.annotated:
            if f.name in cols:
                arrays.append(pa.array(cols[f.name], f.type))
            elif f.name in BASE_COLUMNS:
                arrays.append(base.column(f.name))
            else:
                arrays.append(pa.nulls(base.num_rows, f.type))
        return pa.Table.from_arrays(arrays, schema=self.annotated)


def _kind(kind):
    return lambda pairs: [(unit, (kind, part)) for unit, part in _by_unit(pairs)]


def build(p: beam.Pipeline, cfg: Job, folder: str) -> dict:
    """The job's graph on batches (see the module's docstring); returns the stats and reports
    PCollections for ``pipelines.graph`` to write."""
    from curate import schema

    units = [{**u, "index": i} for i, u in enumerate(T.read_units(cfg))]
    scan = (p | "Units" >> beam.Create(units, reshuffle=True)
            | "Scan" >> beam.ParDo(ScanFn(cfg)).with_outputs(STATS, REJECTS, IDS, EXACT, BANDS, NEAR_ROWS, FEATS))
    ids = (scan[IDS] | "GroupIds" >> beam.GroupByKey()
           | "UniqueIds" >> beam.ParDo(IdsFn()).with_outputs(STATS, REJECTS, main="changes"))
    changes = ids.changes
    stats = [scan[STATS], ids[STATS]]
    decisions = [changes | "IdDecisions" >> beam.Map(lambda kv: (kv[0] >> SHIFT, ("id", [kv])))]
    gone = [changes | "Rejected" >> beam.FlatMap(lambda kv: [kv[0]] if kv[1] is None else [])]
    if cfg.dedup.exact.enabled:
        exact = (scan[EXACT] | "GroupKeys" >> beam.GroupByKey()
                 | "ExactDedup" >> beam.ParDo(ExactFn([s.source for s in cfg.inputs]), beam.pvalue.AsDict(changes))
                 .with_outputs(STATS, main="dups"))
        stats.append(exact[STATS])
        decisions.append(exact.dups | "ExactDecisions" >> beam.Map(lambda kv: (kv[0] >> SHIFT, ("exact", [kv]))))
        gone.append(exact.dups | "ExactGone" >> beam.Map(lambda kv: kv[0]))
    gone_before_near = gone | "GoneBeforeNear" >> beam.Flatten()
    reports = []
    if cfg.dedup.near.enabled:
        near = scan[BANDS] | "NearDedup" >> Near(cfg.dedup.near, changes, gone_before_near, scan[NEAR_ROWS])
        stats.append(near["stats"])
        reports.append(near["reports"])
        decisions.append(near["decisions"] | "NearDecisions" >> beam.FlatMap(_kind("near")))
        gone.append(near["decisions"] | "NearGone" >> beam.FlatMap(lambda d: [loc for loc, v in d if v[1] is not None]))
    gone_all = gone | "GoneBeforeSelect" >> beam.Flatten()
    live = scan[FEATS] | "Candidates" >> beam.ParDo(LiveFeaturesFn(), beam.pvalue.AsDict(changes),
                                                     beam.pvalue.AsList(gone_all))
    selection = live | "Select" >> KeyedSelect(cfg)
    reports.append(selection["report"])
    decisions.append(selection["decisions"] | "SelectDecisions" >> beam.FlatMap(_kind("select")))
    applied = ({"unit": p | "ApplyUnits" >> beam.Create([(u["index"], u) for u in units]),
                "dec": decisions | "AllDecisions" >> beam.Flatten()}
               | "ByUnit" >> beam.CoGroupByKey()
               | "Apply" >> beam.ParDo(ApplyFn(cfg, schema.selected_schema(cfg))).with_outputs(
                   STATS, "selected", main="annotated"))
    stats.append(applied[STATS])
    batched = dict(file_name_suffix=".parquet", codec="zstd")
    applied.annotated | "WriteAnnotated" >> beam.io.WriteToParquetBatched(
        f"{folder}/annotated/part", schema.ANNOTATED, **batched)
    applied.selected | "WriteSelected" >> beam.io.WriteToParquetBatched(
        f"{folder}/selected/part", schema.selected_schema(cfg), **batched)
    rejects = ((scan[REJECTS], ids[REJECTS]) | "AllRejects" >> beam.Flatten()
               | "TallyRejects" >> beam.ParDo(T.TallyFn("rejects")).with_outputs(STATS, main="rows"))
    stats.append(rejects[STATS])
    rejects.rows | "WriteRejects" >> beam.io.WriteToParquet(f"{folder}/rejects/part", schema.REJECTS, **batched)
    return {"stats": stats, "reports": reports}
