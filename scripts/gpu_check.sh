#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py, whose docstring says what it measures), run from the
# repository root with the environment it expects:
#
#     scripts/gpu_check.sh "$OUT"            # the lent GPU machine: ~1B-parameter model
#     scripts/gpu_check.sh /tmp/x --tiny     # here, on the CPU: a tiny model, seconds
#
# Extra arguments go to gpu_check.py. Writes gpu_check.json and gpu_check.log to the folder.
# Exit status: gpu_check.py's (0 every phase ran, 2 a phase raised, 3 a forbidden import,
# 4 no GPU visible without --tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-}}"
if [ -z "$out" ]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR [gpu_check.py args...]" >&2
    exit 64
fi
[ "$#" -gt 0 ] && shift
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TRANSFORMERS_VERBOSITY=error
exec "${PYTHON:-python3}" scripts/gpu_check.py --out "$out" --check-imports "$@"
