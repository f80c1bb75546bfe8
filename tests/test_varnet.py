"""E2E-VarNet equals fastMRI's reference (test oracle) and improves on its fragile spots."""
import numpy as np
import pytest
import torch

from gadget.model.varnet import VarNet, count_parameters, detect_num_low_frequencies

fastmri_models = pytest.importorskip("fastmri.models", reason="fastmri (test oracle) not installed")

SMALL = dict(num_cascades=3, chans=6, pools=3, sens_chans=4, sens_pools=2)
DEFAULT = {}


def _pair(cfg, dtype=torch.float32):
    ref = fastmri_models.VarNet(**cfg).eval().to(dtype)
    ours = VarNet(**cfg).eval().to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _phantom_input(small_volume, acs=8, acceleration=4):
    from tests.conftest import equispaced_mask

    k = torch.from_numpy(small_volume.kspace[:2])  # (2, 6, 128, 48)
    mask = torch.from_numpy(equispaced_mask(k.shape[-1], acceleration, acs))
    return k * mask, mask


def _run_ref(ref, k, mask, acs):
    m = mask.view(1, 1, 1, -1, 1).expand(k.shape[0], 1, 1, -1, 1)
    return ref(torch.view_as_real(k), m, acs)


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_default_config_matches_reference_parameter_names_and_count():
    ref, ours = fastmri_models.VarNet(), VarNet()
    assert count_parameters(ours) == 29_936_966
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd) and len(our_sd) == 324
    assert all(our_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    assert list(dict(ours.named_buffers())) == []


@pytest.mark.parametrize("cfg", [SMALL, DEFAULT], ids=["small", "default"])
def test_matches_reference_fp32(cfg, small_volume):
    """fp32 relative L2 error < 1e-5 on structured (phantom) data; the reference's own fp32 error
    against fp64 is ~5e-6 here, so we also require ours to be no further from fp64 than 2× that."""
    k, mask = _phantom_input(small_volume)
    ref, ours = _pair(cfg)
    ref64, _ = _pair(cfg, torch.float64)
    ref64.load_state_dict(ref.state_dict())
    with torch.no_grad():
        a = _run_ref(ref, k, mask, 8)
        b = ours(k, mask, 8)
        truth = _run_ref(ref64, k.to(torch.complex128), mask, 8)
    assert b.shape == (2, 128, 48) and b.dtype == torch.float32
    assert _rel(b, a) < 1e-5
    assert _rel(b.double(), truth) <= 2 * max(_rel(a.double(), truth), 1e-7)


def test_matches_reference_fp64_exactly_same_function(small_volume):
    """In float64 the two implementations agree to rounding: the same function, not an approximation."""
    k, mask = _phantom_input(small_volume)
    ref, ours = _pair(SMALL, torch.float64)
    k = k.to(torch.complex128)
    with torch.no_grad():
        for acs in (8, None):  # explicit count and the reference's detection path
            a = _run_ref(ref, k, mask, acs)
            b = ours(k, mask, acs)
            assert _rel(b, a) < 1e-12


def test_detection_matches_reference_and_explicit_count_is_used(small_volume):
    from fastmri.models.varnet import SensitivityModel

    rng = np.random.default_rng(3)
    for _ in range(10):
        m = torch.from_numpy(rng.random(48) < 0.4)
        m[20:28] = True
        _, want = SensitivityModel(2, 1).get_pad_and_num_low_freqs(m.view(1, 1, 1, -1, 1).float())
        assert int(detect_num_low_frequencies(m.view(1, 1, 1, -1))[0]) == int(want[0])

    # An asymmetric ACS block: detection finds 2*min(left, right), the explicit count differs and wins.
    k = torch.from_numpy(small_volume.kspace[:2])
    mask = torch.zeros(48, dtype=torch.bool)
    mask[::4] = True
    mask[19:31] = True  # 12 lines, centre 24 → detection gives 2*min(5, 7) = 10
    assert int(detect_num_low_frequencies(mask.view(1, 1, 1, -1))[0]) == 10
    ref, ours = _pair(SMALL)
    with torch.no_grad():
        explicit = ours(k * mask, mask, 12)
        detected = ours(k * mask, mask)
        assert _rel(explicit, _run_ref(ref, k * mask, mask, 12)) < 1e-5
        assert _rel(detected, _run_ref(ref, k * mask, mask, None)) < 1e-5
        assert _rel(explicit, detected) > 1e-4  # the count really changes the result


def test_per_sample_acs_counts_in_a_batch(small_volume):
    k, mask = _phantom_input(small_volume)
    _, ours = _pair(SMALL)
    with torch.no_grad():
        batch = ours(k, mask, torch.tensor([8, 4]))
        single = torch.cat([ours(k[:1], mask, 8), ours(k[1:], mask, 4)])
    assert _rel(batch, single) < 1e-5


def test_batch_equals_single_slices(small_volume):
    k, mask = _phantom_input(small_volume)
    _, ours = _pair(SMALL)
    with torch.no_grad():
        batch = ours(k, mask, 8)
        singles = torch.cat([ours(k[i:i + 1], mask, 8) for i in range(k.shape[0])])
    assert _rel(batch, singles) < 1e-5


@pytest.mark.parametrize("value", [0.0, 1e-3 + 2e-3j])
def test_zero_and_constant_input_give_finite_output(value):
    _, ours = _pair(SMALL)
    k = torch.full((1, 4, 32, 32), value, dtype=torch.complex64)
    mask = torch.ones(32, dtype=torch.bool)
    with torch.no_grad():
        out = ours(k, mask, 8)
    assert torch.isfinite(out).all()
    # the reference produces NaN for all-zero input (division by a zero std) — the fragility we fix
    if value == 0.0:
        ref, _ = _pair(SMALL)
        with torch.no_grad():
            assert torch.isnan(_run_ref(ref, k, mask, 8)).any()


@pytest.mark.parametrize("scale", [1e-14, 2.0 ** -50, 1e12])
def test_the_output_follows_the_data_scale_where_the_clamps_would_act(small_volume, scale):
    """Scanners write k-space in arbitrary units. The network's normalisations clamp a std and an RSS at
    1e-12; on data scaled by 1e-14 those clamps would act (an image error of order 1). The output scaled
    back matches the reference on the unscaled data (fp32, the tolerance of the test above), and for a
    power of two it is the unscaled output to the bit."""
    k, mask = _phantom_input(small_volume)
    ref, ours = _pair(SMALL)
    with torch.no_grad():
        a = _run_ref(ref, k, mask, 8)
        plain = ours(k, mask, 8)
        b = ours((k * scale).to(torch.complex64), mask, 8) / scale
    assert float(k.abs().max()) * scale < 1e-12 or scale > 1
    assert _rel(b, a) < 1e-5
    if float(np.log2(scale)).is_integer():
        assert torch.equal(b, plain)


def test_input_validation_errors():
    ours = VarNet(**SMALL)
    with pytest.raises(TypeError, match="complex"):
        ours(torch.zeros(1, 2, 16, 16), torch.ones(16, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch, coil, readout, phase"):
        ours(torch.zeros(2, 16, 16, dtype=torch.complex64), torch.ones(16, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        ours(torch.zeros(1, 2, 16, 16, dtype=torch.complex64), torch.ones(15, dtype=torch.bool))


# ----------------------------------------------------------------------------- output="sense"


def _normalized_maps(shape, seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(*shape, dtype=torch.complex128, generator=g)
    return maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()


def test_sense_output_equals_rss_for_coil_images_of_the_model_form():
    """k = F(S·x) with Σ|S|² = 1: RSS and the map combination both give |x| (analytic)."""
    from gadget.mri.coils import sens_expand

    sens = _normalized_maps((1, 4, 16, 12), 0)
    x = torch.randn(1, 1, 16, 12, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    k = sens_expand(x, sens)
    for output in ("rss", "sense"):
        img = VarNet(num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1, output=output).final_image(k, sens)
        assert torch.allclose(img, x[:, 0].abs(), rtol=1e-10, atol=1e-12), output


def test_sense_output_removes_noise_orthogonal_to_the_maps():
    """Coil noise orthogonal to S at every pixel: the combination ignores it, RSS does not."""
    from gadget.mri.coils import sens_expand
    from gadget.mri.fft import fft2c

    sens = _normalized_maps((1, 4, 16, 12), 2)
    x = torch.randn(1, 1, 16, 12, dtype=torch.complex128, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(1, 4, 16, 12, dtype=torch.complex128, generator=torch.Generator().manual_seed(4))
    noise = noise - sens * (sens.conj() * noise).sum(1, keepdim=True)  # project out the S direction
    k = sens_expand(x, sens) + fft2c(noise)
    model = VarNet(num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1, output="sense")
    assert torch.allclose(model.final_image(k, sens), x[:, 0].abs(), rtol=1e-10, atol=1e-12)
    rss_img = VarNet(num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1).final_image(k, sens)
    assert float((rss_img - x[:, 0].abs()).abs().mean()) > 0.1


def test_sense_output_is_the_forward_pass_output_and_survives_a_checkpoint(tmp_path, small_volume):
    from gadget.model.checkpoint import load_checkpoint, save_checkpoint
    from gadget.mri.coils import sens_reduce

    torch.manual_seed(0)
    model = VarNet(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2, output="sense").eval()
    k, mask = _phantom_input(small_volume)
    acs = 8
    with torch.no_grad():
        out = model(k, mask, acs)
        sens = model.sens_net(k, mask, acs)
        kk = k
        for cascade in model.cascades:
            kk = cascade(kk, k, mask, sens)
        expected = sens_reduce(kk, sens)[:, 0].abs()
    # the forward runs the cascades in the unshifted k-space frame (gadget.mri.fft): equal up to rounding
    assert _rel(out, expected) < 1e-6
    save_checkpoint(tmp_path / "m.pt", model)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config.output == "sense"
    with torch.no_grad():
        assert torch.equal(loaded.model(k, mask, acs), out)


def test_unknown_output_is_rejected():
    with pytest.raises(ValueError, match="output must be one of rss, sense"):
        VarNet(output="mean")


def test_inference_path_is_the_reference_function(small_volume):
    """CPU float32 inference (no autograd) takes the fused path: channels-last U-Nets with packed oneDNN
    weights and the cascades in the unshifted k-space frame. Same function as the layer-by-layer path
    (autograd on) and as fastMRI's VarNet: max relative difference < 1e-4, L2 < 1e-5."""
    k, mask = _phantom_input(small_volume)
    ref, ours = _pair(SMALL)
    with torch.inference_mode():
        fast = ours(k, mask, 8)
        want = _run_ref(ref, k, mask, 8)
    with torch.enable_grad():
        plain = ours(k, mask, 8).detach()
    assert float((fast - want).abs().max() / want.abs().max()) < 1e-4
    assert _rel(fast, want) < 1e-5 and _rel(fast, plain) < 1e-5
    assert not torch.equal(fast, plain)  # the two paths really differ (rounding), so both were run


@pytest.mark.parametrize("per_block", [1, 2, None], ids=["one", "two", "all"])
def test_inference_in_blocks_of_images_and_coils_is_the_reference_function(small_volume, monkeypatch, per_block):
    """The fast path runs the NormUnet on blocks of images and the cascades' coil operators on blocks of
    coils (gadget.model.varnet.IMAGE_BLOCK_BYTES, COIL_BLOCK_BYTES): one, two or all per block give
    fastMRI's output within the bounds above. The output starts as NaN where the blocks write it."""
    import gadget.model.varnet as varnet

    k, mask = _phantom_input(small_volume)
    ref, ours = _pair(SMALL)
    h, w = k.shape[-2:]
    image_bytes = SMALL["sens_chans"] * 128 * 48 * 4  # level-0 activations of one image (padded to 16: 128 × 48)
    coil_bytes = h * w * 8
    scale = 1 << 40 if per_block is None else per_block
    monkeypatch.setattr(varnet, "IMAGE_BLOCK_BYTES", image_bytes * scale + image_bytes // 2)
    monkeypatch.setattr(varnet, "COIL_BLOCK_BYTES", coil_bytes * scale + coil_bytes // 2)
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real_empty_like(t, **kw).fill_(float("nan")))
    with torch.inference_mode():
        fast = ours(k, mask, 8)
    monkeypatch.undo()
    with torch.inference_mode():
        want = _run_ref(ref, k, mask, 8)
    assert torch.isfinite(fast).all()
    assert float((fast - want).abs().max() / want.abs().max()) < 1e-4 and _rel(fast, want) < 1e-5


@pytest.mark.parametrize("shape", [(1, 2, 40, 30), (3, 2, 33, 47)], ids=["even", "odd-batch"])
def test_unet_fast_path_equals_the_modules(shape):
    """The channels-last U-Net (packed weights, split decoder convolutions, reflection padding on odd
    sizes) against the same modules called one by one (a forward hook forces that path)."""
    from gadget.model.unet import Unet

    torch.manual_seed(0)
    unet = Unet(2, 2, chans=6, num_pool_layers=3).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        fast = unet(x)
        handle = unet.register_forward_hook(lambda *a: None)
        plain = unet(x)
        handle.remove()
        again = unet(x)
    assert fast.shape == plain.shape == shape
    assert _rel(fast, plain) < 1e-5 and torch.equal(fast, again)


def test_packed_weights_follow_weight_changes(small_volume):
    """The fast path keeps oneDNN-packed copies of the weights beside the modules: loading other weights
    (or training them) must not leave stale copies in use, and a deep copy of the model works."""
    import copy

    k, mask = _phantom_input(small_volume)
    ref, ours = _pair(SMALL)
    with torch.inference_mode():
        first = ours(k, mask, 8)
    other = fastmri_models.VarNet(**SMALL).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)
    ours.load_state_dict(other.state_dict())
    clone = copy.deepcopy(ours)
    with torch.inference_mode():
        second, cloned = ours(k, mask, 8), clone(k, mask, 8)
        want = _run_ref(other, k, mask, 8)
    assert _rel(second, want) < 1e-5 and _rel(cloned, want) < 1e-5 and _rel(first, second) > 1e-3


@pytest.mark.parametrize("path", ["unshifted", "odd-width", "autograd"])
@pytest.mark.parametrize("output", ["rss", "sense"])
def test_final_coil_images_are_the_transform_of_the_final_kspace(small_volume, path, output):
    """``forward_with_kspace(coil_images=True)``: the same image and k-space as without, and coil images equal
    to ``ifft2c`` of that k-space (numpy's centred transform, float32 rounding), on the inference path's
    unshifted frame, on the centred loop an odd width takes, and with autograd on."""
    k, mask = _phantom_input(small_volume)
    if path == "odd-width":
        k, mask = k[..., :47], mask[:47]
    model = VarNet(**SMALL, output=output).eval()
    with (torch.enable_grad() if path == "autograd" else torch.inference_mode()):
        image, final = model.forward_with_kspace(k, mask, 8)
        again, same, coils = model.forward_with_kspace(k, mask, 8, coil_images=True)
    assert torch.equal(again, image) and torch.equal(same, final)
    f = final.detach().numpy()
    want = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(f, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    np.testing.assert_allclose(coils.detach().numpy(), want, rtol=0, atol=1e-6 * np.abs(want).max())
