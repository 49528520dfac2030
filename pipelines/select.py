"""The selection step: the policy's decisions over the candidates' features, joined back by id.

Candidates are the rows no earlier stage dropped. With ``select.scope: global`` a keyed policy
(``curate.select.keyed``: its decision is a sort, by a per-row key within per-group quotas) is
decided range by range: only counts, quotas, cut points and range sizes are combined globally.
A policy that compares rows gets the candidates' features (a few numbers per row, plus the
embedding when it asks for it) combined into one list and runs once on it: the rows its
shortlist keeps (``curate.select.shortlist``: a keyed cut to ``select.max_candidates`` rows),
or every candidate when it declares none. With ``scope: cluster`` the features
are grouped by cluster and the policy runs on each group with its share of the budget
(``curate.select.scope``): only per-cluster counts (to split the budget), each cluster's budget
step and count of selected rows (to cut the global order into ranges of about 50,000 rows, each
ranked on its own), the ranges' sizes and the per-cluster reports are combined globally. Either
way the decisions (id -> rank or drop reason) are joined back to the rows by id
(CoGroupByKey). The report (counts per source, per cluster, per reason) goes to the manifest.
"""
from __future__ import annotations

import logging

import apache_beam as beam
import numpy as np

from curate.select import keyed as K
from curate.select import scope as S
from curate.select import shortlist as SL
from curate.select.base import Budget, PolicyError
from curate.select.features import (cluster_name, feature_row, features_table, outcome_counts, report_from_counts,
                                    selection_report)
from curate.select.registry import make
from curate.settings import Job

log = logging.getLogger("curate")


def policy_from(cfg: Job):
    s = cfg.select
    return make(s.policy, s.params), Budget.parse(s.budget.given(), "select.budget"), s.seed


def decide(rows: list[dict], cfg: Job, start_size: int | None = None) -> dict:
    """Run the job's policy on the candidates' features (all of them, or its shortlist's of
    ``start_size`` candidates): {"decisions": {id: [rank, reason]}, "outcomes": [((source,
    cluster, reason or None), rows)]}."""
    policy, budget, seed = policy_from(cfg)
    table = features_table(rows)  # the policy sorts by id: the combine order does not matter
    emb = np.stack([r["_vector"] for r in rows]) if policy.wants_embeddings() and rows else None
    texts = [r["_text"] for r in rows] if policy.wants_text() else None
    result = policy.run(table, budget, seed, emb, start_size, texts)
    ranks = result.ranks()
    decisions = {rid: [rank, None] for rid, rank in ranks.items()}
    decisions.update({rid: [None, reason] for rid, reason in result.dropped.items()})
    return {"decisions": decisions, "outcomes": outcome_counts(rows, ranks, result.dropped)}


def decide_cluster(element, cfg: Job, budgets: dict) -> dict:
    """One cluster's decision with its share of the budget: its drops, its selected rows' order
    keys and its report."""
    key, rows = element
    rows = sorted(rows, key=lambda r: r["id"])
    policy, _, seed = policy_from(cfg)
    budget = budgets[key]
    emb = np.stack([r["_vector"] for r in rows]) if policy.wants_embeddings() and rows else None
    texts = [r["_text"] for r in rows] if policy.wants_text() else None
    result = S.run_cluster(policy, features_table(rows), budget, seed, emb, texts)
    ranks = result.ranks()
    return {"selected": [(S.order_key(key, rank, budget, len(rows)), rid) for rid, rank in ranks.items()],
            "shape": (S.spacing(budget, len(rows)), len(ranks)),
            "dropped": result.dropped,
            "report": selection_report(policy, budget, seed, rows, ranks, result.dropped)}


def _add_pairs(pairs) -> tuple[int, int]:
    rows = tokens = 0
    for n, t in pairs:
        rows, tokens = rows + n, tokens + t
    return rows, tokens


def _sizes(pairs) -> dict:
    """{cluster: (rows, tokens)} from the per-cluster counts."""
    return {k: (int(n), int(t)) for k, (n, t) in pairs}


def apply_decision(element) -> list[dict]:
    """(id, {rec: [record], decision: [[rank, reason]] or []}) to the decided record (a new dict)."""
    _, joined = element
    out = []
    for record in joined["rec"]:
        record = {k: v for k, v in record.items() if k != "_vector"}
        if record.get("drop_reason") is None:
            record["rank"], record["drop_reason"] = next(iter(joined["decision"]))
        else:
            record["rank"] = None
        record["selected"] = record["drop_reason"] is None
        out.append(record)
    return out


class Select(beam.PTransform):
    """Records (kept or dropped) to records with ``selected``, ``rank`` and ``drop_reason``."""

    def __init__(self, cfg: Job):
        super().__init__()
        self.cfg = cfg
        policy, budget, _ = policy_from(cfg)  # fail at graph construction, not in a worker
        S.check_scope(policy, cfg.select.scope)
        if cfg.select.scope == "cluster" and not (cfg.cluster.column or (cfg.cluster.enabled and cfg.embed.enabled)):
            raise PolicyError("select.scope: cluster needs cluster ids (enable embed and cluster, or set "
                              "cluster.column)")
        self.with_vectors, self.with_text = policy.wants_embeddings(), policy.wants_text()
        is_global = cfg.select.scope == "global"
        self.keyed = is_global and K.applies(policy, budget)
        self.shortlist = SL.shortlist_of(policy, budget, cfg.select.max_candidates or None) if is_global else None
        if self.keyed:  # a missing budget was refused with the job file
            log.info("select: %s decided range by range over the whole pool (keyed)", policy.name)
        elif self.shortlist is not None:
            log.info("select: %s sees at most %d candidates on one worker: its shortlist (%s) cuts the pool first "
                     "(select.max_candidates)", policy.name, cfg.select.max_candidates, self.shortlist.name)
        elif is_global:
            log.info("select: %s gathers every candidate's features on one worker (it compares rows and declares "
                     "no shortlist%s); on a large pool use select.scope: cluster", policy.name,
                     "" if cfg.select.max_candidates else ", or select.max_candidates is 0")

    def expand(self, records):
        cfg, with_vectors, with_text = self.cfg, self.with_vectors, self.with_text
        policy, budget, seed = policy_from(cfg)

        def features(r):
            row = feature_row(r)
            if with_text:
                row["_text"] = r["prompt"] + "\n" + r["response"]
            if with_vectors:
                if r.get("_vector") is None:
                    raise ValueError(f"select: row {r['id']} has no embedding (is the embed stage on?)")
                row["_vector"] = r["_vector"]
            return row

        feats = (records
                 | "Candidates" >> beam.Filter(lambda r: r.get("drop_reason") is None)
                 | "Features" >> beam.Map(features))
        if cfg.select.scope == "cluster":
            decisions, report = self._per_cluster(feats)
        elif self.keyed:
            cut = feats | _KeyedCut(policy, budget, seed, lambda why: K.reason(policy, why))
            shapes = cut["quota"] | "Shapes" >> beam.Map(lambda q: K.rank_shapes(q["quota"]))
            ranks = cut["kept"] | _NumberInOrder(shapes)
            decisions = (ranks, cut["drops"]) | "AllDecisions" >> beam.Flatten()
            report = cut["outcomes"] | _Report(policy, budget, seed)
        elif self.shortlist is not None:
            decisions, report = self._shortlisted(feats)
        else:
            decided = feats | "AllFeatures" >> beam.combiners.ToList() | "Decide" >> beam.Map(decide, cfg)
            decisions = decided | "Decisions" >> beam.FlatMap(lambda d: d["decisions"].items())
            report = (decided | "Outcomes" >> beam.FlatMap(lambda d: d["outcomes"])) | _Report(policy, budget, seed)
        out = ({"rec": records | "ById" >> beam.Map(lambda r: (r["id"], r)), "decision": decisions}
               | "JoinDecisions" >> beam.CoGroupByKey()
               | "Apply" >> beam.FlatMap(apply_decision))
        return {"records": out, "reports": report}

    def _shortlisted(self, feats):
        """(id -> [rank, reason] pairs, the report) for a policy that compares rows: its shortlist
        (a keyed policy) keeps at most ``select.max_candidates`` rows, decided range by range; only
        those rows' features are gathered, and the policy runs once on them."""
        cfg, short = self.cfg, self.shortlist
        policy, budget, seed = policy_from(cfg)
        cap = cfg.select.max_candidates
        cut = feats | _KeyedCut(short, Budget(rows=cap), seed, lambda why: SL.cut_reason(policy, short, why),
                                also=policy)
        listed = ({"row": feats | "FeaturesById" >> beam.Map(lambda r: (r["id"], r)),
                   "kept": cut["kept"] | "KeptIds" >> beam.Map(lambda kv: (kv[1], True))}
                  | "JoinShortlist" >> beam.CoGroupByKey()
                  | "Shortlisted" >> beam.FlatMap(lambda kv: kv[1]["row"] if kv[1]["kept"] else []))
        decided = (listed | "AllFeatures" >> beam.combiners.ToList()  # at most max_candidates rows
                   | "Decide" >> beam.Map(lambda rows, n: decide(rows, cfg, n), beam.pvalue.AsSingleton(cut["count"])))
        decisions = ((decided | "Decisions" >> beam.FlatMap(lambda d: d["decisions"].items()), cut["drops"])
                     | "AllDecisions" >> beam.Flatten())
        listed_outcomes = decided | "Outcomes" >> beam.FlatMap(lambda d: d["outcomes"])
        cut_dropped = cut["outcomes"] | "CutOnly" >> beam.Filter(lambda o: o[0][2] is not None)
        report = ((listed_outcomes, cut_dropped) | "AllOutcomes" >> beam.Flatten()
                  | _Report(policy, budget, seed, SL.describe(short, cap)))
        return decisions, report

    def _per_cluster(self, feats):
        """(id -> [rank, reason] pairs, the report) with the policy run per cluster."""
        cfg = self.cfg
        policy, budget, seed = policy_from(cfg)

        by_cluster = feats | "ByCluster" >> beam.Map(lambda r: (S.cluster_key(r.get("cluster_id")), r))
        budgets = (by_cluster
                   | "Counts" >> beam.Map(lambda kv: (kv[0], (1, kv[1]["approx_tokens"])))
                   | "PerCluster" >> beam.CombinePerKey(_add_pairs)
                   | "Clusters" >> beam.combiners.ToList()  # one small pair per cluster
                   | "Split" >> beam.Map(lambda pairs: S.split_budget(budget, _sizes(pairs))))
        decided = (by_cluster | "GroupCluster" >> beam.GroupByKey()
                   | "DecideCluster" >> beam.Map(decide_cluster, cfg, beam.pvalue.AsSingleton(budgets)))
        shapes = (decided | "Shapes" >> beam.Map(lambda d: d["shape"])
                  | "AllShapes" >> beam.combiners.ToList())  # one small pair per cluster
        ranks = (decided | "Selected" >> beam.FlatMap(lambda d: d["selected"])) | _NumberInOrder(shapes)
        dropped = decided | "Dropped" >> beam.FlatMap(lambda d: [(rid, [None, r]) for rid, r in d["dropped"].items()])
        report = (decided | "Reports" >> beam.Map(lambda d: d["report"]) | "AllReports" >> beam.combiners.ToList()
                  | "Merge" >> beam.Map(lambda reps: ("select", S.merge_reports(reps, policy, budget, seed))))
        return (ranks, dropped) | "AllDecisions" >> beam.Flatten(), report


class _KeyedCut(beam.PTransform):
    """A keyed policy over the whole pool (``curate.select.keyed``), decided range by range:
    counts, quotas, cut points and range offsets are the only state combined globally; each
    (group, range) is sorted on its own. Features -> {"kept": the kept rows' (order key, id),
    "drops": (id, [None, reason]) of every row it drops, reasons named by ``name``, "quota": the
    quotas, "count": the candidates, "outcomes": every row's ((source, cluster, reason or None),
    1)}. ``also``: a policy whose required columns are checked first (the one a shortlist serves)."""

    def __init__(self, policy, budget: Budget, seed: int, name, also=None):
        super().__init__()
        self.policy, self.budget, self.seed, self.name, self.also = policy, budget, seed, name, also

    def expand(self, feats):
        policy, budget, seed, name, also = self.policy, self.budget, self.seed, self.name, self.also
        per_range = S.RANK_BUCKET_ROWS
        checked = [p for p in (also, policy) if p is not None]
        required = tuple(dict.fromkeys(c for p in checked for c in p.required_columns()))

        def row_key(r):
            got = policy.row_key(r, seed)
            about = (r["source"], cluster_name(r))
            if isinstance(got, str):
                return ("drop", r["id"], name(got), about)
            return ("keep", got[0], (got[1], r["id"]), about)

        def quotas(n, sizes, present):
            for p in checked:
                K.missing_columns(p, n, set(present))
            q = policy.quotas(n, dict(sizes), budget)
            return {"quota": q, "index": K.group_order(q)}

        keys = feats | "RowKeys" >> beam.Map(row_key)
        eligible = keys | "Eligible" >> beam.Filter(lambda k: k[0] == "keep")
        count = feats | "CountCandidates" >> beam.combiners.Count.Globally()
        present = (feats | "NonNull" >> beam.FlatMap(lambda r: [c for c in required if r.get(c) is not None])
                   | "Present" >> beam.Distinct() | "AllPresent" >> beam.combiners.ToList())
        sizes = (eligible | "GroupOf" >> beam.Map(lambda k: k[1]) | "GroupSizes" >> beam.combiners.Count.PerElement()
                 | "AllGroups" >> beam.combiners.ToList())  # one pair per group
        quota = count | "Quotas" >> beam.Map(quotas, beam.pvalue.AsSingleton(sizes), beam.pvalue.AsSingleton(present))
        cuts = (eligible | "Sample" >> beam.Filter(lambda k: K.sampled(k[2][1], per_range))
                | "SampleKeys" >> beam.Map(lambda k: (k[1], k[2])) | "AllSamples" >> beam.combiners.ToList()
                | "CutPoints" >> beam.Map(lambda sample, sz: K.cut_points(sample, dict(sz), per_range),
                                          beam.pvalue.AsSingleton(sizes)))
        ranged = eligible | "ToGroupRange" >> beam.Map(
            lambda k, c: ((k[1], K.range_of(k[1], k[2], c)), (k[2], k[3])), beam.pvalue.AsSingleton(cuts))
        offsets = (ranged | "GroupRangeSizes" >> beam.combiners.Count.PerKey()
                   | "AllGroupRanges" >> beam.combiners.ToList()  # one pair per range
                   | "GroupOffsets" >> beam.Map(K.range_offsets))

        def decide_range(kv, off, q):
            (group, r), items = kv
            about = {rid: a for (_, rid), a in items}
            kept, over = K.decide_range([k for k, _ in items], off[(group, r)], q["quota"].get(group, 0))
            why = name(policy.over_reason)
            for rid, pos in kept:
                yield beam.pvalue.TaggedOutput("kept", (K.order_key(q["index"][group], pos), rid))
                yield (about[rid], None)
            for rid in over:
                yield beam.pvalue.TaggedOutput("over", (rid, [None, why]))
                yield (about[rid], why)

        decided = (ranged | "ByGroupRange" >> beam.GroupByKey()
                   | "DecideRange" >> beam.FlatMap(decide_range, beam.pvalue.AsSingleton(offsets),
                                                   beam.pvalue.AsSingleton(quota)).with_outputs("kept", "over",
                                                                                                  main="outcome"))
        drops = keys | "Drops" >> beam.FlatMap(lambda k: [(k[1], [None, k[2]])] if k[0] == "drop" else [])
        drops = (drops, decided.over) | "AllDrops" >> beam.Flatten()
        outcomes = ((decided.outcome, keys | "DropOutcomes" >> beam.FlatMap(
            lambda k: [(k[3], k[2])] if k[0] == "drop" else []))
            | "Outcomes" >> beam.Flatten()
            | "CountOutcomes" >> beam.Map(lambda o: ((o[0][0], o[0][1], o[1]), 1)))
        return {"kept": decided.kept, "drops": drops, "quota": quota, "count": count, "outcomes": outcomes}


class _Report(beam.PTransform):
    """((source, cluster, reason or None), rows) pairs -> ("select", the report): summed per key
    (one pair per source, cluster and reason reaches the one worker that writes the report)."""

    def __init__(self, policy, budget: Budget, seed: int, shortlist: dict | None = None):
        super().__init__()
        self.policy, self.budget, self.seed, self.shortlist = policy, budget, seed, shortlist

    def expand(self, outcomes):
        policy, budget, seed, shortlist = self.policy, self.budget, self.seed, self.shortlist

        def report(counts):
            rep = report_from_counts(policy, budget, seed, counts)
            return ("select", {**rep, "shortlist": shortlist} if shortlist else rep)

        return (outcomes | "OutcomeCounts" >> beam.CombinePerKey(sum)
                | "AllOutcomeCounts" >> beam.combiners.ToList() | "Report" >> beam.Map(report))


class _NumberInOrder(beam.PTransform):
    """(order key, id) of the selected rows -> (id, [global rank, None]), numbered range by range:
    cut points from each group's (step, selected rows) (``scope.rank_boundaries``), each range
    sorted alone and numbered after the rows of the ranges before it."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes = shapes  # a PCollection of one list of (step, selected rows)

    def expand(self, selected):
        bounds = self.shapes | "Boundaries" >> beam.Map(S.rank_boundaries, S.RANK_BUCKET_ROWS)
        keyed = selected | "ToRange" >> beam.Map(lambda kv, b: (S.bucket_of(kv[0], b), kv),
                                                 beam.pvalue.AsSingleton(bounds))
        offsets = (keyed | "RangeSizes" >> beam.combiners.Count.PerKey()
                   | "AllSizes" >> beam.combiners.ToList()  # one pair per range
                   | "Offsets" >> beam.Map(S.bucket_offsets))
        return (keyed | "GroupRanges" >> beam.GroupByKey()
                | "Ranks" >> beam.FlatMap(lambda kv, off: [(rid, [rank, None]) for rid, rank
                                                           in S.ranks_in_bucket(kv[1], off[kv[0]])],
                                          beam.pvalue.AsSingleton(offsets)))
