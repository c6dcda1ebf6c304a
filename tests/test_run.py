"""A tiny real training run end to end, through the CLI, into an MLflow store."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import ptxlab
from ptxlab.cli import app
from ptxlab.config import load_config
from ptxlab.experiment import prepare_data, run_experiment
from ptxlab.inference import predict
from ptxlab.metrics import score
from ptxlab.model import build_model
from ptxlab.postprocess import PostProcessing, choose
from ptxlab.train import NonFiniteLossError
from tests.conftest import TINY_RUN

runner = CliRunner()


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


# TINY_RUN, long enough to learn: ImageNet encoder weights, 128² phantoms, a few epochs.
LEARNING_RUN = TINY_RUN + ["model.encoder_weights=lite0-imagenet", "data.synthetic.n_images=96",
                           "data.synthetic.size=128", "data.image_size=128",
                           "model.decoder_channels=[32,32,16,16,8]", "train.epochs=5"]


def untrained_validation_dice(config) -> float:
    """Pooled validation Dice of the same network before training, on the same validation
    cases, post-processed by the same search the run makes."""
    data = prepare_data(config, progress=False)
    torch.manual_seed(config.seed)
    model, _ = build_model(config.model)
    predictions = predict(model, data.val, torch.device("cpu"), progress=False)
    pp = config.postprocess
    chosen = choose(predictions.probs, predictions.truths,
                    PostProcessing(pp.rule, resolution=pp.resolution), pp.search, pp.objective,
                    config.model.gate, predictions.class_probs)
    return score(predictions, chosen.rule)["pooled_dice"]


@pytest.mark.slow
def test_run_logs_a_complete_mlflow_run(isolated_store):
    args = ["run"] + [arg for override in LEARNING_RUN for arg in ("--set", override)]
    result = runner.invoke(app, args + ["--set", "tracking.experiment=tiny"])
    assert result.exit_code == 0, result.output
    run_id = result.output.split("run id: ")[1].split()[0]
    assert "best validation Dice" in result.output

    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    params = run.data.params
    config = load_config(None, LEARNING_RUN + ["tracking.experiment=tiny"])
    assert params["train.batch_size"] == "4" and params["data.image_size"] == "128"
    # every key of the resolved config is logged with its value
    assert {key: params.get(key) for key in config.flat()} == {
        key: str(value) for key, value in config.flat().items()}
    assert "chosen.postprocess.threshold" in params
    epochs = len(client.get_metric_history(run_id, "val_dice"))
    assert 1 <= epochs <= config.train.epochs
    for key in ("train_loss", "val_loss", "val_iou", "val_dice", "lr", "images_per_s"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(epochs)), key
    # It learns: validation Dice well above the same network's before training.
    untrained = untrained_validation_dice(config)
    assert run.data.metrics["best_val_pooled_dice"] > max(0.3, 3 * untrained), untrained
    tags = run.data.tags
    assert tags["ptxlab.device"] == "cpu" and tags["ptxlab.version"] == ptxlab.__version__
    assert "mlflow.source.git.commit" in tags

    artifacts = _artifacts(client, run_id)
    assert {
        "config/config.yaml", "config/augmentation.json", "data/split.json",
        "plots/learning_curves.png", "plots/validation_overlays.png",
        "plots/postprocess_search.png", "model/best.pt", "model/postprocess.json",
        "validation/val_probabilities.npz",
    } <= artifacts
    split_path = client.download_artifacts(run_id, "data/split.json", str(isolated_store))
    split = json.loads(open(split_path).read())
    assert len(split["train"]) + len(split["val"]) == 96
    assert not set(split["train"]) & set(split["val"])
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {
        "synthetic-training", "synthetic-validation"}


@pytest.mark.slow
def test_non_finite_loss_fails_the_run_with_a_reason(isolated_store):
    config = load_config(None, TINY_RUN + ["optim.lr=1e30", "train.epochs=3"])
    with pytest.raises(NonFiniteLossError):
        run_experiment(config, progress=False)
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("ptxlab").experiment_id])
    assert run.info.status == "FAILED"
    assert "non-finite loss" in run.data.tags["ptxlab.failure"]


@pytest.mark.slow
def test_untrained_network_scores_near_zero_dice(isolated_store):
    """The synthetic task is not trivial: a random network's masks barely overlap the truth."""
    config = load_config(None, TINY_RUN)
    data = prepare_data(config, progress=False)
    torch.manual_seed(0)
    model, _ = build_model(config.model)
    predictions = predict(model, data.val, torch.device("cpu"), progress=False)
    assert score(predictions, PostProcessing())["pooled_dice"] < 0.2


@pytest.mark.slow
def test_a_separate_test_source_is_scored_at_the_end(isolated_store, siim_sample):
    """Train on synthetic data, test on real SIIM images (as the study trained on SIIM and
    tested on PTX-498): the test metrics land in the same run."""
    test_dir = isolated_store / "test-set"
    for sub in ("images", "masks"):
        (test_dir / sub).mkdir(parents=True)
    names = sorted(p.name for p in (siim_sample / "masks").iterdir())[:3]
    for name in names:
        for sub in ("images", "masks"):
            (test_dir / sub / name).symlink_to(siim_sample / sub / name)
    config = load_config(None, TINY_RUN + [f"data.test_source={test_dir}",
                                           "data.test_layout=folder", "train.epochs=1"])
    summary = run_experiment(config, progress=False)
    assert set(summary.test_metrics) >= {"pooled_iou", "pooled_dice", "mean_dice", "auc"}
    run = MlflowClient().get_run(summary.run_id)
    assert run.data.metrics["test_n_images"] == 3
    assert run.data.metrics["test_pooled_dice"] == pytest.approx(
        summary.test_metrics["pooled_dice"])


@pytest.mark.slow
def test_triplet_rule_is_searched_when_configured(isolated_store):
    config = load_config(None, TINY_RUN + ["postprocess.rule=triplet", "train.epochs=1"])
    summary = run_experiment(config, progress=False)
    assert summary.postprocess["kind"] == "triplet"
    assert set(summary.postprocess) >= {"top_threshold", "min_top_area", "bottom_threshold"}
    params = MlflowClient().get_run(summary.run_id).data.params
    assert params["chosen.postprocess.kind"] == "triplet"


@pytest.mark.slow
def test_default_store_is_sqlite_plus_artifacts_under_mlruns(isolated_store, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    summary = run_experiment(load_config(None, TINY_RUN + ["train.epochs=1"]), progress=False)
    store = isolated_store / "mlruns"
    assert (store / "mlflow.db").is_file()
    assert (store / "artifacts" / summary.run_id / "artifacts" / "model" / "best.pt").is_file()
