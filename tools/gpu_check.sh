#!/usr/bin/env bash
# The GPU checks as one command, for a session lent a GPU (issue 19). On a machine of this
# workplace's device tool, from the repository root, after `bash tools/make_gpu_wheels.sh` here:
#
#   device run:  bash tools/gpu_check.sh        (timeout_s 600, carry [".whl"])
#
# Every step has its own `timeout`; together they stay under 9 minutes (540 s; the data is generated
# in the background, under its own timeout, while steps 1 and 2 run). Figures go to $OUT
# (the device tool brings back at most 8 files, so there are 8), else ./gpu_check_out:
#   env.txt       machine, versions, the resolved sparse backend, and each step's exit status
#   parity.txt/.json   1. SpUNet (test and full widths) under spconv-Triton on CUDA against spconv on
#                 the CPU (float32, one thread; float64 as the yardstick): tools/gpu_parity.py
#   loss.txt      2. the loss kernel's parity tests on CUDA tensors + tools/bench_loss.py
#   steps.txt/.json    3. training steps at full size (0.05 m voxels, whole 1241 x 376 images, batch 4):
#                 scans/s and peak memory, no-KD / cached-KD / online teacher / fusion teacher, fp32
#                 and AMP: tools/bench_gpu_steps.py
#   e2e.txt, e2e_metrics.json   4. tools/train.py (teacher, baseline, student: ~300 steps) on the
#                 quickstart, the loss at the first and last logged steps, then tools/test.py
# Record the figures in docs/benchmarks.md ("GPU") and docs/loss_kernel.md.
#
# Dry run of the plumbing on a CPU (tests/test_gpu_check.py): DEVICE=cpu, tiny sizes, spconv on the
# CPU on both sides of the parity check. CHECKS selects steps (default: "parity loss steps e2e").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu_check_work}
WHEELS=${WHEELS:-.whl}
BACKEND=${BACKEND:-auto}  # student.model.backend and teacher.model.point.backend for steps 3 and 4
CHECKS=${CHECKS:-parity loss steps e2e}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" TRITON_CACHE_DIR="$WORK/triton"  # one compile cache for all steps

if [ "$DEVICE" = cpu ]; then  # tiny everything: checks that every command and path works, in ~1 minute
  PARITY_BACKEND=spconv PARITY_SIZES=tiny FRAMES=4 GEN="--azimuth-steps 256 --render-scale 0.1"
  LOSS_TESTS="tests/test_bench_loss.py" LOSS_BENCH="--sizes 1e3 --dtypes fp32 --impls naive eager --repeats 1"
  POINT='{base_channels: 8, channels: [8, 8, 8, 8, 8, 8, 8, 8], layers: [1, 1, 1, 1, 1, 1, 1, 1], stem_kernel: 3}'
  STEPS_CFG="configs/kitti/quickstart.yaml"
  STEPS_OVR=("data.train.voxel_size=[0.4,0.4,0.4]" "student.model=$POINT" "teacher.model.point=$POINT")
  STEPS_OPT=(--batch 1 --steps 1 --warmup 1 --precisions fp32)
  E2E_ARGS=("data.train.voxel_size=[0.4,0.4,0.4]" "data.val.voxel_size=[0.4,0.4,0.4]" "student.model=$POINT"
            "teacher.model.point=$POINT" teacher.optim.epochs=1 student.optim.epochs=1
            teacher.optim.max_steps_per_epoch=2 student.optim.max_steps_per_epoch=2 eval_interval=1 log_interval=1)
  E2E_FRAMES=4 E2E_GEN="$GEN" WORKERS=0
  T_PARITY=60 T_LOSS_TESTS=60 T_LOSS_BENCH=60 T_STEPS=120 T_TRAIN=120 T_TEST=60
else
  PARITY_BACKEND=spconv_triton PARITY_SIZES="test full" FRAMES=48 GEN=""
  LOSS_TESTS="tests/test_loss_kernel.py tests/test_sync_guard.py tests/test_bench_loss.py"
  LOSS_BENCH="--sizes 1e5 1e6 4e6 --dtypes fp32 bf16 --repeats 10"
  STEPS_CFG="configs/kitti_fusion_pssm.yaml"
  STEPS_OVR=(data.train.image_crop_hw=null)
  STEPS_OPT=(--batch 4 --steps 8 --warmup 3)
  # the quickstart as configured (its 2 x 32 frames, test-size models), 6 epochs per stage:
  # 16 steps x 6 x 3 stages = 288 steps, validated once at the end of each stage
  E2E_ARGS=(teacher.optim.epochs=6 student.optim.epochs=6 eval_interval=6 log_interval=8)
  E2E_FRAMES=32 E2E_GEN="--seed 0 --render-scale 0.25 --azimuth-steps 512" WORKERS=6
  T_PARITY=110 T_LOSS_TESTS=40 T_LOSS_BENCH=70 T_STEPS=140 T_TRAIN=95 T_TEST=25
fi
declare -A RC
has() { [[ " $CHECKS " == *" $1 "* ]]; }

# 0. wheels (the GPU machine has no registry: tools/make_gpu_wheels.sh fills .whl here)
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  timeout 20 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHEELS"/*.whl && export PYTHONPATH="$PWD:$WORK/site"
  RC[wheels]=$?
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  timeout 10 $PY - "$DEVICE" "$BACKEND" <<'EOF'
import importlib.metadata as m, sys, torch
def v(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "absent"
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
print(" | ".join(f"{n} {v(n)}" for n in ("triton", "spconv", "spconv-triton", "omegaconf", "numpy")))
from pcseg_kd.models.sparse.backend import resolve_backend, spconv_has_cuda
print(f"backend {sys.argv[2]} on {sys.argv[1]} -> {resolve_backend(sys.argv[2], sys.argv[1])}"
      f" (spconv CUDA build: {spconv_has_cuda()})")
EOF
} >"$OUT/env.txt" 2>&1
RC[env]=$?
cat "$OUT/env.txt"

# data: full-resolution synthetic scans (sequence 00) in the background while parity and the loss run
DATA="$WORK/synthetic_full"
if has steps && [ ! -d "$DATA/sequences" ]; then
  timeout 120 $PY tools/make_synthetic_kitti.py --out "$DATA" --sequences 00 --frames "$FRAMES" $GEN \
    >"$WORK/gen.log" 2>&1 &
  GEN_PID=$!
fi
QUICK="$WORK/quickstart_data"  # step 4's: the quickstart's spec (2 x 32 frames, quarter-size renders)
if has e2e && [ ! -d "$QUICK/sequences" ]; then
  timeout 120 $PY tools/make_synthetic_kitti.py --out "$QUICK" --sequences 00 08 --frames $E2E_FRAMES $E2E_GEN \
    >"$WORK/gen_quick.log" 2>&1 &
  GEN_PID="${GEN_PID:-} $!"
fi
PARITY_DATA="$WORK/synthetic_one"  # one scan of its own: parity need not wait for the 48
has parity && [ ! -d "$PARITY_DATA/sequences" ] && timeout 20 $PY tools/make_synthetic_kitti.py --out "$PARITY_DATA" \
  --sequences 00 --frames 1 --no-images $GEN >/dev/null 2>&1

if has parity; then  # 1.
  echo "== parity: SpUNet, $PARITY_BACKEND on $DEVICE vs spconv on CPU" | tee "$OUT/parity.txt"
  timeout $T_PARITY $PY tools/gpu_parity.py --root "$PARITY_DATA" --device "$DEVICE" --backend "$PARITY_BACKEND" \
    --sizes $PARITY_SIZES --out "$OUT/parity.json" 2>&1 | tee -a "$OUT/parity.txt"
  RC[parity]=${PIPESTATUS[0]}
fi

if has loss; then  # 2.
  echo "== loss kernel tests ($LOSS_TESTS)" | tee "$OUT/loss.txt"
  timeout $T_LOSS_TESTS $PY -m pytest -q -p no:cacheprovider $LOSS_TESTS 2>&1 | tee -a "$OUT/loss.txt"
  RC[loss_tests]=${PIPESTATUS[0]}
  echo "== bench_loss $LOSS_BENCH" | tee -a "$OUT/loss.txt"
  timeout $T_LOSS_BENCH $PY tools/bench_loss.py --device "$DEVICE" $LOSS_BENCH 2>&1 | tee -a "$OUT/loss.txt"
  RC[loss_bench]=${PIPESTATUS[0]}
fi

for pid in ${GEN_PID:-}; do wait "$pid" || RC[data]=$?; done
[ -n "${GEN_PID:-}" ] && { RC[data]=${RC[data]:-0}; tail -q -n 1 "$WORK"/gen*.log; }

if has steps; then  # 3.
  echo "== training steps: $STEPS_CFG, backend $BACKEND" | tee "$OUT/steps.txt"
  timeout $T_STEPS $PY tools/bench_gpu_steps.py "$STEPS_CFG" "data.train.root=$DATA" data.synthetic=null \
    "data.train.sequences=[00]" data.num_workers=$WORKERS "student.model.backend=$BACKEND" \
    "teacher.model.point.backend=$BACKEND" "${STEPS_OVR[@]}" --device "$DEVICE" --work-dir "$WORK/steps" \
    --no-progress --out "$OUT/steps.json" "${STEPS_OPT[@]}" 2>&1 | tee -a "$OUT/steps.txt"
  RC[steps]=${PIPESTATUS[0]}
fi

if has e2e; then  # 4.
  ARGS=(configs/kitti/quickstart.yaml "data.train.root=$QUICK" "data.val.root=$QUICK" data.synthetic=null device=$DEVICE
        data.num_workers=$WORKERS "student.model.backend=$BACKEND" "teacher.model.point.backend=$BACKEND"
        "${E2E_ARGS[@]}")
  rm -rf "$WORK/e2e"
  echo "== tools/train.py ${ARGS[*]}" | tee "$OUT/e2e.txt"
  timeout $T_TRAIN $PY tools/train.py "${ARGS[@]}" --work-dir "$WORK/e2e" --no-progress 2>&1 | tee -a "$OUT/e2e.txt"
  RC[train]=${PIPESTATUS[0]}
  timeout 10 $PY - "$WORK/e2e" <<'EOF' 2>&1 | tee -a "$OUT/e2e.txt"
import json, sys
from pathlib import Path
for stage in ("teacher", "baseline", "student"):  # the training loss at the first and last logged steps
    log = Path(sys.argv[1]) / stage / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    rows = [(r["global_step"], sum(v for k, v in r.items() if k.startswith("loss")))
            for r in rows if "global_step" in r and any(k.startswith("loss") for k in r)]
    print(f"{stage}: " + (f"loss (sum of the logged loss_* terms) {rows[0][1]:.4f} at step {rows[0][0]} -> "
                          f"{rows[-1][1]:.4f} at step {rows[-1][0]} ({len(rows)} logged)" if rows else "no logged loss"))
EOF
  echo "== tools/test.py --stage student" | tee -a "$OUT/e2e.txt"
  timeout $T_TEST $PY tools/test.py "${ARGS[@]}" --work-dir "$WORK/e2e" --stage student --device "$DEVICE" \
    --no-progress 2>&1 | tee -a "$OUT/e2e.txt"
  RC[test]=${PIPESTATUS[0]}
  cp "$WORK/e2e/metrics.json" "$OUT/e2e_metrics.json" 2>/dev/null
fi

summary=""
for k in wheels env data parity loss_tests loss_bench steps train test; do
  [ -n "${RC[$k]+x}" ] && summary+="$k rc=${RC[$k]} "
done
echo "$summary" | tee -a "$OUT/env.txt"
for k in "${!RC[@]}"; do [ "${RC[$k]}" = 0 ] || exit 1; done
