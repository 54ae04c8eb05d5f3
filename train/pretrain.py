"""``mim pretrain``: stage 1 (DDA then DMA) on the item corpus; ``mim pretrain-eval``:
the Table 3 comparison of plain, +DDA and +DDA+DMA encoders.

A run folder holds ``config.json``, ``checkpoints/`` (periodic, for exact resume after a
kill: re-run the same command), ``metrics.jsonl`` (+ ``tb/`` when TensorBoard is
installed), ``dda/`` (the encoders after DDA) and ``encoders/`` (the final artifact).
Multi-process: ``torchrun --nproc-per-node 2 -m train.cli pretrain ...`` (gloo on CPU,
nccl on GPU); the global batch is split over ranks and contrastive negatives gathered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from train.stage_cli import StageCommands, register_stage

if TYPE_CHECKING:
    import numpy as np

    from mim_rec.encoders import EncoderPair
    from mim_rec.encoders.config import EncodersConfig, VisionConfig
    from mim_rec.pretrain.config import PretrainConfig
    from mim_rec.pretrain.corpus import ItemCorpus

DEFAULT_EVAL_ROWS = ("plain", "dda", "dda+dma")


def register(subparsers: argparse._SubParsersAction) -> None:
    register_stage(subparsers, StageCommands(
        name="pretrain",
        help="stage 1: DDA + DMA pre-training of the image and title encoders",
        eval_help="recall@1/@10 and category linear probe for plain, +DDA, +DDA+DMA",
        config_type="PretrainConfig (mim_rec/pretrain/config.py)",
        example="data.world=DIR (default data/world) out=DIR (default runs/pretrain) dma_steps=200",
        load=_load, check_eval=check_evaluable, train=lambda config, _: run_pretrain(config),
        report=lambda config, checked: format_table(evaluate_run(config, split_checked=bool(checked)))))


def _load(args: argparse.Namespace):
    """The config, with the vision tower the world's items can feed (pixels or features)."""
    from mim_rec.config import load_config, require_existing
    from mim_rec.pretrain.config import PretrainConfig
    from mim_rec.pretrain.corpus import vision_for_items

    config = check_config(load_config(PretrainConfig, args.config, args.overrides))
    require_existing(config, ("data.world",))
    _check_world_manifest(config.data.world)
    vision = vision_for_items(config.encoders.vision, config.data.world)
    if vision != config.encoders.vision:
        print(f"mim pretrain: the items carry image_feature vectors and no pixels: vision tower "
              f"'{vision.name}' ({vision.feature_dim}-d) instead of '{config.encoders.vision.name}'",
              file=sys.stderr)
        config.encoders.vision = vision
    return config


def check_evaluable(config: PretrainConfig) -> bool:
    """Refuse a held-out split ``pretrain-eval`` cannot score (:func:`_check_split_sizes`), from
    the item ids alone, before any tower is built or image decoded: ``mim pretrain --eval``
    found one only after training, and ``pretrain-eval`` after building the plain row's towers
    and decoding every item image. A world without its items file is the corpus's to name.
    Returns True, that the split was checked: ``mim pretrain --eval`` hands it to
    :func:`evaluate_run`, which no longer reads the item ids again to check it a second time."""
    from mim_rec.data.io import read_parquet_columns
    from mim_rec.pretrain.corpus import heldout_mask, items_path

    items = items_path(config.data.world)
    if items.is_file():
        ids = read_parquet_columns(items, ["item_id"]).column("item_id").to_numpy()
        _check_split_sizes(int(heldout_mask(ids, config.data.heldout_fraction).sum()), len(ids),
                           config.data.heldout_fraction)
    return True


def _require_readable_items(world: str, vision: VisionConfig) -> None:
    """Refuse the world's items whose images the tower ``vision`` configures cannot read
    (:func:`~mim_rec.pretrain.corpus.require_stored_images`), before any tower is built: the
    corpus refused such a row only after building them (``mim pretrain``; ``pretrain-eval``, the
    plain row's). A world without its items file is the corpus's to name."""
    from mim_rec.pretrain.corpus import items_path, require_stored_images

    items = items_path(world)
    if items.is_file():
        require_stored_images(items, vision)


def _check_world_manifest(world: str) -> None:
    """``mim data validate``'s check of a world folder's manifest against its items (the
    manifest's item count), before the encoders load; the item count is the file's footer's
    (a bad row is refused when the corpus is read). ``data.world`` may name the items file
    alone, which has no world manifest; a folder without items.parquet is the corpus's to name."""
    from mim_rec.data.io import check_world_manifest, open_parquet
    from mim_rec.pretrain.corpus import items_path

    items = items_path(world)
    if Path(world).is_dir() and items.is_file():
        check_world_manifest(world, open_parquet(items).metadata.num_rows)


def check_config(config: PretrainConfig) -> PretrainConfig:
    """Refuse settings that would fail inside training or train nothing, without reading the
    world (``mim pipeline`` checks them before the world is made); returns ``config``."""
    from mim_rec.config import ConfigError, require_fraction, require_not_negative, require_positive
    from mim_rec.encoders.config import check_normalisation

    require_positive(config, ("data.batch_size", "head_warmup_batch_size", "lr", "backbone_lr", "head_warmup_lr",
                              "checkpoint_every", "log_every", "encoders.shared_dim", "encoders.vision.image_size",
                              "encoders.vision.feature_dim", "encoders.text.max_length", "eval.batch_size",
                              "eval.probe_steps", "eval.probe_lr", "eval.probe_batch_size"))
    require_not_negative(config, ("dda_steps", "dma_steps", "head_warmup_steps", "image_ssl_weight", "weight_decay",
                                  "seed", "eval.seed", "encoders.vision.trainable_groups",
                                  "encoders.text.trainable_layers"))
    require_fraction(config, ("mlm_probability", "data.heldout_fraction"))
    _require_contrastive_batches(config)
    if config.dda_steps + config.dma_steps == 0:
        raise ConfigError("dda_steps=0 dma_steps=0: nothing to train")
    check_normalisation(config.encoders.vision)
    return config


def _contrastive_batches(config: PretrainConfig) -> List[str]:
    """The batch-size settings whose batches an InfoNCE reads in this run: the training batch
    (DDA's two image views, when the tower reads pixels; DMA), the head warm-up's (run before
    DMA) and the evaluation probe's. A batch's other items are its only negatives."""
    image_ssl = config.dda_steps > 0 and config.image_ssl_weight > 0 and config.encoders.vision.name != "precomputed"
    keys = ["data.batch_size"] if image_ssl or config.dma_steps > 0 else []
    if config.head_warmup_steps > 0 and config.dma_steps > 0:
        keys.append("head_warmup_batch_size")
    return keys + ["eval.probe_batch_size"]


def _require_contrastive_batches(config: PretrainConfig) -> None:
    """Refuse a batch of one item where an InfoNCE reads it: with no negative its loss is
    identically 0, and the contrastive objectives trained nothing without a word.
    ``data.batch_size`` is the global batch (ranks gather each other's rows as negatives)."""
    from operator import attrgetter

    from mim_rec.config import ConfigError

    for key in _contrastive_batches(config):
        value = attrgetter(key)(config)
        if value < 2:
            raise ConfigError(f"{key}={value}: a contrastive batch needs at least 2 items (the other items are "
                              "its only negatives; with 1 the loss is 0 and nothing trains)")


# ----------------------------------------------------------------------------- training

def run_pretrain(config) -> Path:
    """Train (or resume) a run in ``config.out``; returns the final encoders folder."""
    from mim_rec.utils.run import run_folder_lock

    _check_run_folder(config)  # before the lock, which would leave its file in a foreign folder
    with run_folder_lock(config.out):
        return _run_pretrain(config)


# What a `mim pretrain` run writes into its folder. Dot files (the run lock, the temporaries of
# atomic writes a kill left behind) are the machinery's own.
RUN_FILES = frozenset({"config.json", "checkpoints", "metrics.jsonl", "tb", "dda", "encoders", "eval.json"})
# What a run leaves that a fresh start must not inherit.
EARLIER_ARTIFACTS = ("dda", "encoders", "eval.json")


def _check_run_folder(config: PretrainConfig) -> None:
    """Refuse to train into a folder that holds anything but a `mim pretrain` run, before
    anything is written: training rewrites config.json and trims metrics.jsonl, which wiped a
    C-SFT run's metrics, replaced a folder's own config.json and wrote into a world folder.
    Another pretrain run's folder passes: checkpoints of another config are refused on resume,
    and a fresh start clears the earlier run's artifacts (:func:`_clear_earlier_artifacts`)."""
    from train.common import require_own_run_folder
    from train.dcp_checkpoints import DCP_STEP_GLOB

    _saved_config(config, "use an empty or new out=")
    require_own_run_folder(config.out, "mim pretrain", RUN_FILES, DCP_STEP_GLOB)


def _architecture(pair: "EncoderPair") -> Dict[str, Any]:
    """What a checkpoint records of how the vision tower was built beyond its weights, as its
    config file reads back (a YAML list and the same tuple in Python are one setting)."""
    return {"vision_architecture": json.loads(json.dumps(getattr(pair.vision, "architecture", {})))}


def _require_same_vision_architecture(extra: Dict[str, Any], pair: "EncoderPair", config: PretrainConfig) -> None:
    """Refuse to train on a checkpoint whose vision tower was built otherwise (padding, eps:
    not weights, so neither the config's fingerprint nor the weights' tell). A checkpoint
    written before this was recorded had only the configured ``model_kwargs``; since
    2026-12-07 the bundled EfficientNet-Lite0 weights add TF SAME padding and eps 1e-3."""
    from mim_rec.config import ConfigError

    before = extra.get("vision_architecture", json.loads(json.dumps(config.encoders.vision.model_kwargs)))
    now = _architecture(pair)["vision_architecture"]
    if before != now:
        raise ConfigError(f"{config.out}/checkpoints: trained with the vision tower built with {before} and this "
                          f"code builds it with {now} (the bundled EfficientNet-Lite0 weights run with TF SAME "
                          "padding since 2026-12-07); use a fresh output folder")


def _clear_earlier_artifacts(out: Path) -> None:
    """On a fresh start (no checkpoint resumed), remove what an earlier run in the folder left:
    ``dda/`` is written only when DDA completes, so a run killed before then (or one with
    ``dda_steps=0``) kept the earlier run's, and evaluation reported it as this run's +DDA."""
    import shutil

    for name in EARLIER_ARTIFACTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _run_pretrain(config) -> Path:
    import torch
    from tqdm import tqdm

    from mim_rec.data.manifest import fingerprint_file
    from mim_rec.encoders import EncoderPair, save_encoders
    from mim_rec.encoders.freeze import describe_trainable
    from mim_rec.pretrain.corpus import heldout_mask, items_path, load_corpus
    from mim_rec.pretrain.objective import PretrainObjective
    from mim_rec.utils.dist import barrier, init_distributed, losses_over_ranks
    from mim_rec.utils.run import JsonlLogger, atomic_write_bytes, seed_everything
    from train.common import CheckpointManager

    ctx = init_distributed(config.device)
    out = Path(config.out)
    _require_readable_items(config.data.world, config.encoders.vision)
    seed_everything(config.seed)  # identical initial weights on every rank
    pair = EncoderPair(config.encoders)
    objective = PretrainObjective(pair, config.mlm_probability, config.image_ssl_weight).to(ctx.device)
    corpus = load_corpus(config.data.world, pair.vision)
    held_out = heldout_mask(corpus.item_ids, config.data.heldout_fraction)
    train_items = corpus.subset(~held_out)
    local_batch = training_batch(config, held_out, ctx.world_size)
    optimizer = _optimizer(objective, config)
    model = objective
    if ctx.world_size > 1:
        # Each phase leaves the other phase's heads unused, hence find_unused_parameters.
        model = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
            find_unused_parameters=True)

    inputs = {"items": fingerprint_file(items_path(config.data.world))}
    checkpoints = CheckpointManager.for_run(config, inputs)
    seed_everything(config.seed + 1000 * ctx.rank)  # each rank draws its own masks and views
    resumed = checkpoints.resume(objective, optimizer)
    if resumed is not None:
        _require_same_vision_architecture(resumed.extra, pair, config)
    step = resumed.step if resumed else 0
    logger = None
    if ctx.is_main:
        if resumed is None:
            _clear_earlier_artifacts(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.json", json.dumps(dataclasses.asdict(config), indent=2).encode())
        logger = JsonlLogger(out / "metrics.jsonl", tensorboard_dir=out / "tb")
        logger.forget_after(step)
        logger.log({"event": "resume" if resumed else "start", "world_size": ctx.world_size,
                    "train_items": len(train_items), "heldout_items": len(corpus) - len(train_items),
                    "vision": describe_trainable(pair.vision), "text": describe_trainable(pair.text)},
                   step=step)
    total = config.dda_steps + config.dma_steps
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16,
                              enabled=config.precision == "bf16")
    progress = tqdm(total=total, initial=step, desc="pretrain", disable=not ctx.is_main)
    started = time.time()
    # The warm-up belongs to the boundary step: a checkpoint at step dda_steps is only ever
    # written after it, so a run resumed there never redoes it and one killed during it
    # resumes from an earlier checkpoint and redoes it identically (it is seeded).
    warmup = config.head_warmup_steps > 0 and config.dma_steps > 0
    if warmup and step == config.dda_steps and resumed is None:  # dda_steps == 0
        _warm_up_heads(objective, optimizer, checkpoints, train_items, config, ctx, logger, step)
    model.train()
    for step in range(step, total):
        phase = "dda" if step < config.dda_steps else "dma"
        index = _batch_index(step, len(train_items), config.data.batch_size, config.seed)
        index = index[ctx.rank * local_batch:(ctx.rank + 1) * local_batch]
        titles = [train_items.titles[i] for i in index]
        with autocast:
            losses = model(phase, titles, train_items.images[torch.from_numpy(index)])
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        progress.update(1)
        done = step + 1
        if done % config.log_every == 0 or done == total:
            logged = losses_over_ranks(losses)
            if logger is not None:
                logger.log({"phase": phase, **logged}, step=done)
                progress.set_postfix(phase=phase, loss=f"{logged['loss']:.3f}")
        if done == config.dda_steps or done % config.checkpoint_every == 0 or done == total:
            _require_finite(objective, done, checkpoints)  # before the writes below
        if done == config.dda_steps and ctx.is_main:
            save_encoders(out / "dda", pair, stage="pretrain", inputs=inputs,
                          extra={"phases": ["dda"], "steps": done})
        if warmup and done == config.dda_steps:
            _warm_up_heads(objective, optimizer, checkpoints, train_items, config, ctx, logger, done)
        elif done % config.checkpoint_every == 0 or done == total:
            checkpoints.save(done, objective, optimizer, extra={"phase": phase, **_architecture(pair)})
    progress.close()
    checkpoints.finish()
    final = out / "encoders"
    if ctx.is_main:
        phases = [p for p, n in (("dda", config.dda_steps), ("dma", config.dma_steps)) if n > 0]
        save_encoders(final, pair, stage="pretrain", inputs=inputs,
                      extra={"phases": phases, "steps": total})
        logger.log({"event": "done", "train_seconds": round(time.time() - started, 1)}, step=total)
        logger.close()
    barrier()
    return final


def _warm_up_heads(objective, optimizer, checkpoints, train_items, config, ctx, logger,
                   step: int) -> None:
    """LP-FT: fit the pair's projection heads and the CLIP temperature on frozen tower
    features of the training items (the evaluation probe's loop), so DMA starts from aligned
    heads; then checkpoint ``step``. Rank 0 trains and broadcasts, which makes identical
    weights on every rank a guarantee rather than a property of deterministic kernels."""
    import torch.distributed as dist

    from mim_rec.pretrain.evaluate import fit_clip_heads

    started = time.time()
    pair, temperature = objective.pair, objective.clip.temperature
    features = _embed_items(pair, train_items, config.eval.batch_size, ctx)
    loss = fit_clip_heads(pair.vision_head, pair.text_head, temperature, features,
                          config.head_warmup_steps, config.head_warmup_lr,
                          config.head_warmup_batch_size, config.seed,
                          progress="head warm-up") if ctx.is_main else None
    if ctx.world_size > 1:
        for head in (pair.vision_head, pair.text_head, temperature):
            for param in head.parameters():
                dist.broadcast(param.data, src=0)
    if logger is not None:
        logger.log({"event": "head_warmup", "loss": loss, "steps": config.head_warmup_steps,
                    "seconds": round(time.time() - started, 1)}, step=step)
    objective.train()  # embedding switched the pair to eval mode
    _require_finite(objective, step, checkpoints)
    checkpoints.save(step, objective, optimizer, extra={"phase": "head_warmup", **_architecture(pair)})


def _require_finite(objective, step: int, checkpoints) -> None:
    """The weights must be finite before a checkpoint or an encoders artifact holds them. The
    weights are checked, not the last loss, so that a non-finite loss at any step since the
    last save, or in the head warm-up, is caught."""
    from mim_rec.utils.run import require_finite

    tensors = {name: t for name, t in objective.state_dict().items() if t.is_floating_point()}

    def describe() -> str:
        bad = [name for name, t in tensors.items() if not bool(t.isfinite().all())]
        return (f"training diverged (the loss went NaN/inf): {len(bad)} of {len(tensors)} weight tensors are "
                f"NaN/inf on this rank (first: {bad[0] if bad else 'none'})")

    kept = checkpoints.checkpoints()
    require_finite(list(tensors.values()), step, kept[-1].name if kept else None, describe,
                   "Lower lr or backbone_lr, or check the inputs and encoders.vision.mean/std")


def _embed_items(pair, items, batch_size: int, ctx):
    """Frozen tower features of ``items`` on rank 0 (None elsewhere). Each rank embeds a
    contiguous shard -- the towers' forward pass is the costly part and splits evenly --
    and rank 0 gathers the shards in rank order."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from mim_rec.pretrain.evaluate import Embedded, embed

    if ctx.world_size == 1:
        return embed(pair, items, batch_size)
    mask = np.zeros(len(items), dtype=bool)
    mask[np.array_split(np.arange(len(items)), ctx.world_size)[ctx.rank]] = True
    mine = embed(pair, items.subset(mask), batch_size)
    parts = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(mine, parts, dst=0)
    if not ctx.is_main:
        return None
    return Embedded(*(torch.cat([getattr(p, f.name) for p in parts])
                      for f in dataclasses.fields(Embedded)))


def check_batch_split(global_batch: int, world_size: int) -> None:
    """Refuse a global batch the ranks cannot share evenly (each takes ``global_batch //
    world_size``); ``mim pipeline`` checks its ``--nproc`` with it before any stage runs."""
    from mim_rec.config import ConfigError

    if global_batch % world_size:
        raise ConfigError(f"data.batch_size={global_batch} is not divisible by the {world_size} ranks")


def _local_batch(global_batch: int, world_size: int, train_items: int,
                 remedy: str = "lower the batch size", what: str = "training items") -> int:
    """Each rank's share of the global batch; ``remedy`` ends the error for too few items
    (pre-training names the held-out share, which can leave too few), and ``what`` names what
    ``train_items`` counts (C-SFT's are pairs, fewer than the world's items or more)."""
    from mim_rec.config import ConfigError

    check_batch_split(global_batch, world_size)
    if train_items < global_batch:
        raise ConfigError(f"data.batch_size={global_batch}: only {train_items} {what}; {remedy}")
    return global_batch // world_size


def training_batch(config: PretrainConfig, held_out: np.ndarray, world_size: int) -> int:
    """Each rank's share of ``data.batch_size`` over the world's items less the held-out ones
    (``held_out``: :func:`~mim_rec.pretrain.corpus.heldout_mask` of the world's item ids, which
    pre-training computes once for both), refusing a batch they cannot fill. ``mim pipeline``
    and ``mim experiment`` ask it with the world's items before pre-training runs."""
    train_items = int((~held_out).sum())
    return _local_batch(config.data.batch_size, world_size, train_items,
                        f"data.heldout_fraction={config.data.heldout_fraction} of the {len(held_out)} items "
                        "is held out for evaluation; lower data.batch_size or data.heldout_fraction")


def _batch_index(step: int, count: int, batch: int, seed: int):
    """The global batch of a step: a pure function of (seed, step), so a resumed run reads
    exactly the batches the killed run would have (the data position is the step)."""
    import numpy as np
    per_epoch = count // batch
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(count)
    return order[offset * batch:(offset + 1) * batch]


def _optimizer(objective, config):
    """AdamW with two groups: pretrained backbone layers learn 10x slower than the fresh
    heads, the MLM/SSL heads and the temperature."""
    import torch
    pair = objective.pair
    backbone_ids = {id(p) for p in [*pair.vision.parameters(), *pair.text.parameters()]}
    trainable = [p for p in objective.parameters() if p.requires_grad]
    backbone = [p for p in trainable if id(p) in backbone_ids]
    heads = [p for p in trainable if id(p) not in backbone_ids]
    return torch.optim.AdamW([{"params": backbone, "lr": config.backbone_lr},
                              {"params": heads, "lr": config.lr}],
                             weight_decay=config.weight_decay)


# ----------------------------------------------------------------------------- evaluation

def evaluate_run(config, rows: Optional[List[str]] = None,
                 split_checked: bool = False) -> Dict[str, Dict[str, float]]:
    """Evaluate the plain encoders and the run's ``dda/`` and ``encoders/`` artifacts on the
    held-out items; writes ``OUT/eval.json``. ``split_checked``: :func:`check_evaluable` ran for
    ``config`` already (``mim pretrain --eval`` checks before training), else it runs here."""
    from mim_rec.data.manifest import read_manifest
    from mim_rec.encoders import EncoderPair, load_encoders
    from mim_rec.pretrain.corpus import items_path
    from mim_rec.pretrain.evaluate import evaluate_pair
    from mim_rec.utils.run import seed_everything
    from train.common import write_eval_report

    out = Path(config.out)
    encoders = _plain_encoders(config, _check_evaluated_run(config))
    sources = {"plain": None, "dda": out / "dda", "dda+dma": out / "encoders"}
    _check_evaluated_world(config, [source for source in sources.values() if source is not None])
    if not split_checked:
        check_evaluable(config)
    _require_readable_items(config.data.world, encoders.vision)  # the run's tower, which its artifacts share
    report: Dict[str, Dict[str, float]] = {}
    splits: Dict[Optional[int], Tuple[ItemCorpus, ItemCorpus]] = {}
    for row in rows or DEFAULT_EVAL_ROWS:
        source = sources[row]
        if source is not None and not (source / "manifest.json").exists():
            print(f"note: no {source}: row '{row}' left out (the run has not finished that phase)", file=sys.stderr)
            continue
        started = time.time()
        seed_everything(config.seed)  # the plain row's (random) heads are seeded
        pair = EncoderPair(encoders) if source is None else load_encoders(source)
        train_items, heldout_items = _split_items(config, pair.vision, splits)
        report[row] = evaluate_pair(pair, train_items, heldout_items, config.eval,
                                    source=f"the {row} encoders" if source is None else str(source))
        report[row]["seconds"] = round(time.time() - started, 1)
        # the training steps behind the row: a folder re-trained with other step counts says so
        report[row]["steps"] = 0 if source is None else read_manifest(source).extra.get("steps")
    write_eval_report(out, report, [items_path(config.data.world)],
                      heldout_fraction=config.data.heldout_fraction)
    return report


def _plain_encoders(config: PretrainConfig, run: PretrainConfig) -> EncodersConfig:
    """The plain row's encoder settings: those of ``run`` (the config.json of the run in
    ``config.out``), which its artifacts were trained from. The command line's used to be taken,
    so ``pretrain-eval data.world=W out=R`` scored the real EfficientNet + MiniLM as the plain
    row of a tiny run; encoder settings given there now are said to be unused."""
    from train.common import config_dict

    if config_dict(config.encoders) != config_dict(run.encoders):
        print(f"note: the plain row uses the encoders.* settings of {Path(config.out) / 'config.json'} "
              "(the run's), not the command line's", file=sys.stderr)
    return run.encoders


def _split_items(config: PretrainConfig, vision, splits: Dict[Optional[int], Tuple[ItemCorpus, ItemCorpus]]
                 ) -> Tuple[ItemCorpus, ItemCorpus]:
    """The (training, held-out) items with images decoded for ``vision``'s input size: each
    artifact's rows at its own size (the first row's size was used for all three). ``splits``
    keeps each size's decoding (None: feature vectors), so rows of one size decode once. Says
    when recall@10 is 1 by construction (every candidate of 10 or fewer ranks in the top 10),
    lest it read as a result; :func:`check_evaluable` refused a split too small to score."""
    from mim_rec.encoders.vision import PrecomputedVisionEncoder
    from mim_rec.pretrain.corpus import heldout_mask, load_corpus
    from train.common import note_trivial_recall

    size = None if isinstance(vision, PrecomputedVisionEncoder) else vision.image_processor.size
    if size not in splits:
        corpus = load_corpus(config.data.world, vision)
        heldout = heldout_mask(corpus.item_ids, config.data.heldout_fraction)
        if not splits:  # the same split at every size: said once
            count, fraction = int(heldout.sum()), config.data.heldout_fraction
            note_trivial_recall(count, (10,), f"{count} held-out items (data.heldout_fraction={fraction} of "
                                              f"{len(corpus)})")
        splits[size] = (corpus.subset(~heldout), corpus.subset(heldout))
    return splits[size]


def _check_split_sizes(heldout: int, items: int, fraction: float) -> None:
    """Refuse an empty held-out set, and training items too few for the probe's contrastive
    batch (it takes ``min(eval.probe_batch_size, training items)``): with none, embedding them
    ended in a traceback; with one, the probe's InfoNCE had no negative, its loss was 0 and its
    heads trained nothing (what ``eval.probe_batch_size=1`` is refused for). A run's own world
    usually has enough (its training batch did, unless that batch is one item), so this is
    mostly a plain row on a smaller world."""
    from mim_rec.config import ConfigError

    if heldout == 0:
        raise ConfigError(f"data.heldout_fraction={fraction}: none of the {items} items is held out; "
                          "nothing to evaluate on (use a larger world)")
    if items - heldout < 2:
        raise ConfigError(f"data.heldout_fraction={fraction}: {items - heldout} of the {items} items left to train "
                          "the probe heads on; their contrastive batch needs at least 2 (the other items are its "
                          "only negatives): use a larger world or a lower data.heldout_fraction")


def _saved_config(config: PretrainConfig, remedy: str) -> Optional[PretrainConfig]:
    """The PretrainConfig of the run in ``config.out``, None when it holds no config.json.
    Another stage's config.json (a C-SFT run's has other keys), or any other, is refused
    (``remedy`` ends the error): that folder's files are not ours to rewrite."""
    from mim_rec.config import ConfigError, from_dict
    from mim_rec.pretrain.config import PretrainConfig

    saved = Path(config.out) / "config.json"
    if not saved.is_file():
        return None
    try:
        return from_dict(PretrainConfig, json.loads(saved.read_text()))
    except ValueError as exc:  # not JSON, or a ConfigError: keys or types of another config
        raise ConfigError(f"out={config.out}: {saved} is not the config of a `mim pretrain` run ({exc}); "
                          f"{remedy}") from exc


def _check_evaluated_run(config: PretrainConfig) -> PretrainConfig:
    """The config of the pretrain run ``config.out`` holds. Refused: anything but a pretrain
    run, and more items held out than it held out (the extra ones were trained on, and their
    retrieval scores would pass as held-out)."""
    from mim_rec.config import ConfigError

    remedy = "point out= at a pretrain run folder"
    run = _saved_config(config, remedy)
    if run is None:
        raise ConfigError(f"out={config.out}: no `mim pretrain` run here (no config.json); {remedy}")
    trained = run.data.heldout_fraction
    if config.data.heldout_fraction > trained:
        raise ConfigError(f"data.heldout_fraction={config.data.heldout_fraction}: the run in {config.out} held "
                          f"out {trained}, so the items past that were trained on; evaluate with at most {trained}")
    return run


def _check_evaluated_world(config: PretrainConfig, artifacts: List[Path]) -> None:
    """Refuse ``data.world`` when the run's artifacts were trained on other items: the held-out
    split hashes item ids, so on another world (a re-import that numbers the same items
    otherwise) items the run trained on would be scored as held out. Artifacts saved before
    their inputs were recorded are not checked."""
    from mim_rec.config import ConfigError
    from mim_rec.data.manifest import fingerprint_file, read_manifest
    from mim_rec.pretrain.corpus import items_path

    items = items_path(config.data.world)
    current = fingerprint_file(items) if items.is_file() else None
    for artifact in artifacts:
        if not (artifact / "manifest.json").exists():
            continue
        trained = read_manifest(artifact).inputs.get("items")
        if trained is not None and trained != current:
            raise ConfigError(f"data.world={config.data.world}: the run in {config.out} trained on another "
                              f"items.parquet (its {artifact.name}/ records {trained}, this world's is {current}); "
                              "its held-out items are those of the world it trained on: evaluate there")


def format_table(report: Dict[str, Dict[str, float]]) -> str:
    columns = ["steps", "own_i2t_r1", "own_i2t_r10", "own_t2i_r1", "own_t2i_r10", "probe_i2t_r1",
               "probe_i2t_r10", "probe_t2i_r1", "probe_t2i_r10", "image_linear_probe_acc",
               "title_linear_probe_acc"]
    lines = ["| encoders | " + " | ".join(columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for row, metrics in report.items():
        lines.append(f"| {row} | {metrics.get('steps', '?')} | "
                     + " | ".join(_cell(metrics[c]) for c in columns[1:]) + " |")
    return "\n".join(lines)


def _cell(value: Optional[float]) -> str:
    """3 decimals; None is a linear probe on a world of one category (accuracy 1 by construction)."""
    return "n/a (one category)" if value is None else f"{value:.3f}"
