"""OpenRecon packaging: the Dockerfile's label is valid and current, the schema rejects broken
labels, and the package command writes a valid label and a PDF manual before it needs Docker."""
import base64
import copy
import json
import re
from pathlib import Path

import pytest

from gadget.cli import main
from gadget.openrecon import label as openrecon_label
from gadget.openrecon.label import (LABEL_KEY, LabelError, build_label, decode_label, dockerfile_label,
                                    encode_label, package_stem, schema_errors, validate_label,
                                    write_dockerfile_label)
from gadget.openrecon.manual import SECTION_TITLE, read_section
from gadget.recon.config import load_config
from gadget.recon.ui_parameters import UI_PARAMETERS, UiParameter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def label():
    return build_label()


def _param(label, kind):
    return next(p for p in label["parameters"] if p["type"] == kind)


def test_dockerfile_label_is_valid_and_equals_a_fresh_build(label):
    text = (ROOT / "Dockerfile").read_text()
    # decoded independently of label.py: the raw LABEL line, base64, JSON
    (value,) = re.findall(r'^LABEL "' + re.escape(LABEL_KEY) + r'"="([^"]+)"$', text, flags=re.M)
    decoded = json.loads(base64.b64decode(value))
    assert schema_errors(decoded) == []
    assert decoded == label, ("the Dockerfile's OpenRecon label is stale: run "
                              "'varnet openrecon label --dockerfile Dockerfile'")
    assert dockerfile_label(ROOT / "Dockerfile") == decoded


def test_label_reflects_the_parameter_table_and_the_openrecon_preset(label):
    preset = load_config("openrecon")
    by_id = {p["id"]: p for p in label["parameters"]}
    assert [p["id"] for p in label["parameters"]] == ["config"] + [u.id for u in UI_PARAMETERS]
    assert len(label["parameters"]) <= 14
    for u in UI_PARAMETERS:
        entry = by_id[u.id]
        assert entry["type"] == u.kind and entry["label"] == {"en": u.label}
        assert entry["default"] == getattr(preset, u.setting), u.id  # what the scanner sends by default
    assert by_id["imageDtype"]["default"] == "uint16"  # the preset's, not ReconConfig()'s float32
    assert "openrecon" in [v["id"] for v in by_id["config"]["values"]]
    g, r = label["general"], label["reconstruction"]
    assert r["transfer_protocol"] == {"protocol": "ISMRMRD", "version": "1.4.1"} and r["port"] == 9002
    import gadget

    assert g["version"] == gadget.__version__
    assert package_stem(label) == f"OpenRecon_{g['vendor']}_{g['name']['en']}_V{g['version']}"


def test_label_round_trips_through_base64(label):
    assert decode_label(encode_label(label)) == label
    with pytest.raises(LabelError, match="not base64 of a JSON document"):
        decode_label("not base64!")


@pytest.mark.parametrize("breakage, message", [
    (lambda l: l["parameters"].extend(copy.deepcopy(l["parameters"][1:3])), "is too long"),
    (lambda l: l["parameters"][1].update(id="safety-max"), "does not match"),
    (lambda l: _param(l, "double").update(default=0.15), "is not a multiple of 0.1"),
    (lambda l: _param(l, "double").update(maximum=2.25), "is not a multiple of 0.1"),
    (lambda l: l["general"].pop("vendor"), "'vendor' is a required property"),
    (lambda l: l.pop("reconstruction"), "'reconstruction' is a required property"),
    (lambda l: l["reconstruction"]["transfer_protocol"].update(version="2.0"), "'1.4.1' was expected"),
    (lambda l: l["general"].update(version="1.0"), "does not match"),
    (lambda l: _param(l, "int").update(default=1.5), "is not of type 'integer'"),
    (lambda l: _param(l, "choice").pop("values"), "'values' is a required property"),
    (lambda l: _param(l, "boolean").update(default="False"), "is not of type 'boolean'"),
    (lambda l: l["reconstruction"].update(emitter="kspace"), "is not one of"),
])
def test_schema_rejects_broken_labels(label, breakage, message):
    broken = copy.deepcopy(label)
    breakage(broken)
    errors = schema_errors(broken)
    assert any(message in e for e in errors), errors
    with pytest.raises(LabelError, match="not valid"):
        validate_label(broken)


def test_doubles_are_checked_in_decimal_and_in_binary_floating_point(label):
    ok = copy.deepcopy(label)
    _param(ok, "double").update(default=1.1, minimum=0.1, maximum=10.0)
    assert schema_errors(ok) == []
    tricky = copy.deepcopy(label)  # 0.3 is a decimal multiple of 0.1, but 0.3 / 0.1 = 2.9999999999999996
    _param(tricky, "double").update(minimum=0.3)
    (error,) = schema_errors(tricky)
    assert "binary floating point" in error


def test_cross_field_problems_are_reported(label):
    broken = copy.deepcopy(label)
    _param(broken, "int").update(default=999)
    with pytest.raises(LabelError, match="default 999 outside"):
        validate_label(broken)
    broken = copy.deepcopy(label)
    broken["parameters"][2]["id"] = broken["parameters"][1]["id"]
    with pytest.raises(LabelError, match="declared twice"):
        validate_label(broken)


def test_a_double_not_on_the_0_1_grid_stops_the_build(monkeypatch):
    bad = UiParameter("safetyPredictionMax", "safety_prediction_max", "Safety threshold", "help", 0.05, 10.0)
    table = tuple(bad if p.id == bad.id else p for p in UI_PARAMETERS)
    monkeypatch.setattr(openrecon_label, "UI_PARAMETERS", table)
    with pytest.raises(LabelError, match="'safetyPredictionMax': minimum 0.05 is not a multiple of 0.1"):
        build_label()


def test_label_command_rewrites_only_the_openrecon_label_line(tmp_path, label):
    dockerfile = tmp_path / "Dockerfile"
    original = (ROOT / "Dockerfile").read_text()
    stale = re.sub(r'(^LABEL "' + re.escape(LABEL_KEY) + r'"=)"[^"]*"', r'\1""', original, flags=re.M)
    assert stale != original
    dockerfile.write_text(stale)
    out = tmp_path / "label.json"
    assert main(["openrecon", "label", "--out", str(out), "--dockerfile", str(dockerfile)]) == 0
    assert dockerfile.read_text() == original
    assert json.loads(out.read_text()) == label
    assert write_dockerfile_label(dockerfile, label) is False  # already current


def test_package_without_docker_fails_after_writing_label_and_manual(tmp_path, monkeypatch, capsys, label):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no docker anywhere
    out = tmp_path / "dist"
    assert main(["openrecon", "package", "--out-dir", str(out), "--root", str(ROOT)]) == 2
    err = capsys.readouterr().err
    assert "no 'docker' command on PATH" in err and str(out) in err
    written = json.loads((out / "openrecon_label.json").read_text())
    assert written == label and schema_errors(written) == []
    pdf = out / f"{package_stem(label)}.pdf"
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF") and len(data) > 5000
    assert not list(out.glob("*.zip")) and not list(out.glob("*.tar"))


def test_package_refuses_a_stale_dockerfile_label(tmp_path, monkeypatch, capsys):
    root = tmp_path / "repo"
    (root / "docs" / "readme-parts").mkdir(parents=True)
    (root / "docs" / "readme-parts" / "openrecon.md").write_text(f"## {SECTION_TITLE}\n\nText.\n")
    older = build_label()
    older["parameters"].pop()  # a parameter added since the Dockerfile was generated
    (root / "Dockerfile").write_text(f'FROM python AS openrecon\nLABEL "{LABEL_KEY}"="{encode_label(older)}"\n')
    assert main(["openrecon", "package", "--out-dir", str(tmp_path / "out"), "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "differs from the label built now" in err and "varnet openrecon label --dockerfile" in err
    (root / "Dockerfile").write_text(f'FROM python AS openrecon\nLABEL "{LABEL_KEY}"=""\n')
    assert main(["openrecon", "package", "--out-dir", str(tmp_path / "out"), "--root", str(root)]) == 2
    assert "not base64 of a JSON document" in capsys.readouterr().err


def test_manual_section_comes_from_readme_when_it_has_it(tmp_path):
    (tmp_path / "docs" / "readme-parts").mkdir(parents=True)
    (tmp_path / "docs" / "readme-parts" / "openrecon.md").write_text(f"## {SECTION_TITLE}\n\nfrom the part\n")
    (tmp_path / "README.md").write_text("# Title\n\n## Other\n\nno\n")
    text, source = read_section(tmp_path)
    assert source.name == "openrecon.md" and "from the part" in text
    (tmp_path / "README.md").write_text(f"# Title\n\n## {SECTION_TITLE}\n\nfrom the readme\n\n### Sub\n\nkept\n\n"
                                        "## Next\n\ndropped\n")
    text, source = read_section(tmp_path)
    assert source.name == "README.md" and "from the readme" in text and "kept" in text and "dropped" not in text
    assert "## " + SECTION_TITLE in read_section(ROOT)[0]  # the shipped text has the section


def _fake_docker(bin_dir, version="24.0.7"):
    """A stand-in ``docker`` that logs its arguments: ``version`` prints ``version`` (empty: the
    daemon is down), ``save -o FILE TAG`` writes FILE."""
    bin_dir.mkdir()
    script = bin_dir / "docker"
    script.write_text(f"""#!/bin/sh
echo "$@" >> "{bin_dir}/calls"
case "$1" in
  version) [ -n "{version}" ] && echo "{version}" && exit 0; echo "Cannot connect to the Docker daemon" >&2; exit 1;;
  build) exit 0;;
  save) echo "image tar" > "$3"; exit 0;;
esac
exit 3
""")
    script.chmod(0o755)
    return bin_dir


def test_package_with_docker_zips_the_saved_image_and_the_manual(tmp_path, monkeypatch, label):
    import zipfile

    bin_dir = _fake_docker(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    out = tmp_path / "dist"
    assert main(["openrecon", "package", "--out-dir", str(out), "--root", str(ROOT)]) == 0
    stem = package_stem(label)
    with zipfile.ZipFile(out / f"{stem}.zip") as zf:
        assert sorted(zf.namelist()) == sorted([f"{stem}.tar", f"{stem}.pdf"])
        assert zf.read(f"{stem}.pdf").startswith(b"%PDF-")
        assert zf.read(f"{stem}.tar") == b"image tar\n"
    calls = (bin_dir / "calls").read_text().splitlines()
    assert calls[1].startswith("build --target openrecon -t ") and calls[1].endswith(str(ROOT))
    assert calls[2].startswith(f"save -o {out / stem}.tar ")


def test_package_reports_a_docker_daemon_that_does_not_answer(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", f"{_fake_docker(tmp_path / 'bin', version='')}:/usr/bin:/bin")
    assert main(["openrecon", "package", "--out-dir", str(tmp_path / "dist"), "--root", str(ROOT)]) == 2
    assert "Docker daemon does not answer" in capsys.readouterr().err
