"""E2E-VarNet reconstruction for Gadgetron / ISMRMRD pipelines.

Layers (imports point downward only): ``mri`` (pure k-space math) → ``model``
(E2E-VarNet, checkpoints) → ``data`` (file formats) → ``recon`` (engine) →
``cli`` and the other doors. ``gadget.converters`` (installed from the repository's
converters/ folder) may import the core and is imported only by the doors, the CLI, the demo and
the benchmarks; ``gadget.pipelines`` (from pipelines/) is data: presets and chains.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("varnet-gadget")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
