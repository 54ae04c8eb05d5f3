"""Settings that cannot run are refused by key, before a model, world or feature is loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import pytest
import torch

from conftest import REPO
from mim_rec.config import ConfigError, require_not_negative, require_positive
from train.ciubm import load_train_config
from train.cli import main as mim


@dataclass
class _Inner:
    size: int = 4


@dataclass
class _Outer:
    steps: int = 1
    limit: Optional[int] = None
    inner: _Inner = field(default_factory=_Inner)


@dataclass
class _Seeds:
    seeds: List[int] = field(default_factory=list)


def test_require_positive_names_the_dotted_key_and_lets_unset_pass():
    require_positive(_Outer(), ("steps", "limit", "inner.size"))  # None = not set
    with pytest.raises(ConfigError, match=r"inner.size=0: must be positive"):
        require_positive(_Outer(inner=_Inner(size=0)), ("steps", "inner.size"))
    with pytest.raises(ConfigError, match=r"limit=-2: must be positive"):
        require_positive(_Outer(limit=-2), ("limit",))


def test_a_list_setting_has_each_item_checked_and_named():
    """bench peer checked its seeds by a loop of its own; the shared checks now read a list."""
    require_not_negative(_Seeds(seeds=[0, 3]), ("seeds",))
    with pytest.raises(ConfigError, match=r"^seeds\[1\]=-2: must not be negative$"):
        require_not_negative(_Seeds(seeds=[0, -2]), ("seeds",))
    with pytest.raises(ConfigError, match=r"^run.seeds\[0\]=0: must be positive$"):
        require_positive(_Seeds(seeds=[0]), ("seeds",), prefix="run.")


@pytest.mark.parametrize("command, override, key", [
    ("pretrain", "data.batch_size=0", "data.batch_size=0"),
    ("pretrain", "log_every=0", "log_every=0"),
    ("csft", "steps=0", "steps=0"),
    ("csft", "loss.temperature=0", "loss.temperature=0.0"),
    ("csft", "checkpoint_every=-1", "checkpoint_every=-1"),
    ("csft", "model.fusion.hidden=0", "model.fusion.hidden=0"),
    ("pretrain", "encoders.shared_dim=0", "encoders.shared_dim=0"),
    ("pretrain", "encoders.vision.image_size=0", "encoders.vision.image_size=0"),
    ("pretrain", "encoders.text.max_length=0", "encoders.text.max_length=0"),
    ("pretrain", "eval.probe_lr=nan", "eval.probe_lr=nan"),
])
def test_stage_commands_refuse_non_positive_settings(tmp_path, capsys, command, override, key):
    # The world folder does not exist: the refusal must come before anything reads it.
    assert mim([command, f"data.world={tmp_path / 'absent'}", f"out={tmp_path / 'out'}", override]) == 2
    assert f"mim {command}: error: {key}: must be positive" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, message", [
    ("model.ubm_options.foo=1", r"model.ubm_options=\{'foo': 1\} for din: .*unexpected keyword argument 'foo'"),
    ("model.ubm=bst model.ubm_options.num_heads=5", r"model.ubm_options=\{'num_heads': 5\} for bst"),
    ("model.ubm=bst model.ubm_options.dropout=1.5", r"model.ubm_options=\{'dropout': 1.5\} for bst"),
    ("model.over_arch=[16,0]", r"model.over_arch\[1\]=0: must be positive"),
    ("model.constraints.nosuch.sharding_types=[row_wise]", r"model.constraints.nosuch: no such table; the tables "
                                                           r"are user, query_word, item, category, mm_item"),
    ("model.constraints.item.sharding_types=[bogus]", r"model.constraints.item.sharding_types=\['bogus'\]: "
                                                      r"choose from column_wise, .*row_wise"),
    ("model.constraints.item.compute_kernels=[turbo]", r"model.constraints.item.compute_kernels=\['turbo'\]"),
    ("lr=nan", r"lr=nan: must be positive"),
    ("model.id_interest=false model.content_interest=false model.fusion_interest=false",
     r"model.id_interest, model.content_interest and model.fusion_interest are all false"),
    ("model.ubm=sim model.ubm_options.top_k=2.5", r"for sim: top_k=2.5: must be a positive integer"),
    ("model.ubm=twin model.ubm_options.top_k=2.5", r"for twin: top_k=2.5: must be a positive integer"),
    ("model.ubm=bst model.ubm_options.num_layers=0", r"for bst: num_layers=0: must be a positive integer"),
    ("model.ubm_options.normalize='no'", r"for din: normalize='no': must be true or false"),
    ("model.ubm_options.attention_hidden=[0]", r"for din: attention_hidden=\[0\]: must be a list of positive"),
    ("model.ubm_options.attention_hidden=[-3]", r"for din: attention_hidden=\[-3\]: must be a list of positive"),
    ("model.ubm=bst model.ubm_options.ffn_dim=-4", r"for bst: ffn_dim=-4: must be a positive integer"),
    ("device=cpu model.constraints.mm_item.sharding_types=[row_wise]",
     r"model.constraints.mm_item.sharding_types=\['row_wise'\]: .* on cpu; row-wise sharding needs CUDA"),
    # the loader's hash range was dropped for the model's without a word
    ("loader.query_buckets=50000", r"loader.query_buckets=50000: .* set model.query_buckets \(now 20000\) instead"),
    ("loader.query_buckets=0", r"loader.query_buckets=0: "),
    ("loader.sequence_layout=ec", r"loader.sequence_layout=ec: .* set model.sequence_layout \(now ebc\) instead"),
    ("device=cpu model.constraints.item.sharding_types=[table_row_wise]",
     r"model.constraints.item.sharding_types=\['table_row_wise'\]: .* on cpu; row-wise sharding needs CUDA"),
    # TorchRec's generator put the whole 12-wide MM table on rank 0 (or raised, 256 over 3 ranks)
    ("model.mm_dim=10 model.constraints.mm_item.sharding_types=[column_wise] model.constraints.mm_item.ranks=[0,1]",
     r"model.constraints.mm_item.ranks=\[0, 1\]: column_wise .* 12 stored columns, .* over 2 ranks; pin it over 3 ranks"),
    ("model.mm_dim=256 model.constraints.mm_item.sharding_types=[column_wise] model.constraints.mm_item.ranks=[0,1,2]",
     r"model.constraints.mm_item.ranks=\[0, 1, 2\]: column_wise .* 256 stored columns, .* over 3 ranks"),
])
def test_model_shapes_that_would_fail_inside_torch_are_refused_by_key(tmp_path, override, message):
    """These used to fail after the process group was up (a UBM's constructor or first step,
    CiUBM's constructor, TorchRec's enumerator or planner, torch's optimizer), escape as a raw
    RuntimeError (a negative layer width), or train a constant or another model (a zero-width
    over-arch or scorer, a truthy string for a bool)."""
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, [f"data.world={tmp_path}", *override.split()])


def test_the_loader_hashes_queries_into_the_models_query_table(tmp_path):
    config = load_train_config(None, [f"data.world={tmp_path}", "model.query_buckets=64", "model.sequence_layout=ec"])
    assert (config.loader.query_buckets, config.loader.sequence_layout) == (64, "ec")


def test_no_interest_module_is_one_line_from_mim_train(tmp_path, capsys):
    """It used to pass the config checks and crash with a traceback after the process group was up."""
    assert mim(["train", f"data.world={tmp_path / 'absent'}", f"out={tmp_path / 'out'}", "model.id_interest=false",
                "model.content_interest=false", "model.fusion_interest=false"]) == 2
    assert "mim train: error: model.id_interest, model.content_interest and model.fusion_interest are all false" \
        in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout, table, sharding, device, refused", [
    ("ebc", "mm_item", "row_wise", "cpu", True),
    ("ebc", "item", "grid_shard", "cpu", True),
    ("ec", "user", "row_wise", "cpu", True),          # the pooled tables are an EmbeddingBagCollection in either layout
    ("ec", "item", "row_wise", "cpu", False),         # an EmbeddingCollection shards row-wise on CPU too
    ("ebc", "mm_item", "row_wise", "cuda", False),
    ("ebc", "item", "table_row_wise", "cuda", False),
])
def test_sharding_types_the_planner_does_not_offer_on_the_device_are_refused(layout, table, sharding, device, refused):
    """What TorchRec's planner would refuse with a traceback, by table, layout and device."""
    from mim_rec.ciubm.config import ModelConfig, TableConstraint
    from mim_rec.ciubm.placement import check_offered
    from mim_rec.ciubm.sparse import SparseArch, sharders

    arch = SparseArch(ModelConfig(mm_dim=8, sequence_layout=layout), num_items=10, num_users=4, num_categories=3,
                      device=torch.device("meta"))
    constraints = {table: TableConstraint(sharding_types=[sharding])}
    if not refused:
        check_offered(arch, constraints, sharders(0.1, device == "cuda"), device)
        return
    with pytest.raises(ConfigError, match=rf"model.constraints.{table}.sharding_types=\['{sharding}'\]: "
                                          rf"TorchRec's planner offers this table .* on cpu; row-wise sharding needs CUDA"):
        check_offered(arch, constraints, sharders(0.1, False), device)


@pytest.mark.parametrize("table, constraint, device, offered", [
    ("item", dict(compute_kernels=["fused_uvm"]), "cpu", "table_wise: fused"),
    ("mm_item", dict(compute_kernels=["dense"]), "cpu", "table_wise: fused"),  # dense: data-parallel only
    ("item", dict(compute_kernels=["dense"], ranks=[0]), "cpu", "table_wise: fused"),
    ("item", dict(compute_kernels=["fused_uvm"]), "cuda", None),
    ("item", dict(compute_kernels=["dense", "fused"], ranks=[0]), "cpu", None),
])
def test_kernels_the_tables_sharder_does_not_offer_are_refused(table, constraint, device, offered):
    """Only sharding types were checked: a kernel TorchRec offers no sharding of the table on
    the device was its planner's traceback after the process group was up."""
    from mim_rec.ciubm.config import ModelConfig, TableConstraint
    from mim_rec.ciubm.placement import check_offered
    from mim_rec.ciubm.sparse import SparseArch, sharders

    arch = SparseArch(ModelConfig(mm_dim=8), num_items=10, num_users=4, num_categories=3, device=torch.device("meta"))
    constraints = {table: TableConstraint(**constraint)}
    if offered is None:
        check_offered(arch, constraints, sharders(0.1, device == "cuda"), device)
        return
    with pytest.raises(ConfigError, match=rf"model.constraints.{table}.compute_kernels=.*: TorchRec offers this "
                                          rf"table .*{offered}.* on {device}"):
        check_offered(arch, constraints, sharders(0.1, False), device)


def test_an_empty_pin_is_refused(tmp_path):
    """ranks=[] read as no pin, without a word."""
    with pytest.raises(ConfigError, match=r"model.constraints.mm_item.ranks=\[\]: name the ranks"):
        load_train_config(None, [f"data.world={tmp_path}", "model.constraints.mm_item.ranks=[]"])


def test_the_table_names_constraints_accept_are_the_tables_the_model_builds():
    from mim_rec.ciubm.config import ModelConfig
    from mim_rec.ciubm.sparse import TABLE_NAMES, SparseArch

    arch = SparseArch(ModelConfig(mm_dim=8), num_items=10, num_users=4, num_categories=3, device=torch.device("meta"))
    built = {config.name for module in arch.modules() if hasattr(module, "embedding_bag_configs")
             for config in module.embedding_bag_configs()}
    assert built == set(TABLE_NAMES)


@pytest.mark.parametrize("override", ["shard_rows=-5", "shard_rows=0", "batch_size=0"])
def test_table_build_refuses_non_positive_sizes_before_writing(tmp_path, capsys, override):
    """shard_rows=-5 used to write a 'complete' manifest with no shards; 0 a ZeroDivisionError
    that left build state behind, refusing the corrected re-run."""
    assert mim(["embeddings", "build", f"world={tmp_path / 'absent'}", f"encoders={tmp_path / 'absent'}",
                f"out={tmp_path / 'table'}", override]) == 2
    assert f"{override}: must be positive" in capsys.readouterr().err
    assert not (tmp_path / "table").exists()


@pytest.mark.parametrize("command, override, message", [
    ("pretrain", "dda_steps=-1", "dda_steps=-1: must not be negative"),
    ("pretrain", "dda_steps=0 dma_steps=0", "dda_steps=0 dma_steps=0: nothing to train"),
    ("pretrain", "mlm_probability=1.5", "mlm_probability=1.5: must lie strictly between 0 and 1"),
    ("pretrain", "seed=-1", "seed=-1: must not be negative"),
    ("pretrain", "encoders.vision.trainable_groups=-1", "encoders.vision.trainable_groups=-1: must not be negative"),
    ("csft", "loss.alpha=-1", "loss.alpha=-1.0: must not be negative"),
    ("csft", "negatives.queue_batches=-1", "negatives.queue_batches=-1: must not be negative"),
    ("csft", "data.validation=1.5", "data.validation=1.5: must lie strictly between 0 and 1"),
    ("csft", "eval.ks=[10,0]", "eval.ks[1]=0: must be positive"),
    ("csft", "eval.ks=[]", "eval.ks=[]: name at least one recall cut-off"),
    # A misspelt signal beside a real one selected nothing and trained on the real one's pairs.
    ("csft", "data.signals=[purchase,clikc]", "data.signals=['purchase', 'clikc']: 'clikc' is not a signal; "
     "choose from ['click', 'purchase']"),
    ("csft", "data.signals=[]", "data.signals=[]: name at least one signal"),
])
def test_stage_commands_refuse_settings_that_train_nothing_or_nonsense(tmp_path, capsys, command, override, message):
    """Each of these used to exit 0 with an untrained or meaningless artifact, or a traceback."""
    assert mim([command, f"data.world={tmp_path / 'absent'}", f"out={tmp_path / 'out'}", *override.split()]) == 2
    assert f"mim {command}: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["pretrain"], "mim pretrain: error: data.world=data/world: no such file or folder"),
    (["pretrain-eval"], "mim pretrain-eval: error: data.world=data/world: no such file or folder"),
    (["csft", "--eval"], "mim csft: error: data.world=data/world: no such file or folder"),
    (["csft-eval", "data.world=."], "mim csft-eval: error: encoders=runs/pretrain/encoders: no such file or folder"),
    (["csft-tune", "--grid", "loss.alpha=0.5,1", "data.world=."],
     "mim csft-tune: error: encoders=runs/pretrain/encoders: no such file or folder"),
    (["csft-ablations", "data.world=."],
     "mim csft-ablations: error: encoders=runs/pretrain/encoders: no such file or folder"),
    (["embeddings", "build", "world=w", "encoders=e", "out=t"],
     "mim embeddings build: error: world=w: no such file or folder"),
    (["embeddings", "serve", "encoders=e", "log=l"], "mim embeddings serve: error: encoders=e: no such file or folder"),
])
def test_a_stage_input_that_does_not_exist_is_named_by_its_key(tmp_path, monkeypatch, capsys, argv, message):
    """A setting left at its default read "data/world: items file not found", a path the user
    never typed (or, with --eval, named pairs_test.parquet inside it), and only once the models
    had loaded; the refused run also left an empty runs/ behind."""
    monkeypatch.chdir(tmp_path)
    assert mim(argv) == 2
    assert capsys.readouterr().err.strip() == message
    assert not any(tmp_path.iterdir())


def test_registering_every_command_imports_no_torch():
    """``mim --help`` took 5 s: bench train, bench peer and train imported torch and TorchRec
    (and bench sharding fbgemm) when their parsers were registered, not when they ran."""
    script = ("import sys; from train.cli import build_parser; build_parser(); "
              "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & "
              "{'torch', 'torchrec', 'fbgemm_gpu', 'tensordict', 'transformers', 'timm', 'torchx', 'pandas'})))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_the_stage_help_states_the_configs_own_path_defaults(capsys):
    """The help of mim pretrain and mim csft did not say that an omitted data.world reads data/world."""
    from mim_rec.csft.config import CsftConfig
    from mim_rec.pretrain.config import PretrainConfig

    pretrain, csft = PretrainConfig(), CsftConfig()
    for command, defaults in (("pretrain", {"data.world": pretrain.data.world, "out": pretrain.out}),
                              ("csft", {"data.world": csft.data.world, "encoders": csft.encoders, "out": csft.out})):
        with pytest.raises(SystemExit):
            mim([command, "--help"])
        shown = " ".join(capsys.readouterr().out.split())
        for key, value in defaults.items():
            assert f"{key}=DIR (default {value})" in shown


def test_the_import_help_says_what_each_format_is(capsys):
    """``--format`` of mim data import was the one argument shown without a word of help."""
    with pytest.raises(SystemExit):
        mim(["data", "import", "--help"])
    printed = capsys.readouterr().out
    shown = " ".join(printed.split())
    assert "taobao-mm: TAOBAO-MM" in shown and "amazon: Amazon reviews" in shown and "docs/data.md" in shown
    # the kinds of missing rows --allow-missing can name, per format (argparse wraps at hyphens too)
    assert ("Kinds:taobao-mm:target-embedding,behaviour-embedding,item-features,user-features;"
            "amazon:text,inter-rows.") in "".join(printed.split())


@pytest.mark.parametrize("argv, prog", [
    (["data", "holdout", "absent", "--out", "held"], "mim data holdout"),
    (["embeddings", "build", "world=absent", "encoders=absent", "out=table"], "mim embeddings build"),
    (["pretrain", "data.world=absent"], "mim pretrain"),
])
def test_an_error_names_the_command_as_argparse_does(tmp_path, monkeypatch, capsys, argv, prog):
    """A command of a group was named by the group alone (``mim data: error: ...``)."""
    monkeypatch.chdir(tmp_path)
    assert mim(argv) == 2
    assert capsys.readouterr().err.startswith(f"{prog}: error: ")


def test_a_config_file_or_override_that_does_not_parse_is_named(tmp_path, capsys):
    assert mim(["train", "--config", str(tmp_path), f"data.world={tmp_path}"]) == 2  # was "no such file"
    assert f"--config {tmp_path}: a folder, not a config file" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [0.1\nseed: 1\n")
    assert mim(["train", "--config", str(broken), f"data.world={tmp_path}"]) == 2
    assert f"{broken}: not valid YAML" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.yaml"  # was a UnicodeDecodeError traceback
    latin1.write_bytes(b"# caf\xe9\nlr: 0.1\n")
    assert mim(["train", "--config", str(latin1), f"data.world={tmp_path}"]) == 2
    assert f"{latin1}: not valid YAML: 'utf-8' codec can't decode" in capsys.readouterr().err
    assert mim(["train", f"data.world={tmp_path}", "model.over_arch=[1,"]) == 2
    assert "override 'model.over_arch=[1,': the value is not valid YAML" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for hosts without a GPU")
def test_device_cuda_on_a_host_without_one_is_a_config_error():
    from mim_rec.utils.dist import resolve_device
    with pytest.raises(ConfigError, match="device=cuda: no CUDA device is visible"):
        resolve_device("cuda")


def test_each_local_rank_gets_a_gpu_of_its_own_or_all_run_on_the_cpu(monkeypatch):
    """Two ranks on a host showing one GPU were sent to cuda:0 and cuda:1 (invalid ordinal)."""
    from mim_rec.utils.dist import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto", local_rank=1, local_world_size=2) == torch.device("cpu")
    assert resolve_device("auto", local_rank=0, local_world_size=2) == torch.device("cpu")  # the same backend
    assert resolve_device("auto", local_rank=0, local_world_size=1) == torch.device("cuda", 0)
    for rank in (0, 1):  # every rank refuses, so none waits for the others at the rendezvous
        with pytest.raises(ConfigError, match="device=cuda: 2 local ranks and 1 GPU visible on this host"):
            resolve_device("cuda", local_rank=rank, local_world_size=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's, read when not given
    assert resolve_device("auto") == torch.device("cpu")


def test_collectives_wait_as_long_under_nccl_as_under_gloo(monkeypatch):
    """nccl's default timeout (10 min) aborted ranks waiting for rank 0's feature-cache fill."""
    from datetime import timedelta

    from mim_rec.utils.dist import process_group_timeout
    assert process_group_timeout() == timedelta(minutes=60)
    monkeypatch.setenv("MIM_DIST_TIMEOUT_MIN", "90")
    assert process_group_timeout() == timedelta(minutes=90)
    for bad in ("0", "soon", "inf"):
        monkeypatch.setenv("MIM_DIST_TIMEOUT_MIN", bad)
        with pytest.raises(ConfigError, match="MIM_DIST_TIMEOUT_MIN"):
            process_group_timeout()


def test_an_unknown_device_is_a_config_error():
    """device=tpu used to run on the CPU without a word."""
    from mim_rec.utils.dist import resolve_device
    with pytest.raises(ConfigError, match="device='tpu': choose auto, cpu or cuda"):
        resolve_device("tpu")


def test_a_folder_where_a_file_belongs_and_the_reverse_are_named(tmp_path):
    """Both used to end in a raw OSError (IsADirectoryError, FileExistsError)."""
    (tmp_path / "log_dir").mkdir()
    from embeddings.encoders import load_item_encoder
    from embeddings.rim_log import RimLog
    from mim_rec.data.errors import DataError

    with pytest.raises(DataError, match="log_dir: a folder, not a log file"):
        RimLog(tmp_path / "log_dir", "fp", 8)
    (tmp_path / "cache_file").write_text("")
    with pytest.raises(DataError, match="cache_file: feature_cache: a file, not a folder"):
        load_item_encoder(tmp_path / "absent", feature_cache=tmp_path / "cache_file")


def test_the_planner_knows_how_many_ranks_share_a_host(monkeypatch):
    """Without local_world_size TorchRec took 16 ranks on 2 hosts for one host of 16."""
    from mim_rec.utils.dist import DistContext
    from train.ciubm import planner_topology

    ctx = DistContext(rank=0, world_size=16, local_rank=0, device=torch.device("cpu"), backend="gloo")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    topology = planner_topology(ctx)
    assert (topology.world_size, topology.local_world_size) == (16, 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert planner_topology(ctx).local_world_size == 16  # a plain process: one host


def test_the_planner_knows_the_gpus_memory(monkeypatch):
    """TorchRec's default is a 32 GiB GPU: an 80 GB card's MM table went to a UVM cache."""
    from types import SimpleNamespace

    from mim_rec.utils.dist import DistContext
    from train.ciubm import planner_topology

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    ctx = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cuda", 0), backend="nccl")
    assert {device.storage.hbm for device in planner_topology(ctx).devices} == {80 * 2**30}


@pytest.mark.parametrize("argv, flag", [
    (["train", "out=OUT", "--eval"], "--eval"),  # pretrain's and csft's flag; argparse read it as --eval-only
    (["experiment", "--out", "OUT", "--report"], "--report"),
    (["pipeline", "--out", "OUT", "--pres", "tiny"], "--pres"),
])
def test_a_flag_is_taken_only_as_spelled_in_full(tmp_path, capsys, argv, flag):
    """argparse takes any unambiguous prefix of a flag by default: `mim train --eval` on a
    half-trained run scored its old checkpoint, trained nothing and exited 0."""
    with pytest.raises(SystemExit) as exit:
        mim([arg.replace("OUT", str(tmp_path / "out")) for arg in argv])
    assert exit.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["bench", "lookup", "items=ITEMS", "--quick", "seed=-1"],
    ["bench", "train", "rounds=2", "--json", "-", "seed=-1"],
    ["embeddings", "build", "world=ITEMS", "--config", "CONFIG", "seed=-1"],
])
def test_overrides_after_a_flag_are_taken_in_order(tmp_path, capsys, argv):
    """argparse fills the overrides from the first run of positionals only: the ones after a flag
    were refused as 'unrecognized arguments' (exit 2 from argparse, before any setting was read)."""
    (tmp_path / "config.yaml").write_text("{}\n")
    argv = [arg.replace("ITEMS", str(tmp_path / "absent")).replace("CONFIG", str(tmp_path / "config.yaml"))
            for arg in argv]
    assert mim(argv) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err and "seed" in err, err


def test_an_empty_config_file_or_a_pipe_sets_nothing(tmp_path):
    """--config /dev/null (or a pipe, --config <(...)) was "no such file"; an empty YAML file or
    one whose settings are all commented out was "must hold a mapping, got NoneType"."""
    from mim_rec.csft.config import CsftConfig
    from mim_rec.config import ConfigError, load_config

    empty = tmp_path / "empty.yaml"
    empty.write_text("# steps: 5\n\n")
    assert load_config(CsftConfig, empty) == CsftConfig()
    assert load_config(CsftConfig, "/dev/null", ["steps=3"]).steps == 3
    read, write = os.pipe()
    os.write(write, b"steps: 7\n")
    os.close(write)
    try:
        assert load_config(CsftConfig, f"/dev/fd/{read}").steps == 7
    finally:
        os.close(read)
    (tmp_path / "null.yaml").write_text("null\n")
    with pytest.raises(ConfigError, match="must hold a mapping, got NoneType"):
        load_config(CsftConfig, tmp_path / "null.yaml")
