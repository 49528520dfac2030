"""Embeddings (real all-MiniLM-L6-v2 on CPU), FAISS k-means, SemDeDup: pure functions and the
real Beam job."""
import json
import random
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from curate import cluster as clustering
from curate.dedup import semantic
from curate.device import DeviceUnavailable, faiss_use_gpu, torch_device, torch_dtype_name
from tests.conftest import EXAMPLES, load_manifest, run_cli, shared, without_scores, write_job

FAST = {"dedup": {"near": {"enabled": False}}}


@pytest.fixture(scope="module")
def model():
    from curate.embed import load_embedder

    return load_embedder(None, "cpu", "float32", 256)


@pytest.fixture(scope="module")
def texts():
    rows = json.load(open(shared("alpaca_cherry_5pct.json")))[:40] + json.load(open(shared("gsm8k_train.json")))[:24]
    return [r["instruction"] + "\n" + r["output"] for r in rows]


def test_embeddings_do_not_depend_on_batch_size_and_match_direct_encode(model, texts):
    from sentence_transformers import SentenceTransformer

    from curate.embed import encode
    from curate.models import resolve_embedder

    whole = encode(model, texts)
    for size in (1, 7, 32):
        parts = np.concatenate([encode(model, texts[i:i + size]) for i in range(0, len(texts), size)])
        assert np.abs(parts - whole).max() <= 1e-5
    direct = SentenceTransformer(resolve_embedder(None), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(direct - whole).max() <= 1e-5
    assert whole.dtype == np.float32 and whole.shape == (64, 384)
    assert np.allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-6)
    from curate.onednn import use_onednn

    if use_onednn(model):  # the stage's CPU kernel gives the same vectors
        try:
            assert np.abs(encode(model, texts) - whole).max() <= 1e-5
        finally:
            use_onednn(model, on=False)


def test_device_and_index_choice():
    assert torch_device("auto", cuda_available=False) == "cpu"
    assert torch_device("auto", cuda_available=True) == "cuda"
    assert torch_device("cpu", cuda_available=True) == "cpu"
    with pytest.raises(DeviceUnavailable, match="no CUDA device"):
        torch_device("cuda", cuda_available=False)
    assert torch_dtype_name("cuda") == "float16" and torch_dtype_name("cpu") == "float32"
    assert torch_dtype_name("cpu", "bfloat16") == "bfloat16"
    assert faiss_use_gpu("auto", num_gpus=0) is False and faiss_use_gpu("auto", num_gpus=2) is True
    assert faiss_use_gpu("cpu", num_gpus=2) is False
    with pytest.raises(DeviceUnavailable, match="FAISS sees no GPU"):
        faiss_use_gpu("cuda", num_gpus=0)
    assert torch_device("auto") in ("cpu", "cuda")  # asks torch for real


def test_unavailable_device_or_model_is_a_one_line_error_and_writes_nothing(job_dir, capsys):
    import torch

    inputs = [{"source": "g", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}]
    if not torch.cuda.is_available():
        assert run_cli("run", write_job(job_dir, {"output": "o", "inputs": inputs, "embed": {"device": "cuda"}})) == 2
        assert capsys.readouterr().err.strip().endswith("torch sees no CUDA device")
    missing = {"output": "o", "inputs": inputs, "embed": {"model": str(job_dir / "no-such-model")}}
    assert run_cli("run", write_job(job_dir, missing, "m.yaml")) == 2
    assert "cannot load embedding model" in capsys.readouterr().err
    assert not [p for p in __import__("os").listdir(job_dir) if p.startswith("o")]


def test_default_k_and_seeded_sample():
    assert clustering.default_k(400) == 20 and clustering.default_k(3) == 2 and clustering.default_k(1) == 1
    assert clustering.default_k(10_000_000) == 1024
    assert clustering.sample_rank(1, "a") == clustering.sample_rank(1, "a") != clustering.sample_rank(2, "a")
    from pipelines.embed_cluster import SmallestRanks

    items = [(clustering.sample_rank(0, f"r{i}"), f"r{i}", i) for i in range(500)]
    fn = SmallestRanks(50)
    outs = []
    for order in range(3):
        random.Random(order).shuffle(items)
        accs = []
        for part in (items[:100], items[100:350], items[350:]):
            acc = fn.create_accumulator()
            for it in part:
                acc = fn.add_input(acc, it)
            accs.append(acc)
        outs.append(fn.extract_output(fn.merge_accumulators(accs)))
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 50


@pytest.mark.parametrize("n_rows,size", [(500, 50), (20_000, 100), (3_000, 1), (300, 50), (50, 50)])
def test_the_sample_cutoff_lets_the_smallest_ranks_through_and_few_others(n_rows, size):
    ranks = sorted(clustering.sample_rank(7, f"row-{i}") for i in range(n_rows))
    cutoff = clustering.sample_cutoff(n_rows, size)
    below = sum(r < cutoff for r in ranks)
    assert below >= min(size, n_rows)  # the sample is exactly the smallest ranks of the pool
    keep = size + 10 * int(size ** 0.5) + 64
    if keep >= n_rows:
        assert cutoff == 1 << 64 and below == n_rows
    else:
        assert below <= keep + 10 * keep ** 0.5  # about the sample, not the pool


def test_a_sample_cut_short_is_an_error_not_a_smaller_sample():
    from curate.settings import Cluster
    from pipelines.embed_cluster import _train

    with pytest.raises(RuntimeError, match="only 3 of 1000 rows ranked below the sample cutoff"):
        _train([(1, "a", np.ones(4, np.float32))] * 3, 1000, Cluster(max_sample=10), False)


def test_kmeans_recovers_blobs_and_is_seeded():
    rng = np.random.default_rng(0)
    centers = np.linalg.qr(rng.normal(size=(384, 3)))[0].T  # 3 orthonormal directions
    x = np.concatenate([c + 0.05 * rng.normal(size=(100, 384)) for c in centers]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cents = clustering.train(x, 3, seed=1)
    ids, sims = clustering.assign(x, cents)
    labels = np.repeat([0, 1, 2], 100)
    for blob in range(3):
        assert len(set(ids[labels == blob])) == 1
    assert len(set(ids)) == 3 and sims.min() > 0.5
    assert np.array_equal(cents, clustering.train(x, 3, seed=1))


def test_semdedup_keeps_one_per_group_by_each_rule():
    x = np.array([[1, 0, 0], [0.999, 0.0447, 0], [0.9995, 0, 0.0316], [0, 1, 0]], dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    recs = lambda: [{"id": i, "cluster_sim": s, "response": r} for i, s, r in
                    (("a", 0.9, "x"), ("b", 0.8, "xxx"), ("c", 0.95, "xx"), ("d", 0.5, "x"))]
    cases = {"least_similar_to_centroid": "b", "most_similar_to_centroid": "c", "longest_response": "b"}
    for rule, keeper in cases.items():
        out = {r["id"]: r for r in semantic.resolve(recs(), x, 0.01, rule)}
        kept = [i for i, r in out.items() if r["semantic_dup_of"] is None]
        assert kept == sorted([keeper, "d"]), rule
        assert all(r["semantic_dup_of"] == keeper for i, r in out.items() if i not in (keeper, "d"))
    # tiles give the same pairs as one dense block; the sweep grows with eps
    rng = np.random.default_rng(3)
    y = rng.normal(size=(300, 8)).astype(np.float32)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    dense = semantic.similar_pairs(y, 0.9, block=1000)
    tiled = semantic.similar_pairs(y, 0.9, block=17)
    assert sorted(zip(*dense[:2])) == sorted(zip(*tiled[:2])) and len(dense[0]) > 10
    sweep = semantic.removed_per_eps(y)
    assert list(sweep.values()) == sorted(sweep.values()) and sweep[0.1] > 0
    marked, same_sweep = semantic.dedup_cluster([{"id": f"r{k:03d}", "cluster_sim": 0.5, "response": "x"}
                                                 for k in range(300)], y, 0.05)
    assert same_sweep == sweep and sum(r["semantic_dup_of"] is not None for r in marked) == sweep[0.05]


def _paraphrase(row: dict) -> dict:
    swaps = {"Write": "Compose", "Explain": "Describe", "Describe": "Explain", "Generate": "Produce",
             "Create": "Make", "Give": "Provide", "Provide": "Give", "List": "Enumerate"}
    instruction = re.sub(r"^(\w+)", lambda m: swaps.get(m.group(1), m.group(1)), row["instruction"])
    return {**row, "instruction": instruction, "output": row["output"].replace("It is", "It's").rstrip(".") + "."}


def test_semdedup_on_real_rows_keeps_one_per_planted_group(job_dir):
    base = json.load(open(shared("alpaca_cherry_5pct.json")))
    rng = random.Random(5)
    picked = rng.sample(base, 100)
    rows, groups = [], []
    for i, r in enumerate(picked[:30]):  # planted groups: original, paraphrase, exact copy
        members = [{**r, "id": f"g{i}-orig"}, {**_paraphrase(r), "id": f"g{i}-para"}, {**r, "id": f"g{i}-copy"}]
        rows += members
        groups.append([m["id"] for m in members])
    unrelated = [{**r, "id": f"u{i}"} for i, r in enumerate(picked[30:])]
    rows += unrelated
    rng.shuffle(rows)
    (job_dir / "rows.json").write_text(json.dumps(rows))
    job = write_job(job_dir, without_scores({
        "output": "out", "inputs": [{"source": "s", "path": "rows.json", "id_field": "id"}],
        "dedup": {"exact": {"enabled": False}, "near": {"enabled": False}, "semantic": {"eps": 0.06}},
        "cluster": {"k": 4}}))
    assert run_cli("run", job) == 0
    ann = pd.read_parquet("out/annotated").set_index("id")
    for group in groups:
        members = ann.loc[[f"s:{g}" for g in group]]
        assert members.selected.sum() == 1, members[["selected", "semantic_dup_of", "cluster_id"]]
        keeper = members.index[members.selected][0]
        assert (members[~members.selected].semantic_dup_of == keeper).all()
        assert (members[~members.selected].drop_reason == "semantic_duplicate").all()
    assert ann.loc[[f"s:{u['id']}" for u in unrelated]].selected.all()
    man = load_manifest("out")
    planted = sum(len(g) - 1 for g in groups)  # all but one member of each group
    assert man["semantic_dedup"]["removed"] == planted == man["counts"]["dropped"]["semantic_duplicate"]
    assert man["accounting"]["holds"] and man["cluster"]["k"] == 4
    emb = pq.read_table("out/embeddings")
    assert emb.num_rows == len(rows) and emb.schema.field("embedding").type.list_size == 384
    assert emb.schema.metadata[b"curate.embedding_dim"] == b"384"


DEMO = [{"source": "alpaca_cherry", "path": f"{EXAMPLES}/alpaca_cherry_sample.json"},
        {"source": "gsm8k", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}]


def test_cluster_ids_are_the_same_across_runs_and_runners(job_dir, monkeypatch):
    """The same clusters whatever the batch size and runner; and with a sample of 60 of the 355
    rows, the same whether the sample cutoff lets only about 200 rows travel to the sampling step
    (the default) or every row (patched)."""
    outs = {"a": [], "b": [], "mp": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
            "cut": [], "uncut": []}
    for name, flags in outs.items():
        cfg = {"output": name, "inputs": DEMO, "embed": {"device": "cpu", "batch_size": 16 if name == "b" else 64},
               "cluster": {"device": "cpu", **({"max_sample": 60} if name.endswith("cut") else {})}, **FAST}
        if name == "uncut":
            monkeypatch.setattr(clustering, "sample_cutoff", lambda n, size: 1 << 64)
        assert run_cli("run", write_job(job_dir, without_scores(cfg), f"{name}.yaml"), *flags) == 0
    frames = {n: pd.read_parquet(f"{n}/annotated").set_index("id").sort_index() for n in outs}
    assert frames["cut"].cluster_id.equals(frames["uncut"].cluster_id)
    assert not frames["cut"].cluster_id.equals(frames["a"].cluster_id)  # trained on 60 rows, not 355
    assert load_manifest("cut")["cluster"]["sample"] == 60
    assert frames["a"].cluster_id.notna().sum() == 355
    for other in ("b", "mp"):
        assert frames["a"].cluster_id.equals(frames[other].cluster_id)
        assert np.abs(frames["a"].cluster_sim.fillna(0) - frames[other].cluster_sim.fillna(0)).max() < 1e-5
        assert frames["a"].selected.equals(frames[other].selected)
    man = load_manifest("a")
    assert man["embed"]["device"] == "cpu" and man["cluster"]["faiss_gpu"] is False
    assert man["embed"]["max_seq_length"] == 256 and man["cluster"]["k"] == clustering.default_k(355)
    assert set(man["semantic_dedup"]["sweep_would_remove"]) == {"0.005", "0.01", "0.02", "0.05", "0.1"}


def test_rerun_reuses_embeddings_without_running_the_model(job_dir):
    base = {"inputs": [{"source": "g", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}], "sample": {"mode": "head", "n": 40},
            "dedup": {"near": {"enabled": False}}}
    base = without_scores(base)
    first_cfg = {**base, "output": "first", "embed": {"cache": False}}
    assert run_cli("run", write_job(job_dir, first_cfg, "first.yaml")) == 0
    first = load_manifest("first")
    assert first["stages"]["embed"]["model_rows"] == 40 and "cached" not in first["stages"]["embed"]
    again = {**base, "output": "again", "embed": {"reuse": "first", "cache": False}}
    assert run_cli("run", write_job(job_dir, again, "again.yaml")) == 0
    man = load_manifest("again")
    assert man["stages"]["embed"]["cached"] == 40 and "model_rows" not in man["stages"]["embed"]
    assert man["embed"]["reuse"]["used"] is True
    a = pq.read_table("first/embeddings").to_pandas().set_index("id").sort_index()
    b = pq.read_table("again/embeddings").to_pandas().set_index("id").sort_index()
    assert np.array_equal(np.stack(a.embedding), np.stack(b.embedding)) and a.text_hash.equals(b.text_hash)
    assert pd.read_parquet("first/annotated").set_index("id").sort_index().cluster_id.equals(
        pd.read_parquet("again/annotated").set_index("id").sort_index().cluster_id)
    other = {**base, "output": "other", "embed": {"reuse": "first", "max_seq_length": 128, "cache": False}}
    assert run_cli("run", write_job(job_dir, other, "other.yaml")) == 0
    man = load_manifest("other")
    assert man["embed"]["reuse"]["used"] is False and man["stages"]["embed"]["model_rows"] == 40
