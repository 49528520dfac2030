"""Instruction rows as causal-LM examples: token ids with the loss on the response only, and the
per-row losses and divergences of a model on them. Shared by compression (calibration and held-out
loss), recovery (training), evaluation and the degradation score, so all four read a row the
same way. Pure torch; no Beam.

A row is ``{"messages": [...]}`` (chat) or ``{"prompt", "response"}``; the prompt is rendered with
the tokenizer's chat template (a generation prompt at the end) when it has one, else as plain
text, and the response follows with the end-of-sequence token. Rows longer than ``cutoff`` tokens
keep the whole prompt and a truncated response; a row whose prompt leaves no room is skipped with
status ``prompt_too_long``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

IGNORE = -100


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE on prompt tokens
    status: str = "ok"  # ok | response_truncated | prompt_too_long | empty_response

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def _messages(row: dict) -> list[dict]:
    if row.get("messages"):
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def encode(row: dict, tokenizer, cutoff: int = 256) -> Example:
    """One row as an :class:`Example` (see the module docstring)."""
    msgs = _messages(row)
    prompt_msgs, response = msgs[:-1], msgs[-1]["content"] if msgs and msgs[-1]["role"] == "assistant" else ""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    else:
        prompt = "\n".join(m["content"] for m in prompt_msgs) + "\n"
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
    if not r_ids:
        return Example(tuple(p_ids[:cutoff]), tuple([IGNORE] * min(len(p_ids), cutoff)), "empty_response")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    r_ids = r_ids + eos
    room = cutoff - len(p_ids)
    if room < 1:
        return Example(tuple(p_ids[:cutoff]), tuple([IGNORE] * min(len(p_ids), cutoff)), "prompt_too_long")
    status = "ok" if len(r_ids) <= room else "response_truncated"
    r_ids = r_ids[:room]
    return Example(tuple(p_ids + r_ids), tuple([IGNORE] * len(p_ids) + r_ids), status)


def usable(ex: Example) -> bool:
    return ex.status in ("ok", "response_truncated") and ex.n_targets > 0


def batch_tensors(examples: list[Example], pad_id: int):
    """(input_ids, labels, attention_mask), right-padded."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        mask[i, :len(e.ids)] = 1
    return ids, labels, mask


def length_batches(examples: list[Example], batch_size: int) -> list[list[int]]:
    """Indices of the usable examples, length-sorted into batches (less padding)."""
    order = sorted((i for i, e in enumerate(examples) if usable(e)), key=lambda i: (len(examples[i].ids), i))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def _parts(model):
    """(decoder body, output head) of a causal LM (through a peft wrapper), or None when the model
    changes its logits after the head (Gemma's soft-capping) or has no such parts."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(causal, "config", None)
    if cfg is not None and getattr(cfg, "final_logit_softcapping", None):
        return None
    try:
        body, head = causal.get_decoder(), causal.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return (body, head) if body is not None and head is not None else None


def target_logits(model, ids, labels, mask):
    """Logits (float32) at the positions that predict a response token, the targets there and the
    [batch, width - 1] mask of those positions. The output head runs on those positions only: the
    vocabulary projection (49k x 576 in SmolLM2-135M) over the prompt tokens is most of the work
    that would be thrown away, in the forward pass and in training's backward pass alike."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    parts = _parts(model)
    if parts is None:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
    else:
        body, head = parts
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        logits = head(hidden[keep])
    return logits.float(), targets[keep], keep


def _target_logprobs(model, ids, labels, mask):
    """log-softmax rows at the positions that predict a target token, and those targets."""
    import torch

    logits, targets, keep = target_logits(model, ids, labels, mask)
    return torch.log_softmax(logits, dim=-1), targets, keep


def kd_loss(student_logits, teacher_logits):
    """Forward KL(teacher || student) at temperature 1 over the full vocabulary, mean over the
    rows (one row per response token): the distillation loss NVIDIA's Minitron ablations found best
    for recovering a pruned model (arXiv 2407.14679, A.5). Its gradient on the student's logits is
    softmax(student) - softmax(teacher): zero where the student already equals the teacher."""
    import torch

    logq = torch.log_softmax(student_logits.float(), dim=-1)
    logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    return torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="sum") / max(logq.shape[0], 1)


def response_nll(model, examples: list[Example], pad_id: int, batch_size: int = 8, progress=None) -> list[float]:
    """Mean NLL (nats) of each example's response tokens; NaN for an unusable example."""
    import torch

    out = [math.nan] * len(examples)
    device = next(model.parameters()).device
    for chunk in length_batches(examples, batch_size):
        ids, labels, mask = (t.to(device) for t in batch_tensors([examples[i] for i in chunk], pad_id))
        with torch.inference_mode():
            logp, targets, keep = _target_logprobs(model, ids, labels, mask)
            nll = -logp.gather(1, targets[:, None])[:, 0].double()
        rows = keep.nonzero()[:, 0]
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=nll.device).index_add_(0, rows, nll)
        counts = keep.sum(dim=1)
        for r, i in enumerate(chunk):
            out[i] = float(sums[r] / counts[r])
        if progress is not None:
            progress(len(chunk))
    return out


def divergences(logp, logq):
    """(JSD, KL(p || q)) in nats per row of two log-probability tensors [N, V]. JSD is in
    [0, ln 2], 0 for equal rows, never NaN for zero probabilities; KL is inf where q is 0 and p
    is not.

    On a CPU one row at a time: a row's temporaries (a few hundred KB at SmolLM2's 49k vocabulary)
    stay in cache, 8-12x faster than whole-tensor ops on 2 cores of an AMD EPYC with AVX2 only (they ran longer than the model's
    forward pass), and a row's result does not depend on the rows batched with it (a reduction
    over several rows may split a row's sum between threads)."""
    import torch

    n = logp.shape[0]
    jsd = torch.empty(n, dtype=logp.dtype, device=logp.device)
    kl = torch.empty(n, dtype=logp.dtype, device=logp.device)
    step = 1 if logp.device.type == "cpu" else 256
    for s in range(0, n, step):
        jsd[s:s + step], kl[s:s + step] = _divergences(logp[s:s + step], logq[s:s + step])
    return jsd, kl


def _divergences(logp, logq):
    import torch

    p, q = logp.exp(), logq.exp()
    logm = torch.add(p, q).mul_(0.5).clamp_min_(torch.finfo(p.dtype).tiny).log_()
    # p * (log p - log m) is 0 where p is: log p = -inf would give 0 * -inf = NaN, and a floor
    # far below any finite log-probability's (about -104 in fp32, -745 in fp64) keeps it 0
    lp, lq = logp.clamp_min(-1e4), logq.clamp_min(-1e4)
    jsd = ((lp - logm).mul_(p).sum(-1) + (lq - logm).mul_(q).sum(-1)).mul_(0.5).clamp_(0.0, math.log(2))
    kl = torch.where(p > 0, (logp - logq).mul_(p), 0.0).sum(-1).clamp_min_(0.0)
    return jsd, kl


def jsd_from_logprobs(logp, logq):
    """Jensen-Shannon divergence (nats) per row of two log-probability tensors [..., V]."""
    lead = logp.shape[:-1]
    return divergences(logp.reshape(-1, logp.shape[-1]), logq.reshape(-1, logq.shape[-1]))[0].reshape(lead)


def compare(dense, other, examples: list[Example], pad_id: int, batch_size: int = 8, progress=None) -> list[dict]:
    """Per example, teacher-forced on its response tokens: the mean and sum of the per-token JSD
    and KL(dense || other), both models' mean NLL, the flip rate (share of response positions
    where the two models' greedy next tokens differ) and the token count. NaN (with ``status``)
    for an unusable example."""
    import torch

    nan = math.nan
    out = [{"jsd": nan, "jsd_sum": nan, "kl": nan, "nll_dense": nan, "nll_other": nan, "flip": nan, "tokens": 0,
            "status": e.status if not usable(e) else "ok"} for e in examples]
    device = next(dense.parameters()).device
    for chunk in length_batches(examples, batch_size):
        ids, labels, mask = (t.to(device) for t in batch_tensors([examples[i] for i in chunk], pad_id))
        with torch.inference_mode():
            logp, targets, keep = _target_logprobs(dense, ids, labels, mask)
            logq, _, _ = _target_logprobs(other, ids, labels, mask)
            jsd, kl = (t.double() for t in divergences(logp, logq))
            nll_p = -logp.gather(1, targets[:, None])[:, 0].double()
            nll_q = -logq.gather(1, targets[:, None])[:, 0].double()
            agree = (logp.argmax(-1) == logq.argmax(-1)).double()
        rows = keep.nonzero()[:, 0]
        counts = keep.sum(dim=1)

        def per_row(values):
            return torch.zeros(len(chunk), dtype=torch.float64, device=values.device).index_add_(0, rows, values)

        s_jsd, s_kl, s_p, s_q, s_a = per_row(jsd), per_row(kl), per_row(nll_p), per_row(nll_q), per_row(agree)
        for r, i in enumerate(chunk):
            n = int(counts[r])
            out[i].update(jsd=float(s_jsd[r] / n), jsd_sum=float(s_jsd[r]), kl=float(s_kl[r] / n),
                          nll_dense=float(s_p[r] / n), nll_other=float(s_q[r] / n), tokens=n,
                          flip=1.0 - float(s_a[r] / n),
                          status=examples[i].status)
        if progress is not None:
            progress(len(chunk))
    return out
