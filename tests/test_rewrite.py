"""Teacher rewrites, first part: the OpenAI-compatible teacher client against a scripted local
HTTP endpoint (retries only on what can pass, bounded, one request per row), the strict reflection
parsers on the fixtures of methods.md §3.5, and the student's decision table."""
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

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
