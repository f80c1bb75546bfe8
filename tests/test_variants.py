"""The seed paper's ablation variants (e2e, vnu-k, vnu, vn) as one model with switches: forward shapes,
the cascade update formulas against numpy, data consistency, fixed maps = our ESPIRiT, checkpoints,
parameter counts against the paper's and against analytic sums, export refusal, and the engine /
pipeline end to end on a vnu checkpoint.

Independent references: numpy centred FFTs (the cascade updates), ``espirit_maps`` called directly (the
fixed maps), analytic parameter sums and the paper's reported counts (§4.1), the model applied directly
with independently computed maps (the pipeline output). Seeds fixed (conftest seeds torch with 0)."""
import numpy as np
import pytest
import torch
from torch import nn

from gadget.baselines.espirit import espirit_maps, fixed_maps
from gadget.model.checkpoint import CheckpointError, infer_config, load_checkpoint, save_checkpoint
from gadget.model.export import StaticVarNet
from gadget.model.varnet import VARIANTS, VarNet, VarNetBlock, count_parameters
from gadget.model.vn_regularizer import VN_FILTERS, VN_KERNEL, VN_RBF, VNRegularizer
from gadget.recon.batching import BatchingEngine
from gadget.recon.engine import Reconstructor
from tests.conftest import equispaced_mask

SMALL = dict(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2)
ACS = 8
FIXED = ("vnu-k", "vnu", "vn")


def np_fft2c(x):
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def np_ifft2c(k):
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.fixture(scope="module")
def case():
    """Two slices of the small simulated volume (6 coils, k-space 128 × 48), 4× equispaced + 8 ACS lines,
    and their ESPIRiT maps (computed once)."""
    from gadget.converters.simulate import simulate_volume

    vol = simulate_volume(num_slices=3, num_coils=6, recon_size=(64, 48), seed=7)
    mask = equispaced_mask(48, 4, ACS)
    k = (vol.kspace[:2] * mask).astype(np.complex64)
    return torch.from_numpy(k), torch.from_numpy(mask), torch.from_numpy(fixed_maps(k, mask, ACS))


class Zero(nn.Module):
    """A regulariser that returns 0 (isolates the data-consistency part of a cascade)."""

    def forward(self, x):
        return torch.zeros_like(x)


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_runs_with_the_right_shapes_and_parameters(case, variant):
    k, mask, maps = case
    model = VarNet(**SMALL, variant=variant).eval()
    extra = {"sens_maps": maps} if model.needs_maps else {}
    with torch.no_grad():
        image, final = model.forward_with_kspace(k, mask, ACS, **extra)
    assert image.shape == (2, 128, 48) and image.dtype == torch.float32
    assert final.shape == k.shape and final.is_complex()
    assert torch.isfinite(image).all() and torch.isfinite(torch.view_as_real(final)).all()
    assert float(image.abs().max()) > 0
    names = set(model.state_dict())
    assert model.needs_maps == (variant != "e2e")
    assert any(n.startswith("sens_net.") for n in names) == (variant == "e2e")
    assert ("cascades.0.dc_weight" in names) == (variant in ("e2e", "vnu-k"))
    assert ("cascades.0.step_size" in names) == (variant in ("vnu", "vn"))
    assert ("cascades.0.model.filters" in names) == (variant == "vn")


@pytest.mark.parametrize("variant", ["vnu", "vn"])
def test_image_space_variants_output_the_magnitude_of_x_and_their_kspace_is_F_S_x(case, variant):
    """|x| as the image, F S x as the final k-space: then RSS of the final coil images equals the output
    wherever Σ|S|² = 1 (numpy inverse FFT as the reference)."""
    k, mask, maps = case
    model = VarNet(**SMALL, variant=variant).eval()
    with torch.no_grad():
        image, final = model.forward_with_kspace(k, mask, ACS, sens_maps=maps)
    rss = np.sqrt((np.abs(np_ifft2c(final.numpy())) ** 2).sum(1))
    inside = (np.abs(maps.numpy()) ** 2).sum(1) > 0.5
    np.testing.assert_allclose(rss[inside], image.numpy()[inside], rtol=1e-4, atol=1e-4 * float(image.max()))


def test_fixed_map_variants_need_maps_and_e2e_refuses_them(case):
    k, mask, maps = case
    for variant in FIXED:
        with pytest.raises(ValueError, match=f"variant '{variant}' needs fixed sensitivity maps"):
            VarNet(**SMALL, variant=variant)(k, mask, ACS)
        with pytest.raises(ValueError, match="sens_kspace"):
            VarNet(**SMALL, variant=variant)(k, mask, ACS, sens_kspace=k, sens_maps=maps)
    with pytest.raises(ValueError, match="'e2e' estimates its own sensitivities"):
        VarNet(**SMALL)(k, mask, ACS, sens_maps=maps)
    model = VarNet(**SMALL, variant="vnu")
    with pytest.raises(ValueError, match=r"sens_maps must be complex \(batch or 1, 6, 128, 48\)"):
        model(k, mask, ACS, sens_maps=maps[:, :3])
    with pytest.raises(ValueError, match="not normalised"):
        model(k, mask, ACS, sens_maps=maps * 2)
    with pytest.raises(ValueError, match="variant must be one of e2e, vnu-k, vnu, vn, got 'vnx'"):
        VarNet(**SMALL, variant="vnx")


# ----------------------------------------------------------------------------- cascade formulas (numpy)

@pytest.mark.parametrize("domain", ["kspace", "image"])
def test_one_cascade_equals_the_papers_update_in_numpy(case, domain):
    """kspace (eqs. 10-11): k − η·M(k − k̃) − F S CNN(Sᴴ F⁻¹ k); image (eq. 7): x − η·Sᴴ F⁻¹ M(F S x − k̃) − CNN(x).
    η = 0.7; the CNN is the block's own U-Net, evaluated on the numpy-formed input."""
    k, mask, maps = case
    gen = np.random.default_rng(3)
    block = VarNetBlock(VarNet(**SMALL, variant="vnu").cascades[0].model, domain).eval()
    eta = 0.7
    with torch.no_grad():
        (block.dc_weight if domain == "kspace" else block.step_size).fill_(eta)
    s, y, m = maps.numpy(), k.numpy(), mask.numpy().astype(bool)
    if domain == "kspace":
        cur = (y + 0.3 * (gen.standard_normal(y.shape) + 1j * gen.standard_normal(y.shape)) * np.abs(y).max()
               ).astype(np.complex64)
        image = (np.conj(s) * np_ifft2c(cur)).sum(1, keepdims=True)
        with torch.no_grad():
            cnn = block.model(torch.from_numpy(image.astype(np.complex64))).numpy()
        want = cur - eta * np.where(m, cur - y, 0) - np_fft2c(s * cnn)
    else:
        cur = (gen.standard_normal((2, 1, 128, 48)) + 1j * gen.standard_normal((2, 1, 128, 48))).astype(np.complex64)
        grad = (np.conj(s) * np_ifft2c(np.where(m, np_fft2c(s * cur) - y, 0))).sum(1, keepdims=True)
        with torch.no_grad():
            cnn = block.model(torch.from_numpy(cur)).numpy()
        want = cur - eta * grad - cnn
    with torch.no_grad():
        got = block(torch.from_numpy(cur), k, mask.view(1, 1, 1, -1), maps).numpy()
    assert _rel(got, want) < 1e-5


def test_kspace_variants_are_data_consistent_at_sampled_lines(case):
    """Soft DC with η = 1 and no refinement replaces the sampled lines by the measurements exactly (the
    paper's DC term, eq. 10), and leaves the unsampled ones alone."""
    k, mask, maps = case
    for variant in ("e2e", "vnu-k"):
        model = VarNet(**SMALL, variant=variant).eval()
        extra = {"sens_maps": maps} if model.needs_maps else {}
        for c in model.cascades:
            c.model = Zero()
        with torch.no_grad():
            start = k + 0.5 * torch.randn_like(k) * k.abs().max()  # arbitrary current k-space
            sens = model.sensitivities(k, mask.view(1, 1, 1, -1), ACS, sens_maps=extra.get("sens_maps"))
            out = model.cascades[0](start, k, mask.view(1, 1, 1, -1), sens)
        sampled = mask.bool()
        scale = float(start.abs().max())  # k − η(k − k̃) rounds in float32: k̃ to within its ulp
        assert float((out[..., sampled] - k[..., sampled]).abs().max()) < 1e-6 * scale
        assert torch.equal(out[..., ~sampled], start[..., ~sampled])


def test_image_space_cascades_without_regulariser_descend_the_data_term(case):
    """With R = 0 and η = 1 each vnu cascade is a gradient step on ½‖A x − k̃‖² (‖AᴴA‖ ≤ 1 for Σ|S|² ≤ 1
    and an orthonormal FFT), so the residual never grows, and it starts at x₀ = Aᴴ k̃."""
    k, mask, maps = case
    model = VarNet(num_cascades=6, chans=4, pools=2, variant="vnu").eval()
    for c in model.cascades:
        c.model = Zero()
    m = mask.view(1, 1, 1, -1)
    x = model.initial_state(k, maps)
    np.testing.assert_allclose(x.numpy(), (np.conj(maps.numpy()) * np_ifft2c(k.numpy())).sum(1, keepdims=True),
                               rtol=0, atol=1e-5 * float(x.abs().max()))
    residuals = []
    with torch.no_grad():
        for c in model.cascades:
            residuals.append(float(torch.linalg.vector_norm(torch.where(m, model.final_kspace(x, maps) - k, 0))))
            x = c(x, k, m, maps)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(residuals, residuals[1:]))
    assert residuals[-1] < 0.9 * residuals[0]


# ----------------------------------------------------------------------------- fixed maps

def test_fixed_maps_equal_our_espirit_on_the_same_acs(case):
    k, mask, maps = case
    for i in range(2):
        want = espirit_maps(k[i].numpy(), ACS).numpy()
        np.testing.assert_array_equal(maps[i].numpy(), want)
        np.testing.assert_array_equal(fixed_maps(k[i].numpy(), mask.numpy(), ACS), want)  # one slice
    # without a count: the mask's centre run, as espirit_maps finds it from the same mask
    found = fixed_maps(k.numpy(), mask.numpy())
    for i in range(2):
        np.testing.assert_array_equal(found[i], espirit_maps(k[i].numpy(), mask=mask.numpy()).numpy())
    energy = (np.abs(maps.numpy()) ** 2).sum(1)
    assert np.all((np.abs(energy - 1) < 1e-4) | (energy == 0)) and energy.mean() > 0.1  # object ≈ 18 % of the FOV


def test_fixed_maps_need_two_acs_lines(case):
    k, _, _ = case
    one = np.zeros(48, bool)
    one[24] = True
    with pytest.raises(ValueError, match="at least 2 fully sampled centre"):
        fixed_maps(k[0].numpy() * one, one)
    with pytest.raises(ValueError, match="at least 2 fully sampled centre"):
        fixed_maps(k.numpy(), None, 1)
    with pytest.raises(ValueError, match="complex"):
        fixed_maps(np.abs(k.numpy()), None, ACS)


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_round_trip_per_variant(tmp_path, case, variant):
    k, mask, maps = case
    model = VarNet(**SMALL, variant=variant).eval()
    extra = {"sens_maps": maps} if model.needs_maps else {}
    save_checkpoint(tmp_path / "m.pt", model)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.config.variant == variant and loaded.config == model.config
    # a bare state dict: the variant from the parameter names
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    bare = load_checkpoint(tmp_path / "bare.pt")
    assert bare.kind == "fastmri-state-dict" and bare.config.variant == variant
    assert infer_config(model.state_dict()).variant == variant
    with torch.no_grad():
        want = model(k, mask, ACS, **extra)
        assert torch.equal(loaded.model(k, mask, ACS, **extra), want)
        assert torch.equal(bare.model(k, mask, ACS, **extra), want)


def test_unknown_variant_in_a_checkpoint_is_a_clear_error(tmp_path):
    model = VarNet(**SMALL, variant="vnu")
    save_checkpoint(tmp_path / "m.pt", model)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["config"]["variant"] = "vnx"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"variant 'vnx' is not known.*known: e2e, vnu-k, vnu, vn"):
        load_checkpoint(tmp_path / "bad.pt")


def test_a_recorded_variant_that_contradicts_the_parameters_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path / "m.pt", VarNet(**SMALL, variant="vnu"))
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["config"]["variant"] = "vnu-k"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="says variant 'vnu-k', but its parameter names are those of 'vnu'"):
        load_checkpoint(tmp_path / "bad.pt")


def test_old_checkpoints_without_a_variant_load_as_e2e(tmp_path):
    model = VarNet(**SMALL)
    save_checkpoint(tmp_path / "m.pt", model)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["config"]["variant"]
    torch.save(payload, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").config.variant == "e2e"


# ----------------------------------------------------------------------------- parameter counts

def _unet_and_sens(cfg):
    e2e = VarNet(**cfg)
    return count_parameters(e2e), count_parameters(e2e.sens_net)


@pytest.mark.parametrize("cfg", [dict(num_cascades=6, chans=8, pools=4, sens_chans=4, sens_pools=4), {}],
                         ids=["shipped", "paper"])
def test_parameter_counts_per_variant(cfg):
    total, sens = _unet_and_sens(cfg)
    n = cfg.get("num_cascades", 12)
    per_vn_cascade = VN_FILTERS * 2 * VN_KERNEL ** 2 + VN_FILTERS * VN_RBF + 1  # filters + RBF weights + η
    counts = {v: count_parameters(VarNet(**cfg, variant=v)) for v in VARIANTS}
    print({"config": cfg or "paper defaults", **counts})
    assert counts["vnu-k"] == counts["vnu"] == total - sens  # same cascades, no sensitivity network
    assert counts["vn"] == n * per_vn_cascade
    if not cfg:  # the paper (§4.1): about 29.5 M for VNU / VNU-K at T = 12, E2E-VN about 30 M
        assert abs(counts["vnu"] - 29.5e6) < 0.01 * 29.5e6
        assert abs(counts["e2e"] - 30e6) < 0.01 * 30e6


def test_vn_at_the_original_ten_cascades_is_near_the_papers_150k():
    count = count_parameters(VarNet(num_cascades=10, variant="vn"))
    assert count == 131_050
    assert abs(count - 150_000) < 0.15 * 150_000


def test_vn_regulariser_is_positively_homogeneous_and_starts_near_linear():
    """R(c·x) = c·R(x) for c > 0 (the per-sample normalisation); at initialisation each activation is
    ≈ 0.1·z inside its range (checked at 5 points against the analytic slope)."""
    reg = VNRegularizer()
    gen = torch.Generator().manual_seed(4)
    x = torch.complex(torch.randn(2, 1, 40, 32, generator=gen), torch.randn(2, 1, 40, 32, generator=gen))
    with torch.no_grad():
        a, b = reg(x), reg(7.5 * x)
        z = torch.tensor([-2.0, -1.0, 0.0, 0.5, 2.0]).view(1, 1, 5, 1).expand(1, VN_FILTERS, 5, 1)
        phi = reg.activation(z)
    assert float((b - 7.5 * a).abs().max()) < 1e-4 * float(b.abs().max())
    np.testing.assert_allclose(phi[0, :, :, 0].numpy(), 0.1 * z[0, :, :, 0].numpy(), atol=2e-3)


# ----------------------------------------------------------------------------- export, engine, pipeline

@pytest.mark.parametrize("variant", FIXED)
def test_static_graph_of_each_fixed_map_variant_equals_the_model(case, variant):
    """The export graph (real layout, maps as a third input) computes what the eager variant computes
    (float64, so only summation order differs); it refuses a call without maps."""
    k, mask, maps = case
    torch.manual_seed(3)
    model = VarNet(**SMALL, variant=variant).eval().double()
    k64, maps64 = k.to(torch.complex128), maps.to(torch.complex128)
    with torch.no_grad():
        eager = model(k64, mask, ACS, sens_maps=maps64)
        static = StaticVarNet(model, k.shape[-1], ACS)
        out = static(torch.view_as_real(k64), mask.double(), torch.view_as_real(maps64))
    assert torch.allclose(out, eager, rtol=1e-9, atol=1e-10 * float(eager.abs().max()))
    with pytest.raises(ValueError, match="sens_maps are required"):
        static(torch.view_as_real(k64), mask.double())


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_fixed_map_variants_export_and_match(tmp_path, case, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install '.[export]')")
        pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install '.[export]')")
    from gadget.model.export import export_model, verify_export

    k, mask, maps = case
    for variant in FIXED:
        torch.manual_seed(4)
        model = VarNet(**SMALL, variant=variant).eval()
        path = export_model(model, tmp_path / f"{variant}.{fmt}", fmt, *k.shape[1:], num_low_frequencies=ACS)
        assert verify_export(path, fmt, model, k[:1], mask, ACS, sens_maps=maps[:1]) < 1e-4, variant


def test_engine_computes_and_caches_maps_and_batching_passes_them(case):
    k, mask, maps = case
    model = VarNet(**SMALL, variant="vnu").eval()
    engine = Reconstructor(model, "cpu")
    images, final = engine.run(k.numpy(), mask.numpy(), ACS)
    with torch.no_grad():
        want = model(k, mask, ACS, sens_maps=maps).numpy()
    np.testing.assert_allclose(images, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))
    assert engine.maps_cache.misses == 2 and engine.maps_cache.hits == 0
    withheld = mask.numpy().copy()
    withheld[np.flatnonzero(withheld)[[0, -1]]] = False  # outer lines, as the safety check's re-run
    engine.run(k.numpy() * withheld, withheld, ACS)
    assert engine.maps_cache.hits == 2 and engine.maps_cache.misses == 2
    batching = BatchingEngine(engine, max_batch=2)
    assert batching.needs_maps and engine.needs_maps
    try:
        out = batching(k[0].numpy(), mask.numpy(), ACS)
    finally:
        batching.close()
    np.testing.assert_allclose(out[0], want[0], rtol=0, atol=1e-6 * float(np.abs(want).max()))
    with pytest.raises(ValueError, match="at least 2 fully sampled centre"):
        engine.run(k.numpy(), mask.numpy(), 1)


def test_maps_cache_is_bounded():
    from gadget.recon.engine import MapsCache

    gen = np.random.default_rng(0)
    cache = MapsCache(max_bytes=2 * 4 * 24 * 24 * 8)  # two slices' maps
    for i in range(4):
        k = (gen.standard_normal((4, 24, 24)) + 1j * gen.standard_normal((4, 24, 24))).astype(np.complex64)
        cache.get_or_compute(k, np.ones(24, bool), 12)
    assert len(cache) == 2 and cache.misses == 4


def test_pipeline_runs_a_vnu_checkpoint_end_to_end(tmp_path):
    """ScanReconstructor (the pipeline every door runs) with a vnu checkpoint on a tiny raw scan: images
    equal the model applied directly to the scan's k-space with ESPIRiT maps computed independently,
    and the safety check's re-run reused the cached maps."""
    import h5py

    from gadget.converters.ismrmrd_to_fastmri import convert_ismrmrd_to_fastmri
    from gadget.recon.config import ReconConfig
    from gadget.recon.pipeline import ScanReconstructor
    from gadget.stream.images import image_magnitude
    from tests.server_harness import make_scan

    xml, lines, raw = make_scan(tmp_path, slices=2, coils=4, size=(32, 48), accel=4, cf=0.17)
    save_checkpoint(tmp_path / "vnu.pt", VarNet(**SMALL, variant="vnu"))
    engine = Reconstructor(load_checkpoint(tmp_path / "vnu.pt").model, "cpu")
    images = list(ScanReconstructor(xml, ReconConfig(prewhiten=False, fallback="none", device="cpu", refine="none"),
                                    engine).run(lines))
    assert len(images) == 2
    assert engine.maps_cache.hits >= 2  # each slice's safety re-run (withheld outer lines) hit the cache
    convert_ismrmrd_to_fastmri(raw, tmp_path / "fm.h5")
    with h5py.File(tmp_path / "fm.h5", "r") as f:
        kspace, mask, acs = f["kspace"][()], f["mask"][()].astype(bool), int(f.attrs["num_low_frequency"])
    for sl, img in enumerate(images):
        got = image_magnitude(img)
        assert np.isfinite(got).all() and got.max() > 0
        maps = torch.from_numpy(espirit_maps(kspace[sl], acs).numpy()[None])
        with torch.no_grad():
            want = engine.model(torch.from_numpy(kspace[sl][None]), torch.from_numpy(mask), acs,
                                sens_maps=maps)[0].numpy()
        h, w = got.shape
        top, left = (want.shape[0] - h) // 2, (want.shape[1] - w) // 2
        assert _rel(got, want[top:top + h, left:left + w]) < 1e-4


def test_one_scans_map_failure_does_not_fail_its_batch(case):
    """Through the batching engine (as `varnet serve` runs it), a slice whose ESPIRiT fails (all-zero
    k-space: no signal) fails alone; a concurrent good slice gets its image."""
    import threading

    k, mask, maps = case
    model = VarNet(**SMALL, variant="vnu").eval()
    with torch.no_grad():
        want = model(k[:1], mask, ACS, sens_maps=maps[:1]).numpy()
    batching = BatchingEngine(Reconstructor(model, "cpu"), max_batch=2, window_s=0.5)
    results = {}

    def call(name, kspace):
        try:
            results[name] = batching(kspace, mask.numpy(), ACS)
        except ValueError as exc:
            results[name] = exc

    threads = [threading.Thread(target=call, args=("good", k[0].numpy())),
               threading.Thread(target=call, args=("empty", np.zeros_like(k[0].numpy())))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        batching.close()
    assert isinstance(results["empty"], ValueError)
    np.testing.assert_allclose(results["good"][0], want[0], rtol=0, atol=1e-6 * float(np.abs(want).max()))
