"""gadget.mri.parallel.serial: small passes on one intra-op thread, the caller's count restored."""
import torch

from gadget.mri import parallel


def test_serial_runs_small_work_on_one_thread_and_restores_the_count():
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with parallel.serial(10):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with parallel.serial(parallel.SERIAL_BELOW):  # large work keeps every thread
            assert torch.get_num_threads() == 2
        try:
            with parallel.serial(10):
                raise RuntimeError("inside")
        except RuntimeError:
            pass
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
