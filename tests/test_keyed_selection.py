"""Keyed selection (curate.select.keyed): policies whose decision is a sort, decided range by range
from per-row keys and per-group quotas, decide exactly what the policy decides over one list."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from curate.select import Budget, PolicyError
from curate.select import keyed as K
from curate.select.features import complete, features_table
from curate.select.registry import make

KEYED = [
    ("all", {}), ("random", {}), ("top_k", {"column": "ifd_loss"}),
    ("top_k", {"column": "rifd", "higher_is_better": False}),
    ("threshold", {"column": "ifd_ppl", "min": 0.2, "max": 0.8}),
    ("threshold", {"column": "ifd_ppl", "min": 0.2, "strict": True, "higher_is_better": False}),
    ("superfiltering", {"upper": 0.9, "lower": 0.1}), ("targeted", {"column": "rds_score"}),
    ("cluster_balanced", {}), ("cluster_balanced", {"quota": "equal", "score": "ifd_loss"}),
    ("cluster_balanced", {"quota": "sqrt", "score": "rifd", "within": "softmax", "temperature": 0.3}),
    ("mixture", {"shares": {"alpaca": 0.7, "gsm8k": 0.3}}),
    ("mixture", {"shares": {"alpaca": 1, "nq": 2}, "redistribute": False, "score": "ifd_loss"}),
    ("cluster_balanced", {"score": "ifd_loss", "upper": 0.5}),
    ("mixture", {"shares": {"alpaca": 0.7, "gsm8k": 0.3}, "score": "ifd_loss", "upper": 0.6}),
    ("mixture", {"shares": {"alpaca": 0.7, "gsm8k": 0.3}, "score": "rifd", "higher_is_better": False}),
    ("cluster_balanced", {"score": "rifd", "within": "softmax", "higher_is_better": False, "upper": 0.8}),
]


def _pool(rng, n):
    """Features rows that take every branch: NaN and null scores, tied scores, rows without a
    cluster, a source no mixture names, ids of every shape."""
    rows = []
    for i in range(n):
        def score():
            u = rng.random()
            return None if u < 0.08 else math.nan if u < 0.15 else round(float(rng.random()), 1)
        rows.append({"id": f"{i:04d}" + ("é" * (i % 3)) + ("x" * int(rng.integers(0, 40)) if i % 7 == 0 else ""),
                     "source": ["alpaca", "gsm8k", "other"][int(rng.integers(0, 3))],
                     "cluster_id": None if rng.random() < 0.1 else int(rng.integers(0, 6)),
                     "approx_tokens": int(rng.integers(1, 200)),
                     "ifd_loss": score(), "ifd_ppl": score(), "rifd": score(), "rds_score": score()})
    return rows


def _budget(rng):
    u = rng.random()
    if u < 0.4:
        return Budget(rows=int(rng.integers(0, 120)))
    if u < 0.9:
        return Budget(fraction=round(float(rng.random()), 2))
    return Budget()


@pytest.mark.parametrize("name,params", KEYED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KEYED)])
def test_keyed_decisions_equal_the_policy_over_one_list(name, params):
    rng = np.random.default_rng(len(name) * 31 + len(params))
    tried = 0
    for case in range(25):
        rows = _pool(rng, int(rng.integers(0, 150)) if case else 0)
        policy, budget, seed = make(name, dict(params)), _budget(rng), int(rng.integers(0, 5))
        if policy.needs_budget and budget.unlimited:
            with pytest.raises(PolicyError, match="needs a budget"):
                K.run_keyed(policy, features_table(rows), budget, seed)
            continue
        assert K.applies(policy, budget)
        table = features_table(rows)
        want = make(name, dict(params)).run(table, budget, seed)
        for per_range in (1, 3, 50_000):  # many small ranges, a few, one
            got = K.run_keyed(policy, table, budget, seed, rows_per_range=per_range)
            assert got.selected == want.selected and got.dropped == want.dropped, (case, per_range)
        tried += 1
    assert tried >= 15


@pytest.mark.parametrize("name,params", KEYED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(KEYED)])
def test_row_keys_by_column_are_row_key_row_by_row(name, params):
    """A policy that answers its keys by column (random) gives ``row_key``'s values exactly,
    on a table that lacks some feature columns as the batch path's tables do."""
    rows = _pool(np.random.default_rng(3), 120)
    table = features_table(rows)
    table = table.select([c for c in table.column_names if c not in ("cluster_id", "approx_tokens")])
    policy = make(name, dict(params))
    want = [policy.row_key({**r, "cluster_id": None, "approx_tokens": None}, 4) for r in table.to_pylist()]
    got = policy.row_keys(complete(table), 4)
    assert [g if isinstance(g, str) else (g[0], repr(g[1])) for g in got] == [
        w if isinstance(w, str) else (w[0], repr(w[1])) for w in want]


def test_what_is_not_a_sort_is_not_keyed():
    assert not K.applies(make("random"), Budget(tokens=500))  # a row that does not fit is skipped
    assert not K.applies(make("targeted", {"max_per_cluster": 2}), Budget(rows=5))
    assert not K.applies(make("facility_location"), Budget(rows=5))  # compares rows with each other
    assert not K.applies(make("chain", {"steps": [{"policy": "random", "budget": {"rows": 3}}]}), Budget(rows=3))
    assert K.applies(make("cluster_balanced"), Budget(fraction=0.5))

    from curate.select.scored import TopK

    class Reordered(TopK):  # a plugin's own choose: the built-in's keys no longer say what it does
        name = "reordered"

        def choose(self, pool):
            return pool.take_in_order(range(len(pool)))

    class Declared(Reordered):
        def keyed(self, budget):
            return True

    assert not K.applies(Reordered(column="ifd_loss"), Budget(rows=3))
    assert K.applies(Declared(column="ifd_loss"), Budget(rows=3))


def test_keyed_errors_are_the_policys():
    rows = [{"id": str(i), "source": "a", "approx_tokens": 3} for i in range(4)]  # no score at all
    with pytest.raises(PolicyError, match="needs the column"):
        K.run_keyed(make("top_k", {"column": "ifd_loss"}), features_table(rows), Budget(rows=2), 0)
    with pytest.raises(PolicyError, match="needs the column"):
        K.run_keyed(make("top_k", {"column": "nope"}), features_table(rows), Budget(rows=2), 0)
    assert K.run_keyed(make("top_k", {"column": "ifd_loss"}), features_table([]), Budget(rows=2), 0).selected == []
    with pytest.raises(PolicyError, match="not numeric"):
        make("top_k", {"column": "source"}).row_key({"id": "a", "source": "x"}, 0)


def test_ranges_are_about_their_size_and_keep_a_groups_order():
    ids = [f"r{i}" for i in range(20_000)]
    sample = [(i % 2, (float(i % 997), rid)) for i, rid in enumerate(ids) if K.sampled(rid, 1_000)]
    assert 200 < len(sample) < 450  # about 16 in 1,000
    cuts = K.cut_points(sample, {0: 10_000, 1: 10_000}, 1_000)
    assert len(cuts[0]) == len(cuts[1]) == 9
    sizes = np.bincount([K.range_of(i % 2, (float(i % 997), rid), cuts) for i, rid in enumerate(ids) if i % 2 == 0])
    assert len(sizes) == 10 and sizes.min() > 400 and sizes.max() < 2_000
    a, b = (3.0, "r1"), (3.0, "r2")  # a key sorting earlier never lands in a later range
    assert K.range_of(0, a, cuts) <= K.range_of(0, b, cuts)
    assert K.cut_points(sample, {0: 900, 1: 900}, 1_000) == {}  # one range a group


def _grouped_job(tmp_path, name, select):
    """Rows from the bundled samples plus rows in four given groups (some rows' group a string),
    no model stages: selection over the whole pool, keyed."""
    import json

    from conftest import EXAMPLES, without_models, write_job

    grouped = tmp_path / "grouped.jsonl"
    rng = np.random.default_rng(0)
    words = [f"w{n}" for n in range(500)]
    grouped.write_text("".join(json.dumps({"instruction": " ".join(rng.choice(words, 12)),
                                           "output": " ".join(rng.choice(words, int(rng.integers(1, 30)))),
                                           "group": i % 4 if i % 5 else str(i % 4)}) + "\n" for i in range(40)))
    cfg = without_models({"output": str(tmp_path / name), "seed": 3,
                          "inputs": [{"source": "alpaca", "path": f"{EXAMPLES}/alpaca_cherry_sample.json"},
                                     {"source": "gsm8k", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"},
                                     {"source": "grouped", "path": str(grouped)}],
                          "cluster": {"column": "group"}, "select": select})
    return write_job(tmp_path, cfg, f"{name}.yaml")


def _job_and_curate_select(tmp_path, monkeypatch, caplog, select, argv):
    """Run the job (ranges of 2 rows) and ``curate select`` on it; check that both decide and report
    the same; return the job's {id: (rank, reason)}, its manifest and its log."""
    import pyarrow.parquet as pq

    from conftest import load_manifest, read_table, run_cli
    from curate.select import scope

    monkeypatch.setattr(scope, "RANK_BUCKET_ROWS", 2)
    with caplog.at_level("INFO", logger="curate"):
        assert run_cli("run", _grouped_job(tmp_path, "job", select)) == 0
    job = {r["id"]: (r["rank"], r["drop_reason"]) for r in read_table(tmp_path / "job", "annotated").to_pylist()}
    assert run_cli("select", tmp_path / "job", *argv, "--seed", "3", "--out", tmp_path / "again") == 0
    again = {r["id"]: (r["rank"], r["drop_reason"]) for r in pq.read_table(tmp_path / "again" / "decisions.parquet")
             .to_pylist()}
    assert again == job
    man = load_manifest(tmp_path / "job")
    rep = json.loads((tmp_path / "again" / "selection.json").read_text())
    assert {k: v for k, v in rep.items() if k not in ("run", "output")} == man["select"]
    assert man["accounting"]["holds"]
    return job, man, caplog.text


@pytest.mark.parametrize("select,argv", [
    ({"policy": "cluster_balanced", "params": {"quota": "equal"}, "budget": {"fraction": 0.4}},
     ["--policy", "cluster_balanced", "--param", "quota=equal", "--fraction", "0.4"]),
    ({"policy": "mixture", "params": {"shares": {"grouped": 2, "gsm8k": 1}}, "budget": {"rows": 30}},
     ["--policy", "mixture", "--param", "shares={grouped: 2, gsm8k: 1}", "--rows", "30"]),
    ({"policy": "top_k", "params": {"column": "approx_tokens"}, "budget": {"rows": 25}},
     ["--policy", "top_k", "--param", "column=approx_tokens", "--rows", "25"]),
], ids=["cluster_balanced", "mixture", "top_k"])
def test_the_jobs_keyed_selection_equals_curate_select(tmp_path, monkeypatch, caplog, select, argv):
    """The Beam step (ranges of 2 rows: many groups' ranges, cut points from a sample of every row,
    the global order numbered range by range) decides and reports what ``curate select`` decides
    over one list."""
    job, man, said = _job_and_curate_select(tmp_path, monkeypatch, caplog, select, argv)
    assert f"select: {select['policy']} decided range by range" in said
    ranks = sorted(r for r, _ in job.values() if r is not None)
    assert ranks == list(range(1, len(ranks) + 1)) and len(ranks) >= 10
    assert any(why and why.startswith(select["policy"] + ":") for _, why in job.values())
    assert "shortlist" not in man["select"]


def test_the_job_says_which_global_policies_gather_the_pool(caplog):
    from conftest import EXAMPLES
    from curate.config import validate
    from pipelines.select import Select

    def built(select):
        cfg = validate({"output": "out", "inputs": [{"source": "a", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}],
                        "select": select})
        with caplog.at_level("INFO", logger="curate"):
            caplog.clear()
            return Select(cfg), caplog.text

    step, said = built({"policy": "random", "budget": {"tokens": 500}})  # a token budget: not a sort
    assert not step.keyed and "random sees at most 200000 candidates on one worker: its shortlist (random)" in said
    step, said = built({"policy": "random", "budget": {"rows": 5}})
    assert step.keyed and "random decided range by range" in said
    step, said = built({"policy": "facility_location", "budget": {"rows": 5}})  # compares rows with each other
    assert not step.keyed and "facility_location sees at most 200000 candidates" in said
    step, said = built({"policy": "facility_location", "budget": {"rows": 5}, "max_candidates": 0})
    assert step.shortlist is None and "facility_location gathers every candidate's" in said and "is 0" in said
    step, said = built({"policy": "chain", "params": {"steps": [{"policy": "deita", "params": {"column": "ifd_loss"}},
                                                                {"policy": "random"}]}, "budget": {"rows": 5}})
    assert step.shortlist is None and "chain gathers every candidate's features" in said


@pytest.mark.parametrize("select,argv", [
    ({"policy": "top_k", "params": {"column": "approx_tokens", "higher_is_better": False}, "budget": {"tokens": 150},
      "max_candidates": 20},
     ["--policy", "top_k", "--param", "column=approx_tokens", "--param", "higher_is_better=false", "--tokens", "150",
      "--max-candidates", "20"]),
    ({"policy": "chain", "params": {"steps": [
        {"policy": "threshold", "params": {"column": "approx_tokens", "min": 8, "higher_is_better": False}},
        {"policy": "random", "budget": {"tokens": 200}}]}, "max_candidates": 15},
     ["--policy", "chain", "--param", "steps=[{policy: threshold, params: {column: approx_tokens, min: 8, "
                                      "higher_is_better: false}}, {policy: random, budget: {tokens: 200}}]",
      "--max-candidates", "15"]),
], ids=["top_k-tokens", "chain"])
def test_the_jobs_shortlist_equals_curate_selects(tmp_path, monkeypatch, caplog, select, argv):
    """A policy that is not a sort (a token budget, a chain) sees only its shortlist's rows: the
    shortlist is decided range by range (ranges of 2 rows), only its rows are gathered, and the
    job decides and reports what ``curate select --max-candidates`` decides over one list."""
    job, man, said = _job_and_curate_select(tmp_path, monkeypatch, caplog, select, argv)
    cap, name = select["max_candidates"], select["policy"]
    assert f"select: {name} sees at most {cap} candidates on one worker" in said
    reasons = [why for _, why in job.values()]
    assert reasons.count(f"{name}:not_shortlisted") > 20  # the pool is cut ...
    ranks = sorted(r for r, _ in job.values() if r is not None)
    assert ranks == list(range(1, len(ranks) + 1)) and 3 <= len(ranks) < cap  # ... and the policy chose from it
    assert man["select"]["shortlist"]["max_candidates"] == cap


def test_a_shortlisted_policys_missing_column_is_named_by_the_policy(tmp_path, capsys):
    """The shortlist (the chain's threshold step) is decided first, over a column that is null on
    every row (no input row has the cluster field), yet the error names the policy the user chose,
    as ``curate select`` does."""
    from conftest import EXAMPLES, run_cli, without_models, write_job

    cfg = without_models({"output": str(tmp_path / "job"), "cluster": {"column": "no_such_field"},
                          "inputs": [{"source": "gsm8k", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}],
                          "select": {"policy": "chain", "params": {"steps": [
                              {"policy": "threshold", "params": {"column": "cluster_id", "min": 0}},
                              {"policy": "random", "budget": {"tokens": 200}}]}}})
    assert run_cli("run", write_job(tmp_path, cfg, "job.yaml")) != 0
    assert "policy chain: needs the column(s) cluster_id" in capsys.readouterr().err
