"""Scoring reconstructions against targets with fastMRI's ``evaluate.py`` semantics.

Per volume (``(slice, H, W)`` float magnitudes, target and reconstruction in the same units):

1. **Crop** — as fastMRI's ``evaluate``: both are centre-cropped to ``(W, W)`` with ``W`` the
   *target's* width (``target.shape[-1]``). fastMRI's stored targets are already the recon size
   (320 × 320 knee), so this is a no-op there; a taller-than-wide target loses rows, exactly as
   in fastMRI. Where the target is wider than tall (fastMRI raises an error) we crop to
   ``(H, W)`` instead.
2. **Metrics** (:func:`gadget.mri.metrics.volume_metrics`): NMSE over the whole volume; PSNR and
   SSIM (7 × 7 window) with ``data_range = max`` of the cropped target volume.
3. **Aggregate**: unweighted mean over volumes (and the sample standard deviation, fastMRI's
   ``runstats`` convention), overall and per ``acquisition`` attribute.

Targets come from one of :data:`TARGET_KEYS`. ``auto`` takes ``target_noise_free`` (written by
``varnet synth``) when the file has it, else fastMRI's ``reconstruction_rss``: against a noisy RSS
target, methods that denoise are penalised for removing noise.
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Container, Iterable

import h5py
import numpy as np

from ..mri.metrics import center_crop, volume_metrics

NOISE_FREE_TARGET = "target_noise_free"   # same name as gadget.converters.simulate.NOISE_FREE_TARGET
RSS_TARGET = "reconstruction_rss"
TARGET_KEYS = (NOISE_FREE_TARGET, RSS_TARGET)
TARGET_KEY_CHOICES = ("auto",) + TARGET_KEYS
PREDICTION_KEY = "reconstruction"


class EvaluationError(ValueError):
    """Targets/predictions missing or mismatched; the message names the file."""


def resolve_target_key(datasets: Container[str], key: str = "auto", source: str = "") -> str:
    """The target dataset to score against: ``key`` itself, or for ``auto`` the noise-free target
    when present, else ``reconstruction_rss``."""
    where = f"{source}: " if source else ""
    if key not in TARGET_KEY_CHOICES:
        raise EvaluationError(f"unknown target key {key!r}; choose one of {', '.join(TARGET_KEY_CHOICES)}")
    candidates = TARGET_KEYS if key == "auto" else (key,)
    for name in candidates:
        if name in datasets:
            return name
    raise EvaluationError(f"{where}no target dataset ({' or '.join(candidates)}); test-layout fastMRI files "
                          "carry none — score on train/val files or files from 'varnet synth'")


def fastmri_eval_crop(target: np.ndarray, recon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both ``(..., H, W)`` volumes to ``(min(H, W), W)`` of the target (fastMRI: ``(W, W)``)."""
    h, w = target.shape[-2:]
    crop = (min(h, w), w)
    if recon.shape[-2] < crop[0] or recon.shape[-1] < crop[1]:
        raise EvaluationError(f"reconstruction {recon.shape[-2:]} is smaller than the evaluation crop {crop} "
                              f"(target {target.shape[-2:]})")
    return center_crop(target, crop), center_crop(recon, crop)


def score_volume(target, recon) -> dict[str, float]:
    """``{"nmse", "psnr", "ssim"}`` of one volume ``(slice, H, W)`` after :func:`fastmri_eval_crop`."""
    target, recon = np.asarray(target), np.asarray(recon)
    if target.ndim != 3 or recon.ndim != 3 or target.shape[0] != recon.shape[0]:
        raise EvaluationError(f"expected volumes (slice, H, W) with equal slice counts, got target "
                              f"{target.shape} and reconstruction {recon.shape}")
    return volume_metrics(*fastmri_eval_crop(target, recon))


# ----------------------------------------------------------------------------- aggregation


@dataclass
class VolumeScore:
    """Scores of one volume: ``file`` name, ``acquisition`` attribute, target dataset used."""

    file: str
    acquisition: str
    target_key: str
    slices: int
    nmse: float
    psnr: float
    ssim: float


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; NaN for a single value)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


@dataclass
class EvaluationResult:
    """Per-volume scores; :meth:`groups` gives the means overall and per acquisition."""

    volumes: list[VolumeScore]

    def groups(self) -> list[dict]:
        """One dict per group (``"all"`` first, then each acquisition, sorted): ``group``,
        ``volumes``, ``slices``, ``target`` (keys used), and ``<metric>`` / ``<metric>_std``."""
        keyed = [("all", self.volumes)]
        acquisitions = sorted({v.acquisition for v in self.volumes})
        if len(acquisitions) > 1 or (acquisitions and acquisitions != [""]):
            keyed += [(a or "(none)", [v for v in self.volumes if v.acquisition == a]) for a in acquisitions]
        out = []
        for name, vols in keyed:
            row = {"group": name, "volumes": len(vols), "slices": sum(v.slices for v in vols),
                   "target": ", ".join(sorted({v.target_key for v in vols}))}
            for metric in ("nmse", "psnr", "ssim"):
                row[metric], row[f"{metric}_std"] = mean_std(getattr(v, metric) for v in vols)
            out.append(row)
        return out

    def mean(self) -> dict[str, float]:
        """Mean NMSE/PSNR/SSIM over all volumes (what fastMRI's ``evaluate`` prints)."""
        row = self.groups()[0]
        return {m: row[m] for m in ("nmse", "psnr", "ssim")}

    def to_markdown(self) -> str:
        return format_groups_markdown(self.groups())

    def write_csv(self, path: str | Path) -> None:
        """Per-volume rows: file, acquisition, target_key, slices, nmse, psnr, ssim."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(self.volumes[0]) if self.volumes else
                                                       VolumeScore.__dataclass_fields__))
            writer.writeheader()
            for v in self.volumes:
                writer.writerow(asdict(v))


def _pm(mean: float, std: float, fmt: str) -> str:
    return format(mean, fmt) + ("" if math.isnan(std) else " ± " + format(std, fmt))


def format_groups_markdown(groups: list[dict]) -> str:
    """Markdown table of :meth:`EvaluationResult.groups` (mean ± sample std over volumes)."""
    lines = ["| group | volumes | slices | NMSE | PSNR (dB) | SSIM | target |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for g in groups:
        lines.append(f"| {g['group']} | {g['volumes']} | {g['slices']} | {_pm(g['nmse'], g['nmse_std'], '.4g')} | "
                     f"{_pm(g['psnr'], g['psnr_std'], '.2f')} | {_pm(g['ssim'], g['ssim_std'], '.4f')} | "
                     f"{g['target']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files


def _h5_files(path: Path, role: str) -> list[Path]:
    if path.is_dir():
        return sorted(path.glob("*.h5"))
    if path.is_file():
        return [path]
    raise EvaluationError(f"{role} not found: {path}")


def _decode(value) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def evaluate_predictions(targets: str | Path, predictions: str | Path, target_key: str = "auto",
                         skip_missing: bool = False) -> EvaluationResult:
    """Score every target file that has a prediction of the same name.

    Args:
        targets: a directory of fastMRI-layout ``.h5`` files with a target dataset (or one file).
        predictions: a directory of ``.h5`` files with ``reconstruction`` float ``(slice, H, W)``
            (``varnet infer`` output, the fastMRI submission layout), or one file.
        target_key: ``auto`` | ``target_noise_free`` | ``reconstruction_rss``.
        skip_missing: score only the targets that have a prediction; otherwise a missing
            prediction is an error (as in fastMRI's ``evaluate``).
    """
    targets, predictions = Path(targets), Path(predictions)
    target_files = _h5_files(targets, "targets")
    if not target_files:
        raise EvaluationError(f"no .h5 files in {targets}")
    pred_dir = predictions if predictions.is_dir() else None
    if pred_dir is None and not predictions.is_file():
        raise EvaluationError(f"predictions not found: {predictions}")

    def prediction_for(tgt: Path) -> Path:
        return pred_dir / tgt.name if pred_dir is not None else predictions

    if pred_dir is None and len(target_files) != 1:
        raise EvaluationError("a single prediction file needs a single target file")
    missing = [t.name for t in target_files if not prediction_for(t).is_file()]
    if missing and not skip_missing:
        raise EvaluationError(f"{len(missing)} target file(s) have no prediction in {predictions}: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    scores = []
    for tgt in target_files:
        pred = prediction_for(tgt)
        if not pred.is_file():
            continue
        scores.append(score_files(tgt, pred, target_key))
    if not scores:
        raise EvaluationError(f"no target in {targets} has a prediction in {predictions}")
    return EvaluationResult(scores)


def score_files(target_file: Path, prediction_file: Path, target_key: str = "auto") -> VolumeScore:
    """Score one prediction file against one target file (see the module docstring)."""
    with h5py.File(target_file, "r") as tf:
        key = resolve_target_key(tf, target_key, str(target_file))
        target = tf[key][()]
        acquisition = _decode(tf.attrs.get("acquisition"))
    with h5py.File(prediction_file, "r") as pf:
        if PREDICTION_KEY not in pf:
            raise EvaluationError(f"{prediction_file}: no '{PREDICTION_KEY}' dataset")
        recon = pf[PREDICTION_KEY][()]
    try:
        metrics = score_volume(target, recon)
    except ValueError as exc:
        raise EvaluationError(f"{target_file.name}: {exc}") from None
    return VolumeScore(file=target_file.name, acquisition=acquisition, target_key=key,
                       slices=int(target.shape[0]), **metrics)
