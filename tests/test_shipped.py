"""The weights shipped inside the package: they load as the default, carry their recipe, and
reconstruct a simulated volume no training run saw better than zero-filling."""
import numpy as np
import pytest
import torch

from converters.simulate import simulate_volume
from gadget.model.checkpoint import load_checkpoint
from gadget.model.shipped import SHIPPED_NAME, shipped_checkpoint
from gadget.mri.coils import rss
from gadget.mri.fft import ifft2c
from gadget.mri.masks import MaskSampler, MaskSpec
from gadget.mri.metrics import center_crop, psnr, ssim
from gadget.recon.config import ReconConfig
from gadget.recon.pipeline import build_engine


def test_shipped_weights_load_as_the_default_with_their_recipe():
    path = shipped_checkpoint()
    assert path.name == SHIPPED_NAME and path.stat().st_size <= 20 * 2**20
    loaded = load_checkpoint(path)
    assert loaded.kind == "varnet-gadget"
    for key in ("data", "recipe", "accelerations", "epochs", "evaluation"):
        assert loaded.description.get(key), key
    engine, model_id = build_engine(ReconConfig())  # no checkpoint given → the shipped weights
    assert SHIPPED_NAME in model_id
    assert engine.model.config == loaded.config


@pytest.fixture(scope="module")
def unseen_slice():
    """MNI coronal, seed 4321 (training used seeds 11-16, 31-36 and 51-56, validation 100-101, test 200-203)."""
    return simulate_volume(num_slices=1, num_coils=8, recon_size=(128, 128), seed=4321, source="mni",
                           orientation="coronal")


@pytest.mark.parametrize("acceleration,center_fraction", [(4, 0.08), (8, 0.04)])
def test_shipped_weights_beat_zero_filled_on_an_unseen_volume(unseen_slice, acceleration, center_fraction):
    mask, num_low = MaskSampler(MaskSpec("random", [center_fraction], [acceleration]))(128, seed=7)
    k = torch.from_numpy(unseen_slice.kspace) * torch.from_numpy(mask)
    model = load_checkpoint(shipped_checkpoint()).model
    with torch.no_grad():
        recon = center_crop(model(k, torch.from_numpy(mask), num_low), (128, 128)).numpy()
    zero = center_crop(rss(ifft2c(k), dim=1), (128, 128)).numpy()
    truth = unseen_slice.target
    assert ssim(truth, recon) > ssim(truth, zero) + 0.2
    assert psnr(truth, recon) > psnr(truth, zero) + 3.0
