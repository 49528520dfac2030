"""The selection step: the policy's decisions over the candidates' features, joined back by id.

Candidates are the rows no earlier stage dropped. With ``select.scope: global`` their features
(a few numbers per row, plus the embedding when the policy asks for it) are combined into one
list and the policy (``curate.select``) runs once on it. With ``scope: cluster`` the features
are grouped by cluster and the policy runs on each group with its share of the budget
(``curate.select.scope``): only per-cluster counts (to split the budget), each cluster's budget
step and count of selected rows (to cut the global order into ranges of about 50,000 rows, each
ranked on its own), the ranges' sizes and the per-cluster reports are combined globally. Either
way the decisions (id -> rank or drop reason) are joined back to the rows by id
(CoGroupByKey). The report (counts per source, per cluster, per reason) goes to the manifest.
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from curate.select import scope as S
from curate.select.base import Budget, PolicyError
from curate.select.features import feature_row, features_table, selection_report
from curate.select.registry import make
from curate.settings import Job


def policy_from(cfg: Job):
    s = cfg.select
    return make(s.policy, s.params), Budget.parse(s.budget.given(), "select.budget"), s.seed


def decide(rows: list[dict], cfg: Job) -> dict:
    """Run the job's policy on the candidates' features: {"decisions": {id: [rank, reason]}, "report": ...}."""
    policy, budget, seed = policy_from(cfg)
    table = features_table(rows)  # the policy sorts by id: the combine order does not matter
    emb = np.stack([r["_vector"] for r in rows]) if policy.wants_embeddings() and rows else None
    texts = [r["_text"] for r in rows] if policy.wants_text() else None
    result = policy.run(table, budget, seed, emb, texts=texts)
    ranks = result.ranks()
    decisions = {rid: [rank, None] for rid, rank in ranks.items()}
    decisions.update({rid: [None, reason] for rid, reason in result.dropped.items()})
    return {"decisions": decisions, "report": selection_report(policy, budget, seed, rows, ranks, result.dropped)}


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
        policy, _, _ = policy_from(cfg)  # fail at graph construction, not in a worker
        S.check_scope(policy, cfg.select.scope)
        if cfg.select.scope == "cluster" and not (cfg.cluster.column or (cfg.cluster.enabled and cfg.embed.enabled)):
            raise PolicyError("select.scope: cluster needs cluster ids (enable embed and cluster, or set "
                              "cluster.column)")
        self.with_vectors, self.with_text = policy.wants_embeddings(), policy.wants_text()

    def expand(self, records):
        cfg, with_vectors, with_text = self.cfg, self.with_vectors, self.with_text

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
        else:
            decided = feats | "AllFeatures" >> beam.combiners.ToList() | "Decide" >> beam.Map(decide, cfg)
            decisions = decided | "Decisions" >> beam.FlatMap(lambda d: d["decisions"].items())
            report = decided | "Report" >> beam.Map(lambda d: ("select", d["report"]))
        out = ({"rec": records | "ById" >> beam.Map(lambda r: (r["id"], r)), "decision": decisions}
               | "JoinDecisions" >> beam.CoGroupByKey()
               | "Apply" >> beam.FlatMap(apply_decision))
        return {"records": out, "reports": report}

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
        bounds = (decided | "Shapes" >> beam.Map(lambda d: d["shape"])
                  | "AllShapes" >> beam.combiners.ToList()  # one small pair per cluster
                  | "Boundaries" >> beam.Map(S.rank_boundaries, S.RANK_BUCKET_ROWS))
        keyed = (decided | "Selected" >> beam.FlatMap(lambda d: d["selected"])
                 | "ToRange" >> beam.Map(lambda kv, b: (S.bucket_of(kv[0], b), kv), beam.pvalue.AsSingleton(bounds)))
        offsets = (keyed | "RangeSizes" >> beam.combiners.Count.PerKey()
                   | "AllSizes" >> beam.combiners.ToList()  # one pair per range
                   | "Offsets" >> beam.Map(S.bucket_offsets))
        ranks = (keyed | "GroupRanges" >> beam.GroupByKey()
                 | "Ranks" >> beam.FlatMap(lambda kv, off: [(rid, [rank, None]) for rid, rank
                                                            in S.ranks_in_bucket(kv[1], off[kv[0]])],
                                           beam.pvalue.AsSingleton(offsets)))
        dropped = decided | "Dropped" >> beam.FlatMap(lambda d: [(rid, [None, r]) for rid, r in d["dropped"].items()])
        report = (decided | "Reports" >> beam.Map(lambda d: d["report"]) | "AllReports" >> beam.combiners.ToList()
                  | "Merge" >> beam.Map(lambda reps: ("select", S.merge_reports(reps, policy, budget, seed))))
        return (ranks, dropped) | "AllDecisions" >> beam.Flatten(), report
