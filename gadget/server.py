"""Network doors: the MRD stream server (client protocol) and the Gadgetron ``<connect>`` listener.

One mechanism, two dialects. Each connection is one scan, handled on its own thread:

    socket ─▶ reader thread: parse, prewhiten, assemble ─▶ finished slices
           ─▶ model (this thread) ─▶ images ─▶ socket

(gadget/recon/overlap.py), so slice k is reconstructed while slice k+1 is still arriving. The model
is loaded once per process (``ReconService``) and shared by all connections; the engine serialises
device access.

Dialects differ only where the peers differ (docs/reference/protocol.md); :class:`Dialect` holds
each difference, :data:`DIALECTS` names the two:
* ``mrd`` (gadgetron_ismrmrd_client, python-ismrmrd-server's client.py, FIRE, OpenRecon): CONFIG_FILE
  names a preset (whitelist; OpenRecon's ``openrecon`` is one), CONFIG_TEXT may carry YAML, a JSON TEXT
  before or right after the HEADER carries parameters (gadget/recon/ui_parameters.py); errors go
  back as TEXT then CLOSE; warnings follow as TEXT; only images are sent back (clients crash on echoed
  acquisitions).
* ``gadgetron`` (Gadgetron's external channel): CONFIG_TEXT is the ``<configuration>`` XML with
  ``<property>`` elements; errors go back as ERROR(8) then CLOSE, never TEXT; warnings stay in the log;
  items we do not reconstruct pass through.
"""
from __future__ import annotations

import collections
import gc
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from .recon.config import OPERATOR_ONLY, ConfigError, ReconConfig, from_gadgetron_config, \
    from_json_parameters, gadgetron_properties, json_object, load_preset, parse_yaml, client_merge
from .recon.ui_parameters import apply_ui_parameters
from .data.mrd_header import EncodingInfo, parse_encoding
from .recon.allocator import release_freed_memory
from .recon.engine import Reconstructor
from .recon.overlap import overlapped
from .recon.pipeline import ScanReconstructor
from .recon.refine_stage import applied_refine
from .stream.budget import MemoryBudget, default_budget_bytes
from .stream.codec import (DEFAULT_MAX_TEXT_BYTES, NO_DATA, DataLimits, Message, MessageId, MessageReader,
                           MessageWriter, ProtocolError)

log = logging.getLogger(__name__)


class SessionError(Exception):
    """A scan failed; the message goes to the client (TEXT or ERROR) and to the log."""


@dataclass(frozen=True)
class Dialect:
    """What one family of peers expects of the server; everything not named here is shared.

    ``name``: the dialect's name in :data:`DIALECTS`, the CLI and the log.
    ``json_parameters``: a TEXT holding a JSON object, before the HEADER or right after it, carries
    parameters and is applied; if false such a TEXT is only logged.
    ``operator_chain``: a CONFIG_TEXT is the operator's Gadgetron chain XML, merged as the operator's
    settings (it may name the model; what it names is checked against what this server runs) and
    anything not XML is refused; if false a CONFIG_TEXT is the client's (XML properties or YAML),
    limited to the settings a client may set.
    ``errors_as_text``: an error reaches the peer as TEXT ``ERROR: ...``; if false as ERROR(8). CLOSE
    follows either way.
    ``notes_as_text``: notes (warnings the scan raises) go to the peer as TEXT ``WARNING: ...`` as they
    arise, and any still unsent just before the final CLOSE; if false they are in the log only.
    ``pass_through``: items we do not reconstruct (acquisitions, waveforms) are sent back; if false
    only images are sent back.
    """
    name: str
    json_parameters: bool
    operator_chain: bool
    errors_as_text: bool
    notes_as_text: bool
    pass_through: bool

    def is_json(self, text: str) -> bool:
        """Whether a TEXT message is parameters this dialect applies."""
        return self.json_parameters and text.lstrip().startswith("{")

    def report(self, writer: MessageWriter, text: str) -> None:
        """Tell the peer that the scan failed with ``text``, then CLOSE (the peer may be gone already)."""
        if self.errors_as_text:
            _safe(lambda: writer.text(f"ERROR: {text}"))
        else:
            _safe(lambda: writer.error(text))
        _safe(writer.close)

    def send_notes(self, writer: MessageWriter, notes: list[str], sent: int) -> int:
        """Send the notes from index ``sent`` on where the dialect sends notes; returns the new ``sent``."""
        return _send_notes(writer, notes, sent) if self.notes_as_text else sent


MRD = Dialect("mrd", json_parameters=True, operator_chain=False, errors_as_text=True, notes_as_text=True,
              pass_through=False)
GADGETRON = Dialect("gadgetron", json_parameters=False, operator_chain=True, errors_as_text=False,
                    notes_as_text=False, pass_through=True)
DIALECTS = {"mrd": MRD, "gadgetron": GADGETRON}


def dialect_named(dialect: str | Dialect) -> Dialect:
    """The :class:`Dialect` for a name in :data:`DIALECTS` (a ``Dialect`` is returned as it is)."""
    if isinstance(dialect, Dialect):
        return dialect
    try:
        return DIALECTS[dialect]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dialect {dialect!r}: choose one of {', '.join(map(repr, DIALECTS))}") from None


@dataclass
class SessionResult:
    peer: str
    images: int = 0
    error: Optional[str] = None
    config_only: bool = False
    model_seconds: float = 0.0


class ReconService:
    """Process-wide state: the operator's base config and the one loaded model."""

    def __init__(self, config: ReconConfig, engine: Optional[Reconstructor], model_id: str = "none",
                 idle_timeout: float = 300.0, max_message_bytes: int = 1 << 30, queue_slices: int = 8,
                 max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES, budget: Optional[MemoryBudget] = None):
        self.config, self.engine, self.model_id = config, engine, model_id
        self.idle_timeout, self.max_message_bytes, self.queue_slices = idle_timeout, max_message_bytes, queue_slices
        self.max_text_bytes = max_text_bytes
        # k-space all scans hold at once (gadget/stream/budget.py); default half the host's memory
        self.budget = budget or MemoryBudget(default_budget_bytes())
        self.recent: collections.deque[SessionResult] = collections.deque(maxlen=64)  # for status and benchmarks
        self._active = 0
        self._active_lock, self._rest_lock = threading.Lock(), threading.Lock()
        self.rests = 0  # times the server went idle and returned freed memory

    # ------------------------------------------------------------------ one connection

    def handle(self, sock: socket.socket, dialect: str | Dialect = "mrd", peer: str = "?") -> SessionResult:
        """Serve one scan on ``sock`` in ``dialect`` (a name in :data:`DIALECTS` or a :class:`Dialect`; an
        unknown name is a ValueError, raised before anything is read or sent)."""
        dialect = dialect_named(dialect)
        result = SessionResult(peer)
        sock.settimeout(self.idle_timeout)
        reader = MessageReader(sock, max_message_bytes=self.max_message_bytes, max_text_bytes=self.max_text_bytes,
                               limits=NO_DATA)  # no data message is plausible before the header
        writer = MessageWriter(sock)
        scan = None
        try:
            setup = self._setup(reader, writer, dialect, peer)
            if setup is None:
                result.config_only = True
                _safe(writer.close)
                return result
            config, header_xml, encoding, first = setup
            scan = ScanReconstructor(header_xml, config, self._engine_for(config), source=f"{peer}",
                                     model_id=self.model_id, budget=self.budget, encoding=encoding)
            reader.landing = scan.assembler.landing_row  # samples received straight into slice buffers
            sent_notes = 0
            for item in overlapped(scan, _messages(reader, first, scan.note), self.queue_slices):
                if type(item).__name__ == "Image":
                    writer.image(item)
                    result.images += 1
                elif dialect.pass_through:
                    _send_passthrough(writer, item)
                # notes (e.g. a slice the safety check flagged) follow as they arise where the dialect sends them
                sent_notes = dialect.send_notes(writer, scan.notes, sent_notes)
            dialect.send_notes(writer, scan.notes, sent_notes)
            writer.close()
            result.model_seconds = scan.stats.model_seconds
            log.info("%s: scan done, %d images, model %.2f s", peer, result.images, scan.stats.model_seconds)
        except Exception as exc:  # every failure ends this scan only, with a message to the peer
            result.error = _describe(exc)
            log.error("%s: scan failed: %s", peer, result.error, exc_info=not _expected(exc))
            dialect.report(writer, result.error)
        finally:
            self.recent.append(result)
            _safe(lambda: sock.shutdown(socket.SHUT_RDWR))  # also ends a reader thread blocked in recv
            _safe(sock.close)
            if scan is not None and scan.reader_thread is not None:
                scan.reader_thread.join(5.0)  # its buffers are freed before the server may go idle
        return result

    def _setup(self, reader: MessageReader, writer: MessageWriter, dialect: Dialect,
               peer: str) -> Optional[tuple[ReconConfig, str, EncodingInfo, Optional[Message]]]:
        """Config and header phase: ``(config, header XML, its encoding, first message after them)``; ``None`` = the
        peer closed after config only (answer CLOSE). OpenRecon/FIRE send their parameters as a JSON TEXT
        right after the header (docs/reference/protocol.md), so the message after HEADER is read here: a JSON TEXT is
        applied, anything else is the scan's first message."""
        config = self.config
        while True:
            msg = reader.read()
            if msg is None:
                raise SessionError("connection closed before HEADER (no CLOSE)")
            log.debug("%s <-- %s (%d)", peer, msg.id.name, int(msg.id))
            if msg.id == MessageId.CLOSE:
                return None
            if msg.id == MessageId.HEADER:
                # a bad header fails now, not after the next read; data messages are checked against it
                encoding = parse_encoding(msg.payload, source=peer)
                reader.limits = DataLimits.from_encoding(encoding)
                header_xml, first = msg.payload, reader.read()
                if first is not None and first.id == MessageId.TEXT and dialect.is_json(first.payload):
                    config, first = self._json_text(first.payload, config, writer, peer), None
                log.info("%s: resolved config: %s", peer, config.summary())
                return config, header_xml, encoding, first
            if msg.id == MessageId.CONFIG_FILE:
                config = self._preset(msg.payload, config)
            elif msg.id == MessageId.CONFIG_TEXT:
                config = self._config_text(msg.payload, config, dialect)
            elif msg.id == MessageId.TEXT and dialect.is_json(msg.payload):
                config = self._json_text(msg.payload, config, writer, peer)
            elif msg.id == MessageId.TEXT:
                log.info("%s: text: %s", peer, msg.payload[:200])
            else:
                raise SessionError(f"{msg.id.name} before HEADER: send the ISMRMRD header first")

    def _json_text(self, text: str, config: ReconConfig, writer: MessageWriter, peer: str) -> ReconConfig:
        """A JSON parameters TEXT. The OpenRecon/FIRE form ``{"version": .., "parameters": {..}}`` applies
        the keys we know and answers each other key with a WARNING TEXT; a bare object of settings
        (python-ismrmrd-server style) must name known settings only."""
        data = json_object(text)  # parsed once for both forms
        if not isinstance(data.get("parameters"), dict):
            return from_json_parameters(data, config)
        result = apply_ui_parameters(data, config, self._preset)
        log.info("%s: parameters applied%s: %s", peer, f" (preset {result.preset})" if result.preset else "",
                 result.summary())
        for warning in result.ignored:
            log.warning("%s: %s", peer, warning)
            writer.text(f"WARNING: {warning}")
        return result.config

    def _preset(self, name: str, config: ReconConfig) -> ReconConfig:
        name = name.strip()
        if name.endswith(".xml"):  # Gadgetron clients often name a chain file; map its stem to a preset
            name = name[:-4]
        if name in ("", "default"):
            return config
        preset = load_preset(name)  # a client's name: the whitelist of preset files, never a path
        return client_merge(config, {k: v for k, v in preset.to_dict().items()
                                     if k not in OPERATOR_ONLY
                                     and v != getattr(ReconConfig(), k)},
                            f"preset {name}")

    def _config_text(self, text: str, config: ReconConfig, dialect: str | Dialect) -> ReconConfig:
        """``config`` with a CONFIG_TEXT applied as ``dialect`` reads it (:attr:`Dialect.operator_chain`)."""
        dialect = dialect_named(dialect)
        stripped = text.strip()
        if stripped.startswith("<"):
            if dialect.operator_chain:  # the chain file is the operator's: it may name the model (and is
                # checked against what this server runs, also where it names a default, e.g. precision fp32)
                return config.merged(gadgetron_properties(stripped), "Gadgetron configuration")
            values = from_gadgetron_config(stripped, ReconConfig(), "configuration XML")
            changed = {k: v for k, v in values.to_dict().items() if v != getattr(ReconConfig(), k)}
            return client_merge(config, changed, "configuration XML")
        if dialect.operator_chain:
            raise ConfigError("Gadgetron configuration is not XML")
        return client_merge(config, parse_yaml(stripped, "CONFIG_TEXT"), "CONFIG_TEXT")

    def _engine_for(self, config: ReconConfig) -> Optional[Reconstructor]:
        if config.mode == "zero-filled":
            return None
        if self.engine is None:
            raise SessionError("this server runs without a model (zero-filled only); ask for preset 'zero-filled'")
        if config.checkpoint and config.checkpoint != self.config.checkpoint:
            raise SessionError(f"checkpoint '{config.checkpoint}' requested, but this server serves "
                               f"'{self.config.checkpoint}'")
        requested, served = self._refine(config.refine), self._refine(self.config.refine)
        if (requested, config.refine_lambda) != (served, self.config.refine_lambda):
            raise SessionError(f"refine '{config.refine}' (lambda {config.refine_lambda:g}) requested, but this "
                               f"server's model runs with refine '{served}' (lambda {self.config.refine_lambda:g})")
        if config.precision != self.config.precision:
            raise SessionError(f"precision '{config.precision}' requested, but this server's model runs "
                               f"in '{self.config.precision}'")
        return self.engine

    def _refine(self, setting: str) -> str:
        """A refine setting as the refine stage applies it with this server's engine (``auto`` → the refine its
        checkpoint records, :func:`gadget.recon.refine_stage.applied_refine`)."""
        return applied_refine(setting, getattr(self.engine, "checkpoint_refine", None))

    # ------------------------------------------------------------------ listening

    def serve(self, host: str = "127.0.0.1", port: int = 9002, dialect: str | Dialect = "mrd",
              max_connections: int = 16, ready: Optional[threading.Event] = None,
              stop: Optional[threading.Event] = None) -> None:
        """Accept scan after scan until ``stop`` is set (Ctrl-C in the CLI); ``dialect``: a name in
        :data:`DIALECTS` (an unknown one is a ValueError before the port is bound) or a :class:`Dialect`."""
        dialect = dialect_named(dialect)
        slots = threading.BoundedSemaphore(max_connections)
        with socket.create_server((host, port), reuse_port=False) as server:
            server.settimeout(0.5)
            self.address = server.getsockname()
            log.info("listening on %s:%d (%s dialect, model %s); memory budget for k-space %s, text messages up "
                     "to %d bytes", *self.address[:2], dialect.name, self.model_id, self.budget.summary(),
                     self.max_text_bytes)
            if ready:
                ready.set()
            while not (stop and stop.is_set()):
                try:
                    conn, addr = server.accept()
                except socket.timeout:
                    continue
                peer = f"{addr[0]}:{addr[1]}"
                if not slots.acquire(blocking=False):
                    log.warning("%s: refused, %d connections already open", peer, max_connections)
                    _refuse(conn, dialect, f"server busy: {max_connections} scans in progress")
                    continue
                threading.Thread(target=self._run_slot, args=(conn, dialect, peer, slots), name=f"scan-{peer}",
                                 daemon=True).start()

    def _run_slot(self, conn, dialect, peer, slots) -> None:
        with self._active_lock:
            self._active += 1
        try:
            self.handle(conn, dialect, peer)
        finally:
            slots.release()
            with self._active_lock:
                self._active -= 1
            with self._rest_lock:  # the scan's memory is unreferenced now (handle returned): give it back
                if self._active == 0:
                    self.rest()

    def rest(self) -> None:
        """Return freed memory to the kernel (the engine keeps freed pages for speed while scans run;
        gadget/recon/allocator.py) and log the memory budget; called when the last scan ends."""
        gc.collect()  # frames of failed scans can hold buffers in reference cycles
        release_freed_memory()
        self.rests += 1
        log.info("idle: freed memory returned; memory budget %s", self.budget.summary())


def _messages(reader: MessageReader, first: Optional[Message] = None,
              note: Callable[[str], None] = log.warning) -> Iterator[Any]:
    """The scan's items after HEADER (``first``: one already read), up to CLOSE (runs on the reader
    thread). ``note`` reports what the peer should hear (a parameters TEXT that came too late)."""
    while True:
        if first is not None:
            msg, first = first, None
        else:
            msg = reader.read()
        if msg is None:
            raise SessionError("connection closed without CLOSE; incomplete slices discarded")
        if msg.id == MessageId.CLOSE:
            return
        if msg.id in (MessageId.ACQUISITION, MessageId.IMAGE, MessageId.WAVEFORM):
            yield msg.payload
        elif msg.id == MessageId.TEXT and msg.payload.lstrip().startswith("{"):
            note("a JSON parameters TEXT after the scan's data started was not applied (parameters apply "
                 "before the header or right after it)")
        elif msg.id == MessageId.TEXT:
            log.info("text during scan: %s", msg.payload[:200])
        else:
            raise SessionError(f"unexpected {msg.id.name} after HEADER")


def _send_notes(writer: MessageWriter, notes: list[str], sent: int) -> int:
    """TEXT ``WARNING: ...`` for the notes from index ``sent`` on; returns how many are sent now."""
    for note in notes[sent:]:
        writer.text(f"WARNING: {note}")
    return len(notes)


def _send_passthrough(writer: MessageWriter, item: Any) -> None:
    kind = type(item).__name__
    if kind == "AcqLine":
        writer.acquisition(item)
    elif kind == "Waveform":
        writer.waveform(item)
    else:
        log.debug("dropping pass-through item of type %s", kind)


def _refuse(conn: socket.socket, dialect: Dialect, text: str) -> None:
    """Turn a connection away with ``text`` (an error as ``dialect`` reports one), then close it."""
    dialect.report(MessageWriter(conn), text)
    _safe(conn.close)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout):
        return "timed out waiting for data from the client"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if _expected(exc) else f"{type(exc).__name__}: {text.splitlines()[0]}"


def _expected(exc: BaseException) -> bool:
    return isinstance(exc, (SessionError, ProtocolError, ConfigError, ValueError, socket.timeout, OSError))


def _safe(fn) -> None:
    try:
        fn()
    except Exception:  # the peer may be gone already; nothing more to tell it
        pass


__all__ = ["ReconService", "SessionResult", "SessionError", "Dialect", "MRD", "GADGETRON", "DIALECTS",
           "dialect_named"]
