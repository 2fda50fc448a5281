"""Accuracy and group-fairness metrics as pure, jit-able, vmappable JAX functions.

Every metric is computed from weighted counts (one-hot einsums), so it has static shapes, works
under ``jax.jit`` and ``jax.vmap`` (e.g. over a leading axis of models, ``probs [M, n, K]``),
and accepts an optional boolean ``mask [n]`` that drops padded rows.

Conventions shared by all functions:

* ``probs`` is ``[n, K]`` predicted class probabilities (rows need not sum to one; values must
  lie in [0, 1]), or ``[n]`` integer predicted labels, which are treated as one-hot
  probabilities. The predicted label is ``argmax(probs)`` (ties go to the lowest class, so an
  all-zero row predicts class 0).
* ``score`` selects what the "score" ``f(X)`` of the fairness gaps is: ``"hard"`` (default) the
  one-hot predicted label, so rates are selection rates / TPR / FPR / precision exactly as in
  fairlearn; ``"soft"`` the predicted probabilities themselves, so rates are expected
  probabilities (FACIMS eq. 3 read with a probabilistic score).
* Binary problems (K = 2) measure class 1 as the positive class, like fairlearn's
  ``pos_label=1``. Multi-class problems (K > 2) measure every class one-vs-rest (class k against
  the rest, for both the prediction and the label) and reduce over classes with
  ``class_reduce`` (default ``"max"``, as the FACIMS code does). For K = 2 the class-0 gaps
  equal the class-1 gaps for hard scores, so nothing is lost.
* ``reduce`` says how the per-group deviations become one number (default ``"mean"``, the
  unweighted mean over groups used by the FACIMS code). With ``s_g`` the rate of group g and
  ``s`` the overall rate on the same conditioning event:

  - ``"mean"``: ``(1/|G'|) sum_g |s_g - s|`` over the non-skipped groups G';
  - ``"weighted"``: ``sum_g (n_g / n) |s_g - s|`` with ``n_g`` the group's size on the
    conditioning event -- the expectation ``E_A |E[f | .] - E[f | ., A]|`` of FACIMS eq. 3;
  - ``"max"``: ``max_g |s_g - s|`` -- fairlearn's ``method="to_overall"``;
  - ``"between_groups"``: ``max_g s_g - min_g s_g`` -- fairlearn's default
    ``method="between_groups"``.

* Empty cells never produce NaN. A group with no samples on a gap's conditioning event (no
  samples at all for DP; no samples of label y for EO; no positives for DEO; no predicted
  positives for PP) is skipped for that event. A conditioning event on which every group is
  empty (e.g. a class absent from ``labels``) is skipped as a whole. Gaps with nothing left
  to compare are 0. With ``return_skipped=True`` the gap functions also return how many groups
  were skipped for at least one (non-empty) conditioning event; :func:`report` adds these counts
  as ``<metric>_skipped_groups``. Note: fairlearn/sklearn instead score a group without
  positives as TPR 0 (``zero_division=0``) and an absent label as a rate of 0; the results agree
  whenever every present group has every conditioning event.

Edge cases: a single-class group is skipped by the rates conditioned on the missing class only;
constant predictions give DP = EO = 0 and PP skips the groups that never predict the class; an
all-zero probability row predicts class 0 and has score 0 under ``score="soft"``; ``n = 0`` (or
an all-False mask) gives 0 for every metric.

Compilation: each public function calls a jitted core whose only static arguments are sizes
(K, G, bins); the option strings become traced int32 indices (every reduction is computed and
one selected) and a missing mask becomes an all-True one, so switching options or masking never
recompiles. Row counts do not either: concrete (host-side) inputs are padded to a size bucket
(:func:`row_bucket`: at least 1,024 rows, then 1.5 * 2^k and 2^k, so at most 50 % padding) with
mask rows that are False, which no metric counts. A process therefore compiles at most two
programs per doubling of the largest row count it sees (23 buckets up to 2^21 rows) per (function,
K, G, bins), instead of one per distinct row count. The fairlearn-style entry points also round
the number of groups up to a power of two (the extra groups are empty, hence skipped). Inputs
traced by ``jit`` / ``vmap`` are not padded: their shapes are the caller's.

Validation: the public functions check shapes and options always and, when the inputs are
concrete (not traced by jit/vmap), also values (label/group ranges, NaN and out-of-range
probabilities, mask dtype); they raise ValueError/TypeError naming the argument and the fix.
Under jit/vmap the value checks are skipped: out-of-range labels/groups then contribute to no
count (their one-hot rows are zero).

References:
  [FACIMS] Tarzanagh et al., "Fairness-Aware Class Imbalanced Learning on Multiple Subgroups",
    UAI 2023, eq. (3a)-(3c) and the official evaluation code (``result_show``).
  [FairALM] Lokhande et al., "FairALM", ECCV 2020: DEO = |TPR_{s0} - TPR_{s1}|.
  fairlearn.metrics (0.15): demographic_parity_difference, equalized_odds_difference,
    equal_opportunity_difference.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "REDUCTIONS",
    "SCORES",
    "MIN_ROW_BUCKET",
    "row_bucket",
    "CLASS_REDUCTIONS",
    "LABEL_REDUCTIONS",
    "FAIRLEARN_METHODS",
    "confusion_matrix",
    "group_confusion_matrices",
    "accuracy",
    "balanced_accuracy",
    "per_class_recall",
    "cell_error",
    "worst_group_error",
    "group_balanced_error",
    "dp_gap",
    "eo_gap",
    "deo_gap",
    "pp_gap",
    "sufficiency_gap",
    "sufficiency_gap_official",
    "report_arrays",
    "report",
    "demographic_parity_difference",
    "equalized_odds_difference",
    "equal_opportunity_difference",
    "front_hypervolume",
]

REDUCTIONS = ("mean", "weighted", "max", "between_groups")
SCORES = ("hard", "soft")
CLASS_REDUCTIONS = ("max", "mean")
LABEL_REDUCTIONS = ("mean", "max")
FAIRLEARN_METHODS = ("between_groups", "to_overall")
OFFICIAL_NUM_BINS = 5
#: The smallest padded row count (see :func:`row_bucket`).
MIN_ROW_BUCKET = 1024
_PROBABILITY_TOLERANCE = 1e-5
_FLOAT = jnp.float32


# --------------------------------------------------------------------------------------------
# Input validation (public boundary, outside jit)
# --------------------------------------------------------------------------------------------


def _is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int (got {type(value).__name__}: {value!r}).")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum} (got {value}).")
    return value


def _check_option(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices} (got {value!r}).")


def _as_array(name: str, x: Any) -> Any:
    if x is None:
        raise TypeError(f"{name} is required (got None).")
    if _is_traced(x) or isinstance(x, jax.Array):
        return x
    try:
        return np.asarray(x)
    except Exception as error:  # pragma: no cover - exotic array-likes
        raise TypeError(f"{name} must be array-like (got {type(x).__name__}).") from error


_COUNT_ARGUMENT = {"class": "num_classes", "group": "num_groups"}


def _check_integer_vector(name: str, x: Any, length: int, upper: int, what: str) -> Any:
    x = _as_array(name, x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D [n] (got shape {tuple(x.shape)}).")
    if x.shape[0] != length:
        raise ValueError(f"{name} has length {x.shape[0]} but probs has {length} rows; pass one {what} per row.")
    dtype = np.dtype(x.dtype)
    if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        raise TypeError(f"{name} must hold integers in [0, {upper}) (got dtype {dtype}); encode it first, e.g. np.unique(..., return_inverse=True).")
    if not _is_traced(x) and x.size:
        values = np.asarray(x)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= upper:
            raise ValueError(f"{name} must lie in [0, {upper}) (got values in [{low}, {high}]); check {_COUNT_ARGUMENT[what]} or re-encode {name}.")
    return x


def row_bucket(num_rows: int) -> int:
    """The padded size of ``num_rows`` rows: :data:`MIN_ROW_BUCKET` (1,024), else the smallest of
    ``1.5 * 2^k`` and ``2^k`` that holds them (1,536, 2,048, 3,072, 4,096, 6,144, ...)."""
    if num_rows <= MIN_ROW_BUCKET:
        return MIN_ROW_BUCKET
    power = 1 << (int(num_rows) - 1).bit_length()  # the smallest power of two >= num_rows
    return 3 * power // 4 if 3 * power // 4 >= num_rows else power


def _pad_rows(probs, labels, groups, mask):
    """Concrete inputs as numpy arrays padded to :func:`row_bucket` rows, padding masked out
    (zeros, group 0, mask False). Built on the host, so padding itself compiles nothing."""
    n = probs.shape[0]
    size = row_bucket(n)

    def pad(array, dtype):
        array = np.asarray(array, dtype=dtype)
        out = np.zeros((size,) + array.shape[1:], dtype)
        out[:n] = array
        return out

    probs_dtype = np.asarray(probs).dtype
    if probs.ndim == 1 or probs_dtype == np.bool_:
        probs_dtype = np.int32 if probs.ndim == 1 else np.float32
    padded_mask = np.zeros(size, bool)
    padded_mask[:n] = True if mask is None else np.asarray(mask).astype(bool)
    return (
        pad(probs, probs_dtype),
        pad(labels, np.int32),
        None if groups is None else pad(groups, np.int32),
        padded_mask,
    )


def _prepare(probs, labels, groups, mask, num_classes, num_groups, *, needs_groups: bool = True):
    """Validates the public inputs and returns jnp arrays (concrete: padded to a row bucket) or
    the tracers unchanged."""
    num_classes = _check_count("num_classes", num_classes, 2)
    if needs_groups:
        num_groups = _check_count("num_groups", num_groups, 2)
    probs = _as_array("probs", probs)
    if probs.ndim == 2:
        if probs.shape[1] != num_classes:
            raise ValueError(f"probs must be [n, num_classes={num_classes}] (got shape {tuple(probs.shape)}); pass num_classes={probs.shape[1]} or fix probs.")
        dtype = np.dtype(probs.dtype)
        if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer) or dtype == np.bool_):
            raise TypeError(f"probs must be numeric (got dtype {dtype}).")
        if not _is_traced(probs) and probs.size:
            values = np.asarray(probs, dtype=np.float64)
            if not np.all(np.isfinite(values)):
                raise ValueError("probs contains NaN or inf; fix the model output (e.g. clip logits) before computing metrics.")
            low, high = values.min(), values.max()
            if low < -_PROBABILITY_TOLERANCE or high > 1 + _PROBABILITY_TOLERANCE:
                raise ValueError(f"probs must be probabilities in [0, 1] (got values in [{low:.4g}, {high:.4g}]); apply jax.nn.softmax to logits first.")
    elif probs.ndim == 1:
        probs = _check_integer_vector("probs", probs, probs.shape[0], num_classes, "class")
    else:
        raise ValueError(f"probs must be [n, K] probabilities or [n] predicted labels (got shape {tuple(probs.shape)}); for a batch of models use jax.vmap over the leading axis.")
    n = probs.shape[0]
    labels = _check_integer_vector("labels", labels, n, num_classes, "class")
    if needs_groups:
        groups = _check_integer_vector("groups", groups, n, num_groups, "group")
    if mask is not None:
        mask = _as_array("mask", mask)
        if mask.ndim != 1 or mask.shape[0] != n:
            raise ValueError(f"mask must be a boolean [n={n}] vector (got shape {tuple(mask.shape)}).")
        dtype = np.dtype(mask.dtype)
        if dtype != np.bool_:
            if not np.issubdtype(dtype, np.integer):
                raise TypeError(f"mask must be boolean (got dtype {dtype}); pass mask.astype(bool).")
            if not _is_traced(mask) and np.any((np.asarray(mask) != 0) & (np.asarray(mask) != 1)):
                raise ValueError("mask must hold only 0/1 (True/False) values; pass mask.astype(bool).")
    if not any(_is_traced(a) for a in (probs, labels, groups, mask)):
        probs, labels, groups, mask = _pad_rows(probs, labels, groups if needs_groups else None, mask)
        groups = jnp.asarray(groups) if needs_groups else groups
        return jnp.asarray(probs), jnp.asarray(labels), groups, jnp.asarray(mask), num_classes, num_groups
    if mask is not None:
        mask = jnp.asarray(mask).astype(bool)
    else:  # always pass an array: one compiled function serves masked and unmasked calls
        mask = jnp.ones(probs.shape[:1], bool)
    probs = jnp.asarray(probs)
    labels = jnp.asarray(labels).astype(jnp.int32)
    if needs_groups:
        groups = jnp.asarray(groups).astype(jnp.int32)
    return probs, labels, groups, mask, num_classes, num_groups


# --------------------------------------------------------------------------------------------
# Unchecked jit-able building blocks
# --------------------------------------------------------------------------------------------


def _safe_divide(numerator, denominator):
    """numerator / denominator where denominator > 0, else 0 (no NaN, no inf, safe gradients)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), 0.0)


def _masked_mean(values, valid, axis=None):
    valid = valid.astype(values.dtype)
    return _safe_divide(jnp.sum(values * valid, axis=axis), jnp.sum(valid, axis=axis))


def _masked_max(values, valid, axis=None):
    """Max of non-negative ``values`` over ``valid`` entries; 0 when none is valid."""
    return jnp.max(jnp.where(valid, values, 0.0), axis=axis)


def _sample_weights(mask, n):
    return jnp.ones((n,), _FLOAT) if mask is None else mask.astype(_FLOAT)


def _predicted_labels(probs):
    return probs.astype(jnp.int32) if probs.ndim == 1 else jnp.argmax(probs, axis=-1)


def _probabilities(probs, num_classes):
    if probs.ndim == 1:
        return jax.nn.one_hot(probs, num_classes, dtype=_FLOAT)
    return jnp.clip(probs.astype(_FLOAT), 0.0, 1.0)


def _select(index, candidates):
    """``candidates[index]`` for a traced option index (every candidate is computed; they are
    cheap reductions, and one compiled function then serves every option)."""
    return jnp.stack(candidates)[index]


def _option_index(name: str, value: str, choices: tuple[str, ...]) -> jax.Array:
    _check_option(name, value, choices)
    return jnp.int32(choices.index(value))


def _score_matrix(probs, num_classes, score):
    """[n, K] scores f(X): one-hot predicted labels (score index of "hard") or probabilities ("soft")."""
    hard = jax.nn.one_hot(_predicted_labels(probs), num_classes, dtype=_FLOAT)
    return jnp.where(score == SCORES.index("soft"), _probabilities(probs, num_classes), hard)


def _positive_classes(num_classes):
    """Classes measured one-vs-rest: class 1 for binary problems, every class otherwise."""
    return np.array([1]) if num_classes == 2 else np.arange(num_classes)


def _label_group_counts(labels, groups, weights, num_classes, num_groups):
    """n_{g,y}: [G, K] weighted counts of (group, label) cells."""
    return jnp.einsum(
        "i,ig,iy->gy",
        weights,
        jax.nn.one_hot(groups, num_groups, dtype=_FLOAT),
        jax.nn.one_hot(labels, num_classes, dtype=_FLOAT),
    )


def _label_group_score_sums(scores, labels, groups, weights, num_classes, num_groups):
    """S[g, y, k] = sum_i w_i 1[a_i = g] 1[y_i = y] f_k(x_i): [G, K, K].

    With hard scores this is the per-group confusion matrix (rows true, columns predicted).
    """
    return jnp.einsum(
        "i,ig,iy,ik->gyk",
        weights,
        jax.nn.one_hot(groups, num_groups, dtype=_FLOAT),
        jax.nn.one_hot(labels, num_classes, dtype=_FLOAT),
        scores,
    )


def _rate_gaps(numerators, denominators, reduce):
    """Group deviation of the rates ``numerators / denominators`` on each conditioning event.

    Args:
      numerators, denominators: [..., G] weighted sums per conditioning event and group.
      reduce: index into REDUCTIONS (see the module docstring).

    Returns:
      (gap [...], event_valid [...], group_valid [..., G]). Groups with a zero denominator are
      skipped; an event where every group is skipped has gap 0 and event_valid False.
    """
    group_valid = denominators > 0
    rates = _safe_divide(numerators, denominators)
    overall = _safe_divide(numerators.sum(-1), denominators.sum(-1))
    deviation = jnp.abs(rates - overall[..., None])
    event_valid = group_valid.any(-1)
    highest = jnp.max(jnp.where(group_valid, rates, -jnp.inf), axis=-1)
    lowest = jnp.min(jnp.where(group_valid, rates, jnp.inf), axis=-1)
    gap = _select(reduce, [  # order of REDUCTIONS
        _masked_mean(deviation, group_valid, axis=-1),
        _safe_divide((deviation * denominators).sum(-1), denominators.sum(-1)),
        _masked_max(deviation, group_valid, axis=-1),
        jnp.where(event_valid, highest - lowest, 0.0),
    ])
    return gap, event_valid, group_valid


def _skipped_group_count(event_valid, group_valid):
    """Groups skipped on at least one non-empty conditioning event ([...] and [..., G])."""
    num_groups = group_valid.shape[-1]
    skipped = (event_valid[..., None] & ~group_valid).reshape(-1, num_groups).any(0)
    return skipped.sum().astype(jnp.int32)


def _reduce_classes(gaps, valid, class_reduce):
    return _select(class_reduce, [_masked_max(gaps, valid), _masked_mean(gaps, valid)])  # CLASS_REDUCTIONS


# --------------------------------------------------------------------------------------------
# Cores (unchecked, jit-able; static: sizes; options: traced int32 indices into the tuples)
# --------------------------------------------------------------------------------------------


def _confusion_matrix_core(probs, labels, mask, num_classes):
    weights = _sample_weights(mask, labels.shape[0])
    predicted = jax.nn.one_hot(_predicted_labels(probs), num_classes, dtype=_FLOAT)
    truth = jax.nn.one_hot(labels, num_classes, dtype=_FLOAT)
    return jnp.einsum("i,iy,ik->yk", weights, truth, predicted)


def _accuracy_core(probs, labels, mask):
    weights = _sample_weights(mask, labels.shape[0])
    correct = (_predicted_labels(probs) == labels).astype(_FLOAT)
    return _safe_divide(jnp.sum(weights * correct), jnp.sum(weights))


def _recall_core(probs, labels, mask, num_classes):
    confusion = _confusion_matrix_core(probs, labels, mask, num_classes)
    class_counts = confusion.sum(1)
    return _safe_divide(jnp.diagonal(confusion), class_counts), class_counts > 0


def _balanced_accuracy_core(probs, labels, mask, num_classes):
    recall, present = _recall_core(probs, labels, mask, num_classes)
    return _masked_mean(recall, present), (num_classes - present.sum()).astype(jnp.int32)


def _cell_error_core(probs, labels, groups, mask, num_classes, num_groups):
    weights = _sample_weights(mask, labels.shape[0])
    wrong = (_predicted_labels(probs) != labels).astype(_FLOAT)
    counts = _label_group_counts(labels, groups, weights, num_classes, num_groups).T
    errors = _label_group_counts(labels, groups, weights * wrong, num_classes, num_groups).T
    return _safe_divide(errors, counts), counts


def _one_vs_rest_statistics(probs, labels, groups, mask, num_classes, num_groups, score):
    """Weighted sums behind every rate gap, per measured class k and group g ([C, G] each).

    Returns ``(true_positive, positives, predicted_positive, group_sizes)``:
    ``sum_i w_i 1[a_i=g] 1[y_i=k] f_k(x_i)``, ``n_{k,g}``, ``sum_i w_i 1[a_i=g] f_k(x_i)`` and
    ``n_g``, with ``f`` the hard or soft score and C the measured classes (class 1 if K = 2).
    """
    weights = _sample_weights(mask, labels.shape[0])
    scores = _score_matrix(probs, num_classes, score)
    group_onehot = jax.nn.one_hot(groups, num_groups, dtype=_FLOAT)
    label_onehot = jax.nn.one_hot(labels, num_classes, dtype=_FLOAT)
    weighted_groups = group_onehot * weights[:, None]
    classes = _positive_classes(num_classes)
    true_positive = (weighted_groups.T @ (label_onehot * scores)).T[classes]
    positives = (weighted_groups.T @ label_onehot).T[classes]
    predicted_positive = (weighted_groups.T @ scores).T[classes]
    group_sizes = jnp.broadcast_to(weighted_groups.sum(0), positives.shape)
    return true_positive, positives, predicted_positive, group_sizes


def _dp_from_statistics(statistics, reduce, class_reduce):
    _, _, predicted_positive, group_sizes = statistics
    gaps, event_valid, group_valid = _rate_gaps(predicted_positive, group_sizes, reduce)
    return _reduce_classes(gaps, event_valid, class_reduce), _skipped_group_count(event_valid, group_valid)


def _eo_from_statistics(statistics, reduce, class_reduce, label_reduce):
    true_positive, positives, predicted_positive, group_sizes = statistics
    # Conditioning events per measured class: Y != k (false-positive rate), Y = k (TPR).
    numerators = jnp.stack([predicted_positive - true_positive, true_positive], axis=1)  # [C, 2, G]
    denominators = jnp.stack([group_sizes - positives, positives], axis=1)
    gaps, event_valid, group_valid = _rate_gaps(numerators, denominators, reduce)
    class_gaps = _select(label_reduce, [_masked_mean(gaps, event_valid, axis=1), _masked_max(gaps, event_valid, axis=1)])
    return _reduce_classes(class_gaps, event_valid.any(1), class_reduce), _skipped_group_count(event_valid, group_valid)


def _deo_from_statistics(statistics, reduce, class_reduce):
    true_positive, positives, _, _ = statistics
    gaps, event_valid, group_valid = _rate_gaps(true_positive, positives, reduce)
    return _reduce_classes(gaps, event_valid, class_reduce), _skipped_group_count(event_valid, group_valid)


def _pp_from_statistics(statistics, reduce, class_reduce):
    true_positive, _, predicted_positive, _ = statistics
    gaps, event_valid, group_valid = _rate_gaps(true_positive, predicted_positive, reduce)
    return _reduce_classes(gaps, event_valid, class_reduce), _skipped_group_count(event_valid, group_valid)


def _dp_gap_core(probs, labels, groups, mask, num_classes, num_groups, reduce, score, class_reduce):
    statistics = _one_vs_rest_statistics(probs, labels, groups, mask, num_classes, num_groups, score)
    return _dp_from_statistics(statistics, reduce, class_reduce)


def _eo_gap_core(probs, labels, groups, mask, num_classes, num_groups, reduce, score, class_reduce, label_reduce):
    statistics = _one_vs_rest_statistics(probs, labels, groups, mask, num_classes, num_groups, score)
    return _eo_from_statistics(statistics, reduce, class_reduce, label_reduce)


def _deo_gap_core(probs, labels, groups, mask, num_classes, num_groups, reduce, score, class_reduce):
    statistics = _one_vs_rest_statistics(probs, labels, groups, mask, num_classes, num_groups, score)
    return _deo_from_statistics(statistics, reduce, class_reduce)


def _pp_gap_core(probs, labels, groups, mask, num_classes, num_groups, reduce, score, class_reduce):
    statistics = _one_vs_rest_statistics(probs, labels, groups, mask, num_classes, num_groups, score)
    return _pp_from_statistics(statistics, reduce, class_reduce)


def _uniform_bin_ids(values, num_bins):
    """sklearn ``calibration_curve(strategy="uniform")`` binning: searchsorted(edges[1:-1], v).

    Bin b holds (b/B, (b+1)/B]; bin 0 also holds 0. Implemented as a count of interior edges
    strictly below the value, which equals ``np.searchsorted(..., side="left")``.
    """
    interior_edges = jnp.arange(1, num_bins, dtype=_FLOAT) / num_bins
    return jnp.sum(values[:, None] > interior_edges[None, :], axis=1)


def _binned_sufficiency_one_class(scores, positive, group_onehot, weights, num_bins, reduce):
    """Binned SGap of one score column against one binary target; returns (gap, group_valid)."""
    bins = jax.nn.one_hot(_uniform_bin_ids(scores, num_bins), num_bins, dtype=_FLOAT)
    counts = jnp.einsum("i,ib,ig->bg", weights, bins, group_onehot)  # n_{b,g}
    hits = jnp.einsum("i,i,ib,ig->bg", weights, positive, bins, group_onehot)
    overall_rate = _safe_divide(hits.sum(1), counts.sum(1))  # E[Y | f in b]
    group_rate = _safe_divide(hits, counts)  # E[Y | f in b, A = g]
    deviation = jnp.abs(group_rate - overall_rate[:, None])
    group_sizes = counts.sum(0)
    group_valid = group_sizes > 0
    group_gap = _safe_divide((counts * deviation).sum(0), group_sizes)  # E_{X|A=g} |.|
    # between_groups: E_X [max_g - min_g of E[Y | f, A = g]] over the groups present in the bin.
    cell_valid = counts > 0
    highest = jnp.max(jnp.where(cell_valid, group_rate, -jnp.inf), axis=1)
    lowest = jnp.min(jnp.where(cell_valid, group_rate, jnp.inf), axis=1)
    spread = jnp.where(cell_valid.any(1), highest - lowest, 0.0)
    gap = _select(reduce, [  # order of REDUCTIONS
        _masked_mean(group_gap, group_valid),
        _safe_divide((group_sizes * group_gap).sum(), group_sizes.sum()),
        _masked_max(group_gap, group_valid),
        _safe_divide((counts.sum(1) * spread).sum(), counts.sum()),
    ])
    return gap, group_valid


def _sufficiency_gap_core(probs, labels, groups, mask, num_classes, num_groups, num_bins, reduce, class_reduce):
    weights = _sample_weights(mask, labels.shape[0])
    probabilities = _probabilities(probs, num_classes)
    group_onehot = jax.nn.one_hot(groups, num_groups, dtype=_FLOAT)
    classes = jnp.asarray(_positive_classes(num_classes))

    def one_class(k):
        positive = (labels == k).astype(_FLOAT)
        gap, group_valid = _binned_sufficiency_one_class(probabilities[:, k], positive, group_onehot, weights, num_bins, reduce)
        return gap, group_valid, jnp.sum(weights * positive) > 0

    gaps, group_valid, class_present = jax.vmap(one_class)(classes)
    skipped = (num_groups - group_valid[0].sum()).astype(jnp.int32)
    return _reduce_classes(gaps, class_present, class_reduce), skipped


def _interpolate_curve(query, curve_x, curve_y, curve_valid):
    """``np.interp(query, curve_x[valid], curve_y[valid])`` with fixed shapes (jit-able).

    ``curve_x`` must be increasing over its valid entries (true for calibration-curve points,
    which lie in increasing bins). Each query takes the last valid point at or left of it and
    the first valid point right of it and interpolates linearly; before the first valid point
    the value is its ordinate and past the last one the last ordinate -- the constant extension
    of scipy's ``interp1d(..., bounds_error=False, fill_value=(y[0], y[-1]))`` in the FACIMS
    code. A curve with one valid point is that constant; a curve with none gives 0.

    Args:
      query: [Q] abscissae.
      curve_x, curve_y, curve_valid: [P] points and their validity.

    Returns:
      [Q] interpolated values.
    """
    size = curve_x.shape[0]
    index = jnp.arange(size)
    at_or_left = curve_valid[None, :] & (curve_x[None, :] <= query[:, None])  # [Q, P]
    right = curve_valid[None, :] & (curve_x[None, :] > query[:, None])
    left_index = jnp.max(jnp.where(at_or_left, index, -1), axis=1)
    right_index = jnp.min(jnp.where(right, index, size), axis=1)
    first_index = jnp.min(jnp.where(curve_valid, index, size))
    has_left, has_right = left_index >= 0, right_index < size
    x_left, y_left = curve_x[jnp.clip(left_index, 0, size - 1)], curve_y[jnp.clip(left_index, 0, size - 1)]
    x_right, y_right = curve_x[jnp.clip(right_index, 0, size - 1)], curve_y[jnp.clip(right_index, 0, size - 1)]
    slope = _safe_divide(y_right - y_left, x_right - x_left)
    inside = y_left + (query - x_left) * slope
    before_first = curve_y[jnp.clip(first_index, 0, size - 1)]
    value = jnp.where(has_left, jnp.where(has_right, inside, y_left), before_first)
    return jnp.where(curve_valid.any(), value, 0.0)


def _official_sufficiency_one_class(scores, positive, group_onehot, weights, num_bins):
    """FACIMS-code SGap of one score column (``standard_suf_gap_all_binary``)."""
    # Overall calibration curve, uniform bins, non-empty bins only.
    overall_bins = jax.nn.one_hot(_uniform_bin_ids(scores, num_bins), num_bins, dtype=_FLOAT) * weights[:, None]
    overall_counts = overall_bins.sum(0)
    overall_valid = overall_counts > 0
    overall_mean_score = _safe_divide(overall_bins.T @ scores, overall_counts)
    overall_rate = _safe_divide(overall_bins.T @ positive, overall_counts)
    # The groups use as many uniform bins as the overall curve has non-empty bins.
    group_num_bins = jnp.maximum(overall_valid.sum(), 1)
    edge_index = jnp.arange(1, num_bins)
    edges = edge_index / group_num_bins
    active = edge_index < group_num_bins
    group_bin_ids = jnp.sum(active[None, :] & (scores[:, None] > edges[None, :]), axis=1)
    group_bins = jax.nn.one_hot(group_bin_ids, num_bins, dtype=_FLOAT) * weights[:, None]
    group_counts = jnp.einsum("ib,ig->gb", group_bins, group_onehot)
    group_mean_score = _safe_divide(jnp.einsum("ib,ig,i->gb", group_bins, group_onehot, scores), group_counts)
    group_rate = _safe_divide(jnp.einsum("ib,ig,i->gb", group_bins, group_onehot, positive), group_counts)
    group_curves = jax.vmap(_interpolate_curve, in_axes=(None, 0, 0, 0))(
        overall_mean_score, group_mean_score, group_rate, group_counts > 0
    )  # [G, B] evaluated at the overall curve's mean scores
    group_gap = _masked_mean(jnp.abs(overall_rate[None, :] - group_curves), overall_valid[None, :], axis=1)
    group_valid = group_counts.sum(1) > 0
    return _masked_mean(group_gap, group_valid), group_valid


def _sufficiency_gap_official_core(probs, labels, groups, mask, num_classes, num_groups, num_bins):
    weights = _sample_weights(mask, labels.shape[0])
    probabilities = _probabilities(probs, num_classes)
    group_onehot = jax.nn.one_hot(groups, num_groups, dtype=_FLOAT)
    classes = jnp.asarray(_positive_classes(num_classes))

    def one_class(k):
        positive = (labels == k).astype(_FLOAT)
        return _official_sufficiency_one_class(probabilities[:, k], positive, group_onehot, weights, num_bins)

    gaps, group_valid = jax.vmap(one_class)(classes)
    skipped = (num_groups - group_valid[0].sum()).astype(jnp.int32)
    return jnp.max(gaps), skipped


def _report_arrays_core(probs, labels, groups, mask, num_classes, num_groups, num_bins, official_num_bins, reduce, score, class_reduce, label_reduce):
    out: dict[str, jax.Array] = {}
    out["accuracy"] = _accuracy_core(probs, labels, mask)
    out["balanced_accuracy"], out["balanced_accuracy_skipped_classes"] = _balanced_accuracy_core(probs, labels, mask, num_classes)
    recall, _ = _recall_core(probs, labels, mask, num_classes)
    for k in range(num_classes):
        out[f"recall_{k}"] = recall[k]
    args = (probs, labels, groups, mask, num_classes, num_groups)
    statistics = _one_vs_rest_statistics(*args, score=score)
    out["dp_gap"], out["dp_gap_skipped_groups"] = _dp_from_statistics(statistics, reduce, class_reduce)
    out["eo_gap"], out["eo_gap_skipped_groups"] = _eo_from_statistics(statistics, reduce, class_reduce, label_reduce)
    out["deo_gap"], out["deo_gap_skipped_groups"] = _deo_from_statistics(statistics, reduce, class_reduce)
    out["pp_gap"], out["pp_gap_skipped_groups"] = _pp_from_statistics(statistics, reduce, class_reduce)
    out["sufficiency_gap"], out["sufficiency_gap_skipped_groups"] = _sufficiency_gap_core(
        *args, num_bins=num_bins, reduce=reduce, class_reduce=class_reduce
    )
    out["sufficiency_gap_official"], out["sufficiency_gap_official_skipped_groups"] = _sufficiency_gap_official_core(
        *args, num_bins=official_num_bins
    )
    errors, counts = _cell_error_core(*args)
    nonempty = counts > 0
    out["worst_group_error"] = _masked_max(errors, nonempty)
    out["group_balanced_error"] = _masked_mean(errors, nonempty)
    out["worst_group_error_skipped_cells"] = (~nonempty).sum().astype(jnp.int32)
    out["group_balanced_error_skipped_cells"] = out["worst_group_error_skipped_cells"]
    return out


_STATIC_ARGUMENTS = frozenset({"num_classes", "num_groups", "num_bins", "official_num_bins"})


def _jit(core):
    """jax.jit with the static arguments (sizes) that ``core`` takes; options are traced int32
    indices, so switching e.g. ``reduce`` does not recompile."""
    static = [name for name in inspect.signature(core).parameters if name in _STATIC_ARGUMENTS]
    return jax.jit(core, static_argnames=static)
_confusion_matrix_jit = _jit(_confusion_matrix_core)
_accuracy_jit = jax.jit(_accuracy_core)
_recall_jit = _jit(_recall_core)
_balanced_accuracy_jit = _jit(_balanced_accuracy_core)
_cell_error_jit = _jit(_cell_error_core)
_dp_gap_jit = _jit(_dp_gap_core)
_eo_gap_jit = _jit(_eo_gap_core)
_deo_gap_jit = _jit(_deo_gap_core)
_pp_gap_jit = _jit(_pp_gap_core)
_sufficiency_gap_jit = _jit(_sufficiency_gap_core)
_sufficiency_gap_official_jit = _jit(_sufficiency_gap_official_core)
_report_arrays_jit = _jit(_report_arrays_core)


def _gap_options(reduce="mean", score="hard", class_reduce="max", label_reduce="mean", *, names=("reduce", "score", "class_reduce", "label_reduce")):
    """Validated option strings -> the traced int32 indices the cores take."""
    options = dict(
        reduce=_option_index("reduce", reduce, REDUCTIONS),
        score=_option_index("score", score, SCORES),
        class_reduce=_option_index("class_reduce", class_reduce, CLASS_REDUCTIONS),
        label_reduce=_option_index("label_reduce", label_reduce, LABEL_REDUCTIONS),
    )
    return {name: options[name] for name in names}


# --------------------------------------------------------------------------------------------
# Public metrics
# --------------------------------------------------------------------------------------------


def confusion_matrix(probs, labels, *, num_classes: int, mask=None) -> jax.Array:
    """Confusion matrix ``C[y, k] = sum_i w_i 1[y_i = y] 1[argmax probs_i = k]``.

    Rows are true labels, columns predicted labels, as ``sklearn.metrics.confusion_matrix`` with
    ``labels=range(K)``. Counts are float32 (exact below 2^24 rows) so the function stays
    differentiable-friendly and vmappable; cast with ``.astype(int)`` if needed.

    Args:
      probs: [n, K] probabilities or [n] predicted labels.
      labels: [n] integer labels in [0, K).
      num_classes: K >= 2 (static).
      mask: optional boolean [n]; False rows are ignored.

    Returns:
      [K, K] float32 counts.
    """
    probs, labels, _, mask, num_classes, _ = _prepare(probs, labels, None, mask, num_classes, None, needs_groups=False)
    return _confusion_matrix_jit(probs, labels, mask, num_classes=num_classes)


def group_confusion_matrices(probs, labels, groups, *, num_classes: int, num_groups: int, mask=None) -> jax.Array:
    """Per-group confusion matrices ``C[g, y, k]`` ([G, K, K], float32 counts); empty groups are 0."""
    probs, labels, groups, mask, num_classes, num_groups = _prepare(probs, labels, groups, mask, num_classes, num_groups)
    weights = _sample_weights(mask, labels.shape[0])
    predicted = jax.nn.one_hot(_predicted_labels(probs), num_classes, dtype=_FLOAT)
    return _label_group_score_sums(predicted, labels, groups, weights, num_classes, num_groups)


def accuracy(probs, labels, *, num_classes: int, mask=None) -> jax.Array:
    """Accuracy ``sum_i w_i 1[argmax probs_i = y_i] / sum_i w_i`` (0 when no row is kept)."""
    probs, labels, _, mask, num_classes, _ = _prepare(probs, labels, None, mask, num_classes, None, needs_groups=False)
    return _accuracy_jit(probs, labels, mask)


def per_class_recall(probs, labels, *, num_classes: int, mask=None) -> jax.Array:
    """Recall of every class, ``C[k, k] / sum_j C[k, j]`` ([K]).

    A class absent from ``labels`` has recall 0, as ``sklearn.metrics.recall_score(average=None,
    zero_division=0)``.
    """
    probs, labels, _, mask, num_classes, _ = _prepare(probs, labels, None, mask, num_classes, None, needs_groups=False)
    return _recall_jit(probs, labels, mask, num_classes=num_classes)[0]


def balanced_accuracy(probs, labels, *, num_classes: int, mask=None, return_skipped: bool = False):
    """Balanced accuracy: the mean per-class recall over the classes present in ``labels``.

    ``BA = (1/|K'|) sum_{k in K'} C[k, k] / n_k`` with K' = {k : n_k > 0}; this is
    ``sklearn.metrics.balanced_accuracy_score`` (which also drops absent classes) and the
    "balanced accuracy" of FACIMS Table 2 / AutoBalance.

    Returns:
      The scalar, or ``(scalar, number of absent classes)`` with ``return_skipped=True``.
    """
    probs, labels, _, mask, num_classes, _ = _prepare(probs, labels, None, mask, num_classes, None, needs_groups=False)
    value, skipped = _balanced_accuracy_jit(probs, labels, mask, num_classes=num_classes)
    return (value, skipped) if return_skipped else value


def cell_error(probs, labels, groups, *, num_classes: int, num_groups: int, mask=None) -> tuple[jax.Array, jax.Array]:
    """Error rate of every (class, group) cell.

    ``err[y, g] = sum_i w_i 1[y_i = y, a_i = g, argmax probs_i != y] / n_{y,g}``.

    Returns:
      ``(errors [K, G], counts [K, G])``; an empty cell has error 0 and count 0 -- use the counts
      to tell it apart from a perfect cell.
    """
    probs, labels, groups, mask, num_classes, num_groups = _prepare(probs, labels, groups, mask, num_classes, num_groups)
    return _cell_error_jit(probs, labels, groups, mask, num_classes=num_classes, num_groups=num_groups)


def worst_group_error(probs, labels, groups, *, num_classes: int, num_groups: int, mask=None, return_skipped: bool = False):
    """Worst (class, group) error, ``max_{(y, g): n_{y,g} > 0} err[y, g]`` (Sagawa et al.'s
    worst-group error with the (class, group) cells of AutoBalance §4 as groups).

    Empty cells are skipped; with ``return_skipped=True`` also returns how many there were.
    """
    errors, counts = cell_error(probs, labels, groups, num_classes=num_classes, num_groups=num_groups, mask=mask)
    value = _masked_max(errors, counts > 0)
    return (value, (counts == 0).sum().astype(jnp.int32)) if return_skipped else value


def group_balanced_error(probs, labels, groups, *, num_classes: int, num_groups: int, mask=None, return_skipped: bool = False):
    """Mean error over the non-empty (class, group) cells, ``mean_{(y, g): n_{y,g} > 0} err[y, g]``
    (the metric counterpart of AutoBalance's ``CE_bal^G``).

    Empty cells are skipped; with ``return_skipped=True`` also returns how many there were.
    """
    errors, counts = cell_error(probs, labels, groups, num_classes=num_classes, num_groups=num_groups, mask=mask)
    value = _masked_mean(errors, counts > 0)
    return (value, (counts == 0).sum().astype(jnp.int32)) if return_skipped else value


def dp_gap(probs, labels, groups, *, num_classes: int, num_groups: int, mask=None, reduce: str = "mean",
           score: str = "hard", class_reduce: str = "max", return_skipped: bool = False):
    """Demographic-parity gap, FACIMS eq. (3b): ``PGap = E_A |E[f(X)] - E[f(X) | A]|``.

    Per measured class k (class 1 if K = 2, every class one-vs-rest otherwise) the rate is
    ``s_{k,g} = E[f_k(X) | A = g]`` (the selection rate of class k for hard scores), compared
    with the overall ``s_k`` and reduced over groups by ``reduce`` and over classes by
    ``class_reduce``. Groups without samples are skipped.

    With ``score="hard"`` and ``reduce="between_groups"`` (``"max"``), K = 2, this equals
    ``fairlearn.metrics.demographic_parity_difference(method="between_groups"`` (``"to_overall"``)).
    The FACIMS code uses ``reduce="mean"`` with hard scores for K = 2 and, for K > 2, softmax
    probabilities (``score="soft"``) with a max over classes.

    Args:
      probs: [n, K] probabilities or [n] predicted labels.
      labels: [n] integer labels in [0, K) (not used by DP except for validation).
      groups: [n] integer groups in [0, G).
      num_classes, num_groups: K >= 2 and G >= 2 (static).
      mask: optional boolean [n] of rows to keep.
      reduce: "mean" (default), "weighted", "max" or "between_groups" (module docstring).
      score: "hard" (default, one-hot predicted labels) or "soft" (probabilities).
      class_reduce: "max" (default) or "mean" over the measured classes (K > 2).
      return_skipped: also return the number of skipped (empty) groups.

    Returns:
      The scalar gap in [0, 1], or ``(gap, skipped_groups)``.
    """
    options = _gap_options(reduce, score, class_reduce, names=("reduce", "score", "class_reduce"))
    probs, labels, groups, mask, num_classes, num_groups = _prepare(probs, labels, groups, mask, num_classes, num_groups)
    value, skipped = _dp_gap_jit(probs, labels, groups, mask, num_classes=num_classes, num_groups=num_groups, **options)
    return (value, skipped) if return_skipped else value


def eo_gap(probs, labels, groups, *, num_classes: int, num_groups: int, mask=None, reduce: str = "mean",
           score: str = "hard", class_reduce: str = "max", label_reduce: str = "mean", return_skipped: bool = False):
    """Equalized-odds gap, FACIMS eq. (3c): ``OGap = E_Y E_A |E[f | Y] - E[f | Y, A]|``.

    Per measured class k (one-vs-rest for K > 2) the two conditioning events are Y = k (rate:
    TPR of class k) and Y != k (rate: FPR of class k). Each event's group deviations are reduced
    by ``reduce``; the two events by ``label_reduce`` -- ``"mean"`` (default, "averaged over y" as
    SPEC §2; fairlearn ``agg="mean"``) or ``"max"`` (fairlearn's default ``agg="worst_case"``);
    classes by ``class_reduce``. A group lacking one of the events is skipped for that event; an
    event absent from the data (e.g. no negatives at all) is left out of the label reduction --
    fairlearn would count it as a 0 difference.

    With K = 2, ``score="hard"``, ``reduce="between_groups"`` and ``label_reduce="max"`` this is
    ``fairlearn.metrics.equalized_odds_difference``. Note: the column called "EO" in the FACIMS
    tables is computed by its code from the TPR only -- that is :func:`deo_gap` with
    ``reduce="mean"``.

    Returns:
      The scalar gap in [0, 1], or ``(gap, skipped_groups)`` (groups skipped on at least one
      non-empty event).
    """
    options = _gap_options(reduce, score, class_reduce, label_reduce)
    probs, labels, groups, mask, num_classes, num_groups = _prepare(probs, labels, groups, mask, num_classes, num_groups)
    value, skipped = _eo_gap_jit(probs, labels, groups, mask, num_classes=num_classes, num_groups=num_groups, **options)
    return (value, skipped) if return_skipped else value


def deo_gap(probs, labels, groups, *, num_classes: int, num_groups: int, mask=None, reduce: str = "mean",
            score: str = "hard", class_reduce: str = "max", return_skipped: bool = False):
    """Equal-opportunity gap (DEO): the group deviation of the true-positive rate.

    ``DEO = E_A |E[f_k | Y = k] - E[f_k | Y = k, A]|`` for the measured class k (class 1 if K = 2,
    every class one-vs-rest and ``class_reduce`` otherwise). Groups without positives are
    skipped. FairALM's DEO for two groups, ``|TPR_{s0} - TPR_{s1}|``, is
    ``reduce="between_groups"``, which for K = 2 also equals
    ``fairlearn.metrics.equal_opportunity_difference``. ``reduce="mean"`` with the default
    ``class_reduce="max"`` reproduces the FACIMS code's "EO" (``equalized_odds_binary`` /
    ``equalized_odds_multiclass``).

    Returns:
      The scalar gap in [0, 1], or ``(gap, skipped_groups)``.
    """
    options = _gap_options(reduce, score, class_reduce, names=("reduce", "score", "class_reduce"))
    probs, labels, groups, mask, num_classes, num_groups = _prepare(probs, labels, groups, mask, num_classes, num_groups)
    value, skipped = _deo_gap_jit(probs, labels, groups, mask, num_classes=num_classes, num_groups=num_groups, **options)
    return (value, skipped) if return_skipped else value


def pp_gap(probs, labels, groups, *, num_classes: int, num_groups: int, mask=None, reduce: str = "mean",
           score: str = "hard", class_reduce: str = "max", return_skipped: bool = False):
    """Predictive-parity gap: the group deviation of the precision.

    ``PP = E_A |P(Y = k | f = k) - P(Y = k | f = k, A)|`` with rates
    ``sum_i 1[y_i = k] f_k(x_i) / sum_i f_k(x_i)`` within a group (the precision for hard scores, a
    score-weighted precision for soft scores); class 1 if K = 2, one-vs-rest and
    ``class_reduce`` otherwise. Groups that never predict the class (zero score mass) are
    skipped -- sklearn's ``precision_score`` would score them 0 instead.

    Returns:
      The scalar gap in [0, 1], or ``(gap, skipped_groups)``.
    """
    options = _gap_options(reduce, score, class_reduce, names=("reduce", "score", "class_reduce"))
    probs, labels, groups, mask, num_classes, num_groups = _prepare(probs, labels, groups, mask, num_classes, num_groups)
    value, skipped = _pp_gap_jit(probs, labels, groups, mask, num_classes=num_classes, num_groups=num_groups, **options)
    return (value, skipped) if return_skipped else value


def sufficiency_gap(probs, labels, groups, *, num_classes: int, num_groups: int, num_bins: int = 10, mask=None,
                    reduce: str = "mean", class_reduce: str = "max", return_skipped: bool = False):
    """Binned group-sufficiency gap, FACIMS eq. (3a): ``SGap = E_{X,A} |E[Y | f(X)] - E[Y | f(X), A]|``.

    For the measured class k (class 1 if K = 2; every class one-vs-rest for K > 2, reduced by
    ``class_reduce``, max as in the FACIMS code) the probability ``p_k`` is cut into
    ``num_bins`` uniform bins on [0, 1] (sklearn ``calibration_curve`` binning: bin b is
    (b/B, (b+1)/B], bin 0 includes 0), the *same* bins overall and per group. With ``n_{b,g}``
    the cell counts and ``r_b``, ``r_{b,g}`` the fraction of label k in bin b overall and within
    group g, the group's gap is the expectation over X given A = g:

        gap_g = sum_b (n_{b,g} / n_g) |r_b - r_{b,g}|,

    and ``reduce`` combines the groups: ``"mean"`` (default; unweighted, as the FACIMS code),
    ``"weighted"`` (``sum_g n_g/n gap_g`` -- exactly the joint expectation of eq. 3a), ``"max"``
    (``max_g gap_g``), ``"between_groups"`` (``sum_b n_b/n (max_g r_{b,g} - min_g r_{b,g})`` over
    the groups present in bin b). Empty (bin, group) cells carry zero weight; empty groups are
    skipped. Deviation from the FACIMS code: the code averages unweighted over the overall
    curve's points after interpolating group curves with their own bins -- that estimator is
    :func:`sufficiency_gap_official`. This one follows the definition (expectation over X).

    Args:
      probs: [n, K] probabilities ([n] predicted labels are treated as one-hot probabilities).
      labels, groups, num_classes, num_groups, mask: as in :func:`dp_gap`.
      num_bins: B >= 1 uniform bins (default 10; the FACIMS code uses 5).
      reduce: one of REDUCTIONS.
      class_reduce: "max" (default) or "mean" over the classes present in ``labels`` (K > 2).
      return_skipped: also return the number of empty (skipped) groups.

    Returns:
      The scalar gap in [0, 1], or ``(gap, skipped_groups)``. Probabilities that lie exactly on a
      bin edge may land in the neighbouring bin compared with float64 sklearn (float32 edges).
    """
    num_bins = _check_count("num_bins", num_bins, 1)
    options = _gap_options(reduce, "soft", class_reduce, names=("reduce", "class_reduce"))
    probs, labels, groups, mask, num_classes, num_groups = _prepare(probs, labels, groups, mask, num_classes, num_groups)
    value, skipped = _sufficiency_gap_jit(probs, labels, groups, mask, num_classes=num_classes, num_groups=num_groups,
                                          num_bins=num_bins, **options)
    return (value, skipped) if return_skipped else value


def sufficiency_gap_official(probs, labels, groups, *, num_classes: int, num_groups: int, num_bins: int = OFFICIAL_NUM_BINS,
                             mask=None, return_skipped: bool = False):
    """The FACIMS official code's sufficiency-gap estimator (``standard_suf_gap_all_binary``).

    For the positive class (class 1; for K > 2 every class one-vs-rest and the max, as the code's
    ``standard_suf_gap_all_multiclass``), with p the class probability:

    1. overall curve = ``sklearn.calibration.calibration_curve(y, p, n_bins=5)``: uniform bins,
       non-empty bins only, giving points (mean p, fraction positive);
    2. if only m < 5 bins are non-empty, the groups use m uniform bins;
    3. per group, its own calibration curve with m bins, linearly interpolated (constant beyond
       its ends) at the overall curve's mean-p points;
    4. ``gap_a`` = mean over those points of |overall - group|; SGap = unweighted mean over the
       groups present.

    Pure JAX (the interpolation is ``jnp.interp`` on a padded, fixed-size curve). Deviation from
    the official code: a group whose curve has a single point is interpolated as that constant;
    the code's ``interp1d`` raises on it and its bare ``except`` leaves that group's curve at 0
    (so the gap counted the overall curve itself).

    Args:
      probs: [n, K] probabilities (the code applies softmax to logits first; pass probabilities).
      labels, groups, num_classes, num_groups, mask: as in :func:`dp_gap`.
      num_bins: overall bins (default 5, as the code).
      return_skipped: also return the number of empty (skipped) groups.

    Returns:
      The scalar gap in [0, 1], or ``(gap, skipped_groups)``.
    """
    num_bins = _check_count("num_bins", num_bins, 1)
    probs, labels, groups, mask, num_classes, num_groups = _prepare(probs, labels, groups, mask, num_classes, num_groups)
    value, skipped = _sufficiency_gap_official_jit(probs, labels, groups, mask, num_classes=num_classes,
                                                   num_groups=num_groups, num_bins=num_bins)
    return (value, skipped) if return_skipped else value


def report_arrays(probs, labels, groups, *, num_classes: int, num_groups: int, mask=None, num_bins: int = 10,
                  official_num_bins: int = OFFICIAL_NUM_BINS, reduce: str = "mean", score: str = "hard",
                  class_reduce: str = "max", label_reduce: str = "mean") -> dict[str, jax.Array]:
    """Every metric as a dict of jnp scalars, computed by one jitted function (usable on device,
    inside solvers, and under ``jax.vmap`` over models).

    No value checks are made here (only shapes and options); :func:`report` is the validated
    host-side entry point. Keys: see :func:`report`. The option strings are turned into traced
    indices, so one compiled function serves every option for a given (n, K, G, bins).
    """
    num_classes = _check_count("num_classes", num_classes, 2)
    num_groups = _check_count("num_groups", num_groups, 2)
    num_bins = _check_count("num_bins", num_bins, 1)
    official_num_bins = _check_count("official_num_bins", official_num_bins, 1)
    options = _gap_options(reduce, score, class_reduce, label_reduce)
    probs, labels, groups = jnp.asarray(probs), jnp.asarray(labels), jnp.asarray(groups)
    if probs.ndim not in (1, 2) or (probs.ndim == 2 and probs.shape[1] != num_classes):
        raise ValueError(f"probs must be [n, num_classes={num_classes}] or [n] (got shape {probs.shape}); use jax.vmap for a batch of models.")
    if labels.shape != probs.shape[:1] or groups.shape != probs.shape[:1] or (mask is not None and jnp.shape(mask) != probs.shape[:1]):
        raise ValueError(f"labels, groups (and mask) must be [n={probs.shape[0]}] (got {labels.shape}, {groups.shape}).")
    if not any(_is_traced(a) for a in (probs, labels, groups, mask)) and probs.shape[0] != row_bucket(probs.shape[0]):
        probs, labels, groups, mask = (jnp.asarray(a) for a in _pad_rows(probs, labels, groups, mask))  # bounded compiles
    mask = jnp.ones(probs.shape[:1], bool) if mask is None else jnp.asarray(mask).astype(bool)
    return _report_arrays_jit(
        probs, labels.astype(jnp.int32), groups.astype(jnp.int32), mask,
        num_classes=num_classes, num_groups=num_groups, num_bins=num_bins, official_num_bins=official_num_bins, **options,
    )


def report(probs, labels, groups, *, num_classes: int, num_groups: int, num_bins: int = 10, mask=None,
           official_num_bins: int = OFFICIAL_NUM_BINS, reduce: str = "mean", score: str = "hard",
           class_reduce: str = "max", label_reduce: str = "mean") -> dict[str, float]:
    """All metrics of a classifier on one dataset, as a flat ``{name: float}`` dict.

    Keys (all finite):
      ``accuracy``, ``balanced_accuracy`` (+ ``balanced_accuracy_skipped_classes``),
      ``recall_<k>`` for k in [K], ``dp_gap``, ``eo_gap``, ``deo_gap``, ``pp_gap``,
      ``sufficiency_gap`` (``num_bins`` bins, default 10), ``sufficiency_gap_official`` (the FACIMS
      code's estimator, ``official_num_bins`` = 5 bins; for K > 2 its one-vs-rest max),
      ``worst_group_error``, ``group_balanced_error``, and for each gap
      ``<metric>_skipped_groups`` (groups skipped because empty on a conditioning event) and
      ``worst_group_error_skipped_cells`` / ``group_balanced_error_skipped_cells`` (empty
      (class, group) cells).

    Defaults follow the FACIMS code's conventions: hard scores, unweighted mean over groups
    (``reduce="mean"``), max over classes; ``eo_gap`` averages the TPR and FPR events (SPEC §2),
    while the FACIMS tables' "EO" column corresponds to ``deo_gap``.

    Args:
      probs: [n, K] predicted probabilities (numpy or jax), or [n] predicted labels.
      labels: [n] integer labels in [0, K).
      groups: [n] integer groups in [0, G).
      num_classes, num_groups: K >= 2, G >= 2.
      num_bins: bins of ``sufficiency_gap``.
      mask: optional boolean [n] of rows to keep.
      official_num_bins, reduce, score, class_reduce, label_reduce: see the metric functions.

    Raises:
      ValueError / TypeError: on malformed input, naming the argument.
    """
    num_bins = _check_count("num_bins", num_bins, 1)
    official_num_bins = _check_count("official_num_bins", official_num_bins, 1)
    _gap_options(reduce, score, class_reduce, label_reduce)
    probs, labels, groups, mask, num_classes, num_groups = _prepare(probs, labels, groups, mask, num_classes, num_groups)
    arrays = report_arrays(probs, labels, groups, num_classes=num_classes, num_groups=num_groups, mask=mask,
                           num_bins=num_bins, official_num_bins=official_num_bins, reduce=reduce, score=score,
                           class_reduce=class_reduce, label_reduce=label_reduce)
    values = jax.device_get(arrays)
    return {name: float(values[name]) for name in _report_keys(num_classes)}


def _report_keys(num_classes: int) -> list[str]:
    """The keys of :func:`report`, in display order."""
    gaps = ["dp_gap", "eo_gap", "deo_gap", "pp_gap", "sufficiency_gap", "sufficiency_gap_official"]
    return (
        ["accuracy", "balanced_accuracy"]
        + [f"recall_{k}" for k in range(num_classes)]
        + gaps
        + ["worst_group_error", "group_balanced_error", "balanced_accuracy_skipped_classes"]
        + [f"{gap}_skipped_groups" for gap in gaps]
        + ["worst_group_error_skipped_cells", "group_balanced_error_skipped_cells"]
    )


# --------------------------------------------------------------------------------------------
# fairlearn-style entry points (binary predictions, arbitrary sensitive-feature values)
# --------------------------------------------------------------------------------------------


def _encode_sensitive_features(sensitive_features, length: int) -> tuple[np.ndarray, int]:
    """Integer codes of arbitrary (string, float, multi-column) sensitive features."""
    import pandas as pd  # core dependency; imported lazily to keep `import fairopt.metrics` light

    if sensitive_features is None:
        raise TypeError("sensitive_features is required (got None).")
    dimensions = np.ndim(sensitive_features)
    if dimensions not in (1, 2):
        raise ValueError(f"sensitive_features must be 1-D [n] or 2-D [n, columns] (got {dimensions}-D).")
    frame = pd.DataFrame(sensitive_features)
    frame.columns = [f"feature_{i}" for i in range(frame.shape[1])]
    if len(frame) != length:
        raise ValueError(f"sensitive_features has {len(frame)} rows but y_true has {length}; pass one value per row.")
    codes = frame.groupby(list(frame.columns), sort=True, dropna=False).ngroup().to_numpy()
    return codes.astype(np.int32), int(codes.max()) + 1 if length else 0


def _encode_binary(name: str, values) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (got shape {array.shape}).")
    if array.size and not np.isin(array, [0, 1]).all():
        raise ValueError(f"{name} must be binary 0/1 (or bool) with 1 the positive label (got values {np.unique(array)[:5]}); "
                         "for multi-class use fairopt.metrics.dp_gap/eo_gap/deo_gap with num_classes.")
    return array.astype(np.int32)


def _fairlearn_inputs(y_true, y_pred, sensitive_features, method, check_y_true=True):
    _check_option("method", method, FAIRLEARN_METHODS)
    predictions = _encode_binary("y_pred", y_pred)
    if check_y_true:
        labels = _encode_binary("y_true", y_true)
    else:
        labels = np.zeros(len(np.asarray(y_true)), np.int32)
    if labels.shape != predictions.shape:
        raise ValueError(f"y_true and y_pred must have the same length (got {labels.shape[0]} and {predictions.shape[0]}).")
    groups, num_groups = _encode_sensitive_features(sensitive_features, labels.shape[0])
    # A single observed group has nothing to compare; pad to two groups (the empty one is skipped),
    # and to a power of two in general, so few group counts are compiled (empty groups are skipped).
    reduce = "between_groups" if method == "between_groups" else "max"
    return predictions, labels, groups, 1 << max(num_groups - 1, 1).bit_length(), reduce


def demographic_parity_difference(y_true, y_pred, *, sensitive_features, method: str = "between_groups") -> float:
    """fairlearn-compatible demographic parity difference of binary predictions.

    ``max_g P(h = 1 | A = g) - min_g P(h = 1 | A = g)`` (``method="between_groups"``) or
    ``max_g |P(h = 1 | A = g) - P(h = 1)|`` (``"to_overall"``), as
    ``fairlearn.metrics.demographic_parity_difference``. ``y_true`` is ignored (as fairlearn)
    except for its length. ``sensitive_features`` may hold any values (strings, floats) or be
    2-D (intersectional groups); they are encoded with their sorted unique values.
    """
    predictions, labels, groups, num_groups, reduce = _fairlearn_inputs(y_true, y_pred, sensitive_features, method, check_y_true=False)
    return float(dp_gap(predictions, labels, groups, num_classes=2, num_groups=num_groups, reduce=reduce))


def equalized_odds_difference(y_true, y_pred, *, sensitive_features, method: str = "between_groups", agg: str = "worst_case") -> float:
    """fairlearn-compatible equalized odds difference of binary predictions.

    The larger (``agg="worst_case"``) or the mean (``agg="mean"``) of the TPR and FPR
    differences, each computed as in :func:`demographic_parity_difference`. Differs from
    fairlearn only for a group lacking positives or negatives, which fairopt skips for that rate
    where fairlearn scores it 0.
    """
    _check_option("agg", agg, ("worst_case", "mean"))
    predictions, labels, groups, num_groups, reduce = _fairlearn_inputs(y_true, y_pred, sensitive_features, method)
    label_reduce = "max" if agg == "worst_case" else "mean"
    return float(eo_gap(predictions, labels, groups, num_classes=2, num_groups=num_groups, reduce=reduce, label_reduce=label_reduce))


def equal_opportunity_difference(y_true, y_pred, *, sensitive_features, method: str = "between_groups") -> float:
    """fairlearn-compatible equal opportunity difference (the TPR difference) of binary
    predictions; groups without positives are skipped (fairlearn scores them TPR 0)."""
    predictions, labels, groups, num_groups, reduce = _fairlearn_inputs(y_true, y_pred, sensitive_features, method)
    return float(deo_gap(predictions, labels, groups, num_classes=2, num_groups=num_groups, reduce=reduce))


def front_hypervolume(accuracies, gaps, reference: tuple[float, float]) -> float:
    """Area of ``{(a, g): a_ref <= a <= a_i, g_i <= g <= g_ref for some point i}``.

    The region of the (accuracy up, gap down) plane that the points dominate, bounded by the
    reference point ``(a_ref, g_ref)``; points that do not beat the reference on both axes add
    nothing. Larger is better. (The 2-D hypervolume indicator of multi-objective optimisation,
    as a staircase sum over the points sorted by gap.)

    Args:
      accuracies, gaps: the points of a front (NaN points are ignored).
      reference: ``(a_ref, g_ref)``, e.g. majority-class accuracy and the unconstrained gap.
    """
    reference_accuracy, reference_gap = reference
    points = sorted(
        (float(g), float(a)) for a, g in zip(accuracies, gaps)
        if np.isfinite(a) and np.isfinite(g) and a > reference_accuracy and g < reference_gap
    )
    area, best_accuracy = 0.0, reference_accuracy
    for index, (gap, accuracy) in enumerate(points):  # by increasing gap: a staircase
        best_accuracy = max(best_accuracy, accuracy)
        next_gap = points[index + 1][0] if index + 1 < len(points) else reference_gap
        area += (best_accuracy - reference_accuracy) * (next_gap - gap)
    return area
