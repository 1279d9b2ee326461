"""Adversarial and odd-but-legal inputs to falign's command line and API, each judged against what a correct
program does (bad inputs refused with a clear error, legal uses working, no user file touched).

    PYTHONPATH=src python benchmarks/adversarial.py --out results.csv [--only PATTERN] [--keep]

Only ``falign`` is imported, so ``PYTHONPATH`` decides which checkout is measured. Every case runs in a fresh
temporary folder (its working directory is ``<tmp>/cwd``, a victim file lives in ``<tmp>/outside``), in-process
through ``falign.app.cli.main`` or the API, or in a subprocess where it needs one (torchrun, ulimit). Nothing
expensive runs: benchmark and reproduce work is replaced by a guard that stops the command the moment it
*starts* working (a refusal must come before that), and training runs are a few dozen examples.

Each case expects one of:

- ``refuse`` (bad input). Outcomes: ``clear error`` (command line: rc != 0 with a message and no traceback; API: a
  FalignError, or a ValueError/TypeError/RuntimeError raised by falign's own code, with a message; and nothing
  written outside the intended folder); ``traceback`` (any exception escaping ``falign.app.cli.main``, an unexpected
  exception from the API, a traceback printed, a crash); ``silent`` (accepted: rc 0, or the work started);
  ``data loss`` (a user file modified or deleted, something written outside the intended folder, or a folder of
  user files claimed for output); ``wrong`` (a clear error that left a claimed folder behind with no record of
  the failure).
- ``ok`` (odd-but-legal use). Outcomes: ``ok``, ``traceback``, ``wrong`` (refused, or the check of the result
  failed), ``data loss``.
- ``safe`` (either a clear refusal or a correct result is right): ``ok`` / ``clear error`` are right,
  ``traceback`` / ``wrong`` / ``data loss`` are not.

Prints one progress line per case, a table and the totals by outcome; ``--out`` writes the rows as CSV.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import hashlib
import importlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TINY = ["--epochs", "1", "--train-subset", "64", "--batch-size", "32", "--hidden", "16", "--no-progress"]
TINY_DATA = ["--epochs", "1", "--batch-size", "16", "--hidden", "16", "--no-progress"]  # tiny files: no subset
OUTCOMES = ("clear error", "ok", "traceback", "silent", "data loss", "wrong")
VICTIM = "precious user data\n"


class WorkStarted(BaseException):
    """Raised by a guard when a command starts its real work (training, timing, experiments)."""


@dataclass
class Res:
    rc: int | None = None
    out: str = ""
    err: str = ""
    exc: BaseException | None = None
    tb: str = ""
    value: object = None
    guard: str | None = None
    timed_out: bool = False
    api: bool = False


@dataclass
class Ctx:
    root: Path

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    @property
    def victim(self) -> Path:
        return self.root / "outside" / "victim.txt"

    def p(self, rel: str) -> str:
        return str(self.root / rel)


@dataclass
class Case:
    id: str
    expect: str  # refuse | ok | safe
    what: str
    run: Callable[[Ctx], Res]
    setup: Callable[[Ctx], None] | None = None
    check: Callable[[Ctx, Res], str | None] | None = None  # a problem with the result, or None
    allowed: tuple[str, ...] = ("cwd",)  # where changes are allowed (relative to the case's folder)
    protect: tuple[str, ...] = ()  # user files that must stay byte-identical (even inside allowed)
    accept: tuple[type, ...] = ()  # further exception types that count as a clear error (API cases)
    accept_msg: str | None = None  # ... when their message matches this
    loss_if_accepted: bool = False  # the command accepting the input means it will overwrite user files
    clean: str | None = None  # a folder a refused command must not leave claimed (relative)
    guard: bool = False
    needs: str | None = None
    notes: list[str] = field(default_factory=list)


CASES: list[Case] = []


def case(id_: str, expect: str, what: str, run: Callable[[Ctx], Res], **kw) -> None:
    CASES.append(Case(id_, expect, what, run, **kw))


# ---- running things ------------------------------------------------------------------------------------------
def _capture(res: Res, call: Callable[[], None]) -> Res:
    """Run ``call`` with stdout/stderr captured into ``res``; an exception (other than the work guard's) is kept
    with its traceback for the classifier."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except WorkStarted as e:
            res.guard = str(e)
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            res.exc, res.tb = e, traceback.format_exc()
    res.out, res.err = out.getvalue(), err.getvalue()
    return res


def cli(args: list[str] | Callable[[Ctx], list[str]]) -> Callable[[Ctx], Res]:
    def run(ctx: Ctx) -> Res:
        from falign.app.cli import main

        argv = [str(a) for a in (args(ctx) if callable(args) else args)]
        res = Res()

        def call() -> None:
            try:
                res.rc = main(argv)
            except SystemExit as e:
                res.rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)

        return _capture(res, call)

    run.argv = args  # type: ignore[attr-defined]
    return run


def api(fn: Callable[[Ctx], object]) -> Callable[[Ctx], Res]:
    def run(ctx: Ctx) -> Res:
        res = Res(api=True)

        def call() -> None:
            res.value = fn(ctx)
            res.rc = 0

        return _capture(res, call)

    return run


def sub(cmd: Callable[[Ctx], str], timeout: float = 300) -> Callable[[Ctx], Res]:
    """A shell command (``bash -c``) in the case's working directory; ``{py}`` is this Python."""

    def run(ctx: Ctx) -> Res:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        try:
            proc = subprocess.run(["bash", "-c", cmd(ctx).replace("{py}", sys.executable)], cwd=ctx.cwd, env=env,
                                  capture_output=True, text=True, timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired as e:
            return Res(rc=None, out=str(e.stdout or ""), err=str(e.stderr or ""), timed_out=True)
        return Res(rc=proc.returncode, out=proc.stdout, err=proc.stderr)

    return run


# ---- guards: stop benchmark / reproduce work the moment it starts ------------------------------------------
class Guards:
    def __init__(self) -> None:
        self.saved: list[tuple[object, str, object]] = []

    def _guard(self, name: str) -> Callable:
        def guard(*args, **kwargs):
            raise WorkStarted(name)

        return guard

    def patch(self, owner: object, attr: str, value: object) -> None:
        if owner is not None and hasattr(owner, attr):
            self.saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, value)

    def install(self) -> None:
        def mod(name: str):
            try:
                return importlib.import_module(name)
            except Exception:
                return None

        speed, arch = mod("falign.app.bench.speed"), mod("falign.app.bench.architectures")
        for attr in ("bench_model",):
            self.patch(speed, attr, self._guard(f"bench speed {attr}"))
        for attr in ("run_benchmark", "train_once", "time_steps", "make_tasks"):
            self.patch(arch, attr, self._guard(f"bench architectures {attr}"))
        pipe = mod("falign.app.bench.pipeline")
        if pipe is not None and hasattr(pipe, "subprocess"):
            fake = types.SimpleNamespace(**{k: getattr(subprocess, k) for k in dir(subprocess)
                                            if not k.startswith("_")})
            fake.run = fake.Popen = fake.call = fake.check_call = self._guard("bench pipeline processes")
            self.patch(pipe, "subprocess", fake)
        trainer = mod("falign.app.train.trainer")
        if trainer is not None:
            self.patch(trainer.Trainer, "run", self._guard("Trainer.run (bench accuracy training)"))
        experiments = mod("falign.app.experiments")
        for name, module in (getattr(experiments, "EXPERIMENTS", None) or {}).items():
            self.patch(module, "run", self._guard(f"reproduce experiment {name}"))

    def remove(self) -> None:
        for owner, attr, value in reversed(self.saved):
            setattr(owner, attr, value)
        self.saved.clear()


# ---- files ---------------------------------------------------------------------------------------------------
def write_idx(path: Path, array, type_byte: int = 0x08, dims: list[int] | None = None, gz: bool = False) -> Path:
    import numpy as np

    array = np.asarray(array)
    dims = list(array.shape) if dims is None else dims
    header = bytes([0, 0, type_byte, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def write_mnist(folder: Path, n_train: int = 40, n_test: int = 20, side: int = 6, train_labels=None,
                test_labels=None, classes: int = 10) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    write_idx(folder / IDX_FILES["train_images"], rng.integers(0, 256, (n_train, side, side)))
    write_idx(folder / IDX_FILES["train_labels"],
              np.arange(n_train) % classes if train_labels is None else np.asarray(train_labels))
    write_idx(folder / IDX_FILES["test_images"], rng.integers(0, 256, (n_test, side, side)))
    write_idx(folder / IDX_FILES["test_labels"],
              np.arange(n_test) % classes if test_labels is None else np.asarray(test_labels))


def write_cifar(folder: Path, name: str = "cifar10", n: int = 8, data=None, labels=None, bad_files=None) -> None:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    key, files = (("labels", ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                              "test_batch"]) if name == "cifar10" else ("fine_labels", ["train", "test"]))
    for stem in files:
        bad = bad_files is None or stem in bad_files
        d = data if (data is not None and bad) else rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = labels if (labels is not None and bad) else [int(v) for v in np.arange(n) % 10]
        with open(folder / stem, "wb") as f:
            pickle.dump({b"data": d, key.encode(): y}, f, protocol=2)


def png_bytes(width: int, height: int, pixels: bytes | None = None) -> bytes:
    """A PNG (8-bit RGB); with ``pixels=None`` the image data is a tiny stream whatever the header claims."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    if pixels is None:
        raw = zlib.compress(b"\x00" * 16)
    else:
        rows = b"".join(b"\x00" + pixels[y * width * 3:(y + 1) * width * 3] for y in range(height))
        raw = zlib.compress(rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


GOOD_PNG = png_bytes(4, 4, bytes(range(48)))


def write_tiny_imagenet(root: Path, bad_later: bytes | None = None, first: bytes | None = None,
                        annotations: str | None = None) -> None:
    """``root/tiny-imagenet-200`` with 2 classes of 3 training images and 2 validation images."""
    tin = root / "tiny-imagenet-200"
    for c in ("n01", "n02"):
        folder = tin / "train" / c / "images"
        folder.mkdir(parents=True)
        for i in range(3):
            data = GOOD_PNG
            if c == "n01" and i == 0 and first is not None:
                data = first
            if c == "n01" and i == 2 and bad_later is not None:
                data = bad_later
            (folder / f"{c}_{i}.png").write_bytes(data)
    (tin / "val" / "images").mkdir(parents=True)
    for i in range(2):
        (tin / "val" / "images" / f"val_{i}.png").write_bytes(GOOD_PNG)
    (tin / "val" / "val_annotations.txt").write_text(
        annotations if annotations is not None else "val_0.png\tn01\t0\t0\t4\t4\nval_1.png\tn02\t0\t0\t4\t4\n")


def write_image_folder(root: Path, bad_later: bytes | None = None, first: bytes | None = None) -> None:
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(3):
                data = GOOD_PNG
                if split == "train" and c == "cat" and i == 0 and first is not None:
                    data = first
                if split == "train" and c == "cat" and i == 2 and bad_later is not None:
                    data = bad_later
                (folder / f"{i}.png").write_bytes(data)


# ---- shared fixtures (built once, copied per case) -----------------------------------------------------------
_FIXTURES: dict[str, Path] = {}
_BASE_DIR: Path | None = None


def fixture(name: str) -> Path:
    """A finished tiny run (``run``) or one with diagnostics (``diag``), built once."""
    if name in _FIXTURES:
        return _FIXTURES[name]
    from falign.app.cli import main

    assert _BASE_DIR is not None
    path = _BASE_DIR / f"fixture-{name}"
    extra = ["--diagnostics-every", "1"] if name == "diag" else []
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["train", *TINY, *extra, "--out", str(path)])
    if rc != 0:
        raise RuntimeError(f"could not build the {name} fixture (rc {rc})")
    _FIXTURES[name] = path
    return path


def copy_run(ctx: Ctx, name: str = "run", to: str = "cwd/run") -> Path:
    dest = ctx.root / to
    shutil.copytree(fixture(name), dest, symlinks=True)
    return dest


def link(path: Path, target: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


# ---- judging -------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                out[rel] = ("link", os.readlink(full))
            else:
                try:
                    with open(full, "rb") as f:
                        out[rel] = ("file", hashlib.sha1(f.read()).hexdigest())
                except OSError:
                    out[rel] = ("unreadable",)
    return out


def under(rel: str, prefix: str) -> bool:
    return rel == prefix or rel.startswith(prefix.rstrip("/") + "/")


def losses(c: Case, before: dict, after: dict) -> list[str]:
    found = []
    for rel in sorted(set(before) | set(after)):
        if before.get(rel) == after.get(rel):
            continue
        what = "deleted" if rel not in after else ("created" if rel not in before else "modified")
        if any(under(rel, p) for p in c.protect):
            found.append(f"user file {rel} {what}")
        elif not any(under(rel, a) for a in c.allowed):
            found.append(f"{rel} {what} outside the intended folder")
    return found


_FALIGN_DIR: str = ""


def clear_exception(c: Case, exc: BaseException, tb: str) -> bool:
    try:
        from falign.errors import FalignError
    except ImportError:  # pragma: no cover
        FalignError = ()
    msg = str(exc).strip()
    if not msg:
        return False
    if FalignError and isinstance(exc, FalignError):
        return True
    if c.accept and isinstance(exc, c.accept) and (c.accept_msg is None or re.search(c.accept_msg, msg)):
        return True
    if isinstance(exc, (ValueError, TypeError, RuntimeError, FileNotFoundError, NotADirectoryError,
                        IsADirectoryError)):
        frames = traceback.extract_tb(exc.__traceback__)
        return bool(frames) and frames[-1].filename.startswith(_FALIGN_DIR)  # raised on purpose by falign
    return False


def leftover(ctx: Ctx, rel: str) -> str | None:
    path = ctx.root / rel
    if not path.exists():
        return None
    try:
        status = json.loads((path / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    if status not in (None, "completed"):
        return None  # a failed run that says so
    return f"the refused command left {rel} behind ({', '.join(sorted(os.listdir(path))[:6]) or 'empty'})"


def judge(c: Case, ctx: Ctx, res: Res, lost: list[str]) -> tuple[str, str]:
    text = res.out + res.err
    printed_tb = "Traceback (most recent call last)" in text
    first = lambda s: (s.strip().splitlines() or [""])[-1][:160]  # noqa: E731
    if res.exc is not None:
        message = str(res.exc).strip()
        detail = f"{type(res.exc).__name__}: {message.splitlines()[0][:140] if message else ''}"
    elif res.guard:
        detail = f"accepted: {res.guard} started"
    elif res.timed_out:
        detail = "still running at the time limit"
    elif res.api:
        detail = f"returned {res.value!r}"[:160]
    else:
        detail = f"rc {res.rc}: {first(res.err) or first(res.out)}"
    if lost:
        return "data loss", "; ".join(lost)[:300]
    if c.expect == "refuse":
        if res.guard:
            if c.loss_if_accepted:
                return "data loss", detail + " in a folder of user files (they would be overwritten)"
            return "silent", detail
        if res.timed_out:
            return "silent", detail
        if res.exc is not None:
            if res.api and clear_exception(c, res.exc, res.tb):
                outcome = "clear error"
            else:
                return "traceback", detail
        elif printed_tb or (res.rc is not None and res.rc < 0):
            return "traceback", detail + (" (killed by a signal)" if res.rc is not None and res.rc < 0 else "")
        elif res.rc in (0, None):
            problem = c.check(ctx, res) if c.check else None
            return "silent", detail + (f" [{problem}]" if problem else "")
        else:
            outcome = "clear error"
        problem = leftover(ctx, c.clean) if c.clean else None
        if problem is None and c.check:
            problem = c.check(ctx, res)
        return ("wrong", f"{detail} [{problem}]") if problem else (outcome, detail)
    # ok / safe
    if res.exc is not None:
        if c.expect == "safe" and res.api and clear_exception(c, res.exc, res.tb):
            return "clear error", detail
        return "traceback", detail
    if printed_tb or (res.rc is not None and res.rc < 0) or res.timed_out:
        return "traceback", detail
    if res.guard:
        return "ok", detail
    if res.rc not in (0, None):
        return ("clear error" if c.expect == "safe" else "wrong"), detail
    problem = c.check(ctx, res) if c.check else None
    if problem:
        return "wrong", problem[:300]
    return "ok", detail


def run_case(c: Case, base: Path, keep: bool, guards: Guards) -> dict:
    root = Path(tempfile.mkdtemp(prefix=f"{c.id}-", dir=base))
    ctx = Ctx(root)
    ctx.cwd.mkdir()
    ctx.victim.parent.mkdir()
    ctx.victim.write_text(VICTIM)
    start = time.perf_counter()
    old_cwd, old_threads = os.getcwd(), None
    try:
        import torch

        old_threads = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    try:
        if c.setup:
            c.setup(ctx)
        before = snapshot(root)
        os.chdir(ctx.cwd)
        if c.guard:
            guards.install()
        try:
            res = c.run(ctx)
        finally:
            guards.remove()
            os.chdir(old_cwd)
            if old_threads:
                torch.set_num_threads(old_threads)
        after = snapshot(root)
        outcome, detail = judge(c, ctx, res, losses(c, before, after))
        rc = res.rc
    except Exception as e:
        outcome, detail, rc = "harness error", f"{type(e).__name__}: {e}"[:300], None
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return {"id": c.id, "expect": c.expect, "outcome": outcome, "seconds": round(time.perf_counter() - start, 2),
            "rc": rc, "what": c.what, "detail": detail.replace("\n", " ")}


# ==== the cases ===============================================================================================
def T(*args: str) -> list[str]:
    return ["train", *TINY, *args]


def exists(rel: str) -> Callable[[Ctx, Res], str | None]:
    def check(ctx: Ctx, res: Res) -> str | None:
        return None if (ctx.root / rel).exists() else f"{rel} is missing"

    return check


def value_is(pred: Callable[[object], bool], what: str) -> Callable[[Ctx, Res], str | None]:
    def check(ctx: Ctx, res: Res) -> str | None:
        try:
            good = pred(res.value)
        except Exception as e:
            return f"check failed: {type(e).__name__}: {e}"
        return None if good else f"expected {what}, got {res.value!r}"[:300]

    return check


# ---- 1. folders of user files, links, failures after the claim -------------------------
def _user_run_files(ctx: Ctx) -> None:
    proj = ctx.cwd / "proj"
    proj.mkdir()
    (proj / "config.json").write_text('{"my": "experiment settings"}\n')
    (proj / "checkpoint.pt").write_bytes(b"my own weights")
    (proj / "metrics.jsonl").write_text('{"my": 1}\n')


case("dl-train-userfiles", "refuse", "train --out proj (user config.json/checkpoint.pt/metrics.jsonl, no .falign)",
     cli(lambda c: T("--out", c.p("cwd/proj"))), setup=_user_run_files,
     protect=("cwd/proj/config.json", "cwd/proj/checkpoint.pt", "cwd/proj/metrics.jsonl"))
case("dl-train-userfiles-overwrite", "refuse", "train --overwrite --out proj (user files, no .falign)",
     cli(lambda c: T("--overwrite", "--out", c.p("cwd/proj"))), setup=_user_run_files,
     protect=("cwd/proj/config.json", "cwd/proj/checkpoint.pt", "cwd/proj/metrics.jsonl"))


def _legacy_lookalike(ctx: Ctx) -> None:
    proj = ctx.cwd / "proj"
    proj.mkdir()
    (proj / "config.json").write_text('{"lr": 0.1, "note": "mine"}\n')
    (proj / "versions.json").write_text('{"python": "my pinned versions"}\n')


case("dl-train-legacy-lookalike", "refuse", "train --overwrite --out proj (user config.json + versions.json)",
     cli(lambda c: T("--overwrite", "--out", c.p("cwd/proj"))), setup=_legacy_lookalike,
     protect=("cwd/proj/config.json", "cwd/proj/versions.json"))


def _user_summary(ctx: Ctx) -> None:
    proj = ctx.cwd / "proj"
    proj.mkdir()
    (proj / "summary.json").write_text('{"mine": true}\n')


case("dl-train-user-summary", "refuse", "train --out proj (only a user summary.json)",
     cli(lambda c: T("--out", c.p("cwd/proj"))), setup=_user_summary, protect=("cwd/proj/summary.json",))


def _user_report(ctx: Ctx) -> None:
    d = ctx.cwd / "D"
    (d / "tables").mkdir(parents=True)
    (d / "report.md").write_text("# my report\n")
    (d / "tables" / "results.csv").write_text("a,b\n1,2\n")


case("dl-reproduce-user-report", "refuse", "reproduce --out D (user report.md, tables/results.csv; no .falign)",
     cli(lambda c: ["reproduce", "--only", "min_norm", "--no-progress", "--out", c.p("cwd/D")]),
     setup=_user_report, protect=("cwd/D/report.md", "cwd/D/tables/results.csv"), guard=True, loss_if_accepted=True)


def _user_tables_only(ctx: Ctx) -> None:
    d = ctx.cwd / "D" / "tables"
    d.mkdir(parents=True)
    (d / "conservation.csv").write_text("my,data\n")


case("dl-reproduce-user-tables", "refuse", "reproduce --out D (user tables/conservation.csv only)",
     cli(lambda c: ["reproduce", "--only", "conservation", "--no-progress", "--out", c.p("cwd/D")]),
     setup=_user_tables_only, protect=("cwd/D/tables/conservation.csv",), guard=True, loss_if_accepted=True)


def _user_png(ctx: Ctx) -> None:
    copy_run(ctx, "diag")
    d = ctx.cwd / "D"
    d.mkdir()
    (d / "alignment.png").write_bytes(b"my own figure")


case("dl-plot-user-png", "refuse", "plot RUN --out D (user alignment.png, no .falign)",
     cli(lambda c: ["plot", c.p("cwd/run"), "--out", c.p("cwd/D")]), setup=_user_png,
     protect=("cwd/D/alignment.png",))


def _user_bench(ctx: Ctx) -> None:
    _fmnist(ctx)
    d = ctx.cwd / "D"
    d.mkdir()
    (d / "results.csv").write_text("my,results\n")


case("dl-bench-user-results", "refuse", "bench accuracy --out D (user results.csv, no .falign)",
     cli(lambda c: ["bench", "accuracy", "--rules", "fa", "--seeds", "1", "--epochs", "1", "--docs", "",
                    "--no-progress", "--data-dir", c.p("fmnist"), "--out", c.p("cwd/D")]),
     setup=_user_bench, protect=("cwd/D/results.csv",), guard=True, loss_if_accepted=True)


def _link_in_new_folder(name: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        d = ctx.cwd / "D"
        d.mkdir()
        link(d / name, ctx.victim)

    return setup


for _name in (".lock", ".falign", "metrics.jsonl", "config.json"):
    case(f"dl-link-{_name.strip('.').replace('.', '-')}-fresh", "safe",
         f"train --out D where D/{_name} is a symlink to a file outside",
         cli(lambda c: T("--out", c.p("cwd/D"))), setup=_link_in_new_folder(_name))


def _run_with_link(name: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        run = copy_run(ctx)
        link(run / name, ctx.victim)

    return setup


for _name in (".lock", "resumes.jsonl", "metrics.jsonl", "timing.jsonl"):
    case(f"dl-link-{_name.strip('.').replace('.', '-')}-resume", "safe",
         f"train --resume RUN --epochs 2 where RUN/{_name} is a symlink to a file outside",
         cli(lambda c: ["train", "--resume", c.p("cwd/run"), "--epochs", "2", "--no-progress"]),
         setup=_run_with_link(_name))


def _link_dir_plots(ctx: Ctx) -> None:
    run = copy_run(ctx, "diag")
    (ctx.root / "outside" / "figs").mkdir()
    (run / "plots").symlink_to(ctx.root / "outside" / "figs")


case("dl-link-plots-dir", "safe", "plot RUN where RUN/plots is a symlink to a folder outside",
     cli(lambda c: ["plot", c.p("cwd/run")]), setup=_link_dir_plots)


def _user_tmp(ctx: Ctx) -> None:
    run = copy_run(ctx)
    (run / ".notes.tmp").write_text("my scratch notes\n")


case("dl-resume-user-tmpfile", "safe", "train --resume RUN --epochs 2 with a user's .notes.tmp in RUN",
     cli(lambda c: ["train", "--resume", c.p("cwd/run"), "--epochs", "2", "--no-progress"]), setup=_user_tmp,
     protect=("cwd/run/.notes.tmp",))


def _tmp_dir(ctx: Ctx) -> None:
    run = copy_run(ctx)
    (run / ".cache.tmp").mkdir()
    (run / ".cache.tmp" / "x").write_text("x")


case("dl-resume-tmp-directory", "safe", "train --resume RUN --epochs 2 with a .cache.tmp/ folder in RUN",
     cli(lambda c: ["train", "--resume", c.p("cwd/run"), "--epochs", "2", "--no-progress"]), setup=_tmp_dir,
     protect=("cwd/run/.cache.tmp/x",))


def _modes_match(ctx: Ctx, res: Res) -> str | None:
    run = ctx.cwd / "r"
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in run.iterdir() if p.is_file()}
    return None if len(set(modes.values())) == 1 else f"file modes differ: {modes}"


case("dl-file-modes", "ok", "train --out r: every file has the folder's usual permissions",
     cli(lambda c: T("--checkpoint-every", "1", "--out", c.p("cwd/r"))), check=_modes_match)
case("dl-fail-after-claim-steps", "refuse", "train --rule wm --rule-option steps=1.5 --out D (leaves nothing)",
     cli(lambda c: T("--rule", "wm", "--rule-option", "steps=1.5", "--out", c.p("cwd/D"))), clean="cwd/D")


def _cifar_label10(ctx: Ctx) -> None:
    write_cifar(ctx.root / "cifar", labels=[0, 1, 2, 3, 4, 5, 6, 10], bad_files=["data_batch_3"])


case("dl-fail-mid-run-label", "refuse", "train --data cifar10 (a label 10 in data_batch_3) --out D",
     cli(lambda c: ["train", *TINY_DATA, "--data", "cifar10", "--data-dir", c.p("cifar"), "--out", c.p("cwd/D")]),
     setup=_cifar_label10, clean="cwd/D")
case("dl-disk-full", "refuse", "ulimit -f 600; train --hidden 512,512 (checkpoint > 600 kB)",
     sub(lambda c: "ulimit -f 600; exec {py} -m falign train --epochs 1 --train-subset 64 --hidden 512,512 "
                   "--no-progress --out D"), clean="cwd/D")


def _user_docs(ctx: Ctx) -> None:
    import csv as _csv

    (ctx.cwd / "docs").mkdir()
    (ctx.cwd / "docs" / "benchmarks.md").write_text("# My own project's benchmarks\n")
    with open(ctx.root / "results.csv", "w", newline="") as f:
        w = _csv.DictWriter(f, ["rule", "seed", "epochs", "status", "final error %", "best-epoch error %",
                                "seconds", "run"])
        w.writeheader()
        for rule in ("bp", "fa"):
            w.writerow({"rule": rule, "seed": 0, "epochs": 5, "status": "completed", "final error %": 10.0,
                        "best-epoch error %": 9.0, "seconds": 1.0, "run": "x"})


case("dl-bench-docs-in-cwd", "ok", "bench accuracy --summarize F run from a folder with its own docs/benchmarks.md",
     cli(lambda c: ["bench", "accuracy", "--summarize", c.p("results.csv")]), setup=_user_docs,
     protect=("cwd/docs/benchmarks.md",))


# ---- 2. resume and checkpoints --------------------------------------------------------------
def RESUME(*extra: str) -> Callable[[Ctx], list[str]]:
    return lambda c: ["train", "--resume", c.p("cwd/run"), "--no-progress", *extra]


case("resume-rule-option", "refuse", "train --resume RUN --rule-option decay=0.2",
     cli(RESUME("--rule-option", "decay=0.2")), setup=lambda c: copy_run(c))
case("resume-rule-option-same", "safe", "train --resume RUN --epochs 2 --rule-option steps=1 (fa has no options)",
     cli(RESUME("--epochs", "2", "--rule-option", "steps=1")), setup=lambda c: copy_run(c))


def _edit_ckpt(edit: Callable) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        import torch

        run = copy_run(ctx)
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        torch.save(edit(state), run / "checkpoint.pt")

    return setup


def _no_key(key: str) -> Callable:
    def edit(state):
        state.pop(key, None)
        return state

    return edit


def _shape(state):
    import torch

    k = next(k for k, v in state["model"].items() if getattr(v, "ndim", 0) == 2)
    state["model"][k] = torch.zeros(3, 3)
    return state


case("ckpt-model-empty", "refuse", "resume a checkpoint saved as {'model': {}}",
     cli(RESUME("--epochs", "2")), setup=_edit_ckpt(lambda s: {"model": {}}))
case("ckpt-no-optimizer", "refuse", "resume a checkpoint without 'optimizer'",
     cli(RESUME("--epochs", "2")), setup=_edit_ckpt(_no_key("optimizer")))
case("ckpt-no-model", "refuse", "resume a checkpoint without 'model'",
     cli(RESUME("--epochs", "2")), setup=_edit_ckpt(_no_key("model")))
case("ckpt-not-dict", "refuse", "resume a checkpoint holding a list",
     cli(RESUME("--epochs", "2")), setup=_edit_ckpt(lambda s: [1, 2, 3]))
case("ckpt-wrong-shape", "refuse", "resume a checkpoint with a weight of the wrong shape",
     cli(RESUME("--epochs", "2")), setup=_edit_ckpt(_shape))
case("ckpt-step-string", "refuse", "resume a checkpoint whose step is a string",
     cli(RESUME("--epochs", "2")), setup=_edit_ckpt(lambda s: {**s, "step": "seven"}))


def _truncate_ckpt(ctx: Ctx) -> None:
    run = copy_run(ctx)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])


case("ckpt-truncated", "refuse", "resume a truncated checkpoint", cli(RESUME("--epochs", "2")), setup=_truncate_ckpt)


def _no_ckpt(ctx: Ctx) -> None:
    (copy_run(ctx) / "checkpoint.pt").unlink()


case("ckpt-missing", "refuse", "resume a run without checkpoint.pt", cli(RESUME("--epochs", "2")), setup=_no_ckpt)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_ckpt(ctx: Ctx) -> None:
    import torch

    run = copy_run(ctx)
    torch.save({"model": {}, "payload": _Payload(str(ctx.root / "outside" / "pwned"))}, run / "checkpoint.pt")


case("ckpt-code-carrying", "refuse", "resume a checkpoint crafted to run code", cli(RESUME("--epochs", "2")),
     setup=_evil_ckpt)


def _edit_config(edit: Callable[[dict], object]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        run = copy_run(ctx)
        cfg = json.loads((run / "config.json").read_text())
        new = edit(cfg)
        (run / "config.json").write_text(new if isinstance(new, str) else json.dumps(new))

    return setup


case("config-edited-lr", "refuse", "resume after editing config.json lr 0.01 -> 5",
     cli(RESUME("--epochs", "2")), setup=_edit_config(lambda c: {**c, "lr": 5.0}))
case("config-edited-rule", "refuse", "resume after editing config.json rule fa -> bp",
     cli(RESUME("--epochs", "2")), setup=_edit_config(lambda c: {**c, "rule": "bp"}))
case("config-garbage", "refuse", "resume with config.json not JSON",
     cli(RESUME("--epochs", "2")), setup=_edit_config(lambda c: "{not json"))
case("config-list", "refuse", "resume with config.json a JSON list",
     cli(RESUME("--epochs", "2")), setup=_edit_config(lambda c: "[1, 2]"))
case("config-unknown-key", "refuse", "resume with an unknown key in config.json",
     cli(RESUME("--epochs", "2")), setup=_edit_config(lambda c: {**c, "bogus": 1}))
case("config-bad-type", "refuse", "resume with config.json epochs = \"two\"",
     cli(RESUME()), setup=_edit_config(lambda c: {**c, "epochs": "two"}))


def _no_config(ctx: Ctx) -> None:
    (copy_run(ctx) / "config.json").unlink()


case("config-missing", "refuse", "resume a run without config.json", cli(RESUME("--epochs", "2")), setup=_no_config)
case("resume-nonexistent", "refuse", "train --resume /nonexistent",
     cli(["train", "--resume", "/nonexistent/run", "--no-progress"]))


def _a_file(rel: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        (ctx.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx.root / rel).write_text("a user file\n")

    return setup


case("resume-a-file", "refuse", "train --resume FILE", cli(lambda c: ["train", "--resume", c.p("cwd/f.txt")]),
     setup=_a_file("cwd/f.txt"), protect=("cwd/f.txt",))
case("resume-empty-dir", "refuse", "train --resume EMPTY_DIR",
     cli(lambda c: ["train", "--resume", c.p("cwd/e")]), setup=lambda c: (c.cwd / "e").mkdir())
case("resume-overwrite", "refuse", "train --resume RUN --overwrite", cli(RESUME("--overwrite")),
     setup=lambda c: copy_run(c))
case("resume-out-differs", "refuse", "train --resume RUN --out OTHER",
     cli(lambda c: ["train", "--resume", c.p("cwd/run"), "--out", c.p("cwd/other")]), setup=lambda c: copy_run(c))
case("resume-conflict-rule", "refuse", "train --resume RUN --rule dfa", cli(RESUME("--rule", "dfa")),
     setup=lambda c: copy_run(c))
case("resume-conflict-hidden", "refuse", "train --resume RUN --hidden 32", cli(RESUME("--hidden", "32")),
     setup=lambda c: copy_run(c))
case("resume-more-epochs", "ok", "train --resume RUN --epochs 2 (a legal continuation)", cli(RESUME("--epochs", "2")),
     setup=lambda c: copy_run(c),
     check=lambda c, r: None if json.loads((c.cwd / "run" / "summary.json").read_text()).get("epochs_completed") == 2
     else "summary does not say 2 epochs")

# ---- 3. data files ----------------------------------------------------------------------
MNIST = lambda *extra: (lambda c: ["train", *TINY_DATA, "--data", "mnist", "--data-dir", c.p("mnist"),  # noqa: E731
                                   *extra])


def _mnist(**kw) -> Callable[[Ctx], None]:
    return lambda c: write_mnist(c.root / "mnist", **kw)


case("idx-ok", "ok", "train --data mnist on tiny IDX files", cli(MNIST()), setup=_mnist())
case("idx-label-200", "refuse", "IDX training labels with one stray 200", cli(MNIST()),
     setup=_mnist(train_labels=[200] + [i % 10 for i in range(1, 40)]))
case("idx-test-label-255", "refuse", "IDX test labels with one 255", cli(MNIST()),
     setup=_mnist(test_labels=[255] + [i % 10 for i in range(1, 20)]))
case("idx-labels-all-zero", "refuse", "IDX labels all zero (a 1-class task)", cli(MNIST()),
     setup=_mnist(train_labels=[0] * 40, test_labels=[0] * 20))


def _idx_edit(which: str, **kw) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        import numpy as np

        write_mnist(ctx.root / "mnist")
        write_idx(ctx.root / "mnist" / IDX_FILES[which], kw.pop("array", np.zeros((40, 6, 6))), **kw)

    return setup


case("idx-dims-overflow", "refuse", "IDX header dims 65536^4 (the product overflows to 0)", cli(MNIST()),
     setup=_idx_edit("train_images", array=[], dims=[65536, 65536, 65536, 65536]))
case("idx-dims-huge", "refuse", "IDX header dims 4e9 x 4e9 x 4e9", cli(MNIST()),
     setup=_idx_edit("train_images", array=[], dims=[4_000_000_000] * 3))
case("idx-dtype-float", "refuse", "IDX images of type 0x0D (float)", cli(MNIST()),
     setup=_idx_edit("train_images", type_byte=0x0D))
case("idx-labels-2d", "refuse", "IDX labels of shape (40, 2)", cli(MNIST()),
     setup=_idx_edit("train_labels", array=__import__("numpy").zeros((40, 2))))
case("idx-images-1d", "refuse", "IDX images of shape (40,)", cli(MNIST()),
     setup=_idx_edit("train_images", array=__import__("numpy").zeros(40)))


def _mnist_empty(split: str) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        import numpy as np

        write_mnist(ctx.root / "mnist")
        prefix = "train" if split == "train" else "test"
        write_idx(ctx.root / "mnist" / IDX_FILES[f"{prefix}_images"], np.zeros((0, 6, 6)))
        write_idx(ctx.root / "mnist" / IDX_FILES[f"{prefix}_labels"], np.zeros(0))

    return setup


case("idx-empty-train", "refuse", "IDX training split with 0 examples", cli(MNIST()), setup=_mnist_empty("train"))
case("idx-empty-test", "refuse", "IDX test split with 0 examples", cli(MNIST()), setup=_mnist_empty("test"))


def _mnist_bytes(edit: Callable[[bytes], bytes]) -> Callable[[Ctx], None]:
    def setup(ctx: Ctx) -> None:
        write_mnist(ctx.root / "mnist")
        p = ctx.root / "mnist" / IDX_FILES["train_images"]
        p.write_bytes(edit(p.read_bytes()))

    return setup


case("idx-bad-magic", "refuse", "IDX file with a bad magic number", cli(MNIST()),
     setup=_mnist_bytes(lambda b: b"\x12\x34" + b[2:]))
case("idx-truncated", "refuse", "IDX file truncated", cli(MNIST()), setup=_mnist_bytes(lambda b: b[:-7]))
case("idx-empty-file", "refuse", "IDX file of 0 bytes", cli(MNIST()), setup=_mnist_bytes(lambda b: b""))


def _mnist_gz_bad(ctx: Ctx) -> None:
    write_mnist(ctx.root / "mnist")
    p = ctx.root / "mnist" / IDX_FILES["train_images"]
    gz = p.with_name(p.name + ".gz")
    gz.write_bytes(gzip.compress(p.read_bytes())[:-12])
    p.unlink()


case("idx-gz-truncated", "refuse", "gzipped IDX file truncated", cli(MNIST()), setup=_mnist_gz_bad)


def _mnist_count(ctx: Ctx) -> None:
    write_mnist(ctx.root / "mnist", train_labels=list(range(10)) * 3)


case("idx-count-mismatch", "refuse", "30 IDX labels for 40 images", cli(MNIST()), setup=_mnist_count)
case("idx-missing-file", "refuse", "MNIST folder without its test labels", cli(MNIST()),
     setup=lambda c: (write_mnist(c.root / "mnist"), (c.root / "mnist" / IDX_FILES["test_labels"]).unlink()))
case("idx-data-dir-file", "refuse", "--data mnist --data-dir FILE",
     cli(lambda c: T("--data", "mnist", "--data-dir", c.p("f.txt"))), setup=_a_file("f.txt"))
case("idx-lenet-6x6", "safe", "--model lenet on 6x6 IDX images", cli(MNIST("--model", "lenet")), setup=_mnist())

CIFAR = lambda *extra: (lambda c: ["train", *TINY_DATA, "--data", "cifar10", "--data-dir", c.p("cifar"),  # noqa: E731
                                   *extra])


def _cifar(**kw) -> Callable[[Ctx], None]:
    return lambda c: write_cifar(c.root / "cifar", **kw)


def _np(expr: str):
    import numpy as np

    return eval(expr, {"np": np})


case("cifar-ok", "ok", "train --data cifar10 on tiny batches", cli(CIFAR()), setup=_cifar())
case("cifar-label-10", "refuse", "CIFAR-10 label 10", cli(CIFAR()),
     setup=_cifar(labels=[10, 1, 2, 3, 4, 5, 6, 7], bad_files=["data_batch_1"]))
case("cifar-label-neg1", "refuse", "CIFAR-10 label -1", cli(CIFAR()),
     setup=_cifar(labels=[-1, 1, 2, 3, 4, 5, 6, 7], bad_files=["data_batch_1"]))
case("cifar-label-neg100", "refuse", "CIFAR-10 label -100 (cross-entropy's ignore_index)", cli(CIFAR()),
     setup=_cifar(labels=[-100, 1, 2, 3, 4, 5, 6, 7], bad_files=["data_batch_1"]))
case("cifar-test-label-99", "refuse", "CIFAR-10 test label 99", cli(CIFAR()),
     setup=_cifar(labels=[99, 1, 2, 3, 4, 5, 6, 7], bad_files=["test_batch"]))
case("cifar100-label-100", "refuse", "CIFAR-100 fine label 100",
     cli(lambda c: ["train", *TINY_DATA, "--data", "cifar100", "--data-dir", c.p("cifar")]),
     setup=lambda c: write_cifar(c.root / "cifar", "cifar100", labels=[100, 1, 2, 3, 4, 5, 6, 7], bad_files=["train"]))
case("cifar-float-pixels", "refuse", "CIFAR data as float64 in [0, 1]", cli(CIFAR()),
     setup=lambda c: write_cifar(c.root / "cifar", data=_np("np.full((8, 3072), 0.5)")))
case("cifar-pixels-300", "refuse", "CIFAR data as int64 with values 300", cli(CIFAR()),
     setup=lambda c: write_cifar(c.root / "cifar", data=_np("np.full((8, 3072), 300, dtype=np.int64)")))
case("cifar-float-labels", "refuse", "CIFAR labels 0.7, 1.5, ...", cli(CIFAR()),
     setup=_cifar(labels=[0.7, 1.5, 2.2, 3.9, 4.1, 5.5, 6.6, 7.7]))
case("cifar-data-string", "refuse", "CIFAR 'data' a string", cli(CIFAR()),
     setup=_cifar(data="not an array", bad_files=["data_batch_2"]))
case("cifar-data-dict", "refuse", "CIFAR 'data' a dict", cli(CIFAR()),
     setup=_cifar(data={"a": 1}, bad_files=["data_batch_2"]))
case("cifar-labels-none", "refuse", "CIFAR 'labels' None", cli(CIFAR()),
     setup=lambda c: _cifar_raw(c, {b"data": _np("np.zeros((8, 3072), dtype=np.uint8)"), b"labels": None}))
case("cifar-labels-strings", "refuse", "CIFAR 'labels' a list of strings", cli(CIFAR()),
     setup=_cifar(labels=["cat"] * 8, bad_files=["data_batch_2"]))
case("cifar-data-shape", "refuse", "CIFAR data of shape (8, 100)", cli(CIFAR()),
     setup=lambda c: write_cifar(c.root / "cifar", data=_np("np.zeros((8, 100), dtype=np.uint8)")))
case("cifar-empty-train", "refuse", "CIFAR training batches of 0 examples", cli(CIFAR()),
     setup=lambda c: write_cifar(c.root / "cifar", data=_np("np.zeros((0, 3072), dtype=np.uint8)"), labels=[],
                                 bad_files=["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                            "data_batch_5"]))


def _cifar_raw(ctx: Ctx, obj: object, stem: str = "data_batch_2") -> None:
    write_cifar(ctx.root / "cifar")
    with open(ctx.root / "cifar" / stem, "wb") as f:
        pickle.dump(obj, f, protocol=2)


case("cifar-not-dict", "refuse", "CIFAR batch pickled as a list", cli(CIFAR()), setup=lambda c: _cifar_raw(c, [1, 2]))
case("cifar-missing-key", "refuse", "CIFAR batch without 'labels'", cli(CIFAR()),
     setup=lambda c: _cifar_raw(c, {b"data": _np("np.zeros((8, 3072), dtype=np.uint8)")}))


class _CifarPayload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


case("cifar-code-carrying", "refuse", "CIFAR batch crafted to run code", cli(CIFAR()),
     setup=lambda c: _cifar_raw(c, {b"data": _CifarPayload(str(c.root / "outside" / "pwned")), b"labels": [0]}))
case("cifar-missing-dir", "refuse", "--data cifar10 --data-dir EMPTY",
     cli(lambda c: T("--data", "cifar10", "--data-dir", c.p("empty"))), setup=lambda c: (c.root / "empty").mkdir())
case("cifar-no-data-dir", "refuse", "--data cifar10 without --data-dir", cli(T("--data", "cifar10")))

REPRO_DATA = lambda c: ["reproduce", "--only", "min_norm", "--no-progress", "--data-dir", c.p("data"),  # noqa: E731
                        "--out", c.p("cwd/rep")]
BOMB = png_bytes(30000, 30000)
BROKEN = b"\x89PNG\r\n\x1a\n this is not a real image"
case("img-bomb-header", "refuse", "reproduce --data-dir (Tiny-ImageNet PNG whose header claims 30000x30000)",
     cli(REPRO_DATA), setup=lambda c: write_tiny_imagenet(c.root / "data", first=BOMB), guard=True, needs="PIL")
case("img-broken-later", "refuse", "reproduce --data-dir (Tiny-ImageNet: the 3rd image of a class is broken)",
     cli(REPRO_DATA), setup=lambda c: write_tiny_imagenet(c.root / "data", bad_later=BROKEN), guard=True, needs="PIL")
case("img-bomb-later", "refuse", "reproduce --data-dir (Tiny-ImageNet: a later image is a decompression bomb)",
     cli(REPRO_DATA), setup=lambda c: write_tiny_imagenet(c.root / "data", bad_later=BOMB), guard=True, needs="PIL")
case("img-broken-first", "refuse", "reproduce --data-dir (Tiny-ImageNet: the first image is broken)",
     cli(REPRO_DATA), setup=lambda c: write_tiny_imagenet(c.root / "data", first=BROKEN), guard=True, needs="PIL")
case("img-empty-file", "refuse", "reproduce --data-dir (Tiny-ImageNet: a 0-byte image)",
     cli(REPRO_DATA), setup=lambda c: write_tiny_imagenet(c.root / "data", bad_later=b""), guard=True, needs="PIL")
case("img-annotation-bad", "refuse", "reproduce --data-dir (Tiny-ImageNet: val_annotations.txt names no class)",
     cli(REPRO_DATA), setup=lambda c: write_tiny_imagenet(c.root / "data", annotations="val_0.png\tnXX\n"),
     guard=True, needs="PIL")
case("img-annotation-missing-file", "refuse", "reproduce --data-dir (Tiny-ImageNet annotation of a missing image)",
     cli(REPRO_DATA), setup=lambda c: write_tiny_imagenet(c.root / "data", annotations="gone.png\tn01\n"),
     guard=True, needs="PIL")


def _imgfolder(fn: str) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        from falign.data.images import image_folder

        folder = image_folder(ctx.root / "imgs")
        if fn == "check":
            folder.check()
            return "checked"
        return tuple(folder.subset([0, 1], 3, None, seed=0, size=4).x_train.shape)

    return run


case("api-imgfolder-bomb", "refuse", "image_folder(D).check() with a 30000x30000 PNG header",
     api(_imgfolder("check")), setup=lambda c: write_image_folder(c.root / "imgs", first=BOMB), needs="PIL")
case("api-imgfolder-broken-later", "refuse", "image_folder(D).check() with a broken 3rd image",
     api(_imgfolder("check")), setup=lambda c: write_image_folder(c.root / "imgs", bad_later=BROKEN), needs="PIL")
case("api-imgfolder-ok", "ok", "image_folder(D).subset(...) of good PNGs", api(_imgfolder("subset")),
     setup=lambda c: write_image_folder(c.root / "imgs"), needs="PIL",
     check=value_is(lambda v: v == (6, 3, 4, 4), "(6, 3, 4, 4)"))
case("api-imgfolder-no-classes", "refuse", "image_folder(D) with empty train/ and val/", api(_imgfolder("check")),
     setup=lambda c: ((c.root / "imgs" / "train").mkdir(parents=True), (c.root / "imgs" / "val").mkdir()))


def _repro_data(write: Callable[[Path], None]) -> Callable[[Ctx], None]:
    return lambda c: write(c.root / "data")


case("repro-data-mnist-label-200", "refuse", "reproduce --data-dir with MNIST labels holding a 200", cli(REPRO_DATA),
     setup=_repro_data(lambda d: write_mnist(d, train_labels=[200] + [i % 10 for i in range(1, 40)])), guard=True)
case("repro-data-mnist-bad-magic", "refuse", "reproduce --data-dir with a broken MNIST file", cli(REPRO_DATA),
     setup=_repro_data(lambda d: (write_mnist(d), (d / IDX_FILES["test_images"]).write_bytes(b"\x01\x02\x03\x04"))),
     guard=True)
case("repro-data-cifar100-label", "refuse", "reproduce --data-dir with CIFAR-100 label 150", cli(REPRO_DATA),
     setup=_repro_data(lambda d: write_cifar(d / "cifar-100-python", "cifar100", labels=[150] + [1] * 7,
                                             bad_files=["train"])), guard=True)
case("repro-data-fmnist-truncated", "refuse", "reproduce --data-dir with a truncated fashion-mnist/ file",
     cli(REPRO_DATA), setup=_repro_data(lambda d: (write_mnist(d / "fashion-mnist"), (
         d / "fashion-mnist" / IDX_FILES["train_images"]).write_bytes(b"\x00\x00\x08\x03\x00"))), guard=True)
case("repro-data-nonexistent", "refuse", "reproduce --data-dir /nonexistent",
     cli(["reproduce", "--only", "min_norm", "--no-progress", "--data-dir", "/nonexistent/data", "--out", "rep"]),
     guard=True)
case("repro-data-file", "refuse", "reproduce --data-dir FILE",
     cli(lambda c: ["reproduce", "--only", "min_norm", "--no-progress", "--data-dir", c.p("f.txt"), "--out", "rep"]),
     setup=_a_file("f.txt"), guard=True)

# ---- 4. train flags (and a sweep) -------------------------------------------------------------
for _opt in ("steps=1.5", "steps=true", "steps=0", "steps=-1", "decay=1", "decay=-0.1", "every=0", "lr=abc",
             "noise_std=NaN", "batch_size=0", "bogus=1", "steps=[1]"):
    case(f"train-wm-option-{_opt.replace('=', '-').replace('[1]', 'list').lower()}",
         "safe" if _opt == "steps=0" else "refuse",
         f"train --rule wm --rule-option {_opt}", cli(T("--rule", "wm", "--rule-option", _opt)))
case("train-fa-option-decay", "refuse", "train --rule fa --rule-option decay=0.1 (fa has no options)",
     cli(T("--rule", "fa", "--rule-option", "decay=0.1")))
case("train-drtp-option-string", "refuse", "train --rule drtp --rule-option batch_mean=maybe",
     cli(T("--rule", "drtp", "--rule-option", "batch_mean=maybe")))
case("train-option-no-equals", "refuse", "train --rule-option decay", cli(T("--rule", "wm", "--rule-option", "decay")))
case("train-option-empty-key", "refuse", "train --rule-option =1", cli(T("--rule", "wm", "--rule-option", "=1")))
case("train-wm-option-ok", "ok", "train --rule wm --rule-option decay=0.1 --rule-option steps=2",
     cli(T("--rule", "wm", "--rule-option", "decay=0.1", "--rule-option", "steps=2")))
case("train-lenet-synthetic", "refuse", "train --model lenet --data synthetic", cli(T("--model", "lenet", "--data",
                                                                                     "synthetic")))
case("train-lenet-digits", "safe", "train --model lenet --data digits (8x8 images)",
     cli(T("--model", "lenet", "--data", "digits")))
case("train-resnet20-synthetic", "refuse", "train --model resnet20 --data synthetic",
     cli(T("--model", "resnet20", "--data", "synthetic")))
for _v in ("inf", "nan", "-1", "0"):
    case(f"train-feedback-scale-{_v.strip('-') if _v != '-1' else 'neg1'}", "refuse", f"train --feedback-scale {_v}",
         cli(T("--feedback-scale", _v)))
case("train-seed-huge", "refuse", "train --seed 1180591620717411303424", cli(T("--seed", "1180591620717411303424")))
case("train-seed-negative", "refuse", "train --seed -1", cli(T("--seed", "-1")))
case("train-seed-2e64", "refuse", "train --seed 18446744073709551616", cli(T("--seed", str(2**64))))
case("train-hidden-1e8", "refuse", "train --hidden 100000000 (under ulimit -v 4 GB)",
     sub(lambda c: "ulimit -v 4000000; exec {py} -m falign train --epochs 1 --train-subset 64 --no-progress "
                   "--hidden 100000000 --out D", timeout=240), clean="cwd/D")
case("train-hidden-0", "refuse", "train --hidden 0", cli(T("--hidden", "0")))
case("train-hidden-neg", "refuse", "train --hidden 16,-4", cli(T("--hidden", "16,-4")))
case("train-hidden-words", "refuse", "train --hidden a,b", cli(T("--hidden", "a,b")))
case("train-hidden-empty", "refuse", "train --hidden ''", cli(T("--hidden", "")))
case("train-digits-nonexistent-dir", "refuse", "train --data digits --data-dir /nonexistent",
     cli(T("--data", "digits", "--data-dir", "/nonexistent")))
case("train-synthetic-data-dir", "refuse", "train --data synthetic --data-dir DIR (ignored)",
     cli(lambda c: T("--data", "synthetic", "--data-dir", c.p("outside"))))
for _flag, _vals in {
    "--epochs": ("0", "-1", "1.5", "abc"), "--batch-size": ("0", "-8", "nan"), "--lr": ("nan", "inf", "-1", "0", "abc"),
    "--momentum": ("-0.5", "1", "nan"), "--weight-decay": ("-1", "nan", "inf"), "--init-scale": ("nan", "inf", "0"),
    "--label-noise": ("1", "-0.1", "nan"), "--train-subset": ("0", "-5"), "--n-classes": ("1", "0", "11"),
    "--synthetic-classes": ("1",), "--lr-milestones": ("0.5,2", "-0.1", "nan", "abc"),
    "--diagnostics-every": ("-1",), "--checkpoint-every": ("-1",), "--eval-batch-size": ("0", "-1"),
    "--pipeline-stages": ("-1", "2"), "--microbatches": ("-1",),
    "--rule": ("xyz", ""), "--model": ("vgg",), "--data": ("imagenet",), "--activation": ("gelu",),
    "--optimizer": ("rmsprop",), "--loss": ("hinge",), "--feedback-init": ("orthogonal",),
    "--output-signal": ("none",), "--on-divergence": ("ignore",), "--device": ("tpu", "cuda"),
    "--pipeline-schedule": ("interleaved",),
}.items():
    for _v in _vals:
        _extra = ["--data", "synthetic"] if _flag in ("--synthetic-classes",) else []
        if _flag == "--lr-milestones":
            _extra = ["--lr-schedule", "step"]
        _slug = _v.replace("-", "neg").replace(",", "_").replace(".", "p") or "empty"
        case(f"train{_flag[1:]}-{_slug}", "refuse", f"train {_flag} {_v!r}", cli(T(*_extra, _flag, _v)))
case("train-lr-milestones-unused", "refuse", "train --lr-milestones 0.3 without --lr-schedule step",
     cli(T("--lr-milestones", "0.3")))
case("train-microbatches-no-pipeline", "refuse", "train --microbatches 4 without --pipeline-stages",
     cli(T("--microbatches", "4")))
case("train-subset-too-big", "safe", "train --train-subset 1000000000 (more than digits has)",
     cli(T("--train-subset", "1000000000")))
case("train-out-file", "refuse", "train --out FILE", cli(lambda c: T("--out", c.p("cwd/f.txt"))),
     setup=_a_file("cwd/f.txt"), protect=("cwd/f.txt",))
case("train-out-under-file", "refuse", "train --out FILE/sub", cli(lambda c: T("--out", c.p("cwd/f.txt/sub"))),
     setup=_a_file("cwd/f.txt"), protect=("cwd/f.txt",))
case("train-out-proc", "refuse", "train --out /proc/falign-run (cannot be created)",
     cli(T("--out", "/proc/falign-adversarial-run")))
case("train-out-empty", "refuse", "train --out ''", cli(T("--out", "")))


def _cwd_notes(ctx: Ctx) -> None:
    (ctx.cwd / "notes.txt").write_text("keep\n")


case("train-out-dot-userfiles", "refuse", "train --out . --overwrite in a folder of user files",
     cli(T("--out", ".", "--overwrite")), setup=_cwd_notes, protect=("cwd/notes.txt",))
case("train-data-fmnist-missing", "refuse", "train --data fashion-mnist (not installed, no --data-dir)",
     cli(T("--data", "fashion-mnist")))
case("train-mnist-no-dir", "refuse", "train --data mnist without --data-dir", cli(T("--data", "mnist")))
case("train-mnist-empty-dir", "refuse", "train --data mnist --data-dir ''", cli(T("--data", "mnist", "--data-dir", "")))
case("train-existing-run", "refuse", "train --out RUN (already holds a run, no --overwrite)",
     cli(lambda c: T("--out", c.p("cwd/run"))), setup=lambda c: copy_run(c))
case("train-overwrite-run", "ok", "train --out RUN --overwrite (replaces the run)",
     cli(lambda c: T("--out", c.p("cwd/run"), "--overwrite", "--epochs", "1")), setup=lambda c: copy_run(c),
     check=exists("cwd/run/summary.json"))
case("train-overwrite-run-userfile", "refuse", "train --out RUN --overwrite with a user file in RUN",
     cli(lambda c: T("--out", c.p("cwd/run"), "--overwrite")),
     setup=lambda c: (copy_run(c), (c.cwd / "run" / "mine.txt").write_text("mine")), protect=("cwd/run/mine.txt",))
for _rule, _extra in (("usf", ("--no-bias",)), ("kp", ("--optimizer", "adam")), ("dfa", ("--activation", "tanh")),
                      ("brsf", ("--lr-schedule", "cosine")), ("drtp", ("--loss", "mse")),
                      ("dkp", ("--output-signal", "backprop")), ("bp", ("--batch-size", "100000")),
                      ("frsf", ("--diagnostics-every", "1", "--checkpoint-every", "1"))):
    case(f"train-ok-{_rule}", "ok", f"train --rule {_rule} {' '.join(_extra)}", cli(T("--rule", _rule, *_extra)))
case("train-ok-skip-batch", "ok", "train --lr 1e6 --on-divergence skip-batch (odd but legal)",
     cli(T("--lr", "1e6", "--momentum", "0", "--on-divergence", "skip-batch")))
case("train-diverge-clear", "refuse", "train --lr 1e30 (diverges: stops with the step and the rule)",
     cli(T("--lr", "1e30", "--train-subset", "256")))

# ---- 5. data-parallel --------------------------------------------------------------------------
_DP = "--epochs 1 --data digits --train-subset {n} --batch-size 32 --hidden 16 --momentum 0 --no-progress"


def _torchrun(n: int, procs: int, out: str) -> str:
    return (f"{{py}} -m torch.distributed.run --standalone --nproc_per_node={procs} -m falign train "
            f"{_DP.format(n=n)} --out {out}")


def _same_weights(ctx: Ctx, res: Res) -> str | None:
    import torch

    a = torch.load(ctx.cwd / "one" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(ctx.cwd / "dp" / "checkpoint.pt", weights_only=True)["model"]
    worst = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    return None if worst < 1e-5 else f"weights of 2 ranks differ from one process by {worst:.2e}"


case("dp-last-batch-weighting", "ok", "torchrun 2 ranks vs 1 process, 67 examples (last batch of 3): same weights",
     sub(lambda c: f"{{py}} -m falign train {_DP.format(n=67)} --out one && " + _torchrun(67, 2, "dp"), timeout=400),
     check=_same_weights)
case("dp-empty-shard", "ok", "torchrun 2 ranks, 65 examples (last batch of 1: one rank gets none)",
     sub(lambda c: _torchrun(65, 2, "dp"), timeout=300), check=exists("cwd/dp/summary.json"))

# ---- 6. reproduce, plot, bench (argument validation only) --------------------------------------------------------
REP = lambda *a: ["reproduce", "--no-progress", "--out", "rep", *a]  # noqa: E731
for _id, _args in (("only-unknown", ["--only", "nosuch"]), ("only-empty", ["--only", ""]),
                   ("only-commas", ["--only", ",,"]), ("only-partly-unknown", ["--only", "min_norm,nosuch"]),
                   ("seeds-0", ["--only", "min_norm", "--seeds", "0"]),
                   ("seeds-neg", ["--only", "min_norm", "--seeds", "-2"]), ("seeds-abc", ["--seeds", "abc"]),
                   ("device-tpu", ["--device", "tpu"]), ("device-cuda", ["--only", "multiclass", "--device", "cuda"]),
                   ("full-seeds-0", ["--full", "--seeds", "0", "--only", "min_norm"])):
    case(f"reproduce-{_id}", "refuse", f"reproduce {' '.join(_args)}", cli(REP(*_args)), guard=True, clean="cwd/rep")
case("reproduce-out-file", "refuse", "reproduce --out FILE",
     cli(lambda c: ["reproduce", "--only", "min_norm", "--no-progress", "--out", c.p("cwd/f.txt")]),
     setup=_a_file("cwd/f.txt"), protect=("cwd/f.txt",), guard=True)
case("reproduce-out-foreign", "refuse", "reproduce --out D (D holds draft.md)",
     cli(lambda c: ["reproduce", "--only", "min_norm", "--no-progress", "--out", c.p("cwd/D")]),
     setup=_a_file("cwd/D/draft.md"), protect=("cwd/D/draft.md",), guard=True, loss_if_accepted=True)
case("reproduce-out-run", "refuse", "reproduce --out RUN (a training run's folder)",
     cli(lambda c: ["reproduce", "--only", "min_norm", "--no-progress", "--out", c.p("cwd/run")]),
     setup=lambda c: copy_run(c), protect=("cwd/run/config.json", "cwd/run/checkpoint.pt"), guard=True,
     loss_if_accepted=True)
case("reproduce-ok-starts", "ok", "reproduce --only min_norm --out NEW (starts its work)",
     cli(REP("--only", "min_norm")), guard=True)

PLOT = lambda *a: (lambda c: ["plot", *[x.replace("RUN", c.p("cwd/run")) for x in a]])  # noqa: E731


def _plots_written(ctx: Ctx, res: Res) -> str | None:
    pngs = sorted(p.name for p in (ctx.cwd / "run" / "plots").glob("*.png"))
    return None if len(pngs) == 3 else f"plots: {pngs}"


case("plot-ok", "ok", "plot RUN (trained with --diagnostics-every)", cli(PLOT("RUN")),
     setup=lambda c: copy_run(c, "diag"), check=_plots_written)
case("plot-nonexistent", "refuse", "plot /nonexistent", cli(["plot", "/nonexistent/run"]))
case("plot-a-file", "refuse", "plot FILE", cli(lambda c: ["plot", c.p("cwd/f.txt")]), setup=_a_file("cwd/f.txt"),
     protect=("cwd/f.txt",))
case("plot-empty-dir", "refuse", "plot EMPTY_DIR", cli(lambda c: ["plot", c.p("cwd/e")]),
     setup=lambda c: (c.cwd / "e").mkdir(), clean="cwd/e/plots")
case("plot-no-diagnostics", "refuse", "plot RUN (trained without diagnostics)", cli(PLOT("RUN")),
     setup=lambda c: copy_run(c), clean="cwd/run/plots")
case("plot-metrics-garbage", "refuse", "plot RUN whose metrics.jsonl is not JSON", cli(PLOT("RUN")),
     setup=lambda c: (copy_run(c, "diag"), (c.cwd / "run" / "metrics.jsonl").write_text("garbage\n{\n")))
case("plot-metrics-wrong-keys", "refuse", "plot RUN whose metrics.jsonl rows lack the diagnostic fields",
     cli(PLOT("RUN")), setup=lambda c: (copy_run(c, "diag"), (c.cwd / "run" / "metrics.jsonl").write_text(
         '{"event": "diagnostics", "step": 1}\n{"event": "diagnostics", "step": "x", "layers": 5}\n')))
case("plot-metrics-truncated", "safe", "plot RUN whose metrics.jsonl ends mid-line (a crash while writing)",
     cli(PLOT("RUN")), setup=lambda c: (copy_run(c, "diag"), (c.cwd / "run" / "metrics.jsonl").write_text(
         (c.cwd / "run" / "metrics.jsonl").read_text()[:-20])))
case("plot-out-file", "refuse", "plot RUN --out FILE",
     cli(lambda c: ["plot", c.p("cwd/run"), "--out", c.p("cwd/f.txt")]),
     setup=lambda c: (copy_run(c, "diag"), _a_file("cwd/f.txt")(c)), protect=("cwd/f.txt",))
case("plot-out-foreign", "refuse", "plot RUN --out D (D holds draft.md)",
     cli(lambda c: ["plot", c.p("cwd/run"), "--out", c.p("cwd/D")]),
     setup=lambda c: (copy_run(c, "diag"), _a_file("cwd/D/draft.md")(c)), protect=("cwd/D/draft.md",))
case("plot-out-the-run", "refuse", "plot RUN --out RUN (the run folder itself)",
     cli(lambda c: ["plot", c.p("cwd/run"), "--out", c.p("cwd/run")]), setup=lambda c: copy_run(c, "diag"),
     protect=("cwd/run/config.json", "cwd/run/checkpoint.pt", "cwd/run/metrics.jsonl"))

SPEED = lambda *a: ["bench", "speed", "--repeats", "1", "--warmup", "0", *a]  # noqa: E731
for _id, _args in (("models-unknown", ["--models", "vgg"]), ("models-empty", ["--models", ""]),
                   ("rules-unknown", ["--rules", "xyz"]), ("rules-empty", ["--rules", ","]),
                   ("repeats-0", ["--repeats", "0"]), ("repeats-neg", ["--repeats", "-3"]),
                   ("repeats-abc", ["--repeats", "abc"]), ("warmup-neg", ["--warmup", "-1"]),
                   ("threads-0", ["--threads", "0"]), ("threads-neg", ["--threads", "-2"]),
                   ("device-tpu", ["--device", "tpu"]), ("device-cuda", ["--device", "cuda"]),
                   ("device-cuda-99", ["--device", "cuda:99"]), ("json-missing-dir", ["--json", "nowhere/x.json"]),
                   ("json-empty", ["--json", ""])):
    case(f"bench-speed-{_id}", "refuse", f"bench speed {' '.join(_args)}", cli(SPEED(*_args)), guard=True)
case("bench-speed-json-dir", "refuse", "bench speed --json DIR", cli(lambda c: SPEED("--json", c.p("cwd"))),
     guard=True)
case("bench-speed-json-userfile", "refuse", "bench speed --json FILE (a user file)",
     cli(lambda c: SPEED("--json", c.p("cwd/f.txt"))), setup=_a_file("cwd/f.txt"), guard=True,
     protect=("cwd/f.txt",), loss_if_accepted=True)
case("bench-speed-ok-starts", "ok", "bench speed --models mlp --rules fa (starts its work)",
     cli(SPEED("--models", "mlp", "--rules", "fa")), guard=True)


def _fmnist(ctx: Ctx) -> None:
    write_mnist(ctx.root / "fmnist", n_train=20, n_test=10, side=28)


ACC = lambda *a: (lambda c: ["bench", "accuracy", "--no-progress", "--docs", "", "--rules", "fa", "--seeds", "1",  # noqa: E731
                             "--data-dir", c.p("fmnist"), "--out", c.p("cwd/acc"), *a])
for _id, _args in (("epochs-0", ["--epochs", "0"]), ("epochs-neg", ["--epochs", "-1"]), ("lr-neg", ["--lr", "-1"]),
                   ("lr-nan", ["--lr", "nan"]), ("lr-inf", ["--lr", "inf"]), ("lr-0", ["--lr", "0"]),
                   ("seeds-0", ["--seeds", "0"]), ("rules-unknown", ["--rules", "xyz"]),
                   ("rules-empty", ["--rules", ""]), ("device-tpu", ["--device", "tpu"]),
                   ("device-cuda", ["--device", "cuda"]), ("docs-missing-dir", ["--docs", "nowhere/b.md"]),
                   ("summarize-missing", ["--summarize", "/nonexistent/results.csv"])):
    case(f"bench-acc-{_id}", "refuse", f"bench accuracy {' '.join(_args)}", cli(ACC(*_args)), setup=_fmnist,
         guard=True, clean="cwd/acc")
case("bench-acc-data-dir-missing", "refuse", "bench accuracy --data-dir /nonexistent",
     cli(lambda c: ["bench", "accuracy", "--no-progress", "--docs", "", "--data-dir", "/nonexistent", "--out", "acc"]),
     guard=True, clean="cwd/acc")
case("bench-acc-out-file", "refuse", "bench accuracy --out FILE",
     cli(lambda c: [*ACC()(c)[:-2], "--out", c.p("cwd/f.txt")]),
     setup=lambda c: (_fmnist(c), _a_file("cwd/f.txt")(c)), guard=True, protect=("cwd/f.txt",))
case("bench-acc-summarize-empty", "refuse", "bench accuracy --summarize EMPTY_FILE",
     cli(lambda c: ["bench", "accuracy", "--docs", "", "--summarize", c.p("e.csv")]), setup=_a_file("e.csv"))
case("bench-acc-summarize-garbage", "refuse", "bench accuracy --summarize FILE (not a results.csv)",
     cli(lambda c: ["bench", "accuracy", "--docs", "", "--summarize", c.p("e.csv")]),
     setup=lambda c: (c.root / "e.csv").write_text("rule,seed\nfa,zero\n"))
case("bench-acc-ok-starts", "ok", "bench accuracy --rules fa --seeds 1 --epochs 1 (starts its work)",
     cli(ACC("--epochs", "1")), setup=_fmnist, guard=True)

ARCH = lambda *a: ["bench", "architectures", "--no-progress", "--docs", "", *a]  # noqa: E731
for _id, _args in (("models-unknown", ["--models", "gpt"]), ("rules-unknown", ["--rules", "xyz"]),
                   ("seeds-0", ["--seeds", "0"]), ("repeats-0", ["--repeats", "0"]),
                   ("timing-runs-0", ["--timing-runs", "0"]), ("steps-scale-0", ["--steps-scale", "0"]),
                   ("steps-scale-neg", ["--steps-scale", "-1"]), ("steps-scale-nan", ["--steps-scale", "nan"]),
                   ("steps-scale-inf", ["--steps-scale", "inf"]), ("device-cuda", ["--device", "cuda"]),
                   ("docs-missing-dir", ["--docs", "nowhere/b.md"]), ("models-empty", ["--models", ""])):
    case(f"bench-arch-{_id}", "refuse", f"bench architectures {' '.join(_args)}", cli(ARCH(*_args)), guard=True)

PIPE = lambda *a: ["bench", "pipeline", "--docs", "", "--out", "pipe", *a]  # noqa: E731
for _id, _args in (("models-unknown", ["--models", "vgg"]), ("models-empty", ["--models", ""]),
                   ("microbatches-0", ["--microbatches", "0"]), ("steps-0", ["--steps", "0"]),
                   ("repeats-0", ["--repeats", "0"]), ("warmup-neg", ["--warmup", "-1"]),
                   ("docs-missing-dir", ["--docs", "nowhere/b.md"])):
    case(f"bench-pipe-{_id}", "refuse", f"bench pipeline {' '.join(_args)}", cli(PIPE(*_args)), guard=True,
         clean="cwd/pipe")
case("bench-pipe-out-file", "refuse", "bench pipeline --out FILE",
     cli(lambda c: ["bench", "pipeline", "--docs", "", "--out", c.p("cwd/f.txt")]), setup=_a_file("cwd/f.txt"),
     guard=True, protect=("cwd/f.txt",))
case("bench-pipe-out-foreign", "refuse", "bench pipeline --out D (D holds draft.md)",
     cli(lambda c: ["bench", "pipeline", "--docs", "", "--out", c.p("cwd/D")]), setup=_a_file("cwd/D/draft.md"),
     guard=True, protect=("cwd/D/draft.md",), loss_if_accepted=True)
case("bench-no-kind", "refuse", "falign bench (no KIND)", cli(["bench"]))
case("cli-no-command", "refuse", "falign (no command)", cli([]))
case("cli-unknown-command", "refuse", "falign fly", cli(["fly"]))


# ---- 7. API (and misuse) -------------------------------------------------------------
def mlp(width: int = 16):
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))


def batch():
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


def _data_loop(rule: str, how: str) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        import torch
        import torch.nn.functional as F

        import falign

        model = falign.convert(mlp(), rule, seed=0)
        x, y = batch()
        before = model[0].feedback_weight.detach().clone()
        for _ in range(3):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if how == "data":
                for p in model.parameters():
                    p.data -= 0.1 * p.grad
            else:
                with torch.no_grad():
                    for p in model.parameters():
                        p -= 0.1 * p.grad
        return f"no error; B changed: {not torch.equal(before, model[0].feedback_weight)}"

    return run


case("api-wm-data-update", "refuse", "wm, weights updated through .data with no attach (next forward must raise)",
     api(_data_loop("wm", "data")))
case("api-brsf-data-update", "refuse", "brsf, weights updated through .data with no attach",
     api(_data_loop("brsf", "data")))
case("api-wm-nograd-update", "refuse", "wm, weights updated in place under no_grad with no attach",
     api(_data_loop("wm", "nograd")))


def _attached(rule: str, wrapper: bool = False) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        import torch
        import torch.nn.functional as F

        import falign

        model = falign.convert(mlp(), rule, seed=0)
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        opt = inner
        if wrapper:
            class Wrapped(torch.optim.Optimizer):  # like accelerate's AcceleratedOptimizer: no super().__init__
                def __init__(self, optimizer):
                    self.optimizer = optimizer

                @property
                def param_groups(self):
                    return self.optimizer.param_groups

                @property
                def state(self):
                    return self.optimizer.state

                @property
                def defaults(self):
                    return self.optimizer.defaults

                def zero_grad(self, set_to_none: bool = True):
                    self.optimizer.zero_grad(set_to_none)

                def step(self, closure=None):
                    return self.optimizer.step(closure)

            opt = Wrapped(inner)
        falign.attach(model, opt)
        x, y = batch()
        before = model[0].feedback_weight.detach().clone()
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return not torch.equal(before, model[0].feedback_weight)

    return run


case("api-attach-wrapper-optimizer", "safe", "falign.attach on a wrapper optimizer without step hooks (brsf redraws)",
     api(_attached("brsf", wrapper=True)), check=value_is(lambda v: v is True, "B redrawn"))
case("api-attach-wm-ok", "ok", "wm with falign.attach and SGD: B moves", api(_attached("wm")),
     check=value_is(lambda v: v is True, "B changed"))
case("api-attach-not-optimizer", "refuse", "falign.attach(model, 'sgd')",
     api(lambda c: __import__("falign").attach(__import__("falign").convert(mlp(), "wm"), "sgd")))


def _root_module(kind: str):
    import torch
    from torch import nn

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = nn.Linear(8, 16)
            if kind == "matrix":
                self.W = nn.Parameter(torch.randn(4, 16) * 0.1)
            else:
                self.l2 = nn.Linear(16, 4)
                self.pos_embed = nn.Parameter(torch.zeros(16))

        def forward(self, x):
            h = torch.relu(self.l1(x))
            return h @ self.W.t() if kind == "matrix" else self.l2(h + self.pos_embed)

    return Root()


def _convert_root(kind: str, unsupported: str = "error") -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        import falign

        model = falign.convert(_root_module(kind), "fa", unsupported=unsupported)
        model(batch()[0])
        return falign.conversion_report(model)

    return run


case("api-root-parameter", "refuse", "convert a root computing relu(l1(x)) @ self.W.t()", api(_convert_root("matrix")))
case("api-root-pos-embed", "refuse", "convert a root with its own pos_embed parameter", api(_convert_root("embed")))
case("api-root-parameter-report", "ok", "convert(root, unsupported='backprop'): the report lists the root's W",
     api(_convert_root("matrix", "backprop")),
     check=value_is(lambda r: bool(r.unsupported) and "W" in str(r), "the root's W reported as unsupported"))


def _trace(rule: str) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        import torch

        import falign

        model = falign.convert(mlp(), rule, seed=0)
        x = batch()[0]
        traced = torch.jit.trace(model, x)
        return bool(torch.allclose(traced(x), model(x)))

    return run


case("api-jit-trace-fa", "ok", "torch.jit.trace(falign.convert(net, 'fa'), x) with no forward before",
     api(_trace("fa")), check=value_is(lambda v: v is True, "traced output equal to the model's"))
case("api-jit-trace-dfa", "ok", "torch.jit.trace(falign.convert(net, 'dfa'), x) with no forward before",
     api(_trace("dfa")), check=value_is(lambda v: v is True, "traced output equal to the model's"))


def _hooks(rule: str, example: bool) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        import falign

        net, calls = mlp(), []
        net[0].register_forward_hook(lambda m, i, o: calls.append(1))
        x = batch()[0]
        model = falign.convert(net, rule, seed=0, **({"example_input": x} if example else {}))
        start = len(calls)
        model(x)
        return len(calls) - start

    return run


case("api-hooks-once-fa", "ok", "a user forward hook fires once for one forward after convert (fa)",
     api(_hooks("fa", False)), check=value_is(lambda v: v == 1, "1 call"))
case("api-hooks-once-dfa", "ok", "a user forward hook fires once for one forward after convert (dfa)",
     api(_hooks("dfa", False)), check=value_is(lambda v: v == 1, "1 call"))
case("api-hooks-once-example-input", "ok", "hook fires once per forward after convert(example_input=x)",
     api(_hooks("dfa", True)), check=value_is(lambda v: v == 1, "1 call"))


def _ddp_dkp(ctx: Ctx) -> object:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    import falign

    dist.init_process_group("gloo", init_method=f"file://{ctx.cwd / 'pg'}", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(falign.convert(mlp(), "dkp", seed=0))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = batch()
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return "trained"
    finally:
        dist.destroy_process_group()


case("api-ddp-dkp-before-forward", "safe", "user DDP code: dkp wrapped in DDP before its first forward",
     api(_ddp_dkp), accept=(RuntimeError,), accept_msg=r"first forward|example_input")


def _func(kind: str) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        import torch
        import torch.nn.functional as F
        from torch.func import functional_call, grad, vmap

        import falign

        x, y = batch()
        model = falign.convert(mlp(), "fa", seed=0, example_input=x)
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v for k, v in model.named_buffers()}

        def loss(p, xb, yb):
            return F.cross_entropy(functional_call(model, (p, buffers), (xb,)), yb)

        if kind == "grad":
            g = grad(loss)(params, x, y)
        else:
            g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.unsqueeze(1), y.unsqueeze(1))
        return all(bool(torch.isfinite(v).all()) for v in g.values())

    return run


case("api-func-grad-fa", "ok", "torch.func.grad of a converted fa model", api(_func("grad")),
     check=value_is(lambda v: v is True, "finite gradients"))
case("api-func-vmap-fa", "ok", "vmap(grad) per-example gradients of a converted fa model", api(_func("vmap")),
     check=value_is(lambda v: v is True, "finite gradients"))


def _conv(*args, **kw) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        import falign

        model = falign.convert(*[a() if callable(a) else a for a in args], **kw)
        model(batch()[0])
        return "converted"

    return run


case("api-convert-unknown-rule", "refuse", "falign.convert(net, 'nosuch')", api(_conv(mlp, "nosuch")))
case("api-convert-rule-none", "refuse", "falign.convert(net, None)", api(_conv(mlp, None)))
case("api-convert-not-module", "refuse", "falign.convert('a string', 'fa')", api(_conv("a string", "fa")))
case("api-convert-none", "refuse", "falign.convert(None, 'fa')", api(_conv(None, "fa")))
case("api-convert-scale-nan", "refuse", "convert(feedback_scale=nan)", api(_conv(mlp, "fa", feedback_scale=math.nan)))
case("api-convert-scale-inf", "refuse", "convert(feedback_scale=inf)", api(_conv(mlp, "fa", feedback_scale=math.inf)))
case("api-convert-scale-neg", "refuse", "convert(feedback_scale=-1)", api(_conv(mlp, "fa", feedback_scale=-1.0)))
case("api-convert-scale-str", "refuse", "convert(feedback_scale='big')", api(_conv(mlp, "fa", feedback_scale="big")))
case("api-convert-init-bogus", "refuse", "convert(feedback_init='bogus')", api(_conv(mlp, "fa", feedback_init="bogus")))
case("api-convert-seed-huge", "refuse", "convert(seed=2**70)", api(_conv(mlp, "fa", seed=2**70)))
case("api-convert-seed-float", "refuse", "convert(seed=0.5)", api(_conv(mlp, "fa", seed=0.5)))
case("api-convert-output-signal", "refuse", "convert(output_signal='bogus')",
     api(_conv(mlp, "fa", output_signal="bogus")))
case("api-convert-output-layer", "refuse", "convert(output_layer='nosuch')",
     api(_conv(mlp, "fa", output_layer="nosuch")))
case("api-convert-unsupported", "refuse", "convert(unsupported='ignore')", api(_conv(mlp, "fa", unsupported="ignore")))
case("api-convert-wm-decay", "refuse", "convert(net, 'wm', decay=1.5)", api(_conv(mlp, "wm", decay=1.5)))
case("api-convert-wm-steps-float", "refuse", "convert(net, 'wm', steps=1.5)", api(_conv(mlp, "wm", steps=1.5)))
case("api-convert-wm-steps-bool", "refuse", "convert(net, 'wm', steps=True)", api(_conv(mlp, "wm", steps=True)))
case("api-convert-wm-unknown-option", "refuse", "convert(net, 'wm', bogus=1)", api(_conv(mlp, "wm", bogus=1)))
case("api-convert-fa-option", "refuse", "convert(net, 'fa', decay=0.1)", api(_conv(mlp, "fa", decay=0.1)))
case("api-convert-lstmcell", "refuse", "convert(nn.LSTMCell(8, 8), 'fa')",
     api(lambda c: __import__("falign").convert(__import__("torch").nn.LSTMCell(8, 8), "fa")))
case("api-convert-example-wrong-shape", "refuse", "convert(net, 'fa', example_input=randn(2, 5))",
     api(lambda c: __import__("falign").convert(mlp(), "fa", example_input=__import__("torch").randn(2, 5))),
     accept=(RuntimeError,), accept_msg="shape|size")
case("api-convert-empty-sequential", "safe", "convert(nn.Sequential(), 'fa')",
     api(lambda c: __import__("falign").convert(__import__("torch").nn.Sequential(), "fa")))
case("api-convert-twice", "safe", "convert(convert(net, 'fa'), 'dfa')",
     api(lambda c: __import__("falign").convert(__import__("falign").convert(mlp(), "fa"), "dfa")(batch()[0]).shape))
case("api-unconvert-plain", "safe", "falign.unconvert(a plain model)",
     api(lambda c: __import__("falign").unconvert(mlp())))
case("api-unconvert-roundtrip", "ok", "unconvert(convert(net)) gives the same weights",
     api(lambda c: bool(__import__("torch").equal(__import__("falign").unconvert(
         __import__("falign").convert(mlp(), "kp"))[0].weight, mlp()[0].weight))),
     check=value_is(lambda v: v is True, "equal weights"))
case("api-get-rule-unknown", "refuse", "falign.get_rule('nosuch')",
     api(lambda c: __import__("falign").get_rule("nosuch")))


def _falinear(*args, forward=None, **kw) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        import torch

        from falign.nn import FALinear

        layer = FALinear(*args, **kw)
        if forward is not None:
            x = torch.randn(*forward, requires_grad=True)
            layer(x).sum().backward()
        return "built"

    return run


case("api-falinear-negative", "refuse", "FALinear(-1, 4)", api(_falinear(-1, 4)), accept=(RuntimeError,),
     accept_msg="negative")
case("api-falinear-float-size", "refuse", "FALinear(4.5, 3)", api(_falinear(4.5, 3)), accept=(TypeError,))
case("api-falinear-bad-rule", "refuse", "FALinear(4, 3, rule='nosuch')", api(_falinear(4, 3, rule="nosuch")))
case("api-falinear-scale-nan", "refuse", "FALinear(4, 3, feedback_scale=nan)",
     api(_falinear(4, 3, feedback_scale=math.nan)))
case("api-falinear-init-bogus", "refuse", "FALinear(4, 3, feedback_init='bogus')",
     api(_falinear(4, 3, feedback_init="bogus")))
case("api-falinear-wrong-input", "refuse", "FALinear(4, 3) on inputs of width 5",
     api(_falinear(4, 3, forward=(2, 5))), accept=(RuntimeError,), accept_msg="shape|size")
case("api-falinear-dfa-standalone", "safe", "FALinear(4, 3, rule='dfa') used alone, no output_features",
     api(_falinear(4, 3, rule="dfa", forward=(2, 4))))
case("api-falinear-ok", "ok", "FALinear(4, 3, rule='kp') forward and backward", api(_falinear(4, 3, rule="kp",
                                                                                              forward=(2, 4))))
case("api-falinear-empty-batch", "ok", "FALinear(4, 3) on an empty batch", api(_falinear(4, 3, forward=(0, 4))))


def _angle(a: str, b: str) -> Callable[[Ctx], object]:
    def run(ctx: Ctx) -> object:
        import torch

        from falign.diagnostics import angle

        g = torch.Generator().manual_seed(0)
        env = {"torch": torch, "x": torch.randn(3, 4, generator=g), "inf": math.inf}
        return angle(eval(a, env), eval(b, env))

    return run


_nan = value_is(lambda v: isinstance(v, float) and math.isnan(v), "nan")
case("api-angle-zero-zero", "ok", "diagnostics.angle(zeros, zeros) is NaN",
     api(_angle("torch.zeros(5)", "torch.zeros(5)")),
     check=_nan)
case("api-angle-zero-x", "ok", "diagnostics.angle(zeros, x) is NaN", api(_angle("torch.zeros(3, 4)", "x")), check=_nan)
case("api-angle-inf", "ok", "diagnostics.angle(x with inf, x) is NaN",
     api(_angle("torch.full((3,), inf)", "torch.ones(3)")),
     check=_nan)
case("api-angle-nan", "ok", "diagnostics.angle(nan tensor, x) is NaN",
     api(_angle("torch.full((3,), float('nan'))", "torch.ones(3)")), check=_nan)
case("api-angle-same", "ok", "diagnostics.angle(x, 3x) is 0", api(_angle("x", "3 * x")),
     check=value_is(lambda v: abs(v) < 1e-6, "0"))
case("api-angle-opposite", "ok", "diagnostics.angle(x, -x) is 180", api(_angle("x", "-x")),
     check=value_is(lambda v: abs(v - 180) < 1e-6, "180"))
case("api-angle-tiny", "ok", "diagnostics.angle(1e-30 x, x) is 0 (no underflow)", api(_angle("1e-30 * x", "x")),
     check=value_is(lambda v: abs(v) < 1e-4, "0"))
case("api-angle-ints", "ok", "diagnostics.angle of integer tensors",
     api(_angle("torch.tensor([1, 0])", "torch.tensor([0, 1])")),
     check=value_is(lambda v: abs(v - 90) < 1e-6, "90"))
case("api-angle-shapes", "refuse", "diagnostics.angle(3 elements, 4 elements)",
     api(_angle("torch.ones(3)", "torch.ones(4)")))
case("api-load-checkpoint-missing", "refuse", "falign.app.train.load_checkpoint('/nonexistent.pt')",
     api(lambda c: __import__("falign.app.train", fromlist=["load_checkpoint"]).load_checkpoint("/nonexistent.pt")))
case("api-set-target-fa", "safe", "falign.set_target on an fa model (which does not use targets)",
     api(lambda c: __import__("falign").set_target(__import__("falign").convert(mlp(), "fa"), batch()[1])))
case("api-step-rules-plain", "safe", "falign.step_rules on a plain model",
     api(lambda c: __import__("falign").step_rules(mlp())))
case("api-trainconfig-lr-nan", "refuse", "TrainConfig(lr=nan).validate()",
     api(lambda c: __import__("falign.app.train", fromlist=["TrainConfig"]).TrainConfig(lr=math.nan).validate()))


# ==== main ====================================================================================================
def main(argv: list[str] | None = None) -> int:
    global _BASE_DIR, _FALIGN_DIR
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the rows to this CSV file")
    parser.add_argument("--only", default=None, help="run the cases whose id matches this regular expression")
    parser.add_argument("--keep", action="store_true", help="keep each case's temporary folder")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    ids = [c.id for c in CASES]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise SystemExit(f"duplicate case ids: {sorted(dupes)}")
    cases = [c for c in CASES if args.only is None or re.search(args.only, c.id)]
    if args.list:
        for c in cases:
            print(f"{c.id:<40} {c.expect:<7} {c.what}")
        return 0
    import falign

    _FALIGN_DIR = os.path.dirname(os.path.abspath(falign.__file__))
    have_pil = importlib.util.find_spec("PIL") is not None
    real_stdout = sys.stdout
    print(f"falign {getattr(falign, '__version__', '?')} from {_FALIGN_DIR}; {len(cases)} cases"
          + ("" if have_pil else " (no Pillow: image cases skipped)"), file=real_stdout, flush=True)
    _BASE_DIR = Path(tempfile.mkdtemp(prefix="falign-adversarial-"))
    # the cases describe a machine without Fashion-MNIST: an empty default folder hides an installed copy
    (_BASE_DIR / "no-fashion-mnist").mkdir()
    os.environ["FALIGN_FASHION_MNIST_DIR"] = str(_BASE_DIR / "no-fashion-mnist")
    guards, rows, start = Guards(), [], time.perf_counter()
    try:
        for i, c in enumerate(cases, 1):
            if c.needs == "PIL" and not have_pil:
                row = {"id": c.id, "expect": c.expect, "outcome": "skipped", "seconds": 0, "rc": None, "what": c.what,
                       "detail": "needs Pillow"}
            else:
                row = run_case(c, _BASE_DIR, args.keep, guards)
            rows.append(row)
            print(f"[{i:>3}/{len(cases)}] {c.id:<40} {c.expect:<6} {row['outcome']:<12} {row['seconds']:>6.1f}s  "
                  f"{row['detail'][:90]}", file=real_stdout, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(_BASE_DIR, ignore_errors=True)
    wall = time.perf_counter() - start
    print(file=real_stdout)
    print(f"{'id':<40} {'expect':<7} {'outcome':<12} detail", file=real_stdout)
    for r in rows:
        print(f"{r['id']:<40} {r['expect']:<7} {r['outcome']:<12} {r['detail'][:120]}", file=real_stdout)
    totals = {o: sum(r["outcome"] == o for r in rows) for o in (*OUTCOMES, "skipped", "harness error")}
    print(file=real_stdout)
    print(f"tried {len(rows)}: " + ", ".join(f"{o} {n}" for o, n in totals.items() if n or o in OUTCOMES)
          + f"  (wall {wall:.0f} s)", file=real_stdout)
    bad = [r["id"] for r in rows if r["outcome"] not in ("clear error", "ok", "skipped")]
    print(f"not 'clear error'/'ok' ({len(bad)}): {' '.join(bad)}", file=real_stdout)
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, ["id", "expect", "outcome", "seconds", "rc", "what", "detail"])
            w.writeheader()
            w.writerows(rows)
        print(f"rows: {args.out}", file=real_stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
