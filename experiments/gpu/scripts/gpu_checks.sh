#!/usr/bin/env bash
# The GPU checks (docs/results/performance.md, "GPU") in one run on a CUDA machine, e.g. through the device tool:
#   make gpu-wheels            # here, once: the machine there cannot download
#   run(command="bash experiments/gpu/scripts/gpu_checks.sh", carry=[".gpu-wheels"], timeout_s=540)
# Installs the carried wheels next to the machine's own PyTorch, runs every CUDA test, then the
# model benchmark (reference and ours on the same card, in one run), the training-step benchmark, the
# refinement's cost against the network's, whole-process inference against fastMRI's path, and the
# server's throughput with 8 concurrent scans (64 good scans through `varnet serve`).
# Results go to $OUT (the device tool brings that folder back) or ./gpu_out.
set -euo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .gpu-wheels ]; then
    "$PY" -m pip install --quiet --no-index --no-deps --find-links .gpu-wheels .gpu-wheels/*.whl
fi
# The checkout itself, editable: gadget.converters and gadget.pipelines exist only through an install
# (pyproject.toml maps converters/ and pipelines/ into the package), so PYTHONPATH=$PWD is not enough.
# No network there: the build backend (setuptools) comes from the machine or from .gpu-wheels.
"$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: these checks need one"
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
PY
status=0  # a failing step is reported, and the later steps still run: device time is scarce
"$PY" -m pytest -q -rs -p no:cacheprovider -k cuda tests/test_precision.py tests/test_infer.py tests/test_train.py tests/test_refine.py \
    2>&1 | tee "$OUT/cuda_tests.txt" || status=1
"$PY" -m gadget.cli bench model --device cuda --repeats 10 \
    --implementations reference,ours,ours-static,ours-bf16,ours-fp16 2>&1 | tee "$OUT/bench_model_cuda.txt" || status=1
"$PY" -m gadget.cli bench train --device cuda --steps 3 2>&1 | tee "$OUT/bench_train_cuda.txt" || status=1
"$PY" -m gadget.cli bench refine --device cuda --repeats 10 2>&1 | tee "$OUT/bench_refine_cuda.txt" || status=1
"$PY" -m gadget.cli bench infer --device cuda --repeats 2 2>&1 | tee "$OUT/bench_infer_cuda.txt" || status=1
"$PY" -m gadget.cli bench soak --connections 64 --concurrency 8 --mix good=100 --settle-seconds 1 \
    2>&1 | tee "$OUT/bench_serve_8_concurrent.txt" || status=1
exit $status
