"""Memory a client cannot inflate (docs/reference/protocol.md): allocation follows the bytes that arrive, data messages
are checked against the header before allocation, a process-wide budget bounds the k-space scans
hold, and memory comes back when the server is idle."""
import gc
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

from gadget.bench.soak import SoakCase, run_client
from gadget.bench.soak_streams import Plan, build_good_scan, draw_plan
from gadget.data.mrd_header import build_header_xml, parse_encoding
from gadget.recon.allocator import keep_freed_memory
from gadget.recon.config import ReconConfig
from gadget.server import ReconService
from gadget.stream.budget import BudgetExceeded, MemoryBudget
from gadget.stream.codec import (ACQ_HEADER_BYTES, NO_DATA, DataLimits, MessageId, MessageReader, MessageWriter,
                                 ProtocolError)
from gadget.stream.types import AcqLine, make_head
from tests.server_harness import connect, images_of, make_scan, read_until_close, running, send_scan, texts_of

MB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    return make_scan(tmp_path_factory.mktemp("mem"), slices=3)


def _service(**kwargs):
    return ReconService(ReconConfig(mode="zero-filled", prewhiten=False), None, "none", idle_timeout=5.0, **kwargs)


def _wait_for_rest(service, rests_before, timeout=10.0):
    deadline = time.time() + timeout
    while service.rests <= rests_before:
        assert time.time() < deadline, "the server never went idle"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- text claims

@pytest.mark.parametrize("kind", [MessageId.CONFIG_TEXT, MessageId.HEADER, MessageId.TEXT])
def test_stalled_text_claims_hold_one_chunk_not_the_claim(kind, scan):
    """Eight connections each claim a text payload at the cap (4 MB), send 15 bytes and stall: the
    server holds what arrived (one 64 KiB chunk each), not 8 x 4 MB; a claim past the cap is refused
    at once with the cap named."""
    xml = scan[0]
    service = _service()
    with running(service) as port:
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            socks = []
            for _ in range(8):
                s = connect(port)
                MessageWriter(s).config_file("default")
                if kind == MessageId.TEXT:
                    MessageWriter(s).header(xml)
                s.sendall(struct.pack("<HI", int(kind), 4 * MB) + b"<" * 15)
                socks.append(s)
            time.sleep(0.5)
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
            for s in socks:
                s.close()
        assert held < 3 * MB, f"{held / MB:.1f} MB held for 8 stalled 4 MB claims"
        with connect(port) as s:
            MessageWriter(s).config_file("default")
            s.sendall(struct.pack("<HI", int(kind), 900 * MB))  # nothing unread left when it is refused
            reply = " ".join(texts_of(read_until_close(s)))
        assert "claims 943718400 bytes" in reply and "max_text_bytes" in reply


def test_reader_receives_text_in_chunks():
    """Through the reader alone: a 3 MB text arriving whole is decoded exactly; its peak allocation is the
    text plus chunk copies, never a preallocated claim larger than what arrived."""
    text = ("<a>" + "x" * (3 * MB) + "</a>").encode()
    data = struct.pack("<HI", int(MessageId.TEXT), len(text)) + text
    assert MessageReader.from_bytes(data).read().payload == text.decode()
    truncated = struct.pack("<HI", int(MessageId.TEXT), 4 * MB) + b"y" * 1000
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="connection closed"):
            MessageReader.from_bytes(truncated).read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 * MB


# ----------------------------------------------------------------------------- data plausibility

def _acq_bytes(channels, samples, payload=b""):
    head = make_head(active_channels=channels, number_of_samples=samples, available_channels=channels)
    return struct.pack("<H", int(MessageId.ACQUISITION)) + head.tobytes() + payload


def test_implausible_acquisition_is_refused_before_allocation():
    xml = build_header_xml(encoded_matrix=(128, 96, 1), recon_matrix=(64, 96, 1), encoded_fov_mm=(400, 200, 5),
                           recon_fov_mm=(200, 200, 5), e1_max=95, e1_center=48, num_coils=8)
    limits = DataLimits.from_encoding(parse_encoding(xml))
    assert (limits.max_channels, limits.max_samples) == (16, 1024)
    ok = _acq_bytes(8, 256, np.zeros(8 * 256, np.complex64).tobytes())
    assert MessageReader.from_bytes(ok, limits=limits).read().payload.data.shape == (8, 256)
    tracemalloc.start()
    try:
        for channels, samples in [(8, 60_000), (4096, 256)]:  # 3.8 MB and 8.4 MB claims
            with pytest.raises(ProtocolError, match="implausible acquisition .* at most 16 channels x 1024 samples"):
                MessageReader.from_bytes(_acq_bytes(channels, samples, b"\0" * 64), limits=limits).read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 * MB
    with pytest.raises(ProtocolError, match="ACQUISITION before HEADER"):
        MessageReader.from_bytes(_acq_bytes(8, 256), limits=NO_DATA).read()
    assert len(_acq_bytes(1, 1)) == 2 + ACQ_HEADER_BYTES


# ----------------------------------------------------------------------------- the budget

def test_budget_reserves_waits_refuses_and_releases_on_free():
    budget = MemoryBudget(10 * MB, wait_s=0.2)
    a = budget.zeros((4 * MB,), np.uint8, "a")
    b = budget.zeros((4 * MB,), np.uint8, "b")
    assert budget.in_use == 8 * MB
    with pytest.raises(BudgetExceeded, match=r"c needs 4.0 MB, but 8.0 MB of the 10.0 MB memory budget"):
        budget.zeros((4 * MB,), np.uint8, "c")
    with pytest.raises(BudgetExceeded, match="more than the whole memory budget"):
        budget.zeros((11 * MB,), np.uint8, "d")
    view = a[::2]
    del a
    assert budget.in_use == 8 * MB  # a view keeps the array alive
    del view
    assert budget.in_use == 4 * MB
    holder = [b]  # another scan's buffer, freed while the next reservation waits
    del b
    budget.wait_s = 5.0
    threading.Timer(0.2, holder.clear).start()
    c = budget.zeros((8 * MB,), np.uint8, "c")
    assert budget.in_use == 8 * MB and budget.peak == 8 * MB
    del c
    assert budget.in_use == 0


def _interleaved(lines):
    """The scan's lines with the slices interleaved, so every slice buffer is open at once."""
    by_slice = {}
    for ln in lines:
        if not ln.has_flag(19):  # noise first, as the scan had it
            by_slice.setdefault(int(ln.head["idx"]["slice"]), []).append(ln)
    noise = [ln for ln in lines if ln.has_flag(19)]
    order = [ln for group in zip(*by_slice.values()) for ln in group]
    return noise + order


def test_server_refuses_a_scan_past_the_budget_and_releases_it(scan):
    xml, lines, _ = scan
    encoding = parse_encoding(xml)
    coils = lines[-1].data.shape[0]
    one_slice = encoding.encoded_matrix[0] * encoding.encoded_matrix[1] * coils * 8
    service = _service(budget=MemoryBudget(int(2.5 * one_slice), wait_s=0.2))
    with running(service) as port:
        with connect(port) as s:
            send_scan(s, xml, lines)  # slice after slice: one buffer at a time fits
            assert len(images_of(read_until_close(s))) == 3
        with connect(port) as s:  # the first line of each slice: the third does not fit
            send_scan(s, xml, [ln for ln in _interleaved(lines) if not ln.has_flag(19)][:3], close=False)
            reply = " ".join(texts_of(read_until_close(s)))
        assert "memory budget" in reply and "held by scans in progress" in reply
        deadline = time.time() + 5
        while service.budget.in_use and time.time() < deadline:
            time.sleep(0.02)
        assert service.budget.in_use == 0  # the failed scan's buffers were given back


# ----------------------------------------------------------------------------- memory comes back

def _big_scan(slices=4, coils=32, readout=512, width=256, seed=0):
    """A fully sampled Cartesian scan of random k-space: 32 MB of k-space per slice."""
    rng = np.random.default_rng(seed)
    xml = build_header_xml(encoded_matrix=(readout, width, 1), recon_matrix=(readout // 2, width, 1),
                           encoded_fov_mm=(400, 200, 5), recon_fov_mm=(200, 200, 5), e1_max=width - 1,
                           e1_center=width // 2, num_coils=coils, num_slices=slices)
    row = (rng.standard_normal((coils, readout)) + 1j * rng.standard_normal((coils, readout))).astype(np.complex64)
    lines = []
    for k in range(slices):
        for col in range(width):
            head = make_head(idx={"kspace_encode_step_1": col, "slice": k}, center_sample=readout // 2,
                             flags=(1 << 7) if col == width - 1 else 0)  # LAST_IN_SLICE
            lines.append(AcqLine(head, row))
    return xml, lines


def test_memory_comes_back_after_a_scan(scan):
    """With freed memory kept for speed (as a served engine sets it), the server's resident size after
    a 128 MB scan returns to within 40 MB of its resting value once the server is idle.

    The warm-up runs the same big scan first, so caches that live as long as the process (FFT plans
    for its sizes, thread stacks, arenas of new threads) are in the resting value: a resting value
    taken before them let such one-off growth (64 MB once in CI) pass for memory not given back. With
    the trim at rest switched off the test still fails (checked: resting 796 MB, after 956 MB)."""
    keep_freed_memory()
    service = _service(budget=MemoryBudget(1 << 30))
    xml, lines = _big_scan()
    with running(service) as port:
        for warm_up in [scan[:2], (xml, _interleaved(lines))]:  # code paths, sizes and thread stacks
            rests = service.rests
            with connect(port, timeout=60) as s:
                send_scan(s, *warm_up)
                read_until_close(s)
            _wait_for_rest(service, rests)
        before = rss_bytes()
        samples, done = [], threading.Event()

        def sample():
            while not done.is_set():
                samples.append(rss_bytes())
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        rests = service.rests
        with connect(port, timeout=60) as s:
            send_scan(s, xml, _interleaved(lines))  # all four 32 MB slices open at once
            assert len(images_of(read_until_close(s))) == 4
        _wait_for_rest(service, rests)
        done.set()
        sampler.join()
        after = rss_bytes()
    assert max(samples) - before > 100 * MB  # the scan did hold its k-space
    assert after - before < 40 * MB, f"resting {before / MB:.0f} MB, after the scan {after / MB:.0f} MB"


# ----------------------------------------------------------------------------- mutated sessions on many threads

# The server alone in a fresh process (its malloc arenas untouched by other tests), with freed memory kept
# as a served engine sets it, set first as `varnet serve` sets it. It prints its port, then answers each
# line on stdin with its resident MB once it is idle and has rested (returned freed memory).
_SERVER_PROBE = """
import sys, threading, time
from gadget.recon.allocator import keep_freed_memory
print(keep_freed_memory(), flush=True)
from gadget.recon.config import ReconConfig
from gadget.server import ReconService

service = ReconService(ReconConfig(mode="zero-filled", prewhiten=False), None, "none", idle_timeout=5.0)
ready = threading.Event()
threading.Thread(target=service.serve, kwargs=dict(host="127.0.0.1", port=0, ready=ready), daemon=True).start()
ready.wait()
print(service.address[1], flush=True)
for _ in sys.stdin:
    while service._active:
        time.sleep(0.01)
    time.sleep(0.2)  # the last scan's thread takes the rest lock right after it leaves
    with service._rest_lock:  # ... and holds it while it rests
        pass
    with open("/proc/self/status") as f:
        print(next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024, flush=True)
"""


def test_memory_comes_back_after_mutated_sessions_on_many_threads(tmp_path):
    """After 240 fuzzed sessions (``varnet bench soak``'s malformed streams of an 8-coil scan
    with 1.5 MB slices, seed fixed) from 8 client threads, the idle server's resident size is within
    24 MB of its resting value.

    Every connection runs on new threads (the session's and its reader's). glibc gives concurrent
    threads arenas of their own, and the top of a thread arena is returned neither by ``malloc_trim``
    (main arena only) nor, with the raised trim threshold, by ``free``: each arena kept the largest top
    any of its sessions left. :func:`keep_freed_memory` now limits malloc to the main arena, whose free
    memory the server's rest returns; with the arena limit removed the test fails (checked)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VARNET_KEEP_FREED_MEMORY", "MALLOC_ARENA_MAX")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    log = tmp_path / "server.log"  # the failed sessions are logged there, not in the test output
    with open(log, "w") as err:
        server = subprocess.Popen([sys.executable, "-c", _SERVER_PROBE], cwd=root, env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    try:
        applied = server.stdout.readline().strip()
        if applied == "False":
            pytest.skip("glibc's mallopt only")
        assert applied == "True", f"the server did not start:\n{log.read_text()}"
        port = int(server.stdout.readline())

        def resting_mb() -> float:
            server.stdin.write("rss\n")
            server.stdin.flush()
            return float(server.stdout.readline())

        scan = build_good_scan("mrd", slices=3, coils=8, size=(128, 96))
        case = SoakCase(client_timeout=30.0)
        good = Plan("good", "whole-scan", scan.stream(), "read")
        for _ in range(2):  # code paths and sizes first
            assert run_client(good, port, case).images == scan.slices
        before = resting_mb()
        todo, lock, outcomes = iter(range(240)), threading.Lock(), []

        def client():
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                plan = draw_plan(scan, random.Random(f"mutated-{i}"), {"malformed": 1})
                outcomes.append(run_client(plan, port, case))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert run_client(good, port, case).images == scan.slices
        after = resting_mb()
        with open(f"/proc/{server.pid}/status") as f:
            peak = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    finally:
        server.kill()
        server.wait(10)
    assert len(outcomes) == 240
    assert sum(o.images for o in outcomes) > 100 and sum(o.error_reply for o in outcomes) > 100
    assert peak - before > 40  # the sessions did hold memory
    assert after - before < 24, f"resting {before:.0f} MB, after 240 mutated sessions {after:.0f} MB"
