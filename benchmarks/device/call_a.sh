#!/usr/bin/env bash
# Session 6, device call A (H200): correctness first, then same-run before/after timings of the softmax kernels.
set -o pipefail; export PYTHONUNBUFFERED=1
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee $OUT/env.txt
el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
el "softmax GPU suite (run 1)"
timeout 230 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_triton_gpu.py 2>&1 | tail -25 | tee $OUT/softmax_gpu_run1.log
el "linear GPU suite"
ATTNKIT_LINEAR_GPU_OUT=$OUT timeout 200 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_linear_triton_gpu.py 2>&1 | tail -30 | tee $OUT/linear_gpu.log
el "before/after slice (attnkit triton only + cudnn), old tree then new"
for which in old new; do
  if [ $which = old ]; then P=$PWD/.old/src; S=.old/benchmarks/softmax_gpu.py; else P=$PWD/src; S=benchmarks/softmax_gpu.py; fi
  PYTHONPATH=/tmp/site:$P timeout 100 python3 $S --out $OUT --suffix -$which --D 128 --T 4096 --patterns causal document8_causal sliding_window_1024 causal_softcap30 --peers sdpa-cudnn --rep 30 --warm-s 0.2 --no-memory 2>&1 | tail -4
  PYTHONPATH=/tmp/site:$P timeout 40 python3 benchmarks/host_time.py --label $which 2>&1 | tee -a $OUT/host_time.txt
done
el "done"
