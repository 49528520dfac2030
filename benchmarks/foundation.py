"""Foundation job throughput: read, validate, exact dedup, write (every other stage off), on real rows.

Rows: the 10,584 real Alpaca + GSM8K rows repeated to size; each repeat gets a
variant suffix on its instruction except a seeded 5% left as exact copies, so
exact dedup has real work. Baseline: the pandas script a user would write
instead (load, same normalization, drop_duplicates, write Parquet). Each case
runs in its own process; rows/s is from process wall time, start-up included.
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile

import yaml

from benchmarks.common import REPO, emit, pinned_job, real_rows, run_measured

PANDAS_SCRIPT = r'''
import json, sys, unicodedata
import pandas as pd
src, out = sys.argv[1], sys.argv[2]
df = pd.read_json(src, lines=True)
norm = lambda s: " ".join(unicodedata.normalize("NFKC", s).casefold().split())
prompt = df["instruction"] + df["input"].where(df["input"].str.strip() != "", "").radd("\n\n").where(df["input"].str.strip() != "", "")
key = (prompt.map(norm) + "\x1f" + df["output"].map(norm))
df = df.assign(_key=key).drop_duplicates("_key").drop(columns="_key")
df.to_parquet(out)
print(len(df))
'''


def make_rows(n: int, seed: int = 0) -> list[dict]:
    base = real_rows()
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        r = dict(base[i % len(base)])
        copy = i // len(base)
        if copy and rng.random() > 0.05:
            r["instruction"] = f"{r['instruction']} (variant {copy})"
        rows.append(r)
    return rows


def run(quick: bool):
    n = 20_000 if quick else 100_000
    with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
        data = os.path.join(tmp, "rows.jsonl")
        with open(data, "w", encoding="utf-8") as fh:
            for r in make_rows(n):
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        script = os.path.join(tmp, "baseline.py")
        with open(script, "w") as fh:
            fh.write(PANDAS_SCRIPT)
        base = run_measured([sys.executable, script, data, os.path.join(tmp, "pandas.parquet")])
        base_rate = n / base["wall_s"]
        cases = {"in_memory": [], "multi_processing_2": ["--direct_running_mode=multi_processing",
                                                         "--direct_num_workers=2"]}
        for case, flags in cases.items():
            out = os.path.join(tmp, f"out_{case}")
            job = os.path.join(tmp, f"{case}.yaml")
            with open(job, "w") as fh:
                # like for like with the baseline: exact dedup only (benchmarks.minhash times near dedup)
                yaml.safe_dump(pinned_job(("dedup.exact",), name=f"bench_{case}", output=out,
                                          inputs=[{"source": "bench", "path": data}]), fh)
            res = run_measured([sys.executable, "-m", "curate", "run", job, *flags], cwd=REPO)
            with open(os.path.join(out, "manifest.json")) as fh:
                man = json.load(fh)
            assert man["accounting"]["holds"] and man["counts"]["rows_in"] == n
            emit("foundation", case, "rows_per_s", n / res["wall_s"], "pandas_script", base_rate, n=n,
                 wall_s=round(res["wall_s"], 2), peak_rss_mb=res["peak_rss_mb"],
                 baseline_wall_s=round(base["wall_s"], 2), baseline_peak_rss_mb=base["peak_rss_mb"],
                 pipeline_wall_s=man["timing"]["wall_s"], selected=man["counts"]["selected"],
                 dropped=man["counts"]["dropped"])
