"""Shared helpers: real data, subprocess timing with peak memory, the JSON line format."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
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


def switches(settings=None, prefix: str = "") -> list[str]:
    """Dotted names of every stage switch (``enabled``) in the job settings, e.g. ``dedup.near``."""
    import dataclasses

    from curate.settings import Job

    out = []
    for f in dataclasses.fields(settings or Job):
        if f.name == "enabled":
            out.append(prefix.rstrip("."))
        elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            out += switches(f.default_factory, f"{prefix}{f.name}.")
    return out


def pinned_job(on: tuple[str, ...], **rest) -> dict:
    """A job dict with every stage switched off except those named in ``on`` (dotted, as
    :func:`switches` names them): a benchmark measures what it names, whatever the defaults become."""
    unknown = set(on) - set(switches())
    if unknown:
        raise ValueError(f"no such stage switch: {', '.join(sorted(unknown))}")
    job: dict = {}
    for name in switches():
        node = job
        for part in name.split("."):
            node = node.setdefault(part, {})
        node["enabled"] = name in on
    for key, value in rest.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = _merge(job[key], value)
        else:
            job[key] = value
    return job


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_measured(cmd: list[str], cwd: str | None = None, env: dict | None = None, every: float = 0.05) -> dict:
    """Run a command; wall seconds and peak RSS (MB), sampled every ``every`` seconds: of it and its
    children together (``peak_rss_mb``), of the command's own process (``driver_peak_mb``) and of
    its largest child (``worker_peak_mb``, a Beam SDK worker or a Dask worker). Its output goes to
    files, not pipes: a long run logs more than a pipe holds, and a child blocked on a full pipe
    stops (seen at 1M rows on Dask: the driver, scheduler and nannies all waited on one log line).
    With ``CURATE_BENCH_LOG`` set to a file path the command's stderr goes there too (appended), so
    a run of an hour can be watched with ``tail -f``."""
    start = time.perf_counter()
    watch = os.environ.get("CURATE_BENCH_LOG")
    with tempfile.TemporaryFile("w+") as out_f, \
            (open(watch, "a+", encoding="utf-8") if watch else tempfile.TemporaryFile("w+")) as err_f:
        start_at = err_f.seek(0, os.SEEK_END)
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=out_f, stderr=err_f,
                                text=True)
        root = psutil.Process(proc.pid)
        peak, peaks = 0, {}
        while proc.poll() is None:
            try:
                rss = {p.pid: p.memory_info().rss for p in [root, *root.children(recursive=True)]}
            except psutil.Error:
                rss = {}
            peak = max(peak, sum(rss.values()))
            for pid, v in rss.items():
                peaks[pid] = max(peaks.get(pid, 0), v)
            time.sleep(every)
        wall = time.perf_counter() - start
        out_f.seek(0), err_f.seek(start_at)
        out, err = out_f.read(), err_f.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    children = [v for pid, v in peaks.items() if pid != proc.pid]
    return {"wall_s": wall, "peak_rss_mb": round(peak / 2**20, 1), "stdout": out, "stderr": err,
            "driver_peak_mb": round(peaks.get(proc.pid, 0) / 2**20, 1),
            "worker_peak_mb": round(max(children, default=0) / 2**20, 1), "processes": len(peaks)}


def spread(rows: list, n: int) -> list:
    """``n`` rows spread over the whole list (both sources), the same ones every run."""
    return [rows[(i * 7919) % len(rows)] for i in range(n)]


def emit(name: str, case: str, metric: str, value: float, baseline: str | None = None,
         baseline_value: float | None = None, n: int | None = None, higher_is_better: bool = True,
         **extra) -> dict:
    """Print one result line. ``ratio`` is curate / baseline for higher-is-better metrics,
    baseline / curate otherwise, so a ratio above 1 always means curate is better."""
    ratio = None
    if baseline_value:
        ratio = value / baseline_value if higher_is_better else baseline_value / value
    line = {"name": name, "case": case, "metric": metric, "value": _round(value), "baseline": baseline,
            "baseline_value": _round(baseline_value), "ratio": _round(ratio), "n": n, **extra, "cpu": _cpu()}
    print(json.dumps(line), flush=True)
    return line


def _cpu() -> str:
    """The CPU every figure was measured on (model, SIMD flags, cores used, ISA caps if set)."""
    from curate.device import usable_cores
    from curate.kernel_choice import ENV_CAPS, cpu_name

    caps = " ".join(f"{k}={os.environ[k]}" for k in ENV_CAPS if os.environ.get(k))
    return f"{cpu_name()}, {usable_cores()} cores" + (f", {caps}" if caps else "")


def _round(x):
    return round(x, 4) if isinstance(x, float) else x
