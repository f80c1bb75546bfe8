"""The built-in demo job: a simulated undersampled raw scan streamed through the gadget.

A simulated multi-coil whole-head scan (:mod:`gadget.converters.headsim`: scalp, fat and skull around
the brain, coils close to the scalp, the head filling the phase field of view; with a noise scan)
is written as a raw ISMRMRD file and streamed through the same pipeline the Gadgetron and
MRD-server doors use (replay door), once zero-filled and once with E2E-VarNet; images go to HDF5
as Gadgetron's client writes them, plus a PNG comparison and metrics against fastMRI's target
(the RSS of the fully sampled k-space). The model is the one shipped inside the package
(``gadget/weights``), unless a checkpoint is given.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from gadget.converters.headsim import HeadScan, simulate_head_volume
from gadget.converters.simulate import write_fastmri
from gadget.converters.tissue import CONTRAST_SIGNALS

from .mri.metrics import volume_metrics
from .recon.engine import Reconstructor


@dataclass
class DemoSettings:
    out_dir: Path
    checkpoint: Optional[Path] = None  # None: the shipped weights
    acceleration: int = 4
    center_fraction: float = 0.08
    mask: str = "equispaced-fraction"  # fastMRI's test masks
    source: str = "mni"                # mni (derived head, installs with the package), colin, inia
    orientation: str = "axial"
    coils: int = 12
    seed: int = 0

    def scan(self) -> HeadScan:
        """A fixed whole-head T1w scan: readout FOV 1.1 × the head, phase FOV 0.95 × (the head
        fills it and folds in slightly), 1.4 mm pixels, 2× readout oversampling, SNR 30 dB."""
        return HeadScan(self.source, "t1w", np.array(CONTRAST_SIGNALS["t1w"], np.float32), self.orientation,
                        swap_axes=False, read_margin=1.1, phase_ratio=0.95, pixel_mm=1.4, phase_pixel_ratio=1.0,
                        oversampling=2, coils=self.coils, coil_gap_mm=10.0, snr_db=30.0, texture=0.04, bias=0.15)


def save_comparison_png(path: Path, truth: np.ndarray, recons: dict[str, np.ndarray], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmax = float(truth.max())
    cols = 1 + len(recons)
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 6.4))
    axes[0, 0].imshow(truth, cmap="gray", vmin=0, vmax=vmax)
    axes[0, 0].set_title("fully sampled RSS")
    axes[1, 0].axis("off")
    for col, (name, img) in enumerate(recons.items(), start=1):
        axes[0, col].imshow(img, cmap="gray", vmin=0, vmax=vmax)
        axes[0, col].set_title(name)
        axes[1, col].imshow(np.abs(img - truth), cmap="magma", vmin=0, vmax=0.2 * vmax)
        axes[1, col].set_title(f"|error| ({name})")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_demo(settings: DemoSettings, progress=print) -> dict[str, dict[str, float]]:
    """Simulate → raw ISMRMRD → gadget pipeline (zero-filled and E2E-VarNet) → images, PNG, metrics.

    The scan is a held-out simulated volume (a seed no training volume used)."""
    from gadget.converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd

    from .model.checkpoint import load_checkpoint, resolve_refine
    from .model.shipped import resolve_checkpoint
    from .recon.config import ReconConfig
    from .replay import replay_file
    from .stream.images import image_magnitude
    from .stream.sinks import write_images_h5

    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(resolve_checkpoint(settings.checkpoint))
    loaded = load_checkpoint(ckpt)
    model_id = f"{ckpt.name} (sha256 {loaded.sha256[:12]})"
    progress(f"[1/4] model {ckpt}: {loaded.description.get('data', 'no description')}")

    progress(f"[2/4] simulating a held-out {settings.source} scan: raw ISMRMRD file with a noise scan, "
             f"{settings.acceleration}x undersampled")
    vol = simulate_head_volume(settings.scan(), 4, np.random.default_rng(settings.seed + 999))
    write_fastmri(out / "scan_fully_sampled.h5", vol, with_noise=True)
    raw = out / "scan_raw_ismrmrd.h5"
    plan = convert_fastmri_to_ismrmrd(out / "scan_fully_sampled.h5", raw, settings.mask,
                                      settings.acceleration, settings.center_fraction, seed=settings.seed)

    progress("[3/4] streaming the acquisitions through the gadget pipeline (replay door): "
             "zero-filled and E2E-VarNet")
    # The models were trained on coil data as simulated (not prewhitened), so the stream is not either.
    base = dict(prewhiten=False, checkpoint=str(ckpt), device="auto")
    zf_run = replay_file(raw, ReconConfig(mode="zero-filled", image_series_index=2, **base), None)
    refine = resolve_refine("auto", loaded)[0]  # the checkpoint's own (pi when shipped); the pipeline applies it
    vn_run = replay_file(raw, ReconConfig(mode="varnet", refine=refine, **base), Reconstructor(loaded.model, "auto"),
                         model_id=model_id)
    (out / "images.h5").unlink(missing_ok=True)  # the demo's own output: a rerun replaces it
    write_images_h5(out / "images.h5", zf_run.images + vn_run.images, "demo")
    zf = np.stack([image_magnitude(im) for im in zf_run.images])
    recon = np.stack([image_magnitude(im) for im in vn_run.images])

    progress("[4/4] metrics against the RSS of the fully sampled k-space (fastMRI's target); PNG comparison")
    truth = vol.target_rss
    results = {"zero-filled": volume_metrics(truth, zf), "E2E-VarNet": volume_metrics(truth, recon)}
    mid = truth.shape[0] // 2
    save_comparison_png(out / "comparison.png", truth[mid], {"zero-filled": zf[mid], "E2E-VarNet": recon[mid]},
                        f"{settings.source} whole head {settings.orientation}, {settings.acceleration}x {settings.mask}, "
                        f"{plan.num_low} ACS lines, slice {mid}, streamed through the gadget")
    return results
