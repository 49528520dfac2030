"""A keyed policy's selection on the batch path: ``curate.select.keyed``'s decision with one
element per batch or range instead of one per row (``pipelines.select`` does it per row)."""
from __future__ import annotations

from collections import Counter, defaultdict

import apache_beam as beam
import numpy as np
import pyarrow as pa

from curate.select import keyed as K
from curate.select import scope as S
from curate.select.features import FEATURES, cluster_name
from curate.settings import Job
from pipelines.locators import chunks, member, sorted_side_input
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
                | "Ranks" >> beam.FlatMap(lambda kv, off: chunks(
                    [(loc, (rank, None)) for loc, rank in S.ranks_in_bucket(
                        [item for part in kv[1] for item in part], off[kv[0]])], 65536),
                    beam.pvalue.AsSingleton(offsets)))
