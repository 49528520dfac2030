"""IFD + r-IFD with llama.cpp's own kernels on the packaged GGUF, a candidate CPU path measured
against curate's float32 stage: same rows, same token ids, both scored here in one run.

llama.cpp (``llama-cpp-python``, which ``make test`` installs for the teacher-server tests) runs the
Q4_1 weights the float32 model is dequantized from, with its quantized dot products, one sequence
per call and logits for every position (``logits_all``); the NLLs of the target tokens are taken
from those logits. Reported: rows/s of both (llama.cpp's ``eval`` alone as well), Spearman of
``ifd_loss`` and ``rifd_loss`` against float32, the largest NLL difference. Needs
``llama-cpp-python``; without it, says so and measures nothing.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np
import torch

from benchmarks.common import emit
from benchmarks.ifd import SETTINGS, _spearman, ifd_rows
from curate import kernel_choice
from curate.models import _GGUF, DEFAULT_WEAK_LM, gguf_location, load_causal_lm
from curate.scoring.ifd import pairs_for, ratios, score_rows


def _llama_nll(llm, pair, spent: list) -> float:
    """Mean NLL of ``pair``'s target tokens from llama.cpp's logits (NaN where the stage gives none)."""
    if not pair.target or pair.status not in ("ok", "response_truncated"):
        return math.nan
    ids = pair.ids
    start = len(pair.prefix) + (1 if pair.skip_first else 0)
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    spent[0] += time.perf_counter() - t
    logits = torch.from_numpy(np.asarray(llm.scores[start - 1:len(ids) - 1], dtype=np.float64))  # j predicts j + 1
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[start:])))


def run(quick: bool):
    try:
        from llama_cpp import Llama
    except ImportError:
        print("ifd_llama: llama-cpp-python is not installed (make test installs it); nothing measured")
        return
    n = 16 if quick else 100
    rows = ifd_rows(n)
    model, tok = load_causal_lm()
    choice = kernel_choice.choose(lambda: kernel_choice.linear_shapes(model), "auto")
    kernel_choice.apply(model, choice.kernel)
    score_rows(model, tok, rows[:2], SETTINGS)  # warm-up
    t = time.perf_counter()
    ref = score_rows(model, tok, rows, SETTINGS)
    stage_s = time.perf_counter() - t

    folder, name = gguf_location(*_GGUF[DEFAULT_WEAK_LM])
    threads = torch.get_num_threads()  # the stage's
    llm = Llama(os.path.join(folder, name), n_ctx=2 * SETTINGS.max_length, n_batch=512, n_ubatch=512,
                n_threads=threads, logits_all=True, verbose=False)
    spent = [0.0]
    branches = pairs_for(rows, tok, SETTINGS)
    _llama_nll(llm, branches[0][0], [0.0])  # warm-up
    t = time.perf_counter()
    nll = [[_llama_nll(llm, p, spent) for p in pairs] for pairs in branches]
    llama_s = time.perf_counter() - t
    ifd = [ratios(c, d)[0] for c, d in zip(nll[0], nll[1])]
    rifd = [ratios(c, d)[0] for c, d in zip(nll[2], nll[3])]
    keys = ("ifd_nll_cond", "ifd_nll_direct", "rifd_nll_cond", "rifd_nll_direct")
    diff = max(np.nanmax(np.abs(np.array(v, float) - np.array([r[k] for r in ref], float))) for k, v in zip(keys, nll))
    emit("ifd_llama", "llama_cpp_gguf_vs_float32_stage", "rows_per_s", n / llama_s, f"stage_{choice.kernel}_fp32",
         n / stage_s, n=n, llama_eval_only_rows_per_s=round(n / spent[0], 4), threads=threads,
         ifd_loss_spearman=round(_spearman([r["ifd_loss"] for r in ref], ifd), 4),
         rifd_loss_spearman=round(_spearman([r["rifd_loss"] for r in ref], rifd), 4), max_abs_nll_diff=float(diff),
         note="llama.cpp: Q4_1 weights, one sequence per call, logits for every position")
    llm.close()
