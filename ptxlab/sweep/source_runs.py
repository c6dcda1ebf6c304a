"""The finished runs a `postprocess` study scores: choosing them, loading their validation maps."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

from ptxlab import artifacts, tracking
from ptxlab.config import load_config
from ptxlab.inference import Predictions
from ptxlab.postprocess import load_probability_maps
from ptxlab.sweep.study_file import SourceSpec


def resolve_source_runs(source: SourceSpec, count: int) -> list[str]:
    """The listed runs, or the newest `count` finished runs of the experiment with maps."""
    client = tracking.configure()
    if source.runs:
        for run_id in source.runs:
            if not _has_maps(client, run_id):
                raise FileNotFoundError(f"run {run_id} has no {artifacts.VALIDATION_MAPS}")
        return list(source.runs)
    experiment = client.get_experiment_by_name(source.experiment)
    if experiment is None:
        raise ValueError(f"source.experiment {source.experiment!r} does not exist")
    query = "attributes.status = 'FINISHED'" + (f" and {source.filter}" if source.filter else "")
    found = []
    for run in client.search_runs([experiment.experiment_id], query,
                                  order_by=["attributes.start_time DESC"], max_results=200):
        if _has_maps(client, run.info.run_id):
            found.append(run.info.run_id)
        if len(found) == count:
            return found
    raise ValueError(f"source: {len(found)} finished runs with validation maps in experiment "
                     f"{source.experiment!r}, the study needs repeats={count}")


def _has_maps(client, run_id: str) -> bool:
    return any(item.path == artifacts.VALIDATION_MAPS for item in client.list_artifacts(
        run_id, artifacts.folder(artifacts.VALIDATION_MAPS)))


@lru_cache(maxsize=1)  # a grid's queue runs repeat by repeat: one source run after another
def validation_predictions(run_id: str) -> tuple[Predictions, int]:
    """A finished run's stored validation maps with their truths and head probabilities, and
    its post-processing resolution."""
    with tempfile.TemporaryDirectory(prefix="ptxlab-maps-") as workdir:
        stored = load_probability_maps(
            tracking.download_artifact(run_id, artifacts.VALIDATION_MAPS, Path(workdir)))
        config = load_config(
            tracking.download_artifact(run_id, artifacts.RESOLVED_CONFIG, Path(workdir)))
    if stored.truths is None:
        raise ValueError(f"run {run_id}: its {artifacts.VALIDATION_MAPS} has no truths "
                         "(written by an older ptxlab); train the run again")
    predictions = Predictions(stored.ids, stored.probs, stored.truths, stored.head_probs)
    return predictions, config.postprocess.resolution
