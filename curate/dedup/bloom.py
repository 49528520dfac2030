"""A Bloom filter of string ids, built in shards: the near-duplicate stage's candidate set.

Why: the ids on a candidate edge pick the rows whose signatures are computed again for the
verification, and that set reaches every worker. As a Python set it costs about 100 bytes an id
(2 GB at 20M candidates, on each worker); a Bloom filter costs BITS_PER_ID bits an id (25 MB).
Its price is about 1% false positives: rows whose signature is computed again for nothing, which
then meet no edge and leave no trace, so the stage's results do not change.

Built in SHARDS parts, one per group of ids (by their hash), so each part is made on whichever
worker groups its ids and no worker ever holds the whole candidate list; the parts reach the
workers as one small dict. Hand-written (a few lines of numpy): the maintained PyPI filters hash
with Python's own ``hash``, salted per process unless given a function, and build one filter in
one place.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

SHARDS = 512
BITS_PER_ID = 10
HASHES = 7  # about ln 2 x BITS_PER_ID: 0.8% false positives at a full shard
MIN_BITS = 64


def _digest(rid: str) -> bytes:
    """8 x (1 + HASHES) bytes: the shard's 64-bit number, then one per bit position."""
    return hashlib.blake2b(rid.encode(), digest_size=8 * (1 + HASHES)).digest()


def shard_of(rid: str) -> int:
    return int.from_bytes(_digest(rid)[:8], "little") % SHARDS


def shard_filter(ids: Iterable[str]) -> tuple[int, bytes]:
    """(bits, packed bits) of one shard's filter, sized for its distinct ids."""
    digests = b"".join(_digest(rid) for rid in set(ids))
    hashes = np.frombuffer(digests, dtype="<u8").reshape(-1, 1 + HASHES)[:, 1:]
    bits = max(MIN_BITS, len(hashes) * BITS_PER_ID)
    flags = np.zeros(bits, dtype=bool)
    flags[(hashes % np.uint64(bits)).ravel().astype(np.int64)] = True
    return bits, np.packbits(flags).tobytes()


def might_contain(filters: dict[int, tuple[int, bytes]], rid: str) -> bool:
    """False: ``rid`` was surely not added; True: it was, or (rarely) a false positive."""
    digest = _digest(rid)
    part = filters.get(int.from_bytes(digest[:8], "little") % SHARDS)
    if part is None:
        return False
    bits, packed = part
    for i in range(8, len(digest), 8):
        p = int.from_bytes(digest[i:i + 8], "little") % bits
        if not packed[p >> 3] >> (7 - (p & 7)) & 1:
            return False
    return True
