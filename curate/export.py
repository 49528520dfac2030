"""``curate export``: selected/ in the forms fine-tuning code reads, in rank order.

- ``alpaca-json``: a JSON array of {instruction, input, output} (chat rows: the rendered
  prompt as instruction, empty input);
- ``sharegpt-json``: a JSON array of {id, conversations: [{from: system|human|gpt, value}]};
- ``messages-jsonl``: one {id, messages: [{role, content}]} object per line (TRL's format).

Texts are written as they are (UTF-8, no escaping), so they load back identical.
"""
from __future__ import annotations

import json
import os

from curate import storage

FORMATS = {"alpaca-json": "alpaca.json", "sharegpt-json": "sharegpt.json", "messages-jsonl": "messages.jsonl"}
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def rows_for(fmt: str, table) -> list[dict]:
    """Plain rows of the export format from a selected/ table."""
    ids, msgs = table.column("id").to_pylist(), table.column("messages").to_pylist()
    if fmt == "alpaca-json":
        return [{"instruction": i, "input": x or "", "output": o} for i, x, o in
                zip(table.column("instruction").to_pylist(), table.column("input").to_pylist(),
                    table.column("response").to_pylist())]
    if fmt == "sharegpt-json":
        return [{"id": rid, "conversations": [{"from": SHAREGPT_ROLE.get(m["role"], m["role"]), "value": m["content"]}
                                              for m in turns]} for rid, turns in zip(ids, msgs)]
    if fmt == "messages-jsonl":
        return [{"id": rid, "messages": [{"role": m["role"], "content": m["content"]} for m in turns]}
                for rid, turns in zip(ids, msgs)]
    raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")


def export(folder: str, fmt: str, out: str | None = None) -> tuple[str, int]:
    """Write ``folder``'s selected/ as ``fmt``; returns (path, rows)."""
    from curate import runs

    table = runs.selected(folder)
    rows = rows_for(fmt, table)
    path = out or storage.join(folder, "export", FORMATS[fmt])
    if fmt.endswith("jsonl"):
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        text = json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
    if storage.is_remote(path):  # one object PUT: it appears whole
        with storage.open_file(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        return path, len(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path, len(rows)
