"""The README's CPU smoke commands, verbatim, in a copy of the scripts, at a smaller size (flags appended win); the
GPT run's log is read as a racer reads it (the end-to-end log checks of the GPT trainer live here)."""
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import HANG_S
from tests.test_gpt import parse_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALLER = {"data/synthetic.py gpt": ["--train_tokens=100000", "--val_tokens=16384"],
           "data/synthetic.py cifar": ["--train_images=2000", "--test_images=200"],
           "train_gpt.py": ["--num_iterations=10", "--val_loss_every=5"], "train_cifar.py": ["--runs=1", "--epochs=3"]}


def readme_commands():
    block = re.search(r"A first run on a CPU.*?```bash\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), re.S)
    lines = block[1].replace("\\\n", " ").splitlines()
    return [command.split("#")[0].split() for line in lines for command in line.split("&&")]


def test_readme_smoke_commands_run_offline_and_learn(tmp_path):
    for name in ("train_gpt.py", "train_cifar.py", "data/synthetic.py"):
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["python", "data/synthetic.py"], ["python", "train_gpt.py"],
                                         ["python", "data/synthetic.py"], ["python", "train_cifar.py"]]
    outputs = []
    for command in commands:
        key = " ".join(command[1:3]) if "synthetic" in command[1] else command[1]
        result = subprocess.run([sys.executable, *command[1:], *SMALLER[key]], cwd=tmp_path, capture_output=True,
                                text=True, timeout=HANG_S, env={**os.environ, "OMP_NUM_THREADS": "2"})
        assert result.returncode == 0, result.stderr[-3000:]
        outputs.append(result.stdout)
    gpt, cifar = outputs[1], outputs[3]
    assert gpt.startswith("log: logs/") and cifar.startswith("log: logs/")
    code, env, vals, steps, summary = parse_log(tmp_path / gpt.split("\n")[0].removeprefix("log: "))
    assert code == open(tmp_path / "train_gpt.py").read() + "\n"  # the log opens with the script that ran
    assert "Running PyTorch" in env and "  --num_iterations=10" in env and "world_size=1" in env
    assert [s for s, _ in vals] == [0, 5, 10] and [int(s) for s, _ in steps] == list(range(1, 11))
    assert vals[0][1] == pytest.approx(math.log(50304), abs=1e-3)  # head N(0, 0.005): near uniform prediction
    assert vals[-1][1] < vals[0][1] - 1, vals  # the toy language is learnable
    assert summary and float(summary[1]) == vals[-1][1]
    assert float(re.search(r"^run:1 acc:(\S+)", cifar, re.M)[1]) > 0.3  # 10 classes: chance is 0.1
