"""Shared pytest fixtures."""

import csv
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest

SIIM_SAMPLE = Path(__file__).parents[1].parent / "shared/data/siim-sample"


def sample_rows(sample: Path = SIIM_SAMPLE) -> list[dict[str, str]]:
    """The sample's labels.csv, one dict per image."""
    with (sample / "labels.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def build_siim_png(sample: Path, parent: Path) -> Path:
    """The sample as the Kaggle vbookshelf copy (symlinks):
    siim-acr-pneumothorax/{png_images,png_masks,stage_1_*.csv}; returns that folder."""
    base = parent / "siim-acr-pneumothorax"
    (base / "png_images").mkdir(parents=True)
    (base / "png_masks").mkdir()
    by_split = {"train": [], "test": []}
    for row in sample_rows(sample):
        name = row["vbookshelf_name"]
        (base / "png_images" / name).symlink_to(sample / "images" / row["file"])
        (base / "png_masks" / name).symlink_to(sample / "masks" / row["file"])
        by_split[row["siim_split"].removeprefix("stage1_")].append(
            f"{name},{row['image_id']},{row['has_pneumo']}"
        )
    for split, lines in by_split.items():
        text = "\n".join(["new_filename,ImageId,has_pneumo", *lines]) + "\n"
        (base / f"stage_1_{split}_images.csv").write_text(text)
    return base


@pytest.fixture(scope="session")
def siim_sample() -> Path:
    """The real 72-image SIIM-ACR sample (read-only; see its SOURCE.md)."""
    if not (SIIM_SAMPLE / "labels.csv").is_file():
        pytest.skip(f"real SIIM sample not found at {SIIM_SAMPLE}")
    return SIIM_SAMPLE


# A training configuration small enough for a test: 64² synthetic phantoms, a Lite0 encoder
# with random weights and a narrow decoder, two short epochs.
TINY_RUN = [
    "data.synthetic.n_images=24",
    "data.synthetic.size=64",
    "data.image_size=64",
    "model.encoder_weights=null",
    "model.decoder_channels=[16,16,16,16,16]",
    "train.epochs=2",
    "train.batch_size=4",
    "tracking.system_metrics=false",
    "tracking.overlays=2",
]


@pytest.fixture
def isolated_store(tmp_path, monkeypatch) -> Iterator[Path]:
    """MLflow store, caches and checkpoints inside tmp_path; the working directory too.

    MLflow also keeps the tracking URI in a module global (set by `mlflow.set_tracking_uri`,
    which ptxlab calls); it is pointed here and cleared afterwards, so no test's client reads
    an earlier test's store.
    """
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PTXLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PTXLAB_CHECKPOINTS", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("PTXLAB_PROGRESS", "0")
    mlflow.set_tracking_uri(uri)
    yield tmp_path
    mlflow.set_tracking_uri(None)


@contextmanager
def private_store(root: Path) -> Iterator[None]:
    """What `isolated_store` gives one test, for a module-scoped fixture: MLflow store, caches,
    checkpoints and the working directory inside `root`, undone afterwards (MLflow's global
    tracking URI, which ptxlab sets, included)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        patch.setenv("PTXLAB_CACHE", str(root / "cache"))
        patch.setenv("PTXLAB_CHECKPOINTS", str(root / "checkpoints"))
        patch.setenv("PTXLAB_PROGRESS", "0")
        patch.chdir(root)
        yield
    mlflow.set_tracking_uri(None)


def service_unavailable(reason: str) -> None:
    """Skip a test whose service (PostgreSQL, a browser, ...) is absent, e.g. on a laptop.

    Under CI (`PTXLAB_REQUIRE_SERVICES=1`, set by .ci/run) the same condition fails instead,
    so tests that need a service really run there.
    """
    if os.environ.get("PTXLAB_REQUIRE_SERVICES") == "1":
        pytest.fail(f"required service unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def wait_for_epochs(store: Path, experiment: str, epochs: int, process, timeout: float
                    ) -> tuple[str | None, Path | None, int]:
    """Poll until the run of `experiment` has `epochs` finished epochs in its local last.pt,
    `process` ends, or `timeout` seconds pass; returns (run id, last.pt, epochs finished)."""
    import time

    import torch
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    deadline = time.monotonic() + timeout
    run_id, last, epochs_done = None, None, 0
    while epochs_done < epochs and process.poll() is None and time.monotonic() < deadline:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs:
            run_id = runs[0].info.run_id
            last = store / "checkpoints" / run_id / "last.pt"
            if last.exists():
                epochs_done = torch.load(last, weights_only=False)["state"]["epoch"]
        time.sleep(0.2)
    return run_id, last, epochs_done
