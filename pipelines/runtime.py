"""Choices made at run time on this machine, before the graph is built: model paths, devices,
dtypes, linear kernels, cache folders and the cache shards already there. Everything that can
fail for a reason the user can fix (a missing model package, no GPU) fails here, before any
output is written. The result goes to the manifest as it is."""
from __future__ import annotations

import glob
import logging
import os

from curate import cache_store
from curate.settings import Job

log = logging.getLogger("curate")


def beam_flags(options: dict, extra: list[str] | None = None) -> list[str]:
    """Job-file Beam options as command-line flags; an option named in ``extra`` (the CLI) wins."""
    extra = list(extra or [])
    named = {f.lstrip("-").split("=", 1)[0] for f in extra}
    flags = []
    for key, value in options.items():
        if key in named:
            continue
        if value is True:
            flags.append(f"--{key}")
        elif value is False or value is None:
            continue
        else:
            flags.append(f"--{key}={value}")
    return flags + extra


def reuse_check(previous: str, key: str) -> dict:
    """Whether a previous run's embeddings/ can be reused: same embed key (model, length, dtype, text)."""
    import pyarrow.parquet as pq

    folder = previous if os.path.basename(os.path.normpath(previous)) == "embeddings" else \
        os.path.join(previous, "embeddings")
    files = sorted(glob.glob(os.path.join(folder, "*.parquet")))
    if not files:
        log.warning("embed.reuse: no embeddings/ Parquet under %s; embedding everything", previous)
        return {"from": previous, "used": False, "why": "no embeddings found"}
    stored = (pq.read_schema(files[0]).metadata or {}).get(b"curate.embed_key", b"").decode()
    if stored != key:
        log.warning("embed.reuse: %s was made with other settings (key %s, now %s); embedding everything",
                    previous, stored or "none", key)
        return {"from": previous, "used": False, "why": "model, max_seq_length, dtype or text differ"}
    return {"from": os.path.abspath(folder), "used": True, "files": files}


def _cache(enabled: bool, cache_dir: str | None, kind: str, key: str) -> tuple[str | None, list[str]]:
    """(folder, shards already there) of a stage's cache, or (None, []) when caching is off."""
    from curate.models import cache_root

    if not enabled:
        return None, []
    folder = os.path.join(cache_dir or os.path.join(cache_root(), kind), key)
    return folder, cache_store.files(folder)


def resolve_runtime(cfg: Job) -> dict:
    """``{stage: choices}`` for the stages that are on (see the module docstring)."""
    from curate import device, kernel_choice, models
    from pipelines.score import default_batch_tokens, settings_key

    rt = {}
    e = cfg.embed
    if e.enabled:
        from curate.embed import embed_key

        path = models.resolve_embedder(e.model)
        dev = device.torch_device(e.device)
        dtype = device.torch_dtype_name(dev, e.dtype)
        key = embed_key(e.model, e.max_seq_length, dtype, e.text)
        folder, files = _cache(e.cache, e.cache_dir, "embeddings", key)
        dim = models.embedding_dim(path)  # fails here, with a clear message, for a model that is not there
        linear = kernel_choice.choose(lambda: kernel_choice.meta_shapes(path, "encoder"), e.cpu_linear, dev, dtype)
        rt["embed"] = {"model": e.model, "path": path, "device": dev, "dtype": dtype,
                       "linear": linear.kernel, "linear_choice": linear.as_dict(), "dim": dim,
                       "key": key, "cache": folder, "cache_files": files}
        if e.reuse:
            reuse = reuse_check(e.reuse, key)
            rt["embed"]["reuse"] = {k: v for k, v in reuse.items() if k != "files"}
            rt["embed"]["cache_files"] = files + reuse.get("files", [])
    if cfg.cluster.enabled:
        rt["cluster"] = {"faiss_gpu": device.faiss_use_gpu(cfg.cluster.device)}
    s = cfg.score.ifd
    if s.enabled:
        models.check_weak_lm(s.model)  # fail now, not in a worker
        dev = device.torch_device(s.device)
        dtype = device.torch_dtype_name(dev, s.dtype, gpu_default="bfloat16")
        folder, files = _cache(s.cache, s.cache_dir, "scores", settings_key(s, dtype))
        linear = kernel_choice.choose(lambda: kernel_choice.meta_shapes(models.weak_lm_folder(s.model)),
                                      s.cpu_linear, dev, dtype)
        rt["score"] = {"model": s.model, "device": dev, "dtype": dtype,
                       "linear": linear.kernel, "linear_choice": linear.as_dict(),
                       "batch_tokens": s.batch_tokens or default_batch_tokens(dev),
                       "cache": folder, "cache_files": files}
    r = cfg.score.rds
    if r.enabled:
        from pipelines.rds import settings_key as rds_key

        models.check_weak_lm(r.model)
        dev = device.torch_device(r.device)
        dtype = device.torch_dtype_name(dev, r.dtype, gpu_default="bfloat16")
        folder, files = _cache(r.cache, r.cache_dir, "rds", rds_key(r, dtype))
        linear = kernel_choice.choose(lambda: kernel_choice.meta_shapes(models.weak_lm_folder(r.model)),
                                      r.cpu_linear, dev, dtype)
        rt["rds"] = {"model": r.model, "device": dev, "dtype": dtype, "linear": linear.kernel,
                     "linear_choice": linear.as_dict(), "targets": {t.source: len(t.files) for t in cfg.targets},
                     "cache": folder, "cache_files": files}
    d = cfg.score.degradation
    if d.enabled:
        from pipelines.degradation import settings_key as degradation_key

        models.check_weak_lm(d.model)
        dev = device.torch_device(d.device)
        dtype = device.torch_dtype_name(dev, d.dtype, gpu_default="bfloat16")
        folder, files = _cache(d.cache, d.cache_dir, "degradation", degradation_key(d, dtype))
        linear = kernel_choice.choose(lambda: kernel_choice.meta_shapes(models.weak_lm_folder(d.model)),
                                      d.cpu_linear, dev, dtype)
        rt["degradation"] = {"model": d.model, "compressed": os.path.abspath(d.compressed), "device": dev,
                             "dtype": dtype, "linear": linear.kernel, "linear_choice": linear.as_dict(),
                             "cache": folder, "cache_files": files}
    return rt
