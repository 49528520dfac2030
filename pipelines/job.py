"""The job: build the Beam graph from a resolved config, run it, write outputs atomically.

Outputs are written into a sibling temporary folder ``<output>.tmp-<random>``;
only after the run succeeded and the accounting identity holds is
``manifest.json`` written (last) and the folder renamed to ``<output>``. A crash
leaves at most a ``.tmp-`` folder, never one that looks complete. An existing
output is replaced only with ``overwrite``.
"""
from __future__ import annotations

import datetime as dt
import glob
import json
import logging
import os
import re
import shutil
import time
import uuid

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from curate import cache_store
from curate import manifest as manifest_mod
from curate.errors import CurateError
from curate.io import fingerprint
from pipelines import transforms as T
from pipelines.embed_cluster import EmbedClusterDedup
from pipelines.near_dedup import NearDedup
from pipelines.score import Score, cache_folder, default_batch_tokens
from pipelines.select import Select

log = logging.getLogger("curate")


class OutputExistsError(CurateError):
    pass


class InputError(CurateError):
    """An input file could not be read while the job ran (one line, names the file)."""


def beam_flags(options: dict, extra: list[str] | None = None) -> list[str]:
    """Job-file Beam options as command-line flags; an option named in ``extra`` (the CLI) wins."""
    extra = list(extra or [])
    named = {f.lstrip("-").split("=", 1)[0] for f in extra}
    flags = []
    for key, value in options.items():
        if key in named:
            continue
        if value is True:
            flags.append(f"--{key}")
        elif value is False or value is None:
            continue
        else:
            flags.append(f"--{key}={value}")
    return flags + extra


def reuse_check(previous: str, key: str) -> dict:
    """Whether a previous run's embeddings/ can be reused: same embed key (model, length, dtype, text)."""
    import pyarrow.parquet as pq

    folder = previous if os.path.basename(os.path.normpath(previous)) == "embeddings" else \
        os.path.join(previous, "embeddings")
    files = sorted(glob.glob(os.path.join(folder, "*.parquet")))
    if not files:
        log.warning("embed.reuse: no embeddings/ Parquet under %s; embedding everything", previous)
        return {"from": previous, "used": False, "why": "no embeddings found"}
    stored = (pq.read_schema(files[0]).metadata or {}).get(b"curate.embed_key", b"").decode()
    if stored != key:
        log.warning("embed.reuse: %s was made with other settings (key %s, now %s); embedding everything",
                    previous, stored or "none", key)
        return {"from": previous, "used": False, "why": "model, max_seq_length, dtype or text differ"}
    return {"from": os.path.abspath(folder), "used": True}


def resolve_runtime(cfg: dict) -> dict:
    """Choices made at run time on this machine: model path and size, devices, dtypes."""
    from curate import device, models, onednn

    rt = {}
    e = cfg["embed"]
    if e["enabled"]:
        from curate.embed import embed_key

        path = models.resolve_embedder(e["model"])
        dev = device.torch_device(e["device"])
        dtype = device.torch_dtype_name(dev, e["dtype"])
        key = embed_key(e["model"], e["max_seq_length"], dtype, e["text"])
        rt["embed"] = {"model": e["model"], "path": path, "device": dev, "dtype": dtype,
                       "linear": onednn.kernel(dev, dtype, e["cpu_linear"]), "dim": models.embedding_dim(path),
                       "key": key}
        if e["reuse"]:
            rt["embed"]["reuse"] = reuse_check(e["reuse"], key)
    if cfg["cluster"]["enabled"]:
        rt["cluster"] = {"faiss_gpu": device.faiss_use_gpu(cfg["cluster"]["device"])}
    s = cfg["score"]["ifd"]
    if s["enabled"]:
        models.check_weak_lm(s["model"])  # fail now, not in a worker
        dev = device.torch_device(s["device"])
        dtype = device.torch_dtype_name(dev, s["dtype"], gpu_default="bfloat16")
        folder = cache_folder(s, dtype)
        files = cache_store.files(folder) if s["cache"] else []
        rt["score"] = {"model": s["model"], "device": dev, "dtype": dtype,
                       "linear": onednn.kernel(dev, dtype, s["cpu_linear"]),
                       "batch_tokens": s["batch_tokens"] or default_batch_tokens(dev),
                       "cache": folder if s["cache"] else None, "cache_files": files}
    return rt


def build(p: beam.Pipeline, cfg: dict, folder: str, rt: dict | None = None, run_id: str = "run") -> None:
    rt = rt if rt is not None else resolve_runtime(cfg)
    read = p | "Read" >> T.Read(cfg)
    valid = read["records"] | "Validate" >> T.Validate(cfg)
    ids = valid["records"] | "UniqueIds" >> T.UniqueIds(cfg)
    exact = ids["records"] | "ExactDedup" >> T.ExactDedup(cfg)
    near = exact["records"] | "NearDedup" >> NearDedup(cfg)
    emb = rt.get("embed", {})
    reuse = emb.get("reuse", {})
    ec = near["records"] | "EmbedCluster" >> EmbedClusterDedup(
        cfg, emb.get("device", "cpu"), emb.get("dtype", "float32"), rt.get("cluster", {}).get("faiss_gpu", False),
        reuse["from"] if reuse.get("used") else None, emb.get("linear", "torch"))
    if emb:
        from curate.schema import embeddings_schema

        ec["embeddings"] | "WriteEmbeddings" >> beam.io.WriteToParquet(
            os.path.join(folder, "embeddings", "part"), embeddings_schema(emb["dim"], emb["key"]),
            file_name_suffix=".parquet", codec="zstd")
    sc = rt.get("score", {})
    scored = ec["records"] | "Score" >> Score(cfg, sc, run_id)
    selection = scored["records"] | "Select" >> Select(cfg)
    decided = selection["records"]
    rejects = (valid["rejects"], ids["rejects"]) | "AllRejects" >> beam.Flatten()
    written = {"annotated": decided, "rejects": rejects} | "Write" >> T.WriteOutputs(folder)
    stats = (read["stats"], valid["stats"], ids["stats"], exact["stats"], near["stats"], ec["stats"],
             scored["stats"], written["stats"])
    stats | "FlattenStats" >> beam.Flatten() | "Stats" >> T.WriteStats(os.path.join(folder, "_stats.json"))
    reports = (near["reports"], ec["reports"], selection["reports"]) | "FlattenReports" >> beam.Flatten()
    reports | "Reports" >> T.WriteJson(os.path.join(folder, "_reports.json"))


def _compact_caches(rt: dict, run_id: str) -> None:
    """Merge the cache shards this run wrote into one file per cache (the shards are already
    readable; this only keeps the file count down). A failure here costs nothing but files."""
    for section in rt.values():
        folder = section.get("cache") if isinstance(section, dict) else None
        if folder:
            try:
                cache_store.compact(folder, run_id)
            except OSError as exc:
                log.warning("cache %s: shards not merged (%s); they stay readable", folder, exc)


def _write_report(folder: str) -> None:
    """report.html; the data outputs are complete without it, so a failure here is logged, not raised."""
    from curate.report import write_report

    try:
        write_report(folder)
    except Exception as exc:  # noqa: BLE001
        log.error("report.html could not be written (%s: %s); `curate report` retries it", type(exc).__name__, exc)


def _input_error(exc: BaseException) -> str | None:
    m = re.search(re.escape(T.INPUT_ERROR) + r"([^\n]*)", str(exc))
    return m.group(1).strip().rstrip("'\"") if m else None


def _read_and_remove(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    os.remove(path)
    return data


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run(cfg: dict, beam_args: list[str] | None = None, overwrite: bool = False) -> dict:
    """Run a job; returns the manifest (also written to ``<output>/manifest.json``)."""
    out = os.path.abspath(cfg["output"])
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise OutputExistsError(f"output {cfg['output']} already exists; pass --overwrite to replace it")
    rt = resolve_runtime(cfg)  # model paths and devices: fail before anything is written
    os.makedirs(os.path.dirname(out), exist_ok=True)
    run_id = cache_store.new_run_id()
    tmp = f"{out}.tmp-{run_id}"
    os.makedirs(tmp)
    flags = beam_flags(cfg["beam"], beam_args)
    options = PipelineOptions(flags)
    inputs = [{"source": s["source"], "format": f["format"], **fingerprint(f["path"])}
              for s in cfg["inputs"] for f in s["files"]]
    started, t0 = _now(), time.monotonic()
    log.info("curate: running job %r with %s", cfg["name"], " ".join(flags))
    try:
        p = beam.Pipeline(options=options)
        build(p, cfg, tmp, rt, run_id)
        result = p.run()
        state = result.wait_until_finish()
        if state not in (None, "DONE", beam.runners.runner.PipelineState.DONE):
            raise RuntimeError(f"pipeline ended in state {state}")
        stats, reports = _read_and_remove(tmp, "_stats.json"), _read_and_remove(tmp, "_reports.json")
        man = manifest_mod.build(cfg, stats, inputs, beam_options=options.get_all_options(drop_default=True),
                                 started=started, finished=_now(), wall_s=time.monotonic() - t0,
                                 reports=reports, runtime=rt)
        man["outputs"] = {name: os.path.join(out, name) for name in ("annotated", "selected", "rejects")}
        man["outputs"]["manifest"] = os.path.join(out, "manifest.json")
        if rt.get("embed"):
            man["outputs"]["embeddings"] = os.path.join(out, "embeddings")
        for name in ("annotated", "selected", "rejects"):
            os.makedirs(os.path.join(tmp, name), exist_ok=True)
            man["outputs"][f"{name}_files"] = len(glob.glob(os.path.join(tmp, name, "*.parquet")))
        _compact_caches(rt, run_id)
        man["outputs"]["report"] = os.path.join(out, "report.html")
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as fh:
            json.dump(man, fh, indent=2, default=str)
            fh.write("\n")
        _write_report(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        message = _input_error(exc)
        if message:
            raise InputError(message) from None
        raise
    if os.path.exists(out):
        old = f"{out}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
    return man
