r"""Fairness constraints as smooth group rates, and the constrained-training baselines.

This module holds what FairALM (:mod:`fairopt.solvers.fairalm`) and its baselines share
(FairALM paper, Lokhande et al., ECCV 2020, §2.1 and §6.2):

* **Group rates.** Every supported fairness criterion asks that a conditional rate
  ``mu^g = P(event | base, A = g)`` be equal across the groups ``g`` (paper §2.1, "fairness
  through the lens of the confusion matrix"). With ``p = P(y_hat = c+ | x)`` the model's
  probability of the positive class ``c+``:

  ===========  ===============  ===================  ====================  ===============  =========================
  atom         base rows        event                "cross_entropy"       "probability"    "ramp"
  ===========  ===============  ===================  ====================  ===============  =========================
  ``"deo"``    ``y = c+``       ``y_hat != c+`` FNR  ``-log p``            ``1 - p``        ``clip((1 - m) / 2, 0, 1)``
  ``"fpr"``    ``y != c+``      ``y_hat = c+``  FPR  ``-log(1 - p)``       ``p``            ``clip((1 + m) / 2, 0, 1)``
  ``"dp"``     all rows         ``y_hat = c+``       ``-log(1 - p)``       ``p``            ``clip((1 + m) / 2, 0, 1)``
  ``"pp"``     ``y_hat = c+``   ``y != c+``  FDR     soft base: weights ``p``  same          same
  ===========  ===============  ===================  ====================  ===============  =========================

  with ``m = log p - log(1 - p)`` the positive-class margin (the logit of ``p``). The
  ``"cross_entropy"`` surrogates are unbounded (``-log(1 - p)`` grows without limit as
  ``p -> 1``): with a large multiplier a step can push them, and the weights, to infinity.
  ``"probability"`` (the sigmoid of the margin) and ``"ramp"`` (the clipped hinge) are
  **bounded** in ``[0, 1]`` with gradients that stay finite at ``p = 0`` and ``p = 1``;
  ``"ramp"``'s gradient is ``1/2`` on the band ``|m| < 1`` (it does not vanish as the
  sigmoid's does near ``p = 1/2 +- 1/4``) and 0 outside it.

  ``"eo"`` (equalised odds) is the pair ``("deo", "fpr")``. Equal FNR is equal TPR, so the
  ``"deo"`` constraint is equal opportunity, whose gap is the paper's DEO ``|TPR_0 - TPR_1|``.
  The ``"cross_entropy"`` surrogate of ``"deo"`` is the official code's choice (mean CE of the
  positives of a group). ``"pp"`` is a linear-fractional rate (paper Observation 1); its smooth
  version replaces the hard base ``1[y_hat = c+]`` by the soft membership ``p``:
  ``mu^g = sum_i p_i 1[y_i != c+] / sum_i p_i`` over the rows of group ``g``.
  The paper's "DP" (and the official code's ``ddp``) equalises the *error rate* across groups;
  fairopt's ``"dp"`` is demographic parity proper, the positive-rate gap (SPEC §2).

* **Deviations for G >= 2 groups.** One constraint per group against the others,
  ``d^g = mu^g - mean_{h != g} mu^h = P / (P - 1) * (mu^g - mean_h mu^h)`` over the ``P``
  groups present in the batch (absent groups get ``d^g = 0`` and no gradient). For two groups
  ``d^0 = mu^0 - mu^1 = -d^1``: exactly the paper's single constraint ``d_h``, counted twice,
  which is why the Lagrangian and penalty terms below carry a factor ``1/2``.

* **Baselines** (paper §6.2): the l2 penalty on the constraint (official ``L2_PENALTY``) and
  the plain Lagrangian with gradient ascent on the multipliers, and online group DRO over the
  (class, group) cells (:func:`group_dro`, on :func:`fairopt.losses.group_dro`), as
  :class:`fairopt.train.Solver` s. Unconstrained training and re-weighting are
  :func:`fairopt.solvers.erm.erm` with ``fairopt.losses.make_loss("ce")`` and
  ``make_loss("group_balanced_ce", cell_counts=...)`` (weights ``∝ 1/n_{y,g}``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairopt import losses, sweep
from fairopt.losses import masked_mean
from fairopt.solvers.erm import DEFAULT_LEARNING_RATE, as_optimizer_factory, check_batch
from fairopt.sweep import HyperparameterConfig
from fairopt.train import Batch, Solver, check_group_ids

ATOMS = ("deo", "fpr", "dp", "pp")
CONSTRAINTS = ("deo", "fpr", "eo", "dp", "pp")
SURROGATES = ("cross_entropy", "probability", "ramp")
OPTIMIZERS = ("adam", "sgd")


class FairnessHyperparams(NamedTuple):
    """The numeric fields of :class:`FairnessConfig` (traced; a sweep over them is one program)."""

    learning_rate: jax.Array
    eta: jax.Array
    eta_growth: jax.Array
    dro_step_size: jax.Array
    tolerance: jax.Array


@dataclasses.dataclass(frozen=True)
class FairnessConfig(HyperparameterConfig):
    """Settings shared by FairALM, its constrained baselines, ERM and group DRO (the one place
    their defaults are declared; ``experiments.fairalm`` derives its flags from it).

    The fields named in :class:`FairnessHyperparams` are numbers that ``init`` stores in the
    state (:meth:`constrained_hyperparams`, :meth:`group_dro_hyperparams`,
    :meth:`erm_hyperparams`), so changing one never recompiles; the others are static.

    Attributes:
      constraint: the fairness constraint(s): deo, fpr, eo, dp or pp, several joined by a comma or +.
      surrogate: smooth surrogate of the group rates: cross_entropy (official, unbounded), probability (sigmoid)
        or ramp (clipped hinge); the last two are bounded.
      positive_class: the class whose group rates are equalised.
      inner_steps: FairALM primal steps per batch (official: 5).
      augmentation: FairALM's constraint term: paper (Alg. 2) or quadratic (textbook augmented Lagrangian).
      optimizer: primal optimiser, adam or sgd (official FairALM: sgd with learning rate 0.01).
      learning_rate: primal learning rate.
      eta: dual step / augmentation weight eta of FairALM, penalty weight of l2_penalty and ascent
        step of lagrangian (official FairALM: 20 on CelebA images).
      eta_growth: per-epoch growth of eta (official 1.01, and 1.0 keeps it constant).
      dro_step_size: group DRO step size of the cell weights.
      tolerance: slack of the constraints, |d| <= tolerance (0: equality, the paper's).
    """

    Hyperparams: ClassVar[type] = FairnessHyperparams
    CHOICES: ClassVar[dict] = {"surrogate": SURROGATES, "optimizer": OPTIMIZERS, "augmentation": ("paper", "quadratic")}

    constraint: str = "deo"
    surrogate: str = "cross_entropy"
    positive_class: int = 1
    inner_steps: int = 5
    augmentation: str = "paper"
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    eta: float = 0.1
    eta_growth: float = 1.01
    dro_step_size: float = 0.01
    tolerance: float = 0.0

    def __post_init__(self):
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"FairnessConfig.{name}={getattr(self, name)!r}; choose one of {', '.join(choices)}")
        constraint_atoms(self.constraints)
        for name in self.hyperparameter_names():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value):
                raise ValueError(f"FairnessConfig.{name} must be a finite number, got {value!r}")
        for name in ("learning_rate", "eta_growth", "dro_step_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"FairnessConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("eta", "tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(f"FairnessConfig.{name} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, (int, np.integer)) or self.inner_steps < 1:
            raise ValueError(f"FairnessConfig.inner_steps must be an integer >= 1 (official FairALM: 5), got {self.inner_steps!r}")
        if isinstance(self.positive_class, bool) or not isinstance(self.positive_class, (int, np.integer)) or self.positive_class < 0:
            raise ValueError(f"FairnessConfig.positive_class must be a class index >= 0, got {self.positive_class!r}")

    @property
    def constraints(self) -> tuple[str, ...]:
        """``constraint`` split at commas and ``+``."""
        return tuple(name.strip() for name in self.constraint.replace("+", ",").split(",") if name.strip())

    def optimizer_factory(self):
        """``optax.adam`` or ``optax.sgd``: a factory, so the learning rate stays traced."""
        return optax.adam if self.optimizer == "adam" else optax.sgd

    @staticmethod
    def constrained_hyperparams(h: FairnessHyperparams) -> "ConstrainedHyperparams":
        """The :class:`ConstrainedHyperparams` of FairALM / Lagrangian / penalty (any leading axes)."""
        return ConstrainedHyperparams(h.learning_rate, h.eta, h.eta_growth, h.tolerance)

    @staticmethod
    def group_dro_hyperparams(h: FairnessHyperparams) -> "GroupDROHyperparams":
        """The :class:`GroupDROHyperparams` of group DRO (no generalisation adjustment)."""
        return GroupDROHyperparams(h.learning_rate, h.dro_step_size, jnp.zeros_like(h.dro_step_size))


def constraint_atoms(constraints: str | Sequence[str]) -> tuple[str, ...]:
    """Expand constraint names into the rate atoms they equalise, in a fixed order.

    Args:
      constraints: one name or several of ``CONSTRAINTS``: ``"deo"`` (equal opportunity: equal
        FNR/TPR), ``"fpr"`` (equal false-positive rate), ``"eo"`` (equalised odds = ``"deo"``
        and ``"fpr"``), ``"dp"`` (demographic parity: equal positive rate), ``"pp"``
        (predictive parity: equal false-discovery rate).

    Returns:
      The distinct atoms (a subset of ``ATOMS``), e.g. ``("deo", "fpr")`` for ``"eo"``.

    Raises:
      ValueError: on an unknown or empty constraint list.
    """
    names = (constraints,) if isinstance(constraints, str) else tuple(constraints)
    if not names:
        raise ValueError(f"constraints is empty; give at least one of {', '.join(CONSTRAINTS)}")
    atoms: list[str] = []
    for name in names:
        if name not in CONSTRAINTS:
            raise ValueError(f"constraints has unknown {name!r}; choose from {', '.join(CONSTRAINTS)}")
        for atom in ("deo", "fpr") if name == "eo" else (name,):
            if atom not in atoms:
                atoms.append(atom)
    return tuple(a for a in ATOMS if a in atoms)


def _check_common(num_groups: int, positive_class: int, surrogate: str | None = None) -> None:
    if not isinstance(num_groups, (int, np.integer)) or num_groups < 2:
        raise ValueError(f"num_groups must be an integer >= 2 (a constraint compares groups), got {num_groups!r}")
    if not isinstance(positive_class, (int, np.integer)) or positive_class < 0:
        raise ValueError(f"positive_class must be a non-negative class index, got {positive_class!r}")
    if surrogate is not None and surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {', '.join(SURROGATES)}, got {surrogate!r}")


def _rates_from_scores(base, weight, score, groups, mask, num_groups):
    """``mu[c, g] = sum_i base w score 1[g_i = g] / sum_i base w 1[g_i = g]`` and presence.

    ``present[c, g]`` is True when group ``g`` has at least one masked-in base row of atom ``c``
    (for ``pp`` the hard base is all rows of the group; its soft weights only re-weight).
    Empty cells give ``mu = 0`` with zero gradient (a safe denominator inside the ``where``).
    """
    onehot = jax.nn.one_hot(groups, num_groups, dtype=score.dtype) * mask.astype(score.dtype)[:, None]
    count = jnp.einsum("cb,bg->cg", base, onehot)
    denominator = jnp.einsum("cb,bg->cg", base * weight, onehot)
    numerator = jnp.einsum("cb,bg->cg", base * weight * score, onehot)
    present = count > 0
    safe = jnp.where(present & (denominator > 0), denominator, 1.0)
    rates = jnp.where(present & (denominator > 0), numerator / safe, 0.0)
    return rates, present


def smooth_group_rates(
    logits: jax.Array,
    labels: jax.Array,
    groups: jax.Array,
    mask: jax.Array | None = None,
    *,
    atoms: tuple[str, ...],
    num_groups: int,
    positive_class: int = 1,
    surrogate: str = "cross_entropy",
) -> tuple[jax.Array, jax.Array]:
    """Differentiable per-group rates ``mu[c, g]`` of each constraint atom (see module table).

    Args:
      logits: ``[B, K]`` model outputs.
      labels: ``[B]`` integer labels.
      groups: ``[B]`` integer groups in ``[0, num_groups)``.
      mask: ``[B]`` bool, False on padded rows (None: all rows count).
      atoms: from :func:`constraint_atoms` (static).
      num_groups: G (static).
      positive_class: the class ``c+`` whose rates are equalised (static).
      surrogate: ``"cross_entropy"`` (official code: ``-log p`` of the target of the event;
        unbounded), ``"probability"`` (soft 0/1 rates: the sigmoid of the margin) or ``"ramp"``
        (the clipped hinge of the margin); see the module table. ``"pp"`` always uses the
        probability form.

    Returns:
      ``(rates [C, G], present [C, G] bool)``; absent cells have rate 0 and no gradient.
    """
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {', '.join(SURROGATES)}, got {surrogate!r}")
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    groups = jnp.asarray(groups)
    mask = jnp.ones(labels.shape, bool) if mask is None else jnp.asarray(mask, bool)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    is_positive_class = jnp.arange(logits.shape[-1]) == positive_class
    log_p_pos = log_p[:, positive_class]
    # log(1 - p) as the log-mass of the other classes: stable when p -> 1.
    log_not_pos = jax.nn.logsumexp(jnp.where(is_positive_class, -jnp.inf, logits), axis=-1) - jax.nn.logsumexp(
        logits, axis=-1
    )
    p_pos = jnp.exp(log_p_pos)
    y_pos = (labels == positive_class).astype(logits.dtype)
    ones = jnp.ones_like(p_pos)
    # The soft indicators of the events y_hat = c+ ("positive") and y_hat != c+ ("negative").
    if surrogate == "cross_entropy":
        positive, negative = -log_not_pos, -log_p_pos
    elif surrogate == "probability":
        positive, negative = p_pos, 1.0 - p_pos
    else:  # "ramp": the hinge of the margin m = log p - log(1 - p), clipped to [0, 1]
        margin = log_p_pos - log_not_pos
        positive, negative = jnp.clip(0.5 * (1.0 + margin), 0.0, 1.0), jnp.clip(0.5 * (1.0 - margin), 0.0, 1.0)
    bases, weights, scores = [], [], []
    for atom in atoms:
        if atom == "deo":
            bases.append(y_pos), weights.append(ones), scores.append(negative)
        elif atom == "fpr":
            bases.append(1.0 - y_pos), weights.append(ones), scores.append(positive)
        elif atom == "dp":
            bases.append(ones), weights.append(ones), scores.append(positive)
        elif atom == "pp":
            bases.append(ones), weights.append(p_pos), scores.append(1.0 - y_pos)
        else:
            raise ValueError(f"atoms has unknown {atom!r}; use constraint_atoms() to build it")
    return _rates_from_scores(jnp.stack(bases), jnp.stack(weights), jnp.stack(scores), groups, mask, num_groups)


def hard_group_rates(
    predictions: jax.Array,
    labels: jax.Array,
    groups: jax.Array,
    mask: jax.Array | None = None,
    *,
    atoms: tuple[str, ...],
    num_groups: int,
    positive_class: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """The exact 0/1 rates ``mu[c, g]`` of predicted labels (FNR, FPR, positive rate, FDR).

    Args:
      predictions: ``[n]`` predicted labels.
      labels, groups, mask, atoms, num_groups, positive_class: as in :func:`smooth_group_rates`.

    Returns:
      ``(rates [C, G], present [C, G] bool)``; a group without base rows (e.g. no positives for
      ``"deo"``, no predicted positives for ``"pp"``) is absent with rate 0.
    """
    predictions = jnp.asarray(predictions)
    labels = jnp.asarray(labels)
    mask = jnp.ones(labels.shape, bool) if mask is None else jnp.asarray(mask, bool)
    y_pos = (labels == positive_class).astype(jnp.float32)
    hat_pos = (predictions == positive_class).astype(jnp.float32)
    ones = jnp.ones_like(y_pos)
    table = {
        "deo": (y_pos, 1.0 - hat_pos),
        "fpr": (1.0 - y_pos, hat_pos),
        "dp": (ones, hat_pos),
        "pp": (hat_pos, 1.0 - y_pos),
    }
    unknown = [a for a in atoms if a not in table]
    if unknown:
        raise ValueError(f"atoms has unknown {unknown}; use constraint_atoms() to build it")
    base = jnp.stack([table[a][0] for a in atoms])
    score = jnp.stack([table[a][1] for a in atoms])
    return _rates_from_scores(base, jnp.ones_like(base), score, jnp.asarray(groups), mask, num_groups)


def group_deviations(rates: jax.Array, present: jax.Array) -> jax.Array:
    r"""Per-group constraint values ``d^g = mu^g - mean_{h != g} mu^h`` over present groups.

    Equivalently ``d^g = P / (P - 1) (mu^g - mean_h mu^h)`` with ``P`` the number of present
    groups (the deviation from the group-averaged overall rate, rescaled so that two groups
    give exactly the paper's ``d_h = mu^{s0} - mu^{s1}`` for ``g = 0`` and ``-d_h`` for
    ``g = 1``). Absent groups, and every group when ``P < 2``, get 0.

    Args:
      rates: ``[..., G]`` group rates.
      present: ``[..., G]`` bool.

    Returns:
      ``[..., G]`` deviations.
    """
    weight = present.astype(rates.dtype)
    count = jnp.sum(weight, axis=-1, keepdims=True)
    total = jnp.sum(rates * weight, axis=-1, keepdims=True)
    others = jnp.maximum(count - 1.0, 1.0)
    deviation = rates - (total - rates) / others
    return jnp.where(present & (count >= 2), deviation, 0.0)


def lagrangian_term(multipliers: jax.Array, deviations: jax.Array) -> jax.Array:
    r"""``(1/2) sum_{c,g} lambda_{c,g} d_{c,g}``; for two groups and ``lambda^1 = -lambda^0``
    this is the paper's ``lambda d_h`` (each pair constraint appears twice, hence ``1/2``)."""
    return 0.5 * jnp.sum(multipliers * deviations)


def penalty_term(deviations: jax.Array, tolerance=0.0) -> jax.Array:
    r"""``(1/2) sum_{c,g} max(|d_{c,g}| - tolerance, 0)^2``: the squared violation of
    ``|d| <= tolerance``; for two groups and ``tolerance = 0`` the paper's ``d_h^2``."""
    return 0.5 * jnp.sum(jnp.maximum(jnp.abs(deviations) - tolerance, 0.0) ** 2)


def dual_ascent(multipliers: jax.Array, deviations: jax.Array, step_size, tolerance=0.0) -> jax.Array:
    r"""One proximal ascent step on the multipliers of ``|d_{c,g}| <= tolerance``:

        lambda <- sign(u) max(|u| - step_size * tolerance, 0),   u = lambda + step_size * d.

    The constraint ``|d| <= tol`` is ``max_lambda lambda d - tol |lambda| <= 0``; the step is a
    gradient step on ``lambda d`` followed by the proximal map of ``tol |lambda|`` (a
    soft-threshold). With ``tolerance = 0`` it is the plain ``lambda + step_size * d`` of the
    paper's Alg. 2; with ``tolerance > 0`` a multiplier shrinks back to 0 while its constraint
    holds with slack (complementary slackness), so a looser tolerance costs less accuracy.
    """
    raised = multipliers + step_size * deviations
    return jnp.sign(raised) * jnp.maximum(jnp.abs(raised) - step_size * tolerance, 0.0)


def constraint_gap(deviations: jax.Array) -> jax.Array:
    """The largest ``|d_{c,g}|``; for two groups the largest ``|mu^0 - mu^1|`` over atoms."""
    return jnp.max(jnp.abs(deviations))


class ConstrainedHyperparams(NamedTuple):
    """The traced numbers of a constrained solver (FairALM, Lagrangian, l2 penalty): ``init``
    stores them in the state and ``step`` reads them there, so a sweep over them is one program.

    ``eta`` is FairALM's dual step and augmentation weight, the penalty weight of
    :func:`penalty` and the ascent step of :func:`lagrangian`; epoch ``e`` (from 0) uses
    ``eta * eta_growth ** e``. ``learning_rate`` is the primal step (traced when the optimiser
    is a factory such as ``optax.adam``). ``tolerance`` is the slack of the constraints
    ``|d_{c,g}| <= tolerance`` (:func:`dual_ascent`, :func:`penalty_term`; 0: equality).
    """

    learning_rate: jax.Array
    eta: jax.Array
    eta_growth: jax.Array
    tolerance: jax.Array = 0.0


def constrained_hyperparams(
    learning_rate=DEFAULT_LEARNING_RATE, eta=20.0, eta_growth=1.0, tolerance=0.0
) -> ConstrainedHyperparams:
    """A :class:`ConstrainedHyperparams` of float32 scalars, validated in Python (ValueError)."""
    check_numbers(learning_rate=learning_rate, eta=eta, eta_growth=eta_growth, tolerance=tolerance)
    return ConstrainedHyperparams(
        *(jnp.asarray(v, jnp.float32) for v in (learning_rate, eta, eta_growth, tolerance))
    )


def check_numbers(**values) -> None:
    """Validate hyperparameter values given as Python numbers (traced values are not checked):
    ``eta``, ``step_size`` and ``tolerance`` finite and >= 0, learning rates and ``eta_growth`` finite and > 0."""
    for name, value in values.items():
        if isinstance(value, jax.core.Tracer):
            continue
        array = np.asarray(value, np.float64)
        if array.shape != () or not np.isfinite(array):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if name in ("eta", "step_size", "generalization_adjustment", "tolerance") and array < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if name in ("learning_rate", "eta_growth") and not array > 0:
            hint = " (1.0: constant eta; official 1.01)" if name == "eta_growth" else ""
            raise ValueError(f"{name} must be a finite number > 0{hint}, got {value!r}")


class ConstrainedState(NamedTuple):
    """State of a constrained solver (FairALM, Lagrangian, l2 penalty)."""

    params: Any
    opt_state: Any
    multipliers: jax.Array  # [C, G] lambda (zeros for the penalty method)
    step: jax.Array  # int32 scalar: batches seen (dual steps taken)
    hyperparams: ConstrainedHyperparams | None = None


def dual_schedule(step: jax.Array, *, eta, eta_growth, steps_per_epoch: int) -> jax.Array:
    """``eta_e = eta * eta_growth ** e`` with ``e = step // steps_per_epoch`` (0-based epoch);
    ``eta`` and ``eta_growth`` may be traced.

    The official code multiplies eta by 1.01 at the *start* of every epoch, so its first epoch
    already uses ``1.01 * eta``; fairopt's first epoch uses ``eta`` itself.
    """
    epoch = (step // steps_per_epoch).astype(jnp.float32)
    return jnp.asarray(eta, jnp.float32) * jnp.asarray(eta_growth, jnp.float32) ** epoch


def check_constrained_args(*, num_groups, positive_class, surrogate, eta, eta_growth, inner_steps, steps_per_epoch):
    """Validate the shared arguments of the constrained solvers (ValueError naming the fix);
    ``eta`` and ``eta_growth`` only when they are Python numbers (never traced values)."""
    _check_common(num_groups, positive_class, surrogate)
    check_numbers(eta=eta, eta_growth=eta_growth)
    if not isinstance(inner_steps, (int, np.integer)) or inner_steps < 1:
        raise ValueError(f"inner_steps must be an integer >= 1 (official FairALM: 5), got {inner_steps!r}")
    if not isinstance(steps_per_epoch, (int, np.integer)) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an integer >= 1 (batches per epoch), got {steps_per_epoch!r}")


def build_constrained_solver(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    optimizer,
    *,
    primal_penalty: Callable[..., jax.Array],
    dual_step: Callable[..., jax.Array] | None,
    constraints: str | Sequence[str],
    num_groups: int,
    positive_class: int,
    surrogate: str,
    eta: float,
    eta_growth: float,
    inner_steps: int,
    steps_per_epoch: int,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    solver_name: str = "constrained",
) -> Solver:
    """A primal-dual solver: ``inner_steps`` optimizer steps on one batch, then a dual step.

    Each :meth:`step` on a batch ``z`` with multipliers ``lambda`` and ``eta_t`` from
    :func:`dual_schedule`:

    1. repeat ``inner_steps`` times: descend on
       ``e_hat(w; z) + primal_penalty(rates(w; z), present, lambda, eta_t)`` with ``optimizer``,
       where ``e_hat`` is the masked mean cross-entropy;
    2. ``lambda <- dual_step(lambda, d(w_t; z), eta_t)`` with the deviations at the new
       parameters (no dual step when ``dual_step`` is None).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits [B, K]``.
      optimizer: the primal optimiser (the paper's step size ``tau``): a factory
        ``learning_rate -> optax.GradientTransformation`` (``optax.sgd``; the learning rate is
        then traced), a ready transformation (used as is) or None (``optax.adam``).
      primal_penalty: ``(rates, present, multipliers, eta_t, tolerance) -> scalar`` added to ``e_hat``.
      dual_step: ``(multipliers, deviations, eta_t, tolerance) -> multipliers`` or None.
      constraints, num_groups, positive_class, surrogate: see :func:`smooth_group_rates`.
      eta, eta_growth, learning_rate: the defaults of ``init``'s ``hyperparams``
        (:class:`ConstrainedHyperparams`); see :func:`dual_schedule`.
      steps_per_epoch: batches per epoch (static).
      inner_steps: primal steps per batch (static).
      solver_name: how errors name the solver.

    Returns:
      A :class:`fairopt.train.Solver`; ``init(key, params, hyperparams=None)`` stores a
      :class:`ConstrainedHyperparams` in the state; ``check_data(x, y, groups)`` rejects group
      ids outside ``[0, num_groups)`` (called by :func:`fairopt.train.fit`); ``step`` consumes
      a :class:`fairopt.train.Batch` (anything else is a TypeError naming it) and reports ``loss`` (cross-entropy at the new parameters),
      ``objective`` (the last primal objective), ``constraint_gap`` (largest ``|d|`` of the
      smooth rates), ``multiplier`` (largest ``|lambda|``) and ``eta``.
    """
    check_constrained_args(
        num_groups=num_groups,
        positive_class=positive_class,
        surrogate=surrogate,
        eta=eta,
        eta_growth=eta_growth,
        inner_steps=inner_steps,
        steps_per_epoch=steps_per_epoch,
    )
    atoms = constraint_atoms(constraints)
    factory = as_optimizer_factory(optimizer)
    default = constrained_hyperparams(learning_rate, eta, eta_growth)

    def rates_and_loss(params, batch: Batch):
        logits = apply_fn(params, batch.x)
        if logits.shape[-1] <= positive_class:
            raise ValueError(
                f"positive_class={positive_class} but the model outputs {logits.shape[-1]} classes; "
                f"pick a class index below {logits.shape[-1]}"
            )
        loss = masked_mean(losses.cross_entropy(logits, batch.y), batch.mask)
        rates, present = smooth_group_rates(
            logits,
            batch.y,
            batch.groups,
            batch.mask,
            atoms=atoms,
            num_groups=num_groups,
            positive_class=positive_class,
            surrogate=surrogate,
        )
        return loss, rates, present

    def objective(params, batch, multipliers, eta_t, tolerance):
        loss, rates, present = rates_and_loss(params, batch)
        return loss + primal_penalty(rates, present, multipliers, eta_t, tolerance)

    def init(key, params, hyperparams: ConstrainedHyperparams | None = None):
        del key
        hyperparams = sweep.as_hyperparams(hyperparams, ConstrainedHyperparams, default)
        multipliers = jnp.zeros((len(atoms), num_groups), jnp.float32)
        opt_state = factory(hyperparams.learning_rate).init(params)
        return ConstrainedState(params, opt_state, multipliers, jnp.zeros((), jnp.int32), hyperparams)

    def step(state: ConstrainedState, batch: Batch):
        batch = check_batch(batch, solver_name)
        h = default if state.hyperparams is None else state.hyperparams
        optimizer = factory(h.learning_rate)
        eta_t = dual_schedule(state.step, eta=h.eta, eta_growth=h.eta_growth, steps_per_epoch=steps_per_epoch)

        def primal(carry, _):
            params, opt_state = carry
            value, grads = jax.value_and_grad(objective)(params, batch, state.multipliers, eta_t, h.tolerance)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, opt_state), values = jax.lax.scan(
            primal, (state.params, state.opt_state), None, length=inner_steps
        )
        loss, rates, present = rates_and_loss(params, batch)
        deviations = group_deviations(rates, present)
        multipliers = (
            state.multipliers if dual_step is None else dual_step(state.multipliers, deviations, eta_t, h.tolerance)
        )
        metrics = {
            "loss": loss,
            "objective": values[-1],
            "constraint_gap": constraint_gap(deviations),
            "multiplier": jnp.max(jnp.abs(multipliers)),
            "eta": eta_t,
        }
        return ConstrainedState(params, opt_state, multipliers, state.step + 1, state.hyperparams), metrics

    def predict(state: ConstrainedState, x):
        return jax.nn.softmax(apply_fn(state.params, x), axis=-1)

    def check_data(x, y, groups):
        check_group_ids(groups, num_groups, what=f"the {solver_name} training groups")

    return Solver(init, step, predict, check_data)


def penalty(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    optimizer=None,
    *,
    constraints: str | Sequence[str] = "deo",
    num_groups: int = 2,
    positive_class: int = 1,
    surrogate: str = "cross_entropy",
    eta: float = 20.0,
    eta_growth: float = 1.0,
    steps_per_epoch: int = 1,
    learning_rate: float = DEFAULT_LEARNING_RATE,
) -> Solver:
    r"""The l2-penalty baseline (FairALM paper §6, official ``L2_PENALTY``).

    Minimises ``e_hat(w) + (eta_t / 2) * (1/2) sum_{c,g} max(|d_{c,g}| - tol, 0)^2`` (``tol``:
    the ``tolerance`` hyperparameter, default 0) — for two groups and ``tol = 0``
    ``e_hat + (eta_t / 2) (mu^{s0} - mu^{s1})^2``, the official code's
    ``loss + 0.5 * eta * (loss_t1_s0 - loss_t1_s1)**2``. One optimizer step per batch.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits``.
      optimizer: a factory ``learning_rate -> optax.GradientTransformation`` (traced learning
        rate), a ready transformation or None (``optax.adam``).
      constraints: see :func:`constraint_atoms`.
      num_groups: G >= 2.
      positive_class: class whose rates are equalised.
      surrogate: see :func:`smooth_group_rates`.
      eta: penalty weight (official: 20, grown ×1.01 per epoch as FairALM's eta); a default of
        ``init``'s :class:`ConstrainedHyperparams`, like ``eta_growth`` and ``learning_rate``.
      eta_growth: per-epoch factor of ``eta``.
      steps_per_epoch: batches per epoch (for the growth).
      learning_rate: the primal step (with an optimiser factory).

    Returns:
      A :class:`fairopt.train.Solver` (see :func:`build_constrained_solver`).
    """

    def primal_penalty(rates, present, multipliers, eta_t, tolerance):
        del multipliers
        return 0.5 * eta_t * penalty_term(group_deviations(rates, present), tolerance)

    return build_constrained_solver(
        apply_fn,
        optimizer,
        primal_penalty=primal_penalty,
        dual_step=None,
        constraints=constraints,
        num_groups=num_groups,
        positive_class=positive_class,
        surrogate=surrogate,
        eta=eta,
        eta_growth=eta_growth,
        inner_steps=1,
        steps_per_epoch=steps_per_epoch,
        learning_rate=learning_rate,
        solver_name="l2-penalty",
    )


def lagrangian(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    optimizer=None,
    *,
    constraints: str | Sequence[str] = "deo",
    num_groups: int = 2,
    positive_class: int = 1,
    surrogate: str = "cross_entropy",
    dual_learning_rate: float = 20.0,
    dual_growth: float = 1.0,
    inner_steps: int = 1,
    steps_per_epoch: int = 1,
    learning_rate: float = DEFAULT_LEARNING_RATE,
) -> Solver:
    r"""The plain Lagrangian baseline: gradient descent-ascent on ``e_hat + lambda . d``.

    Primal: descend on ``e_hat(w) + (1/2) sum_{c,g} lambda_{c,g} d_{c,g}(w)`` (for two groups
    ``e_hat + lambda (mu^{s0} - mu^{s1})``); dual: gradient ascent
    ``lambda <- lambda + alpha_t d(w_t)`` (:func:`dual_ascent`, soft-thresholded by
    ``alpha_t * tolerance`` for ``|d| <= tolerance``). This is FairALM without the proximal/augmentation
    term ``eta (mu^{s0} + mu^{s1})`` (FairALM paper §6.2, baseline "Lagrangian" [47]).

    Args:
      apply_fn, optimizer, constraints, num_groups, positive_class, surrogate: as
        :func:`penalty`.
      dual_learning_rate: ascent step ``alpha`` on the multipliers: the default ``eta`` of
        ``init``'s :class:`ConstrainedHyperparams` (traced).
      dual_growth: per-epoch factor of the ascent step (the default ``eta_growth``).
      inner_steps: primal steps per batch.
      steps_per_epoch: batches per epoch.

    Returns:
      A :class:`fairopt.train.Solver` (see :func:`build_constrained_solver`).
    """

    def primal_penalty(rates, present, multipliers, eta_t, tolerance):
        del eta_t, tolerance
        return lagrangian_term(multipliers, group_deviations(rates, present))

    return build_constrained_solver(
        apply_fn,
        optimizer,
        primal_penalty=primal_penalty,
        dual_step=dual_ascent,
        constraints=constraints,
        num_groups=num_groups,
        positive_class=positive_class,
        surrogate=surrogate,
        eta=dual_learning_rate,
        eta_growth=dual_growth,
        inner_steps=inner_steps,
        steps_per_epoch=steps_per_epoch,
        learning_rate=learning_rate,
        solver_name="Lagrangian",
    )


class GroupDROHyperparams(NamedTuple):
    """The traced numbers of :func:`group_dro`: the primal ``learning_rate``, the DRO
    ``step_size`` and the generalisation adjustment ``C``."""

    learning_rate: jax.Array
    step_size: jax.Array
    generalization_adjustment: jax.Array


def group_dro_hyperparams(learning_rate=DEFAULT_LEARNING_RATE, step_size=0.01, generalization_adjustment=0.0):
    """A :class:`GroupDROHyperparams` of float32 scalars, validated in Python (ValueError)."""
    check_numbers(learning_rate=learning_rate, step_size=step_size, generalization_adjustment=generalization_adjustment)
    return GroupDROHyperparams(
        *(jnp.asarray(v, jnp.float32) for v in (learning_rate, step_size, generalization_adjustment))
    )


class GroupDROSolverState(NamedTuple):
    """State of :func:`group_dro`: model, optimizer and the adversarial cell weights."""

    params: Any
    opt_state: Any
    dro: losses.GroupDROState
    step: jax.Array
    hyperparams: GroupDROHyperparams | None = None


def group_dro(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    optimizer=None,
    *,
    num_classes: int,
    num_groups: int,
    step_size: float = 0.01,
    cell_counts: np.ndarray | None = None,
    generalization_adjustment: float = 0.0,
    learning_rate: float = DEFAULT_LEARNING_RATE,
) -> Solver:
    r"""Online group DRO (Sagawa et al., ICLR 2020) over the (class, group) cells.

    The robust groups are the ``K G`` cells ``u = y G + a``; each step updates the cell weights
    ``q_u <- q_u exp(step_size (L_u + C / sqrt(n_u)))`` (normalised) with the batch's mean cell
    losses and descends on ``sum_u q_u L_u`` (the update of :func:`fairopt.losses.group_dro`,
    with ``step_size`` and ``C`` traced; cells absent from the batch keep their weight up to the
    normalisation).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits [B, K]``.
      optimizer: a factory ``learning_rate -> optax.GradientTransformation``, a ready
        transformation or None (``optax.adam``).
      num_classes: K >= 2.
      num_groups: G >= 1.
      step_size: DRO step ``eta`` (default 0.01, SPEC §1).
      cell_counts: ``[K, G]`` training counts, needed when ``generalization_adjustment > 0``.
      generalization_adjustment: ``C`` (default 0).
      learning_rate: the primal step (with an optimiser factory).

    ``step_size``, ``generalization_adjustment`` and ``learning_rate`` are the defaults of
    ``init``'s :class:`GroupDROHyperparams`.

    Returns:
      A :class:`fairopt.train.Solver`; ``step`` consumes a :class:`fairopt.train.Batch` and
      reports ``loss`` (mean CE), ``robust_loss`` and ``worst_cell_weight``.
    """
    for name, value, minimum in (("num_classes", num_classes, 2), ("num_groups", num_groups, 1)):
        if not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    default = group_dro_hyperparams(learning_rate, step_size, generalization_adjustment)
    num_cells = num_classes * num_groups
    if cell_counts is not None:
        counts = np.asarray(cell_counts)
        if counts.shape != (num_classes, num_groups):
            raise ValueError(
                f"cell_counts must have shape [K, G] = ({num_classes}, {num_groups}) (Dataset.cell_counts), "
                f"got {counts.shape}"
            )
        # cell id y * G + a; empty cells: no adjustment blow-up
        inverse_sqrt = jnp.asarray(1.0 / np.sqrt(np.maximum(counts.reshape(-1), 1)), jnp.float32)
    else:
        if generalization_adjustment > 0:
            raise ValueError("group_dro: generalization_adjustment > 0 needs cell_counts=[K, G] (n_{y,g})")
        inverse_sqrt = jnp.zeros((num_cells,), jnp.float32)
    factory = as_optimizer_factory(optimizer)

    def objective(params, dro_state, batch: Batch, h: GroupDROHyperparams):
        per_example = losses.cross_entropy(apply_fn(params, batch.x), batch.y)
        cells = batch.y * num_groups + batch.groups
        cell_losses, cell_counts_in_batch = losses.group_mean_losses(per_example, cells, num_cells, batch.mask)
        exponent = h.step_size * (jax.lax.stop_gradient(cell_losses) + h.generalization_adjustment * inverse_sqrt)
        exponent = jnp.where(cell_counts_in_batch > 0, exponent, 0.0)
        dro_state = losses.GroupDROState(jax.nn.log_softmax(dro_state.log_weights + exponent))
        robust_loss = jnp.dot(jax.lax.stop_gradient(dro_state.weights), cell_losses)
        return robust_loss, (dro_state, masked_mean(per_example, batch.mask))

    def init(key, params, hyperparams: GroupDROHyperparams | None = None):
        del key
        hyperparams = sweep.as_hyperparams(hyperparams, GroupDROHyperparams, default)
        log_weights = jnp.full((num_cells,), -np.log(num_cells), jnp.float32)
        return GroupDROSolverState(
            params, factory(hyperparams.learning_rate).init(params), losses.GroupDROState(log_weights),
            jnp.zeros((), jnp.int32), hyperparams,
        )

    def step(state: GroupDROSolverState, batch: Batch):
        batch = check_batch(batch, "group DRO")
        h = default if state.hyperparams is None else state.hyperparams
        (robust_loss, (dro_state, loss)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, state.dro, batch, h
        )
        updates, opt_state = factory(h.learning_rate).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "robust_loss": robust_loss, "worst_cell_weight": jnp.max(dro_state.weights)}
        return GroupDROSolverState(params, opt_state, dro_state, state.step + 1, state.hyperparams), metrics

    def predict(state: GroupDROSolverState, x):
        return jax.nn.softmax(apply_fn(state.params, x), axis=-1)

    def check_data(x, y, groups):
        check_group_ids(groups, num_groups, what="the group DRO training groups")

    return Solver(init, step, predict, check_data)
