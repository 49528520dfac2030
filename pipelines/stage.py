"""The base of every curate DoFn: it owns the bookkeeping, the subclass owns one decision.

A subclass sets ``stage``, declares the ``metrics`` it counts, implements
``handle(element)`` (a generator) and calls ``self.count(metric, n, reason=..., source=...)``
with a declared metric only (a test checks every declared name makes a key the
manifest can read). The base times ``handle``,
logs progress, mirrors counts into Beam metrics, and emits the summed stats of
each bundle on the ``stats`` output, so the job can check its accounting and
write the manifest from data rather than from runner-specific metrics.
"""
from __future__ import annotations

import time
from collections import Counter

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows

from curate.stats import END, START, Progress, stat_key

STATS = "stats"


class StageFn(beam.DoFn):
    stage = "stage"
    metrics: tuple[str, ...] = ()
    BASE_METRICS = ("busy_s",)

    @classmethod
    def declared_metrics(cls) -> tuple[str, ...]:
        return cls.BASE_METRICS + tuple(cls.metrics)

    def setup(self):
        self._progress = Progress(self.stage)
        self._metrics: dict[str, object] = {}

    def start_bundle(self):
        self._stats: Counter = Counter()

    def count(self, metric: str, n: float = 1, *, reason: str | None = None,
              source: str | None = None, progress: bool = False) -> None:
        key = stat_key(self.stage, metric, reason, source)
        if metric.endswith(START):
            self._stats[key] = min(self._stats.get(key, n), n)
        elif metric.endswith(END):
            self._stats[key] = max(self._stats.get(key, n), n)
        else:
            self._stats[key] += n
        counter = self._metrics.get(key)
        if counter is None:
            if metric not in self.declared_metrics():
                raise ValueError(f"{type(self).__name__} counts {metric!r}, which it does not declare in metrics")
            counter = self._metrics[key] = Metrics.counter("curate", key)
        if float(n).is_integer() and not metric.endswith((START, END)):
            counter.inc(int(n))
        if progress:
            self._progress.add(int(n))

    def handle(self, element):  # pragma: no cover - abstract
        raise NotImplementedError

    def process(self, element, *side_inputs):
        start = time.perf_counter()
        out = list(self.handle(element, *side_inputs))
        self._stats[stat_key(self.stage, "busy_s")] += time.perf_counter() - start
        yield from out

    def finish_bundle(self):
        for key, value in self._stats.items():
            yield pvalue.TaggedOutput(STATS, GlobalWindows.windowed_value((key, value)))


def is_live(record: dict) -> bool:
    """Still in play: no earlier stage dropped it."""
    return record.get("drop_reason") is None


def _with_nulls(record: dict, columns: tuple[str, ...]) -> dict:
    for name in columns:
        record.setdefault(name, None)
    return record


class LiveStage(beam.PTransform):
    """The base of a stage that works on the rows still in play. It owns what every such stage
    repeats: when the stage is off every row gets its columns as nulls (never 0) and the stage
    emits no stats; when it is on, rows an earlier stage dropped go around it with null columns,
    and the live rows go through ``expand_live``, which returns ``records`` and ``stats`` and
    any of the stage's ``extra_outputs`` (each an empty PCollection when the stage leaves it out).

    A subclass sets ``columns`` (the names it writes, from its ``curate.columns`` declaration),
    ``extra_outputs``, ``enabled`` (in ``__init__``) and implements ``expand_live``.
    """

    columns: tuple[str, ...] = ()
    extra_outputs: tuple[str, ...] = ()
    enabled: bool = True

    def expand_live(self, live) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _empty(self, pipeline, name: str):
        return pipeline | f"No{name.title()}" >> beam.Create([])

    def expand(self, records):
        p, columns = records.pipeline, tuple(self.columns)
        if not self.enabled:
            out = {"records": records | "Off" >> beam.Map(_with_nulls, columns)}
        else:
            live = records | "Live" >> beam.Filter(is_live)
            done = (records | "Dropped" >> beam.Filter(lambda r: not is_live(r))
                    | "DroppedNulls" >> beam.Map(_with_nulls, columns))
            out = dict(self.expand_live(live))
            out["records"] = (done, out["records"]) | "Merge" >> beam.Flatten()
        for name in ("stats", *self.extra_outputs):
            if name not in out:
                out[name] = self._empty(p, name)
        return out
