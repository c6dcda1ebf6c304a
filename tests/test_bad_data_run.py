"""A run on a data set with a broken file: stop before training, or skip it when told to."""

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_RUN, sample_rows


@pytest.fixture
def folder_with_a_truncated_image(isolated_store, siim_sample):
    """Eight real SIIM cases (6 positive, 2 negative) in the folder layout, one PNG cut short."""
    root = isolated_store / "data"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    rows = sample_rows(siim_sample)
    positives = sorted(row["file"] for row in rows if row["has_pneumo"] == "1")[:6]
    negatives = sorted(row["file"] for row in rows if row["has_pneumo"] == "0")[:2]
    for name in positives + negatives:
        for sub in ("images", "masks"):
            (root / sub / name).symlink_to(siim_sample / sub / name)
    broken = root / "images" / positives[0]
    data = broken.read_bytes()
    broken.unlink()
    broken.write_bytes(data[: len(data) // 3])
    return root, broken


def _run(root, *extra):
    args = [arg for o in TINY_RUN + [f"data.source={root}", "data.layout=folder",
                                     "train.epochs=1", *extra] for arg in ("--set", o)]
    return subprocess.run([sys.executable, "-m", "ptxlab", "run", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_a_broken_file_stops_the_run_before_training(folder_with_a_truncated_image):
    root, broken = folder_with_a_truncated_image
    result = _run(root)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()[-1:]
    assert str(broken) in line and "error:" in line
    client = MlflowClient()
    experiment = client.get_experiment_by_name("ptxlab")
    assert experiment is None or not client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_skip_bad_skips_image_and_mask_problems_and_says_so_once(folder_with_a_truncated_image):
    root, broken = folder_with_a_truncated_image
    images = sorted((root / "images").iterdir())
    no_mask = images[-1]
    (root / "masks" / no_mask.name).unlink()  # an image without its mask
    orphan = root / "masks" / "orphan.png"  # a mask without its image
    orphan.symlink_to((root / "masks" / images[1].name).resolve())
    result = _run(root, "data.skip_bad=true")
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.split("run id: ")[1].split()[0]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.metrics["data_skipped"] == 3
    [warning] = [line for line in result.stderr.splitlines() if "skip_bad" in line]
    assert warning.startswith("data.skip_bad left out 3 files: ")
    assert f"artifact data/skipped.txt of run {run_id}" in warning
    skipped = client.download_artifacts(run_id, "data/skipped.txt", str(root.parent))
    lines = open(skipped).read().splitlines()
    assert len(lines) == 3
    for path in (broken, root / "masks" / no_mask.name, orphan):
        [line] = [line for line in lines if str(path) in line]
        assert line.startswith(f"{path}: ") and line.count(str(path)) == 1
