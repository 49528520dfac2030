"""A bounded candidate set for the policies that compare rows with each other.

Facility location, DEITA, PASER, Superfiltering.D, a chain, or any policy under a token budget
is not keyed (``curate.select.keyed``): its decision needs the candidates side by side, so the
Beam step gathers their features (and embeddings) on one worker. To keep that worker's memory
bounded whatever the pool's size, such a policy declares a shortlist (``Policy.shortlist``): a
keyed policy whose first ``select.max_candidates`` rows are the only ones it looks at. The
shortlist is decided range by range like any keyed policy; only its rows are gathered.

What each declares, and why it is a fair cut:
- DEITA and ``targeted`` with ``max_per_cluster``: ``top_k`` by the score column, the order
  their walk visits rows in (the same selection whenever the walk fills the budget within the
  shortlist);
- Superfiltering.D: ``superfiltering`` by IFD, the filter its first step applies;
- facility location and PASER: ``random``, a seeded uniform sample (coverage and the clusters'
  degradation means are estimated on it without bias);
- a keyed policy gathered only for a token budget: itself (its own ranking);
- a chain: its first step, when that step is keyed itself; otherwise none.
A policy that declares none gathers every candidate, and the job's log says so.

The shortlist's own drops (a NaN score, an IFD out of range) are the policy's drops with the same
reason; rows past the shortlist are dropped as ``<policy>:not_shortlisted``. So on a pool of at
most ``max_candidates`` rows the selection is exactly the policy's over the whole pool
(tests/test_shortlist.py), and on a larger one ``run_global`` gives what the Beam step gives.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from curate.select import keyed as K
from curate.select.base import Budget, Policy, PolicyError, Selection
from curate.settings import Select

DEFAULT_MAX_CANDIDATES = Select.max_candidates  # 200,000: about 0.5 GB with 384-float embeddings
NOT_SHORTLISTED = "not_shortlisted"


def shortlist_of(policy: Policy, budget: Budget, max_candidates: int | None) -> Policy | None:
    """The keyed policy that cuts the pool before ``policy`` runs, or None: the policy is keyed
    itself under ``budget`` (nothing is gathered), declares no shortlist, or there is no cap."""
    if max_candidates is not None and max_candidates < 0:
        raise PolicyError(f"select.max_candidates: expected 0 (no cap) or more rows, got {max_candidates}")
    if not max_candidates or K.applies(policy, budget):
        return None
    short = policy.shortlist()
    if short is None:
        return None
    if not K.applies(short, Budget(rows=max_candidates)):
        if short is policy:  # a plugin's own choose over a keyed policy: it sees every candidate
            return None
        raise PolicyError(f"policy {policy.name}: its shortlist {short.name} is not keyed "
                          f"(a shortlist must be decided range by range)")
    return short


def cut_reason(policy: Policy, short: Policy, why: str) -> str:
    """A shortlist drop as the policy itself would write it: past the shortlist
    ``<policy>:not_shortlisted``; its own reason under the policy's name, or under the step's
    for a policy whose reasons keep their steps' names (Superfiltering.D, a chain)."""
    if why == short.over_reason:
        return f"{policy.name}:{NOT_SHORTLISTED}"
    return K.reason(short, why) if policy.keeps_step_names else K.reason(policy, why)


def run_global(policy: Policy, table: pa.Table, budget: Budget, seed: int, embeddings=None,
               texts: list[str] | None = None, max_candidates: int | None = DEFAULT_MAX_CANDIDATES) -> Selection:
    """``policy`` over the whole pool as the Beam step runs it with ``select.scope: global``: through
    its shortlist of ``max_candidates`` rows when it declares one, else on every candidate."""
    short = shortlist_of(policy, budget, max_candidates)
    if short is None:
        return policy.run(table, budget, seed, embeddings, texts=texts)
    ids = table.column("id").to_pylist()
    K.check(policy, budget)
    K.missing_columns(policy, len(ids), {c for c in table.column_names if table.column(c).null_count < len(ids)})
    first = short.run(table, Budget(rows=max_candidates), seed)
    prefix = f"{short.name}:"
    dropped = {rid: cut_reason(policy, short, why[len(prefix):] if why.startswith(prefix) else why)
               for rid, why in first.dropped.items()}
    kept = set(first.selected)
    rows = [i for i, rid in enumerate(ids) if rid in kept]
    second = policy.run(table.take(pa.array(rows, pa.int64())), budget, seed,
                        None if embeddings is None else np.asarray(embeddings)[rows], start_size=len(ids),
                        texts=None if texts is None else [texts[i] for i in rows])
    return Selection(second.selected, {**dropped, **second.dropped})


def describe(short: Policy, max_candidates: int) -> dict:
    """The shortlist as the selection report names it."""
    return {**short.describe(), "max_candidates": max_candidates}
