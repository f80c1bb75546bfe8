"""``varnet bench soak``: the planned streams are what they claim to be, and a tiny soak against a real
``varnet serve`` subprocess (a tiny checkpoint) reports every kind, right image counts and live memory."""
import json
import random
import struct

import pytest

from gadget.bench.soak_streams import ABUSES, DEFAULT_MIX, MUTATIONS, build_good_scan, draw_plan
from gadget.cli import main
from gadget.model.checkpoint import save_checkpoint
from gadget.model.varnet import VarNet
from gadget.stream.codec import MessageId, MessageReader

TINY = dict(num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1)


@pytest.fixture(scope="module")
def scan():
    return build_good_scan("mrd")


def test_good_stream_is_config_header_acquisitions_close(scan):
    ids = [m.id for m in MessageReader.from_bytes(scan.stream())]
    assert ids[:2] == [MessageId.CONFIG_FILE, MessageId.HEADER] and ids[-1] == MessageId.CLOSE
    assert ids[2:-1] == [MessageId.ACQUISITION] * len(scan.lines) and len(scan.lines) > scan.slices
    assert any(line.has_flag(19) for line in scan.lines)  # the noise scan is included


def test_gadgetron_scan_starts_with_a_configuration_text():
    first = next(iter(MessageReader.from_bytes(build_good_scan("gadgetron", slices=1).stream())))
    assert first.id == MessageId.CONFIG_TEXT and first.payload.startswith("<configuration")


def test_plans_cover_every_variant_and_differ_from_the_good_stream(scan):
    plans = [draw_plan(scan, random.Random(i), DEFAULT_MIX) for i in range(400)]
    seen = {(p.kind, p.variant) for p in plans}
    assert {v for k, v in seen if k == "malformed"} == set(MUTATIONS)
    assert {v for k, v in seen if k == "abuse"} == set(ABUSES)
    good = scan.stream()
    assert all(p.payload != good for p in plans if p.kind == "malformed")
    for p in (p for p in plans if p.kind == "stalled"):
        claim = struct.unpack_from("<I", p.payload, len(scan.config) + 2)[0]
        assert 1 << 29 <= claim <= 1 << 30 and len(p.payload) == len(scan.config) + 2 + 4 + 15
        assert p.after == "stall"


def test_tiny_soak_against_a_real_server(tmp_path, capsys):
    ckpt, out = tmp_path / "tiny.pt", tmp_path / "soak.json"
    save_checkpoint(ckpt, VarNet(**TINY))
    rc = main(["bench", "soak", "--connections", "40", "--concurrency", "4", "--stall-seconds", "0.5",
               "--settle-seconds", "0.5", "--idle-timeout", "1", "--checkpoint", str(ckpt),
               "--env", "MALLOC_ARENA_MAX=2", "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert rc == 0, report["failures"]
    assert set(report["kinds"]) == set(DEFAULT_MIX) and report["done"] == 40
    assert sum(k["sent"] for k in report["kinds"].values()) == 40
    good = report["kinds"]["good"]
    assert good["images"] == good["sent"] * report["slices"] and good["good_wrong"] == 0
    assert report["alive_at_end"] and report["failures"] == []
    assert report["case"]["env"] == {"MALLOC_ARENA_MAX": "2"}
    for key in ("rss_before_mb", "peak_sampled_mb", "hwm_mb", "rss_after_mb"):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert [d[0] for d in report["deciles"]] == list(range(10, 101, 10))
    assert all(d[3] > 0 for d in report["deciles"]) and report["samples"]
    assert "resting after" in printed and "| good |" in printed


def test_a_server_that_cannot_start_is_a_clear_error(tmp_path, capsys):
    rc = main(["bench", "soak", "--connections", "1", "--checkpoint", str(tmp_path / "missing.pt")])
    assert rc == 2
    assert "server exited" in capsys.readouterr().err


def test_bad_options_are_refused(capsys):
    assert main(["bench", "soak", "--mix", "good=10,bogus=5"]) == 2
    assert main(["bench", "soak", "--env", "NOEQUALS"]) == 2
    assert "--env" in capsys.readouterr().err
