"""A multi-slice 2-D scan with a separate reference of the same contrast (header
calibrationMode ``separate``). Each slice sends its reference lines first (ACQ_IS_PARALLEL_CALIBRATION
only, the first also ACQ_FIRST_IN_SLICE), then its R=4 imaging lines (the last ACQ_LAST_IN_SLICE); a noise
scan comes first; 4 slices, 12 coils, 24 reference lines, 2x readout oversampling. A second stream sends
every slice's reference before any imaging line.

Each slice's anatomy is moved by its own circular shift along the phase axis, so an image of the wrong
slice correlates poorly with the truth. Reference and imaging lines carry independent noise. The truth is
numpy's RSS of the noise-free, fully sampled k-space. Seeds fixed."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from gadget.converters.simulate import correlated_noise, noise_sigma, simulate_volume
from gadget.data.mrd_header import parse_encoding
from gadget.recon.config import ReconConfig
from gadget.recon.pipeline import ScanReconstructor, build_engine
from gadget.replay import replay_file
from gadget.stream.assemble import SAME_CONTRAST_TOLERANCE, SliceAssembler, systematic_difference
from gadget.stream.images import image_magnitude
from tests.mrd_builders import cartesian_lines, header, header_3d, separate_reference_stream, write_lines
from tests.test_assemble_noise import _assemble_from_stream

H, W, COILS, SLICES, R, NREF = 64, 64, 12, 4, 4, 24  # recon matrix H x W; the readout holds 2H samples
REF_COLUMNS = list(range(W // 2 - NREF // 2, W // 2 + NREF // 2))
IMAGING_COLUMNS = [c for c in range(W) if (c - W // 2) % R == 0]   # every 4th, the centre column among them
REF_ONLY = [c for c in REF_COLUMNS if c not in IMAGING_COLUMNS]
ORDERS = {"per-slice": False, "all-references-first": True}
NCC_MIN = 0.97


def ifftc(x):
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def fftc(x):
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def rss_crop(kspace):
    """numpy: RSS over coils of the inverse FFT, readout cropped to its central H rows."""
    image = np.sqrt((np.abs(ifftc(kspace)) ** 2).sum(-3))
    return image[..., H // 2:H // 2 + H, :]


def ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def scan():
    """``(xml, imaging, reference, noise, truth)``: k-space ``(slice, coil, 2H, W)`` complex64 of the
    imaging and the reference acquisitions (the same noise-free k-space, independent noise at 30 dB),
    noise-scan samples ``(coil, 1024)`` and the truth ``(slice, H, W)``."""
    vol = simulate_volume(num_slices=SLICES, num_coils=COILS, recon_size=(H, W), snr_db=200.0, seed=23,
                          source="mni")
    clean = np.stack([fftc(np.roll(ifftc(vol.kspace[s]), s * W // SLICES, axis=-1)) for s in range(SLICES)])
    truth = rss_crop(clean)
    cov = vol.noise_covariance * (noise_sigma(truth, 30.0) / vol.sigma) ** 2
    rng = np.random.default_rng(5)
    shape = (COILS, SLICES, 2 * H, W)  # correlated_noise takes the coil axis first
    imaging, reference = ((clean + correlated_noise(shape, cov, rng).transpose(1, 0, 2, 3)).astype(np.complex64)
                          for _ in range(2))
    noise = correlated_noise((COILS, 1024), cov, rng)
    xml = header(readout=2 * H, width=W, coils=COILS, slices=SLICES, accel=R, calibration_mode="separate")
    return xml, imaging, reference, noise, truth


def stream(scan, order, **kw):
    xml, imaging, reference, noise, _ = scan
    return separate_reference_stream(imaging, reference, noise, REF_COLUMNS, IMAGING_COLUMNS,
                                     all_references_first=ORDERS[order], **kw)


def test_the_slices_differ_from_each_other(scan):
    truth = scan[-1]
    for i in range(SLICES):
        for j in range(SLICES):
            if i != j:
                assert abs(ncc(truth[i], truth[j])) < 0.3, (i, j)


@pytest.mark.parametrize("order", ORDERS)
def test_each_slice_completes_once_with_its_own_reference_merged(scan, order):
    """Every slice completes exactly once, at its own last imaging line; a same-contrast reference joins the
    imaging k-space as calibration lines (the network's ACS block), bitwise from its own slice."""
    xml, imaging, reference, _, _ = scan
    lines = stream(scan, order)
    asm = SliceAssembler(parse_encoding(xml))
    done = []
    for i, ln in enumerate(lines):
        if ln.has_flag(19):
            continue
        for sl in asm.add(ln):
            done.append((i, sl))
    assert not asm.flush()
    last_lines = [i for i, ln in enumerate(lines) if ln.has_flag(8)]
    assert [i for i, _ in done] == last_lines and [sl.key[0] for _, sl in done] == list(range(SLICES))
    mask = np.isin(np.arange(W), IMAGING_COLUMNS + REF_COLUMNS)
    for s, (_, sl) in enumerate(done):
        assert sl.calibration_kspace is None, f"slice {s}: the same-contrast reference was kept apart"
        np.testing.assert_array_equal(sl.mask, mask)
        assert sl.kspace[..., IMAGING_COLUMNS].tobytes() == imaging[s][..., IMAGING_COLUMNS].tobytes()
        assert sl.kspace[..., REF_ONLY].tobytes() == reference[s][..., REF_ONLY].tobytes()
        assert not sl.kspace[..., ~mask].any()
        assert sl.num_calibration == NREF
        assert sl.lines == len(IMAGING_COLUMNS) + len(REF_ONLY)
        assert int(sl.reference["idx"]["slice"]) == s


@pytest.mark.parametrize("order", ORDERS)
def test_lines_received_in_place_give_the_same_slices(scan, order):
    """The server's reader lands imaging lines in their rows (SliceAssembler.landing_row); the merged
    slices are bitwise those of the copying path."""
    xml = scan[0]
    lines = stream(scan, order)
    plain, _ = _assemble_from_stream(xml, lines, landing=False)
    landed, count = _assemble_from_stream(xml, lines, landing=True)
    assert count == SLICES * len(IMAGING_COLUMNS)  # every imaging line, no reference line
    assert [p[0][0] for p in plain] == [q[0][0] for q in landed] == list(range(SLICES))
    for p, q in zip(plain, landed):
        assert p[1].tobytes() == q[1].tobytes() and (p[2] == q[2]).all() and p[3] == q[3]


def test_another_contrast_is_kept_apart(scan, caplog):
    """A reference 30 % brighter than the imaging lines it shares positions with is another contrast: it
    feeds the sensitivities only and never enters the imaging k-space."""
    xml, imaging, reference, noise, _ = scan
    lines = separate_reference_stream(imaging, 1.3 * reference, noise, REF_COLUMNS, IMAGING_COLUMNS)
    asm = SliceAssembler(parse_encoding(xml))
    with caplog.at_level(logging.INFO, logger="gadget.stream.assemble"):
        done = [sl for ln in lines if not ln.has_flag(19) for sl in asm.add(ln)]
    assert [sl.key[0] for sl in done] == list(range(SLICES))
    assert "another contrast, kept apart" in caplog.text
    mask = np.isin(np.arange(W), IMAGING_COLUMNS)
    for s, sl in enumerate(done):
        np.testing.assert_array_equal(sl.mask, mask)
        assert not sl.kspace[..., ~mask].any()
        ref = sl.calibration_kspace
        assert ref is not None and ref[..., REF_COLUMNS].tobytes() == (1.3 * reference[s])[..., REF_COLUMNS].astype(
            np.complex64).tobytes()
        assert sl.num_calibration == NREF


def test_calibration_and_imaging_lines_are_not_evidence_of_the_same_contrast(scan):
    """Imaging lines flagged CALIBRATION_AND_IMAGING are in the reference too (the same acquisitions): they
    cannot show that the reference-only lines are the same contrast, so a reference whose every shared
    position is such a line stays apart, even though it is another contrast's."""
    xml, imaging, reference, noise, _ = scan
    both = {c: (21,) for c in IMAGING_COLUMNS if c in REF_COLUMNS}
    lines = separate_reference_stream(imaging, 2.0 * reference, noise, REF_ONLY, IMAGING_COLUMNS, imaging_flags=both)
    asm = SliceAssembler(parse_encoding(xml))
    done = [sl for ln in lines if not ln.has_flag(19) for sl in asm.add(ln)]
    assert len(done) == SLICES
    for s, sl in enumerate(done):
        assert sl.calibration_kspace is not None
        assert not sl.kspace[..., REF_ONLY].any()
        assert sl.num_calibration == NREF


def test_both_orders_assemble_the_same_slices(scan):
    """Reference lines of every slice first, or each slice's just before its imaging lines: bitwise the same
    slices, so the images of one order are those of the other."""
    xml = scan[0]
    got = {}
    for order in ORDERS:
        asm = SliceAssembler(parse_encoding(xml))
        got[order] = [(sl.key, sl.kspace.copy(), sl.mask.copy(), sl.num_calibration)
                      for ln in stream(scan, order) if not ln.has_flag(19) for sl in asm.add(ln)]
    first, second = got.values()
    assert len(first) == len(second) == SLICES
    for a, b in zip(first, second):
        assert a[0] == b[0] and a[1].tobytes() == b[1].tobytes() and (a[2] == b[2]).all() and a[3] == b[3]


def _replayed(scan, order, config, engine, tmp_path):
    """The stream written as an MRD file and read back through the replay door: (images, result)."""
    path = tmp_path / f"separate-{order}.h5"
    write_lines(path, scan[0], stream(scan, order))
    result = replay_file(path, config, engine)
    return result.images, result


def _assert_own_anatomy(images, truth):
    """One image per slice in slice order, each matching its own slice's truth (NCC >= 0.97) far better than
    any other slice's."""
    assert [int(im.getHead().slice) for im in images] == list(range(SLICES))
    for s, image in enumerate(images):
        magnitude = image_magnitude(image)
        assert magnitude.shape == (H, W)
        scores = [ncc(magnitude, t) for t in truth]
        assert scores[s] >= NCC_MIN, f"slice {s}: NCC {scores[s]:.4f} to its own truth (all slices: {scores})"
        assert scores[s] > max(scores[:s] + scores[s + 1:]) + 0.5, f"slice {s}: NCC to each slice's truth {scores}"


def test_default_pipeline_gives_each_slice_its_own_anatomy(scan, tmp_path):
    """The reported stream through the replay door with the default configuration and the shipped weights
    (the slowest test here: the network, its refinement and the safety check's re-run for 4 slices on the
    CPU). The other order assembles bitwise the same slices (test above); it runs zero-filled below."""
    config = ReconConfig()
    engine, _ = build_engine(config)
    images, result = _replayed(scan, "per-slice", config, engine, tmp_path)
    assert result.incomplete == 0
    _assert_own_anatomy(images, scan[-1])
    assert all(im.meta["VarNetOutput"] == "E2E-VarNet" for im in images)  # the network's, not a fallback


@pytest.mark.parametrize("order", ORDERS)
def test_zero_filled_replay_gives_each_slice_its_own_anatomy(scan, order, tmp_path):
    """Zero-filled through the replay door (noise prewhitening on, as by default): without the reference's
    centre block the R=4 images fold, so the NCC bar needs the merged reference of the right slice."""
    images, result = _replayed(scan, order, ReconConfig(mode="zero-filled"), None, tmp_path)
    assert result.incomplete == 0
    _assert_own_anatomy(images, scan[-1])


@pytest.mark.parametrize("order", ORDERS)
def test_zero_filled_images_are_the_merged_kspace(scan, order):
    """ScanReconstructor in zero-filled mode without prewhitening: each slice's image is numpy's RSS of
    its own imaging lines plus its reference-only lines."""
    xml, imaging, reference, _, _ = scan
    config = ReconConfig(mode="zero-filled", prewhiten=False)
    images = [im for im in ScanReconstructor(xml, config).run(stream(scan, order))
              if type(im).__name__ == "Image"]
    assert [int(im.getHead().slice) for im in images] == list(range(SLICES))
    for s, image in enumerate(images):
        merged = np.zeros_like(imaging[s])
        merged[..., IMAGING_COLUMNS] = imaging[s][..., IMAGING_COLUMNS]
        merged[..., REF_ONLY] = reference[s][..., REF_ONLY]
        expected = rss_crop(merged.astype(np.complex128))
        np.testing.assert_allclose(image_magnitude(image), expected, rtol=1e-4, atol=1e-5 * expected.max())


def test_systematic_difference(scan):
    """0-ish for the same signal under independent noise, |g - 1| for a gain g, inf without signal."""
    _, imaging, reference, _, _ = scan
    shared = [c for c in IMAGING_COLUMNS if c in REF_COLUMNS]
    a = np.moveaxis(imaging[0][..., shared], -1, 0)
    b = np.moveaxis(reference[0][..., shared], -1, 0)
    assert systematic_difference(a, b) < 0.05
    assert systematic_difference(a, 1.3 * a) == pytest.approx(0.3, abs=0.02)
    assert systematic_difference(a, np.exp(0.5j) * a) == pytest.approx(abs(np.exp(0.5j) - 1), abs=0.02)
    assert systematic_difference(a, 1.3 * b) > SAME_CONTRAST_TOLERANCE
    assert systematic_difference(np.zeros_like(a), b) == np.inf


def test_3d_same_contrast_reference_fills_only_columns_it_holds_at_every_e2():
    """3-D: a same-contrast reference joins the volume before the FFT along kz, but only in columns it holds
    at every e2 (column 5 lacks e2 = 1), so kz stays fully sampled."""
    from tests import test_3d_reference as t3

    partitions = 4
    _, kspace = t3.phantom_3d(partitions, seed=9)
    xml = header_3d(t3.READOUT, t3.WIDTH, t3.COILS, partitions, calibration_mode="separate")
    ref_lines = [ln for ln in cartesian_lines(kspace, t3.REF_COLUMNS, e2=range(partitions), last=False,
                                              flags={c: (20,) for c in t3.REF_COLUMNS})
                 if not (int(ln.head["idx"]["kspace_encode_step_1"]) == 5
                         and int(ln.head["idx"]["kspace_encode_step_2"]) == 1)]
    lines = ref_lines + cartesian_lines(kspace, t3.IMAGING_COLUMNS, e2=range(partitions), start_counter=len(ref_lines))
    asm = SliceAssembler(parse_encoding(xml))
    slices = [sl for ln in lines for sl in asm.add(ln)]
    assert [sl.partition for sl in slices] == list(range(partitions))
    filled = [c for c in t3.REF_COLUMNS if c not in t3.IMAGING_COLUMNS and c != 5]
    mask = np.isin(np.arange(t3.WIDTH), t3.IMAGING_COLUMNS + filled)
    expected = t3.ifftc(kspace * mask, (0,))
    for p, sl in enumerate(slices):
        assert sl.calibration_kspace is None
        np.testing.assert_array_equal(sl.mask, mask)
        np.testing.assert_allclose(sl.kspace, expected[p], atol=1e-5 * np.abs(expected).max())
