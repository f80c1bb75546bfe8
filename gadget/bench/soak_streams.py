"""Byte streams for ``varnet bench soak``: one good scan encoded once, and the bad connections made from it.

Every connection the soak opens is planned here as a :class:`Plan` (kind, variant, bytes to send, how the
client behaves after sending). The good scan is simulated with the repository's converters and
pre-encoded with :class:`MessageWriter` into one byte string per message, so the client threads only
send bytes. Kinds (the proportions are :data:`DEFAULT_MIX`, in percent):

* ``good``: the whole scan; the client reads replies until CLOSE and counts the images.
* ``malformed``: the good stream with one mutation (:data:`MUTATIONS`): bit flips, truncation, a wrong
  length or size field, an unknown message id, NaN samples, broken header XML, reordered messages.
  The client half-closes after sending and reads what comes back.
* ``stalled``: CONFIG, then a HEADER / CONFIG_TEXT / TEXT whose uint32 length claims 0.5-1 GB, then 15
  bytes; the client then sends nothing for the stall time (it still listens) and closes.
* ``abuse``: other protocol abuse (:data:`ABUSES`): an acquisition header claiming an implausible size
  then a stall, a silent connection, connect-and-close, config then CLOSE only, random garbage, a
  header then EOF.
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

import numpy as np

from ..data.mrd_file import HEADER_DTYPE
from ..stream.codec import MessageId, MessageWriter
from ..stream.types import AcqLine
from .scans import simulated_scan

DEFAULT_MIX = {"good": 10, "malformed": 50, "stalled": 25, "abuse": 15}
MUTATIONS = ("bit-flips", "truncation", "bad-length", "unknown-id", "nan-samples", "broken-xml", "reordering")
ABUSES = ("implausible-acquisition", "silent", "connect-close", "config-only", "garbage", "header-eof")
GADGETRON_CONFIG = "<configuration></configuration>"

_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")
_OFF = {name: HEADER_DTYPE.fields[name][1] for name in ("number_of_samples", "active_channels")}


@dataclass
class Plan:
    """One connection: ``payload`` is sent, then ``after``: ``read`` (read replies until CLOSE),
    ``half-close`` (shut the write side, then read), ``stall`` (send nothing for the stall time,
    listening, then close) or ``close`` (close at once)."""

    kind: str
    variant: str
    payload: bytes = b""
    after: str = "read"


class _Sink:
    """A ``sendall`` that collects bytes, so :class:`MessageWriter` encodes into memory."""

    def __init__(self):
        self.parts: list[bytes] = []

    def sendall(self, data) -> None:
        self.parts.append(bytes(data))

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


@dataclass
class GoodScan:
    """The good scan, one encoded byte string per message: ``config``, ``header``, ``acquisitions``,
    ``close``; ``lines`` are the decoded acquisitions (for re-encoding mutated ones)."""

    dialect: str
    slices: int
    xml: str
    lines: list[AcqLine]
    config: bytes = b""
    header: bytes = b""
    acquisitions: list[bytes] = field(default_factory=list)
    close: bytes = b""

    @property
    def nul(self) -> bool:
        return self.dialect == "mrd"  # python-ismrmrd-server's client NUL-terminates; Gadgetron does not

    def encode_config(self) -> bytes:
        sink = _Sink()
        writer = MessageWriter(sink, nul_terminate=self.nul)
        if self.dialect == "gadgetron":
            writer.config_text(GADGETRON_CONFIG)
        else:
            writer.config_file("default")
        return sink.take()

    def encode_header(self, xml: str) -> bytes:
        sink = _Sink()
        MessageWriter(sink, nul_terminate=self.nul).header(xml)
        return sink.take()

    def encode_acquisition(self, line: AcqLine) -> bytes:
        sink = _Sink()
        MessageWriter(sink).acquisition(line)
        return sink.take()

    def stream(self) -> bytes:
        return b"".join([self.config, self.header, *self.acquisitions, self.close])


def build_good_scan(dialect: str, slices: int = 3, coils: int = 4, size=(32, 24), acceleration: int = 4,
                    seed: int = 5) -> GoodScan:
    """Simulate a volume, write it as fastMRI, convert it to raw ISMRMRD (noise scan included) and
    pre-encode every message of it for ``dialect`` (``mrd`` or ``gadgetron``)."""
    xml, lines, _ = simulated_scan(slices, coils, size, seed, acceleration, center_fraction=0.125, with_noise=True)
    scan = GoodScan(dialect, slices, xml, lines)
    scan.config, scan.header = scan.encode_config(), scan.encode_header(xml)
    scan.acquisitions = [scan.encode_acquisition(line) for line in lines]
    sink = _Sink()
    MessageWriter(sink).close()
    scan.close = sink.take()
    return scan


def draw_plan(scan: GoodScan, rng: random.Random, mix: dict[str, int]) -> Plan:
    """One connection, its kind drawn with the weights of ``mix``."""
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    if kind == "good":
        return Plan("good", "whole-scan", scan.stream(), "read")
    if kind == "malformed":
        variant = rng.choice(MUTATIONS)
        return Plan(kind, variant, _MUTATE[variant](scan, rng), "half-close")
    if kind == "stalled":
        return _stalled_claim(scan, rng)
    if kind == "abuse":
        return _abuse(scan, rng, rng.choice(ABUSES))
    raise ValueError(f"unknown connection kind {kind!r} (known: {', '.join(DEFAULT_MIX)})")


# ---------------------------------------------------------------------------------------- malformed

def _bit_flips(scan: GoodScan, rng: random.Random) -> bytes:
    data = bytearray(scan.stream())
    for _ in range(rng.randint(1, 16)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def _truncation(scan: GoodScan, rng: random.Random) -> bytes:
    data = scan.stream()
    return data[:rng.randrange(1, len(data) - 1)]


def _bad_length(scan: GoodScan, rng: random.Random) -> bytes:
    """The HEADER's uint32 length, or an acquisition's sample or channel count, disagrees with the bytes."""
    acqs = list(scan.acquisitions)
    if rng.random() < 0.5:
        header = bytearray(scan.header)
        true = _U32.unpack_from(header, 2)[0]
        wrong = rng.choice([rng.randrange(0, true), true + rng.randint(1, 1 << 20), rng.randrange(1 << 32)])
        _U32.pack_into(header, 2, wrong)
        return b"".join([scan.config, bytes(header), *acqs, scan.close])
    i = rng.randrange(len(acqs))
    acq = bytearray(acqs[i])
    name = rng.choice(("number_of_samples", "active_channels"))
    at = 2 + _OFF[name]
    _U16.pack_into(acq, at, (_U16.unpack_from(acq, at)[0] + rng.choice((-1, 1, 7, 1000))) % 65536)
    acqs[i] = bytes(acq)
    return b"".join([scan.config, scan.header, *acqs, scan.close])


def _unknown_id(scan: GoodScan, rng: random.Random) -> bytes:
    known = {int(m) for m in MessageId}
    bad = rng.choice([i for i in (0, 6, 7, 9, 1000, 1007, 1009, 1023, 4242, 65535) if i not in known])
    parts = [scan.config, scan.header, *scan.acquisitions, scan.close]
    if rng.random() < 0.5:  # a message of an unknown id inserted
        parts.insert(rng.randrange(len(parts)), _U16.pack(bad) + rng.randbytes(rng.randint(0, 64)))
    else:  # an acquisition's id replaced
        i = 2 + rng.randrange(len(scan.acquisitions))
        parts[i] = _U16.pack(bad) + parts[i][2:]
    return b"".join(parts)


def _nan_samples(scan: GoodScan, rng: random.Random) -> bytes:
    acqs = list(scan.acquisitions)
    for i in rng.sample(range(len(acqs)), rng.randint(1, max(1, len(acqs) // 4))):
        line = scan.lines[i]
        data = line.data.copy()
        flat = data.reshape(-1)
        flat[rng.randrange(flat.size):] = rng.choice((np.nan, np.inf, complex(np.nan, np.nan)))
        acqs[i] = scan.encode_acquisition(AcqLine(line.head, data, line.traj))
    return b"".join([scan.config, scan.header, *acqs, scan.close])


def _broken_xml(scan: GoodScan, rng: random.Random) -> bytes:
    xml = scan.xml
    cut = rng.randrange(1, len(xml))
    broken = rng.choice([xml[:cut], xml[:cut] + "<<&>" + xml[cut:], xml.replace("</encoding>", "", 1),
                         "not xml at all", ""])
    return b"".join([scan.config, scan.encode_header(broken), *scan.acquisitions, scan.close])


def _reordering(scan: GoodScan, rng: random.Random) -> bytes:
    acqs = list(scan.acquisitions)
    how = rng.choice(("shuffled", "data-before-header", "header-first", "close-early", "header-twice"))
    if how == "shuffled":
        rng.shuffle(acqs)
        parts = [scan.config, scan.header, *acqs, scan.close]
    elif how == "data-before-header":
        parts = [scan.config, *acqs, scan.header, scan.close]
    elif how == "header-first":
        parts = [scan.header, scan.config, *acqs, scan.close]
    elif how == "close-early":
        parts = [scan.config, scan.header, *acqs[:rng.randrange(len(acqs))], scan.close, *acqs]
    else:
        at = rng.randrange(len(acqs))
        parts = [scan.config, scan.header, *acqs[:at], scan.header, *acqs[at:], scan.close]
    return b"".join(parts)


_MUTATE = {"bit-flips": _bit_flips, "truncation": _truncation, "bad-length": _bad_length,
           "unknown-id": _unknown_id, "nan-samples": _nan_samples, "broken-xml": _broken_xml,
           "reordering": _reordering}
assert tuple(_MUTATE) == MUTATIONS


# ---------------------------------------------------------------------------------------- stalls, abuse

def _stalled_claim(scan: GoodScan, rng: random.Random) -> Plan:
    """CONFIG, then a text message whose uint32 length claims 0.5-1 GB, 15 bytes of it, then silence."""
    which = rng.choice((MessageId.HEADER, MessageId.CONFIG_TEXT, MessageId.TEXT))
    claim = rng.randint(1 << 29, 1 << 30)
    payload = scan.config + _U16.pack(which) + _U32.pack(claim) + b"<?xml version=1"[:15]
    return Plan("stalled", f"{which.name.lower()}-claim", payload, "stall")


def _abuse(scan: GoodScan, rng: random.Random, variant: str) -> Plan:
    if variant == "implausible-acquisition":
        head = bytearray(scan.acquisitions[-1][:2 + HEADER_DTYPE.itemsize])
        channels, samples = rng.choice(((65535, 65535), (4096, 65535), (2048, 32768), (65535, 1)))
        _U16.pack_into(head, 2 + _OFF["active_channels"], channels)
        _U16.pack_into(head, 2 + _OFF["number_of_samples"], samples)
        payload = scan.config + scan.header + bytes(head) + rng.randbytes(rng.randint(1, 64))
        return Plan("abuse", variant, payload, "stall")
    if variant == "silent":
        return Plan("abuse", variant, b"", "stall")
    if variant == "connect-close":
        return Plan("abuse", variant, b"", "close")
    if variant == "config-only":
        return Plan("abuse", variant, scan.config + scan.close, "read")
    if variant == "garbage":
        return Plan("abuse", variant, rng.randbytes(rng.randint(1, 4096)), "half-close")
    if variant == "header-eof":
        return Plan("abuse", variant, scan.config + scan.header, "half-close")
    raise ValueError(f"unknown abuse variant {variant!r} (known: {', '.join(ABUSES)})")
