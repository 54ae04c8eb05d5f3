"""The embedded default world: a seeded generator of a small e-commerce world (see
:mod:`mim_rec.data.synth.world` for the generative model, ``docs/synth.md`` for the story).

``generate_world(config, out_dir)`` writes a world folder (layout in ``docs/interfaces.md``)
with the ground-truth latent factors in ``truth/``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from mim_rec.config import ConfigError
from mim_rec.data.io import write_table
from mim_rec.data.manifest import Manifest, write_manifest
from mim_rec.data.schemas import EVENTS, ITEMS, PAIRS
from mim_rec.data.staging import staged_folder
from mim_rec.data.synth import render, text, world
from mim_rec.data.synth.config import ClickModel, SynthConfig, tiny

__all__ = ["ClickModel", "SynthConfig", "generate_world", "tiny"]

# Items rendered per numpy call: 2048 up to 128-pixel images, fewer above, so a chunk's
# float arrays stay near 800 MB whatever image_size is (the chunk sets the draw order, so the
# images of sizes up to 128 are the ones earlier releases drew).
RENDER_CHUNK, RENDER_CHUNK_PIXELS = 2048, 2048 * 128 * 128


def _images(styles: np.ndarray, categories: np.ndarray, rng: np.random.Generator, size: int,
            jitter: float, desc: str) -> list:
    out: list = []
    chunk = max(1, min(RENDER_CHUNK, RENDER_CHUNK_PIXELS // (size * size)))
    for start in tqdm(range(0, len(styles), chunk), desc=desc, unit="chunk", leave=False):
        stop = start + chunk
        out += render.encode_png(render.render(styles[start:stop], categories[start:stop], rng, size, jitter))
    return out


def _items_table(config: SynthConfig, lat: world.Latents, rng: np.random.Generator) -> pa.Table:
    brands = text.brand_names(config.brands, rng)
    titles = text.titles(lat.item_style, lat.item_category, brands, lat.item_brand, rng)
    images = _images(lat.item_style, lat.item_category, rng, config.image_size, 1.0, "item images")
    ids = np.arange(config.items)
    return pa.table({
        "item_id": pa.array(ids, pa.int64()),
        "raw_item_id": pa.array([f"synth-{i:07d}" for i in ids]),
        "category_id": pa.array(lat.item_category, pa.int32()),
        "title": pa.array(titles),
        "created_at": pa.array(lat.item_created, pa.timestamp("s")),
        "image": pa.array(images, pa.binary()),
        "brand_id": pa.array(lat.item_brand, pa.int32()),
        "price": pa.array(lat.item_price, pa.float32()),
    })


def _events_table(sessions: world.Sessions, rows: np.ndarray, hist: world.Histories,
                  queries: list) -> pa.Table:
    users, ts = sessions.user[rows], sessions.ts[rows]
    offsets, index = world.history_slices(hist, users, ts)
    offsets = pa.array(offsets.astype(np.int32))

    def listed(values: np.ndarray, kind: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values, kind))

    return pa.table({
        "user_id": pa.array(users, pa.int64()),
        "query": pa.array([queries[s] for s in sessions.session[rows]]),
        "target_item_id": pa.array(sessions.item[rows], pa.int64()),
        "label": pa.array(sessions.label[rows], pa.int8()),
        "ts": pa.array(ts, pa.int64()),
        "hist_item_ids": listed(hist.items[index], pa.int64()),
        "hist_category_ids": listed(hist.categories[index], pa.int32()),
        "hist_ts": listed(hist.ts[index], pa.int64()),
        "position": pa.array(sessions.position[rows], pa.int16()),
    })


def _pairs_table(config: SynthConfig, lat: world.Latents, sessions: world.Sessions, rows: np.ndarray,
                 count: int, rng: np.random.Generator, desc: str) -> pa.Table:
    session, item, signals = world.sample_pairs(config, lat, sessions, rng, count, rows)
    first_row = np.searchsorted(sessions.session, session)
    images = _images(sessions.wanted[session], sessions.query_category[session], rng,
                     config.image_size, 1.5, desc)
    return pa.table({
        "item_id": pa.array(item, pa.int64()),
        "signal": pa.array(signals),
        "category_id": pa.array(lat.item_category[item], pa.int32()),
        "ts": pa.array(sessions.ts[first_row], pa.int64()),
        "query_image": pa.array(images, pa.binary()),
        "user_id": pa.array(sessions.user[first_row], pa.int64()),
    })


def _write_truth(out: Path, lat: world.Latents, sessions: world.Sessions,
                 splits: Dict[str, np.ndarray]) -> None:
    truth = out / "truth"
    truth.mkdir(parents=True, exist_ok=True)
    np.savez(truth / "items.npz", style=lat.item_style, effect=lat.item_effect, group=lat.item_group,
             category=lat.item_category, centroids=lat.centroids)
    np.savez(truth / "users.npz", taste=lat.user_taste, group=lat.user_group,
             favourites=lat.user_favourites, favourite_weights=lat.user_favourite_weights,
             affinity=lat.affinity)
    for split, rows in splits.items():
        columns = {name: pa.array(values[rows]) for name, values in sessions.components.items()}
        columns["session"] = pa.array(sessions.session[rows])
        pq.write_table(pa.table(columns), truth / f"events_{split}.parquet")
    (truth / "README.md").write_text(
        "Ground truth of the synthetic world (see mim_rec/data/synth/world.py).\n"
        "items.npz: style [N,S] unit vectors, effect b_j, group h_j, category, centroids [C,S].\n"
        "users.npz: taste v_u, group g_u, favourites/favourite_weights, affinity A [G,G].\n"
        "events_<split>.parquet: row-aligned with events_<split>.parquet: the click-logit\n"
        "components (content, category, item_effect, collaborative, position, noise, logit).\n")


def generate_world(config: SynthConfig, out_dir: Union[str, Path]) -> Path:
    """Generate the world described by ``config`` into ``out_dir``, replacing a world there.

    The world is written in a staging folder and swapped in only when whole
    (:func:`staged_folder`): a run killed part-way leaves no half-world that would validate (its
    pairs are optional, so one cut off before them would train), and nothing of a world
    replaced (another data set's ``mm_table/``) is left beside the new one."""
    out = Path(out_dir)
    with staged_folder(out, "mim data synth") as staging:
        _write_world(config, staging)
    return out


def _write_world(config: SynthConfig, out: Path) -> None:
    # the bar is closed however the draw ends, so a refusal prints on a line of its own
    with tqdm(total=6, desc="synth", unit="step") as steps:
        _draw_world(config, out, steps)


def _draw_world(config: SynthConfig, out: Path, steps: tqdm) -> None:
    rng = np.random.default_rng(config.seed)

    lat = world.sample_latents(config, rng)
    items = _items_table(config, lat, rng)
    write_table(items, out / "items.parquet", ITEMS)
    steps.update()
    hist = world.sample_histories(config, lat, rng)
    if hist.cut:  # said as the pairs' shortfall is: the summary's lengths fall short of mean_history
        tqdm.write(f"note: {hist.cut} of {config.users} users drew a history longer than their candidate items "
                   f"(their favourite categories' items and 100 random ones) and took them all "
                   f"(mean_history={config.mean_history}, max_history={config.max_history})", file=sys.stderr)
    steps.update()
    sessions = world.sample_sessions(config, lat, hist, rng)
    queries = text.queries(sessions.wanted, sessions.query_category, rng)
    _, t_end = world.time_line(config)
    is_test = sessions.ts >= t_end - config.test_days * world.DAY
    splits = {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}
    for split, rows in splits.items():
        if not len(rows):  # a world without test (or train) events would fail later, in a reader
            raise ConfigError(f"events={config.events}: none of the {len(np.unique(sessions.session))} search "
                              f"sessions fell in the {split} split (the last test_days={config.test_days} of "
                              f"event_days={config.event_days} are the test split); raise events or change "
                              f"test_days")
    steps.update()
    for split, rows in splits.items():
        write_table(_events_table(sessions, rows, hist, queries), out / f"events_{split}.parquet",
                    EVENTS, item_count=config.items)
    steps.update()
    counts = {"items": config.items, "users": config.users, "categories": config.categories}
    for split, count in (("train", config.pairs_train), ("test", config.pairs_test)):
        pairs = _pairs_table(config, lat, sessions, splits[split], count, rng, f"{split} query images")
        write_table(pairs, out / f"pairs_{split}.parquet", PAIRS, item_count=config.items)
        counts[f"pairs_{split}"] = pairs.num_rows
        if pairs.num_rows < count:  # one visual search per session: the split has too few sessions
            tqdm.write(f"note: pairs_{split}={count} asked for, {pairs.num_rows} drawn: a pair is one search "
                       f"session's, and the {split} split has {pairs.num_rows} sessions", file=sys.stderr)
    steps.update()
    _write_truth(out, lat, sessions, splits)
    steps.update()
    counts["events_train"], counts["events_test"] = len(splits["train"]), len(splits["test"])
    write_manifest(out, Manifest(kind="world", stage="synth", config=asdict(config),
                                 row_count=config.items, extra={"counts": counts}))
