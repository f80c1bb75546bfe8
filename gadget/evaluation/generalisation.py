"""A generalisation matrix: models against test sets they did or did not see in training.

A spec (YAML, see ``experiments/generalisation/configs/generalisation_matrix.example.yaml``) names

* ``models``: ``name → {checkpoint, trained_on: {sources, coils, contrasts}}`` (``checkpoint:
  shipped`` is the packaged weights; ``coils`` / ``contrasts`` optional);
* ``test_sets``: ``name → {path, source, coils, contrast}`` (``path``: a directory of fully
  sampled fastMRI-layout files or one file; ``coils`` / ``contrast`` optional);
* ``accelerations``: a list of ``{acceleration, center_fraction}``; ``mask`` (fastMRI mask kind,
  default ``equispaced-fraction``), ``max_slices``, ``methods`` (baselines, default
  ``zero-filled, sense, bart``; the models always run) and ``target_key`` (default ``auto``).

:func:`run_matrix` calls :func:`gadget.evaluation.compare.compare_methods` once per acceleration
with every test set as one source and every model as one ``varnet:NAME`` row, so all methods see
the same masks. A model cell is *seen in training* when the test set's ``source`` is one of the
model's training sources, else *held out*; coil models or contrasts the model was not trained on
are listed under the table. Relative paths are taken from the current directory.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..mri.masks import MaskSpec
from .compare import Undersample, compare_methods, parse_methods
from .scoring import TARGET_KEY_CHOICES, EvaluationError
from .sources import check_name

SEEN, HELD_OUT = "seen in training", "held out"
BASELINE_LABELS = {"zero-filled": "zero-filled", "sense": "CG-SENSE", "bart": "BART pics-L1"}
MASK_KINDS = ("random", "equispaced", "equispaced-fraction")
CSV_FIELDS = ("test_set", "source", "acceleration", "center_fraction", "mask", "method", "model", "training",
              "ssim", "psnr", "nmse", "volumes", "slices", "status", "note")


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint and what it was trained on (anatomy sources, coil models, contrasts)."""

    name: str
    checkpoint: str
    sources: tuple[str, ...]
    coils: tuple[str, ...] = ()
    contrasts: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalSet:
    """Fully sampled files from one anatomy source (optionally its coil model and contrast)."""

    name: str
    path: Path
    source: str
    coils: Optional[str] = None
    contrast: Optional[str] = None


@dataclass
class MatrixSpec:
    """A parsed spec (see the module docstring)."""

    models: list[ModelSpec]
    test_sets: list[EvalSet]
    undersamples: list[Undersample]
    methods: list[str] = field(default_factory=lambda: ["zero-filled", "sense", "bart"])
    max_slices: Optional[int] = None
    target_key: str = "auto"


def _norm(value: str) -> str:
    return str(value).strip().lower()


def training_label(model: ModelSpec, test_set: EvalSet) -> str:
    """``"seen in training"`` when the test set's source is among the model's training sources
    (case-insensitive), else ``"held out"``."""
    return SEEN if _norm(test_set.source) in {_norm(s) for s in model.sources} else HELD_OUT


def unseen_factors(model: ModelSpec, test_set: EvalSet) -> list[str]:
    """Coil model / contrast of the test set that the model did not train on (only where both name them)."""
    out = []
    for what, value, trained in (("coils", test_set.coils, model.coils), ("contrast", test_set.contrast,
                                                                          model.contrasts)):
        if value is not None and trained and _norm(value) not in {_norm(t) for t in trained}:
            out.append(f"{what} {value}")
    return out


# ----------------------------------------------------------------------------- spec


def _keys(where: str, d: Any, required: Sequence[str], optional: Sequence[str] = ()) -> dict:
    if not isinstance(d, Mapping):
        raise EvaluationError(f"{where}: expected a mapping, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    unknown = [k for k in d if k not in (*required, *optional)]
    if missing:
        raise EvaluationError(f"{where}: missing {', '.join(missing)}")
    if unknown:
        raise EvaluationError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} "
                              f"(known: {', '.join((*required, *optional))})")
    return dict(d)


def _named(where: str, d: Any) -> dict:
    """A non-empty ``name → settings`` mapping."""
    if not isinstance(d, Mapping) or not d:
        raise EvaluationError(f"{where}: expected a non-empty mapping of name → settings, got {d!r}")
    return dict(d)


def _strings(where: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, (str, int)) for v in items):
        raise EvaluationError(f"{where}: expected a name or a list of names, got {value!r}")
    return tuple(str(v) for v in items)


def _positive(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise EvaluationError(f"{where}: expected a positive number, got {value!r}")
    return float(value)


def parse_spec(data: Any, where: str = "spec") -> MatrixSpec:
    """Validate a spec mapping (as loaded from YAML); errors name the offending key."""
    top = _keys(where, data, ("models", "test_sets", "accelerations"),
                ("mask", "max_slices", "methods", "target_key"))
    models = []
    for name, m in _named(f"{where}: models", top["models"]).items():
        w = f"{where}: models.{name}"
        m = _keys(w, m, ("checkpoint", "trained_on"))
        t = _keys(f"{w}.trained_on", m["trained_on"], ("sources",), ("coils", "contrasts"))
        models.append(ModelSpec(check_name(str(name), w), str(m["checkpoint"]),
                                _strings(f"{w}.trained_on.sources", t["sources"]),
                                _strings(f"{w}.trained_on.coils", t.get("coils", ())),
                                _strings(f"{w}.trained_on.contrasts", t.get("contrasts", ()))))
    test_sets = []
    for name, t in _named(f"{where}: test_sets", top["test_sets"]).items():
        w = f"{where}: test_sets.{name}"
        t = _keys(w, t, ("path", "source"), ("coils", "contrast"))
        test_sets.append(EvalSet(check_name(str(name), w), Path(str(t["path"])), str(t["source"]),
                                 None if t.get("coils") is None else str(t["coils"]),
                                 None if t.get("contrast") is None else str(t["contrast"])))
    if not models or not test_sets:
        raise EvaluationError(f"{where}: needs at least one model and one test set")
    mask = top.get("mask", "equispaced-fraction")
    if mask not in MASK_KINDS:
        raise EvaluationError(f"{where}: mask {mask!r}; choose from {', '.join(MASK_KINDS)}")
    accels = top["accelerations"]
    if not isinstance(accels, list) or not accels:
        raise EvaluationError(f"{where}: accelerations must be a non-empty list of {{acceleration, center_fraction}}")
    undersamples = []
    for i, a in enumerate(accels):
        a = _keys(f"{where}: accelerations[{i}]", a, ("acceleration", "center_fraction"))
        r = _positive(f"{where}: accelerations[{i}].acceleration", a["acceleration"])
        cf = _positive(f"{where}: accelerations[{i}].center_fraction", a["center_fraction"])
        if r <= 1 or cf >= 1:
            raise EvaluationError(f"{where}: accelerations[{i}]: need acceleration > 1 and center_fraction < 1, "
                                  f"got {r:g} and {cf:g}")
        try:
            MaskSpec(mask, [cf], [r])  # the mask library's own checks (e.g. integer R for equispaced)
        except ValueError as exc:
            raise EvaluationError(f"{where}: accelerations[{i}]: {exc}") from None
        undersamples.append(Undersample(r, cf, mask))
    try:
        methods = [m for m in parse_methods(top.get("methods", ["zero-filled", "sense", "bart"])) if m != "varnet"]
    except ValueError as exc:
        raise EvaluationError(f"{where}: methods: {exc}") from None
    max_slices = top.get("max_slices")
    if max_slices is not None and (isinstance(max_slices, bool) or not isinstance(max_slices, int) or max_slices < 1):
        raise EvaluationError(f"{where}: max_slices must be a positive integer, got {max_slices!r}")
    target_key = top.get("target_key", "auto")
    if target_key not in TARGET_KEY_CHOICES:
        raise EvaluationError(f"{where}: target_key {target_key!r}; choose from {', '.join(TARGET_KEY_CHOICES)}")
    return MatrixSpec(models, test_sets, undersamples, methods, max_slices, target_key)


def load_spec(path: str | Path) -> MatrixSpec:
    """:func:`parse_spec` of a YAML file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise EvaluationError(f"{path}: {exc}") from None
    return parse_spec(data, str(path))


# ----------------------------------------------------------------------------- records and layout


def matrix_records(rows: Sequence[dict], undersample: Undersample, spec: MatrixSpec) -> list[dict]:
    """Flatten one :func:`compare_methods` result (test sets as sources) into one record per test
    set and method, with the model name and its training label for ``varnet:NAME`` rows."""
    models = {f"varnet:{m.name}": m for m in spec.models}
    sets = {t.name: t for t in spec.test_sets}
    out = []
    for row in rows:
        model = models.get(row["method"])
        for part in row["by_source"]:
            ts = sets[part["source"]]
            out.append({"test_set": ts.name, "source": ts.source, "acceleration": undersample.acceleration,
                        "center_fraction": undersample.center_fraction, "mask": undersample.kind,
                        "method": row["method"], "model": model.name if model else "",
                        "training": training_label(model, ts) if model else "",
                        **{k: part[k] for k in ("ssim", "psnr", "nmse", "volumes", "slices", "status", "note")}})
    return out


def _cell(rec: Optional[dict], best: bool) -> str:
    if rec is None:
        return "—"
    if rec["status"] != "ok" or math.isnan(rec["ssim"]):
        return f"— ({rec['status']})"
    text = f"{rec['ssim']:.3f} / {rec['psnr']:.2f}"
    text = f"**{text}**" if best else text
    return f"{text} ({rec['training']})" if rec["training"] else text


def matrix_markdown(records: Sequence[dict], spec: MatrixSpec) -> str:
    """The matrix: a row per test set × acceleration; a column per baseline and per model; cells
    SSIM / PSNR dB (best SSIM of the row in bold), model cells marked seen in training / held out."""
    columns = [(m, BASELINE_LABELS[m]) for m in spec.methods] + [(f"varnet:{m.name}", m.name) for m in spec.models]
    index = {(r["test_set"], r["acceleration"], r["center_fraction"], r["method"]): r for r in records}
    lines = ["# Generalisation matrix", "",
             "Cells: SSIM / PSNR (dB), means over volumes (fastMRI semantics); the best SSIM of a row in bold. "
             f"Model cells: *{SEEN}* when the test set's source is one of the model's training sources, "
             f"else *{HELD_OUT}*.", "",
             "| test set (source) | R (centre fraction) | " + " | ".join(label for _, label in columns) + " |",
             "|---|---|" + "---:|" * len(columns)]
    for u in spec.undersamples:
        for ts in spec.test_sets:
            cells = [index.get((ts.name, u.acceleration, u.center_fraction, key)) for key, _ in columns]
            scores = [c["ssim"] for c in cells if c and c["status"] == "ok" and not math.isnan(c["ssim"])]
            top = max(scores) if scores else None
            lines.append(f"| {ts.name} ({ts.source}) | {u.acceleration:g}× ({u.center_fraction:g}) | "
                         + " | ".join(_cell(c, c is not None and c["ssim"] == top) for c in cells) + " |")
    lines += ["", f"Masks: {spec.undersamples[0].kind}, seeded by file name; "
              f"{'all slices' if spec.max_slices is None else f'middle {spec.max_slices} slice(s) per file'}.", "",
              "Models:", ""]
    for m in spec.models:
        extra = "".join(f"; {k}: {', '.join(v)}" for k, v in (("coils", m.coils), ("contrasts", m.contrasts)) if v)
        lines.append(f"- {m.name}: `{m.checkpoint}`, trained on sources: {', '.join(m.sources)}{extra}")
    shifts = [f"- {m.name} on {ts.name}: {', '.join(f)} not in training"
              for m in spec.models for ts in spec.test_sets if (f := unseen_factors(m, ts))]
    if shifts:
        lines += ["", "Other differences from training:", ""] + shifts
    failures = sorted({f"- {r['method']} on {r['test_set']}: {r['status']}: {r['note']}" for r in records
                       if r["status"] != "ok"})
    if failures:
        lines += ["", "Not scored:", ""] + failures
    return "\n".join(lines) + "\n"


def write_matrix(out_dir: str | Path, records: Sequence[dict], spec: MatrixSpec) -> dict[str, Path]:
    """``matrix.md`` and ``matrix.csv`` (one line per test set, acceleration and method) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "matrix.md", "csv": out / "matrix.csv"}
    paths["markdown"].write_text(matrix_markdown(records, spec))
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    return paths


def run_matrix(spec: MatrixSpec, out_dir: str | Path, device: str = "auto", **compare_kwargs) -> list[dict]:
    """Run every setting of ``spec`` (one :func:`compare_methods` call per acceleration, its report
    in ``OUT/R{R}_cf{F}/``), write ``matrix.md`` / ``matrix.csv`` and return the records."""
    out = Path(out_dir)
    sources = {t.name: t.path for t in spec.test_sets}
    checkpoints = {m.name: m.checkpoint for m in spec.models}
    records: list[dict] = []
    for u in spec.undersamples:
        rows = compare_methods(sources, spec.methods + ["varnet"], checkpoints, undersample=u,
                               max_slices=spec.max_slices, target_key=spec.target_key, device=device,
                               out_dir=out / f"R{u.acceleration:g}_cf{u.center_fraction:g}", **compare_kwargs)
        records += matrix_records(rows, u, spec)
    write_matrix(out, records, spec)
    return records
