"""One ACS-count rule (gadget.mri.masks.acs_lines) behind its three callers, each fallback path tested; and
one implementation each of zero-filled RSS and ESPIRiT + CG-SENSE (gadget.recon.safety), which the
comparison methods of gadget.evaluation.compare call."""
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gadget.converters.simulate import simulate_volume
from gadget.baselines.espirit import EspiritConfig, espirit_maps
from gadget.baselines.sense import SenseConfig, cg_sense
from gadget.data.fastmri_file import FastMRIFileError, FastMRIVolume
from gadget.data.mrd_file import HEADER_DTYPE
from gadget.evaluation import compare
from gadget.mri.coils import rss
from gadget.mri.fft import ifft2c
from gadget.mri.masks import (
    ACS_FALLBACKS,
    AcsLinesError,
    acs_lines,
    center_block,
    contiguous_center_lines,
    detect_acs_count,
)
from gadget.recon.config import ReconConfig
from gadget.recon.fastmri_infer import acs_count
from gadget.recon.pipeline import ReconError, ScanReconstructor
from gadget.recon.safety import sense_image, zero_filled_rss
from gadget.stream.assemble import SliceData
from gadget.train.data import TrainSample
from gadget.train.trainer import acs_counts
from tests.mrd_builders import header

W = 32


def undersampled(block=8, step=4, width=W):
    """An equispaced mask with a centre block of ``block`` columns (odd blocks stay odd: detection
    would under-count them, the centre run does not)."""
    mask = center_block(width, block)
    mask[::step] = True
    return mask


def centre_unsampled(width=W):
    """A centre block with the centre column missing: no run contains ``width // 2``."""
    mask = center_block(width, 10)
    mask[width // 2] = False
    return mask


# ----------------------------------------------------------------------------- the rule itself


def test_given_count_wins_over_the_mask():
    for fallback in ACS_FALLBACKS:
        assert acs_lines(undersampled(9), 12, fallback=fallback) == 12
        assert acs_lines(centre_unsampled(), 6, fallback=fallback) == 6  # the mask is not consulted
    assert acs_lines(undersampled(9), np.int64(7), required=True) == 7
    assert type(acs_lines(undersampled(9), np.int64(7))) is int


@pytest.mark.parametrize("unknown", [None, 0])
def test_no_count_run_is_the_centre_run(unknown):
    mask = undersampled(9)
    assert detect_acs_count(mask) == 8  # detection under-counts an odd block ...
    assert acs_lines(mask, unknown) == 9  # ... the run does not ("run" is the default)
    assert acs_lines(mask, unknown, fallback="run-or-detect") == 9
    full = np.ones(W, bool)
    assert acs_lines(full, unknown) == W  # detection would say 1
    assert acs_lines(full, unknown, fallback="run-or-detect") == W


def test_no_count_centre_unsampled_run_raises():
    with pytest.raises(AcsLinesError) as err:
        acs_lines(centre_unsampled(), None, fallback="run")
    assert err.value.reason == "centre-unsampled"
    assert isinstance(err.value, ValueError)


def test_no_count_centre_unsampled_run_or_detect_detects_and_says_so():
    calls = []
    mask = centre_unsampled()
    got = acs_lines(mask, None, fallback="run-or-detect", on_detect=lambda: calls.append(1))
    assert got == detect_acs_count(mask) and calls == [1]
    assert acs_lines(mask, None, fallback="run-or-detect") == detect_acs_count(mask)  # no callback needed
    calls.clear()
    acs_lines(undersampled(), None, fallback="run-or-detect", on_detect=lambda: calls.append(1))
    assert calls == []  # the run was found: nothing to report


@pytest.mark.parametrize("mask", [undersampled(9), np.ones(W, bool), centre_unsampled()])
def test_no_count_detect_is_fastmris_detection(mask):
    assert acs_lines(mask, 0, fallback="detect") == detect_acs_count(mask)
    assert acs_lines(torch.as_tensor(mask), None, fallback="detect") == detect_acs_count(mask)


@pytest.mark.parametrize("unknown", [None, 0])
def test_required_count_missing_raises_whatever_the_mask(unknown):
    for fallback in ACS_FALLBACKS:
        with pytest.raises(AcsLinesError) as err:
            acs_lines(np.ones(W, bool), unknown, required=True, fallback=fallback)
        assert err.value.reason == "missing"


def test_unknown_fallback_is_refused():
    with pytest.raises(ValueError, match="unknown ACS fallback"):
        acs_lines(undersampled(), 8, fallback="guess")


# ----------------------------------------------------------------------------- the pipeline's caller


@pytest.fixture(scope="module")
def scan_xml():
    return header(readout=2 * W, width=W, coils=2)


def _scan(xml, **cfg):
    return ScanReconstructor(xml, ReconConfig(mode="zero-filled", prewhiten=False, **cfg), source="scan.mrd")


def _slice(mask, num_calibration=None, calibration=False):
    k = np.ones((2, 2 * W, W), np.complex64) * mask
    return SliceData(key=(3, 0, 0, 0, 0), kspace=k, mask=mask.copy(), num_calibration=num_calibration,
                     reference=np.zeros((), HEADER_DTYPE), lines=int(mask.sum()),
                     calibration_kspace=k.copy() if calibration else None)


def test_pipeline_flags_present(scan_xml):
    assert _scan(scan_xml).acs_count(_slice(undersampled(9), num_calibration=6)) == 6


def test_pipeline_no_flags_or_acs_source_mask_is_the_centre_run(scan_xml):
    assert _scan(scan_xml).acs_count(_slice(undersampled(9))) == 9
    assert _scan(scan_xml).acs_count(_slice(np.ones(W, bool))) == W
    assert _scan(scan_xml, acs_source="mask").acs_count(_slice(undersampled(9), num_calibration=6)) == 9


def test_pipeline_centre_unsampled_is_an_error_naming_scan_and_slice(scan_xml):
    for cfg in ({}, {"acs_source": "mask"}):
        with pytest.raises(ReconError, match=r"scan\.mrd: slice \{.*'slice': 3.*\} has no calibration \(ACS\) "
                                             "lines: no line is flagged as calibration and the k-space centre "
                                             "line was not acquired"):
            _scan(scan_xml, **cfg).acs_count(_slice(centre_unsampled()))


def test_pipeline_separate_reference_count_whatever_acs_source(scan_xml):
    for cfg in ({}, {"acs_source": "mask"}):
        assert _scan(scan_xml, **cfg).acs_count(_slice(undersampled(9), num_calibration=12, calibration=True)) == 12
        with pytest.raises(ReconError, match=r"scan\.mrd: slice \{.*\}: the separate reference lines do not cover "
                                             "the k-space centre column"):
            # the imaging mask's centre run does not stand in for a reference that misses the centre
            _scan(scan_xml, **cfg).acs_count(_slice(undersampled(9), num_calibration=None, calibration=True))


# ----------------------------------------------------------------------------- fastMRI inference's caller


def _volume(mask, num_low_frequency=None):
    attrs = {} if num_low_frequency is None else {"num_low_frequency": num_low_frequency}
    return FastMRIVolume(path=Path("/data/file_brain_x.h5"), handle=None, kspace=None, encoding=None, mask=mask,
                         attrs=attrs)


def test_infer_attribute_present():
    mask = undersampled(9)
    for source in ("auto", "attrs"):
        assert acs_count(_volume(mask, 14), mask, source) == 14
    assert acs_count(_volume(mask, 14), mask, "mask") == detect_acs_count(mask) == 8  # the attribute ignored


def test_infer_attribute_absent():
    mask = undersampled(9)
    assert acs_count(_volume(mask), mask, "auto") == 9
    assert acs_count(_volume(mask, 0), mask, "auto") == 9  # 0 reads as absent
    assert acs_count(_volume(mask), mask, "mask") == 8
    with pytest.raises(FastMRIFileError, match=r"/data/file_brain_x\.h5: attribute 'num_low_frequency' missing "
                                               r"\(use --acs mask\)"):
        acs_count(_volume(mask), mask, "attrs")


def test_infer_centre_unsampled_detects_and_logs(caplog):
    mask = centre_unsampled()
    with caplog.at_level(logging.WARNING, logger="gadget.recon.fastmri_infer"):
        assert acs_count(_volume(mask), mask, "auto") == detect_acs_count(mask)
    assert "file_brain_x.h5: no num_low_frequency attribute and the centre column 16 is not sampled" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gadget.recon.fastmri_infer"):
        assert acs_count(_volume(mask), mask, "mask") == detect_acs_count(mask)
    assert caplog.text == ""  # detection asked for: nothing to warn about


# ----------------------------------------------------------------------------- training's caller


def _batch(masks, counts):
    b = len(counts)
    m = torch.as_tensor(np.stack(masks)).view(len(masks), 1, 1, -1)
    return TrainSample(masked_kspace=torch.zeros(b, 1, 2, W, dtype=torch.complex64), mask=m,
                       num_low_frequencies=torch.tensor(counts, dtype=torch.long), target=torch.zeros(b, 2, W),
                       max_value=torch.ones(b), crop_size=(2, W), fname=["f"] * b, slice_num=torch.zeros(b))


def test_train_known_counts_pass_through():
    batch = _batch([undersampled(9), undersampled(9)], [10, 12])
    assert acs_counts(batch) is batch.num_low_frequencies


def test_train_zero_is_detected_per_entry():
    masks = [undersampled(9), np.ones(W, bool), undersampled(12)]
    got = acs_counts(_batch(masks, [0, 0, 5]))
    assert got.dtype == torch.long and got.tolist() == [8, 1, 5]  # fastMRI's detection, as the reference model
    shared = acs_counts(_batch([undersampled(9)], [0, 7]))  # one mask for the whole batch broadcasts
    assert shared.tolist() == [8, 7]


# ----------------------------------------------------------------------------- one zero-filled, one SENSE


@pytest.fixture(scope="module")
def case():
    vol = simulate_volume(num_slices=2, num_coils=4, recon_size=(32, W), seed=3)
    mask = undersampled(10, 3)
    kspace = np.asarray(vol.kspace, np.complex64) * mask
    return compare.Case(path=Path("v.h5"), kspace=kspace, mask=mask, num_low=contiguous_center_lines(mask),
                        target=np.zeros((2, 32, W), np.float32), target_key="t",
                        encoding=SimpleNamespace(recon_size=(32, W)), attrs={}, slices=[0, 1], mask_source="test")


def _crop(x, case):
    return compare._crop(x, case).astype(np.float32)


def test_zero_filled_is_one_implementation(case):
    got = compare.zero_filled(case)
    before = _crop(rss(ifft2c(torch.from_numpy(case.kspace)), dim=1).numpy(), case)  # compare's former code
    assert got.dtype == np.float32 and got.shape == (2, 32, W)
    np.testing.assert_array_equal(got, before)
    np.testing.assert_array_equal(got, _crop(np.stack([zero_filled_rss(k) for k in case.kspace]), case))


@pytest.mark.parametrize("configs", [{}, {"espirit": EspiritConfig(threshold=0.05, kernel=5),
                                          "config": SenseConfig(iterations=3)}])
def test_sense_is_one_implementation(case, configs):
    espirit, config = configs.get("espirit", EspiritConfig()), configs.get("config", SenseConfig())
    got = compare.sense(case, **configs)
    before = _crop(np.stack([cg_sense(torch.from_numpy(k), espirit_maps(k, case.num_low, config=espirit), case.mask,
                                      config).abs().numpy() for k in case.kspace]), case)  # compare's former code
    np.testing.assert_array_equal(got, before)
    np.testing.assert_array_equal(
        got, _crop(np.stack([sense_image(k, case.mask, case.num_low, **configs) for k in case.kspace]), case))
    if configs:  # the settings reach ESPIRiT and CG
        assert not np.array_equal(got, compare.sense(case))
