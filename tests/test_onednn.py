"""oneDNN linears: same numbers as torch's kernel, switched in place and back, refused where they
do not apply."""
import pytest
import torch

from curate import onednn

needs_onednn = pytest.mark.skipif(onednn.problem("cpu", "float32") is not None,
                                  reason=f"oneDNN linear unavailable: {onednn.problem('cpu', 'float32')}")


@needs_onednn
def test_switched_layers_compute_what_torch_computes_and_switch_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32, bias=False))
    x = torch.randn(4, 7, 64)
    want = model(x)
    assert onednn.use_onednn(model) == 2
    assert all(type(m) is onednn.OneDNNLinear for m in (model[0], model[2]))
    assert onednn.linear_of(model[2]) is onednn.onednn_linear
    got = model(x)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(model(x), got)  # deterministic
    assert onednn.use_onednn(model, on=False) == 2
    assert type(model[0]) is torch.nn.Linear and torch.equal(model(x), want)


def test_refused_off_the_cpu_or_outside_float32():
    model = torch.nn.Linear(8, 8).to(torch.bfloat16)
    assert onednn.use_onednn(model) == 0 and type(model) is torch.nn.Linear
    assert "float32 on the CPU" in onednn.problem("cpu", "bfloat16")
