"""The ``falign`` command line: ``train``, ``reproduce``, ``bench``, ``plot`` and ``rules``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from falign_cli import COMMANDS, DESCRIPTION, EPILOG, version

TRAIN_EXAMPLE = """examples:
  falign train                                   # MLP with fa on sklearn digits (about a second)
  falign train --rule dfa --model lenet --data fashion-mnist --epochs 5 --out runs/dfa-lenet
  falign train --rule kp --weight-decay 1e-3 --diagnostics-every 50
  falign train --rule wm --rule-option decay=0.1 --rule-option steps=2   # a rule's own options (falign rules)
  falign train --resume runs/dfa-lenet           # continue from the latest checkpoint
  falign train --config runs/dfa-lenet/config.json --seed 1 --out runs/dfa-lenet-s1   # the same run, seed 1
  torchrun --nproc_per_node=2 -m falign train --data synthetic --batch-size 64   # data-parallel (global batch)
  torchrun --nproc_per_node=2 -m falign train --rule dfa --pipeline-stages 2 --hidden 512,512,512   # 2 stages
"""


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _rule_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


class _MergeDict(argparse.Action):
    """Collect repeated ``KEY=VALUE`` options into one dictionary."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        merged = dict(current) if isinstance(current, dict) else {}  # not a dict: explicit_options' placeholder
        key, value = values
        merged[key] = value
        setattr(namespace, self.dest, merged)


def add_config_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per field of ``config_class`` (a dataclass declared with :func:`falign.app.train.config.option`):
    ``--field-name`` (or the field's ``flag``), its default, help, choices and metavar from the field, its
    parser from the field's type (``int``, ``float``, ``str``, ``tuple[int, ...]`` and ``tuple[float, ...]``
    as comma-separated lists, a ``dict`` as repeated ``KEY=VALUE``). A bool that defaults to False is a switch
    (``--drop-last``); one that defaults to True is switched off (``--no-reference-check``)."""
    import dataclasses

    from falign.app.train.config import field_types

    kinds = field_types(config_class)
    defaults = config_class()
    for f in dataclasses.fields(config_class):
        meta, default = f.metadata, getattr(defaults, f.name)
        _, hint = kinds[f.name]
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kw: dict = {"dest": f.name, "help": meta.get("help", "")}
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if hint is bool:
            if default:
                flag = meta.get("flag") or "--no-" + f.name.replace("_", "-")
            parser.add_argument(flag, action="store_false" if default else "store_true", **kw)
            continue
        if hint is dict or typing.get_origin(hint) is dict:
            parser.add_argument(flag, type=_rule_option, action=_MergeDict, default={}, **kw)
            continue
        if "choices" in meta:
            kw["choices"] = config_class.choices(f.name)
        elif typing.get_origin(hint) is tuple:
            kw["type"] = _ints if typing.get_args(hint)[0] is int else _floats
        elif hint in (int, float):
            kw["type"] = hint
        parser.add_argument(flag, default=default, **kw)


def _add_train(sub) -> None:
    from falign.app.train.config import TrainConfig

    p = sub.add_parser("train", help=COMMANDS["train"], epilog=TRAIN_EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train one model with one learning rule and write a run directory "
                                   "(config.json, versions.json, metrics.jsonl, checkpoint.pt, summary.json).")
    add_config_flags(p, TrainConfig)
    p.add_argument("--config", metavar="FILE", default=None,
                   help="start from a saved config.json (a run's, or one written by hand: any subset of its keys); "
                        "options given on the command line override it")
    p.add_argument("--out", default=None, help="run directory (default: runs/<rule>-<model>-<data>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue the run in RUN_DIR from its checkpoint; only --epochs (with --lr-schedule none), "
                        "--checkpoint-every, --device, --eval-batch-size, --scale-every, --no-reference-check and "
                        "--wandb-project may change, any other flag must match the saved run")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out: deletes only the files a falign run writes, and refuses a "
                        "folder that holds anything else")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train, parser=p)


_NOT_CONFIG = ("func", "command", "out", "resume", "overwrite", "no_progress", "parser", "argv", "config")


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the options that ``argv`` gives explicitly (not left at their defaults)."""
    unset = object()
    saved = [(action, action.default) for action in parser._actions]
    saved_defaults = dict(parser._defaults)  # set_defaults (--config) values count as defaults too
    try:
        for action, _ in saved:
            action.default = unset
        parser._defaults = {k: unset for k in saved_defaults}
        namespace, _ = parser.parse_known_args(list(argv))
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults = saved_defaults
    return {k for k, v in vars(namespace).items() if v is not unset}


def _elastic(args: argparse.Namespace) -> None:
    """Under ``torchrun --max-restarts=N``: a restarted worker continues the run in ``--out`` from its last
    checkpoint (or starts it afresh when the failure came before the first one); the first attempt needs
    ``--out`` so that a restart finds the run."""
    from falign.app.train.trainer import elastic_restart
    from falign.errors import FalignError

    restarts_allowed = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if args.resume or not (restarts_allowed or elastic_restart()):
        return
    if args.out is None:
        raise FalignError("under torchrun --max-restarts, give --out: a restarted worker resumes the run there")
    if elastic_restart() == 0:
        return
    if (Path(args.out) / "checkpoint.pt").is_file():
        args.resume, args.out, args.overwrite = args.out, None, False
        args.argv = [a for a in args.argv if a != "--overwrite"]
    else:  # failed before the first checkpoint: this run's own files are replaced
        args.overwrite = True


def _with_config_file(args: argparse.Namespace) -> argparse.Namespace:
    """``--config FILE``: the file's values become the defaults, then the command line is parsed again (so an
    option given there wins)."""
    from falign.app.train import TrainConfig
    from falign.errors import FalignError

    path = Path(args.config)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise FalignError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    except ValueError as error:
        raise FalignError(f"--config {path}: not JSON ({error})") from None
    if not isinstance(data, dict):
        raise FalignError(f"--config {path}: expected a JSON object of TrainConfig keys (a run's config.json)")
    if args.resume:
        raise FalignError("--config starts a new run; --resume continues a saved one with its own config")
    try:
        config = TrainConfig.from_dict({**TrainConfig().to_dict(), **data})
    except (TypeError, ValueError) as error:
        raise FalignError(f"--config {path}: {error}") from None
    values = config.to_dict()
    values["hidden"], values["lr_milestones"] = tuple(values["hidden"]), tuple(values["lr_milestones"])
    args.parser.set_defaults(**values)
    again = args.parser.parse_args(args.argv)
    again.parser, again.argv, again.func, again.command = args.parser, args.argv, args.func, args.command
    return again


def _cmd_train(args: argparse.Namespace) -> int:
    from falign.app.train import TrainConfig, Trainer
    from falign.errors import FalignError

    if args.config is not None:
        args = _with_config_file(args)
    if args.out is not None and not args.out.strip():
        raise FalignError("--out is empty; give a folder (or leave --out out for runs/<rule>-<model>-<data>-<time>)")
    if "lr_milestones" in explicit_options(args.parser, args.argv) and args.lr_schedule != "step" and not args.resume:
        raise FalignError(f"--lr-milestones applies only to --lr-schedule step (the schedule is {args.lr_schedule})")
    _elastic(args)
    if args.resume:
        given = explicit_options(args.parser, args.argv) - set(_NOT_CONFIG)
        if args.overwrite:
            raise FalignError("--resume continues a run; it cannot be combined with --overwrite")
        if args.out is not None and Path(args.out) != Path(args.resume):
            raise FalignError(f"--out {args.out} and --resume {args.resume} name different folders; "
                              f"--resume alone continues the run in its folder")
        trainer = Trainer(TrainConfig(), args.resume, progress=not args.no_progress, resume=True,
                          changes={k: getattr(args, k) for k in sorted(given)})
    else:
        fields = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
        trainer = Trainer(TrainConfig(**fields), args.out, progress=not args.no_progress, overwrite=args.overwrite)
    summary = trainer.run()
    if trainer.is_main:
        from falign.app.train import read_metrics
        from falign.app.train.logging import summary_table

        rows = [r for r in read_metrics(trainer.out / "metrics.jsonl") if r.get("event") == "epoch"]
        print(summary_table(summary, rows, trainer.out))
    return 0


def _add_rules(sub) -> None:
    p = sub.add_parser("rules", help=COMMANDS["rules"],
                       description="List the registered learning rules: what each one is, how its feedback "
                                   "changes, what a hidden layer receives, whether the conservation law holds, "
                                   "and its options (give them to falign train as --rule-option KEY=VALUE).")
    p.set_defaults(func=_cmd_rules)


def _cmd_rules(args: argparse.Namespace) -> int:
    from falign.rules import RULES, option_help

    for name in sorted(RULES):
        rule = RULES[name]
        print(f"{name:<5} {rule.summary}")
        print(f"      feedback: {rule.feedback.value}; signal: {rule.signal.value}; conservation law: "
              f"{rule.law.value}" + (f"; after each step: {rule.step_work}" if rule.step_work else ""))
        for option, default, text in option_help(rule):
            print(f"      --rule-option {option}={default}  {text}")
    return 0


PLOT_EXAMPLE = """examples:
  falign train --rule fa --diagnostics-every 20 --out runs/fa
  falign plot runs/fa                            # writes runs/fa/plots/*.png
  falign train --rule bp --diagnostics-every 20 --out runs/bp
  falign plot runs/fa runs/bp                    # runs/compare/compare.png: both runs in one figure
"""


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help=COMMANDS["plot"], epilog=PLOT_EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="One run: scale.png, and alignment.png, conservation.png and decomposition.png "
                                   "for a run trained with --diagnostics-every, in RUN/plots. Several runs: "
                                   "compare.png (loss and accuracy per epoch, and each layer's gradient alignment "
                                   "where every run has diagnostics), each figure naming its runs' rule, model "
                                   "and data; each run's own figures go into a sub-folder.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN", help="run directories written by falign train")
    p.add_argument("--out", default=None,
                   help="folder for the PNGs (default: RUN/plots for one run, compare/ beside the first run for "
                        "several)")
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args: argparse.Namespace) -> int:
    from falign.app.report.plots import plot_runs

    def warn(text: str) -> None:
        print(f"falign plot: {text}", file=sys.stderr)

    for path in plot_runs(args.run_dirs, args.out, warn=warn):
        print(path)
    return 0


REPRODUCE_EXAMPLE = """examples:
  falign reproduce                               # every experiment, quick sizes (minutes on 2 CPU cores)
  falign reproduce --only conservation,min_norm --out runs/repro
  falign reproduce --full --seeds 5              # larger models, more seeds, full Fashion-MNIST
  falign reproduce --data-dir ~/datasets         # the paper's MNIST / CIFAR-100 / Tiny-ImageNet where present
"""


def _add_reproduce(sub) -> None:
    from falign.app.experiments import EXPERIMENTS

    p = sub.add_parser("reproduce", help=COMMANDS["reproduce"], epilog=REPRODUCE_EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run the experiments of Robertson & Koyejo (ICML 2024) and write report.md, "
                                   "report.html, tables/*.csv and figures/*.png. Experiments: "
                                   + ", ".join(EXPERIMENTS) + ".")
    p.add_argument("--only", default=None, help="comma-separated experiment names (default: all)")
    p.add_argument("--seeds", type=int, default=None, help="seeds of the repeated runs (default: 3; --full: 5)")
    p.add_argument("--full", action="store_true", help="larger models, more steps and seeds, full-size data")
    p.add_argument("--size", choices=("tiny", "quick", "full"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                   help="device of the training-run experiments (multiclass, benign_overfitting): auto is cuda "
                        "where available, else cpu; the small float64 flow experiments run on the CPU (default: "
                        "cpu)")
    p.add_argument("--out", default="runs/reproduce", help="output folder (default: runs/reproduce)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where the paper's datasets are, when you have them: MNIST (IDX files), CIFAR-100 "
                        "(cifar-100-python/), Tiny-ImageNet (tiny-imagenet-200/, needs the [images] extra), "
                        "Fashion-MNIST (fashion-mnist/); whatever is missing falls back to data on the machine, "
                        "with a line in the report; a malformed file is an error before any training")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_reproduce)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from falign.app.experiments import reproduce

    size = args.size or ("full" if args.full else "quick")
    only = None
    if args.only is not None:
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        if not only:
            from falign.errors import FalignError

            raise FalignError("--only names no experiment; give a comma-separated list, or leave it out to run all")
    seeds = args.seeds if args.seeds is not None else (5 if size == "full" else 3)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    results, paths = reproduce(args.out, only=only, size=size, seeds=seeds, device=device,
                               progress=not args.no_progress, data_dir=args.data_dir)
    print(paths["findings"].read_text())
    print("seconds: " + ", ".join(f"{r.name} {r.seconds:.0f}" for r in results))
    print(f"report: {paths['markdown']}  (and {paths['html'].name}, findings.md, tables/*.csv, figures/*.png)")
    return 0


BENCH_EXAMPLE = """examples:
  falign bench speed                             # step time and memory of every rule vs plain PyTorch
  falign bench speed --compile --device cuda
  falign bench accuracy                          # LeNet / Fashion-MNIST vs BioTorch's table (CPU schedule)
  falign bench accuracy --full                   # the published 100-epoch schedule
  falign bench accuracy --docs docs/benchmarks.md   # also regenerate that file's section (only when asked)
  falign bench architectures                     # ViT, row-LSTM/GRU, char-LM: accuracy and step time per rule
  falign bench pipeline                          # 2 pipeline stages: dfa unlocked vs bp GPipe/1F1B/zero-bubble
"""


def _add_bench(sub) -> None:
    from falign.app.bench import accuracy, speed

    p = sub.add_parser("bench", help=COMMANDS["bench"], epilog=BENCH_EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Benchmarks: step time and memory against plain PyTorch (speed), and accuracy "
                                   "against BioTorch's published LeNet / Fashion-MNIST table (accuracy).")
    kinds = p.add_subparsers(dest="bench", metavar="KIND")
    sp = kinds.add_parser("speed", help="step time and memory per rule", description=speed.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    speed.build_parser(sp).set_defaults(func=lambda a: speed.run(a) or 0)
    ap = kinds.add_parser("accuracy", help="accuracy vs BioTorch's published table", description=accuracy.__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    accuracy.build_parser(ap).set_defaults(func=lambda a: accuracy.run(a) or 0)
    from falign.app.bench import architectures

    arch = kinds.add_parser("architectures", help="attention and recurrent models: accuracy and step time per rule",
                            description=architectures.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    architectures.build_parser(arch).set_defaults(func=lambda a: architectures.run(a) or 0)
    from falign.app.bench import pipeline

    pipe = kinds.add_parser("pipeline", help="pipeline stages: dfa's unlocked schedule vs bp's GPipe/1F1B/zero-bubble",
                            description=pipeline.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pipeline.build_parser(pipe).set_defaults(func=lambda a: pipeline.run(a) or 0)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="falign", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"falign {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_reproduce(sub)
    _add_bench(sub)
    _add_plot(sub)
    _add_rules(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv[argv.index(args.command) + 1 :] if args.command in argv else argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from falign.errors import FalignError

    try:
        return int(args.func(args) or 0)
    except (FalignError, FileNotFoundError) as err:
        print(f"falign {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"falign {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
