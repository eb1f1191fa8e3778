#!/usr/bin/env bash
# The one-call accelerator check (run it when a GPU or TPU is lent; see docs/contributing.md,
# "The device check"):
#
#   bash benchmarks/device_check.sh [--dry-run] [--output FILE.json] [--budget SECONDS]
#
# 1. installs the accelerator's jaxlib when JAX does not already see a GPU / TPU (jax[cuda12],
#    jax[cuda13] or jax[tpu] at the installed JAX version), and the project itself (no deps)
#    when `gkv_jax.pallas_kernels` is not importable;
# 2. runs benchmarks/device_check.py run, stage by stage, each printing a line with the
#    elapsed time: the `gpu` / `tpu`-marked tests; the eviction benchmark (R1-Distill-Qwen-7B
#    layer, batch 1/16/64/128, XLA vs Pallas, time and peak memory); the decode benchmark
#    (R1-Distill-Qwen-1.5B, batch 1 and 64, full vs gkv 2048, 4k and 16k new tokens, the
#    bandwidth roofline, transformers on the same device when torch sees it); the targets;
# 3. writes one JSON summary to --output (default $OUT/device_check.json when $OUT is set,
#    else benchmarks/device_check.json) and prints it.
#
# The whole run keeps within --budget seconds (default 480, 8 minutes on one H100 / H200,
# counted from this script's start): a row that would overrun is recorded as skipped.
# --dry-run (automatic on a machine without an accelerator) installs nothing and runs the
# same steps at tiny sizes on the CPU. Exit status 0 when every step succeeded.
set -euo pipefail

STARTED_AT="$(date +%s.%N)"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
DRY_RUN=0
OUTPUT=""
BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --output) [ $# -ge 2 ] || { echo "--output needs a file path" >&2; exit 2; }
              OUTPUT="$2"; shift ;;
    --output=*) OUTPUT="${1#--output=}" ;;
    --budget) [ $# -ge 2 ] || { echo "--budget needs a number of seconds" >&2; exit 2; }
              BUDGET="$2"; shift ;;
    --budget=*) BUDGET="${1#--budget=}" ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (allowed: --dry-run, --output FILE, --budget SECONDS)" >&2
       exit 2 ;;
  esac
  shift
done

REQUIREMENT="-"
if [ "$DRY_RUN" = 0 ]; then
  PLAN="$("$PYTHON" benchmarks/device_check.py plan)"
  read -r MODE REQUIREMENT <<< "$PLAN"
  if [ "$MODE" = "dry-run" ]; then
    echo "no GPU or TPU found: dry run (tiny sizes, nothing installed)"
    DRY_RUN=1
  else
    if [ "$REQUIREMENT" != "-" ]; then
      echo "installing $REQUIREMENT"
      "$PYTHON" -m pip install -q "$REQUIREMENT"
    fi
    if ! "$PYTHON" -c "import gkv_jax.pallas_kernels" 2>/dev/null; then
      echo "installing the project (no dependencies)"
      "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
    fi
  fi
fi

ARGS=(run --installed "$REQUIREMENT" --started-at "$STARTED_AT")
if [ "$DRY_RUN" = 1 ]; then ARGS+=(--dry-run); else ARGS+=(--expect-accelerator); fi
[ -n "$OUTPUT" ] && ARGS+=(--output "$OUTPUT")
[ -n "$BUDGET" ] && ARGS+=(--budget-seconds "$BUDGET")
exec "$PYTHON" benchmarks/device_check.py "${ARGS[@]}"
