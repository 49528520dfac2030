"""The compression-recovery loop on a tiny real Llama (random weights from a config, SmolLM2's real
tokenizer, nothing downloaded): pruning, JSD, PASER's parts, LoRA recovery, evaluation; and one
smoke run of the whole loop with the packaged model on a few rows."""
import json
import math
import os

import numpy as np
import pytest
import torch

from curate import lm_data
from curate.compress import CompressSettings, compress, mask_nm
from tests.conftest import EXAMPLES, load_manifest, run_cli, shared, write_job


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder with a tiny random Llama and SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from curate.models import weak_lm_folder

    tok = AutoTokenizer.from_pretrained(weak_lm_folder())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    folder = str(tmp_path_factory.mktemp("tiny") / "dense")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def rows(n=24):
    data = [json.loads(line) for line in open(f"{EXAMPLES}/gsm8k_sample.jsonl", encoding="utf-8")][:n]
    return [{"id": f"g{i}", "source": "g", "prompt": r["instruction"], "response": r["output"]}
            for i, r in enumerate(data)]


def linears(model):
    from curate.compress import decoder_layers, prunable

    return [m for layer in decoder_layers(model) for m in prunable(layer).values()]


@pytest.mark.parametrize("method,nm", [("wanda", None), ("magnitude", None), ("wanda", (2, 4))])
def test_pruning_reaches_the_asked_sparsity_and_loads_back(tiny, tmp_path, method, nm):
    from curate.models import load_causal_lm

    out = str(tmp_path / "pruned")
    card = compress(tiny, rows(), out, CompressSettings(method=method, sparsity=0.5, nm=nm, calibration_rows=8),
                    n_heldout=6)
    assert abs(card.achieved_sparsity - 0.5) < 0.01
    model, _ = load_causal_lm(out)
    for lin in linears(model):
        w = lin.weight
        if method == "wanda" and nm is None:  # per output row
            assert ((w == 0).sum(dim=1) == w.shape[1] // 2).all()
        if nm:
            assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(dim=2) <= 2).all()
    saved = json.load(open(os.path.join(out, "card.json")))
    assert saved["heldout"]["rows"] == 6 and math.isfinite(saved["heldout"]["nll_compressed"])
    assert len(saved["layers"]) == 3 * 7 and "compressed" in open(os.path.join(out, "README.md")).read()


def test_nm_mask_keeps_the_best_two_of_four():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.2, 0.4, 0.3]])
    assert mask_nm(score, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]


def test_layer_drop_removes_layers_and_the_model_still_runs(tiny, tmp_path):
    from curate.models import load_causal_lm

    out = str(tmp_path / "dropped")
    card = compress(tiny, rows(), out, CompressSettings(method="layer_drop", layers=1, calibration_rows=8), n_heldout=4)
    model, tok = load_causal_lm(out)
    assert len(card.dropped_layers) == 1 and model.config.num_hidden_layers == 2
    ex = [lm_data.encode(r, tok, 256) for r in rows(3)]
    assert all(lm_data.usable(e) for e in ex)
    assert all(math.isfinite(x) for x in lm_data.response_nll(model, ex, 0))


def test_jsd_values_from_methods_md():
    def lp(p):
        return torch.log(torch.tensor(p, dtype=torch.float64))

    assert float(lm_data.jsd_from_logprobs(lp([1.0, 0.0]), lp([0.0, 1.0]))) == pytest.approx(math.log(2), abs=1e-9)
    assert float(lm_data.jsd_from_logprobs(lp([0.5, 0.5]), lp([1.0, 0.0]))) == pytest.approx(0.215762, abs=1e-6)
    assert float(lm_data.jsd_from_logprobs(lp([0.2, 0.8]), lp([0.2, 0.8]))) == 0.0
    assert float(lm_data.jsd_from_logprobs(lp([0.3, 0.7]), lp([0.6, 0.4]))) == pytest.approx(
        float(lm_data.jsd_from_logprobs(lp([0.6, 0.4]), lp([0.3, 0.7]))))


def test_jsd_is_zero_for_the_same_model_and_bounded_for_a_pruned_one(tiny, tmp_path):
    from curate.models import load_causal_lm

    dense, tok = load_causal_lm(tiny)
    out = str(tmp_path / "p")
    compress(tiny, rows(), out, CompressSettings(method="magnitude", sparsity=0.7, calibration_rows=4), n_heldout=2)
    pruned, _ = load_causal_lm(out)
    ex = [lm_data.encode(r, tok, 256) for r in rows(6)] + [lm_data.encode({"prompt": "q", "response": ""}, tok)]
    same = lm_data.compare(dense, dense, ex, 0, batch_size=4)
    diff = lm_data.compare(dense, pruned, ex, 0, batch_size=4)
    assert all(s["jsd"] == 0 for s in same[:6]) and all(0 < d["jsd"] <= math.log(2) for d in diff[:6])
    assert same[6]["status"] == "empty_response" and math.isnan(same[6]["jsd"])
    for d in diff[:6]:  # the sum is the mean times the token count
        assert d["jsd_sum"] == pytest.approx(d["jsd"] * d["tokens"], rel=1e-12)
    # batching does not change the values
    one = lm_data.compare(dense, pruned, ex[:3], 0, batch_size=1)
    assert [o["jsd"] for o in one] == pytest.approx([d["jsd"] for d in diff[:3]], rel=1e-5)


def test_paser_allocation_and_ies_from_methods_md():
    from curate.select.paser import ies
    from curate.select.quotas import allocate

    assert allocate(10, {0: 50, 1: 50, 2: 50}, {0: 0.1, 1: 0.3, 2: 0.6}) == {0: 1, 1: 3, 2: 6}
    assert sum(allocate(10, {0: 50, 1: 50, 2: 50}, {0: 1, 1: 1, 2: 1}).values()) == 10
    capped = allocate(10, {0: 2, 1: 50, 2: 50}, {0: 0.5, 1: 0.25, 2: 0.25})
    assert capped[0] == 2 and sum(capped.values()) == 10
    assert float(ies(np.array([0.2]), np.array([100]))[0]) == pytest.approx(0.021715, abs=1e-6)


def test_concept_graph_hand_case_from_methods_md():
    from curate.select.paser import ConceptGraph

    g, accepted = ConceptGraph(), []
    for cs in (["a", "b"], ["b", "c"], ["a", "c"], ["a", "b", "d"], ["c", "d"]):
        ok = g.consistent(cs)
        accepted.append(ok)
        if ok:
            g.add(cs)
    assert accepted == [True, True, False, True, False]


def test_spectral_clusters_find_three_blobs():
    from curate.select.paser import spectral_clusters

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 384)) * 5
    x = np.concatenate([c + rng.standard_normal((100, 384)) * 0.3 for c in centers]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = spectral_clusters(x, 3, neighbours=10, seed=0)
    truth = np.repeat([0, 1, 2], 100)
    assert len(set(zip(labels.tolist(), truth.tolist()))) == 3  # a one-to-one match: ARI = 1


def test_paser_policy_uses_the_budget_and_records_every_rejection():
    import pyarrow as pa

    from curate.select import Budget, make

    rng = np.random.default_rng(1)
    n = 60
    ids = [f"r{i:02d}" for i in range(n)]
    table = pa.table({"id": ids, "source": ["s"] * n, "approx_tokens": rng.integers(20, 200, n),
                      "degradation_jsd": rng.uniform(0.01, 0.3, n), "cluster_id": (np.arange(n) % 4).astype(np.int32)})
    topics = ["python lists", "tax law", "french cooking", "python lists and tax law"]
    texts = [f"Explain {topics[i % 4]} with examples number {i}" for i in range(n)]
    emb = rng.standard_normal((n, 16)).astype(np.float32)
    for clusters in ("kmeans", "spectral"):
        params = {"clusters": clusters} if clusters == "kmeans" else {"clusters": "spectral", "k": 4}
        res = make("paser", params).run(table, Budget(rows=20), 0, emb, texts=texts)
        assert len(res.selected) == 20
        assert set(res.selected) | set(res.dropped) == set(ids)
        assert set(res.dropped.values()) <= {"paser:over_cluster_budget", "paser:concept_conflict"}
    again = make("paser", {"clusters": "kmeans"}).run(table, Budget(rows=20), 0, emb, texts=texts)
    assert again.selected == make("paser", {"clusters": "kmeans"}).run(table, Budget(rows=20), 0, emb,
                                                                       texts=texts).selected


def test_recover_lowers_the_training_loss(tiny, tmp_path):
    from curate.recover import RecoverSettings, recover

    _, _, rep = recover(tiny, rows(8), str(tmp_path / "adapter"),
                        RecoverSettings(steps=12, batch_size=4, lr=5e-3, cutoff=256, warmup=0.0))
    assert rep["steps"] == 12 and np.mean(rep["loss"][-3:]) < np.mean(rep["loss"][:3])
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")


def test_recover_batch_order_depends_on_seed_and_ids_only():
    from curate.recover import batches

    a = batches(["x", "y", "z", "w"], 2, 1, 0)
    b = batches(["w", "z", "y", "x"], 2, 1, 0)
    ids_a = [["x", "y", "z", "w"][i] for chunk in a for i in chunk]
    ids_b = [["w", "z", "y", "x"][i] for chunk in b for i in chunk]
    assert ids_a == ids_b and ids_a != [["x", "y", "z", "w"][i] for c in batches(["x", "y", "z", "w"], 2, 1, 1) for i in c]


def test_degradation_stage_and_evaluate_on_tiny_models(tiny, job_dir):
    """A job with the degradation stage (tiny dense vs tiny pruned), then `curate evaluate`."""
    pruned = str(job_dir / "pruned")
    compress(tiny, rows(), pruned, CompressSettings(method="magnitude", sparsity=0.6, calibration_rows=4),
             n_heldout=2)
    cfg = {"output": "run", "inputs": [{"source": "g", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"},
                                       {"source": "a", "path": f"{EXAMPLES}/alpaca_cherry_sample.json"}],
           "sample": {"mode": "head", "n": 20}, "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
           "cluster": {"k": 3}, "score": {"ifd": {"enabled": False},
                                          "degradation": {"enabled": True, "model": tiny, "compressed": pruned,
                                                          "cutoff": 256, "cache_dir": str(job_dir / "deg")}},
           "select": {"policy": "paser", "params": {"clusters": "kmeans"}, "budget": {"rows": 10}}}
    assert run_cli("run", write_job(job_dir, cfg)) == 0
    man = load_manifest("run")
    assert man["degradation"]["model_rows"] == 40
    assert set(man["degradation"]["status_share"]) <= {"ok", "response_truncated"}
    import pandas as pd

    ann = pd.read_parquet("run/annotated")
    assert ann.degradation_jsd.between(0, math.log(2)).all() and (ann.degradation_jsd > 0).all()
    assert ann.selected.sum() == 10
    assert run_cli("evaluate", "run", "--model", pruned, "--dense", tiny, "--rows", "8", "--policies",
                   "random,paser,cluster_balanced", "--param", "paser.clusters=kmeans", "--param",
                   "cluster_balanced.score=degradation_jsd", "--seeds", "0,1", "--heldout", "8",
                   "--steps", "2", "--batch-size", "4", "--cutoff", "256") == 0
    res = pd.read_parquet("run/eval/results.parquet")
    # the policies, a random baseline of each one's token count; 2 seeds; one set (the held-out rows)
    assert len(res) == 5 * 2 and set(res.policy) == {"random", "paser", "cluster_balanced", "random_tokens:paser",
                                                     "random_tokens:cluster_balanced"}
    assert set(res.set) == {"heldout"} and set(res.objective) == {"sft"}
    summary = json.load(open("run/eval/summary.json"))
    assert summary["heldout_rows"] == 8 and "vs_random_ci95" in summary["policies"]["paser"]
    report = open("run/report.html", encoding="utf-8").read()  # evaluate rewrote the run's report
    assert 'id="evaluation"' in report and "NLL - random [95% CI]" in report
    heldout = pd.read_parquet("run/eval/heldout.parquet")
    held = set(heldout.id)
    assert set(heldout.model) == {"dense", "none", *res.policy}
    assert len(held) == 8 and heldout.groupby("source").id.nunique().to_dict() == {"a": 4, "g": 4}  # stratified
    for r in res.itertuples():  # no policy ever selects a held-out row
        assert (len(r.selected_ids) == 8 or r.policy.startswith("random_tokens:")) and not held & set(r.selected_ids)
    # paired seeds: random draws anew per seed, the other policies keep their selection
    by = {(r.policy, r.seed): list(r.selected_ids) for r in res.itertuples()}
    assert by[("random", 0)] != by[("random", 1)] and by[("paser", 0)] == by[("paser", 1)]


def test_smoke_the_whole_loop_with_the_packaged_model(job_dir):
    """compress (Wanda) -> degradation stage -> PASER selection -> evaluate, on a few real rows cut
    at 96 tokens (the test is about the loop; the recovery benchmark measures it at size)."""
    data = shared("alpaca_cherry_5pct.json")
    assert run_cli("compress", "--calibration", data, "--out", "smol-wanda", "--calibration-rows", "4",
                   "--heldout", "4", "--cutoff", "96") == 0
    card = json.load(open("smol-wanda/card.json"))
    assert card["heldout"]["nll_compressed"] > card["heldout"]["nll_dense"]
    cfg = {"output": "run", "inputs": [{"source": "a", "path": data}], "sample": {"mode": "head", "n": 8},
           "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
           "score": {"ifd": {"enabled": False},
                     "degradation": {"enabled": True, "compressed": "smol-wanda", "cutoff": 96}},
           "select": {"policy": "paser", "budget": {"rows": 3}}}
    assert run_cli("run", write_job(job_dir, cfg)) == 0
    assert run_cli("evaluate", "run", "--model", "smol-wanda", "--rows", "3", "--policies", "random,paser",
                   "--seeds", "0", "--heldout", "3", "--steps", "1", "--batch-size", "4", "--cutoff", "96") == 0
    summary = json.load(open("run/eval/summary.json"))
    assert summary["nll_compressed"] > summary["nll_dense"]


def test_encode_statuses_cover_every_branch(tiny):
    """Loss only on the response; a long response is cut, a prompt past the cutoff or an empty
    response gives a row that is never scored (NaN downstream, never 0)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    row = {"prompt": "What is 2 + 2?", "response": "It is 4. " * 40}
    ok = lm_data.encode({**row, "response": "4"}, tok, 256)
    cut = lm_data.encode(row, tok, 96)
    long_prompt = lm_data.encode({"prompt": "word " * 400, "response": "x"}, tok, 96)
    empty = lm_data.encode({"prompt": "q", "response": ""}, tok, 96)
    assert ok.status == "ok" and ok.labels[-1] == tok.eos_token_id and ok.n_targets == 2
    assert ok.labels[: len(ok.ids) - 2] == (lm_data.IGNORE,) * (len(ok.ids) - 2)
    assert cut.status == "response_truncated" and len(cut.ids) == 96 and lm_data.usable(cut)
    assert long_prompt.status == "prompt_too_long" and not lm_data.usable(long_prompt)
    assert empty.status == "empty_response" and not lm_data.usable(empty)
    from curate.models import load_causal_lm

    model, _ = load_causal_lm(tiny)
    nll = lm_data.response_nll(model, [ok, long_prompt, empty, cut], 0)
    assert math.isfinite(nll[0]) and math.isfinite(nll[3]) and math.isnan(nll[1]) and math.isnan(nll[2])
