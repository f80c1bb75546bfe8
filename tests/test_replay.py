"""Replay door: ISMRMRD files through the streaming pipeline give the same images as fastMRI-style
inference on the same data, and work on files from other tools."""
import shutil
import subprocess

import h5py
import numpy as np
import pytest
import torch

from gadget.converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd
from gadget.cli import main
from gadget.model.checkpoint import save_checkpoint
from gadget.model.varnet import VarNet
from gadget.stream.images import image_magnitude
from gadget.stream.sinks import read_images_h5

SMALL = dict(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2)


def _magnitudes(images):
    return np.stack([image_magnitude(im) for im in images])


def test_replay_equals_infer_on_the_same_scan(tmp_path, test_format_file):
    torch.manual_seed(3)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, VarNet(**SMALL))
    raw = tmp_path / "raw.h5"
    convert_fastmri_to_ismrmrd(test_format_file, raw)
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(test_format_file),
                 "--output", str(tmp_path / "inf")]) == 0
    with h5py.File(tmp_path / "inf" / test_format_file.name, "r") as f:
        want = f["reconstruction"][()]
    yaml_cfg = tmp_path / "noprewhiten.yaml"
    yaml_cfg.write_text("prewhiten: false\nfallback: none\n")  # the fastMRI path does not prewhiten nor check
    assert main(["replay", str(raw), str(tmp_path / "img.h5"), "--config", str(yaml_cfg),
                 "--checkpoint", str(ckpt), "--png", str(tmp_path / "png")]) == 0
    (series,) = read_images_h5(tmp_path / "img.h5").values()
    got = _magnitudes(series)
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    assert len(list((tmp_path / "png").glob("*.png"))) == 3


@pytest.mark.skipif(shutil.which("ismrmrd_generate_cartesian_shepp_logan") is None,
                    reason="Debian ismrmrd-tools not installed (apt-get install ismrmrd-tools; .ci/run does)")
def test_replay_shepp_logan_from_ismrmrd_tools(tmp_path, capsys):
    raw = tmp_path / "sl.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-o", str(raw), "-m", "64", "-c", "4", "-a", "2",
                    "-w", "16", "-C"], check=True, capture_output=True, cwd=tmp_path)
    assert main(["replay", str(raw), str(tmp_path / "out.h5"), "--config", "zero-filled",
                 "--dicom", str(tmp_path / "dcm")]) == 0
    groups = read_images_h5(tmp_path / "out.h5")
    (key,) = groups
    assert key == "sl/image_2"  # group = input stem, series from the zero-filled preset
    images = groups[key]
    reps = sorted(im.repetition for im in images)
    assert reps == list(range(len(images))) and len(images) >= 2
    for im in images:  # all-zero geometry in the file → defaults
        assert tuple(im.read_dir) == (1.0, 0.0, 0.0) and tuple(im.phase_dir) == (0.0, 1.0, 0.0)
        assert np.asarray(im.data).shape == (1, 1, 64, 64)
    assert len(list((tmp_path / "dcm").glob("*.dcm"))) == len(images)


def test_replay_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    assert main(["replay", str(bad), str(tmp_path / "o.h5"), "--config", "zero-filled"]) == 2
    err = capsys.readouterr().err
    assert "bad.h5" in err and "Traceback" not in err
    assert main(["replay", str(bad), str(tmp_path / "o.h5"), "--config", "no-such-preset"]) == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err


def test_replay_synth_ismrmrd_file(tmp_path):
    """`varnet synth --format ismrmrd` output (noise scan + undersampled lines) replays slice for slice."""
    assert main(["synth", str(tmp_path / "raw"), "--source", "phantom", "--slices", "3", "--coils", "4",
                 "--matrix", "32", "--format", "ismrmrd", "--acceleration", "4", "--mask", "equispaced-fraction",
                 "--center-fraction", "0.125"]) == 0
    (raw,) = sorted((tmp_path / "raw").glob("*.h5"))
    assert main(["replay", str(raw), str(tmp_path / "img.h5"), "--config", "zero-filled"]) == 0
    (images,) = read_images_h5(tmp_path / "img.h5").values()
    assert [im.slice for im in images] == [0, 1, 2]
    assert all(np.asarray(im.data).shape == (1, 1, 32, 32) for im in images)


def test_replay_output_carries_the_scan_header_as_ismrmrd_writes_it(tmp_path, test_format_file):
    """/<group>/xml: the input's header, stored as ismrmrd.Dataset.write_xml_header stores it (the
    layout python-ismrmrd-server's client writes), and read back by the ismrmrd package."""
    import ismrmrd

    from gadget.data.mrd_file import read_header_xml

    raw = tmp_path / "raw.h5"
    convert_fastmri_to_ismrmrd(test_format_file, raw)
    out = tmp_path / "img.h5"
    assert main(["replay", str(raw), str(out), "--config", "zero-filled", "--out-group", "scan"]) == 0
    want = read_header_xml(raw)
    reference = tmp_path / "reference.h5"  # the layout the ismrmrd package itself writes
    with ismrmrd.Dataset(str(reference), "scan", create_if_needed=True) as dset:
        dset.write_xml_header(want.encode("utf-8"))
    with h5py.File(out, "r") as ours, h5py.File(reference, "r") as theirs:
        mine, ref = ours["scan/xml"], theirs["scan/xml"]
        assert mine.shape == ref.shape == (1,)
        assert h5py.check_string_dtype(mine.dtype) == h5py.check_string_dtype(ref.dtype) is not None
        assert mine[0] == ref[0]
        assert {"xml", "image_2"} <= set(ours["scan"].keys())  # images stay where they were
    with ismrmrd.Dataset(str(out), "scan", mode="r") as dset:
        assert dset.read_xml_header().decode("utf-8") == want
    with ismrmrd.File(str(out), mode="r") as f:  # the strict header parser of ismrmrd 1.15
        header = f["scan"].header
        assert header is not None
        assert header.encoding[0].encodedSpace.matrixSize.x == ismrmrd.xsd.CreateFromDocument(want).encoding[0] \
            .encodedSpace.matrixSize.x
    assert set(read_images_h5(out)) == {"scan/image_2"}


def test_replay_workers_side_by_side_send_the_same_images_in_order(tmp_path, test_format_file, capsys):
    """Slices reconstructed by several workers at once (network, refine, safety check with its re-run)
    come out as one worker sends them: the same images, numbers, meta and second series, in stream order;
    the config refuses a count below one by name."""
    import ismrmrd

    torch.manual_seed(3)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, VarNet(**SMALL))
    raw = tmp_path / "raw.h5"
    convert_fastmri_to_ismrmrd(test_format_file, raw)
    cfg = tmp_path / "both.yaml"
    cfg.write_text("also_send: zero-filled\n")
    sent = {}
    for workers in ("1", "3"):
        out = tmp_path / f"img{workers}.h5"
        assert main(["replay", str(raw), str(out), "--config", str(cfg), "--checkpoint", str(ckpt),
                     "--refine", "pi", "--workers", workers]) == 0
        sent[workers] = read_images_h5(out)
    assert sent["1"].keys() == sent["3"].keys() and len(sent["1"]) == 2  # the network's and the zero-filled series
    for name, one in sent["1"].items():
        many = sent["3"][name]
        assert [(im.image_index, im.slice) for im in many] == [(im.image_index, im.slice) for im in one]
        assert len(one) == 3
        np.testing.assert_allclose(_magnitudes(many), _magnitudes(one), rtol=0, atol=1e-6 * _magnitudes(one).max())
        for a, b in zip(one, many):
            meta_a, meta_b = (ismrmrd.Meta.deserialize(im.attribute_string) for im in (a, b))
            assert meta_a.get("VarNetSafety") == meta_b.get("VarNetSafety")
            assert meta_a.get("ImageComments") == meta_b.get("ImageComments")
            assert meta_b.get("VarNetOutput") in ("E2E-VarNet", "zero-filled RSS")
    network = next(ims for ims in sent["3"].values()
                   if ismrmrd.Meta.deserialize(ims[0].attribute_string).get("VarNetOutput") == "E2E-VarNet")
    assert all(ismrmrd.Meta.deserialize(im.attribute_string).get("VarNetSafety") == "pass" for im in network)
    assert main(["replay", str(raw), str(tmp_path / "bad.h5"), "--checkpoint", str(ckpt), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
