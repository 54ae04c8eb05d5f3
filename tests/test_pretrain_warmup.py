"""The LP-FT head warm-up between DDA and DMA (`head_warmup_steps`): it aligns the heads
before DMA, is skipped when nothing would use it, is never redone by a resumed run, and
shares its training loop with the evaluation probe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mim_rec.pretrain.evaluate import EvalConfig, Embedded, train_probe_heads
from tests.encoder_fixtures import write_items
from tests.test_pretrain_trainer import _config, _weights
from train.pretrain import run_pretrain

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_items(tmp_path_factory.mktemp("world") / "items.parquet", count=48).parent


def _records(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").open()]


def _first_dma_clip(run: Path, dda_steps: int) -> float:
    return next(r["clip"] for r in _records(run) if r.get("step") == dda_steps + 1 and "clip" in r)


def _assert_same_weights(want: dict, got: dict) -> None:
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_warmup_lowers_the_first_dma_loss(world, tmp_path):
    """With aligned heads DMA starts far below the random-head loss (a batch of 8: ln 8)."""
    runs = {w: tmp_path / f"w{w}" for w in (0, 100)}
    for steps, out in runs.items():
        run_pretrain(_config(world, out, dda_steps=1, dma_steps=1, head_warmup_steps=steps))
    cold, warm = (_first_dma_clip(runs[w], 1) for w in (0, 100))
    events = [r for r in _records(runs[100]) if r.get("event") == "head_warmup"]
    assert len(events) == 1 and events[0]["step"] == 1 and events[0]["loss"] < cold
    assert not [r for r in _records(runs[0]) if r.get("event") == "head_warmup"]
    assert warm < 0.7 * cold, (warm, cold)


@pytest.mark.slow
def test_warmup_is_skipped_without_dma(world, tmp_path):
    """dma_steps=0: nothing reads the heads, so the artifact equals a run without warm-up."""
    for steps in (0, 50):
        run_pretrain(_config(world, tmp_path / f"w{steps}", dda_steps=1, dma_steps=0,
                             head_warmup_steps=steps))
    assert not [r for r in _records(tmp_path / "w50") if r.get("event") == "head_warmup"]
    _assert_same_weights(_weights(tmp_path / "w0"), _weights(tmp_path / "w50"))


@pytest.mark.slow
@pytest.mark.parametrize("dda_steps", [0, 2])
def test_run_resumed_after_warmup_does_not_redo_it(world, tmp_path, dda_steps, monkeypatch):
    """A run resumed from the checkpoint written right after the warm-up skips it and ends
    with the uninterrupted run's weights."""
    from train.common import CheckpointManager

    config = _config(world, tmp_path / "run", dda_steps=dda_steps, dma_steps=2,
                     head_warmup_steps=40, checkpoint_every=100)
    with monkeypatch.context() as patch:  # keep every checkpoint, as a run killed later would
        patch.setattr(CheckpointManager, "finish", lambda self: None)
        run = run_pretrain(config).parent
    want = _weights(run)
    boundary = run / "checkpoints" / f"step-{dda_steps:09d}.pt"
    assert boundary.exists()
    for later in set(run.glob("checkpoints/step-*.pt")) - {boundary}:
        later.unlink()
    shutil.rmtree(run / "encoders")
    (run / "metrics.jsonl").unlink()
    run_pretrain(config)
    events = [r.get("event") for r in _records(run)]
    assert "resume" in events and "head_warmup" not in events
    _assert_same_weights(want, _weights(run))


def _features(seed: int) -> Embedded:
    generator = torch.Generator().manual_seed(seed)
    image, title = torch.randn(64, 12, generator=generator), torch.randn(64, 10, generator=generator)
    return Embedded(image, title, torch.zeros(64, 8), torch.zeros(64, 8))


def _probe_state(features: Embedded, seed: int) -> list:
    config = EvalConfig(probe_steps=20, probe_batch_size=16, seed=seed)
    return [t.clone() for head in train_probe_heads(features, 8, config)
            for t in head.state_dict().values()]


def test_probe_heads_are_a_function_of_the_seed():
    features = _features(0)
    first, again, other = _probe_state(features, 0), _probe_state(features, 0), _probe_state(features, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
