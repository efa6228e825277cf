#!/usr/bin/env bash
# One device call for the speed work (bench/NOTES.md): GPU tests of the kernels and the decode runtime, then the
# profile_step A/B with programmatic dependent launch off and on, then (optionally) the committed benchmark.
#
#   bash bench/gpu_speed.sh tests,profile          # stages, comma-separated: tests, mlp, profile, bench, sweep,
#                                                  # hfcompile (HF static cache + torch.compile next to ours, own call)
#
# Writes everything under $OUT (runs/gpu when unset) and prints a short table last.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
STAGES=",${1:-tests,profile},"
MODEL=${MODEL:-opt-13b}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
if [[ $STAGES == *,tests,* ]]; then
  timeout "${TESTS_TIMEOUT:-300}" python -m pytest -q -x -n 8 -p no:cacheprovider ${TESTS:-tests/kernels tests/runtime} \
    > "$OUT/tests.txt" 2>&1
  tail -n 3 "$OUT/tests.txt"
fi
if [[ $STAGES == *,mlp,* ]]; then
  python bench/mlp_micro.py --out "$OUT/mlp" > "$OUT/mlp.txt" 2>&1
  cat "$OUT/mlp.txt"
fi
if [[ $STAGES == *,profile,* ]]; then
  for pdl in ${PDLS:-0 1}; do
    DEJAVU_PDL=$pdl python bench/profile_step.py --out "$OUT/profile" --model "$MODEL" --batch "${BATCH:-1}" \
      --variants "${VARIANTS:-dense,sparse,nopred}" --tag "_pdl$pdl" > "$OUT/profile_pdl$pdl.txt" 2>&1
    grep "^==" "$OUT/profile_pdl$pdl.txt" | sed "s/^/pdl=$pdl B=${BATCH:-1} /"
  done
fi
if [[ $STAGES == *,bench,* ]]; then
  # budgets so that the three runs fit one 10-minute device call (bench/NOTES.md)
  python -m dejavu.bench.decode --out "$OUT/bench" --models "$MODEL" --batches 1 \
    --modes hf-eager,ours-dense,ours-sparse,ours-sparse-int8 --budget-s 200 > "$OUT/bench_b1.txt" 2>&1
  python -m dejavu.bench.decode --out "$OUT/bench" --models "$MODEL" --batches 2,4,16 \
    --modes ours-dense,ours-sparse,ours-sparse-int8 --n-new 32 --repeats 1 --no-check --budget-s 130 \
    > "$OUT/bench_b4.txt" 2>&1
  python -m dejavu.bench.decode --out "$OUT/bench" --models opt-30b,llama-2-7b,opt-6.7b --batches 1 \
    --modes ours-dense,ours-sparse,ours-sparse-int8 --quick --no-check --budget-s 130 > "$OUT/bench_other.txt" 2>&1
  tail -n 40 "$OUT/bench_b1.txt"
fi
if [[ $STAGES == *,hfcompile,* ]]; then
  # the "HF with static cache + torch.compile" baseline with ours-dense / ours-sparse in the same call; the
  # compile runs in a subprocess with a time limit (a 13B compile may take minutes: give this stage a call of its own)
  python -m dejavu.bench.decode --out "$OUT/hfc" --models "$MODEL" --batches 1 \
    --modes ours-dense,ours-sparse,hf-compile --quick --no-check --hf-compile-timeout 420 --budget-s 540 \
    > "$OUT/bench_hfc.txt" 2>&1
  tail -n 12 "$OUT/bench_hfc.txt"
fi
if [[ $STAGES == *,sweep,* ]]; then
  python -m dejavu.bench.kernel_sweep --out "$OUT/ks" > "$OUT/sweep.txt" 2>&1
  tail -n 30 "$OUT/sweep.txt"
fi
