"""The :class:`Dataset` container, :class:`Splits`, and input validation shared by the loaders.

A :class:`Dataset` is an immutable, validated bundle of numpy arrays (features float32
``[n, d]``, labels int32 ``[n]`` in ``[0, K)``, groups int32 ``[n]`` in ``[0, G)``) with the
names of its classes, groups and features. Validation happens once, at construction, outside
any ``jit``: every later function may assume clean arrays.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["Dataset", "Splits", "summary", "check_seed"]


def _as_integer_array(values, argument: str) -> np.ndarray:
    """``values`` as a 1-D int32 array; TypeError unless the dtype is integer (or bool)."""
    array = np.asarray(values)
    if array.dtype == bool:
        array = array.astype(np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"{argument} must be integers, got dtype {array.dtype}; encode them as integer codes "
            f"0..K-1 (e.g. np.unique(values, return_inverse=True)[1]) or cast whole-number floats "
            f"with .astype(np.int32)"
        )
    if array.ndim != 1:
        raise ValueError(f"{argument} must be 1-D [n], got shape {array.shape}")
    if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{argument} do not fit in int32 (range {array.min()}..{array.max()})")
    return np.array(array, dtype=np.int32, copy=True)


def _check_names(names, argument: str) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{argument} must be a tuple of strings, got {type(names).__name__}")
    names = tuple(names)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{argument} must contain strings, got {name!r} ({type(name).__name__})")
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"{argument} must be unique, got duplicates {duplicates}")
    return names


def check_seed(seed, argument: str = "seed") -> int:
    """Validates a seed for ``np.random.default_rng``: a non-negative Python/numpy integer."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{argument} must be a non-negative integer, got {seed!r} ({type(seed).__name__})")
    if seed < 0:
        raise ValueError(f"{argument} must be a non-negative integer, got {seed}")
    return int(seed)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled tabular dataset with one categorical sensitive attribute (the *group*).

    Attributes:
      features: float32 ``[n, d]``, all finite.
      labels: int32 ``[n]`` with values in ``[0, K)``, ``K = len(class_names)``.
      groups: int32 ``[n]`` with values in ``[0, G)``, ``G = len(group_names)``.
      class_names: name of every class, index = label code.
      group_names: name of every group, index = group code.
      feature_names: name of every feature column (length ``d``).
      name: short identifier (e.g. ``"credit"``).
      description: provenance and preprocessing in one or two sentences.

    The arrays are private read-only copies, so a Dataset cannot change after validation.
    Construction raises ``TypeError`` for non-numeric features or non-integer labels/groups and
    ``ValueError`` (naming the column or argument) for NaN/infinite features, codes out of
    range, mismatched lengths or names.
    """

    features: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    class_names: tuple[str, ...]
    group_names: tuple[str, ...]
    feature_names: tuple[str, ...]
    name: str = "dataset"
    description: str = ""

    def __post_init__(self):
        features = np.asarray(self.features)
        if features.dtype == bool:
            features = features.astype(np.float32)
        if not (np.issubdtype(features.dtype, np.integer) or np.issubdtype(features.dtype, np.floating)):
            raise TypeError(
                f"features must be real numbers, got dtype {features.dtype}; encode categorical "
                f"columns (e.g. one-hot) before building a Dataset"
            )
        if features.ndim != 2:
            raise ValueError(f"features must be 2-D [n, d], got shape {features.shape}")
        features = np.array(features, dtype=np.float32, copy=True)
        labels = _as_integer_array(self.labels, "labels")
        groups = _as_integer_array(self.groups, "groups")
        class_names = _check_names(self.class_names, "class_names")
        group_names = _check_names(self.group_names, "group_names")
        feature_names = _check_names(self.feature_names, "feature_names")
        if not isinstance(self.name, str) or not isinstance(self.description, str):
            raise TypeError("name and description must be strings")
        num_rows = features.shape[0]
        if labels.shape[0] != num_rows or groups.shape[0] != num_rows:
            raise ValueError(
                f"features, labels and groups must have the same number of rows, got "
                f"{num_rows}, {labels.shape[0]} and {groups.shape[0]}"
            )
        if len(feature_names) != features.shape[1]:
            raise ValueError(
                f"feature_names has {len(feature_names)} names but features has {features.shape[1]} columns"
            )
        if not class_names or not group_names:
            raise ValueError("class_names and group_names must each name at least one class/group")
        bad_columns = ~np.all(np.isfinite(features), axis=0)
        if np.any(bad_columns):
            column = int(np.flatnonzero(bad_columns)[0])
            row = int(np.flatnonzero(~np.isfinite(features[:, column]))[0])
            raise ValueError(
                f"feature column {feature_names[column]!r} (index {column}) has a NaN or infinite value "
                f"(first at row {row}: {features[row, column]}); impute or drop those rows first"
                + (" (or the value overflows float32)" if np.isfinite(np.asarray(self.features)[row, column]) else "")
            )
        for values, names, argument in ((labels, class_names, "labels"), (groups, group_names, "groups")):
            if values.size and (values.min() < 0 or values.max() >= len(names)):
                bad = values[(values < 0) | (values >= len(names))]
                raise ValueError(
                    f"{argument} must lie in [0, {len(names)}) (one code per name in "
                    f"{'class_names' if argument == 'labels' else 'group_names'}), found {int(bad[0])}"
                )
        for array in (features, labels, groups):
            array.setflags(write=False)
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "class_names", class_names)
        object.__setattr__(self, "group_names", group_names)
        object.__setattr__(self, "feature_names", feature_names)

    @classmethod
    def from_arrays(
        cls,
        features,
        labels,
        groups=None,
        *,
        class_names: Sequence[str] | None = None,
        group_names: Sequence[str] | None = None,
        feature_names: Sequence[str] | None = None,
        name: str = "custom",
        description: str = "",
    ) -> "Dataset":
        """Builds a Dataset from arrays, naming classes/groups/features ``class_0``... by default.

        Args:
          features: ``[n, d]`` real array.
          labels: ``[n]`` integer codes in ``[0, K)``; ``K = max(labels) + 1`` unless named.
          groups: ``[n]`` integer codes; ``None`` puts every row in a single group ``"all"``.
          class_names, group_names, feature_names: optional names (their length sets K, G, d).
          name, description: metadata.
        """
        features = np.asarray(features)
        labels = _as_integer_array(labels, "labels")
        groups = np.zeros(labels.shape, np.int32) if groups is None else _as_integer_array(groups, "groups")
        if class_names is None:
            class_names = tuple(f"class_{k}" for k in range(int(labels.max(initial=0)) + 1))
        if group_names is None:
            group_names = ("all",) if groups.size == 0 or groups.max() == 0 else tuple(
                f"group_{g}" for g in range(int(groups.max()) + 1)
            )
        if feature_names is None:
            width = features.shape[1] if features.ndim == 2 else 0
            feature_names = tuple(f"x{j}" for j in range(width))
        return cls(features, labels, groups, tuple(class_names), tuple(group_names), tuple(feature_names), name, description)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, rows={len(self)}, features={self.num_features}, "
            f"classes={self.num_classes}, groups={self.num_groups})"
        )

    @property
    def num_classes(self) -> int:
        """K, the number of named classes (some may have no rows)."""
        return len(self.class_names)

    @property
    def num_groups(self) -> int:
        """G, the number of named groups (some may have no rows)."""
        return len(self.group_names)

    @property
    def num_features(self) -> int:
        """d, the number of feature columns."""
        return int(self.features.shape[1])

    @property
    def class_counts(self) -> np.ndarray:
        """int64 ``[K]``: rows per class."""
        return np.bincount(self.labels, minlength=self.num_classes)

    @property
    def group_counts(self) -> np.ndarray:
        """int64 ``[G]``: rows per group."""
        return np.bincount(self.groups, minlength=self.num_groups)

    @property
    def cell_counts(self) -> np.ndarray:
        """int64 ``[K, G]``: rows per (class, group) cell."""
        flat = self.labels.astype(np.int64) * self.num_groups + self.groups
        return np.bincount(flat, minlength=self.num_classes * self.num_groups).reshape(
            self.num_classes, self.num_groups
        )

    def subset(self, indices) -> "Dataset":
        """The rows ``indices`` (integer positions, or a boolean mask of length n), same names."""
        indices = np.asarray(indices)
        if indices.dtype == bool:
            if indices.shape != (len(self),):
                raise ValueError(f"a boolean indices mask must have shape ({len(self)},), got {indices.shape}")
            indices = np.flatnonzero(indices)
        elif indices.size == 0:
            indices = indices.astype(np.int64)
        elif not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"indices must be integer positions or a boolean mask, got dtype {indices.dtype}")
        if indices.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {indices.shape}")
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)}), got {indices.min()}..{indices.max()}")
        return dataclasses.replace(
            self, features=self.features[indices], labels=self.labels[indices], groups=self.groups[indices]
        )

    def replace(self, **changes) -> "Dataset":
        """A validated copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """Human-readable counts per class, per group and per (class, group) cell."""
        counts = self.cell_counts
        total = max(len(self), 1)
        lines = [
            f"{self.name}: {len(self)} rows, {self.num_features} features, "
            f"{self.num_classes} classes, {self.num_groups} groups",
        ]
        if self.description:
            lines.append(f"  {self.description}")
        lines.append("  classes:")
        for k, class_name in enumerate(self.class_names):
            lines.append(f"    {k} {class_name}: {counts[k].sum()} ({100 * counts[k].sum() / total:.1f}%)")
        lines.append("  groups:")
        for g, group_name in enumerate(self.group_names):
            lines.append(f"    {g} {group_name}: {counts[:, g].sum()} ({100 * counts[:, g].sum() / total:.1f}%)")
        width = max(6, *(len(str(c)) for c in counts.ravel()))
        lines.append("  cells (rows = classes, columns = groups):")
        lines.append("    " + " " * 4 + "".join(f"{g:>{width + 1}}" for g in range(self.num_groups)))
        for k in range(self.num_classes):
            lines.append(f"    {k:>3} " + "".join(f"{c:>{width + 1}}" for c in counts[k]))
        return "\n".join(lines)


def summary(dataset: Dataset) -> str:
    """``dataset.describe()``: counts per class, group and (class, group) cell, as text."""
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a fairopt.data.Dataset, got {type(dataset).__name__}")
    return dataset.describe()


class Splits(NamedTuple):
    """Train / validation / test partitions of one dataset (same names in all three)."""

    train: Dataset
    val: Dataset
    test: Dataset

    def describe(self) -> str:
        """The :meth:`Dataset.describe` text of each split."""
        return "\n".join(f"[{part}] {getattr(self, part).describe()}" for part in self._fields)
