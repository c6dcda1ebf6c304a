"""The names each choice of a run can take, each vocabulary defined once.

A vocabulary is a `Literal` type (the config schema and annotations use it) and the tuple of
its values (`get_args`), which dispatch tables, error messages and CLI help use. The module that
implements a vocabulary keeps one dispatch table keyed by exactly these names (tests check
this), so adding a layout, preset, rule, gate or objective means adding its name here and its
entry there. This module imports nothing of ptxlab, so the CLI can show the names cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

# data/layouts.py: how a published data set is laid out on disk.
Layout = Literal["siim-png", "siim-dicom", "ptx498", "folder"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
LayoutChoice = Literal["auto", Layout]  # a layout, or "auto": detect it
LAYOUT_CHOICES: tuple[str, ...] = get_args(LayoutChoice)

# augment.py: training augmentation presets, and where the resize to the training size
# happens: before the augmentation, or after it (the study's order).
Preset = Literal["none", "light", "paper", "paper-intended"]
PRESETS: tuple[str, ...] = get_args(Preset)
AugmentOrder = Literal["resize-first", "source-first"]
AUGMENT_ORDERS: tuple[str, ...] = get_args(AugmentOrder)

# data/dataset.py: how the train/validation split is drawn.
Split = Literal["stratified", "random"]
SPLITS: tuple[str, ...] = get_args(Split)

# model.py: what the network's input is scaled with.
InputScaling = Literal["encoder", "unit"]
INPUT_SCALINGS: tuple[str, ...] = get_args(InputScaling)

# postprocess.py: how a probability map becomes a mask, the image-level gate on top of it, and
# what a post-processing search maximises.
Rule = Literal["threshold", "triplet"]
RULES: tuple[str, ...] = get_args(Rule)
Gate = Literal["none", "head", "area"]
GATES: tuple[str, ...] = get_args(Gate)
Objective = Literal["pooled_iou", "mean_dice"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
SearchGrid = Literal["auto", "paper"]  # ptxlab's widening grid, or the study's exact one
SEARCH_GRIDS: tuple[str, ...] = get_args(SearchGrid)

# inference.py: test-time augmentation.
TtaMode = Literal["none", "hflip"]
TTA_MODES: tuple[str, ...] = get_args(TtaMode)


def spoken(names: Sequence[str]) -> str:
    """Names as a reader says them in help text: "a, b, c or d"."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
