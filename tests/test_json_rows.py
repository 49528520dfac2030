"""The Arrow lane of record building equals ``records.convert`` row for row, and leaves to the
per-row path every row whose rules it does not apply itself."""
import json
import sys

import numpy as np
import pytest

from curate.json_rows import blank, convert_block
from curate.records import FieldMap, RowSpec, convert

import pyarrow as pa

EASY = [  # the same keys in every row: a key some rows lack is a null in the block
    {"instruction": "Say hi", "input": "", "output": "Hi.", "topic": 7, "flag": True},
    {"instruction": "Add", "input": "2 and 3", "output": "5", "topic": -12345678901, "flag": False},
    {"output": "tab\there \"quoted\" back\\slash\nnew\rline\bbell\fform", "instruction": "é ü 😀 \u2028 ß",
     "input": "   \u3000 ", "topic": -0, "flag": False},
    {"flag": True, "instruction": "sp\u00a0ace", "input": "x\x85", "output": "x\u200ay", "topic": 0},
]


def per_row(line: bytes, spec: RowSpec):
    kind, item = convert(json.loads(line.decode("utf-8")), spec, "f.jsonl", 1)
    return kind, item


def lines_of(rows):
    return [json.dumps(r, ensure_ascii=i % 2 == 0).encode("utf-8") for i, r in enumerate(rows)]


def check_equal(lines, spec):
    keep, cols = convert_block(lines, spec)
    for j, pos in enumerate(keep):
        kind, rec = per_row(lines[pos], spec)
        assert kind == "record", lines[pos]
        got = {k: cols[k][j].as_py() for k in cols}
        want = {"id": rec["id"], "source": rec["source"], "prompt": rec["prompt"], "response": rec["response"],
                "instruction": rec["_instruction"], "input": rec["_input"], "messages": rec["messages"],
                "original": rec["original"]}
        assert got == want, lines[pos]
    return list(keep)


def test_easy_rows_all_take_the_lane_and_equal_the_per_row_records():
    spec = RowSpec("src")
    assert check_equal(lines_of(EASY), spec) == list(range(len(EASY)))


def test_rows_a_per_row_rule_decides_are_left_to_it():
    rows = EASY[:2] + [
        {"instruction": "  ", "input": "", "output": "x", "topic": 1, "flag": True},  # empty_prompt
        {"instruction": "q", "input": "", "output": " \n ", "topic": 1, "flag": True},  # empty_response
        {"instruction": "q", "output": "x", "topic": 1, "flag": True},  # no input: a null in the block
        {"instruction": "q", "input": None, "output": "x", "topic": 1, "flag": True},  # null input
        {"instruction": "q\x00", "input": "\x1f", "output": "ctl \u0001\x7f", "topic": 1, "flag": True},  # taken
        {"instruction": "q" * 50, "input": "", "output": "y" * 60, "topic": 1, "flag": True},  # too_long at 100
    ]
    spec = RowSpec("src", max_chars=100)
    assert check_equal(lines_of(rows), spec) == [0, 1, 6]
    for pos in (2, 3, 7):
        assert per_row(lines_of(rows)[pos], spec)[0] == "reject"


@pytest.mark.parametrize("bad", [
    b'{"instruction": "q", "output": "a"} {"instruction": "r", "output": "b"}',  # two objects on a line
    b'{"instruction": "q", "output": "a", "output": "b"}',  # a key twice
    b'{"instruction": "q", "output": "\\ud800"}',  # a lone surrogate
    b'{"instruction": "q", "output": "a", "w": 1.5}',  # a float
    b'{"instruction": "q", "output": "a", "w": [1]}',  # a nested value
    b'{"instruction": "q", "output": "a"',  # malformed
    b'{"instruction": "q", "output": "\xff"}',  # not UTF-8
    b'{"instruction": 3, "output": "a"}',  # wrong type
    b'{"messages": [{"role": "user", "content": "q"}], "instruction": "q", "output": "a"}',  # chat form
])
def test_a_block_the_lane_cannot_read_exactly_goes_whole_to_the_per_row_path(bad):
    lines = lines_of(EASY) + [bad]
    keep, cols = convert_block(lines, RowSpec("src"))
    assert len(keep) == 0 and cols is None


def test_user_ids_and_remapped_fields():
    spec = RowSpec("s", fields=FieldMap(instruction="q", input="ctx", output="a"), id_field="uid")
    rows = [{"q": "x", "ctx": "c", "a": "y", "uid": 5}, {"q": "x", "ctx": "", "a": "y", "uid": -7}]
    assert check_equal(lines_of(rows), spec) == [0, 1]
    text_ids = [{"q": "x", "ctx": "c", "a": "y", "uid": "r1"}, {"q": "x", "ctx": "", "a": "y", "uid": ""}]
    assert check_equal(lines_of(text_ids), spec) == [0]  # an empty id is missing_id, the per-row rule
    assert per_row(lines_of(text_ids)[1], spec)[0] == "reject"
    unknown = lines_of([{"prompt": "q", "answer": "a"}])
    assert len(convert_block(unknown, spec)[0]) == 0
    assert convert_block(lines_of(rows), RowSpec("s", form="messages"))[1] is None


def test_blank_is_pythons_strip():
    texts = ["", " ", "\x1c\x1d", "\u2028", "\u200b", "a", "\u3000 x", "\x85\xa0"]
    assert list(blank(pa.array(texts))) == [not t.strip() for t in texts]
    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    assert max(spaces) <= "\u3000"  # the module's class stops there
    others = [chr(c) for c in range(0x3001) if not chr(c).isspace() and not 0xD800 <= c < 0xE000]
    assert blank(pa.array(spaces)).all() and not blank(pa.array(others)).any()


def test_the_scale_pools_rows_take_the_lane():
    from benchmarks.scale import real_rows

    rows = real_rows()[:300]
    lines = lines_of(rows)
    keep = check_equal(lines, RowSpec("s"))
    wanted = [i for i, line in enumerate(lines) if per_row(line, RowSpec("s"))[0] == "record"]
    assert len(keep) >= 0.9 * len(wanted) > 0
    assert np.all(np.isin(keep, wanted))


def test_a_table_the_lane_cannot_do_exactly_goes_whole_to_the_per_row_path():
    """A Parquet batch with a column name twice (which value a row has is the per-row rules'
    business), and an empty batch."""
    from curate.json_rows import convert_table

    text = pa.array(["q"])
    twice = pa.Table.from_arrays([text, pa.array(["a"]), pa.array(["b"])], names=["instruction", "output", "output"])
    assert convert_table(twice, RowSpec("s"))[1] is None
    once = pa.Table.from_arrays([text, pa.array(["a"])], names=["instruction", "output"])
    assert list(convert_table(once, RowSpec("s"))[0]) == [0]
    assert convert_table(once.slice(0, 0), RowSpec("s"))[1] is None
