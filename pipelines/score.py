"""The IFD / r-IFD scoring stage: RunInference with the weak LM, and a score cache.

    live records -> (cache side input) -> cached: scores from the cache
                                       -> new: RunInference(IFDHandler) -> scores
    new scores -> <tmp>/_scores_new/*.parquet, moved into the cache by the driver after success

The cache lives under ``curate.models.cache_root()/scores/<settings key>/`` (settings:
model, template, max_length, compat mode, dtype), one Parquet file per run, keyed by a
hash of (instruction, input, output). Delete the folder to clear it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from curate.scoring.ifd import IFDSettings, score_rows
from pipelines.stage import STATS, StageFn

log = logging.getLogger("curate")
SCORE_FIELDS = ("ifd_nll_cond", "ifd_nll_direct", "ifd_tokens", "ifd_tokens_direct", "ifd_loss", "ifd_ppl",
                "ifd_status", "rifd_nll_cond", "rifd_nll_direct", "rifd_loss", "rifd", "rifd_status")
NEW = "new"


def score_input(record: dict) -> dict:
    return {"instruction": record["_instruction"], "input": record["_input"], "output": record["response"]}


def score_text_hash(record: dict) -> str:
    r = score_input(record)
    text = "\x1f".join((r["instruction"], r["input"], r["output"]))
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def settings_key(p: dict, dtype: str) -> str:
    spec = {k: p[k] for k in ("model", "template", "max_length", "superfiltering_compat")}
    spec["dtype"] = dtype
    return hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=8).hexdigest()


def cache_folder(p: dict, dtype: str) -> str:
    """``cache_dir`` (default: ``cache_root()/scores``) / settings key."""
    from curate.models import cache_root

    return os.path.join(p.get("cache_dir") or os.path.join(cache_root(), "scores"), settings_key(p, dtype))


def default_batch_tokens(device: str) -> int:
    """Padded tokens per forward pass when the job leaves ``batch_tokens`` unset. On a CPU about a
    thousand keeps each layer's activations in cache (measured best of 512/768/1024/2048 on 2
    cores); a GPU wants large batches (H100, bf16, SmolLM2-135M's shape: 443 rows/s at 16,384
    tokens and 256 rows, 562 at 65,536; 16,384 leaves room for larger models)."""
    return 16384 if device == "cuda" else 1024


class WeakLM:
    """The loaded model and its tokenizer (Beam's model sharing needs an object it can weak-reference)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer


class IFDHandler(ModelHandler[dict, dict, WeakLM]):
    """Records in, score dicts out; the weak LM is loaded once per worker."""

    def __init__(self, p: dict, rt: dict):
        # the scorer gets bucket_rows rows at a time and sorts their four branches by length into
        # forward batches of at most batch_size rows and batch_tokens padded tokens, so the padding
        # stays small and the tensors stay cache-sized on a CPU
        rows = p["bucket_rows"]
        super().__init__(min_batch_size=rows, max_batch_size=rows)
        self.p, self.device, self.dtype, self.linear = p, rt["device"], rt["dtype"], rt["linear"]
        self.settings = IFDSettings(max_length=p["max_length"], template=p["template"],
                                    superfiltering_compat=p["superfiltering_compat"], batch_size=p["batch_size"],
                                    batch_tokens=rt["batch_tokens"])

    def load_model(self):
        from curate.models import load_causal_lm

        log.info("score: loading %s on %s (%s, %s linears)", self.p["model"], self.device, self.dtype, self.linear)
        return WeakLM(*load_causal_lm(self.p["model"], self.device, self.dtype, self.linear))

    def run_inference(self, batch, model, inference_args=None):
        scores = score_rows(model.model, model.tokenizer, [score_input(r) for r in batch], self.settings)
        return [PredictionResult(r, s) for r, s in zip(batch, scores)]

    def get_metrics_namespace(self) -> str:
        return "curate.score"


class FromCacheFn(StageFn):
    stage = "score"

    def handle(self, record, cached):
        record["_score_hash"] = h = score_text_hash(record)
        hit = cached.get(h)
        if hit is None:
            yield beam.pvalue.TaggedOutput(NEW, record)
        else:
            record.update({k: hit[k] for k in SCORE_FIELDS})
            self.count("cached")
            yield record


class AttachScoresFn(StageFn):
    stage = "score"

    def handle(self, result):
        record = result.example
        record["_score_hash"] = record.get("_score_hash") or score_text_hash(record)
        record.update(result.inference)
        self.count("model_rows", progress=True)
        yield record


class CountScoresFn(StageFn):
    """Per-status counts and the IFD >= 1 count, for the manifest."""

    stage = "score"

    def handle(self, record):
        self.count("rows")
        self.count("ifd_status", reason=record["ifd_status"])
        self.count("rifd_status", reason=record["rifd_status"])
        loss = record["ifd_loss"]
        if loss is not None and math.isfinite(loss) and loss >= 1:
            self.count("ifd_ge_1")
        yield record


def _null_scores(record: dict) -> dict:
    for k in SCORE_FIELDS:
        record.setdefault(k, None)
    return record


def _cache_row(record: dict) -> dict:
    return {"text_hash": record["_score_hash"], **{k: record[k] for k in SCORE_FIELDS}}


class Score(beam.PTransform):
    """IFD / r-IFD columns on the rows still in play; the others keep nulls (never 0)."""

    def __init__(self, cfg: dict, rt: dict, new_folder: str):
        """``rt``: the run-time choices of ``pipelines.job.resolve_runtime`` (device, dtype, linear
        kernel, batch_tokens, cache files); empty when the stage is off."""
        super().__init__()
        self.p, self.rt, self.new_folder = cfg["score"]["ifd"], rt, new_folder
        self.cache_files = rt.get("cache_files", [])

    def expand(self, records):
        p = records.pipeline
        if not self.p["enabled"]:
            return {"records": records | "NoScores" >> beam.Map(_null_scores),
                    "stats": p | "NoScoreStats" >> beam.Create([])}
        live = records | "Live" >> beam.Filter(lambda r: r.get("drop_reason") is None)
        done = (records | "Dropped" >> beam.Filter(lambda r: r.get("drop_reason") is not None)
                | "NullScores" >> beam.Map(_null_scores))
        stats = []
        if self.cache_files:
            stored = (p | "CacheFiles" >> beam.Create(self.cache_files)
                      | "ReadCache" >> beam.io.ReadAllFromParquet()
                      | "CachePairs" >> beam.Map(lambda r: (r["text_hash"], r)))
            split = live | "FromCache" >> beam.ParDo(FromCacheFn(), beam.pvalue.AsDict(stored)).with_outputs(
                NEW, STATS, main="cached")
            new, cached = split[NEW], split.cached
            stats.append(split[STATS])
        else:
            new, cached = live, p | "NothingCached" >> beam.Create([])
        scored = (new
                  | "RunInference" >> RunInference(IFDHandler(self.p, self.rt))
                  | "AttachScores" >> beam.ParDo(AttachScoresFn()).with_outputs(STATS, main="records"))
        stats.append(scored[STATS])
        from curate.schema import SCORE_CACHE

        (scored.records | "CacheRows" >> beam.Map(_cache_row)
         | "WriteNewScores" >> beam.io.WriteToParquet(os.path.join(self.new_folder, "part"), SCORE_CACHE,
                                                      file_name_suffix=".parquet"))
        counted = ((cached, scored.records) | "AllScored" >> beam.Flatten()
                   | "CountScores" >> beam.ParDo(CountScoresFn()).with_outputs(STATS, main="records"))
        stats.append(counted[STATS])
        return {"records": (done, counted.records) | "ScoreOut" >> beam.Flatten(),
                "stats": stats | "ScoreStats" >> beam.Flatten()}
