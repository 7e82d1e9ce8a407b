"""The record step's memory estimate against a hand count, and the pieces it rests on. (That the compiled model
compiles each graph once and never again: tests/test_cuda_path.py.)"""
import pytest
import torch

import train_gpt as tg
from tests import estimate_memory


@pytest.fixture(scope="module")
def record_estimate():
    return estimate_memory.estimate()


def record_terms(h):
    """Bytes of the record configuration on rank 0 of 8 at a step of stage 3, by hand from record #89's model
    (README): in the compute dtype (bf16) the embedding, the head, the 5 value-embedding tables, the bigram hash table
    (377,280 x 768), the smear gate (12 -> 1), a value-embedding gate per head of each VE layer (12 -> 1) and the MUDD
    MLPs (two 768 -> 64 -> 14) and MUDD-gate MLPs (two 768 -> 64 -> 41) with their biases, and the NorMuon banks
    (Q and K of 6 heads in 10 attention layers, 60 matrices of 256 x 768; V and O, 20 of 768 x 768; MLP up and down
    in 11 layers, 22 of 3072 x 768); in fp32 the 2L + 2 scalars, the residual and output lambdas (2 a layer each) and
    the MUDD gates' scale; slots of 393,216 / 8 tokens."""
    L, D, V, H, B = h.num_layers, h.model_dim, h.vocab_size, h.num_heads, h.bigram_vocab_size
    T, world, bf16, fp32 = h.train_batch_size[2] // 8, 8, 2, 4
    n_attn, n_mlp, n_ve, hd = L - 1, L, 5, D // H
    tables = (7 * V + B) * D  # embedding, head, value embeddings, bigram hash
    small_bf16 = 12 + n_ve * H * 12 + 2 * (64 * D + 14 * 64 + 14) + 2 * (64 * D + 41 * 64 + 41)
    banks = {"qk": (n_attn * H, 2 * hd, D), "vo": (2 * n_attn, D, D), "mlp": (2 * n_mlp, 4 * D, D)}
    bank_numel = sum(n * rows * cols for n, rows, cols in banks.values())
    scalars, lambdas = 2 * L + 2, 4 * L + 1  # scalars; residual and output lambdas and the gates' scale
    weights = (tables + small_bf16 + bank_numel) * bf16 + (scalars + lambdas) * fp32
    adam_grads = (tables + small_bf16) * bf16 + (scalars + lambdas) * fp32  # Adam steps every other step: they wait
    # NorMuon: per bank, the momentum of ceil(n / world) matrices and their second moments (one per row of a tall or
    # square matrix, one per column of a wide one), fp32, and the matrices' low 16 bits (int16); DistAdam: fp32 m and
    # v, of 1 / world of the rows of a parameter whose rows divide by the world (the tables, the bigram table, the 24
    # scalars), of all of the others (gates, lambdas, MUDD weights, the 0-d scale)
    muon_state = 0
    for n, rows, cols in banks.values():
        k = -(-n // world)
        muon_state += k * (rows * cols + (rows if rows >= cols else cols)) * fp32 + k * rows * cols * 2
    adam_moments = 2 * fp32 * ((tables + scalars) // world + small_bf16 + lambdas)
    # What the eager forward keeps for backward, in bf16 units u = T x D (re-derived for this model):
    # at least post = relu(x W)^2 (4 u) in each MLP (the FP8 MLP keeps it alone, as the record), FlexAttention's
    # contiguous q, k, v and its output in each attention layer (paired layers: 2T positions at half the heads, the
    # same size), the bigram term's sign rows and product, the 5 value-embedding lookups, the DC correction's fp32
    # softmax over its banded keys (T x H x 256), and at the head (the fused loss as compiled) the softcap's s (bf16,
    # in the logits' place) and, in its backward, the e5m2 gradient: 3 bytes T x V at once, the record's 7.4 GB;
    # at most: a layer with attention and MLP keeps 2 residual-stream tensors, the normed input, the qkv projection
    # (3 u), flex's q, k, v and output, the XSA and gate products (2 u), the output projection's input and output, a
    # value-embedding product, the MLP's normed input, relu(x W) and its square and the MLP's output: 26 u, counted
    # 28; an MLP-only layer (6) 12; the last layer that and its MUDD mixes (value, residual and VE gate: about 5 u)
    # and the DC correction (q fp32, banded k fp32 and v, probabilities fp32, its output: about 14 u), counted 48;
    # around the layers (embedding, smear, x0, the bigram rows, sign rows and product, 5 value embeddings, the
    # MUDD-gate input, the sums after the loop, the final norm and its FP8 copy) about 16, counted 20
    u = T * D * bf16
    dc_probs = T * H * 2 * 128 * fp32
    saved_at_least = n_mlp * 4 * u + n_attn * 4 * u + 2 * u + n_ve * u + dc_probs + 3 * T * V
    saved_at_most = (28 * (n_attn - 1) + 12 * (n_mlp - n_attn) + 48 + 20) * u + 3 * T * V
    rotary = 2 * 2 * max(h.val_seq_len, T) * hd * bf16  # cos and sin of 2 * max_len positions (paired heads)
    # the rotary tables, the bigram signs, the prefix table, the FP8 down projections' scales (8 slots' activation
    # scales and 2 weight scales a layer, fp32)
    buffers = rotary + h.bigram_sign_rows * D * bf16 + V * 8 + (8 + 2) * L * fp32
    return dict(weights=weights, adam_grads=adam_grads, optimizer_state=muon_state + adam_moments,
                buffers=buffers, saved_at_least=saved_at_least, saved_at_most=saved_at_most)


def test_record_memory_estimate_against_hand_formula(record_estimate):
    hand = record_terms(tg.Hyperparameters())
    # stage 3 (393,216 tokens, windows (5, 11), one prediction) after the untie at step 847; step 849 runs Adam
    assert record_estimate["steps"] == (848, 849) and record_estimate["slot"] == 49152
    assert record_estimate["windows"] == (5, 11) and record_estimate["predictions"] == 1
    assert not record_estimate["tied"]
    assert record_estimate["weights"] == hand["weights"]  # the CUDA dtypes: bf16 but for the scalars
    assert record_estimate["peak"]["Parameter"] == hand["weights"]
    assert record_estimate["optimizer_state"] == hand["optimizer_state"]
    assert record_estimate["peak"]["Other"] == record_estimate["optimizer_state"]  # counted at the peak
    assert record_estimate["buffers"] == hand["buffers"]
    assert record_estimate["peak"]["Buffer"] == hand["buffers"]
    assert record_estimate["adam_grads_after"] == 0  # step 849 ran Adam, which dropped its gradients
    # the peak is in step 849's backward at the head, before any gradient of step 849: Adam's of step 848 only
    assert record_estimate["peak_phase"] == "step 849 backward"
    assert record_estimate["peak"]["Gradient"] == hand["adam_grads"]
    static = hand["weights"] + hand["optimizer_state"] + hand["buffers"]
    # at the start of step 849's backward the weights, the optimizer state, Adam's gradients of step 848, every saved
    # activation and the head's first gradients are alive at once: the peak is at least that
    assert record_estimate["peak"]["Total"] >= static + hand["adam_grads"] + hand["saved_at_least"]
    # and at most all the forward keeps and the head's backward adds, with all gradients and as much again for the
    # optimizer's stacked copies (fp32 activations in the layers, about 20 GB more, or an fp32 T x V tensor counted
    # twice, 10 GB, would break this)
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
    assert "record #43's step of 32,768 tokens a GPU (a smaller one" in text and "29,248 MiB" in text
    assert "steps 848 and 849" in text and "one slot of 49,152 tokens" in text and "left out" in text
