"""C-SFT loss math on small cases computed by hand, and the fusion layers' algebra."""

from __future__ import annotations

import math

import pytest
import torch

from mim_rec.csft.fusion import (ConcatFusion, FusionMLP, LowRankTensorFusion, TensorFusion,
                                 build_fusion, tensor_fusion)
from mim_rec.csft.losses import (info_nce, multi_level_info_nce, negatives_per_query,
                                 pairwise_cross_entropy, usable_columns)

# One query along x; candidates: the positive (x), an orthogonal item (y), an opposite item (-x).
QUERY = torch.tensor([[1.0, 0.0]])
CANDIDATES = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # norms differ: cosine is used
POSITIVE = torch.tensor([0])


def test_info_nce_hand_computed():
    # cosines 1, 0, -1; tau = 0.5 -> logits 2, 0, -2
    loss = info_nce(QUERY, CANDIDATES, torch.tensor([10, 11, 12]), POSITIVE, temperature=0.5)
    expected = math.log(1 + math.exp(-2) + math.exp(-4))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_same_item_elsewhere_is_not_a_negative():
    # The third column holds the positive's item again (e.g. a queued copy): masked out.
    ids = torch.tensor([10, 11, 10])
    loss = info_nce(QUERY, CANDIDATES, ids, POSITIVE, temperature=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    assert usable_columns(ids, POSITIVE).tolist() == [[True, True, False]]
    assert negatives_per_query(ids, POSITIVE).tolist() == [1]


def test_two_queries_sharing_candidates():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ids = torch.tensor([10, 11, 12])
    loss = info_nce(queries, CANDIDATES, ids, torch.tensor([0, 1]), temperature=1.0)
    # query 0: logits (1, 0, -1), positive 0; query 1: logits (0, 1, 0), positive 1.
    first = -1 + math.log(math.e + 1 + math.exp(-1))
    second = -1 + math.log(1 + math.e + 1)
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_multi_level_weights():
    ids = torch.tensor([10, 11, 12])
    item = CANDIDATES
    txt = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])    # cosines 0.7071, 1, 0
    img = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])   # cosines 0, 1, -1
    out = multi_level_info_nce(QUERY, {"item": item, "txt": txt, "img": img}, ids, POSITIVE,
                               temperature=1.0, alpha=0.5, beta=0.25)
    q2item = -1 + math.log(math.e + 1 + math.exp(-1))
    c = 1 / math.sqrt(2)
    q2txt = -c + math.log(math.exp(c) + math.e + 1)
    q2img = 0 + math.log(1 + math.e + math.exp(-1))
    assert out["q2item"].item() == pytest.approx(q2item, rel=1e-6)
    assert out["q2txt"].item() == pytest.approx(q2txt, rel=1e-6)
    assert out["q2img"].item() == pytest.approx(q2img, rel=1e-6)
    assert out["loss"].item() == pytest.approx(q2item + 0.5 * q2txt + 0.25 * q2img, rel=1e-6)


def test_multi_level_off_skips_levels():
    out = multi_level_info_nce(QUERY, {"item": CANDIDATES}, torch.tensor([10, 11, 12]),
                               POSITIVE, temperature=0.5, alpha=0.0, beta=0.0)
    assert set(out) == {"loss", "q2item"}
    assert out["loss"].item() == pytest.approx(math.log(1 + math.exp(-2) + math.exp(-4)), rel=1e-6)


def test_pairwise_cross_entropy_hand_computed():
    # scale 2, bias -1: logits 1, -1, -3; positive mean + negatives' mean.
    loss = pairwise_cross_entropy(QUERY, CANDIDATES, torch.tensor([10, 11, 12]), POSITIVE,
                                  torch.tensor(2.0), torch.tensor(-1.0))
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = softplus(-1) + (softplus(-1) + softplus(-3)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_losses_are_differentiable_through_both_sides():
    queries = torch.randn(4, 8, requires_grad=True)
    candidates = torch.randn(6, 8, requires_grad=True)
    loss = info_nce(queries, candidates, torch.arange(6), torch.arange(4), 0.1)
    loss.backward()
    assert queries.grad.abs().sum() > 0 and candidates.grad.abs().sum() > 0


# ------------------------------------------------------------------ fusion

def test_tensor_fusion_layout():
    a, b = torch.tensor([[2.0, 3.0]]), torch.tensor([[5.0, 7.0, 11.0]])
    z = tensor_fusion(a, b)
    assert z.shape == (1, 3 * 4)
    # index i * (d_b + 1) + j holds [a; 1]_i * [b; 1]_j
    expected = [x * y for x in (2.0, 3.0, 1.0) for y in (5.0, 7.0, 11.0, 1.0)]
    assert z[0].tolist() == expected


def test_low_rank_fusion_equals_tfn_with_cp_weight():
    torch.manual_seed(0)
    dim_a, dim_b, hidden, rank = 3, 4, 5, 2
    low = LowRankTensorFusion(dim_a, dim_b, hidden, rank)
    torch.nn.init.normal_(low.bias)
    full = TensorFusion(dim_a, dim_b, hidden)
    u = low.factor_a.weight.view(rank, hidden, dim_a + 1)
    v = low.factor_b.weight.view(rank, hidden, dim_b + 1)
    weight = torch.einsum("rha,rhb->hab", u, v).reshape(hidden, -1)
    with torch.no_grad():
        full.linear.weight.copy_(weight)
        full.linear.bias.copy_(low.bias)
    a, b = torch.randn(6, dim_a), torch.randn(6, dim_b)
    torch.testing.assert_close(low(a, b), full(a, b), rtol=1e-5, atol=1e-5)


def test_fusion_kinds_and_parameter_counts():
    tfn, low, cat = (build_fusion(k, 16, 16, 8, rank=4) for k in ("tfn", "lowrank", "concat"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(tfn) == 17 * 17 * 8 + 8
    assert count(low) == 4 * 8 * (17 + 17) + 8
    assert isinstance(cat, ConcatFusion) and count(cat) == 32 * 8 + 8
    with pytest.raises(ValueError, match="unknown fusion"):
        build_fusion("sum", 4, 4, 4)


def test_fusion_mlp_zero_init_output():
    mlp = FusionMLP("tfn", 4, 4, hidden=8, out_dim=4, zero_init_output=True)
    assert mlp(torch.randn(3, 4), torch.randn(3, 4)).abs().max().item() == 0.0
