"""MRD v1 / Gadgetron wire codec: read and write framed messages on a socket.

Every message is ``uint16 id`` followed by a payload; all integers are little-endian.

====  ===========  =====================================================================
id    message      payload
====  ===========  =====================================================================
1     CONFIG_FILE  ``char[1024]`` configuration name, NUL-padded
2     CONFIG_TEXT  ``uint32 n`` + ``n`` bytes of UTF-8 text (often XML)
3     HEADER       ``uint32 n`` + ``n`` bytes of ISMRMRD header XML
4     CLOSE        (none)
5     TEXT         ``uint32 n`` + ``n`` bytes of text
8     ERROR        ``uint64 n`` + ``n`` bytes of text (Gadgetron external channel)
1008  ACQUISITION  340-byte acquisition header (``HEADER_DTYPE``)
                   + ``float32 trajectory[number_of_samples x trajectory_dimensions]``
                   + ``complex64 data[active_channels x number_of_samples]``
1022  IMAGE        198-byte image header (``ismrmrd.ImageHeader``) + ``uint64 n``
                   + ``n`` bytes of attribute XML
                   + pixels ``[channels x matrix_size[2] x matrix_size[1] x matrix_size[0]]``
                   of the header's ``data_type``
1026  WAVEFORM     40-byte waveform header (``ismrmrd.WaveformHeader``)
                   + ``uint32 data[channels x number_of_samples]``
====  ===========  =====================================================================

Text payloads lose their trailing NULs when read: python-ismrmrd-server's client sends config and
header text with a ``\\0`` counted in the length, Gadgetron does the same for image attributes.
Acquisitions whose flags carry bits 53-56 (compressed payloads that reuse id 1008) are refused.

Memory follows the bytes that arrive, not the bytes a length field claims: text payloads (config,
header, text, error) have their own cap (``max_text_bytes``, 4 MiB by default) and are received in
64 KiB chunks, so a peer that claims a gigabyte and stalls holds at most one chunk. Data messages
(acquisition, image, waveform) are checked against :class:`DataLimits` — what the scan's header makes
plausible — before their arrays are allocated; until a header has set them, no data message is
accepted at all.

Image pixel types follow the C++ library: ``DATATYPE_INT`` (4) is ``int32`` on the wire. (The
Python ``ismrmrd`` package maps it to the platform ``int``, i.e. ``int64``, so its own serializer
writes those images wrongly; we hand such images to ``ismrmrd.Image`` as ``int64`` arrays and
write ``int32``.) Lengths and size fields are decoded as little-endian; the acquisition header
array uses ``HEADER_DTYPE`` (native byte order), so a little-endian host is assumed, as ISMRMRD does.

:class:`MessageReader` works on anything with ``recv_into`` (a socket; :class:`StreamSource`
wraps files and bytes). It keeps a small read-ahead buffer for headers and lengths and receives
large payloads straight into the numpy array that is returned. :class:`MessageWriter` works on
anything with ``sendall`` and writes each message under a lock.
"""
from __future__ import annotations

import ctypes
import io
import socket
import struct
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, Iterator

import ismrmrd
import numpy as np

from ..data.mrd_file import HEADER_DTYPE, flag_mask
from .types import COMPRESSION_FLAGS, AcqLine

__all__ = [
    "MessageId", "Message", "ProtocolError", "TruncatedMessage", "ReadTimeout",
    "MessageReader", "MessageWriter", "StreamSource", "DataLimits", "IMAGE_DTYPES",
    "ACQ_HEADER_BYTES", "IMAGE_HEADER_BYTES", "WAVEFORM_HEADER_BYTES", "CONFIG_FILE_BYTES",
]


class MessageId(IntEnum):
    CONFIG_FILE = 1
    CONFIG_TEXT = 2
    HEADER = 3
    CLOSE = 4
    TEXT = 5
    ERROR = 8
    ACQUISITION = 1008
    IMAGE = 1022
    WAVEFORM = 1026


@dataclass
class Message:
    """One decoded message. ``payload``: ``str`` for CONFIG_FILE, CONFIG_TEXT, HEADER, TEXT and
    ERROR; ``None`` for CLOSE; :class:`AcqLine` for ACQUISITION; ``ismrmrd.Image`` for IMAGE;
    ``ismrmrd.Waveform`` for WAVEFORM."""

    id: MessageId
    payload: Any = None


class ProtocolError(Exception):
    """The byte stream does not follow the protocol; the message says what, where and how big."""


class TruncatedMessage(ProtocolError):
    """The peer closed the connection in the middle of a message."""


class ReadTimeout(ProtocolError, TimeoutError):
    """The socket timeout expired while bytes were still expected.

    ``pending``: bytes still missing for the field being read; ``received``: bytes of the current
    message already consumed; ``resumable``: True when the timeout hit between messages (nothing of
    the next message consumed), so ``read()`` may be called again."""

    def __init__(self, text: str, pending: int, received: int, resumable: bool):
        super().__init__(text)
        self.pending = pending
        self.received = received
        self.resumable = resumable


ACQ_HEADER_BYTES = HEADER_DTYPE.itemsize                     # 340
IMAGE_HEADER_BYTES = ctypes.sizeof(ismrmrd.ImageHeader)         # 198
WAVEFORM_HEADER_BYTES = ctypes.sizeof(ismrmrd.WaveformHeader)   # 40
CONFIG_FILE_BYTES = 1024

# wire dtype of each ISMRMRD image data_type (C++ ismrmrd.h; INT is int32 there)
IMAGE_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<i2"), 3: np.dtype("<u4"), 4: np.dtype("<i4"),
                5: np.dtype("<f4"), 6: np.dtype("<f8"), 7: np.dtype("<c8"), 8: np.dtype("<c16")}

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_OFF = {name: HEADER_DTYPE.fields[name][1] for name in
        ("flags", "number_of_samples", "active_channels", "trajectory_dimensions", "scan_counter")}
_COMPRESSION_MASK = flag_mask(*COMPRESSION_FLAGS)
_IDS = {int(m): m for m in MessageId}


def _field_struct(fields: list[tuple[str, int, str]]) -> struct.Struct:
    """A little-endian struct reading ``(name, offset, code)`` fields (ascending offsets), skipping the rest."""
    fmt, at = "<", 0
    for _, offset, code in fields:
        fmt += f"{offset - at}x{code}" if offset > at else code
        at = offset + struct.calcsize("<" + code)
    return struct.Struct(fmt)


# flags, number_of_samples, active_channels, trajectory_dimensions of a 340-byte acquisition header
_ACQ_SIZES = _field_struct([("flags", _OFF["flags"], "Q"), ("samples", _OFF["number_of_samples"], "H"),
                            ("channels", _OFF["active_channels"], "H"),
                            ("traj_dims", _OFF["trajectory_dimensions"], "H")])
_IMAGE_FIELDS = ("data_type", "channels", "matrix_size")


def _compression_bits(flags: int) -> list[int]:
    return [b for b in COMPRESSION_FLAGS if flags & flag_mask(b)]


class StreamSource:
    """Adapter giving a binary file object (or bytes) the socket's ``recv_into``.

    ``max_chunk`` limits how many bytes one call delivers (to exercise partial reads in tests)."""

    def __init__(self, fileobj: Any, max_chunk: int | None = None):
        self._file = fileobj
        self._max_chunk = max_chunk

    @classmethod
    def from_bytes(cls, data: bytes, max_chunk: int | None = None) -> "StreamSource":
        return cls(io.BytesIO(data), max_chunk)

    def recv_into(self, buffer, nbytes: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        limit = nbytes or len(view)
        if self._max_chunk:
            limit = min(limit, self._max_chunk)
        return self._file.readinto(view[:limit]) or 0


TEXT_CHUNK_BYTES = 1 << 16
DEFAULT_MAX_TEXT_BYTES = 4 << 20


@dataclass(frozen=True)
class DataLimits:
    """Largest data messages a scan makes plausible, checked before anything is allocated.
    :data:`NO_DATA` (zeros) refuses every data message: the state before a header has arrived."""

    max_channels: int
    max_samples: int
    max_trajectory_dims: int = 4          # ISMRMRD trajectories: kx, ky[, kz][, density weight]
    max_image_bytes: int = 0              # pixels of one IMAGE message (pass-through in Gadgetron chains)
    max_waveform_values: int = 1 << 22    # uint32 values of one WAVEFORM (physiology: a few channels x kHz)

    @classmethod
    def from_encoding(cls, encoding) -> "DataLimits":
        """From :class:`gadget.data.mrd_header.EncodingInfo`: channels up to twice ``receiverChannels``
        (headers that count channels differently still pass; 256 when absent); samples up to 4x the
        encoded readout and at least 1024 (readout oversampling is inside the encoded size; noise lines
        may be longer); images up to 4x the encoded voxels per channel in complex64, at least 64 MiB."""
        x, y, z = encoding.encoded_matrix
        channels = 2 * encoding.receiver_channels if encoding.receiver_channels else 256
        return cls(max_channels=channels, max_samples=max(4 * x, 1024),
                   max_image_bytes=max(channels * 4 * x * y * z * 8, 64 << 20))


NO_DATA = DataLimits(0, 0, 0, 0, 0)


class MessageReader:
    """Decode messages from ``sock`` (anything with ``recv_into``; file objects with only
    ``readinto`` are wrapped in :class:`StreamSource`).

    ``read()`` returns the next :class:`Message`, or ``None`` on a clean EOF between messages.
    It raises :class:`TruncatedMessage` on EOF inside a message, :class:`ReadTimeout` when the
    socket's timeout expires, and :class:`ProtocolError` for unknown ids, compressed acquisitions,
    payloads larger than ``max_message_bytes`` (any message) or ``max_text_bytes`` (text), data
    messages beyond ``limits`` (all checked before anything is allocated) and undecodable content.
    ``limits`` is None (no plausibility check: files, tests) or a :class:`DataLimits`; a server sets
    :data:`NO_DATA` until the header and then the header's limits. After an error other than a
    resumable timeout the stream position is lost and further reads raise. Not thread-safe: one
    reader per connection thread.
    """

    def __init__(self, sock: Any, max_message_bytes: int = 1 << 30, buffer_size: int = 1 << 16,
                 max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES, limits: DataLimits | None = None):
        if not hasattr(sock, "recv_into") and hasattr(sock, "readinto"):
            sock = StreamSource(sock)
        self._recv_into = sock.recv_into
        self.max_message_bytes = int(max_message_bytes)
        self.max_text_bytes = min(int(max_text_bytes), self.max_message_bytes)
        self.limits = limits
        # Optional ``landing(head, channels, samples)`` → a C-contiguous complex64 ``(channels, samples)``
        # array to receive an acquisition's samples into (its final place, e.g. a slice buffer row), or
        # None for a new array. See SliceAssembler.landing_row.
        self.landing: Callable[[np.void, int, int], np.ndarray | None] | None = None
        self._buf = bytearray(max(buffer_size, 4096))
        self._view = memoryview(self._buf)
        self._lo = self._hi = 0      # unread bytes are _buf[_lo:_hi]
        self._pos = 0                # bytes consumed from the stream
        self._msg_start = 0          # stream offset of the current message
        self._msg_id: MessageId | None = None
        self._failed: ProtocolError | None = None
        self._decoders: dict[MessageId, Callable[[], Any]] = {
            MessageId.CONFIG_FILE: self._config_file, MessageId.CONFIG_TEXT: self._text32,
            MessageId.HEADER: self._text32, MessageId.CLOSE: lambda: None,
            MessageId.TEXT: self._text32, MessageId.ERROR: self._text64,
            MessageId.ACQUISITION: self._acquisition, MessageId.IMAGE: self._image,
            MessageId.WAVEFORM: self._waveform,
        }

    @classmethod
    def from_bytes(cls, data: bytes, max_chunk: int | None = None, **kwargs) -> "MessageReader":
        """A reader over an in-memory byte string (tests, recorded streams)."""
        return cls(StreamSource.from_bytes(data, max_chunk), **kwargs)

    @classmethod
    def from_file(cls, fileobj: Any, **kwargs) -> "MessageReader":
        """A reader over a binary file object (anything with ``readinto``)."""
        return cls(StreamSource(fileobj), **kwargs)

    @property
    def offset(self) -> int:
        """Bytes consumed from the stream so far."""
        return self._pos

    # ------------------------------------------------------------------ public
    def read(self) -> Message | None:
        if self._failed is not None:
            raise ProtocolError(f"reader unusable after an earlier error: {self._failed}")
        self._msg_start, self._msg_id = self._pos, None
        try:
            if self._hi - self._lo < 2 and not self._fill(2, at_boundary=True):
                return None
            raw_id = _U16.unpack_from(self._buf, self._lo)[0]
            self._lo += 2
            self._pos += 2
            msg_id = self._msg_id = _IDS.get(raw_id) or self._unknown_id(raw_id)
            return Message(msg_id, self._decoders[msg_id]())
        except ReadTimeout as exc:
            if not exc.resumable:
                self._failed = exc
            raise
        except ProtocolError as exc:
            self._failed = exc
            raise

    def __iter__(self) -> Iterator[Message]:
        """Messages up to and including CLOSE (peers keep the socket open after CLOSE while they
        wait for replies), or until a clean EOF."""
        while (msg := self.read()) is not None:
            yield msg
            if msg.id == MessageId.CLOSE:
                return

    # ------------------------------------------------------------------ errors
    def _where(self) -> str:
        name = "message id" if self._msg_id is None else f"{self._msg_id.name} message (id {int(self._msg_id)})"
        return (f"{name} starting at stream offset {self._msg_start} "
                f"({self._pos - self._msg_start} bytes of it consumed)")

    def _error(self, text: str) -> ProtocolError:
        return ProtocolError(f"{text} [{self._where()}]")

    def _too_big(self, what: str, nbytes: int) -> ProtocolError:
        return self._error(f"{what} of {nbytes} bytes exceeds the limit of {self.max_message_bytes} bytes "
                           "(max_message_bytes)")

    def _implausible(self, what: str, limit: str) -> ProtocolError:
        if self.limits == NO_DATA:
            return self._error(f"{self._msg_id.name} before HEADER: send the ISMRMRD header first ({what})")
        return self._error(f"implausible {what}: the scan's header allows at most {limit}")

    def _unknown_id(self, raw: int) -> MessageId:
        known = ", ".join(f"{m.value} {m.name}" for m in MessageId)
        raise self._error(f"unknown message id {raw} (0x{raw:04x}); known ids: {known}")

    # ------------------------------------------------------------- raw reads
    def _recv(self, view: memoryview, pending: int) -> int:
        try:
            return self._recv_into(view)
        except (socket.timeout, BlockingIOError):
            received = self._pos - self._msg_start
            resumable = received == 0
            state = "between messages" if resumable else self._where()
            raise ReadTimeout(f"timed out with {pending} bytes pending, {state}", pending, received,
                              resumable) from None

    def _eof(self, missing: int) -> TruncatedMessage:
        return TruncatedMessage(f"connection closed with at least {missing} more bytes expected, "
                                f"inside {self._where()}")

    def _fill(self, n: int, at_boundary: bool = False) -> bool:
        """Make ``n`` (<= buffer size) unread bytes available in the buffer, receiving as much as
        fits. Returns False only for EOF with nothing buffered when ``at_boundary``."""
        if self._hi - self._lo >= n:
            return True
        if self._lo + n > len(self._buf):  # compact
            kept = self._hi - self._lo
            self._view[:kept] = self._view[self._lo:self._hi]
            self._lo, self._hi = 0, kept
        while self._hi - self._lo < n:
            got = self._recv(self._view[self._hi:], n - (self._hi - self._lo))
            if not got:
                if at_boundary and self._hi == self._lo:
                    return False
                raise self._eof(n - (self._hi - self._lo))
            self._hi += got
        return True

    def _take(self, n: int) -> memoryview:
        """The next ``n`` bytes as a view into the buffer (valid until the next read)."""
        self._fill(n)
        view = self._view[self._lo:self._lo + n]
        self._lo += n
        self._pos += n
        return view

    def _readinto(self, dest: memoryview) -> None:
        """Fill ``dest`` (1-D bytes view) exactly: buffered bytes first, then large remainders are
        received directly into ``dest`` and small ones through the buffer."""
        n = len(dest)
        k = min(n, self._hi - self._lo)
        if k:
            dest[:k] = self._view[self._lo:self._lo + k]
            self._lo += k
            self._pos += k
        if k == n:
            return
        rest = n - k
        if rest < len(self._buf) // 2:
            dest[k:] = self._take(rest)
            return
        while k < n:
            got = self._recv(dest[k:], n - k)
            if not got:
                raise self._eof(n - k)
            k += got
            self._pos += got

    def _read_array(self, shape: tuple[int, ...], dtype, nbytes: int) -> np.ndarray:
        """A new array of ``shape`` received straight into its memory (``nbytes`` = its size)."""
        raw = np.empty(nbytes, np.uint8)
        if nbytes:
            self._readinto(memoryview(raw))
        return raw.view(dtype).reshape(shape)

    def _read_bytes(self, n: int) -> bytearray:
        out = bytearray(n)
        if n:
            self._readinto(memoryview(out))
        return out

    def _decode(self, raw: bytes | bytearray, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._error(f"{what} is not valid UTF-8 (byte {exc.start} of {len(raw)}: "
                              f"{bytes(raw[exc.start:exc.start + 4])!r})") from None

    # --------------------------------------------------------------- payloads
    def _config_file(self) -> str:
        raw = bytes(self._take(CONFIG_FILE_BYTES))
        return self._decode(raw.split(b"\0", 1)[0], "config file name")

    def _text(self, length: int) -> str:
        if length > self.max_text_bytes:
            raise self._error(f"text payload claims {length} bytes; the limit for config, header and text "
                              f"messages is {self.max_text_bytes} bytes (max_text_bytes)")
        out = bytearray()
        while len(out) < length:  # memory grows with the bytes that arrive, never to a claim up front
            out += self._read_bytes(min(TEXT_CHUNK_BYTES, length - len(out)))
        return self._decode(out.rstrip(b"\0"), "text payload")

    def _text32(self) -> str:
        return self._text(_U32.unpack(self._take(4))[0])

    def _text64(self) -> str:
        return self._text(_U64.unpack(self._take(8))[0])

    def _acquisition(self) -> AcqLine:
        """The hot path: one struct unpack for the size fields, a writable header copy, payload
        received into the returned arrays."""
        if self._hi - self._lo < ACQ_HEADER_BYTES:
            self._fill(ACQ_HEADER_BYTES)
        lo = self._lo
        flags, samples, channels, traj_dims = _ACQ_SIZES.unpack_from(self._buf, lo)
        if flags & _COMPRESSION_MASK:
            raise self._compressed(flags, _U32.unpack_from(self._buf, lo + _OFF["scan_counter"])[0])
        head = np.frombuffer(self._buf[lo:lo + ACQ_HEADER_BYTES], HEADER_DTYPE)[0]  # slice = copy
        self._lo = lo + ACQ_HEADER_BYTES
        self._pos += ACQ_HEADER_BYTES
        traj_bytes, data_bytes = samples * traj_dims * 4, channels * samples * 8
        lim = self.limits
        if lim is not None and (channels > lim.max_channels or samples > lim.max_samples
                                or traj_dims > lim.max_trajectory_dims):
            raise self._implausible(f"acquisition ({channels} channels x {samples} samples, {traj_dims} "
                                    "trajectory dims)", f"{lim.max_channels} channels x {lim.max_samples} "
                                    f"samples, {lim.max_trajectory_dims} trajectory dims")
        if traj_bytes + data_bytes > self.max_message_bytes:
            raise self._too_big(f"acquisition payload ({channels} channels x {samples} samples, "
                                f"{traj_dims} trajectory dims)", traj_bytes + data_bytes)
        traj = self._read_array((samples, traj_dims), np.float32, traj_bytes) if traj_dims else None
        dest = self.landing(head, channels, samples) if self.landing is not None and data_bytes else None
        if dest is None:
            return AcqLine(head, self._read_array((channels, samples), np.complex64, data_bytes), traj)
        self._readinto(memoryview(dest.reshape(-1).view(np.uint8)))
        return AcqLine(head, dest, traj)

    def _compressed(self, flags: int, scan_counter: int) -> ProtocolError:
        return self._error(f"acquisition scan_counter {scan_counter} has compression flag bit(s) "
                           f"{_compression_bits(flags)} set (flags 0x{flags:016x}): compressed payloads "
                           "are not supported; disable compression at the sender")

    def _image(self) -> ismrmrd.Image:
        head_bytes = bytes(self._take(IMAGE_HEADER_BYTES))
        head = ismrmrd.ImageHeader.from_buffer_copy(head_bytes)
        dtype = IMAGE_DTYPES.get(head.data_type)
        if dtype is None:
            raise self._error(f"image data_type {head.data_type} is not an ISMRMRD type "
                              f"(known: {sorted(IMAGE_DTYPES)})")
        attr_len = _U64.unpack(self._take(8))[0]
        x, y, z = head.matrix_size
        shape = (head.channels, z, y, x)
        nbytes = head.channels * x * y * z * dtype.itemsize
        if self.limits is not None and (nbytes > self.limits.max_image_bytes or attr_len > self.max_text_bytes):
            raise self._implausible(f"image ({shape} {dtype.name}, {attr_len} bytes of attributes)",
                                    f"{self.limits.max_image_bytes} bytes of pixels and {self.max_text_bytes} "
                                    "bytes of attributes")
        if attr_len + nbytes > self.max_message_bytes:
            raise self._too_big(f"image attributes ({attr_len} bytes) + pixels {shape} {dtype.name}",
                                attr_len + nbytes)
        attributes = self._decode(self._read_bytes(attr_len).rstrip(b"\0"), "image attribute string")
        pixels = self._read_array(shape, dtype, nbytes)
        if dtype == np.int32:  # ismrmrd-python holds DATATYPE_INT as the platform int
            pixels = pixels.astype(ismrmrd.image.get_dtype_from_data_type(head.data_type))
        try:
            return ismrmrd.Image(head=head_bytes, attribute_string=attributes, data=pixels)
        except (ET.ParseError, AssertionError) as exc:
            raise self._error(f"image attribute string is not ismrmrdMeta XML ({exc or type(exc).__name__}): "
                              f"{attributes[:80]!r}") from None

    def _waveform(self) -> ismrmrd.Waveform:
        head_bytes = bytes(self._take(WAVEFORM_HEADER_BYTES))
        head = ismrmrd.WaveformHeader.from_buffer_copy(head_bytes)
        nbytes = head.channels * head.number_of_samples * 4
        if self.limits is not None and nbytes // 4 > self.limits.max_waveform_values:
            raise self._implausible(f"waveform ({head.channels} channels x {head.number_of_samples} samples)",
                                    f"{self.limits.max_waveform_values} values")
        if nbytes > self.max_message_bytes:
            raise self._too_big(f"waveform data ({head.channels} channels x {head.number_of_samples} samples)",
                                nbytes)
        wave = ismrmrd.Waveform(head_bytes)  # allocates data (channels, number_of_samples) uint32
        if wave.data.size:
            self._readinto(memoryview(wave.data.reshape(-1).view(np.uint8)))
        return wave


class MessageWriter:
    """Encode messages onto ``sock`` (anything with ``sendall``). Each message is written under a
    lock, so reconstruction threads and the connection thread may share one writer.

    ``nul_terminate=True`` appends a NUL (counted in the length) to config and header text, as
    python-ismrmrd-server's client does. Small messages go out in one ``sendall``; large array
    payloads are sent from the arrays' memory without copying."""

    _JOIN_LIMIT = 1 << 16

    def __init__(self, sock: Any, nul_terminate: bool = False):
        self._sendall = sock.sendall
        self.nul_terminate = nul_terminate
        self._lock = threading.Lock()

    def _send(self, *parts) -> None:
        views = [memoryview(p).cast("B") if not isinstance(p, bytes) else p for p in parts]
        with self._lock:
            if sum(len(v) for v in views) <= self._JOIN_LIMIT:
                self._sendall(b"".join(views))
            else:
                for v in views:
                    if len(v):
                        self._sendall(v)

    def _text(self, msg_id: MessageId, text: str, length: struct.Struct, nul: bool = False) -> None:
        raw = text.encode("utf-8") + (b"\0" if nul else b"")
        self._send(_U16.pack(msg_id) + length.pack(len(raw)), raw)

    def config_file(self, name: str) -> None:
        raw = name.encode("utf-8")
        if len(raw) >= CONFIG_FILE_BYTES:
            raise ValueError(f"config file name is {len(raw)} bytes; at most {CONFIG_FILE_BYTES - 1} fit")
        self._send(_U16.pack(MessageId.CONFIG_FILE) + raw.ljust(CONFIG_FILE_BYTES, b"\0"))

    def config_text(self, text: str) -> None:
        self._text(MessageId.CONFIG_TEXT, text, _U32, self.nul_terminate)

    def header(self, xml: Any) -> None:
        """``xml``: the header as a string, or an object with ``toXML()`` (``ismrmrd.xsd.ismrmrdHeader``)."""
        self._text(MessageId.HEADER, xml if isinstance(xml, str) else xml.toXML(), _U32, self.nul_terminate)

    def text(self, text: str) -> None:
        self._text(MessageId.TEXT, text, _U32)

    def error(self, text: str) -> None:
        """ERROR (8) with a uint64 length: how the Gadgetron external channel reports failures."""
        self._text(MessageId.ERROR, text, _U64)

    def close(self) -> None:
        self._send(_U16.pack(MessageId.CLOSE))

    def acquisition(self, acq: AcqLine | Any) -> None:
        """An :class:`AcqLine` or ``ismrmrd.Acquisition``. ``number_of_samples``,
        ``active_channels`` and ``trajectory_dimensions`` are written from the arrays' shapes."""
        if isinstance(acq, AcqLine):
            head, data, traj = acq.head.tobytes(), acq.data, acq.traj
        else:
            head, data, traj = bytes(acq.getHead()), acq.data, acq.traj
        data = np.ascontiguousarray(data, np.complex64)
        if data.ndim != 2:
            raise ValueError(f"acquisition data must be (channels, samples), got shape {data.shape}")
        channels, samples = data.shape
        traj = np.ascontiguousarray(traj if traj is not None else np.zeros((samples, 0)), np.float32)
        if traj.ndim != 2 or (traj.size and traj.shape[0] != samples):
            raise ValueError(f"trajectory must be (samples={samples}, dims), got shape {traj.shape}")
        head = _fix_acq_head(head, samples, channels, traj.shape[1] if traj.size else 0)
        self._send(_U16.pack(MessageId.ACQUISITION) + head, traj.reshape(-1).view(np.uint8),
                   data.reshape(-1).view(np.uint8))

    def image(self, image: Any) -> None:
        """An ``ismrmrd.Image``: header, uint64 attribute length, attributes, pixels in the header's
        data_type (``DATATYPE_INT`` as int32)."""
        head = image.getHead()
        dtype = IMAGE_DTYPES.get(head.data_type)
        if dtype is None:
            raise ValueError(f"image data_type {head.data_type} is not an ISMRMRD type")
        x, y, z = head.matrix_size
        pixels = np.ascontiguousarray(image.data, dtype)
        if pixels.size != head.channels * x * y * z:
            raise ValueError(f"image data has {pixels.size} values, header says {head.channels} channels x "
                             f"{x}x{y}x{z}")
        attributes = image.attribute_string.encode("utf-8")
        head.attribute_string_len = len(attributes)
        self._send(_U16.pack(MessageId.IMAGE) + bytes(head) + _U64.pack(len(attributes)) + attributes,
                   pixels.reshape(-1).view(np.uint8))

    def waveform(self, waveform: Any) -> None:
        """An ``ismrmrd.Waveform``: 40-byte header + uint32 data (channels, number_of_samples)."""
        head = waveform.getHead()
        data = np.ascontiguousarray(waveform.data, np.uint32)
        if data.size != head.channels * head.number_of_samples:
            raise ValueError(f"waveform data has {data.size} values, header says {head.channels} channels x "
                             f"{head.number_of_samples} samples")
        self._send(_U16.pack(MessageId.WAVEFORM) + bytes(head), data.reshape(-1).view(np.uint8))

    def write(self, message: Message) -> None:
        """Write a :class:`Message` (as :meth:`MessageReader.read` returns them)."""
        method = {MessageId.CONFIG_FILE: self.config_file, MessageId.CONFIG_TEXT: self.config_text,
                  MessageId.HEADER: self.header, MessageId.TEXT: self.text, MessageId.ERROR: self.error,
                  MessageId.ACQUISITION: self.acquisition, MessageId.IMAGE: self.image,
                  MessageId.WAVEFORM: self.waveform}.get(message.id)
        if message.id == MessageId.CLOSE:
            self.close()
        elif method is None:
            raise ValueError(f"cannot write message id {message.id}")
        else:
            method(message.payload)


def _fix_acq_head(head: bytes, samples: int, channels: int, traj_dims: int) -> bytes:
    """The 340 header bytes with the size fields set from the payload; refuses compression flags."""
    flags = _U64.unpack_from(head, _OFF["flags"])[0]
    if flags & _COMPRESSION_MASK:
        raise ValueError(f"acquisition header has compression flag bit(s) {_compression_bits(flags)} set, "
                         "but the payload written is uncompressed complex64")
    for name, value in (("number_of_samples", samples), ("active_channels", channels),
                        ("trajectory_dimensions", traj_dims)):
        if value > 0xFFFF:
            raise ValueError(f"acquisition {name} = {value} does not fit the header's uint16")
    out = bytearray(head)
    _U16.pack_into(out, _OFF["number_of_samples"], samples)
    _U16.pack_into(out, _OFF["active_channels"], channels)
    _U16.pack_into(out, _OFF["trajectory_dimensions"], traj_dims)
    return bytes(out)
