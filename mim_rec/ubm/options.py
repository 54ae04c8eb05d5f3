"""Type and range checks of the UBMs' constructor options, shared by every model.

The options come from YAML or ``key=value`` overrides, so a float, a string or a non-positive
size reaches the constructor as readily as a right value. Torch accepts many of them and fails
only at the first step (``top_k=2.5`` in ``topk``, ``num_layers=0`` in BST's pooling), or takes
them silently (``normalize='no'`` is truthy). Each check raises ``ValueError`` naming the option,
which the trainer's config check turns into a one-line error before any process group is up.
"""

from __future__ import annotations

from typing import Sequence, Tuple


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an int (not a bool, not a float) of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")
    return value


def positive_ints(name: str, values: object) -> Tuple[int, ...]:
    """Every entry of ``values`` a positive int (layer widths): a list of them, as a tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name}={values!r}: must be a list of positive integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"{name}={list(values)!r}: must be a list of positive integers")
    return tuple(values)


def probability(name: str, value: object) -> float:
    """``value`` if it is a number in [0, 1): a dropout rate (a negative one meant none, NaN
    failed in the first attention step)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name}={value!r}: must be a number in [0, 1)")
    return float(value)


def flag(name: str, value: object) -> bool:
    """``value`` if it is a bool: a string such as ``'no'`` would otherwise count as true."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be true or false")
    return value
