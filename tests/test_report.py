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
from ptxlab.report import decide, difference, estimate, write_report
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


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_report_command_prints_the_verdicts(finished_study):
    path, _, _ = finished_study
    result = CliRunner().invoke(app, ["report", "synthetic", "--out", "out"])
    assert result.exit_code == 0, result.output
    assert "supported: lr 3e-3 beats 1e-7" in result.output
    assert "contradicted: light beats none" in result.output


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
