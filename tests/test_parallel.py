"""gadget.mri.parallel: small passes on one intra-op thread, the caller's count restored; large operations
inside such a block on the threads it set aside; items side by side on worker threads with a share each."""
import threading
import time

import pytest
import torch

from gadget.mri import parallel


@pytest.fixture
def two_threads():
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


def test_serial_runs_small_work_on_one_thread_and_restores_the_count(two_threads):
    with parallel.serial(10):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with parallel.serial(parallel.SERIAL_BELOW):  # large work keeps every thread
        assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        with parallel.serial(10):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


def test_serial_threshold_is_the_callers_to_choose(two_threads):
    with parallel.serial(1000, below=100):
        assert torch.get_num_threads() == 2
    with parallel.serial(1000, below=1001):
        assert torch.get_num_threads() == 1


def test_all_threads_lends_a_serial_block_its_threads_back_for_one_operation(two_threads):
    with parallel.serial(10):
        with parallel.all_threads():
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        with parallel.serial(10):  # nested: already one thread, nothing set aside twice
            with parallel.all_threads():
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with parallel.all_threads():  # outside a serial block: unchanged
        assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    with parallel.all_threads():
        assert torch.get_num_threads() == 1


def test_in_workers_keeps_order_splits_the_threads_and_restores_the_count(two_threads):
    seen = {}
    started = threading.Barrier(2, timeout=20)  # both workers inside fn at once, or the barrier breaks

    def work(i):
        if i < 2:
            started.wait()
        seen[i] = torch.get_num_threads()
        return i * i

    assert list(parallel.in_workers(work, range(5), workers=2)) == [0, 1, 4, 9, 16]
    assert set(seen.values()) == {1}  # two threads shared by two workers
    assert torch.get_num_threads() == 2
    assert list(parallel.in_workers(work, range(2, 5), workers=1)) == [4, 9, 16]
    assert seen[4] == 2  # one worker: the calling thread, its own count


def test_in_workers_holds_at_most_workers_items_in_flight(two_threads):
    lock, running, most = threading.Lock(), [0], [0]

    def work(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return i

    results = parallel.in_workers(work, range(12), workers=3)
    assert next(results) == 0
    time.sleep(0.05)  # the consumer idles: nothing beyond the items already submitted may start
    assert list(results) == list(range(1, 12))
    assert most[0] <= 3


def test_in_workers_passes_an_item_error_to_the_caller_and_restores_the_count(two_threads):
    def work(i):
        if i == 3:
            raise ValueError("slice 3 is broken")
        return i

    got = []
    with pytest.raises(ValueError, match="slice 3"):
        for value in parallel.in_workers(work, range(6), workers=2):
            got.append(value)
    assert got == [0, 1, 2]
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="workers"):
        list(parallel.in_workers(work, range(2), workers=0))


def test_in_workers_hands_a_result_back_before_the_next_item_arrives(two_threads):
    """A live stream: the second slice comes only after the first one's image went out. Results must not
    wait for the next item (before, this waited for the source's timeout)."""
    first_out = threading.Event()
    waited = []

    def stream():
        yield 0
        waited.append(first_out.wait(timeout=20))
        yield 1

    results = []
    for value in parallel.in_workers(lambda i: i + 10, stream(), workers=2):
        results.append(value)
        first_out.set()
    assert results == [10, 11] and waited == [True]
    assert torch.get_num_threads() == 2


def test_in_workers_gives_the_results_before_a_source_error(two_threads):
    def stream():
        yield from range(3)
        raise OSError("connection reset")

    got = []
    with pytest.raises(OSError, match="connection reset"):
        for value in parallel.in_workers(lambda i: (time.sleep(0.02), i)[1], stream(), workers=2):
            got.append(value)
    assert got == [0, 1, 2]
    assert torch.get_num_threads() == 2


def test_in_workers_runs_a_single_item_on_the_calling_thread_with_all_its_threads(two_threads):
    caller = threading.get_ident()
    seen = []
    assert list(parallel.in_workers(lambda i: seen.append((threading.get_ident(), torch.get_num_threads())) or i,
                                    [7], workers=2)) == [7]
    assert seen == [(caller, 2)]
    assert list(parallel.in_workers(lambda i: i, [], workers=2)) == []


@pytest.mark.parametrize("count,item_bytes,budget,sizes", [
    (15, 10, 40, [4, 4, 3, 4]),   # four per block at most, near-equal sizes
    (12, 10, 1000, [12]),         # all fit
    (5, 10, 5, [1, 1, 1, 1, 1]),  # one item over budget: one per block
    (1, 10, 0, [1]),
    (0, 10, 40, []),
])
def test_blocks_cover_the_items_in_order_within_the_budget(count, item_bytes, budget, sizes):
    parts = parallel.blocks(count, item_bytes, budget)
    assert [p.stop - p.start for p in parts] == sizes
    assert [i for p in parts for i in range(p.start, p.stop)] == list(range(count))
