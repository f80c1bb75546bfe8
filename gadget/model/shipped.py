"""The E2E-VarNet weights shipped inside the package, and the one rule every door uses to pick weights.

The rule (:func:`resolve_checkpoint`), the same for ``serve``, the Gadgetron target, ``replay``, ``demo``,
``infer``, ``compare``, ``export`` and every Docker image:

1. a checkpoint given explicitly (``--checkpoint``, the ``checkpoint`` setting of a preset or of a
   Gadgetron chain's ``<property>``);
2. else the file named by the environment variable ``VARNET_CHECKPOINT`` (in the images:
   ``-v $PWD/model.pt:/models/model.pt -e VARNET_CHECKPOINT=/models/model.pt``); a variable that
   names no file is an error, never a silent fall back to other weights;
3. else the weights shipped in the package (:data:`SHIPPED_NAME`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from .checkpoint import CheckpointError

log = logging.getLogger(__name__)

SHIPPED_NAME = "varnet_head_v3.pt"
CHECKPOINT_ENV = "VARNET_CHECKPOINT"
# The one documented place for your own weights inside the Docker images (mounted read-only).
CONTAINER_MODEL_PATH = "/models/model.pt"


def shipped_checkpoint() -> Path:
    """Path of the shipped checkpoint (our format, with its training recipe in the description)."""
    import gadget.weights

    path = Path(gadget.weights.__file__).resolve().parent / SHIPPED_NAME
    if not path.is_file():
        raise CheckpointError(f"the shipped weights {SHIPPED_NAME} are missing from this installation "
                              f"({path.parent}); reinstall the package or pass --checkpoint")
    return path


def checkpoint_source(path: Optional[str]) -> tuple[str, str]:
    """``(path, where it came from)`` by the rule in the module docstring; ``where`` is ``given``,
    ``$VARNET_CHECKPOINT`` or ``shipped``. Raises :class:`CheckpointError` when the environment
    variable is set but names no file."""
    if path:
        return str(path), "given"
    env = os.environ.get(CHECKPOINT_ENV, "").strip()
    if env:
        if not Path(env).is_file():
            raise CheckpointError(f"the environment variable {CHECKPOINT_ENV} names '{env}', which is not a file "
                                  f"(mount your weights there, or unset {CHECKPOINT_ENV} to use the shipped "
                                  f"weights {SHIPPED_NAME})")
        return env, f"${CHECKPOINT_ENV}"
    return str(shipped_checkpoint()), "shipped"


def resolve_checkpoint(path: Optional[str]) -> str:
    """The checkpoint to load: ``path`` when given, else ``$VARNET_CHECKPOINT``, else the shipped
    weights. Logs which one and why."""
    resolved, source = checkpoint_source(path)
    log.info("model weights: %s (%s)", resolved, source)
    return resolved
