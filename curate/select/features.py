"""The per-row features a policy sees, from pipeline records or from a finished run's annotated/."""
from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import SCORE_FIELDS
from curate.select.base import approx_tokens

FEATURES = pa.schema([
    pa.field("id", pa.string(), nullable=False), pa.field("source", pa.string()),
    pa.field("prompt_chars", pa.int64()), pa.field("response_chars", pa.int64()),
    pa.field("approx_tokens", pa.int64()),
    pa.field("exact_dup_of", pa.string()), pa.field("near_dup_of", pa.string()),
    pa.field("semantic_dup_of", pa.string()),
    pa.field("cluster_id", pa.int32()), pa.field("cluster_sim", pa.float32()),
    *SCORE_FIELDS,
])
DEDUP_REASONS = ("exact_duplicate", "near_duplicate", "semantic_duplicate")


def feature_row(record: dict) -> dict:
    """One record's features (no text: the selection step moves only these few columns)."""
    row = {f.name: record.get(f.name) for f in FEATURES if f.name not in ("prompt_chars", "response_chars",
                                                                          "approx_tokens")}
    row["prompt_chars"] = len(record["prompt"])
    row["response_chars"] = len(record["response"])
    row["approx_tokens"] = int(approx_tokens([row["prompt_chars"] + row["response_chars"]])[0])
    return row


def features_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in FEATURES} for r in rows], schema=FEATURES)


def complete(table: pa.Table) -> pa.Table:
    """A features table with every ``FEATURES`` column, null where ``table`` lacks it (the batch
    path's tables carry only the columns that have a value)."""
    have = set(table.column_names)
    fields = [table.schema.field(f.name) if f.name in have else f for f in FEATURES]
    return pa.Table.from_arrays([table.column(f.name) if f.name in have else pa.nulls(table.num_rows, f.type)
                                 for f in fields], schema=pa.schema(fields))


def pool_of(annotated: pa.Table) -> pa.Table:
    """The candidate rows of a finished run: every row no dedup stage dropped (a previous
    policy's decision does not count), as a features table."""
    reason = annotated.column("drop_reason")
    candidate = pc.or_(pc.is_null(reason), pc.invert(pc.is_in(reason, pa.array(DEDUP_REASONS))))
    return features_of(annotated.filter(pc.fill_null(candidate, True)))


def features_of(t: pa.Table) -> pa.Table:
    """The features of rows in columns (``prompt``, ``response`` and whichever feature columns
    ``t`` has; the others null), as ``feature_row`` gives them."""
    prompt_chars = pc.utf8_length(t.column("prompt")).cast(pa.int64())
    response_chars = pc.utf8_length(t.column("response")).cast(pa.int64())
    cols = {"prompt_chars": prompt_chars, "response_chars": response_chars,
            "approx_tokens": pa.array(approx_tokens(pc.add(prompt_chars, response_chars).to_numpy()), pa.int64())}
    arrays = []
    for f in FEATURES:
        if f.name in cols:
            arrays.append(cols[f.name])
        elif f.name in t.column_names:
            arrays.append(t.column(f.name).cast(f.type))
        else:
            arrays.append(pa.nulls(t.num_rows, f.type))
    return pa.Table.from_arrays(arrays, schema=FEATURES)


def cluster_name(row: dict) -> str:
    """A row's cluster as the reports name it (``none`` without one)."""
    return "none" if row.get("cluster_id") is None else str(row["cluster_id"])


def outcome_counts(rows: list[dict], ranks: dict, dropped: dict) -> list[tuple[tuple, int]]:
    """((source, cluster, drop reason or None for selected), rows) pairs, what ``report_from_counts`` takes."""
    counts = Counter((r["source"], cluster_name(r), None if r["id"] in ranks else dropped.get(r["id"])) for r in rows)
    return list(counts.items())


def selection_report(policy, budget, seed: int, rows: list[dict], ranks: dict, dropped: dict) -> dict:
    """What the policy did, for the manifest and ``curate select``: totals, by source, by cluster, by reason."""
    return report_from_counts(policy, budget, seed, outcome_counts(rows, ranks, dropped))


def report_from_counts(policy, budget, seed: int, counts) -> dict:
    """``selection_report`` from ((source, cluster, drop reason or None for selected), rows) pairs."""
    pool_source, sel_source, pool_cluster, sel_cluster, why = Counter(), Counter(), Counter(), Counter(), Counter()
    for (source, cluster, reason), n in counts:
        pool_source[source] += n
        pool_cluster[cluster] += n
        if reason is None:
            sel_source[source] += n
            sel_cluster[cluster] += n
        else:
            why[reason] += n
    return {**policy.describe(), "budget": budget.as_dict(), "seed": seed, "pool": sum(pool_source.values()),
            "selected": sum(sel_source.values()), "dropped": dict(sorted(why.items())),
            "by_source": {s: {"pool": n, "selected": sel_source.get(s, 0)} for s, n in sorted(pool_source.items())},
            "by_cluster": {c: {"pool": n, "selected": sel_cluster.get(c, 0)}
                           for c, n in sorted(pool_cluster.items(), key=lambda kv: (len(kv[0]), kv[0]))}}
