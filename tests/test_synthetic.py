"""The embedded phantom data: deterministic, labelled correctly, readable as a folder layout."""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
import pytest

from ptxlab.data.io import read_image, read_mask
from ptxlab.data.synthetic import SyntheticSpec, is_positive, materialize, render_case


def test_same_seed_same_pixels_other_seed_other_pixels():
    first = render_case(np.random.default_rng([3, 1, 0]), 128, True)
    again = render_case(np.random.default_rng([3, 1, 0]), 128, True)
    other = render_case(np.random.default_rng([4, 1, 0]), 128, True)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_negatives_have_empty_masks_and_positives_a_plausible_region():
    for index in range(8):
        image, mask = render_case(np.random.default_rng([5, 1, index]), 256, positive=False)
        assert image.dtype == np.uint8 and image.shape == (256, 256)
        assert mask.dtype == np.uint8 and not mask.any()
        image, mask = render_case(np.random.default_rng([5, 1, index]), 256, positive=True)
        assert set(np.unique(mask)) == {0, 1}
        assert 100 < mask.sum() < 0.1 * mask.size  # a crescent, not the whole lung
        assert cv2.connectedComponents(mask)[0] - 1 >= 1


def test_pneumothorax_is_more_radiolucent_than_the_lung_around_it():
    for index in range(8):
        image, mask = render_case(np.random.default_rng([6, 1, index]), 256, positive=True)
        inside = cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
        ring = (cv2.dilate(mask, np.ones((9, 9), np.uint8))
                - cv2.dilate(mask, np.ones((3, 3), np.uint8))).astype(bool)
        assert image[inside].mean() < image[ring].mean() - 20


def test_positive_fraction_is_exact_and_deterministic():
    spec = SyntheticSpec(n_images=40, positive_fraction=0.25, size=64, seed=1)
    labels = [is_positive(spec, i) for i in range(spec.n_images)]
    assert sum(labels) == 10
    assert labels == [is_positive(spec, i) for i in range(spec.n_images)]


def test_materialize_writes_a_folder_layout_once(tmp_path):
    spec = SyntheticSpec(n_images=6, positive_fraction=0.5, size=64, seed=2)
    cases = materialize(spec, tmp_path, progress=False)
    target = cases[0].image.parents[1]
    assert sorted(p.name for p in target.iterdir()) == ["COMPLETE", "images", "masks"]
    for case in cases:
        image = read_image(case)
        mask = read_mask(case, image.shape)
        assert image.shape == (64, 64)
        assert bool(mask.any()) == case.positive
    stamp = cases[0].image.stat().st_mtime_ns
    assert materialize(spec, tmp_path, progress=False) == cases
    assert cases[0].image.stat().st_mtime_ns == stamp  # not regenerated


@pytest.mark.slow
def test_processes_asking_at_once_get_one_complete_copy(tmp_path):
    spec = SyntheticSpec(n_images=30, positive_fraction=0.5, size=96, seed=7)
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(materialize, [spec] * 3, [tmp_path] * 3, [False] * 3))
    assert results[0] == results[1] == results[2]
    folders = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert folders == [f"synthetic-{spec.digest()}"]  # no temporary copy left behind
    for case in results[0]:
        assert read_image(case).shape == (96, 96)
