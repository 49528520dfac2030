"""The batch path (``pipelines.batched``) gives the row path's outputs, row for row.

The pool takes every branch: rejects of every reason the reader and validator give, repeated
user ids with other content (``duplicate_id``) and byte-identical rows (renumbered), exact and
near duplicates inside a batch, across batches, files and sources, a file of one row, a file of
rejects only (a batch with no records), and units cut into several pieces of one file."""
import json
import logging
import random
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from curate import io
from pipelines import batched
from pipelines import transforms as T
from tests.conftest import load_manifest, run_cli, without_models, write_job

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue black white river stone cloud fire water").split()


def _text(rng, n=40):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _pool(folder):
    rng = random.Random(7)
    base = [{"instruction": _text(rng, 12), "output": _text(rng, 60)} for _ in range(60)]
    a = []
    for i, row in enumerate(base):
        a.append(row)
        if i % 5 == 0:
            a.append(dict(row))  # byte-identical: same content id, renumbered, then an exact duplicate
        if i % 7 == 0:
            a.append({"instruction": row["instruction"].upper(), "output": row["output"] + "  "})  # exact after normalizing
        if i % 4 == 0:
            words = row["output"].split()
            words[len(words) // 2] = "changed"
            a.append({"instruction": row["instruction"], "output": " ".join(words)})  # near duplicate
            if i % 8 == 0:  # and a second one: buckets of three
                words[len(words) // 3] = "other"
                a.append({"instruction": row["instruction"], "output": " ".join(words)})
    rng.shuffle(a)
    lines = [json.dumps(r) for r in a]
    lines[3:3] = ["{not json", "[1, 2]", json.dumps({"foo": "bar"}), json.dumps({"instruction": "x"}),
                  json.dumps({"instruction": 3, "output": "y"}), json.dumps({"messages": "nope"}),
                  json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
                  json.dumps({"instruction": "q", "output": "   "}), json.dumps({"instruction": " ", "output": "a"}),
                  json.dumps({"instruction": "long " * 400, "output": "b"})]
    (folder / "a.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"instruction": "\xff", "output": "z"}\n')
    b = []
    for i, row in enumerate(base[:30]):
        b.append({"uid": i, **row} if i % 3 else {"uid": i, "messages": [
            {"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]})
    b.append({"uid": 1, "instruction": "another row", "output": "with the same id"})  # duplicate_id
    b.append(dict(b[2]))  # the same id and content: renumbered
    b.append({"instruction": "no id", "output": "here"})  # missing_id
    words = base[40]["output"].split()
    words[5] = "other"
    b.append({"uid": 99, "instruction": base[40]["instruction"], "output": " ".join(words)})  # near, across sources
    (folder / "b.jsonl").write_text("\n".join(json.dumps(r) for r in b) + "\n")
    (folder / "c.jsonl").write_text(json.dumps(base[50]) + "\n")  # one row, an exact duplicate of a's
    (folder / "d.jsonl").write_text("{broken\n" + json.dumps({"output": "no prompt"}) + "\n")


def _job(folder, out, path, **over):
    cfg = without_models({
        "output": out, "path": path, "seed": 3,
        "inputs": [{"source": "a", "path": "a.jsonl"}, {"source": "b", "path": "b.jsonl", "id_field": "uid"},
                   {"source": "c", "path": "c.jsonl"}, {"source": "d", "path": "d.jsonl"}],
        "validate": {"max_chars": 1000},
        "dedup": {"exact": {"enabled": True}, "near": {"enabled": True, "threshold": 0.7}},
        "select": {"policy": "random", "budget": {"fraction": 0.5}}})
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            merged = {**cfg[key]}
            for k, v in value.items():
                deep = key == "dedup" and isinstance(merged.get(k), dict)
                merged[k] = {**merged[k], **v} if deep else v
            cfg[key] = merged
        else:
            cfg[key] = value
    return write_job(folder, cfg, f"{out}.yaml")


def _outputs(out):
    ann = pd.read_parquet(f"{out}/annotated").sort_values("id").reset_index(drop=True)
    sel = pd.read_parquet(f"{out}/selected").sort_values("id").reset_index(drop=True)
    rej = pd.read_parquet(f"{out}/rejects").sort_values(["source", "row_number", "reason"]).reset_index(drop=True)
    man = load_manifest(out)
    return ann, sel, rej, man


@pytest.fixture
def small_batches(monkeypatch):
    """Batches of 8 rows and files cut into pieces of about 4 KB, so duplicates cross batches
    and units (the defaults would put this pool in one batch)."""
    monkeypatch.setattr(batched, "SIGNATURE_BATCH", 8)
    monkeypatch.setattr(T, "jsonl_chunks", lambda path: io.jsonl_chunks(path, 4096))


VARIANTS = {
    "default": {},
    "source_scopes_unverified": {"dedup": {"exact": {"scope": "source"}, "near": {"scope": "source", "verify": False}}},
    "no_exact": {"dedup": {"exact": {"enabled": False}}},
    "big_buckets": {"dedup": {"near": {"max_bucket_size": 2}}},  # buckets above it are logged and counted
    "no_near": {"dedup": {"near": {"enabled": False}}},
    "mixture_rows": {"select": {"policy": "mixture", "params": {"shares": {"a": 0.5, "b": 0.3, "c": 0.2}},
                                "budget": {"rows": 40}}},
    "random_sample": {"sample": {"mode": "random", "n": 50, "seed": 1}},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_batch_path_gives_the_row_paths_outputs(job_dir, small_batches, variant, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="curate")
    _pool(job_dir)
    assert run_cli("run", _job(job_dir, "row", "row", **VARIANTS[variant])) == 0
    assert "the row path (path: row)" in caplog.text
    assert run_cli("run", _job(job_dir, "batch", "batch", **VARIANTS[variant])) == 0
    assert "the batch path" in caplog.text
    row, batch = _outputs("row"), _outputs("batch")
    for name, a, b in zip(("annotated", "selected", "rejects"), row[:3], batch[:3]):
        assert list(a.columns) == list(b.columns), name
        pd.testing.assert_frame_equal(a, b, obj=name)
    ann, _, rej, man = batch
    assert man["accounting"]["holds"]
    assert sorted(p.name for p in (job_dir / "batch").iterdir()) == sorted(p.name for p in (job_dir / "row").iterdir())
    for key in ("rows_in", "selected", "dropped", "rejected", "by_source"):
        assert man["counts"][key] == row[3]["counts"][key], key
    if variant == "big_buckets":
        big = man["stages"]["near_dedup"]["big_buckets"]
        assert big > 0 and big == row[3]["stages"]["near_dedup"]["big_buckets"]
    if variant == "default":  # the pool took the branches it was built for
        reasons = set(rej.reason)
        assert {"malformed_json", "not_an_object", "unknown_form", "missing_field", "wrong_type", "bad_messages",
                "no_response", "empty_response", "empty_prompt", "too_long", "undecodable_bytes", "missing_id",
                "duplicate_id"} <= reasons
        dropped = ann.drop_reason.value_counts()
        assert dropped["exact_duplicate"] > 10 and dropped["near_duplicate"] > 5
        assert ann.id.str.contains("#").any()  # renumbered identical rows
        assert man["stages"]["read"]["rows"] == man["counts"]["rows_in"]
        assert ann[ann.near_dup_of.notna()].source.nunique() >= 1 and ann.near_dup_cluster.notna().sum() > 10
        assert (ann.source == "c").sum() == 1 and ann.set_index("source").loc["c", "drop_reason"] == "exact_duplicate"


def test_batch_size_and_pieces_do_not_change_the_batch_paths_outputs(job_dir, monkeypatch):
    _pool(job_dir)
    assert run_cli("run", _job(job_dir, "whole", "batch")) == 0
    monkeypatch.setattr(batched, "SIGNATURE_BATCH", 3)
    monkeypatch.setattr(T, "jsonl_chunks", lambda path: io.jsonl_chunks(path, 2048))
    assert run_cli("run", _job(job_dir, "pieces", "batch")) == 0
    for a, b in zip(_outputs("whole")[:3], _outputs("pieces")[:3]):
        pd.testing.assert_frame_equal(a, b)


def test_jobs_the_batch_path_cannot_run_take_the_row_path(job_dir, caplog):
    import logging

    from curate.config import load
    from pipelines.runtime import resolve_runtime

    caplog.set_level(logging.INFO, logger="curate")
    _pool(job_dir)
    cfg = load(_job(job_dir, "o", "batch"))
    assert batched.eligible(cfg, resolve_runtime(cfg)) is None
    tokens = load(_job(job_dir, "o2", "batch", select={"policy": "random", "budget": {"tokens": 5000}}))
    assert batched.eligible(tokens, {}) == "policy random with scope global is not keyed"  # a token budget
    assert batched.eligible(load(_job(job_dir, "o4", "batch", cluster={"column": "uid"})), {}) == "cluster.column is set"
    assert "model or rewrite stages on (embed)" == batched.eligible(cfg, {"embed": {}})
    assert batched.eligible(load(_job(job_dir, "o3", "row")), {}) == "path: row"


@pytest.mark.parametrize("flags", [["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
                                   ["--runner=DaskRunner", "--dask_workers=2"]], ids=["fnapi_2_processes", "dask_2"])
def test_the_batch_path_gives_the_same_outputs_on_other_runners(job_dir, small_batches, flags, monkeypatch, caplog):
    pytest.importorskip("distributed")
    _pool(job_dir)
    assert run_cli("run", _job(job_dir, "one", "batch")) == 0
    if "--runner=DaskRunner" in flags:  # the driver says how many tasks have run while it waits
        from pipelines import dask_runner

        monkeypatch.setattr(dask_runner, "PROGRESS_EVERY", 0.05)
    with caplog.at_level(logging.INFO, logger="curate"):
        assert run_cli("run", _job(job_dir, "other", "batch"), *flags) == 0
    for a, b in zip(_outputs("one")[:3], _outputs("other")[:3]):
        pd.testing.assert_frame_equal(a, b)
    assert _outputs("other")[3]["counts"] == _outputs("one")[3]["counts"]
    if "--runner=DaskRunner" in flags:
        lines = [r.getMessage() for r in caplog.records if re.match(r"dask: [\d,]+ of [\d,]+ tasks", r.getMessage())]
        assert lines, [r.getMessage() for r in caplog.records]
        done = [tuple(int(x.replace(",", "")) for x in re.findall(r"([\d,]+) of ([\d,]+)", line)[0]) for line in lines]
        assert all(0 <= n <= total for n, total in done)


def test_locator_helpers():
    import numpy as np
    import pyarrow as pa

    from pipelines import locators as L

    values = np.array([5, 1, 9, 7, 1 << 40], np.int64)
    assert L.member(values, np.array([1, 7, 1 << 40], np.int64)).tolist() == [False, True, False, True, True]
    assert L.member(values, np.zeros(0, np.int64)).tolist() == [False] * 5
    assert [len(c) for c in L.chunks(range(7), 3)] == [3, 3, 1] and list(L.chunks([], 3)) == []
    assert sorted(L.by_unit([((2 << L.SHIFT) | 5, "a"), (3, "b"), ((2 << L.SHIFT) | 1, "c")])) == [
        (0, [(3, "b")]), (2, [((2 << L.SHIFT) | 5, "a"), ((2 << L.SHIFT) | 1, "c")])]
    t = pa.table({"id": ["x", "y"], "text": pa.array(["é" * 1000, ""], pa.large_string())})
    assert L.unpack(L.pack(t)).equals(t) and len(L.pack(t)) < 1000
    assert L.stable_shard("abc", 64) == L.stable_shard("abc", 64) < 64

    class Holder:
        _sorted_cache = (None, None)

    listed = [9, 3, 3]
    first = L.sorted_side_input(Holder, listed)
    assert first.tolist() == [3, 9] and L.sorted_side_input(Holder, listed) is first  # built once per list
    arrays = [np.array([7, 1 << 40], np.int64), np.zeros(0, np.int64), np.array([7, 2], np.int64)]
    assert L.sorted_union(arrays).tolist() == [2, 7, 1 << 40] and L.sorted_union([]).dtype == np.int64


def test_a_pool_of_rejects_and_an_empty_file_gives_the_row_paths_empty_outputs(job_dir):
    (job_dir / "r.jsonl").write_text('{bad\n{"output": "x"}\n')
    (job_dir / "e.jsonl").write_text("")
    for path in ("row", "batch"):
        cfg = without_models({"output": path, "path": path, "inputs": [{"source": "r", "path": "r.jsonl"},
                                                                       {"source": "e", "path": "e.jsonl"}],
                              "dedup": {"exact": {"enabled": True}, "near": {"enabled": True}},
                              "select": {"policy": "random", "budget": {"fraction": 0.5}}})
        assert run_cli("run", write_job(job_dir, cfg, f"{path}.yaml")) == 0
    row, batch = _outputs("row"), _outputs("batch")
    for a, b in zip(row[:3], batch[:3]):
        pd.testing.assert_frame_equal(a, b, check_dtype=False, check_index_type=False)
    assert len(batch[0]) == 0 and sorted(batch[2].reason) == ["malformed_json", "missing_field"]
    assert batch[3]["counts"]["rejected"] == row[3]["counts"]["rejected"] and batch[3]["accounting"]["holds"]


def test_features_of_a_batch_are_each_rows_features():
    from curate.records import RowSpec, FieldMap, to_record
    from curate.select.features import FEATURES, feature_row, features_of

    spec = RowSpec(source="s", form="auto", fields=FieldMap(), id_field=None, max_chars=10_000)
    recs = [to_record(r, spec) for r in ({"instruction": "é" * 7, "output": "a b c"},
                                         {"instruction": "Say hi.", "input": "twice", "output": "hi " * 300})]
    table = pa.Table.from_pylist([{k: r[k] for k in ("id", "source", "prompt", "response")} for r in recs])
    assert features_of(table).to_pylist() == [{f.name: feature_row(r).get(f.name) for f in FEATURES} for r in recs]


def test_a_batch_of_lines_mixes_the_arrow_lane_and_the_per_row_path_in_line_order(tmp_path):
    """Rows the Arrow lane takes, rows it leaves (no input field, a blank response: a record and
    a reject of the per-row path) and a block it cannot read (malformed): the same table and
    rejects as converting every line one by one."""
    from curate.records import RowSpec, convert

    spec = RowSpec("s")
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a {i}"} for i in range(6)]
    rows[2] = {"instruction": "no input", "output": "kept by the per-row path"}
    rows[4] = {"instruction": "q", "input": "", "output": "  "}
    lines = [json.dumps(r).encode() for r in rows]
    for block in (lines, lines + [b"{broken"]):
        numbered = [(10 + j, line) for j, line in enumerate(block)]
        table, rejects = batched._lines_batch(numbered, "f.jsonl", spec, 100)
        want, want_rejects, places = [], [], []
        for j, (number, line) in enumerate(numbered):
            raw = io.parse_line("f.jsonl", number, line)
            kind, item = ("reject", None) if raw.bad_reason else convert(raw.value, spec, "f.jsonl", number)
            if kind == "record":
                item["_file"], item["_row"] = "f.jsonl", number
                want.append(item)
                places.append(100 + j)
            else:
                want_rejects.append(100 + j)
        assert table.equals(batched.records_table(np.array(places), want))
        assert [p for p, _ in rejects] == want_rejects and rejects[0][1]["reason"] == "empty_response"


def test_a_broken_input_file_stops_the_batch_scan_with_one_line_naming_it(tmp_path):
    """A gzip cut short half way: one error naming the file (the job stops; no batch of it counts)."""
    import gzip
    from types import SimpleNamespace

    from curate.records import RowSpec

    lines = "".join(json.dumps({"instruction": f"q{i}", "output": "%x" % random.Random(i).getrandbits(800)}) + "\n"
                    for i in range(2000)).encode()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(lines)[:20000])
    unit = {"source": "s", "files": [SimpleNamespace(path=str(cut), format="jsonl")], "range": None}
    with pytest.raises(io.SourceReadError, match=re.escape(T.INPUT_ERROR) + ".*cut.jsonl.gz"):
        list(batched.unit_batches(unit, RowSpec("s"), SimpleNamespace(mode="none"), 64))


@pytest.mark.parametrize("blocked", [True, False])
def test_signature_parts_made_by_the_reader_or_the_thread_give_the_same_band_keys(blocked):
    """``ScanFn._bands`` with its thread held up (every part made by the caller) and free (parts made
    by the thread): the band keys of a straight ``minhash.signatures`` call, in the same order."""
    import threading
    from types import SimpleNamespace

    from curate.dedup import minhash
    from curate.dedup.near import band_keys

    p = SimpleNamespace(num_perm=32, seed=3, ngram=2, unit="word", bands=8, rows=4, scope="global")
    fn = batched.ScanFn.__new__(batched.ScanFn)
    fn.near, fn._pool = p, None
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(2500)]
    locs = np.arange(len(texts), dtype=np.int64) * 3
    fn._bands("s", locs[:1], texts[:1])  # starts the thread
    gate = threading.Event()
    if blocked:
        fn._pool.submit(gate.wait)
    got = list(fn._bands("s", locs, texts)())
    gate.set()
    keys = band_keys(minhash.signatures(texts, p.num_perm, p.seed, p.ngram, p.unit), p.bands, p.rows, None)
    want = sorted(zip(keys.ravel().tolist(), np.repeat(locs, p.bands).tolist()))
    assert sorted((k, loc) for out in got for k, loc in zip(*(a.tolist() for a in out.value[1]))) == want
    fn.teardown()


def _read_all(batches):
    tables, rejects = [], []
    for table, rej in batches:
        tables.append(table)
        rejects += rej
    return pa.concat_tables(tables), rejects


@pytest.mark.parametrize("kind", ["parquet", "parquet_chat", "jsonl"])
def test_a_units_batches_are_its_rows_converted_one_by_one(tmp_path, kind):
    """``unit_batches`` (the Arrow lane where it can) against ``_row_batches`` (every row through
    ``records.convert``) on a Parquet file with integer columns of another width, bools, a null and
    a blank response across batches, a Parquet file of chat rows, and JSON lines with the same rows."""
    import pyarrow.parquet as pq
    from types import SimpleNamespace

    from curate.records import RowSpec

    rows = [{"instruction": f"q {i}", "input": "" if i % 3 else f"ctx\t{i}", "output": f"a \"{i}\"\n",
             "topic": i % 5, "ok": i % 2 == 0} for i in range(23)]
    rows[4]["input"] = None
    rows[9]["output"] = "  "
    if kind == "parquet_chat":
        rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
                for i in range(23)]
    path = tmp_path / ("f.jsonl" if kind == "jsonl" else "f.parquet")
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        table = pa.Table.from_pylist(rows)
        if "topic" in table.column_names:
            table = table.set_column(table.schema.get_field_index("topic"), "topic", table.column("topic").cast(pa.int32()))
        pq.write_table(table, path, row_group_size=7)
    unit = {"source": "s", "files": [SimpleNamespace(path=str(path), format=kind.split("_")[0])], "range": None}
    spec, none = RowSpec("s"), SimpleNamespace(mode="none", n=None, fraction=None, seed=0)
    got, got_rejects = _read_all(batched.unit_batches(unit, spec, none, 8))
    want, want_rejects = _read_all(batched._row_batches(unit, spec, none, 8, None))
    assert got.equals(want) and got.num_rows == (22 if kind != "parquet_chat" else 23)
    assert [(p, r["reason"], r["row_number"]) for p, r in got_rejects] == [
        (p, r["reason"], r["row_number"]) for p, r in want_rejects]
    if kind == "parquet":
        assert got_rejects == [(9, got_rejects[0][1])] and got_rejects[0][1]["row_number"] == 10
        from curate.json_rows import convert_table
        assert list(convert_table(pq.read_table(path).slice(0, 8), spec)[0]) == [0, 1, 2, 3, 5, 6, 7]


def test_apply_says_when_a_row_has_no_decision_or_its_files_cannot_be_written(tmp_path, monkeypatch):
    """Apply's two failures are errors, never a unit silently written short: a row that reaches it
    with no selection decision (a bug upstream), and a file the writer thread cannot create
    (raised when the bundle ends, not lost in the thread)."""
    from curate import config, schema
    from pipelines.locators import SHIFT

    monkeypatch.chdir(tmp_path)
    _pool(tmp_path)
    cfg = config.load(_job(tmp_path, str(tmp_path / "out"), "batch"))
    unit = {**T.read_units(cfg)[0], "index": 0}
    fn = batched.ApplyFn(cfg, str(tmp_path / "out"), schema.selected_schema(cfg))
    fn.setup()
    fn.start_bundle()
    with pytest.raises(RuntimeError, match="without a selection decision"):
        list(fn.process((0, {"unit": [unit], "dec": [("select", (np.array([1 << SHIFT]), None, "x"))]})))
    list(fn.finish_bundle())
    (tmp_path / "blocked").write_text("a file where the output folder should be")
    fn = batched.ApplyFn(cfg, str(tmp_path / "blocked"), schema.selected_schema(cfg))
    fn.setup()
    fn.start_bundle()
    rows = sum(1 for _ in io.iter_file(unit["files"][0].path, unit["files"][0].format))
    locs = np.arange(rows, dtype=np.int64)
    with pytest.raises(OSError):
        list(fn.process((0, {"unit": [unit], "dec": [("select", (locs, locs, None))]})))
        list(fn.finish_bundle())
    fn.teardown()


def test_apply_writes_one_file_per_unit_and_a_second_run_of_a_unit_writes_the_same_file(tmp_path, monkeypatch):
    """Apply writes its unit's rows itself (on Dask the sinks' tables piled up as task results): a
    task run again (a Dask retry) rewrites the same two files, and a unit whose rows are all gone
    still leaves both files, with the schema and no rows."""
    import pyarrow.parquet as pq

    from curate import config, schema
    from pipelines.locators import SHIFT

    monkeypatch.chdir(tmp_path)
    _pool(tmp_path)
    cfg = config.load(_job(tmp_path, str(tmp_path / "out"), "batch"))
    units = [{**u, "index": i} for i, u in enumerate(T.read_units(cfg))]
    fn = batched.ApplyFn(cfg, str(tmp_path / "out"), schema.selected_schema(cfg))
    fn.setup()
    fn.start_bundle()
    a, d = units[0], next(u for u in units if u["source"] == "d")
    rows = sum(1 for _ in io.iter_file(a["files"][0].path, a["files"][0].format))
    locs = (a["index"] << SHIFT) | np.arange(rows, dtype=np.int64)
    keep = [("select", (locs[1::2], np.arange(1, rows, 2), None)), ("select", (locs[::2], None, "random:over_budget"))]
    for _ in range(2):
        assert list(fn.process((a["index"], {"unit": [a], "dec": keep}))) == []
        assert list(fn.process((d["index"], {"unit": [d], "dec": [("id", [((d["index"] << SHIFT) | 1, None)])]}))) == []
        list(fn.finish_bundle())  # the files are written in a thread, done when the bundle is
    names = {p: sorted(x.name for x in (tmp_path / "out" / p).iterdir()) for p in ("annotated", "selected")}
    expected = sorted(f"part-{u['index']:05d}.parquet" for u in (a, d))
    assert names == {"annotated": expected, "selected": expected}
    ann = pq.read_table(tmp_path / "out" / "annotated" / expected[0])
    sel = pq.read_table(tmp_path / "out" / "selected" / expected[0])
    assert ann.schema == schema.ANNOTATED and sel.schema == schema.selected_schema(cfg)
    assert str(ann.schema.field("messages").type) == "list<item: struct<role: string, content: string>>"
    assert ann.num_rows > 10 and sel.num_rows == sum(ann.column("selected").to_pylist())
    assert sorted(sel.column("id").to_pylist()) == sorted(
        r["id"] for r in ann.to_pylist() if r["drop_reason"] is None)
    empty = pq.read_table(tmp_path / "out" / "annotated" / expected[1])
    assert empty.num_rows == 0 and empty.schema == schema.ANNOTATED
