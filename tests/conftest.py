"""Fixtures shared by test files: the tiny ``mim pipeline`` run folder (slow to make, so made once
per session and reused by the pipeline and the experiment tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_mim(*argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``mim ARGV`` as its own process from the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "train.cli", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Tuple[Path, subprocess.CompletedProcess]:
    """``(run folder, result)`` of ``mim pipeline --preset tiny``."""
    out = tmp_path_factory.mktemp("pipeline") / "run"
    return out, run_mim("pipeline", "--preset", "tiny", "--out", str(out))
