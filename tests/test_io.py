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
