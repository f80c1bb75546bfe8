"""``varnet train``: config, data (fastMRI oracle), loss (fastMRI oracle), loop, resume, DDP, checkpointing."""
from __future__ import annotations

import argparse
import hashlib
import logging
import socket
import sys

import numpy as np
import pytest
import torch

from gadget.converters import simulate
from gadget.converters.simulate import simulate_volume, write_fastmri
from gadget.data.fastmri_file import write_atomic_h5
from gadget.data.mrd_header import build_header_xml
from gadget.model.checkpoint import load_checkpoint
from gadget.model.varnet import VarNet
from gadget.mri.masks import MaskSpec
from gadget.train import config as tconfig
from gadget.train.config import TrainConfig, TrainConfigError, build_config, load_config, parse_override
from gadget.train.data import SliceDataset, collate
from gadget.train.losses import l1_loss, ssim_loss
from gadget.train.trainer import STATE_FORMAT, Trainer, TrainingVarNet
from tests.conftest import equispaced_mask

TINY = {"num_cascades": 2, "chans": 4, "pools": 2, "sens_chans": 2, "sens_pools": 2}


def _narrow_header_file(path, vol):
    """A train-layout file whose header acquires only phase columns 2..W-3 (padding (2, W-2))."""
    s, c, readout, w = vol.kspace.shape
    h = vol.target.shape[-2]
    header = build_header_xml(encoded_matrix=(readout, w, 1), recon_matrix=(h, w, 1),
                              encoded_fov_mm=(480, 240, 5), recon_fov_mm=(240, 240, 5),
                              e1_max=w - 5, e1_center=w // 2 - 2, num_coils=c, num_slices=s)
    write_atomic_h5(path, {"kspace": vol.kspace, "reconstruction_rss": vol.target_rss,
                           "target_noise_free": vol.target, "ismrmrd_header": header},
                    {"max": float(vol.target_rss.max()), "norm": 1.0, "acquisition": "SIM", "patient_id": "x"})


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """train/: 2 volumes (one with a narrowed acquired range); val/: 2 volumes. 2 slices, 4 coils, 32×32."""
    root = tmp_path_factory.mktemp("train_data")
    for sub, seeds in (("train", (11, 12)), ("val", (13, 14))):
        (root / sub).mkdir()
        for seed in seeds:
            vol = simulate_volume(num_slices=2, num_coils=4, recon_size=(32, 32), seed=seed)
            if seed == 12:
                _narrow_header_file(root / sub / f"sim_{seed}.h5", vol)
            else:
                write_fastmri(root / sub / f"sim_{seed}.h5", vol)
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models gain nothing from 2 threads, and OpenMP spin-waits make 2 threads on a busy
    2-core machine many times slower than 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(data_dirs, out_dir, *overrides, model=TINY):
    return build_config({"model": model}, [
        f"data.train_dirs=[{data_dirs / 'train'}]", f"data.val_dirs=[{data_dirs / 'val'}]",
        "data.num_workers=0", f"run.out_dir={out_dir}", "run.log_every=1", "run.tensorboard=false",
        *overrides])


def _params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- config


def test_defaults_are_the_seed_recipe_and_default_yaml_restates_them():
    cfg = TrainConfig()
    assert (cfg.model.num_cascades, cfg.model.chans, cfg.model.sens_chans) == (12, 18, 8)
    assert (cfg.optim.lr, cfg.loss.kind, cfg.data.mask) == (3e-4, "ssim", "random")
    assert (cfg.data.center_fractions, cfg.data.accelerations) == ([0.08, 0.04], [4.0, 8.0])
    assert load_config(tconfig.presets_dir() / "default.yaml") == cfg
    small = load_config(tconfig.resolve_config_path("cpu-small"))
    assert small.model.num_cascades < 12 and small.run.device == "cpu"


def test_unknown_keys_are_rejected_with_the_known_ones():
    with pytest.raises(TrainConfigError, match=r"unknown setting 'optim.learning_rate'.*known in 'optim': lr"):
        build_config({"optim": {"learning_rate": 1e-3}})
    with pytest.raises(TrainConfigError, match=r"unknown section 'trainer'.*model, data, optim, loss, run"):
        build_config({"trainer": {}})
    with pytest.raises(TrainConfigError, match="unknown setting 'model.cascades'"):
        build_config({}, ["model.cascades=4"])
    with pytest.raises(TrainConfigError, match="not a valid int"):
        build_config({}, ["optim.epochs=many"])
    with pytest.raises(TrainConfigError, match="data.mask"):
        build_config({}, ["data.mask=radial"])
    with pytest.raises(TrainConfigError, match="pair up"):
        build_config({}, ["data.accelerations=[4]"])


def test_set_overrides_parse_as_yaml():
    assert parse_override("optim.lr=0.001") == ("optim", "lr", 0.001)
    assert parse_override("data.accelerations=[4, 8]") == ("data", "accelerations", [4, 8])
    cfg = build_config({}, ["optim.lr=1e-3", "model.num_cascades=4", "data.train_dirs=a,b",
                            "data.val_dirs=c", "run.resume=null", "run.activation_checkpointing=true",
                            "data.center_fractions=[0.08]", "data.accelerations=[4]"])
    assert cfg.optim.lr == 1e-3 and cfg.model.num_cascades == 4
    assert cfg.data.train_dirs == ["a", "b"] and cfg.data.val_dirs == ["c"]
    assert cfg.run.resume is None and cfg.run.activation_checkpointing is True
    assert cfg.data.accelerations == [4.0] and isinstance(cfg.data.accelerations[0], float)
    with pytest.raises(TrainConfigError, match="section.key=value"):
        parse_override("optim.lr")


def test_cli_parses_set_and_prints_the_resolved_config(capsys):
    from gadget.cli import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--config", "cpu-small", "--set", "optim.lr=1e-3",
                              "--set", "model.num_cascades=3", "--print-config"])
    assert args.overrides == ["optim.lr=1e-3", "model.num_cascades=3"]
    assert args.run(args) == 0
    printed = load_config_text(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 1e-3 and printed["model"]["num_cascades"] == 3

    from gadget.cli import UserError
    bad = parser.parse_args(["train", "--config", "cpu-small", "--set", "optim.lrr=1"])
    with pytest.raises(UserError, match="unknown setting 'optim.lrr'"):
        bad.run(bad)


def load_config_text(text):
    import yaml
    return yaml.safe_load(text)


# ----------------------------------------------------------------------------- loss


def test_ssim_loss_equals_fastmri_ssimloss():
    losses = pytest.importorskip("fastmri.losses")
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 40, 36, generator=g, dtype=torch.float64) * 1e-3
    output = (target + 2e-4 * torch.randn(3, 1, 40, 36, generator=g, dtype=torch.float64)).abs()
    data_range = target.amax(dim=(1, 2, 3))
    ref = losses.SSIMLoss().double()(output, target, data_range)
    ours = ssim_loss(output, target, data_range)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)
    ref32 = losses.SSIMLoss()(output.float(), target.float(), data_range.float())
    assert abs(float(ssim_loss(output[:, 0].float(), target[:, 0].float(), data_range.float())) - float(ref32)) < 1e-6
    assert float(ssim_loss(target, target, data_range)) == pytest.approx(0.0, abs=1e-12)
    assert float(l1_loss(target, target + 1e-4, data_range)) == pytest.approx(float((1e-4 / data_range).mean()))


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("kind", ["random", "equispaced-fraction"])
def test_dataset_matches_fastmri_slice_dataset(data_dirs, kind):
    """Validation samples (mask seeded by file name) equal fastMRI's SliceDataset + VarNetDataTransform,
    including the padding restriction of the narrowed file."""
    mri_data = pytest.importorskip("fastmri.data.mri_data")
    from fastmri.data import subsample, transforms

    funcs = {"random": subsample.RandomMaskFunc, "equispaced-fraction": subsample.EquispacedMaskFractionFunc}
    ref = mri_data.SliceDataset(data_dirs / "train", "multicoil", transform=transforms.VarNetDataTransform(
        mask_func=funcs[kind]([0.08, 0.04], [4, 8]), use_seed=True))
    ours = SliceDataset([data_dirs / "train"], MaskSpec(kind, [0.08, 0.04], [4, 8]),
                        target="reconstruction_rss", fixed_masks=True)
    assert len(ref) == len(ours) == 4
    by_key = {(s.fname, s.slice_num): s for s in (ours[i] for i in range(len(ours)))}
    narrowed = 0
    for r in ref:
        o = by_key[(r.fname, r.slice_num)]
        assert torch.equal(torch.view_as_real(o.masked_kspace), r.masked_kspace)
        assert torch.equal(o.mask, r.mask.reshape(-1))
        assert o.num_low_frequencies == r.num_low_frequencies
        assert torch.equal(o.target, r.target)
        assert o.max_value == r.max_value and tuple(o.crop_size) == tuple(int(c) for c in r.crop_size)
        narrowed += int(not o.mask[:2].any() and not o.mask[-2:].any())
    assert narrowed >= 2  # the narrowed file's masks lost their edge columns, as in fastMRI


def test_training_masks_vary_per_slice_and_epoch_but_repeat_exactly(data_dirs):
    spec = MaskSpec("random", [0.08], [4])
    ds = SliceDataset([data_dirs / "train"], spec, fixed_masks=False, seed=5)
    assert ds.target_keys == [simulate.NOISE_FREE_TARGET]  # auto prefers the noise-free target
    first = [ds.mask_for(i)[0] for i in range(len(ds))]
    ds.set_epoch(1)
    second = [ds.mask_for(i)[0] for i in range(len(ds))]
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))
    ds.set_epoch(0)
    assert all(np.array_equal(a, ds.mask_for(i)[0]) for i, a in enumerate(first))
    val = SliceDataset([data_dirs / "val"], spec, fixed_masks=True)
    a, b = val.volume_slices(0)
    assert np.array_equal(val.mask_for(a)[0], val.mask_for(b)[0])  # one mask per volume


def test_test_layout_files_keep_their_mask_and_acs_count(tmp_path):
    vol = simulate_volume(num_slices=2, num_coils=4, recon_size=(32, 32), seed=3)
    mask = equispaced_mask(32, 4, 6)
    write_fastmri(tmp_path / "t.h5", vol, mask=mask, num_low_frequency=6, acceleration=4, keep_targets=True)
    ds = SliceDataset([tmp_path], None, fixed_masks=True)
    s = ds[1]
    assert torch.equal(s.mask, torch.from_numpy(mask)) and s.num_low_frequencies == 6
    assert torch.equal(s.masked_kspace, torch.from_numpy(vol.kspace[1] * mask))
    assert s.max_value == pytest.approx(float(vol.target.max()))


def test_collate_stacks_same_shapes_and_refuses_mixed(data_dirs, tmp_path):
    ds = SliceDataset([data_dirs / "train"], MaskSpec("random", [0.08], [4]), seed=1)
    batch = collate([ds[0], ds[1]])
    assert batch.masked_kspace.shape == (2, 4, 64, 32) and batch.mask.shape == (2, 1, 1, 32)
    assert batch.num_low_frequencies.tolist() == [3, 3] and batch.max_value.shape == (2,)
    write_fastmri(tmp_path / "big.h5", simulate_volume(num_slices=1, num_coils=4, recon_size=(40, 32), seed=1))
    other = SliceDataset([tmp_path], MaskSpec("random", [0.08], [4]))
    with pytest.raises(ValueError, match="batch_size > 1 needs slices of one shape"):
        collate([ds[0], other[0]])
    with pytest.raises(TrainConfigError, match="data.batch_size=2 needs slices of one shape"):
        Trainer(_config(data_dirs, tmp_path / "run", "data.batch_size=2",
                        f"data.val_dirs=[{tmp_path}, {data_dirs / 'val'}]"))


# ----------------------------------------------------------------------------- model wrapper


def test_activation_checkpointing_gives_the_same_gradients(data_dirs):
    """In float64, so that the per-coil split of the sensitivity U-Net (another summation order for
    its weight gradients) stays at rounding level (≈ 1e-16) and the bound can be tight."""
    ds = SliceDataset([data_dirs / "train"], MaskSpec("random", [0.08], [4]), fixed_masks=True)
    batch = collate([ds[0], ds[1]])
    kspace, target = batch.masked_kspace.to(torch.complex128), batch.target.double()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(3)
        net = TrainingVarNet(VarNet(**TINY).double(), activation_checkpointing=ckpt)
        out = net(kspace, batch.mask, batch.num_low_frequencies)
        ssim_loss(out[..., 16:48, :], target, batch.max_value.double()).backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, rtol=1e-10, atol=1e-13 * float(g.abs().max() + 1)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_and_checkpointing_train_on_cuda(data_dirs, tmp_path, amp):
    cfg = _config(data_dirs, tmp_path / amp, "run.device=cuda", f"run.amp={amp}",
                  "run.activation_checkpointing=true", "optim.epochs=1", "run.max_steps_per_epoch=3")
    summary = Trainer(cfg).fit()
    assert summary["steps"] == 3 and np.isfinite(summary["best_metrics"]["ssim"])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_the_unets_in_reduced_precision_on_cpu(data_dirs, tmp_path, amp):
    cfg = _config(data_dirs, tmp_path / amp, "run.device=cpu", f"run.amp={amp}",
                  "run.activation_checkpointing=true", "optim.epochs=1", "run.max_steps_per_epoch=2")
    trainer = Trainer(cfg)
    seen = set()
    conv = trainer.model.cascades[0].model.unet.down_sample_layers[0].layers[0]
    conv.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
    before = conv.weight.detach().clone()
    summary = trainer.fit()
    assert seen == {torch.bfloat16 if amp == "bf16" else torch.float16}
    assert conv.weight.dtype == torch.float32 and not torch.equal(conv.weight.detach(), before)  # fp32 master weights, updated
    assert summary["steps"] == 2 and np.isfinite(summary["best_metrics"]["ssim"])


# ----------------------------------------------------------------------------- loop


def test_training_lowers_the_loss(data_dirs, tmp_path):
    """30 steps on one volume: the (fixed-mask) loss on that volume goes down, for SSIM and L1."""
    vol_dir = data_dirs / "val"
    for kind in ("ssim", "l1"):
        cfg = _config(data_dirs, tmp_path / kind, f"data.train_dirs=[{vol_dir}]", f"data.val_dirs=[{vol_dir}]",
                      f"loss.kind={kind}", "optim.lr=3e-3", "optim.epochs=1", "run.max_steps_per_epoch=30",
                      "data.mask=equispaced-fraction", "data.center_fractions=[0.08]", "data.accelerations=[4]")
        trainer = Trainer(cfg)
        trainer.train_set.volumes = trainer.train_set.volumes[:1]  # one volume, 2 slices, cycled
        trainer.train_set.index = trainer.train_set.index[:2] * 15
        before = trainer.validate()["val_loss"]
        summary = trainer.fit()
        assert summary["steps"] == 30
        after = summary["history"][-1]["val_loss"]
        assert after < 0.9 * before, (kind, before, after)


def test_cli_run_writes_logs_and_a_loadable_best_checkpoint(data_dirs, tmp_path, capsys):
    from gadget.cli import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    out = tmp_path / "run"
    args = parser.parse_args(["train", "--config", "cpu-small"] + [x for kv in (
        f"model.num_cascades={TINY['num_cascades']}", f"model.chans={TINY['chans']}", "model.pools=2",
        "model.sens_chans=2", "model.sens_pools=2", f"data.train_dirs=[{data_dirs / 'train'}]",
        f"data.val_dirs=[{data_dirs / 'val'}]", "data.num_workers=1", f"run.out_dir={out}",
        "optim.epochs=2", "run.max_steps_per_epoch=2", "run.log_every=1") for x in ("--set", kv)])
    assert args.run(args) == 0
    assert "best val SSIM" in capsys.readouterr().out
    assert {"config.yaml", "train_log.csv", "val_metrics.csv", "best.pt", "final.pt", "last.pt", "tensorboard"} <= \
        {p.name for p in out.iterdir()}
    assert load_config(out / "config.yaml").run.out_dir == str(out)
    lines = (out / "train_log.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,loss,lr,seconds" and len(lines) == 5
    assert (out / "val_metrics.csv").read_text().splitlines()[0].startswith("epoch,step,val_loss,nmse,psnr,ssim")

    loaded = load_checkpoint(out / "best.pt")
    d = loaded.description
    assert loaded.config.num_cascades == TINY["num_cascades"] and loaded.kind == "varnet-gadget"
    assert d["train_volumes"] == 2 and d["train_slices"] == 4 and d["val_volumes"] == 2
    assert d["mask"] == "random" and d["accelerations"] == [4.0, 8.0] and d["center_fractions"] == [0.08, 0.04]
    assert d["train_dirs"] == [str(data_dirs / "train")] and d["steps"] in (2, 4)
    assert set(d["val_metrics"]) >= {"nmse", "psnr", "ssim"} and d["training_time_s"] > 0
    assert d["package_version"]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["format"] == STATE_FORMAT and state["global_step"] == 4 and state["epoch"] == 2


def test_tensorboard_missing_is_a_warning_not_silent(data_dirs, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    cfg = _config(data_dirs, tmp_path, "run.tensorboard=true", "optim.epochs=1", "run.max_steps_per_epoch=1",
                  "data.val_dirs=[]", "data.batch_size=2")
    with caplog.at_level(logging.WARNING, logger="gadget.train.trainer"):
        Trainer(cfg).fit()
    assert sum("TensorBoard is not installed" in r.message for r in caplog.records) == 1
    assert (tmp_path / "train_log.csv").exists() and not (tmp_path / "best.pt").exists()
    assert load_checkpoint(tmp_path / "final.pt").description["batch_size"] == 2


def test_existing_run_is_not_overwritten(data_dirs, tmp_path):
    (tmp_path / "last.pt").write_bytes(b"x")
    with pytest.raises(TrainConfigError, match="already holds a run"):
        Trainer(_config(data_dirs, tmp_path))


# ----------------------------------------------------------------------------- resume


def _straight_and_split(data_dirs, tmp_path, straight, first, second):
    base = ("optim.lr=1e-3", "optim.lr_step_size=1", "optim.lr_gamma=0.5", "data.val_dirs=[]")
    a = Trainer(_config(data_dirs, tmp_path / "a", *base, *straight))
    a.fit()
    b = Trainer(_config(data_dirs, tmp_path / "b", *base, *first))
    try:
        b.fit()
    except KeyboardInterrupt:
        pass
    c = Trainer(_config(data_dirs, tmp_path / "b", *base, *second, f"run.resume={tmp_path / 'b' / 'last.pt'}"))
    c.fit()
    return a, c


def test_resume_at_an_epoch_boundary_is_bitwise_identical(data_dirs, tmp_path):
    a, c = _straight_and_split(data_dirs, tmp_path, ("optim.epochs=2", "run.max_steps_per_epoch=2"),
                               ("optim.epochs=1", "run.max_steps_per_epoch=2"),
                               ("optim.epochs=2", "run.max_steps_per_epoch=2"))
    assert c.progress.global_step == a.progress.global_step == 4
    for k, v in _params(a.model).items():
        assert torch.equal(v, c.model.state_dict()[k]), k
    sa, sc = a.optimizer.state_dict(), c.optimizer.state_dict()
    assert sa["param_groups"][0]["lr"] == sc["param_groups"][0]["lr"] == 1e-3 * 0.25
    for i, st in sa["state"].items():
        assert torch.equal(st["exp_avg_sq"], sc["state"][i]["exp_avg_sq"]) and float(st["step"]) == 4


def test_resume_in_the_middle_of_an_epoch_is_bitwise_identical(data_dirs, tmp_path, monkeypatch):
    calls = {"first": 0, "resumed": 0}
    original = Trainer.train_step

    def crash_on_third(self, batch):
        if self.config.run.resume:
            calls["resumed"] += 1
        elif self.config.run.save_every:
            calls["first"] += 1
            if calls["first"] == 3:
                raise KeyboardInterrupt  # a killed job: last.pt holds step 2 of 4
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", crash_on_third)
    a, c = _straight_and_split(data_dirs, tmp_path, ("optim.epochs=1",), ("optim.epochs=1", "run.save_every=2"),
                               ("optim.epochs=1", "run.save_every=2"))
    assert calls == {"first": 3, "resumed": 2}  # crashed in step 3, resumed steps 3 and 4
    assert c.progress.global_step == a.progress.global_step == 4
    for k, v in _params(a.model).items():
        assert torch.equal(v, c.model.state_dict()[k]), k


# ----------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig, out_dir: str) -> None:
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    trainer = Trainer(cfg)
    summary = trainer.fit()
    digest = hashlib.sha256()
    for k, v in sorted(trainer.model.state_dict().items()):
        digest.update(k.encode() + v.detach().cpu().numpy().tobytes())
    with open(f"{out_dir}/rank{rank}.txt", "w") as f:
        f.write(f"{digest.hexdigest()} {summary['steps']} {summary['best_metrics']['ssim']!r} "
                f"{summary['best_metrics']['num_volumes']}\n")


def test_ddp_two_cpu_processes_keep_identical_weights(data_dirs, tmp_path):
    import torch.multiprocessing as mp

    cfg = _config(data_dirs, tmp_path / "run", "optim.epochs=1", "run.max_steps_per_epoch=2")
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = ((tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert r0 == r1  # same weights, steps and (gathered) validation SSIM on both ranks
    assert r0[1] == "2" and r0[3] == "2"  # 2 steps each; both val volumes scored
    start = hashlib.sha256()
    torch.manual_seed(cfg.run.seed)
    for k, v in sorted(VarNet(**TINY).state_dict().items()):
        start.update(k.encode() + v.numpy().tobytes())
    assert r0[0] != start.hexdigest()  # the weights did move
    assert (tmp_path / "run" / "best.pt").exists()
    assert len((tmp_path / "run" / "train_log.csv").read_text().splitlines()) == 3  # rank 0 logs, once per step


# ----------------------------------------------------------------------------- fine-tuning


def test_init_from_copies_weights_and_may_change_the_output(data_dirs, tmp_path):
    first = Trainer(_config(data_dirs, tmp_path / "a", "optim.epochs=1", "run.max_steps_per_epoch=2"))
    first.fit()
    source = load_checkpoint(tmp_path / "a" / "best.pt")
    cfg = _config(data_dirs, tmp_path / "b", f"run.init_from={tmp_path / 'a' / 'best.pt'}", "model.output=sense",
                  "optim.epochs=1", "run.max_steps_per_epoch=1", "run.seed=7")
    second = Trainer(cfg)
    for name, value in source.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value), name
    assert second.model.config.output == "sense"
    second.fit()
    tuned = load_checkpoint(tmp_path / "b" / "best.pt")
    assert tuned.config.output == "sense"
    assert tuned.description["init_from"]["sha256"] == source.sha256
    resumed = Trainer(build_config(cfg.to_dict(), [f"run.resume={tmp_path / 'b' / 'last.pt'}", "optim.epochs=2"]))
    resumed.fit()
    assert load_checkpoint(tmp_path / "b" / "final.pt").description["init_from"]["sha256"] == source.sha256


def test_init_from_takes_the_resume_state_of_a_stopped_run(data_dirs, tmp_path):
    from gadget.train.trainer import read_training_state, training_state_description

    Trainer(_config(data_dirs, tmp_path / "a", "optim.epochs=1", "run.max_steps_per_epoch=2")).fit()
    state_path = tmp_path / "a" / "last.pt"
    state = read_training_state(state_path, "run.resume")
    second = Trainer(_config(data_dirs, tmp_path / "b", f"run.init_from={state_path}", "optim.epochs=1",
                             "run.max_steps_per_epoch=1", "run.seed=7"))
    for name, value in state["model"].items():
        assert torch.equal(second.model.state_dict()[name], value), name
    assert second.init_source["path"] == str(state_path.resolve())
    record = training_state_description(state)
    assert record["steps"] == 2 and record["loss"] == "ssim" and record["training_time_s"] > 0
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainConfigError, match="run.init_from: .*garbage.pt"):
        Trainer(_config(data_dirs, tmp_path / "c", f"run.init_from={garbage}"))
    with pytest.raises(TrainConfigError, match="run.resume: .*garbage.pt.*not a readable training state"):
        read_training_state(garbage, "run.resume")


def test_init_from_refuses_another_architecture_and_bad_outputs(data_dirs, tmp_path):
    Trainer(_config(data_dirs, tmp_path / "a", "optim.epochs=1", "run.max_steps_per_epoch=1")).fit()
    with pytest.raises(TrainConfigError, match=r"does not match model settings.*chans 4 vs 6"):
        Trainer(_config(data_dirs, tmp_path / "b", f"run.init_from={tmp_path / 'a' / 'best.pt'}", "model.chans=6"))
    with pytest.raises(TrainConfigError, match="run.init_from: .*nothere.pt"):
        Trainer(_config(data_dirs, tmp_path / "c", f"run.init_from={tmp_path / 'nothere.pt'}"))
    with pytest.raises(TrainConfigError, match="'model.output' = 'mean' must be one of rss, sense"):
        _config(data_dirs, tmp_path / "d", "model.output=mean")
