#!/usr/bin/env bash
# Fourth GPU pass (issue #9), one short run on a lent GPU machine (torch there, no Ray, no MLflow):
# - the CUDA tests in their final form (a GPU trial's resume with diagnostics, compile="reduce-overhead");
# - `sweeper debug FILE --device cuda` on a real space file where Ray is not installed (the file's
#   `tune` domains read by sweeper.tune_standin), and launch's one-line answer there;
# - eager against compile="reduce-overhead" side by side in one run (the 2026-11-27 row compared
#   against an eager figure from the day before);
# - packing with NVML utilisation sampled while every trial trains (fixed after the first run).
#   OUT=/some/dir bash bench/gpu_check4.sh       (the device tool sets OUT)
source bench/_gpu_common.sh
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # for the deterministic CUDA tests (cuBLAS reads it once)
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
python3 -c "import ray" 2>&1 | tail -1; python3 -c "import mlflow" 2>&1 | tail -1
nproc
step 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_packing.py
step 90 python3 -m sweeper.cli debug search_spaces/vgg_depth.py dataset=synthetic data.synthetic_size=12800 \
    model.arch=vgg16 model.batch_norm=true data.batch_size=128 --epochs 3 --sample 2 --device cuda
step 30 python3 -m sweeper.cli launch search_spaces/vgg_depth.py --local --dry-run
step 70 python3 bench/throughput.py --archs vgg16 --bn on --width 1 --size 25000 --epochs 3
cp bench/results/throughput.json "$OUT/throughput_eager.json" 2>/dev/null
step 100 python3 bench/throughput.py --archs vgg16 --bn on --width 1 --size 25000 --epochs 3 \
    --compile reduce-overhead
step 90 python3 bench/gpu_packing.py --arch vgg11 --width 1 --size 25000 --epochs 2 --counts 1 4 8
} 2>&1 | tee "$OUT/log"
cp bench/results/throughput_compiled_*.json bench/results/gpu_packing.json "$OUT/" 2>/dev/null
ls "$OUT"
