#!/usr/bin/env bash
# Record run on a fresh GPU machine: install, fetch the shards if missing, train on every visible GPU (1, 2, 4 or 8).
# Extra arguments go to train_gpt.py, e.g. `bash run.sh --seed=1`.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -r requirements.txt
python3 data/cached_fineweb10B.py 9
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -lt 1 ]; then echo "run.sh: no CUDA GPU visible; the record run needs 1, 2, 4 or 8 GPUs" >&2; exit 1; fi
case "$ngpu" in 1|2|4|8) ;; *) echo "run.sh: $ngpu GPUs visible; use 1, 2, 4 or 8 (set CUDA_VISIBLE_DEVICES)" >&2; exit 1;; esac
exec python3 -m torch.distributed.run --standalone --nproc_per_node="$ngpu" train_gpt.py "$@"
