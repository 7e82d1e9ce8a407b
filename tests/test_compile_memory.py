"""train_gpt.py's compiled CPU forward does not recompile across batches; the record step's memory estimate."""
import numpy as np
import pytest
import torch
import torch._dynamo.testing

import train_gpt as tg
from tests import estimate_memory

# 5 layers: attention in layers 1 (long window), 3 (short) and 4 (long). Slots of 4 blocks of 128 tokens. Windows
# (short, long) in blocks: (1, 2) at steps 0-1, (2, 4) at step 2.
TINY = ["--num_layers=5", "--model_dim=64", "--num_heads=2", "--train_batch_size=4096", "--ws_schedule=2,4",
        "--num_iterations=4", "--num_extension_iterations=1", "--val_seq_len=512", "--val_tokens=1024", "--compile=0"]


def stream(n, bos_positions, seed):
    """n + 1 tokens: random non-BOS tokens with BOS exactly at bos_positions."""
    tokens = np.random.default_rng(seed).integers(0, tg.BOS, n + 1)
    tokens[list(bos_positions)] = tg.BOS
    return torch.from_numpy(tokens).int()


class OneBatchLoader:
    """TrainLoader.next_step() stand-in: one micro-batch with the document boundaries a test chooses."""
    def __init__(self, tokens):
        self.tokens = tokens

    def next_step(self):
        return [(self.tokens[:-1], self.tokens[1:].long())], []


def recompile_reasons():
    return [str(reason) for reasons in torch._dynamo.utils.guard_failures.values() for reason in reasons]


@pytest.fixture
def one_thread():
    """One intra-op thread: on this shared 2-core machine a second thread makes every small op wait for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_compiled_forward_one_graph_per_window_pair_and_mode(one_thread):
    """Trainer's torch.compile(model, dynamic=False, fullgraph=True), with a backend that counts the graphs dynamo
    compiles and runs them as traced (torch._dynamo.testing.CompileCounter). Whether a call reuses a graph is decided
    by the guards dynamo installs while tracing, before any backend sees the graph, and with dynamic=False there are
    no symbolic shapes through which AOTAutograd or Inductor could add guards: the counts are those of the default
    Inductor backend, without its 20-30 s per graph on this CPU."""
    h = tg.parse_args(TINY)
    assert [tg.window_blocks(step, h) for step in range(3)] == [(1, 2), (1, 2), (2, 4)]
    torch._dynamo.reset()
    torch.manual_seed(0)
    trainer = tg.Trainer(h, 0, 1, torch.device("cpu"))
    masks = trainer.model.layer_masks(tg.make_masks(stream(512, [0], 0)[:-1], (1, 2), trainer.flex))
    assert [mask.window for mask in masks if mask is not None] == [2, 1, 2]  # both windows are in the graph
    counter = torch._dynamo.testing.CompileCounter()
    trainer.fwd = torch.compile(trainer.model, backend=counter, dynamic=False, fullgraph=True)  # as Trainer, h.compile
    rotary = trainer.model.rotary
    initial_rotary = (rotary.freq, rotary.attn_scale, rotary.ws)
    slot = h.train_batch_size // 8
    one_doc = OneBatchLoader(stream(slot, [0], 1))
    many_docs = OneBatchLoader(stream(slot, range(0, slot + 1, 37), 2))  # boundaries inside blocks
    block_aligned = OneBatchLoader(stream(slot, [0, 128, 384], 3))
    val = stream(h.val_tokens, [0, 5, 600, 800], 4).numpy()  # two val slabs with other boundaries
    for step, batch, graphs in [(0, one_doc, 1), (1, many_docs, 1),  # windows (1, 2): one graph
                                (2, block_aligned, 2), (2, many_docs, 2)]:  # (2, 4): one more
        trainer.train_step(step, batch)
        assert counter.frame_count == graphs, (step, recompile_reasons())
    # evaluation (eval mode, no_grad, the chunked head) is a graph of its own, even at the training windows and
    # length; both val slabs share it
    trainer.evaluate(2, val)
    assert counter.frame_count == 3, recompile_reasons()
    # main()'s kernel warmup visits the windows, then restores the rotary state; the timed steps replay the same YaRN
    # updates (same attention scales) and find every graph cached, the training graphs after evaluation too
    rotary.freq, rotary.attn_scale, rotary.ws = initial_rotary
    rotary._tables()
    trainer.train_step(0, block_aligned)
    trainer.train_step(2, one_doc)
    assert counter.frame_count == 3, recompile_reasons()
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def record_estimate():
    return estimate_memory.estimate()


def record_terms(h):
    """Bytes of the record configuration on rank 0 of 8, by hand from shared/reference/modded_nanogpt.md §1.1: four
    embedding tables and the head in bf16; qkvo_w in 10 attention layers, c_fc and c_proj in 11 MLP layers, in fp32;
    bf16 gates (12 -> heads per attention layer, 12 -> 1 smear); 5L + 2 fp32 scalars padded to a multiple of 8."""
    L, D, V, H = h.num_layers, h.model_dim, h.vocab_size, h.num_heads
    T, world, bf16, fp32 = h.train_batch_size // 8, 8, 2, 4
    n_attn, n_mlp, n_scalars = L - 2, L - 1, -(-(5 * L + 2) // 8) * 8
    tables = 5 * V * D * bf16
    weights = tables + (n_attn * 4 + n_mlp * 8) * D * D * fp32 + (n_attn * H + 1) * 12 * bf16 + n_scalars * fp32
    adam_grads = tables + n_scalars * fp32
    # NorMuon: momentum of ceil(n / world) matrices per group of one shape and dtype; DistAdam: bf16 m and v of
    # 1 / world of the rows (the second moments of NorMuon are a few kB: within the tolerance of the comparison)
    muon_momentum = (-(-n_attn // world) * 4 + -(-2 * n_mlp // world) * 4) * D * D * fp32
    muon_momentum += (-(-n_attn // world) * H + 1) * 12 * bf16
    adam_moments = 2 * (tables + n_scalars * bf16) // world
    # what the eager forward keeps for backward, in bf16 units u = T x D:
    # at least relu(x W) and its square (4 u each) in each MLP, FlexAttention's contiguous q, k, v and its output in
    # each attention layer, and at the head the softcap's sigmoid and the cross-entropy's log-softmax (T x V each);
    # at most: a block with attention and MLP keeps 3 residual-stream tensors, the normed input, the qkv projection
    # (3 u), normed q and k, flex's q, k, v and output, the gated output, the MLP's normed input, relu(x W) and its
    # square: 23 u, counted 24; an MLP-only block 11, counted 12; around the blocks (embedding, 3 value embeddings,
    # smear, x0, 5 skip sums, backout) 13, counted 16; the head 2 T x V, and 2 T x V more at once in backward
    u = T * D * bf16
    saved_at_least = n_mlp * 8 * u + n_attn * 4 * u + 2 * T * V * bf16
    saved_at_most = (24 * n_attn + 12 * (n_mlp - n_attn) + 16) * u + 4 * T * V * bf16
    return dict(weights=weights, adam_grads=adam_grads, optimizer_state=muon_momentum + adam_moments,
                rotary=2 * max(h.val_seq_len, T) * (D // H // 2) * bf16, saved_at_least=saved_at_least,
                saved_at_most=saved_at_most)


def test_record_memory_estimate_against_hand_formula(record_estimate):
    hand = record_terms(tg.Hyperparameters())
    assert record_estimate["weights"] == hand["weights"]  # the CUDA dtypes: bf16 tables and head, fp32 matrices
    assert record_estimate["peak"]["Parameter"] == hand["weights"]
    assert abs(record_estimate["optimizer_state"] - hand["optimizer_state"]) < 100_000
    assert record_estimate["peak"]["Other"] == record_estimate["optimizer_state"]  # counted at the peak
    assert record_estimate["buffers"] == hand["rotary"]
    assert record_estimate["adam_grads_after"] == 0  # step 1 ran Adam, which dropped its gradients
    static = hand["weights"] + hand["optimizer_state"] + hand["rotary"]
    # at the end of step 1's forward the weights, the optimizer state, Adam's gradients of step 0 and every saved
    # activation are alive at once: the peak is at least that
    assert record_estimate["peak"]["Total"] >= static + hand["adam_grads"] + hand["saved_at_least"]
    # and at most all the forward keeps and the head's backward adds, with all gradients and as much again for the
    # optimizer's stacked copies (fp32 activations, 45 GB, or a tensor counted twice would break this)
    assert record_estimate["peak"]["Total"] <= static + 2 * hand["weights"] + hand["saved_at_most"]


def test_fused_rms_norm_stand_in_is_rms_norm():
    torch.manual_seed(0)
    x = torch.randn(6, 48, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(6, 48, dtype=torch.float64)
    ours = estimate_memory.FusedRMSNorm.apply(x)
    reference = torch.nn.functional.rms_norm(x, (48,))
    assert torch.allclose(ours, reference, rtol=1e-12, atol=0)
    ours_grad, = torch.autograd.grad(ours, x, grad_out)
    reference_grad, = torch.autograd.grad(reference, x, grad_out)
    assert torch.allclose(ours_grad, reference_grad, rtol=1e-10, atol=1e-12)


def test_memory_report_compares_with_reference(record_estimate):
    text = estimate_memory.report(record_estimate)
    assert f"{record_estimate['peak']['Total'] / 1e9:.2f} GB" in text
    assert "29,248 MiB" in text and "left out" in text
