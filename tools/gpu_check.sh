#!/usr/bin/env bash
# The GPU checks, prepared as one command for a session that is lent a GPU (an H200 here):
#
#   device run:  bash tools/gpu_check.sh            (timeout_s 540; ~5 minutes expected)
#
# 1. the loss-kernel parity tests with the real Triton kernel on CUDA tensors, and the
#    sync-guard and benchmark-plumbing tests;
# 2. tools/bench_loss.py: naive / reference / eager / compile / triton, N = 1e5 1e6 4e6,
#    fp32 and bf16, the event-timed steady-state table, the Triton block sweep and the
#    set_sync_debug_mode("error") check of every path.
# Logs go to $OUT (the device tool brings that folder back) or ./gpu_check_out.
# Record the figures in docs/loss_kernel.md#gpu-h200 and docs/benchmarks.md.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
SIZES=${SIZES:-1e5 1e6 4e6}  # SIZES=1e4 for a dry run of the plumbing on a CPU

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv || true
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

echo "== tests (real kernel on CUDA tensors)" | tee "$OUT/pytest.txt"
timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_loss_kernel.py tests/test_sync_guard.py \
  tests/test_bench_loss.py 2>&1 | tee -a "$OUT/pytest.txt"
rc_tests=${PIPESTATUS[0]}

echo "== bench_loss" | tee "$OUT/bench_loss.txt"
timeout 280 $PY tools/bench_loss.py --sizes $SIZES --dtypes fp32 bf16 --repeats 20 2>&1 \
  | tee -a "$OUT/bench_loss.txt"
rc_bench=${PIPESTATUS[0]}

echo "tests rc=$rc_tests bench rc=$rc_bench" | tee -a "$OUT/env.txt"
[ "$rc_tests" = 0 ] && [ "$rc_bench" = 0 ]
