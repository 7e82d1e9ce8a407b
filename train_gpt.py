# GPT-2-small-class speedrun trainer: FineWeb val loss <= 3.28 on 8xH100.
# Recipe: modded-nanogpt record #89's algorithm: its 11-layer model (paired heads, key offset, XSA, MUDD gates, DC
# attention, 5 value embeddings, bigram hash embedding) and its training (1285 steps in three stages of 131k/262k/393k
# tokens, multi-token and prefix-token losses, tied-then-untied head); see README.
# Launch: torchrun --standalone --nproc_per_node=8 train_gpt.py [--name=value ...]   (1, 2, 4 or 8 GPUs: same math)
import contextlib, copy, dataclasses, glob, inspect, math, os, re, shlex, signal, subprocess, sys, threading, time, uuid
import warnings
from dataclasses import dataclass
from typing import NamedTuple
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

@dataclass
class Hyperparameters:
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"  # glob pattern, read in sorted order
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"  # glob pattern; the first val_tokens + 1 tokens are used
    val_tokens: int = 10485760          # validation covers exactly this many target tokens
    val_seq_len: int = 262144           # tokens per validation forward (per rank), as the record
    val_head_chunk: int = 8192          # tokens per lm_head+loss chunk at evaluation (bounds logits memory)
    # training stages: the scheduled steps split into len(ws_schedule) equal stages at round(k * S / n); each
    # per-stage value below is one number a stage or one number for all; the extension steps use the last stage's
    train_batch_size: tuple = (131072, 262144, 393216)  # global tokens per step, split into 8 slots (ranks x accum)
    train_max_seq_len: tuple = (896, 2048, 2048)  # longest document piece; longer documents are cut
    ws_schedule: tuple = (3, 7, 11)     # long attention window (128-token blocks) per stage; the short one is half
    stage_lr: tuple = (1.0, 1.52, 1.73)  # LR multiplier per stage (the record ties it to the batch size)
    mtp_weights: str = "1,0.5,0.25>1,0.5,0/1,0.5>1,0/1"  # loss weights of the t+1, t+2, ... predictions per stage
    #                                     ('/' between stages; 'a>b': linear from a to b over the stage)
    prefix_weight: str = "0.25/0.25>0/0"  # weight of the prefix-token loss per stage (same form); 0 = off
    prefix_encoding: str = "gpt2"       # tiktoken encoding whose byte tokens give the prefix-token table
    mtp_across_docs: bool = True        # t+2, t+3 predictions may cross a document end, as the record (0: masked)
    untie_stage: int = 2                # embedding untied from the head at this stage's first odd step
    #                                     (>= number of stages: never)
    repeat_data: bool = False           # cycle the train files when they run out (else stop with an error)
    num_iterations: int = 1285          # total steps, extension included
    num_extension_iterations: int = 15  # final steps at the floor LR with the extension window
    cooldown_frac: float = 0.6          # fraction of the scheduled steps spent in the linear LR cooldown
    min_lr_frac: float = 0.15           # LR multiplier at the end of the cooldown
    warmup_steps: int = 0               # LR warmup steps
    lr_schedule: str = "wsd"            # wsd: the record (stage_lr, cooldown from it to min_lr_frac) | cosine | noam |
    #                                     warmup | warmup_decay | constant: these times stage_lr, in place of wsd's
    #                                     cooldown
    warmup_type: str = "log"            # warmup of the warmup and warmup_decay schedules: log or linear (DeepSpeed)
    val_loss_every: int = 250           # steps between validations; 0 = only at the end
    vocab_size: int = 50304             # embedding and head rows (GPT-2's 50257 padded to a multiple of 128)
    bos_id: int = 50256                 # the token every document starts with (GPT-2's <|endoftext|>): the loader's
    #                                     slots, the attention's document masks and the MTP document ends split at it
    model_dim: int = 768                # residual stream width
    num_layers: int = 11                # layers: the record's 11, or 2 to 10 of them spread evenly (README)
    num_heads: int = 6                  # attention heads of model_dim / num_heads dimensions (an even number)
    dc_window: int = 112                # tokens the last layer's dynamically composable attention looks back over
    bigram_vocab_size: int = 377280     # bigram hash embedding rows (50304 * 15 // 2); 0 = none
    bigram_sign_rows: int = 8192        # rows of the fixed +-1 sign table of the bigram embedding
    sparse_bigram: bool = True          # on 2+ ranks, the bigram gradient's rows used (record #71), not the table
    ws_extension: int = 13              # long window in the extension steps
    ws_validate: int = 20               # long window at the final validation (no YaRN update)
    lr: float = 0.023                   # NorMuon learning rate (attention and MLP matrices)
    momentum: float = 0.95              # NorMuon momentum after the warmup and before the cooldown
    momentum_min: float = 0.85          # NorMuon momentum at step 0 and at the last step
    momentum_warmup_steps: int = 300    # linear momentum_min -> momentum over these first steps
    momentum_cooldown_steps: int = 50   # linear momentum -> momentum_min over these last steps
    beta2: float = 0.9                  # NorMuon second-moment decay
    weight_decay: float = 1.2           # NorMuon, cautious, on the LR schedule: lambda_t = lr_t * weight_decay
    wd_mode: str = "cautious"           # NorMuon and Adam: cautious (the record) | decoupled | l2 | none
    wd_schedule: str = "lr"             # lr: decay follows lr_t (the record) | constant: it follows the peak lr
    adam_lr: float = 0.008              # Adam (embeddings, head, bigram, scalars, gates), times ADAM_PARAMS' lr_mul
    adam_eps: float = 1e-10             # added to Adam's sqrt(v), outside the square root
    adam_weight_decay: float = 0.005    # Adam decay lambda_t = (adam_lr_t * lr_mul)^2 * this * ADAM_PARAMS' wd_mul
    kernel_warmup_steps: int = 30       # untimed steps that compile and warm kernels; state is restored after
    val_fp32_softcap: bool = False      # validation softcap on fp32 logits; default: on the head's bf16 logits, then
    #                                     fp32 for the cross-entropy, as the record (its 3.28 is measured so)
    compile: bool = True                # torch.compile the model and Polar Express
    fp8_mlp: bool = True                # the MLP projections' forwards in FP8 where the head is FP8 (#84, #89)
    seed: int = 0                       # of the initial weights (the data order is fixed)
    run_id: str = ""                    # the log is logs/<run_id>.txt (a plain file name); default: a fresh uuid4
    preset: str = ""                    # named set of defaults from PRESETS (cpu: the README's smoke run); flags win
    save_checkpoint: bool = False       # save logs/<run_id>/state_step*.pt at the end (and every checkpoint_every)
    checkpoint_every: int = 0           # steps between checkpoints and --average_last snapshots; 0 = none
    resume: str = ""                    # a state_step*.pt to continue from, saved with the same hyperparameters
    ema_decay: float = 0.0              # weight EMA, evaluated at every validation (ema_val_loss); 0 = off
    ema_warmup: bool = True             # EMA decay min(ema_decay, (1+t)/(10+t)) (TensorFlow/OpenNMT), else ema_decay
    average_last: int = 0               # average of the last K snapshots (one every checkpoint_every): avg_val_loss
    run_evals: bool = False             # after the clock stops: HellaSwag on the final weights (evals/hellaswag.py)
    hellaswag_data: str = ""            # its items: a hellaswag_val.jsonl; "": data/hellaswag/'s, from the Hub first
    eval_encoding: str = "gpt2"         # the tiktoken encoding of the data's tokens, for HellaSwag's text

BLOCK = 128  # FlexAttention's block: windows count in blocks of 128 tokens
MAGIC, VERSION = 20240520, 1

class UserError(Exception):
    """A mistake in the flags or the files: main prints its one line and exits."""

# cpu: a 4-layer, 64-wide model on data/synthetic.py's toy language, 1,024 tokens a step, eager, no tiktoken download
# (no prefix loss): the README's CPU smoke run, a few minutes on 2 cores. Not a record size: it shows the script works.
PRESETS = {"cpu": dict(train_files="data/synthetic_gpt/fineweb_train_*.bin",
                       val_files="data/synthetic_gpt/fineweb_val_*.bin", val_tokens=8192, val_seq_len=8192,
                       val_head_chunk=1024,
                       train_batch_size=(1024,), train_max_seq_len=(128,), ws_schedule=(1,), stage_lr=(1.0,),
                       mtp_weights="1,0.5,0.25>1,0.5,0", prefix_weight="0", untie_stage=1, num_iterations=60,
                       num_extension_iterations=2, ws_extension=1, ws_validate=1, val_loss_every=10, num_layers=4,
                       model_dim=64, num_heads=2, bigram_vocab_size=1024, momentum_warmup_steps=20,
                       momentum_cooldown_steps=5, kernel_warmup_steps=0, compile=False)}

def flag_value(v):
    """A value as the parser reads it back: tuples as 3,7,11."""
    return ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

def parse_args(argv, cls=Hyperparameters):
    h, fields = cls(), {f.name for f in dataclasses.fields(cls)}
    if any(a in ("-h", "--help") for a in argv):  # the fields in source order, with their comments
        flags = {k: f"--{k}={flag_value(v)}" for k, v in dataclasses.asdict(h).items()}
        width, lines = max(map(len, flags.values())), []
        for line in inspect.getsource(cls).splitlines()[2:]:
            field, more = re.match(r" +(\w+): \w+ = .*?# (.*)$", line), re.match(r" +#\s{2,}(.*)$", line)
            if field:
                lines.append(f"  {flags[field[1]]:<{width}}  {field[2]}")
            elif more and lines:
                lines[-1] += " " + more[1]
            elif line.strip().startswith("#"):
                lines.append("  " + line.strip())
        print("usage: train_gpt.py [--name=value | --name value ...]\n" + "\n".join(lines))
        sys.exit(0)
    i, given = 0, set()
    while i < len(argv):
        a = argv[i]
        i += 1
        name, eq, val = a[2:].partition("=")
        if not a.startswith("--") or name not in fields:
            raise UserError(f"unknown argument {a!r} (see --help for the hyperparameters)")
        if not eq:
            if i == len(argv):
                raise UserError(f"--{name} needs a value")
            val = argv[i]
            i += 1
        default = getattr(h, name)
        try:
            if isinstance(default, bool):
                if val.lower() not in ("0", "1", "true", "false"):
                    raise ValueError
                val = val.lower() in ("1", "true")
            elif isinstance(default, tuple):
                val = tuple(type(default[0])(v) for v in val.split(","))
            else:
                val = type(default)(val)
        except ValueError:
            kind = type(default).__name__
            if isinstance(default, tuple):
                kind = f"comma-separated {type(default[0]).__name__}s"
            raise UserError(f"--{name}={val}: expected {kind} like {flag_value(default)}") from None
        setattr(h, name, val)
        given.add(name)
    if h.preset and h.preset not in PRESETS:
        raise UserError(f"--preset={h.preset}: unknown; the presets are {', '.join(PRESETS)}")
    for name, val in PRESETS.get(h.preset, {}).items():  # the preset's defaults under the flags given
        if name not in given:
            setattr(h, name, val)
    return h

# ----------------------------------------------------------------------------------------------------
# Schedules (step is the 0-based optimizer step)

LR_SCHEDULES = ("wsd", "cosine", "noam", "warmup", "warmup_decay", "constant")

def lr_schedule(step, h, stage_lr=1.0):
    """Multiplier of every group's base lr: S scheduled steps, W warmup steps, floor f; stage_lr is
    the step's stage multiplier."""
    S = h.num_iterations - h.num_extension_iterations
    s, W, f = step, h.warmup_steps, h.min_lr_frac
    warm = min(1.0, (step + 1) / W) if W > 0 else 1.0
    if h.lr_schedule == "cosine":
        m = (s + 1) / W if s < W else f + (1 - f) * 0.5 * (1 + math.cos(math.pi * min(1, (s - W) / (S - W))))
    elif h.lr_schedule == "noam":
        m = max(f, W ** 0.5 * min((s + 1) ** -0.5, (s + 1) * W ** -1.5))
    elif h.lr_schedule == "constant":
        m = 1.0
    elif h.lr_schedule in ("warmup", "warmup_decay"):  # DeepSpeed WarmupLR / WarmupDecayLR
        if s < W:
            m = f + (1 - f) * (math.log(s + 1) / math.log(W) if h.warmup_type == "log" else s / W)
        else:
            m = 1.0 if h.lr_schedule == "warmup" else f + (1 - f) * max(0, (S - s) / max(1, S - W))
    else:  # wsd, the record: the stage's multiplier, then linearly to f (absolute) over the cooldown
        start = int(S * (1 - h.cooldown_frac))
        t = min(1.0, (step - start) / max(1, S - start)) if step >= start else 0.0
        return (stage_lr * (1 - t) + f * t) * warm
    return stage_lr * m

def muon_momentum(step, h):
    """momentum_min -> momentum over the warmup, back to momentum_min over the last momentum_cooldown_steps; as the
    record, the warmup takes precedence where the two overlap (a run shorter than both)."""
    low, high, start = h.momentum_min, h.momentum, h.num_iterations - h.momentum_cooldown_steps
    if step < h.momentum_warmup_steps:
        return low + (high - low) * step / h.momentum_warmup_steps
    if step > start:
        return high - (high - low) * (step - start) / h.momentum_cooldown_steps
    return high

def stage_weights(spec, n, flag):
    """'1,0.5>1,0/1' -> per stage (start weights, end weights); one stage given = every stage."""
    stages = []
    for part in spec.split("/"):
        ends = part.split(">")
        try:
            start, end = ([float(v) for v in e.split(",")] for e in (ends[0], ends[-1]))
        except ValueError:
            start = end = []
        if len(ends) > 2 or not start or len(start) != len(end):
            raise UserError(f"--{flag}={spec}: give per stage 'w1,w2,...' or 'start>end' lists, stages split by '/'")
        if not all(map(math.isfinite, start + end)):
            raise UserError(f"--{flag}={spec}: the weights must be finite numbers")
        if min(start + end) < 0:
            raise UserError(f"--{flag}={spec}: the weights must be >= 0 (a negative one ascends its loss)")
        stages.append((start, end))
    if len(stages) not in (1, n):
        raise UserError(f"--{flag}={spec}: {len(stages)} stages, the schedule has {n}")
    return stages * n if len(stages) == 1 else stages

class Plan(NamedTuple):  # what one step (or the final validation) runs with
    stage: int          # 0 .. n-1; n = the extension steps and the final validation
    batch_size: int     # global tokens
    max_seq_len: int    # longest document piece
    windows: tuple      # (short, long) attention windows in 128-token blocks
    lr: float           # multiplier of every base lr
    mtp: tuple          # loss weights of the t+1, t+2, ... predictions
    prefix: float       # loss weight of the prefix token

class Schedule:
    """The record's training stages: n equal parts of the S scheduled steps (boundaries round(k * S / n)), then the
    extension. Within a stage the MTP and prefix weights move linearly from its start to its end values."""
    def __init__(self, h):
        n, S = len(h.ws_schedule), h.num_iterations - h.num_extension_iterations
        self.n, self.bounds = n, [round(k * S / n) for k in range(n + 1)] + [h.num_iterations]
        per_stage = lambda values, k: values[min(k, n - 1)] if len(values) > 1 else values[0]
        mtp, prefix = stage_weights(h.mtp_weights, n, "mtp_weights"), stage_weights(h.prefix_weight, n, "prefix_weight")
        # untied at the first odd step of untie_stage (Adam steps on odd steps); None: never
        self.untie_step = self.bounds[h.untie_stage] | 1 if h.untie_stage < n else None
        self.plans = []
        for step in range(h.num_iterations + 1):
            k = next((i for i in range(n) if step < self.bounds[i + 1]), n)
            t = (step - self.bounds[k]) / (self.bounds[k + 1] - self.bounds[k]) if k < n else 1.0
            (m0, m1), (p0, p1) = mtp[min(k, n - 1)], prefix[min(k, n - 1)]
            long = h.ws_schedule[k] if k < n else h.ws_validate if step == h.num_iterations else h.ws_extension
            short = (h.ws_schedule[k] if k < n else h.ws_extension) // 2
            self.plans.append(Plan(k, per_stage(h.train_batch_size, k), per_stage(h.train_max_seq_len, k),
                                   (short, long), lr_schedule(step, h, per_stage(h.stage_lr, k)),
                                   tuple(a + (b - a) * t for a, b in zip(m0, m1)), p0[0] + (p1[0] - p0[0]) * t))

    def at(self, step):
        return self.plans[step]

# ----------------------------------------------------------------------------------------------------
# Polar Express orthogonalization (5 minimax quintics, bf16) and the FP8 head

POLAR_EXPRESS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]

def polar_express(G: Tensor) -> Tensor:
    """Approximate polar factor U V^T of each matrix in G [..., m, n], in bf16. As the record, each product is
    accumulated in fp32 and rounded to bf16 once: A = X X^T, B = b A + c A A, X <- a X + B X."""
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    X = X.reshape(-1, *X.shape[-2:])
    for a, b, c in POLAR_EXPRESS:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    X = X.view(*G.shape[:-2], *X.shape[-2:])
    return X.mT if tall else X

def scaled_mm(a: Tensor, b: Tensor, out_dtype, a_scale: float, b_scale: float, fast_accum=False) -> Tensor:
    """torch._scaled_mm(a, b) (per-tensor scales) after the checks that cuBLASLt makes on Hopper and the CPU kernel
    does not (torch's aten/src/ATen/native/cuda/Blas.cpp): a row-major, b column-major, not both e5m2, a's columns
    and both of b's dimensions multiples of 16. A layout the GPU would reject fails here on a CPU too."""
    problems = [(a.stride(1) == 1, "the first operand must be row-major"),  # plain strings: nothing formatted per call
                (b.stride(0) == 1, "the second operand must be column-major"),
                (not a.dtype == b.dtype == torch.float8_e5m2, "e5m2 x e5m2 has no kernel"),
                (a.size(1) % 16 == 0 and b.size(0) % 16 == 0 and b.size(1) % 16 == 0,
                 "dimensions must be multiples of 16")]
    for ok, why in problems:
        if not ok:
            raise RuntimeError(f"scaled_mm: {why} ({tuple(a.shape)} strides {a.stride()} {a.dtype} x {tuple(b.shape)} "
                               f"strides {b.stride()} {b.dtype})")
    # a float: a fill (no host copy, no sync); a tensor (a scale computed on the device): as it is
    scale = lambda v: v.float().reshape(()) if isinstance(v, Tensor) else torch.full((), v, dtype=torch.float32,
                                                                                     device=a.device)
    return torch._scaled_mm(a, b, out_dtype=out_dtype, scale_a=scale(a_scale), scale_b=scale(b_scale),
                            use_fast_accum=fast_accum)

# record #89's FP8 head: x and W in e4m3 scaled by 100/448 and 1.6/448, the logits' gradient in e5m2 by 0.75/448 for
# a loss summed over 8 slots; ours is divided by 8 before backward (train_step), so its gradient scale is / 8 too
HEAD_SCALES = (100 / 448, 1.6 / 448, 0.75 / 448 / 8)

@torch.library.custom_op("speedrun::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float) -> tuple[Tensor, Tensor, Tensor]:
    """x @ w.T in bf16 with both operands in e4m3 (scaled by constants); also returns the FP8 operands for backward."""
    xf, wf = (x / x_s).to(torch.float8_e4m3fn), (w / w_s).to(torch.float8_e4m3fn)
    return scaled_mm(xf, wf.T, torch.bfloat16, x_s, w_s, fast_accum=True), xf, wf

@fp8_mm.register_fake  # Inductor asserts these sizes, strides and dtypes on the real outputs
def _(x, w, x_s, w_s):
    return (x.new_empty(x.size(0), w.size(0), dtype=torch.bfloat16), torch.empty_like(x, dtype=torch.float8_e4m3fn),
            torch.empty_like(w, dtype=torch.float8_e4m3fn))

@torch.library.custom_op("speedrun::fp8_mm_backward", mutates_args=())
def fp8_mm_backward(gf: Tensor, xf: Tensor, wf: Tensor, x_s: float, w_s: float, g_s: float) -> tuple[Tensor, Tensor]:
    """(g @ w, g.T @ x) from gf = g / g_s in e5m2, made by the caller's (compiled) code, so that the cast fuses into
    the kernel that computes g: grad_x bf16 [N, D], grad_w fp32 [V, D], both row-major as the fake says (a
    transposed view of a [D, V] product would fail Inductor's stride assert in the first compiled backward)."""
    grad_x = scaled_mm(gf, wf.T.contiguous().T, torch.bfloat16, g_s, w_s)
    grad_w = scaled_mm(gf.T.contiguous(), xf.T.contiguous().T, torch.float32, g_s, x_s)
    return grad_x, grad_w

@fp8_mm_backward.register_fake
def _(gf, xf, wf, x_s, w_s, g_s):
    return gf.new_empty(gf.size(0), wf.size(1), dtype=torch.bfloat16), gf.new_empty(wf.shape, dtype=torch.float32)

def _fp8_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.scales = inputs[2], inputs[3]

def _fp8_backward(ctx, grad, *_):
    xf, wf = ctx.saved_tensors
    gf = (grad.float() / HEAD_SCALES[2]).to(torch.float8_e5m2)  # one rounding, eager as compiled (fused there)
    return *fp8_mm_backward(gf, xf, wf, *ctx.scales, HEAD_SCALES[2]), None, None

fp8_mm.register_autograd(_fp8_backward, setup_context=_fp8_setup)

class FP8UpProjection(torch.autograd.Function):
    """x @ w.T for the MLP's up projection as record #84: both operands in e4m3 with per-tensor scales from their
    absolute maxima (x * (448 / amax(x)); w / (amax(w) / 448)); the backward in bf16 from x and w, as the record's.
    The record quantizes its bf16 weights once per optimizer step; here each micro-batch does it from the bank's bf16
    copy (the same values within a step), and compiled, Inductor reads the fp32 bank without rounding it to bf16."""
    @staticmethod
    def forward(ctx, x, w):
        x_amax, w_scale = x.abs().amax().float().clamp_min(1e-12), w.abs().amax().float().clamp_min(1e-12) / 448
        # in fp32, rounded once to e4m3 (eager as compiled, where Inductor keeps the product in fp32)
        xf, wf = (x.float() * (448 / x_amax)).to(torch.float8_e4m3fn), (w.float() / w_scale).to(torch.float8_e4m3fn)
        ctx.save_for_backward(x, w)
        return scaled_mm(xf, wf.T, x.dtype, x_amax / 448, w_scale, fast_accum=True)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w, grad.T @ x

# record #89's delayed scaling: an activation scale is amax(post) * 1.80 / 448 of the previous forward, a weight scale
# amax(w) * 1.12 / 448 of the previous step's weights (amax / 448 of the current ones in the first 17 steps)
FP8_DOWN_HEADROOM = (1.80, 1.12)

class FP8DownProjection(torch.autograd.Function):
    """(relu(pre)^2 @ w, amax of relu(pre)^2) for the MLP as record #89: post = relu(pre)^2 in bf16 and w in e4m3 by
    scales set aside before the product (GPT.refresh_fp8_scales, GPT.forward), so nothing waits on an amax; what
    outgrew its scale clips at 448 (post >= 0: only above). The backward in bf16 keeps post alone, as the record's
    kernel, which takes relu(pre) = sqrt(post). w is quantized from the bank's bf16 copy, as in FP8UpProjection."""
    @staticmethod
    def forward(ctx, pre, w, post_scale, w_scale):
        post = F.relu(pre).square()
        # in fp32, rounded once to e4m3; the record multiplies by the activation scale's fp32 reciprocal
        postf = (post.float() * (1 / post_scale)).clamp_max(448).to(torch.float8_e4m3fn)
        wf = (w.float() / w_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        ctx.save_for_backward(post, w)
        amax = post.amax().float()
        ctx.mark_non_differentiable(amax)
        return scaled_mm(postf, wf.T.contiguous().T, post.dtype, post_scale, w_scale, fast_accum=True), amax

    @staticmethod
    def backward(ctx, grad, _):
        post, w = ctx.saved_tensors
        grad_pre = (2 * (grad @ w.T).float() * post.float().sqrt()).to(post.dtype)  # 0 where pre <= 0 (post = 0)
        return grad_pre, post.T @ grad, None, None

# ----------------------------------------------------------------------------------------------------
# Model

def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))

class CastedLinear(nn.Linear):
    def __init__(self, in_features, out_features, fp8=False):
        super().__init__(in_features, out_features, bias=False)
        self.fp8 = fp8
        nn.init.zeros_(self.weight)

    def forward(self, x):
        if self.fp8 and self.training:
            out = fp8_mm(x.flatten(0, -2), self.weight, *HEAD_SCALES[:2])[0]
            return out.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight.type_as(x))

class Rotary(nn.Module):
    """Half-truncated RoPE on adjacent pairs (2i, 2i+1) of the first half of the head dims (the second half stays put),
    as the record; YaRN rescales the frequencies and the attention scale when the window grows. Tables cover 2 *
    max_len positions: paired heads put head h of token t at position 2t + h % 2."""
    def __init__(self, head_dim, max_len, dtype):
        super().__init__()
        self.head_dim, self.max_len = head_dim, max_len
        self.register_buffer("cos", torch.empty(2 * max_len, head_dim, dtype=dtype), persistent=False)
        self.register_buffer("sin", torch.empty(2 * max_len, head_dim, dtype=dtype), persistent=False)
        self.reset()

    def reset(self):
        q = self.head_dim // 4
        self.freq = torch.cat([((1 / 1024) ** torch.linspace(0, 1, q, dtype=torch.float64)).repeat_interleave(2),
                               torch.zeros(2 * q, dtype=torch.float64)])
        self.attn_scale, self.ws = 0.1, None
        self._tables()

    def _tables(self):
        theta = torch.outer(torch.arange(2 * self.max_len, dtype=torch.float64), self.freq)
        self.cos.copy_(theta.cos())
        self.sin.copy_(theta.sin() * torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(self.head_dim // 2))

    def set_window(self, ws, alpha=1, beta=32):
        if self.ws is not None and ws != self.ws:
            rot = BLOCK * self.ws * self.freq / (2 * math.pi)
            ramp, s = ((rot - alpha) / (beta - alpha)).clamp(0, 1), self.ws / ws
            self.freq = self.freq * (s + ramp * (1 - s))
            self.attn_scale *= 0.2 * math.log(ws / self.ws) + 1
            self._tables()
        self.ws = ws

    def forward(self, x, paired=False):  # x: [B, T, H, head_dim]
        B, T, H, D = x.shape
        if paired:  # head h of token t at position 2t + h % 2
            cos, sin = self.cos[:2 * T].view(1, T, 1, 2, D), self.sin[:2 * T].view(1, T, 1, 2, D)
            x = x.reshape(B, T, H // 2, 2, D)
        else:
            cos, sin = self.cos[None, :T, None], self.sin[None, :T, None]
        flipped = x.unflatten(-1, (D // 2, 2)).flip(-1).flatten(-2)  # (x1, x0) of each pair
        return (x * cos + flipped * sin).view(B, T, H, D)

def doc_causal_window(docs: Tensor, window: int):
    """mask_mod: key kv is visible from query q when causal, same document, and q - kv <= window tokens."""
    def mask_mod(b, h, q, kv):
        return (q >= kv) & (docs[q] == docs[kv]) & (q - kv <= window)
    return mask_mod

class BlockwiseMask(NamedTuple):
    """The portable twin of a BlockMask: attend() evaluates its mask_mod densely, a 128-token query block at a time."""
    docs: Tensor  # document index of each position
    window: int   # in 128-token blocks

BLOCK_TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
                "full_q_num_blocks", "full_q_indices")  # BlockMask's, by name

def make_masks(inputs: Tensor, windows, flex: bool, paired=False, bos_id=50256):
    """One attention mask per window (in 128-token blocks): a FlexAttention BlockMask, or its portable twin; a
    document starts at each bos_id. paired: for the interleaved stream of paired heads (two positions a token, the
    window counted in positions)."""
    docs = (inputs == bos_id).cumsum(0)
    if paired:
        docs = docs.repeat_interleave(2)
    T = docs.numel()
    if not flex:
        return [BlockwiseMask(docs, ws) for ws in windows]
    blk = torch.arange(T // BLOCK, device=inputs.device)
    lo, hi = docs[0::BLOCK], docs[BLOCK - 1::BLOCK]
    dist_ = blk[:, None] - blk[None, :]  # q block minus kv block
    any_ = (dist_ >= 0) & (hi[None, :] >= lo[:, None])
    earlier_one_doc = (dist_ > 0) & (lo == hi)[:, None] & (lo == hi)[None, :] & (lo[:, None] == lo[None, :])
    # per window: the partial and the full kv blocks of each q block, and their transposes, the q-block tables (which
    # BlockMask.from_kv_blocks would rebuild densely)
    blocks = []
    for ws in windows:
        full = earlier_one_doc & (dist_ <= ws - 1)
        partial = any_ & (dist_ <= ws) & ~full
        blocks += [partial, full, partial.T, full.T]
    blocks = torch.stack(blocks)  # all windows' tables at once: the count and the visible blocks first, in order
    counts = blocks.sum(-1, dtype=torch.int32)[:, None, None]
    order = blocks.int().argsort(dim=-1, descending=True, stable=True).int()[:, None, None]
    tables = [t for pair in zip(counts, order) for t in pair]  # count, indices; count, indices; ...
    return [BlockMask(seq_lengths=(T, T), **dict(zip(BLOCK_TABLES, tables[8 * k:8 * k + 8])),
                      BLOCK_SIZE=(BLOCK, BLOCK), mask_mod=doc_causal_window(docs, ws * BLOCK))
            for k, ws in enumerate(windows)]

def attend(q, k, v, mask, scale):  # [B, T, H, D] in and out
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # compiled flex on strided q/k was seen wrong
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask, scale=scale).transpose(1, 2)
    # portable twin, memory linear in T: each query block sees the window's key blocks (at most window + 1) densely
    T, mask_mod, out = q.size(2), doc_causal_window(mask.docs, mask.window * BLOCK), []
    pos = torch.arange(T, device=q.device)
    for q0 in range(0, T, BLOCK):
        q1, k0 = min(q0 + BLOCK, T), max(0, q0 - mask.window * BLOCK)
        visible = mask_mod(0, 0, pos[q0:q1, None], pos[None, k0:q1])
        out.append(F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, k0:q1], v[:, :, k0:q1], attn_mask=visible,
                                                  scale=scale))
    return torch.cat(out, dim=2).transpose(1, 2)

def key_offset(k):  # [B, T, H, D]: the stationary half of the dims takes the previous position's (a 1-layer induction)
    half = k.size(-1) // 2
    return torch.cat([k[..., :half], torch.cat([k[:, :1, :, half:], k[:, :-1, :, half:]], dim=1)], dim=-1)

def xsa(y, v, alpha):  # [B, T, H, D], alpha [B, T, H]: y minus tanh(alpha) times its projection on v
    along = (y * v).sum(-1, keepdim=True) / v.square().sum(-1, keepdim=True).clamp_min(1e-8)
    return y - torch.tanh(alpha).type_as(y).unsqueeze(-1) * along * v

def wide(t):  # fp32 arithmetic for bf16/fp32 tensors; fp64 stays fp64 (the tests' exact references)
    return t if t.dtype == torch.float64 else t.float()

def dc_attention(q, k, v, w1, w2, docs, scale, window):
    """Post-only dynamically composable attention (the record's layer-10 correction), added to the attention output:
    out_h[t] = w2[t, h] * sum_s a[t, s] v_h[s], a[t, s] = sum_g rmsnorm(w1[t])_g softmax_g(scale q_g[t].k_g[s]) over
    the keys s with 0 <= t - s < window in t's document. q, k, v [1, T, H, D], w1 and w2 [1, T, H], docs [T]. Banded:
    each 128-query block scores its own and the previous ceil((window - 1) / 128) key blocks densely."""
    _, T, H, D = q.shape
    n_back = -(-(window - 1) // BLOCK)
    pad = n_back * BLOCK
    nb = -(-T // BLOCK)
    tail = nb * BLOCK - T
    def bands(t, fill):  # [T, ...] -> [nb, (n_back + 1) * BLOCK, ...]: each block's keys, from pad positions earlier
        t = F.pad(t, [0, 0] * (t.dim() - 1) + [pad, tail], value=fill)
        return torch.cat([t[j * BLOCK:j * BLOCK + nb * BLOCK].unflatten(0, (nb, BLOCK)) for j in range(n_back + 1)], 1)
    kb, vb, db = bands(k[0], 0.0), bands(v[0], 0.0), bands(docs, -1)
    qb = F.pad(q[0], (0, 0, 0, 0, 0, tail)).unflatten(0, (nb, BLOCK))
    rel = torch.arange(BLOCK, device=q.device)[:, None] + pad - torch.arange(kb.size(1), device=q.device)[None, :]
    qdocs = F.pad(docs, (0, tail), value=-1).unflatten(0, (nb, BLOCK))
    visible = (rel >= 0) & (rel < window) & (qdocs[:, :, None] == db[:, None, :])  # [nb, BLOCK, keys]
    # the scores from the bf16 operands (tensor cores, fp32 accumulation, as the record's Triton kernel); fp32 softmax
    scores = wide(torch.einsum("bqhd,bkhd->bhqk", qb, kb)) * scale
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    w1n = F.rms_norm(wide(w1), (H,), eps=1e-6)
    w1b = F.pad(w1n[0], (0, 0, 0, tail)).unflatten(0, (nb, BLOCK))  # [nb, BLOCK, H]
    a = torch.einsum("bqh,bhqk->bqk", w1b, probs).type_as(v)
    out = torch.einsum("bqk,bkhd->bqhd", a, vb).flatten(0, 1)[:T]
    return (w2[0].type_as(out).unsqueeze(-1) * out)[None]

def softcap(logits):  # the record's asymmetric logit cap
    return 23 * torch.sigmoid((logits + 5) / 7.5)

def loss_columns(targets, mtp, prefix_targets, prefix, across_docs=True, bos_id=50256):
    """The training loss's terms as [T, K + 1] target columns and weights: for position t, mtp[k] on targets[t + k]
    (0 past the slot's end, and with across_docs=False past the end of t's document: a bos_id target before it), and
    prefix on prefix_targets[t] (0 where it is -1)."""
    T, K = targets.numel(), mtp.numel()
    bos_seen = F.pad((targets == bos_id).int().cumsum(0), (1, 0))  # documents started in targets[:t]
    cols, weights = [], []
    for k in range(K):
        valid = torch.arange(T, device=targets.device) < T - k
        if not across_docs and k:
            valid = valid & (F.pad(bos_seen[k:T], (0, k)) == bos_seen[:T])
        cols.append(F.pad(targets[k:], (0, k)))
        weights.append(mtp[k] * valid)
    cols.append(prefix_targets.clamp_min(0))
    weights.append(prefix * (prefix_targets >= 0))
    return torch.stack(cols, 1), torch.stack(weights, 1)

class SoftcappedHeadLoss(torch.autograd.Function):
    """The head and the training loss in one function, as record #89's fused softcapped cross-entropy: the loss is
    sum_t sum_j weights[t, j] * (lse_t - z[t, cols[t, j]]) on z = 23 s, s = sigmoid((x W^T + 5) / 7.5) computed in
    fp32 from the head's logits and rounded once to their dtype (bf16 on a GPU), lse in fp32. Forward keeps s and
    one fp32 number a row (never an fp32 T x V tensor); backward computes the logits' gradient
    (sum_j weights * softmax(z) - the weights on their target columns) * 23 / 7.5 * s (1 - s) in fp32 in one
    pointwise pass, and with fp8 rounds it once, to the e5m2 that the FP8 head's backward multiplies with.
    Returns (the weighted loss sum, the next-token loss sum); the second has no gradient."""
    @staticmethod
    def forward(ctx, x, w, cols, weights, fp8: bool):
        if fp8:
            logits, xf, wf = fp8_mm(x, w, *HEAD_SCALES[:2])
        else:
            logits, xf, wf = F.linear(x, w.type_as(x)), x, w.type_as(x)
        s = torch.sigmoid((wide(logits) + 5) / 7.5).to(logits.dtype)
        lse = torch.logsumexp(23 * wide(s), dim=-1)
        picked = 23 * wide(s.gather(1, cols))
        ctx.save_for_backward(s, lse, cols, weights, xf, wf)
        ctx.fp8, ctx.w_dtype = fp8, w.dtype
        next_token = (lse - picked[:, 0]).sum()
        ctx.mark_non_differentiable(next_token)
        return (weights * (lse[:, None] - picked)).sum(), next_token

    @staticmethod
    def backward(ctx, grad, _):
        s, lse, cols, weights, xf, wf = ctx.saved_tensors
        u, vocab = wide(s), torch.arange(s.size(1), device=s.device)
        grad_z = weights.sum(1, keepdim=True) * torch.exp(23 * u - lse[:, None])
        for j in range(cols.size(1)):  # the one-hot targets as compares: no gather's fp32 scatter buffer
            grad_z = grad_z - weights[:, j, None] * (vocab == cols[:, j, None])
        grad_logits = grad * grad_z * (23 / 7.5) * u * (1 - u)
        if ctx.fp8:
            gf = (grad_logits / HEAD_SCALES[2]).to(torch.float8_e5m2)
            grad_x, grad_w = fp8_mm_backward(gf, xf, wf, *HEAD_SCALES)
        else:
            grad_logits = grad_logits.to(s.dtype)
            grad_x, grad_w = grad_logits @ wf, grad_logits.T @ xf
        return grad_x, grad_w.to(ctx.w_dtype), None, None, None

def head_loss(x, head, targets, mtp, prefix_targets, prefix, across_docs=True, bos_id=50256):
    """Training: the head on x [T, D] and the loss of loss_columns' terms (SoftcappedHeadLoss), FP8 where the head
    is. Returns (the weighted loss sum, the next-token loss sum)."""
    cols, weights = loss_columns(targets, mtp, prefix_targets, prefix, across_docs, bos_id)
    return SoftcappedHeadLoss.apply(x, head.weight, cols, weights, head.fp8 and head.training)

def bigram_index(tokens, rows):
    """Bigram hash rows of a slot (numpy, host): ((36313 cur) ^ (27191 prev)) mod (rows - 1) in wrapping int32
    arithmetic as the record; position 0, which has no previous token, gets the reserved last row, and, as the record
    (it writes that row into the token array first, then hashes each position from the array's previous entry),
    position 1 is hashed with rows - 1 as its previous token."""
    t = np.asarray(tokens).astype(np.int32)
    prev = t[:-1].copy()
    prev[:1] = rows - 1
    out = np.empty(t.size, dtype=np.int32)
    out[0] = rows - 1
    with np.errstate(over="ignore"):
        out[1:] = np.bitwise_xor(np.int32(36313) * t[1:], np.int32(27191) * prev) % np.int32(rows - 1)
    return out

# Record #89's 11 layers, one row each; a model of L layers (2 to 11) keeps rows r = i * 10 // (L - 1) (the first and
# the last always), and an input from a row it does not keep (a kept output, a gate) drops out. Columns: attention
# (the one layer without it adds the skip instead), its window (the short one is half the long), paired heads, which
# MUDD-gate MLP (pre: reads x0; post: reads layer 4's input) gives the XSA strength, the attention output gate and the
# x0 and bigram injection weights, a value-embedding table, and the output kept: "skip" joins at the layer without
# attention, "shared" is every later layer's attention input; both are MUDD sources. The last row also has DC
# attention and the MUDD mixes, which read layer 0's input, layer 1's value embedding and its own input (forward).
LAYER_ROLES = """
r   attention  window  paired  xsa   attn_gate  inject  value_embed  keep
0   yes        short   yes     -     -          pre     -            -
1   yes        short   -       pre   -          pre     yes          -
2   yes        short   yes     -     -          pre     yes          -
3   yes        long    -       pre   pre        pre     -            skip
4   yes        short   -       post  -          post    -            -
5   yes        short   yes     -     -          post    -            -
6   -          -       -       -     -          -       -            -
7   yes        short   -       post  -          post    -            shared
8   yes        short   -       -     -          post    yes          -
9   yes        short   yes     -     -          post    yes          -
10  yes        long    -       -     post       -       yes          -
"""
ROLE_NAMES, *ROLE_ROWS = (line.split() for line in LAYER_ROLES.strip().splitlines())
ROLES = [dict(zip(ROLE_NAMES, row), r=int(row[0])) for row in ROLE_ROWS]
NO_ATTN = {row["r"] for row in ROLES if row["attention"] == "-"}
LONG = {row["r"] for row in ROLES if row["window"] == "long"}
PAIRED = {row["r"] for row in ROLES if row["paired"] == "yes"}
VE = tuple(row["r"] for row in ROLES if row["value_embed"] == "yes")
SKIP_FROM, SHARED_IN = (next(row["r"] for row in ROLES if row["keep"] == kept) for kept in ("skip", "shared"))
POST_GATE_AT = min(row["r"] for row in ROLES if "post" in row.values())  # the post gate is computed at its input

def gate_slices(H, gate):
    """The output layout of MUDD-gate MLP gate (0: pre, 1: post) at H heads: {kind: {record layer: slice}} for the
    XSA strengths and attention gates (H each), then the x0 and bigram injection weights (interleaved, 1 each); the
    post gate adds the skip gate (1) and the DC weights w1 and w2 (H each). Returns (slices, width)."""
    name, slices, width = ("pre", "post")[gate], {"xsa": {}, "attn": {}, "x0": {}, "bigram": {}}, 0
    for kinds, column, size in ((("xsa",), "xsa", H), (("attn",), "attn_gate", H), (("x0", "bigram"), "inject", 1)):
        for row in ROLES:
            if row[column] == name:
                for kind in kinds:
                    slices[kind][row["r"]] = slice(width, width + size)
                    width += size
    if gate:
        slices.update(skip=slice(width, width + 1), dc_w1=slice(width + 1, width + 1 + H))
        slices.update(dc_w2=slice(width + 1 + H, width + 1 + 2 * H))
        width += 1 + 2 * H
    return slices, width

def record_layers(L):
    return [i * 10 // (L - 1) for i in range(L)]

class GPT(nn.Module):
    def __init__(self, h: Hyperparameters, max_len: int, dtype=torch.bfloat16):
        super().__init__()
        L, D, V, H = h.num_layers, h.model_dim, h.vocab_size, h.num_heads
        self.rec, self.num_heads, self.mtp_across_docs, self.bos_id = record_layers(L), H, h.mtp_across_docs, h.bos_id
        self.dc_window, self.val_fp32_softcap = h.dc_window, h.val_fp32_softcap
        self.attn_layers = [r for r in self.rec if r not in NO_ATTN]  # the record layers with attention, in order
        self.ve_layers = [r for r in VE if r in self.rec]
        n_attn, n_ve, hd = len(self.attn_layers), len(self.ve_layers), D // H
        self.rotary = Rotary(hd, max_len, dtype)
        self.embed = nn.Embedding(V, D)
        self.smear_gate = CastedLinear(12, 1)
        fp8 = dtype == torch.bfloat16 and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
        self.lm_head = CastedLinear(D, V, fp8=fp8)
        self.fp8_mlp = fp8 and h.fp8_mlp
        # FP8 down projections' delayed scales: per slot (of 8) and layer the activation scale its next forward
        # uses; per layer the weight scale of this step and the one set aside for the next. Record #89 keeps the
        # first per GPU, which is per slot on 8 GPUs only: per slot, every world size gets the 8-GPU math.
        self.register_buffer("fp8_act_scales", torch.ones(8, L))
        self.register_buffer("fp8_down_scales", torch.ones(2, L))
        with torch.no_grad():  # the record: head N(0, 0.005), the embedding tied to it (the optimizer keeps them equal)
            self.lm_head.weight.normal_(0, 0.005)
            self.embed.weight.copy_(self.lm_head.weight)
        self.value_embeds = nn.Parameter(0.01 * torch.randn(n_ve * V, D))  # one table per VE layer
        self.ve_gate_bank = nn.Parameter(torch.zeros(n_ve, H, 12))  # 2 sigmoid(W [x[:6]; ve[:6]]) per head
        bound = 3 ** 0.5 * 0.5 * D ** -0.5
        # NorMuon banks: Q and K per pair of heads ([Q pairs; K pairs] a layer), V and O a layer, the MLPs (up, down)
        self.qk_bank = nn.Parameter(torch.empty(n_attn * H, 2 * hd, D).uniform_(-bound, bound))
        self.vo_bank = nn.Parameter(torch.empty(2 * n_attn, D, D).uniform_(-bound, bound))
        self.mlp_bank = nn.Parameter(torch.stack([torch.empty(L, 4 * D, D).uniform_(-bound, bound),
                                                  torch.zeros(L, 4 * D, D)], 1))
        self.bigram_embed = nn.Embedding(h.bigram_vocab_size, D) if h.bigram_vocab_size else None
        if self.bigram_embed is not None:
            nn.init.zeros_(self.bigram_embed.weight)
            self.register_buffer("bigram_signs", torch.randn(h.bigram_sign_rows, D).sign().to(dtype))
        # target -> its longest proper byte-prefix token (-1: none); filled by the trainer when the clock starts
        self.register_buffer("prefix_table", torch.full((V,), -1, dtype=torch.int64), persistent=False)
        # per layer [0.5, 1] (Q/K/V and O weight multipliers), smear, skip
        self.scalars = nn.Parameter(torch.cat([torch.tensor([0.5, 1.0]).repeat(L), torch.tensor([0.0, -1.5])]))
        self.resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1 ** 0.5))  # [attention, MLP]: x's weight
        self.post_lambdas = nn.Parameter(torch.ones(L, 2))  # the sub-layer output's weight
        # MUDD: 14 coefficients at the last layer's input (V sources, residual sources, VE gates, its 6 lambdas), 5
        # after the loop; biases stored divided by the scale 0.1. The MUDD gates (pre and post) likewise, scale learned.
        self.mudd_w1 = nn.Parameter(torch.stack([nn.init.kaiming_uniform_(torch.empty(64, D), a=5 ** 0.5)
                                                 for _ in range(2)]))
        self.mudd_w2 = nn.Parameter(torch.zeros(2, 14, 64))
        self.mudd_b2 = nn.Parameter(torch.zeros(2, 14))
        with torch.no_grad():
            self.mudd_b2[0, 6:14] = torch.tensor([2.0, 2.0, 1.1 ** 0.5, 1.0, 0.0, 0.05, 1.1 ** 0.5, 1.0]) / 0.1
            self.mudd_b2[1, 1] = -0.5 / 0.1  # the backout of layer 7's output
        self.gate_layout = [gate_slices(H, gate) for gate in range(2)]
        n_gate = max(width for _, width in self.gate_layout)
        self.mudd_gate_w1 = nn.Parameter(torch.stack([nn.init.kaiming_uniform_(torch.empty(64, D), a=5 ** 0.5)
                                                      for _ in range(2)]))
        self.mudd_gate_w2 = nn.Parameter(torch.zeros(2, n_gate, 64))
        self.mudd_gate_b2 = nn.Parameter(torch.zeros(2, n_gate))
        self.mudd_gate_scale = nn.Parameter(torch.tensor(0.1))
        with torch.no_grad():
            for gate, (slices, _) in enumerate(self.gate_layout):  # attention gates 0.25, bigram 0.05 (x0 0)
                for kind, bias in (("attn", 0.25), ("bigram", 0.05)):
                    for at in slices[kind].values():
                        self.mudd_gate_b2[gate, at] = bias / 0.1
            post = self.gate_layout[1][0]
            self.mudd_gate_b2[1, post["skip"]] = 0.5 / 0.1
            self.mudd_gate_b2[1, post["dc_w1"]] = 1.0 / 0.1  # (w2 starts at 0)
        small = (self.embed, self.smear_gate, self.lm_head, self.bigram_embed)  # stored in the compute dtype, as the
        for m in small:  # record; so are the banks (NorMuon keeps each rank's matrices' low 16 bits), not the lambdas
            if m is not None:
                m.to(dtype)
        for p in (self.value_embeds, self.ve_gate_bank, self.mudd_w1, self.mudd_w2, self.mudd_b2, self.mudd_gate_w1,
                  self.mudd_gate_w2, self.mudd_gate_b2, self.qk_bank, self.vo_bank, self.mlp_bank):
            p.data = p.data.to(dtype)

    def gates(self, x, j, out):
        """MUDD-gate MLP j (0: pre, 1: post) at x [1, T, D] into out: per record layer, XSA strengths and attention
        gates [1, T, H], x0 and bigram injection weights [1, T, 1]; the post gate also the skip gate and the DC
        weights (w1, w2)."""
        slices, n = self.gate_layout[j]
        g = F.linear(F.gelu(F.linear(x, self.mudd_gate_w1[j])), self.mudd_gate_w2[j, :n]) + self.mudd_gate_b2[j, :n]
        g = g * self.mudd_gate_scale.type_as(g)
        for kind in ("xsa", "attn", "x0", "bigram"):
            out[kind].update({r: g[..., at] for r, at in slices[kind].items()})
        if j:
            out.update(skip=g[..., slices["skip"]], dc=(g[..., slices["dc_w1"]], g[..., slices["dc_w2"]]))

    def mudd(self, x, j, n):  # MUDD MLP j: n per-token coefficients [1, T, 1]
        z = F.linear(F.gelu(F.linear(x, self.mudd_w1[j])), self.mudd_w2[j, :n]) + self.mudd_b2[j, :n]
        return (z * 0.1).split(1, dim=-1)

    def attention(self, x, i, r, mask, aux_v=None, xsa_alpha=None, gate=None, dc=None, docs=None):
        """Layer i (record layer r) attention on its normed input x [1, T, D]; the variants by r."""
        B, T, D = x.shape
        H, a = self.num_heads, self.attn_layers.index(r)
        sa = self.scalars[2 * i:2 * i + 2]
        w_qkv = torch.cat([self.qk_bank[a * H:(a + 1) * H].flatten(0, 1), self.vo_bank[2 * a]]).type_as(x)
        q, k, v = F.linear(x, sa[0] * w_qkv).view(B, T, 3 * H, D // H).chunk(3, dim=-2)
        q, k, paired, rotary = norm(q), norm(k), r in PAIRED, self.rotary
        q, k = rotary(q, paired), rotary(k, paired)
        if paired:  # one stream of 2T positions per pair of heads j and j + H/2: token t's heads at 2t and 2t + 1
            q, k, v = (t.reshape(B, 2 * T, H // 2, D // H) for t in (q, k, v))
        elif r in LONG:
            k = key_offset(k)
        if aux_v is not None:
            v = v + aux_v.view_as(v)
        y = attend(q, k, v, mask, rotary.attn_scale)
        if dc is not None:
            y = y + dc_attention(q, k, v, *dc, docs, rotary.attn_scale, self.dc_window)
        y = y.reshape(B, T, H, D // H)
        if xsa_alpha is not None and not paired:
            y = xsa(y, v, xsa_alpha)
        if gate is not None:
            y = y * gate.unsqueeze(-1)
        return F.linear(y.reshape(B, T, D), sa[1] * self.vo_bank[2 * a + 1].type_as(y))

    def mlp(self, x, i, fp8_scales=None):
        """Layer i's MLP on x [1, T, D]: (output, amax of relu(x W1^T)^2 or None). fp8_scales: (activation scale,
        weight scale) of the down projection for FP8 up and down projections (training), None: bf16."""
        up, down = self.mlp_bank[i].type_as(x)
        if fp8_scales is None:
            return F.relu(F.linear(x, up)).square() @ down, None
        y, amax = FP8DownProjection.apply(FP8UpProjection.apply(x.flatten(0, -2), up), down, *fp8_scales)
        return y.view_as(x), amax

    @torch.no_grad()
    def refresh_fp8_scales(self, step):
        """Before training step `step`'s forwards, record #89's weight scales for the down projections: the step
        takes the one set aside by the last (from its weights), or amax / 448 of the current weights in the steps
        0-16 (the record bootstraps before step 0 and after steps 0-15); then amax * 1.12 / 448 of the current
        weights is set aside."""
        amax = torch.linalg.vector_norm(self.mlp_bank[:, 1], float("inf"), dim=(1, 2)).float().clamp_min(1e-12)
        if step <= 16:
            self.fp8_down_scales[1] = amax / 448
        self.fp8_down_scales[0] = self.fp8_down_scales[1]
        self.fp8_down_scales[1] = amax * (FP8_DOWN_HEADROOM[1] / 448)

    def forward(self, inputs, targets, bigram_idx, masks, mtp=None, prefix=None, head_chunk=8192, slot=0):
        """Training (mtp and prefix weights given, as tensors): (weighted loss sum, next-token loss sum); evaluation:
        the next-token loss sum. masks: one per layer (None where the layer has no attention). slot (of 8, an int or
        a 0-d tensor, which does not recompile): whose FP8 activation scales a training forward uses and renews."""
        L, H, hd = len(self.rec), self.num_heads, self.qk_bank.size(1) // 2
        fp8, act_scales, amaxes = self.fp8_mlp and self.training, None, []
        if fp8:
            slot = torch.as_tensor(slot, device=inputs.device).view(1)  # an index, not a Python int (no graph break)
            act_scales = self.fp8_act_scales.index_select(0, slot)[0]
        smear, skip_w = self.scalars[2 * L], self.scalars[2 * L + 1]
        x = self.embed(inputs)
        x = torch.cat([x[:1], x[1:] + smear * torch.sigmoid(self.smear_gate(x[1:, :12])) * x[:-1]])
        x = x0 = norm(x)[None]
        resid, post = self.resid_lambdas.type_as(x), self.post_lambdas.type_as(x)
        bigram = 0
        if self.bigram_embed is not None:  # times a fixed sign row picked by (prev ^ cur), as the record
            rows = F.pad((inputs[:-1] ^ inputs[1:]) % self.bigram_signs.size(0), (1, 0))
            bigram = (self.bigram_embed(bigram_idx) * self.bigram_signs[rows])[None]
        ve = dict(zip(self.ve_layers, self.value_embeds.view(len(self.ve_layers), -1, x.size(-1))[:, inputs]))
        docs = (inputs == self.bos_id).cumsum(0)
        g = dict(xsa={}, attn={}, x0={}, bigram={})
        self.gates(x0, 0, g)
        x = x0 + bigram * g["bigram"][0]
        cache = {0: x}  # record layer -> its output (0: the input of layer 0)
        for i, r in enumerate(self.rec):
            if "skip" not in g and r >= POST_GATE_AT:
                self.gates(x, 1, g)
            last = i == L - 1
            if r in NO_ATTN:
                if SKIP_FROM in cache:
                    x = x + torch.sigmoid(skip_w) * g["skip"] * cache[SKIP_FROM]
            else:
                attn_in = norm(cache.get(SHARED_IN, x))
                aux_v = None
                if last:  # MUDD: the value and the residual mix the saved states; VE gates and lambdas per token
                    cache["last_in"] = x
                    mu = self.mudd(x, 0, 14)
                    saved = (cache[0], cache.get(SHARED_IN), x)
                    aux_v = sum(m * s for m, s in zip(mu[0:3], saved) if s is not None)
                    x = (1 + mu[5]) * x + sum(m * s for m, s in zip(mu[3:5], saved) if s is not None)
                    ve_gate = torch.cat([mu[6], mu[7]], -1).repeat_interleave(H // 2, -1).unsqueeze(-1)
                    aux_v = (ve_gate * ve[r].view(1, -1, H, hd)).flatten(2) + aux_v
                elif r in ve:
                    gate_in = torch.cat([attn_in[..., :6], ve[r][None, :, :6]], dim=-1)
                    ve_gate = 2 * torch.sigmoid(F.linear(gate_in, self.ve_gate_bank[self.ve_layers.index(r)]))
                    aux_v = (ve_gate.unsqueeze(-1) * ve[r].view(1, -1, H, hd)).flatten(2)
                y = self.attention(attn_in, i, r, masks[i], aux_v, g["xsa"].get(r), g["attn"].get(r),
                                   g["dc"] if last else None, docs)
                if last:
                    x = mu[8] * x + mu[9] * y + mu[10] * cache[0] + mu[11] * bigram
                else:
                    x = resid[i, 0] * x + post[i, 0] * y + x0 * g["x0"][r]
                    if i:
                        x = x + bigram * g["bigram"][r]
            y, amax = self.mlp(norm(x), i, (act_scales[i], self.fp8_down_scales[0, i]) if fp8 else None)
            amaxes.append(amax)
            x = mu[12] * x + mu[13] * y if last else resid[i, 1] * x + post[i, 1] * y
            if r in (SKIP_FROM, SHARED_IN):
                cache[r] = x
        if fp8:  # the next forward of this slot quantizes by this one's maxima (the record: in place, after the loop)
            new = torch.stack(amaxes).clamp_min(1e-12) * (FP8_DOWN_HEADROOM[0] / 448)
            self.fp8_act_scales.index_copy_(0, slot, new[None])
        mu = self.mudd(x, 1, 5)  # after the loop: the saved states, layer 1's value embedding, backout folded in
        saved = (cache[0], cache.get(SHARED_IN), cache["last_in"], ve.get(1, None), cache.get(SKIP_FROM))
        x = x + sum(m * s for m, s in zip(mu, saved) if s is not None)
        x = norm(x)[0]
        if targets is None:  # evals/sample.py: the final hidden states [T, D], for the head where it needs logits
            return x
        if mtp is not None:  # training: the head and the loss fused (bf16 logits on a GPU, FP8 where the head is)
            return head_loss(x, self.lm_head, targets, mtp, self.prefix_table[targets], prefix, self.mtp_across_docs,
                             self.bos_id)
        loss = x.new_zeros((), dtype=torch.float32)
        for i in range(0, x.size(0), head_chunk):  # a chunk at a time; the cross-entropy in fp32
            loss = loss + F.cross_entropy(self.eval_logits(x[i:i + head_chunk]), targets[i:i + head_chunk],
                                          reduction="sum")
        return loss

    def eval_logits(self, x):  # fp32 softcapped logits of hidden states, as evaluation caps them
        logits = self.lm_head(x)
        return softcap(logits.float()) if self.val_fp32_softcap else softcap(logits).float()

    def layer_masks(self, inputs, windows, flex):
        """Each layer's attention mask (None: no attention) for the (short, long) windows; paired layers get the
        doubled stream's."""
        kinds = [None if r in NO_ATTN else (windows[r in LONG], r in PAIRED) for r in self.rec]
        made = {}
        for paired in sorted({k[1] for k in kinds if k}):  # the windows in use, a make_masks call a stream
            ws = sorted({k[0] for k in kinds if k and k[1] == paired})
            made.update(zip([(w, paired) for w in ws], make_masks(inputs, ws, flex, paired, self.bos_id)))
        return [None if k is None else made[k] for k in kinds]

    def attention_flops(self, lengths, windows):
        """Forward + backward attention FLOPs of one step: 12 * width per visible (query, key) pair; paired layers
        count pairs in their doubled stream at half the width; DC, one attention with its window."""
        D, total = self.qk_bank.size(-1), 0
        for r in self.rec:
            if r in NO_ATTN:
                continue
            w = windows[r in LONG] * BLOCK
            if r in PAIRED:
                total += 6 * D * sum(attention_pairs(2 * np.asarray(n), w) for n in lengths)
            else:
                total += 12 * D * sum(attention_pairs(n, w) for n in lengths)
        return total + 12 * D * sum(attention_pairs(n, self.dc_window - 1) for n in lengths)

def matmul_params_per_token(h):
    n_attn = sum(r not in NO_ATTN for r in record_layers(h.num_layers))
    return n_attn * 4 * h.model_dim ** 2 + h.num_layers * 8 * h.model_dim ** 2 + h.model_dim * h.vocab_size

# ----------------------------------------------------------------------------------------------------
# Optimizers: gradients are reduce-scattered inside step(), each rank updates its shard, results are all-gathered

class Comm:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def reduce_scatter(self, full):  # sum over ranks of full [world * k, ...] -> this rank's [k, ...]
        if self.world == 1:
            return full, None
        out = full.new_empty(full.size(0) // self.world, *full.shape[1:])
        return out, dist.reduce_scatter_tensor(out, full, async_op=True)

    def all_reduce(self, full):  # sum over ranks, in place
        return full, (None if self.world == 1 else dist.all_reduce(full, async_op=True))

    def all_gather(self, out, shard):
        if self.world == 1:
            out.copy_(shard)
            return None
        return dist.all_gather_into_tensor(out, shard.contiguous(), async_op=True)

def decay_rate(u, p, wd, mode):
    """NorMuon's weight decay of each entry of p, whose update u gets subtracted: cautious = wd only where u
    already shrinks |p| (u * p >= 0; Adam's strict mask is in adam_update), decoupled = wd everywhere, l2 (its
    wd * p joined the gradient) and none = 0."""
    if mode == "cautious":
        return wd * (u * p >= 0).float()  # a float mask: a bool one would promote to a 0-d wd's fp64
    return wd if mode == "decoupled" else 0.0

def split_fp32(x):  # fp32 -> its top 16 bits as bf16 (truncated, as the record) and its low 16 bits as int16
    bits = x.view(torch.int32)
    return (bits >> 16).to(torch.int16).view(torch.bfloat16), ((bits << 16) >> 16).to(torch.int16)

def join_fp32(hi, lo):  # split_fp32's inverse: the fp32 whose top half is bf16 hi and low half int16 lo
    return ((hi.view(torch.int16).int() << 16) | (lo.int() & 0xFFFF)).view(torch.float32)

def normuon_update(grad, P, lo, mom, v, lr_mul, lr, wd, momentum, beta2: float, red: int, wd_mode: str, ortho):
    """One NorMuon step of a bank's shard, in one function that Trainer compiles into one graph per bank shape: P
    this rank's matrices, lo their low 16 bits (None: an fp32 bank); mom, v (fp32) and lo in place; returns the new
    matrices in the bank's dtype. lr, wd, momentum: 0-d fp64 host tensors, so a new value recompiles nothing."""
    P = join_fp32(P, lo) if lo is not None else P  # this rank's matrices in fp32
    grad = grad.float()
    if wd_mode == "l2":
        grad = grad + wd * P
    mom.mul_(momentum).add_((1 - momentum) * grad)
    U = (1 - momentum) * grad + momentum * mom  # Nesterov
    O = ortho(U).float()
    fro = O.norm(dim=(-2, -1), keepdim=True)
    v.lerp_(O.square().mean(red, keepdim=True), 1 - beta2)
    O = O * v.clamp_min(1e-10).rsqrt()
    O = O * (fro / O.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    O = O + decay_rate(O, P, wd, wd_mode) * P  # cautious: only where the update already shrinks |p|
    P = P - lr * lr_mul.view(-1, 1, 1) * O
    if lo is None:
        return P
    P, new_lo = split_fp32(P)
    lo.copy_(new_lo)
    return P

class NorMuon:
    """Per bank of matrices [n, rows, cols]: Nesterov momentum -> Polar Express on each matrix -> NorMuon row/column
    normalization -> cautious WD. A bank's matrices are split over the ranks (zero-padded to world * k), each rank
    updates its k. A bf16 bank (the GPU's) is reduced and gathered in bf16, as the record: each rank keeps its own
    matrices' low 16 bits (lo), so its update is applied to the fp32 weights, whose truncation the bank holds."""
    def __init__(self, banks, comm: Comm, lr, beta2, weight_decay, ortho=polar_express, wd_mode="cautious",
                 update=normuon_update):  # update: normuon_update, or its compiled graphs (Trainer, with --compile)
        self.comm, self.lr, self.beta2, self.weight_decay = comm, lr, beta2, weight_decay  # momentum: given per step
        self.ortho, self.wd_mode, self.update, self.groups = ortho, wd_mode, update, []
        for p, lr_muls in banks:  # lr_muls: one per matrix; times sqrt(rows / cols) for tall matrices, as the record
            n, rows, cols = p.view(-1, *p.shape[-2:]).shape
            k = -(-n // comm.world)
            lr_mul = [lr_muls[i] * max(1, rows / cols) ** 0.5 if i < n else 0.0 for i in range(k * comm.world)]
            self.groups.append(dict(p=p, n=n, k=k, red=-1 if rows >= cols else -2,
                                    lr_mul=torch.tensor(lr_mul[comm.rank * k:comm.rank * k + k], device=p.device),
                                    mom=torch.zeros(k, rows, cols, device=p.device),
                                    v=torch.zeros((k, rows, 1) if rows >= cols else (k, 1, cols), device=p.device)))
            if p.dtype == torch.bfloat16:
                self.groups[-1]["lo"] = torch.zeros(k, rows, cols, dtype=torch.int16, device=p.device)

    @torch.no_grad()
    def launch(self):
        """Launch the banks' gradient reduce-scatters (step() or finish() completes the step)."""
        world = self.comm.world
        self.pending = [self.comm.reduce_scatter(self.padded(g["p"].grad, g["k"] * world)) for g in self.groups]

    @staticmethod
    def padded(t, n):  # t as matrices [m, rows, cols], zero-padded to n of them (a copy only when m < n)
        t = t.view(-1, *t.shape[-2:])
        return t if t.size(0) == n else torch.cat([t, t.new_zeros(n - t.size(0), *t.shape[1:])])

    def step(self, lr_mult, momentum, wd_mult=None):
        self.launch()
        self.finish(lr_mult, momentum, wd_mult)

    @torch.no_grad()
    def finish(self, lr_mult, momentum, wd_mult=None):  # wd_mult: the decay's schedule multiplier (default lr_mult)
        lr = self.lr * lr_mult
        wd = self.lr * (lr_mult if wd_mult is None else wd_mult) * self.weight_decay
        world, r = self.comm.world, self.comm.rank
        scalars = torch.tensor([lr, wd, momentum], dtype=torch.float64).unbind()  # 0-d, host
        gathers = []
        pending, self.pending = self.pending, None
        for g, (grad, work) in zip(self.groups, pending):
            if work is not None:
                work.wait()
            k = g["k"]
            P = self.padded(g["p"].view(g["n"], *g["mom"].shape[1:])[r * k:(r + 1) * k], k)
            P = self.update(grad, P, g.get("lo"), g["mom"], g["v"], g["lr_mul"], *scalars, self.beta2, g["red"],
                            self.wd_mode, ortho=self.ortho)
            new = torch.empty(k * world, *P.shape[1:], dtype=g["p"].dtype, device=P.device)
            gathers.append((g, new, self.comm.all_gather(new, P)))
        for g, new, work in gathers:
            if work is not None:
                work.wait()
            g["p"].view(g["n"], *new.shape[1:]).copy_(new[:g["n"]])

    def state(self):  # this rank's shards
        return [{key: g[key] for key in ("mom", "v", "lo") if key in g} for g in self.groups]

# Adam parameters as record #89, by name (without ".weight"): (betas, lr_mul, wd_mul)
ADAM_PARAMS = {"lm_head": ((0.5, 0.95), 1.0, 150.0), "embed": ((0.5, 0.95), 1.0, 150.0),
               "bigram_embed": ((0.75, 0.95), 75.0, 5.0), "value_embeds": ((0.75, 0.95), 75.0, 5.0),
               "smear_gate": ((0.9, 0.99), 0.01, 0.0), "ve_gate_bank": ((0.9, 0.99), 1.0, 1.0),
               "scalars": ((0.9, 0.99), 5.0, 0.0), "resid_lambdas": ((0.9, 0.95), 5.0, 0.0),
               "post_lambdas": ((0.9, 0.95), 1.0, 0.0), "mudd_w1": ((0.9, 0.99), 0.25, 1.0),
               "mudd_w2": ((0.9, 0.99), 0.25, 1.0), "mudd_b2": ((0.9, 0.99), 0.25, 0.0),
               "mudd_gate_w1": ((0.9, 0.99), 0.1, 1.0), "mudd_gate_w2": ((0.9, 0.99), 0.1, 1.0),
               "mudd_gate_b2": ((0.9, 0.99), 0.1, 0.0), "mudd_gate_scale": ((0.9, 0.99), 0.1, 0.0)}
MUON_PARAMS = ("qk_bank", "vo_bank", "mlp_bank")  # NorMuon; the MLP's down projections at 2x lr

def adam_update(grads, shards, ms, vs, b1s, b2s, step_sizes, wds, eps: float, wd_mode: str):
    """One Adam step of every parameter (shard) given, in one function that Trainer compiles into one graph: m and v
    (fp32) in place, returns each shard's new value in its dtype. The per-parameter numbers (betas, step size
    lr * sqrt(1 - b2^t) / (1 - b1^t), decay) are 0-d host tensors, so the graph never recompiles as they change. The
    decay: the record's strict cautious mask (upd * P > 0), decoupled, l2 (joined to the gradient) or none."""
    out = []
    for g, P, m, v, b1, b2, step_size, wd in zip(grads, shards, ms, vs, b1s, b2s, step_sizes, wds):
        g, P32 = g.float(), P.float()
        if wd_mode == "l2":
            g = g + wd * P32
        m.mul_(b1).add_((1 - b1) * g)
        v.mul_(b2).add_((1 - b2) * g * g)
        upd = m / (v.sqrt() + eps) * step_size
        if wd_mode == "cautious":
            P32 = P32 * (1 - wd * (upd * P32 > 0).float())  # a float mask: a bool one would promote to fp64
        elif wd_mode == "decoupled":
            P32 = P32 * (1 - wd)
        out.append((P32 - upd).to(P.dtype))
    return out

class DistAdam:
    """Adam with bias correction and the record's decay lambda = (lr * lr_mul)^2 * weight_decay * wd_mul (cautious:
    strict mask), fp32 moments. A parameter whose rows split over the ranks is sharded (reduce-scatter, update a
    shard, all-gather), a smaller one replicated (all-reduce, every rank updates all of it). update: adam_update, or
    its compiled graph (Trainer, with --compile)."""
    def __init__(self, params, comm: Comm, lr, eps, weight_decay, wd_mode="cautious", update=adam_update):
        self.comm, self.lr, self.eps, self.weight_decay, self.wd_mode = comm, lr, eps, weight_decay, wd_mode
        self.update = update  # params: (p, betas, lr_mul, wd_mul) each
        self.params, self.cfg = [p for p, *_ in params], [c for _, *c in params]
        self.betas = [[torch.tensor(b, dtype=torch.float64) for b in betas] for betas, *_ in self.cfg]  # 0-d, host
        self.t = [0] * len(self.params)  # steps taken, per parameter (bias correction), as the record
        self.sharded = [p.dim() > 0 and p.size(0) % comm.world == 0 and comm.world > 1 for p in self.params]
        self.m = [torch.zeros(p.size(0) // comm.world, *p.shape[1:]) if sh else torch.zeros(p.shape)
                  for p, sh in zip(self.params, self.sharded)]
        self.m = [m.to(p.device) for m, p in zip(self.m, self.params)]
        self.v = [torch.zeros_like(m) for m in self.m]

    @torch.no_grad()
    def launch(self, skip=(), sparse=None):
        """Launch the gradients' reductions. skip: parameters left alone this step (a tied embedding); so is one
        without a gradient (unused in this model), as the record: no moment decay, no step counted. sparse: a
        SparseRows, whose parameter's rows it sends in place of the reduce-scatter."""
        todo = [i for i, p in enumerate(self.params) if p.grad is not None and all(p is not q for q in skip)]
        self.pending = {}
        for i in todo:
            p = self.params[i]
            reduce = self.comm.reduce_scatter if self.sharded[i] else self.comm.all_reduce
            self.pending[i] = sparse.exchange(p.grad) if sparse is not None and sparse.param is p else reduce(p.grad)

    def step(self, lr_mult, wd_mult=None, skip=()):
        self.launch(skip)
        self.finish(lr_mult, wd_mult)

    @torch.no_grad()
    def finish(self, lr_mult, wd_mult=None):
        rs, self.pending = self.pending, None
        todo = list(rs)
        grads, shards, step_sizes, wds = [], [], [], []
        for i in todo:  # every reduction launched above; Adam's work waits for all of them, then runs in one graph
            g, work = rs[i]
            if work is not None:
                work.wait()
            p, m, ((b1, b2), lr_mul, wd_mul) = self.params[i], self.m[i], self.cfg[i]
            self.t[i] += 1
            t = self.t[i]
            lr = self.lr * lr_mul * lr_mult
            step_sizes.append(lr * (1 - b2 ** t) ** 0.5 / (1 - b1 ** t))
            wds.append((self.lr * lr_mul * (lr_mult if wd_mult is None else wd_mult)) ** 2 * self.weight_decay * wd_mul)
            grads.append(g)
            shards.append(p[self.comm.rank * m.size(0):(self.comm.rank + 1) * m.size(0)] if self.sharded[i] else p)
        news = self.update(grads, shards, [self.m[i] for i in todo], [self.v[i] for i in todo],
                           [self.betas[i][0] for i in todo], [self.betas[i][1] for i in todo],
                           torch.tensor(step_sizes, dtype=torch.float64).unbind(),
                           torch.tensor(wds, dtype=torch.float64).unbind(), self.eps, self.wd_mode)
        gathers = []
        for i, new in zip(todo, news):
            if self.sharded[i]:
                gathers.append(self.comm.all_gather(self.params[i], new))
            else:
                self.params[i].copy_(new)
        for work in gathers:
            if work is not None:
                work.wait()

    def copy_state(self, src, dst):  # the untie: dst continues with src's moments and step count
        i, j = (next(k for k, p in enumerate(self.params) if p is q) for q in (src, dst))
        self.m[j].copy_(self.m[i])
        self.v[j].copy_(self.v[i])
        self.t[j] = self.t[i]

    def state(self):
        return [dict(m=m, v=v) for m, v in zip(self.m, self.v)]

class SparseRows:
    """Record #71's reduce-scatter of the bigram table's gradient as an all-to-all of the rows used. A rank's
    gradient is zero outside the rows its micro-batches hashed to since the last Adam step (add), so each rank sends
    each row range's owner only those rows of its range (record #89's stage 3: under 100k of the 377,280 rows), and
    the owner adds them to its own gradient rows: the dense reduce-scatter's sum, in another order. Row counts travel
    on the host (start, before the forwards), row numbers and gradient rows on the device (exchange)."""
    def __init__(self, param, comm: Comm, pinned=None):
        self.param, self.comm, self.pinned = param, comm, pinned  # pinned: a PinnedBuffers on CUDA
        self.touched = np.zeros(param.size(0), dtype=bool)
        self.k = param.size(0) // comm.world  # rows a rank owns

    def add(self, rows):  # a micro-batch's bigram rows (host)
        self.touched[rows] = True

    def start(self):
        """The rows this rank sends (the touched ones outside its own range), and the counts' exchange, launched."""
        rank, world = self.comm.rank, self.comm.world
        rows = np.flatnonzero(self.touched).astype(np.int32)
        self.touched[:] = False
        ends = np.searchsorted(rows, np.arange(world + 1) * self.k)
        self.send_counts = np.diff(ends)
        self.send_counts[rank] = 0
        rows = np.concatenate([rows[:ends[rank]], rows[ends[rank + 1]:]])
        staged = torch.from_numpy(rows) if self.pinned is None else self.pinned.stage(0, rows)
        self.send_rows = staged.to(self.param.device, non_blocking=True)
        if self.pinned is not None:
            self.pinned.copied(0)
        self.recv_counts = torch.empty(world, dtype=torch.int64)
        self.counts_work = dist.all_to_all_single(self.recv_counts, torch.from_numpy(self.send_counts), async_op=True)

    def exchange(self, grad):
        """The touched rows of grad to their owners; returns (this rank's rows of grad, a work whose wait() adds the
        rows received to them), as Comm.reduce_scatter returns (shard, work)."""
        self.counts_work.wait()
        send, recv = self.send_counts.tolist(), self.recv_counts.tolist()
        self.recv_rows = torch.empty(sum(recv), dtype=torch.int32, device=grad.device)
        self.rows_work = dist.all_to_all_single(self.recv_rows, self.send_rows, recv, send, async_op=True)
        self.recv_vals = grad.new_empty(sum(recv), grad.size(1))
        self.vals_work = dist.all_to_all_single(self.recv_vals, grad[self.send_rows], recv, send, async_op=True)
        self.grad = grad
        return grad[self.comm.rank * self.k:(self.comm.rank + 1) * self.k], self

    def wait(self):
        self.rows_work.wait()
        self.vals_work.wait()
        self.grad.index_add_(0, self.recv_rows, self.recv_vals)
        self.grad = self.recv_vals = None

# ----------------------------------------------------------------------------------------------------
# Data: shards (256 int32 header + uint16 tokens), BOS-aligned training slots, fixed validation slabs

def read_header(path):
    try:
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(1024), dtype="<i4")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})")
    if header.size != 256 or header[0] != MAGIC or header[1] != VERSION:
        raise UserError(f"{path}: not a token shard (bad magic/version in the header); re-download or re-tokenize it")
    n, size = int(header[2]), os.path.getsize(path)
    if size != 1024 + 2 * n:
        raise UserError(f"{path}: {size} bytes, the header promises {1024 + 2 * n} ({n} tokens): truncated or corrupt, "
                        "re-download it")
    return n

def load_shard(path, vocab_size, limit=None):
    n = read_header(path) if limit is None else min(read_header(path), limit)
    tokens = np.fromfile(path, dtype="<u2", count=n, offset=1024)
    if tokens.size and tokens.max() >= vocab_size:
        raise UserError(f"{path}: token id {tokens.max()} >= vocab size {vocab_size}")
    return tokens

def list_files(pattern, what):
    files = sorted(glob.glob(pattern))
    if not files:
        hint = " (download them: python data/cached_fineweb10B.py 9)" if "fineweb" in pattern else ""
        raise UserError(f"no {what} files match {pattern}{hint}")
    return files

def take_slots(tokens, bos, ptr, n_slots, slot_len, max_seq):
    """Fill n_slots slots of slot_len + 1 tokens with pieces starting at consecutive BOS positions.
    Returns (list of (starts, ends) per slot, new ptr), or None if the shard runs out."""
    slots = []
    for _ in range(n_slots):
        starts, ends, need = [], [], slot_len + 1
        while need > 0:
            if ptr >= len(bos):
                return None
            st = bos[ptr]
            en = min(bos[ptr + 1] if ptr + 1 < len(bos) else len(tokens), st + max_seq, st + need)
            starts.append(st)
            ends.append(en)
            need -= en - st
            ptr += 1
        slots.append((starts, ends))
    return slots, ptr

class PinnedBuffers:
    """Host staging of the host-to-GPU copies: one pinned int32 buffer per micro-batch of a step, kept and reused
    step after step (grown when a later stage needs more), instead of pinning a new one per micro-batch; before a
    buffer is refilled, the event recorded after the last copy out of it is waited on (done already, unless the host
    runs a step ahead of the GPU). pin and event: torch's, or stand-ins in the CPU tests."""
    def __init__(self, pin=torch.Tensor.pin_memory, event=torch.cuda.Event):
        self.pin, self.event, self.buffers = pin, event, {}  # micro-batch index -> (flat buffer, its copy's event)

    def stage(self, i, array):
        """array (int32) in buffer i, as a host tensor of its shape; call copied(i) after the copy out of it."""
        buf, done = self.buffers.get(i, (None, None))
        if buf is None or buf.numel() < array.size:
            buf, done = self.pin(torch.empty(array.size, dtype=torch.int32)), self.event()
        else:
            done.synchronize()
        self.buffers[i] = (buf, done)
        view = buf[:array.size].view(array.shape)
        view.numpy()[...] = array
        return view

    def copied(self, i):
        self.buffers[i][1].record()

class TrainLoader:
    """Each step is 8 slots of batch_size/8 (+1) tokens, all from one shard; rank r takes slots r, r+world, ..."""
    def __init__(self, h, rank, world, device, file_idx=0, ptr=0, epoch=0):
        self.files = list_files(h.train_files, "train")
        self.h, self.rank, self.world, self.device = h, rank, world, device
        self.file_idx, self.ptr, self.epoch = file_idx, ptr, epoch
        self.pinned = PinnedBuffers() if device.type == "cuda" else None  # a CPU run takes the arrays as they are
        self._load(file_idx)

    def _load(self, idx, tokens=None):
        self.tokens = load_shard(self.files[idx], self.h.vocab_size) if tokens is None else tokens
        self.bos = np.flatnonzero(self.tokens == self.h.bos_id)
        self._next = [None]  # load the next shard in the background
        following = (idx + 1) % len(self.files)
        self._thread = threading.Thread(target=lambda: self._next.__setitem__(0, self._safe_load(following)),
                                        daemon=True)
        self._thread.start()

    def _safe_load(self, idx):
        try:
            return load_shard(self.files[idx], self.h.vocab_size)
        except UserError as e:
            return e

    def _advance(self):
        if self.file_idx + 1 == len(self.files):
            if not self.h.repeat_data:
                raise UserError(f"train files {self.h.train_files} ran out: download more shards or pass "
                                "--repeat_data=1")
            self.epoch += 1
        self._thread.join()
        if isinstance(self._next[0], UserError):
            raise self._next[0]
        self.file_idx, self.ptr = (self.file_idx + 1) % len(self.files), 0
        self._load(self.file_idx, self._next[0])

    def state(self):
        return dict(file_idx=self.file_idx, ptr=self.ptr, epoch=self.epoch)

    def next_step(self, batch_size, max_seq_len):
        """This rank's micro-batches for one step, a list of (inputs int32, targets int64, bigram rows int32 or
        None), and all 8 slots' piece lengths. Tokens and bigram rows travel in one pinned buffer (PinnedBuffers);
        the bigram rows stay on the host too (self.bigram_rows, for SparseRows)."""
        slot_len = batch_size // 8
        for shards_tried in range(len(self.files) + 1):
            out = take_slots(self.tokens, self.bos, self.ptr, 8, slot_len, max_seq_len)
            if out is not None:
                break
            if shards_tried == len(self.files):  # each shard tried from its start
                raise no_step_error(self.h, slot_len, max_seq_len)
            self._advance()
        slots, self.ptr = out
        batches, rows, self.bigram_rows = [], self.h.bigram_vocab_size, []
        for a, (starts, ends) in enumerate(slots[self.rank::self.world]):
            tokens = np.concatenate([self.tokens[s:e] for s, e in zip(starts, ends)]).astype(np.int32)
            if rows:
                tokens = np.stack([tokens, np.append(bigram_index(tokens[:-1], rows), 0)])
                self.bigram_rows.append(tokens[1, :-1])
            buf = torch.from_numpy(tokens) if self.pinned is None else self.pinned.stage(a, tokens)
            buf = buf.to(self.device, non_blocking=True)
            if self.pinned is not None:
                self.pinned.copied(a)
            toks = buf[0] if rows else buf
            batches.append((toks[:-1], toks[1:].long(), buf[1, :-1] if rows else None))
        return batches, [np.subtract(e, s) for s, e in slots]

def check_train_data(h, shapes, file_idx=0, ptr=0):
    """Before training: the train shards the run will read have ids < vocab size and hold its steps of BOS-aligned
    slots from (file_idx, ptr) on, counted as the loader takes them; shapes: (slot length, longest piece) of each
    step. With --repeat_data: all shards, and each shape fits one of them."""
    files, found = list_files(h.train_files, "train"), 0
    fits = dict.fromkeys(shapes, False)
    for i in range(0 if h.repeat_data else file_idx, len(files)):
        tokens = load_shard(files[i], h.vocab_size)
        bos, p = np.flatnonzero(tokens == h.bos_id), ptr if i == file_idx and not h.repeat_data else 0
        if h.repeat_data:
            for shape in fits:
                fits[shape] = fits[shape] or take_slots(tokens, bos, 0, 8, *shape) is not None
            continue
        while found < len(shapes) and (out := take_slots(tokens, bos, p, 8, *shapes[found])) is not None:
            found, p = found + 1, out[1]
        if found == len(shapes):
            return
    if h.repeat_data:
        missing = [shape for shape, ok in fits.items() if not ok]
        if missing:
            raise no_step_error(h, *missing[0])
        return
    if found == 0 and ptr == 0:  # no shard from the run's start holds its first step
        raise no_step_error(h, *shapes[0])
    raise UserError(f"train files {h.train_files} hold {found} steps of BOS-aligned data from where the run starts, it "
                    f"needs {len(shapes)}: download more shards or pass --repeat_data=1")

def no_step_error(h, slot_len, max_seq):
    pieces = -(-(slot_len + 1) // max_seq)  # documents a slot needs at the least: one piece of <= max_seq tokens each
    cause = ("use larger shards or a smaller --train_batch_size" if pieces == 1 else
             f"pieces are at most --train_max_seq_len={max_seq} tokens, one a document, so a step needs at least "
             f"{8 * pieces} documents: raise --train_max_seq_len, or use larger shards or a smaller --train_batch_size")
    return UserError(f"train files {h.train_files}: no shard holds one step of BOS-aligned data (8 slots of "
                     f"{slot_len + 1} tokens from documents that start with token {h.bos_id}): {cause}")

def load_val(h):
    tokens, need = [], h.val_tokens + 1
    for f in list_files(h.val_files, "val"):
        tokens.append(load_shard(f, h.vocab_size, limit=need))
        need -= tokens[-1].size
        if need <= 0:
            break
    if need > 0:
        raise UserError(f"val files {h.val_files} hold {h.val_tokens + 1 - need} tokens; --val_tokens={h.val_tokens} "
                        f"needs {h.val_tokens + 1}")
    return np.concatenate(tokens)

def attention_pairs(lengths, window):
    """Visible (query, key) pairs in pieces of the given lengths under a causal window of `window` tokens back."""
    n, w = np.asarray(lengths, dtype=np.int64), window
    return int(np.where(n <= w + 1, n * (n + 1) // 2, (w + 1) * (w + 2) // 2 + (n - w - 1) * (w + 1)).sum())

# ----------------------------------------------------------------------------------------------------
# Training

class Clock:
    """Training time in ms; stopped, after a device sync, for validations, checkpoints and snapshots."""
    def __init__(self, ms, sync):
        self.ms, self.sync = ms, sync
        self.start()

    def start(self):
        self.sync()
        self.t0 = time.perf_counter()

    def stop(self):
        self.sync()
        self.ms += 1000 * (time.perf_counter() - self.t0)

    def now(self):  # running, without a sync (the step lines)
        return self.ms + 1000 * (time.perf_counter() - self.t0)

def compute_dtype(device):  # CPU: fp32 (bf16 matmuls are ~10x slower than fp32 there), otherwise the same code
    return torch.bfloat16 if device.type == "cuda" else torch.float32

def check_model_fits(h, device):
    """Before the log: the weights alone (counted on the meta device, nothing allocated) must fit the device."""
    with torch.device("meta"):
        model = GPT(h, 1, compute_dtype(device))
    need = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise UserError(f"cannot allocate the model: its weights need {need / 1e9:.1f} GB, {device} has "
                        f"{have / 1e9:.1f} GB (lower --bigram_vocab_size, --vocab_size, --model_dim or --num_layers)")

def use_flex(device, compiled):
    """FlexAttention (BlockMasks) only when compiled on CUDA: eager flex_attention materializes the whole T x T score
    matrix (about 58 GB a layer at 49,152 tokens), so --compile=0 takes the blockwise twin there too."""
    return device.type == "cuda" and compiled

def configure_allocator():
    """PYTORCH_ALLOC_CONF=expandable_segments:True, as the record, unless the user configured the allocator: three
    stage shapes fragment a plain cache (record #43 reserved 50.5 GB for 29.2 GB allocated). The CUDA caching
    allocator reads it when CUDA initializes, so main() calls this before anything touches CUDA."""
    if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"

PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "B200": 2250e12}

class Trainer:
    def __init__(self, h, rank, world, device):
        self.h, self.rank, self.world, self.device = h, rank, world, device
        self.comm, self.schedule = Comm(rank, world), Schedule(h)
        # rotary table: the longest training slot or validation slab
        max_len = max(max(h.train_batch_size) // 8, -(-min(h.val_seq_len, h.val_tokens) // BLOCK) * BLOCK)
        torch.manual_seed(h.seed)
        self.model = GPT(h, max_len, compute_dtype(device)).to(device)
        if world > 1:
            for t in [*self.model.parameters(), *self.model.buffers()]:
                dist.broadcast(t.data, 0)
        self.flex = use_flex(device, h.compile)
        self.fwd = torch.compile(self.model, dynamic=False, fullgraph=True) if h.compile else self.model
        m = self.model
        muon = [(m.qk_bank, [1.0] * len(m.qk_bank)), (m.vo_bank, [1.0] * len(m.vo_bank)),
                (m.mlp_bank, [1.0, 2.0] * len(m.mlp_bank))]
        self.muon_params = [p for p, _ in muon]
        adam = [(p, *ADAM_PARAMS[name.removesuffix(".weight")]) for name, p in m.named_parameters()
                if name not in MUON_PARAMS]
        self.adam_params = [p for p, *_ in adam]
        muon_update = torch.compile(normuon_update, dynamic=False, fullgraph=True) if h.compile else normuon_update
        self.muon = NorMuon(muon, self.comm, h.lr, h.beta2, h.weight_decay, polar_express, h.wd_mode, muon_update)
        update = torch.compile(adam_update, dynamic=False, fullgraph=True) if h.compile else adam_update
        self.adam = DistAdam(adam, self.comm, h.adam_lr, h.adam_eps, h.adam_weight_decay, h.wd_mode, update)
        table = m.bigram_embed.weight if m.bigram_embed is not None else None
        sparse = h.sparse_bigram and table is not None and world > 1 and table.size(0) % world == 0  # else dense
        pinned = PinnedBuffers() if device.type == "cuda" else None
        self.sparse_rows = SparseRows(table, self.comm, pinned) if sparse else None
        self.tied = True  # the embedding is the head's weight until the schedule's untie step
        # each step's MTP and prefix loss weights, on the device once: tensors, so a new value does not recompile
        self.loss_weights = [(torch.tensor(p.mtp, device=device), torch.tensor(p.prefix, device=device))
                             for p in self.schedule.plans]
        # this rank's micro-batches' slots (TrainLoader), apart: 0-d tensors that are no views of one another
        self.slots = [torch.tensor(j, device=device) for j in range(rank, 8, world)]
        self.ema = [p.detach().float().clone() for p in m.parameters()] if h.ema_decay > 0 else None  # fp32, on device
        self.snapshots = []  # --average_last: (step, weights in host memory)
        self.loss_sum = torch.zeros((), device=device)  # training loss summed on the device: no host sync in the step
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def set_windows(self, step):
        short, long = self.schedule.at(step).windows
        if step < self.h.num_iterations:
            self.model.rotary.set_window(long)  # no YaRN for the final validation window
        return short, long

    def replay_windows(self, steps):  # the rotary state (YaRN) after training steps 0 .. steps - 1, as resumed
        for s in range(steps):
            self.model.rotary.set_window(self.schedule.plans[s].windows[1])

    def hidden(self, tokens, windows):
        """The final hidden states [T, D] of host tokens (int32, whole blocks) under windows, as evaluated: the
        evals' logits come from them (GPT.eval_logits)."""
        inputs = torch.from_numpy(tokens).to(self.device)
        rows = self.h.bigram_vocab_size
        bigram = torch.from_numpy(bigram_index(tokens, rows)).to(self.device) if rows else None
        return self.fwd(inputs, None, bigram, self.model.layer_masks(inputs, windows, self.flex))

    def train_step(self, step, loader):
        """One optimizer step. Returns its (short, long) windows and piece lengths (for FLOP counting)."""
        self.model.train()
        plan, windows = self.schedule.at(step), self.set_windows(step)
        batches, lengths = loader.next_step(plan.batch_size, plan.max_seq_len)
        sparse = self.sparse_rows if step % 2 == 1 else None  # Adam's step: its bigram rows, counted before the
        if self.sparse_rows is not None:  # forwards, are exchanged while the GPU computes, as the record
            for rows in loader.bigram_rows:
                self.sparse_rows.add(rows)
            if sparse is not None:
                sparse.start()
        mtp, prefix = self.loss_weights[step]
        if self.model.fp8_mlp:
            self.model.refresh_fp8_scales(step)
        for (inputs, targets, bigram), slot in zip(batches, self.slots):
            masks = self.model.layer_masks(inputs, windows, self.flex)
            loss, next_token_loss = self.fwd(inputs, targets, bigram, masks, mtp, prefix, slot=slot)
            (loss / 8).backward()  # gradients summed over ranks and micro-batches = mean over the 8 slots
            self.loss_sum += next_token_loss.detach()
        wd = plan.lr if self.h.wd_schedule == "lr" else 1.0  # decay on the LR schedule (the record) or the peak lr
        head, embed = self.model.lm_head.weight, self.model.embed.weight
        self.muon.launch()
        if step % 2 == 1:  # Adam steps every other step, on gradients accumulated over two steps
            if self.tied:  # one parameter used twice: the embedding's gradient joins the head's
                head.grad += embed.grad
            self.adam.launch([embed] if self.tied else [], sparse)  # every reduction in flight before any update, as
        self.muon.finish(plan.lr, muon_momentum(step, self.h), wd)  # the record orders them
        for p in self.muon_params:
            p.grad = None
        if step % 2 == 1:
            self.adam.finish(plan.lr, wd)
            if self.tied:
                embed.data.copy_(head.data)
            if step == self.schedule.untie_step:
                self.adam.copy_state(head, embed)
                self.tied = False
            for p in self.adam_params:
                p.grad = None
        if self.ema is not None:
            self.update_ema(step)
        return windows, lengths

    def kernel_warmup(self, n_steps, log):
        """Compile and warm up kernels on every training shape (windows, slot length, number of predictions), a line
        per phase; then restore all state."""
        h, m = self.h, self.model
        saved = copy.deepcopy(dict(model=m.state_dict(), opt=self.muon.state() + self.adam.state(), t=self.adam.t,
                                   grads=[p.grad for p in self.adam_params], ema=self.ema, loss=self.loss_sum,
                                   touched=None if self.sparse_rows is None else self.sparse_rows.touched))
        rot, tied = (m.rotary.freq, m.rotary.attn_scale, m.rotary.ws), self.tied
        loader = TrainLoader(h, self.rank, self.world, self.device)
        firsts = {}
        for s in range(h.num_iterations):
            plan = self.schedule.at(s)
            firsts.setdefault((plan.windows, plan.batch_size, len(plan.mtp)), s)
        phases = sorted(firsts.values())
        phase_steps = [sum(i * len(phases) // n_steps == k for i in range(n_steps)) for k in range(len(phases))]
        for k, (step, n) in enumerate(zip(phases, phase_steps)):
            t0 = time.perf_counter()
            for _ in range(max(n, k == 0)):
                self.train_step(step, loader)
            if k == 0:  # Adam's two graphs, the embedding tied (skipped) and untied, on the gradients step 0 left
                for skip in ([m.embed.weight], []):
                    self.adam.step(1.0, skip=skip)
            self.sync()
            plan = self.schedule.at(step)
            if n:
                log(f"kernel warmup {k + 1}/{len(phases)}: windows {plan.windows}, {plan.batch_size} tokens, "
                    f"{len(plan.mtp)} predictions, {n} steps, {time.perf_counter() - t0:.1f}s (untimed)")
        m.load_state_dict(saved["model"])
        for live, keep in zip(self.muon.state() + self.adam.state(), saved["opt"]):
            for k in live:
                live[k].copy_(keep[k])
        self.adam.t, self.ema, self.tied = saved["t"], saved["ema"], tied
        if self.sparse_rows is not None:
            self.sparse_rows.touched = saved["touched"]
        for p, g in zip(self.adam_params, saved["grads"]):
            p.grad = g
        for p in self.muon_params:
            p.grad = None
        m.rotary.freq, m.rotary.attn_scale, m.rotary.ws = rot
        m.rotary._tables()
        self.loss_sum.copy_(saved["loss"])

    def update_ema(self, t):  # after step t (0-based): the warmup rule gives decay 0.1 after the first step
        d = min(self.h.ema_decay, (1 + t) / (10 + t)) if self.h.ema_warmup else self.h.ema_decay
        torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.model.parameters()], 1 - d)

    def snapshot(self, step):
        weights = [p.detach().to("cpu", copy=True) for p in self.model.parameters()]
        self.snapshots = (self.snapshots + [(step, weights)])[-self.h.average_last:]

    def average(self):  # uniform, in fp32
        return [sum(w.float() for w in ws) / len(ws) for ws in zip(*(snap for _, snap in self.snapshots))]

    def train_loss(self, tokens):
        """Mean next-token training loss over the `tokens` tokens since the last read, read at validation.
        Collective."""
        total = self.loss_sum.clone()
        self.loss_sum.zero_()
        if self.world > 1:
            dist.all_reduce(total)
        return total.item() / tokens

    @torch.no_grad()
    def evaluate(self, step, val):
        self.model.eval()
        windows = self.set_windows(step)
        S, total = self.h.val_seq_len, torch.zeros((), device=self.device)
        slabs = list(range(0, self.h.val_tokens, S))
        for s in slabs[self.rank::self.world]:
            tokens = val[s:min(s + S, self.h.val_tokens) + 1].astype(np.int64)
            pad = -(tokens.size - 1) % BLOCK  # whole blocks; the padded targets, after the real ones, are ignored
            inputs = np.pad(tokens[:-1], (0, pad))
            bigram = bigram_index(inputs, self.h.bigram_vocab_size) if self.h.bigram_vocab_size else None
            inputs, bigram = (None if a is None else torch.from_numpy(a).int().to(self.device)
                              for a in (inputs, bigram))
            targets = F.pad(torch.from_numpy(tokens[1:]).to(self.device), (0, pad), value=-100)
            masks = self.model.layer_masks(inputs, windows, self.flex)
            total += self.fwd(inputs, targets, bigram, masks, head_chunk=self.h.val_head_chunk)
        if self.world > 1:
            dist.all_reduce(total)
        return total.item() / self.h.val_tokens

    @torch.no_grad()
    def evaluate_weights(self, step, val, weights):
        """Val loss with other weights (EMA shadow, checkpoint average) in the model, then the live weights again.
        Collective."""
        live = [p.detach().clone() for p in self.model.parameters()]
        for p, w in zip(self.model.parameters(), weights):
            p.copy_(w)
        loss = self.evaluate(step, val)
        for p, w in zip(self.model.parameters(), live):
            p.copy_(w)
        return loss

    def val_fields(self, step, val, last):
        """The key:value fields after val_loss: EMA and (at the end) checkpoint-average val losses, weight norms.
        Collective."""
        out = f" ema_val_loss:{self.evaluate_weights(step, val, self.ema):.4f}" if self.ema is not None else ""
        if last and self.snapshots:
            out += f" avg_val_loss:{self.evaluate_weights(step, val, self.average()):.4f}"
        return out + "".join(f" {k}:{v:.2f}" for k, v in weight_norms(self.model).items())

    def state_dict(self):
        """World-size independent: optimizer shards are gathered. Collective: every rank calls it."""
        def gather(t, sharded=True):
            if self.world == 1 or not sharded:
                return t.cpu()
            bits = t.view(torch.bfloat16) if t.dtype == torch.int16 else t  # NCCL and gloo move no int16 (NorMuon's lo)
            out = bits.new_empty(t.size(0) * self.world, *t.shape[1:])
            dist.all_gather_into_tensor(out, bits.contiguous())
            return out.view(t.dtype).cpu()
        muon = [{k: gather(v)[:g["n"]] for k, v in s.items()} for g, s in zip(self.muon.groups, self.muon.state())]
        pending = []
        for p in self.adam_params:  # gradients that Adam has accumulated but not yet used (after an even step)
            if p.grad is None:
                pending.append(None)
                continue
            g = p.grad.clone()
            if self.world > 1:
                dist.all_reduce(g)
            pending.append(g.cpu())
        adam = [{k: gather(v, sh) for k, v in s.items()} for s, sh in zip(self.adam.state(), self.adam.sharded)]
        model = {k: v.cpu() for k, v in self.model.state_dict().items()}
        if self.world > 1:  # each rank renews its own slots' FP8 activation scales: slot rank + world * a
            mine = self.model.fp8_act_scales[self.rank::self.world]
            model["fp8_act_scales"] = gather(mine).unflatten(0, (self.world, -1)).transpose(0, 1).flatten(0, 1)
        return dict(model=model, muon=muon, adam=adam,
                    adam_t=list(self.adam.t), adam_pending=pending, tied=self.tied,
                    ema=None if self.ema is None else [t.cpu() for t in self.ema], snapshots=self.snapshots)

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd["model"])
        for g, s, saved in zip(self.muon.groups, self.muon.state(), sd["muon"]):
            for key, t in s.items():
                n = t.size(0) * self.world  # padded stack; take this rank's slice
                full = torch.zeros(n, *t.shape[1:], dtype=t.dtype)
                full[:saved[key].size(0)] = saved[key]
                t.copy_(full[self.rank * t.size(0):(self.rank + 1) * t.size(0)])
        for s, sharded, saved in zip(self.adam.state(), self.adam.sharded, sd["adam"]):
            for key, t in s.items():
                t.copy_(saved[key][self.rank * t.size(0):(self.rank + 1) * t.size(0)] if sharded else saved[key])
        self.adam.t = list(sd["adam_t"])
        for p, g in zip(self.adam_params, sd["adam_pending"]):  # rank 0 holds the summed pending gradient
            p.grad = None if g is None else (g.to(p.device) if self.rank == 0 else torch.zeros_like(p))
            if self.sparse_rows is not None and p is self.sparse_rows.param and g is not None and self.rank == 0:
                self.sparse_rows.add(g.ne(0).any(1).numpy())  # its nonzero rows: the others add nothing
        self.tied = sd["tied"]
        if self.ema is not None:  # a checkpoint without a shadow starts it from its weights
            if sd.get("ema"):
                self.ema = [t.to(self.device) for t in sd["ema"]]
            else:
                self.ema = [p.detach().float().clone() for p in self.model.parameters()]
        self.snapshots = sd.get("snapshots", [])[-self.h.average_last:] if self.h.average_last else []

def weight_norms(model):
    """wnorm: global L2 norm of the weights; per group: wnorm_attn (Q/K and V/O banks), wnorm_mlp (MLP bank),
    wnorm_embed (token embedding), wnorm_value_embed (value embeddings), wnorm_bigram (bigram hash table), wnorm_head
    (lm_head), wnorm_scalars (the rest: lambdas, gates, MUDD weights). The tables are apart: 95% of the weights."""
    groups = dict(qk_bank="attn", vo_bank="attn", mlp_bank="mlp", embed="embed", value_embeds="value_embed",
                  bigram_embed="bigram", lm_head="head")
    sq = dict.fromkeys(("attn", "mlp", "embed", "value_embed", "bigram", "head", "scalars"), 0.0)
    for name, p in model.named_parameters():
        sq[groups.get(name.removesuffix(".weight"), "scalars")] += p.detach().double().square().sum().item()
    return {"wnorm": math.sqrt(sum(sq.values())), **{f"wnorm_{g}": math.sqrt(v) for g, v in sq.items()}}

def environment(h, world):
    lines = [f"Running Python {sys.version}",
             f"Running PyTorch {torch.__version__} compiled for CUDA {torch.version.cuda}"]
    try:
        import triton
        lines.append(f"Running Triton version {triton.__version__}")
    except ImportError:
        lines.append("Running Triton version: not installed")
    try:
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
    except (OSError, subprocess.SubprocessError):
        lines.append("nvidia-smi: not available")
    lines += [f"allocator: {k}={os.environ[k]}" for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
              if k in os.environ]
    # as the flags that reproduce the run, quoted for a shell where needed ('*' of --train_files), to paste back
    lines += ["hyperparameters:"] + [f"  --{k}={shlex.quote(flag_value(v))}" for k, v in dataclasses.asdict(h).items()]
    lines.append(f"world_size={world}")
    return "\n".join(lines)

def prefix_vocab(h):
    """The byte strings and ids of --prefix_encoding's tokens (tiktoken), loaded before the clock starts."""
    try:
        import tiktoken
        return tiktoken.get_encoding(h.prefix_encoding)._mergeable_ranks
    except Exception as e:  # no network, no cache, unknown name: tiktoken raises several types
        raise UserError(f"--prefix_encoding={h.prefix_encoding}: tiktoken cannot load it ({type(e).__name__}); the "
                        "prefix-token loss needs its vocabulary: run once online to cache it, or pass --prefix_weight=0"
                        ) from None

def prefix_table(vocab, vocab_size):
    """Token id -> id of the token whose bytes are the longest proper prefix of its bytes; -1: none. In sorted byte
    order every prefix comes before its extensions, so one pass with a stack of the current prefixes finds it."""
    table, stack = np.full(vocab_size, -1, dtype=np.int64), []
    for token, tid in sorted(vocab.items()):
        if tid >= vocab_size:
            continue  # no entry, and the prefix of none: the head cannot predict it
        while stack and not token.startswith(stack[-1][0]):
            stack.pop()
        if stack:
            table[tid] = stack[-1][1]
        stack.append((token, tid))
    return table

RANGES = [  # (fields, rule, what the rule says): every numeric hyperparameter is checked before any work
    (("val_tokens", "val_seq_len", "val_head_chunk", "train_batch_size", "train_max_seq_len", "num_iterations",
      "num_heads", "ws_extension", "ws_validate", "bigram_sign_rows", "dc_window"), lambda v: v >= 1, ">= 1"),
    (("num_extension_iterations", "warmup_steps", "val_loss_every", "momentum_warmup_steps", "momentum_cooldown_steps",
      "kernel_warmup_steps", "checkpoint_every", "average_last", "weight_decay", "adam_weight_decay", "min_lr_frac",
      "stage_lr", "untie_stage", "bigram_vocab_size"), lambda v: v >= 0, ">= 0"),
    (("lr", "adam_lr", "adam_eps"), lambda v: v > 0, "> 0"),
    (("momentum", "momentum_min", "beta2", "ema_decay"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("cooldown_frac",), lambda v: 0 < v <= 1, "in (0, 1]")]

def validate(h, world):
    for names, rule, what in RANGES:
        for name in names:
            value = getattr(h, name)
            for v in value if isinstance(value, tuple) else (value,):
                if not math.isfinite(v):
                    raise UserError(f"--{name}={flag_value(value)} must be a finite number")
                if not rule(v):
                    raise UserError(f"--{name}={flag_value(value)} must be {what}")
    S, n = h.num_iterations - h.num_extension_iterations, len(h.ws_schedule)
    for name in ("train_batch_size", "train_max_seq_len", "stage_lr"):
        if len(getattr(h, name)) not in (1, n):
            raise UserError(f"--{name}={flag_value(getattr(h, name))}: give one value or one per stage "
                            f"({n} stages, as --ws_schedule)")
    if any(len(start) != 1 for start, _ in stage_weights(h.prefix_weight, n, "prefix_weight")):
        raise UserError(f"--prefix_weight={h.prefix_weight}: give one weight per stage ('w' or 'start>end')")
    mtp = stage_weights(h.mtp_weights, n, "mtp_weights")
    if any(not 0 < len(start) <= 8 for start, _ in mtp):
        raise UserError(f"--mtp_weights={h.mtp_weights}: give 1 to 8 weights per stage")
    if not any(start[0] > 0 or end[0] > 0 for start, end in mtp):
        raise UserError(f"--mtp_weights={h.mtp_weights}: the next-token (first) weight is 0 in every stage; "
                        "nothing would learn to predict the next token")
    need_w = int(h.lr_schedule == "noam")
    if h.lr_schedule in ("warmup", "warmup_decay"):
        need_w = 2 if h.warmup_type == "log" else 1
    checks = [
        (8 % world == 0, f"world size {world} does not divide 8: use 1, 2, 4 or 8 processes"),
        (all(b % (8 * BLOCK) == 0 for b in h.train_batch_size),
         f"--train_batch_size={flag_value(h.train_batch_size)}: use multiples of 1024"),
        (h.bigram_vocab_size == 0 or (h.bigram_vocab_size >= 2 and h.bigram_vocab_size % 8 == 0),
         f"--bigram_vocab_size={h.bigram_vocab_size}: use 0 (none) or a multiple of 8"),
        (h.bigram_vocab_size <= 2 ** 31, f"--bigram_vocab_size={h.bigram_vocab_size}: at most 2^31 rows (the hash is "
                                         "int32, as the record)"),
        (0 < S, "--num_extension_iterations must be smaller than --num_iterations"),
        (h.model_dim % h.num_heads == 0 and (h.model_dim // h.num_heads) % 4 == 0,
         "--model_dim must be --num_heads times a multiple of 4"),
        (h.model_dim >= 12 and 2 <= h.num_layers <= 11, "--model_dim must be >= 12 and --num_layers 2 to 11"),
        (h.num_heads % 2 == 0, f"--num_heads={h.num_heads}: use an even number (paired-head attention)"),
        (0 <= h.bos_id < h.vocab_size, f"--bos_id={h.bos_id}: give a token id below --vocab_size={h.vocab_size}"),
        (h.vocab_size % 8 == 0, f"--vocab_size={h.vocab_size}: use a multiple of 8"),
        (len(h.ws_schedule) > 0 and min(h.ws_schedule) >= 1,
         f"--ws_schedule={flag_value(h.ws_schedule)}: give one or more windows >= 1 (in 128-token blocks)"),
        (h.lr_schedule in LR_SCHEDULES, f"--lr_schedule={h.lr_schedule}: use one of {', '.join(LR_SCHEDULES)}"),
        (h.warmup_type in ("log", "linear"), f"--warmup_type={h.warmup_type}: use log or linear"),
        (h.warmup_steps >= need_w, f"--lr_schedule={h.lr_schedule} needs --warmup_steps >= {need_w}"),
        (h.lr_schedule not in ("cosine", "warmup_decay") or h.warmup_steps < S,
         f"--warmup_steps={h.warmup_steps} must be below the {S} scheduled steps for --lr_schedule={h.lr_schedule}"),
        (h.wd_mode in ("cautious", "decoupled", "l2", "none"),
         f"--wd_mode={h.wd_mode}: use cautious, decoupled, l2 or none"),
        (h.wd_schedule in ("lr", "constant"), f"--wd_schedule={h.wd_schedule}: use lr or constant"),
        (h.average_last == 0 or h.checkpoint_every > 0, "--average_last needs --checkpoint_every > 0 (their interval)"),
        (h.run_id == "" or (re.fullmatch(r"[\w.-]+", h.run_id) and h.run_id not in (".", "..")),
         f"--run_id={h.run_id}: use a plain file name (letters, digits, '.', '_', '-'); the log is logs/<run_id>.txt"),
        (not h.resume or os.path.isfile(h.resume), f"--resume={h.resume}: no such file")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)

# hyperparameters that may differ on --resume (logged): they do not change the training math
RESUME_FREE = ("val_files", "val_tokens", "val_seq_len", "val_head_chunk", "val_fp32_softcap", "val_loss_every",
               "kernel_warmup_steps", "compile", "seed", "save_checkpoint", "checkpoint_every", "ema_decay",
               "ema_warmup", "average_last", "repeat_data")

def read_checkpoint(path, what, keys):
    """The state saved in path (what: how the message names it), a dict holding keys; else one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a whole checkpoint
        raise UserError(f"{what}: cannot be read as a checkpoint ({type(e).__name__}): truncated, or not a "
                        "state_step*.pt saved by train_gpt.py") from None
    if not isinstance(sd, dict) or not set(keys) <= sd.keys():
        raise UserError(f"{what}: not a checkpoint of train_gpt.py (no {', '.join(keys)} in it)")
    return sd

def load_checkpoint(h):
    """--resume: the saved state and the logged differences, after checking it against this run's hyperparameters."""
    sd = read_checkpoint(h.resume, f"--resume={h.resume}", ("model", "muon", "adam", "step", "hyperparameters"))
    if "tied" not in sd or not isinstance(sd.get("adam_t"), list):  # before the tied head; one Adam step count
        raise UserError(f"--resume={h.resume}: saved by an older version of train_gpt.py, whose state this version "
                        "does not read: resume it with the version that saved it")
    saved, now = sd["hyperparameters"], dataclasses.asdict(h)
    # every field but this run's own file names (--resume, --run_id)
    differ = [k for k in now if k not in ("resume", "run_id") and saved.get(k, "(absent)") != now[k]]
    changes_math = [k for k in differ if k not in RESUME_FREE]
    flags = lambda keys: ", ".join(f"--{k}={flag_value(saved.get(k, '(absent)'))} (now {flag_value(now[k])})"
                                   for k in keys)
    if sd["step"] >= h.num_iterations:
        raise UserError(f"--resume={h.resume}: the checkpoint is at step {sd['step']}, "
                        f"--num_iterations={h.num_iterations}: nothing left to train")
    if changes_math:
        raise UserError(f"--resume={h.resume}: saved with other hyperparameters that change the training: "
                        + flags(changes_math))
    return sd, flags(differ)

def load_for_eval(path, rank=0, world=1, device=torch.device("cpu"), **overrides):
    """A saved run for the evaluation tools (evals/): (a Trainer with the checkpoint's hyperparameters, overrides
    replacing some (this machine's data paths), and its weights; the step it was saved at). The rotary state is that
    step's, replayed as --resume does. Any world size: a checkpoint holds whole weights. One line for a file that is
    no checkpoint of train_gpt.py or whose weights do not fit its own hyperparameters."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (a checkpoint is logs/<run_id>/state_step*.pt of a run with "
                        "--save_checkpoint=1)")
    sd = read_checkpoint(path, path, ("model", "step", "hyperparameters"))  # an average_step*.pt has weights only
    known = {f.name for f in dataclasses.fields(Hyperparameters)}
    h = Hyperparameters(**{**{k: v for k, v in sd["hyperparameters"].items() if k in known}, **overrides})
    trainer = Trainer(h, rank, world, device)
    try:
        trainer.model.load_state_dict(sd["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path}: its weights do not fit the model its hyperparameters describe "
                        f"({str(e).splitlines()[0][:200]})") from None
    trainer.replay_windows(min(sd["step"], h.num_iterations))
    return trainer, sd["step"]

def tool_args(argv, options, usage):
    """The evals/ tools' command line: CHECKPOINT and --name=value options ({name: (type, default)}): (the path,
    {name: value}). -h / --help prints usage; anything else wrong: a UserError of one line."""
    if argv in (["-h"], ["--help"]):
        print(usage)
        sys.exit(0)
    paths = [a for a in argv if not a.startswith("--")]
    if len(paths) != 1:
        raise UserError(f"one checkpoint expected, got {len(paths)}; {usage}")
    opts = {name: default for name, (_, default) in options.items()}
    for arg in argv:
        name, eq, value = arg[2:].partition("=")
        if not arg.startswith("--"):
            continue
        if name not in options or not eq:
            raise UserError(f"unknown option {arg} (--name=value); {usage}")
        kind = options[name][0]
        try:
            opts[name] = kind(value)
        except ValueError:
            raise UserError(f"--{name}={value}: not {'an integer' if kind is int else 'a number'}") from None
    return paths[0], opts

def tool_encoding(name, vocab_size, flag="--encoding"):
    """The evals' tiktoken encoding, which must fit the model's vocabulary."""
    try:
        import tiktoken
        enc = tiktoken.get_encoding(name)
    except Exception as e:  # no network, no cache, unknown name: tiktoken raises several types
        raise UserError(f"{flag}={name}: tiktoken cannot load it ({type(e).__name__}); run once online to cache it, "
                        "or name a plugin encoding") from None
    if enc.n_vocab > vocab_size:
        raise UserError(f"{flag}={name} has {enc.n_vocab} tokens, the model {vocab_size}: not its tokenizer")
    return enc

def run_tool(main, name):
    """An evals/ tool's entry: main(sys.argv[1:]); a UserError: one line on rank 0's stderr, exit code 2."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)

def pick_device():  # this process's: cuda:LOCAL_RANK, else the CPU
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device

def start_group(device, world):
    """On 2+ ranks, the process group: NCCL with gloo for host tensors (SparseRows' row counts), as the record, or
    gloo alone on CPUs."""
    if world > 1:
        cuda = device.type == "cuda"
        dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo", device_id=device if cuda else None)

def save_checkpoint(obj, path):
    """torch.save under a temporary name, renamed when complete: a failed save never leaves a partial file."""
    try:
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch's writer reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise UserError(f"{path}: cannot save the checkpoint ({getattr(e, 'strerror', None) or 'write failed'}; "
                        "is the disk full?)") from None

def check_writable(folder):
    """The checkpoint folder, made and written to once before training: a run never trains to its end and then finds
    that it cannot save."""
    probe = os.path.join(folder, ".write_check")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{folder}: cannot write checkpoints there ({e.strerror}); choose another --run_id or fix the "
                        "folder") from None

PROGRESS = dict(at="before training started", saved="nothing saved")  # for the one line that Ctrl-C prints

def main(argv):
    configure_allocator()
    h = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    validate(h, world)
    PROGRESS.update(at="before training started", saved="nothing saved")
    # check the data and the checkpoint before anything heavy and before the log exists
    val = load_val(h)
    sd, resume_changes = load_checkpoint(h) if h.resume else (None, "")
    start, train_ms, loader_state = (sd["step"], sd["train_ms"], sd["loader"]) if sd else (0, 0.0, dict())
    plans = Schedule(h).plans
    shapes = [(p.batch_size // 8, p.max_seq_len) for p in plans[start:h.num_iterations]]
    check_train_data(h, shapes, loader_state.get("file_idx", 0), loader_state.get("ptr", 0))
    vocab = prefix_vocab(h) if any(p.prefix > 0 for p in plans[start:]) else None  # tiktoken, before the clock
    if h.run_evals:  # the data and the encoding, checked before training; the evals resolve train_gpt to this module
        sys.modules.setdefault("train_gpt", sys.modules[__name__])
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "evals"))
        import hellaswag
        hellaswag_items = hellaswag.load_items(h.hellaswag_data or None, "--hellaswag_data")
        hellaswag_encoding = tool_encoding(h.eval_encoding, h.vocab_size, "--eval_encoding")
    device = pick_device()
    check_model_fits(h, device)
    start_group(device, world)
    master = rank == 0
    run_id = h.run_id or str(uuid.uuid4())
    logfile = f"logs/{run_id}.txt"
    if master and h.save_checkpoint:
        check_writable(f"logs/{run_id}")
    def write_log(text, mode="a"):  # rank 0 only
        try:
            with open(logfile, mode) as f:
                f.write(text)
        except FileExistsError:
            raise UserError(f"{logfile} exists: choose another --run_id (a log is never overwritten)") from None
        except OSError as e:
            raise UserError(f"{logfile}: cannot write the log ({e.strerror}); the run stops") from None
    def log(s):
        if master:
            print(s)
            write_log(s + "\n")
    if master:
        os.makedirs("logs", exist_ok=True)
        with open(__file__) as f:
            code = f.read()
        write_log(code + "\n" + "=" * 100 + "\n" + environment(h, world) + "\n" + "=" * 100 + "\n", mode="x")
        print(f"log: {logfile}")

    trainer = Trainer(h, rank, world, device)
    torch._dynamo.config.recompile_limit = 64
    if sd is not None:
        try:
            trainer.load_state_dict(sd)
        except (RuntimeError, KeyError, IndexError, ValueError) as e:
            raise UserError(f"--resume={h.resume}: its state does not fit this script's model or optimizer "
                            f"({str(e).splitlines()[0][:200]})") from None
        trainer.replay_windows(start)
        log(f"resumed from {h.resume} at step {start}"
            + (f"; changed since it was saved: {resume_changes}" if resume_changes else ""))
    del sd

    if h.kernel_warmup_steps > 0 and h.compile:
        trainer.kernel_warmup(h.kernel_warmup_steps, log)
    elif h.kernel_warmup_steps > 0:
        log("kernel warmup: skipped, nothing is compiled (--compile=0)")

    loader = TrainLoader(h, rank, world, device, **loader_state)
    flops_token = 6 * matmul_params_per_token(h)
    total_flops, val_loss, last_val = 0.0, float("nan"), start
    clock = Clock(train_ms, trainer.sync)
    if vocab is not None:  # the prefix-token table is built on the clock, as the record
        trainer.model.prefix_table.copy_(torch.from_numpy(prefix_table(vocab, h.vocab_size)))
    for step in range(start, h.num_iterations + 1):
        last = step == h.num_iterations
        PROGRESS["at"] = f"at step {step} of {h.num_iterations}"
        if h.average_last and step > start and (last or step % h.checkpoint_every == 0):  # untimed, like a checkpoint
            clock.stop()
            trainer.snapshot(step)
            clock.start()
        if last or (h.val_loss_every > 0 and step % h.val_loss_every == 0):
            clock.stop()
            tokens = sum(p.batch_size for p in plans[last_val:step])
            train_loss, diverged = trainer.train_loss(tokens) if step > last_val else None, None
            if train_loss is not None and not math.isfinite(train_loss):
                diverged = f"the training loss became non-finite between steps {last_val + 1} and {step}"
            else:
                val_loss, last_val = trainer.evaluate(step, val), step
                log(f"step:{step}/{h.num_iterations} val_loss:{val_loss:.4f} train_time:{clock.ms:.0f}ms "
                    f"step_avg:{clock.ms / max(step, 1):.2f}ms"
                    + (f" train_loss:{train_loss:.4f}" if train_loss is not None else "")
                    + trainer.val_fields(step, val, last))
                if not math.isfinite(val_loss):
                    diverged = f"the val loss is non-finite at step {step}: it diverged"
            if diverged:
                log(f"step:{step}/{h.num_iterations} stopped: {diverged}")
                raise UserError(f"{diverged} (see {logfile}): lower --lr or --adam_lr")
            clock.start()
        if h.save_checkpoint and (last or (h.checkpoint_every > 0 and step > start and step % h.checkpoint_every == 0)):
            clock.stop()
            sd = trainer.state_dict()
            if master:
                os.makedirs(f"logs/{run_id}", exist_ok=True)
                path = f"logs/{run_id}/state_step{step:06d}.pt"
                save_checkpoint(dict(sd, step=step, train_ms=clock.ms, loader=loader.state(),
                                     hyperparameters=dataclasses.asdict(h)), path)
                log(f"checkpoint: {path}")
                PROGRESS["saved"] = f"last checkpoint {path} (continue with --resume={path})"
                if last and trainer.snapshots:
                    names, steps = [k for k, _ in trainer.model.named_parameters()], [s for s, _ in trainer.snapshots]
                    path = f"logs/{run_id}/average_step{step:06d}.pt"
                    save_checkpoint(dict(model=dict(zip(names, trainer.average())), steps=steps), path)
                    log(f"checkpoint average: {path} (steps {','.join(map(str, steps))})")
            clock.start()
        if last:
            break
        epoch = loader.epoch
        windows, lengths = trainer.train_step(step, loader)
        if loader.epoch != epoch:
            log(f"train data: the files ran out at step {step}; pass {loader.epoch + 1} over them starts "
                "(--repeat_data=1)")
        total_flops += flops_token * plans[step].batch_size + trainer.model.attention_flops(lengths, windows)
        elapsed = clock.now()
        log(f"step:{step + 1}/{h.num_iterations} train_time:{elapsed:.0f}ms step_avg:{elapsed / (step + 1):.2f}ms")

    if device.type == "cuda":
        allocated, reserved = torch.cuda.max_memory_allocated() // 2**20, torch.cuda.max_memory_reserved() // 2**20
        log(f"peak memory allocated: {allocated} MiB reserved: {reserved} MiB")
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    else:
        log("peak memory allocated: 0 MiB reserved: 0 MiB")
        peak = None
    seconds = max((clock.ms - train_ms) / 1000, 1e-9)  # this process's steps and time (after a resume too)
    tokens_per_s = sum(p.batch_size for p in plans[start:h.num_iterations]) / seconds
    mfu = f"{100 * total_flops / seconds / (peak * world):.1f}%" if peak else "n/a"
    log(f"summary val_loss:{val_loss:.4f} train_time:{clock.ms:.0f}ms tokens_per_s:{tokens_per_s:.0f} mfu:{mfu}"
        + (f" mfu_peak_tflops:{peak / 1e12:.0f}" if peak else ""))
    if h.run_evals:  # the clock has stopped: the final weights, the final validation's windows
        log(hellaswag.summary(*hellaswag.evaluate(trainer, h.num_iterations, hellaswag_items, hellaswag_encoding)))
    if world > 1:  # tear the group down together, after rank 0's last file writes
        dist.barrier()
        dist.destroy_process_group()

class Terminated(Exception):  # SIGTERM, what torchrun and job schedulers send: ended like Ctrl-C
    pass

def raise_terminated(signum, frame):
    raise Terminated

if __name__ == "__main__":
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        main(sys.argv[1:])
    except (UserError, KeyboardInterrupt, Terminated) as e:
        why = e
        if not isinstance(e, UserError):
            how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            why = f"{how} {PROGRESS['at']}; {PROGRESS['saved']}"
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"train_gpt.py: error: {why}", file=sys.stderr)
        sys.exit(2)
