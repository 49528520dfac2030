"""LoRA recovery of a compressed model on a selection: the fine-tuning that curate's selections
exist to make cheap.

A plain training loop over peft's LoRA (TRL's ``SFTTrainer`` would add a dependency that moves
with transformers' releases and hides the batch order this module must control): loss on the
assistant tokens only (``curate.lm_data``), AdamW with linear warm-up and decay, seeded LoRA
initialisation and a seeded batch order that depend only on the seed and the row ids, so two
selections trained with the same seed differ only in their rows (paired comparisons in
``curate evaluate``). Defaults follow PASER's recipe scaled down to a CPU: r 8, alpha 16,
dropout 0.05 on every linear projection, lr 3e-4, cutoff 256 tokens.

The adapter is saved unmerged: merging LoRA into a pruned model would fill the pruned zeros.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass

from curate.errors import CurateError

log = logging.getLogger("curate")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RecoverError(CurateError):
    pass


@dataclass(frozen=True)
class RecoverSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 3e-4
    epochs: int = 1
    steps: int | None = None  # stop after this many optimizer steps (default: the epochs' steps)
    batch_size: int = 8
    cutoff: int = 256
    warmup: float = 0.1  # share of the steps with a linear warm-up
    weight_decay: float = 0.0
    seed: int = 0
    targets: tuple = TARGETS  # the projections LoRA adapts (those the model has)


def order_key(seed: int, epoch: int, rid: str) -> str:
    import hashlib

    return hashlib.blake2b(f"{seed}|{epoch}|{rid}".encode(), digest_size=8).hexdigest()


def batches(ids: list[str], batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Row indices in training order: each epoch a seeded permutation that depends on the ids and
    the seed only (the same row lands in the same place whatever else the selection holds)."""
    out = []
    for epoch in range(epochs):
        order = sorted(range(len(ids)), key=lambda i: (order_key(seed, epoch, ids[i]), i))
        out += [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    return out


def lora_model(model, s: RecoverSettings):
    import torch
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    targets = [t for t in s.targets if t in present]
    if not targets:
        raise RecoverError(f"recover: the model has none of the projections LoRA targets ({', '.join(s.targets)})")
    torch.manual_seed(s.seed)  # the LoRA A matrices: the same for every selection at this seed
    cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=targets,
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def train(model, tok, rows: list[dict], s: RecoverSettings, progress=None, on_epoch_end=None) -> dict:
    """Train LoRA on ``rows`` in place of ``model`` (a peft model); returns the loss history.
    ``on_epoch_end(epoch, optimizer, mean_lr)`` is called after each epoch's last step (LESS keeps
    a checkpoint there); ``mean_lr`` is the mean learning rate of that epoch's steps."""
    import torch

    from curate import lm_data

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    examples = [lm_data.encode(r, tok, s.cutoff) for r in rows]
    keep = [i for i, e in enumerate(examples) if lm_data.usable(e)]
    if not keep:
        raise RecoverError("recover: no usable training rows (empty responses or prompts over the cutoff)")
    ids = [rows[i]["id"] for i in keep]
    examples = [examples[i] for i in keep]
    plan = batches(ids, s.batch_size, s.epochs, s.seed)
    if s.steps is not None:
        while len(plan) < s.steps:  # more steps than the epochs hold: keep going, one more seeded epoch
            plan += batches(ids, s.batch_size, 1, s.seed + len(plan))
        plan = plan[:s.steps]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    warm = max(1, int(round(s.warmup * len(plan))))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min((step + 1) / warm, max(0.0, (len(plan) - step) / max(len(plan) - warm, 1))))
    gen = torch.Generator().manual_seed(s.seed)  # dropout masks
    model.train()
    losses, lrs = [], []
    per_epoch = -(-len(examples) // s.batch_size)
    start = time.perf_counter()
    for step, chunk in enumerate(plan):
        lrs.append(sched.get_last_lr()[0])
        input_ids, labels, mask = lm_data.batch_tensors([examples[i] for i in chunk], pad)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if progress is not None:
            progress(step + 1, len(plan), losses[-1])
        if on_epoch_end is not None and ((step + 1) % per_epoch == 0 or step + 1 == len(plan)):
            epoch_lrs = lrs[step // per_epoch * per_epoch:]
            model.eval()
            on_epoch_end(step // per_epoch, opt, sum(epoch_lrs) / len(epoch_lrs))
            model.train()
    model.eval()
    return {"steps": len(plan), "rows": len(examples), "skipped_rows": len(rows) - len(examples),
            "loss": losses, "seconds": round(time.perf_counter() - start, 2)}


def recover(compressed: str, rows: list[dict], out: str | None, s: RecoverSettings, progress=None):
    """Load ``compressed``, train LoRA on ``rows``, save the adapter to ``out`` (if given); returns
    (peft model, tokenizer, report)."""
    from curate.models import load_causal_lm

    if not os.path.exists(compressed) and "/" in compressed:
        raise RecoverError(f"recover: no model folder {compressed!r}")
    model, tok = load_causal_lm(compressed, "cpu", "float32")
    model = lora_model(model, s)
    report = train(model, tok, rows, s, progress)
    report["settings"] = asdict(s)
    report["model"] = compressed
    if out:
        tmp = out.rstrip("/") + ".tmp"
        model.save_pretrained(tmp)  # the adapter only, unmerged
        with open(os.path.join(tmp, "recover.json"), "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
        if os.path.exists(out):
            import shutil

            shutil.rmtree(out)
        os.replace(tmp, out)
    return model, tok, report

