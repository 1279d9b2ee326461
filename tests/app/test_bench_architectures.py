"""falign bench architectures: its models convert and train, its table and docs section are written, bad input
is refused (the numbers themselves come from the command, in docs/benchmarks.md)."""

from __future__ import annotations

import math

import pytest
import torch

from falign.app.bench import architectures as arch
from falign.app.cli import main
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


def test_image_models_fall_back_to_digits_without_fashion_mnist(tmp_path, monkeypatch, capsys):
    """No Fashion-MNIST (an empty folder in $FALIGN_FASHION_MNIST_DIR hides an installed copy): digits, said so."""
    monkeypatch.setenv("FALIGN_FASHION_MNIST_DIR", str(tmp_path))
    source, side, train, _test = arch._images(100, 50)
    assert source == "digits (Fashion-MNIST not installed)" and side == 8 and train[0].shape[1] == 64
    assert "Fashion-MNIST is not installed" in capsys.readouterr().out
    assert main(["bench", "architectures", "--models", "row-gru", "--rules", "fa", "--seeds", "1", "--repeats", "1",
                 "--steps-scale", "0.01", "--timing-runs", "1", "--docs", ""]) == 0
    out = capsys.readouterr().out
    assert "train on digits instead" in out and "digits (Fashion-MNIST not installed)" in out


def test_image_models_use_fashion_mnist_where_it_is(tmp_path, monkeypatch):
    """The same call reads Fashion-MNIST from the default folder when it is there (tiny IDX files here)."""
    from tests.core.test_data import write_tiny_mnist

    write_tiny_mnist(tmp_path, gz=True)
    monkeypatch.setenv("FALIGN_FASHION_MNIST_DIR", str(tmp_path))
    source, side, train, test = arch._images(20, 5)
    assert source == "Fashion-MNIST" and side == 6 and train[0].shape == (20, 36) and test[0].shape == (5, 36)


@pytest.mark.needs_fashion_mnist
def test_installed_fashion_mnist_is_the_published_one():
    """The installed files match the published MD5 sums and shapes (runs where Fashion-MNIST is installed)."""
    from falign.data import load_idx_dataset

    ds = load_idx_dataset(verify=True)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and torch.bincount(ds.y_train).tolist() == [6000] * 10
    source, side, _, _ = arch._images(1000, 100)
    assert source == "Fashion-MNIST" and side == 28
