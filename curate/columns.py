"""Output columns, declared once by the stage that writes them.

A ``Column`` is a name, an Arrow type, a one-line meaning and, for a score, the status column
that says why a value is missing and whether policies may rank by it. A ``StageColumns`` groups
a stage's columns with the job-file switches that turn the stage on. Everything that lists
columns derives from these declarations: the Parquet schemas and ``schemas/*.json``
(``curate.schema``), the report's score plots (``curate.report``), the select-time check that a
policy's columns will exist (``curate.config``), the rows a stage leaves null when it is off or
a row was dropped before it (``pipelines.stage.LiveStage``).

Adding a score: declare its ``StageColumns`` in the module that computes it and list it in
``curate.schema.STAGE_COLUMNS``, in pipeline order. This module imports nothing from curate.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    doc: str
    status: str | None = None  # the status column that explains a null/NaN value of this score
    rank: bool = False  # a score that policies and the report rank rows by

    def field(self) -> pa.Field:
        return pa.field(self.name, self.type)


@dataclass(frozen=True)
class StageColumns:
    stage: str  # the job-file section, e.g. "score.ifd"
    switches: tuple[str, ...]  # job-file booleans that must all be true for the stage to run
    columns: tuple[Column, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def fields(self) -> list[pa.Field]:
        return [c.field() for c in self.columns]

    def switches_off(self, job) -> list[str]:
        """The switches that ``job`` (``curate.settings.Job``) leaves off; [] when the stage runs."""
        off = []
        for switch in self.switches:
            node = job
            for part in switch.split("."):
                node = getattr(node, part)
            if not node:
                off.append(switch)
        return off

    def enabled(self, job) -> bool:
        return not self.switches_off(job)
