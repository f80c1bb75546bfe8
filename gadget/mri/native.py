"""C kernels built at first use with the machine's C compiler, for CPU passes PyTorch serves poorly (the
U-Nets' instance norm, :mod:`gadget.model.fused_norm`; ESPIRiT's per-pixel squarings,
:mod:`gadget.baselines.espirit`).

How one is built: with ``$CC``, else ``cc``, ``gcc`` or ``clang``, ``-O3 -march=native``, into a per-user cache
(``$VARNET_KERNEL_DIR``, else ``$XDG_CACHE_HOME/varnet-gadget`` or ``~/.cache/varnet-gadget``; a private
temporary folder where that is not writable), named by the source's name and a hash of the source, the
compiler, the flags and the CPU, so that a shared home never hands one CPU another's ``-march=native`` build.
It is loaded with :mod:`ctypes` (a call releases the GIL). :class:`NativeKernel` holds one function: without
a compiler, where the build fails, or with its switch set to ``0``, it is None and a warning says why, once;
the caller then runs its PyTorch passes.
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

FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fno-strict-aliasing")


def compiler() -> str | None:
    """The first of ``$CC``, ``cc``, ``gcc``, ``clang`` on the PATH (a full path), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cache_dir() -> Path:
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


def build(source: Path) -> Path:
    """The shared library compiled from ``source``, from the cache or built now; raises RuntimeError saying
    why it cannot be."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc or clang)")
    key = hashlib.sha256(b"\0".join([source.read_bytes(), cc.encode(), " ".join(FLAGS).encode(),
                                     cpu_identity().encode()])).hexdigest()[:16]
    folder = cache_dir()
    library = folder / f"{source.stem}-{key}.so"
    if not library.exists():
        partial = folder / f".{source.stem}-{key}-{os.getpid()}-{threading.get_ident()}.so"
        done = subprocess.run([cc, *FLAGS, "-o", str(partial), str(source)], capture_output=True, text=True)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"{cc} failed on {source.name}: {done.stderr.strip()[:500]}")
        os.replace(partial, library)  # atomic: a process building the same key at once finds one or the other
    return library


class NativeKernel:
    """The C function ``symbol`` of ``source`` (argument and result types for :mod:`ctypes`), built at first
    :meth:`get`. ``switch``: the environment variable that turns it off (``0``); ``unavailable``: the warning
    logged on ``logger`` once when it is off or cannot be built, with ``%s`` for the reason."""

    def __init__(self, source: Path, symbol: str, argtypes: list, restype, switch: str, unavailable: str,
                 logger: logging.Logger):
        self.source, self.symbol, self.argtypes, self.restype = source, symbol, argtypes, restype
        self.switch, self.unavailable, self.logger = switch, unavailable, logger
        self._function = None
        self._why = None  # why it is not available (a sentence), once known
        self._lock = threading.Lock()

    def fresh(self) -> "NativeKernel":
        """The same kernel, not yet built or loaded (tests)."""
        return NativeKernel(self.source, self.symbol, self.argtypes, self.restype, self.switch, self.unavailable,
                            self.logger)

    def get(self):
        """The C function, or None when it is switched off or cannot be built (logged once, with the reason)."""
        if self._function is not None or self._why is not None:
            return self._function
        with self._lock:
            if self._function is None and self._why is None:
                if os.environ.get(self.switch, "1") == "0":
                    self._why = f"{self.switch}=0"
                else:
                    try:
                        function = getattr(ctypes.CDLL(str(build(self.source))), self.symbol)
                        function.argtypes, function.restype = self.argtypes, self.restype
                        self._function = function
                    except (RuntimeError, OSError) as exc:
                        self._why = str(exc)
                if self._why is not None:
                    self.logger.warning(self.unavailable, self._why)
        return self._function
