"""Benchmark: trial-epochs a median pruner saves on a grid study, for the same best result.

Runs one grid twice from scratch, with one worker, in a temporary working directory (its own
MLflow store, journal storage and caches): without pruning (the baseline) and with a median
pruner on validation IoU. The grid is the smoke study's (synthetic phantoms, a ResNet-10t U-Net
from scratch) with four learning rates, two of them too small to learn anything in the epochs
given, and `--repeats` seeds each. For each run it prints the trials complete and pruned, the
epochs trained summed over trials, and the best configuration by the mean objective over
repeats; it asserts that both runs find the same best configuration, and prints the ratio of
trial-epochs last.

    python benchmarks/pruning.py [--epochs 6] [--repeats 3] [--warmup 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).parents[1]
LEARNING_RATES = [0.003, 0.001, 3.0e-7, 1.0e-7]


def study_file(directory: Path, name: str, epochs: int, repeats: int, pruner: dict) -> Path:
    tree = yaml.safe_load((ROOT / "experiments/studies/smoke.yaml").read_text())
    tree.update(name=name, base=str(ROOT / "experiments/default.yaml"), repeats=repeats,
                pruner=pruner, hypotheses=[],
                space={"optim.lr": {"type": "categorical", "choices": LEARNING_RATES}})
    tree["set"].update({"train.epochs": epochs, "augment.preset": "light"})
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def run(path: Path) -> dict:
    """Sweep the study; trial-epochs and the best configuration by mean over repeats."""
    from ptxlab.report import best_configuration, collect, per_repeat
    from ptxlab.sweep import load_existing, run_sweep

    result = run_sweep(path, log=lambda text: None)
    handle, _ = load_existing(str(path), None)
    trials = handle.study.get_trials(deepcopy=False)
    key, group = best_configuration(collect(handle.study), "pooled_iou")
    return {
        "complete": result.counts.complete,
        "pruned": result.counts.pruned,
        "epochs": sum(t.user_attrs.get("epochs_trained", 0) for t in trials),
        "best": dict(key),
        "best_value": float(np.mean(list(per_repeat(group, "pooled_iou").values()))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial")
    parser.add_argument("--repeats", type=int, default=3, help="seeds per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="epochs before a trial is judged")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ptxlab-pruning-"))
    os.chdir(workdir)
    os.environ.update(MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}",
                      PTXLAB_CACHE=str(workdir / "cache"),
                      PTXLAB_CHECKPOINTS=str(workdir / "checkpoints"), PTXLAB_PROGRESS="0")
    median = {"type": "median", "n_startup_trials": len(LEARNING_RATES),
              "n_warmup_steps": args.warmup}
    print(f"grid: optim.lr in {LEARNING_RATES} x {args.repeats} seeds, {args.epochs} epochs "
          f"each; median pruner judging from epoch {args.warmup + 1} (in {workdir})")
    results = {}
    for label, pruner in (("no pruning", {"type": "none"}), ("median pruning", median)):
        slug = label.replace(" ", "-")
        results[label] = run(study_file(workdir, slug, args.epochs, args.repeats, pruner))
        r = results[label]
        print(f"{label}: {r['complete']} complete, {r['pruned']} pruned, {r['epochs']} "
              f"trial-epochs; best {r['best']} with pooled IoU {r['best_value']:.4f}")
    baseline, pruned = results["no pruning"], results["median pruning"]
    assert pruned["best"] == baseline["best"], "pruning changed the best configuration"
    print(f"trial-epochs with pruning / without: {pruned['epochs']} / {baseline['epochs']} = "
          f"{pruned['epochs'] / baseline['epochs']:.2f}")


if __name__ == "__main__":
    main()
