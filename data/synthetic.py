#!/usr/bin/env python3
"""Offline stand-in data for the CPU smoke runs of the README (no network, a few seconds):

    python data/synthetic.py gpt      # data/synthetic_gpt/: FineWeb-format token shards of a learnable toy language
    python data/synthetic.py cifar    # data/synthetic_cifar/: a CIFAR-10-shaped cache of learnable coloured images

GPT: documents start with GPT-2's <|endoftext|> (50256), as FineWeb's shards; each continues a random walk over 512
token ids in which every token has 4 likely successors (a fixed random table), so a model can bring the loss from
ln(50304) = 10.8 towards the walk's entropy (about 1.4) in a few hundred steps. CIFAR: train.npz and test.npz as
train_cifar.py caches them (uint8 N x 32 x 32 x 3, int64 labels 0-9); the class sets a colour and a stripe direction,
plus noise. Neither says anything about FineWeb or CIFAR-10 results: they only show that a trainer runs and learns.
"""
import argparse
import os
import sys

import numpy as np

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256  # the shard header of data/cached_fineweb10B.py's files
EOT, WORDS, SUCCESSORS = 50256, 512, 4


def toy_documents(n_tokens, rng, successors):
    """Concatenated documents [EOT, w0, w1, ...] of 50-500 tokens, n_tokens in all."""
    table = successors.tolist()  # Python lists: the walk is a loop of lookups
    choices = rng.integers(SUCCESSORS, size=n_tokens).tolist()
    out, word = [], 0
    while len(out) < n_tokens:
        length = min(int(rng.integers(50, 500)), n_tokens - len(out))
        out.append(EOT)
        word = int(rng.integers(WORDS))
        for _ in range(length - 1):
            out.append(word)
            word = table[word][choices[len(out) - 1]]
    return np.array(out, dtype=np.uint16)


def write_shard(path, tokens):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def write_gpt(out, train_tokens, val_tokens, shards, seed):
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, WORDS, (WORDS, SUCCESSORS))  # the language: one table for train and val
    write_shard(os.path.join(out, "fineweb_val_000000.bin"), toy_documents(val_tokens, rng, successors))
    for shard in range(1, shards + 1):
        write_shard(os.path.join(out, f"fineweb_train_{shard:06d}.bin"),
                    toy_documents(train_tokens // shards, rng, successors))
    return (f"{out}/fineweb_train_*.bin and {out}/fineweb_val_000000.bin: {train_tokens:,} train and "
            f"{val_tokens:,} val tokens")


def toy_images(n, rng, colours):
    labels = rng.integers(0, 10, n)
    rows = np.arange(32)[:, None] * np.ones(32)
    stripes = np.stack([np.sin(rows * (1 + k % 5) / 3 + (k // 5) * np.pi / 2) for k in range(10)])  # 10 patterns
    images = colours[labels][:, None, None, :] + 30 * stripes[labels][..., None] + rng.normal(0, 40, (n, 32, 32, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_cifar(out, train_images, test_images, seed):
    rng = np.random.default_rng(seed)
    colours = rng.uniform(60, 195, (10, 3))
    for split, n in [("train", train_images), ("test", test_images)]:
        images, labels = toy_images(n, rng, colours)
        np.savez(os.path.join(out, f"{split}.npz"), images=images, labels=labels)
    return f"{out}/train.npz and {out}/test.npz: {train_images:,} train and {test_images:,} test images"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("gpt", "cifar"), help="which trainer's stand-in data")
    ap.add_argument("--out", help="folder to write (default: data/synthetic_gpt or data/synthetic_cifar)")
    ap.add_argument("--train_tokens", type=int, default=2_000_000, help="gpt: train tokens in all (default 2,000,000)")
    ap.add_argument("--val_tokens", type=int, default=65_536, help="gpt: val tokens (default 65,536)")
    ap.add_argument("--shards", type=int, default=2, help="gpt: train shards (default 2)")
    ap.add_argument("--train_images", type=int, default=5_000, help="cifar: train images (default 5,000)")
    ap.add_argument("--test_images", type=int, default=1_000, help="cifar: test images (default 1,000)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = ap.parse_args(argv)
    for name in ("train_tokens", "val_tokens", "shards", "train_images", "test_images"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}={getattr(args, name)}: must be at least 1")
    if args.train_tokens < 2 * args.shards:
        ap.error(f"--train_tokens={args.train_tokens}: fewer than 2 tokens a shard; lower --shards")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), f"synthetic_{args.kind}")
    try:
        os.makedirs(out, exist_ok=True)
        if args.kind == "gpt":
            print("wrote " + write_gpt(out, args.train_tokens, args.val_tokens, args.shards, args.seed))
        else:
            print("wrote " + write_cifar(out, args.train_images, args.test_images, args.seed))
    except OSError as e:
        print(f"synthetic.py: error: {e.filename or out}: cannot write there ({e.strerror}); --out names another "
              "folder", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
