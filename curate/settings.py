"""Typed job settings: one frozen dataclass per job-file section, passed to the stages.

Each field declares its job-file option once (``opt(...)``: default, types, choices, bounds);
``schema_of`` turns a section into the schema that ``curate.options`` checks a job file with,
so the declaration, the validation and the typed value cannot drift apart. Fields marked
``derived`` are filled by ``curate.config`` after the checks (resolved files, LSH bands) and
cannot be set in a job file. ``to_dict`` gives the plain form the manifest records.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from curate.io import FORMATS
from curate.options import REQUIRED, FreeMap, ListOf, Opt
from curate.records import FORMS

SEMANTIC_KEEP = ("least_similar_to_centroid", "most_similar_to_centroid", "longest_response")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LINEAR_KERNELS = ("auto", "torch", "onednn")  # curate.kernel_choice: auto measures on this CPU


def _types(default: Any) -> tuple:
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, float):
        return (float,)
    return (type(default),)


def opt(default: Any = None, *, types: tuple | None = None, choices: tuple | None = None,
        minimum: float | None = None, maximum: float | None = None, required: bool = False):
    """A field that is a job-file option (types default to the default's type)."""
    if types is None:
        if default is None:
            raise TypeError("opt(None) needs types=")
        types = _types(default)
    spec = Opt(types, REQUIRED if required else default, choices, minimum, maximum)
    return field(default=default, metadata={"opt": spec})


def free_map():
    """A mapping whose keys are not checked here (Beam options, policy parameters)."""
    return field(default_factory=dict, metadata={"opt": FreeMap()})


def section(cls):
    return field(default_factory=cls, metadata={"section": cls})


def derived(default: Any = None):
    return field(default=default, metadata={"derived": True})


def schema_of(cls) -> dict:
    """The ``curate.options`` schema of a settings class."""
    out = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "opt" in meta:
            out[f.name] = meta["opt"]
        elif "section" in meta:
            out[f.name] = schema_of(meta["section"])
        elif "list_of" in meta:
            out[f.name] = ListOf(schema_of(meta["list_of"]), required=not meta.get("optional", False))
    return out


def build(cls, values: dict):
    """A settings object from a checked dict (unknown keys were refused by the checks)."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, meta = values[f.name], f.metadata
        if "section" in meta:
            value = build(meta["section"], value or {})
        elif "list_of" in meta:
            value = tuple(build(meta["list_of"], item) for item in value)
        kwargs[f.name] = value
    return cls(**kwargs)


def to_dict(settings) -> dict:
    """Plain dicts and lists (JSON-ready), as the manifest and ``curate validate --show`` print."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(settings)


@dataclass(frozen=True)
class Fields:
    """Column names of one source; every one can be remapped in the job file."""

    instruction: str = opt("instruction")
    input: str = opt("input")
    output: str = opt("output")
    messages: str = opt("messages")
    conversations: str = opt("conversations")
    role: str = opt("role")
    content: str = opt("content")
    speaker: str = opt("from")
    text: str = opt("value")


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str


@dataclass(frozen=True)
class Input:
    source: str = opt(None, types=(str,), required=True)
    path: Any = opt(None, types=(str, list), required=True)
    format: str = opt("auto", choices=FORMATS)
    form: str = opt("auto", choices=FORMS)
    id_field: str | None = opt(None, types=(str,))
    fields: Fields = section(Fields)
    files: tuple = derived(())  # (InputFile, ...) the path resolved and each file's format checked


@dataclass(frozen=True)
class Sample:
    mode: str = opt("none", choices=("none", "head", "random"))
    n: int | None = opt(None, types=(int,), minimum=1)
    fraction: float | None = opt(None, types=(float, int), minimum=0.0, maximum=1.0)
    seed: int | None = opt(None, types=(int,))


@dataclass(frozen=True)
class Validate:
    max_chars: int = opt(100_000, minimum=1)


@dataclass(frozen=True)
class ExactDedup:
    enabled: bool = opt(True)
    scope: str = opt("global", choices=("global", "source"))


@dataclass(frozen=True)
class NearDedup:
    enabled: bool = opt(True)
    threshold: float = opt(0.8, minimum=0.01, maximum=0.99)
    num_perm: int = opt(128, minimum=8, maximum=1024)
    ngram: int = opt(5, minimum=1, maximum=64)
    unit: str = opt("word", choices=("word", "char"))
    text: str = opt("prompt_response", choices=("prompt_response", "response"))
    bands: int | None = opt(None, types=(int,), minimum=1)
    rows: int | None = opt(None, types=(int,), minimum=1)
    fp_weight: float = opt(0.5, minimum=0.0)
    fn_weight: float = opt(0.5, minimum=0.0)
    verify: bool = opt(True)
    scope: str = opt("global", choices=("global", "source"))
    max_bucket_size: int = opt(1000, minimum=2)
    seed: int | None = opt(None, types=(int,))
    bands_rows_from: str = derived("threshold")  # "threshold" or "job file"


@dataclass(frozen=True)
class SemanticDedup:
    enabled: bool = opt(True)
    eps: float = opt(0.01, minimum=0.0, maximum=1.0)
    keep: str = opt("least_similar_to_centroid", choices=SEMANTIC_KEEP)
    block_size: int = opt(2048, minimum=16)


@dataclass(frozen=True)
class Dedup:
    exact: ExactDedup = section(ExactDedup)
    near: NearDedup = section(NearDedup)
    semantic: SemanticDedup = section(SemanticDedup)


@dataclass(frozen=True)
class Embed:
    enabled: bool = opt(True)
    model: str = opt("all-MiniLM-L6-v2")
    text: str = opt("whole", choices=("whole", "instruction", "response"))
    max_seq_length: int = opt(256, minimum=8)
    batch_size: int = opt(64, minimum=1)
    device: str = opt("auto", choices=DEVICES)
    dtype: str = opt("auto", choices=DTYPES)
    cpu_linear: str = opt("auto", choices=LINEAR_KERNELS)
    reuse: str | None = opt(None, types=(str,))
    cache: bool = opt(True)
    cache_dir: str | None = opt(None, types=(str,))


@dataclass(frozen=True)
class IFD:
    enabled: bool = opt(True)
    model: str = opt("SmolLM2-135M-Instruct")
    template: str = opt("none", choices=("none", "alpaca", "chat"))
    max_length: int = opt(1024, minimum=8)
    superfiltering_compat: bool = opt(False)
    batch_size: int = opt(256, minimum=1)
    batch_tokens: int | None = opt(None, types=(int,), minimum=1)
    cpu_linear: str = opt("auto", choices=LINEAR_KERNELS)
    bucket_rows: int = opt(128, minimum=1)
    device: str = opt("auto", choices=DEVICES)
    dtype: str = opt("auto", choices=DTYPES)
    cache: bool = opt(True)
    cache_dir: str | None = opt(None, types=(str,))


@dataclass(frozen=True)
class Degradation:
    """What compression took from the model, per row (``curate.scoring.degradation``)."""

    enabled: bool = opt(False)
    model: str = opt("SmolLM2-135M-Instruct")  # the dense model
    compressed: str | None = opt(None, types=(str,))  # a folder from `curate compress` (or any model)
    cutoff: int = opt(256, minimum=8)  # tokens of prompt + response
    cpu_linear: str = opt("auto", choices=LINEAR_KERNELS)
    batch_size: int = opt(8, minimum=1)  # rows per forward pass
    bucket_rows: int = opt(64, minimum=1)  # rows handed to the scorer at once
    device: str = opt("auto", choices=DEVICES)
    dtype: str = opt("auto", choices=DTYPES)
    cache: bool = opt(True)
    cache_dir: str | None = opt(None, types=(str,))


@dataclass(frozen=True)
class RDS:
    """RDS+ targeted score: cosine of the weak LM's mean-pooled hidden states to the job's targets
    (``curate.scoring.rds``)."""

    enabled: bool = opt(False)
    model: str = opt("SmolLM2-135M-Instruct")
    max_length: int = opt(512, minimum=8)  # tokens of the chat-rendered prompt + response
    batch_size: int = opt(16, minimum=1)  # rows per forward pass
    bucket_rows: int = opt(64, minimum=1)  # rows handed to the model at once, sorted by length
    cpu_linear: str = opt("auto", choices=LINEAR_KERNELS)
    device: str = opt("auto", choices=DEVICES)
    dtype: str = opt("auto", choices=DTYPES)
    cache: bool = opt(True)
    cache_dir: str | None = opt(None, types=(str,))


@dataclass(frozen=True)
class LESS:
    """LESS targeted score: cosine of projected LoRA gradients after a short warm-up
    (``curate.scoring.less``, ``curate.scoring.less_warmup``)."""

    enabled: bool = opt(False)
    model: str = opt("SmolLM2-135M-Instruct")
    max_length: int = opt(512, minimum=8)  # tokens of the chat-rendered prompt + response
    batch_size: int = opt(4, minimum=1)  # rows per forward/backward pass
    bucket_rows: int = opt(64, minimum=1)  # rows whose gradients are projected together (and per cache shard)
    proj_dim: int | None = opt(None, types=(int,), minimum=16)  # default: 8192 on a GPU, 2048 on a CPU
    seed: int = opt(0)  # LoRA initialisation, warm-up batch order and the projection matrix
    warmup_fraction: float = opt(0.05, minimum=0.0, maximum=1.0)  # share of the pool the warm-up trains on
    warmup_min_rows: int = opt(32, minimum=1)
    warmup_epochs: int = opt(2, minimum=1)  # one checkpoint per epoch
    warmup_lr: float = opt(1e-4, types=(int, float), minimum=0.0)
    warmup_batch_size: int = opt(8, minimum=1)
    lora_r: int = opt(8, minimum=1)
    lora_alpha: int = opt(32, minimum=1)
    lora_dropout: float = opt(0.1, minimum=0.0, maximum=1.0)
    device: str = opt("auto", choices=DEVICES)
    dtype: str = opt("auto", choices=DTYPES)
    cache: bool = opt(True)
    cache_dir: str | None = opt(None, types=(str,))


@dataclass(frozen=True)
class Score:
    ifd: IFD = section(IFD)
    degradation: Degradation = section(Degradation)
    rds: RDS = section(RDS)
    less: LESS = section(LESS)


@dataclass(frozen=True)
class TeacherEndpoint:
    """A teacher model behind an OpenAI-compatible chat-completions endpoint (``curate.rewrite.teacher``)."""

    base_url: str = opt("http://127.0.0.1:8000/v1")
    model: str = opt("teacher")  # the model name the endpoint serves
    api_key_env: str | None = opt(None, types=(str,))  # the environment variable holding the key (never logged)
    temperature: float = opt(0.0, types=(int, float), minimum=0.0)
    seed: int = opt(0)
    max_tokens: int = opt(1024, minimum=1)
    timeout_s: float = opt(120.0, types=(int, float), minimum=0.1)
    max_retries: int = opt(4, minimum=0)  # per request, on 429, 5xx, timeouts and lost connections only
    backoff_s: float = opt(1.0, types=(int, float), minimum=0.0)  # the first retry's wait (jittered), doubling
    backoff_cap_s: float = opt(30.0, types=(int, float), minimum=0.0)
    concurrency: int = opt(4, minimum=1)  # requests in flight per worker
    batch_rows: int = opt(16, minimum=1)  # requests handed to a worker at once

    def sampling(self) -> dict:
        """What a reply depends on besides the prompt (part of the request cache key)."""
        return {"temperature": self.temperature, "seed": self.seed, "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class Reflection:
    """Selective Reflection-Tuning: the teacher rewrites, the student (score.ifd's model) decides."""

    enabled: bool = opt(False)


@dataclass(frozen=True)
class ReAlign:
    """ReAlign: the teacher reformats each answer to its task's format; the post-filter keeps it
    only when nothing was lost (``curate.rewrite.realign``)."""

    enabled: bool = opt(False)
    # {instruction, category} rows to train the task classifier on (e.g. ReAlign's
    # datasets/classification/task_classifier_train_dataset.json); required when enabled
    classifier_train: str | None = opt(None, types=(str,))
    classifier_test: str | None = opt(None, types=(str,))  # the same form; accuracy goes to the manifest
    # who names each row's task: "embedding" (the classifier trained on classifier_train) or "teacher"
    # (one more cached request a row, as the reference's LLM classifier; a reply that names no single
    # category, or a failed request, falls back to the embedding classifier's label)
    classifier: str = opt("embedding", choices=("embedding", "teacher"))
    min_ratio: float = opt(0.5, minimum=0.0, maximum=1.0)  # a rewrite must keep more of the answer's tokens
    short_words: int = opt(8, minimum=0)  # answers this short must appear in the rewrite


@dataclass(frozen=True)
class Rewrite:
    teacher: TeacherEndpoint = section(TeacherEndpoint)
    reflection: Reflection = section(Reflection)
    realign: ReAlign = section(ReAlign)
    cache: bool = opt(True)  # teacher replies, keyed by model, template version, prompt and sampling
    cache_dir: str | None = opt(None, types=(str,))


@dataclass(frozen=True)
class Cluster:
    enabled: bool = opt(True)
    # take each row's cluster id from this field of the input row (an integer; a row without one
    # gets none) instead of k-means on the embeddings; works with embed off
    column: str | None = opt(None, types=(str,))
    k: int | None = opt(None, types=(int,), minimum=1)
    k_min: int = opt(2, minimum=1)
    k_max: int = opt(1024, minimum=1)
    niter: int = opt(20, minimum=1)
    sample_per_centroid: int = opt(256, minimum=1)
    max_sample: int = opt(100_000, minimum=1)
    seed: int | None = opt(None, types=(int,))
    device: str = opt("auto", choices=DEVICES)


@dataclass(frozen=True)
class BudgetSpec:
    rows: int | None = opt(None, types=(int,), minimum=0)
    fraction: float | None = opt(None, types=(int, float), minimum=0.0, maximum=1.0)
    tokens: int | None = opt(None, types=(int,), minimum=0)

    def given(self) -> dict:
        """The budget keys that are set, as ``curate.select.Budget.parse`` takes them."""
        return {k: v for k, v in (("rows", self.rows), ("fraction", self.fraction), ("tokens", self.tokens))
                if v is not None}


@dataclass(frozen=True)
class Select:
    policy: str = opt("all")
    params: dict = free_map()
    budget: BudgetSpec = section(BudgetSpec)
    seed: int | None = opt(None, types=(int,))
    # global: the policy sees every candidate at once (one worker holds their features);
    # cluster: it runs on each cluster alone with its share of the budget (curate.select.scope)
    scope: str = opt("global", choices=("global", "cluster"))
    # the most candidates a policy that compares rows (not keyed) sees on one worker with scope
    # global: past it, the shortlist it declares cuts the pool first (curate.select.shortlist);
    # 0: every candidate
    max_candidates: int = opt(200_000, minimum=0)


@dataclass(frozen=True)
class Job:
    name: str | None = opt(None, types=(str,))
    output: str = opt(None, types=(str,), required=True)
    seed: int = opt(0)
    inputs: tuple = field(default=(), metadata={"list_of": Input})
    # examples of what the model should be good at, one set per subtask (``source`` names it);
    # read like inputs, used by the targeted scores (score.rds, score.less)
    targets: tuple = field(default=(), metadata={"list_of": Input, "optional": True})
    sample: Sample = section(Sample)
    validate: Validate = section(Validate)
    dedup: Dedup = section(Dedup)
    embed: Embed = section(Embed)
    score: Score = section(Score)
    rewrite: Rewrite = section(Rewrite)
    cluster: Cluster = section(Cluster)
    select: Select = section(Select)
    batch_size: int = opt(512, minimum=1)
    beam: dict = free_map()
