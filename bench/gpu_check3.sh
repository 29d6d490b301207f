#!/usr/bin/env bash
# Third GPU pass (issue #9), one short run on a lent GPU machine (no Ray, no MLflow there): the CUDA
# tests (a GPU trial's resume, compile="reduce-overhead"), the vgg_depth study's 72 trials packed 16
# at a time for 2 epochs (bench/study_gpu.py; rerun with --workers 8), trial vs bare loop at CIFAR
# size with the fused/default SGD split, and torch.compile's CUDA-graph mode against its default mode
# with static shapes. Each step has its own limit.
#   OUT=/some/dir bash bench/gpu_check3.sh       (the device tool sets OUT)
source bench/_gpu_common.sh
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # for the deterministic CUDA tests (cuBLAS reads it once)
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
nproc
step 110 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_packing.py
step 200 python3 bench/study_gpu.py --workers 16 --epochs 2
step 130 python3 bench/trial_vs_bare.py --no-ray --explain --device cuda --arch vgg16 --width 1 \
    --dataset synthetic --size 62500 --batch-size 128 --epochs 4 --reps 2 --threads 4
step 100 python3 bench/throughput.py --archs vgg16 --bn on --width 1 --size 25000 --epochs 3 \
    --compile reduce-overhead
step 90 python3 bench/throughput.py --archs vgg16 --bn on --width 1 --size 25000 --epochs 3 \
    --compile --static
} 2>&1 | tee "$OUT/log"
cp bench/results/study_gpu.json bench/results/trial_vs_bare.json bench/results/throughput_compiled_*.json \
    "$OUT/" 2>/dev/null
ls "$OUT"
