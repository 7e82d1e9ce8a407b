"""CPU test of the GPU check (tests/gpu_check.sh): its --dry-run runs every part at tiny sizes and reports each with
status ok and the figures that part must report, as numbers; a part that fails or runs out of time is reported so and
makes the exit code non-zero.

    python3 -m pytest -q tests/test_gpu_check.py      # about a minute on 2 cores
"""
import math
import os
import re
import subprocess

import pytest
from conftest import HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "gpu_check.sh")
PARTS = ["train_gpt", "micro", "test_gpu", "cifar_eager", "cifar_compiled", "cifar_airbench94"]

# the figures each part must report in a dry run, by what they must parse as
NUMBERS = {
    "train_gpt": ["stage1_ms_per_step", "stage2_ms_per_step", "train_time_ms", "val_loss", "tokens_per_s",
                  "peak_alloc_mib", "peak_reserved_mib", "prefix_roundtrip_docs"],
    "micro": ["gemm_fp8_ms", "gemm_bf16_ms", "gemm_fp8_tflops", "gemm_bf16_tflops", "gemm_fp8_rel_err", "head_fp8_ms",
              "head_bf16_ms", "head_fp8_vs_bf16_loss_rel", "head_fp8_vs_bf16_grad_x_rel", "dc_ms", "dc_eager_ms",
              "dc_compiled_vs_eager_err", "polar_qk_ms", "polar_vo_ms", "polar_mlp_ms"]
             + [f"{kind}_{what}" for kind in ("short", "long", "paired")
                for what in ("mask_ms", "flex_ms", "flash_ms", "out_err", "dq_err", "dk_err", "dv_err")],
    "test_gpu": [],
    "cifar_eager": ["run_1_s", "run_2_s", "time_mean_s", "time_std_s"],
    "cifar_compiled": ["run_1_s", "run_2_s", "time_mean_s", "warmup_s", "compile_overhead_s"],
    "cifar_airbench94": ["run_1_s", "run_2_s", "time_mean_s", "warmup_s", "compile_overhead_s"]}
INTEGERS = {"train_gpt": ["steps", "stage1_batch_tokens", "stage2_batch_tokens", "graphs_total", "graphs_warmup",
                          "graphs_timed", "graphs_validation", "recompiles", "prefix_table_rows"],
            "micro": [], "test_gpu": ["passed", "failed", "skipped", "errors"], "cifar_eager": ["runs"],
            "cifar_compiled": ["runs"], "cifar_airbench94": ["runs"]}


def parse_report(text):
    """{part: (status, wall seconds, {key: value})} from the report's blocks."""
    parts, current = {}, None
    for line in text.splitlines():
        head = re.fullmatch(r"== (\S+): (ok|FAILED|TIMEOUT) \(([\d.]+) s, limit (\d+) s\)", line)
        if head:
            current = parts[head[1]] = (head[2], float(head[3]), {})
        elif current and (figure := re.fullmatch(r"   (\w+): (.*)", line)):
            current[2].setdefault(figure[1], figure[2])
        elif not line.strip():
            current = None
    return parts


def first_number(value):
    return float(value.split()[0])


def run_check(tmp_path, *args):
    report = tmp_path / "report.txt"
    result = subprocess.run(["bash", SCRIPT, *args, f"--out={report}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=HANG_S)
    return result, report.read_text()


def test_dry_run_reports_every_part_ok_with_its_figures(tmp_path):
    result, text = run_check(tmp_path, "--dry-run")
    assert result.returncode == 0, text + result.stderr[-3000:]
    assert result.stdout.endswith(text)  # the whole report printed at the end
    parts = parse_report(text)
    assert list(parts) == PARTS, text
    for name, (status, wall, figures) in parts.items():
        assert status == "ok" and wall > 0, (name, text)
        for key in NUMBERS[name]:
            assert key in figures and math.isfinite(first_number(figures[key])), (name, key, figures.get(key))
        for key in INTEGERS[name]:
            assert key in figures and re.fullmatch(r"\d+", figures[key].split()[0]), (name, key, figures.get(key))
    gpt, micro = parts["train_gpt"][2], parts["micro"][2]
    assert int(gpt["steps"]) == 6 and gpt["stage1_batch_tokens"] == "1024" and gpt["stage2_batch_tokens"] == "2048"
    assert 0 < float(gpt["val_loss"]) < math.log(50304) + 1
    assert gpt["prefix_roundtrip_docs"].startswith("1.000") and int(gpt["prefix_table_rows"].split()[0]) > 0
    assert gpt["prefix_loss"].startswith("on") and gpt["graphs_timed"] == "0"
    # eager flex in fp32 against the fp32 twin: only summation order differs
    assert all(float(micro[f"{kind}_{what}"]) < 1e-4 for kind in ("short", "long", "paired")
               for what in ("out_err", "dq_err", "dk_err", "dv_err"))
    assert float(micro["gemm_fp8_rel_err"]) < 0.15 and float(micro["head_fp8_vs_bf16_loss_rel"]) < 1e-2
    assert parts["test_gpu"][2]["skipped"] != "0" and parts["test_gpu"][2]["failed"] == "0"  # no CUDA: skipped
    assert re.search(rf"^summary: {len(PARTS)} ok, 0 not ok", text, re.M)


@pytest.mark.parametrize("args, status, words", [
    (["--parts=cifar_eager", "--budget=1"], "TIMEOUT", "ran past its limit of 1 s"),
    (["--parts=train_gpt,cifar_eager", "--data=EMPTY", "--budget=1"], "FAILED", "no train shards")])
def test_a_part_that_fails_or_times_out_is_reported_and_the_exit_code_says_so(tmp_path, args, status, words):
    (tmp_path / "EMPTY").mkdir()
    result, text = run_check(tmp_path, "--dry-run", *[a.replace("EMPTY", str(tmp_path / "EMPTY")) for a in args])
    parts = parse_report(text)
    first = args[0].split("=")[1].split(",")[0]
    assert result.returncode == 1 and parts[first][0] == status, text
    assert words in text and "--- last lines of its output ---" in text
    assert re.search(r"^summary: \d+ ok, \d+ not ok: ", text, re.M)
