"""The reflection stage: teacher rewrites that the student accepts or rejects (``curate.rewrite``).

    rows -> Q and A requests -> Teacher (cached) -> parsed Q* -> QA requests -> Teacher (cached)
    rows + replies --CoGroupByKey--> variants (ori, Q, A, QA) -> student IFD / r-IFD (cached)
    row + scored variants --CoGroupByKey--> decision -> the row (rewritten or not) + failures

Teacher requests go through ``CachedInference`` keyed by ``curate.rewrite.teacher.request_key``
(endpoint model, template version, the full prompt, sampling), caching only successful replies:
a rerun sends no request that already succeeded, and retries those that failed. A row with a
failed request keeps its text (``rewrite_status: teacher_failed``) and each failed request goes
to ``rewrite_failures/`` with its error, so rows in = rows out and a rerun after the server is
back completes them. The student is the IFD stage's weak LM and settings (``score.ifd``); its
scores share the IFD cache. The stage runs after exact dedup (no duplicate is sent to the
teacher) and before a second exact pass over the rows still in play, near dedup and scoring, so a
rewrite that duplicates another row is caught and the final rows are what gets scored and selected.
"""
from __future__ import annotations

import json
import logging
import math

import apache_beam as beam
import pyarrow as pa

from curate.rewrite import reflection as R
from curate.rewrite.teacher import Teacher, TeacherSettings, request_key
from curate.scoring.ifd import COLUMNS as IFD_COLUMNS
from curate.settings import Job
from pipelines.cached import CachedInference, StageHandler
from pipelines.score import IFDHandler, score_text_hash
from pipelines.stage import STATS, LiveStage, StageFn

log = logging.getLogger("curate")
REPLY = [pa.field("reply", pa.string()), pa.field("reply_status", pa.string()), pa.field("reply_error", pa.string()),
         pa.field("reply_attempts", pa.int64())]
FAILURES = "failures"


class TeacherHandler(StageHandler):
    """Request records in, ``{reply, reply_status, reply_error, reply_attempts}`` out."""

    stage = "rewrite_teacher"

    def __init__(self, s: TeacherSettings, rows: int = 16, client=None):
        super().__init__(min_batch_size=1, max_batch_size=rows)
        self.s, self.client = s, client

    def load_model(self):
        return Teacher(self.s, client=self.client)

    def infer(self, batch, model, progress):
        replies = model.complete_many([r["messages"] for r in batch])
        progress(len(batch))
        return [{"reply": r.text, "reply_status": r.status, "reply_error": r.error, "reply_attempts": r.attempts}
                for r in replies]


def _request(row: dict, kind: str, instruction: str, answer: str, s: TeacherSettings) -> dict:
    messages = (R.instruction_messages if kind == "Q" else R.response_messages)(instruction, answer)
    return {"row": row["id"], "kind": kind, "messages": messages,
            "key": request_key(s.model, R.TEMPLATE_VERSION, messages, s.sampling())}


def failure(row: dict, request: str, reply: dict):
    """The dead-letter row (``rewrite_failures/``) of a request that failed after its retries."""
    return beam.pvalue.TaggedOutput(FAILURES, {"id": row["id"], "source": row["source"], "request": request,
                                               "error": reply["reply_error"], "attempts": reply["reply_attempts"]})


def single_turn(row: dict) -> bool:
    return len(row.get("messages") or []) == 2


def first_requests(row: dict, s: TeacherSettings):
    """A multi-turn row is left as it is; a single-turn one asks for both reflections."""
    if single_turn(row):
        yield _request(row, "Q", row["prompt"], row["response"], s)
        yield _request(row, "A", row["prompt"], row["response"], s)


def second_requests(reply: dict, s: TeacherSettings):
    """The response reflection on the reflected instruction and its answer (the QA variant)."""
    if reply["kind"] == "Q" and reply["reply_status"] == "ok":
        pair = R.parse_instruction_reflection(reply["reply"])
        if pair:
            yield _request({"id": reply["row"]}, "QA", pair[0], pair[1], s)


def _variant(row: dict, name: str, instruction: str, extra: str, response: str) -> dict:
    return {"row": row["id"], "variant": name, "_instruction": instruction, "_input": extra, "response": response}


class BuildVariantsFn(StageFn):
    """Per row: its replies parsed into variants for the student, and a state record (the row,
    what failed) for the decision. Failed requests go to the failures output."""

    stage = "rewrite"
    metrics = ("requests_failed", "parse_failed")

    def handle(self, element):
        _, grouped = element
        row = grouped["row"][0]
        replies = {r["kind"]: r for r in grouped["replies"]}
        failed = [r for r in replies.values() if r["reply_status"] != "ok"]
        for r in failed:
            self.count("requests_failed")
            yield failure(row, r["kind"], r)
        yield beam.pvalue.TaggedOutput("state", (row["id"], {"row": row, "failed": bool(failed)}))
        if not single_turn(row):
            return
        variants = {"ori": _variant(row, "ori", row["_instruction"], row["_input"], row["response"])}
        if "Q" in replies and replies["Q"]["reply_status"] == "ok":
            pair = R.parse_instruction_reflection(replies["Q"]["reply"])
            if pair:
                variants["Q"] = _variant(row, "Q", pair[0], "", pair[1])
                qa = replies.get("QA")
                better = R.parse_response_reflection(qa["reply"]) if qa and qa["reply_status"] == "ok" else None
                if better:
                    variants["QA"] = _variant(row, "QA", pair[0], "", better)
        if "A" in replies and replies["A"]["reply_status"] == "ok":
            better = R.parse_response_reflection(replies["A"]["reply"])
            if better:
                variants["A"] = _variant(row, "A", row["_instruction"], row["_input"], better)
        if len(variants) == 1 and not failed:
            self.count("parse_failed")
        yield from variants.values()


def _finite(x) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


class DecideFn(StageFn):
    """The student's choice (``curate.rewrite.reflection.decide``) applied to the row."""

    stage = "rewrite"
    metrics = ("rows", "status", "kind")

    def handle(self, element):
        _, grouped = element
        state = grouped["state"][0]
        row, variants = state["row"], {v["variant"]: v for v in grouped["variants"]}
        scores = {name: (v["ifd_ppl"], v["rifd"]) for name, v in variants.items()}  # the reference's ratios
        row["original_prompt"], row["original_response"] = row["prompt"], row["response"]
        row["rewrite_scores"] = json.dumps({k: [_finite(a), _finite(b)] for k, (a, b) in sorted(scores.items())})
        if not single_turn(row):
            kind, status = "ori", "not_applicable"
        elif state["failed"]:
            kind, status = "ori", "teacher_failed"  # decided on the rerun, with every reply in hand
        elif len(variants) == 1:
            kind, status = "ori", "parse_failed"
        else:
            kind = R.decide(scores) or "ori"
            status = "accepted" if kind != "ori" else "kept_original"
        if kind != "ori":
            v = variants[kind]
            prompt = v["_instruction"] + ("\n\n" + v["_input"] if v["_input"].strip() else "")
            row.update(prompt=prompt, response=v["response"], _instruction=v["_instruction"], _input=v["_input"],
                       messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": v["response"]}])
        row["rewrite_kind"], row["rewrite_status"] = kind, status
        self.count("rows")
        self.count("status", reason=status)
        self.count("kind", reason=kind)
        yield row


class Reflection(LiveStage):
    """Reflection columns on the rows still in play, and ``failures`` (the dead-letter rows)."""

    columns = R.COLUMNS.names
    extra_outputs = (FAILURES,)

    def __init__(self, cfg: Job, rt: dict, run_id: str = "run", teacher_handler=None, student_handler=None):
        super().__init__()
        self.cfg, self.rt, self.run_id = cfg, rt, run_id
        self.enabled = cfg.rewrite.reflection.enabled
        self.teacher_handler, self.student_handler = teacher_handler, student_handler

    def _teacher(self, name: str):
        handler = self.teacher_handler or TeacherHandler(TeacherSettings(**self.rt["teacher"]),
                                                         self.cfg.rewrite.teacher.batch_rows)
        return CachedInference(name, handler, lambda r: r["key"], REPLY, self.rt.get("cache"),
                               self.rt.get("cache_files"), self.run_id, flush_rows=1,
                               cache_when=lambda r: r["reply_status"] == "ok")

    def expand_live(self, live):
        s = TeacherSettings(**self.rt["teacher"])
        first = (live | "FirstRequests" >> beam.FlatMap(first_requests, s)
                 | "Teacher" >> self._teacher("rewrite_teacher"))
        second = (first["records"] | "SecondRequests" >> beam.FlatMap(second_requests, s)
                  | "TeacherQA" >> self._teacher("rewrite_teacher_qa"))
        replies = ((first["records"], second["records"]) | "Replies" >> beam.Flatten()
                   | "ByRow" >> beam.Map(lambda r: (r["row"], r)))
        rows = live | "RowsById" >> beam.Map(lambda r: (r["id"], r))
        built = ({"row": rows, "replies": replies} | "Gather" >> beam.CoGroupByKey()
                 | "Variants" >> beam.ParDo(BuildVariantsFn()).with_outputs(FAILURES, "state", STATS, main="variants"))
        student = self.student_handler or IFDHandler(self.cfg.score.ifd, self.rt["student"])
        scored = built.variants | "Student" >> CachedInference(
            "rewrite_student", student, score_text_hash, IFD_COLUMNS.fields(), self.rt["student"].get("cache"),
            self.rt["student"].get("cache_files"), self.run_id)
        by_row = scored["records"] | "VariantsByRow" >> beam.Map(lambda v: (v["row"], v))
        decided = ({"state": built.state, "variants": by_row} | "Join" >> beam.CoGroupByKey()
                   | "Decide" >> beam.ParDo(DecideFn()).with_outputs(STATS, main="records"))
        stats = ((first["stats"], second["stats"], built[STATS], scored["stats"], decided[STATS])
                 | "Stats" >> beam.Flatten())
        return {"records": decided.records, "stats": stats, FAILURES: built[FAILURES]}
