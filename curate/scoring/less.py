"""LESS (Xia et al., ICML 2024): targeted selection by the direction of each row's LoRA gradient.

A row's feature, per warm-up checkpoint (``curate.scoring.less_warmup``), is the gradient of its
mean response-token loss with respect to the LoRA parameters only (model in eval mode, so LoRA
dropout is off), turned into the Adam update direction for pool rows (methods.md §2.3: the
checkpoint's first and second moments, the optimizer's own betas and eps, no bias correction,
eps inside the square root, as the reference does) and left plain for target rows. Features are
randomly projected to ``dim`` dimensions and L2-normalised; a row's score is the
checkpoint-weighted sum of cosines, averaged over a subtask's examples, maxed over subtasks
(methods.md §2.5), so like RDS+ each subtask is one vector and a row costs one dot product each.

Per-example gradients without one backward per row: forward hooks on every LoRA ``A`` and ``B``
linear keep its input, a tensor hook its output gradient, and one backward over the batch's
summed per-row losses gives each row's weight gradient as ``sum_t grad_out[t]^T x[t]`` (an
einsum). Rows are right-padded with no attention mask: causal attention keeps padding out of
every real token, and padding carries no loss, so each row's gradient is its own. The logits are
formed only at the positions that predict a response token (the vocabulary is most of the cost).

The projection is a Rademacher matrix whose entries come from a counter-based generator (numpy's
Philox keyed by ``(seed, block)``, one block per ``GEN_ROWS`` input rows), generated on the CPU
block by block and never stored whole, so it is the same matrix on every device and for every
batching, and it costs one generation per bucket of rows and checkpoints rather than per row.
Pure torch and numpy; no Beam.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from curate.columns import Column, StageColumns

COLUMNS = StageColumns("score.less", ("score.less.enabled",), (
    Column("less_score", pa.float64(),
           "LESS: max over target subtasks of the mean (over its examples) learning-rate-weighted sum over "
           "warm-up checkpoints of the cosine between the row's projected Adam LoRA gradient and the target's "
           "projected gradient; NaN when the row could not be scored", status="less_status", rank=True),
    Column("less_subtask", pa.string(), "the target subtask that gave less_score"),
    Column("less_subtasks", pa.string(), "JSON object: each target subtask's score for this row (what "
                                         "targeted's subtasks: balanced ranks each subtask by)"),
    Column("less_status", pa.string(), "ok, response_truncated, empty_response, prompt_too_long or error; "
                                       "null when not scored"),
))
SCORED = ("ok", "response_truncated")
GENERATOR = "philox-v1"
GEN_ROWS = 1024  # input rows per generator block: part of the generator's identity


@dataclass(frozen=True)
class Projection:
    """A projection's identity: two feature stores are comparable only when these are equal."""

    dim: int
    seed: int = 0
    dtype: str = "float32"
    generator: str = GENERATOR
    block_rows: int = GEN_ROWS

    def identity(self) -> dict:
        return asdict(self)


def signs(seed: int, block: int, rows: int, dim: int) -> np.ndarray:
    """The ``rows x dim`` block ``block`` of the ±1 matrix, float32 (64 entries per Philox draw)."""
    gen = np.random.Philox(key=np.array([seed, block], dtype=np.uint64))
    need = -(-rows * dim // 64)
    bits = np.unpackbits(gen.random_raw(need).view(np.uint8), bitorder="little")[:rows * dim]
    out = bits.reshape(rows, dim).astype(np.float32)
    out *= -2.0
    out += 1.0
    return out


def project(x, proj: Projection):
    """``x @ R / sqrt(dim)`` for a ``[n, P]`` torch tensor, R generated block by block (float32
    accumulation on ``x``'s device; the blocks are made on the CPU, so every device sees the
    same matrix)."""
    import torch

    n, width = x.shape
    out = torch.zeros((n, proj.dim), dtype=torch.float32, device=x.device)
    for block, start in enumerate(range(0, width, proj.block_rows)):
        stop = min(start + proj.block_rows, width)
        r = torch.from_numpy(signs(proj.seed, block, stop - start, proj.dim)).to(x.device)
        out.addmm_(x[:, start:stop].float(), r)
    return out / math.sqrt(proj.dim)


def lora_parameters(model) -> list[tuple[str, object]]:
    """The trainable (LoRA) parameters in ``named_parameters`` order: the order features are
    flattened in and the optimizer's ``param_groups`` order."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params or not all("lora_" in n for n, _ in params):
        raise ValueError("LESS needs a model whose only trainable parameters are LoRA's")
    return params


class _Capture:
    """Each LoRA linear's input and output gradient during one forward/backward."""

    def __init__(self, model, names: list[str]):
        modules = dict(model.named_modules())
        self.names = names
        self.inputs, self.grads, self.handles = {}, {}, []
        for name in names:
            module = modules[name.rsplit(".", 1)[0]]
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def forward(module, inputs, output):
            self.inputs[name] = inputs[0].detach()
            output.register_hook(lambda g: self.grads.__setitem__(name, g.detach()))
        return forward

    def per_example(self):
        """``[batch, P]``: each row's gradient, parameters flattened in order."""
        import torch

        parts = [torch.einsum("bto,bti->boi", self.grads[n].float(), self.inputs[n].float()).flatten(1)
                 for n in self.names]
        self.inputs, self.grads = {}, {}
        return torch.cat(parts, dim=1)

    def close(self):
        for h in self.handles:
            h.remove()


def _row_losses(model, ids, labels):
    """Each row's mean loss over its response tokens (logits only where a response token is predicted)."""
    import torch

    from curate.lm_data import IGNORE

    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal.model(input_ids=ids).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = causal.lm_head(hidden[keep]).float()
    nll = torch.nn.functional.cross_entropy(logits, targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(ids.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return sums / keep.sum(dim=1).clamp_min(1)


def example_grads(model, examples: list, pad_id: int, batch_size: int = 8, progress=None):
    """(indices of the usable examples, ``[n, P]`` float32 gradients of each one's mean response
    loss w.r.t. the LoRA parameters), batched (see the module docstring)."""
    import torch

    from curate.lm_data import batch_tensors, length_batches

    names = [n for n, _ in lora_parameters(model)]
    device = next(model.parameters()).device
    capture = _Capture(model, names)
    index, grads = [], []
    try:
        for chunk in length_batches(examples, batch_size):
            ids, labels, _ = batch_tensors([examples[i] for i in chunk], pad_id)
            with torch.enable_grad():
                _row_losses(model, ids.to(device), labels.to(device)).sum().backward()
            grads.append(capture.per_example())
            index += chunk
            if progress is not None:
                progress(len(chunk))
    finally:
        capture.close()
        model.zero_grad(set_to_none=True)
    width = sum(p.numel() for _, p in lora_parameters(model))
    return index, (torch.cat(grads) if grads else torch.zeros((0, width), device=device))


def loop_grads(model, examples: list, pad_id: int):
    """The reference's way, one backward per usable row (for tests and the speed benchmark)."""
    import torch

    from curate.lm_data import batch_tensors, usable

    params = [p for _, p in lora_parameters(model)]
    device = next(model.parameters()).device
    index, grads = [], []
    for i, e in enumerate(examples):
        if not usable(e):
            continue
        ids, labels, _ = batch_tensors([e], pad_id)
        with torch.enable_grad():
            loss = _row_losses(model, ids.to(device), labels.to(device))[0]
            g = torch.autograd.grad(loss, params)
        index.append(i)
        grads.append(torch.cat([x.flatten().float() for x in g]))
    return index, torch.stack(grads)


def adam_direction(g, m, v, betas: tuple[float, float], eps: float):
    """The Adam feature of methods.md §2.3: the update direction one more step with gradient ``g``
    would take from moments (m, v), as the reference computes it (no bias correction, eps inside
    the root)."""
    b1, b2 = betas
    m2 = b1 * m + (1 - b1) * g
    v2 = b2 * v + (1 - b2) * g * g
    return m2 / (v2 + eps).sqrt()


def checkpoint_weights(lrs: list[float]) -> list[float]:
    """Each checkpoint's weight: its epoch's mean learning rate, normalised to sum to 1."""
    total = float(sum(lrs))
    if not lrs or total <= 0:
        raise ValueError("checkpoint weights need positive learning rates")
    return [float(x) / total for x in lrs]


def features(model, checkpoints: list, examples: list, pad_id: int, proj: Projection, kind: str,
             batch_size: int = 8, progress=None) -> list[np.ndarray | None]:
    """Per example, its normalised projected features for every checkpoint, concatenated
    (``len(checkpoints) * proj.dim`` float32), or None when unusable.

    ``checkpoints``: ``curate.scoring.less_warmup.Checkpoint`` objects (adapter weights, moments,
    optimizer betas and eps); ``kind``: ``adam`` (pool rows) or ``sgd`` (targets). The gradients
    of every checkpoint are projected together, so the matrix is generated once per call."""
    import torch

    if kind not in ("adam", "sgd"):
        raise ValueError(f"kind must be adam or sgd, not {kind!r}")
    per_ckpt, index = [], None
    for ckpt in checkpoints:
        ckpt.load_into(model)
        step = None if progress is None else (lambda k: progress(k / len(checkpoints)))
        index, g = example_grads(model, examples, pad_id, batch_size, step)
        if kind == "adam":
            m, v = ckpt.moments(g.device)
            g = adam_direction(g, m, v, ckpt.betas, ckpt.eps)
        per_ckpt.append(g)
    out: list[np.ndarray | None] = [None] * len(examples)
    if not index:
        return out
    stacked = project(torch.cat(per_ckpt), proj)
    unit = torch.nn.functional.normalize(stacked, dim=1).cpu().numpy()
    rows = len(index)
    for r, i in enumerate(index):
        out[i] = np.concatenate([unit[c * rows + r] for c in range(len(checkpoints))]).astype(np.float32)
    return out


def subtask_matrix(targets: list[tuple[str, np.ndarray]], weights: list[float]) -> tuple[list[str], np.ndarray]:
    """(subtask names, [subtasks x N*dim]): per subtask the mean of its examples' features, each
    checkpoint's part scaled by that checkpoint's weight, so that ``matrix @ row`` is the weighted
    sum over checkpoints of the mean cosine."""
    from curate.scoring import rds

    names, matrix = rds.subtask_matrix(targets)
    dim = matrix.shape[1] // len(weights)
    scale = np.repeat(np.asarray(weights, dtype=np.float64), dim)
    return names, matrix * scale


IDENTITY_KEY = b"curate.projection"


def identity_metadata(proj: dict) -> dict:
    """The Parquet field metadata that carries a feature store's projection identity."""
    import json

    return {IDENTITY_KEY: json.dumps(proj, sort_keys=True).encode()}


def read_store(folder: str) -> tuple[list[str], np.ndarray, dict]:
    """(content keys, ``[rows, checkpoints * dim]`` float32 features, projection identity) of a
    feature store (``pipelines.less``'s cache folders); rows without features are left out."""
    import json

    import pyarrow.parquet as pq

    from curate import cache_store

    files = cache_store.files(folder)
    if not files:
        raise ValueError(f"no feature shards in {folder}")
    identities = {(pq.read_schema(f).field("less_vector").metadata or {}).get(IDENTITY_KEY) for f in files}
    if len(identities) != 1 or None in identities:
        raise ValueError(f"{folder}: shards without one projection identity")
    table = pa.concat_tables([pq.read_table(f, columns=[cache_store.KEY, "less_vector"]) for f in files])
    keys, vectors = table.column(0).to_pylist(), table.column(1).to_pylist()
    kept = [(k, v) for k, v in zip(keys, vectors) if v is not None]
    matrix = np.array([v for _, v in kept], dtype=np.float32)
    return [k for k, _ in kept], matrix, json.loads(identities.pop())


def check_comparable(a: dict, b: dict) -> None:
    """Raise unless two feature stores share a projection (features from different matrices are
    not comparable, the reference's silent failure, methods.md §2.4)."""
    if a != b:
        raise ValueError(f"feature stores were projected differently: {a} vs {b}")
