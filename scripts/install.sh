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
chosen="$VENV/.mim-variant"  # the stack this venv is meant to hold, kept through a failed install
case "${1:-}" in
  --gpu) variant=gpu ;;
  --cpu) variant=cpu ;;
  "") variant=cpu  # `make test` after `make install-gpu` keeps the CUDA stack
      if [[ -f "$chosen" ]]; then variant=$(cat "$chosen"); elif [[ -f "$VENV/.mim-install-gpu" ]]; then variant=gpu; fi ;;
  *) echo "usage: scripts/install.sh [--cpu|--gpu]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
stamp="$VENV/.mim-install-$variant"
want=$(cat requirements/*.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
# This variant's fbgemm build, then the other's: both ship the folder fbgemm_gpu/.
fbgemm=(fbgemm-gpu-cpu fbgemm-gpu)
[[ "$variant" == gpu ]] && fbgemm=(fbgemm-gpu fbgemm-gpu-cpu)
has() { "$VENV/bin/python" -m pip show -q "$1" >/dev/null 2>&1; }

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && has "${fbgemm[0]}" && ! has "${fbgemm[1]}" \
   && "$VENV/bin/python" -c "import mim_rec, torchrec, fbgemm_gpu" 2>/dev/null; then
  echo "[install] $VENV is up to date ($variant)"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
echo "[install] $variant stack into $VENV (first run takes a few minutes)"
echo "$variant" > "$chosen"
rm -f "$VENV/.mim-install-cpu" "$VENV/.mim-install-gpu"  # written again once this one succeeds
# Removing one fbgemm build deletes the other's files (the same folder): a switch, or a venv
# holding both, removes both before installing one afresh.
if has "${fbgemm[1]}"; then
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
