"""The command pair of a training stage: ``mim STAGE`` (train or resume, then optionally
evaluate) and ``mim STAGE-eval`` (evaluate a finished run folder).

Stage 1 and C-SFT share this shape; only how a config is loaded, how the evaluation's inputs
are checked, how a run trains and what its evaluation prints differ, so those are the four
callables a stage passes in. What the check returns is handed to training and to the
evaluation, which would otherwise read it again (C-SFT: the world and its held-out data;
pre-training: that its held-out split was checked).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class StageCommands:
    name: str                                        # ``mim NAME`` and ``mim NAME-eval``
    help: str                                        # of the training command
    eval_help: str                                   # of the evaluation command
    config_type: str                                 # named in --config's help, with where it is defined
    example: str                                     # example overrides, in the overrides' help
    load: Callable[[argparse.Namespace], Any]        # args -> checked config
    check_eval: Callable[[Any], Any]                 # config -> the evaluation's inputs, refused up front
                                                     # where the evaluation would refuse them
    train: Callable[[Any, Any], Any]                 # (config, check_eval's result or None) -> trains or
                                                     # resumes ``config.out``
    report: Callable[[Any, Any], str]                # (config, check_eval's result, or None: the report
                                                     # checks) -> the evaluation table, as text


def register_stage(subparsers: argparse._SubParsersAction, stage: StageCommands) -> None:
    parser = subparsers.add_parser(stage.name, help=stage.help)
    _common_args(parser, stage)
    parser.add_argument("--eval", action="store_true",
                        help=f"after training, evaluate as {stage.name}-eval does")
    parser.add_argument("--eval-only", action="store_true",
                        help=f"skip training; evaluate the run folder (same as {stage.name}-eval)")
    parser.set_defaults(func=lambda args: _train_cli(stage, args))
    evaluate = subparsers.add_parser(f"{stage.name}-eval", help=stage.eval_help)
    _common_args(evaluate, stage)
    evaluate.set_defaults(func=lambda args: _eval_cli(stage, _load(stage, args), None))


def _common_args(parser: argparse.ArgumentParser, stage: StageCommands) -> None:
    parser.add_argument("--config", default=None, help=f"YAML/JSON file of {stage.config_type}")
    parser.add_argument("overrides", nargs="*",
                        help=f"key=value overrides of the {stage.config_type} defaults, e.g. {stage.example}")


def _load(stage: StageCommands, args: argparse.Namespace) -> Any:
    """The stage's config, with ``out`` a run folder."""
    from mim_rec.config import require_run_folder

    config = stage.load(args)
    require_run_folder(config.out, f"runs/{stage.name}")
    return config


def _train_cli(stage: StageCommands, args: argparse.Namespace) -> int:
    """With ``--eval`` or ``--eval-only``, the evaluation's inputs are checked before training (an
    unscorable one was found only after it) and handed on, not read again."""
    config = _load(stage, args)
    evaluating = args.eval or args.eval_only
    checked = stage.check_eval(config) if evaluating else None
    if not args.eval_only:
        stage.train(config, checked)
    return _eval_cli(stage, config, checked) if evaluating else 0


def _eval_cli(stage: StageCommands, config: Any, checked: Any) -> int:
    """Evaluates and prints on the main rank only; other ranks of a torchrun launch exit."""
    from mim_rec.utils.dist import init_distributed
    if init_distributed(config.device).is_main:
        print(stage.report(config, checked))
    return 0
