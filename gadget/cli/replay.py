"""``varnet replay``: an ISMRMRD raw file through the same pipeline as the servers."""
from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm


def add_parser(sub) -> None:
    from . import (add_adapt_arguments, add_precision_argument, add_refine_argument, add_workers_argument,
                   example_epilog)

    p = sub.add_parser("replay", help="reconstruct an ISMRMRD raw file through the streaming pipeline",
                       description="Reads acquisitions from an ISMRMRD HDF5 file (or a Siemens twix meas.dat, "
                                   "converted first as by varnet convert twix-to-ismrmrd), runs the pipeline (noise "
                                   "prewhitening, slice assembly, E2E-VarNet, image building) and writes images "
                                   "as Gadgetron's client does: /<group>/image_<series>/, with the scan's "
                                   "XML header at /<group>/xml.",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=example_epilog("varnet replay scan.h5 images.h5 --checkpoint model.pt --png previews/",
                                             "varnet replay scan.h5 zf.h5 --config zero-filled"))
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--config", default="default", help="preset name from pipelines/ or a YAML file")
    p.add_argument("--checkpoint", default=None, help="model checkpoint (overrides the config)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda (overrides the config)")
    add_precision_argument(p)
    add_refine_argument(p, default=None)
    add_adapt_arguments(p)
    add_workers_argument(p)
    p.add_argument("--group", default="dataset", help="ISMRMRD group in the input file")
    p.add_argument("--out-group", default=None, help="group in the output file (default: input file stem)")
    p.add_argument("--png", type=Path, default=None, help="write PNG previews into this directory")
    p.add_argument("--dicom", type=Path, default=None, help="write DICOM files into this directory")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..data.mrd_file import count_acquisitions, read_header_xml
    from ..recon.config import ConfigError, load_config
    from ..recon.engine import resolve_device
    from ..recon.pipeline import build_engine
    from gadget.converters.twix import TwixError

    from ..replay import ismrmrd_source, replay_file
    from ..stream.sinks import save_png_previews, write_dicom, write_images_h5
    from . import UserError, operator_overrides, slice_workers

    try:
        config = load_config(args.config)
        config = config.merged(operator_overrides(args), "command line")
        config = config.merged({"workers": slice_workers(args.workers, resolve_device(config.device))},
                               "command line")
    except (ConfigError, RuntimeError, ValueError) as exc:
        raise UserError(str(exc)) from None
    try:
        engine, model_id = build_engine(config, offline=True)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    try:
        with ismrmrd_source(args.input, args.group) as (source, in_group):  # twix: a temporary ISMRMRD file
            total = count_acquisitions(source, in_group)
            with tqdm(total=total, desc=args.input.name, unit="acq", disable=None) as bar:
                result = replay_file(source, config, engine, in_group, model_id, progress=bar.update)
            header_xml = read_header_xml(source, in_group)
    except TwixError as exc:
        raise UserError(str(exc)) from None
    if result.adaptation is not None:
        print(f"{args.input}: adapted on its own lines: {result.adaptation.summary()}")
    if not result.images:
        raise UserError(f"{args.input}: no complete slice was found; nothing reconstructed")
    group = args.out_group or args.input.stem
    write_images_h5(args.output, result.images, group, header_xml=header_xml)
    if args.png:
        save_png_previews(result.images, args.png, args.input.stem)
    if args.dicom:
        write_dicom(result.images, args.dicom, {"PatientID": args.input.stem})
    print(f"{args.input} -> {args.output}:/{group}: {len(result.images)} images in {result.seconds:.1f} s "
          f"(model {result.model_seconds:.1f} s){'; ' + str(result.incomplete) + ' from incomplete slices' if result.incomplete else ''}"
          f"{f'; {result.flagged} flagged by the safety check (fallback: {config.fallback})' if result.flagged else ''}")
    return 0
