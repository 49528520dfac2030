"""Compress a causal LM the way users compress the models curate helps recover: unstructured
pruning (Wanda, magnitude), N:M semi-structured pruning, or dropping whole decoder layers.

Written with torch here rather than taken from ``llmcompressor``: that package pins
transformers to <= 5.17 and would replace ours, and Wanda itself is short (Sun et al. 2023):
the score of weight W_ij is |W_ij| * ||X_j||_2, the norm of input feature j over the calibration
tokens, and each output row keeps its highest-scoring weights. Layers are pruned in order and
each layer's input norms are measured on the already-pruned earlier layers, as the reference
does. Magnitude pruning scores |W_ij| alone, per layer. N:M keeps the N best of every M
consecutive inputs of a row (2:4 runs fast on sparse tensor cores). Layer dropping removes the
decoder layers whose output is most like their input (ShortGPT's block influence,
1 - cos(h_in, h_out), averaged over calibration tokens).

Pruned weights are zeros in an ordinary model folder (``save_pretrained``), with ``card.json``
and ``README.md`` saying what was done and what it cost in held-out loss.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field

from curate.errors import CurateError

log = logging.getLogger("curate")
METHODS = ("wanda", "magnitude", "layer_drop")
PRUNED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class CompressError(CurateError):
    pass


@dataclass(frozen=True)
class CompressSettings:
    method: str = "wanda"
    sparsity: float = 0.5  # unstructured share of weights set to zero (wanda, magnitude)
    nm: tuple[int, int] | None = None  # (N, M): keep N of every M inputs instead of a share
    layers: int = 0  # layer_drop: how many decoder layers to remove
    calibration_rows: int = 32
    cutoff: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise CompressError(f"compress: method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method != "layer_drop" and self.nm is None and not 0 < self.sparsity < 1:
            raise CompressError(f"compress: sparsity {self.sparsity} must be between 0 and 1")
        if self.nm is not None and not 0 < self.nm[0] < self.nm[1]:
            raise CompressError(f"compress: N:M {self.nm} must have 0 < N < M")
        if self.method == "layer_drop" and self.layers < 1:
            raise CompressError("compress: layer_drop needs layers >= 1")


@dataclass
class Card:
    method: str
    settings: dict
    base_model: str
    calibration: dict
    layers: dict = field(default_factory=dict)  # linear name -> {"target": s, "achieved": s}
    dropped_layers: list = field(default_factory=list)
    achieved_sparsity: float = 0.0  # over the pruned linear layers
    heldout: dict = field(default_factory=dict)  # {"rows", "nll_dense", "nll_compressed"}


def decoder_layers(model):
    """The model's list of decoder blocks (Llama-style ``model.model.layers``)."""
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise CompressError("compress: only decoder-only models with model.layers (Llama, Qwen, Mistral...) are supported")
    return layers


def prunable(layer) -> dict:
    """{name: nn.Linear} of a decoder block's projections."""
    import torch

    return {name: mod for name, mod in layer.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PRUNED}


def mask_rows(score, sparsity: float):
    """Boolean keep-mask: in each row of ``score`` the ``1 - sparsity`` share with the highest score."""
    import torch

    n_drop = int(score.shape[1] * sparsity)
    keep = torch.ones_like(score, dtype=torch.bool)
    if n_drop:
        idx = torch.topk(score, n_drop, dim=1, largest=False).indices
        keep.scatter_(1, idx, False)
    return keep


def mask_layer(score, sparsity: float):
    """Keep-mask over the whole matrix (magnitude pruning's per-layer rule)."""
    import torch

    n_drop = int(score.numel() * sparsity)
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if n_drop:
        keep[torch.topk(score.flatten(), n_drop, largest=False).indices] = False
    return keep.view_as(score)


def mask_nm(score, n: int, m: int):
    """Keep-mask with the ``n`` highest of every ``m`` consecutive inputs of each row."""
    import torch

    rows, cols = score.shape
    if cols % m:
        raise CompressError(f"compress: N:M needs the input size ({cols}) to be a multiple of M ({m})")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return keep.reshape(rows, cols)


class _Stop(Exception):
    """Raised by a hook to end a calibration forward pass once the layer of interest has run."""


def _calibration_batch(examples, pad_id: int):
    from curate.lm_data import batch_tensors

    ids, _, mask = batch_tensors(examples, pad_id)
    return ids, mask


def _layer_inputs(model, ids, mask):
    """(hidden states entering the first decoder layer, the keyword arguments the model passes to
    every layer: attention mask, rotary position embeddings...), from one partial forward pass."""
    import torch

    seen = {}

    def catch(_mod, args, kwargs):
        seen["args"], seen["kwargs"] = args, dict(kwargs)
        raise _Stop

    hook = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        hook.remove()
    kwargs = seen["kwargs"]
    hidden = seen["args"][0] if seen["args"] else kwargs.pop("hidden_states")
    return hidden, kwargs


def _run_layer(layer, hidden, kwargs):
    import torch

    with torch.inference_mode():
        out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _input_norms(layer, hidden, kwargs, mask) -> dict:
    """||X_j||_2 over the calibration tokens (padding excluded) for each projection of ``layer``,
    from running the layer on ``hidden``."""
    import torch

    linears = prunable(layer)
    sq = {name: torch.zeros(mod.in_features, dtype=torch.float64) for name, mod in linears.items()}
    keep = mask.bool()

    def collect(name):
        def hook(_mod, args):
            x = args[0]
            x = x[keep] if x.shape[:2] == keep.shape else x.reshape(-1, x.shape[-1])
            sq[name] += (x.double() ** 2).sum(dim=0).cpu()
        return hook

    hooks = [mod.register_forward_pre_hook(collect(name)) for name, mod in linears.items()]
    try:
        _run_layer(layer, hidden, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {name: s.sqrt().float() for name, s in sq.items()}


def prune(model, examples, s: CompressSettings, pad_id: int, progress=None) -> tuple[dict, float]:
    """Prune ``model`` in place; returns ({linear name: {"target", "achieved"}}, achieved share).
    Layer by layer, as Wanda's reference: the calibration hidden states enter layer i after the
    pruned layers before it (one pass through the model in all, not one per layer).
    ``progress(layers done, layers)`` after each decoder layer."""
    import torch

    ids, mask = _calibration_batch(examples, pad_id)
    report, zeros, total = {}, 0, 0
    layers = decoder_layers(model)
    target = 1 - s.nm[0] / s.nm[1] if s.nm else s.sparsity
    hidden, kwargs = _layer_inputs(model, ids, mask) if s.method == "wanda" else (None, None)
    for i, layer in enumerate(layers):
        norms = _input_norms(layer, hidden, kwargs, mask) if s.method == "wanda" else None
        for name, mod in prunable(layer).items():
            w = mod.weight.data
            score = w.abs().float()
            if norms is not None:
                score = score * norms[name][None, :].to(score.device)
            if s.nm:
                keep = mask_nm(score, *s.nm)
            elif s.method == "wanda":
                keep = mask_rows(score, s.sparsity)
            else:
                keep = mask_layer(score, s.sparsity)
            with torch.no_grad():
                w.mul_(keep.to(w.dtype))
            z = int((w == 0).sum())
            report[f"layers.{i}.{name}"] = {"target": round(target, 4), "achieved": round(z / w.numel(), 4)}
            zeros, total = zeros + z, total + w.numel()
        if hidden is not None:
            hidden = _run_layer(layer, hidden, kwargs)  # the pruned layer's output feeds the next
        if progress is not None:
            progress(i + 1, len(layers))
    return report, zeros / max(total, 1)


def block_influence(model, examples, pad_id: int) -> list[float]:
    """1 - mean cosine(h_in, h_out) of each decoder layer over the calibration tokens."""
    import torch

    ids, mask = _calibration_batch(examples, pad_id)
    with torch.inference_mode():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    keep = mask.bool()
    out = []
    for i in range(len(hidden) - 1):
        a, b = hidden[i][keep].float(), hidden[i + 1][keep].float()
        out.append(float(1 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()))
    return out


def drop_layers(model, examples, n: int, pad_id: int) -> list[int]:
    """Remove the ``n`` layers of lowest block influence (never all); returns their indices."""
    import torch

    layers = decoder_layers(model)
    if n >= len(layers):
        raise CompressError(f"compress: cannot drop {n} of {len(layers)} layers")
    bi = block_influence(model, examples, pad_id)
    drop = sorted(sorted(range(len(bi)), key=lambda i: (bi[i], i))[:n])
    kept = [layer for i, layer in enumerate(layers) if i not in drop]
    model.model.layers = torch.nn.ModuleList(kept)
    for new_idx, layer in enumerate(kept):  # attention caches are indexed by layer_idx
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i not in drop]
    return drop


def split_rows(rows: list[dict], n_calibration: int, n_heldout: int, seed: int) -> tuple[list, list]:
    """A seeded calibration set and a disjoint held-out set (by a hash rank, order-independent)."""
    from curate.cluster import sample_rank

    ranked = sorted(rows, key=lambda r: sample_rank(seed, r["id"]))
    return ranked[:n_calibration], ranked[n_calibration:n_calibration + n_heldout]


def compress(model_name: str | None, rows: list[dict], out: str, s: CompressSettings, n_heldout: int = 40,
             progress=None) -> Card:
    """Load, compress, measure and save (see the module docstring); returns the card."""
    import torch

    from curate import lm_data
    from curate.models import load_causal_lm

    torch.manual_seed(s.seed)
    model, tok = load_causal_lm(model_name, "cpu", "float32")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    calib_rows, held_rows = split_rows(rows, s.calibration_rows, n_heldout, s.seed)
    calib = [e for e in (lm_data.encode(r, tok, s.cutoff) for r in calib_rows) if lm_data.usable(e)]
    held = [lm_data.encode(r, tok, s.cutoff) for r in held_rows]
    if not calib:
        raise CompressError("compress: no usable calibration rows (empty responses or prompts over the cutoff)")
    dense_nll = lm_data.response_nll(model, held, pad)
    card = Card(method=s.method if not s.nm else f"{s.method} {s.nm[0]}:{s.nm[1]}", settings=asdict(s),
                base_model=model_name or "SmolLM2-135M-Instruct",
                calibration={"rows": len(calib), "ids": [r["id"] for r in calib_rows][:len(calib)],
                             "tokens": sum(len(e.ids) for e in calib), "seed": s.seed})
    if s.method == "layer_drop":
        card.dropped_layers = drop_layers(model, calib, s.layers, pad)
    else:
        card.layers, card.achieved_sparsity = prune(model, calib, s, pad, progress)
    comp_nll = lm_data.response_nll(model, held, pad)
    finite = [(a, b) for a, b in zip(dense_nll, comp_nll) if math.isfinite(a) and math.isfinite(b)]
    card.heldout = {"rows": len(finite), "ids": [r["id"] for r in held_rows],
                    "nll_dense": sum(a for a, _ in finite) / max(len(finite), 1),
                    "nll_compressed": sum(b for _, b in finite) / max(len(finite), 1)}
    save(model, tok, out, card)
    return card


def save(model, tok, out: str, card: Card) -> None:
    tmp = out.rstrip("/") + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "card.json"), "w", encoding="utf-8") as fh:
        json.dump(asdict(card), fh, indent=2)
        fh.write("\n")
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(card_text(card))
    if os.path.exists(out):
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)


def card_text(card: Card) -> str:
    h = card.heldout
    lines = [f"# {card.base_model}, compressed: {card.method}", "",
             f"Made by `curate compress` from {card.base_model}.", "",
             f"- method: {card.method}; settings: `{json.dumps(card.settings)}`",
             f"- calibration: {card.calibration['rows']} rows, {card.calibration['tokens']} tokens, "
             f"seed {card.calibration['seed']}"]
    if card.dropped_layers:
        lines.append(f"- dropped decoder layers: {card.dropped_layers}")
    else:
        lines.append(f"- achieved sparsity over the pruned linear layers: {card.achieved_sparsity:.4f}")
    lines.append(f"- held-out response-token NLL on {h['rows']} rows: dense {h['nll_dense']:.4f}, "
                 f"compressed {h['nll_compressed']:.4f}")
    if card.layers:
        lines += ["", "| layer | target | achieved |", "|---|---|---|"]
        lines += [f"| {k} | {v['target']} | {v['achieved']} |" for k, v in card.layers.items()]
    return "\n".join(lines) + "\n"
