"""The headline: which selection recovers a pruned model best, at one budget.

A pool of real rows (Alpaca Cherry 5% and GSM8K train from ../shared/data, the NQ sample from
examples/data) goes through the pipeline with IFD, degradation (dense SmolLM2-135M-Instruct vs
its one-shot 50% Wanda pruning) and embeddings; ``curate evaluate`` then recovers the pruned
model with LoRA on each policy's selection (random, superfiltering, cluster_balanced, paser)
with paired seeds and measures held-out response NLL, the share of the compression gap closed
and KL to the dense model. Prints one JSON line per policy and the table; writes everything to
``runs/bench-recovery/`` (``--quick``: ``runs/bench-recovery-quick/``). About an hour on 2 CPU cores
(a LoRA step of 8 x 256 tokens takes ~20 s); ``--quick`` checks that the loop runs end to end on 44 rows, one seed, two policies, one
step and 128-token cutoffs (its figures say nothing about which policy wins).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks.common import REPO, emit, shared

RUNS = os.path.join(REPO, "runs")


def _pool(folder: str, n_alpaca: int, n_gsm: int, n_nq: int) -> list[dict]:
    """One jsonl file per source (so the held-out split is stratified by source); the job's inputs."""
    with open(shared("alpaca_cherry_5pct.json"), encoding="utf-8") as fh:
        alpaca = json.load(fh)[:n_alpaca]
    with open(shared("gsm8k_train.json"), encoding="utf-8") as fh:
        gsm = json.load(fh)[:n_gsm]
    with open(os.path.join(REPO, "examples", "data", "nq_sharegpt_sample.json"), encoding="utf-8") as fh:
        nq = [{"instruction": r["items"][0]["value"], "input": "", "output": r["items"][1]["value"]}
              for r in json.load(fh)[:n_nq]]
    inputs = []
    with open(os.path.join(folder, "pool.jsonl"), "w", encoding="utf-8") as fh:  # all rows: the calibration pool
        for r in alpaca + gsm + nq:
            fh.write(json.dumps({k: r.get(k, "") for k in ("instruction", "input", "output")}) + "\n")
    for source, rows in (("alpaca", alpaca), ("gsm8k", gsm), ("nq", nq)):
        path = os.path.join(folder, f"{source}.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps({k: r.get(k, "") for k in ("instruction", "input", "output")}) + "\n")
        inputs.append({"source": source, "path": path})
    return inputs


def _curate(*args: str) -> None:
    cmd = [sys.executable, "-m", "curate", *args]
    print("$ curate " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def run(quick: bool):
    out = os.path.join(RUNS, "bench-recovery-quick" if quick else "bench-recovery")  # quick never clobbers the full run
    os.makedirs(out, exist_ok=True)
    sizes = (24, 12, 8) if quick else (240, 120, 40)
    budget, seeds, steps = (8, "0", 1) if quick else (64, "0,1,2", 8)
    policies = "random,paser" if quick else "random,superfiltering,cluster_balanced,paser"
    cutoff, heldout, calibration = (128, "16", "8") if quick else (256, "48", "32")
    inputs = _pool(out, *sizes)
    t0 = time.perf_counter()
    model = os.path.join(out, "smollm2-wanda50")
    _curate("compress", "--calibration", os.path.join(out, "pool.jsonl"), "--out", model, "--method", "wanda", "--sparsity", "0.5",
            "--calibration-rows", calibration, "--heldout", "16" if quick else "40")
    compress_s = time.perf_counter() - t0
    job = {"name": "bench-recovery", "output": os.path.join(out, "run"), "seed": 0,
           "inputs": inputs,
           "dedup": {"semantic": {"enabled": False}},
           "score": {"ifd": {"max_length": 2 * cutoff},
                     "degradation": {"enabled": True, "compressed": model, "cutoff": cutoff}},
           "select": {"policy": "all"}}
    job_path = os.path.join(out, "job.yaml")
    import yaml

    with open(job_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(job, fh)
    t1 = time.perf_counter()
    _curate("run", job_path, "--overwrite")
    score_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    _curate("evaluate", job["output"], "--model", model, "--rows", str(budget), "--policies", policies,
            "--seeds", seeds, "--heldout", heldout, "--steps", str(steps), "--batch-size", "8", "--cutoff", str(cutoff),
            "--param", "cluster_balanced.score=ifd_loss", "--out", os.path.join(out, "eval"))
    eval_s = time.perf_counter() - t2
    with open(os.path.join(out, "eval", "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    for name, e in summary["policies"].items():
        emit("recovery", name, "heldout_nll", e["heldout_nll"], "random", summary["policies"]["random"]["heldout_nll"],
             n=budget, higher_is_better=False, gap_closed=round(e["gap_closed"], 4), kl_dense=round(e["kl_dense"], 4),
             vs_random_nll=e.get("vs_random_nll"), vs_random_ci95=e.get("vs_random_ci95"), seeds=e["seeds"],
             steps=steps, pool=summary["selectable_rows"], heldout=summary["heldout_rows"],
             nll_dense=round(summary["nll_dense"], 4), nll_compressed=round(summary["nll_compressed"], 4))
    emit("recovery", "wall", "seconds", compress_s + score_s + eval_s, n=budget, compress_s=round(compress_s, 1),
         pipeline_s=round(score_s, 1), evaluate_s=round(eval_s, 1))
