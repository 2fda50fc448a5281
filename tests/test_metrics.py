"""Tests of fairopt.metrics: cross-checks against sklearn / fairlearn and hand computations,
closed forms, edge cases (empty groups, degenerate predictions), jit / vmap, invariances and
input validation.

Compilation dominates the runtime, so every test reuses a few fixed shapes: N rows and the
(K, G) configurations in CONFIGS.
"""

from __future__ import annotations

import functools
import warnings

import chex
import fairlearn.metrics as fl
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics as skm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.calibration import calibration_curve

from fairopt import metrics

N = 64
CONFIGS = [(2, 2), (2, 7), (4, 7)]  # (num_classes, num_groups)
GAP_KEYS = ("dp_gap", "eo_gap", "deo_gap", "pp_gap", "sufficiency_gap", "sufficiency_gap_official")


# ----------------------------------------------------------------------------------- helpers


def make_data(seed, num_classes, num_groups, *, present_groups=None, n=N, cover_cells=True):
    """Random probabilities, labels and groups; with ``cover_cells`` every (class, present group)
    cell holds at least one row, so no group is skipped by any one-vs-rest rate."""
    rng = np.random.default_rng(seed)
    present_groups = np.arange(num_groups) if present_groups is None else np.asarray(present_groups)
    probs = rng.dirichlet(np.ones(num_classes), size=n).astype(np.float32)
    labels = rng.integers(0, num_classes, size=n)
    groups = rng.choice(present_groups, size=n)
    if cover_cells:
        cells = [(k, g) for g in present_groups for k in range(num_classes)]
        assert len(cells) <= n
        labels[: len(cells)] = [k for k, _ in cells]
        groups[: len(cells)] = [g for _, g in cells]
    return probs, labels.astype(np.int32), groups.astype(np.int32)


def reference_reduce(rates, overall, weights, reduce):
    """Group reduction of SPEC §2 on the non-skipped groups (numpy reference)."""
    rates, weights = np.asarray(rates, float), np.asarray(weights, float)
    deviation = np.abs(rates - overall)
    if reduce == "mean":
        return deviation.mean()
    if reduce == "weighted":
        return (weights * deviation).sum() / weights.sum()
    if reduce == "max":
        return deviation.max()
    return rates.max() - rates.min()


def reference_binned_sufficiency(probs, labels, groups, num_bins, reduce):
    """SGap of eq. (3a) with uniform bins, written from scratch in numpy (float64)."""
    num_classes = probs.shape[1]
    classes = [1] if num_classes == 2 else [k for k in range(num_classes) if np.any(labels == k)]
    edges = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
    gaps = []
    for k in classes:
        p, y = probs[:, k].astype(np.float64), (labels == k).astype(float)
        bins = np.searchsorted(edges, p)
        overall = {b: y[bins == b].mean() for b in np.unique(bins)}
        present = np.unique(groups)
        if reduce == "between_groups":
            total = 0.0
            for b in np.unique(bins):
                rates = [y[(bins == b) & (groups == g)].mean() for g in present if np.any((bins == b) & (groups == g))]
                total += np.sum(bins == b) * (max(rates) - min(rates))
            gaps.append(total / len(p))
            continue
        per_group, sizes = [], []
        for g in present:
            in_group = groups == g
            gap = sum(
                np.sum(in_group & (bins == b)) * abs(overall[b] - y[in_group & (bins == b)].mean())
                for b in np.unique(bins[in_group])
            ) / in_group.sum()
            per_group.append(gap)
            sizes.append(in_group.sum())
        per_group, sizes = np.array(per_group), np.array(sizes)
        gaps.append({"mean": per_group.mean(), "weighted": (sizes * per_group).sum() / sizes.sum(), "max": per_group.max()}[reduce])
    return max(gaps)


def reference_official_sufficiency(probs, labels, groups, num_bins=5):
    """The FACIMS code's estimator as SPEC §2 states it: sklearn calibration_curve + np.interp."""
    num_classes = probs.shape[1]
    classes = [1] if num_classes == 2 else [k for k in range(num_classes) if np.any(labels == k)]
    gaps = []
    for k in classes:
        p, y = probs[:, k].astype(np.float64), (labels == k).astype(int)
        overall_true, overall_pred = calibration_curve(y, p, n_bins=num_bins)
        group_bins = len(overall_true)
        per_group = []
        for g in np.unique(groups):
            true, pred = calibration_curve(y[groups == g], p[groups == g], n_bins=group_bins)
            per_group.append(np.abs(overall_true - np.interp(overall_pred, pred, true)).mean())
        gaps.append(np.mean(per_group))
    return max(gaps)


def one_vs_rest_fairlearn(fairlearn_metric, labels, predictions, groups, num_classes, **kwargs):
    """fairlearn's binary metric for class 1 (K = 2) or max over classes one-vs-rest (K > 2)."""
    classes = [1] if num_classes == 2 else range(num_classes)
    return max(
        fairlearn_metric((labels == k).astype(int), (predictions == k).astype(int), sensitive_features=groups, **kwargs)
        for k in classes
    )


def report_arrays(probs, labels, groups, num_classes, num_groups, **kwargs):
    return metrics.report_arrays(probs, labels, groups, num_classes=num_classes, num_groups=num_groups, **kwargs)


# ------------------------------------------------------------- accuracy family vs sklearn


@pytest.mark.parametrize("num_classes,num_groups", CONFIGS)
def test_accuracy_recall_confusion_match_sklearn(num_classes, num_groups):
    for seed, absent_class in ((0, False), (1, True)):
        probs, labels, _ = make_data(seed, num_classes, num_groups, cover_cells=False)
        if absent_class:  # class K-1 never occurs: sklearn drops it from balanced accuracy
            labels = np.minimum(labels, num_classes - 2)
        predictions = probs.argmax(1)
        kw = dict(num_classes=num_classes)
        np.testing.assert_array_equal(
            metrics.confusion_matrix(probs, labels, **kw), skm.confusion_matrix(labels, predictions, labels=range(num_classes))
        )
        np.testing.assert_allclose(metrics.accuracy(probs, labels, **kw), skm.accuracy_score(labels, predictions), atol=1e-6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn warns about the absent class
            expected_balanced = skm.balanced_accuracy_score(labels, predictions)
            expected_recall = skm.recall_score(labels, predictions, average=None, labels=range(num_classes), zero_division=0)
        value, skipped = metrics.balanced_accuracy(probs, labels, **kw, return_skipped=True)
        np.testing.assert_allclose(value, expected_balanced, atol=1e-6)
        assert int(skipped) == int(absent_class)
        np.testing.assert_allclose(metrics.per_class_recall(probs, labels, **kw), expected_recall, atol=1e-6)
        # Predicted labels instead of probabilities give the same numbers.
        np.testing.assert_allclose(metrics.balanced_accuracy(predictions, labels, **kw), expected_balanced, atol=1e-6)


def test_cell_errors_match_pandas_and_skip_empty_cells():
    num_classes, num_groups = 4, 7
    probs, labels, groups = make_data(2, num_classes, num_groups, present_groups=[0, 1, 3, 6], cover_cells=False)
    predictions = probs.argmax(1)
    errors, counts = metrics.cell_error(probs, labels, groups, num_classes=num_classes, num_groups=num_groups)
    chex.assert_shape([errors, counts], (num_classes, num_groups))
    expected_errors, expected_counts = np.zeros((num_classes, num_groups)), np.zeros((num_classes, num_groups))
    for k in range(num_classes):
        for g in range(num_groups):
            cell = (labels == k) & (groups == g)
            expected_counts[k, g] = cell.sum()
            expected_errors[k, g] = (predictions[cell] != k).mean() if cell.any() else 0.0
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_allclose(errors, expected_errors, atol=1e-6)
    nonempty = expected_counts > 0
    kw = dict(num_classes=num_classes, num_groups=num_groups, return_skipped=True)
    worst, skipped = metrics.worst_group_error(probs, labels, groups, **kw)
    balanced, skipped_too = metrics.group_balanced_error(probs, labels, groups, **kw)
    np.testing.assert_allclose(worst, expected_errors[nonempty].max(), atol=1e-6)
    np.testing.assert_allclose(balanced, expected_errors[nonempty].mean(), atol=1e-6)
    assert int(skipped) == int(skipped_too) == int((~nonempty).sum()) >= 3 * num_classes


# ------------------------------------------------------------------------ gaps vs fairlearn


@pytest.mark.parametrize("num_classes,num_groups", CONFIGS)
@pytest.mark.parametrize("method", ["between_groups", "to_overall"])
def test_rate_gaps_match_fairlearn(num_classes, num_groups, method):
    reduce = "between_groups" if method == "between_groups" else "max"
    kw = dict(num_classes=num_classes, num_groups=num_groups, reduce=reduce)
    for seed, present in ((3, None), (4, [0, num_groups - 1])):  # all groups, then with empty groups
        probs, labels, groups = make_data(seed, num_classes, num_groups, present_groups=present)
        predictions = probs.argmax(1)

        def expected(metric, **extra):
            return one_vs_rest_fairlearn(metric, labels, predictions, groups, num_classes, method=method, **extra)

        dp, dp_skipped = metrics.dp_gap(probs, labels, groups, **kw, return_skipped=True)
        np.testing.assert_allclose(dp, expected(fl.demographic_parity_difference), atol=1e-6)
        eo_worst, eo_skipped = metrics.eo_gap(probs, labels, groups, **kw, label_reduce="max", return_skipped=True)
        np.testing.assert_allclose(eo_worst, expected(fl.equalized_odds_difference), atol=1e-6)
        np.testing.assert_allclose(
            metrics.eo_gap(probs, labels, groups, **kw, label_reduce="mean"), expected(fl.equalized_odds_difference, agg="mean"), atol=1e-6
        )
        np.testing.assert_allclose(metrics.deo_gap(probs, labels, groups, **kw), expected(fl.equal_opportunity_difference), atol=1e-6)
        num_empty = 0 if present is None else num_groups - len(set(present))
        assert int(dp_skipped) == int(eo_skipped) == num_empty


@pytest.mark.parametrize("num_classes,num_groups", CONFIGS)
def test_default_mean_reduction_and_soft_scores_match_numpy(num_classes, num_groups):
    """reduce="mean"/"weighted" and score="soft" against direct numpy formulas (FACIMS eq. 3b)."""
    probs, labels, groups = make_data(5, num_classes, num_groups, present_groups=np.arange(0, num_groups, 2) if num_groups > 2 else None)
    predictions = probs.argmax(1)
    present = np.unique(groups)
    classes = [1] if num_classes == 2 else range(num_classes)
    sizes = np.array([np.sum(groups == g) for g in present])
    for reduce in ("mean", "weighted"):
        for score in ("hard", "soft"):
            f = np.eye(num_classes)[predictions] if score == "hard" else probs.astype(np.float64)
            expected = max(
                reference_reduce([f[groups == g, k].mean() for g in present], f[:, k].mean(), sizes, reduce) for k in classes
            )
            value = metrics.dp_gap(probs, labels, groups, num_classes=num_classes, num_groups=num_groups, reduce=reduce, score=score)
            np.testing.assert_allclose(value, expected, atol=1e-6)
    # Predictive parity: precision per group where the group predicts the class.
    for reduce in ("mean", "between_groups"):
        gaps = []
        for k in classes:
            hit = predictions == k
            valid = [g for g in present if np.any(hit & (groups == g))]
            rates = [skm.precision_score(labels[groups == g] == k, hit[groups == g], zero_division=0) for g in valid]
            overall = skm.precision_score(labels[np.isin(groups, valid)] == k, hit[np.isin(groups, valid)])
            gaps.append(reference_reduce(rates, overall, None, reduce))
        value = metrics.pp_gap(probs, labels, groups, num_classes=num_classes, num_groups=num_groups, reduce=reduce)
        np.testing.assert_allclose(value, max(gaps), atol=1e-6)


def test_facims_code_eo_is_deo_with_mean():
    """The FACIMS code's binary "EO" (equalized_odds_binary): mean_g |TPR - TPR_g| over groups with positives."""
    probs, labels, groups = make_data(6, 2, 7, cover_cells=False)
    predictions = probs.argmax(1)
    overall = predictions[labels == 1].mean()
    expected = np.mean([abs(overall - predictions[(labels == 1) & (groups == g)].mean()) for g in range(7) if np.any((labels == 1) & (groups == g))])
    np.testing.assert_allclose(metrics.deo_gap(probs, labels, groups, num_classes=2, num_groups=7), expected, atol=1e-6)


def test_fairlearn_style_entry_points():
    probs, labels, groups = make_data(7, 2, 7)
    predictions = probs.argmax(1)
    names = np.array(["north", "south", "east", "west", "up", "down", "centre"], dtype=object)[groups]
    for method in metrics.FAIRLEARN_METHODS:
        kw = dict(sensitive_features=names, method=method)
        assert metrics.demographic_parity_difference(labels, predictions, **kw) == pytest.approx(fl.demographic_parity_difference(labels, predictions, **kw), abs=1e-6)
        assert metrics.equal_opportunity_difference(labels, predictions, **kw) == pytest.approx(fl.equal_opportunity_difference(labels, predictions, **kw), abs=1e-6)
        for agg in ("worst_case", "mean"):
            assert metrics.equalized_odds_difference(labels, predictions, **kw, agg=agg) == pytest.approx(
                fl.equalized_odds_difference(labels, predictions, **kw, agg=agg), abs=1e-6
            )
    # Two sensitive columns: intersectional groups, as fairlearn.
    columns = np.stack([groups % 2, (groups > 3).astype(int)], axis=1)
    assert metrics.demographic_parity_difference(labels, predictions, sensitive_features=columns) == pytest.approx(
        fl.demographic_parity_difference(labels, predictions, sensitive_features=columns), abs=1e-6
    )
    # A single observed group has no disparity.
    assert metrics.demographic_parity_difference(labels, predictions, sensitive_features=["only"] * N) == 0.0


def test_group_without_positives_is_skipped_where_fairlearn_scores_zero():
    labels = np.array([1, 0, 1, 0, 0, 0])
    predictions = np.array([1, 1, 0, 0, 1, 0])
    groups = np.array([0, 0, 0, 1, 1, 1])
    value, skipped = metrics.deo_gap(predictions, labels, groups, num_classes=2, num_groups=2, reduce="between_groups", return_skipped=True)
    assert float(value) == 0.0 and int(skipped) == 1  # group 1 has no positives: nothing to compare
    assert fl.equal_opportunity_difference(labels, predictions, sensitive_features=groups) == pytest.approx(0.5)  # TPR_1 := 0


# ------------------------------------------------------------------------------ sufficiency


@pytest.mark.parametrize("num_classes,num_groups", CONFIGS)
def test_sufficiency_gaps_match_hand_computation(num_classes, num_groups):
    for seed, present in ((8, None), (9, [1, num_groups - 1])):
        probs, labels, groups = make_data(seed, num_classes, num_groups, present_groups=present)
        values = report_arrays(probs, labels, groups, num_classes, num_groups)
        np.testing.assert_allclose(values["sufficiency_gap"], reference_binned_sufficiency(probs, labels, groups, 10, "mean"), atol=1e-5)
        np.testing.assert_allclose(values["sufficiency_gap_official"], reference_official_sufficiency(probs, labels, groups), atol=1e-5)
        num_empty = 0 if present is None else num_groups - len(set(present))
        assert int(values["sufficiency_gap_skipped_groups"]) == int(values["sufficiency_gap_official_skipped_groups"]) == num_empty


@pytest.mark.parametrize("reduce", ["weighted", "max", "between_groups"])
def test_sufficiency_gap_reductions_match_hand_computation(reduce):
    probs, labels, groups = make_data(10, 2, 7, present_groups=[0, 2, 3, 5, 6])
    value = metrics.sufficiency_gap(probs, labels, groups, num_classes=2, num_groups=7, num_bins=4, reduce=reduce)
    np.testing.assert_allclose(value, reference_binned_sufficiency(probs, labels, groups, 4, reduce), atol=1e-5)


def test_official_sufficiency_with_fewer_non_empty_bins_and_single_point_groups():
    probs, labels, groups = make_data(11, 2, 7)
    # Positive-class probabilities in [0.3, 0.55]: only 2 of the 5 overall bins are non-empty,
    # so groups use 2 bins (edge 0.5); some groups then have a one-point curve.
    positive = np.linspace(0.3, 0.55, N).astype(np.float32)
    probs = np.stack([1 - positive, positive], axis=1)
    assert len(calibration_curve(labels, positive, n_bins=5)[0]) == 2
    value = metrics.sufficiency_gap_official(probs, labels, groups, num_classes=2, num_groups=7)
    np.testing.assert_allclose(value, reference_official_sufficiency(probs, labels, groups), atol=1e-5)
    # All-equal probabilities: one bin; both estimators reduce to mean_g |P(Y=1) - P(Y=1 | g)|.
    constant = np.full_like(probs, 0.5)
    expected = np.mean([abs(labels.mean() - labels[groups == g].mean()) for g in range(7)])
    values = report_arrays(constant, labels, groups, 2, 7)
    np.testing.assert_allclose(values["sufficiency_gap_official"], expected, atol=1e-6)
    np.testing.assert_allclose(values["sufficiency_gap"], expected, atol=1e-6)


# -------------------------------------------------------------------- closed forms, edge cases


def test_perfect_classifier_closed_forms():
    probs, labels, groups = make_data(12, 4, 7)
    perfect = np.eye(4, dtype=np.float32)[labels]
    values = report_arrays(perfect, labels, groups, 4, 7)
    for key in ("accuracy", "balanced_accuracy", "recall_0", "recall_3"):
        assert float(values[key]) == 1.0
    for key in ("eo_gap", "deo_gap", "pp_gap", "sufficiency_gap", "sufficiency_gap_official", "worst_group_error", "group_balanced_error"):
        assert float(values[key]) == pytest.approx(0.0, abs=1e-7), key
    # DP of a perfect classifier is the label base-rate disparity.
    expected_dp = max(
        np.mean([abs((labels == k).mean() - (labels[groups == g] == k).mean()) for g in range(7)]) for k in range(4)
    )
    np.testing.assert_allclose(values["dp_gap"], expected_dp, atol=1e-6)


def test_degenerate_inputs_give_finite_documented_values():
    num_classes, num_groups = 2, 7
    _, labels, groups = make_data(13, num_classes, num_groups, present_groups=[0, 1, 2, 3, 4, 5])
    cases = {
        "constant": np.tile(np.array([[0.9, 0.1]], np.float32), (N, 1)),
        "all_zero": np.zeros((N, 2), np.float32),
    }
    for name, probs in cases.items():
        values = report_arrays(probs, labels, groups, num_classes, num_groups)
        assert all(np.isfinite(float(v)) for v in values.values()), name
        # Everything is predicted class 0: no disparity in rates, no class-1 predictions at all.
        assert float(values["dp_gap"]) == float(values["eo_gap"]) == float(values["deo_gap"]) == 0.0
        # PP has nothing to compare: no group predicts class 1, so the event is dropped (gap 0)
        # and, being empty in every group, it marks no group as skipped.
        assert float(values["pp_gap"]) == 0.0 and int(values["pp_gap_skipped_groups"]) == 0
        assert float(values["balanced_accuracy"]) == 0.5
        assert int(values["dp_gap_skipped_groups"]) == 1  # the empty group 6
    # Single-class groups: group 0 only has label 0 and group 1 only label 1.
    single = labels.copy()
    single[groups == 0], single[groups == 1] = 0, 1
    probs = make_data(13, num_classes, num_groups)[0]
    values = report_arrays(probs, single, groups, num_classes, num_groups)
    assert all(np.isfinite(float(v)) for v in values.values())
    assert int(values["deo_gap_skipped_groups"]) == 2  # groups 0 (no positives) and 6 (empty)
    assert int(values["eo_gap_skipped_groups"]) == 3  # groups 0, 1 (one label each) and 6
    # Every row masked out: all metrics are 0.
    values = report_arrays(probs, labels, groups, num_classes, num_groups, mask=np.zeros(N, bool))
    assert all(float(v) == 0.0 for k, v in values.items() if "skipped" not in k)


def test_mask_equals_dropping_rows():
    num_classes, num_groups = 4, 7
    probs, labels, groups = make_data(14, num_classes, num_groups, cover_cells=False)
    mask = np.random.default_rng(0).random(N) < 0.6
    probs_padded = np.where(mask[:, None], probs, np.float32(0.25))  # padding content must not matter
    values = report_arrays(probs_padded, labels, groups, num_classes, num_groups, mask=mask)
    kept = (probs[mask], labels[mask], groups[mask])
    predictions = kept[0].argmax(1)
    np.testing.assert_allclose(values["balanced_accuracy"], skm.balanced_accuracy_score(kept[1], predictions), atol=1e-6)
    np.testing.assert_allclose(values["sufficiency_gap"], reference_binned_sufficiency(*kept, 10, "mean"), atol=1e-5)
    np.testing.assert_allclose(values["sufficiency_gap_official"], reference_official_sufficiency(*kept), atol=1e-5)
    present = np.unique(kept[2])
    expected_dp = max(
        reference_reduce([(predictions[kept[2] == g] == k).mean() for g in present], (predictions == k).mean(), None, "mean")
        for k in range(num_classes)
    )
    np.testing.assert_allclose(values["dp_gap"], expected_dp, atol=1e-6)
    # Padded rows can hold anything: moving them around or changing them changes nothing.
    order = np.random.default_rng(1).permutation(N)
    shuffled = report_arrays(probs[order], labels[order], groups[order], num_classes, num_groups, mask=mask[order])
    chex.assert_trees_all_close(shuffled, values, atol=1e-6)


# ------------------------------------------------------------------------------- jit / vmap


def test_jit_equals_eager():
    """Eager (op-by-op) execution compiles every primitive separately, so it is checked on the
    rate-gap machinery and the interpolation of the official sufficiency estimator only; the
    sufficiency estimators are cross-checked against numpy/sklearn above."""
    probs, labels, groups = make_data(15, 2, 2, cover_cells=False)
    eo = functools.partial(metrics.eo_gap, num_classes=2, num_groups=2, reduce="weighted", return_skipped=True)
    jitted = eo(probs, labels, groups)
    with jax.disable_jit():
        eager = eo(probs, labels, groups)
    chex.assert_trees_all_close(jitted, eager, atol=1e-6)
    # A public gap function traced by a user's jit (value checks skipped) agrees too.
    np.testing.assert_allclose(jax.jit(eo)(probs, labels, groups)[0], jitted[0], atol=1e-6)
    query = np.array([-0.1, 0.05, 0.1, 0.3, 0.5, 0.93, 1.2], np.float32)
    curve_x = np.array([0.1, 0.2, 0.5, 0.9, 0.95], np.float32)
    curve_y = np.array([0.3, 0.9, 0.1, 0.6, 0.2], np.float32)
    valid = np.array([True, False, True, True, False])
    expected = np.interp(query, curve_x[valid], curve_y[valid])
    with jax.disable_jit():
        np.testing.assert_allclose(metrics._interpolate_curve(query, curve_x, curve_y, valid), expected, atol=1e-6)
    np.testing.assert_allclose(jax.jit(metrics._interpolate_curve)(query, curve_x, curve_y, valid), expected, atol=1e-6)


def test_vmap_over_models_equals_loop():
    num_classes, num_groups = 2, 2
    _, labels, groups = make_data(16, num_classes, num_groups)
    batch = np.stack([make_data(seed, num_classes, num_groups)[0] for seed in (16, 17, 18)])  # [M, n, K]
    batched = jax.vmap(lambda p: report_arrays(p, labels, groups, num_classes, num_groups))(batch)
    chex.assert_shape(batched["sufficiency_gap_official"], (3,))
    for index in range(batch.shape[0]):
        single = report_arrays(batch[index], labels, groups, num_classes, num_groups)
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[index], batched), single, atol=1e-6)
    dp = functools.partial(metrics.dp_gap, num_classes=num_classes, num_groups=num_groups)
    np.testing.assert_allclose(jax.vmap(lambda p: dp(p, labels, groups))(batch), [dp(p, labels, groups) for p in batch], atol=1e-6)


def test_report_keys_and_types():
    probs, labels, groups = make_data(19, 2, 2)
    result = metrics.report(probs, labels, groups, num_classes=2, num_groups=2, num_bins=10)
    for key in ("accuracy", "balanced_accuracy", "recall_0", "recall_1", "dp_gap", "eo_gap", "deo_gap", "pp_gap",
                "sufficiency_gap", "sufficiency_gap_official", "worst_group_error", "group_balanced_error",
                "dp_gap_skipped_groups", "worst_group_error_skipped_cells"):
        assert key in result and isinstance(result[key], float), key
    assert list(result)[:4] == ["accuracy", "balanced_accuracy", "recall_0", "recall_1"]
    chex.assert_trees_all_close(result, {k: float(v) for k, v in report_arrays(probs, labels, groups, 2, 2).items()})


# ------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(num_classes=1), ValueError, "num_classes must be >= 2"),
        (dict(num_groups=True), TypeError, "num_groups must be a Python int"),
        (dict(probs=np.full((N, 3), 0.3, np.float32)), ValueError, "num_classes=2"),
        (dict(probs=np.full((2, N, 2), 0.5, np.float32)), ValueError, "jax.vmap"),
        (dict(probs=np.full((N, 2), np.nan, np.float32)), ValueError, "NaN"),
        (dict(probs=np.full((N, 2), 3.0, np.float32)), ValueError, "softmax"),
        (dict(labels=np.zeros(N - 1, int)), ValueError, "labels has length 63"),
        (dict(labels=np.full(N, 2)), ValueError, r"labels must lie in \[0, 2\)"),
        (dict(groups=np.full(N, 0.5)), TypeError, "groups must hold integers"),
        (dict(groups=np.full(N, -1)), ValueError, "groups must lie in"),
        (dict(mask=np.ones(N + 1, bool)), ValueError, "mask must be a boolean"),
        (dict(mask=np.full(N, 0.5)), TypeError, "mask must be boolean"),
        (dict(reduce="median"), ValueError, "reduce must be one of"),
        (dict(score="probability"), ValueError, "score must be one of"),
        (dict(class_reduce="sum"), ValueError, "class_reduce must be one of"),
        (dict(label_reduce="sum"), ValueError, "label_reduce must be one of"),
        (dict(num_bins=0), ValueError, "num_bins must be >= 1"),
    ],
)
def test_report_rejects_bad_input(change, error, match):
    probs, labels, groups = make_data(20, 2, 2)
    arguments = dict(probs=probs, labels=labels, groups=groups, num_classes=2, num_groups=2) | change
    with pytest.raises(error, match=match):
        metrics.report(**arguments)


def test_gap_functions_and_fairlearn_entry_points_reject_bad_input():
    probs, labels, groups = make_data(21, 2, 2)
    with pytest.raises(ValueError, match="labels must lie in"):
        metrics.dp_gap(probs, labels + 5, groups, num_classes=2, num_groups=2)
    with pytest.raises(ValueError, match="reduce must be one of"):
        metrics.sufficiency_gap(probs, labels, groups, num_classes=2, num_groups=2, reduce="to_overall")
    with pytest.raises(ValueError, match="y_pred must be binary"):
        metrics.demographic_parity_difference(labels, labels + 1, sensitive_features=groups)
    with pytest.raises(ValueError, match="method must be one of"):
        metrics.equal_opportunity_difference(labels, labels, sensitive_features=groups, method="max")
    with pytest.raises(ValueError, match="agg must be one of"):
        metrics.equalized_odds_difference(labels, labels, sensitive_features=groups, agg="min")
    with pytest.raises(ValueError, match="sensitive_features has 3 rows"):
        metrics.demographic_parity_difference(labels, labels, sensitive_features=["a", "b", "c"])


# -------------------------------------------------------------------------------- properties

PROPERTY_CLASSES, PROPERTY_GROUPS, PROPERTY_ROWS = 4, 7, N  # a CONFIGS shape: no extra compile
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def property_inputs(draw):
    """Random labels, groups (possibly missing groups/classes), a padding mask and tie-free
    probabilities (some rows all zero); a fixed shape so the report compiles once."""
    rows = PROPERTY_ROWS
    labels = np.array(draw(st.lists(st.integers(0, PROPERTY_CLASSES - 1), min_size=rows, max_size=rows)), np.int32)
    groups = np.array(draw(st.lists(st.integers(0, PROPERTY_GROUPS - 1), min_size=rows, max_size=rows)), np.int32)
    mask = np.array(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)), bool)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    probs = rng.dirichlet(np.full(PROPERTY_CLASSES, draw(st.sampled_from([0.1, 1.0, 10.0]))), size=rows)
    probs = probs.astype(np.float32)
    probs[rng.random(rows) < 0.1] = 0.0
    return probs, labels, groups, mask


def property_report(probs, labels, groups, mask):
    return jax.device_get(report_arrays(probs, labels, groups, PROPERTY_CLASSES, PROPERTY_GROUPS, mask=mask))


@PROPERTY_SETTINGS
@given(property_inputs())
def test_property_all_metrics_finite_and_in_unit_interval(inputs):
    values = property_report(*inputs)
    for key, value in values.items():
        assert np.isfinite(value), key
        if "skipped" in key:
            assert value == int(value) >= 0, key
        else:
            assert -1e-6 <= value <= 1 + 1e-6, (key, value)


@PROPERTY_SETTINGS
@given(property_inputs(), st.permutations(range(PROPERTY_GROUPS)))
def test_property_invariant_to_renaming_groups(inputs, permutation):
    probs, labels, groups, mask = inputs
    renamed = np.asarray(permutation, np.int32)[groups]
    chex.assert_trees_all_close(property_report(probs, labels, renamed, mask), property_report(*inputs), atol=1e-5)


@PROPERTY_SETTINGS
@given(property_inputs(), st.permutations(range(PROPERTY_CLASSES)))
def test_property_invariant_to_renaming_classes(inputs, permutation):
    """With K > 2 every class is measured one-vs-rest, so all metrics but the per-class recalls
    (which move with their class) are symmetric in the class ids. All-zero rows predict class 0
    whatever it is called, so they are made tie-free first."""
    probs, labels, groups, mask = inputs
    probs = np.where(probs.sum(1, keepdims=True) > 0, probs, np.float32([[0.4, 0.3, 0.2, 0.1]]))
    permutation = np.asarray(permutation)
    renamed_probs = np.empty_like(probs)
    renamed_probs[:, permutation] = probs  # class k is now called permutation[k]
    original = property_report(probs, labels, groups, mask)
    renamed = property_report(renamed_probs, permutation[labels].astype(np.int32), groups, mask)
    for k in range(PROPERTY_CLASSES):
        assert renamed[f"recall_{permutation[k]}"] == pytest.approx(original[f"recall_{k}"], abs=1e-6)
    symmetric = {key: value for key, value in original.items() if not key.startswith("recall_")}
    chex.assert_trees_all_close({key: renamed[key] for key in symmetric}, symmetric, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Size buckets: a process compiles a bounded number of programs whatever row counts it sees
# --------------------------------------------------------------------------------------------


def test_row_buckets_hold_the_rows_with_at_most_half_padding():
    assert [metrics.row_bucket(n) for n in (0, 1, 1024, 1025, 1536, 1537, 2049, 10_000)] == [
        1024, 1024, 1024, 1536, 1536, 2048, 3072, 12_288,
    ]
    for n in range(1025, 70_000, 7):
        bucket = metrics.row_bucket(n)
        assert n <= bucket <= 1.5 * n and metrics.row_bucket(bucket) == bucket
    assert len({metrics.row_bucket(n) for n in range(1, 2**21 + 1, 97)}) == 23  # 2^10, then 1.5 * 2^k and 2^(k+1)


def test_many_row_counts_compile_a_bounded_number_of_programs():
    """300 different row counts in one process (each used to compile a new program, 1.2-1.5 s,
    until the interpreter ran out of code memory): report and equal_opportunity_difference now
    compile one program per size bucket (1..1536 rows: the buckets 1024 and 1536), and the
    masked padding leaves the values as fairlearn / sklearn compute them on the rows themselves."""
    rng = np.random.default_rng(0)
    sizes = rng.choice(np.arange(1, 1537), size=300, replace=False)
    cores = (metrics._report_arrays_jit, metrics._deo_gap_jit)
    before = [core._cache_size() for core in cores]
    for i, n in enumerate(sizes):
        probs = rng.dirichlet(np.ones(2), n).astype(np.float32)
        labels, groups = rng.integers(0, 2, n), rng.integers(0, 3, n)
        mask = rng.random(n) < 0.8 if i % 2 else None
        values = metrics.report(probs, labels, groups, num_classes=2, num_groups=3, mask=mask,
                                reduce="between_groups", label_reduce="max")
        names = np.array(["a", "b", "c"])[groups]
        gap = metrics.equal_opportunity_difference(labels, probs.argmax(1), sensitive_features=names)
        if i % 50 in (0, 1) and n >= 200:  # the padded rows change nothing: fairlearn / sklearn on the rows themselves
            keep = np.ones(n, bool) if mask is None else mask
            y, predicted, sensitive = labels[keep], probs.argmax(1)[keep], names[keep]
            assert values["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted), abs=1e-6)
            assert values["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, predicted), abs=1e-6)
            assert values["dp_gap"] == pytest.approx(fl.demographic_parity_difference(y, predicted, sensitive_features=sensitive), abs=1e-6)
            assert values["eo_gap"] == pytest.approx(fl.equalized_odds_difference(y, predicted, sensitive_features=sensitive), abs=1e-6)
            assert gap == pytest.approx(fl.equal_opportunity_difference(labels, probs.argmax(1), sensitive_features=names), abs=1e-6)
    compiled = [core._cache_size() - b for core, b in zip(cores, before)]
    # report: one program per bucket; deo: per (bucket, group count rounded to a power of two: 2 or 4)
    assert compiled[0] <= 2, compiled
    assert compiled[1] <= 2 * 2, compiled
