r"""FairALM: augmented Lagrangian training of fair classifiers (Lokhande et al., ECCV 2020).

The problem (paper eq. 2) is risk minimisation under a fairness equality constraint
``d_h = mu_h^{s0} - mu_h^{s1} = 0`` on group-conditional rates ``mu^s`` (DEO: the FNR on
``y = 1``; DP; equalised odds; predictive parity — see :mod:`fairopt.solvers.constrained`).
FairALM plays the game of the augmented Lagrangian (paper eq. 4)

    L_T(q, lambda) = sum_i q_i e_{h_i} + lambda sum_i q_i d_{h_i} - (1 / 2 eta) (lambda - lambda_T)^2

between a hypothesis player ``q`` (best response) and a multiplier player ``lambda``
(follow-the-leader on the rewards ``f_t(lambda) = lambda r_t - (1/2eta)(lambda - lambda_t)^2``,
Lemma 2).

* :func:`fairalm_finite` — **Alg. 1** (finite hypothesis set; "linear classifier" because the
  q-player's problem is a linear program over the simplex): best response
  ``h_t = argmin_i e_i + lambda_t d_i``, dual ``lambda_{t+1} = lambda_t + eta d_{h_t} / t``.
  That update *is* follow-the-leader: ``argmax_lambda sum_{s<=t} f_s(lambda)`` is
  ``mean_{s<=t} lambda_s + eta mean_{s<=t} r_s``, and subtracting the same identity at ``t - 1``
  gives ``lambda_{t+1} = lambda_t + eta r_t / t``. The average play ``q_bar`` is the
  approximate saddle point of Theorem 3.
* :func:`fairalm` — **Alg. 2** (deep networks): per batch, descend on the smooth surrogate of
  ``e_hat + (lambda + eta) mu^{s0} - (lambda - eta) mu^{s1}``, then
  ``lambda <- lambda + eta (mu^{s0} - mu^{s1})`` at the new weights.

**G >= 2 groups and several constraints.** Each rate atom ``c`` (e.g. FNR and FPR for
equalised odds) and group ``g`` gets a multiplier ``lambda_{c,g}`` for the constraint
``d_{c,g} = mu_c^g - mean_{h != g} mu_c^h = 0`` (:func:`fairopt.solvers.constrained.group_deviations`),
and the primal objective of Alg. 2 becomes

    e_hat + sum_c [ (1/2) sum_g lambda_{c,g} d_{c,g} + eta sum_g mu_c^g ]

(for groups present in the batch). Since ``(1/2) sum_g (mu^g + mean_{h != g} mu^h) =
sum_g mu^g``, the second term is the paper's upper bound ``eta (mu^{s0} + mu^{s1})`` of
``eta |d|`` applied to every per-group constraint with weight 1/2. With two groups,
``d_{c,1} = -d_{c,0}`` and the multipliers stay antisymmetric from ``lambda_0 = 0``, so
``lambda_{c,0}`` follows exactly the paper's single ``lambda`` and the objective equals
``e_hat + (lambda + eta) mu^{s0} - (lambda - eta) mu^{s1}``.

**Deviations from the official code** (``lokhande-vishnu/FairALM``, Experiments-CelebA):

* The official code keeps two multipliers and updates them as
  ``lam0 = 0.5 (lam0 - lam1) + 0.5 eta d; lam1 = 0.5 (lam1 - lam0_new) - 0.5 eta d`` and
  descends on ``CE + (eta/4 + (lam0 - lam1)/2) mu^{s0} + (eta/4 + (lam1 - lam0)/2) mu^{s1}``:
  the paper's objective with ``lambda`` halved, ``eta`` quartered and a dual update that
  decays the multiplier and reuses the freshly updated ``lam0``. fairopt follows the paper's
  Alg. 2 (``lambda += eta d``); pass a smaller ``eta`` to mimic the official scale.
* The official dual step uses the surrogate rates of the last inner iterate *before* its
  update; fairopt evaluates them at the new weights ``w_t`` as Alg. 2 line 8 says (one extra
  forward pass per batch).
* The official eta grows ×1.01 at the start of every epoch (the first epoch uses 20.2);
  fairopt's epoch ``e`` (from 0) uses ``eta * eta_growth ** e``.
* Alg. 1 line 6 divides by ``t`` with ``t`` starting at 0; fairopt counts rounds from 1.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fairopt.solvers.constrained import (
    ConstrainedHyperparams,
    ConstrainedState,
    build_constrained_solver,
    check_numbers,
    constrained_hyperparams,
    constraint_atoms,
    dual_ascent,
    group_deviations,
    hard_group_rates,
    lagrangian_term,
)
from fairopt.solvers.erm import DEFAULT_LEARNING_RATE
from fairopt.train import Solver

__all__ = [
    "ConstrainedHyperparams",
    "ConstrainedState",
    "constrained_hyperparams",
    "FiniteGameResult",
    "AUGMENTATIONS",
    "augmentation_term",
    "fairalm",
    "fairalm_finite",
    "fairalm_objective",
    "hypothesis_statistics",
    "quadratic_augmentation",
]


def augmentation_term(rates: jax.Array, present: jax.Array) -> jax.Array:
    r"""``sum_{c,g} mu_{c,g}`` over groups present when an atom has >= 2 groups present.

    This is the paper's ``mu^{s0} + mu^{s1}`` (the bound of ``|d_h|`` by non-negative
    surrogates) generalised as ``(1/2) sum_g (mu^g + mean_{h != g} mu^h)``; an atom with fewer
    than two groups in the batch has no constraint and contributes 0.
    """
    weight = present.astype(rates.dtype)
    active = jnp.sum(weight, axis=-1, keepdims=True) >= 2
    return jnp.sum(jnp.where(active, rates * weight, 0.0))


def fairalm_objective(
    rates: jax.Array, present: jax.Array, multipliers: jax.Array, eta: jax.Array, tolerance=0.0
) -> jax.Array:
    r"""The constraint part of Alg. 2's primal objective (add ``e_hat`` to it).

    ``(1/2) sum_{c,g} lambda_{c,g} d_{c,g} + eta sum_{c,g} mu_{c,g}``; for two groups and
    ``lambda_{c,1} = -lambda_{c,0} = -lambda`` this is ``(lambda + eta) mu^{s0} - (lambda - eta) mu^{s1}``.

    Args:
      rates: ``[C, G]`` smooth group rates ``mu``.
      present: ``[C, G]`` bool, groups with base rows in the batch.
      multipliers: ``[C, G]`` ``lambda``.
      eta: the current dual step / augmentation weight.
      tolerance: the slack of ``|d| <= tolerance``; it changes only the dual step
        (:func:`fairopt.solvers.constrained.dual_ascent`), not this primal term.

    Returns:
      A scalar.
    """
    del tolerance
    return lagrangian_term(multipliers, group_deviations(rates, present)) + eta * augmentation_term(rates, present)


def quadratic_augmentation(
    rates: jax.Array, present: jax.Array, multipliers: jax.Array, eta: jax.Array, tolerance=0.0
) -> jax.Array:
    r"""The textbook augmented Lagrangian of ``|d_{c,g}| <= tolerance`` (method of multipliers).

        (1/2) sum_{c,g} (1 / (2 eta)) max(|lambda_{c,g} + eta d_{c,g}| - eta tol, 0)^2

    Its derivative in ``d`` is the multiplier after the dual step,
    ``S(lambda + eta d, eta tol)`` (:func:`fairopt.solvers.constrained.dual_ascent`), so primal
    and dual play the same proximal-point game. With ``tol = 0`` it is
    ``(1/2) sum (lambda d + (eta / 2) d^2)`` up to a constant: the Hestenes–Powell augmented
    Lagrangian, whose quadratic term damps the oscillation of plain descent–ascent and, unlike
    the paper's ``eta sum_g mu^g``, does not pull every rate towards 0 (so the solution does not
    move with ``eta``). ``eta = 0`` gives 0.
    """
    deviations = group_deviations(rates, present)
    raised = jnp.abs(multipliers + eta * deviations) - eta * tolerance
    return 0.5 * jnp.sum(jnp.maximum(raised, 0.0) ** 2) / (2.0 * jnp.maximum(eta, 1e-12))


AUGMENTATIONS = {"paper": fairalm_objective, "quadratic": quadratic_augmentation}


def fairalm(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    optimizer=None,
    *,
    constraints: str | Sequence[str] = "deo",
    num_groups: int = 2,
    positive_class: int = 1,
    surrogate: str = "cross_entropy",
    eta: float = 20.0,
    eta_growth: float = 1.01,
    inner_steps: int = 5,
    steps_per_epoch: int = 1,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    augmentation: str = "paper",
) -> Solver:
    r"""FairALM for deep (or any differentiable) models — paper Alg. 2.

    For each batch ``z``, with ``eta_t = eta * eta_growth ** epoch``:

    1. ``inner_steps`` times: ``w <- optimizer step`` on
       ``e_hat(w; z) + (1/2) sum_{c,g} lambda_{c,g} d_{c,g}(w; z) + eta_t sum_{c,g} mu_{c,g}(w; z)``
       (two groups: ``e_hat + (lambda + eta) mu^{s0} - (lambda - eta) mu^{s1}``);
    2. ``lambda_{c,g} <- lambda_{c,g} + eta_t d_{c,g}(w_t; z)`` (soft-thresholded by
       ``eta_t * tolerance`` when the ``tolerance`` hyperparameter is > 0:
       :func:`fairopt.solvers.constrained.dual_ascent`).

    ``e_hat`` is the mean cross-entropy; ``mu`` are the smooth group rates of
    :func:`fairopt.solvers.constrained.smooth_group_rates` (for DEO: the mean CE of the
    positives of each group, as the official code). Groups or atoms empty in a batch drop out
    of both the objective and the dual step (no NaN).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits [B, K]``.
      optimizer: the primal step (official: SGD with step 0.01, batch 256): a factory
        ``learning_rate -> optax.GradientTransformation`` such as ``optax.sgd`` (the learning
        rate is then a traced hyperparameter), a ready transformation (``optax.sgd(0.01)``, used
        as is) or None (``optax.adam``).
      constraints: one or several of ``"deo"``, ``"fpr"``, ``"eo"``, ``"dp"``, ``"pp"``.
      num_groups: G >= 2 (static).
      positive_class: the class whose rates are equalised.
      surrogate: ``"cross_entropy"`` (official, unbounded), ``"probability"`` or ``"ramp"`` (bounded).
      eta: dual step size and augmentation weight (official: 20).
      eta_growth: per-epoch growth of eta (official: 1.01; 1.0 keeps it constant).
      inner_steps: primal steps per batch (official: 5).
      steps_per_epoch: batches per epoch, so that eta grows once per epoch.
      learning_rate: the primal step when ``optimizer`` is a factory.
      augmentation: the primal objective's constraint term: ``"paper"`` (Alg. 2,
        :func:`fairalm_objective`) or ``"quadratic"`` (the textbook augmented Lagrangian,
        :func:`quadratic_augmentation`: it converges to the constrained optimum for any
        ``eta``, where the paper's ``eta sum_g mu^g`` moves every rate towards 0 as ``eta``
        grows — with G > 2 groups and large ``eta`` that is the accuracy collapse of issue 15).

    ``eta``, ``eta_growth`` and ``learning_rate`` are only the defaults of ``init``'s
    ``hyperparams`` (:class:`ConstrainedHyperparams`, kept in the state): pass
    ``init(key, params, constrained_hyperparams(eta=...))`` — or a stack of them under
    ``jax.vmap`` — to change them without compiling again. Everything else is static.

    Returns:
      A :class:`fairopt.train.Solver` with state :class:`ConstrainedState`; ``step`` takes a
      :class:`fairopt.train.Batch` and reports ``loss``, ``objective``, ``constraint_gap``,
      ``multiplier`` and ``eta``; ``check_data(x, y, groups)`` rejects group ids outside
      ``[0, num_groups)`` (:func:`fairopt.train.fit` calls it before training).

    Raises:
      ValueError: on an unknown constraint/surrogate/augmentation, ``num_groups < 2``, ``eta < 0``,
        ``eta_growth <= 0``, ``inner_steps < 1`` or ``steps_per_epoch < 1``.
    """

    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {augmentation!r}")
    return build_constrained_solver(
        apply_fn,
        optimizer,
        primal_penalty=AUGMENTATIONS[augmentation],
        dual_step=dual_ascent,
        constraints=constraints,
        num_groups=num_groups,
        positive_class=positive_class,
        surrogate=surrogate,
        eta=eta,
        eta_growth=eta_growth,
        inner_steps=inner_steps,
        steps_per_epoch=steps_per_epoch,
        learning_rate=learning_rate,
        solver_name="FairALM",
    )


class FiniteGameResult(NamedTuple):
    """Trajectory of Alg. 1 over ``T`` rounds on ``N`` hypotheses."""

    choices: jax.Array  # int32 [T]: best responses h_t
    multipliers: jax.Array  # [T + 1, C, G]: lambda_1 .. lambda_{T+1}
    average_play: jax.Array  # [N]: q_bar, the frequency of each hypothesis among the choices
    final_choice: jax.Array  # int32 scalar: h_T (the paper's output)


def hypothesis_statistics(
    predictions: jax.Array,
    labels: jax.Array,
    groups: jax.Array,
    *,
    constraints: str | Sequence[str] = "deo",
    num_groups: int = 2,
    positive_class: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Error rates and exact group rates of a finite hypothesis set, the inputs of Alg. 1.

    Args:
      predictions: ``[N, n]`` predicted labels of the ``N`` hypotheses on ``n`` rows (e.g. a
        linear score thresholded at several offsets, or several fitted linear classifiers).
      labels: ``[n]`` labels.
      groups: ``[n]`` groups in ``[0, num_groups)``.
      constraints: see :func:`fairopt.solvers.constrained.constraint_atoms`.
      num_groups: G >= 2.
      positive_class: the class whose rates are equalised.

    Returns:
      ``(errors [N], rates [C, N, G], present [C, N, G])``: misclassification rates ``e_h``
      and the 0/1 conditional rates ``mu_h^g`` (FNR for DEO, ...).

    Raises:
      ValueError: on shape mismatches or bad constraint names.
    """
    predictions = jnp.asarray(predictions)
    labels = jnp.asarray(labels)
    groups = jnp.asarray(groups)
    if predictions.ndim != 2:
        raise ValueError(f"predictions must be [N hypotheses, n rows], got shape {predictions.shape}")
    if labels.shape != (predictions.shape[1],) or groups.shape != labels.shape:
        raise ValueError(
            f"labels and groups must be [n] with n = predictions.shape[1] = {predictions.shape[1]}, "
            f"got {labels.shape} and {groups.shape}"
        )
    if not isinstance(num_groups, (int, np.integer)) or num_groups < 2:
        raise ValueError(f"num_groups must be an integer >= 2, got {num_groups!r}")
    atoms = constraint_atoms(constraints)
    errors = jnp.mean((predictions != labels[None, :]).astype(jnp.float32), axis=1)

    def one(prediction):
        return hard_group_rates(
            prediction, labels, groups, atoms=atoms, num_groups=num_groups, positive_class=positive_class
        )

    rates, present = jax.vmap(one)(predictions)  # [N, C, G]
    return errors, jnp.moveaxis(rates, 0, 1), jnp.moveaxis(present, 0, 1)


def fairalm_finite(
    errors: jax.Array,
    rates: jax.Array,
    present: jax.Array | None = None,
    *,
    eta: float,
    num_rounds: int,
) -> FiniteGameResult:
    r"""FairALM for a finite hypothesis set — paper Alg. 1, jitted with ``lax.scan``.

    For rounds ``t = 1 .. T`` (``lambda_1 = 0``):

    * primal best response ``h_t = argmin_i e_i + (1/2) sum_{c,g} lambda_{t,c,g} d_{c,g}(h_i)``
      (two groups: ``argmin_i e_i + lambda_t (mu_i^{s0} - mu_i^{s1})``);
    * dual follow-the-leader ``lambda_{t+1} = lambda_t + eta d(h_t) / t``.

    ``d`` are the per-group deviations of :func:`fairopt.solvers.constrained.group_deviations`.
    Ties in the argmin go to the lowest index.

    Args:
      errors: ``[N]`` misclassification rates ``e_h``.
      rates: ``[C, N, G]`` (or ``[N, G]`` for one atom) conditional rates ``mu_h^g``.
      present: same shape as ``rates``, bool (None: all present).
      eta: dual step size > 0.
      num_rounds: T >= 1 (static).

    Returns:
      :class:`FiniteGameResult`; ``average_play`` is ``q_bar`` (Theorem 3: an approximate
      saddle point of the constrained problem over distributions on the hypotheses).

    Raises:
      ValueError: on inconsistent shapes, ``eta <= 0`` or ``num_rounds < 1``.
    """
    errors = jnp.asarray(errors, jnp.float32)
    rates = jnp.asarray(rates, jnp.float32)
    if rates.ndim == 2:
        rates = rates[None]
    present = jnp.ones(rates.shape, bool) if present is None else jnp.asarray(present, bool).reshape(rates.shape)
    if errors.ndim != 1 or rates.ndim != 3 or rates.shape[1] != errors.shape[0]:
        raise ValueError(
            f"errors must be [N] and rates [C, N, G] (or [N, G]) with the same N; got {errors.shape} and {rates.shape}"
        )
    if rates.shape[2] < 2:
        raise ValueError(f"rates must have G >= 2 groups in the last axis, got shape {rates.shape}")
    check_numbers(eta=eta)  # Python numbers only: a traced eta (jax.vmap over a grid) is not checked
    if not isinstance(eta, jax.core.Tracer) and not eta > 0:
        raise ValueError(f"eta must be a finite number > 0, got {eta!r}")
    if not isinstance(num_rounds, (int, np.integer)) or num_rounds < 1:
        raise ValueError(f"num_rounds must be an integer >= 1, got {num_rounds!r}")
    return _finite_game(errors, rates, present, jnp.asarray(eta, jnp.float32), int(num_rounds))


@functools.partial(jax.jit, static_argnames="num_rounds")
def _finite_game(errors, rates, present, eta, num_rounds):
    deviations = group_deviations(rates, present)  # [C, N, G]
    num_hypotheses = errors.shape[0]

    def round_(multipliers, t):
        lagrangian = errors + 0.5 * jnp.einsum("cg,cng->n", multipliers, deviations)
        choice = jnp.argmin(lagrangian)
        multipliers = multipliers + eta * deviations[:, choice, :] / t
        return multipliers, (choice, multipliers)

    start = jnp.zeros((rates.shape[0], rates.shape[2]), jnp.float32)
    rounds = jnp.arange(1, num_rounds + 1, dtype=jnp.float32)
    _, (choices, multipliers) = jax.lax.scan(round_, start, rounds)
    counts = jnp.zeros((num_hypotheses,), jnp.float32).at[choices].add(1.0)
    return FiniteGameResult(
        choices=choices.astype(jnp.int32),
        multipliers=jnp.concatenate([start[None], multipliers]),
        average_play=counts / num_rounds,
        final_choice=choices[-1].astype(jnp.int32),
    )
