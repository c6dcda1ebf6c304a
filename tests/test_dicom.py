"""DICOM decoding: the real JPEG-baseline SIIM files, plus MONOCHROME1 and deep-pixel variants."""

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from ptxlab.data.cases import DataError
from ptxlab.data.dicom import read_dicom

GEOMETRY_KEYS = {
    "rows",
    "columns",
    "pixel_spacing",
    "photometric_interpretation",
    "bits_allocated",
    "bits_stored",
}


def write_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=None, **tags):
    """A minimal uncompressed single-frame DICOM holding `pixels` (uint8 or uint16)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = pixels.dtype.itemsize * 8
    dataset.BitsStored = bits_stored or dataset.BitsAllocated
    dataset.HighBit = dataset.BitsStored - 1
    dataset.PixelRepresentation = 0
    dataset.PixelData = pixels.tobytes()
    for name, value in tags.items():
        setattr(dataset, name, value)
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_every_sample_dicom_decodes_to_its_png(siim_sample):
    dicoms = sorted((siim_sample / "dicom").glob("*.dcm"))
    assert len(dicoms) == 27
    for path in dicoms:
        image = read_dicom(path)
        png = cv2.imread(str(siim_sample / "images" / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        assert image.pixels.dtype == np.uint8
        np.testing.assert_array_equal(image.pixels, png, err_msg=path.name)
        assert set(image.geometry) == GEOMETRY_KEYS
        assert image.geometry["rows"] == image.geometry["columns"] == 1024
        assert image.geometry["photometric_interpretation"] == "MONOCHROME2"
        assert image.geometry["bits_stored"] == 8
        spacing = image.geometry["pixel_spacing"]
        assert len(spacing) == 2 and all(isinstance(value, float) for value in spacing)


def test_monochrome1_is_inverted(tmp_path):
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    path = write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1")
    image = read_dicom(path)
    np.testing.assert_array_equal(image.pixels, 255 - pixels)
    assert image.geometry["photometric_interpretation"] == "MONOCHROME1"


def test_deep_pixels_are_stretched_to_8_bit(tmp_path):
    pixels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 60 + 100).astype(np.uint16)
    image = read_dicom(write_dicom(tmp_path / "12bit.dcm", pixels, bits_stored=12))
    expected = np.rint((pixels - 100) * (255.0 / (63 * 60))).astype(np.uint8)
    np.testing.assert_array_equal(image.pixels, expected)
    assert (image.pixels.min(), image.pixels.max()) == (0, 255)
    assert (image.geometry["bits_allocated"], image.geometry["bits_stored"]) == (16, 12)


def test_deep_pixels_use_the_files_window(tmp_path):
    pixels = np.linspace(0, 4000, 64).astype(np.uint16).reshape(8, 8)
    path = write_dicom(
        tmp_path / "windowed.dcm", pixels, bits_stored=12, WindowCenter=1000, WindowWidth=400
    )
    image = read_dicom(path).pixels
    assert (image[pixels <= 790] == 0).all()  # below the window
    assert (image[pixels >= 1210] == 255).all()  # above the window
    inside = image[(pixels > 820) & (pixels < 1180)]
    assert inside.size and ((inside > 0) & (inside < 255)).all()


def test_only_geometry_leaves_the_reader(tmp_path):
    pixels = np.zeros((4, 4), np.uint8)
    path = write_dicom(
        tmp_path / "tagged.dcm",
        pixels,
        PatientName="Doe^Jane",
        PatientID="P123",
        PixelSpacing=[0.2, 0.3],
    )
    image = read_dicom(path)
    assert set(image.geometry) == GEOMETRY_KEYS
    assert image.geometry["pixel_spacing"] == (0.2, 0.3)
    assert "Doe" not in repr(image) and "P123" not in repr(image)


def test_truncated_dicom_is_one_line_error_without_patient_data(tmp_path, siim_sample, recwarn):
    source = sorted((siim_sample / "dicom").glob("*.dcm"))[0]
    truncated = tmp_path / "truncated.dcm"
    for keep in (1_000, 20_000, source.stat().st_size - 10):
        truncated.write_bytes(source.read_bytes()[:keep])
        with pytest.raises(DataError) as error:
            read_dicom(truncated)
        assert (
            str(error.value)
            == f"{truncated}: no pixel data (the file is truncated, or holds no image)"
        )
    assert not [warning for warning in recwarn if "pydicom" in warning.filename]

    tagged = write_dicom(
        tmp_path / "short.dcm", np.zeros((64, 64), np.uint8), PatientName="Doe^Jane"
    )
    tagged.write_bytes(tagged.read_bytes()[:-1000])
    with pytest.raises(DataError) as error:
        read_dicom(tagged)
    assert "Doe" not in str(error.value) and "\n" not in str(error.value)


def test_not_a_dicom(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("hello")
    with pytest.raises(DataError, match="not a readable DICOM file"):
        read_dicom(path)
