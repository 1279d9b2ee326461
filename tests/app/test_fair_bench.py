"""Fair comparisons: a validation split, BioTorch's input options, per-rule lr chosen without the test
set, and the depth-utility baseline."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from falign.app.bench import accuracy
from falign.app.cli import main
from falign.app.train import TrainConfig, load_checkpoint, read_metrics, train
from falign.data import batches, hold_out, load_dataset, load_digits, resize_images
from falign.data.idx import FILES
from falign.errors import FalignError
from falign.models.cnn import LeNet5
from tests.core.test_data import write_idx


def test_hold_out_is_disjoint_seed_independent_and_clean():
    ds = load_digits(seed=0)
    a = hold_out(ds, 100)
    assert len(a.y_val) == 100 and len(a.y_train) == len(ds.y_train) - 100
    flat = lambda x: sorted(tuple(r.flatten().tolist()) for r in x)  # noqa: E731
    assert sorted(flat(a.x_val) + flat(a.x_train)) == flat(ds.x_train)  # a partition of the training images
    assert torch.equal(hold_out(ds, 100).x_val, a.x_val)  # the same split every time (its own fixed seed)
    noisy = load_dataset("digits", label_noise=0.5, val_size=100)
    assert torch.equal(noisy.y_val, load_dataset("digits", val_size=100).y_val)  # validation labels are clean
    with pytest.raises(FalignError, match="val_size must be between"):
        hold_out(ds, len(ds.y_train))


def test_resize_and_lenet_on_32x32_is_the_padded_28x28_architecture():
    x = torch.rand(3, 1, 28, 28)
    from falign.data import Dataset, synthetic_classification
    with pytest.raises(FalignError, match="images"):
        resize_images(synthetic_classification(seed=0), 32)  # flat feature vectors
    img = Dataset("img", x, torch.zeros(3, dtype=torch.long), x[:2], torch.zeros(2, dtype=torch.long), 10)
    big = resize_images(img, 32)
    assert big.x_train.shape == (3, 1, 32, 32) and big.x_test.shape == (2, 1, 32, 32)
    assert torch.allclose(resize_images(img, 28).x_train, x)  # same size: unchanged
    shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
    assert shapes(LeNet5(1, 10, 32)) == shapes(LeNet5(1, 10, 28))
    assert LeNet5(1, 10, 32)(big.x_train).shape == (3, 10)


def test_drop_last_leaves_out_the_partial_batch():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    assert [len(b) for _, b in batches(x, y, 4)] == [4, 4, 2]
    assert [len(b) for _, b in batches(x, y, 4, drop_last=True)] == [4, 4]


def test_validation_metrics_and_the_validation_selected_epoch(tmp_path):
    s = train(TrainConfig(rule="fa", epochs=3, hidden=(16,), val_size=200), tmp_path / "r", progress=False)
    rows = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["event"] == "epoch"]
    assert all("val_acc" in r and "val_loss" in r for r in rows)
    best = max(rows, key=lambda r: r["val_acc"])
    assert s["val_selected"] == {"epoch": best["epoch"], "val_acc": best["val_acc"], "test_acc": best["test_acc"]}
    assert "val_selected" not in train(TrainConfig(epochs=1, hidden=(8,)), tmp_path / "n", progress=False)


def test_freeze_hidden_trains_the_output_layer_alone(tmp_path):
    cfg = TrainConfig(rule="bp", epochs=1, hidden=(16, 16), freeze_hidden=True, weight_decay=1e-3)
    train(cfg, tmp_path / "f", progress=False)
    train(cfg.replace(epochs=1, freeze_hidden=False), tmp_path / "g", progress=False)  # same init, all trained
    frozen = load_checkpoint(tmp_path / "f" / "checkpoint.pt")["model"]
    free = load_checkpoint(tmp_path / "g" / "checkpoint.pt")["model"]
    from falign.app.train.trainer import build_run
    _, init = build_run(cfg, torch.device("cpu"))
    start = init.state_dict()
    for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert torch.equal(frozen[k], start[k]) and not torch.equal(free[k], start[k]), k
    assert not torch.equal(frozen["fc3.weight"], start["fc3.weight"])
    from falign.app.train import ConfigError
    with pytest.raises(ConfigError, match="no rule to diagnose"):
        TrainConfig(freeze_hidden=True, diagnostics_every=5)


def test_select_takes_the_lowest_mean_validation_error_and_counts_divergence_as_chance():
    rows = [{"rule": "fa", "lr": lr, "seed": s, "epochs": 5, "best val error %": e}
            for lr, s, e in ((0.1, 0, float("nan")), (0.01, 0, 20.0), (0.01, 1, 24.0), (0.001, 0, 21.0),
                             (0.001, 1, 22.0))]
    chosen = accuracy.select(rows)
    assert chosen["fa"]["lr"] == 0.001 and chosen["fa"]["val error %"] == pytest.approx(21.5)
    assert "validation (3-point grid, 5-epoch schedule)" == chosen["fa"]["chosen by"]
    flagged = [{**r, "flags": "runaway from step 50"} if r["lr"] == 0.001 else r for r in rows]
    assert accuracy.select(flagged)["fa"]["lr"] == 0.01  # a runaway's validation error is not taken at face value
    tie = [{"rule": "dfa", "lr": lr, "seed": 0, "epochs": 1, "best val error %": 30.0} for lr in (0.01, 0.001)]
    assert accuracy.select(tie)["dfa"]["lr"] == 0.01


def tiny_fashion(folder, shift_test_labels=False):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.arange(1100) % 10
    images = rng.integers(0, 60, (1100, 28, 28))
    for i, label in enumerate(labels):  # a learnable cue: a bright band whose row is the class
        images[i, 2 * label + 3: 2 * label + 6] += 180
    test_labels = labels[1000:].copy()
    if shift_test_labels:  # every test label wrong by 5: the better a model learned, the worse its test error
        test_labels = (test_labels + 5) % 10
    write_idx(folder / FILES["train_images"], images[:1000])
    write_idx(folder / FILES["train_labels"], labels[:1000])
    write_idx(folder / FILES["test_images"], images[1000:])
    write_idx(folder / FILES["test_labels"], test_labels)


def bench(tmp_path, name, data, *extra):
    out = tmp_path / name
    args = ["bench", "accuracy", "--rules", "fa,frozen-hidden", "--epochs", "2", "--tune-epochs", "3", "--seeds", "1",
            "--lr-grid", "0.05,0.0001", "--val-size", "100", "--data-dir", str(data), "--out", str(out),
            "--no-progress", *extra]
    assert main(args) == 0
    return out


def test_bench_tunes_per_rule_on_validation_never_on_the_test_set(tmp_path, capsys):
    tiny_fashion(tmp_path / "d")
    tiny_fashion(tmp_path / "shifted", shift_test_labels=True)
    a = bench(tmp_path, "a", tmp_path / "d")
    b = bench(tmp_path, "b", tmp_path / "shifted")
    text = capsys.readouterr().out
    chosen_a, chosen_b = (json.loads((o / "lr.json").read_text()) for o in (a, b))
    assert chosen_a["fa"]["lr"] == 0.05 and chosen_a["fa"]["val error %"] < 50  # the grid's points differ
    assert chosen_a == chosen_b  # the choice reads validation only: the shifted test labels change nothing
    # negative control: choosing by the tuning runs' test error would have picked the other lr on the shifted set
    final_test = {lr: [r["test_acc"] for r in read_metrics(b / "tune" / f"fa-lr{lr}-s0" / "metrics.jsonl")
                       if r["event"] == "epoch"][-1] for lr in (0.05, 0.0001)}
    assert max(final_test, key=final_test.get) == 0.0001, final_test
    with open(a / "tuning.csv", newline="") as f:
        tuning = list(csv.DictReader(f))
    assert {(r["rule"], float(r["lr"])) for r in tuning} == {(r, lr) for r in ("fa", "frozen-hidden")
                                                            for lr in (0.05, 0.0001)}
    with open(a / "results.csv", newline="") as f:
        results = list(csv.DictReader(f))
    assert [r["rule"] for r in results] == ["fa", "frozen-hidden"]
    assert all(r["lr chosen by"] == "validation (2-point grid, 3-epoch schedule)" for r in results)
    assert all(float(r["lr"]) == chosen_a[r["rule"]]["lr"] for r in results)
    assert "Tuning stage" in text and "depth-utility baseline" in text and "validation-selected" in text
    # the runs kept their validation split, and recorded the val-selected epoch
    summary = json.loads((a / "runs" / "fa-s0" / "summary.json").read_text())
    assert summary["val_selected"]["epoch"] in (1, 2)
    # --summarize of the folder gives the same table, with its tuning stage
    assert main(["bench", "accuracy", "--summarize", str(a)]) == 0
    again = capsys.readouterr().out
    assert "Tuning stage" in again and "| fa | " in again and "(validation (2-point grid" in again
    # reuse the choice in a later run of other seeds
    c = bench(tmp_path, "c", tmp_path / "d", "--lr-from", str(a), "--first-seed", "1")
    assert (c / "runs" / "fa-s1").is_dir() and not (c / "tune").exists()
    assert json.loads((c / "lr.json").read_text()) == chosen_a


def test_tune_only_stops_after_the_tuning_stage_and_its_choice_is_reused(tmp_path, capsys):
    tiny_fashion(tmp_path / "d")
    tuned = bench(tmp_path, "t", tmp_path / "d", "--tune-only")
    text = capsys.readouterr().out
    assert (tuned / "tuning.csv").is_file() and (tuned / "lr.json").is_file()
    assert not (tuned / "runs").exists() and not (tuned / "results.csv").exists()  # nothing past the tuning stage
    assert "| fa | " in text and f"--lr-from {tuned}" in text
    full = bench(tmp_path, "f", tmp_path / "d", "--lr-from", str(tuned))
    assert (full / "runs" / "fa-s0").is_dir() and not (full / "tune").exists()
    assert json.loads((full / "lr.json").read_text()) == json.loads((tuned / "lr.json").read_text())
    # control: with the lr given there is no tuning stage to stop after, and nothing is claimed
    assert main(["bench", "accuracy", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "x"),
                 "--lr", "0.01", "--tune-only"]) == 1
    assert "--tune-only" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_bench_lr_options_are_checked(tmp_path, capsys):
    tiny_fashion(tmp_path / "d")
    common = ["bench", "accuracy", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--epochs", "1"]
    for extra, message in ((["--rules", "fa,dfa", "--lr", "fa=0.01"], "names no lr for dfa"),
                           (["--val-size", "0"], "no validation split"),
                           (["--lr-grid", "0.1,-1"], "--lr-grid"),
                           (["--lr-from", str(tmp_path / "nothing")], "--lr-from")):
        assert main([*common, *extra]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was claimed
    assert main([*common, "--rules", "bp", "--lr", "0.01", "--val-size", "0", "--seeds", "1", "--no-progress",
                 "--resize", "32", "--drop-last"]) == 0
    with open(tmp_path / "o" / "results.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["lr chosen by"] == "given" and row["input"] == "resized to 32x32" and row["drop last"] == "True"


def test_xavier_weight_init_is_biotorchs_forward_init(tmp_path):
    from falign.app.train import ConfigError
    from falign.app.train.trainer import build_run
    tiny_fashion(tmp_path / "d")
    cfg = TrainConfig(rule="fa", model="lenet", data="fashion-mnist", data_dir=str(tmp_path / "d"), epochs=1,
                      weight_init="xavier", feedback_init="xavier_uniform")
    _, model = build_run(cfg, torch.device("cpu"))
    _, default = build_run(cfg.replace(weight_init="torch"), torch.device("cpu"))
    import falign
    for layer, plain in zip(falign.feedback_layers(model), falign.feedback_layers(default), strict=True):
        w, b = layer.weight.detach(), layer.feedback_weight.detach()
        fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
        bound = (6 / (fan_in + fan_out)) ** 0.5
        for m in (w, b):  # W and B uniform on ±bound
            assert 0.9 * bound < float(m.abs().max()) <= bound
        assert torch.count_nonzero(layer.bias) == 0
        assert torch.count_nonzero(plain.bias) > 0  # control: PyTorch's default init has nonzero biases
    with pytest.raises(ConfigError, match="init_scale"):
        TrainConfig(weight_init="xavier", init_scale=2.0)
    with pytest.raises(ConfigError, match="weight_init"):
        TrainConfig(weight_init="orthogonal")


def test_bench_init_option_is_recorded_and_kept_apart_in_the_table(tmp_path, capsys):
    cfg = accuracy.bench_config("fa", 0, epochs=1, lr=0.01, data_dir=None, device="cpu", init="biotorch")
    assert (cfg.weight_init, cfg.feedback_init) == ("xavier", "xavier_uniform")
    with pytest.raises(FalignError, match="unknown init"):
        accuracy.bench_config("fa", 0, epochs=1, lr=0.01, data_dir=None, device="cpu", init="glorot")
    tiny_fashion(tmp_path / "d")
    bt = bench(tmp_path, "bt", tmp_path / "d", "--init", "biotorch")
    plain = bench(tmp_path, "plain", tmp_path / "d")
    capsys.readouterr()
    config = json.loads((bt / "runs" / "fa-s0" / "config.json").read_text())
    assert (config["weight_init"], config["feedback_init"]) == ("xavier", "xavier_uniform")
    with open(bt / "tuning.csv", newline="") as f:
        assert {r["init"] for r in csv.DictReader(f)} == {"biotorch"}
    # merged, the two inits are two rows (and two tuning rows), never averaged together
    assert main(["bench", "accuracy", "--summarize", str(bt / "results.csv"), str(plain / "results.csv")]) == 0
    text = capsys.readouterr().out
    fa_rows = [line for line in text.splitlines() if line.startswith("| fa | ") and "padded" in line]
    assert len(fa_rows) == 2 and sum("BioTorch init" in line for line in fa_rows) == 1
    assert "| fa (BioTorch init) | " in text and "xavier_uniform and every bias 0" in text
