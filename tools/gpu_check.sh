#!/usr/bin/env bash
# The GPU checks, prepared as one command for a session that is lent a GPU (an H200 here):
#
#   device run:  bash tools/gpu_check.sh            (timeout_s 600; its steps are capped at 580 s; carry [".whl"] if you made it)
#
# 1. the loss-kernel parity tests with the real Triton kernel on CUDA tensors, and the
#    sync-guard and benchmark-plumbing tests;
# 2. tools/bench_loss.py: naive / reference / eager / compile / triton, N = 1e5 1e6 4e6,
#    fp32 and bf16, the event-timed steady-state table, the Triton block sweep and the
#    set_sync_debug_mode("error") check of every path;
# 3. tools/bench_models.py for the image teacher; 4. a few image-teacher training steps.
# Logs go to $OUT (the device tool brings that folder back) or ./gpu_check_out.
# Record the figures in docs/loss_kernel.md#gpu-h200 and docs/benchmarks.md.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
SIZES=${SIZES:-1e5 1e6 4e6}  # dry run of the plumbing on a CPU: SIZES=1e4 DEVICE=cpu PYTHON=python
DEVICE=${DEVICE:-cuda}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv || true
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

echo "== tests (real kernel on CUDA tensors)" | tee "$OUT/pytest.txt"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_loss_kernel.py tests/test_sync_guard.py \
  tests/test_bench_loss.py 2>&1 | tee -a "$OUT/pytest.txt"
rc_tests=${PIPESTATUS[0]}

echo "== bench_loss" | tee "$OUT/bench_loss.txt"
timeout 250 $PY tools/bench_loss.py --sizes $SIZES --dtypes fp32 bf16 --repeats 20 2>&1 \
  | tee -a "$OUT/bench_loss.txt"
rc_bench=${PIPESTATUS[0]}

# 3. models on CUDA. spconv's CUDA wheel (spconv-cu121: 76 MB, + cumm 28 MB) is over the device
#    tool's 64 MiB carry limit and the image has no spconv, so only the image teacher runs here.
echo "== bench_models (resnet_fcn)" | tee "$OUT/bench_models.txt"
timeout 80 $PY tools/bench_models.py --models resnet_fcn --steps 10 2>&1 | tee -a "$OUT/bench_models.txt"
rc_models=${PIPESTATUS[0]}

# 4. a few image-teacher training steps through tools/train.py (CUDA, AMP). tools/train.py needs
#    omegaconf, which the device image lacks: carry it as wheels in .whl/ (pip download
#    omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 --no-deps -d .whl; name .whl in carry).
rc_train=skipped
if $PY -c "import omegaconf" 2>/dev/null || { [ -d .whl ] && $PY -m pip install -q --no-index --find-links .whl omegaconf; }; then
  echo "== train (image teacher, CUDA, AMP)" | tee "$OUT/train.txt"
  timeout 100 $PY tools/train.py configs/kitti_image_pssm.yaml --work-dir "$OUT/wd" --no-progress \
    data.train.root=data/synthetic_kitti data.val.root=data/synthetic_kitti "data.train.sequences=['00']" \
    "data.val.sequences=['08']" "data.synthetic={sequences: ['00', '08'], frames: 8, render_scale: 0.25}" \
    stages=[teacher] teacher.optim.epochs=2 teacher.optim.max_steps_per_epoch=20 data.num_workers=4 \
    device=$DEVICE log_interval=5 2>&1 | tee -a "$OUT/train.txt"
  rc_train=${PIPESTATUS[0]}
  cp "$OUT/wd/teacher/log.jsonl" "$OUT/train_log.jsonl" 2>/dev/null; rm -rf "$OUT/wd"  # the tool brings back 8 files at most
fi

echo "tests rc=$rc_tests bench rc=$rc_bench models rc=$rc_models train rc=$rc_train" | tee -a "$OUT/env.txt"
[ "$rc_tests" = 0 ] && [ "$rc_bench" = 0 ]
