"""Training: config, trainer, run directories, checkpoints."""

from falign.train.checkpoint import CheckpointError, load_checkpoint
from falign.train.config import ConfigError, TrainConfig
from falign.train.rundir import read_metrics
from falign.train.trainer import DivergenceError, RunError, Trainer, build_run, evaluate, train

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DivergenceError",
    "RunError",
    "TrainConfig",
    "Trainer",
    "build_run",
    "evaluate",
    "load_checkpoint",
    "read_metrics",
    "train",
]
