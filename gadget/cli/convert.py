"""``varnet convert``: fastMRI HDF5 ⇄ ISMRMRD raw files; Siemens twix (meas.dat) → ISMRMRD."""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm


def add_parser(sub) -> None:
    from . import example_epilog

    p = sub.add_parser("convert", help="convert between fastMRI HDF5 and ISMRMRD raw files; Siemens twix to ISMRMRD",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=example_epilog("varnet convert fastmri-to-ismrmrd file1000.h5 file1000_mrd.h5 "
                                             "--mask equispaced-fraction --acceleration 4 --center-fraction 0.08",
                                             "varnet convert ismrmrd-to-fastmri scan_mrd.h5 scan_fastmri.h5",
                                             "varnet convert twix-to-ismrmrd meas.dat meas_mrd.h5"))
    which = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    f2i = which.add_parser(
        "fastmri-to-ismrmrd", help="fastMRI multicoil file → ISMRMRD raw acquisitions",
        description="One acquisition per acquired phase line per slice, with counters, flags, geometry and "
                    "an updated header. A test-format input converts only its acquired lines; a full input "
                    "is undersampled with --mask, or converted fully sampled without it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=example_epilog("varnet convert fastmri-to-ismrmrd file1000.h5 out_mrd.h5 --mask random "
                              "--acceleration 8 --center-fraction 0.04 --seed 1"))
    f2i.add_argument("input", type=Path)
    f2i.add_argument("output", type=Path)
    f2i.add_argument("--mask", choices=("random", "equispaced", "equispaced-fraction"), default=None,
                     help="undersample a fully sampled input (fastMRI mask semantics)")
    f2i.add_argument("--acceleration", type=float, default=None)
    f2i.add_argument("--center-fraction", type=float, default=None)
    f2i.add_argument("--seed", type=int, default=None,
                     help="mask seed (default: derived from the file name, as fastMRI does)")
    f2i.set_defaults(run=run_fastmri_to_ismrmrd)

    i2f = which.add_parser(
        "ismrmrd-to-fastmri", help="ISMRMRD raw acquisitions → fastMRI multicoil file(s)",
        description="Slices → slice axis; averages averaged; each repetition/contrast/phase/set → its own "
                    "file (suffixes _rep{r}, _contrast{c}, _phase{p}, _set{s}); noise → 'noise' dataset.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=example_epilog("varnet convert ismrmrd-to-fastmri testdata.h5 testdata_fastmri.h5"))
    i2f.add_argument("input", type=Path)
    i2f.add_argument("output", type=Path)
    i2f.add_argument("--group", default="dataset", help="HDF5 group of the ISMRMRD dataset")
    i2f.set_defaults(run=run_ismrmrd_to_fastmri)

    t2i = which.add_parser(
        "twix-to-ismrmrd", help="Siemens twix raw data (meas.dat: VB, VD/VE/XA) → ISMRMRD raw acquisitions",
        description="The file's last measurement (the scan), preceded by the noise-adjust readouts of earlier "
                    "measurements, one acquisition per readout with its flags, counters and geometry, and a header "
                    "from the scan's protocol (encoding, coils, sequence parameters), as siemens_to_ismrmrd maps "
                    "them (differences: converters/twix.py). Protocol values the readouts contradict are taken "
                    "from the data, reported, and recorded in the header's userParameters (twix_override_*).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=example_epilog("varnet convert twix-to-ismrmrd meas_MID00042_FID01234_t2_tse.dat t2_tse_mrd.h5"))
    t2i.add_argument("input", type=Path)
    t2i.add_argument("output", type=Path)
    t2i.add_argument("--group", default="dataset", help="HDF5 group of the ISMRMRD dataset written")
    t2i.set_defaults(run=run_twix_to_ismrmrd)


def run_fastmri_to_ismrmrd(args) -> int:
    from gadget.converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd
    from gadget.data.fastmri_file import open_volume

    from . import UserError

    if args.mask and (args.acceleration is None or args.center_fraction is None):
        raise UserError("--mask needs --acceleration and --center-fraction")
    if not args.mask and (args.acceleration is not None or args.center_fraction is not None):
        raise UserError("--acceleration/--center-fraction need --mask")
    with open_volume(args.input) as vol:
        total = vol.num_slices
    try:
        with tqdm(total=total, desc=args.input.name, unit="slice", disable=None) as bar:
            plan = convert_fastmri_to_ismrmrd(args.input, args.output, args.mask, args.acceleration,
                                              args.center_fraction, args.seed, progress=bar.update)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(f"{args.input} -> {args.output}: {int(plan.acquired.sum())} of {plan.acquired.size} lines per slice, "
          f"{plan.num_low} calibration lines")
    return 0


def run_ismrmrd_to_fastmri(args) -> int:
    from gadget.converters.ismrmrd_to_fastmri import convert_ismrmrd_to_fastmri

    from . import UserError

    try:
        with tqdm(desc=args.input.name, unit="volume", disable=None) as bar:
            written = convert_ismrmrd_to_fastmri(args.input, args.output, args.group, progress=bar.update)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for path in written:
        print(f"{args.input} -> {path}")
    return 0


def run_twix_to_ismrmrd(args) -> int:
    from gadget.converters.twix import TwixError, convert_twix_to_ismrmrd

    from . import UserError

    try:
        with tqdm(desc=args.input.name, unit="acq", disable=None) as bar:
            report = convert_twix_to_ismrmrd(args.input, args.output, args.group, progress=bar.update)
    except TwixError as exc:
        raise UserError(str(exc)) from None
    print(f"{args.input} -> {args.output}: {report.summary()}")
    for note in report.notes:
        print(f"  note: {note}")
    return 0
