"""SIIM RLE decoding and label-CSV reading, checked against the real sample's masks."""

import gzip

import cv2
import numpy as np
import pytest

from ptxlab.data.cases import DataError
from ptxlab.data.rle import decode_rle, encode_rle, read_rle_csv
from tests.conftest import sample_rows

FULL_LABELS = "rle/siim-pneumothorax-train-rle.csv.gz"


def test_full_label_file_reproduces_every_sample_mask(siim_sample):
    labels = read_rle_csv(siim_sample / FULL_LABELS)
    rows = sample_rows(siim_sample)
    assert len(rows) == 72
    for row in rows:
        png = cv2.imread(str(siim_sample / "masks" / row["file"]), cv2.IMREAD_GRAYSCALE)
        decoded = decode_rle(labels[row["image_id"]], png.shape)
        assert decoded.dtype == np.uint8
        np.testing.assert_array_equal(decoded * 255, png, err_msg=row["file"])
        assert int(decoded.sum()) == int(row["mask_pixels"])
        assert bool(labels[row["image_id"]]) == (row["has_pneumo"] == "1")


def test_encoding_a_real_mask_gives_back_the_published_row(siim_sample):
    labels = read_rle_csv(siim_sample / FULL_LABELS)
    single_region = [r for r in sample_rows(siim_sample) if len(labels[r["image_id"]]) == 1]
    assert len(single_region) > 40
    for row in single_region:
        png = cv2.imread(str(siim_sample / "masks" / row["file"]), cv2.IMREAD_GRAYSCALE)
        assert encode_rle(png) == labels[row["image_id"]][0]
    assert encode_rle(np.zeros((1024, 1024), np.uint8)) == "-1"


def test_full_label_file_counts(siim_sample):
    labels = read_rle_csv(siim_sample / FULL_LABELS)
    assert len(labels) == 12_047
    assert sum(bool(rows) for rows in labels.values()) == 2_669
    with gzip.open(siim_sample / FULL_LABELS, "rt") as handle:
        data_rows = len(handle.read().splitlines()) - 1
    assert sum(max(len(rows), 1) for rows in labels.values()) == data_rows == 12_954


def test_published_variants_read_alike(siim_sample, tmp_path):
    full = read_rle_csv(siim_sample / FULL_LABELS)
    no_header_bom = read_rle_csv(siim_sample / "rle/train-rle-sample.csv")
    assert (siim_sample / "rle/train-rle-sample.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert len(no_header_bom) == 10
    assert all(full[image_id] == rows for image_id, rows in no_header_bom.items())
    subset = read_rle_csv(siim_sample / "rle/sample-rle.csv")
    assert len(subset) == 72
    assert sum(max(len(rows), 1) for rows in subset.values()) == 74  # some images: 2 regions
    # Kaggle train-rle.csv style: header without the odd space, values with a leading space, CRLF.
    lines = ["ImageId,EncodedPixels"] + [
        f"{image_id}, {row}" for image_id, rows in subset.items() for row in rows or ("-1",)
    ]
    kaggle = tmp_path / "train-rle.csv"
    kaggle.write_text("\r\n".join(lines) + "\r\n")
    assert read_rle_csv(kaggle) == subset


def test_decoding_is_relative_column_major_and_unions_rows():
    # 2 x 3 image; column-major pixel order is (0,0) (1,0) (0,1) (1,1) (0,2) (1,2).
    expected = np.array([[0, 1, 0], [1, 0, 1]], dtype=np.uint8)
    assert encode_rle(expected) == "1 2 2 1"  # pixels 1-2, then 2 past pixel 2's end: pixel 5
    np.testing.assert_array_equal(decode_rle("1 2 2 1", (2, 3)), expected)
    union = decode_rle(("1 1", "2 1", "5 1"), (2, 3))
    np.testing.assert_array_equal(union, expected)
    np.testing.assert_array_equal(decode_rle(("0 6", "2 2"), (2, 3)), np.ones((2, 3)))
    assert not decode_rle("-1", (2, 3)).any()
    with pytest.raises(ValueError, match="past the 3x2 .width x height. image"):
        decode_rle("4 3", (2, 3))


def test_round_trip_on_random_masks():
    rng = np.random.default_rng(0)
    for shape in ((7, 5), (64, 64), (33, 90)):
        mask = (rng.random(shape) < 0.3).astype(np.uint8)
        np.testing.assert_array_equal(decode_rle(encode_rle(mask), shape), mask)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("1.2.3,5 7 9", "line 3: 1.2.3: odd number of values"),
        ("1.2.3,5 x 9 1", "line 3: 1.2.3: not a run-length string"),
        ("1.2.3,5 0 9 1", "line 3: 1.2.3: run-length string has a run of length 0"),
        ("1.2.3,", "line 3: 1.2.3: not a run-length string"),
        ("just-an-id", "line 3: expected 'ImageId,EncodedPixels'"),
        ("1.2.9,-1", "line 3: 1.2.9 is marked -1 on line 3 and also has runs"),
    ],
)
def test_unparseable_rows_name_file_and_line(tmp_path, line, problem):
    path = tmp_path / "labels.csv"
    path.write_text(f"ImageId, EncodedPixels\n1.2.9, 10 4\n{line}\n")
    with pytest.raises(DataError) as error:
        read_rle_csv(path)
    assert str(error.value).startswith(f"{path}: {problem}")
    assert "\n" not in str(error.value)


def test_unreadable_label_file(tmp_path):
    broken = tmp_path / "train-rle.csv.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read label CSV"):
        read_rle_csv(broken)
