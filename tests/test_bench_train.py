"""``mim bench train``: the quick mode prints every ratio column and writes them as JSON; the
nn.Embedding reference is the same model as the TorchRec CiUBM (same weights -> same logits)."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from train.bench_train import (VARIANTS, TrainBenchConfig, _process_group, build_torchrec, reference_model,
                               synthetic_batches, torchrec_weights)
from train.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_mode_prints_ratios_side_by_side(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    code = main(["bench", "train", "--quick", "--json", str(out_json), "ubms=[avg,sim]"])
    out = capsys.readouterr().out
    assert code == 0, out
    header = next(line for line in out.splitlines() if line.startswith("ubm "))
    for column in ("train/s TR", "infer/s TR", "mem TR", "TR/ref", "MIM/Base train"):
        assert column in header
    rows = {tuple(line.split()[:2]): line for line in out.splitlines() if re.match(r"^(avg|sim)\s+Base", line)}
    assert set(rows) == {(u, v) for u in ("avg", "sim") for v in VARIANTS}
    assert len(re.findall(r"\d+\.\d+x", rows[("sim", "Base+MIM")])) == 6  # 3 TR/ref + 3 MIM/Base
    assert len(re.findall(r"\d+\.\d+x", rows[("sim", "Base")])) == 3

    result = json.loads(out_json.read_text())
    assert [(r["ubm"], r["variant"]) for r in result["rows"]] == [
        ("avg", "Base"), ("avg", "Base+MIM"), ("sim", "Base"), ("sim", "Base+MIM")]
    for row, ratio in zip(result["rows"], result["ratios"]):
        for impl in ("torchrec", "reference"):
            assert row[impl]["train_samples_per_s"] > 0 and row[impl]["infer_samples_per_s"] > 0
        assert ratio["torchrec_over_reference"]["train_samples_per_s"] == pytest.approx(
            row["torchrec"]["train_samples_per_s"] / row["reference"]["train_samples_per_s"])
        assert row["dense_flops_per_sample"] > 0
    mim, base = result["rows"][3], result["rows"][2]
    assert mim["dense_flops_per_sample"] > base["dense_flops_per_sample"]  # content + fusion interest add work
    assert result["ratios"][3]["mim_over_base"]["torchrec"]["infer_samples_per_s"] == pytest.approx(
        mim["torchrec"]["infer_samples_per_s"] / base["torchrec"]["infer_samples_per_s"])


@pytest.mark.parametrize("ubm", ["din", "dien", "sim"])
def test_reference_computes_the_torchrec_models_logits(ubm):
    config = TrainBenchConfig.quick()
    sizes = {"items": config.items, "users": config.users, "categories": config.categories}
    batch = synthetic_batches(replace(config, distinct_batches=1))[0]
    model_config = replace(config.model, ubm=ubm, mm_dim=config.mm_dim, **VARIANTS["Base+MIM"])
    with _process_group("cpu") as ctx:
        model, _ = build_torchrec(config, model_config, sizes, ctx)
        reference = reference_model(model_config, sizes, torchrec_weights(model), ctx.device)
        model.eval()
        reference.eval()
        with torch.no_grad():
            expected, expected_aux = model(batch)
            logits, aux = reference(batch)
    assert logits.shape == (config.batch_size,)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (aux is None) == (expected_aux is None)
    # the copy is what makes them equal: a differently initialised table changes the logits
    weights = torchrec_weights(model)
    weights["sparse_arch.mm"] = torch.randn_like(weights["sparse_arch.mm"])
    other = reference_model(model_config, sizes, weights, torch.device("cpu")).eval()
    with torch.no_grad():
        assert not torch.allclose(other(batch)[0], expected, atol=1e-5)


def test_world_folder_sets_the_table_sizes(tmp_path, capsys):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mim_rec.data.synth import SynthConfig, generate_world, tiny

    world = generate_world(tiny(SynthConfig(seed=3)), tmp_path / "world")
    items = pq.read_table(world / "items.parquet", columns=["category_id"])
    users = max(int(pc.max(pq.read_table(world / f"events_{split}.parquet", columns=["user_id"])["user_id"]).as_py())
                for split in ("train", "test")) + 1
    categories = int(pc.max(items["category_id"]).as_py()) + 1
    assert main(["bench", "train", "--quick", f"world={world}", "ubms=[avg]", "flops=false"]) == 0
    out = capsys.readouterr().out
    assert f"sizes: {items.num_rows:,} items, {users:,} users, {categories} categories;" in out


@pytest.mark.parametrize("override, message", [("ubms=[]", r"ubms=[]: choose one or more of"),
                                               ("ubms=[dinn]", r"ubms=['dinn']: choose one or more of"),
                                               ("hist_len=0", "hist_len=0: must be positive")])
def test_settings_that_cannot_run_are_refused_in_one_line(capsys, override, message):
    """ubms=[] used to end in an IndexError, hist_len=0 in numpy's 'low >= high'."""
    assert main(["bench", "train", "--quick", override]) == 2
    assert message in capsys.readouterr().err
