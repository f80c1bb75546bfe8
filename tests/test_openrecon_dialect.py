"""The OpenRecon/FIRE dialect of the MRD server: the config name ``openrecon``, then the header, then a
JSON parameters TEXT (docs/reference/protocol.md), in the message order and byte forms OpenRecon uses."""
import json
import struct

import numpy as np
import pytest
import torch

from gadget.model.varnet import VarNet
from gadget.recon.config import ConfigError, ReconConfig, load_config
from gadget.recon.engine import Reconstructor
from gadget.recon.ui_parameters import MAX_PARAMETERS, UI_PARAMETERS, apply_ui_parameters, check_table
from gadget.server import ReconService
from gadget.stream.codec import MessageId, MessageWriter
from tests.server_harness import connect, images_of, make_scan, read_until_close, running, texts_of


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    return make_scan(tmp_path_factory.mktemp("scan"), slices=2)


@pytest.fixture(scope="module")
def server():
    torch.manual_seed(0)
    engine = Reconstructor(VarNet(num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1), "cpu")
    service = ReconService(ReconConfig(), engine, "test-model", idle_timeout=5.0, max_message_bytes=64 << 20)
    with running(service) as port:
        yield port


def _text_bytes(text: str, nul: bool) -> bytes:
    raw = text.encode() + (b"\0" if nul else b"")
    return struct.pack("<HI", int(MessageId.TEXT), len(raw)) + raw


def _openrecon_scan(port, xml, lines, parameters: dict, nul: bool = True):
    """CONFIG_FILE 'openrecon' (char[1024], NUL padded), HEADER, TEXT JSON, acquisitions, CLOSE."""
    with connect(port) as sock:
        w = MessageWriter(sock, nul_terminate=nul)
        w.config_file("openrecon")
        w.header(xml)
        sock.sendall(_text_bytes(json.dumps({"version": "1.1.0", "parameters": parameters}), nul))
        for line in lines:
            w.acquisition(line)
        if lines:
            w.close()
        return read_until_close(sock)


@pytest.mark.parametrize("nul", [True, False])
def test_openrecon_connection_applies_parameters_and_warns_on_others(server, scan, nul):
    xml, lines, _ = scan
    msgs = _openrecon_scan(server, xml, lines, {
        "config": "openrecon", "sendoriginal": "false",     # as OpenRecon's example UI sends them
        "imageDtype": "float32", "seriesDescription": "OR test", "prewhiten": "False", "batchSize": "2",
        "checkpoint": "/etc/passwd"}, nul=nul)
    images = images_of(msgs)
    assert len(images) == 2 and [img.slice for img in images] == [0, 1]
    assert all(img.data.dtype == np.float32 for img in images)  # imageDtype applied over the preset's choice
    assert images[0].meta["SeriesDescription"] == "OR test"
    warnings = [t for t in texts_of(msgs) if t.startswith("WARNING")]
    assert any("'sendoriginal' ignored" in t for t in warnings)
    assert any("'checkpoint' ignored" in t and "operator" in t for t in warnings)
    assert msgs[-1].id == MessageId.CLOSE


def test_openrecon_config_name_loads_its_preset(server, scan):
    xml, lines, _ = scan
    preset = load_config("openrecon")
    images = images_of(_openrecon_scan(server, xml, lines, {"config": "openrecon"}))
    assert len(images) == 2
    assert images[0].data.dtype == np.dtype(preset.image_dtype)
    assert images[0].meta["SeriesDescription"] == preset.series_description


def test_parameters_config_selects_a_preset(server, scan):
    xml, lines, _ = scan
    images = images_of(_openrecon_scan(server, xml, lines, {"config": "zero-filled"}))
    assert len(images) == 2 and "ZEROFILLED" in images[0].meta["ImageProcessingHistory"]
    # OpenRecon sends every UI parameter: those left at their label defaults do not undo the preset,
    # one the user changed does
    every = {p.id: str(p.default) for p in UI_PARAMETERS}
    images = images_of(_openrecon_scan(server, xml, lines, {"config": "zero-filled", **every,
                                                            "seriesDescription": "chosen"}))
    assert "ZEROFILLED" in images[0].meta["ImageProcessingHistory"]
    assert images[0].meta["SeriesDescription"] == "chosen"


def test_a_bad_parameter_value_is_a_clear_error(server, scan):
    xml, _, _ = scan  # no acquisitions follow: the server's answer must not race a reset connection
    msgs = _openrecon_scan(server, xml, [], {"imageDtype": "int16"})
    assert not images_of(msgs)
    assert any(t.startswith("ERROR") and "imageDtype" in t and "must be one of" in t for t in texts_of(msgs))


def test_text_after_first_acquisition_is_not_applied(server, scan):
    xml, lines, _ = scan
    with connect(server) as sock:
        w = MessageWriter(sock, nul_terminate=True)
        w.config_file("default")
        w.header(xml)
        w.acquisition(lines[0])
        w.text(json.dumps({"parameters": {"mode": "zero-filled"}}))
        for line in lines[1:]:
            w.acquisition(line)
        w.close()
        msgs = read_until_close(sock)
    images = images_of(msgs)
    assert len(images) == 2 and "VARNET" in images[0].meta["ImageProcessingHistory"]
    assert any(t.startswith("WARNING") and "not applied" in t for t in texts_of(msgs))


def test_string_values_are_typed():
    out = apply_ui_parameters(json.dumps({"version": "1.1.0", "parameters": {
        "prewhiten": "False", "batchSize": "3", "safetyPredictionMax": "1.5", "alsoSend": "sense"}}),
        ReconConfig(), lambda name, cfg: pytest.fail("no preset named"))
    assert out.config.prewhiten is False and out.config.batch_size == 3
    assert out.config.safety_prediction_max == 1.5 and out.config.also_send == "sense"
    assert out.ignored == [] and out.preset is None
    with pytest.raises(ConfigError, match="batchSize"):
        apply_ui_parameters('{"parameters": {"batchSize": "2.5"}}', ReconConfig(), None)
    with pytest.raises(ConfigError, match="'parameters' object"):
        apply_ui_parameters('{"batch_size": 2}', ReconConfig(), None)


def test_ui_table_fits_openrecon():
    check_table()
    assert len(UI_PARAMETERS) + 1 <= MAX_PARAMETERS
    kinds = {p.id: p.kind for p in UI_PARAMETERS}
    assert kinds["prewhiten"] == "boolean" and kinds["fallback"] == "choice" and kinds["batchSize"] == "int"
    assert kinds["safetyPredictionMax"] == "double" and kinds["seriesDescription"] == "string"
    for p in UI_PARAMETERS:
        if p.kind in ("int", "double"):
            assert p.minimum <= p.default <= p.maximum, p.id
