"""scikit-learn reference rows for the FACIMS tables: balanced logistic regression and balanced
histogram gradient boosting, on the same (resampled) training rows, tuned on validation.

Each model is ``class_weight="balanced"`` (weights ``n / (K n_k)`` on the rows it is trained on)
and gets a small grid of its main capacity knob with the same budget logic as our methods:
every grid point is trained on the training split, the one with the highest validation
balanced accuracy is kept, and only that one is evaluated on the test split.

* ``logreg``: ``LogisticRegression(C)``, ``C`` in :data:`LOGREG_C`.
* ``hgb``: ``HistGradientBoostingClassifier(learning_rate, max_leaf_nodes)`` over
  :data:`HGB_GRID`, ``max_iter=200`` with early stopping on an internal 10 % split (the
  scikit-learn default ``early_stopping="auto"`` turns it on above 10,000 rows only; here it is
  always on, so the number of trees is chosen on held-out rows too).

scikit-learn is in the ``data`` extra; it is imported when a reference row is asked for.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fairopt import data, metrics

METHODS = ("logreg", "hgb")
LOGREG_C = (0.01, 0.1, 1.0, 10.0)
HGB_GRID = tuple((rate, leaves) for rate in (0.05, 0.1) for leaves in (15, 31))


def _candidates(method: str, seed: int) -> list[tuple[str, Callable]]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    if method == "logreg":
        return [(f"C={c:g}", lambda c=c: LogisticRegression(C=c, class_weight="balanced", max_iter=2000)) for c in LOGREG_C]
    if method == "hgb":
        return [
            (f"learning_rate={rate:g},max_leaf_nodes={leaves}",
             lambda rate=rate, leaves=leaves: HistGradientBoostingClassifier(
                 learning_rate=rate, max_leaf_nodes=leaves, max_iter=200, early_stopping=True,
                 class_weight="balanced", random_state=seed))
            for rate, leaves in HGB_GRID
        ]
    raise ValueError(f"unknown scikit-learn reference {method!r}; choose one of {', '.join(METHODS)}")


def _report(probabilities: np.ndarray, split: data.Dataset, num_bins: int) -> dict[str, float]:
    return metrics.report(probabilities, split.labels, split.groups, num_classes=split.num_classes,
                          num_groups=split.num_groups, num_bins=num_bins)


def fit_and_evaluate(method: str, splits: data.Splits, *, seed: int, num_bins: int) -> tuple[dict, dict, str]:
    """``(test report, validation report, chosen setting)`` of the validation-chosen model."""
    train = splits.train
    best = None
    for label, build in _candidates(method, seed):
        model = build().fit(train.features, train.labels)
        val = _report(model.predict_proba(splits.val.features), splits.val, num_bins)
        if best is None or val["balanced_accuracy"] > best[1]["balanced_accuracy"]:
            best = (model, val, label)
    model, val, label = best
    return _report(model.predict_proba(splits.test.features), splits.test, num_bins), val, label
