"""The embedded default data: procedural chest radiographs with pneumothorax labels.

A phantom has a thorax, two lung fields with vascular texture, ribs, clavicles, the spine and
heart, and noise. A pneumothorax is a crescent of the lung along its apical/lateral edge that
is more radiolucent, has no vascular texture and is bounded medially by a thin, bright
visceral pleural line; the crescent is the label. Deterministic per (seed, index).

It is a demo and test fixture that exercises the whole pipeline, not a claim about real data.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from ptxlab.atomic import replacing_directory, write_bytes, write_text
from ptxlab.data.cases import Case

GENERATOR_VERSION = 1


@dataclass(frozen=True)
class SyntheticSpec:
    n_images: int = 400
    positive_fraction: float = 0.5
    size: int = 256
    seed: int = 0

    def digest(self) -> str:
        payload = json.dumps({**asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _blur(field: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(field, (0, 0), sigmaX=max(sigma, 0.1))


def _ellipse(size: int, cx: float, cy: float, rx: float, ry: float, power: float = 2.0):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return (np.abs((xx - cx) / rx) ** power + np.abs((yy - cy) / ry) ** power) <= 1.0


def _vessel_texture(rng: np.random.Generator, size: int, hilum: tuple[float, float]) -> np.ndarray:
    """Branching lines radiating from the hilum, thinning and fading towards the periphery."""
    canvas = np.zeros((size, size), np.float32)
    stack = [(hilum[0] * size, hilum[1] * size, rng.uniform(0, 2 * np.pi), 0.16 * size, 2.5)
             for _ in range(4)]
    while stack:
        x, y, angle, length, width = stack.pop()
        if length < 0.02 * size or width < 0.6:
            continue
        x2, y2 = x + length * np.cos(angle), y + length * np.sin(angle)
        thickness = max(1, int(round(width * size / 256)))
        cv2.line(canvas, (int(x), int(y)), (int(x2), int(y2)), width / 3.0, thickness, cv2.LINE_AA)
        for _ in range(2):
            stack.append((x2, y2, angle + rng.normal(0, 0.5), length * rng.uniform(0.55, 0.8),
                          width * 0.72))
    fine = rng.normal(0, 1, (size, size)).astype(np.float32)
    canvas += 0.25 * (_blur(fine, 0.8 * size / 256) - _blur(fine, 3.0 * size / 256))
    return _blur(canvas, 0.6 * size / 256)


def _ribs(rng: np.random.Generator, size: int, thorax_cx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ribs = np.zeros((size, size), np.float32)
    for side in (-1.0, 1.0):
        for k in range(9):
            y0 = 0.18 + k * 0.068 + rng.normal(0, 0.004)
            dx = (xx - thorax_cx) * side
            curve = y0 + 0.9 * (dx - 0.05) ** 2 - 0.05 * dx
            band = np.exp(-(((yy - curve) / 0.011) ** 2)) * (dx > 0.02) * (dx < 0.42)
            ribs += band * (0.9 + 0.2 * rng.random())
    return ribs


def render_case(rng: np.random.Generator, size: int, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    """One phantom radiograph (uint8, HxW) and its mask (uint8 {0,1})."""
    cx = 0.5 + rng.normal(0, 0.015)
    body = _ellipse(size, cx, 0.58, 0.47 + rng.normal(0, 0.01), 0.62).astype(np.float32)
    image = 0.06 + 0.5 * _blur(body, 0.02 * size)

    lungs = []
    texture = np.zeros((size, size), np.float32)
    for side in (-1.0, 1.0):
        lung = _ellipse(size, cx + side * (0.2 + rng.normal(0, 0.01)), 0.47 + rng.normal(0, 0.01),
                        0.15 + rng.normal(0, 0.01), 0.29 + rng.normal(0, 0.012), power=2.4)
        lungs.append(lung)
        hilum = (cx + side * 0.11, 0.47)
        texture += _vessel_texture(rng, size, hilum) * lung
    lung_any = lungs[0] | lungs[1]
    image -= 0.3 * _blur(lung_any.astype(np.float32), 0.008 * size)

    heart = _ellipse(size, cx + 0.04, 0.63, 0.14 + rng.normal(0, 0.01), 0.15)
    spine = _ellipse(size, cx, 0.5, 0.035, 0.6, power=6.0)
    image += 0.28 * _blur((heart | spine).astype(np.float32), 0.01 * size)
    image += 0.07 * _ribs(rng, size, cx) * _blur(body, 0.01 * size)
    for side in (-1.0, 1.0):
        clavicle = np.zeros((size, size), np.float32)
        p1 = (int((cx + side * 0.04) * size), int(0.16 * size))
        p2 = (int((cx + side * 0.3) * size), int((0.12 + rng.normal(0, 0.01)) * size))
        cv2.line(clavicle, p1, p2, 1.0, max(2, size // 40), cv2.LINE_AA)
        image += 0.12 * _blur(clavicle, 0.006 * size)

    mask = np.zeros((size, size), np.uint8)
    if positive:
        mask = _pneumothorax_region(rng, size, lungs[int(rng.integers(2))], cx)
        region = mask.astype(np.float32)
        soft = _blur(region, 0.004 * size)
        texture *= 1.0 - soft
        image -= rng.uniform(0.04, 0.09) * soft
        inner_edge = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
        lung_index = int(np.argmax([(mask & lung).sum() for lung in lungs]))
        lung_interior = cv2.erode(lungs[lung_index].astype(np.uint8), np.ones((5, 5), np.uint8))
        pleural_line = (inner_edge & lung_interior).astype(np.float32)
        image += rng.uniform(0.06, 0.12) * _blur(pleural_line, 0.5 * size / 256)

    image += 0.09 * texture
    image += _blur(rng.normal(0, 1, (size, size)).astype(np.float32), 2.0 * size / 256) * 0.02
    image += rng.normal(0, 0.015, (size, size)).astype(np.float32)
    gamma = rng.uniform(0.8, 1.25)
    image = np.clip(image, 0, 1) ** gamma
    image = np.clip(image * rng.uniform(0.85, 1.1) + rng.normal(0, 0.03), 0, 1)
    return (image * 255).round().astype(np.uint8), mask


def _pneumothorax_region(rng: np.random.Generator, size: int, lung: np.ndarray, cx: float):
    """A crescent along the apical/lateral lung edge, thickest at a random focus point."""
    lung_u8 = lung.astype(np.uint8)
    depth_from_edge = cv2.distanceTransform(lung_u8, cv2.DIST_L2, 5) / size
    ys, xs = np.nonzero(lung_u8)
    lung_cx, top = xs.mean() / size, ys.min() / size
    lateral = 1.0 if lung_cx > cx else -1.0
    angle = rng.uniform(0.0, np.pi / 2)  # 0 = apex, pi/2 = lateral wall
    focus = (lung_cx + lateral * 0.14 * np.sin(angle), top + 0.22 * (1 - np.cos(angle)) + 0.02)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    spread = rng.uniform(0.08, 0.2)
    thickness = rng.uniform(0.02, 0.07)
    reach = thickness * np.exp(-((xx - focus[0]) ** 2 + (yy - focus[1]) ** 2) / (2 * spread**2))
    return ((depth_from_edge < reach) & lung).astype(np.uint8)


def is_positive(spec: SyntheticSpec, index: int) -> bool:
    """Positives are round(n * fraction) indices, spread by a seeded permutation."""
    order = np.random.default_rng([spec.seed, 0]).permutation(spec.n_images)
    return bool(order[index] < round(spec.n_images * spec.positive_fraction))


def render_dataset_case(spec: SyntheticSpec, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Case `index` of the data set described by `spec`."""
    rng = np.random.default_rng([spec.seed, 1, index])
    return render_case(rng, spec.size, is_positive(spec, index))


def materialize(spec: SyntheticSpec, root: Path, progress: bool = True) -> list[Case]:
    """Write the data set as a `folder` layout (images/, masks/ PNG) under root/<digest>/ once.

    Several processes may ask at once (sweep workers, DDP ranks): a file lock lets the first
    write it while the others wait, and a half-written folder is never visible or deleted
    under a reader.
    """
    target = Path(root) / f"synthetic-{spec.digest()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "COMPLETE").exists():
            _write(spec, target, progress)
    names = [f"phantom_{index:05d}" for index in range(spec.n_images)]
    return [
        Case(name, target / "images" / f"{name}.png", is_positive(spec, index),
             mask=target / "masks" / f"{name}.png")
        for index, name in enumerate(names)
    ]


def _write(spec: SyntheticSpec, target: Path, progress: bool) -> None:
    """Into a temporary folder beside `target`, renamed into place when complete; on failure
    (a full disk) it is removed and the error names `target`."""
    indices = range(spec.n_images)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="synthetic data", unit="img", leave=False)
    with replacing_directory(target) as folder:
        (folder / "images").mkdir()
        (folder / "masks").mkdir()
        for index in indices:
            image, mask = render_dataset_case(spec, index)
            _write_png(folder / "images" / f"phantom_{index:05d}.png", image)
            _write_png(folder / "masks" / f"phantom_{index:05d}.png", mask * 255)
        write_text(folder / "COMPLETE", json.dumps(asdict(spec)))


def _write_png(path: Path, pixels: np.ndarray) -> None:
    """Encoded in memory, so a failed write is an OSError rather than libpng's stderr lines."""
    encoded, data = cv2.imencode(".png", pixels)
    if not encoded:
        raise ValueError(f"{path}: PNG encoding failed")
    write_bytes(path, data.tobytes())
