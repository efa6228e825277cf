#!/usr/bin/env bash
# Detached part of bench/gpu_quality.sh: calibrate (top-k and threshold modes) and evaluate, skipping finished steps.
set -ux
R=$1
export PYTHONPATH="$R/site:$PWD/src" DEJAVU_DATA="$R/data" PYTHONUNBUFFERED=1
M="$R/model.gguf"
C4="$R/data/c4/c4_train_sample.jsonl"
run() { python3 -m dejavu.cli "$@" --device cuda --no-progress; }
nvidia-smi --query-gpu=name,memory.total --format=csv
if [ -n "${STUDY:-}" ]; then
  run calibrate --model "$M" --data "$C4" --docs 500 --tokens-per-doc 64 --epochs 1 --out "$R/pred-study" || exit 1
  python3 bench/predictor_study.py --model "$M" --activations "$R/pred-study/activations" --out "$R/results/predictor_study.json"
  touch "$R/job.done"; exit 0
fi
if [ ! -f "$R/pred-topk/predictors.json" ]; then
  run calibrate --model "$M" --data "$C4" --docs 500 --tokens-per-doc 64 --holdout-windows 8 --holdout-len 1024 --out "$R/pred-topk" || exit 1
fi
cp "$R"/pred-topk/predictors.json "$R/results/predictors-topk.json"
if [ ! -f "$R/results/smollm2-135m.json" ]; then
  run eval --model "$M" --predictors "$R/pred-topk" --batch-size 8 --sweep-windows 16 \
      --out "$R/results/smollm2-135m" > "$R/eval-topk.log" 2>&1
fi
if [ ! -f "$R/pred-thr/predictors.json" ]; then
  mkdir -p "$R/pred-thr"
  ln -sfn "$R/pred-topk/activations" "$R/pred-thr/activations"
  run calibrate --model "$M" --data "$C4" --docs 500 --tokens-per-doc 64 --mode threshold --out "$R/pred-thr"
fi
cp "$R"/pred-thr/predictors.json "$R/results/predictors-threshold.json"
if [ ! -f "$R/results/smollm2-135m-threshold.json" ]; then
  run eval --model "$M" --predictors "$R/pred-thr" --batch-size 8 --sweep-windows 0 --no-baselines \
      --out "$R/results/smollm2-135m-threshold" > "$R/eval-threshold.log" 2>&1
fi
touch "$R/job.done"
