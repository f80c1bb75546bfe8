"""The built-in demo job: a simulated undersampled raw scan streamed through the gadget.

A simulated multi-coil brain scan (with a noise scan) is written as a raw ISMRMRD file and
streamed through the same pipeline the Gadgetron and MRD-server doors use (replay door), once
zero-filled and once with E2E-VarNet; images go to HDF5 as Gadgetron's client writes them, plus
a PNG comparison and metrics against the noise-free truth. No trained weights ship yet, so by
default a small E2E-VarNet is first fitted on simulated phantoms for a fixed number of steps.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from converters.simulate import SimulatedVolume, simulate_volume, write_fastmri

from .model.checkpoint import save_checkpoint
from .model.varnet import VarNet, VarNetConfig
from .mri.masks import MaskSampler, MaskSpec
from .mri.metrics import center_crop, volume_metrics
from .recon.engine import Reconstructor

log = logging.getLogger(__name__)
DEMO_MODEL = VarNetConfig(num_cascades=4, chans=12, pools=3, sens_chans=4, sens_pools=2)


@dataclass
class DemoSettings:
    out_dir: Path
    train_steps: int = 200         # > 0: fit a small model on phantoms first; 0: use the shipped weights
    acceleration: int = 4
    center_fraction: float = 0.08
    mask: str = "equispaced-fraction"
    source: str = "mni"
    orientation: str = "axial"
    image_size: tuple[int, int] = (96, 96)
    coils: int = 8
    seed: int = 0


def _masked_batch(vol: SimulatedVolume, index: int, sampler: MaskSampler, seed: int):
    mask, num_low = sampler(vol.kspace.shape[-1], seed=seed)
    k = torch.from_numpy(vol.kspace[index:index + 1]) * torch.from_numpy(mask)
    target = torch.from_numpy(vol.target[index:index + 1])
    return k, torch.from_numpy(mask), num_low, target


def fit_briefly(settings: DemoSettings, progress=print) -> VarNet:
    """Train ``DEMO_MODEL`` for ``train_steps`` Adam steps with an L1 loss (images scaled by the
    target max) on simulated volumes; a fixed step count keeps the result independent of machine
    load (≈ 60 s on 2 idle cores). Returns the model in eval mode."""
    torch.manual_seed(settings.seed)
    train = [simulate_volume(6, settings.coils, settings.image_size, seed=settings.seed + 100 + i)
             for i in range(3)]
    sampler = MaskSampler(MaskSpec(settings.mask, [settings.center_fraction], [settings.acceleration],
                                   seed=settings.seed))
    model = VarNet.from_config(DEMO_MODEL)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(settings.seed)
    start, step, losses = time.perf_counter(), 0, []
    while step < settings.train_steps:
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
            progress(f"  training step {step:4d}/{settings.train_steps}  L1 {np.mean(losses[-25:]):.4f}  "
                     f"({time.perf_counter() - start:.0f} s)")
    progress(f"  trained {step} steps in {time.perf_counter() - start:.0f} s")
    return model.eval()


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
    """Simulate → raw ISMRMRD → gadget pipeline (zero-filled and E2E-VarNet) → images, PNG, metrics.

    With ``train_steps > 0`` (the default until weights ship, issue 5) a small model is fitted on
    phantoms first and a phantom scan is reconstructed; with ``train_steps == 0`` the shipped
    weights reconstruct a simulated brain scan like the data they were trained on."""
    from converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd

    from .model.checkpoint import load_checkpoint
    from .model.shipped import shipped_checkpoint
    from .recon.config import ReconConfig
    from .replay import replay_file
    from .stream.images import image_magnitude
    from .stream.sinks import write_images_h5

    out = settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if settings.train_steps > 0:
        progress(f"[1/4] fitting a small E2E-VarNet on simulated phantoms for {settings.train_steps} steps")
        model = fit_briefly(settings, progress)
        ckpt = out / "demo_model.pt"
        save_checkpoint(ckpt, model, {"data": "simulated Shepp-Logan phantoms (varnet demo)",
                                      "masks": f"equispaced-fraction {settings.acceleration}x, "
                                               f"center fraction {settings.center_fraction}",
                                      "train_steps": settings.train_steps})
        source, size, model_id = "phantom", settings.image_size, f"{ckpt.name} (fitted in this demo)"
    else:
        ckpt = shipped_checkpoint()
        loaded = load_checkpoint(ckpt)
        model, source, size = loaded.model, settings.source, (128, 128)
        model_id = f"shipped {ckpt.name} (sha256 {loaded.sha256[:12]})"
        progress(f"[1/4] using the shipped weights {ckpt.name}: {loaded.description.get('data', '')}")

    progress(f"[2/4] simulating a held-out {source} scan: raw ISMRMRD file with a noise scan, "
             f"{settings.acceleration}x undersampled")
    vol = simulate_volume(4, settings.coils, size, seed=settings.seed + 999, source=source,
                          orientation=settings.orientation)
    write_fastmri(out / "scan_fully_sampled.h5", vol, with_noise=True)
    raw = out / "scan_raw_ismrmrd.h5"
    plan = convert_fastmri_to_ismrmrd(out / "scan_fully_sampled.h5", raw, settings.mask,
                                      settings.acceleration, settings.center_fraction, seed=settings.seed)

    progress("[3/4] streaming the acquisitions through the gadget pipeline (replay door): "
             "zero-filled and E2E-VarNet")
    # The models were trained on coil data as simulated (not prewhitened), so the stream is not either.
    base = dict(prewhiten=False, checkpoint=str(ckpt), device="auto")
    zf_run = replay_file(raw, ReconConfig(mode="zero-filled", image_series_index=2, **base), None)
    vn_run = replay_file(raw, ReconConfig(mode="varnet", **base), Reconstructor(model, "auto"), model_id=model_id)
    write_images_h5(out / "images.h5", zf_run.images + vn_run.images, "demo")
    zf = np.stack([image_magnitude(im) for im in zf_run.images])
    recon = np.stack([image_magnitude(im) for im in vn_run.images])

    progress("[4/4] metrics against the noise-free target; PNG comparison")
    truth = vol.target
    results = {"zero-filled": volume_metrics(truth, zf), "E2E-VarNet": volume_metrics(truth, recon)}
    mid = truth.shape[0] // 2
    save_comparison_png(out / "comparison.png", truth[mid], {"zero-filled": zf[mid], "E2E-VarNet": recon[mid]},
                        f"{source} {settings.orientation}, {settings.acceleration}x {settings.mask}, "
                        f"{plan.num_low} ACS lines, slice {mid}, streamed through the gadget")
    return results
