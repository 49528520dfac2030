"""Make record ids unique within the job, deterministically.

Ids are grouped per source (a user id is ``<source>:<value>``, so ids never
collide across sources). Rows sharing an id are ordered by their canonical original JSON. Content-hash
ids collide only for byte-identical rows: those are numbered ``<id>``,
``<id>#2``, ``<id>#3`` ... (interchangeable, so the numbering cannot change any
result) and the exact-dedup stage then keeps one. A user-given id that names
rows with *different* content keeps the content that sorts first (with its
identical copies numbered as above); the other rows go to rejects/ with reason
``duplicate_id``.
"""
from __future__ import annotations

from curate.records import make_reject


def resolve_ids(records: list[dict], user_ids: bool) -> tuple[list[dict], list[dict]]:
    """(records with unique ids, rejects) for the records sharing one id."""
    if len(records) == 1:
        return records, []
    records = sorted(records, key=lambda r: r["original"])
    first = records[0]["original"]
    kept, rejects = [], []
    for rec in records:
        if user_ids and rec["original"] != first:
            rejects.append(make_reject(rec["source"], rec.get("_file", ""), rec.get("_row", 0),
                                       "duplicate_id", f"id {rec['id']!r} is also used by another row",
                                       rec["original"]))
        else:
            kept.append(rec)
    base = kept[0]["id"]
    for n, rec in enumerate(kept[1:], start=2):
        rec["id"] = f"{base}#{n}"
    return kept, rejects
