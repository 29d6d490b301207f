#!/usr/bin/env bash
# The GPU checks of issue #9 in one short run on a lent GPU machine (no Ray, no MLflow there):
# the sync-free step and memory-probe tests, images/s and peak memory per architecture, packing 1-8
# trials per GPU with utilisation, trial vs bare loop, diagnostics overhead, compile on vs off.
# Each step has its own time limit so one slow step cannot take the others' figures with it.
#   OUT=/some/dir bash bench/gpu_check.sh       (the device tool sets OUT)
source bench/_gpu_common.sh
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # for the deterministic CUDA tests (cuBLAS reads it once)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
step 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_packing.py
step 130 python3 bench/throughput.py --archs vgg11 vgg13 vgg16 vgg19 resnet18 --bn both --width 1 \
    --size 25000 --epochs 2
step 90 python3 bench/gpu_packing.py --arch vgg11 --width 1 --size 25000 --epochs 2 --counts 1 2 4 8
step 70 python3 bench/trial_vs_bare.py --no-ray --device cuda --arch vgg16 --width 1 --dataset synthetic \
    --size 25000 --batch-size 128 --epochs 5 --reps 2 --threads 4
step 50 python3 bench/diagnostics_overhead.py --device cuda --arch vgg16 --width 1 --dataset synthetic \
    --size 25000 --epochs 3 --repeats 2 --threads 4
step 90 python3 bench/throughput.py --archs vgg16 --bn on --width 1 --size 25000 --epochs 3 --compile
for f in throughput throughput_compiled gpu_packing trial_vs_bare diagnostics_overhead; do
    cp "bench/results/$f.json" "$OUT/gpu_$f.json" 2>/dev/null; done
ls "$OUT"
