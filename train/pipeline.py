"""``mim pipeline``: the whole MIM chain on one world, as separate stages that exchange only
artifacts on disk -- synth -> validate -> pretrain -> C-SFT (``--nproc`` ranks, 2 by default,
through the TorchX ``csft`` component) -> MFM table from the C-SFT item tower -> CiUBM Base and
Base+MIM (as many ranks, through the TorchX ``train_ciubm`` component) -> report.

Each stage is a ``mim`` command run as its own process, logged to ``RUNDIR/logs/<stage>.log``.
A stage whose artifact exists and whose command line is unchanged since it last succeeded is
reused, so re-running after a failure (or a kill) continues where the chain stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from train.ciubm import TrainConfig

PRESETS: Dict[str, Dict[str, List[str]]] = {
    # ~15 min on 2 CPU cores: the default world, short pre-training, 150 CTR steps per model.
    "default": {"synth": [], "pretrain": ["dda_steps=20", "dma_steps=100"], "csft": [],
                "train": ["max_steps=150", "loader.batch_size=1024", "loader.max_hist_len=30"]},
    # ~3 min: the tiny world, for tests.
    "tiny": {"synth": ["--tiny"], "pretrain": ["dda_steps=2", "dma_steps=10", "data.batch_size=16"],
             "csft": ["steps=10", "data.batch_size=32", "negatives.queue_batches=2"],
             "train": ["epochs=2", "loader.batch_size=128", "loader.max_hist_len=20"]},
}
# The stages a user can pass settings to (`--csft data.batch_size=8`), by the preset key they extend.
STAGE_OVERRIDES = {"synth": "mim data synth", "pretrain": "mim pretrain", "csft": "mim csft",
                   "train": "mim train, both CiUBM runs"}
MODELS = {"base": ["model.content_interest=false", "model.fusion_interest=false"], "mim": []}
# The settings the chain gives each stage itself, by the flag whose settings may not override
# them (config.refuse_settings_set_elsewhere), and what sets each.
_WORLD = "--world (or the synth stage)"
CHAIN_SETTINGS: Dict[str, Dict[str, str]] = {
    "pretrain": {"data.world": _WORLD, "out": "--out (the encoders go to OUT/pretrain)"},
    "csft": {"data.world": _WORLD, "encoders": "the pretrain stage", "out": "--out (C-SFT goes to OUT/csft)",
             "data.feature_cache": "the chain: the MM table build reads OUT/csft/features"},
    "train": {"data.world": _WORLD, "mm_table": "the mfm stage, which builds it",
              "out": "--out (the runs go to OUT/base_<ubm> and OUT/mim_<ubm>)", "model.ubm": "--ubm",
              "model.content_interest": "the runs themselves (Base turns it off, Base+MIM keeps it)",
              "model.fusion_interest": "the runs themselves (Base turns it off, Base+MIM keeps it)"},
}


@dataclass
class Stage:
    name: str
    argv: List[str]
    done_marker: Path   # the artifact file whose presence means the stage finished
    # "module:Class" of the config the command resolves its settings from: its defaults decide
    # the artifact as much as the command line does (see :func:`defaults_fingerprint`).
    settings: Optional[str] = None
    # the stages whose artifacts this one reads: once one of them runs again, this one may not
    # be reused (see :func:`run_chain` and :func:`upstream_fingerprint`)
    after: Tuple[str, ...] = ()
    # a folder this stage reads that no stage of the chain writes (a world given with --world):
    # its content decides the reuse too, as a stage's artifact can be stale under the same command
    reads: Optional[Path] = None
    # the folder this stage alone writes: moved aside when the stage runs again under other
    # settings or inputs than its last finished run (see :func:`retire_stale_folder`)
    folder: Optional[Path] = None
    # what run_stage calls before this stage runs or is reused: the chain's refusal, once the
    # world is there, of what a later stage would refuse only when it started (check_batches)
    before: Optional[Callable[[], None]] = None

    @property
    def command(self) -> List[str]:
        """The arguments that decide the artifact: argv without its program path (``.venv/bin/
        python`` and ``.venv/bin/python3`` run the same stage)."""
        return self.argv[1:]


SYNTH, PRETRAIN, CSFT = "mim_rec.data.synth.config:SynthConfig", "mim_rec.pretrain.config:PretrainConfig", \
    "mim_rec.csft.config:CsftConfig"
BUILD, CIUBM = "train.embeddings_cmd:BuildConfig", "train.ciubm:TrainConfig"


def defaults_fingerprint(settings: Optional[str]) -> Optional[str]:
    """A fingerprint of the default values of ``settings`` ("module:Class"), or None. A stage
    record keeps it, so that a release which changes a default (a temperature, a pooling) does
    not reuse an artifact its command line alone says is current."""
    if settings is None:
        return None
    import importlib

    from mim_rec.data.manifest import fingerprint_config
    module, name = settings.split(":")
    return fingerprint_config(getattr(importlib.import_module(module), name)())


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pipeline", help="run the whole MIM chain on one world",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="run folder (artifacts, logs, REPORT.md)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="stage sizes: default (the default world, ~15 min on 2 CPU cores; the default) "
                             "or tiny (the tiny world, ~3 min, for tests)")
    parser.add_argument("--world", default=None, help="use this world folder instead of generating one")
    parser.add_argument("--ubm", default="din", help="user behaviour model for Base and Base+MIM (default: din)")
    parser.add_argument("--nproc", type=int, default=2,
                        help="ranks of the C-SFT and CiUBM jobs (TorchX local_cwd; default 2); must divide "
                             "C-SFT's data.batch_size")
    for stage, command in STAGE_OVERRIDES.items():
        parser.add_argument(f"--{stage}", nargs="+", default=[], metavar="KEY=VALUE",
                            help=f"overrides for the {stage} stage ({command}), after the preset's")
    parser.set_defaults(func=run)


def mim_command() -> List[str]:
    return [sys.executable, "-m", "train.cli"]


def torchx_command(nproc: int) -> List[str]:
    """``torchx run`` on the local_cwd scheduler with ``nproc`` ranks on this host."""
    return [str(Path(sys.executable).parent / "torchx"), "run", "--wait", "--log", "-s", "local_cwd"], \
        ["-j", f"1x{nproc}", "--cpu", str(nproc)]


def world_folder(out: Path, world_arg: Optional[str]) -> Path:
    """The world a run uses: the one given, or the one its synth stage writes into ``out``."""
    return Path(world_arg).resolve() if world_arg else out / "world"


def csft_feature_cache(out: Path) -> Path:
    """The C-SFT stage's backbone-feature cache, which the MM table builds read instead of
    running the frozen backbones over the catalogue again."""
    return out / "csft" / "features"


def representation_chain(out: Path, world_arg: Optional[str], preset: Dict[str, List[str]],
                         nproc: int, ctr: Dict[str, List[List[str]]]) -> Tuple[Path, List[Stage]]:
    """``(world, stages)`` up to the MM table: synth (unless a world is given), validate,
    pretrain, C-SFT (TorchX, ``nproc`` ranks) and MFM from the C-SFT item tower. ``mim
    experiment`` runs the same stages with the same command lines, so one run folder serves
    both commands without training anything twice. ``ctr`` holds the settings of each CiUBM
    run of the caller, by the stage that trains it: the world is checked to fill their batches,
    and those of pre-training and C-SFT, before pre-training runs (:func:`check_batches`)."""
    from mim_rec.config import ConfigError, refuse_settings_set_elsewhere

    if world_arg and not Path(world_arg).is_dir():  # else found by the validate stage, its log written
        raise ConfigError(f"--world {world_arg}: {'not a folder' if Path(world_arg).exists() else 'no such folder'}")
    for stage in ("pretrain", "csft"):
        refuse_settings_set_elsewhere(f"--{stage}", preset[stage], CHAIN_SETTINGS[stage], "the chain")
    mim = mim_command()
    world = world_folder(out, world_arg)
    pretrain_settings = [f"data.world={world}", f"out={out / 'pretrain'}", *preset["pretrain"]]
    csft_settings = [f"data.world={world}", f"encoders={out / 'pretrain' / 'encoders'}", f"out={out / 'csft'}",
                     *preset["csft"]]
    check_encoder_settings(pretrain_settings, csft_settings, nproc)
    plan = []
    if not world_arg:
        plan.append(Stage("synth", mim + ["data", "synth", "--out", str(world), *preset["synth"]],
                          world / "manifest.json", SYNTH, folder=world))
    # The world's gate: a given world whose files changed under the same path runs it again, and
    # with it every stage after it (each reads the world)
    plan.append(Stage("validate", mim + ["data", "validate", str(world)], out / "logs" / "validate.ok",
                      after=("synth",), reads=world))
    plan.append(Stage("pretrain", mim + ["pretrain", *pretrain_settings], out / "pretrain" / "encoders" / "manifest.json",
                      PRETRAIN, after=("synth", "validate"), folder=out / "pretrain",
                      before=partial(check_batches, pretrain_settings, csft_settings, nproc, ctr)))
    torchx, distributed = torchx_command(nproc)
    plan.append(Stage("csft", torchx + ["torchx_components/mim.py:csft", *distributed, *csft_settings],
                      out / "csft" / "mm_encoder" / "manifest.json", CSFT, after=("synth", "validate", "pretrain"),
                      folder=out / "csft"))
    plan.append(Stage("mfm", mim + ["embeddings", "build", f"world={world}",
                                    f"encoders={out / 'csft' / 'mm_encoder'}", f"out={out / 'mm_table'}",
                                    f"feature_cache={csft_feature_cache(out)}"],
                      out / "mm_table" / "manifest.json", BUILD, after=("synth", "validate", "csft"),
                      folder=out / "mm_table"))
    return world, plan


def stages(args: argparse.Namespace) -> List[Stage]:
    from mim_rec.config import ConfigError, refuse_settings_set_elsewhere

    out = Path(args.out).resolve()
    preset = {stage: [*argv, *getattr(args, stage)] for stage, argv in PRESETS[args.preset].items()}
    if args.world and args.synth:
        raise ConfigError("--synth: settings of the synth stage, which --world skips")
    refuse_settings_set_elsewhere("--train", preset["train"], CHAIN_SETTINGS["train"], "the chain")
    world = world_folder(out, args.world)
    torchx, distributed = torchx_command(args.nproc)
    ctr: Dict[str, List[List[str]]] = {}
    training: List[Stage] = []
    for model, switches in MODELS.items():
        run_dir = out / f"{model}_{args.ubm}"
        overrides = [f"data.world={world}", f"mm_table={out / 'mm_table'}", f"out={run_dir}", f"model.ubm={args.ubm}",
                     *preset["train"], *switches]
        check_ctr_settings(overrides)
        ctr[f"train_{model}"] = [overrides]
        training.append(Stage(f"train_{model}", torchx + ["torchx_components/mim.py:train_ciubm", *distributed,
                                                          *overrides],
                              run_dir / "metrics.json", CIUBM, after=("synth", "validate", "mfm"), folder=run_dir))
    _, plan = representation_chain(out, args.world, preset, args.nproc, ctr)
    return plan + training


def check_ctr_settings(overrides: Sequence[str]) -> TrainConfig:
    """Load one CiUBM run's settings as ``mim train`` will, before the chain starts: a bad key
    or value of the last stage was found only there, after pre-training and C-SFT. The MM
    table is built later in the chain, so a width stands in for the one read from it; what the
    device offers is checked by the ranks, whose device depends on how many share a host."""
    from train.ciubm import load_train_config

    return load_train_config(None, ["model.mm_dim=64", *overrides], check_device=False)


def check_batches(pretrain_settings: Sequence[str], csft_settings: Sequence[str], nproc: int,
                  ctr: Dict[str, List[List[str]]]) -> None:
    """Refuse a stage whose batch the world's data cannot fill (or C-SFT's ranks split), or a
    CTR run on events of one label (no AUC), with the stage's own message after its name: each
    stage refused it only when it started, the CiUBM runs after pre-training and C-SFT had run
    for minutes. Called once the world is there and validated, before pre-training (a
    synthesised world's counts are known only then), with each stage's own check on counts
    (and labels) read from the world's files; no model loads.
    ``ctr``: the settings of each CiUBM run, by the stage that trains it on ``nproc`` ranks."""
    import pyarrow.parquet as pq

    from mim_rec.config import ConfigError, load_config
    from mim_rec.csft.config import CsftConfig
    from mim_rec.csft.data import WorldInputs
    from mim_rec.data.errors import DataError
    from mim_rec.data.loader import batches_per_rank
    from mim_rec.pretrain.config import PretrainConfig
    from mim_rec.pretrain.corpus import heldout_mask
    from train import csft, pretrain
    from train.ciubm import require_both_labels

    config = load_config(PretrainConfig, None, pretrain_settings)
    items = pq.read_table(Path(config.data.world) / "items.parquet", columns=["item_id"])["item_id"].to_numpy()
    try:  # the stage is one process (mim pretrain)
        pretrain.training_batch(config, heldout_mask(items, config.data.heldout_fraction), 1)
    except ConfigError as err:
        raise ConfigError(f"stage 'pretrain': {err}") from err
    config = load_config(CsftConfig, None, csft_settings)
    try:
        reason = csft.untrainable(config, WorldInputs(config.data.world, csft.feature_cache(config)), nproc)
    except DataError as err:  # its pairs: none in a TAOBAO-MM import, which only mim train can use
        reason = str(err)
    if reason:
        raise ConfigError(f"stage 'csft': {reason}")
    for stage, runs in ctr.items():
        for overrides in runs:
            config = check_ctr_settings(overrides)
            events = Path(config.data.world) / "events_train.parquet"
            try:
                batches_per_rank(events, pq.read_metadata(events).num_rows, config.loader.batch_size, nproc)
                require_both_labels(config.data.world)
            except DataError as err:
                raise ConfigError(f"stage '{stage}': {err}") from err


def check_encoder_settings(pretrain_settings: Sequence[str], csft_settings: Sequence[str], nproc: int) -> None:
    """Load the pretrain and C-SFT stages' settings before the chain starts (the world they
    read may not exist yet: only the settings are checked), and C-SFT's batch against its
    ``nproc`` ranks, which C-SFT refused only after synth and pre-training had run."""
    from mim_rec.config import ConfigError, load_config
    from mim_rec.csft.config import CsftConfig
    from mim_rec.pretrain.config import PretrainConfig
    from train import csft, pretrain

    pretrain.check_config(load_config(PretrainConfig, None, pretrain_settings))
    csft_config = csft.check_config(load_config(CsftConfig, None, csft_settings))
    try:
        pretrain.check_batch_split(csft_config.data.batch_size, nproc)
    except ConfigError as err:
        raise ConfigError(f"--nproc {nproc}: the C-SFT stage's {err}; give --nproc a divisor of it, or "
                          f"C-SFT a multiple of {nproc} (--csft data.batch_size=...)") from err


def record_file(stage: Stage, out: Path) -> Path:
    """Where the record of ``stage``'s last successful run (its argv and wall time) is kept."""
    return out / "stages" / f"{stage.name}.json"


def upstream_fingerprint(stage: Stage, out: Path) -> Dict[str, Optional[str]]:
    """A digest of the record of each stage ``stage`` reads (:attr:`Stage.after`; None for one
    without a record), kept in ``stage``'s own record: every run rewrites its record, so a
    stage whose upstream ran since it did no longer matches. Without it, running again because
    an upstream stage ran held for one invocation only: a failed or killed re-run left the old
    record, which the next invocation reused with an artifact made from the old inputs."""
    import hashlib

    records = {name: out / "stages" / f"{name}.json" for name in stage.after}
    return {name: hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for name, path in records.items()}


def code_version() -> Dict[str, object]:
    """The commit the code runs from, and whether the tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]

    def git(*argv: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def stage_record(stage: Stage, out: Path) -> Optional[Dict[str, object]]:
    """The record of the finished run that made ``stage``'s artifact with the same command, the
    same defaults and the upstream stages' current records, or None."""
    from mim_rec.utils.run import read_json_or_none

    record = read_json_or_none(record_file(stage, out))
    return record if _reusable(record, stage, out) else None


def _reusable(record: Optional[Dict[str, object]], stage: Stage, out: Path) -> bool:
    """Whether ``record`` (``stage``'s as read; None: there is none) shows the stage's artifact
    finished (its done marker is there) by the run it would be now (:func:`_describes`)."""
    return record is not None and stage.done_marker.exists() and _describes(record, stage, out)


def _describes(record: Dict[str, object], stage: Stage, out: Path) -> bool:
    """Whether ``record`` was made by ``stage``'s command, under its defaults, from its inputs
    as they are now. A record from before these fields has no "reads" (accepted) and no
    "upstream" (accepted only for a stage that reads no other stage: its inputs cannot be
    checked)."""
    return record["argv"][1:] == stage.command and record.get("defaults") == defaults_fingerprint(stage.settings) \
        and record.get("reads") in (None, _reads_fingerprint(stage)) \
        and record.get("upstream", {}) == upstream_fingerprint(stage, out)


def retire_stale_folder(stage: Stage, out: Path, record: Optional[Dict[str, object]]) -> Optional[Path]:
    """Move ``stage``'s folder to ``OUT/replaced/<stage>-<time>`` when its last finished run,
    whose ``record`` (as read; None: none) the caller has read, had other settings or inputs;
    return where it went (None when nothing was moved).

    Its trainer refuses a folder holding another configuration's checkpoints, so a changed
    setting in a run folder used to fail that stage after the stages before it had run again.
    The folder is moved, never deleted (it may hold hours of training), under the folder lock
    the trainers take, so a run still writing it is refused rather than moved from under it.
    The stale record goes too: a re-run killed in turn then resumes in the new folder."""
    from mim_rec.utils.run import run_folder_lock

    if stage.folder is None or not stage.folder.is_dir() or record is None or _describes(record, stage, out):
        return None
    target = out / "replaced" / f"{stage.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(stage.folder):
        stage.folder.rename(target)
    record_file(stage, out).replace(target / "stage_record.json")
    return target


def _reads_fingerprint(stage: Stage) -> Optional[str]:
    from mim_rec.data.manifest import fingerprint_tree
    return fingerprint_tree(stage.reads) if stage.reads is not None and stage.reads.exists() else None


def run_stage(stage: Stage, out: Path, index: int, total: int, reuse: bool = True) -> Tuple[float, bool]:
    """Run ``stage`` unless its artifact is there from the same command (and ``reuse``); return
    ``(its wall time, whether it was reused)`` (a reused stage reports the wall time of the run
    that made it)."""
    from mim_rec.utils.run import atomic_write_bytes, read_json_or_none

    if stage.before is not None:
        stage.before()
    record = read_json_or_none(record_file(stage, out))  # read once: both reuse and retirement judge it
    if reuse and _reusable(record, stage, out):
        print(f"[{index}/{total}] {stage.name}: reused ({record['wall_s']:.0f} s when it ran)", flush=True)
        return record["wall_s"], True
    retired = retire_stale_folder(stage, out, record)
    if retired is not None:
        print(f"[{index}/{total}] {stage.name}: its last run had other settings or inputs; its folder was "
              f"moved to {retired}", flush=True)
    log = out / "logs" / f"{stage.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{index}/{total}] {stage.name}: running (log: {log})", flush=True)
    started = time.time()
    version = code_version()  # of the code the stage starts with
    upstream = upstream_fingerprint(stage, out)  # the inputs it starts with
    code, stopped = run_logged(stage.argv, log)
    wall = time.time() - started
    if stopped:
        raise SystemExit(f"mim pipeline: stage '{stage.name}' stopped by SIGTERM (passed on to it, exit {code}) "
                         f"after {wall:.0f} s; log: {log}; run the same command to go on")
    if code != 0:  # the log may be cut inside a character (a killed writer): replace, never fail here
        raise SystemExit(f"mim pipeline: stage '{stage.name}' failed (exit {code}) after {wall:.0f} s; "
                         f"log: {log}\n" + failure_lines(log.read_text(errors="replace")))
    if stage.name == "validate":
        stage.done_marker.write_text("ok\n")
    record_path = record_file(stage, out)
    atomic_write_bytes(record_path, json.dumps({"argv": stage.argv, "wall_s": wall, "code": version,
                                                "defaults": defaults_fingerprint(stage.settings),
                                                "reads": _reads_fingerprint(stage), "upstream": upstream}).encode())
    print(f"[{index}/{total}] {stage.name}: done in {wall:.0f} s", flush=True)
    return wall, False


def run_logged(argv: Sequence[str], log: Path) -> Tuple[int, bool]:
    """Run ``argv`` from the repository root with its output in ``log``: ``(its exit status,
    whether a SIGTERM stopped it)``. A SIGTERM to the pipeline (``kill PID``, a batch scheduler)
    is passed on to the stage, and the pipeline waits for it to end: it used to end the pipeline
    at once and leave the stage running, and a TorchX stage's ranks, in process groups of their
    own, kept writing the run folder beside the ranks of a re-run. (A Ctrl-C reaches the stage
    without help: it is in the terminal's process group.)"""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONUNBUFFERED="1")
    stopped: List[int] = []
    with log.open("w") as fh, subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                               cwd=Path(__file__).resolve().parents[1]) as process:
        def forward(signum: int, _frame: object) -> None:
            stopped.append(signum)
            process.send_signal(signum)

        previous = signal.signal(signal.SIGTERM, forward)
        try:
            return process.wait(), bool(stopped)
        finally:
            signal.signal(signal.SIGTERM, previous)


def plan_stage(stage: Stage, out: Path, index: int, total: int, reuse: bool = True) -> Tuple[float, bool]:
    """What :func:`run_stage` would do, running nothing: ``(the recorded wall time, True)`` for a
    stage it would reuse, ``(0.0, False)`` for one it would run. :func:`run_chain` with it
    decides as a real run does (``mim experiment --dry-run``)."""
    record = stage_record(stage, out) if reuse else None
    return (record["wall_s"], True) if record is not None else (0.0, False)


def failure_lines(log: str, tail: int = 15) -> str:
    """What to show of a failed stage's log: the ``mim ...: error:`` lines the commands print
    (under TorchX they sit above torchrun's own failure report, which names no cause), then the
    log's last lines."""
    lines = log.splitlines()
    errors = [line for line in lines[:-tail] if re.search(r"\bmim [\w-]+(?: [\w-]+)?: error: ", line)]
    return "\n".join([*errors, *(["..."] if errors else []), *lines[-tail:]])


def report(out: Path, ubm: str, walls: Dict[str, float], world: Path) -> str:
    """REPORT.md: Base vs Base+MIM AUC overall, GAUC and by item-age bucket (with the world's
    caveat where its ages are not calendar ages), with stage times."""
    from mim_rec.metrics import relative_auc_gain

    base = json.loads((out / f"base_{ubm}" / "metrics.json").read_text())
    mim = json.loads((out / f"mim_{ubm}" / "metrics.json").read_text())

    def cell(x: Optional[float]) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    lines = [f"# MIM pipeline report ({ubm})", "",
             "| model | AUC | GAUC | logloss | test rows (clicks) |", "|---|---|---|---|---|"]
    for name, m in (("Base", base), ("Base+MIM", mim)):
        clicks = "?" if m.get("positives") is None else f"{m['positives']:,}"  # a run from before the count
        lines.append(f"| {name} | {cell(m['auc'])} | {cell(m['gauc'])} | {cell(m['logloss'])} | {m['n']:,} ({clicks}) |")
    lines += ["", "AUC by item age at impression (S1 newest ... S10 oldest); buckets from Base's edges. "
              "n/a: the bucket's test rows are all clicks or all non-clicks, or there are none:", "",
              "| bucket | test rows (clicks) | Base | Base+MIM | Δ |", "|---|---|---|---|---|"]
    try:
        gains = relative_auc_gain(base, mim)
        for g in gains:
            clicks = "?" if g["positives"] is None else f"{g['positives']:,}"
            lines.append(f"| {g['bucket']} | {g['n']:,} ({clicks}) | {cell(g['base_auc'])} | {cell(g['auc'])} "
                         f"| {cell(g['auc_gain'])} |")
    except ValueError as exc:  # the two runs bucketed differently
        lines.append(f"| (not comparable: {exc}) | | | | |")
    from mim_rec.data.manifest import world_age_caveat
    caveat = world_age_caveat(world)
    if caveat:
        lines += ["", f"**These buckets are not item ages on this world:** {caveat}."]
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()),
              f"Total: {sum(walls.values()) / 60:.1f} min"]
    text = "\n".join(lines) + "\n"
    (out / "REPORT.md").write_text(text)
    return text


def run_chain(plan: List[Stage], out: Path,
              step: Callable[[Stage, Path, int, int, bool], Tuple[float, bool]] = run_stage
              ) -> Dict[str, Tuple[float, bool]]:
    """Run the stages in order with ``step`` (:func:`plan_stage` for a dry run):
    ``{name: (wall time, reused)}``. A stage one of whose
    :attr:`Stage.after` ran in this call runs too, as its inputs may have changed (a new
    ``--synth seed`` used to re-run synth and reuse every later stage, made from the old
    world); that holds along the chain, and in later calls too: until it succeeds, its record
    names the upstream records it was made from (:func:`upstream_fingerprint`). A stage whose
    folder holds checkpoints of the old inputs is then refused by its own trainer, which asks
    for a fresh folder."""
    done: Dict[str, Tuple[float, bool]] = {}
    for index, stage in enumerate(plan, 1):
        reuse = not any(name in done and not done[name][1] for name in stage.after)
        done[stage.name] = step(stage, out, index, len(plan), reuse)
    return done


# What a chain (mim pipeline, mim experiment) writes into its run folder from its first stage on.
CHAIN_MARKERS = ("logs", "stages")


def require_chain_folder(out: str, world: Optional[str]) -> None:
    """Refuse an ``--out`` that is a file, or a folder holding files but no chain's
    :data:`CHAIN_MARKERS` (dot files aside, and the ``--world`` the chain reads, which may lie
    there): the chain wrote its stages' folders among another run's files (``--out`` a pretrain
    run), and that run's own stage then refused its folder."""
    from mim_rec.config import ConfigError
    from mim_rec.utils.run import some_names, visible_entries

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {out} is a file, not a run folder")
    read = {Path(world).resolve()} if world else set()
    held = [p.name for p in visible_entries(folder) if p.resolve() not in read]
    if held and not set(held) & set(CHAIN_MARKERS):
        raise ConfigError(f"--out {out}: holds {some_names(held)} and no "
                          f"chain's {' or '.join(f'{m}/' for m in CHAIN_MARKERS)}, so it is not a run folder of "
                          "mim pipeline or mim experiment; use a new or empty folder")


def run(args: argparse.Namespace) -> int:
    from mim_rec.config import ConfigError

    out = Path(args.out).resolve()
    require_chain_folder(args.out, args.world)
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: the C-SFT and CiUBM jobs need at least one rank")
    plan = stages(args)  # every stage's settings are checked here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    walls = {name: wall for name, (wall, _) in run_chain(plan, out).items()}
    print(report(out, args.ubm, walls, world_folder(out, args.world)))
    return 0
