"""Classical reconstruction baselines to compare E2E-VarNet against.

* :mod:`.espirit` — ESPIRiT coil sensitivity maps (numpy + torch);
* :mod:`.sense` — CG-SENSE (Tikhonov-regularised SENSE by conjugate gradients);
* :mod:`.bart` — BART ``ecalib`` + ``pics`` L1-wavelet, run as an external program.

Layouts: one slice of k-space ``(coil, readout, phase)`` complex; maps the same; images
``(readout, phase)``. Imports only :mod:`gadget.mri` (no I/O besides BART's temp files).
"""
from .bart import BartConfig, BartError, find_bart, pics_l1, read_cfl, write_cfl
from .espirit import EspiritConfig, espirit_maps
from .sense import SenseConfig, SenseOperator, cg_sense, conjugate_gradient

__all__ = ["EspiritConfig", "espirit_maps", "SenseConfig", "SenseOperator", "cg_sense", "conjugate_gradient",
           "BartConfig", "BartError", "find_bart", "pics_l1", "read_cfl", "write_cfl"]
