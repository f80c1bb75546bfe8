"""A contact sheet of simulated volumes: the middle slice of each file, target and one coil image.

Used by ``varnet synth --preview`` so every generated data set can be looked at before training.
Images are magnitudes, each panel windowed to its own 99.5th percentile.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def preview_panels(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """``(title, RSS target (H, W), coil-0 magnitude (os·H, W))`` of the middle slice of a synth file."""
    import h5py

    from .simulate import image_from_kspace

    with h5py.File(path, "r") as f:
        s = f["kspace"].shape[0] // 2
        kspace = f["kspace"][s]
        target = f["reconstruction_rss"][s]
        title = f"{f.attrs.get('acquisition', '')} {tuple(kspace.shape)}"
    coil = np.abs(image_from_kspace(kspace[:1]))[0]
    return title, target, coil


def write_preview(paths: Sequence[Path], out_png: Path, max_volumes: int = 8) -> Path:
    """Write a 2-row sheet (targets above, coil-0 images below) of up to ``max_volumes`` files."""
    from matplotlib.figure import Figure

    paths = list(paths)[:max_volumes]
    if not paths:
        raise ValueError("no files to preview")
    fig = Figure(figsize=(3 * len(paths), 6.4))
    axes = fig.subplots(2, len(paths), squeeze=False)
    for col, path in enumerate(paths):
        title, target, coil = preview_panels(Path(path))
        for row, (image, label) in enumerate(((target, title), (coil, "coil 1"))):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=0, vmax=float(np.percentile(image, 99.5)) or 1.0)
            ax.set_title(label, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=60)
    return out_png
