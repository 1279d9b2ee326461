"""Every command-line error path ends in a clear message (an empty experiment selection, bad flags, a torn
metrics file, a bad resume)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import falign
from falign.app.train import TrainConfig, Trainer
from tests.helpers import cli


# ---- the output layer is the one that produces the output ------------------------------------------
def test_output_layer_found_from_the_forward_pass():
    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 3)
            self.body = nn.Linear(4, 8)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    class AutoEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = nn.Conv2d(4, 1, 3, padding=1)
            self.encoder = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            return self.decoder(torch.relu(self.encoder(x)))

    for net, x, expected in ((HeadFirst(), torch.randn(2, 4), "head"), (AutoEncoder(), torch.randn(2, 1, 5, 5),
                                                                         "decoder")):
        model = falign.convert(net, "fa", output_signal="backprop")
        model(x)
        report = falign.conversion_report(model)
        assert report.output_layer == expected
        assert getattr(model, expected).rule.name == "bp"
        other = [r for r in report.layers if r.name != expected]
        assert all("output" not in r.note for r in other)


# ---- every CLI path ends in a clear message --------------------------------------------------------
def test_every_cli_error_path_is_a_clear_message(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(TrainConfig(hidden=(8,), epochs=1, diagnostics_every=5), run, progress=False).run()
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")

    def broken(content: str) -> Path:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        Trainer(TrainConfig(hidden=(8,), epochs=1), bad, progress=False).run()
        (bad / "config.json").write_text(content)
        return bad

    cases = [
        (["train", "--resume", str(broken("{bad"))], "is not valid JSON"),
        (["train", "--resume", str(broken("[1, 2]"))], "must hold a JSON object"),
        (["train", "--resume", str(broken('{"epochs": "three"}'))], "epochs must be an integer, got 'three'"),
        (["train", "--out", str(a_file)], "is a file, not a folder"),
        (["train", "--resume", str(a_file)], "is a file, not a run directory"),
        (["train", "--out", "/dev/null"], "is a file, not a folder"),
        (["plot", str(run), "--out", str(a_file)], "is a file, not a folder"),
        (["plot", str(a_file)], "is not a folder"),
        (["reproduce", "--out", str(a_file)], "is a file, not a folder"),
        (["bench", "speed", "--models", "nonsense"], "unknown nonsense"),
        (["bench", "speed", "--rules", "nonsense"], "unknown nonsense"),
        (["bench", "speed", "--repeats", "0"], "--repeats must be >= 1"),
        (["bench", "speed", "--device", "tpu"], "unknown --device 'tpu'"),
        (["bench", "speed", "--device", "meta"], "falign benchmarks run on cpu or cuda"),
        (["bench", "speed", "--device", "nonsense"], "unknown --device 'nonsense'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["bench", "speed", "--device", "cuda"], "torch.cuda.is_available() is False"))
        cases.append((["train", "--device", "cuda", "--out", str(tmp_path / "c")], "torch.cuda.is_available()"))
    for args, message in cases:
        code, text = cli(args, capsys)
        assert code == 1 and message in text and "Traceback" not in text, (args, text)


def test_plot_skips_a_torn_last_line_and_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(TrainConfig(hidden=(8,), epochs=1, diagnostics_every=5), run, progress=False).run()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"event": "diagnostics", "st')  # a kill in the middle of a write
    code, text = cli(["plot", str(run)], capsys)
    assert code == 0 and "skipped" in text and "not a JSON object" in text
    assert (run / "plots" / "alignment.png").exists()


def test_cli_subprocess_has_no_traceback_for_a_bad_resume(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".falign").write_text('{"kind": "run"}')
    (bad / "config.json").write_text("{bad")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "falign", "train", "--resume", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "not valid JSON" in done.stderr
    assert time.perf_counter() - start < 120
