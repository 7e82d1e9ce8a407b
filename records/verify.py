#!/usr/bin/env python3
"""Check a record from its run logs and print the markdown for its README.

    python records/verify.py records/gpt/2026-01-01_MyIdea                     # every *.txt log in the folder
    python records/verify.py FOLDER --compare records/gpt/2025-12-01_Previous  # + time against the previous record
    python records/verify.py --table                                           # rewrite the table in records/README.md

GPT logs (train_gpt.py: one run each) and CIFAR logs (train_cifar.py: one sample per `run:` line) are told apart by
their content; the track (gpt, cifar94, cifar96) by the log kind and the CIFAR `variant` hyperparameter, unless --track
says it. Exit code: 0 when every run finished, all logs carry the same code and hyperparameters (seed, paths and a few
others may differ, see FREE), no log is a copy of another, and p < 0.01; 1 when a check fails; 2 on bad input.
Needs scipy (not needed to train).
"""
import argparse
import glob
import hashlib
import math
import os
import re
import statistics
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field

SEP = "=" * 100
TRACKS = {"gpt": ("val_loss", 3.28, "less", "8xH100"),  # metric, default target, side of the t-test, hardware
          "cifar94": ("acc", 0.94, "greater", "1 GPU"), "cifar96": ("acc", 0.96, "greater", "1 GPU")}
FREE = {"seed", "run_id", "runs", "resume", "save_checkpoint", "checkpoint_every"}  # and names ending in _files / _dir
TABLE_BEGIN, TABLE_END = "<!-- records table: begin -->", "<!-- records table: end -->"


class BadInput(Exception):
    pass


def fields(line):
    """'step:3/6 val_loss:10.3 train_time:12ms' -> {'step': '3/6', 'val_loss': '10.3', 'train_time': '12ms'}"""
    return dict(token.split(":", 1) for token in line.split() if ":" in token)


def number(text):  # '12ms' -> 12.0, '1.5s' -> 1.5, '41.2%' -> 41.2
    return float(re.sub(r"(ms|s|%)$", "", text))


def non_finite(line):
    """The first 'key:value' of a line whose value is a number that is nan or inf, else None."""
    for key, text in fields(line).items():
        try:
            value = number(text)
        except ValueError:
            continue
        if not math.isfinite(value):
            return f"{key}:{text}"
    return None


@dataclass
class Log:
    path: str
    kind: str                                   # "gpt" or "cifar"
    code: str                                   # the script's source, before the first line of 100 '='
    body: str                                   # everything after the environment block
    config: dict                                # hyperparameters (+ world_size), values as written
    hardware: str
    samples: list = field(default_factory=list)  # (label, final metric, seconds) per run
    curves: list = field(default_factory=list)   # per run: [(step or epoch, seconds, metric), ...]

    @property
    def name(self):
        return os.path.basename(self.path)

    @property
    def track(self):
        variant = self.config.get("variant")
        return "gpt" if self.kind == "gpt" else f"cifar{variant}" if variant in ("94", "96") else None


def parse_log(path):
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: unreadable ({e.__class__.__name__}): a run log is a UTF-8 text file")
    seps = [i for i, line in enumerate(lines) if line == SEP]
    if len(seps) < 2:
        raise BadInput(f"{path}: no source and environment blocks (two lines of 100 '='): not a train_gpt.py / "
                       "train_cifar.py log, or cut short before training")
    env, body = lines[seps[0] + 1:seps[1]], [line for line in lines[seps[1] + 1:] if line.strip()]
    config, in_hyper = {}, False
    for line in env:
        in_hyper = (in_hyper and line[:1].isspace()) or line == "hyperparameters:"
        if (in_hyper and "=" in line) or line.startswith("world_size="):
            name, _, value = line.strip().removeprefix("--").partition("=")
            config[name] = value
    gpus = re.findall(r"^\|\s+\d+\s+(NVIDIA .+?)\s{2,}", "\n".join(env), re.M)
    hardware = " + ".join(f"{n}x {g}" for g, n in Counter(gpus).items()) or "no GPU in nvidia-smi"
    kind = ("gpt" if any(line.startswith(("step:", "summary val_loss:")) for line in body) else
            "cifar" if any(line.startswith(("epoch:", "run:", "summary runs:")) for line in body) else None)
    if kind is None:
        raise BadInput(f"{path}: no step or run lines after the environment block: cut short before training")
    for line in body:  # a CIFAR summary of one run has acc_std:nan: the run lines tell
        bad = non_finite(line) if line.startswith(("step:", "summary val_loss:", "epoch:", "run:")) else None
        if bad:
            raise BadInput(f"{path}: broken: {bad} in {line[:60]!r}: a run that diverged (or an edited log) is no "
                           "record run; remove the log")
    log = Log(path, kind, "\n".join(lines[:seps[0]]), "\n".join(body), config, hardware)
    (read_gpt if kind == "gpt" else read_cifar)(log, body)
    return log


def read_gpt(log, body):
    val, total, summary = [], None, None
    for line in body:
        try:
            f = fields(line)
            if line.startswith("step:"):
                step, total = map(int, f["step"].split("/"))
                if "val_loss" in f:
                    val.append((step, number(f["train_time"]) / 1000, float(f["val_loss"])))
            elif line.startswith("summary "):
                summary = (float(f["val_loss"]), number(f["train_time"]) / 1000)
        except (KeyError, ValueError):
            raise BadInput(f"{log.path}: malformed line {line[:80]!r}: cut short or edited; rerun or remove the log")
    if summary is None or not val or val[-1][0] != total:
        last = f"last validation at step {val[-1][0]}/{total}" if val else "no validation line"
        raise BadInput(f"{log.path}: cut short ({last}, {'a' if summary else 'no'} summary line): "
                       "rerun or remove the log")
    log.samples.append((log.name, *summary))
    log.curves.append(val)


def read_cifar(log, body):
    curve, summary = [], None
    for line in body:
        f = fields(line)
        try:
            if "epoch" in f and "val_acc" in f and "train_time" in f:  # per-epoch lines: for plots only
                curve.append((int(f["epoch"].split("/")[0]), number(f["train_time"]), float(f["val_acc"])))
            elif line.startswith("warmup"):
                curve = []
            elif line.startswith("run:"):  # run:{i} acc:{a} time:{t}s ('run:{i} epoch:...' is an epoch line)
                acc, seconds = float(f["acc"]), number(f["time"])
                log.samples.append((f"{log.name} run {f['run']}", acc, seconds))
                log.curves.append(curve + [(curve[-1][0] if curve else 0, seconds, acc)])
                curve = []
            elif line.startswith("summary "):
                summary = int(f["runs"])
        except (KeyError, ValueError):
            raise BadInput(f"{log.path}: malformed line {line[:80]!r}: cut short or edited; rerun or remove the log")
    if summary is None or summary != len(log.samples) or not log.samples:
        summarized = "no summary" if summary is None else f"summary of {summary}"
        raise BadInput(f"{log.path}: cut short ({len(log.samples)} run lines, {summarized}): rerun or remove the log")


def read_folder(folder):
    if not os.path.isdir(folder):
        raise BadInput(f"{folder}: no such folder")
    paths = sorted(glob.glob(os.path.join(folder, "*.txt")))
    if not paths:
        raise BadInput(f"{folder}: no run logs (*.txt) in it")
    logs, errors = [], []
    for path in paths:
        try:
            logs.append(parse_log(path))
        except BadInput as e:
            errors.append(str(e))
    if errors:
        raise BadInput("\n".join(errors))
    if len({log.kind for log in logs}) > 1:
        raise BadInput(f"{folder}: mixes GPT and CIFAR logs: one record folder holds one track")
    return logs


MIN_RUNS = 3  # fewer leave a t-test with one degree of freedom at most: p < 0.01 then says little about the next run


def std(values):
    return statistics.stdev(values) if len(values) > 1 else math.nan


def shown(number, spec):  # one run has no std and no t-test: 'n/a', not 'nan'
    return "n/a" if math.isnan(number) else format(number, spec)


def quiet(test, *args, **kwargs):  # scipy warns (and gives nan) on fewer than 2 samples or zero variance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(test(*args, **kwargs).pvalue)


@dataclass
class Record:
    folder: str
    logs: list
    track: str
    target: float

    def __post_init__(self):
        from scipy import stats
        self.metric, _, self.side, _ = TRACKS[self.track]
        self.samples = [s for log in self.logs for s in log.samples]
        self.values, self.times = [s[1] for s in self.samples], [s[2] for s in self.samples]
        self.p = (quiet(stats.ttest_1samp, self.values, self.target, alternative=self.side) if len(self.values) > 1
                  else math.nan)
        majority = Counter(log.code for log in self.logs).most_common(1)[0][0]
        self.other_code = [log.name for log in self.logs if log.code != majority]
        self.code_hash = hashlib.sha256(majority.encode()).hexdigest()[:12]
        names = sorted({k for log in self.logs for k in log.config
                        if k not in FREE and not k.endswith(("_files", "_dir"))})
        self.config_diff = {k: {log.name: log.config.get(k, "(missing)") for log in self.logs} for k in names
                            if len({log.config.get(k) for log in self.logs}) > 1}
        seen, self.copies = {}, []
        for log in self.logs:
            if log.body in seen:
                self.copies.append(f"{log.name} = {seen[log.body]}")
            seen.setdefault(log.body, log.name)
        self.hardware = sorted({log.hardware for log in self.logs})
        self.degenerate = None  # why the t-test says nothing, if it does not
        if len(self.values) < MIN_RUNS:
            runs = f"{len(self.values)} run{'s' * (len(self.values) != 1)}"
            self.degenerate = f"{runs}: a record needs {MIN_RUNS} or more"
        elif std(self.values) == 0:
            self.degenerate = (f"every run has {self.metric} {self.values[0]:.4f}: a zero spread makes the t-test "
                               "meaningless (p is 0 or nan); runs that agree to the last digit logged are copies or "
                               "the same seed: rerun with other seeds")

    @property
    def same_code(self):
        return not self.other_code

    @property
    def ok(self):
        return self.same_code and not self.config_diff and not self.copies and not self.degenerate and self.p < 0.01


def load(folder, track=None, target=None):
    logs = read_folder(folder)
    found = {log.track for log in logs}
    if track is None:
        if None in found or len(found) > 1:
            raise BadInput(f"{folder}: cannot tell the track from the logs ({', '.join(sorted(map(str, found)))}): "
                           "pass --track gpt|cifar94|cifar96")
        track = found.pop()
    elif (track == "gpt") != (logs[0].kind == "gpt") or found - {None, track}:
        raise BadInput(f"{folder}: holds {', '.join(sorted(map(str, found - {None}))) or 'CIFAR'} logs, not {track}")
    target = TRACKS[track][1] if target is None else target
    if TRACKS[track][0] == "acc" and not 0 < target < 1:
        raise BadInput(f"--target={target}: accuracy is a fraction, e.g. --target=0.94")
    return Record(folder, logs, track, target)


def compare(new, old):
    """Time difference against the previous record and Welch's one-sided t-test (new faster)."""
    from scipy import stats
    diff = statistics.mean(new.times) - statistics.mean(old.times)
    p = quiet(stats.ttest_ind, new.times, old.times, equal_var=False, alternative="less") \
        if min(len(new.times), len(old.times)) > 1 else math.nan
    return diff, p


def markdown(r, prev=None):
    lines = [f"| run | {r.metric} | time (s) |", "|---|---|---|"]
    lines += [f"| `{label}` | {value:.4f} | {seconds:.3f} |" for label, value, seconds in r.samples]
    side = "below" if r.side == "less" else "above"
    lines += ["",
              f"- **{r.metric}**: mean {statistics.mean(r.values):.4f}, std {shown(std(r.values), '.4f')} over "
              f"{len(r.values)} runs; one-sided one-sample t-test that the mean is {side} {r.target:g}: "
              f"p = {shown(r.p, '.4g')} ("
              + (f"NOT a record: {r.degenerate}" if r.degenerate else
                 f"{'meets' if r.p < 0.01 else 'does NOT meet'} p < 0.01") + ")",
              f"- **time**: mean {statistics.mean(r.times):.3f} s, std {shown(std(r.times), '.3f')} s",
              "- **code**: " + (f"identical in the {len(r.logs)} log{'s' * (len(r.logs) > 1)} (sha256 {r.code_hash})"
                                 if r.same_code else f"DIFFERS: {', '.join(r.other_code)} against the other logs"),
              f"- **hardware**: {'; '.join(r.hardware)}"]
    for k, values in r.config_diff.items():
        lines.append(f"- **hyperparameter `{k}` differs**: " + ", ".join(f"{n}: {v}" for n, v in values.items()))
    if r.copies:
        lines.append(f"- **duplicate logs**: {', '.join(r.copies)}")
    if prev:
        old, (diff, p) = prev
        lines.append(f"- **vs previous record** `{old.folder}` ({len(old.times)} runs, {r.metric} "
                     f"{statistics.mean(old.values):.4f}): time {statistics.mean(old.times):.3f} s -> "
                     f"{statistics.mean(r.times):.3f} s, difference {diff:+.3f} s "
                     f"({100 * diff / statistics.mean(old.times):+.2f}%); Welch's t-test, one-sided (new faster): "
                     f"p = {shown(p, '.4g')}")
        if old.hardware != r.hardware:
            lines.append(f"- **warning**: the previous record's logs come from other hardware "
                         f"({'; '.join(old.hardware)}): time both on the same machine")
    summary = (f"summary runs:{len(r.values)} metric:{r.metric} mean:{statistics.mean(r.values):.4f} "
               f"std:{shown(std(r.values), '.4f')} p:{shown(r.p, '.4g')} time_mean:{statistics.mean(r.times):.3f}s "
               f"time_std:{shown(std(r.times), '.3f')}{'s' * (len(r.times) > 1)} "
               f"same_code:{'yes' if r.same_code else 'no'}")
    if prev:
        summary += f" time_diff:{prev[1][0]:+.3f}s time_p:{shown(prev[1][1], '.4g')}"
    return "\n".join(lines + ["", summary])


def table(records_dir):
    """The markdown between the table markers of README.md: one table per track, from the record folders."""
    out = [TABLE_BEGIN, "<!-- generated by `python records/verify.py --table` from the record folders; do not edit -->"]
    for track, (metric, target, side, hardware) in TRACKS.items():
        rows = []
        for folder in sorted(glob.glob(os.path.join(records_dir, track, "*", ""))):
            folder = folder.rstrip(os.sep)
            m = re.fullmatch(r"(\d{4}-\d{2}-\d{2})_(.+)", os.path.basename(folder))
            if not m:
                raise BadInput(f"{folder}: a record folder is named YYYY-MM-DD_Name")
            r = load(folder, track)
            if not r.same_code or r.config_diff or r.copies:
                raise BadInput(f"{folder}: fails verification: run python records/verify.py {folder}")
            rows.append(f"| {len(rows) + 1} | {m[1]} | [{m[2]}]({track}/{m[0]}/) | {statistics.mean(r.times):.3f} ± "
                        f"{shown(std(r.times), '.3f')} s | {statistics.mean(r.values):.4f} (p={shown(r.p, '.2g')}) | "
                        f"{len(r.values)} | {'; '.join(r.hardware)} |")
        out += ["", f"**{track}** ({metric} {'<=' if side == 'less' else '>='} {target:g}, {hardware})", ""]
        out += ([f"| # | date | record | time (mean ± std) | {metric} (mean, p) | runs | hardware |",
                 "|---|---|---|---|---|---|---|"] + rows) if rows else ["No records yet."]
    return "\n".join(out + ["", TABLE_END])


def write_table(records_dir, check):
    readme = os.path.join(records_dir, "README.md")
    try:
        with open(readme) as f:
            text = f.read()
    except OSError:
        raise BadInput(f"{readme}: not found: --records_dir must hold the records README.md")
    if text.count(TABLE_BEGIN) != 1 or text.count(TABLE_END) != 1:
        raise BadInput(f"{readme}: needs one '{TABLE_BEGIN}' and one '{TABLE_END}' line around the table")
    head, rest = text.split(TABLE_BEGIN)
    new = head + table(records_dir) + rest.split(TABLE_END, 1)[1]
    if check:
        if new != text:
            print(f"verify.py: {readme}: the records table is out of date: run python records/verify.py --table",
                  file=sys.stderr)
        return new == text
    with open(readme, "w") as f:
        f.write(new)
    print(f"wrote the records table of {readme}")
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(prog="verify.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", nargs="?", help="record folder holding the run logs (*.txt)")
    ap.add_argument("--target", type=float, help="target of the t-test (default: the track's, 3.28 / 0.94 / 0.96)")
    ap.add_argument("--track", choices=TRACKS, help="track, when the logs do not tell it")
    ap.add_argument("--compare", metavar="OTHER_FOLDER", help="previous record: time difference and Welch's t-test")
    ap.add_argument("--table", action="store_true",
                    help="rewrite the records table in README.md from all record folders")
    ap.add_argument("--check", action="store_true", help="with --table: only check that the table is up to date")
    ap.add_argument("--records_dir", default=os.path.dirname(os.path.abspath(__file__)),
                    help="where the track folders and README.md are (default: this script's folder)")
    args = ap.parse_args(argv)
    if bool(args.folder) == args.table or (args.check and not args.table):
        ap.error("give either a record FOLDER or --table [--check]")
    try:
        if args.table:
            return 0 if write_table(args.records_dir, args.check) else 1
        r = load(args.folder, args.track, args.target)
        prev = None
        if args.compare:
            old = load(args.compare, r.track)
            prev = old, compare(r, old)
        print(markdown(r, prev))
        return 0 if r.ok else 1
    except BadInput as e:
        for line in str(e).split("\n"):
            print(f"verify.py: error: {line}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"verify.py: error: {e.name} is needed for the statistics: pip install {e.name}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
