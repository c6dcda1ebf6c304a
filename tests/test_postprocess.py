"""Post-processing rules, the fast grid searches against a naive loop, and map storage."""

import cv2
import numpy as np
import pytest

from ptxlab.metrics import MetricAccumulator
from ptxlab.postprocess import (
    DEFAULT_THRESHOLDS,
    PostProcessing,
    apply,
    choose,
    load_probability_maps,
    quantise,
    save_probability_maps,
    search_gate,
    search_threshold,
    search_triplet,
)


def smooth_maps(seed: int = 0, n: int = 10, size: int = 48):
    """Blurred-noise probability maps in [0, 1] and truths from a correlated blurred field."""
    rng = np.random.default_rng(seed)

    def blurred(sigma: float) -> np.ndarray:
        fields = [cv2.GaussianBlur(rng.random((size, size)), (0, 0), sigma) for _ in range(n)]
        fields = np.stack(fields)
        return (fields - fields.min()) / (fields.max() - fields.min())

    probs = blurred(2.0).astype(np.float32)
    truths = (0.7 * probs + 0.3 * blurred(3.0)) > 0.58
    truths[:3] = False  # negative images
    return probs, truths


def naive_score(probs, truths, pp: PostProcessing, objective: str) -> float:
    accumulator = MetricAccumulator()
    accumulator.update(np.stack([apply(p, pp) for p in probs]), truths)
    return accumulator.compute()[objective]


def test_apply_removes_small_components_with_8_connectivity():
    probs = np.zeros((8, 8), dtype=np.float32)
    probs[0, 0] = probs[1, 1] = probs[2, 2] = 0.9  # 3 pixels, connected only diagonally
    probs[5, 5] = probs[5, 6] = 0.9  # 2 pixels
    probs[7, 0] = 0.5  # on the threshold: not foreground (strict >)
    mask = apply(probs, PostProcessing(threshold=0.5, min_area=3, resolution=8))
    assert mask.dtype == np.uint8
    assert np.array_equal(np.argwhere(mask), [[0, 0], [1, 1], [2, 2]])
    assert apply(probs, PostProcessing(threshold=0.5, min_area=0, resolution=8)).sum() == 5


def test_apply_scales_min_area_with_resolution():
    probs = np.zeros((64, 64), dtype=np.float32)
    probs[0:2, 0:2] = 0.9  # 4 pixels
    probs[10, 10:13] = 0.9  # 3 pixels
    # 1 pixel at 32 x 32 is 4 pixels at 64 x 64
    mask = apply(probs, PostProcessing(threshold=0.5, min_area=1, resolution=32))
    assert mask.sum() == 4 and mask[0:2, 0:2].all()
    assert apply(probs, PostProcessing(threshold=0.5, min_area=1, resolution=64)).sum() == 7


def test_uint8_maps_threshold_like_their_float_values():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for threshold in DEFAULT_THRESHOLDS + (0.6, 0.7, 0.9):
        pp = PostProcessing(threshold=threshold)
        assert np.array_equal(apply(levels, pp), apply(levels / 255.0, pp)), threshold


def test_triplet_empties_image_when_top_area_too_small():
    probs = np.zeros((16, 16), dtype=np.float32)
    probs[2:8, 2:8] = 0.5  # 36 pixels above the bottom threshold
    probs[4:6, 4:6] = 0.9  # 4 pixels above the top threshold
    rule = dict(top_threshold=0.8, bottom_threshold=0.3, resolution=16)
    kept = apply(probs, PostProcessing("triplet", min_top_area=4, **rule))
    assert kept.sum() == 36 and kept[2:8, 2:8].all()
    assert apply(probs, PostProcessing("triplet", min_top_area=5, **rule)).sum() == 0
    # at 8 x 8, 1 pixel is 4 pixels of this 16 x 16 map and 2 are 8
    coarse = {**rule, "resolution": 8}
    assert apply(probs, PostProcessing("triplet", min_top_area=1, **coarse)).sum() == 36
    assert apply(probs, PostProcessing("triplet", min_top_area=2, **coarse)).sum() == 0


@pytest.mark.parametrize("objective", ["pooled_iou", "mean_dice"])
@pytest.mark.parametrize("quantised", [False, True])
def test_threshold_search_matches_naive_loop(objective, quantised):
    probs, truths = smooth_maps()
    probs = quantise(probs) if quantised else probs
    grid = dict(thresholds=[0.3, 0.4, 0.5, 0.6, 0.7], min_areas=[0, 4, 16, 48, 96, 160])
    result = search_threshold(probs, truths, objective, resolution=48, widen=False, **grid)
    assert len(result.table) == 30 and not result.widened
    for row in result.table:
        pp = PostProcessing(
            threshold=row["threshold"], min_area=int(row["min_area"]), resolution=48
        )
        assert row["score"] == pytest.approx(naive_score(probs, truths, pp, objective), abs=1e-12)
    best_row = max(result.table, key=lambda row: row["score"])  # first maximum, ascending params
    assert (result.best.threshold, result.best.min_area) == (
        best_row["threshold"],
        best_row["min_area"],
    )
    assert (
        result.best_score == best_row["score"] == naive_score(probs, truths, result.best, objective)
    )
    # the score table must vary with RT, or the comparison would not test component removal
    assert len({round(row["score"], 12) for row in result.table if row["threshold"] == 0.5}) > 2


@pytest.mark.parametrize("objective", ["pooled_iou", "mean_dice"])
@pytest.mark.parametrize("quantised", [False, True])
def test_triplet_search_matches_naive_loop(objective, quantised):
    probs, truths = smooth_maps(seed=1)
    probs = quantise(probs) if quantised else probs
    grid = dict(
        top_thresholds=[0.6, 0.7, 0.8], min_top_areas=[0, 8, 32, 96], bottom_thresholds=[0.4, 0.5]
    )
    result = search_triplet(probs, truths, objective, resolution=48, widen=False, **grid)
    assert len(result.table) == 24
    for row in result.table:
        pp = PostProcessing(
            "triplet",
            top_threshold=row["top_threshold"],
            min_top_area=int(row["min_top_area"]),
            bottom_threshold=row["bottom_threshold"],
            resolution=48,
        )
        assert row["score"] == pytest.approx(naive_score(probs, truths, pp, objective), abs=1e-12)
    assert result.best_score == max(row["score"] for row in result.table)
    assert result.best.kind == "triplet"


def test_threshold_search_widens_below_the_lowest_threshold():
    probs, truths = smooth_maps(seed=2)
    # best threshold of these maps is about 0.6, so about 0.03 once scaled by 0.05
    underconfident = (probs * 0.05).astype(np.float32)
    narrow = search_threshold(underconfident, truths, resolution=48, widen=False)
    assert narrow.best.threshold == 0.05 and not narrow.widened
    wide = search_threshold(underconfident, truths, resolution=48)
    assert wide.widened and wide.widenings[0].startswith("threshold: best 0.05 on the lower edge")
    assert wide.best.threshold < 0.05 and wide.best_score > narrow.best_score
    thresholds = sorted({row["threshold"] for row in wide.table})
    assert thresholds[:5] == [0.01, 0.02, 0.03, 0.04, 0.05]
    assert len(wide.table) == len(thresholds) * len({row["min_area"] for row in wide.table})


def test_threshold_search_widens_above_with_a_bound():
    probs, truths = smooth_maps(seed=3)
    truths = probs > 0.82
    once = search_threshold(probs, truths, resolution=48, max_widenings=1)
    assert once.widened and once.best.threshold == 0.7  # edge of the once-widened grid
    free = search_threshold(probs, truths, resolution=48)
    assert free.best.threshold == pytest.approx(0.8) and free.best_score > once.best_score
    assert len(free.widenings) == 2


def test_postprocessing_round_trips_through_dict():
    for pp in (
        PostProcessing(threshold=0.05, min_area=0),
        PostProcessing("triplet", top_threshold=0.75, min_top_area=2048, bottom_threshold=0.4),
    ):
        assert PostProcessing.from_dict(pp.to_dict()) == pp
    assert PostProcessing("triplet").to_dict().keys() == {
        "kind",
        "top_threshold",
        "min_top_area",
        "bottom_threshold",
        "resolution",
    }
    with pytest.raises(ValueError):
        PostProcessing("tiled")


def test_probability_maps_round_trip(tmp_path):
    probs, _ = smooth_maps(n=4, size=16)
    path = tmp_path / "val_probs"  # no suffix added
    save_probability_maps(path, ["a", "b", "c", "d"], probs)
    stored = load_probability_maps(path)
    assert stored.ids == ["a", "b", "c", "d"]
    loaded = stored.probs
    assert loaded.dtype == np.uint8 and np.array_equal(loaded, np.rint(probs * 255))
    assert np.abs(loaded / 255.0 - probs).max() <= 0.5 / 255 + 1e-7
    assert stored.truths is None and stored.head_probs is None
    with pytest.raises(ValueError):
        save_probability_maps(path, ["a"], probs)


def test_truths_and_head_probabilities_are_stored_with_the_maps(tmp_path):
    probs, truths = smooth_maps(n=6, size=13)  # a width that is not a multiple of 8
    assert truths[3:].any()
    head = np.linspace(0.1, 0.9, 6)
    ids = list("abcdef")
    path = tmp_path / "val.npz"
    save_probability_maps(path, ids, probs, truths, head)
    stored = load_probability_maps(path)
    assert stored.truths.dtype == bool and np.array_equal(stored.truths, truths)
    assert np.allclose(stored.head_probs, head)
    with pytest.raises(ValueError, match="truths"):
        save_probability_maps(path, ids, probs, truths[:, :4])


def test_choose_keeps_a_fixed_rule_and_otherwise_takes_the_search_optimum():
    probs, truths = quantise(smooth_maps()[0]), smooth_maps()[1]
    configured = PostProcessing("triplet", top_threshold=0.6, resolution=48)
    kept = choose(probs, truths, configured, False, "pooled_iou", "area")
    assert kept.rule == configured and kept.search is None and kept.gate_search is None
    searched = choose(probs, truths, configured, True, "mean_dice", "none")
    assert searched.search == search_triplet(probs, truths, "mean_dice", resolution=48)
    assert searched.rule == searched.search.best and searched.gate_search is None
    gated = choose(probs, truths, configured, True, "mean_dice", "area")
    assert gated.gate_search == search_gate(probs, truths, searched.rule, "area",
                                            objective="mean_dice")
    assert gated.rule == gated.gate_search.best and gated.rule.gate == "area"


def test_search_heatmap_places_every_score_of_the_table():
    probs, truths = smooth_maps()
    result = search_threshold(probs, truths, "pooled_iou", resolution=48, widen=False,
                              thresholds=[0.3, 0.5, 0.7], min_areas=[0, 16, 96])
    heatmap = result.heatmap()
    assert heatmap.thresholds == [0.3, 0.5, 0.7] and heatmap.areas == [0, 16, 96]
    for row in result.table:
        i, j = heatmap.thresholds.index(row["threshold"]), heatmap.areas.index(row["min_area"])
        assert heatmap.scores[i, j] == row["score"]
    row, column = heatmap.best
    assert (heatmap.thresholds[row], heatmap.areas[column]) == (
        result.best.threshold, result.best.min_area)
    assert heatmap.scores[heatmap.best] == result.best_score
