"""MinHash signatures and the whole near-dup stage.

Signature throughput on the same real-length documents, shingling included, same
shingles (word 5-grams of the normalized text) and num_perm=128, one process:
curate (vectorized) vs a plain datasketch per-document loop, datasketch
``MinHash.bulk``, and rensa's RMinHash (fed Python-built shingles, as its API needs).
Then the whole near-dup stage through Beam on the local runner (read + validate +
near-dup + write), rows/s and peak memory at two sizes.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import unicodedata

import yaml

from benchmarks.common import REPO, emit, pinned_job, real_rows, run_measured
from benchmarks.foundation import make_rows
from curate.dedup import minhash as mh

NUM_PERM, N = 128, 5


def documents(n: int) -> list[str]:
    """n real texts (instruction + input + output); repeats get a distinct trailing word."""
    base = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in real_rows()]
    return [base[i % len(base)] + ("" if i < len(base) else f" r{i // len(base)}") for i in range(n)]


def py_shingles(text: str) -> list[str]:
    words = unicodedata.normalize("NFKC", text).casefold().split()
    if len(words) < N:
        return [" ".join(words)]
    return [" ".join(words[i:i + N]) for i in range(len(words) - N + 1)]


def time_curate(docs):
    t = time.perf_counter()
    for i in range(0, len(docs), 512):
        mh.signatures(docs[i:i + 512], NUM_PERM, 0, N)
    return time.perf_counter() - t


def time_datasketch_loop(docs):
    from datasketch import MinHash

    t = time.perf_counter()
    for d in docs:
        m = MinHash(num_perm=NUM_PERM, seed=1)
        for s in py_shingles(d):
            m.update(s.encode("utf-8"))
        m.digest()
    return time.perf_counter() - t


def time_datasketch_bulk(docs):
    from datasketch import MinHash

    t = time.perf_counter()
    MinHash.bulk([[s.encode("utf-8") for s in py_shingles(d)] for d in docs], num_perm=NUM_PERM, seed=1)
    return time.perf_counter() - t


def time_rensa(docs):
    import rensa

    t = time.perf_counter()
    for d in docs:
        m = rensa.RMinHash(num_perm=NUM_PERM, seed=1)
        m.update(py_shingles(d))
        m.digest()
    return time.perf_counter() - t


def stage_case(n: int, tmp: str) -> dict:
    data = os.path.join(tmp, f"rows_{n}.jsonl")
    with open(data, "w", encoding="utf-8") as fh:
        for r in make_rows(n, seed=1):
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    job = os.path.join(tmp, f"near_{n}.yaml")
    out = os.path.join(tmp, f"out_{n}")
    with open(job, "w") as fh:
        yaml.safe_dump(pinned_job(("dedup.near",), name=f"near_{n}", output=out, batch_size=1024,
                                  inputs=[{"source": "bench", "path": data}]), fh)
    res = run_measured([sys.executable, "-m", "curate", "run", job], cwd=REPO)
    with open(os.path.join(out, "manifest.json")) as fh:
        man = json.load(fh)
    assert man["accounting"]["holds"]
    return {"wall_s": res["wall_s"], "peak_rss_mb": res["peak_rss_mb"], "pipeline_wall_s": man["timing"]["wall_s"],
            "near_busy_s": man["stages"]["near_dedup"]["busy_s"], "removed": man["near_dedup"]["removed"],
            "clusters": man["near_dedup"]["clusters"]}


def run(quick: bool):
    n = 4_000 if quick else 20_000
    docs = documents(n)
    mh.signatures(docs[:64])  # warm up numpy
    t_curate = time_curate(docs)
    rate = n / t_curate
    n_loop = n if not quick else 2_000
    for case, fn, count in (("datasketch_loop", time_datasketch_loop, n_loop),
                            ("datasketch_bulk", time_datasketch_bulk, n),
                            ("rensa_rminhash", time_rensa, n)):
        other = count / fn(docs[:count])
        emit("minhash", f"signatures_vs_{case}", "docs_per_s", rate, case, other, n=n, baseline_n=count,
             num_perm=NUM_PERM, shingles="word 5-grams, shingling included")
    with tempfile.TemporaryDirectory(prefix="curate-bench-") as tmp:
        sizes = (10_000, 20_000) if quick else (50_000, 100_000)
        for size in sizes:
            r = stage_case(size, tmp)
            emit("minhash", "near_dedup_stage_beam", "rows_per_s", size / r["wall_s"], None, None, n=size,
                 wall_s=round(r["wall_s"], 2), pipeline_wall_s=r["pipeline_wall_s"], near_busy_s=r["near_busy_s"],
                 peak_rss_mb=r["peak_rss_mb"], removed=r["removed"], clusters=r["clusters"],
                 note="whole job (read, validate, near-dup, write) in one process, start-up included")
