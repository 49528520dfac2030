"""Stage statistics: keys, progress logging. No Beam import.

A stat key is ``stage.metric``, optionally ``:reason`` and ``@source``, e.g.
``write.dropped:exact_duplicate@alpaca``. Stages add numbers under such keys;
the pipeline sums them and the manifest is built from the sums.

Stage and metric names are checked when a key is built (``stat_key`` raises on a
name ``parse_stat_key`` could not read back), so a key that is built is a key the
manifest can read. Reasons and sources are free text; an ``@`` or ``%`` in a reason
is percent-encoded so it cannot be taken for the source separator.
"""
from __future__ import annotations

import logging
import re
import time

log = logging.getLogger("curate")

NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_KEY = re.compile(r"^(?P<stage>[a-z][a-z0-9_]*)\.(?P<metric>[a-z][a-z0-9_]*)"
                  r"(?::(?P<reason>[^@]+))?(?:@(?P<source>.+))?$")


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid stage or metric name, else ValueError naming it."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"{kind} name {name!r} is not valid in a stat key "
                         f"(lower-case letters, digits and _, starting with a letter)")
    return name


def _encode_reason(reason: str) -> str:
    return reason.replace("%", "%25").replace("@", "%40")


def _decode_reason(reason: str) -> str:
    return reason.replace("%40", "@").replace("%25", "%")


def stat_key(stage: str, metric: str, reason: str | None = None, source: str | None = None) -> str:
    key = f"{check_name('stage', stage)}.{check_name('metric', metric)}"
    if reason:
        key += f":{_encode_reason(str(reason))}"
    if source:
        key += f"@{source}"
    return key


START, END = "_start_t", "_end_t"  # metrics that are times: merged by min / max, not summed


def merge(key: str, values) -> float:
    """The run's value of a stat from its per-bundle values: a sum, or for a ``*_start_t`` /
    ``*_end_t`` metric (an epoch time) the earliest / latest."""
    metric = key.split(".", 1)[1].split(":", 1)[0].split("@", 1)[0]
    values = list(values)
    if metric.endswith(START):
        return min(values)
    if metric.endswith(END):
        return max(values)
    return sum(values)


def parse_stat_key(key: str) -> dict:
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"not a stat key: {key!r}")
    out = m.groupdict()
    if out["reason"] is not None:
        out["reason"] = _decode_reason(out["reason"])
    return out


class Progress:
    """Logs ``stage: N rows so far (R rows/s)`` at most every ``every`` seconds; with a ``total``
    also the share done and an ETA. ``log_first``: log the first piece of work at once (model
    stages, where the first result can take a while and says the model is running)."""

    def __init__(self, stage: str, every: float = 10.0, unit: str = "rows", total: int | None = None,
                 log_first: bool = False):
        self.stage, self.every, self.unit, self.total, self.log_first = stage, every, unit, total, log_first
        self.n = 0.0
        self.start = self.last = time.monotonic()

    def add(self, n: float) -> None:
        first = self.n == 0
        self.n += n
        now = time.monotonic()
        if (first and self.log_first) or now - self.last >= self.every:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        rate = self.n / max(now - self.start, 1e-9)
        done = f"{self.n:,.0f}"
        text = f"{self.stage}: {done} {self.unit} so far ({rate:.2f} {self.unit}/s)"
        if self.total:
            left = max(self.total - self.n, 0)
            eta = f", ETA {duration(left / rate)}" if rate > 0 else ""
            text = f"{self.stage}: {done} of {self.total:,} {self.unit} ({rate:.2f} {self.unit}/s{eta})"
        return text


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
