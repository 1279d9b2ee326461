"""Output folders that falign owns: what it may write, and the only files it may ever delete.

Every command that writes a folder (``falign train --out``, ``reproduce --out``, ``plot --out``,
``bench accuracy --out``) claims it first with :meth:`OutputDir.claim`:

- a path that exists and is not a folder is refused;
- a new or empty folder is created and marked with a ``.falign`` file naming the kind of output;
- a folder that already holds output of the same kind (its ``.falign`` marker, or for runs written before
  markers existed, ``config.json`` + ``versions.json`` written by falign) is reused; with ``overwrite=True``
  the files that kind of output consists of (:data:`OWNED`) are deleted first, one by one;
- anything else in the folder is never deleted: a folder holding a file that falign did not write is refused
  with a list of those files, and the folder itself (``.``, a home directory, ...) is never removed.

A claim that fails, or a command that fails before it writes anything, leaves nothing behind
(:meth:`OutputDir.abandon`). Output *files* (``bench speed --json``) are checked with :func:`check_file`
before any work starts.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

from falign.errors import FalignError

MARKER = ".falign"

# Relative POSIX paths (fnmatch patterns; "*" does not cross "/") that each kind of output consists of.
OWNED: dict[str, tuple[str, ...]] = {
    "run": (
        MARKER, ".lock", ".*.tmp", "config.json", "versions.json", "metrics.jsonl", "timing.jsonl",
        "checkpoint.pt", "summary.json", "resumes.jsonl", "tensorboard/events.out.tfevents.*",
        "plots/" + MARKER, "plots/alignment.png", "plots/conservation.png", "plots/decomposition.png",
    ),
    "plots": (MARKER, "alignment.png", "conservation.png", "decomposition.png"),
    "report": (MARKER, "report.md", "report.html", "tables/*.csv", "figures/*.png", "*/runs/*/**"),
    "bench": (MARKER, "results.csv", "summary.csv", "runs/*/**", "results.json", "summary.json", "pipeline.png"),
}


class OutputError(FalignError, ValueError):
    """An output path cannot be used as asked (a file where a folder is needed, foreign files, ...)."""


def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern.endswith("/**"):
            prefix = pattern[:-3]
            parts, prefix_parts = rel.split("/"), prefix.split("/")
            if len(parts) > len(prefix_parts) and all(
                    fnmatch.fnmatchcase(p, q) for p, q in zip(parts, prefix_parts)):
                return True
        elif rel.count("/") == pattern.count("/") and fnmatch.fnmatchcase(rel, pattern):
            return True
    return False


def _files(path: Path) -> list[str]:
    """Every file (and symlink) below ``path`` as relative POSIX paths; symlinks are never followed."""
    out = []
    for root, dirs, files in os.walk(path, followlinks=False):
        rel_root = Path(root).relative_to(path)
        links = [d for d in dirs if (Path(root) / d).is_symlink()]
        dirs[:] = [d for d in dirs if d not in links]
        out += [(rel_root / name).as_posix() for name in (*files, *links)]
    return sorted(out)


def _read_marker(path: Path) -> str | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def _legacy_run(path: Path) -> bool:
    """A run directory written before markers existed: falign's config.json and versions.json."""
    try:
        config = json.loads((path / "config.json").read_text())
        versions = json.loads((path / "versions.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "rule" in config and isinstance(versions, dict) and "falign" in versions


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_file(path: str | Path, what: str) -> Path:
    """An output file path that can be written: its folder exists and it is not a folder itself.

    Called before the work that produces the file, so a bad path fails at once.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{what} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"{what} {path}: not writable")
    return path


class OutputDir:
    """A folder that one falign command writes (see the module docstring).

    Args:
        path: the folder.
        kind: ``run``, ``plots``, ``report`` or ``bench`` (which files it consists of: :data:`OWNED`).
        what: how error messages name it (e.g. ``"--out"``).
    """

    def __init__(self, path: str | Path, kind: str, what: str = "output folder") -> None:
        if kind not in OWNED:
            raise ValueError(f"unknown output kind {kind!r}")
        self.path = Path(path)
        self.kind = kind
        self.what = what
        self.created: list[Path] = []  # folders this claim created (removed again by abandon)

    def owned(self) -> list[str]:
        """Files in the folder that this kind of output consists of."""
        return [f for f in _files(self.path) if _matches(f, OWNED[self.kind])] if self.path.is_dir() else []

    def foreign(self) -> list[str]:
        """Files in the folder that falign did not write (never deleted)."""
        return [f for f in _files(self.path) if not _matches(f, OWNED[self.kind])] if self.path.is_dir() else []

    def holds_output(self) -> bool:
        """Whether the folder already holds this kind of output (beyond a marker or a stale lock)."""
        substantive = [f for f in self.owned() if f not in (MARKER, ".lock")]
        return bool(substantive) and (_read_marker(self.path) == self.kind
                                      or (self.kind == "run" and _legacy_run(self.path)))

    def check(self) -> None:
        """Refuse a path that is a file, or a folder of another kind / with files falign did not write."""
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.what} {self.path} is a file, not a folder")
        if not self.path.is_dir():
            return
        marker = _read_marker(self.path)
        if marker is not None and marker != self.kind:
            raise OutputError(f"{self.what} {self.path} holds falign {marker} output, not {self.kind} output; "
                              f"choose another folder")
        foreign = self.foreign()
        if foreign:
            raise OutputError(f"{self.what} {self.path} holds files falign did not write ({_listing(foreign)}); "
                              f"falign never writes into or deletes such a folder: choose a new or empty folder")

    def claim(self, *, overwrite: bool = False, reuse: bool = True) -> Path:
        """Make the folder ready for writing; returns its path.

        ``reuse``: a folder that already holds this kind of output may be written again (its files are
        replaced as they are rewritten). ``overwrite``: delete that output first (only :data:`OWNED` files).
        With neither, a folder holding output is refused.
        """
        self.check()
        if self.holds_output():
            if overwrite:
                self._delete_owned()
            elif not reuse:
                raise OutputError(f"{self.what} {self.path} already holds falign {self.kind} output")
        missing = []
        parent = self.path
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / MARKER).write_text(json.dumps({"kind": self.kind}) + "\n")
        except OSError as err:
            raise OutputError(f"{self.what} {self.path}: cannot write there: {err.strerror or err}") from None
        self.created = missing
        return self.path

    def _delete_owned(self) -> None:
        owned = self.owned()
        for rel in owned:
            (self.path / rel).unlink()
        # folders inside the output left empty (deepest first); never the output folder itself
        folders = {parent for rel in owned for parent in Path(rel).parents if str(parent) != "."}
        for folder in sorted(folders, key=lambda p: -len(p.parts)):
            try:
                (self.path / folder).rmdir()
            except OSError:
                pass

    def abandon(self) -> None:
        """Undo a claim after a failed start: remove the marker and lock, and the folders the claim created
        if nothing else was written into them."""
        for name in (MARKER, ".lock"):
            try:
                (self.path / name).unlink()
            except FileNotFoundError:
                pass
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break
