"""Zero-shot HellaSwag validation accuracy of a train_gpt.py checkpoint, on any number of processes.

    python evals/hellaswag.py logs/<run_id>/state_step001285.pt [--data=hellaswag_val.jsonl] [--encoding=gpt2]
    torchrun --standalone --nproc_per_node=8 evals/hellaswag.py CHECKPOINT

The 10,042 validation items: by default the Hub's copy in data/hellaswag/hellaswag_val.jsonl, downloaded and checked
first by data/hellaswag.py if it is not there (GitHub has disabled the official file's home, rowanz/hellaswag, since
September 2026); --data: a local file in the official hellaswag_val.jsonl format instead, any number of items, one
JSON object a line with "ctx", "endings" (4 strings) and "label" (0-3, a number or its string). Each item's context
followed by each ending (with a leading space, as GPT-2 tokenizes a following word) is one document, BOS first, as the
training documents are; many documents are packed into one sequence of up to --seq_len tokens (default: the run's
validation slab, the longest its model takes), never an item split across two, so the model's document masks score
thousands of endings in one forward, at the windows and rotary state of the checkpoint's step (the final validation's
for a run's last checkpoint). An ending's score is the sum of its tokens' log-likelihoods: acc takes the highest sum,
acc_norm the highest mean over its tokens (the token-normalized score of the usual GPT-2 tables, e.g.
build-nanogpt's: GPT-2 124M 0.2859 and 0.2955). The packs are spread over the ranks.
Prints one line: `hellaswag acc:... acc_norm:... items:... seconds:...`.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402  (the repository root first)
from data import hellaswag as hellaswag_data  # noqa: E402

OPTIONS = dict(data=(str, None), encoding=(str, "gpt2"), seq_len=(int, None))
USAGE = "usage: python evals/hellaswag.py CHECKPOINT [--data=hellaswag_val.jsonl] [--encoding=gpt2] [--seq_len=N]"


def load_items(path, flag="--data"):
    """[(ctx, [4 endings], label)] of `path`, or of the Hub's copy (data/hellaswag/, fetched first) when path is None;
    a bad or missing file: a UserError of one line."""
    try:
        return hellaswag_data.read_items(path, flag) if path else hellaswag_data.read_items(hellaswag_data.fetch())
    except hellaswag_data.DataError as e:
        raise tg.UserError(str(e)) from None


def pack(items, seq_len, bos):
    """Token packs of whole items: [(tokens int32 [a multiple of 128], [(item index, [4 spans])])]. Document
    [BOS, *ctx, *ending] at offset o predicts ending token j at position o + len(ctx) + j: its span is
    (o + len(ctx), o + len(ctx) + len(ending)), and tokens[p + 1] is the target at position p. items: token lists
    (ctx, [4 endings]). A pack closes before the item that would pass seq_len."""
    packs, tokens, spans = [], [], []
    for index, (ctx, endings) in enumerate(items):
        docs = [[bos, *ctx, *ending] for ending in endings]
        if sum(map(len, docs)) > seq_len:
            raise tg.UserError(f"HellaSwag item {index} has {sum(map(len, docs))} tokens, more than a pack of "
                               f"{seq_len}: raise --seq_len")
        if tokens and len(tokens) + sum(map(len, docs)) > seq_len:
            packs.append((tokens, spans))
            tokens, spans = [], []
        item_spans = []
        for doc, ending in zip(docs, endings):
            start = len(tokens) + len(ctx)
            item_spans.append((start, start + len(ending)))
            tokens += doc
        spans.append((index, item_spans))
    packs.append((tokens, spans))
    return [(np.array(t + [0] * (-len(t) % tg.BLOCK), dtype=np.int32), s) for t, s in packs]


@torch.no_grad()
def ending_log_likelihoods(trainer, windows, tokens, spans):
    """{item index: [(sum of the ending's token log-likelihoods, its token count)] x 4} of one pack, the logits with
    the validation's softcap arithmetic, --val_head_chunk positions at a time."""
    chunk, device = trainer.h.val_head_chunk, trainer.device
    x = trainer.hidden(tokens, windows)
    positions = np.concatenate([np.arange(a, b) for _, item in spans for a, b in item])
    where, targets = torch.from_numpy(positions).to(device), torch.from_numpy(tokens[positions + 1]).long().to(device)
    picked = []
    for i in range(0, len(positions), chunk):
        logits = trainer.model.eval_logits(x[where[i:i + chunk]])
        picked.append(F.log_softmax(logits, -1).gather(1, targets[i:i + chunk, None])[:, 0])
    per_token = torch.cat(picked).double().cpu().numpy()
    out, at = {}, 0
    for index, item in spans:
        out[index] = []
        for a, b in item:
            out[index].append((float(per_token[at:at + b - a].sum()), b - a))
            at += b - a
    return out


def evaluate(trainer, step, items, enc, seq_len=None):
    """(acc, acc_norm, items, seconds) over items [(ctx, endings, label)], in packs of seq_len tokens (default: the
    longest the model takes, the run's validation slab); every rank calls it (collective)."""
    t0 = time.perf_counter()
    trainer.model.eval()
    windows = trainer.set_windows(step)
    tokenized = [(enc.encode_ordinary(ctx), [enc.encode_ordinary(" " + ending) for ending in endings])
                 for ctx, endings, _ in items]
    packs = pack(tokenized, seq_len or trainer.model.rotary.max_len, trainer.h.bos_id)
    right = [0, 0]  # this rank's items right by the summed and by the mean log-likelihood
    for tokens, spans in packs[trainer.rank::trainer.world]:
        for index, scores in ending_log_likelihoods(trainer, windows, tokens, spans).items():
            label = items[index][2]
            right[0] += int(np.argmax([total for total, _ in scores])) == label
            right[1] += int(np.argmax([total / n for total, n in scores])) == label
    correct = torch.tensor(right, dtype=torch.float64, device=trainer.device)
    if trainer.world > 1:
        tg.dist.all_reduce(correct)
    acc, acc_norm = (correct / len(items)).tolist()
    return acc, acc_norm, len(items), time.perf_counter() - t0


def summary(acc, acc_norm, n, seconds):
    return f"hellaswag acc:{acc:.4f} acc_norm:{acc_norm:.4f} items:{n} seconds:{seconds:.1f}"


def parse(argv):
    path, opts = tg.tool_args(argv, OPTIONS, USAGE)
    if opts["seq_len"] is not None and opts["seq_len"] < tg.BLOCK:
        raise tg.UserError(f"--seq_len={opts['seq_len']}: at least one block of {tg.BLOCK} tokens")
    return path, opts


def main(argv):
    path, opts = parse(argv)
    items = load_items(opts["data"]) if opts["data"] else None  # a local file: before any heavy work
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = tg.pick_device()
    tg.start_group(device, world)
    trainer, step = tg.load_for_eval(path, rank, world, device)
    items = items or load_items(None)  # the Hub's copy, downloaded if need be once the checkpoint has loaded
    enc = tg.tool_encoding(opts["encoding"], trainer.h.vocab_size)
    longest = trainer.model.rotary.max_len  # what the rotary tables cover: a training slot or a validation slab
    if (opts["seq_len"] or 0) > longest:
        raise tg.UserError(f"--seq_len={opts['seq_len']}: at most {longest}, the longest sequence its model takes")
    line = summary(*evaluate(trainer, step, items, enc, opts["seq_len"]))
    if rank == 0:
        print(line)
    if world > 1:
        tg.dist.destroy_process_group()


if __name__ == "__main__":
    tg.run_tool(main, "hellaswag.py")
