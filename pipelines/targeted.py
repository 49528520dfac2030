"""What the targeted scores (RDS+, LESS) share: the job's targets, one vector per subtask, and a
match per row.

    targets (read by the driver) -> CachedInference(handler for targets) -> per-subtask means --side input--+
    live records -> CachedInference(handler for rows) -> Match (score, subtask, counts) -> score columns

A stage caches the per-row vectors, not the scores (its cache folder names the settings they
depend on; rows are keyed by a hash of prompt and response), so a new target set costs only its
own rows' vectors and the matching. The targets are small (tens to hundreds of rows): their
per-subtask vectors travel as a side input of a few KB to a few MB.
"""
from __future__ import annotations

from collections import Counter

import apache_beam as beam
import numpy as np
import pyarrow as pa

from curate.errors import CurateError
from curate.scoring.rds import SCORED, match_all
from curate.settings import Job
from pipelines.cached import CachedInference
from pipelines.degradation import text_key
from pipelines.stage import STATS, LiveStage, StageFn
from pipelines.transforms import INPUT_ERROR, row_specs


def read_targets(job: Job) -> list[dict]:
    """The job's target rows as records (``source`` = subtask), read by the driver: a target row
    that cannot be read is an error to fix, not a reject."""
    from curate.io import iter_file
    from curate.records import convert

    specs = row_specs(job, job.targets)
    out = []
    for t in job.targets:
        for f in t.files:
            for raw in iter_file(f.path, f.format):
                if raw.bad_reason:
                    raise CurateError(f"targets ({t.source}): row {raw.row_number} of {f.path} cannot be read: "
                                      f"{raw.bad_reason} {raw.bad_detail}".rstrip())
                kind, record = convert(raw.value, specs[t.source], f.path, raw.row_number)
                if kind != "record":
                    raise CurateError(f"targets ({t.source}): row {raw.row_number} of {f.path} is not usable: "
                                      f"{record['reason']} ({record['detail']})")
                out.append(record)
    if not out:
        raise CurateError("targets: the target files hold no rows")
    return out


def target_means(rows: list[dict], prefix: str, matrix_fn, hint: str) -> dict:
    """The side input: subtask names and their matrix (``matrix_fn`` of (subtask, vector) pairs),
    from the target rows with ``<prefix>_vector`` and ``<prefix>_status``. A subtask none of
    whose rows could be scored would vanish from the max over subtasks: that is an input error to
    fix, reported as one line (``INPUT_ERROR``), not a silent loss."""
    vector, status = f"{prefix}_vector", f"{prefix}_status"
    by_subtask: dict[str, list[dict]] = {}
    for r in rows:
        by_subtask.setdefault(r["source"], []).append(r)
    for name, members in sorted(by_subtask.items()):
        if all(r[vector] is None for r in members):
            statuses = Counter(r[status] for r in members)
            raise ValueError(f"{INPUT_ERROR}targets ({name}): no row could be scored "
                             f"({', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}); {hint}")
    names, matrix = matrix_fn([(r["source"], np.asarray(r[vector], dtype=np.float32)) for r in rows
                               if r[vector] is not None])
    return {"names": names, "matrix": matrix}


class MatchFn(StageFn):
    """Each row's score against the targets; the cached vector leaves the record here."""

    metrics = ("rows", "status")

    def __init__(self, prefix: str):
        self.stage = self.prefix = prefix

    def handle(self, record, targets):
        p = self.prefix
        vector = record.pop(f"{p}_vector", None)
        status = record[f"{p}_status"]
        record[f"{p}_score"], record[f"{p}_subtask"], record[f"{p}_subtasks"] = match_all(
            vector if status in SCORED else None, targets["names"], targets["matrix"])
        self.count("rows")
        self.count("status", reason=status)
        yield record


class TargetedStage(LiveStage):
    """A targeted score's columns on the rows still in play. A subclass names its ``prefix``
    (``<prefix>_vector``, ``_status``, ``_score``, ``_subtask``; the stage names ``<prefix>`` and
    ``<prefix>_targets``), ``columns``, ``handler(kind)`` for ``pool`` or ``targets``,
    ``matrix(pairs)`` and the ``hint`` for a subtask none of whose rows scores."""

    prefix = "targeted"
    hint = ""

    def __init__(self, cfg: Job, settings, rt: dict, run_id: str = "run", handler=None, target_handler=None):
        super().__init__()
        self.settings, self.rt, self.run_id = settings, rt, run_id
        self.handlers = {"pool": handler, "targets": target_handler}
        self.enabled = settings.enabled
        self.targets = read_targets(cfg) if self.enabled else []

    def cached(self) -> list[pa.Field]:
        return [pa.field(f"{self.prefix}_vector", pa.list_(pa.float32())),
                pa.field(f"{self.prefix}_status", pa.string())]

    def handler(self, kind: str):  # pragma: no cover - abstract
        raise NotImplementedError

    def matrix(self, pairs):  # pragma: no cover - abstract
        raise NotImplementedError

    def cache_of(self, kind: str) -> tuple[str | None, list[str]]:
        return self.rt.get("cache"), self.rt.get("cache_files")

    def infer(self, kind: str):
        handler = self.handlers[kind] or self.handler(kind)
        stage = self.prefix if kind == "pool" else f"{self.prefix}_targets"
        folder, files = self.cache_of(kind)
        return CachedInference(stage, handler, text_key, self.cached(), folder, files, self.run_id,
                               flush_rows=getattr(self.settings, "bucket_rows", 64))

    def expand_live(self, live):
        p, prefix, hint, matrix = live.pipeline, self.prefix, self.hint, self.matrix
        targets = (p | "Targets" >> beam.Create(self.targets, reshuffle=False)
                   | "TargetVectors" >> self.infer("targets"))
        means = (targets["records"] | "AllTargets" >> beam.combiners.ToList()
                 | "SubtaskMeans" >> beam.Map(lambda rows: target_means(rows, prefix, matrix, hint)))
        rows = live | "Vectors" >> self.infer("pool")
        matched = (rows["records"] | "Match" >> beam.ParDo(MatchFn(prefix), beam.pvalue.AsSingleton(means))
                   .with_outputs(STATS, main="records"))
        stats = (targets["stats"], rows["stats"], matched[STATS]) | "Stats" >> beam.Flatten()
        return {"records": matched.records, "stats": stats}
