#!/usr/bin/env bash
# Second GPU pass (issue #9): where fit's extra per-step time on CUDA goes (bare loop with
# cudnn.benchmark on, and with fit's per-step sums), diagnostics overhead with both variants warmed
# up, and NVML utilisation sampled by nvidia-smi while one trial trains.
source bench/_gpu_common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -lms 500 > "$OUT/nvsmi.csv" &
SMI=$!
step 150 python3 bench/trial_vs_bare.py --no-ray --explain --device cuda --arch vgg16 --width 1 \
    --dataset synthetic --size 25000 --batch-size 128 --epochs 5 --reps 3 --threads 4
kill $SMI
step 80 python3 bench/diagnostics_overhead.py --device cuda --arch vgg16 --width 1 --dataset synthetic \
    --size 25000 --epochs 3 --repeats 3 --threads 4
for f in trial_vs_bare diagnostics_overhead; do cp "bench/results/$f.json" "$OUT/gpu2_$f.json"; done
sort "$OUT/nvsmi.csv" | uniq -c | sort -rn | head -8
