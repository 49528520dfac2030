"""Run-time choice of torch device, dtype and FAISS index placement.

``auto`` means CUDA when ``torch.cuda.is_available()`` and a FAISS GPU index when
``faiss.get_num_gpus() > 0``, else CPU. Every choice is written to the manifest.
Results are meant to match across devices within float tolerance; selection
decisions that depend on them are made on float32 numpy arrays on the CPU.
"""
from __future__ import annotations

from curate.errors import CurateError

DEVICES = ("auto", "cpu", "cuda")


class DeviceUnavailable(CurateError):
    """A device the job asks for is not there (one line, exit code 2 from the CLI)."""
DTYPES = ("auto", "float32", "bfloat16", "float16")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or ``taskset``'s share),
    not the machine's count."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def torch_device(prefer: str = "auto", cuda_available: bool | None = None) -> str:
    """'cuda' or 'cpu'. ``cuda_available`` is for tests; by default torch is asked."""
    if prefer not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {prefer!r}")
    if prefer == "cpu":
        return "cpu"
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if prefer == "cuda" and not cuda_available:
        raise DeviceUnavailable("device: cuda was asked for, but torch sees no CUDA device")
    return "cuda" if cuda_available else "cpu"


def torch_dtype_name(device: str, prefer: str = "auto", gpu_default: str = "float16") -> str:
    """``gpu_default`` on a GPU (fp16 for the embedder, bf16 for the weak LM), fp32 on the CPU
    unless another dtype is asked for (bf16 measured in the embed and ifd benchmarks)."""
    if prefer not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {prefer!r}")
    if prefer != "auto":
        return prefer
    return gpu_default if device == "cuda" else "float32"


def faiss_use_gpu(prefer: str = "auto", num_gpus: int | None = None) -> bool:
    """True when a FAISS GPU index should be used (``num_gpus`` is for tests)."""
    if prefer == "cpu":
        return False
    if num_gpus is None:
        import faiss

        num_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if prefer == "cuda" and num_gpus == 0:
        raise DeviceUnavailable("device: cuda was asked for, but FAISS sees no GPU (install faiss-gpu)")
    return num_gpus > 0
