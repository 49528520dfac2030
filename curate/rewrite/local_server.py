"""A local teacher for trying the rewrite stages without a GPU or an API key: llama.cpp's
OpenAI-compatible server (``pip install 'llama-cpp-python[server]'``) on a GGUF file, by default
the packaged SmolLM2-135M-Instruct. Used by the tests and the rewrite benchmark."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``python -m llama_cpp.server`` on ``gguf`` (default: the packaged weak LM) on a free port."""

    def __init__(self, log_dir: str, gguf: str | None = None, threads: int = 2, n_ctx: int = 4096):
        from curate.models import weak_lm_gguf

        self.port, self.gguf, self.log_dir = free_port(), gguf or weak_lm_gguf(), log_dir
        self.threads, self.n_ctx, self.proc = threads, n_ctx, None
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> float:
        """Start and wait until it answers; returns the seconds that took."""
        t0 = time.monotonic()
        log = open(os.path.join(self.log_dir, f"llama-server-{self.port}.log"), "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", self.gguf, "--host",
                                      "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
                                      "--n_threads", str(self.threads)], stdout=log, stderr=subprocess.STDOUT)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(f"{self.url}/models", timeout=2).read()
                return time.monotonic() - t0
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"llama_cpp.server not ready in {timeout} s; see {log.name}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
