"""Scanner-ready series: one uint16 scale and one window per series, SequenceDescriptionAdditional,
distinct series indices, and the optional conventional second series (``also_send``)."""
import numpy as np
import pytest

from gadget.recon.config import ReconConfig
from gadget.recon.pipeline import UINT16_HEADROOM, ScanReconstructor
from gadget.stream.images import SCALE_KEY, image_magnitude
from gadget.stream.types import AcqLine
from tests.server_harness import make_scan


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    xml, lines, _ = make_scan(tmp_path_factory.mktemp("series"), slices=3, coils=4, size=(32, 24), seed=9)
    return xml, lines


def _images(xml, lines, **settings):
    config = ReconConfig(mode="zero-filled").merged(settings, "test")
    scan = ScanReconstructor(xml, config)
    return [img for img in scan.run(lines) if type(img).__name__ == "Image"], scan


def _brighter(lines, slice_index, factor):
    return [AcqLine(ln.head, ln.data * factor) if int(ln.head["idx"]["slice"]) == slice_index else ln
            for ln in lines]


def test_uint16_series_shares_one_scale_and_window(scan):
    xml, lines = scan
    floats, _ = _images(xml, lines)
    ints, _ = _images(xml, lines, image_dtype="uint16", uint16_max=4095)
    assert len(ints) == 3 and all(img.data.dtype == np.uint16 for img in ints)
    scales = {img.meta[SCALE_KEY] for img in ints}
    windows = {(img.meta["WindowCenter"], img.meta["WindowWidth"]) for img in ints}
    assert len(scales) == 1 and len(windows) == 1  # never a different scale per slice
    scale = float(scales.pop())
    first = image_magnitude(floats[0])
    # the first slice's maximum maps to uint16_max / headroom
    assert scale == pytest.approx(4095 / (UINT16_HEADROOM * first.max()), rel=1e-12)
    for f, i in zip(floats, ints):  # rounding to integers (0.5 / scale) plus float32 arithmetic
        reference = image_magnitude(f)
        assert np.abs(image_magnitude(i) - reference).max() <= 0.5 / scale + 1e-6 * reference.max()


def test_configured_scale_is_used_and_brighter_slices_clip_with_a_note(scan):
    xml, lines = scan
    floats, _ = _images(xml, lines)
    scale = 1000.0 / float(image_magnitude(floats[0]).max())
    ints, _ = _images(xml, lines, image_dtype="uint16", uint16_scale=scale)
    assert {float(img.meta[SCALE_KEY]) for img in ints} == {scale}
    assert int(ints[0].data.max()) == 1000

    ints, recon = _images(xml, _brighter(lines, 1, 5.0), image_dtype="uint16", uint16_max=4095)
    assert int(ints[1].data.max()) == 4095 and len({img.meta[SCALE_KEY] for img in ints}) == 1
    assert any("clip at 4095" in note for note in recon.notes)


def test_also_send_adds_a_conventional_series(scan):
    xml, lines = scan
    plain, _ = _images(xml, lines, sequence_description_additional="VN")
    both, _ = _images(xml, lines, also_send="zero-filled", image_series_index=5,
                      sequence_description_additional="VN")
    assert len(both) == 2 * len(plain)
    main, second = both[0::2], both[1::2]
    assert {img.image_series_index for img in main} == {5} and {img.image_series_index for img in second} == {6}
    assert [img.image_index for img in second] == [1, 2, 3] and [img.slice for img in second] == [0, 1, 2]
    assert main[0].meta["SequenceDescriptionAdditional"] == "VN"
    assert second[0].meta["SequenceDescriptionAdditional"] == "VN_ZF"
    assert second[0].meta["SeriesDescription"].endswith("(zero-filled)")
    for zf, ref in zip(second, plain):  # in zero-filled mode both series hold the zero-filled RSS
        np.testing.assert_allclose(image_magnitude(zf), image_magnitude(ref), rtol=1e-6, atol=0)


def test_also_send_sense(scan):
    xml, lines = scan
    both, _ = _images(xml, lines, also_send="sense")
    second = both[1::2]
    assert len(second) == 3 and all("CGSENSE" in img.meta["ImageProcessingHistory"] for img in second)
    assert second[0].meta["SequenceDescriptionAdditional"] == "VARNET_SENSE"
    assert all(np.isfinite(image_magnitude(img)).all() and image_magnitude(img).max() > 0 for img in second)
