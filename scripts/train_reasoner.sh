#!/usr/bin/env bash
# The recipe that produced gkv_jax/assets/reasoner (see README, "The bundled reasoning model").
# Four resumable phases in one run directory; each resumes from the previous checkpoint
# (the data stream is seeded by the step it resumes from, so the phases are deterministic).
#   1. steps 1-1000: every step rule, on traces of 1-40 steps (cosine schedule over 3000).
#   2. steps 1001-1250: the same on a 2000-step schedule; the trace is right, but the model
#      stops where the prior of the number of steps says instead of reading `n`.
#   3. steps 1251-1500: the first token of each line weighted 10x (did not fix stopping).
#   4. steps 1501-1625: 40-step problems only, the task's length: it stops after 40 steps.
# About 85 minutes on 2 CPU cores; minutes on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/reasoner}
train() { python scripts/train_reasoner.py --batch-size 16 --run-dir "$RUN_DIR" "$@"; }
train --steps 3000 --stop-weight 1 --eval-every 250 --stop-at 1000
train --steps 2000 --stop-weight 1 --eval-every 250 --stop-at 1250
train --steps 2000 --stop-weight 10 --eval-every 250 --stop-at 1500
train --steps 2000 --stop-weight 10 --min-train-steps 40 --eval-every 125 --stop-at 1625
