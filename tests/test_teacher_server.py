"""Teacher rewrites against a real OpenAI-compatible server: llama.cpp's (``llama-cpp-python[server]``,
installed by ``make test``) serving the packaged SmolLM2-135M-Instruct GGUF, with reflection and
ReAlign on real rows. A 135M teacher rarely writes the tagged blocks the parsers ask for, so most
rows end ``parse_failed`` (the scripted-endpoint tests in test_rewrite.py take the other
branches); this test is about the server path: requests, failures, the dead letter and the cache."""
import json
import os
import threading
import time

import pandas as pd
import pytest

from curate import cache_store
from curate.rewrite.local_server import LocalServer
from tests.conftest import EXAMPLES, load_manifest, run_cli, shared, write_job

pytest.importorskip("llama_cpp", reason="llama-cpp-python[server] is installed by `make test`")
ROWS = 4  # real rows per run: up to 3 requests a row; the server stops after 4 replies


def _job(job_dir, name, url, cache, n=ROWS):
    rows = [json.loads(x) for x in open(f"{EXAMPLES}/gsm8k_sample.jsonl", encoding="utf-8")][:n // 2]
    rows += json.load(open(f"{EXAMPLES}/alpaca_cherry_sample.json", encoding="utf-8"))[:n - n // 2]
    pool = job_dir / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = json.load(open(shared("realign_task_classifier_train.json"), encoding="utf-8"))
    small = job_dir / "clf.json"
    small.write_text(json.dumps([r for i, r in enumerate(train) if i % 5 == 0]))
    cfg = {"output": name, "inputs": [{"source": "pool", "path": str(pool)}],
           "dedup": {"near": {"enabled": False}, "semantic": {"enabled": False}},
           "embed": {"enabled": False}, "cluster": {"enabled": False},
           "score": {"ifd": {"enabled": False, "max_length": 256, "cache_dir": str(cache / "scores")}},
           "rewrite": {"reflection": {"enabled": True},
                       "realign": {"enabled": True, "classifier_train": str(small)},
                       "cache_dir": str(cache / "teacher"),
                       "teacher": {"base_url": url, "model": "smollm2", "max_tokens": 32, "concurrency": 2,
                                   "max_retries": 1, "backoff_s": 0.05, "timeout_s": 120}}}
    return write_job(job_dir, cfg, f"{name}.yaml")


def _statuses(out: str) -> dict:
    ann = pd.read_parquet(f"{out}/annotated")
    return {"reflection": ann.rewrite_status.value_counts().to_dict(),
            "realign": ann.realign_status.value_counts().to_dict(), "rows": len(ann), "ids": ann.id.nunique()}


def test_a_real_server_stopped_half_way_then_restarted_then_the_cache(job_dir, tmp_path):
    """One server, three runs: it stops after a few replies (no row lost, the failures listed),
    it comes back (the rerun completes every row, sending only what had failed), and a third run
    sends nothing (every reply from the cache)."""
    server = LocalServer(str(tmp_path))
    ready = server.start()
    cache = job_dir / "cache"
    replies = str(cache / "teacher")

    def stop_after(n):  # the server goes away once n replies are in the cache (shards land as replies come)
        while server.proc.poll() is None:
            done = sum(len(pd.read_parquet(f)) for f in cache_store.files(_only_folder(replies)))
            if done >= n:
                server.stop()
            time.sleep(0.2)

    watcher = threading.Thread(target=stop_after, args=(ROWS,), daemon=True)
    watcher.start()
    try:
        assert run_cli("run", _job(job_dir, "down", server.url, cache)) == 0
        watcher.join(timeout=5)
        down = _statuses("down")
        failures = pd.read_parquet("down/rewrite_failures")
        man = load_manifest("down")
        assert down["rows"] == down["ids"] == ROWS and man["accounting"]["holds"]
        assert len(failures) == man["rewrite"]["requests_failed"] > 0
        assert failures.error.str.contains("Connection").all() and (failures.attempts == 2).all()
        assert down["reflection"].get("teacher_failed", 0) + down["realign"].get("teacher_failed", 0) > 0
        sent_before = man["rewrite"]["requests_sent"]
        server.start()
        assert run_cli("run", _job(job_dir, "back", server.url, cache)) == 0
        back, man = _statuses("back"), load_manifest("back")
        print(f"llama.cpp server ready in {ready:.1f} s; {ROWS} real rows:", json.dumps(back))
        assert back["rows"] == back["ids"] == ROWS and man["accounting"]["holds"]
        assert "teacher_failed" not in back["reflection"] and "teacher_failed" not in back["realign"]
        assert man["rewrite"]["requests_cached"] >= 3 and man["rewrite"]["requests_failed"] == 0
        total = man["rewrite"]["requests_cached"] + man["rewrite"]["requests_sent"]
        # only what had not succeeded is sent again: the failures (and requests the first run never reached)
        assert man["rewrite"]["requests_sent"] == total - (sent_before - len(failures))
        assert run_cli("run", _job(job_dir, "again", server.url, cache)) == 0
        again = load_manifest("again")["rewrite"]
        assert again["requests_sent"] == 0 and again["requests_cached"] == total and _statuses("again") == back
    finally:
        server.stop()


def _only_folder(root: str) -> str | None:
    if not os.path.isdir(root):
        return None
    subs = [os.path.join(root, d) for d in os.listdir(root)]
    return subs[0] if subs else None
