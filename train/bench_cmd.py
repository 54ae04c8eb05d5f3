"""``mim bench ...``: benchmarks (sharding plans, training throughput).

Each bench sub-command lives in its own module with ``register(bench_subparsers)``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from train.cli import add_command_group

BENCH_COMMAND_MODULES: tuple = (
    "train.bench_sharding",
    "train.bench_lookup",
    "train.bench_rim",
    "train.bench_train",
    "train.bench_layout",
    "train.bench_peer",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command_group(subparsers, "bench", "benchmark sharding plans and training", BENCH_COMMAND_MODULES)


def measuring_bench_parser(subparsers: argparse._SubParsersAction, name: str, help: str, description: str,
                           config_name: str, quick_help: str, overrides_help: str,
                           func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """A bench sub-command with the arguments the measuring benches share: a config file, a
    ``--quick`` smoke preset, ``--json`` output and ``key=value`` overrides. The description
    keeps its line breaks, as ``mim bench rim``'s does: argparse's default ran a docstring's
    bullet list into one paragraph."""
    parser = subparsers.add_parser(name, help=help, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML/JSON {config_name}")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON ('-': print it after the table)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
    parser.set_defaults(func=func)
    return parser


def preset_cli(config_cls: type, run: Callable[[Any], Dict[str, Any]],
               render: Callable[[Dict[str, Any]], str]) -> Callable[[argparse.Namespace], int]:
    """The sub-command function of a bench whose ``--quick`` is ``config_cls.quick()``: load the
    config (preset, file, overrides), run it, print and write the result."""
    def cli(args: argparse.Namespace) -> int:
        from mim_rec.config import load_config

        preset = config_cls.quick() if args.quick else None
        config = load_config(config_cls, args.config, args.overrides, preset=preset)
        run_and_report(lambda: run(config), render, args.json)
        return 0
    return cli


def check_json_path(json_path: Optional[str]) -> None:
    """Refuse a ``--json`` path that cannot be written (its folder missing, or a folder itself)
    before measuring, not after. ``-`` means standard output."""
    from mim_rec.config import ConfigError

    if not json_path or json_path == "-":
        return
    if Path(json_path).is_dir():
        raise ConfigError(f"--json {json_path}: a folder; give a file path")
    if not Path(json_path).parent.is_dir():
        raise ConfigError(f"--json {json_path}: no folder {Path(json_path).parent}")


def run_and_report(measure: Callable[[], Dict[str, Any]], render: Callable[[Dict[str, Any]], str],
                   json_path: Optional[str]) -> Dict[str, Any]:
    """Run a bench, print its table and wall time, and write the result (with ``wall_s``) as JSON."""
    check_json_path(json_path)
    started = time.perf_counter()
    result = measure()
    result["wall_s"] = time.perf_counter() - started
    print(render(result))
    print(f"wall time {result['wall_s']:.1f} s")
    text = json.dumps(_finite_or_null(result), indent=2, allow_nan=False)
    if json_path == "-":
        print(text)
    elif json_path:
        Path(json_path).write_text(text + "\n")
    return result


def _finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinity as None: Python writes them as bare ``NaN``, which
    strict JSON readers (jq, JavaScript, most other languages) refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def median_seconds(work: Callable[[], Any], repeats: int, warmup: int = 1,
                   synchronize: Callable[[], None] = lambda: None) -> Tuple[float, Any]:
    """``(median seconds of `repeats` timed calls, the last untimed warm-up call's result)``.

    ``warmup`` untimed calls come first (first-call allocations, kernel selection, lazy
    imports); ``synchronize`` (e.g. ``torch.cuda.synchronize``) ends each timed call, so
    asynchronous device work is inside the time it is charged to."""
    result = None
    for _ in range(warmup):
        result = work()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result
