"""Find the cases of a dataset folder laid out the way it was published.

Layouts (see the sample's SOURCE.md for the published trees):

- `siim-png`: the Kaggle vbookshelf copy, `png_images/`, `png_masks/` and
  `stage_1_{train,test}_images.csv` (`new_filename,ImageId,has_pneumo`), in the given folder or
  in its `siim-acr-pneumothorax/` child. Case id = ImageId, site = `train` / `test`.
- `siim-dicom`: DICOMs anywhere below the folder plus a SIIM RLE CSV (`stage_2_train.csv` or
  `train-rle.csv`, optionally gzipped, or a named one). Case id = ImageId = file stem (the
  Kaggle files are named by SOPInstanceUID; no tag is read for it). Site = `train` / `test` when
  the top folder's name says so (`dicom-images-train`), else empty. The published trees hold
  unlabelled DICOMs (stage 1's `dicom-images-test/` beside `train-rle.csv`, stage 2's
  `stage_2_images/`): a DICOM without a label row, and a label row without a DICOM, are left
  out and listed, not problems; a label file that matches no DICOM at all is an error.
- `ptx498`: `PTX-498-v2-fix/Site{A,B,C}/<n>.1.img.png` with `<n>.2.mask.png`, possibly one or two
  folders deeper (the zip wraps it). Case id `<site>_<n>`, site = `SiteA` ..., all positive.
- `folder`: `images/<name>.{png,jpg,jpeg,dcm}` with `masks/<stem>.png`; the label is whether the
  mask has any foreground (so the masks are read once here).

`scan_layout` collects per-file problems instead of stopping (for `ptxlab data check`);
`load_cases` raises the first of them. Problems that leave nothing to scan (no folder, empty
folder, unknown layout, no label file) are raised at once by both.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ptxlab.data.cases import Case, DataError
from ptxlab.data.io import DICOM_SUFFIXES, map_in_threads, read_mask_file
from ptxlab.data.rle import read_rle_csv
from ptxlab.vocabulary import LAYOUTS

logger = logging.getLogger(__name__)

SIIM_PNG_FOLDER = "siim-acr-pneumothorax"
SIIM_PNG_LABEL_FILES = {"train": "stage_1_train_images.csv", "test": "stage_1_test_images.csv"}
SIIM_RLE_FILE_NAMES = ("stage_2_train.csv", "train-rle.csv")  # preferred first; `.gz` accepted
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", *DICOM_SUFFIXES)
_PTX_IMAGE = re.compile(r"(?P<n>.+)\.1\.img\.png")
_PTX_MASK = re.compile(r"(?P<n>.+)\.2\.mask\.png")
_VBOOKSHELF_NAME = re.compile(r"\d+_(?:train|test)_(?P<label>[01])_\.png")


@dataclass
class LayoutScan:
    """The cases found in a folder, the problems met on the way (file + reason), and what the
    published layout holds but cannot be used, such as unlabelled images (file + reason)."""

    layout: str
    cases: list[Case] = field(default_factory=list)
    problems: list[DataError] = field(default_factory=list)
    left_out: list[DataError] = field(default_factory=list)

    def problem(self, path: Path | str, reason: str) -> None:
        self.problems.append(DataError(path, reason))

    def leave_out(self, path: Path | str, reason: str) -> None:
        self.left_out.append(DataError(path, reason))


def detect_layout(root: Path) -> str:
    """Name the layout of `root`; DataError if it is missing, empty, unknown or ambiguous."""
    root = _existing_root(root)
    found = [name for name in LAYOUTS if _DETECTORS[name](root)]
    if not found:
        raise DataError(root, f"no known dataset layout found (known: {', '.join(LAYOUTS)})")
    if len(found) > 1:
        raise DataError(root, f"matches several layouts ({', '.join(found)}); name one")
    return found[0]


def load_cases(
    root: Path,
    layout: str = "auto",
    *,
    missing_mask_is_negative: bool = False,
    rle_csv: Path | None = None,
) -> list[Case]:
    """All cases of the dataset at `root`, sorted by case id; DataError on the first problem.

    What the layout leaves out (unlabelled images) is summed up in one warning on the
    `ptxlab.data` logger; `ptxlab data check` lists it.
    """
    scan = scan_layout(
        root, layout, missing_mask_is_negative=missing_mask_is_negative, rle_csv=rle_csv
    )
    warn_left_out(root, scan)
    if scan.problems:
        first = scan.problems[0]
        more = len(scan.problems) - 1
        suffix = f" (and {more} more problems; run `ptxlab data check`)" if more else ""
        raise DataError(first.path, first.problem + suffix)
    return scan.cases


def warn_left_out(root: Path, scan: LayoutScan) -> None:
    """One warning on the `ptxlab.data` logger for what the scan left out, if anything."""
    if scan.left_out:
        first = scan.left_out[0]
        logger.warning("%s: %d files left out (first: %s: %s); `ptxlab data check` lists them",
                       root, len(scan.left_out), first.path, first.problem)


def scan_layout(
    root: Path,
    layout: str = "auto",
    *,
    missing_mask_is_negative: bool = False,
    rle_csv: Path | None = None,
) -> LayoutScan:
    """Find the cases of `root` in `layout` ("auto" detects it), collecting per-file problems.

    A missing mask is a problem unless `missing_mask_is_negative`, which makes such a case
    negative (never for a case whose label says positive). `rle_csv` names the label file of a
    `siim-dicom` folder (relative to `root` or absolute) when it has another name.
    """
    root = _existing_root(root)
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise DataError(root, f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    scan = LayoutScan(layout)
    _SCANNERS[layout](root, scan, missing_mask_is_negative, rle_csv)
    _drop_duplicate_ids(scan)
    scan.cases.sort(key=lambda case: natural_key(case.case_id))
    if not scan.cases and not scan.problems:
        raise DataError(root, f"no images found in the {layout} layout")
    return scan


def natural_key(text: str) -> tuple[object, ...]:
    """Sort key that orders embedded numbers by value: `SiteA_2` before `SiteA_10`."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


# --- siim-png --------------------------------------------------------------------------------


def _siim_png_base(root: Path) -> Path | None:
    for base in (root, root / SIIM_PNG_FOLDER):
        if (base / "png_images").is_dir():
            return base
    return None


def _scan_siim_png(root: Path, scan: LayoutScan, missing_mask_is_negative: bool) -> None:
    base = _siim_png_base(root)
    if base is None:
        raise DataError(root, "no png_images/ folder (siim-png layout)")
    label_files = [(base / name, site) for site, name in SIIM_PNG_LABEL_FILES.items()]
    label_files = [(path, site) for path, site in label_files if path.is_file()]
    if not label_files:
        names = " or ".join(SIIM_PNG_LABEL_FILES.values())
        raise DataError(base, f"no label file ({names})")
    images = _file_names(base / "png_images")
    masks = _file_names(base / "png_masks")
    listed: set[str] = set()
    for label_file, site in label_files:
        for line_no, row in _csv_rows(label_file, ("new_filename", "ImageId", "has_pneumo")):
            name, image_id, label = row["new_filename"], row["ImageId"], row["has_pneumo"]
            where = f"{label_file.name} line {line_no}"
            listed.add(name)
            if label not in ("0", "1") or not name or not image_id:
                scan.problem(label_file, f"line {line_no}: need new_filename, ImageId, 0/1 label")
                continue
            positive = label == "1"
            name_label = _VBOOKSHELF_NAME.fullmatch(name)
            if name_label and name_label["label"] != label:
                scan.problem(
                    label_file,
                    f"line {line_no}: {name} is named label "
                    f"{name_label['label']} but has_pneumo is {label}",
                )
                continue
            if name not in images:
                scan.problem(base / "png_images" / name, f"listed in {where} but missing")
                continue
            usable, mask = _resolve_mask(
                base / "png_masks" / name, name in masks, positive, missing_mask_is_negative, scan
            )
            if usable:
                scan.cases.append(
                    Case(image_id, base / "png_images" / name, positive, mask=mask, site=site)
                )
    for name in sorted(images - listed):
        scan.problem(base / "png_images" / name, "not listed in any stage_1_*_images.csv")


# --- siim-dicom ------------------------------------------------------------------------------


def _scan_siim_dicom(root: Path, scan: LayoutScan, rle_csv: Path | None) -> None:
    dicoms, label_files = _walk_dicoms_and_label_files(root)
    label_file = _choose_rle_csv(root, label_files, rle_csv)
    labels = read_rle_csv(label_file)
    by_id: dict[str, Path] = {}
    for path in dicoms:
        image_id = path.stem
        if image_id in by_id:
            scan.problem(path, f"image id {image_id} also used by {by_id[image_id]}")
            continue
        by_id[image_id] = path
        if image_id not in labels:
            scan.leave_out(path, f"unlabelled: no row for {image_id} in {label_file}")
            continue
        rows = labels[image_id]
        parts = path.relative_to(root).parts
        site = _split_site(parts[0] if len(parts) > 1 else "")
        scan.cases.append(Case(image_id, path, bool(rows), rle=rows, site=site))
    if by_id and not scan.cases:
        raise DataError(label_file, f"labels none of the {len(by_id)} DICOMs under {root}")
    for image_id in labels:
        if image_id not in by_id:
            scan.leave_out(
                label_file, f"RLE row for image {image_id}, which has no DICOM under {root}"
            )


def _walk_dicoms_and_label_files(root: Path) -> tuple[list[Path], list[Path]]:
    dicoms: list[Path] = []
    label_files: list[Path] = []
    known = {*SIIM_RLE_FILE_NAMES, *(name + ".gz" for name in SIIM_RLE_FILE_NAMES)}
    for folder, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith(DICOM_SUFFIXES):
                dicoms.append(Path(folder, name))
            elif name in known:
                label_files.append(Path(folder, name))
    return sorted(dicoms), sorted(label_files)


def _choose_rle_csv(root: Path, found: list[Path], given: Path | None) -> Path:
    if given is not None:
        path = root / given if (root / given).is_file() else Path(given)
        if not path.is_file():
            raise DataError(path, "label CSV not found")
        return path
    for name in SIIM_RLE_FILE_NAMES:
        matches = [path for path in found if path.name in (name, name + ".gz")]
        if len(matches) > 1:
            raise DataError(
                root, f"several {name} files ({', '.join(map(str, matches))}); name one"
            )
        if matches:
            return matches[0]
    raise DataError(root, f"no SIIM label CSV ({' or '.join(SIIM_RLE_FILE_NAMES)}) found")


def _split_site(top_folder: str) -> str:
    lowered = top_folder.lower()
    return "train" if "train" in lowered else "test" if "test" in lowered else ""


# --- ptx498 ----------------------------------------------------------------------------------


def _ptx498_site_folders(root: Path) -> list[Path]:
    for pattern in ("Site*", "*/Site*", "*/*/Site*"):
        sites = [path for path in root.glob(pattern) if path.is_dir() and _has_ptx_image(path)]
        if sites:
            return sorted(sites)
    return []


def _has_ptx_image(folder: Path) -> bool:
    return any(_PTX_IMAGE.fullmatch(name) for name in _file_names(folder))


def _scan_ptx498(root: Path, scan: LayoutScan, missing_mask_is_negative: bool) -> None:
    sites = _ptx498_site_folders(root)
    if not sites:
        raise DataError(root, "no Site*/<n>.1.img.png files (ptx498 layout)")
    for folder in sites:
        names = _file_names(folder)
        images = {m["n"]: name for name in names if (m := _PTX_IMAGE.fullmatch(name))}
        masks = {m["n"]: name for name in names if (m := _PTX_MASK.fullmatch(name))}
        for number, name in images.items():
            mask_path = folder / f"{number}.2.mask.png"
            usable, mask = _resolve_mask(
                mask_path, number in masks, False, missing_mask_is_negative, scan
            )
            if usable:
                case_id = f"{folder.name}_{number}"
                positive = mask is not None
                scan.cases.append(
                    Case(case_id, folder / name, positive, mask=mask, site=folder.name)
                )
        for number in sorted(masks.keys() - images.keys(), key=natural_key):
            scan.problem(folder / masks[number], f"mask without an image {number}.1.img.png")


# --- folder ----------------------------------------------------------------------------------


def _scan_folder(root: Path, scan: LayoutScan, missing_mask_is_negative: bool) -> None:
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir():
        raise DataError(root, "no images/ folder (folder layout)")
    mask_names = {Path(name).stem: name for name in _file_names(masks_dir)}
    pending: list[tuple[str, Path, Path]] = []
    image_stems: set[str] = set()
    for name in sorted(_file_names(images_dir)):
        image = images_dir / name
        if not name.lower().endswith(IMAGE_SUFFIXES):
            scan.problem(image, "not a PNG, JPEG or DICOM file")
            continue
        stem = Path(name).stem
        image_stems.add(stem)
        if stem in mask_names:
            pending.append((stem, image, masks_dir / mask_names[stem]))
        elif missing_mask_is_negative:
            scan.cases.append(Case(stem, image, False))
        else:
            scan.problem(masks_dir / f"{stem}.png", f"missing mask for {image.name}")
    for (stem, image, mask), has_foreground in zip(
        pending, map_in_threads(lambda item: _mask_has_foreground(item[2]), pending), strict=True
    ):
        if isinstance(has_foreground, DataError):
            scan.problems.append(has_foreground)
        else:
            scan.cases.append(Case(stem, image, has_foreground, mask=mask))
    for stem in sorted(mask_names.keys() - image_stems):
        scan.problem(masks_dir / mask_names[stem], "mask without an image")


def _mask_has_foreground(path: Path) -> bool | DataError:
    try:
        return bool(read_mask_file(path).any())
    except DataError as exc:
        return exc


# --- shared ----------------------------------------------------------------------------------


# One entry per layout of `vocabulary.LAYOUTS`: (root, scan, missing_mask_is_negative, rle_csv).
_SCANNERS = {
    "siim-png": lambda root, scan, missing, _: _scan_siim_png(root, scan, missing),
    "siim-dicom": lambda root, scan, _, rle_csv: _scan_siim_dicom(root, scan, rle_csv),
    "ptx498": lambda root, scan, missing, _: _scan_ptx498(root, scan, missing),
    "folder": lambda root, scan, missing, _: _scan_folder(root, scan, missing),
}

_DETECTORS = {
    "siim-png": lambda root: _siim_png_base(root) is not None,
    "siim-dicom": lambda root: bool(_walk_dicoms_and_label_files(root)[1]),
    "ptx498": lambda root: bool(_ptx498_site_folders(root)),
    "folder": lambda root: (root / "images").is_dir(),
}


def _existing_root(root: Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "no such folder")
    if next(root.iterdir(), None) is None:
        raise DataError(root, "folder is empty")
    return root


def _file_names(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as entries:
        return {e.name for e in entries if not e.name.startswith(".") and e.is_file()}


def _csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            missing = [name for name in columns if name not in header]
            if missing:
                raise DataError(path, f"missing column(s) {', '.join(missing)}")
            for row in reader:
                if any(value.strip() for value in row):
                    values = dict(zip(header, (value.strip() for value in row), strict=False))
                    yield reader.line_num, {name: values.get(name, "") for name in columns}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(path, f"cannot read CSV: {exc}") from exc


def _resolve_mask(
    mask: Path, exists: bool, positive: bool, missing_mask_is_negative: bool, scan: LayoutScan
) -> tuple[bool, Path | None]:
    """(whether the case is usable, its mask path or None for an allowed missing mask)."""
    if exists:
        return True, mask
    if missing_mask_is_negative and not positive:
        return True, None
    scan.problem(mask, "missing mask")
    return False, None


def _drop_duplicate_ids(scan: LayoutScan) -> None:
    seen: dict[str, Case] = {}
    for case in scan.cases:
        if case.case_id in seen:
            scan.problem(
                case.image, f"case id {case.case_id} also used by {seen[case.case_id].image}"
            )
        else:
            seen[case.case_id] = case
    scan.cases = list(seen.values())
