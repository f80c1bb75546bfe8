"""Images from reconstructed slices (gadget.stream.images) and their sinks (gadget.stream.sinks)."""
from __future__ import annotations

import importlib.util
import sys

import h5py
import ismrmrd
import numpy as np
import pytest

from gadget.data.mrd_header import build_header_xml, parse_encoding
from gadget.stream import sinks
from gadget.stream.images import (SCALE_KEY, ImageOptions, build_image, geometry_defaults, local_median)
from gadget.stream.sinks import (read_images_h5, save_png_grid, save_png_previews, write_dicom,
                                 write_images_h5)
from gadget.stream.types import AcqLine, make_head

NX, NY = 64, 48  # readout, phase
HAVE_PYDICOM = importlib.util.find_spec("pydicom") is not None
needs_pydicom = pytest.mark.skipif(not HAVE_PYDICOM,
                                   reason="pydicom not installed: pip install varnet-gadget[dicom]")

# an oblique, orthonormal geometry: read and phase rotated 30° about z, slice = read × phase
_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
READ, PHASE, SLICE = (_C, _S, 0.0), (-_S, _C, 0.0), (0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def encoding():
    xml = build_header_xml(encoded_matrix=(2 * NX, NY, 1), recon_matrix=(NX, NY, 1),
                           encoded_fov_mm=(400.0, 150.0, 4.0), recon_fov_mm=(200.0, 150.0, 4.0),
                           e1_max=NY - 1, e1_center=NY // 2, num_coils=4)
    return parse_encoding(xml)


def reference(**overrides) -> AcqLine:
    fields = dict(position=(10.0, -20.0, 35.5), read_dir=READ, phase_dir=PHASE, slice_dir=SLICE,
                  patient_table_position=(0.0, 0.0, -1200.0), measurement_uid=4242,
                  acquisition_time_stamp=123456, physiology_time_stamp=(7, 8, 9),
                  idx={"slice": 3, "contrast": 1, "phase": 2, "repetition": 4, "set": 5, "average": 6,
                       "kspace_encode_step_1": NY // 2})
    fields.update(overrides)
    return AcqLine(make_head(**fields), np.zeros((1, 2 * NX), np.complex64))


def pattern() -> np.ndarray:
    """Non-symmetric (readout, phase) test image: value 1000·i + j + 1 at [i, j]."""
    i, j = np.meshgrid(np.arange(NX), np.arange(NY), indexing="ij")
    return (1000.0 * i + j + 1).astype(np.float32)


def meta_of(img: ismrmrd.Image) -> ismrmrd.Meta:
    """Meta as a receiver sees it (all values strings after the XML round trip)."""
    return ismrmrd.Meta.deserialize(img.attribute_string)


# ----------------------------------------------------------------------------- build_image

def test_storage_is_transposed_to_y_x(encoding):
    mag = pattern()
    img = build_image(mag, reference(), encoding, 1, ImageOptions())
    assert img.matrix_size == (NX, NY, 1)
    assert img.data.shape == (1, 1, NY, NX)
    assert img.data.dtype == np.float32 and img.data_type == ismrmrd.DATATYPE_FLOAT
    for i, j in [(0, 0), (5, 1), (1, 5), (NX - 1, 0), (0, NY - 1), (NX - 1, NY - 1), (17, 40)]:
        assert img.data[0, 0, j, i] == mag[i, j]
    np.testing.assert_array_equal(img.data[0, 0].T, mag)


def test_header_fields(encoding):
    img = build_image(pattern(), reference(), encoding, 7, ImageOptions(image_series_index=3))
    assert img.channels == 1 and img.version == 1
    np.testing.assert_allclose(img.field_of_view, (200.0, 150.0, 4.0))
    np.testing.assert_allclose(img.position, (10.0, -20.0, 35.5))
    np.testing.assert_allclose(img.read_dir, READ, atol=1e-6)
    np.testing.assert_allclose(img.phase_dir, PHASE, atol=1e-6)
    np.testing.assert_allclose(img.slice_dir, SLICE, atol=1e-6)
    np.testing.assert_allclose(img.patient_table_position, (0.0, 0.0, -1200.0))
    assert (img.slice, img.contrast, img.phase, img.repetition, img.set, img.average) == (3, 1, 2, 4, 5, 6)
    assert img.image_index == 7 and img.image_series_index == 3
    assert img.measurement_uid == 4242
    assert img.acquisition_time_stamp == 123456 and list(img.physiology_time_stamp) == [7, 8, 9]
    assert img.image_type == ismrmrd.IMTYPE_MAGNITUDE


def test_reference_may_be_a_bare_header(encoding):
    ref = reference()
    a = build_image(pattern(), ref, encoding, 1)
    b = build_image(pattern(), ref.head, encoding, 1)
    assert a == b


def test_fov_keeps_pixel_spacing_for_other_sizes(encoding):
    img = build_image(np.ones((2 * NX, NY), np.float32), reference(), encoding, 1)
    np.testing.assert_allclose(img.field_of_view, (400.0, 150.0, 4.0))


def test_meta_attributes_present_and_typed(encoding):
    img = build_image(pattern(), reference(), encoding, 1, ImageOptions(series_description="VN test"),
                      comments=["4x", "checkpoint abc"], processing=("VARNET", "RSS"))
    meta = meta_of(img)
    assert meta["DataRole"] == "Image"
    assert meta["ImageProcessingHistory"] == ["VARNET", "RSS"]
    assert meta["SeriesDescription"] == "VN test"
    assert meta["ImageComments"] == ["4x", "checkpoint abc"]
    assert int(meta["Keep_image_geometry"]) == 1
    peak = float(pattern().max())
    assert float(meta["WindowCenter"]) == pytest.approx(peak / 2)
    assert float(meta["WindowWidth"]) == pytest.approx(peak)
    assert float(meta[SCALE_KEY]) == 1.0
    # a stored row runs along readout (x), a stored column along phase (y)
    np.testing.assert_allclose([float(v) for v in meta["ImageRowDir"]], img.read_dir, atol=1e-12)
    np.testing.assert_allclose([float(v) for v in meta["ImageColumnDir"]], img.phase_dir, atol=1e-12)
    assert set(meta) == {"DataRole", "ImageProcessingHistory", "WindowCenter", "WindowWidth",
                         "SeriesDescription", "ImageComments", "Keep_image_geometry", "ImageRowDir",
                         "ImageColumnDir", SCALE_KEY}


def test_meta_omits_empty_comments_and_geometry_flag(encoding):
    meta = meta_of(build_image(pattern(), reference(), encoding, 1,
                               ImageOptions(keep_image_geometry=False), data_role="Quantitative"))
    assert "ImageComments" not in meta and "Keep_image_geometry" not in meta
    assert meta["DataRole"] == "Quantitative"


def test_uint16_scale_recorded_and_invertible(encoding):
    rng = np.random.default_rng(3)
    mag = (rng.random((NX, NY)) * 3e-4).astype(np.float32)  # fastMRI-like tiny magnitudes
    img = build_image(mag, reference(), encoding, 2, ImageOptions(dtype="uint16", uint16_max=4095))
    assert img.data.dtype == np.uint16 and img.data_type == ismrmrd.DATATYPE_USHORT
    meta = meta_of(img)
    scale = float(meta[SCALE_KEY])
    stored = img.data[0, 0].T.astype(np.float64)
    assert stored.max() == 4095
    assert np.abs(stored / scale - mag).max() <= 0.5 / scale * (1 + 1e-6)  # within half an LSB
    assert int(meta["WindowWidth"]) == 4095 and int(meta["WindowCenter"]) == 2048


def test_zero_image_is_valid(encoding):
    img = build_image(np.zeros((NX, NY), np.float32), reference(), encoding, 1,
                      ImageOptions(dtype="uint16", dither_sigma=0.1))
    assert not img.data.any() and float(meta_of(img)[SCALE_KEY]) == 1.0


def test_dither_is_deterministic_per_index(encoding):
    opts = ImageOptions(dither_sigma=0.05)
    a = build_image(pattern(), reference(), encoding, 5, opts)
    b = build_image(pattern(), reference(), encoding, 5, opts)
    c = build_image(pattern(), reference(), encoding, 6, opts)
    np.testing.assert_array_equal(a.data, b.data)
    assert not np.array_equal(a.data, c.data)


def test_dither_statistics_follow_sigma_and_local_median(encoding):
    sigma, peak = 0.04, 2.0
    mag = np.full((256, 256), peak, np.float32)
    mag[:, 128:] = peak / 4  # right half: local median / max = 1/4 → noise std σ·max·1/2
    img = build_image(mag, reference(), encoding, 11, ImageOptions(dither_sigma=sigma))
    noise = img.data[0, 0].T.astype(np.float64) - mag
    left, right = noise[:, 8:120], noise[:, 136:248]  # away from the edge where the median changes
    assert abs(left.mean()) < 0.02 * sigma * peak
    assert left.std() == pytest.approx(sigma * peak, rel=0.03)
    assert right.std() == pytest.approx(sigma * peak / 2, rel=0.03)


def test_local_median_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    img = np.random.default_rng(0).random((37, 29)).astype(np.float32)
    np.testing.assert_array_equal(local_median(img, 11, rows_per_chunk=8),
                                  ndimage.median_filter(img, size=11, mode="reflect"))


def test_all_zero_directions_are_defaulted(encoding):
    ref = reference(read_dir=(0, 0, 0), phase_dir=(0, 0, 0), slice_dir=(0, 0, 0))
    img = build_image(pattern(), ref, encoding, 1)
    assert tuple(img.read_dir) == (1, 0, 0) and tuple(img.phase_dir) == (0, 1, 0)
    assert tuple(img.slice_dir) == (0, 0, 1)
    meta = meta_of(img)
    assert [float(v) for v in meta["ImageRowDir"]] == [1, 0, 0]
    assert [float(v) for v in meta["ImageColumnDir"]] == [0, 1, 0]


def test_geometry_normalises_and_completes_slice():
    geo = geometry_defaults(make_head(read_dir=(0, 3, 0), phase_dir=(2, 0, 0), slice_dir=(0, 0, 0)))
    np.testing.assert_allclose(geo.read, (0, 1, 0))
    np.testing.assert_allclose(geo.phase, (1, 0, 0))
    np.testing.assert_allclose(geo.slice, np.cross((0, 1, 0), (1, 0, 0)))
    geo = geometry_defaults(make_head(read_dir=(1, 0, 0), phase_dir=(0, 0, 0), slice_dir=(0, 0, 5)))
    np.testing.assert_allclose(np.stack(geo), np.eye(3))


@pytest.mark.parametrize("bad, message", [
    (np.full((NX, NY), np.nan, np.float32), "NaN"),
    (np.pad(np.ones((NX - 1, NY), np.float32), ((0, 1), (0, 0)), constant_values=np.inf), "Inf"),
    (np.ones((2, NX, NY), np.float32), "2-D"),
    (np.ones((NX, NY), np.complex64), "real"),
    (-np.ones((NX, NY), np.float32), "negative"),
    (np.ones((0, NY), np.float32), "empty"),
])
def test_invalid_magnitude_rejected(encoding, bad, message):
    with pytest.raises(ValueError, match=message):
        build_image(bad, reference(), encoding, 1)


def test_invalid_options_rejected():
    with pytest.raises(ValueError, match="int16"):
        ImageOptions(dtype="int16")
    with pytest.raises(ValueError, match="uint16_max"):
        ImageOptions(uint16_max=70000)
    with pytest.raises(ValueError, match="dither_sigma"):
        ImageOptions(dither_sigma=-1)


@pytest.mark.parametrize("dtype", ["float32", "uint16"])
def test_wire_round_trip_preserves_everything(encoding, dtype):
    img = build_image(pattern(), reference(), encoding, 9, ImageOptions(dtype=dtype), comments=["a", "b"])
    back = ismrmrd.Image.from_bytes(img.to_bytes())
    assert back.meta == meta_of(img)
    np.testing.assert_array_equal(back.data, img.data)
    assert back.matrix_size == img.matrix_size and back.image_index == 9
    np.testing.assert_allclose(back.position, img.position)


# ----------------------------------------------------------------------------- HDF5

def _images(encoding, n=3, series=1, dtype="float32"):
    opts = ImageOptions(dtype=dtype, image_series_index=series)
    return [build_image(pattern() * (k + 1), reference(idx={"slice": k}), encoding, k + 1, opts)
            for k in range(n)]


def test_h5_layout_readable_by_ismrmrd(tmp_path, encoding):
    path = tmp_path / "out.h5"
    imgs = _images(encoding, 3, series=1) + _images(encoding, 2, series=2, dtype="uint16")
    assert write_images_h5(path, imgs, "2024-01-01 recon") == {1: 3, 2: 2}
    with h5py.File(path, "r") as f:
        grp = f["2024-01-01 recon"]
        assert set(grp) == {"image_1", "image_2"}
        assert set(grp["image_1"]) == {"header", "attributes", "data"}
        assert grp["image_1/data"].shape == (3, 1, 1, NY, NX)
        assert grp["image_2/data"].dtype == np.uint16
        head = grp["image_1/header"][0]
        assert head["attribute_string_len"] == len(imgs[0].attribute_string.encode())
    dset = ismrmrd.Dataset(str(path), "2024-01-01 recon", mode="r")
    try:
        assert dset.number_of_images("image_1") == 3
        for k in range(3):
            back = dset.read_image("image_1", k)
            np.testing.assert_array_equal(back.data, imgs[k].data)
            assert back.meta == meta_of(imgs[k]) and back.slice == k
        np.testing.assert_array_equal(dset.read_image("image_2", 1).data, imgs[4].data)
    finally:
        dset.close()
    found = read_images_h5(path)
    assert sorted(found) == ["2024-01-01 recon/image_1", "2024-01-01 recon/image_2"]
    assert [im.image_index for im in found["2024-01-01 recon/image_1"]] == [1, 2, 3]


def test_h5_adds_groups_and_refuses_duplicates(tmp_path, encoding):
    path = tmp_path / "out.h5"
    write_images_h5(path, _images(encoding, 1), "first")
    write_images_h5(path, _images(encoding, 2), "second")
    assert sorted(read_images_h5(path)) == ["first/image_1", "second/image_1"]
    with pytest.raises(ValueError, match="already exists"):
        write_images_h5(path, _images(encoding, 1), "first")


def test_h5_rejects_mixed_shapes_in_a_series(tmp_path, encoding):
    imgs = _images(encoding, 1) + [build_image(np.ones((NX, NY + 2), np.float32), reference(), encoding, 2)]
    with pytest.raises(ValueError, match="series 1"):
        write_images_h5(tmp_path / "out.h5", imgs, "g")
    assert not list(tmp_path.iterdir())


def test_h5_write_is_atomic(tmp_path, encoding, monkeypatch):
    path = tmp_path / "out.h5"

    def failing_images():
        yield from _images(encoding, 2)
        raise RuntimeError("reconstruction failed")

    with pytest.raises(RuntimeError):
        write_images_h5(path, failing_images(), "g")
    assert not list(tmp_path.iterdir())

    write_images_h5(path, _images(encoding, 1), "kept")
    before = path.read_bytes()

    def broken_series(grp, images):
        grp.create_dataset("header", data=np.zeros(1))
        raise OSError("disk full")

    monkeypatch.setattr(sinks, "_write_series", broken_series)
    with pytest.raises(OSError, match="disk full"):
        write_images_h5(path, _images(encoding, 2), "new")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]


# ----------------------------------------------------------------------------- PNG

def test_png_previews_and_grid(tmp_path, encoding):
    from PIL import Image as PILImage

    imgs = _images(encoding, 3) + _images(encoding, 1, series=2, dtype="uint16")
    paths = save_png_previews(imgs, tmp_path / "png", "vn")
    assert [p.name for p in paths] == ["vn_s1_0001.png", "vn_s1_0002.png", "vn_s1_0003.png", "vn_s2_0001.png"]
    for path, img in zip(paths, imgs):
        with PILImage.open(path) as png:
            assert png.mode == "L" and png.size == (NX, NY)  # width = readout, height = phase
            pixels = np.asarray(png)
        expected = np.rint(np.clip(img.data[0, 0] / float(meta_of(img)["WindowWidth"]), 0, 1) * 255)
        np.testing.assert_allclose(pixels, expected, atol=1)  # rounding at .5 boundaries
    grid = save_png_grid(imgs, tmp_path / "grid.png", columns=2, gap=2)
    with PILImage.open(grid) as png:
        assert png.size == (2 * NX + 2, 2 * NY + 2)


# ----------------------------------------------------------------------------- DICOM

@needs_pydicom
@pytest.mark.parametrize("dtype", ["float32", "uint16"])
def test_dicom_geometry_and_pixels(tmp_path, encoding, dtype):
    import pydicom

    mag = pattern() / 1e7  # small float values, as reconstructions give
    opts = ImageOptions(dtype=dtype, image_series_index=4, series_description="VN dicom")
    imgs = [build_image(mag * (k + 1), reference(), encoding, k + 1, opts, comments=["x"]) for k in range(2)]
    imgs.append(build_image(mag, reference(), encoding, 1, ImageOptions(dtype=dtype, image_series_index=5)))
    paths = write_dicom(imgs, tmp_path / "dcm", {"PatientName": "Phantom^One", "PatientID": "P1"})
    assert len(paths) == 3
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and ds.Modality == "MR"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert (ds.Rows, ds.Columns) == (NY, NX)
    assert ds.InstanceNumber == 1 and ds.SeriesNumber == 4
    assert ds.SeriesDescription == "VN dicom" and ds.ImageComments == "x"
    assert str(ds.PatientName) == "Phantom^One"
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [*READ, *PHASE], atol=1e-6)
    dx, dy = 200.0 / NX, 150.0 / NY
    np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [dy, dx], rtol=1e-6)
    assert float(ds.SliceThickness) == pytest.approx(4.0)
    # the pixel at (row ny//2, column nx//2) sits at the ISMRMRD slice position
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    centre = ipp + (NX // 2) * dx * np.array(READ) + (NY // 2) * dy * np.array(PHASE)
    np.testing.assert_allclose(centre, (10.0, -20.0, 35.5), atol=1e-4)
    # pixel values: rows = phase, columns = readout; slope gives the float magnitude back
    values = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(values, mag.T, atol=float(ds.RescaleSlope) * 0.51)
    assert float(ds.WindowWidth) == pytest.approx(float(mag.max()), rel=1e-3)
    series = [pydicom.dcmread(p) for p in paths]
    assert series[0].SeriesInstanceUID == series[1].SeriesInstanceUID != series[2].SeriesInstanceUID
    assert len({s.StudyInstanceUID for s in series}) == 1
    assert len({s.SOPInstanceUID for s in series}) == 3


@needs_pydicom
def test_dicom_rejects_bad_header_info(tmp_path, encoding):
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        write_dicom(_images(encoding, 1), tmp_path, {"PatientNme": "x"})
    with pytest.raises(ValueError, match="set from the image"):
        write_dicom(_images(encoding, 1), tmp_path, {"Rows": 3})


def test_dicom_without_pydicom_names_the_extra(tmp_path, encoding, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r"pip install varnet-gadget\[dicom\]"):
        write_dicom(_images(encoding, 1), tmp_path)
