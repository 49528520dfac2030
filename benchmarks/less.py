"""LESS feature speed: the stage's batched per-example gradients and bucketed projection against a
one-row-at-a-time loop like the reference's (``less/data_selection/collect_grad_reps.py``), on the
same real rows and the same warm-up checkpoint.

The reference loop, as it runs: per row, the model's own loss over every position's logits
(``model(input_ids, labels=...)``), ``loss.backward()``, the LoRA ``.grad``s concatenated, the
Adam feature, and every 16 rows (``project_interval``) a projection whose ±1 matrix TRAK's
BasicProjector regenerates block by block (128 columns, ``torch.Generator`` + ``bernoulli_``) at
each call. Ours: ``curate.scoring.less.features`` on buckets of ``bucket_rows`` rows. Both
project to the same dimension. Lines: rows/s per checkpoint of each (the cost model), their
ratio, projection seconds per row of each, and the largest difference between the two ways'
gradients relative to the largest gradient. ``--quick``: 24 rows at 2048 dimensions; the full
run adds 8192 (LESS's dimension) on 64 rows.
"""
from __future__ import annotations

import math
import tempfile
import time

import torch

from benchmarks.common import emit, real_rows, spread


def _reference_projector(grads, dim: int, seed: int = 0, block: int = 128):
    """TRAK BasicProjector's way: each call regenerates every ±1 block of the matrix."""
    out = torch.empty((grads.shape[0], dim))
    gen = torch.Generator()
    for i in range(math.ceil(dim / block)):
        gen.manual_seed(seed + 1000 * i)
        width = min(block, dim - i * block)
        r = torch.empty((grads.shape[1], width)).bernoulli_(0.5, generator=gen).mul_(2).sub_(1)
        out[:, i * block:i * block + width] = grads @ r
    return out


def reference_loop(model, ckpt, examples, pad_id: int, dim: int, interval: int = 16):
    """(features, gradients, seconds in projection) the reference's way (see the module docstring)."""
    from curate import lm_data
    from curate.scoring.less import adam_direction, lora_parameters

    ckpt.load_into(model)
    m, v = ckpt.moments()
    params = [p for _, p in lora_parameters(model)]
    feats, grads, pending, proj_s = [], [], [], 0.0

    def flush():
        nonlocal proj_s
        t = time.perf_counter()
        feats.append(torch.nn.functional.normalize(_reference_projector(torch.stack(pending), dim), dim=1))
        proj_s += time.perf_counter() - t
        pending.clear()

    for e in examples:
        ids, labels, mask = lm_data.batch_tensors([e], pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        g = torch.cat([p.grad.flatten() for p in params])
        model.zero_grad(set_to_none=True)
        grads.append(g)
        pending.append(adam_direction(g, m, v, ckpt.betas, ckpt.eps))
        if len(pending) == interval:
            flush()
    if pending:
        flush()
    return torch.cat(feats), torch.stack(grads), proj_s


def run(quick: bool):
    from curate import lm_data
    from curate.models import load_causal_lm
    from curate.scoring import less as L
    from curate.scoring import less_warmup as W
    from curate.settings import LESS

    s = LESS()
    rows = [{"prompt": r["instruction"] + ("\n\n" + r["input"] if r.get("input", "").strip() else ""),
             "response": r["output"]} for r in spread(real_rows(), 24 if quick else 64)]
    model, tok = load_causal_lm()
    pad = tok.pad_token_id or 0
    examples = [e for e in (lm_data.encode(r, tok, s.max_length) for r in rows) if lm_data.usable(e)]
    with tempfile.TemporaryDirectory() as tmp:
        W.warm_up(model, tok, rows[:16], f"{tmp}/w", r=s.lora_r, alpha=s.lora_alpha, dropout=s.lora_dropout,
                  lr=s.warmup_lr, epochs=1, batch_size=s.warmup_batch_size, max_length=s.max_length, seed=0)
        ckpt = W.checkpoints(f"{tmp}/w")[0]
        peft = W.peft_model(load_causal_lm()[0], s.lora_r, s.lora_alpha, s.lora_dropout, 0).eval()
        n = len(examples)
        L.features(peft, [ckpt], examples[:2], pad, L.Projection(256), "adam", s.batch_size)  # warm up kernels
        for dim in (2048,) if quick else (2048, 8192):
            proj = L.Projection(dim)
            t = time.perf_counter()
            ours = []
            for k in range(0, n, s.bucket_rows):
                ours += L.features(peft, [ckpt], examples[k:k + s.bucket_rows], pad, proj, "adam", s.batch_size)
            ours_s = time.perf_counter() - t
            t = time.perf_counter()
            _, ref_grads, ref_proj_s = reference_loop(peft, ckpt, examples, pad, dim)
            ref_s = time.perf_counter() - t
            index, grads = L.example_grads(peft, examples, pad, s.batch_size)
            grads = grads[[index.index(i) for i in range(n)]]
            rel = float((grads - ref_grads).abs().max() / ref_grads.abs().max())
            x = torch.randn(2 * s.bucket_rows, grads.shape[1])  # one bucket of two checkpoints' gradients
            t = time.perf_counter()
            L.project(x, proj)
            ours_proj = (time.perf_counter() - t) / len(x)
            emit("less", f"features_vs_reference_loop_dim{dim}", "rows_per_s_per_checkpoint", n / ours_s,
                 "reference_loop", n / ref_s, n=n, bucket_rows=s.bucket_rows, batch_size=s.batch_size,
                 lora_params=int(grads.shape[1]), max_grad_diff_rel=f"{rel:.2e}")
            emit("less", f"projection_dim{dim}", "s_per_row", ours_proj, "reference_projector",
                 ref_proj_s / n, n=len(x), higher_is_better=False)
