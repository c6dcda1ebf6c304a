"""Training loader throughput: raw 1024² PNGs resized on the fly vs the resized cache.

Both loaders feed the same cases (the real SIIM sample by default) through the same
`SegmentationDataset`, the same training transform (resize to `--size`, then the paper's
augmentation, `augment.preset=paper`) and the same DataLoader settings (batch, `--workers`,
shuffle, a new epoch seed each pass). They differ only in how a pair is read:

- raw: `read_pair` decodes the full-resolution image and mask PNGs every time;
- cached: `ResizedCache.load` reads a (2, size, size) `.npy` built before timing (temp dir).

A third loader shows what `augment.order=source-first` (the study's order) costs: it reads the
same cases from a cache kept at the source resolution (`ResizedCache(size=None)`), augments at
that resolution and resizes last; its line reports its rate relative to the resize-first cache.

Epochs alternate (raw, cached, source-first, raw, ...) and the median epoch time of each is
compared. For
context the script also times reading alone (one pair at a time, raw and cached alternating,
median ms per pair): the loader's ratio is that read speed-up diluted by the augmentation and
batching both loaders pay. It also times training steps of the default model (Unet +
tu-tf_efficientnet_lite0, random init) at the same size and batch on this machine's CPU, and on
CUDA when available (AMP fp16), so one can see whether loading would starve training.

    python benchmarks/loader.py [--data DIR] [--size 512] [--workers 0] [--epochs 5]
                                [--images 72] [--batch 8] [--threads 0]
                                [--cpu-steps 1] [--cuda-steps 10]

Prints ratio = cached images/s / raw images/s last (target >= 4).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ptxlab.augment import build_train_transform
from ptxlab.config import load_config
from ptxlab.data.cache import ResizedCache
from ptxlab.data.cases import Case
from ptxlab.data.dataset import PairLoader, SegmentationDataset
from ptxlab.data.layouts import load_cases
from ptxlab.data.sources import read_pair
from ptxlab.losses import SegmentationLoss
from ptxlab.model import build_model, split_output

DEFAULT_DATA = Path(__file__).parents[1].parent / "shared/data/siim-sample"


def epoch_seconds(dataset: SegmentationDataset, epoch: int, batch: int, workers: int) -> float:
    """Time one full pass of a DataLoader (workers started and stopped, as in training)."""
    dataset.set_epoch(epoch)
    generator = torch.Generator().manual_seed(epoch)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        generator=generator)
    started = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - started


def read_milliseconds(cases: list[Case], readers: list[PairLoader]) -> list[float]:
    """Median ms per pair of each reader, calling them alternately on every case."""
    times: list[list[float]] = [[] for _ in readers]
    for case in cases:
        for reader, spent in zip(readers, times, strict=True):
            started = time.perf_counter()
            reader(case)
            spent.append((time.perf_counter() - started) * 1e3)
    return [statistics.median(spent) for spent in times]


def training_images_per_s(device: torch.device, size: int, batch: int, steps: int) -> float:
    """Images/s of full training steps of the default model on random uint8 batches.

    On CUDA three warm-up steps (lazy init, cuDNN autotuning) are not counted. On CPU none is
    discarded: the first step is no slower than later ones and each takes tens of seconds.
    """
    config = load_config(None, ["model.encoder_weights=null"])
    torch.manual_seed(0)
    model, _ = build_model(config.model)
    model.to(device).train()
    criterion = SegmentationLoss(config.loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if use_amp else nullcontext
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device=device)
    masks = (images > 200).to(torch.uint8)

    def step() -> None:
        with autocast():
            output = split_output(model(model.normalize_input(images)))
            loss, _ = criterion(output, masks)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the training loop reads the loss every step, which synchronises

    for _ in range(3 if device.type == "cuda" else 0):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a `folder` layout")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader num_workers")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs of each loader")
    parser.add_argument("--images", type=int, default=None, help="use only the first N cases")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in this process (0: torch's default, as train.threads)")
    parser.add_argument("--cpu-steps", type=int, default=1,
                        help="timed training steps on the CPU (0 skips it)")
    parser.add_argument("--cuda-steps", type=int, default=10,
                        help="timed training steps on CUDA when available (0 skips it)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cases = load_cases(args.data, "folder")[: args.images]
    config = load_config(None, ["augment.preset=paper", f"data.image_size={args.size}"])
    preset, strength = config.augment.preset, config.augment.strength
    transform = build_train_transform(preset, strength, args.size)
    source_first = build_train_transform(preset, strength, args.size, "source-first")

    with tempfile.TemporaryDirectory(prefix="ptxlab-loader-bench-") as cache_dir:
        cache = ResizedCache(Path(cache_dir), args.size)
        source_cache = ResizedCache(Path(cache_dir), None)
        started = time.perf_counter()
        cache.ensure(cases, progress=False)
        build_seconds = time.perf_counter() - started
        source_cache.ensure(cases, progress=False)
        raw_read_ms, cached_read_ms = read_milliseconds(cases, [read_pair, cache.load])
        loaders = {
            "raw": SegmentationDataset(cases, read_pair, transform, config.seed),
            "cached": SegmentationDataset(cases, cache.load, transform, config.seed),
            "source": SegmentationDataset(cases, source_cache.load, source_first, config.seed),
        }
        for dataset in loaders.values():  # warm-up: page cache, imports, allocator
            epoch_seconds(dataset, 0, args.batch, args.workers)
        times: dict[str, list[float]] = {name: [] for name in loaders}
        for epoch in range(1, args.epochs + 1):
            for name, dataset in loaders.items():
                times[name].append(epoch_seconds(dataset, epoch, args.batch, args.workers))

    n = len(cases)
    raw_times, cached_times = times["raw"], times["cached"]
    raw_rate = n / statistics.median(raw_times)
    cached_rate = n / statistics.median(cached_times)
    source_rate = n / statistics.median(times["source"])
    print(f"{n} cases from {args.data}, {args.size}px, augment.preset=paper, batch {args.batch}, "
          f"{args.workers} workers, {torch.get_num_threads()} torch threads, {args.epochs} "
          "alternating epochs each")
    print(f"cache build (before timing): {build_seconds:.1f} s")
    print(f"read one pair     : raw {raw_read_ms:.2f} ms, cached {cached_read_ms:.2f} ms "
          f"(median; {raw_read_ms / cached_read_ms:.1f}x)")
    print(f"raw PNGs + resize : median {statistics.median(raw_times):.2f} s/epoch "
          f"({raw_rate:.1f} img/s)")
    print(f"resized cache     : median {statistics.median(cached_times):.2f} s/epoch "
          f"({cached_rate:.1f} img/s)")
    print(f"source-first      : median {statistics.median(times['source']):.2f} s/epoch "
          f"({source_rate:.1f} img/s; augment at the source size from a source-size cache, "
          f"resize last: {source_rate / cached_rate:.2f}x the resize-first cache's rate)")
    steps = {"cpu": args.cpu_steps, "cuda": args.cuda_steps if torch.cuda.is_available() else 0}
    for device, count in steps.items():
        if count:
            rate = training_images_per_s(torch.device(device), args.size, args.batch, count)
            threads = torch.get_num_threads()
            detail = "AMP fp16" if device == "cuda" else f"fp32, torch threads: {threads}"
            print(f"model consumes    : {rate:.2f} img/s (default Unet lite0 training step on "
                  f"{device}, {detail}, batch {args.batch}, steps timed: {count})")
    print(f"ratio (cached / raw images/s, target >= 4): {cached_rate / raw_rate:.2f}")


if __name__ == "__main__":
    main()
