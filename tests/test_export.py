"""Static real-valued graph (StaticVarNet) and its TorchScript / ONNX exports compute what VarNet computes."""
import numpy as np
import pytest
import torch

from gadget.model.export import (StaticVarNet, cmul, export_model, fft2c_real, fft2c_split_real, run_exported,
                                  verify_export)
from gadget.model.varnet import VarNet
from gadget.mri.fft import fft2c, ifft2c
from tests.conftest import equispaced_mask

TINY = dict(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2)


def _input(small_volume, acs=8):
    k = torch.from_numpy(small_volume.kspace[:1])  # (1, 6, 128, 48) structured k-space
    mask = torch.from_numpy(equispaced_mask(k.shape[-1], 4, acs))
    return k, mask


@pytest.mark.parametrize("shape", [(2, 3, 16, 12), (1, 2, 15, 9)])
def test_real_layout_fft_and_product_equal_the_complex_ones(shape):
    z = torch.randn(*shape, dtype=torch.complex128)
    w = torch.randn(*shape, dtype=torch.complex128)
    r = torch.view_as_real(z)
    assert torch.allclose(torch.view_as_complex(fft2c_real(r)), fft2c(z), atol=1e-12)
    assert torch.allclose(torch.view_as_complex(fft2c_real(r, inverse=True)), ifft2c(z), atol=1e-12)
    assert torch.allclose(torch.view_as_complex(cmul(r, torch.view_as_real(w))), z * w, atol=1e-12)
    assert torch.allclose(torch.view_as_complex(cmul(r, torch.view_as_real(w), conj_b=True)), z * w.conj(), atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 2, 640, 368), (2, 1, 46, 15), (1, 1, 7, 5), (1, 1, 16, 8)])
def test_split_dft_equals_the_fft(shape):
    """Power-of-two FFTs + twiddles + odd-length matrix DFTs (the ONNX path) = torch.fft, to float64
    rounding, for lengths with odd factors 5, 23, 3, 7 and powers of two."""
    z = torch.view_as_real(torch.randn(*shape, dtype=torch.complex128))
    for inverse in (False, True):
        want = fft2c_real(z, inverse=inverse)
        assert torch.allclose(fft2c_split_real(z, inverse=inverse), want, rtol=0, atol=1e-13 * float(want.abs().max()))


def test_split_dft_after_a_fake_tensor_trace_is_computed_eagerly():
    """The ONNX exporter traces under a fake-tensor mode; tables made then must not be kept for later
    eager calls (they were, through a cache, when another test exported first)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fft2c_split_real(torch.zeros(1, 1, 10, 46, 2, dtype=torch.float64))
    z = torch.view_as_real(torch.randn(1, 1, 10, 46, dtype=torch.complex128))
    got = fft2c_split_real(z)
    assert type(got) is torch.Tensor
    assert torch.allclose(got, fft2c_real(z), rtol=0, atol=1e-12)


@pytest.mark.parametrize("output,split_dft", [("rss", False), ("sense", False), ("sense", True)])
def test_static_graph_equals_the_model(small_volume, output, split_dft):
    torch.manual_seed(0)
    model = VarNet(**TINY, output=output).eval().double()
    k, mask = _input(small_volume)
    k = k.to(torch.complex128) * mask
    with torch.no_grad():
        eager = model(k, mask, 8)
        static = StaticVarNet(model, k.shape[-1], 8, split_dft=split_dft)(torch.view_as_real(k), mask.double())
    assert torch.allclose(static, eager, rtol=1e-10, atol=1e-12 * float(eager.max()))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_files_match_eager_output(tmp_path, small_volume, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install '.[export]')")
        pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install '.[export]')")
    torch.manual_seed(0)
    model = VarNet(**TINY, output="sense").eval()
    k, mask = _input(small_volume)
    path = export_model(model, tmp_path / f"m.{fmt}", fmt, *k.shape[1:], num_low_frequencies=8)
    assert verify_export(path, fmt, model, k, mask, 8) < 1e-4
    # a different mask of the same width runs through the same file (the ACS width is what is fixed)
    other = torch.from_numpy(equispaced_mask(k.shape[-1], 3, 8))
    assert verify_export(path, fmt, model, k, other, 8) < 1e-4
    if fmt == "onnx":
        import onnx

        graph = onnx.load(str(path))
        assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert any(node.op_type == "DFT" for node in graph.graph.node) or \
            any(node.op_type == "DFT" for f in graph.functions for node in f.node)


def test_bad_acs_width_is_refused():
    with pytest.raises(ValueError, match="ACS width must lie in 1..48"):
        StaticVarNet(VarNet(**TINY), 48, 0)
    with pytest.raises(ValueError, match="export format must be one of torchscript, onnx"):
        export_model(VarNet(**TINY), "x.bin", "tflite", 2, 16, 16, 4)


def test_cli_export_verifies_the_file(tmp_path, capsys):
    from gadget.cli import main
    from gadget.model.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", VarNet(**TINY))
    out = tmp_path / "m.ts"
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--format", "torchscript", "--coils", "4",
                 "--readout", "64", "--phase", "32", "--acs", "6", "--out", str(out)]) == 0
    assert "max relative difference" in capsys.readouterr().out and out.stat().st_size > 0
    assert main(["export", "--checkpoint", str(tmp_path / "m.pt"), "--format", "torchscript", "--coils", "4",
                 "--readout", "64", "--phase", "32", "--acs", "40", "--out", str(out)]) == 2
    assert "--acs" in capsys.readouterr().err


def test_static_graph_constants_live_where_the_weights_do():
    """A graph traced on a GPU must not keep CPU constants (``meta`` stands in for CUDA here)."""
    model = VarNet(**TINY).to("meta")
    assert StaticVarNet(model, 48, 8).acs_mask.device == torch.device("meta")
