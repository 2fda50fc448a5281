"""Data layer: real tabular datasets (offline), synthetic generators, splits and group batchers.

Typical FACIMS pipeline (SPEC §7)::

    from fairopt import data
    dataset = data.credit()                                  # 30,000 rows, 7 EDUCATION groups
    splits = data.standardize(data.facims_split(dataset, seed=0))   # 14,700 / 6,300 / 9,000
    train = data.resample_per_group(splits.train, 400, seed=0)      # 400 rows per group
    grouped = data.group_arrays(train)                       # [G, N_max, d] for vmapped solvers
    batch = data.sample_group_batch(key, grouped, 50)         # [G, 50, d] + mask, jit-able
    print(data.summary(train))

    own = data.from_csv("table.csv", label="y", groups=["sex", "race"])   # your own data

Modules: :mod:`~fairopt.data.dataset` (the container), :mod:`~fairopt.data.tabular` (real
data), :mod:`~fairopt.data.synthetic` (generators), :mod:`~fairopt.data.splits`,
:mod:`~fairopt.data.batching`, :mod:`~fairopt.data.registry` (:func:`load`),
:mod:`~fairopt.data.frames` (your own table: :func:`from_frame`, :func:`from_csv`).
"""

from fairopt.data.batching import (
    GroupBatch,
    GroupedArrays,
    group_arrays,
    sample_group_batch,
    sample_group_batches,
    whole_group_batch,
)
from fairopt.data.dataset import Dataset, Splits, summary
from fairopt.data.frames import DataWarning, check_group_sizes, from_csv, from_frame, read_csv
from fairopt.data.registry import DATASETS, load
from fairopt.data.splits import (
    FeatureStatistics,
    apply_standardization,
    facims_split,
    feature_statistics,
    resample_per_group,
    split,
    standardize,
)
from fairopt.data.synthetic import (
    WATERBIRDS_CELL_PROPORTIONS,
    digits_lt,
    long_tailed,
    long_tailed_counts,
    synthetic_subgroups,
    waterbirds_like,
)
from fairopt.data.tabular import CELEBA_ATTRIBUTES, adult, celeba_attributes, compas, credit, drug, german

__all__ = [
    "Dataset",
    "Splits",
    "summary",
    "from_frame",
    "from_csv",
    "read_csv",
    "check_group_sizes",
    "DataWarning",
    "load",
    "DATASETS",
    "credit",
    "adult",
    "compas",
    "german",
    "celeba_attributes",
    "CELEBA_ATTRIBUTES",
    "drug",
    "synthetic_subgroups",
    "waterbirds_like",
    "WATERBIRDS_CELL_PROPORTIONS",
    "long_tailed",
    "long_tailed_counts",
    "digits_lt",
    "split",
    "facims_split",
    "standardize",
    "FeatureStatistics",
    "feature_statistics",
    "apply_standardization",
    "resample_per_group",
    "GroupedArrays",
    "GroupBatch",
    "group_arrays",
    "sample_group_batch",
    "sample_group_batches",
    "whole_group_batch",
]
