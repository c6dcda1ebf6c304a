"""Each published layout, built in tmp_path from the real sample (symlinks), is detected and loaded."""

import gzip
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from ptxlab.cli import app
from ptxlab.data.cases import DataError
from ptxlab.data.io import read_image, read_mask, read_mask_file
from ptxlab.data.layouts import LAYOUTS, detect_layout, load_cases, natural_key, scan_layout
from tests.conftest import build_siim_png, sample_rows


def full_label_lines(sample):
    with gzip.open(sample / "rle/siim-pneumothorax-train-rle.csv.gz", "rt") as handle:
        return handle.read().splitlines()[1:]


def build_siim_dicom(sample, root, csv_name="train-rle.csv"):
    """Kaggle stage 1: dicom-images-{train,test}/<study>/<series>/<ImageId>.dcm + train-rle.csv."""
    split = {row["image_id"]: row["siim_split"] for row in sample_rows(sample)}
    ids = []
    for number, path in enumerate(sorted((sample / "dicom").glob("*.dcm"))):
        folder = "dicom-images-train" if split[path.stem] == "stage1_train" else "dicom-images-test"
        target = root / folder / f"study{number}" / f"series{number}" / path.name
        target.parent.mkdir(parents=True)
        target.symlink_to(path)
        ids.append(path.stem)
    rows = [line for line in full_label_lines(sample) if line.split(",")[0] in ids]
    text = "ImageId, EncodedPixels\n" + "".join(f"{line.replace(',', ', ', 1)}\n" for line in rows)
    label_file = root / csv_name
    label_file.parent.mkdir(parents=True, exist_ok=True)
    if csv_name.endswith(".gz"):
        label_file.write_bytes(gzip.compress(text.encode()))
    else:
        label_file.write_text(text)
    return label_file


def build_ptx498(sample, root):
    """PTX-498.zip extracted: PTX-498/PTX-498-v2-fix/Site{A,B,C}/<n>.{1.img,2.mask,3.merge}.png."""
    positives = [row for row in sample_rows(sample) if row["has_pneumo"] == "1"][:9]
    expected = {}
    for index, row in enumerate(positives):
        site = "Site" + "ABC"[index % 3]
        number = (1, 2, 10)[index // 3]
        folder = root / "PTX-498" / "PTX-498-v2-fix" / site
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{number}.1.img.png").symlink_to(sample / "images" / row["file"])
        (folder / f"{number}.2.mask.png").symlink_to(sample / "masks" / row["file"])
        (folder / f"{number}.3.merge.png").symlink_to(sample / "images" / row["file"])
        (folder / f"{number}.4.img.nii.gz").write_bytes(b"")
        expected[f"{site}_{number}"] = row
    return expected


def build_folder(sample, root, rows):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for row in rows:
        (root / "images" / row["file"]).symlink_to(sample / "images" / row["file"])
        (root / "masks" / row["file"]).symlink_to(sample / "masks" / row["file"])


def png(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.mark.parametrize("from_parent", [False, True])
def test_siim_png(siim_sample, tmp_path, from_parent):
    base = build_siim_png(siim_sample, tmp_path)
    root = tmp_path if from_parent else base
    assert detect_layout(root) == "siim-png"
    cases = load_cases(root)
    rows = {row["image_id"]: row for row in sample_rows(siim_sample)}
    assert [case.case_id for case in cases] == sorted(rows, key=natural_key)
    assert sum(case.positive for case in cases) == 53
    assert {case.site for case in cases} == {"train", "test"}
    assert sum(case.site == "test" for case in cases) == 20
    for case in cases:
        row = rows[case.case_id]
        assert case.positive == (row["has_pneumo"] == "1")
        assert case.image.name == case.mask.name == row["vbookshelf_name"]
        assert case.site == row["siim_split"].removeprefix("stage1_")


def test_siim_png_inconsistencies_are_problems(siim_sample, tmp_path):
    base = build_siim_png(siim_sample, tmp_path)
    label_file = base / "stage_1_train_images.csv"
    lines = label_file.read_text().splitlines()
    name, image_id, _ = lines[1].split(",")
    lines[1] = f"{name},{image_id},0"  # the file name says 1
    label_file.write_text("\n".join(lines) + "\n")
    (base / "png_images" / lines[2].split(",")[0]).unlink()
    (base / "png_images" / "99999_train_0_.png").symlink_to(
        next((siim_sample / "images").iterdir())
    )
    scan = scan_layout(base)
    reasons = sorted(error.problem for error in scan.problems)
    assert len(reasons) == 3
    assert reasons[0].startswith("line 2: ") and "has_pneumo is 0" in reasons[0]
    assert reasons[1] == "listed in stage_1_train_images.csv line 3 but missing"
    assert reasons[2] == "not listed in any stage_1_*_images.csv"
    assert len(scan.cases) == 70
    with pytest.raises(DataError, match=r"\(and 2 more problems"):
        load_cases(base)


def test_siim_dicom(siim_sample, tmp_path):
    build_siim_dicom(siim_sample, tmp_path)
    assert detect_layout(tmp_path) == "siim-dicom"
    cases = load_cases(tmp_path)
    assert len(cases) == 27
    assert sum(case.positive for case in cases) == 10
    assert {case.site for case in cases} == {"train", "test"}
    for case in cases:
        assert case.case_id == case.image.stem and case.mask is None
        assert bool(case.rle) == case.positive
        image = read_image(case)
        np.testing.assert_array_equal(image, png(siim_sample / "images" / f"{case.case_id}.png"))
        expected = png(siim_sample / "masks" / f"{case.case_id}.png") // 255
        np.testing.assert_array_equal(read_mask(case, image.shape), expected)


@pytest.mark.parametrize("csv_name", ["stage_2_train.csv.gz", "labels/given-name.csv"])
def test_siim_dicom_other_label_file_names(siim_sample, tmp_path, csv_name):
    build_siim_dicom(siim_sample, tmp_path, csv_name)
    given = None if csv_name.startswith("stage_2") else csv_name
    cases = load_cases(tmp_path, "siim-dicom", rle_csv=given)
    assert len(cases) == 27 and sum(case.positive for case in cases) == 10


def test_siim_dicom_label_row_without_image_is_left_out(siim_sample, tmp_path):
    label_file = build_siim_dicom(siim_sample, tmp_path)
    present = {path.stem for path in (siim_sample / "dicom").glob("*.dcm")}
    extra = next(
        line for line in full_label_lines(siim_sample) if line.split(",")[0] not in present
    )
    with label_file.open("a") as handle:
        handle.write(extra + "\n")
    missing_id = extra.split(",")[0]
    scan = scan_layout(tmp_path)
    assert len(scan.cases) == 27 and not scan.problems
    [left_out] = scan.left_out
    assert str(left_out) == (
        f"{label_file}: RLE row for image {missing_id}, which has no DICOM under {tmp_path}"
    )


def test_siim_dicom_unlabelled_images_are_left_out_as_kaggle_stage_1_publishes_them(
        siim_sample, tmp_path, caplog):
    """Stage 1's train-rle.csv labels dicom-images-train only; dicom-images-test is unlabelled."""
    label_file = build_siim_dicom(siim_sample, tmp_path)
    test_ids = {path.stem for path in (tmp_path / "dicom-images-test").rglob("*.dcm")}
    lines = label_file.read_text().splitlines()
    label_file.write_text("\n".join(line for line in lines
                                    if line.split(",")[0] not in test_ids) + "\n")
    cases = load_cases(tmp_path)
    assert {case.site for case in cases} == {"train"} and len(cases) == 27 - len(test_ids)
    assert f"{tmp_path}: {len(test_ids)} files left out" in caplog.text
    scan = scan_layout(tmp_path)
    assert not scan.problems
    assert sorted(Path(entry.path).stem for entry in scan.left_out) == sorted(test_ids)
    assert {entry.problem.split(":")[0] for entry in scan.left_out} == {"unlabelled"}
    checked = CliRunner().invoke(app, ["data", "check", str(tmp_path), "--json"])
    assert checked.exit_code == 0, checked.output  # unlabelled images are no problem
    report = json.loads(checked.stdout)
    assert (report["n_images"], len(report["left_out"])) == (len(cases), len(test_ids))
    table = CliRunner().invoke(app, ["data", "check", str(tmp_path)])
    assert f"{len(test_ids)} left out" in table.stdout and "no problems" in table.stdout
    caplog.clear()
    cached = CliRunner().invoke(app, ["data", "cache", str(tmp_path), "--size", "32",
                                      "--skip-bad", "--cache-dir", str(tmp_path / "cache")])
    assert cached.exit_code == 0, cached.output
    assert f"{len(cases)} cases cached" in cached.stdout
    assert f"{len(test_ids)} files left out" in caplog.text


def test_siim_dicom_label_file_that_labels_no_image(siim_sample, tmp_path):
    label_file = build_siim_dicom(siim_sample, tmp_path)
    label_file.write_text("ImageId, EncodedPixels\n1.2.3.4, -1\n")
    with pytest.raises(DataError) as error:
        load_cases(tmp_path)
    assert str(error.value) == f"{label_file}: labels none of the 27 DICOMs under {tmp_path}"


def test_ptx498(siim_sample, tmp_path):
    expected = build_ptx498(siim_sample, tmp_path)
    assert detect_layout(tmp_path) == "ptx498"
    cases = load_cases(tmp_path)
    ids = [case.case_id for case in cases]
    assert ids == [f"Site{s}_{n}" for s in "ABC" for n in (1, 2, 10)]  # 2 before 10
    assert set(ids) == set(expected)
    for case in cases:
        assert case.positive and case.site == case.case_id.split("_")[0]
        assert case.mask.name.endswith(".2.mask.png")


def test_ptx498_masks_are_thresholded_like_the_published_loaders(siim_sample, tmp_path):
    build_ptx498(siim_sample, tmp_path)
    mask_path = tmp_path / "PTX-498/PTX-498-v2-fix/SiteA/1.2.mask.png"
    binary = png(mask_path) // 255
    soft = (binary * 200).astype(np.uint8)
    soft[cv2.dilate(binary, np.ones((3, 3), np.uint8)) > binary] = 100  # an anti-aliased rim
    mask_path.unlink()
    cv2.imwrite(str(mask_path), soft)
    np.testing.assert_array_equal(read_mask_file(mask_path), binary)
    elsewhere = tmp_path / "mask.png"
    shutil.copy(mask_path, elsewhere)
    with pytest.raises(
        DataError, match="mask values must be only 0/255 or only 0/1, found 0, 100, 200"
    ):
        read_mask_file(elsewhere)


def test_folder_layout_is_the_sample_itself(siim_sample):
    assert detect_layout(siim_sample) == "folder"
    cases = load_cases(siim_sample)
    assert len(cases) == 72 and sum(case.positive for case in cases) == 53
    assert cases == load_cases(siim_sample, "folder")


def test_folder_missing_mask(siim_sample, tmp_path):
    rows = sample_rows(siim_sample)
    rows = [r for r in rows if r["has_pneumo"] == "1"][:3] + [
        r for r in rows if r["has_pneumo"] == "0"
    ][:3]
    build_folder(siim_sample, tmp_path, rows)
    negative = next(row for row in rows if row["has_pneumo"] == "0")
    (tmp_path / "masks" / negative["file"]).unlink()
    with pytest.raises(DataError) as error:
        load_cases(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / 'masks' / negative['file']}: missing mask for {negative['file']}"
    )
    cases = load_cases(tmp_path, missing_mask_is_negative=True)
    assert len(cases) == 6
    unmasked = next(case for case in cases if case.mask is None)
    assert unmasked.image.name == negative["file"] and not unmasked.positive
    assert not read_mask(unmasked, (1024, 1024)).any()


def test_folder_mask_without_image(siim_sample, tmp_path):
    rows = sample_rows(siim_sample)[:3]
    build_folder(siim_sample, tmp_path, rows)
    (tmp_path / "images" / rows[0]["file"]).unlink()
    [problem] = scan_layout(tmp_path).problems
    assert problem.problem == "mask without an image"


def test_each_layout_is_detected_only_as_itself(siim_sample, tmp_path):
    build_siim_png(siim_sample, tmp_path / "png")
    build_siim_dicom(siim_sample, tmp_path / "dicom")
    build_ptx498(siim_sample, tmp_path / "ptx")
    build_folder(siim_sample, tmp_path / "folder", sample_rows(siim_sample)[:2])
    detected = {name: detect_layout(tmp_path / name) for name in ("png", "dicom", "ptx", "folder")}
    assert detected == {
        "png": "siim-png",
        "dicom": "siim-dicom",
        "ptx": "ptx498",
        "folder": "folder",
    }
    assert sorted(detected.values()) == sorted(LAYOUTS)


def test_folders_that_cannot_be_loaded(siim_sample, tmp_path):
    with pytest.raises(DataError) as error:
        load_cases(tmp_path)
    assert str(error.value) == f"{tmp_path}: folder is empty"
    with pytest.raises(DataError, match="no such folder"):
        load_cases(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no known dataset layout found"):
        detect_layout(tmp_path)
    with pytest.raises(DataError, match="unknown layout 'nifti'"):
        load_cases(tmp_path, "nifti")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="no images found in the folder layout"):
        load_cases(tmp_path)
    build_siim_png(siim_sample, tmp_path)
    with pytest.raises(DataError, match=r"matches several layouts \(siim-png, folder\)"):
        detect_layout(tmp_path)
    assert len(load_cases(tmp_path, "siim-png")) == 72
