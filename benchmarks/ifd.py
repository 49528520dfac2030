"""IFD scoring: curate's batched scorer vs the reference procedure, same rows, model and tokens.

Reference (Superfiltering ``code_ifd/data_analysis.py``, re-implemented from its description):
one sample per forward pass, two passes per sample (prompt + response with the prompt
masked, then the response alone), full-vocabulary logits and the model's own loss, on the
model as transformers loads it. It scores the same token sequences as curate
(``curate.scoring.ifd.pairs_for``), so the scores must agree.

Curate runs as the stage does on a CPU: rows in buckets of 128, both branches sorted by length
into forward batches of at most 1,024 padded tokens, the vocabulary projection only where a
response token is predicted and one cache-sized vocabulary slice at a time, and the linear
layers on oneDNN (``curate.onednn``). A second curate case keeps torch's own linear kernel,
to separate what the batching and the projection give from what the kernel gives.

All cases run bucket by bucket, the order rotating from bucket to bucket, so drift in the
machine's speed falls on all of them. Also: FLOPs per sample, the achieved fraction of this
machine's measured fp32 matmul peak (through both kernels), and bf16's speed and rank
correlation with fp32.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.common import emit, real_rows
from curate.settings import IFD as IFDStage
from curate.models import load_causal_lm
from curate.onednn import onednn_linear, use_onednn
from curate.scoring.ifd import IFDSettings, mean_nlls, pairs_for
from pipelines.score import default_batch_tokens

BUCKET = 128  # the stage's score.ifd.bucket_rows default
ROWS = IFDStage().batch_size  # the stage's defaults: rows and CPU tokens per pass
TOKENS = default_batch_tokens("cpu")


def reference_nll(model, pair) -> float:
    ids = torch.tensor([pair.ids])
    labels = ids.clone()
    labels[0, :len(pair.prefix) + (1 if pair.skip_first else 0)] = -100
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels).loss)


def reference(model, pairs) -> list[float]:
    return [reference_nll(model, p) for p in pairs]


def stage(model, pairs) -> list[float]:
    """One bucket as the stage scores it (both branches sorted by length together)."""
    return mean_nlls(model, pairs, batch_size=ROWS, pad_id=model.config.pad_token_id or 0, batch_tokens=TOKENS)


def stage_onednn(model, pairs) -> list[float]:
    use_onednn(model)
    try:
        return stage(model, pairs)
    finally:
        use_onednn(model, on=False)


def side_by_side(model, cond, direct, cases: dict) -> dict:
    """{case: (NLLs of cond then direct, seconds)}, bucket by bucket, rotating the order."""
    nll = {k: ([], []) for k in cases}
    secs = dict.fromkeys(cases, 0.0)
    names = list(cases)
    for k, b in enumerate(range(0, len(cond), BUCKET)):
        c, d = cond[b:b + BUCKET], direct[b:b + BUCKET]
        for name in names[k % len(names):] + names[:k % len(names)]:
            t = time.perf_counter()
            out = cases[name](model, c + d)
            secs[name] += time.perf_counter() - t
            nll[name][0].extend(out[:len(c)])
            nll[name][1].extend(out[len(c):])
    return {k: (nll[k][0] + nll[k][1], secs[k]) for k in cases}


def peak_gflops(fn, seconds: float = 2.0) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    fn(a, b)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn(a, b)
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
    stage_onednn(model, pairs[:4])  # warm-up
    res = side_by_side(model, cond, direct, {"reference": reference, "stage": stage_onednn,
                                              "stage_torch_linear": stage})
    ref, ref_s = res["reference"]
    ours, ours_s = res["stage"]
    diff = lambda a: float(np.nanmax(np.abs(np.array(a) - np.array(ref))))  # noqa: E731
    common = dict(n=n, passes_per_row=2, batch_rows=ROWS, batch_tokens=TOKENS, bucket_rows=BUCKET,
                  timing="bucket by bucket, rotating which runs first")
    emit("ifd", "stage_vs_reference_loop_fp32", "rows_per_s", n / ours_s, "reference_one_sample_per_pass",
         n / ref_s, max_abs_nll_diff=diff(ours), linear="onednn", **common)
    torch_s = res["stage_torch_linear"][1]
    emit("ifd", "stage_torch_linear_vs_reference_loop_fp32", "rows_per_s", n / torch_s,
         "reference_one_sample_per_pass", n / ref_s, max_abs_nll_diff=diff(res["stage_torch_linear"][0]),
         linear="torch (MKL sgemm)", **common)
    params = sum(p.numel() for p in model.parameters())
    vocab, hidden = model.get_output_embeddings().weight.shape
    body = params - vocab * hidden  # tied embedding counted once, as the projection
    tokens = sum(len(p.ids) for p in pairs)
    scored = sum(len(p.target) for p in pairs)
    ours_flops = 2 * body * tokens + 2 * vocab * hidden * scored
    ref_flops = 2 * body * tokens + 2 * vocab * hidden * tokens
    mkl_peak = peak_gflops(torch.mm)
    onednn_peak = peak_gflops(lambda a, b: onednn_linear(a, b))
    peak = max(mkl_peak, onednn_peak)
    emit("ifd", "flops", "gflop_per_row", ours_flops / n / 1e9, "reference", ref_flops / n / 1e9, n=n,
         higher_is_better=False, achieved_gflops=round(ours_flops / ours_s / 1e9, 1),
         torch_linear_achieved_gflops=round(ours_flops / torch_s / 1e9, 1),
         reference_achieved_gflops=round(ref_flops / ref_s / 1e9, 1),
         matmul_peak_gflops_torch_mm=round(mkl_peak, 1), matmul_peak_gflops_onednn=round(onednn_peak, 1),
         achieved_fraction=round(ours_flops / ours_s / 1e9 / peak, 3),
         torch_linear_achieved_fraction=round(ours_flops / torch_s / 1e9 / peak, 3),
         reference_achieved_fraction=round(ref_flops / ref_s / 1e9 / peak, 3),
         ceiling_ratio_from_skipped_work=round(ref_flops / ours_flops, 3),
         note="2 x parameters x tokens, plus the vocabulary projection (all tokens for the reference); "
              "fractions are of the faster kernel's 1024x1024 matmul rate")
    bf16 = model.to(torch.bfloat16)  # torch runs bf16 matmuls on oneDNN already
    t = time.perf_counter()
    low = []
    for b in range(0, n, BUCKET):
        c, d = cond[b:b + BUCKET], direct[b:b + BUCKET]
        out = stage(bf16, c + d)
        low.append((out[:len(c)], out[len(c):]))
    bf16_s = time.perf_counter() - t
    low_c = [x for c, _ in low for x in c]
    low_d = [x for _, d in low for x in d]
    ifd32 = np.array(ours[:n]) / np.array(ours[n:])
    ifd16 = np.array(low_c) / np.array(low_d)
    emit("ifd", "bf16_vs_fp32_cpu", "rows_per_s", n / bf16_s, "fp32", n / ours_s, n=n,
         ifd_loss_spearman=round(_spearman(ifd32, ifd16), 4),
         ifd_loss_max_abs_diff=round(float(np.max(np.abs(ifd32 - ifd16))), 4))
