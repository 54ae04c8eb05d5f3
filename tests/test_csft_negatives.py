"""ST-NSG: same-category hard negatives, the time queue, and the all-gathered candidate count
2NP(k+1) - 1 on a real 2-rank gloo run; the queue never offers a query its own positive."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from mim_rec.csft.losses import negatives_per_query, usable_columns
from mim_rec.csft.negatives import EmbeddingQueue, SameCategorySampler, SpaceTimeNegatives
from mim_rec.utils.dist import run_on_spawned_ranks

torch.set_num_threads(1)

N, P, K, DIM, STEPS = 3, 2, 2, 4, 4


def test_same_category_sampler_draws_every_other_member_and_never_the_positive():
    categories = np.array([0, 1, 0, 2, 0, 1, 3, 0])  # category 3 holds a single item
    sampler = SameCategorySampler(categories)
    rng = np.random.default_rng(0)
    positives = np.repeat(np.array([0, 1, 2, 4, 5, 7]), 400)
    negatives = sampler(positives, rng)
    assert (negatives != positives).all()
    assert (categories[negatives] == categories[positives]).all()
    drawn = set(negatives[positives == 0].tolist())
    assert drawn == {2, 4, 7}  # every other item of category 0
    counts = np.bincount(negatives[positives == 0], minlength=8)[[2, 4, 7]]
    assert counts.min() > 100  # roughly uniform over 3 options of 400 draws
    assert sampler.fallbacks == 0


def test_singleton_category_falls_back_to_another_item():
    sampler = SameCategorySampler(np.array([0, 0, 1]))
    negatives = sampler(np.array([2] * 50), np.random.default_rng(1))
    assert set(negatives.tolist()) == {0, 1}
    assert sampler.fallbacks == 50


def test_queue_keeps_the_last_k_batches_and_round_trips():
    queue = EmbeddingQueue(2)
    for step in range(4):
        queue.push(step, torch.tensor([step, step + 10]), {"item": torch.full((2, 3), float(step))})
    ids, rows = queue.contents()
    assert ids.tolist() == [2, 12, 3, 13] and rows["item"][:, 0].tolist() == [2, 2, 3, 3]
    assert queue.oldest().step == 2
    other = EmbeddingQueue(2)
    other.load_state_dict(queue.state_dict())
    assert other.contents()[0].tolist() == ids.tolist()
    with pytest.raises(ValueError, match="batches"):
        EmbeddingQueue(3).load_state_dict(queue.state_dict())


def test_pushed_rows_are_detached_copies():
    queue = EmbeddingQueue(1)
    rows = torch.ones(2, 3, requires_grad=True)
    queue.push(0, torch.tensor([0, 1]), {"item": rows * 1})
    queued = queue.contents()[1]["item"]
    assert not queued.requires_grad


def _step_inputs(rank: int, step: int, unique: bool):
    """Rank ``rank``'s item rows at ``step``: N positives then N hard negatives.

    ``unique``: every (rank, step) uses fresh ids; otherwise each step repeats the same ids,
    so every queued row holds some query's positive (the adversarial case for leaks).
    """
    base = (step * P + rank) * 2 * N if unique else rank * 2 * N
    ids = torch.arange(base, base + 2 * N)
    rows = torch.randn(2 * N, DIM, generator=torch.Generator().manual_seed(100 * step + rank))
    return ids, {"item": rows.requires_grad_(True)}


def _run_steps(rank: int, unique: bool, all_gather: bool = True, queue_batches: int = K):
    negatives = SpaceTimeNegatives(queue_batches, all_gather)
    seen = []
    for step in range(STEPS):
        ids, items = _step_inputs(rank, step, unique)
        before, _ = negatives.queue.contents()
        candidates = negatives(step, items, ids, num_queries=N)
        positive_ids = candidates.item_ids[candidates.positive_index]
        usable = usable_columns(candidates.item_ids, candidates.positive_index)
        leaks = 0
        for q in range(N):
            negative_cols = usable[q].clone()
            negative_cols[candidates.positive_index[q]] = False
            leaks += int((candidates.item_ids[negative_cols] == positive_ids[q]).sum())
        seen.append({
            "negatives": negatives_per_query(candidates.item_ids, candidates.positive_index).tolist(),
            "candidates": candidates.item_ids.numel(), "queued": candidates.queued,
            "positive_ids": positive_ids.tolist(), "my_ids": ids.tolist(),
            "queue_before": before.tolist(), "leaks": leaks,
            "current_in_queue_before": bool(np.isin(ids.numpy(), before.numpy()).any()) if unique else None,
        })
    return seen


def _rank_steps(rank: int, device) -> dict:
    torch.set_num_threads(1)
    result = {"unique": _run_steps(rank, unique=True), "repeated": _run_steps(rank, unique=False),
              "local": _run_steps(rank, unique=True, all_gather=False)}
    # The gathered rows keep their gradient path back to the rank that owns them.
    ids, items = _step_inputs(rank, 0, True)
    candidates = SpaceTimeNegatives(0, True)(0, items, ids, N)
    candidates.embeddings["item"].sum().backward()
    result["grad"] = items["item"].grad.tolist()
    return result


@pytest.fixture(scope="module")
def two_ranks():
    return run_on_spawned_ranks(_rank_steps, P, "cpu")


def test_negative_count_is_2NP_k_plus_1_minus_1(two_ranks):
    for rank, result in enumerate(two_ranks):
        for step, seen in enumerate(result["unique"]):
            filled = min(step, K)  # the queue holds the last k steps once k steps have run
            assert seen["queued"] == 2 * N * P * filled
            assert seen["candidates"] == 2 * N * P * (filled + 1)
            assert seen["negatives"] == [2 * N * P * (filled + 1) - 1] * N
        assert result["unique"][-1]["negatives"][0] == 2 * N * P * (K + 1) - 1 == 35


def test_positive_index_points_at_this_ranks_positives(two_ranks):
    for rank, result in enumerate(two_ranks):
        for seen in result["unique"]:
            assert seen["positive_ids"] == seen["my_ids"][:N]


def test_queue_is_identical_on_every_rank_and_never_holds_the_current_step(two_ranks):
    for step in range(STEPS):
        assert two_ranks[0]["unique"][step]["queue_before"] == two_ranks[1]["unique"][step]["queue_before"]
        for result in two_ranks:
            assert result["unique"][step]["current_in_queue_before"] is False


def test_queue_never_offers_the_positive_as_a_negative(two_ranks):
    for result in two_ranks:
        for step, seen in enumerate(result["repeated"]):
            assert seen["leaks"] == 0
            # Every step reuses the ids, so each queued step holds one copy of every
            # query's positive, all masked: 2NP(k+1) - 1 minus the filled() copies.
            filled = min(step, K)
            assert seen["negatives"] == [2 * N * P * (filled + 1) - 1 - filled] * N


def test_without_all_gather_only_local_rows(two_ranks):
    for result in two_ranks:
        last = result["local"][-1]
        assert last["negatives"] == [2 * N * (K + 1) - 1] * N


def test_gathered_rows_send_gradients_back_to_their_owner(two_ranks):
    # Each rank sums every gathered row, so an own row's gradient comes from both ranks'
    # losses: P (DDP's averaging then makes it the gradient of the mean loss).
    for result in two_ranks:
        assert torch.tensor(result["grad"]).eq(float(P)).all()


def test_a_refreshed_queue_scores_the_current_rows_of_the_queued_items():
    calls = []

    def refresh(ids: torch.Tensor):  # "current weights": a row that names its item
        calls.append(ids.clone())
        assert not torch.is_grad_enabled()  # queued rows never take a gradient
        return {"item": ids.float()[:, None].expand(-1, DIM).clone()}

    negatives = SpaceTimeNegatives(2, all_gather=False, refresh=refresh)
    for step in range(3):
        ids = torch.arange(step * 4, step * 4 + 4)
        candidates = negatives(step, {"item": torch.randn(4, DIM, requires_grad=True)}, ids, num_queries=2)
    # Step 2 reads steps 0 and 1 (items 0..7), re-embedded now rather than as stored.
    assert torch.equal(candidates.item_ids[4:], torch.arange(8)) and candidates.queued == 8
    queued = candidates.embeddings["item"][4:]
    assert torch.equal(queued, torch.arange(8).float()[:, None].expand(-1, DIM))
    assert [c.tolist() for c in calls] == [list(range(4)), list(range(8))]  # step 0: empty queue
