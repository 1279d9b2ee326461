"""Run directories: resolved config, versions, ``metrics.jsonl``, checkpoints, ``summary.json``, and the
folder's claim and lock (:class:`RunDir`).

Every file is written atomically (:func:`falign.app.outdir.atomic_write`: temporary file in the same folder,
``fsync``, ``rename``) so a crash never leaves a half-written file in place of a good one; ``.jsonl`` rows
and the lock are opened without following links (:func:`falign.app.outdir.open_append`).
"""

from __future__ import annotations

import fcntl
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from falign.app.outdir import MARKER, OutputDir, append_text, atomic_write, legacy_run, open_append
from falign.app.train.checkpoint import load_checkpoint
from falign.errors import FalignError


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"), "w")


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


class RunDirError(FalignError, RuntimeError):
    """A run directory cannot be used as asked (exists, locked, unreadable config...)."""


class RunDir:
    """The files of one run: the folder's claim and lock, ``config.json``, ``metrics.jsonl`` (whose rows are
    counted, so a resume keeps exactly those of its checkpoint), ``checkpoint.pt``, ``summary.json``.

    Only the main process of a data-parallel run writes (``main=False``: every write is a no-op).
    """

    def __init__(self, path: str | Path, *, main: bool = True) -> None:
        self.path = Path(path)
        self.main = main
        self.folder = OutputDir(self.path, "run", "run directory")
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoint.pt"
        self.rows = 0
        self.claimed = False  # this process claimed and locked the folder (the main process of a run)
        self._lock = None

    # -- the folder ----------------------------------------------------------------------------------
    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse an unusable folder before any work (nothing is written)."""
        if resume:
            if self.path.exists() and not self.path.is_dir():
                raise RunDirError(f"--resume {self.path} is a file, not a run directory")
            if not (self.path / "config.json").is_file():
                raise RunDirError(f"{self.path}: no run to resume here (config.json missing)")
            if not (self.folder.marked() or legacy_run(self.path)):
                raise RunDirError(f"--resume {self.path}: not a falign run directory (no {MARKER} marker of a "
                                  f"run, and its config.json and versions.json are not falign's)")
            self.folder.check_links()
            return
        self.folder.check()
        if self.folder.holds_output() and not overwrite:
            raise RunDirError(f"{self.path} already holds a run; pass --resume to continue it or --overwrite to "
                              f"replace it (which deletes only the files a falign run writes)")

    def claim(self, *, resume: bool, overwrite: bool) -> None:
        """Mark and lock the folder; ``overwrite`` deletes only a run's own files. Stale temporary files of
        a crash during an atomic write are removed."""
        self.check(resume=resume, overwrite=overwrite)
        if not resume:
            if self.folder.holds_output():
                self._lock_or_fail()  # refuse to wipe a folder another process is writing
                self.release()
            self.folder.claim(overwrite=overwrite)
        self._lock_or_fail()
        self.claimed = True
        for stale in self.folder.stale_temps():
            (self.path / stale).unlink()

    def _lock_or_fail(self) -> None:
        self._lock = open_append(self.path / ".lock")  # never truncated, never through a link
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise RunDirError(f"{self.path} is locked by another falign process writing this run") from None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def abandon(self) -> None:
        """Undo the claim of a new run that failed before its first training step: its files, marker and lock
        go, and the folders the claim created (:meth:`falign.app.outdir.OutputDir.abandon`)."""
        self.release()
        if self.claimed:
            self.folder.abandon()
            self.claimed = False

    # -- files ---------------------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any]:
        """The saved config of the run, as a mapping (clear errors for an unreadable or malformed file)."""
        path = self.path / "config.json"
        try:
            saved = json.loads(path.read_text())
        except OSError as err:
            raise RunDirError(f"{path}: cannot read it: {err.strerror or err}") from None
        except ValueError as err:
            raise RunDirError(f"{path} is not valid JSON ({err}); the run cannot be resumed") from None
        if not isinstance(saved, dict):
            raise RunDirError(f"{path} must hold a JSON object of config fields, got a {type(saved).__name__}")
        return saved

    def write_json(self, name: str, obj: Any) -> None:
        if self.main:
            write_json(self.path / name, obj)

    def log(self, row: dict[str, Any], name: str = "metrics.jsonl") -> None:
        """Append a JSON row to ``metrics.jsonl`` (counted) or another ``.jsonl`` file of the run."""
        if not self.main:
            return
        append_text(self.path / name, json.dumps(row) + "\n")
        if name == "metrics.jsonl":
            self.rows += 1

    def rows_of(self, name: str) -> list[dict[str, Any]]:
        path = self.path / name
        return read_metrics(path) if path.exists() else []

    def start_fresh(self) -> None:
        """A new run: no metrics or timing rows from an earlier one."""
        if self.main:
            self.metrics.unlink(missing_ok=True)
            (self.path / "timing.jsonl").unlink(missing_ok=True)
            (self.path / "scale.jsonl").unlink(missing_ok=True)
        self.rows = 0

    def keep_rows(self, rows: int) -> None:
        """Cut ``metrics.jsonl`` back to the rows written when the checkpoint being resumed was taken."""
        self.rows = rows
        if self.main:
            lines = self.metrics.read_text().splitlines(keepends=True) if self.metrics.exists() else []
            atomic_write(self.metrics, lambda f: f.write("".join(lines[:rows])), "w")

    def save_checkpoint(self, state: dict[str, Any], before_replace: Callable[[], None] | None = None) -> None:
        """Write ``checkpoint.pt`` atomically."""
        if self.main:
            atomic_write(self.checkpoint, lambda f: torch.save(state, f), before_replace=before_replace)

    def load_checkpoint(self, map_location: Any) -> dict[str, Any] | None:
        return load_checkpoint(self.checkpoint, map_location=map_location) if self.checkpoint.exists() else None
