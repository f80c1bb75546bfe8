"""Simulated raw scans for the benchmarks: a volume from ``gadget.converters.simulate``, written as a fastMRI
file, converted to raw ISMRMRD (``gadget.converters.fastmri_to_ismrmrd``) and read back as pipeline lines."""
from __future__ import annotations

import tempfile
from pathlib import Path


def simulated_scan(slices: int, coils: int, recon_size: tuple[int, int], seed: int = 0, acceleration: int = 4,
                   center_fraction: float = 0.08, with_noise: bool = False):
    """``(header XML, AcqLines, fully sampled RSS reference (slice, H, W) float32)`` of a scan with an
    equispaced-fraction mask; ``with_noise`` adds a noise scan before the imaging lines."""
    from gadget.converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd
    from gadget.converters.simulate import simulate_volume, write_fastmri

    from ..data.mrd_file import iter_acquisitions, read_header_xml
    from ..stream.types import AcqLine

    with tempfile.TemporaryDirectory(prefix="varnet-bench-scan-") as tmp:
        volume_path, raw = Path(tmp) / "volume.h5", Path(tmp) / "raw.h5"
        vol = simulate_volume(num_slices=slices, num_coils=coils, recon_size=tuple(recon_size), seed=seed)
        write_fastmri(volume_path, vol, with_noise=with_noise)
        convert_fastmri_to_ismrmrd(volume_path, raw, "equispaced-fraction", acceleration, center_fraction, seed=1)
        xml = read_header_xml(raw)
        lines = [AcqLine(h, d) for chunk in iter_acquisitions(raw) for h, d in zip(chunk.heads, chunk.data)]
    return xml, lines, vol.target_rss
