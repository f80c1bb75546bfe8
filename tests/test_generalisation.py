"""Generalisation matrix: spec checks, seen/held-out labels, layout, and the script end to end."""
import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gadget.converters.simulate import simulate_volume, write_fastmri
from gadget.evaluation import EvaluationError, Undersample, compare_methods
from gadget.evaluation.generalisation import (HELD_OUT, SEEN, EvalSet, ModelSpec, load_spec, matrix_markdown,
                                              parse_spec, training_label, unseen_factors)
from gadget.model.checkpoint import save_checkpoint
from gadget.model.varnet import VarNet

ROOT = Path(__file__).resolve().parents[1]


def _spec(**over):
    spec = {"models": {"m": {"checkpoint": "shipped", "trained_on": {"sources": ["mni"]}}},
            "test_sets": {"t": {"path": "x", "source": "mni"}},
            "accelerations": [{"acceleration": 4, "center_fraction": 0.08}]}
    spec.update(over)
    return spec


def test_training_labels_and_unseen_factors():
    model = ModelSpec("m", "m.pt", ("MNI", "colin"), coils=("loops-8",), contrasts=("t1w",))
    assert training_label(model, EvalSet("a", Path("a"), "mni")) == SEEN  # case-insensitive
    assert training_label(model, EvalSet("b", Path("b"), "colin")) == SEEN
    assert training_label(model, EvalSet("c", Path("c"), "inia")) == HELD_OUT
    assert training_label(model, EvalSet("d", Path("d"), "mni-colin")) == HELD_OUT  # no substring matches
    assert unseen_factors(model, EvalSet("e", Path("e"), "mni", coils="loops-8", contrast="T1W")) == []
    assert unseen_factors(model, EvalSet("f", Path("f"), "mni", coils="array-32", contrast="flair")) == [
        "coils array-32", "contrast flair"]
    assert unseen_factors(ModelSpec("n", "n.pt", ("mni",)), EvalSet("g", Path("g"), "mni", coils="x")) == []


@pytest.mark.parametrize("over, message", [
    ({"models": {}}, "models: expected a non-empty mapping"),
    ({"test_sets": {"t": {"path": "x"}}}, r"test_sets.t: missing source"),
    ({"test_sets": {"t": {"path": "x", "source": "a", "coil": "b"}}}, r"test_sets.t: unknown key\(s\) coil"),
    ({"models": {"m": {"checkpoint": "a", "trained_on": {}}}}, r"models.m.trained_on: missing sources"),
    ({"models": {"bad name": {"checkpoint": "a", "trained_on": {"sources": "a"}}}}, "bad name 'bad name'"),
    ({"mask": "radial"}, "mask 'radial'"),
    ({"accelerations": []}, "accelerations must be a non-empty list"),
    ({"accelerations": [{"acceleration": 0.5, "center_fraction": 0.08}]}, "need acceleration > 1"),
    ({"accelerations": [{"acceleration": "4", "center_fraction": 0.08}]}, r"accelerations\[0\].acceleration"),
    ({"accelerations": [{"acceleration": 2.5, "center_fraction": 0.08}], "mask": "equispaced"},
     r"accelerations\[0\]: .*integer"),
    ({"methods": ["zero-filled", "grappa"]}, "methods: unknown method 'grappa'"),
    ({"max_slices": 0}, "max_slices must be a positive integer"),
    ({"target_key": "rss"}, "target_key 'rss'"),
    ({"extra": 1}, r"unknown key\(s\) extra"),
])
def test_spec_errors_name_the_key(over, message):
    with pytest.raises(EvaluationError, match=message):
        parse_spec(_spec(**over))


def test_example_spec_parses():
    spec = load_spec(ROOT / "experiments" / "generalisation" / "configs" / "generalisation_matrix.example.yaml")
    assert [m.name for m in spec.models] == ["shipped-v1", "head-rss"]
    assert [(u.acceleration, u.center_fraction, u.kind) for u in spec.undersamples] == [
        (4, 0.08, "equispaced-fraction"), (8, 0.04, "equispaced-fraction")]
    assert spec.methods == ["zero-filled", "sense", "bart"] and spec.max_slices == 2
    labels = {(m.name, t.name): training_label(m, t) for m in spec.models for t in spec.test_sets}
    assert labels[("shipped-v1", "mni")] == SEEN and labels[("head-rss", "inia")] == HELD_OUT


def test_markdown_layout_bold_best_and_failures():
    spec = parse_spec(_spec(methods=["zero-filled", "sense"]))
    rec = dict(test_set="t", acceleration=4.0, center_fraction=0.08, volumes=1, slices=1, note="")
    records = [dict(rec, method="zero-filled", training="", status="ok", ssim=0.5, psnr=20.0, nmse=0.1),
               dict(rec, method="sense", training="", status="failed", ssim=math.nan, psnr=math.nan,
                    nmse=math.nan, note="t.h5: no ACS"),
               dict(rec, method="varnet:m", training=SEEN, status="ok", ssim=0.9, psnr=30.0, nmse=0.01)]
    md = matrix_markdown(records, spec)
    assert "| test set (source) | R (centre fraction) | zero-filled | CG-SENSE | m |" in md
    assert f"| t (mni) | 4× (0.08) | 0.500 / 20.00 | — (failed) | **0.900 / 30.00** ({SEEN}) |" in md
    assert "- sense on t: failed: t.h5: no ACS" in md


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "generalisation_matrix", ROOT / "experiments" / "generalisation" / "scripts" / "generalisation_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_end_to_end(tmp_path, capsys):
    """Two test sets (mni, inia), two random-weights models trained on one each, two accelerations."""
    for name, seed in (("mni", 20), ("inia", 21)):
        (tmp_path / name).mkdir()
        write_fastmri(tmp_path / name / f"{name}0.h5",
                      simulate_volume(num_slices=1, num_coils=4, recon_size=(32, 32), seed=seed))
    for seed, name in ((0, "a.pt"), (1, "b.pt")):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / name, VarNet(num_cascades=1, chans=4, pools=2, sens_chans=4, sens_pools=2))
    spec = {"models": {"on-mni": {"checkpoint": str(tmp_path / "a.pt"), "trained_on": {"sources": ["mni"]}},
                       "on-inia": {"checkpoint": str(tmp_path / "b.pt"), "trained_on": {"sources": ["inia"]}}},
            "test_sets": {"set-mni": {"path": str(tmp_path / "mni"), "source": "mni"},
                          "set-inia": {"path": str(tmp_path / "inia"), "source": "inia"}},
            "accelerations": [{"acceleration": 4, "center_fraction": 0.25}, {"acceleration": 2, "center_fraction": 0.25}],
            "mask": "equispaced", "methods": ["zero-filled"]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert _load_script().main([str(tmp_path / "spec.yaml"), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Generalisation matrix") and "matrix.csv" in printed
    rows = list(csv.DictReader((out / "matrix.csv").open()))
    assert len(rows) == 2 * 2 * 3  # accelerations × test sets × (zero-filled + 2 models)
    labels = {(r["model"], r["test_set"]) for r in rows if r["training"] == SEEN}
    assert labels == {("on-mni", "set-mni"), ("on-inia", "set-inia")}
    assert all(r["training"] == HELD_OUT for r in rows if r["model"] and (r["model"], r["test_set"]) not in labels)
    assert all(r["training"] == "" for r in rows if r["method"] == "zero-filled")
    # each cell equals the same file compared on its own, with the same mask
    for r_acc in (4, 2):
        alone = {x["method"]: x for x in compare_methods(
            [tmp_path / "inia" / "inia0.h5"], "zero-filled,varnet", {"on-inia": tmp_path / "b.pt"},
            undersample=Undersample(r_acc, 0.25, "equispaced"), device="cpu")}
        for method in ("zero-filled", "varnet:on-inia"):
            (cell,) = [r for r in rows if r["test_set"] == "set-inia" and r["method"] == method
                       and float(r["acceleration"]) == r_acc]
            assert float(cell["ssim"]) == pytest.approx(alone[method]["ssim"], rel=1e-9)
            assert float(cell["psnr"]) == pytest.approx(alone[method]["psnr"], rel=1e-9)
    md = (out / "matrix.md").read_text()
    assert md.count("| set-mni (mni) |") == 2 and md.count("| set-inia (inia) |") == 2
    assert f"({SEEN})" in md and f"({HELD_OUT})" in md
    assert {p.name for p in out.iterdir()} >= {"matrix.md", "matrix.csv", "R4_cf0.25", "R2_cf0.25"}
    assert (out / "R4_cf0.25" / "results.csv").exists()
    ssim = [float(r["ssim"]) for r in rows]
    assert np.all(np.isfinite(ssim))
