"""LESS: batched per-example LoRA gradients equal a one-row loop, the counter-based projection is
the same matrix whatever the batching, the Adam feature and LESS's aggregation match hand
values, optimizer states keyed by index load by name, and the stage in a real job (real weak LM,
real Beam) resumes after a kill with the same scores and selection whatever the batch size."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from curate import lm_data
from curate.scoring import less as L
from curate.scoring import less_warmup as W
from tests.conftest import EXAMPLES, REPO, load_manifest, run_cli, write_job


def _tiny_peft(dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).to(dtype)
    peft = W.peft_model(model, r=4, alpha=8, dropout=0.1, seed=0).eval()
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # as after training: B is zero at initialisation, which would zero A's gradients
            p.data.normal_(0, 0.05)
    return peft


def _examples():
    gen = np.random.default_rng(0)
    out = []
    for n_prompt, n_resp in ((3, 4), (10, 7), (1, 1), (20, 12), (5, 30)):
        ids = gen.integers(1, 300, n_prompt + n_resp).tolist()
        out.append(lm_data.Example(tuple(ids), tuple([lm_data.IGNORE] * n_prompt + ids[n_prompt:]), "ok"))
    out.insert(2, lm_data.Example((5, 6), (lm_data.IGNORE, lm_data.IGNORE), "empty_response"))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_gradients_equal_a_one_row_loop_for_any_batch_size(dtype):
    peft, examples = _tiny_peft(dtype), _examples()
    loop_index, loop = L.loop_grads(peft, examples, pad_id=0)
    assert loop_index == [0, 1, 3, 4, 5]  # the row without a response has no gradient, not a zero one
    assert loop.shape[1] == sum(p.numel() for _, p in L.lora_parameters(peft))
    for batch in (1, 2, 16):
        index, grads = L.example_grads(peft, examples, pad_id=0, batch_size=batch)
        grads = grads[[index.index(i) for i in loop_index]]
        assert float((grads - loop.float()).abs().max()) < 1e-6 * float(loop.abs().max())
    assert all(p.grad is None for p in peft.parameters())  # nothing left behind for the next checkpoint


def test_projection_is_one_counter_based_matrix_whatever_the_batch():
    proj = L.Projection(dim=64, seed=3, block_rows=L.GEN_ROWS)
    width = 2500  # three generator blocks, the last one partial
    block = L.signs(3, 1, 1024, 64)
    assert set(np.unique(block)) == {-1.0, 1.0} and np.array_equal(block, L.signs(3, 1, 1024, 64))
    assert not np.array_equal(block, L.signs(3, 0, 1024, 64)) and not np.array_equal(block, L.signs(4, 1, 1024, 64))
    assert abs(block.mean()) < 4 / math.sqrt(block.size)
    dense = np.concatenate([L.signs(3, b, min(1024, width - 1024 * b), 64) for b in range(3)]) / 8.0
    x = torch.randn(7, width, dtype=torch.float64)
    out = L.project(x, proj)
    assert np.allclose(out.numpy(), x.numpy() @ dense, rtol=1e-5, atol=1e-5)
    for rows in ([0], [3, 1], list(range(7))):  # a row's projection does not depend on its batch
        assert torch.allclose(L.project(x[rows], proj), out[rows], rtol=1e-5, atol=1e-5)
    assert torch.equal(L.project(x, proj), out)  # bit-identical for the same input
    # JL: inner products of unit vectors survive a 4096-dim projection
    u, v = torch.nn.functional.normalize(torch.randn(2, 3000, dtype=torch.float64), dim=1)
    pu, pv = L.project(torch.stack([u, v]), L.Projection(4096, 0))
    assert abs(float(pu @ pv) - float(u @ v)) < 0.08


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_projection_on_a_gpu_equals_the_cpu():
    x = torch.randn(5, 3000)
    proj = L.Projection(512, 1)
    assert torch.allclose(L.project(x.cuda(), proj).cpu(), L.project(x, proj), rtol=1e-4, atol=1e-4)


def test_adam_direction_is_the_references_formula():
    g, m, v = torch.tensor([0.5]), torch.tensor([0.1]), torch.tensor([0.01])
    assert math.isclose(float(L.adam_direction(g, m, v, (0.9, 0.999), 1e-8)), 1.383496, rel_tol=1e-6)
    assert L.checkpoint_weights([1.6877e-05, 1.2859e-05, 7.7030e-06, 2.5616e-06]) == pytest.approx(
        [0.4219, 0.3215, 0.1926, 0.0640], abs=1e-4)  # the README's learning rates, as matching.py weighs them
    with pytest.raises(ValueError):
        L.checkpoint_weights([0.0])


def test_aggregation_is_weighted_over_checkpoints_mean_over_a_subtask_max_over_subtasks():
    from curate.scoring.rds import match

    gen = np.random.default_rng(2)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    feat = lambda: np.concatenate([unit(gen.normal(size=4)), unit(gen.normal(size=4))])  # noqa: E731 - 2 checkpoints
    targets = [("a", feat()) for _ in range(3)] + [("b", feat())]
    row, w = feat(), [0.75, 0.25]
    hand = {s: np.mean([w[0] * row[:4] @ t[:4] + w[1] * row[4:] @ t[4:] for n, t in targets if n == s])
            for s in ("a", "b")}
    for order in (targets, targets[::-1]):
        score, subtask = match(row, *L.subtask_matrix(order, w))
        assert math.isclose(score, max(hand.values()), rel_tol=1e-12) and subtask == max(hand, key=hand.get)


def test_optimizer_moments_keyed_by_index_load_by_name_and_shapes_are_checked():
    peft = _tiny_peft(torch.float32)
    params = L.lora_parameters(peft)
    opt = torch.optim.AdamW([p for _, p in params], lr=1e-3)
    peft.train()
    out = peft(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]]))
    out.loss.backward()
    opt.step()
    names, shapes = [n for n, _ in params], [tuple(p.shape) for _, p in params]
    state = opt.state_dict()  # what a Trainer's optimizer.pt holds: keyed by integer index
    assert all(isinstance(k, int) for k in state["state"])
    moments = W.named_moments(state, names, shapes)
    for name, p in params:
        assert torch.equal(moments[name][0], opt.state[p]["exp_avg"])
        assert torch.equal(moments[name][1], opt.state[p]["exp_avg_sq"])
    by_name = {"state": {n: s for n, s in zip(names, state["state"].values())}, "param_groups": []}
    assert torch.equal(W.named_moments(by_name, names, shapes)[names[1]][1], moments[names[1]][1])
    with pytest.raises(ValueError, match="have shape"):
        W.named_moments(state, names, [shapes[1], *shapes[1:]])
    with pytest.raises(ValueError, match="trainable ones"):
        W.named_moments(state, names[:-1], shapes[:-1])


def test_warmup_sample_depends_on_the_rows_and_seed_only():
    rows = [(f"k{i}", {"i": i}) for i in range(400)]
    a = W.sample(rows, 0.05, 8, seed=0)
    assert a == W.sample(rows[::-1] + rows[:5], 0.05, 8, seed=0)  # order and duplicates do not matter
    assert 8 <= len(a) < 40 and a != W.sample(rows, 0.05, 8, seed=1)
    assert len(W.sample(rows[:20], 0.05, 8, seed=0)) == 8  # the floor: at least min_rows
    assert W.sample(rows[:5], 0.05, 8, seed=0) and len(W.sample(rows[:5], 0.05, 8, seed=0)) == 5


def test_less_needs_targets(job_dir, capsys):
    cfg = {"output": "o", "inputs": [{"source": "g", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}],
           "score": {"less": {"enabled": True}}}
    assert run_cli("run", write_job(job_dir, cfg)) == 2
    assert "score.less.enabled needs targets" in capsys.readouterr().err


# --- the stage in real jobs ---------------------------------------------------------------------

KILL_AFTER_BUCKETS = """
import os, signal, sys
import pipelines.less as less
calls = {"n": 0}
infer = less.LESSHandler.infer
def killing(self, batch, model, progress):
    if self.kind == "pool":
        calls["n"] += 1
        if calls["n"] > 2:
            os.kill(os.getpid(), signal.SIGKILL)  # as an OOM kill or a lost node would
    return infer(self, batch, model, progress)
less.LESSHandler.infer = killing
from curate.cli import main
sys.exit(main(["run", sys.argv[1]]))
"""


def _job(job_dir, name, cache, **less):
    gsm = [json.loads(line) for line in open(f"{EXAMPLES}/gsm8k_sample.jsonl", encoding="utf-8")]
    targets = job_dir / "targets.jsonl"
    targets.write_text("".join(json.dumps(r) + "\n" for r in gsm[-3:]))
    odd = job_dir / "odd.jsonl"  # a row the stage cannot score: NaN with a status, never a 0
    odd.write_text(json.dumps({"instruction": "Repeat: " + "tide " * 200, "input": "", "output": "ok"}) + "\n")
    cfg = {"output": name, "inputs": [{"source": "alpaca", "path": f"{EXAMPLES}/alpaca_cherry_sample.json"},
                                      {"source": "gsm8k", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"},
                                      {"source": "odd", "path": str(odd)}],
           "targets": [{"source": "math", "path": str(targets)}],
           "sample": {"mode": "head", "n": 4},
           "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
           "embed": {"enabled": False}, "cluster": {"enabled": False},
           "score": {"ifd": {"enabled": False},
                     "less": {"enabled": True, "max_length": 96, "proj_dim": 256, "warmup_min_rows": 6,
                              "warmup_batch_size": 3, "cache_dir": str(cache), **less}},
           "select": {"policy": "targeted", "params": {"column": "less_score"}, "budget": {"rows": 4}}}
    return write_job(job_dir, cfg, f"{name}.yaml")


def test_a_killed_run_resumes_from_its_shards_with_the_same_scores_for_any_batch_size(job_dir):
    cache = job_dir / "less"
    job = _job(job_dir, "killed", cache, bucket_rows=3, batch_size=2)
    script = job_dir / "kill.py"
    script.write_text(KILL_AFTER_BUCKETS)
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, str(script), job], cwd=job_dir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (job_dir / "killed").exists()  # never a half-written output
    features = [d for d in os.listdir(cache / "features") if d.endswith("-adam")]
    shards = [p for p in os.listdir(cache / "features" / features[0]) if p.endswith(".parquet")]
    done = sum(len(pd.read_parquet(cache / "features" / features[0] / p)) for p in shards)
    assert 0 < done < 9  # what the buckets before the kill computed is on disk, the rest is not
    scored = sum(int(pd.read_parquet(cache / "features" / features[0] / p).less_vector.notna().sum()) for p in shards)
    keys, matrix, identity = L.read_store(cache / "features" / features[0])  # readable as numpy (scored rows)
    assert len(keys) == scored and matrix.shape == (scored, 2 * 256) and identity["dim"] == 256
    assert np.allclose(np.linalg.norm(matrix[:, :256], axis=1), 1, atol=1e-5)  # unit per checkpoint

    assert run_cli("run", _job(job_dir, "resumed", cache, bucket_rows=3, batch_size=2)) == 0
    man = load_manifest("resumed")
    import jsonschema

    with open(f"{REPO}/schemas/manifest.schema.json", encoding="utf-8") as fh:
        jsonschema.validate(man, json.load(fh))
    assert man["less"]["warmup_how"] == "cached" and len(man["less"]["checkpoints"]) == 2
    pool_store, target_store = L.read_store(man["less"]["cache_pool"]), L.read_store(man["less"]["cache_targets"])
    assert pool_store[2] == target_store[2] == man["less"]["projection"] and 1 <= len(target_store[0]) <= 3
    L.check_comparable(pool_store[2], target_store[2])
    with pytest.raises(ValueError, match="projected differently"):
        L.check_comparable(pool_store[2], {**pool_store[2], "seed": 1})
    assert man["less"]["cached_rows"] == done and man["less"]["model_rows"] == 9 - done  # only the missing rows
    assert man["less"]["status_share"]["prompt_too_long"] >= round(1 / 9, 4)  # the odd row at least

    # the same rows from scratch (same warm-up), another batching: the same scores and selection
    fresh = job_dir / "fresh_cache"
    shutil.copytree(cache / "warmup", fresh / "warmup")
    assert run_cli("run", _job(job_dir, "fresh", fresh, bucket_rows=5, batch_size=1)) == 0
    assert load_manifest("fresh")["less"]["model_rows"] == 9
    a = pd.read_parquet("resumed/annotated").set_index("id").sort_index()
    b = pd.read_parquet("fresh/annotated").set_index("id").sort_index()
    ok = a.less_status.isin(["ok", "response_truncated"])
    assert np.allclose(a.less_score[ok], b.less_score[ok], atol=1e-5)
    assert a.less_score[~ok].isna().all() and b.less_score[~ok].isna().all() and (~ok).sum() >= 1
    assert set(pd.read_parquet("resumed/selected").id) == set(pd.read_parquet("fresh/selected").id)
    assert (a.less_subtask[ok] == "math").all() and a.less_subtask[~ok].isna().all()
    per = [json.loads(v) for v in a.less_subtasks[ok]]  # each subtask's score; its max is less_score
    assert all(set(d) == {"math"} for d in per) and a.less_subtasks[~ok].isna().all()
    assert np.allclose([d["math"] for d in per], a.less_score[ok], atol=1e-8)
    assert a.loc[a.source == "odd", "less_status"].tolist() == ["prompt_too_long"]
    report = open("resumed/report.html", encoding="utf-8").read()
    section = report[report.index('id="targeted"'):report.index('id="clusters"')]
    assert "<h3>LESS</h3>" in section and a.less_score.idxmax() in section and "RDS+" not in section


def test_a_bucket_that_fails_is_an_error_status_never_a_score(monkeypatch):
    from transformers import AutoTokenizer

    from curate.models import weak_lm_folder
    from curate.settings import LESS
    from pipelines.less import LESSHandler, Loaded
    from pipelines.targeted import MatchFn

    tok = AutoTokenizer.from_pretrained(weak_lm_folder())
    handler = LESSHandler(LESS(enabled=True, max_length=64), {"projection": L.Projection(16).identity()}, "pool")
    rows = [{"prompt": "What is 2 + 3?", "response": "5"}, {"prompt": "word " * 200, "response": "ok"}]
    monkeypatch.setattr("pipelines.less.features", lambda *a, **k: 1 / 0)  # e.g. out of memory half way
    out = handler.infer(rows, Loaded(None, tok, []), lambda n: None)
    assert out == [{"less_vector": None, "less_status": "error"}] * 2
    match = MatchFn("less")
    match.setup()
    match.start_bundle()
    matched = list(match.handle({**rows[0], **out[0]}, {"names": ["t"], "matrix": np.ones((1, 16))}))
    assert math.isnan(matched[0]["less_score"]) and matched[0]["less_subtask"] is None
