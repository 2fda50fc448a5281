"""Loss-hyperparameter parameterisations for loss-function search (AutoBalance §2.2).

AutoBalance (Li et al., NeurIPS 2021) learns the hyperparameters ``alpha = (w, l, Delta)`` of
the parametric cross-entropy (eq. 2.2, :func:`fairopt.losses.vs_loss`)::

    l_train(y, f; alpha) = -w_y log [exp(sigma(Delta_y) f_y + l_y)
                                      / sum_k exp(sigma(Delta_k) f_k + l_k)]

To keep the upper-level problem small, the per-class vectors are restricted to the range of a
frequency-aware dictionary ``D in R^{K x K'}``: ``l = D l'`` with ``l' in R^{K'}`` (§2.2).
Classes are sorted by frequency and grouped into contiguous clusters of size C
(:func:`class_clusters`); the LA search space ("la_tau") uses the single column
``d = log pi`` so that ``l = tau log pi``.

Raw, unconstrained parameters live in :class:`LossHparams` (a pytree, so optax can update
it); :func:`to_loss_kwargs` maps them to the constrained loss arguments::

    weight = exp(D_w  hparams.weight)            (positive; raw 0 -> w = 1)
    shift  =     D_l  hparams.shift
    scale  = sigmoid(D_Δ hparams.scale_logit)    (in (0, 1); raw 1 -> Delta = 0.731)

Each raw leaf is ``[K']`` (per class cluster) or ``[K', G]`` (per (class cluster, group),
AutoBalance eq. 4.2); the expanded values are ``[K]`` or ``[K, G]``.

Deviations from the official code (github.com/ucr-optml/AutoBalance), all documented where
they occur: clusters do not require C to divide K; the CDT initialisation is mapped through
the inverse sigmoid (the official code feeds ``(n_k/n_max)^gamma`` into the sigmoid, which
does not reproduce CDT); the LA initialisation is projected onto the cluster space (the
official code builds a ``[K]`` vector even when clusters are used); weights are positive
through ``exp`` (the official code leaves ``w`` unconstrained).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairopt import losses

Array = jax.Array
ArrayLike = Any

__all__ = [
    "LossHparams",
    "SearchSpace",
    "NEUTRAL_SCALE_LOGIT",
    "INITS",
    "SEARCH_SPACES",
    "class_clusters",
    "la_tau_dictionary",
    "expand",
    "to_loss_kwargs",
    "init_hparams",
    "trainable_mask",
    "freeze_gradients",
    "masked_optimizer",
    "make_search_space",
]

NEUTRAL_SCALE_LOGIT = 1.0
"""Initial raw ``Delta``: ``sigmoid(1) = 0.731``, as the AutoBalance code (``dy_init='Ones'``)."""

INITS = ("ones", "zeros", "la", "cdt", "vs", "group_la")
SEARCH_SPACES = ("la_tau", "shift", "scale", "shift_scale", "weight")


class LossHparams(NamedTuple):
    """Raw, unconstrained loss hyperparameters (a pytree).

    Attributes:
      weight: raw log-weights ``[K']`` or ``[K', G]``; ``w = exp(D_w weight)``.
      shift: raw additive logit adjustments ``[K']`` or ``[K', G]``; ``l = D_l shift``.
      scale_logit: raw multiplicative scalings ``[K']`` or ``[K', G]``;
        ``Delta = sigmoid(D_Δ scale_logit)``.

    The same NamedTuple also carries per-leaf objects of the same structure: one dictionary per
    leaf (:class:`SearchSpace` ``.dictionary``) and one trainable flag per leaf
    (:func:`trainable_mask`).
    """

    weight: ArrayLike
    shift: ArrayLike
    scale_logit: ArrayLike


class SearchSpace(NamedTuple):
    """A loss search space: initial raw hyperparameters, their dictionaries, trainable leaves.

    Attributes:
      hparams: initial :class:`LossHparams`.
      dictionary: :class:`LossHparams` of ``[K, K'_leaf]`` float32 dictionaries (numpy).
      trainable: :class:`LossHparams` of Python bools.
    """

    hparams: LossHparams
    dictionary: LossHparams
    trainable: LossHparams


def _concrete_counts(class_counts, fn_name: str) -> np.ndarray:
    if isinstance(class_counts, jax.core.Tracer):
        raise TypeError(f"{fn_name}: class_counts must be concrete (numpy), not a traced array")
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.shape[0] < 2:
        raise ValueError(f"{fn_name}: class_counts must have shape [K] with K >= 2, got {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"{fn_name}: class_counts must be finite and non-negative, got {counts}")
    return counts


def class_clusters(class_counts: ArrayLike, cluster_size: int) -> np.ndarray:
    """Frequency-sorted class-cluster dictionary ``D in {0, 1}^{K x K'}`` (AutoBalance §2.2).

    Classes are sorted by decreasing frequency (ties keep class-id order) and cut into
    contiguous blocks of ``cluster_size`` classes; ``K' = ceil(K / C)``. When C does not divide
    K the last (rarest) block is smaller — the official code (``repeat_interleave``) breaks in
    that case and assumes the class ids are already sorted by frequency; here any order works.
    Column j is the indicator of cluster j, so ``D @ v`` gives every class the value of its
    cluster. ``C = 1`` gives a permutation matrix (one parameter per class), ``C = K`` a single
    shared parameter.

    Args:
      class_counts: ``[K]`` non-negative training counts.
      cluster_size: C >= 1 classes per cluster (values above K are clipped to K).

    Returns:
      ``[K, K']`` float32 indicator matrix with exactly one 1 per row.

    Raises:
      ValueError: bad counts or ``cluster_size < 1``. TypeError: non-integer cluster size.
    """
    counts = _concrete_counts(class_counts, "class_clusters")
    if isinstance(cluster_size, bool) or not isinstance(cluster_size, (int, np.integer)):
        raise TypeError(f"class_clusters: cluster_size must be an int, got {cluster_size!r}")
    if cluster_size < 1:
        raise ValueError(f"class_clusters: cluster_size must be >= 1, got {cluster_size}")
    num_classes = counts.shape[0]
    cluster_size = min(int(cluster_size), num_classes)
    num_clusters = -(-num_classes // cluster_size)
    order = np.argsort(-counts, kind="stable")  # most frequent first
    dictionary = np.zeros((num_classes, num_clusters), np.float32)
    dictionary[order, np.arange(num_classes) // cluster_size] = 1.0
    return dictionary


def la_tau_dictionary(class_counts: ArrayLike) -> np.ndarray:
    """Single-column dictionary ``d = log pi`` ``[K, 1]``: ``D tau = tau log pi`` (LA; §2.2).

    Raises:
      ValueError: a zero count (``log 0``).
    """
    counts = _concrete_counts(class_counts, "la_tau_dictionary")
    if np.any(counts == 0):
        raise ValueError(f"la_tau_dictionary: every class count must be positive for log pi, got {counts}")
    return np.log(counts / counts.sum()).astype(np.float32)[:, None]


def expand(raw: ArrayLike, dictionary: ArrayLike) -> Array:
    """``D @ raw``: ``[K, K'] x [K'] -> [K]`` or ``[K, K'] x [K', G] -> [K, G]``."""
    raw = jnp.asarray(raw)
    dictionary = jnp.asarray(dictionary)
    if dictionary.ndim != 2:
        raise ValueError(f"expand: dictionary must be [K, K'], got shape {dictionary.shape}")
    if raw.ndim not in (1, 2) or raw.shape[0] != dictionary.shape[1]:
        raise ValueError(
            f"expand: raw hyperparameters must be [K'] or [K', G] with K' = {dictionary.shape[1]} "
            f"(the dictionary's columns), got shape {raw.shape}"
        )
    return jnp.tensordot(dictionary.astype(raw.dtype), raw, axes=1)


def _per_leaf(dictionary) -> LossHparams:
    if isinstance(dictionary, LossHparams):
        return dictionary
    return LossHparams(dictionary, dictionary, dictionary)


def to_loss_kwargs(hparams: LossHparams, dictionary: ArrayLike | LossHparams) -> dict[str, Array]:
    """Expand raw hyperparameters into the keyword arguments of :func:`fairopt.losses.vs_loss`.

    ``weight = exp(D_w h.weight)``, ``shift = D_l h.shift``,
    ``scale = sigmoid(D_Δ h.scale_logit)``. Pure and differentiable in ``hparams``.

    Args:
      hparams: :class:`LossHparams` with ``[K']`` or ``[K', G]`` leaves.
      dictionary: one ``[K, K']`` dictionary for all leaves, or a :class:`LossHparams` of
        per-leaf dictionaries (as :func:`make_search_space` returns).

    Returns:
      ``dict(weight=..., shift=..., scale=...)`` each ``[K]`` or ``[K, G]``; with ``[K, G]``
      values pass ``groups=`` to ``vs_loss``.
    """
    if not isinstance(hparams, LossHparams):
        raise TypeError(f"to_loss_kwargs: hparams must be a LossHparams, got {type(hparams).__name__}")
    dictionaries = _per_leaf(dictionary)
    return dict(
        weight=jnp.exp(expand(hparams.weight, dictionaries.weight)),
        shift=expand(hparams.shift, dictionaries.shift),
        scale=jax.nn.sigmoid(expand(hparams.scale_logit, dictionaries.scale_logit)),
    )


def _project(target: np.ndarray, dictionary: np.ndarray) -> np.ndarray:
    """Least-squares raw value ``argmin_v ||D v - target||``: cluster means for indicator D."""
    return np.linalg.pinv(dictionary.astype(np.float64)) @ target


def init_hparams(
    init: str,
    class_counts: ArrayLike,
    dictionary: ArrayLike | LossHparams,
    *,
    num_groups: int | None = None,
    cell_counts: ArrayLike | None = None,
    tau: float = 1.0,
    gamma: float = 0.3,
) -> LossHparams:
    """Initial raw hyperparameters (AutoBalance ``dy_init`` / ``ly_init`` options).

    * "ones" / "zeros": neutral — ``w = 1``, ``l = 0``, ``scale_logit = 1`` (Delta = 0.731 for
      every class, i.e. plain CE of uniformly scaled logits; the names mirror the official
      ``dy_init='Ones'``, ``ly_init='Zeros'`` and give the same values).
    * "la": shift ``l_k = tau log pi_k``.
    * "cdt": ``Delta_k = sigmoid(1) (n_k / n_max)^gamma`` — the CDT ratios with the most
      frequent class at the neutral 0.731. Deviation: the official code initialises the raw
      parameter to ``(n_k/n_max)^gamma`` and then applies the sigmoid, which squashes the ratios
      into (0.5, 0.731]; a bare ``(n_k/n_max)^gamma`` would need ``logit(1) = inf`` for the
      largest class, so the common factor 0.731 (a temperature) is kept instead.
    * "vs": "la" and "cdt" together (Kini et al.).
    * "group_la": Group-LA (:func:`fairopt.losses.group_logit_adjustment_params`): weights
      ``w_{k,g} = 1/pi_g`` (mean 1) and shift ``tau log pi_{k|g}``; needs ``cell_counts``.

    Per-class targets are projected onto the dictionary by least squares (for a cluster
    dictionary: the mean over the cluster's classes; for the ``log pi`` column of "la_tau":
    exactly ``tau``). With ``num_groups`` the raw leaves are ``[K', G]``, the same for every
    group — unless ``cell_counts`` is given: then the "la"/"vs" shift is the Group-LA
    adjustment ``l_{k,g} = tau log pi_{k|g}`` (:func:`fairopt.losses.group_logit_adjustment_params`,
    empty cells floored at one example), projected column by column.

    Args:
      init: one of :data:`INITS`.
      class_counts: ``[K]`` positive training counts (concrete).
      dictionary: ``[K, K']`` array or per-leaf :class:`LossHparams` of dictionaries.
      num_groups: G for (class, group) hyperparameters, else None.
      cell_counts: optional ``[K, G]`` (class, group) counts for a group-conditional LA shift;
        requires ``num_groups = G``.
      tau: LA temperature. gamma: CDT exponent (default 0.3 as Kini et al.'s code).

    Returns:
      :class:`LossHparams` of float32 ``jnp`` arrays.
    """
    if init not in INITS:
        raise ValueError(f"init_hparams: unknown init {init!r}; choose one of {INITS}")
    counts = _concrete_counts(class_counts, "init_hparams")
    if init == "group_la" and cell_counts is None:
        raise ValueError("init_hparams: init 'group_la' needs cell_counts=[K, G] (and num_groups=G)")
    if np.any(counts == 0) and init in ("la", "cdt", "vs"):
        raise ValueError(f"init_hparams: init {init!r} needs positive class counts, got {counts}")
    if gamma < 0:
        raise ValueError(f"init_hparams: gamma must be >= 0, got {gamma}")
    valid_groups = isinstance(num_groups, (int, np.integer)) and not isinstance(num_groups, bool)
    if num_groups is not None and (not valid_groups or num_groups < 1):
        raise ValueError(f"init_hparams: num_groups must be a positive int or None, got {num_groups!r}")
    dictionaries = _per_leaf(dictionary)
    for field, leaf in zip(LossHparams._fields, dictionaries):
        leaf = np.asarray(leaf)
        if leaf.ndim != 2 or leaf.shape[0] != counts.shape[0]:
            raise ValueError(
                f"init_hparams: the {field} dictionary must be [K, K'] with K = {counts.shape[0]}, "
                f"got shape {leaf.shape}"
            )
    num_classes = counts.shape[0]
    log_prior = np.log(np.maximum(counts, 1e-300) / counts.sum())
    shift_target = tau * log_prior if init in ("la", "vs") else np.zeros(num_classes)
    if init in ("cdt", "vs"):
        delta = (counts / counts.max()) ** gamma / (1.0 + np.exp(-NEUTRAL_SCALE_LOGIT))
        scale_target = np.log(delta) - np.log1p(-delta)  # logit
    else:
        scale_target = np.full(num_classes, NEUTRAL_SCALE_LOGIT)
    if cell_counts is not None:
        if num_groups is None:
            raise ValueError("init_hparams: cell_counts [K, G] needs num_groups=G ([K', G] hyperparameters)")
        cells = np.asarray(cell_counts)
        if cells.shape != (num_classes, num_groups):
            raise ValueError(
                f"init_hparams: cell_counts must have shape [K, G] = ({num_classes}, {num_groups}), "
                f"got {cells.shape}"
            )
        weight_target = np.zeros(num_classes)
        if init in ("la", "vs", "group_la"):
            group_weight, group_shift = losses.group_logit_adjustment_params(cells, tau)
            shift_target = group_shift.astype(np.float64)
            if init == "group_la":
                weight_target = np.log(group_weight.astype(np.float64))
    else:
        weight_target = np.zeros(num_classes)
    targets = LossHparams(weight_target, shift_target, scale_target)

    def raw(target, leaf_dictionary):
        value = _project(target, np.asarray(leaf_dictionary))
        if num_groups is not None and value.ndim == 1:
            value = np.repeat(value[:, None], num_groups, axis=1)
        return jnp.asarray(value, jnp.float32)

    return LossHparams(*(raw(t, d) for t, d in zip(targets, dictionaries)))


_TRAINABLE = {
    "la_tau": LossHparams(False, True, False),
    "shift": LossHparams(False, True, False),
    "scale": LossHparams(False, False, True),
    "shift_scale": LossHparams(False, True, True),
    "weight": LossHparams(True, False, False),
}


def trainable_mask(space: str) -> LossHparams:
    """Which leaves a search space trains (AutoBalance Table 1 design spaces).

    "la_tau": only ``tau`` (the shift leaf, with the ``log pi`` dictionary); "shift": ``l``;
    "scale": ``Delta``; "shift_scale": ``l`` and ``Delta``; "weight": ``w``.

    Returns:
      :class:`LossHparams` of Python bools (a mask pytree for :func:`masked_optimizer`).
    """
    if space not in _TRAINABLE:
        raise ValueError(f"trainable_mask: unknown search space {space!r}; choose one of {SEARCH_SPACES}")
    return _TRAINABLE[space]


def freeze_gradients(grads: LossHparams, trainable: LossHparams) -> LossHparams:
    """Zero the gradients of frozen leaves (``trainable`` False); jit-safe."""
    return LossHparams(
        *(g if keep else jnp.zeros_like(g) for g, keep in zip(grads, trainable))
    )


def masked_optimizer(
    optimizer: optax.GradientTransformation, trainable: LossHparams
) -> optax.GradientTransformation:
    """``optimizer`` on trainable leaves, zero updates on frozen ones (``optax.partition``).

    Unlike ``optax.masked`` (which passes frozen leaves' updates through unchanged), frozen
    leaves get ``optax.set_to_zero()``, so weight decay or momentum cannot move them.
    """
    labels = LossHparams(*("train" if keep else "freeze" for keep in trainable))
    return optax.partition({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def make_search_space(
    space: str,
    class_counts: ArrayLike,
    *,
    init: str = "ones",
    cluster_size: int = 1,
    num_groups: int | None = None,
    cell_counts: ArrayLike | None = None,
    tau: float = 1.0,
    gamma: float = 0.3,
) -> SearchSpace:
    """Build a search space: dictionaries, initial raw hyperparameters and trainable leaves.

    All leaves use the frequency-sorted cluster dictionary (:func:`class_clusters` with
    ``cluster_size``), except the shift of "la_tau", which uses the single ``log pi`` column
    (:func:`la_tau_dictionary`), so its raw shift is ``[tau]`` (``[1, G]`` per group). For
    "la_tau" the "la"/"vs" inits set ``tau`` to the given value and "ones"/"zeros"/"cdt" to 0.

    Args:
      space: one of :data:`SEARCH_SPACES`.
      class_counts: ``[K]`` training counts (concrete).
      init: one of :data:`INITS`.
      cluster_size: classes per cluster C.
      num_groups: G for (class, group) hyperparameters (AutoBalance eq. 4.2), else None.
      cell_counts: optional ``[K, G]`` counts: the "la"/"vs" shift becomes Group-LA's
        ``tau log pi_{k|g}`` (see :func:`init_hparams`); not for "la_tau".
      tau, gamma: LA temperature and CDT exponent of the initialisation.

    Returns:
      :class:`SearchSpace`.
    """
    trainable = trainable_mask(space)
    if space == "la_tau" and cell_counts is not None:
        raise ValueError(
            "make_search_space: the 'la_tau' space has shift = tau log pi (class priors); "
            "cell_counts (a group-conditional shift) needs the 'shift' or 'shift_scale' space"
        )
    clusters = class_clusters(class_counts, cluster_size)
    shift_dictionary = la_tau_dictionary(class_counts) if space == "la_tau" else clusters
    dictionary = LossHparams(clusters, shift_dictionary, clusters)
    hparams = init_hparams(
        init, class_counts, dictionary, num_groups=num_groups, cell_counts=cell_counts, tau=tau, gamma=gamma
    )
    return SearchSpace(hparams, dictionary, trainable)
