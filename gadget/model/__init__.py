"""E2E-VarNet and its checkpoint I/O."""
from .checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, save_checkpoint
from .varnet import VarNet, VarNetConfig, count_parameters

__all__ = ["VarNet", "VarNetConfig", "count_parameters", "CheckpointError",
           "LoadedCheckpoint", "load_checkpoint", "save_checkpoint"]
