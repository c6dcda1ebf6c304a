"""The resized cache: what it stores, when it rebuilds, and that it never leaves partial files."""

import os
import shutil
import time

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

import ptxlab.atomic as atomic_module
from ptxlab.cli import app
from ptxlab.data.cache import ResizedCache, default_cache_dir, resize_mask
from ptxlab.data.cases import Case, DataError
from ptxlab.data.layouts import load_cases

SIZE = 64


@pytest.fixture
def copied_cases(siim_sample, tmp_path):
    """Two positives and a negative, copied (not linked) so a test may change them."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    cases = load_cases(siim_sample)
    chosen = [case for case in cases if case.positive][:2] + [
        next(case for case in cases if not case.positive)
    ]
    for case in chosen:
        shutil.copy(case.image, data / "images")
        shutil.copy(case.mask, data / "masks")
    return load_cases(data)


def all_files(folder):
    return sorted(path for path in folder.rglob("*") if path.is_file())


def test_entries_hold_the_resized_image_and_mask(copied_cases, tmp_path):
    cache = ResizedCache(tmp_path / "cache", SIZE)
    assert cache.ensure(copied_cases, progress=False) == []
    for case in copied_cases:
        image, mask = cache.load(case)
        assert image.shape == mask.shape == (SIZE, SIZE)
        assert image.dtype == mask.dtype == np.uint8
        source = cv2.imread(str(case.image), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(
            image, cv2.resize(source, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        )
        native = cv2.imread(str(case.mask), cv2.IMREAD_GRAYSCALE) // 255
        np.testing.assert_array_equal(mask, resize_mask(native, SIZE))
        assert set(np.unique(mask)) <= {0, 1}
        assert bool(mask.any()) == case.positive
        scale = (1024 / SIZE) ** 2
        assert abs(int(mask.sum()) * scale - int(native.sum())) < 0.1 * native.sum() + 2 * scale


def test_second_ensure_reuses_entries(copied_cases, tmp_path):
    ResizedCache(tmp_path / "cache", SIZE).ensure(copied_cases, progress=False)
    before = {path: path.stat().st_mtime_ns for path in all_files(tmp_path / "cache")}
    ResizedCache(tmp_path / "cache", SIZE).ensure(copied_cases, progress=False)
    after = {path: path.stat().st_mtime_ns for path in all_files(tmp_path / "cache")}
    assert before == after
    assert len([path for path in after if path.suffix == ".npy"]) == 3


def test_changed_source_is_rebuilt_and_touched_source_is_not(copied_cases, tmp_path):
    cache = ResizedCache(tmp_path / "cache", SIZE)
    cache.ensure(copied_cases, progress=False)
    case = copied_cases[0]
    old_entry = cache.entry_path(case)
    old_image, _ = cache.load(case)

    os.utime(case.image, ns=(1, 1))  # new mtime, same content
    fresh = ResizedCache(tmp_path / "cache", SIZE)
    assert fresh.entry_path(case) == old_entry

    inverted = 255 - cv2.imread(str(case.image), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(case.image), inverted)
    assert cache.entry_path(case) != old_entry
    new_image, _ = cache.load(case)
    expected = cv2.resize(inverted, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(new_image, expected)
    assert not np.array_equal(new_image, old_image)
    np.testing.assert_array_equal(ResizedCache(tmp_path / "cache", SIZE).load(case)[0], new_image)

    empty = np.zeros((1024, 1024), np.uint8)
    cv2.imwrite(str(case.mask), empty)
    assert not cache.load(case)[1].any()


def test_each_size_has_its_own_entries(copied_cases, tmp_path):
    small = ResizedCache(tmp_path / "cache", 32)
    large = ResizedCache(tmp_path / "cache", 48)
    assert small.entry_path(copied_cases[0]) != large.entry_path(copied_cases[0])
    assert small.load(copied_cases[0])[0].shape == (32, 32)
    assert large.load(copied_cases[0])[0].shape == (48, 48)


def test_interrupted_write_leaves_nothing(copied_cases, tmp_path, monkeypatch):
    cache = ResizedCache(tmp_path / "cache", SIZE)

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_module.os, "replace", killed)  # the rename into place
    with pytest.raises(KeyboardInterrupt):
        cache.load(copied_cases[0])
    assert all_files(tmp_path / "cache") == []


def test_ensure_removes_what_killed_writers_left_and_keeps_writes_in_progress(copied_cases,
                                                                             tmp_path):
    cache = ResizedCache(tmp_path / "cache", SIZE)
    cache.ensure(copied_cases, progress=False)
    entry = cache.entry_path(copied_cases[0])
    stamp = next((tmp_path / "cache" / "source-digests").iterdir())
    killed = [entry.with_name(f".{entry.name}.abc.tmp"), stamp.with_name(f".{stamp.name}.x.tmp")]
    in_progress = entry.with_name(f".{entry.name}.def.tmp")
    for path in [*killed, in_progress]:
        path.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    for path in killed:
        os.utime(path, (two_hours_ago, two_hours_ago))
    cache.ensure(copied_cases, progress=False)
    assert not any(path.exists() for path in killed)
    assert in_progress.exists() and entry.is_file() and stamp.is_file()


def test_bad_cases_raise_or_are_skipped(copied_cases, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = Case("broken", broken, False)
    cache = ResizedCache(tmp_path / "cache", SIZE)
    with pytest.raises(DataError, match="not a decodable PNG or JPEG image"):
        cache.ensure([*copied_cases, bad], progress=False)
    skipped = cache.ensure([*copied_cases, bad], skip_bad=True, progress=False)
    assert skipped == [(bad, f"{broken}: not a decodable PNG or JPEG image")]
    assert all(cache.entry_path(case).is_file() for case in copied_cases)


def test_small_regions_survive_downsizing():
    mask = np.zeros((1024, 1024), np.uint8)
    mask[500:503, 700:703] = 1  # 9 pixels, far under half of one 32x32-pixel output cell
    small = resize_mask(mask, 32)
    assert small.sum() == 1 and small[500 // 32, 700 // 32] == 1
    assert not resize_mask(np.zeros_like(mask), 32).any()
    mask[100:300, 100:300] = 1
    assert resize_mask(mask, 256).sum() == (200 // 4) ** 2 + 1  # the 3x3 covers 9/16 of a cell


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PTXLAB_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("PTXLAB_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "ptxlab")


def test_cli_cache(copied_cases, tmp_path):
    data = copied_cases[0].image.parents[1]
    result = CliRunner().invoke(
        app, ["data", "cache", str(data), "--size", "32", "--cache-dir", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    assert "3 cases cached at 32x32" in result.stdout
    cache = ResizedCache(tmp_path / "c" / "resized", 32)
    assert all(cache.entry_path(case).is_file() for case in copied_cases)


def test_cli_cache_bad_file(copied_cases, tmp_path):
    data = copied_cases[0].image.parents[1]
    (data / "images" / "broken.png").write_bytes(b"not a png")
    (data / "masks" / "broken.png").symlink_to(copied_cases[0].mask)
    command = ["data", "cache", str(data), "--size", "32", "--cache-dir", str(tmp_path / "c")]
    failed = CliRunner().invoke(app, command)
    assert failed.exit_code == 2
    assert (
        failed.stderr
        == f"error: {data / 'images' / 'broken.png'}: not a decodable PNG or JPEG image\n"
    )
    skipped = CliRunner().invoke(app, [*command, "--skip-bad"])
    assert skipped.exit_code == 0, skipped.output
    assert skipped.stderr.startswith(f"skipped: {data / 'images' / 'broken.png'}: not a decodable")
    assert "3 cases cached at 32x32" in skipped.stdout
