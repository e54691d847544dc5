#!/usr/bin/env bash
# One device call that verifies the CUDA paths of the CLI: GPU kernel tests, attnkit check --triton, attnkit bench --peers.
# Usage (device machine, repo root): OUT=/some/dir bash benchmarks/verify_cuda.sh
set -o pipefail; export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD/src
python3 -c "import attnkit, torch, triton; print('attnkit', attnkit.__version__, 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 200 python3 -m pytest -q -x -n 8 tests/test_triton_gpu.py 2>&1 | tail -3 | tee $OUT/gpu_tests.txt
timeout 260 python3 -m attnkit.tools.cli check softmax softmax_sink softcap alibi relative_bias ssmax sigmoid relu2 sliding_window streaming_llm prefix_lm document differential --device cuda --dtype bf16 --triton --patterns causal-self,cross 2>/dev/null | tee $OUT/check_cuda.txt | tail -40
timeout 200 python3 -m attnkit.tools.cli bench --device cuda --peers --backend auto --variants softmax,softcap,alibi --patterns causal-self --lengths 4k --heads 16 --dim 128 --batch 4 --dtype bf16 --quiet --markdown --out $OUT/bench_cli_cuda.json 2>&1 | tee $OUT/bench_cli_cuda.md | tail -20
