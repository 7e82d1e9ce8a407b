"""CIFAR-10 speedrun: >= 94% mean test accuracy (the 2.015 s recipe of hiverge/cifar10-speedrun; --variant=airbench94:
airbench94_muon, 2.59 s), or 96% with --variant=96 (airbench96_faster).

    python train_cifar.py [--name=value ...]      # --help lists every hyperparameter

One file: the data step (download, verify, extract, convert), augmentation, network, Muon, training, TTA and the log.
The log (logs/<run_id>.txt) holds this source, the environment, the effective hyperparameters, one line per epoch and
per run, and a summary line. Runs on CUDA (fp16, channels_last, compiled) and on CPU (fp32, eager) with the same code.
"""
import functools
import hashlib
import http.client
import importlib.metadata
import inspect
import itertools
import math
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Hyperparameters:
    variant: str = "94"              # 94: the 2.015 s recipe, these defaults; airbench94, 96: VARIANTS below
    runs: int = 200                  # timed runs, after one untimed warmup run on random labels (CUDA or --compile=1)
    seed: int = 0                    # run i (0 = the warmup) starts from torch.manual_seed(1000 * seed + i)
    data_dir: str = "data/cifar10"   # the cache {train,test}.npz; made from a tarball or folder here, else downloaded
    compile: int = 1                 # torch.compile the nets and Newton-Schulz (0: eager)
    run_id: str = ""                 # the log is logs/<run_id>.txt (a plain file name); default: a fresh uuid4
    # data and augmentation
    epochs: float = 7.59             # steps = ceil(epochs * (n_train // batch_size)); 94 drops partial batches
    batch_size: int = 1536           # images a step
    translate: int = 2               # random crop of images reflect-padded by this many pixels
    cutout: int = 0                  # side of a randomly placed zeroed square (0: none)
    brightness: float = 0.1399       # each image, each epoch: + U(-b, b), in normalized space
    contrast: float = 0.1308         # then times 1 + U(-c, c)
    tta_level: int = 3               # 0: plain, 1: + mirror, 2: + mirrored 1 px shifts (6 views), 3: selective 6
    tta_fraction: float = 0.25       # tta_level 3: the 6 views (1/6 each) for this least confident fraction only
    # network
    widths: tuple = (64, 256, 256)   # channels of the three conv blocks
    depth: int = 2                   # convs per block; 3 adds a residual around the last two
    bn_momentum: float = 0.4434      # PyTorch convention: running = (1 - m) * running + m * batch
    activation: str = "silu"         # in the conv groups: silu or gelu (GELU after the whitening conv either way)
    fp16_batchnorm: int = 1          # CUDA: BatchNorm in fp16 with the rest of the net (0: fp32)
    logit_scale: float = 0.0         # logits = head(features) * this; 0: 1 / widths[-1], as airbench94_muon
    head_unit_std: int = 1           # rescale the head's initial weight to unit std
    whiten_images: int = 960         # the whitening conv's statistics come from this many first training images
    whiten_eps: float = 5e-4         # added to the patch covariance's eigenvalues before the inverse root
    whiten_svd: int = 1              # 1: the covariance's SVD (filters by descending eigenvalue), 0: eigh (ascending)
    whiten_bias_epochs: float = 0.19  # the whitening conv's bias trains ceil(this * steps an epoch) steps
    zero_whiten_bias: int = 0        # 1: that bias starts at 0 (96), else at nn.Conv2d's default random init
    # optimization (the loss is summed over the batch)
    label_smoothing: float = 0.09    # weight of the uniform distribution in the cross-entropy targets
    momentum: float = 0.825          # Nesterov SGD (94: biases and head; 96 and the proxy: everything)
    warmup: float = 0.0              # fraction of steps warming the lr up from 0.2x; then linear decay to 0
    muon_lr: float = 0.205           # (94) Muon for the 3x3 conv filters
    muon_momentum: float = 0.655     # (94) Muon's Nesterov momentum
    ns_steps: int = 3                # (94) Newton-Schulz iterations
    ns_batched: int = 1              # (94) 1: all filters in one zero-padded stack (newton_schulz_batched); 0: singly
    ns_coefficients: tuple = (3.4576, -4.7391, 2.0843)  # (94, batched) the quintic's a, b, c
    ns_target_norm: tuple = (0.5012, 0.0786)  # (94, batched) the stack's first scaling, at the run's start and end
    norm_every: int = 2              # (94) rescale each filter to norm sqrt(out) before its update every
    norm_every_growth: int = 15      # (94) norm_every + int(norm_every_growth * step / steps) steps
    norm_eps: float = 1e-7           # (94) added to the filter's norm in that rescale
    muon_decay: int = 1              # (94) Muon then decays p *= 1 - lr * wd_per_example * batch_size (0: none)
    bias_lr: float = 0.0573          # (94) whitening and BatchNorm biases
    head_lr: float = 0.5415          # (94) SGD lr of the linear head
    wd_per_example: float = 1.0418e-6  # (94) SGD weight_decay = wd_per_example * batch_size / lr
    lr: float = 9.0                  # (96, proxy) SGD lr per 1024 examples, divided by 1 + 1 / (1 - momentum)
    weight_decay: float = 0.012      # (96, proxy) per 1024 examples, likewise
    bias_scaler: float = 64.0        # (96, proxy) lr multiplier of the BatchNorm biases
    lookahead_every: int = 0         # every k steps: ema = lerp(ema, net, 1 - decay^k * (step/steps)^3); net = ema
    lookahead_decay: float = 0.95    # the lookahead EMA's decay a step
    select: float = 1.0              # train on the fraction of each batch a proxy net finds hardest (1: no proxy)
    proxy_widths: tuple = (32, 64, 64)  # channels of the proxy net that picks the hardest examples
    proxy_depth: int = 2             # convs per block of the proxy net
    proxy_every: int = 4             # the proxy takes an SGD step every this many steps


# airbench94_muon (2.59 s on an A100), the 94 recipe before the 2.015 s one
AIRBENCH94 = dict(epochs=8.0, batch_size=2000, brightness=0.0, contrast=0.0, tta_level=2, bn_momentum=0.4,
                  activation="gelu", fp16_batchnorm=0, whiten_images=5000, whiten_svd=0, whiten_bias_epochs=3.0,
                  label_smoothing=0.2, momentum=0.85, muon_lr=0.24, muon_momentum=0.6, ns_batched=0, norm_every=1,
                  norm_every_growth=0, norm_eps=0.0, muon_decay=0, bias_lr=0.053, head_lr=0.67, wd_per_example=2e-6)
VARIANT_96 = dict(AIRBENCH94, epochs=45.0, batch_size=1024, translate=4, cutout=12, widths=(128, 384, 512), depth=3,
                  bn_momentum=0.1, logit_scale=1 / 9, head_unit_std=0, warmup=0.1, lookahead_every=5, select=0.5,
                  zero_whiten_bias=1,
                  # airbench96_faster means to freeze the whitening bias after 3 epochs, but its test compares an epoch
                  # with a step count and never fires. We keep the published, measured behaviour: the bias trains the
                  # whole run. --whiten_bias_epochs=3 gives the intended one. (Also unlike that script: the proxy
                  # trains step by step beside the main net instead of all before it, which gives the same selections.)
                  whiten_bias_epochs=45.0)
VARIANTS = {"94": {}, "airbench94": AIRBENCH94, "96": VARIANT_96}


def fail(message):
    sys.exit(f"error: {message}")


# ----------------------------------------------------------------------------------------------------------------------
# Data: CIFAR-10 python tarball -> {train,test}.npz with images uint8 N x 32 x 32 x 3 and labels int64, official order.

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
TARBALL, FOLDER = "cifar-10-python.tar.gz", "cifar-10-batches-py"
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def md5sum(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, path, md5):
    print(f"downloading {url} to {path}")
    part = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except (OSError, ValueError, http.client.HTTPException) as e:
        if os.path.exists(part):
            os.remove(part)
        fail(f"could not download {url} ({e}); put {TARBALL} or an extracted {FOLDER}/ into {os.path.dirname(path)}/")
    if (got := md5sum(part)) != md5:
        os.remove(part)
        fail(f"{url} gave a file with MD5 {got}, not {md5}; nothing was kept, try again")
    os.replace(part, path)


def extract(tarball, data_dir):
    """Extract FOLDER from the tarball; refuses links and members that would land outside the target folder."""
    print(f"extracting {tarball}")
    tmp = os.path.realpath(tempfile.mkdtemp(prefix=".extract-", dir=data_dir))
    try:
        with tarfile.open(tarball) as tar:
            members = tar.getmembers()
            for m in members:
                target = os.path.realpath(os.path.join(tmp, m.name))
                if not (m.isfile() or m.isdir()) or os.path.commonpath([tmp, target]) != tmp:
                    fail(f"{tarball}: member {m.name!r} is a link or lands outside the folder; refusing to extract it")
            for m in filter(tarfile.TarInfo.isfile, members):
                target = os.path.join(tmp, m.name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        missing = [name for names in SPLITS.values() for name in names
                   if not os.path.isfile(os.path.join(tmp, FOLDER, name))]
        if missing:
            fail(f"{tarball} holds no {FOLDER}/{missing[0]}: cut short, damaged or not the CIFAR-10 python tarball; "
                 "delete it to download it again")
        os.replace(os.path.join(tmp, FOLDER), os.path.join(data_dir, FOLDER))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        fail(f"{tarball}: cannot extract it ({type(e).__name__}: {e}): delete it to download it again")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_batch(path):
    """One batch file: a pickled dict, b'data' uint8 N x 3072 (R, G, B planes of 32 x 32), b'labels' N ints in 0..9."""
    if not os.path.isfile(path):
        fail(f"missing {path}: delete the incomplete {os.path.dirname(path)}/ and run again, or put the tarball there")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x, y = d[b"data"], np.array(d[b"labels"], dtype=np.int64)
        ok = isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.shape == (len(y), 3072) and y.ndim == 1
    except Exception as e:
        fail(f"{path}: not a CIFAR-10 batch file ({type(e).__name__}: {e})")
    if not ok or len(y) == 0 or y.min() < 0 or y.max() > 9:
        fail(f"{path}: not a CIFAR-10 batch file (want b'data' uint8 N x 3072 and N b'labels' in 0..9)")
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y


def prepare_cifar10(data_dir, url=CIFAR_URL, md5=CIFAR_MD5):
    """Make sure data_dir holds the cache; build it from FOLDER or TARBALL in data_dir, or download TARBALL from url."""
    cache = {split: os.path.join(data_dir, f"{split}.npz") for split in SPLITS}
    if all(map(os.path.isfile, cache.values())):
        return cache
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        fail(f"--data_dir={data_dir} is a file, not a folder: name a folder for the cache")
    made = []  # the folders made here: removed again, if empty, when the cache cannot be made
    parent = os.path.abspath(data_dir)
    while not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        fail(f"--data_dir={data_dir}: cannot make the folder ({e.strerror})")
    try:
        return build_cache(data_dir, cache, url, md5)
    except SystemExit:
        for folder in made:  # innermost first
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        raise


def build_cache(data_dir, cache, url, md5):
    """The cache files from FOLDER in data_dir, extracted first from TARBALL (downloaded if absent)."""
    folder, tarball = os.path.join(data_dir, FOLDER), os.path.join(data_dir, TARBALL)
    if not os.path.isdir(folder):
        if not os.path.exists(tarball):
            download(url, tarball, md5)
        elif (got := md5sum(tarball)) != md5:
            fail(f"{tarball} has MD5 {got}, not {md5}: replace it, or delete it to download it again")
        extract(tarball, data_dir)
    print(f"converting {folder}")
    arrays = {split: [read_batch(os.path.join(folder, name)) for name in names] for split, names in SPLITS.items()}
    for split, batches in arrays.items():
        with open(cache[split] + ".part", "wb") as f:
            np.savez(f, images=np.concatenate([x for x, _ in batches]), labels=np.concatenate([y for _, y in batches]))
        os.replace(cache[split] + ".part", cache[split])
    return cache


def cache_problem(images, labels):
    """What is wrong with a cache file's arrays (images uint8 N x 32 x 32 x 3, N int64 labels in 0..9), or None."""
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3):
        return f"images are {images.dtype} of shape {images.shape}, not uint8 N x 32 x 32 x 3"
    if labels.dtype != np.int64 or labels.ndim != 1:
        return f"labels are {labels.dtype} of shape {labels.shape}, not int64 of shape (N,)"
    if len(images) != len(labels) or len(images) == 0:
        return f"{len(images)} images and {len(labels)} labels"
    if labels.min() < 0 or labels.max() > 9:
        return f"labels from {labels.min()} to {labels.max()}, not in 0..9"
    return None


def load_cifar10(data_dir):
    """(train_images, train_labels, test_images, test_labels) as numpy arrays, preparing the cache if needed."""
    out = []
    for path in prepare_cifar10(data_dir).values():
        try:
            with np.load(path) as f:
                images, labels = f["images"], f["labels"]
        except Exception as e:
            fail(f"{path}: unreadable ({type(e).__name__}: {e}); delete it to rebuild it")
        if problem := cache_problem(images, labels):
            fail(f"{path}: not a CIFAR-10 cache ({problem}); delete it to rebuild it")
        out += [images, labels]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Augmentation and the device-resident loader. Images are N x 3 x 32 x 32 floats in [0, 1].

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def normalize(x):
    return (x - x.new_tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / x.new_tensor(CIFAR_STD).view(1, 3, 1, 1)


def random_crop(padded, r, scaled_rand=False):
    """Each image's size x size window at a random shift in [-r, r]^2 (25 shifts for r = 2) of its padded copy; the
    offsets by randint (airbench), or scaled_rand as the 2.015 s recipe draws them: (rand * (2r + 1)).long(), y then
    x."""
    n, size = len(padded), padded.size(-1) - 2 * r
    if scaled_rand:
        dy, dx = ((torch.rand(n, device=padded.device) * (2 * r + 1)).long() for _ in range(2))
    else:
        dy, dx = torch.randint(0, 2 * r + 1, (2, n), device=padded.device)
    windows = padded.unfold(2, size, 1).unfold(3, size, 1)  # N x C x (2r+1) x (2r+1) x size x size, a view
    return windows[torch.arange(n, device=padded.device), :, dy, dx]


def random_cutout(x, size):
    """Zero one size x size square per image, placed uniformly where it fits inside the image."""
    n, _, h, w = x.shape
    y0, x0 = (torch.randint(0, d - size + 1, (n, 1, 1, 1), device=x.device) for d in (h, w))
    rows, cols = torch.arange(h, device=x.device).view(1, 1, h, 1), torch.arange(w, device=x.device).view(1, 1, 1, w)
    return x.masked_fill((rows >= y0) & (rows < y0 + size) & (cols >= x0) & (cols < x0 + size), 0)


def jitter(x, brightness, contrast):
    """Each image shifted by U(-brightness, brightness), then scaled by 1 + U(-contrast, contrast)."""
    shift = (torch.rand(len(x), 1, 1, 1, device=x.device, dtype=x.dtype) * 2 - 1) * brightness
    scale = (torch.rand(len(x), 1, 1, 1, device=x.device, dtype=x.dtype) * 2 - 1) * contrast + 1
    return (x + shift) * scale


def train_batches(images, labels, batch_size, translate, cutout, brightness=0.0, contrast=0.0, drop_last=False):
    """Endless stream of (inputs, labels): each epoch shows every image once; batches may span epochs, or with
    drop_last (the 2.015 s recipe's stream, its crop offsets drawn as it draws them) each epoch gives its
    n // batch_size whole batches only. Alternating flip: a random half starts mirrored, and every image flips
    orientation each epoch; then crop, cutout and jitter, in normalized space, vectorized."""
    x = normalize(images)
    x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)
    if translate:
        x = F.pad(x, (translate,) * 4, mode="reflect")
    parts, have = [], 0
    for epoch in itertools.count():
        xe = random_crop(x, translate, drop_last) if translate else x
        xe = xe.flip(-1) if epoch % 2 else xe
        xe = random_cutout(xe, cutout) if cutout else xe
        xe = jitter(xe, brightness, contrast) if brightness or contrast else xe
        perm, pos = torch.randperm(len(xe), device=xe.device), 0
        if drop_last:
            for i in range(len(perm) // batch_size):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                yield xe[idx], labels[idx]
            continue
        while pos < len(perm):
            idx = perm[pos:pos + batch_size - have]
            parts.append((xe[idx], labels[idx]))
            have, pos = have + len(idx), pos + len(idx)
            if have == batch_size:
                yield parts[0] if len(parts) == 1 else tuple(map(torch.cat, zip(*parts)))
                parts, have = [], 0


# ----------------------------------------------------------------------------------------------------------------------
# Network

class Conv(nn.Conv2d):
    """3x3 'same' conv without bias; the first in_channels filters start as the identity."""
    def __init__(self, c_in, c_out):
        super().__init__(c_in, c_out, 3, padding="same", bias=False)

    def reset_parameters(self):
        super().reset_parameters()
        nn.init.dirac_(self.weight.data[:self.in_channels])


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, c, momentum):
        super().__init__(c, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)  # only the bias trains


class ConvGroup(nn.Module):
    """conv, 2x2 max-pool, BN, act, then (conv, BN, act) x (depth - 1); depth 3: a residual around the last two."""
    def __init__(self, c_in, c_out, depth, bn_momentum, activation="gelu"):
        super().__init__()
        self.convs = nn.ModuleList([Conv(c_in, c_out)] + [Conv(c_out, c_out) for _ in range(depth - 1)])
        self.norms = nn.ModuleList([BatchNorm(c_out, bn_momentum) for _ in range(depth)])
        self.act = F.silu if activation == "silu" else F.gelu

    def forward(self, x):
        x = self.act(self.norms[0](F.max_pool2d(self.convs[0](x), 2)))
        y = self.norms[1](self.convs[1](x))
        if len(self.convs) == 3:
            y = self.norms[2](self.convs[2](self.act(y))) + x
        return self.act(y)


class CifarNet(nn.Module):
    """Frozen 2x2 whitening conv (24 channels, trainable bias), GELU, three ConvGroups, 3x3 max-pool, linear head
    whose output is multiplied by logit_scale, or by 1 / widths[-1] when that is 0."""
    def __init__(self, widths, depth, bn_momentum, logit_scale, head_unit_std, zero_whiten_bias, activation="gelu"):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2)
        self.whiten.weight.requires_grad_(False)
        c = (24, *widths)
        self.groups = nn.Sequential(*[ConvGroup(c[i], c[i + 1], depth, bn_momentum, activation) for i in range(3)])
        self.head = nn.Linear(widths[-1], 10, bias=False)
        self.logit_scale, self.head_unit_std = logit_scale or 1 / widths[-1], head_unit_std
        self.zero_whiten_bias = zero_whiten_bias

    @torch.no_grad()
    def reset(self):
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                m.reset_parameters()
        if self.head_unit_std:
            self.head.weight /= self.head.weight.std()
        if self.zero_whiten_bias:
            self.whiten.bias.zero_()

    def forward(self, x, whiten_bias_grad=True):
        b = self.whiten.bias if whiten_bias_grad else self.whiten.bias.detach()
        x = self.groups(F.gelu(F.conv2d(x, self.whiten.weight, b)))
        return self.head(F.max_pool2d(x, 3).flatten(1)) * self.logit_scale


def whitening_filters(x, eps, svd=False):
    """The whitening conv's 24 filters: v_i / sqrt(lambda_i + eps) for the eigenpairs of the uncentred second moment
    of all 2x2 patches of x (N x 3 x H x W, normalized), and their negations; svd: from the moment's SVD, by
    descending lambda, with rsqrt (the 2.015 s recipe), else from eigh, ascending (airbench)."""
    patches = x.float().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    moment = patches.T @ patches / len(patches)
    if svd:
        U, S, _ = torch.linalg.svd(moment)
        filters = (U * torch.rsqrt(S + eps)[None]).T.reshape(12, 3, 2, 2)
    else:
        eigenvalues, eigenvectors = torch.linalg.eigh(moment)
        filters = (eigenvectors.T / (eigenvalues + eps).sqrt()[:, None]).view(12, 3, 2, 2)
    return torch.cat((filters, -filters))


# ----------------------------------------------------------------------------------------------------------------------
# Optimizers

def newton_schulz(G, steps):
    """Approximately orthogonalize a matrix (singular values to about [0.5, 1.5]) by a quintic iteration, in bf16."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    X = X / (X.norm() + 1e-7)
    tall = G.size(0) > G.size(1)
    X = X.T if tall else X
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def newton_schulz_batched(grads, steps, progress, coefficients=(3.4576, -4.7391, 2.0843), target_norm=(0.5012, 0.0786)):
    """The 2.015 s recipe's orthogonalization of all filters at once, in their dtype: each an out x (in*kh*kw) matrix,
    zero-padded to the most rows and to the most columns rounded up to a multiple of 16, stacked, scaled to the
    norm target_norm gives at progress (step / steps, a 0-d tensor: no recompile; linear from its first to its
    second), then to unit norm (each with its epsilon, as published), transposed when tall, `steps` quintic
    iterations, cut back to each shape."""
    mats = [g.reshape(len(g), -1) for g in grads]
    rows, cols = max(m.size(0) for m in mats), -(-max(m.size(1) for m in mats) // 16) * 16
    X = torch.stack([F.pad(m, (0, cols - m.size(1), 0, rows - m.size(0))) for m in mats])
    target = target_norm[0] * (1 - progress) + target_norm[1] * progress
    X = X * (target / (X.norm(dim=(1, 2), keepdim=True) + 1e-5))
    X = X / (X.norm(dim=(1, 2), keepdim=True) + 1e-5)
    tall = rows > cols
    X = X.mT if tall else X
    a, b, c = coefficients
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    X = X.mT if tall else X
    return [x[:len(m), :m.size(1)].reshape(g.shape) for x, m, g in zip(X, mats, grads)]


class Muon(torch.optim.Optimizer):
    """Nesterov SGD-momentum whose update is orthogonalized; a conv filter (out, in, kh, kw) is an out x (in*kh*kw)
    matrix. Each weight is rescaled to Frobenius norm sqrt(out) (over norm + norm_eps) before its update, every
    norm_every + int(norm_every_growth * step / total_steps) steps (airbench94_muon: every step); then decayed,
    p *= 1 - lr * weight_decay. batched: orthogonalize takes all updates at once (newton_schulz_batched)."""
    def __init__(self, params, lr, momentum, ns_steps, orthogonalize=newton_schulz, batched=False, total_steps=1,
                 norm_every=1, norm_every_growth=0, norm_eps=0.0, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))
        self.orthogonalize, self.batched, self.total_steps = orthogonalize, batched, total_steps
        self.norm_every, self.norm_every_growth, self.norm_eps = norm_every, norm_every_growth, norm_eps
        self.weight_decay, self.steps_taken, self.last_rescale = weight_decay, 0, 0

    @torch.no_grad()
    def step(self):
        self.steps_taken += 1
        interval = self.norm_every + int(self.norm_every_growth * self.steps_taken / self.total_steps)
        rescale = self.steps_taken - self.last_rescale >= interval
        if rescale:
            self.last_rescale = self.steps_taken
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = self.state[p]["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                updates.append(p.grad.add(buf, alpha=group["momentum"]))
            if self.batched and updates:
                progress = torch.tensor(self.steps_taken / self.total_steps, dtype=torch.float64)
                updates = self.orthogonalize(updates, group["ns_steps"], progress)
            elif updates:
                updates = [self.orthogonalize(g.reshape(len(g), -1), group["ns_steps"]).view(g.shape) for g in updates]
            for p, update in zip(params, updates):
                if rescale:
                    p.mul_(len(p) ** 0.5 / (p.norm() + self.norm_eps))
                p.add_(update, alpha=-group["lr"])
                if self.weight_decay:
                    p.mul_(1 - group["lr"] * self.weight_decay)


def make_optimizers(cfg, model, variant, total_steps, whiten_bias_steps, orthogonalize):
    """Each param group gets 'horizon', the step at which its lr reaches 0 (see set_lrs); weight_decay = wd / lr."""
    norm_biases = [m.bias for m in model.modules() if isinstance(m, BatchNorm)]
    filters = [m.weight for m in model.modules() if isinstance(m, Conv)]

    def group(params, lr, wd, horizon=total_steps):
        return dict(params=params, lr=lr, initial_lr=lr, weight_decay=wd / lr, horizon=horizon)

    sgd = lambda groups: torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=True, fused=True)
    if variant != "96":
        wd = cfg.wd_per_example * cfg.batch_size
        muon = Muon(filters, cfg.muon_lr, cfg.muon_momentum, cfg.ns_steps, orthogonalize, cfg.ns_batched, total_steps,
                    cfg.norm_every, cfg.norm_every_growth, cfg.norm_eps, wd if cfg.muon_decay else 0.0)
        muon.param_groups[0].update(initial_lr=cfg.muon_lr, horizon=total_steps)
        return [sgd([group([model.whiten.bias], cfg.bias_lr, wd, whiten_bias_steps),
                     group(norm_biases, cfg.bias_lr, wd), group([model.head.weight], cfg.head_lr, wd)]), muon]
    kilostep = 1024 * (1 + 1 / (1 - cfg.momentum))  # Nesterov's steady-state step / gradient, per 1024 examples
    lr, wd = cfg.lr / kilostep, cfg.weight_decay * cfg.batch_size / kilostep
    others = [model.whiten.bias, model.head.weight] + filters
    return [sgd([group(norm_biases, lr * cfg.bias_scaler, wd), group(others, lr, wd)])]


def set_lrs(optimizers, step, warmup, reciprocal=False):
    """lr = initial_lr * schedule: from 0.2x up to 1x over the first warmup * horizon steps, then linearly to 0;
    reciprocal (no warmup): 1 - step * (1 / horizon), the 2.015 s recipe's rounding of that line."""
    for opt in optimizers:
        for g in opt.param_groups:
            w = int(warmup * g["horizon"])
            f = 0.2 + 0.8 * step / w if step < w else (g["horizon"] - step) / (g["horizon"] - w)
            f = 1 - step * (1 / max(1, g["horizon"])) if reciprocal and not w else f
            g["lr"] = g["initial_lr"] * f


class Lookahead:
    """ema = lerp(ema, net, 1 - decay); net = ema, over all float state (BatchNorm statistics included)."""
    def __init__(self, model):
        self.net = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.ema = [t.clone() for t in self.net]

    @torch.no_grad()
    def update(self, decay):
        torch._foreach_lerp_(self.ema, self.net, 1 - decay)
        torch._foreach_copy_(self.net, self.ema)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def predict(model, images, tta_level, tta_fraction=1.0):
    """Averaged logits: level 0 the image, 1 the image and its mirror (1/2 each), 2 that at 1/2 plus the same for the
    image shifted 1 px down-right and 1 px up-left (reflect padding) at 1/4 each: 6 views; 3 (the 2.015 s recipe)
    level 0, then for the int(tta_fraction * n) images of least max softmax the mean of those 6 views, batches of
    2000 each way."""
    model.eval()

    def views(x):  # each output is used before the next call: CUDA graphs reuse the output memory
        return 0.5 * model(x) + 0.5 * model(x.flip(-1)) if tta_level in (1, 2) else model(x).clone()

    out = []
    for x in normalize(images).split(2000):
        logits = views(x)
        if tta_level == 2:
            p = F.pad(x, (1,) * 4, mode="reflect")
            logits = 0.5 * logits + 0.25 * views(p[..., :-2, :-2]) + 0.25 * views(p[..., 2:, 2:])
        out.append(logits)
    logits = torch.cat(out)
    if tta_level == 3:
        k = int(tta_fraction * len(logits))
        unsure = logits.softmax(1).amax(1).topk(k, largest=False, sorted=False).indices
        for start in range(0, k, 2000):
            idx = unsure[start:start + 2000]
            x = normalize(images[idx])
            p = F.pad(x, (1,) * 4, mode="reflect")
            six = torch.cat([x, p[..., :-2, :-2], p[..., 2:, 2:]])
            logits[idx] = model(torch.cat([six, six.flip(-1)])).view(6, len(idx), -1).mean(0)
    return logits


def evaluate(model, images, labels, tta_level, tta_fraction=1.0):
    return (predict(model, images, tta_level, tta_fraction).argmax(1) == labels).float().mean().item()


# ----------------------------------------------------------------------------------------------------------------------
# Training

class Timer:
    """Wall time summed over start/stop pairs, each taken once the device has finished its queued work."""
    def __init__(self, device):
        self.cuda, self.total = device.type == "cuda", 0.0

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.total += time.perf_counter() - self.t0


def select_hardest(proxy, optimizers, x, y, step, cfg):
    """Indices of the examples with the highest proxy loss; every proxy_every steps the proxy trains on them."""
    learn = step % cfg.proxy_every == 0
    with torch.set_grad_enabled(learn):
        logits = proxy(x, whiten_bias_grad=False)
        losses = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing, reduction="none")
        idx = losses.topk(int(cfg.select * len(y)), sorted=False).indices
        if learn:
            losses[idx].sum().backward()
            set_lrs(optimizers, step, cfg.warmup)
            for opt in optimizers:
                opt.step()
            proxy.zero_grad(set_to_none=True)
    return idx


def train_run(cfg, model, proxy, data, run, log, orthogonalize=None, progress=False):
    """Run `run` (0: the warmup, on random labels) from a fresh init; returns (TTA test accuracy, seconds). The clock
    covers the whitening init, the training steps with their data work and the proxy, and the final TTA evaluation;
    not the per-epoch evaluation, where a non-finite training loss stops the script. progress: print the whitening and
    steps 1, 2, 4, 8, ... of the first epoch to the console (not the log), so a slow first run shows life at once;
    the step count needs no host sync."""
    torch.manual_seed(1000 * cfg.seed + run)
    orthogonalize = orthogonalize or (newton_schulz_batched if cfg.ns_batched else newton_schulz)  # main: compiled
    if cfg.ns_batched:
        orthogonalize = functools.partial(orthogonalize, coefficients=cfg.ns_coefficients,
                                          target_norm=cfg.ns_target_norm)
    train_x, train_y, test_x, test_y = data
    train_y = torch.randint_like(train_y, 10) if run == 0 else train_y
    steps_per_epoch = max(1, len(train_x) // cfg.batch_size)
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    whiten_bias_steps = math.ceil(cfg.whiten_bias_epochs * steps_per_epoch)
    model.reset()
    optimizers = make_optimizers(cfg, model, cfg.variant, total_steps, whiten_bias_steps, orthogonalize)
    if proxy is not None:
        proxy.reset()
        proxy_optimizers = make_optimizers(cfg, proxy, "96", total_steps, 0, orthogonalize)
    batches = train_batches(train_x, train_y, cfg.batch_size, cfg.translate, cfg.cutout, cfg.brightness,
                            cfg.contrast, drop_last=cfg.variant == "94")
    timer = Timer(train_x.device)

    timer.start()
    filters = whitening_filters(normalize(train_x[:cfg.whiten_images]), cfg.whiten_eps, cfg.whiten_svd)
    for net in [model] if proxy is None else [model, proxy]:
        net.whiten.weight.data.copy_(filters)
    timer.stop()
    if progress:
        print(f"run:{run} whitening from {min(cfg.whiten_images, len(train_x))} images: {timer.total:.1f}s; "
              f"{total_steps} steps of {cfg.batch_size} images", flush=True)
    lookahead = Lookahead(model) if cfg.lookahead_every else None
    model.train()
    for step in range(total_steps):
        if step % steps_per_epoch == 0:
            timer.start()  # before the draw: the run-start preprocessing and every epoch's crop are timed
        x, y = next(batches)
        if proxy is not None:
            idx = select_hardest(proxy, proxy_optimizers, x, y, step, cfg)
            x, y = x[idx], y[idx]
        outputs = model(x, whiten_bias_grad=step < whiten_bias_steps)
        loss = F.cross_entropy(outputs, y, label_smoothing=cfg.label_smoothing, reduction="sum")
        loss.backward()
        set_lrs(optimizers, step, cfg.warmup, reciprocal=cfg.variant == "94")
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        done = step + 1
        if progress and done < steps_per_epoch and done & (done - 1) == 0:  # a power of 2
            elapsed = time.perf_counter() - timer.t0 + timer.total
            print(f"run:{run} step:{done}/{total_steps} {elapsed:.1f}s", flush=True)
        if lookahead is not None and done % cfg.lookahead_every == 0:
            lookahead.update(cfg.lookahead_decay ** cfg.lookahead_every * (done / total_steps) ** 3)
        if lookahead is not None and done == total_steps:
            lookahead.update(1.0)
        if done % steps_per_epoch == 0 or done == total_steps:
            timer.stop()
            train_loss = loss.item() / len(y)
            train_acc = (outputs.argmax(1) == y).float().mean().item()
            val_acc = evaluate(model, test_x, test_y, 0)
            model.train()
            epoch = f"{math.ceil(done / steps_per_epoch)}/{math.ceil(total_steps / steps_per_epoch)}"
            log(f"run:{run} epoch:{epoch} train_loss:{train_loss:.4f} train_acc:{train_acc:.4f} val_acc:{val_acc:.4f} "
                f"train_time:{timer.total:.3f}s")
            if not math.isfinite(train_loss):  # checked where the loss is read anyway: no host sync added per step
                message = (f"{'the warmup run' if run == 0 else f'run {run}'} diverged: training loss {train_loss} "
                           f"at epoch {epoch}; lower the learning rates (94: --muon_lr --bias_lr --head_lr, 96: --lr)")
                log(message, console=False)
                fail(message)
    timer.start()
    acc = evaluate(model, test_x, test_y, cfg.tta_level, cfg.tta_fraction)
    timer.stop()
    return acc, timer.total


# ----------------------------------------------------------------------------------------------------------------------
# Command line, log, main

def fmt(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def usage():
    lines = ["usage: train_cifar.py [--name=value | --name value ...]",
             "Every field of Hyperparameters (see its comments); defaults are the 94% record (the 2.015 s recipe),",
             "[airbench94: ...] what --variant=airbench94 sets instead (airbench94_muon), [96: ...] what --variant=96",
             "sets (airbench96_faster; the rest as airbench94). Explicit values win over the variant's.",
             "--logit_scale=0: 1 / the last width (1/256 at --widths=64,256,256), so it follows --widths."]
    meaning = {}  # each field's comment in the source (its continuation lines, if any, are plain comments)
    for line in inspect.getsource(Hyperparameters).splitlines():
        field = re.match(r" +(\w+): \w+ = .*?# (.*)$", line)
        if field:
            meaning[field[1]] = field[2]
    flags = {}
    for f in fields(Hyperparameters):
        flags[f.name] = f"--{f.name}={fmt(f.default)}"
        for name, variant in (("airbench94", AIRBENCH94), ("96", VARIANT_96)):
            if f.name in variant and (name == "airbench94" or variant[f.name] != AIRBENCH94.get(f.name)):
                flags[f.name] += f" [{name}: {fmt(variant[f.name])}]"
    width = max(map(len, flags.values()))
    lines += [f"  {flag:<{width}}  {meaning[name]}" for name, flag in flags.items()]
    return "\n".join(lines)


def parse_args(argv):
    kinds = {f.name: type(f.default) for f in fields(Hyperparameters)}
    given, i = {}, 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg in ("-h", "--help"):
            print(usage())
            sys.exit(0)
        name, eq, text = arg[2:].partition("=")
        if not arg.startswith("--"):
            fail(f"unexpected argument {arg!r}: options are --name=value or --name value")
        if name not in kinds:
            fail(f"unknown option --{name} (python train_cifar.py --help lists them)")
        if not eq:
            if i == len(argv):
                fail(f"--{name} needs a value")
            text, i = argv[i], i + 1
        kind = kinds[name]
        try:
            element = type(getattr(Hyperparameters, name)[0]) if kind is tuple else None  # int widths, float rest
            given[name] = tuple(element(v) for v in text.split(",")) if kind is tuple else kind(text)
        except ValueError:
            want = f"comma-separated {'integers' if element is int else 'numbers'}" if kind is tuple else kind.__name__
            fail(f"bad value {text!r} for --{name}: want {want}")
    cfg = Hyperparameters(**{**VARIANTS.get(given.get("variant"), {}), **given})
    check(cfg)
    return cfg


RANGES = [  # (fields, rule, what the rule says): every hyperparameter but data_dir, checked before any work
    (("variant",), lambda v: v in VARIANTS, "94, airbench94 or 96"),
    (("activation",), lambda v: v in ("silu", "gelu"), "silu or gelu"),
    (("compile", "head_unit_std", "zero_whiten_bias", "fp16_batchnorm", "whiten_svd", "ns_batched", "muon_decay"),
     lambda v: v in (0, 1), "0 or 1"),
    (("depth", "proxy_depth"), lambda v: v in (2, 3), "2 or 3"),
    (("tta_level",), lambda v: v in (0, 1, 2, 3), "0, 1, 2 or 3"),
    (("seed",), lambda v: 0 <= v < 2 ** 32, "in [0, 2**32)"),
    (("run_id",), lambda v: v == "" or (re.fullmatch(r"[\w.-]+", v) and v not in (".", "..")),
     "a plain file name (letters, digits, '.', '_', '-'): the log is logs/<run_id>.txt"),
    (("runs", "batch_size", "whiten_images", "proxy_every", "epochs", "whiten_bias_epochs", "whiten_eps", "muon_lr",
      "bias_lr", "head_lr", "lr", "bias_scaler"), lambda v: v > 0, "> 0"),
    (("ns_steps", "lookahead_every", "wd_per_example", "weight_decay", "logit_scale", "norm_every_growth", "norm_eps",
      "brightness", "contrast"), lambda v: v >= 0, ">= 0"),
    (("norm_every",), lambda v: v >= 1, ">= 1"),
    (("translate",), lambda v: 0 <= v <= 31, "in [0, 31] (the reflect padding of 32-pixel images)"),
    (("cutout",), lambda v: 0 <= v <= 32, "in [0, 32]"),
    (("bn_momentum", "label_smoothing", "lookahead_decay", "tta_fraction"), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("momentum",), lambda v: 0 < v < 1, "in (0, 1) (Nesterov SGD needs a momentum)"),
    (("muon_momentum", "warmup"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("select",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("widths", "proxy_widths"), lambda v: len(v) == 3 and min(v) >= 1, "3 channel counts >= 1, e.g. 64,256,256"),
    (("ns_coefficients",), lambda v: len(v) == 3 and all(map(math.isfinite, v)), "3 finite numbers a,b,c"),
    (("ns_target_norm",), lambda v: len(v) == 2 and all(math.isfinite(x) and x > 0 for x in v),
     "2 numbers > 0: the start and end norms")]


def check(cfg):
    for names, rule, what in RANGES:
        for name in names:
            value = getattr(cfg, name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(f"--{name}={fmt(value)} must be a finite number")
            if not rule(value):
                fail(f"--{name}={fmt(value)} must be {what}")
    if int(cfg.select * cfg.batch_size) < 1:
        fail(f"--select={cfg.select} keeps no example of a batch of --batch_size={cfg.batch_size}")


def environment(device):
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    lines = [f"python: {platform.python_version()}", f"torch: {torch.__version__} (CUDA {torch.version.cuda})",
             f"triton: {version('triton')}", f"numpy: {np.__version__}",
             f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}",
             f"cpu threads: {torch.get_num_threads()}"]
    if shutil.which("nvidia-smi"):
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout.rstrip())
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    log_path = os.path.join("logs", f"{cfg.run_id or uuid.uuid4()}.txt")
    if os.path.exists(log_path):  # before any work; the file itself is made once the data is in
        fail(f"{log_path} exists: choose another --run_id (a log is never overwritten)")
    train_x, train_y, test_x, test_y = load_cifar10(cfg.data_dir)
    if cfg.variant == "94" and len(train_x) < cfg.batch_size:  # each epoch drops its partial batch: none would be left
        fail(f"--batch_size={cfg.batch_size} is more than the {len(train_x)} training images of {cfg.data_dir}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.half if device.type == "cuda" else torch.float32  # CUDA: fp16 (BatchNorm: --fp16_batchnorm)
    torch.backends.cudnn.benchmark = True
    to_images = lambda a: torch.from_numpy(a).to(device).to(dtype).div(255).permute(0, 3, 1, 2)  # channels_last
    to_labels = lambda a: torch.from_numpy(a).to(device)
    data = (to_images(train_x), to_labels(train_y), to_images(test_x), to_labels(test_y))

    os.makedirs("logs", exist_ok=True)
    try:
        open(log_path, "x").close()
    except FileExistsError:
        fail(f"{log_path} exists: choose another --run_id (a log is never overwritten)")
    except OSError as e:
        fail(f"{log_path}: cannot write the log ({e.strerror})")
    print(f"log: {log_path}", flush=True)

    def log(line, console=True):
        if console:
            print(line, flush=True)  # flushed: progress shows through a pipe too
        with open(log_path, "a") as f:
            f.write(line + "\n")

    with open(os.path.abspath(__file__)) as f:
        log(f.read().rstrip("\n"), console=False)
    log("=" * 100)
    for line in environment(device) + [f"command: python train_cifar.py {' '.join(argv)}",
                                       f"data: {os.path.abspath(cfg.data_dir)} train:{len(train_x)} test:{len(test_x)}",
                                       "hyperparameters:"]:
        log(line)
    for f in fields(cfg):
        log(f"  --{f.name}={fmt(getattr(cfg, f.name))}")
    log("=" * 100)

    def make_net(widths, depth):
        net = CifarNet(widths, depth, cfg.bn_momentum, cfg.logit_scale, cfg.head_unit_std, cfg.zero_whiten_bias,
                       cfg.activation)
        net = net.to(device, dtype, memory_format=torch.channels_last)
        for m in net.modules():
            if isinstance(m, BatchNorm) and not cfg.fp16_batchnorm:
                m.float()
        if cfg.compile:
            net.compile(mode="max-autotune" if device.type == "cuda" else None)
        return net

    model = make_net(cfg.widths, cfg.depth)
    proxy = make_net(cfg.proxy_widths, cfg.proxy_depth) if cfg.select < 1 else None
    orthogonalize = newton_schulz_batched if cfg.ns_batched else newton_schulz
    orthogonalize = torch.compile(orthogonalize) if cfg.compile else orthogonalize
    warm = cfg.compile or device.type == "cuda"
    if warm:  # compile and autotune outside the clock
        acc, seconds = train_run(cfg, model, proxy, data, 0, log, orthogonalize, progress=True)
        log(f"warmup acc:{acc:.4f} time:{seconds:.3f}s")
    accs, times = [], []
    for run in range(1, cfg.runs + 1):
        acc, seconds = train_run(cfg, model, proxy, data, run, log, orthogonalize, progress=run == 1 and not warm)
        log(f"run:{run} acc:{acc:.4f} time:{seconds:.3f}s")
        accs.append(acc)
        times.append(seconds)
    std = lambda values, spec: format(statistics.stdev(values), spec) if len(values) > 1 else "n/a"  # one run: none
    log(f"summary runs:{len(accs)} acc_mean:{statistics.mean(accs):.4f} acc_std:{std(accs, '.4f')} "
        f"time_mean:{statistics.mean(times):.3f}s time_std:{std(times, '.3f')}{'s' * (len(times) > 1)}")
    print(f"log: {log_path}")


if __name__ == "__main__":
    main()
