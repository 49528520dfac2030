"""Run a model's linear layers through oneDNN on the CPU (float32, same math, a faster kernel).

Why: torch's float32 ``linear`` on the CPU calls MKL's sgemm, and MKL takes its AVX2 path on
AMD processors even when they have AVX-512. oneDNN, which ships inside every torch CPU build,
picks the AVX-512 kernel there, in true float32 (error against float64 at MKL's level; no bf16
or tf32 inside). On an AVX2-only CPU it is the slower of the two. Which one a model uses is
decided by measuring both on this CPU (``curate.kernel_choice``), not here.

The switch changes the class of each ``nn.Linear`` in place (same parameters, tied weights stay
tied), so it is undone by :func:`use_onednn` with ``on=False``. It is refused, with a logged reason,
where torch has no oneDNN, the model is not float32 on the CPU, or a self-check on a random
layer does not match torch's own result; the model then keeps torch's kernel.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable

import torch

log = logging.getLogger("curate")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` through oneDNN (any leading dimensions)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose forward calls oneDNN; set as the class of existing layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)


@functools.cache
def problem(device: str, dtype: str) -> str | None:
    """Why oneDNN linears cannot be used for a model on ``device`` in ``dtype``, or None (the
    self-check runs once per process)."""
    if device != "cpu" or dtype != "float32":
        return f"the model is {dtype} on {device}; oneDNN linears are for float32 on the CPU"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build has no oneDNN linear"
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, 64, generator=gen), torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    try:
        got = onednn_linear(x, w, b)
    except Exception as err:  # noqa: BLE001 - any failure means: keep torch's own kernel
        return f"oneDNN linear failed its self-check ({type(err).__name__}: {err})"
    if got.shape != (3, 5, 48) or not torch.allclose(got, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-4):
        return "oneDNN linear does not match torch's result on the self-check"
    return None


def use_onednn(model, on: bool = True) -> int:
    """Switch every linear layer of ``model`` to oneDNN (or back); the number switched.

    Returns 0 and logs why when oneDNN cannot be used (see :func:`problem`).
    """
    if on:
        param = next(model.parameters())
        why = problem(param.device.type, str(param.dtype).removeprefix("torch."))
        if why:
            if param.device.type == "cpu":  # off the CPU oneDNN is never expected: no news
                log.info("oneDNN linears not used: %s", why)
            return 0
    old, new = (torch.nn.Linear, OneDNNLinear) if on else (OneDNNLinear, torch.nn.Linear)
    switched = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            switched += 1
    return switched


def linear_of(module) -> Callable:
    """The function a linear layer computes with: oneDNN for switched layers, else torch's."""
    return onednn_linear if isinstance(module, OneDNNLinear) else torch.nn.functional.linear
