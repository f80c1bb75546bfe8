"""The documentation: measured figures live in docs/results/ only, code names only documents the repository
contains, the configuration reference is generated from ``ReconConfig``, the README stays a short entry
point whose links resolve, and the site builds with ``mkdocs build --strict``."""
import ast
import importlib.util
import io
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURE_DIRS = ("gadget", "converters", "pipelines")          # no measured figures in their docstrings/comments
CITING = ("gadget", "converters", "pipelines", "bench", "experiments", "tests", "Makefile", "Dockerfile", ".ci/run",
          "mkdocs.yml", "pyproject.toml")                     # no citation of a document the repository lacks
SUFFIXES = (".py", ".yaml", ".yml", ".sh", ".xml")

# A measured figure: a decimal number with a unit of time, size, speed or image quality, a quality metric
# with a number of two or more decimals, or two or more numbers of two or more decimals on one line.
_DEC = r"\d+\.\d+"
_RANGE = rf"{_DEC}(?:\s*[-–/]\s*\d+(?:\.\d+)?)*"
_UNIT = (r"(?:dB\b|s\s+(?:per|instead|for|of)\b|s/(?:slice|step|forward)\b|ms\b|µs\b|MB/s|GB/s|MB\b|GB\b|GiB\b|MiB\b"
         r"|\s*[x×]\s+(?:the\s+)?(?:reference|faster|slower|ours|ismrmrd|plain|network)\b)")
UNIT_FIGURE = re.compile(rf"(?<![\w.]){_RANGE}\s*{_UNIT}")
METRIC_FIGURE = re.compile(r"\b(?:SSIM|PSNR|NMSE|NCC)\b[^.;:]{0,20}?(?<![\w.])\d*\.\d{2,}")
TWO_DECIMALS = re.compile(r"(?<![\w.])\d+\.\d{2,}(?![\w.])")

# True constants (not measurements) that the rules above would take for one, per file, with their reason.
CONSTANTS = {
    "converters/fastmri_to_ismrmrd.py": {"2.5 ms"},            # the ISMRMRD time-stamp tick
    "converters/twix.py": {"2.5 ms"},                           # the Siemens time-stamp tick
    "gadget/bench/soak_streams.py": {"0.5-1 GB"},               # the size a stalled client claims
    "gadget/evaluation/ablation.py": {"0.08", "0.06", "0.04"},  # the paper's centre fractions
    "gadget/train/adapt_run.py": {"0.08", "0.04"},              # fastMRI's centre fractions
    "gadget/train/config.py": {"0.08", "0.04", "0.01", "0.03"},  # centre fractions; SSIM's k1, k2
    "gadget/train/losses.py": {"0.01", "0.03"},                 # SSIM's k1, k2
    "gadget/recon/refine.py": {"0.95", "0.02", "0.005"},       # the coverage crop, the λ floors
    "converters/anatomy.py": {"0.69", "0.80", "0.92"},          # textbook proton densities; phantom half-sizes
    "converters/coils.py": {"0.85", "1.15"},                    # the drawn coil-gain range
    "converters/headsim.py": {"1.25", "1.15", "1.35"},          # the drawn field-of-view and pixel ranges
}


def _files(tops, suffixes=SUFFIXES):
    for top in tops:
        path = ROOT / top
        if path.is_file():
            yield path
        elif path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and (not suffixes or f.suffix in suffixes) and "__pycache__" not in f.parts:
                    yield f


def docs_and_comments(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of every comment and docstring line of a Python file, every ``#`` comment of
    a YAML or shell file, every ``<!-- -->`` comment of an XML file."""
    source = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
               if tok.type == tokenize.COMMENT]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                        and isinstance(first.value.value, str):
                    out += [(first.lineno + i, line) for i, line in enumerate(first.value.value.splitlines())]
        return out
    if path.suffix == ".xml":
        out = []
        for m in re.finditer(r"<!--(.*?)-->", source, re.S):
            start = source.count("\n", 0, m.start()) + 1
            out += [(start + i, line) for i, line in enumerate(m.group(1).splitlines())]
        return out
    return [(n, line[line.index("#"):]) for n, line in enumerate(source.splitlines(), 1) if "#" in line]


def measured_figures(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    found = []
    for n, text in docs_and_comments(path):
        line = text
        for constant in CONSTANTS.get(rel, ()):
            line = re.sub(rf"(?<![\w.]){re.escape(constant)}(?![\w.])", "", line)
        if is_measured(line):
            found.append(f"{rel}:{n}: {text.strip()}")
    return found


def is_measured(text: str) -> bool:
    return bool(UNIT_FIGURE.search(text) or METRIC_FIGURE.search(text) or len(TWO_DECIMALS.findall(text)) >= 2)


def test_no_measured_figures_in_docstrings_or_comments():
    found = [hit for f in _files(FIGURE_DIRS) for hit in measured_figures(f)]
    assert not found, ("measured figures belong in docs/results/ (give the reasoning and link the page by "
                       "name; a true constant goes into CONSTANTS here):\n" + "\n".join(found))


def test_the_figure_check_catches_measurements(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('"""Scored 0.876 / 37.07 against BART."""\n# 0.48 s per slice\n'
                     'X = 1  # 3.7x slower than the reference\n# SSIM 0.63 with RSS\n# 30.5 dB on the brain\n'
                     '# crop 0.9, the noise-free brain at 4x (docs/results/refinement.md)\n')
    assert sorted(n for n, text in docs_and_comments(probe) if is_measured(text)) == [1, 2, 3, 4, 5]


DESIGN = re.compile(r"\bDESIGN\.md\b")
ISSUE = re.compile(r"\bissues?\s+#?\d+", re.I)
DOC_PATH = re.compile(r"(?<!--out )(?<!> )\bdocs/[\w./-]+\.(?:md|png)\b")  # not a file a command writes
README_SECTION = re.compile(r"\bREADME[\s,]*\"|\bsee README\b|\bREADME (?:Performance|section)\b")


def test_code_cites_no_document_the_repository_lacks():
    found = []
    for f in _files(CITING, suffixes=SUFFIXES + ("",)):
        if f == Path(__file__).resolve():
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        rel = f.relative_to(ROOT).as_posix()
        for n, line in enumerate(text.splitlines(), 1):
            for pattern, what in ((DESIGN, "DESIGN.md is not in the repository"),
                                  (ISSUE, "an issue number names no document here"),
                                  (README_SECTION, "the README has no such section: link a docs/ page")):
                if pattern.search(line):
                    found.append(f"{rel}:{n}: {what}: {line.strip()}")
            for doc in DOC_PATH.findall(line):
                if not (ROOT / doc).exists():
                    found.append(f"{rel}:{n}: {doc} does not exist: {line.strip()}")
    assert not found, "\n".join(found)


def _hook():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_generated_from_reconconfig():
    import dataclasses

    from gadget.recon.config import CHOICES, OPERATOR_ONLY, ReconConfig, preset_names
    from gadget.recon.ui_parameters import UI_PARAMETERS

    hook = _hook()
    comments = hook.field_comments((ROOT / "gadget" / "recon" / "config.py").read_text(encoding="utf-8"))
    page = hook.render()
    for f in dataclasses.fields(ReconConfig):
        assert comments[f.name], f"ReconConfig.{f.name} needs a comment above or beside it (the reference's text)"
        section = page.split(f"### `{f.name}`")[1].split("\n### ")[0]
        assert f"default `{hook._value(f.default)}`" in section
        assert comments[f.name] in section
        for choice in CHOICES.get(f.name, ()):
            assert f"`{choice}`" in section
        assert ("operator only" in section) == (f.name in OPERATOR_ONLY)
    for p in UI_PARAMETERS:
        assert f"OpenRecon `{p.id}`" in page
    for name in preset_names():
        assert f"`{name}`" in page.split("## Presets")[1]
    # generated, never a file that could drift from the code
    assert not (ROOT / "docs" / hook.PAGE).exists()
    mkdocs = (ROOT / "mkdocs.yml").read_text()
    assert "docs/hooks/config_reference.py" in mkdocs and hook.PAGE in mkdocs


def test_field_comments_read_the_block_above_and_the_end_of_line():
    source = ("class ReconConfig:\n    a: int = 1  # beside\n    # above,\n    # two lines\n    b: int = 2\n"
              "\n    c: int = 3\n    # above c's neighbour only\n    d: int = 4  # and beside\n")
    assert _hook().field_comments(source) == {"a": "beside", "b": "above, two lines", "c": "",
                                              "d": "above c's neighbour only and beside"}


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    head = text.split("\n## ")[0]
    assert "make demo" in head and "make test" in head
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_site_builds_strict(tmp_path):
    """``mkdocs build --strict``: a dead link, a missing anchor or a page left out of the nav fails."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        if os.environ.get("CI"):
            pytest.fail("mkdocs and mkdocs-material are needed in CI (the 'docs' extra)")
        pytest.skip("mkdocs / mkdocs-material not installed (pip install -e '.[docs]')")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()
