#!/usr/bin/env bash
# The GPU checks of Quorum, in one run of under 10 minutes on a host with an NVIDIA GPU:
#   1. tests/runtime/test_cuda.py: serving on ONNX Runtime's CUDA provider matches the CPU (packed, isolated)
#   2. bench/gpu_serving.py: that parity on BUNDLE, and CPU/CUDA timing at batch 1, 64 and budgets
#      8, 32, 256; the packed graph with and without I/O binding
#   3. bench/epoch_time.py --device cuda: training epoch times of 256-M-4-H on Fashion-MNIST and
#      DN-64-6-16 on CIFAR-shaped data
# Each step's output goes to $OUT (required): test_cuda.txt, serving.md/.json, epoch_time.txt/.json,
# env.txt, and status.txt (one line per step: ok, failed rc, or skipped and why).
#
#   OUT=/tmp/gpu bash bench/gpu.sh
#
# It needs the venv of `make setup ORT=gpu` (torch, onnxruntime-gpu; PYTHON= another interpreter), a
# bundle (BUNDLE=, default bundles/demo) and Fashion-MNIST (QUORUM_DATA_DIR=, default Debian's). A step
# whose prerequisite is missing is skipped; without a GPU the script says so and exits 0 (fail soft),
# or with DEVICE=cpu runs what it can on the CPU, on tiny settings (a check of the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
BUNDLE=${BUNDLE:-bundles/demo}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-2}
mkdir -p "$OUT"
: > "$OUT/status.txt"
status() { echo "$*" | tee -a "$OUT/status.txt"; }
step() {  # step NAME SECONDS LOG CMD...: run CMD under a time limit, its output to $OUT/LOG
	local name=$1 limit=$2 log=$3; shift 3
	timeout "$limit" "$@" > "$OUT/$log" 2>&1
	local rc=$?
	if [ $rc -eq 0 ]; then
		status "$name: ok"
	elif [ $rc -eq 3 ]; then  # bench/gpu_serving.py: no CUDA provider
		status "$name: skipped, no CUDA execution provider (see $log)"
	else
		status "$name: failed rc=$rc (see $log)"
		FAILED=1
	fi
}
FAILED=0

{
	date -u +%FT%TZ
	if command -v nvidia-smi > /dev/null; then
		nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
	else
		echo "no nvidia-smi"
	fi
	"$PYTHON" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())' 2>&1
	"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

if [ "$DEVICE" = cuda ] && ! nvidia-smi -L > /dev/null 2>&1; then  # also when there is no nvidia-smi
	status "no GPU here (nvidia-smi finds none): nothing run; DEVICE=cpu checks the script on the CPU"
	exit 0
fi
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
	status "ONNX Runtime here has no CUDA provider: install the GPU wheel (make setup ORT=gpu); serving steps skipped"
	SERVING=0
else
	SERVING=1
fi

if [ "$SERVING" = 1 ]; then
	step "cuda parity test" 240 test_cuda.txt "$PYTHON" -m pytest -q -p no:cacheprovider tests/runtime/test_cuda.py
	if [ -f "$BUNDLE/manifest.json" ]; then
		step "serving bench" 240 serving.md "$PYTHON" bench/gpu_serving.py --bundle "$BUNDLE" --json "$OUT/serving.json"
	else
		status "serving bench: skipped, no bundle at $BUNDLE (BUNDLE=)"
	fi
fi

if "$PYTHON" -c 'import torch' 2>/dev/null; then
	if [ "$DEVICE" = cuda ]; then
		step "epoch times" 300 epoch_time.txt "$PYTHON" bench/epoch_time.py --device cuda --epochs "$EPOCHS" --json "$OUT/epoch_time.json"
	else  # the script's own check: a few images on the CPU
		step "epoch times" 300 epoch_time.txt "$PYTHON" bench/epoch_time.py --device cpu --images 8 --epochs 1 --json "$OUT/epoch_time.json"
	fi
else
	status "epoch times: skipped, no torch for $PYTHON"
fi
exit $FAILED
