#!/usr/bin/env python3
"""Plot val loss (GPT) or accuracy (CIFAR) against step and against training time, for run logs or record folders.

    python records/plot.py records/gpt/2026-01-01_New records/gpt/2025-12-01_Previous --out compare.png

Each argument (a log, or a folder of logs) gets one colour and one legend entry; the track's target is a dashed,
labelled line when it lies within the data's range (the y-range fits the data unless --ylim is given).
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
        from matplotlib.ticker import MaxNLocator
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
    metrics = []
    for color, (label, logs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10, groups):
        curves = [curve for log in logs for curve in log.curves]  # from step 0 (GPT) / epoch 1 (CIFAR)
        for i, curve in enumerate(curves):
            metrics += [point[2] for point in curve]
            for ax, x in zip(axes, (0, 1)):
                ax.plot([point[x] for point in curve], [point[2] for point in curve], color=color, alpha=0.7, lw=1,
                        marker=".", label=f"{label} ({len(curves)} run{'s' * (len(curves) > 1)})" if i == 0 else None)
    tracks = {log.track for _, logs in groups for log in logs}
    metric, target = TRACKS[tracks.pop()][:2] if len(tracks) == 1 and None not in tracks else ("acc", None)
    low, high = args.ylim or (min(metrics), max(metrics))
    pad = 0.05 * (high - low or abs(high) or 1)  # a margin, also for one point or a flat curve
    for ax, xlabel in zip(axes, ("step" if gpt else "epoch", "training time (s)")):
        if target is not None and low <= target <= high:  # outside the data it would stretch the range (a CPU curve)
            ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target:g}")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole numbers
    axes[0].set_ylim(low - pad * (not args.ylim), high + pad * (not args.ylim))
    axes[0].set_ylabel(metric)
    if target is not None and not low <= target <= high:
        axes[0].set_title(f"target {target:g}: outside the plotted range", fontsize=9, color="gray")
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
