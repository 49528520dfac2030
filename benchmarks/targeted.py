"""Targeted selection quality on real data: can a score find the rows like a handful of targets?

Pool: 600 rows of Alpaca (Cherry 5%) and 100 rows of GSM8K train (14% math); targets: 20 other GSM8K
rows. For each score, the share of GSM8K rows among the top 5% and top 10% of the pool, and its wall
time (model load included): ``less_score`` (LESS with the job defaults: a LoRA warm-up on 5% of the
pool, then projected gradients; ``curate.scoring.less``), ``rds_score`` (RDS+, the weak LM's
mean-pooled hidden states, ``curate.scoring.rds``), the MiniLM embedding cosine (the embed stage's
model) with the same aggregation, and a seeded random order. ``--quick``: 60 + 12 rows, 6 targets,
LESS at max_length 160.
"""
from __future__ import annotations

import functools
import json
import time

import numpy as np

from benchmarks.common import emit, shared
from curate.scoring.rds import match, subtask_matrix


def _rows(name: str) -> list[dict]:
    with open(shared(name), encoding="utf-8") as fh:
        return [{"prompt": r["instruction"] + ("\n\n" + r["input"] if r.get("input", "").strip() else ""),
                 "response": r["output"]} for r in json.load(fh)]


def _scores_from_vectors(pool_vecs, target_vecs) -> np.ndarray:
    names, matrix = subtask_matrix([("target", v) for v in target_vecs if v is not None])
    return np.array([match(v, names, matrix)[0] for v in pool_vecs])


def rds(pool, targets) -> np.ndarray:
    from curate.models import load_causal_lm
    from curate.scoring.rds import vectors_for
    from curate.settings import RDS

    model, tok = load_causal_lm()
    s = RDS()
    pool_vecs = [v for v, _ in vectors_for(model, tok, pool, s.max_length, s.batch_size)]
    target_vecs = [v for v, _ in vectors_for(model, tok, targets, s.max_length, s.batch_size)]
    return _scores_from_vectors(pool_vecs, target_vecs)


def less(pool, targets, max_length: int | None = None) -> np.ndarray:
    """The LESS stage's steps without Beam, with the job defaults (``curate.settings.LESS``) but for
    ``max_length`` when given (``--quick``: shorter rows, for a run of minutes on 2 cores)."""
    import dataclasses
    import tempfile

    from curate import lm_data
    from curate.models import load_causal_lm
    from curate.scoring import less as L
    from curate.scoring import less_warmup as W
    from curate.settings import LESS
    from pipelines.degradation import text_key
    from pipelines.less import default_proj_dim

    s = LESS() if max_length is None else dataclasses.replace(LESS(), max_length=max_length)
    model, tok = load_causal_lm()
    rows = W.sample(((text_key(r), r) for r in pool), s.warmup_fraction, s.warmup_min_rows, 0)
    with tempfile.TemporaryDirectory() as tmp:
        W.warm_up(model, tok, rows, f"{tmp}/warmup", r=s.lora_r, alpha=s.lora_alpha, dropout=s.lora_dropout,
                  lr=s.warmup_lr, epochs=s.warmup_epochs, batch_size=s.warmup_batch_size,
                  max_length=s.max_length, seed=0)
        ckpts = W.checkpoints(f"{tmp}/warmup")
        peft = W.peft_model(load_causal_lm()[0], s.lora_r, s.lora_alpha, s.lora_dropout, 0).eval()  # as a worker
        proj = L.Projection(s.proj_dim or default_proj_dim("cpu"), s.seed)

        def feats(rows, kind):
            out = []
            for k in range(0, len(rows), s.bucket_rows):
                examples = [lm_data.encode(r, tok, s.max_length) for r in rows[k:k + s.bucket_rows]]
                out += L.features(peft, ckpts, examples, tok.pad_token_id or 0, proj, kind, s.batch_size)
            return out

        pool_vecs, target_vecs = feats(pool, "adam"), feats(targets, "sgd")
    names, matrix = L.subtask_matrix([("target", v) for v in target_vecs if v is not None],
                                     L.checkpoint_weights([c.lr for c in ckpts]))
    return np.array([match(v, names, matrix)[0] for v in pool_vecs])


def minilm(pool, targets) -> np.ndarray:
    from curate.embed import embed_text, encode, load_embedder

    model = load_embedder(None, "cpu", "float32", 256)
    vec = lambda rows: encode(model, [embed_text(r) for r in rows])  # noqa: E731
    return _scores_from_vectors(list(vec(pool)), list(vec(targets)))


def random_order(pool, targets) -> np.ndarray:
    from curate.select.scored import hash_keys

    return hash_keys([str(i) for i in range(len(pool))], 0)


def share_in_top(scores: np.ndarray, is_math: np.ndarray, fraction: float) -> float:
    k = max(int(round(fraction * len(scores))), 1)
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:k]
    return float(is_math[order].mean())


def run(quick: bool):
    n_alpaca, n_gsm, n_targets = (60, 12, 6) if quick else (600, 100, 20)
    alpaca, gsm = _rows("alpaca_cherry_5pct.json"), _rows("gsm8k_train.json")
    pool = alpaca[:n_alpaca] + gsm[:n_gsm]
    targets = gsm[-n_targets:]  # other GSM8K rows than the pool's
    is_math = np.array([0] * n_alpaca + [1] * n_gsm, dtype=float)
    scores_by = (("less_score", functools.partial(less, max_length=160 if quick else None)), ("rds_score", rds),
                 ("minilm_cosine", minilm), ("random", random_order))
    for name, fn in scores_by:
        t = time.perf_counter()
        scores = fn(pool, targets)
        wall = time.perf_counter() - t
        top5, top10 = share_in_top(scores, is_math, 0.05), share_in_top(scores, is_math, 0.10)
        emit("targeted", name, "math_share_top5pct", top5, "pool_share", float(is_math.mean()), n=len(pool),
             math_share_top10pct=round(top10, 4), targets=n_targets, wall_s=round(wall, 1),
             nan_scores=int(np.isnan(scores).sum()))
