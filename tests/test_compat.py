"""The start-up check of the torch/torchvision pair, and `ptxlab ui` without the MLflow server."""

import importlib.metadata

import pytest
from typer.testing import CliRunner

from ptxlab import compat
from ptxlab.cli import app


@pytest.mark.parametrize("torch, torchvision", [
    ("2.14.1+cu130", "0.29.1+cu130"), ("2.11.0", "0.26.0"), ("2.4.1", "0.19.1"),
    ("2.15.0.dev20270101", "0.30.0.dev20270101"),
])
def test_released_pairs_pass(torch, torchvision):
    assert compat.torch_pair_problem(torch, torchvision) is None


def test_a_mismatched_pair_names_both_versions_and_the_match():
    problem = compat.torch_pair_problem("2.14.1+cu130", "0.28.0")
    assert problem.startswith("torch 2.14.1+cu130 and torchvision 0.28.0 are not a matching pair")
    assert "torch 2.14 goes with torchvision 0.29" in problem


def test_missing_packages_are_named():
    assert "torch is not installed" in compat.torch_pair_problem(None, "0.29.0")
    assert "install torchvision 0.26.x" in compat.torch_pair_problem("2.11.0", None)


def _installed_as(monkeypatch, versions: dict[str, str | None]) -> None:
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name not in versions:
            return real(name)
        if versions[name] is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(compat, "version", version)


def test_every_command_stops_on_a_mismatched_pair(monkeypatch):
    _installed_as(monkeypatch, {"torch": "2.14.1", "torchvision": "0.27.0"})
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: torch 2.14.1 and torchvision 0.27.0 are not a matching pair")


def test_ui_without_the_mlflow_server_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _installed_as(monkeypatch, {"mlflow": None})
    result = CliRunner().invoke(app, ["ui"])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert "ptxlab ui needs the MLflow server" in line and "pip install 'ptxlab[ui]'" in line
    assert not (tmp_path / "mlruns").exists()  # nothing started or created
