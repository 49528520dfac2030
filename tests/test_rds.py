"""RDS+ targeted scores: pooled vectors that do not depend on the batch, LESS's aggregation (mean
over a subtask's examples, max over subtasks), the stage in a real job with the real weak LM
(math targets put the math rows on top), its vector cache, and the targeted policy."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from curate import lm_data
from curate.scoring.rds import match, pooled_vectors, subtask_matrix, vectors_for
from tests.conftest import EXAMPLES, REPO, load_manifest, run_cli, write_job


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    return model.eval()


def test_pooled_vectors_are_each_rows_own_whatever_the_batch():
    model = _tiny_llama()
    gen = np.random.default_rng(0)
    seqs = [tuple(gen.integers(1, 300, int(n)).tolist()) for n in (3, 17, 9, 30, 1)]
    examples = [lm_data.Example(ids, ids, "ok") for ids in seqs] + [lm_data.Example((), (), "empty_response")]
    want = []
    for e in examples[:-1]:
        with torch.no_grad():
            h = model.base_model(input_ids=torch.tensor([e.ids])).last_hidden_state[0].mean(0)
        want.append((h / h.norm()).numpy())
    for batch in (1, 2, 16):
        got = pooled_vectors(model, examples, pad_id=0, batch_size=batch)
        assert got[-1] is None  # nothing to pool: no vector, never zeros
        for g, w in zip(got, want):
            assert np.allclose(g, w, atol=1e-5) and math.isclose(float(np.linalg.norm(g)), 1.0, rel_tol=1e-5)


def test_score_is_the_max_over_subtasks_of_the_mean_cosine():
    gen = np.random.default_rng(1)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    targets = [("math", unit(gen.normal(size=8))) for _ in range(3)] + [("code", unit(gen.normal(size=8)))
                                                                       for _ in range(2)]
    names, matrix = subtask_matrix(targets)
    assert names == ["code", "math"]
    row = unit(gen.normal(size=8))
    per_subtask = {n: np.mean([row @ v for s, v in targets if s == n]) for n in names}
    score, subtask = match(row, names, matrix)
    assert math.isclose(score, max(per_subtask.values()), rel_tol=1e-12)
    assert subtask == max(per_subtask, key=per_subtask.get)
    assert math.isnan(match(None, names, matrix)[0]) and match(None, names, matrix)[1] is None  # NaN, never 0
    with pytest.raises(ValueError, match="no target could be scored"):
        subtask_matrix([])


def _targets_file(job_dir, rows, name="targets.jsonl"):
    path = job_dir / name
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def test_math_targets_rank_the_math_rows_first_and_reruns_take_the_vectors_from_the_cache(job_dir):
    gsm = [json.loads(line) for line in open(f"{EXAMPLES}/gsm8k_sample.jsonl", encoding="utf-8")]
    targets = _targets_file(job_dir, gsm[-6:])  # not among the pool's first rows
    other = _targets_file(job_dir, [{"instruction": "Write a short poem about the sea.", "input": "",  # a second subtask
                                     "output": "Waves fold silver light / the tide keeps time with the moon."}],
                          "other.jsonl")
    cfg = {"output": "run", "inputs": [{"source": "alpaca", "path": f"{EXAMPLES}/alpaca_cherry_sample.json"},
                                       {"source": "gsm8k", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}],
           "targets": [{"source": "math", "path": targets}, {"source": "poems", "path": other}],
           "sample": {"mode": "head", "n": 10}, "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
           "embed": {"enabled": False}, "cluster": {"enabled": False}, "score": {
               "ifd": {"enabled": False}, "rds": {"enabled": True, "max_length": 160, "batch_size": 4,
                                                  "cache_dir": str(job_dir / "rds")}},
           "select": {"policy": "targeted", "budget": {"rows": 5}}}
    assert run_cli("run", write_job(job_dir, cfg)) == 0
    man = load_manifest("run")
    import jsonschema

    with open(f"{REPO}/schemas/manifest.schema.json", encoding="utf-8") as fh:
        jsonschema.validate(man, json.load(fh))
    assert man["rds"]["linear_choice"]["kernel"] == man["rds"]["linear"]
    assert man["rds"]["model_rows"] == 20 and man["rds"]["target_rows"] == {"model": 7, "cached": 0}
    ann = pd.read_parquet("run/annotated").sort_values("rds_score", ascending=False)
    scored = ann[ann.rds_status.isin(["ok", "response_truncated"])]
    assert scored.rds_score.between(-1, 1).all() and ann.rds_score.isna().sum() == (len(ann) - len(scored))
    assert (ann.rds_subtask.isin(["math", "poems"]) | ann.rds_score.isna()).all()
    # max over subtasks: the math targets find the math rows, the poem target finds the poem task
    assert (scored[scored.source == "gsm8k"].rds_subtask == "math").all()
    math_side = scored[scored.rds_subtask == "math"]
    assert (math_side.head(int((scored.source == "gsm8k").sum())).source == "gsm8k").all()
    best = scored.iloc[0]
    assert best.source == "alpaca" and best.rds_subtask == "poems" and "poem" in best.prompt.lower()
    sel = pd.read_parquet("run/selected")
    assert len(sel) == 5 and set(sel.id) == set(scored.head(5).id)
    # every subtask's own score: its max is rds_score, its argmax rds_subtask; null where unscored
    for r in scored.itertuples():
        per = json.loads(r.rds_subtasks)
        assert set(per) == {"math", "poems"} and max(per.values()) == pytest.approx(r.rds_score, abs=1e-8)
        assert max(per, key=per.get) == r.rds_subtask
    assert ann[~ann.id.isin(scored.id)].rds_subtasks.isna().all()
    # balanced: the two subtasks take turns by their own scores (curate select on the finished run)
    assert run_cli("select", "run", "--policy", "targeted", "--param", "subtasks=balanced", "--rows", "4",
                   "--out", "balanced") == 0
    picked = scored[scored.id.isin(pd.read_parquet("balanced/selected").id)]
    by = {n: scored.assign(s=[json.loads(v)[n] for v in scored.rds_subtasks]).sort_values("s", ascending=False)
          for n in ("math", "poems")}
    assert len(picked) == 4 and {by["math"].id.iloc[0], by["poems"].id.iloc[0]} <= set(picked.id)
    report = open("run/report.html", encoding="utf-8").read()  # the top rows, the best one first
    section = report[report.index('id="targeted"'):report.index('id="clusters"')]
    assert section.index(best.id) < section.index(scored.iloc[1].id) and "rows matched best" in section
    # a rerun with another target set: the pool's vectors come from the cache, only targets change
    cfg2 = {**cfg, "output": "again", "targets": [{"source": "math", "path": targets}]}
    assert run_cli("run", write_job(job_dir, cfg2, "again.yaml")) == 0
    again = load_manifest("again")
    assert again["rds"]["model_rows"] == 0 and again["rds"]["cached_rows"] == 20
    assert again["rds"]["target_rows"] == {"model": 0, "cached": 6}
    ann2 = pd.read_parquet("again/annotated").set_index("id")
    math_rows = ann.set_index("id")
    math_rows = math_rows[math_rows.rds_subtask == "math"]
    assert np.allclose(ann2.loc[math_rows.index, "rds_score"], math_rows.rds_score, atol=1e-12)
    assert (pd.read_parquet("again/selected").source == "gsm8k").all()  # math targets only: math rows


def test_rds_needs_targets_and_a_bad_target_row_is_one_line(job_dir, capsys):
    base = {"output": "o", "inputs": [{"source": "g", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}],
            "embed": {"enabled": False}, "cluster": {"enabled": False}, "dedup": {"semantic": {"enabled": False}},
            "score": {"ifd": {"enabled": False}, "rds": {"enabled": True}}}
    assert run_cli("run", write_job(job_dir, base)) == 2
    assert "score.rds.enabled needs targets" in capsys.readouterr().err
    bad = _targets_file(job_dir, [{"instruction": "", "input": "", "output": "x"}])
    assert run_cli("run", write_job(job_dir, {**base, "targets": [{"source": "t", "path": bad}]})) == 2
    err = capsys.readouterr().err
    assert "targets (t): row 1 of" in err and "is not usable" in err and len(err.strip().splitlines()) == 1
    broken = job_dir / "broken.jsonl"
    broken.write_text('{"instruction": "Add 2 and 3.", "output": "5"}\n{"instruction": "no closing brace"\n')
    assert run_cli("run", write_job(job_dir, {**base, "targets": [{"source": "t", "path": str(broken)}]})) == 2
    err = capsys.readouterr().err
    assert "targets (t): row 2 of" in err and "cannot be read: malformed_json" in err


def test_a_subtask_none_of_whose_rows_fits_is_one_line_not_a_silent_loss(job_dir, capsys):
    math_rows = _targets_file(job_dir, [{"instruction": "What is 12 times 3?", "input": "", "output": "36"}])
    long = _targets_file(job_dir, [{"instruction": "Summarise: " + "the tide comes in and goes out. " * 60,
                                    "input": "", "output": "Tides."}], "long.jsonl")
    cfg = {"output": "o", "inputs": [{"source": "g", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}],
           "sample": {"mode": "head", "n": 2}, "embed": {"enabled": False}, "cluster": {"enabled": False},
           "dedup": {"semantic": {"enabled": False}},
           "targets": [{"source": "math", "path": math_rows}, {"source": "summaries", "path": long}],
           "score": {"ifd": {"enabled": False},
                     "rds": {"enabled": True, "max_length": 128, "cache_dir": str(job_dir / "rds")}}}
    assert run_cli("run", write_job(job_dir, cfg)) == 2
    err = capsys.readouterr().err
    assert "targets (summaries): no row could be scored (prompt_too_long 1)" in err
    assert len(err.strip().splitlines()) == 1 and not (job_dir / "o").exists()


def test_vectors_for_gives_statuses_not_zeros(monkeypatch):
    from curate.models import load_causal_lm

    model, tok = load_causal_lm()
    rows = [{"prompt": "What is 2 + 3?", "response": "2 + 3 = 5."},
            {"prompt": "Say nothing.", "response": ""},
            {"prompt": "word " * 300, "response": "ok"}]
    out = vectors_for(model, tok, rows, max_length=64, batch_size=2)
    assert [s for _, s in out] == ["ok", "empty_response", "prompt_too_long"]
    assert out[0][0] is not None and out[1][0] is None and out[2][0] is None
    monkeypatch.setattr("curate.scoring.rds.pooled_vectors", lambda *a, **k: 1 / 0)
    assert vectors_for(model, tok, rows[:1], 64, 2) == [(None, "error")]
