"""What the synthetic world's ground truth says about content and item age (a diagnostic).

    .venv/bin/python scripts/truth_diagnostics.py WORLD
    .venv/bin/python scripts/truth_diagnostics.py WORLD --readout-table OUT --feature-cache RUN/csft/features

1. Per item-age decile of the test events (S1 newest, edges as ``mim train`` cuts them), the AUC
   of each click-logit component ``mim data synth`` wrote to ``truth/events_test.parquet``, and
   the median number of training impressions of the bucket's target items: where the ID effect
   is unknown (few impressions) and how much content signal there is to win.
2. ``--readout-table``: an MM table of the ridge regression from the frozen backbones' cached
   features (``mim csft``'s ``OUT/features``: image and title) onto the true styles -- how much
   content those features hold for a head that knew what to look for. It is trained on the
   truth, so it is a measuring stick, never a model to ship.
3. ``--geometry TABLE ...``: how well each MM table's cosines (raw, and in the view CiUBM's
   default ``model.mm_whiten=16`` gives it) rank item pairs the way the true styles' cosines
   do, over all pairs and within a category (content interest compares a target with
   behaviours mostly of its own category), and the held-out R^2 of a ridge readout of each
   true style coordinate, net of its category mean, from the table. The cosine ranks are what
   content interest uses; the R^2 says whether the information is there at all.
4. ``--id-embeddings CHECKPOINT ...``: the same R^2 for the item ID table of a ``mim train``
   checkpoint (a DCP folder, e.g. ``RUN/checkpoints/step-000000211``), plus the true item
   effect: what the ID embeddings learned from the events and sequences.
5. ``--learned-views CHECKPOINT ...``: the cosine ranks of a trained model's own view of its
   run's MM table (the checkpoint's whitening and, with ``model.content_metric=true``, its
   learned metric): what the content weights of that model actually compare.
6. ``--towers ENCODERS ... --feature-cache RUN/csft/features``: the same table for every step
   of an item tower (backbone features, each projection head, the item embedding), so a
   style that is lost can be traced to the step that loses it.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch
from torchmetrics.functional.classification import binary_auroc

from mim_rec.data.loader import created_seconds, item_age_days
from mim_rec.metrics.functional import age_bucket_edges

COMPONENTS = ("content", "item_effect", "collaborative", "category", "position", "logit")
STYLE_NAMES = ("hue x", "hue y", "brightness", "size", "stripe freq", "stripe angle", "stripe hue", "backdrop")
# The item ID table's state-dict key under each model.sequence_layout (an EBC's or an EC's)
ITEM_TABLE_KEYS = ("sparse_arch.sequence.embedding_bags.item.weight",
                   "sparse_arch.sequence_items.embeddings.item.weight")


def age_buckets(world: Path) -> np.ndarray:
    """Decile (0 = S1, newest) of each test event's item age at impression, cut as ``mim train``
    cuts them (its age reading and its edges: a timestamp cast straight to int64 keeps its
    unit, milliseconds here, and aged items by creation date instead)."""
    events = pq.read_table(world / "events_test.parquet", columns=["target_item_id", "ts"])
    items = world / "items.parquet"
    created = created_seconds(pq.read_table(items, columns=["created_at"])["created_at"], items)
    age = item_age_days(events["ts"].cast("int64").to_numpy(), created[events["target_item_id"].to_numpy()])
    edges = age_bucket_edges(torch.from_numpy(age))
    return np.searchsorted(edges, age, side="left")


def component_table(world: Path) -> None:
    truth = pq.read_table(world / "truth" / "events_test.parquet")
    test = pq.read_table(world / "events_test.parquet", columns=["target_item_id", "label"])
    train_targets = pq.read_table(world / "events_train.parquet", columns=["target_item_id"])
    impressions = np.bincount(train_targets["target_item_id"].to_numpy(),
                              minlength=int(test["target_item_id"].to_numpy().max()) + 1)
    labels, targets, buckets = test["label"].to_numpy().astype(np.int64), test["target_item_id"].to_numpy(), \
        age_buckets(world)
    print("| bucket | train impressions (median) | " + " | ".join(COMPONENTS) + " |")
    print("|---" * (len(COMPONENTS) + 2) + "|")
    for bucket in range(10):
        rows = buckets == bucket
        aucs = [float(binary_auroc(torch.from_numpy(truth[c].to_numpy()[rows]), torch.from_numpy(labels[rows])))
                for c in COMPONENTS]
        median = np.median(impressions[targets[rows]]) if rows.any() else float("nan")
        print(f"| S{bucket + 1} | {median:.0f} | " + " | ".join(f"{a:.3f}" for a in aucs) + " |")


def readout_table(world: Path, feature_cache: Path, out: Path, ridge: float = 1e-2) -> None:
    from embeddings.build import build_table

    def cached(name: str) -> torch.Tensor:
        found = sorted(glob.glob(str(feature_cache / f"{name}-*.pt")))
        if len(found) != 1:
            raise SystemExit(f"{feature_cache}: expected one {name}-*.pt, found {len(found)}")
        return torch.load(found[0]).double()

    features = torch.cat([cached("items-image"), cached("items-title")], dim=1).numpy()
    styles = np.load(world / "truth" / "items.npz")["style"].astype(np.float64)
    predictions, held = ridge_readout(features, styles, ridge)
    readout = torch.from_numpy(predictions).float()
    r2 = 1 - ((predictions[held] - styles[held]) ** 2).sum() / ((styles[held] - styles[held].mean(0)) ** 2).sum()
    print(f"readout R^2 on held-out items: {float(r2):.3f}")

    class Readout:
        fingerprint = f"readout:{feature_cache}"
        dim = readout.shape[1]

        def embed_items(self, items, source):
            return readout[torch.from_numpy(items.column("item_id").to_numpy())]

    print(f"MM table: {build_table(Readout(), world / 'items.parquet', out)}")


def within_category(values: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """``values`` minus the mean of its category's rows."""
    out = values.astype(np.float64).copy()
    for category in np.unique(categories):
        rows = categories == category
        out[rows] -= out[rows].mean(0)
    return out


def ridge_readout(features: np.ndarray, targets: np.ndarray, ridge: float = 1e-2) -> Tuple[np.ndarray, np.ndarray]:
    """``(predictions of every row, held-out mask)`` of a ridge fit on standardised ``features``
    that leaves every fifth row out."""
    x = (features - features.mean(0)) / (features.std(0) + 1e-9)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    fit = np.arange(len(x)) % 5 != 0
    weights = np.linalg.solve(x[fit].T @ x[fit] + ridge * fit.sum() * np.eye(x.shape[1]), x[fit].T @ targets[fit])
    return x @ weights, ~fit


def heldout_r2(features: np.ndarray, targets: np.ndarray, ridge: float = 1e-2) -> np.ndarray:
    """Per target column, R^2 of :func:`ridge_readout` on the rows it held out."""
    predictions, held = ridge_readout(features, targets, ridge)
    error = predictions[held] - targets[held]
    return 1 - (error ** 2).sum(0) / ((targets[held] - targets[held].mean(0)) ** 2).sum(0)


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho (no tie correction: the inputs are continuous)."""
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def pair_cosine(vectors: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    return (unit[first] * unit[second]).sum(1)


def style_pairs(truth: Any, pairs: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(first, second, same_category, true_cosine)`` of ``pairs`` random item pairs (seeded),
    from a world's ``truth/items.npz`` as loaded."""
    styles, categories = torch.from_numpy(truth["style"]), torch.from_numpy(truth["category"])
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(len(styles), (pairs,), generator=generator) for _ in range(2))
    return first, second, categories[first] == categories[second], pair_cosine(styles, first, second)


def pair_rank_correlations(view: torch.Tensor, pairs: Tuple[torch.Tensor, ...]) -> Tuple[float, float]:
    """Rank correlation of ``view``'s pair cosines with the truth's: over all pairs, and over
    the pairs within a category."""
    first, second, same, true_cos = pairs
    cos = pair_cosine(view, first, second)
    return rank_correlation(cos, true_cos), rank_correlation(cos[same], true_cos[same])


def rank_agreement(view: torch.Tensor, pairs: Tuple[torch.Tensor, ...]) -> str:
    """``"all | within a category"`` of :func:`pair_rank_correlations`."""
    every, within = pair_rank_correlations(view, pairs)
    return f"{every:.3f} | {within:.3f}"


def _read_table(table: Path, count: int) -> torch.Tensor:
    from embeddings.table import read_mm_table
    from mim_rec.data.manifest import read_manifest

    return read_mm_table(table, count, int(read_manifest(table).dim))


def _geometry_header(first: str) -> None:
    print(f"| {first} | view | cosine rank corr., all pairs | within a category | "
          "its style readout, within a category | " + " | ".join(STYLE_NAMES) + " |")
    print("|---" * (5 + len(STYLE_NAMES)) + "|")


def _geometry_rows(name: str, vectors: torch.Tensor, truth: Any, style_residual: np.ndarray,
                   sample: Tuple[torch.Tensor, ...], whiten: int) -> None:
    """One row per view of ``vectors`` (raw, and whitened when wider than ``whiten``): the
    view's cosine ranks; the cosine ranks of its ridge readout onto the true styles (what the
    view holds, however it weighs it); and the per-coordinate R^2 of the raw vectors."""
    from mim_rec.ciubm.whitening import whitening_statistics

    vectors = vectors.float()
    r2 = heldout_r2(within_category(vectors.numpy(), truth["category"]), style_residual)
    views = {"raw": vectors}
    if whiten < vectors.shape[1]:
        mean, projection = whitening_statistics(lambda a, b: vectors[a:b], len(vectors), whiten)
        views[f"whitened {whiten}"] = (vectors - mean) @ projection
    for view_name, view in views.items():
        readout, _ = ridge_readout(view.double().numpy(), truth["style"].astype(np.float64))
        _, readout_within = pair_rank_correlations(torch.from_numpy(readout), sample)
        print(f"| {name} | {view_name} | {rank_agreement(view, sample)} | {readout_within:.3f} | "
              + " | ".join(f"{v:.2f}" for v in r2) + " |")


def _truth_for_geometry(world: Path, pairs: int) -> Tuple[Any, Tuple[torch.Tensor, ...], np.ndarray]:
    """``(truth, pair sample, within-category styles)``: what every geometry row compares with."""
    truth = np.load(world / "truth" / "items.npz")
    return truth, style_pairs(truth, pairs), within_category(truth["style"], truth["category"])


def geometry(world: Path, tables: List[Path], pairs: int = 400_000, whiten: int = 16) -> None:
    truth, sample, style_residual = _truth_for_geometry(world, pairs)
    _geometry_header("table")
    for table in tables:
        _geometry_rows(str(table), _read_table(table, len(truth["style"])), truth, style_residual, sample, whiten)


@torch.no_grad()
def towers(world: Path, encoders: List[Path], feature_cache: Path, pairs: int = 400_000,
           whiten: int = 16) -> None:
    """The geometry and style readouts at every step of an item tower (``mim pretrain``'s
    ``encoders`` or ``mim csft``'s ``mm_encoder``): the backbones' cached features, alone and
    side by side, each projection head, and the item embedding the MM table stores. Where a
    style coordinate's R^2 drops is where the tower loses it; where it is near zero in the
    features, no head trained on them can recover it."""
    from embeddings.encoders import CsftItemEncoder, Stage1ItemEncoder, load_item_encoder

    truth, sample, style_residual = _truth_for_geometry(world, pairs)
    items_path = world / "items.parquet"
    items = pq.read_table(items_path)
    _geometry_header("tower step")
    for folder in encoders:
        encoder = load_item_encoder(folder, feature_cache=feature_cache)
        if not isinstance(encoder, (Stage1ItemEncoder, CsftItemEncoder)):
            raise SystemExit(f"{folder}: --towers reads mim pretrain encoders or mim csft mm_encoder folders")
        pair = encoder.tower.pair if isinstance(encoder, CsftItemEncoder) else encoder.pair
        images, titles = encoder.features.of(items, items_path, pair.vision, pair.text)
        image_head, title_head = pair.vision_head(images), pair.text_head(titles)
        item = encoder.embed_items(items, items_path)  # the representation center's own code path
        steps = {"image features": images, "title features": titles,
                 "image + title features": torch.cat([images, titles], dim=1),
                 "image head": image_head, "title head": title_head, "item embedding": item}
        for step, vectors in steps.items():
            _geometry_rows(f"{folder}: {step}", vectors, truth, style_residual, sample, whiten)


def _model_state(checkpoint: Path) -> dict:
    """The ``model`` state of a ``mim train`` DCP checkpoint, gathered into one process."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        dcp_to_torch_save(checkpoint, Path(scratch) / "state.pt")
        return torch.load(Path(scratch) / "state.pt", weights_only=False)["model"]


def id_embeddings(world: Path, checkpoints: List[Path]) -> None:
    truth = np.load(world / "truth" / "items.npz")
    style_residual = within_category(truth["style"], truth["category"])
    print("| checkpoint | item effect | " + " | ".join(STYLE_NAMES) + " |")
    print("|---" * (2 + len(STYLE_NAMES)) + "|")
    for checkpoint in checkpoints:
        state = _model_state(checkpoint)
        table = next(state[key] for key in ITEM_TABLE_KEYS if key in state).double().numpy()
        effect = heldout_r2(table, truth["effect"][:, None])[0]
        styles = heldout_r2(within_category(table, truth["category"]), style_residual)
        print(f"| {checkpoint} | {effect:.2f} | " + " | ".join(f"{v:.2f}" for v in styles) + " |")


def learned_views(world: Path, checkpoints: List[Path], pairs: int = 400_000) -> None:
    """The geometry of the content weights a trained CiUBM computes: its run's MM table through
    the checkpoint's whitening and, with ``model.content_metric``, its learned metric ``M``."""
    truth = np.load(world / "truth" / "items.npz")
    sample, count = style_pairs(truth, pairs), len(truth["style"])
    print("| checkpoint | view | cosine rank corr., all pairs | within a category |")
    print("|---|---|---|---|")
    for checkpoint in checkpoints:
        state = _model_state(checkpoint)
        run = json.loads((checkpoint.parent.parent / "config.json").read_text())
        view = _read_table(Path(run["mm_table"]), count)
        if "mm_whitening.mean" in state:
            view = (view - state["mm_whitening.mean"]) @ state["mm_whitening.projection"]
            print(f"| {checkpoint} | whitened | {rank_agreement(view, sample)} |")
        if "content_metric.map.weight" in state:
            print(f"| {checkpoint} | learned metric | {rank_agreement(view @ state['content_metric.map.weight'].T, sample)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("world", type=Path, help="a world folder written by mim data synth (with truth/)")
    parser.add_argument("--readout-table", type=Path, default=None, help="write the ridge readout MM table here")
    parser.add_argument("--feature-cache", type=Path, default=None, help="mim csft's OUT/features")
    parser.add_argument("--geometry", type=Path, nargs="+", default=[], metavar="TABLE",
                        help="MM tables whose cosine geometry to compare with the true styles")
    parser.add_argument("--id-embeddings", type=Path, nargs="+", default=[], metavar="CHECKPOINT",
                        help="mim train DCP checkpoints whose item ID table to read out")
    parser.add_argument("--towers", type=Path, nargs="+", default=[], metavar="ENCODERS",
                        help="mim pretrain encoders / mim csft mm_encoder folders whose every step "
                             "to compare with the true styles (needs --feature-cache)")
    parser.add_argument("--learned-views", type=Path, nargs="+", default=[], metavar="CHECKPOINT",
                        help="mim train DCP checkpoints whose view of the MM table (whitening, "
                             "learned content metric) to compare with the true styles")
    args = parser.parse_args()
    component_table(args.world)
    if args.geometry:
        geometry(args.world, args.geometry)
    if args.id_embeddings:
        id_embeddings(args.world, args.id_embeddings)
    if args.learned_views:
        learned_views(args.world, args.learned_views)
    if args.towers:
        if args.feature_cache is None:
            parser.error("--towers needs --feature-cache")
        towers(args.world, args.towers, args.feature_cache)
    if args.readout_table:
        if args.feature_cache is None:
            parser.error("--readout-table needs --feature-cache")
        readout_table(args.world, args.feature_cache, args.readout_table)


if __name__ == "__main__":
    main()
