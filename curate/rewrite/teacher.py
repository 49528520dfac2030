"""A teacher model behind any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp's
server, a hosted API), called with the official ``openai`` client.

One request per row (servers such as llama.cpp's and transformers' ignore ``n``). Each request is
retried, alone, on what can pass (429, 5xx, timeouts, a dropped connection) with capped
exponential backoff and full jitter, at most ``max_retries`` times; anything else (400, 401, 404,
an empty reply) fails at once. A failure is a result with a status and the error, never an
exception that takes a batch down: the caller sends it to the dead-letter output and keeps the
row's original text. Requests of a batch run on ``concurrency`` threads.

The API key is read from the environment variable the job names and is never logged or returned.
``request_key`` is the cache key: endpoint model, prompt template version, a hash of the full
prompt and the sampling parameters.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from curate.settings import TeacherEndpoint as TeacherSettings

log = logging.getLogger("curate")


@dataclass
class Reply:
    text: str | None
    status: str  # ok | failed
    error: str | None = None
    attempts: int = 0
    tokens: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens as the server counted


def request_key(model: str, template_version: str, messages: list[dict], sampling: dict) -> str:
    text = json.dumps({"model": model, "template": template_version, "messages": messages, "sampling": sampling},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def retryable(exc: BaseException) -> bool:
    """429, 5xx, timeouts and lost connections can pass on a retry; other errors will not."""
    import openai

    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError)):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def backoff(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): full jitter on a capped doubling."""
    return rng.uniform(0, min(cap, base * 2 ** (attempt - 1)))


class Teacher:
    def __init__(self, s: TeacherSettings, client=None, sleep=time.sleep):
        self.s, self.sleep = s, sleep
        self.rng = random.Random()
        if client is None:
            import openai

            key = os.environ.get(s.api_key_env, "") if s.api_key_env else ""
            if s.api_key_env and not key:
                raise ValueError(f"teacher: the environment variable {s.api_key_env} holding the API key is not set")
            client = openai.OpenAI(base_url=s.base_url, api_key=key or "none", timeout=s.timeout_s, max_retries=0)
            # closed with the teacher, or at exit while httpx is still whole (a client left to the
            # interpreter's teardown prints a traceback from its __del__)
            weakref.finalize(self, client.close)
        self.client = client

    def complete(self, messages: list[dict]) -> Reply:
        """One chat completion, retried as the module docstring says."""
        s = self.s
        for attempt in range(1, s.max_retries + 2):
            try:
                out = self.client.chat.completions.create(model=s.model, messages=messages, n=1, **{
                    k: v for k, v in s.sampling().items() if v is not None})
                text = out.choices[0].message.content if out.choices else None
                if not text:
                    return Reply(None, "failed", "empty reply", attempt)
                usage = getattr(out, "usage", None)
                tokens = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens} \
                    if usage else {}
                return Reply(text, "ok", None, attempt, tokens)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
                if not retryable(exc) or attempt > s.max_retries:
                    return Reply(None, "failed", error, attempt)
                wait = backoff(attempt, s.backoff_s, s.backoff_cap_s, self.rng)
                log.info("teacher: %s; retry %d of %d in %.1f s", error, attempt, s.max_retries, wait)
                self.sleep(wait)
        raise AssertionError("unreachable")

    def complete_many(self, prompts: list[list[dict]]) -> list[Reply]:
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(self.s.concurrency, len(prompts)))) as pool:
            return list(pool.map(self.complete, prompts))


def settings_record(s: TeacherSettings) -> dict:
    """The settings as the manifest records them: everything but the key (only its variable's name)."""
    return asdict(s)


def check_reachable(base_url: str, timeout: float = 5.0) -> None:
    """Fail before the run, with one line, when nothing answers at ``base_url`` (a server not
    started, a wrong port). Any HTTP answer counts: some APIs refuse ``/models`` but serve chats."""
    import urllib.error
    import urllib.request

    from curate.errors import CurateError

    try:
        urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CurateError(f"rewrite.teacher: nothing answers at {base_url} ({reason}); start the server or fix "
                          "base_url") from None
