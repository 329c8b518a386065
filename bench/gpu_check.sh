#!/usr/bin/env bash
# The GPU checks of issue 23, as one prepared run for a lent GPU machine (the device tool):
# the GPU tests of tests/test_gpu_engines.py, then 'ppml-serve bench' on the GPU (raw engine
# and secure pipeline in one run, CUDA and TensorRT, fp32 and fp16), JSON and a plot in $OUT.
#
# That machine reaches nothing outside, and its image's onnxruntime is the CPU build: ONNX
# Runtime's GPU build (onnxruntime-gpu, with TensorRT's libraries for tensorrt), this package's
# dependencies missing there, the built extension and redis-server travel as wheels and a
# .deb in .whl/ and .deb/ (docs/models.md, "GPUs", says how to gather them), named in 'carry':
#   device run: carry [".whl", ".deb", "native/target/wheels"], command "bench/gpu_check.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ -d .deb ]; then  # redis-server for the pipeline's managed Redis
    for deb in .deb/*.deb; do dpkg -x "$deb" /tmp/debroot; done
    export PATH=/tmp/debroot/usr/bin:$PATH
fi
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl native/target/wheels/*.whl
    export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" \
    | tee -a "$OUT/gpu.txt"

# correctness first: the demo model on CUDA and TensorRT answers as on the CPU
python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engines.py 2>&1 | tee "$OUT/tests.txt"

# then the figures: ResNet-50 (random weights; torch is on that image) raw vs pipeline
python3 scripts/build_resnet50.py --out "$OUT" --calibration-images 8 >/dev/null
python3 -m ppml_serve bench --model "resnet50=$OUT/resnet50.onnx" --device cuda \
    --engines onnxruntime --precisions fp32,fp16 --configs secure --concurrency 1,32,128 \
    --max-batch-size 64 --duration 8 --repeats 2 --threads 4 \
    --json "$OUT/gpu-bench.json" --plot "$OUT/gpu-bench.png" 2>&1 | tail -40
