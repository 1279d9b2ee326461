"""Run directories: resolved config, versions, ``metrics.jsonl``, checkpoints, ``summary.json``.

Every file is written atomically (temporary file in the same folder, ``fsync``, ``rename``) so a
crash never leaves a half-written file in place of a good one.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb",
                 before_replace: Callable[[], None] | None = None) -> None:
    """Write ``path`` through ``write(fileobj)`` into a temporary file, fsync it, then rename.

    ``before_replace`` runs between the fsync and the rename (fault injection in tests).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"), "w")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_metrics(path: Path, *, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """All rows of a ``metrics.jsonl`` file.

    A line that is not a JSON object (the torn last line of a run killed while writing) raises
    ``ValueError`` naming the file and line, unless ``skipped`` is a list: then the line is left out
    and a description of it appended to ``skipped``.
    """
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                where = f"{path}:{number}: not a JSON object ({line.strip()[:40]!r})"
                if skipped is None:
                    raise ValueError(where)
                skipped.append(where)
                continue
            rows.append(row)
    return rows


def versions() -> dict[str, str]:
    import falign

    info = {"falign": falign.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}
    if torch.cuda.is_available():
        info["cuda"] = str(torch.version.cuda)
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
