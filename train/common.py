"""Trainer helpers shared by the stages: periodic atomic checkpoints and exact resume.

A training checkpoint holds everything a run needs to continue as if never stopped: model
and optimizer state, the global step (which is also the data position: every trainer here
draws batch ``s`` as a pure function of ``(seed, s)``), each rank's RNG states, and a
fingerprint of the configuration so a checkpoint is never resumed under other settings.

Frozen parameters (``requires_grad=False``) are not written: they are what the model was
built from (the stage-1 encoders under a C-SFT run, some 110 MB that every checkpoint would
otherwise repeat). A digest of them is written instead, and resume refuses a model whose
frozen weights differ from those the checkpoint was trained against.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from mim_rec.config import ConfigError, load_config
from mim_rec.utils.dist import current_rank
from mim_rec.data.errors import DataError
from mim_rec.utils.run import (DAMAGED_FILE_ERRORS, atomic_write_bytes, read_json_or_none, some_names,
                               visible_entries)
from mim_rec.utils.text import counted

_NAME = re.compile(r"^step-(\d{9})\.pt$")
STEP_FILE_GLOB = "step-*.pt"  # the same files as a glob, for another stage's folder check


def capture_rng() -> Dict[str, Any]:
    """This process's RNG states; of the GPUs, only its own (the current device): a state of
    every visible GPU could not be restored where fewer are visible."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):  # written before 2026-12-06: one state per visible GPU
        device = torch.cuda.current_device()
        if device >= len(cuda):
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(cuda)


def _all_ranks_rng() -> List[Dict[str, Any]]:
    """Every rank's RNG state, in rank order (each rank draws its own augmentations)."""
    mine = capture_rng()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: List[Optional[Dict[str, Any]]] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states  # type: ignore[return-value]


def _frozen_parameters(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if not p.requires_grad}


def frozen_digest(model: nn.Module) -> str:
    """A digest of the frozen parameters' names, shapes and values."""
    digest = hashlib.blake2b(digest_size=16)
    for name, param in sorted(_frozen_parameters(model).items()):
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(param.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _trained_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict without the frozen parameters."""
    frozen = set(_frozen_parameters(model))
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


# Settings a resumed run may change: they do not change what its steps compute.
NOT_FINGERPRINTED = ("out", "log_every", "checkpoint_every", "eval")
# Settings of pretrain and C-SFT that name files or folders: the same folder given relatively
# or absolutely is the same setting.
STAGE_PATH_SETTINGS = ("data.world", "encoders", "data.feature_cache")


def _newest_readable(checkpoints: List[Path]) -> Tuple[Path, Dict[str, Any]]:
    """The newest checkpoint that loads, and its state. A damaged newest one (a disk that filled,
    a file cut by hand) falls back to the one kept before it, with a warning."""
    for path in reversed(checkpoints):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=False)
        except DAMAGED_FILE_ERRORS as err:
            print(f"warning: {path} does not load ({err}); trying the checkpoint before it", file=sys.stderr)
    raise DataError(str(checkpoints[-1].parent), f"none of the {len(checkpoints)} checkpoints loads")


def config_dict(config: Any) -> Dict[str, Any]:
    """``config`` as its ``config.json`` reads back."""
    return json.loads(json.dumps(asdict(config), default=str))


def _dotted(settings: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``settings`` (a config as a dict) flattened to the dotted keys overrides use
    (``model.ubm``, ``model.constraints.item.sharding_types``); an empty section sets nothing."""
    flat: Dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_settings(config: Any, ignored: Iterable[str], paths: Iterable[str] = ()) -> Optional[List[str]]:
    """Settings, by dotted key (``model.mm_whiten``), in which ``config`` differs from the run
    whose ``config.json`` is in ``config.out``; None when no run wrote one there. A key inside a
    section named in ``ignored`` (``data`` covers ``data.world``) is not compared. Naming the
    section alone ("differs in: model") left the user to diff two config.json files. The
    dotted ``paths`` name files or folders, compared as absolute paths (``runs/world`` is
    ``$PWD/runs/world``)."""
    saved = Path(config.out) / "config.json"
    if not saved.is_file():
        return None
    try:  # a setting added after the run was written reads as its default (the old behaviour)
        before = config_dict(load_config(type(config), saved))
    except ConfigError:  # written with settings this version no longer has, or torn
        before = read_json_or_none(saved)
        if not isinstance(before, dict):
            raise ConfigError(f"{saved}: not a whole JSON object (a write cut short?), so the run's settings are "
                              "unknown; use a new out=") from None
    now = config_dict(config)
    for settings in (before, now):
        absolute_paths(settings, paths)
    before, now, ignored = _dotted(before), _dotted(now), tuple(ignored)
    return sorted(k for k in before.keys() | now.keys()
                  if not any(k == i or k.startswith(f"{i}.") for i in ignored) and before.get(k) != now.get(k))


def require_own_run_folder(out: str, command: str, run_files: Iterable[str], foreign_checkpoints: str,
                           remedy: str = "use an empty or new out=") -> None:
    """Refuse to train into ``out`` when it holds anything but a ``command`` run: training
    rewrites config.json and trims metrics.jsonl, and each stage looks only for its own kind of
    checkpoint, so another stage's run (or a world) was overwritten and left unusable. (An
    evaluation of ``out`` refuses it too, with its own ``remedy``: it read another stage's
    config.json as the run's settings.)

    Foreign are: files outside ``run_files`` (dot files are the machinery's own), checkpoints
    matching ``foreign_checkpoints`` (a glob in ``checkpoints/``: the other checkpoint format),
    and a config.json whose keys another stage's config fits better than this one's (so a run
    of an older version, with a setting since removed, is still this stage's)."""
    from dataclasses import fields

    from mim_rec.csft import CsftConfig
    from mim_rec.pretrain.config import PretrainConfig
    from train.ciubm import TrainConfig

    out = Path(out)
    if not out.is_dir():
        return
    refuse_foreign_entries(out, command, run_files, remedy,
                           sorted(f"checkpoints/{p.name}" for p in (out / "checkpoints").glob(foreign_checkpoints)))
    saved = read_json_or_none(out / "config.json") if (out / "config.json").is_file() else {}
    if not isinstance(saved, dict):
        raise ConfigError(f"{out / 'config.json'}: not a whole JSON object (a write cut short?), so the run's "
                          f"settings are unknown; {remedy}")
    stages = {"mim pretrain": PretrainConfig, "mim csft": CsftConfig, "mim train": TrainConfig}
    unknown = {name: set(saved) - {f.name for f in fields(kind)} for name, kind in stages.items()}
    fits = min(unknown, key=lambda name: len(unknown[name]))
    if len(unknown[fits]) < len(unknown[command]):
        raise ConfigError(f"out={out}: its config.json is a `{fits}` run's, not a `{command}` run's (settings "
                          f"{some_names(sorted(unknown[command]), 4)}); {remedy}")


def refuse_foreign_entries(out: Path, command: str, own: Iterable[str], remedy: str = "use an empty or new out=",
                           also_foreign: Iterable[str] = ()) -> None:
    """Refuse an ``out`` holding entries other than the ``own`` ones a ``command`` run writes
    there (dot files are the machinery's own), or any of ``also_foreign``: a run written among
    another run's files left that run's own stage refusing its folder."""
    own = set(own)
    foreign = [*(p.name for p in visible_entries(out) if p.name not in own), *also_foreign] if out.is_dir() else []
    if foreign:
        raise ConfigError(f"out={out}: holds {some_names(foreign)}, "
                          f"which is not a `{command}` run's; {remedy}")


def absolute_paths(settings: Dict[str, Any], paths: Iterable[str]) -> Dict[str, Any]:
    """``settings`` (a config as a dict) with the dotted ``paths`` made absolute, in place."""
    for key in paths:
        *parents, name = key.split(".")
        holder = settings
        for part in parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and isinstance(holder.get(name), str) and holder[name]:
            holder[name] = os.path.abspath(holder[name])
    return settings


def note_trivial_recall(candidates: int, ks: Iterable[int], what: str) -> None:
    """Say on stderr which recall@k are 1 by construction, lest they read as a result: a target
    ranks behind at most ``candidates - 1`` others, so it is in the top k whenever
    ``k >= candidates`` (``what`` names the candidates and where their number comes from)."""
    trivial = [f"recall@{k}" for k in ks if k >= candidates]
    if trivial:
        print(f"note: only {what}: {', '.join(trivial)} {'is' if len(trivial) == 1 else 'are'} 1 by "
              "construction; use a larger world", file=sys.stderr)


def write_eval_report(out: Path, rows: Dict[str, Dict[str, float]], files: Iterable[Path],
                      **settings: Any) -> None:
    """Write ``OUT/eval.json``: the evaluation's rows and what they were measured on (each file
    read, by path and content fingerprint, and the settings that chose the split), so numbers
    of another world or split are never mistaken for the run's own. Replacing a report of other
    inputs is said on stderr."""
    from mim_rec.data.manifest import fingerprint_file

    path = Path(out) / "eval.json"
    inputs = {"files": {str(Path(f).resolve()): fingerprint_file(f) for f in files}, **settings}
    try:
        before = json.loads(path.read_text()).get("inputs") if path.is_file() else inputs
    except (json.JSONDecodeError, AttributeError):
        before = None
    if before != inputs:
        print(f"note: {path} held an evaluation of other inputs ({before}); it is replaced", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"inputs": inputs, **rows}, indent=2).encode())


@dataclass
class Resumed:
    step: int
    extra: Dict[str, Any]


class CheckpointManager:
    """``DIR/step-000000040.pt`` files written atomically by rank 0; the newest ``keep``
    are kept. Every rank must call :meth:`save` (RNG states are gathered).

    ``inputs``: content fingerprints of the data the run trains on, kept in every checkpoint;
    resuming one whose data changed since under the same paths is refused (steps 1..k on one
    world and k+1..n on another would otherwise finish as one run, and its artifact would name
    the second world's files)."""

    def __init__(self, directory: Path, config_fingerprint: str, keep: int = 2,
                 also_accepted: Tuple[str, ...] = (), config: Any = None,
                 inputs: Optional[Dict[str, str]] = None) -> None:
        self.directory = Path(directory)
        self.config_fingerprint = config_fingerprint
        self.also_accepted = also_accepted  # fingerprints an older version wrote for this config
        self.config = config  # the run's config, to name what changed when a checkpoint is refused
        self.inputs = inputs or {}
        self.keep = keep

    @classmethod
    def for_run(cls, config: Any, inputs: Optional[Dict[str, str]] = None) -> "CheckpointManager":
        """The checkpoints of the run ``config`` describes, in ``config.out/checkpoints``.

        Their fingerprint leaves out the settings that do not change what training computes
        (:data:`NOT_FINGERPRINTED`: where the folder lies, how often it logs, saves and how it is
        evaluated), so a moved folder resumes and a run can be re-logged or re-evaluated, and
        it reads path settings as absolute paths (:data:`STAGE_PATH_SETTINGS`). Checkpoints
        written under the older fingerprints resume in their own folder."""
        from mim_rec.data.manifest import fingerprint_config
        computing = replace(config, **{k: None for k in NOT_FINGERPRINTED if hasattr(config, k)})
        return cls(Path(config.out) / "checkpoints",
                   fingerprint_config(absolute_paths(config_dict(computing), STAGE_PATH_SETTINGS)),
                   also_accepted=(fingerprint_config(computing), fingerprint_config(config)),
                   config=config, inputs=inputs)

    def checkpoints(self) -> List[Path]:
        if not self.directory.exists():
            return []
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             extra: Optional[Dict[str, Any]] = None) -> Optional[Path]:
        rng = _all_ranks_rng()
        if current_rank() != 0:
            return None
        buffer = io.BytesIO()
        torch.save({"step": step, "model": _trained_state(model), "frozen": frozen_digest(model),
                    "optimizer": optimizer.state_dict(), "rng": rng,
                    "config_fingerprint": self.config_fingerprint, "inputs": self.inputs,
                    "extra": extra or {}}, buffer)
        path = self.directory / f"step-{step:09d}.pt"
        atomic_write_bytes(path, buffer.getvalue())
        for old in self.checkpoints()[:-self.keep]:
            old.unlink()
        return path

    def finish(self) -> None:
        """Keep only the newest checkpoint once training is done: the run resumes from it (a
        re-run with the same configuration trains no further step), and the older one, kept
        until now against a crash while writing, is no longer needed. Rank 0 only."""
        if current_rank() != 0:
            return
        for old in self.checkpoints()[:-1]:
            old.unlink()

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Optional[Resumed]:
        """Load the newest checkpoint into ``model``/``optimizer`` and this rank's RNG."""
        found = self.checkpoints()
        if not found:
            return None
        path, state = _newest_readable(found)
        if state["config_fingerprint"] not in (self.config_fingerprint, *self.also_accepted):
            changed = changed_settings(self.config, NOT_FINGERPRINTED, STAGE_PATH_SETTINGS) \
                if self.config is not None else None
            detail = f"differs in: {', '.join(changed)}" if changed else \
                f"fingerprint {state['config_fingerprint']} != {self.config_fingerprint}"
            raise ConfigError(f"{path} was written under another configuration ({detail}); "
                              f"use a fresh output folder")
        trained_on = state.get("inputs") or {}  # none recorded: written before inputs were
        changed_inputs = sorted(name for name in trained_on if self.inputs.get(name) != trained_on[name])
        if changed_inputs:
            raise ConfigError(f"{path} was trained on other data: {', '.join(changed_inputs)} changed "
                              f"since under the same path; use a fresh output folder")
        distributed = dist.is_available() and dist.is_initialized()
        rank = current_rank()
        written_by, ranks = len(state["rng"]), (dist.get_world_size() if distributed else 1)
        if written_by != ranks:
            raise ConfigError(f"{path} was written by {counted(written_by, 'rank')} and this run has {ranks}: "
                              f"resume it on {written_by} (torchrun --nproc-per-node {written_by})")
        if "frozen" not in state:  # written before frozen weights were left out: the whole state
            model.load_state_dict(state["model"])
        elif state["frozen"] != frozen_digest(model):
            raise ConfigError(f"{path} was trained against other frozen weights than this "
                              f"model's (did the encoders it was built from change?); use a fresh "
                              f"output folder")
        else:
            missing, unexpected = model.load_state_dict(state["model"], strict=False)
            if set(missing) != set(_frozen_parameters(model)) or unexpected:
                raise ConfigError(f"{path} does not fit this model (missing "
                                  f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"][rank])
        return Resumed(step=state["step"], extra=state["extra"])
