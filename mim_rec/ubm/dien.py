"""DIEN: interest extraction with a GRU, interest evolution with an attention-gated GRU.

Zhou et al., AAAI 2019, "Deep Interest Evolution Network for Click-Through Rate Prediction"
(arXiv 1809.03672). An interest-extractor GRU turns the behaviour sequence into interest
states; an auxiliary loss makes each state predict the *next* behaviour (the paper's Eq. 2),
giving the GRU a supervision signal per step rather than only through the final click; an
AUGRU then evolves the interests relevant to the target item, its update gate scaled by
target attention.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mim_rec.ubm.base import InterestModule, register_ubm
from mim_rec.ubm.layers import ActivationUnit, AUGRUCell, masked_softmax


def next_behaviour_steps(states: torch.Tensor, behaviours: torch.Tensor,
                         mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """DIEN's auxiliary loss per step: state ``h_t`` should score ``e_{t+1}`` high and a negative low.

    ``-[log sigmoid(<h_t, e_{t+1}>) + log(1 - sigmoid(<h_t, e~_{t+1}>))]`` for every step where
    ``t``, ``t+1`` and the negative are all real. The negative ``e~_{t+1}`` is the
    behaviour at the same step of the previous row in the batch (an in-batch sample, so no
    extra embedding lookups). A step whose negative is the positive item itself (the same
    embedding: two rows sharing a behaviour, or a batch of one) would push the same score up
    and down at once, so it is left out. Returns ``(per_step [B, L-1], valid [B, L-1])``, the
    loss 0 wherever ``valid`` is False; :func:`next_behaviour_loss` averages it.
    """
    negatives, negative_mask = behaviours.roll(1, dims=0), mask.roll(1, dims=0)
    h, positive, negative = states[:, :-1], behaviours[:, 1:], negatives[:, 1:]
    distinct = (positive != negative).any(-1)
    valid = mask[:, :-1] & mask[:, 1:] & negative_mask[:, 1:] & distinct
    positive_logit = (h * positive).sum(-1)
    negative_logit = (h * negative).sum(-1)
    per_step = F.softplus(-positive_logit) + F.softplus(negative_logit)  # -log s(p) - log(1 - s(n))
    return torch.where(valid, per_step, torch.zeros_like(per_step)), valid


def next_behaviour_loss(per_step: torch.Tensor, valid: torch.Tensor,
                        rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The mean of :func:`next_behaviour_steps`' losses over the valid steps of ``rows`` (bool
    ``[B]``; ``None``: every row), 0 when no step qualifies. A row left out still serves as the
    next row's in-batch negative: it is a real item, only its own steps are not scored."""
    if rows is not None:
        valid = valid & rows.unsqueeze(1)
        per_step = torch.where(valid, per_step, torch.zeros_like(per_step))
    return per_step.sum() / valid.sum().clamp(min=1).to(per_step.dtype)


@register_ubm("dien")
class DIEN(InterestModule):
    """GRU interest extractor + AUGRU interest evolution -> final evolved interest ``[B, dim]``.

    Both recurrences skip padded steps (the state is carried over unchanged), so padding can sit
    anywhere in the row and an empty history yields the zero state. The auxiliary loss pairs
    neighbouring slots only, so it scores every real step of a contiguous (the loader's
    left-padded) row but skips a pair that a gap inside the row separates. The AUGRU's attention is
    the DIN activation unit between the target and each interest state, softmax-normalised over
    the real steps (Eq. 5 uses a bilinear form; the activation unit is the shared, richer
    scorer). :meth:`auxiliary_loss` returns the extractor's next-behaviour loss of the last
    forward over the rows asked for; add it (times a weight, 1.0 in the paper) to the CTR loss
    while training.
    """

    def __init__(self, dim: int, attention_hidden: Sequence[int] = (64, 32),
                 activation: str = "prelu", dropout: float = 0.0) -> None:
        super().__init__(dim)
        self.extractor = nn.GRUCell(dim, dim)
        self.scorer = ActivationUnit(dim, attention_hidden, activation, dropout)
        self.evolution = AUGRUCell(dim, dim)
        self._auxiliary_steps: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def extract(self, behaviours: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Interest states ``[B, L, dim]``: the GRU state after each real behaviour (``[B, 0, dim]``
        for a batch without behaviour slots, which ``torch.stack`` of no states would refuse).

        Both recurrences take their steps from one ``unbind``, whose backward stacks the steps'
        gradients once; a ``behaviours[:, t]`` per step gave every step's backward a whole
        ``[B, L, dim]`` zero gradient to fill and add up (work growing as ``L**2``)."""
        hidden = behaviours.new_zeros(behaviours.shape[0], self.dim)
        states = []
        for step_input, real in zip(behaviours.unbind(1), mask.unbind(1)):
            step = self.extractor(step_input, hidden)
            hidden = torch.where(real[:, None], step, hidden)
            states.append(hidden)
        return torch.stack(states, dim=1) if states else behaviours.new_zeros(behaviours.shape[0], 0, self.dim)

    def evolve(self, states: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the AUGRU over the interest states; returns the final state ``[B, dim]``."""
        hidden = states.new_zeros(states.shape[0], self.dim)
        for state, weight, real in zip(states.unbind(1), attention.unbind(1), mask.unbind(1)):
            step = self.evolution(state, hidden, weight)
            hidden = torch.where(real[:, None], step, hidden)
        return hidden

    def interest(self, target: torch.Tensor, behaviours: torch.Tensor, mask: torch.Tensor,
                 target_category: torch.Tensor, behaviour_categories: torch.Tensor) -> torch.Tensor:
        states = self.extract(behaviours, mask)
        self._auxiliary_steps = next_behaviour_steps(states, behaviours, mask)
        attention = masked_softmax(self.scorer(target, states), mask)
        return self.evolve(states, attention, mask)

    def auxiliary_loss(self, rows: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        if self._auxiliary_steps is None:
            return None
        return next_behaviour_loss(*self._auxiliary_steps, rows)
