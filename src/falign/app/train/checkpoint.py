"""Safe checkpoint loading: ``torch.load(..., weights_only=True)`` with errors that name the file."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from falign.errors import FalignError


class CheckpointError(FalignError, RuntimeError):
    """A checkpoint is missing, truncated, tampered with, or holds more than tensors and plain data."""


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by falign. Only tensors and plain Python data are accepted
    (``weights_only=True``): a file crafted to run code on unpickling is refused, not executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:  # torch's reader does not verify every record's CRC-32: a flipped byte in tensor data would load silently
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise CheckpointError(f"{path}: cannot read the checkpoint (truncated or corrupt): record {bad} fails "
                                  f"its CRC-32 check")
    except (zipfile.BadZipFile, OSError, EOFError):
        pass  # not a zip archive at all (or unreadable): torch.load below says why
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and plain data "
                              f"(weights_only=True): {first}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot read the checkpoint (truncated or corrupt): {first}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a falign checkpoint (no 'model' entry)")
    return state
