"""Self-supervised adaptation (gadget/train/splits.py, gadget/train/adapt.py): the line splits, that Γ is
never trained on, the stop rule, provenance, and a tiny end-to-end adaptation that gains."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gadget.model.varnet import VarNet
from gadget.train import adapt as adapt_module
from gadget.train.adapt import AdaptConfig, AdaptError, AdaptSlice, adapt, adapted_model, ssdu_loss
from gadget.train.splits import SplitSettings, acs_lines, holdout_lines, seeded_rng, split_lines

from conftest import equispaced_mask


@pytest.mark.parametrize("width,accel,acs", [(48, 4, 8), (128, 4, 10), (180, 8, 7), (96, 3, 12)])
@pytest.mark.parametrize("selection", ["gaussian", "uniform"])
def test_splits_are_disjoint_keep_acs_in_theta_and_never_use_gamma(width, accel, acs, selection):
    omega = equispaced_mask(width, accel, acs)
    settings = SplitSettings(rho=0.4, holdout=0.2, selection=selection)
    acs_mask = acs_lines(width, acs)
    gamma = holdout_lines(omega, acs, settings, seeded_rng(0, width))
    outer = omega & ~acs_mask
    assert gamma.any() and not (gamma & ~omega).any(), "Γ must be acquired lines"
    assert not (gamma & acs_mask).any(), "Γ must not take ACS lines"
    assert gamma.sum() == max(1, round(0.2 * outer.sum()))
    available = omega & ~gamma
    sizes = []
    for draw in range(50):
        theta, lam = split_lines(available, acs, settings, seeded_rng(1, draw))
        assert not (theta & lam).any(), "Θ and Λ overlap"
        assert np.array_equal(theta | lam, available), "Θ ∪ Λ must be Ω \\ Γ"
        assert not ((theta | lam) & gamma).any(), "Γ leaked into a split"
        assert (theta & acs_mask).sum() == (acs_mask & omega).sum(), "an ACS line left Θ"
        assert (theta & ~acs_mask).any(), "Θ needs a line outside the ACS block"
        sizes.append(lam.sum())
    assert abs(np.mean(sizes) - 0.4 * available.sum()) <= 1
    # fresh draws differ (several splits per slice), the same seed repeats
    draws = {split_lines(available, acs, settings, seeded_rng(1, d))[1].tobytes() for d in range(10)}
    assert len(draws) > 5
    again = split_lines(available, acs, settings, seeded_rng(1, 3))[1]
    assert np.array_equal(again, split_lines(available, acs, settings, seeded_rng(1, 3))[1])


def test_gaussian_selection_prefers_the_centre():
    omega = np.ones(256, bool)
    settings = SplitSettings(rho=0.2, holdout=0.0, selection="gaussian", std_scale=4.0)
    counts = np.zeros(256)
    for d in range(200):
        counts += split_lines(omega, 16, settings, seeded_rng(0, d))[1]
    near, far = counts[64:96].mean() + counts[160:192].mean(), counts[:32].mean() + counts[-32:].mean()
    assert near > 3 * far


def test_split_settings_reject_bad_values():
    with pytest.raises(ValueError, match="rho"):
        SplitSettings(rho=1.0)
    with pytest.raises(ValueError, match="holdout"):
        SplitSettings(holdout=-0.1)
    with pytest.raises(ValueError, match="selection"):
        SplitSettings(selection="poisson")
    with pytest.raises(AdaptError, match="lr"):
        AdaptConfig(lr=0)
    with pytest.raises(AdaptError, match="trainable"):
        AdaptConfig(trainable="decoder")


def test_ssdu_loss_matches_numpy():
    rng = np.random.default_rng(0)
    shape = (2, 3, 8, 10)
    pred = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    meas = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    lam = rng.random((2, 1, 1, 10)) < 0.4
    expected = []
    for b in range(2):
        d, y = (pred[b] - meas[b])[..., lam[b, 0, 0]], meas[b][..., lam[b, 0, 0]]
        expected.append(np.linalg.norm(d) / np.linalg.norm(y) + np.abs(d).sum() / np.abs(y).sum())
    got = ssdu_loss(torch.from_numpy(pred), torch.from_numpy(meas), torch.from_numpy(lam))
    assert float(got) == pytest.approx(np.mean(expected), rel=1e-10)


# ----------------------------------------------------------------------------- adaptation


def tiny_model(seed: int = 0) -> VarNet:
    torch.manual_seed(seed)
    return VarNet(num_cascades=2, sens_chans=2, sens_pools=1, chans=4, pools=2).eval()


@pytest.fixture(scope="module")
def shifted_slices():
    """Two 6-coil phantom slices (k-space 64 × 48), 4× equispaced + 8 ACS lines, and their clean RSS."""
    from gadget.converters.simulate import simulate_volume

    vol = simulate_volume(num_slices=2, num_coils=6, recon_size=(32, 48), seed=11, snr_db=40)
    mask = equispaced_mask(48, 4, 8)
    slices = [AdaptSlice(vol.kspace[s] * mask, mask, 8, f"sim/{s}") for s in range(2)]
    return slices, vol.kspace


def _image_error(model: VarNet, slices, full) -> float:
    from gadget.mri.coils import rss
    from gadget.mri.fft import ifft2c

    err = ref = 0.0
    with torch.no_grad():
        for sl, k in zip(slices, full):
            out = model(torch.from_numpy(sl.kspace)[None], torch.from_numpy(sl.mask), sl.acs)[0]
            truth = rss(ifft2c(torch.from_numpy(k)[None]), dim=1)[0]
            err += float(((out - truth) ** 2).sum())
            ref += float((truth ** 2).sum())
    return err / ref


def test_adaptation_gains_on_a_simulated_shift(shifted_slices):
    """The shipped weights (trained on heads) meet a phantom: adapting on its undersampled lines alone
    lowers the Γ loss and the image error against the fully sampled RSS."""
    from gadget.model.checkpoint import load_checkpoint
    from gadget.model.shipped import shipped_checkpoint

    slices, full = shifted_slices
    model = load_checkpoint(shipped_checkpoint()).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = adapt(model, slices, AdaptConfig(steps=20, lr=1e-3, eval_every=5, patience=8, seed=1))
    for k, v in model.state_dict().items():  # the caller's model is not changed
        assert torch.equal(v, before[k]), k
    assert result.improved and result.gamma_best < 0.8 * result.gamma_start, result.summary()
    assert result.curve[0]["step"] == 0 and result.curve[0]["gamma"] == result.gamma_start
    adapted = adapted_model(model, result)
    assert not any(p.requires_grad for p in adapted.parameters())
    err_before, err_after = _image_error(model, slices, full), _image_error(adapted, slices, full)
    assert err_after < 0.85 * err_before, (err_before, err_after)
    for k, v in adapted.state_dict().items():  # the sensitivity network stays frozen by default
        if k.startswith("sens_net."):
            assert torch.equal(v, before[k]), k


def test_split_gradients_side_by_side_sum_to_the_plain_backward(shifted_slices):
    """Each split's gradient on a worker of its own, added in split order: the same loss and gradient as
    the splits' losses backpropagated one after the other (within float rounding of one thread against
    two), added to what ``.grad`` already held, and bit for bit the same on a second run."""
    from gadget.model.checkpoint import load_checkpoint
    from gadget.model.shipped import shipped_checkpoint
    from gadget.train.adapt import _Prepared, _trainable, accumulate_split_gradients, ssdu_loss
    from gadget.train.splits import holdout_lines, seeded_rng, split_lines

    slices, _ = shifted_slices
    model = load_checkpoint(shipped_checkpoint()).model.train()
    params = _trainable(model, "cascades")
    settings = AdaptConfig()
    splits = []
    for i, sl in enumerate(slices):
        p = _Prepared(sl, holdout_lines(sl.mask, sl.acs, settings.split, seeded_rng(0, 1, i)), torch.device("cpu"))
        splits += [(p, *split_lines(p.available, sl.acs, settings.split, seeded_rng(0, 3, i, s))) for s in range(2)]

    def grads_after(fn):
        for q in params:
            q.grad = torch.ones_like(q)  # what a step's other terms may have added already
        loss = fn()
        out = [q.grad.clone() for q in params]
        for q in params:
            q.grad = None
        return loss, out

    def plain():
        total = 0.0
        for p, theta, lam in splits:
            loss = ssdu_loss(p.run(model, theta), p.kspace, torch.from_numpy(lam).view(1, 1, 1, -1)) / len(splits)
            loss.backward()
            total += float(loss.detach())
        return total

    want_loss, want = grads_after(plain)
    got_loss, got = grads_after(lambda: accumulate_split_gradients(model, params, splits, workers=2))
    again_loss, again = grads_after(lambda: accumulate_split_gradients(model, params, splits, workers=2))
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    diff = sum(float((g - w).square().sum()) for g, w in zip(got, want)) ** 0.5
    size = sum(float((w - 1).square().sum()) for w in want) ** 0.5  # the splits' part of the gradient
    assert diff < 1e-3 * size, (diff, size)
    assert again_loss == got_loss and all(torch.equal(a, g) for a, g in zip(again, got))


def _spy_on_training(monkeypatch):
    """``(runs, losses)``, filled as :func:`adapt` runs: each network run's ``(Γ, lines given, training)``
    (``training``: autograd on, a split's Θ; off, a Γ score) and each SSDU loss's Λ, bool ``(phase,)``."""
    runs, losses = [], []
    original_run, original_loss = adapt_module._Prepared.run, adapt_module.ssdu_loss

    def run(self, model, lines):
        runs.append((self.gamma.copy(), lines.copy(), torch.is_grad_enabled()))
        return original_run(self, model, lines)

    def loss(predicted, measured, mask):
        losses.append(mask.reshape(-1).cpu().numpy().copy())
        return original_loss(predicted, measured, mask)

    monkeypatch.setattr(adapt_module._Prepared, "run", run)
    monkeypatch.setattr(adapt_module, "ssdu_loss", loss)
    return runs, losses


def test_gamma_lines_never_reach_training(shifted_slices, monkeypatch):
    slices, _ = shifted_slices
    runs, seen_losses = _spy_on_training(monkeypatch)
    adapt(tiny_model(), slices, AdaptConfig(steps=6, eval_every=3, splits_per_step=2, slices_per_step=2))
    seen_inputs = [(gamma, theta) for gamma, theta, training in runs if training]
    assert len(seen_inputs) == len(seen_losses) == 6 * 2 * 2
    for (gamma, theta), lam in zip(seen_inputs, seen_losses):
        assert gamma.any()
        assert not (theta & gamma).any() and not (lam & gamma).any()


def test_blank_lines_are_never_held_back_and_always_seen(shifted_slices, monkeypatch):
    """A partial-Fourier block: the first 12 of 48 columns zero, acquired lines among them. Those lines hold
    no measurement, so Γ and Λ never take them (their error would divide by no energy) and Θ always keeps
    them (the network sees them as the mask says, as at inference)."""
    slices, _ = shifted_slices
    blank = [AdaptSlice(sl.kspace.copy(), sl.mask.copy(), sl.acs, sl.name) for sl in slices]
    for sl in blank:
        sl.kspace[..., :12] = 0
    expected = blank[0].mask & (np.arange(48) < 12)
    assert expected.sum() >= 3 and np.array_equal(blank[0].blank_lines, expected)
    assert not slices[0].blank_lines.any()
    inputs, losses = _spy_on_training(monkeypatch)
    adapt(tiny_model(), blank, AdaptConfig(steps=4, eval_every=2, splits_per_step=2, slices_per_step=2))
    assert len(losses) == 4 * 2 * 2 and any(grad for *_, grad in inputs)
    for gamma, lines, _ in inputs:
        assert gamma.any() and not (gamma & expected).any()
        assert (lines & expected).sum() == expected.sum()
    for lam in losses:
        assert lam.any() and not (lam & expected).any()


def test_poisoned_run_keeps_the_start(shifted_slices):
    slices, _ = shifted_slices
    model = tiny_model()
    result = adapt(model, slices, AdaptConfig(steps=6, lr=50.0, eval_every=2, patience=2))
    assert not result.improved and result.best_step == 0
    for k, v in adapted_model(model, result).state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_adapt_refuses_data_it_cannot_split():
    full = np.ones(16, bool)
    k = np.ones((2, 8, 16), np.complex64)
    with pytest.raises(AdaptError, match="enough acquired lines"):
        adapt(tiny_model(), [AdaptSlice(k, full, 16, "acs-only")], AdaptConfig(steps=1))
    with pytest.raises(AdaptError, match="mask"):
        AdaptSlice(k, np.ones(8, bool), 4)
    with pytest.raises(AdaptError, match="joint"):
        adapt(tiny_model(), [AdaptSlice(k, equispaced_mask(16, 2, 4), 4)], AdaptConfig(joint_weight=1.0))


# ----------------------------------------------------------------------------- varnet adapt


def _base_checkpoint(path):
    from gadget.model.checkpoint import save_checkpoint

    save_checkpoint(path, tiny_model(), {"recipe": "tiny test model"})
    return path


def test_cli_adapt_writes_a_checkpoint_with_its_provenance(tmp_path, test_format_file):
    from gadget.cli import main
    from gadget.model.checkpoint import file_sha256, load_checkpoint
    from gadget.train.adapt_run import read_provenance

    base = _base_checkpoint(tmp_path / "base.pt")
    out, report = tmp_path / "site.pt", tmp_path / "report"
    code = main(["adapt", str(test_format_file.parent), "--out", str(out), "--checkpoint", str(base),
                 "--steps", "12", "--lr", "3e-3", "--eval-every", "4", "--device", "cpu", "--rho", "0.5",
                 "--report", str(report)])
    assert code == 0
    loaded = load_checkpoint(out)
    record = read_provenance(loaded)
    assert record["base_sha256"] == file_sha256(base)
    assert record["inputs"] == [{"name": test_format_file.name, "sha256": file_sha256(test_format_file)}]
    assert record["settings"]["split"]["rho"] == 0.5 and record["settings"]["lr"] == 3e-3
    assert record["steps"] == 12 and record["slices"] == 3
    assert [e["step"] for e in record["gamma_curve"]] == [0, 4, 8, 12]
    assert record["gamma_best"] < record["gamma_start"] == record["gamma_curve"][0]["gamma"]
    assert loaded.description["recipe"] == "tiny test model"  # the base's description is kept
    assert loaded.description["refine"] == "none"  # the base (our format, no refine recorded) runs unrefined
    base_state = load_checkpoint(base).model.state_dict()
    assert any(not torch.equal(v, base_state[k]) for k, v in loaded.model.state_dict().items())
    for name in ("gamma_curve.csv", "gamma_curve.png", "slices.png"):
        assert (report / name).stat().st_size > 0


def test_cli_adapt_refuses_to_write_weights_worse_than_the_start(tmp_path, test_format_file, capsys):
    from gadget.cli import main
    from gadget.cli.adapt import EXIT_NOT_BETTER

    base = _base_checkpoint(tmp_path / "base.pt")
    out = tmp_path / "poisoned.pt"
    code = main(["adapt", str(test_format_file), "--out", str(out), "--checkpoint", str(base), "--steps", "4",
                 "--lr", "50", "--eval-every", "2", "--device", "cpu"])
    assert code == EXIT_NOT_BETTER
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert "not written" in capsys.readouterr().out


def test_cli_adapt_names_bad_inputs(tmp_path, capsys):
    from gadget.cli import main

    bogus = tmp_path / "notes.h5"
    bogus.write_text("not hdf5")
    assert main(["adapt", str(bogus), "--out", str(tmp_path / "x.pt")]) == 2
    assert "notes.h5" in capsys.readouterr().err


def test_adapt_scan_through_infer_and_replay_gives_the_same_adapted_images(tmp_path, test_format_file, capsys):
    """Per-scan mode with an explicit refine (so no cs refine is calibrated): both offline doors adapt the
    weights on the scan's own lines (the same slices, splits and steps), log it, and reconstruct with the
    adapted weights; streaming doors refuse the setting."""
    import h5py

    from gadget.converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd
    from gadget.cli import main
    from gadget.recon.config import ConfigError, ReconConfig
    from gadget.recon.pipeline import build_engine
    from gadget.stream.images import image_magnitude
    from gadget.stream.sinks import read_images_h5

    base = _base_checkpoint(tmp_path / "base.pt")
    raw = tmp_path / "raw.h5"
    convert_fastmri_to_ismrmrd(test_format_file, raw)
    outputs = {}
    for adapt_mode in ("none", "scan"):
        out = tmp_path / f"inf-{adapt_mode}"
        assert main(["infer", "--checkpoint", str(base), "--input", str(test_format_file), "--output", str(out),
                     "--adapt", adapt_mode, "--adapt-steps", "6", "--refine", "none", "--device", "cpu"]) == 0
        with h5py.File(out / test_format_file.name, "r") as f:
            outputs[adapt_mode] = f["reconstruction"][()]
    printed = capsys.readouterr().out
    assert "adapted on its own lines: weights: 6 steps on 3 slices" in printed and "Γ loss" in printed
    assert "cs refine" not in printed
    change = np.linalg.norm(outputs["scan"] - outputs["none"]) / np.linalg.norm(outputs["none"])
    assert change > 1e-3

    cfg = tmp_path / "adapt.yaml"
    cfg.write_text("prewhiten: false\nfallback: none\nadapt: scan\nadapt_steps: 6\nrefine: none\ndevice: cpu\n")
    assert main(["replay", str(raw), str(tmp_path / "img.h5"), "--config", str(cfg), "--checkpoint", str(base)]) == 0
    assert "adapted on its own lines: weights: 6 steps on 3 slices" in capsys.readouterr().out
    (series,) = read_images_h5(tmp_path / "img.h5").values()
    replayed = np.stack([image_magnitude(im) for im in series])
    assert np.linalg.norm(replayed - outputs["scan"]) / np.linalg.norm(outputs["scan"]) < 1e-4

    with pytest.raises(ConfigError, match="offline doors"):
        build_engine(ReconConfig(adapt="scan", checkpoint=str(base)))
    with pytest.raises(ConfigError, match="adapt_steps"):
        ReconConfig().merged({"adapt_steps": 0}, "test")


def test_split_invariant_maps_are_computed_once_and_change_nothing(shifted_slices):
    slices, _ = shifted_slices
    model = tiny_model()
    sl = slices[0]
    gamma = holdout_lines(sl.mask, sl.acs, SplitSettings(), seeded_rng(0, 1))
    direct = adapt_module._Prepared(sl, gamma, torch.device("cpu"), fixed_maps=False)
    cached = adapt_module._Prepared(sl, gamma, torch.device("cpu"), fixed_maps=True)
    for draw in range(3):
        theta, _ = split_lines(direct.available, sl.acs, SplitSettings(), seeded_rng(2, draw))
        want, got = direct.run(model, theta), cached.run(model, theta)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.detach().abs().max()))
        if draw == 0:
            maps = cached.maps
        assert cached.maps is maps  # computed once
    with pytest.raises(AdaptError, match="e2e"):
        adapt(VarNet(num_cascades=1, chans=4, pools=1, variant="vnu-k"), slices, AdaptConfig(steps=1))


def test_adaptation_after_an_inference_mode_reconstruction_of_the_same_shape(shifted_slices):
    """``varnet infer --adapt scan`` over two files of one shape reconstructs the first under inference mode,
    then trains on the second: nothing cached by the first may be an inference tensor."""
    slices, _ = shifted_slices
    model = tiny_model()
    with torch.inference_mode():
        model(torch.from_numpy(slices[0].kspace)[None], torch.from_numpy(slices[0].mask), slices[0].acs)
    result = adapt(model, slices, AdaptConfig(steps=2, eval_every=1))
    assert result.steps == 2


def test_replay_adapt_scan_names_a_scan_it_cannot_adapt_on(tmp_path, small_volume, capsys):
    """A scan with no acquired line outside its ACS block cannot be split: ``--adapt scan`` is an error
    naming the file, not a quiet reconstruction with the weights as loaded."""
    from gadget.converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd
    from gadget.converters.simulate import write_fastmri
    from gadget.cli import main

    acs_only = np.zeros(48, bool)
    acs_only[20:28] = True
    src, raw = tmp_path / "acs_only.h5", tmp_path / "raw.h5"
    write_fastmri(src, small_volume, mask=acs_only, num_low_frequency=8, acceleration=6)
    convert_fastmri_to_ismrmrd(src, raw)
    base = _base_checkpoint(tmp_path / "base.pt")
    assert main(["replay", str(raw), str(tmp_path / "img.h5"), "--checkpoint", str(base), "--adapt", "scan",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "raw.h5: adapt scan" in err and "acquired lines outside the ACS block" in err
    assert not (tmp_path / "img.h5").exists()
