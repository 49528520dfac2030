"""``records.to_record`` for a block of JSON lines at once, in Arrow columns (no Beam).

Why: building one record a row in Python (``json.loads``, the row-form rules, the canonical JSON
of ``original``, the content id) was most of the batch path's per-row cost. Here pyarrow's JSON
reader parses the block and the alpaca rules run as column operations.

Exactness comes first: a row leaves this lane for the per-row path (``records.convert``, with its
exact reject reasons) unless its columns are ones whose result here is known to equal the per-row
result. A block goes whole to the per-row path when pyarrow cannot read it (a malformed line,
bytes that are not UTF-8, a lone surrogate escape, a key twice in one object), when it finds more or fewer
rows than lines (two objects on a line), when a column has a type whose canonical JSON this module
does not write (floats, nested values, timestamps), or when the row form is not alpaca. A row
goes alone when it has a null (pyarrow cannot tell ``null`` from an absent key), a blank prompt
or response, is too long, or has an empty user id: each of those is a per-row rule's business.

Parquet batches take the same lane (``convert_table``): there every row has every column, so a
null is a null, which still sends the row to the per-row path.

``tests/test_json_rows.py`` compares this lane with ``records.convert`` row for row on rows that
take every branch.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.records import RowSpec, content_id

# Every character Python's str.strip()/str.split() treats as white space, as an RE2 class (none
# lies above U+3000, ``tests/test_json_rows.py`` checks all of Unicode; scanning it here took 0.3 s
# on an AMD EPYC with AVX-512)
_SPACE = "".join(f"\\x{{{c:x}}}" for c in range(0x3001) if chr(c).isspace())
_BLANK = f"^[{_SPACE}]*$"
_NEEDS_ESCAPE = '[\\\\"\\x00-\\x1f]'
_TEXT_TYPES = (pa.string(), pa.large_string())


def blank(texts: pa.Array) -> np.ndarray:
    """Where ``not text.strip()`` (empty or only white space, as Python sees it)."""
    return pc.match_substring_regex(texts, _BLANK).to_numpy(zero_copy_only=False)


def _json_string(texts: pa.Array) -> pa.Array:
    """Each text as ``json.dumps(ensure_ascii=False)`` writes it: the texts with a character to
    escape go through Python's own encoder (exact by construction, and 2x faster than seven
    Arrow replace passes on an AMD EPYC with AVX-512), the others only get their quotes."""
    from json.encoder import encode_basestring

    needs = pc.match_substring_regex(texts, _NEEDS_ESCAPE)
    if pc.any(needs).as_py():
        escaped = pa.array([encode_basestring(t)[1:-1] for t in texts.filter(needs).to_pylist()], pa.string())
        texts = pc.replace_with_mask(texts, needs, escaped)
    return pc.binary_join_element_wise('"', texts, '"', "")


def _json_values(column: pa.Array) -> pa.Array:
    if column.type in _TEXT_TYPES:
        return _json_string(column.cast(pa.string()))
    if pa.types.is_boolean(column.type):
        return pc.if_else(column, "true", "false")
    return column.cast(pa.string())  # an integer: the same digits as Python's int


def canonical_json(table: pa.Table) -> pa.Array:
    """``records.canonical_json`` of each row of a table whose columns are text, integers or bool
    and hold no null: keys sorted as Python sorts them, compact separators."""
    parts = []
    for i, name in enumerate(sorted(table.column_names)):
        parts += [("{" if i == 0 else ",") + json.dumps(name, ensure_ascii=False) + ":",
                  _json_values(table.column(name).combine_chunks())]
    if not parts:
        return pa.array(["{}"] * table.num_rows, pa.string())
    return pc.binary_join_element_wise(*parts, "}", "")


def _supported(t: pa.DataType) -> bool:
    return t in _TEXT_TYPES or pa.types.is_boolean(t) or pa.types.is_integer(t)


def _read(lines: list[bytes]) -> pa.Table | None:
    """The block as pyarrow reads it (types inferred), or None where it cannot."""
    import pyarrow.json as pj

    data = b"\n".join(lines)
    try:
        table = pj.read_json(io.BytesIO(data),
                             read_options=pj.ReadOptions(use_threads=False, block_size=len(data) + 1))
        table.validate(full=True)  # the reader lets bytes that are not UTF-8 through inside strings
    except Exception:  # noqa: BLE001 - any block pyarrow cannot read goes to the per-row path
        return None
    return table if table.num_rows == len(lines) else None


def convert_block(lines: list[bytes], spec: RowSpec) -> tuple[np.ndarray, dict[str, pa.Array] | None]:
    """(positions of the lines converted here, their record columns: id, source, prompt,
    response, instruction, input, messages, original); every other line is the per-row path's."""
    if not lines or spec.form not in ("auto", "alpaca"):
        return np.zeros(0, np.int64), None
    return convert_table(_read(lines), spec)


def convert_table(table: pa.Table | None, spec: RowSpec) -> tuple[np.ndarray, dict[str, pa.Array] | None]:
    """``convert_block`` for rows already in a table (a block of JSON lines as pyarrow read it, or
    a batch of a Parquet file): (positions converted here, their record columns)."""
    none = np.zeros(0, np.int64), None
    f = spec.fields
    if table is None or table.num_rows == 0 or spec.form not in ("auto", "alpaca"):
        return none
    names = table.column_names
    if len(set(names)) < len(names):
        return none  # a name twice: which value a row has is the per-row path's business
    if spec.form == "auto" and (f.messages in names or f.conversations in names):
        return none
    if not all(_supported(t) for t in table.schema.types):
        return none
    if f.instruction not in names or f.output not in names:
        return none  # a missing field or an unknown form, for every row: the per-row path says which
    if any(table.schema.field(n).type not in _TEXT_TYPES for n in (f.instruction, f.input, f.output) if n in names):
        return none  # a wrong type: the per-row path says which
    if spec.id_field is not None and (spec.id_field not in names
                                      or not (table.schema.field(spec.id_field).type in _TEXT_TYPES
                                              or pa.types.is_integer(table.schema.field(spec.id_field).type))):
        return none
    ok = np.ones(table.num_rows, bool)
    for name in names:
        col = table.column(name)
        if col.null_count:
            ok &= col.is_valid().to_numpy(zero_copy_only=False)
    table = table.filter(pa.array(ok))
    keep = np.flatnonzero(ok)
    instruction = table.column(f.instruction).combine_chunks()
    response = table.column(f.output).combine_chunks()
    if f.input in names:
        extra = table.column(f.input).combine_chunks()
        no_extra = pa.array(blank(extra))
        extra = pc.if_else(no_extra, "", extra)
        prompt = pc.if_else(no_extra, instruction, pc.binary_join_element_wise(instruction, extra, "\n\n"))
    else:
        extra = pa.array([""] * len(instruction), pa.string())
        prompt = instruction
    size = pc.add(pc.utf8_length(prompt), pc.utf8_length(response)).to_numpy(zero_copy_only=False)
    good = ~blank(response) & ~blank(prompt) & (size <= spec.max_chars)
    if spec.id_field is not None:
        given = table.column(spec.id_field).combine_chunks().cast(pa.string())
        good &= pc.not_equal(given, "").to_numpy(zero_copy_only=False)
    if not good.all():
        sel = pa.array(good)
        table, keep = table.filter(sel), keep[good]
        instruction, response, extra, prompt = (a.filter(sel) for a in (instruction, response, extra, prompt))
    original = canonical_json(table)
    if spec.id_field is not None:
        ids = pc.binary_join_element_wise(spec.source + ":", table.column(spec.id_field).combine_chunks()
                                          .cast(pa.string()), "")
    else:
        ids = pa.array([content_id(spec.source, c) for c in original.to_pylist()], pa.string())
    return keep, {"id": ids, "source": pa.array([spec.source] * len(keep), pa.string()), "prompt": prompt,
                  "response": response, "instruction": instruction, "input": extra,
                  "messages": chat(prompt, response), "original": original}


def chat(prompt: pa.Array, response: pa.Array) -> pa.Array:
    """The record's ``messages``: the prompt as one user turn, then the response."""
    from curate.schema import MESSAGE

    n = len(prompt)
    order = np.empty(2 * n, np.int64)
    order[0::2], order[1::2] = np.arange(n), np.arange(n) + n
    content = pa.concat_arrays([prompt.cast(pa.string()), response.cast(pa.string())]).take(pa.array(order))
    role = pa.DictionaryArray.from_arrays(pa.array(np.tile([0, 1], n).astype(np.int32)),
                                          pa.array(["user", "assistant"])).cast(pa.string())
    turns = pa.StructArray.from_arrays([role, content], fields=list(MESSAGE))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), turns,
                                    type=pa.list_(MESSAGE))
