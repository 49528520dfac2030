"""Choices made at run time on this machine, before the graph is built: model paths, devices,
dtypes, linear kernels, cache folders and the cache shards already there, and LESS's warm-up
(a short LoRA training whose checkpoints every worker reads). Everything that can
fail for a reason the user can fix (a missing model package, no GPU) fails here, before any
output is written. The result goes to the manifest as it is."""
from __future__ import annotations

import logging
import os

from curate import cache_store, storage
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
        storage.join(previous, "embeddings")
    files = storage.glob(storage.join(folder, "*.parquet"))
    if not files:
        log.warning("embed.reuse: no embeddings/ Parquet under %s; embedding everything", previous)
        return {"from": previous, "used": False, "why": "no embeddings found"}
    with storage.open_file(files[0]) as fh:
        stored = (pq.read_schema(fh).metadata or {}).get(b"curate.embed_key", b"").decode()
    if stored != key:
        log.warning("embed.reuse: %s was made with other settings (key %s, now %s); embedding everything",
                    previous, stored or "none", key)
        return {"from": previous, "used": False, "why": "model, max_seq_length, dtype or text differ"}
    return {"from": storage.absolute(folder), "used": True, "files": files}


def _cache(enabled: bool, cache_dir: str | None, kind: str, key: str) -> tuple[str | None, list[str]]:
    """(folder, shards already there) of a stage's cache, or (None, []) when caching is off."""
    from curate.models import cache_root

    if not enabled:
        return None, []
    folder = storage.join(cache_dir or os.path.join(cache_root(), kind), key)
    return folder, cache_store.files(folder)


def _weak_lm_stage(settings, kind: str, key_fn) -> dict:
    """Model, device, dtype, linear kernel and cache of a stage that runs the weak LM (``settings``
    has model, device, dtype, cpu_linear, cache, cache_dir); a missing model fails here, not in a
    worker."""
    from curate import device, kernel_choice, models

    models.check_weak_lm(settings.model)
    dev = device.torch_device(settings.device)
    dtype = device.torch_dtype_name(dev, settings.dtype, gpu_default="bfloat16")
    folder, files = _cache(settings.cache, settings.cache_dir, kind, key_fn(settings, dtype))
    linear = kernel_choice.choose(lambda: kernel_choice.meta_shapes(models.weak_lm_folder(settings.model)),
                                  settings.cpu_linear, dev, dtype, model=settings.model)
    return {"model": settings.model, "device": dev, "dtype": dtype, "linear": linear.kernel,
            "linear_choice": linear.as_dict(), "cache": folder, "cache_files": files}


def resolve_runtime(cfg: Job) -> dict:
    """``{stage: choices}`` for the stages that are on (see the module docstring)."""
    from curate import device, kernel_choice, models

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
        linear = kernel_choice.choose(lambda: kernel_choice.meta_shapes(path, "encoder"), e.cpu_linear, dev, dtype,
                                      model=e.model)
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
    # pipelines.score (and rds, degradation) import Beam's ML modules (1.5 s on 2 cores of an AMD
    # EPYC with AVX-512): only for a stage that runs
    if s.enabled:
        from pipelines.score import default_batch_tokens, settings_key

        rt["score"] = _weak_lm_stage(s, "scores", settings_key)
        rt["score"]["batch_tokens"] = s.batch_tokens or default_batch_tokens(rt["score"]["device"])
    r = cfg.score.rds
    if r.enabled:
        from pipelines.rds import settings_key as rds_key

        rt["rds"] = {**_weak_lm_stage(r, "rds", rds_key), "targets": {t.source: len(t.files) for t in cfg.targets}}
    x = cfg.score.less
    if x.enabled:
        from pipelines.less import prepare

        models.check_weak_lm(x.model)
        dev = device.torch_device(x.device)
        rt["less"] = prepare(cfg, x, dev, device.torch_dtype_name(dev, x.dtype, gpu_default="bfloat16"))
    w = cfg.rewrite
    if w.reflection.enabled or w.realign.enabled:
        import dataclasses

        from curate.rewrite.teacher import check_reachable

        check_reachable(w.teacher.base_url)
        folder, files = _cache(w.cache, w.cache_dir, "teacher", cache_store.fingerprint({"format": 1}))
        rt["rewrite"] = {"teacher": dataclasses.asdict(w.teacher), "cache": folder, "cache_files": files}
        if w.reflection.enabled:
            from pipelines.score import default_batch_tokens, settings_key

            student = _weak_lm_stage(s, "scores", settings_key)  # the student is score.ifd's model and settings
            student["batch_tokens"] = s.batch_tokens or default_batch_tokens(student["device"])
            rt["rewrite"]["student"] = student
        if w.realign.enabled:
            from pipelines.realign import prepare as prepare_realign

            rt["rewrite"]["realign"] = prepare_realign(w.realign, cfg.embed.model)
    d = cfg.score.degradation
    if d.enabled:
        from pipelines.degradation import settings_key as degradation_key

        rt["degradation"] = {**_weak_lm_stage(d, "degradation", degradation_key),
                             "compressed": os.path.abspath(d.compressed)}
    return rt
