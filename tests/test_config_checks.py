"""Settings that cannot run are refused by key, before a model, world or feature is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest

from mim_rec.config import ConfigError, require_positive
from train.cli import main as mim


@dataclass
class _Inner:
    size: int = 4


@dataclass
class _Outer:
    steps: int = 1
    limit: Optional[int] = None
    inner: _Inner = field(default_factory=_Inner)


def test_require_positive_names_the_dotted_key_and_lets_unset_pass():
    require_positive(_Outer(), ("steps", "limit", "inner.size"))  # None = not set
    with pytest.raises(ConfigError, match=r"inner.size=0: must be positive"):
        require_positive(_Outer(inner=_Inner(size=0)), ("steps", "inner.size"))
    with pytest.raises(ConfigError, match=r"limit=-2: must be positive"):
        require_positive(_Outer(limit=-2), ("limit",))


@pytest.mark.parametrize("command, override, key", [
    ("pretrain", "data.batch_size=0", "data.batch_size=0"),
    ("pretrain", "log_every=0", "log_every=0"),
    ("csft", "steps=0", "steps=0"),
    ("csft", "loss.temperature=0", "loss.temperature=0.0"),
    ("csft", "checkpoint_every=-1", "checkpoint_every=-1"),
])
def test_stage_commands_refuse_non_positive_settings(tmp_path, capsys, command, override, key):
    # The world folder does not exist: the refusal must come before anything reads it.
    assert mim([command, f"data.world={tmp_path / 'absent'}", f"out={tmp_path / 'out'}", override]) == 2
    assert f"mim {command}: error: {key}: must be positive" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
