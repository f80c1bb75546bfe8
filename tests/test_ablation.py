"""``varnet ablate``: the ACS scaling rule, the fixed-maps cache, training with fixed
maps, and a tiny end-to-end run of all four variants that writes Tables 1–2 and Fig. 3."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from gadget.converters.simulate import simulate_volume, write_fastmri
from gadget.cli import main
from gadget.evaluation.ablation import Setting, load, scaled_acs, variant_config
from gadget.model.checkpoint import load_checkpoint
from gadget.mri.masks import MaskSpec
from gadget.train.config import TrainConfigError, build_config
from gadget.train.data import FixedMapsCache, SliceDataset, collate

TINY = {"num_cascades": 1, "chans": 4, "pools": 1, "sens_chans": 2, "sens_pools": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """train/ (2 volumes), val/ (1), test/ (2): 2 slices, 4 coils, 64×64 images (k-space 128×64)."""
    root = tmp_path_factory.mktemp("ablation_data")
    for sub, seeds in (("train", (21, 22)), ("val", (23,)), ("test", (24, 25))):
        (root / sub).mkdir()
        for seed in seeds:
            write_fastmri(root / sub / f"sim_{seed}.h5",
                          simulate_volume(num_slices=2, num_coils=4, recon_size=(64, 64), seed=seed))
    return root


# ----------------------------------------------------------------------------- ACS rule


def test_scaled_acs_matches_hand_computed_values():
    # 368 columns: the seed's counts unchanged
    assert [scaled_acs(l, 368) for l in (30, 22, 16)] == [30, 22, 16]
    # 128 columns: 30·128/368 = 10.43 → 10; 22 → 7.65 → 8; 16 → 5.57 → 6; 12 → 4.17 → 4;
    # 8 → 2.78 → 3, raised to the floor of 4
    assert [scaled_acs(l, 128) for l in (30, 22, 16, 12, 8)] == [10, 8, 6, 4, 4]
    # 184 columns (half): exact halves
    assert [scaled_acs(l, 184) for l in (30, 22, 16, 8)] == [15, 11, 8, 4]
    # 224 columns: 18.26 → 18, 13.39 → 13, 9.74 → 10
    assert [scaled_acs(l, 224) for l in (30, 22, 16)] == [18, 13, 10]
    assert scaled_acs(8, 128, minimum=2) == 3


def test_equispaced_setting_mask_has_scaled_acs_block_and_spacing():
    mask, num_low = Setting("equispaced", 4, acs=30).mask(128, "file_a.h5")
    assert num_low == 10
    start = (128 - 10 + 1) // 2
    assert mask[start:start + 10].all()
    outer = np.flatnonzero(mask)
    outer = outer[(outer < start) | (outer >= start + 10)]
    assert set(np.diff(outer) % 4) == {0}  # every 4th column outside the centre
    again, _ = Setting("equispaced", 4, acs=30).mask(128, "file_a.h5")
    assert np.array_equal(mask, again)  # seeded by the file name: the same for every variant
    rmask, rlow = Setting("random", 8, center_fraction=0.04).mask(128, "file_a.h5")
    assert rlow == round(128 * 0.04) and rmask.sum() < 128 / 4


# ----------------------------------------------------------------------------- maps cache


class CountingMaps:
    """A stand-in for ESPIRiT: records each (num_low, ACS columns) call, returns normalised maps."""

    def __init__(self):
        self.calls = []

    def __call__(self, kspace, mask, num_low):
        self.calls.append((int(num_low), tuple(np.flatnonzero(np.any(kspace != 0, axis=(0, 1))))))
        coils = kspace.shape[0]
        return np.full(kspace.shape, 1 / np.sqrt(coils), np.complex64)


def test_maps_cache_computes_once_per_file_slice_and_acs(data, tmp_path):
    fake = CountingMaps()
    cache = FixedMapsCache(tmp_path / "maps", memory_mb=64, compute=fake)
    spec = MaskSpec("random", [0.08, 0.04], [4, 8])
    ds = SliceDataset([data / "train"], spec, fixed_masks=False, seed=3, maps=cache)
    keys = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            sample = ds[index]
            keys.add((sample.fname, sample.slice_num, sample.num_low_frequencies))
            assert sample.sens_maps.shape == sample.masked_kspace.shape
    assert len(fake.calls) == len(keys) < 3 * len(ds)   # each (file, slice, ACS) once
    for num_low, columns in fake.calls:   # ESPIRiT saw the ACS block only
        assert len(columns) == num_low
    # a fresh process (empty memory) reads the disk cache: no new computation
    fresh = FixedMapsCache(tmp_path / "maps", memory_mb=0, compute=fake)
    ds2 = SliceDataset([data / "train"], spec, fixed_masks=False, seed=3, maps=fresh)
    ds2.set_epoch(0)
    sample = ds2[0]
    assert len(fake.calls) == len(keys) and fresh.disk_hits == 1
    assert torch.allclose(sample.sens_maps, torch.full_like(sample.sens_maps, 0.5))
    batch = collate([ds2[0], ds2[1]])
    assert batch.sens_maps.shape == (2, *sample.masked_kspace.shape)


def test_maps_cache_real_espirit_is_normalised(data):
    cache = FixedMapsCache(None)
    ds = SliceDataset([data / "test"], MaskSpec("equispaced", [0.125], [4]), fixed_masks=True, maps=cache)
    maps = ds[0].sens_maps
    energy = (maps.abs() ** 2).sum(0)
    inside = energy > 0.5
    assert inside.float().mean() > 0.05 and torch.allclose(energy[inside], torch.ones(()), atol=1e-3)
    ds[0]
    assert cache.computed == 1 and cache.memory_hits == 1


def test_evaluation_reports_failed_maps_as_nan(data, tmp_path):
    from gadget.evaluation.ablation import evaluate_variant
    from gadget.model.varnet import VarNet

    def no_signal(kspace, mask, num_low):
        raise ValueError("ESPIRiT found no signal")

    files = sorted((data / "test").glob("*.h5"))[:1]
    settings = [Setting("equispaced", 4, acs=30)]
    model = VarNet(**TINY, variant="vnu-k")
    bad = evaluate_variant(model, settings, files, FixedMapsCache(None, compute=no_signal), max_slices=1,
                           progress=lambda line: None)
    score = bad["scores"][settings[0].key]
    assert np.isnan(score["ssim"]) and "no signal" in score["failed"][0] and score["volumes"] == 0
    good = evaluate_variant(model, settings, files, FixedMapsCache(None), max_slices=1, progress=lambda line: None)
    assert 0 < good["scores"][settings[0].key]["ssim"] <= 1 and good["scores"][settings[0].key]["slices"] == 1


# ----------------------------------------------------------------------------- config


def test_variant_passes_through_config_and_is_validated(tmp_path):
    cfg = build_config({"model": {**TINY, "variant": "vnu-k"}})
    assert cfg.model.variant == "vnu-k" and cfg.to_dict()["model"]["variant"] == "vnu-k"
    with pytest.raises(TrainConfigError, match="variant"):
        build_config({"model": {"variant": "unet"}})
    with pytest.raises(TrainConfigError, match="activation_checkpointing"):
        build_config({"model": {"variant": "vn"}, "run": {"activation_checkpointing": True}})
    # the ablation section is ignored by the training config, read by varnet ablate
    assert build_config({"ablation": {"test_dirs": ["x"]}}) == build_config({})


# ----------------------------------------------------------------------------- end to end


def _write_config(data, tmp_path, variants) -> str:
    config = {
        "ablation": {"test_dirs": [str(data / "test")], "variants": variants, "runs_dir": str(tmp_path / "runs"),
                     "max_slices": 1, "sweep_accelerations": [4], "sweep_acs": [16, 30],
                     "models": {"vn": {"num_cascades": 2}}},
        "model": TINY,
        "data": {"train_dirs": [str(data / "train")], "val_dirs": [str(data / "val")],
                 "mask": "random", "center_fractions": [0.08], "accelerations": [4], "num_workers": 0},
        "optim": {"epochs": 1, "lr": 1e-3},
        "run": {"max_steps_per_epoch": 2, "log_every": 1, "tensorboard": False, "device": "cpu"},
    }
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_variant_configs_share_the_recipe(data, tmp_path):
    spec, sections, overrides = load(_write_config(data, tmp_path, ["vn", "e2e"]), ["optim.lr=2e-3"])
    vn, e2e = (variant_config(spec, sections, overrides, v) for v in ("vn", "e2e"))
    assert (vn.model.variant, e2e.model.variant) == ("vn", "e2e")
    assert vn.model.num_cascades == 2 and e2e.model.num_cascades == 1        # ablation.models
    assert vn.optim == e2e.optim and vn.optim.lr == 2e-3 and vn.data == e2e.data
    assert vn.data.maps_cache == str(tmp_path / "runs" / "maps_cache")
    assert vn.run.out_dir != e2e.run.out_dir


def test_ablate_end_to_end_writes_tables_and_figure(data, tmp_path, capsys):
    variants = ["e2e", "vnu-k", "vnu", "vn"]
    config = _write_config(data, tmp_path, variants)
    out = tmp_path / "out"
    assert main(["ablate", "--config", config, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "[ablate] evaluating vn" in err and "training in" in err

    result = json.loads((out / "ablation.json").read_text())
    assert result["variants"] == ["vn", "vnu", "vnu-k", "e2e"]   # the seed's order
    for v in variants:
        r = result["results"][v]
        assert r["training"]["steps"] == 2 and r["parameters"] > 0 and r["seconds_per_slice"] > 0
        for key in result["table1"] + result["table2"]:
            assert 0 < r["scores"][key]["ssim"] <= 1 and r["scores"][key]["volumes"] == 2
    assert result["results"]["e2e"]["fixed_maps"] is False and result["results"]["vn"]["fixed_maps"] is True
    assert result["espirit"]["computed"] > 0

    md = (out / "ablation.md").read_text()
    for title in ("Table 1: equispaced", "Table 2: random"):
        table = md.split(title)[1].split("##")[0]
        rows = [line for line in table.splitlines() if line.startswith("|")]
        assert rows[0] == ("| model | 4×, 30 ACS | 6×, 22 ACS | 8×, 16 ACS |" if "equi" in title
                           else "| model | 4×, 0.08 | 6×, 0.06 | 8×, 0.04 |")
        assert [r.split("|")[1].strip() for r in rows[2:]] == ["VN", "VNU", "VNU-K", "E2E-VN"]
        assert all(len(r.strip("|").split("|")) == 4 for r in rows)   # model + one column per setting
    assert (out / "fig3_acs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the variant is recorded in the checkpoint (config and description), so it reloads as trained
    runs = tmp_path / "runs"
    assert load_checkpoint(runs / "vnu-k" / "final.pt").config.variant == "vnu-k"
    saved = torch.load(runs / "vn" / "final.pt", map_location="cpu", weights_only=True)
    assert saved["config"]["variant"] == "vn" and saved["description"]["variant"] == "vn"
    assert any((runs / "maps_cache").glob("sim_2[45]-*.npy"))   # test-set maps cached with the training ones

    # a second run skips training (the checkpoints exist with the same config); an unfinished one resumes
    assert main(["ablate", "--config", config, "--out", str(tmp_path / "again"), "--variants", "e2e"]) == 0
    assert "skipping training" in capsys.readouterr().err
    (runs / "e2e" / "final.pt").unlink()
    assert main(["ablate", "--config", config, "--out", str(tmp_path / "again"), "--variants", "e2e"]) == 0
    assert "e2e: resuming" in capsys.readouterr().err and (runs / "e2e" / "final.pt").exists()


def test_cli_help_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    text = capsys.readouterr().out
    assert "example:" in text and "varnet ablate --config" in text.split("example:")[1]
    assert main(["ablate", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"ablation": {"test_dirs": ["x"], "variants": ["unet"]}}))
    assert main(["ablate", "--config", str(bad)]) == 2
    assert "ablation.variants" in capsys.readouterr().err
    # the shipped recipe is a valid training config too (its ablation section is ignored there)
    assert main(["train", "--config", "ablation", "--print-config"]) == 0
    assert "variant: e2e" in capsys.readouterr().out
