"""The ``mim`` command: one sub-command per stage, each a thin wrapper over a function.

Every command module exposes ``register(subparsers)``, which adds its parser(s) and sets
``func`` (called with the parsed namespace). Modules import torch and friends inside their
functions so that ``mim --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, NoReturn, Optional, Sequence, Tuple

# Order is the order shown by `mim --help`.
COMMAND_MODULES = (
    "train.data_cmd",
    "train.pretrain",
    "train.csft",
    "train.csft_ablations",
    "train.csft_tune",
    "train.embeddings_cmd",
    "train.ciubm",
    "train.bench_cmd",
    "train.pipeline",
    "train.experiment",
)


def add_command_group(subparsers: argparse._SubParsersAction, name: str, help: str,
                      modules: Sequence[str]) -> None:
    """A parent command (``mim data``, ``mim bench``) whose sub-commands each live in a module
    with ``register(subparsers)``."""
    parser = subparsers.add_parser(name, help=help)
    sub = parser.add_subparsers(dest=f"{name}_command", required=True, metavar=f"{name.upper()}_COMMAND")
    for module in modules:
        importlib.import_module(module).register(sub)


class ExactFlagParser(argparse.ArgumentParser):
    """An argument parser that takes a flag only as spelled in full. argparse's default takes
    any unambiguous prefix, so ``mim train --eval`` (a flag of pretrain and csft) ran as
    ``--eval-only``: it scored an old checkpoint and trained nothing. Sub-parsers are built
    with their parent's class, so every ``mim`` command inherits this."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Optional[Sequence[str]] = None,
                         namespace: Optional[argparse.Namespace] = None) -> Tuple[argparse.Namespace, List[str]]:
        """Also take the ``key=value`` overrides given after a flag, in order: argparse fills the
        ``overrides`` positional (``nargs="*"``) from the first run of positionals only, so
        ``mim bench lookup items=X --quick batch_size=8`` was refused as an unrecognized argument."""
        namespace, extras = super().parse_known_args(args, namespace)
        if isinstance(getattr(namespace, "overrides", None), list):
            namespace.overrides += [arg for arg in extras if not arg.startswith("-")]
            extras = [arg for arg in extras if arg.startswith("-")]
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = ExactFlagParser(
        prog="mim",
        description="MIM on TorchRec: pre-train, C-SFT, representation center, CiUBM CTR.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from mim_rec.data.errors import DataError, ManifestMismatch
    from mim_rec.config import ConfigError
    from mim_rec.utils.run import TrainingDiverged
    try:
        result = args.func(args)
    except (DataError, ManifestMismatch, ConfigError) as exc:
        print_error(f"{command_prog(args)}: error: {exc}")
        return 2
    except TrainingDiverged as exc:
        print_error(f"{command_prog(args)}: error: {exc}")
        return 1
    return int(result or 0)


def print_error(message: str) -> None:
    """Print a command's error line on stderr; under torchrun only once for a line every rank
    raised alike (:func:`mim_rec.utils.dist.print_error_once`). The ranks still exit non-zero."""
    if "RANK" in os.environ:  # a launched rank (a plain ``mim`` is spared importing torch here)
        from mim_rec.utils.dist import print_error_once
        print_error_once(message)
    else:
        print(message, file=sys.stderr)


def command_prog(args: argparse.Namespace) -> str:
    """``mim data holdout``, as argparse names the command in its own errors: the group's name
    alone (``mim data``) did not say which of its commands refused."""
    sub = getattr(args, f"{args.command}_command", None)
    return f"mim {args.command} {sub}" if sub else f"mim {args.command}"


def run() -> NoReturn:
    """The console script (and ``python -m train.cli``, as torchrun launches it): ``main``, then
    an exit that a process group left running cannot turn into an abort (see
    :func:`mim_rec.utils.dist.exit_process`). Tests call ``main``, which returns."""
    code = main()
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            from mim_rec.utils.dist import exit_process
            exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
