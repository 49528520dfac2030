"""The RDS+ stage: targeted scores from the weak LM's pooled hidden states (``curate.scoring.rds``;
the graph is ``pipelines.targeted``'s). Vectors are cached under ``cache_root()/rds/<settings
key>/`` (model, max_length, dtype)."""
from __future__ import annotations

import logging

from curate import cache_store
from curate.scoring.rds import COLUMNS, subtask_matrix, vectors_for
from curate.settings import RDS, Job
from pipelines.cached import StageHandler
from pipelines.score import WeakLM
from pipelines.targeted import TargetedStage

log = logging.getLogger("curate")


def settings_key(r: RDS, dtype: str) -> str:
    return cache_store.fingerprint({"model": r.model, "max_length": r.max_length, "dtype": dtype,
                                    "pool": "mean_last_hidden", "format": 1})


class RDSHandler(StageHandler):
    """Records in, ``{rds_vector, rds_status}`` out; the weak LM is loaded once per worker."""

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


class RDSStage(TargetedStage):
    """RDS+ columns on the rows still in play."""

    prefix = "rds"
    columns = COLUMNS.names
    hint = "raise score.rds.max_length or give rows with a response"

    def __init__(self, cfg: Job, rt: dict, run_id: str = "run", handler=None, target_handler=None):
        super().__init__(cfg, cfg.score.rds, rt, run_id, handler, target_handler)

    def handler(self, kind: str):
        return RDSHandler(self.settings, self.rt, "rds" if kind == "pool" else "rds_targets")

    def matrix(self, pairs):
        return subtask_matrix(pairs)
