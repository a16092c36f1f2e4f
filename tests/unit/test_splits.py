import numpy as np
import pytest

from netsurv.cohort.splits import SplitError, make_splits


def test_holdout_is_stratified_disjoint_and_seeded():
    event = np.array([1] * 30 + [0] * 20)
    splits = make_splits({"name": "holdout", "seeds": [0, 1, 2, 3, 4], "test_size": 0.3}, event)
    assert [s.name for s in splits] == ["seed0", "seed1", "seed2", "seed3", "seed4"]
    for s in splits:
        assert len(s.test) == 15 and len(s.train) == 35
        assert not set(s.train) & set(s.test)
        assert event[s.test].sum() == 9           # 30 % of 30 events, stratified
    again = make_splits({"name": "holdout", "seeds": [0], "test_size": 0.3}, event)
    np.testing.assert_array_equal(again[0].test, splits[0].test)
    assert not np.array_equal(splits[0].test, splits[1].test)


def test_kfold_covers_every_patient_once_per_repeat():
    event = np.array([1, 0] * 25)
    splits = make_splits({"name": "kfold", "n_splits": 5, "n_repeats": 2, "seed": 0}, event)
    assert len(splits) == 10
    for r in range(2):
        tests = np.concatenate([s.test for s in splits[r * 5:(r + 1) * 5]])
        assert sorted(tests) == list(range(50))


def test_too_few_events_is_a_clear_error():
    with pytest.raises(SplitError, match="needs at least 5 events"):
        make_splits({"name": "kfold", "n_splits": 5}, np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(SplitError, match="unknown"):
        make_splits({"name": "bootstrap"}, np.array([1, 0] * 5))
