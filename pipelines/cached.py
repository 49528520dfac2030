"""One building block for every costly per-row stage: look rows up in a cache, run the model on
the misses only, write the new results to the cache as they come.

    records -> (key, record) --CoGroupByKey-- (key, cached row) <- cache shards (Parquet)
        hit  -> record + cached columns
        miss -> RunInference(StageHandler) -> record + new columns -> staged cache shards

The lookup is a keyed join, not a side input: no worker holds the whole cache. New results are
written in shards while the stage runs (``curate.cache_store``), so a run that fails later, or
is killed half way, keeps what its model computed and the rerun reads it; the driver merges a
successful run's shards (``cache_store.compact``). Cached and fresh results are the same values:
the columns are stored with their declared Arrow types.
"""
from __future__ import annotations

import logging
import time

import apache_beam as beam
import pyarrow as pa
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from curate import cache_store
from curate.stats import Progress
from pipelines.stage import STATS, StageFn

log = logging.getLogger("curate")
MISS = "miss"
TOTAL = "_todo_total"  # rows this stage will send to the model, carried on each miss (for the ETA)


class StageHandler(ModelHandler):
    """A Beam ModelHandler for a curate stage: ``load_model`` and ``infer(batch, model, progress)``
    returning one dict of output columns per row. The base times each batch (the stage's busy
    time) and gives ``infer`` a progress callback (rows done, may be fractional) that logs at
    once after the first forward pass, then every 10 s, with an ETA."""

    stage = "stage"

    def infer(self, batch: list[dict], model, progress) -> list[dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _progress(self, total: int | None) -> Progress:
        p = getattr(self, "_progress_obj", None)
        if p is None:
            p = self._progress_obj = Progress(self.stage, total=total, log_first=True)
        return p

    def run_inference(self, batch, model, inference_args=None):
        progress = self._progress(batch[0].get(TOTAL) if batch else None)
        began, start = time.time(), time.perf_counter()
        outputs = self.infer(batch, model, progress.add)
        per_row = (time.perf_counter() - start) / max(len(batch), 1)
        timing = (per_row, began, time.time())
        return [PredictionResult(r, (o, timing)) for r, o in zip(batch, outputs)]


class SplitFn(StageFn):
    """A cache hit takes the cached columns; a miss goes to the model."""

    metrics = ("cached",)

    def __init__(self, stage: str, columns: tuple[str, ...], key_field: str):
        self.stage, self.columns, self.key_field = stage, columns, key_field

    def handle(self, element):
        key, grouped = element
        hits = list(grouped["cache"])
        hit = hits[0] if hits else None
        for record in grouped["rows"]:
            record[self.key_field] = key
            if hit is None:
                yield beam.pvalue.TaggedOutput(MISS, record)
            else:
                record.update({c: hit[c] for c in self.columns})
                self.count("cached")
                yield record


class AttachFn(StageFn):
    """The model's columns onto the record; model time counts as the stage's busy time."""

    metrics = ("model_rows", "model_s", "model_start_t", "model_end_t")

    def __init__(self, stage: str):
        self.stage = stage

    def handle(self, result):
        record = result.example
        columns, (seconds, began, ended) = result.inference
        record.pop(TOTAL, None)
        record.update(columns)
        self.count("model_rows")
        self.count("model_s", seconds)
        self.count("model_start_t", began)
        self.count("model_end_t", ended)
        yield record


class WriteCacheFn(beam.DoFn):
    """Appends each new result to the cache in shards (every ``flush_rows`` rows or 30 s, and at
    bundle end)."""

    def __init__(self, folder: str, schema: pa.Schema, key_field: str, run_id: str, flush_rows: int = 64,
                 cache_when=None):
        self.folder, self.schema, self.key_field, self.run_id = folder, schema, key_field, run_id
        self.flush_rows, self.cache_when = flush_rows, cache_when

    def start_bundle(self):
        self._writer = cache_store.ShardWriter(self.folder, self.schema, self.run_id, rows=self.flush_rows)

    def process(self, record):
        if self.cache_when is not None and not self.cache_when(record):
            return
        key_column = self.schema.names[0]
        row = {c: record[c] for c in self.schema.names[1:]}
        row[key_column] = record[self.key_field]
        self._writer.add(row)

    def finish_bundle(self):
        self._writer.flush()


def _with_total(record: dict, total: int) -> dict:
    record[TOTAL] = total
    return record


class CachedInference(beam.PTransform):
    """Records -> records with the handler's columns, from the cache where it has them.

    ``key_fn(record)``: the content key (a hash of exactly what the model reads); the cache
    folder already names the settings fingerprint. ``columns``: the Arrow fields the handler
    returns. ``cache``: the folder (None: no cache), ``cache_files``: the shards found there when
    the job started (listed by the driver, so the graph is fixed before it runs); ``flush_rows``:
    new results per cache shard (a killed run loses at most that many, or 30 s of work);
    ``cache_when(record)``: which new results are kept (default all; a teacher keeps only its
    successful replies, so a rerun retries the failures)."""

    def __init__(self, stage: str, handler: StageHandler, key_fn, columns: list[pa.Field],
                 cache: str | None = None, cache_files: list[str] | None = None, run_id: str = "run",
                 key_column: str = cache_store.KEY, flush_rows: int = 64, cache_when=None):
        super().__init__()
        self.flush_rows, self.cache_when = flush_rows, cache_when
        self.stage, self.handler, self.key_fn, self.columns = stage, handler, key_fn, list(columns)
        self.cache, self.cache_files, self.run_id = cache, list(cache_files or []), run_id
        self.key_field, self.key_column = f"_{stage}_key", key_column

    def cache_schema(self) -> pa.Schema:
        return pa.schema([pa.field(self.key_column, pa.string(), nullable=False), *self.columns],
                         metadata={"curate.cache_stage": self.stage})

    def expand(self, records):
        p = records.pipeline
        names = tuple(f.name for f in self.columns)
        stats = []
        if self.cache_files:
            key_fn, key_column = self.key_fn, self.key_column
            keyed = records | "Key" >> beam.Map(lambda r: (key_fn(r), r))
            stored = (p | "CacheFiles" >> beam.Create(self.cache_files)
                      | "ReadCache" >> beam.io.ReadAllFromParquet(columns=[key_column, *names])
                      | "CacheKey" >> beam.Map(lambda row: (row[key_column], row)))
            split = ({"rows": keyed, "cache": stored} | "Join" >> beam.CoGroupByKey()
                     | "Split" >> beam.ParDo(SplitFn(self.stage, names, self.key_field)).with_outputs(
                         MISS, STATS, main="hits"))
            misses, hits = split[MISS], split.hits
            stats.append(split[STATS])
        else:
            key_fn, field = self.key_fn, self.key_field
            misses = records | "Key" >> beam.Map(lambda r: {**r, field: key_fn(r)})
            hits = p | "NoHits" >> beam.Create([])
        total = misses | "CountMisses" >> beam.combiners.Count.Globally()
        fresh = (misses
                 | "Total" >> beam.Map(_with_total, beam.pvalue.AsSingleton(total))
                 | "RunInference" >> RunInference(self.handler)
                 | "Attach" >> beam.ParDo(AttachFn(self.stage)).with_outputs(STATS, main="records"))
        stats.append(fresh[STATS])
        if self.cache:
            fresh.records | "WriteCache" >> beam.ParDo(
                WriteCacheFn(self.cache, self.cache_schema(), self.key_field, self.run_id, self.flush_rows,
                             self.cache_when))
        return {"records": (hits, fresh.records) | "Merge" >> beam.Flatten(),
                "stats": stats | "Stats" >> beam.Flatten()}
