"""``mim experiment``: the paper's evaluation (Tables 2-6, Figures 5-6) on one world, as one
resumable command that writes ``OUT/report/REPORT.md`` with its plots.

Stages (each its own process, logged to ``OUT/logs/<stage>.log``, reused when its artifact
exists from the same command line, exactly as ``mim pipeline`` does, with which it shares the
first five stages and their folders):

1. synth (unless ``--world``), validate, pretrain, C-SFT (TorchX, 2 ranks), MFM table from the
   C-SFT item tower -- the representation chain of :mod:`train.pipeline`;
2. ``mfm_stage1``: a second MM table from the stage-1 encoders (the paper's "w/o C-SFT"), and on
   a synthetic world ``mfm_truth``, a third from its true item styles (the content ceiling);
3. ``ctr_grid``: every CiUBM run in one TorchX job (``mim train --grid``): Base and Base+MIM
   for each UBM and seed (Table 2, Figure 6), and DIN without content interest, without fusion
   interest and with the stage-1 table (Tables 3 and 5);
4. ``bench_train`` and ``bench_lookup``: the cost of each variant (Table 6);
5. ``pretrain_eval``: plain encoders, +DDA, +DDA+DMA (Table 3);
6. ``csft_tables``: every C-SFT variant against the stage-1 embeddings (Tables 4 and 5),
   on the C-SFT stage's backbone-feature cache.

``--tables`` runs a subset (the report says "not run" for the rest); the cheapest stages
come first so that a long run yields the CTR tables early.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from train.pipeline import BUILD, CIUBM, CSFT, MODELS, PRESETS as PIPELINE_PRESETS, PRETRAIN, STAGE_OVERRIDES, \
    Stage, check_ctr_settings, code_version, csft_feature_cache, mim_command, plan_stage, representation_chain, \
    require_chain_folder, run_chain, stage_record, torchx_command, world_folder

ALL_UBMS = ("avg", "din", "dien", "bst", "sim", "twin")
ALL_TABLES = (2, 3, 4, 5, 6)
ABLATION_UBM = "din"  # the UBM of the module ablations and of the encoder-stage CTR rows
# The `mim train` settings the experiment gives its CTR runs itself, and what sets each: in
# --ctr, one was overridden by every run's own value without a word, or changed what a run is.
PLAN_SETTINGS = {"seed": "--seeds", "model.ubm": "--ubms", "out": "--out (each run has its folder under it)",
                 "mm_table": "the mfm stages, which build each run's MM table",
                 "data.world": "--world",
                 "model.content_interest": "the runs themselves (Base, Base+MIM and the module ablations)",
                 "model.fusion_interest": "the runs themselves (Base, Base+MIM and the module ablations)"}


@dataclass(frozen=True)
class Preset:
    pipeline: str                    # the train.pipeline preset of the shared stages and CTR runs
    seeds: Tuple[int, ...]
    bench_train: Tuple[str, ...]     # `mim bench train` arguments (its world= is added)
    bench_lookup: Tuple[str, ...]    # `mim bench lookup` arguments (items, encoder, table added)
    ubms: Tuple[str, ...] = ALL_UBMS


PRESETS: Dict[str, Preset] = {
    # CI-sized: the tiny world, 2 seeds, one timed step per benchmark.
    "quick": Preset(pipeline="tiny", seeds=(0, 1), bench_train=("--quick",),
                    bench_lookup=("batch_size=8", "hist_len=5", "repeats=1", "lookup_repeats=5")),
    # The embedded default world, 3 seeds, the benchmark sizes of the README.
    "full": Preset(pipeline="default", seeds=(0, 1, 2),
                   bench_train=("threads=1", "batch_size=1024", "hist_len=30", "steps=3", "rounds=3",
                                "warmup=1"),
                   bench_lookup=("batch_size=64", "hist_len=20")),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("experiment", help="the paper's Tables 2-6 and Figures 5-6 in one report",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder (artifacts, logs, report/)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="stage sizes: quick (CI-sized, the default) or full (the paper-scale run)")
    parser.add_argument("--world", default=None, help="use this world/dataset folder instead of generating one")
    parser.add_argument("--tables", default=",".join(map(str, ALL_TABLES)),
                        help="comma-separated paper tables to produce (default: all of 2,3,4,5,6)")
    parser.add_argument("--ubms", default=None, help=f"comma-separated UBMs (default: {','.join(ALL_UBMS)})")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--ctr", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra `mim train` overrides for every CTR run (e.g. epochs=5 "
                             "loader.batch_size=256 for a small dataset); their runs go to their own folder. "
                             "Not what the experiment sets per run (seed, model.ubm, out, mm_table, data.world, "
                             "the interest switches)")
    for stage in ("pretrain", "csft"):
        parser.add_argument(f"--{stage}", nargs="+", default=[], metavar="KEY=VALUE",
                            help=f"overrides for the {stage} stage ({STAGE_OVERRIDES[stage]}) and its tables' "
                                 f"evaluation, after the preset's (e.g. --{stage} data.batch_size=8 on a small world)")
    parser.add_argument("--nproc", type=int, default=2,
                        help="ranks of the C-SFT and CiUBM jobs (TorchX local_cwd; default 2); must divide "
                             "C-SFT's data.batch_size")
    parser.add_argument("--dry-run", action="store_true", help="print each stage's command line and whether "
                                                               "it would be reused; run nothing")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the report from the stages and CTR runs that have "
                             "finished in OUT (e.g. while a long run is still going)")
    parser.set_defaults(func=_cli)


@dataclass
class Plan:
    """What one invocation runs: resolved from the preset and the command line."""
    out: Path
    preset_name: str
    preset: Preset
    world_arg: Optional[str]
    tables: Tuple[int, ...]
    ubms: Tuple[str, ...]
    seeds: Tuple[int, ...]
    nproc: int
    ctr_overrides: Tuple[str, ...] = ()
    pretrain_overrides: Tuple[str, ...] = ()
    csft_overrides: Tuple[str, ...] = ()

    @property
    def world(self) -> Path:
        return world_folder(self.out, self.world_arg)

    @property
    def ctr_dir(self) -> Path:
        """``OUT/ctr``, or ``OUT/ctr-<hash>`` for runs with ``--ctr`` overrides: other settings
        are other runs, kept beside the default ones instead of refused as foreign checkpoints."""
        if not self.ctr_overrides:
            return self.out / "ctr"
        return self.out / f"ctr-{hashlib.sha256(chr(0).join(self.ctr_overrides).encode()).hexdigest()[:8]}"

    @property
    def chain_preset(self) -> Dict[str, List[str]]:
        """The pipeline preset's stage settings with ``--pretrain`` and ``--csft``'s after them, so
        they win (a world with fewer C-SFT training items than the preset's batch needs a smaller one)."""
        preset = PIPELINE_PRESETS[self.preset.pipeline]
        return {**preset, "pretrain": [*preset["pretrain"], *self.pretrain_overrides],
                "csft": [*preset["csft"], *self.csft_overrides]}

    def settings(self) -> Dict[str, Any]:
        """Everything that decides the numbers, for the report."""
        return {"preset": self.preset_name, **asdict(self.preset), "ubms": list(self.ubms),
                "seeds": list(self.seeds), "tables": list(self.tables), "nproc": self.nproc,
                "ctr_overrides": list(self.ctr_overrides), "pretrain_overrides": list(self.pretrain_overrides),
                "csft_overrides": list(self.csft_overrides),
                "pipeline_preset": PIPELINE_PRESETS[self.preset.pipeline]}


def _cli(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    if not args.report_only:  # a report may read runs trained on another host's device
        for run in ctr_runs(plan):
            check_ctr_settings([*grid_overrides(plan), *run["overrides"]])
    if args.dry_run:
        todo = stages(plan)
        planned = run_chain(todo, plan.out, step=plan_stage)  # a stage after one that runs runs too
        for stage in todo:
            print(f"{stage.name} [{'reuse' if planned[stage.name][1] else 'run'}]: {' '.join(stage.argv)}")
        return 0
    results = run_experiment(plan, report_only=args.report_only)
    from mim_rec.report import write_report
    markdown = write_report(results, plan.out / "report")
    print(markdown)
    print(f"mim experiment: report in {plan.out / 'report' / 'REPORT.md'}")
    return 0


def _parse_list(text: Optional[str], kind, allowed: Optional[Sequence] = None, what: str = "") -> Optional[Tuple]:
    from mim_rec.config import ConfigError

    if text is None:
        return None
    try:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from exc
    unknown = [v for v in values if allowed is not None and v not in allowed]
    if unknown or not values:
        raise ConfigError(f"{what}: expected a comma-separated list of {list(allowed or [])}, got {text!r}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:  # a repeated seed would be two runs of one name, and a second sample in the report's std
        raise ConfigError(f"{what}: {', '.join(map(str, repeated))} given more than once in {text!r}")
    return values


def make_plan(args: argparse.Namespace) -> Plan:
    from mim_rec.config import ConfigError

    preset = PRESETS[args.preset]
    require_chain_folder(args.out, args.world)
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: the C-SFT and CiUBM jobs need at least one rank")
    check_ctr_overrides(args.ctr)
    return Plan(out=Path(args.out).resolve(), preset_name=args.preset, preset=preset, world_arg=args.world,
                tables=_parse_list(args.tables, int, ALL_TABLES, "--tables"),
                ubms=_parse_list(args.ubms, str, ALL_UBMS, "--ubms") or preset.ubms,
                seeds=_parse_list(args.seeds, int, None, "--seeds") or preset.seeds, nproc=args.nproc,
                ctr_overrides=tuple(args.ctr), pretrain_overrides=tuple(args.pretrain),
                csft_overrides=tuple(args.csft))


def check_ctr_overrides(overrides: Sequence[str]) -> None:
    """Refuse a ``--ctr`` setting the experiment sets per run (:data:`PLAN_SETTINGS`), naming
    what sets it instead."""
    from mim_rec.config import refuse_settings_set_elsewhere

    refuse_settings_set_elsewhere("--ctr", overrides, PLAN_SETTINGS, "the experiment, for each CTR run,")


# ------------------------------------------------------------------------------- the runs

def ctr_runs(plan: Plan) -> List[Dict[str, Any]]:
    """The CiUBM runs the chosen tables need: ``{"name", "overrides"}`` for ``mim train --grid``."""
    out = plan.out
    tables = set(plan.tables)
    runs: List[Dict[str, Any]] = []

    def add(name: str, ubm: str, seed: int, *overrides: str, table: Path = out / "mm_table") -> None:
        runs.append({"name": name, "overrides": [f"out={plan.ctr_dir / name}", f"model.ubm={ubm}", f"seed={seed}",
                                                 f"mm_table={table}", *overrides]})

    ubms = plan.ubms if 2 in tables else ()
    if tables & {3, 5} and ABLATION_UBM not in ubms:  # the DIN ablations compare with DIN's Base+MIM
        ubms = (*ubms, ABLATION_UBM)
    for seed in plan.seeds:  # Table 2 first: a run stopped part-way has its seeds complete
        for ubm in ubms:
            add(f"base_{ubm}_s{seed}", ubm, seed, *MODELS["base"])
            add(f"mim_{ubm}_s{seed}", ubm, seed, *MODELS["mim"])
    for seed in plan.seeds:
        if tables & {3, 5}:
            add(f"stage1table_{ABLATION_UBM}_s{seed}", ABLATION_UBM, seed, table=out / "mm_table_stage1")
        if 3 in tables and has_truth(plan):
            add(f"truthtable_{ABLATION_UBM}_s{seed}", ABLATION_UBM, seed, table=out / "mm_table_truth")
        if 5 in tables:
            add(f"nocontent_{ABLATION_UBM}_s{seed}", ABLATION_UBM, seed, "model.content_interest=false")
            add(f"nofusion_{ABLATION_UBM}_s{seed}", ABLATION_UBM, seed, "model.fusion_interest=false")
    return runs


def has_truth(plan: Plan) -> bool:
    """Whether the world has true item styles: a world this run synthesises, or one whose
    ``truth/`` folder ``mim data synth`` wrote (an imported dataset has none)."""
    return plan.world_arg is None or (plan.world / "truth" / "items.npz").is_file()


def _grid(out: Path, runs: List[Dict[str, Any]]) -> Tuple[Path, str]:
    """The grid's JSON and its file, named by a hash of the content, so another grid is another
    command. :func:`stages` only names the file (a dry run writes nothing); :func:`write_grid`
    writes it before the stages run."""
    text = json.dumps(runs, indent=1)
    return out / f"grid-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json", text


def grid_overrides(plan: Plan) -> List[str]:
    """The settings every CTR run of the grid gets, before its own: the world, the preset's,
    then ``--ctr``'s (which win)."""
    return [f"data.world={plan.world}", *PIPELINE_PRESETS[plan.preset.pipeline]["train"], *plan.ctr_overrides]


def write_grid(plan: Plan) -> None:
    runs = ctr_runs(plan)
    if runs:
        path, text = _grid(plan.out, runs)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


def stages(plan: Plan) -> List[Stage]:
    out, preset, tables = plan.out, plan.chain_preset, set(plan.tables)
    runs = ctr_runs(plan)
    ctr = {"ctr_grid": [[*grid_overrides(plan), *run["overrides"]] for run in runs]} if runs else {}
    world, chain = representation_chain(out, plan.world_arg, preset, plan.nproc, ctr)  # world == plan.world
    mim = mim_command()
    torchx, distributed = torchx_command(plan.nproc)
    encoders = out / "pretrain" / "encoders"
    result: List[Stage] = list(chain)
    if tables & {3, 5}:
        result.append(Stage("mfm_stage1", mim + ["embeddings", "build", f"world={world}", f"encoders={encoders}",
                                                 f"out={out / 'mm_table_stage1'}",
                                                 f"feature_cache={csft_feature_cache(out)}"],
                            out / "mm_table_stage1" / "manifest.json", BUILD, after=("synth", "validate", "pretrain"),
                            folder=out / "mm_table_stage1"))
    if 3 in tables and has_truth(plan):
        result.append(Stage("mfm_truth", mim + ["embeddings", "build", f"world={world}",
                                                f"encoders={world / 'truth'}", f"out={out / 'mm_table_truth'}"],
                            out / "mm_table_truth" / "manifest.json", BUILD, after=("synth", "validate"),
                            folder=out / "mm_table_truth"))
    if runs:
        grid, _ = _grid(out, runs)
        result.append(Stage("ctr_grid", torchx + ["torchx_components/mim.py:train_ciubm", *distributed, "--",
                                                  "--grid", str(grid), *grid_overrides(plan)],
                            plan.ctr_dir / runs[-1]["name"] / "metrics.json", CIUBM,
                            after=("synth", "validate", "mfm", "mfm_stage1", "mfm_truth")))
    if 6 in tables:
        result.append(Stage("bench_train", mim + ["bench", "train", "--json", str(out / "bench_train.json"),
                                                  f"world={world}", f"ubms=[{','.join(plan.ubms)}]",  # Table 6's
                                                  *plan.preset.bench_train],  # after the overrides: it holds flags
                            out / "bench_train.json", "train.bench_train:TrainBenchConfig", after=("synth", "validate")))
        result.append(Stage("bench_lookup", mim + [
            "bench", "lookup", "--json", str(out / "bench_lookup.json"), f"items={world / 'items.parquet'}",
            f"encoder={out / 'csft' / 'mm_encoder'}", f"mm_table={out / 'mm_table'}", *plan.preset.bench_lookup],
                            out / "bench_lookup.json", "train.bench_lookup:LookupBenchConfig",
                            after=("synth", "validate", "csft", "mfm")))
    if 3 in tables:
        result.append(Stage("pretrain_eval", mim + ["pretrain-eval", f"data.world={world}", f"out={out / 'pretrain'}",
                                                    *preset["pretrain"]], out / "pretrain" / "eval.json", PRETRAIN,
                                    after=("synth", "validate", "pretrain")))
    if tables & {3, 4, 5}:
        ablations = out / "csft_tables"
        result.append(Stage("csft_tables", mim + [
            "csft-ablations", f"data.world={world}", f"encoders={encoders}", f"out={ablations}",
            f"data.feature_cache={out / 'csft' / 'features'}", *preset["csft"]], ablations / "ablations.json",
            CSFT, after=("synth", "validate", "pretrain"), folder=ablations))
    return result


# ------------------------------------------------------------------------------- results

def _read_json(path: Path) -> Optional[Any]:
    """A result file, or None (reported as not run) when it is missing or torn."""
    from mim_rec.utils.run import read_json_or_none

    value = read_json_or_none(path)
    if value is None and path.is_file():
        print(f"warning: {path} is not whole JSON (a killed write?); its run counts as not run", file=sys.stderr)
    return value


def _ctr_metrics(plan: Plan, run: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """A CTR run's ``metrics.json`` when the run in its folder has the settings this plan gives
    it and read the data there now (as the grid's skip check compares them); otherwise None,
    said. Runs are read by name, so ``--report-only`` with another preset published another
    preset's numbers, and after a world or MM table rebuilt in place, the old data's."""
    from mim_rec.config import ConfigError
    from mim_rec.data.errors import DataError
    from train.ciubm import EXECUTION_ONLY, PATH_SETTINGS, changed_data, load_train_config
    from train.common import changed_settings

    path = plan.ctr_dir / run["name"] / "metrics.json"
    metrics, saved = _read_json(path), _read_json(path.parent / "config.json")
    if metrics is None or saved is None:  # not run, or no settings recorded to compare
        return metrics
    # the table's width is read from the table, not planned: the run's own, unless the plan sets one
    table_dim = (saved.get("model") or {}).get("mm_dim")
    try:
        config = load_train_config(None, [*([f"model.mm_dim={table_dim}"] if table_dim else []),
                                          *grid_overrides(plan), *run["overrides"]], check_device=False)
        changed = changed_settings(config, EXECUTION_ONLY, PATH_SETTINGS)
    except (ConfigError, DataError) as err:
        changed = [f"unreadable here ({err})"]
    if changed:
        print(f"warning: {path.parent} ran with other settings than this plan's (differs in: {', '.join(changed)}); "
              "its run counts as not run", file=sys.stderr)
        return None
    try:
        stale = changed_data(config, metrics)
    except OSError as err:  # an input gone since: what the run saw cannot be checked
        stale = [f"unreadable here ({err})"]
    if stale:
        print(f"warning: {path.parent} was trained or scored on other data ({', '.join(stale)} changed since); "
              "its run counts as not run", file=sys.stderr)
        return None
    return metrics


def _stage_result(todo: Dict[str, Stage], current: Set[str], name: str) -> Optional[Any]:
    """Stage ``name``'s artifact when its record is current (``current``: this plan's command
    line, defaults and inputs); otherwise None, said where an artifact is there. A stage the
    plan leaves out reads as None too. The artifact alone may be another preset's or another
    world's, which --report-only published under this plan's header."""
    stage = todo.get(name)
    if stage is None:
        return None
    if name not in current:
        if stage.done_marker.is_file():
            print(f"warning: {stage.done_marker} is not from this plan's {name} stage (other settings or inputs, "
                  "or a run that did not finish); it counts as not run", file=sys.stderr)
        return None
    return _read_json(stage.done_marker)


def collect_results(plan: Plan, todo: List[Stage], stage_walls: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Every number the report shows, read back from the artifacts of ``todo``'s stages whose
    records are current (those in ``stage_walls``)."""
    from mim_rec.data.manifest import world_age_caveat

    by_name, current = {stage.name: stage for stage in todo}, {wall["name"] for wall in stage_walls}
    return {"preset": plan.preset_name, "config": plan.settings(), "code": code_version(),
            "world": str(plan.world), "item_age_caveat": world_age_caveat(plan.world), "seeds": list(plan.seeds), "ubms": list(plan.ubms), "stages": stage_walls,
            "ctr": {run["name"]: _ctr_metrics(plan, run) for run in ctr_runs(plan)},
            "pretrain_eval": _stage_result(by_name, current, "pretrain_eval"),
            "csft": _stage_result(by_name, current, "csft_tables"),
            "bench_train": _stage_result(by_name, current, "bench_train"),
            "bench_lookup": _stage_result(by_name, current, "bench_lookup")}


def run_experiment(plan: Plan, report_only: bool = False) -> Dict[str, Any]:
    """Run (or reuse) every stage of ``plan``; write and return ``OUT/results.json``. With
    ``report_only``, run nothing and collect what has finished: stages that did not finish are
    left out of the stage table, and CTR runs without a ``metrics.json`` read as not run."""
    todo = stages(plan)  # checks the stages' settings (C-SFT's batch against --nproc) before anything is written
    plan.out.mkdir(parents=True, exist_ok=True)
    if not report_only:
        write_grid(plan)
    walls = []
    started = time.time()
    done = {} if report_only else run_chain(todo, plan.out)
    for index, stage in enumerate(todo, 1):
        record = stage_record(stage, plan.out)
        if report_only:
            print(f"[{index}/{len(todo)}] {stage.name}: {'finished' if record else 'not finished'}", flush=True)
            if record is None:
                continue
            wall, reused = record["wall_s"], True
        else:
            wall, reused = done[stage.name]
        walls.append({"name": stage.name, "wall_s": round(wall, 1), "reused": reused, "argv": stage.argv,
                      "code": (record or {}).get("code")})  # None: recorded before stages kept it
    results = collect_results(plan, todo, walls)
    results["wall_s_this_invocation"] = round(time.time() - started, 1)
    (plan.out / "results.json").write_text(json.dumps(results, indent=2))
    return results
