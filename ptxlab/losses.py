"""Training objective: BCE + soft Dice on the mask, plus BCE on the optional image-level head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn

from ptxlab.config import LossConfig
from ptxlab.model import ModelOutput


class SegmentationLoss(nn.Module):
    """Returns the total loss and its named terms (for logging)."""

    def __init__(self, config: LossConfig):
        super().__init__()
        self.config = config
        self.dice = DiceLoss(mode="binary", from_logits=True)

    def forward(self, output: ModelOutput, masks: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = output.mask_logits.float()
        targets = masks.float()
        terms = {
            "bce": F.binary_cross_entropy_with_logits(logits, targets),
            "dice": self.dice(logits, targets),
        }
        total = self.config.bce_weight * terms["bce"] + self.config.dice_weight * terms["dice"]
        if output.class_logits is not None:
            has_pneumothorax = targets.flatten(1).amax(dim=1, keepdim=True)
            terms["classification"] = F.binary_cross_entropy_with_logits(
                output.class_logits.float(), has_pneumothorax
            )
            total = total + self.config.classification_weight * terms["classification"]
        return total, {name: value.detach() for name, value in terms.items()}
