"""``varnet synth``: each physics step, the files (fastMRI oracle, headers), determinism, the CLI.

Small sizes throughout (matrix 32–64, 1–2 slices, 4–8 coils) so the file runs in seconds.
"""
from __future__ import annotations

import argparse
import importlib.util

import h5py
import numpy as np
import pytest

from gadget.converters import anatomy as anat
from gadget.converters import coils, geometry, synth
from gadget.converters.simulate import (
    NOISE_FREE_TARGET,
    OBJECT_THRESHOLD,
    centred_fft,
    correlated_noise,
    fastmri_header,
    fine_to_kspace,
    image_from_kspace,
    kspace_to_rss,
    noise_sigma,
    random_phase,
    scan_geometry,
    simulate_volume,
    write_fastmri,
)
from gadget.data.mrd_header import parse_encoding

HAVE_NILEARN = importlib.util.find_spec("nilearn") is not None
needs_mni = pytest.mark.skipif(not HAVE_NILEARN, reason=f"nilearn=={anat.NILEARN_PIN} not installed (MNI template)")


def _colin_installed() -> bool:
    try:
        anat.colin_path()
        return True
    except anat.AnatomyUnavailable:
        return False


# ----------------------------------------------------------------------------- 1. anatomy


def test_tissue_contrast_orders_tissues():
    gm, wm, brain = np.array([1.0, 0, 0, 0.5]), np.array([0, 1.0, 0, 0.5]), np.array([True, True, True, False])
    t1 = anat.tissue_magnitude(gm, wm, brain, "t1w")
    pd = anat.tissue_magnitude(gm, wm, brain, "pdw")
    assert t1[1] > t1[0] > t1[2] and t1[3] == 0          # T1w: WM > GM > CSF, nothing outside the brain
    assert pd[2] > pd[0] > pd[1] and pd[3] == 0          # PDw: CSF > GM > WM


@needs_mni
def test_mni_template_is_the_2009_brain():
    paths = anat.mni_paths()
    assert paths["t1"].name == "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    brain = anat.load_anatomy("mni")
    size = brain.extent_mm[:, 1] - brain.extent_mm[:, 0]
    assert 130 < size[0] < 160 and 160 < size[1] < 200 and 130 < size[2] < 170   # a skull-stripped brain (mm)
    assert (brain.central_mm[:, 0] > brain.extent_mm[:, 0]).all()
    assert (brain.central_mm[:, 1] < brain.extent_mm[:, 1]).all()
    values = brain.sample(np.array([[0.0, 0, 200], [0, 0, 0]]))
    assert values[0] == 0 and 0 < values[1] <= 1


@needs_mni
def test_mni_axial_slice_looks_like_a_brain_on_the_fine_grid():
    geo = scan_geometry(anat.load_anatomy("mni"), 1, 8, (64, 64), "axial", np.random.default_rng(0))
    img = np.abs(geo.object_image(geo.planes[0]))
    assert img.shape == (128, 128)                               # fine grid: 2× the matrix
    inside = img > 0.05 * img.max()
    assert 0.2 < inside.mean() < 0.7                              # brain fills part of the FOV
    assert not inside[0].any() and not inside[-1].any() and not inside[:, 0].any() and not inside[:, -1].any()
    rows = np.flatnonzero(inside.any(1))
    cols = np.flatnonzero(inside.any(0))
    assert np.ptp(rows) > np.ptp(cols)                            # axial brain: longer anterior-posterior (rows)


def test_colin_missing_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(anat, "COLIN_PATHS", [tmp_path / "nowhere" / "ch2.nii.gz"])
    anat._load_cached.cache_clear()
    with pytest.raises(anat.AnatomyUnavailable, match="apt-get install mricron-data"):
        anat.load_anatomy("colin")
    anat._load_cached.cache_clear()


def test_nilearn_missing_gives_install_hint(monkeypatch):
    monkeypatch.setattr(anat.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(anat.AnatomyUnavailable, match=r"pip install nilearn==0\.14\.1"):
        anat.mni_paths()


@pytest.mark.skipif(not _colin_installed(), reason="Colin27 not installed (apt-get install mricron-data)")
def test_colin_head_has_scalp_and_zero_background():
    head = anat.load_anatomy("colin")
    size = head.extent_mm[:, 1] - head.extent_mm[:, 0]
    assert size[0] > 150 and size[1] > 180                        # whole head, wider than the brain
    assert head.sample(np.array([[0.0, 0, 0]]))[0] > 0
    with pytest.raises(ValueError, match="tissue maps"):
        anat.load_anatomy("colin", "pdw")


def test_unknown_source_and_contrast_are_named():
    with pytest.raises(ValueError, match="'knee'"):
        anat.load_anatomy("knee")
    with pytest.raises(ValueError, match="'t2w'"):
        anat.load_anatomy("phantom", "t2w")


def test_slices_come_from_the_central_range():
    rng = np.random.default_rng(3)
    for n in (1, 2, 16, 60):
        pos, spacing = geometry.central_slice_positions((-20.0, 40.0), n, rng)
        assert len(pos) == n and spacing <= 5.0 and pos.min() >= -20 - 1e-9 and pos.max() <= 40 + 1e-9
        assert np.allclose(np.diff(pos), spacing)


def test_plane_grid_orientation_and_centre_convention():
    (plane,) = geometry.slice_planes("axial", [10.0])
    pts = plane.grid((4, 6), (2.0, 3.0))
    assert pts.shape == (4, 6, 3)
    np.testing.assert_allclose(pts[2, 3], [0, 0, 10])                 # pixel (n//2, n//2) is the centre
    np.testing.assert_allclose(pts[3, 3] - pts[2, 3], [0, -2, 0])      # rows run anterior → posterior
    np.testing.assert_allclose(pts[2, 4] - pts[2, 3], [-3, 0, 0])      # columns run right → left
    (sag,) = geometry.slice_planes("sagittal", [0.0])
    np.testing.assert_allclose(sag.grid((2, 2), (1, 1))[1, 0] - sag.grid((2, 2), (1, 1))[0, 0], [0, 0, -1])
    with pytest.raises(ValueError, match="'oblique'"):
        geometry.slice_planes("oblique", [0.0])


def test_pose_round_trip():
    pose = geometry.random_pose(np.random.default_rng(1), "coronal")
    q = np.random.default_rng(2).normal(size=(5, 3)) * 50
    p = pose.scale * q @ pose.rotation.T + np.asarray(pose.shift_mm)
    np.testing.assert_allclose(pose.to_object(p), q, atol=1e-9)
    assert abs(np.dot(pose.shift_mm, pose.normal)) < 1e-12          # shifts stay in the slice plane


# ----------------------------------------------------------------------------- 2. phase


def test_random_phase_is_smooth_seeded_and_not_flat():
    a, b = random_phase(np.random.default_rng(5)), random_phase(np.random.default_rng(5))
    (plane,) = geometry.slice_planes("axial", [0.0])
    pts = plane.grid((101, 101), (2.0, 2.0))                      # 200 mm square, 2 mm pixels
    phi = a(pts)
    np.testing.assert_array_equal(phi, b(pts))
    step = max(np.abs(np.diff(phi, axis=0)).max(), np.abs(np.diff(phi, axis=1)).max())
    assert step < 0.15                                             # < 0.075 rad/mm: no wraps between pixels
    assert np.ptp(phi) > 0.5                                       # but it does vary over the object


# ----------------------------------------------------------------------------- 3. coils


@pytest.mark.parametrize("bad", [3, 33, 0, True, 12.0])
def test_coil_count_out_of_range(bad):
    with pytest.raises(ValueError, match="number of coils"):
        coils.check_num_coils(bad)


def test_biot_savart_matches_the_on_axis_field_of_a_loop():
    a = 50.0
    t = np.linspace(0, 2 * np.pi, 361)
    loop = np.stack([a * np.cos(t), a * np.sin(t), np.zeros_like(t)], 1)
    z = np.array([0.0, 20.0, 80.0])
    field = coils.biot_savart(loop, np.stack([np.zeros(3), np.zeros(3), z], 1), wire_radius_mm=0.0)
    expected = 2 * np.pi * a**2 / (a**2 + z**2) ** 1.5            # μ0 I / 4π units
    np.testing.assert_allclose(field[:, 2], expected, rtol=1e-4)
    np.testing.assert_allclose(field[:, :2], 0, atol=1e-9)


@pytest.mark.parametrize("n", [4, 12, 13, 32])
def test_loops_sit_outside_the_cylinder(n):
    arr = coils.loop_array(n, 110.0)
    assert arr.num_coils == n and sum(coils.ring_sizes(n)) == n
    radial = np.hypot(arr.vertices[..., 0], arr.vertices[..., 1])
    assert radial.min() >= 110.0 - 1e-9


@pytest.mark.parametrize("num_coils", [4, 12, 32])
@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_sensitivities_finite_smooth_and_never_all_zero_in_the_object(orientation, num_coils):
    geo = scan_geometry(anat.load_anatomy("phantom"), 1, num_coils, (64, 64), orientation, np.random.default_rng(4))
    plane = geo.planes[0]
    sens = geo.sensitivities(plane)                                # (coil, 128, 128) fine grid, FOV 240 mm
    assert sens.shape == (num_coils, 128, 128) and np.isfinite(sens).all()
    obj = np.abs(geo.object_image(plane)) > 0
    rss = np.sqrt((np.abs(sens) ** 2).sum(0))
    assert obj.mean() > 0.1 and rss[obj].min() > 0.1 * rss[obj].max()     # no RSS zero inside the object
    # bounded gradient: over one fine pixel (1.9 mm) no map changes by more than 25 % of the local RSS
    # (the wires stay >= 15 mm from the object, where a loop's field changes by ~3/d = 20 %/mm at most)
    for axis in (1, 2):
        jump = np.abs(np.diff(sens, axis=axis)).max(0)
        local = rss[:-1] if axis == 1 else rss[:, :-1]
        inside = obj[:-1] & obj[1:] if axis == 1 else obj[:, :-1] & obj[:, 1:]
        assert (jump[inside] / local[inside]).max() < 0.25
    # low high-frequency energy: > 97 % of the object-masked map energy in the central half band
    spec = np.abs(np.fft.fftshift(np.fft.fft2(sens * obj), axes=(-2, -1))) ** 2
    assert spec[:, 32:96, 32:96].sum() / spec.sum() > 0.97


def test_cubic_interpolation_reproduces_smooth_functions():
    src = np.linspace(-100, 100, 41)
    dst = np.linspace(-100, 100, 400)
    m = coils.cubic_interpolation_matrix(src, dst)
    np.testing.assert_allclose(m.sum(1), 1, atol=1e-6)
    f = np.sin(src / 40.0)
    np.testing.assert_allclose(m @ f, np.sin(dst / 40.0), atol=2e-4)


def test_noise_covariance_is_hermitian_positive_definite():
    rng = np.random.default_rng(0)
    arr = coils.loop_array(8, 110.0)
    (plane,) = geometry.slice_planes("axial", [0.0])
    sens = coils.receive_sensitivities(arr, plane.grid((24, 24), (6.0, 6.0)))
    cov = coils.noise_covariance(sens, rng)
    np.testing.assert_allclose(cov, cov.conj().T)
    assert np.linalg.eigvalsh(cov).min() > 0
    assert abs(np.real(np.diag(cov)).mean() - 1) < 1e-12
    corr = np.abs(cov) / np.sqrt(np.outer(np.diag(cov).real, np.diag(cov).real))
    off = corr[~np.eye(8, dtype=bool)]
    assert 0.02 < off.max() < 0.8                                   # neighbours couple, not perfectly


# ----------------------------------------------------------------------------- 4. k-space, no inverse crime


@pytest.mark.parametrize("n", [8, 10, 9])
def test_centred_fft_matches_the_shift_definition(n):
    x = np.random.default_rng(n).normal(size=(3, n, 4)) + 1j * np.random.default_rng(n + 1).normal(size=(3, n, 4))
    ref = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x, axes=1), axis=1, norm="ortho"), axes=1)
    np.testing.assert_allclose(centred_fft(x, 1), ref, atol=1e-12)
    np.testing.assert_allclose(centred_fft(ref, 1, inverse=True), x, atol=1e-12)


def test_image_from_kspace_matches_fastmri_ifft2c():
    torch = pytest.importorskip("torch")
    fastmri = pytest.importorskip("fastmri")
    k = (np.random.default_rng(0).normal(size=(2, 16, 12)) + 1j).astype(np.complex64)
    ref = fastmri.ifft2c(torch.view_as_real(torch.from_numpy(k))).numpy()
    np.testing.assert_allclose(image_from_kspace(k), ref[..., 0] + 1j * ref[..., 1], atol=1e-5)


def test_fine_grid_to_kspace_keeps_a_band_limited_image():
    """A smooth blob on the fine grid comes back at the acquisition pixels (even fine pixels),
    in the central rows of the 2×-oversampled readout FOV; outer rows stay empty."""
    h, w = 32, 24
    r = (np.arange(2 * h) - h)[:, None] / (2 * h)
    c = (np.arange(2 * w) - w)[None, :] / (2 * w)
    blob = np.exp(-((r - 0.05) ** 2 + (c + 0.03) ** 2) / (2 * 0.12**2)) * np.exp(1j * 3 * r)
    k = fine_to_kspace(blob[None].astype(np.complex64))
    assert k.shape == (1, 2 * h, w) and k.dtype == np.complex64
    img = image_from_kspace(k[0])                       # (2h, w): readout FOV doubled
    np.testing.assert_allclose(img[h // 2:h // 2 + h], blob[::2, ::2], atol=2e-3 * np.abs(blob).max())
    assert np.abs(img[:h // 4]).max() < 1e-3 and np.abs(img[-h // 4:]).max() < 1e-3


def test_kspace_is_not_the_inverse_crime():
    """Sharp edges: simulating on the fine grid differs from sampling the object on the acquisition grid."""
    geo = scan_geometry(anat.load_anatomy("phantom"), 1, 4, (32, 32), "axial", np.random.default_rng(0))
    plane = geo.planes[0]
    fine = geo.sensitivities(plane) * geo.object_image(plane)
    k = fine_to_kspace(fine)
    ours = image_from_kspace(k)[:, 16:48]                         # what the acquired k-space shows
    naive = fine[:, ::2, ::2]                                      # the object sampled on the acquisition grid
    assert np.linalg.norm(ours - naive) / np.linalg.norm(naive) > 0.02


# ----------------------------------------------------------------------------- 5. noise


def test_correlated_noise_has_the_requested_covariance():
    """Tolerance: the sample covariance of N complex Gaussian vectors has per-entry standard error
    sqrt(Ψ_ii Ψ_jj / N); we allow 6 standard errors (false alarm < 1e-6 per entry)."""
    rng = np.random.default_rng(11)
    sens = coils.receive_sensitivities(coils.loop_array(6, 100.0), np.random.default_rng(1).normal(size=(200, 3)) * 40)
    cov = 3e-6**2 * coils.noise_covariance(sens, rng)
    n = 100_000
    noise = correlated_noise((6, n), cov, rng)
    assert noise.dtype == np.complex64 and abs(noise.mean()) < 6 * 3e-6 / np.sqrt(n)
    emp = noise.astype(np.complex128) @ noise.conj().T.astype(np.complex128) / n
    scale = np.sqrt(np.outer(np.diag(cov).real, np.diag(cov).real))
    assert (np.abs(emp - cov) / scale).max() < 6 / np.sqrt(n)


def test_volume_noise_scan_and_kspace_noise_match_the_covariance():
    n = 20_000
    vol = simulate_volume(2, 6, (64, 64), snr_db=0.0, seed=3, noise_samples=n)
    scale = np.sqrt(np.outer(np.diag(vol.noise_covariance).real, np.diag(vol.noise_covariance).real))
    emp = vol.noise.astype(np.complex128) @ vol.noise.conj().T.astype(np.complex128) / n
    assert (np.abs(emp - vol.noise_covariance) / scale).max() < 6 / np.sqrt(n)
    # the readout-oversampled rows outside the object hold only noise (SNR 0 dB: ringing negligible)
    img = image_from_kspace(vol.kspace)                  # (slice, coil, 128, 64)
    edge = np.concatenate([img[:, :, :16], img[:, :, -16:]], axis=2).transpose(1, 0, 2, 3).reshape(6, -1)
    m = edge.shape[1]
    emp = edge @ edge.conj().T / m
    assert (np.abs(emp - vol.noise_covariance) / scale).max() < 6 / np.sqrt(m) + 0.02


def test_snr_follows_its_definition():
    vol = simulate_volume(2, 4, (48, 48), snr_db=25.0, seed=1)
    mean = vol.target[vol.target > OBJECT_THRESHOLD * vol.target.max()].mean()
    assert np.isclose(20 * np.log10(mean / vol.sigma), 25.0)
    assert np.isclose(np.real(np.diag(vol.noise_covariance)).mean(), vol.sigma**2)
    assert noise_sigma(vol.target, 25.0) == pytest.approx(vol.sigma)
    lower = simulate_volume(2, 4, (48, 48), snr_db=10.0, seed=1)
    assert np.abs(lower.target_rss - lower.target).mean() > 3 * np.abs(vol.target_rss - vol.target).mean()


# ----------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cfg = synth.SynthConfig(out_dir=out, source="phantom", volumes=2, slices=2, coils=4, matrix=32, seed=9)
    return out, synth.run_synth(cfg)


def test_files_have_the_fastmri_train_layout(phantom_dir):
    out, paths = phantom_dir
    assert [p.name for p in paths] == ["synth_phantom_axial_000.h5", "synth_phantom_axial_001.h5"]
    with h5py.File(paths[0], "r") as f:
        assert f["kspace"].dtype == np.complex64 and f["kspace"].shape == (2, 4, 64, 32)
        for name in ("reconstruction_rss", NOISE_FREE_TARGET):
            assert f[name].dtype == np.float32 and f[name].shape == (2, 32, 32)
        assert f["noise"].dtype == np.complex64 and f["noise"].shape == (4, synth.NOISE_READOUTS * 64)
        assert f.attrs["acquisition"] == "SIM_PHANTOM_T1" and f.attrs["patient_id"]
        assert np.isclose(f.attrs["max"], f["reconstruction_rss"][()].max())
        assert np.isclose(f.attrs["norm"], np.linalg.norm(f["reconstruction_rss"][()]))
        rss = kspace_to_rss(f["kspace"][1], 32)
        np.testing.assert_allclose(rss, f["reconstruction_rss"][1], rtol=1e-5, atol=1e-6 * rss.max())
        with pytest.raises(KeyError):
            f["mask"]
    assert not list(out.glob(".*"))                                # no temporary leftovers


def test_header_is_consistent_and_schema_valid(phantom_dir):
    import ismrmrd.xsd

    _, paths = phantom_dir
    with h5py.File(paths[0], "r") as f:
        xml = f["ismrmrd_header"][()]
        s, c, readout, width = f["kspace"].shape
    enc = parse_encoding(xml)
    assert enc.encoded_matrix == (readout, width, 1) and enc.recon_matrix == (32, 32, 1)
    assert enc.padding == (0, width)                               # full data: padding_left 0, right W
    assert enc.e1_center == width // 2 and enc.e1_max == width - 1
    assert enc.encoded_fov_mm[0] == pytest.approx(2 * enc.recon_fov_mm[0])   # 2× readout oversampling
    assert enc.recon_fov_mm[0] == pytest.approx(anat.DEFAULT_FOV_MM["phantom"])
    header = ismrmrd.xsd.CreateFromDocument(xml.decode())
    assert header.encoding[0].encodingLimits.slice.maximum == s - 1
    assert header.acquisitionSystemInformation.receiverChannels == c


def test_fastmri_oracle_loads_our_files(phantom_dir):
    fastmri_data = pytest.importorskip("fastmri.data")
    from fastmri.data.subsample import EquispacedMaskFractionFunc
    from fastmri.data.transforms import VarNetDataTransform

    out, paths = phantom_dir
    dataset = fastmri_data.SliceDataset(
        root=out, challenge="multicoil",
        transform=VarNetDataTransform(mask_func=EquispacedMaskFractionFunc([0.08], [4])))
    assert len(dataset) == 4
    for i in range(len(dataset)):
        sample = dataset[i]
        with h5py.File(out / sample.fname, "r") as f:
            np.testing.assert_array_equal(sample.target.numpy(), f["reconstruction_rss"][sample.slice_num])
            assert sample.max_value == f.attrs["max"]
        assert sample.crop_size == (32, 32) and sample.masked_kspace.shape == (4, 64, 32, 2)


def test_same_seed_same_files_bitwise(phantom_dir, tmp_path):
    _, paths = phantom_dir
    again = synth.run_synth(synth.SynthConfig(out_dir=tmp_path, source="phantom", volumes=2, slices=2, coils=4,
                                              matrix=32, seed=9))
    for a, b in zip(paths, again):
        with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
            assert set(fa) == set(fb)
            for name in fa:
                assert fa[name][()].tobytes() == fb[name][()].tobytes(), name
            assert dict(fa.attrs) == dict(fb.attrs)
    with h5py.File(paths[0], "r") as f0, h5py.File(paths[1], "r") as f1:
        assert not np.array_equal(f0["kspace"][()], f1["kspace"][()])     # volumes differ
    other = simulate_volume(1, 4, (32, 32), seed=10)
    assert not np.array_equal(other.kspace, simulate_volume(1, 4, (32, 32), seed=11).kspace)


def test_undersampled_fastmri_files_keep_targets(tmp_path):
    from gadget.mri.masks import make_mask

    cfg = synth.SynthConfig(out_dir=tmp_path, source="phantom", slices=1, coils=4, matrix=64,
                            accelerations=(4.0,), mask="equispaced-fraction", center_fraction=0.08, seed=2)
    (path,) = synth.run_synth(cfg)
    mask, num_low = make_mask("equispaced-fraction", 64, 4, 0.08, seed=synth.volume_seed(2, 0, 2))
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["mask"][()].astype(bool), mask)
        assert f.attrs["num_low_frequency"] == num_low and f.attrs["acceleration"] == 4
        assert not np.abs(f["kspace"][()][..., ~mask]).any()
        assert "reconstruction_rss" in f and NOISE_FREE_TARGET in f
        assert parse_encoding(f["ismrmrd_header"][()]).acceleration_e1 == 4


def test_write_fastmri_rejects_a_wrong_mask(tmp_path):
    vol = simulate_volume(1, 4, (32, 32), seed=0)
    with pytest.raises(ValueError, match=r"\(32,\)"):
        write_fastmri(tmp_path / "x.h5", vol, mask=np.ones(30, bool))
    assert "encodedSpace" in fastmri_header(vol)


@needs_mni
@pytest.mark.parametrize("orientation", ["axial", "coronal", "sagittal"])
def test_mni_volume_end_to_end(tmp_path, orientation):
    cfg = synth.SynthConfig(out_dir=tmp_path, source="mni", slices=2, coils=8, matrix=48, orientation=orientation)
    (path,) = synth.run_synth(cfg)
    assert path.name == f"synth_mni_{orientation}_000.h5"
    with h5py.File(path, "r") as f:
        assert f.attrs["acquisition"] == "SIM_MNI_T1"
        truth = f[NOISE_FREE_TARGET][()]
        assert np.isfinite(f["kspace"][()]).all() and (truth > 0.1 * truth.max()).mean() > 0.15


def test_ismrmrd_format(tmp_path):
    try:
        from gadget.converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd  # noqa: F401
        from gadget.data.mrd_file import iter_acquisitions, read_header_xml
    except ImportError as exc:
        pytest.skip(f"ISMRMRD converter not available: {exc}")
    cfg = synth.SynthConfig(out_dir=tmp_path, source="phantom", slices=2, coils=4, matrix=32, format="ismrmrd",
                            accelerations=(4.0,), seed=1)
    (path,) = synth.run_synth(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth_phantom_axial_000.h5"]   # temp file removed
    mask, _, _ = synth.volume_mask(cfg, 0)
    chunks = list(iter_acquisitions(path))
    flags = np.concatenate([c.heads["flags"] for c in chunks])
    noise = (flags & np.uint64(1 << 18)) != 0                      # ACQ_IS_NOISE_MEASUREMENT is bit 19
    assert noise.sum() > 0 and (~noise).sum() == 2 * mask.sum()
    assert "encoding" in read_header_xml(path)


# ----------------------------------------------------------------------------- CLI


def _cli(argv):
    from gadget.cli import synth as synth_cli

    parser = argparse.ArgumentParser(prog="varnet")
    synth_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["synth", *argv])
    return args.run(args)


def _user_error(argv) -> str:
    from gadget.cli import UserError

    with pytest.raises(UserError) as info:
        _cli(argv)
    message = str(info.value)
    assert "\n" not in message and message
    return message


def test_cli_writes_files(tmp_path, capsys):
    assert _cli([str(tmp_path), "--source", "phantom", "--volumes", "2", "--slices", "1", "--coils", "4",
                 "--matrix", "32"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth_phantom_axial_000.h5", "synth_phantom_axial_001.h5"]
    assert "synth_phantom_axial_001.h5" in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(tmp_path, monkeypatch):
    assert "--coils must be between 4 and 32, got 3" in _user_error([str(tmp_path), "--coils", "3"])
    assert "'knee'" in _user_error([str(tmp_path), "--source", "knee"])
    assert "'oblique'" in _user_error([str(tmp_path), "--orientation", "oblique"])
    assert "'dicom'" in _user_error([str(tmp_path), "--format", "dicom"])
    assert "acceleration" in _user_error([str(tmp_path), "--source", "phantom", "--acceleration", "0.5"])
    assert "tissue maps" in _user_error([str(tmp_path), "--source", "colin", "--contrast", "pdw"])
    monkeypatch.setattr(anat, "COLIN_PATHS", [tmp_path / "missing" / "ch2.nii.gz"])
    anat._load_cached.cache_clear()
    assert "apt-get install mricron-data" in _user_error([str(tmp_path / "c"), "--source", "colin"])
    anat._load_cached.cache_clear()
    assert not (tmp_path / "c").exists()                           # failed before writing anything


def test_cli_help_has_an_example():
    from gadget.cli import synth as synth_cli

    parser = argparse.ArgumentParser(prog="varnet")
    sub = parser.add_subparsers(dest="command")
    synth_cli.add_parser(sub)
    text = sub.choices["synth"].format_help()
    assert "example:" in text and "varnet synth" in text and "--orientation" in text
