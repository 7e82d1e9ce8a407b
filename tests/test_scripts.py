"""run.sh, the README's test command and .ci/run, with python3, python, pip and pip3 replaced by recorders on PATH.
The recorders note their arguments and succeed; `-c` code runs on the real interpreter, so torch counts the GPUs."""
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDER = """#!/bin/sh
echo "{prefix}$*" >> "$CALLS"
case "$1" in
    -c) case "$*" in *"import torch"*) [ "$TORCH" = missing ] && exit 1;; esac; exec "{python}" "$@";;
esac
case "$*" in "-m pytest"*) exit "$PYTEST_EXIT";; esac
exit 0
"""
TORCH_STUB = "class cuda:\n    @staticmethod\n    def device_count():\n        return {gpus}\n"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # where PyTorch publishes its CPU-only builds


def run(tmp_path, command, gpus=None, torch="installed", nvidia_smi=False, pytest_exit=0):
    """command in the repository root with only the recorders (and bash, dirname) on PATH; returns (result, calls).
    gpus: a torch stub that counts that many GPUs (None: the real torch, with no GPU visible)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir(parents=True)
    for name, prefix in [("python3", ""), ("python", ""), ("pip", "-m pip "), ("pip3", "-m pip ")]:
        (bin_dir / name).write_text(RECORDER.format(prefix=prefix, python=sys.executable))
        (bin_dir / name).chmod(0o755)
    for tool in ["bash", "dirname"]:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if nvidia_smi:  # present and succeeding, as on a GPU machine
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = dict(HOME=str(tmp_path), PATH=str(bin_dir), CALLS=str(calls), TORCH=torch, PYTEST_EXIT=str(pytest_exit),
               CI="true", CUDA_VISIBLE_DEVICES="")
    if gpus is not None:
        (tmp_path / "stub" / "torch").mkdir(parents=True)
        (tmp_path / "stub" / "torch" / "__init__.py").write_text(TORCH_STUB.format(gpus=gpus))
        env["PYTHONPATH"] = str(tmp_path / "stub")
    result = subprocess.run([shutil.which("bash"), "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=HANG_S)
    return result, calls.read_text().splitlines() if calls.exists() else []


def step(call):  # what a recorded call of run.sh does
    return ("install" if call.startswith("-m pip install") else "count GPUs" if call.startswith("-c ") else
            "download" if "data/cached_fineweb10B.py" in call else "hellaswag" if "data/hellaswag.py" in call else
            "train" if "torch.distributed.run" in call else call)


# ---------------------------------------------------------------------------------------------------------------------
# run.sh: install, count the GPUs, and only then download ~2 GB of shards

@pytest.mark.parametrize("gpus", [None, 3])  # the real torch seeing no GPU; a torch that counts 3
def test_run_sh_checks_the_gpus_before_downloading(tmp_path, gpus):
    result, calls = run(tmp_path, "bash run.sh", gpus=gpus)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and "GPU" in lines[0], result.stderr
    assert "3 GPUs" in lines[0] if gpus == 3 else "no CUDA GPU" in lines[0]
    assert [step(call) for call in calls] == ["install", "count GPUs"], calls


def test_run_sh_installs_counts_downloads_then_trains(tmp_path):
    result, calls = run(tmp_path, "bash run.sh --seed=1", gpus=2)
    assert result.returncode == 0, result.stderr
    assert [step(call) for call in calls] == ["install", "count GPUs", "download", "train"], calls
    assert "requirements.txt" in calls[0]
    assert re.fullmatch(r"-m torch\.distributed\.run --standalone --nproc_per_node=2 train_gpt\.py --seed=1", calls[3])


@pytest.mark.parametrize("args,fetched", [("--run_evals=1", True), ("--seed=2 --run_evals=True", True),
                                          ("--run_evals=0", False), ("--run_evals=1 --hellaswag_data=h.jsonl", False)])
def test_run_sh_fetches_hellaswag_before_a_run_that_scores_it(tmp_path, args, fetched):
    result, calls = run(tmp_path, f"bash run.sh {args}", gpus=1)
    assert result.returncode == 0, result.stderr
    want = ["install", "count GPUs", "download"] + (["install", "hellaswag"] if fetched else []) + ["train"]
    assert [step(call) for call in calls] == want, calls
    assert not fetched or calls[3] == "-m pip install -q pyarrow"
    assert calls[-1].endswith(f"train_gpt.py {args}")


# ---------------------------------------------------------------------------------------------------------------------
# The README's test command is what CI runs

def readme_test_command():
    """The command of the README's first bash block whose comment says it runs the tests."""
    with open(os.path.join(ROOT, "README.md")) as f:
        block = re.search(r"```bash\n(.*?)```", f.read(), re.S)[1]
    line, = [line for line in block.splitlines() if "# the tests" in line]
    return line.split("#")[0].strip()


@pytest.mark.parametrize("pytest_exit", [0, 1])
@pytest.mark.parametrize("machine", ["CPU, no torch", "GPU, no torch", "torch installed"])
def test_readme_test_command_is_what_ci_runs(tmp_path, machine, pytest_exit):
    torch = "installed" if machine == "torch installed" else "missing"
    readme, readme_calls = run(tmp_path / "readme", readme_test_command(), torch=torch,
                               nvidia_smi=machine.startswith("GPU"), pytest_exit=pytest_exit)
    ci, ci_calls = run(tmp_path / "ci", "bash .ci/run", torch=torch, nvidia_smi=machine.startswith("GPU"),
                       pytest_exit=pytest_exit)
    assert readme_calls == ci_calls, (readme_calls, ci_calls)
    assert readme.returncode == ci.returncode == pytest_exit, ci.stderr  # a failing test fails CI
    installs = [call for call in ci_calls if call.startswith("-m pip install")]
    assert re.fullmatch(r"-m pytest .*\btests\b.*", ci_calls[-1]) and "requirements.txt" in installs[-1]
    torch_installs = [call for call in installs if re.search(r"\btorch\b", call)]
    if machine == "CPU, no torch":  # the CPU build first, so that requirements.txt does not pull the CUDA one
        assert len(torch_installs) == 1 and installs[0] == torch_installs[0] and CPU_INDEX in installs[0], installs
    else:
        assert torch_installs == [] and not any(CPU_INDEX in call for call in ci_calls), installs
