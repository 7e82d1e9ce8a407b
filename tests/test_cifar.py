"""CPU tests of train_cifar.py and data/cifar10.py, each against a reference written here."""
import functools
import hashlib
import http.server
import importlib.util
import io
import math
import os
import pickle
import re
import subprocess
import sys
import tarfile
import threading
from dataclasses import fields

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_cifar as tc
from conftest import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])  # airbench's normalization
TINY = ["--compile=0", "--widths=8,16,16", "--proxy_widths=8,8,8", "--batch_size=100"]


def make_standin(root, per_batch=200, n_test=200, seed=0):
    """A learnable stand-in in the official cifar-10-batches-py layout (class = colour, plus noise).
    Returns the arrays it holds: train images N x 32 x 32 x 3 uint8 and int64 labels, then test."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, (10, 3))
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    arrays = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        y = rng.integers(0, 10, n)
        x = np.clip(colours[y][:, None, None, :] + rng.normal(0, 40, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        rows = np.stack([x[..., c].reshape(n, 1024) for c in range(3)], axis=1).reshape(n, 3072)  # R, G, B planes
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": [int(v) for v in y], b"data": rows,
                         b"filenames": [b"%d.png" % i for i in range(n)]}, f)
        arrays[name] = (x, y)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [b"class%d" % i for i in range(10)], b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, f)
    train = [arrays[f"data_batch_{i}"] for i in range(1, 6)]
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), *arrays["test_batch"])


def normalized(x):  # N x 32 x 32 x 3 uint8 -> N x 3 x 32 x 32, normalized, float64
    return ((x / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)


def as_images(x):  # uint8 NHWC -> the trainer's input: floats in [0, 1], N x 3 x H x W
    return torch.tensor(x.transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Pieces of the recipe

def test_whitening_matches_numpy_eigendecomposition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3, 9, 9))
    x = x + 0.8 * np.roll(x, 1, axis=3) + 0.5 * x[:, :1]  # correlated neighbours and channels
    eps = 5e-4
    w = tc.whitening_filters(torch.tensor(x, dtype=torch.float32), eps).numpy().astype(np.float64)
    assert w.shape == (24, 3, 2, 2)
    np.testing.assert_array_equal(w[12:], -w[:12])
    patches = np.array([x[n, :, i:i + 2, j:j + 2].ravel() for n in range(40) for i in range(8) for j in range(8)])
    lam, vec = np.linalg.eigh(patches.T @ patches / len(patches))
    filters = w[:12].reshape(12, 12)
    for k in range(12):  # each reference filter v_k / sqrt(lambda_k + eps) appears once, up to sign
        ref = vec[:, k] / np.sqrt(lam[k] + eps)
        row = filters[np.argmax(np.abs(filters @ ref))]
        np.testing.assert_allclose(row * np.sign(row @ ref), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    out = F.conv2d(torch.tensor(x), torch.tensor(w[:12])).permute(0, 2, 3, 1).reshape(-1, 12).numpy()
    cov = out.T @ out / len(out)  # as a conv, the filters whiten the patches: covariance diag(lambda / (lambda + eps))
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0, atol=2e-3)
    np.testing.assert_allclose(np.sort(np.diag(cov)), np.sort(lam / (lam + eps)), atol=2e-3)


def ns_reference(g):
    """Three Newton-Schulz steps act on the singular values: s -> a s + b s^3 + c s^5 after s / (|G|_F + 1e-7)."""
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    s = s / (np.linalg.norm(g) + 1e-7)
    for _ in range(3):
        s = 3.4445 * s - 4.7750 * s ** 3 + 2.0315 * s ** 5
    return u @ np.diag(s) @ vt


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (40, 2, 1, 1)])  # wide and tall as matrices
def test_muon_conv_step_matches_slow_reference(shape):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = tc.Muon([p], lr=0.24, momentum=0.6, ns_steps=3)
    buf = np.zeros(shape)
    for _ in range(4):
        before, g = p.detach().double().numpy().copy(), torch.randn(shape)
        p.grad = g.clone()
        opt.step()
        buf = 0.6 * buf + g.double().numpy()
        nesterov = g.double().numpy() + 0.6 * buf
        renormed = before * np.sqrt(shape[0]) / np.linalg.norm(before)
        ref = renormed - 0.24 * ns_reference(nesterov.reshape(shape[0], -1)).reshape(shape)
        err = np.abs(p.detach().double().numpy() - ref).max()
        assert err < 0.1 * np.abs(ref - renormed).max(), err  # bf16 Newton-Schulz: a few % of the update


def stream(images, labels, n_batches, **aug):
    batches = tc.train_batches(images, labels, **aug)
    xs, ys = zip(*(next(batches) for _ in range(n_batches)))
    return torch.cat(xs).double().numpy(), torch.cat(ys).numpy()


@pytest.mark.parametrize("n,batch_size", [(50, 16), (30, 64)])
def test_every_image_once_per_epoch(n, batch_size):
    torch.manual_seed(0)
    _, ids = stream(torch.rand(n, 3, 32, 32), torch.arange(n), -(-4 * n // batch_size),
                    batch_size=batch_size, translate=2, cutout=0)
    for epoch in range(4):
        assert sorted(ids[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert any(sorted(ids[k:k + n]) != list(range(n)) for k in range(1, n))  # and the order is shuffled


def orientation(out, original):
    """+1 / -1 where out equals the normalized image / its mirror, 0 where it is neither."""
    plain, mirror = [np.isclose(out, normalized(original)[..., ::s], atol=1e-5).all(axis=(1, 2, 3)) for s in (1, -1)]
    return np.where(plain, 1, 0) - np.where(mirror, 1, 0)


def test_alternating_flip():
    torch.manual_seed(0)
    n = 64
    x = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    out, ids = stream(as_images(x), torch.arange(n), 4 * n // 16, batch_size=16, translate=0, cutout=0)
    per_epoch = [orientation(out[e * n:(e + 1) * n], x[ids[e * n:(e + 1) * n]]) for e in range(4)]
    by_image = np.stack([o[np.argsort(ids[e * n:(e + 1) * n])] for e, o in enumerate(per_epoch)])
    assert (by_image != 0).all()
    assert 0 < (by_image[0] == -1).sum() < n  # a random half starts mirrored
    assert (by_image[1:] == -by_image[:-1]).all()  # then each image flips every epoch


def test_translate_stays_in_padded_image_and_covers_all_25_shifts():
    torch.manual_seed(0)
    n = 300
    x = np.random.default_rng(1).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    out, ids = stream(as_images(x), torch.arange(n), 2 * n // 50, batch_size=50, translate=2, cutout=0)
    padded = np.pad(normalized(x), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    for epoch in range(2):
        shifts = set()
        for img, i in zip(out[epoch * n:(epoch + 1) * n], ids[epoch * n:(epoch + 1) * n]):
            found = [(s, dy, dx) for s in (1, -1) for dy in range(5) for dx in range(5)
                     if np.allclose(img, padded[i][..., ::s][:, dy:dy + 32, dx:dx + 32], atol=1e-5)]
            assert found, "an output that is no 32x32 window of the padded image"
            shifts |= {(dy, dx) for _, dy, dx in found}
        assert len(shifts) == 25


def test_cutout_zeroes_one_square_inside_the_image():
    torch.manual_seed(0)
    n = 40
    x = np.random.default_rng(2).integers(1, 256, (n, 32, 32, 3), dtype=np.uint8)
    out, ids = stream(as_images(x), torch.arange(n), 1, batch_size=n, translate=0, cutout=12)
    ref = normalized(x[ids])
    corners = set()
    for img, r in zip(out, ref):
        zero = (img == 0).all(axis=0)
        rows, cols = np.flatnonzero(zero.any(axis=1)), np.flatnonzero(zero.any(axis=0))
        assert zero.sum() == 144 and len(rows) == len(cols) == 12 and rows[-1] - rows[0] == cols[-1] - cols[0] == 11
        assert any(np.allclose(img[:, ~zero], v[:, ~zero], atol=1e-5) for v in (r, r[..., ::-1]))
        corners.add((rows[0], cols[0]))
    assert len(corners) > n // 2


class Linear(torch.nn.Module):  # a fixed linear map of the image, so the reference can evaluate it in numpy
    def __init__(self):
        super().__init__()
        self.w = torch.randn(10, 3 * 32 * 32, dtype=torch.float64)

    def forward(self, x):
        return x.flatten(1) @ self.w.T


def test_tta_views():
    torch.manual_seed(0)
    x = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    model = Linear()
    f = lambda v: v.reshape(len(v), -1) @ model.w.numpy().T
    mirror = lambda v: 0.5 * f(v) + 0.5 * f(v[..., ::-1])
    v = normalized(x)
    p = np.pad(v, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    expected = [f(v), mirror(v), 0.5 * mirror(v) + 0.25 * mirror(p[..., :32, :32]) + 0.25 * mirror(p[..., 2:, 2:])]
    images = torch.tensor(x.transpose(0, 3, 1, 2) / 255.0)
    for level in range(3):
        np.testing.assert_allclose(tc.predict(model, images, level).numpy(), expected[level], rtol=1e-9, atol=1e-9)
    assert not model.training


def test_lr_schedules_at_boundaries():
    def factors(warmup, horizon, steps):
        opt = torch.optim.SGD([dict(params=[torch.zeros(1)], lr=2.0, initial_lr=2.0, horizon=horizon)])
        out = []
        for s in steps:
            tc.set_lrs([opt], s, warmup)
            out.append(opt.param_groups[0]["lr"] / 2.0)
        return out
    # airbench94: lr * (1 - step / 200), whitening bias lr * (1 - step / 75); no warmup
    np.testing.assert_allclose(factors(0.0, 200, [0, 100, 199]), [1, 0.5, 1 / 200])
    np.testing.assert_allclose(factors(0.0, 75, [0, 74]), [1, 1 / 75])
    # the 2.015 s recipe: 1 - step * (1 / 243), whitening bias 1 - step * (1 / 7), rounded as it writes them
    opt = torch.optim.SGD([dict(params=[torch.zeros(1)], lr=0.205, initial_lr=0.205, horizon=243)])
    for s in (0, 3, 100, 242):
        tc.set_lrs([opt], s, 0.0, reciprocal=True)
        assert opt.param_groups[0]["lr"] == 0.205 * (1 - s * (1 / 243))
    # airbench96: 0.2 -> 1 over int(0.1 * 2160) = 216 steps, then (2160 - step) / (2160 - 216)
    np.testing.assert_allclose(factors(0.1, 2160, [0, 108, 216, 2159]), [0.2, 0.6, 1, 1 / 1944])


def test_lookahead_update():
    net = torch.nn.BatchNorm2d(3)
    la = tc.Lookahead(net)
    old = [t.clone() for t in net.state_dict().values() if t.is_floating_point()]
    with torch.no_grad():
        net.bias += 1.0
        net.running_mean += 2.0
    new = [t.clone() for t in net.state_dict().values() if t.is_floating_point()]
    la.update(0.75)
    for got, a, b in zip([t for t in net.state_dict().values() if t.is_floating_point()], old, new):
        torch.testing.assert_close(got, 0.75 * a + 0.25 * b)


# ---------------------------------------------------------------------------------------------------------------------
# The 2.015 s recipe (hiverge/cifar10-speedrun's cifar10_speedrun.py), piece by piece

def ns_batched_reference(g, steps, progress, abc=(3.4576, -4.7391, 2.0843), norms=(0.5012, 0.0786)):
    """The recipe's Newton-Schulz of one matrix, on its singular values (fp64): scaled to the target norm
    0.5012 (1 - progress) + 0.0786 progress over (|G| + 1e-5), then over its norm + 1e-5, then
    s -> a s + b s^3 + c s^5."""
    target = norms[0] * (1 - progress) + norms[1] * progress
    x = g * (target / (np.linalg.norm(g) + 1e-5))
    x = x / (np.linalg.norm(x) + 1e-5)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    for _ in range(steps):
        s = abc[0] * s + abc[1] * s ** 3 + abc[2] * s ** 5
    return u @ np.diag(s) @ vt


@pytest.mark.parametrize("shapes", [[(8, 4, 3, 3), (40, 2, 1, 1), (16, 8, 3, 3)],  # a wide stack (40 x 80) with a tall
                                    [(40, 2, 1, 1), (24, 1, 1, 1)]])  # matrix in it; a tall stack (40 x 16), transposed
def test_batched_newton_schulz_equals_each_matrix_alone(shapes):
    torch.manual_seed(0)
    grads = [torch.randn(shape) for shape in shapes]
    for progress in (0.0, 0.6):
        out = tc.newton_schulz_batched(grads, 3, torch.tensor(progress, dtype=torch.float64))
        for g, o in zip(grads, out):
            assert o.shape == g.shape and o.dtype == g.dtype
            ref = ns_batched_reference(g.double().numpy().reshape(len(g), -1), 3, progress).reshape(g.shape)
            np.testing.assert_allclose(o.double().numpy(), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # other coefficients and target norms, as --ns_coefficients and --ns_target_norm give them (norms so small that
    # the 1e-5 epsilons count)
    out = tc.newton_schulz_batched(grads, 2, torch.tensor(0.5, dtype=torch.float64), (2.0, -1.5, 0.5), (1e-3, 1e-4))
    for g, o in zip(grads, out):
        ref = ns_batched_reference(g.double().numpy().reshape(len(g), -1), 2, 0.5, (2.0, -1.5, 0.5), (1e-3, 1e-4))
        np.testing.assert_allclose(o.double().numpy(), ref.reshape(g.shape), rtol=0, atol=1e-5 * np.abs(ref).max())


def test_muon_with_the_recipes_rescale_schedule_and_decay_against_a_slow_loop():
    # the first 14 of 60 steps of 3 filters with the recipe's rules: the rescale every 2 + int(15 step / 60) steps
    # (steps 2, 5, 9 and 14, counted from 1), the decoupled decay after each update
    torch.manual_seed(1)
    shapes, lr, mom, wd, total = [(8, 4, 3, 3), (16, 8, 3, 3), (6, 3, 3, 3)], 0.2, 0.655, 0.05, 60
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    opt = tc.Muon(params, lr, mom, 3, tc.newton_schulz_batched, True, total, 2, 15, 1e-7, wd)
    ref = [p.detach().double().numpy().copy() for p in params]
    bufs, last, rescaled = [np.zeros(shape) for shape in shapes], 0, []
    for step in range(1, 15):
        grads = [torch.randn(shape) for shape in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        rescale = step - last >= 2 + (15 * step) // total
        if rescale:
            last = step
            rescaled.append(step)
        for i, g in enumerate(grads):
            bufs[i] = mom * bufs[i] + g.double().numpy()
            nesterov = g.double().numpy() + mom * bufs[i]
            if rescale:
                ref[i] = ref[i] * np.sqrt(len(ref[i])) / (np.linalg.norm(ref[i]) + 1e-7)
            update = ns_batched_reference(nesterov.reshape(len(g), -1), 3, step / total).reshape(g.shape)
            ref[i] = (ref[i] - lr * update) * (1 - lr * wd)
        for p, r in zip(params, ref):
            np.testing.assert_allclose(p.detach().double().numpy(), r, rtol=0, atol=1e-4 * np.abs(r).max())
    assert rescaled == [2, 5, 9, 14]


def test_drop_last_stream_crop_flip_jitter_and_order_against_a_loop():
    # the stream against the recipe's draws replayed here, image by image: the flip mask, then each epoch the y and
    # x offsets (rand * 5).long() into the reflect-padded copy, the epoch's flip, the jitter and the permutation; the
    # last partial batch dropped
    n, bs = 30, 8
    images = torch.rand(n, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(3)
    stream = tc.train_batches(images, torch.arange(n), bs, 2, 0, 0.14, 0.13, drop_last=True)
    got = [next(stream) for _ in range(2 * (n // bs))]
    torch.manual_seed(3)
    x = tc.normalize(images)
    flipped = torch.rand(n) < 0.5
    x = torch.stack([img.flip(-1) if f else img for img, f in zip(x, flipped)])
    padded = F.pad(x, (2,) * 4, mode="reflect")
    want = []
    for epoch in range(2):
        dy, dx = (torch.rand(n) * 5).long(), (torch.rand(n) * 5).long()
        assert set(dy.tolist()) <= set(range(5))
        crops = [padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)]
        crops = [c.flip(-1) if epoch % 2 else c for c in crops]
        shift, scale = torch.rand(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
        jittered = [(c + (u * 2 - 1) * 0.14) * ((v * 2 - 1) * 0.13 + 1) for c, u, v in zip(crops, shift, scale)]
        perm = torch.randperm(n)
        want += [(torch.stack([jittered[i] for i in perm[k * bs:(k + 1) * bs]]), perm[k * bs:(k + 1) * bs])
                 for k in range(n // bs)]
    assert len(got) == len(want) == 6
    for (gx, gy), (wx, wy) in zip(got, want):
        assert torch.equal(gy, wy)
        torch.testing.assert_close(gx, wx, rtol=0, atol=1e-12)


def test_jitter_against_its_formula():
    x = torch.rand(500, 3, 4, 4, dtype=torch.float64)
    torch.manual_seed(4)
    out = tc.jitter(x, 0.1399, 0.1308)
    torch.manual_seed(4)
    u, v = torch.rand(500, dtype=torch.float64), torch.rand(500, dtype=torch.float64)
    for image, o, ui, vi in zip(x, out, u, v):
        shift, scale = (2 * ui - 1) * 0.1399, 1 + (2 * vi - 1) * 0.1308
        assert abs(shift) <= 0.1399 and abs(scale - 1) <= 0.1308
        torch.testing.assert_close(o, (image + shift) * scale, rtol=0, atol=1e-15)


def test_svd_whitening_equals_the_eigendecomposition_in_descending_order():
    # the same 12 eigenvectors over sqrt(eigenvalue + eps), each up to its sign (distinct eigenvalues here), the
    # SVD's by descending eigenvalue; within 1e-4 of the largest entry (fp32 SVD against fp32 eigh)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 3, 9, 9))
    x = torch.tensor(x + 0.8 * np.roll(x, 1, axis=3) + 0.5 * x[:, :1], dtype=torch.float32)
    svd, eigh = (tc.whitening_filters(x, 5e-4, svd).view(24, 12) for svd in (True, False))
    assert torch.equal(svd[12:], -svd[:12])
    for i in range(12):
        a, b = svd[i], eigh[11 - i]
        sign = torch.sign(a @ b)
        torch.testing.assert_close(a, sign * b, rtol=0, atol=1e-4 * b.abs().max().item())
    norms = svd[:12].norm(dim=1)
    assert (norms[1:] >= norms[:-1]).all()  # 1 / sqrt(lambda + eps) grows as lambda falls


def six_views(f, v):  # the recipe's TTA of numpy images v: the mean of the image, its two 1 px shifts and mirrors
    p = np.pad(v, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    views = [v, p[..., :32, :32], p[..., 2:, 2:]]
    return sum(f(w) + f(w[..., ::-1]) for w in views) / 6


def test_selective_tta_changes_only_the_least_confident_rows():
    torch.manual_seed(0)
    x = np.random.default_rng(3).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    model = Linear()
    f = lambda v: v.reshape(len(v), -1) @ model.w.numpy().T
    v = normalized(x)
    plain, full = f(v), six_views(f, v)
    images = torch.tensor(x.transpose(0, 3, 1, 2) / 255.0)
    np.testing.assert_allclose(tc.predict(model, images, 3, 1.0).numpy(), full, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(tc.predict(model, images, 3, 0.0).numpy(), plain, rtol=1e-9, atol=1e-9)
    confidence = np.exp(plain - plain.max(1, keepdims=True))
    confidence = (confidence / confidence.sum(1, keepdims=True)).max(1)
    unsure = np.argsort(confidence)[:10]  # int(0.25 * 40) least confident
    want = plain.copy()
    want[unsure] = full[unsure]
    np.testing.assert_allclose(tc.predict(model, images, 3, 0.25).numpy(), want, rtol=1e-9, atol=1e-9)
    assert not np.allclose(plain[unsure], full[unsure])


def test_the_recipes_constants():
    # the defaults: the 2.015 s recipe's numbers (cifar10_speedrun.py at 5cd49b1); --variant=airbench94 those of
    # airbench94_muon: 200 steps of 2000, whitening bias 75 steps, BatchNorm momentum 0.6 in its convention
    new, old = tc.parse_args([]), tc.parse_args(["--variant=airbench94"])
    assert (math.ceil(new.epochs * (50000 // new.batch_size)), math.ceil(new.whiten_bias_epochs * 32)) == (243, 7)
    assert (new.batch_size, new.label_smoothing, new.momentum, new.bias_lr, new.head_lr) == (1536, 0.09, 0.825, 0.0573,
                                                                                            0.5415)
    assert (new.wd_per_example * new.batch_size, new.muon_lr, new.muon_momentum, new.muon_decay) == (1.0418e-6 * 1536,
                                                                                                    0.205, 0.655, 1)
    assert (new.bn_momentum, new.activation, new.whiten_images, new.whiten_svd, new.whiten_eps) == (1 - 0.5566, "silu",
                                                                                                   960, 1, 5e-4)
    assert (new.brightness, new.contrast, new.tta_level, new.tta_fraction) == (0.1399, 0.1308, 3, 0.25)
    assert new.translate == 2
    assert (new.norm_every, new.norm_every_growth, new.norm_eps, new.ns_batched, new.ns_steps) == (2, 15, 1e-7, 1, 3)
    assert (new.ns_coefficients, new.ns_target_norm, new.fp16_batchnorm, new.warmup) == ((3.4576, -4.7391, 2.0843),
                                                                                         (0.5012, 0.0786), 1, 0.0)
    assert (old.epochs * (50000 // old.batch_size), old.whiten_bias_epochs * 25, old.bn_momentum) == (200, 75, 0.4)
    assert (old.label_smoothing, old.momentum, old.bias_lr, old.head_lr, old.wd_per_example) == (0.2, 0.85, 0.053, 0.67,
                                                                                                2e-6)
    assert (old.muon_lr, old.muon_momentum, old.norm_every, old.norm_eps, old.muon_decay) == (0.24, 0.6, 1, 0.0, 0)
    assert (old.activation, old.whiten_images, old.whiten_svd, old.tta_level, old.brightness) == ("gelu", 5000, 0, 2, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Command line

def test_command_line(capsys):
    cfg = tc.parse_args(["--runs=3", "--epochs", "2.5", "--widths=8,16,32", "--data_dir", "somewhere"])
    assert (cfg.runs, cfg.epochs, cfg.widths, cfg.data_dir, cfg.batch_size, cfg.variant) == (3, 2.5, (8, 16, 32),
                                                                                            "somewhere", 1536, "94")
    cfg = tc.parse_args(["--batch_size=50", "--variant=96"])  # the variant's values, explicit ones win
    assert (cfg.batch_size, cfg.epochs, cfg.widths, cfg.depth, cfg.cutout, cfg.select) == (50, 45.0, (128, 384, 512),
                                                                                          3, 12, 0.5)
    for argv, needle in [(["--nope=1"], "--nope"), (["--runs=two"], "--runs"), (["--widths=1,x"], "--widths"),
                         (["--variant=95"], "--variant"), (["--epochs"], "--epochs"), (["runs=3"], "runs=3")]:
        with pytest.raises(SystemExit) as e:
            tc.parse_args(argv)
        assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        tc.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in fields(tc.Hyperparameters):  # each field with its default and a meaning of a few words
        line = re.search(rf"^  --{f.name}=(\S*)(?: \[airbench94: \S+\])?(?: \[96: \S+\])?  +(.+)$", text, re.M)
        assert line and line[1] == tc.fmt(f.default) and len(line[2].split()) >= 3, f.name


# Out-of-range values, each chosen for what it breaks (torch's own rules, a division by zero, a reflect pad wider than
# the image) or for being meaningless (a negative count, a fraction above 1); every field but data_dir has one.
OUT_OF_RANGE = {
    "variant": ["95", "airbench96"], "runs": ["0"], "seed": [str(2 ** 64)], "compile": ["2"],
    "epochs": ["0", "nan", "inf"], "batch_size": ["0"], "translate": ["-1", "32"], "cutout": ["-1", "33"],
    "tta_level": ["4"], "depth": ["4"],
    "widths": ["0,0,0", "8,16", "8,16,-1"], "bn_momentum": ["-0.1", "1.5"], "logit_scale": ["-1", "nan"],
    "head_unit_std": ["2"], "whiten_images": ["0"], "whiten_eps": ["0"], "whiten_bias_epochs": ["0"],
    "zero_whiten_bias": ["2"], "label_smoothing": ["2", "-0.1"], "momentum": ["0", "1"], "warmup": ["-0.1", "1"],
    "muon_lr": ["-1", "nan"], "muon_momentum": ["1"], "ns_steps": ["-1"], "bias_lr": ["0"], "head_lr": ["-1"],
    "wd_per_example": ["-1e-6"], "lr": ["0"], "weight_decay": ["-1"], "bias_scaler": ["0"], "lookahead_every": ["-1"],
    "lookahead_decay": ["1.5"], "select": ["0", "1.5"], "proxy_widths": ["0,8,8"], "proxy_depth": ["1"],
    "proxy_every": ["0"], "run_id": ["a/b", "..", "x y"], "brightness": ["-0.1"], "contrast": ["nan"],
    "tta_fraction": ["1.5", "-0.1"], "activation": ["relu"], "fp16_batchnorm": ["2"], "whiten_svd": ["2"],
    "ns_batched": ["2"], "norm_every": ["0"], "norm_every_growth": ["-1"], "norm_eps": ["-1e-7"],
    "muon_decay": ["2"], "ns_coefficients": ["1,2", "1,nan,2", "a,b,c"], "ns_target_norm": ["0.5,0", "1"]}
IN_RANGE = ["--label_smoothing=0", "--label_smoothing=1", "--warmup=0", "--bn_momentum=1", "--lookahead_decay=0",
            "--logit_scale=0", "--ns_steps=0", "--translate=31", "--cutout=32", "--select=1", "--lookahead_every=0",
            "--wd_per_example=0", "--weight_decay=0", "--seed=0", "--momentum=0.99", "--tta_fraction=0",
            "--tta_fraction=1", "--brightness=0", "--norm_eps=0", "--norm_every=1", "--activation=gelu"]


def test_every_hyperparameter_is_range_checked():
    assert sorted([*OUT_OF_RANGE, "data_dir"]) == sorted(tc.Hyperparameters.__dataclass_fields__)
    for name, values in OUT_OF_RANGE.items():
        for value in values:
            with pytest.raises(SystemExit) as e:
                tc.parse_args([f"--{name}={value}"])
            assert f"--{name}" in str(e.value) and "\n" not in str(e.value), (name, value, e.value)
    for arg in IN_RANGE:
        for variant in tc.VARIANTS:
            tc.parse_args([f"--variant={variant}", arg])


def cache(folder, edit=None):
    """The stand-in's arrays written straight into the cache train_cifar.py loads: folder/{train,test}.npz.
    edit(split, images, labels) -> (images, labels) spoils one of them."""
    train_x, train_y, test_x, test_y = make_standin(folder / "src")
    for split, images, labels in [("train", train_x, train_y), ("test", test_x, test_y)]:
        images, labels = edit(split, images, labels) if edit else (images, labels)
        np.savez(folder / f"{split}.npz", images=images, labels=labels)


def one_error_line(result):
    assert result.returncode != 0, result.stdout[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def run_script(cwd, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_cifar.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=HANG_S, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("args", [["--widths=0,0,0"], ["--label_smoothing=2"], ["--variant=96", "--momentum=1"]])
def test_out_of_range_flag_stops_before_any_work(tmp_path, args):
    cache(tmp_path / "D")
    line = one_error_line(run_script(tmp_path, "--data_dir=D", *TINY, *args, "--runs=1", "--epochs=1"))
    assert args[-1].split("=")[0] in line
    assert not os.path.exists(tmp_path / "logs")


def test_a_94_batch_larger_than_the_training_set_is_one_line(tmp_path):
    cache(tmp_path / "D")  # 1000 training images; the 94 recipe drops each epoch's partial batch
    line = one_error_line(run_script(tmp_path, "--data_dir=D", *TINY, "--batch_size=1500", "--runs=1", "--epochs=1"))
    assert "--batch_size=1500" in line and "1000 training images" in line
    assert not os.path.exists(tmp_path / "logs")


SPOILED = {  # what is wrong with the cache -> (split, edit)
    "a label outside 0-9": ("test", lambda x, y: (x, np.where(np.arange(len(y)) == 7, 10, y))),
    "a negative label": ("train", lambda x, y: (x, np.where(np.arange(len(y)) == 0, -1, y))),
    "28 x 28 images": ("train", lambda x, y: (x[:, 2:30, 2:30], y)),
    "channels first": ("test", lambda x, y: (x.transpose(0, 3, 1, 2), y)),
    "float images": ("train", lambda x, y: (x / 255.0, y)),
    "one label fewer than images": ("train", lambda x, y: (x, y[:-1])),
    "labels as a column": ("test", lambda x, y: (x, y[:, None]))}


@pytest.mark.parametrize("spoiled", SPOILED)
def test_spoiled_cache_is_named_before_any_work(tmp_path, spoiled):
    bad_split, edit = SPOILED[spoiled]
    cache(tmp_path / "D", lambda split, x, y: edit(x, y) if split == bad_split else (x, y))
    line = one_error_line(run_script(tmp_path, "--data_dir=D", *TINY, "--runs=1", "--epochs=1"))
    assert os.path.join("D", f"{bad_split}.npz") in line, line
    assert not os.path.exists(tmp_path / "logs")


def test_diverging_run_stops_at_the_epoch_evaluation(tmp_path):
    cache(tmp_path / "D")
    result = run_script(tmp_path, "--data_dir=D", *TINY, "--runs=2", "--epochs=2", "--bias_lr=1e38", "--head_lr=1e38")
    line = one_error_line(result)
    assert "loss" in line and "--head_lr" in line, line
    assert re.findall(r"^run:1 epoch:\S+", result.stdout, re.M) == ["run:1 epoch:1/2"]  # stopped at the first one
    assert "run:1 acc" not in result.stdout and "summary" not in result.stdout
    log, = os.listdir(tmp_path / "logs")
    with open(tmp_path / "logs" / log) as f:
        assert f.read().rstrip("\n").endswith(line.removeprefix("error: "))


# ---------------------------------------------------------------------------------------------------------------------
# Downloader (data/cifar10.py) against a loopback HTTP server

def downloader():
    spec = importlib.util.spec_from_file_location("cifar10_downloader", os.path.join(ROOT, "data", "cifar10.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tarball(path, source_root, extra=()):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(os.path.join(source_root, "cifar-10-batches-py"), arcname="cifar-10-batches-py")
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture
def server(tmp_path):
    served, hits = tmp_path / "served", []
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}", hits
    httpd.shutdown()
    httpd.server_close()


def test_download_verify_convert_and_idempotent(tmp_path, server, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    served, url, hits = server
    train_x, train_y, test_x, test_y = make_standin(tmp_path / "src", per_batch=20, n_test=30)
    md5 = make_tarball(served / "c.tar.gz", tmp_path / "src")
    d = tmp_path / "d"
    argv = [f"--data_dir={d}", f"--url={url}/c.tar.gz", f"--md5={md5}"]
    downloader().main(argv)
    with np.load(d / "train.npz") as f:
        assert f["images"].dtype == np.uint8 and f["labels"].dtype == np.int64
        np.testing.assert_array_equal(f["images"], train_x)
        np.testing.assert_array_equal(f["labels"], train_y)
    with np.load(d / "test.npz") as f:
        np.testing.assert_array_equal(f["images"], test_x)
        np.testing.assert_array_equal(f["labels"], test_y)
    assert hits == ["/c.tar.gz"]
    stamp = os.stat(d / "train.npz").st_mtime_ns
    downloader().main(argv)
    assert hits == ["/c.tar.gz"] and os.stat(d / "train.npz").st_mtime_ns == stamp
    assert not [p for p in os.listdir(d) if p.endswith(".part") or p.startswith(".extract")]


def test_download_with_bad_md5_keeps_nothing(tmp_path, server, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    served, url, _ = server
    make_standin(tmp_path / "src", per_batch=5, n_test=5)
    make_tarball(served / "c.tar.gz", tmp_path / "src")
    d = tmp_path / "d"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "data", "cifar10.py"), f"--data_dir={d}",
                             f"--url={url}/c.tar.gz", "--md5=" + "0" * 32], capture_output=True, text=True,
                            env={**os.environ, "no_proxy": "127.0.0.1"})
    assert result.returncode != 0
    assert "MD5" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not d.exists()  # nothing kept, not even the folder it made


def test_no_network_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with pytest.raises(SystemExit) as e:
        downloader().main([f"--data_dir={tmp_path / 'd' / 'e'}", "--url=http://127.0.0.1:9/none.tar.gz"])
    assert "could not download" in str(e.value) and "cifar-10-python.tar.gz" in str(e.value)
    assert os.listdir(tmp_path) == []  # the folders it made for the cache are gone again


@pytest.mark.parametrize("script", ["train_cifar.py", "data/cifar10.py"])
def test_data_dir_that_is_a_file_is_one_line(tmp_path, script):
    (tmp_path / "afile").write_text("not a folder\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), f"--data_dir={tmp_path / 'afile'}"],
                       capture_output=True, text=True, timeout=HANG_S, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"--data_dir={tmp_path / 'afile'} is a file, not a folder" in lines[0]


def member(name, kind=tarfile.REGTYPE, target=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, target, 0 if kind != tarfile.REGTYPE else 4
    return info, b"evil" if kind == tarfile.REGTYPE else None


@pytest.mark.parametrize("kind", ["parent", "nested", "absolute", "symlink"])
def test_tarball_with_escaping_member_is_refused(tmp_path, kind):
    escaped = tmp_path / "escaped"
    bad = {"parent": member("../../escaped"), "nested": member("cifar-10-batches-py/../../../escaped"),
           "absolute": member(str(escaped)), "symlink": member("cifar-10-batches-py/x", tarfile.SYMTYPE, str(escaped))}
    make_standin(tmp_path / "src", per_batch=5, n_test=5)
    d = tmp_path / "deep" / "d"
    d.mkdir(parents=True)
    md5 = make_tarball(d / "cifar-10-python.tar.gz", tmp_path / "src", [bad[kind]])  # an offline tarball on disk
    with pytest.raises(SystemExit) as e:
        downloader().main([f"--data_dir={d}", f"--md5={md5}"])
    assert "refusing" in str(e.value) and bad[kind][0].name in str(e.value)
    assert sorted(os.listdir(d)) == ["cifar-10-python.tar.gz"] and not os.path.lexists(escaped)


def test_missing_batch_file_is_named(tmp_path):
    make_standin(tmp_path, per_batch=5, n_test=5)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(SystemExit) as e:
        downloader().main([f"--data_dir={tmp_path}"])
    assert "data_batch_3" in str(e.value)
    assert not list(tmp_path.glob("*.npz*"))


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_damaged_tarball_whose_md5_was_given_is_one_line(tmp_path, damage):
    make_standin(tmp_path / "src", per_batch=200, n_test=200)
    d = tmp_path / "d"
    d.mkdir()
    tarball = d / "cifar-10-python.tar.gz"
    make_tarball(tarball, tmp_path / "src")
    data = bytearray(tarball.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    else:  # zeroes in the middle of the deflate stream
        data[len(data) // 2:len(data) // 2 + 100] = bytes(100)
    tarball.write_bytes(data)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "data", "cifar10.py"), f"--data_dir={d}",
                             f"--md5={hashlib.md5(data).hexdigest()}"], capture_output=True, text=True)
    assert str(tarball) in one_error_line(result)
    assert os.listdir(d) == ["cifar-10-python.tar.gz"]  # no partial folder or cache left behind


# ---------------------------------------------------------------------------------------------------------------------
# End to end on the learnable stand-in

def test_import_does_nothing(tmp_path):
    result = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['x', '--bogus']; import train_cifar"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0 and result.stdout == result.stderr == "" and os.listdir(tmp_path) == []


def train(tmp_path, *args):
    """train_cifar.py on a fresh stand-in in tmp_path/D; returns the log. One thread: tiny tensors on a shared CPU."""
    make_standin(tmp_path / "D")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_cifar.py"), "--data_dir=D", *TINY, *args],
                            cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    with open(tmp_path / re.search(r"^log: (\S+)$", result.stdout, re.M).group(1)) as f:
        return f.read()


@pytest.mark.parametrize("variant", ["94", "airbench94"])
def test_end_to_end_94(tmp_path, variant):
    # the logit scale follows the 16-wide head: 1/16, not 1/256; 10 steps an epoch, the whitening bias 2 or 30 of them
    log = train(tmp_path, f"--variant={variant}", "--runs=2", "--epochs=3")
    with open(os.path.join(ROOT, "train_cifar.py")) as f:
        source = f.read()
    assert log.startswith(source.rstrip("\n") + "\n" + "=" * 100 + "\n")
    env, body = log[len(source):].split("=" * 100 + "\n")[1:]
    assert "torch: " + torch.__version__ in env and "--widths=8,16,16" in env and "--lr=9.0" in env
    lines = body.strip().splitlines()
    runs = [m for m in (re.fullmatch(r"run:(\d+) acc:(\d\.\d{4}) time:(\d+\.\d{3})s", line) for line in lines) if m]
    assert [int(m.group(1)) for m in runs] == [1, 2]
    accs = np.array([float(m.group(2)) for m in runs])
    assert (accs > 0.5).all(), accs  # 10 classes: chance is 0.1
    m = re.fullmatch(r"summary runs:2 acc_mean:(\S+) acc_std:(\S+) time_mean:(\S+)s time_std:(\S+)s", lines[-1])
    assert m and abs(float(m.group(1)) - accs.mean()) < 2e-4 and abs(float(m.group(2)) - accs.std(ddof=1)) < 2e-4
    epochs = [" ".join(line.split()[:2]) for line in lines if re.match(r"run:\d+ epoch:", line)]
    assert epochs == [f"run:{run} epoch:{epoch}/3" for run in (1, 2) for epoch in (1, 2, 3)]
    assert os.path.isfile(tmp_path / "D" / "train.npz")


def test_end_to_end_96(tmp_path):
    log = train(tmp_path, "--variant=96", "--runs=1", "--epochs=10")
    assert "--select=0.5" in log and "--cutout=12" in log and "--lookahead_every=5" in log
    acc = float(re.search(r"^run:1 acc:(\S+) ", log, re.M).group(1))
    assert acc > 0.4, acc  # half of each small batch, 100 steps: slower than the 94 recipe here, still 4x chance
    assert re.search(r"\nsummary runs:1 acc_mean:\S+ acc_std:n/a time_mean:\S+s time_std:n/a\n$", log)


# ---------------------------------------------------------------------------------------------------------------------
# main() in-process on the stand-in, with the pieces it calls watched

def run_main(tmp_path, monkeypatch, *args):
    """One run of main() on a fresh stand-in in tmp_path/D; returns (net, its whitening bias) after each net reset."""
    make_standin(tmp_path / "D")
    monkeypatch.chdir(tmp_path)
    resets, reset = [], tc.CifarNet.reset

    def recording_reset(net):
        reset(net)
        resets.append((net, net.whiten.bias.detach().clone()))
    monkeypatch.setattr(tc.CifarNet, "reset", recording_reset)
    tc.main(["--data_dir=D", *TINY, "--runs=1", *args])
    return resets


def test_whitening_bias_starts_at_zero_in_96_only(tmp_path, monkeypatch):
    # airbench96_faster's Conv.reset_parameters zeroes the whitening bias of the main net and of the proxy, whose bias
    # is frozen and so stays 0; airbench94_muon keeps nn.Conv2d's default, U(+-1/sqrt(fan_in)) with fan_in 3 * 2 * 2.
    resets = run_main(tmp_path / "96", monkeypatch, "--variant=96", "--epochs=0.1")
    assert sorted(net.head.in_features for net, _ in resets) == [8, 16]  # TINY: the proxy ends at 8, the main net 16
    for net, bias in resets:
        assert (bias == 0).all(), (net.head.in_features, bias)
    proxy = next(net for net, _ in resets if net.head.in_features == 8)
    assert (proxy.whiten.bias == 0).all()
    (_, bias), = run_main(tmp_path / "94", monkeypatch, "--epochs=0.1")
    assert (bias != 0).all() and bias.abs().max() <= 1 / 12 ** 0.5


@pytest.mark.parametrize("args,scale_by_last_width", [
    ([], {16: 1 / 16}),  # airbench94_muon: head(x) / x.size(-1), x the pooled features: 1 / the last width
    (["--widths=64,256,256", "--select=0.5"], {256: 1 / 256, 8: 1 / 8}),  # its published width and value; a proxy
    (["--variant=96"], {16: 1 / 9, 8: 1 / 9})])  # airbench96_faster: Mul(1/9) after the head, main net and proxy
def test_logit_scale_follows_the_last_width(tmp_path, monkeypatch, args, scale_by_last_width):
    resets = run_main(tmp_path, monkeypatch, "--epochs=0.1", *args)
    assert sorted(net.head.in_features for net, _ in resets) == sorted(scale_by_last_width)
    for net, _ in resets:
        head_outputs = []
        hook = net.head.register_forward_hook(lambda module, inputs, output: head_outputs.append(output))
        logits = net(torch.randn(4, 3, 32, 32))
        hook.remove()
        torch.testing.assert_close(logits, head_outputs[0] * scale_by_last_width[net.head.in_features])


def test_what_a_96_run_times(tmp_path, monkeypatch):
    """What the README says a run times: the whitening init, every batch drawn (so the run-start normalize, flip and
    pad of the training set and every epoch's crop and cutout), the proxy, and the final TTA; not the data load (one,
    for proxy and main net alike), the nets' reset or the per-epoch evaluation."""
    clock, calls = {"running": False}, {}

    class WatchedTimer(tc.Timer):
        def start(self):
            assert not clock["running"]
            clock["running"] = True
            super().start()

        def stop(self):
            super().stop()
            clock["running"] = False
    monkeypatch.setattr(tc, "Timer", WatchedTimer)

    def watch(name, key=lambda *args: None):
        function = getattr(tc, name)

        def watched(*args, **kwargs):
            calls.setdefault((name, key(*args)), []).append(clock["running"])
            return function(*args, **kwargs)
        monkeypatch.setattr(tc, name, watched)
    for name in ["load_cifar10", "random_crop", "random_cutout", "whitening_filters", "select_hardest"]:
        watch(name)
    watch("normalize", key=len)  # the stand-in's 1000 training images, the first --whiten_images or the 200 test ones
    watch("evaluate", key=lambda model, images, labels, tta_level, tta_fraction=1.0: tta_level)
    resets = run_main(tmp_path, monkeypatch, "--variant=96", "--epochs=2", "--whiten_images=500")
    assert len(resets) == 2 and calls.pop(("load_cifar10", None)) == [False]
    # 20 steps of 100 examples: 2 epochs of the 1000 images, each cropped and cut out once, all inside the clock
    expected = {("random_crop", None): [True] * 2, ("random_cutout", None): [True] * 2, ("normalize", 1000): [True],
                ("normalize", 500): [True], ("whitening_filters", None): [True], ("select_hardest", None): [True] * 20,
                ("evaluate", 0): [False] * 2, ("normalize", 200): [False] * 2 + [True], ("evaluate", 2): [True]}
    assert calls == expected


def test_run_id_names_the_log_printed_first_and_the_first_run_shows_progress(tmp_path):
    cache(tmp_path / "D")
    result = run_script(tmp_path, "--data_dir=D", *TINY, "--runs=2", "--epochs=1", "--run_id=first")
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert out[0] == f"log: {os.path.join('logs', 'first.txt')}" and out[-1] == out[0]
    with open(tmp_path / "logs" / "first.txt") as f:
        log = f.read()
    # the first run's whitening and steps 1, 2, 4, ... of its first epoch, on the console only; the later runs quiet
    steps = len(np.load(tmp_path / "D" / "train.npz")["labels"]) // 100
    progress = [line for line in out if re.match(r"run:\d+ (whitening|step:)", line)]
    assert progress[0].startswith("run:1 whitening from ") and f"{steps} steps of 100 images" in progress[0]
    assert [line.split()[1] for line in progress[1:]] == [f"step:{2 ** k}/{steps}" for k in range(8)
                                                          if 2 ** k < steps]
    assert not any(line in log for line in progress)
    assert re.findall(r"^run:(\d+) epoch:1/1 ", log, re.M) == ["1", "2"] and "--run_id=first" in log
    again = run_script(tmp_path, "--data_dir=D", *TINY, "--runs=1", "--epochs=1", "--run_id=first")
    assert "logs/first.txt exists" in one_error_line(again) and again.stdout == ""
    with open(tmp_path / "logs" / "first.txt") as f:
        assert f.read() == log  # never overwritten


def test_both_trainers_share_one_command_line():
    """The same conventions in train_gpt.py and train_cifar.py: --help prints every field as --name=default and its
    meaning, in source order; --run_id names the log; --name=value and --name value; one error line for a bad flag."""
    import train_gpt as tg
    for module, cls in [(tg, tg.Hyperparameters), (tc, tc.Hyperparameters)]:
        script = os.path.join(ROOT, f"{module.__name__}.py")
        text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=HANG_S).stdout
        listed = re.findall(r"^  --(\w+)=\S*(?: \[\w+: \S+\])*  +(\S.*)$", text, re.M)
        assert [name for name, _ in listed] == [f.name for f in fields(cls)], script
        assert all(len(meaning.split()) >= 3 for _, meaning in listed), script
        assert "run_id" in [f.name for f in fields(cls)]
        assert "logs/<run_id>.txt" in dict(listed)["run_id"]
        assert text.startswith(f"usage: {os.path.basename(script)} [--name=value")
        for argv in (["--run_id=x", "--seed", "3"], ["--run_id", "x", "--seed=3"]):
            parsed = module.parse_args(argv)
            assert (parsed.run_id, parsed.seed) == ("x", 3)
        bad = subprocess.run([sys.executable, script, "--bogus=1"], capture_output=True, text=True, timeout=HANG_S)
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "--bogus" in bad.stderr
