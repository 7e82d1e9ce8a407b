"""The validation loss of a train_gpt.py checkpoint, as the run computed it at that step: the same val tokens, windows,
rotary state and arithmetic (Trainer.evaluate), on any number of processes.

    python evals/val_loss.py logs/<run_id>/state_step001285.pt [--val_files=PATTERN]
    torchrun --standalone --nproc_per_node=8 evals/val_loss.py CHECKPOINT

Prints one line, `val_loss:x.xxxx step:1285 val_tokens:10485760` (4 decimals, as the log). --val_files points at
this machine's copy of the validation shards when the run's path does not hold them (the tokens must be the same for
the same number).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402  (the repository root first)

USAGE = "usage: python evals/val_loss.py CHECKPOINT [--val_files=PATTERN]"


def main(argv):
    path, overrides = tg.tool_args(argv, dict(val_files=(str, None)), USAGE)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = tg.pick_device()
    tg.start_group(device, world)
    trainer, step = tg.load_for_eval(path, rank, world, device, **overrides)
    val = tg.load_val(trainer.h)
    loss = trainer.evaluate(step, val)
    if rank == 0:
        print(f"val_loss:{loss:.4f} step:{step} val_tokens:{trainer.h.val_tokens}")
    if world > 1:
        tg.dist.destroy_process_group()


if __name__ == "__main__":
    tg.run_tool(main, "val_loss.py")
