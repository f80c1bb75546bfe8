"""Noise prewhitening across dwell times and PCA coil compression."""
import dataclasses

import numpy as np
import pytest

from gadget.converters.simulate import simulate_volume
from gadget.data.mrd_file import HEADER_DTYPE, flag_mask
from gadget.mri.masks import make_mask
from gadget.recon.coil_compression import (CompressionError, calibration_columns, compress, compress_slice,
                                           compression_matrix, retained_energy)
from gadget.recon.config import ReconConfig
from gadget.recon.pipeline import ReconError, ScanReconstructor
from gadget.stream.assemble import SliceData
from gadget.stream.images import image_magnitude
from gadget.stream.noise import (NoiseError, dwell_scale, noise_covariance, prewhiten, receiver_noise_bandwidth,
                                 whitening_matrix)
from gadget.stream.types import AcqLine, make_head
from tests.mrd_builders import header, with_noise_bandwidth

# ----------------------------------------------------------------------------- noise

MIX = np.array([[1.0, 0.5j, 0, 0.1], [0, 1.2, 0.3, 0], [0.1, 0, 0.8, 0.2j], [0, 0.3, 0, 0.9]])
SAMPLES = 256            # per line
LINES = 160              # 40960 samples per covariance estimate
# Sample covariances of N complex samples have relative entry errors ~ 1/sqrt(N) (0.5 % here); the whitened
# covariance carries the noise scan's and the imaging lines' estimates: 6/sqrt(N) is > 4 standard deviations.
TOL = 6 / np.sqrt(SAMPLES * LINES)


def _noise_lines(rng, variance, dwell_us, flags=0, count=LINES):
    """Lines of complex Gaussian noise with covariance ``variance · MIX MIXᴴ`` at ``dwell_us``."""
    out = []
    for i in range(count):
        white = (rng.standard_normal((4, SAMPLES)) + 1j * rng.standard_normal((4, SAMPLES))) / np.sqrt(2)
        head = make_head(flags=flags, sample_time_us=dwell_us, center_sample=SAMPLES // 2,
                         idx={"kspace_encode_step_1": i % 16})
        out.append(AcqLine(head, (np.sqrt(variance) * MIX @ white).astype(np.complex64)))
    return out


def _whitened_imaging_cov(noise_dwell, acq_dwell, seed=0, **kw):
    """Receiver noise variance ∝ 1/dwell (1 at 1 µs): noise scan at ``noise_dwell``, imaging noise at
    ``acq_dwell``; returns (whitened imaging noise covariance, imaging noise mean coil variance)."""
    rng = np.random.default_rng(seed)
    noise = _noise_lines(rng, 1 / noise_dwell, noise_dwell, flags=flag_mask(19))
    imaging = _noise_lines(rng, 1 / acq_dwell, acq_dwell)
    out = [ln for ln in prewhiten(iter(noise + imaging), **kw)]
    assert len(out) == LINES
    cov = noise_covariance(np.concatenate([ln.data for ln in out], axis=1))
    true_level = np.mean(np.diag(MIX @ MIX.conj().T).real) / acq_dwell
    return cov, true_level


@pytest.mark.parametrize("noise_dwell", [5.0, 2.5, 10.0])
def test_whitened_imaging_noise_is_the_imaging_level_at_any_noise_dwell(noise_dwell):
    """Scan units: whitened imaging noise = (imaging data's mean coil noise variance) · I, the same for a noise
    scan at the imaging dwell time (5 µs) and at half or double it."""
    cov, level = _whitened_imaging_cov(noise_dwell, 5.0)
    np.testing.assert_allclose(cov, level * np.eye(4), atol=TOL * level)


@pytest.mark.parametrize("noise_dwell,ratio", [(5.0, 0.793), (2.5, 0.793), (2.5, 0.6)])
def test_gadgetron_units_give_two_b_whatever_the_noise_dwell(noise_dwell, ratio):
    """Gadgetron's scaling sqrt(2 d_a/d_n b) · L⁻¹: with variance ∝ 1/dwell, whitened imaging noise is 2·b·I."""
    cov, _ = _whitened_imaging_cov(noise_dwell, 5.0, units="gadgetron", bandwidth_ratio=ratio)
    np.testing.assert_allclose(cov, 2 * ratio * np.eye(4), atol=TOL * 2 * ratio)


def test_equal_dwell_is_todays_whitening():
    rng = np.random.default_rng(3)
    noise = _noise_lines(rng, 0.2, 5.0, flags=flag_mask(19), count=20)
    imaging = _noise_lines(rng, 0.2, 5.0, count=3)
    w = whitening_matrix(noise_covariance(np.concatenate([n.data for n in noise], axis=1)))
    out = list(prewhiten(iter(noise + imaging), True, 0.5))
    for got, line in zip(out, imaging):
        np.testing.assert_array_equal(got.data, w @ line.data)


def test_dwell_scale_values():
    assert dwell_scale(5.0, 2.5, 0.793) == pytest.approx(np.sqrt(2 * 2 * 0.793), rel=1e-12)
    assert dwell_scale(0.0, 2.5, 0.793) == 1.0 and dwell_scale(5.0, 0.0, 0.793) == 1.0  # unknown dwell
    with pytest.raises(NoiseError, match="ratio"):
        dwell_scale(5.0, 2.5, 1.5)
    with pytest.raises(NoiseError, match="units"):
        list(prewhiten(iter([]), units="snr"))


def test_header_bandwidth_overrides_config():
    xml = header(coils=4)
    assert receiver_noise_bandwidth(xml, 0.7) == (0.7, "config noise_bandwidth_ratio")
    assert receiver_noise_bandwidth(with_noise_bandwidth(xml, 0.85), 0.7) == (0.85, "header")
    with pytest.raises(NoiseError, match="relativeReceiverNoiseBandwidth"):
        receiver_noise_bandwidth(with_noise_bandwidth(xml, "abc"), 0.7)
    config = ReconConfig(mode="zero-filled", noise_bandwidth_ratio=0.7)
    assert ScanReconstructor(xml, config).noise_bandwidth == 0.7
    assert ScanReconstructor(with_noise_bandwidth(xml, 0.85), config).noise_bandwidth == 0.85


@pytest.mark.parametrize("units,level", [("scan", None), ("gadgetron", 2 * 0.6)])
def test_pipeline_whitens_in_the_configured_units(units, level):
    """``noise_units`` reaches the pipeline's prewhitening: the imaging lines it hands to assembly carry
    noise at the imaging data's own level (scan) or at 2·b (gadgetron), noise scan at another dwell."""
    rng = np.random.default_rng(7)
    noise = _noise_lines(rng, 1 / 2.5, 2.5, flags=flag_mask(19))
    imaging = _noise_lines(rng, 1 / 5.0, 5.0)
    scan = ScanReconstructor(header(coils=4), ReconConfig(mode="zero-filled", noise_units=units,
                                                          noise_bandwidth_ratio=0.6))
    seen = []
    scan.assembler.add = lambda line: seen.append(line) or []
    list(scan.assembled(noise + imaging))
    cov = noise_covariance(np.concatenate([ln.data for ln in seen], axis=1))
    level = level or np.mean(np.diag(MIX @ MIX.conj().T).real) / 5.0
    np.testing.assert_allclose(cov, level * np.eye(4), atol=TOL * level)


# ----------------------------------------------------------------------------- coil compression

def _slice(kspace, mask, num_calibration=None):
    kspace = np.asarray(kspace * mask, np.complex64)
    return SliceData(key=(0, 0, 0, 0, 0), kspace=kspace, mask=mask.copy(), num_calibration=num_calibration,
                     reference=np.zeros((), HEADER_DTYPE), lines=int(mask.sum()))


def np_rss(kspace):
    """Independent reference: numpy centred orthonormal 2-D inverse FFT of (coil, readout, phase), then RSS."""
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    return np.sqrt((np.abs(img) ** 2).sum(0))


def _rank_n_kspace(n_true=6, coils=32, shape=(48, 40), seed=0):
    """k-space of ``n_true`` independent coils mixed into ``coils`` channels: exactly rank ``n_true``."""
    rng = np.random.default_rng(seed)
    true = rng.standard_normal((n_true,) + shape) + 1j * rng.standard_normal((n_true,) + shape)
    mix = rng.standard_normal((coils, n_true)) + 1j * rng.standard_normal((coils, n_true))
    return np.einsum("cn,nrp->crp", mix, true)


def test_rank_n_data_is_kept_exactly():
    kspace = _rank_n_kspace()
    mask = np.zeros(40, bool)
    mask[::3] = True
    mask[16:25] = True
    sl = _slice(kspace, mask)
    out, matrix, energy = compress(sl, 6)
    assert out.kspace.shape == (6, 48, 40) and matrix.shape == (6, 32) and matrix.dtype == np.complex64
    np.testing.assert_allclose(matrix @ matrix.conj().T, np.eye(6), atol=1e-5)  # orthonormal rows
    assert energy == pytest.approx(1.0, abs=1e-6)
    want = np_rss(sl.kspace.astype(np.complex128))
    np.testing.assert_allclose(np_rss(out.kspace.astype(np.complex128)), want, rtol=1e-4, atol=1e-5 * want.max())
    assert out.mask is sl.mask and out.kspace.base is None  # a new array, never recycled by the assembler
    np.testing.assert_array_equal(calibration_columns(mask), np.arange(15, 25))  # 15 is on the ::3 grid


def test_matrix_spans_the_strongest_eigenvectors():
    """Independent reference: the top eigenvectors of X Xᴴ (numpy eigh) span the rows of the matrix."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 10, 6)) + 1j * rng.standard_normal((8, 10, 6))) * np.arange(1, 9)[:, None, None]
    a = compression_matrix(x, 3).astype(np.complex128)
    flat = x.reshape(8, -1)
    vals, vecs = np.linalg.eigh(flat @ flat.conj().T)
    top = vecs[:, ::-1][:, :3]
    np.testing.assert_allclose(a.conj().T @ a, top @ top.conj().T, atol=1e-5)
    assert retained_energy(x, a) == pytest.approx(vals[::-1][:3].sum() / vals.sum(), rel=1e-5)


def test_no_op_when_coils_do_not_exceed_n():
    sl = _slice(_rank_n_kspace(coils=8), np.ones(40, bool))
    for n in (8, 12):
        out, matrix, energy = compress(sl, n)
        assert out is sl and energy == 1.0
        np.testing.assert_array_equal(matrix, np.eye(8))


def test_errors_name_the_problem():
    mask = np.zeros(40, bool)
    mask[::4] = True
    mask[20] = False
    with pytest.raises(CompressionError, match="centre line"):
        compress(_slice(_rank_n_kspace(), mask), 4)
    with pytest.raises(CompressionError, match="virtual coils"):
        compression_matrix(np.ones((4, 2, 2), complex), 5)


def test_separate_reference_gives_the_matrix_and_is_compressed_with_it():
    """SliceData.calibration_kspace (separate reference lines, zeros elsewhere): the matrix comes from its
    measured columns, and it is compressed with the same matrix as the imaging k-space."""
    kspace = _rank_n_kspace().astype(np.complex64)
    mask = np.zeros(40, bool)
    mask[::4] = True
    mask[20] = False  # imaging lines alone have no centre run
    ref = np.zeros_like(kspace)
    ref[:, :, 14:26] = kspace[:, :, 14:26]
    sl = dataclasses.replace(_slice(kspace, mask), calibration_kspace=ref)
    out, matrix, energy = compress(sl, 6)
    np.testing.assert_array_equal(matrix, compression_matrix(kspace[:, :, 14:26], 6))
    assert energy == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(out.calibration_kspace, np.einsum("nc,crp->nrp", matrix, ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np_rss(out.calibration_kspace.astype(complex)), np_rss(ref.astype(complex)),
                               rtol=1e-4, atol=1e-6 * np_rss(ref.astype(complex)).max())
    with pytest.raises(CompressionError, match="calibration_kspace"):
        compress_slice(dataclasses.replace(sl, calibration_kspace=ref[:5]), matrix)
    with pytest.raises(CompressionError, match="no lines"):
        compress(dataclasses.replace(sl, calibration_kspace=np.zeros_like(ref)), 6)


@pytest.fixture(scope="module")
def head32():
    vol = simulate_volume(num_slices=1, num_coils=32, recon_size=(64, 64), seed=11)
    return np.asarray(vol.kspace[0], np.complex64)


def _zero_filled(kspace, mask, n):
    xml = header(readout=128, width=64, coils=32)
    scan = ScanReconstructor(xml, ReconConfig(mode="zero-filled", prewhiten=False, coil_compression=n))
    (img,) = list(scan.reconstruct(iter([_slice(kspace, mask)])))
    return image_magnitude(img).astype(np.float64)


def test_pipeline_32_to_12_coils_close_to_uncompressed(head32, caplog):
    """Simulated 32-coil head with noise; 12 virtual coils keep 97 % of its calibration energy. Measured (seeds
    11-13): the zero-filled RSS of 12 virtual coils departs from the 32-coil one by 0.5-0.7 % (relative L2)
    inside the object (pixels > 10 % of the maximum) and by 3.2-4.3 % over the whole image, where most of the
    difference is the background's RSS noise floor, lower with 12 channels than with 32 (the noise energy the
    dropped modes held). Bounds: 1.5 % and 6 %."""
    mask, _ = make_mask("equispaced-fraction", 64, 4, 0.125, seed=3)
    caplog.set_level("INFO", logger="gadget.recon.pipeline")
    full = _zero_filled(head32, mask, 0)
    small = _zero_filled(head32, mask, 12)
    obj = full > 0.1 * full.max()
    assert np.linalg.norm((small - full)[obj]) / np.linalg.norm(full[obj]) < 0.015
    assert np.linalg.norm(small - full) / np.linalg.norm(full) < 0.06
    assert np.mean(small[~obj]) < np.mean(full[~obj])  # the background noise floor drops
    assert any("coil compression 32 -> 12 coils" in r.getMessage() for r in caplog.records)


def test_pipeline_no_centre_is_a_recon_error(head32):
    mask = np.zeros(64, bool)
    mask[1::4] = True
    with pytest.raises(ReconError, match="coil compression"):
        _zero_filled(head32, mask, 12)


def test_bench_compression_flags_are_checked(capsys):
    from gadget.cli import main

    assert main(["bench", "pipeline", "--coil-compression", "32"]) == 2  # not below the 32 scan coils
    assert "--coil-compression" in capsys.readouterr().err
    assert main(["bench", "pipeline", "--skip-overhead"]) == 2
    assert "--skip-overhead" in capsys.readouterr().err
