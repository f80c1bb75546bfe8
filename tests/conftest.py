"""Shared fixtures: small simulated scans written with real ISMRMRD headers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gadget.converters.simulate import simulate_volume, write_fastmri


def equispaced_mask(width: int, acceleration: int, acs: int) -> np.ndarray:
    """Every ``acceleration``-th line plus ``acs`` central lines placed as fastMRI centres them."""
    mask = np.zeros(width, bool)
    mask[::acceleration] = True
    start = (width - acs + 1) // 2
    mask[start:start + acs] = True
    return mask


@pytest.fixture(scope="session")
def small_volume():
    """3 slices, 6 coils, 64×48 image (k-space 128×48), fixed seed."""
    return simulate_volume(num_slices=3, num_coils=6, recon_size=(64, 48), seed=7)


@pytest.fixture
def test_format_file(tmp_path, small_volume):
    """A fastMRI test-format file: 4× equispaced + 8 ACS lines, attrs num_low_frequency=8."""
    path = tmp_path / "input" / "file_sim_001.h5"
    path.parent.mkdir()
    mask = equispaced_mask(48, 4, 8)
    write_fastmri(path, small_volume, mask=mask, num_low_frequency=8, acceleration=4)
    return path


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
