"""Per-scan calibration of the cs refine (gadget/train/solve_calibration.py): the folds, that a fold's lines
never reach the network or the solve they score, that the choice tracks the truth, and the doors."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from gadget.mri.coils import rss
from gadget.mri.fft import ifft2c
from gadget.recon import sparse
from gadget.recon.engine import Reconstructor
from gadget.recon.refine import EXTERIOR_MARGIN, RefineConfig, noise_floor, noise_sigma, refine
from gadget.train import solve_calibration as cal
from gadget.train.adapt import AdaptError, AdaptSlice
from gadget.train.splits import acs_lines

from conftest import equispaced_mask
from test_adapt import tiny_model

SMALL_GRID = cal.CalibrationConfig(lams=(0.0, 0.03, 1.0), mus=(0.0, 0.005), start_mu=0.0, folds=4, slices=1,
                                   iterations=30)


@pytest.mark.parametrize("width,accel,acs,folds", [(48, 4, 8, 4), (128, 4, 10, 6), (180, 8, 7, 6)])
def test_folds_partition_the_outer_acquired_lines(width, accel, acs, folds):
    mask = equispaced_mask(width, accel, acs)
    parts = cal.outer_folds(mask, acs, folds, np.random.default_rng(0))
    joined = np.concatenate(parts)
    assert len(parts) == folds and len(np.unique(joined)) == joined.size, "folds overlap"
    assert set(joined) == set(np.flatnonzero(mask & ~acs_lines(width, acs))), "not every outer line held back once"
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    n_outer = int((mask & ~acs_lines(width, acs)).sum())
    assert [len(p) for p in cal.outer_folds(mask, acs, n_outer + 3, np.random.default_rng(0))] == [1] * n_outer
    one = acs_lines(width, acs)
    one[0] = True
    with pytest.raises(AdaptError, match="too few"):
        cal.outer_folds(one, acs, folds, np.random.default_rng(0))


def test_the_folds_hold_back_no_blank_line(phantom, monkeypatch):
    """Acquired lines that are zero in every coil (a partial-Fourier block) are never a fold's: a fold of
    them alone would be scored on no energy (the folds' error once rose to 1e27 on such a scan)."""
    sl, _ = phantom
    blank = AdaptSlice(sl.kspace.copy(), sl.mask, sl.acs, "partial Fourier")
    blank.kspace[..., :14] = 0
    expected = sl.mask & (np.arange(sl.mask.size) < 14)
    held = []
    run = cal.held_out_run
    monkeypatch.setattr(cal, "held_out_run", lambda engine, s, fold: (held.append(fold), run(engine, s, fold))[1])
    result = cal.calibrate_solve(Reconstructor(tiny_model(), "cpu"), [blank], SMALL_GRID)
    joined = np.concatenate(held)
    assert expected.sum() >= 3 and len(held) == SMALL_GRID.folds
    assert set(joined) == set(np.flatnonzero(sl.mask & ~expected & ~acs_lines(sl.mask.size, sl.acs)))
    assert np.isfinite(result.score) and result.score < 10 and result.network_score < 10


def test_spread_picks_evenly():
    assert cal.spread(3, 5) == [0, 1, 2]
    assert cal.spread(9, 1) == [4]
    assert cal.spread(10, 2) == [2, 7]
    assert cal.spread(3, 2) == [0, 2]


@pytest.fixture(scope="module")
def phantom():
    from gadget.converters.simulate import simulate_volume

    vol = simulate_volume(num_slices=1, num_coils=6, recon_size=(32, 48), seed=11, snr_db=30)
    mask = equispaced_mask(48, 4, 8)
    return AdaptSlice((vol.kspace[0] * mask).astype(np.complex64), mask, 8, "sim/0"), vol.kspace[0]


def test_a_folds_lines_never_reach_the_network_or_the_solve_it_scores(phantom, monkeypatch):
    sl, _ = phantom
    poisoned = AdaptSlice(sl.kspace.copy(), sl.mask, sl.acs, "poisoned")
    fold = cal.outer_folds(sl.mask, sl.acs, 4, np.random.default_rng(0))[1]
    poisoned.kspace[..., fold] = 1e6  # a leak would show as this value in an input
    engine = Reconstructor(tiny_model(), "cpu")
    seen = []
    run = engine.run_tensors
    monkeypatch.setattr(engine, "run_tensors", lambda k, m, *a, **kw: (seen.append(("net", k, m)), run(k, m, *a, **kw))[1])
    solve = cal.solve
    monkeypatch.setattr(cal, "solve", lambda maps, y, cols, *a: (seen.append(("solve", y.numpy(), cols.numpy())),
                                                                 solve(maps, y, cols, *a))[1])
    lam, mu = SMALL_GRID.candidates()
    errors = cal.fold_errors(cal.hold_out(engine, poisoned, fold), lam, mu, SMALL_GRID)
    assert [s[0] for s in seen] == ["net", "solve"]
    for _, k, m in seen:
        assert not np.asarray(m)[fold].any() and np.abs(np.asarray(k)[..., fold]).max() == 0
    assert errors.shape == (*lam.shape, 3) and bool(torch.isfinite(errors).all())
    assert float(errors.min()) > 0.9  # scored against the poison, which nothing could predict


def _truth_errors(engine, sl, full, lam, mu, iterations):
    """Each candidate's error against the fully sampled RSS, solved on all the slice's lines."""
    image, maps, prior, _ = cal.network_prior(engine, sl.kspace, sl.mask, sl.acs)
    x = sparse.solve(maps, torch.from_numpy(sl.kspace), torch.from_numpy(sl.mask), prior, lam, mu, iterations)
    truth = rss(ifft2c(torch.from_numpy(full)[None]), dim=1)[0]
    errors = [float(torch.linalg.vector_norm(c.abs() - truth) / torch.linalg.vector_norm(truth)) for c in x]
    net = float(torch.linalg.vector_norm(image - truth) / torch.linalg.vector_norm(truth))
    return np.array(errors), net


def test_a_poor_network_is_trusted_less_and_the_choice_tracks_the_truth(phantom):
    """An untrained network is a poor prior: the held-out lines say so (small λ), and the calibrated solve's
    image is closer to the truth than the network's and within 25 % of the whole grid's best candidate
    (the search scores one line along λ, then one along μ)."""
    sl, full = phantom
    settings = cal.CalibrationConfig(lams=(0.0, 0.01, 0.1, 1.0), mus=(0.0, 0.002, 0.01), folds=4, slices=1,
                                     iterations=40)
    engine = Reconstructor(tiny_model(), "cpu")
    result = cal.calibrate_solve(engine, [sl], settings)
    assert result.lam <= 0.01 and result.used, result.summary()
    assert result.score < 0.9 * result.network_score
    lam, mu = settings.candidates()
    truth, network = _truth_errors(engine, sl, full, lam, mu, settings.iterations)
    grid = [(a, b) for a in settings.lams for b in settings.mus]  # candidates()'s order
    chosen = truth[grid.index((result.lam, result.mu))]
    assert chosen < 0.7 * network, (chosen, network)
    assert chosen <= 1.25 * truth.min(), (chosen, truth.min())
    scored = {(row["lam"], row["mu"]) for row in result.table}
    assert scored == {(a, 0.002) for a in settings.lams} | {(result.lam, b) for b in settings.mus}
    assert result.folds == 4 and result.slices == 1
    with pytest.raises(ValueError, match="start_mu"):
        cal.CalibrationConfig(mus=(0.0, 0.01), start_mu=0.002)


def test_folds_side_by_side_choose_and_score_as_one_at_a_time(phantom):
    """An engine admitting two forwards runs the folds on two workers: the same choice, the same scores
    (within float rounding of one thread against two) and the table in the same order."""
    sl, _ = phantom
    model = tiny_model()
    one = cal.calibrate_solve(Reconstructor(model, "cpu"), [sl], SMALL_GRID)
    seen = []
    two = cal.calibrate_solve(Reconstructor(model, "cpu", forwards=2), [sl], SMALL_GRID,
                              on_fold=lambda done, total: seen.append((done, total)))
    assert (two.lam, two.mu, two.rule) == (one.lam, one.mu, one.rule)
    assert [(r["lam"], r["mu"]) for r in two.table] == [(r["lam"], r["mu"]) for r in one.table]
    np.testing.assert_allclose([r["score"] for r in two.table], [r["score"] for r in one.table], rtol=1e-5)
    assert two.network_score == pytest.approx(one.network_score, rel=1e-5)
    assert seen == [(i, 4) for i in range(1, 5)]


def test_held_out_lines_that_favour_nothing_fall_back_to_the_noise_level(phantom):
    """Pure noise in the acquired lines: no candidate predicts the held-back lines better than the network
    by the margin. Without a fallback the door keeps its own refine; with the discrepancy principle
    (the default) every μ leaves a residual within the noise, so the largest is chosen."""
    import dataclasses

    from gadget.train.adapt import AdaptConfig
    from gadget.train.adapt_run import adapt_to_scan

    sl, _ = phantom
    rng = np.random.default_rng(3)
    noise = (rng.standard_normal(sl.kspace.shape) + 1j * rng.standard_normal(sl.kspace.shape)).astype(np.complex64)
    noisy = AdaptSlice(noise * sl.mask, sl.mask, sl.acs, "noise")
    engine = Reconstructor(tiny_model(), "cpu")
    kept = adapt_to_scan(engine, [noisy], "solve", AdaptConfig(), dataclasses.replace(SMALL_GRID, fallback="none"),
                         "noise")
    assert not kept.solve.used and kept.refiner is None and kept.solve.rule == "none", kept.summary()
    assert kept.solve.score > 0.9 * kept.solve.network_score
    # the held-back lines are noise alone: their noise share is 1, within four standard errors of σ² read from
    # the kept lines' outer readout (1.44/√n on n = 6 coils × 8 rows × 15 or 16 lines: 0.21)
    assert kept.solve.noise_score == pytest.approx(1.0, abs=0.21)
    assert "not used" in kept.summary()
    chosen = adapt_to_scan(engine, [noisy], "solve", AdaptConfig(), SMALL_GRID, "noise")
    assert chosen.solve.rule == "discrepancy" and chosen.refiner is not None, chosen.summary()
    assert (chosen.solve.lam, chosen.solve.mu) == (SMALL_GRID.fallback_lam, max(SMALL_GRID.mus))
    assert "noise level" in chosen.summary()


def test_the_discrepancy_principle_regularises_more_where_the_noise_is_higher():
    """The same phantom at 40 and 10 dB: the μ whose residual stays within the noise is larger at 10 dB;
    an empty grid of admissible μ gives None."""
    from gadget.converters.simulate import simulate_volume

    mask = equispaced_mask(48, 4, 8)
    engine = Reconstructor(tiny_model(), "cpu")
    settings = cal.CalibrationConfig(mus=(0.0, 0.002, 0.01, 0.05, 0.2, 1.0, 5.0), start_mu=0.0, iterations=30)
    found, slices = {}, {}
    for snr in (40, 10):
        vol = simulate_volume(num_slices=1, num_coils=6, recon_size=(32, 48), seed=11, snr_db=snr)
        slices[snr] = AdaptSlice((vol.kspace[0] * mask).astype(np.complex64), mask, 8, f"snr{snr}")
        found[snr] = cal.discrepancy_mu(engine, [slices[snr]], settings)
    assert found[10] is not None and found[10] > (found[40] if found[40] is not None else -1), found
    silent = AdaptSlice(np.zeros_like(slices[40].kspace), mask, 8, "zeros")  # σ 0: no residual is within it
    silent.kspace[0, silent.kspace.shape[1] // 2, np.flatnonzero(mask)[0]] = 1.0  # off the readout's noise band
    assert cal.discrepancy_mu(engine, [silent], settings) is None


def test_the_cs_refine_is_the_solve_where_the_maps_cover_and_the_network_or_its_capped_image_elsewhere():
    """At 40 dB: at the fixture's 30 dB noise fills half of ESPIRiT's subspace (with the ``cs`` stage's
    kernel) and its maps reach over the whole grid, leaving nothing uncovered to check."""
    from gadget.converters.simulate import simulate_volume

    vol = simulate_volume(num_slices=1, num_coils=6, recon_size=(32, 48), seed=11, snr_db=40)
    mask = equispaced_mask(48, 4, 8)
    sl = AdaptSlice((vol.kspace[0] * mask).astype(np.complex64), mask, 8, "sim/0")
    engine = Reconstructor(tiny_model(), "cpu")
    image, final = engine.run_tensors(sl.kspace[None], sl.mask, sl.acs)
    config = RefineConfig(mode="cs", cs_lambda=0.03, cs_mu=0.005, cs_iterations=20, coverage=1e-3)  # ESPIRiT maps: cropped
    out = refine(image, final, torch.from_numpy(sl.kspace[None]), torch.from_numpy(sl.mask), config, sl.acs)[0]
    _, maps, prior, _ = cal.network_prior(engine, sl.kspace, sl.mask, sl.acs, refine=config)
    want = sparse.solve(maps, torch.from_numpy(sl.kspace), torch.from_numpy(sl.mask), prior, [0.03], [0.005], 20)[0]
    covered = maps.abs().amax(0) > 0
    assert covered.any() and (~covered).any()
    np.testing.assert_allclose(out[covered].numpy(), want.abs()[covered].numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out[~covered].numpy(), image[0][~covered].numpy(), rtol=1e-6)
    capped = refine(image, final, torch.from_numpy(sl.kspace[None]), torch.from_numpy(sl.mask),
                    replace(config, cs_outside="capped"), sl.acs)[0]
    cap = float(noise_floor(noise_sigma(torch.from_numpy(sl.kspace[None]), torch.from_numpy(sl.mask)), 6)[0])
    # capped: more than EXTERIOR_MARGIN steps (up, down, left, right) from the region the maps enclose
    region = ndimage.binary_fill_holes(covered.numpy())
    far = torch.from_numpy(ndimage.distance_transform_cdt(~region, metric="taxicab") > EXTERIOR_MARGIN)
    near = ~covered & ~far
    assert far.any() and near.any()
    np.testing.assert_allclose(capped[covered].numpy(), out[covered].numpy(), rtol=1e-6)
    np.testing.assert_allclose(capped[near].numpy(), image[0][near].numpy(), rtol=1e-6)
    np.testing.assert_allclose(capped[far].numpy(), np.minimum(image[0][far].numpy(), cap), rtol=1e-6)
    assert (image[0][far] > cap).any() and (image[0][far] < cap).any()  # the cap cuts, and not everything
    with pytest.raises(ValueError, match="cs weights"):
        RefineConfig(mode="cs", cs_mu=-1)
    with pytest.raises(ValueError, match="cs outside must be one of network, capped"):
        RefineConfig(mode="cs", cs_outside="noise")


def test_the_noise_floor_is_the_quantile_of_the_rss_of_noise():
    """Against complex Gaussian noise drawn here (E|n|² = σ² per coil): the share of pixels whose RSS over the
    coils exceeds the floor is the quantile's complement, within the sampling error of a million draws."""
    rng = np.random.default_rng(3)
    sigma = 2.5e-6
    for coils in (1, 8, 32):
        draws = rng.standard_normal((2, coils, 10 ** 6))
        noise = (draws[0] + 1j * draws[1]) * sigma / np.sqrt(2)
        rss_noise = np.sqrt((np.abs(noise) ** 2).sum(0))
        for quantile in (0.5, 0.999):
            floor = float(noise_floor(torch.tensor([sigma]), coils, quantile)[0])
            above = float((rss_noise > floor).mean())
            tolerance = 4 * np.sqrt(quantile * (1 - quantile) / 10 ** 6)  # four standard errors
            assert abs(above - (1 - quantile)) < tolerance, (coils, quantile, above)


def test_adapt_solve_through_both_offline_doors(tmp_path, test_format_file, capsys):
    """``--adapt solve``: the weights as loaded, the cs refine calibrated on the scan; infer and replay
    give the same images; with an explicit refine it is refused, naming why."""
    import h5py

    from gadget.converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd
    from gadget.cli import main
    from gadget.recon.config import ConfigError, ReconConfig
    from gadget.recon.pipeline import build_engine
    from gadget.stream.images import image_magnitude
    from gadget.stream.sinks import read_images_h5
    from test_adapt import _base_checkpoint

    base = _base_checkpoint(tmp_path / "base.pt")
    out = tmp_path / "inf"
    assert main(["infer", "--checkpoint", str(base), "--input", str(test_format_file), "--output", str(out),
                 "--adapt", "solve", "--device", "cpu"]) == 0
    assert "adapted on its own lines: cs refine: λ" in capsys.readouterr().out
    with h5py.File(out / test_format_file.name, "r") as f:
        inferred = f["reconstruction"][()]
    raw = tmp_path / "raw.h5"
    convert_fastmri_to_ismrmrd(test_format_file, raw)
    cfg = tmp_path / "solve.yaml"
    cfg.write_text("prewhiten: false\nfallback: none\nadapt: solve\ndevice: cpu\n")
    assert main(["replay", str(raw), str(tmp_path / "img.h5"), "--config", str(cfg), "--checkpoint", str(base)]) == 0
    (series,) = read_images_h5(tmp_path / "img.h5").values()
    replayed = np.stack([image_magnitude(im) for im in series])
    assert np.linalg.norm(replayed - inferred) / np.linalg.norm(inferred) < 1e-4
    # scan: where the cs refine is used, the weights are not adapted (the same images as solve)
    assert main(["infer", "--checkpoint", str(base), "--input", str(test_format_file), "--output",
                 str(tmp_path / "scan"), "--adapt", "scan", "--device", "cpu"]) == 0
    assert "weights:" not in capsys.readouterr().out
    with h5py.File(tmp_path / "scan" / test_format_file.name, "r") as f:
        np.testing.assert_array_equal(f["reconstruction"][()], inferred)
    assert main(["infer", "--checkpoint", str(base), "--input", str(test_format_file), "--output", str(out),
                 "--adapt", "solve", "--refine", "pi"]) == 2
    assert "needs --refine auto" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="refine 'auto'"):
        build_engine(ReconConfig(adapt="solve", refine="none", checkpoint=str(base)), offline=True)


def _quiet_slice(snr_db=40.0, full=False):
    """The 32×48 6-coil phantom at 4× (8 ACS lines); with ``full`` also its fully sampled k-space."""
    from gadget.converters.simulate import simulate_volume

    vol = simulate_volume(num_slices=1, num_coils=6, recon_size=(32, 48), seed=11, snr_db=snr_db)
    mask = equispaced_mask(48, 4, 8)
    sl = AdaptSlice((vol.kspace[0] * mask).astype(np.complex64), mask, 8, "sim/0")
    return (sl, vol.kspace[0].astype(np.complex64)) if full else sl


def test_the_held_back_lines_choose_the_maps(monkeypatch):
    """The search runs once with the network's maps and once with ESPIRiT's (whatever the coverage test of
    the ``pi`` stage says: patched here to reject ESPIRiT always); the source with the lower held-out score
    wins and the refine it configures uses that source. The network runs once per fold for both. Where noise
    fills ESPIRiT's subspace (30 dB on this phantom) only the network's maps are searched."""
    import gadget.recon.refine as refine_module

    monkeypatch.setattr(refine_module, "espirit_coverage", lambda values, image, crop=0.95: 0.0)
    engine = Reconstructor(tiny_model(), "cpu")
    sl = _quiet_slice()
    forwards = []
    run = engine.run_tensors
    monkeypatch.setattr(engine, "run_tensors", lambda *a, **kw: (forwards.append(1), run(*a, **kw))[1])
    seen = []
    result = cal.calibrate_solve(engine, [sl], SMALL_GRID, on_fold=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 4) for i in range(1, 5)] and len(forwards) == 4
    best = {source: min(r["score"] for r in result.table if r["maps"] == source) for source in ("network", "espirit")}
    assert len(result.table) == 2 * (len(SMALL_GRID.lams) + len(SMALL_GRID.mus))
    # measured: ESPIRiT's maps 0.244 against the network's 0.746 (the network alone 1.12)
    assert result.rule == "folds" and best["espirit"] < best["network"]
    assert result.maps == "espirit" and result.score == pytest.approx(best["espirit"])
    config = result.refine_config()
    assert config.maps == "espirit" and config.mode == "cs"
    image, final = run(sl.kspace[None], sl.mask, sl.acs)
    measured, mask = torch.from_numpy(sl.kspace[None]), torch.from_numpy(sl.mask)
    assert refine_module.choose_maps(image, final, measured, mask, config, sl.acs)[1] == ["espirit"]
    assert refine_module.choose_maps(image, final, measured, mask, RefineConfig(), sl.acs)[1] == ["network"]
    noisy = cal.calibrate_solve(engine, [_quiet_slice(30.0)], SMALL_GRID)
    assert {r["maps"] for r in noisy.table} == {"network"} and noisy.maps == "network"


@pytest.mark.parametrize("ghost", [0.0, 0.5])
def test_the_held_back_lines_choose_what_goes_where_the_maps_vanish(monkeypatch, ghost):
    """Candidates are scored on the solve alone (nothing where ESPIRiT's maps vanish); what is sent there is
    chosen after: the network's coil images, or those capped at the noise floor. An oracle network (the fully
    sampled coil images, whatever lines it is given) leaves nothing above the noise floor there, so capping
    changes nothing and both score the same for every (λ, μ): the tie goes to the capped image (the rule
    leans on the network only where the lines show it is wanted). The same oracle with a fold-over outside
    the maps (what an aliased network leaves there, ``ghost`` × the image's peak) loses to the capped one.
    The refine configured sends that choice."""
    wins = "capped"
    from gadget.mri.fft import fft2c
    from gadget.recon.refine import choose_maps, map_support

    sl, full = _quiet_slice(full=True)
    measured, mask = torch.from_numpy(sl.kspace[None]), torch.from_numpy(sl.mask)
    coils = ifft2c(torch.from_numpy(full)[None])
    espirit = RefineConfig(mode="cs", maps="espirit")
    maps, sources = choose_maps(rss(coils, dim=1), fft2c(coils), measured, mask, espirit, sl.acs)
    vanish = ~map_support(maps)[0]
    assert sources == ["espirit"] and vanish.any() and (~vanish).any()
    peak = float(rss(coils, dim=1).max())
    shifted = torch.roll(coils, coils.shape[-1] // 2, dims=-1)  # the object folded by half the field of view
    shifted = shifted / rss(shifted, dim=1).amax().clamp(min=1e-12) * peak
    network = coils + ghost * shifted * vanish
    engine = Reconstructor(tiny_model(), "cpu")
    monkeypatch.setattr(engine, "run_tensors", lambda *a, coil_images=False, **kw:
                        (rss(network, dim=1), fft2c(network), network))
    result = cal.calibrate_solve(engine, [sl], replace(SMALL_GRID, fallback="none"))
    rows = [r for r in result.table if r["maps"] == "espirit"]
    if ghost:
        assert rows and all(min(r["outside"], key=r["outside"].get) == wins for r in rows), rows
    else:
        assert rows and all(r["outside"]["network"] == r["outside"]["capped"] for r in rows), rows
    assert all(r["outside"]["network"] == r["outside"]["capped"] for r in result.table if r["maps"] == "network")
    best = min(rows, key=lambda r: r["score"])  # ESPIRiT's maps win here (the solve alone scores 0.054)
    assert (result.maps, result.lam, result.mu, result.outside) == ("espirit", best["lam"], best["mu"], wins)
    assert result.score == pytest.approx(best["score"]) and result.refine_config().cs_outside == wins


def test_the_noise_level_decides_only_where_the_held_back_lines_are_noise_to_the_network(monkeypatch):
    """An oracle network (the fully sampled coil images) predicts the held-back lines almost exactly; with a
    margin no candidate can meet, the folds do not decide. The lines are not noise to the network (its
    held-out error is far below 1), so the door keeps its own refine rather than the discrepancy principle's
    candidate; with ``noise_dominated`` 0 the discrepancy principle would have decided."""
    from gadget.mri.fft import fft2c

    sl, full = _quiet_slice(full=True)
    coils = ifft2c(torch.from_numpy(full)[None])
    engine = Reconstructor(tiny_model(), "cpu")
    monkeypatch.setattr(engine, "run_tensors", lambda *a, coil_images=False, **kw:
                        (rss(coils, dim=1), fft2c(coils), coils))
    strict = replace(SMALL_GRID, margin=0.99)
    kept = cal.calibrate_solve(engine, [sl], strict)
    assert kept.network_score < 1e-6 and kept.rule == "none" and not kept.used, kept.summary()
    decided = cal.calibrate_solve(engine, [sl], replace(strict, noise_dominated=0.0))
    assert decided.rule == "discrepancy" and decided.used, decided.summary()
    with pytest.raises(ValueError, match="noise_dominated >= 0"):
        replace(strict, noise_dominated=-1.0)


@pytest.mark.parametrize("score,network,noise,margin,wins", [
    (0.733, 0.814, 0.565, 0.1, True),    # 0.168 above the noise against 0.249: a third less
    (0.733, 0.814, 0.0, 0.1, False),     # no noise: the plain relative margin, missed by a hair
    (0.70, 0.80, 0.0, 0.1, True),
    (0.95, 1.00, 0.90, 0.4, True),       # half the error above the noise removed
    (0.97, 1.00, 0.90, 0.4, False),      # 0.07 of 0.10 above it
    (0.90, 0.98, 1.00, 0.1, False),      # the network is at the noise: nothing left to win
    (0.85, 0.80, 0.50, 0.1, False),      # worse than the network
])
def test_the_margin_is_on_the_error_above_the_noise(score, network, noise, margin, wins):
    assert cal.beats_network(score, network, noise, margin) is wins


def test_the_held_back_lines_noise_share_matches_the_noise_put_in():
    """Signal confined to the central half of the readout, complex Gaussian noise of σ 0.05 everywhere: the
    outer readout the noise level is read from is noise alone. A fold's ``noise`` is σ² per held-back sample
    over their energy; the σ estimated from the kept lines' outer readout (a median) has a relative standard
    error of 0.72/√n on n samples (Rayleigh), so σ² 1.44/√n; the share must be within four of those of the
    one made from the σ put in, on the lines' realised energy."""
    rng = np.random.default_rng(5)
    coils, height, width, acs, sigma = 8, 128, 96, 10, 0.05
    signal = np.zeros((coils, height, width), np.complex64)
    band = slice(height // 4, 3 * height // 4)
    signal[:, band] = (rng.standard_normal((coils, height // 2, width))
                       + 1j * rng.standard_normal((coils, height // 2, width))) * 0.1
    noise = sigma * (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape)) / np.sqrt(2)
    mask = equispaced_mask(width, 4, acs)
    sl = AdaptSlice(((signal + noise) * mask).astype(np.complex64), mask, acs, "noisy")
    fold = cal.outer_folds(mask, acs, 4, np.random.default_rng(0))[0]
    data = cal.hold_out(Reconstructor(tiny_model(), "cpu"), sl, fold)
    held = sl.kspace[..., fold]
    expected = sigma ** 2 * held.size / float((np.abs(held) ** 2).sum())
    kept = mask.copy()
    kept[fold] = False
    samples = coils * 2 * (height // 8) * int(kept.sum())  # the outer eighth of the readout on each side
    assert 0.2 < expected < 0.6  # signal and noise both in the held-back lines
    assert data.noise == pytest.approx(expected, rel=4 * 1.44 / np.sqrt(samples))


def test_the_least_value_within_one_standard_error_of_the_lowest():
    """Four folds. The lowest mean error is candidate 1's. Candidate 0's differences to it, fold by fold,
    are 0.1, −0.1, 0.2, −0.1: mean 0.025, standard error 0.075 (sample deviation 0.15 over √4), so it is
    within; candidate 2's are 0.1 each fold: mean 0.1, standard error 0, so it is not. Of candidates 0 and 1
    the one of least value wins, whatever the order of the values."""
    errors = np.array([[1.1, 1.0, 1.1],
                       [0.9, 1.0, 1.1],
                       [1.2, 1.0, 1.1],
                       [0.9, 1.0, 1.1]])
    assert cal.least_within_error(errors, [0.0, 0.01, 0.003]) == 0
    assert cal.least_within_error(errors, [0.3, 0.01, 0.0]) == 1  # candidate 2 is least but not within
    consistent = errors.copy()
    consistent[:, 0] = [1.1, 1.1, 1.1, 1.12]  # worse on every fold: differences 0.105 ± 0.005
    assert cal.least_within_error(consistent, [0.0, 0.01, 0.003]) == 1


def test_the_mu_line_runs_at_the_least_lam_within_error(phantom, monkeypatch):
    """For each map source the table holds the λ line, then the μ line. With ``lam_within_error`` (the
    default) the μ line runs at the λ :func:`least_within_error` picked from the λ line's fold errors (one
    row per fold); without, at the λ of the λ line's lowest mean score."""
    sl, _ = phantom
    engine = Reconstructor(tiny_model(), "cpu")
    lams, mus = len(SMALL_GRID.lams), len(SMALL_GRID.mus)
    picked = []
    least = cal.least_within_error
    monkeypatch.setattr(cal, "least_within_error",  # the λ line's calls (the other picks what goes outside)
                        lambda errors, values: (picked.append((errors.shape, least(errors, values))) or picked[-1][1])
                        if list(values) == list(SMALL_GRID.lams) else least(errors, values))
    result = cal.calibrate_solve(engine, [sl], SMALL_GRID)
    sources = len(result.table) // (lams + mus)
    assert len(picked) == sources and all(shape == (4, lams) for shape, _ in picked)
    for k, (_, index) in enumerate(picked):
        mu_line = result.table[k * (lams + mus) + lams:(k + 1) * (lams + mus)]
        assert {row["lam"] for row in mu_line} == {SMALL_GRID.lams[index]}
    plain = cal.calibrate_solve(engine, [sl], replace(SMALL_GRID, lam_within_error=False))
    for k in range(len(plain.table) // (lams + mus)):
        rows = plain.table[k * (lams + mus):(k + 1) * (lams + mus)]
        lowest = min(rows[:lams], key=lambda row: row["score"])["lam"]
        assert {row["lam"] for row in rows[lams:]} == {lowest}


def _tag_folds(monkeypatch):
    """``held_out_fold`` patched to tag each fold with its map source (``source``) and its index among that
    source's folds (``k``), for made-up errors per fold."""
    plain_fold = cal.held_out_fold
    count = {}

    def tagged(run, sl_, fold, refine):
        data = plain_fold(run, sl_, fold, refine)
        data.source, data.k = refine.maps, count.get(refine.maps, 0)
        count[refine.maps] = data.k + 1
        return data

    monkeypatch.setattr(cal, "held_out_fold", tagged)


def test_the_maps_are_compared_by_the_lowest_error_their_search_reached(monkeypatch):
    """Held-out errors made up per map source and fold: the network's maps score 0.45 at their best, and the
    least λ within one standard error keeps that λ (no spread); ESPIRiT's reach 0.40 at λ 0.03, but λ 0 is
    within the error (0.47 on average) and the μ line runs there. ESPIRiT's maps win on their lowest error
    and are used at λ 0 with its score; compared by the winners' scores (0.47 against 0.45) they lost."""
    engine = Reconstructor(tiny_model(), "cpu")
    sl = _quiet_slice()
    _tag_folds(monkeypatch)

    def made_up(data, lam, mu, settings):
        if data.source == "network":
            scores = [0.45 if float(a) == pytest.approx(0.03) else 0.5 for a in lam]
        else:
            scores = [[0.54, 0.40][data.k % 2] if float(a) == 0.0 else
                      [0.30, 0.50][data.k % 2] if float(a) == pytest.approx(0.03) else 0.6 for a in lam]
        return torch.tensor([[s] * (1 + len(cal.CS_OUTSIDE)) for s in scores])

    monkeypatch.setattr(cal, "fold_errors", made_up)
    result = cal.calibrate_solve(engine, [sl], SMALL_GRID)
    assert {r["maps"] for r in result.table} == {"network", "espirit"}
    assert result.maps == "espirit" and result.lam == 0.0 and result.score == pytest.approx(0.47)
    assert min(r["score"] for r in result.table if r["maps"] == "network") == pytest.approx(0.45)
    assert result.rule == "folds"


@pytest.mark.parametrize("network_outside,wins", [((0.30, 0.32), "network"), ((0.30, 0.50), "capped"),
                                                  ((0.37, 0.44), "capped")])
def test_the_network_goes_outside_the_maps_only_where_it_wins_by_more_than_one_standard_error(
        monkeypatch, network_outside, wins):
    """Made-up held-out errors, the capped image's 0.40 and 0.42 fold by fold: the network's image outside the
    maps is sent where it is lower on every fold (0.30 / 0.32), not where the folds disagree, though it is
    lower on average (0.30 / 0.50: by 0.01, one standard error 0.05; 0.37 / 0.44: by 0.005, one standard
    error 0.014)."""
    engine = Reconstructor(tiny_model(), "cpu")
    sl = _quiet_slice()
    _tag_folds(monkeypatch)

    def made_up(data, lam, mu, settings):
        network, capped = network_outside[data.k % 2], (0.40, 0.42)[data.k % 2]
        rows = [[0.1 if float(a) == 0.0 and float(b) == 0.0 else 0.2, network, capped] for a, b in zip(lam, mu)]
        return torch.tensor(rows)

    monkeypatch.setattr(cal, "fold_errors", made_up)
    result = cal.calibrate_solve(engine, [sl], SMALL_GRID)
    assert (result.lam, result.mu, result.outside) == (0.0, 0.0, wins)
    assert result.refine_config().cs_outside == wins


def test_the_search_solves_on_one_grid_and_the_refine_spins(phantom, monkeypatch):
    """The calibration's solves take ``CalibrationConfig.offsets`` wavelet grids per step (one by default);
    the cs refine that sends the image takes :data:`gadget.recon.sparse.SPIN_OFFSETS`."""
    import inspect

    import gadget.recon.refine as refine_module
    from gadget.recon import sparse

    sl, _ = phantom
    engine = Reconstructor(tiny_model(), "cpu")
    grids = []
    plain = sparse.solve

    def recorded(*args, **kwargs):
        bound = inspect.signature(plain).bind(*args, **kwargs)
        bound.apply_defaults()
        grids.append(bound.arguments["offsets"])
        return plain(*args, **kwargs)

    monkeypatch.setattr(cal, "solve", recorded)
    result = cal.calibrate_solve(engine, [sl], SMALL_GRID)
    assert grids and set(grids) == {1}
    grids.clear()
    cal.calibrate_solve(engine, [sl], replace(SMALL_GRID, offsets=2))
    assert grids and set(grids) == {2}
    grids.clear()
    monkeypatch.setattr(refine_module.sparse, "solve", recorded)
    image, final = engine.run_tensors(sl.kspace[None], sl.mask, sl.acs)
    refine_module.refine(image, final, torch.from_numpy(sl.kspace[None]), torch.from_numpy(sl.mask),
                         result.refine_config(), sl.acs)
    assert grids == [sparse.SPIN_OFFSETS] and sparse.SPIN_OFFSETS > 1
    with pytest.raises(ValueError, match="offsets"):
        cal.CalibrationConfig(offsets=0)
