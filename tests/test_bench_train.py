"""``mim bench train``: the quick mode prints every ratio column and writes them as JSON; the
nn.Embedding reference is the same model as the TorchRec CiUBM (same weights -> same logits)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace

import pytest
import torch

from train.bench_reference import reference_model, torchrec_weights
from train.bench_train import VARIANTS, TrainBenchConfig, _process_group, build_torchrec, mm_vectors, synthetic_batches
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


def test_building_a_bench_model_allocates_its_mm_table_once():
    """The fill source was a full fp32 copy of the table made inside TorchRec's memory window
    (the reference's came from outside its own), and the fill padded the whole shard at once:
    Base+MIM's peak counted the table three times. The profiler sees each allocation."""
    from torch.profiler import ProfilerActivity, profile

    config = replace(TrainBenchConfig.quick(), items=200_000, mm_dim=32)
    sizes = {"items": config.items, "users": config.users, "categories": config.categories}
    vectors = mm_vectors(config, sizes)
    model_config = replace(config.model, ubm="avg", mm_dim=config.mm_dim, **VARIANTS["Base+MIM"])
    with _process_group("cpu") as ctx:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model, _ = build_torchrec(config, model_config, sizes, ctx, vectors)
        table = next(t for name, t in model.state_dict().items() if name.endswith("mm_item.weight"))
        assert torch.equal(table.local_shards()[0].tensor if hasattr(table, "local_shards") else table, vectors)
    allocations = [event.cpu_memory_usage for event in prof.events()
                   if event.name in ("aten::empty", "aten::empty_strided")
                   and event.cpu_memory_usage >= vectors.nbytes]
    assert allocations == [vectors.nbytes]  # the table's own storage, nothing more


@pytest.mark.parametrize("ubm, mm_dim", [("din", None), ("dien", None), ("sim", None), ("din", 6)])
def test_reference_computes_the_torchrec_models_logits(ubm, mm_dim):
    """mm_dim=6: TorchRec stores the table 8 wide (FBGEMM's alignment); the copy into the
    6-wide reference was a size-mismatch traceback."""
    config = TrainBenchConfig.quick()
    config = replace(config, mm_dim=mm_dim or config.mm_dim)
    sizes = {"items": config.items, "users": config.users, "categories": config.categories}
    batch = synthetic_batches(replace(config, distinct_batches=1))[0]
    model_config = replace(config.model, ubm=ubm, mm_dim=config.mm_dim, **VARIANTS["Base+MIM"])
    with _process_group("cpu") as ctx:
        model, _ = build_torchrec(config, model_config, sizes, ctx, mm_vectors(config, sizes))
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


def _small_world(folder, items: int, users: int):
    """A world folder of ``items`` items and one event per user (no events files for none)."""
    import pyarrow as pa

    from mim_rec.data.io import write_table
    from mim_rec.data.schemas import EVENTS
    from tests.encoder_fixtures import write_items

    write_items(folder / "items.parquet", count=items)
    if users:
        empty = [[]] * users
        events = pa.table({"user_id": range(users), "query": [""] * users, "target_item_id": [0] * users,
                           "label": [u % 2 for u in range(users)], "ts": [100] * users, "hist_item_ids": empty,
                           "hist_category_ids": empty, "hist_ts": empty}, schema=EVENTS.schema_for([]))
        for split in ("train", "test"):
            write_table(events, folder / f"events_{split}.parquet", EVENTS, item_count=items)
    return folder


@pytest.mark.parametrize("items, users, message", [
    # numpy's 'high <= 0' traceback, drawing the batches' users
    (3, 0, "its events name no user (events_train/events_test.parquet missing or empty)"),
    # refused after the first models were built, as whitening 'a collapsed encoder' (of random rows)
    (1, 2, "holds 1 item: Base+MIM whitens its MM table (model.mm_whiten=16), which needs 2 items or more"),
])
def test_a_world_too_small_for_the_models_is_refused_before_any_is_built(tmp_path, capsys, monkeypatch,
                                                                         items, users, message):
    import train.bench_train

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the world was refused")

    monkeypatch.setattr(train.bench_train, "_process_group", built)
    world = _small_world(tmp_path, items, users)
    assert main(["bench", "train", "--quick", f"world={world}", "ubms=[avg]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mim bench train: error: world={world}") and message in err and "\n" not in err


@pytest.mark.parametrize("override, message", [
    ("ubms=[]", r"ubms=[]: choose one or more of"),
    ("ubms=[dinn]", r"ubms=['dinn']: choose one or more of"),
    ("hist_len=0", "hist_len=0: must be positive"),
    # numpy's 'high <= 0' from the synthetic tables, naming no setting
    ("items=0", "items=0: must be positive"), ("users=-1", "users=-1: must be positive"),
    ("categories=0", "categories=0: must be positive"),
    # the second din's Base overwrote the first's in the MIM/Base ratios
    ("ubms=[din,avg,din]", "ubms=['din', 'avg', 'din']: each may appear once"),
    # TorchRec's multi-line AssertionError from the sharder, as mim train refuses it in one line
    ("model.user_dim=6", "model.user_dim=6: FBGEMM's embedding kernels need a multiple of 4"),
    # only the first UBM was checked: bst refused din's options after din's rounds had run
    ("ubms=[din,bst]", "for bst: "),
    # a dim of 0 passed the alignment check: TorchRec's planner divided by zero; numpy refused seed=-1
    ("model.item_dim=0", "model.item_dim=0: must be positive"),
    ("model.dien_aux_weight=-1", "model.dien_aux_weight=-1.0: must not be negative"),  # mim train refuses it
    ("seed=-1", "seed=-1: must not be negative"),
    # set by the bench for every model it times: these were overwritten without a word
    ("model.ubm=sim", "model.ubm=sim: mim bench train sets it; it is set by ubms="),
    ("model.mm_dim=16", "model.mm_dim=16: mim bench train sets it; it is set by mm_dim="),
    ("model.content_interest=false", "model.content_interest=False: mim bench train sets it; it is set by the "
                                     "variants (Base: off, Base+MIM: on)"),
    # the planner's traceback after the process group was up, as mim train refuses it in one line
    pytest.param("model.constraints.item.sharding_types=[row_wise]", "row-wise sharding needs CUDA",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="row-wise is offered on CUDA")),
])
def test_settings_that_cannot_run_are_refused_in_one_line(capsys, override, message):
    """ubms=[] used to end in an IndexError, hist_len=0 in numpy's 'low >= high'."""
    options = ["model.ubm_options={attention_hidden: [16]}"] if override == "ubms=[din,bst]" else []
    assert main(["bench", "train", "--quick", override, *options]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("threads", ["0", "-1"])
def test_threads_must_be_positive(capsys, threads):
    """threads=-1 ended in torch's 'set_num_threads expects a positive integer'; 0 passed silently."""
    assert main(["bench", "train", "--quick", f"threads={threads}"]) == 2
    assert f"threads={threads}: must be positive" in capsys.readouterr().err


def test_round_summary_gives_the_median_and_the_spread():
    from train.bench_train import round_summary

    summary = round_summary([300.0, 100.0, 200.0])
    assert summary == {"samples_per_s": 200.0, "rounds": [300.0, 100.0, 200.0], "spread": 1.0}
    assert round_summary([84.0, 3225.0, 3000.0, 3100.0])["samples_per_s"] == 3050.0
    assert round_summary([50.0])["spread"] is None  # one round shows no spread


def test_all_four_models_of_a_ubm_are_timed_interleaved(monkeypatch):
    """Each round runs every model once, the order rotated a round; the median round counts,
    so a load spike in one round moves no model's figure."""
    from train import bench_train

    calls = []
    seconds = {"Base-TR": [1.0, 1.0, 50.0], "Base-ref": [2.0, 2.0, 2.0],   # a spike in Base-TR's 3rd round
               "MIM-TR": [4.0, 1.0, 2.0], "MIM-ref": [1.0, 1.0, 1.0]}

    class Model:
        def __init__(self, name):
            self.name = name

        def train(self, mode):
            pass

    monkeypatch.setattr(bench_train, "_work", lambda mode, model, step, aux: (mode, model.name))
    monkeypatch.setattr(bench_train, "_seconds", lambda work, batches, steps, device: (
        calls.append(work), seconds[work[1]][sum(c == work for c in calls) - 1])[1])
    config = replace(TrainBenchConfig.quick(), steps=2, rounds=3, batch_size=10)
    result = bench_train.interleaved_throughput({name: (Model(name), None) for name in seconds}, [], config,
                                                torch.device("cpu"))
    names = list(seconds)
    train_calls = [name for mode, name in calls if mode == "train"]
    assert train_calls == names + names[1:] + names[:1] + names[2:] + names[:2]
    assert [name for mode, name in calls if mode == "infer"] == train_calls
    base = result["Base-TR"]
    assert base["train_rounds"] == [20.0, 20.0, 0.4]             # 2 steps x 10 samples / seconds
    assert base["train_samples_per_s"] == 20.0                   # the spike is outvoted
    assert base["train_spread"] == pytest.approx((20.0 - 0.4) / 20.0)
    assert result["MIM-TR"]["train_samples_per_s"] == 10.0 and result["Base-ref"]["infer_spread"] == 0.0


def _fake_row(ubm, variant, train_tr_rounds):
    from train.bench_train import round_summary

    row = {"ubm": ubm, "variant": variant, "dense_flops_per_sample": 1e5}
    for impl, rounds in (("torchrec", train_tr_rounds), ("reference", [100.0, 110.0, 105.0])):
        row[impl] = {"peak_memory_bytes": 2**20}
        for mode in ("train", "infer"):
            summary = round_summary(rounds if mode == "train" else [100.0, 100.0, 100.0])
            row[impl].update({f"{mode}_samples_per_s": summary["samples_per_s"], f"{mode}_rounds": summary["rounds"],
                              f"{mode}_spread": summary["spread"]})
    return row


def test_a_row_with_a_wide_spread_is_printed_with_a_warning():
    from train.bench_train import SPREAD_WARNING, format_table, ratios

    rows = [_fake_row("din", "Base", [84.0, 3225.0, 3100.0]), _fake_row("din", "Base+MIM", [3000.0, 3225.0, 3100.0])]
    config = {**asdict(TrainBenchConfig.quick()), "ubms": ["din"]}
    out = format_table({"config": config, "sizes": {"items": 1, "users": 1, "categories": 1}, "device": "cpu",
                        "threads": 1, "memory_kind": "fake", "rows": rows, "ratios": ratios(rows)})
    lines = out.splitlines()
    assert "median of 3 interleaved rounds (a UBM's 4 models in turn) of 1 timed step after" in lines[0]
    header = next(line for line in lines if line.startswith("ubm "))
    assert header.rstrip().endswith("| spread")
    base, mim = (next(line for line in lines if line.startswith(f"din   {v} ")) for v in ("Base", "Base+MIM"))
    assert base.split("|")[-1].strip() == f"{(3225 - 84) / 3100:.0%}"
    assert mim.split("|")[-1].strip() == "10%"  # the row's largest: the reference's 100..110 round, not TR's 7%
    warnings = [line for line in lines if line.startswith("warning:")]
    assert SPREAD_WARNING == 0.5 and len(warnings) == 1
    assert warnings[0].startswith("warning: din Base: rounds differ by more than 50%") and "train/s TR 84..3,225" in \
        warnings[0]
