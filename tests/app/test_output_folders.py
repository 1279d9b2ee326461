"""Output folders: --overwrite deletes only what a falign run wrote, a failed start leaves nothing, and output
paths are checked before the work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import falign
from falign.app.train import RunError, TrainConfig, Trainer
from tests.helpers import cli, quick_run


# ---- --overwrite deletes only what a falign run wrote ---------------------------------------------------
def test_overwrite_refuses_a_folder_with_user_files(tmp_path, capsys):
    folder = tmp_path / "thesis"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("my thesis")
    (folder / "sub" / "data.csv").write_text("1,2")
    code, text = cli(["train", "--out", str(folder), "--overwrite", "--epochs", "1", "--no-progress"], capsys)
    assert code == 1 and "holds files falign did not write (sub/data.csv, thesis.tex)" in text
    assert (folder / "thesis.tex").read_text() == "my thesis" and (folder / "sub" / "data.csv").exists()


def test_overwrite_of_the_working_directory_keeps_it_and_its_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("keep me")
    code, text = cli(["train", "--out", ".", "--overwrite", "--epochs", "1", "--no-progress"], capsys)
    assert code == 1 and "notes.txt" in text
    assert Path("notes.txt").read_text() == "keep me"


def test_overwrite_replaces_a_run_and_only_its_files(tmp_path):
    run = tmp_path / "run"
    quick_run(run)
    (run / "plots").mkdir()
    (run / "plots" / "alignment.png").write_bytes(b"png")
    before = sorted(p.name for p in run.iterdir())
    assert "checkpoint.pt" in before and ".falign" in before
    with pytest.raises(RunError, match="already holds a run"):
        quick_run(run)
    Trainer(TrainConfig(hidden=(8,), epochs=2), run, progress=False, overwrite=True).run()
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert not (run / "plots").exists()  # a run's own plots went with it
    (run / "mine.txt").write_text("x")  # a user file inside a run directory blocks --overwrite
    with pytest.raises(falign.app.outdir.OutputError, match=r"mine\.txt"):
        Trainer(TrainConfig(hidden=(8,), epochs=1), run, progress=False, overwrite=True).run()
    assert (run / "mine.txt").exists() and (run / "checkpoint.pt").exists()


def test_a_run_written_before_markers_is_resumed_but_never_overwritten(tmp_path):
    run = tmp_path / "old"
    quick_run(run)
    (run / ".falign").unlink()
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(falign.app.outdir.OutputError, match=r"no \.falign marker"):  # its files are not known falign's
        Trainer(TrainConfig(hidden=(8,), epochs=1), run, progress=False, overwrite=True).run()
    assert (run / "checkpoint.pt").read_bytes() == before
    Trainer(TrainConfig(), run, progress=False, resume=True, changes={"epochs": 2}).run()  # named by --resume
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 2


def test_every_writing_command_refuses_foreign_folders(tmp_path, capsys):
    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "draft.md").write_text("draft")
    run = tmp_path / "run"
    Trainer(TrainConfig(hidden=(8,), epochs=1, diagnostics_every=5), run, progress=False).run()
    for args in (["reproduce", "--out", str(foreign), "--only", "min_norm", "--size", "tiny", "--no-progress"],
                 ["plot", str(run), "--out", str(foreign)],
                 ["bench", "accuracy", "--out", str(foreign), "--docs", ""]):
        code, text = cli(args, capsys)
        assert code == 1 and "draft.md" in text, (args, text)
    assert (foreign / "draft.md").read_text() == "draft" and sorted(os.listdir(foreign)) == ["draft.md"]


# ---- failed starts leave nothing; outputs are checked before the work --------------------------------
def test_a_run_that_fails_to_start_leaves_nothing_and_the_retry_works(tmp_path, capsys):
    out = tmp_path / "run"
    code, text = cli(["train", "--data", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out),
                      "--no-progress"], capsys)
    assert code == 1 and not out.exists()
    code, text = cli(["train", "--epochs", "1", "--hidden", "8", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, text


def test_bench_speed_checks_its_json_path_before_running(tmp_path, capsys, monkeypatch):
    from falign.app.bench import speed

    def never(*args, **kwargs):
        raise AssertionError("the benchmark ran before its output path was checked")

    monkeypatch.setattr(speed, "bench_model", never)
    code, text = cli(["bench", "speed", "--json", str(tmp_path / "missing" / "x.json")], capsys)
    assert code == 1 and "does not exist" in text
