"""The E2E-VarNet weights shipped inside the package: the default wherever a checkpoint can be given."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointError

SHIPPED_NAME = "varnet_head_v2.pt"


def shipped_checkpoint() -> Path:
    """Path of the shipped checkpoint (our format, with its training recipe in the description)."""
    import gadget.weights

    path = Path(gadget.weights.__file__).resolve().parent / SHIPPED_NAME
    if not path.is_file():
        raise CheckpointError(f"the shipped weights {SHIPPED_NAME} are missing from this installation "
                              f"({path.parent}); reinstall the package or pass --checkpoint")
    return path


def resolve_checkpoint(path: str | None) -> str:
    """An explicit path as given, else the shipped weights."""
    return str(path) if path else str(shipped_checkpoint())
