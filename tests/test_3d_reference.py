"""3-D Cartesian scans (one 2-D slice per partition after an inverse FFT along
kz) and separate reference (calibrationMode "separate": reference lines feed the sensitivities only).

References are independent: numpy FFTs of the phantom (``np.fft.ifftn`` over (kz, readout, phase)), the
phantom's own coil images, and hand-counted line sets. Seeds fixed; tolerances stated where used."""
from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from gadget.data.mrd_header import parse_encoding
from gadget.model.varnet import VarNet
from gadget.recon.config import ReconConfig
from gadget.recon.engine import Reconstructor
from gadget.recon.pipeline import ScanReconstructor
from gadget.stream.assemble import AssemblyError, SliceAssembler
from gadget.stream.images import image_magnitude
from tests.mrd_builders import cartesian_lines, header, header_3d

READOUT, WIDTH, COILS = 16, 12, 3
FLAG_CAL, FLAG_CAL_AND_IMAGING = 20, 21


# ------------------------------------------------------------------ independent references

def ifftc(x, axes):
    """numpy centred orthonormal inverse FFT over ``axes`` (the fastMRI convention)."""
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"), axes=axes)


def fftc(x, axes):
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"), axes=axes)


def centre_crop(x, shape):
    h, w = x.shape[-2:]
    top, left = (h - shape[0]) // 2, (w - shape[1]) // 2
    return x[..., top:top + shape[0], left:left + shape[1]]


def smooth(rng, shape, keep=3):
    """A random complex array whose spectrum is non-zero only in the ``keep`` lowest frequencies per axis."""
    spec = np.zeros(shape, np.complex128)
    centre = tuple(slice(n // 2 - min(keep, n // 2), n // 2 + min(keep, n // 2) + 1) for n in shape)
    block = spec[centre]
    spec[centre] = rng.standard_normal(block.shape) + 1j * rng.standard_normal(block.shape)
    return ifftc(spec, tuple(range(len(shape))))


def phantom_3d(partitions, seed=0):
    """Coil images ``(coil, z, readout, phase)`` and their 3-D k-space ``(kz, coil, readout, phase)``."""
    rng = np.random.default_rng(seed)
    volume = smooth(rng, (partitions, READOUT, WIDTH)) + 0.3
    maps = np.stack([smooth(rng, (partitions, READOUT, WIDTH), keep=1) + 1 for _ in range(COILS)])
    coil_images = maps * volume[None]
    kspace = fftc(coil_images, (1, 2, 3)).transpose(1, 0, 2, 3)
    return coil_images, np.ascontiguousarray(kspace, np.complex64)


def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


OBLIQUE = (unit([1, 0.2, 0]), unit([-0.2, 1, 0]))
OBLIQUE = (OBLIQUE[0], OBLIQUE[1], np.cross(OBLIQUE[0], OBLIQUE[1]))
POSITION = (10.0, -5.0, 30.0)


class RecordingEngine:
    """Stands in for the model: records what it is given and returns the zero-filled RSS."""
    device = "cpu"
    checkpoint_refine = "none"  # refine: auto applies no refinement to its images

    def __init__(self):
        self.calls = []

    def run(self, kspace, mask, num_low=None, sens_kspace=None):
        self.calls.append({"kspace": np.array(kspace), "mask": np.array(mask), "acs": num_low,
                           "sens_kspace": None if sens_kspace is None else np.array(sens_kspace)})
        img = ifftc(kspace, (-2, -1))
        return np.sqrt((np.abs(img) ** 2).sum(1)).astype(np.float32), np.array(kspace)


# ------------------------------------------------------------------ 3-D Cartesian

@pytest.mark.parametrize("partitions, recon_partitions", [(6, 6), (8, 6)])
def test_3d_fully_sampled_partitions_are_the_per_partition_rss(partitions, recon_partitions):
    coil_images, kspace = phantom_3d(partitions, seed=1)
    xml = header_3d(READOUT, WIDTH, COILS, partitions, recon_partitions, thickness_mm=2.5)
    rng = np.random.default_rng(2)
    lines = cartesian_lines(kspace, range(WIDTH), e2=range(partitions), position=POSITION, directions=OBLIQUE)
    order = rng.permutation(len(lines) - 1)  # any order; the flagged last line stays last
    lines = [lines[i] for i in order] + [lines[-1]]
    scan = ScanReconstructor(xml, ReconConfig(mode="zero-filled", prewhiten=False))
    images = list(scan.run(lines))
    assert len(images) == recon_partitions
    start = partitions // 2 - recon_partitions // 2  # slice oversampling: the centred recon partitions
    rss = np.sqrt((np.abs(coil_images) ** 2).sum(0))[start:start + recon_partitions]
    expected = centre_crop(rss, (READOUT // 2, WIDTH))
    for p, img in enumerate(images):
        got = image_magnitude(img)
        # float32 FFTs of O(1) data: 1e-5 of the image maximum
        np.testing.assert_allclose(got, expected[p], atol=1e-5 * expected.max(), rtol=0)
        offset = (p - recon_partitions // 2) * 2.5
        np.testing.assert_allclose(np.asarray(img.position), np.asarray(POSITION) + offset * OBLIQUE[2], atol=1e-4)
        np.testing.assert_allclose(np.asarray(img.slice_dir), OBLIQUE[2], atol=1e-6)
    assert len({img.image_index for img in images}) == recon_partitions


def test_3d_undersampled_e1_gives_each_partition_its_kz_transformed_kspace():
    partitions = 6
    coil_images, kspace = phantom_3d(partitions, seed=3)
    columns = sorted(set(range(0, WIDTH, 3)) | {WIDTH // 2 - 1, WIDTH // 2, WIDTH // 2 + 1})
    mask = np.zeros(WIDTH, bool)
    mask[columns] = True
    xml = header_3d(READOUT, WIDTH, COILS, partitions)
    engine = RecordingEngine()
    scan = ScanReconstructor(xml, ReconConfig(prewhiten=False, fallback="none"), engine)
    images = list(scan.run(cartesian_lines(kspace, columns, e2=range(partitions),
                                          flags={c: (FLAG_CAL_AND_IMAGING,) for c in (5, 6, 7)})))
    assert len(images) == partitions
    # independent: numpy inverse FFT along kz of the masked 3-D k-space → (z, coil, readout, phase)
    expected = ifftc(kspace * mask, (0,))
    main_calls = engine.calls[::2]  # each slice: the forward, then the safety check's re-run
    assert len(main_calls) == partitions
    for p, call in enumerate(main_calls):
        np.testing.assert_allclose(call["kspace"][0], expected[p], atol=1e-5 * np.abs(expected).max())
        np.testing.assert_array_equal(call["mask"], mask)
        assert call["acs"] == 3  # the flagged columns 5, 6, 7
    assert {img.image_index for img in images} == set(range(1, partitions + 1))


def test_3d_missing_partition_lines_are_an_error_never_an_average():
    partitions = 6
    _, kspace = phantom_3d(partitions, seed=4)
    lines = cartesian_lines(kspace, range(WIDTH), e2=range(partitions))
    holes = [ln for ln in lines if not (int(ln.head["idx"]["kspace_encode_step_2"]) == 2
                                        and int(ln.head["idx"]["kspace_encode_step_1"]) % 2)]
    asm = SliceAssembler(parse_encoding(header_3d(READOUT, WIDTH, COILS, partitions)))
    with pytest.raises(AssemblyError, match=r"3-D scan undersampled along kz \(e2\).*e2 = 2;.*not supported"):
        for ln in holes:
            asm.add(ln)
    # a whole partition missing (kz undersampled every other partition)
    asm = SliceAssembler(parse_encoding(header_3d(READOUT, WIDTH, COILS, partitions)))
    every_other = cartesian_lines(kspace, range(WIDTH), e2=range(0, partitions, 2))
    with pytest.raises(AssemblyError, match=r"undersampled along kz \(e2\).*e2 = 1, 3, 5"):
        for ln in every_other:
            asm.add(ln)


def test_3d_header_acceleration_e2_is_an_error():
    _, kspace = phantom_3d(4, seed=5)
    scan = ScanReconstructor(header_3d(READOUT, WIDTH, COILS, 4, accel_e2=2),
                             ReconConfig(mode="zero-filled", prewhiten=False))
    with pytest.raises(AssemblyError, match=r"3-D scan undersampled along kz \(e2\).*kspace_encoding_step_2 is 2"):
        list(scan.run(cartesian_lines(kspace, range(WIDTH), e2=range(4))))


def test_3d_image_field_of_view_z_is_the_partition_thickness():
    _, kspace = phantom_3d(4, seed=6)
    scan = ScanReconstructor(header_3d(READOUT, WIDTH, COILS, 4, thickness_mm=1.5),
                             ReconConfig(mode="zero-filled", prewhiten=False))
    images = list(scan.run(cartesian_lines(kspace, range(WIDTH), e2=range(4))))
    assert [float(img.field_of_view[2]) for img in images] == pytest.approx([1.5] * 4)


def test_2d_header_parses_as_one_partition():
    enc = parse_encoding(header(readout=READOUT, width=WIDTH, coils=COILS))
    assert not enc.is_3d and (enc.e2_min, enc.e2_max, enc.e2_center) == (0, 0, 0)
    enc3 = parse_encoding(header_3d(READOUT, WIDTH, COILS, 8, 6, thickness_mm=2.0))
    assert enc3.is_3d and (enc3.e2_min, enc3.e2_max, enc3.e2_center) == (0, 7, 4)
    assert enc3.partition_thickness_mm == 2.0 and enc3.acceleration_e2 == 1


# ------------------------------------------------------------------ separate reference

REF_COLUMNS = list(range(WIDTH // 2 - 3, WIDTH // 2 + 3))        # 6 centre columns: 3..8
IMAGING_COLUMNS = [0, 2, 4, 7, 9, 11]                             # every other-ish, not the centre column


def separate_scan(seed=7, mode="separate", ref_gain=3 * np.exp(0.7j)):
    """Imaging k-space of one image, reference k-space of the same coils with another contrast (x3, phase
    0.7 rad, plus a different image added); lines: the reference first, then the imaging lines. In
    separate mode the last reference line is flagged LAST_IN_SLICE, which must not complete the slice
    (in other modes it would, so there it is not set)."""
    rng = np.random.default_rng(seed)
    coil_images, _ = phantom_3d(1, seed=seed)
    coil_images = coil_images[:, 0]
    other = smooth(rng, (READOUT, WIDTH))
    imaging = fftc(coil_images, (-2, -1)).astype(np.complex64)
    maps = coil_images / (np.abs(coil_images).max())
    reference = (fftc(ref_gain * coil_images + maps * other[None], (-2, -1))).astype(np.complex64)
    xml = header(readout=READOUT, width=WIDTH, coils=COILS)
    xml = xml.replace("<calibrationMode>other</calibrationMode>", f"<calibrationMode>{mode}</calibrationMode>")
    ref_lines = cartesian_lines(reference, REF_COLUMNS, flags={c: (FLAG_CAL,) for c in REF_COLUMNS},
                                last=mode == "separate")
    img_lines = cartesian_lines(imaging, IMAGING_COLUMNS, start_counter=len(ref_lines))
    return xml, imaging, reference, ref_lines + img_lines


def test_separate_reference_never_reaches_the_imaging_kspace():
    xml, imaging, reference, lines = separate_scan()
    enc = parse_encoding(xml)
    assert enc.separate_reference
    asm = SliceAssembler(enc)
    # poison: a first slice's memory full of 1e6, recycled, so a missed zeroing would show
    (first,) = [s for ln in cartesian_lines(imaging, range(WIDTH)) for s in asm.add(ln)]
    first.kspace[...] = 1e6
    asm.recycle(first)
    done = []
    for i, ln in enumerate(lines):
        out = asm.add(ln)
        if i < len(REF_COLUMNS):
            assert out == []  # the reference's LAST_IN_SLICE does not complete the slice
        done += out
    (sl,) = done
    mask = np.zeros(WIDTH, bool)
    mask[IMAGING_COLUMNS] = True
    np.testing.assert_array_equal(sl.mask, mask)
    assert not sl.kspace[..., ~mask].any()  # no reference sample, no poison
    assert sl.kspace[..., mask].tobytes() == imaging[..., mask].tobytes()
    ref_mask = np.zeros(WIDTH, bool)
    ref_mask[REF_COLUMNS] = True
    assert sl.calibration_kspace.dtype == np.complex64 and sl.calibration_kspace.shape == sl.kspace.shape
    assert sl.calibration_kspace[..., ref_mask].tobytes() == reference[..., ref_mask].tobytes()
    assert not sl.calibration_kspace[..., ~ref_mask].any()
    assert sl.num_calibration == len(REF_COLUMNS)
    assert sl.lines == len(IMAGING_COLUMNS)


def test_separate_reference_feeds_only_the_sensitivities_in_the_pipeline():
    xml, imaging, reference, lines = separate_scan()
    engine = RecordingEngine()
    scan = ScanReconstructor(xml, ReconConfig(prewhiten=False, fallback="none"), engine)
    (img,) = list(scan.run(lines))
    mask = np.zeros(WIDTH, bool)
    mask[IMAGING_COLUMNS] = True
    assert len(engine.calls) == 2  # the forward and the safety check's re-run: both with the reference
    main, check = engine.calls
    assert not main["kspace"][..., ~mask].any()
    np.testing.assert_array_equal(main["kspace"][0][..., mask], imaging[..., mask])
    np.testing.assert_array_equal(main["mask"], mask)
    assert main["acs"] == len(REF_COLUMNS) == check["acs"]
    for call in (main, check):
        np.testing.assert_array_equal(call["sens_kspace"][0][..., REF_COLUMNS], reference[..., REF_COLUMNS])
    assert check["mask"].sum() < mask.sum()  # the check withheld imaging lines, not reference ones
    # acceleration from imaging lines only: 12 columns / 6 measured
    assert "VarNetSafety" in img.meta.keys()
    sl = next(iter(_slices(xml, lines)))
    assert scan.acceleration(sl) == WIDTH / len(IMAGING_COLUMNS)


def _slices(xml, lines):
    asm = SliceAssembler(parse_encoding(xml))
    return [s for ln in lines for s in asm.add(ln)] + asm.flush()


def test_embedded_mode_keeps_calibration_lines_in_the_imaging_kspace():
    xml, imaging, reference, lines = separate_scan(mode="embedded")
    (sl,) = _slices(xml, lines)
    assert sl.calibration_kspace is None
    both = sorted(set(REF_COLUMNS) | set(IMAGING_COLUMNS))
    mask = np.zeros(WIDTH, bool)
    mask[both] = True
    np.testing.assert_array_equal(sl.mask, mask)
    only_ref = [c for c in REF_COLUMNS if c not in IMAGING_COLUMNS]
    np.testing.assert_array_equal(sl.kspace[..., only_ref], reference[..., only_ref])
    # a column that is both: the two lines averaged, as today
    np.testing.assert_allclose(sl.kspace[..., 4], (reference[..., 4] + imaging[..., 4]) / 2, rtol=1e-6)
    assert sl.num_calibration == len(REF_COLUMNS)


def test_calibration_and_imaging_line_goes_to_both_in_separate_mode():
    xml, imaging, reference, _ = separate_scan()
    lines = cartesian_lines(reference, REF_COLUMNS, flags={c: (FLAG_CAL,) for c in REF_COLUMNS}, last=False)
    lines += cartesian_lines(imaging, IMAGING_COLUMNS + [WIDTH // 2 + 3],
                             flags={WIDTH // 2 + 3: (FLAG_CAL_AND_IMAGING,)}, start_counter=len(lines))
    (sl,) = _slices(xml, lines)
    col = WIDTH // 2 + 3  # 9: an imaging column next to the reference block
    np.testing.assert_array_equal(sl.kspace[..., col], imaging[..., col])
    np.testing.assert_array_equal(sl.calibration_kspace[..., col], imaging[..., col])
    assert sl.num_calibration == len(REF_COLUMNS) + 1


def test_reference_without_imaging_lines_is_dropped_with_a_warning(caplog):
    xml, _, reference, _ = separate_scan()
    asm = SliceAssembler(parse_encoding(xml))
    for ln in cartesian_lines(reference, REF_COLUMNS, flags={c: (FLAG_CAL,) for c in REF_COLUMNS}):
        assert asm.add(ln) == []
    with caplog.at_level(logging.WARNING):
        assert asm.flush() == []
    assert "reference dropped" in caplog.text


def small_varnet(seed=0):
    torch.manual_seed(seed)
    return VarNet(num_cascades=2, sens_chans=4, sens_pools=2, chans=4, pools=2).eval()


def test_network_image_uses_the_reference_and_differs_from_merging_it():
    model = small_varnet()
    images = {}
    for mode in ("separate", "embedded"):
        xml, imaging, reference, lines = separate_scan(mode=mode)
        scan = ScanReconstructor(xml, ReconConfig(prewhiten=False, fallback="none", device="cpu", refine="none"),
                                 Reconstructor(model, "cpu"))
        (img,) = list(scan.run(lines))
        images[mode] = image_magnitude(img)
    mask = np.zeros(WIDTH, bool)
    mask[IMAGING_COLUMNS] = True
    with torch.inference_mode():
        direct = model(torch.from_numpy(imaging * mask)[None], torch.from_numpy(mask), len(REF_COLUMNS),
                       sens_kspace=torch.from_numpy(reference * np.isin(np.arange(WIDTH), REF_COLUMNS))[None])
        from_imaging = model(torch.from_numpy(imaging * mask)[None], torch.from_numpy(mask), len(REF_COLUMNS))
    expected = centre_crop(direct[0].numpy(), (READOUT // 2, WIDTH))
    np.testing.assert_allclose(images["separate"], expected, rtol=1e-5, atol=1e-6 * expected.max())
    ignored = centre_crop(from_imaging[0].numpy(), (READOUT // 2, WIDTH))  # the reference not used at all
    assert np.linalg.norm(images["separate"] - ignored) / np.linalg.norm(ignored) > 0.01
    difference = np.linalg.norm(images["separate"] - images["embedded"]) / np.linalg.norm(images["separate"])
    assert difference > 0.05  # merging a x3, phase-shifted reference into the data changes the image


def test_varnet_sens_kspace_equal_to_the_kspace_is_todays_call():
    model = small_varnet(1)
    rng = np.random.default_rng(8)
    k = torch.from_numpy((rng.standard_normal((2, COILS, READOUT, WIDTH))
                          + 1j * rng.standard_normal((2, COILS, READOUT, WIDTH))).astype(np.complex64))
    mask = torch.zeros(WIDTH, dtype=torch.bool)
    mask[[0, 3, 5, 6, 7, 10]] = True
    k = k * mask
    with torch.inference_mode():
        today = model.forward_with_kspace(k, mask, 3)
        same = model.forward_with_kspace(k, mask, 3, sens_kspace=k.clone())
        other = model(k, mask, 3, sens_kspace=2j * k)
    assert torch.equal(today[0], same[0]) and torch.equal(today[1], same[1])
    assert not torch.allclose(other, today[0])  # the sensitivities do come from sens_kspace
    with pytest.raises(ValueError, match="explicit num_low_frequencies"):
        model(k, mask, None, sens_kspace=k)
    with pytest.raises(ValueError, match="shape of masked_kspace"):
        model(k, mask, 3, sens_kspace=k[:, :2])


def test_3d_separate_reference_is_transformed_along_kz_and_kept_apart():
    partitions = 4
    _, imaging = phantom_3d(partitions, seed=9)
    _, reference = phantom_3d(partitions, seed=10)  # another "contrast": a different volume
    xml = header_3d(READOUT, WIDTH, COILS, partitions, calibration_mode="separate")
    lines = cartesian_lines(reference, REF_COLUMNS, e2=range(partitions), flags={c: (FLAG_CAL,) for c in REF_COLUMNS},
                            last=False)
    lines += cartesian_lines(imaging, IMAGING_COLUMNS, e2=range(partitions), start_counter=len(lines))
    slices = _slices(xml, lines)
    assert [s.partition for s in slices] == list(range(partitions))
    mask, ref_mask = np.isin(np.arange(WIDTH), IMAGING_COLUMNS), np.isin(np.arange(WIDTH), REF_COLUMNS)
    expected, expected_ref = ifftc(imaging * mask, (0,)), ifftc(reference * ref_mask, (0,))
    for p, sl in enumerate(slices):
        np.testing.assert_array_equal(sl.mask, mask)
        np.testing.assert_allclose(sl.kspace, expected[p], atol=1e-5 * np.abs(expected).max())
        np.testing.assert_allclose(sl.calibration_kspace, expected_ref[p], atol=1e-5 * np.abs(expected_ref).max())
        assert not sl.kspace[..., ~mask].any() and sl.num_calibration == len(REF_COLUMNS)


def test_batching_engine_passes_the_reference_and_batches_it_apart():
    """``varnet serve`` runs the model through BatchingEngine: a reference scan gets the same image as
    the engine alone, and never shares a forward with a scan without a reference."""
    from gadget.recon.batching import BatchingEngine

    model = small_varnet()
    xml, imaging, reference, lines = separate_scan(mode="separate")
    config = ReconConfig(prewhiten=False, fallback="none", device="cpu")
    alone = Reconstructor(model, "cpu")
    (expected,) = list(ScanReconstructor(xml, config, alone).run(lines))
    shared = BatchingEngine(alone, max_batch=4, window_s=0.05)
    try:
        (got,) = list(ScanReconstructor(xml, config, shared).run(lines))
        k = np.stack([imaging, imaging])
        mask = np.isin(np.arange(WIDTH), IMAGING_COLUMNS)
        threads = [threading.Thread(target=shared.run, args=(k[:1], mask, len(REF_COLUMNS)),
                                    kwargs={"sens_kspace": ref})
                   for ref in (None, reference[None])]
        calls = shared.forward_calls
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert shared.forward_calls - calls == 2  # same shape, but one has a reference: two forwards
    finally:
        shared.close()
    np.testing.assert_allclose(image_magnitude(got), image_magnitude(expected), rtol=1e-5,
                               atol=1e-6 * image_magnitude(expected).max())
