"""The `varnet` console script: subcommands listed, examples in every --help, demo runs end to end."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gadget.cli import main

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("infer", "replay", "serve", "convert", "synth", "export", "bench", "demo")


def _help(*args):
    return subprocess.run([sys.executable, "-m", "gadget.cli", *args, "--help"],
                          capture_output=True, text=True, check=True).stdout


def test_top_level_help_lists_subcommands():
    text = _help()
    for name in SUBCOMMANDS:
        assert name in text


@pytest.mark.parametrize("argv", [["infer"], ["replay"], ["serve"], ["convert"], ["convert", "fastmri-to-ismrmrd"],
                                  ["convert", "ismrmrd-to-fastmri"], ["synth"], ["bench"], ["bench", "model"],
                                  ["bench", "ingest"], ["bench", "pipeline"], ["bench", "all"], ["export"], ["demo"]])
def test_every_subcommand_help_shows_an_example(argv):
    text = _help(*argv)
    assert "example:" in text and "varnet " + argv[0] in text.split("example:")[1]


def test_console_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'varnet = "gadget.cli:main"' in text


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert "make demo" in head and "make test" in head


def test_bench_reports_missing_reference(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastmri", None)  # simulate the oracle being absent
    assert main(["bench", "model", "--repeats", "1"]) == 2
    assert "fastmri" in capsys.readouterr().err


def test_demo_runs_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    import h5py

    with h5py.File(out / "images.h5", "w") as f:  # an earlier run's file: `make demo` twice replaces it
        f.create_group("demo/image_9")
    assert main(["demo", "--out", str(out)]) == 0  # the shipped weights
    text = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [float(v) for v in line.split("|")[2:5]]
            for line in text.splitlines() if line.startswith("| zero-filled") or line.startswith("| E2E-VarNet")}
    # a whole-head slice at 4x; measured 0.883 vs 0.746 SSIM, 31.5 vs 27.5 dB (shipped v2 weights)
    assert rows["E2E-VarNet"][0] > rows["zero-filled"][0] + 0.08  # SSIM
    assert rows["E2E-VarNet"][1] > rows["zero-filled"][1] + 2.5  # PSNR dB
    from gadget.stream.sinks import read_images_h5

    series = read_images_h5(out / "images.h5")
    assert sorted(series) == ["demo/image_1", "demo/image_2"]  # E2E-VarNet and zero-filled
    assert [len(v) for v in series.values()] == [4, 4]  # one image per slice
    data = np.asarray(series["demo/image_1"][0].data)
    assert data.shape[:2] == (1, 1) and min(data.shape[2:]) >= 96 and np.isfinite(data).all()
    assert series["demo/image_1"][0].meta["VarNetSafety"] == "pass"   # the network's image, not a fallback
    assert (out / "scan_raw_ismrmrd.h5").stat().st_size > 0
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
