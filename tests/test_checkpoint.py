"""Checkpoint formats: plain fastMRI state dict, Lightning .ckpt, ours; errors are one line."""
import pytest
import torch

from gadget.cli import main
from gadget.model.checkpoint import CheckpointError, infer_config, load_checkpoint, save_checkpoint
from gadget.model.varnet import VarNet, VarNetConfig

SMALL = VarNetConfig(num_cascades=2, chans=5, pools=2, sens_chans=3, sens_pools=3)


def _model(seed=1):
    torch.manual_seed(seed)
    return VarNet.from_config(SMALL)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_plain_state_dict_infers_hyperparameters(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    loaded = load_checkpoint(tmp_path / "plain.pt")
    assert loaded.kind == "fastmri-state-dict"
    assert loaded.config == SMALL
    assert _same_weights(loaded.model, model)
    assert not loaded.model.training


def test_default_config_inferred_from_reference_state_dict(tmp_path):
    fastmri_models = pytest.importorskip("fastmri.models")
    ref = fastmri_models.VarNet()
    assert infer_config(ref.state_dict()) == VarNetConfig()


def test_loaded_model_holds_the_file_in_float32_and_trains(tmp_path):
    """The model is built on the meta device and takes the file's tensors: nothing may stay on meta, a
    float64 file loads as float32 with the same values, and the parameters still take gradients."""
    model = _model(4)
    torch.save({k: v.double() for k, v in model.state_dict().items()}, tmp_path / "double.pt")
    loaded = load_checkpoint(tmp_path / "double.pt").model
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert tensors and not any(t.is_meta for t in tensors)
    assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    assert _same_weights(loaded, model)
    assert all(p.requires_grad and isinstance(p, torch.nn.Parameter) for p in loaded.parameters())
    k = torch.randn(1, 2, 16, 16, dtype=torch.complex64)
    mask = torch.zeros(1, 1, 1, 16, dtype=torch.bool)
    mask[..., ::2] = True
    loaded.train()
    loaded(k * mask, mask, 4).sum().backward()
    assert all(p.grad is not None for p in loaded.sens_net.parameters())


def test_variant_with_unsaved_buffers_loads_them(tmp_path):
    """The ``vn`` variant's RBF centres are a non-persistent buffer no file holds: they are built, not meta."""
    config = VarNetConfig(num_cascades=1, variant="vn")
    torch.manual_seed(5)
    model = VarNet.from_config(config)
    save_checkpoint(tmp_path / "vn.pt", model)
    loaded = load_checkpoint(tmp_path / "vn.pt").model
    assert _same_weights(loaded, model)
    buffers = dict(loaded.named_buffers())
    centres = [name for name in buffers if name.endswith("centres")]
    assert centres and all(torch.equal(buffers[n], dict(model.named_buffers())[n]) for n in centres)


def test_lightning_checkpoint(tmp_path):
    model = _model(2)
    ckpt = {"epoch": 3, "global_step": 10,
            "state_dict": {f"varnet.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"num_cascades": 2, "pools": 2, "chans": 5, "sens_pools": 3,
                                 "sens_chans": 3, "lr": 0.0003}}
    torch.save(ckpt, tmp_path / "model.ckpt")
    loaded = load_checkpoint(tmp_path / "model.ckpt")
    assert loaded.kind == "lightning" and loaded.config == SMALL
    assert _same_weights(loaded.model, model)


def test_own_format_round_trip_keeps_description(tmp_path):
    model = _model(3)
    desc = {"data": "simulated phantom", "masks": "equispaced 4x", "version": "test"}
    save_checkpoint(tmp_path / "ours.pt", model, desc)
    raw = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert raw["format"] == "varnet-gadget" and raw["config"] == SMALL.to_dict()
    loaded = load_checkpoint(tmp_path / "ours.pt")
    assert loaded.kind == "varnet-gadget" and loaded.description == desc and loaded.config == SMALL
    assert _same_weights(loaded.model, model)
    assert len(loaded.sha256) == 64
    assert not list(tmp_path.glob("*.partial"))


def test_mismatch_names_missing_and_unexpected_keys(tmp_path):
    state = _model().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["cascades.1.dc_weight"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "bad.pt")
    msg = str(info.value)
    assert "cascades.1.dc_weight" in msg and "extra.weight" in msg and "\n" not in msg


def test_shape_mismatch_with_explicit_config(tmp_path):
    torch.save(_model().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_checkpoint(tmp_path / "plain.pt", VarNetConfig(num_cascades=2, chans=6, pools=2,
                                                            sens_chans=3, sens_pools=3))


@pytest.mark.parametrize("content,expected", [
    (None, "checkpoint not found"),
    (b"this is not a checkpoint", "not a readable PyTorch checkpoint"),
])
def test_bad_paths_give_one_line_errors(tmp_path, capsys, content, expected, test_format_file):
    path = tmp_path / "ckpt.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)
    # through the CLI: one line on stderr, exit status 2, no traceback
    code = main(["infer", "--checkpoint", str(path), "--input", str(test_format_file), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: a checkpoint that needs arbitrary unpickling is rejected, not executed."""
    import argparse  # Lightning files may pickle a Namespace of hyperparameters: not a plain tensor type

    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(chans=5)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "evil.pt")


def test_missing_shipped_weights_is_a_clear_error(monkeypatch):
    """No checkpoint given → the shipped weights; when they are absent, say so (no silent fallback)."""
    import gadget.model.shipped as shipped
    from gadget.recon.config import ReconConfig
    from gadget.recon.pipeline import build_engine

    monkeypatch.setattr(shipped, "SHIPPED_NAME", "no_such_weights.pt")
    with pytest.raises(CheckpointError, match="shipped weights no_such_weights.pt are missing.*--checkpoint"):
        build_engine(ReconConfig())
    engine, model_id = build_engine(ReconConfig(mode="zero-filled"))  # no model needed
    assert engine is None
