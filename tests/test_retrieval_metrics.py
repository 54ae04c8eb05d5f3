"""recall@k, the one retrieval metric of stage 1 and C-SFT: a tie counts against the target,
so a collapsed tower scores no better than chance, and continuous embeddings rank as before."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mim_rec.pretrain.evaluate import recall_at, retrieval, target_ranks

torch.set_num_threads(1)


def _unit(rows: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_a_collapsed_catalogue_is_not_a_perfect_recall():
    """Every item the same vector: every score tied, and ties counted for the target gave 1.0."""
    queries, collapsed = _unit(20), _unit(1, seed=1).expand(30, -1)
    targets = torch.randint(0, 30, (20,), generator=torch.Generator().manual_seed(2))
    assert recall_at(queries, collapsed, (1, 10, 29, 30), targets) == {1: 0.0, 10: 0.0, 29: 0.0, 30: 1.0}
    assert retrieval(collapsed[:12], collapsed[:12], "runs/x", "own") == {
        "i2t_r1": 0.0, "i2t_r10": 0.0, "t2i_r1": 0.0, "t2i_r10": 0.0}


def test_continuous_embeddings_rank_as_a_sort_does():
    """Without ties the pessimistic rank is the target's place in a descending sort, in any batch size."""
    queries, items = _unit(50), _unit(40, seed=1)
    targets = torch.randint(0, 40, (50,), generator=torch.Generator().manual_seed(2))
    scores = queries @ items.T
    place = (scores.argsort(dim=1, descending=True) == targets.unsqueeze(1)).int().argmax(dim=1)
    assert torch.equal(target_ranks(scores, targets), place)
    expected = {k: (place < k).float().mean().item() for k in (1, 5, 10)}
    assert recall_at(queries, items, (1, 5, 10), targets, batch_size=7) == expected


def test_a_nan_score_never_ranks_for_the_target():
    """A NaN target ranks last; a NaN rival counts ahead of it."""
    scores = torch.tensor([[0.9, float("nan"), 0.1], [float("nan"), 0.5, 0.2]])
    assert target_ranks(scores, torch.tensor([0, 0])).tolist() == [1, 2]
