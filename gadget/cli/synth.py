"""``varnet synth``: realistic simulated multi-coil raw data from real anatomy."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    from . import example_epilog

    p = sub.add_parser(
        "synth", help="simulate multi-coil raw data from real anatomy (fastMRI or ISMRMRD files)",
        description=(
            "Simulate fully sampled multi-coil Cartesian brain scans from real anatomy:\n"
            "  slices of the MNI152 2009 template (nilearn wheel), Colin27 (Debian mricron-data) or a phantom;\n"
            "  smooth random phase; Biot-Savart loop-coil sensitivities; a fine grid cropped in k-space (no\n"
            "  inverse crime); 2x readout oversampling; correlated coil noise at the given SNR plus a noise scan.\n"
            "Writes one file per volume into OUT_DIR, named synth_<source>_<orientation>_NNN.h5:\n"
            "  fastmri: kspace (slice, coil, 2N, N), reconstruction_rss and target_noise_free (slice, N, N),\n"
            "           noise (coil, samples), ismrmrd_header; with --acceleration the kspace is undersampled\n"
            "           and mask, acceleration, num_low_frequency are added (targets kept);\n"
            "  ismrmrd: raw acquisitions (noise scan first), only the acquired lines with --acceleration."),
        epilog=example_epilog("varnet synth data/synth --source mni --volumes 4 --slices 16 --coils 12",
                              "varnet synth data/mrd --format ismrmrd --acceleration 4 --mask equispaced-fraction"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="output directory (created)")
    p.add_argument("--source", default="mni", metavar="{mni,colin,phantom}",
                   help="anatomy: MNI152 2009 brain (default), Colin27 head, or Shepp-Logan phantom")
    p.add_argument("--volumes", type=int, default=1, help="number of files to write (default 1)")
    p.add_argument("--slices", type=int, default=16, help="slices per volume, from the central brain (default 16)")
    p.add_argument("--orientation", default="axial", metavar="{axial,coronal,sagittal}", help="default axial")
    p.add_argument("--coils", type=int, default=12, help="receive loops, 4-32 (default 12)")
    p.add_argument("--matrix", type=int, default=320,
                   help="image matrix N: images N x N, k-space 2N (readout) x N (phase); default 320")
    p.add_argument("--snr", type=float, default=30.0, metavar="DB",
                   help="mean object signal of the noise-free RSS over per-coil noise std, in dB (default 30)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    p.add_argument("--format", default="fastmri", metavar="{fastmri,ismrmrd}", help="default fastmri")
    p.add_argument("--acceleration", type=float, nargs="+", metavar="R",
                   help="undersample; with several values each volume draws one (default: fully sampled)")
    p.add_argument("--mask", default="equispaced-fraction", metavar="{random,equispaced,equispaced-fraction}",
                   help="fastMRI mask kind for --acceleration (default equispaced-fraction)")
    p.add_argument("--center-fraction", type=float, default=0.08, metavar="F",
                   help="fraction of fully sampled centre lines for --acceleration (default 0.08)")
    p.add_argument("--contrast", default="t1w", metavar="{t1w,pdw}",
                   help="tissue contrast (pdw needs --source mni; default t1w)")
    p.add_argument("--fov", type=float, metavar="MM", help="recon field of view in mm (default per source)")
    p.add_argument("--threads", type=int, default=2, help="FFT threads (default 2)")
    p.add_argument("--head", action="store_true",
                   help="domain-randomised whole heads (scalp, fat, skull; random contrast, deformation, bias, "
                        "texture, FOV with fold-over, matrix, oversampling, head-hugging coils, SNR per volume); "
                        "--source then takes a comma-separated list of mni,colin,inia and --matrix/--coils/--snr/"
                        "--contrast/--orientation/--fov are replaced by the ranges below")
    p.add_argument("--preview", action="store_true",
                   help="also write OUT_DIR/preview.png: the middle slice of up to 8 volumes (target and coil 1)")
    p.add_argument("--matrix-range", type=int, nargs=2, default=(96, 384), metavar=("LO", "HI"),
                   help="--head: image matrix limits (default 96 384)")
    p.add_argument("--coil-range", type=int, nargs=2, default=(8, 32), metavar=("LO", "HI"),
                   help="--head: coil count limits (default 8 32)")
    p.add_argument("--snr-range", type=float, nargs=2, default=(15.0, 40.0), metavar=("LO", "HI"),
                   help="--head: SNR limits in dB (default 15 40)")
    p.add_argument("--brain-only-fraction", type=float, default=0.0, metavar="F",
                   help="--head: share of volumes drawn skull-stripped (the brain alone in the head's field of "
                        "view; default 0)")
    p.set_defaults(run=run)


def _check(name: str, value: str, options) -> None:
    from . import UserError

    if value not in options:
        raise UserError(f"unknown --{name} {value!r}; choose one of {', '.join(options)}")


def run(args) -> int:
    from tqdm import tqdm

    from gadget.converters.anatomy import CONTRASTS, SOURCES, AnatomyUnavailable
    from gadget.converters.coils import MAX_COILS, MIN_COILS
    from gadget.converters.geometry import ORIENTATIONS
    from gadget.converters.synth import FORMATS, MASK_KINDS, SynthConfig, run_synth

    from . import UserError

    from gadget.converters.tissue import HEAD_SOURCES

    for name, options in (("orientation", tuple(ORIENTATIONS)), ("format", FORMATS),
                          ("mask", MASK_KINDS), ("contrast", CONTRASTS)):
        _check(name, getattr(args, name), options)
    head_sources = tuple(s.strip() for s in args.source.split(","))
    for src in head_sources if args.head else (args.source,):
        _check("source", src, HEAD_SOURCES if args.head else SOURCES)
    if not MIN_COILS <= args.coils <= MAX_COILS:
        raise UserError(f"--coils must be between {MIN_COILS} and {MAX_COILS}, got {args.coils}")
    try:
        config = SynthConfig(
            out_dir=args.out_dir, source="mni" if args.head else args.source, volumes=args.volumes, slices=args.slices,
            orientation=args.orientation, coils=args.coils, matrix=args.matrix, snr_db=args.snr, seed=args.seed,
            format=args.format, accelerations=tuple(args.acceleration or ()), mask=args.mask,
            center_fraction=args.center_fraction, contrast=args.contrast, fov_mm=args.fov, threads=args.threads,
            head=args.head, head_sources=head_sources, matrix_limits=tuple(args.matrix_range),
            coil_limits=tuple(args.coil_range), snr_limits_db=tuple(args.snr_range),
            brain_only_fraction=args.brain_only_fraction)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        with tqdm(total=config.volumes * config.slices, unit="slice", desc="synth", leave=False, disable=None) as bar:
            paths = run_synth(config, progress=bar.update)
    except AnatomyUnavailable as exc:
        raise UserError(str(exc)) from None
    except ImportError as exc:
        raise UserError(f"--format ismrmrd needs gadget.converters.fastmri_to_ismrmrd ({exc})") from None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for path in paths:
        print(path)
    if args.preview:
        from gadget.converters.preview import write_preview

        print(write_preview(paths, config.out_dir / "preview.png"))
    return 0
