"""Output folders that falign owns: what it may write, and the only files it may ever delete.

Every command that writes a folder (``falign train --out``, ``reproduce --out``, ``plot --out``,
``bench accuracy --out``) claims it first with :meth:`OutputDir.claim`:

- a path that exists and is not a folder is refused;
- a new or empty folder is created and marked with a ``.falign`` file naming the kind of output;
- a folder is falign's only if its ``.falign`` marker (a plain file, not a link) says so: a folder that holds
  output of the same kind is reused; with ``overwrite=True`` the files that kind of output consists of
  (:data:`OWNED`) are deleted first, one by one;
- a folder without that marker holds nothing of falign's, whatever its files are called: unless it is empty, it
  is refused with a list of its files. Nothing else is ever deleted, and the folder itself (``.``, a home
  directory, ...) is never removed;
- falign never writes through a symbolic link: an output path that is a link, or a folder holding one, is
  refused (:meth:`OutputDir.check_links`); files are written by :func:`atomic_write` (a new file renamed into
  place, which replaces a link rather than following it) or opened by :func:`open_append` (``O_NOFOLLOW``).

A failed write (a full disk) is a :class:`WriteError` naming the file. A claim that fails, or a command that
fails before it writes anything, leaves nothing behind (:meth:`OutputDir.abandon`). Output *files* (``bench
speed --json``, ``--docs``) are checked with :func:`check_file` before any work starts.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from falign.errors import FalignError

MARKER = ".falign"

# Relative POSIX paths (fnmatch patterns; "*" does not cross "/") that each kind of output consists of.
OWNED: dict[str, tuple[str, ...]] = {
    "run": (
        MARKER, ".lock", "config.json", "versions.json", "metrics.jsonl", "timing.jsonl",
        "checkpoint.pt", "summary.json", "resumes.jsonl", "scale.jsonl", "tensorboard/events.out.tfevents.*",
        "wandb.json",
        "plots/" + MARKER, "plots/alignment.png", "plots/conservation.png", "plots/decomposition.png",
        "plots/scale.png",
    ),
    "plots": (MARKER, "alignment.png", "conservation.png", "decomposition.png", "scale.png"),
    "compare": (MARKER, "compare.png", "*/" + MARKER, "*/alignment.png", "*/conservation.png", "*/decomposition.png",
                "*/scale.png"),
    "report": (MARKER, "report.md", "report.html", "tables/*.csv", "figures/*.png", "*/runs/*/**"),
    "bench": (MARKER, "results.csv", "summary.csv", "runs/*/**", "tune/*/**", "tuning.csv", "lr.json",
               "results.json", "summary.json", "pipeline.png"),
}


# The temporary file of an interrupted atomic write of NAME: ".NAME.<8 hex digits>.tmp" (see atomic_write).
_TEMP = re.compile(r"(?P<folder>(?:.*/)?)\.(?P<name>[^/]+)\.[a-z0-9_]{8}\.tmp")


class OutputError(FalignError, ValueError):
    """An output path cannot be used as asked (a file where a folder is needed, foreign files, ...)."""


class WriteError(FalignError, OSError):
    """A file of falign's output could not be written (a full disk, a link in its place, ...)."""


def _write_error(path: Path, err: OSError, kept: bool) -> WriteError:
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        reason += " (the disk is full or a file-size limit is reached)"
    return WriteError(f"cannot write {path}: {reason}" + (f"; the previous {path.name} is kept" if kept else ""))


class _Recording:
    """A file object that remembers the error of a failed write (``torch.save``'s zip writer swallows it and
    raises a ``RuntimeError`` of its own)."""

    def __init__(self, file: IO[Any]) -> None:
        self._file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb",
                 before_replace: Callable[[], None] | None = None) -> None:
    """Write ``path`` through ``write(fileobj)`` into a new temporary file beside it (``.NAME.<hex>.tmp``),
    fsync it, then rename it over ``path``: a crash never leaves a half-written file in its place, and a link
    at ``path`` is replaced, never followed.

    The file gets the mode a plain ``open`` would give it (an existing file's own mode, else 0666 less the
    umask). A failed write (a full disk) raises :class:`WriteError` naming the file, and the previous file is
    kept. ``before_replace`` runs between the fsync and the rename (fault injection in tests).
    """
    path = Path(path)
    try:
        old = os.lstat(path)
    except FileNotFoundError:
        old = None
    kept = old is not None and stat.S_ISREG(old.st_mode)
    tmp, fd = None, -1
    try:
        while fd < 0:
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                continue
        if kept:
            os.fchmod(fd, stat.S_IMODE(old.st_mode))
        with os.fdopen(fd, mode) as f:
            recording = _Recording(f)
            try:
                write(recording)
            except Exception as err:
                if recording.error is not None and not isinstance(err, OSError):
                    raise recording.error from err
                raise
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as err:
        if tmp is not None and fd >= 0 and os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise _write_error(path, err, kept) from None
        raise


def open_append(path: str | Path) -> IO[str]:
    """Open a file of an output folder for appending text (created if missing, never truncated), without
    following a symbolic link: a link at ``path`` or a failed open raises :class:`WriteError`."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise WriteError(f"{path} is a symbolic link; falign never writes through a link in its output "
                             f"folders: remove it") from None
        raise _write_error(path, err, False) from None
    return os.fdopen(fd, "a")


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to a file of an output folder (:func:`open_append`); a failed write (a full disk)
    raises :class:`WriteError` naming the file."""
    try:
        with open_append(path) as f:
            f.write(text)
    except WriteError:
        raise
    except OSError as err:
        raise _write_error(Path(path), err, False) from None


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


def _owned(rel: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``rel`` is a file of this kind of output, or the temporary file of an atomic write of one."""
    temp = _TEMP.fullmatch(rel)
    return _matches(temp["folder"] + temp["name"] if temp else rel, patterns)


def _read_marker(path: Path) -> str | None:
    """The kind of output the folder's marker names (``None``: no marker, a link, or not falign's)."""
    marker = path / MARKER
    if marker.is_symlink():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def legacy_run(path: Path) -> bool:
    """A run directory written before markers existed: falign's config.json and versions.json (trusted only
    where the user names the run, ``--resume``; never to replace files)."""
    try:
        config = json.loads((path / "config.json").read_text())
        versions = json.loads((path / "versions.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "rule" in config and isinstance(versions, dict) and "falign" in versions


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_file(path: str | Path, what: str, replaces: Callable[[Path], bool] | None = None) -> Path:
    """An output file path that can be written: its folder exists and it is not a folder itself.

    Called before the work that produces the file, so a bad path fails at once. ``replaces``: for a file
    that is written whole, whether an existing file at ``path`` is falign's own earlier output of this kind
    (anything else is refused, never replaced).
    """
    if not str(path).strip():
        raise OutputError(f"{what} is empty; give a file name")
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{what} {path} is a symbolic link; falign never writes through links: give a file name")
    if replaces is not None and path.is_file() and not replaces(path):
        raise OutputError(f"{what} {path} exists and is not falign's output of this kind; falign never replaces "
                          f"such a file: give a new file name")
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
        kind: ``run``, ``plots``, ``compare``, ``report`` or ``bench`` (which files it consists of: :data:`OWNED`).
        what: how error messages name it (e.g. ``"--out"``).
    """

    def __init__(self, path: str | Path, kind: str, what: str = "output folder") -> None:
        if kind not in OWNED:
            raise ValueError(f"unknown output kind {kind!r}")
        self.path = Path(path)
        self.kind = kind
        self.what = what
        self.created: list[Path] = []  # folders this claim created (removed again by abandon)
        self.fresh = False  # whether every file of this kind in the folder was written since the claim

    def marked(self) -> bool:
        """Whether the folder's ``.falign`` marker (a plain file) says it holds this kind of output."""
        return _read_marker(self.path) == self.kind

    def owned(self) -> list[str]:
        """Files in a marked folder that this kind of output consists of (plain files, never links)."""
        if not self.marked():
            return []
        return [f for f in _files(self.path)
                if _owned(f, OWNED[self.kind]) and not (self.path / f).is_symlink()]

    def foreign(self) -> list[str]:
        """Files in the folder that falign did not write (never deleted): every file of a folder without the
        marker of this kind, and every link."""
        if not self.path.is_dir():
            return []
        owned = set(self.owned())
        return [f for f in _files(self.path) if f not in owned]

    def links(self) -> list[str]:
        """Symbolic links in the folder (never followed), as relative POSIX paths."""
        return [f for f in _files(self.path) if (self.path / f).is_symlink()] if self.path.is_dir() else []

    def stale_temps(self) -> list[str]:
        """Temporary files of interrupted atomic writes of this kind's own files (plain files only)."""
        return [f for f in self.owned() if _TEMP.fullmatch(f)]

    def holds_output(self) -> bool:
        """Whether the folder already holds this kind of output (beyond a marker or a stale lock)."""
        return any(f not in (MARKER, ".lock") for f in self.owned())

    def check_links(self) -> None:
        """Refuse an output path that is a symbolic link, or a folder holding one: falign never writes
        through a link."""
        if self.path.is_symlink():
            raise OutputError(f"{self.what} {self.path} is a symbolic link (to {os.path.realpath(self.path)}); "
                              f"falign never writes through a link: give the folder itself")
        links = self.links()
        if links:
            raise OutputError(f"{self.what} {self.path} holds symbolic links ({_listing(links)}); falign never "
                              f"writes through a link in its output folders: remove them or choose another folder")

    def check(self) -> None:
        """Refuse a path that is a file or a link, or a folder with a link, a folder of another kind, or one
        with files falign did not write (a folder without the marker of this kind, unless it is empty)."""
        self.check_links()
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
            unmarked = "" if marker == self.kind else f" and no {MARKER} marker"
            raise OutputError(f"{self.what} {self.path} holds files falign did not write ({_listing(foreign)})"
                              f"{unmarked}; falign never writes into or deletes such a folder: choose a new or "
                              f"empty folder")

    def claim(self, *, overwrite: bool = False, reuse: bool = True) -> Path:
        """Make the folder ready for writing; returns its path.

        ``reuse``: a folder that already holds this kind of output may be written again (its files are
        replaced as they are rewritten). ``overwrite``: delete that output first (only :data:`OWNED` files).
        With neither, a folder holding output is refused.
        """
        self.check()
        fresh = True
        if self.holds_output():
            if overwrite:
                self._delete_owned()
            elif not reuse:
                raise OutputError(f"{self.what} {self.path} already holds falign {self.kind} output")
            else:
                fresh = False
        missing = []
        parent = self.path
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path / MARKER, lambda f: f.write(json.dumps({"kind": self.kind}) + "\n"), "w")
        except WriteError:
            raise
        except OSError as err:
            raise OutputError(f"{self.what} {self.path}: cannot write there: {err.strerror or err}") from None
        self.created = missing
        self.fresh = fresh
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
        """Undo a claim after a failed start: when the claim found no earlier output of this kind (or deleted
        it), remove every file of this kind (all written since the claim, the marker and lock included), then
        the folders the claim created if nothing else was written into them."""
        if self.fresh:
            self._delete_owned()
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break
