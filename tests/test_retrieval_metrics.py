"""recall@k, the one retrieval metric of stage 1 and C-SFT: a tie counts against the target,
so a collapsed tower scores no better than chance, and continuous embeddings rank as before;
a catalogue's content repeats (twins) are left out of a query's negatives, and a catalogue
without repeats ranks exactly as before."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from mim_rec.pretrain.corpus import content_keys, corpus_from_table
from mim_rec.pretrain.evaluate import Twins, cross_modal_twins, recall_at, retrieval, target_ranks

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


# A hand-made catalogue with repeats: items 0 and 1 show one photo under two titles, items 2 and 3
# sell one title under two photos, items 4 and 5 repeat nothing.
TITLES = ["red mug", "red mug, 2-pack", "blue lamp", "blue lamp", "green pen", "black ink"]
PHOTOS = [b"photo A", b"photo A", b"photo B", b"photo C", b"photo D", b"photo E"]
# The candidates each query ranks without, besides its own item: image->title, query 0's photo is
# also captioned by title 1, query 2's title is repeated by item 3; title->image, the same.
I2T_TWINS = [{1}, {0}, {3}, {2}, set(), set()]
T2I_TWINS = [{1}, {0}, {3}, {2}, set(), set()]


def _ranks_without(scores: torch.Tensor, twins) -> list:
    """The pessimistic rank of each row's own column among the columns not in its ``twins``."""
    return [sum(1 for j in range(scores.shape[1]) if j != i and j not in twins[i]
                and not scores[i, j] < scores[i, i]) for i in range(scores.shape[0])]


def test_a_perfect_tower_scores_recall_1_on_a_catalogue_with_repeats():
    """Each item's photo and title embed to its concept (the repeats share one): the repeats tied
    with the own item and counted ahead of it, so recall@1 read 2/6 both ways."""
    concept = F.one_hot(torch.tensor([0, 0, 1, 1, 2, 3]), 4).float()
    assert retrieval(concept, concept, "runs/x", "own") == pytest.approx(
        {"i2t_r1": 2 / 6, "i2t_r10": 1.0, "t2i_r1": 2 / 6, "t2i_r10": 1.0})
    twins = cross_modal_twins(content_keys(TITLES, PHOTOS))
    assert retrieval(concept, concept, "runs/x", "own", twins) == {
        "i2t_r1": 1.0, "i2t_r10": 1.0, "t2i_r1": 1.0, "t2i_r10": 1.0}


def test_twins_are_left_out_of_the_negatives_and_nothing_else():
    """On random embeddings each rank is the old rank over the candidates that are not the
    query's twins: a twin neither counts ahead nor makes a hit, every other item still counts."""
    image_twins, title_twins = cross_modal_twins(content_keys(TITLES, PHOTOS))
    for seed in range(5):
        images, titles = _unit(6, 3, seed=seed), _unit(6, 3, seed=seed + 10)
        for queries, candidates, twins, expected in ((images, titles, image_twins, I2T_TWINS),
                                                     (titles, images, title_twins, T2I_TWINS)):
            scores = queries @ candidates.T
            ranks = target_ranks(scores, torch.arange(6), twins.mask(slice(0, 6)))
            assert ranks.tolist() == _ranks_without(scores, expected)
            assert recall_at(queries, candidates, (1, 2), twins=twins, batch_size=4) == {
                k: (ranks < k).float().mean().item() for k in (1, 2)}


def test_a_repeated_answer_of_a_repeated_query_is_masked():
    """Items 0 (photo X, "a"), 1 (X, "b"), 2 (Y, "b"), 3 (Z, "c"): title "b" captions photo X
    through item 1, so image query 0 leaves out item 2's title as well; query 2 leaves out
    title 1 (its own title, repeated); query 3 leaves out nothing."""
    twins = Twins.of(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), np.arange(4))
    assert twins.mask(slice(0, 4)).tolist() == [[True, True, True, False], [True, True, True, False],
                                                [False, True, True, False], [False, False, False, False]]
    assert twins.mask(slice(2, 4)).tolist() == [[False, True, True, False], [False, False, False, False]]


def test_a_catalogue_without_repeats_ranks_exactly_as_before():
    """No twins to leave out: the recalls are the old ones, bit for bit."""
    distinct = content_keys([f"title {i}" for i in range(40)], [bytes([i]) for i in range(40)])
    assert cross_modal_twins(distinct) == (None, None)
    for seed in range(3):
        images, titles = _unit(40, seed=seed), _unit(40, seed=seed + 10)
        assert (retrieval(images, titles, "runs/x", "own", cross_modal_twins(distinct))
                == retrieval(images, titles, "runs/x", "own"))


def test_a_collapsed_tower_stays_at_zero_on_a_catalogue_with_repeats():
    """Masking twins takes no tie away from the items that are not twins."""
    collapsed = _unit(1, seed=1).expand(6, -1)
    twins = cross_modal_twins(content_keys(TITLES, PHOTOS))
    metrics = retrieval(collapsed, collapsed, "runs/x", "own", twins)
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == 0.0


def test_content_identity_is_exact():
    """A title differing in case or a trailing space, or a feature one float32 step away, is another
    item's content; the same vector given as a list or an array is the same."""
    vector = np.array([0.1, 0.2, 0.3], dtype=np.float32)
    nudged = vector.copy()
    nudged[1] = np.nextafter(nudged[1], np.float32(1))
    keys = content_keys(["blue lamp", "blue lamp ", "Blue lamp", "blue lamp"],
                        [vector.tolist(), nudged, vector, vector])
    assert keys.title_groups().tolist() == [1, 2, 0, 1]
    assert len(set(keys.image_groups()[:2])) == 2 and len(set(keys.image_groups()[[0, 2, 3]])) == 1
    assert keys.item_groups()[0] == keys.item_groups()[3] and len(set(keys.item_groups())) == 3


def test_stage1_evaluation_masks_the_repeats_of_a_real_catalogue(tmp_path):
    """Every item carrying the same image feature: no tower can tell one image from another, so
    every image is a twin and both recalls are 1 for every head. Ranked by id, every image tied
    (title->image recall@1 0) and the titles of one image query raced each other."""
    from mim_rec.encoders import EncoderPair, EncodersConfig, VisionConfig
    from mim_rec.pretrain.evaluate import EvalConfig, evaluate_pair
    from tests.encoder_fixtures import tiny_text

    path = tmp_path / "items.parquet"
    table = pa.table({"item_id": pa.array(range(12), pa.int64()),
                      "category_id": pa.array([i % 3 for i in range(12)], pa.int32()),
                      "title": [f"item {i}" for i in range(12)],
                      "image_feature": [[0.5, -1.0, 2.0, 0.0]] * 12})
    torch.manual_seed(0)
    pair = EncoderPair(EncodersConfig(vision=VisionConfig(name="precomputed", feature_dim=4),
                                      text=tiny_text(), shared_dim=8))
    items = corpus_from_table(table, path, pair.vision).subset(np.ones(12, dtype=bool))  # as split
    report = evaluate_pair(pair, items, items, EvalConfig(probe_steps=2), source="runs/x")
    assert {k: v for k, v in report.items() if k.endswith(("_r1", "_r10"))} == {
        f"{heads}_{way}_r{k}": 1.0 for heads in ("own", "probe") for way in ("i2t", "t2i") for k in (1, 10)}
