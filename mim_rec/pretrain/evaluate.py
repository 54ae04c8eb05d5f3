"""Stage-1 evaluation (the paper's Table 3 rows: plain, +DDA, +DDA+DMA encoders).

For each encoder pair, on held-out items:

* ``own`` retrieval: image->title and title->image recall@1/@10 with the pair's own
  projection heads (meaningful once DMA has trained them; random heads give chance level).
* ``probe`` retrieval: the same recalls after training *fresh* projection heads on the
  frozen tower features of the training items, with an identical budget for every row. This
  compares what the towers themselves learned, independently of who trained the heads.
* linear probe: category accuracy of a logistic regression on frozen image features and on
  frozen title features (fit on training items, scored on held-out items).

A hit is the query's own item (index match) among the top k candidates, ranked against every
other held-out item except its content twins (:class:`Twins`): a catalogue that repeats a
title or an image under another id no longer counts the repeat as a retrieval error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mim_rec.data.errors import DataError
from mim_rec.encoders.heads import ProjectionHead
from mim_rec.encoders.pair import EncoderPair
from mim_rec.encoders.vision import PrecomputedVisionEncoder
from mim_rec.pretrain.corpus import ContentKeys, ItemCorpus
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


@dataclass(frozen=True)
class Twins:
    """The candidates each query's rank leaves out besides its own target: those whose content
    is a correct answer to the query's content somewhere in the ranked set. In stage 1 these are
    the items with the target's title (image->title; its image for title->image), and the
    titles (images) of items that repeat the query's image (title); in C-SFT, the items
    identical to the target in both title and image.

    They are masked out of the negatives (the "filtered" ranking of link-prediction
    evaluation) rather than counted as hits, so each query is still judged on its own target's
    score alone: a masked candidate neither helps nor hurts it. Identical inputs score alike,
    so the two rules agree on exact twins; where a repeated query has two different
    correct answers (one image, two titles), counting either as a hit would credit the best
    of them to both queries, while masking ranks each query's target against the wrong answers
    only. A perfect tower then reaches recall 1 on a catalogue with repeats, as on one without.

    Content is compared by group ids (equal ids = identical content, from the digests of
    :class:`~mim_rec.pretrain.corpus.ContentKeys`). Only the queries whose content has more
    than one correct candidate (``queries``) and the candidates that answer them (``columns``)
    are ever looked at, so a mask costs little beyond the score matrix.
    """

    query_content: torch.Tensor      # [n_queries] int64 content group of each query
    candidate_content: torch.Tensor  # [n_candidates] int64 content group of each candidate
    queries: torch.Tensor            # content groups of the queries with a twin to mask
    columns: torch.Tensor            # candidates whose content answers one of those queries
    answers: torch.Tensor            # codes query_group * stride + candidate_group
    stride: int

    @classmethod
    def of(cls, query_content: np.ndarray, candidate_content: np.ndarray,
           targets: np.ndarray) -> Optional["Twins"]:
        """The twins of queries with content groups ``query_content`` whose correct candidate
        is ``targets[i]``; None when no query has a correct candidate besides its target (no
        content repeats), so such a catalogue ranks exactly as it did before twins existed."""
        answers = np.unique(np.stack([query_content, candidate_content[targets]], axis=1), axis=0)
        candidates_per_content = np.bincount(candidate_content)
        correct = np.bincount(answers[:, 0], weights=candidates_per_content[answers[:, 1]])
        queries = np.flatnonzero(correct > 1)
        if not len(queries):
            return None
        answers = answers[np.isin(answers[:, 0], queries)]
        columns = np.flatnonzero(np.isin(candidate_content, answers[:, 1]))
        stride = int(candidate_content.max()) + 1
        return cls(torch.from_numpy(query_content), torch.from_numpy(candidate_content),
                   torch.from_numpy(queries), torch.from_numpy(columns),
                   torch.from_numpy(answers[:, 0] * stride + answers[:, 1]), stride)

    def mask(self, rows: slice) -> torch.Tensor:
        """``[len(rows), n_candidates]`` bool: True where the candidate's content is a correct
        answer to the content of that row's query (the row's own target may be marked too; it
        is never ranked against itself)."""
        query = self.query_content[rows]
        out = torch.zeros(len(query), len(self.candidate_content), dtype=torch.bool)
        twinned = torch.isin(query, self.queries).nonzero().squeeze(1)
        codes = (query[twinned].unsqueeze(1) * self.stride
                 + self.candidate_content[self.columns].unsqueeze(0))
        out[twinned.unsqueeze(1), self.columns.unsqueeze(0)] = torch.isin(codes, self.answers)
        return out


def recall_at(queries: torch.Tensor, candidates: torch.Tensor, ks: Sequence[int] = (1, 10),
              targets: Optional[torch.Tensor] = None, batch_size: int = 1024,
              twins: Optional[Twins] = None) -> Dict[int, float]:
    """Share of queries whose target candidate ranks in the top k: row ``targets[i]`` of
    ``candidates`` for query ``i`` (by default its own row, the same index), ranked against
    every candidate but ``twins`` (None: against all). The one recall of both stages (stage 1
    here, C-SFT's query -> item retrieval); see :func:`target_ranks` for how ties rank."""
    targets = torch.arange(len(queries), device=queries.device) if targets is None else targets
    rank = torch.cat([target_ranks(queries[start:start + batch_size] @ candidates.T,
                                   targets[start:start + batch_size],
                                   None if twins is None else twins.mask(slice(start, start + batch_size)))
                      for start in range(0, len(queries), batch_size)])
    return {k: (rank < k).float().mean().item() for k in ks}


def target_ranks(scores: torch.Tensor, targets: torch.Tensor,
                 masked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per row of ``scores`` ``[n, candidates]``: how many *other* candidates are not scored
    strictly below the row's target ``targets[i]`` (0 = first), leaving out those ``masked``
    (``[n, candidates]`` bool, the :class:`Twins` of the row's query).

    Pessimistic: a tie counts against the target. Counting it in the target's favour gave a
    collapsed tower (every item the same vector) recall 1.0; pessimistic ranks give it 0 for
    any k below the catalogue size, at or below chance, and need no fractional hits (as the
    mean rank of a tie would). Distinct inputs almost never tie; identical ones always do,
    which is why a catalogue's repeats of the target are masked rather than ranked. A NaN
    score is not below anything, so it too counts against the target (a NaN target ranks
    last), never for it."""
    own = scores.gather(1, targets.unsqueeze(1))
    ahead = ~(scores < own)
    ahead.scatter_(1, targets.unsqueeze(1), False)  # the target itself is not ahead of it
    if masked is not None:
        ahead &= ~masked.to(ahead.device)
    return ahead.sum(dim=1)


def cross_modal_twins(content: ContentKeys) -> Tuple[Optional[Twins], Optional[Twins]]:
    """The (image -> title, title -> image) :class:`Twins` of items with ``content``, each
    item's own title (image) its target."""
    images, titles = content.image_groups(), content.title_groups()
    own = np.arange(len(images))
    return Twins.of(images, titles, own), Twins.of(titles, images, own)


def retrieval(images: torch.Tensor, titles: torch.Tensor, source: str, heads: str,
              twins: Tuple[Optional[Twins], Optional[Twins]] = (None, None)) -> Dict[str, float]:
    """Recall both ways between the held-out items' image and title embeddings, each way
    leaving out its ``twins`` (:func:`cross_modal_twins`; none by default). A NaN/inf
    embedding is refused (naming ``source`` and which ``heads``): a NaN score never outranks
    the own item's, so NaN encoders used to score a perfect recall."""
    for kind, embeddings in (("image", images), ("title", titles)):
        broken = int((~torch.isfinite(embeddings).all(dim=1)).sum())
        if broken:
            raise DataError(source, f"the {heads} heads embed the {kind}s of {broken} of {len(embeddings)} "
                            "held-out items as NaN/inf; the encoders diverged, retrain them")
    i2t, t2i = recall_at(images, titles, twins=twins[0]), recall_at(titles, images, twins=twins[1])
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
                          test_y: torch.Tensor, steps: int = 300, lr: float = 0.05) -> Optional[float]:
    """Multinomial logistic regression (full batch, standardised features). None where every
    item is in one category: any probe then predicts it, and 1.0 would read as a result."""
    if len(torch.unique(torch.cat([train_y, test_y]))) < 2:
        return None
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
    twins = cross_modal_twins(heldout_items.content)
    results = {f"own_{k}": v for k, v in retrieval(heldout.image_embeddings, heldout.title_embeddings,
                                                   source, "own", twins).items()}
    image_head, title_head = train_probe_heads(train, pair.shared_dim, config)
    with torch.no_grad():
        probe = retrieval(image_head(heldout.image_features), title_head(heldout.title_features),
                          source, "probe", twins)
    results.update({f"probe_{k}": v for k, v in probe.items()})
    train_y = torch.as_tensor(train_items.categories, dtype=torch.long)
    test_y = torch.as_tensor(heldout_items.categories, dtype=torch.long)
    results["image_linear_probe_acc"] = linear_probe_accuracy(
        train.image_features, train_y, heldout.image_features, test_y)
    results["title_linear_probe_acc"] = linear_probe_accuracy(
        train.title_features, train_y, heldout.title_features, test_y)
    results["heldout_items"] = len(heldout_items)
    return results
