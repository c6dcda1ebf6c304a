"""Probability maps from a trained model: load a checkpoint, predict a dataset (optional TTA)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ptxlab.config import Config
from ptxlab.data.dataset import SegmentationDataset
from ptxlab.model import build_model, split_output
from ptxlab.postprocess import quantise
from ptxlab.vocabulary import TTA_MODES


@dataclass
class Predictions:
    """Per case: uint8-quantised probability maps at model resolution, truths, head scores."""

    ids: list[str]
    probs: np.ndarray  # (N, S, S) uint8, round(p * 255)
    truths: np.ndarray  # (N, S, S) bool, at the same resolution
    class_probs: np.ndarray | None  # (N,) when the model has a classification head


def load_trained_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, Config]:
    """A model and its run config from a `best.pt` written by training."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    config = Config.model_validate(payload["config"])
    model, _ = build_model(config.model, load_weights=False)
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), config


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: SegmentationDataset, device: torch.device,
            batch_size: int = 8, tta: str = "none", progress: bool = True) -> Predictions:
    """Sigmoid probabilities for every case of `dataset` (which must not augment)."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    model.eval()
    normalize = model.normalize_input
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    probs, truths, class_probs = [], [], []
    for images, masks, _ in tqdm(loader, desc="predict", unit="batch", leave=False,
                                 disable=not progress):
        inputs = normalize(images.to(device))
        output = split_output(model(inputs))
        mask_probs = torch.sigmoid(output.mask_logits.float())
        head = None if output.class_logits is None else torch.sigmoid(output.class_logits.float())
        if tta == "hflip":
            flipped = split_output(model(torch.flip(inputs, dims=[3])))
            mask_probs = 0.5 * (mask_probs + torch.flip(torch.sigmoid(
                flipped.mask_logits.float()), dims=[3]))
            if head is not None:
                head = 0.5 * (head + torch.sigmoid(flipped.class_logits.float()))
        probs.append(quantise(mask_probs[:, 0].cpu().numpy()))
        truths.append(masks[:, 0].numpy().astype(bool))
        if head is not None:
            class_probs.append(head[:, 0].cpu().numpy())
    return Predictions(
        ids=[case.case_id for case in dataset.cases],
        probs=np.concatenate(probs),
        truths=np.concatenate(truths),
        class_probs=np.concatenate(class_probs) if class_probs else None,
    )
