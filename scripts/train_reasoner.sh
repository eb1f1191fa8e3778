#!/usr/bin/env bash
# The recipe that produced gkv_jax/assets/reasoner (see docs/bundled-model.md, "Training"):
# the exact commands, in order; logs of each phase in scripts/logs/reasoner_phase<N>.log.
#
# Phases 1-3 learn the walk with the entry written "Kv" (--compact-lines), one resumable
# run under one cosine schedule (peak 1e-3, 1600 steps; each phase resumes from the previous
# one's checkpoint and the data stream is seeded by the step it resumes from):
#   1. steps 1-1000: period 10 (line i reads entry i mod 10), full attention, prefixes and
#      whole sequences; the look-up is learned by step 800, the sum by 1000.
#   2. steps 1001-1200: half of the sequences under random permanent evictions that always
#      spare the last 16 tokens and keep each copy of a table entry for good with
#      probability 0.9 (per layer and KV head).
#   3. steps 1201-1600: the same with period 5.
# Phases 4-8 are fine-tunes (--init-from the previous phase's export, fresh optimizer) to the
# task as it is now: the trace writes "K v", so its copies of an entry no longer look like
# the prompt's, and the prompt's entries are never evicted in training (--evict-fact-keep 1),
# so the model learns to read the table from the prompt and never needs the copies.
#   4. period 5, "K v" lines; stopped at step 300 of a 400-step schedule.
#   5. period 3 (the task), answer weighted x10.
#   6. the same, longer; its step-75 export is kept (--stop-at 75).
#   7. sparse evictions like a cache of 1/8 of the sequence (70% of the sequences; a layout
#      token stays for good with probability U(0, 0.2), an evicted one is visible at most 40
#      tokens after its window), answer weighted x50: the model learns to work from the last
#      16 tokens plus the table, which is what an eviction policy at a small budget leaves it.
#   8. the same with 80% of the batches whole sequences (line numbers 40-49 and the answer
#      occur only there) and 80% of the sequences evicted.
# About 80 min (phases 1-3) + 55 min (phases 4-8) on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/reasoner}
EXPORT=gkv_jax/assets/reasoner
base() { python scripts/train_reasoner.py --compact-lines --batch-size 16 --steps 1600 \
  --run-dir "$RUN_DIR/base" --export-dir "$RUN_DIR/phase3" --eval-every 200 "$@"; }
base --period 10 --stop-at 1000
base --period 10 --evict-fraction 0.5 --evict-min-window 16 --stop-at 1200
base --period 5 --evict-fraction 0.5 --evict-min-window 16
# fine-tune PHASE FROM: from the export of phase FROM to that of phase PHASE
tune() { local phase=$1 from=$2; shift 2
  python scripts/train_reasoner.py --init-from "$RUN_DIR/phase$from" --batch-size 16 \
    --run-dir "$RUN_DIR/run$phase" --export-dir "$RUN_DIR/phase$phase" \
    --evict-min-window 16 --evict-fact-keep 1.0 --warmup 10 "$@"; }
tune 4 3 --period 5 --steps 400 --stop-at 300 --lr 1e-3 --warmup 20 --evict-fraction 0.5 \
  --eval-every 100
tune 5 4 --period 3 --steps 100 --lr 3e-4 --answer-weight 10 --evict-fraction 0.5 \
  --eval-every 100 --eval-problems 20
tune 6 5 --period 3 --steps 150 --stop-at 75 --lr 5e-4 --answer-weight 10 \
  --evict-fraction 0.5 --eval-every 75 --eval-problems 20
tune 7 6 --period 3 --steps 250 --lr 5e-4 --answer-weight 50 --evict-fraction 0.7 \
  --evict-layout-keep 0 0.2 --evict-max-delay 40 --eval-every 125 --eval-problems 20
tune 8 7 --period 3 --steps 300 --lr 3e-4 --answer-weight 50 --whole-share 0.8 \
  --evict-fraction 0.8 --evict-layout-keep 0 0.2 --evict-max-delay 40 --eval-every 150
cp "$RUN_DIR/phase8"/* "$EXPORT"/
