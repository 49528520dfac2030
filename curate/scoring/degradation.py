"""What compression took from a model, per row: teacher-forced on the row's response tokens
(prompt rendered with the chat template, ``curate.lm_data``), the Jensen-Shannon divergence
between the dense and the compressed model's next-token distributions, averaged over the
response tokens (nats, in [0, ln 2]), with its sum and the token count, and the increase of the
response NLL (compressed - dense). PASER's degradation score, computed as methods.md §5.2 asks:
on the response rather than the instruction, a mean rather than a length-growing sum, and in
float32 with zero-safe terms (no NaN when a probability underflows).
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import pyarrow as pa

from curate.columns import Column, StageColumns

COLUMNS = StageColumns("score.degradation", ("score.degradation.enabled",), (
    Column("degradation_jsd", pa.float64(),
           "mean over response tokens of JSD(dense || compressed) next-token distributions, nats in [0, ln 2]",
           status="degradation_status", rank=True),
    Column("degradation_jsd_sum", pa.float64(), "the same JSD summed over the response tokens",
           status="degradation_status"),
    Column("degradation_tokens", pa.int32(), "response tokens compared (after the cutoff)"),
    Column("degradation_dloss", pa.float64(), "response NLL of the compressed model minus the dense model's (nats)",
           status="degradation_status", rank=True),
    Column("degradation_status", pa.string(),
           "ok, response_truncated, empty_response, prompt_too_long or error; null when not scored"),
))


def score_rows(dense, compressed, tokenizer, rows: list[dict], cutoff: int, batch_size: int,
               progress=None) -> list[dict]:
    """Degradation columns for each row (``prompt``/``response`` or ``messages``)."""
    from curate import lm_data

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = [lm_data.encode(r, tokenizer, cutoff) for r in rows]
    try:
        scores = lm_data.compare(dense, compressed, examples, pad, batch_size, progress)
    except Exception:  # noqa: BLE001 - a failed batch is a status, never a crash or a 0
        scores = [{"jsd": math.nan, "jsd_sum": math.nan, "nll_dense": math.nan, "nll_other": math.nan,
                   "tokens": 0, "status": "error"} for _ in rows]
    return [{"degradation_jsd": s["jsd"], "degradation_jsd_sum": s["jsd_sum"],
             "degradation_tokens": s["tokens"], "degradation_dloss": s["nll_other"] - s["nll_dense"],
             "degradation_status": s["status"]} for s in scores]


def model_fingerprint(path: str) -> str:
    """What identifies a compressed model folder's weights: its card, else the weight files' sizes
    and modification times (so a re-compressed folder is a new cache entry)."""
    card = os.path.join(path, "card.json")
    h = hashlib.blake2b(digest_size=8)
    if os.path.isfile(card):
        with open(card, "rb") as fh:
            h.update(fh.read())
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
        if name.endswith((".safetensors", ".bin")):
            st = os.stat(os.path.join(path, name))
            h.update(json.dumps([name, st.st_size, int(st.st_mtime)]).encode())
    return h.hexdigest()
