#!/usr/bin/env bash
# Every GPU check the project has, in one run, for a session that is lent a CUDA GPU for a few minutes:
#   1. benchmarks/attention.py: the kernel's TFLOP/s against SDPA's flash backend, T = 1024 and 2048,
#   2. benchmarks/step_parts.py: the head and loss, and the optimizer update, timed alone against alternatives,
#   3. benchmarks/train.py: gpt2 124M training steps, bf16, compiled, batch 16 x 1024, with SDPA and with the
#      Triton attention, against transformers, and MFU against the card's bf16 peak (dropout 0, the usual setting
#      for MFU figures, and the one the kernel needs), then where a step's GPU time goes,
#   4. the same training benchmark without torch.compile (eager: the Trainer's default), with SDPA, its AdamW in
#      waves (the default) and in one compiled pass (--compile_optimizer) raced,
#   5. the tests that pick CUDA when it is there: the Triton kernel's (tests/test_kernels.py), the decoding
#      step's against the module forward and transformers (tests/test_decode_step.py), and the aligned head's.
# Each part's output goes to its own log in $OUT (or ./gpu-logs), written as it runs, so a part cut short by a
# time limit still leaves what it printed; a failing part does not stop the others. The exit status counts the
# parts that failed. It runs on the machine's own python3 and packages (torch, triton, transformers); minigpt2
# is used from this checkout.
#
#   bash benchmarks/gpu.sh            all five in 9.5 minutes at most (GPU_SH_SECONDS=570), so the whole run fits
#                                     one 10-minute device call: the attention benchmark is cut at 90 s, the
#                                     parts at 60 s, the compiled training benchmark at 240 s (on an H200 it took
#                                     about 2 minutes, most of it compiling), the eager one at 90 s, and the tests
#                                     get what is left
#   bash benchmarks/gpu.sh train      some of them (a part cut short can be rerun alone)
# The tests come last because their time depends on Triton's cache: they compile every kernel variant for every
# autotuning candidate, one CPU core per compile, in 16 processes (pytest-xdist, when installed). On a fresh H200
# machine they needed more than 5 minutes; with the cache of an earlier run, 90 s.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-logs}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(attention parts train eager tests)

run() {  # run NAME SECONDS COMMAND...: COMMAND's output to the screen and to $out/NAME.log
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $*" | tee "$out/$name.log"
    timeout "$seconds" "$@" 2>&1 | tee -a "$out/$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name exited $status" | tee -a "$out/$name.log"
    return "$status"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/device.log"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', triton.__version__,
'| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())" 2>&1 | tee -a "$out/device.log"

deadline=$((SECONDS + ${GPU_SH_SECONDS:-570}))
left() {  # left CAP: seconds until the deadline, at most CAP and at least 1 (timeout 0 would mean no limit)
    local rest=$((deadline - SECONDS))
    echo $((rest < 1 ? 1 : rest < $1 ? rest : $1))
}
xdist=()
python3 -c "import xdist" 2>/dev/null && xdist=(-n 16 -p no:benchmark)

failed=0
for part in "${parts[@]}"; do
    case "$part" in
        tests) run tests "$(left 570)" python3 -m pytest -q -p no:cacheprovider --durations=5 ${xdist[@]+"${xdist[@]}"} \
                   tests/test_kernels.py tests/test_decode_step.py \
                   tests/test_model.py::test_head_on_cuda_is_aligned_and_matches_transformers_with_gradients \
                   || failed=$((failed + 1)) ;;
        attention) run attention "$(left 90)" python3 benchmarks/attention.py || failed=$((failed + 1)) ;;
        parts) run parts "$(left 60)" python3 benchmarks/step_parts.py --device cuda || failed=$((failed + 1)) ;;
        train) run train "$(left 240)" python3 benchmarks/train.py --device cuda --batch 16 --seq 1024 --dtypes bf16 \
                   --compile --dropout 0 --attn_impls sdpa,triton --adamw waves --skip_classic --steps 10 --warmup 2 \
                   --profile \
                   || failed=$((failed + 1)) ;;
        eager) run eager "$(left 90)" python3 benchmarks/train.py --device cuda --batch 16 --seq 1024 --dtypes bf16 \
                   --dropout 0 --adamw waves,one_pass --skip_classic --steps 10 --warmup 2 || failed=$((failed + 1)) ;;
        *) echo "benchmarks/gpu.sh: unknown part '$part' (attention, parts, train, eager, tests)" >&2; exit 2 ;;
    esac
done
echo "benchmarks/gpu.sh: ${#parts[@]} parts, $failed failed; logs in $out/"
exit "$failed"
