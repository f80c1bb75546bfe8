"""Choosing the ``cs`` refine's weights for one scan from its own acquired lines (``adapt: solve``).

The ``cs`` refine (:mod:`gadget.recon.sparse`) solves ``½||A x − y||² + ½λ||x − x₀||² + μ||Ψ x||₁``
around the network's image ``x₀``. How much to trust the network (λ) and how much sparsity (μ) differs
with the scan: its noise, its coils, and how far its anatomy and contrast are from what the network was
trained on. No fully sampled data is needed to choose them; K-fold cross-validation on the acquired
lines stands in for it:

- the acquired lines outside the ACS block are dealt at random into ``folds`` disjoint folds (the ACS
  block always stays: the maps and the sensitivity network read it; so do lines that hold only exact
  zeros, :attr:`gadget.train.adapt.AdaptSlice.blank_lines`, which were never measured);
- for each fold, the network runs on the slice without that fold's lines, and each candidate ``(λ, μ)``
  is solved on the same lines;
- each candidate predicts the fold's lines (``F S x̂`` on those columns); its score is the squared
  error normalised by the lines' energy, averaged over folds and slices;
- the search runs along the axes of the grid: every λ at the starting μ, then every μ at the least λ
  whose score is within one standard error of that line's best (the error of its difference to the best,
  fold by fold: :func:`least_within_error`), and the best μ there (the score varies smoothly in both, and
  two lines cost a fraction of the whole grid). The held-back lines cannot tell apart the λ within that
  error, and the least of them leans least on the network's image, made by weights the scan may lie
  outside the training of (on simulated shifts the truth preferred it: docs/results/adaptation.md, "The
  least pull within one standard error");
- the coil maps are a choice too: the search runs with maps from the network's own coil images and,
  where ESPIRiT's calibration on the ACS lines has a null space, again with ESPIRiT's maps
  (:func:`gadget.recon.refine.choose_maps`), and the source whose search reached the lower score wins
  (the lowest of any candidate it scored, not its winner's: the least λ within one standard error gives up
  a little of the score on purpose, and that must not cost good maps the comparison). The ``pi`` stage
  judges ESPIRiT's maps by whether their eigenvalue covers the network's object; here the held-back lines
  judge them (at 8× an aliased network image reaches beyond the head and fails that test for good maps,
  and on heads with coils at the scalp wrong maps pass it);
- a candidate's score is that of the solve alone, ``F S x̂``, nothing where the maps vanish (ESPIRiT's,
  cropped outside the calibrated object); what the refine sends there is chosen after, for the winner:
  the network's coil images there (``F (S x̂ + c_outside)``) or those scaled down where their RSS exceeds
  the noise floor outside the region the maps enclose (:func:`gadget.recon.refine.capped_outside`, the
  factor the refine sends its image with), the capped image unless the network's predicts the held-back
  lines better by more than one standard error (``cs_outside``; as with λ, the held-back lines must show
  that the network's image is wanted before it is leant on). Above the noise there is the network's
  aliasing, which the solve removed inside the maps, or object ESPIRiT's crop left out. (Scored with the
  network's image where the maps
  vanish, ESPIRiT's maps would carry its background's error into their score, and lost to the network's
  maps where they were better inside the head: docs/results/adaptation.md);
- the pair with the lowest score wins and the scan is reconstructed with it on all its lines, provided
  it predicts the held-back lines better than the network alone does (its own final k-space, scored the
  same way) by a relative ``margin`` of the error above the noise: the held-back lines' noise, whose
  expected share of their energy is ``σ²`` per sample (:func:`gadget.recon.refine.noise_sigma`), is an
  error no reconstruction can predict away, and on noisy outer lines it is most of the score
  (docs/results/adaptation.md, "The margin above the noise"). Where no candidate does, the held-back
  lines cannot tell the candidates apart (noise-dominated outer lines, too little coil encoding left at
  high acceleration);
- where, besides, the held-back lines are noise to the network (its own held-out error at least
  ``noise_dominated``: it predicts them no better than nothing would), the discrepancy principle decides
  instead (``fallback``); elsewhere the door keeps its own refine, because there the folds' verdict
  stands (on an 8-coil 230×180 simulation at 8× the discrepancy principle sent the candidate the margin
  had refused, and it fell below the shipped image in the head: docs/results/adaptation.md, "The
  noise-level rule only where the lines are noise"). The discrepancy principle: on all the slice's lines,
  with λ ``fallback_lam`` and the maps that scored better (else the others), the largest μ whose data
  residual ``‖M F S x̂ − y‖²`` stays within the noise (``σ²`` per acquired sample, σ from the outer
  readout: :func:`gadget.recon.refine.noise_sigma`); the most regularised image still consistent with
  the measurements. Where even μ 0 leaves more than the noise (model error dominates), the door keeps its
  own refine.

Every acquired outer line is held back exactly once, and a candidate never sees the lines it is scored
on, nor does the network that gives it ``x₀``. Leaving a fold out makes the data a little more
undersampled than the scan itself; more folds keep that change small (at more cost).

Layouts as in :class:`gadget.train.adapt.AdaptSlice`: k-space complex64 ``(coil, readout, phase)`` with
zeros at lines not acquired, mask bool ``(phase,)``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from ..mri.fft import fft2c
from ..mri.parallel import in_workers
from ..baselines.espirit import espirit_calibration
from ..mri.coils import rss
from ..recon.refine import (CS_OUTSIDE, MAX_SIGNAL_SHARE, SOLVE_ESPIRIT, RefineConfig, capped_outside, map_support,
                            maps_and_prior, noise_sigma)
from ..recon.sparse import WAVELETS, solve
from .adapt import AdaptError, AdaptSlice
from .splits import acs_lines

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationConfig:
    """Settings of :func:`calibrate_solve`. ``lams`` × ``mus``: the grid searched (λ is the pull to the
    network's image relative to the data term, μ the sparsity weight in units of the image's 99th
    percentile), along λ at ``start_mu`` first; ``margin``: how much lower (relative) than the network's
    own the winner's held-out error above the noise must be for the ``cs`` refine to be used
    (:func:`beats_network`); ``folds``: K of the
    cross-validation; ``slices``: the most slices scored (spread over the scan; the noise, coils and
    contrast that decide the weights are the scan's, not the slice's); ``iterations``: FISTA steps per
    solve; ``wavelet``: the solve's (:data:`gadget.recon.sparse.WAVELETS`); ``offsets``: wavelet grids per
    step in the solves scored. One, where the refine that sends the image spins over
    :data:`gadget.recon.sparse.SPIN_OFFSETS`: at fixed weights spinning lifted every candidate compared by
    about as much, and in the search it would cost two to three times as long
    (docs/results/adaptation.md, "Cycle spinning in every step").

    Why these defaults: the grid spans plain compressed sensing (λ 0) to the network's image (λ 1, where
    the solve barely moves it) and no sparsity to strong sparsity at low SNR; six folds hold back a
    sixth of the outer lines at a time, so the data the candidates are scored on stay close to the
    scan's own sampling; the margin keeps the door's refine where the scores differ by little more than
    their noise. ``fallback``: ``discrepancy`` (module docstring) or ``none`` (the door's refine) where
    the folds do not decide; ``fallback_lam``: λ of that fallback, a light pull to the network's image;
    ``noise_dominated``: the network's held-out error from which the fallback applies (module docstring);
    ``lam_within_error``: the μ line at the least λ within one standard error of the λ line's best (else at
    its best).
    The folds come first because, as the only rule, the discrepancy principle chose less well where
    they do decide (docs/results/adaptation.md)."""

    lams: tuple = (0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    mus: tuple = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
    start_mu: float = 0.002
    margin: float = 0.1
    folds: int = 6
    slices: int = 2
    iterations: int = 60
    wavelet: str = "db2"
    offsets: int = 1
    fallback: str = "discrepancy"
    fallback_lam: float = 0.003
    noise_dominated: float = 1.0
    lam_within_error: bool = True
    seed: int = 0

    def __post_init__(self):
        if not self.lams or not self.mus or min(self.lams) < 0 or min(self.mus) < 0:
            raise ValueError(f"the calibration grid needs non-negative λ and μ values, got {self.lams}, {self.mus}")
        if self.wavelet not in WAVELETS:
            raise ValueError(f"wavelet must be one of {', '.join(WAVELETS)}, got {self.wavelet!r}")
        if self.fallback not in ("discrepancy", "none") or self.fallback_lam < 0 or self.noise_dominated < 0:
            raise ValueError(f"fallback must be discrepancy or none, fallback_lam and noise_dominated >= 0, got "
                             f"{self.fallback!r}, {self.fallback_lam}, {self.noise_dominated}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if self.start_mu not in self.mus:
            raise ValueError(f"start_mu {self.start_mu} must be one of mus {self.mus}")
        if self.folds < 2 or self.slices < 1 or self.iterations < 1 or self.offsets < 1:
            raise ValueError(f"folds must be >= 2, slices, iterations and offsets >= 1, got {self.folds}, "
                             f"{self.slices}, {self.iterations}, {self.offsets}")

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(λ, μ)`` of every grid point, float32 ``(P,)`` each."""
        lam, mu = np.meshgrid(np.asarray(self.lams, np.float32), np.asarray(self.mus, np.float32), indexing="ij")
        return torch.from_numpy(lam.ravel()), torch.from_numpy(mu.ravel())

    def lam_line(self) -> list[tuple[float, float]]:
        """The first line searched: every λ at ``start_mu``."""
        return [(float(lam), float(self.start_mu)) for lam in self.lams]

    def mu_line(self, lam: float) -> list[tuple[float, float]]:
        """The second line: every μ at ``lam``."""
        return [(float(lam), float(mu)) for mu in self.mus]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class CalibrationResult:
    """What :func:`calibrate_solve` chose: ``lam``/``mu``, their ``score`` and every scored candidate's
    (``table``: one ``{lam, mu, score, maps, outside}`` each, ``outside`` the score with each of
    :data:`gadget.recon.refine.CS_OUTSIDE` where the maps vanish), the network's own held-out error (``network_score``),
    the expected score of the held-back lines' noise alone (``noise_score``),
    whether the cs refine is used (``used``) and by which rule (``rule``: ``folds``, ``discrepancy`` or
    ``none``), the folds and slices it used, its time, the refine's map source (``maps``: ``network``
    or ``espirit``) and what it sends where they vanish (``outside``: ``network`` or ``capped``; both
    :class:`gadget.recon.refine.RefineConfig`)."""

    lam: float
    mu: float
    score: float
    table: list
    folds: int
    slices: int
    seconds: float
    network_score: float = float("nan")
    noise_score: float = 0.0
    wavelet: str = "db2"
    rule: str = "folds"
    maps: str = "network"
    outside: str = "network"

    @property
    def used(self) -> bool:
        """Whether the scan is reconstructed with the ``cs`` refine (a rule decided)."""
        return self.rule != "none"

    def summary(self) -> str:
        verdict = {"folds": "used", "discrepancy": "chosen by the noise level (the held-back lines did not decide)",
                   "none": "not used: no better than the network's own on the held-back lines"}[self.rule]
        maps = {"espirit": ", ESPIRiT's maps", "network": ", the network's maps"}.get(self.maps, "")
        if self.outside == "capped":
            maps += " (the network's image capped at the noise floor where they vanish)"
        return (f"λ {self.lam:g}, μ {self.mu:g}{maps}, {verdict} (held-out error {self.score:.4g}, the network's "
                f"{self.network_score:.4g}, the noise's {self.noise_score:.4g}; {len(self.table)} candidates, "
                f"{self.folds} folds on {self.slices} slices, {self.seconds:.1f} s)")

    def refine_config(self, base: RefineConfig = RefineConfig()) -> RefineConfig:
        """The ``cs`` refine with the chosen weights (the other settings from ``base``)."""
        return RefineConfig(**{**asdict(base), "mode": "cs", "cs_lambda": self.lam, "cs_mu": self.mu,
                               "cs_wavelet": self.wavelet, "maps": self.maps, "cs_outside": self.outside})


def outer_folds(mask: np.ndarray, acs: int, folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The acquired lines of ``mask`` outside the ACS block dealt at random into ``folds`` disjoint sets
    (sorted column indices; sizes differ by at most one); one line per fold where there are fewer lines
    than folds. At least two such lines are needed."""
    outer = np.flatnonzero(np.asarray(mask, bool) & ~acs_lines(mask.size, acs))
    if outer.size < 2:
        raise AdaptError(f"{outer.size} acquired lines outside the ACS block: too few to hold any back")
    folds = min(folds, outer.size)
    rng.shuffle(outer)
    return [np.sort(outer[k::folds]) for k in range(folds)]


def spread(count: int, most: int) -> list[int]:
    """Up to ``most`` indices of ``range(count)`` spread evenly (the middle one when ``most`` is 1)."""
    if count <= most:
        return list(range(count))
    return [int((i + 0.5) * count / most) for i in range(most)]  # the centres of ``most`` equal parts


@dataclass
class NetworkRun:
    """The network on one slice's lines: its RSS ``image`` ``(1, H, W)``, ``final`` k-space and ``coils``
    images ``(1, C, H, W)``, the ``measured`` k-space it saw ``(1, C, H, W)`` on ``mask`` ``(W,)``, and the
    ACS count ESPIRiT's maps read (0 where the calibration lines come from a separate reference)."""

    image: torch.Tensor
    final: torch.Tensor
    coils: torch.Tensor
    measured: torch.Tensor
    mask: torch.Tensor
    maps_acs: int

    def maps_and_prior(self, refine: RefineConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """The maps ``(C, H, W)`` ``refine`` chooses (:func:`gadget.recon.refine.choose_maps`) and the
        network's coil images combined with them ``(H, W)``."""
        maps, _, prior = maps_and_prior(self.image, self.final, self.measured, self.mask, refine, self.maps_acs,
                                        coil_images=self.coils)
        return maps[0], prior[0]


def run_network(engine, kspace: np.ndarray, mask: np.ndarray, acs: int, sens_kspace=None) -> NetworkRun:
    """:class:`NetworkRun` of one slice. ``acs``: the network's ACS count (with ``sens_kspace``, the
    reference's lines)."""
    reference = None if sens_kspace is None else sens_kspace[None]
    image, final, coils = engine.run_tensors(kspace[None], mask, acs, reference, coil_images=True)
    measured = torch.from_numpy(kspace[None]).to(final.device, torch.complex64)
    maps_acs = 0 if sens_kspace is not None else acs  # no calibration block in the imaging lines: the network's maps
    return NetworkRun(image, final.to(torch.complex64), coils, measured, torch.from_numpy(mask).to(final.device),
                      maps_acs)


def network_prior(engine, kspace: np.ndarray, mask: np.ndarray, acs: int, sens_kspace=None,
                  refine: RefineConfig = RefineConfig()):
    """``(image, maps, prior, final)``: the network's RSS image ``(H, W)``, the refine's maps ``(C, H, W)``
    (:func:`gadget.recon.refine.choose_maps`), the network's coil images combined with them ``(H, W)`` and
    its final k-space ``(C, H, W)``, for one slice. ``acs``: the network's ACS count (with
    ``sens_kspace``, the reference's lines)."""
    run = run_network(engine, kspace, mask, acs, sens_kspace)
    maps, prior = run.maps_and_prior(refine)
    return run.image[0], maps, prior, run.final[0]


@dataclass
class HeldOutFold:
    """One slice with one fold's lines held back: the data the candidates see (``measured`` complex
    ``(C, H, W)`` on ``kept`` ``(W,)``), the network's ``prior`` ``(H, W)`` and ``maps`` ``(C, H, W)`` from
    those data alone, the held-back lines (``fold`` column indices, ``held`` ``(C, H, len(fold))``), the
    network's own prediction of them (``network``, same layout), that of its coil images where the maps
    vanish, as each of :data:`gadget.recon.refine.CS_OUTSIDE` sends them (``outside``, ``(len(CS_OUTSIDE),
    C, H, len(fold))``; zero where the maps reach everywhere), and the expected :meth:`error` of the
    held-back lines' noise alone (``noise``: ``σ²`` per sample over their energy, σ from the kept lines)."""

    measured: torch.Tensor
    kept: torch.Tensor
    maps: torch.Tensor
    prior: torch.Tensor
    fold: np.ndarray
    held: torch.Tensor
    network: torch.Tensor
    outside: torch.Tensor
    noise: float = 0.0

    def error(self, predicted: torch.Tensor) -> torch.Tensor:
        """Squared error of ``predicted`` held-back lines, normalised by their energy (0-d)."""
        return (predicted - self.held).abs().square().sum() / energy(self.held)


def energy(lines: torch.Tensor) -> torch.Tensor:
    """``Σ|y|²`` of ``lines`` (0-d), at least the smallest positive float32 (what held-out errors divide by)."""
    return lines.abs().square().sum().clamp(min=torch.finfo(torch.float32).tiny)


def noise_share(sigma: float, held: torch.Tensor) -> float:
    """The expected normalised error (:meth:`HeldOutFold.error`) of the noise alone in the ``held`` lines:
    ``σ²`` per sample over their energy."""
    return sigma ** 2 * held.numel() / float(energy(held))


def held_out_run(engine, sl: AdaptSlice, fold: np.ndarray) -> NetworkRun:
    """The network on the slice ``sl`` without the lines of ``fold``."""
    kept = sl.mask.copy()
    kept[fold] = False
    return run_network(engine, sl.kspace * kept, kept, sl.acs, sl.sens_kspace)


def held_out_fold(run: NetworkRun, sl: AdaptSlice, fold: np.ndarray, refine: RefineConfig) -> HeldOutFold:
    """:class:`HeldOutFold` of the network's ``run`` on ``sl`` without ``fold``, the maps as ``refine``
    chooses them."""
    maps, prior = run.maps_and_prior(refine)
    device = prior.device
    coils = run.coils[0].to(maps.dtype) * ~map_support(maps[None])[0]  # where the maps vanish
    sigma = noise_sigma(run.measured, run.mask)
    capped = coils * capped_outside(maps[None], rss(coils[None]), sigma)[0]
    outside = fft2c(torch.stack([coils, capped]))[..., fold]
    held = torch.from_numpy(sl.kspace[..., fold]).to(device, torch.complex64)
    return HeldOutFold(run.measured[0], run.mask, maps, prior, fold, held, run.final[0][..., fold], outside,
                       noise_share(float(sigma[0]), held))


def hold_out(engine, sl: AdaptSlice, fold: np.ndarray, refine: RefineConfig = RefineConfig()) -> HeldOutFold:
    """The slice ``sl`` without the lines of ``fold``, and the network's image from what is left (the maps
    as ``refine`` chooses them)."""
    return held_out_fold(held_out_run(engine, sl, fold), sl, fold, refine)


def espirit_has_null_space(sl: AdaptSlice) -> bool:
    """Whether ESPIRiT's calibration on the slice's own ACS lines leaves a null space
    (:data:`gadget.recon.refine.MAX_SIGNAL_SHARE`), so that its maps could be used at all."""
    if sl.sens_kspace is not None:  # no calibration block in the imaging lines: the network's maps only
        return False
    try:
        calibration = espirit_calibration(sl.kspace, sl.acs, mask=sl.mask, config=SOLVE_ESPIRIT)
    except ValueError:
        return False
    return calibration.signal_share <= MAX_SIGNAL_SHARE


def fold_errors(data: HeldOutFold, lam: torch.Tensor, mu: torch.Tensor, settings: CalibrationConfig) -> torch.Tensor:
    """Each candidate's squared error on the held-back lines, normalised by their energy, ``(P, 1 +
    len(CS_OUTSIDE))``: the solve's alone (nothing where the maps vanish), then with each of
    :data:`gadget.recon.refine.CS_OUTSIDE` there."""
    x = solve(data.maps, data.measured, data.kept, data.prior, lam, mu, settings.iterations, settings.seed,
              settings.wavelet, settings.offsets)
    errors = []
    for candidate in x:  # one candidate at a time: the whole k-space of every candidate at once is large
        inside = fft2c(data.maps * candidate)[..., data.fold]
        errors.append(torch.stack([data.error(inside), *(data.error(inside + outside) for outside in data.outside)]))
    return torch.stack(errors).cpu()


@torch.inference_mode()
def calibrate_solve(engine, slices: Sequence[AdaptSlice], settings: CalibrationConfig = CalibrationConfig(),
                    on_fold: Optional[Callable[[int, int], None]] = None) -> CalibrationResult:
    """The ``cs`` refine's ``(λ, μ)`` for a scan (module docstring). ``engine``: a
    :class:`gadget.recon.engine.Reconstructor` (the network the scan will be reconstructed with);
    ``slices``: the scan's undersampled slices; ``on_fold(done, total)`` is called after each fold. The folds
    run side by side on as many workers as the engine admits forwards (``Reconstructor.forwards``, which
    ``--workers`` sets). Raises :class:`AdaptError` when no slice has enough outer lines for the folds."""
    if not slices:
        raise AdaptError("no slices to calibrate the solve on")
    t0 = time.perf_counter()
    rng = np.random.default_rng(settings.seed)
    chosen = [slices[i] for i in spread(len(slices), settings.slices)]
    plan = [(sl, fold) for sl in chosen
            for fold in outer_folds(sl.measured_lines, sl.split_acs, settings.folds, rng)]
    table = []
    workers = getattr(engine, "forwards", 1)  # folds side by side, as the engine admits

    runs = []
    for run in in_workers(_inference(lambda step: held_out_run(engine, *step)), plan, workers):
        runs.append(run)
        if on_fold:
            on_fold(len(runs), len(plan))

    def search(refine: RefineConfig) -> _Search:
        """The folds with the maps ``refine`` chooses, the line along λ, then the line along μ (the folds are
        let go when it returns)."""
        held_out = [held_out_fold(run, sl, fold, refine) for run, (sl, fold) in zip(runs, plan)]

        def scored(line: list[tuple[float, float]]) -> np.ndarray:
            """Each candidate's errors on each fold, ``(folds, len(line), 1 + len(CS_OUTSIDE))``, their means
            added to the table."""
            lam, mu = (torch.tensor(values, dtype=torch.float32) for values in zip(*line))
            errors = np.stack([e.numpy() for e in in_workers(
                _inference(lambda data: fold_errors(data, lam, mu, settings)), held_out, workers)])
            table.extend({"lam": a, "mu": b, "score": float(row[0]), "maps": refine.maps,
                          "outside": dict(zip(CS_OUTSIDE, map(float, row[1:])))}
                         for (a, b), row in zip(line, errors.mean(0)))
            return errors

        def best(line: list[tuple[float, float]]) -> tuple[float, float, str, float]:
            errors = scored(line)
            scores = errors.mean(0)
            i = int(np.argmin(scores[:, 0]))
            # what goes where the maps vanish: the network's image only where it predicts the held-back lines
            # better by more than one standard error, as the least λ (the capped image leans less on it)
            outside = CS_OUTSIDE[least_within_error(errors[:, i, 1:], _OUTSIDE_LEANING)]
            return line[i][0], line[i][1], outside, float(scores[i, 0])

        lam_line = scored(settings.lam_line())[..., 0]
        lam = settings.lams[lam_index(lam_line, settings)]
        network = float(sum(float(data.error(data.network)) for data in held_out) / len(held_out))
        noise = sum(data.noise for data in held_out) / len(held_out)
        winner = best(settings.mu_line(lam))
        return _Search(*winner, network, noise, min(winner[3], float(lam_line.mean(0).min())))

    sources = ["network"] + (["espirit"] if any(map(espirit_has_null_space, chosen)) else [])
    found = {source: search(RefineConfig(mode="cs", maps=source)) for source in sources}
    # the maps by the lowest error either search reached: the λ within one standard error gives up a little
    # of it on purpose, within the maps, and must not cost them the comparison
    maps = min(found, key=lambda source: found[source].lowest)
    lam, mu, outside, score, network, noise, _ = found[maps]
    rule = "folds" if beats_network(score, network, noise, settings.margin) else "none"
    if rule == "none" and settings.fallback == "discrepancy" and network >= settings.noise_dominated:
        for source in sorted(found, key=lambda source: found[source].lowest):  # the better-scoring maps first
            quiet = discrepancy_mu(engine, chosen, settings, RefineConfig(mode="cs", maps=source))
            if quiet is not None:  # no fold decided what goes where the maps vanish: the network's image
                lam, mu, rule, maps, outside = settings.fallback_lam, quiet, "discrepancy", source, "network"
                break
    return CalibrationResult(lam, mu, score, table, len(plan) // len(chosen), len(chosen), time.perf_counter() - t0,
                             network, noise, settings.wavelet, rule, maps, outside)


#: How much each of :data:`gadget.recon.refine.CS_OUTSIDE` leans on the network's image (the least within one
#: standard error is sent).
_OUTSIDE_LEANING = [0 if option == "capped" else 1 for option in CS_OUTSIDE]


class _Search(NamedTuple):
    """One map source's search in :func:`calibrate_solve`: the winner's ``lam``, ``mu``, ``outside`` and
    ``score``, the network's own held-out error, the noise's, and the ``lowest`` error of any candidate scored."""

    lam: float
    mu: float
    outside: str
    score: float
    network: float
    noise: float
    lowest: float


def lam_index(errors: np.ndarray, settings: CalibrationConfig) -> int:
    """The index into ``settings.lams`` of the λ the μ line runs at, from the λ line's errors ``(folds,
    len(lams))``: :func:`least_within_error` with ``lam_within_error``, else the lowest mean."""
    return least_within_error(errors, settings.lams) if settings.lam_within_error else int(errors.mean(0).argmin())


def least_within_error(errors: np.ndarray, values: Sequence[float]) -> int:
    """Index of the candidate of least ``values`` among those whose mean error is within one standard error
    of the lowest's. ``errors``: ``(folds, candidates)``, each fold's error of each candidate; a candidate's
    standard error is that of the mean of its differences to the lowest, fold by fold (the folds' noise is
    common to both and cancels)."""
    mean = errors.mean(0)
    lowest = int(mean.argmin())
    difference = errors - errors[:, lowest:lowest + 1]
    standard_error = difference.std(0, ddof=1) / np.sqrt(errors.shape[0])
    near = np.flatnonzero(mean - mean[lowest] <= standard_error)
    return int(near[np.argmin(np.asarray(values, dtype=float)[near])])


def beats_network(score: float, network: float, noise: float, margin: float) -> bool:
    """Whether a candidate's held-out error ``score`` is below the network's ``network`` by the relative
    ``margin`` of what lies above the held-back lines' noise (``noise``, the error of the noise alone). Where
    the network is at the noise already, nothing is left to win."""
    return network > noise and score - noise < (1 - margin) * (network - noise)


def _inference(fn: Callable) -> Callable:
    """``fn`` under ``torch.inference_mode`` on whichever thread runs it (the mode is per thread)."""
    def run(*args):
        with torch.inference_mode():
            return fn(*args)
    return run


def discrepancy_mu(engine, slices: Sequence[AdaptSlice], settings: CalibrationConfig,
                   refine: RefineConfig = RefineConfig()) -> Optional[float]:
    """The largest μ of ``settings.mus`` whose solve (λ ``settings.fallback_lam``, all acquired lines, the
    maps ``refine`` chooses) leaves a data residual no larger than the noise, summed over ``slices``:
    ``Σ‖M F S x̂ − y‖² ≤ Σ N σ²`` with ``N`` the measured samples of a slice (acquired, not exactly 0) and σ
    its noise level; None when not even the smallest does."""
    mus = sorted(settings.mus)
    residual, noise = torch.zeros(len(mus)), 0.0
    for sl in slices:
        _, maps, prior, _ = network_prior(engine, sl.kspace, sl.mask, sl.acs, sl.sens_kspace, refine)
        y = torch.from_numpy(sl.kspace).to(prior.device, torch.complex64)
        columns = torch.from_numpy(sl.mask).to(prior.device)
        x = solve(maps, y, columns, prior, [settings.fallback_lam] * len(mus), mus, settings.iterations,
                  settings.seed, settings.wavelet, settings.offsets)
        for i, candidate in enumerate(x):
            residual[i] += float((fft2c(maps * candidate)[..., columns] - y[..., columns]).abs().square().sum())
        sigma = float(noise_sigma(y[None], columns)[0])
        noise += sigma ** 2 * int(y[..., columns].ne(0).sum())  # exact zeros were never measured
    within = [mu for mu, r in zip(mus, residual.tolist()) if r <= noise]
    return max(within) if within else None
