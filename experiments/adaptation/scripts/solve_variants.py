"""Variants of the cs refine's solve at fixed weights, scored against the truth on rows of the adaptation
matrix: does a change to the solve itself (not to how its weights are chosen) lift the image?

- ``plain``: the cs refine as `adapt: solve` runs it (ESPIRiT's maps, capped outside);
- ``whiten-band``: the data term whitened across coils, ``½‖W (M F S x − y)‖²``, with the coil noise
  covariance estimated from the outer eighth of the readout on the acquired lines (where
  :func:`gadget.recon.refine.noise_sigma` reads σ); ``W = sqrt(mean diag C) L⁻¹``, ``C = L Lᴴ``;
- ``whiten-true``: the same with the covariance the simulation drew its noise with (simulated rows only);
- ``shading``: the network's image, the solve's prior, multiplied by a smooth gain (Gaussian width
  ``--shading-width`` pixels) that gives it the low frequencies of the plain compressed-sensing image
  (λ 0, the same μ): the pull then acts on the network's detail, not on its intensity shading;
- ``db3``, ``db4``: Daubechies' six- and eight-tap wavelets instead of db2;
- ``offsetsK``: each step's shrinkage averaged over K wavelet grids instead of
  :data:`gadget.recon.sparse.SPIN_OFFSETS` (``offsets1``: one grid per step, as before cycle spinning in every
  step).

    python experiments/adaptation/scripts/solve_variants.py --row sim-8coil230:4 --pairs 0.003,0.001 0,0.002

Each variant patches the module it changes for its own run only (an experiment, not the product).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptation_matrix as am  # noqa: E402  (the matrix's rows, masks and scores)

from gadget.converters.simulate import simulate_volume  # noqa: E402
from gadget.model.checkpoint import load_checkpoint  # noqa: E402
from gadget.model.shipped import shipped_checkpoint  # noqa: E402
from gadget.mri.coils import outer_readout  # noqa: E402
from gadget.mri.metrics import center_crop  # noqa: E402
from gadget.recon import refine, sparse  # noqa: E402
from gadget.recon.engine import Reconstructor  # noqa: E402
from gadget.recon.refine_stage import RefinedEngine, Refiner  # noqa: E402
from gadget.stream.noise import noise_covariance, whitening_matrix  # noqa: E402

#: Daubechies' orthonormal scaling filters with three and four vanishing moments (Daubechies, Ten Lectures on
#: Wavelets, 1992, table 6.1), in the order of :data:`gadget.recon.sparse.WAVELETS`.
LONGER_WAVELETS = {
    "db3": (0.3326705529509569, 0.8068915093133388, 0.4598775021193313, -0.1350110200103908,
            -0.0854412738822415, 0.0352262918821007),
    "db4": (0.2303778133088964, 0.7148465705529155, 0.6308807679298587, -0.0279837694168599,
            -0.1870348117190931, 0.0308413818355607, 0.0328830116668852, -0.0105974017850690),
}
VARIANTS = ("plain", "whiten-band", "whiten-true", "shading", "db3", "db4", "offsets1")


def band_covariance(measured: torch.Tensor, columns: torch.Tensor) -> np.ndarray:
    """Coil covariance ``(C, C)`` of the outer eighth of the readout on the acquired ``columns``."""
    x = outer_readout(measured)[..., columns.to(torch.bool)]
    return noise_covariance(x.reshape(measured.shape[0], -1).cpu().numpy())


@contextlib.contextmanager
def whitened_solves(covariance=None):
    """``sparse.solve`` with the data term whitened (``covariance``: fixed, else :func:`band_covariance`).
    ``W S`` and ``W y`` are scaled by ``1/√L``, ``L`` the largest ``Σ_c |(W S)_c|²``, and λ, μ by ``1/L``: the
    same minimiser, with the solve's step bound (``Σ|S|² ≤ 1``) kept."""
    plain = sparse.solve

    def solve(maps, measured, columns, prior, lam, mu, *args, **kwargs):
        cov = band_covariance(measured, columns) if covariance is None else covariance
        w = torch.from_numpy(whitening_matrix(cov)).to(maps.device)
        maps, measured = (torch.einsum("dc,chw->dhw", w, t) for t in (maps, measured))
        lip = float(maps.abs().square().sum(0).max())
        maps, measured = maps / lip ** 0.5, measured / lip ** 0.5
        lam = torch.as_tensor(lam, dtype=torch.float32) / lip
        mu = torch.as_tensor(mu, dtype=torch.float32) / lip
        return plain(maps, measured, columns, prior, lam, mu, *args, **kwargs)

    sparse.solve = solve
    try:
        yield
    finally:
        sparse.solve = plain


@contextlib.contextmanager
def shading_corrected_prior(mu: float, width: float):
    """``refine.maps_and_prior`` with the prior's low frequencies taken from the λ 0 solve (module docstring)."""
    plain = refine.maps_and_prior

    def maps_and_prior(image, final, measured, mask, config, *args, **kwargs):
        maps, sources, prior = plain(image, final, measured, mask, config, *args, **kwargs)
        columns = refine._mask_rows(mask, prior.shape[0], prior.shape[-1]).to(prior.device)
        support = refine.map_support(maps).cpu().numpy()
        out = []
        for i in range(prior.shape[0]):
            cs = sparse.solve(maps[i], measured[i], columns[i], prior[i], [0.0], [mu], config.cs_iterations,
                              wavelet=config.cs_wavelet)[0]
            smooth_cs = ndimage.gaussian_filter(cs.abs().cpu().numpy() * support[i], width)
            smooth_net = ndimage.gaussian_filter(prior[i].abs().cpu().numpy() * support[i], width)
            inside = support[i] & (smooth_net > 1e-3 * smooth_net.max())
            gain = np.clip(np.where(inside, smooth_cs / np.maximum(smooth_net, 1e-30), 1.0), 0.25, 4.0)
            out.append(prior[i] * torch.from_numpy(gain.astype(np.float32)).to(prior.device))
        return maps, sources, torch.stack(out)

    refine.maps_and_prior = maps_and_prior
    try:
        yield
    finally:
        refine.maps_and_prior = plain


@contextlib.contextmanager
def grids_per_step(offsets: int):
    """``sparse.solve`` with ``offsets`` wavelet grids per step."""
    plain = sparse.solve
    sparse.solve = functools.partial(plain, offsets=offsets)
    try:
        yield
    finally:
        sparse.solve = plain


@contextlib.contextmanager
def longer_wavelets():
    sparse.WAVELETS.update(LONGER_WAVELETS)
    try:
        yield
    finally:
        for name in LONGER_WAVELETS:
            sparse.WAVELETS.pop(name)


def true_covariance(name: str) -> np.ndarray:
    args = am.SIM_ROWS.get(name) or am.MORE_SIM_ROWS.get(name)
    if args is None:
        raise SystemExit(f"whiten-true needs a simulated row, got {name}")
    return simulate_volume(num_slices=3, seed=21, **args).noise_covariance  # as am.load_row draws the row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", required=True, help="row:acceleration (adaptation_matrix.py's rows)")
    p.add_argument("--pairs", nargs="+", required=True, help="λ,μ pairs to solve with")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--shading-width", type=float, default=4.0)
    p.add_argument("--real-dir", type=Path, default=am.REAL)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    row, accel, mask, acs, measured = am.undersampled_row(args.row, args.real_dir)
    name = row.name
    engine = Reconstructor(load_checkpoint(shipped_checkpoint()).model, "cpu")
    pairs = [tuple(map(float, pair.split(","))) for pair in args.pairs]
    print(f"{name} {accel}×: in-head / whole SSIM, PSNR dB\n")
    print("| variant | λ | μ | in-head | whole |")
    print("|---|---|---|---|---|")
    for variant in args.variants.split(","):
        for lam, mu in pairs:
            wavelet = variant if variant in LONGER_WAVELETS else "db2"
            patch = {"whiten-band": lambda: whitened_solves(),
                     "whiten-true": lambda: whitened_solves(true_covariance(name)),
                     "shading": lambda: shading_corrected_prior(mu, args.shading_width),
                     "db3": longer_wavelets, "db4": longer_wavelets}.get(variant, contextlib.nullcontext)
            if variant.startswith("offsets"):
                patch = functools.partial(grids_per_step, int(variant.removeprefix("offsets")))
            with patch():
                config = refine.RefineConfig(mode="cs", cs_lambda=lam, cs_mu=mu, maps="espirit",
                                             cs_outside="capped", cs_wavelet=wavelet)
                image = RefinedEngine(engine, Refiner(config))(measured[None], mask, acs)[0]
            scores = am.scores(center_crop(image, row.truth.shape), row)
            cells = [f"{scores[tag][0]:.3f} / {scores[tag][1]:.2f}" for tag in ("head", "whole")]
            print(f"| {variant} | {lam:g} | {mu:g} | {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
