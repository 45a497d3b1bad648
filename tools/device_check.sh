#!/usr/bin/env bash
# The prepared GPU check: what this project can only measure on a CUDA machine, in one run that
# ends within its deadline (default 540 s), for a session that is lent a device machine.
#
#   here, once:      bash tools/device_check.sh --fetch-wheels
#                    (timm, torch-pruning and mlxtend wheels into .whl/, which git ignores: the
#                    device image has torch, onnx, onnxruntime but not these pins)
#   on the device:   run(command="bash tools/device_check.sh", carry=[".whl"], timeout_s=600)
#
# Steps, most important first, each under its own time limit and the overall deadline:
#   env         GPU, driver, torch/timm/onnx/onnxruntime versions and providers
#   gpu-tests   the tests marked `gpu` (fold under CUDA autocast fp16/bf16, torch CUDA timing)
#   p3b-cuda    the main job on CUDA with mixed precision: P3B while fine-tuning, slim, ONNX, bundle
#   latency     dense vs slim: torch fp16 with CUDA graphs, ONNX Runtime CUDA / TensorRT if present
#   train-step  P3B step vs plain step on a ViT-S/16 at 224 px, batch 64, AMP
#   compile-tests   the torch.compile tests on CUDA (compiled P3B steps equal eager ones, with and
#               without CUDA graphs)
#   compile-step    the train-step benchmark of the grouped default eager, under torch.compile and
#               under torch.compile with CUDA graphs, each against the plain step run the same way
#   p3b-compile the main job on CUDA with --torch-compile reduce-overhead
#   profile     where the CUDA default P3B step's time goes (grouped probes; per region and operator)
#   count-ops   aten operators per phase of a plain and a P3B step on CUDA (AdamW's foreach kernels
#               included, which a CPU count cannot show)
#   probe-batching  the conv probes block by block, under autocast, and as one grouped convolution
#   suite       the whole test suite with CUDA visible (device "auto" picks the GPU)
# Output: $OUT (the device tool's folder) or runs/device-check: check.log (everything),
# p3b-report.json, p3b-log.jsonl, bench-latency.md/.png, bench-train-step.md,
# bench-train-step-compile.md, profile-train-step.md, suite.log.
# DEVICE_CHECK_SKIP="suite latency" skips steps by name (a rerun of the failed ones, say);
# DEVICE_CHECK_TIMING_ONLY=1 leaves out compile-step's memory workers (each compiles once more);
# DEVICE_CHECK_COMPILE_VARIANTS="3 8" picks compile-step's variants (default 3 7 8).
set -uo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$self")/.."
py=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    exec "$py" -m pip download -q --no-deps --only-binary=:all: -d .whl \
        timm==1.0.31 torch-pruning==1.6.1 mlxtend==0.25.0
elif [[ $# -gt 0 ]]; then
    echo "usage: bash tools/device_check.sh [--fetch-wheels]" >&2
    exit 2
fi

out=${OUT:-runs/device-check}
mkdir -p "$out"
if [[ -z "${DEVICE_CHECK_TEED:-}" ]]; then  # once more under tee, so check.log is complete on return
    DEVICE_CHECK_TEED=1 bash "$self" 2>&1 | tee "$out/check.log"
    exit "${PIPESTATUS[0]}"
fi
deadline=$((SECONDS + ${DEVICE_CHECK_DEADLINE:-540}))
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/p3b-site .whl/*.whl || { echo "device_check: installing .whl/*.whl failed"; exit 1; }
    export PYTHONPATH=/tmp/p3b-site
fi
export PYTHONPATH="$PWD:$PWD/tools${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export TQDM_MININTERVAL=10  # progress bars every 10 s, not a log full of them

failed=()
step() {  # step NAME LIMIT_S COMMAND...: runs it under min(LIMIT_S, time left), logs rc and seconds
    local name=$1 limit=$2 left=$((deadline - SECONDS))
    shift 2
    if [[ " ${DEVICE_CHECK_SKIP:-} " == *" $name "* ]]; then
        echo "== $name: skipped (DEVICE_CHECK_SKIP)"
        return
    fi
    if ((left < 20)); then
        echo "== $name: skipped, ${left} s left before the deadline"
        failed+=("$name(no time)")
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name ($(date -u +%H:%M:%S) UTC, limit ${limit} s): $*"
    local t0=$SECONDS rc=0
    timeout -k 5 "$limit" "$@" || rc=$?
    echo "== $name: rc=$rc after $((SECONDS - t0)) s"
    ((rc == 0)) || failed+=("$name(rc=$rc)")
}

step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; \
    $py -c 'import torch, timm, onnx, onnxruntime as ort; print(\"torch\", torch.__version__, \
\"cuda\", torch.cuda.is_available(), \"timm\", timm.__version__, \"onnx\", onnx.__version__, \
\"ort\", ort.__version__, ort.get_available_providers())'"
step gpu-tests 120 "$py" -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_fold_masks.py tests/test_latency.py tests/test_distributed.py
run=/tmp/p3b-cuda
step p3b-cuda 180 "$py" tools/prune_and_compile.py --target jetson --device cuda --out "$run" --force
cp "$run/report.json" "$out/p3b-report.json" 2>/dev/null
cp "$run/prune/log.jsonl" "$out/p3b-log.jsonl" 2>/dev/null
step latency 150 "$py" tools/bench_latency.py --backends cuda --gpu-runs 200 --out "$out/bench-latency.md"
# variants: 2 per-block conv probes, 3 grouped (the CUDA default), 4 bf16, 6 linear (--help lists them)
step train-step 150 "$py" tools/bench_train_step.py --device cuda --batch-size 64 --rounds 20 --variants 2 3 4 6 \
    --model-kwargs '{"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "num_classes": 100}' \
    --write "$out/bench-train-step.md"
step compile-tests 150 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_train.py -k torch_compile
step compile-step 420 "$py" tools/bench_train_step.py --device cuda --batch-size 64 --rounds 10 --variants ${DEVICE_CHECK_COMPILE_VARIANTS:-3 7 8} \
    --model-kwargs '{"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "num_classes": 100}' \
    ${DEVICE_CHECK_TIMING_ONLY:+--timing-only} --write "$out/bench-train-step-compile.md"
run=/tmp/p3b-compile
step p3b-compile 200 "$py" tools/prune_and_compile.py --target jetson --device cuda --torch-compile reduce-overhead \
    --out "$run" --force
cp "$run/report.json" "$out/p3b-compile-report.json" 2>/dev/null
step profile 90 "$py" tools/bench_train_step.py --device cuda --batch-size 64 --rounds 10 --variants 3 \
    --model-kwargs '{"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "num_classes": 100}' \
    --profile "$out/profile-train-step.md"
step count-ops 60 "$py" tools/bench_train_step.py --device cuda --count-ops --batch-size 2 --variants 3 \
    --model-kwargs '{"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "num_classes": 100}'
step probe-batching 60 "$py" tools/bench_probe_batching.py --device cuda --preset vit-s --batch-size 64 --rounds 20
step suite 240 bash -c "$py -m pytest -q -n 8 -p no:cacheprovider >$out/suite.log 2>&1"
tail -n 40 "$out/suite.log" 2>/dev/null

echo "== device_check: ${#failed[@]} step(s) not clean: ${failed[*]:-none}"
((${#failed[@]} == 0))
