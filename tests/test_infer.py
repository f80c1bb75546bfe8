"""`varnet infer` gives the numbers of fastMRI's own pretrained-VarNet inference path."""
import threading

import h5py
import numpy as np
import pytest
import torch

from gadget.converters.simulate import simulate_volume, write_fastmri
from gadget.cli import main
from gadget.model.checkpoint import save_checkpoint
from gadget.model.varnet import VarNet
from tests.conftest import equispaced_mask

fastmri = pytest.importorskip("fastmri", reason="fastmri (test oracle) not installed")
SMALL = dict(num_cascades=2, chans=6, pools=3, sens_chans=4, sens_pools=2)


def _reference_recon(files_dir, state_dict, cfg):
    """fastMRI's path: SliceDataset + VarNetDataTransform, model(masked_kspace, mask) with the ACS
    width detected from the mask, crop to recon_size (or (W, W) when the image is narrower)."""
    import fastmri.data.transforms as T
    from fastmri.data import SliceDataset
    from fastmri.models import VarNet as RefVarNet

    model = RefVarNet(**cfg).eval()
    model.load_state_dict(state_dict)
    data = SliceDataset(root=files_dir, transform=T.VarNetDataTransform(), challenge="multicoil")
    out = {}
    for sample in data:
        with torch.no_grad():
            img = model(sample.masked_kspace.unsqueeze(0), sample.mask.unsqueeze(0)).cpu()
        crop = sample.crop_size
        if img.shape[-1] < crop[1]:
            crop = (img.shape[-1], img.shape[-1])
        out.setdefault(sample.fname, {})[sample.slice_num] = T.center_crop(img, crop)[0].numpy()
    return {f: np.stack([s[i] for i in sorted(s)]) for f, s in out.items()}


def _checkpoint(tmp_path, seed=4):
    torch.manual_seed(seed)
    model = VarNet(**SMALL)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, {"data": "random init (test)"})
    return path, model.state_dict()


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_infer_directory_matches_fastmri_inference(tmp_path, small_volume):
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    write_fastmri(in_dir / "a.h5", small_volume, mask=equispaced_mask(48, 4, 8), num_low_frequency=8,
                  acceleration=4)
    other = simulate_volume(num_slices=2, num_coils=4, recon_size=(64, 40), seed=11)
    write_fastmri(in_dir / "b.h5", other, mask=equispaced_mask(40, 4, 6), num_low_frequency=6, acceleration=4)
    ckpt, state = _checkpoint(tmp_path)
    out_dir = tmp_path / "out"
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(in_dir), "--output", str(out_dir),
                 "--batch-size", "2", "--refine", "none"]) == 0
    want = _reference_recon(in_dir, state, SMALL)
    for name, shape in (("a.h5", (3, 64, 48)), ("b.h5", (2, 64, 40))):
        with h5py.File(out_dir / name, "r") as f:
            got = f["reconstruction"][()]
        assert got.dtype == np.float32 and got.shape == shape
        assert _rel(got, want[name]) < 1e-5


def test_acs_from_attribute_vs_detection(tmp_path, small_volume):
    """The file says 10 ACS lines but the mask's symmetric run detects 8: auto uses the attribute,
    --acs mask reproduces the reference exactly."""
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    mask = equispaced_mask(48, 4, 10)  # ACS lines 19..28 around centre 24
    mask[19] = False  # now 20..28: run of 4 left of 24, 5 from 24 → fastMRI detects 2*min = 8
    write_fastmri(in_dir / "c.h5", small_volume, mask=mask, num_low_frequency=10, acceleration=4)
    ckpt, state = _checkpoint(tmp_path)
    outs = {}
    for acs in ("mask", "auto"):
        assert main(["infer", "--checkpoint", str(ckpt), "--input", str(in_dir / "c.h5"),
                     "--output", str(tmp_path / acs), "--acs", acs, "--refine", "none"]) == 0
        with h5py.File(tmp_path / acs / "c.h5", "r") as f:
            outs[acs] = f["reconstruction"][()]
    want = _reference_recon(in_dir, state, SMALL)["c.h5"]
    assert _rel(outs["mask"], want) < 1e-5
    assert _rel(outs["auto"], want) > 1e-4

    model = VarNet(**SMALL).eval()
    model.load_state_dict(state)
    with h5py.File(in_dir / "c.h5", "r") as f:
        k = torch.from_numpy(f["kspace"][()])
    with torch.no_grad():
        direct = model(k, torch.from_numpy(mask), 10).numpy()[:, 32:96]  # centre crop 128 → 64
    assert _rel(outs["auto"], direct) < 1e-6


def test_narrow_image_crop_rule(tmp_path):
    """Recon size wider than the image (brain FLAIR case): crop to (W, W)."""
    vol = simulate_volume(num_slices=1, num_coils=4, recon_size=(64, 40), seed=2)
    path = tmp_path / "in" / "narrow.h5"
    path.parent.mkdir()
    write_fastmri(path, vol, mask=equispaced_mask(40, 4, 6), num_low_frequency=6, acceleration=4)
    with h5py.File(path, "a") as f:  # claim a 64x64 recon matrix although the data is 40 wide
        hdr = f["ismrmrd_header"][()].decode()
        del f["ismrmrd_header"]
        f["ismrmrd_header"] = np.bytes_(hdr.replace("<reconSpace><matrixSize><x>64</x><y>40</y>",
                                                    "<reconSpace><matrixSize><x>64</x><y>64</y>"))
    ckpt, _ = _checkpoint(tmp_path)
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(path), "--output", str(tmp_path / "o")]) == 0
    with h5py.File(tmp_path / "o" / "narrow.h5", "r") as f:
        assert f["reconstruction"].shape == (1, 40, 40)


def test_file_without_mask_is_a_clear_error(tmp_path, small_volume, capsys):
    path = tmp_path / "full.h5"
    write_fastmri(path, small_volume)  # train layout: no mask
    ckpt, _ = _checkpoint(tmp_path)
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(path), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "full.h5" in err and "mask" in err
    assert not (tmp_path / "o" / "full.h5").exists()


@pytest.mark.parametrize("damage,expected", [
    ("truncate", "not a readable HDF5"),
    ("no_header", "missing dataset 'ismrmrd_header'"),
    ("real_kspace", "must be complex"),
])
def test_bad_input_files(tmp_path, test_format_file, capsys, damage, expected):
    if damage == "truncate":
        data = test_format_file.read_bytes()
        test_format_file.write_bytes(data[: len(data) // 3])
    else:
        with h5py.File(test_format_file, "a") as f:
            if damage == "no_header":
                del f["ismrmrd_header"]
            else:
                del f["kspace"]
                f["kspace"] = np.zeros((1, 2, 8, 8), np.float32)
    ckpt, _ = _checkpoint(tmp_path)
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(test_format_file),
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert expected in err and test_format_file.name in err


def test_cuda_device_without_gpu_is_an_error(tmp_path, test_format_file, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; this checks the no-GPU error path")
    ckpt, _ = _checkpoint(tmp_path)
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(test_format_file),
                 "--output", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu(tmp_path, test_format_file):
    ckpt, _ = _checkpoint(tmp_path)
    outs = {}
    for dev in ("cpu", "cuda"):
        assert main(["infer", "--checkpoint", str(ckpt), "--input", str(test_format_file),
                     "--output", str(tmp_path / dev), "--device", dev]) == 0
        with h5py.File(tmp_path / dev / test_format_file.name, "r") as f:
            outs[dev] = f["reconstruction"][()]
    assert _rel(outs["cuda"], outs["cpu"]) < 1e-4


def test_workers_side_by_side_give_the_reference_output(tmp_path, small_volume, capsys):
    """Slices reconstructed by several workers at once land in their own places (the output starts as NaN)
    and match one worker (with and without the refine stage) and fastMRI's path; bad counts are refused
    by name."""
    in_dir = tmp_path / "in"
    in_dir.mkdir()
    write_fastmri(in_dir / "a.h5", small_volume, mask=equispaced_mask(48, 4, 8), num_low_frequency=8,
                  acceleration=4)
    ckpt, state = _checkpoint(tmp_path)
    got = {}
    for workers, refine in (("1", "none"), ("3", "none"), ("1", "pi"), ("2", "pi")):
        out_dir = tmp_path / f"out{workers}{refine}"
        assert main(["infer", "--checkpoint", str(ckpt), "--input", str(in_dir), "--output", str(out_dir),
                     "--workers", workers, "--refine", refine]) == 0
        with h5py.File(out_dir / "a.h5", "r") as f:
            got[workers, refine] = f["reconstruction"][()]
    want = _reference_recon(in_dir, state, SMALL)["a.h5"]
    assert np.isfinite(got["3", "none"]).all() and np.isfinite(got["2", "pi"]).all()
    assert _rel(got["3", "none"], got["1", "none"]) < 1e-6 and _rel(got["3", "none"], want) < 1e-5
    assert _rel(got["2", "pi"], got["1", "pi"]) < 1e-6  # the refine stage inside the workers too
    assert _rel(got["2", "pi"], want) > 1e-4  # ... which did run
    for bad in ("0", "two"):
        assert main(["infer", "--checkpoint", str(ckpt), "--input", str(in_dir), "--output",
                     str(tmp_path / "bad"), "--workers", bad]) == 2
        assert "--workers" in capsys.readouterr().err


@pytest.mark.parametrize("forwards, overlap", [(2, True), (1, False)])
def test_engine_runs_as_many_forwards_at_once_as_it_allows(forwards, overlap):
    from gadget.recon.engine import Reconstructor

    engine = Reconstructor(VarNet(**SMALL), "cpu", forwards=forwards)
    inside = threading.Barrier(2, timeout=2)  # passes only when two forwards are inside at once
    met = []

    def forward(kspace, mask, num_low, **_):
        try:
            inside.wait()
            met.append(True)
        except threading.BrokenBarrierError:
            met.append(False)
        return torch.zeros(kspace.shape[0], *kspace.shape[-2:])

    engine.model.forward = forward
    k, m = np.zeros((1, 2, 8, 8), np.complex64), np.ones(8, bool)
    threads = [threading.Thread(target=engine, args=(k, m, 4)) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert met == [overlap, overlap]
    assert engine.with_model(VarNet(**SMALL)).forwards == forwards
    with pytest.raises(ValueError, match="forwards"):
        Reconstructor(VarNet(**SMALL), "cpu", forwards=0)
