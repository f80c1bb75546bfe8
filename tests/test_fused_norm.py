"""The C instance norm + LeakyReLU (gadget/model/fused_norm.py, csrc/instance_norm.c) against PyTorch's own
``instance_norm`` and ``leaky_relu`` in double precision, where it declines, and what happens without it."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from gadget.model import fused_norm
from gadget.mri import native
from gadget.model.unet import instance_norm_leaky_relu_

needs_kernel = pytest.mark.skipif(fused_norm.kernel() is None, reason="no C compiler: the kernel cannot be built")


def _activation(b, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g) * torch.linspace(0.5, 4.0, c).view(1, c, 1, 1) + 2.0
    return x.contiguous(memory_format=torch.channels_last)


def _reference(x, eps=1e-5, slope=0.2):
    return F.leaky_relu(F.instance_norm(x.double(), eps=eps), slope)


@needs_kernel
@pytest.mark.parametrize("b,c,h,w", [(1, 18, 64, 46), (2, 36, 32, 23), (3, 2, 16, 12), (15, 8, 20, 16),
                                     (1, 144, 8, 6), (1, 288, 4, 3), (2, 5, 8, 8)])
def test_the_kernel_is_instance_norm_then_leaky_relu(b, c, h, w):
    x = _activation(b, c, h, w)
    want = _reference(x)
    got = x.clone(memory_format=torch.channels_last)
    assert fused_norm.instance_norm_leaky_relu_(got, 1e-5, 0.2)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert float((got.double() - want).abs().max()) < 2e-6
    torch_path = x.clone(memory_format=torch.channels_last)
    with pytest.MonkeyPatch.context() as patch:  # the PyTorch passes agree as well
        patch.setattr(fused_norm, "instance_norm_leaky_relu_", lambda *args: False)
        instance_norm_leaky_relu_(torch_path, 1e-5, 0.2)
    assert float((torch_path.double() - want).abs().max()) < 2e-6


@needs_kernel
def test_the_kernel_takes_the_slope_and_eps_it_is_given():
    x = _activation(1, 18, 16, 12, seed=1)
    got = x.clone(memory_format=torch.channels_last)
    assert fused_norm.instance_norm_leaky_relu_(got, 1e-2, 0.01)
    assert float((got.double() - _reference(x, 1e-2, 0.01)).abs().max()) < 2e-6


@needs_kernel
@pytest.mark.parametrize("case", ["pixels-not-a-multiple-of-the-row", "contiguous-nchw", "float64", "grad"])
def test_the_kernel_declines_what_it_does_not_cover_and_leaves_it_untouched(case):
    x = _activation(1, 18, 5, 3)  # 15 pixels: 18 channels need rows of 4 pixels
    if case == "contiguous-nchw":
        x = _activation(1, 18, 8, 8).contiguous()
    elif case == "float64":
        x = _activation(1, 18, 8, 8).double()
    elif case == "grad":
        x = _activation(1, 18, 8, 8).requires_grad_()
    before = x.detach().clone()
    assert not fused_norm.instance_norm_leaky_relu_(x, 1e-5, 0.2)
    assert torch.equal(x.detach(), before)
    if case != "grad":  # the caller's PyTorch passes then do the work
        assert float((instance_norm_leaky_relu_(x, 1e-5, 0.2).double() - _reference(before)).abs().max()) < 2e-6


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    monkeypatch.setattr(fused_norm, "KERNEL", fused_norm.KERNEL.fresh())
    monkeypatch.setenv("VARNET_KERNEL_DIR", str(tmp_path))
    return tmp_path


def test_without_a_compiler_the_norms_run_as_pytorch_passes_and_a_warning_says_so_once(
        fresh_kernel_state, monkeypatch, caplog):
    monkeypatch.setattr(native, "compiler", lambda: None)
    x = _activation(1, 18, 8, 8)
    with caplog.at_level(logging.WARNING, logger="gadget.model.fused_norm"):
        assert not fused_norm.instance_norm_leaky_relu_(x.clone(memory_format=torch.channels_last), 1e-5, 0.2)
        out = instance_norm_leaky_relu_(x.clone(memory_format=torch.channels_last), 1e-5, 0.2)
    assert float((out.double() - _reference(x)).abs().max()) < 2e-6
    warnings = [r.getMessage() for r in caplog.records if "fused instance norm unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "no C compiler" in warnings[0]


def test_a_failing_build_names_the_compiler_and_is_not_retried(fresh_kernel_state, monkeypatch, caplog):
    monkeypatch.setattr(native, "compiler", lambda: "/bin/false")
    with caplog.at_level(logging.WARNING, logger="gadget.model.fused_norm"):
        assert fused_norm.kernel() is None
        assert fused_norm.kernel() is None
    warnings = [r.getMessage() for r in caplog.records if "fused instance norm unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "/bin/false failed" in warnings[0]
    assert not list(fresh_kernel_state.glob("*.so"))  # no half-written library left behind


def test_the_switch_turns_the_kernel_off(fresh_kernel_state, monkeypatch):
    monkeypatch.setenv("VARNET_FUSED_NORM", "0")
    assert fused_norm.kernel() is None
    assert not list(fresh_kernel_state.glob("*.so"))


@needs_kernel
def test_the_build_is_cached_by_source_compiler_flags_and_cpu(fresh_kernel_state, monkeypatch):
    assert fused_norm.kernel() is not None
    (library,) = fresh_kernel_state.glob("instance_norm-*.so")
    stamp = library.stat().st_mtime_ns
    monkeypatch.setattr(fused_norm, "KERNEL", fused_norm.KERNEL.fresh())
    assert fused_norm.kernel() is not None  # loaded again, not rebuilt
    assert [p.name for p in fresh_kernel_state.glob("*.so")] == [library.name]
    assert library.stat().st_mtime_ns == stamp
    monkeypatch.setattr(native, "cpu_identity", lambda: "another CPU")
    monkeypatch.setattr(fused_norm, "KERNEL", fused_norm.KERNEL.fresh())
    assert fused_norm.kernel() is not None
    assert len(list(fresh_kernel_state.glob("instance_norm-*.so"))) == 2
