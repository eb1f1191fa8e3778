#!/usr/bin/env bash
# The recipe that produced gkv_jax/assets/reasoner (see README, "The bundled reasoning model").
# Three resumable phases in one run directory under one cosine schedule (peak 1e-3, 1600
# steps); each resumes from the previous one's checkpoint (the data stream is seeded by the
# step it resumes from, so the phases are deterministic).
#   1. steps 1-1000: the task with period 10 (line i reads entry i mod 10), full attention,
#      prefixes and whole sequences; the look-up is learned by step 800, the sum by 1000.
#   2. steps 1001-1200: half of the sequences under random permanent evictions that always
#      spare the last 16 tokens and keep each copy of a table entry for good with
#      probability 0.9 (per layer and KV head), so that the model answers from whatever
#      part of its context an eviction policy leaves it.
#   3. steps 1201-1600: the same on the task itself (period 5: every entry it reads comes
#      round every 45 tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/reasoner}
train() { python scripts/train_reasoner.py --batch-size 16 --steps 1600 --run-dir "$RUN_DIR" --eval-every 200 "$@"; }
train --period 10 --stop-at 1000
train --period 10 --evict-fraction 0.5 --evict-min-window 16 --stop-at 1200
train --period 5 --evict-fraction 0.5 --evict-min-window 16
