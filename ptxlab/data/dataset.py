"""torch Dataset over cases, the seeded held-out test subset and train/validation split."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ptxlab.augment import seed_transform
from ptxlab.data.cases import Case

PairLoader = Callable[[Case], tuple[np.ndarray, np.ndarray]]


class SegmentationDataset(Dataset):
    """Yields (uint8 image (1,H,W), uint8 mask (1,H,W), index).

    Augmentation randomness is a pure function of (seed, epoch, index): results do not depend
    on the number of loader workers, and a resumed run sees the same samples.
    """

    def __init__(self, cases: Sequence[Case], load: PairLoader, transform: A.Compose, seed: int):
        self.cases = list(cases)
        self.load = load
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int):
        image, mask = self.load(self.cases[index])
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        seed_transform(self.transform, seed)
        out = self.transform(image=image, mask=mask)
        return (
            torch.from_numpy(np.ascontiguousarray(out["image"]))[None],
            torch.from_numpy(np.ascontiguousarray(out["mask"]))[None],
            index,
        )


def stratified_split(
    cases: Sequence[Case], val_fraction: float, seed: int, folds: int = 1, fold: int = 0
) -> tuple[list[Case], list[Case]]:
    """Split positives and negatives separately so both parts keep the positive rate.

    folds == 1: a single split with round(val_fraction * n) of each class in validation.
    folds > 1: k-fold; validation is fold `fold`, training the rest.
    """
    rng = np.random.default_rng(seed)
    train: list[Case] = []
    val: list[Case] = []
    for label in (True, False):
        group = sorted((c for c in cases if c.positive == label), key=lambda c: c.case_id)
        order = rng.permutation(len(group))
        if folds == 1:
            n_val = round(len(group) * val_fraction)
            in_val = set(order[:n_val].tolist())
        else:
            in_val = {i for rank, i in enumerate(order.tolist()) if rank % folds == fold}
        for i, case in enumerate(group):
            (val if i in in_val else train).append(case)
    return sorted(train, key=lambda c: c.case_id), sorted(val, key=lambda c: c.case_id)


def hold_out(cases: Sequence[Case], fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """(the rest, a held-out test subset): round(fraction * n) of the positives and of the
    negatives, chosen by `seed` alone (stratified_split with one fold); fraction 0: none."""
    if not fraction:
        return list(cases), []
    return stratified_split(cases, fraction, seed)


def random_split(cases: Sequence[Case], val_fraction: float, seed: int
                 ) -> tuple[list[Case], list[Case]]:
    """The study's split: scikit-learn's `train_test_split(test_size=val_fraction,
    random_state=seed, shuffle=True)` over the cases in file-name order, not stratified.

    As scikit-learn does: ceil(val_fraction * n) cases go to validation, taken first from
    `RandomState(seed).permutation(n)`, and both parts keep that permutation's order (so a
    seeded subset of validation indices names the same images as the study's).
    """
    ordered = sorted(cases, key=lambda c: (c.image.name, c.case_id))
    n_val = math.ceil(val_fraction * len(ordered))
    order = np.random.RandomState(seed).permutation(len(ordered))
    return [ordered[i] for i in order[n_val:]], [ordered[i] for i in order[:n_val]]


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of a seeded permutation; each rank takes its share of every global batch.

    With one process this is an ordinary shuffled batch sampler. With N processes rank r takes
    items r, r+N, ... of each global batch, so the union over ranks is exactly the batch a
    single process would see: the global batch size stays `batch_size`. A last, partial batch
    is kept unless `drop_last`, but only when every rank gets at least one of its items.
    """

    def __init__(self, n_items: int, batch_size: int, rank: int = 0, world: int = 1,
                 drop_last: bool = False, positives: Sequence[bool] | None = None):
        if batch_size % world:
            raise ValueError(f"train.batch_size={batch_size} must divide over {world} processes")
        self.n_items, self.batch_size = n_items, batch_size
        self.rank, self.world, self.drop_last = rank, world, drop_last
        self.positives = None if positives is None else np.asarray(positives, dtype=bool)
        self.seed = 0
        self.positive_fraction: float | None = None

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def set_positive_fraction(self, fraction: float | None) -> None:
        """Draw the next epochs with this share of positive items (None: each item once)."""
        if fraction is not None and self.positives is None:
            raise ValueError("a positive fraction needs the items' labels (positives=...)")
        self.positive_fraction = fraction

    def epoch_order(self) -> torch.Tensor:
        """The epoch's global order of `n_items` indices, a function of the seed alone.

        Natural: a permutation of all items. With a positive fraction f: round(f * n) draws
        from the positive items and the rest from the negatives, each part without
        replacement while it lasts (a part larger than its pool repeats whole shuffled
        passes of it, then draws the remainder), then the two parts shuffled together.
        """
        generator = torch.Generator().manual_seed(self.seed)
        if self.positive_fraction is None:
            return torch.randperm(self.n_items, generator=generator)
        n_positive = round(self.positive_fraction * self.n_items)
        pools = (np.flatnonzero(self.positives), np.flatnonzero(~self.positives))
        wanted = (n_positive, self.n_items - n_positive)
        parts = [_draw(torch.from_numpy(pool), count, generator)
                 for pool, count in zip(pools, wanted, strict=True)]
        drawn = torch.cat(parts)
        return drawn[torch.randperm(len(drawn), generator=generator)]

    def __iter__(self):
        order = self.epoch_order()
        for start in range(0, self.n_items, self.batch_size):
            batch = order[start : start + self.batch_size].tolist()
            if len(batch) < self._smallest_batch:
                return
            yield batch[self.rank :: self.world]

    @property
    def _smallest_batch(self) -> int:
        return self.batch_size if self.drop_last else self.world

    def __len__(self) -> int:
        full, rest = divmod(self.n_items, self.batch_size)
        return full + (1 if rest >= self._smallest_batch else 0)


def _draw(pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` items of `pool`: whole shuffled passes over it, then a shuffled remainder."""
    if count and not len(pool):
        raise ValueError(f"cannot draw {count} items from an empty class (no such training "
                         "images): data.positive_fraction needs both positives and negatives")
    passes = [pool[torch.randperm(len(pool), generator=generator)]
              for _ in range(count // max(len(pool), 1))]
    rest = pool[torch.randperm(len(pool), generator=generator)[: count - len(passes) * len(pool)]]
    return torch.cat([*passes, rest]).long()
