"""``varnet bench``: benchmarks that compare against the reference in the same run."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    from . import example_epilog

    p = sub.add_parser("bench", help="benchmarks (ours vs the fastMRI reference)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=example_epilog("varnet bench model --repeats 5 --threads 2"))
    which = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    a = which.add_parser("all", help="model, ingest and pipeline benchmarks and a table of the targets",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=example_epilog("varnet bench all", "varnet bench all --repeats 3 --threads 2"))
    a.add_argument("--repeats", type=int, default=5)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--device", default="cpu", help="where the model benchmark runs: cpu or cuda[:N] (ingest and "
                                                   "pipeline stay on the CPU); on CUDA the bf16/fp16 U-Nets join")
    a.set_defaults(run=run_all)

    m = which.add_parser("model", help="E2E-VarNet forward pass: ours vs fastmri.models.VarNet",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=example_epilog("varnet bench model",
                                               "varnet bench model --config small --shape 8 320 256 --repeats 3"))
    m.add_argument("--config", choices=("default", "small", "shipped"), default="default")
    m.add_argument("--shape", nargs=3, type=int, metavar=("COILS", "READOUT", "PHASE"), default=(15, 640, 368))
    m.add_argument("--acceleration", type=int, default=4)
    m.add_argument("--acs", type=int, default=30)
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--ours-only", action="store_true", help="skip the reference (fastmri not installed)")
    m.add_argument("--glibc-defaults", action="store_true",
                   help="leave glibc's mmap/trim thresholds as they are in every implementation's process "
                        "(default: keep freed memory, as the engine does)")
    m.add_argument("--implementations", default="reference,ours,ours-static,onnxruntime",
                   help="comma-separated subset of reference,ours,ours-static,ours-bf16,ours-fp16,onnxruntime "
                        "(ours-bf16/-fp16: the U-Nets in reduced precision; they pay on GPUs)")
    m.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where every implementation runs (onnxruntime: "
                                                   "CPU only); on CUDA, times in ms and peak GPU memory")
    m.set_defaults(run=run_model)

    t = which.add_parser("train", help="one training step: memory and time with activation checkpointing",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=example_epilog("varnet bench train", "varnet bench train --device cuda",
                                               "varnet bench train --config small --shape 8 320 256"))
    t.add_argument("--config", choices=("default", "small", "shipped"), default="default")
    t.add_argument("--shape", nargs=3, type=int, metavar=("COILS", "READOUT", "PHASE"), default=(15, 640, 368))
    t.add_argument("--acs", type=int, default=30)
    t.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    t.add_argument("--variants", default=None,
                   help="comma-separated subset of plain,checkpointing,checkpointing-bf16,checkpointing-fp16 "
                        "(default: the first two on CPU, all four on CUDA)")
    t.set_defaults(run=run_train)

    i = which.add_parser("ingest", help="socket → assembled slices (and parse only) vs ismrmrd.serialization",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=example_epilog("varnet bench ingest --n-acq 2000 --channels 32 --samples 512"))
    i.add_argument("--n-acq", type=int, default=2000)
    i.add_argument("--channels", type=int, default=32)
    i.add_argument("--samples", type=int, default=512)
    i.add_argument("--repeats", type=int, default=5)
    i.set_defaults(run=run_ingest)

    p2 = which.add_parser("pipeline", help="stream-to-image overhead of the MRD server, model time excluded",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog=example_epilog("varnet bench pipeline --slices 16 --coils 12 --config default",
                                                "varnet bench pipeline --skip-overhead --coil-compression 12"))
    p2.add_argument("--slices", type=int, default=16)
    p2.add_argument("--coils", type=int, default=12)
    p2.add_argument("--size", type=int, nargs=2, default=(160, 128), metavar=("H", "W"),
                    help="image matrix; k-space readout is 2H")
    p2.add_argument("--config", choices=("default", "small"), default="small")
    p2.add_argument("--threads", type=int, default=2)
    p2.add_argument("--coil-compression", type=int, default=0, metavar="N",
                    help="also measure PCA coil compression to N virtual coils against all coils, with the "
                         "shipped weights (or --checkpoint): time per slice, SSIM/PSNR (0 = skip)")
    p2.add_argument("--compression-coils", type=int, default=32, help="coils of the compression scan")
    p2.add_argument("--compression-slices", type=int, default=3, help="slices of the compression scan")
    p2.add_argument("--checkpoint", default=None, help="weights for the compression measurement (default: shipped)")
    p2.add_argument("--skip-overhead", action="store_true", help="only the coil compression measurement")
    p2.set_defaults(run=run_pipeline)

    r = which.add_parser("refine", help="the parallel-imaging refinement's cost per slice against the network's",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=example_epilog("varnet bench refine", "varnet bench refine --device cuda --repeats 10"))
    r.add_argument("--shape", nargs=3, type=int, action="append", metavar=("COILS", "READOUT", "PHASE"),
                   help="k-space shape (repeatable; default 10 256 256, 10 512 256, 16 640 320 and the demo's 12 346 119)")
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    r.add_argument("--checkpoint", default=None, help="weights (default: shipped)")
    r.set_defaults(run=run_refine)

    n = which.add_parser("infer", help="whole processes: varnet infer vs fastMRI's inference path, same file and "
                                       "weights",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=example_epilog("varnet bench infer",
                                               "varnet bench infer --config small --shape 8 320 256 --slices 2"))
    n.add_argument("--config", choices=("default", "small", "shipped"), default="default",
                   help="architecture of the random weights (saved as a fastMRI state dict)")
    n.add_argument("--shape", nargs=3, type=int, metavar=("COILS", "READOUT", "PHASE"), default=(15, 640, 368))
    n.add_argument("--slices", type=int, default=4)
    n.add_argument("--acceleration", type=int, default=4)
    n.add_argument("--acs", type=int, default=30)
    n.add_argument("--repeats", type=int, default=1, help="rounds, each running both processes")
    n.add_argument("--threads", type=int, default=2)
    n.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where both processes run their model")
    n.set_defaults(run=run_infer)

    s = which.add_parser("soak", help="thousands of mixed good/malformed/stalled connections against one server "
                                      "process: its resident memory over time, peak and resting after",
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=example_epilog(
                             "varnet bench soak --connections 8000",
                             "varnet bench soak --gadgetron --env MALLOC_ARENA_MAX=2 --json soak.json"))
    s.add_argument("--connections", type=int, default=8000, help="connections in all (default 8000)")
    s.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    s.add_argument("--gadgetron", action="store_true", help="speak the Gadgetron dialect (serve --gadgetron)")
    s.add_argument("--checkpoint", default=None, help="weights for the server (default: shipped)")
    s.add_argument("--seed", type=int, default=0, help="seed of the connection mix and the mutations")
    s.add_argument("--stall-seconds", type=float, default=2.0, help="how long stalling clients send nothing")
    s.add_argument("--settle-seconds", type=float, default=5.0, help="wait before the resting RSS readings")
    s.add_argument("--idle-timeout", type=float, default=3.0, help="the server's --idle-timeout (default 3)")
    s.add_argument("--client-timeout", type=float, default=60.0, help="seconds a client waits for a reply")
    s.add_argument("--mix", default=None, metavar="KIND=PCT,...",
                   help="proportions of good, malformed, stalled, abuse (default good=10,malformed=50,"
                        "stalled=25,abuse=15)")
    s.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment of the server process (repeatable), e.g. MALLOC_ARENA_MAX=2")
    s.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    s.set_defaults(run=run_soak)


def _names(text: str, known, flag: str) -> tuple[str, ...]:
    """A comma-separated list of names from ``known``; anything else is a UserError naming ``flag``."""
    from . import UserError

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise UserError(f"{flag}: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(known)})")
    return names


def run_model(args) -> int:
    from ..bench.model_bench import IMPLEMENTATIONS, BenchCase, format_table, run
    from . import UserError

    impls = _names(args.implementations, IMPLEMENTATIONS, "--implementations")
    if args.ours_only:
        impls = tuple(i for i in impls if i != "reference")
    needs = {"reference": ("fastmri", "pip install --no-deps fastmri==0.3.0 pandas requests tqdm runstats"),
             "onnxruntime": ("onnxruntime", "pip install 'varnet-gadget[export]'")}
    for impl in impls:
        if impl in needs:
            module, hint = needs[impl]
            try:
                __import__(module)
            except ImportError:
                raise UserError(f"the {impl} implementation needs the '{module}' package: {hint} "
                                f"(or leave it out of --implementations)") from None
    device = _check_device(args.device, impls)
    coils, readout, phase = args.shape
    case = BenchCase(config=args.config, coils=coils, readout=readout, phase=phase,
                     acceleration=args.acceleration, acs=args.acs, repeats=args.repeats, threads=args.threads,
                     keep_freed_memory=not args.glibc_defaults, device=device)
    print(format_table(case, run(case, impls)))
    return 0


def _check_device(device: str, impls) -> str:
    """``--device`` resolved (``auto`` → cuda or cpu) and checked against the implementations asked for."""
    from . import UserError, device_option

    resolved = str(device_option(device))
    if resolved != "cpu" and "onnxruntime" in impls:
        raise UserError(f"--device {device}: leave onnxruntime out of --implementations (it runs on the CPU provider)")
    return resolved


def run_train(args) -> int:
    from ..bench.model_bench import BenchCase
    from ..bench.train_bench import VARIANTS, format_table, run
    from . import UserError

    variants = _names(args.variants, VARIANTS, "--variants") if args.variants is not None else None
    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    device = _check_device(args.device, ())
    coils, readout, phase = args.shape
    case = BenchCase(config=args.config, coils=coils, readout=readout, phase=phase, acs=args.acs,
                     repeats=args.steps, threads=args.threads, device=device)
    print(format_table(case, run(case, variants)))
    return 0


def run_refine(args) -> int:
    from ..bench.refine_bench import DEFAULT_SHAPES, format_table, run
    from . import UserError

    if args.repeats < 1:
        raise UserError("--repeats must be >= 1")
    device = _check_device(args.device, ())
    shapes = [tuple(s) for s in args.shape] if args.shape else list(DEFAULT_SHAPES)
    print(format_table(run(shapes, args.repeats, device, args.threads, args.checkpoint), device))
    return 0


def run_infer(args) -> int:
    from ..bench.infer_bench import InferCase, format_table, run
    from . import UserError

    coils, readout, phase = args.shape
    if min(args.repeats, args.slices, args.threads, coils) < 1 or readout % 2 or not 0 < args.acs <= phase:
        raise UserError("--repeats, --slices, --threads and the coil count must be >= 1, the readout even (2× "
                        f"oversampling) and --acs in 1..{phase}")
    case = InferCase(config=args.config, coils=coils, readout=readout, phase=phase, slices=args.slices,
                     acceleration=args.acceleration, acs=args.acs, repeats=args.repeats, threads=args.threads,
                     device=_check_device(args.device, ()))
    print(format_table(run(case, progress=lambda line: print(line, file=sys.stderr, flush=True))))
    return 0


def run_all(args) -> int:
    from ..bench.model_bench import BenchCase
    from ..bench.summary import run_all as run_everything

    device = _check_device(args.device, ())
    print(run_everything(BenchCase(repeats=args.repeats, threads=args.threads, device=device)))
    return 0


def run_ingest(args) -> int:
    from ..bench.ingest_bench import format_table, run_ingest_bench

    print(format_table(run_ingest_bench(args.n_acq, args.channels, args.samples, args.repeats)))
    return 0


def run_pipeline(args) -> int:
    from ..bench.pipeline_bench import (format_compression_table, format_table, run_compression_bench,
                                        run_pipeline_bench)
    from . import UserError

    n = args.coil_compression
    if n < 0 or (n and not n < args.compression_coils):
        raise UserError(f"--coil-compression must be 0 (skip) or in 1..{args.compression_coils - 1} (below "
                        f"--compression-coils), got {n}")
    if args.skip_overhead and not n:
        raise UserError("--skip-overhead leaves nothing to measure without --coil-compression N")
    if not args.skip_overhead:
        print(format_table(run_pipeline_bench(args.slices, args.coils, tuple(args.size), args.config, args.threads)))
    if n:
        print(format_compression_table(run_compression_bench(args.compression_slices, args.compression_coils, n,
                                                             tuple(args.size), args.threads,
                                                             checkpoint=args.checkpoint)))
    return 0


def _pairs(items, flag: str, value=str) -> dict:
    """``NAME=VALUE`` strings as a dict; anything else is a UserError naming ``flag``."""
    from . import UserError

    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        try:
            if not (sep and name.strip()):
                raise ValueError
            out[name.strip()] = value(text.strip())
        except ValueError:
            raise UserError(f"{flag}: expected NAME=VALUE, got {item!r}") from None
    return out


def run_soak(args) -> int:
    import json
    import sys

    from ..bench.soak import SoakCase, format_table, run_soak as soak
    from ..bench.soak_streams import DEFAULT_MIX
    from . import UserError

    mix = dict(DEFAULT_MIX)
    if args.mix:
        given = _pairs(args.mix.split(","), "--mix", int)
        _names(",".join(given), DEFAULT_MIX, "--mix")
        mix = {k: given.get(k, 0) for k in DEFAULT_MIX}
        if any(v < 0 for v in mix.values()) or not sum(mix.values()):
            raise UserError(f"--mix: proportions must be >= 0 and not all 0, got {args.mix}")
    for flag, value, low in (("--connections", args.connections, 1), ("--concurrency", args.concurrency, 1)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    for flag in ("stall_seconds", "settle_seconds"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 0")
    for flag in ("idle_timeout", "client_timeout"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be > 0")
    case = SoakCase(connections=args.connections, concurrency=args.concurrency,
                    dialect="gadgetron" if args.gadgetron else "mrd", checkpoint=args.checkpoint, seed=args.seed,
                    stall_seconds=args.stall_seconds, settle_seconds=args.settle_seconds,
                    idle_timeout=args.idle_timeout, client_timeout=args.client_timeout,
                    env=_pairs(args.env, "--env"), mix=mix)
    try:
        report = soak(case, log=lambda line: print(line, file=sys.stderr, flush=True))
    except RuntimeError as exc:  # the server did not start
        raise UserError(str(exc)) from None
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=1)
    for failure in report.failures:
        print(f"varnet bench soak: FAILED: {failure}", file=sys.stderr)
    return 1 if report.failures else 0
