"""ST-NSG: space-time negative sample generation (paper section 3.3).

For a batch of ``N`` (query, positive item) pairs on each of ``P`` ranks, the candidates every
query is scored against are built from three extensions, each of which can be switched off:

* **hard negatives** -- one item of the positive's own category per pair
  (:class:`SameCategorySampler`), so the model must separate items a category classifier
  cannot: each rank contributes ``2N`` item rows instead of ``N``;
* **space** -- the item rows of every rank, all-gathered with their gradient (``2NP``);
* **time** -- the detached item rows of the last ``k`` steps, kept in a queue
  (:class:`EmbeddingQueue`): ``2NP·k`` more.

With all three, each query has ``2NP(k + 1)`` candidates, one of them its positive:
``2NP(k + 1) − 1`` negatives. Candidates holding the positive's item id elsewhere (the same
item in two pairs, or queued from an earlier step) are masked by id in the loss
(:func:`mim_rec.csft.losses.usable_columns`), never used as negatives.

**Staleness.** Rows kept from earlier steps were computed by the weights of up to ``k``
optimizer steps ago. The queue is a ring of exactly ``k`` steps, and the current step's rows
enter it only after its candidates are built (a row is never its own stale copy). Two modes:

* ``refresh`` given (the default when backbones are frozen): the queue's *items* are kept
  and re-embedded with the current weights, without gradient, at every step. Backbone
  features are cached, so this is exact and costs one forward pass of the heads and the
  fusion over the queued rows. Measured on the embedded world, stale rows (1 − cosine to the
  fresh ones of 0.1–0.35 after 10 steps at the default learning rate) made C-SFT *worse* than
  no queue at all; refreshed rows do not (docs/csft.md).
* no ``refresh`` (trainable backbones, where re-embedding would mean running them on every
  queued item): the stored rows are used as they are, the MoCo trade-off without a momentum
  encoder, and the trainer logs the drift (``queue_drift``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from mim_rec.pretrain.contrastive import gather_with_grad


class SameCategorySampler:
    """For each positive item, a uniformly drawn *other* item of the same category.

    A category holding a single item has no other item to offer; such positives get a
    uniformly drawn other item of the catalogue instead (counted by :attr:`fallbacks`).
    """

    def __init__(self, item_categories: np.ndarray) -> None:
        categories = np.asarray(item_categories)
        if categories.ndim != 1 or categories.size < 2:
            raise ValueError("hard negatives need a catalogue of at least two items")
        self.order = np.argsort(categories, kind="stable")          # items grouped by category
        sorted_categories = categories[self.order]
        starts = np.flatnonzero(np.r_[True, sorted_categories[1:] != sorted_categories[:-1]])
        sizes = np.diff(np.r_[starts, categories.size])
        group = np.repeat(np.arange(starts.size), sizes)
        self.start = np.empty(categories.size, dtype=np.int64)      # per item: its group's start
        self.size = np.empty(categories.size, dtype=np.int64)       # per item: its group's size
        self.position = np.empty(categories.size, dtype=np.int64)   # per item: index inside group
        self.start[self.order] = starts[group]
        self.size[self.order] = sizes[group]
        self.position[self.order] = np.arange(categories.size) - starts[group]
        self.item_count = categories.size
        self.fallbacks = 0

    def __call__(self, positives: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        positives = np.asarray(positives, dtype=np.int64)
        size = self.size[positives]
        alone = size == 1
        # Draw among the size-1 other members, then skip over the positive's own slot.
        draw = rng.integers(0, np.maximum(size - 1, 1))
        draw = draw + (draw >= self.position[positives])
        negatives = self.order[self.start[positives] + np.where(alone, 0, draw)]
        if alone.any():
            anywhere = rng.integers(0, self.item_count - 1, size=int(alone.sum()))
            anywhere = anywhere + (anywhere >= positives[alone])
            negatives[alone] = anywhere
            self.fallbacks += int(alone.sum())
        return negatives


@dataclass
class QueuedBatch:
    step: int
    item_ids: torch.Tensor                 # [R]
    embeddings: Dict[str, torch.Tensor]    # level -> [R, d], detached


class EmbeddingQueue:
    """The item rows of the last ``batches`` steps (detached), oldest first."""

    def __init__(self, batches: int) -> None:
        if batches < 0:
            raise ValueError(f"queue length must be >= 0 batches, got {batches}")
        self.batches = batches
        self.entries: Deque[QueuedBatch] = deque(maxlen=batches or None)

    def __len__(self) -> int:
        return sum(e.item_ids.numel() for e in self.entries)

    def push(self, step: int, item_ids: torch.Tensor, embeddings: Mapping[str, torch.Tensor]) -> None:
        if self.batches == 0:
            return
        self.entries.append(QueuedBatch(step, item_ids.detach().clone(),
                                        {k: v.detach().clone() for k, v in embeddings.items()}))

    def contents(self) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """All queued ids ``[Q]`` and rows per level ``[Q, d]`` (empty when the queue is)."""
        if not self.entries:
            return torch.empty(0, dtype=torch.long), {}
        ids = torch.cat([e.item_ids for e in self.entries])
        levels = self.entries[0].embeddings.keys()
        return ids, {k: torch.cat([e.embeddings[k] for e in self.entries]) for k in levels}

    def oldest(self) -> Optional[QueuedBatch]:
        return self.entries[0] if self.entries else None

    def state_dict(self) -> Dict[str, Any]:
        return {"batches": self.batches,
                "entries": [{"step": e.step, "item_ids": e.item_ids, "embeddings": e.embeddings}
                            for e in self.entries]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["batches"] != self.batches:
            raise ValueError(f"queue state holds {state['batches']} batches, this queue {self.batches}")
        self.entries.clear()
        for entry in state["entries"]:
            self.entries.append(QueuedBatch(entry["step"], entry["item_ids"], entry["embeddings"]))


@dataclass
class CandidateSet:
    """What every local query is scored against."""

    embeddings: Dict[str, torch.Tensor]   # level -> [M, d]
    item_ids: torch.Tensor                # [M]
    positive_index: torch.Tensor          # [N] the column of each local query's positive
    queued: int                           # how many of the M columns came from the queue


def _gather_ids(ids: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SpaceTimeNegatives:
    """Builds each step's :class:`CandidateSet`, then queues the step's rows.

    ``items`` are this rank's item rows per level, the ``N`` positives first (row ``i`` is
    query ``i``'s positive), then any hard negatives. ``refresh(item_ids) -> rows per level``
    re-embeds queued items with the current weights (see the module docstring).
    """

    def __init__(self, queue_batches: int, all_gather: bool,
                 refresh: Optional[Callable[[torch.Tensor], Dict[str, torch.Tensor]]] = None) -> None:
        self.queue = EmbeddingQueue(queue_batches)
        self.all_gather = all_gather
        self.refresh = refresh

    def __call__(self, step: int, items: Mapping[str, torch.Tensor], item_ids: torch.Tensor,
                 num_queries: int) -> CandidateSet:
        rows = item_ids.numel()
        if num_queries > rows:
            raise ValueError(f"{num_queries} queries but only {rows} item rows")
        offset = 0
        if self.all_gather and _distributed():
            items = {k: gather_with_grad(v) for k, v in items.items()}
            item_ids = _gather_ids(item_ids)
            offset = dist.get_rank() * rows
        positive_index = torch.arange(num_queries, device=item_ids.device) + offset
        queued_ids, queued = self.queue.contents()
        # Read the queue before pushing this step: the current rows are never their own
        # (stale) negatives.
        self.queue.push(step, item_ids, items)
        if queued_ids.numel() == 0:
            return CandidateSet(dict(items), item_ids, positive_index, 0)
        queued_ids = queued_ids.to(item_ids.device)
        if self.refresh is not None:
            with torch.no_grad():
                queued = self.refresh(queued_ids)
        return CandidateSet({k: torch.cat([v, queued[k].to(v.device)]) for k, v in items.items()},
                            torch.cat([item_ids, queued_ids]), positive_index, queued_ids.numel())

