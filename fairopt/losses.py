"""Per-example losses for class- and group-imbalanced learning, and validation objectives.

Every loss here is pure, jit-able and *per example*: it maps ``logits [B, K]`` and integer
``labels [B]`` to a loss vector ``[B]``; reductions are explicit and separate
(:func:`balanced_mean`, :func:`group_balanced_mean`, :func:`deo_objective`, ...).

The central object is the parametric cross-entropy of AutoBalance (Li et al., NeurIPS 2021,
eq. 2.1/2.2), also the "VS" loss of FACIMS (Tarzanagh et al., UAI 2023)::

    l(y, f) = -w_y log softmax(Delta ⊙ f + l)_y                                  (2.2)

and its group-sensitive version (AutoBalance eq. 4.2), where every parameter is indexed by the
example's (class, group)::

    l(y, g, f) = -w_{yg} log [exp(Delta_{yg} f_y + l_{yg}) / sum_k exp(Delta_{kg} f_k + l_{kg})]

CE, weighted CE, logit adjustment (LA), CDT, the VS loss of Kini et al., Group-LA are special
cases (see :func:`make_loss`); LDAM and deferred re-weighting (DRW) are also provided.

Validation objectives (AutoBalance §3-4): CE, CE_bal (:func:`balanced_mean`), CE_bal^G
(:func:`group_balanced_mean`), CE_deo (:func:`deo_objective`, eq. 4.1) and the blend
``(1 - lambda) CE + lambda CE_deo`` (:func:`blended_objective`); all accept a mask for padded
rows and never return NaN when a class or a (class, group) cell is empty in the batch.

Group DRO (Sagawa et al., ICLR 2020): :func:`group_dro`.

Input checks: shape errors raise ``ValueError`` also under ``jax.jit`` (shapes are static);
range checks of labels / group ids run only on concrete (non-traced) input; count arrays
(``class_counts``, ``cell_counts``) configure a loss and must be concrete, non-negative numpy.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
ArrayLike = Any

__all__ = [
    "cross_entropy",
    "weighted_cross_entropy",
    "vs_loss",
    "logit_adjusted_loss",
    "logit_adjustment",
    "cdt_scale",
    "cdt_loss",
    "kini_vs_loss",
    "ldam_margins",
    "ldam_loss",
    "drw_weights",
    "deferred_weights",
    "inverse_frequency_weights",
    "group_logit_adjustment_params",
    "group_logit_adjusted_loss",
    "cell_balanced_weights",
    "masked_mean",
    "class_means",
    "cell_means",
    "balanced_mean",
    "group_balanced_mean",
    "deo_objective",
    "blended_objective",
    "soft_worst_group_mean",
    "validation_objective",
    "make_validation_objective",
    "VALIDATION_OBJECTIVES",
    "GROUP_OBJECTIVES",
    "WORST_GROUP_TEMPERATURE",
    "DEO_REDUCTIONS",
    "group_mean_losses",
    "GroupDROState",
    "GroupDRO",
    "group_dro",
    "make_loss",
    "LOSS_NAMES",
]

# ------------------------------------------------------------------------------------------------
# Input validation (runs at trace time for shapes, on concrete values only for value checks).
# ------------------------------------------------------------------------------------------------


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_logits_labels(logits, labels, fn_name: str) -> tuple[Array, Array]:
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"{fn_name}: logits must have shape [B, K], got shape {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{fn_name}: logits must be floating point, got dtype {logits.dtype}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"{fn_name}: labels must have shape [B] = {logits.shape[:1]} to match logits "
            f"{logits.shape}, got {labels.shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{fn_name}: labels must be integer class ids, got dtype {labels.dtype}")
    num_classes = logits.shape[1]
    if _is_concrete(labels) and labels.size:
        values = np.asarray(labels)
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(
                f"{fn_name}: labels must lie in [0, {num_classes}) (logits have K={num_classes} "
                f"columns), got values in [{values.min()}, {values.max()}]"
            )
    return logits, labels


def _check_ids(ids, name: str, length: int, upper: int, fn_name: str) -> Array:
    ids = jnp.asarray(ids)
    if ids.shape != (length,):
        raise ValueError(f"{fn_name}: {name} must have shape [B] = ({length},), got {ids.shape}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"{fn_name}: {name} must be integer ids, got dtype {ids.dtype}")
    if _is_concrete(ids) and ids.size:
        values = np.asarray(ids)
        if values.min() < 0 or values.max() >= upper:
            raise ValueError(
                f"{fn_name}: {name} must lie in [0, {upper}), got values in "
                f"[{values.min()}, {values.max()}]"
            )
    return ids


def _check_mask(mask, length: int, fn_name: str):
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.shape != (length,):
        raise ValueError(f"{fn_name}: mask must have shape [B] = ({length},), got {mask.shape}")
    return mask


def _check_per_example(per_example, fn_name: str) -> Array:
    per_example = jnp.asarray(per_example)
    if per_example.ndim != 1:
        raise ValueError(
            f"{fn_name}: per_example must be a loss vector of shape [B], got shape "
            f"{per_example.shape}; reduce a [B, ...] loss to [B] first"
        )
    if not jnp.issubdtype(per_example.dtype, jnp.floating):
        raise TypeError(f"{fn_name}: per_example must be floating point, got {per_example.dtype}")
    return per_example


def _check_counts(counts, name: str, ndim: int, *, allow_zero: bool, fn_name: str) -> np.ndarray:
    """Counts are static configuration: they must be concrete, finite, >= 0 (or > 0)."""
    if not _is_concrete(counts):
        raise TypeError(
            f"{fn_name}: {name} must be a concrete array (numpy or a non-traced jax array), "
            "because it configures the loss; compute it outside jit"
        )
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != ndim:
        shape = "[K]" if ndim == 1 else "[K, G]"
        raise ValueError(f"{fn_name}: {name} must have shape {shape}, got shape {counts.shape}")
    if counts.size == 0 or not np.all(np.isfinite(counts)):
        raise ValueError(f"{fn_name}: {name} must be non-empty and finite, got {counts}")
    if np.any(counts < 0):
        raise ValueError(f"{fn_name}: {name} must be non-negative, got {counts}")
    if not allow_zero and np.any(counts == 0):
        raise ValueError(
            f"{fn_name}: every entry of {name} must be positive (a class without training "
            f"examples has no defined prior/margin), got {counts}; drop empty classes first"
        )
    if ndim == 1 and counts.shape[0] < 2:
        raise ValueError(f"{fn_name}: {name} needs K >= 2 classes, got {counts.shape[0]}")
    return counts


def _check_static_int(value, name: str, minimum: int, fn_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{fn_name}: {name} must be a Python int (static), got {value!r}")
    if value < minimum:
        raise ValueError(f"{fn_name}: {name} must be >= {minimum}, got {value}")
    return int(value)


# ------------------------------------------------------------------------------------------------
# Per-example losses.
# ------------------------------------------------------------------------------------------------


def _softmax_cross_entropy(logits: Array, labels: Array) -> Array:
    """``logsumexp(f) - f_y`` via optax, clipped at 0.

    Mathematically the value is >= 0; in float32 under jit, XLA may evaluate ``f_y`` and the
    ``logsumexp`` from differently fused expressions and return ``-1 ulp`` when the example is
    fitted. The clip only acts on such rounding residue; ``jnp.maximum`` propagates NaN, so a
    diverged model still shows a NaN loss.
    """
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.maximum(loss, 0.0)


def cross_entropy(logits: ArrayLike, labels: ArrayLike) -> Array:
    """Per-example softmax cross-entropy ``-log softmax(f)_y``.

    Args:
      logits: ``[B, K]`` unnormalised scores ``f``.
      labels: ``[B]`` integer class ids in ``[0, K)``.

    Returns:
      ``[B]`` losses (``optax.softmax_cross_entropy_with_integer_labels``, with float rounding
      below 0 clipped to 0).
    """
    logits, labels = _check_logits_labels(logits, labels, "cross_entropy")
    return _softmax_cross_entropy(logits, labels)


def weighted_cross_entropy(logits: ArrayLike, labels: ArrayLike, class_weights: ArrayLike) -> Array:
    """Per-example class-weighted cross-entropy ``-w_y log softmax(f)_y``.

    With ``w_k ∝ 1 / n_k`` this is the balanced ERM ("BERM") baseline of FACIMS; see
    :func:`inverse_frequency_weights`.

    Args:
      logits: ``[B, K]``.
      labels: ``[B]`` integer class ids.
      class_weights: ``[K]`` non-negative weights ``w``.

    Returns:
      ``[B]`` losses ``w_{y_i} CE_i`` (not normalised by the weights: reduce explicitly).
    """
    return vs_loss(logits, labels, weight=class_weights)


def _expand_parameter(value, name: str, num_classes: int, groups, batch: int, fn_name: str):
    """Return the per-example ``[B, K]`` values of a ``[K]`` or ``[K, G]`` parameter."""
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(jnp.float32)
    if value.ndim == 1:
        if value.shape[0] != num_classes:
            raise ValueError(
                f"{fn_name}: {name} per class must have shape [K] = ({num_classes},), got "
                f"{value.shape}"
            )
        return jnp.broadcast_to(value, (batch, num_classes))
    if value.ndim == 2:
        if value.shape[0] != num_classes:
            raise ValueError(
                f"{fn_name}: {name} per (class, group) must have shape [K, G] with K = "
                f"{num_classes}, got {value.shape}"
            )
        if groups is None:
            raise ValueError(
                f"{fn_name}: {name} has shape [K, G] = {value.shape} (per (class, group), "
                "AutoBalance eq. 4.2), so pass groups=[B] group ids"
            )
        num_groups = value.shape[1]
        groups = _check_ids(groups, "groups", batch, num_groups, fn_name)
        return jnp.take(value, groups, axis=1).T  # [B, K]
    raise ValueError(
        f"{fn_name}: {name} must have shape [K] (per class) or [K, G] (per (class, group)), got "
        f"{value.shape}"
    )


def vs_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    shift: ArrayLike | None = None,
    scale: ArrayLike | None = None,
    groups: ArrayLike | None = None,
) -> Array:
    """Parametric (vector-scaling) cross-entropy, per class or per (class, group).

    AutoBalance eq. 2.2 (Li et al. 2021; VS loss of Kini et al. 2021)::

        l(y, f) = -w_y log [exp(Delta_y f_y + l_y) / sum_k exp(Delta_k f_k + l_k)]

    and the group-sensitive eq. 4.2, where every parameter is indexed by (class, group) of the
    example: ``w_{y g}``, ``Delta_{k g}``, ``l_{k g}``. Each parameter may independently be per
    class ``[K]`` or per (class, group) ``[K, G]``; ``None`` is neutral (w = 1, l = 0,
    Delta = 1), so ``vs_loss(f, y)`` is plain cross-entropy.

    ``scale`` is ``Delta`` itself, not its logit: AutoBalance passes a raw parameter through a
    sigmoid first (see :func:`fairopt.hparams.to_loss_kwargs`), the fixed baselines (CDT, VS)
    pass ``(n_k / n_max)^gamma`` directly.

    Args:
      logits: ``[B, K]`` scores ``f``.
      labels: ``[B]`` integer class ids.
      weight: ``w``, ``[K]`` or ``[K, G]`` (multiplies the example's loss), or None.
      shift: additive logit adjustment ``l``, ``[K]`` or ``[K, G]``, or None.
      scale: multiplicative logit scaling ``Delta``, ``[K]`` or ``[K, G]``, or None.
      groups: ``[B]`` integer group ids; required when any parameter is ``[K, G]``.

    Returns:
      ``[B]`` per-example losses.

    Raises:
      ValueError: wrong shapes, labels/groups out of range, or ``[K, G]`` parameters without
        ``groups``.
    """
    logits, labels = _check_logits_labels(logits, labels, "vs_loss")
    batch, num_classes = logits.shape
    adjusted = logits
    if scale is not None:
        adjusted = adjusted * _expand_parameter(scale, "scale", num_classes, groups, batch, "vs_loss")
    if shift is not None:
        adjusted = adjusted + _expand_parameter(shift, "shift", num_classes, groups, batch, "vs_loss")
    losses = _softmax_cross_entropy(adjusted, labels)
    if weight is not None:
        weights = _expand_parameter(weight, "weight", num_classes, groups, batch, "vs_loss")
        losses = losses * jnp.take_along_axis(weights, labels[:, None], axis=1)[:, 0]
    return losses


def logit_adjustment(class_counts: ArrayLike, tau: float = 1.0) -> np.ndarray:
    """Logit-adjustment shift ``l_k = tau log pi_k`` (Menon et al. 2021), ``pi_k = n_k / n``.

    Args:
      class_counts: ``[K]`` positive training counts (or priors; normalised here).
      tau: temperature; ``tau = 1`` is Fisher-consistent for the balanced error.

    Returns:
      ``[K]`` float32 shift.
    """
    counts = _check_counts(class_counts, "class_counts", 1, allow_zero=False, fn_name="logit_adjustment")
    return (tau * np.log(counts / counts.sum())).astype(np.float32)


def logit_adjusted_loss(
    logits: ArrayLike, labels: ArrayLike, class_priors: ArrayLike, tau: float = 1.0
) -> Array:
    """Logit-adjusted cross-entropy (LA; Menon et al. 2021), ``-log softmax(f + tau log pi)_y``.

    Args:
      logits: ``[B, K]``.
      labels: ``[B]``.
      class_priors: ``[K]`` positive priors ``pi`` or raw counts (a constant factor cancels in
        the softmax). Must be concrete (outside jit), as it configures the loss.
      tau: temperature (default 1).

    Returns:
      ``[B]`` losses.
    """
    return vs_loss(logits, labels, shift=logit_adjustment(class_priors, tau))


def cdt_scale(class_counts: ArrayLike, gamma: float = 0.3) -> np.ndarray:
    """Class-dependent temperature ``Delta_k = (n_k / n_max)^gamma`` (CDT; Ye et al. 2020).

    Equivalent to dividing logit k by ``a_k = (n_max / n_k)^gamma``. The default ``gamma = 0.3``
    is the default of Kini et al.'s VS-loss code.

    Returns:
      ``[K]`` float32 scale in ``(0, 1]``.
    """
    counts = _check_counts(class_counts, "class_counts", 1, allow_zero=False, fn_name="cdt_scale")
    if gamma < 0:
        raise ValueError(f"cdt_scale: gamma must be >= 0, got {gamma}")
    return ((counts / counts.max()) ** gamma).astype(np.float32)


def cdt_loss(logits: ArrayLike, labels: ArrayLike, class_counts: ArrayLike, gamma: float = 0.3) -> Array:
    """CDT loss ``-log softmax(Delta ⊙ f)_y`` with ``Delta_k = (n_k / n_max)^gamma``."""
    return vs_loss(logits, labels, scale=cdt_scale(class_counts, gamma))


def kini_vs_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    class_counts: ArrayLike,
    gamma: float = 0.3,
    tau: float = 1.0,
) -> Array:
    """VS loss of Kini et al. (NeurIPS 2021) with its fixed hyperparameters.

    ``-log softmax(Delta ⊙ f + l)_y`` with ``Delta_k = (n_k / n_max)^gamma`` and
    ``l_k = tau log pi_k`` (defaults gamma = 0.3, tau = 1 as Kini et al.'s ``VSLoss``).
    """
    return vs_loss(
        logits,
        labels,
        scale=cdt_scale(class_counts, gamma),
        shift=logit_adjustment(class_counts, tau),
    )


def ldam_margins(class_counts: ArrayLike, max_margin: float = 0.5) -> np.ndarray:
    """LDAM margins ``m_k = C / n_k^{1/4}`` with ``C`` chosen so that ``max_k m_k = max_margin``."""
    counts = _check_counts(class_counts, "class_counts", 1, allow_zero=False, fn_name="ldam_margins")
    if max_margin < 0:
        raise ValueError(f"ldam_margins: max_margin must be >= 0, got {max_margin}")
    raw = counts ** -0.25
    return (raw * (max_margin / raw.max())).astype(np.float32)


def ldam_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    class_counts: ArrayLike,
    max_margin: float = 0.5,
    scale: float = 30.0,
    *,
    class_weights: ArrayLike | None = None,
) -> Array:
    """Label-distribution-aware margin loss (LDAM; Cao et al., NeurIPS 2019).

    ``-w_y log softmax(s (f - m_y e_y))_y``: the margin ``m_y = C / n_y^{1/4}`` (scaled so the
    largest margin is ``max_margin``) is subtracted from the true-class logit only, and all
    logits are multiplied by ``s = scale`` — as the official ``LDAMLoss``.

    Args:
      logits: ``[B, K]``.
      labels: ``[B]``.
      class_counts: ``[K]`` positive training counts (concrete).
      max_margin: largest margin (0.5 in Cao et al.).
      scale: logit scale ``s`` (30 in Cao et al.).
      class_weights: optional ``[K]`` weights ``w`` (DRW: :func:`deferred_weights`).

    Returns:
      ``[B]`` losses.
    """
    logits, labels = _check_logits_labels(logits, labels, "ldam_loss")
    margins = jnp.asarray(ldam_margins(class_counts, max_margin))
    if margins.shape[0] != logits.shape[1]:
        raise ValueError(
            f"ldam_loss: class_counts has K={margins.shape[0]} entries but logits have "
            f"{logits.shape[1]} columns"
        )
    true_class = jax.nn.one_hot(labels, logits.shape[1], dtype=logits.dtype)
    adjusted = scale * (logits - true_class * margins[labels][:, None])
    return vs_loss(adjusted, labels, weight=class_weights)


def inverse_frequency_weights(class_counts: ArrayLike) -> np.ndarray:
    """Class weights ``w_k ∝ 1 / n_k`` normalised to mean 1 over classes (the BERM weights).

    With these weights the expected training loss is proportional to the class-balanced risk.
    """
    counts = _check_counts(
        class_counts, "class_counts", 1, allow_zero=False, fn_name="inverse_frequency_weights"
    )
    weights = 1.0 / counts
    return (weights / weights.mean()).astype(np.float32)


def drw_weights(class_counts: ArrayLike, beta: float = 0.9999) -> np.ndarray:
    """Effective-number class weights of Cui et al. (2019), used by DRW (Cao et al. 2019).

    ``w_k = (1 - beta) / (1 - beta^{n_k})``, normalised to sum ``K`` (as the LDAM-DRW code).

    Args:
      class_counts: ``[K]`` positive counts.
      beta: in ``[0, 1)``; ``beta = 0`` gives uniform weights, ``beta -> 1`` gives ``∝ 1/n_k``.

    Returns:
      ``[K]`` float32 weights summing to K.
    """
    counts = _check_counts(class_counts, "class_counts", 1, allow_zero=False, fn_name="drw_weights")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"drw_weights: beta must lie in [0, 1), got {beta}")
    # 1 - beta^n, computed as -expm1(n log beta) for accuracy when beta is close to 1.
    effective_number = -np.expm1(counts * np.log(beta)) if beta > 0 else np.ones_like(counts)
    weights = (1.0 - beta) / effective_number
    return (weights * (len(counts) / weights.sum())).astype(np.float32)


def deferred_weights(class_weights: ArrayLike, epoch: ArrayLike, start_epoch: ArrayLike) -> Array:
    """Deferred re-weighting: uniform weights before ``start_epoch``, ``class_weights`` from it on.

    ``w(epoch) = class_weights if epoch >= start_epoch else 1`` — a ``jnp.where`` so that a
    traced ``epoch`` (inside a scanned epoch loop) does not trigger recompilation.

    Args:
      class_weights: ``[K]`` weights to switch on (e.g. :func:`drw_weights`).
      epoch: current epoch (int, possibly traced), counted from 0.
      start_epoch: first epoch with re-weighting (160 of 200 in Cao et al.).

    Returns:
      ``[K]`` float32 weights.
    """
    class_weights = jnp.asarray(class_weights, dtype=jnp.float32)
    if class_weights.ndim != 1:
        raise ValueError(f"deferred_weights: class_weights must be [K], got {class_weights.shape}")
    return jnp.where(jnp.asarray(epoch) >= start_epoch, class_weights, jnp.ones_like(class_weights))


def group_logit_adjustment_params(
    cell_counts: ArrayLike, tau: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Group-LA parameters (AutoBalance §4): weights ``1/pi_g`` and shift ``tau log pi_{k|g}``.

    ``pi_g = n_g / n`` and ``pi_{k|g} = n_{k,g} / n_g``. The weights are normalised to mean 1
    over groups (the paper leaves the constant open; a constant only rescales the learning
    rate). An empty cell ``n_{k,g} = 0`` would give ``log 0 = -inf``; its count is floored at 1
    so that the shift stays finite (such a cell has no training examples anyway). Groups
    without any example get weight 1 from the same floor.

    Args:
      cell_counts: ``[K, G]`` non-negative (class, group) counts.
      tau: temperature of the adjustment.

    Returns:
      ``(weight [K, G], shift [K, G])`` float32, weight constant over classes.
    """
    counts = _check_counts(
        cell_counts, "cell_counts", 2, allow_zero=True, fn_name="group_logit_adjustment_params"
    )
    if counts.sum() == 0:
        raise ValueError("group_logit_adjustment_params: cell_counts are all zero")
    floored = np.maximum(counts, 1.0)
    group_counts = floored.sum(axis=0)  # [G]
    inverse_prior = group_counts.sum() / group_counts
    group_weight = inverse_prior / inverse_prior.mean()
    weight = np.broadcast_to(group_weight, counts.shape)
    shift = tau * np.log(floored / group_counts)
    return weight.astype(np.float32), shift.astype(np.float32)


def group_logit_adjusted_loss(
    logits: ArrayLike, labels: ArrayLike, groups: ArrayLike, cell_counts: ArrayLike, tau: float = 1.0
) -> Array:
    """Group-LA loss (AutoBalance §4): ``-(1/pi_g) log softmax(f + tau log pi_{.|g})_y``.

    See :func:`group_logit_adjustment_params` for the normalisation and empty cells.
    """
    weight, shift = group_logit_adjustment_params(cell_counts, tau)
    return vs_loss(logits, labels, weight=weight, shift=shift, groups=groups)


def cell_balanced_weights(cell_counts: ArrayLike) -> np.ndarray:
    """Weights ``w_{k,g} ∝ 1 / n_{k,g}``, mean 1 over non-empty cells; empty cells get 1.

    Training with these weights minimises (in expectation) the group-balanced risk CE_bal^G.
    """
    counts = _check_counts(cell_counts, "cell_counts", 2, allow_zero=True, fn_name="cell_balanced_weights")
    present = counts > 0
    if not present.any():
        raise ValueError("cell_balanced_weights: cell_counts are all zero")
    inverse = np.where(present, 1.0 / np.maximum(counts, 1.0), 0.0)
    inverse = inverse / inverse[present].mean()
    return np.where(present, inverse, 1.0).astype(np.float32)


def reweighing_weights(cell_counts: ArrayLike) -> np.ndarray:
    """Kamiran & Calders' reweighing ``w_{k,g} = n_k n_g / (n n_{k,g})``: under these weights
    the label is independent of the group (demographic parity of the weighted data); empty cells
    get 1.
    """
    counts = _check_counts(cell_counts, "cell_counts", 2, allow_zero=True, fn_name="reweighing_weights")
    total = counts.sum()
    if total <= 0:
        raise ValueError("reweighing_weights: cell_counts are all zero")
    expected = counts.sum(axis=1, keepdims=True) * counts.sum(axis=0, keepdims=True) / total
    return np.where(counts > 0, expected / np.maximum(counts, 1.0), 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Reductions / validation objectives.
# ------------------------------------------------------------------------------------------------


def masked_mean(per_example: ArrayLike, mask: ArrayLike | None = None) -> Array:
    """``sum(l * mask) / max(sum(mask), 1)``: the CE objective; 0 with zero gradient if empty."""
    per_example = _check_per_example(per_example, "masked_mean")
    mask = _check_mask(mask, per_example.shape[0], "masked_mean")
    if mask is None:
        return jnp.mean(per_example) if per_example.size else jnp.zeros((), per_example.dtype)
    mask = mask.astype(per_example.dtype)
    return jnp.sum(jnp.where(mask > 0, per_example, 0.0) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _segment_means(values, segment_ids, num_segments, mask):
    """Means and counts of ``values`` per segment; empty segments get mean 0 (not NaN).

    ``jax.ops.segment_sum`` keeps memory O(B) (no ``[B, S]`` one-hot), which matters for
    (class, group) cells of a whole validation set.
    """
    weights = jnp.ones_like(values) if mask is None else mask.astype(values.dtype)
    # where() keeps a NaN/inf in a padded row from leaking through 0 * inf.
    values = jnp.where(weights > 0, values, 0.0) * weights
    counts = jax.ops.segment_sum(weights, segment_ids, num_segments)
    sums = jax.ops.segment_sum(values, segment_ids, num_segments)
    return sums / jnp.maximum(counts, 1.0), counts


def class_means(per_example, labels, num_classes: int, mask=None) -> tuple[Array, Array]:
    """Class-conditional means ``L_k`` ``[K]`` (0 for empty classes) and counts ``[K]``."""
    per_example = _check_per_example(per_example, "class_means")
    num_classes = _check_static_int(num_classes, "num_classes", 1, "class_means")
    labels = _check_ids(labels, "labels", per_example.shape[0], num_classes, "class_means")
    mask = _check_mask(mask, per_example.shape[0], "class_means")
    return _segment_means(per_example, labels, num_classes, mask)


def cell_means(per_example, labels, groups, num_classes: int, num_groups: int, mask=None):
    """(Class, group)-conditional means ``L_{k,g}`` ``[K, G]`` (0 if empty) and counts ``[K, G]``."""
    per_example = _check_per_example(per_example, "cell_means")
    num_classes = _check_static_int(num_classes, "num_classes", 1, "cell_means")
    num_groups = _check_static_int(num_groups, "num_groups", 1, "cell_means")
    batch = per_example.shape[0]
    labels = _check_ids(labels, "labels", batch, num_classes, "cell_means")
    groups = _check_ids(groups, "groups", batch, num_groups, "cell_means")
    mask = _check_mask(mask, batch, "cell_means")
    means, counts = _segment_means(per_example, labels * num_groups + groups, num_classes * num_groups, mask)
    return means.reshape(num_classes, num_groups), counts.reshape(num_classes, num_groups)


def _mean_over_present(values, present):
    present = present.astype(values.dtype)
    return jnp.sum(values * present) / jnp.maximum(jnp.sum(present), 1.0)


def balanced_mean(
    per_example: ArrayLike, labels: ArrayLike, num_classes: int, mask: ArrayLike | None = None
) -> Array:
    """Class-balanced mean CE_bal: mean over classes present in the batch of ``L_k``.

    ``CE_bal = (1 / |K_present|) sum_{k present} (1 / n_k) sum_{i: y_i = k} l_i``
    (AutoBalance §3, the validation objective for the balanced error). Classes with no
    (unmasked) example are skipped; with no example at all the result is 0 with zero gradient.

    Args:
      per_example: ``[B]`` losses.
      labels: ``[B]`` class ids.
      num_classes: K (static).
      mask: optional ``[B]`` bool/0-1 mask, False on padded rows.

    Returns:
      Scalar.
    """
    means, counts = class_means(per_example, labels, num_classes, mask)
    return _mean_over_present(means, counts > 0)


def group_balanced_mean(
    per_example: ArrayLike,
    labels: ArrayLike,
    groups: ArrayLike,
    num_classes: int,
    num_groups: int,
    mask: ArrayLike | None = None,
) -> Array:
    """Group-balanced mean CE_bal^G: mean over non-empty (class, group) cells of ``L_{k,g}``.

    AutoBalance §4: ``L^G_bal = (1 / KG) sum_k sum_g L_{k,g}``; cells without an (unmasked)
    example in the batch are skipped (the mean is over the non-empty cells); all empty gives 0.

    Returns:
      Scalar.
    """
    means, counts = cell_means(per_example, labels, groups, num_classes, num_groups, mask)
    return _mean_over_present(means, counts > 0)


DEO_REDUCTIONS = ("mean", "max")


def deo_objective(
    per_example: ArrayLike,
    labels: ArrayLike,
    groups: ArrayLike,
    num_classes: int,
    num_groups: int,
    mask: ArrayLike | None = None,
    reduce: str = "mean",
) -> Array:
    """Symmetric DEO surrogate CE_deo (AutoBalance eq. 4.1), generalised to G groups.

    Two groups (eq. 4.1): ``CE_deo = sum_k |L_{k,1} - L_{k,2}|``, summing over the classes
    whose two cells are both non-empty (``reduce`` has no effect).

    G > 2 groups (SPEC §1): ``CE_deo = sum_k red_g |L_{k,g} - L_k|`` where ``L_k`` is the
    class-conditional mean over all groups (pooled over the class's examples) and ``red`` is the
    mean (``reduce="mean"``) or the max (``reduce="max"``) over the non-empty cells of class k.
    Empty cells are skipped and classes without a non-empty cell contribute 0.

    Note that for G = 2 the pooled form would not reduce to eq. 4.1 unless the groups have equal
    size, hence the special case.

    Args:
      per_example: ``[B]`` losses.
      labels, groups: ``[B]`` ids.
      num_classes, num_groups: K, G (static).
      mask: optional ``[B]`` mask.
      reduce: "mean" or "max" over groups (G > 2).

    Returns:
      Scalar, NaN-free (0 with zero gradient when nothing is comparable).
    """
    if reduce not in DEO_REDUCTIONS:
        raise ValueError(f"deo_objective: reduce must be one of {DEO_REDUCTIONS}, got {reduce!r}")
    if num_groups == 1:
        raise ValueError("deo_objective: needs num_groups >= 2 (a gap between groups)")
    means, counts = cell_means(per_example, labels, groups, num_classes, num_groups, mask)
    present = counts > 0
    if num_groups == 2:
        both = present[:, 0] & present[:, 1]
        gaps = jnp.abs(means[:, 0] - means[:, 1])
        return jnp.sum(jnp.where(both, gaps, 0.0))
    class_counts = jnp.sum(counts, axis=1)
    pooled = jnp.sum(means * counts, axis=1) / jnp.maximum(class_counts, 1.0)  # L_k
    gaps = jnp.where(present, jnp.abs(means - pooled[:, None]), 0.0)  # [K, G]
    if reduce == "mean":
        per_class = jnp.sum(gaps, axis=1) / jnp.maximum(jnp.sum(present, axis=1), 1)
    else:
        per_class = jnp.max(gaps, axis=1)  # gaps >= 0, empty cells are 0
    return jnp.sum(per_class)


def blended_objective(
    per_example: ArrayLike,
    labels: ArrayLike,
    groups: ArrayLike,
    num_classes: int,
    num_groups: int,
    lambda_val: ArrayLike,
    mask: ArrayLike | None = None,
    reduce: str = "mean",
) -> Array:
    """``(1 - lambda_val) CE + lambda_val CE_deo`` (AutoBalance §4, validation loss of Algo. 1).

    ``CE`` is the (masked) mean of ``per_example``; ``CE_deo`` is :func:`deo_objective`.
    ``lambda_val`` may be traced.
    """
    plain = masked_mean(per_example, mask)
    deo = deo_objective(per_example, labels, groups, num_classes, num_groups, mask, reduce)
    return (1.0 - lambda_val) * plain + lambda_val * deo


WORST_GROUP_TEMPERATURE = 0.1  # default temperature T of soft_worst_group_mean


def soft_worst_group_mean(
    per_example: ArrayLike,
    labels: ArrayLike,
    groups: ArrayLike,
    num_classes: int,
    num_groups: int,
    temperature: ArrayLike = WORST_GROUP_TEMPERATURE,
    mask: ArrayLike | None = None,
) -> Array:
    r"""Smoothed worst (class, group) cell loss: a log-mean-exp over the non-empty cells.

    .. math::
        \mathrm{CE}^G_{T} = T \log \Big(\frac{1}{|P|} \sum_{(k,g) \in P} \exp(L_{k,g} / T)\Big),

    ``P`` the non-empty cells, ``L_{k,g}`` their mean losses. ``CE_bal^G <= CE^G_T <= max L_{k,g}``;
    ``T -> 0`` gives the worst cell's loss, ``T -> inf`` the group-balanced mean CE_bal^G. Its
    gradient weighs cell ``c`` by ``softmax(L / T)_c``, exponentiated weights ``q ∝ exp(L / T)``
    like group DRO's (Sagawa et al. 2020). ``temperature`` (> 0) may be traced; with no
    (unmasked) example the result is 0 with zero gradient.

    Returns:
      Scalar.
    """
    means, counts = cell_means(per_example, labels, groups, num_classes, num_groups, mask)
    present = counts > 0
    any_present = jnp.any(present)
    top = jax.lax.stop_gradient(jnp.max(jnp.where(present, means, -jnp.inf)))
    top = jnp.where(any_present, top, 0.0)
    terms = jnp.where(present, jnp.exp(jnp.where(present, means - top, 0.0) / temperature), 0.0)
    mean_term = jnp.sum(terms) / jnp.maximum(jnp.sum(present), 1)
    value = top + temperature * jnp.log(jnp.where(any_present, mean_term, 1.0))
    return jnp.where(any_present, value, 0.0)


VALIDATION_OBJECTIVES = ("ce", "balanced_ce", "group_balanced_ce", "deo", "blend", "worst_group_ce")
GROUP_OBJECTIVES = ("group_balanced_ce", "deo", "blend", "worst_group_ce")  # need group ids


def make_validation_objective(
    name: str,
    *,
    num_classes: int,
    num_groups: int = 1,
    lambda_val: float | None = None,
    reduce: str = "mean",
    temperature: ArrayLike = WORST_GROUP_TEMPERATURE,
) -> Callable[..., Array]:
    """Return ``objective(per_example, labels, groups=None, mask=None) -> scalar`` by name.

    Names: "ce" (masked mean), "balanced_ce" (CE_bal), "group_balanced_ce" (CE_bal^G), "deo"
    (CE_deo, eq. 4.1), "blend" (``(1 - lambda_val) CE + lambda_val CE_deo``), "worst_group_ce"
    (the smoothed worst cell loss at ``temperature``, :func:`soft_worst_group_mean`).

    Raises:
      ValueError: unknown name (listing the choices), "blend" without ``lambda_val`` or with
        ``lambda_val`` outside [0, 1], group objectives with ``num_groups < 2``.
    """
    if name not in VALIDATION_OBJECTIVES:
        raise ValueError(f"unknown validation objective {name!r}; choose one of {VALIDATION_OBJECTIVES}")
    _check_static_int(num_classes, "num_classes", 2, "make_validation_objective")
    _check_static_int(num_groups, "num_groups", 1, "make_validation_objective")
    if name in ("deo", "blend") and num_groups < 2:
        raise ValueError(f"validation objective {name!r} needs num_groups >= 2, got {num_groups}")
    if reduce not in DEO_REDUCTIONS:
        raise ValueError(f"reduce must be one of {DEO_REDUCTIONS}, got {reduce!r}")
    if name == "blend":
        if lambda_val is None:
            raise ValueError("validation objective 'blend' needs lambda_val in [0, 1] (AutoBalance uses 0.1)")
        if _is_concrete(lambda_val) and not 0.0 <= float(lambda_val) <= 1.0:
            raise ValueError(f"lambda_val must lie in [0, 1], got {lambda_val}")
    if name == "worst_group_ce" and _is_concrete(temperature) and not float(temperature) > 0.0:
        raise ValueError(f"validation objective 'worst_group_ce' needs temperature > 0, got {temperature}")

    def needs_groups(groups):
        if groups is None:
            raise ValueError(f"validation objective {name!r} needs groups=[B] group ids")
        return groups

    def objective(per_example, labels, groups=None, mask=None):
        if name == "ce":
            return masked_mean(per_example, mask)
        if name == "balanced_ce":
            return balanced_mean(per_example, labels, num_classes, mask)
        if name == "group_balanced_ce":
            groups = needs_groups(groups)
            return group_balanced_mean(per_example, labels, groups, num_classes, num_groups, mask)
        if name == "deo":
            groups = needs_groups(groups)
            return deo_objective(per_example, labels, groups, num_classes, num_groups, mask, reduce)
        if name == "worst_group_ce":
            groups = needs_groups(groups)
            return soft_worst_group_mean(per_example, labels, groups, num_classes, num_groups, temperature, mask)
        groups = needs_groups(groups)
        return blended_objective(
            per_example, labels, groups, num_classes, num_groups, lambda_val, mask, reduce
        )

    objective.__doc__ = f"Validation objective {name!r} (see fairopt.losses.make_validation_objective)."
    return objective


def validation_objective(
    name: str,
    per_example: ArrayLike,
    labels: ArrayLike,
    groups: ArrayLike | None = None,
    *,
    num_classes: int,
    num_groups: int = 1,
    mask: ArrayLike | None = None,
    lambda_val: float | None = None,
    reduce: str = "mean",
    temperature: ArrayLike = WORST_GROUP_TEMPERATURE,
) -> Array:
    """Evaluate the validation (upper-level) objective ``name`` on per-example losses.

    Convenience wrapper of :func:`make_validation_objective`; names are
    :data:`VALIDATION_OBJECTIVES`.

    Returns:
      Scalar.
    """
    objective = make_validation_objective(
        name, num_classes=num_classes, num_groups=num_groups, lambda_val=lambda_val, reduce=reduce,
        temperature=temperature,
    )
    return objective(per_example, labels, groups, mask)


# ------------------------------------------------------------------------------------------------
# Group DRO.
# ------------------------------------------------------------------------------------------------


def group_mean_losses(
    per_example: ArrayLike, groups: ArrayLike, num_groups: int, mask: ArrayLike | None = None
) -> tuple[Array, Array]:
    """Per-group mean losses ``L_g`` ``[G]`` (0 for groups absent from the batch) and counts ``[G]``.

    ``groups`` may be any grouping (sensitive attribute, or the (class, group) cell id
    ``y * G + a`` for DRO over cells).
    """
    per_example = _check_per_example(per_example, "group_mean_losses")
    num_groups = _check_static_int(num_groups, "num_groups", 1, "group_mean_losses")
    groups = _check_ids(groups, "groups", per_example.shape[0], num_groups, "group_mean_losses")
    mask = _check_mask(mask, per_example.shape[0], "group_mean_losses")
    return _segment_means(per_example, groups, num_groups, mask)


class GroupDROState(NamedTuple):
    """Group DRO state: ``log_weights [G]``, the log of the adversarial group weights ``q``."""

    log_weights: Array

    @property
    def weights(self) -> Array:
        """``q = softmax(log_weights)`` (``[G]``, sums to 1)."""
        return jax.nn.softmax(self.log_weights)


class GroupDRO(NamedTuple):
    """Pure functions of online group DRO (see :func:`group_dro`)."""

    init: Callable[[], GroupDROState]
    update: Callable[..., GroupDROState]
    loss: Callable[..., Array]
    update_and_loss: Callable[..., tuple[Array, GroupDROState]]


def group_dro(
    num_groups: int,
    *,
    step_size: float = 0.01,
    group_counts: ArrayLike | None = None,
    generalization_adjustment: float = 0.0,
) -> GroupDRO:
    """Online group DRO (Sagawa et al., ICLR 2020, Alg. 1) as a NamedTuple of pure functions.

    Group weights follow exponentiated gradient ascent::

        q_g <- q_g exp(eta (L_g + C / sqrt(n_g)))  ;  q <- q / sum(q)
        robust loss = sum_g q_g L_g

    kept in log space (``log q <- log_softmax(log q + eta (L_g + C / sqrt(n_g)))``) for stability.
    As in the official code, ``q`` is updated with the batch's (stop-gradient) group losses and
    the robust loss uses the updated ``q``.

    Deviation from the official code: a group absent from the batch gets exponent 0 (its ``q``
    changes only through the normalisation); the official code treats its loss as 0 but still
    adds the adjustment ``C / sqrt(n_g)``, rewarding absence.

    Args:
      num_groups: G (static).
      step_size: ``eta`` (default 0.01).
      group_counts: ``[G]`` training counts ``n_g``; needed when ``generalization_adjustment > 0``.
      generalization_adjustment: ``C`` (default 0).

    Returns:
      :class:`GroupDRO` with ``init() -> state``; ``update(state, group_losses, group_counts_in_batch)
      -> state``; ``loss(state, group_losses) -> q · L``; ``update_and_loss(state, per_example,
      groups, mask=None) -> (robust_loss, state)``.
    """
    num_groups = _check_static_int(num_groups, "num_groups", 1, "group_dro")
    if step_size < 0:
        raise ValueError(f"group_dro: step_size must be >= 0, got {step_size}")
    if generalization_adjustment < 0:
        raise ValueError(
            f"group_dro: generalization_adjustment must be >= 0, got {generalization_adjustment}"
        )
    if generalization_adjustment > 0:
        if group_counts is None:
            raise ValueError("group_dro: generalization_adjustment > 0 needs group_counts=[G] (n_g)")
        counts = _check_counts(group_counts, "group_counts", 1, allow_zero=False, fn_name="group_dro")
        if counts.shape[0] != num_groups:
            raise ValueError(
                f"group_dro: group_counts has {counts.shape[0]} entries, expected G={num_groups}"
            )
        adjustment = jnp.asarray(generalization_adjustment / np.sqrt(counts), jnp.float32)
    else:
        adjustment = jnp.zeros((num_groups,), jnp.float32)

    def init() -> GroupDROState:
        return GroupDROState(jnp.full((num_groups,), -np.log(num_groups), jnp.float32))

    def update(state: GroupDROState, group_losses, batch_group_counts=None) -> GroupDROState:
        group_losses = jax.lax.stop_gradient(jnp.asarray(group_losses, jnp.float32))
        if group_losses.shape != (num_groups,):
            raise ValueError(
                f"group_dro.update: group_losses must be [G] = ({num_groups},), got "
                f"{group_losses.shape}"
            )
        exponent = step_size * (group_losses + adjustment)
        if batch_group_counts is not None:
            exponent = jnp.where(jnp.asarray(batch_group_counts) > 0, exponent, 0.0)
        return GroupDROState(jax.nn.log_softmax(state.log_weights + exponent))

    def loss(state: GroupDROState, group_losses) -> Array:
        return jnp.dot(jax.lax.stop_gradient(state.weights), group_losses)

    def update_and_loss(state: GroupDROState, per_example, groups, mask=None):
        group_losses, counts = group_mean_losses(per_example, groups, num_groups, mask)
        new_state = update(state, group_losses, counts)
        return loss(new_state, group_losses), new_state

    return GroupDRO(init, update, loss, update_and_loss)


# ------------------------------------------------------------------------------------------------
# Factory of fixed training losses.
# ------------------------------------------------------------------------------------------------

LOSS_NAMES = (
    "ce",
    "weighted_ce",
    "la",
    "cdt",
    "vs",
    "ldam",
    "ldam_drw",
    "drw",
    "group_la",
    "group_balanced_ce",
)

_LOSS_OPTIONS = {
    "ce": (),
    "weighted_ce": (),
    "la": ("tau",),
    "cdt": ("gamma",),
    "vs": ("gamma", "tau"),
    "ldam": ("max_margin", "scale"),
    "ldam_drw": ("max_margin", "scale", "beta", "drw_start_epoch"),
    "drw": ("beta", "drw_start_epoch"),
    "group_la": ("tau",),
    "group_balanced_ce": (),
}


def make_loss(
    name: str,
    class_counts: ArrayLike,
    *,
    cell_counts: ArrayLike | None = None,
    num_groups: int | None = None,
    **options,
) -> Callable[..., Array]:
    """Per-example training loss ``loss_fn(logits, labels, groups=None, epoch=0) -> [B]`` by name.

    The returned function has the signature :func:`fairopt.solvers.erm.erm` calls,
    ``loss_fn(logits, batch.y, batch.groups, epoch)``; ``groups`` and ``epoch`` are ignored by
    losses that do not need them. Fixed baselines (see SPEC §1):

    * "ce": cross-entropy (ERM).
    * "weighted_ce": ``w_k ∝ 1/n_k`` normalised to mean 1 (BERM).
    * "la": logit adjustment ``l_k = tau log pi_k`` (option ``tau=1.0``).
    * "cdt": ``Delta_k = (n_k/n_max)^gamma`` (option ``gamma=0.3``).
    * "vs": Kini et al. VS, CDT scale and LA shift (options ``gamma=0.3``, ``tau=1.0``).
    * "ldam": LDAM (options ``max_margin=0.5``, ``scale=30.0``).
    * "ldam_drw": LDAM with deferred effective-number weights (options ``beta=0.9999`` and the
      required ``drw_start_epoch``).
    * "drw": cross-entropy with deferred re-weighting (same options as above).
    * "group_la": Group-LA, needs ``cell_counts [K, G]`` (option ``tau=1.0``).
    * "group_balanced_ce": weights ``∝ 1/n_{k,g}`` (mean 1 over non-empty cells), needs
      ``cell_counts``.

    Args:
      name: one of :data:`LOSS_NAMES`.
      class_counts: ``[K]`` training class counts (concrete), K >= 2.
      cell_counts: ``[K, G]`` (class, group) training counts, for the group losses.
      num_groups: optional G, checked against ``cell_counts``.
      **options: the loss's options listed above.

    Returns:
      ``loss_fn(logits [B, K], labels [B], groups [B] | None = None, epoch = 0) -> [B]``.

    Raises:
      ValueError: unknown name (listing the choices), bad counts, missing ``cell_counts`` or
        ``drw_start_epoch``. TypeError: an option the loss does not take.
    """
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; choose one of {LOSS_NAMES}")
    unknown = sorted(set(options) - set(_LOSS_OPTIONS[name]))
    if unknown:
        raise TypeError(
            f"make_loss({name!r}): unexpected options {unknown}; {name!r} accepts "
            f"{_LOSS_OPTIONS[name] or 'no options'}"
        )
    counts = _check_counts(class_counts, "class_counts", 1, allow_zero=False, fn_name="make_loss")
    num_classes = counts.shape[0]
    if name in ("group_la", "group_balanced_ce"):
        if cell_counts is None:
            raise ValueError(f"make_loss({name!r}) needs cell_counts=[K, G] (class, group) counts")
        cells = _check_counts(cell_counts, "cell_counts", 2, allow_zero=True, fn_name="make_loss")
        if cells.shape[0] != num_classes:
            raise ValueError(
                f"make_loss: cell_counts has {cells.shape[0]} rows but class_counts has K={num_classes}"
            )
        if num_groups is not None and cells.shape[1] != num_groups:
            raise ValueError(
                f"make_loss: cell_counts has {cells.shape[1]} columns but num_groups={num_groups}"
            )

    def checked_k(logits):
        logits = jnp.asarray(logits)
        if logits.ndim == 2 and logits.shape[1] != num_classes:
            raise ValueError(
                f"{name} loss: logits have {logits.shape[1]} columns but class_counts has K={num_classes}"
            )
        return logits

    def ldam_with_options():
        """LDAM with the margins of ``counts`` and the ``max_margin`` / ``scale`` options."""
        return functools.partial(
            ldam_loss,
            class_counts=counts,
            max_margin=options.get("max_margin", 0.5),
            scale=options.get("scale", 30.0),
        )

    if name == "ce":
        def loss_fn(logits, labels, groups=None, epoch=0):
            return cross_entropy(checked_k(logits), labels)
    elif name == "weighted_ce":
        weights = inverse_frequency_weights(counts)
        def loss_fn(logits, labels, groups=None, epoch=0):
            return vs_loss(checked_k(logits), labels, weight=weights)
    elif name == "la":
        shift = logit_adjustment(counts, options.get("tau", 1.0))
        def loss_fn(logits, labels, groups=None, epoch=0):
            return vs_loss(checked_k(logits), labels, shift=shift)
    elif name == "cdt":
        scale = cdt_scale(counts, options.get("gamma", 0.3))
        def loss_fn(logits, labels, groups=None, epoch=0):
            return vs_loss(checked_k(logits), labels, scale=scale)
    elif name == "vs":
        scale = cdt_scale(counts, options.get("gamma", 0.3))
        shift = logit_adjustment(counts, options.get("tau", 1.0))
        def loss_fn(logits, labels, groups=None, epoch=0):
            return vs_loss(checked_k(logits), labels, scale=scale, shift=shift)
    elif name == "ldam":
        ldam = ldam_with_options()
        def loss_fn(logits, labels, groups=None, epoch=0):
            return ldam(checked_k(logits), labels)
    elif name in ("ldam_drw", "drw"):
        if "drw_start_epoch" not in options:
            raise ValueError(
                f"make_loss({name!r}) needs drw_start_epoch (the epoch at which re-weighting "
                "starts; Cao et al. use 160 of 200 epochs)"
            )
        start = options["drw_start_epoch"]
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise ValueError(f"make_loss: drw_start_epoch must be an int >= 0, got {start!r}")
        weights = drw_weights(counts, options.get("beta", 0.9999))
        if name == "ldam_drw":
            ldam = ldam_with_options()
            def loss_fn(logits, labels, groups=None, epoch=0):
                current = deferred_weights(weights, epoch, start)
                return ldam(checked_k(logits), labels, class_weights=current)
        else:
            def loss_fn(logits, labels, groups=None, epoch=0):
                current = deferred_weights(weights, epoch, start)
                return vs_loss(checked_k(logits), labels, weight=current)
    elif name == "group_la":
        weight, shift = group_logit_adjustment_params(cells, options.get("tau", 1.0))
        def loss_fn(logits, labels, groups=None, epoch=0):
            return vs_loss(checked_k(logits), labels, weight=weight, shift=shift, groups=groups)
    else:  # group_balanced_ce
        weight = cell_balanced_weights(cells)
        def loss_fn(logits, labels, groups=None, epoch=0):
            return vs_loss(checked_k(logits), labels, weight=weight, groups=groups)

    loss_fn.__name__ = f"{name}_loss"
    loss_fn.__doc__ = f"Per-example {name!r} loss built by fairopt.losses.make_loss."
    return loss_fn


# ------------------------------------------------------------------------------------------------
# The same fixed losses with their knobs as data (one compiled program per loss family).
# ------------------------------------------------------------------------------------------------


class VSParams(NamedTuple):
    """The numbers of :func:`vs_loss`: ``w``, ``l``, ``Delta``, each ``[K]`` or ``[K, G]``."""

    weight: Array
    shift: Array
    scale: Array


class LDAMDRWParams(NamedTuple):
    """The numbers of LDAM-DRW: margins ``m [K]``, logit scale ``s``, DRW weights ``[K]`` and
    the first re-weighted epoch."""

    margins: Array
    scale: Array
    drw_weights: Array
    drw_start_epoch: Array


PARAMETRIC_LOSSES = ("ce", "la", "cdt", "vs", "group_la", "ldam_drw")


def _parametric_vs(logits, labels, groups=None, epoch=0, params: VSParams = None):
    return vs_loss(logits, labels, weight=params.weight, shift=params.shift, scale=params.scale, groups=groups)


def _parametric_ldam_drw(logits, labels, groups=None, epoch=0, params: LDAMDRWParams = None):
    logits, labels = _check_logits_labels(logits, labels, "ldam_drw loss")
    true_class = jax.nn.one_hot(labels, logits.shape[1], dtype=logits.dtype)
    adjusted = params.scale * (logits - true_class * params.margins[labels][:, None])
    return vs_loss(adjusted, labels, weight=deferred_weights(params.drw_weights, epoch, params.drw_start_epoch))


def make_parametric_loss(
    name: str, class_counts: ArrayLike, *, cell_counts: ArrayLike | None = None, **options
) -> tuple[Callable[..., Array], VSParams | LDAMDRWParams]:
    """A fixed loss of :func:`make_loss` split into code and numbers, for sweeps over its knobs.

    Returns ``(loss_fn, params)`` with ``loss_fn(logits, labels, groups, epoch, params) -> [B]``
    equal to ``make_loss(name, class_counts, cell_counts=cell_counts, **options)(logits, labels,
    groups, epoch)``. ``loss_fn`` is the same function for every value of the options (and every
    class count), so ``fairopt.solvers.erm.erm(apply_fn, loss_fn, loss_params=params)`` trains
    LA at several ``tau`` (or CDT at several ``gamma``, ...) as one vmapped program:

    * "ce", "la", "cdt", "vs": :class:`VSParams` ``[K]`` (``w = 1``; ``l = tau log pi``;
      ``Delta = (n / n_max)^gamma``);
    * "group_la": :class:`VSParams` ``[K, G]`` of :func:`group_logit_adjustment_params`;
    * "ldam_drw": :class:`LDAMDRWParams` (options ``max_margin``, ``scale``, ``beta``,
      ``drw_start_epoch``, as :func:`make_loss`).

    Raises:
      ValueError: a name outside :data:`PARAMETRIC_LOSSES`, or what :func:`make_loss` raises.
      TypeError: an option the loss does not take.
    """
    if name not in PARAMETRIC_LOSSES:
        raise ValueError(f"make_parametric_loss: no parametric form of {name!r}; choose one of {PARAMETRIC_LOSSES}")
    make_loss(name, class_counts, cell_counts=cell_counts, **options)  # the same checks and errors
    counts = np.asarray(class_counts, np.float64)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    if name == "ldam_drw":
        params = LDAMDRWParams(
            f32(ldam_margins(counts, options.get("max_margin", 0.5))), f32(options.get("scale", 30.0)),
            f32(drw_weights(counts, options.get("beta", 0.9999))), f32(options["drw_start_epoch"]),
        )
        return _parametric_ldam_drw, params
    if name == "group_la":
        weight, shift = group_logit_adjustment_params(cell_counts, options.get("tau", 1.0))
        return _parametric_vs, VSParams(f32(weight), f32(shift), f32(np.ones_like(weight)))
    ones = np.ones(counts.shape[0], np.float32)
    shift = logit_adjustment(counts, options.get("tau", 1.0)) if name in ("la", "vs") else 0 * ones
    scale = cdt_scale(counts, options.get("gamma", 0.3)) if name in ("cdt", "vs") else ones
    return _parametric_vs, VSParams(f32(ones), f32(shift), f32(scale))
