"""Empirical risk minimisation with any per-example loss (ERM, BERM, LA, LDAM-DRW, ...).

The fixed-loss baselines of all three papers share this solver; only the per-example loss
changes (see :func:`fairopt.losses.make_loss`):

    min_theta  (1 / |B|) sum_{i in B} l(f_theta(x_i), y_i, a_i; epoch)

where the loss may depend on the epoch (deferred re-weighting switches class weights on at a
given epoch).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fairopt.losses import masked_mean
from fairopt.train import Batch, Solver

PerExampleLoss = Callable[..., jax.Array]  # (logits, labels, groups, epoch) -> [B]


class ERMState(NamedTuple):
    params: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimisation steps taken


def erm(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    loss_fn: PerExampleLoss,
    optimizer: optax.GradientTransformation,
    *,
    steps_per_epoch: int = 1,
) -> Solver:
    """ERM solver: one optimizer step on the masked mean of ``loss_fn`` per batch.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits [B, K]``.
      loss_fn: per-example loss ``loss_fn(logits, labels, groups, epoch) -> [B]``.
      optimizer: an optax transformation.
      steps_per_epoch: batches per epoch, so that ``epoch = step // steps_per_epoch`` can be
        passed to epoch-dependent losses (DRW).

    Returns:
      A :class:`fairopt.train.Solver` whose ``step`` consumes :class:`fairopt.train.Batch`.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")

    def init(key, params):
        del key
        return ERMState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

    def objective(params, batch: Batch, epoch):
        logits = apply_fn(params, batch.x)
        return masked_mean(loss_fn(logits, batch.y, batch.groups, epoch), batch.mask)

    def step(state: ERMState, batch: Batch):
        epoch = state.step // steps_per_epoch
        loss, grads = jax.value_and_grad(objective)(state.params, batch, epoch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return ERMState(params, opt_state, state.step + 1), {"loss": loss}

    def predict(state: ERMState, x):
        return jax.nn.softmax(apply_fn(state.params, x), axis=-1)

    return Solver(init, step, predict)


def batch_objective_erm(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    objective: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
) -> Solver:
    """ERM on a *batch-level* objective of the per-example cross-entropies:

        min_theta  objective(CE(f_theta(x_i), y_i)_{i in B}, y_B, a_B, mask_B)

    for the objectives that are not a mean of per-example losses — CE_deo (AutoBalance eq. 4.1),
    the blend ``(1 - lambda) CE + lambda CE_deo``, CE_bal, CE_bal^G
    (:func:`fairopt.losses.make_validation_objective` builds them).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits [B, K]``.
      objective: ``objective(per_example_ce [B], labels, groups, mask) -> scalar``.
      optimizer: an optax transformation.

    Returns:
      A :class:`fairopt.train.Solver` with :class:`ERMState` states.
    """

    def init(key, params):
        del key
        return ERMState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

    def loss(params, batch: Batch):
        per_example = optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, batch.x), batch.y)
        return objective(per_example, batch.y, batch.groups, batch.mask)

    def step(state: ERMState, batch: Batch):
        value, grads = jax.value_and_grad(loss)(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return ERMState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), {"loss": value}

    def predict(state: ERMState, x):
        return jax.nn.softmax(apply_fn(state.params, x), axis=-1)

    return Solver(init, step, predict)
