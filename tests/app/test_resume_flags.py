"""--resume refuses conflicting flags and keeps the schedule."""

from __future__ import annotations

import json

from tests.helpers import cli


# ---- --resume refuses conflicting flags --------------------------------------------------------------
def test_resume_refuses_conflicting_flags_and_records_allowed_changes(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["--hidden", "8", "--no-progress"]
    assert cli(["train", "--epochs", "1", "--out", str(run), *base], capsys)[0] == 0
    code, text = cli(["train", "--resume", str(run), "--epochs", "5", "--rule", "dfa", "--lr", "0.5"], capsys)
    assert code == 1 and "--lr 0.5" in text and "--rule 'dfa'" in text and "conflict" in text
    code, text = cli(["train", "--resume", str(run), "--epochs", "2", "--lr", "0.01", *base], capsys)
    assert code == 0, text  # a flag equal to the saved value is no conflict
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["resumes"][0]["changes"] == {"epochs": [1, 2]}


def test_resume_cannot_shorten_or_reshape_the_schedule(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--epochs", "2", "--hidden", "8", "--lr-schedule", "step", "--out", str(run),
                "--no-progress"], capsys)[0] == 0
    code, text = cli(["train", "--resume", str(run), "--epochs", "4"], capsys)
    assert code == 1 and "learning-rate schedule" in text
