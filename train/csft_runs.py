"""Many C-SFT runs on one world, each trained once: what ``mim csft-ablations`` and
``mim csft-tune`` share.

Every run is its own folder holding ``result.json``: its metrics next to the fingerprint of
the configuration that produced them. A re-run with the same configuration reads the result
instead of training again (and an interrupted run resumes from its checkpoints); a changed
configuration trains anew.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict

from mim_rec.csft.data import HeldOut, WorldInputs


def cached_result(folder: Path, fingerprint: str, compute: Callable[[], Dict]) -> Dict:
    """``folder/result.json``'s metrics if its fingerprint is ``fingerprint``, else ``compute()``
    (timed) written there."""
    path = folder / "result.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fingerprint:
            return saved["metrics"]
    started = time.time()
    metrics = compute()
    metrics["seconds"] = round(time.time() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": fingerprint, "metrics": metrics}, indent=2))
    return metrics


def stage1_result(config, world: WorldInputs, held_out: HeldOut, folder: Path) -> Dict:
    """The stage-1 embeddings (the "w/o C-SFT" row) on ``held_out``, cached in ``folder``."""
    from mim_rec.csft.evaluate import evaluate_embeddings, stage1_embeddings
    from mim_rec.data.manifest import fingerprint_config
    from mim_rec.encoders import load_encoders

    fingerprint = fingerprint_config({"encoders": config.encoders, "eval": config.eval,
                                      "world": config.data.world, "held_out": held_out.name,
                                      "validation": config.data.validation})
    return cached_result(folder, fingerprint, lambda: evaluate_embeddings(
        stage1_embeddings(load_encoders(config.encoders), world, held_out), world,
        config.eval.ks, held_out))


def csft_result(config, world: WorldInputs, held_out: HeldOut) -> Dict:
    """Train (or resume) the C-SFT run ``config`` in ``config.out`` and evaluate it on
    ``held_out``, cached in ``config.out``."""
    from mim_rec.csft.evaluate import csft_embeddings, evaluate_embeddings
    from mim_rec.csft.model import load_csft_model
    from mim_rec.data.manifest import fingerprint_config
    from train.csft import run_csft

    def train_and_evaluate() -> Dict:
        model = load_csft_model(run_csft(config))
        return evaluate_embeddings(csft_embeddings(model, world, held_out), world,
                                   config.eval.ks, held_out)

    return cached_result(Path(config.out), fingerprint_config(config), train_and_evaluate)
