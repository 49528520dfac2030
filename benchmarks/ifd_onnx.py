"""IFD + r-IFD with the transformer body run by ONNX Runtime, a candidate CPU path measured
against curate's float32 stage and the one-row reference loop: same rows, same token ids, same
batches, one run.

The model's body (``model.base_model``: embeddings, decoder layers, final norm) is exported once
to ONNX (TorchScript exporter, eager attention: the exporter has no grouped-query SDPA) and run
by ONNX Runtime's CPU provider with the stage's thread count; everything else is the stage's
own code (``score_rows``: batching, target-only vocabulary projection in torch). Cases:
ONNX Runtime float32, and ONNX Runtime with dynamically quantized int8 MatMuls
(``quantize_dynamic``, per-channel int8 weights, activations quantized per call). Reported:
rows/s of each beside the float32 stage and the reference loop, Spearman of ``ifd_loss`` and
``rifd_loss`` against the float32 stage, whether every status is unchanged, the largest NLL
difference, and the export's and quantization's seconds. Needs ``onnxruntime`` and ``onnx``
(``pip install onnxruntime onnx``); without them, says so and measures nothing.
"""
from __future__ import annotations

import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks.common import emit
from benchmarks.ifd import BUCKET, NLL_KEYS, SETTINGS, _nlls, _spearman, ifd_rows, reference, side_by_side
from curate import kernel_choice
from curate.models import load_causal_lm
from curate.scoring.ifd import score_rows


class _Body(torch.nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, input_ids):
        return self.body(input_ids=input_ids).last_hidden_state


def export_body(model, path: str) -> float:
    """Write ``model``'s body as ONNX (dynamic batch and length); returns the seconds it took."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        t = time.perf_counter()
        with torch.no_grad():
            torch.onnx.export(_Body(model.base_model).eval(), (torch.randint(0, 100, (2, 17)),), path,
                              dynamo=False, input_names=["input_ids"], output_names=["hidden"],
                              dynamic_axes={"input_ids": {0: "rows", 1: "tokens"}, "hidden": {0: "rows", 1: "tokens"}},
                              opset_version=17)
        return time.perf_counter() - t
    finally:
        model.set_attn_implementation(before)


class OrtModel:
    """The model as ``score_rows`` sees it, its body run by an ONNX Runtime session."""

    def __init__(self, model, session):
        self._model, self._session, self.config = model, session, model.config

    def base_model(self, input_ids):
        hidden = self._session.run(None, {"input_ids": input_ids.cpu().numpy()})[0]
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))

    def get_output_embeddings(self):
        return self._model.get_output_embeddings()

    def parameters(self):
        return self._model.parameters()


def session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the stage's
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def run(quick: bool):
    try:
        import onnx  # noqa: F401 - the exporter needs it
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        print("ifd_onnx: onnxruntime and onnx are not installed (pip install onnxruntime onnx); nothing measured")
        return
    n = 16 if quick else 200
    rows = ifd_rows(n)
    model, tok = load_causal_lm()
    with tempfile.TemporaryDirectory(prefix="curate-onnx-") as tmp:
        fp32_path, int8_path = os.path.join(tmp, "body.onnx"), os.path.join(tmp, "body_int8.onnx")
        export_s = export_body(model, fp32_path)  # before the kernel choice: torch's own linears export
        choice = kernel_choice.choose(lambda: kernel_choice.linear_shapes(model), "auto")
        kernel_choice.apply(model, choice.kernel)
        t = time.perf_counter()
        quantize_dynamic(fp32_path, int8_path, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=True,
                         weight_type=QuantType.QInt8)
        quant_s = time.perf_counter() - t
        ort_fp32, ort_int8 = OrtModel(model, session(fp32_path)), OrtModel(model, session(int8_path))
        cases = {"reference": reference,
                 "stage": lambda m, t, r: score_rows(m, t, r, SETTINGS),
                 "onnx_fp32": lambda m, t, r: score_rows(ort_fp32, t, r, SETTINGS),
                 "onnx_int8": lambda m, t, r: score_rows(ort_int8, t, r, SETTINGS)}
        for case in cases.values():  # warm-up
            case(model, tok, rows[:2])
        res = side_by_side(model, tok, rows, cases)
    stage, stage_s = res["stage"]
    ref_s = res["reference"][1]
    emit("ifd_onnx", f"stage_{choice.kernel}_fp32_vs_reference_loop", "rows_per_s", n / stage_s,
         "reference_one_sample_per_pass", n / ref_s, n=n)
    for name in ("onnx_fp32", "onnx_int8"):
        got, secs = res[name]
        emit("ifd_onnx", f"{name}_vs_stage_{choice.kernel}_fp32", "rows_per_s", n / secs, "stage_fp32", n / stage_s,
             n=n, vs_reference_loop=round(ref_s / secs, 3), threads=torch.get_num_threads(),
             ifd_loss_spearman=round(_spearman([r["ifd_loss"] for r in stage], [r["ifd_loss"] for r in got]), 4),
             rifd_loss_spearman=round(_spearman([r["rifd_loss"] for r in stage], [r["rifd_loss"] for r in got]), 4),
             statuses_unchanged=all(a["ifd_status"] == b["ifd_status"] and a["rifd_status"] == b["rifd_status"]
                                    for a, b in zip(stage, got)),
             max_abs_nll_diff=float(np.nanmax(np.abs(_nlls(got) - _nlls(stage)))),
             export_s=round(export_s, 1), quantize_s=round(quant_s, 1) if name == "onnx_int8" else None,
             bucket_rows=BUCKET, nll_keys=list(NLL_KEYS), timing="bucket by bucket, rotating which runs first")
