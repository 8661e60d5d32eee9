#!/usr/bin/env bash
# The GPU checks of the training engine (#6), as one script for a short lent-GPU session.
#
#   OUT=gpu-out bash tools/gpu_checks.sh               # both parts, ~8 min on an H100/H200; all under $OUT
#   OUT=gpu-out ONLY=tests bash tools/gpu_checks.sh    # part 1 only (the device tool allows 600 s a call)
#   OUT=gpu-out ONLY=bench bash tools/gpu_checks.sh    # part 2 only
#   OUT=gpu-out ONLY=bench COMPILE_MODE=default bash tools/gpu_checks.sh   # part 2 without CUDA graphs
#
# 1. the `gpu`-marked tests of the training engine and the batched transforms (eager bf16 epoch,
#    CUDA graphs inside `cxrloc train` against eager, GPU augmentation), with their full output;
# 2. benchmarks/train.py on the GPU with train.compile_mode=reduce-overhead: steps of the baseline,
#    DLRV and DLRV under CUDA graphs, then one real `cxrloc.train.train` epoch of each (images/s
#    inside Lightning, after compilation and graph recording).
# Runs from the repository root without installing the package (PYTHONPATH=src); needs torch,
# lightning, numpy, pandas, scipy, pyyaml, pytest. Each step has its own time limit so a hang in
# one still leaves the other's output.
set -u
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
} > "$OUT/machine.txt" 2>&1

ONLY=${ONLY:-tests bench}
if [[ " $ONLY " == *" tests "* ]]; then
timeout "${TEST_LIMIT_S:-240}" "$PY" -m pytest -m gpu -p no:cacheprovider -q -rA \
    tests/train/test_train_configs.py tests/data/test_transforms.py > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests: exit $?" | tee -a "$OUT/machine.txt"
tail -5 "$OUT/gpu_tests.txt"
fi

if [[ " $ONLY " == *" bench "* ]]; then
MODE=${COMPILE_MODE:-reduce-overhead}
timeout "${BENCH_LIMIT_S:-420}" "$PY" benchmarks/train.py --devices cuda --compile-mode "$MODE" \
    --engine-anchors "${ENGINE_ANCHORS:-1024}" --out "$OUT/train_gpu_compile_engine_$MODE.json" \
    > "$OUT/train_gpu_compile_engine_$MODE.txt" 2>&1
echo "train benchmark ($MODE): exit $?" | tee -a "$OUT/machine.txt"
tail -25 "$OUT/train_gpu_compile_engine_$MODE.txt"
fi
