"""The IFD stage in the real job: columns for every scored row, statuses and shares in the manifest,
and a rerun that takes its scores from the cache without running the model."""
import math

import pandas as pd

from curate.onednn import problem
from tests.conftest import EXAMPLES, load_manifest, run_cli, write_job


def test_scores_written_then_reused_from_the_cache(job_dir):
    cfg = {"inputs": [{"source": "a", "path": f"{EXAMPLES}/alpaca_cherry_sample.json"},
                      {"source": "g", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}],
           "sample": {"mode": "head", "n": 8}, "dedup": {"near": {"enabled": False}},
           "score": {"ifd": {"cache_dir": str(job_dir / "cache"), "batch_size": 4}}}
    assert run_cli("run", write_job(job_dir, {**cfg, "output": "first"}, "first.yaml")) == 0
    first = load_manifest("first")
    assert first["score"]["model_rows"] == 16 and first["score"]["cached_rows"] == 0
    assert first["score"]["ifd_status_share"] == {"ok": 1.0} and 0 <= first["score"]["ifd_ge_1_share"] <= 1
    # the CPU path: oneDNN linears where this torch has them, about a thousand tokens per forward pass
    assert first["score"]["linear"] == ("torch" if problem("cpu", "float32") else "onednn")
    assert first["score"]["batch_tokens"] == 1024
    ann = pd.read_parquet("first/annotated").set_index("id").sort_index()
    assert ann.ifd_loss.notna().all() and (ann.ifd_status == "ok").all()
    assert (ann.ifd_tokens == ann.ifd_tokens_direct).all()
    for _, r in ann.iterrows():
        assert math.isclose(r.ifd_loss, r.ifd_nll_cond / r.ifd_nll_direct, rel_tol=1e-12)
        assert math.isclose(r.ifd_ppl, math.exp(r.ifd_nll_cond - r.ifd_nll_direct), rel_tol=1e-12)
    assert run_cli("run", write_job(job_dir, {**cfg, "output": "again"}, "again.yaml")) == 0
    again = load_manifest("again")
    assert again["score"]["model_rows"] == 0 and again["score"]["cached_rows"] == 16  # the model never ran
    ann2 = pd.read_parquet("again/annotated").set_index("id").sort_index()
    cols = ["ifd_nll_cond", "ifd_nll_direct", "ifd_loss", "ifd_ppl", "rifd", "rifd_loss"]
    assert ann[cols].equals(ann2[cols])
    # another template is another cache entry: computed afresh
    other = {**cfg, "output": "other", "score": {"ifd": {**cfg["score"]["ifd"], "template": "alpaca"}}}
    assert run_cli("run", write_job(job_dir, other, "other.yaml")) == 0
    assert load_manifest("other")["score"]["model_rows"] == 16
