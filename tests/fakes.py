"""Small stand-ins for the model stages: the graph logic is tested in seconds, the real models in
their own tests. Scores are a deterministic function of the text, so reruns can be compared."""
import math
import zlib

from pipelines.cached import StageHandler
from pipelines.score import score_input


def fake_scores(row: dict) -> dict:
    """IFD-shaped columns from the text: ifd_loss spreads over [0.5, 1.5), so some rows are >= 1;
    an empty response gets NaN with its status, as the real scorer gives."""
    r = score_input(row)
    if not r["output"].strip():
        nan = math.nan
        return {"ifd_nll_cond": nan, "ifd_nll_direct": nan, "ifd_tokens": 0, "ifd_tokens_direct": 0,
                "ifd_loss": nan, "ifd_ppl": nan, "ifd_status": "empty_response", "rifd_nll_cond": nan,
                "rifd_nll_direct": nan, "rifd_loss": nan, "rifd": nan, "rifd_status": "empty_response"}
    h = zlib.crc32((r["instruction"] + "\x1f" + r["output"]).encode()) / 2**32
    direct = 1.0 + len(r["output"]) % 5 / 10
    cond = direct * (0.5 + h)
    rd = 2.0
    rc = rd * (0.3 + h / 2)
    return {"ifd_nll_cond": cond, "ifd_nll_direct": direct, "ifd_tokens": len(r["output"].split()),
            "ifd_tokens_direct": len(r["output"].split()), "ifd_loss": cond / direct,
            "ifd_ppl": math.exp(cond - direct), "ifd_status": "ok", "rifd_nll_cond": rc, "rifd_nll_direct": rd,
            "rifd_loss": rc / rd, "rifd": math.exp(rc - rd), "rifd_status": "ok"}


class FakeModel:
    """Beam shares a loaded model through a weak reference, which a bare ``object()`` cannot take."""


class FakeIFDHandler(StageHandler):
    """The IFD stage's handler without a model. ``fail_after``: raise once this worker has scored
    that many rows (a run killed half way)."""

    stage = "score"

    def __init__(self, p=None, rt=None, *, batch: int = 4, fail_after: int | None = None):
        super().__init__(min_batch_size=batch, max_batch_size=batch)
        self.fail_after = fail_after
        self.done = 0

    def load_model(self):
        return FakeModel()

    def infer(self, batch, model, progress):
        if self.fail_after is not None and self.done + len(batch) > self.fail_after:
            raise RuntimeError("fake scorer stopped on purpose")
        self.done += len(batch)
        progress(len(batch))
        return [fake_scores(r) for r in batch]


def fake_vector(text: str, dim: int = 8):
    """A unit vector from the text's words: the same text gives the same vector, texts sharing
    most words point the same way (a stand-in for a sentence embedding)."""
    import numpy as np

    v = np.zeros(dim, dtype=np.float32)
    for word in text.lower().split():
        v[zlib.crc32(word.encode()) % dim] += 1.0
    v[0] += 1e-3  # never the zero vector
    return v / np.linalg.norm(v)


class FakeEmbedHandler(StageHandler):
    """The embed stage's handler without a model (``fake_vector`` of the embedded text)."""

    stage = "embed"

    def __init__(self, text: str = "whole", dim: int = 8, batch: int = 4):
        super().__init__(min_batch_size=batch, max_batch_size=batch)
        self.text, self.dim = text, dim

    def load_model(self):
        return FakeModel()

    def infer(self, batch, model, progress):
        from curate.embed import embed_text

        progress(len(batch))
        return [{"embedding": fake_vector(embed_text(r, self.text), self.dim)} for r in batch]
