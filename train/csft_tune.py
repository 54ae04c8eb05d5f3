"""``mim csft-tune``: choose C-SFT settings on a validation split, never on the test files.

Every combination of the ``--grid`` values is one C-SFT run trained without the latest share
of the training pairs (``data.validation``, by time) and evaluated on that held-out period:
its pairs for query->item recall, the ``events_train`` impressions of the same period for
the content-interest AUC. The stage-1 embeddings are scored on the same data. The chosen
combination is the one with the highest score (``--select``); ``--final`` then trains it on
every training pair and reports it on the test files, next to stage 1.

The default score, ``balanced``, is the smaller of the two relative gains over stage 1: of
recall@k (``k`` the smallest of ``eval.ks``, 10 by default) and of the AUC's lift over chance,
``pair_auc - 0.5``. The issue's goal is an embedding better on *both* measures, so the
combination whose weaker side is strongest wins. A gain is ``1 + (trial - stage1) / d`` with
``d = max(|stage1|, 0.01)``: ``trial / stage1`` while stage 1 is at least one point (of recall,
or of AUC above chance); below that the ratio would be undefined or huge, and of the wrong
sign under a stage 1 worse than chance, so the difference is measured in points instead. A
trial equal to stage 1 thus scores exactly 1 on either side, better more, worse less. Any
metric name (``pair_auc``, ``recall@100``, ...) selects on it alone. Writes ``OUT/tune.json``
and ``OUT/TUNE.md``; re-running skips finished runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

# The smallest stage-1 value a gain is relative to (module docstring): one point.
GAIN_FLOOR = 0.01
# Settings csft-tune gives every run itself (a grid value would be overridden): key -> where
# the user sets it instead.
SET_BY_TUNE = {"data.validation": "--validation", "out": "a base override out=DIR (the trials run in "
               "OUT/trials/)", "data.feature_cache": "a base override (every trial shares one cache)",
               # the stage-1 row, the checks and every trial's scoring read the base's world and towers
               "data.world": "a base override (every trial is scored on one world)",
               "encoders": "a base override (every trial is compared with one stage-1 row)"}
# What a `mim csft-tune` run writes into its folder.
RUN_FILES = frozenset({"features", "trials", "stage1_validation", "stage1_test", "final", "tune.json", "TUNE.md"})


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "csft-tune", help="choose C-SFT settings (e.g. the temperature) on a validation split",
        description="Train one C-SFT run per --grid combination without the validation period, "
                    "score each there, keep the best; --final trains it on every pair and "
                    "evaluates it on the test files. Writes OUT/TUNE.md.")
    parser.add_argument("--config", default=None, help="YAML/JSON file of CsftConfig (the base)")
    parser.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                        help="values to try for one setting (repeat for a product of settings), "
                             "e.g. --grid loss.temperature=0.05,0.07,0.1")
    parser.add_argument("--validation", type=float, default=0.1,
                        help="share of the training pairs (the latest by time) held out (default 0.1)")
    parser.add_argument("--select", default="balanced",
                        help="score to maximise: balanced (default) or a metric name")
    parser.add_argument("--final", action="store_true",
                        help="train the chosen settings on every training pair and evaluate on the test files")
    parser.add_argument("overrides", nargs="*", help="base overrides: data.world=DIR encoders=DIR out=DIR ...")
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from mim_rec.utils.dist import current_rank

    report = run_tune(args.config, args.overrides, parse_grid(args.grid), args.validation,
                      args.select, args.final)
    if current_rank() == 0:
        print(format_tune(report))
    return 0


def parse_grid(specs: Sequence[str]) -> List[Tuple[str, List[str]]]:
    """``["loss.temperature=0.05,0.1", "data.signals=[click],[purchase]"]`` ->
    ``[("loss.temperature", ["0.05", "0.1"]), ("data.signals", ["[click]", "[purchase]"])]``
    (commas inside brackets belong to the value)."""
    from mim_rec.config import ConfigError
    grid = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2,...")
        parts, depth, current = [], 0, ""
        for char in values:
            depth += {"[": 1, "]": -1}.get(char, 0)
            if char == "," and depth == 0:
                parts.append(current)
                current = ""
            else:
                current += char
        parts.append(current)
        if any(not p.strip() for p in parts):
            raise ConfigError(f"--grid {spec!r}: empty value")
        if key.strip() in SET_BY_TUNE:
            raise ConfigError(f"--grid {spec!r}: csft-tune sets {key.strip()} for every run itself; "
                              f"give it as {SET_BY_TUNE[key.strip()]}")
        grid.append((key.strip(), [p.strip() for p in parts]))
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid names a setting twice: {keys}")
    return grid


def score(metrics: Dict[str, float], stage1: Dict[str, float], select: str) -> float:
    """The selection score of one run's validation metrics (see the module docstring)."""
    from mim_rec.config import ConfigError
    if select != "balanced":
        if select not in metrics:
            raise ConfigError(f"--select {select!r}: not a metric; expected balanced or one of "
                              f"{sorted(k for k, v in metrics.items() if isinstance(v, float))}")
        return float(metrics[select])
    from train.csft_runs import recall_columns
    recall = recall_columns(stage1)[0]
    return float(min(_gain(metrics[recall], stage1[recall]),
                     _gain(metrics["pair_auc"] - 0.5, stage1["pair_auc"] - 0.5)))


def _gain(value: float, baseline: float) -> float:
    """``value`` relative to ``baseline``, 1 when equal (see the module docstring)."""
    return 1.0 + (value - baseline) / max(abs(baseline), GAIN_FLOOR)


def run_tune(config_path, overrides: Sequence[str], grid: List[Tuple[str, List[str]]],
             validation: float, select: str = "balanced", final: bool = False) -> Dict:
    """Train and score every grid combination on the validation split (and the chosen one on
    the test files with ``final``); returns what ``OUT/tune.json`` holds."""
    from mim_rec.config import ConfigError, load_config, require_existing
    from mim_rec.csft.config import CsftConfig
    from mim_rec.csft.data import WorldInputs
    from mim_rec.utils.dist import launched_world_size
    from train.common import refuse_foreign_entries
    from train.csft import (INPUT_SETTINGS, check_config, check_training_inputs, evaluable_held_out, feature_cache,
                            untrainable)
    from train.csft_runs import csft_result, metric_columns, stage1_result

    if not 0 < validation < 1:  # 0 would mean the test files (WorldInputs.held_out); NaN fails too
        raise ConfigError(f"--validation {validation}: must lie strictly between 0 and 1 (the share of "
                          "the training pairs to choose on; csft-tune never chooses on the test files)")
    base = check_config(load_config(CsftConfig, config_path, overrides))
    # the metrics evaluation reports, named before the stage-1 pass extracts every feature
    selectable = ["balanced", *metric_columns({f"recall@{k}": None for k in base.eval.ks})]
    if select not in selectable:
        raise ConfigError(f"--select {select!r}: not a metric; expected one of {selectable}")
    require_existing(base, INPUT_SETTINGS)  # the flags' errors first, as for every setting
    out = Path(base.out)
    refuse_foreign_entries(out, "mim csft-tune", RUN_FILES)
    cache = feature_cache(base)
    shared = [*overrides, f"data.feature_cache={cache.folder}"]

    def config_of(settings: Sequence[str], folder: Path, held_out_share: float):
        return check_config(load_config(CsftConfig, config_path, [*shared, *settings, f"out={folder}",
                                                                  f"data.validation={held_out_share}"]))

    runs = []  # every combination's settings refused before any run trains
    for values in itertools.product(*(v for _, v in grid)):
        settings = [f"{key}={value}" for (key, _), value in zip(grid, values)]
        name = "_".join(f"{key.rsplit('.', 1)[-1]}-{value}" for (key, _), value in zip(grid, values))
        runs.append((name, settings, config_of(settings, out / "trials" / _safe(name), validation)))
    world = WorldInputs(base.data.world, cache, batch_size=base.eval.batch_size)
    for _, settings, config in runs:  # before any run trains: mid-grid, earlier runs had trained
        reason = untrainable(config, world, launched_world_size())
        if reason:
            raise ConfigError(f"--grid point {' '.join(settings)}: {reason}")
    # items and training queries the stage-1 tower cannot read, before the stage-1 pass (which
    # found them after loading the encoders) and before the held-out pairs, as csft-eval orders them
    check_training_inputs(world, base.encoders)
    # the data every run is scored on, before the stage-1 pass and any run: the test files were
    # read only after every grid point had trained, an unscorable events file after the pass
    valid = evaluable_held_out(world, validation, base.encoders)
    test = evaluable_held_out(world, 0.0, base.encoders) if final else None
    stage1 = stage1_result(config_of([], out, validation), world, valid, out / "stage1_validation")
    trials = []
    for name, settings, config in runs:
        metrics = csft_result(config, world, valid)
        trials.append({"name": name, "settings": settings, "metrics": metrics,
                       "score": score(metrics, stage1, select)})
    best = max(trials, key=lambda t: t["score"])
    report = {"validation": validation, "select": select, "validation_pairs": len(valid.pairs),
              "stage1": stage1, "trials": trials, "chosen": best["settings"]}
    if final:
        report["final"] = {"stage1": stage1_result(config_of([], out, 0.0), world, test, out / "stage1_test"),
                           "csft": csft_result(config_of(best["settings"], out / "final", 0.0), world, test)}
    from mim_rec.utils.dist import current_rank
    from mim_rec.utils.run import atomic_write_bytes
    if current_rank() == 0:
        atomic_write_bytes(out / "tune.json", json.dumps(report, indent=2).encode())
        atomic_write_bytes(out / "TUNE.md", (format_tune(report) + "\n").encode())
    return report


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def format_tune(report: Dict) -> str:
    """Markdown: the validation table (chosen row in bold) and, with --final, the test table."""
    from train.csft_runs import metric_columns
    columns = metric_columns(report["stage1"])

    def row(label: str, metrics: Dict, *extra: str) -> str:
        return "| " + " | ".join([label, *(f"{metrics[m]:.4f}" for m in columns), *extra]) + " |"

    def header(first: str, *extra: str) -> List[str]:
        names = [first, *columns, *extra]
        return ["| " + " | ".join(names) + " |", "|---" * len(names) + "|"]

    lines = [f"### Validation (latest {report['validation']:.0%} of the training pairs, "
             f"{report['validation_pairs']} pairs; select by {report['select']})", "",
             *header("settings", "score"), row("stage 1 (no C-SFT)", report["stage1"], "-")]
    for trial in report["trials"]:
        mark = "**" if trial["settings"] == report["chosen"] else ""
        lines.append(row(f"{mark}{' '.join(trial['settings'])}{mark}", trial["metrics"], f"{trial['score']:.4f}"))
    if "final" in report:
        final = report["final"]
        lines += ["", "### Test (the chosen settings trained on every training pair)", "",
                  *header("embeddings"), row("stage 1 (no C-SFT)", final["stage1"]),
                  row("C-SFT " + " ".join(report["chosen"]), final["csft"])]
    return "\n".join(lines)
