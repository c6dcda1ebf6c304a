"""`ptxlab report`: estimates over repeats, verdicts that follow from the numbers, outputs."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from scipy import stats
from typer.testing import CliRunner

from ptxlab.cli import app
from ptxlab.report import PREAMBLE_MARKER, decide, difference, estimate, write_report
from ptxlab.sweep import load_study_file, open_study, resolve_storage

ROOT = Path(__file__).parents[1]

LRS = (0.003, 1.0e-7)
PRESETS = ("none", "light")
REPEAT_NOISE = (0.0, 0.02, -0.015)  # shared by every configuration of a repeat (its seed)
HYPOTHESES = [
    {"name": "lr 3e-3 beats 1e-7", "compare": {"optim.lr": 0.003},
     "against": {"optim.lr": 1.0e-7}, "expect": "greater"},
    {"name": "light beats none", "compare": {"augment.preset": "light"},
     "against": {"augment.preset": "none"}, "expect": "greater"},
    {"name": "AUC within 0.01 whatever the preset", "metric": "auc",
     "compare": {"augment.preset": "light"}, "against": {"augment.preset": "none"},
     "expect": "equal", "margin": 0.01},
    {"name": "the LR leaves per-image Dice within 0.02", "metric": "best_val_mean_dice",
     "compare": {"optim.lr": 0.003}, "against": {"optim.lr": 1.0e-7},
     "expect": "equal", "margin": 0.02},
    {"name": "the best light configuration beats the best none", "aggregate": "best",
     "compare": {"augment.preset": "light"}, "against": {"augment.preset": "none"},
     "expect": "greater"},
]


def synthetic_metrics(lr: float, preset: str, repeat: int, rng: np.random.Generator) -> dict:
    """+0.10 pooled IoU for the larger LR, -0.08 for light augmentation, per-repeat noise;
    per-image Dice that ignores both factors; an AUC drowned in per-trial noise."""
    pooled = (0.5 + 0.10 * (lr == 0.003) - 0.08 * (preset == "light") + REPEAT_NOISE[repeat]
              + rng.uniform(-0.004, 0.004))
    return {"pooled_iou": pooled, "mean_dice": 0.6 + REPEAT_NOISE[repeat]
            + rng.uniform(-0.001, 0.001), "auc": 0.8 + rng.uniform(-0.15, 0.15)}


@pytest.fixture
def finished_study(isolated_store):
    """A grid study (2 LRs x 2 presets x 3 repeats) made by the sweep machinery, whose trials
    are told synthetic metrics instead of training."""
    tree = yaml.safe_load((ROOT / "experiments/studies/smoke.yaml").read_text())
    tree.update(base=str(ROOT / "experiments/default.yaml"), name="synthetic",
                hypotheses=HYPOTHESES)
    path = isolated_store / "synthetic.yaml"
    path.write_text(yaml.safe_dump(tree))
    loaded = load_study_file(path)
    handle = open_study(loaded, resolve_storage(None, "synthetic"))
    rng = np.random.default_rng(0)
    table = {}
    while handle.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = handle.study.ask()
        lr = trial.suggest_categorical("optim.lr", list(LRS))
        preset = trial.suggest_categorical("augment.preset", list(PRESETS))
        repeat = trial.user_attrs["repeat"]
        metrics = synthetic_metrics(lr, preset, repeat, rng)
        table[(lr, preset, repeat)] = metrics
        trial.set_user_attr("metrics", metrics)
        handle.study.tell(trial, metrics["pooled_iou"])
    return path, handle, table


def per_repeat_at(table: dict, metric: str, lr: float) -> np.ndarray:
    """Per repeat, the mean of `metric` over the configurations with this learning rate."""
    return np.array([np.mean([m[metric] for (lr_, _, r), m in table.items()
                              if r == repeat and lr_ == lr]) for repeat in range(3)])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_verdicts_follow_from_the_numbers(finished_study):
    path, handle, table = finished_study
    result = write_report(str(path))
    verdicts = {v.hypothesis.name: v for v in result.verdicts}
    assert {name: v.verdict for name, v in verdicts.items()} == {
        "lr 3e-3 beats 1e-7": "supported",
        "light beats none": "contradicted",
        "AUC within 0.01 whatever the preset": "inconclusive",
        "the LR leaves per-image Dice within 0.02": "supported",
        "the best light configuration beats the best none": "contradicted",
    }
    # The numbers behind the first verdict, recomputed here: paired over the 3 repeats.
    diffs = per_repeat_at(table, "pooled_iou", 0.003) - per_repeat_at(table, "pooled_iou", 1e-7)
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    first = verdicts["lr 3e-3 beats 1e-7"].difference
    assert first.paired and first.n == 3
    assert first.mean == pytest.approx(diffs.mean())
    assert (first.low, first.high) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert first.low > 0  # hence supported

    best = verdicts["the best light configuration beats the best none"]
    assert "optim.lr=0.003" in best.a_label and "optim.lr=0.003" in best.b_label
    assert best.difference.mean == pytest.approx(-0.08, abs=0.01)

    text = result.markdown.read_text()
    for name, verdict in verdicts.items():
        assert f"### {name}" in text and f"**{verdict.verdict}**" in text
    assert "optim.lr=0.003, augment.preset=none" in text.split("## Best configuration")[1]
    assert all(figure.is_file() for figure in result.figures)
    logged = {a.path for a in MlflowClient().list_artifacts(handle.parent_run_id, "report/plots")}
    assert {f"report/plots/{figure.name}" for figure in result.figures} == logged


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_report_command_prints_the_verdicts(finished_study):
    path, _, _ = finished_study
    result = CliRunner().invoke(app, ["report", "synthetic", "--out", "out"])
    assert result.exit_code == 0, result.output
    assert "supported: lr 3e-3 beats 1e-7" in result.output
    assert "contradicted: light beats none" in result.output


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_results_page_keeps_its_preamble_and_its_plots_beside_it(finished_study, tmp_path):
    path, handle, _ = finished_study
    page = tmp_path / "docs" / "results" / "synthetic.md"
    first = write_report(str(path), out=page)
    assert first.markdown == page and page.read_text().startswith("# ")
    assert {f.parent for f in first.figures} == {tmp_path / "docs" / "results" / "synthetic"}
    assert "](synthetic/history.png)" in page.read_text()

    preamble = "# Results on synthetic data\n\nWritten by a person.\n\n"
    generated = page.read_text()
    page.write_text(preamble + PREAMBLE_MARKER + "\n\n" + "stale text\n")
    write_report(str(path), out=page)
    text = page.read_text()
    assert text.startswith(preamble + PREAMBLE_MARKER) and text.count(PREAMBLE_MARKER) == 1
    assert "stale text" not in text and text.endswith(generated)
    logged = {a.path for a in MlflowClient().list_artifacts(handle.parent_run_id, "report")}
    assert {"report/synthetic.md", "report/synthetic"} <= logged


def test_unknown_study_is_one_line_error(isolated_store):
    result = CliRunner().invoke(app, ["report", "nothing-here"])
    assert result.exit_code == 2
    assert "no study journal here" in result.output


@pytest.mark.parametrize(("low", "high", "expect", "margin", "verdict"), [
    (0.01, 0.05, "greater", 0.0, "supported"),
    (-0.05, -0.01, "greater", 0.0, "contradicted"),
    (-0.01, 0.05, "greater", 0.0, "inconclusive"),
    (0.01, 0.05, "greater", 0.02, "inconclusive"),
    (-0.05, -0.01, "less", 0.0, "supported"),
    (0.01, 0.05, "less", 0.0, "contradicted"),
    (-0.005, 0.008, "equal", 0.01, "supported"),
    (0.02, 0.05, "equal", 0.01, "contradicted"),
    (-0.005, 0.02, "equal", 0.01, "inconclusive"),
    (float("nan"), float("nan"), "greater", 0.0, "inconclusive"),
])
def test_decision_rules(low, high, expect, margin, verdict):
    from ptxlab.report import Estimate

    assert decide(Estimate((low + high) / 2, low, high, 3), expect, margin) == verdict


def test_differences_pair_repeats_else_use_welch():
    a = {0: 0.50, 1: 0.55, 2: 0.47, 3: 0.52}
    b = {0: 0.45, 1: 0.52, 2: 0.44, 3: 0.46}
    paired = difference(a, b)
    reference = stats.ttest_rel(list(a.values()), list(b.values())).confidence_interval()
    assert paired.paired and (paired.low, paired.high) == pytest.approx(tuple(reference))
    unpaired = difference(a, {5: 0.45, 6: 0.52, 7: 0.40})
    reference = stats.ttest_ind(list(a.values()), [0.45, 0.52, 0.40],
                                equal_var=False).confidence_interval()
    assert not unpaired.paired and (unpaired.low, unpaired.high) == pytest.approx(tuple(reference))
    single = estimate([0.4])
    assert single.mean == 0.4 and not single.defined and single.text() == "0.4000 (n=1)"


# --- what the noise allows: bounded intervals, power, edges of the grid ----------------------

NOISY_LRS = (1.0e-4, 1.0e-3, 3.0e-3)  # the largest is the best: an optimum on the grid's edge
NOISY_HYPOTHESES = [
    {"name": "light beats none by a hair", "compare": {"augment.preset": "light"},
     "against": {"augment.preset": "none"}, "expect": "greater"},
    {"name": "light beats none by 0.02", "compare": {"augment.preset": "light"},
     "against": {"augment.preset": "none"}, "expect": "greater", "min_effect": 0.02},
    {"name": "3e-3 beats 1e-4", "compare": {"optim.lr": 0.003},
     "against": {"optim.lr": 1.0e-4}, "expect": "greater"},
]


@pytest.fixture
def noisy_study(isolated_store):
    """Known effects: +0.05 pooled IoU per LR step up (best at the largest LR), +0.01 for light
    augmentation under per-trial noise of SD 0.03; an AUC near 1 with a wide spread."""
    tree = yaml.safe_load((ROOT / "experiments/studies/smoke.yaml").read_text())
    tree.update(base=str(ROOT / "experiments/default.yaml"), name="noisy",
                hypotheses=NOISY_HYPOTHESES,
                space={"optim.lr": {"type": "categorical", "choices": list(NOISY_LRS)},
                       "augment.preset": {"type": "categorical", "choices": list(PRESETS)}})
    path = isolated_store / "noisy.yaml"
    path.write_text(yaml.safe_dump(tree))
    handle = open_study(load_study_file(path), resolve_storage(None, "noisy"))
    rng = np.random.default_rng(4)
    while handle.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial = handle.study.ask()
        lr = trial.suggest_categorical("optim.lr", list(NOISY_LRS))
        preset = trial.suggest_categorical("augment.preset", list(PRESETS))
        pooled = (0.5 + 0.05 * NOISY_LRS.index(lr) + 0.01 * (preset == "light")
                  + rng.normal(0, 0.03))
        metrics = {"pooled_iou": pooled, "mean_dice": 0.6 + rng.normal(0, 0.01),
                   "auc": float(np.clip(0.97 + rng.normal(0, 0.04), 0, 1))}
        trial.set_user_attr("metrics", metrics)
        handle.study.tell(trial, pooled)
    return path, handle


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_inconclusive_verdicts_say_what_the_noise_allows(noisy_study):
    from ptxlab.report import collect, judge_hypothesis

    path, handle = noisy_study
    result = write_report(str(path))
    verdicts = {v.hypothesis.name: v for v in result.verdicts}
    assert verdicts["3e-3 beats 1e-4"].verdict == "supported"
    assert verdicts["3e-3 beats 1e-4"].power == ""  # conclusive: nothing to add
    hair = verdicts["light beats none by a hair"]
    assert hair.verdict == "inconclusive"
    # Recomputed here: paired over the 3 repeats, the t approximation at 80 % power.
    diffs = np.array([hair.a[r] - hair.b[r] for r in range(3)])
    sd = diffs.std(ddof=1)
    assert hair.detectable == pytest.approx((stats.t.ppf(0.975, 2) + stats.t.ppf(0.8, 2))
                                            * sd / np.sqrt(3))
    target = abs(diffs.mean())  # no margin, no min_effect: the observed difference
    needed = hair.repeats_needed
    assert needed > 3
    mde = [(stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / np.sqrt(n)
           for n in (needed - 1, needed)]
    assert mde[1] <= target < mde[0]
    stated = verdicts["light beats none by 0.02"]
    assert stated.verdict == "inconclusive"
    n = stated.repeats_needed
    mde = [(stats.t.ppf(0.975, k - 1) + stats.t.ppf(0.8, k - 1)) * sd / np.sqrt(k)
           for k in (n - 1, n)]
    assert mde[1] <= 0.02 < mde[0]
    # Simulated: at that many repeats, the test the report makes detects +0.02 about 80 % of
    # the time when the per-repeat differences have this SD.
    rng = np.random.default_rng(0)
    draws = rng.normal(0.02, sd, size=(4000, n))
    lows = draws.mean(1) - stats.t.ppf(0.975, n - 1) * draws.std(1, ddof=1) / np.sqrt(n)
    assert 0.72 < np.mean(lows > 0) < 0.88
    text = result.markdown.read_text()
    assert text.count("- what the noise allows:") == 2 and "it would take" in text
    # The same verdicts from the library function, without the report.
    again = judge_hypothesis(handle.spec.hypotheses[0], collect(handle.study))
    assert again.repeats_needed == needed


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_bounded_metrics_keep_their_intervals_inside_0_1(noisy_study):
    from ptxlab.report import collect, factor_rows, levels

    path, handle = noisy_study
    results = collect(handle.study)
    rows = factor_rows(levels("augment.preset", handle.spec.space["augment.preset"], results))
    aucs = [row.estimates["auc"] for row in rows]
    assert all(0 <= e.low <= e.mean <= e.high <= 1 for e in aucs)
    # Per-repeat AUCs near 1: a plain t-interval crosses 1, the reported one does not.
    near_one = [0.99, 0.93, 1.0]
    assert estimate(near_one).high > 1
    bounded = estimate(near_one, bounded=True)
    assert (bounded.low, bounded.high) == (estimate(near_one).low, 1.0)
    assert estimate([0.2, 0.5, 0.6], bounded=True).text().count("[") == 1
    assert difference({0: 0.9, 1: 0.1}, {0: 0.0, 1: 0.9}).low >= -1


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_an_optimum_on_the_edge_of_the_grid_is_flagged(noisy_study):
    from ptxlab.report import collect, edge_optima

    path, handle = noisy_study
    flags = edge_optima(handle.spec, collect(handle.study), maximize=True)
    assert flags == ["`optim.lr` = 0.003 is at the top of the searched range [0.0001, 0.003]: "
                     "widen it upward (values above 0.003)"]
    text = write_report(str(path)).markdown.read_text()
    assert "on the edge of the searched grid" in text and "widen it upward" in text
    inner = handle.spec.model_copy(update={"objective": handle.spec.objective.model_copy(
        update={"direction": "minimize"})})
    assert "bottom" in edge_optima(inner, collect(handle.study), maximize=False)[0]


def test_the_image_bootstrap_resamples_images_within_each_repeat():
    from ptxlab.noise import image_bootstrap

    rng = np.random.default_rng(1)
    b = {r: rng.uniform(0, 1, 400) for r in range(3)}
    a = {r: b[r] + 0.05 + rng.normal(0, 0.1, 400) for r in range(3)}  # +0.05, image SD 0.1
    mean, low, high = image_bootstrap(a, b)
    assert mean == pytest.approx(np.mean([np.mean(a[r] - b[r]) for r in range(3)]))
    half = 1.96 * 0.1 / np.sqrt(400 * 3)  # the mean of 1200 independent differences
    assert (high - low) / 2 == pytest.approx(half, rel=0.15) and low < mean < high
    same = image_bootstrap({0: b[0] + 0.02}, {0: b[0]})
    assert same == pytest.approx((0.02, 0.02, 0.02))  # no image-to-image spread, no interval
    assert image_bootstrap({0: b[0]}, {1: b[1]}) is None  # no shared repeat
