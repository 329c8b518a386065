#!/usr/bin/env bash
# Reproduce the benchmark table of docs/performance.md: ResNet-50 (random weights) FP32 and INT8,
# ONNX Runtime and OpenVINO (fp32, bf16, int8), secure and plain, against the raw engine.
# Needs torch (CPU) once, to build the model: pip install torch==2.13.0
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${PPML_CACHE:-$HOME/.cache/ppml-serve}
OUT=${1:-bench/results}
mkdir -p "$OUT"
if [ ! -f "$CACHE/resnet50-int8.onnx" ]; then
    python scripts/build_resnet50.py --out "$CACHE"
fi
ppml-serve bench \
    --model "resnet50=$CACHE/resnet50.onnx" --model "resnet50-int8=$CACHE/resnet50-int8.onnx" \
    --engines onnxruntime,openvino --precisions fp32,bf16 --configs secure,plain \
    --concurrency 1,8,32 --duration 8 --warmup 2 --repeats 3 --threads 2 \
    --json "$OUT/resnet50.json" --plot "$OUT/resnet50.png"
