"""ptxlab's training loop against a bare smp loop: same model, batch, data, one process.

Both loops see identical batches from one DataLoader over cached synthetic phantoms and do
the same work per step (normalise, forward, BCE + Dice, backward, Adam step). The ptxlab loop
adds what a real run needs: per-step cosine LR, accumulation bookkeeping, AMP plumbing, the
non-finite guard and the per-batch progress callback. Runs alternate (bare, ptxlab, bare, ...) and the
median epoch time of each is compared.

    python benchmarks/train_overhead.py [--size 96] [--batch 8] [--images 64] [--repeats 5]

Prints ratio = bare time / ptxlab time last (target >= 0.97).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PTXLAB_PROGRESS", "0")

import torch  # noqa: E402

from ptxlab.config import load_config  # noqa: E402
from ptxlab.experiment import prepare_data  # noqa: E402
from ptxlab.model import split_output  # noqa: E402
from ptxlab.train import Training, _set_up, _start_epoch, _train_epoch  # noqa: E402


def bare_epoch(model, criterion, optimizer, loader) -> float:
    started = time.perf_counter()
    model.train()
    for images, masks, _ in loader:
        output = split_output(model(model.normalize_input(images)))
        loss, _ = criterion(output, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def ptxlab_epoch(run: Training) -> float:
    started = time.perf_counter()
    _train_epoch(run, epoch=0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as cache:
        config = load_config(None, [
            f"data.synthetic.n_images={args.images}", f"data.synthetic.size={args.size}",
            f"data.image_size={args.size}", "data.val_fraction=0.1", f"data.cache_dir={cache}",
            "augment.preset=none", "model.encoder_weights=null", f"train.batch_size={args.batch}",
            "train.device=cpu",
        ])
        data = prepare_data(config, progress=False)
        run = _set_up(config, data.train, data.val, Path(cache) / "work", None, None)
        run.total_steps = 10**9  # the cosine LR never reaches its end here
        _start_epoch(run, 0)  # seeds the batch order: both loops see the same batches
        loader = run.train_loader
        list(loader)  # warm the cache and the page cache for both loops
        bare_epoch(run.model, run.criterion, run.optimizer, loader)  # warm-up: allocator, kernels

        bare, ours = [], []
        for _ in range(args.repeats):
            bare.append(bare_epoch(run.model, run.criterion, run.optimizer, loader))
            ours.append(ptxlab_epoch(run))
    images = len(loader) * args.batch
    print(f"{images} images/epoch at {args.size}px, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {args.repeats} alternating epochs each")
    print(f"bare smp loop : median {statistics.median(bare):.3f} s/epoch "
          f"({images / statistics.median(bare):.1f} img/s)")
    print(f"ptxlab loop   : median {statistics.median(ours):.3f} s/epoch "
          f"({images / statistics.median(ours):.1f} img/s)")
    print(f"ratio (bare time / ptxlab time, target >= 0.97): "
          f"{statistics.median(bare) / statistics.median(ours):.3f}")


if __name__ == "__main__":
    main()
