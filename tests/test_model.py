"""train_gpt.py's record-#89 model on CPU, piece by piece and whole: rotary placement (plain and paired heads), the
key offset, the paired-head masks and attention, XSA, DC attention, the MUDD-gate layout and initial values, the
record-size parameter shapes, and a slow twin of the record's GPT.forward (written here from the record's script)
whose loss and gradients the model must reproduce."""
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import train_gpt as tg

BOS_ID = 50256

def rel(a, b):
    """Norm-wise relative error of a against the reference b (fp64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))

def base_freq(head_dim):
    """The record's rotary frequencies of the rotated pairs: (1/1024) ** (i / (n - 1)), n = head_dim / 4."""
    n = head_dim // 4
    return torch.tensor([(1 / 1024) ** (i / (n - 1)) for i in range(n)], dtype=torch.float64)

def yarn_freq(freq, old_tokens, new_tokens, alpha=1, beta=32):
    """The record's Yarn.apply on the rotated frequencies: blend between interpolation and the original per pair."""
    out = []
    for f in freq.tolist():
        rotations = old_tokens * f / (2 * math.pi)
        ramp = min(1.0, max(0.0, (rotations - alpha) / (beta - alpha)))
        scale = old_tokens / new_tokens
        out.append(f * (scale + ramp * (1 - scale)))
    return torch.tensor(out, dtype=torch.float64)

def rope_loop(x, freq, pos):
    """x [B, T, H, D], pair i < D/4 of head h of token t rotated by the angle pos[t, h] * freq[i], one at a time."""
    out = x.clone()
    B, T, H, D = x.shape
    for t in range(T):
        for h in range(H):
            for i in range(D // 4):
                angle = float(pos[t, h]) * float(freq[i])
                c, s = math.cos(angle), math.sin(angle)
                a, b = x[:, t, h, 2 * i], x[:, t, h, 2 * i + 1]
                out[:, t, h, 2 * i] = c * a + s * b
                out[:, t, h, 2 * i + 1] = c * b - s * a
    return out

def doc_ids(tokens):
    """Document index of each token: a BOS starts a new document."""
    ids, d = [], -1
    for t in tokens.tolist():
        if t == BOS_ID or d < 0:
            d += 1
        ids.append(d)
    return ids

def tokens_with_docs(T, starts, seed):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 50000, T)
    toks[list(starts)] = BOS_ID
    return torch.from_numpy(toks).int()

# ---------------------------------------------------------------------------------------------- rotary, key offset

@pytest.mark.parametrize("yarn", [False, True])
def test_rotary_plain_and_paired_against_a_per_pair_loop(yarn):
    """Rotary.forward, plain (head at its token's position) and paired (head h of token t at 2t + h % 2), in fp64,
    against a loop over positions and pairs with the record's frequencies (after a YaRN step 1 -> 3 blocks)."""
    D, H, T = 16, 4, 160
    r = tg.Rotary(D, 256, torch.float64)
    freq = base_freq(D)
    if yarn:
        r.set_window(1)
        r.set_window(3)
        freq = yarn_freq(freq, 128, 384)
        assert r.attn_scale == pytest.approx(0.1 * (0.2 * math.log(3) + 1), rel=1e-12)
    torch.manual_seed(0)
    x = torch.randn(2, T, H, D, dtype=torch.float64)
    token = torch.arange(T)[:, None].expand(T, H)
    assert (r(x) - rope_loop(x, freq, token)).abs().max() < 1e-12
    paired_pos = 2 * token + torch.arange(H)[None, :] % 2
    assert (r(x, paired=True) - rope_loop(x, freq, paired_pos)).abs().max() < 1e-12
    assert torch.equal(r(x)[..., D // 2:], x[..., D // 2:])  # the stationary half

def test_key_offset_against_a_loop():
    """key_offset: dims D/2.. of position t >= 1 are position t-1's; position 0 and dims < D/2 stay."""
    torch.manual_seed(1)
    k = torch.randn(2, 7, 3, 8)
    out = tg.key_offset(k)
    expect = k.clone()
    for t in range(1, 7):
        for d in range(4, 8):
            expect[:, t, :, d] = k[:, t - 1, :, d]
    assert torch.equal(out, expect)

# ---------------------------------------------------------------------------------------------- paired masks

def paired_visible_brute(tokens, window_tokens):
    """[2T, 2T] visibility of the paired stream (stream position p holds token p // 2): same document, causal in
    stream positions, at most window_tokens stream positions back."""
    docs = doc_ids(tokens)
    n = 2 * len(docs)
    vis = np.zeros((n, n), dtype=bool)
    for p in range(n):
        for s in range(max(0, p - window_tokens), p + 1):
            vis[p, s] = docs[p // 2] == docs[s // 2]
    return torch.from_numpy(vis)

@pytest.mark.parametrize("ws", [1, 2])
def test_paired_dense_mask_visibility_against_brute_force(ws):
    """make_masks(paired=True), dense twin: which keys each stream position sees (read off attend with zero scores
    and one-hot values) against the brute-force rule."""
    T = 256
    tokens = tokens_with_docs(T, [0, 50, 170], seed=ws)
    mask = tg.make_masks(tokens, [ws], flex=False, paired=True)[0]
    n = 2 * T
    zeros = torch.zeros(1, n, 1, 8, dtype=torch.float64)
    onehot = torch.eye(n, dtype=torch.float64)[None, :, None, :]
    out = tg.attend(zeros, zeros, onehot, mask, 1.0)[0, :, 0]
    assert torch.equal(out > 0, paired_visible_brute(tokens, ws * 128))

@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_paired_flex_block_mask_matches_the_dense_twin_forward():
    """The FlexAttention BlockMask of the paired stream gives the dense twin's attention output (forward, CPU)."""
    T, ws = 384, 1
    tokens = tokens_with_docs(T, [0, 50, 170, 300], seed=5)
    flex = tg.make_masks(tokens, [ws, 2], flex=True, paired=True)
    dense = tg.make_masks(tokens, [ws, 2], flex=False, paired=True)
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2 * T, 2, 16) for _ in range(3))
    with torch.no_grad():
        for fm, dm in zip(flex, dense):
            assert (tg.attend(q, k, v, fm, 0.2) - tg.attend(q, k, v, dm, 0.2)).abs().max() < 1e-5

# ---------------------------------------------------------------------------------------------- paired attention

def test_paired_attention_against_per_stream_loop():
    """GPT.attention on a paired layer (record layer 0) against a slow reference: each head's q, k, v from its own
    weight rows, q and k rms-normed and rotated at position 2t + h % 2 (the record's paired Yarn), then per stream j
    the sequence [head j of token 0, head j + H/2 of token 0, head j of token 1, ...] attended with a per-query
    softmax over its visible keys (same document, causal, window in stream positions); O projection last."""
    H, D, T, ws = 4, 32, 256, 1
    hd = D // H
    h = tg.parse_args(["--num_layers=2", f"--model_dim={D}", f"--num_heads={H}", "--bigram_vocab_size=1024"])
    torch.manual_seed(3)
    model = tg.GPT(h, T, torch.float32)
    with torch.no_grad():
        model.scalars[0:2] = torch.tensor([0.7, 1.3])
    tokens = tokens_with_docs(T, [0, 90, 200], seed=3)
    x = tg.norm(torch.randn(1, T, D))
    aux_v = 0.5 * torch.randn(1, T, D)
    mask = tg.make_masks(tokens, [ws], flex=False, paired=True)[0]
    with torch.no_grad():
        out = model.attention(x, 0, 0, mask, aux_v=aux_v)
    # reference, fp64
    X, qk, vo = x[0].double(), model.qk_bank.detach().double(), model.vo_bank.detach().double()
    sa_qkv, sa_o = 0.7, 1.3
    freq = base_freq(hd)
    q, k, v = {}, {}, {}
    for head in range(H):
        rows = slice((head % 2) * hd, (head % 2 + 1) * hd)
        wq, wk = qk[head // 2][rows], qk[H // 2 + head // 2][rows]  # Q groups of head pairs, then K groups
        wv = vo[0][head * hd:(head + 1) * hd]
        pos = (2 * torch.arange(T) + head % 2)[:, None]
        qh = F.rms_norm(sa_qkv * X @ wq.T, (hd,))
        kh = F.rms_norm(sa_qkv * X @ wk.T, (hd,))
        q[head] = rope_loop(qh[None, :, None], freq, pos)[0, :, 0]
        k[head] = rope_loop(kh[None, :, None], freq, pos)[0, :, 0]
        v[head] = sa_qkv * X @ wv.T + aux_v[0, :, head * hd:(head + 1) * hd].double()
    docs = doc_ids(tokens)
    y = torch.zeros(T, H, hd, dtype=torch.float64)
    for j in range(H // 2):
        heads = [j, j + H // 2]
        sq = torch.stack([q[heads[p % 2]][p // 2] for p in range(2 * T)])
        sk = torch.stack([k[heads[p % 2]][p // 2] for p in range(2 * T)])
        sv = torch.stack([v[heads[p % 2]][p // 2] for p in range(2 * T)])
        for p in range(2 * T):
            keys = [s for s in range(max(0, p - ws * 128), p + 1) if docs[s // 2] == docs[p // 2]]
            probs = torch.softmax(0.1 * sk[keys] @ sq[p], 0)
            y[p // 2, heads[p % 2]] = probs @ sv[keys]
    ref = y.reshape(T, D) @ (sa_o * vo[1]).T
    assert rel(out[0], ref) < 1e-5

# ---------------------------------------------------------------------------------------------- XSA, DC attention

def test_xsa_against_the_formula_per_element():
    """xsa: y - tanh(alpha) (y.v / max(|v|^2, 1e-8)) v for each (b, t, h) in fp64; a zero v leaves y alone."""
    torch.manual_seed(4)
    y, v = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(2, 5, 3, 4, dtype=torch.float64)
    v[1, 2, 0] = 0.0
    alpha = torch.randn(2, 5, 3, dtype=torch.float64)
    out = tg.xsa(y, v, alpha)
    for b in range(2):
        for t in range(5):
            for h in range(3):
                yy, vv = y[b, t, h].tolist(), v[b, t, h].tolist()
                dot, sq = sum(p * q for p, q in zip(yy, vv)), max(sum(q * q for q in vv), 1e-8)
                a = math.tanh(float(alpha[b, t, h]))
                expect = [p - a * dot / sq * q for p, q in zip(yy, vv)]
                assert out[b, t, h].tolist() == pytest.approx(expect, rel=1e-12, abs=1e-12)
    assert torch.equal(out[1, 2, 0], y[1, 2, 0])

def dc_loop(q, k, v, w1, w2, docs, scale, window):
    """The record's DC correction, one query at a time: w1 rms-normed over heads (eps 1e-6), a[s] = sum_g w1n[g]
    softmax_g(scale q_g.k_g[s]) over keys s with 0 <= t - s < window in t's document, out_h = w2_h sum_s a[s] v_h[s]."""
    _, T, H, D = q.shape
    rows = []
    for t in range(T):
        keys = [s for s in range(max(0, t - window + 1), t + 1) if docs[s] == docs[t]]
        w1n = w1[0, t] / torch.sqrt((w1[0, t] ** 2).mean() + 1e-6)
        a = 0
        for g in range(H):
            a = a + w1n[g] * torch.softmax(scale * (k[0, keys, g] @ q[0, t, g]), 0)
        rows.append(torch.stack([w2[0, t, hh] * (a @ v[0, keys, hh]) for hh in range(H)]))
    return torch.stack(rows)[None]

@pytest.mark.parametrize("T, window", [(256, 112), (200, 112), (200, 5)])
def test_dc_attention_forward_and_gradients_against_a_per_query_loop(T, window):
    """dc_attention (the correction alone) against a per-query, per-head loop: the output and the gradients of a
    random projection of it w.r.t. q, k, v, w1 and w2, with documents starting inside the window."""
    H, D = 6, 8
    torch.manual_seed(T + window)
    q, k, v = (torch.randn(1, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w1 = torch.randn(1, T, H, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(1, T, H, dtype=torch.float64, requires_grad=True)
    docs = torch.tensor(doc_ids(tokens_with_docs(T, [0, 60, 150, 190], seed=T)))
    proj = torch.randn(1, T, H, D, dtype=torch.float64)
    out = tg.dc_attention(q, k, v, w1, w2, docs, 0.3, window)
    ref = dc_loop(q, k, v, w1, w2, docs.tolist(), 0.3, window)
    assert out.shape == ref.shape
    assert rel(out, ref) < 1e-12  # fp64 in, fp64 throughout
    grads = torch.autograd.grad((out * proj).sum(), (q, k, v, w1, w2))
    ref_grads = torch.autograd.grad((ref * proj).sum(), (q, k, v, w1, w2))
    for name, g, rg in zip("q k v w1 w2".split(), grads, ref_grads):
        assert rel(g, rg) < 1e-12, name

class MatmulOperands(TorchDispatchMode):
    """The operand dtypes of every batched or plain matmul dispatched inside."""
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.bmm.default, torch.ops.aten.mm.default):
            self.seen.append((args[0].dtype, args[1].dtype))
        return func(*args, **(kwargs or {}))

def test_dc_attention_in_bf16_scores_bf16_operands_and_stays_within_bf16_error():
    """On a bf16 model the score product takes the bf16 q and k (tensor cores; no fp32 copies of q and the banded
    keys), the softmax runs in fp32: the output and the gradients against the fp64 loop on the same bf16 values."""
    T, H, D, window = 256, 6, 16, 112
    torch.manual_seed(5)
    leaves = [torch.randn(1, T, H, D).bfloat16().requires_grad_() for _ in range(3)]
    leaves += [torch.randn(1, T, H).bfloat16().requires_grad_() for _ in range(2)]
    docs = torch.tensor(doc_ids(tokens_with_docs(T, [0, 60, 150, 190], seed=1)))
    with MatmulOperands() as mode:
        out = tg.dc_attention(*leaves, docs, 0.3, window)
    assert mode.seen[0] == (torch.bfloat16, torch.bfloat16) and out.dtype == torch.bfloat16  # the scores' product
    proj = torch.randn(1, T, H, D, dtype=torch.float64)
    wide = [t.detach().double().requires_grad_() for t in leaves]
    ref = dc_loop(*wide, docs.tolist(), 0.3, window)
    # bf16 rounds the scores (2^-9 of a few units each), the probabilities' products and the output: 4.0e-3 seen on
    # the output, 3.8e-3 to 4.5e-3 on the gradients; 2^-6 and 2^-5 leave a margin of 4 or more
    assert rel(out, ref) < 2 ** -6
    grads = torch.autograd.grad((out.double() * proj).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * proj).sum(), wide)
    for name, g, rg in zip("q k v w1 w2".split(), grads, ref_grads):
        assert rel(g, rg) < 2 ** -5, name

# ---------------------------------------------------------------------------------------------- MUDD gates

# record #89's gate columns (GPT.unpack_pre_mudd_gate / unpack_post_mudd_gate at 6 heads): name -> (layer, columns)
REC_PRE_COLUMNS = {("xsa", 1): range(0, 6), ("xsa", 3): range(6, 12), ("attn", 3): range(12, 18),
                   **{("x0", r): [18 + 2 * n] for n, r in enumerate((0, 1, 2, 3))},
                   **{("bigram", r): [19 + 2 * n] for n, r in enumerate((0, 1, 2, 3))}}
REC_POST_COLUMNS = {("xsa", 4): range(0, 6), ("xsa", 7): range(6, 12), ("attn", 10): range(12, 18),
                    **{("x0", r): [18 + 2 * n] for n, r in enumerate((4, 5, 7, 8, 9))},
                    **{("bigram", r): [19 + 2 * n] for n, r in enumerate((4, 5, 7, 8, 9))},
                    ("skip", None): [28], ("dc1", None): range(29, 35), ("dc2", None): range(35, 41)}

def small_record_model(dtype=torch.float32, T=256, seed=0):
    """11 layers (every record layer) at width 48 with the record's 6 heads (head_dim 8)."""
    h = tg.parse_args(["--num_layers=11", "--model_dim=48", "--num_heads=6", "--bigram_vocab_size=1024"])
    torch.manual_seed(seed)
    return tg.GPT(h, T, dtype)

def gate_outputs(out, j):
    """The gate dict of GPT.gates read back per record name."""
    got = {(kind, r): val for kind in ("xsa", "attn", "x0", "bigram") for r, val in out[kind].items()}
    if j:
        got.update({("skip", None): out["skip"], ("dc1", None): out["dc"][0], ("dc2", None): out["dc"][1]})
    return got

def test_gate_widths_layout_and_initial_values():
    """The pre gate is 26 wide and the post gate 41 at 6 heads, their columns land where the record's unpack puts
    them, the initial biases (after the 0.1 scale) are the record's: attention gates 0.25, bigram gates 0.05, skip
    0.5, DC w1 1.0, the rest 0; MUDD biases 2, 2, sqrt(1.1), 1, 0, 0.05, sqrt(1.1), 1 at 6..13 and -0.5 at [1, 1]."""
    model = small_record_model()
    H = 6
    assert model.mudd_gate_w2.shape == (2, 41, 64) and model.mudd_gate_b2.shape == (2, 41)
    assert model.mudd_w2.shape == (2, 14, 64) and model.mudd_b2.shape == (2, 14)
    assert model.mudd_gate_scale.item() == pytest.approx(0.1)
    x = torch.randn(1, 5, 48)
    # initial values: w2 is zero, so each output is its bias times the scale
    expect_bias = [{}, {("skip", None): 0.5}]
    for j, cols in enumerate((REC_PRE_COLUMNS, REC_POST_COLUMNS)):
        expect_bias[j].update({key: 0.25 for key in cols if key[0] == "attn"})
        expect_bias[j].update({key: 0.05 for key in cols if key[0] == "bigram"})
    expect_bias[1][("dc1", None)] = 1.0
    for j, cols in enumerate((REC_PRE_COLUMNS, REC_POST_COLUMNS)):
        out = dict(xsa={}, attn={}, x0={}, bigram={})
        with torch.no_grad():
            model.gates(x, j, out)
        got = gate_outputs(out, j)
        assert set(got) == set(cols)
        for key, columns in cols.items():
            assert got[key].shape == (1, 5, len(columns)), key
            assert torch.allclose(got[key], torch.full_like(got[key], expect_bias[j].get(key, 0.0)), atol=1e-6), key
    # layout: column c of gate j gets bias c + 1 (scale 1): each output reads the record's columns
    with torch.no_grad():
        model.mudd_gate_scale.fill_(1.0)
        model.mudd_gate_b2.copy_(torch.arange(1, 42).float().expand(2, 41))
        model.mudd_gate_w2[0, 26:].normal_()  # beyond the pre gate's 26 columns: must not matter
    for j, cols in enumerate((REC_PRE_COLUMNS, REC_POST_COLUMNS)):
        out = dict(xsa={}, attn={}, x0={}, bigram={})
        with torch.no_grad():
            model.gates(x, j, out)
        got = gate_outputs(out, j)
        for key, columns in cols.items():
            expect = torch.tensor([c + 1.0 for c in columns]).expand(1, 5, -1)
            assert torch.equal(got[key], expect), key
    assert sum(map(len, REC_PRE_COLUMNS.values())) == 3 * H + 8
    assert sum(map(len, REC_POST_COLUMNS.values())) == 5 * H + 11
    # MUDD biases after the 0.1 scale, read back through mudd() with w2 = 0
    with torch.no_grad():
        mu0 = torch.cat(model.mudd(x, 0, 14), -1)[0, 0]
        mu1 = torch.cat(model.mudd(x, 1, 5), -1)[0, 0]
    r = 1.1 ** 0.5
    assert mu0.tolist() == pytest.approx([0] * 6 + [2, 2, r, 1, 0, 0.05, r, 1], abs=1e-6)
    assert mu1.tolist() == pytest.approx([0, -0.5, 0, 0, 0], abs=1e-6)

# ---------------------------------------------------------------------------------------------- record size

def test_record_size_shapes_on_the_meta_device():
    """tg.GPT at the defaults builds on the meta device, its shapes are the record's banks without their 8-GPU padding
    (qk 64 -> 60 groups, vo 24 -> 20, mlp 12 -> 11 layers), and the total is the record's count minus that padding."""
    with torch.device("meta"):
        model = tg.GPT(tg.parse_args([]), 1024, torch.bfloat16)
    V, D, H, hd, L = 50304, 768, 6, 128, 11
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expect = {"embed.weight": (V, D), "smear_gate.weight": (1, 12), "lm_head.weight": (V, D),
              "value_embeds": (5 * V, D), "ve_gate_bank": (5, H, 12), "qk_bank": (60, 2 * hd, D),
              "vo_bank": (20, D, D), "mlp_bank": (L, 2, 4 * D, D), "bigram_embed.weight": (377280, D),
              "scalars": (2 * L + 2,), "resid_lambdas": (L, 2), "post_lambdas": (L, 2), "mudd_w1": (2, 64, D),
              "mudd_w2": (2, 14, 64), "mudd_b2": (2, 14), "mudd_gate_w1": (2, 64, D), "mudd_gate_w2": (2, 41, 64),
              "mudd_gate_b2": (2, 41), "mudd_gate_scale": ()}
    assert shapes == expect
    assert tuple(model.bigram_signs.shape) == (8192, D)
    # the record's parameters (GPT.__init__ of records #89), its padding taken out
    record = {"lm_head": D * V, "embed": V * D, "value_embeds": 5 * V * D, "ve_gate_bank": 5 * 6 * 12,
              "qk_bank": (64 - 4) * 256 * 768, "vo_bank": (24 - 4) * 768 * 768, "mlp_bank": (12 - 1) * 2 * 3072 * 768,
              "smear_gate": 12, "bigram_embed": 377280 * 768, "post_lambdas": 22, "resid_lambdas": 22,
              "scalars": 2 * 11 + 2 + (-2 * 11 - 2) % 8, "mudd": 2 * 64 * 768 + 2 * 14 * 64 + 2 * 14,
              "mudd_gate": 2 * 64 * 768 + 2 * 41 * 64 + 2 * 41 + 1}
    assert sum(p.numel() for p in model.parameters()) == sum(record.values())

# ---------------------------------------------------------------------------------------------- the whole model

# record #89's layer sets, as its GPT lists them
REC_PAIRED, REC_XSA, REC_ATTN_GATE, REC_DC, REC_CACHE = [0, 2, 5, 9], [1, 3, 4, 7], [3, 10], [10], [3, 7]

def yarn_tables(freq, n, paired):
    """The record's Yarn factor1, factor2 for n rows: cos, sin (odd dims negated) of t * freq, or, paired, of 2t and
    2t + 1 side by side (a head pair's 2 * head_dim)."""
    t = torch.arange(n, dtype=freq.dtype)
    if paired:
        th1, th2 = torch.outer(2 * t, freq), torch.outer(2 * t + 1, freq)
        f1, f2 = torch.cat([th1.cos(), th2.cos()], -1), torch.cat([th1.sin(), th2.sin()], -1)
    else:
        theta = torch.outer(t, freq)
        f1, f2 = theta.cos(), theta.sin()
    f2[..., 1::2] *= -1
    return f1, f2

def yarn_rotary(x, tables):
    f1, f2 = (f[None, :x.size(-3), None, :] for f in tables)
    x_flip = x.view(*x.shape[:-1], x.shape[-1] // 2, 2).flip(-1).view(x.shape)
    return f1 * x + f2 * x_flip

def seq_index(cu, n):
    """Sequence index of each of n positions from the cumulative sequence lengths cu."""
    idx = torch.zeros(n, dtype=torch.long)
    for b in cu[1:-1]:
        idx[b:] += 1
    return idx

def varlen_causal_attention(q, k, v, cu, left, scale):
    """flash_attn_varlen_func(causal=True, window_size=(left, 0)) written densely: q, k, v [n, h, d]."""
    n = q.size(0)
    seq, pos = seq_index(cu, n), torch.arange(n)
    visible = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] <= left) & (seq[:, None] == seq[None, :])
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)

def dc_correction_dense(q, k, v, w1n, w2, cu, window, scale):
    """The DC kernel's correction, dense: keys 0 <= t - s < window in t's sequence; q, k, v [T, H, d], w1n w2 [T, H]."""
    T = q.size(0)
    seq, pos = seq_index(cu, T), torch.arange(T)
    gap = pos[:, None] - pos[None, :]
    valid = (gap >= 0) & (gap < window) & (seq[:, None] == seq[None, :])
    probs = (torch.einsum("qhd,khd->hqk", q, k) * scale).masked_fill(~valid, float("-inf")).softmax(-1)
    a = torch.einsum("qh,hqk->qk", w1n, probs)
    return w2[..., None] * torch.einsum("qk,khd->qhd", a, v)

def record_attention(x, w, sa, H, paired, tables, scale, key_offset, aux_v, xsa_alpha, gate, dc_w, cu, left):
    """The record's CausalSelfAttention.forward (FA3 and the DC kernel written densely, no FP8)."""
    B, T, D = x.shape
    hd = D // H
    q, k, v = F.linear(x, sa[0] * w[:3 * D]).view(B, T, 3 * H, hd).chunk(3, dim=-2)
    q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
    if not paired:
        q, k = yarn_rotary(q, tables), yarn_rotary(k, tables)
        if key_offset:
            k = k.clone()
            k[:, 1:, :, hd // 2:] = k[:, :-1, :, hd // 2:].clone()
        if aux_v is not None:
            v = v + aux_v.view_as(v)
    else:
        q, k = q.reshape(B, T, H // 2, 2 * hd), k.reshape(B, T, H // 2, 2 * hd)
        v = v.reshape(B, 2 * T, H // 2, hd)
        q, k = yarn_rotary(q, tables), yarn_rotary(k, tables)
        q, k = q.reshape(B, 2 * T, H // 2, hd), k.reshape(B, 2 * T, H // 2, hd)
        if aux_v is not None:
            v = v + aux_v.view_as(v)
        cu = [2 * c for c in cu]
    y = varlen_causal_attention(q[0], k[0], v[0], cu, left, scale)[None]
    if dc_w is not None:
        w1n = F.rms_norm(dc_w[0].float(), (H,), eps=1e-6).type_as(x)
        y = y + dc_correction_dense(q[0], k[0], v[0], w1n[0], dc_w[1][0], cu, 112, scale)[None]
    y = y.reshape(B, T, H, hd)
    if xsa_alpha is not None and not paired:
        dot = (y * v).sum(-1, keepdim=True)
        denom = v.square().sum(-1, keepdim=True).clamp_min(1e-8)
        y = y - torch.tanh(xsa_alpha).view(B, T, H, 1) * (dot / denom) * v
    if gate is not None:
        y = y * gate.view(B, T, H, 1)
    return F.linear(y.reshape(B, T, D), sa[1] * w[3 * D:])

def record_forward(R, inputs, targets, bigram_in, cu, bm_short, bm_long, H):
    """The record's GPT.forward at 6 heads (its hard-coded gate layout), 11 layers, fp64, eval-style loss: the sum of
    the next-token cross-entropy on 23 sigmoid((logits + 5) / 7.5). R: the record's parameters by name."""
    L, (V, D) = 11, R["embed"].shape
    hd = D // H
    bm_sizes = [bm_short] * 3 + [bm_long] + [bm_short] * 2 + [None] + [bm_short] * 3 + [bm_long]
    key_offset = [b == bm_long for b in bm_sizes]
    sa_lambdas = R["scalars"][:2 * L].view(-1, 2)
    smear_lambda, skip_lambda = R["scalars"][2 * L], R["scalars"][2 * L + 1]
    veg = R["ve_gate_bank"].unbind(0)
    ve_gates = [None, veg[0], veg[1], None, None, None, None, None, veg[2], veg[3], veg[4]]
    xsa_alphas, attn_gates, x0_gates, bigram_gates, dc_weights = ({} for _ in range(5))
    qk_all = R["qk_bank"][:10 * 2 * (H // 2)].view(10, -1, D)
    vo_flat = R["vo_bank"][:20].view(10, 2, D, D).flatten(1, 2)
    attn_weights = torch.cat([qk_all, vo_flat], dim=1).unbind(0)
    mlp_all = R["mlp_bank"].flatten(0, 1).unbind(0)
    mlp_fcs, mlp_projs = mlp_all[0::2], mlp_all[1::2]
    freq = R["angular_freq"]
    tables = yarn_tables(freq, len(inputs), False)
    tables_paired = yarn_tables(freq, len(inputs), True)

    def mudd(x, j, n):
        z = F.gelu(F.linear(x, R["mudd_w1"][j]))
        return ((F.linear(z, R["mudd_w2"][j, :n]) + R["mudd_b2"][j, :n]) * 0.1).split(1, dim=-1)

    def mudd_gate(x, j, n):
        z = F.gelu(F.linear(x, R["mudd_gate_w1"][j]))
        return (F.linear(z, R["mudd_gate_w2"][j, :n]) + R["mudd_gate_b2"][j, :n]) * R["mudd_gate_scale"]

    x = F.embedding(inputs, R["embed"])
    sign_idx = torch.zeros_like(inputs)
    sign_idx[1:] = (inputs[:-1] ^ inputs[1:]) % R["bigram_sign_table"].shape[0]
    x0_bigram = (F.embedding(bigram_in, R["bigram_embed"]) * R["bigram_sign_table"][sign_idx])[None]
    ve = R["value_embeds"].view(5, V, -1)[:, inputs]
    ve = [None, ve[0], ve[1], None, None, None, None, None, ve[2], ve[3], ve[4]]
    smear_gate_out = smear_lambda * torch.sigmoid(F.linear(x[1:, :12], R["smear_gate"]))
    x = torch.cat([x[:1], x[1:] + smear_gate_out * x[:-1]])
    x = x0 = F.rms_norm(x[None], (D,))
    pre = mudd_gate(x0, 0, 26)
    xsa_alphas[1], xsa_alphas[3], attn_gates[3] = pre[..., 0:6], pre[..., 6:12], pre[..., 12:18]
    for layer, off in zip((0, 1, 2, 3), range(18, 26, 2)):
        x0_gates[layer], bigram_gates[layer] = pre[..., off:off + 1], pre[..., off + 1:off + 2]
    x = x0 + x0_bigram * bigram_gates[0]
    cache = {0: x}
    for i in range(L):
        paired = i in REC_PAIRED
        mu = None
        if i == 4:
            post = mudd_gate(x, 1, 41)
            xsa_alphas[4], xsa_alphas[7], attn_gates[10] = post[..., 0:6], post[..., 6:12], post[..., 12:18]
            for layer, off in zip((4, 5, 7, 8, 9), range(18, 28, 2)):
                x0_gates[layer], bigram_gates[layer] = post[..., off:off + 1], post[..., off + 1:off + 2]
            post_skip_gate = post[..., 28:29]
            dc_weights[10] = (post[..., 29:35], post[..., 35:41])
        if i == 6:
            x = x + torch.sigmoid(skip_lambda) * post_skip_gate * cache[3]
        else:
            w = attn_weights[i - (i > 6)]
            attn_in = F.rms_norm(cache.get(7, x), (D,))
            T = attn_in.size(1)
            if i == L - 1:
                cache[9] = x
                mu = mudd(x, 0, 14)
                v_mudd = (mu[0] * cache[0] + mu[1] * cache[7] + mu[2] * x).view(1, T, H, hd)
                x = (1 + mu[5]) * x + mu[3] * cache[0] + mu[4] * cache[7]
                ve_gate = torch.cat([mu[6], mu[7]], dim=-1).repeat_interleave(H // 2, dim=-1).unsqueeze(-1)
                aux_v = (ve_gate * ve[i].view(1, T, H, hd) + v_mudd).view(1, T, -1)
            elif ve[i] is not None:
                gate_in = torch.cat([attn_in[..., :6], ve[i][None, ..., :6]], dim=-1)
                ve_gate_out = 2 * torch.sigmoid(F.linear(gate_in, ve_gates[i])).view(1, T, H, 1)
                aux_v = (ve_gate_out * ve[i].view(1, T, H, hd)).view(1, T, -1)
            else:
                aux_v = None
            dc_w = dc_weights[i] if i in REC_DC and not paired else None
            attn_out = record_attention(attn_in, w, sa_lambdas[i], H, paired, tables_paired if paired else tables,
                                        R["attn_scale"], key_offset[i], aux_v, xsa_alphas.get(i),
                                        attn_gates[i] if i in REC_ATTN_GATE else None, dc_w, cu, bm_sizes[i])
            if mu is not None:
                x = mu[8] * x + mu[9] * attn_out + mu[10] * cache[0] + mu[11] * x0_bigram
            else:
                x = R["resid_lambdas"][i, 0] * x + R["post_lambdas"][i, 0] * attn_out + x0 * x0_gates[i]
                if i != 0:
                    x = x + x0_bigram * bigram_gates[i]
        normed = F.rms_norm(x, (D,))
        mlp_out = F.relu(normed @ mlp_fcs[i].T).square() @ mlp_projs[i]
        if mu is not None:
            x = mu[12] * x + mu[13] * mlp_out
        else:
            x = R["resid_lambdas"][i, 1] * x + R["post_lambdas"][i, 1] * mlp_out
        if i in REC_CACHE:
            cache[i] = x
    mu = mudd(x, 1, 5)
    x = x + mu[0] * cache[0] + mu[1] * cache[7] + mu[2] * cache[9] + mu[3] * ve[1][None] + mu[4] * cache[3]
    x = F.rms_norm(x, (D,))
    logits = 23 * torch.sigmoid((x[0] @ R["lm_head"] + 5) / 7.5)
    return F.cross_entropy(logits, targets, reduction="sum")

def record_parameters(model):
    """Our parameters in the record's layout as fresh fp64 leaves: the banks with the record's 8-GPU padding (zeros),
    the head transposed ([D, V], CastedLinearT). Returns the dict and, per our name, how to read its gradient back."""
    p = {n: t.detach().double() for n, t in model.named_parameters()}
    def pad(t, rows):
        return torch.cat([t, t.new_zeros(rows, *t.shape[1:])])
    R = {"embed": p["embed.weight"], "lm_head": p["lm_head.weight"].T, "smear_gate": p["smear_gate.weight"],
         "bigram_embed": p["bigram_embed.weight"], "value_embeds": p["value_embeds"],
         "ve_gate_bank": p["ve_gate_bank"], "qk_bank": pad(p["qk_bank"], 4), "vo_bank": pad(p["vo_bank"], 4),
         "mlp_bank": pad(p["mlp_bank"], 1), "scalars": p["scalars"], "mudd_gate_scale": p["mudd_gate_scale"],
         **{n: p[n] for n in ("resid_lambdas", "post_lambdas", "mudd_w1", "mudd_w2", "mudd_b2", "mudd_gate_w1",
                              "mudd_gate_w2", "mudd_gate_b2")}}
    R = {n: t.clone().requires_grad_(True) for n, t in R.items()}
    back = {"embed.weight": lambda: R["embed"].grad, "lm_head.weight": lambda: R["lm_head"].grad.T,
            "smear_gate.weight": lambda: R["smear_gate"].grad, "bigram_embed.weight": lambda: R["bigram_embed"].grad,
            "qk_bank": lambda: R["qk_bank"].grad[:60], "vo_bank": lambda: R["vo_bank"].grad[:20],
            "mlp_bank": lambda: R["mlp_bank"].grad[:11]}
    for n in p:
        if n not in back:
            back[n] = (lambda n: lambda: R[n].grad)(n)
    return R, back

def test_model_matches_a_twin_of_the_record_forward_loss_and_gradients():
    """The whole model (11 layers, width 48, 6 heads, fp64) against record_forward, a step-by-step twin of the
    record's GPT.forward written here: same weights (made non-trivial first, embedding untied from the head), 256
    tokens in three documents, windows (1, 3) blocks after a YaRN step 1 -> 3: the next-token loss sum and the
    gradient of every parameter. The record's padding rows get no gradient."""
    T, H = 256, 6
    model = small_record_model(T=T, seed=7).double()
    g = torch.Generator().manual_seed(8)
    def noise(t, std):
        return torch.randn(t.shape, generator=g, dtype=t.dtype) * std
    with torch.no_grad():
        model.mudd_w2.copy_(noise(model.mudd_w2, 0.3))
        model.mudd_gate_w2.copy_(noise(model.mudd_gate_w2, 0.3))
        model.mudd_b2.add_(noise(model.mudd_b2, 0.5))
        model.mudd_gate_b2.add_(noise(model.mudd_gate_b2, 0.5))
        model.mudd_gate_scale.fill_(0.13)
        model.ve_gate_bank.copy_(noise(model.ve_gate_bank, 0.5))
        model.mlp_bank[:, 1].copy_(noise(model.mlp_bank[:, 1], 0.05))
        model.bigram_embed.weight.copy_(noise(model.bigram_embed.weight, 1.0))
        model.smear_gate.weight.copy_(noise(model.smear_gate.weight, 0.5))
        model.value_embeds.copy_(noise(model.value_embeds, 0.3))
        model.embed.weight.copy_(noise(model.embed.weight, 1.0))
        model.lm_head.weight.copy_(noise(model.lm_head.weight, 0.1))
        model.scalars.add_(noise(model.scalars, 0.2))
        model.scalars[2 * 11] = 0.6  # smear
        model.resid_lambdas.add_(noise(model.resid_lambdas, 0.1))
        model.post_lambdas.add_(noise(model.post_lambdas, 0.1))
    model.rotary.set_window(1)
    model.rotary.set_window(3)
    starts = [0, 170, 230]
    inputs = tokens_with_docs(T, starts, seed=9)
    targets = torch.from_numpy(np.random.default_rng(10).integers(0, 50257, T))
    prev, cur = inputs[:-1].long().clone(), inputs[1:].long()  # the record's bigram hash (no int32 wrap below 59137)
    prev[0] = 1023  # its reserved row is written into position 0 before position 1 is hashed from it
    bigram_idx = torch.cat([torch.tensor([1023]), torch.bitwise_xor(36313 * cur, 27191 * prev) % 1023])
    model.train()
    masks = model.layer_masks(inputs, (1, 3), flex=False)
    loss, next_token = model(inputs, targets, bigram_idx, masks, mtp=torch.tensor([1.0]), prefix=torch.tensor(0.0))
    loss.backward()
    R, back = record_parameters(model)
    R["bigram_sign_table"] = model.bigram_signs.double()
    R["angular_freq"] = torch.cat([yarn_freq(base_freq(8), 128, 384).repeat_interleave(2), torch.zeros(4)])
    R["attn_scale"] = 0.1 * (0.2 * math.log(384 / 128) + 1)
    ref = record_forward(R, inputs.long(), targets, bigram_idx, starts + [T], 128, 384, H)
    ref.backward()
    assert next_token.item() == pytest.approx(ref.item(), rel=5e-7)  # the model's log-softmax is fp32
    assert loss.item() == pytest.approx(ref.item(), rel=5e-7)
    for name, p in model.named_parameters():
        ref_grad = back[name]()
        assert ref_grad.norm() > 0, name
        assert rel(p.grad, ref_grad) < 1e-6, (name, rel(p.grad, ref_grad))  # DC scores and the loss are fp32
    assert R["qk_bank"].grad[60:].abs().max() == 0 and R["vo_bank"].grad[20:].abs().max() == 0
    assert R["mlp_bank"].grad[11:].abs().max() == 0
