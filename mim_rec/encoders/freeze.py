"""Partial freezing of a backbone.

Frozen parameters get no gradient and frozen modules stay in eval mode even when the model
is put in training mode, so their batch-norm statistics and dropout never change. A frozen
prefix then computes a fixed function of its input.
"""

from __future__ import annotations

from typing import Dict, Iterable, List

from torch import nn


class PartlyFrozen(nn.Module):
    """Base for encoders whose backbone may be partly frozen."""

    def __init__(self) -> None:
        super().__init__()
        self._always_eval: List[nn.Module] = []

    def freeze(self, modules: Iterable[nn.Module]) -> None:
        for module in modules:
            for param in module.parameters():
                param.requires_grad_(False)
            self.pin_eval([module])

    def pin_eval(self, modules: Iterable[nn.Module]) -> None:
        """Keep ``modules`` in eval mode (their parameters may still train)."""
        for module in modules:
            module.eval()
            self._always_eval.append(module)

    def train(self, mode: bool = True) -> "PartlyFrozen":
        super().train(mode)
        for module in self._always_eval:
            module.eval()
        return self


def describe_trainable(module: nn.Module) -> Dict[str, int]:
    """Parameter counts for logs and docs: how much of a backbone actually trains."""
    return {"parameters": sum(p.numel() for p in module.parameters()),
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad)}
