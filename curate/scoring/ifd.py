"""IFD (Cherry LLM / Superfiltering) and reversed IFD (Selective Reflection-Tuning) with a weak LM.

Pure torch + transformers, no Beam. Definitions (methods.md §1.2, §3):

- s(A|Q): mean NLL of the response tokens after the templated prompt; s(A): mean NLL
  of the *same* response tokens after only the start token. ``ifd_loss = s(A|Q)/s(A)``
  (Cherry's ratio, the default ranking key), ``ifd_ppl = exp(s(A|Q) - s(A))``
  (Superfiltering's perplexity ratio).
- r-IFD: the instruction's tokens after the reverse prompt (which contains the
  response) vs after only the start token; ``rifd = exp(s(Q|A) - s(Q))`` (the
  reference's perplexity ratio), ``rifd_loss`` the loss ratio.

Token alignment: the target text (response, or instruction for r-IFD) is tokenized
once, without special tokens, and its ids are appended to each prefix, so both
branches score exactly the same token ids (asserted). The text is never searched
for. The prefix is the start token (the tokenizer's BOS, else its EOS as the
documented stand-in, as GPT-2's ``<|endoftext|>``) followed by the templated prompt.
``superfiltering_compat`` reproduces the reference's direct branch: the target alone,
no start token, so its first token is not scored (n-1 tokens).

Truncation (``max_length`` is required): a prefix that leaves fewer than
``min_target_tokens`` positions gives NaN with ``prompt_truncated``; otherwise the
target is cut from the right to fit, identically in both branches, with status
``response_truncated`` (scores still computed). Empty targets give ``empty_response``;
a failed batch gives ``error``. Undefined scores are NaN, never 0.

Batching: pairs are sorted by length into forward batches bounded in rows and padded tokens,
right-padded (causal attention keeps padding out of every real token's context), and only the
hidden states that predict a target token go through the vocabulary projection, one
vocabulary slice at a time (:func:`target_nlls`).

CPU paths measured and the choice (``python -m benchmarks ifd``; 2 cores of an AMD EPYC with AVX-512
and AVX512-BF16): float32 with the faster of torch's and oneDNN's kernel (``curate.kernel_choice``
picks it per CPU) scores IFD + r-IFD at 1.3-1.5x the one-row reference loop; on a newer AVX-512 EPYC
(oneDNN 417 GFLOP/s, torch 186) 2.2x, and 1.36x there with oneDNN, MKL and torch capped at AVX2 (217
vs 187). Where the kernels are close that is near float32's ceiling: the reference is GEMM-bound
too, the stage skips only ~8% of its FLOPs, and the stage's GEMMs run at 57-86% of the kernel's rate
(attention, norms and the vocabulary slices take the rest). bf16 runs 1.4-1.5x the float32 stage
where the CPU has native bf16 (Spearman 1.0 of ``ifd_loss``, 0.99 of ``rifd``) and ~0.25x where it
has not, so it is a setting (``dtype: bfloat16``), not the default. Int8 matmuls (per-token
activation and per-channel weight scales through ``torch._int_mm``, exact int32 sums) ran only 1.2x
the float32 stage end to end, the quantization and the float32 vocabulary projection eating the GEMM
gain, at a Spearman of 0.96-0.99: not kept. llama.cpp on the packaged Q4_1 GGUF
(``llama-cpp-python``, the same token ids, one sequence at a time with every position's logits)
agreed well (24 real rows: Spearman 0.998 of ``ifd_loss``, 0.999 of ``rifd``; NLLs within 0.07) but
ran at 0.47x the float32 stage (0.49 vs 1.05 rows/s): not kept. ONNX Runtime running the body
(``benchmarks ifd_onnx``, 2 AVX2 EPYC cores): float32 1.01-1.18x the stage with the same NLLs, not
worth a second copy of the weights and an export per model; its dynamic int8 1.58x at a Spearman of
0.956: not kept. ``torch.compile`` of the body (inductor, dynamic shapes; ``benchmarks ifd_compile``,
2 cores of an Intel Xeon with AVX-512, 16 rows): 0.94x the stage, 1.15x with oneDNN and MKL capped
at AVX2, after 47 s of compiling, same NLLs within 3e-6: not kept (the body alone, 5 fixed batch
shapes, ran 1.12x and 1.16x eager).

Shared prefixes: with template ``none`` and no input the prompt starts with the instruction's own
tokens, so s(Q) is read from the A|Q pass (``riders`` of :func:`mean_nlls`) instead of a pass of
its own: on the benchmark's 400 real rows that pass was 19,135 of the stage's 198,092 tokens
(9.7%); the other branches share no prefix but the reverse prompt's fixed 19-token header (3.8%,
it would need a KV cache per batch: not done). So sharing is worth at most ~1.1x, not 2x.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curate.columns import Column, StageColumns

_NLL = "mean NLL of"
# null on rows not scored, NaN (with the status) where a score is undefined
COLUMNS = StageColumns("score.ifd", ("score.ifd.enabled",), (
    Column("ifd_nll_cond", pa.float64(), f"{_NLL} the response tokens after the templated prompt, s(A|Q)",
           status="ifd_status"),
    Column("ifd_nll_direct", pa.float64(), f"{_NLL} the same response tokens after only the start token, s(A)",
           status="ifd_status"),
    Column("ifd_tokens", pa.int32(), "response tokens scored in the conditional branch"),
    Column("ifd_tokens_direct", pa.int32(),
           "response tokens scored in the direct branch (one fewer in superfiltering_compat)"),
    Column("ifd_loss", pa.float64(), "s(A|Q) / s(A), Cherry LLM's IFD (the default ranking key); NaN when undefined",
           status="ifd_status", rank=True),
    Column("ifd_ppl", pa.float64(), "exp(s(A|Q) - s(A)), Superfiltering's perplexity-ratio IFD; NaN when undefined",
           status="ifd_status", rank=True),
    Column("ifd_status", pa.string(),
           "ok, empty_response, prompt_truncated, response_truncated or error; null when not scored"),
    Column("rifd_nll_cond", pa.float64(),
           f"{_NLL} the instruction after the reverse prompt holding the response, s(Q|A)", status="rifd_status"),
    Column("rifd_nll_direct", pa.float64(), f"{_NLL} the instruction after only the start token, s(Q)",
           status="rifd_status"),
    Column("rifd_loss", pa.float64(), "s(Q|A) / s(Q)", status="rifd_status"),
    Column("rifd", pa.float64(), "exp(s(Q|A) - s(Q)), reversed IFD of Selective Reflection-Tuning; NaN when undefined",
           status="rifd_status", rank=True),
    Column("rifd_status", pa.string(), "status of the r-IFD scores, as ifd_status"),
))

TEMPLATES = ("none", "alpaca", "chat")
STATUSES = ("ok", "empty_response", "prompt_truncated", "response_truncated", "error")

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
REVERSE_REQUEST = ("Below is the response to an instruction, please guess the corresponding instruction for the "
                   "given response.\n{response}\nGenerate the instruction for the above response.")


def render(instruction: str, extra: str, template: str, tokenizer=None) -> str:
    """The prompt text placed before the response."""
    if template == "none":  # Superfiltering: "{instruction}\n{input}\n"
        return f"{instruction}\n{extra}\n" if extra else f"{instruction}\n"
    if template == "alpaca":
        return (ALPACA_WITH_INPUT.format(instruction=instruction, input=extra) if extra
                else ALPACA_NO_INPUT.format(instruction=instruction))
    if template == "chat":
        content = f"{instruction}\n\n{extra}" if extra else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    raise ValueError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")


def start_ids(tokenizer) -> list[int]:
    tok_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [] if tok_id is None else [int(tok_id)]


@dataclass
class Pair:
    """One scoring: ``prefix`` ids then ``target`` ids; the target's tokens are scored."""

    prefix: list[int]
    target: list[int]
    status: str = "ok"
    skip_first: bool = False  # compat: the first target token has no context and is not scored

    @property
    def ids(self) -> list[int]:
        return self.prefix + self.target


def make_pair(prefix: list[int], target: list[int], max_length: int, min_target_tokens: int = 1,
              skip_first: bool = False) -> Pair:
    if not target:
        return Pair(prefix, [], "empty_response", skip_first)
    room = max_length - len(prefix)
    if room < min_target_tokens:
        return Pair(prefix, [], "prompt_truncated", skip_first)
    if len(target) > room:
        return Pair(prefix, target[:room], "response_truncated", skip_first)
    return Pair(prefix, target, "ok", skip_first)


def scored_count(pair: Pair) -> int:
    return max(len(pair.target) - (1 if pair.skip_first else 0), 0)


def forward_batches(lengths: list[int], batch_tokens: int | None, max_rows: int) -> list[list[int]]:
    """Indices grouped for forward passes: sorted by length, each batch at most ``max_rows`` rows
    and ``rows x longest`` at most ``batch_tokens`` (None: no token bound; one row always fits),
    so padding stays small and every batch's tensors stay about the same size whatever the lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else []
        if last and len(last) < max_rows and (batch_tokens is None or (len(last) + 1) * lengths[i] <= batch_tokens):
            last.append(i)
        else:
            batches.append([i])
    return batches


def _projection(model):
    """(weight, linear function) of the output projection when logits are just ``hidden @ W.T``
    (no bias, scale or soft-capping), else None and the scorer falls back to the model's head."""
    import torch

    from curate.onednn import linear_of

    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    if (not isinstance(head, torch.nn.Linear) or head.bias is not None
            or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None)):
        return None
    return head.weight, linear_of(head)


def target_nlls(hidden, weight, targets, linear=None, slice_elements: int | None = None):
    """NLL of each target under ``softmax(linear(hidden, weight))``, one vocabulary slice at a time.

    Why: the projection is about a fifth of a small LM's FLOPs, and as one [tokens x vocab]
    matrix (hundreds of MB) it runs far below the matmul peak on a CPU (fresh pages, then a
    memory-bound log-softmax). Slices of the vocabulary with a running max and sum of exp
    (online logsumexp) keep each slice in cache. On 2 cores, the projection of 50 real rows'
    batches took 9.2 s as one matrix + ``cross_entropy``, 6.1 s sliced, 3.3 s sliced on oneDNN;
    per-token NLLs agree within ~4e-5 (fp32). The target's logit is read from its slice, so it
    is the same number the logsumexp saw.
    """
    import torch

    linear = linear or torch.nn.functional.linear
    m = hidden.shape[0]
    budget = slice_elements or ((1 << 21) if hidden.device.type == "cpu" else (1 << 25))  # ~8 MB on CPU
    step = int(min(max(budget // max(m, 1), 256), weight.shape[0]))
    rows = torch.arange(m, device=hidden.device)
    run_max = torch.full((m,), -math.inf, device=hidden.device)
    run_sum = torch.zeros(m, device=hidden.device)
    picked = torch.zeros(m, device=hidden.device)
    for v in range(0, weight.shape[0], step):
        logits = linear(hidden, weight[v:v + step]).float()  # [m, slice]; bf16/fp16 logits in fp32
        here = (targets >= v) & (targets < v + logits.shape[1])
        picked[here] = logits[rows[here], targets[here] - v]
        new_max = torch.maximum(run_max, logits.amax(1))
        run_sum.mul_((run_max - new_max).exp_())
        run_sum.add_(logits.sub_(new_max[:, None]).exp_().sum(1))
        run_max = new_max
    return run_max + run_sum.log() - picked


def mean_nlls(model, pairs: list[Pair], batch_size: int = 16, pad_id: int = 0,
              batch_tokens: int | None = None, on_batch=None, riders: dict[int, int] | None = None) -> list[float]:
    """Mean NLL of each pair's scored target tokens (NaN where nothing can be scored).

    Forward batches come from :func:`forward_batches` (``batch_size`` rows at most, and
    ``batch_tokens`` padded tokens at most when given). Rows are right-padded and run with no
    attention mask: under causal attention a real token only sees the tokens before it, never
    the padding after it, so the scores are those of each row alone. Only the hidden states that
    predict a target token go through the vocabulary projection. ``on_batch(n)``, when given,
    is called after each forward batch with the number of pairs it scored (progress).

    ``riders`` ({pair index: host pair index}) share a forward pass: a rider whose ids are the
    start of its host's ids is scored from its host's hidden states (under causal attention its
    tokens see the same context either way), so it needs no pass of its own; one whose host is
    not run, or does not start with it, runs alone.
    """
    import torch

    out = [math.nan] * len(pairs)
    live = [i for i, p in enumerate(pairs) if p.status in ("ok", "response_truncated") and scored_count(p) > 0]
    for i in live:
        if not pairs[i].prefix and not pairs[i].skip_first:
            raise ValueError("a pair with no prefix must skip its first target token (nothing predicts it)")
    carried, riding = _carried(pairs, set(live), riders or {})
    live = [i for i in live if i not in riding]
    projection = _projection(model)
    head = model.get_output_embeddings()
    body = model.base_model
    device = next(model.parameters()).device
    lengths = [len(pairs[i].ids) for i in live]
    for batch in forward_batches(lengths, batch_tokens, batch_size):
        chunk = [live[k] for k in batch]
        width = max(len(pairs[i].ids) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        rows, cols, targets, slots, scored = [], [], [], [], []  # slots: which pair each target token is for
        for r, i in enumerate(chunk):
            ids[r, :len(pairs[i].ids)] = torch.tensor(pairs[i].ids, dtype=torch.long)
            for j in [i] + carried.get(i, []):
                p = pairs[j]
                first, end = len(p.prefix) + (1 if p.skip_first else 0), len(p.prefix) + len(p.target)
                rows += [r] * (end - first)
                cols += range(first - 1, end - 1)  # hidden state at t-1 predicts token t
                targets += p.ids[first:end]
                slots += [len(scored)] * (end - first)
                scored.append(j)
        with torch.inference_mode():
            hidden = body(input_ids=ids.to(device)).last_hidden_state
            picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
            target_ids = torch.tensor(targets, device=device)
            if projection is not None:
                nll = target_nlls(picked, projection[0], target_ids, projection[1])
            else:
                nll = torch.nn.functional.cross_entropy(head(picked).float(), target_ids, reduction="none")
            nll = nll.double().cpu().numpy()
        sums = np.bincount(slots, weights=nll, minlength=len(scored))
        counts = np.bincount(slots, minlength=len(scored))
        for k, j in enumerate(scored):
            out[j] = float(sums[k] / counts[k])
        if on_batch is not None:
            on_batch(len(scored))
    return out


def _carried(pairs: list[Pair], live: set[int], riders: dict[int, int]) -> tuple[dict[int, list[int]], set[int]]:
    """({host: the riders it carries}, the carried riders): only a live rider whose ids start its
    live host's ids, and never a chain (a rider carries nothing, a host rides nothing)."""
    carried: dict[int, list[int]] = {}
    riding: set[int] = set()
    for j, h in sorted(riders.items()):
        if (j in live and h in live and j != h and h not in riding and j not in carried
                and pairs[h].ids[:len(pairs[j].ids)] == pairs[j].ids):
            carried.setdefault(h, []).append(j)
            riding.add(j)
    return carried, riding


def ratios(nll_cond: float, nll_direct: float) -> tuple[float, float]:
    """(loss ratio, perplexity ratio); NaN when undefined (a NaN input, or a zero direct loss)."""
    if not (math.isfinite(nll_cond) and math.isfinite(nll_direct)) or nll_direct == 0:
        return math.nan, math.nan
    return nll_cond / nll_direct, math.exp(nll_cond - nll_direct)


@dataclass(frozen=True)
class IFDSettings:
    max_length: int
    template: str = "none"
    superfiltering_compat: bool = False
    batch_size: int = 16  # rows per forward pass, at most
    batch_tokens: int | None = None  # padded tokens per forward pass, at most (None: no token limit)
    min_target_tokens: int = 1


def pairs_for(rows: list[dict], tokenizer, s: IFDSettings) -> tuple[list[Pair], list[Pair], list[Pair], list[Pair]]:
    """(A|Q, A, Q|A-reverse, Q) pairs for rows with ``instruction``, ``input``, ``output``."""
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] if text else []  # noqa: E731
    start = start_ids(tokenizer)
    cond, direct, rcond, rdirect = [], [], [], []
    for r in rows:
        instruction, extra, response = r["instruction"], r.get("input") or "", r["output"]
        answer = enc(response)
        question = enc(instruction + extra)  # r-IFD scores the raw instruction + input, as the reference
        cond.append(make_pair(start + enc(render(instruction, extra, s.template, tokenizer)), answer,
                              s.max_length, s.min_target_tokens))
        if s.superfiltering_compat:
            direct.append(make_pair([], answer, s.max_length, s.min_target_tokens + 1, skip_first=True))
        else:
            direct.append(make_pair(start, answer, s.max_length, s.min_target_tokens + (not start), skip_first=not start))
        reverse = render(REVERSE_REQUEST.format(response=response), "", s.template, tokenizer)
        rcond.append(make_pair(start + enc(reverse), question, s.max_length, s.min_target_tokens))
        rdirect.append(make_pair(start, question, s.max_length, s.min_target_tokens + (not start), skip_first=not start))
    # both branches must score the same tokens (compat: by design one fewer in the direct branch)
    for c, d in zip(cond, direct):
        if c.status in ("ok", "response_truncated") and d.status in ("ok", "response_truncated"):
            n = min(len(c.target), len(d.target))
            c.target, d.target = c.target[:n], d.target[:n]
            if c.target != d.target:
                raise AssertionError("conditional and direct branches score different tokens")
    return cond, direct, rcond, rdirect


def _status(a: Pair, b: Pair) -> str:
    for status in ("error", "empty_response", "prompt_truncated", "response_truncated"):
        if status in (a.status, b.status):
            return status
    return "ok"


def score_rows(model, tokenizer, rows: list[dict], s: IFDSettings, progress=None) -> list[dict]:
    """IFD and r-IFD columns for each row (see the module docstring). ``progress(rows)``, when
    given, hears of the work done after each forward batch, in rows (four pairs a row)."""
    cond, direct, rcond, rdirect = pairs_for(rows, tokenizer, s)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    on_batch = None if progress is None else (lambda n: progress(n / 4))
    try:
        # all four branches in one length sort: fewer, fuller batches; the instruction alone
        # rides in the pass of the prompt it starts (template "none" without an input)
        n = len(rows)
        flat = mean_nlls(model, cond + direct + rcond + rdirect, s.batch_size, pad, s.batch_tokens, on_batch,
                         riders={3 * n + i: i for i in range(n)})
        nll = [flat[k * n:(k + 1) * n] for k in range(4)]
        failed = False
    except Exception:  # noqa: BLE001 - a failed batch is a status, never a crash or a 0
        nll, failed = [[math.nan] * len(rows)] * 4, True
    out = []
    for i in range(len(rows)):
        c, d, rc, rd = nll[0][i], nll[1][i], nll[2][i], nll[3][i]
        ifd_loss, ifd_ppl = ratios(c, d)
        rifd_loss, rifd = ratios(rc, rd)
        status = "error" if failed else _status(cond[i], direct[i])
        rstatus = "error" if failed else _status(rcond[i], rdirect[i])
        if status not in ("ok", "response_truncated"):
            ifd_loss = ifd_ppl = math.nan
        if rstatus not in ("ok", "response_truncated"):
            rifd_loss = rifd = math.nan
        out.append({"ifd_nll_cond": c, "ifd_nll_direct": d, "ifd_tokens": scored_count(cond[i]),
                    "ifd_tokens_direct": scored_count(direct[i]), "ifd_loss": ifd_loss, "ifd_ppl": ifd_ppl,
                    "ifd_status": status, "rifd_nll_cond": rc, "rifd_nll_direct": rd, "rifd_loss": rifd_loss,
                    "rifd": rifd, "rifd_status": rstatus})
    return out
