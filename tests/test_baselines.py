"""Classical baselines: ESPIRiT maps, CG-SENSE, BART pics (when the program is installed)."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from scipy.special import expit

from gadget.converters.simulate import simulate_volume
from gadget.baselines import (
    BartConfig,
    BartError,
    EspiritConfig,
    SenseConfig,
    SenseOperator,
    cg_sense,
    conjugate_gradient,
    espirit_maps,
    pics_l1,
    read_cfl,
    write_cfl,
)
from gadget.baselines.bart import to_bart_slice
from gadget.baselines.espirit import SQUARING_KERNEL, calibration_kernel
from gadget.mri import center_crop, fft2c, ifft2c, nmse, rss
from gadget.mri.masks import MaskSampler, MaskSpec, make_mask

HAVE_BART = shutil.which("bart") is not None
needs_bart = pytest.mark.skipif(not HAVE_BART, reason="BART not installed ('bart' not on PATH; apt-get install bart)")


def _known_maps(coils, rows, cols, seed=0):
    """Smooth maps: Gaussian bumps around the FOV times a linear + quadratic phase, complex128."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij")
    maps = []
    for c in range(coils):
        angle = 2 * np.pi * c / coils
        cy, cx = 0.9 * np.sin(angle), 0.9 * np.cos(angle)
        mag = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.8)
        phase = rng.uniform(0, 2 * np.pi) + rng.normal(0, 1.0) * x + rng.normal(0, 1.0) * y + 0.5 * x * y
        maps.append(mag * np.exp(1j * phase))
    return np.stack(maps)


def _object(rows, cols):
    """A smooth-edged ellipse with two inner structures and a smooth phase, complex128."""
    y, x = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij")
    r = (y / 0.75) ** 2 + (x / 0.6) ** 2
    img = expit((1 - r) * 30)
    img -= 0.4 * expit((1 - ((y - 0.2) / 0.25) ** 2 - ((x + 0.2) / 0.15) ** 2) * 20)
    img += 0.3 * expit((1 - ((y + 0.3) / 0.15) ** 2 - ((x - 0.15) / 0.2) ** 2) * 20)
    return img * np.exp(1j * (0.8 * x - 0.5 * y)), r < 0.9


def _alignment(maps_est, coil_images_or_maps, inside):
    """|Sᴴ s| / ||s|| per pixel inside the object: 1 means equal up to a per-pixel phase."""
    s = torch.as_tensor(coil_images_or_maps)
    num = (torch.as_tensor(maps_est).conj().to(s.dtype) * s).sum(0).abs()
    den = s.abs().pow(2).sum(0).sqrt()
    return (num / den)[torch.as_tensor(inside)]


# ----------------------------------------------------------------------------- ESPIRiT


def test_espirit_reproduces_known_maps_up_to_phase():
    coils, rows, cols = 8, 96, 64
    true_maps = _known_maps(coils, rows, cols)
    obj, inside = _object(rows, cols)
    kspace = fft2c(torch.from_numpy(true_maps * obj)).numpy()
    maps, eig = espirit_maps(kspace, num_low=20, return_eigenvalues=True)
    assert maps.dtype == torch.complex64 and maps.shape == (coils, rows, cols)
    align = _alignment(maps, true_maps, inside)
    assert float(align.min()) > 0.98 and float(align.mean()) > 0.995
    assert float(eig[torch.as_tensor(inside)].min()) > 0.95
    norm = rss(maps, dim=0)[torch.as_tensor(inside)]
    assert torch.allclose(norm, torch.ones_like(norm), atol=1e-4)  # Σ|S|² = 1 where kept
    # phase normalised to the reference coil (default: the strongest): real, non-negative there
    ref = int(torch.argmax((maps.abs() ** 2).sum((1, 2))))
    kept = maps[ref].abs() > 1e-3
    assert float(maps[ref][kept].imag.abs().max()) < 1e-4 and float(maps[ref][kept].real.min()) > 0


def test_espirit_on_a_coarse_grid_matches_the_full_grid():
    """``step`` 4: the eigenproblems on a 24×16 grid, maps and eigenvalues interpolated to 96×64. Inside
    the object they match the full grid's up to each pixel's common phase (the reference coil may
    differ): magnitudes to 0.01, alignment above 0.999 (measured 0.005, 0.99996); they stay unit-norm
    and find the known maps."""
    from gadget.baselines.espirit import EspiritConfig

    coils, rows, cols = 8, 96, 64
    true_maps = _known_maps(coils, rows, cols)
    obj, inside = _object(rows, cols)
    kspace = fft2c(torch.from_numpy(true_maps * obj)).numpy()
    full = espirit_maps(kspace, num_low=20)
    coarse, eig = espirit_maps(kspace, num_low=20, config=EspiritConfig(step=4), return_eigenvalues=True)
    inside_t = torch.as_tensor(inside)
    assert float((coarse.abs() - full.abs())[:, inside_t].abs().max()) < 0.01
    assert float((coarse.conj() * full).sum(0).abs()[inside_t].min()) > 0.999
    assert float(_alignment(coarse, true_maps, inside).min()) > 0.98
    norm = rss(coarse, dim=0)[inside_t]
    assert torch.allclose(norm, torch.ones_like(norm), atol=1e-4)
    assert torch.all(coarse[:, eig < 0.95] == 0)


def test_interpolation_matrix_is_exact_on_lines_and_holds_the_edges():
    from gadget.baselines.espirit import interpolation_matrix

    for full, coarse in ((96, 24), (97, 25), (64, 11)):
        w = interpolation_matrix(full, coarse)
        assert torch.allclose(w.sum(1), torch.ones(full, dtype=torch.float64))
        coarse_pos = (torch.arange(coarse, dtype=torch.float64) - coarse // 2) / coarse
        fine_pos = (torch.arange(full, dtype=torch.float64) - full // 2) / full
        line = w @ (3 * coarse_pos + 1)
        expected = 3 * fine_pos.clamp(coarse_pos[0], coarse_pos[-1]) + 1
        assert torch.allclose(line, expected, atol=1e-12)


def test_espirit_crop_zeroes_outside_and_mask_gives_acs():
    coils, rows, cols = 6, 64, 64
    obj, _ = _object(rows, cols)
    kspace = fft2c(torch.from_numpy(_known_maps(coils, rows, cols, seed=1) * obj)).numpy()
    mask, num_low = MaskSampler(MaskSpec("equispaced", [0.25], [4]))(cols, seed=3)
    under = kspace * mask
    by_mask, eig = espirit_maps(under, mask=mask, return_eigenvalues=True)
    by_count = espirit_maps(under, num_low=num_low)
    assert torch.equal(by_mask, by_count)
    assert torch.all(by_mask[:, eig < 0.95] == 0)
    with pytest.raises(ValueError, match="centre"):
        espirit_maps(under * 0 + (np.arange(cols) == 0), num_low=None)


def test_espirit_on_simulated_slice_matches_coil_images():
    vol = simulate_volume(num_slices=1, num_coils=8, recon_size=(64, 64), seed=5)
    kspace = vol.kspace[0]
    maps = espirit_maps(kspace, num_low=16, config=EspiritConfig())
    coil_images = ifft2c(torch.from_numpy(kspace)).to(torch.complex128)
    combined = rss(coil_images, dim=0)
    inside = combined > 0.2 * combined.max()
    align = _alignment(maps, coil_images, inside)
    assert float(align.mean()) > 0.99 and float(align.min()) > 0.9  # noise lowers single pixels


@pytest.mark.parametrize("lines, kernel", [(2, 2), (3, 2), (4, 2), (5, 3), (6, 3), (7, 4), (8, 4), (9, 5),
                                           (10, 6), (24, 6)])
def test_the_calibration_kernel_leaves_five_phase_positions_or_half_the_lines(lines, kernel):
    assert calibration_kernel(lines, 6) == kernel
    assert calibration_kernel(lines, 3) == min(kernel, 3)


@pytest.mark.parametrize("width, accel, centre", [(128, 8, 0.04), (96, 8, 0.04)])
def test_espirit_with_few_calibration_lines_covers_the_object(width, accel, centre):
    """5 lines (8× on 128) and 4 lines (8× on 96): the maps still span the coil images inside the object
    and their eigenvalue vouches for it (a kernel nearly as wide as the block left them cropped inside)."""
    vol = simulate_volume(num_slices=1, num_coils=12, recon_size=(width, width), seed=4)
    kspace = vol.kspace[0]
    mask, num_low = make_mask("equispaced_fraction", kspace.shape[-1], accel, centre, seed=1)
    maps, values = espirit_maps(kspace * mask, num_low=num_low, return_eigenvalues=True)
    coil_images = ifft2c(torch.from_numpy(kspace)).to(torch.complex128)
    combined = rss(coil_images, dim=0)
    inside = combined > 0.2 * combined.max()
    assert float((values[inside] >= 0.95).float().mean()) > 0.95
    align = _alignment(maps, coil_images, inside)
    assert float(align.mean()) > 0.97


def test_coil_noise_levels_read_each_coils_noise_and_leave_out_zeros():
    """Pure noise with a different σ per coil, half the lines not acquired and an asymmetric echo (both
    exact zeros): each level within 6 % (about 1500 samples per coil: the median's relative standard error
    is about 1.2/√1500 ≈ 3 %)."""
    from gadget.mri.coils import coil_noise_levels

    rng = np.random.default_rng(3)
    sigma = np.array([0.5, 1.0, 2.0, 8.0])
    noise = (rng.standard_normal((4, 256, 96)) + 1j * rng.standard_normal((4, 256, 96))) * (sigma / np.sqrt(2))[:, None, None]
    noise[..., ::2] = 0
    noise[:, :40] = 0
    np.testing.assert_allclose(coil_noise_levels(noise), sigma, rtol=0.06)
    noise[1] = 0
    assert coil_noise_levels(noise)[1] == 0


@pytest.mark.parametrize("factor", [1, 10])
def test_espirit_on_noise_equalised_coils_keeps_the_maps_of_a_coil_far_noisier_than_the_rest(factor):
    """8 coils with known maps, 8× with 5 calibration lines, noise of 0.2 % of the k-space peak, one coil
    ``factor`` times noisier. Its noise fills the calibration's signal subspace (share 0.31 where the signal
    spans 0.19) and the maps lose the object (mean alignment 0.77); calibrated on the coils scaled to one
    noise level and mapped back, they are as aligned as with equal noise. With equal noise the two agree."""
    from dataclasses import replace

    from gadget.baselines.espirit import calibrated_maps, espirit_calibration

    coils, rows, cols = 8, 96, 64
    true_maps = _known_maps(coils, rows, cols)
    obj, inside = _object(rows, cols)
    clean = fft2c(torch.from_numpy(true_maps * obj)).numpy()
    sigma = np.full(coils, 0.002 * np.abs(clean).max())
    sigma[2] *= factor
    rng = np.random.default_rng(0)
    noisy = clean + (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape)) * (sigma / np.sqrt(2))[:, None, None]
    mask, num_low = make_mask("equispaced_fraction", cols, 8, 0.08, seed=1)
    under = (noisy * mask).astype(np.complex64)
    align = {}
    for equalise in (False, True):
        config = replace(EspiritConfig(), equalise_noise=equalise)
        calibration = espirit_calibration(under, num_low, mask=mask, config=config)
        maps, _ = calibrated_maps(calibration, config)
        align[equalise] = _alignment(maps, true_maps, inside)
        norm = rss(maps, dim=0)[torch.as_tensor(inside)]
        assert torch.allclose(norm, torch.ones_like(norm), atol=1e-4)
    assert float(align[True].mean()) > 0.998 and float(align[True].min()) > 0.99
    if factor == 1:
        assert abs(float(align[True].mean()) - float(align[False].mean())) < 1e-3
    else:
        assert float(align[False].mean()) < 0.9


# ----------------------------------------------------------------------------- SENSE


def _random_problem(seed=0, coils=4, rows=16, cols=12, dtype=torch.complex128):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(1, coils, rows, cols, dtype=dtype, generator=g)
    mask = torch.rand(cols, generator=g) < 0.5
    x = torch.randn(1, rows, cols, dtype=dtype, generator=g)
    y = torch.randn(1, rows, cols, dtype=dtype, generator=g)
    k = torch.randn(1, coils, rows, cols, dtype=dtype, generator=g)
    return SenseOperator(maps, mask), x, y, k


def test_sense_operator_adjoint_and_normal_hermitian_positive():
    op, x, y, k = _random_problem()
    dot = lambda a, b: complex((a.conj() * b).sum())  # noqa: E731
    assert dot(op.forward(x), k) == pytest.approx(dot(x, op.adjoint(k)), rel=1e-12, abs=1e-10)
    assert dot(op.normal(x), y) == pytest.approx(dot(x, op.normal(y)), rel=1e-12, abs=1e-10)
    quad = dot(x, op.normal(x))
    assert abs(quad.imag) < 1e-10 * abs(quad.real) and quad.real > 0


def test_conjugate_gradient_solves_normal_equations():
    op, _, _, k = _random_problem(seed=1)
    lam = 1e-2
    rhs = op.adjoint(k)
    x = conjugate_gradient(lambda v: op.normal(v) + lam * v, rhs, iterations=300, tol=1e-12)
    residual = op.normal(x) + lam * x - rhs
    assert float(residual.norm() / rhs.norm()) < 1e-8
    # cg_sense is the same solve with λ from the config
    x2 = cg_sense(k[0], op.maps[0], op.mask.flatten(), SenseConfig(iterations=300, lam=lam, tol=1e-12))
    assert torch.allclose(x2, x[0], atol=1e-8)


@pytest.fixture(scope="module")
def simulated_4x():
    """One 8-coil 64×64 slice (k-space 128×64), 4× equispaced mask with 13 ACS lines."""
    vol = simulate_volume(num_slices=1, num_coils=8, recon_size=(64, 64), seed=3)
    mask, num_low = MaskSampler(MaskSpec("equispaced", [0.2], [4]))(64, seed=1)
    kspace = vol.kspace[0] * mask
    zero_filled = center_crop(rss(ifft2c(torch.from_numpy(kspace)), dim=0).numpy(), (64, 64))
    return kspace, mask, num_low, vol.target[0], zero_filled


def test_cg_sense_beats_zero_filled(simulated_4x):
    kspace, mask, num_low, target, zero_filled = simulated_4x
    maps = espirit_maps(kspace, num_low)
    image = cg_sense(kspace, maps, mask)
    assert image.shape == (128, 64) and torch.is_complex(image)
    recon = center_crop(image.abs().numpy(), (64, 64))
    err_zf, err_sense = nmse(target, zero_filled), nmse(target, recon)
    assert err_sense < 0.5 * err_zf, (err_sense, err_zf)
    # batched input gives the same result slice by slice
    batched = cg_sense(torch.from_numpy(np.stack([kspace, kspace])), maps, mask)
    assert torch.allclose(batched[1], image, atol=1e-6 * float(image.abs().max()))


# ----------------------------------------------------------------------------- BART


def test_cfl_roundtrip_column_major(tmp_path):
    a = (np.arange(24).reshape(2, 3, 4) + 1j * np.arange(24).reshape(2, 3, 4)[::-1]).astype(np.complex64)
    write_cfl(tmp_path / "a", a)
    assert (tmp_path / "a.hdr").read_text().startswith("# Dimensions\n2 3 4")
    raw = np.fromfile(tmp_path / "a.cfl", np.complex64)
    assert raw[1] == a[1, 0, 0]  # first axis fastest (Fortran order)
    np.testing.assert_array_equal(read_cfl(tmp_path / "a"), a)
    assert to_bart_slice(np.zeros((5, 7, 3))).shape == (7, 3, 1, 5)


def test_bart_missing_binary_is_a_clear_error():
    with pytest.raises(BartError, match="not found on PATH.*apt-get install bart"):
        pics_l1(np.zeros((2, 8, 8), np.complex64), BartConfig(binary="bart-not-installed-here"))


@needs_bart
def test_bart_reads_our_cfl(tmp_path):
    a = (np.random.default_rng(0).normal(size=(5, 3, 1, 2)) + 0j).astype(np.complex64)
    write_cfl(tmp_path / "a", a)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([shutil.which("bart"), "scale", "2", "a", "b"], cwd=tmp_path, check=True, env=env,
                   capture_output=True)
    np.testing.assert_allclose(read_cfl(tmp_path / "b"), 2 * a, rtol=1e-6)


@needs_bart
def test_bart_pics_beats_zero_filled(simulated_4x):
    kspace, _, _, target, zero_filled = simulated_4x
    image = pics_l1(kspace, BartConfig(iterations=30))
    assert image.shape == (128, 64) and image.dtype == np.complex64
    recon = center_crop(np.abs(image), (64, 64))
    err_zf, err_bart = nmse(target, zero_filled), nmse(target, recon)
    assert err_bart < 0.5 * err_zf, (err_bart, err_zf)


@needs_bart
def test_bart_with_fewer_acs_lines_than_its_default_kernel_still_reconstructs():
    """5 ACS lines (8× with 4 % centre on 128 columns): the ecalib kernel is shrunk instead of BART aborting,
    far enough that its maps hold inside the head (at 4, one line narrower than the block, they did not)."""
    vol = simulate_volume(num_slices=1, num_coils=12, recon_size=(128, 128), seed=9)
    kspace, target = vol.kspace[0], vol.target[0]
    mask, num_low = make_mask("equispaced_fraction", kspace.shape[-1], 8, 0.04, seed=3)
    assert num_low == 5
    under = kspace * mask
    image = pics_l1(under, BartConfig(iterations=30), num_low=num_low)
    assert image.shape == kspace.shape[1:] and np.isfinite(image).all()
    zero_filled = center_crop(rss(ifft2c(torch.from_numpy(under)), dim=0).numpy(), target.shape)
    err_zf, err_bart = nmse(target, zero_filled), nmse(target, center_crop(np.abs(image), target.shape))
    assert err_bart < 0.5 * err_zf, (err_bart, err_zf)
    with pytest.raises(BartError, match="at least 2"):
        pics_l1(under, BartConfig(iterations=5), num_low=1)


def test_espirit_single_precision_calibration_and_capped_grid_match_the_defaults():
    """The refinement's ESPIRiT settings: the calibration's Gram matrix and eigenvectors in complex64
    (``single``) and at most ``max_grid`` coarse points per axis give the maps of the complex128, uncapped
    computation inside the object (alignment above 0.999, magnitudes to 0.01)."""
    from gadget.baselines.espirit import EspiritConfig, coarse_size

    assert coarse_size(640, 4, 11) == 160 and coarse_size(640, 4, 11, max_grid=48) == 48
    assert coarse_size(30, 4, 11, max_grid=48) == 11 and coarse_size(8, 4, 11) == 8
    coils, rows, cols = 8, 96, 64
    true_maps = _known_maps(coils, rows, cols)
    obj, inside = _object(rows, cols)
    kspace = fft2c(torch.from_numpy(true_maps * obj)).numpy()
    base = espirit_maps(kspace, num_low=20, config=EspiritConfig(step=4))
    fast = espirit_maps(kspace, num_low=20, config=EspiritConfig(step=4, single=True, max_grid=16))
    inside_t = torch.as_tensor(inside)
    assert float((fast.abs() - base.abs())[:, inside_t].abs().max()) < 0.01
    assert float((fast.conj() * base).sum(0).abs()[inside_t].min()) > 0.999


def _hermitian_with_spectrum(rng, values: np.ndarray) -> np.ndarray:
    """Hermitian ``(c, c)`` with eigenvalues ``values`` in random unitary coordinates."""
    c = values.size
    q, _ = np.linalg.qr(rng.standard_normal((c, c)) + 1j * rng.standard_normal((c, c)))
    return (q * values) @ q.conj().T


def _spectra_cases(rng, c: int = 8) -> np.ndarray:
    spectra = [np.r_[1.0, rng.uniform(0, 0.6, c - 1)], np.r_[0.97, 0.2, rng.uniform(0, 0.1, c - 2)],
               np.r_[0.3, rng.uniform(0, 0.2, c - 1)], np.r_[1.0, 0.996, rng.uniform(0, 0.5, c - 2)],
               np.r_[1.0, 0.9995, rng.uniform(0, 0.5, c - 2)], np.zeros(c)]
    return np.stack([_hermitian_with_spectrum(rng, s) for s in spectra]).astype(np.complex64)


def test_top_eigenvectors_match_a_full_eigendecomposition():
    """Repeated squaring against eigh (ESPIRiT's eigenvalue range [0, 1]): separated top eigenvalues give
    eigh's value and vector (up to a phase); where the top eigenvalues crowd together (as where noise fills
    the calibration subspace) the squared matrix is no projector onto one vector and eigh itself answers,
    bit for bit; an all-zero matrix gives 0, not NaN."""
    from gadget.baselines.espirit import top_eigenvectors

    mats = _spectra_cases(np.random.default_rng(3))
    values, vectors = top_eigenvectors(torch.from_numpy(mats))
    expected_values, expected_vectors = np.linalg.eigh(mats.astype(np.complex128))
    np.testing.assert_allclose(values[:3].numpy(), expected_values[:3, -1], atol=2e-6)
    for i in range(3):
        assert abs(np.vdot(expected_vectors[i, :, -1], vectors[i].numpy())) == pytest.approx(1.0, abs=1e-5)
    crowded_values, crowded_vectors = torch.linalg.eigh(torch.from_numpy(mats[3:5]))
    assert torch.equal(values[3:5], crowded_values[:, -1]) and torch.equal(vectors[3:5], crowded_vectors[:, :, -1])
    assert values[5] == 0 and torch.all(torch.isfinite(vectors))


def test_top_eigenvectors_fall_back_to_eigh_where_the_residual_is_too_large(monkeypatch):
    """With the residual bound below 0 every matrix is decided by eigh: its values and vectors exactly."""
    from gadget.baselines import espirit

    monkeypatch.setattr(espirit, "EIGEN_RESIDUAL", -1.0)
    monkeypatch.setattr(espirit, "EIGEN_MIXTURE", 1.0)  # never mixed: only the residual sends pixels to eigh
    mats = _spectra_cases(np.random.default_rng(5))
    values, vectors = espirit.top_eigenvectors(torch.from_numpy(mats))
    expected_values, expected_vectors = torch.linalg.eigh(torch.from_numpy(mats))
    assert torch.equal(values, expected_values[:, -1]) and torch.equal(vectors, expected_vectors[:, :, -1])


def test_interpolated_maps_equal_the_complex_products():
    from gadget.baselines.espirit import interpolate_maps, interpolation_matrix

    rng = np.random.default_rng(4)
    maps = torch.from_numpy((rng.standard_normal((3, 6, 5)) + 1j * rng.standard_normal((3, 6, 5))).astype(np.complex64))
    rows, cols = interpolation_matrix(20, 6), interpolation_matrix(14, 5)
    expected = rows.to(torch.complex128) @ maps.to(torch.complex128) @ cols.T.to(torch.complex128)
    got = interpolate_maps(maps, rows.float(), cols.float())
    assert got.dtype == torch.complex64 and got.shape == (3, 20, 14)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)


def test_hermitian_eigh_retries_in_double_precision_where_single_precision_lapack_fails(monkeypatch):
    """MKL's single-precision eigen-decomposition on one thread failed on a rank-11 108-square calibration Gram
    matrix (tests/test_3d_reference.py); the retry in double precision answers, in the input's precision."""
    from gadget.baselines import espirit

    rng = np.random.default_rng(13)
    a = rng.standard_normal((11, 20)) + 1j * rng.standard_normal((11, 20))
    gram = torch.from_numpy((a.conj().T @ a).astype(np.complex64))
    real_eigh = torch.linalg.eigh
    tried = []

    def failing_single(m):
        tried.append(m.dtype)
        if m.dtype == torch.complex64:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real_eigh(m)

    monkeypatch.setattr(torch.linalg, "eigh", failing_single)
    values, vectors = espirit.hermitian_eigh(gram)
    assert tried == [torch.complex64, torch.complex128]
    assert values.dtype == torch.float32 and vectors.dtype == torch.complex64
    want = np.linalg.eigvalsh(a.conj().T @ a)
    np.testing.assert_allclose(values.numpy(), want, atol=1e-4 * want.max())
    np.testing.assert_allclose((vectors @ torch.diag(values.to(torch.complex64)) @ vectors.mH).numpy(),
                               gram.numpy(), atol=1e-4 * want.max())


def test_averaged_projector_kernel_sums_each_tap_over_its_offset_pairs():
    """g[c, c', δ] = (1/k²) Σ_n Σ_{d - d' = δ} v_n[c, d] conj(v_n[c', d']), written out as loops."""
    from gadget.baselines.espirit import averaged_projector_kernel

    rng = np.random.default_rng(12)
    n, coils, k = 3, 2, 3
    v = rng.standard_normal((n, coils, k, k)) + 1j * rng.standard_normal((n, coils, k, k))
    want = np.zeros((coils, coils, 2 * k - 1, 2 * k - 1), complex)
    for d0 in range(k):
        for d1 in range(k):
            for e0 in range(k):
                for e1 in range(k):
                    want[:, :, d0 - e0 + k - 1, d1 - e1 + k - 1] += np.einsum(
                        "nc,nd->cd", v[:, :, d0, d1], v[:, :, e0, e1].conj())
    np.testing.assert_allclose(averaged_projector_kernel(v), want / k ** 2, rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape,kernel", [((3, 14, 9), 4), ((2, 8, 13), 3), ((2, 7, 7), 6)],
                         ids=["phase-shorter", "readout-shorter", "square"])
def test_calibration_gram_is_the_calibration_matrix_product(shape, kernel):
    """The Gram matrix from per-line products and windowed sums equals AᴴA of the patch matrix (numpy, double)."""
    from gadget.baselines.espirit import calibration_gram

    rng = np.random.default_rng(11)
    calib = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    coils, r, p = shape
    a = np.array([calib[:, i:i + kernel, j:j + kernel].reshape(-1)  # one row per patch, (coil, kr, kp)
                  for i in range(r - kernel + 1) for j in range(p - kernel + 1)])
    want = a.conj().T @ a
    got = calibration_gram(torch.from_numpy(calib), kernel)
    assert got.shape == want.shape and got.dtype == torch.complex128
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12 * np.abs(want).max())
    single = calibration_gram(torch.from_numpy(calib.astype(np.complex64)), kernel)
    np.testing.assert_allclose(single.numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("spectrum", ["steep", "flat"])
def test_leading_eigenvectors_match_numpy_above_the_ratio(spectrum):
    """The randomized subspace iteration against numpy's full eigh on a Hermitian PSD matrix of 300: a
    steep spectrum (34 above the ratio; the first subspace suffices) and a flat one (150 above it: the
    subspace doubles, then the full decomposition takes over). Eigenvalues above the ratio and the
    projector onto their eigenvectors agree."""
    from gadget.baselines.espirit import leading_eigenvectors

    rng = np.random.default_rng(6)
    n, ratio = 300, 4e-4
    values = 10.0 ** -np.linspace(0, 30, n) if spectrum == "steep" else np.r_[np.linspace(1, 0.5, 150), np.full(150, 1e-6)]
    gram = _hermitian_with_spectrum(rng, values)
    got_values, got_vectors = leading_eigenvectors(torch.from_numpy(gram), ratio)
    expected_values, expected_vectors = np.linalg.eigh(gram)
    expected_values, expected_vectors = expected_values[::-1], expected_vectors[:, ::-1]
    kept = int(np.sum(expected_values > ratio * expected_values[0]))
    assert kept == (34 if spectrum == "steep" else 150)
    assert int(torch.sum(got_values > ratio * got_values[0])) == kept
    np.testing.assert_allclose(got_values[:kept].numpy(), expected_values[:kept], rtol=1e-8, atol=1e-12)
    v = got_vectors[:, :kept].numpy()
    w = expected_vectors[:, :kept]
    assert np.linalg.norm(v @ v.conj().T - w @ w.conj().T, 2) < 1e-6


def test_calibrated_maps_are_the_whole_grid_interpolation_cropped():
    """On a coarse grid the maps are interpolated only on the readout rows where some eigenvalue passes the
    crop: the same maps as interpolating every row, renormalising and zeroing below the crop (the object
    here fills the middle rows only, so whole rows are left out)."""
    from gadget.baselines.espirit import (EspiritConfig, calibrated_maps, espirit_calibration, interpolate_maps,
                                          interpolation_matrix)

    coils, rows, cols = 8, 96, 64
    obj, _ = _object(rows, cols)
    obj[:24] = obj[-24:] = 0  # a readout band without object, as across a 2× readout oversampling
    kspace = fft2c(torch.from_numpy(_known_maps(coils, rows, cols) * obj)).numpy()
    config = EspiritConfig(step=4, crop=0.9)
    calibration = espirit_calibration(kspace, num_low=20, config=config)
    maps, values = calibrated_maps(calibration, config)
    grid = calibration.values.shape
    up = interpolation_matrix(rows, grid[0]), interpolation_matrix(cols, grid[1])
    want_values = (up[0] @ calibration.values.double() @ up[1].T).float()
    whole = interpolate_maps(calibration.maps, up[0].float(), up[1].float())
    want = whole * torch.where(want_values >= 0.9, 1 / rss(whole, dim=0).clamp_min(1e-12), 0.0)
    empty_rows = ~(want_values >= 0.9).any(1)
    assert 0 < int(empty_rows.sum()) < rows  # some rows are skipped, some are not
    torch.testing.assert_close(values, want_values, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps, want, rtol=0, atol=1e-6)
    assert not maps[:, empty_rows].any()


def _squared_by_torch(g: torch.Tensor, squarings: int) -> torch.Tensor:
    p = g.clone()
    for s in range(squarings + 1):
        trace = torch.diagonal(p, dim1=-2, dim2=-1).real.sum(-1)
        p = p / trace.clamp_min(torch.finfo(torch.float32).tiny)[:, None, None]
        if s < squarings:
            p = p @ p
    return p


needs_squaring_kernel = pytest.mark.skipif(SQUARING_KERNEL.get() is None,
                                           reason="no C compiler: the squaring kernel cannot be built")


@needs_squaring_kernel
@pytest.mark.parametrize("n,c", [(13, 12), (8, 1), (5, 4), (17, 32)])
def test_the_c_squarings_are_the_normalised_matrix_powers(n, c):
    """The C kernel's squarings of Hermitian positive semi-definite matrices (a count that leaves a short last
    block of 8) equal the PyTorch passes' (trace-normalised products, complex128 here) to float32 rounding."""
    from gadget.baselines.espirit import SQUARINGS, _squared_in_c_

    rng = np.random.default_rng(c)
    a = rng.standard_normal((n, c, c)) + 1j * rng.standard_normal((n, c, c))
    g = torch.from_numpy(a @ a.conj().transpose(0, 2, 1) / c)
    want = _squared_by_torch(g, SQUARINGS)
    p = g.to(torch.complex64)
    before = p.clone()
    assert _squared_in_c_(p)
    assert not torch.equal(p, before)
    torch.testing.assert_close(p.to(torch.complex128), want, rtol=0, atol=2e-5)


def test_the_squarings_fall_back_to_pytorch_beyond_the_kernel_or_when_switched_off(monkeypatch):
    """More coils than the kernel takes (33), or ``VARNET_NATIVE_SQUARINGS=0``: the matrices are left to the
    PyTorch passes, and top_eigenvectors still finds the top eigenpair."""
    from gadget.baselines import espirit

    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 33, 33)) + 1j * rng.standard_normal((6, 33, 33))
    p = torch.from_numpy(a @ a.conj().transpose(0, 2, 1)).to(torch.complex64)
    untouched = p.clone()
    assert not espirit._squared_in_c_(p) and torch.equal(p, untouched)
    monkeypatch.setattr(espirit, "SQUARING_KERNEL", espirit.SQUARING_KERNEL.fresh())
    monkeypatch.setenv("VARNET_NATIVE_SQUARINGS", "0")
    small = p[:, :4, :4].contiguous()
    assert not espirit._squared_in_c_(small)
    values, vectors = espirit.top_eigenvectors(small / torch.linalg.eigvalsh(small)[:, -1:, None])
    wide = small.to(torch.complex128)
    want = torch.linalg.eigh(wide / torch.linalg.eigvalsh(wide)[:, -1:, None])
    torch.testing.assert_close(values.double(), want[0][:, -1], rtol=0, atol=1e-4)
    alignment = (vectors.to(torch.complex128).conj() * want[1][:, :, -1]).sum(1).abs()
    assert float(alignment.min()) > 0.999


@pytest.mark.parametrize("shape", [(12, 11), (16, 13)])
def test_image_operator_is_the_centred_sum_over_the_taps(shape):
    """``G(x) = Σ_δ g[δ] exp(+2πi δ·x / N)`` at every pixel (centred coordinates, odd and even sizes), summed
    here tap by tap in double precision."""
    from gadget.baselines.espirit import image_operator

    rng = np.random.default_rng(5)
    coils, taps = 3, 5
    g = rng.standard_normal((coils, coils, taps, taps)) + 1j * rng.standard_normal((coils, coils, taps, taps))
    rows, cols = shape
    xr = (np.arange(rows) - rows // 2)[:, None, None, None]
    xc = (np.arange(cols) - cols // 2)[None, :, None, None]
    want = np.zeros((rows, cols, coils, coils), complex)
    for t in range(taps):
        for u in range(taps):
            phase = np.exp(2j * np.pi * ((t - taps // 2) * xr / rows + (u - taps // 2) * xc / cols))
            want += g[:, :, t, u][None, None] * phase
    got = image_operator(g, shape).numpy().reshape(rows, cols, coils, coils)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
