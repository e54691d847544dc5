#!/usr/bin/env bash
# Next device call (H200), correctness first. Every section bounded; logs written as they go (pytest -v / -rf).
# Carry: [".whl", ".old"].  Expected wall: ~9.5 min.
set -o pipefail; export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee $OUT/env.txt
PT="python3 -m pytest -p no:cacheprovider --tb=short -rf"
el "softmax GPU suite without the padded head dims (run 1 after the dot_visible fix)"
timeout 220 $PT -v -n 8 tests/test_triton_gpu.py -k "not head_dims" > $OUT/softmax_gpu.log 2>&1
grep -E "passed|failed" $OUT/softmax_gpu.log | tail -1; grep -E "^FAILED" $OUT/softmax_gpu.log | head -20
el "head-dim tests, one process each (an illegal address must not poison others)"
for id in $(python3 -m pytest -q --collect-only -p no:cacheprovider tests/test_triton_gpu.py -k head_dims 2>/dev/null | grep "::"); do
  timeout 60 $PT -q -p no:xdist "$id" > /tmp/one.log 2>&1; echo "$(tail -1 /tmp/one.log | cut -c1-90)  $id"
done | tee $OUT/head_dims.log
el "linear GPU suite (fp32 tiles fixed, retention decay fp32)"
ATTNKIT_LINEAR_GPU_OUT=$OUT timeout 170 $PT -q -n 8 tests/test_linear_triton_gpu.py > $OUT/linear_gpu.log 2>&1
tail -1 $OUT/linear_gpu.log; grep -E "^FAILED" $OUT/linear_gpu.log | head
el "decode GPU suite"
timeout 150 $PT -q -n 8 tests/test_decode_gpu.py > $OUT/decode_gpu.log 2>&1; tail -1 $OUT/decode_gpu.log; grep -E "^FAILED" $OUT/decode_gpu.log | head
el "done"
