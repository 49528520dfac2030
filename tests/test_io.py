import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.io import SourceReadError, detect_format, iter_file, sample_rows


def test_jsonl_bad_lines_become_bad_rows(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n\n{not json}\n\xff\xfe bad\n')
    rows = list(iter_file(str(p), "jsonl"))
    assert [r.row_number for r in rows] == [1, 3, 4]  # blank line 2 is not a row
    assert rows[0].value == {"instruction": "a", "output": "b"}
    assert rows[1].bad_reason == "malformed_json" and rows[1].raw_text == "{not json}"
    assert rows[2].bad_reason == "undecodable_bytes" and "\\xff" in rows[2].raw_text


def test_json_list_and_detection(tmp_path):
    lst = tmp_path / "l.json"
    lst.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    lines = tmp_path / "lines.json"
    lines.write_text('{"a": 1}\n{"a": 2}\n')
    assert detect_format(str(lst)) == "json"
    assert detect_format(str(lines)) == "jsonl"
    assert [r.value for r in iter_file(str(lst), "json")] == [{"a": 1}, {"a": 2}]


def test_unreadable_json_names_the_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[{"a": 1}, {"a": ')
    with pytest.raises(SourceReadError, match="broken.json"):
        list(iter_file(str(p), "json"))
    q = tmp_path / "obj.json"
    q.write_text('"just text"')
    with pytest.raises(SourceReadError, match="expected a JSON list"):
        list(iter_file(str(q), "json"))


def test_parquet_rows(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["x", "y"]}), p)
    assert [r.value["output"] for r in iter_file(str(p), "parquet")] == ["x", "y"]


def _rows(tmp_path, n=50):
    p = tmp_path / "r.jsonl"
    p.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(n)))
    return list(iter_file(str(p), "jsonl"))


def test_sampling_head_and_seeded(tmp_path):
    rows = _rows(tmp_path)
    assert [r.row_number for r in sample_rows(rows, "s", "head", 3, None, 0)] == [1, 2, 3]
    a = [r.value["instruction"] for r in sample_rows(rows, "s", "random", 10, None, 1)]
    b = [r.value["instruction"] for r in sample_rows(list(reversed(rows)), "s", "random", 10, None, 1)]
    c = [r.value["instruction"] for r in sample_rows(rows, "s", "random", 10, None, 2)]
    assert len(a) == 10 and sorted(a) == sorted(b)  # same rows whatever the file order
    assert sorted(a) != sorted(c)  # the seed matters
    frac = list(sample_rows(rows, "s", "random", None, 0.5, 1))
    assert 10 < len(frac) < 40
    assert len(list(sample_rows(rows, "s", "random", 500, None, 1))) == 50


def test_compressed_json_and_json_lines_read_as_the_plain_files(tmp_path):
    import bz2
    import gzip

    import zstandard

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    lines = ("".join(json.dumps(r) + "\n" for r in rows) + "{not json}\n").encode()
    listed = json.dumps(rows).encode()
    files = {"a.jsonl.gz": gzip.compress(lines), "a.jsonl.zst": zstandard.ZstdCompressor().compress(lines),
             "a.ndjson.bz2": bz2.compress(lines), "l.json.gz": gzip.compress(listed),
             "lines.json.zst": zstandard.ZstdCompressor().compress(lines)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        fmt = detect_format(str(tmp_path / name))
        assert fmt == ("json" if name.startswith("l.") else "jsonl"), name
        got = list(iter_file(str(tmp_path / name), fmt))
        assert [r.value for r in got if r.bad_reason is None] == rows, name
        if fmt == "jsonl":  # a bad line is still a bad row, with its line number
            assert [(r.row_number, r.bad_reason) for r in got if r.bad_reason] == [(6, "malformed_json")]
    with pytest.raises(SourceReadError, match="cannot tell the format"):
        detect_format(str(tmp_path / "x.parquet.gz"))


def test_a_truncated_or_corrupt_compressed_file_is_one_line_naming_it(tmp_path):
    import gzip
    import random

    from curate.io import preflight

    noise = random.Random(0)
    big = "".join(json.dumps({"instruction": f"q{i}", "output": "%x" % noise.getrandbits(800)}) + "\n"
                  for i in range(2000)).encode()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress(big)[:20000])
    with pytest.raises(SourceReadError, match="cut.jsonl.gz"):
        list(iter_file(str(cut), "jsonl"))
    junk = tmp_path / "junk.jsonl.zst"
    junk.write_bytes(b"this is not zstd at all")
    with pytest.raises(SourceReadError, match="junk.jsonl.zst: cannot decompress"):
        preflight(str(junk), "jsonl")
    with pytest.raises(SourceReadError, match="junk.jsonl.zst"):
        list(iter_file(str(junk), "jsonl"))


def test_a_saved_hugging_face_dataset_is_its_arrow_files_in_order(tmp_path):
    datasets = pytest.importorskip("datasets")
    from curate.io import resolve_paths

    rows = [{"instruction": f"q{i}", "output": f"a{i}", "n": i} for i in range(7)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    files = resolve_paths(str(tmp_path / "ds"))
    assert len(files) == 3 and all(detect_format(f) == "arrow" for f in files)
    assert [r.value for f in files for r in iter_file(f, "arrow")] == rows
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(SourceReadError, match="splits train, test; point the path at one split"):
        resolve_paths(str(tmp_path / "dd"))
    assert [r.value for r in iter_file(resolve_paths(str(tmp_path / "dd" / "test"))[0], "arrow")] == rows[:1]
    assert resolve_paths(str(tmp_path)) == []  # a plain folder has no rows
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "state.json").write_text(json.dumps({"_data_files": []}))
    with pytest.raises(SourceReadError, match="state.json lists no data files"):
        resolve_paths(str(tmp_path / "empty"))


def test_an_arrow_file_in_the_file_format_reads_too(tmp_path):
    p = tmp_path / "rows.arrow"  # datasets writes the stream format; pyarrow's writers also the file format
    table = pa.table({"instruction": ["a", "b", "c"], "output": ["x", "y", "z"]})
    with pa.ipc.new_file(str(p), table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    assert [r.value for r in iter_file(str(p), detect_format(str(p)))] == table.to_pylist()
    (tmp_path / "bad.arrow").write_bytes(b"not arrow")
    from curate.io import preflight
    with pytest.raises(SourceReadError, match="not a readable Arrow file"):
        preflight(str(tmp_path / "bad.arrow"), "arrow")


def test_a_job_reads_lima_rows_from_compressed_files_and_a_saved_dataset(job_dir):
    import gzip

    import zstandard

    datasets = pytest.importorskip("datasets")
    from tests.conftest import load_manifest, run_cli, without_models, write_job

    lima = [{"conversations": [f"Question {i}?", f"Answer {i}."], "source": "stackexchange"} for i in range(4)]
    (job_dir / "lima.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in lima).encode()))
    (job_dir / "alpaca.json.gz").write_bytes(gzip.compress(json.dumps(
        [{"instruction": f"Task {i}", "output": f"Done {i}"} for i in range(3)]).encode()))
    datasets.Dataset.from_list([{"instruction": f"Saved {i}", "output": f"Row {i}"} for i in range(5)]).save_to_disk(
        str(job_dir / "saved"), num_shards=2)
    cfg = without_models({"output": "out", "inputs": [{"source": "lima", "path": "lima.jsonl.zst"},
                                                      {"source": "alpaca", "path": "alpaca.json.gz"},
                                                      {"source": "saved", "path": "saved"}]})
    assert run_cli("run", write_job(job_dir, cfg)) == 0
    man = load_manifest("out")
    assert man["counts"]["rows_in"] == 12 and man["counts"]["selected"] == 12 and man["counts"]["rejected"] == {}
    assert {i["path"].split("/")[-1] for i in man["inputs"]} == {
        "lima.jsonl.zst", "alpaca.json.gz", "data-00000-of-00002.arrow", "data-00001-of-00002.arrow"}


def test_a_large_json_lines_file_reads_in_pieces_with_its_line_numbers(tmp_path):
    from curate.io import jsonl_chunks

    p = tmp_path / "big.jsonl"
    lines = [json.dumps({"instruction": f"q{i}", "output": "x" * (i % 50)}) for i in range(3000)]
    lines[1234] = "{not json"
    lines[2000] = ""
    p.write_text("\n".join(lines) + "\n")
    whole = [(r.row_number, r.value, r.bad_reason) for r in iter_file(str(p), "jsonl")]
    pieces = jsonl_chunks(str(p), target=4096)
    assert len(pieces) > 10 and pieces[0][:2] == (0, pieces[1][0]) and pieces[-1][1] == p.stat().st_size
    parts = [(r.row_number, r.value, r.bad_reason) for piece in pieces for r in iter_file(str(p), "jsonl", piece)]
    assert parts == whole and len(whole) == 2999 and (1235, None, "malformed_json") in parts
    assert jsonl_chunks(str(p)) == [(0, -1, 1)]  # small: one piece


@pytest.mark.parametrize("block", [7, 64, 1 << 20])
def test_lines_read_in_blocks_are_the_files_lines(tmp_path, monkeypatch, block):
    """Blocks that cut lines anywhere, CRLF ends, blank lines, no final newline: the same numbered
    lines as reading the file line by line."""
    from curate import io as cio

    monkeypatch.setattr(cio, "LINE_BLOCK", block)
    text = b'{"a": 1}\r\n\n  \n{"b": "x\xc3\xa9"}\n' + b"".join(b'{"c": %d}\n' % i for i in range(40)) + b'{"end": 0}'
    p = tmp_path / "f.jsonl"
    p.write_bytes(text)
    want = [(n, line.rstrip(b"\r")) for n, line in enumerate(text.split(b"\n"), start=1) if line.strip()]
    assert list(cio.jsonl_lines(str(p))) == want
    pieces = cio.jsonl_chunks(str(p), target=40)
    assert len(pieces) > 3
    assert [x for piece in pieces for x in cio.jsonl_lines(str(p), *piece)] == want


def test_a_parquet_output_refused_by_the_writer_leaves_no_file_handle_open(tmp_path, monkeypatch):
    """``storage.ParquetFile``: a schema pyarrow's writer refuses raises, and the file it opened
    is closed (a thread writing many units would otherwise leak one per failure); a good one
    writes each table as a row group, list items named "item"."""
    from curate import storage

    opened = []
    real = storage.open_file
    monkeypatch.setattr(storage, "open_file", lambda *a, **k: opened.append(real(*a, **k)) or opened[-1])
    with pytest.raises(TypeError):
        with storage.ParquetFile(str(tmp_path / "bad" / "x.parquet"), "not a schema"):
            pass
    assert opened and opened[0].closed
    schema = pa.schema([pa.field("xs", pa.list_(pa.int64()))])
    with storage.ParquetFile(str(tmp_path / "good" / "x.parquet"), schema) as out:
        out.write(pa.table({"xs": [[1], [2, 3]]}, schema=schema))
        out.write(pa.table({"xs": [[4]]}, schema=schema))
    got = pq.ParquetFile(tmp_path / "good" / "x.parquet")
    assert got.metadata.num_row_groups == 2 and str(got.schema_arrow.field("xs").type) == "list<item: int64>"
    assert opened[-1].closed
