"""The CPU linear kernel: measured on the model's own shapes, the faster one taken, kept per CPU,
forced by the job, and never offered where it cannot run."""
import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from curate import kernel_choice
from curate.onednn import problem

needs_onednn = pytest.mark.skipif(problem("cpu", "float32") is not None, reason="this torch has no oneDNN linear")
TINY = {(64, 96): 2, (96, 64): 1}


def test_shapes_come_from_the_model_and_from_a_folder_without_weights(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64),
                                torch.nn.Linear(64, 96))
    assert kernel_choice.linear_shapes(model) == TINY
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100).save_pretrained(tmp_path)
    shapes = kernel_choice.meta_shapes(str(tmp_path))
    assert shapes == {(64, 64): 4, (64, 32): 4, (64, 128): 4, (128, 64): 2, (64, 100): 1}


@needs_onednn
def test_auto_measures_takes_the_faster_and_keeps_the_choice(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=kernel_choice.log.name)
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernel_choice, "cpu_share", lambda fn: (fn(), 1.0))  # an idle machine (see the next test)
    calls = []

    def shapes():
        calls.append(1)
        return TINY

    first = kernel_choice.choose(shapes, "auto", model="tiny-llama")
    assert first.how == "measured" and set(first.gflops) == {"torch", "onednn"}
    assert f"linear kernel for tiny-llama: {first.kernel} (GFLOP/s on its shapes: " in caplog.text
    assert all(v > 0 for v in first.gflops.values())
    assert first.kernel == max(first.gflops, key=first.gflops.get)
    stored = json.loads((tmp_path / "kernels.json").read_text())
    assert [v["kernel"] for v in stored.values()] == [first.kernel]
    again = kernel_choice.choose(shapes, "auto")
    assert (again.how, again.kernel, again.gflops) == ("cached", first.kernel, first.gflops)
    # another ISA cap in the environment is another machine as far as kernels go: measured afresh
    other = "AVX2" if os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2" else "AVX512_CORE"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", other)  # read by oneDNN at start-up only: changes the key here
    assert kernel_choice.choose(shapes, "auto").how == "measured"
    assert len(json.loads((tmp_path / "kernels.json").read_text())) == 2
    # so is another boot: a VM's vague CPU name may stand for another host after a restart
    assert kernel_choice._boot_id() or not os.path.exists("/proc/sys/kernel/random/boot_id")
    monkeypatch.setattr(kernel_choice, "_boot_id", lambda: "another boot")
    assert kernel_choice.choose(shapes, "auto").how == "measured"
    assert kernel_choice.choose(shapes, "auto").how == "cached"


@needs_onednn
def test_a_measurement_on_busy_cores_is_used_once_and_not_kept(monkeypatch, tmp_path, caplog):
    """Real contention: twice as many spinning processes as cores while the kernels are timed."""
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path))
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        time.sleep(0.3)
        busy = kernel_choice.choose(lambda: TINY, "auto")
    finally:
        for p in spin:
            p.kill()
            p.wait()
    assert busy.how == "measured" and busy.cpu_share < kernel_choice.BUSY
    assert busy.kernel == max(busy.gflops, key=busy.gflops.get) and "cpu_share" in busy.as_dict()
    assert not (tmp_path / "kernels.json").exists() and "busy while measuring" in caplog.text


def test_a_wrong_kernel_is_left_out_and_the_other_taken(monkeypatch):
    good = torch.nn.functional.linear
    monkeypatch.setattr(kernel_choice, "_functions", lambda: {"torch": good, "onednn": lambda x, w: good(x, w) * 1.01})
    rates, failed = kernel_choice.measure(TINY, seconds=0.05)
    assert set(rates) == {"torch"} and "differs from float64" in failed["onednn"]
    monkeypatch.setattr(kernel_choice, "_functions", lambda: {"torch": good, "onednn": None})
    rates, failed = kernel_choice.measure(TINY, seconds=0.05)
    assert set(rates) == {"torch"} and "TypeError" in failed["onednn"]


def test_forced_and_off_the_cpu_need_no_measurement(monkeypatch, tmp_path):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path))
    never = lambda: pytest.fail("measured although the kernel was given")  # noqa: E731
    assert kernel_choice.choose(never, "torch").as_dict() == {
        "kernel": "torch", "how": "forced", "why": "set in the job", "cpu": kernel_choice.cpu_name()}
    gpu = kernel_choice.choose(never, "auto", "cuda", "bfloat16")
    assert (gpu.kernel, gpu.how) == ("torch", "only_choice") and "bfloat16 on cuda" in gpu.why
    assert kernel_choice.choose(never, "auto", "cpu", "bfloat16").kernel == "torch"
    assert not os.path.exists(tmp_path / "kernels.json")
    with pytest.raises(ValueError, match="cpu_linear must be one of auto, torch, onednn"):
        kernel_choice.choose(never, "mkl")


@needs_onednn
def test_a_model_whose_shapes_cannot_be_read_keeps_torchs_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("CURATE_CACHE", str(tmp_path))
    got = kernel_choice.choose(lambda: kernel_choice.meta_shapes(str(tmp_path / "nothing")), "auto")
    assert (got.kernel, got.how) == ("torch", "only_choice") and "shapes unreadable" in got.why
    assert kernel_choice.choose(dict, "auto").why == "the model has no linear layers"


def test_the_settings_offer_what_the_chooser_knows():
    from curate.settings import LINEAR_KERNELS

    assert LINEAR_KERNELS == kernel_choice.CHOICES


def test_the_cpu_name_carries_its_simd_flags():
    name = kernel_choice.cpu_name()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert name and (("avx2" in name) == (" avx2" in flags))


def test_an_isa_cap_below_bf16_means_no_native_bf16(monkeypatch):
    monkeypatch.setattr(kernel_choice, "cpu_name", lambda: "Some CPU [avx2 avx512f avx512_bf16]")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert kernel_choice.native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not kernel_choice.native_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert kernel_choice.native_bf16()
    monkeypatch.setattr(kernel_choice, "cpu_name", lambda: "Some CPU [avx2]")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert not kernel_choice.native_bf16()
