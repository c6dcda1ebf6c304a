"""Augmentation presets: strength scaling, serialisation round trip, the paper's fixed shift."""

from __future__ import annotations

import json

import albumentations as A
import cv2
import numpy as np
import pytest

from ptxlab.augment import (
    PRESETS,
    build_eval_transform,
    build_train_transform,
    deserialize,
    seed_transform,
    serialize,
)

SIZE = 96


def _sample(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured 120x110 uint8 image with a binary blob mask (non-square, so resizing matters)."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur((rng.random((120, 110)) * 255).astype(np.uint8), (5, 5), 0)
    mask = np.zeros((120, 110), np.uint8)
    cv2.circle(mask, (40 + seed % 30, 60), 18, 1, -1)
    return image, mask


def _run(transform: A.Compose, seed: int, n: int = 6) -> list[dict[str, np.ndarray]]:
    seed_transform(transform, seed)
    return [transform(image=img, mask=msk) for img, msk in map(_sample, range(n))]


def _affine(transform: A.Compose) -> A.Affine:
    (affine,) = [t for t in transform.transforms if isinstance(t, A.Affine)]
    return affine


def _shift_only(affine: A.Affine) -> A.Compose:
    """The preset's Affine with rotation and scaling switched off and p=1."""
    affine.scale = {"x": (1.0, 1.0), "y": (1.0, 1.0)}
    affine.rotate = (0.0, 0.0)
    affine.p = 1.0
    return A.Compose([affine], strict=True)


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("strength", [0.0, 0.4, 1.0])
def test_serialised_pipeline_round_trips(preset: str, strength: float) -> None:
    transform = build_train_transform(preset, strength, SIZE)
    data = serialize(transform)
    assert json.loads(json.dumps(data)) == data
    rebuilt = deserialize(data)
    assert rebuilt.strict
    assert serialize(rebuilt) == data
    for a, b in zip(_run(transform, 11), _run(rebuilt, 11), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])


@pytest.mark.parametrize("preset", PRESETS)
def test_strength_zero_is_resize_only(preset: str) -> None:
    resize_only = build_eval_transform(SIZE)
    for seed in (0, 1):
        augmented = _run(build_train_transform(preset, 0.0, SIZE), seed)
        for out, ref in zip(augmented, _run(resize_only, seed), strict=True):
            assert out["image"].shape == (SIZE, SIZE)
            np.testing.assert_array_equal(out["image"], ref["image"])
            np.testing.assert_array_equal(out["mask"], ref["mask"])


@pytest.mark.parametrize("preset", ["light", "paper", "paper-intended"])
def test_nonzero_strength_changes_images(preset: str) -> None:
    outputs = _run(build_train_transform(preset, 1.0, SIZE), seed=5, n=8)
    references = _run(build_eval_transform(SIZE), seed=5, n=8)
    changed = [
        not np.array_equal(o["image"], r["image"]) for o, r in zip(outputs, references, strict=True)
    ]
    assert sum(changed) >= 4


def test_seed_transform_is_reproducible_and_decorrelates_transforms() -> None:
    """Two p=0.5 flips cancel out when they share one stream (albumentations' own seeding)."""
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    double_flip = A.Compose([A.HorizontalFlip(p=0.5), A.HorizontalFlip(p=0.5)], strict=True)

    def flipped(n: int = 40) -> list[bool]:
        return [not np.array_equal(double_flip(image=image)["image"], image) for _ in range(n)]

    double_flip.set_random_seed(0)
    assert not any(flipped())
    seed_transform(double_flip, 0)
    first = flipped()
    seed_transform(double_flip, 0)
    assert flipped() == first
    assert 5 < sum(first) < 35


def test_full_strength_paper_is_the_study_pipeline() -> None:
    study = A.Compose(
        [
            A.Resize(512, 512),
            A.HorizontalFlip(p=0.5),
            A.OneOf([A.RandomBrightnessContrast(p=1), A.RandomGamma(p=1)], p=0.3),
            A.OneOf(
                [
                    A.ElasticTransform(alpha=120, sigma=6, p=1),
                    A.GridDistortion(p=1),
                    A.OpticalDistortion(distort_limit=2, p=1),
                ],
                p=0.3,
            ),
            A.Affine(
                translate_percent={"x": 0.2, "y": 0.2},
                scale=(0.8, 1.2),
                rotate=(-20, 20),
                border_mode=cv2.BORDER_CONSTANT,
                p=0.5,
            ),
        ],
        strict=True,
    )
    assert serialize(build_train_transform("paper", 1.0, 512)) == serialize(study)


def test_strength_scales_magnitudes_and_probabilities_linearly() -> None:
    full = serialize(build_train_transform("paper-intended", 1.0, SIZE))["transform"]["transforms"]
    half = serialize(build_train_transform("paper-intended", 0.5, SIZE))["transform"]["transforms"]
    assert [t["__class_fullname__"] for t in half] == [t["__class_fullname__"] for t in full]
    _, flip, intensity, distortion, affine = half
    assert flip["p"] == 0.25 and intensity["p"] == 0.15 and distortion["p"] == 0.15
    brightness_contrast, gamma = intensity["transforms"]
    assert brightness_contrast["brightness_limit"] == pytest.approx([-0.1, 0.1])
    assert gamma["gamma_limit"] == pytest.approx([90, 110])
    elastic, grid, optical = distortion["transforms"]
    assert (elastic["alpha"], elastic["sigma"]) == (60, 6)
    assert grid["distort_limit"] == pytest.approx([-0.15, 0.15])
    assert optical["distort_limit"] == pytest.approx([-1.0, 1.0])
    assert affine["p"] == 0.25
    assert affine["translate_percent"]["x"] == pytest.approx([-0.1, 0.1])
    assert affine["scale"]["y"] == pytest.approx([0.9, 1.1])
    assert affine["rotate"] == pytest.approx([-10, 10])


def test_paper_affine_shift_is_fixed_plus_twenty_percent() -> None:
    affine = _affine(build_train_transform("paper", 1.0, SIZE))
    assert affine.translate_percent == {"x": (0.2, 0.2), "y": (0.2, 0.2)}
    shift_only = _shift_only(affine)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[20:30, 10:26] = 1
    for seed in range(5):
        seed_transform(shift_only, seed)
        moved = shift_only(image=mask * 255, mask=mask)["mask"]
        expected = np.zeros_like(mask)
        d = int(0.2 * SIZE)
        expected[20 + d : 30 + d, 10 + d : 26 + d] = 1
        np.testing.assert_array_equal(moved, expected)


def test_paper_intended_shifts_both_ways() -> None:
    affine = _affine(build_train_transform("paper-intended", 1.0, SIZE))
    assert affine.translate_percent == {"x": (-0.2, 0.2), "y": (-0.2, 0.2)}
    shift_only = _shift_only(affine)
    seed_transform(shift_only, 3)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[40:56, 40:56] = 1
    shifts = np.array(
        [_centroid(shift_only(image=mask, mask=mask)["mask"]) - _centroid(mask) for _ in range(40)]
    )
    assert np.abs(shifts).max() <= 0.2 * SIZE + 1
    for axis in (0, 1):
        assert shifts[:, axis].min() < -3 and shifts[:, axis].max() > 3


@pytest.mark.parametrize("preset", ["light", "paper", "paper-intended"])
def test_masks_stay_binary_and_uint8(preset: str) -> None:
    for out in _run(build_train_transform(preset, 1.0, SIZE), seed=2, n=12):
        assert out["image"].dtype == np.uint8 and out["mask"].dtype == np.uint8
        assert set(np.unique(out["mask"])) <= {0, 1}


def test_eval_transform_resizes_only() -> None:
    image, mask = _sample(0)
    out = build_eval_transform(64)(image=image, mask=mask)
    np.testing.assert_array_equal(
        out["image"], cv2.resize(image, (64, 64), interpolation=cv2.INTER_LINEAR)
    )
    np.testing.assert_array_equal(
        out["mask"], cv2.resize(mask, (64, 64), interpolation=cv2.INTER_NEAREST)
    )


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown augment preset"):
        build_train_transform("heavy", 1.0, SIZE)
    with pytest.raises(ValueError, match="strength"):
        build_train_transform("paper", 1.5, SIZE)
