"""Built-in selection policies on hand-made tables (curate.select): no Beam, no models."""
import math

import numpy as np
import pytest

from curate.select import Budget, PolicyError, available, features_table, make
from curate.select.diversity import TIE, dense_kernel, greedy_dense, greedy_sparse, knn_kernel
from curate.select.quotas import allocate, gumbel

NAN = math.nan


def table(scores=None, sources=None, clusters=None, chars=None, ids=None):
    n = len(next(x for x in (scores, sources, clusters, chars, ids) if x is not None))
    ids = ids or [f"r{i:02d}" for i in range(n)]
    rows = []
    for i in range(n):
        rows.append({"id": ids[i], "source": (sources or ["a"] * n)[i],
                     "ifd_loss": None if scores is None else scores[i],
                     "cluster_id": None if clusters is None else clusters[i],
                     "approx_tokens": None if chars is None else chars[i]})
    return features_table(rows)


def run(name, t, params=None, seed=0, emb=None, **budget):
    return make(name, params or {}).run(t, Budget(**budget), seed, emb)


def test_every_builtin_is_listed_with_documented_parameters():
    names = set(available())
    assert {"all", "threshold", "top_k", "superfiltering", "superfiltering_diverse", "facility_location",
            "cluster_balanced", "deita", "random", "mixture", "chain"} <= names
    for cls in available().values():
        assert cls.summary
        for spec in cls.params.values():
            assert spec.doc


@pytest.mark.parametrize("name,params", [("top_k", {"column": "ifd_loss"}), ("superfiltering", {}),
                                         ("random", {}), ("threshold", {"column": "ifd_loss", "max": 0.95})])
def test_accounting_and_zero_and_oversized_budgets(name, params):
    t = table([0.5, 0.9, NAN, 0.7, 1.2, 0.7])
    for rows in (0, 3, 100):
        sel = run(name, t, params, rows=rows)
        assert set(sel.selected) | set(sel.dropped) == set(t.column("id").to_pylist())
        assert not set(sel.selected) & set(sel.dropped)
        assert len(sel.selected) <= rows
        assert all(r.startswith(f"{name}:") for r in sel.dropped.values())
        if name != "random":
            assert "r02" not in sel.selected  # NaN is never selected
    assert run(name, t, params, rows=0).selected == []


def test_top_k_ties_break_by_id_and_nan_is_never_selected():
    t = table([0.7, NAN, 0.7, 0.9, 0.7], ids=["e", "d", "c", "b", "a"])
    sel = run("top_k", t, {"column": "ifd_loss"}, rows=3)
    assert sel.selected == ["b", "a", "c"]
    assert sel.dropped == {"d": "top_k:score_nan", "e": "top_k:over_budget"}
    low = run("top_k", t, {"column": "ifd_loss", "higher_is_better": False}, rows=10)
    assert low.selected == ["a", "c", "e", "b"]  # NaN dropped even with room left


def test_superfiltering_edges_follow_the_spec():
    t = table([1.0, 0.99, 1.2, NAN, 0.0, 0.3])
    sel = run("superfiltering", t, rows=10)
    assert sel.selected == ["r01", "r05"]
    assert sel.dropped == {"r00": "superfiltering:ifd_ge_upper", "r02": "superfiltering:ifd_ge_upper",
                           "r03": "superfiltering:score_nan", "r04": "superfiltering:ifd_le_lower"}
    assert run("superfiltering", t, fraction=0.2).selected == ["r01"]  # round(0.2 x 6) = 1


def test_threshold_bounds_inclusive_and_strict():
    t = table([0.1, 0.5, 0.9, NAN])
    assert run("threshold", t, {"column": "ifd_loss", "min": 0.5}).selected == ["r02", "r01"]
    strict = run("threshold", t, {"column": "ifd_loss", "min": 0.5, "strict": True})
    assert strict.selected == ["r02"] and strict.dropped["r01"] == "threshold:below_min"
    with pytest.raises(PolicyError, match="give min, max or both"):
        make("threshold", {"column": "ifd_loss"})


def test_token_budget_skips_rows_that_do_not_fit():
    t = table([0.9, 0.8, 0.7], chars=[50, 100, 40])
    sel = run("top_k", t, {"column": "ifd_loss"}, tokens=95)
    assert sel.selected == ["r00", "r02"] and sel.dropped == {"r01": "top_k:over_budget"}


def test_random_is_seeded_and_independent_of_row_order():
    t = table(sources=["a"] * 50)
    one = run("random", t, seed=3, rows=10)
    again = run("random", t.take(np.random.default_rng(0).permutation(50)), seed=3, rows=10)
    other = run("random", t, seed=4, rows=10)
    assert one.selected == again.selected and one.selected != other.selected


def test_missing_column_and_budget_give_clear_errors():
    t = features_table([{"id": "a"}]).drop_columns(["ifd_loss"])
    with pytest.raises(PolicyError, match="needs the column\\(s\\) ifd_loss"):
        run("superfiltering", t, rows=1)
    with pytest.raises(PolicyError, match="needs a budget"):
        run("top_k", table([0.1]), {"column": "ifd_loss"})
    with pytest.raises(PolicyError, match="did you mean 'superfiltering'"):
        make("superfilter")
    with pytest.raises(PolicyError, match="unknown parameter 'colum'"):
        make("top_k", {"colum": "x"})
    with pytest.raises(PolicyError, match="needs embeddings"):
        run("deita", table([0.1]), {"column": "ifd_loss"}, rows=1)


def test_allocate_sums_exactly_to_the_budget_with_caps():
    sizes = {"a": 1, "b": 2, "c": 50, "d": 7}
    for budget in range(0, 61):
        for weights in (sizes, {g: 1.0 for g in sizes}, {g: math.sqrt(n) for g, n in sizes.items()}):
            q = allocate(budget, sizes, weights)
            assert sum(q.values()) == min(budget, 60)
            assert all(0 <= q[g] <= sizes[g] for g in sizes)
    assert allocate(10, {"a": 1, "b": 100}, {"a": 1, "b": 1}) == {"a": 1, "b": 9}  # redistributed


def test_kmq_softmax_sampling_frequency():
    # methods.md 6a: scores [0, ln 3], draw 1: item 2 wins with p = 3/4
    wins = 0
    for seed in range(10_000):
        keys = np.array([0.0, math.log(3)]) + gumbel(["x", "y"], seed)
        wins += int(np.argmax(keys) == 1)
    assert abs(wins / 10_000 - 0.75) < 0.02


def test_cluster_balanced_quotas_modes_and_empty_clusters():
    clusters = [0] * 8 + [1] * 2 + [2] * 1
    t = table([0.1 * i for i in range(11)], clusters=clusters)
    prop = run("cluster_balanced", t, {"score": "ifd_loss"}, rows=5)
    counts = {c: sum(1 for i in prop.selected if clusters[int(i[1:])] == c) for c in (0, 1, 2)}
    assert sum(counts.values()) == 5 and counts[0] >= 3
    assert [i for i in prop.selected if clusters[int(i[1:])] == 0] == ["r07", "r06", "r05", "r04"][:counts[0]]
    equal = run("cluster_balanced", t, {"quota": "equal", "score": "ifd_loss"}, rows=6)
    eq = {c: sum(1 for i in equal.selected if clusters[int(i[1:])] == c) for c in (0, 1, 2)}
    assert eq == {0: 3, 1: 2, 2: 1}  # small clusters full, the rest redistributed
    assert equal.selected[:3] == ["r07", "r09", "r10"]  # interleaved: each cluster's best first
    uniform = run("cluster_balanced", t, {"quota": "sqrt"}, seed=1, rows=11)
    assert len(uniform.selected) == 11 and not uniform.dropped  # budget = pool
    assert run("cluster_balanced", t, {"quota": "equal"}, rows=0).selected == []
    nan = run("cluster_balanced", table([NAN, 0.5], clusters=[0, 0]), {"score": "ifd_loss"}, rows=2)
    assert nan.selected == ["r01"] and nan.dropped == {"r00": "cluster_balanced:score_nan"}
    # a cluster left empty (all its scores NaN) gets no quota; the others share the budget
    empty = run("cluster_balanced", table([NAN, NAN, 0.2, 0.3, 0.4, 0.5], clusters=[7, 7, 1, 1, 2, 2]),
                {"quota": "equal", "score": "ifd_loss"}, rows=4)
    assert sorted(empty.selected) == ["r02", "r03", "r04", "r05"]


def test_mixture_shares_and_redistribution():
    t = table(sources=["a"] * 20 + ["b"] * 3 + ["c"] * 5)
    sel = run("mixture", t, {"shares": {"a": 0.5, "b": 0.5}}, rows=10)
    src = [t.column("source")[t.column("id").to_pylist().index(i)].as_py() for i in sel.selected]
    assert src.count("b") == 3 and src.count("a") == 7  # b is short: a fills its rest
    assert all(sel.dropped[i] == "mixture:source_not_in_mixture" for i in t.column("id").to_pylist()[23:])
    strict = run("mixture", t, {"shares": {"a": 0.5, "b": 0.5}, "redistribute": False}, rows=10)
    assert len(strict.selected) == 8
    with pytest.raises(PolicyError, match="shares"):
        make("mixture", {"shares": {}})


def _naive_greedy(sim, k):
    cur, picked = np.zeros(len(sim)), []
    for _ in range(k):
        gains = [(np.maximum(sim[:, j] - cur, 0).sum() if j not in picked else -1) for j in range(len(sim))]
        j = int(np.argmax(gains))
        picked.append(j)
        cur = np.maximum(cur, sim[:, j])
    return picked


def _unit(n, d=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_facility_location_lazy_greedy_equals_plain_greedy_and_knn_with_all_neighbours():
    x = _unit(40)
    sim = dense_kernel(x.astype(np.float64))
    assert np.allclose(np.diag(sim), 1.0) and sim.min() >= math.exp(-2 / 16) - 1e-9
    assert greedy_dense(sim, 10) == _naive_greedy(sim, 10)
    assert greedy_sparse(*knn_kernel(x, 39), 10) == greedy_dense(sim, 10)
    t = table(sources=["a"] * 40)
    dense = run("facility_location", t, {"kernel": "dense"}, emb=x, rows=10)
    knn = run("facility_location", t, {"kernel": "knn", "neighbors": 39}, emb=x, rows=10)
    assert dense.selected == knn.selected and len(dense.selected) == 10
    sparse = run("facility_location", t, {"kernel": "knn", "neighbors": 5}, emb=x, rows=10)
    assert len(sparse.selected) == 10


def test_facility_location_ties_within_float_noise_go_to_the_smaller_id_on_any_kernel():
    """Two near-identical rows: which one's gain is larger by 1e-11 depends on the kernels that
    computed the embeddings (seen between AVX-512 and AVX2). Within the tie tolerance the smaller
    id wins, whichever way the noise goes; a real gap still decides."""
    base = _unit(12, seed=3).astype(np.float64)
    for sign in (1, -1):
        x = np.vstack([base, base[5]])  # row 12 duplicates row 5
        x[12] += sign * 1e-9 * _unit(1, seed=4)[0]
        x[5] -= sign * 1e-9 * _unit(1, seed=4)[0]
        sim = dense_kernel(x)
        picks = greedy_dense(sim, 6)
        assert greedy_sparse(*knn_kernel(x.astype(np.float32), 12), 6) == picks
        assert 12 not in picks  # the copy with the larger index never wins a tie against row 5
        assert (12 in greedy_dense(sim, 6, tie=0.0)) == (sign == 1)  # without the tolerance the noise decides
        assert abs(sim[:, 5].sum() - sim[:, 12].sum()) < TIE * len(x)  # a tie within the tolerance
    assert greedy_dense(sim, 6, tie=0.0) == _naive_greedy(sim, 6)  # no tolerance: the plain argmax


def test_facility_location_prefers_covering_distinct_groups():
    centers = _unit(3, seed=1)
    x = np.repeat(centers, [10, 10, 10], axis=0) + 0.01 * _unit(30, seed=2)
    sel = run("facility_location", table(sources=["a"] * 30), emb=x.astype(np.float32), rows=3)
    assert sorted(int(i[1:]) // 10 for i in sel.selected) == [0, 1, 2]


def test_superfiltering_diverse_filters_then_diversifies():
    x = _unit(20)
    scores = [0.04 + 0.05 * i for i in range(20)]  # all valid (0 < IFD < 1)
    sel = run("superfiltering_diverse", table(scores), {"ifd_fraction": 0.5}, emb=x, rows=4)
    assert len(sel.selected) == 4 and all(int(i[1:]) >= 10 for i in sel.selected)
    reasons = set(sel.dropped.values())
    assert reasons == {"superfiltering:over_budget", "facility_location:not_chosen"}


def test_deita_repr_filter():
    e1 = np.array([1.0, 0.0], np.float32)
    e_095 = np.array([0.95, math.sqrt(1 - 0.95 ** 2)], np.float32)
    e_090 = np.array([0.9, math.sqrt(1 - 0.81)], np.float32)
    e_far = np.array([0.0, 1.0], np.float32)
    t = table([0.9, 0.8, 0.7, 0.6])
    sel = run("deita", t, {"column": "ifd_loss"}, emb=np.stack([e1, e_095, e_090, e_far]))
    # cos 0.95 to the better row: dropped; cos 0.9 exactly: kept (strict >); orthogonal: kept
    assert sel.selected == ["r00", "r02", "r03"] and sel.dropped == {"r01": "deita:too_similar"}
    capped = run("deita", t, {"column": "ifd_loss"}, emb=np.stack([e1, e_095, e_090, e_far]), rows=2)
    assert capped.selected == ["r00", "r02"] and capped.dropped["r03"] == "deita:over_budget"


def test_chain_fractions_are_of_the_starting_pool():
    t = table([0.005 + 0.009 * i for i in range(100)])
    chain = make("chain", {"steps": [{"policy": "superfiltering", "budget": {"fraction": 0.2}},
                                     {"policy": "random", "budget": {"fraction": 0.05}}]})
    sel = chain.run(t, Budget(), seed=1)
    assert len(sel.selected) == 5 and all(int(i[1:]) >= 80 for i in sel.selected)
    assert sum(r == "superfiltering:over_budget" for r in sel.dropped.values()) == 80
    assert sum(r == "random:over_budget" for r in sel.dropped.values()) == 15
    with pytest.raises(PolicyError, match="steps\\[1\\]"):
        make("chain", {"steps": [{"policy": "all"}, {"params": {}}]})


def test_shuffled_pool_gives_the_same_selection_for_every_builtin():
    rng = np.random.default_rng(0)
    n = 60
    t = table([float(v) for v in rng.uniform(0.2, 1.1, n)], sources=[("a", "b")[i % 2] for i in range(n)],
              clusters=[i % 4 for i in range(n)])
    x = _unit(n, seed=5)
    perm = rng.permutation(n)
    cases = [("all", {}), ("random", {}), ("top_k", {"column": "ifd_loss"}), ("superfiltering", {}),
             ("threshold", {"column": "ifd_loss", "max": 0.9}), ("facility_location", {}),
             ("superfiltering_diverse", {"ifd_fraction": 0.5}), ("deita", {"column": "ifd_loss", "threshold": 0.3}),
             ("cluster_balanced", {"score": "ifd_loss", "within": "softmax"}),
             ("mixture", {"shares": {"a": 0.8, "b": 0.2}}),
             ("chain", {"steps": [{"policy": "superfiltering", "budget": {"fraction": 0.5}},
                                  {"policy": "cluster_balanced"}]})]
    for name, params in cases:
        one = run(name, t, params, seed=7, emb=x, rows=12)
        two = run(name, t.take(perm), params, seed=7, emb=x[perm], rows=12)
        assert one.selected == two.selected and one.dropped == two.dropped, name
        assert 0 < len(one.selected) <= 12, name


def test_deita_block_size_never_changes_the_selection(monkeypatch):
    from curate.select.diversity import Deita

    x = _unit(300, d=8, seed=9)
    t = table([float(v) for v in np.random.default_rng(1).uniform(0, 1, 300)])
    results = []
    for block in (1, 7, 256, 1000):
        monkeypatch.setattr(Deita, "BLOCK", block)
        results.append(run("deita", t, {"column": "ifd_loss", "threshold": 0.6}, emb=x, rows=40))
    assert all(r == results[0] for r in results)
    assert 0 < len(results[0].selected) <= 40 and "deita:too_similar" in results[0].dropped.values()


def test_targeted_takes_the_best_rows_and_caps_each_cluster():
    t = table([0.9, 0.8, NAN, 0.7, 0.6, 0.5], clusters=[0, 0, 0, 0, 1, 1])
    plain = run("targeted", t, {"column": "ifd_loss"}, rows=3)
    assert plain.selected == ["r00", "r01", "r03"] and plain.dropped["r02"] == "targeted:score_nan"
    capped = run("targeted", t, {"column": "ifd_loss", "max_per_cluster": 2}, rows=3)
    assert capped.selected == ["r00", "r01", "r04"]
    assert capped.dropped == {"r02": "targeted:score_nan", "r03": "targeted:cluster_cap",
                              "r05": "targeted:over_budget"}
    with pytest.raises(PolicyError, match="max_per_cluster needs cluster_id"):
        run("targeted", table([0.9, 0.8]), {"column": "ifd_loss", "max_per_cluster": 1}, rows=1)
    assert make("targeted", {}).required_columns() == ("rds_score",)


# --- select.scope: cluster (curate.select.scope) --------------------------------------------------

def test_budget_split_per_cluster_adds_up_exactly_and_follows_the_sizes():
    from curate.select.scope import split_budget

    sizes = {0: (5, 50), 1: (3, 300), 2: (2, 20), -1: (1, 10)}
    rows = split_budget(Budget(rows=4), sizes)
    assert {k: b.rows for k, b in rows.items()} == {0: 2, 1: 1, 2: 1, -1: 0}  # 1.82, 1.09, 0.73, 0.36
    assert sum(b.rows for b in split_budget(Budget(rows=7), sizes).values()) == 7
    big = split_budget(Budget(rows=100), sizes)  # more than the pool: every cluster whole
    assert {k: b.rows for k, b in big.items()} == {k: n for k, (n, _) in sizes.items()}
    half = split_budget(Budget(fraction=0.5), sizes)  # half of the whole pool's 11 rows, rounded: 6
    assert sum(b.rows for b in half.values()) == 6 and half[0].rows == 3
    tokens = split_budget(Budget(tokens=190), sizes)  # in proportion to each cluster's tokens
    assert {k: b.tokens for k, b in tokens.items()} == {0: 25, 1: 150, 2: 10, -1: 5}
    assert all(b.unlimited for b in split_budget(Budget(), sizes).values())
    tie = split_budget(Budget(rows=1), {3: (1, 0), 1: (1, 0)})  # equal remainders: the lower id
    assert tie[1].rows == 1 and tie[3].rows == 0


def test_per_cluster_selection_keeps_each_clusters_share_and_interleaves_the_ranks():
    from curate.select.scope import run_per_cluster

    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, NAN, 0.1]
    clusters = [0, 0, 0, 0, 0, 0, 1, 1, 1, None]
    t = table(scores, clusters=clusters)
    sel = run_per_cluster(make("top_k", {"column": "ifd_loss"}), t, Budget(rows=5), 0)
    assert set(sel.selected) | set(sel.dropped) == set(t.column("id").to_pylist())
    assert not set(sel.selected) & set(sel.dropped)
    # shares 6/10, 3/10, 1/10 of 5 rows: 3, 1 (2 rounded down, remainder to the larger part), 1
    assert set(sel.selected) == {"r00", "r01", "r02", "r06", "r09"}
    # the global top_k takes the five best scores, all in cluster 0
    assert set(make("top_k", {"column": "ifd_loss"}).run(t, Budget(rows=5)).selected) == {f"r0{i}" for i in range(5)}
    assert sel.selected == ["r09", "r00", "r06", "r01", "r02"]  # every cluster's best first, then the rest
    assert sel.dropped["r08"] == "top_k:score_nan" and sel.dropped["r07"] == "top_k:over_budget"
    one = run_per_cluster(make("top_k", {"column": "ifd_loss"}), t, Budget(rows=1), 0)  # clusters 1 and none: 0
    assert one.selected == ["r00"] and one.dropped["r06"] == one.dropped["r09"] == "top_k:over_budget"
    shuffled = t.take(np.random.default_rng(0).permutation(t.num_rows))
    assert run_per_cluster(make("top_k", {"column": "ifd_loss"}), shuffled, Budget(rows=5), 0) == sel


def test_ranks_numbered_range_by_range_equal_the_one_list_order():
    """The global order cut into ranges (from each cluster's spacing and count alone), each range
    sorted on its own and numbered after the ranges before it: the ranks of one sorted list."""
    from curate.select.scope import (bucket_of, bucket_offsets, global_ranks, rank_boundaries, ranks_in_bucket,
                                     order_key, spacing)

    rng = np.random.default_rng(3)
    for case in range(30):
        clusters, keyed = {}, []
        for k in range(-1, int(rng.integers(1, 40))):
            rows = int(rng.integers(1, 60))
            budget = Budget(rows=int(rng.integers(0, rows + 1))) if case % 3 else Budget(tokens=100)
            chosen = min(rows, budget.rows) if budget.rows is not None else int(rng.integers(0, rows + 1))
            if case % 5 == 0 and k % 2:
                chosen = max(chosen - 3, 0)  # a policy that took less than its share
            clusters[k] = (spacing(budget, rows), chosen)
            keyed += [(order_key(k, r, budget, rows), f"c{k}r{r}") for r in range(1, chosen + 1)]
        per_range = int(rng.integers(1, 30))
        bounds = rank_boundaries(list(clusters.values()), per_range)
        assert bounds == sorted(set(bounds))
        ranges = {}
        for kv in keyed:
            ranges.setdefault(bucket_of(kv[0], bounds), []).append(kv)
        offsets = bucket_offsets([(b, len(v)) for b, v in ranges.items()])
        got = dict(pair for b, v in ranges.items() for pair in ranks_in_bucket(v[::-1], offsets[b]))
        assert got == global_ranks(keyed), case
        if len(keyed) > 4 * per_range:  # more than one range, none far above its size
            assert len(ranges) > 1 and max(map(len, ranges.values())) <= 3 * per_range + len(clusters)
    assert rank_boundaries([(10, 10), (5, 0)], 50) == [] and bucket_offsets([]) == {}
    ties = [(order_key(k, r, Budget(rows=4), 8), f"{k}-{r}") for k in (2, 0, 1) for r in (1, 2, 3, 4)]
    bounds = rank_boundaries([(4, 4)] * 3, 2)  # equal keys' first parts: a tie never spans two ranges
    assert len({bucket_of(key, bounds) for key, _ in ties if key[0] == 0.25}) == 1


def test_policies_global_by_nature_refuse_the_cluster_scope():
    from curate.select.scope import check_scope, run_per_cluster

    for name, params in (("cluster_balanced", {}), ("mixture", {"shares": {"a": 1.0}}),
                         ("paser", {"clusters": "kmeans"})):
        with pytest.raises(PolicyError, match=f"policy {name}: cannot run with select.scope: cluster"):
            check_scope(make(name, params), "cluster")
    chain = make("chain", {"steps": [{"policy": "superfiltering", "budget": {"fraction": 0.5}},
                                     {"policy": "cluster_balanced"}]})
    assert chain.supported_scopes() == ("global",)
    check_scope(make("facility_location", {}), "cluster")
    with pytest.raises(PolicyError, match="needs cluster ids"):
        run_per_cluster(make("random", {}), table([0.5, 0.6]), Budget(rows=1), 0)


def test_per_cluster_reports_merge_to_the_report_of_the_whole_selection():
    from curate.select.features import selection_report
    from curate.select.scope import merge_reports, run_per_cluster, split_budget

    policy, budget = make("random", {}), Budget(rows=4)
    t = table([0.1] * 9, sources=list("aabbbabab"), clusters=[0, 0, 0, 1, 1, 1, 1, None, None])
    rows = t.to_pylist()
    whole = run_per_cluster(policy, t, budget, 0)
    per = []
    shares = split_budget(budget, {0: (3, 0), 1: (4, 0), -1: (2, 0)})
    for key, members in ((0, rows[:3]), (1, rows[3:7]), (-1, rows[7:])):
        part = policy.run(features_table(members), shares[key], 0)
        per.append(selection_report(policy, shares[key], 0, members, part.ranks(), part.dropped))
    merged = merge_reports(per, policy, budget, 0)
    assert merged == {**selection_report(policy, budget, 0, rows, whole.ranks(), whole.dropped), "scope": "cluster"}
    empty = merge_reports([], policy, budget, 0)  # no candidate reached the selection
    assert (empty["policy"], empty["pool"], empty["selected"], empty["by_cluster"]) == ("random", 0, 0, {})


def test_targeted_balanced_gives_each_subtask_its_share_when_one_dominates():
    """Two target subtasks; the math subtask's cosines run higher on every row, so every row's best
    subtask (rds_subtask) is math, code rows included. max gives math the whole budget; balanced
    ranks each subtask by its own score and takes turns, so the code rows get half."""
    import json as _json

    rows = [{"id": f"m{i:02d}", "source": "pool", "rds_score": 0.9 - i / 1000, "rds_subtask": "math",
             "rds_subtasks": _json.dumps({"math": 0.9 - i / 1000, "code": 0.2})} for i in range(30)]
    rows += [{"id": f"c{i:02d}", "source": "pool", "rds_score": 0.6 - i / 1000, "rds_subtask": "math",
              "rds_subtasks": _json.dumps({"math": 0.6 - i / 1000, "code": 0.4 - i / 1000})} for i in range(30)]
    rows += [{"id": f"n{i}", "source": "pool", "rds_score": math.nan, "rds_subtask": None, "rds_subtasks": None}
             for i in range(3)]
    t = features_table(rows)
    top = run("targeted", t, {"column": "rds_score"}, rows=10)
    assert all(r.startswith("m") for r in top.selected)
    policy = make("targeted", {"column": "rds_score", "subtasks": "balanced"})
    assert not policy.keyed(Budget(rows=10)) and policy.shortlist() is None
    bal = policy.run(t, Budget(rows=10), 0)
    assert bal.selected == [x for i in range(5) for x in (f"c{i:02d}", f"m{i:02d}")]  # code sorts first
    assert bal.dropped["c05"] == "targeted:over_budget" and bal.dropped["n0"] == "targeted:score_nan"
    # a subtask that runs out passes its turns on: only 3 code rows score for code
    short = [dict(r, rds_subtasks=_json.dumps({"math": r["rds_score"]})) if r["id"] >= "c03" and r["id"] < "c99"
             else r for r in rows]
    got = run("targeted", features_table(short), {"column": "rds_score", "subtasks": "balanced"}, rows=10)
    assert got.selected[:6] == ["c00", "m00", "c01", "m01", "c02", "m02"] and len(got.selected) == 10
    with pytest.raises(PolicyError, match="_score column"):
        make("targeted", {"column": "ifd_loss", "subtasks": "balanced"})
    with pytest.raises(PolicyError, match="do not combine"):
        make("targeted", {"subtasks": "balanced", "max_per_cluster": 2})


def test_quota_policies_drop_scores_at_or_above_upper():
    """cluster_balanced / mixture ranked by IFD would take misaligned pairs (IFD >= 1) first."""
    t = table(scores=[1.4, 1.0, 0.9, 0.8, 0.7, 0.6, 1.2, 0.5], sources=["a"] * 4 + ["b"] * 4,
              clusters=[0, 0, 0, 0, 1, 1, 1, 1])
    plain = run("cluster_balanced", t, {"score": "ifd_loss"}, rows=4)
    assert "r00" in plain.selected and "r06" in plain.selected
    capped = run("cluster_balanced", t, {"score": "ifd_loss", "upper": 1.0}, rows=4)
    assert capped.selected and not {"r00", "r01", "r06"} & set(capped.selected)
    assert {capped.dropped[r] for r in ("r00", "r01", "r06")} == {"cluster_balanced:score_ge_upper"}
    mix = run("mixture", t, {"shares": {"a": 1, "b": 1}, "score": "ifd_loss", "upper": 1.0}, rows=4)
    assert sorted(mix.selected) == ["r02", "r03", "r04", "r05"]
    with pytest.raises(PolicyError, match="upper needs a score"):
        make("mixture", {"shares": {"a": 1}, "upper": 1.0})


def test_quota_policies_rank_smaller_scores_first_when_asked():
    """r-IFD is lower-is-better: mixture by rifd within sources takes each source's lowest first."""
    t = table(scores=[0.9, 0.2, 0.5, 0.1, 0.7, 0.3, 0.8, 0.4], sources=["a"] * 4 + ["b"] * 4,
              clusters=[0, 0, 0, 0, 1, 1, 1, 1])
    high = run("mixture", t, {"shares": {"a": 1, "b": 1}, "score": "ifd_loss"}, rows=4)
    low = run("mixture", t, {"shares": {"a": 1, "b": 1}, "score": "ifd_loss", "higher_is_better": False}, rows=4)
    assert high.selected == ["r00", "r06", "r02", "r04"]
    assert low.selected == ["r03", "r05", "r01", "r07"]  # interleaved by group, best (lowest) first
    assert low.dropped["r00"] == "mixture:over_quota"
    soft = run("cluster_balanced", t, {"score": "ifd_loss", "within": "softmax", "temperature": 0.01,
                                       "higher_is_better": False}, rows=2)
    assert sorted(soft.selected) == ["r03", "r05"]  # a near-zero temperature is top-by-lowest
    capped = run("mixture", t, {"shares": {"a": 1, "b": 1}, "score": "ifd_loss", "higher_is_better": False,
                                "upper": 0.85}, rows=8)
    assert capped.dropped["r00"] == "mixture:score_ge_upper" and "r06" in capped.selected  # upper is on the score
