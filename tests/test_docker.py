"""Deployment glue that can be tested without a Docker engine: each image's exec-form entrypoint
parses and starts a server that answers a client (with the shipped weights when no model is
mounted, with the documented mount otherwise); the Gadgetron image's chains name an importable
target; Dockerfile, chains and the checkpoint rule agree on one model location."""
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from gadget.cli import main
from gadget.model.checkpoint import CheckpointError, save_checkpoint
from gadget.model.shipped import (CHECKPOINT_ENV, CONTAINER_MODEL_PATH, SHIPPED_NAME, resolve_checkpoint,
                                  shipped_checkpoint)
from gadget.model.varnet import VarNet
from gadget.recon.config import ReconConfig
from gadget.stream.codec import MessageId, MessageWriter
from tests.server_harness import read_until_close

ROOT = Path(__file__).resolve().parents[1]
CHAINS = sorted((ROOT / "pipelines").glob("*.xml"))
TINY = dict(num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1)


def _stage(name):
    text = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)
    return next(s for s in stages if re.match(rf"\S+ AS {name}\b", s))


def _exec_form(stage, instruction):
    match = re.search(rf"^{instruction} (\[.*\])$", stage, flags=re.M)
    assert match, f"{instruction} must be in exec form (a JSON list)"
    return json.loads(match.group(1))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_entrypoint(stage_name, config_name, env_extra=None):
    """Start the stage's ENTRYPOINT + CMD here (port and host swapped for a free local port), send
    CONFIG_FILE ``config_name`` then CLOSE, expect CLOSE back; return the server's output."""
    argv = _exec_form(_stage(stage_name), "ENTRYPOINT") + _exec_form(_stage(stage_name), "CMD")
    assert argv[:2] == ["varnet", "serve"] and "9002" in argv and "0.0.0.0" in argv
    port = _free_port()
    argv = [a.replace("9002", str(port)).replace("0.0.0.0", "127.0.0.1") for a in argv]
    env = {k: v for k, v in os.environ.items() if k != CHECKPOINT_ENV}
    env.update(env_extra or {})
    proc = subprocess.Popen([sys.executable, "-m", "gadget.cli", "-v", *argv[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.time() < deadline, "server did not start"
                time.sleep(0.3)
        with sock:
            w = MessageWriter(sock)
            w.config_file(config_name)
            w.close()
            assert [m.id for m in read_until_close(sock)] == [MessageId.CLOSE]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    return out


# ----------------------------------------------------------------------------- images

def test_mrd_server_without_a_model_serves_the_shipped_weights():
    stage = _stage("mrd-server")
    assert re.search(r"^USER varnet$", stage, flags=re.M) and "EXPOSE 9002" in stage
    argv = _exec_form(stage, "ENTRYPOINT") + _exec_form(stage, "CMD")
    assert "--checkpoint" not in argv and CONTAINER_MODEL_PATH not in argv  # no mounted model required
    out = _run_entrypoint("mrd-server", "default")
    assert f"model weights: {shipped_checkpoint()} (shipped)" in out, out


def test_mrd_server_with_the_documented_mount_serves_that_model(tmp_path):
    ckpt = tmp_path / "model.pt"  # stands for -v model.pt:/models/model.pt
    save_checkpoint(ckpt, VarNet(**TINY))
    out = _run_entrypoint("mrd-server", "default", {CHECKPOINT_ENV: str(ckpt)})
    assert f"model weights: {ckpt} (${CHECKPOINT_ENV})" in out, out
    assert SHIPPED_NAME not in out


def test_openrecon_image_runs_as_root_on_9002_and_answers_the_openrecon_config():
    stage = _stage("openrecon")
    users = re.findall(r"^USER (\S+)$", stage, flags=re.M)
    assert users in ([], ["root"]) and "EXPOSE 9002" in stage
    assert re.search(r"^FROM \S+ AS runtime$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    assert stage.startswith("runtime AS openrecon")  # the runtime that installs the package and its weights
    out = _run_entrypoint("openrecon", "openrecon")
    assert f"model weights: {shipped_checkpoint()} (shipped)" in out, out


def test_runtime_installs_the_package_with_its_weights():
    runtime = _stage("runtime")
    assert "COPY gadget ./gadget" in runtime and "pip install --no-cache-dir ." in runtime
    assert "shipped_checkpoint()" in runtime  # the build fails if the weights did not get installed
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^"gadget\.weights" = \[.*"\*\.pt"', pyproject, flags=re.M)
    assert (ROOT / "gadget" / "weights" / SHIPPED_NAME).is_file()


def test_gadgetron_target_installs_package_and_chains():
    stage = _stage("gadgetron")
    assert "ARG GADGETRON_IMAGE" in (ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir /opt/varnet-gadget" in stage
    assert "pipelines/*.xml" in stage and "GADGETRON_CONFIG_DIR" in stage
    assert "torch==${TORCH_VERSION}" in stage


@pytest.mark.parametrize("chain", CHAINS, ids=lambda p: p.name)
def test_gadgetron_chain_targets_import(chain):
    """What Gadgetron runs for ``<execute name=M target=T type="python"/>``: ``python -m gadgetron
    PORT M T``, which imports M and calls M.T(connection)."""
    root = ET.parse(chain).getroot()
    executes = root.findall(".//external/execute")
    connects = root.findall(".//external/connect")
    assert executes or connects, f"{chain.name}: no external gadget"
    for ex in executes:
        assert ex.get("type") == "python"
        target = getattr(importlib.import_module(ex.get("name")), ex.get("target"))
        assert callable(target), f"{chain.name}: {ex.get('name')}.{ex.get('target')} is not callable"
    for co in connects:
        assert int(co.get("port")) == 18000  # what `varnet serve --gadgetron` listens on by default


# ----------------------------------------------------------------------------- one model location

def test_dockerfile_and_chains_agree_on_one_model_location():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"-v $PWD/model.pt:{CONTAINER_MODEL_PATH}:ro -e {CHECKPOINT_ENV}={CONTAINER_MODEL_PATH}" in dockerfile
    for stage in ("mrd-server", "openrecon"):
        argv = _exec_form(_stage(stage), "ENTRYPOINT") + _exec_form(_stage(stage), "CMD")
        assert not any("checkpoint" in a or "/models" in a for a in argv), (stage, argv)
    container_paths = re.compile(r"(?<![\w$])/[\w/.-]*\.pt")  # not the host side $PWD/model.pt
    paths = set(container_paths.findall(dockerfile))
    assert paths == {CONTAINER_MODEL_PATH}, paths
    for chain in CHAINS:
        text = chain.read_text()
        root = ET.fromstring(text)
        named = [p.get("value") for p in root.iter("property") if p.get("name") == "checkpoint"]
        assert named == [], f"{chain.name} names a checkpoint {named}; the shipped chains must run as shipped"
        assert set(container_paths.findall(text)) <= {CONTAINER_MODEL_PATH}, chain.name
        if root.findall(".//external/execute"):
            assert CHECKPOINT_ENV in text, f"{chain.name}: the comment must say how to choose weights"


def test_checkpoint_rule_explicit_then_environment_then_shipped(tmp_path, monkeypatch):
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    assert resolve_checkpoint(None) == str(shipped_checkpoint())
    mounted = tmp_path / "model.pt"
    mounted.write_bytes(b"x")
    monkeypatch.setenv(CHECKPOINT_ENV, str(mounted))
    assert resolve_checkpoint(None) == str(mounted)
    assert resolve_checkpoint("/given.pt") == "/given.pt"
    monkeypatch.setenv(CHECKPOINT_ENV, str(tmp_path / "absent.pt"))
    with pytest.raises(CheckpointError, match=f"{CHECKPOINT_ENV} names '.*absent.pt', which is not a file"):
        resolve_checkpoint(None)


def test_every_door_follows_the_environment_variable(tmp_path, monkeypatch, capsys):
    """The engine builder (serve, the Gadgetron target and replay load through it) and the CLI."""
    from gadget.gadgetron import shared_engine

    ckpt = tmp_path / "mine.pt"
    save_checkpoint(ckpt, VarNet(**TINY))
    monkeypatch.setenv(CHECKPOINT_ENV, str(ckpt))
    engine, model_id = shared_engine(ReconConfig(device="cpu", batch_size=3))  # Gadgetron's <execute> target
    assert engine is not None and model_id.startswith(str(ckpt))
    monkeypatch.setenv(CHECKPOINT_ENV, str(tmp_path / "absent.pt"))
    scan = tmp_path / "scan.h5"
    scan.write_bytes(b"")
    assert main(["replay", str(scan), str(tmp_path / "out.h5")]) == 2
    assert f"{CHECKPOINT_ENV} names" in capsys.readouterr().err
    assert main(["infer", "--input", str(tmp_path), "--output", str(tmp_path / "inf")]) == 2
    assert f"{CHECKPOINT_ENV} names" in capsys.readouterr().err
