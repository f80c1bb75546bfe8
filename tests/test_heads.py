"""Whole-head, domain-randomised simulation (``varnet synth --head``): each element on its own.

Independent references: numpy FFTs for aliasing and k-space, analytic geometry for layers and
loops, sample statistics for texture and draws. Small sizes (matrices 32–64, 1–2 slices).
"""
from __future__ import annotations

import importlib.util
from dataclasses import replace

import h5py
import numpy as np
import pytest

from gadget.converters import anatomy as anat
from gadget.converters import coils, headsim, tissue

HAVE_NILEARN = importlib.util.find_spec("nilearn") is not None
needs_mni = pytest.mark.skipif(not HAVE_NILEARN, reason="nilearn not installed (MNI template)")


def _installed(path_fn) -> bool:
    try:
        path_fn()
        return True
    except anat.AnatomyUnavailable:
        return False


needs_colin = pytest.mark.skipif(not _installed(anat.colin_path), reason="Debian mricron-data not installed (Colin27)")
needs_inia = pytest.mark.skipif(not _installed(tissue.inia_path), reason="Debian mricron-data not installed (INIA19)")


# ----------------------------------------------------------------------------- tissue classes


def test_intensity_memberships_are_tents_that_sum_to_one():
    centres = [10.0, 50.0, 90.0]
    v = np.linspace(-20, 120, 281)
    m = tissue.intensity_memberships(v, centres)
    np.testing.assert_allclose(m.sum(0), 1.0, atol=1e-6)
    for k, c in enumerate(centres):
        assert m[k, np.argmin(np.abs(v - c))] == pytest.approx(1.0)
    assert m[1, np.argmin(np.abs(v - 30.0))] == pytest.approx(0.5)   # half way between GM-like centres


def test_kmeans_finds_three_intensity_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(c, 3, 4000) for c in (20, 60, 110)])
    np.testing.assert_allclose(tissue.kmeans_1d(values, 3), [20, 60, 110], atol=1.0)


def _sphere_distance(radius=20, size=80):
    z, y, x = np.mgrid[:size, :size, :size] - size // 2
    r = np.sqrt(x * x + y * y + z * z)
    brain = r <= radius
    return tissue.distance_outside(brain, 1.0), r


def test_head_layers_are_ordered_outward_with_drawn_thicknesses():
    distance, r = _sphere_distance()
    layers = tissue.head_layers(distance, np.random.default_rng(1))
    total = sum(layers.values())
    assert total.max() <= 1 + 1e-6 and min(v.min() for v in layers.values()) >= -1e-6
    assert np.all(total[distance <= 0] == 0)                      # nothing inside the brain
    line = [(int(np.argmax([layers[c][40, 40, 40 + k] for c in layers])), total[40, 40, 40 + k])
            for k in range(21, 40)]
    names = list(layers)
    sequence = [names[i] for i, t in line if t > 0.5]
    collapsed = [s for i, s in enumerate(sequence) if i == 0 or s != sequence[i - 1]]
    assert collapsed == ["csf", "bone", "marrow", "bone", "muscle", "fat", "skin"]
    thickness = sum(v[40, 40, 40:] for v in layers.values()).sum()   # mm of head along one ray
    low = sum(lo for _, (lo, hi) in tissue.LAYERS)
    high = sum(hi for _, (lo, hi) in tissue.LAYERS)
    assert low - 1 <= thickness <= high + 1


def test_head_layer_modulation_changes_thickness_around_the_head():
    distance, _ = _sphere_distance()
    modulation = np.zeros_like(distance)
    modulation[:, :, 40:] = 1.0                                      # +30 % on one side
    layers = tissue.head_layers(distance, np.random.default_rng(2), modulation)
    total = sum(layers.values())
    plus, minus = total[40, 40, 40:].sum(), total[40, 40, :40].sum()
    assert plus == pytest.approx(1.3 * minus, rel=0.1)


def test_contrasts_order_tissues_as_in_real_scans():
    s = {name: dict(zip(tissue.CLASSES, values)) for name, values in tissue.CONTRAST_SIGNALS.items()}
    assert s["t1w"]["fat"] > s["t1w"]["wm"] > s["t1w"]["gm"] > s["t1w"]["csf"] > s["t1w"]["bone"]
    assert s["t2w"]["csf"] > s["t2w"]["gm"] > s["t2w"]["wm"]
    assert s["flair"]["gm"] > s["flair"]["wm"] > s["flair"]["csf"]
    assert all(v["bone"] == min(v.values()) for v in s.values())


def test_random_signals_jitter_and_sometimes_randomise():
    rng = np.random.default_rng(3)
    draws = [tissue.random_signals(rng) for _ in range(400)]
    names = {name for name, _ in draws}
    assert names == set(tissue.CONTRASTS) | {"random"}
    assert 0.08 < sum(n == "random" for n, _ in draws) / len(draws) < 0.23
    for _, values in draws:
        assert values.max() == pytest.approx(1.0) and values.min() > 0
    t1 = np.array([v for n, v in draws if n == "t1w"])
    assert (t1.std(0) / t1.mean(0)).min() > 0.05                     # per-volume values differ
    with pytest.raises(ValueError, match="contrast 'dwi'"):
        tissue.random_signals(rng, "dwi")


def test_tissue_volume_magnitude_is_the_weighted_sum():
    fractions = np.random.default_rng(4).uniform(0, 0.12, (len(tissue.CLASSES), 3, 4, 5)).astype(np.float32)
    tv = tissue.TissueVolume("T", fractions, np.eye(4))
    signals = np.linspace(0.1, 1, len(tissue.CLASSES))
    np.testing.assert_allclose(tv.magnitude(signals), np.einsum("k,kijl->ijl", signals, fractions), rtol=1e-5)
    with pytest.raises(ValueError, match="one value per class"):
        tv.magnitude([1.0, 2.0])


@needs_colin
def test_colin_head_has_scalp_fat_and_skull_around_the_brain():
    tv = tissue.colin_tissues()
    idx = {c: k for k, c in enumerate(tissue.CLASSES)}
    f = tv.fractions
    brain = f[idx["gm"]] + f[idx["wm"]] + f[idx["csf"]]
    outside = f[idx["fat"]] + f[idx["skin"]] + f[idx["muscle"]] + f[idx["bone"]] + f[idx["marrow"]]
    z = int(np.argmax((brain > 0.5).sum((0, 1))))                    # the axial level with most brain
    row = outside[:, f.shape[2] // 2, z]
    inside = np.nonzero(brain[:, f.shape[2] // 2, z] > 0.5)[0]
    left_scalp = row[:inside.min()]
    assert left_scalp.max() > 0.9 and (left_scalp > 0.5).sum() >= 5  # several mm of scalp and skull
    assert f.sum(0).max() <= 1 + 1e-5


@needs_mni
def test_mni_gets_a_derived_head_of_every_layer():
    tv = tissue.mni_tissues(np.random.default_rng(5))
    idx = {c: k for k, c in enumerate(tissue.CLASSES)}
    for cls in ("bone", "marrow", "muscle", "fat", "skin"):
        assert tv.fractions[idx[cls]].sum() > 1e4, cls              # > 10 cm³ of each layer
    assert tv.fractions.sum(0).max() <= 1 + 1e-5


# ----------------------------------------------------------------------------- randomisation


def test_deformation_is_smooth_bounded_and_seeded():
    d1 = headsim.random_deformation(np.random.default_rng(6), max_mm=5.0)
    d2 = headsim.random_deformation(np.random.default_rng(6), max_mm=5.0)
    p = np.random.default_rng(7).uniform(-100, 100, (500, 3))
    u = d1(p) - p
    np.testing.assert_array_equal(d1(p), d2(p))
    assert 0.3 < np.abs(u).max() <= 5.0 * np.sqrt(4)          # |u_i| <= Σ|a_k| <= max·sqrt(terms)
    step = d1(p + [1.0, 0, 0]) - d1(p)                               # 1 mm apart stays about 1 mm apart
    assert np.abs(step - [1.0, 0, 0]).max() < 0.5


def test_fine_texture_has_the_requested_strength():
    rng = np.random.default_rng(8)
    t = headsim.fine_texture((256, 256), rng, 0.05)
    assert t.mean() == pytest.approx(1.0, abs=0.01) and t.std() == pytest.approx(0.05, rel=0.1)
    np.testing.assert_array_equal(headsim.fine_texture((8, 8), rng, 0.0), 1.0)


def test_bias_field_is_one_at_the_centre_and_bounded():
    field = headsim.bias_field(headsim.random_phase(np.random.default_rng(9)), 0.3)
    p = np.random.default_rng(10).uniform(-120, 120, (1000, 3))
    values = field(p)
    assert field(np.zeros(3)) == pytest.approx(1.0)
    assert np.all(values >= np.exp(-0.3) - 1e-9) and np.all(values <= np.exp(0.3) + 1e-9) and values.std() > 0.01


@pytest.mark.parametrize("period,m", [(16, 2), (15, 3), (20, 1)])
def test_fold_phase_equals_sampling_every_mth_frequency(period, m):
    """Aliasing oracle: the centred DFT of the extended image, every m-th frequency about DC,
    inverse-transformed over one period, equals the fold times 1/sqrt(m)."""
    rng = np.random.default_rng(period)
    n = m * period
    x = rng.standard_normal((3, n)) + 1j * rng.standard_normal((3, n))
    spectrum = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x, axes=-1), axis=-1, norm="ortho"), axes=-1)
    picked = spectrum[:, n // 2 + m * (np.arange(period) - period // 2)]
    folded_ref = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(picked, axes=-1), axis=-1, norm="ortho"), axes=-1)
    np.testing.assert_allclose(headsim.fold_phase(x, period), np.sqrt(m) * folded_ref, atol=1e-10)
    with pytest.raises(ValueError, match="multiple of the period"):
        headsim.fold_phase(x[:, :-1], period)


def test_fine_images_to_kspace_keeps_a_band_limited_image():
    """An image whose spectrum lies inside the acquired band comes back exactly (sizes odd and even)."""
    rng = np.random.default_rng(11)
    read, phase = 21, 16
    band = np.zeros((2, 2 * read, 2 * phase), complex)
    r0, p0 = read - read // 2, phase - phase // 2
    band[:, r0:r0 + read, p0:p0 + phase] = rng.standard_normal((2, read, phase)) + 1j * rng.standard_normal((2, read, phase))
    fine = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(band, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    k = headsim.fine_images_to_kspace(fine, read, phase)
    np.testing.assert_allclose(k, 0.5 * band[:, r0:r0 + read, p0:p0 + phase], atol=1e-5)


def test_head_array_hugs_the_scalp_and_gives_a_bright_rim():
    rng = np.random.default_rng(12)
    array = coils.head_array(16, (80.0, 95.0), 180.0, rng)
    assert array.num_coils == 16
    v = array.vertices
    assert np.all((v[..., 0] / 80.0) ** 2 + (v[..., 1] / 95.0) ** 2 >= 1 - 1e-6)   # wires outside the head
    x = np.linspace(-70, 70, 57)
    plane = np.stack([*np.meshgrid(x, x * 95 / 80, indexing="ij"), np.zeros((57, 57))], -1)
    rss = np.sqrt((np.abs(coils.receive_sensitivities(array, plane)) ** 2).sum(0))
    assert rss[0, 28] > 2.5 * rss[28, 28] and rss[28, 0] > 2.5 * rss[28, 28]      # rim vs centre
    with pytest.raises(ValueError, match="semi-axes"):
        coils.head_array(8, (0.0, 90.0), 100.0, rng)


def test_random_scans_cover_the_ranges_the_issue_asks_for():
    rng = np.random.default_rng(13)
    scans = [headsim.random_head_scan(rng, ("mni", "colin"), matrix_limits=(96, 384)) for _ in range(300)]
    grids = [headsim.scan_grid(s, 190.0, 150.0) for s in scans]
    sizes = np.array([g[0] for g in grids])
    assert sizes.min() >= 96 and sizes.max() <= 384
    assert (sizes[:, 0] != sizes[:, 1]).mean() > 0.5                 # mostly non-square
    assert (sizes % 2 == 1).any() and (sizes % 2 == 0).any()
    assert {s.oversampling for s in scans} == {1, 2} and {s.swap_axes for s in scans} == {True, False}
    assert {s.orientation for s in scans} == {"axial", "coronal", "sagittal"}
    assert {s.source for s in scans} == {"mni", "colin"}
    coils_drawn = [s.coils for s in scans]
    assert min(coils_drawn) == 8 and max(coils_drawn) == 32
    snr = [s.snr_db for s in scans]
    assert 15 <= min(snr) < 18 and 37 < max(snr) <= 40
    folds = [g[2] for g in grids]
    assert 1 in folds and max(folds) >= 2                           # some heads fold into the FOV
    with pytest.raises(ValueError, match="unknown head source"):
        headsim.random_head_scan(rng, ("knee",))


# ----------------------------------------------------------------------------- whole volume


@needs_mni
def test_simulated_head_volume_is_consistent():
    rng = np.random.default_rng(14)
    scan = headsim.random_head_scan(rng, ("mni",), matrix_limits=(40, 56), coil_limits=(8, 10))
    vol = headsim.simulate_head_volume(scan, 2, rng)
    s, c, read, phase = vol.kspace.shape
    h, w = vol.target.shape[1:]
    assert (s, c, read, phase) == (2, scan.coils, scan.oversampling * h, w) and 40 <= h <= 56 and 40 <= w <= 56
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(vol.kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    rss = np.sqrt((np.abs(img) ** 2).sum(1))
    start = read // 2 - h // 2
    np.testing.assert_allclose(vol.target_rss, rss[:, start:start + h], rtol=1e-4, atol=1e-4 * rss.max())
    assert np.isfinite(vol.target).all() and vol.target.max() > 0
    # the head reaches across most of the phase field of view
    columns = (vol.target[0] > 0.1 * vol.target[0].max()).any(0)
    assert columns.mean() > 0.6


def test_brain_only_signals_keep_the_brain_classes_only():
    signals = np.arange(1, len(tissue.CLASSES) + 1, dtype=np.float32)
    kept = tissue.brain_only_signals(signals)
    for k, name in enumerate(tissue.CLASSES):
        assert kept[k] == (signals[k] if name in ("gm", "wm", "csf") else 0.0), name


def test_brain_only_draws_leave_the_other_draws_unchanged():
    plain = [headsim.random_head_scan(np.random.default_rng(s)) for s in range(40)]
    mixed = [headsim.random_head_scan(np.random.default_rng(s), brain_only_fraction=0.5) for s in range(40)]
    assert not any(p.brain_only for p in plain)
    assert 5 < sum(m.brain_only for m in mixed) < 35
    for p, m in zip(plain, mixed):   # the brain-only draw comes last: a seed's scan is otherwise the same
        assert p.coils == m.coils and p.snr_db == m.snr_db and p.matrix_limits == m.matrix_limits
    with pytest.raises(ValueError, match="brain-only fraction"):
        headsim.random_head_scan(np.random.default_rng(0), brain_only_fraction=1.5)


@needs_mni
def test_brain_only_volume_has_the_brain_in_empty_background():
    """Skull-stripped: nothing bright at the rim of the field of view (the head's layers give no
    signal), and the brain sits inside a margin of about the scalp-and-skull thickness."""
    scan = headsim.random_head_scan(np.random.default_rng(16), ("mni",), matrix_limits=(48, 64), coil_limits=(8, 8))
    scan = replace(scan, brain_only=True, snr_db=80.0, phase_ratio=1.1, read_margin=1.1, orientation="axial")
    whole = replace(scan, brain_only=False)
    brain = headsim.simulate_head_volume(scan, 1, np.random.default_rng(17)).target[0]
    head = headsim.simulate_head_volume(whole, 1, np.random.default_rng(17)).target[0]

    def rim(image):
        outer = np.ones(image.shape, bool)
        outer[3:-3, 3:-3] = False
        return image[outer]

    assert rim(brain).max() < 0.05 * brain.max()
    assert rim(head).max() > 0.1 * head.max()      # the whole head reaches the rim (scalp, folding)
    inside = brain > 0.1 * brain.max()
    assert 0.2 < inside.mean() < 0.8


@needs_inia
def test_inia_is_a_held_out_head_source():
    tv = tissue.inia_tissues(np.random.default_rng(15))
    assert tv.name == "INIA"
    brain = tv.fractions[:3].sum(0) > 0.5
    extent = np.ptp(np.argwhere(brain), axis=0)
    assert 110 <= extent.max() <= 220                               # human-sized after scaling (mm)


@needs_mni
@needs_colin
def test_cli_writes_randomised_head_files(tmp_path):
    from gadget.mri.masks import MaskSpec
    from gadget.train.data import SliceDataset

    out = tmp_path / "heads"
    assert _cli([str(out), "--head", "--source", "mni,colin", "--volumes", "3", "--slices", "1",
                 "--matrix-range", "32", "48", "--coil-range", "8", "9", "--threads", "1"]) == 0
    files = sorted(out.glob("synth_head_*.h5"))
    assert len(files) == 3
    shapes = set()
    for f in files:
        with h5py.File(f) as h:
            shapes.add(h["kspace"].shape)
            assert h["reconstruction_rss"].shape[1:] == h["target_noise_free"].shape[1:]
    assert len(shapes) > 1                                            # matrices and coils vary per volume
    ds = SliceDataset([out], MaskSpec("equispaced-fraction", [0.08], [4]))
    for i in range(len(ds)):
        sample = ds[i]
        assert tuple(sample.target.shape) == tuple(sample.crop_size)
    from gadget.cli import UserError

    with pytest.raises(UserError, match="'knee'"):
        _cli([str(out), "--head", "--source", "mni,knee"])


def _cli(argv):
    import argparse

    from gadget.cli import synth as synth_cli

    parser = argparse.ArgumentParser(prog="varnet")
    synth_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synth", *argv])
    return args.run(args)


# ----------------------------------------------------------------------------- training masks


def test_mixed_mask_sampler_draws_both_kinds_reproducibly():
    from gadget.mri.masks import MaskSampler, MaskSpec
    from gadget.train.data import MixedMaskSampler

    single = MaskSpec("random", [0.08], [4])
    one = MixedMaskSampler(single)
    for seed in [(1, 2, 3), (4, 5, 6)]:                              # one kind: exactly the plain sampler
        np.testing.assert_array_equal(one(100, seed)[0], MaskSampler(single)(100, seed=seed)[0])
    specs = [MaskSpec(k, [0.08], [4]) for k in ("random", "equispaced-fraction")]
    mixed = MixedMaskSampler(specs)
    kinds = set()
    for i in range(40):
        mask, num_low = mixed(100, (9, 0, i))
        np.testing.assert_array_equal(mask, mixed(100, (9, 0, i))[0])
        outer = np.nonzero(mask)[0]
        outer = outer[(outer < 50 - num_low // 2 - 1) | (outer > 50 + num_low // 2 + 1)]
        kinds.add(bool(np.all(np.diff(outer[outer < 50]) == np.diff(outer[outer < 50])[0])) if len(outer) > 3 else None)
    assert kinds >= {True, False}                                   # equispaced and random spacing both seen
    with pytest.raises(ValueError, match="at least one"):
        MixedMaskSampler([])


def test_training_config_accepts_several_mask_kinds():
    from gadget.train.config import TrainConfigError, build_config, mask_kinds

    cfg = build_config({}, ["data.mask=random,equispaced-fraction"])
    assert mask_kinds(cfg.data.mask) == ["random", "equispaced-fraction"]
    with pytest.raises(TrainConfigError, match="radial"):
        build_config({}, ["data.mask=random,radial"])


def test_preview_sheet_shows_each_volume(tmp_path):
    from gadget.converters.preview import preview_panels, write_preview
    from gadget.converters.simulate import simulate_volume, write_fastmri

    paths = []
    for seed in (1, 2):
        vol = simulate_volume(num_slices=3, num_coils=4, recon_size=(32, 24), seed=seed)
        write_fastmri(tmp_path / f"v{seed}.h5", vol)
        paths.append(tmp_path / f"v{seed}.h5")
    title, target, coil = preview_panels(paths[0])
    np.testing.assert_array_equal(target, vol_target := simulate_volume(
        num_slices=3, num_coils=4, recon_size=(32, 24), seed=1).target_rss[1])
    assert coil.shape == (64, 24) and "(4, 64, 24)" in title and vol_target.max() > 0
    png = write_preview(paths, tmp_path / "preview.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no files"):
        write_preview([], tmp_path / "none.png")


def test_synth_config_rejects_a_brain_only_fraction_outside_0_1(tmp_path):
    from gadget.converters.synth import SynthConfig

    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="brain-only fraction"):
            SynthConfig(out_dir=tmp_path, head=True, brain_only_fraction=bad)
