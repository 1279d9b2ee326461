"""falign bench architectures: its models convert and train, its table and docs section are written, bad input
is refused (the numbers themselves come from the command, in docs/benchmarks.md)."""

from __future__ import annotations

import math

import pytest
import torch

from falign.bench import architectures as arch
from falign.cli import main
from falign.models.sequence import CharLM, PatchViT, RowRNN


def test_models_shapes():
    x = torch.randn(3, 784)
    assert PatchViT(28, 7, 10)(x).shape == (3, 10)
    assert RowRNN(28, 10, torch.nn.GRU)(x).shape == (3, 10)
    assert CharLM(20)(torch.randint(0, 20, (2, 9))).shape == (2, 9, 20)
    with pytest.raises(ValueError, match="multiple"):
        PatchViT(28, 5, 10)


def test_stdlib_text_is_there_and_ascii():
    text = arch.stdlib_text(5000)
    assert len(text) == 5000 and text.isascii() and "def " in text


def test_a_tiny_run_writes_rows_and_a_docs_section(tmp_path):
    rows = arch.run_benchmark(["row-gru", "char-lm"], ["bp", "fa"], seeds=2, repeats=2, device=torch.device("cpu"),
                              steps_scale=0.01, progress=False, timing_runs=2)
    assert [(r["model"], r["rule"]) for r in rows] == [("row-gru", "bp"), ("row-gru", "fa"), ("char-lm", "bp"),
                                                         ("char-lm", "fa")]
    for r in rows:
        assert len(r["accuracies"]) == 2 and all(0 <= a <= 1 for a in r["accuracies"] if not math.isnan(a))
        assert r["ratio"] > 0 and r["median_ms"] > 0 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    section = arch.markdown(rows, "test machine", 2, 1.0, "falign bench architectures")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept\n")
    arch.update_docs(docs, section)
    arch.update_docs(docs, section)  # replaced, not appended twice
    text = docs.read_text()
    assert text.count(arch.BEGIN) == 1 and "kept" in text and "### char-lm" in text and "| fa |" in text


def test_bad_arguments_are_refused(capsys):
    assert main(["bench", "architectures", "--models", "vit,lstm9", "--docs", ""]) != 0
    assert "lstm9" in capsys.readouterr().err
    assert main(["bench", "architectures", "--seeds", "0", "--docs", ""]) != 0


def test_speed_benchmark_output_has_no_profiler_chatter():
    """The CPU memory column uses the profiler; what native code prints then is silenced (fd 2), so the output
    is the table alone."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "falign", "bench", "speed", "--models", "mlp", "--rules", "fa",
                           "--repeats", "1", "--warmup", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert "| mlp (b=128) | fa |" in proc.stdout
    for chatter in ("USDT", "profiler_start", "profiler_stop", "CPUAllocator"):
        assert chatter not in text, chatter
