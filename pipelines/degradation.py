"""The degradation stage: dense vs compressed model per row, through the cached-inference block.

    live records -> CachedInference(DegradationHandler) -> CountDegradation -> degradation columns

Cache: ``cache_root()/degradation/<settings key>/`` (dense model, compressed model fingerprint,
cutoff, dtype), keyed by a hash of the prompt and response.
"""
from __future__ import annotations

import hashlib
import logging

import apache_beam as beam

from curate import cache_store
from curate.scoring.degradation import COLUMNS, model_fingerprint, score_rows
from curate.settings import Degradation, Job
from pipelines.cached import CachedInference, StageHandler
from pipelines.stage import STATS, LiveStage, StageFn

log = logging.getLogger("curate")


def text_key(record: dict) -> str:
    text = record["prompt"] + "\x1f" + record["response"]
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def settings_key(d: Degradation, dtype: str) -> str:
    return cache_store.fingerprint({"model": d.model, "compressed": model_fingerprint(d.compressed),
                                    "cutoff": d.cutoff, "dtype": dtype, "format": 1})


class ModelPair:
    """The dense and the compressed model with their (shared) tokenizer."""

    def __init__(self, dense, compressed, tokenizer):
        self.dense, self.compressed, self.tokenizer = dense, compressed, tokenizer


class DegradationHandler(StageHandler):
    stage = "degradation"

    def __init__(self, d: Degradation, rt: dict):
        super().__init__(min_batch_size=d.bucket_rows, max_batch_size=d.bucket_rows)
        self.d, self.device, self.dtype = d, rt["device"], rt["dtype"]
        self.linear = rt.get("linear", "torch")

    def load_model(self):
        from curate.models import load_causal_lm

        log.info("degradation: loading %s and %s on %s (%s, %s linears)", self.d.model, self.d.compressed,
                 self.device, self.dtype, self.linear)
        dense, tok = load_causal_lm(self.d.model, self.device, self.dtype, self.linear)
        compressed, tok2 = load_causal_lm(self.d.compressed, self.device, self.dtype, self.linear)
        if tok.get_vocab() != tok2.get_vocab():
            raise ValueError("degradation: the dense and compressed models have different vocabularies")
        return ModelPair(dense, compressed, tok)

    def infer(self, batch, model, progress):
        return score_rows(model.dense, model.compressed, model.tokenizer, batch, self.d.cutoff, self.d.batch_size,
                          progress)

    def get_metrics_namespace(self) -> str:
        return "curate.degradation"


class CountDegradationFn(StageFn):
    stage = "degradation"
    metrics = ("rows", "status")

    def handle(self, record):
        self.count("rows")
        self.count("status", reason=record["degradation_status"])
        yield record


class DegradationStage(LiveStage):
    """Degradation columns on the rows still in play (see ``LiveStage`` for the others)."""

    columns = COLUMNS.names

    def __init__(self, cfg: Job, rt: dict, run_id: str = "run", handler=None):
        super().__init__()
        self.d, self.rt, self.run_id, self.handler = cfg.score.degradation, rt, run_id, handler
        self.enabled = self.d.enabled

    def expand_live(self, live):
        handler = self.handler or DegradationHandler(self.d, self.rt)
        out = live | "Infer" >> CachedInference("degradation", handler, text_key, COLUMNS.fields(),
                                                self.rt.get("cache"), self.rt.get("cache_files"), self.run_id)
        counted = out["records"] | "Count" >> beam.ParDo(CountDegradationFn()).with_outputs(STATS, main="records")
        return {"records": counted.records, "stats": (out["stats"], counted[STATS]) | "Stats" >> beam.Flatten()}
