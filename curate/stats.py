"""Stage statistics: keys, progress logging. No Beam import.

A stat key is ``stage.metric``, optionally ``:reason`` and ``@source``, e.g.
``write.dropped:exact_duplicate@alpaca``. Stages add numbers under such keys;
the pipeline sums them and the manifest is built from the sums.
"""
from __future__ import annotations

import logging
import re
import time

log = logging.getLogger("curate")

_KEY = re.compile(r"^(?P<stage>[a-z_]+)\.(?P<metric>[a-z_]+)(?::(?P<reason>[^@]+))?(?:@(?P<source>.+))?$")


def stat_key(stage: str, metric: str, reason: str | None = None, source: str | None = None) -> str:
    key = f"{stage}.{metric}"
    if reason:
        key += f":{reason}"
    if source:
        key += f"@{source}"
    return key


def parse_stat_key(key: str) -> dict:
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"not a stat key: {key!r}")
    return m.groupdict()


class Progress:
    """Logs ``stage: N rows (R rows/s)`` at most every ``every`` seconds."""

    def __init__(self, stage: str, every: float = 10.0, unit: str = "rows"):
        self.stage, self.every, self.unit = stage, every, unit
        self.n = 0
        self.start = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = self.n / max(now - self.start, 1e-9)
            log.info("%s: %s %s so far (%.1f %s/s)", self.stage, f"{self.n:,}", self.unit, rate, self.unit)
