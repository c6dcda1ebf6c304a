"""Benchmark: training time a study saves by scoring evaluation-only factors on stored maps.

Runs one grid twice from scratch, with one worker, in a temporary working directory (its own
MLflow store, journal storage and caches): once as studies run by default (every level of the
post-processing factors scored on the stored validation maps of one training per learning rate
and repeat) and once with `share_trainings: false` (every trial trains; the baseline). The grid
is the smoke study's (synthetic phantoms, a ResNet-10t U-Net from scratch) with two learning
rates (the training factor) crossed with the post-processing rule (BT/RT or triplet) and its
search objective (pooled IoU or per-image Dice): 4 evaluation arms per training. It asserts
that both runs give the same post-processing metrics for the same (configuration, repeat), and
prints, for each run, the trainings and the time spent in trials that trained, and the ratio of
training time last (expected: about 1 / 4, the arms per training).

    python benchmarks/study_cost.py [--epochs 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]
SPACE = {
    "optim.lr": {"type": "categorical", "choices": [0.003, 0.001]},
    "postprocess.rule": {"type": "categorical", "choices": ["threshold", "triplet"]},
    "postprocess.objective": {"type": "categorical", "choices": ["pooled_iou", "mean_dice"]},
}
COMPARED = ("pooled_iou", "mean_dice", "auc", "sensitivity", "specificity")


def study_file(directory: Path, name: str, epochs: int, repeats: int, share: bool) -> Path:
    tree = yaml.safe_load((ROOT / "experiments/studies/smoke.yaml").read_text())
    tree.update(name=name, base=str(ROOT / "experiments/default.yaml"), repeats=repeats,
                hypotheses=[], space=SPACE, share_trainings=share)
    tree["set"].update({"train.epochs": epochs, "augment.preset": "light"})
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def run(path: Path) -> dict:
    """Sweep the study; its trainings, the seconds of trials that trained, metrics by trial."""
    from ptxlab.sweep import load_existing, run_sweep

    started = time.perf_counter()
    result = run_sweep(path, log=lambda text: None)
    wall = time.perf_counter() - started
    handle, _ = load_existing(str(path), None)
    trials = handle.study.get_trials(deepcopy=False)
    failures = {t.user_attrs.get("fail_reason") for t in trials if "fail_reason" in t.user_attrs}
    assert result.counts.complete == result.budget, (result.counts, failures)
    trained = [t for t in trials if t.user_attrs.get("ptxlab.role") == "train"]
    return {
        "trials": len(trials),
        "trainings": len(trained),
        "training_s": sum((t.datetime_complete - t.datetime_start).total_seconds()
                          for t in trained),
        "wall_s": wall,
        "metrics": {(tuple(sorted(t.params.items())), t.user_attrs["repeat"]):
                    t.user_attrs["metrics"] for t in trials},
    }


def check_identical(shared: dict, every: dict) -> int:
    """Same post-processing metrics for every (configuration, repeat); returns how many."""
    assert shared.keys() == every.keys()
    for key, metrics in shared.items():
        for name in COMPARED:
            a, b = metrics[name], every[key][name]
            same = (a is None and b is None) or (a is not None and b is not None and (
                math.isclose(a, b, rel_tol=0, abs_tol=1e-9)))
            assert same, f"{key}: {name} {a} (shared training) != {b} (own training)"
    return len(shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per training")
    parser.add_argument("--repeats", type=int, default=2, help="seeds per configuration")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ptxlab-study-cost-") as workdir:
        os.chdir(workdir)
        os.environ.update({"MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db",
                           "PTXLAB_CACHE": f"{workdir}/cache", "PTXLAB_PROGRESS": "0",
                           "PTXLAB_CHECKPOINTS": f"{workdir}/checkpoints"})
        directory = Path(workdir)
        shared = run(study_file(directory, "shared", args.epochs, args.repeats, share=True))
        every = run(study_file(directory, "every", args.epochs, args.repeats, share=False))
    compared = check_identical(shared["metrics"], every["metrics"])
    arms = shared["trials"] // shared["trainings"]
    for label, result in (("evaluation-only arms scored on stored maps", shared),
                          ("every trial trains (share_trainings: false)", every)):
        print(f"{label:45s}: {result['trials']} trials, {result['trainings']} trainings, "
              f"{result['training_s']:.1f} s in trials that trained, sweep {result['wall_s']:.1f} s")
    print(f"identical post-processing metrics ({', '.join(COMPARED)}) for all {compared} "
          "(configuration, repeat) pairs")
    print(f"sweep wall-clock ratio (shared / every trial trains): "
          f"{shared['wall_s'] / every['wall_s']:.3f}")
    print(f"ratio (training time, shared / every trial trains; expected about 1/{arms}): "
          f"{shared['training_s'] / every['training_s']:.3f}")


if __name__ == "__main__":
    main()
