#!/usr/bin/env python3
"""Plot val loss (GPT) or accuracy (CIFAR) against step and against training time, for run logs or record folders.

    python records/plot.py records/gpt/2026-01-01_New records/gpt/2025-12-01_Previous --out compare.png

Each argument (a log, or a folder of logs) gets one colour and one legend entry; the track's target is dashed.
Without --out the plot is plot.png beside the logs of the first argument (in that folder, or in that log's folder).
Needs matplotlib (not needed to train).
"""
import argparse
import os
import sys

from verify import TRACKS, BadInput, parse_log, read_folder


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", metavar="LOG_OR_FOLDER")
    ap.add_argument("--out", help="PNG to write (default: plot.png beside the first argument's logs: in it if it is a "
                    "folder, else in the folder of that log)")
    ap.add_argument("--ylim", type=float, nargs=2, metavar=("LOW", "HIGH"), help="y range (default: fit the data)")
    args = ap.parse_args(argv)
    first = args.paths[0]
    out = args.out or os.path.join(first if os.path.isdir(first) else os.path.dirname(first), "plot.png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py: error: matplotlib is needed for plots: pip install matplotlib", file=sys.stderr)
        return 2
    try:
        groups = [(os.path.basename(os.path.normpath(p)), read_folder(p) if os.path.isdir(p) else [parse_log(p)])
                  for p in args.paths]
    except BadInput as e:
        for line in str(e).split("\n"):
            print(f"plot.py: error: {line}", file=sys.stderr)
        return 2
    kinds = {log.kind for _, logs in groups for log in logs}
    if len(kinds) > 1:
        print("plot.py: error: the arguments mix GPT and CIFAR logs: plot one track at a time", file=sys.stderr)
        return 2
    gpt = kinds == {"gpt"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for color, (label, logs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10, groups):
        curves = [c[1:] if gpt and len(c) > 1 else c for log in logs for c in log.curves]  # GPT: skip the step-0 loss
        for i, curve in enumerate(curves):
            for ax, x in zip(axes, (0, 1)):
                ax.plot([pt[x] for pt in curve], [pt[2] for pt in curve], color=color, alpha=0.7, lw=1, marker=".",
                        label=f"{label} ({len(curves)} run{'s' * (len(curves) > 1)})" if i == 0 else None)
    tracks = {log.track for _, logs in groups for log in logs}
    metric, target = TRACKS[tracks.pop()][:2] if len(tracks) == 1 and None not in tracks else ("acc", None)
    for ax, xlabel in zip(axes, ("step" if gpt else "epoch", "training time (s)")):
        if target is not None:
            ax.axhline(target, color="gray", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    if args.ylim:
        axes[0].set_ylim(*args.ylim)
    axes[0].legend()
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        print(f"plot.py: error: {out}: cannot write it ({e.strerror}); --out names another file", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
