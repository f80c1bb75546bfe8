"""``varnet adapt --report DIR``: the Γ-loss curve and before/after images of a few slices, as PNG, plus
the curve as CSV."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..model.varnet import VarNet
from ..mri.coils import rss
from ..mri.fft import ifft2c
from .adapt import AdaptResult, AdaptSlice


def _images(model: VarNet, sl: AdaptSlice) -> np.ndarray:
    """The network's image ``(readout, phase)`` of one slice from all its acquired lines."""
    k = torch.from_numpy(np.ascontiguousarray(sl.kspace, np.complex64))[None]
    extra = {} if sl.sens_kspace is None else {"sens_kspace": torch.from_numpy(sl.sens_kspace)[None]}
    with torch.inference_mode():
        return model(k, torch.from_numpy(sl.mask), sl.acs, **extra)[0].float().numpy()


def write_report(directory: Path, result: AdaptResult, before: VarNet, after: VarNet,
                 slices: Sequence[AdaptSlice], count: int = 3) -> list[Path]:
    """``gamma_curve.csv``, ``gamma_curve.png`` and ``slices.png`` (zero-filled, before, after for
    ``count`` slices spread over ``slices``) in ``directory``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / "gamma_curve.csv", directory / "gamma_curve.png", directory / "slices.png"]
    with open(written[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "seconds", "train_loss", "gamma"])
        writer.writeheader()
        writer.writerows(result.curve)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = [e["step"] for e in result.curve]
    ax.plot(steps, [e["gamma"] for e in result.curve], "o-", label="Γ loss (held-back lines)")
    trained = [e for e in result.curve if e["train_loss"] is not None]
    if trained:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in trained], [e["train_loss"] for e in trained], "s--", color="tab:orange",
                 label="training loss (Λ)")
        ax2.set_ylabel("training loss (Λ)")
    ax.axvline(result.best_step, color="grey", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("Γ loss (normalised squared error)")
    ax.set_title(f"kept: step {result.best_step} ({result.stopped})", fontsize=9)
    fig.tight_layout()
    fig.savefig(written[1], dpi=110)
    plt.close(fig)

    picked = [slices[i] for i in sorted({int(round(x)) for x in np.linspace(0, len(slices) - 1, min(count, len(slices)))})]
    fig, axes = plt.subplots(len(picked), 3, figsize=(7.5, 2.6 * len(picked)), squeeze=False)
    for row, sl in zip(axes, picked):
        zero_filled = rss(ifft2c(torch.from_numpy(np.ascontiguousarray(sl.kspace, np.complex64))), dim=0).numpy()
        shown = [zero_filled, _images(before, sl), _images(after, sl)]
        top = max(float(np.percentile(img, 99.5)) for img in shown) or 1.0
        for ax, img, title in zip(row, shown, ("zero-filled", "before", "after")):
            ax.imshow(img, cmap="gray", vmin=0, vmax=top)
            ax.set_title(f"{sl.name}: {title}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(written[2], dpi=110)
    plt.close(fig)
    return written
