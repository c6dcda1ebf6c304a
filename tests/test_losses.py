"""The training loss: BCE + batch soft Dice (+ head BCE), as ratios of sums over the batch."""

import pytest
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss

from ptxlab.config import LossConfig
from ptxlab.losses import SegmentationLoss
from ptxlab.model import ModelOutput


def _batch(positive: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 1, 16, 16, generator=generator) * 3
    masks = torch.zeros(3, 1, 16, 16, dtype=torch.uint8)
    if positive:
        masks[1, 0, 4:9, 2:12] = 1
    return logits, masks


@pytest.mark.parametrize("positive", [True, False])
def test_loss_equals_bce_plus_smp_dice(positive):
    logits, masks = _batch(positive)
    config = LossConfig(bce_weight=0.7, dice_weight=1.3)
    loss, terms = SegmentationLoss(config)(ModelOutput(logits, None), masks)
    bce = F.binary_cross_entropy_with_logits(logits, masks.float())
    dice = DiceLoss(mode="binary", from_logits=True)(logits, masks.float())
    assert terms["bce"] == pytest.approx(bce.item(), rel=1e-6)
    assert terms["dice"] == pytest.approx(dice.item(), rel=1e-6, abs=1e-7)
    assert loss.item() == pytest.approx(0.7 * bce.item() + 1.3 * dice.item(), rel=1e-6)
    assert (terms["dice"] == 0) == (not positive)  # no positive pixel: Dice is left out


def test_head_term_is_the_mean_image_level_bce():
    logits, masks = _batch(positive=True)
    class_logits = torch.tensor([[0.3], [2.0], [-1.0]])
    config = LossConfig(classification_weight=0.5)
    loss, terms = SegmentationLoss(config)(ModelOutput(logits, class_logits), masks)
    expected = F.binary_cross_entropy_with_logits(class_logits, torch.tensor([[0.], [1.], [0.]]))
    assert terms["classification"] == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() == pytest.approx(
        (terms["bce"] + terms["dice"] + 0.5 * terms["classification"]).item(), rel=1e-6)
