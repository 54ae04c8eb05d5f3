"""``mim train``: train and evaluate CiUBM (stage 3) with TorchRec.

One loop over :class:`~mim_rec.data.loader.CtrEventsLoader` batches, each step run by
TorchRec's ``TrainPipelineSparseDist`` (``train_pipeline=sparse_dist``, the default) or a plain
copy/forward/backward/step (``train_pipeline=plain``): the model is a
``DistributedModelParallel`` over a plan from TorchRec's planner (per-table constraints from
the config), the ID tables train with a fused optimizer inside the backward pass, the dense
part with Adam, and the MM table never trains. Checkpoints are
``torch.distributed.checkpoint`` (DCP) folders; re-running the same command resumes exactly
where the last one stopped (every step reseeds torch from ``(seed, step, rank)``, and the
data order is a pure function of ``(loader.seed, epoch)``: runs of other ``seed`` train on the
same batches in the same order).

Run as one process, or under ``torchrun``/TorchX (gloo on CPU, nccl on GPU)::

    mim train data.world=runs/world mm_table=runs/mm_table out=runs/din model.ubm=din
    torchrun --nproc-per-node 2 -m train.cli train --config din.yaml out=runs/din
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

from mim_rec.ciubm.config import ModelConfig
from mim_rec.data.loader_config import LoaderConfig
from mim_rec.utils.text import counted

if TYPE_CHECKING:  # annotations only; the functions import what they run, as elsewhere in this module
    import torch

    from mim_rec.data.loader import CtrBatch

COMMAND_HELP = "train and evaluate the CiUBM CTR model (stage 3)"


@dataclass
class DataPaths:
    world: str = ""                # world folder: items.parquet, events_train/test.parquet


@dataclass
class TrainConfig:
    data: DataPaths = field(default_factory=DataPaths)
    mm_table: Optional[str] = None     # representation-center table folder; None = random stand-in
    mm_missing: Literal["error", "default"] = "error"  # items the table lacks: zero vector, counted
    rim_log: Optional[str] = None      # RIM window-message log: new items' rows applied to the live MM table
    rim_apply_every: int = 50          # steps between two applies of rim_log (and once before evaluation)
    out: str = "runs/ciubm"
    model: ModelConfig = field(default_factory=ModelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    epochs: int = 1
    max_steps: Optional[int] = None    # stop after this many steps (all epochs together)
    lr: float = 0.005                  # dense Adam (paper: Adam, lr 0.005, batch 1024)
    id_lr: float = 0.05                # fused optimizer of the ID tables
    checkpoint_every: int = 200
    checkpoint_keep: int = 2           # newest checkpoints kept; each holds its copy of the MM table shards
    log_every: int = 20
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda
    train_pipeline: Literal["sparse_dist", "plain"] = "sparse_dist"  # TorchRec's TrainPipelineSparseDist, or a plain loop


# Sizes, step intervals and learning rates: 0 or less is a mistake, never a way to switch off.
POSITIVE_SETTINGS = ("epochs", "max_steps", "lr", "id_lr", "checkpoint_every", "checkpoint_keep", "log_every",
                     "rim_apply_every",
                     "loader.batch_size", "loader.max_hist_len", "loader.shuffle_row_groups")
# ... and these may be 0 (seed 0), never negative or NaN.
NOT_NEGATIVE_SETTINGS = ("seed", "loader.seed")
# The model's own, checked by check_model, so the benches that build a CiUBM refuse them too.
MODEL_POSITIVE_SETTINGS = ("item_dim", "category_dim", "user_dim", "query_dim", "mm_dim", "query_buckets",
                           "mm_projection")
MODEL_NOT_NEGATIVE_SETTINGS = ("dien_aux_weight", "mm_whiten")  # 0: the weight or the whitening off


def load_train_config(path: Optional[str], overrides, check_device: bool = True) -> TrainConfig:
    """A validated TrainConfig from a file and ``key=value`` overrides. ``check_device=False``
    reads settings to compare with a recorded run (a report on another host), not to train:
    what this host's device offers does not apply."""
    from mim_rec.config import ConfigError, load_config, require_not_negative, require_positive

    config = load_config(TrainConfig, path, overrides)
    if not config.data.world:
        raise ConfigError("data.world: the world folder (items.parquet, events_*.parquet) is required")
    if not config.out or Path(config.out).is_file():
        raise ConfigError(f"out={config.out!r}: a run folder is required, not a file or nothing")
    require_positive(config, POSITIVE_SETTINGS)
    require_not_negative(config, NOT_NEGATIVE_SETTINGS)
    check_model(config.model)
    match_loader_to_model(config.loader, config.model)
    if config.model.mm_dim is None:
        config.model.mm_dim = _table_dim(config.mm_table)
    if config.rim_log and not (config.mm_table and config.model.uses_mm):
        raise ConfigError("rim_log: RIM rows are applied to the MM table, so they need mm_table=DIR "
                          "(the table they extend) and a model that uses it")
    from mim_rec.ciubm.sparse import MM_TABLE
    chosen = config.model.constraints.get(MM_TABLE)
    if chosen is not None and chosen.compute_kernels:  # on any device, so before what this one offers
        require_rim_writable(config, chosen.compute_kernels,
                             f"model.constraints.{MM_TABLE}.compute_kernels={chosen.compute_kernels}")
    if check_device:
        check_sharding_device(config.model, config.device)
    return config


# MM-table kernels whose state-dict tensor is the storage every lookup reads, so a RIM row
# written there is what the model looks up. A caching kernel (fused_uvm_caching, the key-value
# and virtual tables) looks rows up in a GPU cache that the write misses, and its next
# state_dict() flushes that cache back over the new rows (TorchRec's pre-state-dict hook).
RIM_WRITABLE_KERNELS = ("dense", "fused", "fused_uvm")


def require_rim_writable(config: TrainConfig, kernels: Sequence[str], named_by: str) -> None:
    """Refuse ``rim_log`` with an MM-table kernel (``kernels``, set by ``named_by``) whose
    rows the live apply cannot write (:data:`RIM_WRITABLE_KERNELS`)."""
    from mim_rec.ciubm.sparse import MM_TABLE
    from mim_rec.config import ConfigError

    cached = [kernel for kernel in kernels if kernel not in RIM_WRITABLE_KERNELS]
    if config.rim_log and cached:
        raise ConfigError(f"rim_log={config.rim_log} with {named_by}: the live apply writes the MM table's "
                          f"storage, and a {cached[0]} table looks rows up in a GPU cache that the write misses "
                          "(its next checkpoint flushes the cache back over them); set "
                          f"model.constraints.{MM_TABLE}.compute_kernels=[fused] (or [fused_uvm])")


def match_loader_to_model(loader, model: ModelConfig) -> None:
    """Give the loader the model's query hash range and behaviour layout, in place: the loader
    hashes query words into ``query_buckets`` ids that index the model's query table, and lays
    out behaviours as the model's collections read them. A ``loader.query_buckets`` or
    ``loader.sequence_layout`` set to another value is refused (it was dropped without a word);
    ``model.query_buckets`` and ``model.sequence_layout`` set both."""
    from mim_rec.config import ConfigError

    if loader.query_buckets not in (model.query_buckets, LoaderConfig.query_buckets):
        raise ConfigError(f"loader.query_buckets={loader.query_buckets}: the loader hashes query words into the "
                          f"model's query table; set model.query_buckets (now {model.query_buckets}) instead")
    if loader.sequence_layout not in (model.sequence_layout, LoaderConfig.sequence_layout):
        raise ConfigError(f"loader.sequence_layout={loader.sequence_layout}: the loader lays out behaviours as the "
                          f"model's tables read them; set model.sequence_layout (now {model.sequence_layout}) instead")
    loader.query_buckets, loader.sequence_layout = model.query_buckets, model.sequence_layout


def check_model(model: ModelConfig) -> None:
    """Refuse, by key, a CiUBM that TorchRec, FBGEMM or the UBM would refuse later (after the
    process group is up, with a traceback). Every command that builds one calls this first:
    ``mim train`` and the benches that time or compare it."""
    from mim_rec.ciubm.sparse import FBGEMM_COLUMN_ALIGNMENT
    from mim_rec.config import ConfigError, require_not_negative, require_positive
    from mim_rec.ubm import available_ubms

    # A dim of 0 passed the alignment check below and failed in TorchRec's planner (a division by zero).
    require_positive(model, MODEL_POSITIVE_SETTINGS, prefix="model.")
    require_not_negative(model, MODEL_NOT_NEGATIVE_SETTINGS, prefix="model.")
    for key in ("item_dim", "category_dim", "user_dim", "query_dim"):
        if getattr(model, key) % FBGEMM_COLUMN_ALIGNMENT:
            raise ConfigError(f"model.{key}={getattr(model, key)}: FBGEMM's embedding kernels need a "
                              f"multiple of {FBGEMM_COLUMN_ALIGNMENT}")
    if model.ubm not in available_ubms():
        raise ConfigError(f"model.ubm={model.ubm!r}: choose one of {', '.join(available_ubms())}")
    if not (model.id_interest or model.uses_mm):
        raise ConfigError("model.id_interest, model.content_interest and model.fusion_interest are all false: "
                          "CiUBM needs at least one interest module")
    _check_model_shape(model)
    if model.uses_mm:
        from mim_rec.ciubm.sparse import mm_data_type
        mm_data_type(model.mm_dtype)  # an unsupported storage precision fails here, with its reason


def _check_model_shape(model: ModelConfig) -> None:
    """Refuse, by key, what would otherwise fail inside torch or TorchRec after the process group
    is up (or train a constant): the UBM's options, the over-arch's widths, the planner constraints."""
    from mim_rec.ciubm.sparse import TABLE_NAMES
    from mim_rec.config import ConfigError, require_positive
    from mim_rec.ubm import build_ubm
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.types import ShardingType

    try:  # a throw-away instance: the UBM's own constructor is what knows its options
        build_ubm(model.ubm, model.behaviour_dim, **model.ubm_options)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:  # RuntimeError: torch's own layers
        raise ConfigError(f"model.ubm_options={model.ubm_options} for {model.ubm}: {err}") from err
    require_positive(model, ("over_arch",), prefix="model.")  # each layer's width
    choices = {"sharding_types": sorted(t.value for t in ShardingType),
               "compute_kernels": sorted(k.value for k in EmbeddingComputeKernel)}
    for table, constraint in model.constraints.items():
        if table not in TABLE_NAMES:
            raise ConfigError(f"model.constraints.{table}: no such table; the tables are {', '.join(TABLE_NAMES)}")
        if constraint.ranks is not None and not constraint.ranks:  # read as no pin, without a word
            raise ConfigError(f"model.constraints.{table}.ranks=[]: name the ranks to pin the table to, "
                              "or leave ranks out")
        for key, allowed in choices.items():
            unknown = [v for v in getattr(constraint, key) or () if v not in allowed]
            if unknown:
                raise ConfigError(f"model.constraints.{table}.{key}={unknown}: choose from {', '.join(allowed)}")


def refuse_whitening_one_item(mm_whiten: Optional[int], items: int, world: str, model: str) -> None:
    """Refuse a world of one item (``world`` names it: ``data.world=DIR holds 1 item``) for a
    ``model`` that whitens its MM table (``model.mm_whiten``), before the model is built: one
    row has no variance to whiten, which was refused only once the model was built and sharded,
    asking whether the encoder had collapsed."""
    from mim_rec.config import ConfigError

    if items < 2 and mm_whiten:
        raise ConfigError(f"{world}: {model} whitens its MM table (model.mm_whiten={mm_whiten}), which needs "
                          "2 items or more; use more items or model.mm_whiten=0")


def check_sharding_device(model: ModelConfig, device: str) -> None:
    """Refuse, by table, sharding types TorchRec's planner does not offer that table on the
    run's device (``device``: auto | cpu | cuda), and column-wise pins whose table width does
    not cut into one block per rank, instead of a traceback (or a pin quietly held on fewer
    ranks) after the process group is up. What is offered depends on the device and on the
    collection holding the table (``sequence_layout``): on CPU an EmbeddingBagCollection gets
    no row-wise kind."""
    import torch

    from mim_rec.ciubm.placement import check_offered, check_pin_widths
    from mim_rec.ciubm.sparse import SparseArch, sharders
    from mim_rec.utils.dist import resolve_device

    if not model.constraints:
        return
    device_type = resolve_device(device).type
    arch = SparseArch(model, num_items=1, num_users=1, num_categories=1, device=torch.device("meta"))
    table_sharders = sharders(1.0, device_type == "cuda")
    check_offered(arch, model.constraints, table_sharders, device_type)
    check_pin_widths(arch, model.constraints, table_sharders)


def _table_dim(mm_table: Optional[str]) -> int:
    """The MM table's dimension from its manifest (64 for the random stand-in)."""
    if mm_table is None:
        return 64
    from mim_rec.data.errors import ManifestMismatch
    from mim_rec.data.manifest import require
    dim = require(mm_table, kind="mm_table").dim
    if dim is None:
        raise ManifestMismatch(f"{mm_table}: its manifest gives no dim (the length of its vectors); "
                               "an MM table's manifest must (docs/interfaces.md)")
    return int(dim)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help=COMMAND_HELP, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML/JSON file of TrainConfig fields")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate the newest checkpoint in out/ without training, with the run's own "
                             "out/config.json under the overrides (another data.world, device or "
                             "loader.batch_size scores the same checkpoint); writes out/eval.json and leaves "
                             "the run's config.json and metrics.json as training wrote them")
    parser.add_argument("--grid", default=None, metavar="FILE",
                        help="JSON list of {\"name\", \"overrides\"}: train every run in turn in one "
                             "process group (one launch for a seeds x models study); each run adds its "
                             "overrides to the command's, a finished run is skipped; with --eval-only each "
                             "run starts from its own out/config.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="e.g. data.world=DIR mm_table=DIR out=DIR model.ubm=sim "
                             "model.content_interest=false loader.max_hist_len=200")
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from mim_rec.data.manifest import world_age_caveat
    from mim_rec.metrics.report import format_report

    if args.grid:
        run_grid(args.config, args.overrides, load_grid(args.grid), train=not args.eval_only)
        return 0
    config_path = args.config
    if args.eval_only and config_path is None:
        config_path = _run_config(args.overrides)
    config = load_train_config(config_path, args.overrides)
    report = run(config, train=not args.eval_only)
    if report is not None:
        print(format_report(report, world_age_caveat(config.data.world)))
    return 0


def _run_config(overrides: List[str]) -> Optional[str]:
    """The ``config.json`` a trained run folder (``out=``, else the default ``out``) holds, if
    any: what ``--eval-only`` starts from, so evaluating a run needs its folder, not its whole
    command again. A folder that is no ``mim train`` run is refused: a missing one read as
    "data.world: ... is required", another stage's as that config.json's unknown keys."""
    from mim_rec.config import ConfigError
    from train.common import STEP_FILE_GLOB, require_own_run_folder

    outs = [value.split("=", 1)[1] for value in overrides if value.startswith("out=")]
    out = Path(outs[-1] if outs else TrainConfig.out)
    remedy = "point out= at a trained `mim train` run's folder"
    if not out.is_dir():
        raise ConfigError(f"--eval-only: out={out}: no such folder; {remedy}")
    require_own_run_folder(str(out), "mim train", RUN_FILES, STEP_FILE_GLOB, remedy)
    saved = out / "config.json"
    return str(saved) if saved.is_file() else None


def load_grid(path: str) -> List[Dict[str, Any]]:
    """The runs of a ``--grid`` file: a JSON list of ``{"name": str, "overrides": [key=value, ...]}``."""
    from mim_rec.config import ConfigError

    if Path(path).is_dir():
        raise ConfigError(f"--grid {path}: a folder, not a grid file")
    if not Path(path).is_file():  # as --config words it, not as a raw "[Errno 2] No such file ..."
        raise ConfigError(f"--grid {path}: no such file")
    try:
        runs = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--grid {path}: cannot be read ({exc.strerror or exc})") from exc
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ConfigError(f"--grid {path}: {exc}") from exc
    if not isinstance(runs, list):
        raise ConfigError(f"--grid {path}: expected a JSON list of runs, got {type(runs).__name__}")
    if not runs:
        raise ConfigError(f"--grid {path}: the list of runs is empty; nothing would train")
    names = set()
    for index, entry in enumerate(runs):
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("overrides"), list)
                and all(isinstance(o, str) for o in entry["overrides"])):
            raise ConfigError(f"--grid {path}: run {index} must be {{\"name\": str, \"overrides\": [str, ...]}}")
        if entry["name"] in names:
            raise ConfigError(f"--grid {path}: run {index}: duplicate name {entry['name']!r}")
        names.add(entry["name"])
    return runs


def run_grid(config_path: Optional[str], overrides, runs: List[Dict[str, Any]], train: bool = True) -> None:
    """Train and evaluate every run of a grid in this process group, one after another.

    Start-up (interpreter, TorchRec imports, rendezvous) is paid once instead of once per run;
    each run is the same :func:`run` as a single ``mim train``, so it resumes from its own
    checkpoints. A run whose ``metrics.json`` exists for an identical config is skipped. All
    configs are validated before the first step, so a typo in run 30 fails at once."""
    import gc

    from mim_rec.config import ConfigError
    from mim_rec.utils.dist import current_rank

    def config_of(entry: Dict[str, Any]) -> TrainConfig:  # --eval-only: each run's own config.json, as alone
        run_overrides = [*overrides, *entry["overrides"]]
        path = config_path if config_path is not None or train else _run_config(run_overrides)
        return load_train_config(path, run_overrides)

    configs = [(entry["name"], config_of(entry)) for entry in runs]
    writers: Dict[Path, str] = {}
    for name, config in configs:  # two runs in one folder: the second would be refused after the first trained
        folder = Path(config.out).resolve()
        if folder in writers:
            raise ConfigError(f"--grid: runs {writers[folder]!r} and {name!r} both write out={config.out}; "
                              f"give each its own out=")
        writers[folder] = name
    # every rank walks the grid; rank 0 announces it (under torchrun each line came once per rank)
    announce = current_rank() == 0
    for index, (name, config) in enumerate(configs, 1):
        if train and _finished(config):
            if announce:
                print(f"grid [{index}/{len(configs)}] {name}: finished earlier, skipped", flush=True)
            continue
        if announce:
            print(f"grid [{index}/{len(configs)}] {name}: {config.out}", flush=True)
        run(config, train=train)
        gc.collect()  # the previous run's sharded model and optimizer before the next one's


# Settings that change how the steps run, not what they compute: a run under another value
# (or one written before the setting existed) resumes, and a finished one stays finished.
# ``out`` is one: a run folder that was moved or copied is still the same run.
EXECUTION_ONLY = frozenset({"train_pipeline", "out", "checkpoint_keep"})
# Settings a resumed run may change: how long it trains, how often it logs and saves.
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "checkpoint_every", "log_every"}) | EXECUTION_ONLY
# Settings --eval-only may change beyond those: the events it scores, the host it runs on, the
# MM table folder, which it does not read (the checkpoint holds the table), the batch: every
# test event is scored once whatever the batch (the repeated rows that fill a short or padding
# batch weigh 0 and are left out), and an event's logit reads only its own row; and the training
# order, since the test events are read in file order (shuffle off, so no seed is drawn)
EVAL_ONLY_CHANGES = frozenset({"data", "mm_table", "device", "loader.batch_size", "loader.shuffle",
                               "loader.shuffle_row_groups", "loader.seed"})
# Events of metrics.jsonl a run logs again at the step it restores when it trains no further (a
# re-run of a finished run): a folder keeps one record of each per trained state, not one per start.
LOGGED_AFTER_RESTORE = ("mm_table", "eval")
# Of those, the ones logged again at the restored step when the run trains on from it.
REDONE_ON_RESTORE = ("mm_table",)
# Settings that name files: compared as absolute paths.
PATH_SETTINGS = ("data.world", "mm_table", "rim_log")


TRAINING_INPUTS = ("items.parquet", "events_train.parquet")


def _training_inputs(config: TrainConfig) -> Dict[str, str]:
    """Content fingerprints of the data training reads (written as ``out/inputs.json``): the
    world's files and, when the model reads one, the MM table's parts. A checkpoint holds its
    own copy of the frozen table and restores it over the one just loaded, so a table rebuilt
    under the same path would otherwise go unused without a word."""
    from mim_rec.data.manifest import fingerprint_file, fingerprint_tree

    inputs = {name: fingerprint_file(Path(config.data.world) / name) for name in TRAINING_INPUTS}
    if config.mm_table and config.model.uses_mm:
        inputs["mm_table"] = fingerprint_tree(config.mm_table)
    return inputs


def _input_path(config: TrainConfig, name: str) -> str:
    """Where the input :func:`_training_inputs` names ``name`` lives, for messages."""
    return f"mm_table={config.mm_table}" if name == "mm_table" else str(Path(config.data.world) / name)


def _refuse_foreign_checkpoints(config: TrainConfig, checkpoint: Optional[Path],
                                inputs: Optional[Dict[str, str]], total_steps: Optional[int]) -> None:
    """Resuming from checkpoints written under another config, or trained on other data under
    the same world path, would silently mix two runs; nor may a run trained longer than this
    config trains be reported as this config's. ``checkpoint``: the newest in ``out`` (None:
    none); ``inputs``, ``total_steps``: this run's :func:`_training_inputs` and
    :func:`_total_steps` when it trains on (None to evaluate only)."""
    from mim_rec.config import ConfigError

    out = Path(config.out)
    if checkpoint is None:
        return
    from train.common import changed_settings

    # --eval-only may score the checkpoint on other events (another world) and on another kind
    # of host, and reads no MM table folder (the checkpoint holds its table); training may do
    # none of these
    changed = changed_settings(config, RESUMABLE_CHANGES | (EVAL_ONLY_CHANGES if inputs is None else set()),
                               PATH_SETTINGS)
    if changed:
        raise ConfigError(f"out={out} holds checkpoints of a run with another config (differs in: "
                          f"{', '.join(changed)}); use a new out= or delete {out / 'checkpoints'}")
    if inputs is not None:  # the planner shards by the number of ranks, and the fused optimizers' state follows the shards
        import torch.distributed as dist

        from train.dcp_checkpoints import checkpoint_adam_tables, checkpoint_on_cuda, checkpoint_world_size

        written_by = checkpoint_world_size(checkpoint)
        if written_by not in (None, dist.get_world_size()):
            raise ConfigError(f"{checkpoint} was written by {counted(written_by, 'rank')} and this run has "
                              f"{dist.get_world_size()}: resume it on {written_by} (torchrun "
                              f"--nproc-per-node {written_by}); --eval-only evaluates it on any number")
        on_cuda, here = checkpoint_on_cuda(checkpoint), dist.get_backend() == "nccl"
        if on_cuda not in (None, here):
            kinds = {True: "GPUs (fused Adam for the ID tables)", False: "the CPU (row-wise Adagrad for the ID tables)"}
            raise ConfigError(f"{checkpoint} was trained on {kinds[on_cuda]} and this run is on {kinds[here]}: "
                              "its optimizer state cannot carry over; resume it on the kind of host that wrote it "
                              "(device=cuda or device=cpu); --eval-only evaluates it on either")
        if on_cuda is None and not here and (replicated := checkpoint_adam_tables(checkpoint)):
            raise ConfigError(f"{checkpoint} was written before 2026-12-06, when a data-parallel ID table "
                              f"({', '.join(replicated)}) trained with the dense Adam at lr; it now trains with "
                              "row-wise Adagrad at id_lr (docs/ciubm.md), so its optimizer state cannot carry "
                              "over: train again in a new out=; --eval-only evaluates the checkpoint")
    # after the rank check: batches per epoch, and so the steps this config trains, follow the ranks
    trained = int(checkpoint.name.rsplit("-", 1)[-1])
    if total_steps is not None and trained > total_steps:  # it used to report the longer run as this one
        raise ConfigError(f"out={out} holds a run trained {trained} steps, more than the {total_steps} this config "
                          f"trains (epochs={config.epochs}, max_steps={config.max_steps}): use a new out= "
                          f"(or epochs / max_steps that train {trained} or more)")
    if inputs is not None:
        differ = _changed_inputs(out, inputs)
        if differ:
            raise ConfigError(f"out={out} holds checkpoints trained on other data: "
                              f"{', '.join(_input_path(config, name) for name in differ)} changed since; "
                              f"use a new out= or delete {out / 'checkpoints'}")


def _changed_inputs(out: Path, inputs: Dict[str, str]) -> List[str]:
    """The inputs whose fingerprints differ from those ``out/inputs.json`` recorded (none
    when it recorded nothing: a run written before inputs were recorded)."""
    from mim_rec.config import ConfigError
    from mim_rec.utils.run import read_json_or_none

    recorded = out / "inputs.json"
    if not recorded.is_file():
        return []
    fingerprints = read_json_or_none(recorded)
    if not isinstance(fingerprints, dict):
        raise ConfigError(f"{recorded}: not a whole JSON object (a write cut short?), so what the checkpoints "
                          "were trained on is unknown; use a new out=")
    return [name for name, fingerprint in fingerprints.items() if inputs.get(name) != fingerprint]


def _finished(config: TrainConfig) -> bool:
    """Whether ``config.out`` holds the evaluation of a run of exactly this config, on the data
    it reads now."""
    from mim_rec.utils.run import read_json_or_none
    from train.common import changed_settings
    from train.dcp_checkpoints import DcpCheckpoints
    out = Path(config.out)
    report, checkpoint = read_json_or_none(out / "metrics.json"), DcpCheckpoints(out / "checkpoints").newest()
    return report is not None and checkpoint is not None \
        and f"step-{report.get('steps', -1):09d}" == checkpoint.name \
        and changed_settings(config, EXECUTION_ONLY, PATH_SETTINGS) == [] \
        and changed_data(config, report) == []


def changed_data(config: TrainConfig, report: Dict[str, Any]) -> List[str]:
    """What the run in ``config.out``, whose evaluation is ``report``, read that differs now:
    the training inputs it recorded (world files, MM table) and the test events it was scored
    on. A run's numbers stand for the data it saw, so the grid re-runs such a run and
    ``mim experiment --report-only`` does not report it."""
    changed = _changed_inputs(Path(config.out), _training_inputs(config)) \
        if (Path(config.out) / "inputs.json").is_file() else []
    if report.get("events_test_fingerprint") not in (None, _test_events_fingerprint(config)):
        changed.append("events_test.parquet")
    return changed


def _test_events_fingerprint(config: TrainConfig) -> str:
    """Content fingerprint of the events a run is scored on (a report without one predates it);
    empty when the file is gone, which no run was scored on."""
    from mim_rec.data.manifest import fingerprint_file
    events = Path(config.data.world) / "events_test.parquet"
    return fingerprint_file(events) if events.is_file() else ""


# ---------------------------------------------------------------- distributed set-up

def planner_topology(ctx):
    """The planner's view of the job: its ranks, and how many share a host (LOCAL_WORLD_SIZE,
    as torchrun sets it). Left out, TorchRec takes every rank for one host, and on several
    hosts plans table-row-wise blocks that its own sharding, reading the host size at run
    time, then cuts differently. On a GPU it also knows the card's memory: TorchRec's default
    is 32 GiB, which sent an 80 GB card's MM table to a UVM cache and over-commits a smaller card."""
    import torch
    from torchrec.distributed.planner import Topology

    hbm = torch.cuda.get_device_properties(ctx.device).total_memory if ctx.device.type == "cuda" else None
    return Topology(world_size=ctx.world_size, compute_device=ctx.device.type, hbm_cap=hbm,
                    local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)))


def _plan(model, config, ctx, sharders):
    import torch.distributed as dist
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints

    from mim_rec.ciubm.placement import empty_row_shards, pin_tables
    from mim_rec.config import ConfigError

    constraints = {name: ParameterConstraints(sharding_types=c.sharding_types, compute_kernels=c.compute_kernels)
                   for name, c in config.model.constraints.items()}

    topology = planner_topology(ctx)

    def planned():
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=config.loader.batch_size,
                                           constraints=constraints)
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
        return pin_tables(model, plan, config.model.constraints, sharders, ctx.world_size,
                          topology.local_world_size, ctx.device.type)

    plan = planned()
    # A table too small to give every rank a row block is narrowed to table_wise and all is
    # planned again (which may move other tables); a table_wise table is never split by rows,
    # so each pass narrows new tables and the loop ends.
    while empty := empty_row_shards(plan):
        for name, rows in empty.items():
            chosen = config.model.constraints.get(name)
            allowed = (chosen.sharding_types if chosen is not None else None) or ["table_wise"]
            if "table_wise" not in allowed:
                raise ConfigError(f"model.constraints.{name}.sharding_types={allowed}: row-wise over "
                                  f"{ctx.world_size} ranks splits the table into row blocks {rows}, and fbgemm's "
                                  "kernel cannot run a rank with no row; allow table_wise or use fewer ranks")
            constraints[name] = ParameterConstraints(
                sharding_types=["table_wise"], compute_kernels=chosen.compute_kernels if chosen else None)
            if ctx.rank == 0:
                print(f"mim train: note: the planner split table {name} by rows into blocks {rows}, leaving a "
                      "rank none (fbgemm's kernel cannot run it); planned it table_wise", file=sys.stderr)
        plan = planned()
    return plan


def build_sharded_model(config: TrainConfig, sizes: Dict[str, int], ctx):
    """``(DMP model, combined optimizer)`` for ``config`` on this rank."""
    import torch
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from mim_rec.ciubm.model import CiUBM
    from mim_rec.ciubm.sparse import MM_TABLE, data_parallel_id_optimizer, sharders as make_sharders

    torch.manual_seed(config.seed)
    use_cuda = ctx.device.type == "cuda"
    model = CiUBM(config.model, sizes["items"], sizes["users"], sizes["categories"], device=torch.device("meta"))
    sharders = make_sharders(config.id_lr, use_cuda)
    plan = _plan(model, config, ctx, sharders)
    for tables in plan.plan.values():  # the planner may pick a caching kernel on its own
        if MM_TABLE in tables:
            kernel = tables[MM_TABLE].compute_kernel
            require_rim_writable(config, [kernel], f"the planner's {kernel} kernel for the MM table {MM_TABLE}")
    dmp = DistributedModelParallel(model, device=ctx.device, plan=plan, sharders=sharders)
    unfused = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    replicated_tables = _data_parallel_weights(plan, unfused)
    optimizers = [dmp.fused_optimizer, KeyedOptimizerWrapper(
        {name: p for name, p in unfused.items() if name not in replicated_tables},
        lambda params: torch.optim.Adam(params, lr=config.lr))]
    if replicated_tables:
        optimizers.append(KeyedOptimizerWrapper(replicated_tables, data_parallel_id_optimizer(config.id_lr, use_cuda)))
    return dmp, CombinedOptimizer(optimizers), plan


def _data_parallel_weights(plan, parameters: Dict[str, "torch.nn.Parameter"]) -> Dict[str, "torch.nn.Parameter"]:
    """The weights, among ``parameters``, of the tables ``plan`` makes data-parallel."""
    affixes = [(f"{path}.", f".{table}.weight") for path, tables in plan.plan.items()
               for table, sharding in tables.items() if sharding.sharding_type == "data_parallel"]
    return {name: p for name, p in parameters.items()
            if any(name.startswith(prefix) and name.endswith(suffix) for prefix, suffix in affixes)}


def mm_rows(config: TrainConfig, num_items: int, dim: int):
    """``(rows_of, source)``: the representation center's table read range by range, or a
    seeded random stand-in. ``source`` counts the items given the zero default vector
    (``mm_missing=default``)."""
    import torch

    if config.mm_table is None:
        generator = torch.Generator().manual_seed(config.seed + 7919)
        vectors = torch.randn(num_items, dim, generator=generator)
        return (lambda start, stop: vectors[start:stop]), "random stand-in (no mm_table given)"
    from embeddings.table import MMTableRows, check_table
    lacking = check_table(config.mm_table, num_items, dim, config.mm_missing,
                          items_path=Path(config.data.world) / "items.parquet")
    source = f"table {config.mm_table}" + (f" ({lacking} of {num_items} items missing: zero vectors)"
                                           if lacking else "")
    return MMTableRows(config.mm_table, dim, config.mm_missing), source


# ---------------------------------------------------------------- train / evaluate

def table_sizes(world: str, items) -> Dict[str, int]:
    """Rows of the ID tables for a world folder: items, users (over both event splits), categories."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mim_rec.data.io import dense_id_rows

    world = Path(world)
    users = 0
    for split in ("train", "test"):
        path = world / f"events_{split}.parquet"
        if path.is_file():
            users = max(users, dense_id_rows(pq.read_table(path, columns=["user_id"])["user_id"], path,
                                             "user_id", "users"))
    categories = dense_id_rows(pa.chunked_array([items.category]), world / "items.parquet", "category_id",
                               "categories")
    return {"items": items.count, "users": users, "categories": categories}


def _validate_events(config: TrainConfig, items) -> None:
    """Refuse bad events (unknown ids, ragged histories, NaN...), a missing or empty split and a
    split of one label before any training (a missing events_test.parquet used to surface only at the
    evaluation; a clickless world trained to a constant and reported no AUC)."""
    from mim_rec.data.io import validate_file
    from mim_rec.data.schemas import EVENTS

    for split in ("train", "test"):
        validate_file(Path(config.data.world) / f"events_{split}.parquet", EVENTS, item_count=items.count,
                      category_count=int(items.category.max()) + 1, item_category=items.category, keep=False)
    require_both_labels(config.data.world)


def require_both_labels(world: str) -> None:
    """Refuse a world (its events files valid) whose train or test split is empty or of one
    label. ``mim pipeline`` and ``mim experiment`` ask it before pre-training: a clickless
    world ran pre-training and C-SFT for minutes before the CTR runs refused it."""
    import pyarrow.parquet as pq

    from mim_rec.data.errors import DataError
    from mim_rec.data.io import single_label

    for split in ("train", "test"):
        path = Path(world) / f"events_{split}.parquet"
        if pq.read_metadata(path).num_rows == 0:  # an empty test split used to surface after training
            raise DataError(str(path), f"holds no events: a CTR run needs {split} events")
        label = single_label(path)
        if label is not None:
            raise DataError(str(path), f"every row has label {label}: a CTR run needs clicks and non-clicks "
                                       f"in both splits (the AUC is undefined on one class)", field="label")


# What a `mim train` run writes into its folder (its checkpoints are DCP folders, not the step
# files of pretrain and C-SFT).
RUN_FILES = frozenset({"config.json", "inputs.json", "checkpoints", "metrics.jsonl", "metrics.json", "eval.json",
                       "plan.txt"})


def run(config: TrainConfig, train: bool = True) -> Optional[Dict[str, Any]]:
    """Train (resuming from ``out/checkpoints`` if present), then evaluate; the report on rank 0.
    A training run holds ``out`` (:func:`~mim_rec.utils.run.run_folder_lock`)."""
    from contextlib import nullcontext

    from mim_rec.utils.run import run_folder_lock
    from train.common import STEP_FILE_GLOB, require_own_run_folder

    if train:  # before the lock, which would leave its file in a foreign folder
        require_own_run_folder(config.out, "mim train", RUN_FILES, STEP_FILE_GLOB)
    with run_folder_lock(config.out) if train else nullcontext():
        return _run(config, train)


def _run(config: TrainConfig, train: bool) -> Optional[Dict[str, Any]]:
    import torch.distributed as dist

    from mim_rec.ciubm.mm_shards import load_mm_table, mm_table_bytes
    from mim_rec.data.loader import CtrEventsLoader, ItemInfo
    from mim_rec.utils.dist import ensure_process_group
    from mim_rec.utils.run import JsonlLogger, atomic_write_bytes
    from train.dcp_checkpoints import DcpCheckpoints

    ctx = ensure_process_group(config.device)
    out = Path(config.out)
    world = Path(config.data.world)
    items = ItemInfo.from_items(world / "items.parquet")
    _validate_events(config, items)
    sizes = table_sizes(config.data.world, items)
    inputs = _training_inputs(config) if train else None
    loader = CtrEventsLoader(world / "events_train.parquet", items, config.loader, ctx.rank,
                             ctx.world_size) if train else None
    total_steps = _total_steps(config, loader) if train else None
    checkpoints = DcpCheckpoints(out / "checkpoints", keep=config.checkpoint_keep)
    # found once (each look reads the checkpoints' metadata): checked, evaluated and restored
    # alike, since nothing is saved before the restore
    found = checkpoints.newest_and_skipped()
    # before build: the planner's collectives order it before any write
    _refuse_foreign_checkpoints(config, found[0], inputs, total_steps)
    if not train:
        evaluated = found[0]
        if evaluated is None:
            from mim_rec.config import ConfigError
            raise ConfigError(f"--eval-only: out={out} holds no checkpoint to evaluate; point out= at a trained run")
        sizes = _evaluation_sizes(config, sizes, evaluated)
    # Training fills the frozen table from mm_table=. --eval-only scores the checkpoint's own
    # copy (restored below), so it neither needs nor reads the folder: one moved or rebuilt
    # since training would otherwise be required, and then silently not be what was scored.
    fills_table = config.model.uses_mm and train
    if fills_table:  # the table is checked before anything is built or written
        refuse_whitening_one_item(config.model.mm_whiten, items.count,
                                  f"data.world={config.data.world} holds 1 item", "the model")
        rows_of, source = mm_rows(config, items.count, config.model.mm_dim)
        if config.mm_table is None and ctx.is_main:
            print("note: no mm_table= given: the content and fusion modules read a seeded random "
                  "stand-in table, so this run measures the plumbing, not MIM", file=sys.stderr)
    model, optimizer, plan = build_sharded_model(config, sizes, ctx)
    # --eval-only leaves the run's own records alone: its config.json and metrics.json describe
    # what training did (a grid or the pipeline reuses a run by them), whatever is evaluated later
    logger = JsonlLogger(out / "metrics.jsonl") if ctx.is_main and train else None
    if fills_table:
        load_mm_table(model, rows_of, items.count)
        mm_bytes = [None] * ctx.world_size
        dist.all_gather_object(mm_bytes, mm_table_bytes(model))
    if ctx.is_main and train:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").unlink(missing_ok=True)  # it always describes the config.json beside it
        atomic_write_bytes(out / "config.json", json.dumps(asdict(config), indent=2, default=str).encode())
        atomic_write_bytes(out / "inputs.json", json.dumps(inputs, indent=2).encode())
        (out / "plan.txt").write_text(str(plan))

    progress = checkpoints.restore(model, optimizer, with_optimizer=train, found=found) \
        or {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    live = None
    if config.rim_log:  # a training run's applier goes on where its checkpoint's stood
        from embeddings.rim_live import LiveMMTable
        if ctx.is_main and not Path(config.rim_log).exists():
            # the service may create it later, but a mistyped path would otherwise train the
            # new items on their missing-row vectors without a word
            print(f"note: rim_log={config.rim_log} does not exist (yet): new items keep their missing-row "
                  "vectors until a RIM service writes it there", file=sys.stderr)
        live = LiveMMTable(config.rim_log, config.mm_table, items.count, resume=progress if train else None)
        progress.update(live.position())
    if logger:
        # the state restored is evaluated again only when nothing is left to train; a run that
        # trains on keeps that state's evaluation as its record. RIM applies the checkpoint
        # does not hold (the one before its evaluation, say) are done and logged again.
        trains_on = total_steps > progress["global_step"]
        logger.forget_after(progress["global_step"],
                            redone=REDONE_ON_RESTORE if trains_on else LOGGED_AFTER_RESTORE,
                            unheld=_unheld_rim_apply(live))
        if config.model.uses_mm:
            logger.log({"event": "mm_table", "source": source, "dtype": config.model.mm_dtype,
                        "bytes_per_rank": mm_bytes}, step=progress["global_step"])
    if train:
        _train(config, model, optimizer, loader, progress, checkpoints, logger, ctx, live)
    if live is not None:
        _apply_rim(live, model, logger, progress)
    report = evaluate(config, model, items, ctx)
    report["steps"] = progress["global_step"]
    if ctx.is_main:
        if train:  # with what it scored, so that a grid re-scores a run whose test events changed
            scored = {**report, "events_test_fingerprint": _test_events_fingerprint(config)}
            atomic_write_bytes(out / "metrics.json", json.dumps(scored, indent=2).encode())
            logger.log({"event": "eval", **{k: report[k] for k in ("auc", "gauc", "logloss", "n")}},
                       step=progress["global_step"])
            logger.close()
        else:
            atomic_write_bytes(out / "eval.json", json.dumps(_evaluated(config, report, evaluated), indent=2).encode())
    dist.barrier()
    return report if ctx.is_main else None


# The table each size of :func:`table_sizes` rows.
SIZED_TABLES = {"items": "item", "users": "user", "categories": "category"}


def _evaluation_sizes(config: TrainConfig, needed: Dict[str, int], checkpoint: Path) -> Dict[str, int]:
    """The table sizes to evaluate ``checkpoint`` (the run's newest) with: the ones it trained. A
    world whose ids fit them (a holdout, a later test split with fewer users) is scored with
    the trained tables; one with other items or ids past a table is refused here, naming the
    table (DCP's size-mismatch traceback said it only deep in the load). So is a world of
    another catalogue, by its items.parquet's content: its item ids name other items, and a
    world of the same sizes was scored as if they were the trained ones."""
    from mim_rec.config import ConfigError
    from mim_rec.data.manifest import fingerprint_file
    from train.dcp_checkpoints import checkpoint_table_rows

    items = Path(config.data.world) / "items.parquet"
    if "items.parquet" in _changed_inputs(Path(config.out), {"items.parquet": fingerprint_file(items)}):
        raise ConfigError(f"--eval-only: {items} is not the catalogue out={config.out} trained on (its content "
                          "differs): item ids index the trained tables, so evaluate on a world of the same items "
                          "(`mim data holdout` keeps them)")
    trained = checkpoint_table_rows(checkpoint)
    sizes = {key: trained.get(table, needed[key]) for key, table in SIZED_TABLES.items()}
    if needed["items"] != sizes["items"]:
        raise ConfigError(f"--eval-only: data.world={config.data.world} has {needed['items']:,} items and "
                          f"{checkpoint} was trained on {sizes['items']:,}: the item tables (and the MM table) "
                          "are keyed by item id, so evaluate on a world of the same catalogue")
    past = [f"{key} ({needed[key]:,} rows needed, {sizes[key]:,} trained)" for key in ("users", "categories")
            if needed[key] > sizes[key]]
    if past:
        raise ConfigError(f"--eval-only: data.world={config.data.world} has ids past the tables of {checkpoint}: "
                          f"{', '.join(past)}; evaluate on a world of the same id spaces")
    return sizes


def _evaluated(config: TrainConfig, report: Dict[str, Any], checkpoint: Path) -> Dict[str, Any]:
    """An ``--eval-only`` report with what it measured: the checkpoint and the test events (path
    and content fingerprint), which may be another world's than the run trained on."""
    events = Path(config.data.world) / "events_test.parquet"
    return {"checkpoint": checkpoint.name, "events_test": str(events.resolve()),
            "events_test_fingerprint": _test_events_fingerprint(config),
            "mm_table": f"the checkpoint's copy ({checkpoint.name})" if config.model.uses_mm else None, **report}


def _apply_rim(live, model, logger, progress: Dict[str, int]) -> None:
    """Write the RIM rows that arrived since the last call into the MM table (every rank,
    between steps; the table stays frozen to training). ``progress`` takes the log position,
    so the next checkpoint holds how far the rows it saves reach."""
    applied = live.apply(model)
    progress.update(live.position())
    if logger and applied:
        logger.log({"event": "rim_apply", "items": applied, "log_offset": live.offset}, step=progress["global_step"])


def _unheld_rim_apply(live) -> Optional[Callable[[Dict[str, Any]], bool]]:
    """Whether a ``metrics.jsonl`` record is a RIM apply past the restored log position: its
    rows are not in the checkpoint, so the run applies them again and logs that apply anew."""
    if live is None:
        return None
    return lambda record: record.get("event") == "rim_apply" and record.get("log_offset", 0) > live.offset


def ctr_loss(logits: torch.Tensor, aux: Optional[torch.Tensor], batch: CtrBatch,
             aux_weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The training objective and its parts ``[total, BCE, auxiliary]`` (detached, for the log).

    BCE weighted by ``meta["weight"]`` (padding rows count 0), normalised by the weight sum,
    plus the UBM's auxiliary loss (DIEN) times ``aux_weight``; the auxiliary part is 0 for a
    UBM without one. ``aux`` comes from the model's forward over the rows of weight > 0 only
    (:class:`~mim_rec.ciubm.model.CiUBM`), so padding rows count 0 in it too."""
    import torch
    import torch.nn.functional as F

    weight = batch.meta["weight"]
    bce = F.binary_cross_entropy_with_logits(logits, batch.labels, weight=weight, reduction="sum") \
        / weight.sum().clamp_min(1)
    aux = torch.zeros_like(bce) if aux is None else aux
    loss = bce + aux_weight * aux
    return loss, torch.stack([loss, bce, aux]).detach()


class TrainStep:
    """The model's training forward as TorchRec's pipelines call it: ``batch -> (loss, parts)``
    with ``parts = [total, BCE, auxiliary]`` detached (what :func:`ctr_loss` returns).

    Kept outside the DMP module (TorchRec's ``custom_model_fwd``) rather than wrapping CiUBM
    in a loss module, so the state-dict keys of checkpoints and the evaluation forward stay
    those of CiUBM itself."""

    def __init__(self, model, aux_weight: float) -> None:
        self.model, self.aux_weight = model, aux_weight

    def __call__(self, batch: CtrBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        logits, aux = self.model(batch)
        return ctr_loss(logits, aux, batch, self.aux_weight)


class PlainStep:
    """One training step without pipelining: copy the next batch, forward, backward, step.
    Same interface as TorchRec's pipelines: ``progress(batches)`` and ``detach()``."""

    def __init__(self, model, optimizer, device, aux_weight: float) -> None:
        self.forward, self.optimizer, self.device = TrainStep(model, aux_weight), optimizer, device

    def progress(self, batches: Iterator[CtrBatch]) -> torch.Tensor:
        loss, parts = self.forward(next(batches).to(self.device))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return parts

    def detach(self):
        return self.forward.model


def make_step(config: TrainConfig, model, optimizer, device):
    """The step function of ``config.train_pipeline``: an object whose ``progress(batches)``
    trains on the next batch of the iterator and returns ``[total, BCE, auxiliary]`` loss
    (detached), and whose ``detach()`` gives the model back with its own forwards (a pipeline
    replaces the sharded modules' forwards by ones that read its queued input dists, which
    evaluation must not).

    ``sparse_dist`` is TorchRec's ``TrainPipelineSparseDist``: the H2D copy of batch i+2 and
    the input dist (ID all-to-all) of batch i+1 overlap the forward/backward of batch i (CUDA
    streams; on CPU the same stages run in order on the one stream)."""
    if config.train_pipeline == "plain":
        return PlainStep(model, optimizer, device, config.model.dien_aux_weight)
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    return TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True,
                                   custom_model_fwd=TrainStep(model, config.model.dien_aux_weight))


def _total_steps(config: TrainConfig, loader) -> int:
    total = loader.batches_per_epoch * config.epochs
    return total if config.max_steps is None else min(total, config.max_steps)


def _batch_stream(loader, progress: Dict[str, int], steps: int) -> Iterator[CtrBatch]:
    """The next ``steps`` batches from ``progress`` on, across epochs: exactly the batches the
    remaining steps train on (a pipeline reading ahead never pulls one more)."""
    def epochs(epoch: int, skip: int):
        while True:
            yield from loader.iterate(epoch, skip=skip)
            epoch, skip = epoch + 1, 0
    return itertools.islice(epochs(progress["epoch"], progress["step_in_epoch"]), steps)


def _advance(progress: Dict[str, int], batches_per_epoch: int) -> None:
    """Count one step; an epoch ends with its last batch."""
    progress["global_step"] += 1
    progress["step_in_epoch"] += 1
    if progress["step_in_epoch"] >= batches_per_epoch:
        progress["epoch"] += 1
        progress["step_in_epoch"] = 0


def _train(config, model, optimizer, loader, progress, checkpoints, logger, ctx, live=None) -> None:
    import torch
    from tqdm import tqdm

    from mim_rec.utils.dist import mean_over_ranks

    if progress["step_in_epoch"] >= loader.batches_per_epoch:  # saved at an epoch's last step
        progress.update(epoch=progress["epoch"] + 1, step_in_epoch=0)
    total = _total_steps(config, loader)
    steps = max(total - progress["global_step"], 0)
    batches = _batch_stream(loader, progress, steps)
    step = make_step(config, model, optimizer, ctx.device)
    bar = tqdm(total=total, initial=progress["global_step"], desc="train", unit="step",
               disable=not ctx.is_main)
    model.train()
    started = time.time()
    for done in range(1, steps + 1):
        torch.manual_seed(config.seed * 1_000_003 + progress["global_step"] * ctx.world_size + ctx.rank)
        parts = step.progress(batches)
        _advance(progress, loader.batches_per_epoch)
        bar.update()
        if progress["global_step"] % config.log_every == 0:
            # the one device sync, every log_every steps; every rank joins the mean
            loss, bce, aux = mean_over_ranks(parts).tolist()
            if logger:
                samples = done * config.loader.batch_size * ctx.world_size
                logger.log({"loss": loss, "bce": bce, "aux_loss": aux,
                            "samples_per_s": samples / max(time.time() - started, 1e-9)},
                           step=progress["global_step"])
                bar.set_postfix(loss=f"{loss:.4f}")
        if live is not None and progress["global_step"] % config.rim_apply_every == 0:
            _apply_rim(live, model, logger, progress)
        if progress["global_step"] % config.checkpoint_every == 0:
            _require_finite(parts, progress["global_step"], checkpoints)
            checkpoints.save(model, optimizer, progress)
    step.detach()
    bar.close()
    # Not again where the loop's last step saved, nor where nothing trained: DCP would rewrite the
    # newest checkpoint in place, and a kill during that would leave none whole at this step.
    if steps and progress["global_step"] % config.checkpoint_every:
        _require_finite(parts, progress["global_step"], checkpoints)
        checkpoints.save(model, optimizer, progress)


def _require_finite(parts, step: int, checkpoints) -> None:
    """The step's loss parts must be finite before it is checkpointed (the weights it updated
    would not be)."""
    from mim_rec.utils.run import require_finite

    newest = checkpoints.newest()
    require_finite([parts], step, newest.name if newest is not None else None,
                   lambda: f"the training loss is not finite (total, BCE, auxiliary: {parts.tolist()} on this rank)",
                   "Lower lr or id_lr, or check the inputs")


def evaluate(config: TrainConfig, model, items, ctx) -> Dict[str, Any]:
    """AUC, GAUC, log loss, per category and per item-age decile on events_test."""
    import torch
    from dataclasses import replace

    from mim_rec.data.loader import CtrEventsLoader
    from mim_rec.metrics import CtrMetrics
    from tqdm import tqdm

    loader = CtrEventsLoader(Path(config.data.world) / "events_test.parquet", items,
                             replace(config.loader, shuffle=False), ctx.rank, ctx.world_size, drop_last=False)
    metrics = CtrMetrics()
    model.eval()
    with torch.no_grad():
        for batch in tqdm(loader.iterate(0), total=len(loader), desc="eval", unit="batch", disable=not ctx.is_main):
            batch = batch.to(ctx.device)
            logits, _ = model(batch)
            keep = batch.meta["weight"] > 0
            metrics.update(torch.sigmoid(logits)[keep], batch.labels[keep], batch.meta["user_id"][keep],
                           batch.meta["target_category"][keep], batch.meta["item_age_days"][keep])
    model.train()
    return metrics.compute()
