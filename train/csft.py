"""``mim csft``: stage 2, C-SFT on the <query image, item> pairs; ``mim csft-eval``: query->item
recall and content-interest AUC of the stage-1 embeddings and of the C-SFT towers.

A run folder holds ``config.json``, ``checkpoints/`` (periodic, for exact resume after a
kill: re-run the same command), ``metrics.jsonl`` (+ ``tb/`` when TensorBoard is
installed), ``features/`` (cached backbone features, unless ``data.feature_cache`` points
elsewhere), ``mm_encoder/`` (the artifact the representation center loads) and
``eval.json``. Multi-process: ``torchrun --nproc-per-node 2 -m train.cli csft ...`` (gloo on
CPU, nccl on GPU); the global batch is split over ranks and item rows all-gathered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from train.stage_cli import StageCommands, register_stage

if TYPE_CHECKING:
    from mim_rec.csft.config import CsftConfig
    from mim_rec.csft.data import FeatureCache, HeldOut, Pairs, WorldInputs


def register(subparsers: argparse._SubParsersAction) -> None:
    register_stage(subparsers, StageCommands(
        name="csft",
        help="stage 2: C-SFT of the item (TFN) and query towers on <query image, item> pairs",
        eval_help="query->item recall@k and content-interest AUC: stage 1 vs C-SFT",
        config_type="CsftConfig (mim_rec/csft/config.py)",
        example="data.world=DIR (default data/world) encoders=DIR (default runs/pretrain/encoders) "
                "out=DIR (default runs/csft) steps=300",
        load=lambda args: load_checked(args.config, args.overrides), check_eval=check_evaluable, train=_train,
        report=lambda config, evaluable: format_table(evaluate_run(config, evaluable))))


# The settings naming a C-SFT command's inputs, refused by name when missing.
INPUT_SETTINGS = ("data.world", "encoders")


def load_checked(config_path: Optional[str], overrides: Sequence[str]) -> CsftConfig:
    """The C-SFT settings of a command line, checked, with ``data.world`` and ``encoders``
    named if missing (csft-ablations said only "PATH: no such file or folder"; csft-tune checks
    them by name too, after its own flags)."""
    from mim_rec.config import load_config, require_existing
    from mim_rec.csft.config import CsftConfig

    config = check_config(load_config(CsftConfig, config_path, overrides))
    require_existing(config, INPUT_SETTINGS)
    return config


def check_evaluable(config: CsftConfig) -> Tuple[WorldInputs, HeldOut]:
    """Refuse held-out data that ``csft-eval`` would refuse (a missing or empty test file, one
    of impressions no AUC can score, an empty validation period, pairs without the query column
    the stage-1 vision tower reads), with its messages, before the encoders load: ``mim csft
    --eval`` found such a file only after training, and ``csft-eval`` an unscorable one only
    after the stage-1 embeddings. So are items whose images that tower cannot read
    (:func:`~mim_rec.pretrain.corpus.require_stored_images`), which ``csft-eval`` and ``--eval-only``
    found only after loading the encoders. Returns the world and its held-out data, which the
    evaluation goes on to score (and ``mim csft --eval`` to train on: :func:`_train`)."""
    from mim_rec.encoders.pair import saved_config
    from mim_rec.pretrain.corpus import require_stored_images

    world = _open_world(config)
    require_stored_images(world.items_path, saved_config(config.encoders).vision)
    return world, evaluable_held_out(world, config.data.validation, config.encoders)


def _open_world(config: CsftConfig) -> WorldInputs:
    """``data.world``'s items (read and validated) and pairs, with the run's feature cache."""
    from mim_rec.csft.data import WorldInputs
    return WorldInputs(config.data.world, feature_cache(config), batch_size=config.eval.batch_size)


def opens_as(config: CsftConfig, world: WorldInputs) -> bool:
    """Whether ``world`` is what :func:`run_csft` would open for ``config``: the same folder,
    feature cache and extraction batch. Public: ``csft-ablations`` and ``csft-tune`` hand their
    world to each run where it is (a csft-tune ``--grid`` may name another ``eval.batch_size``),
    not opening and validating the items again per run."""
    return (Path(config.data.world) == world.world and feature_cache(config).folder == world.cache.folder
            and config.eval.batch_size == world.batch_size)


def evaluable_held_out(world: WorldInputs, validation: float, encoders: str) -> HeldOut:
    """``world.held_out(validation)``, refused where the evaluation of the towers of the stage-1
    ``encoders`` would refuse it (see :func:`check_evaluable`). Public: ``csft-tune`` checks its
    validation split (and, with ``--final``, the test files) and ``csft-ablations`` its held-out
    data with it before any stage-1 pass or run: they found an unscorable events file after
    the stage-1 pass, and csft-tune a missing test file only after every grid point had
    trained."""
    from mim_rec.csft.evaluate import require_evaluable
    from mim_rec.encoders.pair import saved_config

    held_out = world.held_out(validation)
    require_evaluable(world, held_out, saved_config(encoders).vision)
    return held_out


def check_training_inputs(world: WorldInputs, encoders: str) -> None:
    """Refuse items and training pairs whose pictures the vision tower of the stage-1
    ``encoders`` cannot read (:func:`~mim_rec.pretrain.corpus.require_stored_images`: no column
    it reads, a row null in it, a feature of another length), from the files and the encoders'
    manifest, before the encoders load: ``mim csft`` found them only after loading them (the
    pairs, after extracting every item's features), ``csft-ablations`` only when its first
    variant trained, after its stage-1 pass, ``csft-tune`` in that pass. Public:
    ``csft-ablations`` and ``csft-tune`` check them with it before that pass."""
    from mim_rec.data.schemas import PAIRS
    from mim_rec.encoders.pair import saved_config
    from mim_rec.pretrain.corpus import require_stored_images

    vision = saved_config(encoders).vision
    require_stored_images(world.items_path, vision)
    require_stored_images(world.pairs_path("train"), vision, PAIRS)


def check_config(config: CsftConfig) -> CsftConfig:
    """Refuse settings that would fail deep inside training or evaluation (a division by zero,
    a traceback from numpy) or silently train nothing; returns ``config``. Every command that
    trains C-SFT runs (``csft``, ``csft-ablations``, ``csft-tune``) calls it on each run's
    config before any of them trains."""
    from mim_rec.config import (ConfigError, require_fraction, require_not_negative, require_positive,
                                require_run_folder)
    require_positive(config, ("steps", "lr", "head_lr", "backbone_lr", "checkpoint_every", "log_every",
                              "data.batch_size", "eval.batch_size", "loss.temperature", "model.fusion.hidden",
                              "model.fusion.rank", "eval.ks"))
    require_not_negative(config, ("loss.alpha", "loss.beta", "negatives.queue_batches", "weight_decay", "seed"))
    if config.data.validation:
        require_fraction(config, ("data.validation",))
    _check_signals(config.data.signals)
    if not config.eval.ks:
        raise ConfigError(f"eval.ks={config.eval.ks}: name at least one recall cut-off")
    if config.negatives.queue_batches and config.model.train_backbones:
        raise ConfigError("model.train_backbones=true needs negatives.queue_batches=0: a refreshed "
                          "queue re-embeds queued items from cached backbone features, which moving "
                          "backbones invalidate, and a stored (stale) queue made C-SFT diverge "
                          "(docs/csft.md, 'No queue while the backbones train')")
    require_run_folder(config.out, "runs/csft")  # csft-ablations and csft-tune bypass stage_cli
    return config


def _check_signals(signals: List[str]) -> None:
    """Each of ``data.signals`` must select pairs: a misspelt one beside a real one used to
    select nothing, and the run trained on the real one's pairs under the misspelt name."""
    from mim_rec.config import ConfigError
    from mim_rec.csft.data import SELECTED_BY
    if not signals:
        raise ConfigError(f"data.signals={signals}: name at least one signal")
    for signal in signals:
        if signal not in SELECTED_BY:
            raise ConfigError(f"data.signals={signals}: {signal!r} is not a signal; choose from {sorted(SELECTED_BY)}")


# What a `mim csft` run writes into its folder (see the module docstring), and the result.json
# csft-ablations and csft-tune keep in each of their runs' folders.
RUN_FILES = frozenset({"config.json", "checkpoints", "metrics.jsonl", "tb", "features", "mm_encoder", "eval.json",
                       "result.json"})


# ----------------------------------------------------------------------------- training

def _train(config: CsftConfig, evaluable: Optional[Tuple[WorldInputs, HeldOut]]) -> Path:
    """:func:`run_csft` on the world :func:`check_evaluable` opened, when it ran (``--eval``):
    training opened it again, reading and validating the items a second time."""
    return run_csft(config, evaluable[0] if evaluable else None)


def run_csft(config, world: Optional[WorldInputs] = None) -> Path:
    """Train (or resume) a run in ``config.out``; returns the MM encoder folder. ``world``:
    ``config``'s world when the caller has opened it already, else opened here."""
    from mim_rec.utils.run import run_folder_lock
    from train.common import require_own_run_folder
    from train.dcp_checkpoints import DCP_STEP_GLOB

    require_own_run_folder(config.out, "mim csft", RUN_FILES, DCP_STEP_GLOB)  # before the lock's file
    with run_folder_lock(config.out):
        return _run_csft(config, world)


def _run_csft(config, world: Optional[WorldInputs]) -> Path:
    import numpy as np
    import torch
    from tqdm import tqdm

    from mim_rec.config import ConfigError
    from mim_rec.csft.data import TrainingInputs
    from mim_rec.csft.model import CsftModel, save_mm_encoder
    from mim_rec.csft.negatives import SameCategorySampler
    from mim_rec.csft.objective import CsftObjective
    from mim_rec.data.manifest import fingerprint_file, fingerprint_tree
    from mim_rec.encoders import load_encoders
    from mim_rec.encoders.freeze import describe_trainable
    from mim_rec.utils.dist import barrier, init_distributed, losses_over_ranks
    from mim_rec.utils.run import JsonlLogger, atomic_write_bytes, seed_everything
    from train.common import CheckpointManager
    from train.pretrain import _batch_index

    check_config(config)  # refused before any work, whoever calls
    ctx = init_distributed(config.device)
    out = Path(config.out)
    # The world, the batch, the items' images and the pairs' queries are checked before the
    # encoders load and the backbone features are extracted: a batch larger than the pairs was
    # refused only after that work (~30 s).
    if world is None:
        world = _open_world(config)
    pairs = world.training_pairs(config.data.signals, config.data.validation)
    reason = untrainable(config, world, ctx.world_size, pairs)
    if reason:
        raise ConfigError(reason)
    check_training_inputs(world, config.encoders)
    local_batch = config.data.batch_size // ctx.world_size
    seed_everything(config.seed)  # identical initial weights on every rank
    model = CsftModel(load_encoders(config.encoders), config.model).to(ctx.device)
    if not ctx.is_main:
        barrier()  # rank 0 computes and caches the backbone features first
    inputs = TrainingInputs(world, pairs, model, features=not config.model.train_backbones)
    if ctx.is_main:
        barrier()
    sampler = SameCategorySampler(world.item_categories) if config.negatives.hard else None
    objective = CsftObjective(model, config.loss, config.negatives,
                              num_categories=int(world.item_categories.max()) + 1).to(ctx.device)
    if config.negatives.queue_batches and config.negatives.queue_refresh:
        objective.refresh_queue_from(lambda ids: inputs.items(ids.cpu().numpy(), ctx.device))
    optimizer = _optimizer(objective, config)
    step_module = objective
    if ctx.world_size > 1:
        # The category baseline never runs the query tower, hence find_unused_parameters.
        step_module = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
            find_unused_parameters=config.loss.kind == "category_ce")

    inputs_fp = {"encoders": fingerprint_tree(config.encoders), "items": fingerprint_file(world.items_path),
                 "pairs_train": fingerprint_file(pairs.path), "pairs_selected": _rows_fingerprint(pairs.rows)}
    checkpoints = CheckpointManager.for_run(config, inputs_fp)
    resumed = checkpoints.resume(objective, optimizer)
    step = resumed.step if resumed else 0
    if resumed:
        objective.negatives.queue.load_state_dict(_to_device(resumed.extra["queues"][ctx.rank],
                                                             ctx.device))
        if sampler is not None:  # absent from checkpoints written before it was saved
            sampler.fallbacks = resumed.extra.get("hard_negative_fallbacks", 0)
    logger = None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.json", json.dumps(dataclasses.asdict(config), indent=2).encode())
        logger = JsonlLogger(out / "metrics.jsonl", tensorboard_dir=out / "tb")
        logger.forget_after(step)
        logger.log({"event": "resume" if resumed else "start", "world_size": ctx.world_size,
                    "train_pairs": len(pairs), "signals": config.data.signals,
                    "backbone_features_cached": inputs.features,
                    "trainable": describe_trainable(objective)}, step=step)
    started = time.time()
    objective.train()
    # closed (its line ended) before an error is printed, e.g. a diverged loss's
    with tqdm(total=config.steps, initial=step, desc="csft", disable=not ctx.is_main) as progress:
        for step in range(step, config.steps):
            index = _batch_index(step, len(pairs), config.data.batch_size, config.seed)
            mine = slice(ctx.rank * local_batch, (ctx.rank + 1) * local_batch)
            item_ids = pairs.item_ids[index][mine]
            if sampler is not None:  # drawn for the global batch: the same on any world size
                negatives = sampler(pairs.item_ids[index], np.random.default_rng([config.seed, step]))
                item_ids = np.concatenate([item_ids, negatives[mine]])
            batch = inputs.batch(index[mine], item_ids, world.item_categories[item_ids], ctx.device)
            losses = step_module(batch, step)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            progress.update(1)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:  # every rank joins the mean
                record = losses_over_ranks(losses)
                if logger is not None:
                    record.update(_queue_drift(objective, inputs, ctx.device, done))
                    logger.log(record, step=done)
                    progress.set_postfix(loss=f"{record['loss']:.3f}")
            if done % config.checkpoint_every == 0 or done == config.steps:
                _require_finite(losses["loss"], objective, done, checkpoints)
                checkpoints.save(done, objective, optimizer,
                                 extra={"queues": _all_queue_states(objective.negatives.queue),
                                        "hard_negative_fallbacks": sampler.fallbacks if sampler else 0})
    checkpoints.finish()
    final = out / "mm_encoder"
    if ctx.is_main:
        fingerprint = save_mm_encoder(final, model, inputs=inputs_fp,
                                      extra={"steps": config.steps, "signals": config.data.signals,
                                             "loss": config.loss.kind,
                                             "validation": config.data.validation})
        logger.log({"event": "done", "fingerprint": fingerprint,
                    "hard_negative_fallbacks": sampler.fallbacks if sampler else 0,
                    "train_seconds": round(time.time() - started, 1)}, step=config.steps)
        logger.close()
    barrier()
    return final


def untrainable(config: CsftConfig, world: WorldInputs, world_size: int,
                pairs: Optional[Pairs] = None) -> Optional[str]:
    """Why ``config`` would train nothing on ``world`` over ``world_size`` ranks, else None.
    Asked before any model loads, and by csft-tune and csft-ablations for every run before the
    first one trains. ``pairs``: ``config``'s training pairs of ``world`` when the caller has
    read them already (``mim csft`` trains on them), else read here:

    - ``category_ce`` over one category is a softmax over one class, a loss of 0 for any
      weights, so its "trained" towers would be the initial ones;
    - a ``data.batch_size`` the training pairs cannot fill, or the ranks cannot split evenly."""
    import numpy as np
    from mim_rec.config import ConfigError
    from train.pretrain import _local_batch

    if config.loss.kind == "category_ce" and len(np.unique(world.item_categories)) < 2:
        return (f"loss.kind=category_ce: every item of data.world={config.data.world} is in one category, so the "
                "category loss is 0 and nothing trains; use a world of 2 or more categories")
    if pairs is None:
        pairs = world.training_pairs(config.data.signals, config.data.validation)
    try:
        _local_batch(config.data.batch_size, world_size, len(pairs),
                     what=f"training pairs of data.signals={config.data.signals}")
    except ConfigError as error:
        return str(error)
    return None


def _require_finite(loss, objective, step: int, checkpoints) -> None:
    """The loss and the trainable weights must be finite before a step is checkpointed; the
    final step's checkpoint is followed by ``mm_encoder/``, whose NaN scores ``csft-eval``
    would rank as perfect."""
    from mim_rec.utils.run import require_finite

    kept = checkpoints.checkpoints()
    require_finite([loss, *(p for p in objective.parameters() if p.requires_grad)], step,
                   kept[-1].name if kept else None,
                   lambda: f"the C-SFT loss ({loss.item()} on this rank) or weights are not finite",
                   "Lower lr (or head_lr, backbone_lr)")


def feature_cache(config: CsftConfig) -> FeatureCache:
    """Where a run keeps its backbone features: ``data.feature_cache`` (shared by runs on the
    same encoders), else ``OUT/features``. Public: ``csft-tune`` and ``csft-ablations`` share
    it over their runs, and ``mim pipeline`` opens the world with it to check the stage's batch
    before the chain starts."""
    from mim_rec.csft.data import FeatureCache
    return FeatureCache(config.data.feature_cache or Path(config.out) / "features")


def _optimizer(objective, config):
    """AdamW: backbone layers (when they train) at ``backbone_lr``, the stage-1 projection heads
    at ``head_lr`` (default ``lr``), everything else at ``lr``."""
    import torch
    model = objective.model
    backbone_ids = {id(p) for m in model.backbone_modules().values() for p in m.parameters()}
    heads = (model.items.pair.vision_head, model.items.pair.text_head, model.queries.head)
    head_ids = {id(p) for head in heads for p in head.parameters()}
    trainable = [p for p in objective.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in backbone_ids | head_ids], "lr": config.lr},
              {"params": [p for p in trainable if id(p) in head_ids],
               "lr": config.lr if config.head_lr is None else config.head_lr}]
    backbone = [p for p in trainable if id(p) in backbone_ids]
    if backbone:
        groups.append({"params": backbone, "lr": config.backbone_lr})
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.weight_decay)


def _rows_fingerprint(rows) -> str:
    """Which rows of the pairs file train: the signal selection can change under the same
    settings (``signals=[click]`` once meant the clicks not bought), and a checkpoint of
    other rows must not be resumed or re-evaluated as this run's."""
    import hashlib

    import numpy as np
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def _queue_drift(objective, inputs, device, step: int) -> Dict[str, float]:
    """How stale the queue is when step ``step`` reads it: 1 - mean cosine between the
    oldest queued item rows and the same items embedded by the current weights (0 = exact),
    and their age in steps."""
    import torch
    oldest = objective.negatives.queue.oldest()
    if oldest is None or objective.negatives.refresh is not None:  # refreshed rows never drift
        return {}
    with torch.no_grad():
        was_training = objective.training
        objective.eval()
        images, titles = inputs.items(oldest.item_ids.cpu().numpy(), device)
        items = objective.model.items
        now = items.from_features(images, titles)  # a queue implies frozen backbones: cached features
        objective.train(was_training)
    cosine = torch.nn.functional.cosine_similarity(now.mm, oldest.embeddings["item"], dim=-1)
    return {"queue_drift": 1.0 - cosine.mean().item(), "queue_age": step - oldest.step}


def _all_queue_states(queue):
    """Every rank's queue (in rank order, on the CPU): without all-gather they differ."""
    import torch.distributed as dist
    mine = _to_device(queue.state_dict(), "cpu")
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def _to_device(state, device):
    import torch
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_device(v, device) for v in state]
    return state


# ----------------------------------------------------------------------------- evaluation

def evaluate_run(config, evaluable: Optional[Tuple[WorldInputs, HeldOut]] = None) -> Dict[str, Dict[str, float]]:
    """Stage-1 embeddings vs the run's ``mm_encoder/`` on the held-out pairs and impressions
    (the test files, or the validation period when ``data.validation > 0``); writes
    ``OUT/eval.json``. ``evaluable``: what :func:`check_evaluable` returned for ``config`` when
    it ran already (``mim csft --eval`` checks before training), else checked here."""
    from mim_rec.csft.evaluate import csft_embeddings, evaluate_embeddings, stage1_embeddings
    from mim_rec.csft.model import load_csft_model
    from mim_rec.encoders import load_encoders

    from mim_rec.config import ConfigError
    from mim_rec.data.manifest import fingerprint_tree, read_manifest
    from train.common import write_eval_report

    out = Path(config.out)
    if not (out / "mm_encoder" / "manifest.json").exists():
        raise ConfigError(f"out={out} holds no C-SFT model (mm_encoder/); point out= at a finished C-SFT run")
    manifest = read_manifest(out / "mm_encoder")
    trained_from = manifest.inputs.get("encoders")
    if trained_from is not None and trained_from != fingerprint_tree(config.encoders):
        raise ConfigError(f"encoders={config.encoders}: not the stage-1 encoders {out / 'mm_encoder'} was trained "
                          "from, so its stage-1 row would compare other towers")
    _require_held_out(config.data.validation, manifest.extra.get("validation", 0.0), out)
    world, held_out = evaluable or check_evaluable(config)
    note_catalogue_size(world, config.eval.ks)
    report: Dict[str, Dict[str, float]] = {}
    for row, source, embed in (
            ("stage1", config.encoders, lambda: stage1_embeddings(load_encoders(config.encoders), world, held_out)),
            ("csft", out / "mm_encoder", lambda: csft_embeddings(load_csft_model(out / "mm_encoder"), world,
                                                                 held_out))):
        started = time.time()
        report[row] = evaluate_embeddings(embed(), world, config.eval.ks, held_out, source=str(source))
        report[row]["seconds"] = round(time.time() - started, 1)
    write_eval_report(out, report, [world.items_path, held_out.pairs.path, held_out.events_path],
                      split=held_out.name, validation=config.data.validation)
    return report


def note_catalogue_size(world, ks) -> None:
    """Say when a recall@k ranks a catalogue of k or fewer items (1 by construction)."""
    from train.common import note_trivial_recall
    note_trivial_recall(world.item_count, ks, f"{world.item_count} items in the catalogue of data.world={world.world}")


def _require_held_out(validation: float, trained: float, out: Path) -> None:
    """Refuse an evaluation period the run trained on: ``data.validation = v`` scores the latest
    share ``v`` of the training pairs, and a run trained with ``data.validation = t`` trained on
    all but the latest ``t`` (written before the setting existed: on all, ``t = 0``). The test
    files (``v = 0``) were never trained on."""
    from mim_rec.config import ConfigError
    if validation and validation > trained:
        raise ConfigError(f"data.validation={validation}: the run in {out} was trained with data.validation="
                          f"{trained}, so that period holds pairs it trained on; evaluate with "
                          + (f"0 < data.validation <= {trained} or " if trained else "")
                          + "data.validation=0 (the test files)")


def format_table(report: Dict[str, Dict[str, float]]) -> str:
    from train.csft_runs import metric_columns
    columns = metric_columns(next(iter(report.values())))
    lines = ["| embeddings | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, metrics in report.items():
        lines.append(f"| {row} | " + " | ".join(f"{metrics[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines)
