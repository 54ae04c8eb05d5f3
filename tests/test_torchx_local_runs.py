"""Real jobs of the stage components under TorchX's local_cwd scheduler (CPU, gloo, 2 ranks).

Only stages whose ``mim`` sub-command exists can run; the others are covered by the dry-run
tests in test_torchx_components.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mim_rec.config import to_dict
from mim_rec.pretrain.config import PretrainConfig, PretrainDataConfig
from tests.encoder_fixtures import tiny_encoders, write_items

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_pretrain_component_runs_two_gloo_ranks_under_local_cwd(tmp_path):
    world = write_items(tmp_path / "world" / "items.parquet", count=32).parent
    out = tmp_path / "pretrain"
    config = PretrainConfig(
        encoders=tiny_encoders(), data=PretrainDataConfig(world=str(world), batch_size=8),
        dda_steps=2, dma_steps=2, log_every=1, out=str(out))
    config_file = tmp_path / "pretrain.yaml"
    config_file.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(config)))))
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(
        [str(VENV_BIN / "torchx"), "run", "--wait", "--log", "-s", "local_cwd",
         "torchx_components/mim.py:pretrain", "-j", "1x2", "--cpu", "2",
         "--config", str(config_file)],
        cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    assert done.returncode == 0 and "SUCCEEDED" in done.stdout + done.stderr, (
        done.stdout[-2000:] + done.stderr[-2000:])
    start = json.loads((out / "metrics.jsonl").open().readline())
    assert start["world_size"] == 2
    assert (out / "encoders" / "manifest.json").exists()
