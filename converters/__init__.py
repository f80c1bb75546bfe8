"""fastMRI ⇄ ISMRMRD, Siemens twix → ISMRMRD and the simulators, installed as ``gadget.converters`` (the
folder stays at the repository root; pyproject.toml's package-dir maps it). They may import the core
layers (``gadget.mri``, ``gadget.data``, ...), never the doors or the console script; the core never
imports them (tests/test_layers.py)."""
