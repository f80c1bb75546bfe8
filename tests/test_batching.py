"""Cross-scan batching: concurrent callers share forward passes and get exactly their own images."""
import threading
import time

import numpy as np
import pytest
import torch

from gadget.model.varnet import VarNet
from gadget.recon.batching import BatchingEngine
from gadget.recon.engine import Reconstructor
from tests.conftest import equispaced_mask


class SlowFirst(Reconstructor):
    """Holds the first forward pass long enough for the other callers to queue up."""

    calls = 0

    def __call__(self, *args, **kwargs):
        SlowFirst.calls += 1
        if SlowFirst.calls == 1:
            time.sleep(0.3)
        return super().__call__(*args, **kwargs)


@pytest.fixture
def inputs(small_volume):
    k = small_volume.kspace[:1]
    masks = [equispaced_mask(48, 4, 8), equispaced_mask(48, 3, 6), equispaced_mask(48, 4, 10),
             equispaced_mask(48, 2, 8), equispaced_mask(48, 4, 8)]
    acs = [8, 6, 10, 8, 8]
    return [(k * m, m, a) for m, a in zip(masks, acs)]


def test_concurrent_requests_are_batched_and_correct(inputs):
    torch.manual_seed(0)
    model = VarNet(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2)
    direct = Reconstructor(model, "cpu")
    want = [direct(k, m, a) for k, m, a in inputs]
    SlowFirst.calls = 0
    batching = BatchingEngine(SlowFirst(model, "cpu"), max_batch=4, window_s=0.05)
    results = [None] * len(inputs)

    def call(i):
        k, m, a = inputs[i]
        results[i] = batching(k, m, a)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    threads[0].start()
    time.sleep(0.05)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(30)
    batching.close()
    assert batching.forward_calls == 2  # the first alone, then the four that queued behind it
    for got, exp in zip(results, want):
        assert np.linalg.norm(got - exp) / np.linalg.norm(exp) < 1e-5


class SlowFirstRun(Reconstructor):
    """Holds the worker's first ``run`` so that later requests queue up behind it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs = 0

    def run(self, *args, **kwargs):
        self.runs += 1
        if self.runs == 1:
            time.sleep(0.3)
        return super().run(*args, **kwargs)


def test_a_match_behind_an_unmatched_request_is_taken(inputs):
    # Queue after the held first call: A (ACS 8), B (ACS detected: another key), C (ACS 8). The worker
    # takes A, skips B and takes C out of the middle of the queue; then B alone. Removing C must not
    # compare B's arrays with C's (a dataclass's generated __eq__ did, and killed the worker).
    torch.manual_seed(0)
    model = VarNet(num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1)
    direct = Reconstructor(model, "cpu")
    k, m, a = inputs[0]
    calls = [(k, m, a), (k, m, a), (k, m, None), (k, m, a)]
    want = [direct(*c) for c in calls]
    batching = BatchingEngine(SlowFirstRun(model, "cpu"), max_batch=4, window_s=0.05)
    results = [None] * len(calls)

    def call(i):
        results[i] = batching(*calls[i])

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
        time.sleep(0.05)  # in order: the first is held, the rest queue as A, B, C
    for t in threads:
        t.join(30)
    batching.close()
    assert batching.forward_calls == 3  # the held one, then A with C, then B
    for got, exp in zip(results, want):
        assert got is not None
        assert np.linalg.norm(got - exp) / np.linalg.norm(exp) < 1e-5


def test_errors_reach_the_caller_and_the_worker_survives(inputs):
    model = VarNet(num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1)
    batching = BatchingEngine(Reconstructor(model, "cpu"), max_batch=2)
    k, m, a = inputs[0]
    with pytest.raises(ValueError, match="mask"):
        batching(k, m[:-1], a)  # wrong mask width
    assert batching(k, m, a).shape == (1, 128, 48)
    batching.close()
    with pytest.raises(RuntimeError, match="shut down"):
        batching(k, m, a)


def test_a_stopped_worker_is_a_clear_error_not_a_wait(inputs, caplog):
    model = VarNet(num_cascades=1, chans=2, pools=1, sens_chans=2, sens_pools=1)
    batching = BatchingEngine(Reconstructor(model, "cpu"), max_batch=2)

    def broken():
        raise RuntimeError("simulated worker fault")

    batching._take_batch = broken  # the worker already waits in the real one: its next take raises
    k, m, a = inputs[0]
    assert batching(k, m, a).shape == (1, 128, 48)
    batching._worker.join(10)
    assert not batching._worker.is_alive() and "simulated worker fault" in caplog.text
    with pytest.raises(RuntimeError, match="worker thread has stopped"):
        batching(k, m, a)
