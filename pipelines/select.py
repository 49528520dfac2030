"""The selection step: one global decision over the candidates' features, joined back by id.

Candidates are the rows no earlier stage dropped. Only their features (a few numbers per
row, plus the embedding when the policy asks for it) are combined into one list; the
policy (``curate.select``) runs once on it; the decisions (id -> rank or drop reason) are
joined back to the rows by id (CoGroupByKey), so no worker but the deciding one holds them
all. The report (counts per source, per cluster, per reason) goes to the manifest.
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from curate.select.base import Budget
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

        decided = (records
                   | "Candidates" >> beam.Filter(lambda r: r.get("drop_reason") is None)
                   | "Features" >> beam.Map(features)
                   | "AllFeatures" >> beam.combiners.ToList()
                   | "Decide" >> beam.Map(decide, cfg))
        out = ({"rec": records | "ById" >> beam.Map(lambda r: (r["id"], r)),
                "decision": decided | "Decisions" >> beam.FlatMap(lambda d: d["decisions"].items())}
               | "JoinDecisions" >> beam.CoGroupByKey()
               | "Apply" >> beam.FlatMap(apply_decision))
        return {"records": out, "reports": decided | "Report" >> beam.Map(lambda d: ("select", d["report"]))}
