"""Scale: read -> exact dedup -> near dedup -> select on synthetic pools of growing size, on
FnApiRunner (multi_processing, 2 workers) and on the Dask runner (a LocalCluster of 2 worker
processes started by the job), one process tree per case.

Pools are built from the real Alpaca + GSM8K rows: 80% unrelated rows (the instruction of one
real row, a sentence of another, the answer of a third), 10% exact copies and 10% near copies
(a word dropped, a few added) of earlier rows, dealt round robin into four sources (files).
Each row carries a precomputed cluster id (``topic``, round(sqrt(n)) clusters, the k-means
default; copies keep their original's), read with ``cluster.column`` so no model runs.
Policies: ``random`` and ``mixture`` (per-source quotas) over the whole pool,
``cluster_balanced`` on the precomputed clusters (all three keyed: decided range by range, the
only global state counts, quotas and cut points), and ``random`` with ``select.scope: cluster``
(each cluster decided alone, the only global state per-cluster counts and the selected rows'
order keys).

Reported per case: wall time, rows/s, and peak resident memory of the driver process and of the
largest other process (a Beam SDK worker or a Dask worker), sampled every 100 ms. Model stages
are not measured here (see ``benchmarks.embed`` and ``benchmarks.ifd``).
"""
from __future__ import annotations

import json
import os
import random
import re
import sys
import tempfile

import yaml

from benchmarks.common import REPO, emit, pinned_job, real_rows, run_measured

RUNNERS = {"fnapi_multi_2": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
           "dask_2": ["--runner=DaskRunner", "--dask_workers=2"],
           # workers that spill to disk above 40% of 3 GB (--dask_memory_target), as a cluster with bounded memory runs
           "dask_2_3gb": ["--runner=DaskRunner", "--dask_workers=2", "--dask_memory_limit=3GB"],
           # the same at 2 GB: the cap under which the largest worker's peak is compared from 100k to 1M
           "dask_2_2gb": ["--runner=DaskRunner", "--dask_workers=2", "--dask_memory_limit=2GB"],
           # a cap the 100k run reaches too (at 2 GB it peaked below the spill mark), so the two
           # sizes' peaks compare what each needs, not how far each filled its cap
           "dask_2_1500mb": ["--runner=DaskRunner", "--dask_workers=2", "--dask_memory_limit=1500MB"],
           # the same with Dask's own spill target (0.6), which left a 1M job's shuffle too little room
           "dask_2_1500mb_t60": ["--runner=DaskRunner", "--dask_workers=2", "--dask_memory_limit=1500MB",
                                 "--dask_memory_target=0.6"],
           # the same with GroupByKeys through Dask's P2P shuffle
           "dask_2_1500mb_p2p": ["--runner=DaskRunner", "--dask_workers=2", "--dask_memory_limit=1500MB",
                                 "--dask_shuffle=p2p"]}
QUICK_RUNNERS = ("fnapi_multi_2", "dask_2", "dask_2_3gb")
SOURCES = ("s0", "s1", "s2", "s3")
POLICIES = {"random": {"policy": "random", "budget": {"fraction": 0.25}},
            "mixture": {"policy": "mixture", "params": {"shares": {s: 1.0 for s in SOURCES}},
                        "budget": {"fraction": 0.25}},
            "cluster_balanced": {"policy": "cluster_balanced", "budget": {"fraction": 0.25}},
            "random_per_cluster": {"policy": "random", "budget": {"fraction": 0.25}, "scope": "cluster"},
            # a token budget is not a sort: the policy sees its shortlist's rows only (a seeded sample)
            "random_tokens_shortlist": {"policy": "random", "budget": {"tokens": 2_000_000},
                                        "max_candidates": 20_000}}


def make_pool(n: int, folder: str, seed: int = 0) -> dict:
    """Write ``n`` rows as JSON lines, one file per source; returns the planted counts."""
    base = real_rows()
    rng = random.Random(seed)
    counts = {"unrelated": 0, "exact": 0, "near": 0}
    topics = max(2, round(n ** 0.5))
    written: list[dict] = []
    files = [open(os.path.join(folder, f"{s}.jsonl"), "w", encoding="utf-8") for s in SOURCES]
    try:
        for i in range(n):
            kind = rng.random()
            if written and kind < 0.10:
                row, what = dict(rng.choice(written)), "exact"
            elif written and kind < 0.20:
                src = rng.choice(written)
                words = src["output"].split()
                if len(words) > 3:
                    del words[rng.randrange(len(words))]
                row = {**src, "output": " ".join(words) + " Hope this helps."}
                what = "near"
            else:
                a, b, c = (base[rng.randrange(len(base))] for _ in range(3))
                sentence = b["instruction"].split(".")[0]
                row = {"instruction": f"{a['instruction']} {sentence} (case {i})", "input": a.get("input", ""),
                       "output": c["output"], "topic": rng.randrange(topics)}
                what = "unrelated"
            counts[what] += 1
            if len(written) < 50_000:
                written.append(row)
            elif rng.random() < 0.01:
                written[rng.randrange(len(written))] = row
            files[i % len(files)].write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        for fh in files:
            fh.close()
    return counts


def _pick(env: str, everything, default=None):
    """The cases named in the environment variable ``env`` (comma-separated), else ``default``
    (all when not given)."""
    names = [x for x in os.environ.get(env, "").split(",") if x]
    unknown = [x for x in names if x not in [str(e) for e in everything]]
    if unknown:
        raise SystemExit(f"{env}: unknown {', '.join(unknown)} (choose from {', '.join(map(str, everything))})")
    if not names:
        return list(everything if default is None else default)
    return [e for e in everything if str(e) in names]


def _graph_tasks(log: str) -> int | None:
    """The task count a Dask run logs before it sends its graph (None on FnApiRunner)."""
    found = re.search(r"dask: sending the job's graph \((\d+) tasks\)", log)
    return int(found.group(1)) if found else None


def run(quick: bool):
    """``CURATE_SCALE_SIZES``, ``CURATE_SCALE_RUNNERS`` and ``CURATE_SCALE_POLICIES`` (comma-separated)
    pick a subset of the cases: the whole grid at 1M rows takes hours on 2 cores. ``--quick``: 10,000
    rows, the runners in ``QUICK_RUNNERS``, the global and the per-cluster ``random`` (a few minutes)."""
    everything = (10_000, 100_000, 1_000_000)
    sizes = _pick("CURATE_SCALE_SIZES", everything, (10_000,) if quick else everything)
    runners = _pick("CURATE_SCALE_RUNNERS", list(RUNNERS), QUICK_RUNNERS if quick else None)
    policies = _pick("CURATE_SCALE_POLICIES", list(POLICIES), ("random", "random_per_cluster") if quick else None)
    with tempfile.TemporaryDirectory(prefix="curate-scale-") as tmp:
        for n in sizes:
            data = os.path.join(tmp, f"pool_{n}")
            os.makedirs(data)
            planted = make_pool(n, data)
            for runner, flags in ((r, RUNNERS[r]) for r in runners):
                for policy, select in ((p, POLICIES[p]) for p in policies):
                    case = f"{runner}/{policy}/{n}"
                    out = os.path.join(tmp, "out")
                    job = os.path.join(tmp, "job.yaml")
                    with open(job, "w") as fh:
                        yaml.safe_dump(pinned_job(("dedup.exact", "dedup.near"), name="scale", output=out,
                                                  inputs=[{"source": s, "path": os.path.join(data, f"{s}.jsonl")}
                                                          for s in SOURCES], select=select,
                                                  cluster={"column": "topic"}), fh)
                    cmd = [sys.executable, "-m", "curate", "run", job, "--overwrite", *flags]
                    res = run_measured(cmd, REPO, every=0.1)
                    with open(os.path.join(out, "manifest.json")) as fh:
                        man = json.load(fh)
                    assert man["accounting"]["holds"] and man["counts"]["rows_in"] == n
                    emit("scale", case, "rows_per_s", n / res["wall_s"], n=n, wall_s=round(res["wall_s"], 1),
                         driver_peak_mb=res["driver_peak_mb"], worker_peak_mb=res["worker_peak_mb"],
                         processes=res["processes"], planted=planted,
                         worker_restarts=res["stderr"].count("memory budget. Restarting"),
                         graph_tasks=_graph_tasks(res["stderr"]),
                         dropped=man["counts"]["dropped"], selected=man["counts"]["selected"],
                         busy_s={k: v.get("busy_s") for k, v in man["stages"].items() if v.get("busy_s")})
