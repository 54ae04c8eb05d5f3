"""``scripts/install.sh`` against a stand-in venv whose python logs what it is asked to do
(nothing is installed): which stack a run picks, and how it switches fbgemm builds."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$LOG"
if [[ "$*" == *"pip show"* ]]; then
  [[ -n "$INSTALLED" && "$*" == *" $INSTALLED" ]] && exit 0 || exit 1
fi
[[ -n "$FAIL" && "$*" == *"$FAIL"* ]] && exit 1
exit 0
"""


def _install(tmp_path: Path, *args: str, stamp: str = "", installed: str = "", fail: str = "") -> List[str]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    if stamp:
        (venv / f".mim-install-{stamp}").write_text("an older install\n")
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "VENV": str(venv), "LOG": str(log), "INSTALLED": installed, "FAIL": fail}
    done = subprocess.run(["bash", "scripts/install.sh", *args], cwd=ROOT, env=env, capture_output=True)
    assert (done.returncode != 0) == bool(fail), done.stderr
    return log.read_text().splitlines()


def _requirements(calls: List[str]) -> List[str]:
    return [c.split("-r ")[1].split()[0] for c in calls if "pip install" in c and "-r requirements/" in c
            and "nodeps" not in c]


def test_a_plain_install_keeps_the_gpu_stack_a_venv_has(tmp_path):
    """`make test` after `make install-gpu` put the CPU fbgemm over the CUDA one."""
    assert _requirements(_install(tmp_path, stamp="gpu")) == ["requirements/gpu.txt"]
    assert _requirements(_install(tmp_path, installed="fbgemm-gpu")) == []  # up to date: checked, not replaced
    assert _requirements(_install(tmp_path, "--cpu")) == ["requirements/cpu.txt"]
    assert sorted(p.name for p in (tmp_path / "venv").glob(".mim-install-*")) == [".mim-install-cpu"]
    assert _requirements(_install(tmp_path, stamp="cpu")) == ["requirements/cpu.txt"]


def test_a_failed_gpu_install_is_retried_as_gpu_and_a_wrong_fbgemm_is_repaired(tmp_path):
    """A failed --gpu refresh left no stamp, and the next plain run installed the CPU stack; a
    venv holding the wrong fbgemm build with a current stamp was reported up to date."""
    _install(tmp_path, "--gpu", fail="requirements/gpu.txt")
    assert _requirements(_install(tmp_path)) == ["requirements/gpu.txt"]
    assert _requirements(_install(tmp_path, installed="fbgemm-gpu-cpu")) == ["requirements/gpu.txt"]


def test_switching_builds_removes_both_fbgemm_packages_first(tmp_path):
    """Both ship the folder fbgemm_gpu/: removing the CPU build after installing the CUDA one
    deleted the files the CUDA build had just written."""
    calls = _install(tmp_path, "--gpu", installed="fbgemm-gpu-cpu")
    removal = next(i for i, c in enumerate(calls) if "pip uninstall" in c)
    assert calls[removal].split()[-2:] == ["fbgemm-gpu", "fbgemm-gpu-cpu"]
    assert removal < next(i for i, c in enumerate(calls) if "requirements/gpu.txt" in c)
    assert not any("pip uninstall" in c for c in _install(tmp_path, "--gpu"))  # nothing to switch from
