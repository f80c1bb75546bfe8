"""Gadgetron doors: the real `python -m gadgetron` launch against our target, played byte for byte
from Gadgetron's side; and every chain in pipelines/ parses and names an importable, callable target."""
import importlib
import os
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from gadget.model.checkpoint import save_checkpoint
from gadget.model.varnet import VarNet
from gadget.stream.codec import MessageId
from tests.server_harness import images_of, make_scan, read_until_close, send_scan

ROOT = Path(__file__).resolve().parents[1]
CHAINS = sorted((ROOT / "pipelines").glob("*.xml"))


def _gadgetron_side(tmp_path, config_xml, lines_xml_pair, timeout=120):
    """Act as Gadgetron: listen, start `python -m gadgetron PORT gadget.gadgetron reconstruct`, accept,
    send CONFIG(2) + HEADER(3) + acquisitions + CLOSE, read until CLOSE."""
    xml, lines = lines_xml_pair
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(timeout)
    port = server.getsockname()[1]
    env = {**os.environ, "GADGETRON_EXTERNAL_LOG_LEVEL": "INFO", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "gadgetron", str(port), "gadget.gadgetron", "reconstruct"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        conn, _ = server.accept()
        conn.settimeout(timeout)
        with conn:
            send_scan(conn, xml, lines, config_file=None, config_text=config_xml, nul=False)
            msgs = read_until_close(conn)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        server.close()
        if proc.poll() is None:
            proc.kill()
    return msgs, proc.returncode, out.decode(errors="replace")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    xml, lines, _ = make_scan(tmp_path_factory.mktemp("g"))
    return xml, lines


def test_python_m_gadgetron_runs_our_target(tmp_path, scan):
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, VarNet(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2), {"data": "test"})
    config = (f'<configuration><property name="checkpoint" value="{ckpt}"/>'
              '<property name="device" value="cpu"/></configuration>')
    msgs, code, out = _gadgetron_side(tmp_path, config, scan)
    imgs = images_of(msgs)
    assert code == 0, out
    assert [i.slice for i in imgs] == [0, 1, 2] and msgs[-1].id == MessageId.CLOSE
    assert "VARNET" in imgs[0].meta["ImageProcessingHistory"]


def test_python_m_gadgetron_failure_is_error_then_close(tmp_path, scan):
    config = '<configuration><property name="checkpoint" value="/nonexistent/model.pt"/></configuration>'
    msgs, code, out = _gadgetron_side(tmp_path, config, scan)
    assert [m.id for m in msgs] == [MessageId.ERROR, MessageId.CLOSE], out
    assert "checkpoint not found" in msgs[0].payload
    assert not any(m.id == MessageId.TEXT for m in msgs)
    assert code != 0


def test_python_m_gadgetron_zero_filled_mode(tmp_path, scan):
    msgs, code, out = _gadgetron_side(tmp_path, '<configuration><property name="mode" value="zero-filled"/>'
                                                '</configuration>', scan)
    assert code == 0, out
    assert len(images_of(msgs)) == 3


@pytest.mark.parametrize("chain", CHAINS, ids=[c.name for c in CHAINS])
def test_chains_parse_and_name_importable_targets(chain):
    root = ET.parse(chain).getroot()
    externals = root.findall(".//external")
    assert externals, f"{chain.name} has no external block"
    for ext in externals:
        execute, connect = ext.find("execute"), ext.find("connect")
        assert (execute is None) != (connect is None)
        if execute is not None:
            assert execute.get("type") == "python"
            target = getattr(importlib.import_module(execute.get("name")), execute.get("target"))
            assert callable(target)
        else:
            assert 0 < int(connect.get("port")) < 65536
        from gadget.recon.config import ReconConfig, from_gadgetron_config

        cfg_el = ext.find("configuration")
        config = from_gadgetron_config(ET.tostring(cfg_el, encoding="unicode"), ReconConfig())
        assert isinstance(config, ReconConfig)  # properties are all known settings
