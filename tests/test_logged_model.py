"""The trained model as an MLflow model: found, loaded, served and registered as MLflow users
expect, predicting exactly what `ptxlab predict` writes."""

import base64
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ptxlab import artifacts
from ptxlab.config import load_config
from ptxlab.experiment import run_experiment
from ptxlab.prediction import load_run, predict_files
from tests.conftest import SIIM_SAMPLE, TINY_RUN, private_store, sample_rows

# A fixed threshold on an untrained network: masks that are neither empty nor full.
# keep_checkpoints: the test checks the resume checkpoint stays apart from the logged model.
MODEL_RUN = [*TINY_RUN, "postprocess.search=false", "postprocess.threshold=0.5",
             "train.keep_checkpoints=true"]
ROOT = Path(__file__).parents[1]


@dataclass
class Trained:
    run_id: str
    experiment_id: str
    root: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One tiny run for the whole module, in a private MLflow store, cache and working dir."""
    root = tmp_path_factory.mktemp("logged-model")
    with private_store(root):
        summary = run_experiment(load_config(None, MODEL_RUN))
        yield Trained(summary.run_id, summary.experiment_id, root)


@pytest.fixture(scope="module")
def sample_images() -> list[Path]:
    if not (SIIM_SAMPLE / "labels.csv").is_file():
        pytest.skip(f"real SIIM sample not found at {SIIM_SAMPLE}")
    positive = next(r for r in sample_rows() if r["has_pneumo"] == "1")
    dicom = sorted((SIIM_SAMPLE / "dicom").glob("*.dcm"))[0]
    return [SIIM_SAMPLE / "images" / positive["file"], dicom]


def _logged_model(trained: Trained):
    (model,) = mlflow.search_logged_models(experiment_ids=[trained.experiment_id],
                                           output_format="list")
    return model


def _ptxlab_masks(reference: str, images: list[Path], out: Path) -> list[np.ndarray]:
    predict_files(reference, images, out, with_overlay=False, progress=False)
    return [cv2.imread(str(out / f"{image.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
            for image in images]


@pytest.mark.slow
def test_the_run_logs_its_model_with_metrics_dataset_and_what_serving_needs(trained):
    model = _logged_model(trained)
    assert model.name == artifacts.LOGGED_MODEL and model.source_run_id == trained.run_id
    run = MlflowClient().get_run(trained.run_id)
    assert [output.model_id for output in run.outputs.model_outputs] == [model.model_id]
    linked = {m.key: m for m in model.metrics}
    iou = linked["best_val_pooled_iou"]
    assert iou.value == run.data.metrics["best_val_pooled_iou"] and iou.run_id == trained.run_id
    assert iou.dataset_name == "synthetic-validation"
    assert iou.dataset_digest == run.inputs.dataset_inputs[0].dataset.digest

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model.model_id}"))
    meta = mlflow.models.Model.load(str(local))
    assert meta.signature.inputs.inputs[0].type.name == "binary"
    assert meta.signature.params.params[0].name == "probabilities"
    assert meta.saved_input_example_info is not None
    requirements = (local / "requirements.txt").read_text().split()
    assert f"torch=={importlib.metadata.version('torch')}" in requirements
    assert not any(r.startswith("optuna") for r in requirements)
    stored_rule = json.loads((local / artifacts.LOGGED_MODEL_POSTPROCESS).read_text())
    assert stored_rule == {"kind": "threshold", "threshold": 0.5, "min_area": 0, "resolution": 512}
    config = yaml.safe_load((local / "artifacts" / "config.yaml").read_text())
    assert config["data"]["image_size"] == 64
    assert (local / "code" / "ptxlab" / "mlflow_model.py").is_file()
    # The resume checkpoint stays apart from the logged model.
    assert (trained.root / "checkpoints" / trained.run_id / "last.pt").is_file()


@pytest.mark.slow
def test_pyfunc_predicts_the_masks_ptxlab_predict_writes(trained, sample_images, tmp_path):
    model = _logged_model(trained)
    expected = _ptxlab_masks(trained.run_id, sample_images, tmp_path / "ptxlab")
    assert 0 < int((expected[0] > 0).sum()) < expected[0].size  # not trivially empty or full
    pyfunc = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    by_path = pyfunc.predict([str(p) for p in sample_images])
    by_bytes = pyfunc.predict(pd.DataFrame({"image": [p.read_bytes() for p in sample_images]}),
                              params={"probabilities": True})
    for want, got_path, got_bytes in zip(expected, by_path, by_bytes, strict=True):
        assert got_path["mask"].shape == want.shape == (1024, 1024)  # native size
        assert np.array_equal(got_path["mask"] * 255, want)
        assert np.array_equal(got_bytes["mask"] * 255, want)
        assert "probabilities" not in got_path
        probabilities = got_bytes["probabilities"]
        assert probabilities.shape == want.shape and probabilities.dtype == np.float32
        assert np.array_equal(probabilities >= 0.5, want > 0)  # the run's rule, threshold 0.5


@pytest.mark.slow
def test_evaluate_and_predict_accept_every_kind_of_model_reference(trained, sample_images,
                                                                    tmp_path):
    model = _logged_model(trained)
    name = f"segmenter-{uuid.uuid4().hex[:6]}"
    version = mlflow.register_model(f"models:/{model.model_id}", name)
    MlflowClient().set_registered_model_alias(name, "champion", version.version)
    expected = _ptxlab_masks(trained.run_id, sample_images[:1], tmp_path / "by-id")[0]
    references = [f"runs:/{trained.run_id}/{artifacts.LOGGED_MODEL}", f"models:/{model.model_id}",
                  f"models:/{name}/{version.version}", f"models:/{name}@champion"]
    for index, reference in enumerate(references):
        assert load_run(reference).run_id == trained.run_id, reference
        got = _ptxlab_masks(reference, sample_images[:1], tmp_path / f"ref-{index}")[0]
        assert np.array_equal(got, expected), reference
    with pytest.raises(ValueError, match="models:/no-such-model/1: not found"):
        load_run("models:/no-such-model/1")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_ptxlab_predict_s_mask(trained, sample_images, tmp_path):
    model = _logged_model(trained)
    expected = _ptxlab_masks(trained.run_id, sample_images[:1], tmp_path / "ptxlab")[0]
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{model.model_id}",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_serving(server, port, tmp_path / "serve.log")
        encoded = base64.b64encode(sample_images[0].read_bytes()).decode()
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[encoded]]}})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         body.encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            (prediction,) = json.loads(response.read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    mask = np.asarray(prediction["mask"], dtype=np.uint8)
    assert np.array_equal(mask * 255, expected)


def _wait_until_serving(server: subprocess.Popen, port: int, log: Path,
                        limit_s: float = 240) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}: "
                        f"{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"mlflow models serve did not answer on port {port} within {limit_s:.0f} s")


@pytest.mark.slow
def test_sweep_register_points_best_at_the_best_trial_s_model(isolated_store, sample_images):
    tree = yaml.safe_load((ROOT / "experiments" / "studies" / "smoke.yaml").read_text())
    tree.update(base=str(ROOT / "experiments" / "default.yaml"), name="register-test",
                repeats=1, space={"optim.lr": {"type": "categorical", "choices": [0.003, 1e-7]}},
                hypotheses=[])
    tree["set"].update({"train.epochs": 1, "tracking.experiment": "register-test"})
    study = isolated_store / "register-test.yaml"
    study.write_text(yaml.safe_dump(tree, sort_keys=False))
    sweep = subprocess.run([sys.executable, "-m", "ptxlab", "sweep", str(study), "--register",
                            "pneumothorax"], capture_output=True, text=True, timeout=900)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "as pneumothorax version 1: models:/pneumothorax@best" in sweep.stdout

    client = MlflowClient()
    version = client.get_model_version_by_alias("pneumothorax", "best")
    best_run = client.get_run(version.run_id)
    siblings = client.search_runs([best_run.info.experiment_id],
                                  "tags.`ptxlab.study` = 'register-test'")
    trials = [r for r in siblings if "optuna.trial_number" in r.data.tags]
    assert len(trials) == 2
    best_iou = max(r.data.metrics["best_val_pooled_iou"] for r in trials)
    assert best_run.data.metrics["best_val_pooled_iou"] == best_iou
    assert version.tags["ptxlab.study"] == "register-test"
    assert version.tags["ptxlab.trial"] == best_run.data.tags["optuna.trial_number"]
    # The parent run carries the objective and the best trial's metrics; links open the ML view.
    parent = client.get_run(best_run.data.tags["mlflow.parentRunId"])
    assert parent.data.params["study.objective"] == "best_val_pooled_iou"
    assert parent.data.metrics["best_val_pooled_iou"] == best_iou
    assert parent.data.tags["ptxlab.best_trial"] == version.tags["ptxlab.trial"]
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"#/experiments/{experiment.experiment_id}?workflowType=machine_learning" in sweep.stdout

    out = isolated_store / "predicted"
    predicted = subprocess.run([sys.executable, "-m", "ptxlab", "predict",
                                "models:/pneumothorax@best", str(sample_images[0]), "--out",
                                str(out)], capture_output=True, text=True, timeout=600)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    expected = _ptxlab_masks(best_run.info.run_id, sample_images[:1], isolated_store / "by-id")
    got = cv2.imread(str(out / f"{sample_images[0].stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(got, expected[0])


def test_a_local_data_set_becomes_an_mlflow_dataset_without_warnings():
    """MLflow registers its local-file source class twice and warns about the ambiguity on
    every run; ptxlab's dataset inputs are local folders."""
    import warnings

    from ptxlab import tracking

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = tracking.dataset([{"id": "a", "positive": True}], str(SIIM_SAMPLE),
                                   "siim-sample-validation", "0" * 8)
    assert dataset.digest == "0" * 8 and dataset.name == "siim-sample-validation"
