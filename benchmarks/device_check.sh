#!/usr/bin/env bash
# The accelerator verification of the eviction kernels, as one command (run it when a GPU or
# TPU is lent; see README, "Pallas kernels"):
#
#   bash benchmarks/device_check.sh [--dry-run] [--output FILE.json]
#
# 1. installs the accelerator's jaxlib when JAX does not already see a GPU / TPU (jax[cuda12],
#    jax[cuda13] or jax[tpu] at the installed JAX version), and the project itself (no deps)
#    when `gkv_jax.pallas_kernels` is not importable;
# 2. runs the `gpu` / `tpu`-marked tests, the eviction benchmark and the decode benchmark
#    (benchmarks/device_check.py run);
# 3. writes one JSON summary to --output (default $OUT/device_check.json when $OUT is set,
#    else benchmarks/device_check.json) and prints it.
#
# --dry-run (automatic on a machine without an accelerator) installs nothing and runs the
# same steps at tiny sizes. Exit status 0 when every step succeeded.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
DRY_RUN=0
OUTPUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --output) [ $# -ge 2 ] || { echo "--output needs a file path" >&2; exit 2; }
              OUTPUT="$2"; shift ;;
    --output=*) OUTPUT="${1#--output=}" ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (allowed: --dry-run, --output FILE)" >&2; exit 2 ;;
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

ARGS=(run --installed "$REQUIREMENT")
if [ "$DRY_RUN" = 1 ]; then ARGS+=(--dry-run); else ARGS+=(--expect-accelerator); fi
[ -n "$OUTPUT" ] && ARGS+=(--output "$OUTPUT")
exec "$PYTHON" benchmarks/device_check.py "${ARGS[@]}"
