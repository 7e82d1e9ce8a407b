"""records/verify.py and records/plot.py on the logs of tiny real CPU runs of train_gpt.py and train_cifar.py made here.
Every expected number is computed here (scipy, numpy) from values this file reads out of the logs itself."""
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy import stats
from conftest import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = os.path.join(ROOT, "records")
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), RECORDS]
import gptdata  # noqa: E402
import plot  # noqa: E402
import verify  # noqa: E402

STEPS = 4  # validation at steps 0, 2 and 4
GPT_TINY = gptdata.SMALL_VOCAB + [
    "--train_files=fineweb_train_*.bin", "--val_files=fineweb_val_000000.bin", "--prefix_weight=0",
    "--bigram_vocab_size=1024", "--num_layers=2", "--model_dim=64", "--num_heads=2", "--train_batch_size=1024",
    "--train_max_seq_len=128", "--val_tokens=2048", f"--num_iterations={STEPS}", "--num_extension_iterations=1",
    "--compile=0", "--kernel_warmup_steps=0", "--val_loss_every=2"]
CIFAR_TINY = ["--data_dir=cifar", "--runs=3", "--compile=0", "--widths=8,16,16", "--batch_size=100", "--epochs=2"]


def write_cifar(folder, n=200, seed=0):
    """A learnable stand-in in the cifar-10-batches-py layout: the class sets the colour, plus noise."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, (10, 3))
    os.makedirs(folder)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        y = rng.integers(0, 10, n)
        x = np.clip(colours[y][:, :, None] + rng.normal(0, 40, (n, 3, 1024)), 0, 255).astype(np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": x.reshape(n, 3072), b"labels": y.tolist()}, f)


@pytest.fixture(scope="session")
def logs(tmp_path_factory):
    """Three GPT runs (seeds 1, 2, 3) and one CIFAR log of three runs, made side by side:
    {"gpt": [...], "cifar": path}."""
    d = tmp_path_factory.mktemp("runs")
    gptdata.write_corpus(d, bos=gptdata.SMALL_BOS)
    write_cifar(d / "cifar" / "cifar-10-batches-py")
    # 4 processes share 2 cores; glibc without mmap for big blocks reuses freed memory instead of faulting in new pages
    # for every big tensor
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**34))
    cmds = [[os.path.join(ROOT, "train_gpt.py"), *GPT_TINY, f"--seed={s}", f"--run_id=seed{s}"] for s in (1, 2, 3)]
    cmds.append([os.path.join(ROOT, "train_cifar.py"), *CIFAR_TINY])
    procs = [subprocess.Popen([sys.executable, *c], cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in cmds]
    outs = [p.communicate(timeout=HANG_S)[0] for p in procs]
    for cmd, p, out in zip(cmds, procs, outs):
        assert p.returncode == 0, f"{' '.join(cmd)}\n{out[-3000:]}"
    return {"gpt": [str(d / "logs" / f"seed{s}.txt") for s in (1, 2, 3)],
            "cifar": str(d / re.search(r"^log: (\S+)$", outs[-1], re.M)[1])}


def read(path):
    with open(path) as f:
        return f.read()


def gpt_final(path):  # (val loss, seconds) from the log's summary line
    m = re.search(r"^summary val_loss:(\S+) train_time:(\d+)ms", read(path), re.M)
    return float(m[1]), int(m[2]) / 1000


def cifar_runs(path):  # [(acc, seconds)] from the `run:` lines
    return [(float(a), float(t)) for a, t in re.findall(r"^run:\d+ acc:(\S+) time:(\S+)s$", read(path), re.M)]


def folder(tmp_path, name, paths, edit=None):
    """Copy the logs into tmp_path/name; edit(text) -> text changes each copy (a fresh tiny run cannot change them)."""
    out = tmp_path / name
    out.mkdir(parents=True)
    for p in paths:
        with open(out / os.path.basename(p), "w") as f:
            f.write(edit(read(p)) if edit else read(p))
    return str(out)


def run_verify(capsys, *args):
    code = verify.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def summary(out):
    last = out.strip().splitlines()[-1]
    assert last.startswith("summary ")
    return dict(token.split(":", 1) for token in last.split()[1:])


def test_done_when_three_runs_same_code_and_p_equal_to_scipy(logs, tmp_path):
    """The issue's check, through the command line: three tiny runs in one folder, then one log's code changed."""
    losses = [gpt_final(p)[0] for p in logs["gpt"]]
    assert np.std(losses) > 0, losses  # different seeds, different losses
    target = float(np.mean(losses) + 10 * np.std(losses, ddof=1))
    p = stats.ttest_1samp(losses, target, alternative="less").pvalue
    assert p < 0.01
    d = folder(tmp_path, "three", logs["gpt"])
    r = subprocess.run([sys.executable, os.path.join(RECORDS, "verify.py"), d, f"--target={target!r}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    s = summary(r.stdout)
    assert (s["runs"], s["metric"], s["same_code"], s["p"]) == ("3", "val_loss", "yes", f"{p:.4g}")

    changed = read(logs["gpt"][1]).replace("import ", "import  ", 1)  # one extra space in the code
    with open(os.path.join(d, os.path.basename(logs["gpt"][1])), "w") as f:
        f.write(changed)
    r = subprocess.run([sys.executable, os.path.join(RECORDS, "verify.py"), d, f"--target={target!r}"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and summary(r.stdout)["same_code"] == "no"
    assert os.path.basename(logs["gpt"][1]) in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("offset", [10, -10, None])  # target above the mean (passes), below it (fails), default 3.28
def test_gpt_statistics_equal_scipy(logs, tmp_path, capsys, offset):
    finals = [gpt_final(p) for p in logs["gpt"]]
    losses, times = [f[0] for f in finals], [f[1] for f in finals]
    target = 3.28 if offset is None else float(np.mean(losses) + offset * np.std(losses, ddof=1))
    p = stats.ttest_1samp(losses, target, alternative="less").pvalue
    code, out, err = run_verify(capsys, folder(tmp_path, "gpt", logs["gpt"]),
                                *([] if offset is None else [f"--target={target!r}"]))
    assert code == (0 if p < 0.01 else 1), out + err
    assert summary(out) == {"runs": "3", "metric": "val_loss", "mean": f"{np.mean(losses):.4f}",
                            "std": f"{np.std(losses, ddof=1):.4f}", "p": f"{p:.4g}",
                            "time_mean": f"{np.mean(times):.3f}s", "time_std": f"{np.std(times, ddof=1):.3f}s",
                            "same_code": "yes"}
    for path, (loss, _) in zip(logs["gpt"], finals):  # one table row per log
        assert re.search(rf"^\| `{os.path.basename(path)}` \| {loss:.4f} \|", out, re.M)


@pytest.mark.parametrize("offset", [-10, None])  # target below the mean accuracy (passes), the default 0.94 (fails)
def test_cifar_statistics_equal_scipy(logs, tmp_path, capsys, offset):
    runs = cifar_runs(logs["cifar"])
    accs, times = [r[0] for r in runs], [r[1] for r in runs]
    assert len(runs) == 3 and np.std(accs) > 0, runs
    # far below the mean, but still an accuracy (three tiny runs can spread by more than a tenth of their mean)
    target = 0.94 if offset is None else max(0.01, float(np.mean(accs) + offset * np.std(accs, ddof=1)))
    p = stats.ttest_1samp(accs, target, alternative="greater").pvalue
    code, out, err = run_verify(capsys, folder(tmp_path, "cifar", [logs["cifar"]]),
                                *([] if offset is None else [f"--target={target!r}"]))
    assert code == (0 if p < 0.01 else 1), out + err
    assert summary(out) == {"runs": "3", "metric": "acc", "mean": f"{np.mean(accs):.4f}",
                            "std": f"{np.std(accs, ddof=1):.4f}", "p": f"{p:.4g}",
                            "time_mean": f"{np.mean(times):.3f}s", "time_std": f"{np.std(times, ddof=1):.3f}s",
                            "same_code": "yes"}


def test_other_hyperparameters_or_a_copied_log_refused(logs, tmp_path, capsys):
    losses = [gpt_final(p)[0] for p in logs["gpt"]]
    passing = f"--target={float(np.mean(losses) + 10 * np.std(losses, ddof=1))!r}"
    d = folder(tmp_path, "hyper", logs["gpt"])
    with open(os.path.join(d, "seed2.txt"), "w") as f:
        f.write(re.sub(r"^  --model_dim=64$", "  --model_dim=128", read(logs["gpt"][1]), flags=re.M))
    code, out, _ = run_verify(capsys, d, passing)
    assert code == 1 and summary(out)["same_code"] == "yes" and re.search(r"model_dim.*seed2\.txt: 128", out)

    d = folder(tmp_path, "copy", logs["gpt"])
    shutil.copy(logs["gpt"][0], os.path.join(d, "seed1_again.txt"))
    code, out, _ = run_verify(capsys, d, passing)
    assert code == 1 and "seed1_again.txt" in out and summary(out)["runs"] == "4"


CUTS = {"no final validation": lambda t: t[:t.index(f"step:{STEPS}/{STEPS} val_loss")],
        "final validation line missing": lambda t: re.sub(rf"^step:{STEPS}/{STEPS} val_loss.*\n", "", t, flags=re.M),
        "cut inside the summary line": lambda t: t[:t.index("\nsummary ") + 20],
        "no summary line": lambda t: t[:t.index("\nsummary ") + 1],
        "only the source": lambda t: t[:t.index("=" * 100)]}


@pytest.mark.parametrize("cut", CUTS)
def test_cut_short_log_named(logs, tmp_path, capsys, cut):
    d = folder(tmp_path, "cut", logs["gpt"])
    with open(os.path.join(d, "seed3.txt"), "w") as f:
        f.write(CUTS[cut](read(logs["gpt"][2])))
    code, out, err = run_verify(capsys, d, "--target=11")
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "seed3.txt" in err, err


def test_cut_short_cifar_log_and_unreadable_file_named(logs, tmp_path, capsys):
    d = folder(tmp_path, "cifar", [logs["cifar"]], edit=lambda t: t[:t.index("\nrun:3 ") + 1])
    code, out, err = run_verify(capsys, d)
    assert code == 2 and os.path.basename(logs["cifar"]) in err and "cut short" in err, err
    d = folder(tmp_path, "binary", logs["gpt"])
    with open(os.path.join(d, "notes.txt"), "wb") as f:
        f.write(b"\xff\xfe\x00garbage")
    code, out, err = run_verify(capsys, d)
    assert code == 2 and len(err.splitlines()) == 1 and "notes.txt" in err, err
    # as a command: one line, no traceback
    r = subprocess.run([sys.executable, os.path.join(RECORDS, "verify.py"), d], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "notes.txt" in r.stderr, r.stderr


BROKEN = {  # what a diverged run (or an edited log) reads like -> (kind, a line pattern, what replaces its group 2)
    "gpt val_loss nan": ("gpt", r"^((?:step:\S+|summary) val_loss:)(\S+)", "nan"),
    "gpt summary val_loss inf": ("gpt", r"^(summary val_loss:)(\S+)", "inf"),
    "gpt train_time nan": ("gpt", r"^(step:2/\S+ .*train_time:)(\d+ms)", "nanms"),
    "cifar acc nan": ("cifar", r"^(run:2 acc:)(\S+)", "nan"),
    "cifar epoch train_loss nan": ("cifar", r"^(run:1 epoch:1/\S+ train_loss:)(\S+)", "nan")}


@pytest.mark.parametrize("broken", BROKEN)
def test_non_finite_metric_names_the_log_broken(logs, tmp_path, broken):
    kind, pattern, value = BROKEN[broken]
    paths = logs["gpt"] if kind == "gpt" else [logs["cifar"]]
    name = os.path.basename(paths[-1])
    d = folder(tmp_path, "diverged", paths)
    with open(os.path.join(d, name), "w") as f:
        f.write(re.sub(pattern, lambda m: m[1] + value, read(paths[-1]), flags=re.M))
    assert read(os.path.join(d, name)) != read(paths[-1])
    r = subprocess.run([sys.executable, os.path.join(RECORDS, "verify.py"), d], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "broken" in lines[0], r.stderr


def test_bad_arguments_named(logs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for args, name in [([tmp_path / "missing"], "missing"), ([tmp_path / "empty"], "empty"),
                       ([folder(tmp_path, "c", [logs["cifar"]]), "--target=94"], "--target"),
                       ([folder(tmp_path, "g", logs["gpt"]), "--compare", tmp_path / "c"], "c: holds")]:
        code, out, err = run_verify(capsys, *args)
        assert code == 2 and len(err.splitlines()) == 1 and name in err, (args, err)


def test_compare_with_previous_record_welch(logs, tmp_path, capsys):
    """The previous record: the same logs with every train_time doubled (an edit no real run can make on demand)."""
    times = np.array([gpt_final(p)[1] for p in logs["gpt"]])
    new = folder(tmp_path, "new", logs["gpt"])
    old = folder(tmp_path, "old", logs["gpt"], edit=lambda t: re.sub(r"train_time:(\d+)ms",
                                                                     lambda m: f"train_time:{2 * int(m[1])}ms", t))
    code, out, _ = run_verify(capsys, new, "--target=11", "--compare", old)
    p = stats.ttest_ind(times, 2 * times, equal_var=False, alternative="less").pvalue
    s = summary(out)
    assert (s["time_diff"], s["time_p"]) == (f"{np.mean(times) - np.mean(2 * times):+.3f}s", f"{p:.4g}")
    assert f"p = {p:.4g}" in out and "Welch" in out and code == 0
    code, out, _ = run_verify(capsys, old, "--target=11", "--compare", new)  # slower than the previous: p near 1
    slower_p = stats.ttest_ind(2 * times, times, equal_var=False, alternative="less").pvalue
    assert summary(out)["time_p"] == f"{slower_p:.4g}"


def test_table_regenerated(logs, tmp_path, capsys):
    readme = read(os.path.join(RECORDS, "README.md"))
    head, tail = readme.split(verify.TABLE_BEGIN)[0], readme.split(verify.TABLE_END)[1]
    assert run_verify(capsys, "--table", "--check")[0] == 0  # the repository's table is that of its record folders
    root = tmp_path / "records"
    root.mkdir()
    with open(root / "README.md", "w") as f:
        f.write(head + verify.TABLE_BEGIN + "\nstale\n" + verify.TABLE_END + tail)
    folder(root / "gpt", "2026-01-01_Tiny", logs["gpt"])
    folder(root / "gpt", "2025-12-01_Older", logs["gpt"][:2])
    folder(root / "cifar94", "2026-01-02_TinyCifar", [logs["cifar"]])
    code, _, err = run_verify(capsys, "--table", "--check", "--records_dir", root)
    assert code == 1 and "--table" in err
    assert run_verify(capsys, "--table", "--records_dir", root)[0] == 0
    text = read(root / "README.md")
    assert text.startswith(head) and text.endswith(tail) and "stale" not in text
    assert text.count("No records yet.") == 1  # cifar96
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    losses = [gpt_final(p)[0] for p in logs["gpt"]]
    accs = [a for a, _ in cifar_runs(logs["cifar"])]
    expect = [("2025-12-01", "[Older](gpt/2025-12-01_Older/)", losses[:2], 3.28, "less"),
              ("2026-01-01", "[Tiny](gpt/2026-01-01_Tiny/)", losses, 3.28, "less"),
              ("2026-01-02", "[TinyCifar](cifar94/2026-01-02_TinyCifar/)", accs, 0.94, "greater")]
    assert [r[1:3] for r in rows] == [list(e[:2]) for e in expect]
    for row, (_, _, values, target, side) in zip(rows, expect):
        p = stats.ttest_1samp(values, target, alternative=side).pvalue
        assert row[4] == f"{np.mean(values):.4f} (p={p:.2g})" and row[5] == str(len(values)), row
    assert run_verify(capsys, "--table", "--check", "--records_dir", root)[0] == 0
    (root / "gpt" / "no_date").mkdir()
    code, _, err = run_verify(capsys, "--table", "--records_dir", root)
    assert code == 2 and "no_date" in err and read(root / "README.md") == text


def test_plot_writes_png(logs, tmp_path):
    pytest.importorskip("matplotlib")
    plot = os.path.join(RECORDS, "plot.py")
    for args in [[folder(tmp_path, "new", logs["gpt"]), logs["gpt"][0]], [logs["cifar"]]]:
        out = tmp_path / "curves.png"
        r = subprocess.run([sys.executable, plot, *args, "--out", out], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with open(out, "rb") as f:
            data = f.read()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
        os.remove(out)
    r = subprocess.run([sys.executable, plot, logs["gpt"][0], logs["cifar"], "--out", tmp_path / "x.png"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "mix" in r.stderr and not os.path.exists(tmp_path / "x.png")


def test_plot_goes_beside_the_logs_by_default(logs, tmp_path):
    pytest.importorskip("matplotlib")
    record = folder(tmp_path, "record", [logs["cifar"]])
    single = folder(tmp_path, "single", logs["gpt"][:1])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args, beside in [([record], record), ([os.path.join(single, "seed1.txt"), logs["gpt"][1]], single)]:
        r = subprocess.run([sys.executable, os.path.join(RECORDS, "plot.py"), *args], cwd=elsewhere,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        with open(os.path.join(beside, "plot.png"), "rb") as f:
            assert f.read().startswith(b"\x89PNG\r\n\x1a\n")
        assert os.listdir(elsewhere) == []


def test_one_run_or_a_zero_spread_is_not_a_record(logs, tmp_path, capsys):
    """One run has no std and no t-test (n/a, not nan); runs with one accuracy have a zero spread, where scipy's p is 0
    whatever the mean: neither is a record, however far past the target."""
    code, out, _ = run_verify(capsys, folder(tmp_path, "one", logs["gpt"][:1]), "--target=100")
    s = summary(out)
    assert code == 1 and (s["runs"], s["std"], s["p"], s["time_std"]) == ("1", "n/a", "n/a", "n/a"), out
    assert "nan" not in out and "NOT a record: 1 run: a record needs 3 or more" in out
    code, out, _ = run_verify(capsys, folder(tmp_path, "two", logs["gpt"][:2]), "--target=100")
    assert code == 1 and "NOT a record: 2 runs" in out and summary(out)["time_std"] != "n/a"
    same = folder(tmp_path, "same", [logs["cifar"]], edit=lambda t: re.sub(r"^(run:\d+ acc:)\S+", r"\g<1>0.5000", t,
                                                                        flags=re.M))
    with warnings.catch_warnings():  # scipy warns of the zero spread, then answers p = 0
        warnings.simplefilter("ignore")
        assert stats.ttest_1samp([0.5] * 3, 0.1, alternative="greater").pvalue == 0  # what a bare t-test would say
    code, out, _ = run_verify(capsys, same, "--target=0.1")
    assert code == 1 and "zero spread" in out and summary(out)["std"] == "0.0000", out


def drawn_figure(monkeypatch, *args):
    """The figure plot.py would save, for a look at what is on it."""
    import matplotlib.figure
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    assert plot.main([str(a) for a in args]) == 0
    return figures[0]


def test_plot_starts_at_step_0_fits_the_data_and_labels_the_target(logs, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    losses = [float(v) for log in logs["gpt"] for v in re.findall(r"^step:\d+/\d+ val_loss:(\S+)", read(log), re.M)]
    assert min(losses) > 3.28 * 1.5  # a CPU curve far above the target
    steps_axis, time_axis = drawn_figure(monkeypatch, *logs["gpt"], "--out", tmp_path / "x.png").axes
    for line, log in zip(steps_axis.get_lines(), logs["gpt"]):  # every validation, step 0 first
        assert line.get_xdata()[0] == 0
        logged = re.findall(r"^step:\d+/\d+ val_loss:(\S+)", read(log), re.M)
        assert list(line.get_ydata()) == [float(v) for v in logged]
    low, high = steps_axis.get_ylim()
    assert min(losses) - 0.1 * (max(losses) - min(losses)) < low < min(losses) < max(losses) < high
    assert all(float(t).is_integer() for t in steps_axis.get_xticks())
    assert "outside" in steps_axis.get_title() and len(steps_axis.get_lines()) == 3  # no target line stretches it
    steps_axis, time_axis = drawn_figure(monkeypatch, *logs["gpt"], "--ylim", 2, 12, "--out", tmp_path / "x.png").axes
    assert steps_axis.get_ylim() == (2, 12) and steps_axis.get_title() == ""
    targets = [line for line in steps_axis.get_lines() if line.get_label() == "target 3.28"]
    assert len(targets) == 1 and list(targets[0].get_ydata()) == [3.28, 3.28]
    assert "target 3.28" in [t.get_text() for t in steps_axis.get_legend().get_texts()]
