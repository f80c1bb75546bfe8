"""The default refine comes from the checkpoint: fastMRI, bare and Lightning state dicts get
``none`` and so fastMRI's own output through every door (infer, replay, serve, the Gadgetron target);
our checkpoints get what their description records (the shipped weights: ``pi``); a refine given
explicitly always wins; the log says which applied."""
import logging

import h5py
import numpy as np
import pytest
import torch

from gadget.converters.fastmri_to_ismrmrd import convert_fastmri_to_ismrmrd
from gadget.converters.simulate import simulate_volume, write_fastmri
from gadget.cli import main
from gadget.data.mrd_file import iter_acquisitions, read_header_xml
from gadget.model.checkpoint import (CheckpointError, default_refine, load_checkpoint, resolve_refine,
                                     save_checkpoint)
from gadget.model.shipped import shipped_checkpoint
from gadget.model.varnet import VarNet
from gadget.recon.config import ConfigError, ReconConfig
from gadget.recon.refine_stage import Refiner
from gadget.stream.images import image_magnitude
from gadget.stream.sinks import read_images_h5
from gadget.stream.types import AcqLine
from tests.conftest import equispaced_mask
from tests.server_harness import connect, images_of, read_until_close, running, send_scan
from tests.test_infer import _reference_recon

pytest.importorskip("fastmri", reason="fastmri (test oracle) not installed")
SMALL = dict(num_cascades=2, chans=6, pools=3, sens_chans=4, sens_pools=2)
# The fastMRI path neither prewhitens nor runs a safety check; the streaming doors are told the same.
STREAM_SETTINGS = "prewhiten: false\nfallback: none\n"
TOL = 1e-5  # relative error to fastMRI's reference


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One set of weights in four files: a bare (fastMRI-style) state dict, a Lightning .ckpt, and our
    format with and without a recorded refine."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(23)
    model = VarNet(**SMALL)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, d / "fastmri_state_dict.pt")
    torch.save({"state_dict": {f"varnet.{k}": v for k, v in state.items()}, "hyper_parameters": SMALL},
               d / "lightning.ckpt")
    save_checkpoint(d / "ours_pi.pt", model, {"data": "random init (test)", "refine": "pi"})
    save_checkpoint(d / "ours_plain.pt", model, {"data": "random init (test)"})
    return {"state": state, "bare": d / "fastmri_state_dict.pt", "lightning": d / "lightning.ckpt",
            "pi": d / "ours_pi.pt", "plain": d / "ours_plain.pt"}


@pytest.fixture(scope="module")
def scan(tmp_path_factory, weights):
    """A small fastMRI test-format file, fastMRI's reconstruction of it with the weights, and the file as a
    raw ISMRMRD scan (its header XML, acquisitions and path)."""
    d = tmp_path_factory.mktemp("scan")
    (d / "input").mkdir()
    path = d / "input" / "file_sim_023.h5"
    write_fastmri(path, simulate_volume(num_slices=2, num_coils=4, recon_size=(48, 32), seed=23),
                  mask=equispaced_mask(32, 4, 8), num_low_frequency=8, acceleration=4)
    reference = _reference_recon(path.parent, weights["state"], SMALL)[path.name]
    raw = d / "raw.h5"
    convert_fastmri_to_ismrmrd(path, raw)
    lines = [AcqLine(h, x) for c in iter_acquisitions(raw) for h, x in zip(c.heads, c.data)]
    return dict(file=path, reference=reference, raw=raw, xml=read_header_xml(raw), lines=lines)


# --------------------------------------------------------------------------- the rule


def test_default_refine_by_checkpoint_kind(weights, tmp_path):
    def default(path):
        return default_refine(load_checkpoint(path))

    assert default(weights["bare"]) == ("none", "fastMRI state dict")
    assert default(weights["lightning"]) == ("none", "Lightning checkpoint")
    assert default(weights["plain"]) == ("none", "the checkpoint records no refine")
    assert default(weights["pi"]) == ("pi", "from the checkpoint's recipe")
    mode, reason = default(shipped_checkpoint())
    assert mode == "pi" and reason.startswith("from the checkpoint's recipe")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "bad.pt", VarNet(**SMALL), {"refine": "sense"})
    with pytest.raises(CheckpointError, match="bad.pt.*refine 'sense'.*pi, none"):
        default(tmp_path / "bad.pt")


def test_an_explicit_refine_wins_and_the_log_says_which(weights, caplog):
    bare, ours = load_checkpoint(weights["bare"]), load_checkpoint(weights["pi"])
    with caplog.at_level(logging.INFO, logger="gadget.model.checkpoint"):
        assert resolve_refine("auto", bare) == ("none", "fastMRI state dict")
        assert resolve_refine("pi", bare) == ("pi", "given")
        assert resolve_refine("auto", ours) == ("pi", "from the checkpoint's recipe")
        assert resolve_refine("none", ours) == ("none", "given")
    assert [r.getMessage() for r in caplog.records] == [
        "refine none (fastMRI state dict)", "refine pi (given)", "refine pi (from the checkpoint's recipe)",
        "refine none (given)"]


def test_config_default_is_auto_and_clients_still_cannot_set_it():
    from gadget.recon.config import client_merge

    assert ReconConfig().refine == "auto"
    assert ReconConfig().merged({"refine": "auto"}, "preset").refine == "auto"
    with pytest.raises(ConfigError, match="cannot be set by a client"):
        client_merge(ReconConfig(), {"refine": "auto"}, "client")


# --------------------------------------------------------------------------- infer


def _infer(tmp_path, scan, checkpoint, *extra) -> np.ndarray:
    out = tmp_path / f"infer-{checkpoint.stem}-{'-'.join(extra) or 'default'}"
    assert main(["infer", "--checkpoint", str(checkpoint), "--input", str(scan["file"]), "--output", str(out),
                 "--device", "cpu", *extra]) == 0
    with h5py.File(out / scan["file"].name, "r") as f:
        return f["reconstruction"][()]


def test_infer_gives_fastmri_output_for_fastmri_weights(tmp_path, scan, weights, caplog):
    with caplog.at_level(logging.INFO):
        got = _infer(tmp_path, scan, weights["bare"])
    assert "refine none (fastMRI state dict)" in caplog.messages
    assert _rel(got, scan["reference"]) < TOL
    assert _rel(_infer(tmp_path, scan, weights["lightning"]), scan["reference"]) < TOL
    assert _rel(_infer(tmp_path, scan, weights["plain"]), scan["reference"]) < TOL

    caplog.clear()
    with caplog.at_level(logging.INFO):
        forced = _infer(tmp_path, scan, weights["bare"], "--refine", "pi")  # an explicit setting wins
    assert "refine pi (given)" in caplog.messages
    assert _rel(forced, scan["reference"]) > 1e-3


def test_infer_refines_our_checkpoint_that_records_pi(tmp_path, scan, weights, caplog):
    with caplog.at_level(logging.INFO):
        got = _infer(tmp_path, scan, weights["pi"])
    assert "refine pi (from the checkpoint's recipe)" in caplog.messages
    assert _rel(got, scan["reference"]) > 1e-3  # refined: not the network's image
    assert _rel(got, _infer(tmp_path, scan, weights["bare"], "--refine", "pi")) < TOL  # same weights, same refine
    assert _rel(_infer(tmp_path, scan, weights["pi"], "--refine", "none"), scan["reference"]) < TOL


# --------------------------------------------------------------------------- replay


def _replay(tmp_path, scan, checkpoint, *extra) -> np.ndarray:
    settings = tmp_path / "stream.yaml"
    settings.write_text(STREAM_SETTINGS)
    out = tmp_path / f"replay-{checkpoint.stem}-{'-'.join(extra) or 'default'}.h5"
    assert main(["replay", str(scan["raw"]), str(out), "--config", str(settings), "--checkpoint", str(checkpoint),
                 "--device", "cpu", *extra]) == 0
    (series,) = read_images_h5(out).values()
    return np.stack([image_magnitude(im) for im in series])


def test_replay_gives_fastmri_output_for_fastmri_weights(tmp_path, scan, weights, caplog):
    with caplog.at_level(logging.INFO):
        got = _replay(tmp_path, scan, weights["bare"])
    assert "refine none (fastMRI state dict)" in caplog.messages
    assert got.shape == scan["reference"].shape
    assert _rel(got, scan["reference"]) < TOL
    assert _rel(_replay(tmp_path, scan, weights["bare"], "--refine", "pi"), scan["reference"]) > 1e-3


def test_replay_refines_our_checkpoint_that_records_pi(tmp_path, scan, weights):
    got = _replay(tmp_path, scan, weights["pi"])
    assert _rel(got, scan["reference"]) > 1e-3
    assert _rel(got, _replay(tmp_path, scan, weights["bare"], "--refine", "pi")) < TOL
    assert _rel(_replay(tmp_path, scan, weights["pi"], "--refine", "none"), scan["reference"]) < TOL


# --------------------------------------------------------------------------- serve


def _service(checkpoint, **settings):
    """What ``varnet serve`` builds: the engine from the config, batched across scans."""
    from gadget.recon.batching import BatchingEngine
    from gadget.recon.pipeline import build_engine
    from gadget.server import ReconService

    config = ReconConfig(checkpoint=str(checkpoint), device="cpu", prewhiten=False, fallback="none", **settings)
    engine, model_id = build_engine(config)
    return ReconService(config, BatchingEngine(engine, max_batch=2), model_id, idle_timeout=20.0)


def _served(port, scan, chain=None):
    with connect(port, timeout=60.0) as s:
        if chain is None:
            send_scan(s, scan["xml"], scan["lines"])
        else:
            send_scan(s, scan["xml"], scan["lines"], config_file=None, config_text=chain)
        return read_until_close(s)


def _refused(port, scan, chain) -> str:
    """A scan the server turns down once it has its config and header: the ERROR's text (no more is sent,
    as the server closes at once)."""
    with connect(port, timeout=60.0) as s:
        send_scan(s, scan["xml"], scan["lines"][:1], config_file=None, config_text=chain, close=False)
        msgs = read_until_close(s)
    assert not images_of(msgs)
    return msgs[0].payload


def _magnitudes(msgs) -> np.ndarray:
    return np.stack([image_magnitude(im) for im in images_of(msgs)])


def _chain(**properties) -> str:
    return "<configuration>" + "".join(f'<property name="{k}" value="{v}"/>'
                                       for k, v in properties.items()) + "</configuration>"


def test_serve_gives_fastmri_output_for_fastmri_weights(scan, weights, caplog):
    with caplog.at_level(logging.INFO):
        service = _service(weights["bare"])
    assert "refine none (fastMRI state dict)" in caplog.messages
    try:
        with running(service) as port:
            got = _magnitudes(_served(port, scan))
        assert _rel(got, scan["reference"]) < TOL
        with running(service, dialect="gadgetron") as port:  # the chain's refine is compared as applied
            assert _rel(_magnitudes(_served(port, scan, _chain(refine="auto"))), scan["reference"]) < TOL
            assert _rel(_magnitudes(_served(port, scan, _chain(refine="none"))), scan["reference"]) < TOL
            refused = _refused(port, scan, _chain(refine="pi"))
        assert "refine 'pi' (lambda 0) requested, but this server's model runs with refine 'none'" in refused
    finally:
        service.engine.close()


def test_serve_refines_our_checkpoint_that_records_pi_and_an_explicit_setting_wins(scan, weights):
    service = _service(weights["pi"])
    explicit = _service(weights["pi"], refine="none")  # the operator's setting wins over the recipe
    try:
        with running(service) as port:
            refined = _magnitudes(_served(port, scan))
        assert Refiner.for_config(service.config, service.engine).mode == "pi"
        assert _rel(refined, scan["reference"]) > 1e-3
        with running(service, dialect="gadgetron") as port:
            assert _rel(_magnitudes(_served(port, scan, _chain(refine="pi"))), refined) < TOL
            assert "server's model runs with refine 'pi'" in _refused(port, scan, _chain(refine="none"))
        with running(explicit) as port:
            assert _rel(_magnitudes(_served(port, scan)), scan["reference"]) < TOL
        with running(explicit, dialect="gadgetron") as port:  # auto is the checkpoint's pi, not served here
            assert "runs with refine 'none'" in _refused(port, scan, _chain(refine="auto"))
    finally:
        service.engine.close()
        explicit.engine.close()


# --------------------------------------------------------------------------- the Gadgetron target


def test_gadgetron_engine_cache_shares_the_model_and_each_chain_gets_its_refine(weights, monkeypatch):
    """The engine does not depend on refine: chains that ask for different refines share one loaded model,
    and each scan's refine stage applies its own chain's (auto: the checkpoint's)."""
    from gadget import gadgetron

    monkeypatch.setattr(gadgetron, "_ENGINES", {})
    base = ReconConfig(checkpoint=str(weights["bare"]), device="cpu")
    auto, _ = gadgetron.shared_engine(base)
    assert auto.checkpoint_refine == "none"
    chains = {"auto": base, "pi": base.merged({"refine": "pi"}, "chain"),
              "none": base.merged({"refine": "none", "refine_lambda": 0.3}, "chain")}
    for name, config in chains.items():
        engine, _ = gadgetron.shared_engine(config)
        assert engine is auto
        stage = Refiner.for_config(config, engine)
        assert stage.mode == {"auto": "none", "pi": "pi", "none": "none"}[name]
    assert Refiner.for_config(chains["none"], auto).config.lam == 0.3
    assert len(gadgetron._ENGINES) == 1


def test_gadgetron_target_gives_fastmri_output_for_fastmri_weights(tmp_path, scan, weights):
    """The real `python -m gadgetron` launch (tests/test_gadgetron.py); a chain's explicit refine is
    covered by the engine cache test above, in process."""
    from tests.test_gadgetron import _gadgetron_side

    chain = _chain(checkpoint=weights["bare"], device="cpu", prewhiten="false", fallback="none")
    msgs, code, out = _gadgetron_side(tmp_path, chain, (scan["xml"], scan["lines"]))
    assert code == 0, out
    assert "refine none (fastMRI state dict)" in out
    assert _rel(_magnitudes(msgs), scan["reference"]) < TOL

    chain = _chain(checkpoint=weights["pi"], device="cpu", prewhiten="false", fallback="none")
    msgs, code, out = _gadgetron_side(tmp_path, chain, (scan["xml"], scan["lines"]))
    assert code == 0, out
    assert "refine pi (from the checkpoint's recipe)" in out
    assert _rel(_magnitudes(msgs), scan["reference"]) > 1e-3
