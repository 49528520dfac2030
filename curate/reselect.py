"""``curate select``: apply a policy to a finished run's annotated/ without recomputing any score.

The run folder is not changed. The new selection goes to its own folder (default
``<run>/selections/<policy>``): ``selected/`` (same schema as the run's, in rank order),
``decisions.parquet`` (id, selected, rank, drop_reason for every annotated row) and
``selection.json`` (the policy, budget, seed and counts).
"""
from __future__ import annotations

import json
import os
import uuid

import pyarrow as pa
import pyarrow.compute as pc

from curate import leftovers, runs, schema, storage
from curate.select.base import Budget, Policy
from curate.select.features import pool_of, selection_report
from curate.select.scope import check_scope, run_per_cluster
from curate.select.shortlist import DEFAULT_MAX_CANDIDATES, run_global, shortlist_of
from curate.select.shortlist import describe as describe_shortlist


def _write_parquet(table: pa.Table, path: str) -> None:
    with storage.ParquetFile(path, table.schema) as out:
        out.write(table)


def select_run(folder: str, policy: Policy, budget: Budget, seed: int, out: str | None = None,
               scope: str = "global", max_candidates: int | None = DEFAULT_MAX_CANDIDATES) -> dict:
    """Run ``policy`` on ``folder``'s candidates (all at once, through its shortlist of
    ``max_candidates`` rows when it compares rows: ``curate.select.shortlist``; or per cluster:
    ``curate.select.scope``), write the selection, return its report."""
    check_scope(policy, scope)
    table = runs.annotated(folder)
    pool = pool_of(table)
    ids = pool.column("id").to_pylist()
    emb = runs.embeddings(folder, ids) if policy.wants_embeddings() else None
    texts = None
    if policy.wants_text():
        by_id = dict(zip(table.column("id").to_pylist(),
                         (p + "\n" + r for p, r in zip(table.column("prompt").to_pylist(),
                                                      table.column("response").to_pylist()))))
        texts = [by_id[i] for i in ids]
    if scope == "cluster":
        result = run_per_cluster(policy, pool, budget, seed, emb, texts)
    else:
        result = run_global(policy, pool, budget, seed, emb, texts, max_candidates)
    ranks = result.ranks()
    rows = pool.select(["id", "source", "cluster_id"]).to_pylist()
    rep = selection_report(policy, budget, seed, rows, ranks, result.dropped)
    if scope == "cluster":
        rep["scope"] = scope
    short = shortlist_of(policy, budget, max_candidates) if scope == "global" else None
    if short is not None:
        rep["shortlist"] = describe_shortlist(short, max_candidates)
    rep["run"] = storage.absolute(folder)
    out = out or storage.join(folder, "selections", policy.name)
    if (storage.exists(out) and not storage.isdir(out)) or (
            storage.listdir(out) and not storage.isfile(storage.join(out, "selection.json"))):
        raise runs.RunError(f"{out} exists and is not a curate selection; choose another --out")
    rep["output"] = storage.absolute(out)

    all_ids = table.column("id").to_pylist()
    old_reason = table.column("drop_reason").to_pylist()
    rank = [ranks.get(i) for i in all_ids]
    reason = [None if i in ranks else result.dropped.get(i, old) for i, old in zip(all_ids, old_reason)]
    chosen = [r is not None for r in rank]
    decided = table
    for name, values in (("selected", pa.array(chosen)), ("rank", pa.array(rank, pa.int64())),
                         ("drop_reason", pa.array(reason, pa.string()))):
        at = decided.schema.get_field_index(name)
        decided = decided.set_column(at, name, values) if at >= 0 else decided.append_column(name, values)
    picked = decided.filter(pc.field("selected")).sort_by([("rank", "ascending")])

    storage.makedirs(os.path.dirname(storage.absolute(out)))
    leftovers.remove_dead(storage.absolute(out))
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    leftovers.claim(tmp)
    storage.makedirs(storage.join(tmp, "selected"))
    lean = schema.selected_like(runs.selected_columns(folder))  # the columns of the run's selected/
    _write_parquet(picked.select(lean.names).cast(lean), storage.join(tmp, "selected", "part-00000.parquet"))
    _write_parquet(decided.select(["id", "source", "selected", "rank", "drop_reason"]),
                   storage.join(tmp, "decisions.parquet"))
    with storage.open_file(storage.join(tmp, "selection.json"), "w", encoding="utf-8") as fh:
        fh.write(json.dumps(rep, indent=2) + "\n")
    leftovers.release(tmp)
    storage.publish(tmp, out, marker="selection.json")
    return rep
