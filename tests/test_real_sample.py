"""A miniature of experiments/studies/real-sample.yaml on the real SIIM sample: the shipped study
file with 2 folds, 1 epoch and 64² (what CI affords), end to end: cross-validated trainings
with a held-out test subset, evaluation-only post-processing arms, the out-of-fold
post-processing and the fold ensemble on the parent run, and the results page."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ptxlab import artifacts
from ptxlab.report import PREAMBLE_MARKER
from tests.conftest import SIIM_SAMPLE

STUDY = Path(__file__).parents[1] / "experiments/studies/real-sample.yaml"
INTERVAL = r"\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]"  # a value with its 95 % interval


def _ptxlab(*args: object, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "ptxlab", *map(str, args)],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_miniature_of_the_real_sample_study_runs_end_to_end(isolated_store):
    tree = yaml.safe_load(STUDY.read_text())
    tree.update(name="real-sample-mini", cv={"folds": 2},
                base=str((STUDY.parent / tree["base"]).resolve()))
    study = isolated_store / "real-sample-mini.yaml"
    study.write_text(yaml.safe_dump(tree, sort_keys=False))
    settings = [f"data.source={SIIM_SAMPLE}", "data.image_size=64", "train.epochs=1"]
    _ptxlab("sweep", study, "--workers", "2", *[a for s in settings for a in ("--set", s)],
            timeout=1800)

    page = isolated_store / "docs" / "real-sample-mini.md"
    page.parent.mkdir()
    page.write_text(f"# Miniature\n\nWritten by hand.\n\n{PREAMBLE_MARKER}\n")
    _ptxlab("report", "real-sample-mini", "--out", page, timeout=600)
    text = page.read_text()
    assert text.startswith("# Miniature\n\nWritten by hand.")
    assert len(re.findall(r"^### .*\n\n\*\*(supported|contradicted|inconclusive)\*\*",
                          text, re.M)) == len(tree["hypotheses"])
    # 4 presets x 3 post-processing rules, each pooled over its 2 folds, with intervals.
    oof = text.split("## Out-of-fold (pooled over folds)")[1].split("\n## ")[0]
    rows = [line for line in oof.splitlines() if line.startswith("| augment.preset=")]
    assert len(rows) == 12 and all(len(re.findall(INTERVAL, row)) == 4 for row in rows)
    ensemble = text.split("## Held-out test set: the fold ensemble of the best "
                          "configuration")[1].split("\n## ")[0]
    for label in ("fold 0 alone", "fold 1 alone", "mean of the folds", "**fold ensemble**"):
        assert f"| {label}" in ensemble
    assert "15 images" in ensemble and "Verdict on per-image Dice: **" in ensemble

    client = MlflowClient()
    [parent] = client.search_runs(
        [client.get_experiment_by_name("ptxlab-real-sample").experiment_id],
        "tags.`ptxlab.role` = 'study'")
    metrics = parent.data.metrics
    assert 0 <= metrics["oof_pooled_iou"] <= 1 and metrics["ensemble_test_n_images"] == 15
    stored = json.loads(Path(client.download_artifacts(
        parent.info.run_id, artifacts.FOLD_ENSEMBLE, str(isolated_store))).read_text())
    assert len(stored["members"]) == 2 and stored["images"] == 15
    # The report again: the ensemble is read back, not scored and logged a second time.
    _ptxlab("report", "real-sample-mini", "--out", page, timeout=600)
    history = client.get_metric_history(parent.info.run_id, "ensemble_test_pooled_iou")
    assert len(history) == 1
