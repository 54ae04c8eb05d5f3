"""train.common.CheckpointManager: retention, RNG restore, frozen weights, refusal of foreign checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from mim_rec.data.manifest import fingerprint_config
from train.common import CheckpointManager


def _model_and_optimizer():
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def test_keeps_newest_and_restores_state_and_rng(tmp_path):
    model, optimizer = _model_and_optimizer()
    manager = CheckpointManager(tmp_path, config_fingerprint="abc", keep=2)
    for step in (3, 6, 9):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        manager.save(step, model, optimizer, extra={"phase": "dma"})
    assert [p.name for p in manager.checkpoints()] == ["step-000000006.pt", "step-000000009.pt"]
    manager.finish()
    assert [p.name for p in manager.checkpoints()] == ["step-000000009.pt"]
    expected_next = torch.rand(4)  # the draw right after the step-9 save

    fresh, fresh_optimizer = _model_and_optimizer()
    resumed = manager.resume(fresh, fresh_optimizer)
    assert resumed.step == 9 and resumed.extra == {"phase": "dma"}
    assert torch.equal(torch.rand(4), expected_next)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 3


def test_refuses_a_checkpoint_of_another_configuration(tmp_path):
    model, optimizer = _model_and_optimizer()
    CheckpointManager(tmp_path, "abc").save(1, model, optimizer)
    with pytest.raises(ValueError, match="another configuration"):
        CheckpointManager(tmp_path, "xyz").resume(model, optimizer)


@dataclass
class _RunConfig:
    lr: float = 0.1
    out: str = ""


@dataclass
class _LoggedRunConfig:
    steps: int = 4
    out: str = ""
    log_every: int = 10
    checkpoint_every: int = 5
    eval: dict = field(default_factory=dict)


def test_a_moved_run_folder_resumes_and_another_config_is_still_refused(tmp_path):
    model, optimizer = _model_and_optimizer()
    CheckpointManager.for_run(_RunConfig(out=str(tmp_path / "a"))).save(1, model, optimizer)
    (tmp_path / "a").rename(tmp_path / "b")
    fresh, fresh_optimizer = _model_and_optimizer()
    assert CheckpointManager.for_run(_RunConfig(out=str(tmp_path / "b"))).resume(fresh, fresh_optimizer).step == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    with pytest.raises(ValueError, match="another configuration"):
        CheckpointManager.for_run(_RunConfig(lr=0.2, out=str(tmp_path / "b"))).resume(fresh, fresh_optimizer)


def test_checkpoints_fingerprinted_with_their_folder_still_resume_there(tmp_path):
    """What versions before ``for_run`` wrote: the fingerprint of the whole config, ``out`` included."""
    model, optimizer = _model_and_optimizer()
    config = _RunConfig(out=str(tmp_path))
    CheckpointManager(tmp_path / "checkpoints", fingerprint_config(config)).save(4, model, optimizer)
    assert CheckpointManager.for_run(config).resume(model, optimizer).step == 4


def test_a_changed_setting_is_named_and_logging_or_eval_settings_may_change(tmp_path):
    import json
    from dataclasses import asdict

    from mim_rec.config import ConfigError

    model, optimizer = _model_and_optimizer()
    config = _LoggedRunConfig(out=str(tmp_path))
    CheckpointManager.for_run(config).save(1, model, optimizer)
    (tmp_path / "config.json").write_text(json.dumps(asdict(config)))
    relogged = _LoggedRunConfig(out=str(tmp_path), log_every=1, checkpoint_every=2, eval={"ks": [1]})
    assert CheckpointManager.for_run(relogged).resume(model, optimizer).step == 1
    with pytest.raises(ConfigError, match=r"written under another configuration \(differs in: steps\)"):
        CheckpointManager.for_run(_LoggedRunConfig(out=str(tmp_path), steps=9)).resume(model, optimizer)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    model, optimizer = _model_and_optimizer()
    manager = CheckpointManager(tmp_path, "abc")
    manager.save(3, model, optimizer)
    manager.save(6, model, optimizer)
    newest = tmp_path / "step-000000006.pt"
    newest.write_bytes(newest.read_bytes()[:500])
    assert manager.resume(model, optimizer).step == 3
    assert "step-000000006.pt does not load" in capsys.readouterr().err


def test_nothing_to_resume(tmp_path):
    model, optimizer = _model_and_optimizer()
    assert CheckpointManager(tmp_path / "none", "abc").resume(model, optimizer) is None


def _partly_frozen_model():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # stands for a frozen backbone
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=0.1)


def test_frozen_weights_are_left_out_and_checked_on_resume(tmp_path):
    torch.manual_seed(0)
    model, optimizer = _partly_frozen_model()
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = CheckpointManager(tmp_path, "abc").save(1, model, optimizer)
    assert set(torch.load(path, weights_only=False)["model"]) == {"1.weight", "1.bias"}

    torch.manual_seed(0)  # the same construction gives the same frozen weights
    fresh, fresh_optimizer = _partly_frozen_model()
    CheckpointManager(tmp_path, "abc").resume(fresh, fresh_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                fresh.state_dict().values()))

    other, other_optimizer = _partly_frozen_model()  # other frozen weights
    with pytest.raises(ValueError, match="other frozen weights"):
        CheckpointManager(tmp_path, "abc").resume(other, other_optimizer)


def test_a_checkpoint_with_the_whole_state_still_resumes(tmp_path):
    """Checkpoints written before frozen weights were left out hold every parameter."""
    model, optimizer = _partly_frozen_model()
    path = CheckpointManager(tmp_path, "abc").save(1, model, optimizer)
    state = torch.load(path, weights_only=False)
    del state["frozen"]
    state["model"] = model.state_dict()
    torch.save(state, path)
    fresh, fresh_optimizer = _partly_frozen_model()
    assert CheckpointManager(tmp_path, "abc").resume(fresh, fresh_optimizer).step == 1
    assert torch.equal(fresh[0].weight, model[0].weight)


def test_another_number_of_ranks_is_a_config_error_that_names_the_count(tmp_path):
    """It was a bare ValueError, a traceback under torchrun, naming the wrong file."""
    from mim_rec.config import ConfigError

    model, optimizer = _model_and_optimizer()
    path = CheckpointManager(tmp_path, "abc").save(1, model, optimizer)
    state = torch.load(path, weights_only=False)
    state["rng"] = state["rng"] * 2  # as two ranks write it
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"step-000000001.pt was written by 2 ranks and this run has 1: "
                                          r"resume it on 2"):
        CheckpointManager(tmp_path, "abc").resume(model, optimizer)


def test_a_checkpoint_of_other_data_is_refused_and_one_without_a_record_resumes(tmp_path):
    from mim_rec.config import ConfigError

    model, optimizer = _model_and_optimizer()
    CheckpointManager(tmp_path, "abc", inputs={"items": "1111", "pairs": "2222"}).save(1, model, optimizer)
    assert CheckpointManager(tmp_path, "abc", inputs={"items": "1111", "pairs": "2222"}).resume(model, optimizer)
    with pytest.raises(ConfigError, match="trained on other data: pairs changed"):
        CheckpointManager(tmp_path, "abc", inputs={"items": "1111", "pairs": "3333"}).resume(model, optimizer)
    CheckpointManager(tmp_path / "old", "abc").save(1, model, optimizer)  # records no inputs
    assert CheckpointManager(tmp_path / "old", "abc", inputs={"items": "1111"}).resume(model, optimizer)


def test_a_rank_keeps_and_restores_only_its_own_gpus_rng(monkeypatch):
    """Every visible GPU's state was saved and restored by index: a checkpoint written where 8
    GPUs were visible failed to resume where fewer are."""
    import torch

    from train.common import capture_rng, restore_rng

    own, restored = torch.tensor([7], dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": own)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [own] * 8)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(int(state[0])))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend([-1] * len(states)))
    state = capture_rng()
    assert state["cuda"] is own
    restore_rng(state)
    older = {**state, "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}  # the old format
    restore_rng(older)
    restore_rng({**older, "cuda": older["cuda"][:1]})  # fewer GPUs than this rank's index: left alone
    assert restored == [7, 2]
