"""gadget.recon.allocator: freed tensors keep their pages (glibc), and the switch turns it off."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt only")

# A fresh process: allocate, touch and free 96 MB three times; print whether the thresholds were raised
# and the minor page faults of the last round (each round touches 24,576 pages of 4 KiB, or 48 huge pages).
_PROBE = """
import resource, numpy as np
from gadget.recon.allocator import keep_freed_memory
applied = keep_freed_memory()
for _ in range(3):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(96 * 2**20 // 8)
    del a
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(applied, faults)
"""


def _probe(switch: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "VARNET_KEEP_FREED_MEMORY"}
    if switch is not None:
        env["VARNET_KEEP_FREED_MEMORY"] = switch
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_freed_memory_is_reused_without_page_faults():
    applied, faults = _probe(None)
    assert applied
    assert faults < 20  # the third 96 MB array lands in pages the first one faulted in


def test_switch_leaves_glibc_defaults():
    applied, faults = _probe("0")
    assert not applied
    # 96 MB is above glibc's largest default mmap threshold: mapped afresh every time, so at least one fault
    # per 2 MiB page (48) even where numpy's madvise gets transparent huge pages (24,576 with 4 KiB pages)
    assert faults >= 40
