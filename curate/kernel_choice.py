"""Which kernel runs a model's float32 linear layers on this CPU: measured, not assumed.

Why measure: the two float32 kernels inside every torch CPU build win on different CPUs. torch's
own ``linear`` calls MKL's sgemm, which takes its AVX2 path on AMD processors even when they have
AVX-512; oneDNN (``curate.onednn``) takes the AVX-512 path there and ran the weak LM's shapes
1.1x faster (211 vs 190 GFLOP/s) on a 2-core AMD EPYC with AVX-512 and AVX512-BF16, while on a
2-core AVX2-only EPYC a user measured it about 25% slower than MKL (126 vs 170 GFLOP/s). No rule of thumb (vendor, flags) predicts that reliably, so at run time both kernels
run the model's own GEMM shapes for a fraction of a second and the faster one that passes an
accuracy check against float64 is used. Both are true float32 (no bf16 or tf32 inside): scores
agree to float32 rounding whichever wins, so the choice is not part of any cache key.

The choice is kept in ``cache_root()/kernels.json`` per CPU (model name and instruction-set
flags), boot, torch version, thread count, ISA caps in the environment (``ONEDNN_MAX_CPU_ISA``,
``MKL_ENABLE_INSTRUCTIONS``, ``ATEN_CPU_CAPABILITY``) and set of shapes, so it is measured once
per machine, boot and model. The boot is in the key because a cloud VM names its CPU vaguely
("AMD EPYC [avx2]") and a home folder outlives the host: a choice measured on an earlier day (oneDNN,
136 vs 123 GFLOP/s) was read back on a machine with the same name where torch's kernel was the
faster (172 vs 164, its IFD stage 1.09x oneDNN's). A measurement taken while other processes
held the cores is not kept either: under contention the kernels rank differently (there, 33 vs
51 with a second job on the cores). It is used for that run and recorded with ``cpu_share`` (the
share of its threads' time the measurement got); the next run measures again.
A job forces a kernel with ``cpu_linear: torch`` or ``onednn``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger("curate")

KERNELS = ("torch", "onednn")
CHOICES = ("auto",) + KERNELS
ENV_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
TOKENS = 512  # rows of the measured GEMMs: about one forward batch's tokens
VERSION = 2  # of the measurement; a new one re-measures (2: busy measurements are no longer kept)
BUSY = 0.8  # below this share of its threads' CPU time, a measurement is not kept


@dataclass
class Choice:
    """A kernel and how it was chosen; goes to the manifest as it is."""

    kernel: str
    how: str  # measured, cached, forced, only_choice
    gflops: dict = field(default_factory=dict)  # kernel -> GFLOP/s on the model's shapes
    why: str = ""  # why a kernel was left out or forced
    cpu: str = ""
    cpu_share: float | None = None  # set when the measurement ran on a busy machine (not kept)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in ("", {}, None)}


def cpu_name() -> str:
    """The CPU's model name and its SIMD flags that matter for GEMM kernels."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "asimd", "sve")
           if f in flags]
    return f"{model} [{' '.join(isa)}]" if isa else model


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), and no ISA cap in the
    environment (``ONEDNN_MAX_CPU_ISA``) keeps oneDNN from it. Without it bf16 runs through
    conversions at a fraction of float32's speed."""
    name = cpu_name()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    capped = cap not in ("", "ALL") and not any(x in cap for x in ("BF16", "AMX", "FP16", "AVX10"))
    return ("avx512_bf16" in name or "amx_bf16" in name) and not capped


def linear_shapes(model) -> dict[tuple[int, int], int]:
    """{(in_features, out_features): count} over the model's ``nn.Linear`` layers."""
    import torch

    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            key = (module.in_features, module.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def meta_shapes(folder: str, kind: str = "causal_lm") -> dict[tuple[int, int], int]:
    """The linear shapes of the model in ``folder`` without loading its weights (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    with torch.device("meta"):
        model = cls.from_config(config)
    return linear_shapes(model)


def _cache_key(shapes: dict) -> str:
    import torch

    env = {k: os.environ.get(k, "") for k in ENV_CAPS}
    blob = json.dumps({"cpu": cpu_name(), "boot": _boot_id(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "env": env,
                       "shapes": sorted([list(k) + [v] for k, v in shapes.items()]), "version": VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _boot_id() -> str:
    """This boot of this machine (Linux), "" where the system does not say."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _cache_file() -> str:
    from curate.models import cache_root

    return os.path.join(cache_root(), "kernels.json")


def _read_cache() -> dict:
    try:
        with open(_cache_file(), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, choice: Choice) -> None:
    path = _cache_file()
    table = _read_cache()
    table[key] = choice.as_dict()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(table, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: parallel runs never see half a file


def _functions() -> dict:
    import torch

    from curate.onednn import onednn_linear

    return {"torch": torch.nn.functional.linear, "onednn": onednn_linear}


def measure(shapes: dict[tuple[int, int], int], kernels=KERNELS, seconds: float = 0.6,
            tokens: int = TOKENS) -> tuple[dict[str, float], dict[str, str]]:
    """({kernel: GFLOP/s}, {kernel: why it failed}) on ``shapes`` weighted by their counts.

    Each shape runs on each kernel in turn, a few rounds, the best round kept, so drift in the
    machine's speed falls on both. A kernel whose result differs from float64 by more than
    float32 rounding can explain fails and gets no rate.
    """
    import torch

    fns = _functions()
    gen = torch.Generator().manual_seed(0)
    total_flops = sum(2 * tokens * k * n * c for (k, n), c in shapes.items())
    spent = dict.fromkeys(kernels, 0.0)
    failed: dict[str, str] = {}
    per_shape = seconds / max(len(shapes), 1) / max(len(kernels), 1)
    for (k, n), count in sorted(shapes.items()):
        x = torch.randn(tokens, k, generator=gen)
        w = torch.randn(min(n, 8192), k, generator=gen) / k ** 0.5  # a vocabulary slice at most
        scale = n / w.shape[0]
        exact = x[:64].double() @ w.double().T  # the check needs a few rows, not all
        best = dict.fromkeys(kernels, float("inf"))
        for name in kernels:
            if name in failed:
                continue
            try:
                got = fns[name](x, w)
            except Exception as err:  # noqa: BLE001 - a kernel that fails is not a candidate
                failed[name] = f"{type(err).__name__}: {err}"
                continue
            if not torch.allclose(got[:64].double(), exact, rtol=1e-4, atol=1e-4):
                failed[name] = f"result differs from float64 beyond float32 rounding on shape {k}x{n}"
        rounds = 3
        for _ in range(rounds):
            for name in kernels:
                if name in failed:
                    continue
                reps, start = 0, time.perf_counter()
                while True:
                    fns[name](x, w)
                    reps += 1
                    took = time.perf_counter() - start
                    if took >= per_shape / rounds:
                        break
                best[name] = min(best[name], took / reps)
        for name in kernels:
            if name not in failed:
                spent[name] += best[name] * scale * count
    rates = {name: round(total_flops / spent[name] / 1e9, 1) for name in kernels if name not in failed}
    return rates, failed


def cpu_share(fn):
    """(``fn()``, the share of this process's torch threads' time it got): CPU time over wall time
    x threads, about 1 on an idle machine, lower when other processes compete for the cores."""
    import torch

    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return out, cpu / max(wall * torch.get_num_threads(), 1e-9)


def choose(shapes_fn, want: str = "auto", device: str = "cpu", dtype: str = "float32",
           model: str = "the model") -> Choice:
    """The linear kernel for a model. ``shapes_fn()`` gives its linear shapes (called only when a
    measurement is needed). ``want`` is the job's ``cpu_linear``: ``auto`` measures (or reads the
    cached measurement), a kernel name forces it where it can run. ``model`` names it in the log (a
    job with embeddings and a weak LM measures each)."""
    from curate.onednn import problem

    if want not in CHOICES:
        raise ValueError(f"cpu_linear must be one of {', '.join(CHOICES)}, not {want!r}")
    if device != "cpu" or dtype != "float32":
        return Choice("torch", "only_choice", why=f"the model is {dtype} on {device}; the kernel choice is "
                                                  "for float32 on the CPU")
    cpu = cpu_name()
    why_not = problem(device, dtype)
    if want != "auto":
        if want == "onednn" and why_not:
            log.warning("cpu_linear: onednn cannot be used (%s); using torch's kernel", why_not)
            return Choice("torch", "forced", why=f"onednn asked for but {why_not}", cpu=cpu)
        return Choice(want, "forced", why="set in the job", cpu=cpu)
    if why_not:
        return Choice("torch", "only_choice", why=why_not, cpu=cpu)
    try:
        shapes = shapes_fn()
    except Exception as err:  # noqa: BLE001 - a model whose shapes cannot be read keeps torch's kernel
        log.warning("cpu_linear auto: could not read the model's linear shapes (%s: %s); using torch's kernel",
                    type(err).__name__, err)
        return Choice("torch", "only_choice", why=f"shapes unreadable: {type(err).__name__}: {err}", cpu=cpu)
    if not shapes:
        return Choice("torch", "only_choice", why="the model has no linear layers", cpu=cpu)
    key = _cache_key(shapes)
    cached = _read_cache().get(key)
    if cached and cached.get("kernel") in KERNELS:
        return Choice(cached["kernel"], "cached", cached.get("gflops", {}), cached.get("why", ""), cpu)
    t = time.perf_counter()
    (rates, failed), share = cpu_share(lambda: measure(shapes))
    kernel = max(rates, key=rates.get) if rates else "torch"
    why = "; ".join(f"{k}: {v}" for k, v in failed.items())
    busy = share < BUSY
    choice = Choice(kernel, "measured", rates, why, cpu, round(share, 2) if busy else None)
    log.info("linear kernel for %s: %s (GFLOP/s on its shapes: %s; measured in %.1f s on %s)", model, kernel,
             ", ".join(f"{k} {v}" for k, v in rates.items()), time.perf_counter() - t, cpu)
    if busy:
        log.warning("linear kernel: the CPU was busy while measuring (this process got %.0f%% of its threads' "
                    "time); %s is used for this run and measured again next time", 100 * share, kernel)
        return choice
    try:
        _write_cache(key, choice)
    except OSError as err:
        log.warning("could not keep the kernel choice in %s: %s", _cache_file(), err)
    return choice


def apply(model, kernel: str) -> int:
    """Put ``model``'s linear layers on ``kernel``; the number of layers switched to oneDNN."""
    from curate.onednn import use_onednn

    return use_onednn(model) if kernel == "onednn" else 0
