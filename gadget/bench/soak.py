"""``varnet bench soak``: thousands of mixed connections against one server process, and its memory.

The server runs as a subprocess (``python -m gadget.cli serve``); its resident set is read from
``/proc/<pid>/status`` (``VmRSS``, and ``VmHWM`` for the kernel's own peak), never the client's.
Sequence: start the server, wait until it accepts, send one warm-up good scan (the model may load
lazily), settle, read the resting RSS *before*; run ``connections`` connections from ``concurrency``
client threads (kinds and streams in :mod:`gadget.bench.soak_streams`) while a sampler thread records
(elapsed s, connections done, RSS MB) every ``sample_interval``; then one more good scan (it must come
back with one image per slice), settle, read the resting RSS *after*.

Every client socket has a timeout, so the benchmark cannot hang on a server that stops answering.
The report lists per kind what was sent and what came back, RSS before / peak / after and the RSS at
each tenth of the connections; :attr:`SoakReport.failures` says why the soak failed, if it did (the
server died, a good scan came back wrong, the final scan failed).
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..stream.codec import MessageId, MessageReader, ProtocolError, TruncatedMessage
from .soak_streams import DEFAULT_MIX, GoodScan, Plan, build_good_scan, draw_plan
from .table import markdown_table

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SoakCase:
    """What to run. ``env``: extra environment of the server process (e.g. ``MALLOC_ARENA_MAX``)."""

    connections: int = 8000
    concurrency: int = 8
    dialect: str = "mrd"
    checkpoint: Optional[str] = None
    seed: int = 0
    stall_seconds: float = 2.0
    settle_seconds: float = 5.0
    idle_timeout: float = 3.0
    client_timeout: float = 60.0
    sample_interval: float = 0.5
    start_timeout: float = 180.0
    env: dict = field(default_factory=dict)
    mix: dict = field(default_factory=lambda: dict(DEFAULT_MIX))


@dataclass
class Outcome:
    """What one connection saw. ``end``: ``close`` (CLOSE received), ``eof`` (the server closed or
    reset without CLOSE), ``held`` (a stalling client heard nothing until its stall ended),
    ``timeout`` (no reply within the client timeout) or ``client-error`` (an unexpected reply)."""

    kind: str
    variant: str
    images: int = 0
    error_reply: bool = False
    end: str = "close"
    detail: str = ""


@dataclass
class SoakReport:
    case: dict
    slices: int
    server_pid: int
    seconds: float = 0.0
    done: int = 0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    peak_sampled_mb: float = 0.0
    hwm_mb: float = 0.0
    kinds: dict = field(default_factory=dict)      # kind -> counts
    variants: dict = field(default_factory=dict)   # "kind/variant" -> counts
    deciles: list = field(default_factory=list)    # [percent, done, elapsed s, RSS MB]
    samples: list = field(default_factory=list)    # [elapsed s, done, RSS MB]
    alive_at_end: bool = False
    server_tracebacks: int = 0
    failures: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class ServerProcess:
    """``python -m gadget.cli serve`` on a free local port, its log in ``workdir/server.log``."""

    def __init__(self, case: SoakCase, workdir: Path):
        self.port = _free_port()
        cmd = [sys.executable, "-m", "gadget.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--idle-timeout", str(case.idle_timeout)]
        if case.dialect == "gadgetron":
            cmd.append("--gadgetron")
        if case.checkpoint:
            cmd += ["--checkpoint", str(case.checkpoint)]
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **case.env}, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the server exited with status {self.proc.returncode} before accepting "
                                   f"connections:\n{self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1.0).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the server did not accept connections within {timeout:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def memory_mb(self) -> tuple[float, float]:
        """``(VmRSS, VmHWM)`` of the server process in MB; ``(0, 0)`` once it is gone."""
        values = {}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        key, kb, _ = line.split()
                        values[key[:-1]] = int(kb) / 1024
        except (FileNotFoundError, ProcessLookupError):
            pass
        return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def tracebacks(self) -> int:
        self._log.flush()
        return self.log_path.read_text(errors="replace").count("Traceback (most recent call last)")

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)  # varnet serve stops on KeyboardInterrupt
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------------------------- one client

def run_client(plan: Plan, port: int, case: SoakCase) -> Outcome:
    """Open a connection, send ``plan.payload``, behave as ``plan.after`` says; never raises."""
    out = Outcome(plan.kind, plan.variant)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=case.client_timeout)
    except OSError as exc:
        out.end, out.detail = "client-error", f"connect: {exc}"
        return out
    with sock:
        try:
            if plan.payload:
                sock.sendall(plan.payload)
        except OSError as exc:  # the server gave up on the stream early; its reply may still be readable
            out.detail = f"send: {type(exc).__name__}"
        if plan.after == "close":
            out.end = "eof"
            return out
        if plan.after == "half-close":
            _quietly(lambda: sock.shutdown(socket.SHUT_WR))
        sock.settimeout(max(case.stall_seconds, 1e-3) if plan.after == "stall" else case.client_timeout)
        _read_replies(sock, out, stalling=plan.after == "stall")
    return out


def _read_replies(sock: socket.socket, out: Outcome, stalling: bool) -> None:
    reader = MessageReader(sock)
    try:
        while True:
            msg = reader.read()
            if msg is None:
                out.end = "eof"
                return
            if msg.id == MessageId.IMAGE:
                out.images += 1
            elif msg.id == MessageId.ERROR or (msg.id == MessageId.TEXT and msg.payload.startswith("ERROR")):
                out.error_reply = True
            elif msg.id == MessageId.CLOSE:
                out.end = "close"
                return
    except TimeoutError:
        out.end = "held" if stalling else "timeout"
    except (OSError, TruncatedMessage):  # reset by the server, or its last message cut short
        out.end = "eof"
    except ProtocolError as exc:  # an undecodable reply is a finding, not a crash of the benchmark
        out.end, out.detail = "client-error", f"{type(exc).__name__}: {exc}"


def _quietly(fn) -> None:
    try:
        fn()
    except OSError:
        pass


def good_scan_ok(outcome: Outcome, slices: int) -> bool:
    return outcome.images == slices and outcome.end == "close" and not outcome.error_reply


# -------------------------------------------------------------------------------------- the soak

class _Tally:
    """Counts outcomes per kind and variant, and the RSS at each tenth of the connections."""

    COLUMNS = ("sent", "images", "error_replies", "close", "eof", "held", "timeout", "client_error",
               "good_wrong")

    def __init__(self, total: int, slices: int, server: ServerProcess, started: float, log=None):
        self.total, self.slices, self.server, self.started, self.log = total, slices, server, started, log
        self.kinds: dict[str, Counter] = {}
        self.variants: dict[str, Counter] = {}
        self.deciles: list = []
        self.done = 0
        self.lock = threading.Lock()

    def add(self, out: Outcome) -> None:
        with self.lock:
            for table, key in ((self.kinds, out.kind), (self.variants, f"{out.kind}/{out.variant}")):
                c = table.setdefault(key, Counter({k: 0 for k in self.COLUMNS}))
                c["sent"] += 1
                c["images"] += out.images
                c["error_replies"] += out.error_reply
                c[out.end.replace("-", "_")] += 1
                if out.kind == "good" and not good_scan_ok(out, self.slices):
                    c["good_wrong"] += 1
            self.done += 1
            next_tenth = len(self.deciles) + 1
            if self.done >= self.total * next_tenth / 10:
                self.deciles.append([10 * next_tenth, self.done, round(time.monotonic() - self.started, 1),
                                     round(self.server.memory_mb()[0], 1)])
                if self.log:
                    self.log("soak: {}% ({} connections) at {} s, server RSS {} MB".format(*self.deciles[-1]))


def run_soak(case: SoakCase, log=print) -> SoakReport:
    """Run the soak described by ``case``; ``log`` gets one line per phase."""
    from ..server import dialect_named

    dialect_named(case.dialect)  # the server's names: an unknown one is a ValueError naming them
    scan = build_good_scan(case.dialect)
    with tempfile.TemporaryDirectory(prefix="varnet-soak-") as tmp:
        server = ServerProcess(case, Path(tmp))
        report = SoakReport(case=asdict(case), slices=scan.slices, server_pid=server.pid)
        try:
            server.wait_ready(case.start_timeout)
            log(f"soak: server pid {server.pid} on port {server.port} ({case.dialect}); warm-up scan")
            _storm(case, scan, server, report, log)
        finally:
            report.server_tracebacks = server.tracebacks()
            if report.failures:
                report.failures.append("server log tail:\n" + server.log_tail())
            server.stop()
    return report


def _good(scan: GoodScan, port: int, case: SoakCase) -> Outcome:
    return run_client(Plan("good", "whole-scan", scan.stream(), "read"), port, case)


def _storm(case: SoakCase, scan: GoodScan, server: ServerProcess, report: SoakReport, log) -> None:
    warm = _good(scan, server.port, case)
    if not good_scan_ok(warm, scan.slices):
        report.failures.append(f"warm-up good scan failed: {warm}")
        return
    time.sleep(case.settle_seconds)
    report.rss_before_mb = round(server.memory_mb()[0], 1)
    log(f"soak: resting RSS before {report.rss_before_mb} MB; {case.connections} connections from "
        f"{case.concurrency} threads")

    started = time.monotonic()
    tally = _Tally(case.connections, scan.slices, server, started, log)
    stop = threading.Event()
    next_index = iter(range(case.connections))
    index_lock = threading.Lock()

    def client_thread() -> None:
        while not stop.is_set():
            with index_lock:
                i = next(next_index, None)
            if i is None:
                return
            plan = draw_plan(scan, random.Random(f"{case.seed}-{i}"), case.mix)
            tally.add(run_client(plan, server.port, case))

    def sampler() -> None:
        while not stop.is_set():
            rss = server.memory_mb()[0]
            report.samples.append([round(time.monotonic() - started, 2), tally.done, round(rss, 1)])
            if not server.alive():
                stop.set()
                return
            stop.wait(case.sample_interval)

    threads = [threading.Thread(target=client_thread, daemon=True) for _ in range(case.concurrency)]
    watch = threading.Thread(target=sampler, daemon=True)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watch.join()
    report.seconds = round(time.monotonic() - started, 1)
    report.done = tally.done
    report.kinds = {k: dict(v) for k, v in sorted(tally.kinds.items())}
    report.variants = {k: dict(v) for k, v in sorted(tally.variants.items())}
    report.deciles = tally.deciles
    report.peak_sampled_mb = max((s[2] for s in report.samples), default=0.0)
    if not server.alive():
        report.failures.append(f"the server process died (exit status {server.proc.returncode}) after "
                               f"{tally.done} connections")
        return
    wrong = report.kinds.get("good", {}).get("good_wrong", 0)
    if wrong:
        report.failures.append(f"{wrong} good scan(s) did not come back with {scan.slices} images and CLOSE")
    log(f"soak: {tally.done} connections in {report.seconds} s; final good scan")
    final = _good(scan, server.port, case)
    if not good_scan_ok(final, scan.slices):
        report.failures.append(f"the final good scan failed: {final}")
    time.sleep(case.settle_seconds)
    report.rss_after_mb, report.hwm_mb = (round(v, 1) for v in server.memory_mb())
    report.alive_at_end = server.alive()
    if not report.alive_at_end:
        report.failures.append(f"the server process died (exit status {server.proc.returncode}) at the end")


# -------------------------------------------------------------------------------------- the table

def format_table(report: SoakReport) -> str:
    c = report.case
    head = (f"soak: {report.done}/{c['connections']} connections, {c['concurrency']} client threads, "
            f"{c['dialect']} dialect, model {c['checkpoint'] or 'shipped'}, stall {c['stall_seconds']} s, "
            f"idle-timeout {c['idle_timeout']} s, seed {c['seed']}, env {c['env'] or '-'}; "
            f"{report.seconds} s, server pid {report.server_pid}")
    cols = _Tally.COLUMNS
    kinds = markdown_table(("kind", *cols), [(k, *(str(v[col]) for col in cols))
                                             for k, v in report.kinds.items()])
    memory = markdown_table(("server RSS", "MB"), [
        ("resting before (after warm-up + settle)", f"{report.rss_before_mb:.1f}"),
        ("peak sampled during the soak", f"{report.peak_sampled_mb:.1f}"),
        ("peak VmHWM (whole process life)", f"{report.hwm_mb:.1f}"),
        ("resting after (final scan + settle)", f"{report.rss_after_mb:.1f}"),
    ])
    tenths = markdown_table(("connections done", "%", "elapsed s", "RSS MB"),
                            [(str(d), str(p), f"{s:.1f}", f"{r:.1f}") for p, d, s, r in report.deciles])
    notes = [f"server tracebacks in its log: {report.server_tracebacks}",
             "columns: error_replies = TEXT 'ERROR…' or ERROR(8) received; close/eof/held/timeout = how the "
             "connection ended (CLOSE; closed or reset without CLOSE; a stalling client heard nothing until "
             "its stall ended; no reply within the client timeout); good_wrong = good scans without one "
             "image per slice and CLOSE"]
    return "\n\n".join([head, kinds, memory, tenths, "\n".join(notes)])
