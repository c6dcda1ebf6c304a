"""Build the segmentation network from config and turn its raw outputs into named parts."""

from __future__ import annotations

from dataclasses import dataclass

import segmentation_models_pytorch as smp
import torch
from torch import nn

from ptxlab.config import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def input_statistics(encoder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the encoder's pretrained weights expect (timm's config for `tu-` encoders)."""
    if encoder.startswith("tu-"):
        import timm

        pretrained = timm.models.get_pretrained_cfg(encoder[3:])
        if pretrained is not None:
            return tuple(pretrained.mean), tuple(pretrained.std)
    return IMAGENET_MEAN, IMAGENET_STD


@dataclass
class ModelOutput:
    mask_logits: torch.Tensor  # (N, 1, H, W)
    class_logits: torch.Tensor | None  # (N, 1) when the classification head is on


def build_model(config: ModelConfig, *, load_weights: bool = True) -> tuple[nn.Module, str]:
    """The smp network with 3 input channels and one output mask; returns it and a weights note.

    `network.normalize_input` turns uint8 grayscale batches into what the encoder expects.

    Encoder weights are loaded by `ptxlab.weights` (hub, local file or registered name), never
    by smp's constructor, so an offline machine fails fast with one clear message.
    """
    aux_params = {"classes": 1, "dropout": 0.2} if config.classification_head else None
    network = getattr(smp, config.arch)(
        encoder_name=config.encoder,
        encoder_weights=None,
        encoder_depth=len(config.decoder_channels),
        decoder_channels=config.decoder_channels,
        in_channels=3,
        classes=1,
        aux_params=aux_params,
    )
    network.normalize_input = InputNormalizer(config.encoder, config.input_scaling)
    weights_note = "random init"
    if load_weights and config.encoder_weights:
        from ptxlab.weights import apply_encoder_weights

        weights_note = apply_encoder_weights(network, config.encoder, config.encoder_weights)
    if config.channels_last:
        network = network.to(memory_format=torch.channels_last)
    return network, weights_note


def split_output(raw: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> ModelOutput:
    if isinstance(raw, tuple):
        return ModelOutput(raw[0], raw[1])
    return ModelOutput(raw, None)


class InputNormalizer(nn.Module):
    """uint8 grayscale batches (N, 1, H, W) -> float (N, 3, H, W), the gray channel repeated.

    `scaling="encoder"`: (pixel / 255 - mean) / std with the statistics `encoder`'s pretrained
    weights expect. `scaling="unit"`: pixel / 255 and nothing else, what the study's script fed
    its network (an RGB read of a grayscale PNG, i.e. three equal channels, / 255).
    Runs on the training device, so loaders move 1 byte per pixel instead of 12.
    """

    def __init__(self, encoder: str, scaling: str = "encoder") -> None:
        super().__init__()
        mean, std = input_statistics(encoder) if scaling == "encoder" else ((0.0,) * 3, (1.0,) * 3)
        mean = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().expand(-1, 3, -1, -1) - self.mean) / self.std
