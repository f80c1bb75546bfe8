"""gadget.mri.parallel: small passes on one intra-op thread, the caller's count restored; large operations
inside such a block on the threads it set aside."""
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
