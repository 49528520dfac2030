"""Shared helpers: real data, subprocess timing with peak memory, the JSON line format."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))


def shared(name: str) -> str:
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isfile(path):
        sys.exit(f"benchmarks: missing {path} (the benchmarks read ../shared/data)")
    return path


def real_rows() -> list[dict]:
    """Alpaca (Cherry 5%) + GSM8K train: 10,584 real instruction rows."""
    rows = []
    for name in ("alpaca_cherry_5pct.json", "gsm8k_train.json"):
        with open(shared(name), encoding="utf-8") as fh:
            rows.extend(json.load(fh))
    return rows


def run_measured(cmd: list[str], cwd: str | None = None, env: dict | None = None) -> dict:
    """Run a command; wall seconds and peak RSS (MB) of it and its children, sampled every 50 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": round(peak / 2**20, 1), "stdout": out}


def emit(name: str, case: str, metric: str, value: float, baseline: str | None = None,
         baseline_value: float | None = None, n: int | None = None, higher_is_better: bool = True,
         **extra) -> dict:
    """Print one result line. ``ratio`` is curate / baseline for higher-is-better metrics,
    baseline / curate otherwise, so a ratio above 1 always means curate is better."""
    ratio = None
    if baseline_value:
        ratio = value / baseline_value if higher_is_better else baseline_value / value
    line = {"name": name, "case": case, "metric": metric, "value": _round(value), "baseline": baseline,
            "baseline_value": _round(baseline_value), "ratio": _round(ratio), "n": n, **extra}
    print(json.dumps(line), flush=True)
    return line


def _round(x):
    return round(x, 4) if isinstance(x, float) else x
