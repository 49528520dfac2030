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

from curate.stats import Progress, stat_key

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
        self._stats[key] += n
        counter = self._metrics.get(key)
        if counter is None:
            if metric not in self.declared_metrics():
                raise ValueError(f"{type(self).__name__} counts {metric!r}, which it does not declare in metrics")
            counter = self._metrics[key] = Metrics.counter("curate", key)
        if float(n).is_integer():
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
