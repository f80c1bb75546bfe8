"""Ingest benchmark: MRD acquisitions over loopback TCP, our MessageReader vs ismrmrd's deserializer.

A sender *process* pre-serializes HEADER + ``n_acq`` acquisitions (``channels`` x ``samples``
complex64) + CLOSE, then for each trial connects to a listener on 127.0.0.1, waits for a one-byte
"go" and ``sendall``s the bytes. The receiver times, from "go" to CLOSE:

* ``ours → slices``: the MRD server's own path up to the model (gadget/server.py, gadget/recon/overlap.py):
  a reader thread parses the socket with :class:`gadget.stream.codec.MessageReader`, prewhitens and
  places every line into k-space buffers (:class:`gadget.stream.assemble.SliceAssembler`) and hands
  finished slices to the receiving thread, so the figure ends at complete ``(coil, readout, phase)``
  slices, not at parsed messages;
* ``ours``: :class:`gadget.stream.codec.MessageReader` alone, producing ``AcqLine`` objects;
* ``ismrmrd``: ``ismrmrd.serialization.ProtocolDeserializer`` over ``sock.makefile('rb')``,
  producing ``ismrmrd.Acquisition`` objects (it also parses the XML header into an object);
* ``ismrmrd → slices``: the same deserializer plus the least assembly any reader must add: each
  acquisition's samples copied into its slice's ``(phase, coil, readout)`` buffer, buffers reused
  (no checks, no zeroing: it relies on the bench's fully sampled slices). It shows what ending at
  slices costs on top of a bare parse: every byte written once more, into buffers larger than the cache;
* ``raw recv``: ``recv_into`` into one reused 1 MiB buffer, no parsing (the loopback ceiling).

Trials alternate between readers; the figure is the median of ``repeats`` trials, in MB/s
(10^6 bytes of stream per second). Run: ``python bench/ingest_bench.py [--n-acq N ...]``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import socket
import statistics
import time

import ismrmrd
import numpy as np
from ismrmrd.serialization import ProtocolDeserializer

from gadget.bench.table import markdown_table
from gadget.data.mrd_file import flag_mask
from gadget.data.mrd_header import build_header_xml
from gadget.recon.config import ReconConfig
from gadget.recon.overlap import overlapped  # imported here, not in the first timed trial (torch comes with it)
from gadget.recon.pipeline import ScanReconstructor
from gadget.server import _messages
from gadget.stream.codec import MessageId, MessageReader, MessageWriter
from gadget.stream.types import FLAG_LAST_IN_SLICE, AcqLine, make_head
READERS = ("ours → slices", "ismrmrd → slices", "ours", "ismrmrd", "raw recv")
LINES_PER_SLICE = 256


class _Collect:
    def __init__(self):
        self.parts: list[bytes] = []

    def sendall(self, data) -> None:
        self.parts.append(bytes(data))


def _header_xml(channels: int, samples: int) -> str:
    return build_header_xml(encoded_matrix=(samples, LINES_PER_SLICE, 1),
                            recon_matrix=(samples // 2, LINES_PER_SLICE, 1), encoded_fov_mm=(400, 200, 5),
                            recon_fov_mm=(200, 200, 5), e1_max=LINES_PER_SLICE - 1,
                            e1_center=LINES_PER_SLICE // 2, num_coils=channels)


def build_stream(n_acq: int, channels: int, samples: int, seed: int = 0) -> bytes:
    """HEADER + ``n_acq`` acquisitions (16 distinct payloads, distinct headers) + CLOSE: fully sampled
    slices of ``LINES_PER_SLICE`` lines, the last line of each flagged LAST_IN_SLICE."""
    rng = np.random.default_rng(seed)
    payloads = [(rng.standard_normal((channels, samples)) + 1j * rng.standard_normal((channels, samples)))
                .astype(np.complex64) for _ in range(16)]
    sink = _Collect()
    writer = MessageWriter(sink)
    writer.header(_header_xml(channels, samples))
    for i in range(n_acq):
        e1, sl = i % LINES_PER_SLICE, i // LINES_PER_SLICE
        last = e1 == LINES_PER_SLICE - 1 or i == n_acq - 1
        head = make_head(scan_counter=i, center_sample=samples // 2, flags=flag_mask(FLAG_LAST_IN_SLICE) if last else 0,
                         idx={"kspace_encode_step_1": e1, "slice": sl})
        writer.acquisition(AcqLine(head, payloads[i % 16]))
    writer.close()
    return b"".join(sink.parts)


def _sender(port: int, trials: int, n_acq: int, channels: int, samples: int) -> None:
    data = build_stream(n_acq, channels, samples)
    for _ in range(trials):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            if sock.recv(1) != b"g":
                return
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # wait for the receiver to hang up


def _read_ours(sock: socket.socket, *_shape) -> int:
    count = 0
    reader = MessageReader(sock)
    for msg in reader:
        if msg.id == MessageId.ACQUISITION:
            count += 1
    return count


class _AssembleOnly:
    """A scan whose per-slice half hands the assembled slices out instead of running a model."""

    def __init__(self, header_xml: str):
        self.scan = ScanReconstructor(header_xml, ReconConfig(mode="zero-filled"), source="ingest-bench")
        self.source = self.scan.source

    def assembled(self, items):
        return self.scan.assembled(items)

    def reconstruct(self, stream):
        for sl in stream:
            yield sl
            self.scan.assembler.recycle(sl)  # as ScanReconstructor.reconstruct does once images are built


def _read_ours_slices(sock: socket.socket, channels: int, samples: int) -> int:
    """The MRD server's path up to the model: returns the lines in the assembled slices, after checking
    every slice came out complete and of the expected shape."""
    reader = MessageReader(sock)
    header = reader.read()
    if header is None or header.id != MessageId.HEADER:
        raise RuntimeError("stream did not start with HEADER")
    scan = _AssembleOnly(header.payload)
    reader.landing = scan.scan.assembler.landing_row  # as the server does
    lines = 0
    for sl in overlapped(scan, _messages(reader)):
        if sl.kspace.shape != (channels, samples, LINES_PER_SLICE) or sl.incomplete:
            raise RuntimeError(f"assembled slice of shape {sl.kspace.shape}, incomplete={sl.incomplete}")
        lines += sl.lines
    return lines


def _read_ismrmrd(sock: socket.socket, *_shape) -> int:
    with sock.makefile("rb") as stream:
        return sum(isinstance(obj, ismrmrd.Acquisition) for obj in ProtocolDeserializer(stream).deserialize())


def _read_ismrmrd_slices(sock: socket.socket, channels: int, samples: int) -> int:
    """ismrmrd's parse plus the least assembly (see the module docstring); returns the lines placed."""
    buffers: dict[int, np.ndarray] = {}
    spare: list[np.ndarray] = []
    lines = 0
    with sock.makefile("rb") as stream:
        for acq in ProtocolDeserializer(stream).deserialize():
            if not isinstance(acq, ismrmrd.Acquisition):
                continue
            sl = acq.idx.slice
            buf = buffers.get(sl)
            if buf is None:
                buf = buffers[sl] = spare.pop() if spare else np.zeros((LINES_PER_SLICE, channels, samples),
                                                                        np.complex64)
            buf[acq.idx.kspace_encode_step_1] = acq.data
            lines += 1
            if acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
                spare.append(buffers.pop(sl))
    return lines


def _read_raw(sock: socket.socket, *_shape) -> int:
    buf = memoryview(bytearray(1 << 20))
    while sock.recv_into(buf):
        pass
    return -1


_READ = {"ours → slices": _read_ours_slices, "ismrmrd → slices": _read_ismrmrd_slices, "ours": _read_ours,
         "ismrmrd": _read_ismrmrd, "raw recv": _read_raw}


def _accept(server: socket.socket, sender) -> socket.socket:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            conn, _ = server.accept()
            conn.settimeout(None)
            return conn
        except TimeoutError:
            if not sender.is_alive():
                raise RuntimeError(f"sender process exited (code {sender.exitcode})") from None
    raise RuntimeError("sender did not connect within 600 s")


def _trial(server: socket.socket, sender, reader: str, channels: int, samples: int) -> tuple[float, float, int]:
    """(wall seconds, receiver CPU seconds, acquisitions read or -1)."""
    conn = _accept(server, sender)
    with conn:
        conn.sendall(b"g")
        t0, c0 = time.perf_counter(), time.process_time()
        count = _READ[reader](conn, channels, samples)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return elapsed, cpu, count


def run_ingest_bench(n_acq: int = 2000, channels: int = 32, samples: int = 512, repeats: int = 3,
                     readers: tuple[str, ...] = READERS) -> dict:
    """Time each reader ``repeats`` times over loopback TCP. Returns sizes, per-trial wall and receiver
    CPU seconds, ``mb_s`` (median wall MB/s per reader), ``mb_per_cpu_s`` (MB per receiver CPU second:
    steadier on a loaded machine) and ``ratio`` (ours → slices / ismrmrd wall MB/s)."""
    total = (2 + 4 + len(_header_xml(channels, samples).encode()) + n_acq * (2 + 340 + channels * samples * 8)
             + 2)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    times: dict[str, list[float]] = {r: [] for r in readers}
    cpu: dict[str, list[float]] = {r: [] for r in readers}
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        port = server.getsockname()[1]
        sender = ctx.Process(target=_sender, args=(port, repeats * len(readers), n_acq, channels, samples),
                             daemon=True)
        sender.start()
        try:
            for _ in range(repeats):
                for reader in readers:
                    elapsed, cpu_s, count = _trial(server, sender, reader, channels, samples)
                    if count not in (-1, n_acq):
                        raise RuntimeError(f"{reader} read {count} acquisitions, expected {n_acq}")
                    times[reader].append(elapsed)
                    cpu[reader].append(cpu_s)
        finally:
            sender.join(timeout=30)
            if sender.is_alive():
                sender.terminate()
    mb_s = {r: total / statistics.median(t) / 1e6 for r, t in times.items()}
    result = {"n_acq": n_acq, "channels": channels, "samples": samples, "repeats": repeats,
              "stream_bytes": total, "seconds": times, "cpu_seconds": cpu, "mb_s": mb_s,
              "mb_per_cpu_s": {r: total / statistics.median(t) / 1e6 for r, t in cpu.items()}}
    if "ours → slices" in mb_s and "ismrmrd" in mb_s:
        result["ratio"] = mb_s["ours → slices"] / mb_s["ismrmrd"]
    return result


def format_table(result: dict) -> str:
    head = (f"ingest benchmark: {result['n_acq']} acquisitions x {result['channels']} channels x "
            f"{result['samples']} samples over loopback TCP ({result['stream_bytes'] / 1e6:.1f} MB per run), "
            f"sender in a separate process\n"
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, median of {result['repeats']} runs, {time.strftime('%Y-%m-%d')}\n")
    ref = result["mb_s"].get("ismrmrd")
    rows = []
    for reader, mbs in result["mb_s"].items():
        per_s = result["n_acq"] / statistics.median(result["seconds"][reader])
        rows.append([reader, f"{mbs:,.0f}", f"{per_s:,.0f}", f"{result['mb_per_cpu_s'][reader]:,.0f}",
                     ", ".join(f"{t:.3f}" for t in result["seconds"][reader]), f"{mbs / ref:.2f}x" if ref else "-"])
    return head + markdown_table(["reader", "median MB/s", "acquisitions/s", "MB per receiver CPU s", "runs (s)",
                                  "vs ismrmrd"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-acq", type=int, default=2000)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(format_table(run_ingest_bench(args.n_acq, args.channels, args.samples, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
