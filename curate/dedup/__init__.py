"""Duplicate removal: exact (normalized-text hash), near (MinHash LSH) and semantic (SemDeDup).

All three keep exactly one member of a duplicate group (``keep_one``); they differ in how
groups are found and in which member their rule keeps.
"""
from __future__ import annotations

from typing import Callable


def keep_one(records: list[dict], key: Callable[[dict], tuple], dup_field: str, reason: str) -> dict:
    """Keep the member with the smallest ``key``; the others get ``dup_field = <kept id>`` and
    ``drop_reason = reason``. Returns the kept record."""
    keeper = min(records, key=key)
    for rec in records:
        if rec is keeper:
            rec[dup_field] = None
        else:
            rec[dup_field] = keeper["id"]
            rec["drop_reason"] = reason
    return keeper
