"""`ptxlab report`: what a study's trials say about each factor and hypothesis, against noise.

Only COMPLETE trials count (pruned trials trained less, failed ones have no result). A group of
trials (a factor level, one side of a hypothesis) gives one value per repeat: the mean of the
metric over the group's trials with that repeat (seed). Its estimate is the mean over repeats
± the half-width of the 95 % t-interval (n = repeats, n - 1 degrees of freedom). A difference
between two groups pairs the per-repeat values (same seed, same split) when both sides have the
same repeats, at least two; otherwise it is Welch's interval.

A hypothesis (`ptxlab.sweep.Hypothesis`) compares side A (`compare`) with side B (`against`):

* expect `greater`: supported when the CI of A - B lies above `margin`, contradicted when it lies
  below it;
* expect `less`: supported when it lies below -`margin`, contradicted when above;
* expect `equal`: supported when it lies inside (-margin, margin), contradicted when it lies
  entirely outside;

and inconclusive otherwise, which includes fewer than two repeats (no noise estimate).

The best-configuration table lists every configuration with pooled IoU/Dice, per-image Dice
and image AUC (under cv: means over folds and seeds), and the same on the held-out test subset
(`data.test_fraction`) when the trials scored one. A cv study's report also (re)does and shows
its out-of-fold post-processing (`ptxlab.sweep.oof`).

The report is written as `report.md` with PNG plots under `plots/` (or, given a `.md` file, as
that file with its plots in a folder of the same name beside it), and logged under `report/` to
the study's MLflow parent run. Text above `PREAMBLE_MARKER` in an existing page is kept: a
committed results page keeps its human-written preamble when it is regenerated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import optuna
from matplotlib.figure import Figure
from optuna.trial import TrialState
from scipy import stats

from ptxlab import artifacts, tracking
from ptxlab.atomic import write_file, write_text
from ptxlab.noise import (
    BOOTSTRAP_RESAMPLES,
    MAX_REPEATS,
    Noise,
    bounded_interval,
    image_bootstrap,
)
from ptxlab.sweep import (
    Dimension,
    Hypothesis,
    Label,
    StudyHandle,
    StudySpec,
    load_existing,
    masked,
    matches,
    tally,
)
from ptxlab.sweep.fold_ensemble import NAME as ENSEMBLE_TEST
from ptxlab.sweep.fold_ensemble import FoldEnsemble, fold_ensemble
from ptxlab.sweep.oof import OutOfFold, out_of_fold

REPORT_METRICS = {"pooled_iou": "pooled IoU", "mean_dice": "per-image Dice", "auc": "image AUC"}
# The configurations table: these, and the same on the held-out test subset when trials have it.
TABLE_METRICS = {"pooled_iou": "pooled IoU", "pooled_dice": "pooled Dice",
                 "mean_dice": "per-image Dice", "auc": "image AUC"}
TEST_PREFIX = "test_"
MAX_LEVELS = 8  # numeric factors with more distinct values are binned into quartiles


@dataclass(frozen=True)
class Result:
    """One complete trial: its configuration, repeat and metrics."""

    number: int
    params: dict[str, Label]
    repeat: int
    metrics: dict[str, float | None]
    value: float
    run_id: str | None = None  # its MLflow child run
    test_metrics: dict[str, float | None] = field(default_factory=dict)  # data.test_fraction


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95 % confidence interval (NaN bounds when n < 2)."""

    mean: float
    low: float
    high: float
    n: int
    paired: bool = False
    bounded: bool = False  # a [0, 1] metric's level: shown as [low, high], within [0, 1]

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def text(self, signed: bool = False) -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        value = f"{self.mean:+.4f}" if signed else f"{self.mean:.4f}"
        if not self.defined:
            return f"{value} (n={self.n})"
        if self.bounded:
            return f"{value} [{self.low:.4f}, {self.high:.4f}]"
        return f"{value} ± {(self.high - self.low) / 2:.4f}"

    def interval(self) -> str:
        return f"[{self.low:+.4f}, {self.high:+.4f}]" if self.defined else "[n/a]"


def estimate(values: list[float], paired: bool = False, bounded: bool = False) -> Estimate:
    """Mean ± t-interval of independent values (one per repeat); `bounded`: values of a [0, 1]
    metric, whose interval is kept inside [0, 1] (`noise.bounded_interval`)."""
    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, paired, bounded)
    mean = float(np.mean(values))
    if n < 2:
        return Estimate(mean, math.nan, math.nan, n, paired, bounded)
    if bounded:
        return Estimate(mean, *bounded_interval(values), n, paired, bounded)
    half = float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n, paired)


def bounded_estimate(values: list[float]) -> Estimate:
    """A group's estimate of a report metric (all of them lie in [0, 1])."""
    return estimate(values, bounded=True)


def difference(a: dict[int, float], b: dict[int, float]) -> Estimate:
    """A - B from per-repeat values: paired over shared repeats, else Welch's interval; both
    clipped to [-1, 1], where differences of [0, 1] metrics lie."""
    diff = _difference(a, b)
    if not diff.defined:
        return diff
    return dataclasses.replace(diff, low=max(diff.low, -1.0), high=min(diff.high, 1.0))


def _difference(a: dict[int, float], b: dict[int, float]) -> Estimate:
    if set(a) == set(b) and len(a) >= 2:
        return estimate([a[r] - b[r] for r in sorted(a)], paired=True)
    va, vb = np.array(list(a.values())), np.array(list(b.values()))
    n = min(len(va), len(vb))
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(va.mean() - vb.mean())
    if len(va) < 2 or len(vb) < 2:
        return Estimate(mean, math.nan, math.nan, n)
    sa, sb = va.var(ddof=1) / len(va), vb.var(ddof=1) / len(vb)
    se = math.sqrt(sa + sb)
    if se == 0:
        return Estimate(mean, mean, mean, n)
    dof = (sa + sb) ** 2 / (sa**2 / (len(va) - 1) + sb**2 / (len(vb) - 1))
    half = float(stats.t.ppf(0.975, dof) * se)
    return Estimate(mean, mean - half, mean + half, n)


def per_repeat(results: list[Result], metric: str) -> dict[int, float]:
    """Per repeat, the metric's mean over the results of that repeat (missing values skipped);
    `test_<metric>` reads the trials' scores on the held-out test subset."""
    grouped: dict[int, list[float]] = defaultdict(list)
    for result in results:
        if metric.startswith(TEST_PREFIX):
            value = result.test_metrics.get(metric.removeprefix(TEST_PREFIX))
        else:
            value = result.metrics.get(metric)
        if value is not None and math.isfinite(value):
            grouped[result.repeat].append(value)
    return {repeat: float(np.mean(values)) for repeat, values in sorted(grouped.items())}


def collect(study: optuna.Study) -> list[Result]:
    """Complete trials with their logged metrics."""
    return [Result(t.number, dict(t.params), int(t.user_attrs.get("repeat", 0)),
                   t.user_attrs.get("metrics", {}), float(t.value),
                   t.user_attrs.get("mlflow_run_id"), t.user_attrs.get("test_metrics") or {})
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


# --- factors -------------------------------------------------------------------------------


@dataclass
class Level:
    label: str
    results: list[Result]


def levels(name: str, dim: Dimension, results: list[Result]) -> list[Level]:
    """A factor's levels among the results where it is active: its choices in order, its
    distinct values, or (numeric with many values) its quartile bins."""
    active = [r for r in results if name in r.params]
    if dim.type == "categorical":
        return [Level(str(choice), [r for r in active if r.params[name] == choice])
                for choice in dim.labels() if any(r.params[name] == choice for r in active)]
    values = sorted({float(r.params[name]) for r in active})
    if len(values) <= MAX_LEVELS:
        return [Level(f"{v:g}", [r for r in active if float(r.params[name]) == v]) for v in values]
    edges = np.quantile(values, [0, 0.25, 0.5, 0.75, 1])
    bins = []
    for k in range(4):
        low, high = edges[k], edges[k + 1]
        inside = [r for r in active if low <= float(r.params[name]) < high
                  or (k == 3 and float(r.params[name]) == high)]
        if inside:
            bins.append(Level(f"[{low:.3g}, {high:.3g}{']' if k == 3 else ')'}", inside))
    return bins


@dataclass
class FactorRow:
    level: Level
    estimates: dict[str, Estimate]
    effects: dict[str, Estimate]  # versus the first level


def factor_rows(found: list[Level]) -> list[FactorRow]:
    rows = []
    reference = found[0].results if found else []
    for group in found:
        estimates = {m: bounded_estimate(list(per_repeat(group.results, m).values()))
                     for m in REPORT_METRICS}
        effects = {m: difference(per_repeat(group.results, m), per_repeat(reference, m))
                   for m in REPORT_METRICS}
        rows.append(FactorRow(group, estimates, effects))
    return rows


# --- configurations and hypotheses ---------------------------------------------------------


def configurations(results: list[Result]) -> dict[tuple, list[Result]]:
    grouped: dict[tuple, list[Result]] = defaultdict(list)
    for result in results:
        grouped[tuple(result.params.items())].append(result)
    return dict(grouped)


def best_configuration(results: list[Result], metric: str,
                       maximize: bool = True) -> tuple[tuple, list[Result]] | None:
    """The configuration with the best mean over repeats of `metric`."""
    scored = [(np.mean(list(values.values())), key, group)
              for key, group in configurations(results).items()
              if (values := per_repeat(group, metric))]
    if not scored:
        return None
    _, key, group = (max if maximize else min)(scored, key=lambda item: item[0])
    return key, group


@dataclass
class Verdict:
    hypothesis: Hypothesis
    verdict: str  # supported | contradicted | inconclusive
    difference: Estimate
    a: dict[int, float]
    b: dict[int, float]
    a_label: str
    b_label: str
    summary: str = ""
    detectable: float = math.nan  # inconclusive: see `power`
    repeats_needed: int | None = None
    power: str = ""
    sides: tuple[list[Result], list[Result]] = ([], [])  # the trials of A and of B
    images: tuple[float, float, float] | None = None  # see `image_interval`


def decide(diff: Estimate, expect: str, margin: float) -> str:
    """The verdict that the interval of A - B implies (see the module docstring)."""
    if not diff.defined:
        return "inconclusive"
    if expect == "greater":
        supported, contradicted = diff.low > margin, diff.high < margin
    elif expect == "less":
        supported, contradicted = diff.high < -margin, diff.low > -margin
    else:
        supported = -margin < diff.low and diff.high < margin
        contradicted = diff.low > margin or diff.high < -margin
    return "supported" if supported else "contradicted" if contradicted else "inconclusive"


def _conditions_text(condition: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in condition.items()) or "all"


def judge_hypothesis(hypothesis: Hypothesis, results: list[Result]) -> Verdict:
    scope = [r for r in results if matches(r.params, hypothesis.where)]
    sides, groups = [], []
    for condition in (hypothesis.compare, hypothesis.against):
        group = [r for r in scope if matches(r.params, condition)]
        text = _conditions_text(condition)
        if hypothesis.aggregate == "best" and group:
            key, group = best_configuration(group, hypothesis.metric) or ((), [])
            text += f" (best: {_conditions_text(dict(key))})"
        sides.append((per_repeat(group, hypothesis.metric), f"{text}; {len(group)} trials"))
        groups.append(group)
    (a, a_label), (b, b_label) = sides
    diff = difference(a, b)
    verdict = Verdict(hypothesis, decide(diff, hypothesis.expect, hypothesis.margin), diff, a, b,
                      a_label, b_label, sides=(groups[0], groups[1]))
    expected = {"greater": f"A - B > {hypothesis.margin:+g}",
                "less": f"A - B < {-hypothesis.margin:+g}",
                "equal": f"|A - B| < {hypothesis.margin:g}"}[hypothesis.expect]
    how = "paired over" if diff.paired else "unpaired,"
    verdict.summary = (f"Δ {REPORT_METRICS.get(hypothesis.metric, hypothesis.metric)} = "
                       f"{diff.text(signed=True)}, 95 % CI {diff.interval()}, {how} "
                       f"{diff.n} repeats; expected {expected}")
    if verdict.verdict == "inconclusive":
        power(verdict)
    return verdict


def power(verdict: Verdict) -> None:
    """For an inconclusive verdict: the smallest distance beyond the decision boundary the
    study could detect with 80 % power, and the repeats it would need for the target distance:
    the hypothesis' `min_effect`, else its margin, else the observed |A - B|."""
    h = verdict.hypothesis
    noise = Noise.of(verdict.a, verdict.b)
    if noise is None:
        verdict.power = ("no noise estimate (a side has fewer than 2 repeats): nothing can be "
                         "detected; run at least 2 repeats")
        return
    target, named = ((h.min_effect, "the stated minimum effect") if h.min_effect
                     else (h.margin, "the margin") if h.margin
                     else (abs(verdict.difference.mean), "the observed |Δ|"))
    verdict.detectable = noise.detectable(h.expect)
    verdict.repeats_needed = noise.repeats_needed(h.expect, target)
    boundary = "0 (both margins, true Δ = 0)" if h.expect == "equal" else f"{h.margin:g}"
    needed = (f"{verdict.repeats_needed} repeats" if verdict.repeats_needed
              else f"more than {MAX_REPEATS} repeats" if target > 0 else "n/a (target 0)")
    side = "paired" if noise.paired else "per side, unpaired"
    verdict.power = (
        f"with {noise.n} repeats and the observed noise (SD {noise.sd:.4f} per repeat, {side}), "
        f"a true Δ at least {verdict.detectable:.4f} beyond {boundary} is detected with 80 % "
        f"power (minimum detectable effect); for {named}, {target:.4f}, it would take {needed}")


def image_interval(verdict: Verdict) -> tuple[float, float, float] | None:
    """For a hypothesis on per-image Dice whose trials all logged per-image values: A - B with
    the paired image bootstrap of `noise.image_bootstrap` (per side and repeat, each image's
    Dice averaged over the side's trials)."""
    if verdict.hypothesis.metric != "mean_dice" or not all(verdict.sides):
        return None
    per_side = []
    for results in verdict.sides:
        values = [_per_image_dice(r.run_id) if r.run_id else None for r in results]
        if any(v is None for v in values):
            return None  # runs from before per-image values were logged
        per_side.append(_by_repeat(results, values))
    ids = sorted(set.intersection(*(set(v) for side in per_side for v in side.values())))
    if not ids:
        return None
    aligned = [{r: np.array([v[i] for i in ids]) for r, v in side.items()} for side in per_side]
    return image_bootstrap(*aligned)


def _by_repeat(results: list[Result], values: list[dict[str, float]]) -> dict[int, dict]:
    """Per repeat, each image's value averaged over the trials of that repeat."""
    grouped: dict[int, list[dict[str, float]]] = defaultdict(list)
    for result, per_image in zip(results, values, strict=True):
        grouped[result.repeat].append(per_image)
    return {repeat: {i: float(np.mean([v[i] for v in found if i in v]))
                     for i in set().union(*found)} for repeat, found in grouped.items()}


@lru_cache(maxsize=512)
def _per_image_dice(run_id: str) -> dict[str, float] | None:
    client = tracking.configure()
    if not any(a.path == artifacts.PER_IMAGE_DICE for a in client.list_artifacts(
            run_id, artifacts.folder(artifacts.PER_IMAGE_DICE))):
        return None
    with tempfile.TemporaryDirectory(prefix="ptxlab-report-") as folder:
        stored = json.loads(tracking.download_artifact(run_id, artifacts.PER_IMAGE_DICE,
                                                       Path(folder)).read_text())
    return dict(zip(stored["ids"], stored["dice"], strict=True))


def importances(study: optuna.Study) -> tuple[dict[str, float], str | None]:
    """Optuna's parameter importances for the objective, or why there are none."""
    try:
        return optuna.importance.get_param_importances(study), None
    except (ValueError, RuntimeError, ZeroDivisionError) as error:
        return {}, str(error) or type(error).__name__


# --- plots ---------------------------------------------------------------------------------


def _factor_figure(name: str, rows: list[FactorRow]):
    figure = Figure(figsize=(4.5 * len(REPORT_METRICS), 3.6), layout="constrained")
    axes = figure.subplots(1, len(REPORT_METRICS))
    x = np.arange(len(rows))
    for axis, (metric, title) in zip(axes, REPORT_METRICS.items(), strict=True):
        found = [row.estimates[metric] for row in rows]
        errors = np.array([(e.mean - e.low, e.high - e.mean) if e.defined else (0.0, 0.0)
                           for e in found]).T
        axis.errorbar(x, [e.mean for e in found], yerr=errors, fmt="o", capsize=4)
        axis.set_xticks(x, [row.level.label for row in rows], rotation=20, ha="right")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{name}: mean ± 95 % CI over repeats")
    return figure


def _history_figure(study: optuna.Study, objective: str, maximize: bool):
    figure = Figure(figsize=(8, 4), layout="constrained")
    axis = figure.subplots()
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    axis.plot([t.number for t in complete], [t.value for t in complete], "o", label="complete")
    if pruned:
        axis.plot([t.number for t in pruned], [t.value for t in pruned], "x", color="grey",
                  label="pruned (last reported)")
    if complete:
        running = (np.maximum if maximize else np.minimum).accumulate([t.value for t in complete])
        axis.step([t.number for t in complete], running, where="post", label="best so far")
    axis.set_xlabel("trial")
    axis.set_ylabel(objective)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def _importance_figure(values: dict[str, float]):
    figure = Figure(figsize=(6, 0.5 + 0.4 * len(values)), layout="constrained")
    axis = figure.subplots()
    names = list(values)[::-1]
    axis.barh(names, [values[n] for n in names])
    axis.set_xlabel("importance for the objective")
    return figure


def _save(figure: Figure, path: Path) -> None:
    write_file(path, lambda handle: figure.savefig(handle, format="png", dpi=100))


# --- the report ----------------------------------------------------------------------------


PREAMBLE_MARKER = ("<!-- Everything below this line is written by `ptxlab report`; "
                   "edit only above it. -->")


@dataclass
class Page:
    """Where a report goes: its Markdown file, and the folder its figures are written to,
    linked relative to the Markdown file."""

    markdown: Path
    figures: Path

    @classmethod
    def at(cls, out: Path) -> Page:
        """`out` is a folder (report.md + plots/) or a .md file (plots in <stem>/ beside it)."""
        if out.suffix == ".md":
            return cls(out, out.with_suffix(""))
        return cls(out / "report.md", out / "plots")

    def figure(self, name: str) -> tuple[Path, str]:
        """A figure's path, and its link from the page."""
        return self.figures / name, f"{self.figures.name}/{name}"

    def preamble(self) -> list[str]:
        """What a person wrote above the marker in the existing page, marker included."""
        if not self.markdown.exists():
            return []
        text = self.markdown.read_text()
        if PREAMBLE_MARKER not in text:
            return []
        return text[:text.index(PREAMBLE_MARKER)].splitlines() + [PREAMBLE_MARKER, ""]


@dataclass
class ReportResult:
    markdown: Path
    verdicts: list[Verdict]
    parent_run_id: str
    figures: list[Path] = field(default_factory=list)


def write_report(target: str, storage: str | None = None, out: Path | None = None) -> ReportResult:
    """Render the report of a study (by file or name) into `out` (a folder or a .md file) and
    log it to its parent run."""
    handle, _ = load_existing(target, storage)
    spec = handle.spec
    page = Page.at(Path(out or tracking.local_store() / "reports" / spec.name))
    page.figures.mkdir(parents=True, exist_ok=True)
    results = collect(handle.study)
    oof = out_of_fold(handle)  # cv studies: (re)done and logged, idempotently
    lines, figures, verdicts = compose_report(handle, results, page, oof,
                                              fold_ensemble(handle, oof))
    write_text(page.markdown, "\n".join(page.preamble() + lines) + "\n")
    client = tracking.configure()
    client.log_artifact(handle.parent_run_id, str(page.markdown), "report")
    client.log_artifacts(handle.parent_run_id, str(page.figures), f"report/{page.figures.name}")
    client.set_tag(handle.parent_run_id, "ptxlab.report", f"report/{page.markdown.name}")
    return ReportResult(page.markdown, verdicts, handle.parent_run_id, figures)


def compose_report(handle: StudyHandle, results: list[Result], page: Page,
                   oof: OutOfFold | None = None, ensemble: FoldEnsemble | None = None
                   ) -> tuple[list[str], list[Path], list[Verdict]]:
    """Markdown lines, the figures written for `page`, and the verdicts (`oof`: the
    out-of-fold table of a cv study; `ensemble`: its best configuration on the test set)."""
    spec = handle.spec
    maximize = spec.objective.direction == "maximize"
    objective = f"best_val_{spec.objective.metric}"
    lines = _header(handle, spec)
    figures: list[Path] = []

    verdicts = [judge_hypothesis(h, results) for h in spec.hypotheses]
    for verdict in verdicts:
        verdict.images = image_interval(verdict)
    lines += ["## Hypotheses", ""]
    if not verdicts:
        lines += ["The study file states no hypotheses.", ""]
    for verdict in verdicts:
        lines += _verdict_lines(verdict)

    lines += ["## Best configuration", ""]
    lines += _best_lines(spec, results, maximize)
    lines += _edge_lines(spec, results, maximize)
    if oof is not None:
        lines += _out_of_fold_lines(oof)
    if ensemble is not None:
        lines += _fold_ensemble_lines(ensemble)

    lines += ["## Factors", "",
              "Per level: mean [95 % CI] over repeats, and the difference to the first level "
              f"± its 95 % CI half-width, {_pairing(spec)} where possible.", ""]
    for name, dim in spec.space.items():
        rows = factor_rows(levels(name, dim, results))
        lines += [f"### {name}", ""]
        if not rows:
            lines += ["No complete trials with this factor active.", ""]
            continue
        path, link = page.figure(f"factor_{artifacts.safe_name(name)}.png")
        _save(_factor_figure(name, rows), path)
        figures.append(path)
        lines += [f"![{name}]({link})", ""]
        lines += _factor_table(rows)

    lines += ["## Parameter importances (Optuna)", ""]
    values, problem = importances(handle.study)
    if problem:
        lines += [f"Not available: {problem}", ""]
    else:
        path, link = page.figure("importances.png")
        _save(_importance_figure(values), path)
        figures.append(path)
        lines += [f"![importances]({link})", "", "| parameter | importance |",
                  "| --- | --- |"]
        lines += [f"| {name} | {value:.3f} |" for name, value in values.items()] + [""]

    path, link = page.figure("history.png")
    _save(_history_figure(handle.study, objective, maximize), path)
    figures.append(path)
    lines += ["## Trials", "", f"![history]({link})", ""]
    return lines, figures, verdicts


def _header(handle: StudyHandle, spec: StudySpec) -> list[str]:
    counts = tally(handle.study.get_trials(deepcopy=False))
    pruner = spec.pruner.type if spec.pruner.type == "none" else (
        f"{spec.pruner.type} on {spec.pruner.metric}")
    rows = [
        ("mode", spec.mode),
        ("storage", masked(handle.url)),
        ("MLflow", f"experiment `{handle.experiment}`, parent run `{handle.parent_run_id}`"),
        ("sampler", f"{spec.sampler.type} (seed {spec.sampler.seed})"),
        ("pruner", pruner),
        ("objective", f"{spec.objective.direction} best_val_{spec.objective.metric}"),
        ("repeats", str(spec.repeats) if spec.cv is None else
         f"{spec.total_repeats}: cross-validation, {spec.cv.folds} folds x {spec.repeats} "
         "seed(s) (repeat r = fold r % folds, seed + r // folds)"),
        ("trials", f"{counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed, "
                   f"{counts.retried} retried after a lost worker, {counts.running} running, "
                   f"{counts.waiting} queued"),
    ]
    if handle.definition["source_runs"]:
        rows.append(("source runs", ", ".join(f"`{r}`" for r in handle.definition["source_runs"])))
    lines = [f"# Study `{spec.name}`", ""]
    if spec.description:
        lines += [spec.description, ""]
    lines += ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows] + [""]
    lines += ["Only complete trials count. A group's value per repeat is its mean over the "
              "group's trials of that repeat; estimates are the mean over repeats [its 95 % "
              "t-interval, within [0, 1] where the metrics lie]; "
              "differences are ± the 95 % t-interval half-width (clipped to [-1, 1]) and are "
              f"{_pairing(spec)} when both sides have the same repeats. Inconclusive hypotheses "
              "say what the noise allows: the minimum detectable effect at 80 % power and the "
              "repeats needed, by the t approximation for the same test (see `ptxlab.noise`). "
              "Hypotheses on per-image Dice also get a paired bootstrap over the validation "
              "images within each repeat (seeds held fixed), labelled as such. "
              "Pruned trials are left out, which favours configurations that survive pruning.",
              ""]
    return lines


def _pairing(spec: StudySpec) -> str:
    """How differences pair repeats: by seed, or under cv by fold (and seed)."""
    if spec.cv is None:
        return "paired by repeat (same seed)"
    return "paired by fold (same validation images" + (
        ", same seed)" if spec.repeats == 1 else "; and by seed)")


def _verdict_lines(verdict: Verdict) -> list[str]:
    h = verdict.hypothesis

    def values(per: dict[int, float]) -> str:
        return ", ".join(f"{v:.4f}" for v in per.values()) or "none"

    return [
        f"### {h.name}", "",
        f"**{verdict.verdict}**: {verdict.summary}.", "",
        f"- A = {verdict.a_label}: per repeat {values(verdict.a)}",
        f"- B = {verdict.b_label}: per repeat {values(verdict.b)}",
        f"- scope: {_conditions_text(h.where)}; metric {REPORT_METRICS.get(h.metric, h.metric)}"
        f" ({h.aggregate} of the matching configurations)",
        *([f"- what the noise allows: {verdict.power}"] if verdict.power else []),
        *([_images_line(verdict)] if verdict.images else []), "",
    ]


def _images_line(verdict: Verdict) -> str:
    mean, low, high = verdict.images
    return (f"- image bootstrap (validation images resampled within each repeat, "
            f"{BOOTSTRAP_RESAMPLES} times; seeds held fixed): Δ per-image Dice {mean:+.4f}, "
            f"95 % CI [{low:+.4f}, {high:+.4f}]: the uncertainty from which images were "
            f"validated on, next to {verdict.difference.interval()} from the seeds (repeats)")


def _best_lines(spec: StudySpec, results: list[Result], maximize: bool) -> list[str]:
    if not results:
        return ["No complete trials.", ""]
    metric = spec.objective.metric
    groups = configurations(results)
    ranked = sorted(groups.items(), key=lambda item: np.mean(
        list(per_repeat(item[1], metric).values()) or [math.nan]), reverse=maximize)
    lines = _configuration_table(spec, ranked)
    for m, title in REPORT_METRICS.items():
        found = best_configuration(results, m)
        if found:
            key, group = found
            value = bounded_estimate(list(per_repeat(group, m).values()))
            lines.append(f"- best by {title}: {_conditions_text(dict(key))} ({value.text()})")
    best_trial = (max if maximize else min)(results, key=lambda r: r.value)
    lines += [f"- best single trial: {best_trial.number} ({_conditions_text(best_trial.params)}, repeat "
              f"{best_trial.repeat}): {best_trial.value:.4f}", ""]
    return lines


def _configuration_table(spec: StudySpec, ranked: list[tuple[tuple, list[Result]]]
                         ) -> list[str]:
    """Every configuration: its validation metrics (mean [95 % CI] over repeats: folds and
    seeds under cv) and, when its trials scored the held-out test subset, the test ones."""
    metrics = list(TABLE_METRICS)
    titles = list(TABLE_METRICS.values())
    if any(r.test_metrics for _, group in ranked for r in group):
        metrics += [TEST_PREFIX + m for m in TABLE_METRICS]
        titles += [f"test {title}" for title in TABLE_METRICS.values()]
    over = ("repeats" if spec.cv is None else
            f"repeats ({spec.cv.folds} folds x {spec.repeats} seed(s), cross-validated)")
    lines = [f"Configurations ranked by the mean of best_val_{spec.objective.metric} over "
             f"repeats; each value the mean [95 % CI] over {over}"
             + ("; test: the held-out test subset, per trial, averaged the same way"
                if len(metrics) > len(TABLE_METRICS) else "") + ":", "",
             "| configuration | repeats | " + " | ".join(titles) + " |",
             "| --- | --- |" + " --- |" * len(titles)]
    for key, group in ranked:
        cells = [bounded_estimate(list(per_repeat(group, m).values())).text() for m in metrics]
        lines.append(f"| {_conditions_text(dict(key))} | {len({r.repeat for r in group})} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def _out_of_fold_lines(oof: OutOfFold) -> list[str]:
    """The cv study's out-of-fold table (`sweep.oof`)."""
    lines = ["## Out-of-fold (pooled over folds)", "",
             f"Per configuration and seed, the {oof.folds} folds' validation maps pooled (every "
             "image once), the configuration's post-processing chosen on them with its own rule "
             "and search objective, and scored there; [95 % image-bootstrap interval, "
             f"{BOOTSTRAP_RESAMPLES} resamples of the pooled images]. Logged to the parent run "
             f"as `{artifacts.OUT_OF_FOLD}`; the best configuration's as `oof_*` metrics.", "",
             "| configuration | seed | chosen post-processing | images | "
             + " | ".join(TABLE_METRICS.values()) + " |",
             "| --- | --- | --- | --- |" + " --- |" * len(TABLE_METRICS)]
    for row in oof.rows:
        cells = [f"{row.metrics[m]:.4f} [{row.intervals[m][0]:.4f}, {row.intervals[m][1]:.4f}]"
                 if math.isfinite(row.metrics[m]) else "n/a" for m in TABLE_METRICS]
        lines.append(f"| {row.label} | {row.seed} | {row.rule_text} | "
                     f"{int(row.metrics['n_images'])} | " + " | ".join(cells) + " |")
    lines.append("")
    if oof.best:
        lines += [f"- best by out-of-fold {oof.objective}: {oof.best[0].label} "
                  f"({oof.mean(oof.best, oof.objective):.4f}, mean over {len(oof.best)} "
                  "seed(s))", ""]
    lines += [f"- not pooled: {item}" for item in oof.incomplete]
    return lines + ([""] if oof.incomplete else [])


def _fold_ensemble_lines(result: FoldEnsemble) -> list[str]:
    """The best configuration's fold models on the held-out test set, alone and together."""
    rule = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in result.rule.items() if k != "resolution")
    lines = ["## Held-out test set: the fold ensemble of the best configuration", "",
             f"The {len(result.members)} fold models of {result.configuration} (best by "
             "out-of-fold objective) on the test set's "
             f"{result.images} images, which no fold trained or validated on: each fold alone "
             "(its trial's `test_*`, with the rule chosen on its own fold's validation maps), "
             "and the ensemble of all of them (maps averaged at native size, the rule chosen "
             f"on the pooled out-of-fold maps: {rule}), logged to the parent run as "
             f"`{ENSEMBLE_TEST}_*`.", "",
             "| model | " + " | ".join(TABLE_METRICS.values()) + " |",
             "| --- |" + " --- |" * len(TABLE_METRICS)]
    rows = [(f"fold {fold} alone (trial {trial})", metrics) for fold, (trial, metrics)
            in enumerate(zip(result.trials, result.folds, strict=True))]
    mean = {m: float(np.nanmean([f.get(m, math.nan) for f in result.folds]))
            for m in TABLE_METRICS}
    rows += [("mean of the folds", mean), ("**fold ensemble**", result.ensemble)]
    for label, metrics in rows:
        lines.append(f"| {label} | " + " | ".join(
            f"{metrics[m]:.4f}" if math.isfinite(metrics.get(m, math.nan)) else "n/a"
            for m in TABLE_METRICS) + " |")
    lines.append("")
    for metric, (value, low, high) in result.differences.items():
        lines.append(f"- ensemble minus the mean of the folds, {TABLE_METRICS[metric]}: "
                     f"{value:+.4f} [{low:+.4f}, {high:+.4f}] (95 % image bootstrap over the "
                     f"{result.images} test images)")
    lines += ["", f"Verdict on per-image Dice: **{result.verdict()}** (an interval that "
              "straddles 0 says the test set is too small to tell).", ""]
    return lines


def edge_optima(spec: StudySpec, results: list[Result], maximize: bool) -> list[str]:
    """Numeric factors of the best configuration (by the objective's mean over repeats) that
    sit at the end of the range the study searched: one line each, saying which way to widen.
    Factors with fewer than 3 values are comparisons, not searches, and are left out."""
    found = best_configuration(results, spec.objective.metric, maximize)
    if found is None:
        return []
    flags = []
    for name, value in found[0]:
        dim = spec.space[name]
        if dim.type in ("float", "log_float") and dim.step is None:
            values = [dim.low, dim.high]  # continuous: flag the outer tenth of the range
            width = (dim.high - dim.low) / 10
        else:
            values = dim.grid()
            width = 0.0
        if not _numeric(value) or not all(_numeric(v) for v in values) or len(values) < 3 and width == 0:
            continue
        low, high = min(values), max(values)
        if value >= high - width:
            flags.append(f"`{name}` = {value:g} is at the top of the searched range "
                         f"[{low:g}, {high:g}]: widen it upward (values above {high:g})")
        elif value <= low + width:
            flags.append(f"`{name}` = {value:g} is at the bottom of the searched range "
                         f"[{low:g}, {high:g}]: widen it downward (values below {low:g})")
    return flags


def _numeric(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _edge_lines(spec: StudySpec, results: list[Result], maximize: bool) -> list[str]:
    flags = edge_optima(spec, results, maximize)
    if not flags:
        return []
    return (["**The optimum sits on the edge of the searched grid**, so the true optimum may lie "
             "outside it:", ""] + [f"- {flag}" for flag in flags] + [""])


def _factor_table(rows: list[FactorRow]) -> list[str]:
    names = list(REPORT_METRICS.values())
    reference = rows[0].level.label
    lines = ["| level | repeats | trials | " + " | ".join(names) + " | "
             + " | ".join(f"Δ {n} vs {reference}" for n in names) + " |",
             "| --- | --- | --- |" + " --- |" * (2 * len(names))]
    for row in rows:
        cells = [row.estimates[m].text() for m in REPORT_METRICS]
        cells += ["—" if row is rows[0] else row.effects[m].text(signed=True)
                  for m in REPORT_METRICS]
        lines.append(f"| {row.level.label} | {len({r.repeat for r in row.level.results})} | "
                     f"{len(row.level.results)} | " + " | ".join(cells) + " |")
    return lines + [""]

