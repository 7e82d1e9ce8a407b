"""Peak memory of the largest training steps of train_gpt.py on one rank of 8, estimated on a CPU.

    python tests/estimate_memory.py

Nothing is allocated: the model, the optimizers and the step run on FakeTensorMode tensors (shapes and dtypes only),
and torch's MemTracker (torch.distributed._tools.mem_tracker) adds up the bytes of the storages alive after every
operator. What runs is the real code: Trainer(h, rank=0, world=8) with the default Hyperparameters (record #89's model:
11 layers, width 768, 6 heads, vocab 50304, 5 value-embedding tables, a bigram hash table of 377,280 rows, the
NorMuon banks in bf16, each rank keeping its matrices' low 16 bits) and two consecutive train_step calls of the
last stage after the untie (steps 848 and 849 of the default schedule: a slot of 393,216 / 8 = 49,152 tokens,
windows (5, 11), one prediction, no prefix loss; the second step also runs Adam, on gradients accumulated over both
steps), with trainer.tied = False as a run resumed there has it, and with the choices Trainer and GPT make on an
H100: bf16 model, FlexAttention BlockMasks, FP8 head and MLP projections. The step runs eagerly (no torch.compile).
To make that possible on a CPU build of torch, and nothing else:
- the tensors are fake CPU tensors (a CPU build cannot index a fake CUDA tensor), so GPT gets the dtype Trainer picks
  on CUDA (bf16), Trainer.flex, lm_head.fp8 and the model's fp8_mlp are set as on an H100, and the GPT is built on
  the meta device (a module built under FakeTensorMode cannot be cast with .to);
- FlexAttention's check that refuses a backward on CPU is skipped, and its eager wrapper calls the operator directly,
  whose fake implementation allocates what the CUDA kernel returns (out, logsumexp) and, in backward, dq, dk, dv;
- F.rms_norm, which a CPU decomposes into fp32 operators, runs as an autograd function that keeps for backward what
  CUDA's fused kernel keeps (the input and one fp32 number per row);
- the fused head and loss (SoftcappedHeadLoss) allocates what its compiled kernels allocate (compiled_head_loss);
- the collectives are replaced by stand-ins that move no data and keep their tensors alive until wait(), as NCCL does;
  the bigram gradient's all-to-all (SparseRows) receives from each rank as many rows as it sends to it.
tests/test_compile_memory.py checks the result against a hand count (record_terms): its weights, optimizer state and
buffers were re-derived for record #89's model (banks, value-embedding table, MUDD weights; NorMuon momentum and second
moments of ceil(n / 8) matrices a bank) and match exactly; its bounds on the saved activations were re-derived per
layer kind (attention + MLP, MLP only, the last layer with MUDD and the DC correction) and the head's 3 bytes per
logit at the peak (s in bf16 and the e5m2 gradient).
"""
import contextlib, dataclasses, os, sys
from unittest import mock

import numpy as np
import torch

# modded-nanogpt record #43's published log: peak allocated per GPU (8xH100), of its step of 262,144 tokens
# (32,768 a GPU); record #89's memory is not published
REFERENCE_PEAK_MIB = 29248
REFERENCE_RESERVED_MIB = 50528
WORLD = 8
GB = 1e9

LEFT_OUT = """left out of the estimate:
- torch.compile in the layers: the compiled graph fuses pointwise chains (rms_norm, rotary, relu^2, XSA, the gates,
  the MUDD mixes, the bigram sign product) and its partitioner keeps fewer tensors for backward, recomputing cheap
  ones: the compiled peak is likely lower, most of all in the DC correction of the last layer, whose eager banded
  form keeps the scores' fp32 softmax (the record runs a Triton kernel)
- the FP8 MLP's e4m3 copies of its operands: they live only inside its projections, as the record's (its backward
  keeps x and post = relu(x W)^2 only)
- FlexAttention's compiled kernels: their workspace is not modelled (the operator's outputs and gradients are)
- the FP8 head's kernels: _scaled_mm's internals and the copies inside fp8_mm / fp8_mm_backward (only the operator's
  outputs count: bf16 logits, e4m3 copies of x and W, and in backward grad_x bf16 and grad_w fp32; the gradient's
  transposed e5m2 copy comes after s is freed in the compiled backward)
- the caching allocator: rounding to 512-byte blocks (negligible here), fragmentation and cached free blocks, which is
  what "reserved" adds (the reference reserved 50,528 MiB for its 29,248 MiB allocated)
- NCCL's own buffers and the CUDA context (outside torch's allocator); the Polar Express kernels' workspace
- main() around the step: the untimed kernel warmup keeps a deepcopy of weights and optimizer state (printed above),
  validation (262,144 tokens per forward, no grad), --ema_decay and --average_last state
- the steps of stages 1 and 2 (slots of 16,384 and 32,768 tokens, 3 and 2 predictions, a prefix loss) and the untie
  step itself (Adam's moments of the head copied to the embedding's: no new memory)"""


class Work:
    """An asynchronous collective: no data moves, its tensors stay alive until wait() as NCCL keeps them."""
    def __init__(self, *tensors):
        self.tensors = tensors

    def wait(self):
        self.tensors = None


class NoCollectives:
    """Stands for torch.distributed in train_gpt: the output shapes and lifetimes of NCCL's collectives, no data."""
    def broadcast(self, tensor, src):
        return None

    def reduce_scatter_tensor(self, out, full, async_op):
        return Work(out, full)

    def all_gather_into_tensor(self, out, shard, async_op):
        return Work(out, shard)

    def all_reduce(self, tensor, async_op=False):  # in place: DistAdam's replicated parameters (the gates)
        return Work(tensor) if async_op else None

    def all_to_all_single(self, out, inp, output_split_sizes=None, input_split_sizes=None, async_op=False):
        return Work(out, inp)  # SparseRows: its counts, row numbers and gradient rows


def symmetric_sparse_rows(tg, unset_fake_temporarily):
    """tg.SparseRows receiving as many rows from each rank as it sends to it (the stand-in collectives move no data,
    so not the counts either)."""
    class SymmetricSparseRows(tg.SparseRows):
        def start(self):
            super().start()
            with unset_fake_temporarily():
                self.recv_counts = torch.tensor(self.send_counts.tolist())
    return SymmetricSparseRows


class FusedRMSNorm(torch.autograd.Function):
    """F.rms_norm as CUDA runs it (aten._fused_rms_norm, one kernel each way): backward keeps the input and one fp32
    reciprocal RMS per row. On a CPU, F.rms_norm decomposes into fp32 operators whose backward keeps an fp32 copy of
    the input (GBs more at the peak of the record-size step: an fp32 copy of every normed input)."""
    @staticmethod
    def forward(ctx, x):
        accumulate = torch.promote_types(x.dtype, torch.float32)
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=accumulate).square() / x.size(-1)
        rstd = torch.rsqrt(mean_square + torch.finfo(x.dtype).eps)
        ctx.save_for_backward(x, rstd)
        return x * rstd.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd = ctx.saved_tensors
        x_hat = x * rstd.to(x.dtype)
        return (grad - x_hat * (grad * x_hat).mean(-1, keepdim=True)) * rstd.to(x.dtype)


class OneSlotLoader:
    """next_step(batch_size, max_seq_len) of TrainLoader on rank 0 of 8: one slot of batch_size / 8 fake tokens and
    their bigram rows in [0, n_rows), in one buffer as TrainLoader sends them, and the rows on the host
    (bigram_rows, for SparseRows): uniformly random, more distinct rows than text hashes to (so at least as many
    gradient rows exchanged); other values do not matter to memory."""
    def __init__(self, vocab_size, n_rows):
        self.vocab_size, self.n_rows, self.rng = vocab_size, n_rows, np.random.default_rng(0)

    def next_step(self, batch_size, max_seq_len):
        n = batch_size // 8 + 1
        tokens = torch.randint(0, self.vocab_size, (n,), dtype=torch.int32)
        if not self.n_rows:
            self.bigram_rows = []
            return [(tokens[:-1], tokens[1:].long(), None)], []
        self.bigram_rows = [self.rng.integers(0, self.n_rows, n - 1).astype(np.int32)]
        buf = torch.stack([tokens, torch.randint(0, self.n_rows, (n,), dtype=torch.int32)])
        return [(buf[0, :-1], buf[0, 1:].long(), buf[1, :-1])], []


def compiled_head_loss(tg):
    """tg.SoftcappedHeadLoss as its compiled kernels allocate (tests/test_cuda_path.py reads these buffers from
    Inductor's generated code): forward, the FP8 head's bf16 logits, which the softcap overwrites in place and backward
    keeps (s), and one fp32 number a row; backward, the e5m2 gradient, then the FP8 products. Its eager arithmetic
    would add fp32 T x V temporaries that the compiled kernels keep in registers. (The compiled backward frees s
    before fp8_mm_backward transposes the gradient, 1 byte a logit more, inside the operator: here s stays, which
    counts the same.)"""
    class CompiledHeadLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, cols, weights, fp8):
            assert fp8, "the estimate runs the FP8 head, as an H100"
            s, xf, wf = tg.fp8_mm(x, w, *tg.HEAD_SCALES[:2])
            lse = s.new_empty(s.size(0), dtype=torch.float32)
            ctx.save_for_backward(s, lse, xf, wf)
            ctx.w_dtype = w.dtype
            next_token = lse.sum()
            ctx.mark_non_differentiable(next_token)
            return lse.sum(), next_token

        @staticmethod
        def backward(ctx, grad, _):
            s, lse, xf, wf = ctx.saved_tensors
            gf = torch.empty_like(s, dtype=torch.float8_e5m2)
            grad_x, grad_w = tg.fp8_mm_backward(gf, xf, wf, *tg.HEAD_SCALES)
            return grad_x, grad_w.to(ctx.w_dtype), None, None, None
    return CompiledHeadLoss


def record_steps(schedule):
    """The first two steps of the last stage after the untie (848 and 849 by default): an even step, then an odd one
    that runs Adam on the gradients of both."""
    first = max(schedule.bounds[schedule.n - 1], schedule.untie_step + 1 if schedule.untie_step is not None else 0)
    first += first % 2
    return first, first + 1


def step_tracker():
    """A MemTracker that lets flex_attention through and records the peak of each phase of the step."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepTracker(MemTracker):
        supports_higher_order_operators = True  # higher-order operators pass on to the fake mode below it

        def __init__(self):
            super().__init__()
            self.phase, self.phase_peaks, self.peak_phase = "setup", {}, None

        def _update_peak_stats(self, peak_state):
            # the peak overall and per phase; MemTracker's per-module peaks (40% of the run time) are not kept
            for device, snapshot in self._curr_mem_snap.items():
                now = snapshot["Total"]
                self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), now)
                if now > self._peak_mem.get(device, 0):
                    self._peak_mem[device], self._peak_mem_snap[device] = now, dict(snapshot)
                    self.peak_phase = self.phase

        def entering(self, phase, function):
            """function, run in the named phase."""
            def run(*args, **kwargs):
                self.phase = phase
                return function(*args, **kwargs)
            return run
    return StepTracker()


def by_name(snapshot):
    """Bytes of a MemTracker snapshot (one device) by category name, with 'Total'."""
    (per_device,) = snapshot.values()
    return {str(getattr(key, "value", key)): value for key, value in per_device.items()}


def optimizer_state(trainer):
    """The tensors NorMuon and DistAdam keep between steps on this rank."""
    return [t for state in trainer.muon.state() + trainer.adam.state() for t in state.values()]


def estimate(h=None):
    """Run record_steps() on fake tensors; return the peak, its breakdown and each phase's peak, in bytes."""
    import torch.nn.attention.flex_attention as flex_module
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    import train_gpt as tg

    h = dataclasses.replace(h or tg.Hyperparameters(), compile=False)
    real_gpt = tg.GPT

    def gpt_on_meta(hyper, max_len, dtype):  # the dtype Trainer picks on CUDA
        with unset_fake_temporarily(), torch.device("meta"):
            return real_gpt(hyper, max_len, torch.bfloat16)

    patches = [mock.patch.object(tg, "GPT", gpt_on_meta), mock.patch.object(tg, "dist", NoCollectives()),
               mock.patch.object(tg, "norm", FusedRMSNorm.apply),
               mock.patch.object(tg, "SoftcappedHeadLoss", compiled_head_loss(tg)),
               mock.patch.object(tg, "SparseRows", symmetric_sparse_rows(tg, unset_fake_temporarily)),
               mock.patch.object(flex_module, "_validate_device", lambda *tensors: None),
               mock.patch.object(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)]
    # non-fake inputs: the meta-device model is the input of Trainer's .to(device)
    with contextlib.ExitStack() as stack, FakeTensorMode(allow_non_fake_inputs=True):
        for patch in patches:
            stack.enter_context(patch)
        trainer = tg.Trainer(h, 0, WORLD, torch.device("cpu"))
        trainer.flex = True
        trainer.model.lm_head.fp8 = trainer.model.fp8_mlp = True
        steps = record_steps(trainer.schedule)
        # untied as Trainer.load_state_dict leaves a run resumed at steps[0]
        trainer.tied = trainer.schedule.untie_step is None or steps[0] <= trainer.schedule.untie_step
        loader = OneSlotLoader(h.vocab_size, h.bigram_vocab_size)
        tracker = step_tracker()
        tracker.track_external(trainer.model, *optimizer_state(trainer))
        muon_parts, adam_parts = (trainer.muon.launch, trainer.muon.finish), (trainer.adam.launch, trainer.adam.finish)
        with tracker:
            for step in steps:
                tracker.reset_mod_stats()
                trainer.fwd = tracker.entering(f"step {step} forward", trainer.model)
                loss_backward = tracker.entering(f"step {step} backward", torch.Tensor.backward)
                trainer.muon.launch, trainer.muon.finish = (tracker.entering(f"step {step} NorMuon", part)
                                                            for part in muon_parts)
                trainer.adam.launch, trainer.adam.finish = (tracker.entering(f"step {step} Adam", part)
                                                            for part in adam_parts)
                tracker.phase = f"step {step} batch and masks"
                with mock.patch.object(torch.Tensor, "backward", loss_backward):
                    trainer.train_step(step, loader)
                tracker.phase = f"after step {step}"
                tracker.phase_peaks[tracker.phase] = by_name(tracker.get_tracker_snapshot("current"))["Total"]
        params, plan = list(trainer.model.parameters()), trainer.schedule.at(steps[0])
        result = dict(peak=by_name(tracker.get_tracker_snapshot("peak")), peak_phase=tracker.peak_phase, steps=steps,
                      slot=plan.batch_size // 8, windows=plan.windows, predictions=len(plan.mtp), tied=trainer.tied,
                      phase_peaks=tracker.phase_peaks, weights=sum(p.nbytes for p in params),
                      optimizer_state=sum(t.nbytes for t in optimizer_state(trainer)),
                      buffers=sum(b.nbytes for b in trainer.model.buffers()),
                      adam_grads_after=sum(p.grad.nbytes for p in trainer.adam_params if p.grad is not None),
                      params=sum(p.numel() for p in params))
    return result


def report(result):
    peak, (first, second) = result["peak"], result["steps"]
    lines = [f"train_gpt.py, default Hyperparameters, rank 0 of {WORLD}: steps {first} and {second} (the last stage, "
             f"{'tied' if result['tied'] else 'untied'}; Adam in step {second}), one slot of {result['slot']:,} tokens "
             f"per step, windows {result['windows']}, {result['predictions']} prediction(s), bf16, FlexAttention, "
             "FP8 head and MLP projections, eager, on fake tensors",
             f"parameters: {result['params']:,}",
             f"estimated peak allocated: {peak['Total'] / GB:.2f} GB ({peak['Total'] / 2**20:,.0f} MiB), "
             f"in {result['peak_phase']}",
             "at the peak, by MemTracker's category (Other: the optimizer state; Activation: the forward's tensors; "
             "Temp: backward's):"]
    lines += [f"  {name:<10} {value / GB:6.2f} GB" for name, value in peak.items() if name != "Total" and value > 0]
    lines += [f"weights {result['weights'] / GB:.2f} GB, their gradients {result['weights'] / GB:.2f} GB once "
              f"backward is done, optimizer state {result['optimizer_state'] / GB:.2f} GB, buffers (rotary tables, "
              f"bigram signs, prefix table) {result['buffers'] / GB:.2f} GB",
              "peak allocated in each phase:"]
    lines += [f"  {phase:<28} {value / GB:6.2f} GB" for phase, value in result["phase_peaks"].items()
              if phase != "setup"]
    warmup_copy = result["weights"] + result["optimizer_state"]
    reference = REFERENCE_PEAK_MIB * 2**20
    lines += [f"main()'s kernel warmup also holds a deepcopy of the weights and the optimizer state: "
              f"+{warmup_copy / GB:.2f} GB during the warmup steps",
              f"reference (modded-nanogpt record #43's log): record #43's step of 32,768 tokens a GPU (a smaller "
              f"one, without a bigram table), compiled, 8xH100: peak allocated {REFERENCE_PEAK_MIB:,} MiB = "
              f"{reference / GB:.1f} GB, reserved {REFERENCE_RESERVED_MIB:,} MiB per GPU; this estimate is "
              f"{peak['Total'] / reference:.2f} x that peak allocated; record #89's memory is not published there",
              LEFT_OUT]
    return "\n".join(lines)


def main():
    print(report(estimate()))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
