"""GPU-only checks of train_gpt.py's fast path against independent references; the module is skipped without CUDA.

    python3 -m pytest -q tests/test_gpu.py      # on a CUDA machine (tests/gpu_check.sh runs it as its test_gpu part)

- compiled FlexAttention (torch.compile(tg.attend) on tg.make_masks(..., flex=True)) against the portable twin
  (flex=False, fp32) and against a dense fp64 attention over a T x T mask built here from the masking rule, forward
  and gradients, for the short, long (key offset) and paired (doubled stream) kinds at T = 8192, bf16;
- the FP8 head against the bf16 head and an fp64 reference written here: head_loss and its gradients;
- the compiled FP8 MLP (up and down projections, delayed scales) against the bf16 MLP at the record's width;
- a tiny Trainer on CUDA with compile on: kernel_warmup compiles every training shape and restores the weights, the
  steps after it through both stages compile nothing.
"""
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import train_gpt as tg
from tests.gptdata import write_corpus

BOS = 50256  # GPT-2's <|endoftext|>: the record's document start

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

T, HEADS, HEAD_DIM, SCALE = 8192, 6, 128, 0.12  # the record's heads; 0.12 about its YaRN-scaled attention scale
WINDOWS = dict(short=5, long=11)  # the record's stage-3 windows, in 128-token blocks


@functools.cache
def compiled_attend():  # made on first use: torch.compile's imports cost seconds, which a skipped module should not
    return torch.compile(tg.attend, dynamic=False, fullgraph=True)  # as inside the compiled model


def documents(n, seed):
    """n tokens: documents of 300 to 3,000 tokens (shorter and longer than the windows), each starting with BOS."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, BOS, n)
    pos = 0
    while pos < n:
        tokens[pos] = BOS
        pos += int(rng.integers(300, 3000))
    return torch.from_numpy(tokens).int().cuda()


def dense_attention(q, k, v, tokens, window, paired):
    """fp64 softmax attention over an explicit mask, written from the rule the README states: key j is visible from
    query i when j <= i, both lie in the same document and i - j <= window * 128 positions; in the paired stream
    position p belongs to token p // 2. q, k, v [1, n, heads, dim] (fp64 leaves)."""
    n = q.size(1)
    doc_of_token = torch.cumsum((tokens == BOS).long(), 0)
    pos = torch.arange(n, device=q.device, dtype=torch.int32)  # int32: the n x n differences of the paired stream
    doc = doc_of_token[(pos // 2 if paired else pos).long()]
    back = pos[:, None] - pos[None, :]
    visible = (back >= 0) & (back <= window * 128) & (doc[:, None] == doc[None, :])
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * SCALE
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def rel_max(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", ["short", "long", "paired"])
def test_compiled_flex_matches_the_portable_twin_and_a_dense_reference(kind):
    torch.manual_seed(0)
    paired = kind == "paired"
    n, heads = (2 * T, HEADS // 2) if paired else (T, HEADS)  # paired: heads j, j + 3 as one stream of 2T positions
    window = WINDOWS["long" if kind == "long" else "short"]  # paired layers have the short window
    tokens = documents(T, seed=1)
    q, k, v = (F.rms_norm(torch.randn(1, n, heads, HEAD_DIM, device="cuda"), (HEAD_DIM,)).bfloat16()
               for _ in range(3))  # normed as the model's q and k
    if kind == "long":
        k = tg.key_offset(k)  # what the long layers attend with
    grad_out = torch.randn(1, n, heads, HEAD_DIM, device="cuda").bfloat16()
    leaves = {name: [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
              for name, dtype in (("flex", torch.bfloat16), ("twin", torch.float32), ("dense", torch.float64))}
    outs = dict(flex=compiled_attend()(*leaves["flex"], tg.make_masks(tokens, [window], True, paired)[0], SCALE),
                dense=dense_attention(*leaves["dense"], tokens, window, paired))
    with sdpa_kernel(SDPBackend.MATH):  # the twin's SDPA in plain fp32 (no TF32 kernels) so that 1e-4 holds below
        outs["twin"] = tg.attend(*leaves["twin"], tg.make_masks(tokens, [window], False, paired)[0], SCALE)
        for name, out in outs.items():
            out.backward(grad_out.to(out.dtype))
    grads = {name: [t.grad for t in ts] for name, ts in leaves.items()}
    # the twin in fp32 against fp64: rounding near 1e-6; a mask that differs anywhere moves some output by O(1)
    assert rel_max(outs["twin"], outs["dense"]) < 1e-4
    for got, want in zip(grads["twin"], grads["dense"]):
        assert rel_max(got, want) < 1e-4
    # flex: bf16 inputs, fp32 accumulation; its bf16 rounding of the probabilities before P @ V and of its output
    # add at most about 2 * 2^-9 of max |v| to an output (max |out| is about max |v|: each document's first query sees
    # only itself), so 2^-6 leaves a 4x margin; the gradients also round dS (and the row sums dO . O from the bf16
    # output) to bf16, and 2^-5 leaves a similar margin. Strided q/k into compiled flex were off by O(1).
    assert rel_max(outs["flex"], outs["twin"]) < 2 ** -6, kind
    for name, got, want in zip("qkv", grads["flex"], grads["twin"]):
        assert rel_max(got, want) < 2 ** -5, (kind, f"d{name}")


def test_fp8_head_loss_and_gradients_match_bf16_and_fp64():
    torch.manual_seed(0)
    N, D, V = 8192, 768, 50304
    x = F.rms_norm(torch.randn(N, D, device="cuda"), (D,)).bfloat16()  # the model's normed final state
    weight = (0.02 * torch.randn(V, D, device="cuda")).bfloat16()  # about a trained head's scale
    targets = torch.randint(0, V, (N,), device="cuda")
    mtp, prefix = torch.ones(1, device="cuda"), torch.zeros((), device="cuda")
    no_prefix = torch.full((N,), -1, device="cuda")
    results = {}
    for fp8 in (True, False):
        head = tg.CastedLinear(D, V, fp8=fp8).cuda().bfloat16().train()
        head.weight.data.copy_(weight)
        xi = x.clone().requires_grad_()
        loss = tg.head_loss(xi, head, targets, mtp, no_prefix, prefix)[0]
        (loss / 8).backward()  # as Trainer.train_step: a slot's loss over 8 slots (the FP8 gradient scale assumes it)
        results[fp8] = (loss.item(), xi.grad.double(), head.weight.grad.double())
    # the reference in fp64 from the same bf16 values: logits capped as 23 sigmoid((z + 5) / 7.5), summed CE
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    z = 23 * torch.sigmoid((x64 @ w64.T + 5) / 7.5)
    ref_loss = -torch.log_softmax(z, -1).gather(1, targets[:, None]).sum()
    (ref_loss / 8).backward()
    ref = (ref_loss.item(), x64.grad, w64.grad)
    # loss: e4m3 rounds x and W by <= 2^-4 relative (std about 3.6% each), so a logit moves by about 5% of its size
    # (std 0.55 here): about 0.02 after the cap's slope, with random sign per token. Summed over 8192 tokens of about
    # 10.8 each that is about 2e-5 of the loss (the bf16 head rounds the capped logits, about the same): 1e-3 leaves a
    # 50x margin, and a wrong scale or layout moves the loss by far more.
    for fp8 in (True, False):
        assert abs(results[fp8][0] - ref[0]) / ref[0] < 1e-3, fp8
    assert abs(results[True][0] - results[False][0]) / results[False][0] < 1e-3
    # gradients: the FP8 backward rounds the logit gradient to e5m2 (<= 2^-3 relative, std about 7%) and uses the e4m3
    # x and W: about 8% relative error expected (Frobenius), 0.15 bounds it; bf16 (2^-9 rounding) stays below 0.02
    frob = lambda a, b: ((a - b).norm() / b.norm()).item()
    for i, name in ((1, "grad x"), (2, "grad W")):
        assert frob(results[True][i], ref[i]) < 0.15, name
        assert frob(results[False][i], ref[i]) < 0.02, name


def test_compiled_fp8_mlp_matches_the_bf16_mlp_and_renews_its_scales():
    """At the record's width (768, MLP 3072) on an FP8 GPU: a compiled training forward and backward with both MLP
    projections in FP8 (FP8UpProjection, FP8DownProjection through cuBLASLt) against the same model with
    --fp8_mlp=0, the second forward of a slot (the first quantizes post by the initial scale 1); the slot's
    activation scales renewed in the graph. On a CPU (eager, width 256) the loss moved by 6e-6 and the weight
    matrices' gradients by 1.5e-2 to 4.3e-2, all gradients together by less; the bounds leave 2x or more."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs sm_89 or later")
    torch.manual_seed(0)
    h = tg.parse_args(["--num_layers=4", "--model_dim=768", "--num_heads=6", "--bigram_vocab_size=1024"])
    models = [tg.GPT(h, 4096, torch.bfloat16).cuda() for _ in range(2)]
    with torch.no_grad():
        models[0].mlp_bank[:, 1].normal_(0, 0.02)  # the down projections start at zero: give them weights
    models[1].load_state_dict(models[0].state_dict())
    models[1].fp8_mlp = False
    assert models[0].fp8_mlp
    tokens = documents(2049, seed=1)
    inputs, targets = tokens[:-1].int(), tokens[1:].long()
    bigram = torch.randint(0, 1024, (2048,), device="cuda", dtype=torch.int32)
    masks = models[0].layer_masks(inputs, (5, 11), True)
    args = (inputs, targets, bigram, masks, torch.ones(1, device="cuda"), torch.zeros((), device="cuda"))
    slot = torch.tensor(3, device="cuda")
    models[0].refresh_fp8_scales(0)
    losses = []
    for model in models:
        compiled = torch.compile(model, dynamic=False, fullgraph=True)
        compiled(*args, slot=slot)[0].backward()
        model.zero_grad(set_to_none=True)
        loss = compiled(*args, slot=slot)[0]
        loss.backward()
        losses.append(loss.item())
    scales = models[0].fp8_act_scales
    assert scales[3].isfinite().all() and (scales[3] != 1).all() and (scales[[0, 1, 2, 4, 5, 6, 7]] == 1).all()
    assert abs(losses[0] / losses[1] - 1) < 1e-3, losses
    frob = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
    for name in ("mlp_bank", "qk_bank", "vo_bank", "lm_head.weight"):
        assert frob(models[0].get_parameter(name).grad, models[1].get_parameter(name).grad) < 0.1, name
    grads = [torch.cat([p.grad.flatten().double() for p in m.parameters() if p.grad is not None]) for m in models]
    assert frob(*grads) < 0.1
    torch._dynamo.reset()


TINY = ["--num_layers=3", "--model_dim=128", "--num_heads=2", "--vocab_size=50304", "--bigram_vocab_size=1024",
        "--ws_schedule=1,3", "--train_batch_size=8192,16384", "--train_max_seq_len=512,1024", "--stage_lr=1,1.5",
        "--mtp_weights=1,0.5/1", "--prefix_weight=0", "--num_iterations=6", "--num_extension_iterations=0",
        "--untie_stage=1", "--kernel_warmup_steps=2", "--val_tokens=4096", "--val_seq_len=4096", "--repeat_data=1",
        "--compile=1"]


def test_tiny_trainer_compiles_in_the_kernel_warmup_and_never_after(tmp_path):
    """Two stages (1,024-token slots with 2 predictions, then 2,048-token slots with 1), 3 steps each: Adam steps on
    odd steps, the untie at step 3, YaRN at the stage change. The warmup runs the first step of each stage's shape;
    afterwards no graph may be compiled and no guard may fail (a recompile would land in the timed steps)."""
    write_corpus(str(tmp_path), train_tokens=300_000, val_tokens=10_000, n_train_shards=1)
    h = tg.parse_args(TINY + [f"--train_files={tmp_path}/fineweb_train_*.bin",
                              f"--val_files={tmp_path}/fineweb_val_000000.bin"])
    import torch._dynamo.utils
    torch._dynamo.reset()
    counters, failures = torch._dynamo.utils.counters, torch._dynamo.utils.guard_failures
    graphs = lambda: counters["stats"]["unique_graphs"]
    reasons = lambda: [r for rs in failures.values() for r in rs]
    torch.manual_seed(0)
    trainer = tg.Trainer(h, 0, 1, torch.device("cuda"))
    assert trainer.flex  # compiled on CUDA: FlexAttention with BlockMasks, not the blockwise twin
    start_graphs = graphs()
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    lines = []
    trainer.kernel_warmup(h.kernel_warmup_steps, lines.append)
    torch.cuda.synchronize()
    after_warmup, reasons_after_warmup = graphs(), reasons()
    assert len(lines) == 2, lines  # one warmup phase per training shape: the two stages
    assert after_warmup - start_graphs >= 2  # at least one model graph per shape (plus Polar Express's)
    for k, v in trainer.model.state_dict().items():  # the warmup's steps are undone
        assert torch.equal(v, initial[k]), k
    loader = tg.TrainLoader(h, 0, 1, trainer.device)
    for step in range(h.num_iterations):
        trainer.train_step(step, loader)
    torch.cuda.synchronize()
    assert reasons()[len(reasons_after_warmup):] == []
    assert graphs() == after_warmup
    assert math.isfinite(trainer.loss_sum.item()) and trainer.loss_sum.item() > 0
    assert not trainer.tied  # untied at step 3
