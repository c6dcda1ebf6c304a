"""Smoke runs of the benchmark scripts at their smallest settings: they run and end in a number."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def run_benchmark(script: str, *args: str, timeout: int = 300) -> str:
    """Run benchmarks/`script` with `args`; fail with its output unless it exits 0."""
    finished = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=BENCHMARKS.parent,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished.stdout


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


@pytest.mark.slow
def test_gpu_step_cpu_smoke_reports_images_per_second():
    output = run_benchmark("gpu_step.py", "--cpu-smoke", "--steps", "2")
    assert "cpu smoke setting" in output
    assert re.fullmatch(r"images/s, fastest variant \(eager; [^)]*\): \d+\.\d", last_line(output))


@pytest.mark.slow
def test_loader_reports_rates_and_the_cache_ratio(siim_sample):
    output = run_benchmark(
        "loader.py", "--data", str(siim_sample), "--images", "8", "--epochs", "1",
        "--size", "128", "--batch", "4", "--cpu-steps", "1", "--cuda-steps", "0",
    )
    for label in ("raw PNGs + resize", "resized cache", "source-first", "model consumes"):
        assert re.search(rf"^{re.escape(label)} *: .*\d img/s", output, re.MULTILINE), label
    assert re.fullmatch(
        r"ratio \(cached / raw images/s, target >= 4\): \d+\.\d\d", last_line(output)
    )


@pytest.mark.slow
def test_study_cost_trains_once_per_configuration_and_repeat_for_the_same_metrics():
    output = run_benchmark("study_cost.py", "--epochs", "1", "--repeats", "1", timeout=900)
    assert re.search(r"scored on stored maps *: 8 trials, 2 trainings", output)
    assert re.search(r"every trial trains \(share_trainings: false\) *: 8 trials, 8 trainings",
                     output)
    assert "identical post-processing metrics" in output
    assert re.fullmatch(r"ratio \(training time, shared / every trial trains; expected about "
                        r"1/4\): \d\.\d{3}", last_line(output))
