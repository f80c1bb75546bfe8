"""Build small raw ISMRMRD files for tests, through our writer and real headers."""
from __future__ import annotations

import numpy as np

from gadget.data.mrd_file import MrdRawWriter, empty_heads, flag_mask
from gadget.data.mrd_header import build_header_xml


def header(readout=32, width=16, coils=3, slices=1, accel=1, e1_max=None, e1_center=None) -> str:
    return build_header_xml(encoded_matrix=(readout, width, 1), recon_matrix=(readout // 2, width, 1),
                            encoded_fov_mm=(200, 100, 5), recon_fov_mm=(100, 100, 5),
                            e1_max=width - 1 if e1_max is None else e1_max,
                            e1_center=width // 2 if e1_center is None else e1_center,
                            num_coils=coils, num_slices=slices, acceleration_e1=accel)


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
