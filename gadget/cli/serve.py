"""``varnet serve``: the MRD stream server, or (``--gadgetron``) the Gadgetron ``<connect>`` listener."""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    from . import add_precision_argument, add_refine_argument, example_epilog

    p = sub.add_parser(
        "serve", help="MRD stream server (or Gadgetron <connect> listener with --gadgetron)",
        description="Accepts scan after scan, one TCP connection each, with the model loaded once. "
                    "MRD clients (gadgetron_ismrmrd_client, python-ismrmrd-server's client.py, FIRE) choose a "
                    "preset from pipelines/ by CONFIG_FILE name. Binds to 127.0.0.1 unless --host says otherwise.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=example_epilog("varnet serve --port 9002 --checkpoint model.pt",
                              "varnet serve --gadgetron --port 18000 --checkpoint model.pt   "
                              "# for pipelines/varnet-connect.xml"))
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 9002; 18000 with --gadgetron)")
    p.add_argument("--gadgetron", action="store_true", help="speak Gadgetron's external-channel dialect")
    p.add_argument("--config", default="default", help="base preset name or YAML file")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--device", default=None)
    add_precision_argument(p)
    add_refine_argument(p, default=None)
    p.add_argument("--max-connections", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=4,
                   help="slices from concurrent scans reconstructed in one forward pass (1 = no batching)")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="seconds without data before a scan fails")
    p.add_argument("--memory-budget", type=_size, default=None, metavar="SIZE",
                   help="k-space all scans may hold at once, e.g. 8G or 512M (default: half the host's memory); "
                        "a scan that would exceed it waits up to --budget-wait seconds, then fails")
    p.add_argument("--budget-wait", type=float, default=10.0, help="seconds a scan waits for budget (default 10)")
    p.add_argument("--max-text-bytes", type=_size, default="4M", metavar="SIZE",
                   help="largest config, header or text message (default 4M)")
    p.set_defaults(run=run)


def _size(text: str) -> int:
    """``8G``, ``512M``, ``64K`` or bytes → bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = str(text).strip().upper().removesuffix("B")
    factor = units.get(value[-1:], 1)
    try:
        number = float(value[:-1] if value[-1:] in units else value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8G, 512M, 65536)") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return int(number * factor)


def run(args) -> int:
    from ..recon.config import load_config
    from ..recon.pipeline import build_engine
    from ..server import ReconService
    from . import operator_overrides

    config = load_config(args.config)
    config = config.merged(operator_overrides(args), "command line")
    from ..recon.batching import BatchingEngine

    engine, model_id = build_engine(config)
    if engine is not None:
        engine = BatchingEngine(engine, max_batch=args.max_batch)  # one model, batched across scans
    from ..stream.budget import MemoryBudget, default_budget_bytes

    budget = MemoryBudget(args.memory_budget or default_budget_bytes(), wait_s=args.budget_wait)
    service = ReconService(config, engine, model_id, idle_timeout=args.idle_timeout,
                           max_text_bytes=args.max_text_bytes, budget=budget)
    dialect = "gadgetron" if args.gadgetron else "mrd"
    port = args.port if args.port is not None else (18000 if args.gadgetron else 9002)
    print(f"varnet serve: {dialect} dialect on {args.host}:{port}, model {model_id}; Ctrl-C to stop", flush=True)
    try:
        service.serve(args.host, port, dialect, max_connections=args.max_connections)
    except KeyboardInterrupt:
        print("varnet serve: stopped")
    return 0
