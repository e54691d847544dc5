#!/usr/bin/env bash
# Device call after call_b: fuzz on the GPU, then same-run before/after timings (old = .old tree, 4290531) and host time.
set -o pipefail; export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
el "fuzz GPU"
ATTNKIT_FUZZ_EXAMPLES=0.3 timeout 200 python3 -m pytest -p no:cacheprovider --tb=short -rf -q -n 8 tests/test_fuzz_gpu.py > $OUT/fuzz_gpu.log 2>&1
tail -1 $OUT/fuzz_gpu.log; grep -E "^FAILED" $OUT/fuzz_gpu.log | head
el "before/after slice"
for which in old new; do
  if [ $which = old ]; then P=$PWD/.old/src; S=.old/benchmarks/softmax_gpu.py; else P=$PWD/src; S=benchmarks/softmax_gpu.py; fi
  PYTHONPATH=/tmp/site:$P timeout 120 python3 $S --out $OUT --suffix=-$which --D 128 --T 4096 --patterns causal document8_causal sliding_window_1024 causal_softcap30 --peers sdpa-cudnn --rep 30 --warm-s 0.2 --no-memory 2>&1 | tail -12
  PYTHONPATH=/tmp/site:$P timeout 40 python3 benchmarks/host_time.py --label $which 2>&1 | tee -a $OUT/host_time.txt
done
el "linear vs fla, T=4096"
timeout 150 python3 benchmarks/linear_gpu.py --out $OUT --T 4096 --no-decode 2>&1 | tail -25
el "done"
