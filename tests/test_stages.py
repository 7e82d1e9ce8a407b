"""train_gpt.py's record-#89 training side on CPU: the staged schedule, the multi-token and prefix-token losses, the
prefix table, the bigram hash, the tied-then-untied head and Adam's cautious decay, each against a reference written
here from the record's stated rules; then tiny runs that cross a stage boundary and the untie step."""
import copy, math, os, random, re, subprocess, sys
import numpy as np
import pytest
import torch

import train_gpt as tg
from tests.gptdata import SMALL_BOS, SMALL_VOCAB, write_tiktoken_plugin
from tests.test_gpt import SCRIPT, parse_log, rel, run_cli
from conftest import HANG_S

BOS_ID = SMALL_BOS  # the document start in the gpt_files corpus (its small vocabulary)
# the tiny model of tests/test_techniques.py; no prefix loss unless a test brings a tokenizer (GPT-2's cannot be
# downloaded here)
SMALL = SMALL_VOCAB + ["--num_layers=4", "--model_dim=16", "--num_heads=2", "--train_batch_size=1024",
                       "--train_max_seq_len=128", "--val_tokens=1000", "--val_seq_len=1024", "--compile=0",
                       "--kernel_warmup_steps=0", "--bigram_vocab_size=1024"]
NO_PREFIX = ["--prefix_weight=0"]
# 6 steps, 1 of them extension: 5 scheduled steps in stages [0, 2) [2, 3) [3, 5) (round(k * 5 / 3)), untie at step 3
SHORT = ["--num_iterations=6", "--num_extension_iterations=1"]

def main_error(args, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    with pytest.raises(tg.UserError) as e:
        tg.main(args)
    return str(e.value)

def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)

def flat_state(sd):
    """Every tensor of a checkpoint that the training continues from, by name."""
    out = {f"model.{k}": v for k, v in sd["model"].items()}
    for i, g in enumerate(sd["muon"]):
        out.update({f"muon{i}.{k}": v for k, v in g.items()})
    for i, g in enumerate(sd["adam"]):
        out.update({f"adam{i}.{k}": v for k, v in g.items()})
    out.update({f"pending{i}": g for i, g in enumerate(sd["adam_pending"]) if g is not None})
    return out

# ---------------------------------------------------------------------------------------------- schedule

# record #89 (TRAINING_STAGES of the record's train_gpt.py)
REC_SCHEDULED, REC_EXTENSION = 1270, 15
REC_STARTS = [0, 423, 847, 1270]  # round(k * 1270 / 3)

def record_plan(step):
    """(stage, tokens, seq cap, windows, lr, mtp weights, prefix weight) of the record's step, from its rules."""
    stage = 0 if step < 423 else 1 if step < 847 else 2 if step < 1270 else 3
    tokens = [131072, 262144, 393216, 393216][stage]
    seq_cap = [896, 2048, 2048, 2048][stage]
    windows = [(1, 3), (3, 7), (5, 11), (6, 13)][stage] if step < 1285 else (6, 20)
    stage_mult = [1.0, 1.52, 1.73, 1.73][stage]  # the extension is past the cooldown: its multiplier never shows
    cooldown_start = int(1270 * 0.4)
    t = min(1.0, (step - cooldown_start) / (1270 - cooldown_start)) if step >= cooldown_start else 0.0
    lr = stage_mult * (1 - t) + 0.15 * t
    def linear(start, end):  # start -> end over the step's stage
        return start + (end - start) * (step - REC_STARTS[stage]) / (REC_STARTS[stage + 1] - REC_STARTS[stage])
    if stage == 0:
        mtp, prefix = [1.0, 0.5, linear(0.25, 0.0)], 0.25
    elif stage == 1:
        mtp, prefix = [1.0, linear(0.5, 0.0)], linear(0.25, 0.0)
    else:
        mtp, prefix = [1.0], 0.0
    return stage, tokens, seq_cap, windows, lr, mtp, prefix

def test_schedule_at_the_record_defaults():
    schedule = tg.Schedule(tg.Hyperparameters())
    assert schedule.bounds == [0, 423, 847, 1270, 1285]
    assert schedule.untie_step == 847  # the first odd step at or after stage 2's start
    for step in range(REC_SCHEDULED + REC_EXTENSION + 1):  # every step and the final validation (step 1285)
        plan = schedule.at(step)
        stage, tokens, seq_cap, windows, lr, mtp, prefix = record_plan(step)
        assert (plan.stage, plan.batch_size, plan.max_seq_len, plan.windows) == (stage, tokens, seq_cap, windows), step
        assert plan.lr == pytest.approx(lr, abs=1e-12) and plan.prefix == pytest.approx(prefix, abs=1e-12), step
        assert len(plan.mtp) == len(mtp) and plan.mtp == pytest.approx(mtp, abs=1e-12), step
    # at the boundaries and their neighbours, by hand
    hand = {0: (0, 131072, 896, (1, 3), 1.0, [1, 0.5, 0.25], 0.25),
            422: (0, 131072, 896, (1, 3), 1.0, [1, 0.5, 0.25 / 423], 0.25),
            423: (1, 262144, 2048, (3, 7), 1.52, [1, 0.5], 0.25),
            846: (1, 262144, 2048, (3, 7), 1.52 * (1 - 338 / 762) + 0.15 * 338 / 762, [1, 0.5 / 424], 0.25 / 424),
            847: (2, 393216, 2048, (5, 11), 1.73 * (1 - 339 / 762) + 0.15 * 339 / 762, [1], 0.0),
            1269: (2, 393216, 2048, (5, 11), 1.73 / 762 + 0.15 * 761 / 762, [1], 0.0),
            1270: (3, 393216, 2048, (6, 13), 0.15, [1], 0.0), 1284: (3, 393216, 2048, (6, 13), 0.15, [1], 0.0),
            1285: (3, 393216, 2048, (6, 20), 0.15, [1], 0.0)}
    for step, (stage, tokens, seq_cap, windows, lr, mtp, prefix) in hand.items():
        plan = schedule.at(step)
        assert (plan.stage, plan.batch_size, plan.max_seq_len, plan.windows) == (stage, tokens, seq_cap, windows), step
        assert plan.lr == pytest.approx(lr, abs=1e-12) and plan.prefix == pytest.approx(prefix, abs=1e-12), step
        assert plan.mtp == pytest.approx(mtp, abs=1e-12), step
    # the cooldown starts at int(1270 * 0.4) = 508, in stage 1
    assert schedule.at(507).lr == schedule.at(508).lr == 1.52
    assert schedule.at(509).lr == pytest.approx(1.52 - (1.52 - 0.15) / 762, abs=1e-12)

def test_schedule_of_the_short_runs_below():
    schedule = tg.Schedule(tg.parse_args(SHORT))
    assert schedule.bounds == [0, 2, 3, 5, 6] and schedule.untie_step == 3
    assert [schedule.at(step).stage for step in range(7)] == [0, 0, 1, 2, 2, 3, 3]
    assert tg.Schedule(tg.parse_args(SHORT + ["--untie_stage=3"])).untie_step is None  # never
    # stage 2 starting at an even step: the untie waits for the next (odd) Adam step
    assert tg.Schedule(tg.parse_args(["--num_iterations=10", "--num_extension_iterations=1"])).untie_step == 7

# ---------------------------------------------------------------------------------------------- losses

def test_softcap_is_the_records_asymmetric_sigmoid():
    logits = torch.linspace(-60, 60, 241, dtype=torch.float64)
    expect = torch.tensor([23 / (1 + math.exp(-(x + 5) / 7.5)) for x in logits.tolist()], dtype=torch.float64)
    assert torch.allclose(tg.softcap(logits), expect, rtol=1e-12, atol=0)
    assert tg.softcap(torch.tensor(-5.0)) == 11.5 and 0 < tg.softcap(logits).min() < tg.softcap(logits).max() < 23

@pytest.mark.parametrize("fp32_softcap", [False, True])
def test_validation_softcap_on_bf16_logits_as_the_record(fp32_softcap):
    """Evaluation of a bf16 model: by default the softcap runs on the head's bf16 logits and the cross-entropy on
    their fp32 upcast, as the record's eval (23 * sigmoid((logits + 5) / 7.5), then .float()); --val_fp32_softcap=1
    caps the fp32 upcast. Each against the head's own logits captured here, and the two differ."""
    h = tg.parse_args(SMALL + [f"--val_fp32_softcap={int(fp32_softcap)}"])
    torch.manual_seed(3)
    model = tg.GPT(h, 256, torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # logits of a few units: the bf16 softcap rounds visibly
    inputs = torch.from_numpy(np.random.default_rng(4).integers(0, h.vocab_size, 256)).int()
    inputs[0] = BOS_ID
    targets = torch.from_numpy(np.random.default_rng(5).integers(0, h.vocab_size, 256))
    seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    with torch.no_grad():
        loss = model(inputs, targets, torch.from_numpy(tg.bigram_index(inputs.numpy(), 1024)),
                     model.layer_masks(inputs, (1, 1), flex=False), head_chunk=100)
    logits = torch.cat(seen)
    assert logits.dtype == torch.bfloat16 and logits.shape == (256, h.vocab_size)
    capped = {False: (23 * torch.sigmoid((logits + 5) / 7.5)).float(),  # bf16 arithmetic, then fp32
              True: 23 * torch.sigmoid((logits.float() + 5) / 7.5)}
    ref = {k: torch.nn.functional.cross_entropy(v, targets, reduction="sum").item() for k, v in capped.items()}
    assert loss.item() == pytest.approx(ref[fp32_softcap], rel=1e-6)
    assert abs(ref[True] - ref[False]) > 1e-4 * abs(ref[True])

def loss_reference(z, targets, mtp, prefix_targets, prefix, across_docs):
    """fp64, one position at a time: (weighted loss sum, next-token loss sum, gradient of the first in z)."""
    T = z.size(0)
    logp = torch.log_softmax(z.double(), dim=-1)
    probs = logp.exp()
    total, next_token, grad = 0.0, 0.0, torch.zeros_like(logp)
    for t in range(T):
        next_token -= logp[t, targets[t]].item()
        terms = []  # (weight, class) of each cross-entropy term of position t
        for k, w in enumerate(mtp):
            if t + k >= T:
                continue  # past the slot's end
            if not across_docs and BOS_ID in targets[t:t + k]:
                continue  # t+k is in a later document than t
            terms.append((w, targets[t + k]))
        if prefix_targets[t] >= 0:
            terms.append((prefix, prefix_targets[t]))
        for w, y in terms:
            total -= w * logp[t, y].item()
            grad[t] += w * probs[t]
            grad[t, y] -= w
    return total, next_token, grad

def fp64_head(T, D, V, seed):
    """x [T, D] and a CastedLinear(D, V) in fp64, logits of a few units (the softcap's curve matters)."""
    torch.manual_seed(seed)
    head = tg.CastedLinear(D, V).double().train()
    with torch.no_grad():
        head.weight.normal_(0, 0.6)
    return torch.randn(T, D, dtype=torch.float64).requires_grad_(), head

def loss_chain(x, head, targets, mtp, prefix_targets, prefix, across_docs):
    """loss_reference on z = softcap(x W^T), its z-gradient taken back to x and W by hand."""
    w = head.weight.detach()
    s = torch.sigmoid((x.detach() @ w.T + 5) / 7.5)
    total, next_token, grad_z = loss_reference(23 * s, targets, mtp, prefix_targets, prefix, across_docs)
    grad_logits = grad_z * 23 / 7.5 * s * (1 - s)
    return total, next_token, grad_logits @ w, grad_logits.T @ x.detach()

@pytest.mark.parametrize("across_docs", [True, False])
def test_mtp_and_prefix_loss_against_a_loop(across_docs):
    rng = random.Random(7)
    T, V = 40, BOS_ID + 4  # the vocabulary holds the BOS id
    targets = [rng.randrange(30) for _ in range(T)]
    for t in (5, 6, 20, 37, 39):
        targets[t] = BOS_ID  # two in a row, one near the end, the last
    prefix_targets = [rng.randrange(-1, 30) if t % 3 else -1 for t in range(T)]
    prefix_targets[11] = V - 1  # a prefix id far from the targets
    mtp, prefix = [0.7, 0.5, 0.25, 0.1], 0.3
    x, head = fp64_head(T, 8, V, seed=7)
    loss, next_token = tg.head_loss(x, head, torch.tensor(targets), torch.tensor(mtp, dtype=torch.float64),
                                    torch.tensor(prefix_targets), torch.tensor(prefix, dtype=torch.float64),
                                    across_docs, bos_id=BOS_ID)
    ref_loss, ref_next, ref_grad_x, ref_grad_w = loss_chain(x, head, targets, mtp, prefix_targets, prefix, across_docs)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    assert next_token.item() == pytest.approx(ref_next, rel=1e-12)  # unweighted, every position
    loss.backward()
    assert rel(x.grad, ref_grad_x) < 1e-12 and rel(head.weight.grad, ref_grad_w) < 1e-12
    # the reference tells apart what the flags and -1 change, by far more than the tolerance
    z = 23 * torch.sigmoid((x.detach() @ head.weight.detach().T + 5) / 7.5)
    other = loss_reference(z, targets, mtp, prefix_targets, prefix, not across_docs)[0]
    assert abs(other - ref_loss) > 1e-3 * abs(ref_loss)
    no_prefix = loss_reference(z, targets, mtp, [-1] * T, prefix, across_docs)[0]
    assert abs(no_prefix - ref_loss) > 1e-3 * abs(ref_loss)
    minus_one_as_zero = [max(0, p) for p in prefix_targets]
    assert abs(loss_reference(z, targets, mtp, minus_one_as_zero, prefix, across_docs)[0] - ref_loss) > 1

def todays_training_loss(z, targets, mtp, prefix_targets, prefix, across_docs):
    """The loss before the fused head (on the softcapped logits z: log_softmax, then one gather of every term's
    column), kept here as a reference: its terms are the loop's, so only the fused arithmetic is under test."""
    T = z.size(0)
    bos_seen = torch.nn.functional.pad((targets == BOS_ID).int().cumsum(0), (1, 0))
    cols, weights = [], []
    for k in range(mtp.numel()):
        valid = torch.arange(T) < T - k
        if not across_docs and k:
            valid = valid & (torch.nn.functional.pad(bos_seen[k:T], (0, k)) == bos_seen[:T])
        cols.append(torch.nn.functional.pad(targets[k:], (0, k)))
        weights.append(mtp[k] * valid)
    cols.append(prefix_targets.clamp_min(0))
    weights.append(prefix * (prefix_targets >= 0))
    log_probs = torch.log_softmax(z, dim=-1).gather(1, torch.stack(cols, 1))
    return -(log_probs * torch.stack(weights, 1)).sum(), -log_probs[:, 0].sum()

@pytest.mark.parametrize("mtp", [[1.0], [1.0, 0.5], [1.0, 0.5, 0.25], [1.0, 0.0, 0.5], [0.0, 1.0]])
@pytest.mark.parametrize("prefix", [0.0, 0.25])
@pytest.mark.parametrize("across_docs", [True, False])
def test_fused_head_loss_equals_todays_loss_in_fp64(mtp, prefix, across_docs):
    """The fused head and loss (SoftcappedHeadLoss, its hand-written backward) against the earlier path, the head
    then softcap then todays_training_loss under autograd, in fp64, for each weight pattern of the stages."""
    T, D, V = 96, 16, BOS_ID + 8
    g = torch.Generator().manual_seed(len(mtp) + int(10 * prefix))
    targets = torch.randint(0, V, (T,), generator=g)
    targets[torch.randperm(T, generator=g)[:6]] = BOS_ID  # six documents start inside the slot
    prefix_targets = torch.where(torch.rand(T, generator=g) < 0.6, torch.randint(0, V, (T,), generator=g), -1)
    mtp, prefix = torch.tensor(mtp, dtype=torch.float64), torch.tensor(prefix, dtype=torch.float64)
    x, head = fp64_head(T, D, V, seed=3)
    loss, next_token = tg.head_loss(x, head, targets, mtp, prefix_targets, prefix, across_docs, bos_id=BOS_ID)
    grads = torch.autograd.grad(loss, (x, head.weight))
    x_ref, w_ref = x.detach().clone().requires_grad_(), head.weight.detach().clone().requires_grad_()
    ref, ref_next = todays_training_loss(tg.softcap(x_ref @ w_ref.T), targets, mtp, prefix_targets, prefix, across_docs)
    ref_grads = torch.autograd.grad(ref, (x_ref, w_ref))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12) and next_token.item() == pytest.approx(ref_next.item())
    for got, want in zip(grads, ref_grads):
        assert rel(got, want) < 1e-12

# ---------------------------------------------------------------------------------------------- prefix table

def prefix_brute(vocab, vocab_size):
    """For each token id below vocab_size, the id of the longest proper byte prefix that is a token below vocab_size."""
    usable = {b: i for b, i in vocab.items() if i < vocab_size}
    table = [-1] * vocab_size
    for b, i in usable.items():
        for n in range(len(b) - 1, 0, -1):
            if b[:n] in usable:
                table[i] = usable[b[:n]]
                break
    return table

def chain_vocab(seed, n_multi, drop_singles=()):
    """All single bytes (less drop_singles) and n_multi strings, each an extension of an earlier one; ids shuffled."""
    rng = random.Random(seed)
    strings = [bytes([i]) for i in range(256)]
    while len(strings) < 256 + n_multi:
        extended = rng.choice(strings) + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))
        if extended not in strings:
            strings.append(extended)
    dropped = {bytes([i]) for i in drop_singles}
    strings = [string for string in strings if string not in dropped]
    ids = list(range(len(strings)))
    rng.shuffle(ids)
    return dict(zip(strings, ids))

def test_prefix_table_against_brute_force():
    vocab = chain_vocab(3, 500, drop_singles=range(200, 256))  # strings of a dropped byte may have no prefix at all
    table = tg.prefix_table(vocab, len(vocab))
    ref = prefix_brute(vocab, len(vocab))
    assert table.dtype == np.int64 and table.tolist() == ref
    assert sum(r == -1 for r in ref) > 200 and sum(r >= 0 for r in ref) > 300  # both kinds, many chains
    string_of = {i: b for b, i in vocab.items()}
    assert any(len(b) - len(string_of[ref[i]]) > 1 for b, i in vocab.items() if ref[i] >= 0)  # past a non-token

def test_prefix_table_ignores_ids_at_or_above_the_vocab_size():
    vocab = chain_vocab(4, 400)
    vocab_size = 512  # 144 tokens do not fit: they get no entry and are no prefix either (the head cannot predict them)
    table = tg.prefix_table(vocab, vocab_size)
    assert len(table) == vocab_size
    assert table.max() < vocab_size, "a prefix id outside the vocabulary: the loss would gather past the head"
    assert table.tolist() == prefix_brute(vocab, vocab_size)

# ---------------------------------------------------------------------------------------------- bigram hash

def wrap_int32(x):
    return (x + 2 ** 31) % 2 ** 32 - 2 ** 31

def bigram_reference(tokens, rows):
    """The record's get_bigram_hash in int32, step by step: copy the tokens, write rows - 1 into position 0, then
    hash every position t >= 1 from that array as ((36313 a[t]) ^ (27191 a[t-1])) mod (rows - 1), floored; so
    position 1's previous token is rows - 1, not the real first token."""
    a = list(tokens)
    a[0] = rows - 1
    return [rows - 1] + [(wrap_int32(36313 * a[t]) ^ wrap_int32(27191 * a[t - 1])) % (rows - 1)
                         for t in range(1, len(a))]

def test_bigram_index_against_int32_loop():
    rng = random.Random(5)
    # products that wrap: 36313 * 59139 > 2^31 - 1, 27191 * 78979 > 2^31 - 1, and the uint16 top
    edges = [0, 1, 59138, 59139, 65535, 65534, 78978, 78979, 50256, 2 ** 31 // 36313, 100000, 123456]
    tokens = edges + [rng.randrange(65536) for _ in range(300)] + edges[::-1]
    assert any((wrap_int32(36313 * c) ^ wrap_int32(27191 * p)) < 0 for p, c in zip(tokens, tokens[1:]))
    for rows in (1024, 377280, 7):
        assert tg.bigram_index(np.array(tokens), rows).tolist() == bigram_reference(tokens, rows), rows
        real_first = (wrap_int32(36313 * tokens[1]) ^ wrap_int32(27191 * tokens[0])) % (rows - 1)
        assert bigram_reference(tokens, rows)[1] != real_first  # the rule is seen: token 0 = 0 would hash otherwise

def test_loader_gives_each_slot_its_bigram_rows(gpt_files):
    h = tg.parse_args(gpt_files + SMALL)
    loader = tg.TrainLoader(h, 0, 1, torch.device("cpu"))
    for batch_size, seq_cap in [(1024, 128), (2048, 100)]:
        batches, _ = loader.next_step(batch_size, seq_cap)
        for inputs, _, bigram in batches:
            assert inputs[0] == BOS_ID and len(inputs) == batch_size // 8
            assert bigram.tolist() == bigram_reference(inputs.tolist(), 1024)

def test_bigram_injection_with_its_sign_row(monkeypatch):
    h = tg.parse_args(SMALL + ["--bigram_sign_rows=1000"])  # not a power of 2: the modulo shows
    torch.manual_seed(0)
    model = tg.GPT(h, 256, torch.float32).eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, h.vocab_size, 256)
    tokens[[0, 100]] = BOS_ID
    inputs = torch.from_numpy(tokens).int()
    bigram_rows = torch.from_numpy(tg.bigram_index(tokens, 1024))
    H = h.num_heads
    with torch.no_grad():
        model.bigram_embed.weight.normal_()
        # a zero embedding: x0 = 0, so layer 0's input is the bigram term alone times its injection weight, which the
        # pre MUDD gate gives (it reads x0 = 0: its bias times its scale); the gate's outputs are the XSA strengths of
        # layers 1 and 3, the attention gate of layer 3 (H each), then an (x0, bigram) weight pair per layer 0..3
        model.embed.weight.zero_()
        model.mudd_gate_scale.fill_(1.0)
        model.mudd_gate_b2[0, 3 * H + 1] = 1.0  # layer 0's bigram weight
    seen = []
    real_norm = tg.norm
    monkeypatch.setattr(tg, "norm", lambda x: seen.append(x.detach().clone()) or real_norm(x))
    masks = model.layer_masks(inputs, (1, 3), flex=False)
    with torch.no_grad():
        model(inputs, torch.zeros(256, dtype=torch.int64), bigram_rows, masks)
    table, signs = model.bigram_embed.weight, model.bigram_signs
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    expect = torch.stack([table[bigram_rows[p]] * signs[0 if p == 0 else int(tokens[p - 1] ^ tokens[p]) % 1000]
                          for p in range(256)])
    assert torch.equal(seen[0], torch.zeros(256, h.model_dim))  # the embedding (and its smear), normed first
    assert torch.equal(seen[1][0], expect)  # then layer 0's attention input

# ---------------------------------------------------------------------------------------------- Adam

def adam_reference(p, grads, lr_mults, wd_mults, betas, lr, lr_mul, eps, weight_decay, wd_mul, mode):
    """The record's Adam, fp64: bias-corrected step, decay lambda = (lr lr_mul sched)^2 wd wd_mul where upd * p > 0."""
    (b1, b2), p = betas, p.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, (g, lr_mult, wd_mult) in enumerate(zip(grads, lr_mults, wd_mults), start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr * lr_mul * lr_mult * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        upd = step * m / (v.sqrt() + eps)
        lam = (lr * lr_mul * wd_mult) ** 2 * weight_decay * wd_mul
        mask = {"cautious": (upd * p > 0).double(), "decoupled": torch.ones_like(p), "none": torch.zeros_like(p)}[mode]
        p = p - upd - lam * p * mask
    return p

@pytest.mark.parametrize("mode", ["cautious", "decoupled", "none"])
def test_adam_cautious_decay_against_reference(mode):
    torch.manual_seed(6)
    configs = [((0.5, 0.95), 2.0, 3.0), ((0.75, 0.95), 0.5, 40.0)]  # (betas, lr_mul, wd_mul) of each parameter
    starts = [torch.randn(16, 8), torch.randn(24, 4)]
    starts[0][0, :4] = 0.0  # p = 0: no decay whatever the mask says
    grads = [[torch.randn_like(p) for _ in range(3)] for p in starts]
    for g in grads[0]:
        g[1, :4] = 0.0  # upd = 0 exactly with p != 0: the strict mask spares them
    lr, eps, wd = 0.05, 1e-10, 0.5
    lr_mults, wd_mults = [1.0, 0.6, 0.3], [1.0, 0.6, 1.0]  # the last step passes its decay schedule apart
    params = [torch.nn.Parameter(p.clone()) for p in starts]
    opt = tg.DistAdam([(p, *c) for p, c in zip(params, configs)], tg.Comm(0, 1), lr=lr, eps=eps, weight_decay=wd,
                      wd_mode=mode)
    for t in range(3):
        for p, g in zip(params, grads):
            p.grad = g[t].clone()
        opt.step(lr_mults[t], wd_mults[t] if t == 2 else None)
    for p, p0, g, (betas, lr_mul, wd_mul) in zip(params, starts, grads, configs):
        ref = adam_reference(p0, g, lr_mults, wd_mults, betas, lr, lr_mul, eps, wd, wd_mul, mode)
        assert rel(p.detach() - p0, ref - p0.double()) < 1e-5, mode  # fp32 weights and moments
        no_decay = adam_reference(p0, g, lr_mults, wd_mults, betas, lr, lr_mul, eps, 0.0, wd_mul, mode)
        if mode != "none":
            assert rel(no_decay - p0.double(), ref - p0.double()) > 1e-3  # the decay shows
    spared = params[0].detach()[1, :4]
    decays = [(lr * 2.0 * wd_mult) ** 2 * wd * 3.0 for wd_mult in wd_mults]  # parameter 0's lambda of each step
    kept = math.prod(1 - lam for lam in decays) if mode == "decoupled" else 1.0
    assert torch.allclose(spared, starts[0][1, :4] * kept, rtol=1e-6, atol=0)
    if mode == "cautious":
        assert torch.equal(spared, starts[0][1, :4])  # bit for bit: upd * p = 0 is not > 0

def test_adam_leaves_a_parameter_without_gradient_alone():
    """As the record: a parameter whose gradient is None (unused by this model) gets no update, no moment decay and
    no step count; the others go on as the reference, their bias correction counting their own steps."""
    torch.manual_seed(8)
    config = ((0.9, 0.99), 1.0, 1.0)
    starts = [torch.randn(8, 4), torch.randn(6, 3)]
    params = [torch.nn.Parameter(p.clone()) for p in starts]
    opt = tg.DistAdam([(p, *config) for p in params], tg.Comm(0, 1), lr=0.01, eps=1e-10, weight_decay=0.0)
    grads = [torch.randn(8, 4) for _ in range(3)]
    params[1].grad = torch.randn(6, 3)
    for t in range(3):  # parameter 1 has a gradient at the first step only
        params[0].grad = grads[t].clone()
        opt.step(1.0)
        if t == 0:
            after_first = (params[1].detach().clone(), opt.m[1].clone(), opt.v[1].clone())
            params[1].grad = None
    assert opt.t == [3, 1]
    assert torch.equal(params[1].detach(), after_first[0]) and torch.equal(opt.m[1], after_first[1])
    assert torch.equal(opt.v[1], after_first[2]) and opt.m[1].abs().sum() > 0
    ref = adam_reference(starts[0], grads, [1.0] * 3, [1.0] * 3, (0.9, 0.99), 0.01, 1.0, 1e-10, 0.0, 1.0, "none")
    assert rel(params[0].detach() - starts[0], ref - starts[0].double()) < 1e-5

# ---------------------------------------------------------------------------------------------- tied head

# 6 steps across every stage: the batch grows at stage 1 (step 2) and shrinks at stage 2 (step 3, the untie step),
# step 5 is the extension
STAGED = SHORT + ["--train_batch_size=1024,2048,1024", "--train_max_seq_len=128,256,100", "--val_loss_every=0",
                  "--val_tokens=256", "--save_checkpoint=1"]

def recording_trainer(steps):
    """A Trainer class that records in `steps`: its state at the start, then per step a copy of the model as its
    forward saw it, the forward's arguments, the head's and the embedding's gradients that Adam got, and after the step
    their weights, their Adam moments and the tie."""
    class RecordingTrainer(tg.Trainer):
        def __init__(self, *args):
            super().__init__(*args)
            self.real_fwd, self.real_adam_launch = self.fwd, self.adam.launch
            self.fwd, self.adam.launch = self.recording_fwd, self.recording_adam_launch
            steps.append(dict(after=self.head_state()))

        def head_state(self):
            head, embed, adam = self.model.lm_head.weight, self.model.embed.weight, self.adam
            i_head, i_embed = (next(i for i, p in enumerate(adam.params) if p is q) for q in (head, embed))
            return dict(head=head.detach().clone(), embed=embed.detach().clone(), tied=self.tied,
                        m=(adam.m[i_head].clone(), adam.m[i_embed].clone()),
                        v=(adam.v[i_head].clone(), adam.v[i_embed].clone()))

        def recording_fwd(self, *args, **kw):
            if not self.model.training:
                return self.real_fwd(*args, **kw)  # a validation
            if "model" not in steps[-1]:
                steps[-1]["model"] = copy.deepcopy(self.model)
            steps[-1]["calls"].append(args)
            return self.real_fwd(*args, **kw)

        def recording_adam_launch(self, *args, **kw):  # the gradients Adam's reductions take
            steps[-1]["adam_grads"] = (self.model.lm_head.weight.grad.clone(), self.model.embed.weight.grad.clone())
            return self.real_adam_launch(*args, **kw)

        def train_step(self, step, loader):
            steps.append(dict(calls=[]))
            out = super().train_step(step, loader)
            steps[-1]["after"] = self.head_state()
            return out
    return RecordingTrainer

@pytest.fixture(scope="module")
def staged_run(tmp_path_factory, gpt_files):
    """The STAGED run in-process, world size 1, with a checkpoint after every step: its folder, its flags without
    --checkpoint_every and --run_id, its Trainer, the initial record of recording_trainer and one record per step.
    With no prefix loss the tokenizer is never asked for."""
    d = tmp_path_factory.mktemp("staged")
    common = gpt_files + SMALL + NO_PREFIX + STAGED
    def no_tokenizer(*args):
        raise AssertionError("the prefix vocabulary was loaded with --prefix_weight=0")
    records, trainers = [], []
    class KeptTrainer(recording_trainer(records)):
        def __init__(self, *args):
            super().__init__(*args)
            trainers.append(self)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        mp.setattr(tg, "prefix_vocab", no_tokenizer)
        mp.setattr(tg, "prefix_table", no_tokenizer)
        mp.setattr(tg, "Trainer", KeptTrainer)
        tg.main(common + ["--checkpoint_every=1", "--run_id=full"])
    assert len(trainers) == 1 and len(records) == 7
    return d, common, trainers[0], records[0]["after"], records[1:]

def autograd_grads(record):
    """Head and embedding gradients of one step's loss (mean over the 8 slots), by autograd on the step's model."""
    model = record["model"]
    model.zero_grad(set_to_none=True)
    for args in record["calls"]:
        loss, _ = model(*args)
        (loss / 8).backward()
    return model.lm_head.weight.grad.double(), model.embed.weight.grad.double()

def test_tied_head_steps_on_the_sum_of_both_gradients(staged_run):
    trainer, initial, steps = staged_run[2:]
    assert torch.equal(initial["head"], initial["embed"]) and initial["tied"]
    assert torch.equal(steps[0]["after"]["head"], initial["head"]) and "adam_grads" not in steps[0]  # Adam: odd steps
    g_head, g_embed = (a + b for a, b in zip(autograd_grads(steps[0]), autograd_grads(steps[1])))  # two steps' worth
    tied_sum = g_head + g_embed
    assert rel(tied_sum, g_head) > 0.1 and rel(tied_sum, g_embed) > 0.1  # both matter
    assert rel(steps[1]["adam_grads"][0], tied_sum) < 1e-5
    after = steps[1]["after"]
    b1, b2 = 0.5, 0.95  # the record's head and embedding betas
    assert rel(after["m"][0], (1 - b1) * tied_sum) < 1e-5 and rel(after["v"][0], (1 - b2) * tied_sum ** 2) < 1e-5
    assert after["m"][1].abs().max() == 0 and after["v"][1].abs().max() == 0  # the embedding's own state: unused
    ref = adam_reference(initial["head"], [tied_sum], [trainer.schedule.at(1).lr], [trainer.schedule.at(1).lr],
                         (b1, b2), trainer.h.adam_lr, 1.0, trainer.h.adam_eps,
                         trainer.h.adam_weight_decay, 150.0, "cautious")
    assert rel(after["head"] - initial["head"], ref - initial["head"].double()) < 1e-5
    assert torch.equal(after["embed"], after["head"]) and after["tied"]

def test_untie_keeps_the_function_and_the_optimizer_state(staged_run):
    trainer, initial, steps = staged_run[2:]
    untie = trainer.schedule.untie_step
    assert untie == 3 and [record["after"]["tied"] for record in steps] == [True, True, True, False, False, False]
    at = steps[untie]["after"]
    assert not torch.equal(at["head"], steps[untie - 2]["after"]["head"])  # the untie step was an Adam step
    assert torch.equal(at["embed"], at["head"])  # the same function right after the untie
    assert torch.equal(at["m"][1], at["m"][0]) and torch.equal(at["v"][1], at["v"][0])  # the head's moments
    assert at["m"][0].abs().max() > 0
    # the next Adam step (5): each weight on its own gradient of steps 4 and 5, from the shared moments
    g_head, g_embed = (a + b for a, b in zip(autograd_grads(steps[4]), autograd_grads(steps[5])))
    got_head, got_embed = steps[5]["adam_grads"]
    assert rel(got_head, g_head) < 1e-5 and rel(got_embed, g_embed) < 1e-5 and rel(g_head, g_embed) > 0.1
    after, b1 = steps[5]["after"], 0.5
    assert rel(after["m"][0], b1 * at["m"][0].double() + (1 - b1) * g_head) < 1e-5
    assert rel(after["m"][1], b1 * at["m"][1].double() + (1 - b1) * g_embed) < 1e-5
    assert not torch.equal(after["embed"], at["embed"]) and (after["embed"] - after["head"]).abs().max() > 1e-6

# ---------------------------------------------------------------------------------------------- tiny runs

def test_resume_across_the_untie_matches_an_uninterrupted_run(staged_run, monkeypatch):
    d, common = staged_run[:2]
    monkeypatch.chdir(d)  # in-process main(): the command line itself runs in the tests below
    untie = tg.Schedule(tg.parse_args(common)).untie_step
    saved = {step: load_ckpt(d / f"logs/full/state_step{step:06d}.pt") for step in (untie, untie + 1, 6)}
    # before the untie step the embedding is the head; the untie is step 3 (0-based), the 4th step
    assert torch.equal(saved[untie]["model"]["embed.weight"], saved[untie]["model"]["lm_head.weight"])
    assert saved[untie]["adam_pending"][0] is not None  # after an even step: gradients wait for the next Adam step
    assert not torch.equal(saved[6]["model"]["embed.weight"], saved[6]["model"]["lm_head.weight"])
    # resumed just before the untie step, which the resumed run takes with the pending gradients
    tg.main(common + [f"--resume=logs/full/state_step{untie:06d}.pt", "--run_id=resumed"])
    resumed = load_ckpt(d / "logs/resumed/state_step000006.pt")
    full, other = flat_state(saved[6]), flat_state(resumed)
    assert other.keys() == full.keys()
    for k in full:
        assert torch.equal(other[k], full[k]), k
    assert (resumed["loader"], resumed["adam_t"]) == (saved[6]["loader"], saved[6]["adam_t"])
    assert parse_log(d / "logs/resumed.txt")[2] == parse_log(d / "logs/full.txt")[2]  # the final validation
    # the tie as a resume restores it: still tied before the untie step, untied from the checkpoint just after it
    trainer = tg.Trainer(tg.parse_args(common), 0, 1, torch.device("cpu"))
    for step, tied in [(untie, True), (untie + 1, False)]:
        trainer.load_state_dict(saved[step])
        assert trainer.tied == tied, step

def run_on_2_processes(d, flags):  # two gloo processes via torchrun, in d
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two processes on the CI's two cores
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT,
                        *flags], cwd=d, capture_output=True, text=True, timeout=HANG_S, env=env)
    assert r.returncode == 0, r.stderr[-3000:]

@pytest.fixture(scope="module")
def world_2_run(staged_run):
    """The STAGED run on two processes (the bigram gradient's rows exchanged by SparseRows), as logs/w2."""
    d, common = staged_run[:2]
    run_on_2_processes(d, [*common, "--checkpoint_every=1", "--run_id=w2"])
    return d

def test_world_size_2_matches_world_size_1_across_stages_and_the_untie(staged_run, world_2_run):
    # the two processes against the in-process world-size-1 run of the fixture
    d, common = staged_run[:2]
    a, b = load_ckpt(d / "logs/full/state_step000006.pt"), load_ckpt(d / "logs/w2/state_step000006.pt")
    # Adam stepped at steps 1, 3 and 5; the embedding, skipped while tied, took the head's count at the untie (3); the
    # VE gates have no gradient at 4 layers (the only VE layer is the last, which MUDD gates): never stepped
    names = {id(p): n for n, p in staged_run[2].model.named_parameters()}
    adam_names = [names[id(p)] for p in staged_run[2].adam_params]
    expect = [0 if name == "ve_gate_bank" else 3 for name in adam_names]
    assert a["loader"] == b["loader"] and a["adam_t"] == b["adam_t"] == expect
    # fp32 on CPU: the two worlds sum gradients in another order (about 1e-6 after the first Adam step); NorMuon's
    # banks pass through Polar Express in bf16, where such noise flips roundings (2^-8 each): up to 5.9e-3 seen on the
    # banks after 6 steps, 1.4e-2 on the zero-initialised bigram table and 5.3e-3 on the MUDD matrices they feed, more
    # in the tiny gate matrices (the small vocabulary: every embedding row is trained, none stays equal at its init to
    # dilute the difference). A missing reduction or a wrong shard is off by O(1).
    for k, v in a["model"].items():
        assert rel(b["model"][k], v) < (0.3 if "gate" in k else 3e-2), k
    for sd in (a, b):
        assert (sd["model"]["embed.weight"] - sd["model"]["lm_head.weight"]).abs().max() > 1e-6
    # the sharded moments, gathered (the untied embedding's too); their gradients carry the banks' rounding noise
    # (up to 2.5e-2 seen outside the gates, on the second moments of the 8 post lambdas)
    for name, sa, sb in zip(adam_names, a["adam"], b["adam"]):
        for key in ("m", "v"):
            bound = 0.3 if "gate" in name else 0.1
            assert rel(sb[key], sa[key]) < bound if sa[key].norm() > 0 else sb[key].norm() == 0, (name, key)
    va, vb = parse_log(d / "logs/full.txt")[2], parse_log(d / "logs/w2.txt")[2]
    assert [step for step, _ in va] == [step for step, _ in vb] == [6] and abs(va[0][1] - vb[0][1]) < 1e-3, (va, vb)

def test_sparse_bigram_rows_train_as_the_dense_reduce_scatter_bit_for_bit(staged_run, world_2_run):
    # each owner's rows sum its gradient and the other rank's: two addends, one rounding either way, so every
    # checkpoint (weights, NorMuon and Adam state, the gradients pending after an even step) is equal
    d, common = world_2_run, staged_run[1]
    run_on_2_processes(d, [*common, "--checkpoint_every=1", "--run_id=w2_dense", "--sparse_bigram=0"])
    for step in range(1, 7):
        sparse, dense = (flat_state(load_ckpt(d / f"logs/{run}/state_step{step:06d}.pt")) for run in ("w2", "w2_dense"))
        assert sparse.keys() == dense.keys()
        for k in dense:
            assert torch.equal(sparse[k], dense[k]), (step, k)
    assert parse_log(d / "logs/w2.txt")[2] == parse_log(d / "logs/w2_dense.txt")[2]

def test_a_resume_marks_the_pending_bigram_rows_for_the_next_exchange(staged_run):
    # resumed after an even step, rank 0 holds the pending gradients of all ranks: the rows it must send at the next
    # Adam step are their nonzero rows (the rows any rank touched), not only those its next micro-batches touch
    d, common, trainer = staged_run[:3]
    untie = tg.Schedule(tg.parse_args(common)).untie_step
    sd = load_ckpt(d / f"logs/full/state_step{untie:06d}.pt")
    table = trainer.model.bigram_embed.weight
    pending = sd["adam_pending"][next(i for i, p in enumerate(trainer.adam_params) if p is table)]
    resumed = tg.Trainer(tg.parse_args(common), 0, 1, torch.device("cpu"))
    resumed.sparse_rows = tg.SparseRows(resumed.model.bigram_embed.weight, tg.Comm(0, 2))  # rank 0 of 2
    resumed.load_state_dict(sd)
    want = pending.ne(0).any(1).numpy()
    assert np.array_equal(resumed.sparse_rows.touched, want) and 0 < want.sum() < want.size

# the FP8 MLP of an H100 faked on a CPU: the model in bf16 but for the banks (fp32: bf16 banks' gradients, summed in
# bf16 in another order on 2 processes, move the next step's scales by 1%, as much as the slots' scales differ), its
# MLP in FP8 whatever the device
FP8_MLP_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
import train_gpt as tg
class FP8GPT(tg.GPT):
    def __init__(self, h, max_len, dtype):
        super().__init__(h, max_len, torch.bfloat16)
        self.fp8_mlp = True
        for bank in (self.qk_bank, self.vo_bank, self.mlp_bank):
            bank.data = bank.data.float()
tg.GPT = FP8GPT
tg.main(sys.argv[1:])
"""

def test_fp8_activation_scales_are_per_slot_on_1_and_2_processes(tmp_path, gpt_files):
    """The FP8 MLP's activation scales, renewed per slot by whichever rank runs it and gathered from the ranks into
    the checkpoint, are those of one process after each of two steps (the first from the same weights: equal within
    thread-order rounding); the 8 slots' rows differ by more."""
    script = tmp_path / "fp8_mlp.py"
    script.write_text(FP8_MLP_SCRIPT.format(root=os.path.dirname(SCRIPT)))
    flags = [*gpt_files, *SMALL, *NO_PREFIX, "--num_iterations=2", "--num_extension_iterations=0", "--val_tokens=256",
             "--val_loss_every=0", "--save_checkpoint=1", "--checkpoint_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for world in (1, 2):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                            str(script), *flags, f"--run_id=w{world}"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=HANG_S, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    for step in (1, 2):
        a, b = (load_ckpt(tmp_path / f"logs/w{w}/state_step{step:06d}.pt")["model"] for w in (1, 2))
        scales = a["fp8_act_scales"]
        assert rel(b["fp8_act_scales"], scales) < 1e-3 and torch.equal(b["fp8_down_scales"], a["fp8_down_scales"])
        apart = min(rel(scales[i], scales[j]) for i in range(8) for j in range(i))
        assert apart > 1e-2 and not torch.equal(scales, torch.ones_like(scales)), (step, apart)

# a tiktoken plugin: ids 0..511 (the test corpus's tokens) are all single bytes and 256 strings, each extending an
# earlier token by one byte, so that half the corpus tokens have a prefix token
PLUGIN = r'''
import random

def ranks():
    rng, strings = random.Random(0), [bytes([i]) for i in range(256)]
    while len(strings) < 512:
        extended = rng.choice(strings) + bytes([rng.randrange(256)])
        if extended not in strings:
            strings.append(extended)
    return {string: i for i, string in enumerate(strings)}

def stages_tiny():
    return dict(name="stages_tiny", pat_str=r"""\S+|\s+""", mergeable_ranks=ranks(),
                special_tokens={"<|endoftext|>": 50256})

ENCODING_CONSTRUCTORS = {"stages_tiny": stages_tiny}
'''

@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    return write_tiktoken_plugin(tmp_path_factory.mktemp("plugin"), "speedrun_stages_test", PLUGIN)

def plugin_vocab():
    namespace = {}
    exec(PLUGIN, namespace)
    return namespace["ranks"]()

def test_tiny_run_learns_with_the_full_recipe_and_prefix_loss(tmp_path, gpt_files, plugin_dir):
    # 10 steps (stages [0, 3) [3, 6) [6, 9), untie at 7, 1 extension step) of test_gpt.py's wider tiny model
    args = gpt_files + SMALL + ["--model_dim=64", "--prefix_encoding=stages_tiny", "--num_iterations=10",
                                "--num_extension_iterations=1", "--val_loss_every=10", "--run_id=full"]
    r = run_cli(args, tmp_path, env=dict(os.environ, PYTHONPATH=str(plugin_dir)))
    assert r.returncode == 0, r.stderr[-3000:]
    code, env, vals, steps, summary = parse_log(tmp_path / "logs/full.txt")
    assert "prefix_weight='0.25/0.25>0/0'" in env and "mtp_weights='1,0.5,0.25>1,0.5,0/1,0.5>1,0/1'" in env
    assert [step for step, _ in vals] == [0, 10] and len(steps) == 10
    assert vals[0][1] == pytest.approx(math.log(520), abs=0.01)  # the N(0, 0.005) head: near uniform
    assert vals[1][1] < math.log(512) - 0.5, vals  # better than uniform over the corpus's 512 ids (5.40 when written)
    assert summary and float(summary[1]) == vals[-1][1]

def test_prefix_table_is_built_on_the_clock_from_the_encoding(tmp_path, gpt_files, monkeypatch):
    events, trainers, vocab = [], [], plugin_vocab()
    def fake_vocab(h):
        events.append("vocab")
        assert h.prefix_encoding == "stages_tiny"
        return vocab
    real_table, real_clock, real_trainer = tg.prefix_table, tg.Clock, tg.Trainer
    class RecordingClock(real_clock):
        def __init__(self, *a):
            events.append("clock")
            super().__init__(*a)
    class RecordingTrainer(real_trainer):
        def __init__(self, *a):
            super().__init__(*a)
            trainers.append(self)
        def train_step(self, step, loader):
            events.append(f"step{step}")
            return super().train_step(step, loader)
    monkeypatch.setattr(tg, "prefix_vocab", fake_vocab)
    monkeypatch.setattr(tg, "prefix_table", lambda *a: events.append("table") or real_table(*a))
    monkeypatch.setattr(tg, "Clock", RecordingClock)
    monkeypatch.setattr(tg, "Trainer", RecordingTrainer)
    monkeypatch.chdir(tmp_path)
    # one step (of stage 1: round(1 / 3) = 0 steps in stage 0), prefix weight 0.25
    tg.main(gpt_files + SMALL + ["--prefix_encoding=stages_tiny", "--num_iterations=1", "--num_extension_iterations=0",
                                 "--val_tokens=256", "--run_id=table"])
    assert events == ["vocab", "clock", "table", "step0"]
    expect = prefix_brute(vocab, 520)
    assert sum(e >= 0 for e in expect) == 256 and trainers[0].model.prefix_table.tolist() == expect
    # without the prefix loss the encoding is never loaded: staged_run

def test_an_encoding_that_cannot_load_is_refused_first(tmp_path, gpt_files, monkeypatch):
    msg = main_error(gpt_files + SMALL + SHORT + ["--prefix_encoding=no_such_encoding_here"], tmp_path, monkeypatch)
    assert "--prefix_encoding=no_such_encoding_here: tiktoken cannot load it" in msg and "\n" not in msg
    assert os.listdir(tmp_path) == []

# ---------------------------------------------------------------------------------------------- command line

def test_help_shows_the_record_schedule(capsys):
    with pytest.raises(SystemExit) as e:
        tg.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--num_iterations=1285", "--num_extension_iterations=15", "--train_batch_size=131072,262144,393216",
                 "--mtp_weights=1,0.5,0.25>1,0.5,0/1,0.5>1,0/1", "--prefix_weight=0.25/0.25>0/0"):
        assert re.search(rf"^  {re.escape(flag)} ", out, re.M), flag

@pytest.mark.parametrize("flag, words", [
    ("--mtp_weights=1,a", "--mtp_weights=1,a: give per stage"),
    ("--mtp_weights=1/1", "--mtp_weights=1/1: 2 stages, the schedule has 3"),
    ("--prefix_weight=0.1,0.2", "--prefix_weight=0.1,0.2: give one weight per stage"),
    ("--train_batch_size=1024,2048", "--train_batch_size=1024,2048: give one value or one per stage")])
def test_stage_values_that_do_not_fit_are_refused_first(tmp_path, gpt_files, monkeypatch, flag, words):
    assert words in main_error(gpt_files + SMALL + [flag], tmp_path, monkeypatch)
    assert os.listdir(tmp_path) == []

def test_a_bad_stage_value_is_one_line_on_the_command_line(tmp_path):
    r = run_cli(["--mtp_weights=1,a"], tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("train_gpt.py: error: --mtp_weights=1,a: give per stage") and os.listdir(tmp_path) == []
