"""The training loop: Adam + step decay, SSIM (or L1) loss, fastMRI validation metrics, checkpoints.

Tensor layouts: batches as :class:`gadget.train.data.TrainSample` — k-space ``(b, coil, readout,
phase)`` complex64, mask ``(b, 1, 1, phase)`` bool, fixed maps ``(b, coil, readout, phase)``
complex64 for the fixed-map variants (``model.variant`` vn, vnu, vnu-k: the model's ``needs_maps``;
ESPIRiT of the ACS lines from :class:`gadget.train.data.FixedMapsCache`, in ``data.maps_cache``;
passed to the model as ``sens_maps`` in training and validation), model output ``(b, readout,
phase)`` real, centre-cropped to the header's recon size (fastMRI's rule: ``(w, w)`` when the image is narrower
than the crop) and then, with the target ``(b, H, W)``, to their common size.

Files written to ``run.out_dir`` (rank 0 only):

* ``config.yaml`` — the resolved configuration;
* ``train_log.csv`` — ``step, epoch, loss, lr, seconds`` every ``run.log_every`` steps (loss = mean
  over those steps and over ranks; seconds = training time so far, across resumes);
* ``val_metrics.csv`` — ``epoch, step, val_loss, nmse, psnr, ssim, num_volumes, seconds``;
* ``tensorboard/`` — the same curves (needs the ``train`` extra; without it a warning is logged
  once and only the CSV files are written);
* ``best.pt`` — the model with the best validation SSIM, :func:`gadget.model.save_checkpoint`
  format with a description of the run; ``final.pt`` — the model after the last epoch;
* ``last.pt`` — everything needed to resume (model, optimizer, scheduler, scaler, epoch, step,
  RNG states), plain tensors/dicts/numbers: it loads with ``torch.load(weights_only=True)``.

Distributed (``torchrun``, ``WORLD_SIZE > 1``): one process per device, process group over gloo
(CPU) or NCCL (CUDA), the model wrapped in ``DistributedDataParallel``, every rank trains on its
own ``rank::world`` share of each epoch's permutation (padded so all ranks take the same number of
steps). Validation is shared by volume (rank r scores volumes r, r + world, …) and the per-volume
metrics are gathered, so the numbers equal a single-process run. Only rank 0 writes files.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.fastmri_file import FastMRIFileError
from ..model.checkpoint import CheckpointError, file_sha256, load_checkpoint, save_checkpoint
from ..model.varnet import VarNet, VarNetConfig, check_inputs
from ..mri.masks import MaskSpec, acs_lines
from ..mri.metrics import VolumeMetrics, center_crop, center_crop_at_most
from ..recon.engine import resolve_device
from ..recon.fastmri_infer import crop_size_for
from .config import TrainConfig, TrainConfigError, mask_kinds
from .data import EpochSampler, FixedMapsCache, SliceDataset, TrainSample, collate, worker_init
from .losses import TrainingLoss

log = logging.getLogger(__name__)

STATE_FORMAT = "varnet-gadget-train-state"
STATE_VERSION = 1


# ----------------------------------------------------------------------------- model wrapper


class TrainingVarNet(nn.Module):
    """``VarNet`` for training: the same maths, optionally recomputing the sensitivity network
    (one coil at a time) and each cascade in the backward pass (``torch.utils.checkpoint``), which
    keeps one coil's or one cascade's activations in memory instead of all of them. Input/output
    layouts as :class:`VarNet`."""

    def __init__(self, varnet: VarNet, activation_checkpointing: bool = False):
        super().__init__()
        self.varnet = varnet
        self.activation_checkpointing = activation_checkpointing

    def forward(self, masked_kspace: torch.Tensor, mask: torch.Tensor, num_low_frequencies=None,
                sens_maps: Optional[torch.Tensor] = None) -> torch.Tensor:
        if sens_maps is not None:  # fixed-map variants (config validation keeps checkpointing to e2e)
            return self.varnet(masked_kspace, mask, num_low_frequencies, sens_maps=sens_maps)
        if not (self.activation_checkpointing and torch.is_grad_enabled()):
            return self.varnet(masked_kspace, mask, num_low_frequencies)
        masked_kspace, mask = check_inputs(masked_kspace, mask)
        sens = self.varnet.sens_net(masked_kspace, mask, num_low_frequencies, run_unet=self._sens_unet_per_coil)
        kspace = masked_kspace
        for cascade in self.varnet.cascades:
            kspace = checkpoint(cascade, kspace, masked_kspace, mask, sens, use_reentrant=False)
        return self.varnet.final_image(kspace, sens)

    def _sens_unet_per_coil(self, coil_images: torch.Tensor) -> torch.Tensor:
        """The sensitivity U-Net on ``(b·coil, 1, h, w)`` images, one image per checkpoint: its
        activations for all coils at once (15 × 8 channels at full resolution: ≈ 3 GB at 640×368)
        would otherwise be the largest recomputation in the backward pass. Each image is
        normalised on its own, so splitting the batch does not change the result."""
        norm_unet = self.varnet.sens_net.norm_unet
        return torch.cat([checkpoint(norm_unet, image, use_reentrant=False) for image in coil_images.split(1)])


def acs_counts(batch: TrainSample) -> torch.Tensor:
    """``(b,)`` ACS line counts; entries 0 (unknown, test files without the attribute) are
    detected from the mask as the reference does (:func:`gadget.mri.masks.acs_lines`, fallback
    ``"detect"``). The batch is still on the CPU here."""
    counts = batch.num_low_frequencies
    if not bool((counts == 0).any()):
        return counts
    masks = batch.mask.reshape(batch.mask.shape[0], -1).expand(counts.shape[0], -1)
    return torch.tensor([acs_lines(m, c, fallback="detect") for m, c in zip(masks, counts.tolist())],
                        dtype=counts.dtype, device=counts.device)


def crop_pair(output: torch.Tensor, target: torch.Tensor, crop_size: tuple[int, int]):
    """Crop the model output ``(b, readout, phase)`` to the recon size (``(w, w)`` when narrower),
    then both images to their common size (fastMRI's ``center_crop_to_smallest``)."""
    output = center_crop_at_most(output, crop_size_for(tuple(output.shape[-2:]), crop_size))
    h, w = min(output.shape[-2], target.shape[-2]), min(output.shape[-1], target.shape[-1])
    return center_crop(output, (h, w)), center_crop(target, (h, w))


# ----------------------------------------------------------------------------- environment


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False   # this process initialised the group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Read torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; with more than one process, join
    the process group (gloo on CPU, NCCL on CUDA) and pick ``cuda:LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(rank=int(os.environ.get("RANK", "0")), world_size=world,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    try:
        device = resolve_device(device_name)
    except (RuntimeError, ValueError) as exc:
        raise TrainConfigError(f"run.device: {exc}") from None
    if not info.enabled:
        return info, device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        info.owns_group = True
    return info, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors/ints (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- logging sinks


class RunLog:
    """CSV files plus TensorBoard (when installed) on rank 0; no-ops elsewhere."""

    TRAIN_FIELDS = ("step", "epoch", "loss", "lr", "seconds")
    VAL_FIELDS = ("epoch", "step", "val_loss", "nmse", "psnr", "ssim", "num_volumes", "seconds")

    def __init__(self, out_dir: Path, active: bool, tensorboard: bool, append: bool):
        self.active, self.writer = active, None
        if not active:
            return
        self.train_csv = self._open(out_dir / "train_log.csv", self.TRAIN_FIELDS, append)
        self.val_csv = self._open(out_dir / "val_metrics.csv", self.VAL_FIELDS, append)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("TensorBoard is not installed (pip install 'varnet-gadget[train]'): "
                            "logging to CSV only")
            else:
                self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    @staticmethod
    def _open(path: Path, header, append: bool):
        fresh = not append or not path.exists() or path.stat().st_size == 0
        handle = open(path, "w" if fresh else "a", newline="")
        writer = csv.writer(handle)
        if fresh:
            writer.writerow(header)
        return handle, writer

    def train(self, step: int, epoch: int, loss: float, lr: float, seconds: float) -> None:
        if not self.active:
            return
        handle, writer = self.train_csv
        writer.writerow([step, epoch, f"{loss:.8g}", f"{lr:.8g}", f"{seconds:.3f}"])
        handle.flush()
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def val(self, epoch: int, step: int, metrics: dict, seconds: float) -> None:
        if not self.active:
            return
        handle, writer = self.val_csv
        writer.writerow([epoch, step] + [f"{metrics[k]:.8g}" for k in ("val_loss", "nmse", "psnr", "ssim")]
                        + [metrics["num_volumes"], f"{seconds:.3f}"])
        handle.flush()
        if self.writer:
            for key in ("val_loss", "nmse", "psnr", "ssim"):
                self.writer.add_scalar(f"val/{key}", metrics[key], step)

    def close(self) -> None:
        if not self.active:
            return
        for handle, _ in (self.train_csv, self.val_csv):
            handle.close()
        if self.writer:
            self.writer.close()


# ----------------------------------------------------------------------------- the trainer


@dataclass
class Progress:
    epoch: int = 0              # epochs completed
    step_in_epoch: int = 0      # optimizer steps done in the current (unfinished) epoch
    global_step: int = 0
    best_ssim: float = -math.inf
    best_metrics: Optional[dict] = None
    elapsed_s: float = 0.0      # training wall time before this process started
    history: list = field(default_factory=list)  # validation results of this process


class Trainer:
    """``Trainer(config).fit()`` trains E2E-VarNet as configured; see the module docstring."""

    def __init__(self, config: TrainConfig):
        self.config = config
        run, data = config.run, config.data
        self.dist, self.device = setup_distributed(run.device)
        seed_everything(run.seed)
        self.out_dir = Path(run.out_dir)
        if not run.resume and (self.out_dir / "last.pt").exists():  # every rank checks: no rank is left waiting
            raise TrainConfigError(f"{self.out_dir} already holds a run (last.pt): set run.resume="
                                   f"{self.out_dir / 'last.pt'} to continue it, or choose another run.out_dir")
        if not data.train_dirs:
            raise TrainConfigError("data.train_dirs is empty: give directories of fastMRI-layout .h5 files "
                                   "(e.g. --set data.train_dirs=[data/synth/train])")
        self.mask_spec = [MaskSpec(kind, data.center_fractions, data.accelerations) for kind in mask_kinds(data.mask)]
        self.model = VarNet.from_config(config.model)
        self.maps = None
        if needs_maps(self.model):  # fixed ESPIRiT maps from the data pipeline, cached per (file, slice, ACS)
            self.maps = FixedMapsCache(data.maps_cache or self.out_dir / "maps_cache", data.maps_cache_mb)
        self.train_set = SliceDataset(data.train_dirs, self.mask_spec, data.target, fixed_masks=False, seed=run.seed,
                                      maps=self.maps)
        self.val_set = (SliceDataset(data.val_dirs, self.mask_spec, data.target, fixed_masks=True, maps=self.maps)
                        if data.val_dirs else None)

        for name, ds in (("train", self.train_set), ("val", self.val_set)):
            groups = ds.shapes() if ds is not None else {}
            if data.batch_size > 1 and len(groups) > 1:
                detail = "; ".join(f"k-space {k}, target {t}, crop {c}: {', '.join(files[:2])}"
                                   + (" ..." if len(files) > 2 else "") for (k, t, c), files in groups.items())
                raise TrainConfigError(f"data.batch_size={data.batch_size} needs slices of one shape, but the "
                                       f"{name} files differ ({detail}); use data.batch_size=1")
        self.model = self.model.to(self.device)
        self.model.set_precision("fp32" if run.amp == "off" else run.amp)  # autocast around the U-Nets only
        self.init_source: Optional[dict] = None
        if run.init_from and not run.resume:  # a resumed run's weights come from last.pt
            self.init_weights(run.init_from)
        self.net: nn.Module = TrainingVarNet(self.model, run.activation_checkpointing)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.optim.lr,
                                          weight_decay=config.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, config.optim.lr_step_size,
                                                         config.optim.lr_gamma)
        self.scaler = torch.amp.GradScaler(self.device.type) if run.amp == "fp16" else None
        self.loss_fn = TrainingLoss(config.loss.kind)
        self.progress = Progress()
        self._started = time.perf_counter()
        if run.resume:
            self.load_state(run.resume)

    # ------------------------------------------------------------------ helpers

    def seconds(self) -> float:
        return self.progress.elapsed_s + time.perf_counter() - self._started

    def _to_device(self, batch: TrainSample):
        nb = self.device.type == "cuda"
        maps = None if batch.sens_maps is None else batch.sens_maps.to(self.device, non_blocking=nb)
        if self.maps is not None and maps is None:
            raise TrainConfigError(f"model.variant={getattr(self.config.model, 'variant', '?')} needs fixed maps, "
                                   "but the batch carries none")
        return (batch.masked_kspace.to(self.device, non_blocking=nb), batch.mask.to(self.device),
                acs_counts(batch).to(self.device), batch.target.to(self.device, non_blocking=nb),
                batch.max_value.to(self.device), maps)

    def forward_loss(self, batch: TrainSample, net: Optional[nn.Module] = None):
        """``(loss, cropped output, cropped target)`` of one batch."""
        kspace, mask, num_low, target, max_value, maps = self._to_device(batch)
        if maps is None:
            output = (net or self.net)(kspace, mask, num_low)
        else:
            output = (net or self.net)(kspace, mask, num_low, sens_maps=maps)
        output, target = crop_pair(output, target, batch.crop_size)
        return self.loss_fn(output, target, max_value), output, target

    def train_step(self, batch: TrainSample) -> float:
        """One optimizer step; returns the (local) loss."""
        self.net.train()
        loss, _, _ = self.forward_loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return float(loss.detach())

    def _mean_over_ranks(self, value: float) -> float:
        if not self.dist.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.dist.world_size

    def _loader(self, dataset, **kwargs) -> DataLoader:
        workers = self.config.data.num_workers
        return DataLoader(dataset, num_workers=workers, collate_fn=collate, worker_init_fn=worker_init,
                          pin_memory=self.device.type == "cuda", **kwargs)

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict:
        """Train for the remaining epochs; returns a summary (paths, steps, best metrics)."""
        cfg, run = self.config, self.config.run
        main = self.dist.is_main
        self._started = time.perf_counter()
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(cfg.to_yaml())
            log.info("resolved config:\n%s", cfg.to_yaml().rstrip())
            log.info("train: %s; val: %s; device %s, world size %d", self._describe(self.train_set),
                     self._describe(self.val_set), self.device, self.dist.world_size)
        runlog = RunLog(self.out_dir, main, run.tensorboard, append=bool(run.resume))
        try:
            for epoch in range(self.progress.epoch, cfg.optim.epochs):
                self._train_epoch(epoch, runlog)
                self.scheduler.step()
                self.progress.epoch, self.progress.step_in_epoch = epoch + 1, 0
                last = epoch + 1 == cfg.optim.epochs
                if self.val_set is not None and ((epoch + 1) % run.val_every == 0 or last):
                    self._validate_and_keep_best(epoch, runlog)
                if main:
                    self.save_state(self.out_dir / "last.pt")
            if main:
                save_checkpoint(self.out_dir / "final.pt", self.model, self.description(self.progress.best_metrics))
        finally:
            runlog.close()
            if self.dist.owns_group:
                dist.barrier()
                dist.destroy_process_group()
                self.dist.owns_group = False
        best = self.out_dir / "best.pt"
        return {"epochs": self.progress.epoch, "steps": self.progress.global_step, "seconds": self.seconds(),
                "best_metrics": self.progress.best_metrics, "best_path": str(best) if best.exists() else None,
                "final_path": str(self.out_dir / "final.pt"), "last_path": str(self.out_dir / "last.pt"),
                "history": list(self.progress.history)}

    def steps_in_epoch(self) -> int:
        per_rank = math.ceil(len(self.train_set) / self.dist.world_size)
        steps = math.ceil(per_rank / self.config.data.batch_size)
        cap = self.config.run.max_steps_per_epoch
        return min(steps, cap) if cap else steps

    def _train_epoch(self, epoch: int, runlog: RunLog) -> None:
        cfg, run, p = self.config, self.config.run, self.progress
        total = self.steps_in_epoch()
        if p.step_in_epoch >= total:
            return
        self.train_set.set_epoch(epoch)
        sampler = EpochSampler(len(self.train_set), shuffle=True, seed=run.seed, epoch=epoch,
                               rank=self.dist.rank, num_replicas=self.dist.world_size,
                               skip=p.step_in_epoch * cfg.data.batch_size)
        loader = self._loader(self.train_set, batch_size=cfg.data.batch_size, sampler=sampler)
        window: list[float] = []
        bar = tqdm(total=total, initial=p.step_in_epoch, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
                   unit="step", disable=True if not self.dist.is_main else None, leave=False)
        try:
            for batch in loader:
                lr = self.optimizer.param_groups[0]["lr"]
                window.append(self.train_step(batch))
                p.step_in_epoch += 1
                p.global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{window[-1]:.4g}")
                if p.global_step % run.log_every == 0 or p.step_in_epoch == total:
                    runlog.train(p.global_step, epoch + 1, self._mean_over_ranks(float(np.mean(window))), lr,
                                 self.seconds())
                    window = []
                if run.save_every and p.global_step % run.save_every == 0 and self.dist.is_main:
                    self.save_state(self.out_dir / "last.pt")
                if p.step_in_epoch >= total:
                    break
        finally:
            bar.close()

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def validate(self) -> dict:
        """fastMRI metrics over the validation volumes: per-volume NMSE/PSNR/SSIM (crops as in
        training, data range = the volume maximum) averaged over volumes; ``val_loss`` = mean loss
        over slices. All ranks take part (volumes are split between them)."""
        if self.val_set is None:
            raise TrainConfigError("no data.val_dirs to validate on")
        self.net.eval()
        vs, bs = self.val_set, self.config.data.batch_size
        mine = range(self.dist.rank, len(vs.volumes), self.dist.world_size)
        plan = [(v, idx[i:i + bs]) for v in mine for idx in [vs.volume_slices(v)] for i in range(0, len(idx), bs)]
        collector, loss_sum, slices = VolumeMetrics(), 0.0, 0
        recon, target = [], []
        model = self.net.module if self.dist.enabled else self.net  # no DDP sync for a local forward
        loader = self._loader(vs, batch_sampler=[indices for _, indices in plan])
        for n, ((volume, _), batch) in enumerate(zip(plan, loader)):
            loss, out, tgt = self.forward_loss(batch, model)
            loss_sum += float(loss) * len(batch.fname)
            slices += len(batch.fname)
            recon.append(out.cpu().numpy())
            target.append(tgt.cpu().numpy())
            if n + 1 == len(plan) or plan[n + 1][0] != volume:  # last batch of this volume
                info = vs.volumes[volume]
                collector.add(str(info.path), np.concatenate(target), np.concatenate(recon), maxval=info.max_value)
                recon, target = [], []
        per_volume, loss_sum, slices = self._gather(collector.per_volume, loss_sum, slices)
        if not per_volume:
            raise FastMRIFileError("validation produced no volumes")
        mean = {k: float(np.mean([m[k] for m in per_volume.values()])) for k in ("nmse", "psnr", "ssim")}
        return {"val_loss": loss_sum / max(slices, 1), **mean, "num_volumes": len(per_volume),
                "num_slices": slices}

    def _gather(self, per_volume: dict, loss_sum: float, slices: int):
        if not self.dist.enabled:
            return per_volume, loss_sum, slices
        parts: list = [None] * self.dist.world_size
        dist.all_gather_object(parts, (per_volume, loss_sum, slices))
        merged: dict = {}
        for pv, _, _ in parts:
            merged.update(pv)
        return merged, sum(p[1] for p in parts), sum(p[2] for p in parts)

    def _validate_and_keep_best(self, epoch: int, runlog: RunLog) -> None:
        p = self.progress
        metrics = self.validate()
        p.history.append({"epoch": epoch + 1, "step": p.global_step, **metrics})
        runlog.val(epoch + 1, p.global_step, metrics, self.seconds())
        if self.dist.is_main:
            log.info("epoch %d step %d: val loss %.4f, NMSE %.4g, PSNR %.2f dB, SSIM %.4f (%d volumes)",
                     epoch + 1, p.global_step, metrics["val_loss"], metrics["nmse"], metrics["psnr"],
                     metrics["ssim"], metrics["num_volumes"])
        if metrics["ssim"] > p.best_ssim:
            p.best_ssim, p.best_metrics = metrics["ssim"], {"epoch": epoch + 1, "step": p.global_step, **metrics}
            if self.dist.is_main:
                save_checkpoint(self.out_dir / "best.pt", self.model, self.description(p.best_metrics))

    # ------------------------------------------------------------------ state

    @staticmethod
    def _describe(dataset: Optional[SliceDataset]) -> str:
        if dataset is None:
            return "none"
        return f"{len(dataset.volumes)} volumes, {len(dataset)} slices, targets {dataset.target_keys}"

    def description(self, val_metrics: Optional[dict]) -> dict:
        """What :func:`save_checkpoint` stores about the run (plain, JSON-like values)."""
        from .. import __version__

        cfg, d = self.config, self.config.data
        vs = self.val_set
        return {
            "trained_with": "varnet train", "package_version": __version__,
            "train_dirs": [str(Path(p).resolve()) for p in d.train_dirs],
            "val_dirs": [str(Path(p).resolve()) for p in d.val_dirs],
            "train_volumes": len(self.train_set.volumes), "train_slices": len(self.train_set),
            "val_volumes": len(vs.volumes) if vs else 0, "val_slices": len(vs) if vs else 0,
            "targets": self.train_set.target_keys, "mask": d.mask,
            "accelerations": list(d.accelerations), "center_fractions": list(d.center_fractions),
            "variant": getattr(cfg.model, "variant", "e2e"),
            "sens_maps": "fixed ESPIRiT maps of the ACS lines" if self.maps is not None else "learned (SME)",
            "loss": cfg.loss.kind, "optimizer": {"name": "Adam", **dataclasses.asdict(cfg.optim)},
            "epochs": self.progress.epoch, "steps": self.progress.global_step,
            "batch_size": d.batch_size, "world_size": self.dist.world_size, "amp": cfg.run.amp,
            "val_metrics": dict(val_metrics) if val_metrics else None,
            "init_from": self.init_source,
            "training_time_s": round(self.seconds(), 3),
        }

    def init_weights(self, path: str) -> None:
        """Copy weights from any checkpoint :func:`load_checkpoint` reads, or from the resume state
        (``last.pt``) of a run stopped part-way (fine-tuning); the architecture must match the
        config's, ``output`` and ``mask_center`` may differ."""
        try:
            loaded = load_checkpoint(path)
            config, weights, kind = loaded.config, loaded.model.state_dict(), loaded.kind
        except CheckpointError as exc:
            try:  # a run stopped part-way: its resume state (last.pt) holds the weights too
                state = read_training_state(path, "run.init_from")
            except TrainConfigError:
                raise TrainConfigError(f"run.init_from: {exc}") from None
            config, weights, kind = VarNetConfig(**state["config"]["model"]), state["model"], "training state"
        shape_keys = ("num_cascades", "chans", "pools", "sens_chans", "sens_pools", "variant")
        differ = [f"{k} {getattr(config, k, 'e2e')} vs {getattr(self.config.model, k, 'e2e')}"
                  for k in shape_keys if getattr(config, k, "e2e") != getattr(self.config.model, k, "e2e")]
        if differ:
            raise TrainConfigError(f"run.init_from: {path} does not match model settings (file vs config: "
                                   f"{', '.join(differ)})")
        self.model.load_state_dict(weights)
        self.init_source = {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "model": config.to_dict()}
        if self.dist.is_main:
            log.info("initialised weights from %s (%s)", path, kind)

    def save_state(self, path: Path) -> None:
        """``last.pt``: resume state (see the module docstring), written atomically."""
        p = self.progress
        payload = {
            "format": STATE_FORMAT, "format_version": STATE_VERSION,
            "config": self.config.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "epoch": p.epoch, "step_in_epoch": p.step_in_epoch, "global_step": p.global_step,
            "best_ssim": p.best_ssim if math.isfinite(p.best_ssim) else None,
            "best_metrics": p.best_metrics, "elapsed_s": self.seconds(), "rng": rng_state(),
            "init_from": self.init_source,
        }
        tmp = path.with_name(path.name + ".partial")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def load_state(self, path: str | Path) -> None:
        state = read_training_state(path, "run.resume")
        saved_model = state["config"].get("model", {})
        if saved_model != self.config.model.to_dict():
            raise TrainConfigError(f"run.resume: {path} was trained with model {saved_model}, "
                                   f"the config asks for {self.config.model.to_dict()}")
        now = self.config.to_dict()
        changed = [f"{s}.{k}" for s, values in state["config"].items() if s in now and s != "run"
                   for k, v in values.items() if now[s].get(k) != v]
        if changed and self.dist.is_main:
            log.warning("resuming %s with changed settings: %s", path, ", ".join(changed))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        best = state.get("best_ssim")
        self.progress = Progress(epoch=int(state["epoch"]), step_in_epoch=int(state["step_in_epoch"]),
                                 global_step=int(state["global_step"]),
                                 best_ssim=-math.inf if best is None else float(best),
                                 best_metrics=state.get("best_metrics"), elapsed_s=float(state["elapsed_s"]))
        set_rng_state(state["rng"])
        self.init_source = state.get("init_from")  # a resumed fine-tune keeps its record
        if self.dist.is_main:
            log.info("resumed %s at epoch %d, step %d", path, self.progress.epoch, self.progress.global_step)


def read_training_state(path: str | Path, setting: str) -> dict:
    """The resume state ``last.pt`` written by :meth:`Trainer.save_state`, format checked;
    errors name ``setting`` (the config key that gave the path)."""
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"{setting}: {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for files that are not its own
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainConfigError(f"{setting}: {path} is not a readable training state (weights_only=True): "
                               f"{reason}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainConfigError(f"{setting}: {path} is not a training state written by varnet train (last.pt)")
    if state.get("format_version") != STATE_VERSION:
        raise TrainConfigError(f"{setting}: {path} has format_version {state.get('format_version')}, "
                               f"expected {STATE_VERSION}")
    return state


def training_state_description(state: dict) -> dict:
    """The training record of a resume state, with the keys of :meth:`Trainer.description` that a
    stopped run has (for the stage chain of shipped weights)."""
    cfg = state["config"]
    return {"loss": cfg["loss"]["kind"], "optimizer": {"name": "Adam", **cfg["optim"]},
            "epochs": state["epoch"], "steps": state["global_step"], "val_metrics": state.get("best_metrics"),
            "init_from": state.get("init_from"), "training_time_s": round(float(state["elapsed_s"]), 3)}


def needs_maps(model: nn.Module) -> bool:
    """Whether ``model`` (a :class:`VarNet`) takes fixed sensitivity maps (variants vn, vnu, vnu-k)."""
    return bool(getattr(model, "needs_maps", False))


def train(config: TrainConfig) -> dict:
    """Build a :class:`Trainer` and run it; returns :meth:`Trainer.fit`'s summary."""
    return Trainer(config).fit()


__all__ = ["Trainer", "TrainingVarNet", "train", "needs_maps", "read_training_state", "training_state_description",
           "crop_pair", "acs_counts", "setup_distributed", "STATE_FORMAT"]
