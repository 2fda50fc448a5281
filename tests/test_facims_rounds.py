"""experiments.facims_rounds: the validation-only judgement of round selection (no training)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from experiments import facims_rounds


def _split(labels):
    labels = np.asarray(labels)
    return SimpleNamespace(labels=labels, groups=np.arange(len(labels)) % 2, num_groups=2)


def test_best_round_is_scored_on_the_half_it_did_not_choose_on():
    """Round 2 is right on every validation row, the last round (3) on the class-0 rows only:
    the best round is 2, its cross-fitted BA is 1 and the last round's is 1/2 on both halves."""
    y_val = np.array([0, 1] * 20)
    y_test = np.array([0, 1] * 10)
    right, majority = np.where(y_val == 1, 0.9, 0.1), np.full(len(y_val), 0.1)
    val = np.stack([majority, right, majority])[:, None, :]  # [rounds, runs, rows]
    test = np.stack([np.full(len(y_test), 0.1), np.where(y_test == 1, 0.8, 0.2), np.full(len(y_test), 0.1)])[:, None, :]
    prepared = {7: (SimpleNamespace(val=_split(y_val), test=_split(y_test)), None)}
    rows, table = facims_rounds.judge(val, test, prepared, [""], [7])
    (row,) = rows
    assert row["best_round"] == 2
    assert row["val_best"] == 1.0 and row["val_last"] == 0.5
    assert row["crossfit_best"] == 1.0 and row["crossfit_last"] == 0.5
    assert row["test_best"] == 1.0 and row["test_last"] == 0.5
    assert "| defaults |" in table


def test_settings_parse_into_configs_and_bad_ones_are_named():
    config, counts = facims_rounds.parse_setting("damping=10;common_noise=False;class_counts_from=original")
    assert (config.damping, config.common_noise, counts) == (10.0, False, "original")
    assert facims_rounds.parse_setting("")[1] == "original"  # experiments.facims's default
    with pytest.raises(ValueError, match="FacimsConfig has no setting 'bogus'"):
        facims_rounds.parse_setting("bogus=1")
    with pytest.raises(ValueError, match="class_counts_from='x'; choose one of original, resampled"):
        facims_rounds.parse_setting("class_counts_from=x")
