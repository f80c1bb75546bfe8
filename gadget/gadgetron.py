"""Gadgetron external-gadget door.

Gadgetron runs ``python -m gadgetron PORT gadget.gadgetron reconstruct`` for the chain element
``<execute name="gadget.gadgetron" target="reconstruct" type="python"/>``; the ``gadgetron``
package connects back and calls :func:`reconstruct` with its ``Connection``. Settings come from
the ``<property name= value=/>`` elements of the external block's ``<configuration>`` (the
operator's chain file, so it may name the checkpoint).

Guards against known defects of ``gadgetron`` 1.4.1: its socket read busy-loops forever when
Gadgetron disconnects without CLOSE (we replace the read with one that fails at EOF), and a
handler exception reaches Gadgetron as a normal CLOSE (we send ERROR(8) first). Its
``Connection`` also parses the header with the strict ismrmrd schema before calling us; for
headers it rejects, use the ``<connect>`` listener (``varnet serve --gadgetron``).
"""
from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Optional

from .recon.config import ReconConfig, from_gadgetron_config
from .recon.engine import Reconstructor
from .recon.overlap import overlapped
from .recon.pipeline import ScanReconstructor, build_engine
from .stream.types import AcqLine

log = logging.getLogger(__name__)
_ENGINES: dict[tuple, tuple[Optional[Reconstructor], str]] = {}
_ENGINES_LOCK = threading.Lock()


def reconstruct(connection: Any) -> None:
    """Target for ``<execute name="gadget.gadgetron" target="reconstruct" type="python"/>``."""
    sock = connection.socket.socket
    connection.socket.read = lambda n: _read_exact(sock, n)
    try:
        config = from_gadgetron_config(_text(connection.raw_bytes.config), ReconConfig())
        log.info("resolved config: %s", config.summary())
        engine, model_id = shared_engine(config)
        scan = ScanReconstructor(_text(connection.raw_bytes.header), config, engine, source="gadgetron",
                                 model_id=model_id)
        for item in overlapped(scan, iter(connection)):
            connection.send(item.to_ismrmrd() if isinstance(item, AcqLine) else item)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.error("E2E-VarNet gadget failed: %s", text)
        _send_error(sock, f"E2E-VarNet gadget: {text}")
        raise  # gadgetron's Connection.__exit__ then sends CLOSE; the process exits non-zero


def shared_engine(config: ReconConfig) -> tuple[Optional[Reconstructor], str]:
    """The model, loaded once per process and reused by later scans with the same mode, checkpoint, device
    and precision. The refine is not part of the engine: each scan's pipeline applies the one its chain
    asks for (:class:`gadget.recon.refine_stage.Refiner`)."""
    key = (config.mode, config.checkpoint, config.device, config.precision)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = build_engine(config)
        return _ENGINES[key]


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"Gadgetron closed the connection without CLOSE ({got} of {n} bytes read)")
        got += k
    return bytes(buf)


def _send_error(sock: socket.socket, text: str) -> None:
    from .stream.codec import MessageWriter

    try:
        MessageWriter(sock).error(text)
    except OSError:
        pass


def _text(raw: Any) -> str:
    if raw is None:
        return ""
    return (raw.decode("utf-8", errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw)).rstrip("\x00")
