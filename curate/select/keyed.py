"""Global selection without one list, for policies whose decision is a sort (``Policy.keyed``).

Such a policy decides each row from the row alone, a drop reason or a (group, sort value), plus
small global state: the candidates' count and each group's count of eligible rows, from which
it sets each group's quota (``Policy.quotas``). A group keeps its first ``quota`` rows in (sort
value, id) order; the global order interleaves the groups (each group's first row, then each
group's second, groups by name), which is what ``take_in_order`` (one group) and
``take_by_quota`` do over the whole pool. random, top_k, threshold, superfiltering, targeted
(without a cluster cap), all, cluster_balanced and mixture are keyed, with a rows or fraction
budget; a token budget (a row that does not fit is skipped and a later, shorter one may fit)
and the policies that compare rows with each other (facility location, DEITA, PASER, chains)
are not: they gather the features of the rows their shortlist keeps (``curate.select.shortlist``).

Why: with ``select.scope: global`` the Beam step used to gather every candidate's features on
one worker. Keyed, no worker holds more than one range of a group: a group's rows are cut into
ranges of about ``RANK_BUCKET_ROWS`` at cut points taken from a seeded sample (about 16 sampled
rows a range, from a hash no policy's key uses), each range is sorted alone, and its rows'
positions in the group are numbered after the rows of the group's earlier ranges. Selected rows
are then numbered in the global order range by range, as per-cluster selection does
(``curate.select.scope``). ``run_keyed`` does the same in one process; it and the Beam step give
what ``Policy.run`` gives (tests/test_keyed_selection.py).
"""
from __future__ import annotations

import bisect
import hashlib
import math
from collections import Counter

import pyarrow as pa

from curate.select import scope as S
from curate.select.base import Budget, Policy, PolicyError, Selection
from curate.select.features import FEATURES, complete

_SAMPLE_KEY = b"curate.select.keyed"


def _owner(policy: Policy, method: str) -> type:
    return next(c for c in type(policy).__mro__ if method in vars(c))


def applies(policy: Policy, budget: Budget) -> bool:
    """Whether the Beam step can select over the whole pool without gathering it. A subclass (a
    plugin's, say) that replaces a keyed policy's ``choose`` is keyed only if it says so itself."""
    chooser = _owner(policy, "choose")
    declared = chooser.__module__.startswith("curate.select.") or issubclass(_owner(policy, "keyed"), chooser)
    return declared and policy.keyed(budget) and not (policy.wants_embeddings() or policy.wants_text())


def check(policy: Policy, budget: Budget) -> None:
    """The errors ``Policy.run`` raises before it looks at any row, raised when the job is built."""
    if policy.needs_budget and budget.unlimited:
        raise PolicyError(f"policy {policy.name}: needs a budget (rows, fraction or tokens)")


def missing_columns(policy: Policy, candidates: int, present: set[str]) -> None:
    """``Policy.run``'s check: a required column the features lack, or null on every candidate."""
    known = {f.name for f in FEATURES}
    missing = [c for c in ("id", *policy.required_columns())
               if c not in known or (candidates and c != "id" and c not in present)]
    if missing:
        raise PolicyError(f"policy {policy.name}: needs the column(s) {', '.join(missing)}, which this run "
                          f"does not have (enable the stage that writes them)")


def reason(policy: Policy, why: str) -> str:
    """The drop reason as ``Policy.run`` writes it (prefixed by the policy's name)."""
    prefix = f"{policy.name}:"
    return why if why.startswith(prefix) or policy.keeps_step_names else prefix + why


def group_order(quotas: dict) -> dict:
    """{group: its place among the groups}: groups interleave by name, as ``take_by_quota`` orders them."""
    return {g: i for i, g in enumerate(sorted(quotas, key=str))}


def order_key(group_index: int, position: int) -> tuple:
    """A selected row's key in the global order: its position in its group, then the group; the
    shape of ``scope.order_key`` with a step of 1, so the same range numbering applies."""
    return (float(position), group_index, position + 1)


def rank_shapes(quotas: dict) -> list[tuple[int, int]]:
    """(step, selected rows) per group for ``scope.rank_boundaries``."""
    return [(1, n) for n in quotas.values()]


def sampled(rid: str, rows_per_range: int) -> bool:
    """About 16 rows of every ``rows_per_range``, chosen by the id alone."""
    h = int.from_bytes(hashlib.blake2b(rid.encode("utf-8"), digest_size=8, key=_SAMPLE_KEY).digest(), "big")
    return h < 2 ** 64 * min(1.0, S.SAMPLES_PER_BUCKET / max(rows_per_range, 1))


def cut_points(sample: list[tuple], sizes: dict, rows_per_range: int) -> dict:
    """{group: sorted (value, id) cut points} from (group, (value, id)) samples, splitting each
    group of ``sizes`` rows into ranges of about ``rows_per_range``."""
    by_group: dict = {}
    for group, key in sample:
        by_group.setdefault(group, []).append(tuple(key))
    cuts = {}
    for group, keys in by_group.items():
        ranges = math.ceil(sizes.get(group, 0) / max(rows_per_range, 1))
        if ranges > 1:
            cuts[group] = S.quantile_cuts(sorted(keys), ranges)
    return cuts


def range_of(group, key: tuple, cuts: dict) -> int:
    return bisect.bisect_right(cuts.get(group, []), tuple(key))


def range_offsets(counts: list[tuple[tuple, int]]) -> dict:
    """{(group, range): rows of the group in its earlier ranges} from ((group, range), rows) pairs."""
    offsets, seen = {}, Counter()
    for (group, r), n in sorted(counts, key=lambda kv: (str(kv[0][0]), kv[0][1])):
        offsets[(group, r)] = seen[group]
        seen[group] += n
    return offsets


def decide_range(keys: list[tuple], offset: int, quota: int) -> tuple[list[tuple[str, int]], list[str]]:
    """One range of a group: (id, position in the group) of the rows it keeps, ids of the rest."""
    kept, over = [], []
    for pos, (_, rid) in enumerate(sorted(tuple(k) for k in keys), start=offset):
        if pos < quota:
            kept.append((rid, pos))
        else:
            over.append(rid)
    return kept, over


def run_keyed(policy: Policy, table: pa.Table, budget: Budget, seed: int,
              rows_per_range: int = S.RANK_BUCKET_ROWS) -> Selection:
    """The Beam step's decision in one process, range by range (a reference for tests)."""
    check(policy, budget)
    rows = table.to_pylist()
    missing_columns(policy, len(rows), {c for r in rows for c, v in r.items() if v is not None})
    dropped, eligible = {}, []
    for r, got in zip(rows, policy.row_keys(complete(table), seed)):  # by column where the policy can
        if isinstance(got, str):
            dropped[r["id"]] = reason(policy, got)
        else:
            eligible.append((got[0], (got[1], r["id"])))
    sizes = Counter(g for g, _ in eligible)
    quotas = policy.quotas(len(rows), dict(sizes), budget)
    cuts = cut_points([(g, k) for g, k in eligible if sampled(k[1], rows_per_range)], sizes, rows_per_range)
    ranges: dict = {}
    for g, k in eligible:
        ranges.setdefault((g, range_of(g, k, cuts)), []).append(k)
    offsets = range_offsets([(gr, len(ks)) for gr, ks in ranges.items()])
    index = group_order(quotas)
    keyed = []
    for (g, r), ks in ranges.items():
        kept, over = decide_range(ks, offsets[(g, r)], quotas.get(g, 0))
        keyed += [(order_key(index[g], pos), rid) for rid, pos in kept]
        dropped.update((rid, reason(policy, policy.over_reason)) for rid in over)
    ranks = S.global_ranks(keyed)
    return Selection(sorted(ranks, key=ranks.get), dropped)
