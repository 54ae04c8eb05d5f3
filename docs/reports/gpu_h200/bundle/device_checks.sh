#!/bin/bash
# The first call's script on the H200 (../REPORT.md), run from the repository root with .gpu/
# holding fbgemm_sm90.tar.xz (prune_fbgemm.py) and the wheels of torchrec 1.6.1, tensordict
# 0.15.3, pyvers 0.2.3 and iopath 0.1.10; the machine's image supplied torch 2.11.0+cu130.
set -u
export PYTHONUNBUFFERED=1 CUDA_MODULE_LOADING=LAZY
T0=$(date +%s)
log() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/site
log unpack
if command -v xz >/dev/null; then tar -xJf .gpu/fbgemm_sm90.tar.xz -C /tmp/site
else python3 -c "import tarfile; tarfile.open('.gpu/fbgemm_sm90.tar.xz').extractall('/tmp/site')"; fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L
log import
python3 - <<'PY' 2>&1 | grep -v "compat_table\|cannot determine\|^\s*$\|\[0m\|\[33m\|^WARNING:root"
import torch, fbgemm_gpu, torchrec
print("torch", torch.__version__, "fbgemm", fbgemm_gpu.__version__, "torchrec", torchrec.__version__, torch.cuda.get_device_name())
from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen, EmbeddingLocation, ComputeDevice
from fbgemm_gpu.split_embedding_configs import EmbOptimType
tbe = SplitTableBatchedEmbeddingBagsCodegen([(1000, 16, EmbeddingLocation.DEVICE, ComputeDevice.CUDA)], optimizer=EmbOptimType.ADAM)
idx = torch.randint(0, 1000, (64,), device="cuda"); off = torch.arange(0, 65, 4, device="cuda")
out = tbe(idx, off); out.sum().backward(); torch.cuda.synchronize(); print("TBE adam fwd/bwd ok", tuple(out.shape))
PY
log "pytest (MIM_TEST_DEVICE=cuda)"
MIM_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_ciubm.py -W ignore::UserWarning -W ignore::FutureWarning > $OUT/pytest_cuda.log 2>&1
echo "pytest rc=$?"; grep -v "compat_table\|cannot determine\|^\s*$\|\[0m\|\[33m\|^WARNING:root" $OUT/pytest_cuda.log | tail -40
log "bench layout kernels"
timeout 90 python3 -m train.cli bench layout device=cuda threads=null --json $OUT/layout_cuda.json 2>&1 | grep -v "compat_table\|cannot determine\|^\s*$\|\[0m\|\[33m\|^WARNING:root" | tail -12
log "bench layout sharded (1 rank, nccl)"
timeout 90 python3 -m train.cli bench layout device=cuda threads=null sharded=true ranks=1 --json $OUT/layout_cuda_sharded.json 2>&1 | grep -v "compat_table\|cannot determine\|^\s*$\|\[0m\|\[33m\|^WARNING:root" | tail -12
log "torchrun mim train (nccl, ec layout)"
python3 -m train.cli data synth --tiny --out /tmp/w > /dev/null 2>&1
timeout 90 python3 -m torch.distributed.run --nproc_per_node 1 -m train.cli train data.world=/tmp/w out=/tmp/r \
  model.sequence_layout=ec model.ubm=din max_steps=60 > $OUT/train_nccl.log 2>&1; echo "torchrun rc=$?"
grep -v "compat_table\|cannot determine\|^\s*$\|\[0m\|\[33m\|^WARNING:root" $OUT/train_nccl.log | tail -8; cat /tmp/r/metrics.json 2>/dev/null | head -c 600; echo
log "bench train"
timeout 120 python3 -m train.cli bench train device=cuda steps=10 --json $OUT/bench_train_cuda.json 2>&1 | grep -v "compat_table\|cannot determine\|^\s*$\|\[0m\|\[33m\|^WARNING:root" | tail -24
log done
