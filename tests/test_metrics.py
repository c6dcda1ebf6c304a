"""Metrics against scikit-learn and direct per-image loops, on random masks with empty cases."""

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from ptxlab.metrics import (
    METRIC_KEYS,
    MetricAccumulator,
    image_scores,
    pooled_metrics,
    roc_auc,
)


def random_masks(seed: int = 0, n: int = 16, size: int = 12):
    """Predictions and truths with every empty case: empty/empty, empty pred, empty truth."""
    rng = np.random.default_rng(seed)
    pred = rng.random((n, size, size)) < rng.uniform(0.05, 0.5, (n, 1, 1))
    truth = rng.random((n, size, size)) < rng.uniform(0.05, 0.5, (n, 1, 1))
    pred[0] = truth[0] = False
    pred[1] = False
    truth[2] = False
    truth[3:6] = False  # more negatives, some predicted positive
    pred[4] = False
    return pred, truth


def direct_dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    inter = np.logical_and(pred, truth).sum()
    union = np.logical_or(pred, truth).sum()
    total = pred.sum() + truth.sum()
    return (1.0 if total == 0 else 2 * inter / total), (1.0 if union == 0 else inter / union)


def accumulate(pred, truth, scores=None, groups=None, ids=None, **kwargs) -> MetricAccumulator:
    """Feed in two batches, the first as uint8 0/255, the second as bool."""
    accumulator = MetricAccumulator(**kwargs)
    half = len(pred) // 2
    parts = [slice(0, half), slice(half, None)]
    for k, part in enumerate(parts):
        accumulator.update(
            pred[part].astype(np.uint8) * 255 if k == 0 else pred[part],
            truth[part].astype(np.uint8) if k == 0 else truth[part],
            None if scores is None else scores[part],
            None if groups is None else groups[part],
            None if ids is None else ids[part],
        )
    return accumulator


def test_pooled_metrics_match_sklearn():
    pred, truth = random_masks()
    result = accumulate(pred, truth).compute()
    assert list(result) == list(METRIC_KEYS)
    y_true, y_pred = truth.ravel(), pred.ravel()
    assert result["pooled_iou"] == pytest.approx(jaccard_score(y_true, y_pred))
    assert result["pooled_dice"] == pytest.approx(f1_score(y_true, y_pred))
    assert result["pooled_precision"] == pytest.approx(precision_score(y_true, y_pred))
    assert result["pooled_recall"] == pytest.approx(recall_score(y_true, y_pred))
    assert result["pooled_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))


def test_pooled_zero_division_conventions():
    nothing = np.zeros((2, 4, 4), dtype=bool)
    y = nothing.ravel()
    result = accumulate(nothing, nothing).compute()
    assert result["pooled_iou"] == jaccard_score(y, y, zero_division=1.0) == 1.0
    assert result["pooled_dice"] == f1_score(y, y, zero_division=1.0) == 1.0
    assert math.isnan(result["pooled_precision"])
    assert math.isnan(result["pooled_recall"])
    assert result["pooled_accuracy"] == 1.0
    only_truth = pooled_metrics(tp=0, fp=0, fn=5, tn=11)
    assert only_truth["pooled_iou"] == only_truth["pooled_dice"] == only_truth["pooled_recall"] == 0
    assert math.isnan(only_truth["pooled_precision"])
    assert math.isnan(pooled_metrics(0, 0, 0, 0)["pooled_accuracy"])


def test_per_image_metrics_match_direct_loop():
    pred, truth = random_masks(seed=1)
    ids = np.array([f"img{i}" for i in range(len(pred))])
    scores = np.linspace(0, 1, len(pred))
    accumulator = accumulate(pred, truth, scores=scores, ids=ids)
    result = accumulator.compute()
    direct = np.array([direct_dice_iou(p, t) for p, t in zip(pred, truth, strict=True)])
    positive = truth.any(axis=(1, 2))
    assert direct[0, 0] == 1.0 and direct[1, 0] == 0.0 and direct[2, 0] == 0.0
    assert result["mean_dice"] == pytest.approx(direct[:, 0].mean())
    assert result["mean_iou"] == pytest.approx(direct[:, 1].mean())
    assert result["mean_dice_pos"] == pytest.approx(direct[positive, 0].mean())
    assert result["mean_dice_neg"] == pytest.approx(direct[~positive, 0].mean())
    assert result["n_images"] == len(pred) and result["n_positive"] == positive.sum()
    rows = accumulator.rows()
    assert [r["id"] for r in rows] == ids.tolist()
    for row, p, t, (dice, iou), score in zip(rows, pred, truth, direct, scores, strict=True):
        assert row["truth_area"] == t.sum() and row["pred_area"] == p.sum()
        assert row["dice"] == pytest.approx(dice) and row["iou"] == pytest.approx(iou)
        assert row["score"] == score and row["group"] == ""


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(2)
    labels = rng.random(200) < 0.3
    scores = rng.integers(0, 6, 200) + labels * rng.integers(0, 3, 200)  # many ties
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert roc_auc([0.2, 0.2, 0.2], [True, False, True]) == 0.5
    assert math.isnan(roc_auc([0.1, 0.9], [True, True]))

    pred, truth = random_masks(seed=3)
    areas = pred.sum(axis=(1, 2))
    result = accumulate(pred, truth).compute()  # no scores: predicted area is the score
    assert result["auc"] == pytest.approx(roc_auc_score(truth.any(axis=(1, 2)), areas))


def test_detection_sensitivity_specificity_and_confusion():
    pred, truth = random_masks(seed=4)
    labels = truth.any(axis=(1, 2))
    called = pred.any(axis=(1, 2))
    accumulator = accumulate(pred, truth)
    result = accumulator.compute()
    tn, fp, fn, tp = confusion_matrix(labels, called, labels=[False, True]).ravel()
    assert np.array_equal(accumulator.image_confusion(), [[tn, fp], [fn, tp]])
    assert result["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert result["specificity"] == pytest.approx(tn / (tn + fp))

    scores = np.random.default_rng(5).random(len(pred))
    by_score = accumulate(pred, truth, scores=scores, score_threshold=0.5)
    called = scores > 0.5
    tn, fp, fn, tp = confusion_matrix(labels, called, labels=[False, True]).ravel()
    assert np.array_equal(by_score.image_confusion(), [[tn, fp], [fn, tp]])
    assert by_score.compute()["sensitivity"] == pytest.approx(tp / (tp + fn))


def test_per_group_equals_separate_accumulators():
    pred, truth = random_masks(seed=6, n=20)
    groups = np.array(["siteA", "siteB", "siteC", "siteA"] * 5)
    scores = np.random.default_rng(7).random(len(pred))
    per_group = accumulate(pred, truth, scores=scores, groups=groups).per_group()
    assert list(per_group) == ["siteA", "siteB", "siteC"]
    for group, metrics in per_group.items():
        alone = MetricAccumulator()
        keep = groups == group
        alone.update(pred[keep], truth[keep], scores[keep])
        np.testing.assert_equal(metrics, alone.compute())


def test_undefined_values_are_nan():
    empty = MetricAccumulator().compute()
    assert empty["n_images"] == 0 and math.isnan(empty["mean_dice"])
    negatives = MetricAccumulator()
    nothing = np.zeros((3, 4, 4), dtype=bool)
    negatives.update(nothing, nothing, np.array([0.1, 0.2, 0.3]))
    result = negatives.compute()
    assert result["mean_dice"] == result["mean_dice_neg"] == result["specificity"] == 1.0
    for key in ("mean_dice_pos", "auc", "sensitivity"):
        assert math.isnan(result[key]), key


def test_bad_shapes_rejected():
    with pytest.raises(ValueError):
        MetricAccumulator().update(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(ValueError):
        MetricAccumulator().update(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), np.zeros(3))


def test_image_score_helpers():
    probs = np.zeros((2, 3, 3), dtype=np.float32)
    probs[0, 1, 1] = 0.75
    assert image_scores(probs).tolist() == [0.75, 0.0]
    assert image_scores((probs * 255).astype(np.uint8)).tolist() == pytest.approx(
        [0.749, 0], abs=0.01
    )
    assert image_scores(probs, np.array([0.2, 0.9])).tolist() == [0.2, 0.9]
    accumulator = MetricAccumulator()  # without image scores, the predicted area is the score
    accumulator.update(probs > 0.5, np.zeros(probs.shape, dtype=bool))
    assert [row["score"] for row in accumulator.rows()] == [1.0, 0.0]
