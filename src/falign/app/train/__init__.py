"""Training: config, trainer, run directories, checkpoints."""

from falign.app.train.checkpoint import CheckpointError, load_checkpoint
from falign.app.train.config import ConfigError, TrainConfig
from falign.app.train.rundir import read_metrics
from falign.app.train.trainer import DivergenceError, RunError, Trainer, build_run, evaluate, train

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
