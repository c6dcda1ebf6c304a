"""Training and evaluation augmentation pipelines (albumentations 2) with a continuous strength knob.

Inputs are uint8 H x W grayscale images with uint8 {0, 1} masks; outputs keep those types (masks
use nearest-neighbour interpolation, so they stay binary). Normalisation happens elsewhere.

Order (`augment.order`): ``resize-first`` resizes to `image_size` and augments there;
``source-first`` augments the image as loaded (the source resolution, or the cache's
`data.cache_size`) and resizes last, as the study's script did (its ``A.Resize`` is the last
transform). Pixel-sized parameters (ElasticTransform's alpha and sigma) act relative to the
resolution they run at, so the two orders differ most there.

Presets (`augment.preset`):

* ``none``: resize only.
* ``paper``: the study's pipeline exactly as it runs under albumentations 2.x. Its Affine was
  written ``translate_percent={"x": 0.2, "y": 0.2}``; albumentations 2 reads a scalar per axis as
  the range (0.2, 0.2), so every applied Affine shifts the image by a FIXED +20 % right and down.
  That is what the study trained with, so that is what this preset reproduces. Its
  OpticalDistortion(distort_limit=2) is also kept as written, although albumentations 2's camera
  model makes k = +-2 a strong barrel/pincushion warp.
* ``paper-intended``: the same with the shift the authors presumably meant: uniform in +-20 %.
* ``light``: milder, in the spirit of the SIIM-ACR 2019 winners (flip, mild brightness/contrast/
  gamma, mild distortion, ShiftScaleRotate-like Affine: shift +-6.25 %, scale 0.9-1.1, rotate
  +-15 degrees, reflected border instead of black). It keeps the same transform structure as
  ``paper`` (the optical distortion at albumentations' recommended mild +-0.05), so serialised
  pipelines of different presets differ only in numbers.

Seeding: albumentations 2.0.8's ``Compose(seed=...)`` / ``set_random_seed`` gives every transform
the SAME random stream, so their coin flips coincide (flip applied <=> Affine applied, ...).
Use `seed_transform`, which gives each transform its own stream derived from one seed; call it in
every DataLoader worker with a worker-specific seed.

`strength` in [0, 1] scales every magnitude and every probability linearly: 0 gives resize only,
1 gives the preset exactly. Scaled: application probabilities, brightness/contrast limits,
gamma distance from 100, elastic alpha, grid/optical distortion limits, translation, scale
distance from 1, rotation. Not scaled: elastic sigma (smoothness of the field, not its size) and
the selection weights inside each OneOf (they are relative, so scaling them changes nothing).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import albumentations as A
import cv2
import numpy as np

from ptxlab.vocabulary import AUGMENT_ORDERS, PRESETS


@dataclass(frozen=True)
class _Magnitudes:
    """Full-strength parameters of one preset; `_scale` shrinks them towards identity."""

    flip_p: float
    intensity_p: float
    brightness: float
    contrast: float
    gamma: float  # RandomGamma samples in (100 - gamma, 100 + gamma)
    distortion_p: float
    elastic_alpha: float
    elastic_sigma: float
    grid_limit: float
    optical_limit: float
    affine_p: float
    translate: tuple[float, float]  # (low, high) fraction of the side, same for x and y
    scale: float  # Affine samples zoom in (1 - scale, 1 + scale)
    rotate: float  # degrees, symmetric
    border_mode: int


_PAPER = _Magnitudes(
    flip_p=0.5,
    intensity_p=0.3,
    brightness=0.2,
    contrast=0.2,
    gamma=20.0,
    distortion_p=0.3,
    elastic_alpha=120.0,
    elastic_sigma=6.0,
    grid_limit=0.3,
    optical_limit=2.0,
    affine_p=0.5,
    translate=(0.2, 0.2),
    scale=0.2,
    rotate=20.0,
    border_mode=cv2.BORDER_CONSTANT,
)

_MAGNITUDES: dict[str, _Magnitudes] = {
    "paper": _PAPER,
    "paper-intended": replace(_PAPER, translate=(-0.2, 0.2)),
    "light": _Magnitudes(
        flip_p=0.5,
        intensity_p=0.3,
        brightness=0.1,
        contrast=0.1,
        gamma=10.0,
        distortion_p=0.2,
        elastic_alpha=60.0,
        elastic_sigma=6.0,
        grid_limit=0.15,
        optical_limit=0.05,
        affine_p=0.5,
        translate=(-0.0625, 0.0625),
        scale=0.1,
        rotate=15.0,
        border_mode=cv2.BORDER_REFLECT_101,
    ),
}


def _scale(m: _Magnitudes, strength: float) -> _Magnitudes:
    s = strength
    return _Magnitudes(
        flip_p=m.flip_p * s,
        intensity_p=m.intensity_p * s,
        brightness=m.brightness * s,
        contrast=m.contrast * s,
        gamma=m.gamma * s,
        distortion_p=m.distortion_p * s,
        elastic_alpha=m.elastic_alpha * s,
        elastic_sigma=m.elastic_sigma,
        grid_limit=m.grid_limit * s,
        optical_limit=m.optical_limit * s,
        affine_p=m.affine_p * s,
        translate=(m.translate[0] * s, m.translate[1] * s),
        scale=m.scale * s,
        rotate=m.rotate * s,
        border_mode=m.border_mode,
    )


def _augmentations(m: _Magnitudes) -> list[A.BasicTransform | A.BaseCompose]:
    border = m.border_mode
    return [
        A.HorizontalFlip(p=m.flip_p),
        A.OneOf(
            [
                A.RandomBrightnessContrast(
                    brightness_limit=(-m.brightness, m.brightness),
                    contrast_limit=(-m.contrast, m.contrast),
                    p=1.0,
                ),
                A.RandomGamma(gamma_limit=(100 - m.gamma, 100 + m.gamma), p=1.0),
            ],
            p=m.intensity_p,
        ),
        A.OneOf(
            [
                A.ElasticTransform(
                    alpha=m.elastic_alpha, sigma=m.elastic_sigma, border_mode=border, p=1.0
                ),
                A.GridDistortion(
                    distort_limit=(-m.grid_limit, m.grid_limit), border_mode=border, p=1.0
                ),
                A.OpticalDistortion(
                    distort_limit=(-m.optical_limit, m.optical_limit), border_mode=border, p=1.0
                ),
            ],
            p=m.distortion_p,
        ),
        A.Affine(
            translate_percent={"x": m.translate, "y": m.translate},
            scale=(1 - m.scale, 1 + m.scale),
            rotate=(-m.rotate, m.rotate),
            border_mode=border,
            fill=0,
            fill_mask=0,
            p=m.affine_p,
        ),
    ]


def _resize(image_size: int) -> A.Resize:
    return A.Resize(height=image_size, width=image_size)


def build_train_transform(preset: str, strength: float, image_size: int,
                          order: str = "resize-first") -> A.Compose:
    """`preset` scaled by `strength` in [0, 1], with the resize to `image_size` squared first
    (``resize-first``) or last (``source-first``)."""
    if order not in AUGMENT_ORDERS:
        raise ValueError(f"unknown augment order {order!r}; expected one of {AUGMENT_ORDERS}")
    if preset not in PRESETS:
        raise ValueError(f"unknown augment preset {preset!r}; expected one of {PRESETS}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"augment strength must be in [0, 1], got {strength}")
    transforms: list[A.BasicTransform | A.BaseCompose] = []
    if preset != "none":
        transforms = _augmentations(_scale(_MAGNITUDES[preset], strength))
    if order == "resize-first":
        return A.Compose([_resize(image_size), *transforms], strict=True)
    return A.Compose([*transforms, _resize(image_size)], strict=True)


def build_eval_transform(image_size: int) -> A.Compose:
    """Resize to `image_size` squared; nothing random."""
    return A.Compose([_resize(image_size)], strict=True)


def _walk(transform: A.BasicTransform | A.BaseCompose) -> Iterator[Any]:
    yield transform
    if isinstance(transform, A.BaseCompose):
        for child in transform.transforms:
            yield from _walk(child)


def seed_transform(compose: A.BaseCompose, seed: int) -> None:
    """Seed `compose` reproducibly, giving it and every nested transform an independent stream."""
    nodes = list(_walk(compose))
    for node, sequence in zip(nodes, np.random.SeedSequence(seed).spawn(len(nodes)), strict=True):
        node.set_random_seed(int(sequence.generate_state(1)[0]))


def serialize(compose: A.Compose) -> dict[str, Any]:
    """The pipeline as albumentations' `to_dict`, in plain JSON types (log it with the run)."""
    return json.loads(json.dumps(A.to_dict(compose)))


def deserialize(data: dict[str, Any]) -> A.Compose:
    """Rebuild a pipeline from `serialize` output, with strict argument checking on."""
    compose = A.from_dict(data)
    compose.strict = True
    return compose
