"""The LESS stage: targeted scores from projected LoRA gradients (``curate.scoring.less``; the
graph is ``pipelines.targeted``'s).

    driver, before the graph: pool sample -> warm-up LoRA -> checkpoints (cached by fingerprint)
    graph: targets -> plain-gradient features, rows -> Adam features, cosine per subtask

Files under ``cache_root()/less/`` (``score.less.cache_dir`` moves them):

    warmup/<warm-up key>/ckpt-<epoch>/   adapter weights, name-keyed moments, betas, eps, mean lr
    features/<feature key>-adam/         pool rows' features, Parquet shards keyed by content hash
    features/<feature key>-sgd/          target rows' features

With ``cache_dir`` on an object store, the warm-up is trained into a local folder
(``cache_root()/less/store-copies/<warm-up key>``), then copied to the store with ``warmup.json``
last; a machine without that local copy (the driver of a later run, a Dask worker) downloads it
whole before reading it. The feature shards are written to the store directly.

The driver reads the inputs once (the job's ``sample`` applied) to draw the warm-up rows. On a
GPU the projection's ±1 blocks are made on the CPU and copied over: the price of one matrix on
every device. The warm-up key covers the model, the LoRA and training settings and the sampled
rows' hashes; the feature key adds the projection's identity (``curate.scoring.less.Projection``),
max_length and dtype, and each shard's schema carries that identity. A rerun, or a run with other
targets, reuses the warm-up and every feature already computed; a run killed half way keeps the
shards it wrote (one per ``bucket_rows`` rows) and computes only the rest.
"""
from __future__ import annotations

import logging
import os

import pyarrow as pa

from curate import cache_store, storage
from curate.errors import CurateError
from curate.scoring.less import (COLUMNS, Projection, checkpoint_weights, features, identity_metadata,
                                 subtask_matrix)
from curate.settings import LESS, Job
from pipelines.cached import StageHandler
from pipelines.degradation import text_key
from pipelines.targeted import TargetedStage

log = logging.getLogger("curate")
KINDS = {"pool": "adam", "targets": "sgd"}
DONE = "warmup.json"  # written last: a warm-up folder on a store without it is not finished


def default_proj_dim(device: str) -> int:
    """8192 (LESS's) on a GPU; 2048 on a CPU, where projecting at 8192 adds about 30% to each
    row's gradient time and at 2048 about 10% (SmolLM2-135M, r 8; measured on 2 cores of an AMD
    EPYC with AVX-512: 0.29 vs 0.09 s/row of projection against 0.95 s/row of gradients)."""
    return 8192 if device == "cuda" else 2048


def pool_rows(cfg: Job):
    """(content key, record) for every valid input row the job reads (its ``sample`` applied)."""
    from curate.io import iter_file, sample_rows
    from curate.records import convert
    from pipelines.transforms import read_units, row_specs

    specs, s = row_specs(cfg), cfg.sample
    for unit in read_units(cfg):
        rows = (row for f in unit["files"] for row in iter_file(f.path, f.format))
        for raw in sample_rows(rows, unit["source"], s.mode, s.n, s.fraction, s.seed):
            if raw.bad_reason:
                continue
            kind, record = convert(raw.value, specs[unit["source"]], unit["files"][0].path, raw.row_number)
            if kind == "record":
                yield text_key(record), record


def warmup_key(x: LESS, dtype: str, sample_keys: list[str]) -> str:
    return cache_store.fingerprint({
        "model": x.model, "max_length": x.max_length, "dtype": dtype, "epochs": x.warmup_epochs,
        "lr": x.warmup_lr, "batch_size": x.warmup_batch_size, "r": x.lora_r, "alpha": x.lora_alpha,
        "dropout": x.lora_dropout, "seed": x.seed, "rows": cache_store.fingerprint({"keys": sample_keys}),
        "format": 1})


def warmup_store(root: str, wkey: str) -> str | None:
    """The warm-up's folder when the cache is on an object store, else None."""
    return storage.join(root, "warmup", wkey) if storage.is_remote(root) else None


def store_copy(wkey: str) -> str:
    """This machine's copy of a warm-up kept on a store (safetensors and torch read local files)."""
    from curate import models

    return os.path.join(models.cache_root(), "less", "store-copies", wkey)


def worker_checkpoints(rt: dict) -> list[str]:
    """The checkpoint folders on this machine: the driver's on a shared disk; on a store, this
    machine's copy (made now if it has none)."""
    store = rt.get("warmup_store")
    if not store:
        return list(rt["checkpoints"])
    folder = store_copy(rt["warmup_key"])
    storage.download_folder(store, folder)
    return [os.path.join(folder, os.path.basename(c.rstrip("/"))) for c in rt["checkpoints"]]


def prepare(cfg: Job, x: LESS, dev: str, dtype: str) -> dict:
    """The warm-up (trained now unless its folder is cached) and the feature stores' folders."""
    from curate import models
    from curate.scoring import less_warmup

    root = x.cache_dir or os.path.join(models.cache_root(), "less")
    rows = less_warmup.sample(pool_rows(cfg), x.warmup_fraction, x.warmup_min_rows, cfg.seed)
    if not rows:
        raise CurateError("score.less: the pool has no valid rows to warm up on")
    wkey = warmup_key(x, dtype, [text_key(r) for r in rows])
    store = warmup_store(root, wkey)
    folder = store_copy(wkey) if store else os.path.join(root, "warmup", wkey)
    stored = bool(store) and storage.isfile(storage.join(store, DONE))
    if stored and not os.path.isdir(folder):
        log.info("less: copying the warm-up from %s", store)
        storage.download_folder(store, folder)
    if os.path.isdir(folder):
        log.info("less: reusing the warm-up in %s", store or folder)
        how = "cached"
    else:
        from curate.models import load_causal_lm
        from curate.stats import Progress

        log.info("less: warming up LoRA on %d pool rows, %d epochs (%s)", len(rows), x.warmup_epochs, folder)
        model, tok = load_causal_lm(x.model, dev, dtype)
        progress = Progress("less warm-up", unit="steps", log_first=True)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.total = total  # known once the batches are planned: the line gets a share and an ETA
            progress.add(1)
        less_warmup.warm_up(model, tok, rows, folder, r=x.lora_r, alpha=x.lora_alpha, dropout=x.lora_dropout,
                            lr=x.warmup_lr, epochs=x.warmup_epochs, batch_size=x.warmup_batch_size,
                            max_length=x.max_length, seed=x.seed, progress=on_step)
        how = "trained"
    if store and not stored:
        log.info("less: copying the warm-up to %s", store)
        storage.upload_folder(folder, store, last=DONE)
    ckpts = less_warmup.checkpoints(folder)
    proj = Projection(x.proj_dim or default_proj_dim(dev), x.seed)
    fkey = cache_store.fingerprint({"warmup": wkey, "projection": proj.identity(), "max_length": x.max_length,
                                    "dtype": dtype, "loss": "mean_response_tokens", "format": 1})
    out = {"model": x.model, "device": dev, "dtype": dtype, "linear": "torch", "warmup": store or folder,
           "warmup_store": store, "warmup_key": wkey, "warmup_how": how, "warmup_rows": len(rows),
           "checkpoints": [c.folder for c in ckpts],
           "checkpoint_lr": [c.lr for c in ckpts], "checkpoint_weights": checkpoint_weights([c.lr for c in ckpts]),
           "projection": proj.identity(), "targets": {t.source: len(t.files) for t in cfg.targets}}
    for kind, grad in KINDS.items():
        features_dir = storage.join(root, "features", f"{fkey}-{grad}") if x.cache else None
        out[f"cache_{kind}"] = features_dir
        out[f"cache_files_{kind}"] = cache_store.files(features_dir)
    return out


class Loaded:
    """What a worker holds (a class, not a tuple: Beam keeps a weak reference to it)."""

    def __init__(self, model, tokenizer, checkpoints):
        self.model, self.tokenizer, self.checkpoints = model, tokenizer, checkpoints


class LESSHandler(StageHandler):
    """Records in, ``{less_vector, less_status}`` out: every checkpoint's features of a bucket of
    rows, projected together. The model is loaded once per worker (the checkpoints' LoRA weights
    are swapped in)."""

    def __init__(self, x: LESS, rt: dict, kind: str):
        super().__init__(min_batch_size=x.bucket_rows, max_batch_size=x.bucket_rows)
        self.x, self.rt, self.kind = x, rt, kind
        self.stage = "less" if kind == "pool" else "less_targets"

    def load_model(self):
        from curate.models import load_causal_lm
        from curate.scoring import less_warmup

        x = self.x
        log.info("%s: loading %s on %s (%s) with %d warm-up checkpoints", self.stage, x.model, self.rt["device"],
                 self.rt["dtype"], len(self.rt["checkpoints"]))
        model, tok = load_causal_lm(x.model, self.rt["device"], self.rt["dtype"])
        peft = less_warmup.peft_model(model, x.lora_r, x.lora_alpha, x.lora_dropout, x.seed).eval()
        ckpts = [less_warmup.Checkpoint.read(f) for f in worker_checkpoints(self.rt)]
        return Loaded(peft, tok, ckpts)

    def infer(self, batch, model, progress):
        from curate import lm_data

        peft, tok, ckpts = model.model, model.tokenizer, model.checkpoints
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        examples = [lm_data.encode(r, tok, self.x.max_length) for r in batch]
        proj = Projection(**self.rt["projection"])
        try:
            vectors = features(peft, ckpts, examples, pad, proj, KINDS[self.kind], self.x.batch_size, progress)
        except Exception:  # noqa: BLE001 - a failed bucket is a status, never a crash or a 0
            log.exception("%s: a bucket of %d rows failed", self.stage, len(batch))
            return [{"less_vector": None, "less_status": "error"} for _ in batch]
        return [{"less_vector": None if v is None else v.tolist(), "less_status": e.status}
                for v, e in zip(vectors, examples)]

    def get_metrics_namespace(self) -> str:
        return f"curate.{self.stage}"


class LESSStage(TargetedStage):
    """LESS columns on the rows still in play."""

    prefix = "less"
    columns = COLUMNS.names
    hint = "raise score.less.max_length or give rows with a response"

    def __init__(self, cfg: Job, rt: dict, run_id: str = "run", handler=None, target_handler=None):
        super().__init__(cfg, cfg.score.less, rt, run_id, handler, target_handler)

    def handler(self, kind: str):
        return LESSHandler(self.settings, self.rt, kind)

    def cache_of(self, kind: str):
        return self.rt.get(f"cache_{kind}"), self.rt.get(f"cache_files_{kind}")

    def cached(self) -> list[pa.Field]:
        return [pa.field("less_vector", pa.list_(pa.float32()), metadata=identity_metadata(self.rt["projection"])),
                pa.field("less_status", pa.string())]

    def matrix(self, pairs):
        return subtask_matrix(pairs, self.rt["checkpoint_weights"])
