"""Build small raw ISMRMRD files for tests, through our writer and real headers."""
from __future__ import annotations

import numpy as np

from gadget.data.mrd_file import MrdRawWriter, empty_heads, flag_mask
from gadget.data.mrd_header import build_header_xml


def header(readout=32, width=16, coils=3, slices=1, accel=1, e1_max=None, e1_center=None,
           calibration_mode="other") -> str:
    return build_header_xml(encoded_matrix=(readout, width, 1), recon_matrix=(readout // 2, width, 1),
                            encoded_fov_mm=(200, 100, 5), recon_fov_mm=(100, 100, 5),
                            e1_max=width - 1 if e1_max is None else e1_max,
                            e1_center=width // 2 if e1_center is None else e1_center,
                            num_coils=coils, num_slices=slices, acceleration_e1=accel,
                            calibration_mode=calibration_mode)


def write_raw(path, xml, lines, seed=0):
    """``lines``: list of dicts with keys e1, slice (0), flags (tuple of bits), channels, samples,
    center_sample, average, repetition. Returns the complex data written, one array per line."""
    rng = np.random.default_rng(seed)
    datas = []
    heads = empty_heads(len(lines))
    for i, ln in enumerate(lines):
        heads[i]["idx"]["kspace_encode_step_1"] = ln.get("e1", 0)
        heads[i]["idx"]["slice"] = ln.get("slice", 0)
        heads[i]["idx"]["average"] = ln.get("average", 0)
        heads[i]["idx"]["repetition"] = ln.get("repetition", 0)
        heads[i]["flags"] = flag_mask(*ln.get("flags", ()))
        heads[i]["center_sample"] = ln.get("center_sample", ln.get("samples", 32) // 2)
        shape = (ln.get("channels", 3), ln.get("samples", 32))
        datas.append((rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64))
    with MrdRawWriter(path) as w:
        w.write_header(xml)
        w.append(heads, datas)
    return datas


def with_noise_bandwidth(xml: str, ratio) -> str:
    """``xml`` with ``acquisitionSystemInformation/relativeReceiverNoiseBandwidth`` set to ``ratio``."""
    element = f"<relativeReceiverNoiseBandwidth>{ratio}</relativeReceiverNoiseBandwidth>"
    if "<acquisitionSystemInformation>" in xml:
        return xml.replace("<acquisitionSystemInformation>", "<acquisitionSystemInformation>" + element, 1)
    return xml.replace("<encoding>", f"<acquisitionSystemInformation>{element}</acquisitionSystemInformation>"
                       "<encoding>", 1)


def header_3d(readout=16, width=12, coils=3, partitions=8, recon_partitions=None, thickness_mm=2.0,
              accel_e2=1, calibration_mode="other") -> str:
    """A 3-D Cartesian header: encoded matrix z ``partitions`` (kspace_encoding_step_2 limits 0..partitions-1,
    centre partitions // 2), recon matrix z ``recon_partitions`` (default: the same), both with partitions
    ``thickness_mm`` thick; readout oversampled 2x in the encoded space."""
    recon_partitions = partitions if recon_partitions is None else recon_partitions
    return build_header_xml(encoded_matrix=(readout, width, partitions),
                            recon_matrix=(readout // 2, width, recon_partitions),
                            encoded_fov_mm=(200, 100, thickness_mm * partitions),
                            recon_fov_mm=(100, 100, thickness_mm * recon_partitions),
                            e1_max=width - 1, e1_center=width // 2, num_coils=coils, acceleration_e1=1,
                            calibration_mode=calibration_mode, e2_max=partitions - 1, e2_center=partitions // 2,
                            acceleration_e2=accel_e2)


def cartesian_lines(kspace, columns, *, e2=None, flags=None, position=(0.0, 0.0, 0.0),
                    directions=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), last=True, start_counter=0):
    """AcqLines of a Cartesian k-space, one per ``(e2, column)``: ``kspace`` complex ``(coil, readout, phase)``
    (2-D) or ``(kz, coil, readout, phase)`` (3-D, with ``e2`` the kz rows to send; the row index is the e2
    counter). e1 = the column (headers with e1 centre = width // 2, no padding). ``flags``: column → tuple
    of flag bits; ``last``: LAST_IN_SLICE on the final line. Geometry: ``position`` (mm) and read/phase/slice
    directions on every line."""
    from gadget.stream.types import AcqLine, make_head

    flags = flags or {}
    volume = np.asarray(kspace)[None] if e2 is None else np.asarray(kspace)
    rows = [None] if e2 is None else list(e2)
    out = []
    for r in rows:
        for col in columns:
            bits = tuple(flags.get(int(col), ()))
            idx = {"kspace_encode_step_1": int(col)}
            if r is not None:
                idx["kspace_encode_step_2"] = int(r)
            head = make_head(idx=idx, flags=flag_mask(*bits) if bits else 0, center_sample=volume.shape[-2] // 2,
                             position=position, read_dir=directions[0], phase_dir=directions[1],
                             slice_dir=directions[2], scan_counter=start_counter + len(out))
            out.append(AcqLine(head, np.ascontiguousarray(volume[0 if r is None else r][..., col], np.complex64)))
    if last and out:
        out[-1].head["flags"] = int(out[-1].head["flags"]) | flag_mask(8)
    return out


def separate_reference_stream(imaging, reference, noise, reference_columns, imaging_columns,
                              all_references_first=False, noise_samples=128, imaging_flags=None):
    """AcqLines of a multi-slice 2-D scan with separate reference lines: the noise scan first (``noise``
    complex ``(coil, samples)`` in lines of ``noise_samples``, ACQ_IS_NOISE_MEASUREMENT), then per slice its
    ``reference_columns`` (ACQ_IS_PARALLEL_CALIBRATION only, the first also ACQ_FIRST_IN_SLICE) followed by
    its ``imaging_columns`` (the last ACQ_LAST_IN_SLICE); with ``all_references_first`` every slice's
    reference lines come before any imaging line. ``imaging`` and ``reference``: complex ``(slice, coil,
    readout, phase)``; e1 = the column; ``imaging_flags``: column → extra flag bits of its imaging lines.
    Slice ``s`` sits at z = 5 s mm; scan counters run in stream order."""
    from gadget.stream.types import AcqLine, make_head

    first_in_slice, calibration, noise_flag = 7, 20, 19
    refs, images = [], []
    for s in range(imaging.shape[0]):
        position = (0.0, 0.0, 5.0 * s)
        ref = cartesian_lines(reference[s], reference_columns, position=position, last=False,
                              flags={int(c): (calibration,) for c in reference_columns})
        ref[0].head["flags"] = int(ref[0].head["flags"]) | flag_mask(first_in_slice)
        img = cartesian_lines(imaging[s], imaging_columns, position=position, flags=imaging_flags)
        for ln in ref + img:
            ln.head["idx"]["slice"] = s
        refs.append(ref)
        images.append(img)
    lines = [AcqLine(make_head(flags=flag_mask(noise_flag)), np.ascontiguousarray(noise[:, i:i + noise_samples],
                                                                                  np.complex64))
             for i in range(0, noise.shape[1], noise_samples)]
    if all_references_first:
        lines += [ln for ref in refs for ln in ref] + [ln for img in images for ln in img]
    else:
        lines += [ln for ref, img in zip(refs, images) for ln in ref + img]
    for i, ln in enumerate(lines):
        ln.head["scan_counter"] = i
    return lines


def write_lines(path, xml, lines):
    """Write AcqLines (their own headers and samples) as a raw ISMRMRD file."""
    heads = empty_heads(len(lines))
    for i, ln in enumerate(lines):
        heads[i] = ln.head
    with MrdRawWriter(path) as w:
        w.write_header(xml)
        w.append(heads, [ln.data for ln in lines])
