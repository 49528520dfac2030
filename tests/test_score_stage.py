"""The IFD stage in the real job: columns for every scored row, statuses and shares in the manifest,
and a rerun that takes its scores from the cache without running the model."""
import math
import os

import pandas as pd

from curate.onednn import problem
from tests.conftest import EXAMPLES, load_manifest, run_cli, write_job


def test_scores_written_then_reused_from_the_cache(job_dir):
    cfg = {"inputs": [{"source": "a", "path": f"{EXAMPLES}/alpaca_cherry_sample.json"},
                      {"source": "g", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}],
           "sample": {"mode": "head", "n": 4}, "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
           "embed": {"enabled": False}, "cluster": {"enabled": False},  # this test is about the scores
           "score": {"ifd": {"cache_dir": str(job_dir / "cache"), "batch_size": 4, "max_length": 320}}}
    assert run_cli("run", write_job(job_dir, {**cfg, "output": "first"}, "first.yaml")) == 0
    first = load_manifest("first")
    assert first["score"]["model_rows"] == 8 and first["score"]["cached_rows"] == 0
    # max_length 320 keeps the test short and cuts one long response (alpaca's second row, 265
    # response tokens left): scored, with its status
    assert first["score"]["ifd_status_share"] == {"ok": 0.875, "response_truncated": 0.125}
    assert 0 <= first["score"]["ifd_ge_1_share"] <= 1
    # the CPU path: the linear kernel measured on this CPU (or read from that measurement), about a
    # thousand tokens per forward pass
    choice = first["score"]["linear_choice"]
    assert first["score"]["linear"] == choice["kernel"] and choice["how"] in ("measured", "cached")
    if not problem("cpu", "float32"):
        assert set(choice["gflops"]) == {"torch", "onednn"}
        assert choice["kernel"] == max(choice["gflops"], key=choice["gflops"].get)
    assert first["score"]["batch_tokens"] == 1024
    ann = pd.read_parquet("first/annotated").set_index("id").sort_index()
    assert ann.ifd_loss.notna().all() and set(ann.ifd_status) == {"ok", "response_truncated"}
    assert (ann.ifd_tokens == ann.ifd_tokens_direct).all()
    for _, r in ann.iterrows():
        assert math.isclose(r.ifd_loss, r.ifd_nll_cond / r.ifd_nll_direct, rel_tol=1e-12)
        assert math.isclose(r.ifd_ppl, math.exp(r.ifd_nll_cond - r.ifd_nll_direct), rel_tol=1e-12)
    assert run_cli("run", write_job(job_dir, {**cfg, "output": "again"}, "again.yaml")) == 0
    again = load_manifest("again")
    assert again["score"]["model_rows"] == 0 and again["score"]["cached_rows"] == 8  # the model never ran
    # measured once per CPU, torch and shapes; again if the first measurement met busy cores (not kept)
    assert again["score"]["linear_choice"]["how"] == ("measured" if "cpu_share" in choice else "cached")
    ann2 = pd.read_parquet("again/annotated").set_index("id").sort_index()
    cols = ["ifd_nll_cond", "ifd_nll_direct", "ifd_loss", "ifd_ppl", "rifd", "rifd_loss"]
    assert ann[cols].equals(ann2[cols])
    # another template is another cache entry: computed afresh (two rows per source are enough to show it)
    other = {**cfg, "output": "other", "sample": {"mode": "head", "n": 2},
             "score": {"ifd": {**cfg["score"]["ifd"], "template": "alpaca"}}}  # a dict: the job file
    assert run_cli("run", write_job(job_dir, other, "other.yaml")) == 0
    assert load_manifest("other")["score"]["model_rows"] == 4


def _fake_scorer(monkeypatch, **kw):
    import pipelines.score
    from tests.fakes import FakeIFDHandler

    monkeypatch.setattr(pipelines.score, "IFDHandler", lambda p, rt: FakeIFDHandler(p, rt, **kw))


def _fast_job(job_dir, n=30, **select):
    return {"inputs": [{"source": "g", "path": f"{EXAMPLES}/gsm8k_sample.jsonl"}],
            "sample": {"mode": "head", "n": n}, "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
            "embed": {"enabled": False}, "cluster": {"enabled": False},
            "score": {"ifd": {"cache_dir": str(job_dir / "cache")}},
            "select": select or {"policy": "all"}}


def test_rows_with_ifd_ge_1_are_counted_and_the_manifest_is_written(job_dir, monkeypatch):
    """The crash of issue 12: a run with some IFD >= 1 (the fake scorer spreads IFD over [0.5, 1.5))."""
    _fake_scorer(monkeypatch)
    assert run_cli("run", write_job(job_dir, {**_fast_job(job_dir), "output": "o"})) == 0
    man = load_manifest("o")
    ann = pd.read_parquet("o/annotated")
    ge_1 = int((ann.ifd_loss >= 1).sum())
    assert 0 < ge_1 < len(ann)
    assert man["stages"]["score"]["ifd_ge_1"] == ge_1
    assert man["score"]["ifd_ge_1_share"] == round(ge_1 / len(ann), 4)
    assert man["accounting"]["holds"]


def test_a_late_failure_is_one_line_with_a_log_and_keeps_the_scores(job_dir, monkeypatch, capsys):
    from curate import manifest

    _fake_scorer(monkeypatch)
    job = write_job(job_dir, {**_fast_job(job_dir), "output": "o"})

    def broken(*args, **kwargs):
        raise RuntimeError("manifest step broken on purpose")

    with monkeypatch.context() as m:
        m.setattr(manifest, "build", broken)
        assert run_cli("run", job) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("curate: unexpected error: RuntimeError: manifest step broken on purpose (traceback in ")
    log = err.split("(traceback in ", 1)[1].rstrip(")")
    assert os.path.isfile(log) and os.path.dirname(log) == str(job_dir)
    assert "Traceback" in open(log, encoding="utf-8").read()
    assert not os.path.exists("o")  # never an output that looks complete
    # the costly stage's work was kept: the rerun takes every score from the cache
    _fake_scorer(monkeypatch, fail_after=0)  # a model call would fail the run
    assert run_cli("run", job) == 0
    man = load_manifest("o")
    assert man["score"]["model_rows"] == 0 and man["score"]["cached_rows"] == 30


def test_job_file_errors_keep_exit_2(job_dir, capsys):
    job = write_job(job_dir, {**_fast_job(job_dir), "output": "o", "select": {"policy": "nope"}})
    assert run_cli("run", job) == 2
    assert capsys.readouterr().err.strip().startswith("curate: error: select: unknown policy")


def misaligned_rows() -> list[dict]:
    """Real rows whose responses were swapped between a GSM8K problem and an Alpaca instruction
    (the misaligned pairs the IFD >= 1 rule exists to catch), and two aligned GSM8K rows."""
    import json

    gsm = [json.loads(line) for line in open(f"{EXAMPLES}/gsm8k_sample.jsonl", encoding="utf-8")]
    gsm = sorted(gsm, key=lambda r: len(r["instruction"]) + len(r["output"]))[:9]
    alp = [r for r in json.load(open(f"{EXAMPLES}/alpaca_cherry_sample.json", encoding="utf-8"))
           if len(r["output"]) < 300 and len(r["instruction"]) < 200 and not r.get("input")][:9]
    rows = []
    for i, (g, a) in enumerate(zip(gsm[:7], alp[:7])):
        rows.append({"id": f"swap-g{i}", "instruction": g["instruction"], "input": "", "output": a["output"]})
        rows.append({"id": f"swap-a{i}", "instruction": a["instruction"], "input": "", "output": g["output"]})
    for i, r in enumerate(gsm[7:9]):
        rows.append({"id": f"aligned{i}", "instruction": r["instruction"], "input": "", "output": r["output"]})
    return rows


def test_real_scores_of_misaligned_pairs_reach_ifd_ge_1_and_superfiltering_drops_them(job_dir):
    import json

    with open("rows.jsonl", "w", encoding="utf-8") as fh:
        for r in misaligned_rows():
            fh.write(json.dumps(r) + "\n")
    cfg = {"output": "o", "inputs": [{"source": "mixed", "path": "rows.jsonl", "id_field": "id"}],
           "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
           "embed": {"enabled": False}, "cluster": {"enabled": False},
           "score": {"ifd": {"cache_dir": str(job_dir / "cache"), "max_length": 256}},
           "select": {"policy": "superfiltering", "budget": {"fraction": 1.0}}}
    assert run_cli("run", write_job(job_dir, cfg)) == 0
    man = load_manifest("o")
    ann = pd.read_parquet("o/annotated")
    ann = ann.set_index(ann.id.str.removeprefix("mixed:"))
    assert len(ann) == 16 and (ann.ifd_status == "ok").all() and ann.ifd_loss.notna().all()
    high = ann[ann.ifd_loss >= 1]
    assert len(high) >= 2 and all(i.startswith("swap") for i in high.index)
    assert man["score"]["ifd_ge_1_share"] == round(len(high) / len(ann), 4) > 0
    assert not high.selected.any() and (high.drop_reason == "superfiltering:ifd_ge_upper").all()
    assert ann[ann.ifd_loss < 1].selected.all()
    # swapping raised IFD: every misaligned row scores above the aligned rows' mean
    aligned = ann[ann.index.str.startswith("aligned")].ifd_loss
    assert ann[ann.index.str.startswith("swap")].ifd_loss.min() > aligned.mean()
