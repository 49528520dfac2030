"""Shortlists (curate.select.shortlist): a policy that compares rows sees at most
``max_candidates`` rows, cut first by the keyed policy it declares; on a pool no larger than
that, the decisions are exactly the policy's over the whole pool."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from curate.select import Budget, Policy, PolicyError
from curate.select import shortlist as SL
from curate.select.features import features_table
from curate.select.registry import make
from curate.select.scored import TopK

CHAIN = {"steps": [{"policy": "threshold", "params": {"column": "ifd_ppl", "min": 0.2}},
                   {"policy": "facility_location", "params": {"kernel": "dense"}}]}
SHORTLISTED = [  # (policy, params, budget, the shortlist it declares)
    ("deita", {"column": "ifd_loss", "threshold": 0.8}, Budget(rows=12), "top_k"),
    ("deita", {"column": "rifd", "higher_is_better": False, "threshold": 0.5}, Budget(tokens=900), "top_k"),
    ("superfiltering_diverse", {"upper": 0.9, "lower": 0.1, "ifd_fraction": 0.5}, Budget(fraction=0.2),
     "superfiltering"),
    ("facility_location", {"kernel": "knn", "neighbors": 8}, Budget(rows=10), "random"),
    ("paser", {"clusters": "kmeans", "column": "ifd_ppl"}, Budget(rows=15), "random"),
    ("chain", CHAIN, Budget(fraction=0.15), "threshold"),
    ("top_k", {"column": "ifd_loss"}, Budget(tokens=1500), "top_k"),
    ("targeted", {"column": "rifd", "max_per_cluster": 3}, Budget(rows=14), "top_k"),
    ("random", {}, Budget(tokens=700), "random"),
]
IDS = [f"{name}-{i}" for i, (name, *_) in enumerate(SHORTLISTED)]


def _pool(rng, n):
    """Features, embeddings and texts that take every branch: NaN and null scores (some IFD >= 1),
    ties, rows without a cluster, near-identical embeddings."""
    rows, words = [], [f"w{k}" for k in range(30)]
    for i in range(n):
        def score():
            u = rng.random()
            return None if u < 0.08 else math.nan if u < 0.15 else round(float(rng.random() * 1.2), 1)
        rows.append({"id": f"{i:04d}" + "é" * (i % 3), "source": ["alpaca", "gsm8k"][i % 2],
                     "cluster_id": None if rng.random() < 0.1 else int(rng.integers(0, 4)),
                     "approx_tokens": int(rng.integers(1, 200)),
                     "ifd_loss": score(), "ifd_ppl": score(), "rifd": score()})
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb[1::5] = emb[::5][: len(emb[1::5])] + 1e-4  # near-identical pairs
    texts = [" ".join(rng.choice(words, 6)) + ". " + " ".join(rng.choice(words, 4)) for _ in range(n)]
    return features_table(rows), emb, texts


def _run(name, params, table, budget, emb, texts, cap):
    policy = make(name, json.loads(json.dumps(params)))
    return SL.run_global(policy, table, budget, 3, emb if policy.wants_embeddings() else None,
                         texts if policy.wants_text() else None, cap)


@pytest.mark.parametrize("name,params,budget,short", SHORTLISTED, ids=IDS)
def test_a_pool_within_the_cap_gets_exactly_the_policys_decisions(name, params, budget, short):
    """The shortlist's own drops are the policy's, with the same reasons: nothing changes until the
    pool is larger than ``max_candidates``."""
    rng = np.random.default_rng(len(name) + len(IDS))
    for n in (0, 1, 37, 90):
        table, emb, texts = _pool(rng, n)
        policy = make(name, json.loads(json.dumps(params)))
        assert SL.shortlist_of(policy, budget, 1).name == short
        try:
            want = policy.run(table, budget, 3, emb if policy.wants_embeddings() else None,
                              texts=texts if policy.wants_text() else None)
        except PolicyError as err:  # e.g. a required score null on every row: the same error
            with pytest.raises(PolicyError, match=re.escape(str(err))):
                _run(name, params, table, budget, emb, texts, n + 1)
            continue
        for cap in (n, n + 1, 10**9):
            if cap == 0:
                continue
            got = _run(name, params, table, budget, emb, texts, cap)
            assert got.selected == want.selected and got.dropped == want.dropped


@pytest.mark.parametrize("name,params,budget,short", SHORTLISTED, ids=IDS)
def test_a_larger_pool_is_cut_to_the_shortlists_best_rows(name, params, budget, short):
    rng = np.random.default_rng(7 * len(name))
    table, emb, texts = _pool(rng, 120)
    ids = table.column("id").to_pylist()
    policy = make(name, json.loads(json.dumps(params)))
    first = SL.shortlist_of(policy, budget, 30).run(table, Budget(rows=30), 3)
    for cap in (1, 30):
        got = _run(name, params, table, budget, emb, texts, cap)
        assert set(got.selected) | set(got.dropped) == set(ids) and not set(got.selected) & set(got.dropped)
        cut = {rid for rid, why in got.dropped.items() if why == f"{name}:not_shortlisted"}
        listed = set(ids) - cut - {rid for rid, why in got.dropped.items() if rid in first.dropped
                                   and not first.dropped[rid].endswith("over_budget")}
        assert len(listed) == cap  # the shortlist kept exactly max_candidates rows ...
        if cap == 30:
            assert listed == set(first.selected)  # ... its best ones
        assert set(got.selected) <= listed
        # what the policy decided on those rows, with fractions of the whole pool
        rows = [i for i, rid in enumerate(ids) if rid in listed]
        again = policy.run(table.take(rows), budget, 3, emb[rows] if policy.wants_embeddings() else None,
                           len(ids), [texts[i] for i in rows] if policy.wants_text() else None)
        assert got.selected == again.selected


def test_deita_is_exact_when_its_walk_fills_the_budget_within_the_shortlist():
    rng = np.random.default_rng(1)
    table, emb, _ = _pool(rng, 200)
    policy = make("deita", {"column": "ifd_loss", "threshold": 0.5})
    full = policy.run(table, Budget(rows=5), 3, emb)
    got = SL.run_global(policy, table, Budget(rows=5), 3, emb, None, 40)
    assert got.selected == full.selected and len(got.selected) == 5
    assert sum(why == "deita:not_shortlisted" for why in got.dropped.values()) > 100


class _Compares(Policy):
    name = "compares"

    def shortlist(self):
        return make("facility_location")  # not keyed: refused


class _OwnTopK(TopK):  # a plugin's own choose over a keyed policy: neither keyed nor shortlisted
    name = "own_top_k"

    def choose(self, pool):
        return super().choose(pool)


def test_which_policies_are_shortlisted():
    fl = make("facility_location")
    assert SL.shortlist_of(make("random"), Budget(rows=5), 10) is None  # keyed itself: nothing gathered
    assert SL.shortlist_of(make("random"), Budget(tokens=5), 10).name == "random"  # a token budget gathers
    assert SL.shortlist_of(fl, Budget(rows=5), None) is None  # no cap: every candidate
    assert SL.shortlist_of(make("chain", {"steps": [{"policy": "deita", "params": {"column": "ifd_loss"}},
                                                    {"policy": "random"}]}), Budget(rows=5), 10) is None
    assert SL.shortlist_of(make("targeted"), Budget(rows=5), 10) is None
    assert SL.shortlist_of(fl, Budget(rows=5), 0) is None  # 0: every candidate
    with pytest.raises(PolicyError, match="its shortlist facility_location is not keyed"):
        SL.shortlist_of(_Compares(), Budget(rows=5), 10)
    assert SL.shortlist_of(_OwnTopK(column="ifd_loss"), Budget(rows=5), 10) is None
    with pytest.raises(PolicyError, match="max_candidates: expected 0"):
        SL.shortlist_of(fl, Budget(rows=5), -1)
    with pytest.raises(PolicyError, match="deita: needs the column"):  # the policy's columns, not top_k's
        SL.run_global(make("deita", {"column": "rds_score"}), features_table([{"id": "a"}, {"id": "b"}]),
                      Budget(rows=1), 0, np.zeros((2, 4), np.float32), None, 1)
