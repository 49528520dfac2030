"""LESS's warm-up (methods.md §2.2): LoRA trained briefly on a seeded random share of the pool,
one checkpoint per epoch holding the adapter weights, the optimizer's first and second moments
keyed by parameter name, the optimizer's betas and eps, and the epoch's mean learning rate (the
checkpoint's weight in the score).

Why our own files and not a Trainer's ``optimizer.pt``: that file keys the moments by integer
index, which is what breaks the reference (LESS issues #4, #10, #13). ``named_moments`` maps an
index-keyed state through ``param_groups`` order to names and checks every shape, so a state
saved either way loads here.

The warm-up sample is drawn by hashing each row's content with the seed (a row is in when its
hash falls under the fraction; the smallest hashes fill up to ``min_rows``): it depends only on
the rows and the seed, not on file order, and streams over any pool. No Beam.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import shutil
from dataclasses import dataclass, field

log = logging.getLogger("curate")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # LESS's LoRA targets


def sample(keyed_rows, fraction: float, min_rows: int, seed: int) -> list[dict]:
    """Rows whose seeded content hash is under ``fraction``, or the ``min_rows`` smallest when
    fewer are; ``keyed_rows`` yields (content key, row). Duplicate keys count once; sorted by hash."""
    chosen, floor, seen = {}, [], set()
    for key, row in keyed_rows:
        if key in seen:
            continue
        seen.add(key)
        h = int.from_bytes(hashlib.blake2b(f"{seed}|{key}".encode(), digest_size=8).digest(), "big")
        u = h / 2**64
        if u < fraction:
            chosen[key] = (u, row)
        item = (-u, key, row)
        if len(floor) < min_rows:
            heapq.heappush(floor, item)
        elif item > floor[0]:
            heapq.heapreplace(floor, item)
    picked = chosen if len(chosen) >= min_rows else {k: (-nu, r) for nu, k, r in floor}
    return [r for _, r in sorted(picked.values(), key=lambda x: x[0])]


def named_moments(state: dict, names: list[str], shapes: list[tuple]) -> dict:
    """``{name: (exp_avg, exp_avg_sq)}`` from an optimizer ``state_dict`` keyed by index (torch)
    or by name (accelerate/FSDP); ``names``/``shapes``: the trainable parameters in
    ``named_parameters`` order, which is the order they were given to the optimizer."""
    moments = state["state"]
    if all(isinstance(k, str) for k in moments):
        by_name = moments
    else:
        order = [i for group in state["param_groups"] for i in group["params"]]
        if len(order) != len(names):
            raise ValueError(f"optimizer state has {len(order)} parameters, the model {len(names)} trainable ones")
        by_name = {name: moments[i] for name, i in zip(names, order) if i in moments}
    out = {}
    for name, shape in zip(names, shapes):
        if name not in by_name:
            raise ValueError(f"optimizer state has no moments for {name}")
        m, v = by_name[name]["exp_avg"], by_name[name]["exp_avg_sq"]
        if tuple(m.shape) != tuple(shape) or tuple(v.shape) != tuple(shape):
            raise ValueError(f"optimizer moments of {name} have shape {tuple(m.shape)}, the parameter {tuple(shape)}")
        out[name] = (m, v)
    return out


@dataclass
class Checkpoint:
    """One warm-up checkpoint, read from its folder."""

    folder: str
    epoch: int
    lr: float
    betas: tuple[float, float]
    eps: float
    _weights: dict | None = field(default=None, repr=False)  # the files' contents, once read
    _moments: tuple | None = field(default=None, repr=False)

    @classmethod
    def read(cls, folder: str) -> Checkpoint:
        with open(os.path.join(folder, "checkpoint.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
        return cls(folder, meta["epoch"], meta["lr"], tuple(meta["betas"]), meta["eps"])

    def load_into(self, model) -> None:
        """Set the peft model's LoRA weights to this checkpoint's (read from disk once)."""
        from safetensors.torch import load_file

        if self._weights is None:
            self._weights = load_file(os.path.join(self.folder, "adapter.safetensors"))
        params = dict(model.named_parameters())
        for name, value in self._weights.items():
            params[name].data.copy_(value.to(params[name].device, params[name].dtype))

    def moments(self, device="cpu"):
        """(m, v) flattened in ``named_parameters`` order, float32 (read from disk once)."""
        import torch
        from safetensors.torch import load_file

        if self._moments is None:
            with open(os.path.join(self.folder, "checkpoint.json"), encoding="utf-8") as fh:
                names = json.load(fh)["params"]
            t = load_file(os.path.join(self.folder, "moments.safetensors"))
            self._moments = tuple(torch.cat([t[f"{n}:{k}"].flatten() for n in names]).float() for k in "mv")
        m, v = self._moments
        return m.to(device), v.to(device)


def save_checkpoint(folder: str, model, optimizer, epoch: int, lr: float) -> None:
    """Adapter weights, name-keyed moments and the optimizer's hyper-parameters, under ``folder``."""
    from safetensors.torch import save_file

    from curate.scoring.less import lora_parameters

    params = lora_parameters(model)
    names = [n for n, _ in params]
    moments = named_moments(optimizer.state_dict(), names, [tuple(p.shape) for _, p in params])
    os.makedirs(folder, exist_ok=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in params}, os.path.join(folder, "adapter.safetensors"))
    tensors = {}
    for n, (m, v) in moments.items():
        tensors[f"{n}:m"], tensors[f"{n}:v"] = m.detach().cpu().contiguous(), v.detach().cpu().contiguous()
    save_file(tensors, os.path.join(folder, "moments.safetensors"))
    group = optimizer.param_groups[0]
    meta = {"epoch": epoch, "lr": lr, "betas": list(group["betas"]), "eps": group["eps"], "params": names}
    with open(os.path.join(folder, "checkpoint.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)


def peft_model(model, r: int, alpha: int, dropout: float, seed: int):
    """The weak LM with LESS's LoRA (q, k, v, o projections), seeded initialisation."""
    from curate.recover import RecoverSettings, lora_model

    return lora_model(model, RecoverSettings(r=r, alpha=alpha, dropout=dropout, seed=seed, targets=TARGETS))


def warm_up(model, tokenizer, rows: list[dict], folder: str, *, r: int, alpha: int, dropout: float, lr: float,
            epochs: int, batch_size: int, max_length: int, seed: int, progress=None) -> dict:
    """Train LoRA on ``rows`` and write one checkpoint per epoch under ``folder`` (written under a
    temporary name and renamed, so a folder that exists is complete). Returns the report."""
    from curate.recover import RecoverSettings, train

    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft = peft_model(model, r, alpha, dropout, seed)
    s = RecoverSettings(r=r, alpha=alpha, dropout=dropout, lr=lr, epochs=epochs, batch_size=batch_size,
                        cutoff=max_length, seed=seed, targets=TARGETS)

    rows = [r if "id" in r else {**r, "id": str(i)} for i, r in enumerate(rows)]  # train orders rows by id

    def keep(epoch, optimizer, mean_lr):
        save_checkpoint(os.path.join(tmp, f"ckpt-{epoch}"), peft, optimizer, epoch, mean_lr)

    report = train(peft, tokenizer, rows, s, progress, keep)
    report = {k: v for k, v in report.items() if k != "loss"} | {"loss_first": report["loss"][0],
                                                                  "loss_last": report["loss"][-1]}
    with open(os.path.join(tmp, "warmup.json"), "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return report


def checkpoints(folder: str) -> list[Checkpoint]:
    """The warm-up's checkpoints in epoch order."""
    found = sorted((d for d in os.listdir(folder) if d.startswith("ckpt-")), key=lambda d: int(d.split("-")[1]))
    return [Checkpoint.read(os.path.join(folder, d)) for d in found]
