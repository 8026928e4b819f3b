#!/usr/bin/env bash
# Full peer re-measurement with the default arguments, one process per figure
# (so ru_maxrss is per configuration). JSON -> results/, progress/stderr -> results/*.log.
# Set RUN_BF16=1 to also run the bf16-autocast LoRA row (5 timed steps).
# Set PEER_PY to the interpreter of the environment holding the stack (default python3).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PEER_PY:-python3}"
OUT=results
mkdir -p "$OUT"
stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }
run() {  # name, args...
  local name=$1; shift
  echo "$(stamp) start $name: $*" | tee -a "$OUT/run_all.log"
  local t0=$SECONDS
  "$PY" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "$(stamp) done  $name in $((SECONDS - t0)) s" | tee -a "$OUT/run_all.log"
}
echo "$(stamp) run_all begin, load: $(cat /proc/loadavg)" | tee -a "$OUT/run_all.log"
run train_all7     bench_train.py --config all7
run train_qkvo     bench_train.py --config qkvo
run forward        bench_train.py --config forward
if [ "${RUN_BF16:-0}" = 1 ]; then
  run train_all7_bf16 bench_train.py --config all7 --autocast bf16 --steps 5
fi
run generate_b1    bench_generate.py --batch 1
run generate_b8    bench_generate.py --batch 8
run eval           bench_eval.py --dump "$OUT/eval_generations.jsonl"
echo "$(stamp) run_all end, load: $(cat /proc/loadavg)" | tee -a "$OUT/run_all.log"
