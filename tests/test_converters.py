"""fastMRI ⇄ ISMRMRD converters: exact round trips, real-tool files, oracle loads, bad input."""
import shutil
import subprocess
import xml.etree.ElementTree as ET

import h5py
import ismrmrd
import numpy as np
import pytest

from gadget.converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd, file_seed
from gadget.converters.ismrmrd_to_fastmri import convert_ismrmrd_to_fastmri
from gadget.converters.simulate import simulate_volume, write_fastmri
from gadget.cli import main
from gadget.data.mrd_file import MrdFileError, has_flag, iter_acquisitions, read_header_xml
from gadget.data.mrd_header import parse_encoding
from tests.conftest import equispaced_mask
from tests.mrd_builders import header, write_raw


def _read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def _canonical_without(xml, drop=("parallelImaging", "slice")):
    root = ET.fromstring(xml.encode() if isinstance(xml, str) else xml)
    for parent in root.iter():
        for child in list(parent):
            if child.tag.split("}")[-1] in drop:
                parent.remove(child)
    return ET.canonicalize(ET.tostring(root), strip_text=True)


def _heads(path):
    return np.concatenate([c.heads for c in iter_acquisitions(path)])


def test_test_format_round_trip_is_exact(tmp_path, test_format_file):
    mrd, back = tmp_path / "raw.h5", tmp_path / "back.h5"
    convert_fastmri_to_ismrmrd(test_format_file, mrd)
    assert convert_ismrmrd_to_fastmri(mrd, back) == [back]
    (orig, orig_attrs), (new, new_attrs) = _read(test_format_file), _read(back)
    mask = orig["mask"].astype(bool)
    np.testing.assert_array_equal(new["mask"].astype(bool), mask)
    assert new["kspace"].dtype == np.complex64
    # bitwise on acquired samples (compare raw bytes, so -0.0 / NaN payloads would also count)
    assert new["kspace"][..., mask].tobytes() == orig["kspace"][..., mask].tobytes()
    assert not new["kspace"][..., ~mask].any()
    assert new_attrs == orig_attrs
    # header: every element preserved except the two the converter documents it sets
    assert _canonical_without(new["ismrmrd_header"]) == _canonical_without(orig["ismrmrd_header"])
    assert parse_encoding(new["ismrmrd_header"]).padding == parse_encoding(orig["ismrmrd_header"]).padding


def test_full_file_with_mask_matches_fastmri_mask_and_flags(tmp_path, small_volume):
    from fastmri.data.subsample import EquispacedMaskFractionFunc

    src, mrd = tmp_path / "file_brain_001.h5", tmp_path / "raw.h5"
    write_fastmri(src, small_volume)
    plan = convert_fastmri_to_ismrmrd(src, mrd, "equispaced-fraction", 4, 0.16)
    want, num_low = EquispacedMaskFractionFunc([0.16], [4])((1, 128, 48, 2), seed=file_seed(src))
    np.testing.assert_array_equal(plan.acquired, want.numpy().reshape(-1).astype(bool))
    assert plan.num_low == num_low

    heads = _heads(mrd)
    cols = np.flatnonzero(plan.acquired)
    assert len(heads) == 3 * len(cols)
    for s in range(3):
        h = heads[heads["idx"]["slice"] == s]
        np.testing.assert_array_equal(h["idx"]["kspace_encode_step_1"], cols)  # padding_left = 0 here
        assert has_flag(h["flags"][0], 7) and has_flag(h["flags"][-1], 8)
        assert has_flag(h["flags"], 7).sum() == 1 and has_flag(h["flags"], 8).sum() == 1
        assert bool(has_flag(h["flags"][-1], 25)) == (s == 2)
        assert np.all(h["number_of_samples"] == 128) and np.all(h["center_sample"] == 64)
        assert np.all(h["active_channels"] == 6)
        assert np.allclose(h["slice_dir"], (0, 0, 1)) and np.allclose(h["read_dir"], (1, 0, 0))
    calib = plan.calibration[cols]
    imaging = plan.imaging[cols]
    h0 = heads[heads["idx"]["slice"] == 0]
    np.testing.assert_array_equal(has_flag(h0["flags"], 20), calib & ~imaging)
    np.testing.assert_array_equal(has_flag(h0["flags"], 21), calib & imaging)
    assert (has_flag(h0["flags"], 20) | has_flag(h0["flags"], 21)).sum() == num_low
    # the header passes the strict ismrmrd parser and says what was done
    hdr = ismrmrd.xsd.CreateFromDocument(read_header_xml(mrd))
    pi = hdr.encoding[0].parallelImaging
    assert pi.accelerationFactor.kspace_encoding_step_1 == 4 and pi.calibrationMode.value == "embedded"
    assert hdr.encoding[0].encodingLimits.slice.maximum == 2
    # the ismrmrd library reads our data back (independent reader)
    ds = ismrmrd.Dataset(str(mrd), "dataset", create_if_needed=False)
    acq = ds.read_acquisition(1)
    ds.close()
    with h5py.File(src, "r") as f:
        np.testing.assert_array_equal(acq.data, f["kspace"][0, :, :, cols[1]])


def test_full_file_without_mask_is_fully_sampled_and_round_trips(tmp_path, small_volume):
    src, mrd, back = tmp_path / "full.h5", tmp_path / "raw.h5", tmp_path / "back.h5"
    write_fastmri(src, small_volume)
    plan = convert_fastmri_to_ismrmrd(src, mrd)
    assert plan.fully_sampled and len(_heads(mrd)) == 3 * 48
    convert_ismrmrd_to_fastmri(mrd, back)
    (orig, orig_attrs), (new, new_attrs) = _read(src), _read(back)
    assert "mask" not in new
    assert new["kspace"].tobytes() == orig["kspace"].tobytes()
    np.testing.assert_allclose(new["reconstruction_rss"], orig["reconstruction_rss"], rtol=1e-5,
                               atol=1e-6 * orig["reconstruction_rss"].max())
    assert new_attrs == orig_attrs


def test_fastmri_oracle_loads_converted_files(tmp_path, test_format_file):
    import fastmri.data.transforms as T
    from fastmri.data import SliceDataset

    mrd, out_dir = tmp_path / "raw.h5", tmp_path / "out"
    out_dir.mkdir()
    convert_fastmri_to_ismrmrd(test_format_file, mrd)
    convert_ismrmrd_to_fastmri(mrd, out_dir / "conv.h5")
    data = SliceDataset(root=out_dir, transform=T.VarNetDataTransform(), challenge="multicoil")
    assert len(data) == 3
    sample = data[1]
    assert tuple(sample.masked_kspace.shape) == (6, 128, 48, 2)
    assert int(sample.mask.sum()) == int(equispaced_mask(48, 4, 8).sum())
    assert tuple(sample.crop_size) == (64, 48)


def test_noise_scan_round_trip(tmp_path):
    vol = simulate_volume(num_slices=1, num_coils=4, recon_size=(16, 12), seed=3)
    src = tmp_path / "n.h5"
    write_fastmri(src, vol)
    with h5py.File(src, "a") as f:
        f["noise"] = vol.noise[:, :40]  # 40 samples → acquisitions of 32 + 8
    mrd, back = tmp_path / "raw.h5", tmp_path / "back.h5"
    convert_fastmri_to_ismrmrd(src, mrd)
    heads = _heads(mrd)
    noise = has_flag(heads["flags"], 19)
    assert noise[:2].all() and noise.sum() == 2 and heads["number_of_samples"][1] == 8
    convert_ismrmrd_to_fastmri(mrd, back)
    np.testing.assert_array_equal(_read(back)[0]["noise"], vol.noise[:, :40])


def test_averages_are_averaged_and_repetitions_split(tmp_path):
    xml = header(readout=8, width=4, coils=2)
    lines = [dict(e1=c, samples=8, channels=2, average=a, repetition=r)
             for r in (0, 1) for a in (0, 1) for c in range(4)]
    datas = write_raw(tmp_path / "raw.h5", xml, lines)
    written = convert_ismrmrd_to_fastmri(tmp_path / "raw.h5", tmp_path / "out.h5")
    assert [p.name for p in written] == ["out_rep0.h5", "out_rep1.h5"]
    k1 = _read(written[1])[0]["kspace"]
    want = (datas[8 + 2] + datas[12 + 2]) / 2  # repetition 1, line 2, averages 0 and 1
    np.testing.assert_allclose(k1[0, :, :, 2], want, rtol=1e-6)


def test_asymmetric_echo_placed_by_center_sample(tmp_path):
    xml = header(readout=16, width=4, coils=1)
    lines = [dict(e1=c, samples=12, channels=1, center_sample=4) for c in range(4)]
    datas = write_raw(tmp_path / "raw.h5", xml, lines)
    (out,) = convert_ismrmrd_to_fastmri(tmp_path / "raw.h5", tmp_path / "out.h5")
    k = _read(out)[0]["kspace"]
    np.testing.assert_array_equal(k[0, 0, 4:16, 1], datas[1][0])  # sample 4 lands on row 16 // 2 = 8
    assert not k[0, 0, :4].any()


@pytest.mark.skipif(shutil.which("ismrmrd_generate_cartesian_shepp_logan") is None,
                    reason="Debian ismrmrd-tools not installed (apt-get install ismrmrd-tools; .ci/run does)")
def test_shepp_logan_file_from_ismrmrd_tools(tmp_path):
    raw = tmp_path / "sl.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-o", str(raw), "-m", "64", "-c", "4",
                    "-a", "2", "-w", "16", "-C"], check=True, capture_output=True, cwd=tmp_path)
    written = convert_ismrmrd_to_fastmri(raw, tmp_path / "sl_fastmri.h5")
    ds = ismrmrd.Dataset(str(raw), "dataset", create_if_needed=False)
    acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    ds.close()
    reps = sorted({a.idx.repetition for a in acqs if not a.is_flag_set(19)})
    assert len(reps) >= 2 and len(written) == len(reps)  # each repetition its own volume
    noise = [a for a in acqs if a.is_flag_set(19)]
    for rep, path in enumerate(written):
        data, attrs = _read(path)
        assert data["kspace"].shape == (1, 4, 128, 64)
        assert attrs["num_low_frequency"] == 16 and attrs["acceleration"] == 2.0
        rep_acqs = [a for a in acqs if not a.is_flag_set(19) and a.idx.repetition == rep]
        lines = sorted({a.idx.kspace_encode_step_1 for a in rep_acqs})
        np.testing.assert_array_equal(np.flatnonzero(data["mask"]), lines)
        for a in rep_acqs[:5]:
            np.testing.assert_array_equal(data["kspace"][0, :, :, a.idx.kspace_encode_step_1], a.data)
        np.testing.assert_array_equal(data["noise"], np.concatenate([a.data for a in noise], axis=1))
    # and a fully sampled file from the same tool goes to train layout with an RSS target
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-o", str(tmp_path / "full.h5"), "-m", "32",
                    "-c", "2"], check=True, capture_output=True, cwd=tmp_path)
    (full,) = convert_ismrmrd_to_fastmri(tmp_path / "full.h5", tmp_path / "full_fastmri.h5")
    data, attrs = _read(full)
    assert data["reconstruction_rss"].shape == (1, 32, 32) and attrs["max"] > 0


def test_cli_round_trip_and_options(tmp_path, small_volume, capsys):
    src = tmp_path / "a.h5"
    write_fastmri(src, small_volume)
    assert main(["convert", "fastmri-to-ismrmrd", str(src), str(tmp_path / "r.h5"), "--mask", "random",
                 "--acceleration", "4", "--center-fraction", "0.08", "--seed", "5"]) == 0
    assert main(["convert", "ismrmrd-to-fastmri", str(tmp_path / "r.h5"), str(tmp_path / "b.h5")]) == 0
    assert _read(tmp_path / "b.h5")[1]["num_low_frequency"] == 4  # round(48 * 0.08)
    assert main(["convert", "fastmri-to-ismrmrd", str(src), str(tmp_path / "x.h5"), "--mask", "random"]) == 2
    assert "--acceleration" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input

def _corrupt_header(path):
    with h5py.File(path, "a") as f:
        del f["dataset/xml"]
        ds = f["dataset"].create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        ds[0] = b"<ismrmrdHeader><encoding><oops"


BAD_RAW = {
    "channels change": ([dict(e1=0), dict(e1=1, channels=4)], "acquisition 1 has active_channels=4"),
    "samples change": ([dict(e1=0), dict(e1=1, samples=16)], "acquisition 1 has number_of_samples=16"),
    "zero-length": ([dict(e1=0, samples=0)], "acquisition 0 has zero number_of_samples"),
    "e1 beyond limits": ([dict(e1=0), dict(e1=99)], "kspace_encode_step_1=99 outside"),
    "compressed": ([dict(e1=0, flags=(53,))], "compressed payload"),
    "only noise": ([dict(e1=0, flags=(19,))], "no imaging acquisitions"),
}


@pytest.mark.parametrize("case", sorted(BAD_RAW))
def test_bad_raw_files_name_file_and_item(tmp_path, case):
    lines, expected = BAD_RAW[case]
    raw = tmp_path / "bad.h5"
    write_raw(raw, header(), lines)
    out = tmp_path / "out.h5"
    with pytest.raises(MrdFileError) as info:
        convert_ismrmrd_to_fastmri(raw, out)
    assert expected in str(info.value) and "bad.h5" in str(info.value)
    assert list(tmp_path.iterdir()) == [raw]  # nothing written, no partial file left


@pytest.mark.parametrize("damage,expected", [
    ("truncate", "not a readable HDF5"),
    ("no group", "no ISMRMRD group 'dataset'"),
    ("no data", "has no acquisitions"),
    ("garbage header", "not valid XML"),
    ("no encoding", "lacks field 'encoding'"),
])
def test_damaged_raw_files(tmp_path, damage, expected, capsys):
    raw = tmp_path / "bad.h5"
    write_raw(raw, header(), [dict(e1=0), dict(e1=1)])
    if damage == "truncate":
        raw.write_bytes(raw.read_bytes()[:800])
    elif damage == "garbage header":
        _corrupt_header(raw)
    else:
        with h5py.File(raw, "a") as f:
            if damage == "no group":
                f.move("dataset", "other")
            elif damage == "no data":
                del f["dataset/data"]
            else:
                del f["dataset/xml"]
                ds = f["dataset"].create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
                ds[0] = b'<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><version>2</version></ismrmrdHeader>'
    assert main(["convert", "ismrmrd-to-fastmri", str(raw), str(tmp_path / "out.h5")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "bad.h5" in err and "Traceback" not in err
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.parametrize("damage,expected", [
    ("missing kspace", "missing dataset 'kspace'"),
    ("rank 3", "got rank 3"),
    ("real dtype", "must be complex"),
    ("empty", "is empty"),
])
def test_bad_fastmri_inputs(tmp_path, test_format_file, damage, expected, capsys):
    with h5py.File(test_format_file, "a") as f:
        del f["kspace"]
        if damage == "rank 3":
            f["kspace"] = np.zeros((2, 8, 8), np.complex64)
        elif damage == "real dtype":
            f["kspace"] = np.zeros((1, 2, 8, 8), np.float32)
        elif damage == "empty":
            f["kspace"] = np.zeros((0, 2, 8, 48), np.complex64)
    out = tmp_path / "out.h5"
    assert main(["convert", "fastmri-to-ismrmrd", str(test_format_file), str(out)]) == 2
    err = capsys.readouterr().err
    assert expected in err and test_format_file.name in err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_failure_mid_write_leaves_no_output(tmp_path, small_volume, monkeypatch):
    import gadget.converters.fastmri_to_ismrmrd as f2i

    src = tmp_path / "a.h5"
    write_fastmri(src, small_volume)
    calls = {"n": 0}
    real = f2i._line_heads

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(f2i, "_line_heads", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        convert_fastmri_to_ismrmrd(src, tmp_path / "out.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]


def test_converters_stream_with_bounded_memory(tmp_path):
    """fastMRI → ISMRMRD holds one slice at a time; ISMRMRD → fastMRI one volume plus one chunk
    (numpy allocations are visible to tracemalloc)."""
    import tracemalloc

    vol = simulate_volume(num_slices=8, num_coils=4, recon_size=(64, 48), seed=1)
    src, mrd = tmp_path / "big.h5", tmp_path / "raw.h5"
    write_fastmri(src, vol)
    slice_bytes = vol.kspace[0].nbytes
    volume_bytes = vol.kspace.nbytes
    tracemalloc.start()
    convert_fastmri_to_ismrmrd(src, mrd)
    _, peak_forward = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    convert_ismrmrd_to_fastmri(mrd, tmp_path / "back.h5", chunk_size=64)
    _, peak_back = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_forward < 4 * slice_bytes < volume_bytes
    assert peak_back < 2.5 * volume_bytes
