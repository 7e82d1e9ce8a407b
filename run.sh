#!/usr/bin/env bash
# Record run on a fresh GPU machine: install, check the GPUs, fetch the shards if missing (~2 GB), train on every
# visible GPU (1, 2, 4 or 8). Extra arguments go to train_gpt.py, e.g. `bash run.sh --seed=1`.
set -euo pipefail
cd "$(dirname "$0")"
die() { echo "run.sh: $*" >&2; exit 1; }
python3 -m pip install -q -r requirements.txt
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")  # torch counts them: after the install
case "$ngpu" in
    1|2|4|8) ;;
    0) die "no CUDA GPU visible; the record run needs 1, 2, 4 or 8 GPUs";;
    *) die "$ngpu GPUs visible; use 1, 2, 4 or 8 (set CUDA_VISIBLE_DEVICES)";;
esac
python3 data/cached_fineweb10B.py 9
exec python3 -m torch.distributed.run --standalone --nproc_per_node="$ngpu" train_gpt.py "$@"
