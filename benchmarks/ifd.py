"""IFD + r-IFD scoring: curate's stage vs the reference procedure, same rows, model and tokens.

Reference (Superfiltering ``code_ifd/data_analysis.py`` and Selective Reflection-Tuning's r-IFD,
re-implemented from their description): one sample per forward pass, four passes per row
(prompt + response with the prompt masked, the response alone, the reverse prompt + instruction,
the instruction alone), full-vocabulary logits and the model's own loss, on the model as
transformers loads it. It scores the same token sequences as curate
(``curate.scoring.ifd.pairs_for``), so the scores must agree.

Curate runs as the stage does on a CPU (``curate.scoring.ifd.score_rows``, tokenizing included):
buckets of 128 rows, all four branches sorted by length into forward batches of at most 1,024
padded tokens, the vocabulary projection only where a target token is predicted, one
cache-sized vocabulary slice at a time. It runs twice, once per float32 linear kernel (torch's
MKL sgemm and oneDNN): the line ``linear_kernel_choice`` says which one ``curate.kernel_choice``
picks on this CPU from its short measurement on the model's shapes, and the two stage lines show
whether that pick was the faster one for the whole stage.

All cases run bucket by bucket, the order rotating from bucket to bucket, so drift in the
machine's speed falls on all of them. Also: FLOPs per row and the achieved GFLOP/s, and bf16's
speed and rank agreement with float32 (Spearman of ``ifd_loss`` and ``rifd``, statuses). On a CPU
without native bf16 (no AVX512-BF16 or AMX) bf16 runs at a fraction of float32's speed, so
there it is measured on a few rows only.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from benchmarks.common import emit, real_rows, spread
from curate import kernel_choice
from curate.models import load_causal_lm
from curate.onednn import use_onednn
from curate.scoring.ifd import IFDSettings, pairs_for, score_rows
from curate.settings import IFD as IFDStage
from pipelines.score import default_batch_tokens

BUCKET = IFDStage().bucket_rows  # the stage's defaults: rows per bucket, rows and CPU tokens per pass
SETTINGS = IFDSettings(max_length=IFDStage().max_length, batch_size=IFDStage().batch_size,
                       batch_tokens=default_batch_tokens("cpu"))
NLL_KEYS = ("ifd_nll_cond", "ifd_nll_direct", "rifd_nll_cond", "rifd_nll_direct")


def ifd_rows(n: int) -> list[dict]:
    """``n`` real rows (instruction, input, output), the same ones every run."""
    return [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
            for r in spread(real_rows(), n)]


def reference_nll(model, pair) -> float:
    if not pair.target or pair.status not in ("ok", "response_truncated"):
        return math.nan
    ids = torch.tensor([pair.ids])
    labels = ids.clone()
    labels[0, :len(pair.prefix) + (1 if pair.skip_first else 0)] = -100
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels).loss)


def reference(model, tok, rows) -> list[dict]:
    branches = pairs_for(rows, tok, SETTINGS)
    nll = [[reference_nll(model, p) for p in pairs] for pairs in branches]
    return [dict(zip(NLL_KEYS, values)) for values in zip(*nll)]


def stage_on(kernel: str):
    def stage(model, tok, rows) -> list[dict]:
        switched = use_onednn(model) if kernel == "onednn" else 0
        try:
            return score_rows(model, tok, rows, SETTINGS)
        finally:
            if switched:
                use_onednn(model, on=False)
    return stage


def side_by_side(model, tok, rows, cases: dict) -> dict:
    """{case: (score dicts, seconds)}, bucket by bucket, rotating the order."""
    out = {k: [] for k in cases}
    secs = dict.fromkeys(cases, 0.0)
    names = list(cases)
    for k, b in enumerate(range(0, len(rows), BUCKET)):
        bucket = rows[b:b + BUCKET]
        for name in names[k % len(names):] + names[:k % len(names)]:
            t = time.perf_counter()
            out[name].extend(cases[name](model, tok, bucket))
            secs[name] += time.perf_counter() - t
    return {k: (out[k], secs[k]) for k in cases}


def _spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    rx, ry = np.argsort(np.argsort(x[ok])), np.argsort(np.argsort(y[ok]))
    return float(np.corrcoef(rx, ry)[0, 1])


def _nlls(scores: list[dict]) -> np.ndarray:
    return np.array([[s[k] for k in NLL_KEYS] for s in scores], dtype=float)


def run(quick: bool):
    n = 16 if quick else 400
    model, tok = load_causal_lm()
    rows = ifd_rows(n)
    shapes = kernel_choice.linear_shapes(model)
    choice = kernel_choice.choose(lambda: shapes, "auto")
    rates, failed = kernel_choice.measure(shapes)  # measured again here, to print both beside the stage
    other = next(k for k in kernel_choice.KERNELS if k != choice.kernel)
    emit("ifd", "linear_kernel_choice", "gflops_on_model_shapes", rates.get(choice.kernel, 0.0), other,
         rates.get(other), chosen=choice.kernel, how=choice.how, chooser_gflops=choice.gflops,
         failed=failed or None, note="curate.kernel_choice: the faster float32 kernel on this CPU, "
                                     "measured on the model's own linear shapes")
    cases = {"reference": reference, choice.kernel: stage_on(choice.kernel)}
    if other not in failed:
        cases[other] = stage_on(other)
    for case in cases.values():  # warm-up: first calls build kernels and caches
        case(model, tok, rows[:2])
    res = side_by_side(model, tok, rows, cases)
    ref, ref_s = res["reference"]
    ref_nll = _nlls(ref)
    common = dict(n=n, passes_per_row=4, batch_rows=SETTINGS.batch_size, batch_tokens=SETTINGS.batch_tokens,
                  bucket_rows=BUCKET, timing="bucket by bucket, rotating which runs first")
    for kernel in [k for k in (choice.kernel, other) if k in res]:
        got, secs = res[kernel]
        emit("ifd", f"stage_{kernel}_linear_vs_reference_loop_fp32", "rows_per_s", n / secs,
             "reference_one_sample_per_pass", n / ref_s, linear=kernel, chosen=kernel == choice.kernel,
             max_abs_nll_diff=float(np.nanmax(np.abs(_nlls(got) - ref_nll))), **common)
    if other in res:
        emit("ifd", "chosen_kernel_vs_other_kernel_stage", "rows_per_s", n / res[choice.kernel][1], other,
             n / res[other][1], n=n, chosen=choice.kernel, note="ratio above 1: the chooser picked the faster one")
    fp32, fp32_s = res[choice.kernel]

    params = sum(p.numel() for p in model.parameters())
    vocab, hidden = model.get_output_embeddings().weight.shape
    body = params - vocab * hidden  # tied embedding counted once, as the projection
    branches = pairs_for(rows, tok, SETTINGS)
    tokens = sum(len(p.ids) for pairs in branches for p in pairs)
    scored = sum(len(p.target) for pairs in branches for p in pairs)
    ours_flops = 2 * body * tokens + 2 * vocab * hidden * scored
    ref_flops = 2 * body * tokens + 2 * vocab * hidden * tokens
    emit("ifd", "flops", "gflop_per_row", ours_flops / n / 1e9, "reference", ref_flops / n / 1e9, n=n,
         higher_is_better=False, achieved_gflops=round(ours_flops / fp32_s / 1e9, 1),
         reference_achieved_gflops=round(ref_flops / ref_s / 1e9, 1), kernel_gflops=rates,
         ceiling_ratio_from_skipped_work=round(ref_flops / ours_flops, 3),
         note="2 x parameters x tokens, plus the vocabulary projection (all tokens for the reference)")

    m = n if kernel_choice.native_bf16() else min(n, 4)
    bf16 = model.to(torch.bfloat16)  # torch runs bf16 matmuls on oneDNN already
    t = time.perf_counter()
    low = [s for b in range(0, m, BUCKET) for s in score_rows(bf16, tok, rows[b:min(b + BUCKET, m)], SETTINGS)]
    bf16_s = time.perf_counter() - t
    same_status = all(a["ifd_status"] == b["ifd_status"] and a["rifd_status"] == b["rifd_status"]
                      for a, b in zip(low, fp32))
    emit("ifd", "bf16_vs_fp32_cpu", "rows_per_s", m / bf16_s, "fp32", n / fp32_s, n=m,
         native_bf16=kernel_choice.native_bf16(), statuses_unchanged=same_status,
         ifd_loss_spearman=round(_spearman([s["ifd_loss"] for s in fp32[:m]], [s["ifd_loss"] for s in low]), 4),
         rifd_spearman=round(_spearman([s["rifd"] for s in fp32[:m]], [s["rifd"] for s in low]), 4),
         ifd_loss_max_abs_diff=round(float(np.nanmax(np.abs(np.array([s["ifd_loss"] for s in fp32[:m]], float)
                                                            - np.array([s["ifd_loss"] for s in low], float)))), 4),
         note="without native bf16 (AVX512-BF16 or AMX) only a few rows are measured" if m < n else None)
