#!/usr/bin/env bash
# The GPU check: one command for a lent GPU machine (one H100 or H200, no network), about 9 minutes at most with a
# cold compile cache. It runs train_gpt.py compiled on one GPU at the record's stage-1 and stage-3 shapes, micro
# checks of the fast pieces (FP8, FlexAttention, DC attention, Polar Express), train_cifar.py eager and compiled, and
# tests/test_gpu.py, each part in its own time-boxed process, and writes a plain-text report.
#
#   bash tests/gpu_check.sh [--dry-run] [--data=DIR] [--out=FILE] [--parts=a,b,...] [--budget=SECONDS]
#
#   --data=DIR   a token corpus: DIR/*train*.bin and DIR/*val*.bin, and DIR/tokenizer.json for the prefix-token loss
#                (without --data: a synthetic corpus, no prefix loss on a GPU)
#   --out=FILE   the report (default gpu_check_report.txt in the current folder)
#   --dry-run    every part at tiny sizes on the CPU, about a minute (the CPU test suite runs this)
# Exit code 0 only when every part is ok. The details are in tests/gpu_check.py's docstring.
set -euo pipefail
exec python3 "$(dirname "$0")/gpu_check.py" "$@"
