"""The ReAlign stage: answers reformatted to their task's format, kept when nothing was lost
(``curate.rewrite.realign``).

    rows -> task category (embeddings + the trained classifier) [-> with ``classifier: teacher``:
    classify request -> Teacher -> the category the reply names, else the classifier's] ->
    reformat request (rows whose category has a format) -> Teacher (cached, as in
    ``pipelines.rewrite``) -> parse -> post-filter

The classifier is trained by the driver before the graph (``prepare``) and kept in the model
cache under a fingerprint of its training file and embedder, so a rerun reuses it. A row whose
request fails keeps its answer (``realign_status: teacher_failed``; the request goes to
``rewrite_failures/``); rows in = rows out. It runs after exact dedup and the reflection stage,
before the second exact pass.
"""
from __future__ import annotations

import logging
import os

import apache_beam as beam
import pyarrow as pa

from curate import cache_store
from curate.rewrite import realign as RA
from curate.rewrite.teacher import TeacherSettings, request_key
from curate.settings import Job
from pipelines.cached import CachedInference, StageHandler
from pipelines.rewrite import FAILURES, REPLY, TeacherHandler, failure, single_turn
from pipelines.stage import STATS, LiveStage, StageFn

log = logging.getLogger("curate")


def _file_hash(path: str) -> str:
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.blake2b(fh.read(), digest_size=16).hexdigest()


def prepare(r, embed_model: str | None) -> dict:
    """Train (or read from the cache) the task classifier; its test accuracy when a test file is given."""
    import json

    from curate.embed import encode, load_embedder
    from curate.errors import CurateError
    from curate.models import cache_root, resolve_embedder

    def read(name: str):
        path = getattr(r, name)
        if not os.path.isfile(path):
            raise CurateError(f"rewrite.realign.{name}: no such file {path}")
        try:
            return RA.read_labelled(path)
        except ValueError as exc:  # a bad row or bad JSON: one line naming the file
            raise CurateError(f"rewrite.realign.{name}: {exc}") from None

    train = read("classifier_train")
    test = read("classifier_test") if r.classifier_test else None
    folder = os.path.join(cache_root(), "realign", cache_store.fingerprint(
        {"train": _file_hash(r.classifier_train), "embedder": resolve_embedder(embed_model), "format": 1}))
    path = os.path.join(folder, "classifier.pkl")
    embedder = None
    if not os.path.isfile(path):
        texts, labels = train
        log.info("realign: training the task classifier on %d rows of %s", len(texts), r.classifier_train)
        embedder = load_embedder(embed_model)
        clf = RA.TaskClassifier().fit(encode(embedder, texts), labels)
        os.makedirs(folder, exist_ok=True)
        clf.save(path + ".tmp")
        os.replace(path + ".tmp", path)
    out = {"classifier": path, "classified_by": r.classifier, "embed_model": embed_model,
           "trained_on": os.path.abspath(r.classifier_train)}
    if test:
        texts, labels = test
        embedder = embedder or load_embedder(embed_model)
        out["test"] = RA.evaluate(RA.TaskClassifier.load(path), encode(embedder, texts), labels)
        log.info("realign: task classifier on %s: %s", r.classifier_test, json.dumps(out["test"]))
    return out


class ClassifyHandler(StageHandler):
    """Records in, ``{realign_category}`` out: the embedder and the trained classifier, once per worker."""

    stage = "realign_classify"

    def __init__(self, rt: dict, rows: int = 64):
        super().__init__(min_batch_size=1, max_batch_size=rows)
        self.rt = rt

    def load_model(self):
        from curate.embed import load_embedder

        return _Loaded(load_embedder(self.rt["embed_model"]), RA.TaskClassifier.load(self.rt["classifier"]))

    def infer(self, batch, model, progress):
        from curate.embed import encode

        labels = model.classifier.predict(encode(model.embedder, [r["_instruction"] for r in batch]))
        progress(len(batch))
        return [{"realign_category": c} for c in labels]


class _Loaded:
    def __init__(self, embedder, classifier):
        self.embedder, self.classifier = embedder, classifier


def classify_request(row: dict, s: TeacherSettings):
    """The teacher's classification request of a single-turn row (multi-turn rows are not rewritten)."""
    if single_turn(row):
        msgs = RA.classify_messages(row["prompt"])
        yield {"row": row["id"], "kind": "classify", "messages": msgs,
               "key": request_key(s.model, RA.CLASSIFY_TEMPLATE_VERSION, msgs, s.sampling())}


class ChooseCategoryFn(StageFn):
    """The category the teacher's reply names; the embedding classifier's label when the reply
    names none (or several) or the request failed (that request also goes to ``rewrite_failures/``)."""

    stage = "realign_category"
    metrics = ("rows", "by", "requests_failed")

    def handle(self, element):
        _, grouped = element
        row = dict(grouped["row"][0])
        reply = grouped["reply"][0] if grouped["reply"] else None
        if reply is None:
            by = "classifier"  # multi-turn: never asked
        elif reply["reply_status"] != "ok":
            by = "classifier_after_failed_request"
            self.count("requests_failed")
            yield failure(row, "realign_classify", reply)
        else:
            named = RA.parse_category(reply["reply"])
            by = "teacher" if named else "classifier_after_unparsed_reply"
            row["realign_category"] = named or row["realign_category"]
        row["realign_category_by"] = by
        self.count("rows")
        self.count("by", reason=by)
        yield row


def reformat_request(row: dict, s: TeacherSettings):
    """The reformat request of a single-turn row whose category has a format."""
    msgs = RA.messages(row["prompt"], row["response"], row["realign_category"]) if single_turn(row) else None
    if msgs:
        yield {"row": row["id"], "kind": "realign", "messages": msgs,
               "key": request_key(s.model, RA.TEMPLATE_VERSION, msgs, s.sampling())}


class ApplyFn(StageFn):
    """The reply parsed, the post-filter applied, the row updated (or not) with its status."""

    stage = "realign"
    metrics = ("rows", "status", "reason", "requests_failed")

    def __init__(self, model: str, min_ratio: float, short_words: int):
        self.model, self.min_ratio, self.short_words = model, min_ratio, short_words

    def setup(self):
        super().setup()
        from transformers import AutoTokenizer

        from curate.models import weak_lm_folder

        self.tok = AutoTokenizer.from_pretrained(weak_lm_folder(self.model))

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def handle(self, element):
        _, grouped = element
        row = grouped["row"][0]
        reply = grouped["reply"][0] if grouped["reply"] else None
        row.setdefault("original_prompt", None)
        if row.get("original_response") is None:
            row["original_prompt"], row["original_response"] = row["prompt"], row["response"]
        reason = None
        if not single_turn(row):
            status = "not_applicable"
        elif reply is None:
            status = "unchanged_category"
        elif reply["reply_status"] != "ok":
            status = "teacher_failed"
            self.count("requests_failed")
            yield failure(row, "realign", reply)
        else:
            revised = RA.parse(reply["reply"])
            if revised is None:
                status = "parse_failed"
            else:
                keep, reason = RA.keep_rewrite(row["response"], revised, self.count_tokens, self.min_ratio,
                                               self.short_words)
                status = "rewritten" if keep else "filtered"
                if keep:
                    row["response"] = revised
                    row["messages"] = [*row["messages"][:-1], {"role": "assistant", "content": revised}]
        row["realign_status"], row["realign_reason"] = status, reason
        self.count("rows")
        self.count("status", reason=status)
        if reason:
            self.count("reason", reason=reason)
        yield row


class ReAlignStage(LiveStage):
    """ReAlign columns on the rows still in play, and ``failures`` (dead-letter rows)."""

    columns = RA.COLUMNS.names
    extra_outputs = (FAILURES,)

    def __init__(self, cfg: Job, rt: dict, run_id: str = "run", teacher_handler=None):
        super().__init__()
        self.cfg, self.rt, self.run_id, self.teacher_handler = cfg, rt, run_id, teacher_handler
        self.enabled = cfg.rewrite.realign.enabled

    def _teacher(self, name: str, s: TeacherSettings):
        handler = self.teacher_handler or TeacherHandler(s, self.cfg.rewrite.teacher.batch_rows)
        return CachedInference(name, handler, lambda q: q["key"], REPLY, self.rt.get("cache"),
                               self.rt.get("cache_files"), self.run_id, flush_rows=1,
                               cache_when=lambda q: q["reply_status"] == "ok")

    def expand_live(self, live):
        r = self.cfg.rewrite.realign
        s = TeacherSettings(**self.rt["teacher"])
        classified = live | "Classify" >> CachedInference("realign_classify", ClassifyHandler(self.rt["realign"]),
                                                          lambda rec: rec["id"],
                                                          [pa.field("realign_category", pa.string())])
        records, stats = classified["records"], [classified["stats"]]
        if r.classifier == "teacher":
            asked = (records | "ClassifyRequests" >> beam.FlatMap(classify_request, s)
                     | "ClassifyTeacher" >> self._teacher("realign_classify_teacher", s))
            chosen = ({"row": records | "ClassifiedById" >> beam.Map(lambda rec: (rec["id"], rec)),
                       "reply": asked["records"] | "ClassReplyById" >> beam.Map(lambda q: (q["row"], q))}
                      | "JoinCategory" >> beam.CoGroupByKey()
                      | "Category" >> beam.ParDo(ChooseCategoryFn()).with_outputs(FAILURES, STATS, main="records"))
            records, stats = chosen.records, stats + [asked["stats"], chosen[STATS]]
            failures = [chosen[FAILURES]]
        else:
            records = records | "ClassifiedBy" >> beam.Map(lambda rec: {**rec, "realign_category_by": "classifier"})
            failures = []
        replies = (records | "Requests" >> beam.FlatMap(reformat_request, s)
                   | "Teacher" >> self._teacher("realign_teacher", s))
        rows = records | "RowsById" >> beam.Map(lambda rec: (rec["id"], rec))
        by_row = replies["records"] | "RepliesById" >> beam.Map(lambda q: (q["row"], q))
        applied = ({"row": rows, "reply": by_row} | "Join" >> beam.CoGroupByKey()
                   | "Apply" >> beam.ParDo(ApplyFn(self.cfg.score.ifd.model, r.min_ratio, r.short_words))
                   .with_outputs(FAILURES, STATS, main="records"))
        stats = (*stats, replies["stats"], applied[STATS]) | "Stats" >> beam.Flatten()
        failed = (*failures, applied[FAILURES]) | "Failures" >> beam.Flatten() if failures else applied[FAILURES]
        return {"records": applied.records, "stats": stats, FAILURES: failed}
