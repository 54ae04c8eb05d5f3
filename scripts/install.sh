#!/usr/bin/env bash
# Create or refresh .venv with mim_rec and its pinned stack.
#   scripts/install.sh          the stack this venv already has; CPU for a new one
#   scripts/install.sh --cpu    CPU stack (fbgemm-gpu-cpu, gloo)   -- laptops, CI
#   scripts/install.sh --gpu    CUDA stack (fbgemm-gpu, nccl)      -- GPU hosts
# Idempotent: when requirements/* and setup.cfg are unchanged since the last successful
# run, it only checks that the environment imports and returns in a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
case "${1:-}" in
  --gpu) variant=gpu ;;
  --cpu) variant=cpu ;;
  "") variant=cpu; [[ -f "$VENV/.mim-install-gpu" ]] && variant=gpu ;;  # `make test` after `make install-gpu`
  *) echo "usage: scripts/install.sh [--cpu|--gpu]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
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
rm -f "$VENV/.mim-install-cpu" "$VENV/.mim-install-gpu"  # written again once this one succeeds
# This variant's fbgemm build, then the other's. Both ship the folder fbgemm_gpu/, so removing
# one deletes the other's files: a switch removes both before installing one afresh.
fbgemm=(fbgemm-gpu-cpu fbgemm-gpu)
[[ "$variant" == gpu ]] && fbgemm=(fbgemm-gpu fbgemm-gpu-cpu)
if "$VENV/bin/python" -m pip show -q "${fbgemm[1]}" >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip uninstall -y -q "${fbgemm[@]}"
fi
if [[ "$variant" == gpu ]]; then
  # CUDA wheels of torch come from the PyTorch index on GPU hosts.
  "${pip[@]}" -r requirements/gpu.txt ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
else
  "${pip[@]}" -r requirements/cpu.txt
fi
"${pip[@]}" --no-deps -r requirements/nodeps.txt
"${pip[@]}" --no-deps -e .
"$VENV/bin/python" -c "import mim_rec, torchrec, fbgemm_gpu, timm, transformers, torchx" \
  || { echo "[install] import check failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[install] done: $("$VENV/bin/python" -c 'import torch, torchrec; print("torch", torch.__version__, "| torchrec", torchrec.__version__)')"
