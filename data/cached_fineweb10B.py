"""Download pre-tokenized FineWeb shards (GPT-2 tokens) from the Hugging Face Hub.

    python data/cached_fineweb10B.py 9                    # val shard + train shards 1..9 (enough for a record)
    python data/cached_fineweb10B.py                      # all 103 train shards
    python data/cached_fineweb10B.py 9 --set finewebedu10B --dir /scratch/edu

A shard that is already complete (valid header, size = 1024 + 2 * n_tokens) is skipped without any network
access; a partial or corrupt one is downloaded again, and every download is checked. HF_ENDPOINT, HF_TOKEN
and the other Hub variables work as usual. The script stops at the first shard it cannot get, with one line
naming it; the exit code is 0 only when every asked shard is complete.
"""
import argparse, os, sys
import numpy as np

SETS = {  # --set: (Hub dataset, file prefix, number of train shards)
    "fineweb10B": ("kjj0/fineweb10B-gpt2", "fineweb", 103),
    "fineweb100B": ("kjj0/fineweb100B-gpt2", "fineweb", 1030),
    "finewebedu10B": ("kjj0/finewebedu10B-gpt2", "finewebedu", 99),
}
MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 256 * 4

def shard_problem(path):
    """None if `path` is a complete shard, else what is wrong with it."""
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        return f"{size} bytes, shorter than the header"
    header = np.fromfile(path, dtype="<i4", count=256)
    if header[0] != MAGIC or header[1] != VERSION:
        return f"bad header (magic {header[0]}, version {header[1]})"
    if size != HEADER_BYTES + 2 * int(header[2]):
        return f"{size} bytes but the header says {header[2]} tokens ({HEADER_BYTES + 2 * int(header[2])} bytes)"
    return None

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", nargs="?", type=int, help="number of train shards (default: all of the set)")
    parser.add_argument("--set", default="fineweb10B", choices=SETS, help="which published set (default fineweb10B)")
    parser.add_argument("--dir", help="target folder (default: data/<set>/ beside this script)")
    parser.error = lambda msg: sys.exit(f"error: {msg} (see --help)")  # one line, no usage block
    args = parser.parse_args()
    repo, prefix, n_max = SETS[args.set]
    n = n_max if args.n is None else args.n
    if not 0 <= n <= n_max:
        parser.error(f"number of train shards must be 0..{n_max} for {args.set}, got {n}")
    target = args.dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), args.set)
    names = [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, n + 1)]

    from huggingface_hub import hf_hub_download, constants
    downloaded = 0
    for name in names:
        path = os.path.join(target, name)
        problem = shard_problem(path)
        if problem is None:
            continue
        if constants.HF_HUB_OFFLINE:
            sys.exit(f"error: {path}: {problem}, and HF_HUB_OFFLINE is set; unset it to download")
        if os.path.exists(path):  # partial or corrupt: never leave it where a reader could take it
            os.remove(path)
        try:  # force_download: no local copy is good (checked above), and a dead network fails at once
            hf_hub_download(repo_id=repo, repo_type="dataset", filename=name, local_dir=target, force_download=True)
        except KeyboardInterrupt:
            sys.exit(f"\ninterrupted while downloading {path}; rerun to finish (complete shards are kept)")
        except Exception as e:
            while e.__cause__ is not None:  # the root cause says most (connection refused, 404, ...)
                e = e.__cause__
            why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            sys.exit(f"error: could not download {name} from {repo} at {constants.ENDPOINT} ({why}); "
                     f"check the network, HF_ENDPOINT and HF_TOKEN, then rerun (complete shards are kept)")
        problem = shard_problem(path)
        if problem is not None:
            if os.path.exists(path):
                os.remove(path)
            sys.exit(f"error: downloaded {name} is not a valid shard ({problem}); deleted it, rerun to retry")
        downloaded += 1
    print(f"{len(names)} shards complete in {target} ({downloaded} downloaded, "
          f"{len(names) - downloaded} already there)")

if __name__ == "__main__":
    main()
