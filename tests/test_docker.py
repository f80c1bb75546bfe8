"""Deployment glue that can be tested without a Docker engine: the MRD-server target's exec-form
entrypoint parses and starts a server that answers a client; the Gadgetron target ships our chains."""
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from gadget.model.checkpoint import save_checkpoint
from gadget.model.varnet import VarNet
from gadget.stream.codec import MessageId, MessageWriter
from tests.server_harness import read_until_close

ROOT = Path(__file__).resolve().parents[1]


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


def test_mrd_server_entrypoint_starts_a_server(tmp_path):
    stage = _stage("mrd-server")
    assert re.search(r"^USER varnet$", stage, flags=re.M) and "EXPOSE 9002" in stage
    argv = _exec_form(stage, "ENTRYPOINT") + _exec_form(stage, "CMD")
    assert argv[:2] == ["varnet", "serve"] and "9002" in argv
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, VarNet(num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1))
    port = _free_port()
    argv = [a.replace("/models/model.pt", str(ckpt)).replace("9002", str(port)).replace("0.0.0.0", "127.0.0.1")
            for a in argv]
    proc = subprocess.Popen([sys.executable, "-m", "gadget.cli", *argv[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.time() + 60
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
            w.config_file("default")
            w.close()
            assert [m.id for m in read_until_close(sock)] == [MessageId.CLOSE]
    finally:
        proc.terminate()
        proc.wait(10)


def test_gadgetron_target_installs_package_and_chains():
    stage = _stage("gadgetron")
    assert "ARG GADGETRON_IMAGE" in (ROOT / "Dockerfile").read_text()
    assert "pip install --no-cache-dir /opt/varnet-gadget" in stage
    assert "pipelines/*.xml" in stage and "GADGETRON_CONFIG_DIR" in stage
    assert "torch==${TORCH_VERSION}" in stage
