"""Output folders that cannot destroy user files.

1. A folder is falign's only if its ``.falign`` marker says so: user files with falign's names are never replaced.
2. Links inside an output folder are never followed: a victim file outside keeps its bytes.
3. A failure after the claim leaves nothing (before any step) or a ``failed`` summary; a full disk is a clear
   error and the last good checkpoint survives; ``--resume`` deletes only falign's own temporary files; atomically
   written files keep the usual permissions; ``bench`` writes a docs file only when given ``--docs``.

Every destructive case runs inside pytest's temporary directories, against user files and links pointing out.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from falign.app import outdir
from falign.app.outdir import OutputDir
from falign.app.train import TrainConfig, Trainer
from falign.errors import FalignError
from tests.helpers import cli, quick_run

PRECIOUS = b"the user's own bytes\n"
TRAIN = ["train", "--epochs", "1", "--hidden", "8", "--no-progress"]


def victim(tmp_path: Path, name: str = "victim") -> Path:
    """A user file outside every output folder."""
    path = tmp_path / name
    path.write_bytes(PRECIOUS)
    return path


# ---- 1. a folder is falign's only if its marker says so -------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_train_never_replaces_user_files_with_falign_names(tmp_path, capsys, overwrite):
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl"):
        (proj / name).write_bytes(PRECIOUS)
    code, text = cli([*TRAIN, "--out", str(proj), *(["--overwrite"] if overwrite else [])], capsys)
    assert code == 1 and "holds files falign did not write (checkpoint.pt, config.json, metrics.jsonl)" in text
    assert "no .falign marker" in text and "Traceback" not in text
    assert sorted(os.listdir(proj)) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert all((proj / name).read_bytes() == PRECIOUS for name in os.listdir(proj))


def test_reproduce_never_replaces_a_users_report(tmp_path, capsys):
    out = tmp_path / "paper"
    (out / "tables").mkdir(parents=True)
    (out / "report.md").write_bytes(PRECIOUS)
    (out / "tables" / "headline.csv").write_bytes(PRECIOUS)
    code, text = cli(["reproduce", "--out", str(out), "--only", "min_norm", "--size", "tiny", "--no-progress"],
                     capsys)
    assert code == 1 and "report.md" in text and "tables/headline.csv" in text
    assert (out / "report.md").read_bytes() == PRECIOUS and (out / "tables" / "headline.csv").read_bytes() == PRECIOUS
    assert sorted(os.listdir(out)) == ["report.md", "tables"]


def test_plot_never_replaces_a_users_png(tmp_path, capsys):
    run = tmp_path / "run"
    quick_run(run, diagnostics_every=5)
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "alignment.png").write_bytes(PRECIOUS)
    code, text = cli(["plot", str(run), "--out", str(figures)], capsys)
    assert code == 1 and "alignment.png" in text
    assert (figures / "alignment.png").read_bytes() == PRECIOUS and os.listdir(figures) == ["alignment.png"]


def test_a_marker_is_a_plain_file_of_the_folder(tmp_path):
    elsewhere = tmp_path / "marker.json"
    elsewhere.write_text('{"kind": "run"}')
    out = tmp_path / "out"
    out.mkdir()
    (out / ".falign").symlink_to(elsewhere)
    folder = OutputDir(out, "run")
    assert not folder.marked() and folder.owned() == [] and folder.foreign() == [".falign"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert OutputDir(empty, "run").claim() == empty and OutputDir(empty, "run").marked()


# ---- 2. links inside an output folder are never followed ------------------------------------------------
@pytest.mark.parametrize("name", [".lock", ".falign", "config.json", "metrics.jsonl"])
def test_a_new_run_never_writes_through_a_link(tmp_path, capsys, name):
    target = victim(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(Path("..") / "victim")
    code, text = cli([*TRAIN, "--out", str(out)], capsys)
    assert code == 1 and name in text and "Traceback" not in text
    assert target.read_bytes() == PRECIOUS and os.listdir(out) == [name]


@pytest.mark.parametrize("name", [".lock", "resumes.jsonl", "metrics.jsonl", "summary.json"])
def test_resume_never_writes_through_a_link(tmp_path, capsys, name):
    target = victim(tmp_path)
    run = tmp_path / "run"
    quick_run(run)
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(target)
    code, text = cli(["train", "--resume", str(run), "--epochs", "2", "--no-progress"], capsys)
    assert code == 1 and "symbolic link" in text and name in text and "Traceback" not in text
    assert target.read_bytes() == PRECIOUS


def test_resume_never_writes_into_a_linked_subfolder(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    quick_run(run)
    for event in (run / "tensorboard").glob("*"):
        event.unlink()
    (run / "tensorboard").rmdir()
    (run / "tensorboard").symlink_to(elsewhere, target_is_directory=True)
    code, text = cli(["train", "--resume", str(run), "--epochs", "2", "--no-progress"], capsys)
    assert code == 1 and "tensorboard" in text and os.listdir(elsewhere) == []


def test_plot_never_writes_into_a_linked_plots_folder(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    quick_run(run, diagnostics_every=5)
    (run / "plots").symlink_to(elsewhere, target_is_directory=True)
    code, text = cli(["plot", str(run)], capsys)
    assert code == 1 and "symbolic link" in text and os.listdir(elsewhere) == []


def test_a_linked_report_subfolder_is_refused(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "report"
    out.mkdir()
    (out / ".falign").write_text('{"kind": "report"}')
    (out / "tables").symlink_to(elsewhere, target_is_directory=True)
    code, text = cli(["reproduce", "--out", str(out), "--only", "min_norm", "--size", "tiny", "--no-progress"],
                     capsys)
    assert code == 1 and "tables" in text and os.listdir(elsewhere) == []


def test_appends_and_atomic_writes_never_follow_a_link(tmp_path):
    target = victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "rows.jsonl").symlink_to(target)
    with pytest.raises(outdir.WriteError, match=r"rows\.jsonl is a symbolic link"):
        outdir.append_text(out / "rows.jsonl", "{}\n")
    (out / "file.json").symlink_to(target)
    outdir.atomic_write(out / "file.json", lambda f: f.write("{}"), "w")  # replaces the link itself
    assert not (out / "file.json").is_symlink() and (out / "file.json").read_text() == "{}"
    assert target.read_bytes() == PRECIOUS


# ---- 3. failures, full disks, temporary files, permissions, docs --------------------------------------
def failing_step(at: int):
    """A ``Trainer.train_step`` that fails at step ``at`` (a bad batch, a bug in a rule's per-step work...)."""
    real = Trainer.train_step

    def step(self, x, y, *args):
        if self.state.step == at:
            raise RuntimeError("boom at a bad batch")
        return real(self, x, y, *args)

    return step


def test_a_run_failing_before_its_first_step_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "train_step", failing_step(0))
    out = tmp_path / "new" / "run"
    with pytest.raises(RuntimeError, match="boom"):
        quick_run(out)
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"  # a folder the user made: it stays, empty
    empty.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        quick_run(empty)
    assert os.listdir(empty) == []


def test_a_run_failing_mid_run_says_why_in_its_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "train_step", failing_step(3))
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        quick_run(run, checkpoint_every=2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["message"] == "RuntimeError: boom at a bad batch"
    assert summary["steps"] == 3 and (run / "checkpoint.pt").is_file()


def test_a_failed_write_is_a_clear_error_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(PRECIOUS)

    def disk_full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(FalignError, match=r"cannot write .*checkpoint.pt: No space left on device \(the disk is "
                                          r"full or a file-size limit is reached\); the previous checkpoint.pt"):
        outdir.atomic_write(path, disk_full)
    assert path.read_bytes() == PRECIOUS and os.listdir(tmp_path) == ["checkpoint.pt"]


def test_a_full_disk_ends_in_one_clear_line_and_the_last_checkpoint_survives(tmp_path):
    run = tmp_path / "run"
    Trainer(TrainConfig(hidden=(512,), epochs=1), run, progress=False).run()
    before = (run / "checkpoint.pt").read_bytes()
    limit = len(before) // 2  # every small file still fits; the next checkpoint does not

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    done = subprocess.run([sys.executable, "-m", "falign", "train", "--resume", str(run), "--epochs", "2",
                           "--no-progress"], capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"falign train: error: cannot write {run / 'checkpoint.pt'}: File too large (the disk is full or a "
        f"file-size limit is reached); the previous checkpoint.pt is kept"]
    assert (run / "checkpoint.pt").read_bytes() == before and not list(run.glob(".*.tmp"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "File too large" in summary["message"]


def test_resume_deletes_only_falign_temporary_files(tmp_path, capsys):
    run = tmp_path / "run"
    quick_run(run)
    (run / ".notes.tmp").write_bytes(PRECIOUS)  # the user's, despite the pattern
    (run / ".cache.tmp").mkdir()
    (run / ".checkpoint.pt.0123abcd.tmp").write_bytes(b"torn")  # an interrupted atomic write of falign's
    code, text = cli(["train", "--resume", str(run), "--epochs", "2", "--no-progress"], capsys)
    assert code == 0, text
    assert (run / ".notes.tmp").read_bytes() == PRECIOUS and (run / ".cache.tmp").is_dir()
    assert not (run / ".checkpoint.pt.0123abcd.tmp").exists()


def test_atomically_written_files_keep_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        quick_run(run)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir() if p.is_file()}
        assert set(modes.values()) == {0o644}, modes  # config.json beside metrics.jsonl
        (run / "summary.json").chmod(0o640)  # an existing file keeps its own mode, as a plain open would
        outdir.atomic_write(run / "summary.json", lambda f: f.write("{}"), "w")
        assert stat.S_IMODE((run / "summary.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)


@pytest.fixture
def repo_like_folder(tmp_path, monkeypatch) -> Path:
    """A current folder with its own docs/benchmarks.md (not falign's repository)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.write_bytes(PRECIOUS)
    return docs


def test_bench_accuracy_writes_docs_only_when_asked(repo_like_folder, capsys):
    results = Path("results.csv")
    results.write_text("rule,seed,epochs,status,final error %,best-epoch error %,seconds,run\n"
                       "fa,0,5,completed,14.0,13.5,60,x\n")
    code, text = cli(["bench", "accuracy", "--summarize", str(results)], capsys)
    assert code == 0 and "| fa |" in text and repo_like_folder.read_bytes() == PRECIOUS
    asked = Path("mine.md")
    code, text = cli(["bench", "accuracy", "--summarize", str(results), "--docs", str(asked)], capsys)
    assert code == 0 and "| fa |" in asked.read_text() and repo_like_folder.read_bytes() == PRECIOUS


def test_bench_architectures_writes_docs_only_when_asked(repo_like_folder, capsys, monkeypatch):
    from falign.app.bench import architectures

    monkeypatch.setattr(architectures, "run_benchmark", lambda *args: [])
    monkeypatch.setattr(architectures, "markdown", lambda *args: "section")
    code, text = cli(["bench", "architectures", "--models", "vit", "--rules", "bp", "--seeds", "1"], capsys)
    assert code == 0 and repo_like_folder.read_bytes() == PRECIOUS and "updated" not in text


def test_bench_pipeline_writes_docs_only_when_asked(repo_like_folder, capsys, monkeypatch):
    from falign.app.bench import pipeline

    def workers(cmd, **kwargs):
        Path(cmd[cmd.index("--results") + 1]).write_text("[]")
        return subprocess.CompletedProcess(cmd, 0, stderr="")

    monkeypatch.setattr(pipeline, "subprocess", types.SimpleNamespace(run=workers, PIPE=subprocess.PIPE))
    monkeypatch.setattr(pipeline, "summarize", lambda results: [])
    monkeypatch.setattr(pipeline, "projection", lambda rows: [])
    monkeypatch.setattr(pipeline, "figure", lambda proj, path: False)
    code, text = cli(["bench", "pipeline", "--out", "bench-out"], capsys)
    assert code == 0, text
    assert repo_like_folder.read_bytes() == PRECIOUS and not Path("docs/figures").exists()


def test_an_older_versions_temporary_file_is_falign_s(tmp_path):
    """Temporary files of a crash under an older falign (mkstemp's [a-z0-9_] names) do not block --overwrite."""
    from falign.app.outdir import OutputDir

    run = tmp_path / "run"
    quick_run(run)
    (run / ".checkpoint.pt.k_3zq9xy.tmp").write_bytes(b"partial")
    assert OutputDir(run, "run").foreign() == []
    Trainer(TrainConfig(hidden=(8,), epochs=1), run, progress=False, overwrite=True).run()
    assert not (run / ".checkpoint.pt.k_3zq9xy.tmp").exists()
