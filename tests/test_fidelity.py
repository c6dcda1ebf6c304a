"""The study's protocol, exactly: augmentation order, split, input scaling and the BT/RT search.

Each switch is checked against the study's code as written (see docs/fidelity.md), not against
ptxlab's own description of it.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch

from ptxlab.augment import build_train_transform, seed_transform
from ptxlab.config import Config, ConfigError, load_config
from ptxlab.data.cases import Case
from ptxlab.data.dataset import SegmentationDataset, random_split
from ptxlab.experiment import prepare_data
from ptxlab.model import InputNormalizer
from ptxlab.postprocess import PAPER_GRID, search_subset, search_threshold
from tests.conftest import TINY_RUN

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
DOCS = Path(__file__).parents[1] / "docs"


def _study_pipeline() -> A.Compose:
    """The study's `train.py` augmentation, written as it wrote it (A.Resize last)."""
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.OneOf([A.RandomBrightnessContrast(p=0.3), A.RandomGamma(p=0.3)], p=0.3),
        A.OneOf([A.ElasticTransform(alpha=120, sigma=6, p=0.3), A.GridDistortion(p=0.3),
                 A.OpticalDistortion(distort_limit=2, p=0.3)], p=0.3),
        A.Affine(translate_percent={"x": 0.2, "y": 0.2}, scale=(0.8, 1.2), rotate=(-20, 20),
                 border_mode=cv2.BORDER_CONSTANT, p=0.5),
        A.Resize(512, 512),
    ])


def _radiograph_1024() -> tuple[np.ndarray, np.ndarray]:
    """A textured 1024² grayscale image with a round lesion mask in {0, 1}."""
    yy, xx = np.mgrid[0:1024, 0:1024]
    noise = np.random.default_rng(0).normal(0, 10, (1024, 1024))
    image = 127 + 60 * np.sin(xx / 37.0) + 40 * np.cos(yy / 23.0) + noise
    mask = ((xx - 600) ** 2 + (yy - 400) ** 2) < 150**2
    return image.clip(0, 255).astype(np.uint8), mask.astype(np.uint8)


def test_source_first_augments_at_1024_exactly_as_the_study_pipeline():
    image, mask = _radiograph_1024()
    case = Case("a", Path("a.png"), positive=True)
    study = _study_pipeline()
    outputs = {}
    for order in ("source-first", "resize-first"):
        transform = build_train_transform("paper", 1.0, 512, order)
        dataset = SegmentationDataset([case] * 12, lambda _: (image, mask), transform, seed=42)
        dataset.set_epoch(3)
        outputs[order] = [dataset[index] for index in range(12)]
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)  # the study read PNGs as 3-channel colour
    differs = 0
    for index in range(12):
        # the dataset seeds its pipeline from (seed, epoch, index); seed the study's alike
        seed_transform(study, int(np.random.SeedSequence([42, 3, index]).generate_state(1)[0]))
        want = study(image=rgb, mask=mask * 255)
        got_image, got_mask, _ = outputs["source-first"][index]
        for channel in range(3):
            np.testing.assert_array_equal(got_image[0].numpy(), want["image"][..., channel])
        np.testing.assert_array_equal(got_mask[0].numpy().astype(bool), want["mask"] > 127)
        resized_first = outputs["resize-first"][index][0][0].numpy()
        differs += not np.array_equal(resized_first, want["image"][..., 0])
    assert differs >= 10  # only an image that drew no transform at all can coincide


def test_source_first_caches_at_the_source_size_and_resizes_last(isolated_store):
    config = load_config(None, TINY_RUN + ["data.synthetic.size=128", "augment.preset=paper",
                                           "augment.order=source-first"])
    data = prepare_data(config, progress=False)
    cached_image, _ = data.train.load(data.train.cases[0])
    assert cached_image.shape == (128, 128)  # the source's resolution, not data.image_size
    assert isinstance(data.train.transform.transforms[-1], A.Resize)
    assert data.train[0][0].shape == data.val[0][0].shape == (1, 64, 64)
    sized = load_config(None, TINY_RUN + ["data.synthetic.size=128", "data.cache_size=96",
                                          "augment.order=source-first"])
    assert prepare_data(sized, progress=False).train.load(data.train.cases[0])[0].shape == (96, 96)


def test_random_split_is_sklearn_train_test_split_over_file_names():
    model_selection = pytest.importorskip("sklearn.model_selection")
    cases = [Case(f"id{i}", Path(f"{(i * 37) % 101:03d}.png"), positive=i % 5 == 0)
             for i in range(101)]
    train, val = random_split(cases, 0.15, seed=42)
    names = sorted(case.image.name for case in cases)
    want_train, want_val = model_selection.train_test_split(names, test_size=0.15,
                                                            random_state=42, shuffle=True)
    assert [c.image.name for c in train] == want_train
    assert [c.image.name for c in val] == want_val
    assert len(val) == math.ceil(0.15 * 101)


def test_data_split_random_is_used_and_reproducible_from_the_seed(isolated_store):
    def validation(seed: int) -> list[str]:
        config = load_config(None, TINY_RUN + ["data.split=random", f"seed={seed}"])
        return [case.case_id for case in prepare_data(config, progress=False).val.cases]

    assert validation(42) == validation(42) != validation(43)
    with pytest.raises(ConfigError, match="data.split=random is a single split"):
        load_config(None, ["data.split=random", "data.folds=5"])


def test_search_subset_is_the_studys_seeded_choice():
    np.testing.assert_array_equal(search_subset(1800, 256, 42),
                                  np.random.RandomState(42).choice(1800, 256, replace=False))
    np.testing.assert_array_equal(search_subset(100, 256, 42),
                                  np.random.RandomState(42).choice(100, 100, replace=False))
    np.testing.assert_array_equal(search_subset(7, None, 42), np.arange(7))


def test_paper_grid_is_the_scripts_grid_and_is_never_widened():
    assert np.allclose(PAPER_GRID["thresholds"], np.linspace(0.05, 0.5, 10))
    assert PAPER_GRID["min_areas"] == (0, 256, 512, 1024, 2048, 4096)
    # the best point sits on the top edge of BT: the auto grid would widen it, paper must not
    rng = np.random.default_rng(1)
    truths = rng.random((6, 64, 64)) < 0.3
    probs = np.where(truths, 0.95, 0.47).astype(np.float32)  # only BT 0.5 drops background
    auto = search_threshold(probs, truths, resolution=64)
    paper = search_threshold(probs, truths, resolution=64, **PAPER_GRID)
    assert auto.widened and not paper.widened
    assert len(paper.table) == 60 and paper.best.threshold == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="grid=paper"):
        load_config(None, ["postprocess.grid=paper", "postprocess.rule=triplet"])


def test_unit_input_scaling_is_pixels_over_255_in_three_channels():
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    unit = InputNormalizer("tu-tf_efficientnet_lite0", "unit")(images)
    assert unit.shape == (2, 3, 8, 8)
    torch.testing.assert_close(unit, images.float().expand(-1, 3, -1, -1) / 255.0)
    encoder = InputNormalizer("tu-tf_efficientnet_lite0")(images)
    assert not torch.allclose(encoder, unit)


@pytest.mark.slow  # starts a process
def test_paper_yaml_switches_every_protocol_key_to_the_studys():
    shown = subprocess.run([sys.executable, "-m", "ptxlab", "config", "show",
                            str(EXPERIMENTS / "paper.yaml"), "--format", "json"],
                           capture_output=True, text=True, check=True).stdout
    config = json.loads(shown)
    assert config["augment"]["order"] == "source-first"
    assert config["data"]["split"] == "random"
    assert config["postprocess"]["search_images"] == 256
    assert config["postprocess"]["grid"] == "paper"
    assert config["model"]["input_scaling"] == "unit"


def _schema_has(dotted: str) -> bool:
    section: type = Config
    for part in dotted.split("."):
        fields = getattr(section, "model_fields", {})
        if part not in fields:
            return False
        section = fields[part].annotation
    return True


def test_every_key_in_docs_fidelity_exists_in_the_config_schema():
    rows = [line for line in (DOCS / "fidelity.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| element")]
    keys = set()
    for row in rows:
        ptxlab_column = row.split(" | ")[2]
        for token in re.findall(r"`([^`]+)`", ptxlab_column):
            key = token.split(":")[0].strip()
            if ":" in token or "." in key:  # `key: value` or `section.key`; not metric names
                keys.add(key)
    assert len(keys) >= 30, sorted(keys)
    assert [key for key in sorted(keys) if not _schema_has(key)] == []
    assert "docs/fidelity.md" in (DOCS.parent / "README.md").read_text()
