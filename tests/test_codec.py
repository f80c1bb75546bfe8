"""MRD v1 wire codec: round trips, byte equality with ismrmrd's serializer, malformed streams."""
from __future__ import annotations

import io
import socket
import struct
import threading

import ismrmrd
import numpy as np
import pytest
from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolDeserializer, ProtocolSerializer
from ismrmrd.xsd import CreateFromDocument

from gadget.data.mrd_file import HEADER_DTYPE, flag_mask
from gadget.stream.codec import (ACQ_HEADER_BYTES, Message, MessageId, MessageReader, MessageWriter,
                                 ProtocolError, ReadTimeout, TruncatedMessage)
from gadget.stream.types import AcqLine, make_head
from tests.mrd_builders import header as build_header


class Sink:
    """``sendall`` into a BytesIO."""

    def __init__(self):
        self.buffer = io.BytesIO()

    def sendall(self, data) -> None:
        self.buffer.write(data)

    def getvalue(self) -> bytes:
        return self.buffer.getvalue()


def encode(fn) -> bytes:
    sink = Sink()
    fn(MessageWriter(sink))
    return sink.getvalue()


def ismrmrd_bytes(*objects, close=False) -> bytes:
    stream = io.BytesIO()
    ser = ProtocolSerializer(stream)
    for obj in objects:
        ser.serialize(obj)
    if close:
        ser.close()
    return stream.getvalue()


def read_all(data: bytes, **kwargs) -> list[Message]:
    reader = MessageReader.from_bytes(data, **kwargs)
    out = []
    while (msg := reader.read()) is not None:
        out.append(msg)
    return out


def cplx(rng, shape):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


@pytest.fixture
def rng():
    return np.random.default_rng(42)


@pytest.fixture(scope="module")
def xml_header():
    return CreateFromDocument(build_header())


def acq_line(rng, channels=4, samples=32, traj_dims=0, **fields) -> AcqLine:
    head = make_head(number_of_samples=samples, active_channels=channels, available_channels=channels,
                     trajectory_dimensions=traj_dims, center_sample=samples // 2, **fields)
    traj = rng.standard_normal((samples, traj_dims)).astype(np.float32) if traj_dims else None
    return AcqLine(head, cplx(rng, (channels, samples)), traj)


def ismrmrd_acq(rng, channels=4, samples=32, traj_dims=0) -> ismrmrd.Acquisition:
    traj = rng.standard_normal((samples, traj_dims)).astype(np.float32) if traj_dims else None
    acq = ismrmrd.Acquisition.from_array(cplx(rng, (channels, samples)), traj, scan_counter=7,
                                         flags=flag_mask(8, 25), center_sample=samples // 2)
    acq.idx.kspace_encode_step_1 = 11
    acq.idx.slice = 2
    return acq


def make_image(rng, dtype=np.float32, shape=(2, 3, 5), meta=None) -> ismrmrd.Image:
    values = rng.standard_normal(shape) * 100
    if np.dtype(dtype).kind == "c":
        values = values + 1j * rng.standard_normal(shape)
    img = ismrmrd.Image.from_array(np.abs(values).astype(dtype) if np.dtype(dtype).kind == "u"
                                   else values.astype(dtype), image_index=3, image_series_index=1, slice=2)
    for key, value in (meta or {}).items():
        img.meta[key] = value
    return img


def make_waveform(rng) -> ismrmrd.Waveform:
    return ismrmrd.Waveform.from_array(rng.integers(0, 2**32, (3, 17), dtype=np.uint32), waveform_id=2,
                                       scan_counter=5)


def assert_acq_equal(line: AcqLine, acq) -> None:
    ref = acq if isinstance(acq, AcqLine) else AcqLine.from_ismrmrd(acq)
    assert line.head.tobytes() == ref.head.tobytes()
    np.testing.assert_array_equal(line.data, ref.data)
    if ref.traj is None or ref.traj.size == 0:
        assert line.traj is None
    else:
        np.testing.assert_array_equal(line.traj, ref.traj)


def assert_image_equal(a: ismrmrd.Image, b: ismrmrd.Image) -> None:
    heads = [a.getHead(), b.getHead()]
    for head in heads:  # set only when serialized
        head.attribute_string_len = 0
    assert bytes(heads[0]) == bytes(heads[1])
    assert a.data.dtype == b.data.dtype
    np.testing.assert_array_equal(a.data, b.data)
    assert dict(a.meta) == dict(b.meta)


# ---------------------------------------------------------------- round trips over a socketpair
def test_round_trip_every_message_type_over_socketpair(rng, xml_header):
    lines = [acq_line(rng), acq_line(rng, 8, 64, traj_dims=2, scan_counter=9)]
    big = acq_line(rng, 32, 512)  # larger than the socket buffer: needs the concurrent reader
    image, wave = make_image(rng, meta={"DataRole": "Image", "WindowCenter": "10"}), make_waveform(rng)

    def send(sock):
        w = MessageWriter(sock)
        w.config_file("default.xml")
        w.config_text("<configuration/>")
        w.header(xml_header)
        w.text("hello")
        w.error("it failed: ümlaut")
        for line in (*lines, big):
            w.acquisition(line)
        w.image(image)
        w.waveform(wave)
        w.close()

    a, b = socket.socketpair()
    with a, b:
        sender = threading.Thread(target=send, args=(a,))
        sender.start()
        msgs = list(MessageReader(b))
        sender.join()
    assert [m.id for m in msgs] == [MessageId.CONFIG_FILE, MessageId.CONFIG_TEXT, MessageId.HEADER,
                                    MessageId.TEXT, MessageId.ERROR] + [MessageId.ACQUISITION] * 3 + \
        [MessageId.IMAGE, MessageId.WAVEFORM, MessageId.CLOSE]
    assert [m.payload for m in msgs[:5]] == ["default.xml", "<configuration/>", xml_header.toXML(), "hello",
                                             "it failed: ümlaut"]
    for msg, line in zip(msgs[5:8], (*lines, big)):
        assert_acq_equal(msg.payload, line)
    assert_image_equal(msgs[8].payload, image)
    assert bytes(msgs[9].payload.getHead()) == bytes(wave.getHead())
    np.testing.assert_array_equal(msgs[9].payload.data, wave.data)
    assert msgs[10].payload is None


def test_clean_eof_returns_none_and_iteration_stops_at_close(rng):
    data = encode(lambda w: (w.text("a"), w.close(), w.text("after close")))
    reader = MessageReader.from_bytes(data)
    assert [m.id for m in reader] == [MessageId.TEXT, MessageId.CLOSE]
    assert reader.read().payload == "after close"
    assert reader.read() is None
    assert MessageReader.from_bytes(b"").read() is None


def test_payload_types_and_writable_head(rng):
    line = read_all(encode(lambda w: w.acquisition(acq_line(rng, 3, 10))))[0].payload
    assert isinstance(line, AcqLine) and line.head.dtype == HEADER_DTYPE
    assert line.data.dtype == np.complex64 and line.data.shape == (3, 10) and line.data.flags.writeable
    line.head["idx"]["slice"] = 4  # downstream stages edit heads in place
    assert line.idx["slice"] == 4 and line.traj is None


def test_write_dispatches_messages_as_read(rng):
    original = encode(lambda w: (w.header("<h/>"), w.acquisition(acq_line(rng)), w.close()))
    again = encode(lambda w: [w.write(m) for m in read_all(original)])
    assert again == original


# ------------------------------------------------------------- byte equality with ismrmrd
def test_bytes_equal_ismrmrd_serializer_for_text_messages(xml_header):
    assert encode(lambda w: w.config_file("default_measurement_dependencies.xml")) == \
        ismrmrd_bytes(ConfigFile("default_measurement_dependencies.xml"))
    assert encode(lambda w: w.config_text("<configuration/>")) == ismrmrd_bytes(ConfigText("<configuration/>"))
    assert encode(lambda w: w.header(xml_header)) == ismrmrd_bytes(xml_header)
    assert encode(lambda w: w.header(xml_header.toXML())) == ismrmrd_bytes(xml_header)
    assert encode(lambda w: w.text("plain text")) == ismrmrd_bytes("plain text")
    assert encode(lambda w: w.close()) == ismrmrd_bytes(close=True) == b"\x04\x00"


@pytest.mark.parametrize("traj_dims", [0, 3])
def test_bytes_equal_ismrmrd_serializer_for_acquisitions(rng, traj_dims):
    acq = ismrmrd_acq(rng, traj_dims=traj_dims)
    expected = ismrmrd_bytes(acq)
    assert encode(lambda w: w.acquisition(acq)) == expected
    assert encode(lambda w: w.acquisition(AcqLine.from_ismrmrd(acq))) == expected
    assert len(expected) == 2 + ACQ_HEADER_BYTES + 32 * traj_dims * 4 + 4 * 32 * 8


@pytest.mark.parametrize("dtype", [np.float32, np.complex64, np.uint16, np.int16, np.float64, np.uint32])
def test_bytes_equal_ismrmrd_serializer_for_images(rng, dtype):
    img = make_image(rng, dtype, meta={"DataRole": "Image", "ImageProcessingHistory": ["FFT", "VARNET"]})
    assert encode(lambda w: w.image(img)) == ismrmrd_bytes(img)


def test_bytes_equal_ismrmrd_serializer_for_waveforms(rng):
    wave = make_waveform(rng)
    assert encode(lambda w: w.waveform(wave)) == ismrmrd_bytes(wave)


def test_reader_parses_ismrmrd_serializer_output(rng, xml_header):
    acqs = [ismrmrd_acq(rng), ismrmrd_acq(rng, 2, 16, traj_dims=2)]
    img, wave = make_image(rng, np.complex64, meta={"A": "1"}), make_waveform(rng)
    data = ismrmrd_bytes(ConfigFile("cfg.xml"), ConfigText("<c/>"), xml_header, "txt", *acqs, img, wave,
                         close=True)
    msgs = read_all(data)
    assert [m.payload for m in msgs[:4]] == ["cfg.xml", "<c/>", xml_header.toXML(), "txt"]
    for msg, acq in zip(msgs[4:6], acqs):
        assert_acq_equal(msg.payload, acq)
    assert_image_equal(msgs[6].payload, img)
    np.testing.assert_array_equal(msgs[7].payload.data, wave.data)
    assert msgs[8].id == MessageId.CLOSE and len(msgs) == 9


def test_ismrmrd_deserializer_parses_our_output(rng, xml_header):
    line, img, wave = acq_line(rng, traj_dims=2), make_image(rng, meta={"B": "2"}), make_waveform(rng)
    data = encode(lambda w: (w.config_file("cfg.xml"), w.config_text("<c/>"), w.header(xml_header), w.text("t"),
                             w.acquisition(line), w.image(img), w.waveform(wave), w.close()))
    objs = list(ProtocolDeserializer(io.BytesIO(data)).deserialize())
    assert objs[:2] == ["cfg.xml", "<c/>"] and isinstance(objs[1], ConfigText)
    assert objs[2].toXML() == xml_header.toXML() and objs[3] == "t"
    assert_acq_equal(line, objs[4])
    assert_image_equal(objs[5], img)
    np.testing.assert_array_equal(objs[6].data, wave.data)
    assert len(objs) == 7  # the generator ends at CLOSE


def test_int_images_are_int32_on_the_wire(rng):
    img = ismrmrd.Image.from_array(np.arange(-6, 6).reshape(3, 4))  # ismrmrd-python holds INT as int64
    assert img.data_type == ismrmrd.DATATYPE_INT
    data = encode(lambda w: w.image(img))
    assert len(data) == 2 + 198 + 8 + 12 * 4
    np.testing.assert_array_equal(np.frombuffer(data[-48:], "<i4"), np.arange(-6, 6))
    back = read_all(data)[0].payload
    assert back.data_type == ismrmrd.DATATYPE_INT
    np.testing.assert_array_equal(back.data.ravel(), np.arange(-6, 6))


# ------------------------------------------------------------------------ NUL terminators
def test_nul_terminated_config_and_header_are_stripped(xml_header):
    sink = Sink()
    w = MessageWriter(sink, nul_terminate=True)
    w.config_text("<configuration/>")
    w.header(xml_header)
    w.text("no nul for text")
    data = sink.getvalue()
    assert data[2:6] == struct.pack("<I", len("<configuration/>") + 1) and data[6 + 16] == 0
    assert [m.payload for m in read_all(data)] == ["<configuration/>", xml_header.toXML(), "no nul for text"]


def test_config_file_name_stops_at_first_nul():
    raw = b"\x01\x00" + b"default.xml\0garbage-from-uninitialised-struct".ljust(1024, b"\0")
    assert read_all(raw)[0].payload == "default.xml"
    with pytest.raises(ValueError, match="1024 bytes"):
        encode(lambda w: w.config_file("x" * 1024))


def test_image_attributes_with_nul_terminator(rng):
    """Gadgetron writes the attribute XML with a NUL counted in the uint64 length."""
    img = make_image(rng, meta={"DataRole": "Image", "WindowWidth": "200"})
    attributes = img.attribute_string.encode() + b"\0"
    pixels = img.data.tobytes()
    head = img.getHead()
    head.attribute_string_len = len(attributes)
    raw = struct.pack("<H", 1022) + bytes(head) + struct.pack("<Q", len(attributes)) + attributes + pixels
    back = read_all(raw)[0].payload
    assert dict(back.meta) == {"DataRole": "Image", "WindowWidth": "200"}
    assert not back.attribute_string.endswith("\0")
    np.testing.assert_array_equal(back.data, img.data)
    # ismrmrd's own reader strips it too (verified, since we rely on the same convention)
    assert dict(next(ProtocolDeserializer(io.BytesIO(raw)).deserialize()).meta) == dict(back.meta)


def test_error_message_has_uint64_length():
    data = encode(lambda w: w.error("reconstruction failed"))
    assert data[:2] == b"\x08\x00" and data[2:10] == struct.pack("<Q", 21) and data[10:] == b"reconstruction failed"
    assert read_all(data + b"\x04\x00")[0] == Message(MessageId.ERROR, "reconstruction failed")
    assert read_all(b"\x08\x00" + struct.pack("<Q", 5) + b"oops\0")[0].payload == "oops"


# ------------------------------------------------------------------------ malformed streams
def test_truncated_messages_at_every_cut_point(rng, xml_header):
    parts = [encode(lambda w: w.config_file("c.xml")), encode(lambda w: w.header(xml_header)),
             encode(lambda w: w.acquisition(acq_line(rng, 2, 8, traj_dims=2))),
             encode(lambda w: w.image(make_image(rng, meta={"A": "1"}))),
             encode(lambda w: w.waveform(make_waveform(rng))), encode(lambda w: w.error("e"))]
    stream = b"".join(parts)
    boundaries = set(np.cumsum([0] + [len(p) for p in parts]))
    for cut in range(len(stream) + 1):
        if cut in boundaries:
            assert len(read_all(stream[:cut], max_chunk=97)) == sorted(boundaries).index(cut)
            continue
        with pytest.raises(TruncatedMessage, match="connection closed with .* more bytes expected"):
            read_all(stream[:cut], max_chunk=97)


def test_truncation_message_names_message_and_offsets(rng):
    first = encode(lambda w: w.text("x"))
    acq = encode(lambda w: w.acquisition(acq_line(rng, 4, 32)))
    reader = MessageReader.from_bytes(first + acq[:500])
    reader.read()
    with pytest.raises(TruncatedMessage) as info:
        reader.read()
    text = str(info.value)
    assert "ACQUISITION message (id 1008)" in text and f"stream offset {len(first)}" in text
    assert f"{len(acq) - 500} more bytes expected" in text and "500 bytes of it consumed" in text
    with pytest.raises(ProtocolError, match="earlier error"):
        reader.read()
    with pytest.raises(TruncatedMessage, match="message id"):
        read_all(b"\x04")


def test_unknown_message_id_is_named():
    with pytest.raises(ProtocolError, match=r"unknown message id 1030 \(0x0406\).*stream offset 2"):
        read_all(b"\x04\x00\x06\x04" + b"\0" * 20)
    with pytest.raises(ProtocolError, match="unknown message id 9"):
        read_all(b"\x09\x00")


def test_absurd_lengths_are_refused_before_allocating():
    with pytest.raises(ProtocolError, match=r"claims 2147483648 bytes; the limit .* is 4194304 bytes.*HEADER"):
        read_all(b"\x03\x00" + struct.pack("<I", 2**31) + b"<ismrmrdHeader/>")
    with pytest.raises(ProtocolError, match=str(2**63)):
        read_all(b"\x08\x00" + struct.pack("<Q", 2**63))
    # max_message_bytes caps text too; max_text_bytes caps it further
    with pytest.raises(ProtocolError, match="claims 101 bytes; the limit .* is 100 bytes"):
        read_all(b"\x05\x00" + struct.pack("<I", 101) + b"x" * 101, max_message_bytes=100)
    with pytest.raises(ProtocolError, match="claims 101 bytes; the limit .* is 64 bytes .max_text_bytes"):
        read_all(b"\x05\x00" + struct.pack("<I", 101) + b"x" * 101, max_text_bytes=64)


def test_oversized_acquisition_image_and_waveform_are_refused(rng):
    acq = encode(lambda w: w.acquisition(acq_line(rng, 32, 512)))
    with pytest.raises(ProtocolError, match=r"acquisition payload \(32 channels x 512 samples.* exceeds"):
        read_all(acq, max_message_bytes=1 << 16)
    head = ismrmrd.ImageHeader(data_type=ismrmrd.DATATYPE_CXDOUBLE, channels=65535)
    head.matrix_size[:] = (65535, 65535, 65535)
    with pytest.raises(ProtocolError, match="image attributes .* exceeds"):
        read_all(b"\xfe\x03" + bytes(head) + struct.pack("<Q", 0))
    wave = ismrmrd.WaveformHeader(channels=65535, number_of_samples=65535)
    with pytest.raises(ProtocolError, match="waveform data .* exceeds"):
        read_all(b"\x02\x04" + bytes(wave), max_message_bytes=1 << 20)


@pytest.mark.parametrize("bit", [53, 54, 55, 56])
def test_compressed_acquisitions_are_refused(rng, bit):
    line = acq_line(rng, scan_counter=12)
    raw = bytearray(encode(lambda w: w.acquisition(line)))
    flags_at = 2 + HEADER_DTYPE.fields["flags"][1]
    struct.pack_into("<Q", raw, flags_at, flag_mask(bit, 8))
    with pytest.raises(ProtocolError, match=rf"scan_counter 12 has compression flag bit\(s\) \[{bit}\]"):
        read_all(bytes(raw))
    line.head["flags"] = flag_mask(bit)
    with pytest.raises(ValueError, match="compression"):
        encode(lambda w: w.acquisition(line))


def test_bad_image_content_is_a_protocol_error(rng):
    img = make_image(rng)
    head = img.getHead()
    raw = struct.pack("<H", 1022) + bytes(head) + struct.pack("<Q", 5) + b"<bad>" + img.data.tobytes()
    with pytest.raises(ProtocolError, match="not ismrmrdMeta XML"):
        read_all(raw)
    head.data_type = 99
    with pytest.raises(ProtocolError, match="data_type 99"):
        read_all(struct.pack("<H", 1022) + bytes(head) + struct.pack("<Q", 0))
    with pytest.raises(ProtocolError, match="not valid UTF-8"):
        read_all(b"\x05\x00" + struct.pack("<I", 2) + b"\xff\xfe")


# ------------------------------------------------------------------------ acquisitions
def test_acquisition_with_trajectory(rng):
    line = acq_line(rng, 2, 64, traj_dims=3)
    data = encode(lambda w: w.acquisition(line))
    assert len(data) == 2 + 340 + 64 * 3 * 4 + 2 * 64 * 8
    back = read_all(data, max_chunk=50)[0].payload
    assert back.traj.shape == (64, 3) and back.traj.dtype == np.float32
    assert_acq_equal(back, line)


def test_writer_sets_size_fields_from_the_arrays(rng):
    line = acq_line(rng, 4, 32)
    line.data = line.data[:, 8:24]  # e.g. readout oversampling removed without updating the header
    back = read_all(encode(lambda w: w.acquisition(line)))[0].payload
    assert int(back.head["number_of_samples"]) == 16 and int(back.head["active_channels"]) == 4
    np.testing.assert_array_equal(back.data, line.data)
    with pytest.raises(ValueError, match="channels, samples"):
        encode(lambda w: w.acquisition(AcqLine(line.head, line.data[0])))


# ------------------------------------------------------------------------ threads and timeouts
def test_writer_is_thread_safe(rng):
    n = 1000
    a, b = socket.socketpair()
    writer = MessageWriter(a)
    payloads = {t: acq_line(rng, 2 + t, 40 + 7 * t) for t in range(2)}

    def produce(t):
        for i in range(n):
            line = payloads[t]
            line = AcqLine(line.head.copy(), line.data, None)
            line.head["scan_counter"] = t * n + i
            writer.acquisition(line)
            if i % 10 == 0:
                writer.text(f"thread {t} message {i}")

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(2)]
    with a, b:
        for th in threads:
            th.start()
        reader = MessageReader(b)
        seen = {0: [], 1: []}
        texts = 0
        while sum(map(len, seen.values())) < 2 * n or texts < 200:
            msg = reader.read()
            if msg.id == MessageId.TEXT:
                texts += 1
                continue
            counter = int(msg.payload.head["scan_counter"])
            t = counter // n
            assert msg.payload.data.shape == payloads[t].data.shape
            np.testing.assert_array_equal(msg.payload.data, payloads[t].data)
            seen[t].append(counter % n)
        for th in threads:
            th.join()
    assert seen == {0: list(range(n)), 1: list(range(n))}


def test_socket_timeout_between_messages_is_resumable(rng):
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(0.05)
        reader = MessageReader(b)
        with pytest.raises(ReadTimeout, match="2 bytes pending, between messages") as info:
            reader.read()
        assert info.value.resumable and isinstance(info.value, TimeoutError)
        MessageWriter(a).text("late")
        assert reader.read().payload == "late"


def test_socket_timeout_inside_a_message_names_pending_bytes(rng):
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(0.05)
        data = encode(lambda w: w.acquisition(acq_line(rng, 2, 16)))
        a.sendall(data[:100])
        reader = MessageReader(b)
        with pytest.raises(ReadTimeout) as info:
            reader.read()
        err = info.value
        assert not err.resumable and err.pending == 340 - 98 and err.received == 2
        assert "ACQUISITION message (id 1008)" in str(err) and "242 bytes pending" in str(err)
        with pytest.raises(ProtocolError, match="earlier error"):
            reader.read()
