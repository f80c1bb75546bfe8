"""Pipeline stages: noise prewhitening and slice assembly."""
import numpy as np
import pytest

from gadget.converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd
from gadget.converters.simulate import simulate_volume, write_fastmri
from gadget.data.mrd_file import flag_mask, iter_acquisitions, read_header_xml
from gadget.data.mrd_header import parse_encoding
from gadget.stream.assemble import AssemblyError, SliceAssembler
from gadget.stream.noise import NoiseError, noise_covariance, prewhiten, whitening_matrix
from gadget.stream.types import AcqLine, make_head
from tests.mrd_builders import header


def scan_lines(path):
    return [AcqLine(h, d) for c in iter_acquisitions(path) for h, d in zip(c.heads, c.data)]


@pytest.fixture(scope="module")
def raw_scan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scan")
    vol = simulate_volume(num_slices=3, num_coils=4, recon_size=(32, 24), seed=5)
    write_fastmri(tmp / "v.h5", vol)
    import h5py

    with h5py.File(tmp / "v.h5", "a") as f:
        if "noise" not in f:
            f["noise"] = vol.noise
    plan = convert_fastmri_to_ismrmrd(tmp / "v.h5", tmp / "raw.h5", "equispaced-fraction", 4, 0.125, seed=1)
    return vol, plan, read_header_xml(tmp / "raw.h5"), scan_lines(tmp / "raw.h5")


def test_assembles_every_slice_exactly(raw_scan):
    vol, plan, xml, lines = raw_scan
    asm = SliceAssembler(parse_encoding(xml))
    done = [s for ln in lines if not ln.has_flag(19) for s in asm.add(ln)]
    assert [s.key[0] for s in done] == [0, 1, 2] and not asm.flush()
    for s in done:
        np.testing.assert_array_equal(s.mask, plan.acquired)
        cols = plan.acquired
        assert s.kspace[..., cols].tobytes() == vol.kspace[s.key[0]][..., cols].tobytes()  # bitwise
        assert not s.kspace[..., ~cols].any()
        assert s.num_calibration == plan.num_low
        assert abs(int(s.reference["idx"]["kspace_encode_step_1"]) - 12) <= 2  # nearest the centre line


def test_out_of_order_lines_and_end_of_stream_flush(raw_scan):
    vol, plan, xml, lines = raw_scan
    imaging = [ln for ln in lines if not ln.has_flag(19)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(imaging))
    asm = SliceAssembler(parse_encoding(xml))
    for i in order:
        ln = imaging[i]
        stripped = AcqLine(ln.head.copy(), ln.data)
        stripped.head["flags"] = int(ln.head["flags"]) & ~(flag_mask(8) | flag_mask(25))  # no LAST flags
        assert asm.add(stripped) == []
    left = asm.flush()
    assert len(left) == 3 and all(s.incomplete for s in left)
    np.testing.assert_array_equal(left[1].kspace, (vol.kspace[1] * plan.acquired).astype(np.complex64))


def _line(e1, data, **kw):
    head = make_head(idx={"kspace_encode_step_1": e1, **kw.pop("idx", {})}, center_sample=kw.pop("center", 4),
                     **kw)
    return AcqLine(head, np.asarray(data, np.complex64))


def test_averages_reverse_and_asymmetric_echo():
    enc = parse_encoding(header(readout=8, width=4, coils=1))
    asm = SliceAssembler(enc)
    a, b = np.full((1, 8), 1 + 1j), np.full((1, 8), 3 - 1j)
    asm.add(_line(1, a, idx={"average": 0}))
    asm.add(_line(1, b, idx={"average": 1}))
    ramp = np.arange(8)[None].astype(np.complex64)
    (s,) = asm.add(_line(2, ramp, flags=flag_mask(22) | flag_mask(8)))  # ACQ_IS_REVERSE, LAST_IN_SLICE
    np.testing.assert_allclose(s.kspace[0, :, 1], (a[0] + b[0]) / 2)
    np.testing.assert_allclose(s.kspace[0, :, 2], ramp[0, ::-1])
    np.testing.assert_array_equal(s.mask, [False, True, True, False])
    # asymmetric echo: 6 samples with the echo at sample 2 → sample 2 lands on row 8 // 2
    (e,) = asm.add(_line(3, np.ones((1, 6)), center=2, idx={"slice": 1}, flags=flag_mask(8)))
    np.testing.assert_allclose(e.kspace[0, :, 3], [0, 0, 1, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("second,expected", [
    (dict(e1=2, data=np.ones((2, 8))), "2 channels x 8 samples, but this slice started with 1 x 8"),
    (dict(e1=2, data=np.ones((1, 6))), "1 channels x 6 samples"),
    (dict(e1=9, data=np.ones((1, 8))), "kspace_encode_step_1=9 outside the encoding limits"),
    (dict(e1=2, data=np.full((1, 8), np.nan)), "NaN or Inf"),
    (dict(e1=2, data=np.ones((1, 0))), "empty data"),
])
def test_bad_lines_are_named(second, expected):
    asm = SliceAssembler(parse_encoding(header(readout=8, width=4, coils=1)))
    asm.add(_line(1, np.ones((1, 8)), scan_counter=0))
    with pytest.raises(AssemblyError) as info:
        asm.add(_line(second["e1"], second["data"], scan_counter=7))
    assert expected in str(info.value) and "acquisition 7" in str(info.value)


def test_last_in_repetition_and_measurement_complete_groups():
    asm = SliceAssembler(parse_encoding(header(readout=8, width=4, coils=1, slices=2)))
    for rep in (0, 1):
        for sl in (0, 1):
            assert asm.add(_line(0, np.ones((1, 8)), idx={"slice": sl, "repetition": rep})) == []
    done = asm.add(_line(1, np.ones((1, 8)), idx={"slice": 0, "repetition": 0}, flags=flag_mask(14)))
    assert sorted(s.key for s in done) == [(0, 0, 0, 0, 0), (1, 0, 0, 0, 0)]
    done = asm.add(_line(1, np.ones((1, 8)), idx={"slice": 1, "repetition": 1}, flags=flag_mask(25)))
    assert sorted(s.key[0] for s in done) == [0, 1] and all(s.key[3] == 1 for s in done)


def _assemble_from_stream(xml, lines, landing):
    """Write ``lines`` as an MRD stream, read it back (receiving into slice rows when ``landing``),
    assemble; returns the completed slices (copied) and how many lines landed in their rows."""
    from gadget.stream.codec import MessageReader, MessageWriter

    class Sink:
        parts = []

        def sendall(self, b):
            self.parts.append(bytes(b))

    sink = Sink()
    writer = MessageWriter(sink)
    for ln in lines:
        writer.acquisition(ln)
    writer.close()
    reader = MessageReader.from_bytes(b"".join(sink.parts), max_chunk=1000)  # payloads split across reads
    asm = SliceAssembler(parse_encoding(xml))
    landed = []
    if landing:
        def land(*args):
            row = asm.landing_row(*args)
            landed.append(row is not None)
            return row
        reader.landing = land
    out = []
    for msg in reader:
        if msg.payload is not None and not msg.payload.has_flag(19):
            out += [(s.key, s.kspace.copy(), s.mask.copy(), s.lines) for s in asm.add(msg.payload)]
    return out, sum(landed)


def test_lines_received_into_their_slice_rows_give_the_same_slices(raw_scan):
    """MessageReader.landing = SliceAssembler.landing_row: bitwise the slices of the copying path, for
    a simulated scan and for averaged, reversed and asymmetric-echo lines (which are copied)."""
    _, _, xml, lines = raw_scan
    plain, _ = _assemble_from_stream(xml, lines, landing=False)
    landed, count = _assemble_from_stream(xml, lines, landing=True)
    assert count == sum(not ln.has_flag(19) for ln in lines)  # every imaging line received in place
    assert len(plain) == 3 and [p[0] for p in plain] == [q[0] for q in landed]
    for p, q in zip(plain, landed):
        assert p[1].tobytes() == q[1].tobytes() and (p[2] == q[2]).all() and p[3] == q[3]
    enc_xml = header(readout=8, width=4, coils=2)
    rng = np.random.default_rng(3)
    data = [(rng.standard_normal((2, 8)) + 1j * rng.standard_normal((2, 8))).astype(np.complex64) for _ in range(4)]
    tricky = [_line(1, data[0], idx={"average": 0}), _line(1, data[1], idx={"average": 1}),
              _line(2, data[2], flags=flag_mask(22)), _line(0, data[3], flags=flag_mask(8)),
              _line(3, data[3][:, :6], center=2, idx={"slice": 1}, flags=flag_mask(8))]
    plain, _ = _assemble_from_stream(enc_xml, tricky, landing=False)
    landed, count = _assemble_from_stream(enc_xml, tricky, landing=True)
    assert count == 2  # the first average and the e1=0 line; the rest are copied
    assert len(plain) == len(landed) == 2
    assert all(p[1].tobytes() == q[1].tobytes() for p, q in zip(plain, landed))
    np.testing.assert_allclose(landed[0][1][:, :, 1], (data[0] + data[1]) / 2, rtol=1e-6)


def test_landing_row_is_handed_out_once_per_position():
    asm = SliceAssembler(parse_encoding(header(readout=8, width=4, coils=1)))
    head = _line(1, np.ones((1, 8))).head
    row = asm.landing_row(head, 1, 8)
    assert row is not None and row.shape == (1, 8) and row.flags.c_contiguous
    assert asm.landing_row(head, 1, 8) is None  # a second line at that position, read ahead: its own array
    assert asm.landing_row(_line(2, np.ones((1, 8)), flags=flag_mask(22)).head, 1, 8) is None  # reversed
    assert asm.landing_row(_line(2, np.ones((1, 6))).head, 1, 6) is None  # not the whole readout


def test_recycled_buffers_are_clean():
    """A slice assembled in a recycled buffer holds zeros wherever no line arrived (the buffer is
    poisoned with NaN before it is given back)."""
    enc = parse_encoding(header(readout=8, width=4, coils=1))
    asm = SliceAssembler(enc)
    for e1 in range(4):
        done = asm.add(_line(e1, np.ones((1, 8)), flags=flag_mask(8) if e1 == 3 else 0))
    (first,) = done
    first.kspace.base[...] = np.nan
    asm.recycle(first)
    asm.add(_line(1, np.ones((1, 6)), center=2, idx={"slice": 1}))
    (second,) = asm.add(_line(2, np.full((1, 6), 2.0), center=2, idx={"slice": 1}, flags=flag_mask(8)))
    assert np.shares_memory(second.kspace, first.kspace)
    np.testing.assert_array_equal(second.kspace[0, :, 1], [0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(second.kspace[0, :, 2], [0, 0, 2, 2, 2, 2, 2, 2])
    assert not second.kspace[:, :, [0, 3]].any()


def _landed_slice_with_a_refused_line(asm, sl):
    """Slice ``sl`` of a 1-coil 8x4 scan: e1=2 received in place (5s), e1=1 handed a row, NaN
    received into it and refused by add(), e1=0 copied (7s)."""
    good = _line(2, np.zeros((1, 8)), idx={"slice": sl})
    row = asm.landing_row(good.head, 1, 8)
    row[...] = 5  # the reader receives the samples into the row
    asm.add(AcqLine(good.head, row))
    bad = _line(1, np.zeros((1, 8)), idx={"slice": sl})
    bad_row = asm.landing_row(bad.head, 1, 8)
    bad_row[0, 3] = np.nan
    with pytest.raises(AssemblyError, match="NaN or Inf"):
        asm.add(AcqLine(bad.head, bad_row))
    (done,) = asm.add(_line(0, np.full((1, 8), 7.0), idx={"slice": sl}, flags=flag_mask(8)))
    np.testing.assert_array_equal(done.mask, [True, False, True, False])
    np.testing.assert_array_equal(done.kspace[0, :, 0], np.full(8, 7))
    np.testing.assert_array_equal(done.kspace[0, :, 2], np.full(8, 5))
    assert not done.kspace[:, :, [1, 3]].any()
    return done


def test_landed_rows_and_a_refused_line_in_fresh_and_recycled_buffers():
    """Rows received in place keep their samples; a row handed to the reader for a line that add()
    then refuses holds zeros, not the refused samples, in fresh memory and in recycled memory
    (poisoned with NaN before it is given back)."""
    asm = SliceAssembler(parse_encoding(header(readout=8, width=4, coils=1)))
    first = _landed_slice_with_a_refused_line(asm, 0)
    first.kspace.base[...] = np.nan
    asm.recycle(first)
    second = _landed_slice_with_a_refused_line(asm, 1)
    assert np.shares_memory(second.kspace, first.kspace)


def test_huge_finite_samples_are_accepted():
    """The fast finite check (sum of |x|^2) overflows for samples near float32's limit; the exact
    check then accepts them, while a single NaN is still refused."""
    asm = SliceAssembler(parse_encoding(header(readout=8, width=4, coils=1)))
    big = np.full((1, 8), 3e37, np.complex64)
    assert not np.isfinite(np.vdot(big, big))
    asm.add(_line(1, big))
    with pytest.raises(AssemblyError, match="NaN or Inf"):
        asm.add(_line(2, np.where(np.arange(8) == 5, np.nan, 1.0)[None]))


# ----------------------------------------------------------------------------- noise

def test_noise_covariance_and_whitening():
    rng = np.random.default_rng(2)
    mix = np.array([[1, 0.5j, 0], [0, 1.2, 0.3], [0.1, 0, 0.8]])
    white = (rng.standard_normal((3, 20000)) + 1j * rng.standard_normal((3, 20000))) / np.sqrt(2)
    noise = mix @ white
    cov = noise_covariance(noise)
    np.testing.assert_allclose(cov, np.cov(noise), atol=1e-12)
    w = whitening_matrix(cov)
    whitened = noise_covariance(w @ noise)
    scale = np.mean(np.real(np.diag(cov)))
    np.testing.assert_allclose(whitened, scale * np.eye(3), atol=1e-5 * scale)


def test_prewhiten_stage(raw_scan):
    vol, plan, xml, lines = raw_scan
    out = list(prewhiten(iter(lines + ["waveform"]), enabled=True))
    assert not any(isinstance(x, AcqLine) and x.has_flag(19) for x in out)  # noise consumed
    assert out[-1] == "waveform"  # other items pass through
    w = whitening_matrix(noise_covariance(np.concatenate([ln.data for ln in lines if ln.has_flag(19)], axis=1)))
    first = next(ln for ln in lines if not ln.has_flag(19))
    np.testing.assert_allclose(out[0].data, w @ first.data, rtol=1e-5, atol=1e-9)
    # disabled: noise still consumed, data untouched
    off = list(prewhiten(iter(lines), enabled=False))
    assert off[0].data is first.data
    # no noise: unchanged objects
    imaging = [ln for ln in lines if not ln.has_flag(19)]
    assert all(a is b for a, b in zip(prewhiten(iter(imaging)), imaging))


def test_noise_channel_mismatch():
    noise = _line(0, np.ones((3, 8)) * np.arange(8), flags=flag_mask(19))
    data = _line(0, np.ones((2, 8)))
    with pytest.raises(NoiseError, match="3"):
        list(prewhiten(iter([noise, data])))
