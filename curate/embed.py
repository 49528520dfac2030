"""Sentence embeddings: which text, loading the model, encoding a batch. No Beam.

Vectors are float32 and L2-normalized (cosine = dot product). ``max_seq_length``
is pinned (default 256, the model card's value) and recorded in the manifest:
longer texts are truncated identically on every device.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from curate.models import resolve_embedder

TEXT_MODES = ("whole", "instruction", "response")


def embed_text(record: dict, mode: str = "whole") -> str:
    if mode == "instruction":
        return record["prompt"]
    if mode == "response":
        return record["response"]
    return record["prompt"] + "\n" + record["response"]


def load_embedder(model: str | None, device: str = "cpu", dtype: str = "float32", max_seq_length: int = 256,
                  linear: str = "torch"):
    """A SentenceTransformer on ``device`` in ``dtype``, loaded from a local path; ``linear="onednn"``
    runs its float32 CPU linear layers on oneDNN (``curate.onednn``; vectors within 3e-7 of torch's
    kernel; which of the two is faster depends on the CPU, see ``curate.kernel_choice``)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a progress bar per worker load is noise in a pipeline log
    st = SentenceTransformer(resolve_embedder(model), device=device)
    if dtype != "float32":
        st = st.to(getattr(torch, dtype))
    st.max_seq_length = max_seq_length
    st.eval()
    if linear == "onednn":
        from curate.onednn import use_onednn

        use_onednn(st)
    return st


CHUNK = 16  # texts per forward pass: sentence-transformers sorts a call's texts by length, so small
# chunks waste little padding (measured 1.85x faster than chunks of 64 on ~130-token rows, CPU)


def encode(model, texts: list[str]) -> np.ndarray:
    """(len(texts) x dim) float32 unit vectors for a batch (length-sorted chunks of CHUNK inside)."""
    import torch

    with torch.inference_mode():
        out = model.encode(texts, batch_size=CHUNK, convert_to_tensor=True,
                           normalize_embeddings=False, show_progress_bar=False)
    vecs = out.float().cpu().numpy().astype(np.float32, copy=False)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs / np.maximum(norms, 1e-12)


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def embed_key(model: str, max_seq_length: int, dtype: str, text_mode: str) -> str:
    """What a stored vector depends on besides its text: reuse only when this matches."""
    spec = json.dumps({"model": model, "max_seq_length": max_seq_length, "dtype": dtype, "text": text_mode},
                      sort_keys=True)
    return hashlib.blake2b(spec.encode(), digest_size=8).hexdigest()
