"""train_gpt.py on CPU: each piece against a slow reference written here, then tiny real runs."""
import dataclasses, math, os, re, subprocess, sys
import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

import train_gpt as tg
from tests.gptdata import SMALL_BOS, SMALL_VOCAB, learnable_docs, write_shard
from conftest import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_gpt.py")
# Polar Express coefficients as published (Amsel et al., "The Polar Express", 2025)
PE = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]

def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))

# ---------------------------------------------------------------------------------------------- optimizers

def pe_reference(G):
    """fp64: the five quintics applied to the singular values of the normalized matrix."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    s = S / (torch.linalg.matrix_norm(G.double())[..., None] * 1.02 + 1e-6)
    for a, b, c in PE:
        s = a * s + b * s ** 3 + c * s ** 5
    return U @ torch.diag_embed(s) @ Vh

def pe_single_rounding(G):
    """The record's arithmetic, spelled out: each product in fp32, rounded to bf16 once."""
    X = G.bfloat16().mT if G.size(-2) > G.size(-1) else G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for a, b, c in PE:
        A = (X.float() @ X.float().mT).bfloat16()
        B = (b * A.float() + c * A.float() @ A.float()).bfloat16()
        X = (a * X.float() + B.float() @ X.float()).bfloat16()
    return X.mT if G.size(-2) > G.size(-1) else X

@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (3, 48, 80)])
def test_polar_express_against_svd(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    # bf16 with one rounding per product: 1.7-2.6% here; rounding after every operation gave 3.6-5.7%,
    # a wrong coefficient gives > 20%
    assert rel(tg.polar_express(G), pe_reference(G)) < 0.03
    assert rel(tg.polar_express(G), pe_single_rounding(G)) < 0.01  # ties may round apart
    # on a matrix with singular values in [1e-2, 1] (times the norm) the result is near the polar factor U V^T
    m, n = shape[-2:]
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), dtype=torch.float64))
    G = U @ torch.diag(torch.linspace(0.01, 1, min(m, n), dtype=torch.float64)) @ V.T
    sv = torch.linalg.svdvals(tg.polar_express(G).double())
    assert sv.min() > 0.8 and sv.max() < 1.2  # the quintics map [1e-3, 1] into [0.847, 1.141]
    assert rel(tg.polar_express(G), U @ V.T) < 0.15

def normuon_reference(p, g, mom, v, lr, wd, mu, beta2, lr_muls, ortho):
    """One NorMuon + cautious-WD step for one bank [n, rows, cols], fp64, one matrix at a time."""
    mom = mu * mom + (1 - mu) * g
    u = (1 - mu) * g + mu * mom
    rows, cols = p.shape[-2:]
    outs, new_v = [], []
    for m, vi in zip(u, v):
        o = ortho(m)
        # the record's rule, per matrix: one statistic per row when the matrix is tall or square, else one per column
        stat = (o ** 2).mean(dim=1, keepdim=True) if rows >= cols else (o ** 2).mean(dim=0, keepdim=True)
        vi = beta2 * vi + (1 - beta2) * stat
        o2 = o / vi.clamp_min(1e-10).sqrt()
        outs.append(o2 * o.norm() / o2.norm())
        new_v.append(vi)
    upd = torch.stack(outs)
    # each matrix's lr: its multiplier times sqrt(rows / cols) when tall
    eff_lr = lr * max(1, rows / cols) ** 0.5 * torch.tensor(lr_muls, dtype=torch.float64).view(-1, 1, 1)
    decay = torch.where(upd * p >= 0, lr * wd * p, torch.zeros_like(p))
    return p - eff_lr * (upd + decay), mom, new_v

# banks: (shape, per-matrix lr multipliers); wide, tall and square matrices, and a 4-d bank viewed as [n, rows, cols]
# as the MLP bank [layers, 2, 4 * dim, dim] is
NORMUON_BANKS = [((3, 16, 64), [1.0, 2.0, 0.5]), ((2, 64, 16), [1.0, 2.0]), ((1, 2, 12), [1.0]), ((1, 24, 12), [1.0]),
                 ((2, 2, 32, 16), [1.0, 2.0, 1.0, 2.0]), ((2, 16, 16), [1.0, 0.5])]

@pytest.mark.parametrize("exact", [True, False])
def test_normuon_cautious_wd_step_against_reference(exact):
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(shape, dtype=torch.float32) * 0.1) for shape, _ in NORMUON_BANKS]
    ortho_code = (lambda U: U.float()) if exact else tg.polar_express
    ortho_ref = (lambda m: m) if exact else pe_reference
    banks = [(p, muls) for p, (_, muls) in zip(params, NORMUON_BANKS)]
    opt = tg.NorMuon(banks, tg.Comm(0, 1), lr=0.03, beta2=0.95, weight_decay=1.2, ortho=ortho_code)
    ref, p0 = [], [p.detach().double().clone() for p in params]
    for p in params:
        mats = p.detach().double().reshape(-1, *p.shape[-2:]).clone()
        rows, cols = p.shape[-2:]
        vshape = (rows, 1) if rows >= cols else (1, cols)
        ref.append([mats, torch.zeros_like(mats), [torch.zeros(vshape, dtype=torch.float64)] * mats.size(0)])
    for step, (lr_mult, mu) in enumerate([(1.0, 0.85), (0.5, 0.9), (0.3, 0.95)]):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step(lr_mult, mu)
        for p, g, r, (_, muls) in zip(params, grads, ref, NORMUON_BANKS):
            g_mats = g.double().reshape(-1, *p.shape[-2:])
            r[0], r[1], r[2] = normuon_reference(r[0], g_mats, r[1], r[2], 0.03 * lr_mult, 1.2, mu, 0.95, muls,
                                                 ortho_ref)
    for p, r, start, (shape, _) in zip(params, ref, p0, NORMUON_BANKS):  # the total change of each bank
        assert rel(p.detach().double() - start, r[0].view(shape) - start) < (1e-5 if exact else 0.08), shape

def test_cautious_mask_decays_only_where_update_shrinks():
    # with the update fixed to +1 everywhere (identity orthogonalization of a constant gradient), the decay must
    # hit exactly the positive entries: p -> p - lr*(u + lr*wd*p) where p >= 0, p - lr*u elsewhere
    p = torch.nn.Parameter(torch.tensor([[0.5, -0.5, 2.0, -2.0]]).repeat(4, 1))
    opt = tg.NorMuon([(p, [1.0])], tg.Comm(0, 1), lr=0.1, beta2=0.0, weight_decay=2.0, ortho=lambda U: U.float())
    p.grad = torch.ones_like(p)
    p0 = p.detach().clone()
    opt.step(1.0, 0.0)
    # beta2=0: normalization divides by the rms of each row (1) and restores the norm: update stays 1
    expected = torch.where(p0 >= 0, p0 - 0.1 * (1 + 0.1 * 2.0 * p0), p0 - 0.1)
    assert torch.allclose(p.detach(), expected, atol=1e-6)

def test_adam_step_against_reference():
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(16, 8))
    opt = tg.DistAdam([(p, (0.65, 0.95), 5.0, 1.0)], tg.Comm(0, 1), lr=0.008, eps=1e-8, weight_decay=0.0)
    ref, m, v = (p.detach().double().clone(), torch.zeros(16, 8, dtype=torch.float64),
                 torch.zeros(16, 8, dtype=torch.float64))
    for t, mult in enumerate([1.0, 0.7, 0.4], start=1):
        g = torch.randn(16, 8)
        p.grad = g.clone()
        opt.step(mult)
        m = 0.65 * m + 0.35 * g.double()
        v = 0.95 * v + 0.05 * g.double() ** 2
        mhat, vhat = m / (1 - 0.65 ** t), v / (1 - 0.95 ** t)
        ref = ref - 0.008 * 5.0 * mult * mhat / (vhat.sqrt() + 1e-8 / math.sqrt(1 - 0.95 ** t))
    assert rel(p.detach() - 0, ref) < 1e-6  # fp32 moments, as record #89

# ---------------------------------------------------------------------------------------------- schedules

def momentum_reference(step, warmup, cooldown, total, low=0.85, high=0.95):
    """The record's get_muon_momentum: the warmup branch first, then the cooldown (steps past total - cooldown)."""
    if step < warmup:
        return low + step / warmup * (high - low)
    if step > total - cooldown:
        return high - (step - (total - cooldown)) / cooldown * (high - low)
    return high

@pytest.mark.parametrize("total, warmup, cooldown", [(1285, 300, 50), (100, 300, 50), (40, 30, 20), (12, 0, 5),
                                                     (12, 5, 0)])
def test_momentum_follows_the_records_branches(total, warmup, cooldown):
    h = tg.parse_args([f"--num_iterations={total}", f"--momentum_warmup_steps={warmup}",
                       f"--momentum_cooldown_steps={cooldown}", "--num_extension_iterations=1"])
    for step in range(total):
        assert tg.muon_momentum(step, h) == pytest.approx(momentum_reference(step, warmup, cooldown, total)), step

def test_momentum_and_lr_warmup_at_boundaries():
    h = tg.Hyperparameters()  # 1285 steps: momentum 0.85 -> 0.95 over 300 steps, back to 0.85 over the last 50
    mom = {0: 0.85, 150: 0.90, 300: 0.95, 1000: 0.95, 1235: 0.95, 1260: 0.90, 1284: 0.852}
    for s, m in mom.items():
        assert tg.muon_momentum(s, h) == pytest.approx(m, abs=1e-9), s
    h.warmup_steps = 10
    assert tg.lr_schedule(0, h) == pytest.approx(0.1) and tg.lr_schedule(9, h) == 1.0
    assert tg.lr_schedule(9, h, stage_lr=1.52) == 1.52

def rope_reference(x, pair_freq, positions):
    """fp64 RoPE on adjacent pairs: dims (2i, 2i+1) of x[:, t, h] turn by positions[t, h] * pair_freq[i] radians as
    (x0 cos + x1 sin, x1 cos - x0 sin); dims past the pairs of pair_freq stay."""
    x = x.double()
    theta = positions.double()[..., None] * pair_freq.double()  # [T, H, pairs]
    x0, x1 = x[..., 0:2 * pair_freq.numel():2], x[..., 1:2 * pair_freq.numel():2]
    y = x.clone()
    y[..., 0:2 * pair_freq.numel():2] = x0 * theta.cos() + x1 * theta.sin()
    y[..., 1:2 * pair_freq.numel():2] = x1 * theta.cos() - x0 * theta.sin()
    return y

def test_yarn_update():
    r = tg.Rotary(128, 256, torch.float32)
    f0 = r.freq.clone()
    # 32 frequencies (1/1024)^(i/31), each on an adjacent pair of the first 64 dims; the second half stays put
    base = (1 / 1024) ** torch.linspace(0, 1, 32, dtype=torch.float64)
    assert torch.allclose(f0[0:64:2], base, rtol=1e-12) and torch.equal(f0[0:64:2], f0[1:64:2])
    assert (f0[64:] == 0).all()
    r.set_window(3)
    r.set_window(7)
    rot = 128 * 3 * f0 / (2 * math.pi)
    ramp = ((rot - 1) / 31).clamp(0, 1)
    expect = f0 * (3 / 7 + ramp * (1 - 3 / 7))
    assert torch.allclose(r.freq, expect)
    assert r.attn_scale == pytest.approx(0.1 * (0.2 * math.log(7 / 3) + 1))
    assert (r.freq[64:] == 0).all() and r.freq[0] == f0[0]  # stationary half stays; the fastest frequency is untouched
    T, H = 256, 4
    x = torch.randn(1, T, H, 128)
    token = torch.arange(T)[:, None].expand(T, H)
    ref = rope_reference(x, expect[0:64:2], token)  # every head at its token's position
    assert (r(x).double() - ref).abs().max() < 1e-4
    # paired heads: head h of token t at position 2t + h % 2 (the record's table of 2 * max_len positions)
    ref = rope_reference(x, expect[0:64:2], 2 * token + torch.arange(H) % 2)
    assert (r(x, paired=True).double() - ref).abs().max() < 1e-4
    assert (ref - rope_reference(x, expect[0:64:2], token)).abs().max() > 0.1  # the two placements differ

# ---------------------------------------------------------------------------------------------- attention masks

def random_stream(T, seed, bos=50256):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 50000, T)
    toks[toks == bos] = bos + 1
    toks[0] = bos
    toks[rng.choice(np.arange(1, T), size=T // 150, replace=False)] = bos
    toks[300:700] = 7  # one long document spanning several blocks
    return torch.from_numpy(toks).int()

def brute_mask(tokens, window, bos=50256):
    docs = np.cumsum(tokens.numpy() == bos)
    T = len(docs)
    q, k = np.arange(T)[:, None], np.arange(T)[None, :]
    return torch.from_numpy((k <= q) & (docs[q] == docs[k]) & (q - k <= window))

@pytest.mark.parametrize("ws, bos", [(1, 50256), (2, 50256), (3, 50256), (9, 50256), (2, 20000)])
def test_block_mask_against_brute_force(ws, bos):
    tokens = random_stream(1024, ws, bos)
    dense = brute_mask(tokens, ws * 128, bos)
    bm = tg.make_masks(tokens, [ws], flex=True, bos_id=bos)[0]
    nb = 1024 // 128
    blocks = dense.view(nb, 128, nb, 128).permute(0, 2, 1, 3)
    for i in range(nb):
        partial = set(bm.kv_indices[0, 0, i, :bm.kv_num_blocks[0, 0, i]].tolist())
        full = set(bm.full_kv_indices[0, 0, i, :bm.full_kv_num_blocks[0, 0, i]].tolist())
        assert not partial & full
        for j in range(nb):
            if blocks[i, j].all() and j < i:
                assert j in full, (i, j)  # (the diagonal block is never all-visible)
            if j in full:
                assert blocks[i, j].all(), (i, j)
            if blocks[i, j].any():
                assert j in partial | full, (i, j)
            if j not in partial | full:
                assert not blocks[i, j].any(), (i, j)

@pytest.mark.parametrize("paired", [False, True])
def test_block_masks_q_tables_are_torchs_transpose_of_their_kv_tables(paired):
    """make_masks builds every window's q-block tables from its own block matrices at once; torch's
    BlockMask.from_kv_blocks, which transposes the kv tables densely, gives the same tables."""
    tokens = random_stream(1024, 3, 50256)
    for ws, bm in zip([1, 3, 9], tg.make_masks(tokens, [1, 3, 9], flex=True, paired=paired)):
        ref = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                       BLOCK_SIZE=128, mask_mod=bm.mask_mod)
        assert bm.seq_lengths == ref.seq_lengths == ((2 if paired else 1) * 1024,) * 2
        assert bm.BLOCK_SIZE == ref.BLOCK_SIZE
        for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
            assert torch.equal(getattr(bm, name), getattr(ref, name)), (ws, name)
            assert getattr(bm, name).is_contiguous() and getattr(bm, name).dtype == torch.int32

def dense_attention(q, k, v, mask, scale):
    """[B, T, H, D] attention with the full T x T boolean mask: the obvious reference."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)

@pytest.mark.parametrize("T, ws", [(1024, 2), (1024, 9), (700, 1), (100, 3)])
def test_blockwise_twin_matches_full_dense_mask_forward_and_gradients(T, ws):
    torch.manual_seed(T + ws)
    tokens = random_stream(T, ws) if T >= 700 else torch.from_numpy(np.where(np.arange(T) % 37 == 0, 50256, 5)).int()
    q, k, v = (torch.randn(2, T, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    g = torch.randn(2, T, 2, 16, dtype=torch.float64)
    out = tg.attend(q, k, v, tg.make_masks(tokens, [ws], flex=False)[0], 0.3)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = dense_attention(q, k, v, brute_mask(tokens, ws * 128), 0.3)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    assert rel(out, ref) < 1e-12
    for a, b in zip(grads, ref_grads):
        assert rel(a, b) < 1e-12

def test_flex_forward_matches_dense_twin_eager_and_compiled():
    torch.manual_seed(3)
    T, H, D = 1024, 2, 32
    tokens = random_stream(T, 7)
    base = torch.randn(1, T, 3 * H, D)
    q, k, v = (base * 1.5).chunk(3, dim=-2)  # pointwise op then chunk: non-contiguous inputs (see attend())
    flex = tg.make_masks(tokens, [2, 5], flex=True)
    dense = [brute_mask(tokens, 2 * 128), brute_mask(tokens, 5 * 128)]
    with torch.no_grad():
        for fm, dm in zip(flex, dense):
            ref = dense_attention(q, k, v, dm, 0.12)
            assert (tg.attend(q, k, v, fm, 0.12) - ref).abs().max() < 1e-4
        compiled = torch.compile(tg.attend, fullgraph=True)
        out = compiled(q, k, v, flex[1], 0.12)
        assert (out - dense_attention(q, k, v, dense[1], 0.12)).abs().max() < 1e-3

def test_attention_pair_count():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 700, 20)
    for w in [0, 128, 384]:
        brute = sum(int(((np.arange(n)[None] <= np.arange(n)[:, None])
                         & (np.arange(n)[:, None] - np.arange(n)[None] <= w)).sum()) for n in lengths)
        assert tg.attention_pairs(lengths, w) == brute

# ---------------------------------------------------------------------------------------------- FP8 head

def test_fp8_matmul_forward_and_backward():
    torch.manual_seed(4)
    x = (torch.randn(32, 64) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(128, 64) * 0.02).bfloat16().requires_grad_()
    out = tg.fp8_mm(x, w, 64 ** 0.5 / 448, 2 ** -9)[0]
    ref = x.float() @ w.float().T
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 0.08
    g = torch.randn(32, 128) * 0.1
    out.backward(g.bfloat16())
    assert rel(x.grad, g @ w.float()) < 0.12 and rel(w.grad, g.T @ x.float()) < 0.12

# ---------------------------------------------------------------------------------------------- data

def loader_reference(shards, steps, slot_len, max_seq, partial=False, bos=50256):
    """Per step, the 8 slots' token buffers: pieces from consecutive documents, a step never spans shards."""
    out, used, si, di = [], [], 0, 0
    docs = [np.split(s, np.flatnonzero(s == bos)[1:]) for s in shards]
    while len(out) < steps:
        slots, d = [], di
        for _ in range(8):
            buf = []
            while sum(map(len, buf)) < slot_len + 1 and d < len(docs[si]):
                need = slot_len + 1 - sum(map(len, buf))
                buf.append(docs[si][d][:min(max_seq, need)])
                d += 1
            slots.append(np.concatenate(buf) if buf else buf)
        if any(len(s) < slot_len + 1 for s in slots):  # shard exhausted: its tail is dropped
            si, di = si + 1, 0
            if partial and si == len(docs):
                break
            continue
        out.append(slots)
        di = d
        used.append(si)
    return out, used

@pytest.mark.parametrize("bos", [50256, SMALL_BOS])
def test_loader_bos_aligned_no_token_lost_or_repeated(tmp_path, bos):
    shards = [np.concatenate(learnable_docs(90, s, 10, 300, bos)) for s in (1, 2)]
    for i, s in enumerate(shards):
        write_shard(tmp_path / f"t_{i + 1:06d}.bin", s)
    h = tg.Hyperparameters(train_files=str(tmp_path / "t_*.bin"), bigram_vocab_size=0, bos_id=bos)
    ref, used = loader_reference(shards, 7, 128, 100, bos=bos)
    assert used[0] == 0 and used[-1] == 1  # the steps cross from shard 1 into shard 2
    for world in (1, 2):
        loaders = [tg.TrainLoader(h, r, world, torch.device("cpu")) for r in range(world)]
        for step in range(7):  # 7 steps cross from shard 1 into shard 2
            for r, L in enumerate(loaders):
                batches, lengths = L.next_step(1024, 100)
                assert len(batches) == 8 // world
                for a, (inp, tgt, bigram) in enumerate(batches):
                    assert bigram is None  # --bigram_vocab_size=0
                    expect = ref[step][r + a * world]
                    assert inp[0] == bos and inp.dtype == torch.int32 and tgt.dtype == torch.int64
                    assert np.array_equal(inp.numpy(), expect[:-1]) and np.array_equal(tgt.numpy(), expect[1:])
                assert [int(l.sum()) for l in lengths] == [129] * 8

def test_pinned_staging_reuses_one_buffer_per_micro_batch_once_its_copy_is_done(tmp_path):
    """The loader's CUDA staging, on a CPU with stand-ins for pin_memory and CUDA events: one buffer per micro-batch
    of a step (all alive at once), the same storage step after step, grown once for a larger stage; each buffer's
    event recorded after each copy and waited on before each refill; the batches equal the unstaged loader's."""
    events = []
    class Event:
        def __init__(self):
            self.log = []
            events.append(self)
        def record(self):
            self.log.append("record")
        def synchronize(self):
            self.log.append("wait")
    shards = [np.concatenate(learnable_docs(200, s, 10, 300)) for s in (1, 2)]
    for i, tokens in enumerate(shards):
        write_shard(tmp_path / f"t_{i + 1:06d}.bin", tokens)
    h = tg.Hyperparameters(train_files=str(tmp_path / "t_*.bin"), bigram_vocab_size=1024)
    plain, staged = (tg.TrainLoader(h, 0, 2, torch.device("cpu")) for _ in range(2))
    staged.pinned = tg.PinnedBuffers(pin=lambda t: t.clone(), event=Event)
    storages = []
    for batch_size in (1024, 1024, 1024, 2048, 2048):
        (want, _), (got, _) = plain.next_step(batch_size, 128), staged.next_step(batch_size, 128)
        assert len(got) == 4  # rank 0 of 2: 4 of the 8 slots
        for w, g in zip(want, got):  # compared now: on a CPU the batches are views of the buffers
            assert all(torch.equal(a, b) for a, b in zip(w, g))
        storages.append([staged.pinned.buffers[i][0].data_ptr() for i in range(4)])
    assert len(set(storages[0])) == 4 and storages[0] == storages[1] == storages[2]
    assert storages[3] == storages[4] and all(a != b for a, b in zip(storages[0], storages[3]))  # grown at 2,048
    assert len(events) == 8 and [e.log for e in events] == [["record", "wait"] * 2 + ["record"]] * 4 + [
        ["record", "wait", "record"]] * 4

def test_loader_stops_or_repeats_when_the_files_run_out(tmp_path):
    write_shard(tmp_path / "t_000001.bin", np.concatenate(learnable_docs(40, 5, 10, 300)))
    h = tg.Hyperparameters(train_files=str(tmp_path / "t_*.bin"), bigram_vocab_size=0)
    n_steps = len(loader_reference([np.fromfile(tmp_path / "t_000001.bin", dtype="<u2", offset=1024)], 99, 128, 100,
                                   partial=True)[0])
    L = tg.TrainLoader(h, 0, 1, torch.device("cpu"))
    for _ in range(n_steps):
        L.next_step(1024, 100)
    with pytest.raises(tg.UserError, match="--repeat_data"):
        L.next_step(1024, 100)
    h.repeat_data = True
    L, first = tg.TrainLoader(h, 0, 1, torch.device("cpu")), None
    for i in range(n_steps + 1):
        batches = L.next_step(1024, 100)[0]
        first = first if i else batches
    assert L.epoch == 1 and all(torch.equal(a[0], b[0]) for a, b in zip(batches, first))  # the second pass starts over

def test_bad_shards_rejected(tmp_path):
    good = np.concatenate(learnable_docs(5, 0))
    write_shard(tmp_path / "magic.bin", good, magic=123)
    write_shard(tmp_path / "trunc.bin", good, n_tokens=len(good) + 10)
    write_shard(tmp_path / "vocab.bin", np.concatenate([good, [50304]]))
    for name, words in [("magic", "magic"), ("trunc", "truncated"), ("vocab", "50304 >= vocab")]:
        with pytest.raises(tg.UserError, match=words) as e:
            tg.load_shard(str(tmp_path / f"{name}.bin"), 50304)
        assert f"{name}.bin" in str(e.value)

def run_cli(args, cwd, **kw):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=HANG_S,
                          **kw)

# the small vocabulary of the gpt_files corpus; no prefix loss: tiktoken's GPT-2 vocabulary cannot be downloaded here
# (tests/test_stages.py brings its own)
TINY = SMALL_VOCAB + ["--prefix_weight=0", "--bigram_vocab_size=1024", "--num_layers=4", "--model_dim=64",
                      "--num_heads=2", "--train_batch_size=1024", "--train_max_seq_len=128",
                      "--val_tokens=3000", "--val_seq_len=1024", "--compile=0", "--kernel_warmup_steps=0"]

@pytest.mark.parametrize("case", ["missing", "magic", "truncated", "vocab", "few_val", "world", "flag", "value"])
def test_user_errors_are_one_line(tmp_path, gpt_files, case):
    files = gpt_files
    bad = tmp_path / "fineweb_train_000001.bin"
    toks = np.concatenate(learnable_docs(50, 0, bos=SMALL_BOS))
    args = {"missing": [f"--train_files={tmp_path}/fineweb_train_*.bin", files[1]],
            "magic": [f"--train_files={bad}", files[1]], "truncated": [f"--train_files={bad}", files[1]],
            "vocab": [f"--train_files={bad}", files[1]], "few_val": [files[0], files[1], "--val_tokens=10000000"],
            "world": files, "flag": ["--bogus=1"], "value": ["--num_layers=two"]}[case]
    if case in ("magic", "truncated", "vocab"):
        write_shard(bad, np.concatenate([toks, [60000]]) if case == "vocab" else toks,
                    magic=7 if case == "magic" else 20240520, n_tokens=len(toks) + (5 if case == "truncated" else 0))
    env = dict(os.environ, WORLD_SIZE="3") if case == "world" else None
    r = run_cli(TINY + ["--num_iterations=4", "--num_extension_iterations=1"] + args,  # last value wins
                tmp_path, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    expect = {"missing": "python data/cached_fineweb10B.py", "magic": str(bad), "truncated": str(bad),
              "vocab": str(bad), "few_val": "--val_tokens", "world": "world size 3", "flag": "--bogus",
              "value": "--num_layers"}[case]
    assert expect in lines[0]

def test_cli_help_and_parsing():
    r = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 0
    printed = re.findall(r"^  --(\w+)=(\S*)", r.stdout, re.M)
    defaults = tg.Hyperparameters()
    assert [name for name, _ in printed] == [f.name for f in dataclasses.fields(tg.Hyperparameters)]
    described = re.findall(r"^  --\w+=\S* +(\S.*)$", r.stdout, re.M)  # the field's one-line meaning after the flag
    assert len(described) == len(printed) and "validation covers exactly this many target tokens" in r.stdout
    for name, value in printed:  # every default is printed in a form the parser reads back to the same value
        assert getattr(tg.parse_args([f"--{name}={value}"]), name) == getattr(defaults, name), name
    h = tg.parse_args(["--num_layers", "3", "--lr=0.1", "--compile=0", "--ws_schedule=1,2", "--train_files=a*.bin"])
    assert (h.num_layers, h.lr, h.compile, h.ws_schedule, h.train_files) == (3, 0.1, False, (1, 2), "a*.bin")
    for bad in (["--lr=x"], ["--compile=2"], ["--nope=1"], ["--num_layers"], ["positional"]):
        with pytest.raises(tg.UserError):
            tg.parse_args(bad)

def test_the_logged_configuration_pastes_back_as_flags():
    """The log's hyperparameters block is the flags of the run: a shell reads each line back (quotes and all) and the
    parser gives the same hyperparameters, for a tuple, a bool, a float, a glob and a string with a space."""
    h = tg.parse_args(["--train_batch_size=1024,2048", "--compile=0", "--lr=0.0125", "--train_files=my data/*.bin",
                       "--run_id=a b", "--resume="])
    block = tg.environment(h, 2).split("hyperparameters:\n", 1)[1].splitlines()
    flags = [line for line in block if line.startswith("  --")]
    assert len(flags) == len(dataclasses.fields(tg.Hyperparameters)) and block[len(flags)] == "world_size=2"
    assert "  --train_batch_size=1024,2048" in flags and "  --train_files='my data/*.bin'" in flags
    # bash reads the pasted lines as words (printf prints one a line; no word here holds a newline)
    words = subprocess.run(["bash", "-c", "printf '%s\\n' " + " ".join(flags)], capture_output=True, text=True,
                           cwd=ROOT).stdout.splitlines()
    assert tg.parse_args(words) == h

def test_import_does_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import train_gpt"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "" and os.listdir(tmp_path) == []

# ---------------------------------------------------------------------------------------------- failure modes

def main_error(args, cwd, monkeypatch):
    """The UserError that main() stops with, in-process (its checks come before anything heavy)."""
    monkeypatch.chdir(cwd)
    with pytest.raises(tg.UserError) as e:
        tg.main(args)
    return str(e.value)

def one_line_error(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]

@pytest.mark.parametrize("flag, words", [
    ("--num_heads=0", "--num_heads=0 must be >= 1"), ("--train_max_seq_len=0", "--train_max_seq_len=0 must be >= 1"),
    ("--ws_schedule=3,0,11", "--ws_schedule=3,0,11"), ("--ws_extension=0", "--ws_extension=0 must be >= 1"),
    ("--ws_validate=-2", "--ws_validate=-2 must be >= 1"),
    ("--train_batch_size=0", "--train_batch_size=0 must be >= 1"),
    ("--lr=nan", "--lr=nan must be a finite number"), ("--adam_lr=-0.1", "--adam_lr=-0.1 must be > 0"),
    ("--momentum=1.0", "--momentum=1.0 must be in [0, 1)"), ("--val_loss_every=-1", "--val_loss_every=-1 must be >= 0"),
    ("--bos_id=520", "--bos_id=520: give a token id below --vocab_size=520"),
    ("--vocab_size=1020", "--vocab_size=1020: use a multiple of 8"), ("--run_id=a/b", "plain file name"),
    ("--run_id=../../x", "plain file name"), ("--run_id=..", "plain file name")])
def test_values_that_would_break_the_run_are_refused_first(tmp_path, gpt_files, monkeypatch, flag, words):
    args = gpt_files + TINY + ["--repeat_data=1", "--num_iterations=4", "--num_extension_iterations=1", flag]
    assert words in main_error(args, tmp_path, monkeypatch)
    assert os.listdir(tmp_path) == []  # no log, nothing written anywhere below (or above) the working folder

@pytest.mark.parametrize("flags, words", [
    (["--mtp_weights=-1"], "--mtp_weights=-1: the weights must be >= 0"),
    (["--mtp_weights=0"], "--mtp_weights=0: the next-token (first) weight is 0 in every stage"),
    (["--mtp_weights=0,1/0,1>0,0.5/0"], "the next-token (first) weight is 0 in every stage"),
    (["--prefix_weight=-0.25"], "--prefix_weight=-0.25: the weights must be >= 0"),
    (["--mtp_weights=1,nan"], "--mtp_weights=1,nan: the weights must be finite numbers"),
    (["--prefix_weight=0.25>inf"], "--prefix_weight=0.25>inf: the weights must be finite numbers"),
    (["--bigram_vocab_size=4294967296"], "--bigram_vocab_size=4294967296: at most 2^31 rows (the hash is int32"),
    (["--bigram_vocab_size=2000000000"], "cannot allocate the model: its weights need 512.0 GB, cpu has"),
    (["--vocab_size=4000000000"], "cannot allocate the model: its weights need"),
    (["--ws_schedule=(3, 7, 11)"], "--ws_schedule=(3, 7, 11): expected comma-separated ints like 3,7,11"),
    (["--ws_schedule="], "--ws_schedule=: expected comma-separated ints like 3,7,11"),
    (["--train_batch_size=1024,,2048"], "--train_batch_size=1024,,2048: expected comma-separated ints like 1024"),
    (["--train_batch_size=1024.0"], "--train_batch_size=1024.0: expected comma-separated ints like 1024"),
    (["--train_max_seq_len=1"], "pieces are at most --train_max_seq_len=1 tokens, one a document, so a step needs at "
                                "least 1032 documents: raise --train_max_seq_len")])
def test_inputs_that_once_went_wrong_stop_first_with_one_line(tmp_path, gpt_files, monkeypatch, flags, words):
    msg = main_error(gpt_files + TINY + ["--num_iterations=4", "--num_extension_iterations=1"] + flags, tmp_path,
                     monkeypatch)
    assert words in msg and "\n" not in msg, msg
    assert not os.path.exists(tmp_path / "logs")

def test_a_checkpoint_folder_that_cannot_be_written_stops_before_training(tmp_path, gpt_files, monkeypatch):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "ro").write_text("a file where the checkpoint folder goes\n")  # root writes read-only dirs
    msg = main_error(gpt_files + TINY + ["--num_iterations=4", "--num_extension_iterations=1", "--save_checkpoint=1",
                                         "--run_id=ro"], tmp_path, monkeypatch)
    assert msg.startswith("logs/ro: cannot write checkpoints there (File exists)"), msg
    assert sorted(os.listdir(tmp_path / "logs")) == ["ro"]  # no log
    r = run_cli(gpt_files + TINY + ["--train_batch_size=1024.0"], tmp_path)  # as a racer sees one of them
    assert "expected comma-separated ints" in one_line_error(r)

def test_loader_that_can_make_no_progress_says_so(tmp_path, gpt_files):
    write_shard(tmp_path / "nobos_000001.bin", np.arange(5000) % 500)  # no document start anywhere
    args = TINY + [f"--train_files={tmp_path}/nobos_*.bin", gpt_files[1], "--repeat_data=1", "--num_iterations=4",
            "--num_extension_iterations=1"]
    line = one_line_error(run_cli(args, tmp_path))  # it used to spin forever
    assert "nobos_*.bin: no shard holds one step of BOS-aligned data" in line
    loader = tg.TrainLoader(tg.parse_args(args), 0, 1, torch.device("cpu"))  # the loader itself, past the early check
    with pytest.raises(tg.UserError, match="no shard holds one step"):
        loader.next_step(1024, 128)

def test_non_finite_loss_stops_at_the_first_validation_after_it(tmp_path, gpt_files):
    args = ["--num_iterations=12", "--num_extension_iterations=1", "--val_loss_every=1", "--lr=1e9", "--run_id=nan",
            "--val_tokens=1024"]  # one val slab: a validation after every step
    r = run_cli(gpt_files + TINY + args, tmp_path)
    line = one_line_error(r)
    assert "non-finite" in line and "logs/nan.txt" in line
    body = open(tmp_path / "logs/nan.txt").read().split("=" * 100 + "\n")[2]
    stop = re.search(r"^step:(\d+)/12 stopped: (.*)$", body, re.M)
    assert stop and "summary" not in body, body
    s = int(stop[1])
    vals = {int(m[1]): (float(m[2]), float(m[3] or 0)) for m in
            re.finditer(r"^step:(\d+)/12 val_loss:(\S+) .*?(?: train_loss:(\S+))? wnorm", body, re.M)}
    assert all(math.isfinite(v) for step in range(s) for v in vals[step])  # finite up to the step before the stop
    # the head starts at N(0, 0.005) and Adam first moves it after step 2: the first two steps predict near uniformly
    assert abs(vals[1][1] - math.log(520)) < 0.01 and abs(vals[2][1] - math.log(520)) < 0.01
    if stop[2] == f"the val loss is non-finite at step {s}: it diverged":
        assert math.isnan(vals[s][0])
    else:
        assert stop[2] == f"the training loss became non-finite between steps {s} and {s}" and s not in vals

def test_a_log_write_that_fails_ends_with_one_line(tmp_path, gpt_files):
    import resource, signal
    h = tg.parse_args(gpt_files + TINY)
    rule = "=" * 100 + "\n"
    header = len((open(SCRIPT).read() + "\n" + rule + tg.environment(h, 1) + "\n" + rule).encode())
    def disk_fills_after_the_header():  # writes beyond this size fail with EFBIG, as a full disk fails with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (header + 300, header + 300))
    r = run_cli(gpt_files + TINY + ["--num_iterations=40", "--num_extension_iterations=1", "--run_id=full"], tmp_path,
                preexec_fn=disk_fills_after_the_header)
    assert "logs/full.txt: cannot write the log" in one_line_error(r) and "step:3/40" in r.stdout

def test_a_rerun_never_touches_an_existing_log_and_failed_starts_leave_none(tmp_path, gpt_files, monkeypatch):
    args = gpt_files + TINY + ["--num_iterations=2", "--num_extension_iterations=1", "--run_id=done"]
    r = run_cli(args + ["--kernel_warmup_steps=30"], tmp_path)
    assert r.returncode == 0 and "kernel warmup: skipped, nothing is compiled (--compile=0)" in r.stdout, r.stderr
    finished = (tmp_path / "logs/done.txt").read_text()
    assert "summary val_loss:" in finished
    # a second start with the same id, then one that fails on its files, in-process (a failed CLI start is one line:
    # test_user_errors_are_one_line)
    assert "logs/done.txt exists" in main_error(args, tmp_path, monkeypatch)
    assert (tmp_path / "logs/done.txt").read_text() == finished
    bad = args[2:-1] + [f"--train_files={tmp_path}/none_*.bin", gpt_files[1], "--run_id=failed"]
    assert "no train files match" in main_error(bad, tmp_path, monkeypatch)
    assert sorted(os.listdir(tmp_path / "logs")) == ["done.txt"]  # the failed start left no header-only log

def test_a_checkpoint_save_that_fails_leaves_no_partial_file(tmp_path, gpt_files):
    import resource, signal
    def disk_fills_at_one_mib():  # the tiny model's checkpoint is ~50 MB; the log stays far below 1 MiB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))
    args = ["--num_iterations=3", "--num_extension_iterations=1", "--save_checkpoint=1", "--checkpoint_every=1",
            "--run_id=ck"]
    r = run_cli(gpt_files + TINY + args, tmp_path, preexec_fn=disk_fills_at_one_mib)
    assert "logs/ck/state_step000001.pt: cannot save the checkpoint" in one_line_error(r)
    assert os.listdir(tmp_path / "logs/ck") == []  # neither the final name nor a temporary file

@pytest.mark.parametrize("signal_name, words", [("SIGINT", "interrupted"), ("SIGTERM", "terminated (SIGTERM)")])
def test_ctrl_c_ends_with_one_line_naming_the_step_and_the_checkpoint(tmp_path, gpt_files, signal_name, words):
    """Ctrl-C, and SIGTERM as torchrun and job schedulers send it, end the run alike."""
    import signal
    args = ["--num_iterations=60", "--num_extension_iterations=1", "--save_checkpoint=1", "--checkpoint_every=2",
            "--run_id=int"]
    # as in a terminal: SIGINT not ignored (a test run in a background job inherits it ignored, and Python keeps that)
    p = subprocess.Popen([sys.executable, SCRIPT, *gpt_files, *TINY, *args], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:  # wait for the third step, after the checkpoint of step 2
        if line.startswith("step:3/60"):
            break
    p.send_signal(getattr(signal, signal_name))
    out, err = p.communicate(timeout=HANG_S)
    lines = err.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err
    step = int(re.search(rf"{re.escape(words)} at step (\d+) of 60; ", lines[0])[1])
    saved = max(s for s in range(0, step + 1, 2) if s)  # the last checkpoint step at or before the interruption
    assert f"last checkpoint logs/int/state_step{saved:06d}.pt (continue with --resume=" in lines[0], lines[0]
    assert os.path.exists(tmp_path / f"logs/int/state_step{saved:06d}.pt")

def test_train_data_is_checked_before_the_first_step(tmp_path, gpt_files, monkeypatch):
    shards = [np.concatenate(learnable_docs(60, s, 10, 300, SMALL_BOS)) for s in (1, 2)]
    for i, tokens in enumerate(shards):
        write_shard(tmp_path / f"t_{i + 1:06d}.bin", tokens)
    # the test's own loader
    per_shard = [len(loader_reference([t], 999, 128, 100, partial=True, bos=SMALL_BOS)[0]) for t in shards]
    args = TINY + [f"--train_files={tmp_path}/t_*.bin", gpt_files[1], "--train_max_seq_len=100",
                   "--num_extension_iterations=1"]
    need = sum(per_shard) + 1
    msg = main_error(args + [f"--num_iterations={need}"], tmp_path, monkeypatch)
    assert f"hold {sum(per_shard)} steps of BOS-aligned data" in msg and f"it needs {need}" in msg
    assert not os.path.exists(tmp_path / "logs")
    monkeypatch.chdir(tmp_path)  # exactly enough passes the check, and so does any number with --repeat_data
    tg.check_train_data(tg.parse_args(args + [f"--num_iterations={need - 1}"]), [(128, 100)] * (need - 1))
    tg.check_train_data(tg.parse_args(args + ["--num_iterations=999", "--repeat_data=1"]), [(128, 100)] * 999)
    write_shard(tmp_path / "t_000002.bin", np.concatenate([shards[1], [520]]))  # a bad id at the end of shard 2
    msg = main_error(args + [f"--num_iterations={per_shard[0] + 1}"], tmp_path, monkeypatch)
    assert "t_000002.bin: token id 520 >= vocab size 520" in msg and not os.path.exists(tmp_path / "logs")

def test_tokens_per_second_after_a_resume_count_its_own_steps_and_time(full_run, resumed_run):
    d = full_run[0]
    full, resumed = open(d / "logs/full.txt").read(), open(d / "logs/resumed.txt").read()
    t_saved = int(re.search(r"^step:3/7 val_loss:\S+ train_time:(\d+)ms", full, re.M)[1])
    summary = re.search(r"^summary val_loss:\S+ train_time:(\d+)ms tokens_per_s:(\d+)", resumed, re.M)
    expect = 4 * 1024 / ((int(summary[1]) - t_saved) / 1000)  # steps 4..7 of 1024 tokens, in this process's time
    assert float(summary[2]) == pytest.approx(expect, rel=0.02, abs=2)

def test_kernel_warmup_restores_every_state_and_is_skipped_without_compile(tmp_path, gpt_files):
    h = tg.parse_args(gpt_files + TINY + ["--num_iterations=6", "--num_extension_iterations=1", "--ema_decay=0.5"])
    trainer = tg.Trainer(h, 0, 1, torch.device("cpu"))
    loader = tg.TrainLoader(h, 0, 1, torch.device("cpu"))
    for step in range(3):
        trainer.train_step(step, loader)  # Adam holds a pending gradient after an odd step count
    def state():
        s = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
        s.update({f"opt{i}.{k}": v.clone() for i, g in enumerate(trainer.muon.state() + trainer.adam.state())
                  for k, v in g.items()})
        s.update({f"grad{i}": p.grad.clone() for i, p in enumerate(trainer.adam_params) if p.grad is not None})
        s.update({f"ema{i}": t.clone() for i, t in enumerate(trainer.ema)})
        s.update(freq=trainer.model.rotary.freq.clone(), cos=trainer.model.rotary.cos.clone(),
                 scale=torch.tensor(trainer.model.rotary.attn_scale), t=torch.tensor(trainer.adam.t),
                 loss_sum=trainer.loss_sum.clone())
        return s
    before, lines = state(), []
    trainer.kernel_warmup(5, lines.append)
    after = state()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [l.split(":")[0] for l in lines] == ["kernel warmup 1/4", "kernel warmup 2/4", "kernel warmup 3/4",
                                               "kernel warmup 4/4"]
    # one phase per shape of the schedule: the stages (steps 0-1, 2, 3-4 of 5: round(k * 5 / 3)), then the extension;
    # the stage of step 3 unties the embedding, and the warmup restores the tie
    assert trainer.tied
    assert [re.search(r"windows (\(\d+, \d+\)), 1024 tokens, (\d) predictions, (\d) steps", l).groups()
            for l in lines] == [("(1, 3)", "3", "2"), ("(3, 7)", "2", "1"), ("(5, 11)", "1", "1"),
                                ("(6, 13)", "1", "1")]
    # the CLI side: in test_a_rerun_never_touches_an_existing_log_and_failed_starts_leave_none

def test_resume_refuses_what_does_not_match(full_run, monkeypatch):
    d, common = full_run
    ckpt = d / "logs/full/state_step000003.pt"
    (d / "text.pt").write_text("not a checkpoint\n")
    (d / "cut.pt").write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])
    torch.save({"model": {}}, d / "other.pt")
    older = torch.load(ckpt, weights_only=True)  # as the version before the tied head and per-parameter Adam steps
    del older["tied"]
    torch.save(older, d / "older_untied.pt")
    older = torch.load(ckpt, weights_only=True)
    older["adam_t"] = 3
    torch.save(older, d / "older_adam.pt")
    cases = [(["--resume=text.pt"], "--resume=text.pt: cannot be read as a checkpoint"),
             (["--resume=cut.pt"], "--resume=cut.pt: cannot be read as a checkpoint"),
             (["--resume=other.pt"], "--resume=other.pt: not a checkpoint of train_gpt.py"),
             (["--resume=older_untied.pt"], "--resume=older_untied.pt: saved by an older version of train_gpt.py"),
             (["--resume=older_adam.pt"], "--resume=older_adam.pt: saved by an older version of train_gpt.py"),
             ([f"--resume={ckpt}", "--model_dim=128", "--num_heads=4"],
              "--model_dim=64 (now 128), --num_heads=2 (now 4)"),
             ([f"--resume={ckpt}", "--lr=0.05"], "--lr=0.023 (now 0.05)"),
             (["--resume=logs/full/state_step000007.pt"], "at step 7, --num_iterations=7: nothing left to train")]
    for args, words in cases:
        assert words in main_error(common + args + ["--run_id=refused"], d, monkeypatch), args
    assert not os.path.exists(d / "logs/refused.txt")
    r = run_cli(common + ["--resume=cut.pt"], d)  # the same, as a racer sees it
    assert "cannot be read as a checkpoint" in one_line_error(r)

def test_validation_memory_is_linear_in_the_slab(tmp_path):
    # at the default --val_seq_len=262144 a 16,384-token val set is one slab: a T x T mask and fp32 scores per layer
    # would take about 2 GB each; query blocks that see only their window's keys need a small fraction of that
    write_shard(tmp_path / "val.bin", np.concatenate(learnable_docs(120, 9))[:16385])
    code = (f"import resource, sys, torch; sys.path.insert(0, {ROOT!r}); import train_gpt as tg\n"
            f"h = tg.parse_args(['--val_files={tmp_path}/val.bin', '--val_tokens=16384', '--val_head_chunk=1024', "
            "'--num_layers=4', '--model_dim=64', '--num_heads=2', '--compile=0', '--bigram_vocab_size=1024'])\n"
            "loss = tg.Trainer(h, 0, 1, torch.device('cpu')).evaluate(h.num_iterations, tg.load_val(h))\n"
            "print(loss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc as a user runs it (conftest)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    loss, peak_kib = map(float, r.stdout.split())
    assert loss == pytest.approx(math.log(50304), abs=1e-3) and peak_kib < 2 * 2 ** 20, peak_kib

# ---------------------------------------------------------------------------------------------- tiny runs

def parse_log(path):
    text = open(path).read()
    code, env, body = text.split("=" * 100 + "\n")
    vals = [(int(m[1]), float(m[2]))
            for m in re.finditer(r"^step:(\d+)/\d+ val_loss:([\d.]+) train_time:\d+ms step_avg:[\d.]+ms", body, re.M)]
    steps = re.findall(r"^step:(\d+)/(\d+) train_time:\d+ms step_avg:[\d.]+ms$", body, re.M)
    summary = re.search(r"^summary val_loss:([\d.]+) train_time:(\d+)ms tokens_per_s:(\d+) mfu:(\S+)", body, re.M)
    return code, env, vals, steps, summary

def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)

def flatten_state(sd):
    out = dict(sd["model"])
    for i, g in enumerate(sd["muon"]):
        out.update({f"muon{i}.{k}": v for k, v in g.items()})
    for i, g in enumerate(sd["adam"]):
        out.update({f"adam{i}.{k}": v for k, v in g.items()})
    return out

@pytest.fixture(scope="module")
def full_run(tmp_path_factory, gpt_files):
    """A 7-step tiny run with checkpoints after steps 3, 6 and 7: (its folder, its flags without --checkpoint_every)."""
    d = tmp_path_factory.mktemp("full")
    common = gpt_files + TINY + ["--num_iterations=7", "--num_extension_iterations=1", "--val_loss_every=3",
                                 "--save_checkpoint=1"]
    r = run_cli(common + ["--checkpoint_every=3", "--run_id=full"], d)
    assert r.returncode == 0, r.stderr
    return d, common

@pytest.fixture(scope="module")
def resumed_run(full_run):
    """full_run resumed from step 3 (after an odd step count Adam holds a pending gradient); its stdout."""
    d, common = full_run
    r = run_cli(common + ["--resume=logs/full/state_step000003.pt", "--kernel_warmup_steps=3", "--run_id=resumed"], d)
    assert r.returncode == 0, r.stderr
    return r.stdout

def test_resume_matches_uninterrupted_run(full_run, resumed_run):
    tmp_path = full_run[0]
    # differences that do not change the training are listed (the kernel warmup is skipped without compile)
    assert "changed since it was saved: --kernel_warmup_steps=0 (now 3), --checkpoint_every=3 (now 0)" in resumed_run
    a, b = (load_ckpt(tmp_path / "logs/full/state_step000007.pt"),
            load_ckpt(tmp_path / "logs/resumed/state_step000007.pt"))
    fa, fb = flatten_state(a), flatten_state(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
    assert a["loader"] == b["loader"] and a["adam_t"] == b["adam_t"]
    va = parse_log(tmp_path / "logs/full.txt")[2]
    vb = parse_log(tmp_path / "logs/resumed.txt")[2]
    assert va[-2:] == vb[-2:]  # steps 6 and 7

def test_evaluation_covers_exactly_val_tokens(gpt_files):
    files = gpt_files
    h = tg.parse_args(files + TINY + ["--compile=0", "--val_tokens=1000", "--val_seq_len=4096",
                                           "--val_head_chunk=100"])
    trainer = tg.Trainer(h, 0, 1, torch.device("cpu"))
    val = tg.load_val(h)
    with torch.no_grad():
        for p in trainer.model.lm_head.parameters():
            p.normal_(0, 0.05)
        loss = trainer.evaluate(0, val)
        # reference: the unpadded 1000-token stream in one piece, fp32 per-token cross-entropy averaged here
        inputs, targets = torch.from_numpy(val[:1000].astype(np.int32)), torch.from_numpy(val[1:1001].astype(np.int64))
        trainer.model.eval()
        masks = trainer.model.layer_masks(inputs, trainer.schedule.at(0).windows, flex=False)
        bigram = torch.from_numpy(tg.bigram_index(val[:1000], h.bigram_vocab_size))
        ref = trainer.model(inputs, targets, bigram, masks, head_chunk=10 ** 9) / 1000
    assert loss == pytest.approx(float(ref), rel=1e-5)

def test_record_model_size_matches_the_reference():
    # record #89 (README): 11 layers of width 768 with 6 heads, attention in all but layer 6, an MLP in all 11;
    # matmul parameters per token: 10 attention layers x 4*768^2 + 11 MLPs x 2*768*3072 + the 768 x 50304 head
    h = tg.Hyperparameters()
    D, V, H, L = 768, 50304, 6, 11
    assert tg.matmul_params_per_token(h) == 10 * 4 * D ** 2 + 11 * 2 * D * 3072 + D * V
    with torch.device("meta"):
        model = tg.GPT(h, 128, torch.bfloat16)
    # the parameters by hand, from the record's model: the embedding, the head and 5 value-embedding tables (layers
    # 1, 2, 8, 9, 10); Q, K, V, O of 10 attention layers and the MLP up and down of 11; the smear gate (12 -> 1) and a
    # value-embedding gate per head of each VE layer (12 -> 1); 2 attention lambdas a layer, smear and skip, residual
    # and output lambdas (2 a layer each); two MUDD MLPs 768 -> 64 -> 14 and two MUDD-gate MLPs 768 -> 64 -> 41 (the
    # record stores both gates 41 wide) with biases, and the gates' scale; the bigram hash table 377,280 x 768
    tables, matrices, gates = 7 * V * D, 10 * 4 * D * D + 11 * 2 * 3072 * D, 12 + 5 * H * 12
    lambdas = 2 * L + 2 + 2 * L + 2 * L
    mudd = 2 * (64 * D + 14 * 64 + 14) + 2 * (64 * D + 41 * 64 + 41) + 1
    bigram = 377280 * D
    assert model.bigram_embed.weight.numel() == bigram
    total = sum(p.numel() for p in model.parameters())
    assert total == tables + matrices + gates + lambdas + mudd + bigram  # 346.1 M + 289.8 M
    embed = sum(p.numel() for n, p in model.named_parameters() if "embed" in n) - bigram
    assert embed == 6 * V * D  # the embedding and the value embeddings (the head is the 7th table)
