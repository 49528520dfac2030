"""RDS+ (Ivison et al. 2025, arXiv 2503.01807): targeted selection by representation similarity.

Each row is rendered as the weak LM sees it in training (the chat template over prompt and
response, ``curate.lm_data.encode``), run through the model once, and its last hidden states
are mean-pooled over the real tokens and L2-normalised. The job's targets (examples of what the
model should become good at, one set per subtask) are pooled the same way. A row's score
aggregates as LESS does (methods.md §2.5): the mean cosine to a subtask's examples, then the
maximum over subtasks. The mean of cosines to unit vectors equals the cosine-weighted dot
product with their mean, so each subtask is one vector (the mean of its examples' unit vectors)
and a row costs one small matrix-vector product: ``rds_score = max_s <x, mean_s>``.

Batching: rows are sorted by length into forward batches, right-padded and run with no
attention mask (causal attention keeps padding out of every real token's states), and the mean
is taken over each row's own tokens, so a row's vector does not depend on its batch. Pure torch,
no Beam.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from curate.columns import Column, StageColumns

COLUMNS = StageColumns("score.rds", ("score.rds.enabled",), (
    Column("rds_score", pa.float64(),
           "RDS+: max over target subtasks of the mean cosine of the weak LM's mean-pooled hidden states "
           "to the subtask's examples; NaN when the row could not be scored", status="rds_status", rank=True),
    Column("rds_subtask", pa.string(), "the target subtask that gave rds_score"),
    Column("rds_subtasks", pa.string(), "JSON object: each target subtask's score for this row (what "
                                        "targeted's subtasks: balanced ranks each subtask by)"),
    Column("rds_status", pa.string(), "ok, response_truncated, empty_response, prompt_too_long or error; "
                                      "null when not scored"),
))
SCORED = ("ok", "response_truncated")  # statuses whose vector is used


def pooled_vectors(model, examples: list, pad_id: int, batch_size: int = 16,
                   progress=None) -> list[np.ndarray | None]:
    """Unit float32 vector (mean of the last hidden states over the row's tokens) per
    ``curate.lm_data.Example``; None where the example is not usable (no response, or a prompt
    longer than the cutoff). Batches as ``curate.lm_data`` makes them (usable rows, length-sorted,
    right-padded)."""
    import torch

    from curate.lm_data import batch_tensors, length_batches

    out: list[np.ndarray | None] = [None] * len(examples)
    body = model.base_model
    device = next(model.parameters()).device
    for chunk in length_batches(examples, batch_size):
        ids, _, mask = batch_tensors([examples[i] for i in chunk], pad_id)
        with torch.inference_mode():
            hidden = body(input_ids=ids.to(device)).last_hidden_state.float()
            mask = mask.to(device=device, dtype=hidden.dtype)[:, :, None]
            mean = (hidden * mask).sum(1) / mask.sum(1)
            unit = torch.nn.functional.normalize(mean, dim=1).cpu().numpy().astype(np.float32)
        for r, i in enumerate(chunk):
            out[i] = unit[r]
        if progress is not None:
            progress(len(chunk))
    return out


def vectors_for(model, tokenizer, rows: list[dict], max_length: int, batch_size: int,
                progress=None) -> list[tuple[np.ndarray | None, str]]:
    """(unit vector or None, status) per row (``prompt``/``response`` or ``messages``)."""
    from curate import lm_data

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    examples = [lm_data.encode(r, tokenizer, max_length) for r in rows]
    try:
        vectors = pooled_vectors(model, examples, pad, batch_size, progress)
    except Exception:  # noqa: BLE001 - a failed batch is a status, never a crash or a 0
        return [(None, "error") for _ in rows]
    return [(v, e.status) for v, e in zip(vectors, examples)]


def subtask_matrix(targets: list[tuple[str, np.ndarray]]) -> tuple[list[str], np.ndarray]:
    """(subtask names, [subtasks x dim] matrix): per subtask the mean of its examples' unit vectors."""
    names = sorted({name for name, _ in targets})
    if not names:
        raise ValueError("no target could be scored: every target row failed to encode")
    matrix = np.stack([np.mean([v for n, v in targets if n == name], axis=0) for name in names])
    return names, matrix.astype(np.float64)


def match(vector, names: list[str], matrix: np.ndarray) -> tuple[float, str | None]:
    """(rds_score, subtask): max over subtasks of the mean cosine; (NaN, None) without a vector."""
    score, best, _ = match_all(vector, names, matrix)
    return score, best


def match_all(vector, names: list[str], matrix: np.ndarray) -> tuple[float, str | None, str | None]:
    """``match`` and every subtask's score as a JSON object (null without a vector)."""
    if vector is None:
        return math.nan, None, None
    sims = matrix @ np.asarray(vector, dtype=np.float64)
    best = int(np.argmax(sims))
    return float(sims[best]), names[best], json.dumps({n: round(float(v), 9) for n, v in zip(names, sims)},
                                                      sort_keys=True)
