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
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torchmetrics.functional.classification import binary_auroc

COMPONENTS = ("content", "item_effect", "collaborative", "category", "position", "logit")


def age_buckets(world: Path) -> np.ndarray:
    """Decile (0 = S1, newest) of each test event's item age at impression."""
    events = pq.read_table(world / "events_test.parquet", columns=["target_item_id", "ts"])
    created = pq.read_table(world / "items.parquet", columns=["created_at"])["created_at"].cast("int64").to_numpy()
    age = events["ts"].cast("int64").to_numpy() - created[events["target_item_id"].to_numpy()]
    edges = np.quantile(age, np.linspace(0, 1, 11)[1:-1])
    return np.searchsorted(edges, age, side="right")


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

    features = torch.cat([cached("items-image"), cached("items-title")], dim=1)
    styles = torch.from_numpy(np.load(world / "truth" / "items.npz")["style"]).double()
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = torch.cat([(features - mean) / std, torch.ones(len(features), 1, dtype=features.dtype)], dim=1)
    fit = torch.arange(len(x)) % 5 != 0  # every fifth item held out of the fit
    gram = x[fit].T @ x[fit] + ridge * int(fit.sum()) * torch.eye(x.shape[1], dtype=x.dtype)
    readout = (x @ torch.linalg.solve(gram, x[fit].T @ styles[fit])).float()
    held = ~fit
    r2 = 1 - ((readout[held] - styles[held].float()) ** 2).sum() / ((styles[held] - styles[held].mean(0)) ** 2).sum()
    print(f"readout R^2 on held-out items: {float(r2):.3f}")

    class Readout:
        fingerprint = f"readout:{feature_cache}"
        dim = readout.shape[1]

        def embed_items(self, items, source):
            return readout[torch.from_numpy(items.column("item_id").to_numpy())]

    print(f"MM table: {build_table(Readout(), world / 'items.parquet', out)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("world", type=Path, help="a world folder written by mim data synth (with truth/)")
    parser.add_argument("--readout-table", type=Path, default=None, help="write the ridge readout MM table here")
    parser.add_argument("--feature-cache", type=Path, default=None, help="mim csft's OUT/features")
    args = parser.parse_args()
    component_table(args.world)
    if args.readout_table:
        if args.feature_cache is None:
            parser.error("--readout-table needs --feature-cache")
        readout_table(args.world, args.feature_cache, args.readout_table)


if __name__ == "__main__":
    main()
