#!/usr/bin/env bash
# The host tests and the benchmarks on a GPU machine, one log per part, so the figures CPU runs can only estimate
# (peak memory of each mode at SD1.5 512 px and SDXL 1024 px, null-text inversion in fp16/bf16, per-step cost) are
# measured where users run PSEdit. Every benchmark names the device in its header.
#
#   COMFYUI_PATH=/path/to/ComfyUI tools/gpu_check.sh [OUT_DIR]
#
# Needs: the project's test dependencies (pip install -e ".[test]"), ComfyUI's requirements, ../shared/weights
# (TAESD, LPIPS trunks) beside the checkout. Nothing is downloaded. About 20-30 minutes on one modern GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_out/gpu}
mkdir -p "$out"
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI checkout}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
    | tee "$out/device.txt" || exit 1

status=0
run() {  # run NAME COMMAND...: log to $out/NAME.log, remember failures, go on
    local name=$1; shift
    echo "== $name: $*"
    if ! "$@" > "$out/$name.log" 2>&1; then
        echo "   FAILED (see $out/$name.log)"; status=1
    fi
    tail -n 25 "$out/$name.log"
}

run host_tests python -m pytest -q tests/core tests/host tests/workflows
run memory_sd15 python benchmarks/memory.py --family sd15 --sizes 512 768 --at 512
run memory_sdxl python benchmarks/memory.py --family sdxl --sizes 768 1024 --at 1024
run nulltext_precision python benchmarks/nulltext_precision.py --size 512 --steps 50 --iters 10
run step_cost_512 python benchmarks/step_cost.py --size 512 --steps 5
run reconstruction python benchmarks/reconstruction.py --steps 10 25 50
exit $status
