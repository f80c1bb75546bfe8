"""The MRD server and the Gadgetron listener: protocol behaviour, streaming, concurrency, reliability."""
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gadget.model.varnet import VarNet
from gadget.recon.config import ReconConfig
from gadget.recon.engine import Reconstructor
from gadget.replay import replay_file
from gadget.server import GADGETRON, MRD, ReconService, dialect_named
from gadget.stream.codec import MessageId, MessageWriter
from gadget.stream.types import AcqLine
from tests.server_harness import (connect, images_of, make_scan, pixels, read_until_close, running, send_scan,
                                  texts_of)

_PRESETS = Path(__file__).resolve().parents[1] / "pipelines"
SMALL = dict(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2)


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    return make_scan(tmp_path_factory.mktemp("scan"))


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Reconstructor(VarNet(**SMALL), "cpu")


@pytest.fixture(scope="module")
def server(engine):
    from gadget.recon.batching import BatchingEngine

    shared = BatchingEngine(engine, max_batch=4)  # as `varnet serve` runs it
    service = ReconService(ReconConfig(checkpoint="model.pt"), shared, "test-model", idle_timeout=3.0,
                           max_message_bytes=64 << 20)
    with running(service) as port:
        yield port
    shared.close()


def _good_scan_works(port, scan):
    xml, lines, _ = scan
    with connect(port) as s:
        send_scan(s, xml, lines)
        msgs = read_until_close(s)
    imgs = images_of(msgs)
    assert [i.image_index for i in imgs] == [1, 2, 3] and msgs[-1].id == MessageId.CLOSE
    return imgs


def test_python_ismrmrd_server_style_client(server, scan):
    """client.py sends CONFIG_FILE, NUL-terminated header, acquisitions, CLOSE; gets one image per slice."""
    imgs = _good_scan_works(server, scan)
    assert [i.slice for i in imgs] == [0, 1, 2]
    assert len({i.image_series_index for i in imgs}) == 1
    assert all(np.isfinite(pixels(i)).all() and pixels(i).shape == (24, 32) for i in imgs)


def test_server_images_equal_replay_images(server, scan, engine):
    xml, lines, raw = scan
    served = _good_scan_works(server, scan)
    replayed = replay_file(raw, ReconConfig(checkpoint="model.pt"), engine).images
    for a, b in zip(served, replayed):
        np.testing.assert_allclose(pixels(a), pixels(b), rtol=1e-6, atol=0)


def test_gadgetron_ismrmrd_client_style(server, scan):
    """No NUL terminators, a chain file name as CONFIG_FILE; plus the noise-dependency query
    connection that sends only a config and CLOSE and must get CLOSE."""
    with connect(server) as s:
        w = MessageWriter(s)
        w.config_file("default.xml")
        w.close()
        assert [m.id for m in read_until_close(s)] == [MessageId.CLOSE]
    xml, lines, _ = scan
    with connect(server) as s:
        send_scan(s, xml, lines, config_file="default.xml", nul=False)
        msgs = read_until_close(s)
    assert len(images_of(msgs)) == 3 and not any(m.id == MessageId.ACQUISITION for m in msgs)


def test_images_stream_as_slices_complete(server, scan):
    """The first image arrives before the client has sent the second slice."""
    _first_image_before_second_slice(server, scan)


def test_images_stream_as_slices_complete_with_workers(engine, scan):
    """The same with the operator's ``workers: 2``: a slice's image does not wait for the next slice."""
    service = ReconService(ReconConfig(checkpoint="model.pt", workers=2), engine, "test-model", idle_timeout=3.0,
                           max_message_bytes=64 << 20)
    with running(service) as port:
        _first_image_before_second_slice(port, scan)


def _first_image_before_second_slice(port, scan):
    xml, lines, _ = scan
    first_slice = [ln for ln in lines if ln.has_flag(19) or int(ln.head["idx"]["slice"]) == 0]
    rest = [ln for ln in lines if not ln.has_flag(19) and int(ln.head["idx"]["slice"]) > 0]
    with connect(port) as s:
        send_scan(s, xml, first_slice, close=False)
        from gadget.stream.codec import MessageReader

        msg = MessageReader(s).read()
        assert msg.id == MessageId.IMAGE and msg.payload.slice == 0
        w = MessageWriter(s)
        for ln in rest:
            w.acquisition(ln)
        w.close()
        assert len(images_of(read_until_close(s))) == 2


class _HeldEngine:
    """Stands in for the model: its first call waits until the client has sent the whole scan."""
    device = "cpu"
    checkpoint_refine = "none"  # refine: auto applies no refinement to its images

    def __init__(self, released: threading.Event):
        self.released, self.calls, self.saw_whole_scan = released, 0, None

    def run(self, kspace, mask, num_low=None):
        self.calls += 1
        if self.calls == 1:
            self.saw_whole_scan = self.released.wait(30)
        return np.zeros((kspace.shape[0],) + kspace.shape[2:], np.float32), np.zeros_like(kspace)


def test_later_slices_stream_in_while_a_slice_is_reconstructed():
    """Acquisition and reconstruction overlap: with the model busy on slice 0, the server keeps
    receiving slices 1 and 2 (17 MB each, more than loopback's socket buffers hold), so the client's
    sendall of the whole scan finishes before the first reconstruction does."""
    from gadget.bench.ingest_bench import LINES_PER_SLICE, build_stream

    coils, samples, slices = 32, 512, 3
    stream = build_stream(slices * LINES_PER_SLICE, coils, samples)  # HEADER, fully sampled slices, CLOSE
    sent = threading.Event()
    held = _HeldEngine(sent)
    # the slices are fully sampled: fully_sampled_below=1 still sends them through the (held) model
    config = ReconConfig(checkpoint="model.pt", fully_sampled_below=1.0, fallback="none")
    service = ReconService(config, held, "held", idle_timeout=60.0)
    with running(service) as port, connect(port, timeout=60) as s:
        MessageWriter(s).config_file("default")

        def send():
            s.sendall(stream)
            sent.set()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = images_of(read_until_close(s))
        sender.join(5)
    assert held.saw_whole_scan is True
    assert [img.slice for img in got] == list(range(slices))


def test_presets_json_and_yaml_configure_a_scan(server, scan):
    xml, lines, _ = scan
    with connect(server) as s:
        send_scan(s, xml, lines, config_file="zero-filled")
        imgs = images_of(read_until_close(s))
    assert imgs[0].image_series_index == 2 and "ZEROFILLED" in imgs[0].meta["ImageProcessingHistory"]
    with connect(server) as s:
        send_scan(s, xml, lines, json_text='{"parameters": {"image_dtype": "uint16", "image_series_index": 7}}')
        imgs = images_of(read_until_close(s))
    assert imgs[0].data.dtype == np.uint16 and imgs[0].image_series_index == 7
    with connect(server) as s:
        send_scan(s, xml, lines, config_file=None, config_text="mode: zero-filled\nseries_description: zf\n")
        imgs = images_of(read_until_close(s))
    assert imgs[0].meta["SeriesDescription"] == "zf"


def test_eight_concurrent_scans_each_get_every_slice(server, tmp_path):
    scans = [make_scan(tmp_path, slices=2 + i % 3, seed=20 + i) for i in range(8)]
    results = [None] * 8

    def client(i):
        xml, lines, _ = scans[i]
        with connect(server, timeout=120) as s:
            send_scan(s, xml, lines)
            results[i] = read_until_close(s)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for i, msgs in enumerate(results):
        imgs = images_of(msgs)
        assert len(imgs) == 2 + i % 3, f"scan {i}"
        assert sorted(im.slice for im in imgs) == list(range(2 + i % 3))
        assert len({im.image_index for im in imgs}) == len(imgs)


# ------------------------------------------------------------------------ reliability catalog

def _raw(*parts):
    return b"".join(parts)


def _u16(v):
    return struct.pack("<H", v)


def _u32(v):
    return struct.pack("<I", v)


def _line_variant(line: AcqLine, **changes) -> AcqLine:
    head, data = line.head.copy(), line.data.copy()
    for key, value in changes.items():
        if key == "data":
            data = value
        elif key in ("kspace_encode_step_1",):
            head["idx"][key] = value
        else:
            head[key] = value
    return AcqLine(head, data)


def _imaging(lines):
    return [ln for ln in lines if not ln.has_flag(19)]


def _cases(scan):
    xml, lines, _ = scan
    img = _imaging(lines)
    first = img[0]
    no_last = [_line_variant(ln, flags=int(ln.head["flags"]) & ~((1 << 7) | (1 << 24))) for ln in img]
    no_acs = [_line_variant(ln, flags=0) for ln in img
              if int(ln.head["idx"]["kspace_encode_step_1"]) != 12]
    return {
        # name: (actions, expected text in the reply, expect images?)
        "truncated header message": ([("bytes", _u16(3) + _u32(100) + b"<ismrmrd"), ("shutdown",)], "closed", 0),
        "unknown message id": ([("bytes", _u16(999))], "999", 0),
        "absurd header length": ([("bytes", _u16(3) + _u32(2**31))], "2147483648", 0),
        "XML garbage header": ([("header", "<ismrmrdHeader><encoding><<<")], "not valid XML", 0),
        "header without encoding": ([("header", '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"/>')],
                                    "lacks field 'encoding'", 0),
        "channels change mid-slice": ([("header", xml), ("lines", [first, _line_variant(img[1], data=img[1].data[:2])]),
                                       ("close",)], "channels", 0),
        "samples change mid-slice": ([("header", xml), ("lines", [first, _line_variant(img[1], data=img[1].data[:, :32])]),
                                      ("close",)], "samples", 0),
        "NaN data": ([("header", xml), ("lines", [_line_variant(first, data=first.data * np.nan)]), ("close",)],
                     "NaN", 0),
        "Inf data": ([("header", xml), ("lines", [_line_variant(first, data=first.data + np.inf)]), ("close",)],
                     "Inf", 0),
        "encode step beyond limits": ([("header", xml), ("lines", [_line_variant(first, kspace_encode_step_1=500)]),
                                       ("close",)], "outside the encoding limits", 0),
        "zero channels": ([("header", xml), ("lines", [_line_variant(first, data=first.data[:0])]), ("close",)],
                          "empty data", 0),
        "compressed flag": ([("header", xml), ("bytes", _u16(1008) + _line_variant(first, flags=1 << 52).head.tobytes()
                                                + first.data.tobytes()), ("close",)], "compress", 0),
        "no ACS lines": ([("header", xml), ("lines", no_acs), ("close",)], "no calibration (ACS) lines", 0),
        "no LAST flags": ([("header", xml), ("lines", no_last), ("close",)], "never marked complete", 3),
        "empty scan": ([("header", xml), ("close",)], "no imaging acquisitions", 0),
        "acquisition before HEADER": ([("lines", [first])], "before HEADER", 0),
        "disconnect mid-slice": ([("header", xml), ("lines", img[:2]), ("shutdown",)], None, 0),
        "idle after header": ([("header", xml), ("lines", img[:3])], "timed out", 0),
        "preset path traversal": ([("config_file", "../../etc/passwd"), ("header", xml)], "unknown preset", 0),
        "preset names a YAML file": ([("config_file", str(_PRESETS / "default.yaml")), ("header", xml)],
                                     "unknown preset", 0),
        "invalid YAML config": ([("config_text", "mode: [unclosed"), ("header", xml)], "not valid YAML", 0),
        "unknown JSON parameter": ([("json", '{"batchsize": 2}'), ("header", xml)], "unknown setting 'batchsize'", 0),
        "client names a checkpoint": ([("json", '{"checkpoint": "/etc/shadow"}'), ("header", xml)],
                                      "cannot be set by a client", 0),
        "bad value type": ([("json", '{"image_dtype": "int16"}'), ("header", xml)], "must be one of", 0),
        "acquisition larger than cap": ([("header", xml), ("bytes", _u16(1008) + _line_variant(
            first, number_of_samples=65535, active_channels=65535).head.tobytes())], "implausible acquisition", 0),
    }


def _play(port, actions, idle_wait=False):
    s = connect(port, timeout=20)
    w = MessageWriter(s, nul_terminate=True)
    for action in actions:
        kind = action[0]
        if kind == "bytes":
            s.sendall(action[1])
        elif kind == "header":
            w.header(action[1])
        elif kind == "lines":
            for ln in action[1]:
                w.acquisition(ln)
        elif kind == "close":
            w.close()
        elif kind == "shutdown":
            s.shutdown(socket.SHUT_WR)
        elif kind == "config_file":
            w.config_file(action[1])
        elif kind == "config_text":
            w.config_text(action[1])
        elif kind == "json":
            w.text(action[1])
    msgs = read_until_close(s)
    s.close()
    return msgs


def test_reliability_catalog(server, scan):
    import gc
    import tracemalloc

    cases = _cases(scan)
    assert len(cases) >= 20
    _good_scan_works(server, scan)  # warm caches before the memory baseline
    gc.collect()
    tracemalloc.start()
    baseline_memory = tracemalloc.get_traced_memory()[0]
    baseline_threads = threading.active_count()
    for name, (actions, expected, n_images) in cases.items():
        t0 = time.perf_counter()
        msgs = _play(server, actions)
        elapsed = time.perf_counter() - t0
        assert elapsed < 15, f"{name}: took {elapsed:.1f} s"
        texts = " | ".join(texts_of(msgs))
        if expected is not None:
            assert expected in texts, f"{name}: reply was {texts!r}"
        assert len(images_of(msgs)) == n_images, name
        if msgs:
            assert msgs[-1].id == MessageId.CLOSE, f"{name}: no CLOSE"
        # the server still serves a good scan correctly
        _good_scan_works(server, scan)
    deadline = time.time() + 10
    while threading.active_count() > baseline_threads and time.time() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= baseline_threads
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - baseline_memory
    tracemalloc.stop()
    print(f"memory held after the catalog: {grown / 2**20:.2f} MiB")
    assert grown < 8 << 20, f"{grown / 2**20:.1f} MiB still held after the catalog"


# ------------------------------------------------------------------------ Gadgetron dialect

GADGETRON_CONFIG = ('<?xml version="1.0"?><configuration><property name="batch_size" value="2"/>'
                    '<property name="mode" value="zero-filled"/></configuration>')


def test_gadgetron_listener_dialect(scan):
    xml, lines, _ = scan
    service = ReconService(ReconConfig(mode="zero-filled"), None, "none", idle_timeout=3.0)
    with running(service, dialect="gadgetron") as port:
        for _ in range(2):  # scan after scan on one listener
            with connect(port) as s:
                send_scan(s, xml, lines, config_file=None, config_text=GADGETRON_CONFIG, nul=True)
                msgs = read_until_close(s)
            assert len(images_of(msgs)) == 3 and msgs[-1].id == MessageId.CLOSE
        with connect(port) as s:  # a failure is ERROR(8) then CLOSE, never TEXT(5)
            send_scan(s, xml, [_line_variant(_imaging(lines)[0], kspace_encode_step_1=500)], config_file=None,
                      config_text=GADGETRON_CONFIG)
            msgs = read_until_close(s)
        assert [m.id for m in msgs] == [MessageId.ERROR, MessageId.CLOSE]
        assert "outside the encoding limits" in msgs[0].payload


def test_dialects_are_looked_up_by_name_and_an_unknown_name_is_refused_before_listening():
    assert dialect_named("mrd") is MRD and dialect_named("gadgetron") is GADGETRON
    assert dialect_named(GADGETRON) is GADGETRON
    service = ReconService(ReconConfig(mode="zero-filled"), None, "none")
    with pytest.raises(ValueError, match="unknown dialect 'fire': choose one of 'mrd', 'gadgetron'"):
        service.serve(port=0, dialect="fire")
    assert not hasattr(service, "address")  # refused before a port was bound
