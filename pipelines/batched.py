"""The non-model path with batches as elements: decisions are shuffled, rows are not.

Why: the row path (``pipelines.graph`` with ``path: row``) moves one Python dict per row through
every shuffle and keeps each materialized collection in memory, about 30 KB a row on the
in-process runner. Here a row never crosses a shuffle:

    units (pieces of the input files, numbered)
      Scan:  read + validate each unit in batches (``unit_batches``: JSON lines and Parquet become
             records as Arrow columns, ``curate.json_rows``, the rows it leaves one by one); per batch, compact
             arrays only: ids, 16-byte exact keys, LSH band keys with each row's locator
             (``pipelines.locators``), the near text (compressed), the selection features
      Ids:   (id, locator) arrays by id shard -> repeated ids numbered or rejected
      Exact: (key, id, locator) arrays by key shard -> one kept per key
      Near:  ``pipelines.batched_near`` (buckets, candidates, edges, clusters in arrays)
      Select: ``pipelines.batched_select`` (a keyed policy, per batch and per range)
      Apply: every decision grouped by unit; each unit is read again, its rows get their
             decisions and are written by the step itself, one annotated and one selected
             Parquet file per unit (``ApplyFn``).

A unit is read twice (Apply, its second reading included, took 42 of the 168 s at a million
rows on 2 cores of an AMD EPYC with AVX-512, before records were built as columns); in exchange no collection holds the rows, only a few numbers a row and the near text until
the candidates' signatures are made. Decisions that later steps need (renamed or rejected ids,
rows already dropped) reach them as side inputs: they cover the rows that changed, a small share
of the pool.

The rules are the row path's (``curate.ids``, ``curate.dedup``, ``curate.select.keyed``), so the
outputs are the same (tests/test_batched.py compares the two); the path runs when no model or
rewrite stage is on and the policy is keyed (``eligible``), else the row path runs.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.dedup import minhash
from curate.dedup.exact import dedup_keys
from curate.dedup.near import band_keys, source_salt
from curate.io import (RawRow, SourceReadError, iter_file, jsonl_lines, parquet_batches, parse_line, read_errors,
                       sample_rows)
from curate.json_rows import convert_block, convert_table
from curate.records import convert, make_reject
from curate.select import keyed as K
from curate.select.features import features_of
from curate.settings import Job
from curate.stats import stat_key
from pipelines import transforms as T
from pipelines.batched_near import Near
from pipelines.batched_select import KeyedSelect, LiveFeaturesFn
from pipelines.locators import (SHIFT, by_unit, chunks, member, pack, positions_by_shard, sorted_side_input,
                                stable_shard)
from pipelines.near_dedup import N_SHARDS, SIGNATURE_BATCH
from pipelines.select import policy_from
from pipelines.stage import STATS, StageFn

log = logging.getLogger("curate")
KEY_SHARDS = 64  # id and exact-key arrays are grouped in this many parts
SIGNATURE_PART = 1024  # texts per part of a batch's signatures (``ScanFn._bands``)
MODEL_STAGES = ("embed", "cluster", "score", "rds", "less", "degradation", "rewrite")
IDS, EXACT, BANDS, NEAR_ROWS, FEATS, REJECTS = "ids", "exact", "bands", "near_rows", "feats", "rejects"
# the columns a row has before any decision (the record's own)
BASE_COLUMNS = ("id", "source", "prompt", "response", "instruction", "input", "messages", "original")


def _batch_schema() -> pa.Schema:
    """A batch as read: each row's locator, the record's own columns, and where it was read."""
    from curate.schema import ANNOTATED

    return pa.schema([pa.field("_loc", pa.int64()), *(ANNOTATED.field(c) for c in BASE_COLUMNS),
                      pa.field("_file", pa.string()), pa.field("_row", pa.int64())])


_BATCH_SCHEMA = _batch_schema()


def eligible(cfg: Job, rt: dict) -> str | None:
    """None when the batch path can run the job, else why not (the row path runs it)."""
    if cfg.path == "row":
        return "path: row"
    on = [k for k in MODEL_STAGES if k in rt]
    if on:
        return f"model or rewrite stages on ({', '.join(on)})"
    if cfg.cluster.column:
        return "cluster.column is set"
    policy, budget, _ = policy_from(cfg)
    if cfg.select.scope != "global" or not K.applies(policy, budget):
        return f"policy {policy.name} with scope {cfg.select.scope} is not keyed"
    return None


def unit_batches(unit: dict, spec, sample, size: int, on_file=None):
    """A unit's rows in batches of up to ``size``, the same on every read: (table of its records,
    ``_BATCH_SCHEMA``, in place order; [(place, reject), ...]), a row's place being its position
    among the unit's rows. ``on_file(file)`` is told each file started.

    JSON lines and Parquet files without sampling go through ``curate.json_rows`` (Arrow columns;
    the rows it leaves, one by one through ``records.convert``); every other input row by row."""
    if sample.mode != "none" or any(f.format not in ("jsonl", "parquet") for f in unit["files"]):
        yield from _row_batches(unit, spec, sample, size, on_file)
        return
    piece, place = unit.get("range") or (0, -1, 1), 0
    for f in unit["files"]:
        if on_file is not None and piece[0] == 0:
            on_file(f)
        try:
            if f.format == "parquet":
                row = 0
                for table in read_errors(f.path, parquet_batches(f.path, size)):
                    yield _table_batch(table, f.path, spec, place, row)
                    place, row = place + table.num_rows, row + table.num_rows
                continue
            for block in chunks(read_errors(f.path, jsonl_lines(f.path, *piece)), size):
                yield _lines_batch(block, f.path, spec, place)
                place += len(block)
        except SourceReadError as err:
            raise SourceReadError(T.INPUT_ERROR + str(err)) from None


def _lines_batch(block: list, path: str, spec, first: int) -> tuple[pa.Table, list]:
    """One batch of (line number, line): the lines ``convert_block`` takes as columns, the rest
    parsed and converted one by one, put together in line order."""
    numbers = np.array([n for n, _ in block], np.int64)
    return _combine(*convert_block([line for _, line in block], spec), numbers, first, path, spec,
                    lambda js: [parse_line(path, *block[j]) for j in js])


def _table_batch(table: pa.Table, path: str, spec, first: int, row: int) -> tuple[pa.Table, list]:
    """``_lines_batch`` for a batch of a Parquet file whose first row is the file's ``row + 1``th
    (a Parquet row's number is its position in the file)."""
    numbers = np.arange(row + 1, row + 1 + table.num_rows, dtype=np.int64)
    return _combine(*convert_table(table, spec), numbers, first, path, spec,
                    lambda js: [RawRow(path, int(numbers[j]), value=v)
                                for j, v in zip(js, table.take(pa.array(js, pa.int64())).to_pylist())])


def _combine(keep, cols, numbers: np.ndarray, first: int, path: str, spec, raws_of) -> tuple[pa.Table, list]:
    """The rows the Arrow lane converted (``keep``, ``cols``) and the others (``raws_of(positions)``
    gives them as read) through ``records.convert``, as one batch table in row order and the
    rejects."""
    places = np.arange(first, first + len(numbers), dtype=np.int64)
    tables, rejects, records, rec_pos = [], [], [], []
    if cols is not None and len(keep):
        n = len(keep)
        tables.append(pa.Table.from_arrays(
            [pa.array(places[keep]), *(cols[c] for c in BASE_COLUMNS), pa.array([path] * n, pa.string()),
             pa.array(numbers[keep])], schema=_BATCH_SCHEMA))
    done = np.zeros(len(numbers), bool)
    done[keep] = True
    rest = np.flatnonzero(~done)
    for j, raw in zip(rest, raws_of(rest) if len(rest) else []):
        rej, rec = _one_by_one(raw, spec)
        if rej is not None:
            rejects.append((int(places[j]), rej))
        else:
            records.append(rec)
            rec_pos.append(places[j])
    if records:
        tables.append(records_table(np.array(rec_pos, np.int64), records))
    table = pa.concat_tables(tables) if tables else _BATCH_SCHEMA.empty_table()
    if len(tables) > 1:
        table = table.take(pc.sort_indices(table.column("_loc")))
    return table, rejects


def _one_by_one(raw: RawRow, spec) -> tuple[dict | None, dict | None]:
    """A row as read through the per-row rules: (its reject, None) or (None, its record with
    ``_file``/``_row``)."""
    if raw.bad_reason:
        return make_reject(spec.source, raw.file, raw.row_number, raw.bad_reason, raw.bad_detail, raw.raw_text), None
    kind, item = convert(raw.value, spec, raw.file, raw.row_number)
    if kind == "reject":
        return item, None
    item["_file"], item["_row"] = raw.file, raw.row_number
    return None, item


def _row_batches(unit: dict, spec, sample, size: int, on_file):
    """``unit_batches`` row by row: sampling, and formats other than JSON lines and Parquet."""
    piece = unit.get("range")

    def raws():
        for f in unit["files"]:
            if on_file is not None and (piece is None or piece[0] == 0):
                on_file(f)
            yield from iter_file(f.path, f.format, piece)

    s = sample

    def rows():
        for i, raw in enumerate(sample_rows(raws(), unit["source"], s.mode, s.n, s.fraction, s.seed)):
            yield i, *_one_by_one(raw, spec)

    try:
        for chunk in chunks(rows(), size):
            recs = [(i, rec) for i, _, rec in chunk if rec is not None]
            table = (records_table(np.array([i for i, _ in recs], np.int64), [r for _, r in recs]) if recs
                     else _BATCH_SCHEMA.empty_table())
            yield table, [(i, rej) for i, rej, _ in chunk if rej is not None]
    except SourceReadError as err:
        raise SourceReadError(T.INPUT_ERROR + str(err)) from None


def records_table(places: np.ndarray, records: list[dict]) -> pa.Table:
    """Records made one by one (``records.to_record``, with ``_file``/``_row``) as a batch table:
    ``instruction``/``input`` from the record's ``_`` fields."""
    arrays = [pa.array(places, pa.int64())]
    for f in _BATCH_SCHEMA:
        if f.name != "_loc":
            key = f.name if f.name in records[0] else "_" + f.name
            arrays.append(pa.array([r[key] for r in records], f.type))
    return pa.Table.from_arrays(arrays, schema=_BATCH_SCHEMA)


class ScanFn(StageFn):
    """A unit's rows to compact per-batch arrays (and its rejects); counts as read and validate."""

    stage = "read"
    metrics = ("files", "rows", "rows_seen")

    def __init__(self, cfg: Job):
        self.specs = T.row_specs(cfg)
        self.sample, self.size = cfg.sample, max(cfg.batch_size, SIGNATURE_BATCH)
        self.exact, self.near = cfg.dedup.exact, cfg.dedup.near
        self.rank = {s.source: i for i, s in enumerate(cfg.inputs)}
        self.user_ids = frozenset(s.source for s in cfg.inputs if s.id_field)
        self._pending = None  # the previous batch's band keys, once its signatures are done
        self._pool = None  # the signatures' thread, started with the first batch

    def _other(self, stage, metric, n=1, reason=None, source=None):
        self._stats[stat_key(stage, metric, reason, source)] += n

    def handle(self, unit):
        source, base = unit["source"], unit["index"] << SHIFT
        seen = 0
        for table, rejects in unit_batches(unit, self.specs[source], self.sample, self.size,
                                           lambda f: self.count("files", source=source)):
            yield from self._flush()
            n = table.num_rows + len(rejects)
            seen += n
            self.count("rows", n, source=source, progress=True)
            for _, rej in rejects:
                self._other("validate", "rejected", reason=rej["reason"], source=source)
                yield beam.pvalue.TaggedOutput(REJECTS, rej)
            self._other("validate", "records", table.num_rows, source=source)
            if table.num_rows:
                out, self._pending = self._arrays(source, base | table.column("_loc").to_numpy(), table)
                yield from out
        self.count("rows_seen", seen, source=source)

    def _flush(self):
        """The previous batch's band keys (its signatures ran in a thread while this batch, or the
        next unit, was read): kept across units, given out at the latest in ``finish_bundle``."""
        pending, self._pending = self._pending, None
        if pending is not None:
            yield from pending()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        for out in self._flush():
            yield beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
        yield from super().finish_bundle()

    def _bands(self, source, locs, texts):
        """Start the batch's signatures in a thread, in parts (numpy lets go of the GIL for most of
        the work, so the next batch's reading goes on beside it); the returned function gives the
        band-key entries by shard once they are done. When it is called, the parts the thread has
        not started are made in the calling thread instead of waiting: the signatures are the
        scan's critical path, and the reading has nothing else to do then."""
        from concurrent.futures import ThreadPoolExecutor

        p = self.near
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="curate-signatures")
        args = (p.num_perm, p.seed, p.ngram, p.unit)
        parts = [texts[i:i + SIGNATURE_PART] for i in range(0, len(texts), SIGNATURE_PART)]
        futures = [self._pool.submit(minhash.signatures, part, *args) for part in parts]

        def signatures():
            done = [None] * len(parts)
            for k in reversed(range(len(parts))):  # the thread takes the parts in order
                if not futures[k].cancel():
                    break
                done[k] = minhash.signatures(parts[k], *args)
            return np.concatenate([d if d is not None else f.result() for d, f in zip(done, futures)])

        def entries():
            salts = np.full(len(texts), source_salt(source), dtype=np.uint64) if p.scope == "source" else None
            keys = band_keys(signatures(), p.bands, p.rows, salts)
            flat = keys.ravel()
            owner = np.repeat(np.arange(len(texts)), keys.shape[1])
            for shard, part in positions_by_shard((flat % np.uint64(N_SHARDS)).astype(np.int64)):
                yield beam.pvalue.TaggedOutput(BANDS, (shard, (flat[part], locs[owner[part]])))

        return entries

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _arrays(self, source: str, locs: np.ndarray, table: pa.Table) -> tuple[list, object]:
        """A batch's compact outputs, and the function that gives its band keys (or None)."""
        out, ids = [], table.column("id").to_pylist()
        user = source in self.user_ids
        extra = tuple(table.column(c).to_pylist() for c in ("original", "_file", "_row")) if user else None
        for shard, part in positions_by_shard([stable_shard(i, KEY_SHARDS) for i in ids]):
            out.append(beam.pvalue.TaggedOutput(IDS, (shard, (source, [ids[j] for j in part], locs[part],
                                                              extra and tuple([col[j] for j in part] for col in extra)))))
        prompt, response = table.column("prompt").combine_chunks(), table.column("response").combine_chunks()
        if self.exact.enabled:
            keys = dedup_keys(prompt, response, source, self.exact.scope)
            for shard, part in positions_by_shard(keys.view(">u8")[::2] % np.uint64(KEY_SHARDS)):
                out.append(beam.pvalue.TaggedOutput(EXACT, (shard, (self.rank[source], keys[part],
                                                                    [ids[j] for j in part], locs[part]))))
        bands = None
        if self.near.enabled:
            text = response if self.near.text == "response" else pc.binary_join_element_wise(
                prompt, response, "\n")
            bands = self._bands(source, locs, text.to_pylist())
            out.append(beam.pvalue.TaggedOutput(NEAR_ROWS, (source, pack(pa.table({
                "id": pa.array(ids, pa.string()), "loc": locs, "text": text.cast(pa.large_string()),
                "length": pc.utf8_length(response).cast(pa.int64())})))))
        feats = features_of(table)  # only the columns with a value travel (no score in this path)
        out.append(beam.pvalue.TaggedOutput(FEATS, (locs, feats.select(
            [c for c in feats.column_names if feats.column(c).null_count < feats.num_rows]))))
        return out, bands


class IdsFn(StageFn):
    """One id shard: rows sharing an id numbered or rejected as ``curate.ids.resolve_ids`` does."""

    stage = "ids"
    metrics = ("rows", "renumbered", "rejected")

    def handle(self, element):
        _, parts = element
        parts = list(parts)
        n = sum(len(ids) for _, ids, _, _ in parts)
        self.count("rows", n)
        members = defaultdict(list)
        for at in _repeated(parts):  # rows whose (source, id) another row has too, in their order
            k, j = at
            source, ids, locs, extra = parts[k]
            members[(source, ids[j])].append((extra[0][j] if extra else "", int(locs[j]), j, extra, source))
        changes = []
        for (source, rid), group in members.items():
            group.sort(key=lambda m: (m[0], m[1]))  # content first, then place: identical rows interchange
            first, kept = group[0][0], []
            for original, loc, j, extra, src in group:
                if extra and original != first:
                    rej = make_reject(src, extra[1][j], extra[2][j], "duplicate_id",
                                      f"id {rid!r} is also used by another row", original)
                    self.count("rejected", reason="duplicate_id", source=src)
                    yield beam.pvalue.TaggedOutput(REJECTS, rej)
                    changes.append((loc, None))
                else:
                    kept.append(loc)
            self.count("renumbered", len(kept) - 1)
            changes += [(loc, f"{rid}#{k}") for k, loc in enumerate(kept[1:], start=2)]
        yield from changes


def _repeated(parts: list) -> list[tuple[int, int]]:
    """(part, position) of each row whose (source, id) is some other row's too, in the parts'
    order: the ids are counted per source by ``Counter`` (in C), and only the few repeated ones
    are looked at row by row."""
    counts = defaultdict(Counter)
    for source, ids, _, _ in parts:
        counts[source].update(ids)
    twice = {source: {i for i, n in c.items() if n > 1} for source, c in counts.items()}
    return [(k, j) for k, (source, ids, _, _) in enumerate(parts) if twice[source]
            for j, rid in enumerate(ids) if rid in twice[source]]


class ExactFn(StageFn):
    """One key shard: per key, keep the row of the first source, then the smallest id."""

    stage = "exact_dedup"
    metrics = ("rows", "groups", "dropped")

    def __init__(self, sources: list[str]):
        self.sources = sources
        self._sorted_cache = (None, None)

    def handle(self, element, changes, rejected):
        _, parts = element
        parts = list(parts)
        keys = np.concatenate([k for _, k, _, _ in parts])
        locs = np.concatenate([loc for _, _, _, loc in parts])
        ranks = np.concatenate([np.full(len(k), r, np.int64) for r, k, _, _ in parts])
        ids = [rid for _, _, part_ids, _ in parts for rid in part_ids]
        live = np.flatnonzero(~member(locs, sorted_side_input(self, rejected)))
        keys, locs, ranks = keys[live], locs[live], ranks[live]
        uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        self.count("rows", len(keys))
        self.count("groups", len(uniq))
        groups = defaultdict(list)
        for j in np.flatnonzero(counts[inverse] > 1):  # only the rows of a key seen twice or more
            loc = int(locs[j])
            groups[inverse[j]].append((int(ranks[j]), changes.get(loc, ids[live[j]]), loc))
        out = []
        for members in groups.values():
            members.sort()
            keeper = members[0][1]
            for rank, _, loc in members[1:]:
                self.count("dropped", source=self.sources[rank])
                out.append((loc, keeper))
        if out:
            yield out  # one element per shard: (loc, kept id) pairs


class ApplyFn(StageFn):
    """A unit read again (the same rows in the same order, ``unit_batches``); its rows get their
    decisions and are written, a batch a row group, to ``annotated/part-<unit>.parquet`` and (the
    selected rows' columns) ``selected/part-<unit>.parquet`` under ``folder``. Why read again:
    carrying the rows from Scan to here held them in the runner's memory (9.1 GB peak at a million
    rows, against 3.4 GB), and writing them beside the output for Apply measured no faster (both
    tried on 2 cores of an AMD EPYC with AVX-512, ``CHANGELOG.md``). Why write here rather than
    through Beam's Parquet sinks: on Dask a step's whole output for a partition is one task result,
    kept until each of its consumers has run, and the two sinks' tables piled up on the workers at
    the end of a run (the largest at 2.9 GB at 1M rows); a unit's file has the unit's number, so a
    task run again writes the same file again. The decisions of a batch are applied by column
    (``UnitDecisions``), and its files are written by a thread while the next batch is read (Apply
    took 19 s instead of 30 s at a million rows, 2 cores of an AMD EPYC with AVX-512); a bundle
    ends when its files are written."""

    stage = "write"
    metrics = ("selected", "dropped")

    def __init__(self, cfg: Job, folder: str, selected_schema: pa.Schema):
        from curate import schema

        self.specs, self.sample = T.row_specs(cfg), cfg.sample
        self.size = max(cfg.batch_size, SIGNATURE_BATCH)
        self.folder, self.annotated, self.selected_schema = folder, schema.ANNOTATED, selected_schema
        self._writer, self._pending = None, []  # the thread that writes the Parquet files, its work

    def handle(self, element):
        from concurrent.futures import ThreadPoolExecutor

        _, joined = element
        unit = joined["unit"][0]
        dec = UnitDecisions(joined["dec"])
        base = unit["index"] << SHIFT
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="curate-write")
        files = _UnitFiles(self.folder, f"part-{unit['index']:05d}.parquet", self.annotated, self.selected_schema)
        self._submit(files.open)
        try:
            for table, _ in unit_batches(unit, self.specs[unit["source"]], self.sample, self.size):
                if table.num_rows == 0:
                    continue
                table = self._decide(table.drop_columns(["_file", "_row"]).set_column(
                    0, "_loc", pa.array(base | table.column("_loc").to_numpy())), dec)
                if table.num_rows:
                    self._submit(files.write, table)
        finally:
            self._submit(files.close)
        return iter(())

    def _submit(self, fn, *args) -> None:
        """Run ``fn`` in the writer thread (pyarrow compresses and writes without the GIL, so the
        files are written while the next batch is read), at most two batches behind."""
        self._pending.append(self._writer.submit(fn, *args))
        while len(self._pending) > 2:
            self._pending.pop(0).result()

    def finish_bundle(self):
        pending, self._pending = self._pending, []
        for f in pending:  # the bundle is done when its files are (an error in the thread is raised here)
            f.result()
        yield from super().finish_bundle()

    def teardown(self):
        if self._writer is not None:
            self._writer.shutdown(wait=True)

    def _decide(self, base: pa.Table, dec: "UnitDecisions") -> pa.Table:
        """A batch's rows with their decisions as columns (rows whose id was rejected left out:
        rejects/ has them), the counts of selected and dropped rows by reason and source."""
        locs = base.column("_loc").to_numpy()
        hit, (new_id,) = dec.ids.find(locs)
        gone = hit & pc.is_null(new_id).to_numpy(zero_copy_only=False)
        if gone.any():
            keep = np.flatnonzero(~gone)
            base, locs, hit, new_id = base.take(keep), locs[keep], hit[keep], new_id.take(keep)
        cols = {"id": pc.if_else(pa.array(hit), new_id, base.column("id").combine_chunks())}
        exact_hit, (cols["exact_dup_of"],) = dec.exact.find(locs)
        near_hit, (cols["near_dup_cluster"], cols["near_dup_of"]) = dec.near.find(locs)
        near_hit &= pc.is_valid(cols["near_dup_of"]).to_numpy(zero_copy_only=False)
        chosen = ~exact_hit & ~near_hit
        at = np.searchsorted(dec.select_locs, locs[chosen])
        if chosen.any() and (len(dec.select_locs) == 0 or np.any(
                dec.select_locs[np.minimum(at, len(dec.select_locs) - 1)] != locs[chosen])):
            raise RuntimeError("a row reached Apply without a selection decision (a bug: every row left "
                               "after dedup is selected or dropped by the policy)")
        code = np.where(exact_hit, 1, 2)  # dec.reasons[1], [2]: the duplicates' reasons
        code[chosen] = dec.select_codes[at]
        rank = np.zeros(len(locs), np.int64)
        rank[chosen] = dec.select_ranks[at]
        cols["rank"] = pa.array(rank, mask=code != 0)
        cols["drop_reason"] = dec.reasons.take(pa.array(code))
        cols["selected"] = pa.array(code == 0)
        tally = pa.table({"code": code, "source": base.column("source")}).group_by(["code", "source"]).aggregate(
            [([], "count_all")])
        for c, source, n in zip(*(tally.column(k).to_pylist() for k in ("code", "source", "count_all"))):
            if c == 0:
                self.count("selected", n, source=source)
            else:
                self.count("dropped", n, reason=dec.reasons[c].as_py(), source=source)
        arrays = []
        for f in self.annotated:
            if f.name in cols:
                arrays.append(cols[f.name].cast(f.type))
            elif f.name in BASE_COLUMNS:
                arrays.append(base.column(f.name))
            else:
                arrays.append(pa.nulls(base.num_rows, f.type))
        return pa.Table.from_arrays(arrays, schema=self.annotated)


class _UnitFiles:
    """A unit's two Parquet files, opened, written and closed in the writer thread."""

    def __init__(self, folder: str, name: str, annotated: pa.Schema, selected: pa.Schema):
        from curate import storage

        self.annotated = storage.ParquetFile(storage.join(folder, "annotated", name), annotated)
        self.selected = storage.ParquetFile(storage.join(folder, "selected", name), selected)
        self.schema, self.opened = selected, []

    def open(self) -> None:
        for f in (self.annotated, self.selected):
            self.opened.append(f.__enter__())

    def write(self, table: pa.Table) -> None:
        self.annotated.write(table)
        chosen = table.filter(table.column("selected"))
        if chosen.num_rows:
            self.selected.write(chosen.select(self.schema.names).cast(self.schema))

    def close(self) -> None:
        while self.opened:
            self.opened.pop().__exit__(None, None, None)


class _Lookup:
    """(loc, value) decisions of some rows (a value may be a tuple, one item per column) as a
    sorted locator array and Arrow columns of values: ``find`` answers a whole batch in one search."""

    def __init__(self, pairs: dict, *types):
        locs = np.fromiter(pairs, np.int64, len(pairs))
        order = np.argsort(locs)
        self.locs = locs[order]
        values = [v if len(types) > 1 else (v,) for v in pairs.values()]
        self.columns = [pa.array([values[j][c] for j in order] + [None], t)  # the last: rows without one
                        for c, t in enumerate(types)]

    def find(self, locs: np.ndarray) -> tuple[np.ndarray, list[pa.Array]]:
        """Which rows have a decision, and each column's values (null for the others)."""
        if len(self.locs) == 0:
            return np.zeros(len(locs), bool), [pa.nulls(len(locs), c.type) for c in self.columns]
        at = np.minimum(np.searchsorted(self.locs, locs), len(self.locs) - 1)
        hit = self.locs[at] == locs
        where = np.where(hit, at, len(self.locs))
        return hit, [c.take(where) for c in self.columns]


class UnitDecisions:
    """A unit's decisions as Apply receives them, ready for whole batches: ids renumbered (a null
    one: rejected), exact duplicates' kept id, near clusters and kept id, and every other row's
    selection (``batched_select``'s (locs, ranks or None, reason) arrays) as sorted arrays."""

    def __init__(self, joined):
        pairs, selects = defaultdict(dict), []
        for kind, part in joined:
            if kind == "select":
                selects.append(part)
            else:
                pairs[kind].update(part)
        self.ids = _Lookup(pairs["id"], pa.string())
        self.exact = _Lookup(pairs["exact"], pa.string())
        self.near = _Lookup(pairs["near"], pa.string(), pa.string())  # (cluster, kept id or None)
        names = [None, "exact_duplicate", "near_duplicate"]
        names += sorted({why for _, _, why in selects} - set(names))
        self.reasons = pa.array(names, pa.string())
        locs = [loc for loc, _, _ in selects]
        self.select_locs = np.concatenate(locs) if locs else np.zeros(0, np.int64)
        order = np.argsort(self.select_locs, kind="stable")
        self.select_locs = self.select_locs[order]
        self.select_ranks = np.concatenate([r if r is not None else np.full(len(loc), -1, np.int64)
                                            for loc, r, _ in selects] or [np.zeros(0, np.int64)])[order]
        self.select_codes = np.concatenate([np.full(len(loc), names.index(why), np.int64)
                                            for loc, _, why in selects] or [np.zeros(0, np.int64)])[order]


def _kind(kind):
    return lambda pairs: [(unit, (kind, part)) for unit, part in by_unit(pairs)]


def _selected_by_unit(decided: tuple) -> list:
    """A (locs, ranks or None, reason) selection element cut into one element per unit."""
    locs, ranks, why = decided
    return [(unit, ("select", (locs[part], None if ranks is None else ranks[part], why)))
            for unit, part in positions_by_shard(locs >> SHIFT)]


def build(p: beam.Pipeline, cfg: Job, folder: str) -> dict:
    """The job's graph on batches (see the module's docstring); returns the stats and reports
    PCollections for ``pipelines.graph`` to write."""
    from curate import schema

    units = [{**u, "index": i} for i, u in enumerate(T.read_units(cfg))]
    scan = (p | "Units" >> beam.Create(units, reshuffle=True)
            | "Scan" >> beam.ParDo(ScanFn(cfg)).with_outputs(STATS, REJECTS, IDS, EXACT, BANDS, NEAR_ROWS, FEATS))
    ids = (scan[IDS] | "GroupIds" >> beam.GroupByKey()
           | "UniqueIds" >> beam.ParDo(IdsFn()).with_outputs(STATS, REJECTS, main="changes"))
    changes = ids.changes
    stats = [scan[STATS], ids[STATS]]
    decisions = [changes | "IdDecisions" >> beam.Map(lambda kv: (kv[0] >> SHIFT, ("id", [kv])))]
    # rows gone before a step, as locator arrays (``sorted_side_input``)
    gone = [changes | "Rejected" >> beam.FlatMap(lambda kv: [np.array([kv[0]], np.int64)] if kv[1] is None else [])]
    if cfg.dedup.exact.enabled:
        exact = (scan[EXACT] | "GroupKeys" >> beam.GroupByKey()
                 | "ExactDedup" >> beam.ParDo(ExactFn([s.source for s in cfg.inputs]), beam.pvalue.AsDict(changes),
                                              beam.pvalue.AsList(gone[0]))
                 .with_outputs(STATS, main="dups"))
        stats.append(exact[STATS])
        decisions.append(exact.dups | "ExactDecisions" >> beam.FlatMap(_kind("exact")))
        gone.append(exact.dups | "ExactGone" >> beam.Map(lambda pairs: np.array([loc for loc, _ in pairs], np.int64)))
    gone_before_near = gone | "GoneBeforeNear" >> beam.Flatten()
    reports = []
    if cfg.dedup.near.enabled:
        near = scan[BANDS] | "NearDedup" >> Near(cfg.dedup.near, changes, gone_before_near, scan[NEAR_ROWS])
        stats.append(near["stats"])
        reports.append(near["reports"])
        decisions.append(near["decisions"] | "NearDecisions" >> beam.FlatMap(_kind("near")))
        gone.append(near["decisions"] | "NearGone" >> beam.Map(
            lambda d: np.array([loc for loc, v in d if v[1] is not None], np.int64)))
    gone_all = gone | "GoneBeforeSelect" >> beam.Flatten()
    live = scan[FEATS] | "Candidates" >> beam.ParDo(LiveFeaturesFn(), beam.pvalue.AsDict(changes),
                                                     beam.pvalue.AsList(gone_all))
    selection = live | "Select" >> KeyedSelect(cfg)
    reports.append(selection["report"])
    decisions.append(selection["decisions"] | "SelectDecisions" >> beam.FlatMap(_selected_by_unit))
    applied = ({"unit": p | "ApplyUnits" >> beam.Create([(u["index"], u) for u in units]),
                "dec": decisions | "AllDecisions" >> beam.Flatten()}
               | "ByUnit" >> beam.CoGroupByKey()
               | "Apply" >> beam.ParDo(ApplyFn(cfg, folder, schema.selected_schema(cfg))).with_outputs(
                   STATS, main="written"))
    stats.append(applied[STATS])
    batched = dict(file_name_suffix=".parquet", codec="zstd")
    rejects = ((scan[REJECTS], ids[REJECTS]) | "AllRejects" >> beam.Flatten()
               | "TallyRejects" >> beam.ParDo(T.TallyFn("rejects")).with_outputs(STATS, main="rows"))
    stats.append(rejects[STATS])
    rejects.rows | "WriteRejects" >> beam.io.WriteToParquet(f"{folder}/rejects/part", schema.REJECTS, **batched)
    return {"stats": stats, "reports": reports}
