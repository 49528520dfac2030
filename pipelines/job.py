"""Running a job: resolve the run-time choices (``pipelines.runtime``), build the graph
(``pipelines.graph``), run it, check the accounting, write the manifest, publish the output.

Outputs are written into a sibling temporary folder ``<output>.tmp-<run id>``;
only after the run succeeded and the accounting identity holds is
``manifest.json`` written (last) and the folder renamed to ``<output>``. A crash
leaves at most a ``.tmp-`` folder, never one that looks complete, and the next run of the same
output removes it once its owner process is provably gone (``curate.leftovers``). An existing
output is replaced only with ``overwrite``. On an object store (``s3://...``), which
has no rename, the temporary folder is a run-unique prefix and publishing copies it
with the manifest last (``curate.storage.publish``); readers refuse a folder without it.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from curate import cache_store, leftovers, storage
from curate import manifest as manifest_mod
from curate.errors import CurateError
from curate.schema import ANNOTATED, REJECTS, selected_schema
from curate.io import fingerprint
from curate.settings import Job
from pipelines import transforms as T
from pipelines.graph import REPORTS_FILE, STATS_FILE, build
from pipelines.runtime import beam_flags, resolve_runtime

log = logging.getLogger("curate")


class OutputExistsError(CurateError):
    pass


class InputError(CurateError):
    """An input file could not be read while the job ran (one line, names the file)."""


def _compact_caches(rt: dict, run_id: str) -> None:
    """Merge the cache shards this run wrote into one file per cache (the shards are already
    readable; this only keeps the file count down). A failure here costs nothing but files."""
    def folders(section: dict):  # "cache", "cache_pool", ...: a folder; nested sections (a student) too
        for k, v in section.items():
            if isinstance(v, dict):
                yield from folders(v)
            elif k.startswith("cache") and isinstance(v, str):
                yield v

    for folder in sorted(set(folders(rt))):
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
    path = storage.join(folder, name)
    with storage.open_file(path, "rb") as fh:
        data = json.load(fh)
    storage.remove(path)
    return data


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunnerError(CurateError):
    """A ``--runner`` Beam cannot make, or runner options that do not work."""


# The names --runner accepts for pipelines.dask_runner.DaskRunner.
DASK_RUNNER_NAMES = ("DaskRunner", "dask", "apache_beam.runners.dask.dask_runner.DaskRunner",
                     "pipelines.dask_runner.DaskRunner")


def make_runner(options: PipelineOptions):
    """The runner ``--runner`` names; None leaves the choice to Beam. ``DaskRunner`` (any of its
    names) is ours (``pipelines.dask_runner``); a name Beam cannot make is one line."""
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.runners.runner import create_runner

    name = options.view_as(StandardOptions).runner
    if not name or not isinstance(name, str):
        return name
    if name in DASK_RUNNER_NAMES:
        try:
            import dask.distributed  # noqa: F401
        except ImportError:
            raise RunnerError("--runner=DaskRunner needs dask.distributed: pip install 'dask[distributed]'") from None
        from pipelines import dask_runner  # imports Beam's Dask runner, which needs dask

        return dask_runner.DaskRunner()
    try:
        return create_runner(name)
    except Exception as exc:  # noqa: BLE001 - Beam raises ValueError, ImportError, AttributeError, ...
        why = str(exc).split(". ")[0].splitlines()[0] if str(exc) else type(exc).__name__
        raise RunnerError(f"--runner={name}: Beam cannot make this runner ({why}); try FnApiRunner, DaskRunner, "
                          "PortableRunner or the dotted path of a runner class") from None


def run(cfg: Job, beam_args: list[str] | None = None, overwrite: bool = False) -> dict:
    """Run a job; returns the manifest (also written to ``<output>/manifest.json``)."""
    out = storage.absolute(cfg.output)
    if storage.exists(out) and (not storage.isdir(out) or storage.listdir(out)) and not overwrite:
        raise OutputExistsError(f"output {cfg.output} already exists; pass --overwrite to replace it")
    rt = resolve_runtime(cfg)  # model paths and devices: fail before anything is written
    storage.makedirs(os.path.dirname(out))
    leftovers.remove_dead(out)
    run_id = cache_store.new_run_id()
    flags = beam_flags(cfg.beam, beam_args)
    options = PipelineOptions(flags)
    runner = make_runner(options)
    tmp = f"{out}.tmp-{run_id}"  # on a store: a run-unique prefix
    leftovers.claim(tmp)  # a run killed hard leaves it; the next run of this output removes it
    inputs = [{"source": s.source, "format": f.format, **fingerprint(f.path)} for s in cfg.inputs for f in s.files]
    started, t0 = _now(), time.monotonic()
    log.info("curate: running job %r with %s", cfg.name, " ".join(flags))
    try:
        p = beam.Pipeline(runner=runner, options=options)
        build(p, cfg, tmp, rt, run_id)
        result = p.run()
        state = result.wait_until_finish()
        if state not in (None, "DONE", beam.runners.runner.PipelineState.DONE):
            raise RuntimeError(f"pipeline ended in state {state}")
        stats, reports = _read_and_remove(tmp, STATS_FILE), _read_and_remove(tmp, REPORTS_FILE)
        man = manifest_mod.build(cfg, stats, inputs, beam_options=options.get_all_options(drop_default=True),
                                 started=started, finished=_now(), wall_s=time.monotonic() - t0,
                                 reports=reports, runtime=rt)
        man["outputs"] = {name: storage.join(out, name) for name in ("annotated", "selected", "rejects")}
        man["outputs"]["manifest"] = storage.join(out, "manifest.json")
        if rt.get("embed"):
            man["outputs"]["embeddings"] = storage.join(out, "embeddings")
        man["outputs"]["columns"] = {"annotated": ANNOTATED.names, "selected": selected_schema(cfg).names,
                                     "rejects": REJECTS.names}
        for name in ("annotated", "selected", "rejects"):
            storage.makedirs(storage.join(tmp, name))
            man["outputs"][f"{name}_files"] = len(storage.glob(storage.join(tmp, name, "*.parquet")))
        _compact_caches(rt, run_id)
        man["outputs"]["report"] = storage.join(out, "report.html")
        with storage.open_file(storage.join(tmp, "manifest.json"), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(man, indent=2, default=str) + "\n")
        _write_report(tmp)
    except BaseException as exc:
        storage.rmtree(tmp)
        message = _input_error(exc)
        if message:
            raise InputError(message) from None
        raise
    leftovers.release(tmp)
    storage.publish(tmp, out)
    return man
