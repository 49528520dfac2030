"""IFD scoring: curate's batched scorer vs the reference procedure, same rows, model and tokens.

Reference (Superfiltering ``code_ifd/data_analysis.py``, re-implemented from its description):
one sample per forward pass, two passes per sample (prompt + response with the prompt
masked, then the response alone), full-vocabulary logits and the model's own loss. It
scores the same token sequences as curate (``curate.scoring.ifd.pairs_for``), so the
scores must agree; the speed difference is the work curate does not waste (vocabulary
projection only where a response token is predicted, no padding). Two curate cases: the
stage's path (rows in buckets of 128, sorted by length into forward batches of 8) and one row
per forward pass (only the projection saving). The FLOP count bounds what skipping work can give.
Also: bf16 speed and its rank correlation with fp32, FLOPs per sample, and the
fraction of this machine's measured fp32 matmul throughput.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.common import emit, real_rows
from curate.models import load_causal_lm
from curate.scoring.ifd import IFDSettings, mean_nlls, pairs_for


def reference_nll(model, pair) -> float:
    ids = torch.tensor([pair.ids])
    labels = ids.clone()
    labels[0, :len(pair.prefix) + (1 if pair.skip_first else 0)] = -100
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels).loss)


BUCKET = 128  # the stage's score.ifd.bucket_rows default


def stage_nlls(model, cond, direct, pad_id, batch_size: int = 8) -> list[float]:
    """As the stage scores: ``BUCKET`` rows at a time, both branches sorted by length together."""
    out_c, out_d = [], []
    for b in range(0, len(cond), BUCKET):
        c, d = cond[b:b + BUCKET], direct[b:b + BUCKET]
        nll = mean_nlls(model, c + d, batch_size=batch_size, pad_id=pad_id)
        out_c += nll[:len(c)]
        out_d += nll[len(c):]
    return out_c + out_d


def matmul_gflops(seconds: float = 2.0) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        n += 1
    return 2 * 1024 ** 3 * n / (time.perf_counter() - t) / 1e9


def _spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def run(quick: bool):
    n = 40 if quick else 500
    model, tok = load_causal_lm()
    rows = [r for r in real_rows()[::7]][:n]
    cond, direct, _, _ = pairs_for(rows, tok, IFDSettings(max_length=1024))
    pairs = cond + direct
    mean_nlls(model, pairs[:4], batch_size=4)  # warm-up
    t = time.perf_counter()
    ref = [reference_nll(model, p) for p in pairs]
    ref_s = time.perf_counter() - t
    # the stage's path: rows in buckets of bucket_rows, each sorted by length into forward batches of 8
    t = time.perf_counter()
    ours = stage_nlls(model, cond, direct, tok.pad_token_id)
    ours_s = time.perf_counter() - t
    diff = float(np.nanmax(np.abs(np.array(ours) - np.array(ref))))
    emit("ifd", "stage_vs_reference_loop_fp32", "rows_per_s", n / ours_s, "reference_one_sample_per_pass",
         n / ref_s, n=n, max_abs_nll_diff=diff, passes_per_row=2, forward_batch=8, bucket_rows=BUCKET)
    # the same work one row per forward pass: what the projection saving alone gives
    t = time.perf_counter()
    single = mean_nlls(model, pairs, batch_size=1, pad_id=tok.pad_token_id)
    single_s = time.perf_counter() - t
    emit("ifd", "one_row_per_pass_vs_reference_loop_fp32", "rows_per_s", n / single_s,
         "reference_one_sample_per_pass", n / ref_s, n=n,
         max_abs_nll_diff=float(np.nanmax(np.abs(np.array(single) - np.array(ref)))), passes_per_row=2,
         forward_batch=1)
    params = sum(p.numel() for p in model.parameters())
    vocab, hidden = model.get_output_embeddings().weight.shape
    body = params - vocab * hidden  # tied embedding counted once, as the projection
    tokens = sum(len(p.ids) for p in pairs)
    scored = sum(len(p.target) for p in pairs)
    ours_flops = 2 * body * tokens + 2 * vocab * hidden * scored
    ref_flops = 2 * body * tokens + 2 * vocab * hidden * tokens
    peak = matmul_gflops()
    emit("ifd", "flops", "gflop_per_row", ours_flops / n / 1e9, "reference", ref_flops / n / 1e9, n=n,
         higher_is_better=False, achieved_gflops=round(ours_flops / ours_s / 1e9, 1),
         reference_achieved_gflops=round(ref_flops / ref_s / 1e9, 1),
         matmul_peak_gflops=round(peak, 1), achieved_fraction=round(ours_flops / ours_s / 1e9 / peak, 3),
         reference_achieved_fraction=round(ref_flops / ref_s / 1e9 / peak, 3),
         ceiling_ratio_at_equal_efficiency=round(ref_flops / ours_flops, 3),
         note="2 x parameters x tokens, plus the vocabulary projection (all tokens for the reference); "
              "the ceiling is what skipping work can give when both run at the same matmul efficiency")
    bf16 = model.to(torch.bfloat16)
    t = time.perf_counter()
    low = stage_nlls(bf16, cond, direct, tok.pad_token_id)
    bf16_s = time.perf_counter() - t
    ifd32 = np.array(ours[:n]) / np.array(ours[n:])
    ifd16 = np.array(low[:n]) / np.array(low[n:])
    emit("ifd", "bf16_vs_fp32_cpu", "rows_per_s", n / bf16_s, "fp32", n / ours_s, n=n,
         ifd_loss_spearman=round(_spearman(ifd32, ifd16), 4),
         ifd_loss_max_abs_diff=round(float(np.max(np.abs(ifd32 - ifd16))), 4))
