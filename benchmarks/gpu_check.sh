#!/usr/bin/env bash
# GPU check for a lent H100/H200: M2IB saliency
# throughput for the BiomedCLIP architecture, and an end-to-end pretrain + fine-tune on
# CUDA. The machine has torch/timm/transformers but nothing else of ours and no network,
# so the missing pure-Python wheels travel in .wheels/ (pip download, see the results file).
# Writes into $OUT (default ./gpu-out). Ran on an H200 on 2026-11-30: results in
# benchmarks/results/gpu_check.md.
# Before running: pip download --no-deps -d .wheels open_clip_torch ftfy wcwidth pydicom \
#   nibabel, plus pycocotools for Python 3.12 (--only-binary=:all: --python-version 3.12).
set -euo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .wheels/*.whl
export PYTHONPATH=/tmp/pylib:$PWD/src:$PWD/tests HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, open_clip; print('torch', torch.__version__, 'timm', timm.__version__, 'open_clip', open_clip.__version__)" | tee -a "$OUT/gpu.txt"

# 1. saliency speed: batch 1, 8, 64; fp32 and bf16; then 3x3 shifts at batch 64 (bf16)
python3 benchmarks/bench_saliency.py --device cuda --threads 8 --images-b1 8 --images-b8 64 \
    --batch-large 64 --out "$OUT/saliency_speed_gpu.md"
python3 benchmarks/bench_saliency.py --device cuda --threads 8 --images-b1 0 --images-b8 64 \
    --batch-large 64 --shifts 3 --out "$OUT/saliency_speed_gpu_shifts3.md"

# 2. pretrain + fine-tune on CUDA end to end (resnet50, 224 px, bf16 auto)
python3 -m mwm phantoms /tmp/ph --modality brain-mri --n 1200 --size 224 --seed 0 --quiet
python3 -m mwm pretrain /tmp/ph --out /tmp/pre --model resnet50 --input-size 224 --masking random \
    --ratio 0.6 --epochs 3 --batch-size 128 --workers 12 --device cuda --quiet 2>&1 | tail -5
python3 -m mwm finetune /tmp/ph --weights /tmp/pre/encoder.safetensors --out /tmp/ft --model resnet50 \
    --input-size 224 --epochs 3 --batch-size 64 --workers 12 --device cuda --quiet 2>&1 | tail -5
cp /tmp/pre/run_manifest.json "$OUT/pretrain_manifest.json"
cp /tmp/pre/train_log.csv "$OUT/pretrain_train_log.csv"
cp /tmp/ft/metrics.csv "$OUT/finetune_metrics.csv"
cp /tmp/ft/summary.json "$OUT/finetune_summary.json"
ls "$OUT"
