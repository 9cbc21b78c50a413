#!/usr/bin/env bash
# One GPU session: the kernel tests on CUDA, each Triton kernel's check and benchmark against the reference (na2d
# also against flex attention and the blocked plain-PyTorch path), whole models (bf16 training step at batch 64
# beside convnext_tiny and swin_tiny) with the kernels on, off and, for the na2d models, on the blocked path, and
# the 512x512 segmentation training step. Every step has its own
# time limit and runs even when an earlier one failed; results land in $OUT (at most 8 files).
#
#   bash benchmarks/gpu_session.sh [STEP ...]   (repository root, CUDA machine; OUT defaults to ./gpu-out)
#
# STEP: kernel_tests halo aggregated models na2d segmentation (default: all, in that order), or smoke: the
# na2d and models scripts' --dry-run on CPU in the Triton interpreter (no GPU needed; run it before a session).
# HALO_ARGS and MODELS_ARGS add arguments to those steps' scripts.
#
# A timm wheel in .whl/ (optional) is installed to /tmp/site first, so the models build against the timm the
# project pins whatever the machine has.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G '.whl/*.whl' >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:.
else
    export PYTHONPATH=.
fi
status=0
step() {  # step NAME SECONDS COMMAND...: run with a limit, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date +%T)"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== $name rc=$rc $(date +%T)"
    [ $rc -eq 0 ] || status=1
}
run_kernel_tests() {
    step kernel-tests 80 python3 -m pytest -q -x -p no:cacheprovider tests/layers/test_na2d_triton.py \
        tests/layers/test_halo_triton.py tests/layers/test_aggregated_triton.py
}
run_halo() { step halo 60 python3 benchmarks/halo_gpu.py --json "$OUT/halo_gpu.json" "${HALO_ARGS[@]}"; }
run_aggregated() {
    step aggregated 45 python3 benchmarks/transnext_cpu.py --skip-models --op-batch 32 --iters 10 \
        --json "$OUT/aggregated_gpu.json"
}
run_models() {
    step models 180 python3 benchmarks/models_gpu.py --json "$OUT/models_gpu.json" --warmup 2 --iters 6 "${MODELS_ARGS[@]}"
}
run_na2d() {
    step na2d 200 python3 benchmarks/na2d_gpu.py --json "$OUT/na2d_gpu.json" --dtypes fp16 --batch 16 \
        --shapes 56x56-h4-k7 28x28-h4-k7 56x56-h4-k7-d4 --budget-s 60
}
run_smoke() {
    TRITON_INTERPRET=1 step smoke-na2d 120 python3 benchmarks/na2d_gpu.py --dry-run --json "$OUT/na2d_smoke.json"
    TRITON_INTERPRET=1 step smoke-models 300 python3 benchmarks/models_gpu.py --dry-run --json "$OUT/models_smoke.json"
}
run_segmentation() {
    step segmentation 70 python3 benchmarks/segmentation_cpu.py --device cuda --img-size 512 --batch 8 --steps 5 \
        --warmup 2 --kernels na2d halo aggregated_window
}
HALO_ARGS=(${HALO_ARGS:-})
MODELS_ARGS=(${MODELS_ARGS:-})
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(kernel_tests halo aggregated models na2d segmentation)
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c 'import torch, triton, timm; print("torch", torch.__version__, "triton", triton.__version__, "timm", timm.__version__)'
    for name in "${STEPS[@]}"; do "run_$name"; done
    echo "=== session status $status"
} 2>&1 | tee "$OUT/session.log"
exit $status
