"""The image-level classification head trains, and its gate empties masks it rejects."""

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ptxlab.config import ConfigError, load_config
from ptxlab.experiment import run_experiment
from ptxlab.inference import Predictions
from ptxlab.losses import SegmentationLoss
from ptxlab.metrics import MetricAccumulator, score
from ptxlab.model import build_model, split_output
from ptxlab.postprocess import PostProcessing, apply, search_gate
from tests.conftest import TINY_RUN


def _blob(size: int, centre: tuple[int, int], radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2)


def _predictions(n: int = 12, size: int = 32) -> Predictions:
    """Positives: truth blob predicted well, head confident. Negatives: a false blob, head low."""
    rng = np.random.default_rng(0)
    probs, truths, head = [], [], []
    for i in range(n):
        positive = i % 2 == 0
        truth = _blob(size, (10, 10), 5) if positive else np.zeros((size, size), bool)
        predicted = _blob(size, (10, 11), 5) if positive else _blob(size, (20, 20), 4)
        probs.append(np.where(predicted, 0.9, 0.05) + rng.uniform(0, 0.02, (size, size)))
        truths.append(truth)
        head.append(rng.uniform(0.7, 0.95) if positive else rng.uniform(0.05, 0.3))
    return Predictions([str(i) for i in range(n)], (np.array(probs) * 255).round().astype(
        np.uint8), np.array(truths), np.array(head))


def test_head_gate_empties_masks_below_its_threshold():
    probs = np.full((16, 16), 0.9)
    gated = PostProcessing(threshold=0.5, gate="head", gate_threshold=0.4)
    assert apply(probs, gated, head_prob=0.3).sum() == 0
    assert apply(probs, gated, head_prob=0.5).sum() == 256
    with pytest.raises(ValueError, match="needs the classification head"):
        apply(probs, gated)


def test_area_gate_empties_small_masks_at_the_stated_resolution():
    probs = np.zeros((64, 64))
    probs[:4, :4] = 0.9  # 16 px at 64² = 1024 px at 512²
    assert apply(probs, PostProcessing(gate="area", gate_min_area=1024)).sum() == 16
    assert apply(probs, PostProcessing(gate="area", gate_min_area=1025)).sum() == 0


@pytest.mark.parametrize("objective", ["pooled_iou", "mean_dice"])
def test_gate_search_matches_a_naive_loop_and_rejects_the_negatives(objective):
    predictions = _predictions()
    rule = PostProcessing(threshold=0.5)
    result = search_gate(predictions.probs, predictions.truths, rule, "head",
                         predictions.class_probs, objective=objective, widen=False)
    for row in result.table:
        pp = PostProcessing(threshold=0.5, gate="head", gate_threshold=row["gate_threshold"])
        accumulator = MetricAccumulator()
        masks = np.stack([apply(p, pp, h) for p, h in zip(predictions.probs,
                                                          predictions.class_probs, strict=True)])
        accumulator.update(masks, predictions.truths)
        assert row["score"] == pytest.approx(accumulator.compute()[objective])
    best = result.best
    assert best.gate == "head" and 0.3 <= best.gate_threshold <= 0.7
    gated = score(predictions, best)
    ungated = score(predictions, rule)
    assert gated["specificity"] == 1.0 and ungated["specificity"] == 0.0
    assert gated["pooled_iou"] > ungated["pooled_iou"]


@pytest.mark.slow
def test_classification_loss_reaches_the_head():
    config = load_config(None, TINY_RUN + ["model.classification_head=true"])
    model, _ = build_model(config.model)
    images = torch.randint(0, 255, (2, 1, 64, 64), dtype=torch.uint8)
    masks = torch.zeros((2, 1, 64, 64), dtype=torch.uint8)
    masks[0, 0, 10:20, 10:20] = 1
    output = split_output(model(model.normalize_input(images)))
    assert output.class_logits.shape == (2, 1)
    loss, terms = SegmentationLoss(config.loss)(output, masks)
    assert set(terms) == {"bce", "dice", "classification"}
    loss.backward()
    head_grads = [p.grad for p in model.classification_head.parameters() if p.requires_grad]
    assert head_grads and all(g is not None and g.abs().sum() > 0 for g in head_grads)


def test_head_gate_requires_the_head():
    with pytest.raises(ConfigError, match="model.gate=head needs model.classification_head"):
        load_config(None, ["model.gate=head"])


@pytest.mark.slow
def test_classification_head_trains_and_its_gate_is_chosen_on_validation(isolated_store):
    config = load_config(None, TINY_RUN + ["model.classification_head=true", "model.gate=head"])
    summary = run_experiment(config, progress=False)
    client = MlflowClient()
    history = client.get_metric_history(summary.run_id, "train_classification")
    assert [m.step for m in history] == [0, 1] and all(m.value > 0 for m in history)
    assert summary.postprocess["gate"] == "head"
    run = client.get_run(summary.run_id)
    assert run.data.params["chosen.postprocess.gate"] == "head"
    assert "validation/gate_search.json" in {
        a.path for a in client.list_artifacts(summary.run_id, "validation")}
