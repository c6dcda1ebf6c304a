"""Training objective: BCE + soft Dice on the mask, plus BCE on the optional image-level head.

Every term is a ratio of sums over the whole batch. With `across_ranks=True` (training under
torchrun) the sums run over the global batch through `distributed.global_sum`, so each rank
computes the loss one process would compute for the whole batch, however the images are
shared out among the ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptxlab.config import LossConfig
from ptxlab.distributed import global_sum
from ptxlab.model import ModelOutput

DICE_EPS = 1e-7


class SegmentationLoss(nn.Module):
    """Returns the total loss and its named terms (for logging).

    The Dice term is the soft Dice of the batch taken as one volume (pixels of all images
    pooled), and 0 for a batch without any pneumothorax pixel, where Dice is undefined.
    """

    def __init__(self, config: LossConfig, across_ranks: bool = False):
        super().__init__()
        self.config = config
        self.sum = global_sum if across_ranks else (lambda tensor: tensor)

    def forward(self, output: ModelOutput, masks: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = _at_least_float32(output.mask_logits)
        targets = masks.to(logits.dtype)
        probs = F.logsigmoid(logits).exp()
        parts = [
            F.binary_cross_entropy_with_logits(logits, targets, reduction="sum"),
            logits.new_tensor(float(targets.numel())),
            (probs * targets).sum(),
            probs.sum() + targets.sum(),
            targets.sum(),
        ]
        head = output.class_logits
        if head is not None:
            has_pneumothorax = targets.flatten(1).amax(dim=1, keepdim=True)
            parts += [
                F.binary_cross_entropy_with_logits(head.to(logits.dtype), has_pneumothorax,
                                                   reduction="sum"),
                logits.new_tensor(float(len(head))),
            ]
        bce_sum, n_pixels, overlap, cardinality, positives, *head_sums = self.sum(
            torch.stack(parts)).unbind()
        dice_loss = 1.0 - 2.0 * overlap / cardinality.clamp_min(DICE_EPS)
        terms = {
            "bce": bce_sum / n_pixels,
            "dice": dice_loss * (positives > 0),
        }
        total = self.config.bce_weight * terms["bce"] + self.config.dice_weight * terms["dice"]
        if head_sums:
            head_bce_sum, n_images = head_sums
            terms["classification"] = head_bce_sum / n_images
            total = total + self.config.classification_weight * terms["classification"]
        return total, {name: value.detach() for name, value in terms.items()}


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) are summed in float32; float64 stays float64."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()
