"""Near-dup quality on the labelled set (``benchmarks.dedup_quality``) at threshold 0.8:
recall per true-Jaccard bucket, precision of removals, pair-level precision / recall / F1,
through the real job on the local runner."""
from __future__ import annotations

import os
import sys
import tempfile

import pandas as pd
import yaml

from benchmarks.common import REPO, emit, pinned_job, real_rows, run_measured
from benchmarks.dedup_quality import build, evaluate, write_jsonl


def run(quick: bool):
    n_orig, n_unrel = (150, 500) if quick else (1000, 4000)
    rows, labels = build(real_rows(), n_orig, n_unrel, seed=11)
    with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
        data, job, out = (os.path.join(tmp, x) for x in ("labelled.jsonl", "job.yaml", "out"))
        write_jsonl(rows, data)
        with open(job, "w") as fh:
            yaml.safe_dump(pinned_job(("dedup.near",), output=out,
                                      inputs=[{"source": "lab", "path": data, "id_field": "id"}]), fh)
        run_measured([sys.executable, "-m", "curate", "run", job], cwd=REPO)
        result = evaluate(rows, labels, pd.read_parquet(os.path.join(out, "annotated")).to_dict("records"))
    common = dict(n=len(rows), copies=len(labels["copies"]), unrelated=len(labels["unrelated"]), threshold=0.8)
    emit("near_quality", "recall_true_jaccard_ge_0.9", "recall", result["recall_ge_0.9"], "target", 0.95, **common)
    emit("near_quality", "removed_below_0.7", "share", result["removed_below_0.7_share"], "target_max", 0.02,
         higher_is_better=False, removed=result["removed"], unrelated_removed=result["unrelated_removed"], **common)
    emit("near_quality", "pairs_at_0.8", "f1", result["pair_f1"], None, None, precision=result["pair_precision"],
         recall=result["pair_recall"], recall_by_bucket=result["recall_by_bucket"], **common)
