"""The six ID interest modules: shapes, padding, empty histories, attention, DIEN's loss, search."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mim_rec.ubm import available_ubms, build_ubm
from mim_rec.ubm.dien import DIEN
from mim_rec.ubm.din import DIN
from mim_rec.ubm.layers import AUGRUCell, masked_softmax, recency_positions
from mim_rec.ubm.sim import category_search
from mim_rec.ubm.twin import TWIN

NAMES = ["avg", "din", "dien", "bst", "sim", "twin"]
B, L, D = 5, 9, 8


def make_inputs(seed: int = 0, batch: int = B, length: int = L, dim: int = D, categories: int = 3):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(batch, dim, generator=g)
    behaviours = torch.randn(batch, length, dim, generator=g)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[1] = 0  # one row with an empty history
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)  # real first, padding last
    target_category = torch.randint(0, categories, (batch,), generator=g)
    behaviour_categories = torch.randint(0, categories, (batch, length), generator=g)
    behaviour_categories[0, 0] = target_category[0]  # SIM's search finds something in row 0
    return target, behaviours, mask, target_category, behaviour_categories


def build(name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_ubm(name, D, **options).eval()


def test_registry_lists_the_six_models():
    assert available_ubms() == sorted(NAMES)


def test_unknown_name_and_bad_option_are_clear():
    with pytest.raises(ValueError, match="unknown UBM 'dni'.*din"):
        build_ubm("dni", D)
    with pytest.raises(TypeError, match="bad options for UBM 'sim'"):
        build_ubm("sim", D, top_kk=3)


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_and_empty_history_is_finite(name):
    ubm = build(name)
    out = ubm(*make_inputs())
    assert out.shape == (B, ubm.output_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_padding_values_never_affect_the_output(name):
    ubm = build(name)
    target, behaviours, mask, target_category, behaviour_categories = make_inputs()
    reference = ubm(target, behaviours, mask, target_category, behaviour_categories)
    poisoned = behaviours.masked_fill(~mask.unsqueeze(-1), float("nan"))
    poisoned[:, :, 0] = torch.where(mask, poisoned[:, :, 0], torch.full_like(poisoned[:, :, 0], 1e30))
    other_categories = torch.where(mask, behaviour_categories, target_category.unsqueeze(1))
    out = ubm(target, poisoned, mask, target_category, other_categories)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("name", NAMES)
def test_padding_position_does_not_matter(name):
    """The same real behaviours padded on the left instead of the right give the same interest."""
    ubm = build(name)
    target, behaviours, mask, target_category, behaviour_categories = make_inputs()
    shift = (~mask).sum(1)
    index = (torch.arange(L).unsqueeze(0) - shift.unsqueeze(1)) % L  # rotate real entries to the end
    left_mask = mask.gather(1, index)
    left = ubm(target, behaviours.gather(1, index.unsqueeze(-1).expand(-1, -1, D)), left_mask,
               target_category, behaviour_categories.gather(1, index))
    assert left_mask[:, -1].equal(mask.any(1))
    torch.testing.assert_close(left, ubm(target, behaviours, mask, target_category, behaviour_categories))


def left_padded_inputs(lengths: list[int], length: int = L, seed: int = 3):
    """The loader's layout: behaviours right-aligned (most recent last), padding on the left."""
    target, behaviours, _, target_category, behaviour_categories = make_inputs(seed, len(lengths), length,
                                                                               categories=2)
    mask = torch.arange(length).unsqueeze(0) >= (length - torch.tensor(lengths)).unsqueeze(1)
    return target, behaviours, mask, target_category, behaviour_categories


@pytest.mark.parametrize("name", NAMES)
def test_each_row_alone_without_its_padding_gives_the_same_interest(name):
    """Padding slots, and the other rows, change nothing: a row scored alone (a batch of one),
    cut to its real behaviours, gets the interest it gets in the padded batch. For the
    recurrences this means the final state is the one after the last real behaviour."""
    ubm = build(name, **({"top_k": 2} if name in ("sim", "twin") else {}))
    lengths = [L, 1, 3, 0]
    target, behaviours, mask, target_category, behaviour_categories = left_padded_inputs(lengths)
    batch = ubm(target, behaviours, mask, target_category, behaviour_categories)
    for row, n in enumerate(lengths):
        real = slice(L - n, L)
        alone = ubm(target[row:row + 1], behaviours[row:row + 1, real], mask[row:row + 1, real],
                    target_category[row:row + 1], behaviour_categories[row:row + 1, real])
        torch.testing.assert_close(alone, batch[row:row + 1])


@pytest.mark.parametrize("name", NAMES)
def test_a_batch_without_behaviour_slots_is_a_batch_of_empty_histories(name):
    """``L = 0`` (a caller that trims padding to the batch's longest history, when every history
    is empty) gives what all-padding slots give; DIEN used to fail on it in ``torch.stack``."""
    ubm = build(name)
    target, behaviours, _, target_category, behaviour_categories = make_inputs(batch=2, length=3)
    padded = ubm(target, behaviours, torch.zeros(2, 3, dtype=torch.bool), target_category, behaviour_categories)
    padded_aux = ubm.auxiliary_loss()
    none = ubm(target, behaviours[:, :0], torch.zeros(2, 0, dtype=torch.bool), target_category,
               behaviour_categories[:, :0])
    torch.testing.assert_close(none, padded)
    assert (padded_aux is None and ubm.auxiliary_loss() is None) or torch.equal(ubm.auxiliary_loss(), padded_aux)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_finite_with_empty_rows(name):
    ubm = build_ubm(name, D).train()
    target, behaviours, mask, target_category, behaviour_categories = make_inputs()
    target.requires_grad_(True)
    behaviours.requires_grad_(True)
    out = ubm(target, behaviours, mask, target_category, behaviour_categories)
    loss = out.square().sum() + (ubm.auxiliary_loss() if ubm.auxiliary_loss() is not None else 0)
    loss.backward()
    grads = [behaviours.grad] + [g for g in [target.grad] + [p.grad for p in ubm.parameters()] if g is not None]
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_padding_reaches_no_gradient(name):
    """NaN and inf in padded slots used to come back as NaN parameter gradients (DIN, DIEN, SIM
    and TWIN scored the padded behaviours before masking the scores); the gradients must be those
    of zero padding."""
    target, behaviours, mask, target_category, behaviour_categories = make_inputs()
    grads = []
    for fill in (0.0, float("nan"), float("inf")):
        ubm = build(name)
        padded = behaviours.masked_fill(~mask.unsqueeze(-1), fill).requires_grad_(True)
        out = ubm(target, padded, mask, target_category, behaviour_categories)
        (out.square().sum() + (ubm.auxiliary_loss() if ubm.auxiliary_loss() is not None else 0)).backward()
        grads.append([padded.grad] + [p.grad for p in ubm.parameters() if p.grad is not None])
    clean, *poisoned = grads
    assert all(torch.isfinite(g).all() for g in clean)
    for other in poisoned:
        assert all(torch.equal(a, b) for a, b in zip(clean, other))


@pytest.mark.parametrize("name, options, message", [
    ("sim", {"top_k": 2.5}, r"top_k=2.5: must be a positive integer"),
    ("twin", {"top_k": 2.5}, r"top_k=2.5: must be a positive integer"),
    ("twin", {"num_heads": 1.0}, r"num_heads=1.0: must be a positive integer"),
    ("bst", {"num_layers": 0}, r"num_layers=0: must be a positive integer"),
    ("bst", {"ffn_dim": -4}, r"ffn_dim=-4: must be a positive integer"),
    ("bst", {"max_positions": 0}, r"max_positions=0: must be a positive integer"),
    ("din", {"normalize": "no"}, r"normalize='no': must be true or false"),
    ("din", {"attention_hidden": [0]}, r"attention_hidden=\[0\]: must be a list of positive integers"),
    ("din", {"attention_hidden": [-3]}, r"attention_hidden=\[-3\]: must be a list of positive integers"),
    ("dien", {"attention_hidden": [8.5]}, r"attention_hidden=\[8.5\]: must be a list of positive integers"),
    ("sim", {"attention_hidden": 16}, r"attention_hidden=16: must be a list of positive integers"),
    # a negative rate trained without dropout; NaN failed in BST's first attention step
    ("din", {"dropout": -0.5}, r"dropout=-0.5: must be a number in \[0, 1\)"),
    ("dien", {"dropout": 1.0}, r"dropout=1.0: must be a number in \[0, 1\)"),
    ("bst", {"dropout": float("nan")}, r"dropout=nan: must be a number in \[0, 1\)"),
])
def test_options_the_model_cannot_run_are_refused_by_name(name, options, message):
    """Each used to construct, then fail at the first step (TypeError in topk, IndexError in
    BST's pooling), fail in torch's Linear with a RuntimeError, or run silently as another model
    (a truthy string, a zero-width scorer giving constant scores)."""
    with pytest.raises(ValueError, match=message):
        build_ubm(name, D, **options)


def test_masked_softmax_sums_to_one_and_zero_for_empty_rows():
    scores = torch.tensor([[1.0, 2.0, float("nan")], [0.5, -3.0, 4.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    weights = masked_softmax(scores, mask)
    torch.testing.assert_close(weights.sum(1), torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(weights[0, :2], torch.softmax(torch.tensor([1.0, 2.0]), 0))
    assert weights[0, 2] == 0


def test_din_attention_weights_sum_to_one_on_real_behaviours():
    din = build("din")
    target, behaviours, mask, *_ = make_inputs()
    weights = din.attention_weights(target, behaviours, mask)
    torch.testing.assert_close(weights.sum(1), mask.any(1).float())
    assert (weights[~mask] == 0).all()
    unnormalised = build("din", normalize=False).attention_weights(target, behaviours, mask)
    assert (unnormalised[~mask] == 0).all() and not torch.allclose(unnormalised.sum(1)[mask.any(1)], torch.ones(1))


def test_recency_positions_count_from_the_most_recent_real_behaviour():
    mask = torch.tensor([[True, True, True, False], [False, True, True, True], [False] * 4])
    assert recency_positions(mask).tolist() == [[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0]]


def test_sim_search_keeps_the_most_recent_top_k_of_the_target_category():
    categories = torch.tensor([[1, 2, 1, 1, 3, 1, 2, 1], [2, 2, 1, 3, 3, 3, 3, 3], [2, 3, 2, 3, 1, 1, 1, 1]])
    mask = torch.tensor([[True] * 7 + [False], [True] * 8, [True] * 4 + [False] * 4])
    target_category = torch.tensor([1, 1, 1])
    indices, kept = category_search(mask, target_category, categories, top_k=3)
    # Row 0: category 1 at 0, 2, 3, 5 (7 is padding) -> the three latest. Row 1: only position 2.
    # Row 2: category 1 only in padding -> nothing.
    assert sorted(indices[0][kept[0]].tolist()) == [2, 3, 5]
    assert indices[1][kept[1]].tolist() == [2]
    assert not kept[2].any()
    sim = build("sim", top_k=3)
    out = sim(torch.randn(3, D), torch.randn(3, 8, D), mask, target_category, categories)
    assert torch.equal(out[2], torch.zeros(D)) and out[:2].abs().sum(1).gt(0).all()


def test_sim_equals_din_attention_over_the_searched_behaviours():
    sim = build("sim", top_k=2)
    din = DIN(D).eval()
    din.scorer = sim.scorer
    target, behaviours, mask, target_category, behaviour_categories = make_inputs()
    indices, kept = category_search(mask, target_category, behaviour_categories, top_k=2)
    selected = behaviours.gather(1, indices.unsqueeze(-1).expand(-1, -1, D))
    expected = din(target, selected, kept, target_category, torch.zeros_like(kept, dtype=torch.long))
    torch.testing.assert_close(sim(target, behaviours, mask, target_category, behaviour_categories), expected)
    assert torch.equal(expected[~kept.any(1)], torch.zeros_like(expected[~kept.any(1)]))


def test_twin_search_and_attention_share_one_scorer():
    twin: TWIN = build("twin", top_k=3, num_heads=2)
    target, behaviours, mask, *_ = make_inputs()
    scores = twin.scorer(target, behaviours)  # [B, H, L]
    indices, kept, kept_scores = twin.search(target, behaviours, mask)
    for row in range(B):
        real = mask[row].nonzero().squeeze(1)
        best = real[scores[row].mean(0)[real].argsort(descending=True)[:3]]
        assert sorted(indices[row][kept[row]].tolist()) == sorted(best.tolist())
    torch.testing.assert_close(kept_scores, scores.gather(2, indices.unsqueeze(1).expand(-1, 2, -1)))


def test_twin_with_top_k_covering_the_history_is_full_multi_head_target_attention():
    twin: TWIN = build("twin", top_k=L, num_heads=2)
    target, behaviours, mask, target_category, behaviour_categories = make_inputs()
    out = twin(target, behaviours, mask, target_category, behaviour_categories)
    scores = twin.scorer(target, behaviours)
    values = twin.value(behaviours).view(B, L, 2, D // 2)
    expected = torch.zeros(B, D)
    for row in range(B):
        real = mask[row]
        if real.any():
            for head in range(2):
                w = torch.softmax(scores[row, head, real], 0)
                expected[row, head * D // 2:(head + 1) * D // 2] = w @ values[row, real, head]
    torch.testing.assert_close(out, twin.output(expected) * mask.any(dim=1, keepdim=True))
    assert torch.equal(out[1], torch.zeros(D))  # the empty history is no interest, not the output's bias


@pytest.mark.parametrize("name", ["sim", "twin"])
def test_long_history(name):
    ubm = build(name, top_k=50)
    out = ubm(*make_inputs(length=1000, categories=20))
    assert out.shape == (B, D) and torch.isfinite(out).all()


def test_augru_scales_the_update_gate_by_the_attention():
    """DIEN's Eq. 6-7: ``u' = a u`` makes the AUGRU step ``(1 - a) h + a GRU(x, h)`` with the GRU of
    Eq. 1 (``h' = (1 - u) h + u h~``, the reset gate inside ``h~``): attention 0 keeps the state,
    1 is a plain GRU step. Checked against torch's GRUCell, whose update gate is ``z = 1 - u``."""
    torch.manual_seed(0)
    augru = AUGRUCell(D, D)
    gru = torch.nn.GRUCell(D, D)
    (reset_w, update_w), (reset_b, update_b) = augru.gates.weight.chunk(2), augru.gates.bias.chunk(2)
    with torch.no_grad():
        gru.weight_ih.copy_(torch.cat([reset_w[:, :D], -update_w[:, :D], augru.candidate_input.weight]))
        gru.weight_hh.copy_(torch.cat([reset_w[:, D:], -update_w[:, D:], augru.candidate_hidden.weight]))
        gru.bias_ih.copy_(torch.cat([reset_b, -update_b, augru.candidate_input.bias]))
        gru.bias_hh.copy_(torch.cat([torch.zeros(2 * D), augru.candidate_hidden.bias]))
    x, hidden = torch.randn(B, D), torch.randn(B, D)
    attention = torch.tensor([0.0, 1.0, 0.3, 0.7, 0.05])
    expected = (1 - attention[:, None]) * hidden + attention[:, None] * gru(x, hidden)
    torch.testing.assert_close(augru(x, hidden, attention), expected)
    assert torch.equal(augru(x, hidden, torch.zeros(B)), hidden)


def reference_dien_aux_loss(dien: DIEN, behaviours: torch.Tensor, mask: torch.Tensor, rows=None) -> float:
    """The paper's Eq. 2 written out step by step, with torch.nn.GRU as the extractor, over
    ``rows`` (every row if None); the negatives still come from every row."""
    gru = torch.nn.GRU(D, D, batch_first=True)
    gru.load_state_dict({f"{k}_l0": v for k, v in dien.extractor.state_dict().items()})
    total, count = 0.0, 0
    for b in range(behaviours.shape[0]):
        real = mask[b].nonzero().squeeze(1)  # one contiguous run, on the left or on the right
        if len(real) == 0 or (rows is not None and b not in rows):
            continue
        states, _ = gru(behaviours[b:b + 1, real])
        negative_row = (b - 1) % behaviours.shape[0]
        for t in range(len(real) - 1):
            slot = real[t + 1]  # the negative is the previous row's behaviour in the same slot
            positive, negative = behaviours[b, slot], behaviours[negative_row, slot]
            if not mask[negative_row, slot] or torch.equal(positive, negative):
                continue
            h = states[0, t]
            total += -math.log(torch.sigmoid(h @ positive).item()) - math.log(1 - torch.sigmoid(h @ negative).item())
            count += 1
    return total / count


@pytest.mark.parametrize("layout", ["real first", "loader"])
def test_dien_auxiliary_loss_matches_the_paper_formula(layout):
    """``h_t`` scores ``e_{t+1}``, never ``e_t``, and no step reaches past either end of a history,
    whether the padding follows the history or (the loader's layout) precedes it."""
    dien: DIEN = build("dien")
    target, behaviours, mask, target_category, behaviour_categories = make_inputs() if layout == "real first" \
        else left_padded_inputs([L, 1, 3, 0, 6, L - 1])
    assert dien.auxiliary_loss() is None
    dien(target, behaviours, mask, target_category, behaviour_categories)
    assert dien.auxiliary_loss().item() == pytest.approx(reference_dien_aux_loss(dien, behaviours, mask), rel=1e-5)


def test_dien_auxiliary_loss_skips_steps_whose_negative_is_the_positive():
    """The in-batch negative is the previous row's behaviour: where that is the positive item
    itself, the step is left out rather than scored as both a hit and a miss."""
    target, behaviours, mask, target_category, behaviour_categories = make_inputs()
    mask = torch.ones_like(mask)
    dien: DIEN = build("dien")
    dien(target[:1], behaviours[:1], mask[:1], target_category[:1], behaviour_categories[:1])
    assert dien.auxiliary_loss().item() == 0.0  # a batch of one: every negative is the positive

    shared = behaviours.clone()
    shared[1, 3] = shared[0, 3]  # row 1's negative at step 3 is row 0's behaviour there: the same item
    dien(target, shared, mask, target_category, behaviour_categories)
    assert dien.auxiliary_loss().item() == pytest.approx(reference_dien_aux_loss(dien, shared, mask), rel=1e-5)


def test_dien_auxiliary_loss_counts_only_the_rows_asked_for():
    """A batch's weight-0 padding rows used to train the auxiliary loss as if they were real."""
    dien: DIEN = build("dien")
    target, behaviours, mask, target_category, behaviour_categories = make_inputs()
    mask = torch.ones_like(mask)
    dien(target, behaviours, mask, target_category, behaviour_categories)
    assert torch.equal(dien.auxiliary_loss(torch.ones(B, dtype=torch.bool)), dien.auxiliary_loss())
    kept = torch.tensor([True, False, True, False, False])
    assert dien.auxiliary_loss(kept).item() == pytest.approx(
        reference_dien_aux_loss(dien, behaviours, mask, rows=[0, 2]), rel=1e-5)
    none = dien.auxiliary_loss(torch.zeros(B, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and all(p.grad is None or not p.grad.any() for p in dien.parameters())


def backward_node_names(*outputs: torch.Tensor) -> list:
    """The class name of every node in the autograd graph behind ``outputs``."""
    seen, pending = set(), [o.grad_fn for o in outputs]
    while pending:
        node = pending.pop()
        if node is not None and node not in seen:
            seen.add(node)
            pending.extend(next_node for next_node, _ in node.next_functions)
    return [type(node).__name__ for node in seen]


def test_dien_recurrences_take_their_steps_in_one_unbind():
    """Both recurrences read step ``t`` of the behaviours, the interest states and the attention
    from one ``unbind`` per tensor, whose backward stacks the steps' gradients once. A
    ``tensor[:, t]`` per step gave each step's backward a whole ``[B, L, D]`` zero gradient to
    fill and add up, work that grows as L**2 (a tenth of a DIEN training step at L=50)."""
    dien: DIEN = build("dien")
    target, behaviours, mask, target_category, behaviour_categories = make_inputs()
    behaviours.requires_grad_(True)
    out = dien(target, behaviours, mask, target_category, behaviour_categories)
    names = backward_node_names(out, dien.auxiliary_loss())
    assert "SelectBackward0" not in names
    assert names.count("UnbindBackward0") == 3  # behaviours, interest states, attention


def test_dien_auxiliary_loss_decreases_when_the_next_behaviour_is_predictable():
    """Histories walk a fixed cycle of items, so h_t can learn to point at item t+1."""
    torch.manual_seed(0)
    items = F.normalize(torch.randn(6, D), dim=1) * 2
    starts = torch.randint(0, 6, (16,))
    behaviours = items[(starts.unsqueeze(1) + torch.arange(L)) % 6]
    mask = torch.ones(16, L, dtype=torch.bool)
    zeros = torch.zeros(16, dtype=torch.long)
    dien = DIEN(D)
    optimizer = torch.optim.Adam(dien.extractor.parameters(), lr=0.05)
    losses = []
    for _ in range(40):
        dien(behaviours[:, 0], behaviours, mask, zeros, zeros.unsqueeze(1).expand(-1, L))
        loss = dien.auxiliary_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bst_target_pooling_reads_the_history():
    bst = build("bst", dropout=0.0)
    target, behaviours, mask, target_category, behaviour_categories = make_inputs()
    out = bst(target, behaviours, mask, target_category, behaviour_categories)
    changed = bst(target, behaviours.flip(-1), mask, target_category, behaviour_categories)
    has_history = mask.any(1)
    assert not torch.allclose(out[has_history], changed[has_history])
    assert torch.equal(out[~has_history], changed[~has_history])
