"""The IFD / r-IFD scoring stage: the weak LM through the cached-inference block.

    live records -> CachedInference(IFDHandler) -> CountScores -> records with score columns

The cache lives under ``curate.models.cache_root()/scores/<settings key>/`` (settings:
model, template, max_length, compat mode, dtype), keyed by a hash of (instruction, input,
output); new scores are written there while the stage runs (``pipelines.cached``). Delete
the folder to clear it.
"""
from __future__ import annotations

import hashlib
import logging
import math

import apache_beam as beam

from curate import cache_store
from curate.scoring.ifd import COLUMNS as IFD_COLUMNS
from curate.scoring.ifd import IFDSettings, score_rows
from curate.settings import IFD as IFDStage
from curate.settings import Job
from pipelines.cached import CachedInference, StageHandler
from pipelines.stage import STATS, LiveStage, StageFn

log = logging.getLogger("curate")


def score_input(record: dict) -> dict:
    return {"instruction": record["_instruction"], "input": record["_input"], "output": record["response"]}


def score_text_hash(record: dict) -> str:
    r = score_input(record)
    text = "\x1f".join((r["instruction"], r["input"], r["output"]))
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def settings_key(p: IFDStage, dtype: str) -> str:
    """What the scores depend on besides the text: model, template, max_length, compat mode, dtype."""
    return cache_store.fingerprint({"model": p.model, "template": p.template, "max_length": p.max_length,
                                    "superfiltering_compat": p.superfiltering_compat, "dtype": dtype,
                                    "cache_format": 2})  # 2: shards keyed by "key" (pipelines.cached)


def default_batch_tokens(device: str) -> int:
    """Padded tokens per forward pass when the job leaves ``batch_tokens`` unset. On a CPU about a
    thousand keeps each layer's activations in cache (measured best of 512/768/1024/2048 on 2
    cores of an AMD EPYC with AVX-512); a GPU wants large batches (H100, bf16, SmolLM2-135M's shape: 443 rows/s at 16,384
    tokens and 256 rows, 562 at 65,536; 16,384 leaves room for larger models)."""
    return 16384 if device == "cuda" else 1024


class WeakLM:
    """The loaded model and its tokenizer (Beam's model sharing needs an object it can weak-reference)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer


class IFDHandler(StageHandler):
    """Records in, score dicts out; the weak LM is loaded once per worker."""

    stage = "score"

    def __init__(self, p: IFDStage, rt: dict):
        # the scorer gets bucket_rows rows at a time and sorts their four branches by length into
        # forward batches of at most batch_size rows and batch_tokens padded tokens, so the padding
        # stays small and the tensors stay cache-sized on a CPU
        rows = p.bucket_rows
        super().__init__(min_batch_size=rows, max_batch_size=rows)
        self.p, self.device, self.dtype, self.linear = p, rt["device"], rt["dtype"], rt["linear"]
        self.settings = IFDSettings(max_length=p.max_length, template=p.template,
                                    superfiltering_compat=p.superfiltering_compat, batch_size=p.batch_size,
                                    batch_tokens=rt["batch_tokens"])

    def load_model(self):
        from curate.models import load_causal_lm

        log.info("score: loading %s on %s (%s, %s linears)", self.p.model, self.device, self.dtype, self.linear)
        return WeakLM(*load_causal_lm(self.p.model, self.device, self.dtype, self.linear))

    def infer(self, batch, model, progress):
        return score_rows(model.model, model.tokenizer, [score_input(r) for r in batch], self.settings, progress)

    def get_metrics_namespace(self) -> str:
        return "curate.score"


class CountScoresFn(StageFn):
    """Per-status counts and the IFD >= 1 count, for the manifest."""

    stage = "score"
    metrics = ("rows", "ifd_status", "rifd_status", "ifd_ge_1")

    def handle(self, record):
        self.count("rows")
        self.count("ifd_status", reason=record["ifd_status"])
        self.count("rifd_status", reason=record["rifd_status"])
        loss = record["ifd_loss"]
        if loss is not None and math.isfinite(loss) and loss >= 1:
            self.count("ifd_ge_1")
        yield record


class Score(LiveStage):
    """IFD / r-IFD columns on the rows still in play (see ``LiveStage`` for the others)."""

    columns = IFD_COLUMNS.names

    def __init__(self, cfg: Job, rt: dict, run_id: str = "run", handler=None):
        """``rt``: the run-time choices of ``pipelines.runtime.resolve_runtime`` (device, dtype,
        linear kernel, batch_tokens, cache folder and files); empty when the stage is off.
        ``handler`` replaces the weak LM (tests)."""
        super().__init__()
        self.p, self.rt, self.run_id, self.handler = cfg.score.ifd, rt, run_id, handler
        self.enabled = self.p.enabled

    def expand_live(self, live):
        handler = self.handler or IFDHandler(self.p, self.rt)
        scored = live | "Infer" >> CachedInference("score", handler, score_text_hash, IFD_COLUMNS.fields(),
                                                   self.rt.get("cache"), self.rt.get("cache_files"), self.run_id)
        counted = scored["records"] | "CountScores" >> beam.ParDo(CountScoresFn()).with_outputs(STATS, main="records")
        return {"records": counted.records, "stats": (scored["stats"], counted[STATS]) | "ScoreStats" >> beam.Flatten()}
