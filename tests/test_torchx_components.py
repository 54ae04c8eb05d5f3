"""TorchX components: each materialises from its docstring CLI into a valid AppDef that runs the
right ``mim`` sub-command, and one really runs under the local_cwd scheduler."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from torchx.specs import AppDef
from torchx.specs.builders import materialize_appdef
from torchx.specs.file_linter import validate

from torchx_components import mim
from train.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
COMPONENT_FILE = REPO / "torchx_components" / "mim.py"
VENV_BIN = Path(sys.executable).parent

# component -> (mim argv it must run, runs under torchrun?)
COMPONENTS = {
    "pretrain": (["pretrain"], True),
    "csft": (["csft"], True),
    "build_table": (["embeddings", "build"], True),
    "serve_rim": (["embeddings", "serve"], False),
    "train_ciubm": (["train"], True),
    "evaluate": (["train", "--eval-only"], True),
    "bench_sharding": (["bench", "sharding"], False),
}


def _mim_argv(role) -> list:
    """The argv after ``-m train.cli`` in the role's command line."""
    if role.entrypoint == "bash":
        words = shlex.split(role.args[1])
        assert words[0] == "torchrun"
    else:
        assert role.entrypoint == "python"
        words = list(role.args)
    at = words.index("-m")
    assert words[at + 1] == "train.cli"
    return words[at + 2:]


def test_component_file_passes_torchx_linter():
    for component in COMPONENTS:
        problems = validate(str(COMPONENT_FILE), component)
        assert problems == [], f"{component}: {problems}"


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_component_materialises_from_cli(component, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.yaml").write_text("seed: 7\n")
    command, distributed = COMPONENTS[component]
    cli = ["--config", "cfg.yaml", "--cpu", "3", "--memMB", "2048", "--env", "A=1,B=2",
           "--mounts", "type=bind,src=/data/runs,dst=/runs,readonly"]
    if distributed:
        cli += ["-j", "2x4"]
    cli += ["--", "out=/runs/x", "seed=7"]
    app = materialize_appdef(getattr(mim, component), cli)

    assert isinstance(app, AppDef) and len(app.roles) == 1
    role = app.roles[0]
    assert _mim_argv(role) == command + ["--config", "cfg.yaml", "out=/runs/x", "seed=7"]
    assert role.resource.cpu == 3 and role.resource.memMB == 2048 and role.resource.gpu == 0
    assert role.env["A"] == "1" and role.env["B"] == "2"
    assert [(m.src_path, m.dst_path, m.read_only) for m in role.mounts] == [
        ("/data/runs", "/runs", True)]
    if distributed:
        torchrun = shlex.split(role.args[1])
        assert torchrun[torchrun.index("--nnodes") + 1] == "2"
        assert torchrun[torchrun.index("--nproc_per_node") + 1] == "4"
        assert role.num_replicas == 2


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_component_runs_a_registered_mim_command(component):
    """The argv a component launches is accepted by the ``mim`` parser as it stands."""
    command, _ = COMPONENTS[component]
    parser = build_parser()
    registered = parser._subparsers._group_actions[0].choices
    if command[0] not in registered:
        pytest.skip(f"`mim {command[0]}` is not registered in train/cli.py yet")
    nested = registered[command[0]]._subparsers
    if nested is not None and len(command) > 1:
        if command[1] not in nested._group_actions[0].choices:
            pytest.skip(f"`mim {' '.join(command[:2])}` is not implemented yet")
    role = materialize_appdef(getattr(mim, component), ["--", "a.b=1"]).roles[0]
    try:
        args = parser.parse_args(_mim_argv(role))
    except SystemExit as exc:
        pytest.fail(f"mim rejected {_mim_argv(role)} (exit {exc.code})")
    assert callable(args.func)


def _torchx(*argv: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([str(VENV_BIN / "torchx"), *argv], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("launch, message", [
    (["--cpu", "-1"], "need cpu >= 1"), (["--memMB", "0"], "memMB >= 1"),
    (["--config", "no_such.yaml"], "--config no_such.yaml: no such file here")])
def test_launch_arguments_no_job_could_use_are_refused(component, launch, message):
    """They passed the dry run and failed only once the job was scheduled (or never ran)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        materialize_appdef(getattr(mim, component), launch + ["--", "out=x"])


@pytest.mark.parametrize("j", ["1x0", "0x2", "3:2x1"])
def test_a_job_shape_without_processes_is_refused(j):
    with pytest.raises(ValueError, match=f"-j {j}: nodes and processes per node must be at least 1"):
        materialize_appdef(mim.train_ciubm, ["-j", j, "--", "out=x"])


def test_more_ranks_per_node_than_gpus_is_refused():
    """Ranks past the node's GPUs would fail at torch.cuda.set_device once scheduled."""
    with pytest.raises(ValueError, match=r"-j 1x4 --gpu 2: each rank takes a GPU"):
        materialize_appdef(mim.train_ciubm, ["-j", "1x4", "--gpu", "2", "--", "out=x"])
    materialize_appdef(mim.train_ciubm, ["-j", "1x2", "--gpu", "2", "--", "out=x"])
    materialize_appdef(mim.train_ciubm, ["-j", "1x4", "--", "out=x"])  # CPU ranks


def test_a_named_resource_is_checked_as_it_resolves():
    """-h skipped both checks: gpu.small (one GPU a node) took -j 1x2, whose second rank ran on
    the CPU, and TorchX's NULL resource (-1 CPUs) went to the scheduler."""
    with pytest.raises(ValueError, match=r"-j 1x2 -h gpu.small: 1 GPU a node: each rank takes a GPU"):
        materialize_appdef(mim.train_ciubm, ["-h", "gpu.small", "-j", "1x2", "--", "out=x"])
    with pytest.raises(ValueError, match=re.escape("-h NULL (cpu -1, gpu -1, memMB -1): need cpu >= 1")):
        materialize_appdef(mim.bench_sharding, ["-h", "NULL", "--", "out=x"])
    role = materialize_appdef(mim.train_ciubm, ["-h", "gpu.small", "-j", "2x1", "--", "out=x"]).roles[0]
    assert role.resource.gpu == 1 and role.num_replicas == 2


def test_torchx_dryrun_cli_parses_csft(tmp_path):
    (REPO / "runs").mkdir(exist_ok=True)
    config = Path("runs") / f"{tmp_path.name}_csft.yaml"  # relative to the checkout, as users write it
    (REPO / config).write_text("steps: 3\n")
    try:
        done = _torchx("run", "--dryrun", "-s", "local_cwd", "torchx_components/mim.py:csft",
                       "-j", "1x2", "--config", str(config), "--", "out=runs/csft", timeout=120)
    finally:
        (REPO / config).unlink()
    assert done.returncode == 0, done.stderr
    # The request is pretty-printed: long strings are split into adjacent literals.
    request = re.sub(r"['\"]\s*\n\s*['\"]", "", done.stdout)
    assert "--nproc_per_node 2" in request
    assert f"-m train.cli csft --config {config} out=runs/csft" in request



@pytest.mark.parametrize("launch, message", [
    (["--config", "no_such.yaml"], "--config no_such.yaml: no such file here"),
    (["-j", "1x0"], "-j 1x0: nodes and processes per node must be at least 1"),
    (["-j", "abc"], "Invalid format for -j, usage example: 1:2x4 or 1x4 or 4. Given: abc"),
    (["-h", "nosuch"], "-h nosuch: No named resource found for `nosuch`."),
    (["--mounts", "type=bind,src=/a"], "--mounts type=bind,src=/a: dst (the form is type=bind,src=/host/path,"),
    (["--env", "A"], "--env A: 'A' is not NAME=value (the form is ENV1=v1,ENV2=v2)"),
])
def test_torchx_run_refuses_a_launch_argument_in_one_error_line(launch, message):
    """Each came out of `torchx run` as a Python traceback ending in the message (TorchX prints
    only its ComponentValidationException as an error line); the last three were raised by
    TorchX's own parsers, so not even the message was this project's."""
    done = _torchx("run", "--dryrun", "-s", "local_cwd", "torchx_components/mim.py:csft", *launch,
                   "--", "out=runs/csft", timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "Failed to run component `torchx_components/mim.py:csft` got errors: \n " + message in done.stderr


@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("stage_args, message", [
    (["out=x", "--bogus"], "error: unrecognized arguments: --bogus"),
    (["out"], "error: override 'out' is not of the form key=value"),
    (["--config"], "error: argument --config: expected one argument")])
def test_a_command_line_mim_refuses_is_refused_at_launch(component, stage_args, message):
    """The dry run took it; the job failed with it on every rank once scheduled."""
    prog = " ".join(["mim"] + [word for word in COMPONENTS[component][0] if not word.startswith("-")])
    with pytest.raises(ValueError, match=re.escape(f"{prog}: {message}")):
        materialize_appdef(getattr(mim, component), ["--", *stage_args])


def test_torchx_run_refuses_an_unknown_stage_flag_in_one_error_line():
    done = _torchx("run", "--dryrun", "-s", "local_cwd", "torchx_components/mim.py:csft",
                   "--", "out=runs/csft", "--evl", timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "usage:" not in done.stderr
    assert "got errors: \n mim csft: error: unrecognized arguments: --evl" in done.stderr
    assert materialize_appdef(mim.csft, ["--", "--help"]).roles[0]  # the job prints the help


@pytest.mark.parametrize("env, bad", [("A", "A"), ("A,B=1", "A"), ("=1", "=1"), ("A=1,=2", "=2")])
def test_an_env_entry_without_a_name_is_refused_naming_it(env, bad):
    """TorchX's own parser of the argument raised a ValueError on the first; it took the second
    as one variable named "A,B"."""
    with pytest.raises(ValueError, match=re.escape(f"--env {env}: {bad!r} is not NAME=value")):
        materialize_appdef(mim.csft, ["--env", env, "--", "out=x"])


@pytest.mark.parametrize("env, bad", [("A B=1", "A B=1"), ("OPTS=--a=1,--b=2", "--b=2"), ("1A=2", "1A=2")])
def test_an_env_name_no_scheduler_takes_is_refused(env, bad):
    """TorchX's parser, and this one, made variables named "A B", "--b" and "1A"."""
    with pytest.raises(ValueError, match=re.escape(f"--env {env}: {bad!r} is not NAME=value")):
        materialize_appdef(mim.csft, ["--env", env, "--", "out=x"])
    role = materialize_appdef(mim.csft, ["--env", "_A=1,my.var-x=2", "--", "out=x"]).roles[0]
    assert (role.env["_A"], role.env["my.var-x"]) == ("1", "2")


def test_env_values_keep_their_commas_as_torchx_parses_them():
    role = materialize_appdef(mim.csft, ["--env", "CUDA_VISIBLE_DEVICES=0,1,PATHS=a;b;C=3", "--", "out=x"]).roles[0]
    given = {"CUDA_VISIBLE_DEVICES": "0,1", "PATHS": "a;b", "C": "3"}
    assert {name: role.env.get(name) for name in given} == given  # dist.ddp adds its own (LOGLEVEL)
    assert materialize_appdef(mim.serve_rim, ["--env", "", "--", "out=x"]).roles[0].env == {}


@pytest.mark.slow
def test_local_cwd_run_of_bench_sharding():
    """A real job under TorchX's local_cwd scheduler: planner-only sharding bench."""
    done = _torchx("run", "--wait", "--log", "-s", "local_cwd",
                   "torchx_components/mim.py:bench_sharding", "--",
                   "id_tables=[{name: a, rows: 100, dim: 8}]", "mm_rows=400", "mm_dim=16",
                   "plans=table_wise,data_parallel", "batch_size=8", timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "SUCCEEDED" in log
    assert "bench_sharding/0 table_wise  " in log
    assert "bench_sharding/0 data_parallel" in log


def test_serve_rim_listens_on_the_port_it_exposes():
    """--port went into the port map only: the service listened on its default 8470."""
    from embeddings.rim import RimConfig
    from mim_rec.config import load_config

    role = materialize_appdef(mim.serve_rim, ["--port", "9123", "--", "encoders=e", "log=l"]).roles[0]
    assert role.port_map == {"rim": 9123}
    config = load_config(RimConfig, None, _mim_argv(role)[2:])
    assert (config.port, config.host) == (9123, "0.0.0.0")
    own_host = materialize_appdef(mim.serve_rim, ["--port", "9123", "--", "host=10.0.0.5"]).roles[0]
    assert load_config(RimConfig, None, _mim_argv(own_host)[2:]).host == "10.0.0.5"
    unexposed = materialize_appdef(mim.serve_rim, ["--", "encoders=e"]).roles[0]
    assert unexposed.port_map == {} and _mim_argv(unexposed)[2:] == ["encoders=e"]
    with pytest.raises(ValueError, match="--port 70000"):
        materialize_appdef(mim.serve_rim, ["--port", "70000"])


@pytest.mark.parametrize("launch", [["--max_retries", "-1"], ["--rdzv_port", "99999"]])
def test_retries_and_rendezvous_ports_no_scheduler_takes_are_refused(launch):
    with pytest.raises(ValueError, match="need max_retries >= 0 and a TCP port"):
        materialize_appdef(mim.train_ciubm, launch + ["--", "out=x"])
