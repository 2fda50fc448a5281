"""Empirical risk minimisation with any per-example loss (ERM, BERM, LA, LDAM-DRW, ...).

The fixed-loss baselines of all three papers share this solver; only the per-example loss
changes (see :func:`fairopt.losses.make_loss`):

    min_theta  (1 / |B|) sum_{i in B} w_{y_i(, a_i)} l(f_theta(x_i), y_i, a_i; epoch)

where the loss may depend on the epoch (deferred re-weighting switches class weights on at a
given epoch) and ``w`` are the *class weights* of :class:`ERMHyperparams` (ones by default).

**Hyperparameters as data.** The numbers (the learning rate and the class weights) are an
:class:`ERMHyperparams` pytree that ``init`` stores in the state and ``step`` reads from there,
so ERM and balanced ERM (class weights ``∝ 1/n_k``) are one compiled program, and
``jax.vmap(solver.init)`` over a stack of hyperparameters (:func:`fairopt.sweep.stack`) trains
several settings at once. The learning rate is traced only when ``optimizer`` is a *factory*
``learning_rate -> optax.GradientTransformation`` (e.g. ``optax.adam``); a ready
``GradientTransformation`` (``optax.adam(1e-3)``) is used as it is and the hyperparameter's
learning rate then has no effect.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fairopt import sweep
from fairopt.losses import masked_mean
from fairopt.train import Batch, Solver

PerExampleLoss = Callable[..., jax.Array]  # (logits, labels, groups, epoch) -> [B]
OptimizerFactory = Callable[[jax.Array], optax.GradientTransformation]

DEFAULT_LEARNING_RATE = 1e-3


class ERMHyperparams(NamedTuple):
    """The traced numbers of :func:`erm` / :func:`batch_objective_erm`.

    ``class_weights`` multiply the per-example loss: a scalar (the same weight for every row;
    default 1), ``[K]`` (indexed by the label: balanced ERM with ``w_k ∝ 1/n_k``) or ``[K, G]``
    (indexed by label and group: cell re-weighting ``∝ 1/n_{y,g}``). Its *shape* is static (it
    decides the program); its values are traced.
    """

    learning_rate: jax.Array
    class_weights: jax.Array
    loss_params: Any = None  # the numbers of a parametric loss (erm(..., loss_params=...)), else None


def erm_hyperparams(learning_rate: float = DEFAULT_LEARNING_RATE, class_weights=1.0, loss_params=None) -> ERMHyperparams:
    """An :class:`ERMHyperparams` of float32 arrays, validated in Python (before any tracing).

    Raises:
      ValueError: on a learning rate that is not a finite number > 0, or class weights that are
        not finite and >= 0 or have more than two axes.
    """
    if isinstance(learning_rate, (int, float, np.integer, np.floating)) and not (
        np.isfinite(learning_rate) and learning_rate > 0
    ):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}")
    if not isinstance(class_weights, jax.core.Tracer):
        weights = np.asarray(class_weights, np.float64)
        if weights.ndim > 2 or not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError(
                "class_weights must be finite and >= 0, a scalar, [K] (per class) or [K, G] (per class and group), "
                f"got shape {weights.shape}"
            )
    return sweep.as_hyperparams(ERMHyperparams(learning_rate, class_weights, loss_params), ERMHyperparams, None)


def as_optimizer_factory(optimizer, name: str = "optimizer") -> OptimizerFactory:
    """An optimiser slot (:func:`fairopt.sweep.optimizer_factory`); ``None`` gives ``optax.adam``."""
    return sweep.optimizer_factory(optimizer, name, default=optax.adam)


def check_batch(batch, solver_name: str) -> Batch:
    """``batch`` if it is a :class:`fairopt.train.Batch` of consistent shapes, else a TypeError /
    ValueError naming the expected type (runs at trace time: shapes and types only)."""
    if not isinstance(batch, Batch):
        got = type(batch).__name__
        if isinstance(batch, tuple):
            got += "(" + ", ".join(type(part).__name__ for part in batch) + ")"
        raise TypeError(
            f"the {solver_name} step takes a fairopt.train.Batch(x [B, ...], y [B], groups [B], mask [B]) "
            f"(fairopt.train.make_epoch_fn and fit build them); got {got}"
        )
    rows = jnp.shape(batch.x)[0] if jnp.ndim(batch.x) >= 1 else None
    for name in ("y", "groups", "mask"):
        shape = jnp.shape(getattr(batch, name))
        if shape != (rows,):
            raise ValueError(
                f"the {solver_name} step: Batch.{name} must have shape [B] = ({rows},) like the rows of Batch.x "
                f"{jnp.shape(batch.x)}, got {shape}"
            )
    return batch


def example_weights(class_weights: jax.Array, labels: jax.Array, groups: jax.Array) -> jax.Array:
    """The weight of every row: ``w``, ``w[y]`` or ``w[y, a]`` by the rank of ``class_weights``."""
    if class_weights.ndim == 0:
        return jnp.broadcast_to(class_weights, labels.shape)
    if class_weights.ndim == 1:
        return class_weights[labels]
    return class_weights[labels, groups]


class ERMState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimisation steps taken
    hyperparams: ERMHyperparams | None = None


def erm(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    loss_fn: PerExampleLoss,
    optimizer=None,
    *,
    steps_per_epoch: int = 1,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    class_weights=1.0,
    loss_params=None,
) -> Solver:
    """ERM solver: one optimizer step on the masked mean of ``w * loss_fn`` per batch.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits [B, K]``.
      loss_fn: per-example loss ``loss_fn(logits, labels, groups, epoch) -> [B]``.
      optimizer: a factory ``learning_rate -> optax.GradientTransformation`` (``optax.adam``;
        the learning rate is then a traced hyperparameter), a ready transformation
        (``optax.adam(1e-3)``, used as is), or None (``optax.adam``).
      steps_per_epoch: batches per epoch, so that ``epoch = step // steps_per_epoch`` can be
        passed to epoch-dependent losses (DRW). Static.
      learning_rate, class_weights: the defaults of ``init``'s ``hyperparams``
        (:func:`erm_hyperparams`).
      loss_params: None, or the default numbers of a *parametric* loss (a pytree of arrays, e.g.
        LA's ``tau log pi``): ``loss_fn`` is then called as ``loss_fn(logits, labels, groups,
        epoch, loss_params)`` with the ``loss_params`` of the state's hyperparameters, so a
        sweep over a loss's knobs (LA tau, CDT gamma, LDAM margins) is one compiled program.

    Returns:
      A :class:`fairopt.train.Solver`: ``init(key, params, hyperparams=None)`` (an
      :class:`ERMHyperparams`, stored in the state), ``step(state, batch)`` consuming a
      :class:`fairopt.train.Batch` (anything else is a TypeError naming it), ``predict``.
    """
    if not isinstance(steps_per_epoch, (int, np.integer)) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    factory = as_optimizer_factory(optimizer)
    default = erm_hyperparams(learning_rate, class_weights, loss_params)
    parametric = loss_params is not None

    def init(key, params, hyperparams: ERMHyperparams | None = None):
        del key
        hyperparams = sweep.as_hyperparams(hyperparams, ERMHyperparams, default)
        if (hyperparams.loss_params is None) == parametric:
            raise ValueError("hyperparams.loss_params must be given exactly when the solver was built with loss_params "
                             f"(this solver: loss_params={'given' if parametric else 'None'})")
        opt_state = factory(hyperparams.learning_rate).init(params)
        return ERMState(params, opt_state, jnp.zeros((), jnp.int32), hyperparams)

    def objective(params, batch: Batch, epoch, hyperparams: ERMHyperparams):
        logits = apply_fn(params, batch.x)
        extra = (hyperparams.loss_params,) if parametric else ()
        per_example = loss_fn(logits, batch.y, batch.groups, epoch, *extra)
        return masked_mean(per_example * example_weights(hyperparams.class_weights, batch.y, batch.groups), batch.mask)

    def step(state: ERMState, batch: Batch):
        batch = check_batch(batch, "ERM")
        hyperparams = default if state.hyperparams is None else state.hyperparams
        epoch = state.step // steps_per_epoch
        loss, grads = jax.value_and_grad(objective)(state.params, batch, epoch, hyperparams)
        updates, opt_state = factory(hyperparams.learning_rate).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return ERMState(params, opt_state, state.step + 1, state.hyperparams), {"loss": loss}

    def predict(state: ERMState, x):
        return jax.nn.softmax(apply_fn(state.params, x), axis=-1)

    return Solver(init, step, predict)


def batch_objective_erm(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    objective: Callable[..., jax.Array],
    optimizer=None,
    *,
    learning_rate: float = DEFAULT_LEARNING_RATE,
) -> Solver:
    """ERM on a *batch-level* objective of the per-example cross-entropies:

        min_theta  objective(CE(f_theta(x_i), y_i)_{i in B}, y_B, a_B, mask_B)

    for the objectives that are not a mean of per-example losses — CE_deo (AutoBalance eq. 4.1),
    the blend ``(1 - lambda) CE + lambda CE_deo``, CE_bal, CE_bal^G
    (:func:`fairopt.losses.make_validation_objective` builds them).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits [B, K]``.
      objective: ``objective(per_example_ce [B], labels, groups, mask) -> scalar``.
      optimizer: as in :func:`erm`.
      learning_rate: the default learning rate of ``init``'s ``hyperparams`` (the class weights
        of :class:`ERMHyperparams` multiply the per-example cross-entropies).

    Returns:
      A :class:`fairopt.train.Solver` with :class:`ERMState` states.
    """
    factory = as_optimizer_factory(optimizer)
    default = erm_hyperparams(learning_rate)

    def init(key, params, hyperparams: ERMHyperparams | None = None):
        del key
        hyperparams = sweep.as_hyperparams(hyperparams, ERMHyperparams, default)
        return ERMState(params, factory(hyperparams.learning_rate).init(params), jnp.zeros((), jnp.int32), hyperparams)

    def loss(params, batch: Batch, weights):
        per_example = optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, batch.x), batch.y)
        per_example = per_example * example_weights(weights, batch.y, batch.groups)
        return objective(per_example, batch.y, batch.groups, batch.mask)

    def step(state: ERMState, batch: Batch):
        batch = check_batch(batch, "batch-objective ERM")
        hyperparams = default if state.hyperparams is None else state.hyperparams
        value, grads = jax.value_and_grad(loss)(state.params, batch, hyperparams.class_weights)
        updates, opt_state = factory(hyperparams.learning_rate).update(grads, state.opt_state, state.params)
        state = ERMState(optax.apply_updates(state.params, updates), opt_state, state.step + 1, state.hyperparams)
        return state, {"loss": value}

    def predict(state: ERMState, x):
        return jax.nn.softmax(apply_fn(state.params, x), axis=-1)

    return Solver(init, step, predict)
