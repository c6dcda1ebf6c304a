"""Segmentation and detection metrics computed from one set of predictions.

Three metric families, all from the same binary predicted masks:

* pooled pixel metrics (the published study): one confusion matrix summed over every pixel of
  every image, then IoU, Dice (F1), accuracy, precision and recall;
* per-image Dice and IoU (the SIIM challenge): each image scored alone, averaged over all images,
  over positive images (truth non-empty) and over negative images (truth empty);
* image-level detection: ROC AUC of an image score, and sensitivity/specificity of a decision.

Conventions for 0/0 (each documented where it applies):

* IoU and Dice are 1.0 when prediction and truth are both empty (nothing to find, nothing found),
  for one image and for the pooled matrix alike. Dice of an empty truth with a non-empty
  prediction is 0.
* Precision is NaN when nothing is predicted, recall is NaN when the truth is empty everywhere,
  accuracy is NaN when there are no pixels.
* AUC is NaN unless both positive and negative images are present; sensitivity is NaN without
  positive images, specificity NaN without negative images; group means over an empty subset
  (e.g. ``mean_dice_pos`` without positive images) are NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: both modules build on this one
    from ptxlab.inference import Predictions
    from ptxlab.postprocess import PostProcessing

METRIC_KEYS = (
    "pooled_iou",
    "pooled_dice",
    "pooled_precision",
    "pooled_recall",
    "pooled_accuracy",
    "mean_dice",
    "mean_dice_pos",
    "mean_dice_neg",
    "mean_iou",
    "auc",
    "sensitivity",
    "specificity",
    "n_images",
    "n_positive",
)


def _ratio(numerator: np.ndarray, denominator: np.ndarray, when_zero: float) -> np.ndarray:
    """numerator / denominator elementwise, with `when_zero` where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    safe = np.where(denominator == 0, 1.0, denominator)
    return np.where(denominator == 0, when_zero, numerator / safe)


def iou_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Elementwise IoU = tp / (tp + fp + fn); 1.0 where prediction and truth are both empty."""
    tp = np.asarray(tp)
    return _ratio(tp, tp + np.asarray(fp) + np.asarray(fn), when_zero=1.0)


def dice_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Elementwise Dice = 2 tp / (2 tp + fp + fn); 1.0 where prediction and truth are both empty."""
    tp = np.asarray(tp)
    return _ratio(2 * tp, 2 * tp + np.asarray(fp) + np.asarray(fn), when_zero=1.0)


def pooled_metrics(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """IoU, Dice, precision, recall and accuracy of one pooled pixel confusion matrix."""
    return {
        "pooled_iou": float(iou_from_counts(tp, fp, fn)),
        "pooled_dice": float(dice_from_counts(tp, fp, fn)),
        "pooled_precision": float(_ratio(tp, tp + fp, when_zero=np.nan)),
        "pooled_recall": float(_ratio(tp, tp + fn, when_zero=np.nan)),
        "pooled_accuracy": float(_ratio(tp + tn, tp + fp + fn + tn, when_zero=np.nan)),
    }


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank-based ROC AUC (Mann-Whitney U); tied scores share their mean rank, counting 1/2.

    NaN unless both classes are present.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in length")
    if not np.all(np.isfinite(scores)):
        raise ValueError("image scores must be finite")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    mean_rank = last_rank - (counts - 1) / 2.0
    rank_sum_pos = mean_rank[inverse][labels].sum()
    return float((rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def weighted_roc_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`roc_auc` with image i counted weights[r, i] times, for every row r of `weights` at once
    (a bootstrap's resamples): (R, N) -> (R,), NaN for a row without both classes."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    ties = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # first of each tied score
    labels = np.asarray(labels, dtype=bool).ravel()[order]
    weights = np.asarray(weights, dtype=np.float64)[:, order]
    pos = np.add.reduceat(weights * labels, ties, axis=1)
    neg = np.add.reduceat(weights * ~labels, ties, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight scored strictly lower
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def image_scores(probs: np.ndarray, head_probs: np.ndarray | None = None) -> np.ndarray:
    """Each image's score: its classification-head probability when the model has a head,
    else the highest pixel probability of its (H, W) map (uint8 maps are /255)."""
    if head_probs is not None:
        return np.asarray(head_probs)
    probs = np.asarray(probs)
    top = probs.reshape(len(probs), -1).max(axis=1).astype(np.float64)
    return top / 255.0 if probs.dtype == np.uint8 else top


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


class MetricAccumulator:
    """Collects per-image confusion counts batch by batch; every metric is derived from them.

    ``update`` is called once per batch; ``compute`` returns the metrics of everything seen.
    Detection decision: an image is called positive when its predicted mask is non-empty, or,
    when ``score_threshold`` is given, when its image score is > ``score_threshold``.
    When ``update`` gets no image scores, the predicted area is the score.
    Images without a group get the group ``""``; images without an id get their running index.
    """

    def __init__(self, score_threshold: float | None = None):
        self.score_threshold = score_threshold
        self._batches: list[dict[str, np.ndarray]] = []
        self._count = 0

    def update(
        self,
        pred_masks: np.ndarray,
        true_masks: np.ndarray,
        image_scores: np.ndarray | None = None,
        groups: Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
    ) -> None:
        """Add a batch: (N, H, W) bool/uint8 masks (non-zero = foreground), (N,) scores."""
        pred = np.asarray(pred_masks)
        truth = np.asarray(true_masks)
        if pred.ndim != 3 or pred.shape != truth.shape:
            raise ValueError(f"masks must be (N, H, W) and equal: {pred.shape} vs {truth.shape}")
        n = len(pred)
        pred = pred.reshape(n, -1).astype(bool, copy=False)
        truth = truth.reshape(n, -1).astype(bool, copy=False)
        tp = np.count_nonzero(pred & truth, axis=1).astype(np.int64)
        pred_area = np.count_nonzero(pred, axis=1).astype(np.int64)
        truth_area = np.count_nonzero(truth, axis=1).astype(np.int64)
        scores = pred_area.astype(np.float64) if image_scores is None else image_scores
        scores = np.asarray(scores, dtype=np.float64).ravel()
        groups = [""] * n if groups is None else [str(g) for g in groups]
        ids = [str(self._count + i) for i in range(n)] if ids is None else [str(i) for i in ids]
        if not len(scores) == len(groups) == len(ids) == n:
            raise ValueError(f"image_scores, groups and ids must each have {n} entries")
        self._batches.append(
            {
                "tp": tp,
                "fp": pred_area - tp,
                "fn": truth_area - tp,
                "tn": pred.shape[1] - pred_area - truth_area + tp,
                "score": scores,
                "group": np.asarray(groups, dtype=object),
                "id": np.asarray(ids, dtype=object),
            }
        )
        self._count += n

    def _columns(self) -> dict[str, np.ndarray]:
        if not self._batches:
            return {
                **{k: np.zeros(0, dtype=np.int64) for k in ("tp", "fp", "fn", "tn")},
                "score": np.zeros(0),
                "group": np.zeros(0, dtype=object),
                "id": np.zeros(0, dtype=object),
            }
        if len(self._batches) > 1:
            merged = {k: np.concatenate([b[k] for b in self._batches]) for k in self._batches[0]}
            self._batches = [merged]
        return self._batches[0]

    def _predicted_positive(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        if self.score_threshold is None:
            return (columns["tp"] + columns["fp"]) > 0
        return columns["score"] > self.score_threshold

    def _metrics(self, columns: dict[str, np.ndarray]) -> dict[str, float]:
        tp, fp, fn, tn = columns["tp"], columns["fp"], columns["fn"], columns["tn"]
        result = pooled_metrics(int(tp.sum()), int(fp.sum()), int(fn.sum()), int(tn.sum()))
        dice = dice_from_counts(tp, fp, fn)
        positive = (tp + fn) > 0
        called = self._predicted_positive(columns)
        result.update(
            mean_dice=_mean_or_nan(dice),
            mean_dice_pos=_mean_or_nan(dice[positive]),
            mean_dice_neg=_mean_or_nan(dice[~positive]),
            mean_iou=_mean_or_nan(iou_from_counts(tp, fp, fn)),
            auc=roc_auc(columns["score"], positive),
            sensitivity=_mean_or_nan(called[positive].astype(np.float64)),
            specificity=_mean_or_nan((~called[~positive]).astype(np.float64)),
            n_images=float(len(tp)),
            n_positive=float(positive.sum()),
        )
        return {key: result[key] for key in METRIC_KEYS}

    def compute(self) -> dict[str, float]:
        """All metrics over every image seen, keyed by METRIC_KEYS (counts as floats)."""
        return self._metrics(self._columns())

    def per_group(self) -> dict[str, dict[str, float]]:
        """The same metrics for each group, in sorted group order."""
        columns = self._columns()
        return {
            group: self._metrics({k: v[columns["group"] == group] for k, v in columns.items()})
            for group in sorted(set(columns["group"]))
        }

    def per_image(self) -> dict[str, np.ndarray]:
        """Per image, in the order seen: id, group, confusion counts tp/fp/fn/tn and score."""
        return dict(self._columns())

    def rows(self) -> list[dict[str, object]]:
        """One row per image: id, group, truth_area, pred_area, dice, iou, score."""
        c = self._columns()
        dice = dice_from_counts(c["tp"], c["fp"], c["fn"])
        iou = iou_from_counts(c["tp"], c["fp"], c["fn"])
        return [
            {
                "id": c["id"][i],
                "group": c["group"][i],
                "truth_area": int(c["tp"][i] + c["fn"][i]),
                "pred_area": int(c["tp"][i] + c["fp"][i]),
                "dice": float(dice[i]),
                "iou": float(iou[i]),
                "score": float(c["score"][i]),
            }
            for i in range(len(c["tp"]))
        ]

    def image_confusion(self) -> np.ndarray:
        """Image-level 2x2 matrix [[TN, FP], [FN, TP]]: rows = truth neg/pos, cols = called."""
        columns = self._columns()
        truth = (columns["tp"] + columns["fn"]) > 0
        called = self._predicted_positive(columns)
        return np.array(
            [
                [np.sum(~truth & ~called), np.sum(~truth & called)],
                [np.sum(truth & ~called), np.sum(truth & called)],
            ],
            dtype=np.int64,
        )


def score(predictions: Predictions, rule: PostProcessing) -> dict[str, float]:
    """The three metric families of `predictions` (maps, truths, head probabilities) once
    `rule` has made masks of the maps."""
    return accumulate(predictions, rule).compute()


def accumulate(predictions: Predictions, rule: PostProcessing) -> MetricAccumulator:
    """`score`'s accumulator, whose `rows()` hold the per-image values."""
    head = predictions.class_probs
    accumulator = MetricAccumulator()
    accumulator.update(rule.masks(predictions.probs, head), predictions.truths,
                       image_scores(predictions.probs, head), ids=predictions.ids)
    return accumulator
