"""IFD + r-IFD with the transformer body compiled by ``torch.compile`` (inductor's CPU code:
fused norms, rotary, activations and softmax around the GEMMs), a candidate CPU path measured
against curate's float32 stage and the one-row reference loop: same rows, same token ids, same
batches, one run.

Only the body (``model.base_model``) is compiled, with dynamic shapes (the stage's batches vary
in rows and length); everything else is the stage's own code. Reported: rows/s beside the stage
and the reference loop, the seconds spent compiling (the warm-up's first batches), Spearman of
``ifd_loss`` and ``rifd_loss`` against the stage, whether every status is unchanged and the
largest NLL difference.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.common import emit
from benchmarks.ifd import BUCKET, NLL_KEYS, SETTINGS, _nlls, _spearman, ifd_rows, reference, side_by_side
from curate import kernel_choice
from curate.models import load_causal_lm
from curate.scoring.ifd import score_rows


class CompiledModel:
    """The model as ``score_rows`` sees it, its body compiled."""

    def __init__(self, model):
        self._model, self.config = model, model.config
        self.base_model = torch.compile(model.base_model, dynamic=True)

    def get_output_embeddings(self):
        return self._model.get_output_embeddings()

    def parameters(self):
        return self._model.parameters()


def run(quick: bool):
    n = 16 if quick else 200
    rows = ifd_rows(n)
    model, tok = load_causal_lm()
    choice = kernel_choice.choose(lambda: kernel_choice.linear_shapes(model), "auto")
    kernel_choice.apply(model, choice.kernel)
    compiled = CompiledModel(model)
    cases = {"reference": reference,
             "stage": lambda m, t, r: score_rows(m, t, r, SETTINGS),
             "compiled": lambda m, t, r: score_rows(compiled, t, r, SETTINGS)}
    t = time.perf_counter()
    score_rows(compiled, tok, rows[:8], SETTINGS)  # compiles: the first shapes, then dynamic ones
    compile_s = time.perf_counter() - t
    for case in cases.values():  # warm-up
        case(model, tok, rows[:2])
    res = side_by_side(model, tok, rows, cases)
    stage, stage_s = res["stage"]
    ref_s = res["reference"][1]
    got, secs = res["compiled"]
    emit("ifd_compile", f"stage_{choice.kernel}_fp32_vs_reference_loop", "rows_per_s", n / stage_s,
         "reference_one_sample_per_pass", n / ref_s, n=n)
    emit("ifd_compile", f"compiled_vs_stage_{choice.kernel}_fp32", "rows_per_s", n / secs, "stage_fp32", n / stage_s,
         n=n, vs_reference_loop=round(ref_s / secs, 3), threads=torch.get_num_threads(), compile_s=round(compile_s, 1),
         ifd_loss_spearman=round(_spearman([r["ifd_loss"] for r in stage], [r["ifd_loss"] for r in got]), 4),
         rifd_loss_spearman=round(_spearman([r["rifd_loss"] for r in stage], [r["rifd_loss"] for r in got]), 4),
         statuses_unchanged=all(a["ifd_status"] == b["ifd_status"] and a["rifd_status"] == b["rifd_status"]
                                for a, b in zip(stage, got)),
         max_abs_nll_diff=float(np.nanmax(np.abs(_nlls(got) - _nlls(stage)))),
         bucket_rows=BUCKET, nll_keys=list(NLL_KEYS), timing="bucket by bucket, rotating which runs first")
