"""Self-supervised adaptation of a trained E2E-VarNet to a site's (or one scan's) undersampled data.

No fully sampled data is needed: every step draws fresh splits (Θ, Λ) of each slice's acquired lines
(:mod:`gadget.train.splits`), runs the network on Θ and penalises its final multi-coil k-space on Λ with
SSDU's normalised loss ``‖ŷ_Λ − y_Λ‖₂ / ‖y_Λ‖₂ + ‖ŷ_Λ − y_Λ‖₁ / ‖y_Λ‖₁`` (Yaman et al., MRM 2020).
A held-back set Γ of acquired lines per slice is never trained on; the network predicts it from Ω \\ Γ
and its normalised squared error (the Γ score) decides which weights are kept and when to stop
(zero-shot stopping, Yaman et al., ICLR 2022). The weights returned are those with the best Γ score,
which may be the start: :attr:`AdaptResult.improved` says whether adaptation helped at all.

Optional: a penalty ``tie_weight · Σ‖w − w₀‖²`` tying the weights to the start (L2-SP), and a joint
supervised term on fully sampled proxy data (``joint``, JSSL: Yiasemis et al., MIDL 2025) so the model
does not drift from what it learnt.

With ``workers`` > 1 the splits of a step (and the slices of a Γ score) run side by side, each on its
share of the CPU threads (:func:`gadget.mri.parallel.in_workers`); each split's gradient is computed on its
own and the gradients are summed in split order, so a run is repeatable for a given worker count.

Layouts: :class:`AdaptSlice` holds one slice's k-space complex64 ``(coil, readout, phase)`` with zeros at
lines not acquired, its acquired-line mask bool ``(phase,)`` and its ACS line count. Model tensors are
``(batch, coil, readout, phase)`` as in :mod:`gadget.model.varnet`.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..model.varnet import VarNet
from ..mri.parallel import in_workers
from .splits import SplitSettings, holdout_lines, seeded_rng, split_lines

log = logging.getLogger(__name__)

TRAINABLE = ("cascades", "all")


class AdaptError(ValueError):
    """The data or settings cannot be adapted on; the message names what is wrong."""


@dataclass
class AdaptSlice:
    """One undersampled slice as acquired (module docstring for layouts). ``sens_kspace``: a separate
    reference scan's k-space (the sensitivity network reads it; ``acs`` is then its line count and the
    imaging mask holds no ACS block). ``name``: where it came from, for logs and provenance."""

    kspace: np.ndarray
    mask: np.ndarray
    acs: int
    name: str = ""
    sens_kspace: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.kspace.ndim != 3 or not np.iscomplexobj(self.kspace):
            raise AdaptError(f"{self.name}: k-space must be complex (coil, readout, phase), got "
                             f"{self.kspace.dtype} {self.kspace.shape}")
        if self.mask.shape != (self.kspace.shape[-1],) or self.mask.dtype != bool:
            raise AdaptError(f"{self.name}: mask must be bool ({self.kspace.shape[-1]},), got "
                             f"{self.mask.dtype} {self.mask.shape}")

    @property
    def blank_lines(self) -> np.ndarray:
        """Lines the mask calls acquired that hold only exact zeros in every coil, bool ``(phase,)``: a
        partial-Fourier or zero-padded region, never measured (noise is never exactly 0). The network
        sees them as the mask says; they are never held back to score or train on (their energy is 0)."""
        return self.mask & ~np.any(self.kspace != 0, axis=(0, 1))

    @property
    def measured_lines(self) -> np.ndarray:
        """The lines the mask calls acquired less :attr:`blank_lines`: those that may be held back."""
        return self.mask & ~self.blank_lines

    @property
    def split_acs(self) -> int:
        """ACS lines kept in Θ inside the imaging mask (none with a separate reference)."""
        return 0 if self.sens_kspace is not None else int(self.acs)


@dataclass(frozen=True)
class AdaptConfig:
    """Settings of :func:`adapt`. ``steps``: most optimiser steps; ``time_limit``: seconds (0 = none);
    ``slices_per_step`` slices × ``splits_per_step`` splits each per step; Γ scored every ``eval_every``
    steps on up to ``eval_slices`` slices (spread over the set); stop after ``patience`` scores without a
    relative gain of ``min_gain`` over the best. ``trainable``: ``cascades`` (the sensitivity network
    frozen: it reads only the ACS lines, which the splits never change) or ``all``.

    Why these defaults: ``lr`` was chosen on a simulated contrast the shipped weights never saw (a smaller
    rate left its images unchanged within the step budget; docs/results/adaptation.md); two splits per step
    because multi-mask SSDU gains over one; ``rho`` and the Gaussian selection are SSDU's; Γ is a fifth of
    the outer lines so that one slice still holds several; ``patience`` 3 scores of 5 steps stops well
    before the time limit when Γ has flattened."""

    steps: int = 60
    time_limit: float = 0.0
    lr: float = 1e-3
    slices_per_step: int = 1
    splits_per_step: int = 2
    eval_every: int = 5
    eval_slices: int = 8
    patience: int = 3
    min_gain: float = 1e-3
    tie_weight: float = 0.0
    joint_weight: float = 0.0
    trainable: str = "cascades"
    seed: int = 0
    split: SplitSettings = field(default_factory=SplitSettings)

    def __post_init__(self):
        positive = ("steps", "slices_per_step", "splits_per_step", "eval_every", "eval_slices", "patience")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise AdaptError(f"adapt setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("time_limit", "lr", "min_gain", "tie_weight", "joint_weight"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise AdaptError(f"adapt setting {name} must be a finite number >= 0, got {value}")
        if self.lr == 0:
            raise AdaptError("adapt setting lr must be > 0")
        if self.trainable not in TRAINABLE:
            raise AdaptError(f"adapt setting trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AdaptResult:
    """What :func:`adapt` did. ``curve``: one entry per Γ score ``{step, seconds, train_loss, gamma}``
    (step 0 = the start); ``gamma_start``/``gamma_best``: the Γ scores of the start and of the weights
    returned; ``stopped``: why the loop ended."""

    state_dict: dict
    curve: list
    gamma_start: float
    gamma_best: float
    best_step: int
    steps: int
    seconds: float
    stopped: str
    slices: int

    @property
    def improved(self) -> bool:
        return self.best_step > 0 and self.gamma_best < self.gamma_start

    def summary(self) -> str:
        change = 100 * (self.gamma_best / self.gamma_start - 1) if self.gamma_start > 0 else 0.0
        return (f"{self.steps} steps on {self.slices} slices in {self.seconds:.1f} s ({self.stopped}); "
                f"Γ loss {self.gamma_start:.5g} -> {self.gamma_best:.5g} ({change:+.1f} %), best at step "
                f"{self.best_step}")


def ssdu_loss(predicted: torch.Tensor, measured: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """SSDU's normalised L2 + L1 on the lines of ``loss_mask``. ``predicted``/``measured`` complex
    ``(b, coil, readout, phase)``, ``loss_mask`` bool ``(b, 1, 1, phase)``; mean over the batch."""
    diff = (predicted - measured) * loss_mask
    ref = measured * loss_mask
    dims = (1, 2, 3)
    l2 = diff.abs().pow(2).sum(dims).sqrt() / ref.abs().pow(2).sum(dims).sqrt().clamp_min(1e-30)
    l1 = diff.abs().sum(dims) / ref.abs().sum(dims).clamp_min(1e-30)
    return (l2 + l1).mean()


class _Prepared:
    """A slice's tensors on the device, its Γ and the lines left to train on. ``fixed_maps``: the
    sensitivity network is frozen and reads only the ACS block, which every split keeps, so its maps are
    the same for every split: computed once and reused."""

    def __init__(self, sl: AdaptSlice, gamma: np.ndarray, device: torch.device, fixed_maps: bool = False):
        self.source = sl
        self.kspace = torch.from_numpy(np.ascontiguousarray(sl.kspace, np.complex64))[None].to(device)
        self.gamma = gamma
        self.available = sl.mask & ~gamma
        self.blank = sl.blank_lines
        self.splittable = self.available & ~self.blank  # Θ / Λ are drawn from these; the blank stay in Θ
        self.acs = int(sl.acs)
        self.sens = (None if sl.sens_kspace is None
                     else torch.from_numpy(np.ascontiguousarray(sl.sens_kspace, np.complex64))[None].to(device))
        self.fixed_maps = fixed_maps
        self.maps: Optional[torch.Tensor] = None

    def run(self, model: VarNet, lines: np.ndarray) -> torch.Tensor:
        """The network's final k-space ``(1, coil, readout, phase)`` from the lines ``lines``."""
        m = torch.from_numpy(lines).to(self.kspace.device).view(1, 1, 1, -1)
        extra = {} if self.sens is None else {"sens_kspace": self.sens}
        if not self.fixed_maps:
            return model.forward_with_kspace(self.kspace * m, m, self.acs, **extra)[1]
        masked = self.kspace * m
        if self.maps is None:
            with torch.no_grad():
                self.maps = model.sensitivities(masked, m, self.acs, **extra)
        state = model.initial_state(masked, self.maps)
        for cascade in model.cascades:
            state = cascade(state, masked, m, self.maps)
        return model.final_kspace(state, self.maps)


def gamma_score(model: VarNet, prepared: Sequence[_Prepared], workers: int = 1) -> float:
    """Σ‖ŷ_Γ − y_Γ‖² / Σ‖y_Γ‖² over ``prepared``: the network run on Ω \\ Γ predicting Γ (``workers`` slices
    side by side, summed in order)."""
    def errors(p: _Prepared) -> tuple[float, float]:
        with torch.no_grad():
            m = torch.from_numpy(p.gamma).to(p.kspace.device).view(1, 1, 1, -1)
            predicted = p.run(model, p.available)
            return float(((predicted - p.kspace) * m).abs().pow(2).sum()), float((p.kspace * m).abs().pow(2).sum())

    err = ref = 0.0
    for e, r in in_workers(errors, prepared, workers):
        err += e
        ref += r
    return err / ref if ref > 0 else float("nan")


def accumulate_split_gradients(model: VarNet, params: Sequence[nn.Parameter], splits: Sequence[tuple],
                               workers: int = 1) -> float:
    """The SSDU loss of ``splits`` (``(prepared slice, Θ, Λ)`` each), averaged over them, added into
    ``params``' ``.grad``; returns the loss. Each split's gradient is computed on its own (``workers`` side by
    side) and the gradients are added in split order, so the sum does not depend on which finished first."""
    def gradients(split) -> tuple[float, tuple]:
        p, theta, lam = split
        with torch.enable_grad():
            mask = torch.from_numpy(lam).to(p.kspace.device).view(1, 1, 1, -1)
            loss = ssdu_loss(p.run(model, theta), p.kspace, mask) / len(splits)
            return float(loss.detach()), torch.autograd.grad(loss, params, allow_unused=True)

    total = 0.0
    for loss, grads in in_workers(gradients, splits, workers):
        total += loss
        for param, grad in zip(params, grads):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad.add_(grad)
    return total


def _trainable(model: VarNet, which: str) -> list[nn.Parameter]:
    for name, param in model.named_parameters():
        param.requires_grad_(which == "all" or not name.startswith("sens_net."))
    return [p for p in model.parameters() if p.requires_grad]


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``."""
    if k >= n:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


JointTerm = Callable[[nn.Module, int], torch.Tensor]


def adapt(model: VarNet, slices: Sequence[AdaptSlice], config: AdaptConfig = AdaptConfig(),
          device: torch.device | str = "cpu", joint: Optional[JointTerm] = None,
          on_score: Optional[Callable[[dict], None]] = None, workers: int = 1) -> AdaptResult:
    """Adapt a copy of ``model`` on ``slices`` (module docstring); ``model`` itself is not changed.
    ``joint(model, step)``: the supervised proxy loss, weighted by ``config.joint_weight`` (needed when
    that is > 0). ``on_score``: called with each curve entry (progress). ``workers``: splits (and scored
    slices) side by side (module docstring)."""
    if not slices:
        raise AdaptError("no slices to adapt on")
    if config.joint_weight > 0 and joint is None:
        raise AdaptError("joint_weight > 0 needs supervised proxy data (joint)")
    if model.needs_maps:
        raise AdaptError(f"model variant {model.variant!r} takes fixed maps from outside; adaptation supports the "
                         "e2e variant (its own sensitivity network)")
    device = torch.device(device)
    work = copy.deepcopy(model).to(device).float()
    params = _trainable(work, config.trainable)
    start = [p.detach().clone() for p in params]
    # the frozen sensitivity network's maps do not depend on the split when it reads the ACS block only
    fixed_maps = (config.trainable == "cascades" and work.sens_net is not None and work.config.mask_center)
    prepared, skipped = [], []
    for i, sl in enumerate(slices):
        measured = sl.measured_lines
        gamma = holdout_lines(measured, sl.split_acs, config.split, seeded_rng(config.seed, 1, i))
        outer_left = (measured & ~gamma).sum() - sl.split_acs
        if not gamma.any() or outer_left < 2:
            skipped.append(sl.name or str(i))
            continue
        prepared.append(_Prepared(sl, gamma, device, fixed_maps))
    if skipped:
        log.warning("adapt: %d slices have too few acquired lines outside the ACS block to split and are not "
                    "used: %s", len(skipped), ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    if not prepared:
        raise AdaptError("no slice has enough acquired lines outside its ACS block to hold some back and split "
                         "the rest (fully sampled or ACS-only data cannot be adapted on)")
    scored = [prepared[i] for i in _spread(len(prepared), config.eval_slices)]
    optimiser = torch.optim.Adam(params, lr=config.lr)
    order_rng = seeded_rng(config.seed, 2)
    t0 = time.perf_counter()

    work.eval()
    best = gamma_score(work, scored, workers)
    if not math.isfinite(best):
        raise AdaptError("the Γ score of the starting weights is not finite (all-zero held-back lines?)")
    curve = [{"step": 0, "seconds": 0.0, "train_loss": None, "gamma": best}]
    gamma_start, best_step, best_state = best, 0, copy.deepcopy(work.state_dict())
    if on_score:
        on_score(curve[-1])
    stopped, step, losses, stale = f"step limit {config.steps}", 0, [], 0
    order: list[int] = []
    while step < config.steps:
        if config.time_limit and time.perf_counter() - t0 >= config.time_limit:
            stopped = f"time limit {config.time_limit:g} s"
            break
        step += 1
        work.train()
        optimiser.zero_grad(set_to_none=True)
        splits = []
        for _ in range(config.slices_per_step):
            if not order:
                order = list(order_rng.permutation(len(prepared)))
            p = prepared[order.pop()]
            for s in range(config.splits_per_step):
                theta, lam = split_lines(p.splittable, p.source.split_acs, config.split,
                                         seeded_rng(config.seed, 3, step, len(order), s))
                splits.append((p, theta | p.blank, lam))
        total = accumulate_split_gradients(work, params, splits, workers)
        extra = torch.zeros((), device=device)
        if config.tie_weight > 0:
            extra = extra + config.tie_weight * sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start))
        if config.joint_weight > 0:
            extra = extra + config.joint_weight * joint(work, step)
        if extra.requires_grad:
            extra.backward()
        if not math.isfinite(total):
            stopped = f"non-finite training loss at step {step}"
            break
        optimiser.step()
        losses.append(total)
        if step % config.eval_every and step != config.steps:
            continue
        work.eval()
        score = gamma_score(work, scored, workers)
        entry = {"step": step, "seconds": round(time.perf_counter() - t0, 3),
                 "train_loss": float(np.mean(losses)), "gamma": score}
        losses = []
        curve.append(entry)
        if on_score:
            on_score(entry)
        if math.isfinite(score) and score < best * (1 - config.min_gain):
            best, best_step, stale = score, step, 0
            best_state = copy.deepcopy(work.state_dict())
        else:
            stale += 1
            if not math.isfinite(score):
                stopped = f"non-finite Γ score at step {step}"
                break
            if stale >= config.patience:
                stopped = f"no Γ gain in {stale} scores"
                break
    return AdaptResult(state_dict={k: v.detach().cpu() for k, v in best_state.items()}, curve=curve,
                       gamma_start=gamma_start, gamma_best=best, best_step=best_step, steps=step,
                       seconds=time.perf_counter() - t0, stopped=stopped, slices=len(prepared))


def adapted_model(model: VarNet, result: AdaptResult) -> VarNet:
    """A copy of ``model`` (on the CPU, eval mode) with the weights ``result`` kept."""
    out = copy.deepcopy(model).cpu()
    out.load_state_dict(result.state_dict)
    for param in out.parameters():
        param.requires_grad_(False)
    return out.eval()
