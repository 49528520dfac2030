"""Exact duplicates: same prompt and response after normalization.

Key: blake2b-128 of ``normalize_text(prompt) + "\\x1f" + normalize_text(response)``
(NFKC, case-folded, white space collapsed), prefixed by the source name when the
scope is ``source``.

Keep rule (deterministic, independent of input order): among a group, keep the
row whose source comes first in the job's ``inputs`` list, then the smallest
``id``. Every other member gets ``exact_dup_of = <kept id>`` and
``drop_reason = "exact_duplicate"``.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

from curate.columns import Column, StageColumns
from curate.dedup import keep_one
from curate.records import normalize_text

SCOPES = ("global", "source")
COLUMNS = StageColumns("dedup.exact", ("dedup.exact.enabled",), (
    Column("exact_dup_of", pa.string(), "id of the kept row this row exactly duplicates, else null"),
))


def dedup_key(prompt: str, response: str, source: str, scope: str = "global") -> str:
    h = hashlib.blake2b(digest_size=16)
    if scope == "source":
        h.update(source.encode("utf-8") + b"\x00")
    h.update(normalize_text(prompt).encode("utf-8"))
    h.update(b"\x1f")
    h.update(normalize_text(response).encode("utf-8"))
    return h.hexdigest()


def keep_order(record: dict, source_rank: dict[str, int]) -> tuple:
    return (source_rank.get(record["source"], len(source_rank)), record["id"])


def resolve_group(records: list[dict], source_rank: dict[str, int]) -> list[dict]:
    """Mark all but one member of an exact-duplicate group; returns the same dicts."""
    keep_one(records, lambda r: keep_order(r, source_rank), "exact_dup_of", "exact_duplicate")
    return records
