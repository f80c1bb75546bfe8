"""The parallel-imaging refinement (gadget/recon/refine.py), its stage after the network
(gadget/recon/refine_stage.py) and its settings."""
import math

import numpy as np
import pytest
import torch

from gadget.cli import main
from gadget.mri.coils import rss
from gadget.mri.fft import fft2c, ifft2c
from gadget.model.varnet import VarNet
from gadget.recon.config import ConfigError, ReconConfig, client_merge
from gadget.recon.engine import Reconstructor
from gadget.recon.refine import RefineConfig, choose_lambda, coil_maps, espirit_coverage, noise_sigma, refine

H, W, COILS = 64, 48, 6


def smooth_maps(seed=0) -> torch.Tensor:
    """Coil maps ``(1, c, H, W)``: Gaussian blobs round the edge with a linear phase, Σ|S|² = 1."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:H, :W]
    maps = []
    for c in range(COILS):
        a = 2 * np.pi * c / COILS
        cy, cx = H / 2 + 0.6 * H * np.sin(a), W / 2 + 0.6 * W * np.cos(a)
        mag = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (0.5 * H) ** 2))
        maps.append(mag * np.exp(1j * (rng.uniform(0, 2 * np.pi) + 0.02 * (x + y))))
    maps = np.stack(maps)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    return torch.from_numpy(maps[None].astype(np.complex64))


def phantom() -> torch.Tensor:
    """An ellipse with two inner ellipses, ``(1, H, W)`` complex64, max 1."""
    y, x = np.mgrid[:H, :W]
    e = lambda cy, cx, ry, rx: ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1  # noqa: E731
    img = 1.0 * e(32, 24, 26, 18) - 0.5 * e(26, 18, 8, 5) + 0.3 * e(40, 28, 6, 8)
    return torch.from_numpy(img[None].astype(np.complex64))


def equispaced(acceleration=3, acs=8) -> torch.Tensor:
    m = np.zeros(W, bool)
    m[::acceleration] = True
    m[W // 2 - acs // 2: W // 2 + acs // 2] = True
    return torch.from_numpy(m)


def test_noise_sigma_recovers_the_level_of_pure_noise():
    """Complex Gaussian noise with E|n|² = σ² everywhere: the estimate is within 3 % (N = 2·8·6·16 = 1536
    samples per slice; the median's relative standard error is about 1/√N · 1.2 ≈ 3 % · 1)."""
    gen = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.5, 2.0])
    noise = torch.complex(torch.randn(2, COILS, 128, W, generator=gen), torch.randn(2, COILS, 128, W, generator=gen))
    noise = noise * (sigma / math.sqrt(2)).view(2, 1, 1, 1)
    mask = equispaced()
    got = noise_sigma(noise * mask, mask)
    np.testing.assert_allclose(got.numpy(), sigma.numpy(), rtol=0.06)


def test_noise_sigma_leaves_out_samples_never_measured():
    """An asymmetric echo (the first 40 % of the readout zero: half the samples the estimate reads) and two
    sampled lines zero-padded: the level is that of the measured samples, within 6 % as above (with the
    zeros counted the median would be near 0). A band with nothing measured gives σ 0."""
    gen = torch.Generator().manual_seed(2)
    sigma = 1.5
    noise = torch.complex(torch.randn(1, COILS, 128, W, generator=gen), torch.randn(1, COILS, 128, W, generator=gen))
    mask = equispaced()
    kspace = noise * (sigma / math.sqrt(2)) * mask
    kspace[:, :, : int(0.4 * 128)] = 0
    kspace[..., torch.nonzero(mask)[:2, 0]] = 0
    assert noise_sigma(kspace, mask).item() == pytest.approx(sigma, rel=0.06)
    kspace[:, :, -16:] = 0
    assert noise_sigma(kspace, mask).item() == 0


def test_choose_lambda_follows_the_noise_within_its_bounds():
    prior = phantom()  # object mean 1.0 (magnitudes 1, 0.5, 1.3 over the object)
    from gadget.recon.refine import lambda_floor

    config = RefineConfig()
    floor = lambda_floor(config, ["espirit"])
    mean_object = float(prior.abs()[prior.abs() > 0.13].mean())
    sigma = torch.tensor([mean_object * 10 ** (-30 / 20)])  # 30 dB: κ · 1e-3 = 0.3
    assert choose_lambda(config, sigma, prior, floor).item() == pytest.approx(0.3, rel=1e-4)
    assert choose_lambda(config, torch.tensor([1e-6]), prior, floor).item() == pytest.approx(config.lam_min)
    assert choose_lambda(config, torch.tensor([10.0]), prior, floor).item() == pytest.approx(config.lam_max)
    assert choose_lambda(RefineConfig(lam=0.07), sigma, prior, floor).item() == pytest.approx(0.07)


def test_coil_maps_are_normalised_where_there_is_signal():
    coils = smooth_maps() * phantom()[:, None]
    maps = coil_maps(fft2c(coils), smooth=0.05)
    energy = (maps.abs() ** 2).sum(1)[0]
    inside = phantom()[0].abs() > 0.2
    np.testing.assert_allclose(energy[inside].numpy(), 1.0, atol=0.01)  # measured 0.9946-0.998 (the floor)


def _refine_case(snr_db=None, seed=0, acs=8):
    """A phantom through smooth maps, 3× with ``acs`` ACS lines; the 'network' is the zero-filled coil k-space
    with its missing lines filled from a blurred copy of the truth (a prior right at low frequencies)."""
    maps, x = smooth_maps(seed), phantom()
    full = fft2c(maps * x[:, None])
    if snr_db is not None:
        gen = torch.Generator().manual_seed(seed)
        sigma = float(x.abs()[x.abs() > 0.1].mean()) * 10 ** (-snr_db / 20)
        full = full + sigma / math.sqrt(2) * torch.complex(torch.randn(full.shape, generator=gen),
                                                           torch.randn(full.shape, generator=gen))
    mask = equispaced(acs=acs)
    measured = full * mask
    ky = torch.exp(-0.5 * ((torch.arange(H) - H // 2) / (0.08 * H)) ** 2)[:, None]
    kx = torch.exp(-0.5 * ((torch.arange(W) - W // 2) / (0.08 * W)) ** 2)[None]
    blurred = fft2c(maps * x[:, None]) * (ky * kx)
    final = torch.where(mask.view(1, 1, 1, W), measured, blurred)
    truth = rss(ifft2c(fft2c(maps * x[:, None])), dim=1)
    return measured, mask.view(1, 1, 1, W), final, rss(ifft2c(final), dim=1), truth


def _rel(a, b) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_refine_recovers_what_the_coils_determine():
    """Noise-free: the solve fills the lines the prior got wrong from the coils (λ 0.02; measured relative
    error 0.141 → 0.081, limited by maps taken from the blurred prior). The noise-adaptive λ sees the
    phantom's sharp edges in the outer readout as noise and leans on the prior: it may not do worse."""
    measured, mask, final, image, truth = _refine_case()
    out = refine(image, final, measured, mask, RefineConfig(lam=0.02))
    assert out.shape == image.shape and out.dtype == torch.float32 and (out >= 0).all()
    assert _rel(out, truth) < 0.75 * _rel(image, truth)
    assert _rel(refine(image, final, measured, mask), truth) < _rel(image, truth)


def test_refine_leans_on_the_prior_as_lambda_grows_and_none_leaves_it():
    measured, mask, final, image, truth = _refine_case(snr_db=30)
    assert torch.equal(refine(image, final, measured, mask, RefineConfig(mode="none")), image)
    heavy = refine(image, final, measured, mask, RefineConfig(lam=1e6))
    assert _rel(heavy, image) < 1e-4
    light = refine(image, final, measured, mask, RefineConfig(lam=0.02))
    assert _rel(light, image) > 100 * _rel(heavy, image)


@pytest.mark.parametrize("bad", [dict(mode="cg"), dict(lam=-1.0), dict(lam=math.inf), dict(lam_min=0.0),
                                 dict(lam_min=2.0), dict(lam_min_network=0.0), dict(smooth=0.0), dict(iterations=0),
                                 dict(maps="bart"), dict(coverage=0.0)])
def test_refine_config_names_bad_values(bad):
    with pytest.raises(ValueError, match="refine"):
        RefineConfig(**bad)


def test_the_engine_returns_the_network_and_the_refine_stage_finishes_it():
    """The engine (direct or batched) returns the network's image and final k-space; the refine stage
    (:class:`Refiner`, :class:`RefinedEngine`) gives what refine() gives on them."""
    from gadget.recon.batching import BatchingEngine
    from gadget.recon.refine_stage import RefinedEngine, Refiner

    torch.manual_seed(0)
    model = VarNet(num_cascades=1, chans=4, pools=2, sens_chans=2, sens_pools=1).eval()
    measured, mask, _, _, _ = _refine_case(snr_db=40)
    k, m = measured.numpy(), mask.reshape(-1).numpy()
    with torch.inference_mode():
        image, final = model.forward_with_kspace(measured, mask.reshape(-1), 8)
        want = refine(image, final, measured, mask).numpy()
    engine = Reconstructor(model, "cpu")
    network, network_final = engine.run(k, m, 8)
    np.testing.assert_allclose(network, image.numpy(), rtol=0, atol=1e-6 * image.numpy().max())
    np.testing.assert_allclose(network_final, final.numpy(), rtol=0, atol=1e-6 * np.abs(final.numpy()).max())
    np.testing.assert_array_equal(engine(k, m, 8), network)  # calling it: the same network image
    np.testing.assert_allclose(Refiner()(network, network_final, k, m, 8), want, rtol=0, atol=1e-5 * want.max())
    np.testing.assert_array_equal(Refiner(RefineConfig(mode="none"))(network, network_final, k, m, 8), network)
    np.testing.assert_allclose(RefinedEngine(engine, Refiner())(k, m, 8), want, rtol=0, atol=1e-5 * want.max())
    np.testing.assert_array_equal(RefinedEngine(engine, Refiner(RefineConfig(mode="none")))(k, m, 8), network)
    # the final coil images handed over (as the pipeline asks): ifft2c of the final k-space, the same refine
    _, _, coils = engine.run(k, m, 8, coil_images=True)
    np.testing.assert_allclose(coils.numpy(), ifft2c(final).numpy(), rtol=0, atol=1e-6 * coils.abs().max().item())
    np.testing.assert_allclose(Refiner()(network, network_final, k, m, 8, coil_images=coils), want, rtol=0,
                               atol=1e-5 * want.max())
    batching = BatchingEngine(engine, max_batch=2)
    try:
        np.testing.assert_allclose(batching.run(k, m, 8)[0], image.numpy(), rtol=0, atol=1e-6 * image.numpy().max())
        assert len(batching.run(k, m, 8)) == 2
        images, _, batched_coils = batching.run(k, m, 8, coil_images=True)
        np.testing.assert_allclose(batched_coils.numpy(), coils.numpy(), rtol=0, atol=1e-6 * coils.abs().max().item())
    finally:
        batching.close()
    no_kspace = type("Engine", (), {"model": torch.nn.Identity(), "device": torch.device("cpu")})()
    with pytest.raises(ValueError, match="refine 'pi' needs the model's final k-space"):
        RefinedEngine(no_kspace, Refiner())
    RefinedEngine(no_kspace, Refiner(RefineConfig(mode="none")))


def test_the_pipeline_refines_the_network_image_and_checks_the_network_kspace(tmp_path):
    """A scan's refine stage is built from its config (auto: the engine's checkpoint refine, pi without
    one; explicit wins); the image sent is the refine stage's output on the network's, and the safety
    check reads the network's final k-space (its consistency figure is the same with and without refine)."""
    from gadget.recon.pipeline import ScanReconstructor
    from gadget.stream.images import image_magnitude
    from tests.server_harness import make_scan

    torch.manual_seed(0)
    xml, lines, _ = make_scan(tmp_path, slices=1, coils=4, size=(32, 24))
    engine = Reconstructor(VarNet(num_cascades=1, chans=4, pools=2, sens_chans=2, sens_pools=1), "cpu")
    settings = dict(prewhiten=False, fallback="none", device="cpu")
    scans, sent = {}, {}
    for refine_setting in ("auto", "none", "pi"):
        scan = ScanReconstructor(xml, ReconConfig(refine=refine_setting, **settings), engine)
        scans[refine_setting] = scan
        (sent[refine_setting],) = list(scan.run(lines))
    assert {name: scan.refiner.mode for name, scan in scans.items()} == {"auto": "pi", "none": "none", "pi": "pi"}
    engine.checkpoint_refine = "none"  # auto follows what the checkpoint records
    assert ScanReconstructor(xml, ReconConfig(**settings), engine).refiner.mode == "none"
    np.testing.assert_array_equal(image_magnitude(sent["auto"]), image_magnitude(sent["pi"]))
    assert not np.array_equal(image_magnitude(sent["auto"]), image_magnitude(sent["none"]))
    import ismrmrd

    meta = {name: ismrmrd.Meta.deserialize(img.attribute_string) for name, img in sent.items()}
    assert meta["pi"]["VarNetConsistency"] == meta["none"]["VarNetConsistency"]  # the network's k-space
    assert meta["pi"]["VarNetPrediction"] == meta["none"]["VarNetPrediction"]    # its re-run: never refined
    assert meta["pi"]["VarNetDeparture"] != meta["none"]["VarNetDeparture"]      # the image sent


def test_refine_is_an_operator_setting_with_checked_values():
    config = ReconConfig().merged({"refine": "none", "refine_lambda": "0.1"}, "preset")
    assert (config.refine, config.refine_lambda) == ("none", 0.1)
    with pytest.raises(ConfigError, match="refine_lambda"):
        ReconConfig().merged({"refine_lambda": -1}, "preset")
    with pytest.raises(ConfigError, match="refine"):
        ReconConfig().merged({"refine": "cg"}, "preset")
    with pytest.raises(ConfigError, match="refine"):
        client_merge(ReconConfig(), {"refine": "none"}, "client")


def test_cli_refine_flag_is_checked():
    with pytest.raises(SystemExit):
        main(["infer", "--input", "x", "--output", "y", "--refine", "cg"])


def test_the_pipeline_engine_records_the_checkpoint_refine_and_the_stage_takes_refine_from_the_config():
    from gadget.recon.pipeline import build_engine
    from gadget.recon.refine_stage import Refiner

    engine, description = build_engine(ReconConfig(refine="none", device="cpu"))
    assert engine.checkpoint_refine == "pi" and "refine" not in description  # the engine does not refine
    assert Refiner.for_config(ReconConfig(refine="none"), engine).mode == "none"
    stage = Refiner.for_config(ReconConfig(refine_lambda=0.2), engine)
    assert (stage.mode, stage.config.lam, stage.device) == ("pi", 0.2, engine.device)


def test_refine_sends_the_solve_itself_on_clean_data_and_the_networks_image_plus_change_on_noisy():
    """The output is w·|x̂| + (1 − w)·(rss + |x̂| − |x₀|) with w = floor/λ ≤ 1 (the floor of the slice's
    maps; the network's here): at the floor it does not depend on the network's RSS image at all; at
    λ = 4·floor a constant added to that image comes through at 1 − w = 3/4 (the image plus change is not
    clamped there: the constant keeps it positive)."""
    from gadget.recon.refine import solved_weight

    measured, mask, final, image, _ = _refine_case(snr_db=30)
    lam_floor = RefineConfig().lam_min_network
    floor = RefineConfig(lam=lam_floor, maps="network")
    base = refine(image, final, measured, mask, floor)
    assert torch.allclose(refine(image + 5.0, final, measured, mask, floor), base, atol=1e-6)
    quarter = RefineConfig(lam=4 * lam_floor, maps="network")
    shift = refine(image + 5.0, final, measured, mask, quarter) - refine(image, final, measured, mask, quarter)
    np.testing.assert_allclose(shift.numpy(), 3.75, atol=1e-4)
    assert float(solved_weight(torch.tensor(0.005), torch.tensor(0.001))) == 1.0  # below the floor: still ≤ 1


def test_the_lambda_floor_follows_each_slices_maps():
    """ESPIRiT's calibrated maps are trusted down to λ 0.005, the network's low-passed ones to 0.02,
    per slice in one batch; a noisy slice's λ stays above both."""
    from gadget.recon.refine import lambda_floor

    config = RefineConfig()
    floor = lambda_floor(config, ["espirit", "network", "espirit"])
    np.testing.assert_allclose(floor.numpy(), [0.005, 0.02, 0.005])
    prior = phantom().expand(3, -1, -1)
    mean_object = float(prior[0].abs()[prior[0].abs() > 0.13].mean())
    sigma = torch.tensor([1e-6, 1e-6, mean_object * 10 ** (-30 / 20)])
    np.testing.assert_allclose(choose_lambda(config, sigma, prior, floor).numpy(), [0.005, 0.02, 0.3], rtol=1e-4)


def test_refine_solves_with_espirit_maps_where_they_cover_the_object_and_the_networks_elsewhere():
    """12 calibration lines: ESPIRiT's maps cover the whole phantom and the solve with them (λ at its floor
    0.005) beats the one with the network's low-passed maps (floor 0.02). 8 lines: ESPIRiT vouches for a
    quarter of it (coverage 0.24; the ``pi`` stage's kernel as wide as the block), so the network's maps
    are used; 1 line: no ESPIRiT at all. ``maps='network'`` never asks ESPIRiT. ``maps='espirit'`` takes
    ESPIRiT's whatever the coverage, unless noise fills its calibration's signal subspace (at 10 dB: every
    eigenvalue near 1, so the coverage test passes them)."""
    from gadget.baselines.espirit import espirit_calibration, espirit_maps
    from gadget.recon.refine import MAX_SIGNAL_SHARE, REFINE_ESPIRIT, SOLVE_ESPIRIT, choose_maps

    measured, mask, final, image, truth = _refine_case(acs=12)
    assert choose_maps(image, final, measured, mask, RefineConfig())[1] == ["espirit"]
    assert choose_maps(image, final, measured, mask, RefineConfig(maps="network"))[1] == ["network"]
    floors = RefineConfig()  # each source's solve at its own λ floor (noise-free data)
    auto = _rel(refine(image, final, measured, mask, RefineConfig(lam=floors.lam_min)), truth)
    network = _rel(refine(image, final, measured, mask, RefineConfig(lam=floors.lam_min_network, maps="network")),
                   truth)
    assert auto < 0.8 * network  # measured 0.051 vs 0.071 (the network's image: 0.124)
    measured, mask, final, image, _ = _refine_case(acs=8)
    _, values = espirit_maps(measured[0], 8, config=REFINE_ESPIRIT, return_eigenvalues=True)
    assert 0.1 < espirit_coverage(values, image[0]) < 0.5  # measured 0.24
    assert choose_maps(image, final, measured, mask, RefineConfig())[1] == ["network"]
    assert choose_maps(image, final, measured, mask, RefineConfig(), num_low=1)[1] == ["network"]
    assert choose_maps(image, final, measured, mask, RefineConfig(maps="espirit"))[1] == ["espirit"]
    noisy, mask, final, image, _ = _refine_case(snr_db=10, acs=12)
    assert espirit_calibration(noisy[0], 12, config=SOLVE_ESPIRIT).signal_share > MAX_SIGNAL_SHARE
    assert espirit_calibration(measured[0], 8, config=SOLVE_ESPIRIT).signal_share < 0.25
    assert choose_maps(image, final, noisy, mask, RefineConfig())[1] == ["espirit"]
    assert choose_maps(image, final, noisy, mask, RefineConfig(maps="espirit"))[1] == ["network"]


def test_espirit_coverage_is_the_share_of_the_object_the_eigenvalues_vouch_for():
    image = torch.zeros(8, 8)
    image[2:6, 2:6] = 1.0  # 16 object pixels
    values = torch.zeros(8, 8)
    values[:, :4] = 0.97   # above 0.95 on 8 of them
    values[:, 4:5] = 0.92  # 4 more above 0.9 only
    assert espirit_coverage(values, image) == 0.5
    assert espirit_coverage(values, image, crop=0.9) == 0.75
    assert espirit_coverage(torch.ones(8, 8), image) == 1.0


def test_refine_takes_one_calibration_count_per_slice_as_the_batching_engine_passes_them():
    """A batch of two slices with ``num_low`` as a per-slice tensor (the batching engine's form) gives each
    slice what it gets alone."""
    one = _refine_case(acs=12)
    two = _refine_case(acs=12, seed=1)
    batch = [torch.cat([a, b]) for a, b in zip(one[:4], two[:4])]
    together = refine(batch[3], batch[2], batch[0], batch[1], RefineConfig(), num_low=torch.tensor([12, 12]))
    for i, case in enumerate((one, two)):
        alone = refine(case[3], case[2], case[0], case[1], RefineConfig(), num_low=12)
        assert torch.allclose(together[i], alone[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- the row-wise solve


def _row_case(width, seed=0, coils=4, rows=6, shared_mask=True, acceleration=3):
    gen = torch.Generator().manual_seed(seed)
    maps = torch.complex(torch.randn(2, coils, rows, width, generator=gen), torch.randn(2, coils, rows, width, generator=gen))
    maps = maps / maps.abs().square().sum(1, keepdim=True).sqrt()
    x = torch.complex(torch.randn(2, rows, width, generator=gen), torch.randn(2, rows, width, generator=gen))
    masks = torch.zeros(2, width, dtype=torch.bool)
    masks[0, ::acceleration] = True
    masks[1, 1::acceleration] = True
    masks[:, width // 2 - 2: width // 2 + 2] = True
    if shared_mask:
        masks[1] = masks[0]
    return maps, x, masks


@pytest.mark.parametrize("width,shared,transform", [(16, True, "fft"), (17, True, "fft"), (16, True, "dft"),
                                                     (17, True, "auto"), (53, True, "auto"), (16, False, "auto"),
                                                     (17, False, "auto")],
                         ids=["even-fft", "odd-fft", "even-dft", "odd-auto", "prime-auto", "even-per-slice",
                              "odd-per-slice"])
def test_row_operator_is_the_2d_normal_operator_row_by_row(width, shared, transform):
    """A fully sampled readout makes AᴴA act on each readout row alone: RowSense (rolled frame, FFTs or DFT
    rows) equals the 2-D operator Sᴴ F⁻¹ M F S + λ of gadget.baselines.sense on every row."""
    from gadget.baselines.sense import SenseOperator
    from gadget.recon.refine import RowSense, roll_rows

    maps, x, masks = _row_case(width, shared_mask=shared)
    b, c, h, w = maps.shape
    lam = torch.tensor([0.3, 0.01])
    columns = masks.view(2, 1, 1, w)[:1] if shared else masks.view(2, 1, 1, w)
    want = SenseOperator(maps, columns).normal(x) + lam.view(2, 1, 1) * x
    row_maps = roll_rows(maps.transpose(1, 2).reshape(b * h, c, w))
    row_mask = roll_rows(columns.view(1, 1, w) if shared else columns.expand(b, h, 1, w).reshape(b * h, 1, w))
    op = RowSense(row_maps, row_mask, lam.view(2, 1).expand(2, h).reshape(-1, 1), transform)
    if transform != "auto":
        assert (op.dft is not None) == (transform == "dft")
    if width == 53:
        assert op.dft is not None  # a prime length with few sampled columns: matrix products
    if not shared:
        assert op.dft is None  # a mask per slice: FFTs
    got = roll_rows(op.apply(roll_rows(x.reshape(b * h, w))), inverse=True).view(b, h, w)
    assert _rel(got, want) < 1e-5
    kept = op.select(torch.tensor([1, 4]))
    again = kept.apply(roll_rows(x.reshape(b * h, w))[[1, 4]])
    assert _rel(again, roll_rows(got.reshape(b * h, w))[[1, 4]]) < 1e-6


def test_row_conjugate_gradient_converges_row_by_row_from_a_warm_start():
    """Each row stops at its own tolerance and leaves the active set; the result solves every row's system."""
    from gadget.recon.refine import RowSense, roll_rows, row_conjugate_gradient

    maps, x, masks = _row_case(16, rows=8)
    b, c, h, w = maps.shape
    lam = torch.tensor([1.0, 1e-3]).view(2, 1).expand(2, h).reshape(-1, 1)  # fast rows and slow rows
    op = RowSense(roll_rows(maps.transpose(1, 2).reshape(b * h, c, w)), roll_rows(masks[:1].view(1, 1, w)), lam)
    truth = roll_rows(x.reshape(b * h, w))
    rhs = op.apply(truth)
    start = truth + 0.1 * torch.randn(truth.shape, dtype=truth.dtype, generator=torch.Generator().manual_seed(3))
    solved = row_conjugate_gradient(op, rhs, start.clone(), iterations=200, tol=1e-6)
    assert _rel(solved, truth) < 1e-4
    assert _rel(row_conjugate_gradient(op, rhs, truth.clone(), iterations=5), truth) < 1e-6  # already solved


def test_refine_equals_the_converged_2d_solve():
    """The row-wise solve from the network's image reaches the 2-D CG solution of (AᴴA + λ) x = Aᴴy + λ x₀
    on the same maps (run to convergence): the refined image differs by less than 1e-3."""
    import gadget.recon.refine as R
    from gadget.baselines.sense import SenseOperator, conjugate_gradient

    measured, mask, final, image, truth = _refine_case(snr_db=40)
    config = RefineConfig(lam=0.02, iterations=200)
    maps, sources = R.choose_maps(image, final, measured, mask, config)
    prior = (maps.conj() * ifft2c(final)).sum(1)
    op = SenseOperator(maps, mask)
    x = conjugate_gradient(lambda v: op.normal(v) + 0.02 * v, op.adjoint(measured) + 0.02 * prior, 500, tol=1e-9)
    kept = (image + x.abs() - prior.abs()).clamp(min=0)
    w = R.solved_weight(R.lambda_floor(config, sources).view(-1, 1, 1), torch.tensor(0.02))
    want = w * x.abs() + (1 - w) * kept
    assert _rel(refine(image, final, measured, mask, config), want) < 1e-3


def test_rows_without_maps_keep_the_prior():
    from gadget.recon.refine import solve_rows

    maps = torch.ones(2, 3, 8, 5, dtype=torch.complex64)
    maps[:, :, :2] = 0
    maps[0, :, 6:] = 0  # zero in one slice only: still solved (the batch shares its rows)
    assert solve_rows(maps).tolist() == [2, 3, 4, 5, 6, 7]


def test_a_blank_slice_refines_to_zeros():
    """All-zero k-space: no maps anywhere, so no row to solve; the stage sends zeros and does not fail."""
    mask = torch.zeros(24, dtype=torch.bool)
    mask[::2] = True
    mask[10:16] = True
    blank = torch.zeros(1, 4, 32, 24, dtype=torch.complex64)
    out = refine(torch.zeros(1, 32, 24), blank, blank, mask)
    assert out.shape == (1, 32, 24) and not out.any()


def test_map_support_counts_a_pixel_that_one_coil_reaches_in_its_imaginary_part_alone():
    from gadget.recon.refine import map_support

    maps = torch.zeros(2, 3, 4, 5, dtype=torch.complex64)
    maps[0, 2, 1, 3] = 1e-30j  # tiny, imaginary, one coil
    maps[1, 0, 3, 0] = -2.0
    want = torch.zeros(2, 4, 5, dtype=torch.bool)
    want[0, 1, 3] = want[1, 3, 0] = True
    assert torch.equal(map_support(maps), want)


@pytest.mark.parametrize("h,w,per_slice", [(12, 10, False), (11, 9, False), (12, 9, True)],
                         ids=["even", "odd", "odd-phase-per-slice-columns"])
def test_rolled_row_images_are_the_2d_inverse_transform_on_those_rows(h, w, per_slice):
    """The solve's coil images from 1-D transforms on the columns read and the rows asked for equal the
    2-D centred inverse transform of the column-masked k-space, rolled, on those rows (numpy's FFT)."""
    from gadget.recon.refine import rolled_row_images

    rng = np.random.default_rng(7)
    k = rng.standard_normal((2, 3, h, w)) + 1j * rng.standard_normal((2, 3, h, w))
    columns = rng.random((2 if per_slice else 1, 1, 1, w)) < 0.5
    columns[..., w // 2] = True
    rows = np.array([0, 3, 4, h - 1])
    image = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k * columns, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    want = np.fft.ifftshift(image[:, :, rows], axes=-1)
    kspace = torch.from_numpy(k.astype(np.complex64))
    got = rolled_row_images(kspace, torch.from_numpy(rows), torch.from_numpy(columns))
    np.testing.assert_allclose(got.numpy(), want, atol=2e-6)
    whole = np.fft.ifftshift(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"),
                                             axes=(-2, -1))[:, :, rows], axes=-1)
    np.testing.assert_allclose(rolled_row_images(kspace, torch.from_numpy(rows)).numpy(), whole, atol=2e-6)
    # each row's coils combined into virtual ones (b, n, k, c) before the phase transform: the same combination
    # of the coil images
    basis = rng.standard_normal((2, rows.size, 2, 3)) + 1j * rng.standard_normal((2, rows.size, 2, 3))
    got = rolled_row_images(kspace, torch.from_numpy(rows), torch.from_numpy(columns),
                            torch.from_numpy(basis.astype(np.complex64)))
    np.testing.assert_allclose(got.numpy(), np.einsum("bnkc,bcnw->bknw", basis, want), atol=1e-5)


def test_a_slice_position_is_calibrated_once_and_its_repetitions_take_that_calibration():
    """:class:`PositionCalibrations`: a second slice at the same position gets the maps of the first one's
    calibration, not its own; another position, or another ACS count, is calibrated anew."""
    from gadget.baselines.espirit import calibrated_maps, espirit_calibration
    from gadget.recon.refine import REFINE_ESPIRIT, PositionCalibrations, choose_maps

    first, mask, final, image, _ = _refine_case(acs=12, seed=1)  # 12 lines: ESPIRiT covers the phantom
    second, _, _, _, _ = _refine_case(acs=12, seed=2)  # other coils: other maps
    config = RefineConfig()
    own = {name: calibrated_maps(espirit_calibration(k[0], 12, config=REFINE_ESPIRIT), REFINE_ESPIRIT)[0]
           for name, k in (("first", first), ("second", second))}
    assert not torch.allclose(own["first"], own["second"], atol=1e-3)
    calibrations = PositionCalibrations()
    maps = {}
    for name, k, position in (("first", first, "p"), ("second", second, "p"), ("elsewhere", second, "q")):
        maps[name], sources = choose_maps(image, final, k, mask, config, 12, [position], calibrations)
        assert sources == ["espirit"]
    torch.testing.assert_close(maps["first"][0], own["first"])
    torch.testing.assert_close(maps["second"][0], own["first"])     # the position's calibration
    torch.testing.assert_close(maps["elsewhere"][0], own["second"])  # its own
    assert calibrations.computed == 2
    choose_maps(image, final, second, mask, config, 10, ["p"], calibrations)  # other ACS count: anew
    assert calibrations.computed == 3


def test_the_pipeline_calibrates_espirit_once_per_slice_position(tmp_path, monkeypatch):
    """Two slices × three repetitions: two calibrations, not six. The repetitions are the first one's
    k-space scaled (the same maps by construction), so their images equal those of a run that calibrates
    every slice."""
    import gadget.baselines.espirit as espirit
    import gadget.recon.refine as refine_module
    from gadget.recon.pipeline import ScanReconstructor
    from gadget.stream.images import image_magnitude
    from gadget.stream.types import AcqLine
    from tests.server_harness import make_scan

    torch.manual_seed(0)
    xml, lines, _ = make_scan(tmp_path, slices=2, coils=4, size=(32, 24))
    stream = []
    for repetition in range(3):
        for line in lines:
            if repetition and line.has_flag(19):  # the noise scan once
                continue
            head = line.head.copy()
            head["idx"]["repetition"] = repetition
            stream.append(AcqLine(head, line.data * (1 + 0.5 * repetition)))
    calls = []
    real = espirit.espirit_calibration
    monkeypatch.setattr(refine_module, "espirit_calibration", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine = Reconstructor(VarNet(num_cascades=1, chans=4, pools=2, sens_chans=2, sens_pools=1), "cpu")
    config = ReconConfig(refine="pi", prewhiten=False, fallback="none", device="cpu")
    scan = ScanReconstructor(xml, config, engine)
    sent = list(scan.run(stream))
    assert len(sent) == 6 and scan.calibrations.computed == 2 and len(calls) == 2
    each = ScanReconstructor(xml, config, engine)
    each.calibrations = None  # every slice calibrated on its own
    again = list(each.run(stream))
    assert len(calls) == 2 + 6
    for a, b in zip(sent, again):
        assert (a.slice, a.repetition) == (b.slice, b.repetition)
        want = image_magnitude(b)
        np.testing.assert_allclose(image_magnitude(a), want, rtol=0, atol=2e-3 * want.max())


@pytest.mark.parametrize("mode", ["pi", "cs"])
def test_the_prior_from_handed_over_coil_images_is_the_transformed_one(mode):
    """``refine(..., coil_images=ifft2c(final))`` (the engine's final coil images) gives what refine gives when it
    transforms the final k-space itself, in both solves; a wrong handover shows (poisoned coil images)."""
    measured, mask, final, image, _ = _refine_case(snr_db=40)
    config = RefineConfig(mode=mode, cs_lambda=0.01, cs_mu=0.002, cs_iterations=20)
    want = refine(image, final, measured, mask, config)
    got = refine(image, final, measured, mask, config, coil_images=ifft2c(final))
    assert _rel(got, want) < 1e-5
    poisoned = refine(image, final, measured, mask, config, coil_images=2 * ifft2c(final))
    assert _rel(poisoned, want) > 1e-3


def test_row_coil_basis_keeps_the_rank_the_maps_have_and_is_orthonormal():
    """Maps that are 3 smooth profiles mixed into 6 coils (per row): 3 virtual coils carry them exactly, the
    basis rows are orthonormal, and basisᴴ · virtual maps gives the maps back. Random (full-rank) maps keep
    every coil, and the caller gets them unchanged."""
    from gadget.recon.refine import row_coil_basis

    gen = torch.Generator().manual_seed(4)
    m, c, r, w = 5, 6, 3, 40
    profiles = torch.fft.ifft(torch.randn(m, r, w, dtype=torch.complex64, generator=gen)
                              * (torch.arange(w) < 4), dim=-1)  # smooth along the row
    mix = torch.randn(m, c, r, dtype=torch.complex64, generator=gen)
    maps = mix @ profiles
    maps = maps / torch.linalg.vector_norm(maps, dim=1, keepdim=True)  # Σ_c |S|² = 1, as ESPIRiT's
    basis, virtual = row_coil_basis(maps, residual=1e-4)
    assert basis.shape == (m, r, c) and virtual.shape == (m, r, w)
    torch.testing.assert_close(basis @ basis.mH, torch.eye(r, dtype=basis.dtype).expand(m, r, r), rtol=0, atol=1e-5)
    torch.testing.assert_close(basis.mH @ virtual, maps, rtol=0, atol=1e-5)
    full = torch.randn(m, 4, w, dtype=torch.complex64, generator=gen)
    none, same = row_coil_basis(full, residual=1e-4)
    assert none is None and same is full


def test_the_solve_on_virtual_coils_is_the_solve_on_all_coils(monkeypatch):
    """The benchmark's simulated 12-coil scan (2× readout oversampling, 4×): the solve keeps fewer virtual
    coils than coils, and the refined image is the one the solve on every coil gives (residual 0: the coils
    as they are) to 1e-4 of its norm (measured 3e-5)."""
    import gadget.recon.refine as R
    from gadget.bench.model_bench import BenchCase, make_input

    kspace, columns = make_input(BenchCase(coils=12, readout=192, phase=96))
    kspace, columns = torch.from_numpy(kspace), torch.from_numpy(columns)
    image = rss(ifft2c(kspace), dim=1)  # the zero-filled scan stands in for the network's output
    kept = []
    basis_of = R.row_coil_basis

    def recording(maps, residual=R.COIL_RESIDUAL):
        basis, virtual = basis_of(maps, residual)
        kept.append((maps.shape[1], virtual.shape[1]))
        return basis, virtual

    monkeypatch.setattr(R, "row_coil_basis", recording)
    virtual = refine(image, kspace, kspace, columns)
    monkeypatch.setattr(R, "row_coil_basis", lambda maps, residual=0.0: recording(maps, 0.0))
    every = refine(image, kspace, kspace, columns)
    (coils, fewer), (_, all_of_them) = kept
    assert fewer < coils == all_of_them == 12
    assert _rel(virtual, every) < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_the_refine_on_cuda_is_the_refine_on_the_cpu():
    """The stage on CUDA tensors (ESPIRiT's calibration stays on the CPU; the row solve, its virtual coils and
    the prior from handed-over coil images run on the device) gives the CPU's image to 1e-4 of its norm."""
    from gadget.bench.model_bench import BenchCase, make_input

    kspace, columns = make_input(BenchCase(coils=12, readout=192, phase=96))
    kspace, columns = torch.from_numpy(kspace), torch.from_numpy(columns)
    image, coils = rss(ifft2c(kspace), dim=1), ifft2c(kspace)
    cpu = refine(image, kspace, kspace, columns, coil_images=coils)
    cuda = refine(image.cuda(), kspace.cuda(), kspace.cuda(), columns.cuda(), coil_images=coils.cuda())
    assert cuda.device.type == "cuda"
    assert _rel(cuda.cpu(), cpu) < 1e-4


def test_the_exterior_of_the_maps_leaves_their_holes_and_a_margin():
    """A ring of maps (zero inside and outside it) on a 20×20 grid: the exterior is what lies more than
    ``margin`` steps outside the ring; the hole inside the ring never belongs to it."""
    from gadget.recon.refine import map_exterior

    yy, xx = np.mgrid[:20, :20]
    r = np.hypot(yy - 10, xx - 10)
    ring = torch.from_numpy((r >= 3) & (r <= 6))
    maps = torch.zeros(1, 2, 20, 20, dtype=torch.complex64)
    maps[0, 1][ring] = 0.5 + 0.5j
    for margin in (0, 2):
        outside = map_exterior(maps, margin)[0].numpy()
        # taxicab steps to the ring and its hole, counted here by brute force
        inside = (r <= 6).nonzero()
        steps = np.min(np.abs(yy[..., None] - inside[0]) + np.abs(xx[..., None] - inside[1]), axis=-1)
        np.testing.assert_array_equal(outside, steps > margin)
        assert not outside[r < 3].any()
