#!/usr/bin/env bash
# Record run on a fresh GPU machine: install, check the GPUs, fetch the shards if missing (~2 GB; with --run_evals=1
# HellaSwag's items too), train on every visible GPU (1, 2, 4 or 8). Extra arguments go to train_gpt.py, e.g.
# `bash run.sh --seed=1`.
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
case " ${*,,} " in  # --run_evals=1 scores HellaSwag after the clock: its items too, before the run (pyarrow reads them)
    *" --hellaswag_data="*) ;;
    *" --run_evals=1 "*|*" --run_evals=true "*) python3 -m pip install -q pyarrow && python3 data/hellaswag.py;;
esac
exec python3 -m torch.distributed.run --standalone --nproc_per_node="$ngpu" train_gpt.py "$@"
