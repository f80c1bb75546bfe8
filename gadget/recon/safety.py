"""The per-slice safety check: how far a network's image departs from what was measured.

Three figures per slice, all relative L2 norms (unitless, 0 = identical):

* **prediction** (flags by default) — the network is run again without the measured lines nearest
  the ACS band (:func:`withheld_columns`) and its final k-space is compared with those lines:
  ``||k̂_W − y_W|| / ||y_W||``. Zero-filling scores exactly 1; above 1 the network's guess of k-space
  it did not see is worse than no guess — the one figure here that looks at content the network
  invents rather than at lines it was given. Costs one more forward per slice.
* **consistency** — ``||M (k̂ − y)|| / ||M y||``: the network's final multi-coil k-space ``k̂``
  (the last cascade's output, from which its image is formed) against the measured k-space ``y``
  on the sampled lines ``M``. E2E-VarNet's data consistency is soft (a learned weight per
  cascade), so this is not zero; it grows when the last refinement rewrites measured lines.
* **departure** — the network image against a conventional reconstruction of the same slice in the
  band every acquisition measures fully, the ACS (centre) columns: the network magnitude
  low-passed to that band (2-D FFT of the real image, a Hann taper over the band's columns, all
  readout rows, inverse FFT, magnitude) against the RSS of the ACS-only k-space with the same
  taper, both cropped to the recon matrix: ``||LP(x̂) − RSS(F⁻¹ W y)|| / ||RSS(F⁻¹ W y)||``.

Why the low-resolution band and not CG-SENSE: the band is measured fully at any acceleration, so the
reference holds no aliasing and no reconstruction choices of its own, and it costs two FFTs per slice
instead of ESPIRiT plus CG. CG-SENSE's own error grows with the acceleration and collapses with few ACS
lines, so a departure from it flags good network images. The band figure is biased (the low-passed
magnitude is not the RSS of low-passed coil images where the phase or the coil maps vary within the
band's point-spread function: the fully sampled RSS itself does not score 0), so a threshold on it only
catches gross failures.

Defaults (:class:`gadget.recon.config.ReconConfig`): ``safety_prediction_max`` = 1.1,
``safety_consistency_max`` = ``safety_departure_max`` = inf (reported only). Why: on held-out whole heads
consistency and departure did not separate a failing model from a good one (the failing one scored
*lower* consistency on the same slices — both figures grow with the noise the network removes and neither
sees unmeasured k-space); the prediction figure did, weakly, and 1.1 lies above a good model's held-out
slices and below half of a failing one's. Maxima that separated cases on template brains would flag good
images on whole heads with coils close to the scalp: re-measure for other data and weights. The figures
for every model and data set, and the first measurements on template brains: docs/results/safety.md.

Layouts: ``kspace`` / ``final_kspace`` complex ``(coil, readout, phase)``; ``mask`` bool
``(phase,)``; ``image`` real ``(readout, phase)`` (the model's magnitude output, uncropped, in
k-space units: orthonormal FFT, as RSS of the coil images).

``python -m gadget.recon.safety DIR --checkpoint PT`` prints the three figures for every slice of a directory
of fastMRI-layout files (test layout: the file's mask; train layout: undersampled with ``--acceleration``).
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..baselines.espirit import EspiritConfig, espirit_maps
from ..baselines.sense import SenseConfig, cg_sense
from ..mri.coils import rss
from ..mri.fft import fft2c, ifft2c
from ..mri.masks import center_block
from ..mri.metrics import center_crop_at_most

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SafetyFigures:
    consistency: float  # ||M(k̂ − y)|| / ||M y||
    departure: float    # ||LP(x̂) − RSS_band(y)|| / ||RSS_band(y)||
    prediction: Optional[float] = None  # ||k̂_W − y_W|| / ||y_W|| on withheld measured lines (None: not run)

    def exceeds(self, consistency_max: float, departure_max: float, prediction_max: float = math.inf) -> list[str]:
        """The figures past their thresholds, described (empty: the slice passes). NaN fails."""
        out = []
        if not self.consistency <= consistency_max:
            out.append(f"consistency {self.consistency:.3f} > {consistency_max:g}")
        if not self.departure <= departure_max:
            out.append(f"departure {self.departure:.3f} > {departure_max:g}")
        if self.prediction is not None and not self.prediction <= prediction_max:
            out.append(f"prediction {self.prediction:.3f} > {prediction_max:g}")
        return out


def withheld_columns(mask, acs: int, count: int = 4) -> np.ndarray:
    """Sampled columns outside the ACS band (fastMRI's placement) to withhold: the ``count`` nearest
    the band (about half on each side), where the signal stands far above the noise, so a wrong
    guess shows and a right one is not drowned in noise. int ``(n,)``, maybe empty."""
    m = np.asarray(mask, bool).reshape(-1)
    band = center_block(m.size, int(acs))
    outer = np.flatnonzero(m & ~band)
    centre = np.flatnonzero(band).mean()
    return np.sort(outer[np.argsort(np.abs(outer - centre), kind="stable")[:count]])


def prediction_error(run, kspace, mask, acs: int, count: int = 4) -> Optional[float]:
    """How well the network predicts measured lines it was not given: withhold
    :func:`withheld_columns`, reconstruct from the rest with ``run(kspace, mask, acs) -> (image,
    final k-space)`` (``(1, …)`` batches, as :meth:`Reconstructor.run`: the network's own, never
    refined; only the k-space is read), and return
    ``||k̂_W − y_W|| / ||y_W||`` over the withheld columns ``W``. Zero-filling predicts 0 there and
    scores exactly 1; above 1 the network's guess of unmeasured k-space is worse than no guess. None
    when fewer than 2 lines can be withheld (or they hold no signal)."""
    y, m = _slice_inputs(kspace, mask)
    cols = withheld_columns(m, acs, count)
    if cols.size < 2:
        return None
    reduced = m.copy()
    reduced[cols] = False
    given = y * torch.from_numpy(reduced)
    _, final = run(given.numpy()[None], reduced, int(acs))  # only the k-space is read
    k_hat = torch.as_tensor(np.asarray(final)[0])
    idx = torch.from_numpy(cols)
    norm = float(torch.linalg.vector_norm(y[..., idx]))
    if norm == 0.0:
        return None
    return float(torch.linalg.vector_norm(k_hat[..., idx] - y[..., idx])) / norm


def _slice_inputs(kspace, mask) -> tuple[torch.Tensor, np.ndarray]:
    k = torch.as_tensor(np.asarray(kspace)).to(torch.complex64)
    if k.ndim != 3:
        raise ValueError(f"kspace must be complex (coil, readout, phase), got shape {tuple(k.shape)}")
    m = np.asarray(mask, bool).reshape(-1)
    if m.size != k.shape[-1]:
        raise ValueError(f"mask has {m.size} columns, k-space {tuple(k.shape)} has {k.shape[-1]} phase columns")
    return k, m


def consistency(final_kspace, kspace, mask) -> float:
    """``||M (k̂ − y)|| / ||M y||`` over the sampled columns (see the module docstring)."""
    y, m = _slice_inputs(kspace, mask)
    k_hat = torch.as_tensor(np.asarray(final_kspace)).to(torch.complex64)
    if k_hat.shape != y.shape:
        raise ValueError(f"final k-space {tuple(k_hat.shape)} does not match the measured {tuple(y.shape)}")
    cols = torch.from_numpy(np.flatnonzero(m))
    measured = y[..., cols]
    norm = float(torch.linalg.vector_norm(measured))
    if norm == 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(k_hat[..., cols] - measured)) / norm


def acs_window(mask, acs: int) -> np.ndarray:
    """float ``(phase,)``: a Hann taper over the ``acs`` centre columns (fastMRI's placement,
    ``start = (W - acs + 1) // 2``), zero on columns not sampled and outside the band."""
    m = np.asarray(mask, bool).reshape(-1)
    width = m.size
    acs = int(acs)
    if not 1 <= acs <= width:
        raise ValueError(f"ACS count must be in 1..{width}, got {acs}")
    w = np.zeros(width)
    w[center_block(width, acs)] = np.hanning(acs + 2)[1:-1]  # no zero end points: 1 or 2 lines keep theirs
    return w * m


def departure(image, kspace, mask, acs: int, crop: Optional[Sequence[int]] = None) -> float:
    """The low-resolution departure (see the module docstring); ``crop`` = recon ``(H, W)``."""
    y, m = _slice_inputs(kspace, mask)
    x = torch.as_tensor(np.asarray(image, np.float32))
    if x.shape != y.shape[1:]:
        raise ValueError(f"image {tuple(x.shape)} does not match the k-space grid {tuple(y.shape[1:])}")
    w = torch.from_numpy(acs_window(m, acs)).to(torch.float32)
    reference = rss(ifft2c(y * w), dim=0)
    low = ifft2c(fft2c(x.to(torch.complex64)) * w).abs()
    if crop is not None:
        reference, low = center_crop_at_most(reference, tuple(crop)), center_crop_at_most(low, tuple(crop))
    norm = float(torch.linalg.vector_norm(reference))
    if norm == 0.0:
        return 0.0 if float(torch.linalg.vector_norm(low)) == 0.0 else math.inf
    return float(torch.linalg.vector_norm(low - reference)) / norm


def safety_figures(kspace, mask, acs: int, image, final_kspace,
                   crop: Optional[Sequence[int]] = None, run=None) -> SafetyFigures:
    """The figures for one slice: measured ``kspace`` ``(coil, readout, phase)``, ``mask`` ``(phase,)``,
    ACS count, the ``image`` sent ``(readout, phase)`` (the network's after the refine stage) and the
    network's ``final_kspace`` (coil, readout, phase); with ``run`` (the engine's ``run``) also the
    withheld-line :func:`prediction_error` (one more forward)."""
    predicted = prediction_error(run, kspace, mask, acs) if run is not None else None
    return SafetyFigures(consistency(final_kspace, kspace, mask), departure(image, kspace, mask, acs, crop),
                         predicted)


def zero_filled_rss(kspace) -> np.ndarray:
    """RSS of the inverse FFT of the (zero-filled) k-space ``(..., coil, readout, phase)`` → float32
    ``(..., readout, phase)``, uncropped; the same units as the model's magnitude output. The one
    implementation: ``gadget.evaluation.compare.zero_filled`` crops it."""
    y = torch.as_tensor(np.asarray(kspace)).to(torch.complex64)
    return rss(ifft2c(y), dim=-3).numpy().astype(np.float32)


def sense_image(kspace, mask, acs: int, calibration_kspace=None, *, espirit: EspiritConfig = EspiritConfig(),
                config: SenseConfig = SenseConfig()) -> np.ndarray:
    """ESPIRiT maps from the ``acs`` centre lines (of ``calibration_kspace``, a separate reference, when
    given) + CG-SENSE (``gadget.baselines``; ``espirit`` and ``config`` their settings, default the
    defaults), magnitude → float32 ``(readout, phase)``, uncropped (``|x|`` with maps Σ|S|² = 1 is in RSS
    units). The one implementation: ``gadget.evaluation.compare.sense`` calls it per slice."""
    y, m = _slice_inputs(kspace, mask)
    maps = espirit_maps(y if calibration_kspace is None else _slice_inputs(calibration_kspace, mask)[0], int(acs),
                        config=espirit)
    return cg_sense(y, maps, m, config).abs().numpy().astype(np.float32)


# --------------------------------------------------------------------------- measuring (CLI)


def measure_directory(directory, checkpoint: Optional[str] = None, acceleration: Optional[float] = None,
                      center_fraction: float = 0.08, mask_kind: str = "random", max_slices: Optional[int] = None,
                      device: str = "cpu", seed: int = 0) -> list[dict]:
    """Both figures for the slices of every ``*.h5`` fastMRI-layout file in ``directory``:
    rows ``{file, slice, acceleration, acs, consistency, departure}``."""
    from pathlib import Path

    from ..data.fastmri_file import FastMRIVolume, open_volume
    from ..mri.masks import contiguous_center_lines, make_mask
    from ..model.checkpoint import load_checkpoint
    from ..model.shipped import resolve_checkpoint
    from .engine import Reconstructor
    from .fastmri_infer import acquired_mask

    from .refine_stage import Refiner

    engine = Reconstructor(load_checkpoint(resolve_checkpoint(checkpoint)).model, device)
    refiner = Refiner(device=engine.device)  # the default refinement (pi), as the figures were measured
    rows = []
    for path in sorted(Path(directory).glob("*.h5")):
        with open_volume(path) as vol:
            if vol.mask is None:
                if acceleration is None:
                    raise ValueError(f"{path}: fully sampled (no 'mask'); give an acceleration to undersample it")
                drawn, _ = make_mask(mask_kind, vol.kspace.shape[-1], acceleration, center_fraction, seed=seed)
                mask = acquired_mask(FastMRIVolume(path=path, handle=None, kspace=vol.kspace,
                                                   encoding=vol.encoding, mask=drawn))
            else:
                mask = acquired_mask(vol)
            acs = contiguous_center_lines(mask) or None
            if acs is None:
                raise ValueError(f"{path}: the k-space centre column is not sampled; no ACS band")
            n = vol.num_slices
            chosen = range(n) if max_slices is None else range((n - min(max_slices, n)) // 2,
                                                                 (n - min(max_slices, n)) // 2 + min(max_slices, n))
            for s in chosen:
                k = np.asarray(vol.kspace[s], np.complex64) * mask
                image, final = engine.run(k, mask, acs)
                image = refiner(image, final, k, mask, acs)  # the departure figure reads the image sent
                f = safety_figures(k, mask, acs, image[0], final[0], vol.encoding.recon_size, run=engine.run)
                rows.append(dict(file=path.name, slice=s, acceleration=mask.size / mask.sum(), acs=acs,
                                 consistency=f.consistency, departure=f.departure,
                                 prediction=math.nan if f.prediction is None else f.prediction))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gadget.recon.safety",
                                description="Print the safety figures (consistency, departure) of a checkpoint "
                                            "for every slice of a directory of fastMRI-layout files.")
    p.add_argument("directory")
    p.add_argument("--checkpoint", default=None, help="default: the shipped weights")
    p.add_argument("--acceleration", type=float, default=None, help="undersample fully sampled files")
    p.add_argument("--center-fraction", type=float, default=0.08)
    p.add_argument("--mask", default="random", help="random | equispaced | equispaced-fraction")
    p.add_argument("--max-slices", type=int, default=None, help="the middle N slices of each file")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    rows = measure_directory(args.directory, args.checkpoint, args.acceleration, args.center_fraction, args.mask,
                             args.max_slices, args.device)
    print("file\tslice\tacceleration\tacs\tconsistency\tdeparture\tprediction")
    for r in rows:
        print(f"{r['file']}\t{r['slice']}\t{r['acceleration']:.2f}\t{r['acs']}\t{r['consistency']:.4f}\t"
              f"{r['departure']:.4f}\t{r['prediction']:.4f}")
    if rows:
        summary = []
        for key in ("consistency", "departure", "prediction"):
            v = np.array([r[key] for r in rows])
            summary.append(f"{key} {np.nanmin(v):.4f}/{np.nanmedian(v):.4f}/{np.nanmax(v):.4f}")
        print(f"# {len(rows)} slices, min/median/max: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
