"""Stratified splits, train-only standardisation and per-group resampling.

Everything here is numpy, runs once outside ``jit``, and is deterministic given ``seed``
(``np.random.default_rng(seed)``).
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple, Sequence

import numpy as np

from fairopt.data.dataset import Dataset, Splits, check_seed

__all__ = [
    "split",
    "facims_split",
    "standardize",
    "FeatureStatistics",
    "feature_statistics",
    "apply_standardization",
    "resample_per_group",
    "STRATIFY_CHOICES",
    "EMPTY_GROUP_CHOICES",
]

STRATIFY_CHOICES = ("label_group", "label", "group", "none")
EMPTY_GROUP_CHOICES = ("raise", "warn", "ignore")
_SPLIT_NAMES = Splits._fields

logger = logging.getLogger(__name__)


def largest_remainder(total: int, proportions: Sequence[float]) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``total * proportions`` (Hamilton's method).

    Floors ``total * p`` and hands the remaining units to the largest fractional parts (ties
    to the earlier entry). ``proportions`` must be non-negative and sum to 1.
    """
    exact = total * np.asarray(proportions, np.float64)
    counts = np.floor(exact + 1e-9).astype(np.int64)
    shortfall = total - int(counts.sum())
    if shortfall > 0:
        order = np.argsort(-(exact - counts), kind="stable")
        counts[order[:shortfall]] += 1
    return counts


def _check_fractions(fractions) -> np.ndarray:
    try:
        values = np.asarray(fractions, np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"fractions must be three numbers (train, val, test), got {fractions!r}") from error
    if values.shape != (3,):
        raise ValueError(f"fractions must be three numbers (train, val, test), got {fractions!r}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"fractions must be non-negative, got {tuple(values.tolist())}")
    if not math.isclose(values.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"fractions must sum to 1, got {tuple(values.tolist())} (sum {values.sum():.6g}); "
            f"e.g. the FACIMS split is (0.49, 0.21, 0.30)"
        )
    return values / values.sum()


def _check_dataset(dataset, argument: str = "dataset") -> Dataset:
    if not isinstance(dataset, Dataset):
        raise TypeError(f"{argument} must be a fairopt.data.Dataset, got {type(dataset).__name__}")
    return dataset


def _strata(dataset: Dataset, stratify: str) -> np.ndarray:
    if stratify not in STRATIFY_CHOICES:
        raise ValueError(f"stratify={stratify!r} is not supported; choose one of {list(STRATIFY_CHOICES)}")
    if stratify == "label_group":
        return dataset.labels.astype(np.int64) * dataset.num_groups + dataset.groups
    if stratify == "label":
        return dataset.labels.astype(np.int64)
    if stratify == "group":
        return dataset.groups.astype(np.int64)
    return np.zeros(len(dataset), np.int64)


def stratified_partition(strata: np.ndarray, fractions: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Partitions ``range(len(strata))`` into ``len(fractions)`` parts, stratum by stratum.

    Part sizes are ``largest_remainder(n, fractions)`` overall; inside every stratum of size m
    part j receives ``floor(m f_j)`` rows plus, where the overall size is not yet met, one more
    row in the strata with the largest fractional parts ``m f_j - floor(m f_j)`` (never more
    rows than the stratum has left). Rows inside a stratum are assigned in a random order.

    Returns:
      One sorted int64 index array per part.
    """
    num_parts = len(fractions)
    stratum_ids, inverse = np.unique(strata, return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(stratum_ids)).astype(np.int64)
    targets = largest_remainder(int(sizes.sum()), fractions)
    allocation = np.zeros((len(stratum_ids), num_parts), np.int64)
    remaining = sizes.copy()
    for part in range(num_parts - 1):
        exact = sizes * fractions[part]
        base = np.minimum(np.floor(exact + 1e-9).astype(np.int64), remaining)
        shortfall = targets[part] - int(base.sum())
        if shortfall > 0:
            candidates = np.flatnonzero(remaining > base)
            order = candidates[np.argsort(-(exact - base)[candidates], kind="stable")]
            base[order[:shortfall]] += 1
        allocation[:, part] = base
        remaining -= base
    allocation[:, -1] = remaining
    parts: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
    for stratum in range(len(stratum_ids)):
        rows = rng.permutation(np.flatnonzero(inverse == stratum))
        bounds = np.concatenate([[0], np.cumsum(allocation[stratum])])
        for part in range(num_parts):
            parts[part].append(rows[bounds[part] : bounds[part + 1]])
    return [np.sort(np.concatenate(chunks)) if chunks else np.zeros(0, np.int64) for chunks in parts]


def _check_empty_groups(dataset: Dataset, splits: Splits, fractions, empty_groups: str) -> None:
    if empty_groups not in EMPTY_GROUP_CHOICES:
        raise ValueError(
            f"empty_groups={empty_groups!r} is not supported; choose one of {list(EMPTY_GROUP_CHOICES)}"
        )
    present = dataset.group_counts > 0
    problems = []
    for part_name, part, fraction in zip(_SPLIT_NAMES, splits, fractions):
        if fraction == 0:
            continue  # an intentionally empty split
        missing = np.flatnonzero(present & (part.group_counts == 0))
        problems += [
            f"group {g} {dataset.group_names[g]!r} ({dataset.group_counts[g]} rows in total) has no rows in {part_name}"
            for g in missing
        ]
    if not problems or empty_groups == "ignore":
        return
    message = "; ".join(problems)
    if empty_groups == "raise":
        raise ValueError(
            f"{message}. Use larger fractions, stratify='label_group', merge or drop the tiny group, "
            f"or pass empty_groups='warn'/'ignore' if downstream code handles empty groups"
        )
    logger.warning("%s: %s", dataset.name, message)


def split(
    dataset: Dataset,
    fractions: Sequence[float] = (0.49, 0.21, 0.30),
    *,
    seed: int,
    stratify: str = "label_group",
    empty_groups: str = "raise",
) -> Splits:
    """Random train / val / test split, stratified so every split keeps the data's proportions.

    The default fractions are the FACIMS ones (49 / 21 / 30 %: 30 % test, then 30 % of the
    remaining 70 % for validation). Overall sizes are the largest-remainder rounding of
    ``n * fractions``; see :func:`stratified_partition` for the per-stratum allocation.

    Args:
      dataset: the rows to split.
      fractions: (train, val, test), non-negative, summing to 1. A zero gives an empty split.
      seed: seed of ``np.random.default_rng``.
      stratify: ``"label_group"`` (each (class, group) cell), ``"label"``, ``"group"`` or
        ``"none"``.
      empty_groups: what to do when a group that has rows in ``dataset`` has none in a
        non-empty split: ``"raise"`` (ValueError naming the group and the split), ``"warn"``
        (log a warning) or ``"ignore"``.

    Returns:
      :class:`Splits`; no row is in two splits and every row is in one.
    """
    dataset = _check_dataset(dataset)
    fractions = _check_fractions(fractions)
    seed = check_seed(seed)
    rng = np.random.default_rng(seed)
    parts = stratified_partition(_strata(dataset, stratify), fractions, rng)
    splits = Splits(*(dataset.subset(indices) for indices in parts))
    _check_empty_groups(dataset, splits, fractions, empty_groups)
    return splits


def facims_split(dataset: Dataset, *, seed: int, empty_groups: str = "warn", fixed: bool = False) -> Splits:
    """The FACIMS protocol (SPEC §7): 30 % test stratified by label, then 30 % of the rest val.

    On credit (30,000 rows) this gives train 14,700 / val 6,300 / test 9,000, each with the
    label proportions of the full data. Groups are *not* stratified (as in the paper), so a
    tiny group (credit EDUCATION=0 has 14 rows) can miss a split; by default that is logged as
    a warning rather than raised, because the FACIMS solver (all-False mask rows) and the
    metrics (skipped empty groups) handle empty groups.

    Args:
      dataset: the rows to split.
      seed: seed of ``np.random.default_rng`` (one generator drives both stages).
      empty_groups: ``"warn"`` (default), ``"raise"`` or ``"ignore"``, as in :func:`split`.
      fixed: the official code's split instead, the same for every seed: scikit-learn's
        ``train_test_split(test_size=0.3, random_state=42, stratify=labels)``, then the same
        call on the rest (its ``random_state`` and stratification; on credit this reproduces the
        official training groups 9 / 5,180 / 6,914 / 2,374 / 56 / 139 / 28 row for row). ``seed``
        is then unused here (it still drives resampling and training). Needs scikit-learn
        (the ``data`` extra).
    """
    dataset = _check_dataset(dataset)
    seed = check_seed(seed)
    if fixed:
        train, val, test = _official_split_rows(dataset.labels)
    else:
        rng = np.random.default_rng(seed)
        rest, test = stratified_partition(dataset.labels.astype(np.int64), np.array([0.7, 0.3]), rng)
        train_in_rest, val_in_rest = stratified_partition(
            dataset.labels[rest].astype(np.int64), np.array([0.7, 0.3]), rng
        )
        train, val = rest[train_in_rest], rest[val_in_rest]
    splits = Splits(dataset.subset(train), dataset.subset(val), dataset.subset(test))
    _check_empty_groups(dataset, splits, (0.49, 0.21, 0.30), empty_groups)
    return splits


OFFICIAL_SPLIT_RANDOM_STATE = 42  # the FACIMS official code's train_test_split(random_state=42)


def _official_split_rows(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(train, val, test)`` rows of the official code's two label-stratified ``train_test_split``
    calls (30 % test, then 30 % of the rest), each sorted (row order, as the per-seed split)."""
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "facims_split(fixed=True) reproduces scikit-learn's train_test_split and needs scikit-learn: "
            "pip install 'fairopt[data]' (or pip install scikit-learn)"
        ) from None
    rest, test = train_test_split(np.arange(len(labels)), test_size=0.3, random_state=OFFICIAL_SPLIT_RANDOM_STATE,
                                  stratify=labels)
    train, val = train_test_split(rest, test_size=0.3, random_state=OFFICIAL_SPLIT_RANDOM_STATE, stratify=labels[rest])
    return np.sort(train), np.sort(val), np.sort(test)


class FeatureStatistics(NamedTuple):
    """Per-column ``mean`` and ``scale`` (float64 ``[d]``) of a standardisation."""

    mean: np.ndarray
    scale: np.ndarray


def feature_statistics(dataset: Dataset, *, min_scale: float = 1e-8) -> FeatureStatistics:
    """Column means and population standard deviations (``ddof=0``, as sklearn's StandardScaler).

    A column whose standard deviation is below ``min_scale`` (constant in this data) gets
    scale 1, so standardising it gives zeros instead of dividing by zero.
    """
    dataset = _check_dataset(dataset)
    if len(dataset) == 0:
        raise ValueError(f"cannot fit standardisation statistics on {dataset.name!r}: it has no rows")
    features = dataset.features.astype(np.float64)
    mean = features.mean(axis=0)
    std = features.std(axis=0)
    return FeatureStatistics(mean, np.where(std < min_scale, 1.0, std))


def apply_standardization(dataset: Dataset, statistics: FeatureStatistics) -> Dataset:
    """``(x - mean) / scale`` column-wise, as float32."""
    dataset = _check_dataset(dataset)
    mean, scale = (np.asarray(a, np.float64) for a in statistics)
    if mean.shape != (dataset.num_features,) or scale.shape != (dataset.num_features,):
        raise ValueError(
            f"statistics must have shape ({dataset.num_features},) to match the features, got "
            f"{mean.shape} and {scale.shape}"
        )
    standardized = (dataset.features.astype(np.float64) - mean) / scale
    return dataset.replace(features=standardized.astype(np.float32))


def standardize(splits: Splits) -> Splits:
    """Standardises all three splits with the mean / std of the *training* split only.

    ``x' = (x - mean_train) / std_train`` column-wise (population std; constant training
    columns get scale 1). Fitting on the training split only avoids the leakage of the
    official FACIMS code, which fitted its scaler on the full data before splitting.
    """
    if not isinstance(splits, Splits):
        if isinstance(splits, tuple) and len(splits) == 3 and all(isinstance(p, Dataset) for p in splits):
            splits = Splits(*splits)
        else:
            raise TypeError(
                f"splits must be a fairopt.data.Splits (train, val, test), got {type(splits).__name__}"
            )
    statistics = feature_statistics(splits.train)
    return Splits(*(apply_standardization(part, statistics) for part in splits))


def resample_per_group(dataset: Dataset, n_per_group: int, *, seed: int) -> Dataset:
    """"Limited samples per subgroup" (FACIMS, SPEC §7): exactly ``n_per_group`` rows per group.

    A group with at least ``n_per_group`` rows contributes a uniform sample without
    replacement. A smaller group keeps every one of its rows once and fills the shortfall with
    rows drawn uniformly *with* replacement (so no row of a small group is lost). The result is
    shuffled. (The FACIMS paper states the protocol but not the sampler; this is fairopt's
    choice.)

    Args:
      dataset: the (training) rows.
      n_per_group: rows per group, a positive integer.
      seed: seed of ``np.random.default_rng``.

    Raises:
      ValueError: a group has no rows (it is named; drop it from ``group_names`` or from the
        data first), or ``n_per_group`` is not positive.
    """
    dataset = _check_dataset(dataset)
    seed = check_seed(seed)
    if isinstance(n_per_group, bool) or not isinstance(n_per_group, (int, np.integer)):
        raise TypeError(f"n_per_group must be a positive integer, got {n_per_group!r}")
    if n_per_group <= 0:
        raise ValueError(f"n_per_group must be a positive integer, got {n_per_group}")
    counts = dataset.group_counts
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        names = ", ".join(f"{g} {dataset.group_names[g]!r}" for g in empty)
        raise ValueError(
            f"resample_per_group: group(s) {names} of {dataset.name!r} have no rows, so they cannot "
            f"be resampled to {n_per_group} rows; split with stratify='label_group', or remove the group"
        )
    rng = np.random.default_rng(seed)
    chosen = []
    for g in range(dataset.num_groups):
        rows = np.flatnonzero(dataset.groups == g)
        if rows.size >= n_per_group:
            chosen.append(rng.choice(rows, size=n_per_group, replace=False))
        else:
            chosen.append(np.concatenate([rows, rng.choice(rows, size=n_per_group - rows.size, replace=True)]))
    indices = rng.permutation(np.concatenate(chosen))
    resampled = dataset.subset(indices)
    return resampled.replace(description=f"{dataset.description} [resampled to {n_per_group} rows per group]")
