"""LoRA recovery of a compressed model on a selection: the fine-tuning that curate's selections
exist to make cheap.

A plain training loop over peft's LoRA (TRL's ``SFTTrainer`` would add a dependency that moves
with transformers' releases and hides the batch order this module must control): loss on the
assistant tokens only (``curate.lm_data``), AdamW with linear warm-up and decay, seeded LoRA
initialisation and a seeded batch order that depend only on the seed and the row ids, so two
selections trained with the same seed differ only in their rows (paired comparisons in
``curate evaluate``). Defaults follow PASER's recipe scaled down to a CPU: r 8, alpha 16,
dropout 0.05 on every linear projection, lr 3e-4, cutoff 256 tokens.

Objectives: ``sft`` (cross-entropy on the response tokens), ``kd`` (forward KL from the dense
model's next-token distribution to the student's over the full vocabulary at temperature 1, on the
response tokens; the dense model runs beside the student in the same step, so no truncated logits
are cached: Minitron, arXiv 2407.14679 A.5, found top-k logits clearly worse) and ``sft+kd``
(their sum, KD weighted by ``kd_weight``). Batches are drawn from the seeded order in windows and
cut by length inside each window (less padding; the same rows for the same seed and ids).

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
OBJECTIVES = ("sft", "kd", "sft+kd")
WINDOW = 8  # batches per length-sorted window of the seeded order


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
    objective: str = "sft"  # sft | kd | sft+kd (kd needs the dense model)
    kd_weight: float = 1.0  # sft+kd: loss = sft + kd_weight * kd

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise RecoverError(f"recover: objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.kd_weight < 0:
            raise RecoverError("recover: kd_weight must be >= 0")


def order_key(seed: int, epoch: int, rid: str) -> str:
    import hashlib

    return hashlib.blake2b(f"{seed}|{epoch}|{rid}".encode(), digest_size=8).hexdigest()


def batches(ids: list[str], batch_size: int, epochs: int, seed: int,
            lengths: list[int] | None = None) -> list[list[int]]:
    """Row indices in training order: each epoch a seeded permutation that depends on the ids and
    the seed only (the same row lands in the same place whatever else the selection holds). With
    ``lengths``, each window of ``WINDOW`` batches of that order is sorted by length before it is
    cut (rows of like length share a batch: less padding), and the window's batches keep a seeded
    order, so training does not run from short rows to long ones."""
    out = []
    for epoch in range(epochs):
        order = sorted(range(len(ids)), key=lambda i: (order_key(seed, epoch, ids[i]), i))
        if lengths is None:
            out += [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
            continue
        span = batch_size * WINDOW
        for w in range(0, len(order), span):
            window = sorted(order[w:w + span], key=lambda i: (lengths[i], order_key(seed, epoch, ids[i])))
            cut = [window[k:k + batch_size] for k in range(0, len(window), batch_size)]
            out += sorted(cut, key=lambda b: order_key(seed, epoch, ids[b[0]]))
    return out


def step_loss(model, batch, objective: str, kd_weight: float = 1.0, teacher=None):
    """(loss, {part: value}) of one batch ``(input_ids, labels, mask)``: the objective's loss on
    the response tokens (see the module docstring)."""
    import torch

    from curate import lm_data

    ids, labels, mask = batch
    logits, targets, keep = lm_data.target_logits(model, ids, labels, mask)
    parts = {}
    loss = logits.new_zeros(())
    if objective in ("sft", "sft+kd"):
        sft = torch.nn.functional.cross_entropy(logits, targets)
        parts["sft"] = float(sft.detach())
        loss = loss + sft
    if objective in ("kd", "sft+kd"):
        if teacher is None:
            raise RecoverError(f"recover: objective {objective} needs the dense model")
        with torch.no_grad():
            t_logits, _, _ = lm_data.target_logits(teacher, ids, labels, mask)
        kd = lm_data.kd_loss(logits, t_logits)
        parts["kd"] = float(kd.detach())
        loss = loss + (kd_weight * kd if objective == "sft+kd" else kd)
    return loss, parts


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


def train(model, tok, rows: list[dict], s: RecoverSettings, progress=None, on_epoch_end=None,
          teacher=None) -> dict:
    """Train LoRA on ``rows`` in place of ``model`` (a peft model); returns the loss history.
    ``teacher`` is the dense model (objectives kd and sft+kd).
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
    if s.objective != "sft" and teacher is None:
        raise RecoverError(f"recover: objective {s.objective} needs the dense model")
    if teacher is not None:
        teacher.eval()
    lengths = [len(e.ids) for e in examples]
    plan = batches(ids, s.batch_size, s.epochs, s.seed, lengths)
    if s.steps is not None:
        while len(plan) < s.steps:  # more steps than the epochs hold: keep going, one more seeded epoch
            plan += batches(ids, s.batch_size, 1, s.seed + len(plan), lengths)
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
        batch = lm_data.batch_tensors([examples[i] for i in chunk], pad)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        loss, _ = step_loss(model, batch, s.objective, s.kd_weight, teacher)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, len(plan), losses[-1])
        if on_epoch_end is not None and ((step + 1) % per_epoch == 0 or step + 1 == len(plan)):
            epoch_lrs = lrs[step // per_epoch * per_epoch:]
            model.eval()
            on_epoch_end(step // per_epoch, opt, sum(epoch_lrs) / len(epoch_lrs))
            model.train()
    model.eval()
    seconds = time.perf_counter() - start
    return {"steps": len(plan), "rows": len(examples), "skipped_rows": len(rows) - len(examples),
            "objective": s.objective, "loss": losses, "seconds": round(seconds, 2),
            "seconds_per_step": round(seconds / max(len(plan), 1), 3)}


def dense_model_of(compressed: str, dense: str | None = None) -> str | None:
    """The dense model a compressed folder came from: ``dense`` if given, else its card's base."""
    if dense is not None:
        return dense
    card = os.path.join(compressed, "card.json")
    if os.path.isfile(card):
        with open(card, encoding="utf-8") as fh:
            return json.load(fh).get("base_model")
    return None


def recover(compressed: str, rows: list[dict], out: str | None, s: RecoverSettings, progress=None,
            dense: str | None = None):
    """Load ``compressed``, train LoRA on ``rows`` (with the dense model beside it for kd), save the
    adapter to ``out`` (if given); returns (peft model, tokenizer, report)."""
    from curate.models import load_causal_lm

    if not os.path.exists(compressed) and "/" in compressed:
        raise RecoverError(f"recover: no model folder {compressed!r}")
    teacher = None
    if s.objective != "sft":
        dense = dense_model_of(compressed, dense)
        if dense is None:
            raise RecoverError(f"recover: objective {s.objective} needs the dense model: give --dense "
                               f"({compressed} has no card.json naming its base model)")
        teacher, _ = load_causal_lm(dense, "cpu", "float32")
    model, tok = load_causal_lm(compressed, "cpu", "float32")
    model = lora_model(model, s)
    report = train(model, tok, rows, s, progress, teacher=teacher)
    report["settings"] = asdict(s)
    report["model"] = compressed
    report["dense"] = dense if teacher is not None else None
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

