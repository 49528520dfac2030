"""Recovery by distillation and evaluation on the user's own sets: the KD loss against a hand
computation and on a student that equals its teacher, response-only logits, the length-sorted batch
order, the pool/evaluation overlap, the hierarchical bootstrap, and `curate recover` / `curate
evaluate --objective kd --eval NAME=PATH` on a tiny real Llama."""
import json
import math

import numpy as np
import pytest
import torch

from curate import lm_data
from curate.compress import CompressSettings, compress
from tests.conftest import EXAMPLES, run_cli, write_job
from tests.test_recovery import rows, tiny  # noqa: F401 - the tiny model fixture


def test_kd_loss_equals_a_hand_computed_kl_on_a_tiny_vocabulary():
    teacher = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=torch.float64))
    student = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64))
    by_hand = [0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(0.1 / 0.2),
               0.25 * math.log(0.25 / 0.1) + 0.25 * math.log(0.25 / 0.6) + 0.5 * math.log(0.5 / 0.3)]
    # logits are log-probabilities plus any constant per row: the softmax removes it
    loss = lm_data.kd_loss(student + 3.0, teacher - 1.0)
    assert float(loss) == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    # forward KL, not reverse: swapping the two gives another value
    assert float(lm_data.kd_loss(teacher, student)) != pytest.approx(float(loss), rel=1e-3)


def test_kd_on_a_student_equal_to_its_teacher_gives_zero_loss_and_zero_gradient(tiny):
    from curate.models import load_causal_lm
    from curate.recover import RecoverSettings, lora_model, step_loss

    teacher, tok = load_causal_lm(tiny)
    student, _ = load_causal_lm(tiny)
    s = RecoverSettings(dropout=0.0, objective="kd")
    student = lora_model(student, s)  # LoRA's B starts at zero: the student equals the teacher
    student.train()
    batch = lm_data.batch_tensors([lm_data.encode(r, tok, 128) for r in rows(4)], 0)
    loss, parts = step_loss(student, batch, "kd", teacher=teacher)
    loss.backward()
    assert abs(float(loss)) < 1e-6 and parts == {"kd": pytest.approx(0.0, abs=1e-6)}
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert grads and max(float(g.abs().max()) for g in grads) < 1e-6
    # the same batch under sft has a real loss and gradient; sft+kd adds the weighted KD term
    student.zero_grad()
    sft, _ = step_loss(student, batch, "sft")
    sft.backward()
    assert float(sft) > 1 and max(float(p.grad.abs().max()) for p in student.parameters() if p.requires_grad) > 0
    both, parts = step_loss(student, batch, "sft+kd", 0.5, teacher)
    assert float(both) == pytest.approx(parts["sft"] + 0.5 * parts["kd"], rel=1e-6)


def test_response_only_logits_equal_the_full_forward_pass(tiny):
    from curate.models import load_causal_lm

    model, tok = load_causal_lm(tiny)
    ids, labels, mask = lm_data.batch_tensors([lm_data.encode(r, tok, 96) for r in rows(3)], 0)
    with torch.inference_mode():
        logits, targets, keep = lm_data.target_logits(model, ids, labels, mask)
        full = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
    assert logits.shape == full.shape and keep.sum() == len(targets)
    assert torch.allclose(logits, full.float(), atol=1e-5)


def test_recovery_batches_group_lengths_and_keep_the_seeded_rows():
    from curate.recover import batches

    ids = [f"r{i}" for i in range(40)]
    lengths = [(i * 37) % 100 for i in range(40)]
    plan = batches(ids, 4, 2, 0, lengths)
    flat = [i for b in plan for i in b]
    assert sorted(flat[:40]) == list(range(40)) and sorted(flat[40:]) == list(range(40))
    assert plan == batches(ids, 4, 2, 0, lengths) and plan != batches(ids, 4, 2, 1, lengths)
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plan])
    plain = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches(ids, 4, 2, 0)])
    assert spread < plain / 2  # rows of like length share a batch
    # the rows of a window do not depend on its batch order: the seeded order picks them
    assert {i for b in plan[:8] for i in b} == {i for b in batches(ids, 4, 1, 0)[:8] for i in b}


def test_overlap_finds_exact_prompt_and_near_duplicates_only():
    from curate.evaluate import overlap

    text = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?")
    answer = "In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips. The answer is 72."
    evals = [{"prompt": text, "response": answer}, {"prompt": "Name a prime number.", "response": "7"}]
    pool = [{"id": "same", "prompt": text.upper(), "response": answer},
            {"id": "prompt", "prompt": "  Name a prime  number. ", "response": "13"},
            {"id": "near", "prompt": text.replace("April", "March"), "response": answer},
            {"id": "other", "prompt": "Write a haiku about rain.", "response": "Soft rain on the roof"},
            {"id": "empty", "prompt": "", "response": ""}]
    assert overlap(pool, evals) == {"same": "exact", "prompt": "exact", "near": "near"}
    assert overlap(pool, []) == {} and overlap([], evals) == {}


def test_hierarchical_bootstrap_sees_the_seed_spread():
    from curate.evaluate import hierarchical_bootstrap

    rng = np.random.default_rng(0)
    rows = rng.normal(0, 0.05, 200)
    calm = np.stack([rows - 0.02 for _ in range(5)])  # every seed the same: only the rows vary
    noisy = calm + rng.normal(0, 0.05, (5, 1))  # seeds disagree by more than the rows do
    a, b = hierarchical_bootstrap(calm, 2000, 0), hierarchical_bootstrap(noisy, 2000, 0)
    assert a["ci95"][0] < a["mean"] < a["ci95"][1] < 0 and a["mde"] == pytest.approx(2.8 * a["se"])
    assert b["mde"] > 2 * a["mde"]
    const = hierarchical_bootstrap(np.full((3, 10), 0.5), 100, 0)
    assert const["ci95"] == [pytest.approx(0.5), pytest.approx(0.5)] and const["mde"] == pytest.approx(0, abs=1e-12)
    with_nan = np.array([[0.1, np.nan, 0.2], [0.1, 0.3, 0.2]])  # a row NaN at one seed leaves every seed
    assert hierarchical_bootstrap(with_nan, 100, 0)["mean"] == pytest.approx(0.15)


def test_recover_and_evaluate_with_kd_on_the_users_own_set(tiny, job_dir):
    """`curate recover --objective kd`; `curate evaluate --objective kd --eval NAME=PATH` where the
    user's set shares rows with the pool: those rows are removed before selection, never selected."""
    import pandas as pd

    pruned = str(job_dir / "pruned")
    compress(tiny, rows(), pruned, CompressSettings(method="magnitude", sparsity=0.6, calibration_rows=4), n_heldout=2)
    gsm = [json.loads(line) for line in open(f"{EXAMPLES}/gsm8k_sample.jsonl", encoding="utf-8")]
    pool_file = job_dir / "pool.jsonl"
    with open(pool_file, "w", encoding="utf-8") as fh:
        for r in gsm[:24]:
            fh.write(json.dumps(r) + "\n")
    mine = job_dir / "mine.jsonl"  # 3 rows of the pool (one of them reworded) and 4 unseen rows
    reworded = {**gsm[2], "instruction": gsm[2]["instruction"].replace(" ", "  ", 1) + " Explain."}
    with open(mine, "w", encoding="utf-8") as fh:
        for r in gsm[:2] + [reworded] + gsm[30:34]:
            fh.write(json.dumps(r) + "\n")
    cfg = {"output": "run", "inputs": [{"source": "g", "path": str(pool_file)}],
           "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
           "embed": {"enabled": False}, "cluster": {"enabled": False}, "score": {"ifd": {"enabled": False}},
           "select": {"policy": "random", "budget": {"rows": 8}}}
    assert run_cli("run", write_job(job_dir, cfg)) == 0
    assert run_cli("recover", "run", "--model", pruned, "--dense", tiny, "--objective", "kd", "--steps", "2",
                   "--batch-size", "4", "--cutoff", "128", "--out", "adapter") == 0
    card = json.load(open("adapter/recover.json"))
    assert card["settings"]["objective"] == "kd" and card["dense"] == tiny and len(card["loss"]) == 2
    assert all(math.isfinite(x) and x > 0 for x in card["loss"])
    assert run_cli("evaluate", "run", "--model", pruned, "--dense", tiny, "--rows", "6", "--policies",
                   "random,top_k", "--param", "top_k.column=approx_tokens", "--seeds", "0,1", "--heldout", "4",
                   "--eval", f"mine={mine}", "--objective", "kd", "--steps", "2", "--batch-size", "4",
                   "--cutoff", "128") == 0
    summary = json.load(open("run/eval/summary.json"))
    heldout = set(pd.read_parquet("run/eval/heldout.parquet").query("set == 'heldout'").id)
    ann = pd.read_parquet("run/annotated")
    shared_ids = [ann[ann.prompt == r["instruction"]].id.iloc[0] for r in gsm[:3]]
    expect = {"exact": sum(i not in heldout for i in shared_ids[:2]), "near": int(shared_ids[2] not in heldout)}
    assert summary["objective"] == "kd" and summary["removed_from_pool"]["mine"] == expect
    assert set(summary["sets"]) == {"heldout", "mine"} and summary["sets"]["mine"]["rows"] + summary["sets"]["mine"]["rows_unusable"] == 7
    models = summary["sets"]["mine"]["models"]
    assert set(models) == {"random", "top_k", "random_tokens:top_k"}
    top = models["top_k"]
    assert set(top["vs_random"]) >= {"mean", "ci95", "mde", "wins"} and "vs_length_matched" in top
    # the length-matched baseline spends about the policy's tokens (rows of its own choosing)
    assert models["random_tokens:top_k"]["tokens_selected"] <= top["tokens_selected"]
    assert models["random_tokens:top_k"]["tokens_selected"] > 0.7 * top["tokens_selected"]
    for m in models.values():
        assert 0 <= m["flip"] <= 1 and math.isfinite(m["gap_closed_kl"])
    res = pd.read_parquet("run/eval/results.parquet")
    assert len(res) == 3 * 2 * 2 and set(res.objective) == {"kd"}
    assert len(set(shared_ids)) == 3 and len(heldout) == 4
    for chosen in res.selected_ids:  # no evaluation row, held out or the user's, is ever selected
        assert not set(chosen) & (set(shared_ids) | heldout)
    assert set(summary["macro"]) == set(models)
    # per token: rows weighted by their response tokens, recomputed here from the per-row output
    per_row = pd.read_parquet("run/eval/heldout.parquet").query("set == 'mine'")
    assert (per_row.tokens >= 0).all() and per_row.tokens.max() > per_row.tokens.min()
    ok = per_row[per_row.model == "none"].tokens > 0
    for name, m in models.items():
        got = per_row[per_row.model == name]
        per_seed = [(g.nll[g.tokens > 0] * g.tokens[g.tokens > 0]).sum() / g.tokens[g.tokens > 0].sum()
                    for _, g in got.groupby("seed")]
        assert m["nll_tok"] == pytest.approx(float(np.mean(per_seed)), rel=1e-9), name
        mine = summary["sets"]["mine"]
        assert ok.any() and (math.isfinite(m["gap_closed_tok"]) or mine["nll_tok_compressed"] <= mine["nll_tok_dense"])
    assert set(top["vs_random_tok"]) >= {"mean", "ci95", "mde", "wins"}


def test_evaluate_refuses_no_set_and_a_bad_eval_flag(tiny, job_dir):
    cfg = {"output": "run", "inputs": [{"source": "g", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}],
           "sample": {"mode": "head", "n": 12}, "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
           "embed": {"enabled": False}, "cluster": {"enabled": False}, "score": {"ifd": {"enabled": False}}}
    assert run_cli("run", write_job(job_dir, cfg)) == 0
    assert run_cli("evaluate", "run", "--model", tiny, "--dense", tiny, "--rows", "4", "--eval", "nopath") == 2
    assert run_cli("evaluate", "run", "--model", tiny, "--dense", tiny, "--rows", "4", "--eval", "x=/no/such") == 2
    assert run_cli("evaluate", "run", "--model", tiny, "--dense", tiny, "--rows", "4", "--heldout", "0") != 0


def test_planted_defects_are_real_rows_made_bad_in_the_asked_share():
    from benchmarks.recovery import defects

    rows = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer number {i} is a full sentence here."}
            for i in range(100)]
    bad, counts = defects(rows, 0.3, 0)
    assert sum(counts.values()) == 30 and all(counts[k] > 0 for k in ("swapped", "truncated", "refusal", "repeated"))
    changed = [i for i in range(100) if bad[i] != rows[i]]
    assert 30 - counts["repeated"] // 3 - 1 <= len(changed) <= 30  # a repeated row's first copy is itself
    texts = [json.dumps(r, sort_keys=True) for r in bad]
    assert max(texts.count(t) for t in texts) == 3
    assert bad == defects(rows, 0.3, 0)[0] and bad != defects(rows, 0.3, 1)[0]


def test_policy_labels_let_one_policy_run_twice():
    from curate.evaluate import policy_of

    assert policy_of("random") == ("random", "random")
    assert policy_of("rds=targeted") == ("rds", "targeted")


def test_whole_pool_baseline_only_when_the_steps_cover_the_pool():
    """`pool` trains on every selectable row, and only when steps x batch covers them once."""
    from curate.evaluate import POOL, EvaluateSettings, plan_selections
    from curate.select import features_table

    table = features_table([{"id": f"r{i:02d}", "source": "s", "approx_tokens": 10 + i} for i in range(12)])
    s = EvaluateSettings(compressed="unused", budget=4, policies=("random", "top_k"),
                         params={"top_k": {"column": "approx_tokens"}}, seeds=(0, 1), length_matched=())
    names, sel = plan_selections(s, table, "unused", {}, 0, steps_rows=12)
    assert names == ["random", "top_k", POOL] and sel[(POOL, 1)] == [f"r{i:02d}" for i in range(12)]
    assert sel[("top_k", 0)] == sel[("top_k", 1)] == ["r11", "r10", "r09", "r08"]
    assert sel[("random", 0)] != sel[("random", 1)]
    assert plan_selections(s, table, "unused", {}, 0, steps_rows=11)[0] == ["random", "top_k"]
    assert plan_selections(s, table, "unused", {}, 0, steps_rows=None)[0] == ["random", "top_k"]


def test_the_per_token_mean_weights_rows_by_their_tokens():
    from curate.evaluate import token_mean

    nll = np.array([6.0, 2.0, 2.0, np.nan])
    tokens = np.array([2.0, 48.0, 50.0, 0.0])
    ok = np.array([True, True, True, False])
    assert token_mean(nll, tokens, ok) == pytest.approx((12 + 96 + 100) / 100)  # a short hard row weighs 2%
    assert float(np.mean(nll[ok])) == pytest.approx(10 / 3)  # the per-row mean gives it a third
    assert math.isnan(token_mean(nll, tokens, np.zeros(4, bool)))
