"""Composite PTransforms, one per stage. Thin wrappers: the rules live in ``curate``.

Each stage returns a dict of PCollections: ``records`` (rows going on),
``rejects`` (rows leaving for rejects/, when the stage can reject) and ``stats``
(stat key, number) pairs, see ``pipelines.stage``.
"""
from __future__ import annotations

import dataclasses

import apache_beam as beam

from curate.dedup.exact import dedup_key, resolve_group
from curate.ids import resolve_ids
from curate.io import SourceReadError, iter_file, jsonl_chunks, sample_rows
from curate.records import FieldMap, RowSpec, convert, make_reject
from curate.settings import Job, Sample
from curate.stats import merge
from pipelines.locators import chunks
from pipelines.stage import STATS, StageFn, is_live

REJECTS = "rejects"
INPUT_ERROR = "curate-input-error: "


def read_units(cfg: Job) -> list[dict]:
    """What the Read stage reads in parallel: a piece of about 8 MB of a large local JSON lines
    file, one other file, or a whole source when sampling (a sample is taken over a source's
    rows, so its files are read in one place). Pieces keep a worker's memory bounded whatever
    the file size."""
    units = []
    for spec in cfg.inputs:
        files = list(spec.files)
        if cfg.sample.mode != "none":
            units.append({"source": spec.source, "files": files})
            continue
        for f in files:
            pieces = jsonl_chunks(f.path) if f.format == "jsonl" else [(0, -1, 1)]
            for piece in pieces:
                units.append({"source": spec.source, "files": [f], "range": piece if len(pieces) > 1 else None})
    return units


class ReadFn(StageFn):
    stage = "read"
    metrics = ("files", "rows", "rows_seen")

    def __init__(self, sample: Sample, batch_size: int):
        self.sample, self.batch_size = sample, batch_size

    def handle(self, unit):
        source = unit["source"]
        seen = 0

        def rows():
            nonlocal seen
            piece = unit.get("range")
            for f in unit["files"]:
                if piece is None or piece[0] == 0:
                    self.count("files", source=source)
                for row in iter_file(f.path, f.format, piece):
                    seen += 1
                    yield row

        s = self.sample
        try:
            chosen = sample_rows(rows(), source, s.mode, s.n, s.fraction, s.seed)
            for batch in chunks(chosen, self.batch_size):
                self.count("rows", len(batch), source=source, progress=True)
                yield source, batch
        except SourceReadError as err:
            raise SourceReadError(INPUT_ERROR + str(err)) from None
        self.count("rows_seen", seen, source=source)


class Read(beam.PTransform):
    """Input files to batches of raw rows, ``(source, [RawRow, ...])``."""

    def __init__(self, cfg: Job):
        super().__init__()
        self.cfg = cfg

    def expand(self, pbegin):
        out = (pbegin
               | "Units" >> beam.Create(read_units(self.cfg), reshuffle=True)
               | "ReadFiles" >> beam.ParDo(ReadFn(self.cfg.sample, self.cfg.batch_size))
               .with_outputs(STATS, main="records"))
        return {"records": out.records, "stats": out[STATS]}


def row_specs(cfg: Job, sources=None) -> dict[str, RowSpec]:
    """How each input's (or each of ``sources``') rows become records."""
    return {s.source: RowSpec(source=s.source, form=s.form, fields=FieldMap(**dataclasses.asdict(s.fields)),
                              id_field=s.id_field, max_chars=cfg.validate.max_chars)
            for s in (cfg.inputs if sources is None else sources)}


class ValidateFn(StageFn):
    stage = "validate"
    metrics = ("rejected", "records")

    def __init__(self, specs: dict[str, RowSpec]):
        self.specs = specs

    def handle(self, element):
        source, batch = element
        spec = self.specs[source]
        for raw in batch:
            if raw.bad_reason:
                kind, item = "reject", make_reject(source, raw.file, raw.row_number, raw.bad_reason,
                                                   raw.bad_detail, raw.raw_text)
            else:
                kind, item = convert(raw.value, spec, raw.file, raw.row_number)
            if kind == "reject":
                self.count("rejected", reason=item["reason"], source=source)
                yield beam.pvalue.TaggedOutput(REJECTS, item)
            else:
                item["_file"], item["_row"] = raw.file, raw.row_number
                self.count("records", source=source)
                yield item
        self._progress.add(len(batch))


class Validate(beam.PTransform):
    """Raw rows to records; bad rows to rejects with a reason code."""

    def __init__(self, cfg: Job):
        super().__init__()
        self.specs = row_specs(cfg)

    def expand(self, batches):
        out = batches | "Convert" >> beam.ParDo(ValidateFn(self.specs)).with_outputs(
            REJECTS, STATS, main="records")
        return {"records": out.records, "rejects": out[REJECTS], "stats": out[STATS]}


class UniqueIdsFn(StageFn):
    stage = "ids"
    metrics = ("rows", "renumbered", "rejected")

    def __init__(self, user_id_sources: frozenset[str]):
        self.user_id_sources = user_id_sources

    def handle(self, element):
        _, records = element
        records = list(records)
        self.count("rows", len(records))
        kept, rejects = resolve_ids(records, records[0]["source"] in self.user_id_sources)
        if len(kept) > 1:
            self.count("renumbered", len(kept) - 1)
        for rej in rejects:
            self.count("rejected", reason=rej["reason"], source=rej["source"])
            yield beam.pvalue.TaggedOutput(REJECTS, rej)
        yield from kept


class UniqueIds(beam.PTransform):
    """Group by id so every id names one row (see ``curate.ids``)."""

    def __init__(self, cfg: Job):
        super().__init__()
        self.user = frozenset(s.source for s in cfg.inputs if s.id_field)

    def expand(self, records):
        # user ids may repeat across sources: key by (source, id) there, by id otherwise
        out = (records
               | "KeyById" >> beam.Map(lambda r: ((r["source"], r["id"]), r))
               | "GroupById" >> beam.GroupByKey()
               | "Resolve" >> beam.ParDo(UniqueIdsFn(self.user)).with_outputs(REJECTS, STATS, main="records"))
        return {"records": out.records, "rejects": out[REJECTS], "stats": out[STATS]}


class ExactDedupFn(StageFn):
    stage = "exact_dedup"
    metrics = ("rows", "groups", "dropped")

    def __init__(self, source_rank: dict[str, int]):
        self.source_rank = source_rank

    def handle(self, element):
        _, records = element
        records = resolve_group(list(records), self.source_rank)
        self.count("rows", len(records))
        self.count("groups")
        for rec in records:
            if rec.get("drop_reason") == "exact_duplicate":
                self.count("dropped", source=rec["source"])
        self._progress.add(len(records))
        yield from records


class RewrittenDedupFn(ExactDedupFn):
    stage = "exact_dedup_rewritten"


class ExactDedup(beam.PTransform):
    """Mark exact duplicates (normalized prompt + response); keep one per group.

    ``after_rewrite``: the second pass of a job with teacher rewrites. The first pass runs before
    the rewrites, so a duplicate is never sent to the teacher; this one looks again at the rows
    still in play (a rewrite can duplicate another row) and lets dropped rows go around it."""

    def __init__(self, cfg: Job, after_rewrite: bool = False):
        super().__init__()
        self.enabled = cfg.dedup.exact.enabled
        self.scope = cfg.dedup.exact.scope
        self.rank = {s.source: i for i, s in enumerate(cfg.inputs)}
        self.after_rewrite = after_rewrite

    def expand(self, records):
        if not self.enabled:
            marked = records | "NoExactDedup" >> beam.Map(lambda r: {**r, "exact_dup_of": None})
            return {"records": marked, "stats": marked.pipeline | "NoStats" >> beam.Create([])}
        scope, fn = self.scope, (RewrittenDedupFn if self.after_rewrite else ExactDedupFn)(self.rank)
        live = records
        if self.after_rewrite:
            live = records | "Live" >> beam.Filter(is_live)
            done = records | "Dropped" >> beam.Filter(lambda r: not is_live(r))
        out = (live
               | "Key" >> beam.Map(lambda r: (dedup_key(r["prompt"], r["response"], r["source"], scope), r))
               | "Group" >> beam.GroupByKey()
               | "Resolve" >> beam.ParDo(fn).with_outputs(STATS, main="records"))
        if not self.after_rewrite:
            return {"records": out.records, "stats": out[STATS]}
        return {"records": (done, out.records) | "Merge" >> beam.Flatten(), "stats": out[STATS]}


class TallyFn(StageFn):
    """Counts rows handed to a writer, by decision, reason and source."""

    stage = "write"
    metrics = ("rejected", "selected", "dropped")

    def __init__(self, kind: str):
        self.kind = kind

    def handle(self, row):
        if self.kind == "rejects":
            self.count("rejected", reason=row["reason"], source=row["source"])
        elif row["selected"]:
            self.count("selected", source=row["source"])
        else:
            self.count("dropped", reason=row["drop_reason"], source=row["source"])
        yield row


def to_output_row(record: dict, fields: list[str]) -> dict:
    """The output columns; ``instruction``/``input`` come from the record's internal ``_`` fields."""
    return {name: record[name] if name in record else record.get("_" + name) for name in fields}


class WriteOutputs(beam.PTransform):
    """annotated/, selected/ and rejects/ as Parquet with the declared schemas."""

    def __init__(self, folder: str, selected_schema=None):
        super().__init__()
        self.folder, self.selected_schema = folder, selected_schema

    def expand(self, pcolls):
        from curate import schema

        annotated, rejects = pcolls["annotated"], pcolls["rejects"]
        names = schema.ANNOTATED.names
        rows = (annotated
                | "AnnotatedRow" >> beam.Map(to_output_row, names)
                | "TallyAnnotated" >> beam.ParDo(TallyFn("annotated")).with_outputs(STATS, main="rows"))
        rej = rejects | "TallyRejects" >> beam.ParDo(TallyFn("rejects")).with_outputs(STATS, main="rows")
        parquet = dict(file_name_suffix=".parquet", codec="zstd")
        rows.rows | "WriteAnnotated" >> beam.io.WriteToParquet(
            f"{self.folder}/annotated/part", schema.ANNOTATED, **parquet)
        (rows.rows
         | "OnlySelected" >> beam.Filter(lambda r: r["selected"])
         | "WriteSelected" >> beam.io.WriteToParquet(f"{self.folder}/selected/part",
                                                    self.selected_schema or schema.SELECTED, **parquet))
        rej.rows | "WriteRejects" >> beam.io.WriteToParquet(
            f"{self.folder}/rejects/part", schema.REJECTS, **parquet)
        return {"stats": (rows[STATS], rej[STATS]) | "FlattenWriteStats" >> beam.Flatten()}


class WriteJson(beam.PTransform):
    """(key, JSON-able value) pairs into one JSON object file, read by the driver after the run."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, pairs):
        import json

        return (pairs
                | "All" >> beam.combiners.ToList()
                | "Json" >> beam.Map(lambda items: json.dumps(dict(sorted(items)), default=str))
                | "Write" >> beam.io.WriteToText(self.path, num_shards=1, shard_name_template=""))


class WriteStats(beam.PTransform):
    """Every stage's stats merged into one JSON file (sums; earliest / latest for times)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, stats):
        return (stats | "ByKey" >> beam.GroupByKey()
                | "Merge" >> beam.MapTuple(lambda key, values: (key, merge(key, values)))
                | "Json" >> WriteJson(self.path))
