"""Stage-1 evaluation (the paper's Table 3 rows: plain, +DDA, +DDA+DMA encoders).

For each encoder pair, on held-out items:

* ``own`` retrieval: image->title and title->image recall@1/@10 with the pair's own
  projection heads (meaningful once DMA has trained them; random heads give chance level).
* ``probe`` retrieval: the same recalls after training *fresh* projection heads on the
  frozen tower features of the training items, with an identical budget for every row. This
  compares what the towers themselves learned, independently of who trained the heads.
* linear probe: category accuracy of a logistic regression on frozen image features and on
  frozen title features (fit on training items, scored on held-out items).

A hit is the query's own item (index match) among the top k candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mim_rec.data.errors import DataError
from mim_rec.encoders.heads import ProjectionHead
from mim_rec.encoders.pair import EncoderPair
from mim_rec.encoders.vision import PrecomputedVisionEncoder
from mim_rec.pretrain.corpus import ItemCorpus
from mim_rec.pretrain.contrastive import symmetric_info_nce
from mim_rec.pretrain.dma import LearnableTemperature


@dataclass
class EvalConfig:
    batch_size: int = 128
    probe_steps: int = 300
    probe_lr: float = 3e-3
    probe_batch_size: int = 256
    seed: int = 0


@dataclass
class Embedded:
    image_features: torch.Tensor   # tower outputs [N, F_img]
    title_features: torch.Tensor   # [N, F_txt]
    image_embeddings: torch.Tensor  # own heads [N, D]
    title_embeddings: torch.Tensor


@torch.no_grad()
def embed(pair: EncoderPair, corpus: ItemCorpus, batch_size: int) -> Embedded:
    pair.eval()
    device = next(pair.parameters()).device
    parts = []
    for start in range(0, len(corpus), batch_size):
        images = corpus.images[start:start + batch_size]
        if not isinstance(pair.vision, PrecomputedVisionEncoder):
            images = pair.vision.image_processor.normalize(images)
        image_features = pair.vision(images.to(device)).float()
        title_features = pair.text(corpus.titles[start:start + batch_size]).float()
        parts.append((image_features, title_features, pair.vision_head(image_features),
                      pair.text_head(title_features)))
    return Embedded(*(torch.cat(column).cpu() for column in zip(*parts)))


def recall_at(queries: torch.Tensor, candidates: torch.Tensor, ks: Sequence[int] = (1, 10),
              targets: Optional[torch.Tensor] = None, batch_size: int = 1024) -> Dict[int, float]:
    """Share of queries whose target candidate ranks in the top k: row ``targets[i]`` of
    ``candidates`` for query ``i`` (by default its own row, the same index). The one recall
    of both stages (stage 1 here, C-SFT's query -> item retrieval); see :func:`target_ranks`
    for how ties rank."""
    targets = torch.arange(len(queries), device=queries.device) if targets is None else targets
    rank = torch.cat([target_ranks(queries[start:start + batch_size] @ candidates.T,
                                   targets[start:start + batch_size])
                      for start in range(0, len(queries), batch_size)])
    return {k: (rank < k).float().mean().item() for k in ks}


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row of ``scores`` ``[n, candidates]``: how many *other* candidates are not scored
    strictly below the row's target ``targets[i]`` (0 = first).

    Pessimistic: a tie counts against the target. Counting it in the target's favour gave a
    collapsed tower (every item the same vector) recall 1.0; pessimistic ranks give it 0 for
    any k below the catalogue size, at or below chance, and need no fractional hits (as the
    mean rank of a tie would). Distinct inputs almost never tie; a catalogue that repeats an
    input under two ids does, and there the twin counts ahead (docs/pretrain.md). A NaN score is not below anything, so it too counts against the target (a
    NaN target ranks last), never for it."""
    own = scores.gather(1, targets.unsqueeze(1))
    ahead = ~(scores < own)
    ahead.scatter_(1, targets.unsqueeze(1), False)  # the target itself is not ahead of it
    return ahead.sum(dim=1)


def retrieval(images: torch.Tensor, titles: torch.Tensor, source: str, heads: str) -> Dict[str, float]:
    """Recall both ways between the held-out items' image and title embeddings. A NaN/inf
    embedding is refused (naming ``source`` and which ``heads``): a NaN score never outranks
    the own item's, so NaN encoders used to score a perfect recall."""
    for kind, embeddings in (("image", images), ("title", titles)):
        broken = int((~torch.isfinite(embeddings).all(dim=1)).sum())
        if broken:
            raise DataError(source, f"the {heads} heads embed the {kind}s of {broken} of {len(embeddings)} "
                            "held-out items as NaN/inf; the encoders diverged, retrain them")
    i2t, t2i = recall_at(images, titles), recall_at(titles, images)
    return {"i2t_r1": i2t[1], "i2t_r10": i2t[10], "t2i_r1": t2i[1], "t2i_r10": t2i[10]}


def fit_clip_heads(image_head: nn.Module, title_head: nn.Module,
                   temperature: LearnableTemperature, features: Embedded, steps: int, lr: float,
                   batch_size: int, seed: int, progress: Optional[str] = None) -> float:
    """Train ``image_head``, ``title_head`` and ``temperature`` in place with the CLIP loss on
    frozen tower ``features`` (a seeded draw of ``batch_size`` rows per step); returns the last
    step's loss (nan for 0 steps).

    The one loop behind both the evaluation probe (fresh heads) and the trainer's LP-FT head
    warm-up (the pair's own heads). It takes a temperature rather than a ClipLoss because
    the loss must stay local (no all-gather; the trainer's ClipLoss gathers across ranks):
    every feature is already in this process, and under DDP only rank 0 runs it. The batch
    order comes from a private generator, so the global RNG is untouched. ``progress`` is a
    tqdm label (None: no bar).
    """
    from tqdm import tqdm

    device = temperature.log_scale.device
    image_features = features.image_features.to(device)
    title_features = features.title_features.to(device)
    params = [*image_head.parameters(), *title_head.parameters(), *temperature.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    count = image_features.shape[0]
    batch = min(batch_size, count)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc=progress, disable=progress is None, leave=False):
        index = torch.randperm(count, generator=generator)[:batch].to(device)
        loss = symmetric_info_nce(image_head(image_features[index]),
                                  title_head(title_features[index]), temperature(), gather=False)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


def train_probe_heads(train: Embedded, dim: int, config: EvalConfig) -> Tuple[ProjectionHead, ProjectionHead]:
    """Fresh heads on frozen features with the CLIP loss (a fixed, seeded budget)."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        image_head = ProjectionHead(train.image_features.shape[1], dim)
        title_head = ProjectionHead(train.title_features.shape[1], dim)
    fit_clip_heads(image_head, title_head, LearnableTemperature(), train, config.probe_steps,
                   config.probe_lr, config.probe_batch_size, config.seed)
    return image_head.eval(), title_head.eval()


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, steps: int = 300, lr: float = 0.05) -> float:
    """Multinomial logistic regression (full batch, standardised features)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(max(train_y.max(), test_y.max())) + 1
    linear = torch.nn.Linear(train_x.shape[1], classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = F.cross_entropy(linear(train_x), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (linear(test_x).argmax(1) == test_y).float().mean().item()


def evaluate_pair(pair: EncoderPair, train_items: ItemCorpus, heldout_items: ItemCorpus,
                  config: EvalConfig, source: str) -> Dict[str, float]:
    """The row of one encoder pair; ``source`` (its folder) is named in errors."""
    train, heldout = (embed(pair, c, config.batch_size) for c in (train_items, heldout_items))
    results = {f"own_{k}": v for k, v in retrieval(heldout.image_embeddings, heldout.title_embeddings,
                                                   source, "own").items()}
    image_head, title_head = train_probe_heads(train, pair.shared_dim, config)
    with torch.no_grad():
        probe = retrieval(image_head(heldout.image_features), title_head(heldout.title_features),
                          source, "probe")
    results.update({f"probe_{k}": v for k, v in probe.items()})
    train_y = torch.as_tensor(train_items.categories, dtype=torch.long)
    test_y = torch.as_tensor(heldout_items.categories, dtype=torch.long)
    results["image_linear_probe_acc"] = linear_probe_accuracy(
        train.image_features, train_y, heldout.image_features, test_y)
    results["title_linear_probe_acc"] = linear_probe_accuracy(
        train.title_features, train_y, heldout.title_features, test_y)
    results["heldout_items"] = len(heldout_items)
    return results
