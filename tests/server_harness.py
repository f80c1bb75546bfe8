"""Test harness: a running ReconService on an ephemeral port, and clients that behave like
python-ismrmrd-server's client.py, gadgetron_ismrmrd_client and Gadgetron's external channel."""
from __future__ import annotations

import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from gadget.converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd
from gadget.converters.simulate import simulate_volume, write_fastmri
from gadget.data.mrd_file import iter_acquisitions, read_header_xml
from gadget.server import ReconService
from gadget.stream.codec import MessageId, MessageReader, MessageWriter
from gadget.stream.types import AcqLine


def make_scan(tmp: Path, slices=3, coils=4, size=(32, 24), seed=5, accel=4, cf=0.125):
    """A raw ISMRMRD scan (noise + undersampled lines) from a simulated volume: (xml, lines, path)."""
    vol = simulate_volume(num_slices=slices, num_coils=coils, recon_size=size, seed=seed)
    write_fastmri(tmp / f"v{seed}.h5", vol)
    raw = tmp / f"raw{seed}.h5"
    convert_fastmri_to_ismrmrd(tmp / f"v{seed}.h5", raw, "equispaced-fraction", accel, cf, seed=1)
    lines = [AcqLine(h, d) for c in iter_acquisitions(raw) for h, d in zip(c.heads, c.data)]
    return read_header_xml(raw), lines, raw


@contextmanager
def running(service: ReconService, dialect="mrd"):
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=service.serve, kwargs=dict(host="127.0.0.1", port=0, dialect=dialect,
                                                                 ready=ready, stop=stop), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield service.address[1]
    finally:
        stop.set()
        thread.join(5)


def connect(port: int, timeout: float = 20.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_until_close(sock: socket.socket) -> list:
    reader, out = MessageReader(sock), []
    while True:
        try:
            msg = reader.read()
        except OSError:
            break
        if msg is None:
            break
        out.append(msg)
        if msg.id == MessageId.CLOSE:
            break
    return out


def send_scan(sock, xml, lines, config_file="default", nul=True, config_text=None, json_text=None, close=True):
    w = MessageWriter(sock, nul_terminate=nul)
    if config_file is not None:
        w.config_file(config_file)
    if config_text is not None:
        w.config_text(config_text)
    if json_text is not None:
        w.text(json_text)
    w.header(xml)
    for ln in lines:
        w.acquisition(ln)
    if close:
        w.close()


def images_of(msgs) -> list:
    return [m.payload for m in msgs if m.id == MessageId.IMAGE]


def texts_of(msgs, kind=MessageId.TEXT) -> list[str]:
    return [m.payload for m in msgs if m.id == kind]


def pixels(img) -> np.ndarray:
    return np.asarray(img.data, np.float32).squeeze()
