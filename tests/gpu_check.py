"""The GPU check of this repository: what a developer runs on a lent GPU machine (one H100 or H200, no network, no
installs), sized to end within about 9 minutes with a cold compile cache, and what the CPU test suite runs as a dry run.

    bash tests/gpu_check.sh [--dry-run] [--data=DIR] [--out=FILE] [--parts=NAME,...] [--budget=SECONDS]

Parts, in the order they run, each in its own process group with its own time limit (a part that crashes, runs out
of memory or hangs loses only its own results):
  train_gpt       train_gpt.py compiled on one GPU (8 slots of gradient accumulation, the 8-GPU math), two stages at the
                  record's stage-1 and stage-3 shapes on --data (or a synthetic corpus): ms/step per stage, peak memory,
                  tokens/s, MFU, val loss, compiled graphs and every recompile reason, host syncs in a step, whether
                  the allocator used expandable segments, the prefix-token loss through a tiktoken encoding built from
                  DIR/tokenizer.json
  micro           FP8 vs bf16 GEMM, the FP8 vs bf16 head + loss (compiled), compiled FlexAttention vs its portable twin
                  and vs the flash kernel for each mask kind, DC attention, Polar Express on each NorMuon bank shape
  test_gpu        python3 -m pytest -q tests/test_gpu.py
  cifar_eager     train_cifar.py --compile=0 on random CIFAR-shaped data in its cache format
  cifar_compiled  train_cifar.py --compile=1 (max-autotune on CUDA) on the same data: the 94 recipe (2.015 s)
  cifar_airbench94  the same with --variant=airbench94 (2.59 s), to time both 94 recipes side by side

Each part appends its block to the report as soon as it ends: `== NAME: ok|FAILED|TIMEOUT (wall s, limit s)`, then
`   key: value` figures, then for a part that is not ok the reasons and the last lines of its output. A figure a part
must report that is missing or not a number makes it FAILED. The whole report is printed at the end; the exit code is
0 only when every part is ok. The limits: each part gets at most its cap, and never so much that the parts after it
lose their reserve of the --budget (default 520 s; --dry-run 420 s, though it takes about a minute).

--dry-run runs the same code paths at tiny sizes on the CPU (children see no GPU): a synthetic corpus and a tiny
byte-level BPE tokenizer.json (so the tiktoken plugin path runs too), a tiny model with --compile=0 (Inductor costs
20-30 s a graph on a CPU and cannot lower flex there), eager FlexAttention with its CPU device check patched out,
FP8 at tiny sizes, a small CIFAR set; ms figures are printed but mean nothing there.
"""
import argparse
import base64
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BOS = 50256  # <|endoftext|>: every document of a corpus starts with it
PLUGIN_MODULE, ENCODING = "speedrun_gpu_check", "gpu_check_corpus"
# GPT-2's pre-tokenizer split, which a Hugging Face ByteLevel pre-tokenizer with use_regex applies too
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Part(NamedTuple):
    name: str
    title: str
    reserve: tuple  # seconds kept for it while earlier parts run: (GPU, dry run)
    cap: tuple      # its most seconds: (GPU, dry run)


# Estimates, not measurements (no GPU where this was written): compilation dominates train_gpt (3 model graphs and 3
# Polar Express graphs), micro (9 small graphs) and test_gpu (3 flex graphs and a tiny model's 2 graphs). Reserves sum
# to 505 s of the 520 s budget (a stopped part overruns its limit by at most 2.5 s); a part that ends early leaves
# its time to the later ones, up to their caps.
PARTS = [Part("train_gpt", "train_gpt.py compiled, 1 GPU x 8 slots, the record's stage-1 and stage-3 shapes", (200, 60),
              (300, 180)),
         Part("micro", "micro checks: FP8, head + loss, FlexAttention, DC attention, Polar Express", (80, 40),
              (150, 120)),
         Part("test_gpu", "python3 -m pytest -q tests/test_gpu.py", (100, 30), (240, 90)),
         Part("cifar_eager", "train_cifar.py --compile=0 on random CIFAR-shaped data", (25, 20), (60, 60)),
         Part("cifar_compiled", "train_cifar.py --compile=1 on the same data", (50, 20), (180, 60)),
         Part("cifar_airbench94", "train_cifar.py --compile=1 --variant=airbench94 on the same data, beside the 94",
              (50, 20), (180, 60))]
BUDGET_S = {False: 520, True: 420}  # by dry run


def fmt(value):
    """A figure as the report writes it: floats to 6 significant digits."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def emit(key, value):
    """A child's figure line, read by the parent (stdout is the part's log)."""
    print(f"@@ {key}: {fmt(value)}", flush=True)


def emit_fail(reason):
    print(f"@@ FAIL: {reason}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer: a Hugging Face byte-level BPE tokenizer.json -> a tiktoken encoding whose ids are the corpus's

def bytes_to_unicode():
    """GPT-2's byte -> printable character table, as byte-level BPE vocabularies spell their tokens."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def corpus_ranks(tokenizer_json):
    """(bytes -> corpus id, how ids were mapped) from a tokenizer.json. Shards need <|endoftext|> at 50256, so the
    corpus ids are the tokenizer's regular (non-special) tokens renumbered from 0 in their id order, with
    <|endoftext|> at 50256: the identity for GPT-2's layout (regular 0..50255, <|endoftext|> 50256), a shift by one
    for a tokenizer that put <|endoftext|> first. The train_gpt part checks the result on the corpus (round trip)."""
    with open(tokenizer_json, encoding="utf-8") as f:
        tok = json.load(f)
    vocab = tok.get("model", {}).get("vocab")
    if tok.get("model", {}).get("type") != "BPE" or not isinstance(vocab, dict):
        raise ValueError(f"{tokenizer_json}: not a BPE tokenizer.json (no model.vocab)")
    special = {t["content"] for t in tok.get("added_tokens", [])} | {"<|endoftext|>"}
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    regular = sorted((i, s) for s, i in vocab.items() if s not in special)
    if len(regular) > BOS:
        raise ValueError(f"{tokenizer_json}: {len(regular)} regular tokens do not fit below <|endoftext|> = {BOS}")
    ranks = {}
    for new_id, (_, spelling) in enumerate(regular):
        if any(c not in to_byte for c in spelling):
            raise ValueError(f"{tokenizer_json}: token {spelling!r} is not byte-level BPE (GPT-2 byte alphabet)")
        ranks[bytes(to_byte[c] for c in spelling)] = new_id
    eot = vocab.get("<|endoftext|>")
    shifted = sum(i != new_id for new_id, (i, _) in enumerate(regular))
    how = (f"<|endoftext|> (tokenizer id {eot}) -> {BOS}; {len(regular)} regular tokens renumbered from 0 in id order "
           f"({shifted} ids moved)")
    return ranks, how


PLUGIN_SOURCE = '''"""tiktoken plugin written by tests/gpu_check.py: the corpus's tokens (ranks beside this file)."""
import base64
import os

def {encoding}():
    ranks = {{}}
    with open(os.path.join(os.path.dirname(__file__), "{module}.ranks")) as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return dict(name="{encoding}", pat_str={pattern!r}, mergeable_ranks=ranks,
                special_tokens={{"<|endoftext|>": {bos}}})

ENCODING_CONSTRUCTORS = {{"{encoding}": {encoding}}}
'''


def write_plugin(folder, ranks):
    """folder/tiktoken_ext/ with the encoding ENCODING over ranks; put folder on PYTHONPATH to use it."""
    from tests.gptdata import write_tiktoken_plugin
    source = PLUGIN_SOURCE.format(encoding=ENCODING, module=PLUGIN_MODULE, pattern=GPT2_SPLIT, bos=BOS)
    Path(folder).mkdir()
    write_tiktoken_plugin(Path(folder), PLUGIN_MODULE, source)
    with open(Path(folder) / "tiktoken_ext" / f"{PLUGIN_MODULE}.ranks", "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    return Path(folder)


DRY_WORDS = ("the then there in inn thin ant banter tensor stage window block token shard loss step gradient "
             "attention head layer merge byte value key query cafe naive 42 2048 ; , . ( ) = + - it's").split()


def write_tiny_tokenizer(path, n_merges=60):
    """A byte-level BPE tokenizer.json in Hugging Face's layout, <|endoftext|> at id 0 like the GPU proxy corpus's:
    256 byte tokens at 1..256, then n_merges merges learnt on DRY_WORDS (most frequent adjacent pair first)."""
    spell = bytes_to_unicode()
    words = [[spell[b] for b in (" " + w).encode()] for w in DRY_WORDS for _ in range(3)]
    vocab, merges = {"<|endoftext|>": 0}, []
    vocab.update({spell[b]: 1 + b for b in range(256)})
    for _ in range(n_merges):
        pairs = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                pairs[a, b] = pairs.get((a, b), 0) + 1
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(list(best))
        vocab[best[0] + best[1]] = len(vocab)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [best[0] + best[1]]
                i += 1
    added = [dict(id=0, content="<|endoftext|>", single_word=False, lstrip=False, rstrip=False, normalized=False,
                  special=True)]
    tok = dict(version="1.0", truncation=None, padding=None, added_tokens=added, normalizer=None,
               pre_tokenizer=dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=True),
               post_processor=None, decoder=dict(type="ByteLevel"),
               model=dict(type="BPE", dropout=None, unk_token=None, vocab=vocab, merges=merges))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)


def write_text_corpus(folder, encoding, train_tokens, val_tokens, seed=0):
    """Shards of random DRY_WORDS documents encoded with `encoding` (tiktoken), each starting with BOS."""
    import numpy as np
    from tests.gptdata import write_shard
    rng = np.random.default_rng(seed)
    for name, n_tokens in (("dry_train_000001.bin", train_tokens), ("dry_val_000000.bin", val_tokens)):
        tokens = []
        while len(tokens) < n_tokens:
            text = " ".join(rng.choice(DRY_WORDS, int(rng.integers(20, 200))))
            tokens += [BOS] + encoding.encode_ordinary(text)
        write_shard(f"{folder}/{name}", tokens)


# ----------------------------------------------------------------------------------------------------------------------
# Part setups (in the parent): each returns (command, cwd, extra environment); an exception makes the part FAILED

class Context:
    def __init__(self, args, work):
        self.args, self.work, self.dry = args, Path(work), args.dry_run
        self.notes = {}  # part name -> lines the parent adds to its block (what corpus, prefix loss on or off)
        self.cifar_dir = None
        self.prefix_on = False  # the train_gpt part runs the prefix-token loss (set by its setup)

    def child(self, name, spec):
        path = self.work / f"{name}.json"
        path.write_text(json.dumps(spec))
        return [sys.executable, str(Path(__file__).resolve()), f"--child={name}", f"--spec={path}"]


def train_gpt_flags(dry):
    """The run: two stages at the record's stage-1 shapes (131,072 tokens a step, pieces <= 896, windows (1, 3)
    blocks, 3 predictions, prefix loss) and stage-3 shapes (393,216, 2048, (5, 11), 1 prediction), 12 steps each,
    untied at the first odd step of stage 2 as the record at stage 3, final validation on 3 x 262,144 tokens."""
    common = ["--ws_schedule=3,11", "--stage_lr=1,1.73", "--mtp_weights=1,0.5,0.25/1", "--num_extension_iterations=0",
              "--untie_stage=1", "--val_loss_every=0", "--kernel_warmup_steps=2", "--repeat_data=1",
              "--run_id=gpu_check"]
    if not dry:
        return common + ["--train_batch_size=131072,393216", "--train_max_seq_len=896,2048", "--num_iterations=24",
                         "--val_tokens=786432"]
    # a tiny model, 3 steps a stage; no compile on a CPU (Inductor: 20-30 s a graph, no flex lowering there)
    return common + ["--num_layers=3", "--model_dim=64", "--num_heads=2", "--vocab_size=50304",
                     "--bigram_vocab_size=1024", "--train_batch_size=1024,2048", "--train_max_seq_len=128,256",
                     "--num_iterations=6", "--val_tokens=2048", "--val_seq_len=1024", "--compile=0"]


def flag(argv, name):
    return next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}="))


def setup_train_gpt(ctx):
    import glob
    plugin, notes = None, []
    if ctx.args.data:
        data = Path(ctx.args.data).resolve()
        train, val = str(data / "*train*.bin"), str(data / "*val*.bin")
        for pattern, what in ((train, "train"), (val, "val")):
            if not glob.glob(pattern):
                raise FileNotFoundError(f"--data={ctx.args.data}: no {what} shards ({pattern})")
        tokenizer, corpus = data / "tokenizer.json", f"{data} (--data)"
    else:
        data = ctx.work / "corpus"
        data.mkdir()
        train, val = str(data / "*train*.bin"), str(data / "*val*.bin")
        if ctx.dry:  # text through a tiny BPE, so the tokenizer.json -> tiktoken plugin path runs as on the GPU
            tokenizer = data / "tokenizer.json"
            write_tiny_tokenizer(tokenizer)
            import tiktoken
            ranks, _ = corpus_ranks(tokenizer)
            encoding = tiktoken.Encoding(name="dry", pat_str=GPT2_SPLIT, mergeable_ranks=ranks,
                                         special_tokens={"<|endoftext|>": BOS})
            write_text_corpus(data, encoding, train_tokens=60_000, val_tokens=4_000)
            corpus = "synthetic: random words through a tiny byte-level BPE (dry run)"
        else:  # enough for one stage-3 step in a shard and 786,433 val tokens; short documents (20-400 tokens)
            from tests.gptdata import write_corpus
            write_corpus(str(data), train_tokens=2_000_000, val_tokens=800_000, n_train_shards=1)
            tokenizer, corpus = None, "synthetic: tests/gptdata.py's learnable documents of 20-400 tokens (no --data)"
    argv = [f"--train_files={train}", f"--val_files={val}"] + train_gpt_flags(ctx.dry)
    if tokenizer is not None and tokenizer.is_file():
        ranks, how = corpus_ranks(tokenizer)
        plugin = write_plugin(ctx.work / "plugin", ranks)
        argv += ["--prefix_weight=0.25/0", f"--prefix_encoding={ENCODING}"]
        prefix = f"on in stage 1 (weight 0.25), encoding built from {tokenizer}: {how}"
    else:
        argv += ["--prefix_weight=0"]
        prefix = "off (--prefix_weight=0): no tokenizer.json beside the corpus to build the prefix table from"
    notes += [("corpus", corpus), ("prefix_loss", prefix)]
    ctx.notes["train_gpt"] = notes
    (ctx.work / "train_gpt_run").mkdir()
    spec = dict(dry_run=ctx.dry, argv=argv, work=str(ctx.work / "train_gpt_run"), val_files=val,
                prefix=plugin is not None)
    ctx.prefix_on = plugin is not None
    paths = ([str(plugin)] if plugin else []) + [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = {"PYTHONPATH": os.pathsep.join(paths)}  # tiktoken finds the plugin's encoding through it
    return ctx.child("train_gpt", spec), ctx.work / "train_gpt_run", env


def setup_micro(ctx):
    return ctx.child("micro", dict(dry_run=ctx.dry)), ctx.work, {}


def setup_test_gpu(ctx):
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"], ROOT, {}


def cifar_data(ctx):
    """train.npz / test.npz in train_cifar.py's cache format (uint8 images N x 32 x 32 x 3, int64 labels in 0..9),
    random: the run's time does not depend on the pixels. Written once for both CIFAR parts."""
    if ctx.cifar_dir is None:
        import numpy as np
        folder = ctx.work / "cifar10"
        folder.mkdir()
        rng = np.random.default_rng(0)
        sizes = {"train": 600, "test": 200} if ctx.dry else {"train": 50_000, "test": 10_000}  # dry: a small set
        for split, n in sizes.items():
            images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            np.savez(folder / f"{split}.npz", images=images, labels=rng.integers(0, 10, n).astype(np.int64))
        ctx.cifar_dir = folder
    return ctx.cifar_dir


def setup_cifar(ctx, compiled, variant="94"):
    folder = cifar_data(ctx)
    name = "cifar_eager" if not compiled else "cifar_compiled" if variant == "94" else f"cifar_{variant}"
    run_dir = ctx.work / name
    run_dir.mkdir()
    argv = [sys.executable, str(ROOT / "train_cifar.py"), f"--data_dir={folder}", f"--compile={int(compiled)}",
            "--runs=2", f"--variant={variant}"]
    env = {}
    if ctx.dry:  # a small net for 1 epoch; "compiled" runs the compile=1 code path with torch.compile disabled
        argv += ["--widths=8,16,16", "--batch_size=100", "--epochs=1", "--whiten_images=500"]
        if compiled:
            env["TORCH_COMPILE_DISABLE"] = "1"
            ctx.notes[run_dir.name] = [("note", "dry run: TORCH_COMPILE_DISABLE=1, the compile=1 path runs eager")]
    return argv, run_dir, env


SETUPS = {"train_gpt": setup_train_gpt, "micro": setup_micro, "test_gpu": setup_test_gpu,
          "cifar_eager": lambda ctx: setup_cifar(ctx, False), "cifar_compiled": lambda ctx: setup_cifar(ctx, True),
          "cifar_airbench94": lambda ctx: setup_cifar(ctx, True, "airbench94")}


# ----------------------------------------------------------------------------------------------------------------------
# Reading a part's output: its figures, what makes it fail, the figures it must report

NUM, INT, TEXT = "number", "integer", "text"


def child_figures(text):
    """The @@ lines of a child: ([(key, value)], [failure reasons])."""
    figures, fails = [], []
    for line in text.splitlines():
        m = re.match(r"@@ (\S+): (.*)$", line)
        if m and m[1] == "FAIL":
            fails.append(m[2])
        elif m:
            figures.append((m[1], m[2]))
    return figures, fails


def required_train_gpt(dry, prefix_on):
    need = dict(steps=INT, stage1_ms_per_step=NUM, stage2_ms_per_step=NUM, stage1_batch_tokens=INT,
                stage2_batch_tokens=INT, train_time_ms=NUM, val_loss=NUM, tokens_per_s=NUM, peak_alloc_mib=NUM,
                peak_reserved_mib=NUM, graphs_total=INT, graphs_warmup=INT, graphs_timed=INT, graphs_validation=INT,
                recompiles=INT)
    if not dry:
        need.update(mfu_pct=NUM, kernel_warmup_s=NUM, expandable_segments=TEXT, host_syncs_stage1=INT,
                    host_syncs_stage2=INT)
    if prefix_on:
        need.update(prefix_roundtrip_docs=NUM, prefix_table_rows=INT)
    return need


def required_micro(dry):
    need = {k: NUM for k in ("gemm_fp8_ms", "gemm_bf16_ms", "gemm_fp8_tflops", "gemm_bf16_tflops", "gemm_fp8_rel_err",
                             "head_fp8_ms", "head_bf16_ms", "head_fp8_vs_bf16_loss_rel", "head_fp8_vs_bf16_grad_x_rel",
                             "head_fp8_vs_bf16_grad_w_rel", "dc_ms", "dc_eager_ms", "dc_compiled_vs_eager_err",
                             "polar_qk_ms", "polar_vo_ms", "polar_mlp_ms")}
    for kind in ("short", "long", "paired"):
        for what in ("mask_ms", "flex_ms", "flash_ms", "out_err", "dq_err", "dk_err", "dv_err"):
            need[f"{kind}_{what}"] = NUM
    if not dry:
        need.update(head_fp8_peak_gib=NUM, head_bf16_peak_gib=NUM, dc_peak_gib=NUM)
    return need


def parse_pytest(text, rc, dry):
    """pytest -q's last summary line ('3 passed, 1 skipped in 12.3s') as figures; failing tests as reasons."""
    summary = [line for line in text.splitlines() if re.search(r"\b\d+ (passed|failed|skipped|errors?|deselected)\b",
                                                               line) and re.search(r" in [\d.]+s", line)]
    fails = [line for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    if not summary:
        return [], fails + ["no pytest summary line"]
    counts = {kind: 0 for kind in ("passed", "failed", "skipped", "errors")}
    for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)\b", summary[-1]):
        counts["errors" if kind.startswith("error") else kind] = int(n)
    figures = [(kind, str(n)) for kind, n in counts.items()]
    if rc != 0:
        fails.append(f"pytest exit code {rc}")
    if not dry and (counts["passed"] == 0 or counts["skipped"]):
        fails.append(f"{counts['skipped']} skipped, {counts['passed']} passed: on a GPU machine every test must run")
    return figures, fails


def parse_cifar(text, rc, compiled, dry):
    runs = re.findall(r"^run:(\d+) acc:(\S+) time:(\S+)s$", text, re.M)
    figures = [(f"run_{i}_s", t) for i, _, t in runs]
    warmup = re.findall(r"^warmup acc:(\S+) time:(\S+)s$", text, re.M)
    summary = re.search(r"^summary runs:(\d+) acc_mean:(\S+) acc_std:(\S+) time_mean:(\S+)s time_std:(\S+)s$", text,
                        re.M)
    if warmup:
        figures.append(("warmup_s", warmup[-1][1]))
    if summary:
        figures += [("runs", summary[1]), ("time_mean_s", summary[4]), ("time_std_s", summary[5]),
                    ("acc_mean", summary[2] + " (random labels: chance is 0.1)")]
    if warmup and summary:  # the warmup run pays for compilation (and autotuning) on top of a run's work
        figures.append(("compile_overhead_s", f"{float(warmup[-1][1]) - float(summary[4]):.3f}"))
    return figures, [] if rc == 0 else [f"exit code {rc}"]


def required_cifar(compiled, dry):
    need = dict(runs=INT, run_1_s=NUM, run_2_s=NUM, time_mean_s=NUM, time_std_s=NUM)
    if compiled or not dry:  # a warmup run comes first with compile=1 or on CUDA
        need.update(warmup_s=NUM, compile_overhead_s=NUM)
    return need


def check_required(figures, need):
    """Reasons for missing or unparsable figures."""
    values, problems = dict(figures), []
    for key, kind in need.items():
        value = values.get(key)
        if value is None:
            problems.append(f"missing figure {key}")
            continue
        head = value.split()[0] if value.split() else ""
        try:
            number = float(head)
        except ValueError:
            number = None
        if kind == NUM and (number is None or not math.isfinite(number)):
            problems.append(f"figure {key} is not a finite number: {value!r}")
        if kind == INT and not re.fullmatch(r"-?\d+", head):
            problems.append(f"figure {key} is not an integer: {value!r}")
    return problems


def judge(part, ctx, text, rc):
    """(figures, failure reasons) of a finished part."""
    if part.name in ("train_gpt", "micro"):
        figures, fails = child_figures(text)
        need = required_train_gpt(ctx.dry, ctx.prefix_on) if part.name == "train_gpt" else required_micro(ctx.dry)
        fails += [] if rc == 0 else [f"exit code {rc}"]
    elif part.name == "test_gpu":
        figures, fails = parse_pytest(text, rc, ctx.dry)
        need = dict(passed=INT, failed=INT, skipped=INT, errors=INT)
    else:
        compiled = part.name != "cifar_eager"
        figures, fails = parse_cifar(text, rc, compiled, ctx.dry)
        need = required_cifar(compiled, ctx.dry)
    return figures, fails + check_required(figures, need)


# ----------------------------------------------------------------------------------------------------------------------
# Running the parts (parent)

def kill_group(proc, grace_s=2.0):
    """End a part's process group (the child and what it started, e.g. compile workers): TERM, a grace period for
    the child, then KILL for whatever of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)


def run_child(cmd, cwd, env, timeout_s, log_path, prefix):
    """Run cmd in its own session with stdout + stderr into log_path, echoed live with a prefix; (rc, timed out)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, offset, pending = time.monotonic() + timeout_s, 0, b""

    def echo():
        nonlocal offset, pending
        with open(log_path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        offset += len(chunk)
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            print(f"{prefix} {line.decode(errors='replace')}", flush=True)

    timed_out = False
    try:
        while proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)
            echo()
            if proc.poll() is None and time.monotonic() > deadline:
                timed_out = True
                kill_group(proc)
                break
    except KeyboardInterrupt:
        kill_group(proc, grace_s=2.0)
        raise
    echo()
    kill_group(proc, grace_s=0.5)  # whatever the child left running in its group (compile workers)
    return proc.returncode, timed_out


def tail(text, n=25):
    return [line for line in text.splitlines() if not line.startswith("@@ ")][-n:]


def part_block(part, status, wall_s, limit_s, notes, figures, fails, text):
    lines = [f"== {part.name}: {status} ({wall_s:.1f} s, limit {limit_s:.0f} s)", f"   {part.title}"]
    lines += [f"   {key}: {value}" for key, value in notes + figures]
    if status != "ok":
        lines += [f"   failed: {reason}" for reason in fails]
        lines += ["   --- last lines of its output ---"] + [f"   | {line}" for line in tail(text)]
    return "\n".join(lines) + "\n\n"


def header(mode, parts, budget):
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        gpu = "none (no nvidia-smi)"
    try:
        import importlib.metadata
        torch_version = importlib.metadata.version("torch")
    except Exception:
        torch_version = "not installed"
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    return (f"gpu_check report, {datetime.datetime.now().isoformat(timespec='seconds')}, {mode}\n"
            f"host {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch_version}\n"
            f"GPU: {gpu}\nrepository: {ROOT} at {commit}\nparts: {', '.join(p.name for p in parts)}, "
            f"{budget:.0f} s budget\n\n")


def main(argv):
    parser = argparse.ArgumentParser(description="GPU check (see tests/gpu_check.py's docstring)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, about a minute")
    parser.add_argument("--data", help="folder with *train*.bin, *val*.bin and tokenizer.json")
    parser.add_argument("--out", default="gpu_check_report.txt", help="the report file")
    parser.add_argument("--parts", help="comma-separated subset of: " + ",".join(p.name for p in PARTS))
    parser.add_argument("--budget", type=float, help="seconds for all the parts (default 520; dry run 420)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return CHILDREN[args.child](json.loads(Path(args.spec).read_text()))
    names = args.parts.split(",") if args.parts else [p.name for p in PARTS]
    unknown = [n for n in names if n not in {p.name for p in PARTS}]
    if unknown:
        parser.error(f"--parts: unknown {','.join(unknown)} (parts: {','.join(p.name for p in PARTS)})")
    parts = [p for p in PARTS if p.name in names]
    dry = args.dry_run
    mode = "dry run on the CPU (tiny sizes; ms figures mean nothing)" if dry else "GPU run"
    budget = args.budget if args.budget is not None else BUDGET_S[dry]
    out = Path(args.out).resolve()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx = Context(args, work)
    out.write_text(header(mode, parts, budget))
    env_base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                                  "MASTER_PORT")}
    env_base.update(PYTHONUNBUFFERED="1")
    if dry:  # children see no GPU; one intra-op thread (two on a shared 2-core machine make small ops wait); glibc
        # serves big blocks from its heap instead of fresh pages for each 50304-wide logits tensor (tests/conftest.py)
        env_base.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MALLOC_MMAP_MAX_="0",
                        MALLOC_TRIM_THRESHOLD_=str(2 ** 34))
    start, statuses = time.monotonic(), {}
    try:
        for i, part in enumerate(parts):
            reserve_later = sum(p.reserve[dry] for p in parts[i + 1:])
            limit = max(1.0, min(part.cap[dry], budget - (time.monotonic() - start) - reserve_later))
            t0, text, rc, timed_out = time.monotonic(), "", None, False
            print(f"==> {part.name} (limit {limit:.0f} s): {part.title}", flush=True)
            stage = "setup"
            try:
                cmd, cwd, env = SETUPS[part.name](ctx)
                remaining = limit - (time.monotonic() - t0)
                log_path = work / f"{part.name}.log"
                stage = "run"
                rc, timed_out = run_child(cmd, cwd, {**env_base, **env}, max(0.5, remaining), log_path,
                                          f"[{part.name}]")
                text = log_path.read_text(errors="replace")
                stage = "reading its output"
                figures, fails = judge(part, ctx, text, rc)
            except Exception as e:  # in this script, not in the part's process
                figures, fails = [], [f"{stage}: {type(e).__name__}: {e}"]
                text += "\n" + traceback.format_exc()
            wall = time.monotonic() - t0
            status = "TIMEOUT" if timed_out else "FAILED" if fails else "ok"
            if timed_out:
                fails = [f"ran past its limit of {limit:.0f} s and was stopped; figures above are those it reached"]
            statuses[part.name] = status
            with open(out, "a") as f:
                f.write(part_block(part, status, wall, limit, ctx.notes.get(part.name, []), figures, fails, text))
                f.flush()
                os.fsync(f.fileno())
    except KeyboardInterrupt:
        with open(out, "a") as f:
            f.write("interrupted (Ctrl-C): the parts after the last block did not run\n")
        statuses["interrupted"] = "FAILED"
    bad = [name for name, status in statuses.items() if status != "ok"]
    with open(out, "a") as f:
        f.write(f"summary: {len(statuses) - len(bad)} ok, {len(bad)} not ok{': ' + ', '.join(bad) if bad else ''}; "
                f"{time.monotonic() - start:.1f} s in all\n")
        if bad:
            f.write(f"the parts' full output is kept in {work}\n")
    if not bad:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + out.read_text(), end="", flush=True)
    return 1 if bad else 0


# ----------------------------------------------------------------------------------------------------------------------
# Child: train_gpt.py in-process

def prefix_roundtrip(val_pattern, max_docs=50, max_tokens=200_000):
    """Share of the first val documents that the prefix encoding reproduces: decode the ids to bytes, encode the text
    again. A wrong id mapping gives other bytes, which encode to other ids; the right one gives them back."""
    import glob
    import numpy as np
    import tiktoken
    enc = tiktoken.get_encoding(ENCODING)
    tokens = np.fromfile(sorted(glob.glob(val_pattern))[0], dtype="<u2", offset=1024, count=max_tokens)
    starts = np.flatnonzero(tokens == BOS)
    docs = [tokens[a + 1:b].tolist() for a, b in zip(starts, starts[1:])][:max_docs]
    same = 0
    for ids in docs:
        try:
            same += enc.encode_ordinary(enc.decode_bytes(ids).decode("utf-8")) == ids
        except (UnicodeDecodeError, KeyError):
            pass
    return same / max(1, len(docs)), len(docs)


def child_train_gpt(spec):
    dry, argv = spec["dry_run"], spec["argv"]
    import torch
    import torch._dynamo.utils
    import warnings
    import train_gpt as tg
    cuda = torch.cuda.is_available()
    if not dry and not cuda:
        emit_fail("no CUDA device (run with --dry-run on a CPU)")
        return 1
    if spec["prefix"]:
        share, n_docs = prefix_roundtrip(spec["val_files"])
        emit("prefix_roundtrip_docs", f"{share:.3f} of {n_docs} val documents decoded and re-encoded to the same ids")
        if share < 0.9:  # a synthetic corpus of ours is encoded by the same BPE, so it must round-trip too
            emit_fail(f"the tiktoken encoding built from tokenizer.json reproduces only {share:.0%} of the corpus's "
                      "documents: its ids are not the corpus's, the prefix table would be wrong")
    counters, failures = torch._dynamo.utils.counters, torch._dynamo.utils.guard_failures
    graphs = lambda: counters["stats"]["unique_graphs"]
    reasons = lambda: [(getattr(code, "co_name", str(code)), reason) for code, rs in list(failures.items())
                       for reason in rs]
    n_iter = int(flag(argv, "num_iterations"))
    batches = [int(b) for b in flag(argv, "train_batch_size").split(",")]
    bounds = [round(k * n_iter / len(batches)) for k in range(len(batches) + 1)]  # the stages, as README states
    census = {bounds[k] + 2: k for k in range(len(batches))}  # the third step of each stage: host syncs counted
    marks, syncs, trainers = {}, {}, []

    class CheckedTrainer(tg.Trainer):
        """Records the compile counters around the kernel warmup and before the first validation, and the host
        syncs of one step a stage (torch.cuda.set_sync_debug_mode warns at every synchronizing call)."""
        def __init__(self, *a):
            super().__init__(*a)
            trainers.append(self)
            marks["init"] = (graphs(), len(reasons()))

        def kernel_warmup(self, n_steps, log):
            super().kernel_warmup(n_steps, log)
            marks["warmup"] = (graphs(), len(reasons()))

        def train_step(self, step, loader):
            if not (cuda and step in census):
                return super().train_step(step, loader)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return super().train_step(step, loader)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                    syncs[census[step]] = [w for w in caught if "synchroniz" in str(w.message)]

        def evaluate(self, step, val):
            marks.setdefault("val", (graphs(), len(reasons())))
            return super().evaluate(step, val)

    tg.Trainer = CheckedTrainer
    user_conf = {k: os.environ[k] for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF") if k in os.environ}
    os.chdir(spec["work"])
    try:
        tg.main(argv)
    except tg.UserError as e:
        emit_fail(f"train_gpt.main stopped: {e}")
        return 1
    end = (graphs(), len(reasons()))
    with open("logs/gpu_check.txt") as f:
        log = f.read()
    steps = [(int(s), float(ms)) for s, ms in re.findall(r"^step:(\d+)/\d+ train_time:([\d.]+)ms step_avg:", log, re.M)]
    emit("steps", len(steps))
    if [s for s, _ in steps] != list(range(1, n_iter + 1)):
        emit_fail(f"the log has step lines {[s for s, _ in steps]}, expected 1..{n_iter}")
    times = dict(steps)
    for k, batch in enumerate(batches):  # step s (1-based line) is optimizer step s - 1
        deltas = [times[s] - times.get(s - 1, 0.0) for s in range(bounds[k] + 1, bounds[k + 1] + 1) if s in times]
        if deltas:
            emit(f"stage{k + 1}_ms_per_step", statistics.median(deltas))
            emit(f"stage{k + 1}_ms_per_step_mean", statistics.mean(deltas))
            emit(f"stage{k + 1}_tokens_per_s", batch / statistics.median(deltas) * 1000)
        emit(f"stage{k + 1}_batch_tokens", batch)
    emit("step_times_note", "step lines are written without a device sync: medians of their deltas, and the synced "
                            "total in train_time_ms")
    summary = re.search(r"^summary val_loss:(\S+) train_time:([\d.]+)ms tokens_per_s:(\S+) mfu:(\S+)$", log, re.M)
    if summary:
        emit("val_loss", summary[1])
        emit("train_time_ms", summary[2])
        emit("tokens_per_s", summary[3])
        emit("mfu_pct", summary[4].rstrip("%"))
        if not math.isfinite(float(summary[1])):
            emit_fail(f"val loss {summary[1]}")
    else:
        emit_fail("no summary line in the log")
    peak = re.search(r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB$", log, re.M)
    if peak:
        emit("peak_alloc_mib", peak[1])
        emit("peak_reserved_mib", peak[2])
    warmup_s = [float(t) for t in re.findall(r"^kernel warmup \d+/\d+: .*, ([\d.]+)s \(untimed\)$", log, re.M)]
    emit("kernel_warmup_s", sum(warmup_s) if warmup_s else "n/a: no kernel warmup ran (--compile=0)")
    for line in re.findall(r"^kernel warmup.*$", log, re.M):
        emit("kernel_warmup_line", line)
    warm = marks.get("warmup", marks.get("init", (0, 0)))
    val = marks.get("val", end)
    emit("graphs_total", end[0])
    emit("graphs_warmup", warm[0] - marks.get("init", (0, 0))[0])
    emit("graphs_timed", val[0] - warm[0])
    emit("graphs_validation", end[0] - val[0])
    all_reasons = reasons()
    emit("recompiles", len(all_reasons))
    for i, (code, reason) in enumerate(all_reasons):
        when = "warmup" if i < warm[1] else "timed steps" if i < val[1] else "validation"
        emit(f"recompile_{i + 1}", f"[{when}] {code}: {reason.splitlines()[0][:300]}")
    if val[0] > warm[0]:
        emit_fail(f"{val[0] - warm[0]} graph(s) compiled during the timed steps (the kernel warmup should compile "
                  "every training shape): the step times include compilation")
    compiled = flag(argv, "compile") if any(a.startswith("--compile=") for a in argv) else "1"
    if compiled == "1" and warm[0] == marks.get("init", (0, 0))[0]:
        emit_fail("nothing was compiled in the kernel warmup although --compile=1")
    if trainers and spec["prefix"]:
        rows = int((trainers[0].model.prefix_table >= 0).sum())
        emit("prefix_table_rows", f"{rows} token ids with a prefix token")
        if rows == 0:
            emit_fail("the prefix table is empty")
    if cuda:
        for k in range(len(batches)):
            sites = syncs.get(k, [])
            emit(f"host_syncs_stage{k + 1}", f"{len(sites)} in step {bounds[k] + 3}")
            for site in sorted({f"{os.path.basename(w.filename)}:{w.lineno}" for w in sites}):
                emit(f"host_sync_site_stage{k + 1}", site)
        segments = torch.cuda.memory_snapshot()
        segments = segments["segments"] if isinstance(segments, dict) else segments
        expandable = [bool(s.get("is_expandable")) for s in segments]
        emit("expandable_segments", f"{'yes' if any(expandable) else 'no'} ({sum(expandable)} of {len(expandable)} "
                                    "segments expandable)")
        emit("alloc_conf", f"before main: {user_conf or 'unset'}; after: "
                           f"{os.environ.get('PYTORCH_ALLOC_CONF', 'unset')}")
        if not user_conf and not any(expandable):
            emit_fail("the allocator used no expandable segments although PYTORCH_ALLOC_CONF was unset (train_gpt.main "
                      "should set expandable_segments:True)")
    else:
        emit("expandable_segments", "n/a (CPU)")
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# Child: micro checks

def child_micro(spec):
    dry = spec["dry_run"]
    import numpy as np
    import torch
    import torch.nn.functional as F
    import warnings
    import train_gpt as tg
    cuda = torch.cuda.is_available() and not dry
    if not dry and not cuda:
        emit_fail("no CUDA device (run with --dry-run on a CPU)")
        return 1
    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32  # CPU: fp32 (bf16 matmuls are ~10x slower there)
    torch.manual_seed(0)
    warmup, repeats = (3, 10) if cuda else (1, 2)
    if cuda:
        compile_fn = lambda f: torch.compile(f, dynamic=False, fullgraph=True)
    else:  # no Inductor on a CPU here; flex_attention's backward is refused by a device check only: lifted
        compile_fn = lambda f: f
        import torch.nn.attention.flex_attention as flex_module
        flex_module._validate_device = lambda *a, **k: None
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed_ms(fn):
        """Median ms of fn after warmup calls: CUDA events on a GPU, the wall clock on a CPU."""
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times)

    def peak_gib(fn, clear):
        """GiB allocated at the peak of one fn() above what was allocated before it (inputs, weights)."""
        if not cuda:
            return "n/a (CPU)"
        clear()
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 30

    def rel(a, b):  # max abs error relative to the reference's max abs value
        a, b = a.detach().double(), b.detach().double()
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    def fro(a, b):  # relative Frobenius error
        a, b = a.detach().double(), b.detach().double()
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    def check(name, fn):
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            emit_fail(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        finally:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    def rmsnormed(*shape):
        return F.rms_norm(torch.randn(*shape, device=dev), (shape[-1],)).to(dt)

    def gemm():  # FP8 (e4m3 row-major x e4m3 column-major, bf16 out, fast accumulation: the head's forward) vs bf16
        M, K, N = (49152, 768, 3072) if cuda else (256, 128, 512)
        a, w = torch.randn(M, K, device=dev), torch.randn(N, K, device=dev)
        scale_a, scale_w = a.abs().max() / 448, w.abs().max() / 448
        a8, w8 = (a / scale_a).to(torch.float8_e4m3fn), (w / scale_w).to(torch.float8_e4m3fn)
        a16, w16 = a.bfloat16(), w.bfloat16()
        fp8 = lambda: torch._scaled_mm(a8, w8.T, scale_a=scale_a, scale_b=scale_w, out_dtype=torch.bfloat16,
                                       use_fast_accum=True)
        bf16 = lambda: a16 @ w16.T
        flops = 2 * M * K * N
        for name, fn in (("fp8", fp8), ("bf16", bf16)):
            ms = timed_ms(fn)
            emit(f"gemm_{name}_ms", ms)
            emit(f"gemm_{name}_tflops", flops / ms / 1e9)
        emit("gemm_shape", f"{M} x {K} x {N}")
        exact = a.double() @ w.double().T
        fp8_err = fro(fp8(), exact)
        emit("gemm_fp8_rel_err", fp8_err)
        emit("gemm_bf16_rel_err", fro(bf16(), exact))
        if fp8_err > 0.15:  # e4m3 rounds each operand by <= 2^-4 (about 5% expected): 0.15 is broken
            emit_fail(f"FP8 GEMM relative error {fp8_err:.3f} > 0.15")

    def head():  # the stage-3 head + loss: 49,152 tokens, one prediction, no prefix; fp8 vs bf16 on the same weights
        N, D, V = (49152, 768, 50304) if cuda else (256, 128, 512)
        x0 = rmsnormed(N, D)
        weight = (0.02 * torch.randn(V, D, device=dev)).to(dt)  # about a trained head's scale
        targets = torch.randint(0, V, (N,), device=dev)
        mtp, prefix = torch.ones(1, device=dev), torch.zeros((), device=dev)
        prefix_targets = torch.full((N,), -1, device=dev)
        out = {}
        for fp8 in (True, False):
            lm_head = tg.CastedLinear(D, V, fp8=fp8).to(dev, dt).train()
            lm_head.weight.data.copy_(weight)
            x = x0.clone().requires_grad_()
            loss_fn = compile_fn(lambda x: tg.head_loss(x, lm_head, targets, mtp, prefix_targets, prefix)[0])

            def clear():
                x.grad = lm_head.weight.grad = None

            def step():
                clear()
                loss = loss_fn(x)
                (loss / 8).backward()  # as train_step: the loss of a slot over 8 slots
                return loss

            name = "fp8" if fp8 else "bf16"
            emit(f"head_{name}_ms", timed_ms(step))
            emit(f"head_{name}_peak_gib", peak_gib(step, clear))
            out[name] = (step().item(), x.grad.clone(), lm_head.weight.grad.clone())
            del lm_head, x, loss_fn
        emit("head_shape", f"x [{N}, {D}] -> head_loss: CastedLinear({D}, {V}), softcap and loss fused")
        emit("head_fp8_vs_bf16_loss_rel", abs(out["fp8"][0] - out["bf16"][0]) / abs(out["bf16"][0]))
        emit("head_fp8_vs_bf16_grad_x_rel", fro(out["fp8"][1], out["bf16"][1]))
        emit("head_fp8_vs_bf16_grad_w_rel", fro(out["fp8"][2], out["bf16"][2]))
        if abs(out["fp8"][0] - out["bf16"][0]) / abs(out["bf16"][0]) > 1e-2:
            emit_fail("FP8 head loss differs from the bf16 head's by more than 1%")

    def documents(T, rng):
        """T tokens of documents with realistic lengths (log-normal, median about 1,200, 32 to 6,000 tokens)."""
        tokens = torch.from_numpy(rng.integers(0, BOS, T)).int()
        pos = 0
        while pos < T:
            tokens[pos] = BOS
            pos += int(np.clip(rng.lognormal(math.log(1200 if cuda else 150), 0.8), 32, 6000))
        return tokens.to(dev)

    def flex():  # compiled flex_attention through tg.attend vs the portable twin (fp32) and vs the flash kernel
        T, H, D = (49152, 6, 128) if cuda else (512, 6, 32)
        windows = dict(short=5, long=11) if cuda else dict(short=1, long=2)  # blocks of 128; dry: T is 4 blocks
        inputs = documents(T, np.random.default_rng(1))
        attend = compile_fn(tg.attend)
        scale = 0.12
        emit("flex_shape", f"T={T}, {H} heads of {D} (paired: {2 * T} positions, {H // 2} heads), windows "
                           f"{windows['short']}/{windows['long']} blocks, {int((inputs == BOS).sum())} documents")
        for kind in ("short", "long", "paired"):
            def one():
                paired = kind == "paired"
                n, heads = (2 * T, H // 2) if paired else (T, H)
                window = windows["long" if kind == "long" else "short"]
                q, k, v = (rmsnormed(1, n, heads, D) for _ in range(3))
                if kind == "long":
                    k = tg.key_offset(k)
                q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
                grad_out = torch.randn(1, n, heads, D, device=dev).to(dt)
                mask_ms = timed_ms(lambda: tg.make_masks(inputs, [window], True, paired))
                flex_mask = tg.make_masks(inputs, [window], True, paired)[0]
                twin_mask = tg.make_masks(inputs, [window], False, paired)[0]

                def clear():
                    q.grad = k.grad = v.grad = None

                def flex_step():
                    clear()
                    out = attend(q, k, v, flex_mask, scale)
                    out.backward(grad_out)
                    return out

                emit(f"{kind}_mask_ms", mask_ms)
                emit(f"{kind}_flex_ms", timed_ms(flex_step))
                out = flex_step()
                ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
                ref_out = tg.attend(*ref, twin_mask, scale)
                ref_out.backward(grad_out.float())
                emit(f"{kind}_out_err", rel(out, ref_out))
                for name, a, b in zip(("dq", "dk", "dv"), (q, k, v), ref):
                    emit(f"{kind}_{name}_err", rel(a.grad, b.grad))
                worst = max([rel(out, ref_out)] + [rel(a.grad, b.grad) for a, b in zip((q, k, v), ref)])
                if worst > 0.05:  # bf16 inputs, fp32 accumulation: about 1%; a wrong mask or layout is far above
                    emit_fail(f"flex {kind}: max error {worst:.3g} (relative to the twin's max) > 0.05")
                del ref, ref_out, out
                qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
                go = grad_out.transpose(1, 2).contiguous()

                def flash_step():
                    qt.grad = kt.grad = vt.grad = None
                    F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale).backward(go)

                if cuda:
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        emit(f"{kind}_flash_ms", timed_ms(flash_step))
                else:
                    emit(f"{kind}_flash_ms", timed_ms(flash_step))
            check(f"flex {kind}", one)

    def dc():  # tg.dc_attention forward + backward at the stage-3 slot: eager, then compiled
        T, H, D = (49152, 6, 128) if cuda else (1024, 6, 32)
        docs = (documents(T, np.random.default_rng(2)) == BOS).cumsum(0)
        q, k, v = (rmsnormed(1, T, H, D).requires_grad_() for _ in range(3))
        w1, w2 = (torch.randn(1, T, H, device=dev).to(dt).requires_grad_() for _ in range(2))
        grad_out = torch.randn(1, T, H, D, device=dev).to(dt)
        leaves = (q, k, v, w1, w2)
        outs = {}
        for name, fn in (("eager", tg.dc_attention), ("compiled", compile_fn(tg.dc_attention))):
            def clear():
                for t in leaves:
                    t.grad = None

            def step():
                clear()
                out = fn(q, k, v, w1, w2, docs, 0.12, 112)
                out.backward(grad_out)
                return out

            key = "dc_ms" if name == "compiled" else "dc_eager_ms"
            emit(key, timed_ms(step))
            if name == "compiled":
                emit("dc_peak_gib", peak_gib(step, clear))
            outs[name] = step().detach()
        emit("dc_shape", f"T={T}, {H} heads of {D}, window 112")
        emit("dc_compiled_vs_eager_err", rel(outs["compiled"], outs["eager"]))

    def polar():  # Polar Express on each NorMuon bank at world size 1, compiled as Trainer does
        banks = dict(qk=(60, 256, 768), vo=(20, 768, 768), mlp=(22, 3072, 768)) if cuda else \
            dict(qk=(6, 32, 96), vo=(2, 96, 96), mlp=(2, 384, 96))
        fn = compile_fn(tg.polar_express)
        for name, shape in banks.items():
            G = torch.randn(*shape, device=dev)
            emit(f"polar_{name}_ms", timed_ms(lambda: fn(G)))
            emit(f"polar_{name}_shape", "x".join(map(str, shape)))

    # cheapest and most telling first: a part that runs out of time keeps what it measured
    for name, fn in (("gemm", gemm), ("head", head), ("flex", flex), ("dc", dc), ("polar", polar)):
        check(name, fn)
    return 0


CHILDREN = {"train_gpt": child_train_gpt, "micro": child_micro}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
