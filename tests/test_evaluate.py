"""`varnet evaluate` equals fastMRI's evaluate.py; `varnet compare` writes its report."""
import argparse
import csv
import math
import shutil
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from gadget.converters.simulate import NOISE_FREE_TARGET, simulate_volume, write_fastmri
from gadget.baselines import BartConfig
from gadget.cli import UserError
from gadget.cli import compare as compare_cli
from gadget.cli import evaluate as evaluate_cli
from gadget.evaluation import EvaluationError, Undersample, compare_methods, evaluate_predictions
from gadget.evaluation.scoring import TARGET_KEYS, fastmri_eval_crop, score_volume
from gadget.evaluation.sources import parse_checkpoints, parse_sources
from gadget.model.checkpoint import save_checkpoint
from gadget.model.varnet import VarNet
from tests.conftest import equispaced_mask

fm_evaluate = pytest.importorskip("fastmri.evaluate", reason="fastmri (test oracle) not installed")
ATOL = 1e-6  # float32 files: fastMRI computes in float32, we in float64 (gap ~1e-8)


def _cli(module, argv):
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.run(args)


def _write_pairs(tmp_path):
    """Five volumes, two acquisitions; tall and square targets, predictions larger than targets
    (fastMRI crops both to the target width)."""
    rng = np.random.default_rng(0)
    tdir, pdir = tmp_path / "targets", tmp_path / "preds"
    tdir.mkdir()
    pdir.mkdir()
    specs = [("a.h5", "AXT1", (3, 40, 32), (3, 48, 40)), ("b.h5", "AXT1", (2, 32, 32), (2, 32, 32)),
             ("c.h5", "AXT2", (4, 36, 30), (4, 36, 34)), ("d.h5", "AXT2", (2, 30, 30), (2, 40, 30)),
             ("e.h5", "AXT1", (1, 33, 31), (1, 35, 31))]
    for name, acq, tshape, pshape in specs:
        target = (np.abs(rng.normal(size=tshape)) * 3e-4).astype(np.float32)
        pred = (np.abs(rng.normal(size=pshape)) * 3e-4).astype(np.float32)
        top, left = (pshape[1] - tshape[1]) // 2, (pshape[2] - tshape[2]) // 2
        pred[:, top:top + tshape[1], left:left + tshape[2]] = target + rng.normal(size=tshape) * 4e-5
        noise_free = (target * 0.9).astype(np.float32)
        with h5py.File(tdir / name, "w") as f:
            f["reconstruction_rss"] = target
            f[NOISE_FREE_TARGET] = noise_free
            f.attrs["acquisition"] = acq
        with h5py.File(pdir / name, "w") as f:
            f["reconstruction"] = pred
    return tdir, pdir


def _fastmri_means(tdir, pdir, key, acquisition=None):
    args = SimpleNamespace(target_path=tdir, predictions_path=pdir, acquisition=acquisition, acceleration=None)
    metrics = fm_evaluate.evaluate(args, key)
    return metrics.means(), metrics.stddevs()


def test_evaluate_equals_fastmri(tmp_path):
    tdir, pdir = _write_pairs(tmp_path)
    for key in TARGET_KEYS:
        result = evaluate_predictions(tdir, pdir, target_key=key)
        groups = {g["group"]: g for g in result.groups()}
        assert set(groups) == {"all", "AXT1", "AXT2"}
        for group, acquisition in (("all", None), ("AXT1", "AXT1"), ("AXT2", "AXT2")):
            means, stds = _fastmri_means(tdir, pdir, key, acquisition)
            got = groups[group]
            for ours, theirs in (("nmse", "NMSE"), ("psnr", "PSNR"), ("ssim", "SSIM")):
                assert got[ours] == pytest.approx(float(np.squeeze(means[theirs])), abs=ATOL)
                assert got[f"{ours}_std"] == pytest.approx(float(np.squeeze(stds[theirs])), abs=ATOL)
            assert got["target"] == key
    assert groups["all"]["volumes"] == 5 and groups["AXT1"]["slices"] == 6


def test_auto_target_prefers_noise_free(tmp_path):
    tdir, pdir = _write_pairs(tmp_path)
    auto = evaluate_predictions(tdir, pdir)
    assert {v.target_key for v in auto.volumes} == {NOISE_FREE_TARGET}
    assert auto.mean() == evaluate_predictions(tdir, pdir, NOISE_FREE_TARGET).mean()
    with h5py.File(tdir / "b.h5", "a") as f:
        del f[NOISE_FREE_TARGET]
    mixed = evaluate_predictions(tdir, pdir)
    assert {v.file: v.target_key for v in mixed.volumes}["b.h5"] == "reconstruction_rss"
    assert mixed.groups()[0]["target"] == "reconstruction_rss, target_noise_free"


def test_crop_rules():
    tall, wide = np.ones((1, 40, 32)), np.ones((1, 30, 36))
    assert fastmri_eval_crop(tall, np.ones((1, 50, 40)))[1].shape == (1, 32, 32)  # fastMRI: (W, W)
    assert fastmri_eval_crop(wide, np.ones((1, 30, 36)))[0].shape == (1, 30, 36)  # fastMRI would raise
    with pytest.raises(EvaluationError, match="smaller than the evaluation crop"):
        score_volume(tall, np.ones((1, 20, 32)))


def test_missing_predictions(tmp_path):
    tdir, pdir = _write_pairs(tmp_path)
    (pdir / "c.h5").unlink()
    with pytest.raises(EvaluationError, match="1 target file.*c.h5"):
        evaluate_predictions(tdir, pdir)
    assert len(evaluate_predictions(tdir, pdir, skip_missing=True).volumes) == 4


def test_evaluate_cli_prints_table_and_writes_csv(tmp_path, capsys):
    tdir, pdir = _write_pairs(tmp_path)
    out_csv = tmp_path / "scores.csv"
    assert _cli(evaluate_cli, ["evaluate", "--targets", str(tdir), "--predictions", str(pdir),
                               "--target-key", "reconstruction_rss", "--csv", str(out_csv)]) == 0
    text = capsys.readouterr().out
    assert "| group | volumes | slices | NMSE | PSNR (dB) | SSIM | target |" in text
    assert "| AXT2 | 2 | 6 |" in text
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["file"] for r in rows] == ["a.h5", "b.h5", "c.h5", "d.h5", "e.h5"]
    means, _ = _fastmri_means(tdir, pdir, "reconstruction_rss")
    assert np.mean([float(r["ssim"]) for r in rows]) == pytest.approx(float(np.squeeze(means["SSIM"])), abs=ATOL)
    with pytest.raises(UserError, match="no target dataset"):
        with h5py.File(tdir / "a.h5", "a") as f:
            del f["reconstruction_rss"]
        _cli(evaluate_cli, ["evaluate", "--targets", str(tdir), "--predictions", str(pdir),
                            "--target-key", "reconstruction_rss"])


# ----------------------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def compare_files(tmp_path_factory):
    """A test-layout file (4× equispaced, 12 ACS lines, targets kept), a fully sampled file and a
    tiny random-weights checkpoint."""
    root = tmp_path_factory.mktemp("compare")
    vol = simulate_volume(num_slices=3, num_coils=6, recon_size=(48, 48), seed=2)
    (root / "test").mkdir()
    write_fastmri(root / "test" / "und.h5", vol, mask=equispaced_mask(48, 4, 12), num_low_frequency=12,
                  acceleration=4, keep_targets=True)
    write_fastmri(root / "full.h5", vol)
    torch.manual_seed(0)
    save_checkpoint(root / "model.pt", VarNet(num_cascades=1, chans=4, pools=2, sens_chans=4, sens_pools=2))
    return root


def test_compare_writes_outputs_with_expected_rows(compare_files, tmp_path):
    out = tmp_path / "out"
    rows = compare_methods([compare_files / "test"], checkpoint=compare_files / "model.pt", out_dir=out,
                           max_slices=1, bart_config=BartConfig(binary="bart-not-installed-here"))
    by = {r["method"]: r for r in rows}
    assert list(by) == ["zero-filled", "sense", "bart", "varnet"]
    assert by["bart"]["status"] == "skipped" and "not found on PATH" in by["bart"]["note"]
    for name in ("zero-filled", "sense", "varnet"):
        r = by[name]
        assert r["status"] == "ok" and r["volumes"] == 1 and r["slices"] == 1, r
        assert r["target"] == NOISE_FREE_TARGET and r["seconds_per_slice"] > 0
        assert 0 < r["ssim"] <= 1 and r["nmse"] > 0 and math.isfinite(r["psnr"])
    assert by["sense"]["nmse"] < 0.6 * by["zero-filled"]["nmse"]
    assert math.isnan(by["bart"]["ssim"])
    assert {p.name for p in out.iterdir()} == {"results.md", "results.csv", "figure.png"}
    table = list(csv.DictReader((out / "results.csv").open()))
    methods = ["zero-filled", "sense", "bart", "varnet"]
    assert [(r["source"], r["method"]) for r in table] == [("test", m) for m in methods] + [("all", m) for m in methods]
    assert list(table[0]) == ["source", "method", "ssim", "psnr", "nmse", "seconds_per_slice", "target", "volumes",
                              "slices", "status", "note"]
    for r in table[:4]:  # one source: its row is the pooled row
        assert r == dict(table[4 + methods.index(r["method"])], source="test")
    md = (out / "results.md").read_text()
    assert "| bart | — | — | — | — | — | skipped: 'bart-not-installed-here' not found on PATH" in md
    assert f"scored against: {NOISE_FREE_TARGET}" in md
    assert (out / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_scores_varnet_with_its_unets_in_reduced_precision(compare_files):
    runs = {p: {r["method"]: r for r in compare_methods([compare_files / "test"], "varnet",
                                                         checkpoint=compare_files / "model.pt", max_slices=1,
                                                         device="cpu", precision=p)}["varnet"]
            for p in ("fp32", "bf16")}
    assert runs["fp32"]["status"] == runs["bf16"]["status"] == "ok"
    assert "U-Nets in bf16" in runs["bf16"]["note"] and "U-Nets in" not in runs["fp32"]["note"]
    # same model, bf16 arithmetic in the U-Nets only: the scores move, but little (SSIM measured 1.2e-4 apart)
    assert runs["bf16"]["nmse"] != runs["fp32"]["nmse"]
    assert abs(runs["bf16"]["ssim"] - runs["fp32"]["ssim"]) < 2e-3


def test_compare_undersamples_full_files_and_skips_varnet(compare_files, tmp_path):
    undersample = Undersample(acceleration=4, center_fraction=0.25, kind="equispaced")
    rows = compare_methods([compare_files / "full.h5"], "zero-filled,varnet", undersample=undersample,
                           max_slices=1, target_key="reconstruction_rss")
    assert rows[0]["status"] == "ok" and rows[0]["target"] == "reconstruction_rss"
    assert rows[1]["status"] == "skipped" and "no checkpoint" in rows[1]["note"]
    again = compare_methods([compare_files / "full.h5"], ["zf"], undersample=undersample, max_slices=1,
                            target_key="reconstruction_rss")
    assert again[0]["nmse"] == rows[0]["nmse"]  # mask seeded by the file name
    with pytest.raises(EvaluationError, match="fully sampled"):
        compare_methods([compare_files / "full.h5"], ["zero-filled"])
    with pytest.raises(EvaluationError, match="already undersampled"):
        compare_methods([compare_files / "test"], ["zero-filled"], undersample=undersample)
    with pytest.raises(ValueError, match="unknown method"):
        compare_methods([compare_files / "test"], "zero-filled,grappa")


def test_compare_cli(compare_files, tmp_path, capsys):
    out = tmp_path / "cli"
    assert _cli(compare_cli, ["compare", str(compare_files / "test" / "und.h5"), "--methods",
                              "zero-filled,sense,bart", "--out", str(out), "--max-slices", "1",
                              "--sense-iterations", "5", "--bart-iterations", "20"]) == 0
    text = capsys.readouterr().out
    assert "| sense |" in text and "results.csv" in text
    rows = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert list(rows) == ["zero-filled", "sense", "bart"]
    if shutil.which("bart"):
        assert rows["bart"]["status"] == "ok" and float(rows["bart"]["nmse"]) < float(rows["zero-filled"]["nmse"])
    else:
        assert rows["bart"]["status"] == "skipped"
    with pytest.raises(UserError, match="unknown method"):
        _cli(compare_cli, ["compare", str(compare_files / "test"), "--methods", "nope", "--out", str(out)])


def test_compare_marks_failures_and_model_mode_is_restored(compare_files, tmp_path, capsys):
    vol = simulate_volume(num_slices=1, num_coils=4, recon_size=(32, 32), seed=4)
    no_acs = np.zeros(32, bool)
    no_acs[::4] = True  # no calibration block: ESPIRiT cannot run
    write_fastmri(tmp_path / "noacs.h5", vol, mask=no_acs, acceleration=4, keep_targets=True)
    torch.manual_seed(1)
    model = VarNet(num_cascades=1, chans=4, pools=2, sens_chans=4, sens_pools=2).train()
    rows = compare_methods([tmp_path / "noacs.h5"], "zero-filled,sense,varnet", checkpoint=model)
    by = {r["method"]: r for r in rows}
    assert by["zero-filled"]["status"] == "ok" and by["varnet"]["status"] == "ok"
    assert by["sense"]["status"] == "failed" and "centre" in by["sense"]["note"]
    assert math.isnan(by["sense"]["nmse"])
    assert model.training  # handed back in the mode it came in
    assert _cli(compare_cli, ["compare", str(tmp_path / "noacs.h5"), "--methods", "sense",
                              "--out", str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o" / "figure.png").exists()


# ----------------------------------------------------------------------------- several sources and models


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """Source ``a``: two fully sampled files, source ``b``: one (32×32, 1 slice, 4 coils); two
    random-weights checkpoints."""
    root = tmp_path_factory.mktemp("sources")
    for src, names in (("a", ("a0.h5", "a1.h5")), ("b", ("b0.h5",))):
        (root / src).mkdir()
        for i, name in enumerate(names):
            seed = 10 + 3 * i + (src == "b")
            write_fastmri(root / src / name, simulate_volume(num_slices=1, num_coils=4, recon_size=(32, 32), seed=seed))
    for seed, name in ((0, "old.pt"), (1, "new.pt")):
        torch.manual_seed(seed)
        save_checkpoint(root / name, VarNet(num_cascades=1, chans=4, pools=2, sens_chans=4, sens_pools=2))
    return root


_US = Undersample(acceleration=4, center_fraction=0.25, kind="equispaced")


def test_compare_reports_per_source_and_pooled_means(two_sources, tmp_path):
    r = two_sources
    out = tmp_path / "out"
    rows = compare_methods([r / "a", f"bee={r / 'b'}"], "zero-filled,varnet",
                           {"old": r / "old.pt", "new": r / "new.pt"}, undersample=_US, out_dir=out, device="cpu")
    assert [x["method"] for x in rows] == ["zero-filled", "varnet:old", "varnet:new"]
    # independent per-volume scores: each file compared on its own
    single = {f.name: {x["method"]: x for x in compare_methods([f], "zero-filled,varnet", {"old": r / "old.pt"},
                                                               undersample=_US, device="cpu")}
              for f in sorted((r / "a").glob("*.h5")) + [r / "b" / "b0.h5"]}
    files = {"a": ["a0.h5", "a1.h5"], "bee": ["b0.h5"]}
    for row in rows[:2]:
        assert row["source"] == "all" and [p["source"] for p in row["by_source"]] == ["a", "bee"]
        for part in row["by_source"]:
            assert part["volumes"] == len(files[part["source"]])
            for m in ("ssim", "psnr", "nmse"):
                expect = np.mean([single[f][row["method"]][m] for f in files[part["source"]]])
                assert part[m] == pytest.approx(expect, rel=1e-12)
        for m in ("ssim", "psnr", "nmse"):
            every = [single[f][row["method"]][m] for f in single]
            assert row[m] == pytest.approx(np.mean(every), rel=1e-12)  # mean over volumes...
            src_means = np.mean([p[m] for p in row["by_source"]])
            assert abs(row[m] - src_means) > 1e-9  # ...not over sources
    # two models on the same masks: different weights, different scores; same volumes and files
    old, new = rows[1], rows[2]
    assert [v["file"] for v in old["per_volume"]] == [v["file"] for v in new["per_volume"]]
    assert old["ssim"] != new["ssim"] and "old.pt" in old["note"] and "new.pt" in new["note"]
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [(t["source"], t["method"]) for t in table] == [
        (s, m) for s in ("a", "bee", "all") for m in ("zero-filled", "varnet:old", "varnet:new")]
    got = {(t["source"], t["method"]): float(t["ssim"]) for t in table}
    assert got[("bee", "varnet:new")] == pytest.approx(new["by_source"][1]["ssim"], rel=1e-6)
    assert got[("all", "zero-filled")] == pytest.approx(rows[0]["ssim"], rel=1e-6)
    md = (out / "results.md").read_text()
    assert "## a (2 files; per source)" in md and "## bee (1 file; per source)" in md
    assert "## all (3 files; pooled" in md and md.count("| varnet:old |") == 3
    assert "sources (2): a (2 files: a0.h5, a1.h5); bee (1 file: b0.h5)" in md


def test_compare_failure_is_per_source(compare_files, tmp_path):
    vol = simulate_volume(num_slices=1, num_coils=4, recon_size=(32, 32), seed=4)
    no_acs = np.zeros(32, bool)
    no_acs[::4] = True
    write_fastmri(tmp_path / "noacs.h5", vol, mask=no_acs, acceleration=4, keep_targets=True)
    rows = compare_methods([f"good={compare_files / 'test'}", f"bad={tmp_path / 'noacs.h5'}"], "sense",
                           max_slices=1)
    good, bad = rows[0]["by_source"]
    assert good["status"] == "ok" and good["volumes"] == 1 and math.isfinite(good["ssim"])
    assert bad["status"] == "failed" and math.isnan(bad["ssim"])
    assert rows[0]["status"] == "failed" and rows[0]["note"].startswith("bad: noacs.h5") and math.isnan(rows[0]["ssim"])


def test_source_and_checkpoint_errors(two_sources, tmp_path):
    r = two_sources
    (tmp_path / "x" / "a").mkdir(parents=True)
    shutil.copy(r / "a" / "a0.h5", tmp_path / "x" / "a" / "c.h5")
    with pytest.raises(EvaluationError, match="both named 'a'.*NAME=PATH"):
        parse_sources([r / "a", tmp_path / "x" / "a"])
    assert [s.name for s in parse_sources([f"a={r / 'a'}", f"a={tmp_path / 'x' / 'a'}"])] == ["a"]  # merged
    with pytest.raises(EvaluationError, match="reserved"):
        parse_sources([f"all={r / 'a'}"])
    with pytest.raises(EvaluationError, match="bad name 'a b'"):
        parse_sources([f"a b={r / 'a'}"])
    with pytest.raises(EvaluationError, match="in sources 'a' and 'again'"):
        parse_sources([r / "a", f"again={r / 'a' / 'a1.h5'}"])
    with pytest.raises(EvaluationError, match="nope=.*input not found"):
        parse_sources([f"nope={tmp_path / 'missing'}"])
    assert parse_sources({"m": [r / "a" / "a0.h5", r / "b"]})[0].files == (r / "a" / "a0.h5", r / "b" / "b0.h5")
    assert parse_checkpoints([str(r / "old.pt")]) == [("varnet", str(r / "old.pt"))]
    assert [n for n, _ in parse_checkpoints([f"o={r / 'old.pt'}", "v1=shipped"])] == ["varnet:o", "varnet:v1"]
    with pytest.raises(EvaluationError, match="name each one as NAME=PATH.*old.pt"):
        parse_checkpoints([str(r / "old.pt"), f"n={r / 'new.pt'}"])
    with pytest.raises(EvaluationError, match="more than once: m"):
        parse_checkpoints([f"m={r / 'old.pt'}", f"m={r / 'new.pt'}"])
    with pytest.raises(EvaluationError, match="checkpoint not found: .*missing.pt"):
        parse_checkpoints([f"m={tmp_path / 'missing.pt'}"])


def test_compare_cli_sources_and_checkpoints(two_sources, tmp_path, capsys):
    r, out = two_sources, tmp_path / "cli"
    argv = ["compare", f"first={r / 'a' / 'a0.h5'}", str(r / "b"), "--methods", "zero-filled,varnet",
            "--acceleration", "4", "--center-fraction", "0.25", "--mask", "equispaced", "--out", str(out),
            "--device", "cpu", "--checkpoint", f"old={r / 'old.pt'}", "--checkpoint", f"new={r / 'new.pt'}"]
    assert _cli(compare_cli, argv) == 0
    assert "## first (1 file; per source)" in capsys.readouterr().out
    table = list(csv.DictReader((out / "results.csv").open()))
    assert {t["source"] for t in table} == {"first", "b", "all"} and len(table) == 9
    with pytest.raises(UserError, match="name each one as NAME=PATH"):
        _cli(compare_cli, argv[:-4] + ["--checkpoint", str(r / "old.pt"), "--checkpoint", str(r / "new.pt")])
    (tmp_path / "other" / "b").mkdir(parents=True)
    shutil.copy(r / "b" / "b0.h5", tmp_path / "other" / "b" / "b9.h5")
    with pytest.raises(UserError, match="both named 'b'"):
        _cli(compare_cli, ["compare", str(r / "b"), str(tmp_path / "other" / "b"), "--out", str(out)])
