"""``falign bench accuracy --summarize``: the table from earlier runs' results, without training."""

from __future__ import annotations

import csv

import pytest

from falign.app.bench import accuracy
from falign.app.cli import main
from falign.errors import FalignError

FIELDS = ["rule", "seed", "epochs", "status", "final error %", "best-epoch error %", "seconds", "run"]


def write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(dict(zip(FIELDS, r)))


def test_summarize_combines_files_and_one_seed_has_no_spread(tmp_path, capsys):
    a, b, docs = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "bench.md"
    write(a, [("dfa", 0, 100, "completed", 17.0, 15.0, 60, "x")])
    write(b, [("fa", 0, 100, "completed", 14.0, 13.5, 60, "y"), ("fa", 1, 100, "completed", 15.0, 14.5, 60, "z")])
    docs.write_text("# Benchmarks\n")
    assert main(["bench", "accuracy", "--summarize", str(a), str(b), "--docs", str(docs)]) == 0
    text = docs.read_text()
    # files written before the lr was recorded: lr 0.01, given (the bench's only lr then); no validation split
    # no "± 0.00" for one seed
    assert "| dfa | 0.01 (given) | 28x28 padded to 32 | 1 | 15.00 | — | 17.00 | 12.81 | +2.19 |  |" in text
    assert "| fa | 0.01 (given) | 28x28 padded to 32 | 2 | 14.00 ± 0.71 | — | 14.50 ± 0.71 | 13.06 | +0.94 |  |" in text
    assert "published 100-epoch schedule" in text and "--summarize" in text
    assert "| fa |" in capsys.readouterr().out


def test_summarize_refuses_mixed_schedules_and_foreign_files(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write(a, [("dfa", 0, 100, "completed", 17.0, 15.0, 60, "x")])
    write(b, [("fa", 0, 5, "completed", 14.0, 13.5, 60, "y")])
    with pytest.raises(FalignError, match="different lengths"):
        accuracy.read_results([str(a), str(b)])
    b.write_text("name,value\nx,1\n")
    with pytest.raises(FalignError, match=r"not a results\.csv"):
        accuracy.read_results([str(b)])
    with pytest.raises(FalignError, match="no such file"):
        accuracy.read_results([str(tmp_path / "missing.csv")])


def test_summarize_reads_the_finished_runs_of_an_interrupted_bench(tmp_path):
    import json

    folder = tmp_path / "bench"
    for rule, status, accs in (("fa", "completed", [0.80, 0.86, 0.85]), ("kp", None, [0.70])):
        run = folder / "runs" / f"{rule}-s0"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"rule": rule, "seed": 0, "epochs": 100}))
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"event": "epoch", "epoch": i + 1, "test_acc": a}) + "\n" for i, a in enumerate(accs)))
        if status:  # the kp run was interrupted: no summary.json, so it is not counted
            (run / "summary.json").write_text(json.dumps({"status": status, "wall_time_s": 12.0}))
    rows = accuracy.read_results([str(folder)])
    assert [r["rule"] for r in rows] == ["fa"]
    assert rows[0]["best-epoch error %"] == pytest.approx(14.0) and rows[0]["final error %"] == pytest.approx(15.0)
    with pytest.raises(FalignError, match="no finished run"):
        accuracy.read_results([str(tmp_path)])
