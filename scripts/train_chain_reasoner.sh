#!/usr/bin/env bash
# The second bundled model (gkv_jax/assets/reasoner_chain/): the bundled reasoner's
# architecture fine-tuned from its weights on the chained table walk ("synthetic-chain",
# gkv_jax.synthetic with lookup="chained": each line reads the entry the previous state
# names, so the whole table is needed at unpredictable times). It exists to validate the
# default post-training recipe on a model and task the recipe was not tuned on
# (docs/results/post-training-transfer.md). Logs: scripts/logs/chain_phase<N>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/chain}
EXPORT=gkv_jax/assets/reasoner_chain
# 1. Full attention: learn to pick the entry from the state (token accuracy 0.83 -> 1.0).
python scripts/train_reasoner.py --init-from gkv_jax/assets/reasoner --lookup chained \
  --batch-size 16 --steps 400 --lr 1e-3 --warmup 20 --answer-weight 5 --whole-share 0.2 \
  --eval-every 100 --eval-problems 50 --run-dir "$RUN_DIR/run1" --export-dir "$RUN_DIR/phase1"
