"""The built-in demo job: simulate → undersample → E2E-VarNet → images, PNG and metrics.

Until the streaming doors exist this runs the most complete real path: a simulated multi-coil
scan written as a fastMRI test-format file and reconstructed by the same code as
``varnet infer``. No trained weights ship yet, so the demo first fits a small E2E-VarNet on
other simulated volumes for a fixed time budget (stated in the output).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from converters.simulate import SimulatedVolume, simulate_volume, write_fastmri

from .data.fastmri_file import open_volume, write_reconstruction
from .model.checkpoint import save_checkpoint
from .model.varnet import VarNet, VarNetConfig
from .mri.coils import rss
from .mri.fft import ifft2c
from .mri.masks import MaskSampler, MaskSpec
from .mri.metrics import center_crop, volume_metrics
from .recon.engine import Reconstructor
from .recon.fastmri_infer import reconstruct_volume

log = logging.getLogger(__name__)
DEMO_MODEL = VarNetConfig(num_cascades=4, chans=12, pools=3, sens_chans=4, sens_pools=2)


@dataclass
class DemoSettings:
    out_dir: Path
    train_seconds: float = 60.0
    acceleration: int = 4
    center_fraction: float = 0.08
    image_size: tuple[int, int] = (96, 96)
    coils: int = 8
    seed: int = 0


def _masked_batch(vol: SimulatedVolume, index: int, sampler: MaskSampler, seed: int):
    mask, num_low = sampler(vol.kspace.shape[-1], seed=seed)
    k = torch.from_numpy(vol.kspace[index:index + 1]) * torch.from_numpy(mask)
    target = torch.from_numpy(vol.target[index:index + 1])
    return k, torch.from_numpy(mask), num_low, target


def fit_briefly(settings: DemoSettings, progress=print) -> VarNet:
    """Train ``DEMO_MODEL`` with an L1 loss (images scaled by the target max) on simulated
    volumes until the time budget is spent. Returns the model in eval mode."""
    torch.manual_seed(settings.seed)
    train = [simulate_volume(6, settings.coils, settings.image_size, seed=settings.seed + 100 + i)
             for i in range(3)]
    sampler = MaskSampler(MaskSpec("equispaced-fraction", [settings.center_fraction], [settings.acceleration],
                                   seed=settings.seed))
    model = VarNet.from_config(DEMO_MODEL)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(settings.seed)
    start, step, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < settings.train_seconds:
        vol = train[rng.integers(len(train))]
        k, mask, num_low, target = _masked_batch(vol, int(rng.integers(vol.kspace.shape[0])), sampler,
                                                 seed=int(rng.integers(1 << 30)))
        out = center_crop(model(k, mask, num_low), target.shape[-2:])
        scale = target.max()
        loss = torch.nn.functional.l1_loss(out / scale, target / scale)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.detach().item())
        step += 1
        if step % 25 == 0:
            progress(f"  training step {step:4d}  L1 {np.mean(losses[-25:]):.4f}  "
                     f"({time.perf_counter() - start:.0f}/{settings.train_seconds:.0f} s)")
    progress(f"  trained {step} steps in {time.perf_counter() - start:.0f} s")
    return model.eval()


def zero_filled(kspace: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """RSS of the inverse FFT of the (already undersampled) k-space, ``(slice, H, W)``."""
    img = rss(ifft2c(torch.from_numpy(kspace)), dim=1).numpy()
    return np.ascontiguousarray(center_crop(img, crop))


def save_comparison_png(path: Path, truth: np.ndarray, recons: dict[str, np.ndarray], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmax = float(truth.max())
    cols = 1 + len(recons)
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 6.4))
    axes[0, 0].imshow(truth, cmap="gray", vmin=0, vmax=vmax)
    axes[0, 0].set_title("truth (noise-free)")
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
    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    progress(f"[1/4] fitting a small E2E-VarNet on simulated phantoms for {settings.train_seconds:.0f} s "
             "(no trained weights ship yet)")
    model = fit_briefly(settings, progress)
    ckpt = out / "demo_model.pt"
    save_checkpoint(ckpt, model, {"data": "simulated Shepp-Logan phantoms (varnet demo)",
                                  "masks": f"equispaced-fraction {settings.acceleration}x, "
                                           f"center fraction {settings.center_fraction}",
                                  "train_seconds": settings.train_seconds})

    progress("[2/4] simulating a held-out undersampled scan (fastMRI test format)")
    vol = simulate_volume(4, settings.coils, settings.image_size, seed=settings.seed + 999)
    sampler = MaskSampler(MaskSpec("equispaced-fraction", [settings.center_fraction], [settings.acceleration]))
    mask, num_low = sampler(vol.kspace.shape[-1], seed=settings.seed + 999)
    scan = out / "scan_test_format.h5"
    write_fastmri(scan, vol, mask=mask, num_low_frequency=num_low, acceleration=settings.acceleration)

    progress("[3/4] reconstructing with the varnet infer path")
    engine = Reconstructor(model, "auto")
    with open_volume(scan) as volume:
        recon = reconstruct_volume(engine, volume)
        zf = zero_filled(volume.kspace[()], recon.shape[-2:])
    write_reconstruction(out / "reconstruction.h5", recon)

    progress("[4/4] metrics against the noise-free target; PNG comparison")
    truth = vol.target
    results = {"zero-filled": volume_metrics(truth, zf), "E2E-VarNet": volume_metrics(truth, recon)}
    mid = truth.shape[0] // 2
    save_comparison_png(out / "comparison.png", truth[mid], {"zero-filled": zf[mid], "E2E-VarNet": recon[mid]},
                        f"{settings.acceleration}x equispaced, {num_low} ACS lines, slice {mid}")
    return results
