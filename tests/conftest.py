"""Fixtures shared by test files: the tiny ``mim pipeline`` run folder (slow to make, so made once
per session and reused by the pipeline and the experiment tests), and the device the suite runs on.

The suite runs on the CPU, as CI does, on any host: a GPU host would otherwise send the
``device=auto`` code to CUDA in some tests and the explicit CPU set-ups of others to gloo, mixing
backends in one process group. ``MIM_TEST_DEVICE=cuda`` runs the modules marked ``cuda`` on the
GPU instead (nccl, FBGEMM's CUDA kernels, TorchRec's pipelined CUDA streams) and skips the rest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]

TEST_DEVICE = os.environ.get("MIM_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"MIM_TEST_DEVICE={TEST_DEVICE!r}: choose cpu (the default) or cuda")
if TEST_DEVICE == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first looks; child processes inherit it


def pytest_collection_modifyitems(config, items) -> None:
    if TEST_DEVICE != "cuda":
        return
    import torch
    if not torch.cuda.is_available():
        raise pytest.UsageError("MIM_TEST_DEVICE=cuda: no CUDA device is visible")
    cpu_only = pytest.mark.skip(reason="a CPU check (MIM_TEST_DEVICE=cuda runs the modules marked cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is None:
            item.add_marker(cpu_only)


@pytest.fixture(scope="session")
def test_device() -> str:
    """"cpu" or "cuda": where tests that set up their own process group put it."""
    return TEST_DEVICE


def run_mim(*argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``mim ARGV`` as its own process from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "train.cli", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Tuple[Path, subprocess.CompletedProcess]:
    """``(run folder, result)`` of ``mim pipeline --preset tiny``."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    return out, run_mim("pipeline", "--preset", "tiny", "--out", str(out))


@pytest.fixture(scope="session")
def small_world(tmp_path_factory) -> Path:
    """The world of ``mim data synth --tiny events=300 test_days=20`` (seconds to make): 600 items,
    15 purchase pairs for C-SFT and 220 training events, fewer than the tiny preset's CTR batch
    of 128 per rank on 2 ranks."""
    from dataclasses import replace

    from mim_rec.data.synth import SynthConfig, generate_world, tiny

    return generate_world(replace(tiny(SynthConfig()), events=300, test_days=20), tmp_path_factory.mktemp("small"))
