"""matplotlib figures logged to MLflow: learning curves, overlays, confusion matrices, heatmaps."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

TRUTH_COLOUR = (0, 200, 0)
PREDICTION_COLOUR = (230, 40, 40)


def learning_curves(history: Sequence[dict[str, float]], best_epoch: int | None = None) -> Figure:
    """Loss, overlap and learning rate per epoch, the best epoch marked."""
    epochs = [int(h["epoch"]) + 1 for h in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    panels = [
        ("loss", ["train_loss", "val_loss"]),
        ("validation overlap", ["val_iou", "val_dice", "val_mean_dice"]),
        ("learning rate", ["lr"]),
    ]
    for axis, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            axis.plot(epochs, [h.get(key, np.nan) for h in history], marker=".", label=key)
        if best_epoch is not None and best_epoch >= 0:
            axis.axvline(best_epoch + 1, color="grey", linestyle=":", label="best epoch")
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[2].set_yscale("log")
    return figure


def overlay(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray | None):
    """RGB image with the truth (green) and prediction (red) outlines."""
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image.copy()
    thickness = max(1, image.shape[0] // 256)
    for mask, colour in ((truth, TRUTH_COLOUR), (prediction, PREDICTION_COLOUR)):
        if mask is None:
            continue
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, colour, thickness)
    return rgb


def overlay_grid(images: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                 predictions: Sequence[np.ndarray], titles: Sequence[str]) -> Figure:
    """One row per case: image, truth, prediction, and both outlines over the image."""
    rows = len(images)
    figure, axes = plt.subplots(rows, 4, figsize=(12, 3 * rows), squeeze=False,
                                constrained_layout=True)
    for row, (image, truth, pred, title) in enumerate(
        zip(images, truths, predictions, titles, strict=True)
    ):
        panels = [(image, "gray", title), (truth, "gray", "truth"), (pred, "gray", "prediction"),
                  (overlay(image, truth, pred), None, "truth green / prediction red")]
        for axis, (picture, cmap, label) in zip(axes[row], panels, strict=True):
            axis.imshow(picture, cmap=cmap, vmin=0, vmax=None if cmap is None else picture.max()
                        or 1)
            axis.set_title(label, fontsize=8)
            axis.axis("off")
    return figure


def confusion_matrix(matrix: np.ndarray, labels: Sequence[str], title: str) -> Figure:
    """A 2x2 (truth rows x prediction columns) count matrix with the counts written in."""
    figure, axis = plt.subplots(figsize=(4.5, 4), constrained_layout=True)
    axis.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        axis.text(col, row, f"{int(count)}", ha="center", va="center",
                  color="white" if count > matrix.max() / 2 else "black", fontsize=12)
    axis.set_xticks(range(len(labels)), [f"pred {name}" for name in labels])
    axis.set_yticks(range(len(labels)), [f"true {name}" for name in labels])
    axis.set_title(title)
    return figure


def heatmap(table: np.ndarray, rows: Sequence, cols: Sequence, row_label: str, col_label: str,
            title: str, best: tuple[int, int] | None = None) -> Figure:
    """A score table (e.g. threshold x minimum area) with the optimum circled."""
    figure, axis = plt.subplots(figsize=(1 + 0.7 * len(cols), 1 + 0.4 * len(rows)),
                                constrained_layout=True)
    image = axis.imshow(table, cmap="viridis", aspect="auto")
    axis.set_xticks(range(len(cols)), [str(c) for c in cols], rotation=45)
    axis.set_yticks(range(len(rows)), [f"{r:g}" if isinstance(r, float) else str(r)
                                       for r in rows])
    axis.set_xlabel(col_label)
    axis.set_ylabel(row_label)
    if best is not None:
        axis.scatter([best[1]], [best[0]], s=120, facecolors="none", edgecolors="red")
    figure.colorbar(image, ax=axis)
    axis.set_title(title)
    return figure


def close(figure: Figure) -> None:
    plt.close(figure)
