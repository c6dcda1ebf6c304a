"""`check_dataset` and `ptxlab data check`: every file read, every bad input named in one line."""

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from ptxlab.cli import app
from ptxlab.data.cases import Case, DataError
from ptxlab.data.check import check_dataset
from ptxlab.data.io import read_image, read_mask
from tests.conftest import build_siim_png, sample_rows


def test_check_reads_the_whole_sample(siim_sample, tmp_path):
    build_siim_png(siim_sample, tmp_path)
    report = check_dataset(tmp_path, progress=False)
    rows = sample_rows(siim_sample)
    assert report.ok and report.problems == []
    assert (report.layout, report.n_images, report.n_positive, report.n_negative) == (
        "siim-png",
        72,
        53,
        19,
    )
    assert report.mask_pixels == sum(int(row["mask_pixels"]) for row in rows)
    assert report.image_sizes == {"1024x1024": 72}
    assert report.sites == {
        "test": {"images": 20, "positive": 6, "negative": 14},
        "train": {"images": 52, "positive": 47, "negative": 5},
    }
    assert json.loads(json.dumps(report.to_dict()))["n_positive"] == 53


def test_labels_that_disagree_with_masks(siim_sample, tmp_path):
    base = build_siim_png(siim_sample, tmp_path)
    rows = sample_rows(siim_sample)
    masks = {row["image_id"]: base / "png_masks" / row["vbookshelf_name"] for row in rows}
    positive = next(row for row in rows if row["has_pneumo"] == "1")
    negative = next(row for row in rows if row["has_pneumo"] == "0")
    for row, other in ((positive, negative), (negative, positive)):
        masks[row["image_id"]].unlink()
        masks[row["image_id"]].symlink_to(siim_sample / "masks" / other["file"])
    report = check_dataset(tmp_path, progress=False)
    problems = {problem.file: problem.reason for problem in report.problems}
    assert problems == {
        str(masks[positive["image_id"]]): "labelled positive but the mask is empty",
        str(masks[negative["image_id"]]): (
            f"labelled negative but the mask has {positive['mask_pixels']} foreground pixels"
        ),
    }
    assert (report.n_positive, report.n_negative) == (53, 19)


@pytest.fixture
def broken_folder(siim_sample, tmp_path):
    """A folder-layout set with two good cases and one bad file per kind of bad input."""
    rows = sample_rows(siim_sample)
    good = [next(r for r in rows if r["has_pneumo"] == v) for v in ("1", "0")]
    source = siim_sample / "images" / good[0]["file"]
    image = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(siim_sample / "masks" / good[0]["file"]), cv2.IMREAD_UNCHANGED)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for row in good:
        (images / row["file"]).symlink_to(siim_sample / "images" / row["file"])
        (masks / row["file"]).symlink_to(siim_sample / "masks" / row["file"])
    bad_images = {
        "truncated.png": source.read_bytes()[: source.stat().st_size // 2],
        "cut.jpg": cv2.imencode(".jpg", image)[1].tobytes()[:5000],
        "garbage.png": b"this is not an image",
        "empty.png": b"",
        "rgba.png": cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_GRAY2BGRA))[1].tobytes(),
        "deep.png": cv2.imencode(".png", image.astype(np.uint16) * 257)[1].tobytes(),
        "size.png": source.read_bytes(),
    }
    for name, data in bad_images.items():
        (images / name).write_bytes(data)
        cv2.imwrite(str(masks / f"{name[:-4]}.png"), mask)
    cv2.imwrite(str(masks / "size.png"), mask[:512, :512])
    (images / "values.png").symlink_to(source)
    cv2.imwrite(str(masks / "values.png"), (mask // 255) * 128)
    return tmp_path


EXPECTED_PROBLEMS = {
    "images/truncated.png": "truncated PNG (no IEND chunk at the end)",
    "images/cut.jpg": "truncated JPEG (no end-of-image marker)",
    "images/garbage.png": "not a decodable PNG or JPEG image",
    "images/empty.png": "empty file",
    "images/rgba.png": "RGBA image (4 channels); expected 8-bit grayscale",
    "images/deep.png": "16-bit image; expected 8-bit grayscale",
    "masks/size.png": "mask is 512x512 but its image size.png is 1024x1024",
    "masks/values.png": "mask values must be only 0/255 or only 0/1, found 0, 128",
}


def test_every_bad_input_is_one_problem(broken_folder):
    report = check_dataset(broken_folder, progress=False)
    found = {problem.file: problem.reason for problem in report.problems}
    assert found == {
        str(broken_folder / name): reason for name, reason in EXPECTED_PROBLEMS.items()
    }
    assert report.n_images == 9  # every image except values.png, whose mask is unreadable
    assert not report.ok


@pytest.mark.parametrize("name", sorted(EXPECTED_PROBLEMS))
def test_each_bad_input_raises_its_one_line_error(broken_folder, name):
    file_name = name.split("/")[1]
    stem = file_name.rsplit(".", 1)[0]
    image = broken_folder / "images" / file_name
    case = Case(stem, image, True, mask=broken_folder / "masks" / f"{stem}.png")
    with pytest.raises(DataError) as error:
        read_mask(case, read_image(case).shape)
    assert str(error.value) == f"{broken_folder / name}: {EXPECTED_PROBLEMS[name]}"


def test_cli_check_json_on_the_sample(siim_sample, tmp_path):
    build_siim_png(siim_sample, tmp_path)
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["layout"], report["n_images"], report["n_positive"], report["n_negative"]) == (
        "siim-png",
        72,
        53,
        19,
    )
    assert report["mask_pixels"] == sum(int(row["mask_pixels"]) for row in sample_rows(siim_sample))
    assert report["problems"] == [] and report["left_out"] == []


def test_cli_check_fails_on_a_broken_file(siim_sample, tmp_path):
    build_siim_png(siim_sample, tmp_path)
    broken = next((tmp_path / "siim-acr-pneumothorax" / "png_images").iterdir())
    broken.unlink()
    broken.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["problems"] == [
        {"file": str(broken), "reason": "truncated PNG (no IEND chunk at the end)"}
    ]
    table = CliRunner().invoke(app, ["data", "check", str(tmp_path)])
    assert table.exit_code == 1 and "truncated PNG" in table.stdout


def test_cli_check_unusable_folder_is_one_line_on_stderr_and_json_on_stdout(tmp_path):
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path / "absent"), "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"error": f"{tmp_path / 'absent'}: no such folder"}
    assert result.stderr.strip() == f"error: {tmp_path / 'absent'}: no such folder"
