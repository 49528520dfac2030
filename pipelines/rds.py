"""The RDS+ stage: targeted scores from the weak LM's pooled hidden states.

    targets (read by the driver) -> CachedInference(RDSHandler) -> per-subtask means --side input--+
    live records -> CachedInference(RDSHandler) -> Match (score, subtask, counts) -> rds columns

The vectors, not the scores, are cached (``cache_root()/rds/<settings key>/``: model, max_length,
dtype; keyed by a hash of prompt and response), so a new target set costs only its own rows'
forward passes and the matching. The targets are small (tens to hundreds of rows): their
per-subtask mean vectors travel as a side input of a few KB.
"""
from __future__ import annotations

import logging
from collections import Counter

import apache_beam as beam
import numpy as np
import pyarrow as pa

from curate import cache_store
from curate.errors import CurateError
from curate.scoring.rds import COLUMNS, match, subtask_matrix, vectors_for
from curate.settings import RDS, Job
from pipelines.cached import CachedInference, StageHandler
from pipelines.degradation import text_key
from pipelines.score import WeakLM
from pipelines.stage import STATS, LiveStage, StageFn
from pipelines.transforms import INPUT_ERROR, row_specs

log = logging.getLogger("curate")
CACHED = [pa.field("rds_vector", pa.list_(pa.float32())), pa.field("rds_status", pa.string())]


def settings_key(r: RDS, dtype: str) -> str:
    return cache_store.fingerprint({"model": r.model, "max_length": r.max_length, "dtype": dtype,
                                    "pool": "mean_last_hidden", "format": 1})


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


class RDSHandler(StageHandler):
    """Records in, ``{rds_vector, rds_status}`` out; the weak LM is loaded once per worker."""

    stage = "rds"

    def __init__(self, r: RDS, rt: dict, stage: str = "rds"):
        super().__init__(min_batch_size=r.bucket_rows, max_batch_size=r.bucket_rows)
        self.r, self.device, self.dtype, self.linear = r, rt["device"], rt["dtype"], rt.get("linear", "torch")
        self.stage = stage

    def load_model(self):
        from curate.models import load_causal_lm

        log.info("%s: loading %s on %s (%s, %s linears)", self.stage, self.r.model, self.device, self.dtype,
                 self.linear)
        return WeakLM(*load_causal_lm(self.r.model, self.device, self.dtype, self.linear))

    def infer(self, batch, model, progress):
        pairs = vectors_for(model.model, model.tokenizer, batch, self.r.max_length, self.r.batch_size, progress)
        return [{"rds_vector": None if v is None else v.tolist(), "rds_status": s} for v, s in pairs]

    def get_metrics_namespace(self) -> str:
        return f"curate.{self.stage}"


def target_means(rows: list[dict]) -> dict:
    """The side input: subtask names and their mean unit vectors, from the scored target rows. A
    subtask none of whose rows could be scored would vanish from the max over subtasks: that is
    an input error to fix, reported as one line (``INPUT_ERROR``), not a silent loss."""
    by_subtask: dict[str, list[dict]] = {}
    for r in rows:
        by_subtask.setdefault(r["source"], []).append(r)
    for name, members in sorted(by_subtask.items()):
        if all(r["rds_vector"] is None for r in members):
            statuses = Counter(r["rds_status"] for r in members)
            raise ValueError(f"{INPUT_ERROR}targets ({name}): no row could be scored "
                             f"({', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}); "
                             "raise score.rds.max_length or give rows with a response")
    names, matrix = subtask_matrix([(r["source"], np.asarray(r["rds_vector"], dtype=np.float32)) for r in rows
                                    if r["rds_vector"] is not None])
    return {"names": names, "matrix": matrix}


class MatchFn(StageFn):
    """Each row's score against the targets; the cached vector leaves the record here."""

    stage = "rds"
    metrics = ("rows", "status")

    def handle(self, record, targets):
        vector = record.pop("rds_vector", None)
        status = record["rds_status"]
        score, subtask = match(vector if status in ("ok", "response_truncated") else None,
                               targets["names"], targets["matrix"])
        record["rds_score"], record["rds_subtask"] = score, subtask
        self.count("rows")
        self.count("status", reason=status)
        yield record


class RDSStage(LiveStage):
    """RDS+ columns on the rows still in play (see ``LiveStage`` for the others)."""

    columns = COLUMNS.names

    def __init__(self, cfg: Job, rt: dict, run_id: str = "run", handler=None, target_handler=None):
        super().__init__()
        self.r, self.rt, self.run_id = cfg.score.rds, rt, run_id
        self.handler, self.target_handler = handler, target_handler
        self.enabled = self.r.enabled
        self.targets = read_targets(cfg) if self.enabled else []

    def expand_live(self, live):
        p = live.pipeline
        cache, files = self.rt.get("cache"), self.rt.get("cache_files")
        handler = self.handler or RDSHandler(self.r, self.rt)
        target_handler = self.target_handler or RDSHandler(self.r, self.rt, "rds_targets")
        targets = (p | "Targets" >> beam.Create(self.targets, reshuffle=False)
                   | "TargetVectors" >> CachedInference("rds_targets", target_handler, text_key, CACHED, cache,
                                                         files, self.run_id))
        means = (targets["records"] | "AllTargets" >> beam.combiners.ToList()
                 | "SubtaskMeans" >> beam.Map(target_means))
        rows = live | "Vectors" >> CachedInference("rds", handler, text_key, CACHED, cache, files, self.run_id)
        matched = (rows["records"] | "Match" >> beam.ParDo(MatchFn(), beam.pvalue.AsSingleton(means))
                   .with_outputs(STATS, main="records"))
        stats = (targets["stats"], rows["stats"], matched[STATS]) | "Stats" >> beam.Flatten()
        return {"records": matched.records, "stats": stats}
