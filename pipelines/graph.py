"""The job's Beam graph: one line per stage, in pipeline order.

Every stage returns a dict of PCollections: ``records`` going on, ``stats`` (stat key, number)
pairs, and where it has them ``rejects``, ``reports`` and ``embeddings``. The stats and reports
of all stages end in two JSON files the driver reads after the run (``pipelines.job``).
"""
from __future__ import annotations

import logging
import os

import apache_beam as beam

from curate.schema import selected_schema
from curate.settings import Job
from pipelines import batched
from pipelines import transforms as T

STATS_FILE, REPORTS_FILE = "_stats.json", "_reports.json"
log = logging.getLogger("curate")


def build(p: beam.Pipeline, cfg: Job, folder: str, rt: dict, run_id: str = "run") -> None:
    """Add the job's stages to ``p``, writing outputs under ``folder``; ``rt`` from
    ``pipelines.runtime.resolve_runtime``; ``run_id`` names this run's cache shards. A job the
    batch path can run (``pipelines.batched.eligible``) runs there."""
    why = batched.eligible(cfg, rt)
    if why is None:
        log.info("pipeline: the batch path (rows in Arrow batches)")
        out = batched.build(p, cfg, folder)
        _write_json(out["stats"], out["reports"], folder)
        return
    log.info("pipeline: the row path (%s)", why)
    _build_rows(p, cfg, folder, rt, run_id)


def _build_rows(p: beam.Pipeline, cfg: Job, folder: str, rt: dict, run_id: str) -> None:
    """The row path: one element per row through every stage (imported here: the model stages
    bring Beam's RunInference, which a batch-path job never loads)."""
    from pipelines.degradation import DegradationStage
    from pipelines.embed_cluster import EmbedClusterDedup
    from pipelines.less import LESSStage
    from pipelines.near_dedup import NearDedup
    from pipelines.rds import RDSStage
    from pipelines.realign import ReAlignStage
    from pipelines.rewrite import FAILURES, Reflection
    from pipelines.score import Score
    from pipelines.select import Select

    read = p | "Read" >> T.Read(cfg)
    valid = read["records"] | "Validate" >> T.Validate(cfg)
    ids = valid["records"] | "UniqueIds" >> T.UniqueIds(cfg)
    exact = ids["records"] | "ExactDedup" >> T.ExactDedup(cfg)
    reflected = exact["records"] | "Reflection" >> Reflection(cfg, rt.get("rewrite", {}), run_id)
    realigned = reflected["records"] | "ReAlign" >> ReAlignStage(cfg, rt.get("rewrite", {}), run_id)
    rewriting = "rewrite" in rt
    rewritten = (realigned["records"] | "ExactDedupRewritten" >> T.ExactDedup(cfg, after_rewrite=True)
                 if rewriting else realigned)  # a rewrite can duplicate another row
    near = rewritten["records"] | "NearDedup" >> NearDedup(cfg)
    ec = near["records"] | "EmbedCluster" >> EmbedClusterDedup(cfg, rt, run_id)
    scored = ec["records"] | "Score" >> Score(cfg, rt.get("score", {}), run_id)
    targeted = scored["records"] | "RDS" >> RDSStage(cfg, rt.get("rds", {}), run_id)
    less = targeted["records"] | "LESS" >> LESSStage(cfg, rt.get("less", {}), run_id)
    degraded = less["records"] | "Degradation" >> DegradationStage(cfg, rt.get("degradation", {}), run_id)
    selection = degraded["records"] | "Select" >> Select(cfg)

    if "embed" in rt:
        from curate.schema import embeddings_schema

        ec["embeddings"] | "WriteEmbeddings" >> beam.io.WriteToParquet(
            os.path.join(folder, "embeddings", "part"), embeddings_schema(rt["embed"]["dim"], rt["embed"]["key"]),
            file_name_suffix=".parquet", codec="zstd")
    rejects = (valid["rejects"], ids["rejects"]) | "AllRejects" >> beam.Flatten()
    written = {"annotated": selection["records"], "rejects": rejects} | "Write" >> T.WriteOutputs(folder, selected_schema(cfg))
    if "rewrite" in rt:
        from curate.schema import REWRITE_FAILURES

        failures = (reflected[FAILURES], realigned[FAILURES]) | "RewriteFailures" >> beam.Flatten()
        failures | "WriteRewriteFailures" >> beam.io.WriteToParquet(
            os.path.join(folder, "rewrite_failures", "part"), REWRITE_FAILURES, file_name_suffix=".parquet",
            codec="zstd")
    stats = (read["stats"], valid["stats"], ids["stats"], exact["stats"], reflected["stats"], realigned["stats"],
             *([rewritten["stats"]] if rewriting else []), near["stats"], ec["stats"],
             scored["stats"], targeted["stats"], less["stats"], degraded["stats"], written["stats"])
    _write_json(stats, (near["reports"], ec["reports"], selection["reports"]), folder)


def _write_json(stats, reports, folder: str) -> None:
    """Every stage's stats and reports into the two files the driver reads after the run."""
    tuple(stats) | "FlattenStats" >> beam.Flatten() | "Stats" >> T.WriteStats(os.path.join(folder, STATS_FILE))
    tuple(reports) | "FlattenReports" >> beam.Flatten() | "Reports" >> T.WriteJson(os.path.join(folder, REPORTS_FILE))
