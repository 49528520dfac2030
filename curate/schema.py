"""Arrow schemas of the outputs, versioned; the JSON copies in ``schemas/`` are generated from here.

Parquet files carry ``curate.schema`` (name) and ``curate.schema_version`` in
their key-value metadata. Bump the version when a column changes meaning or is
removed; adding a nullable column bumps the minor number.

Regenerate the JSON copies after a change: ``python -m curate.schema schemas/``
(a test fails while they differ).
"""
from __future__ import annotations

import json
import os
import sys

import pyarrow as pa

from curate.cluster import COLUMNS as CLUSTER_COLUMNS
from curate.dedup.exact import COLUMNS as EXACT_COLUMNS
from curate.dedup.near import COLUMNS as NEAR_COLUMNS
from curate.dedup.semantic import COLUMNS as SEMANTIC_COLUMNS
from curate.rewrite.realign import COLUMNS as REALIGN_COLUMNS
from curate.rewrite.reflection import COLUMNS as REWRITE_COLUMNS
from curate.scoring.degradation import COLUMNS as DEGRADATION_COLUMNS
from curate.scoring.ifd import COLUMNS as IFD_COLUMNS
from curate.scoring.less import COLUMNS as LESS_COLUMNS
from curate.scoring.rds import COLUMNS as RDS_COLUMNS

SCHEMA_VERSION = "2.0"  # 2.0: selected/ leaves out drop_reason and the columns of stages that did not run

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# Every stage's declared columns (curate.columns), in pipeline order.
STAGE_COLUMNS = (REWRITE_COLUMNS, REALIGN_COLUMNS, EXACT_COLUMNS, NEAR_COLUMNS, CLUSTER_COLUMNS, SEMANTIC_COLUMNS,
                 IFD_COLUMNS, RDS_COLUMNS, LESS_COLUMNS, DEGRADATION_COLUMNS)
# Score columns: those of the score.* stages (null on rows not scored, NaN where undefined)
SCORE_FIELDS = [f for st in STAGE_COLUMNS if st.stage.startswith("score.") for f in st.fields()]


def declared_columns() -> list:
    return [c for st in STAGE_COLUMNS for c in st.columns]


def rank_columns() -> tuple[str, ...]:
    """Score columns that policies and the report rank rows by."""
    return tuple(c.name for c in declared_columns() if c.rank)


def stage_of(column: str):
    """The ``StageColumns`` that declares ``column``, or None (a base column)."""
    return next((st for st in STAGE_COLUMNS if column in st.names), None)


# Every row that passed validation, kept or dropped, with the decision and why.
ANNOTATED_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("response", pa.string(), nullable=False),
    pa.field("instruction", pa.string()),
    pa.field("input", pa.string()),
    pa.field("messages", pa.list_(MESSAGE), nullable=False),
    pa.field("original", pa.string(), nullable=False),
    *[c.field() for c in declared_columns()],
    pa.field("selected", pa.bool_(), nullable=False),
    pa.field("rank", pa.int64()),
    pa.field("drop_reason", pa.string()),
]

REJECT_FIELDS = [
    pa.field("source", pa.string(), nullable=False),
    pa.field("file", pa.string(), nullable=False),
    pa.field("row_number", pa.int64(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string(), nullable=False),
    pa.field("raw", pa.string(), nullable=False),
]

FIELD_DOCS = {
    "id": "stable row id: the source's id column, else a content hash (see curate.records)",
    "source": "the input's source name from the job file",
    "prompt": "prompt text (Alpaca: instruction + blank line + input; chat: turns before the last assistant turn)",
    "response": "response text (Alpaca output, or the last assistant turn)",
    "instruction": "Alpaca instruction (chat rows: the rendered prompt), what the alpaca-json export writes",
    "input": "Alpaca input, empty when the row had none (chat rows: empty)",
    "messages": "the conversation in chat form: prompt turns then the response as the last assistant turn",
    "original": "the input row as canonical JSON (sorted keys)",
    "embedding": "L2-normalized float32 sentence embedding (dimension in the schema metadata)",
    "text_hash": "blake2b-128 of the embedded (embeddings) or scored (score cache) text: with curate.embed_key, what a rerun reuses vectors by",
    "selected": "true if the row is in selected/",
    "rank": "the selection policy's rank (1 = chosen first), null when not selected",
    "drop_reason": "why the row is not selected: exact_duplicate, near_duplicate, semantic_duplicate, or the policy's '<policy>:<reason>' (superfiltering:ifd_ge_upper, ...); null when selected",
    "file": "input file the rejected row came from",
    "row_number": "1-based line (jsonl) or position (json, parquet) in that file",
    "reason": "reject reason code (see curate.records.REJECT_REASONS)",
    "detail": "human-readable detail of the reject",
    "raw": "the rejected row or line as text",
    "request": "rewrite_failures: which teacher request failed (Q: instruction reflection, A: response "
               "reflection, QA: response reflection of the new instruction)",
    "error": "rewrite_failures: the last error, after the retries",
    "attempts": "rewrite_failures: requests sent for it (first try and retries)",
    **{c.name: c.doc for c in declared_columns()},
}


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"curate.schema": name, "curate.schema_version": SCHEMA_VERSION})


def embeddings_schema(dim: int, key: str = "") -> pa.Schema:
    """embeddings/: one row per embedded id; the vector as a fixed-size float32 list. ``key``
    (``curate.embed.embed_key``) says which model settings made them, for reuse by a later run."""
    sch = _schema("embeddings", [pa.field("id", pa.string(), nullable=False),
                                 pa.field("text_hash", pa.string(), nullable=False),
                                 pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False)])
    return sch.with_metadata({**{k.decode(): v.decode() for k, v in sch.metadata.items()},
                              "curate.embedding_dim": str(dim), "curate.embed_key": key})


# selected/ holds what a trainer or an analyst reads there: annotated/'s columns less those null on
# every selected row (drop_reason, and the dedup bookkeeping: a kept row duplicates no kept row) and
# less the columns of the stages the job left off (all null). annotated/ keeps them all.
SELECTED_OMITS = ("drop_reason", "exact_dup_of", "near_dup_of", "near_dup_cluster", "semantic_dup_of")
SELECTED_NOTE = ("annotated/'s columns less drop_reason, the dedup columns and the columns of the stages the job "
                 "left off; the manifest's outputs.columns.selected lists what a run's selected/ holds")


def _ran(stage, job) -> bool:
    if stage.stage == "cluster" and job.cluster.column:
        return True  # cluster ids read from an input field, whatever cluster.enabled says (as config checks)
    return stage.enabled(job)


def selected_schema(job=None) -> pa.Schema:
    """selected/'s schema for ``job`` (``curate.settings.Job``); None: every stage on."""
    off = set() if job is None else {n for st in STAGE_COLUMNS if not _ran(st, job) for n in st.names}
    return _schema("selected", [f for f in ANNOTATED_FIELDS if f.name not in off and f.name not in SELECTED_OMITS])


def selected_like(names: list[str]) -> pa.Schema:
    """selected/'s schema holding ``names`` only (a ``curate select`` folder matches its run's)."""
    keep = set(names)
    return _schema("selected", [f for f in selected_schema() if f.name in keep])


ANNOTATED = _schema("annotated", ANNOTATED_FIELDS)
SELECTED = selected_schema()
REJECTS = _schema("rejects", REJECT_FIELDS)
EMBEDDINGS = embeddings_schema(384)  # as written with the default model; the dim follows the model
REWRITE_FAILURES = _schema("rewrite_failures", [
    pa.field("id", pa.string(), nullable=False), pa.field("source", pa.string()),
    pa.field("request", pa.string()), pa.field("error", pa.string()), pa.field("attempts", pa.int64())])
SCHEMAS = {"annotated": ANNOTATED, "selected": SELECTED, "rejects": REJECTS, "embeddings": EMBEDDINGS,
           "rewrite_failures": REWRITE_FAILURES}


def describe(schema: pa.Schema) -> dict:
    """A JSON-friendly description of a schema (what ``schemas/*.json`` hold)."""
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    return {
        "name": meta["curate.schema"],
        "version": meta["curate.schema_version"],
        **({"note": SELECTED_NOTE} if meta["curate.schema"] == "selected" else {}),
        "fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable,
                    "doc": FIELD_DOCS.get(f.name, "")} for f in schema],
    }


def write_json(folder: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, schema in SCHEMAS.items():
        path = os.path.join(folder, f"{name}.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(describe(schema), fh, indent=2)
            fh.write("\n")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_json(sys.argv[1] if len(sys.argv) > 1 else "schemas"):
        print(p)
