"""Many C-SFT runs on one world, each trained once: what ``mim csft-ablations`` and
``mim csft-tune`` share.

Every run is its own folder holding ``result.json``: its metrics next to the fingerprint of
the configuration that produced them and of the data it read (the encoders, the world's items
and pairs, and the impressions its AUCs score, by content). A re-run with the same
configuration on the same data reads the result instead of training again (and an
interrupted run resumes from its checkpoints); a changed configuration trains anew, and a
world regenerated under the same path is refused by the run's checkpoints rather than
answered from a stale result.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from mim_rec.csft.data import HeldOut, WorldInputs
from mim_rec.csft.evaluate import EVALUATION_RULES


def saved_result(folder: Path, fingerprint: str) -> Optional[Dict]:
    """``folder/result.json``'s metrics if its fingerprint is ``fingerprint``, else None."""
    from mim_rec.utils.run import read_json_or_none

    saved = read_json_or_none(folder / "result.json")
    return saved["metrics"] if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint else None


def cached_result(folder: Path, fingerprint: str, compute: Callable[[], Dict]) -> Dict:
    """:func:`saved_result`, else ``compute()`` (timed), written there by rank 0 (atomically:
    a torn file reads as no result)."""
    from mim_rec.utils.dist import current_rank
    from mim_rec.utils.run import atomic_write_bytes

    metrics = saved_result(folder, fingerprint)
    if metrics is not None:
        return metrics
    started = time.time()
    metrics = compute()
    metrics["seconds"] = round(time.time() - started, 1)
    if current_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "result.json",
                           json.dumps({"fingerprint": fingerprint, "metrics": metrics}, indent=2).encode())
    return metrics


def _fingerprint(config, settings: Dict[str, Any], held_out: HeldOut) -> str:
    """``settings`` (with path settings made absolute) and the content of what the runs read:
    the world's items and pairs, and the impressions ``held_out`` scores (``events_test``, or
    ``events_train`` on a validation split), which the AUCs of every result come from; and the
    evaluation's rules, so results scored under older ones are computed again."""
    from mim_rec.data.manifest import fingerprint_config, fingerprint_file, fingerprint_tree
    from train.common import STAGE_PATH_SETTINGS, absolute_paths

    world = Path(config.data.world)
    read = [world / name for name in ("items.parquet", "pairs_train.parquet", "pairs_test.parquet")]
    data = {path.name: _content(path, fingerprint_file) for path in [*read, held_out.events_path]
            if path.is_file()}
    return fingerprint_config({"settings": absolute_paths(json.loads(json.dumps(settings, default=str)),
                                                          STAGE_PATH_SETTINGS),
                               "encoders": fingerprint_tree(config.encoders), "data": data,
                               "evaluation": EVALUATION_RULES})


_CONTENT: Dict[Tuple[str, int, int], str] = {}


def _content(path: Path, fingerprint: Callable[[Path], str]) -> str:
    """``fingerprint(path)`` of a file, hashed once per process while its size and time stay the
    same (an ablation table keys a dozen runs by the same world files)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _CONTENT:
        _CONTENT[key] = fingerprint(path)
    return _CONTENT[key]


def stage1_result(config, world: WorldInputs, held_out: HeldOut, folder: Path) -> Dict:
    """The stage-1 embeddings (the "w/o C-SFT" row) on ``held_out``, cached in ``folder``."""
    from mim_rec.csft.evaluate import evaluate_embeddings, stage1_embeddings
    from mim_rec.encoders import load_encoders

    fingerprint = _fingerprint(config, {"eval": asdict(config.eval), "held_out": held_out.name,
                                        "validation": config.data.validation}, held_out)
    return cached_result(folder, fingerprint, lambda: evaluate_embeddings(
        stage1_embeddings(load_encoders(config.encoders), world, held_out), world,
        config.eval.ks, held_out, source=config.encoders))


def csft_result(config, world: WorldInputs, held_out: HeldOut) -> Dict:
    """Train (or resume) the C-SFT run ``config`` in ``config.out`` and evaluate it on
    ``held_out``, cached in ``config.out``. The run trains on ``world`` where it is the one it
    would open (:func:`~train.csft.opens_as`)."""
    from mim_rec.csft.evaluate import csft_embeddings, evaluate_embeddings
    from mim_rec.csft.model import load_csft_model
    from train.csft import opens_as, run_csft

    def train_and_evaluate() -> Dict:
        folder = run_csft(config, world if opens_as(config, world) else None)
        return evaluate_embeddings(csft_embeddings(load_csft_model(folder), world, held_out), world,
                                   config.eval.ks, held_out, source=str(folder))

    return cached_result(Path(config.out), csft_fingerprint(config, held_out), train_and_evaluate)


def csft_fingerprint(config, held_out: HeldOut) -> str:
    """What :func:`csft_result` keys the run ``config``'s result on ``held_out`` by."""
    return _fingerprint(config, asdict(config), held_out)


def recall_columns(metrics: Dict) -> List[str]:
    """The ``recall@k`` names of one evaluation's metrics, by increasing ``k``: the cut-offs of
    its ``eval.ks``, which every row of one table shares (results are keyed by the config)."""
    return sorted((name for name in metrics if name.startswith("recall@")), key=lambda name: int(name[7:]))


def metric_columns(metrics: Dict) -> List[str]:
    """The columns a table of evaluations shows: :func:`recall_columns`, then the AUCs."""
    return [*recall_columns(metrics), "pair_auc", "gauc"]
