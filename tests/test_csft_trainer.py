"""`mim csft` end to end on a tiny world with tiny random encoders: training learns, exact
resume from a checkpoint (queue included), every variant runs, a 2-rank gloo run, clear
errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from mim_rec.config import ConfigError, to_dict
from mim_rec.csft import CsftConfig, load_csft_model
from mim_rec.csft.config import (CsftDataConfig, FusionConfig, LossConfig, ModelConfig,
                                 NegativesConfig, QueryConfig)
from mim_rec.data.manifest import fingerprint_file
from mim_rec.data.synth import SynthConfig, generate_world, tiny
from mim_rec.encoders import EncoderPair, EncodersConfig, VisionConfig, load_encoders, save_encoders
from mim_rec.utils.dist import free_port
from tests.encoder_fixtures import tiny_encoders, tiny_text
from train import cli
from train.csft import evaluate_run, run_csft

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("csft_trainer")
    world = generate_world(replace(tiny(SynthConfig(seed=3)), items=240, users=60, events=1200,
                                   pairs_train=160, pairs_test=40, image_size=32),
                           folder / "world")
    torch.manual_seed(0)
    save_encoders(folder / "stage1", EncoderPair(tiny_encoders(shared_dim=8)))
    return world, folder / "stage1", folder / "features"


def _config(inputs, out: Path, **changes) -> CsftConfig:
    world, stage1, features = inputs
    return dataclasses.replace(CsftConfig(
        encoders=str(stage1), model=ModelConfig(fusion=FusionConfig(hidden=16)),
        data=CsftDataConfig(world=str(world), signals=["purchase", "click"], batch_size=16,
                            feature_cache=str(features)),
        negatives=NegativesConfig(queue_batches=3), steps=6, checkpoint_every=3, log_every=1,
        out=str(out)), **changes)


def _metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").open()]


def test_training_lowers_the_loss_and_evaluates_both_rows(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    config = _config(inputs, out, steps=40, checkpoint_every=40, lr=3e-3)
    run_csft(config)
    losses = [m["loss"] for m in _metrics(out) if "loss" in m]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    steps = [m for m in _metrics(out) if "negatives" in m]
    assert max(m["negatives"] for m in steps) <= 2 * 16 * (3 + 1) - 1
    assert all(0 <= m.get("queue_drift", 0) < 1 and m.get("queue_age", 1) <= 3 for m in steps)
    report = evaluate_run(config)
    assert set(report) == {"stage1", "csft"}
    for row in report.values():
        assert 0 <= row["recall@10"] <= row["recall@100"] <= 1 and 0 < row["pair_auc"] < 1
        assert row["held_out"] == "test"
        assert row["held_out_pairs"] == pq.read_metadata(inputs[0] / "pairs_test.parquet").num_rows
    saved = json.loads((out / "eval.json").read_text())
    assert saved.pop("inputs") == {"split": "test", "validation": 0.0, "files": {
        str((inputs[0] / name).resolve()): fingerprint_file(inputs[0] / name)
        for name in ("items.parquet", "pairs_test.parquet", "events_test.parquet")}}
    assert saved == report


def _trainable_state(out: Path):
    model = load_csft_model(out / "mm_encoder")
    return {k: v for k, v in model.state_dict().items()}


def _lonely_world(inputs, folder: Path):
    """``inputs`` with every fourth item alone in its category: the hard-negative sampler falls
    back to any other item for those (and counts it). The pairs follow their items' new
    categories (C-SFT's pair reader refuses a pair whose category is not its item's)."""
    folder.mkdir()
    rewritten = ("items.parquet", "pairs_train.parquet", "pairs_test.parquet")
    for path in inputs[0].iterdir():
        if path.name not in rewritten:
            (folder / path.name).symlink_to(path)
    items = pq.read_table(inputs[0] / "items.parquet")
    ids = items.column("item_id").to_numpy()
    categories = np.where(ids % 4 == 0, 6 + ids, items.column("category_id").to_numpy())
    for name in rewritten:
        table = pq.read_table(inputs[0] / name)
        field = table.schema.field("category_id")
        own = categories[table.column("item_id").to_numpy()]
        pq.write_table(table.set_column(table.column_names.index("category_id"), field,
                                        [pa.array(own, type=field.type)]), folder / name)
    return folder, inputs[1], folder / "features"


def test_resume_from_a_checkpoint_gives_the_same_weights(inputs, tmp_path, monkeypatch):
    from train.common import CheckpointManager

    inputs = _lonely_world(inputs, tmp_path / "world")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_csft(_config(inputs, straight))
    assert [p.name for p in (straight / "checkpoints").iterdir()] == ["step-000000006.pt"]  # finished
    with monkeypatch.context() as patch:  # a killed run never gets to prune its checkpoints
        patch.setattr(CheckpointManager, "finish", lambda self: None)
        run_csft(_config(inputs, resumed))
    # What a run killed after step 4 leaves: the step-3 checkpoint, no artifact.
    (resumed / "checkpoints" / "step-000000006.pt").unlink()
    for path in (resumed / "mm_encoder").rglob("*"):
        if path.is_file():
            path.unlink()
    run_csft(_config(inputs, resumed))
    assert "resume" in [m.get("event") for m in _metrics(resumed)]
    want, got = _trainable_state(straight), _trainable_state(resumed)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    # the sampler's count too: it used to restart from 0 at the resume, logging fewer
    done = [next(m for m in _metrics(out) if m.get("event") == "done") for out in (straight, resumed)]
    assert done[0]["hard_negative_fallbacks"] > 0
    assert done[1]["hard_negative_fallbacks"] == done[0]["hard_negative_fallbacks"]


def test_a_diverged_run_stops_before_checkpointing_nan_weights(inputs, tmp_path, capsys):
    """It saved NaN weights as mm_encoder/ and exited 0; csft-eval then printed recall 1.0."""
    out = tmp_path / "diverged"
    config_file = _write_config(_config(inputs, out, lr=1e8, steps=20, checkpoint_every=1), tmp_path / "c.yaml")
    assert cli.main(["csft", "--config", str(config_file)]) == 1
    assert "the C-SFT loss" in capsys.readouterr().err
    assert not (out / "mm_encoder" / "manifest.json").exists()
    saved = sorted((out / "checkpoints").iterdir())
    for path in saved:  # the steps before the divergence, none after
        weights = torch.load(path, weights_only=False)["model"]
        assert all(torch.isfinite(w).all() for w in weights.values()), path.name
    last = int(saved[-1].stem.split("-")[1]) if saved else 0
    assert last < 20 and any(not math.isfinite(m["loss"]) for m in _metrics(out) if m["step"] == last + 1
                             and "loss" in m)


def test_evaluation_refuses_nan_embeddings(inputs):
    """NaN scores lose every comparison, so each query ranked its own item first: recall 1.0."""
    from mim_rec.csft.evaluate import Embedded, evaluate_embeddings
    from mim_rec.data.errors import DataError
    world = _world_inputs(inputs)
    held_out = world.held_out(0.0)
    items = torch.nn.functional.normalize(torch.randn(world.item_count, 8), dim=-1)
    items[3, 0] = float("nan")
    embedded = Embedded(torch.nn.functional.normalize(torch.randn(len(held_out.pairs), 8), dim=-1), items,
                        np.arange(world.item_count))
    with pytest.raises(DataError, match="runs/x/mm_encoder: 1 of 240 item embeddings are NaN or infinite"):
        evaluate_embeddings(embedded, world, [10], held_out, source="runs/x/mm_encoder")


def test_a_collapsed_item_tower_scores_chance_not_a_perfect_recall(inputs):
    """Every item the same vector ties every score; ties counted for the target read recall 1.0."""
    from mim_rec.csft.evaluate import Embedded, evaluate_embeddings
    world = _world_inputs(inputs)
    held_out = world.held_out(0.0)
    items = torch.nn.functional.normalize(torch.ones(world.item_count, 8), dim=-1)
    embedded = Embedded(torch.nn.functional.normalize(torch.randn(len(held_out.pairs), 8), dim=-1), items,
                        np.arange(world.item_count))
    metrics = evaluate_embeddings(embedded, world, [10, 100], held_out, source="runs/x/mm_encoder")
    assert metrics["recall@10"] == metrics["recall@100"] == 0.0 and metrics["pair_auc"] == 0.5


def test_evaluation_counts_its_candidates_and_notes_a_recall_that_is_1_by_construction(inputs, capsys):
    """A catalogue of k or fewer items ranks every paired item in the top k: the report reads
    ``candidate_items`` to withhold a verdict, and the evaluation says so on stderr."""
    from mim_rec.csft.evaluate import Embedded, evaluate_embeddings
    from train.csft import note_catalogue_size
    world = _world_inputs(inputs)
    held_out = world.held_out(0.0)
    items = torch.nn.functional.normalize(torch.randn(world.item_count, 8), dim=-1)
    embedded = Embedded(items[torch.from_numpy(held_out.pairs.item_ids)], items, np.arange(world.item_count))
    metrics = evaluate_embeddings(embedded, world, [10], held_out, source="runs/x/mm_encoder")
    assert metrics["candidate_items"] == 240 and metrics["held_out_pairs"] == len(held_out.pairs)
    note_catalogue_size(world, [10, 100])
    assert capsys.readouterr().err == ""
    note_catalogue_size(world, [10, 240, 500])
    assert capsys.readouterr().err == (f"note: only 240 items in the catalogue of data.world={inputs[0]}: "
                                       "recall@240, recall@500 are 1 by construction; use a larger world\n")


def test_an_item_repeated_under_another_id_is_not_a_negative_of_its_twin(inputs):
    """Queries embedded exactly as their paired items: item ``twin`` repeats the first target's
    title and image and ties with it, which read as a miss; ``decoy`` only scores like the second
    target (its content differs), so it still counts ahead of it."""
    from mim_rec.csft.evaluate import Embedded, evaluate_embeddings
    world = _world_inputs(inputs)
    held_out = world.held_out(0.0)
    targets = held_out.pairs.item_ids
    first, second = targets[0], next(t for t in targets if t != targets[0])
    twin, decoy = np.setdiff1d(np.arange(world.item_count), targets)[:2]
    items = torch.nn.functional.normalize(
        torch.randn(world.item_count, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    items[twin], items[decoy] = items[first], items[second]
    content = np.arange(world.item_count)
    content[twin] = content[first]
    embedded = Embedded(items[torch.from_numpy(targets)], items, content)
    recall = evaluate_embeddings(embedded, world, [1], held_out, source="runs/x/mm_encoder")["recall@1"]
    assert recall == pytest.approx(1 - np.mean(targets == second))


def test_item_content_groups_items_identical_in_title_and_image(inputs, tmp_path):
    """The item tower reads both: a repeated title under another image is a different item."""
    from mim_rec.csft.data import FeatureCache, WorldInputs
    items = pq.read_table(inputs[0] / "items.parquet").to_pylist()
    items[1].update(title=items[0]["title"], image=items[0]["image"])
    items[2]["title"] = items[0]["title"]
    (tmp_path / "world").mkdir()
    pq.write_table(pa.Table.from_pylist(items, schema=pq.read_schema(inputs[0] / "items.parquet")),
                   tmp_path / "world" / "items.parquet")
    world = WorldInputs(tmp_path / "world", FeatureCache(tmp_path / "features"))
    groups = world.item_content(load_encoders(inputs[1]).vision).item_groups()
    assert groups[0] == groups[1] and len(set(groups.tolist())) == world.item_count - 1


def test_item_content_is_the_decoded_corpus_digests_when_it_is_decoded(inputs, tmp_path, monkeypatch):
    """Evaluation read and digested every stored image again after training had decoded them."""
    from mim_rec.csft import data
    vision = load_encoders(inputs[1]).vision
    digested = data.WorldInputs(inputs[0], data.FeatureCache(tmp_path)).item_content(vision)
    world = data.WorldInputs(inputs[0], data.FeatureCache(tmp_path))
    decoded = world.corpus(vision)
    monkeypatch.setattr(data, "stored_images", lambda *args: pytest.fail("the stored images were read again"))
    content = world.item_content(vision)
    assert content is decoded.content
    assert np.array_equal(content.titles, digested.titles) and np.array_equal(content.images, digested.images)


@pytest.mark.parametrize("changes", [
    dict(loss=LossConfig(kind="pairwise_ce")),
    dict(loss=LossConfig(kind="category_ce")),
    dict(loss=LossConfig(alpha=0.0, beta=0.0),
         negatives=NegativesConfig(hard=False, queue_batches=0, all_gather=False),
         model=ModelConfig(fusion=FusionConfig(kind="concat", hidden=16))),
    dict(model=ModelConfig(fusion=FusionConfig(kind="lowrank", hidden=16, rank=2, residual=False),
                           query=QueryConfig(share_vision=False), train_backbones=True),
         negatives=NegativesConfig(queue_batches=0)),  # live backbones: no queue
    dict(negatives=NegativesConfig(queue_batches=3, queue_refresh=False)),
], ids=["pairwise_ce", "category_ce", "all_extensions_off", "backbones_train", "stale_queue"])
def test_variants_run_and_save_a_loadable_encoder(inputs, tmp_path, changes):
    out = tmp_path / "variant"
    run_csft(_config(inputs, out, steps=2, checkpoint_every=2, **changes))
    model = load_csft_model(out / "mm_encoder")
    record = [m for m in _metrics(out) if "loss" in m][-1]
    if changes.get("loss", LossConfig()).kind == "category_ce":
        assert "category_ce" in record
    elif not changes.get("negatives", NegativesConfig()).hard:  # no hard negatives, no queue, one rank: N - 1
        assert record["negatives"] <= 16 - 1 and set(record) >= {"q2item"} and "q2txt" not in record
    if changes.get("model", ModelConfig()).train_backbones:
        stage1 = load_encoders(inputs[1])
        moved = [not torch.equal(a, b) for a, b in zip(stage1.text.parameters(),
                                                        model.items.pair.text.parameters())]
        assert any(moved)  # the trainable backbone layers did train
    if not changes.get("negatives", NegativesConfig()).queue_refresh:
        assert "queue_drift" in record  # stored rows: their staleness is measured


def _write_config(config: CsftConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(config)))))
    return path


def test_two_rank_gloo_run(inputs, tmp_path):
    out = tmp_path / "ddp"
    config_file = _write_config(_config(inputs, out, steps=4), tmp_path / "c.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         f"--master-port={free_port()}", "-m", "train.cli", "csft", "--config",
         str(config_file)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = _metrics(out)
    assert records[0]["world_size"] == 2
    # N = 8 per rank, P = 2, hard negatives: 2NP = 32 current rows; the queue adds 32 a step.
    negatives = [m["negatives"] for m in records if "negatives" in m]
    assert negatives[0] <= 31 and max(negatives) <= 2 * 8 * 2 * (3 + 1) - 1
    assert max(negatives) > 31  # the queue did add candidates
    assert (out / "mm_encoder" / "manifest.json").exists()
    # the logged loss is the global batch's (it was rank 0's share): one process on the same batch agrees
    run_csft(_config(inputs, tmp_path / "one", steps=4))
    one = [m["loss"] for m in _metrics(tmp_path / "one") if "loss" in m]
    assert [m["loss"] for m in records if "loss" in m] == pytest.approx(one, rel=1e-4)


@pytest.mark.parametrize("command", [["csft-eval"], ["csft", "--eval-only"]])
def test_the_eval_commands_print_both_rows_of_a_finished_run(inputs, tmp_path, capsys, command):
    out = tmp_path / "run"
    config = _config(inputs, out, steps=4)
    run_csft(config)
    trained = (out / "mm_encoder" / "manifest.json").read_bytes()
    assert cli.main([*command, "--config", str(_write_config(config, tmp_path / "c.yaml"))]) == 0
    printed = capsys.readouterr().out
    assert "stage1" in printed and "csft" in printed
    assert set(json.loads((out / "eval.json").read_text())) == {"inputs", "stage1", "csft"}
    assert (out / "mm_encoder" / "manifest.json").read_bytes() == trained  # evaluated, not retrained


@pytest.mark.parametrize("flag", ["--eval", "--eval-only"])
def test_eval_opens_the_world_and_reads_the_held_out_pairs_once(inputs, tmp_path, capsys, flag):
    """mim csft --eval opened the world (reading and validating every item) to check the
    held-out data before training, again to train and again to evaluate, and read the held-out
    pairs (validating them decodes every query image) twice; --eval-only did both twice. What
    the check opened is handed on."""
    from unittest import mock

    from mim_rec.csft.data import WorldInputs

    config = _config(inputs, tmp_path / "run", steps=2, checkpoint_every=2)
    if flag == "--eval-only":
        run_csft(config)
    with mock.patch.object(WorldInputs, "__init__", autospec=True, side_effect=WorldInputs.__init__) as opened, \
            mock.patch.object(WorldInputs, "held_out", autospec=True, side_effect=WorldInputs.held_out) as held_out:
        assert cli.main(["csft", "--config", str(_write_config(config, tmp_path / "c.yaml")), flag]) == 0
    assert (opened.call_count, held_out.call_count) == (1, 1)
    assert "| csft |" in capsys.readouterr().out


def test_the_eval_commands_refuse_a_folder_without_a_model_or_other_stage1_encoders(inputs, tmp_path, capsys):
    """Both used to exit 0: a stage-1 row alone, or one from towers the C-SFT model never saw."""
    config = _config(inputs, tmp_path / "none")
    assert cli.main(["csft-eval", "--config", str(_write_config(config, tmp_path / "a.yaml"))]) == 2
    assert "holds no C-SFT model (mm_encoder/)" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    run_csft(_config(inputs, tmp_path / "run", steps=2))
    other = tmp_path / "other_stage1"
    torch.manual_seed(9)
    save_encoders(other, EncoderPair(tiny_encoders(shared_dim=8)))
    elsewhere = dataclasses.replace(_config(inputs, tmp_path / "run", steps=2), encoders=str(other))
    assert cli.main(["csft-eval", "--config", str(_write_config(elsewhere, tmp_path / "b.yaml"))]) == 2
    assert "not the stage-1 encoders" in capsys.readouterr().err


def _world_with(inputs, world: Path, name: str, table: Optional[pa.Table]) -> Path:
    """``world``, made as ``inputs``' world with the file ``name`` replaced by ``table`` (left out
    when None)."""
    world.mkdir()
    for each in ("items.parquet", "pairs_train.parquet", "pairs_test.parquet", "events_train.parquet",
                 "events_test.parquet"):
        if each != name:
            (world / each).symlink_to(inputs[0] / each)
    if table is not None:
        pq.write_table(table, world / name)
    return world


def _one_label(events: pa.Table) -> pa.Table:
    """``events`` with every label 0: no user has both a click and a non-click."""
    return events.set_column(events.schema.get_field_index("label"), "label",
                             pa.array(np.zeros(len(events), np.int8)))


def _evaluated_with(inputs, tmp_path: Path, name: str, table: pa.Table, monkeypatch) -> Path:
    """Train a 2-step run, then run csft-eval on it (expecting exit status 2 before any encoder
    loads: an unscorable events_test was found after the stage-1 embeddings) over a world that
    is ``inputs``' with the file ``name`` replaced by ``table``; returns that world."""
    import mim_rec.encoders

    def loaded(directory):
        raise AssertionError("encoders loaded before the held-out data was checked")

    config = _config(inputs, tmp_path / "run", steps=2)
    run_csft(config)
    monkeypatch.setattr(mim_rec.encoders, "load_encoders", loaded)
    world = _world_with(inputs, tmp_path / "world", name, table)
    config = replace(config, data=replace(config.data, world=str(world)))
    assert cli.main(["csft-eval", "--config", str(_write_config(config, tmp_path / "c.yaml"))]) == 2
    return world


@pytest.mark.parametrize("rows", ["empty", "one label"])
def test_csft_eval_names_test_events_that_no_auc_can_score(inputs, tmp_path, capsys, monkeypatch, rows):
    """An empty events_test, or one of a single label, ended csft-eval (and csft --eval, after
    training) in a ValueError traceback with exit status 1."""
    events = pq.read_table(inputs[0] / "events_test.parquet")
    events = events.slice(0, 0) if rows == "empty" else _one_label(events)
    world = _evaluated_with(inputs, tmp_path, "events_test.parquet", events, monkeypatch)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mim csft-eval: error: {world / 'events_test.parquet'}, field 'label': no user of its "
        f"{len(events):,} impressions has both a click and a non-click with a history; the "
        "content-interest AUC is undefined")


def test_csft_eval_names_an_empty_pairs_test(inputs, tmp_path, capsys, monkeypatch):
    """An empty pairs_test ended csft-eval in torch.cat's 'expected a non-empty list' traceback."""
    world = _evaluated_with(inputs, tmp_path, "pairs_test.parquet",
                            pq.read_table(inputs[0] / "pairs_test.parquet").slice(0, 0), monkeypatch)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mim csft-eval: error: {world / 'pairs_test.parquet'}: holds no pairs; the query->item recall "
        "needs held-out pairs")


def test_unknown_signal_in_the_pairs_file_is_named(inputs, tmp_path, capsys):
    world = tmp_path / "world"
    world.mkdir()
    for name in ("items.parquet", "pairs_test.parquet", "events_test.parquet"):
        (world / name).symlink_to(inputs[0] / name)
    table = pq.read_table(inputs[0] / "pairs_train.parquet")
    signals = table.column("signal").to_pylist()
    signals[7] = "wishlist"
    index = table.column_names.index("signal")
    pq.write_table(table.set_column(index, "signal", [signals]), world / "pairs_train.parquet")
    config = _config((world, inputs[1], inputs[2]), tmp_path / "out")
    config_file = _write_config(config, tmp_path / "c.yaml")
    assert cli.main(["csft", "--config", str(config_file)]) == 2
    assert "pairs_train.parquet, row 7, field 'signal'" in capsys.readouterr().err


def test_no_pairs_of_the_chosen_signal_is_an_error(inputs, tmp_path, capsys):
    """A signal that is not one is refused with the settings; one no pair carries, by file."""
    from mim_rec.csft.data import Pairs, with_signals
    from mim_rec.data.errors import DataError


    config = _config(inputs, tmp_path / "out")
    config_file = _write_config(config, tmp_path / "c.yaml")
    assert cli.main(["csft", "--config", str(config_file), "data.signals=[refund]"]) == 2
    assert "data.signals=['refund']: 'refund' is not a signal" in capsys.readouterr().err
    clicks = Pairs("pairs_train.parquet", np.arange(2), np.arange(2), np.zeros(2, np.int32), ["click", "click"],
                   np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"pairs_train.parquet.*no pairs with signal in \['purchase'\]"):
        with_signals(clicks, ["purchase"])


@pytest.mark.parametrize("refresh", ["true", "false"])
def test_a_queue_needs_frozen_backbones(inputs, tmp_path, capsys, refresh):
    config_file = _write_config(_config(inputs, tmp_path / "out"), tmp_path / "c.yaml")
    assert cli.main(["csft", "--config", str(config_file), "model.train_backbones=true",
                     f"negatives.queue_refresh={refresh}"]) == 2
    assert "negatives.queue_batches=0" in capsys.readouterr().err


def test_ablations_run_each_variant_once_and_write_the_tables(inputs, tmp_path):
    from train.csft_ablations import run_ablations
    out = tmp_path / "ablations"
    config_file = _write_config(_config(inputs, out), tmp_path / "c.yaml")
    report = run_ablations(str(config_file), [], ["full", "no_tfn"])
    assert set(report) == {"stage1", "full", "no_tfn"}
    assert json.loads((out / "no_tfn" / "config.json").read_text())["model"]["fusion"]["kind"] == "concat"
    assert json.loads((out / "full" / "config.json").read_text())["model"]["fusion"]["kind"] == "tfn"
    table = (out / "ABLATIONS.md").read_text()
    assert "| w/o TFN (concat fusion) | `model.fusion.kind=concat` |" in table
    assert table.count("w/o C-SFT (stage-1 embeddings)") == 2  # the baseline row of both tables
    assert run_ablations(str(config_file), [], ["full", "no_tfn"]) == report  # reused, not retrained
    # another --only adds its variant to the tables rather than dropping the earlier ones
    more = run_ablations(str(config_file), [], ["no_multi_level"])
    assert set(more) == {"stage1", "full", "no_tfn", "no_multi_level"} and more["no_tfn"] == report["no_tfn"]
    assert "| w/o TFN (concat fusion) |" in (out / "ABLATIONS.md").read_text()


@pytest.mark.parametrize("command, opened", [("ablations", 1), ("tune", 1), ("tune_batch", 2)])
def test_ablations_and_tune_hand_their_world_to_each_run(inputs, tmp_path, command, opened):
    """csft-ablations and csft-tune opened the world (reading and validating every item), then
    every run they trained opened it again: a variant's other signals are read from the world
    as training asks for them, and every run shares the command's feature cache. A grid point
    of another extraction batch (or world) still opens its own."""
    from unittest import mock

    from mim_rec.csft.data import WorldInputs
    from train.csft_ablations import run_ablations
    from train.csft_tune import run_tune

    config_file = _write_config(_config(inputs, tmp_path / "out", steps=2, checkpoint_every=2), tmp_path / "c.yaml")
    with mock.patch.object(WorldInputs, "__init__", autospec=True, side_effect=WorldInputs.__init__) as opening:
        if command == "ablations":
            report = run_ablations(str(config_file), [], ["full", "click_infonce"])
            assert set(report) == {"stage1", "full", "click_infonce"}
        else:
            grid = [("loss.temperature", ["0.05", "0.5"])] if command == "tune" else [("eval.batch_size", ["256", "64"])]
            assert len(run_tune(str(config_file), [], grid, validation=0.25)["trials"]) == 2
    assert opening.call_count == opened


def test_a_world_changed_under_the_same_path_is_refused_not_resumed(inputs, tmp_path, monkeypatch):
    """Regenerating a world in place used to resume (or, finished, re-label) a C-SFT run with
    the new world's fingerprints, and csft-ablations answered from its stale result.json."""
    import shutil

    from mim_rec.config import ConfigError
    from train.csft_ablations import run_ablations

    world = tmp_path / "world"
    shutil.copytree(inputs[0], world)
    moved = (world, *inputs[1:])
    out = tmp_path / "ablations"
    config_file = _write_config(_config(moved, out), tmp_path / "c.yaml")
    run_ablations(str(config_file), [], ["full"])
    pairs = pq.read_table(world / "pairs_train.parquet")
    pq.write_table(pairs.slice(0, pairs.num_rows - 8), world / "pairs_train.parquet")
    with pytest.raises(ConfigError, match="trained on other data: pairs_selected, pairs_train changed"):
        run_ablations(str(config_file), [], ["full"])
    with pytest.raises(ConfigError, match="trained on other data: pairs_selected, pairs_train changed"):
        run_csft(_config(moved, out / "full"))


def test_a_checkpoint_of_other_selected_pairs_is_refused(inputs, tmp_path, monkeypatch):
    """signals=[click] came to select the purchases too: a checkpoint trained on the old
    selection, under the same settings and files, was resumed (or re-evaluated) as this run's."""
    from mim_rec.config import ConfigError
    from mim_rec.csft import data

    out = tmp_path / "clicks"
    run_csft(_config(inputs, out, steps=2, checkpoint_every=2, data=dataclasses.replace(
        _config(inputs, out).data, signals=["click"])))
    monkeypatch.setitem(data.SELECTED_BY, "click", ("click",))  # the old reading: clicks not bought
    with pytest.raises(ConfigError, match="trained on other data: pairs_selected changed"):
        run_csft(_config(inputs, out, steps=2, checkpoint_every=2, data=dataclasses.replace(
            _config(inputs, out).data, signals=["click"])))


def _flip_labels(events: Path) -> None:
    """Rewrite an events file with every click a non-click and every non-click a click."""
    table = pq.read_table(events)
    flipped = pa.array(1 - table.column("label").to_numpy(), pa.int8())
    pq.write_table(table.set_column(table.column_names.index("label"), "label", flipped), events)


def test_ablations_answer_from_the_events_file_as_it_is_now(inputs, tmp_path):
    """result.json was keyed without the events file its AUCs come from: flipping every label
    of events_test printed the identical table, stage 1 and every variant."""
    import shutil

    from train.csft_ablations import run_ablations

    world = tmp_path / "world"
    shutil.copytree(inputs[0], world)
    config_file = _write_config(_config((world, *inputs[1:]), tmp_path / "ablations"), tmp_path / "c.yaml")
    before = run_ablations(str(config_file), [], ["full"])
    _flip_labels(world / "events_test.parquet")
    assert set(run_ablations(str(config_file), [], [])) == {"stage1"}  # full's stale result is not shown
    after = run_ablations(str(config_file), [], ["full"])
    for row in ("stage1", "full"):
        assert after[row]["pair_auc"] == pytest.approx(1 - before[row]["pair_auc"])


def test_a_validation_result_is_keyed_by_the_training_events(inputs, tmp_path):
    """csft-tune scores its validation split on events_train, so a result must follow that file."""
    import shutil

    from mim_rec.csft.data import FeatureCache, WorldInputs
    from train.csft_runs import csft_fingerprint

    world = tmp_path / "world"
    shutil.copytree(inputs[0], world)
    config = _config((world, *inputs[1:]), tmp_path / "run")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, validation=0.25))
    held_out = WorldInputs(world, FeatureCache(inputs[2])).held_out(0.25)
    before = csft_fingerprint(config, held_out)
    _flip_labels(world / "events_train.parquet")
    assert csft_fingerprint(config, held_out) != before


def test_a_result_scored_under_other_evaluation_rules_is_not_reused(inputs, tmp_path, monkeypatch):
    """Results cached before content twins were masked would have mixed into new tables."""
    from mim_rec.csft.data import FeatureCache, WorldInputs
    from train import csft_runs

    config = _config(inputs, tmp_path / "run")
    held_out = WorldInputs(inputs[0], FeatureCache(inputs[2])).held_out(0.0)
    before = csft_runs.csft_fingerprint(config, held_out)
    monkeypatch.setattr(csft_runs, "EVALUATION_RULES", "other rules")
    assert csft_runs.csft_fingerprint(config, held_out) != before


def test_the_same_folders_given_relative_and_absolute_resume(inputs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_csft(_config(inputs, out))
    monkeypatch.chdir(tmp_path)
    world, stage1, features = inputs
    relative = (Path(os.path.relpath(world)), Path(os.path.relpath(stage1)), Path(os.path.relpath(features)))
    run_csft(_config(relative, out))  # resumes the finished run: not "another configuration"
    assert [m.get("event") for m in _metrics(out)].count("resume") == 1


def test_head_lr_puts_the_stage1_heads_in_their_own_group(inputs, tmp_path):
    from mim_rec.csft.model import CsftModel
    from mim_rec.csft.objective import CsftObjective
    from train.csft import _optimizer

    config = _config(inputs, tmp_path / "unused", head_lr=1e-5)
    model = CsftModel(load_encoders(inputs[1]), config.model)
    objective = CsftObjective(model, config.loss, config.negatives, num_categories=4)
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in _optimizer(objective, config).param_groups}
    heads = {id(p) for head in (model.items.pair.vision_head, model.items.pair.text_head, model.queries.head)
             for p in head.parameters()}
    assert by_lr[1e-5] == heads
    assert {id(p) for p in model.items.fusion.parameters()} <= by_lr[config.lr]
    default = _optimizer(objective, _config(inputs, tmp_path / "unused")).param_groups
    assert {group["lr"] for group in default} == {config.lr}  # head_lr unset: the heads train at lr


def _world_inputs(inputs):
    from mim_rec.csft.data import FeatureCache, WorldInputs
    return WorldInputs(inputs[0], FeatureCache(inputs[2]))


def test_click_pairs_are_every_pair_and_purchases_their_subset(inputs):
    """A purchase is also a click (paper Table 4): data.signals=[click] kept only the pairs
    clicked and not bought, so the "click pairs" variants trained on the purchases' complement."""
    world = _world_inputs(inputs)
    every = world.pairs("train")
    clicks, purchases = world.pairs("train", ["click"]), world.pairs("train", ["purchase"])
    assert set(every.signals) == {"click", "purchase"}
    assert np.array_equal(clicks.rows, every.rows) and clicks.signals == every.signals
    assert set(purchases.signals) == {"purchase"} and 0 < len(purchases) < len(clicks)
    assert np.array_equal(world.training_pairs(["click"], validation=0.25).rows,
                          world.training_pairs(["purchase", "click"], validation=0.25).rows)


def test_validation_holds_out_the_latest_pairs_and_their_period(inputs):
    world = _world_inputs(inputs)
    every = world.pairs("train")
    train = world.training_pairs(["purchase", "click"], validation=0.25)
    valid = world.held_out(0.25)
    assert valid.name == "validation" and valid.split == "train" and valid.since is not None
    assert not set(train.rows) & set(valid.pairs.rows)
    assert len(train) + len(valid.pairs) == len(every)
    assert abs(len(valid.pairs) - 0.25 * len(every)) <= 0.05 * len(every)  # ties at the cut move a few
    assert train.ts.max() < valid.since <= valid.pairs.ts.min()
    purchases = world.training_pairs(["purchase"], validation=0.25)
    assert set(purchases.rows) <= set(train.rows) and set(purchases.signals) == {"purchase"}
    test = world.held_out(0.0)
    assert (test.name, test.split, test.since) == ("test", "test", None)
    assert test.events_path.name == "events_test.parquet"


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_validation_share_must_lie_inside_zero_and_one(fraction):
    import numpy as np
    from mim_rec.data.split import time_cut
    with pytest.raises(ValueError, match="data.validation"):
        time_cut(np.arange(10), fraction, "pairs_train.parquet")


def test_a_cut_that_leaves_nothing_to_train_on_is_named():
    import numpy as np
    from mim_rec.data.split import time_cut
    from mim_rec.data.errors import DataError
    with pytest.raises(DataError, match="pairs_train.parquet.*leaves no rows"):
        time_cut(np.full(10, 7), 0.2, "pairs_train.parquet")


def test_a_validation_run_trains_without_the_held_out_pairs_and_scores_them(inputs, tmp_path, capsys):
    out = tmp_path / "valid"
    config = _config(inputs, out, steps=2, checkpoint_every=2)
    config = replace(config, data=replace(config.data, validation=0.25))
    run_csft(config)
    world = _world_inputs(inputs)
    start = next(m for m in _metrics(out) if m.get("event") == "start")
    assert start["train_pairs"] == len(world.training_pairs(config.data.signals, 0.25))
    report = evaluate_run(config)
    held_out = world.held_out(0.25)
    for row in report.values():
        assert row["held_out"] == "validation" and row["held_out_pairs"] == len(held_out.pairs)
    events = pq.read_table(inputs[0] / "events_train.parquet", columns=["ts", "hist_item_ids"])
    in_period = [len(h) for t, h in zip(events.column("ts").to_pylist(),
                                        events.column("hist_item_ids").to_pylist()) if t >= held_out.since]
    assert report["stage1"]["scored_impressions"] + report["stage1"]["no_history_impressions"] == len(in_period)
    # evaluated again on other data (here the test files): the report says so, and so does the
    # command, instead of silently replacing the validation numbers
    again = evaluate_run(replace(config, data=replace(config.data, validation=0.0)))
    assert "held an evaluation of other inputs" in capsys.readouterr().err
    saved = json.loads((out / "eval.json").read_text())
    assert saved.pop("inputs")["split"] == "test" and saved == again


def test_balanced_score_is_the_weaker_relative_gain():
    from train.csft_tune import score
    stage1 = {"recall@10": 0.02, "pair_auc": 0.58}
    assert score({"recall@10": 0.03, "pair_auc": 0.60}, stage1, "balanced") == pytest.approx(1.25)  # AUC side
    assert score({"recall@10": 0.01, "pair_auc": 0.62}, stage1, "balanced") == pytest.approx(0.5)   # recall side
    assert score({"recall@10": 0.01, "pair_auc": 0.62}, stage1, "pair_auc") == 0.62
    from mim_rec.config import ConfigError
    with pytest.raises(ConfigError, match="--select 'auc'"):
        score({"recall@10": 0.01, "pair_auc": 0.62}, stage1, "auc")


def test_an_unknown_select_is_refused_before_any_data_is_read(tmp_path):
    """It was found after the stage-1 pass over the validation split (every feature extracted)."""
    from mim_rec.config import ConfigError
    from train.csft_tune import run_tune

    overrides = [f"data.world={tmp_path / 'no_world'}", f"encoders={tmp_path / 'no_encoders'}", f"out={tmp_path / 'tune'}",
                 "eval.ks=[10,100]"]
    with pytest.raises(ConfigError, match=r"--select 'recall@5': not a metric; expected one of \['balanced', "
                                          r"'recall@10', 'recall@100', 'pair_auc', 'gauc'\]"):
        run_tune(None, overrides, [("loss.temperature", ["0.1"])], validation=0.2, select="recall@5")


@pytest.mark.parametrize("stage1", [{"recall@10": 0.0, "pair_auc": 0.45}, {"recall@10": 0.004, "pair_auc": 0.5},
                                    {"recall@10": 0.02, "pair_auc": 0.58}])
def test_balanced_score_is_neutral_at_stage1_and_bounded_near_chance(stage1):
    """A stage 1 at or below chance made the AUC side's ratio blow up (-1.2e11 for an
    untrained run, which equals stage 1) or flip sign; no recall hit divided by 1e-12."""
    from train.csft_tune import score
    assert score(stage1, stage1, "balanced") == pytest.approx(1.0)
    better = {"recall@10": stage1["recall@10"] + 0.01, "pair_auc": stage1["pair_auc"] + 0.01}
    worse = {"recall@10": stage1["recall@10"], "pair_auc": stage1["pair_auc"] - 0.01}
    assert 1.0 < score(better, stage1, "balanced") <= 2.0
    assert score(worse, stage1, "balanced") < 1.0


def test_grid_values_keep_bracketed_lists_whole():
    from mim_rec.config import ConfigError
    from train.csft_tune import parse_grid
    assert parse_grid(["loss.temperature=0.05, 0.1", "data.signals=[click],[click,purchase]"]) == [
        ("loss.temperature", ["0.05", "0.1"]), ("data.signals", ["[click]", "[click,purchase]"])]
    for bad in (["loss.temperature"], ["loss.temperature=0.1,"], ["a=1", "a=2"]):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid(bad)


def test_tune_chooses_on_validation_and_reports_the_choice_on_test(inputs, tmp_path):
    from train.csft_tune import run_tune
    out = tmp_path / "tune"
    config_file = _write_config(_config(inputs, out, steps=3, checkpoint_every=3), tmp_path / "c.yaml")
    grid = [("loss.temperature", ["0.05", "0.5"])]
    report = run_tune(str(config_file), [], grid, validation=0.25, final=True)
    trials = report["trials"]
    assert [t["settings"] for t in trials] == [["loss.temperature=0.05"], ["loss.temperature=0.5"]]
    assert report["chosen"] == max(trials, key=lambda t: t["score"])["settings"]
    for trial in trials:
        assert trial["metrics"]["held_out"] == "validation"
        saved = json.loads((out / "trials" / f"temperature-{trial['settings'][0].split('=')[1]}" / "config.json").read_text())
        assert saved["data"]["validation"] == 0.25
    final = json.loads((out / "final" / "config.json").read_text())
    assert final["data"]["validation"] == 0.0
    assert final["loss"]["temperature"] == float(report["chosen"][0].split("=")[1])
    assert report["final"]["csft"]["held_out"] == "test" and report["final"]["stage1"]["held_out"] == "test"
    table = (out / "TUNE.md").read_text()
    assert f"**{report['chosen'][0]}**" in table and "### Test" in table
    assert run_tune(str(config_file), [], grid, validation=0.25, final=True) == report  # reused, not retrained


def test_eval_refuses_a_validation_period_the_run_trained_on(inputs, tmp_path, capsys):
    """csft-eval data.validation=0.3 of a run trained on every pair scored it on its own training pairs."""
    out = tmp_path / "run"
    config = _config(inputs, out, steps=2)
    run_csft(config)
    config_file = _write_config(config, tmp_path / "c.yaml")
    assert cli.main(["csft-eval", "--config", str(config_file), "data.validation=0.3"]) == 2
    assert ("data.validation=0.3: the run in" in capsys.readouterr().err and not (out / "eval.json").exists())
    trained = replace(config, data=replace(config.data, validation=0.25), out=str(tmp_path / "valid"))
    run_csft(trained)
    with pytest.raises(ConfigError, match="data.validation=0.3: .*trained with data.validation=0.25"):
        evaluate_run(replace(trained, data=replace(trained.data, validation=0.3)))
    assert evaluate_run(replace(trained, data=replace(trained.data, validation=0.2)))["csft"]["held_out"] == "validation"


def _held_out_table(inputs, name: str, rows: Optional[str]) -> Optional[pa.Table]:
    """``inputs``' world file ``name``: left out (None), ``"empty"``, or of ``"one label"``."""
    if rows is None:
        return None
    table = pq.read_table(inputs[0] / name)
    return table.slice(0, 0) if rows == "empty" else _one_label(table)


@pytest.mark.parametrize("name, rows, validation, message", [
    ("pairs_test.parquet", None, 0.0, ": pairs file not found; the evaluation reads it (or set "
                                      "data.validation=f to evaluate on the latest share f of pairs_train)"),
    ("pairs_test.parquet", "empty", 0.0, ": holds no pairs; the query->item recall needs held-out pairs"),
    ("events_test.parquet", None, 0.0, ": held-out events not found (the content-interest AUC needs them)"),
    ("events_test.parquet", "one label", 0.0, ", field 'label': no user of its {count:,} impressions has both a "
                                              "click and a non-click with a history; the content-interest AUC is "
                                              "undefined"),
    ("events_train.parquet", None, 0.25, ": held-out events not found (the content-interest AUC needs them)")])
def test_eval_on_held_out_data_csft_eval_refuses_is_refused_before_training(inputs, tmp_path, capsys, monkeypatch,
                                                                           name, rows, validation, message):
    """csft --eval trained every step first and only then failed on a missing test file, or on
    an empty or unscorable one; it is refused up front with csft-eval's own message."""
    import train.csft

    def trained(config):
        raise AssertionError("trained before the evaluation data was checked")

    monkeypatch.setattr(train.csft, "run_csft", trained)
    table = _held_out_table(inputs, name, rows)
    world = _world_with(inputs, tmp_path / "world", name, table)
    config = _config((world, inputs[1], inputs[2]), tmp_path / "out")
    config = replace(config, data=replace(config.data, validation=validation))
    assert cli.main(["csft", "--config", str(_write_config(config, tmp_path / "c.yaml")), "--eval"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mim csft: error: {world / name}{message.format(count=0 if table is None else len(table))}")
    assert not (tmp_path / "out").exists()


def _features_only(pairs: pa.Table) -> pa.Table:
    """``pairs`` with a ``query_feature`` vector in place of each query image."""
    features = pa.array([[0.5] * 4] * len(pairs), pa.list_(pa.float32()))
    return pairs.drop_columns(["query_image"]).append_column("query_feature", features)


def _bad_image(pairs: pa.Table) -> pa.Table:
    """``pairs`` with row 1's query image bytes that decode to nothing."""
    images = pairs.column("query_image").to_pylist()
    images[1] = b"not an image"
    return pairs.set_column(pairs.column_names.index("query_image"), "query_image", pa.array(images, pa.binary()))


def _with_features(pairs: pa.Table, row: Optional[int] = None, vector: Optional[list] = None,
                   length: int = 4) -> pa.Table:
    """``pairs`` with a ``query_feature`` vector of ``length`` beside each query image, and
    ``vector`` (None: null) in ``row`` when given."""
    features = [[0.5] * length for _ in range(len(pairs))]
    if row is not None:
        features[row] = vector
    return pairs.append_column("query_feature", pa.array(features, pa.list_(pa.float32())))


def _feature_null_beside_image(pairs: pa.Table) -> pa.Table:
    """``pairs`` with a query_feature in every row but row 1, which keeps its query image only."""
    return _with_features(pairs, row=1)


def _features_longer_than_the_tower(pairs: pa.Table) -> pa.Table:
    """``pairs`` whose query images are replaced by 8-long query_feature vectors in every row."""
    return _with_features(pairs, length=8).drop_columns(["query_image"])


def _feature_not_finite(pairs: pa.Table) -> pa.Table:
    """``pairs`` with query_feature vectors only, row 1's holding a NaN."""
    return _with_features(pairs, row=1, vector=[0.5, float("nan"), 0.5, 0.5]).drop_columns(["query_image"])


def _image_null_beside_feature(pairs: pa.Table) -> pa.Table:
    """``pairs`` with a query_feature in every row and a query_image_path column of nulls, row 1's
    query image null: the row has no image for a pixel tower."""
    images = pairs.column("query_image").to_pylist()
    images[1] = None
    pairs = pairs.set_column(pairs.column_names.index("query_image"), "query_image", pa.array(images, pa.binary()))
    return _with_features(pairs).append_column("query_image_path", pa.nulls(len(pairs), pa.string()))


def _image_path_to_no_file(pairs: pa.Table) -> pa.Table:
    """``pairs`` with a query_image_path column naming a file that does not exist in row 1."""
    paths = [None] * len(pairs)
    paths[1] = "no-such-image.png"
    return pairs.append_column("query_image_path", pa.array(paths, pa.string()))


def test_a_query_feature_the_tower_refuses_is_named_by_its_column(inputs, tmp_path):
    """The precomputed tower's reader named a pairs file's refused query feature 'image_feature',
    a column pairs do not have."""
    from mim_rec.csft.data import read_query_inputs
    from mim_rec.data.errors import DataError
    from mim_rec.encoders.vision import PrecomputedVisionEncoder

    path = tmp_path / "pairs_test.parquet"
    pq.write_table(_feature_null_beside_image(pq.read_table(inputs[0] / "pairs_test.parquet")), path)
    items = pq.read_metadata(inputs[0] / "items.parquet").num_rows
    with pytest.raises(DataError) as refused:
        read_query_inputs(path, items, PrecomputedVisionEncoder(VisionConfig(name="precomputed", feature_dim=4)))
    assert str(refused.value) == f"{path}, row 1, field 'query_feature': missing feature vector"


def _give_items_features(inputs, world: Path) -> None:
    """Give ``world``'s items (``inputs``' items) an image_feature vector a 4-d precomputed tower
    reads: their images are checked before the pairs' queries."""
    items = pq.read_table(inputs[0] / "items.parquet")
    (world / "items.parquet").unlink()
    pq.write_table(items.append_column("image_feature", pa.array([[0.5] * 4] * len(items), pa.list_(pa.float32()))),
                   world / "items.parquet")


def _precomputed_stage1(folder: Path) -> Path:
    """Stage-1 encoders whose vision tower is 'precomputed' with feature_dim=4."""
    save_encoders(folder, EncoderPair(EncodersConfig(vision=VisionConfig(name="precomputed", feature_dim=4),
                                                     text=tiny_text(), shared_dim=8)))
    return folder


@pytest.mark.parametrize("vision, rewrite, message", [
    ("pixel", _features_only, ", field 'query_image': no 'query_image' or 'query_image_path' column; use "
                              "vision.name=precomputed for pairs with only query_feature"),
    ("precomputed", None, ", field 'query_feature': no 'query_feature' column; the vision encoder is 'precomputed'"),
    ("pixel", _bad_image, ", row 1, field 'query_image': image bytes not decodable (PNG/JPEG) (value: 12 bytes "
                          "b'not an image')"),
    ("precomputed", _feature_null_beside_image, ", row 1, field 'query_feature': null: the pair has no query "
                                                "feature, which the vision encoder 'precomputed' reads"),
    ("precomputed", _features_longer_than_the_tower, ", row 0, field 'query_feature': a vector of length 8; the "
                                                     "vision encoder 'precomputed' reads feature_dim=4"),
    ("precomputed", _feature_not_finite, ", row 1, field 'query_feature': NaN or infinite value (value: "
                                         "[0.5, nan, 0.5, 0.5])"),
    ("pixel", _image_null_beside_feature, ", row 1, field 'query_image|query_image_path': null: the pair has no "
                                          "query image, which the vision encoder 'convnext_atto' reads"),
    ("pixel", _image_path_to_no_file, ", row 1, field 'query_image_path': image path missing or not decodable "
                                      "(value: 'no-such-image.png')")],
    ids=["pixel tower, features only", "precomputed tower, images only", "bad image",
         "precomputed tower, a null feature beside an image", "precomputed tower, features of another length",
         "precomputed tower, a NaN feature", "pixel tower, a null image beside a feature",
         "pixel tower, a path to no file"])
def test_eval_on_test_pairs_the_query_tower_cannot_read_is_refused_before_training(inputs, tmp_path, capsys,
                                                                                   monkeypatch, vision, rewrite,
                                                                                   message):
    """csft --eval read the test pairs' query images (or precomputed features) only to evaluate,
    after training: pairs without the column the stage-1 vision tower reads, or with a row whose
    query that tower cannot read (null in its column, a feature of another length than its
    feature_dim), are refused up front, by file, row and field (a bad image, a NaN feature or a
    path to no file was, by the pairs file's validation)."""
    import train.csft

    def trained(config):
        raise AssertionError("trained before the evaluation data was checked")

    monkeypatch.setattr(train.csft, "run_csft", trained)
    stage1 = _precomputed_stage1(tmp_path / "stage1") if vision == "precomputed" else inputs[1]
    pairs = pq.read_table(inputs[0] / "pairs_test.parquet")
    world = _world_with(inputs, tmp_path / "world", "pairs_test.parquet", rewrite(pairs) if rewrite else pairs)
    if vision == "precomputed":
        _give_items_features(inputs, world)
    config = _config((world, stage1, inputs[2]), tmp_path / "out")
    assert cli.main(["csft", "--config", str(_write_config(config, tmp_path / "c.yaml")), "--eval"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mim csft: error: {world / 'pairs_test.parquet'}{message}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("vision, rewrite, message", [
    ("pixel", _features_only, ", field 'query_image': no 'query_image' or 'query_image_path' column; use "
                              "vision.name=precomputed for pairs with only query_feature"),
    ("pixel", _image_null_beside_feature, ", row 1, field 'query_image|query_image_path': null: the pair has no "
                                          "query image, which the vision encoder 'convnext_atto' reads"),
    ("precomputed", _features_longer_than_the_tower, ", row 0, field 'query_feature': a vector of length 8; the "
                                                     "vision encoder 'precomputed' reads feature_dim=4")],
    ids=["pixel tower, features only", "pixel tower, a null image beside a feature",
         "precomputed tower, features of another length"])
def test_training_pairs_the_query_tower_cannot_read_are_refused_before_the_encoders_load(inputs, tmp_path, capsys,
                                                                                        monkeypatch, vision,
                                                                                        rewrite, message):
    """mim csft read the training pairs' queries only after the stage-1 encoders had loaded and
    every item's backbone features were extracted; pairs the query tower cannot read are refused
    before, as the evaluation's are."""
    import mim_rec.encoders

    def loaded(directory):
        raise AssertionError("encoders loaded before the training pairs were checked")

    monkeypatch.setattr(mim_rec.encoders, "load_encoders", loaded)
    stage1 = _precomputed_stage1(tmp_path / "stage1") if vision == "precomputed" else inputs[1]
    world = _world_with(inputs, tmp_path / "world", "pairs_train.parquet",
                        rewrite(pq.read_table(inputs[0] / "pairs_train.parquet")))
    if vision == "precomputed":
        _give_items_features(inputs, world)
    config = _config((world, stage1, inputs[2]), tmp_path / "out")
    assert cli.main(["csft", "--config", str(_write_config(config, tmp_path / "c.yaml"))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"mim csft: error: {world / 'pairs_train.parquet'}{message}")
    assert not (tmp_path / "out").exists()


def test_training_refuses_a_train_runs_folder(inputs, tmp_path):
    """mim csft looked only for its own checkpoint files: it rewrote a CiUBM run's config.json
    and trimmed its metrics.jsonl, and the run no longer evaluated."""
    out = tmp_path / "ctr"
    (out / "checkpoints" / "step-000000004").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"model": {}, "loader": {}, "epochs": 1, "data": {}, "id_lr": 0.1}))
    with pytest.raises(ConfigError, match=r"holds checkpoints/step-000000004, which is not a `mim csft` run's"):
        run_csft(_config(inputs, out))
    (out / "checkpoints" / "step-000000004").rmdir()
    with pytest.raises(ConfigError, match=r"its config.json is a `mim train` run's, not a `mim csft` run's "
                                          r"\(settings epochs, id_lr, loader\)"):
        run_csft(_config(inputs, out))
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoints", "config.json"]  # nothing written


def _one_category_inputs(inputs, folder: Path):
    """``inputs`` with a world whose items are all in one category."""
    world = generate_world(replace(tiny(SynthConfig(seed=3)), items=40, categories=1, users=5, events=400,
                                   pairs_train=50, pairs_test=10, image_size=32), folder)
    return (world, *inputs[1:])


def test_category_ce_on_one_category_is_refused_and_left_out_of_the_ablations(inputs, tmp_path, capsys):
    """A softmax over one category is a loss of 0: category_ce "trained" nothing and its Table-4
    row was the initial towers, scored as a variant."""
    from train.csft_ablations import run_ablations
    one_category = _one_category_inputs(inputs, tmp_path / "world")
    world = one_category[0]
    config = replace(_config(one_category, tmp_path / "run", steps=2, checkpoint_every=2),
                     loss=LossConfig(kind="category_ce"))
    with pytest.raises(ConfigError, match=f"loss.kind=category_ce: every item of data.world={world} is in one "
                                          "category, so the category loss is 0 and nothing trains"):
        run_csft(config)
    assert not (tmp_path / "run" / "checkpoints").exists()
    capsys.readouterr()
    report = run_ablations(_write_config(_config(one_category, tmp_path / "abl"), tmp_path / "c.yaml"), [],
                           ["category_ce"])
    assert "category_ce" not in report and "stage1" in report
    assert "note: variant category_ce not run: loss.kind=category_ce: every item" in capsys.readouterr().err


def test_tune_refuses_category_ce_on_one_category_before_any_run_trains(inputs, tmp_path):
    """The grid point was refused only when its run started, after the points before it had trained."""
    from train.csft_tune import run_tune
    one_category = _one_category_inputs(inputs, tmp_path / "world")
    out = tmp_path / "tune"
    config_file = _write_config(_config(one_category, out, steps=2, checkpoint_every=2), tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"--grid point loss.kind=category_ce: loss.kind=category_ce: every item "
                                          r"of data.world=.* is in one category"):
        run_tune(str(config_file), [], [("loss.kind", ["infonce", "category_ce"])], validation=0.25)
    assert not out.exists()  # neither the stage-1 pass nor the infonce run


def test_ablations_refuse_a_base_batch_the_pairs_cannot_fill_before_any_variant_trains(inputs, tmp_path,
                                                                                      monkeypatch):
    """Each variant was refused only when its own run started, after the stage-1 pass; a
    variant whose own data.signals leave too few pairs is left out with a note instead, as
    category_ce on one category is."""
    import train.csft_runs
    from train.csft_ablations import run_ablations

    def trained(*args, **kwargs):
        raise AssertionError("a variant trained before the too-large batch was refused")

    monkeypatch.setattr(train.csft_runs, "stage1_result", trained)
    config_file = _write_config(_config(inputs, tmp_path / "abl"), tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"data.batch_size=100000: only \d+ training pairs of data.signals="):
        run_ablations(str(config_file), ["data.batch_size=100000"], ["full", "no_tfn"])


def _no_run_reached(monkeypatch) -> None:
    """Make csft-tune's and csft-ablations' stage-1 pass and C-SFT runs fail if reached."""
    import train.csft_runs

    def reached(*args, **kwargs):
        raise AssertionError("the stage-1 pass or a run started before the held-out data was checked")

    for name in ("stage1_result", "csft_result"):
        monkeypatch.setattr(train.csft_runs, name, reached)


@pytest.mark.parametrize("name, rows, final, message", [
    ("pairs_test.parquet", None, True, ": pairs file not found; the evaluation reads it (or set data.validation=f "
                                       "to evaluate on the latest share f of pairs_train)"),
    ("events_test.parquet", "one label", True, ", field 'label': no user of its {count:,} impressions has both a "
                                               "click and a non-click with a history; the content-interest AUC is "
                                               "undefined"),
    ("events_train.parquet", None, False, ": held-out events not found (the content-interest AUC needs them)")],
    ids=["final, no pairs_test", "final, events_test of one label", "no events_train"])
def test_tune_refuses_held_out_data_it_cannot_score_before_any_run(inputs, tmp_path, monkeypatch, name, rows, final,
                                                                   message):
    """csft-tune --final read the test files only after every grid point had trained, and an
    unscorable validation split was found after the stage-1 pass; both are refused up front,
    with csft-eval's messages. Without --final the test files are not csft-tune's to check."""
    from mim_rec.data.errors import DataError
    from train.csft_tune import run_tune

    _no_run_reached(monkeypatch)
    table = _held_out_table(inputs, name, rows)
    world = _world_with(inputs, tmp_path / "world", name, table)
    out = tmp_path / "tune"
    config_file = _write_config(_config((world, inputs[1], inputs[2]), out), tmp_path / "c.yaml")
    grid = [("loss.temperature", ["0.05", "0.5"])]
    with pytest.raises(DataError) as refused:
        run_tune(str(config_file), [], grid, validation=0.25, final=final)
    assert str(refused.value) == f"{world / name}{message.format(count=0 if table is None else len(table))}"
    assert not out.exists()
    if final:
        with pytest.raises(AssertionError, match="the stage-1 pass"):
            run_tune(str(config_file), [], grid, validation=0.25)


@pytest.mark.parametrize("name, rewrite, message", [
    ("events_test.parquet", _one_label, ", field 'label': no user of its {count:,} impressions has both a click and "
                                        "a non-click with a history; the content-interest AUC is undefined"),
    ("pairs_test.parquet", _features_only, ", field 'query_image': no 'query_image' or 'query_image_path' column; "
                                           "use vision.name=precomputed for pairs with only query_feature"),
    ("pairs_train.parquet", _image_null_beside_feature, ", row 1, field 'query_image|query_image_path': null: the "
                                                        "pair has no query image, which the vision encoder "
                                                        "'convnext_atto' reads")],
    ids=["events_test of one label", "pairs_test without query images", "pairs_train with a null query image"])
def test_ablations_refuse_held_out_data_they_cannot_score_before_the_stage1_pass(inputs, tmp_path, monkeypatch, name,
                                                                                rewrite, message):
    """An unscorable events_test, or test pairs without the query column the stage-1 vision
    tower reads, was found only in the stage-1 pass (every feature extracted); training pairs
    with a query that tower cannot read, only when the first variant trained, after that pass."""
    from mim_rec.data.errors import DataError
    from train.csft_ablations import run_ablations

    _no_run_reached(monkeypatch)
    table = rewrite(pq.read_table(inputs[0] / name))
    world = _world_with(inputs, tmp_path / "world", name, table)
    out = tmp_path / "abl"
    config_file = _write_config(_config((world, inputs[1], inputs[2]), out), tmp_path / "c.yaml")
    with pytest.raises(DataError) as refused:
        run_ablations(str(config_file), [], ["full"])
    assert str(refused.value) == f"{world / name}{message.format(count=len(table))}"
    assert not out.exists()
