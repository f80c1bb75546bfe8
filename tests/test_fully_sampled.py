"""A measured image stays measured: fully (or nearly) sampled slices are sent as the RSS coil combination
of their data, and the ACS count is the sampled run around the centre column when no line is flagged."""
import shutil
import subprocess

import h5py
import numpy as np
import pytest

from gadget.converters.simulate import simulate_volume, write_fastmri
from gadget.cli import main
from gadget.data.fastmri_file import FastMRIVolume
from gadget.data.mrd_file import HEADER_DTYPE, iter_acquisitions
from gadget.mri.masks import center_block, make_mask
from gadget.recon.config import ReconConfig
from gadget.recon.fastmri_infer import acs_count
from gadget.recon.pipeline import ScanReconstructor
from gadget.stream.assemble import SliceData
from gadget.stream.images import image_magnitude
from gadget.stream.sinks import read_images_h5

WIDTH = 64  # phase columns; readout 2 x 64


class RecordingEngine:
    """Stands in for the model: records the ACS counts it is given; returns the zero-filled RSS (its data-
    consistency is exact; routing, not the safety check, is tested here)."""
    device = "cpu"
    checkpoint_refine = "none"  # refine: auto applies no refinement to its images

    def __init__(self):
        self.counts = []

    def run(self, kspace, mask, num_low=None):
        self.counts.append(num_low)
        return np_rss(kspace, axis=1), kspace.copy()


def np_rss(kspace, axis=0):
    """Independent reference: numpy centred orthonormal inverse FFT over the last two axes, then RSS."""
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    return np.sqrt((np.abs(img) ** 2).sum(axis)).astype(np.float32)


def crop(x, shape):
    h, w = x.shape[-2:]
    top, left = (h - shape[0]) // 2, (w - shape[1]) // 2
    return x[..., top:top + shape[0], left:left + shape[1]]


def centre_run(mask):
    """Independent count: walk out from column W//2 while columns are sampled."""
    c = len(mask) // 2
    if not mask[c]:
        return 0
    lo, hi = c, c
    while lo - 1 >= 0 and mask[lo - 1]:
        lo -= 1
    while hi + 1 < len(mask) and mask[hi + 1]:
        hi += 1
    return hi - lo + 1


@pytest.fixture(scope="module")
def scan_setup(tmp_path_factory):
    vol = simulate_volume(num_slices=1, num_coils=4, recon_size=(64, WIDTH), seed=11)
    path = tmp_path_factory.mktemp("fs") / "v.h5"
    write_fastmri(path, vol)
    with h5py.File(path, "r") as f:
        xml = f["ismrmrd_header"][()].decode()
    return xml, np.asarray(vol.kspace[0], np.complex64)


def _slice(kspace, mask):
    return SliceData(key=(0, 0, 0, 0, 0), kspace=(kspace * mask).astype(np.complex64), mask=mask.copy(),
                     num_calibration=None, reference=np.zeros((), HEADER_DTYPE), lines=int(mask.sum()))


def _run(scan_setup, mask, **cfg):
    xml, kspace = scan_setup
    engine = RecordingEngine()
    scan = ScanReconstructor(xml, ReconConfig(prewhiten=False, fallback="none", **cfg), engine)
    sl = _slice(kspace, mask)
    (img,) = list(scan.reconstruct([sl]))
    return scan, engine, img, sl


def test_full_mask_acs_is_full_width_and_image_is_the_rss(scan_setup):
    mask = np.ones(WIDTH, bool)
    scan, engine, img, sl = _run(scan_setup, mask)
    assert scan.acs_count(sl) == WIDTH  # fastMRI's detection would say 1
    assert engine.counts == []  # the network was not asked
    want = crop(np_rss(scan_setup[1]), (64, WIDTH))
    got = image_magnitude(img)
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    assert img.meta["VarNetOutput"] == "RSS coil combination (fully sampled)"
    assert "RSS" in img.meta["ImageProcessingHistory"]
    assert any("fully sampled" in c for c in img.meta["ImageComments"])


@pytest.mark.parametrize("kind", ["equispaced-fraction", "random", "asymmetric-block"])
def test_acs_count_is_the_centre_run(scan_setup, kind):
    if kind == "asymmetric-block":
        mask = np.zeros(WIDTH, bool)
        mask[::4] = True
        mask[WIDTH // 2 - 3:WIDTH // 2 + 7] = True  # 3 below the centre, 7 from it up
        mask[WIDTH // 2 - 4] = False
    else:
        mask, _ = make_mask(kind, WIDTH, 4, 0.125, seed=3)
    want = centre_run(mask)
    assert want >= 8
    scan, engine, img, sl = _run(scan_setup, mask)
    assert engine.counts[0] == want and set(engine.counts) == {want}  # explicit count (then the safety re-run)
    assert img.meta["VarNetOutput"].startswith("E2E-VarNet")
    vol = FastMRIVolume(path=None, handle=None, kspace=None, encoding=None, mask=mask)  # no num_low_frequency
    assert acs_count(vol, mask, "auto") == want


def test_acceleration_below_1_5_is_the_coil_combination_and_2_runs_the_network(scan_setup):
    rng = np.random.default_rng(0)
    nearly = np.ones(WIDTH, bool)
    nearly[rng.choice(np.r_[0:24, 40:64], size=WIDTH - round(WIDTH / 1.4), replace=False)] = False
    assert 1.35 < WIDTH / nearly.sum() < 1.5
    _, engine, img, _ = _run(scan_setup, nearly)
    assert engine.counts == [] and img.meta["VarNetOutput"].startswith("RSS")
    want = crop(np_rss(scan_setup[1] * nearly), (64, WIDTH))
    assert np.linalg.norm(image_magnitude(img) - want) / np.linalg.norm(want) < 1e-5

    half = np.zeros(WIDTH, bool)
    half[::2] = True
    half[WIDTH // 2 - 4:WIDTH // 2 + 4] = True
    assert WIDTH / half.sum() < 2.0 and WIDTH / half.sum() > 1.5
    _, engine, img, _ = _run(scan_setup, half)
    assert set(engine.counts) == {centre_run(half)} and img.meta["VarNetOutput"].startswith("E2E-VarNet")


def test_centre_unsampled_without_flags_is_an_error(scan_setup):
    mask = np.zeros(WIDTH, bool)
    mask[::3] = True
    mask[WIDTH // 2] = False
    with pytest.raises(ValueError, match="no calibration"):
        _run(scan_setup, mask)


def _ncc(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.skipif(shutil.which("ismrmrd_generate_cartesian_shepp_logan") is None,
                    reason="Debian ismrmrd-tools not installed (apt-get install ismrmrd-tools; .ci/run does)")
def test_replay_fully_sampled_shepp_logan_is_the_rss_of_its_kspace(tmp_path):
    raw = tmp_path / "sl.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-o", str(raw), "-m", "64", "-c", "4", "-C"],
                   check=True, capture_output=True, cwd=tmp_path)
    # the default preset: varnet mode with the shipped weights; the slice is fully sampled
    assert main(["replay", str(raw), str(tmp_path / "out.h5")]) == 0
    ((_, images),) = read_images_h5(tmp_path / "out.h5").items()
    got = image_magnitude(images[0])
    lines = {}
    for chunk in iter_acquisitions(raw):
        for head, data in zip(chunk.heads, chunk.data):
            if not head["flags"] & (1 << 18):  # bit 19 (1-based): noise measurement
                lines[int(head["idx"]["kspace_encode_step_1"])] = data
    k = np.stack([lines[i] for i in sorted(lines)], axis=-1)  # (coil, readout, phase)
    want = crop(np_rss(k), got.shape)
    assert _ncc(got, want) >= 0.99
    assert images[0].meta["VarNetOutput"] == "RSS coil combination (fully sampled)"
