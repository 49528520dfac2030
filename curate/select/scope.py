"""Selection per cluster: the policy runs on each cluster alone with its share of the budget, so
no worker ever holds more than one cluster's features (``select.scope: cluster``).

Why: a global policy needs every candidate's features in one list on one worker (with
embeddings, 15 GB at 10M rows x 384 floats). Per cluster, only small global state is combined:
each cluster's row and token counts (to split the budget) and, for the final order, each
cluster's budget step and count of selected rows. The split is proportional to the cluster's candidates (rows
or fraction budget) or to its approximate tokens (token budget), rounded by largest remainder
with ties to the lower cluster id, so the shares add up to the global budget exactly.

What changes: a policy that compares rows across the whole pool (facility location's coverage,
DEITA's distance threshold, top-k by a score) now compares them within each cluster; every
cluster keeps its share of the budget, like ``cluster_balanced`` with proportional quotas. A
policy says which scopes it supports (``Policy.scopes``); those that are global by nature
(``cluster_balanced`` and ``mixture``, whose quotas span clusters or sources, and ``paser``)
refuse ``scope: cluster``; the first two run over the whole pool without gathering it
(``curate.select.keyed``).

The global rank interleaves the clusters: rows sort by ((rank in cluster - 1) / cluster budget,
cluster id, rank), so each cluster's best row comes first and every prefix of the order holds
the clusters in proportion to their budgets. Pure functions, used
by the Beam step (``pipelines.select``) and by ``curate select`` alike.
"""
from __future__ import annotations

import bisect
import math
from collections import Counter

import pyarrow as pa

from curate.select.base import Budget, Policy, PolicyError, Selection

SCOPES = ("global", "cluster")
NO_CLUSTER = -1  # rows without a cluster id form one group of their own


def check_scope(policy: Policy, scope: str) -> None:
    if scope not in SCOPES:
        raise PolicyError(f"select.scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if scope not in policy.supported_scopes():
        raise PolicyError(f"policy {policy.name}: cannot run with select.scope: {scope} (it supports "
                          f"{', '.join(policy.supported_scopes())}: its decision spans the whole pool)")


def cluster_key(cluster_id) -> int:
    return NO_CLUSTER if cluster_id is None else int(cluster_id)


def _largest_remainder(total: int, weights: dict[int, float], caps: dict[int, int] | None = None) -> dict[int, int]:
    """``total`` split over ``weights`` in proportion, integers adding up to ``total`` (as far as
    ``caps`` allow), remainders to the largest fractional parts, ties to the lower key."""
    whole = sum(weights.values())
    if whole <= 0 or total <= 0:
        return dict.fromkeys(weights, 0)
    exact = {k: total * w / whole for k, w in weights.items()}
    share = {k: math.floor(v) for k, v in exact.items()}
    if caps:
        share = {k: min(v, caps[k]) for k, v in share.items()}
    left = total - sum(share.values())
    for k in sorted(weights, key=lambda k: (-(exact[k] - math.floor(exact[k])), k)):
        if left <= 0:
            break
        if caps is None or share[k] < caps[k]:
            share[k] += 1
            left -= 1
    return share


def split_budget(budget: Budget, sizes: dict[int, tuple[int, int]]) -> dict[int, Budget]:
    """Each cluster's budget from ``{cluster: (candidate rows, approximate tokens)}``: rows in
    proportion to rows (a fraction is of the whole pool, as in the global scope), tokens in
    proportion to tokens; no budget stays no budget."""
    if budget.unlimited:
        return {k: Budget() for k in sizes}
    if budget.tokens is not None:
        share = _largest_remainder(budget.tokens, {k: t for k, (_, t) in sizes.items()})
        return {k: Budget(tokens=v) for k, v in share.items()}
    rows = {k: n for k, (n, _) in sizes.items()}
    total = min(budget.max_rows(sum(rows.values())), sum(rows.values()))
    return {k: Budget(rows=v) for k, v in _largest_remainder(total, rows, caps=rows).items()}


def spacing(budget: Budget, cluster_rows: int) -> int:
    """A cluster's step in the global order: its row budget, or its rows when it has none."""
    share = budget.rows if budget.rows is not None else cluster_rows
    return max(share or 1, 1)


def order_key(cluster: int, rank: int, budget: Budget, cluster_rows: int) -> tuple:
    """Where a row selected at ``rank`` in ``cluster`` goes in the global order."""
    return ((rank - 1) / spacing(budget, cluster_rows), cluster, rank)


def global_ranks(keyed: list[tuple[tuple, str]]) -> dict[str, int]:
    """{id: global rank} from (order_key, id) pairs of the selected rows, all in one list."""
    return dict(ranks_in_bucket(keyed, 0))


# The global order without one list: the selected rows' keys are cut into ranges of their first
# part, (rank - 1) / spacing, about RANK_BUCKET_ROWS rows each; a range's rows are sorted alone and
# numbered from the count of rows in the ranges before it. The cut points come from each
# cluster's (spacing, selected rows), one small pair per cluster, which give every key in closed
# form, so no row is gathered to find them.
RANK_BUCKET_ROWS = 50_000
SAMPLES_PER_BUCKET = 16


def rank_boundaries(shapes: list[tuple[int, int]], rows_per_bucket: int = RANK_BUCKET_ROWS) -> list[float]:
    """Sorted cut points (values of the key's first part) that split the selected rows into
    ranges of about ``rows_per_bucket``, from each cluster's (spacing, selected rows)."""
    total = sum(n for _, n in shapes)
    buckets = math.ceil(total / max(rows_per_bucket, 1))
    if buckets <= 1:
        return []
    stride = max(1, total // (buckets * SAMPLES_PER_BUCKET))
    return quantile_cuts(sorted(m / step for step, n in shapes for m in range(0, n, stride)), buckets)


def quantile_cuts(sample: list, buckets: int) -> list:
    """The distinct values that cut a sorted sample into ``buckets`` parts of about equal size."""
    return sorted({sample[i * len(sample) // buckets] for i in range(1, buckets)})


def bucket_of(key: tuple, boundaries: list[float]) -> int:
    """The range a key falls in: keys that sort earlier never fall in a later range."""
    return bisect.bisect_right(boundaries, key[0])


def bucket_offsets(sizes: list[tuple[int, int]]) -> dict[int, int]:
    """{range: rows in the ranges before it} from (range, rows) pairs."""
    offsets, seen = {}, 0
    for bucket, n in sorted(sizes):
        offsets[bucket] = seen
        seen += n
    return offsets


def ranks_in_bucket(keyed, offset: int) -> list[tuple[str, int]]:
    """(id, global rank) for one range's (order_key, id) pairs, numbered after ``offset`` rows."""
    return [(rid, offset + i) for i, (_, rid) in enumerate(sorted(keyed), start=1)]


def merge_reports(reports: list[dict], policy: Policy, budget: Budget, seed: int) -> dict:
    """One selection report from the per-cluster ones (counts add; the budget is the global one;
    no clusters, no candidates: an empty report)."""
    dropped, sources, clusters = Counter(), {}, {}
    for r in reports:
        dropped.update(r["dropped"])
        for s, c in r["by_source"].items():
            got = sources.setdefault(s, {"pool": 0, "selected": 0})
            got["pool"] += c["pool"]
            got["selected"] += c["selected"]
        clusters.update(r["by_cluster"])
    return {**policy.describe(), "scope": "cluster", "budget": budget.as_dict(), "seed": seed,
            "pool": sum(r["pool"] for r in reports), "selected": sum(r["selected"] for r in reports),
            "dropped": dict(sorted(dropped.items())), "by_source": dict(sorted(sources.items())),
            "by_cluster": dict(sorted(clusters.items(), key=lambda kv: (len(kv[0]), kv[0])))}


def run_per_cluster(policy: Policy, table: pa.Table, budget: Budget, seed: int, embeddings=None,
                    texts: list[str] | None = None) -> Selection:
    """``policy`` on each cluster of ``table`` (a features table with ``cluster_id``) with its
    share of ``budget``; the same decisions the Beam step makes, in one process."""
    if "cluster_id" not in table.column_names or (table.num_rows and table.column("cluster_id").null_count
                                                 == table.num_rows):
        raise PolicyError("select.scope: cluster needs cluster ids (enable the cluster stage)")
    keys = [cluster_key(c) for c in table.column("cluster_id").to_pylist()]
    tokens = table.column("approx_tokens").to_pylist() if "approx_tokens" in table.column_names else [0] * len(keys)
    members: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    sizes = {k: (len(rows), sum(int(tokens[i] or 0) for i in rows)) for k, rows in members.items()}
    budgets = split_budget(budget, sizes)
    keyed, dropped = [], {}
    for k in sorted(members):
        rows = members[k]
        part = table.take(pa.array(rows, pa.int64()))
        emb = None if embeddings is None else embeddings[rows]
        txt = None if texts is None else [texts[i] for i in rows]
        result = run_cluster(policy, part, budgets[k], seed, emb, txt)
        dropped.update(result.dropped)
        keyed += [(order_key(k, r, budgets[k], len(rows)), rid) for r, rid in enumerate(result.selected, 1)]
    ranks = global_ranks(keyed)
    return Selection(sorted(ranks, key=ranks.get), dropped)


def run_cluster(policy: Policy, part: pa.Table, budget: Budget, seed: int, embeddings=None, texts=None) -> Selection:
    """One cluster's decision; a cluster whose share is 0 rows drops them all as over budget."""
    if budget.rows == 0 or budget.tokens == 0:
        return Selection([], {rid: f"{policy.name}:over_budget" for rid in part.column("id").to_pylist()})
    return policy.run(part, budget, seed, embeddings, texts=texts)
