"""Instance norm + LeakyReLU in one C kernel for the U-Nets' CPU inference path (``csrc/instance_norm.c``).

Why: PyTorch's eager passes (:func:`gadget.model.unet.instance_norm_leaky_relu_` without this kernel) read
and write each activation about ten times over: sums, centring, the squares' temporary, the scale, the
activation. The kernel reads it twice for the statistics and once more to normalise and activate in place,
four to five times faster per norm; the measured effect on a whole forward is in
docs/results/performance.md ("A fused instance norm").

How it is built: at first use, with the machine's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``), ``-O3
-march=native``, into a per-user cache (``$VARNET_KERNEL_DIR``, else ``$XDG_CACHE_HOME/varnet-gadget`` or
``~/.cache/varnet-gadget``; a private temporary folder where that is not writable), named by a hash of the
source, the compiler, the flags and the CPU, so that a shared home never hands one CPU another's build.
It is loaded with :mod:`ctypes` (the call releases the GIL, so slices side by side norm side by side).
Without a compiler, where the build fails, or with ``VARNET_FUSED_NORM=0``, the norms run as PyTorch passes
and a warning says why, once.

Layout: a real float32 ``(batch, channels, height, width)`` CPU tensor in channels-last memory, normalised
in place (the caller's fresh activation). Other tensors are left to the PyTorch passes.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "instance_norm.c"
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-strict-aliasing")
_ENV_SWITCH = "VARNET_FUSED_NORM"

_lock = threading.Lock()
_kernel = None          # the loaded C function, once built
_unavailable = None     # why it is not (a sentence), once known


def _compiler() -> str | None:
    """The first of ``$CC``, ``cc``, ``gcc``, ``clang`` on the PATH (a full path), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    root = os.environ.get("VARNET_KERNEL_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "varnet-gadget")
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="varnet-kernels-"))


def _build():
    """The kernel function of the compiled library, from the cache or built now; raises RuntimeError saying
    why it cannot be."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc or clang)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(FLAGS).encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]
    folder = _cache_dir()
    library = folder / f"instance_norm-{key}.so"
    if not library.exists():
        partial = folder / f".instance_norm-{key}-{os.getpid()}-{threading.get_ident()}.so"
        done = subprocess.run([compiler, *FLAGS, "-o", str(partial), str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[:500]}")
        os.replace(partial, library)  # atomic: a process building the same key at once finds one or the other
    function = ctypes.CDLL(str(library)).instance_norm_leaky_relu
    function.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_double,
                         ctypes.c_double]
    function.restype = ctypes.c_int
    return function


def kernel():
    """The C function, or None when it is switched off or cannot be built (logged once, with the reason)."""
    global _kernel, _unavailable
    if _kernel is not None or _unavailable is not None:
        return _kernel
    with _lock:
        if _kernel is None and _unavailable is None:
            if os.environ.get(_ENV_SWITCH, "1") == "0":
                _unavailable = f"{_ENV_SWITCH}=0"
            else:
                try:
                    _kernel = _build()
                except (RuntimeError, OSError) as exc:
                    _unavailable = str(exc)
            if _unavailable is not None:
                log.warning("fused instance norm unavailable (%s): the U-Nets' norms run as PyTorch passes, "
                            "slower on the CPU", _unavailable)
    return _kernel


def instance_norm_leaky_relu_(x: torch.Tensor, eps: float, slope: float) -> bool:
    """Normalise and activate ``x`` in place with the C kernel; False (``x`` untouched) where it does not apply:
    not a plain float32 CPU tensor in channels-last memory, autograd recording, or no kernel."""
    if not (type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and x.numel() > 0 and x.is_contiguous(memory_format=torch.channels_last)
            and not (x.requires_grad and torch.is_grad_enabled())):
        return False
    run = kernel()
    if run is None:
        return False
    b, c, h, w = x.shape
    return run(x.data_ptr(), b, h * w, c, float(eps), float(slope)) == 0
