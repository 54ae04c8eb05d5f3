#!/bin/bash
# The second session's calls on the H200 (../REPORT.md, "Second visit"), as one script, run from
# the repository root with .gpu/ as for device_checks.sh. Three calls ran its three parts.
set -u
export PYTHONUNBUFFERED=1 CUDA_MODULE_LOADING=LAZY
OUT=${OUT:-/tmp/out}; mkdir -p $OUT /tmp/site
if command -v xz >/dev/null; then tar -xJf .gpu/fbgemm_sm90.tar.xz -C /tmp/site
else python3 -c "import tarfile; tarfile.open('.gpu/fbgemm_sm90.tar.xz').extractall('/tmp/site')"; fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
BUNDLE=docs/reports/gpu_h200/bundle
# 1. the whole CiUBM test module on the GPU, in one process
MIM_TEST_DEVICE=cuda timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_ciubm.py --durations=8 \
  -W ignore::UserWarning -W ignore::FutureWarning > $OUT/pytest_cuda.log 2>&1; echo "pytest rc=$?"
# 2. the planner's one-GPU plan against every table pinned table_wise
timeout 200 python3 $BUNDLE/sharding_speed.py cuda avg din dien sim > $OUT/sharding_speed.log 2>&1; echo "rc=$?"
# 3. where an inference forward's time goes, TorchRec against the nn.Embedding reference
for ubm in avg din; do
  timeout 60 python3 $BUNDLE/profile_infer.py cuda $ubm > $OUT/profile_$ubm.log 2>&1; echo "rc=$?"
done
