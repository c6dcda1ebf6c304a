"""`ptxlab evaluate` and `ptxlab predict` with a tiny model trained once on synthetic phantoms.

The model is poor on real radiographs; these tests check that what is measured, logged and
written is exactly right at native resolution, not that the model is good.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ptxlab import tracking
from ptxlab.artifacts import MODEL as MODEL_ARTIFACT
from ptxlab.artifacts import POSTPROCESS as POSTPROCESS_ARTIFACT
from ptxlab.augment import build_eval_transform
from ptxlab.cli import app
from ptxlab.config import load_config
from ptxlab.data.cache import resize_image, resize_mask
from ptxlab.data.dataset import SegmentationDataset
from ptxlab.data.io import read_image, read_mask
from ptxlab.data.layouts import load_cases
from ptxlab.data.sources import read_pair
from ptxlab.evaluation import evaluate_run
from ptxlab.experiment import run_experiment
from ptxlab.inference import load_trained_model, predict
from ptxlab.postprocess import PostProcessing, apply
from ptxlab.prediction import load_run, predict_native
from tests.conftest import SIIM_SAMPLE, private_store, sample_rows

SAMPLE = SIIM_SAMPLE
NATIVE = 1024
TINY_RUN = [
    "data.synthetic.n_images=24",
    "data.synthetic.size=64",
    "data.image_size=64",
    "data.val_fraction=0.25",
    "model.encoder=resnet18",
    "model.encoder_weights=null",
    "model.decoder_channels=[16,16,16,16,16]",
    "train.epochs=1",
    "train.batch_size=8",
    "train.device=cpu",
    "tracking.system_metrics=false",
    "tracking.overlays=0",
    # A fixed rule with a minimum area, so component removal runs and scales to 1024².
    "postprocess.search=false",
    "postprocess.threshold=0.5",
    "postprocess.min_area=2",
    "postprocess.resolution=64",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"{SAMPLE} is not present"),
]


@dataclass
class Trained:
    run_id: str
    root: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """One tiny run for the whole module, in a private MLflow store, cache and working dir."""
    root = tmp_path_factory.mktemp("evaluate-predict")
    with private_store(root):
        summary = run_experiment(load_config(None, TINY_RUN), progress=False)
        assert summary.best_epoch == 0
        yield Trained(summary.run_id, root)


def folder_subset(root: Path, positives: int, negatives: int) -> Path:
    """A folder-layout data set of symlinks to the first positives and negatives of the sample."""
    rows = sample_rows()
    chosen = ([r for r in rows if r["has_pneumo"] == "1"][:positives]
              + [r for r in rows if r["has_pneumo"] == "0"][:negatives])
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for row in chosen:
        (root / "images" / row["file"]).symlink_to(SAMPLE / "images" / row["file"])
        (root / "masks" / row["file"]).symlink_to(SAMPLE / "masks" / row["file"])
    return root


def invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def artifact(trained: Trained, path: str) -> Path:
    return tracking.download_artifact(trained.run_id, path, trained.root / "downloads")


def artifact_text(trained: Trained, path: str) -> str:
    return artifact(trained, path).read_text()


def artifact_image(trained: Trained, path: str) -> np.ndarray:
    image = cv2.imread(str(artifact(trained, path)), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def evaluated(trained: Trained):
    """`ptxlab evaluate --json` on 8 positive and 4 negative real cases at 1024²."""
    data = folder_subset(trained.root / "siim_subset", positives=8, negatives=4)
    result = invoke("evaluate", trained.run_id, "--data", data, "--json", "--batch-size", 5)
    assert result.exit_code == 0, result.output
    return data, json.loads(result.stdout)


def test_evaluate_logs_metrics_into_the_run_and_keeps_it_finished(trained, evaluated):
    _, summary = evaluated
    assert summary["name"] == "siim_subset"
    assert summary["image_size"] == 64
    assert summary["postprocess"] == {"kind": "threshold", "threshold": 0.5, "min_area": 2,
                                      "resolution": 64}
    metrics = summary["metrics"]
    assert metrics["n_images"] == 12 and metrics["n_positive"] == 8
    assert summary["per_site"] == {}  # the folder layout has no sites
    run = MlflowClient().get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith("siim_subset_")}
    expected = {f"siim_subset_{k}": v for k, v in metrics.items() if v is not None}
    assert logged.keys() == expected.keys()
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-12), key
    stored = json.loads(artifact_text(trained, "evaluation/siim_subset/metrics.json"))
    assert stored["metrics"] == metrics


def test_per_image_csv_matches_the_masks_and_the_metrics(trained, evaluated):
    data, summary = evaluated
    rows = read_csv(artifact_text(trained, "evaluation/siim_subset/per_image.csv"))
    assert list(rows[0]) == ["id", "site", "truth_area", "pred_area", "dice", "iou", "score"]
    masks = {path.stem: path for path in (data / "masks").iterdir()}
    assert sorted(row["id"] for row in rows) == sorted(masks)
    for row in rows:
        truth = cv2.imread(str(masks[row["id"]]), cv2.IMREAD_GRAYSCALE)
        assert int(row["truth_area"]) == np.count_nonzero(truth)
        assert 0 <= int(row["pred_area"]) <= NATIVE * NATIVE
    metrics = summary["metrics"]
    dice = np.array([float(row["dice"]) for row in rows])
    positive = np.array([int(row["truth_area"]) > 0 for row in rows])
    assert metrics["mean_dice"] == pytest.approx(dice.mean(), rel=1e-9)
    assert metrics["mean_dice_pos"] == pytest.approx(dice[positive].mean(), rel=1e-9)
    assert metrics["mean_dice_neg"] == pytest.approx(dice[~positive].mean(), rel=1e-9)
    assert metrics["mean_iou"] == pytest.approx(np.mean([float(r["iou"]) for r in rows]))

    called = np.array([int(row["pred_area"]) > 0 for row in rows])
    counts = [[int(np.sum(~positive & ~called)), int(np.sum(~positive & called))],
              [int(np.sum(positive & ~called)), int(np.sum(positive & called))]]
    assert summary["image_confusion"]["counts"] == counts
    assert artifact_image(trained, "evaluation/siim_subset/confusion_matrix.png").ndim == 3
    gallery = artifact_image(trained, "evaluation/siim_subset/worst_cases.png")
    assert gallery.shape[0] == 2 * gallery.shape[1]  # 8 rows of 4 panels: 12 x 24 inches


def reference_evaluation(trained: Trained, data: Path) -> dict[str, object]:
    """Pooled and per-image numbers computed directly, outside the streaming evaluation."""
    model, config = load_trained_model(artifact(trained, MODEL_ARTIFACT), torch.device("cpu"))
    rule = PostProcessing.from_dict(json.loads(artifact_text(trained, POSTPROCESS_ARTIFACT)))
    size = config.data.image_size
    assert config.data.cache  # so training saw INTER_AREA-resized inputs, as below

    def at_model_size(case):
        image = read_image(case)
        return resize_image(image, size), resize_mask(read_mask(case, image.shape), size)

    cases = load_cases(data, "folder")
    small = predict(model, SegmentationDataset(cases, at_model_size, build_eval_transform(size),
                                               seed=0), torch.device("cpu"), progress=False)
    per_image, totals = {}, np.zeros(3, dtype=np.int64)
    for case, probs in zip(cases, small.probs, strict=True):
        truth = read_mask(case, (NATIVE, NATIVE)).astype(bool)
        native = cv2.resize(probs, (NATIVE, NATIVE), interpolation=cv2.INTER_LINEAR)
        mask = apply(native, rule).astype(bool)
        tp, fp, fn = (np.count_nonzero(mask & truth), np.count_nonzero(mask & ~truth),
                      np.count_nonzero(~mask & truth))
        totals += (tp, fp, fn)
        dice = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
        per_image[case.case_id] = {"pred_area": tp + fp, "dice": dice, "positive": case.positive,
                                   "score": probs.max() / 255.0}
    tp, fp, fn = totals
    scores = {True: [], False: []}
    for values in per_image.values():
        scores[values["positive"]].append(values["score"])
    pairs = list(product(scores[True], scores[False]))
    auc = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    return {"per_image": per_image, "pooled_iou": tp / (tp + fp + fn),
            "pooled_dice": 2 * tp / (2 * tp + fp + fn), "auc": auc}


def test_metrics_equal_a_direct_native_resolution_computation(trained):
    data = folder_subset(trained.root / "four", positives=2, negatives=2)
    evaluation = evaluate_run(trained.run_id, data, "folder", progress=False)
    expected = reference_evaluation(trained, data)
    assert expected["pooled_iou"] > 0  # the comparison is not between two empty predictions
    for key in ("pooled_iou", "pooled_dice", "auc"):
        assert evaluation.metrics[key] == pytest.approx(expected[key], rel=1e-12), key
    for row in evaluation.rows:
        reference = expected["per_image"][row["id"]]
        assert row["pred_area"] == reference["pred_area"]
        assert row["dice"] == pytest.approx(reference["dice"], rel=1e-12)
        assert row["score"] == pytest.approx(reference["score"], rel=1e-12)


def test_per_site_breakdown_for_a_layout_with_sites(trained):
    """PTX-498 layout (sites = folders) built from five sample positives."""
    positives = [row for row in sample_rows() if row["has_pneumo"] == "1"][:5]
    root = trained.root / "ptx"
    for index, row in enumerate(positives):
        folder = root / "PTX-498-v2-fix" / ("SiteA" if index < 3 else "SiteB")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index}.1.img.png").symlink_to(SAMPLE / "images" / row["file"])
        (folder / f"{index}.2.mask.png").symlink_to(SAMPLE / "masks" / row["file"])
    result = invoke("evaluate", trained.run_id, "--data", root, "--name", "ptx 498", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["name"] == "ptx_498"
    per_site = summary["per_site"]
    assert {site: m["n_images"] for site, m in per_site.items()} == {"SiteA": 3, "SiteB": 2}
    rows = read_csv(artifact_text(trained, "evaluation/ptx_498/per_image.csv"))
    logged = MlflowClient().get_run(trained.run_id).data.metrics
    for site, metrics in per_site.items():
        dice = [float(row["dice"]) for row in rows if row["site"] == site]
        assert metrics["mean_dice"] == pytest.approx(np.mean(dice), rel=1e-9)
        assert logged[f"ptx_498_{site}_mean_dice"] == pytest.approx(metrics["mean_dice"])


def test_evaluate_with_flip_tta_prints_a_table_and_logs_under_its_own_name(trained, evaluated):
    data, _ = evaluated
    result = invoke("evaluate", trained.run_id, "--data", data, "--tta", "hflip")
    assert result.exit_code == 0, result.output
    assert "pooled_iou" in result.stdout and "mean_dice_pos" in result.stdout
    assert "evaluation/siim_subset_hflip/" in result.stdout
    logged = MlflowClient().get_run(trained.run_id).data.metrics
    assert logged["siim_subset_hflip_n_images"] == 12


def test_prediction_streams_one_batch_at_a_time(trained, evaluated):
    data, _ = evaluated
    cases = load_cases(data, "folder")
    reads = []

    def counting_reader(case):
        reads.append(case.case_id)
        return read_pair(case)

    stream = predict_native(load_run(trained.run_id), cases, counting_reader, batch_size=5,
                            progress=False)
    first = next(stream)
    assert len(reads) == 5
    assert first.probs.shape == first.mask.shape == first.truth.shape == (NATIVE, NATIVE)
    assert len(list(stream)) == len(cases) - 1 and reads == [case.case_id for case in cases]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["no-such-run", "--data", SAMPLE], "run no-such-run: not found"),
        (["{run}", "--data", "/no/such/folder"], "/no/such/folder: no such folder"),
        (["{run}", "--data", SAMPLE, "--tta", "vflip"], "--tta 'vflip'"),
    ],
)
def test_evaluate_errors_are_one_line(trained, arguments, message):
    arguments = [str(a).replace("{run}", trained.run_id) for a in arguments]
    result = invoke("evaluate", *arguments)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


def read_gray(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def test_predict_png_dicom_and_folder_at_native_resolution(trained, tmp_path):
    dicom = sorted((SAMPLE / "dicom").glob("*.dcm"))[0]
    pngs = sorted(p for p in (SAMPLE / "images").glob("*.png") if p.stem != dicom.stem)[:3]
    nested = tmp_path / "folder" / "nested"
    nested.mkdir(parents=True)
    for png in pngs[1:]:
        (nested / png.name).symlink_to(png)
    out = tmp_path / "out"
    result = invoke("predict", trained.run_id, pngs[0], dicom, tmp_path / "folder", "--out", out)
    assert result.exit_code == 0, result.output
    stems = [pngs[0].stem, dicom.stem, pngs[1].stem, pngs[2].stem]
    expected = {f"{s}_{kind}.png" for s in stems for kind in ("mask", "overlay")}
    assert {p.name for p in out.iterdir()} == expected | {"predictions.csv"}
    rows = {Path(row["file"]).stem: row for row in read_csv((out / "predictions.csv").read_text())}
    assert sorted(rows) == sorted(stems)
    for stem in stems:
        mask = read_gray(out / f"{stem}_mask.png")
        assert mask.shape == (NATIVE, NATIVE) and set(np.unique(mask)) <= {0, 255}
        assert read_gray(out / f"{stem}_overlay.png").shape == (NATIVE, NATIVE, 3)
        assert int(rows[stem]["predicted_area"]) == np.count_nonzero(mask)
        assert rows[stem]["positive"] == str(int(mask.any()))
        assert 0.0 <= float(rows[stem]["score"]) <= 1.0

    # The DICOM's pixels equal its PNG copy's, so the PNG gives the same mask.
    again = tmp_path / "again"
    result = invoke("predict", trained.run_id, SAMPLE / "images" / f"{dicom.stem}.png",
                    "--out", again, "--no-overlay")
    assert result.exit_code == 0, result.output
    assert {p.name for p in again.iterdir()} == {f"{dicom.stem}_mask.png", "predictions.csv"}
    np.testing.assert_array_equal(read_gray(again / f"{dicom.stem}_mask.png"),
                                  read_gray(out / f"{dicom.stem}_mask.png"))

    header = pydicom.dcmread(dicom, stop_before_pixels=True)
    identifiers = [str(header.PatientID), str(header.StudyInstanceUID),
                   str(header.SeriesInstanceUID)]
    for written in out.iterdir():
        content = written.read_bytes()
        assert not any(value.encode() in content for value in identifiers), written.name


@pytest.mark.parametrize("bad_kind", ["truncated.png", "junk.dcm"])
@pytest.mark.parametrize("out_exists", [False, True])
def test_predict_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, bad_kind,
                                                          out_exists):
    good = sorted((SAMPLE / "images").glob("*.png"))[0]
    bad = tmp_path / bad_kind
    if bad_kind.endswith(".png"):
        bad.write_bytes(good.read_bytes()[:5000])
    else:
        bad.write_bytes(b"\0" * 128 + b"DICM" + b"not really a data set")
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    result = invoke("predict", trained.run_id, good, bad, "--out", out)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0]
    assert result.stdout == ""
    if out_exists:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()


def test_predict_refuses_inputs_that_would_share_an_output_name(trained, tmp_path):
    png = SAMPLE / "images" / f"{sorted((SAMPLE / 'dicom').glob('*.dcm'))[0].stem}.png"
    dicom = SAMPLE / "dicom" / f"{png.stem}.dcm"
    result = invoke("predict", trained.run_id, png, dicom, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert f"same output name {png.stem!r}" in result.stderr
    assert not (tmp_path / "out").exists()
