"""Throughput of the non-model path against the script a user would write instead.

read -> exact dedup -> near dedup -> select (``random`` 25%) -> write, on the scale benchmark's
pools (``benchmarks.scale.make_pool``: real Alpaca and GSM8K text, 10% exact and 10% near
copies, four sources), by

- ``default``: ``curate run`` as a user first runs it (the in-process FnApiRunner; a job like
  this one, with no model stage and a keyed policy, runs on the batch path, ``pipelines.batched``),
- ``dask_2``: ``curate run --runner=DaskRunner --dask_workers=2``,
- ``row``: the default runner on the row path (``path: row``), while it exists: its line's
  baseline is the row path and its ``ratio`` the batch path's rows/s over the row path's,
- ``script``: ``benchmarks.plain_pipeline``, one process doing the same steps on whole columns.

Each case runs as its own process tree; printed: wall, rows/s, peak memory of the driver and of
the largest worker, the counts, and each runner's rows/s over the script's (``ratio``, above 1:
curate faster). Sizes: 100k (``--quick``) and 1M; ``CURATE_THROUGHPUT_SIZES`` and
``CURATE_THROUGHPUT_RUNNERS`` (comma-separated) pick a subset. The row path keeps every
materialized collection in memory (about 32 GB at 1M rows), so on a machine with less than
that its 1M case is skipped with a line saying so.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import psutil
import yaml

from benchmarks.common import REPO, emit, pinned_job, run_measured
from benchmarks.scale import SOURCES, make_pool

RUNNERS = {"default": [], "dask_2": ["--runner=DaskRunner", "--dask_workers=2"], "row": []}
ROW_PATH_BYTES_PER_ROW = 32_000  # measured: 3.2 GB at 100k rows on the default runner


def _pick(env: str, default: list) -> list:
    return os.environ[env].split(",") if os.environ.get(env) else default


def _curate(data: str, tmp: str, flags: list[str], path: str = "batch") -> tuple[dict, dict]:
    out, job = os.path.join(tmp, "out"), os.path.join(tmp, "job.yaml")
    with open(job, "w") as fh:
        yaml.safe_dump({**pinned_job(("dedup.exact", "dedup.near"), name="throughput", output=out,
                                     inputs=[{"source": s, "path": os.path.join(data, f"{s}.jsonl")} for s in SOURCES],
                                     select={"policy": "random", "budget": {"fraction": 0.25}}), "path": path}, fh)
    res = run_measured([sys.executable, "-m", "curate", "run", job, "--overwrite", *flags], REPO, every=0.1)
    with open(os.path.join(out, "manifest.json")) as fh:
        man = json.load(fh)
    assert man["accounting"]["holds"]
    reasons = man["counts"]["dropped"]
    counts = {"rows_in": man["counts"]["rows_in"], "selected": man["counts"]["selected"],
              "exact_duplicate": reasons.get("exact_duplicate"), "near_duplicate": reasons.get("near_duplicate")}
    return res, counts


def run(quick: bool):
    sizes = [int(n) for n in _pick("CURATE_THROUGHPUT_SIZES", ["100000"] if quick else ["100000", "1000000"])]
    runners = _pick("CURATE_THROUGHPUT_RUNNERS", ["script", *RUNNERS])
    runners = sorted(runners, key=lambda r: r != "row")  # the row path first: the default's line compares to it
    with tempfile.TemporaryDirectory(prefix="curate-throughput-") as tmp:
        for n in sizes:
            data = os.path.join(tmp, f"pool_{n}")
            os.makedirs(data)
            make_pool(n, data)
            script = None
            if "script" in runners:
                res = run_measured([sys.executable, "-m", "benchmarks.plain_pipeline", data,
                                    os.path.join(tmp, "script.parquet")], REPO, every=0.1)
                counts = json.loads(res["stdout"].strip().splitlines()[-1])
                script = n / res["wall_s"]
                emit("throughput", f"script/{n}", "rows_per_s", script, n=n, wall_s=round(res["wall_s"], 1),
                     driver_peak_mb=res["driver_peak_mb"], counts=counts)
            row = None
            for name in (r for r in runners if r in RUNNERS):
                need = n * ROW_PATH_BYTES_PER_ROW
                if name == "row" and need > psutil.virtual_memory().total:
                    print(f"throughput: {name}/{n} skipped: the row path holds about {need / 2**30:.0f} GB at "
                          f"{n:,} rows, this machine has {psutil.virtual_memory().total / 2**30:.0f} GB",
                          file=sys.stderr, flush=True)
                    continue
                res, counts = _curate(data, tmp, RUNNERS[name], "row" if name == "row" else "batch")
                rate = n / res["wall_s"]
                emit("throughput", f"{name}/{n}", "rows_per_s", rate, "plain script", script, n=n,
                     wall_s=round(res["wall_s"], 1), driver_peak_mb=res["driver_peak_mb"],
                     worker_peak_mb=res["worker_peak_mb"], peak_rss_mb=res["peak_rss_mb"], counts=counts)
                if name == "row":
                    row = rate
                elif name == "default" and row:
                    emit("throughput", f"batch_vs_row/{n}", "rows_per_s", rate, "row path", row, n=n)
