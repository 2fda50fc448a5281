"""Synthetic and derived datasets: subgroup Gaussians, Waterbirds-like, long-tailed, digits-LT.

All generators are numpy, deterministic given ``seed`` and fix the (class, group) cell counts
exactly (largest-remainder rounding of ``n * proportion``) rather than drawing them, so
experiments with the same arguments always see the same imbalance.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from fairopt.data.dataset import Dataset, Splits, check_seed
from fairopt.data.splits import largest_remainder, stratified_partition

__all__ = [
    "synthetic_subgroups",
    "waterbirds_like",
    "WATERBIRDS_CELL_PROPORTIONS",
    "long_tailed",
    "long_tailed_counts",
    "digits_lt",
]

#: Waterbirds (class, group) training proportions, AutoBalance §4 (Li et al. 2021) / Sagawa et
#: al. (2020): rows = class (0 landbird, 1 waterbird), columns = group (0 land, 1 water).
WATERBIRDS_CELL_PROPORTIONS = ((0.73, 0.038), (0.012, 0.22))


def _proportions(values, argument: str, minimum_length: int = 1) -> np.ndarray:
    try:
        array = np.asarray(values, np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{argument} must be a sequence of numbers, got {values!r}") from error
    if array.ndim != 1 or array.size < minimum_length:
        raise ValueError(f"{argument} must be a 1-D sequence of at least {minimum_length} numbers, got {values!r}")
    if not np.all(np.isfinite(array)) or np.any(array < 0) or array.sum() <= 0:
        raise ValueError(f"{argument} must be non-negative with a positive sum, got {values!r}")
    if not math.isclose(array.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"{argument} must sum to 1, got {values!r} (sum {array.sum():.6g})")
    return array / array.sum()


def _positive_int(value, argument: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{argument} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{argument} must be an integer >= {minimum}, got {value}")
    return int(value)


def _non_negative_float(value, argument: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{argument} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{argument} must be finite and non-negative, got {value}")
    return float(value)


def _cell_labels(cell_counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Labels and groups for given ``[K, G]`` cell counts, rows in random order."""
    num_groups = cell_counts.shape[1]
    cells = np.repeat(np.arange(cell_counts.size), cell_counts.ravel())
    cells = rng.permutation(cells)
    return (cells // num_groups).astype(np.int32), (cells % num_groups).astype(np.int32)


def synthetic_subgroups(
    num_samples: int = 6000,
    *,
    num_features: int = 10,
    class_proportions: Sequence[float] = (0.8, 0.2),
    group_proportions: Sequence[float] = (0.6, 0.25, 0.1, 0.05),
    cell_proportions=None,
    class_separation: float = 2.0,
    group_heterogeneity: float = 1.0,
    group_offset: float = 1.0,
    seed: int = 0,
) -> Dataset:
    """Class-imbalanced Gaussian data on several subgroups with group-dependent boundaries.

    Cell (k, g) holds ``n_{k,g}`` rows (largest-remainder rounding of ``n pi_k q_g``, i.e.
    class and group independent, unless ``cell_proportions`` gives the joint law) drawn as::

        x ~ N(mu_{k,g}, I_d),   mu_{k,g} = s * u_k + h * v_{k,g} + o * b_g,

    with fixed random directions ``u_k, v_{k,g}, b_g ~ N(0, I_d / d)`` (unit length on
    average), class separation ``s``, group heterogeneity ``h`` and group offset ``o``. The
    Bayes decision boundary between two classes inside group g is the perpendicular bisector
    of ``mu_{k,g}`` and ``mu_{k',g}``, so ``h > 0`` makes the boundary differ between groups
    (a single shared classifier is then suboptimal for minority groups), while ``o`` only
    shifts each group's cloud. ``h = 0`` gives one shared boundary.

    Args:
      num_samples: n, total rows.
      num_features: d.
      class_proportions: pi_k (sum 1), K >= 2.
      group_proportions: q_g (sum 1), G >= 1.
      cell_proportions: optional ``[K, G]`` joint proportions (sum 1) overriding the product.
      class_separation: s.
      group_heterogeneity: h.
      group_offset: o.
      seed: seeds both the directions and the rows.
    """
    num_samples = _positive_int(num_samples, "num_samples")
    num_features = _positive_int(num_features, "num_features")
    class_p = _proportions(class_proportions, "class_proportions", minimum_length=2)
    group_p = _proportions(group_proportions, "group_proportions")
    if cell_proportions is None:
        joint = np.outer(class_p, group_p)
    else:
        joint = np.asarray(cell_proportions, np.float64)
        if joint.shape != (class_p.size, group_p.size):
            raise ValueError(
                f"cell_proportions must have shape [K, G] = ({class_p.size}, {group_p.size}), got {joint.shape}"
            )
        joint = _proportions(joint.ravel(), "cell_proportions").reshape(joint.shape)
    separation = _non_negative_float(class_separation, "class_separation")
    heterogeneity = _non_negative_float(group_heterogeneity, "group_heterogeneity")
    offset = _non_negative_float(group_offset, "group_offset")
    rng = np.random.default_rng(check_seed(seed))
    num_classes, num_groups = joint.shape
    scale = 1.0 / math.sqrt(num_features)
    class_directions = rng.normal(0.0, scale, (num_classes, num_features))
    cell_directions = rng.normal(0.0, scale, (num_classes, num_groups, num_features))
    group_directions = rng.normal(0.0, scale, (num_groups, num_features))
    means = (
        separation * class_directions[:, None]
        + heterogeneity * cell_directions
        + offset * group_directions[None, :]
    )
    cell_counts = largest_remainder(num_samples, joint.ravel()).reshape(joint.shape)
    labels, groups = _cell_labels(cell_counts, rng)
    features = means[labels, groups] + rng.normal(0.0, 1.0, (num_samples, num_features))
    return Dataset(
        features,
        labels,
        groups,
        class_names=tuple(f"class_{k}" for k in range(num_classes)),
        group_names=tuple(f"group_{g}" for g in range(num_groups)),
        feature_names=tuple(f"x{j}" for j in range(num_features)),
        name="synthetic_subgroups",
        description=(
            f"Gaussian subgroups: seed={seed}, separation={separation}, heterogeneity={heterogeneity}, "
            f"offset={offset}"
        ),
    )


def waterbirds_like(
    num_train: int = 4795,
    num_val: int = 1199,
    num_test: int = 5794,
    *,
    core_dim: int = 5,
    spurious_dim: int = 5,
    noise_dim: int = 10,
    core_std: float = 2.0,
    spurious_std: float = 0.2,
    noise_std: float = 1.0,
    seed: int = 0,
) -> Splits:
    """A tabular spurious-correlation task with the Waterbirds (class, group) proportions.

    Classes: 0 landbird, 1 waterbird; groups (backgrounds): 0 land, 1 water. Train and val
    cells follow :data:`WATERBIRDS_CELL_PROPORTIONS` (.73 / .038 / .012 / .22 for
    (land, land) / (land, water) / (water, land) / (water, water); AutoBalance §4), so the
    background agrees with the bird type on 95 % of rows; the test split is balanced (.25 per
    cell), as in Sagawa et al. (2020). Sizes default to those of Waterbirds.

    Features follow the synthetic model of Sagawa et al. (2020, §5), ``y, a`` in ``{-1, +1}``::

        x = [x_core ~ N(y 1, core_std^2 I), x_spu ~ N(a 1, spurious_std^2 I), x_noise ~ N(0, noise_std^2 I)]

    The core features determine the class but are noisy; the spurious ones determine the
    background almost exactly, so a model that leans on them fails on the minority cells.

    Args:
      num_train, num_val, num_test: rows per split.
      core_dim, spurious_dim, noise_dim: feature block sizes (noise_dim may be 0).
      core_std, spurious_std, noise_std: per-coordinate standard deviations.
      seed: seed of ``np.random.default_rng``.

    Returns:
      :class:`Splits` (train, val, test).
    """
    sizes = [_positive_int(v, name) for v, name in ((num_train, "num_train"), (num_val, "num_val"), (num_test, "num_test"))]
    core_dim = _positive_int(core_dim, "core_dim")
    spurious_dim = _positive_int(spurious_dim, "spurious_dim")
    noise_dim = _positive_int(noise_dim, "noise_dim", minimum=0)
    stds = [_non_negative_float(v, n) for v, n in ((core_std, "core_std"), (spurious_std, "spurious_std"), (noise_std, "noise_std"))]
    rng = np.random.default_rng(check_seed(seed))
    train_cells = np.asarray(WATERBIRDS_CELL_PROPORTIONS).ravel()
    balanced_cells = np.full(4, 0.25)
    feature_names = (
        tuple(f"core_{j}" for j in range(core_dim))
        + tuple(f"spurious_{j}" for j in range(spurious_dim))
        + tuple(f"noise_{j}" for j in range(noise_dim))
    )

    def make(num_rows: int, cell_proportions: np.ndarray, part: str) -> Dataset:
        labels, groups = _cell_labels(largest_remainder(num_rows, cell_proportions).reshape(2, 2), rng)
        signed_label, signed_group = 2.0 * labels - 1.0, 2.0 * groups - 1.0
        features = np.concatenate(
            [
                signed_label[:, None] + stds[0] * rng.normal(size=(num_rows, core_dim)),
                signed_group[:, None] + stds[1] * rng.normal(size=(num_rows, spurious_dim)),
                stds[2] * rng.normal(size=(num_rows, noise_dim)),
            ],
            axis=1,
        )
        return Dataset(
            features,
            labels,
            groups,
            class_names=("landbird", "waterbird"),
            group_names=("land background", "water background"),
            feature_names=feature_names,
            name="waterbirds_like",
            description=f"Waterbirds-like spurious correlations ({part}, seed={seed})",
        )

    return Splits(
        make(sizes[0], train_cells, "train"),
        make(sizes[1], train_cells, "val"),
        make(sizes[2], balanced_cells, "balanced test"),
    )


def long_tailed_counts(class_counts, imbalance_factor: float, *, order: str = "frequency") -> np.ndarray:
    """Target rows per class of the exponential long-tail profile (Cao et al. 2019).

    Classes are ranked by frequency (most frequent first, ties by class index; or, with
    ``order="index"``, by class index as for originally balanced data like CIFAR-LT); the class of
    rank r keeps ``n_r = floor(n_max * rho^(-r / (K - 1)))`` rows (at least 1), ``n_max`` the
    largest class count, capped at the rows it actually has. So ``n_0 / n_{K-1} = rho`` when
    every class has enough rows. Classes with no rows stay empty.
    """
    counts = np.asarray(class_counts, np.int64)
    if counts.ndim != 1 or counts.size < 2:
        raise ValueError(f"a long-tailed profile needs at least 2 classes, got counts {counts.tolist()}")
    if isinstance(imbalance_factor, bool) or not isinstance(imbalance_factor, (int, float, np.integer, np.floating)):
        raise TypeError(f"imbalance_factor must be a number >= 1, got {imbalance_factor!r}")
    if not math.isfinite(imbalance_factor) or imbalance_factor < 1:
        raise ValueError(f"imbalance_factor must be finite and >= 1 (rho = n_max / n_min), got {imbalance_factor}")
    if order not in ("frequency", "index"):
        raise ValueError(f"order={order!r} is not supported; choose 'frequency' or 'index'")
    num_classes = counts.size
    rank = np.arange(num_classes)
    if order == "frequency":
        rank[np.argsort(-counts, kind="stable")] = np.arange(num_classes)
    n_max = counts.max()
    targets = np.floor(n_max * float(imbalance_factor) ** (-rank / (num_classes - 1)) + 1e-9).astype(np.int64)
    return np.where(counts > 0, np.minimum(np.maximum(targets, 1), counts), 0)


def long_tailed(dataset: Dataset, imbalance_factor: float, seed: int, *, order: str = "frequency") -> Dataset:
    """Subsamples each class to the exponential long-tail profile of :func:`long_tailed_counts`.

    ``n_k = n_max * rho^(-k / (K - 1))`` over classes ranked by frequency (AutoBalance §4 /
    Cao et al. 2019; ``rho = n_max / n_min`` is the imbalance factor). Rows kept inside a
    class are a uniform sample without replacement; the kept rows stay in their original order.

    Args:
      dataset: the source rows (K >= 2).
      imbalance_factor: rho >= 1 (rho = 1 keeps every row).
      seed: seed of ``np.random.default_rng``.
      order: ``"frequency"`` (default) or ``"index"``: how classes are ranked along the tail.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a fairopt.data.Dataset, got {type(dataset).__name__}")
    targets = long_tailed_counts(dataset.class_counts, imbalance_factor, order=order)
    rng = np.random.default_rng(check_seed(seed))
    kept = [
        rng.choice(np.flatnonzero(dataset.labels == k), size=int(targets[k]), replace=False)
        for k in range(dataset.num_classes)
    ]
    subset = dataset.subset(np.sort(np.concatenate(kept)))
    return subset.replace(
        name=f"{dataset.name}_lt",
        description=f"{dataset.description} [long-tailed, imbalance factor {imbalance_factor}]",
    )


def digits_lt(
    imbalance_factor: float = 10.0,
    *,
    test_per_class: int = 50,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Splits:
    """A long-tailed version of scikit-learn's 8x8 digits (1,797 rows, 10 classes, 64 pixels).

    ``test_per_class`` rows of every class form a balanced test split; the remaining rows are
    made long-tailed with :func:`long_tailed` (digit 0 the head, digit 9 the tail:
    ``order="index"``, since digits are nearly balanced, as in CIFAR-LT) and split, stratified by label, into train and
    val (``val_fraction``; AutoBalance searches on an 80 / 20 split). Features are the raw
    pixel intensities 0..16; there is a single group ``"all"``. Needs scikit-learn (bundled
    data, offline).

    Args:
      imbalance_factor: rho = n_max / n_min of train+val.
      test_per_class: balanced test rows per class.
      val_fraction: in (0, 1).
      seed: seed of ``np.random.default_rng``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ModuleNotFoundError(
            "digits_lt needs scikit-learn; install the data extra: pip install 'fairopt[data]'"
        ) from error
    test_per_class = _positive_int(test_per_class, "test_per_class")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    seed = check_seed(seed)
    digits = load_digits()
    counts = np.bincount(digits.target)
    if test_per_class >= counts.min():
        raise ValueError(
            f"test_per_class={test_per_class} leaves no training rows for the smallest digit class "
            f"({counts.min()} rows); use at most {counts.min() - 1}"
        )
    full = Dataset.from_arrays(
        digits.data,
        digits.target,
        class_names=tuple(str(k) for k in range(10)),
        feature_names=tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8)),
        name="digits",
        description="scikit-learn 8x8 digits",
    )
    rng = np.random.default_rng(seed)
    test_rows = np.sort(
        np.concatenate([rng.choice(np.flatnonzero(full.labels == k), test_per_class, replace=False) for k in range(10)])
    )
    remaining = np.setdiff1d(np.arange(len(full)), test_rows)
    tail = long_tailed(full.subset(remaining), imbalance_factor, seed, order="index")
    train_rows, val_rows = stratified_partition(
        tail.labels.astype(np.int64), np.array([1.0 - val_fraction, val_fraction]), rng
    )
    test = full.subset(test_rows).replace(name="digits_lt", description="scikit-learn digits, balanced test split")
    tail = tail.replace(name="digits_lt")
    return Splits(tail.subset(train_rows), tail.subset(val_rows), test)
