"""Each vocabulary is defined once (ptxlab/vocabulary.py) and every table that dispatches on it
has exactly one entry per name: adding a name without its implementation fails here."""

from typing import get_args

from ptxlab import augment, postprocess
from ptxlab.config import AugmentConfig, DataConfig, ModelConfig, PostprocessConfig
from ptxlab.data import layouts
from ptxlab.vocabulary import (
    AUGMENT_ORDERS,
    GATES,
    INPUT_SCALINGS,
    LAYOUT_CHOICES,
    LAYOUTS,
    OBJECTIVES,
    PRESETS,
    RULES,
    SEARCH_GRIDS,
    SPLITS,
    spoken,
)


def allowed(section, field: str) -> tuple[str, ...]:
    return get_args(section.model_fields[field].annotation)


def test_the_config_schema_takes_exactly_each_vocabulary():
    assert allowed(DataConfig, "layout") == allowed(DataConfig, "test_layout") == LAYOUT_CHOICES
    assert LAYOUT_CHOICES == ("auto", *LAYOUTS)
    assert allowed(AugmentConfig, "preset") == PRESETS
    assert allowed(PostprocessConfig, "rule") == RULES
    assert allowed(PostprocessConfig, "objective") == OBJECTIVES
    assert allowed(ModelConfig, "gate") == GATES
    assert allowed(AugmentConfig, "order") == AUGMENT_ORDERS
    assert allowed(DataConfig, "split") == SPLITS
    assert allowed(ModelConfig, "input_scaling") == INPUT_SCALINGS
    assert allowed(PostprocessConfig, "grid") == SEARCH_GRIDS


def test_every_dispatch_table_has_one_entry_per_name():
    assert tuple(layouts._SCANNERS) == tuple(layouts._DETECTORS) == LAYOUTS
    assert {"none", *augment._MAGNITUDES} == set(PRESETS) and "none" not in augment._MAGNITUDES
    assert tuple(postprocess._RULE_MASKS) == tuple(postprocess.SEARCHES) == RULES
    assert tuple(postprocess._RULE_PARAMETERS) == RULES
    assert tuple(postprocess._GATE_PARAMETERS) == GATES
    assert tuple(postprocess._OBJECTIVE_SCORES) == OBJECTIVES


def test_help_text_lists_names_as_a_reader_says_them():
    assert spoken(LAYOUT_CHOICES) == "auto, siim-png, siim-dicom, ptx498 or folder"
    assert spoken(("none",)) == "none"
