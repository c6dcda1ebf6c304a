"""The train/validation split: stratified by label, k-fold, and seeded apart from training."""

from pathlib import Path

import pytest

from ptxlab.config import load_config
from ptxlab.data.cases import Case
from ptxlab.data.dataset import stratified_split
from ptxlab.experiment import prepare_data
from tests.conftest import TINY_RUN


def _cases(n_positive: int, n_negative: int) -> list[Case]:
    return [Case(f"case{i:03d}", Path(f"{i}.png"), positive=i < n_positive)
            for i in range(n_positive + n_negative)]


def _ids(cases: list[Case]) -> set[str]:
    return {case.case_id for case in cases}


def test_a_single_split_keeps_the_positive_rate_in_both_parts():
    cases = _cases(20, 80)
    train, val = stratified_split(cases, 0.15, seed=3)
    assert _ids(train) | _ids(val) == _ids(cases) and not _ids(train) & _ids(val)
    assert (sum(c.positive for c in val), len(val)) == (3, 15)  # round(0.15 * 20), round(0.15 * 80)
    assert stratified_split(cases, 0.15, seed=3) == (train, val)
    assert _ids(stratified_split(cases, 0.15, seed=4)[1]) != _ids(val)


def test_k_folds_partition_the_cases_with_the_positive_rate_in_each_fold():
    cases = _cases(10, 30)
    folds = [stratified_split(cases, 0.15, seed=0, folds=5, fold=k)[1] for k in range(5)]
    assert sorted(c.case_id for fold in folds for c in fold) == sorted(_ids(cases))
    assert [sum(c.positive for c in fold) for fold in folds] == [2] * 5
    assert [len(fold) for fold in folds] == [8] * 5


@pytest.mark.parametrize(("split_seed", "same_split"), [("null", False), ("7", True)])
def test_split_seed_pins_the_split_while_the_training_seed_changes(isolated_store, split_seed,
                                                                   same_split):
    def validation_ids(seed: int) -> set[str]:
        config = load_config(None, TINY_RUN + [f"seed={seed}", "data.synthetic.n_images=40",
                                               f"data.split_seed={split_seed}"])
        return _ids(prepare_data(config, progress=False).val.cases)

    assert (validation_ids(1) == validation_ids(2)) is same_split
