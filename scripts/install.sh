#!/usr/bin/env bash
# Create or refresh .venv with mim_rec and its pinned stack.
#   scripts/install.sh          CPU stack (fbgemm-gpu-cpu, gloo)   -- laptops, CI
#   scripts/install.sh --gpu    CUDA stack (fbgemm-gpu, nccl)      -- GPU hosts
# Idempotent: when requirements/* and setup.cfg are unchanged since the last successful
# run, it only checks that the environment imports and returns in a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
variant=cpu
[[ "${1:-}" == "--gpu" ]] && variant=gpu
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.mim-install-$variant"
want=$(cat requirements/*.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] \
   && "$VENV/bin/python" -c "import mim_rec, torchrec, fbgemm_gpu" 2>/dev/null; then
  echo "[install] $VENV is up to date ($variant)"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
echo "[install] $variant stack into $VENV (first run takes a few minutes)"
if [[ "$variant" == gpu ]]; then
  # CUDA wheels of torch come from the PyTorch index on GPU hosts.
  "${pip[@]}" -r requirements/gpu.txt ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
  "$VENV/bin/python" -m pip uninstall -y -q fbgemm-gpu-cpu 2>/dev/null || true
else
  "${pip[@]}" -r requirements/cpu.txt
fi
"${pip[@]}" --no-deps -r requirements/nodeps.txt
"${pip[@]}" --no-deps -e .
"$VENV/bin/python" -c "import mim_rec, torchrec, fbgemm_gpu, timm, transformers, torchx" \
  || { echo "[install] import check failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[install] done: $("$VENV/bin/python" -c 'import torch, torchrec; print("torch", torch.__version__, "| torchrec", torchrec.__version__)')"
