#!/usr/bin/env bash
# Issue #10's GPU part in one device call: the sampler's exactness tests on CUDA, the compiled
# (CUDA graphs) per-position step beside the eager cached one, and naive vs cached sampling speed.
#
#   tools/gpu_sampling_check.sh wheels    # here, once: omegaconf + antlr4 wheels into .whl/ (ignored);
#                                         # the device image has torch, pytest, setuptools, not these
#   device run: command "tools/gpu_sampling_check.sh run", carry [".whl"], timeout_s 590
#   tools/gpu_sampling_check.sh run       # also here, as a rehearsal: GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1
#
# Logs go to $OUT (the device tool brings them back), else /tmp/gpu-sampling-check. Each part has
# its own timeout, so one slow part cannot take the others' time; the whole stays under 9.5 min.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
wheels)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    rm -rf .whl && mkdir .whl || exit 1
    # pure-Python wheels, so the device's Python 3.12 takes them; antlr4 4.9.3 ships only an sdist
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl omegaconf==2.3.0 || exit 1
    python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 || exit 1
    ls -l .whl
    ;;
run)
    out=${OUT:-/tmp/gpu-sampling-check}
    device=${GPU_CHECK_DEVICE:-cuda}
    mkdir -p "$out"
    site=$(mktemp -d)
    python3 -m pip install --no-index --no-deps --no-compile --no-cache-dir \
        --target "$site" .whl/*.whl > "$out/install.log" 2>&1 || { tail -30 "$out/install.log"; exit 1; }
    # the project as its wheel lays it out (configs/ ships as pipeline.configs), copied rather than
    # built: a build needs the backend's `wheel`, which a python3 may lack (this machine's does)
    cp -r pipeline "$site/pipeline" && cp -r configs "$site/pipeline/configs" || exit 1
    export PYTHONPATH="$site:$PWD/tools" PYTHONUNBUFFERED=1
    small=()
    [ -n "${GPU_CHECK_SMALL:-}" ] && small=(--top 8 --batch 2)
    {
        date; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
        python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'tf32 conv', torch.backends.cudnn.allow_tf32, 'tf32 matmul', torch.backends.cuda.matmul.allow_tf32)"
    } 2>&1 | tee "$out/machine.log"
    # exactness first: a fast step that is not exact is no use (cuDNN may pick TF32 convolutions)
    PIPELINE_TEST_DEVICE=$device timeout 100 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/test_incremental.py 2>&1 | tee "$out/exactness.log"
    for prior in top bottom; do
        timeout 130 python3 tools/bench_compiled_step.py --device "$device" --prior "$prior" \
            --mode "${GPU_CHECK_MODE:-reduce-overhead}" "${small[@]}" 2>&1 | tee -a "$out/compiled_step.log"
    done
    timeout 190 python3 tools/bench_sampling.py --device "$device" "${small[@]}" 2>&1 | tee "$out/sampling.log"
    rm -rf "$site"
    ;;
*)
    echo "usage: $0 wheels|run  (see the comments at its top)" >&2
    exit 2
    ;;
esac
