"""The optimizers' communication as the record runs it: bf16 banks with each rank's low 16 bits kept by NorMuon, and
the bigram table's gradient exchanged as the rows each rank used (SparseRows), against fp32 masters and dense sums
written here; two gloo processes where ranks matter."""
import os, subprocess, sys
import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import HANG_S
from tests.test_cuda_path import VIEWS, OpNames, OutputDtypes

def rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def truncated(x):  # fp32 -> the fp32 of its top 16 bits, by masking the low ones (numpy)
    bits = x.numpy().view(np.uint32) & np.uint32(0xFFFF0000)
    return torch.from_numpy(bits.view(np.float32))

def test_split_and_join_keep_every_fp32_bit_and_truncate_to_bf16():
    torch.manual_seed(0)
    x = torch.randn(50000) * torch.logspace(-44, 38, 50000)  # denormals to near the top of the range, both signs
    x[:5] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.0e38])
    hi, lo = tg.split_fp32(x)
    assert hi.dtype == torch.bfloat16 and lo.dtype == torch.int16
    assert torch.equal(tg.join_fp32(hi, lo).view(torch.int32), x.view(torch.int32))
    assert torch.equal(hi.float().view(torch.int32), truncated(x).view(torch.int32))  # not rounded to nearest
    assert not torch.equal(hi, x.bfloat16())

def test_bf16_banks_step_the_fp32_weights_and_hold_their_truncation():
    # the same bf16-valued gradients into a bf16 bank and an fp32 bank of the same start: the bf16 bank's rows joined
    # with NorMuon's low halves are the fp32 bank's weights, bit for bit, step after step; the bank holds truncations
    torch.manual_seed(3)
    start = [tg.join_fp32(torch.randn(shape).bfloat16() * 0.1, torch.zeros(shape, dtype=torch.int16))
             for shape in [(3, 16, 64), (2, 64, 16), (2, 2, 32, 16)]]
    fp32 = [torch.nn.Parameter(s.clone()) for s in start]
    bf16 = [torch.nn.Parameter(s.bfloat16()) for s in start]  # exact: the start has zero low halves
    muls = [[1.0, 2.0, 0.5], [1.0, 2.0], [1.0, 2.0, 1.0, 2.0]]
    opts = [tg.NorMuon(list(zip(banks, muls)), tg.Comm(0, 1), lr=0.03, beta2=0.95, weight_decay=1.2)
            for banks in (fp32, bf16)]
    assert all("lo" not in g for g in opts[0].groups) and all(g["lo"].dtype == torch.int16 for g in opts[1].groups)
    for lr_mult, mu in [(1.0, 0.85), (0.5, 0.9), (0.3, 0.95)]:
        for a, b in zip(fp32, bf16):
            b.grad = torch.randn(a.shape).bfloat16()
            a.grad = b.grad.float()
        for opt in opts:
            opt.step(lr_mult, mu)
        for a, b, g in zip(fp32, bf16, opts[1].groups):
            a_mats = a.detach().view(-1, *a.shape[-2:])
            assert torch.equal(tg.join_fp32(b.detach().view_as(a_mats), g["lo"]).view(torch.int32),
                               a_mats.view(torch.int32))
            assert torch.equal(b.detach().float(), truncated(a.detach()))
    assert not torch.equal(fp32[0].detach(), start[0])

# Two gloo ranks. Each builds both ranks' bigram gradients from seeds (rows touched: some in both ranks' ranges,
# repeats, one rank's range untouched by the other), exchanges them with SparseRows and with the dense reduce-scatter,
# and steps bf16 NorMuon banks; it saves what it got.
RANKS_SCRIPT = r"""
import sys, numpy as np, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import train_gpt as tg
dist.init_process_group("gloo")
rank, world, out = dist.get_rank(), dist.get_world_size(), {{}}
comm, n_rows, width = tg.Comm(rank, world), 64, 8

def grads(seed_of, touched_of):  # both ranks' gradients: zero outside the rows each touched
    gs = []
    for r in range(world):
        g = torch.zeros(n_rows, width)
        rows = np.unique(touched_of[r])
        g[rows] = torch.randn(len(rows), width, generator=torch.Generator().manual_seed(seed_of + r))
        gs.append(g)
    return gs

cases = dict(spread=[np.array([1, 5, 5, 40, 33, 62, 7]), np.array([5, 33, 2, 63, 63, 31, 32])],
             one_sided=[np.array([3, 9, 10]), np.array([40, 41, 45, 3])],  # rank 1 sends rank 0 one row, rank 0 none
             nothing=[np.array([], dtype=np.int64), np.array([50, 51])])
for name, touched in cases.items():
    gs = grads(7, touched)
    param = torch.nn.Parameter(torch.zeros(n_rows, width))
    param.grad = gs[rank].clone()
    sparse = tg.SparseRows(param, comm)
    for i in range(0, len(touched[rank]), 2):  # two micro-batches
        sparse.add(touched[rank][i:i + 2])
    sparse.start()
    shard, work = sparse.exchange(param.grad)
    work.wait()
    dense, dense_work = comm.reduce_scatter(gs[rank].clone())
    dense_work.wait()
    out[name] = dict(sparse=shard.clone(), dense=dense, sent=int(sum(sparse.send_counts)), own=gs[rank])
    assert not sparse.touched.any()  # start() begins the next Adam step's rows

# DistAdam with and without SparseRows (the table sharded), with a replicated parameter beside it
torch.manual_seed(11)
table, small = torch.nn.Parameter(torch.randn(n_rows, width)), torch.nn.Parameter(torch.randn(3))
adams = []
for use_sparse in (False, True):
    p, q = torch.nn.Parameter(table.detach().clone()), torch.nn.Parameter(small.detach().clone())
    adam = tg.DistAdam([(p, (0.75, 0.95), 75.0, 5.0), (q, (0.9, 0.99), 1.0, 0.0)], comm, 0.008, 1e-10, 0.005)
    sparse = tg.SparseRows(p, comm) if use_sparse else None
    for step in range(2):
        touched = cases["spread"] if step == 0 else cases["one_sided"]
        p.grad, q.grad = grads(20 + step, touched)[rank], torch.full((3,), float(rank + step))
        if sparse is not None:
            sparse.add(touched[rank])
            sparse.start()
        adam.launch(sparse=sparse)
        adam.finish(1.0)
    adams.append((p.detach().clone(), q.detach().clone()))
out["adam"] = adams

# bf16 banks over gloo: the reductions and the gathers carry bf16; every rank ends with the same bank
torch.manual_seed(5)
bank = torch.nn.Parameter(torch.randn(3, 16, 24).bfloat16() * 0.1)  # 3 matrices: rank 1's second one is padding
sent = []
real = comm.reduce_scatter, comm.all_gather
comm.reduce_scatter = lambda full: sent.append(("reduce", full.dtype)) or real[0](full)
comm.all_gather = lambda o, shard: sent.append(("gather", shard.dtype, o.dtype)) or real[1](o, shard)
muon = tg.NorMuon([(bank, [1.0, 2.0, 1.0])], comm, lr=0.03, beta2=0.95, weight_decay=1.2)
gs = []
for step in range(2):
    full = torch.randn(world, *bank.shape, generator=torch.Generator().manual_seed(30 + step)).bfloat16()
    bank.grad = full[rank].clone()
    gs.append(full)
    muon.step(1.0, 0.9)
out["muon"] = dict(bank=bank.detach().clone(), lo=muon.groups[0]["lo"].clone(), sent=sent, grads=gs)
torch.save(out, f"rank{{rank}}.pt")
dist.destroy_process_group()  # gloo's threads left to interpreter exit can abort it (pytorch/pytorch#190489)
"""

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("ranks")
    (d / "ranks.py").write_text(RANKS_SCRIPT.format(root=ROOT))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "ranks.py"]
    r = subprocess.run(command, cwd=d, capture_output=True, text=True, timeout=HANG_S, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(2)]

@pytest.mark.parametrize("case", ["spread", "one_sided", "nothing"])
def test_sparse_rows_give_each_owner_the_sum_of_both_ranks_rows(ranks, case):
    total = ranks[0][case]["own"] + ranks[1][case]["own"]  # the sum over ranks, written out
    for rank, got in enumerate(ranks):
        mine = total[rank * 32:(rank + 1) * 32]
        assert torch.equal(got[case]["sparse"], mine) and torch.equal(got[case]["dense"], mine)
        # it sent exactly its touched rows in the other rank's range, each once
        other = slice(32, 64) if rank == 0 else slice(0, 32)
        assert got[case]["sent"] == int(got[case]["own"][other].ne(0).any(1).sum())

def test_adam_with_sparse_rows_equals_adam_with_the_dense_reduce_scatter(ranks):
    for got in ranks:
        (dense_table, dense_small), (sparse_table, sparse_small) = got["adam"]
        assert torch.equal(sparse_table, dense_table) and torch.equal(sparse_small, dense_small)
    assert torch.equal(ranks[0]["adam"][1][0], ranks[1]["adam"][1][0])  # gathered: one table on both ranks

def test_bf16_banks_reduce_and_gather_in_bf16_and_match_one_process(ranks):
    # one process given the two ranks' gradients summed in bf16 (two addends: the same rounding in any order)
    for got in ranks:
        assert got["muon"]["sent"] == [("reduce", torch.bfloat16), ("gather", torch.bfloat16, torch.bfloat16)] * 2
    assert torch.equal(ranks[0]["muon"]["bank"], ranks[1]["muon"]["bank"])
    torch.manual_seed(5)
    bank = torch.nn.Parameter(torch.randn(3, 16, 24).bfloat16() * 0.1)
    muon = tg.NorMuon([(bank, [1.0, 2.0, 1.0])], tg.Comm(0, 1), lr=0.03, beta2=0.95, weight_decay=1.2)
    for full in ranks[0]["muon"]["grads"]:
        bank.grad = full[0] + full[1]
        muon.step(1.0, 0.9)
    assert torch.equal(ranks[0]["muon"]["bank"], bank.detach())
    # each rank keeps the low halves of its own matrices: rank 0 the first two, rank 1 the third (and a padding one)
    assert torch.equal(ranks[0]["muon"]["lo"], muon.groups[0]["lo"][:2])
    assert torch.equal(ranks[1]["muon"]["lo"][:1], muon.groups[0]["lo"][2:])

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_normuon_update_equals_eager_and_compiles_once_a_bank_shape(dtype):
    # Inductor's graph of the whole shard update against the eager function, over steps whose lr, decay and
    # momentum change: one graph per bank shape, the same weights within fp32 reordering (on a bf16 bank the
    # truncation of fp32 weights a few ulps apart may differ in its last bit). The orthogonalization is the identity
    # here: Polar Express's bf16 products round differently when Inductor fuses them (1e-2 apart per entry).
    from torch._dynamo.testing import CompileCounterWithBackend
    torch.manual_seed(4)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(tg.normuon_update, backend=counter, dynamic=False, fullgraph=True)
    shapes, muls = [(3, 16, 64), (2, 64, 16)], [[1.0, 2.0, 0.5], [1.0, 2.0]]
    banks = [[torch.nn.Parameter((torch.randn(shape) * 0.1).to(dtype)) for shape in shapes] for _ in range(2)]
    with torch.no_grad():
        for a, b in zip(*banks):
            b.copy_(a)
    opts = [tg.NorMuon(list(zip(bs, muls)), tg.Comm(0, 1), lr=0.03, beta2=0.95, weight_decay=1.2,
                       ortho=lambda U: U.float(), update=update)
            for bs, update in zip(banks, (tg.normuon_update, compiled))]
    for lr_mult, mu in [(1.0, 0.85), (0.5, 0.9), (0.3, 0.95)]:
        for a, b in zip(*banks):
            a.grad = torch.randn(a.shape).to(dtype)
            b.grad = a.grad.clone()
        opts[1].step(lr_mult, mu, wd_mult=lr_mult * 2)
        with OutputDtypes() as seen:
            opts[0].step(lr_mult, mu, wd_mult=lr_mult * 2)
        assert torch.float64 not in seen  # the 0-d fp64 host scalars never widen a tensor's arithmetic
    assert counter.frame_count <= len(shapes) + 1  # a cold cache restarts the first trace once
    for a, b in zip(*banks):
        assert rel(b, a) < 1e-5 and not torch.equal(a.detach(), torch.zeros_like(a))
    for ga, gb in zip(opts[0].groups, opts[1].groups):
        assert torch.allclose(ga["mom"], gb["mom"], rtol=1e-5, atol=1e-7)
        assert torch.allclose(ga["v"], gb["v"], rtol=1e-4)
        if dtype == torch.bfloat16:
            same = ga["p"].detach().view_as(ga["lo"]) == gb["p"].detach().view_as(gb["lo"])
            joined = [tg.join_fp32(g["p"].detach().view_as(g["lo"]), g["lo"]) for g in (ga, gb)]
            assert same.float().mean() > 0.99 and rel(joined[1], joined[0]) < 1e-5
    torch._dynamo.reset()

def test_normuon_finish_runs_few_eager_operators_outside_its_update_graph():
    # per bank, outside the (compiled) update: the 0-d scalars, the gather's buffer and the copy back, no arithmetic;
    # the eager update itself runs over 50 operators a bank on a bf16 bank
    banks = [(torch.nn.Parameter(torch.randn(shape).bfloat16()), [1.0] * n) for shape, n in
             [((6, 32, 96), 6), ((4, 96, 96), 4), ((2, 2, 384, 96), 4)]]
    calls = []
    def graph(grad, P, *rest, **kw):  # stands for the compiled graph: one call, one output
        calls.append(P.shape)
        return P.clone()
    opt = tg.NorMuon(banks, tg.Comm(0, 1), lr=0.03, beta2=0.95, weight_decay=1.2, update=graph)
    for p, _ in banks:
        p.grad = torch.randn(p.shape).bfloat16()
    opt.launch()
    with OpNames() as ops:
        opt.finish(1.0, 0.9)
    arithmetic = [name for name in ops.names if name not in VIEWS]
    assert len(calls) == 3 and len(arithmetic) <= 5 * len(banks), arithmetic
