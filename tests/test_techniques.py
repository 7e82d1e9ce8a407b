"""train_gpt.py technique switches (issue 6): LR schedule family, weight-decay modes, weight EMA, checkpoint averaging,
weight norms. Each against formulas or a slow reference written here; tiny real runs on CPU."""
import math
import os
import pytest
import torch

import train_gpt as tg
from tests.gptdata import SMALL_VOCAB
from tests.test_gpt import parse_log, rel, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# narrower than test_gpt's TINY, in the small vocabulary of the gpt_files corpus; no prefix loss (tiktoken is offline
# here)
SMALL = SMALL_VOCAB + ["--prefix_weight=0", "--bigram_vocab_size=1024", "--num_layers=4", "--model_dim=16",
                       "--num_heads=2", "--train_batch_size=1024", "--train_max_seq_len=128", "--val_tokens=1000",
                       "--val_seq_len=1024", "--compile=0", "--kernel_warmup_steps=0"]

# ---------------------------------------------------------------------------------------------- LR schedules

def schedule_ref(kind, s, S=1000, W=100, f=0.1, c=0.5, warmup_type="log"):
    """Each schedule's formula written out, one branch per schedule (wsd: record #89's cooldown from the stage
    multiplier 1)."""
    if kind == "wsd":
        start = int(S * (1 - c))
        t = 0.0 if s < start else min(1.0, (s - start) / (S - start))
        return ((1 - t) + f * t) * (min(1.0, (s + 1) / W) if W > 0 else 1.0)
    if kind == "cosine":
        return (s + 1) / W if s < W else f + (1 - f) * (1 + math.cos(math.pi * min(1.0, (s - W) / (S - W)))) / 2
    if kind == "noam":
        return max(f, math.sqrt(W) * min(1 / math.sqrt(s + 1), (s + 1) / W ** 1.5))
    if kind in ("warmup", "warmup_decay"):
        if s < W:
            return f + (1 - f) * (math.log(s + 1) / math.log(W) if warmup_type == "log" else s / W)
        return 1.0 if kind == "warmup" else f + (1 - f) * max(0.0, (S - s) / max(1, S - W))
    assert kind == "constant"
    return 1.0

# hand values at S = 1000 scheduled steps (+40 extension), W = 100, f = 0.1, c = 0.5
HAND = {("wsd", 0): 0.01, ("wsd", 99): 1.0, ("wsd", 499): 1.0, ("wsd", 500): 1.0, ("wsd", 750): 0.55,
        ("wsd", 1000): 0.1, ("wsd", 1039): 0.1,
        ("cosine", 0): 0.01, ("cosine", 99): 1.0, ("cosine", 100): 1.0, ("cosine", 550): 0.55,
        ("cosine", 1000): 0.1, ("cosine", 1039): 0.1, ("noam", 0): 0.1, ("noam", 99): 1.0, ("noam", 399): 0.5,
        ("warmup", 0): 0.1, ("warmup", 9): 0.55, ("warmup", 99): 1.0, ("warmup", 100): 1.0, ("warmup", 1039): 1.0,
        ("warmup_decay", 0): 0.1, ("warmup_decay", 100): 1.0, ("warmup_decay", 550): 0.55, ("warmup_decay", 1000): 0.1,
        ("warmup_decay", 1039): 0.1, ("constant", 0): 1.0, ("constant", 1039): 1.0}

@pytest.mark.parametrize("kind", tg.LR_SCHEDULES)
@pytest.mark.parametrize("warmup_type", ["log", "linear"])
def test_lr_schedule_at_boundaries(kind, warmup_type):
    h = tg.parse_args([f"--lr_schedule={kind}", "--num_iterations=1040", "--num_extension_iterations=40",
                       "--warmup_steps=100", f"--warmup_type={warmup_type}", "--cooldown_frac=0.5",
                       "--min_lr_frac=0.1"])
    tg.validate(h, 1)
    for s in [0, 1, 2, 9, 50, 98, 99, 100, 101, 399, 499, 500, 501, 550, 750, 999, 1000, 1001, 1039]:
        assert tg.lr_schedule(s, h) == pytest.approx(schedule_ref(kind, s, warmup_type=warmup_type), abs=1e-12), s
        if (kind, s) in HAND and (warmup_type == "log" or "warmup" not in kind or s >= 100):
            assert tg.lr_schedule(s, h) == pytest.approx(HAND[kind, s], abs=1e-9), s
    if warmup_type == "linear" and "warmup" in kind:
        assert [tg.lr_schedule(s, h) for s in (0, 50, 99)] == pytest.approx([0.1, 0.55, 0.991])
    h.warmup_steps = 0  # the record (and cosine) without warmup
    if kind in ("wsd", "cosine"):
        for s in [0, 499, 500, 501, 999, 1000, 1039]:
            assert tg.lr_schedule(s, h) == pytest.approx(schedule_ref(kind, s, W=0), abs=1e-12), s

def test_record_schedule_is_the_default():
    h = tg.Hyperparameters()
    assert (h.lr_schedule, h.wd_mode, h.wd_schedule, h.ema_decay, h.average_last) == ("wsd", "cautious", "lr", 0.0, 0)
    for s in [0, 507, 508, 509, 1000, 1269, 1270, 1284]:
        assert tg.lr_schedule(s, h) == pytest.approx(schedule_ref("wsd", s, S=1270, W=0, f=0.15, c=0.6), abs=1e-12)
    assert tg.lr_schedule(1000, h, stage_lr=1.73) == pytest.approx(1.73 * (1 - 492 / 762) + 0.15 * 492 / 762)

# ---------------------------------------------------------------------------------------------- bad flags

@pytest.mark.parametrize("args,expect", [
    (["--lr_schedule=linear"], "--lr_schedule=linear"),
    (["--lr_schedule=noam"], "--warmup_steps >= 1"),
    (["--lr_schedule=warmup", "--warmup_steps=1"], "--warmup_steps >= 2"),
    (["--lr_schedule=warmup_decay", "--warmup_type=linear"], "--warmup_steps >= 1"),
    (["--lr_schedule=cosine", "--warmup_steps=1270"], "must be below the 1270 scheduled steps"),
    (["--warmup_steps=-1"], "--warmup_steps=-1 must be >= 0"),
    (["--warmup_type=cos"], "--warmup_type=cos"),
    (["--wd_mode=adamw"], "--wd_mode=adamw"),
    (["--wd_schedule=cosine"], "--wd_schedule=cosine"),
    (["--ema_decay=1"], "--ema_decay"),
    (["--average_last=3"], "--average_last needs --checkpoint_every"),
    (["--average_last=-1", "--checkpoint_every=5"], "must be >= 0")])
def test_bad_values_are_one_line_errors(args, expect):
    with pytest.raises(tg.UserError) as e:
        tg.validate(tg.parse_args(args), 1)
    assert expect in str(e.value) and "\n" not in str(e.value)

def test_bad_value_on_the_command_line(tmp_path):
    r = run_cli(["--average_last=3"], tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--average_last needs --checkpoint_every" in lines[0], r.stderr

# ---------------------------------------------------------------------------------------------- weight decay modes

MODES = ["cautious", "decoupled", "l2", "none"]

def normuon_first_step_ref(p, g, lr, lam, mode, mu, beta2, lr_muls):
    """One NorMuon step from zero state in fp64 on a bank [n, rows, cols], identity orthogonalization; the decay per
    mode."""
    p, g = p.double(), g.double()
    if mode == "l2":
        g = g + lam * p  # L2: the gradient of lam/2 |p|^2 joins the loss gradient
    u = (1 - mu) * g + mu * ((1 - mu) * g)  # Nesterov with the momentum after its first update
    rows, cols = p.shape[-2:]
    outs = []
    for o in u:
        # one statistic per row if the matrix is tall or square, else one per column
        stat = (o ** 2).mean(dim=1, keepdim=True) if rows >= cols else (o ** 2).mean(dim=0, keepdim=True)
        o2 = o / ((1 - beta2) * stat).sqrt()
        outs.append(o2 * o.norm() / o2.norm())
    upd = torch.stack(outs)
    mask = {"cautious": (upd * p >= 0).double(), "decoupled": torch.ones_like(p), "l2": torch.zeros_like(p),
            "none": torch.zeros_like(p)}[mode]
    lr_mul = torch.tensor(lr_muls, dtype=torch.float64).view(-1, 1, 1)  # per matrix, times sqrt(rows / cols) if tall
    return p - lr * max(1, rows / cols) ** 0.5 * lr_mul * (upd + lam * mask * p)

# wd_mult None: decay on the LR schedule (lambda = wd * lr_t); 1.0: at the peak lr
@pytest.mark.parametrize("wd_mult", [None, 1.0])
def test_normuon_decay_modes_against_reference(wd_mult):
    torch.manual_seed(3)
    banks = [((4, 8, 8), [1.0, 1.0, 2.0, 2.0]), ((2, 32, 8), [1.0, 2.0]), ((1, 2, 12), [1.0]), ((1, 24, 12), [1.0])]
    p0 = [torch.randn(shape) for shape, _ in banks]
    grads = [torch.randn(shape) * 0.5 for shape, _ in banks]
    base, lr_mult, wd = 0.05, 0.4, 3.0
    lam = base * (lr_mult if wd_mult is None else wd_mult) * wd
    refs = {}
    for mode in MODES:
        params = []
        for p, g in zip(p0, grads):
            q = torch.nn.Parameter(p.clone())
            q.grad = g.clone()
            params.append(q)
        opt = tg.NorMuon([(q, muls) for q, (_, muls) in zip(params, banks)], tg.Comm(0, 1), lr=base, beta2=0.95,
                         weight_decay=wd, ortho=lambda U: U.float(), wd_mode=mode)
        opt.step(lr_mult, 0.9, wd_mult)
        refs[mode] = []
        for q, p, g, (shape, muls) in zip(params, p0, grads, banks):
            ref = normuon_first_step_ref(p, g, base * lr_mult, lam, mode, 0.9, 0.95, muls)
            assert rel(q.detach() - p, ref - p.double()) < 1e-4, (mode, shape)  # fp32 rounding of p
            refs[mode].append(ref)
    for a, b in [("cautious", "decoupled"), ("decoupled", "none"), ("l2", "none"), ("cautious", "none")]:
        # the test can tell them apart
        assert min(rel(x - p.double(), y - p.double()) for x, y, p in zip(refs[a], refs[b], p0)) > 1e-2, (a, b)

def adam_first_step_ref(p, g, lr, lam, mode, b1=0.65, b2=0.95, eps=1e-8):
    p, g = p.double(), g.double()
    if mode == "l2":
        g = g + lam * p
    # t = 1, bias-corrected
    upd = lr * ((1 - b1) * g / (1 - b1)) / (((1 - b2) * g ** 2 / (1 - b2)).sqrt() + eps / math.sqrt(1 - b2))
    mask = {"cautious": (upd * p > 0).double(), "decoupled": torch.ones_like(p), "l2": torch.zeros_like(p),
            "none": torch.zeros_like(p)}[mode]
    return p * (1 - lam * mask) - upd

@pytest.mark.parametrize("wd_mult", [None, 1.0])
def test_adam_decay_modes_against_reference(wd_mult):
    torch.manual_seed(4)
    p0, g = torch.randn(16, 8), torch.randn(16, 8) * 0.03
    base, lr_mult, mul, wd, wd_mul = 0.01, 0.5, 5.0, 2.0, 150.0
    lam = (base * mul * (lr_mult if wd_mult is None else wd_mult)) ** 2 * wd * wd_mul  # record #89: (lr lr_mul)^2 wd
    refs = {}
    for mode in MODES:
        q = torch.nn.Parameter(p0.clone())
        q.grad = g.clone()
        opt = tg.DistAdam([(q, (0.65, 0.95), mul, wd_mul)], tg.Comm(0, 1), lr=base, eps=1e-8, weight_decay=wd,
                          wd_mode=mode)
        opt.step(lr_mult, wd_mult)
        refs[mode] = adam_first_step_ref(p0, g, base * mul * lr_mult, lam, mode)
        assert rel(q.detach() - p0, refs[mode] - p0.double()) < 1e-5, mode  # fp32 moments, as the record
    for a, b in [("cautious", "decoupled"), ("decoupled", "none"), ("l2", "none"), ("cautious", "none")]:
        assert rel(refs[a] - p0.double(), refs[b] - p0.double()) > 0.1, (a, b)

def test_trainer_passes_the_decay_schedule(gpt_files, monkeypatch):
    h = tg.parse_args(gpt_files + SMALL + ["--num_iterations=4", "--num_extension_iterations=1"])
    trainer = tg.Trainer(h, 0, 1, torch.device("cpu"))
    assert trainer.muon.wd_mode == trainer.adam.wd_mode == "cautious"
    calls = []
    monkeypatch.setattr(trainer.muon, "finish", lambda lr, mom, wd: calls.append(("muon", lr, wd)))
    monkeypatch.setattr(trainer.adam, "finish", lambda lr, wd: calls.append(("adam", lr, wd)))
    loader = tg.TrainLoader(h, 0, 1, torch.device("cpu"))
    trainer.train_step(3, loader)  # an odd step: Adam steps too
    h.wd_schedule = "constant"
    trainer.train_step(3, loader)
    lr = trainer.schedule.at(3).lr
    assert lr < 1 and calls == [("muon", lr, lr), ("adam", lr, lr), ("muon", lr, 1.0), ("adam", lr, 1.0)]

def test_every_reduction_is_launched_before_any_update_work(gpt_files):
    """An Adam (odd) step as the record orders its communication: the banks' reduce-scatters and every Adam
    parameter's reduction are launched before Polar Express or Adam's update run, so on several GPUs the update
    work overlaps the reductions still in flight. Seen through the trainer's Comm and the two update functions."""
    h = tg.parse_args(gpt_files + SMALL + ["--num_iterations=4", "--num_extension_iterations=1"])
    trainer = tg.Trainer(h, 0, 1, torch.device("cpu"))
    events, comm = [], trainer.comm
    def spy(name, real):
        return lambda *args: events.append(name) or real(*args)
    comm.reduce_scatter = spy("reduce", comm.reduce_scatter)
    comm.all_reduce = spy("reduce", comm.all_reduce)
    comm.all_gather = spy("gather", comm.all_gather)
    trainer.muon.ortho = spy("polar express", trainer.muon.ortho)
    real_update, updated = trainer.adam.update, []
    def update(grads, *rest):
        events.append("adam update")
        updated.append(len(grads))
        return real_update(grads, *rest)
    trainer.adam.update = update
    trainer.train_step(3, tg.TrainLoader(h, 0, 1, torch.device("cpu")))
    first_work = min(events.index("polar express"), events.index("adam update"))
    # the 3 banks' reductions, then one per Adam parameter that the update got (the tied embedding is skipped)
    assert events[:first_work] == ["reduce"] * (len(trainer.muon.groups) + updated[0]), events
    assert updated[0] > 10 and "reduce" not in events[first_work:]


# ---------------------------------------------------------------------------------------------- EMA and averaging

def test_ema_and_average_hand_values(gpt_files):
    h = tg.parse_args(gpt_files + SMALL + ["--num_iterations=4", "--num_extension_iterations=1", "--ema_decay=0.9",
                                        "--average_last=2", "--checkpoint_every=2"])
    trainer = tg.Trainer(h, 0, 1, torch.device("cpu"))
    params = list(trainer.model.parameters())
    assert all(torch.equal(e, p) for e, p in zip(trainer.ema, params))  # the shadow starts at the weights
    def fill(v):
        with torch.no_grad():
            for p in params:
                p.fill_(v)
    for e in trainer.ema:
        e.fill_(1.0)
    fill(2.0)
    trainer.update_ema(0)   # decay min(0.9, 1/10) = 0.1: 0.1 * 1 + 0.9 * 2
    assert all(torch.allclose(e, torch.full_like(e, 1.9)) for e in trainer.ema)
    fill(4.0)
    trainer.update_ema(1)   # decay 2/11
    assert all(torch.allclose(e, torch.full_like(e, (2 * 1.9 + 9 * 4) / 11)) for e in trainer.ema)
    fill(0.0)
    trainer.update_ema(500)  # decay 0.9 (501/510 > 0.9)
    assert all(torch.allclose(e, torch.full_like(e, 0.9 * (2 * 1.9 + 9 * 4) / 11)) for e in trainer.ema)
    h.ema_warmup = False
    for e in trainer.ema:
        e.fill_(1.0)
    fill(2.0)
    trainer.update_ema(0)   # decay 0.9 from the start
    assert all(torch.allclose(e, torch.full_like(e, 1.1)) for e in trainer.ema)
    # averaging: the last 2 snapshots, copies in host memory, uniform mean
    for step, v in [(2, 1.0), (4, 3.0), (6, 8.0)]:
        fill(v)
        trainer.snapshot(step)
    fill(-1.0)
    assert [s for s, _ in trainer.snapshots] == [4, 6]
    assert all(torch.equal(a, torch.full_like(a, 5.5)) for a in trainer.average())
    # checkpoint: shadow and snapshots travel with the state; a checkpoint without a shadow starts it from its weights
    sd = trainer.state_dict()
    other = tg.Trainer(h, 0, 1, torch.device("cpu"))
    other.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(other.ema, trainer.ema)) and [s for s, _ in other.snapshots] == [4, 6]
    other.load_state_dict(dict(sd, ema=None))
    assert all(torch.equal(e, torch.full_like(e, -1.0)) for e in other.ema)

def test_evaluating_other_weights_restores_the_live_ones(gpt_files):
    h = tg.parse_args(gpt_files + SMALL)
    trainer, val = tg.Trainer(h, 0, 1, torch.device("cpu")), tg.load_val(h)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    live, live_loss = [p.detach().clone() for p in trainer.model.parameters()], trainer.evaluate(0, val)
    other = [p + torch.randn_like(p) * 0.05 for p in live]
    loss = trainer.evaluate_weights(0, val, other)
    assert (all(same_bits(p.detach(), q) for p, q in zip(trainer.model.parameters(), live))
            and trainer.evaluate(0, val) == live_loss)
    with torch.no_grad():
        for p, w in zip(trainer.model.parameters(), other):
            p.copy_(w)
    assert loss == trainer.evaluate(0, val) and abs(loss - live_loss) > 1e-3

# ---------------------------------------------------------------------------------------------- tiny runs

def same_bits(a, b):
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))  # 0-d too

def group_of(name):  # the wnorm groups, by hand: the banks of attention and MLP matrices, each table, the head
    tables = {"qk_bank": "attn", "vo_bank": "attn", "mlp_bank": "mlp", "embed.weight": "embed",
              "value_embeds": "value_embed", "bigram_embed.weight": "bigram", "lm_head.weight": "head"}
    return tables.get(name, "scalars")  # lambdas, gates, MUDD weights

def test_tiny_run_logs_ema_average_and_weight_norms(tmp_path, gpt_files):
    args = gpt_files + SMALL + ["--num_iterations=4", "--num_extension_iterations=1", "--val_loss_every=2",
                                "--lr_schedule=cosine", "--warmup_steps=2", "--wd_mode=decoupled", "--ema_decay=0.9",
                                "--average_last=3", "--checkpoint_every=1", "--save_checkpoint=1",
                                "--kernel_warmup_steps=2"]
    r = run_cli(args + ["--run_id=tech"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    body = open(tmp_path / "logs/tech.txt").read().split("=" * 100 + "\n")[2]
    lines = [l for l in body.splitlines() if " val_loss:" in l and l.startswith("step:")]
    fields = [dict(kv.split(":", 1) for kv in l.split()[1:]) for l in lines]
    assert [l.split()[0] for l in lines] == ["step:0/4", "step:2/4", "step:4/4"]
    groups = ["attn", "mlp", "embed", "value_embed", "bigram", "head", "scalars"]
    for f in fields:  # extra fields come after the standard ones (train_loss: from the second validation on)
        first = ["val_loss", "train_time", "step_avg"] + ([] if f is fields[0] else ["train_loss"]) + ["ema_val_loss"]
        assert list(f)[:len(first)] == first
        rest = (["avg_val_loss"] if f is fields[-1] else []) + ["wnorm"] + [f"wnorm_{g}" for g in groups]
        assert list(f)[len(first):] == rest
    assert fields[0]["ema_val_loss"] == fields[0]["val_loss"]  # the shadow starts at the weights
    assert "checkpoint average: logs/tech/average_step000004.pt (steps 2,3,4)" in body
    # hand-computed EMA and average from the saved per-step weights and the initial weights (same seed)
    h = tg.parse_args(args)
    trainer = tg.Trainer(h, 0, 1, torch.device("cpu"))
    names = [n for n, _ in trainer.model.named_parameters()]
    w = {0: {n: p.detach().double().clone() for n, p in trainer.model.named_parameters()}}
    for s in range(1, 5):
        w[s] = {n: v.double() for n, v in
                torch.load(tmp_path / f"logs/tech/state_step{s:06d}.pt", weights_only=False)["model"].items()}
    shadow = dict(w[0])
    for t in range(4):
        d = min(0.9, (1 + t) / (10 + t))
        shadow = {n: d * shadow[n] + (1 - d) * w[t + 1][n] for n in names}
    final = torch.load(tmp_path / "logs/tech/state_step000004.pt", weights_only=False)
    for n, e in zip(names, final["ema"]):
        assert torch.allclose(e.double(), shadow[n], rtol=1e-5, atol=1e-6), n
    avg = torch.load(tmp_path / "logs/tech/average_step000004.pt", weights_only=False)
    assert avg["steps"] == [2, 3, 4] and [s for s, _ in final["snapshots"]] == [2, 3, 4]
    for n in names:
        assert torch.allclose(avg["model"][n].double(), (w[2][n] + w[3][n] + w[4][n]) / 3, rtol=1e-6, atol=1e-7), n
    # the logged losses and norms of the final line, recomputed from those weights
    for s in range(4):
        trainer.model.rotary.set_window(trainer.schedule.at(s).windows[1])  # YaRN state after training
    val = tg.load_val(h)
    for key, weights in [("val_loss", w[4]), ("ema_val_loss", shadow), ("avg_val_loss", avg["model"])]:
        loss = trainer.evaluate_weights(4, val, [weights[n].float() for n in names])
        assert abs(loss - float(fields[-1][key])) < 6e-5, key
    assert {group_of(n) for n in names} == set(groups)  # each group holds parameters
    sq = {g: sum(float((w[4][n] ** 2).sum()) for n in names if group_of(n) == g) for g in groups}
    assert float(fields[-1]["wnorm"]) == pytest.approx(math.sqrt(sum(sq.values())), abs=6e-3)
    for g in groups:
        assert float(fields[-1][f"wnorm_{g}"]) == pytest.approx(math.sqrt(sq[g]), abs=6e-3), g

def test_readme_snapshot_memory_is_the_record_models():
    """The README's --average_last figure, from the record model's parameters counted on the meta device."""
    with torch.device("meta"):
        model = tg.GPT(tg.Hyperparameters(), 1, torch.bfloat16)
    counts = {dtype: sum(p.numel() for p in model.parameters() if p.dtype == dtype)
              for dtype in (torch.bfloat16, torch.float32)}
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())  # no third dtype
    bf16, fp32 = counts[torch.bfloat16], counts[torch.float32]
    snapshot = 2 * bf16 + 4 * fp32
    readme = " ".join(open(os.path.join(ROOT, "README.md")).read().split())
    assert (f"record model's {sum(counts.values()) / 1e6:.1f} M parameters are bf16 on a GPU (2 bytes; the {fp32} "
            f"scalars and lambdas fp32), {snapshot / 1e9:.2f} GB, so 8 snapshots take about "
            f"{8 * snapshot / 1e9:.1f} GB of host memory on every rank ({8 * 8 * snapshot / 1e9:.0f} GB on an 8-GPU "
            "machine)") in readme

@pytest.mark.parametrize("mode", ["l2", "none"])  # cautious and decoupled run in the tests above
def test_every_decay_mode_runs(tmp_path, gpt_files, mode, monkeypatch):
    monkeypatch.chdir(tmp_path)  # in-process main(): the command line itself is exercised by the runs above
    tg.main(gpt_files + SMALL + ["--num_iterations=2", "--num_extension_iterations=1", f"--wd_mode={mode}",
                                 "--wd_schedule=constant", "--adam_weight_decay=0.01", "--run_id=m"])
    vals = parse_log(tmp_path / "logs/m.txt")[2]
    assert [s for s, _ in vals] == [0, 2] and math.isfinite(vals[-1][1]) and vals[-1][1] < vals[0][1]
