"""Teacher rewrites: the ReAlign task classifier and the teacher's throughput.

- ``task_classifier``: our classifier (MiniLM embeddings + logistic regression) trained on
  ReAlign's 1,395 training rows, accuracy and macro-F1 on its 143 test rows, against a TF-IDF +
  linear SVM baseline on the same split (what methods.md §4.5 suggests as the CPU reference).
- ``teacher_concurrency_N``: requests/s and generated tokens/s of ``curate.rewrite.teacher``
  against a real llama.cpp server (``llama-cpp-python[server]``, the packaged SmolLM2 GGUF, 2
  threads) at 1, 4 and 8 requests in flight, on the same reflection prompts of real rows;
  baseline: one request at a time. Skipped with a line when llama-cpp-python is not installed.
- ``task_classifier_teacher``: ``classifier: teacher`` on the same test rows against the real
  llama.cpp server (the packaged SmolLM2-135M as the classifying teacher; the reference used a
  fine-tuned 13B model): accuracy where the reply names one category, with the embedding
  classifier's label where it does not, against the embedding classifier alone. Point
  ``CURATE_BENCH_TEACHER_URL`` (and ``CURATE_BENCH_TEACHER_MODEL``, key in ``OPENAI_API_KEY``) at
  a capable endpoint to measure that one instead.
- ``teacher_cache_hit``: the same requests through the stage's request cache (a Parquet shard
  read and a keyed lookup) against sending them.
``--quick``: 8 requests per case, else 24.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from benchmarks.common import emit, shared


def classifier():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.svm import LinearSVC

    from curate.embed import encode, load_embedder
    from curate.rewrite import realign as RA

    train_x, train_y = RA.read_labelled(shared("realign_task_classifier_train.json"))
    test_x, test_y = RA.read_labelled(shared("realign_task_classifier_test.json"))
    t = time.perf_counter()
    embedder = load_embedder(None)
    clf = RA.TaskClassifier().fit(encode(embedder, train_x), train_y)
    ours = RA.evaluate(clf, encode(embedder, test_x), test_y)
    secs = time.perf_counter() - t
    tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    svm = LinearSVC().fit(tfidf.fit_transform(train_x), train_y)
    predicted = svm.predict(tfidf.transform(test_x))
    base = {"accuracy": float(accuracy_score(test_y, predicted)),
            "macro_f1": float(f1_score(test_y, predicted, average="macro", zero_division=0))}
    emit("rewrite", "task_classifier", "accuracy", ours["accuracy"], "tfidf_linear_svm", base["accuracy"],
         n=ours["rows"], macro_f1=ours["macro_f1"], baseline_macro_f1=round(base["macro_f1"], 4),
         train_rows=len(train_x), wall_s=round(secs, 1))
    return test_x, test_y, clf.predict(encode(embedder, test_x))


def teacher_classifier(quick: bool, test_x, test_y, fallback):
    """The teacher names the category (ReAlign's own method); the embedding classifier's label
    where its reply names none."""
    from sklearn.metrics import accuracy_score, f1_score

    from curate.rewrite import realign as RA
    from curate.rewrite.teacher import Teacher
    from curate.settings import TeacherEndpoint

    n = 24 if quick else len(test_x)
    test_x, test_y, fallback = test_x[:n], test_y[:n], fallback[:n]
    url, model = os.environ.get("CURATE_BENCH_TEACHER_URL"), os.environ.get("CURATE_BENCH_TEACHER_MODEL", "smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        if not url:
            from curate.rewrite.local_server import LocalServer

            server = LocalServer(tmp)
            server.start()
            url = server.url
        try:
            s = TeacherEndpoint(base_url=url, model=model, max_tokens=16, temperature=0.0, concurrency=1)
            t = time.perf_counter()
            replies = Teacher(s).complete_many([RA.classify_messages(x) for x in test_x])
            secs = time.perf_counter() - t
        finally:
            if server:
                server.stop()
    named = [RA.parse_category(r.text if r.status == "ok" else None) for r in replies]
    combined = [a or b for a, b in zip(named, fallback)]
    emb = float(accuracy_score(test_y, fallback))
    emit("rewrite", "task_classifier_teacher", "accuracy", float(accuracy_score(test_y, combined)),
         "embedding_classifier", emb, n=n, teacher=model if server is None else "smollm2-135m (llama.cpp)",
         macro_f1=round(float(f1_score(test_y, combined, average="macro", zero_division=0)), 4),
         named_one_category=sum(x is not None for x in named),
         teacher_alone_accuracy=round(sum(a == y for a, y in zip(named, test_y)) / n, 4),
         failed=sum(r.status != "ok" for r in replies), requests_per_s=round(n / secs, 2))


def _prompts(n: int) -> list[list[dict]]:
    from curate.rewrite.reflection import response_messages

    rows = json.load(open(shared("alpaca_cherry_5pct.json"), encoding="utf-8"))[:n]
    return [response_messages(r["instruction"], r["output"]) for r in rows]


def teacher(quick: bool):
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("rewrite: teacher throughput skipped: pip install 'llama-cpp-python[server]' (make test does)")
        return
    from curate import cache_store
    from curate.rewrite.local_server import LocalServer
    from curate.rewrite.teacher import Teacher, request_key
    from curate.settings import TeacherEndpoint

    n = 8 if quick else 24
    prompts = _prompts(n)
    with tempfile.TemporaryDirectory() as tmp:
        server = LocalServer(tmp)
        ready = server.start()
        print(f"rewrite: llama.cpp server ready in {ready:.1f} s")
        try:
            rates = {}
            for conc in (1, 4, 8):
                s = TeacherEndpoint(base_url=server.url, model="smollm2", max_tokens=128, concurrency=conc)
                t = time.perf_counter()
                replies = Teacher(s).complete_many(prompts)
                secs = time.perf_counter() - t
                tokens = sum(r.tokens.get("completion_tokens", 0) for r in replies)
                rates[conc] = n / secs
                emit("rewrite", f"teacher_concurrency_{conc}", "requests_per_s", n / secs, "concurrency_1",
                     rates[1], n=n, tokens_per_s=round(tokens / secs, 1),
                     failed=sum(r.status != "ok" for r in replies), max_tokens=128)
            # the cache hit path: the replies as a shard, looked up by request key
            keys = [request_key(s.model, "bench", p, s.sampling()) for p in prompts]
            import pyarrow as pa

            schema = pa.schema([pa.field("key", pa.string()), pa.field("reply", pa.string())])
            t = time.perf_counter()
            cache_store.write_shard(tmp + "/cache", [{"key": k, "reply": r.text} for k, r in zip(keys, replies)],
                                    schema, "bench")
            import pyarrow.parquet as pq

            table = pq.read_table(cache_store.files(tmp + "/cache")[0])
            lookup = dict(zip(table.column("key").to_pylist(), table.column("reply").to_pylist()))
            hits = [lookup[k] for k in keys]
            secs = time.perf_counter() - t
            emit("rewrite", "teacher_cache_hit", "requests_per_s", n / secs, "teacher_concurrency_1", rates[1],
                 n=len(hits))
        finally:
            server.stop()


def run(quick: bool):
    test_x, test_y, fallback = classifier()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if not os.environ.get("CURATE_BENCH_TEACHER_URL"):
            print("rewrite: teacher classifier skipped: pip install 'llama-cpp-python[server]' (make test does)")
            test_x = None
    if test_x is not None:
        teacher_classifier(quick, test_x, test_y, fallback)
    teacher(quick)
