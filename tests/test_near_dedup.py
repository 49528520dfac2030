"""Near-duplicate removal: MinHash, LSH, union-find and keep rule as pure functions, then the
real Beam stage on a labelled set built from real rows."""
import random

import numpy as np
import pandas as pd
import pytest

from benchmarks.dedup_quality import build, evaluate, jaccard, shingle_set, write_jsonl
from curate.dedup import minhash as mh
from curate.dedup.near import (UnionFind, band_keys, bucket_edges, candidate_probability,
                               optimal_bands_rows, resolve_cluster, size_histogram)
from tests.conftest import without_models, load_manifest, run_cli, shared, write_job


@pytest.fixture(scope="module")
def real_texts():
    import json

    rows = json.load(open(shared("alpaca_cherry_5pct.json")))[:300] + json.load(open(shared("gsm8k_train.json")))[:300]
    return [r["instruction"] + "\n" + r["output"] for r in rows]


def test_signatures_do_not_depend_on_batch_size_or_neighbours(real_texts):
    whole = mh.signatures(real_texts, seed=3)
    for size in (1, 7, 128, 599):
        parts = np.concatenate([mh.signatures(real_texts[i:i + size], seed=3)
                                for i in range(0, len(real_texts), size)])
        assert np.array_equal(parts, whole)
    assert whole.dtype == np.uint64 and whole.shape == (600, 128)
    assert not np.array_equal(whole, mh.signatures(real_texts, seed=4))  # the seed matters


def test_signature_is_a_fixed_function_of_the_text():
    # pinned values: a change to hashing or permutations shows up here (machine-independent integers)
    sig = mh.signatures(["The quick brown fox jumps over the lazy dog"], num_perm=4, seed=0)[0]
    again = mh.signatures(["the  QUICK brown fox\njumps over the lazy dog"], num_perm=4, seed=0)[0]
    assert np.array_equal(sig, again)  # normalization: case and white space
    words = mh.normalize_for_shingles("Ｆｕｌｌ width\u2028and\x1eseparators").split()
    hashes, offsets = mh.word_hashes([" ".join(words)])
    assert len(hashes) == 4 and list(offsets) == [0, 4]


def test_estimated_jaccard_tracks_the_true_jaccard(real_texts):
    rng = random.Random(0)
    errors = []
    for text in real_texts[:200]:
        words = text.split()
        if len(words) < 30:
            continue
        edited = list(words)
        for i in rng.sample(range(len(words)), max(1, len(words) // 12)):
            edited[i] = "zzz"
        other = " ".join(edited)
        true = jaccard(shingle_set(text), shingle_set(other))
        est = mh.estimate_jaccard(*mh.signatures([text, other]))
        errors.append(est - true)
    errors = np.array(errors)
    assert len(errors) > 100
    assert abs(errors.mean()) < 0.01  # unbiased
    assert np.abs(errors).max() < 0.2 and errors.std() < 0.05  # ~sqrt(J(1-J)/128)


def test_short_and_empty_texts():
    sig = mh.signatures(["one two", "one two", "one three", ""], n=5)
    assert np.array_equal(sig[0], sig[1])  # fewer than n words: one shingle of all of them
    assert mh.estimate_jaccard(sig[0], sig[2]) < 0.1
    assert np.all(sig[3] == mh.EMPTY) and mh.estimate_jaccard(sig[3], sig[3]) == 0.0
    keys = band_keys(sig, 4, 8)
    assert np.all(keys[3] == mh.EMPTY)
    edges, _ = bucket_edges(keys.ravel(), [i for i in "abcd" for _ in range(4)])
    assert edges == {("a", "b")}


def test_char_shingles():
    a, b, c = mh.signatures(["abcdefghij", "abcdefghik", "zyxwvutsrq"], n=3, unit="char")
    assert 0.5 < mh.estimate_jaccard(a, b) < 1.0 and mh.estimate_jaccard(a, c) < 0.1


@pytest.mark.parametrize("threshold, expected", [(0.5, (25, 5)), (0.7, (14, 9)), (0.8, (9, 13)), (0.9, (5, 25))])
def test_bands_rows_choice(threshold, expected):
    assert optimal_bands_rows(threshold, 128) == expected
    bands, rows = expected
    # hand check of the S-curve at 0.8 -> (9, 13): 1 - (1 - 0.8**13)**9
    if expected == (9, 13):
        assert candidate_probability(0.8, 9, 13) == pytest.approx(1 - (1 - 0.8 ** 13) ** 9)
        assert candidate_probability(0.9, 9, 13) > 0.9 > 0.02 > candidate_probability(0.6, 9, 13)


def test_bands_rows_agree_with_datasketch():
    from datasketch.lsh import _optimal_param

    for t in (0.6, 0.75, 0.85):
        for perm in (64, 128, 256):
            assert optimal_bands_rows(t, perm) == _optimal_param(t, perm, 0.5, 0.5)


def test_bucket_edges_are_a_star_to_the_smallest_id():
    keys = np.array([5, 5, 5, 5, 9, 7, 7], dtype=np.uint64)
    ids = ["d", "b", "c", "a", "e", "f", "f"]  # f twice in one bucket (two bands) is not an edge
    edges, big = bucket_edges(keys, ids, max_bucket=3)
    assert edges == {("a", "b"), ("a", "c"), ("a", "d")}
    assert big == [4]


@pytest.mark.parametrize("shards", [1, 16, 512, 5000])
def test_sharded_bucket_entries_give_the_edges_of_the_whole(shards):
    """A shard holds whole buckets: the edges found shard by shard are the edges of all entries
    together, whatever the shard count (more shards than entries included)."""
    from pipelines.near_dedup import shard_entries

    rng = np.random.default_rng(shards)
    keys = rng.integers(0, 2**63, size=(600, 9), dtype=np.uint64)
    keys[1::7] = keys[0::7][: len(keys[1::7])]  # pairs sharing every bucket
    keys[2::11, 3] = keys[0, 3]  # one bucket shared by many
    ids = [f"d{i:04d}" for i in rng.permutation(600)]
    parts = list(shard_entries(keys, ids, shards))
    assert sorted(s for s, _ in parts) == sorted({s for s, _ in parts})  # one element per shard reached
    assert sum(len(k) for _, (k, _) in parts) == keys.size
    for s, (k, owners) in parts:
        assert (k % np.uint64(shards) == s).all() and len(k) == len(owners)
    found = set().union(*(bucket_edges(k, owners)[0] for _, (k, owners) in parts))
    whole = bucket_edges(keys.ravel(), [i for i in ids for _ in range(9)])[0]
    assert found == whole and len(whole) > 80


def test_union_find_is_order_independent():
    rng = random.Random(1)
    edges = [(f"n{rng.randrange(60):02d}", f"n{rng.randrange(60):02d}") for _ in range(45)]
    reference = None
    for trial in range(20):
        rng.shuffle(edges)
        cut = rng.randrange(len(edges))
        left, right = UnionFind(), UnionFind()
        for a, b in edges[:cut]:
            left.union(a, b)
        for a, b in edges[cut:]:
            right.union(b, a)
        (right if trial % 2 else left).merge(left if trial % 2 else right)
        result = (right if trial % 2 else left).clusters()
        reference = reference or result
        assert result == reference
    # every cluster id is the smallest member
    for x, root in reference.items():
        assert root == min(y for y, r in reference.items() if r == root)


def test_union_find_combine_fn_merges_split_accumulators():
    from pipelines.near_dedup import UnionFindFn

    fn = UnionFindFn()
    edges = [("c", "d"), ("a", "b"), ("b", "c"), ("x", "y")]
    accs = []
    for part in (edges[:1], edges[1:3], edges[3:]):
        acc = fn.create_accumulator()
        for e in part:
            acc = fn.add_input(acc, e)
        accs.append(acc)
    out = fn.extract_output(fn.merge_accumulators(reversed(accs)))
    assert out == {"a": "a", "b": "a", "c": "a", "d": "a", "x": "x", "y": "x"}
    assert size_histogram(out) == {2: 1, 4: 1}


def _graphs():
    """Edge lists of every shape: stars (what LSH buckets give), chains and cycles far wider than
    the rounds reach, a ladder, self-loops, repeated and reversed edges, ids in any order."""
    rng = random.Random(3)
    yield []
    yield [("a", "a")]
    yield [(f"c{i:03d}", f"c{i + 1:03d}") for i in range(40)]  # a chain: the union-find joins most of it
    yield [(f"r{(7 * i) % 50:02d}", f"r{(7 * i + 7) % 50:02d}") for i in range(50)]  # a cycle, ids shuffled
    yield [(f"s{i}", "s0") for i in range(1, 12)] + [("t0", f"t{i}") for i in range(1, 5)] + [("s3", "t2")]
    yield [(f"l{i}a", f"l{i}b") for i in range(20)] + [(f"l{i}a", f"l{i + 1}a") for i in range(19)]
    for n in (5, 30, 200):
        edges = [(f"n{rng.randrange(n):03d}", f"n{rng.randrange(n):03d}") for _ in range(n)]
        yield edges + [(b, a) for a, b in edges[: n // 3]]


@pytest.mark.parametrize("rounds", [0, 1, 2, 5])
def test_components_found_in_rounds_are_the_union_finds(rounds):
    from curate.dedup.near import adjacency, components_in_rounds, contracted_edges, first_labels, spread_labels

    for edges in _graphs():
        whole = UnionFind()
        for a, b in edges:
            whole.union(a, b)
        assert components_in_rounds(edges, rounds) == whole.clusters()
    chain = [(f"c{i:03d}", f"c{i + 1:03d}") for i in range(40)]
    adjacent = adjacency(chain)
    labels = first_labels(adjacent)
    for _ in range(rounds):
        labels = spread_labels(labels, adjacent)
    assert len(contracted_edges(labels, chain)) == 40 - (rounds + 1)  # each round settles one more link


def test_components_in_beam_equal_the_one_process_result():
    """The Beam step (a join and a min per id each round, a union-find of the labels left linked)
    gives ``components_in_rounds``'s map, with 0 and 2 rounds, on every graph shape at once."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from curate.dedup.near import components_in_rounds
    from pipelines.near_dedup import Components

    edges = [(a, b, 0.9) for n, g in enumerate(_graphs()) for a, b in ((f"{n}:{a}", f"{n}:{b}") for a, b in g)]
    want = sorted(components_in_rounds(edges).items())
    assert len(want) > 300 and len(set(dict(want).values())) > 10
    for rounds in (0, 2):
        with beam.Pipeline(runner="FnApiRunner") as p:
            got = p | f"Edges{rounds}" >> beam.Create(edges) | Components(rounds)
            assert_that(got, equal_to(want))


def test_candidate_bloom_filter_misses_no_added_id_and_few_others():
    """Built by numpy in shards, read one id at a time in Python: every added id is found (the two
    must agree on every 64-bit wrap), about 1% of others pass, and a shard never built holds none."""
    from curate.dedup import bloom

    added = [f"id-{i}" for i in range(6000)] + ["", "ünïcode ✓", "x" * 5000]
    parts: dict[int, list[str]] = {}
    for rid in added + added[:500]:  # an id on several edges comes more than once
        parts.setdefault(bloom.shard_of(rid), []).append(rid)
    filters = {shard: bloom.shard_filter(ids) for shard, ids in parts.items()}
    assert len(filters) > bloom.SHARDS * 0.9
    assert all(bloom.might_contain(filters, rid) for rid in added)
    others = [f"other-{i}" for i in range(20000)]
    passed = sum(bloom.might_contain(filters, rid) for rid in others)
    assert 0 < passed < 0.02 * len(others)  # a filter, not a set: some pass, few
    assert sum(len(packed) for _, packed in filters.values()) < 2 * len(added)  # ~10 bits an id
    assert not any(bloom.might_contain({}, rid) for rid in added[:100])
    assert bloom.shard_filter(["a", "a"]) == bloom.shard_filter(["a"])


def test_keep_rule_longest_response_then_smallest_id():
    recs = [{"id": "b", "response": "xxxx"}, {"id": "c", "response": "xxxxx"}, {"id": "a", "response": "xxxxx"}]
    out = resolve_cluster([dict(r) for r in recs], "a")
    assert {r["id"]: r["near_dup_of"] for r in out} == {"a": None, "b": "a", "c": "a"}
    assert all(r["near_dup_cluster"] == "a" for r in out)
    assert [r.get("drop_reason") for r in out if r["id"] != "a"] == ["near_duplicate"] * 2


def test_labelled_real_rows_recall_and_precision(job_dir):
    import json

    base = json.load(open(shared("alpaca_cherry_5pct.json"))) + json.load(open(shared("gsm8k_train.json")))
    rows, labels = build(base, n_originals=40, n_unrelated=100, seed=7)
    write_jsonl(rows, "labelled.jsonl")
    job = write_job(job_dir, without_models({"output": "out", "inputs": [{"source": "lab", "path": "labelled.jsonl", "id_field": "id"}],
                              "dedup": {"exact": {"enabled": False}}}))
    assert run_cli("run", job) == 0
    ann = pd.read_parquet("out/annotated").to_dict("records")
    result = evaluate(rows, labels, ann)
    assert result["recall_ge_0.9"] >= 0.95
    assert result["removed"] > 50 and result["removed_below_0.7_share"] <= 0.02
    assert result["unrelated_removed"] == 0
    man = load_manifest("out")
    assert man["accounting"]["holds"]
    assert man["near_dedup"]["removed"] == result["removed"] == man["counts"]["dropped"]["near_duplicate"]
    assert (man["near_dedup"]["bands"], man["near_dedup"]["rows"]) == (9, 13)
    assert sum(k * v for k, v in man["near_dedup"]["cluster_sizes"].items() for k in [int(k)]) == \
        result["removed"] + man["near_dedup"]["clusters"]
    assert man["near_dedup"]["examples"] and all(e["estimated_jaccard"] >= 0.8 for e in man["near_dedup"]["examples"])
    # scope per source: the same rows split over two sources never cluster across them
    half = len(rows) // 2
    write_jsonl(rows[:half], "a.jsonl")
    write_jsonl(rows[half:], "b.jsonl")
    job = write_job(job_dir, without_models({"output": "scoped", "dedup": {"exact": {"enabled": False}, "near": {"scope": "source"}},
                              "inputs": [{"source": "a", "path": "a.jsonl", "id_field": "id"},
                                         {"source": "b", "path": "b.jsonl", "id_field": "id"}]}), "scoped.yaml")
    assert run_cli("run", job) == 0
    scoped = pd.read_parquet("scoped/annotated")
    by_cluster = scoped.dropna(subset=["near_dup_cluster"]).groupby("near_dup_cluster").source.nunique()
    assert len(by_cluster) > 0 and (by_cluster == 1).all()


def test_near_dedup_is_runner_and_order_independent(job_dir, monkeypatch):
    """The same marks whatever the order, batch size and runner, and whatever the candidates'
    Bloom filter lets through: at 1 bit an id in one shard most rows pass it and are verified for nothing."""
    import json

    from curate.dedup import bloom

    base = json.load(open(shared("gsm8k_train.json")))
    rows, _ = build(base, n_originals=15, n_unrelated=30, seed=2)
    write_jsonl(rows, "a.jsonl")
    write_jsonl(list(reversed(rows)), "b.jsonl")
    for name, path, flags in (("a", "a.jsonl", []), ("b", "b.jsonl", ["--direct_running_mode=multi_processing",
                                                                       "--direct_num_workers=2"]),
                              ("leaky", "b.jsonl", [])):
        if name == "leaky":  # one shard of 1 bit an id, 7 bits set an id: nearly every row passes
            for constant in ("SHARDS", "BITS_PER_ID", "MIN_BITS"):
                monkeypatch.setattr(bloom, constant, 1)
        job = write_job(job_dir, without_models({"output": name, "batch_size": 16 if name == "a" else 64,
                                  "path": "row",  # the row path's Bloom filter (the batch path's: test_batched)
                                  "inputs": [{"source": "s", "path": path, "id_field": "id"}]}), f"{name}.yaml")
        assert run_cli("run", job, *flags) == 0
    a = pd.read_parquet("a/annotated").set_index("id").sort_index()
    for other in ("b", "leaky"):
        b = pd.read_parquet(f"{other}/annotated").set_index("id").sort_index()
        assert (a.selected == b.selected).all() and a.near_dup_of.fillna("").equals(b.near_dup_of.fillna(""))
        assert a.near_dup_cluster.fillna("").equals(b.near_dup_cluster.fillna(""))
    assert (~a.selected).sum() > 10
    clustered = a.near_dup_cluster.notna().sum()
    recomputed = {n: load_manifest(n)["stages"]["near_dedup"]["signatures_recomputed"] for n in ("a", "leaky")}
    assert clustered <= recomputed["a"] < recomputed["leaky"]  # every candidate, then false positives too
