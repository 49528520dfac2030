"""Teacher rewrites, first part: the OpenAI-compatible teacher client against a scripted local
HTTP endpoint (retries only on what can pass, bounded, one request per row), the strict reflection
parsers on the fixtures of methods.md §3.5, and the student's decision table."""
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from curate.rewrite import realign as RA
from curate.rewrite import reflection as R
from curate.rewrite.teacher import Teacher, TeacherSettings, backoff, request_key


class Script:
    """Replies per request, in order: an int is an HTTP status with an error body, a float a delay
    (seconds) before a good reply, a str a good reply with that text."""

    def __init__(self, replies):
        self.replies, self.requests, self.lock = list(replies), [], threading.Lock()


def _handler(script):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                reply = script.replies.pop(0) if script.replies else "default reply"
            if isinstance(reply, int):
                self.send_response(reply)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps({"error": {"message": f"scripted {reply}"}}).encode())
                return
            if isinstance(reply, float):
                import time

                time.sleep(reply)
                reply = "late reply"
            out = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": reply}}],
                   "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
    return H


@pytest.fixture
def endpoint():
    servers = []

    def start(replies):
        script = Script(replies)
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return script, f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for s in servers:
        s.shutdown()


def _teacher(url, **kw):
    waits = []
    return Teacher(TeacherSettings(base_url=url, model="t", backoff_s=0.01, **kw), sleep=waits.append), waits


MSG = [{"role": "user", "content": "hi"}]


def test_a_reply_passes_sampling_through_and_one_request_per_row(endpoint):
    script, url = endpoint(["hello"])
    teacher, _ = _teacher(url, temperature=0.3, seed=5, max_tokens=12)
    reply = teacher.complete(MSG)
    assert (reply.text, reply.status, reply.attempts) == ("hello", "ok", 1)
    assert reply.tokens == {"prompt_tokens": 7, "completion_tokens": 3}
    body = script.requests[0]["body"]
    assert body["temperature"] == 0.3 and body["seed"] == 5 and body["max_tokens"] == 12 and body["n"] == 1


def test_retries_only_what_can_pass_and_stop_at_the_bound(endpoint):
    script, url = endpoint([429, 503, "third time"])
    teacher, waits = _teacher(url, max_retries=3)
    reply = teacher.complete(MSG)
    assert (reply.text, reply.attempts, len(waits)) == ("third time", 3, 2)
    script, url = endpoint([400, "never asked"])
    reply = _teacher(url)[0].complete(MSG)
    assert reply.status == "failed" and "400" in reply.error and reply.attempts == 1 and len(script.requests) == 1
    script, url = endpoint([500, 500, 500, "too late"])
    teacher, waits = _teacher(url, max_retries=2)
    reply = teacher.complete(MSG)
    assert reply.status == "failed" and reply.attempts == 3 and len(script.requests) == 3 and len(waits) == 2
    script, url = endpoint([""])  # an empty reply is a failure, not an empty rewrite
    assert _teacher(url)[0].complete(MSG).error == "empty reply"


def test_a_timeout_is_retried(endpoint):
    script, url = endpoint([2.0, "in time"])
    reply = _teacher(url, timeout_s=0.5, max_retries=1)[0].complete(MSG)
    assert reply.text == "in time" and reply.attempts == 2


def test_a_job_whose_teacher_does_not_answer_stops_before_it_starts(job_dir, capsys):
    from tests.conftest import run_cli

    job = _rewrite_job(job_dir, "nobody", "http://127.0.0.1:9/v1", job_dir / "cache")
    assert run_cli("run", job) == 2
    err = capsys.readouterr().err
    assert "rewrite.teacher: nothing answers at http://127.0.0.1:9/v1" in err and not (job_dir / "nobody").exists()


def test_a_dead_server_is_a_failed_reply_not_an_exception():
    teacher, waits = _teacher("http://127.0.0.1:9/v1", max_retries=2)
    replies = teacher.complete_many([MSG, MSG])
    assert [r.status for r in replies] == ["failed", "failed"] and "Connection" in replies[0].error


def test_many_requests_keep_their_order_and_the_key_reads_the_environment(endpoint, monkeypatch):
    script, url = endpoint([f"r{i}" for i in range(6)])
    monkeypatch.setenv("TEACHER_KEY", "sk-secret")
    teacher, _ = _teacher(url, api_key_env="TEACHER_KEY", concurrency=3)
    replies = teacher.complete_many([[{"role": "user", "content": f"q{i}"}] for i in range(6)])
    asked = {r["body"]["messages"][0]["content"]: i for i, r in enumerate(script.requests)}
    assert sorted(r.text for r in replies) == [f"r{i}" for i in range(6)] and len(asked) == 6
    assert all(r["auth"] == "Bearer sk-secret" for r in script.requests)
    monkeypatch.delenv("TEACHER_KEY")
    with pytest.raises(ValueError, match="TEACHER_KEY"):
        Teacher(TeacherSettings(base_url=url, api_key_env="TEACHER_KEY"))


def test_backoff_is_capped_jitter_and_the_cache_key_covers_what_a_reply_depends_on():
    import random

    rng = random.Random(0)
    waits = [backoff(a, 1.0, 5.0, rng) for a in range(1, 9)]
    assert all(0 <= w <= min(5.0, 2 ** (a - 1)) for a, w in zip(range(1, 9), waits))
    key = request_key("m", "v1", MSG, {"temperature": 0})
    assert key == request_key("m", "v1", [dict(MSG[0])], {"temperature": 0})
    assert len({key, request_key("m2", "v1", MSG, {"temperature": 0}), request_key("m", "v2", MSG, {"temperature": 0}),
                request_key("m", "v1", MSG, {"temperature": 1})}) == 4


# --- parsers (methods.md §3.5) ------------------------------------------------------------------

def test_instruction_reflection_parses_strictly_and_drops_the_pair_together():
    ok = "Critique...\n[New Instruction] Explain TCP handshakes. [End]\n[New Answer] SYN, SYN-ACK, ACK. [End]"
    assert R.parse_instruction_reflection(ok) == ("Explain TCP handshakes.", "SYN, SYN-ACK, ACK.")
    no_end = "[New Instruction] Explain X.\n[New Answer] X is Y."  # tags without [End]
    assert R.parse_instruction_reflection(no_end) == ("Explain X.", "X is Y.")
    endpoint = "[New Instruction] Describe an API. [End] [New Answer] An Endpoint is a URL. End of story. [End]"
    assert R.parse_instruction_reflection(endpoint)[1] == "An Endpoint is a URL. End of story."
    assert R.parse_instruction_reflection("[New Instruction] Do X. [End]") is None  # no answer: drop both
    assert R.parse_instruction_reflection("[New Instruction] your instruction [End][New Answer] A [End]") is None
    assert R.parse_instruction_reflection("[New Instruction] Do X [End][New Answer] N/A [End]") is None
    assert R.parse_instruction_reflection("New Instruction: Do X\nNew Answer: Y") is None  # untagged: no guess


def test_response_reflection_takes_one_block_and_never_stops_inside_a_word():
    assert R.parse_response_reflection("[Better Answer] The Endpoint returns JSON. [End]") == \
        "The Endpoint returns JSON."
    assert R.parse_response_reflection("Critique.\n[Better Answer]\nLine one.\nLine two.") == "Line one.\nLine two."
    two = "[Better Answer] first [End] [Better Answer] second [End]"
    assert R.parse_response_reflection(two) is None
    assert R.parse_response_reflection("[Better Answer] your answer [End]") is None
    assert R.parse_response_reflection("no tags at all") is None


def test_the_decision_table_takes_every_branch():
    nan = math.nan
    ori = {"ori": (0.6, 0.9)}
    # harder instruction, and the QA pair better aligned and under 1: QA
    assert R.decide({**ori, "Q": (0.7, 0.8), "QA": (0.65, 0.7), "A": (0.5, 0.5)}) == "QA"
    # harder instruction but QA not better aligned than Q: nothing (Q alone is never emitted)
    assert R.decide({**ori, "Q": (0.7, 0.8), "QA": (0.65, 0.85), "A": (0.5, 0.5)}) is None
    # QA better aligned but IFD >= 1: nothing
    assert R.decide({**ori, "Q": (0.7, 0.8), "QA": (1.02, 0.7)}) is None
    # instruction not harder: A when better aligned and under 1
    assert R.decide({**ori, "Q": (0.5, 0.8), "A": (0.55, 0.8)}) == "A"
    assert R.decide({**ori, "Q": (0.5, 0.8), "A": (0.55, 0.95)}) is None
    assert R.decide({**ori, "A": (0.55, 1.2)} | {"ori": (0.6, 1.3)}) is None  # rIFD(A) >= 1
    # failed scores are NaN and never pass a test (the reference's 0 did)
    assert R.decide({**ori, "Q": (nan, nan), "A": (0.55, 0.8)}) == "A"
    assert R.decide({**ori, "A": (nan, 0.1)}) is None
    assert R.decide({"ori": (nan, 0.9), "A": (0.1, 0.1)}) is None
    assert R.decide({**ori}) is None


# --- the stage in real jobs: a scripted teacher endpoint, the real student, real Beam -----------

def teacher_reply(body: dict) -> str | int:
    """What a teacher would say, from the request itself (so replies do not depend on order)."""
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    if system == RA.CLASSIFY_SYSTEM:  # ReAlign with classifier: teacher
        question = user.split("Request:\n", 1)[1].rsplit("\n\nCategory name:", 1)[0]
        if "Napkins" in question:
            return "Hard to say: roleplay or story_generation."  # two names: not guessed, the classifier's
        if "Unreachable" in question:
            return 503
        return "open_qa" if "dolls" in question else "Category: math_puzzles."
    if "[Question start]" in user:  # ReAlign: reformat the response
        question = user.split("[Question start]\n", 1)[1].split("\n[Question end]", 1)[0]
        response = user.split("[Response start]\n", 1)[1].split("\n[Response end]", 1)[0]
        if "Napkins" in question:
            return "Reasoning: the format does not fit, so I copy it."  # no revised response: a parse failure
        if "dolls" in question:
            return "Reasoning: shorter is better.\nRevised response: A town."  # loses the answer
        return f"Reasoning: steps help here.\nRevised response: Step 1. {response}\nSo the answer stands."
    question = user.split("[Instruction]\n", 1)[1].split("\n[End]", 1)[0]
    if "Napkins" in question:  # a reply the parser must refuse: placeholders only
        return "[Better Answer] your answer [End]" if system == R.RESPONSE_SYSTEM else \
            "[New Instruction] your instruction [End] [New Answer] your answer [End]"
    if system == R.INSTRUCTION_SYSTEM:
        return (f"The instruction is simple.\n[New Instruction] {question} Then explain each step and check the "
                "result another way. [End]\n[New Answer] Work it step by step. First restate the problem, then "
                "compute, then check. The Endpoint of the check is the same number. [End]")
    return f"Critique.\n[Better Answer] Step by step: {question.lower()} Answer: computed carefully. [End]"


@pytest.fixture
def teacher_server():
    """A scripted OpenAI-compatible endpoint: ``state["fail_after"]`` requests answered, then 503s."""
    state = {"requests": 0, "fail_after": None}
    lock = threading.Lock()

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state["requests"] += 1
                down = state["fail_after"] is not None and state["requests"] > state["fail_after"]
            reply = 503 if down else teacher_reply(body)
            if isinstance(reply, int):
                self.send_response(reply)
                self.end_headers()
                return
            data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()


def _rewrite_job(job_dir, name, url, cache):
    from tests.conftest import EXAMPLES, write_job

    rows = [json.loads(x) for x in open(f"{EXAMPLES}/gsm8k_sample.jsonl", encoding="utf-8")][:4]
    rows.append({"instruction": "Napkins: fold one into a swan.", "input": "", "output": "Fold it."})
    rows.append(dict(rows[0]))  # an exact duplicate: dropped before the rewrites, never sent to the teacher
    pool = job_dir / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = job_dir / "chat.jsonl"  # multi-turn: left as it is
    turns = [("user", "Hi"), ("assistant", "Hello"), ("user", "Add 2 and 2."), ("assistant", "4")]
    chat.write_text(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
    cfg = {"output": name, "inputs": [{"source": "pool", "path": str(pool)}, {"source": "chat", "path": str(chat)}],
           "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
           "embed": {"enabled": False}, "cluster": {"enabled": False},
           "score": {"ifd": {"enabled": False, "max_length": 160, "cache_dir": str(cache / "scores")}},
           "rewrite": {"reflection": {"enabled": True}, "cache_dir": str(cache / "teacher"),
                       "teacher": {"base_url": url, "model": "scripted", "max_retries": 1, "backoff_s": 0.01}}}
    return write_job(job_dir, cfg, f"{name}.yaml")


def test_reflection_rewrites_what_the_student_accepts_and_a_rerun_sends_nothing(job_dir, teacher_server):
    import pandas as pd

    from tests.conftest import load_manifest, run_cli

    cache = job_dir / "cache"
    assert run_cli("run", _rewrite_job(job_dir, "run", teacher_server["url"], cache)) == 0
    sent = teacher_server["requests"]
    assert sent == 5 * 2 + 4  # Q and A for each single-turn row, QA for each parsed new instruction
    ann = pd.read_parquet("run/annotated").set_index("source")
    man = load_manifest("run")
    assert man["accounting"]["holds"] and len(ann) == 7 and man["counts"]["dropped"] == {"exact_duplicate": 1}
    assert man["stages"]["exact_dedup"]["dropped"] == 1 and man["stages"]["exact_dedup_rewritten"]["rows"] == 6
    ann = ann[ann.drop_reason.isna()]
    import jsonschema

    from tests.conftest import REPO

    with open(f"{REPO}/schemas/manifest.schema.json", encoding="utf-8") as fh:
        jsonschema.validate(man, json.load(fh))
    rw = man["rewrite"]
    assert rw["requests_sent"] == sent and rw["requests_cached"] == 0 and rw["requests_failed"] == 0
    assert rw["teacher"]["model"] == "scripted" and sum(rw["reflection"]["status"].values()) == 6
    status = ann.rewrite_status.value_counts().to_dict()
    assert status.get("not_applicable") == 1 and ann.loc["chat", "rewrite_kind"] == "ori"
    napkins = ann[ann.original_prompt.str.startswith("Napkins")].iloc[0]
    assert napkins.rewrite_status == "parse_failed" and napkins.prompt == napkins.original_prompt
    decided = ann[ann.rewrite_status.isin(["accepted", "kept_original"])]
    assert len(decided) == 4 and sum(status.values()) == 6
    for _, row in decided.iterrows():
        scores = json.loads(row.rewrite_scores)
        assert set(scores) == {"ori", "Q", "A", "QA"}
        assert row.rewrite_kind == (R.decide({k: tuple(math.nan if x is None else x for x in v)
                                              for k, v in scores.items()}) or "ori")
        if row.rewrite_kind == "A":
            assert row.prompt == row.original_prompt and row.response.startswith("Step by step")
        if row.rewrite_kind == "QA":
            assert row.prompt.endswith("check the result another way.") and row.response.startswith("Step by step")
    assert not (job_dir / "run" / "rewrite_failures").exists() or \
        pd.read_parquet("run/rewrite_failures").empty
    # a rerun asks the teacher nothing: every reply comes from the cache
    assert run_cli("run", _rewrite_job(job_dir, "again", teacher_server["url"], cache)) == 0
    assert teacher_server["requests"] == sent
    assert load_manifest("again")["rewrite"]["requests_cached"] == sent
    again = pd.read_parquet("again/annotated").sort_values("id")
    assert again.rewrite_status.tolist() == pd.read_parquet("run/annotated").sort_values("id").rewrite_status.tolist()


def test_a_teacher_that_goes_down_half_way_loses_no_row_and_the_rerun_completes(job_dir, teacher_server):
    import pandas as pd

    from tests.conftest import load_manifest, run_cli

    cache = job_dir / "cache"
    teacher_server["fail_after"] = 5  # the server "stops" after 5 requests
    assert run_cli("run", _rewrite_job(job_dir, "down", teacher_server["url"], cache)) == 0
    ann = pd.read_parquet("down/annotated")
    failures = pd.read_parquet("down/rewrite_failures")
    failed_rows = set(ann[ann.rewrite_status == "teacher_failed"].id)
    assert failed_rows and set(failures.id) == failed_rows and (failures.attempts == 2).all()
    assert failures.error.str.contains("503").all() and load_manifest("down")["accounting"]["holds"]
    assert (ann[ann.id.isin(failed_rows)].prompt == ann[ann.id.isin(failed_rows)].original_prompt).all()
    # the server is back: the rerun sends only what failed, and every row is decided once
    teacher_server["fail_after"] = None
    before = teacher_server["requests"]
    assert run_cli("run", _rewrite_job(job_dir, "back", teacher_server["url"], cache)) == 0
    back = pd.read_parquet("back/annotated")
    assert len(back) == len(ann) == back.id.nunique() and "teacher_failed" not in set(back.rewrite_status)
    assert teacher_server["requests"] - before <= 14 - 5
    assert load_manifest("back")["accounting"]["holds"]


# --- ReAlign (methods.md §4.5) ------------------------------------------------------------------

def test_realign_categories_formats_and_pass_through():
    assert len(RA.CATEGORIES) == 46 and RA.UNCHANGED <= set(RA.CATEGORIES)
    assert set(RA.GROUP) == set(RA.CATEGORIES) - RA.UNCHANGED  # every other category has a format
    assert set(RA.GROUP.values()) <= set(RA.FORMATS)
    for name in RA.UNCHANGED | {"not_a_category"}:  # no KeyError: the row passes through
        assert RA.format_for(name) is None and RA.messages("q", "a", name) is None
    msgs = RA.messages("What is 2+2?", "4", "math_puzzles")
    assert "numbered steps" in msgs[1]["content"] and "[Response start]\n4\n[Response end]" in msgs[1]["content"]
    assert RA.parse("Reasoning: fine.\nRevised response: Four.") == "Four."
    assert RA.parse("Reasoning: the format suits.") is None and RA.parse("Revised response:   ") is None


def test_a_teacher_classification_reply_is_taken_only_when_it_names_one_category():
    msgs = RA.classify_messages("Convert 179 centimeters to feet.")
    assert msgs[0]["content"] == RA.CLASSIFY_SYSTEM and "Convert 179 centimeters" in msgs[1]["content"]
    assert all(f"- {name}: " in msgs[1]["content"] for name in RA.CATEGORIES) and set(RA.DESCRIPTIONS) == \
        set(RA.CATEGORIES)
    assert RA.parse_category("math_puzzles") == "math_puzzles"
    assert RA.parse_category('  "Open QA".\n') == "open_qa"  # quotes, spaces, a period: still the name
    assert RA.parse_category("The category is `code-language-classification`.") == "code_language_classification"
    assert RA.parse_category("Roleplay. Roleplay fits best.") == "roleplay"  # one name, said twice
    assert RA.parse_category("roleplay or story_generation") is None  # two names: no guess
    assert RA.parse_category("code_language_classification or language_classification") is None
    assert RA.parse_category("defaults to open questions") is None  # inside a word is not a name
    for reply in ("", None, "I cannot tell."):
        assert RA.parse_category(reply) is None


def test_realign_post_filter_truth_table():
    from curate.rewrite.realign import keep_rewrite

    words = lambda t: len(t.split())  # noqa: E731 - a stand-in tokenizer for the table
    long = "one two three four five six seven eight nine ten"
    assert keep_rewrite(long, "one two three four five", words) == (False, "too_short")  # exactly 0.5x
    assert keep_rewrite(long, "one two three four five six", words) == (True, "ok")  # 0.5x + 1
    code = "def f(x):\n    return x + 1\nand more words here"
    assert keep_rewrite(code, "f adds one to x, explained in many many words here", words) == (False, "code_mismatch")
    assert keep_rewrite(code, "```python\ndef f(x):\n    return x + 1\n``` explained", words)[0]
    assert keep_rewrite(long, "```\ncode\n``` " + long, words) == (False, "code_mismatch")
    assert keep_rewrite("A", "The answer is A.", words) == (True, "kept_answer")
    assert keep_rewrite("A", "An Apple a day.", words) == (False, "lost_answer")  # not inside a word
    assert keep_rewrite("(", "the bracket ( opens", words)[0] and not keep_rewrite(".", "no dot here", words)[0]
    assert keep_rewrite("True", "x", words) == (True, "true_false")
    assert keep_rewrite("the 1830s", "It changed its name in the 1830s.", words) == (True, "ok")
    assert keep_rewrite("prior to June 1592", "It was first staged in 1594.", words) == (False, "lost_answer")
    assert keep_rewrite("a town circa 1879\na town", "Set in a town.", words) == (True, "ok")  # any listed answer


def test_realign_post_filter_on_the_nq_fixture_keeps_the_answers_that_survived():
    from curate.rewrite.realign import keep_rewrite
    from tests.conftest import shared

    gold = {r["id"]: r["items"][1]["value"] for r in json.load(open(shared("realign_nq_factuality_100.json")))}
    realigned = {r["id"]: r["items"][1]["value"]
                 for r in json.load(open(shared("realign_nq_factuality_100_realign.json")))}
    verdict = {i: keep_rewrite(gold[i], realigned[i], lambda t: len(t.split())) for i in gold}
    contains = {i for i in gold if any(" ".join(a.lower().split()) in " ".join(realigned[i].lower().split())
                                       for a in gold[i].splitlines() if a.strip())}
    short = {i for i in gold if len(gold[i].split()) <= 8}
    lost = {i for i, (_, why) in verdict.items() if why == "lost_answer"}
    assert lost == short - contains and len(lost) == 3  # dropped exactly where the gold answer is gone
    assert sum(keep for keep, _ in verdict.values()) == 94  # 3 more fall to the length rule


def test_realign_reformats_keeps_what_the_filter_passes_and_reports_the_classifier(job_dir, teacher_server):
    """classifier: teacher, so the teacher names the task; where its reply names no single category
    or its request fails, the embedding classifier's label is used (the real-server test runs the
    embedding classifier alone)."""
    import pandas as pd

    from tests.conftest import EXAMPLES, load_manifest, run_cli, shared, write_job

    train = json.load(open(shared("realign_task_classifier_train.json"), encoding="utf-8"))
    small = job_dir / "clf_train.json"  # three rows a category keeps the test quick
    small.write_text(json.dumps([r for c in RA.CATEGORIES for r in [x for x in train if x["category"] == c][:3]]))
    rows = [json.loads(x) for x in open(f"{EXAMPLES}/gsm8k_sample.jsonl", encoding="utf-8")][:3]
    rows += [{"instruction": "Napkins: fold one into a swan.", "input": "", "output": "Fold it in half, then again."},
             {"instruction": "what is the setting of a dolls house?", "input": "",
              "output": "a Norwegian town circa 1879"},
             {"instruction": "Unreachable: how many legs has a spider?", "input": "", "output": "Eight."}]
    pool = job_dir / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = job_dir / "chat.jsonl"  # multi-turn: never asked, never rewritten
    turns = [("user", "Hi"), ("assistant", "Hello"), ("user", "Add 2 and 2."), ("assistant", "4")]
    chat.write_text(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n")
    cfg = {"output": "re", "inputs": [{"source": "pool", "path": str(pool)}, {"source": "chat", "path": str(chat)}],
           "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
           "embed": {"enabled": False}, "cluster": {"enabled": False}, "score": {"ifd": {"enabled": False}},
           "rewrite": {"realign": {"enabled": True, "classifier": "teacher", "classifier_train": str(small),
                                   "classifier_test": shared("realign_task_classifier_test.json")},
                       "cache_dir": str(job_dir / "teacher"),
                       "teacher": {"base_url": teacher_server["url"], "model": "scripted", "max_retries": 0}}}
    assert run_cli("run", write_job(job_dir, cfg, "re.yaml")) == 0
    man = load_manifest("re")
    test = man["rewrite"]["realign"]["test"]
    assert test["rows"] == 143 and 0 < test["accuracy"] <= 1 and 0 < test["macro_f1"] <= 1
    ann = pd.read_parquet("re/annotated")
    assert man["accounting"]["holds"] and len(ann) == 7 and ann.realign_category.isin(RA.CATEGORIES).all()
    by = dict(zip(ann.prompt.str[:11], ann.realign_category_by))
    assert by["Napkins: fo"] == "classifier_after_unparsed_reply" and by["Unreachable"] == \
        "classifier_after_failed_request"
    assert ann[ann.source == "chat"].realign_category_by.tolist() == ["classifier"]
    assert man["rewrite"]["realign"]["category_by"] == {"teacher": 4, "classifier_after_unparsed_reply": 1,
                                                        "classifier_after_failed_request": 1, "classifier": 1}
    assert man["rewrite"]["realign"]["classified_by"] == "teacher" and man["rewrite"]["requests_failed"] == 1
    failed = pd.read_parquet("re/rewrite_failures")
    assert failed.request.tolist() == ["realign_classify"] and "503" in failed.error[0]
    single = ann[ann.source == "pool"]
    for _, row in single.iterrows():
        formatted = RA.format_for(row.realign_category) is not None
        assert row.original_response == next(r["output"] for r in rows if r["instruction"] in row.original_prompt)
        if row.realign_category_by == "teacher":
            assert row.realign_category == ("open_qa" if "dolls" in row.prompt else "math_puzzles")
        if not formatted:
            assert row.realign_status == "unchanged_category" and row.response == row.original_response
        elif "Napkins" in row.prompt:
            assert row.realign_status == "parse_failed" and row.response == row.original_response
        elif "dolls" in row.prompt:
            assert (row.realign_status, row.realign_reason) == ("filtered", "lost_answer")
            assert row.response == row.original_response
        else:
            assert (row.realign_status, row.realign_reason) == ("rewritten", "ok")
            assert row.response.startswith("Step 1. ") and row.messages[-1]["content"] == row.response
    assert ann[ann.source == "chat"].realign_status.tolist() == ["not_applicable"]
    # one classification request a single-turn row (the failed one included), one reformat request a
    # formatted category
    formatted = sum(RA.format_for(c) is not None for c in single.realign_category)
    assert man["rewrite"]["requests_sent"] == teacher_server["requests"] == 6 + formatted


def test_realign_classifier_files_that_cannot_be_used_are_one_line(tmp_path):
    from curate.errors import CurateError
    from curate.settings import ReAlign
    from pipelines.realign import prepare

    with pytest.raises(CurateError, match="classifier_train: no such file"):
        prepare(ReAlign(enabled=True, classifier_train=str(tmp_path / "missing.json")), None)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "Add 2 and 3."}]))
    with pytest.raises(CurateError, match=r"classifier_train: .*row 1 is not an \{instruction, category\}"):
        prepare(ReAlign(enabled=True, classifier_train=str(bad)), None)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "x", "category": "open_qa"}')
    with pytest.raises(CurateError, match="classifier_train"):
        prepare(ReAlign(enabled=True, classifier_train=str(broken)), None)
