"""Offline GPU hosts: the wheelhouse (scripts/wheelhouse.sh) and the one-call GPU check
(benchmarks/gpu_check.sh), the latter in its CPU smoke form."""

import importlib.util
import json
import os
import subprocess
import sys
import urllib.request
import venv
from importlib.metadata import distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import service_unavailable

REPO = Path(__file__).parents[1]
# What the wheelhouse leaves out by default: the GPU host's system-wide stack.
HOST_STACK = ["torch", "torchvision", "timm", "opencv-python-headless", "numpy", "pandas",
              "typer"]


def _select_wheels():
    spec = importlib.util.spec_from_file_location("select_wheels",
                                                  REPO / "scripts/select_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package(name: str, version: str, *requires: str) -> dict:
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


def test_wheel_selection_leaves_out_the_host_stack_and_what_only_it_needs():
    report = {"install": [
        _package("ptxlab", "0.1.0", "torch>=2.4", "Pillow>=10", "albumentations",
                 "pytest; extra == 'dev'", "tomli; python_version < '3.11'"),
        _package("torch", "2.14.1", "sympy", "nvidia-cublas; platform_machine == 'x86_64'"),
        _package("torchvision", "0.29.1", "torch", "pillow"),
        _package("albumentations", "2.0.8", "scipy", "pydantic[email]"),
        _package("pydantic", "2.0", "typing-extensions", "email-validator; extra == 'email'"),
        *(_package(name, "1.0") for name in ("sympy", "nvidia-cublas", "pillow", "scipy",
                                              "typing_extensions", "email-validator", "tomli",
                                              "pytest")),
    ]}
    pins, needed = _select_wheels().select(report, "3.12", {"torch", "torchvision"})
    # torch's own needs stay out; Pillow, which torchvision needs too, is carried for ptxlab;
    # pydantic's extra is followed; dev and <3.11 requirements are not.
    assert pins == ["albumentations==2.0.8", "email-validator==1.0", "pillow==1.0",
                    "pydantic==2.0", "scipy==1.0", "typing_extensions==1.0"]
    assert needed == {"torch": {"torch>=2.4 (for ptxlab)"}}


def _run(command: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{command[:3]}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_gpu_check_cpu_smoke_passes_every_step_and_writes_the_report(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    result = _run(["bash", str(REPO / "benchmarks/gpu_check.sh"), "--cpu-smoke"], 1000,
                  env=env, cwd=tmp_path)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert json.loads(result.stdout) == report  # printed last, and nothing else on stdout
    assert report["passed"] and report["mode"] == "cpu-smoke"
    steps = {step["name"]: step for step in report["steps"]}
    assert [name for name, step in steps.items() if step["status"] == "pass"] == [
        "environment", "gpu_step", "run_killed", "resume", "nproc_1", "evaluate", "predict"]
    assert steps["gpu_step_compile"]["status"] == "skipped" and steps["gpu_step_compile"]["reason"]
    assert steps["resume"]["run_id"] == steps["run_killed"]["run_id"]
    assert steps["resume"]["start_epoch"] == "1"  # it went on from epoch 2, not from scratch
    assert steps["nproc_1"]["processes"] == "1" and steps["nproc_1"]["device"] == "cpu"
    assert 0 <= steps["evaluate"]["metrics"]["pooled_iou"] <= 1
    for name in ("eager", "channels_last"):
        assert report["gpu_step"]["variants"][name]["ms_per_step"] > 0
    assert report["host"]["torch"].startswith("2.") and report["host"]["ptxlab"]


def _installed(requirement: Requirement):
    """The newest installed copy of `requirement`'s package (a venv may hold an older copy
    than the system's, e.g. ensurepip's setuptools), checked against `requirement`."""
    dist = max(distributions(name=requirement.name), key=lambda d: Version(d.version))
    assert requirement.specifier.contains(dist.version, prereleases=True), requirement
    return dist


def _host_site(folder: Path) -> None:
    """Fill a site folder with links to the host stack, pip and everything they need, as
    installed here: what an offline GPU server has system-wide."""
    pending, seen = [Requirement(name) for name in [*HOST_STACK, "pip"]], set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        extras = {"", *requirement.extras} - {e for n, e in seen if n == name}
        if not extras:
            continue
        seen |= {(name, extra) for extra in extras}
        dist = _installed(requirement)
        for needed in map(Requirement, dist.requires or []):
            if any(not needed.marker or needed.marker.evaluate({"extra": e}) for e in extras):
                pending.append(needed)
        tops = {Path(file).parts[0] for file in dist.files or []} - {"..", "__pycache__"}
        for top in tops:
            source = dist.locate_file(top)
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)


@pytest.mark.slow
def test_wheelhouse_installs_offline_next_to_a_system_pytorch(tmp_path, isolated_store):
    try:
        urllib.request.urlopen("https://pypi.org/simple/ptxlab-probe/", timeout=10)
    except urllib.error.HTTPError:
        pass  # PyPI answered
    except OSError as error:
        service_unavailable(f"PyPI unreachable ({error}): cannot build a wheelhouse")
    wheels = tmp_path / "wheels"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    built = _run(["bash", str(REPO / "scripts/wheelhouse.sh"), str(wheels), "--python", python],
                 900)
    assert "MiB" in built.stdout.splitlines()[-1]
    names = {path.name.split("-")[0].lower() for path in wheels.glob("*.whl")}
    assert "ptxlab" in names and "mlflow_skinny" in names and "scipy" in names
    assert not names & {"torch", "torchvision", "timm", "mlflow", "pyarrow", "nvidia_cublas"}

    # The host: a virtual environment (as on GPU images) that holds only the host stack and
    # pip; ptxlab goes into a new venv beside it, with no index.
    host = tmp_path / "host"
    venv.create(host, with_pip=False)
    _host_site(next(host.glob("lib/python*/site-packages")))
    target = tmp_path / "venv"
    no_pip_settings = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    _run(["bash", REPO / "scripts/offline_install.sh", wheels, target], 600,
         env={**no_pip_settings, "PIP_CONFIG_FILE": os.devnull, "PYTHON": host / "bin/python"})
    assert "Usage: ptxlab" in _run([target / "bin/ptxlab", "--help"], 120).stdout
    _run([target / "bin/python", "-c", "import importlib.metadata as m, sys; "
          "sys.exit(any(d.metadata['Name'] == 'mlflow' for d in m.distributions()))"], 60)
    overrides = ["data.synthetic.n_images=16", "data.synthetic.size=64", "data.image_size=64",
                 "model.encoder_weights=null", "model.decoder_channels=[16,16,16,16,16]",
                 "train.epochs=1", "train.batch_size=4", "tracking.system_metrics=false",
                 "tracking.overlays=0"]
    run = _run([target / "bin/ptxlab", "run", *[a for o in overrides for a in ("--set", o)]],
               600, cwd=isolated_store)
    assert "run id: " in run.stdout and "best validation Dice" in run.stdout
