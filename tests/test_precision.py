"""Reduced-precision U-Nets (``VarNet.set_precision``): autocast around the U-Nets only, FFTs and
coil operators in fp32, on CPU here and on CUDA where present; engine, config, server and training."""
import numpy as np
import pytest
import torch

from gadget.model.export import StaticVarNet
from gadget.model.varnet import VarNet
from gadget.recon.config import ConfigError, ReconConfig, client_merge
from gadget.recon.engine import Reconstructor
from tests.conftest import equispaced_mask

SMALL = dict(num_cascades=3, chans=6, pools=3, sens_chans=4, sens_pools=2)
REDUCED = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {"bf16": 1.5e-2, "fp16": 2e-3}  # relative L2 difference of the image to fp32


def _input(small_volume, device="cpu"):
    k = torch.from_numpy(small_volume.kspace[:2])  # (2, 6, 128, 48) complex64
    mask = torch.from_numpy(equispaced_mask(k.shape[-1], 4, 8))
    return (k * mask).to(device), mask.to(device)


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


class _DtypeSpy:
    """Records the dtypes reaching every conv layer and every FFT call during a forward."""

    def __init__(self, model, monkeypatch):
        self.conv, self.fft = set(), set()
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.register_forward_hook(lambda mod, inp, out: self.conv.add(out.dtype))
        for name in ("fft2", "ifft2"):
            original = getattr(torch.fft, name)

            def spy(x, *a, _original=original, **kw):
                self.fft.add(x.dtype)
                return _original(x, *a, **kw)
            monkeypatch.setattr(torch.fft, name, spy)


def _pair(precision):
    torch.manual_seed(0)
    plain = VarNet(**SMALL).eval()
    reduced = VarNet(**SMALL).eval()
    reduced.load_state_dict(plain.state_dict())
    return plain, reduced.set_precision(precision)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_unets_run_reduced_while_ffts_stay_fp32(small_volume, monkeypatch, precision):
    plain, reduced = _pair(precision)
    k, mask = _input(small_volume)
    with torch.no_grad():
        expected = plain(k, mask, 8)
        spy = _DtypeSpy(reduced, monkeypatch)
        out = reduced(k, mask, 8)
    assert spy.conv == {REDUCED[precision]}          # every convolution ran in the reduced type
    assert spy.fft == {torch.complex64}              # every FFT got complex64 input
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # bf16 keeps 8 mantissa bits (rel. rounding 2^-9 ≈ 2e-3 per op), fp16 11 bits (2^-12); measured
    # through 3 cascades: 4.0e-3 and 4.7e-4. The lower bound shows the reduced arithmetic happened.
    err = _rel(out, expected)
    assert 1e-5 < err < TOLERANCE[precision], err


def test_fp32_is_the_default_and_unchanged(small_volume, monkeypatch):
    untouched, again = _pair("fp32")              # a fresh model, and one set to fp32 explicitly
    k, mask = _input(small_volume)
    with torch.no_grad():
        out = untouched(k, mask, 8)
        assert torch.equal(out, again(k, mask, 8))
        spy = _DtypeSpy(untouched, monkeypatch)  # with hooks every layer module runs (no fused CPU path)
        spied = untouched(k, mask, 8)
    assert untouched.precision == "fp32" and spy.conv == {torch.float32} and spy.fft == {torch.complex64}
    assert _rel(spied, out) < 1e-5  # the layer-by-layer path and the fused one: the same function


def test_precision_errors_name_the_choices():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        VarNet(**SMALL).set_precision("fp8")
    with pytest.raises(ValueError, match="static graph runs in fp32.*bf16"):
        StaticVarNet(VarNet(**SMALL).set_precision("bf16"), 48, 8)


def test_engine_sets_precision_or_keeps_the_models(small_volume, caplog):
    k, mask = _input(small_volume)
    model = VarNet(**SMALL)
    Reconstructor(model, "cpu", "fp32")
    assert "far slower than fp32" not in caplog.text
    engine = Reconstructor(model, "cpu", "bf16")
    assert model.precision == "bf16"
    assert "U-Nets in bf16 on the CPU" in caplog.text and "far slower than fp32" in caplog.text
    Reconstructor(model, "cpu")                       # None: left as it is (a training model passed in)
    assert model.precision == "bf16"
    out = engine(k.numpy(), mask.numpy(), 8)
    assert out.dtype == np.float32 and out.shape == (2, 128, 48) and np.isfinite(out).all()


def test_precision_is_an_operator_setting():
    from gadget.model.varnet import PRECISIONS
    from gadget.recon.config import CHOICES

    assert CHOICES["precision"] == tuple(PRECISIONS)  # the config (and CLI) list, kept torch-free, is the model's
    cfg = ReconConfig().merged({"precision": "bf16"}, "command line")
    assert cfg.precision == "bf16"
    with pytest.raises(ConfigError, match="'precision' = 'half' must be one of fp32, bf16, fp16"):
        ReconConfig().merged({"precision": "half"}, "preset x")
    with pytest.raises(ConfigError, match="'precision' cannot be set by a client"):
        client_merge(ReconConfig(), {"precision": "fp16"}, "JSON parameters")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_on_cuda_matches_fp32(small_volume, monkeypatch, precision):
    plain, reduced = _pair(precision)
    k, mask = _input(small_volume, "cuda")
    with torch.no_grad():
        expected = plain.cuda()(k, mask, 8)
        spy = _DtypeSpy(reduced.cuda(), monkeypatch)
        out = reduced(k, mask, 8)
    assert spy.conv == {REDUCED[precision]} and spy.fft == {torch.complex64}
    assert 1e-6 < _rel(out, expected) < TOLERANCE[precision]


def test_server_refuses_a_gadgetron_chain_asking_for_another_precision():
    """The shipped external chain names precision fp32 (the default): a bf16 server must see that."""
    from pathlib import Path

    from gadget.server import ReconService, SessionError

    chain = (Path(__file__).resolve().parents[1] / "pipelines" / "varnet-external.xml").read_text()
    assert '<property name="precision" value="fp32"/>' in chain
    engine = Reconstructor(VarNet(**SMALL), "cpu", "bf16")
    base = ReconConfig(checkpoint="/models/model.pt", precision="bf16")  # the operator gave this server its model
    service = ReconService(base, engine, "test-model")
    asked = service._config_text(chain, base, "gadgetron")
    assert asked.precision == "fp32"
    with pytest.raises(SessionError, match="precision 'fp32' requested, but this server's model runs in 'bf16'"):
        service._engine_for(asked)
    bf16_chain = chain.replace('value="fp32"', 'value="bf16"')
    assert service._engine_for(service._config_text(bf16_chain, base, "gadgetron")) is engine
