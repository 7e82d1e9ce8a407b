"""CIFAR-10 for train_cifar.py, without torchvision: download (or take from disk), verify, extract safely, convert.

    python data/cifar10.py [--data_dir DIR] [--url URL] [--md5 MD5]

Makes the cache train_cifar.py reads: DIR/train.npz and DIR/test.npz, each with `images` (uint8, N x 32 x 32 x 3, HWC)
and `labels` (int64, N) in the official order (data_batch_1..5, then test_batch). DIR defaults to data/cifar10/ beside
this file, which is where `python train_cifar.py` looks when run from the repository root. On an offline machine put
cifar-10-python.tar.gz (MD5-checked) or an extracted cifar-10-batches-py/ into DIR first. Running it again does nothing.

The steps live in train_cifar.py, so that a run's log, which starts with that script's source, holds them too; this
file is their command line (train_cifar.py also runs them itself when the cache is missing).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_cifar import CIFAR_MD5, CIFAR_URL, prepare_cifar10  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download and convert CIFAR-10 for train_cifar.py.")
    parser.add_argument("--data_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10"))
    parser.add_argument("--url", default=CIFAR_URL, help="where to download cifar-10-python.tar.gz from")
    parser.add_argument("--md5", default=CIFAR_MD5, help="the tarball's expected MD5")
    args = parser.parse_args(argv)
    for path in prepare_cifar10(args.data_dir, args.url, args.md5).values():
        print(path)


if __name__ == "__main__":
    main()
