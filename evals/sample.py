"""Text from a train_gpt.py checkpoint: the prompt, then up to --max_new_tokens tokens sampled one at a time.

    python evals/sample.py logs/<run_id>/state_step001285.pt --prompt="The capital of France is"
        [--max_new_tokens=200] [--temperature=1.0] [--top_k=0] [--seed=0] [--encoding=gpt2]

Prints the prompt followed by the generated text. The model's own rules apply: the text is one document (BOS first,
as every training document), with the windows and rotary state of the checkpoint's step (the final validation's for
a run's last checkpoint) and the bigram hash rows of the tokens so far; a sampled BOS (a new document) ends the text.
--top_k=1 is greedy decoding; 0 keeps every token the encoding has. No KV cache: each new token re-runs the model on
the whole text, padded to whole 128-token blocks (the padding after the text changes nothing before it: attention is
causal), so the default 200 tokens take 200 forwards of at most three blocks: seconds on a GPU, longer on a CPU for
the record's model. One process (CPU or one GPU).
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402  (the repository root first)

OPTIONS = dict(prompt=(str, None), max_new_tokens=(int, 200), temperature=(float, 1.0), top_k=(int, 0), seed=(int, 0),
               encoding=(str, "gpt2"))
USAGE = ("usage: python evals/sample.py CHECKPOINT --prompt=TEXT [--max_new_tokens=200] [--temperature=1.0] "
         "[--top_k=0] [--seed=0] [--encoding=gpt2]")


def parse(argv):
    """(the checkpoint's path, the options with their defaults); a bad one: one line."""
    path, opts = tg.tool_args(argv, OPTIONS, USAGE)
    if not opts["prompt"]:
        raise tg.UserError("--prompt is empty or missing: the text to continue, e.g. --prompt=\"Once upon a time\"")
    if opts["max_new_tokens"] < 1 or opts["top_k"] < 0 or not opts["temperature"] > 0:
        raise tg.UserError("--max_new_tokens must be >= 1, --top_k >= 0 (0: all), --temperature > 0 (greedy: "
                           "--top_k=1)")
    return path, opts


@torch.no_grad()
def next_logits(trainer, tokens, windows):
    """The fp32 softcapped logits of the token after `tokens`, as the validation computes them."""
    padded = np.array(tokens + [0] * (-len(tokens) % tg.BLOCK), dtype=np.int32)
    return trainer.model.eval_logits(trainer.hidden(padded, windows)[len(tokens) - 1:len(tokens)])[0]


def generate(trainer, step, tokens, max_new_tokens, temperature=1.0, top_k=0, seed=0, n_vocab=None):
    """Up to max_new_tokens ids after tokens (ids, BOS first), stopping before a BOS; ids >= n_vocab never come."""
    trainer.model.eval()
    windows = trainer.set_windows(step)
    generator = torch.Generator(trainer.device).manual_seed(seed)
    out = []
    for _ in range(max_new_tokens):
        logits = next_logits(trainer, tokens + out, windows)[:n_vocab]
        if top_k:
            kth = logits.topk(min(top_k, len(logits))).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
        if token == trainer.h.bos_id:
            break
        out.append(token)
    return out


def main(argv):
    path, opts = parse(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise tg.UserError("sample.py runs in one process (python evals/sample.py ..., not torchrun)")
    trainer, step = tg.load_for_eval(path, device=tg.pick_device())
    enc = tg.tool_encoding(opts["encoding"], trainer.h.vocab_size)
    tokens = [trainer.h.bos_id] + enc.encode(opts["prompt"], disallowed_special=())
    new = generate(trainer, step, tokens, opts["max_new_tokens"], opts["temperature"], opts["top_k"], opts["seed"],
                   enc.n_vocab)
    print(opts["prompt"] + enc.decode(new))


if __name__ == "__main__":
    tg.run_tool(main, "sample.py")
