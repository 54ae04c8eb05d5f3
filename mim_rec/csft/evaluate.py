"""C-SFT evaluation: does an embedding space capture *content interest*?

Two measures, each computed for the stage-1 embeddings and for the C-SFT towers:

* **query -> item retrieval** on the held-out pairs (``pairs_test``, every signal): each
  query image is embedded, every item of the catalogue is scored by cosine, and recall@k is
  the share of queries whose paired item ranks in the top k (a tie counts against it:
  :func:`mim_rec.pretrain.evaluate.target_ranks`). Items identical to the paired one in
  both title and stored image (a catalogue's repeats under other ids) are masked out of its
  negatives (:class:`~mim_rec.pretrain.evaluate.Twins`): the item tower reads both, so an
  item that differs in either can be told apart and stays a negative. Each held-out pair is
  its own query: pairs whose query images are the same but whose items differ are separate
  observed interests, not a repeated item, and each keeps the other's item as a negative.
* **content-interest AUC** on the held-out impressions (``events_test``): an impression's
  score is its target's mean cosine to the user's behaviour history, ``mean_i cos(h_t, h_i)``
  (the content-interest weights CiUBM uses); ``pair_auc`` is the share of (click,
  non-click) impression pairs *of the same user* that the score orders correctly (ties
  half), pooled over users; ``gauc`` is the impression-weighted mean of per-user AUCs.
  Impressions with an empty history have no score and are left out (counted).

Stage-1 embeddings: a query is its stage-1 image embedding, an item ``unit(h_img + h_txt)``
(what the representation center stores without C-SFT).

Both measures read a :class:`~mim_rec.csft.data.HeldOut`: the test files by default, or the
validation period carved from the training files (``data.validation``) to choose settings on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from mim_rec.csft.data import HeldOut, WorldInputs
from mim_rec.csft.model import CsftModel
from mim_rec.data.errors import DataError
from mim_rec.data.io import read_events
from mim_rec.data.schemas import PAIRS
from mim_rec.encoders.config import VisionConfig
from mim_rec.encoders.pair import EncoderPair
from mim_rec.metrics import gauc, grouped_auc
from mim_rec.pretrain.corpus import require_stored_images
from mim_rec.pretrain.evaluate import Twins, recall_at


# Names what an evaluation computes beyond its inputs; a cached result (``train/csft_runs.py``) is
# keyed by it, so a table never mixes results scored before and after a change (2026-12-07:
# content twins masked, and the candidate count that tells a recall of 1 by construction).
EVALUATION_RULES = "content twins masked; candidate items counted"


@dataclass
class Embedded:
    queries: torch.Tensor     # [n_held_out_pairs, d] unit
    items: torch.Tensor       # [n_items, d] unit, row i = item i
    item_content: np.ndarray  # [n_items] int64, equal for items identical in title and image


def history_scores(items: torch.Tensor, events: pa.Table) -> Dict[str, torch.Tensor]:
    """Per impression with a non-empty history: ``mean_i cos(h_target, h_i)``, with its user and label."""
    history = events.column("hist_item_ids").combine_chunks()
    offsets = torch.from_numpy(history.offsets.to_numpy().astype(np.int64))
    flat = torch.from_numpy(history.flatten().to_numpy().astype(np.int64))
    lengths = offsets[1:] - offsets[:-1]
    mean_history = F.embedding_bag(flat, items, offsets[:-1], mode="mean")
    target = torch.from_numpy(events.column("target_item_id").to_numpy().astype(np.int64))
    scores = (items[target] * mean_history).sum(1)
    keep = lengths > 0
    return {"score": scores[keep],
            "label": torch.from_numpy(events.column("label").to_numpy().astype(np.int64))[keep],
            "user": torch.from_numpy(events.column("user_id").to_numpy().astype(np.int64))[keep],
            "skipped": (~keep).sum()}


def content_interest_auc(items: torch.Tensor, events: pa.Table, path: str) -> Dict[str, float]:
    """The per-user AUC of :func:`history_scores` over ``events``, read from ``path``. Impressions
    without a user who has both labels are data that cannot be scored (an empty file, a file of
    one label), refused by ``path`` rather than as a traceback after training."""
    scored = history_scores(items, events)
    per_user = grouped_auc(scored["score"].double(), scored["label"], scored["user"])
    defined = per_user.defined
    if not defined.any():
        raise DataError(path, f"no user of its {events.num_rows:,} impressions has both a click and a "
                              "non-click with a history; the content-interest AUC is undefined", field="label")
    pairs = (per_user.positives * (per_user.count - per_user.positives)).double()[defined]
    return {"pair_auc": float((per_user.auc[defined] * pairs).sum() / pairs.sum()),
            "gauc": gauc(per_user), "auc_users": int(defined.sum()),
            "scored_impressions": int(scored["score"].numel()),
            "no_history_impressions": int(scored["skipped"])}


@torch.no_grad()
def stage1_embeddings(pair: EncoderPair, world: WorldInputs, held_out: HeldOut) -> Embedded:
    pair.eval()
    image = world.item_image_features(pair.vision)
    title = world.item_title_features(pair.text)
    query = _held_out_queries(world, held_out, pair.vision)
    size = world.batch_size
    items = _batched(lambda s: F.normalize(pair.vision_head(image[s]) + pair.text_head(title[s]),
                                           dim=-1), len(image), size)
    return Embedded(_batched(lambda s: pair.vision_head(query[s]), len(query), size), items,
                    world.item_content(pair.vision).item_groups())


@torch.no_grad()
def csft_embeddings(model: CsftModel, world: WorldInputs, held_out: HeldOut) -> Embedded:
    model.eval()
    image = world.item_image_features(model.items.pair.vision)
    title = world.item_title_features(model.items.pair.text)
    query = _held_out_queries(world, held_out, model.queries.vision)
    size = world.batch_size
    items = _batched(lambda s: model.items.from_features(image[s], title[s]).mm, len(image), size)
    return Embedded(_batched(lambda s: model.queries.from_features(query[s]), len(query), size), items,
                    world.item_content(model.items.pair.vision).item_groups())


def _held_out_queries(world: WorldInputs, held_out: HeldOut, vision) -> torch.Tensor:
    """Backbone features of the held-out pairs' query images (cached for the whole file)."""
    return world.query_features(held_out.split, vision)[torch.from_numpy(held_out.pairs.rows)]


def _batched(fn, count: int, batch_size: int) -> torch.Tensor:
    """``fn(slice)`` over ``range(count)`` in batches (fusion over a whole catalogue at once
    would hold a ``[N, (d + 1)^2]`` tensor), on the CPU."""
    return torch.cat([fn(slice(s, s + batch_size)).float().cpu() for s in range(0, count, batch_size)])


def require_finite(embedded: Embedded, source: str) -> None:
    """Refuse NaN or infinite embeddings (a diverged model's): every comparison with NaN is
    false, so no item would outrank a query's own and recall@k would read 1.0."""
    for name, rows in (("query", embedded.queries), ("item", embedded.items)):
        bad = int((~torch.isfinite(rows).all(dim=1)).sum())
        if bad:
            raise DataError(source, f"{bad} of {len(rows)} {name} embeddings are NaN or infinite (diverged "
                            "weights?); nothing to evaluate")


def evaluate_embeddings(embedded: Embedded, world: WorldInputs, ks: Sequence[int],
                        held_out: HeldOut, source: str) -> Dict[str, float]:
    """Both measures of ``embedded``, computed by the model in ``source`` (named in errors), with
    the number of held-out pairs and of candidate items (a recall@k with ``k`` at or above the
    latter is 1 by construction, which the report's claims check)."""
    require_finite(embedded, source)
    targets = held_out.pairs.item_ids
    twins = Twins.of(np.arange(len(targets)), embedded.item_content, targets)
    recall = recall_at(embedded.queries, embedded.items, ks, torch.from_numpy(targets), twins=twins)
    return {**{f"recall@{k}": v for k, v in recall.items()},
            **content_interest_auc(embedded.items, held_out_events(world, held_out), str(held_out.events_path)),
            "held_out": held_out.name, "held_out_pairs": len(held_out.pairs), "candidate_items": len(embedded.items)}


def held_out_events(world: WorldInputs, held_out: HeldOut) -> pa.Table:
    """The impressions the content-interest AUC of ``held_out`` scores: its events file, from
    ``held_out.since`` on; a missing file or an empty validation period is refused by file."""
    events_path = held_out.events_path
    if not events_path.is_file():
        raise DataError(str(events_path), "held-out events not found (the content-interest "
                        "AUC needs them)")
    events = read_events(events_path, world.item_count,
                         columns=["user_id", "target_item_id", "label", "hist_item_ids", "ts"])
    if held_out.since is not None:
        events = events.filter(pc.greater_equal(events.column("ts"), held_out.since))
        if events.num_rows == 0:
            raise DataError(str(events_path), f"no impressions at or after ts={held_out.since}, "
                            "the validation period", field="ts")
    return events


def require_evaluable(world: WorldInputs, held_out: HeldOut, vision: VisionConfig) -> None:
    """Refuse held-out data that the evaluation of towers with ``vision`` would refuse, by the
    same checks and messages, before any model runs: ``mim csft --eval`` found a missing or
    unscorable file only after training. ``held_out`` itself holds pairs
    (:meth:`WorldInputs.held_out` refuses none, and its reader already validated every query
    value); every row of their file must have a query ``vision``'s tower reads
    (:func:`~mim_rec.pretrain.corpus.require_stored_images`: the evaluation reads the whole
    file's); the impressions are scored with constant embeddings, since whether a user's AUC
    is defined depends on the labels and histories alone."""
    require_stored_images(held_out.pairs.path, vision, PAIRS)
    content_interest_auc(torch.zeros(world.item_count, 1), held_out_events(world, held_out),
                         str(held_out.events_path))
