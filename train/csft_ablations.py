"""``mim csft-ablations``: the paper's C-SFT tables on one world, in one command.

Runs C-SFT once per variant (each a set of ``key=value`` overrides of ``CsftConfig`` on top of
the user's own), all on the same stage-1 encoders and one shared backbone-feature cache, and
evaluates each with ``csft-eval``'s measures next to the stage-1 embeddings (the paper's
"w/o C-SFT" row). Variants:

* Table 5 (ablations): the full method, w/o TFN (concatenation), w/o ST-NSG (in-batch
  negatives of one rank only), w/o multi-level InfoNCE (``alpha = beta = 0``).
* Table 4 (signals and objectives): category classification (interest-irrelevant), click /
  purchase pairs with a pairwise cross-entropy classifier or with InfoNCE.

Every variant is its own run folder under ``OUT/``, so a re-run resumes and a finished
variant is not trained again (its result is kept with its configuration's fingerprint).
Writes ``OUT/ablations.json`` and ``OUT/ABLATIONS.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

# (name, table, overrides). "full" is the default configuration: purchase pairs, TFN,
# multi-level InfoNCE, ST-NSG. The click pairs are every pair, the purchased ones included.
VARIANTS: Tuple[Tuple[str, str, Tuple[str, ...]], ...] = (
    ("full", "both", ()),
    ("no_tfn", "ablation", ("model.fusion.kind=concat",)),
    ("no_st_nsg", "ablation", ("negatives.hard=false", "negatives.queue_batches=0",
                               "negatives.all_gather=false")),
    ("no_multi_level", "ablation", ("loss.alpha=0", "loss.beta=0")),
    ("category_ce", "signals", ("loss.kind=category_ce",)),
    ("click_ce", "signals", ("data.signals=[click]", "loss.kind=pairwise_ce")),
    ("purchase_ce", "signals", ("loss.kind=pairwise_ce",)),
    ("click_infonce", "signals", ("data.signals=[click]",)),
)
# What a `mim csft-ablations` run writes into its folder: a folder per variant and the stage-1 row's.
RUN_FILES = frozenset({"features", "stage1", "ablations.json", "ABLATIONS.md", *(v[0] for v in VARIANTS)})
LABELS = {"stage1": "w/o C-SFT (stage-1 embeddings)", "full": "C-SFT (purchase, InfoNCE, TFN, ST-NSG)",
          "no_tfn": "w/o TFN (concat fusion)", "no_st_nsg": "w/o ST-NSG (in-batch negatives only)",
          "no_multi_level": "w/o multi-level InfoNCE (q2item only)",
          "category_ce": "category CE (interest-irrelevant)", "click_ce": "click pairs, CE",
          "purchase_ce": "purchase pairs, CE", "click_infonce": "click pairs, InfoNCE"}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "csft-ablations", help="C-SFT variants (paper Tables 4 and 5) vs stage 1, one table",
        description="Train and evaluate every C-SFT variant on the same encoders and world; "
                    "writes OUT/ABLATIONS.md. Re-running skips finished variants.")
    parser.add_argument("--config", default=None, help="YAML/JSON file of CsftConfig (the base)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated variants (default: all of {[v[0] for v in VARIANTS]})")
    parser.add_argument("overrides", nargs="*", help="base overrides: data.world=DIR encoders=DIR "
                                                     "out=DIR steps=N ...")
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from mim_rec.config import ConfigError
    from mim_rec.utils.dist import current_rank
    names = [v[0] for v in VARIANTS]
    chosen = names if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; expected some of {names}")
    report = run_ablations(args.config, args.overrides, chosen)
    if current_rank() == 0:
        print(format_ablations(report))
    return 0


def run_ablations(config_path, overrides: Sequence[str], variants: Sequence[str]) -> Dict[str, Dict]:
    """Train/evaluate ``variants`` (names from :data:`VARIANTS`); returns name -> metrics.

    The tables also show every other variant whose result in ``out`` is of this configuration
    and data (an earlier run, e.g. with another ``--only``), so running the variants a few at a
    time builds the whole table rather than replacing it."""
    from mim_rec.config import ConfigError, load_config
    from mim_rec.csft.config import CsftConfig
    from mim_rec.csft.data import WorldInputs
    from mim_rec.utils.dist import current_rank, launched_world_size
    from mim_rec.utils.run import atomic_write_bytes
    from train.common import refuse_foreign_entries
    from train.csft import (check_config, check_training_inputs, evaluable_held_out, feature_cache, load_checked,
                            note_catalogue_size, untrainable)
    from train.csft_runs import csft_fingerprint, csft_result, saved_result, stage1_result

    base = load_checked(config_path, overrides)
    out = Path(base.out)
    refuse_foreign_entries(out, "mim csft-ablations", RUN_FILES)
    cache = feature_cache(base)
    # every variant's settings are checked before any variant trains
    configs = {name: check_config(load_config(CsftConfig, config_path, [*overrides, *variant, f"out={out / name}",
                                                                        f"data.feature_cache={cache.folder}"]))
               for name, _, variant in VARIANTS}
    # out= is made by its first write (each write makes its folder): encoders= or a world refused below leave none
    world = WorldInputs(base.data.world, cache, batch_size=base.eval.batch_size)
    held_out = evaluable_held_out(world, base.data.validation, base.encoders)  # unscorable: refused before stage 1
    check_training_inputs(world, base.encoders)  # so are items and training queries the stage-1 tower cannot read
    note_catalogue_size(world, base.eval.ks)
    reason = untrainable(configs["full"], world, launched_world_size())
    if reason:  # the base settings themselves: no variant's row would mean anything
        raise ConfigError(reason)
    report: Dict[str, Dict] = {"stage1": stage1_result(base, world, held_out, out / "stage1")}
    for name, _, variant in VARIANTS:
        config = configs[name]
        reason = untrainable(config, world, launched_world_size())
        if reason:
            print(f"note: variant {name} not run: {reason}", file=sys.stderr)
            continue
        result = csft_result(config, world, held_out) if name in variants else \
            saved_result(out / name, csft_fingerprint(config, held_out))
        if result is not None:
            report[name] = {**result, "overrides": list(variant)}
    if current_rank() == 0:
        atomic_write_bytes(out / "ablations.json", json.dumps(report, indent=2).encode())
        atomic_write_bytes(out / "ABLATIONS.md", (format_ablations(report) + "\n").encode())
    return report


def format_ablations(report: Dict[str, Dict]) -> str:
    """Markdown: Table 5 (ablations) and Table 4 (signals/objectives), each with stage 1."""
    from train.csft_runs import metric_columns
    columns = metric_columns(report["stage1"])
    sections: List[str] = []
    for title, tables in (("Ablations (paper Table 5)", ("both", "ablation")),
                          ("Signals and objectives (paper Table 4)", ("both", "signals"))):
        rows = ["stage1"] + [n for n, table, _ in VARIANTS if table in tables and n in report]
        lines = [f"### {title}", "", "| variant | overrides | " + " | ".join(columns) + " |",
                 "|---|---|" + "---|" * len(columns)]
        for name in rows:
            metrics = report[name]
            overrides = " ".join(metrics.get("overrides", [])) or "-"
            lines.append(f"| {LABELS[name]} | `{overrides}` | "
                         + " | ".join(f"{metrics[m]:.4f}" for m in columns) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)
