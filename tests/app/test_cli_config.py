"""`falign train --config FILE`: a saved config.json as the starting point, the command line on top."""

from __future__ import annotations

import json

import pytest

from falign.app.cli import main


def _config(run):
    return json.loads((run / "config.json").read_text())


def test_a_saved_config_reruns_with_the_command_line_on_top(tmp_path, capsys):
    first = tmp_path / "first"
    assert main(["train", "--epochs", "1", "--hidden", "16", "--lr", "0.05", "--rule", "usf", "--no-progress",
                 "--out", str(first)]) == 0
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.json"), "--seed", "4", "--no-progress",
                 "--out", str(again)]) == 0
    a, b = _config(first), _config(again)
    assert {k for k in a if a[k] != b[k]} == {"seed"} and b["seed"] == 4 and b["hidden"] == [16]


def test_a_partial_config_keeps_the_other_defaults(tmp_path, capsys):
    part = tmp_path / "part.json"
    part.write_text(json.dumps({"rule": "dfa", "epochs": 1, "hidden": [8]}))
    assert main(["train", "--config", str(part), "--no-progress", "--out", str(tmp_path / "run")]) == 0
    cfg = _config(tmp_path / "run")
    assert (cfg["rule"], cfg["epochs"], cfg["hidden"], cfg["batch_size"]) == ("dfa", 1, [8], 32)


def test_milestones_in_a_config_are_not_flags_given(tmp_path, capsys):
    """A run's config.json always holds lr_milestones; with a schedule other than step they were not asked for
    (the control: giving --lr-milestones on the command line with no step schedule is still refused)."""
    part = tmp_path / "none.json"
    part.write_text(json.dumps({"epochs": 1, "hidden": [8], "lr_schedule": "none", "lr_milestones": [0.5, 0.75]}))
    assert main(["train", "--config", str(part), "--no-progress", "--out", str(tmp_path / "ok")]) == 0
    assert main(["train", "--config", str(part), "--lr-milestones", "0.3", "--no-progress",
                 "--out", str(tmp_path / "refused")]) == 1
    assert "--lr-milestones applies only" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ('{"rule": "fa", "bogus": 1}', "unknown config key(s): bogus"),
    ("not json", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"epochs": "many"}', "epochs"),
])
def test_a_bad_config_is_refused_before_training(tmp_path, capsys, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    assert main(["train", "--config", str(path), "--no-progress", "--out", str(tmp_path / "run")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_and_resume_together_are_refused(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text("{}")
    assert main(["train", "--config", str(path), "--resume", str(tmp_path)]) == 1
    assert "--resume continues" in capsys.readouterr().err


def test_every_choice_of_falign_train_is_the_config_fields_own():
    """Choices are declared once, on TrainConfig's fields: the command line offers exactly those, and a value the
    command line would refuse is refused by the config too (a config.json does not bypass the check)."""
    import dataclasses

    from falign.app.cli import build_parser
    from falign.app.train.config import ConfigError, TrainConfig

    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    flags = {a.dest: a for a in train._actions}
    fields = [f.name for f in dataclasses.fields(TrainConfig) if "choices" in f.metadata]
    assert len(fields) >= 12
    for name in fields:
        assert tuple(flags[name].choices) == TrainConfig.choices(name), name
        with pytest.raises(ConfigError, match=f"unknown {name} 'nonsense'"):
            TrainConfig(**{name: "nonsense"})


def test_every_config_field_is_a_flag_and_every_flag_a_field():
    """The command line is generated from TrainConfig: each field has exactly one flag with the field's default,
    and the only other flags are the command's own (--config, --out, --resume, --overwrite, --no-progress)."""
    import dataclasses

    from falign.app.cli import build_parser
    from falign.app.train.config import TrainConfig

    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    dests = [a.dest for a in train._actions if a.dest != "help"]
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(set(dests) - set(names)) == ["config", "no_progress", "out", "overwrite", "resume"]
    assert len(dests) == len(set(dests)) and set(names) <= set(dests)
    defaults = TrainConfig()
    for action in train._actions:
        if action.dest in names:
            assert action.default == getattr(defaults, action.dest), action.dest
            assert action.help, action.dest


def test_adding_an_option_is_one_field(tmp_path):
    """CONTRIBUTING's claim: a new option is one field declared with ``option``. The field becomes a flag with its
    help, default and parser, is type-checked, and survives config.json."""
    import argparse
    import dataclasses

    from falign.app.cli import add_config_flags
    from falign.app.train.config import ConfigError, TrainConfig, option

    @dataclasses.dataclass
    class Extended(TrainConfig):
        warmup_steps: int = option(0, "linear warm-up over K steps (default: %(default)s)", metavar="K")
        warmup_from: tuple[float, ...] = option((0.1,), "start fractions")
        no_shuffle: bool = option(False, "keep the data order")

    parser = argparse.ArgumentParser()
    add_config_flags(parser, Extended)
    args = parser.parse_args(["--warmup-steps", "7", "--warmup-from", "0.2,0.3", "--no-shuffle", "--rule", "bp"])
    config = Extended(**vars(args))
    assert (config.warmup_steps, config.warmup_from, config.no_shuffle, config.rule) == (7, (0.2, 0.3), True, "bp")
    assert "linear warm-up over K steps (default: 0)" in parser.format_help()
    assert Extended.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="warmup_steps must be an integer"):
        Extended(warmup_steps="7")  # type: ignore[arg-type]
    # the control: without the field there is no such flag
    plain = argparse.ArgumentParser()
    add_config_flags(plain, TrainConfig)
    with pytest.raises(SystemExit):
        plain.parse_args(["--warmup-steps", "7"])
