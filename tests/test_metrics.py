"""gadget.mri.metrics against fastmri.evaluate (used only as a test oracle; it calls scikit-image)."""
import math

import numpy as np
import pytest
import torch

from fastmri import evaluate as fm_evaluate
from fastmri.data import transforms as fm_transforms

from gadget.mri.metrics import (
    VolumeMetrics,
    center_crop,
    evaluate_volumes,
    nmse,
    psnr,
    ssim,
    volume_metrics,
)

# Agreement with fastMRI: 1e-6 absolute on every metric. We compute in float64; for
# float64 inputs the observed gap is ~1e-15, for float32 inputs (where fastMRI/skimage
# stay in float32) it is ~1e-8, so 1e-6 leaves a wide margin in both cases.
ATOL = 1e-6

SHAPES = [(1, 7, 7), (3, 64, 48), (2, 96, 97), (4, 20, 9)]


def make_pair(shape, seed, dtype=np.float64, scale=1.0, noise=0.1):
    """A non-negative 'magnitude' target and a noisy reconstruction of it."""
    rng = np.random.default_rng(seed)
    target = scale * np.abs(rng.normal(size=shape) + 1.0)
    recon = target + scale * noise * rng.normal(size=shape)
    return target.astype(dtype), recon.astype(dtype)


def fm_value(x):
    return float(np.asarray(x).reshape(-1)[0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_fastmri_default_maxval(shape, dtype):
    for seed, scale in [(0, 1.0), (1, 3e-4), (2, 250.0)]:  # fastMRI volumes are ~1e-4; DICOM-like ~1e2
        target, recon = make_pair(shape, seed, dtype, scale)
        assert nmse(target, recon) == pytest.approx(fm_value(fm_evaluate.nmse(target, recon)), abs=ATOL)
        assert psnr(target, recon) == pytest.approx(fm_value(fm_evaluate.psnr(target, recon)), abs=ATOL)
        assert ssim(target, recon) == pytest.approx(fm_value(fm_evaluate.ssim(target, recon)), abs=ATOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_fastmri_explicit_maxval(shape):
    target, recon = make_pair(shape, seed=3, noise=0.3)
    for maxval in (1.0, 2.5 * float(target.max()), 0.37):
        assert psnr(target, recon, maxval) == pytest.approx(
            fm_value(fm_evaluate.psnr(target, recon, maxval)), abs=ATOL
        )
        assert ssim(target, recon, maxval) == pytest.approx(
            fm_value(fm_evaluate.ssim(target, recon, maxval)), abs=ATOL
        )


def test_matches_fastmri_on_structured_images():
    """Smooth images with a local structure, and a poor reconstruction (low SSIM)."""
    yy, xx = np.mgrid[0:80, 0:72] / 10.0
    target = np.stack([np.sin(xx + k) * np.cos(yy) + 1.5 for k in range(3)])
    blurred = (target + np.roll(target, 3, axis=-1) + np.roll(target, -2, axis=-2)) / 3.0
    recon = np.clip(blurred + 0.5 * np.random.default_rng(4).normal(size=target.shape), 0, None)
    for pred in (blurred, recon):
        assert nmse(target, pred) == pytest.approx(fm_value(fm_evaluate.nmse(target, pred)), abs=ATOL)
        assert psnr(target, pred) == pytest.approx(fm_value(fm_evaluate.psnr(target, pred)), abs=ATOL)
        assert ssim(target, pred) == pytest.approx(fm_value(fm_evaluate.ssim(target, pred)), abs=ATOL)
    assert ssim(target, recon) < 0.5


def test_return_types_are_python_floats():
    target, recon = make_pair((2, 16, 16), seed=5, dtype=np.float32)
    for value in volume_metrics(target, recon).values():
        assert type(value) is float


# ----------------------------------------------------------------------------- analytic checks


def test_identical_volumes():
    target, _ = make_pair((3, 32, 30), seed=6)
    assert nmse(target, target) == 0.0
    assert psnr(target, target) == math.inf
    assert ssim(target, target) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_constant_offset():
    target, _ = make_pair((2, 16, 24), seed=7)
    offset = 0.05
    maxval = float(target.max())
    expected = 20 * math.log10(maxval / offset)  # MSE = offset**2
    assert psnr(target, target + offset) == pytest.approx(expected, abs=1e-9)
    assert psnr(target, target - offset, maxval=2.0) == pytest.approx(20 * math.log10(2.0 / offset), abs=1e-9)


def test_nmse_of_scaled_volume():
    target, _ = make_pair((2, 10, 10), seed=8)
    assert nmse(target, 0.9 * target) == pytest.approx(0.01, abs=1e-12)
    assert nmse(target, np.zeros_like(target)) == pytest.approx(1.0, abs=1e-12)


def test_ssim_averages_slices():
    a, b = make_pair((1, 20, 20), seed=9)
    c, d = make_pair((1, 20, 20), seed=10, noise=0.5)
    both = ssim(np.concatenate([a, c]), np.concatenate([b, d]), maxval=1.0)
    assert both == pytest.approx((ssim(a, b, maxval=1.0) + ssim(c, d, maxval=1.0)) / 2, abs=1e-12)


# ----------------------------------------------------------------------------- errors


def test_shape_mismatch_names_both_shapes():
    target, recon = make_pair((2, 16, 16), seed=11)
    for func in (nmse, psnr, ssim):
        with pytest.raises(ValueError, match=r"\(2, 16, 16\).*\(2, 16, 15\)"):
            func(target, recon[..., :15])


def test_bad_metric_inputs():
    target, recon = make_pair((2, 16, 16), seed=12)
    with pytest.raises(ValueError, match=r"ssim expects volumes \(slices, H, W\)"):
        ssim(target[0], recon[0])
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(target[:, :6], recon[:, :6])
    with pytest.raises(ValueError, match="all zeros"):
        nmse(np.zeros_like(target), recon)
    with pytest.raises(ValueError, match="maxval must be a finite positive"):
        psnr(target, recon, maxval=0.0)
    with pytest.raises(ValueError, match=r"target.max\(\) must be a finite positive"):
        ssim(-target, recon)
    with pytest.raises(ValueError, match="complex"):
        nmse(target.astype(complex), recon)


# ----------------------------------------------------------------------------- center_crop


@pytest.mark.parametrize("in_shape, crop", [((3, 10, 9), (4, 4)), ((2, 11, 8), (5, 8)), ((7, 6), (6, 3))])
def test_center_crop_matches_fastmri(in_shape, crop):
    x = np.arange(np.prod(in_shape), dtype=np.float32).reshape(in_shape)
    expected = fm_transforms.center_crop(torch.from_numpy(x), crop).numpy()
    np.testing.assert_array_equal(center_crop(x, crop), expected)
    torch.testing.assert_close(center_crop(torch.from_numpy(x), crop), torch.from_numpy(expected))


def test_center_crop_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"crop shape \(12, 4\) must be positive and fit"):
        center_crop(np.zeros((3, 10, 9)), (12, 4))
    with pytest.raises(ValueError, match="must be positive"):
        center_crop(np.zeros((10, 9)), (0, 4))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        center_crop(np.zeros(9), (3, 3))


# ----------------------------------------------------------------------------- aggregation


def test_evaluate_volumes_mean_equals_manual_average():
    pairs = [(f"vol{i}", *make_pair(shape, seed=20 + i)) for i, shape in enumerate([(2, 16, 16), (3, 20, 12), (1, 9, 30)])]
    result = evaluate_volumes(pairs)
    assert result["num_volumes"] == 3
    assert list(result["per_volume"]) == ["vol0", "vol1", "vol2"]
    for name, target, recon in pairs:
        scores = result["per_volume"][name]
        assert scores["nmse"] == pytest.approx(fm_value(fm_evaluate.nmse(target, recon)), abs=ATOL)
        assert scores["psnr"] == pytest.approx(fm_value(fm_evaluate.psnr(target, recon)), abs=ATOL)
        assert scores["ssim"] == pytest.approx(fm_value(fm_evaluate.ssim(target, recon)), abs=ATOL)
    for key in ("nmse", "psnr", "ssim"):
        manual = sum(result["per_volume"][name][key] for name, _, _ in pairs) / len(pairs)
        assert result["mean"][key] == pytest.approx(manual, abs=1e-12)

    # same as fastMRI's own Metrics aggregator (running mean of per-volume values)
    fm_metrics = fm_evaluate.Metrics(fm_evaluate.METRIC_FUNCS)
    for _, target, recon in pairs:
        fm_metrics.push(target, recon)
    fm_means = fm_metrics.means()
    for key in ("nmse", "psnr", "ssim"):
        assert result["mean"][key] == pytest.approx(fm_value(fm_means[key.upper()]), abs=ATOL)


def test_evaluate_volumes_with_maxval_and_crop():
    target, recon = make_pair((2, 20, 16), seed=30)
    result = evaluate_volumes([("a", target, recon, 3.0)], crop=(16, 16))
    cropped_t, cropped_r = target[:, 2:18], recon[:, 2:18]
    assert result["per_volume"]["a"]["psnr"] == pytest.approx(psnr(cropped_t, cropped_r, 3.0), abs=1e-12)
    assert result["per_volume"]["a"]["ssim"] == pytest.approx(
        fm_value(fm_evaluate.ssim(cropped_t, cropped_r, 3.0)), abs=ATOL
    )


def test_volume_metrics_collector_errors():
    target, recon = make_pair((2, 16, 16), seed=31)
    collector = VolumeMetrics()
    with pytest.raises(ValueError, match="no volumes"):
        collector.mean()
    collector.add("a", target, recon)
    assert len(collector) == 1
    with pytest.raises(ValueError, match="already added"):
        collector.add("a", target, recon)
    with pytest.raises(ValueError, match=r"volume 'b'.*\(2, 16, 16\).*\(2, 16, 12\)"):
        collector.add("b", target, recon[..., :12])
    with pytest.raises(ValueError, match=r"\(name, target, recon\[, maxval\]\)"):
        evaluate_volumes([("a", target)])
