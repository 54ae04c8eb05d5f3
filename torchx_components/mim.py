"""TorchX components for every mim_rec job.

Each component is a typed function returning a :py:class:`torchx.specs.AppDef` that runs one
``mim`` sub-command; its docstring is the ``torchx run ... --help`` text. Stages exchange
artifacts on disk only (the world folder, encoder checkpoints, the MM table), never processes:
C-SFT and the CiUBM trainer are separate jobs joined by the MM table that ``build_table`` writes.

Every stage reads a typed config (``--config FILE``) and ``key=value`` overrides; artifact paths
are config keys, so they travel in ``args`` like any other setting::

    torchx run -s local_cwd torchx_components/mim.py:pretrain -j 1x2 \\
        --config pretrain.yaml -- data.world=runs/world out=runs/pretrain

Distributed stages (pretrain, csft, build_table, train_ciubm, evaluate) run under ``torchrun``
with ``j = {nnodes}x{nproc_per_node}`` exactly as :py:func:`torchx.components.dist.ddp` does;
the entry point chooses nccl on GPU hosts and gloo on CPU, except ``build_table``, whose ranks
encode their share of the items on the CPU under gloo (the encoder runs once per item; C-SFT's
feature cache makes it seconds). ``serve_rim`` and ``bench_sharding`` are single-process roles
(the bench spawns its own measuring ranks).
"""

# No `from __future__ import annotations`: TorchX reads the real annotations to build the CLI.
import contextlib
import io
import os
import re
from typing import Dict, List, Optional

import torchx
import torchx.specs as specs
from torchx.components import dist
from torchx.specs.finder import ComponentValidationException

ENTRY_MODULE = "train.cli"
# An environment variable name that shells, Slurm and Kubernetes all pass on (Kubernetes also
# takes ``-`` and ``.``); ``A B`` or the ``--b`` of ``OPTS=--a=1,--b=2`` went to the job as a name
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


class LaunchError(ComponentValidationException, ValueError):
    """A launch argument no job could use. ``torchx run`` prints this kind of exception as one
    error line and exits 1; a plain ValueError from a component came out as a Python traceback
    ending in the message."""


def _stage_argv(command: List[str], config: Optional[str], args: tuple) -> List[str]:
    argv = list(command)
    if config:
        if not os.path.isabs(config) and not os.path.isfile(config):
            # Checked here so that the mistake costs a dry run, not a queued job. An absolute
            # path is the job's own (inside the image or a mount) and cannot be checked here.
            raise LaunchError(f"--config {config}: no such file here; give a path relative to this "
                              f"folder, or an absolute one as the job sees it (image or mount)")
        argv += ["--config", config]
    argv += list(args)
    _check_mim_argv(command, argv)
    return argv


def _check_mim_argv(command: List[str], argv: List[str]) -> None:
    """Refuse what ``mim`` refuses before it reads anything (an unknown flag, a flag without its
    value, an override without ``=``), with its own message: the job took it and failed with it
    on every rank once scheduled. ``mim``'s parser imports no torch, so this costs a dry run
    well under a second. Where ``torchx`` runs without mim_rec installed (a machine that only
    submits), the job's parser is the only check."""
    try:
        from mim_rec.config import ConfigError, split_override
        from train.cli import build_parser
    except ImportError:
        return
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages), contextlib.redirect_stdout(io.StringIO()):
            parsed, unknown = build_parser().parse_known_args(argv)
    except SystemExit as done:
        if done.code:  # argparse printed its usage, then "mim csft: error: ..."
            raise LaunchError(messages.getvalue().strip().splitlines()[-1]) from None
        return  # --help: the job prints it
    prog = " ".join(["mim"] + [word for word in command if not word.startswith("-")])  # as argparse names it
    if unknown:  # argparse names only "mim" for these
        raise LaunchError(f"{prog}: error: unrecognized arguments: {' '.join(unknown)}")
    for item in getattr(parsed, "overrides", None) or []:
        try:
            split_override(item)
        except ConfigError as err:
            raise LaunchError(f"{prog}: error: {err}") from None


def _check_resources(cpu: int, gpu: int, memMB: int, h: Optional[str], mounts: Optional[List[str]],
                     j: Optional[str] = None) -> None:
    """Refuse launch arguments no scheduler can meet (TorchX passes them on unchecked), and
    those TorchX's own parsers refuse, as a :class:`LaunchError` (theirs raise a plain
    ValueError or KeyError, which ``torchx run`` printed as a traceback). A named resource is
    checked as it resolves: ``-h gpu.small`` is one GPU a node, so ``-j 1x2`` is refused as
    ``--gpu 1 -j 1x2`` is (its second rank ran on the CPU, or failed with ``device=cuda``)."""
    nproc_per_node = _parse_launch(mounts, j)
    resource = _named_resource(h) if h else specs.Resource(cpu=cpu, gpu=gpu, memMB=memMB)
    asked = f"-h {h} (cpu {resource.cpu}, gpu {resource.gpu}, memMB {resource.memMB})" if h else (
        f"--cpu {cpu} --gpu {gpu} --memMB {memMB}")
    if resource.cpu < 1 or resource.gpu < 0 or resource.memMB < 1:
        raise LaunchError(f"{asked}: need cpu >= 1, gpu >= 0, memMB >= 1")
    if 0 < resource.gpu < nproc_per_node:  # one GPU per rank
        gpus = f"-h {h}: {resource.gpu} GPU{'s' * (resource.gpu > 1)} a node" if h else f"--gpu {gpu}"
        raise LaunchError(f"-j {j} {gpus}: each rank takes a GPU of its node; give at least "
                          f"{nproc_per_node} GPUs a node (one a process) or fewer processes per node")


def _parse_env(env: Optional[str]) -> Dict[str, str]:
    """``--env`` as the job's environment variables. The components take it as a string and
    parse it here: declared ``Dict[str, str]``, it was parsed by TorchX before a component ran,
    and an entry without ``=`` (``--env A``) ended ``torchx run`` in a traceback from TorchX's
    parser, where a :class:`LaunchError` is one error line. The form is TorchX's:
    ``NAME=value`` entries split by ``,`` or ``;``, where a piece without ``=`` continues the
    value before it (``CUDA_VISIBLE_DEVICES=0,1`` keeps its comma), so only a piece with no
    ``NAME=`` before it, or a name no scheduler takes (:data:`ENV_NAME`), is refused."""
    if not env:
        return {}
    parsed: Dict[str, str] = {}
    name = ""
    pieces = re.split(r"([,;])", env)  # piece, delimiter, piece, ...: a continued value keeps its delimiter
    for at in range(0, len(pieces), 2):
        piece = pieces[at]
        if "=" in piece:
            name, value = piece.split("=", 1)
            name = name.strip()
            parsed[name] = value
        elif name:
            parsed[name] += pieces[at - 1] + piece
        if not ENV_NAME.fullmatch(name):
            raise LaunchError(f"--env {env}: {piece!r} is not NAME=value (the form is ENV1=v1,ENV2=v2); "
                              "a NAME is letters, digits, '_', '-' and '.', starting with a letter or '_'")
    return {key: value.strip() for key, value in parsed.items()}


def _named_resource(h: str) -> specs.Resource:
    """The registered named resource ``h``, as TorchX resolves it when it builds the job."""
    try:
        return specs.resource(h=h)
    except KeyError as err:  # its text names the registered resources
        raise LaunchError(f"-h {h}: {err.args[0]}") from None


def _parse_launch(mounts: Optional[List[str]], j: Optional[str]) -> int:
    """The processes per node ``j`` asks for (0 without ``j``), once ``mounts`` and ``j`` parse
    as TorchX parses them when it builds the job."""
    try:
        specs.parse_mounts(mounts or [])
    except (KeyError, ValueError) as err:  # a KeyError's text is the missing option: 'dst'
        raise LaunchError(f"--mounts {','.join(mounts or [])}: {err.args[0]} (the form is "
                          "type=bind,src=/host/path,dst=/job/path[,readonly])") from None
    if j is None:
        return 0
    try:
        min_nodes, max_nodes, nproc_per_node, _ = dist.parse_nnodes(j)
    except ValueError as err:
        raise LaunchError(str(err)) from None
    if min(min_nodes, max_nodes, nproc_per_node) < 1 or min_nodes > max_nodes:
        raise LaunchError(f"-j {j}: nodes and processes per node must be at least 1 "
                          f"(and min nodes <= max nodes)")
    return nproc_per_node


def _distributed(
    role: str,
    command: List[str],
    args: tuple,
    *,
    config: Optional[str],
    image: str,
    name: Optional[str],
    j: str,
    cpu: int,
    gpu: int,
    memMB: int,
    h: Optional[str],
    env: Optional[str],
    mounts: Optional[List[str]],
    max_retries: int,
    rdzv_port: int,
) -> specs.AppDef:
    """``mim <command>`` under torchrun on ``j`` = nnodes x nproc_per_node, via dist.ddp."""
    _check_resources(cpu, gpu, memMB, h, mounts, j)
    if max_retries < 0 or not 1 <= rdzv_port <= 65535:
        raise LaunchError(f"--max_retries {max_retries} --rdzv_port {rdzv_port}: need max_retries >= 0 "
                          f"and a TCP port 1..65535")
    app = dist.ddp(
        *_stage_argv(command, config, args), m=ENTRY_MODULE, image=image,
        name=name or f"mim/{role}", cpu=cpu, gpu=gpu, memMB=memMB, h=h, j=j,
        env=_parse_env(env), max_retries=max_retries, rdzv_port=rdzv_port, mounts=mounts)
    app.roles[0].name = role
    return app


def _single(
    role: str,
    command: List[str],
    args: tuple,
    *,
    config: Optional[str],
    image: str,
    name: Optional[str],
    cpu: int,
    gpu: int,
    memMB: int,
    h: Optional[str],
    env: Optional[str],
    mounts: Optional[List[str]],
    port_map: Optional[Dict[str, int]] = None,
) -> specs.AppDef:
    """``python -m train.cli <command>`` as one plain process (no torchrun)."""
    _check_resources(cpu, gpu, memMB, h, mounts)
    return specs.AppDef(
        name=name or role,
        roles=[specs.Role(
            name=role, image=image, entrypoint="python",
            args=["-m", ENTRY_MODULE, *_stage_argv(command, config, args)],
            resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h),
            env=_parse_env(env), port_map=port_map or {},
            mounts=specs.parse_mounts(mounts) if mounts else [])])


def pretrain(
    *args: str,
    config: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: Optional[str] = None,
    j: str = "1x2",
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    h: Optional[str] = None,
    env: Optional[str] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Stage 1: DDA + DMA pre-training of the image and title encoders (``mim pretrain``).

    Reads the world's items; writes the run folder ``out``, whose ``out/encoders`` is the
    aligned encoders artifact (``csft`` and ``build_table`` take it as ``encoders=``).

    Args:
        args: ``key=value`` overrides and flags for ``mim pretrain`` (e.g. ``data.world=DIR out=DIR``)
        config: YAML/JSON PretrainConfig file
        image: container image (docker, Kubernetes); local_cwd ignores it and runs in the current directory
        name: job name, ``{experiment}/{run}``; default ``mim/pretrain``
        j: {nnodes}x{nproc_per_node}; on GPU hosts nproc_per_node must not exceed the GPUs
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: host memory per node in MB
        h: a registered named resource; takes precedence over cpu, gpu and memMB
        env: environment variables, ENV1=v1,ENV2=v2
        mounts: artifact mounts, type=bind,src=/host/runs,dst=/runs[,readonly]
        max_retries: scheduler retries
        rdzv_port: c10d rendezvous port on the first node (multi-node only)
    """
    return _distributed(
        "pretrain", ["pretrain"], args, config=config, image=image, name=name, j=j, cpu=cpu,
        gpu=gpu, memMB=memMB, h=h, env=env, mounts=mounts, max_retries=max_retries,
        rdzv_port=rdzv_port)


def csft(
    *args: str,
    config: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: Optional[str] = None,
    j: str = "1x2",
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    h: Optional[str] = None,
    env: Optional[str] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Stage 2: content-based supervised fine-tuning of the MM item encoder (``mim csft``).

    Reads the pre-trained encoders and the (query image, item) pairs; writes the run folder
    ``out``, whose ``out/mm_encoder`` is the MM item encoder artifact. Runs apart from the
    CiUBM trainer: only the MM table built from its encoder crosses over.

    Args:
        args: ``key=value`` overrides and flags for ``mim csft`` (``data.world=DIR encoders=DIR out=DIR``)
        config: YAML/JSON C-SFT config file
        image: container image (docker, Kubernetes); local_cwd ignores it and runs in the current directory
        name: job name, ``{experiment}/{run}``; default ``mim/csft``
        j: {nnodes}x{nproc_per_node}; all-gathered negatives span every rank
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: host memory per node in MB
        h: a registered named resource; takes precedence over cpu, gpu and memMB
        env: environment variables, ENV1=v1,ENV2=v2
        mounts: artifact mounts, type=bind,src=/host/runs,dst=/runs[,readonly]
        max_retries: scheduler retries
        rdzv_port: c10d rendezvous port on the first node (multi-node only)
    """
    return _distributed(
        "csft", ["csft"], args, config=config, image=image, name=name, j=j, cpu=cpu,
        gpu=gpu, memMB=memMB, h=h, env=env, mounts=mounts, max_retries=max_retries,
        rdzv_port=rdzv_port)


def build_table(
    *args: str,
    config: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: Optional[str] = None,
    j: str = "1x2",
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    h: Optional[str] = None,
    env: Optional[str] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Representation center, MFM build: encode every item into the MM table (``mim embeddings build``).

    Each rank encodes its slice of the items and writes its Parquet shards; the table's
    manifest names the encoder that produced it, so CiUBM refuses a stale table.

    Args:
        args: ``key=value`` overrides for ``mim embeddings build`` (``world=DIR encoders=DIR out=DIR``)
        config: YAML/JSON table-build config file
        image: container image (docker, Kubernetes); local_cwd ignores it and runs in the current directory
        name: job name, ``{experiment}/{run}``; default ``mim/build_table``
        j: {nnodes}x{nproc_per_node}; more ranks encode more items at once
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: host memory per node in MB
        h: a registered named resource; takes precedence over cpu, gpu and memMB
        env: environment variables, ENV1=v1,ENV2=v2
        mounts: artifact mounts, type=bind,src=/host/runs,dst=/runs[,readonly]
        max_retries: scheduler retries
        rdzv_port: c10d rendezvous port on the first node (multi-node only)
    """
    return _distributed(
        "build_table", ["embeddings", "build"], args, config=config, image=image, name=name, j=j, cpu=cpu,
        gpu=gpu, memMB=memMB, h=h, env=env, mounts=mounts, max_retries=max_retries,
        rdzv_port=rdzv_port)


def serve_rim(
    *args: str,
    config: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: Optional[str] = None,
    cpu: int = 4,
    gpu: int = 0,
    memMB: int = 16384,
    h: Optional[str] = None,
    env: Optional[str] = None,
    mounts: Optional[List[str]] = None,
    port: int = 0,
) -> specs.AppDef:
    """Representation center, RIM: embed new items as they arrive (``mim embeddings serve``).

    One long-running process that appends window messages to the message log, from which
    the MM table's new rows are applied.

    Args:
        args: ``key=value`` overrides and flags for ``mim embeddings serve``
        config: YAML/JSON RIM service config file
        image: container image (docker, Kubernetes); local_cwd ignores it and runs in the current directory
        name: job name; default ``rim``
        cpu: CPUs
        gpu: GPUs
        memMB: host memory in MB
        h: a registered named resource; takes precedence over cpu, gpu and memMB
        env: environment variables, ENV1=v1,ENV2=v2
        mounts: artifact mounts, type=bind,src=/host/runs,dst=/runs[,readonly]
        port: port the service listens on (over a ``port=`` in args), on every interface
            (``host=0.0.0.0`` unless args name a host), exposed to the scheduler as ``rim``; 0: the service's own
            ``port``/``host`` settings (default 127.0.0.1:8470), nothing exposed
    """
    if not 0 <= port <= 65535:
        raise LaunchError(f"--port {port}: a TCP port is 1..65535 (0: none exposed)")
    listen = []
    if port:  # the service must listen where the scheduler routes
        listen = [f"port={port}"] + ([] if any(a.startswith("host=") for a in args) else ["host=0.0.0.0"])
    return _single(
        "rim", ["embeddings", "serve"], (*args, *listen), config=config, image=image, name=name, cpu=cpu,
        gpu=gpu, memMB=memMB, h=h, env=env, mounts=mounts,
        port_map={"rim": port} if port else None)


def train_ciubm(
    *args: str,
    config: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: Optional[str] = None,
    j: str = "1x2",
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 65536,
    h: Optional[str] = None,
    env: Optional[str] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Stage 3: train the CiUBM CTR model over sharded ID tables and the frozen MM table (``mim train``).

    Reads the events and the MM table (its manifest is checked); writes DCP checkpoints and
    metrics. Tables are sharded by TorchRec's planner across all ``j`` ranks.

    Args:
        args: ``key=value`` overrides and flags for ``mim train`` (``data.world=DIR mm_table=DIR out=DIR``)
        config: YAML/JSON CiUBM config file
        image: container image (docker, Kubernetes); local_cwd ignores it and runs in the current directory
        name: job name, ``{experiment}/{run}``; default ``mim/train_ciubm``
        j: {nnodes}x{nproc_per_node}; the world size the planner shards over
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: host memory per node in MB (holds DDR-resident table shards)
        h: a registered named resource; takes precedence over cpu, gpu and memMB
        env: environment variables, ENV1=v1,ENV2=v2
        mounts: artifact mounts, type=bind,src=/host/runs,dst=/runs[,readonly]
        max_retries: retries of a failed job by schedulers that retry (Kubernetes, Slurm; not
            local_cwd), each resuming from the last checkpoint; otherwise rerun the same command
        rdzv_port: c10d rendezvous port on the first node (multi-node only)
    """
    return _distributed(
        "train_ciubm", ["train"], args, config=config, image=image, name=name, j=j, cpu=cpu,
        gpu=gpu, memMB=memMB, h=h, env=env, mounts=mounts, max_retries=max_retries,
        rdzv_port=rdzv_port)


def evaluate(
    *args: str,
    config: Optional[str] = None,
    image: str = torchx.IMAGE,
    name: Optional[str] = None,
    j: str = "1x2",
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 65536,
    h: Optional[str] = None,
    env: Optional[str] = None,
    mounts: Optional[List[str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Evaluate a trained CiUBM run: AUC, GAUC, per category, item-age buckets (``mim train --eval-only``).

    Loads the run's newest checkpoint, re-shards it over ``j`` ranks and writes ``out/eval.json``;
    the run's own config.json (the default config) and metrics.json are left as they are.

    Args:
        args: ``key=value`` overrides for ``mim train``: ``out=RUN``, plus e.g. ``data.world=DIR``
            to score another world's test events
        config: YAML/JSON CiUBM config file; default: the run's own ``out/config.json``
        image: container image (docker, Kubernetes); local_cwd ignores it and runs in the current directory
        name: job name, ``{experiment}/{run}``; default ``mim/evaluate``
        j: {nnodes}x{nproc_per_node}
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: host memory per node in MB
        h: a registered named resource; takes precedence over cpu, gpu and memMB
        env: environment variables, ENV1=v1,ENV2=v2
        mounts: artifact mounts, type=bind,src=/host/runs,dst=/runs[,readonly]
        max_retries: scheduler retries
        rdzv_port: c10d rendezvous port on the first node (multi-node only)
    """
    return _distributed(
        "evaluate", ["train", "--eval-only"], args, config=config, image=image, name=name, j=j, cpu=cpu,
        gpu=gpu, memMB=memMB, h=h, env=env, mounts=mounts, max_retries=max_retries,
        rdzv_port=rdzv_port)


def bench_sharding(
    *args: str,
    config: Optional[str] = None,
    measure: bool = False,
    image: str = torchx.IMAGE,
    name: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    env: Optional[str] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Compare sharding plans for the ID and MM tables (``mim bench sharding``).

    Prints TorchRec planner estimates per plan; with ``measure`` it also spawns
    ``world_size`` local ranks and times real steps under each plan. Planner-only runs
    simulate any topology (``--paper-scale``, ``world_size=100``) on one small host.

    Args:
        args: flags and ``key=value`` overrides for ``mim bench sharding`` (e.g. ``--paper-scale``)
        config: YAML/JSON ShardingBenchConfig file
        measure: run real steps on each plan (needs world_size local devices or CPU ranks);
            TorchX takes only ``True`` (any case) as true
        image: container image (docker, Kubernetes); local_cwd ignores it and runs in the current directory
        name: job name; default ``bench_sharding``
        cpu: CPUs (at least the measured world size)
        gpu: GPUs (the measured world size on cuda)
        memMB: host memory in MB
        h: a registered named resource; takes precedence over cpu, gpu and memMB
        env: environment variables, ENV1=v1,ENV2=v2
        mounts: artifact mounts, type=bind,src=/host/runs,dst=/runs[,readonly]
    """
    command = ["bench", "sharding"] + (["--measure"] if measure else [])
    return _single(
        "bench_sharding", command, args, config=config, image=image, name=name, cpu=cpu,
        gpu=gpu, memMB=memMB, h=h, env=env, mounts=mounts)
