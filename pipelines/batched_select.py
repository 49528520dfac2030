"""A keyed policy's selection on the batch path: ``curate.select.keyed``'s decision with one
element per batch or range instead of one per row (``pipelines.select`` does it per row)."""
from __future__ import annotations

from collections import Counter, defaultdict

import apache_beam as beam
import numpy as np
import pyarrow as pa

from curate.select import keyed as K
from curate.select import scope as S
from curate.select.features import complete
from curate.settings import Job
from pipelines.locators import member, sorted_side_input
from pipelines.select import _Report, policy_from


class LiveFeaturesFn(beam.DoFn):
    """A batch's features without the rows gone earlier, with the ids as renumbered."""

    def __init__(self):
        self._sorted_cache = (None, None)

    def process(self, element, changes, gone):
        locs, feats = element
        keep = np.flatnonzero(~member(locs, sorted_side_input(self, gone)))
        if not len(keep):
            return
        t = feats.take(pa.array(keep, pa.int64()))
        ids = [changes.get(int(loc), rid) for loc, rid in zip(locs[keep], t.column("id").to_pylist())]
        yield locs[keep], t.set_column(t.schema.get_field_index("id"), t.schema.field("id"), pa.array(ids, pa.string()))


class KeyedSelect(beam.PTransform):
    """``pipelines.select._KeyedCut`` and ``_NumberInOrder`` on batches: the same keys, quotas, cut
    points, ranges and numbering (``curate.select.keyed``), with one element per batch or range
    instead of one per row. Live feature batches -> {"decisions": (locs, ranks or None, reason)
    elements, one per range or drop reason, "report": ("select", report)}."""

    def __init__(self, cfg: Job):
        super().__init__()
        self.cfg = cfg

    def expand(self, feats):
        policy, budget, seed = policy_from(self.cfg)
        name = lambda why: K.reason(policy, why)  # noqa: E731
        per_range = S.RANK_BUCKET_ROWS
        required = tuple(policy.required_columns())

        def row_keys(element):
            locs, table = element
            n = table.num_rows
            cluster = table.column("cluster_id").to_pylist() if "cluster_id" in table.column_names else [None] * n
            out = {"n": n, "drops": [], "eligible": [], "sizes": Counter(), "samples": [],
                   "present": {c for c in required if c in table.column_names and table.column(c).null_count < n}}
            for loc, rid, source, c, got in zip(locs.tolist(), table.column("id").to_pylist(),
                                                table.column("source").to_pylist(), cluster,
                                                policy.row_keys(complete(table), seed)):
                about = (source, "none" if c is None else str(c))  # features.cluster_name
                if isinstance(got, str):
                    out["drops"].append((loc, name(got), about))
                else:
                    key = (got[1], rid)
                    out["eligible"].append((got[0], key, loc, about))
                    out["sizes"][got[0]] += 1
                    if K.sampled(rid, per_range):
                        out["samples"].append((got[0], key))
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
                dropped.append(loc)
                outcomes[(*about, why)] += 1
            yield beam.pvalue.TaggedOutput("kept", kept_keys)
            if dropped:
                yield beam.pvalue.TaggedOutput("over", (np.array(dropped, np.int64), None, why))
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
        drops = keys | "Drops" >> beam.FlatMap(lambda k: _by_reason(k["drops"]))
        drop_outcomes = keys | "DropOutcomes" >> beam.FlatMap(
            lambda k: Counter((*about, why) for _, why, about in k["drops"]).items())
        report = ((decided.outcomes, drop_outcomes) | "Outcomes" >> beam.Flatten()
                  | _Report(policy, budget, seed))
        decisions = (ranks, drops, decided.over) | "AllDecisions" >> beam.Flatten()
        return {"decisions": decisions, "report": report}


class _NumberBatches(beam.PTransform):
    """Lists of (order key, loc) of selected rows -> (locs, global ranks, None), numbered
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
                | "Ranks" >> beam.Map(lambda kv, off: _ranked(S.ranks_in_bucket(
                    [item for part in kv[1] for item in part], off[kv[0]])), beam.pvalue.AsSingleton(offsets)))


def _ranked(pairs: list) -> tuple:
    """(loc, rank) pairs of selected rows as one (locs, ranks, None) decisions element."""
    locs, ranks = zip(*pairs) if pairs else ((), ())
    return np.array(locs, np.int64), np.array(ranks, np.int64), None


def _by_reason(drops: list) -> list[tuple]:
    """(loc, reason, about) drops as one (locs, None, reason) decisions element per reason."""
    locs = defaultdict(list)
    for loc, why, _ in drops:
        locs[why].append(loc)
    return [(np.array(v, np.int64), None, why) for why, v in locs.items()]
