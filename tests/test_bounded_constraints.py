"""Bounded rate surrogates, the constraint tolerance and convergence with G > 2 groups (issue 15)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fairopt.solvers import constrained
from fairopt.solvers.constrained import FairnessConfig, dual_ascent, penalty_term, smooth_group_rates
from fairopt.solvers.fairalm import fairalm
from fairopt.train import Batch, full_batch_steps

ATOMS = ("deo", "fpr", "dp", "pp")


def extreme_logits():
    # p = 0 and p = 1 exactly in float32 (a margin of +-200), and a moderate row of each label.
    margins = jnp.asarray([-200.0, 200.0, -200.0, 200.0, 0.3, -0.3])
    return jnp.stack([jnp.zeros_like(margins), margins], axis=1)


@pytest.mark.parametrize("surrogate", ["probability", "ramp"])
def test_bounded_surrogates_have_finite_gradients_at_p_0_and_1(surrogate):
    logits = extreme_logits()
    p = jax.nn.softmax(logits)[:, 1]
    assert float(p[0]) == 0.0 and float(p[1]) == 1.0
    labels = jnp.asarray([0, 0, 1, 1, 0, 1])
    groups = jnp.asarray([0, 1, 0, 1, 0, 1])

    def total(logits):
        rates, _ = smooth_group_rates(logits, labels, groups, atoms=ATOMS, num_groups=2, surrogate=surrogate)
        return jnp.sum(rates), rates

    (value, rates), grads = jax.value_and_grad(total, has_aux=True)(logits)
    assert np.all(np.isfinite(np.asarray(grads))) and np.isfinite(float(value))
    assert np.all((np.asarray(rates) >= 0.0) & (np.asarray(rates) <= 1.0))
    # ...where the cross-entropy surrogate is unbounded: -log(1 - p) at p = 1 is the margin, 200.
    ce_rates, _ = smooth_group_rates(logits[1:2], labels[1:2], groups[1:2], atoms=("dp",), num_groups=2,
                                     surrogate="cross_entropy")
    assert float(ce_rates[0, 1]) == pytest.approx(200.0, rel=1e-4)


def test_ramp_is_the_clipped_hinge_of_the_margin():
    margins = jnp.asarray([-3.0, -0.5, 0.0, 0.5, 3.0])
    logits = jnp.stack([jnp.zeros_like(margins), margins], axis=1)
    ones = jnp.ones(5, jnp.int32)

    def dp_rate(logits, row):  # one row per group: mu^g is that row's score
        rates, _ = smooth_group_rates(logits, ones, jnp.arange(5), atoms=("dp", "deo"), num_groups=5, surrogate="ramp")
        return rates[:, row]

    rates = np.asarray(jax.vmap(lambda row: dp_rate(logits, row))(jnp.arange(5)))
    np.testing.assert_allclose(rates[:, 0], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)  # clip((1 + m) / 2)
    np.testing.assert_allclose(rates[:, 1], 1.0 - rates[:, 0], atol=1e-6)  # the FNR score: clip((1 - m) / 2)
    slope = np.asarray([jax.grad(lambda lg: dp_rate(lg, i)[0])(logits)[i, 1] for i in range(5)])
    np.testing.assert_allclose(slope, [0.0, 0.5, 0.5, 0.5, 0.0], atol=1e-6)


def test_unknown_surrogate_is_named():
    with pytest.raises(ValueError, match="surrogate must be one of cross_entropy, probability, ramp"):
        smooth_group_rates(extreme_logits(), jnp.zeros(6, int), jnp.zeros(6, int), atoms=("dp",), num_groups=2,
                           surrogate="hinge")


def test_dual_ascent_is_a_soft_thresholded_gradient_step():
    multipliers = jnp.asarray([1.0, -1.0, 0.0, 0.05])
    deviations = jnp.asarray([0.2, 0.2, -0.05, -0.3])
    np.testing.assert_allclose(dual_ascent(multipliers, deviations, 2.0), multipliers + 2.0 * deviations)
    # u = lambda + 2 d = [1.4, -0.6, -0.1, -0.55]; shrink |u| by 2 * 0.1 = 0.2
    np.testing.assert_allclose(dual_ascent(multipliers, deviations, 2.0, 0.1), [1.2, -0.4, 0.0, -0.35], atol=1e-6)


def test_penalty_term_charges_only_the_violation_of_the_tolerance():
    deviations = jnp.asarray([0.3, -0.3, 0.05])
    assert float(penalty_term(deviations)) == pytest.approx(0.5 * (0.09 + 0.09 + 0.0025))
    assert float(penalty_term(deviations, 0.1)) == pytest.approx(0.5 * (0.04 + 0.04))


def test_fairness_config_rejects_a_negative_tolerance():
    with pytest.raises(ValueError, match="FairnessConfig.tolerance must be >= 0"):
        FairnessConfig(tolerance=-0.1)
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        constrained.constrained_hyperparams(tolerance=-1.0)


def three_group_problem():
    """One logit per group (the model is a per-group bias), positive rates .2 / .5 / .7.

    Under demographic parity the constrained optimum is known: the cross-entropy of a common
    positive rate p is minimised by the overall base rate, so every group's p is ``mean(y)``.
    """
    sizes, base_rates = (300, 200, 100), (0.2, 0.5, 0.7)
    groups = np.repeat(np.arange(3), sizes).astype(np.int32)
    labels = np.concatenate([(np.arange(n) < r * n).astype(np.int32) for r, n in zip(base_rates, sizes)])
    features = np.eye(3, dtype=np.float32)[groups]

    def apply_fn(params, x):
        return jnp.stack([jnp.zeros(x.shape[0]), x @ params], axis=1)

    return apply_fn, features, labels, groups


def train_quadratic_fairalm(eta, tolerance, steps=800):
    apply_fn, x, y, groups = three_group_problem()
    solver = fairalm(apply_fn, optax.sgd, constraints="dp", num_groups=3, surrogate="probability", inner_steps=1,
                     augmentation="quadratic")
    state = solver.init(None, jnp.zeros(3), constrained.constrained_hyperparams(1.0, eta, 1.0, tolerance))
    run = jax.jit(lambda state: full_batch_steps(solver.step, state, x, y, groups, num_steps=steps))
    state, _ = run(state)
    later, _ = run(state)
    return state, later, y


def test_three_group_multipliers_converge_to_the_known_feasible_optimum():
    solutions = []
    for eta in (0.5, 5.0):
        state, later, labels = train_quadratic_fairalm(eta, 0.0)
        rates = np.asarray(jax.nn.sigmoid(state.params))
        np.testing.assert_allclose(rates, labels.mean(), atol=2e-3)  # the constrained optimum
        np.testing.assert_allclose(later.multipliers, state.multipliers, atol=1e-3)  # the multipliers have converged
        solutions.append(np.asarray(state.multipliers))
    np.testing.assert_allclose(solutions[0], solutions[1], atol=1e-2)  # the same lambda* for every eta


def adam_fairalm_rates(eta, inner_steps, primal_steps=3000):
    """Positive rates after ``primal_steps`` Adam (lr .05) steps of the quadratic FairALM with a
    dual step after every ``inner_steps`` of them: the configuration of benchmarks/fairness_fronts.py."""
    apply_fn, x, y, groups = three_group_problem()
    solver = fairalm(apply_fn, optax.adam, constraints="dp", num_groups=3, surrogate="probability",
                     inner_steps=inner_steps, augmentation="quadratic")
    state = solver.init(None, jnp.zeros(3), constrained.constrained_hyperparams(0.05, eta, 1.0, 0.0))
    state, _ = jax.jit(lambda s: full_batch_steps(solver.step, s, x, y, groups, num_steps=primal_steps // inner_steps))(state)
    return np.asarray(jax.nn.sigmoid(state.params)), y.mean()


@pytest.mark.parametrize("eta", [5.0, 50.0])
def test_adam_with_inner_steps_reaches_the_optimum_at_every_eta(eta):
    """Ten Adam steps per dual step: the same constrained optimum at eta 5 and 50."""
    rates, optimum = adam_fairalm_rates(eta, inner_steps=10)
    np.testing.assert_allclose(rates, optimum, atol=1e-2)


def test_adam_descent_ascent_with_one_inner_step_oscillates_away():
    """The contrast (why the fronts use inner steps): one Adam step per dual step, same budget, eta 5."""
    rates, optimum = adam_fairalm_rates(5.0, inner_steps=1)
    assert np.ptp(rates) > 0.5 and np.max(np.abs(rates - optimum)) > 0.3


def test_three_group_tolerance_is_met_and_binding():
    state, later, _ = train_quadratic_fairalm(2.0, 0.1)
    rates = jax.nn.sigmoid(state.params)
    deviations = np.asarray(constrained.group_deviations(rates, jnp.ones(3, bool)))
    assert np.max(np.abs(deviations)) == pytest.approx(0.1, abs=2e-3)  # |d| <= tol, with the largest one active
    np.testing.assert_allclose(later.params, state.params, atol=1e-4)


def test_paper_augmentation_moves_the_solution_with_eta():
    """Alg. 2's eta sum_g mu^g pulls every positive rate towards 0, more as eta grows (why the
    quadratic augmentation exists): a documented contrast, measured on the same problem."""
    apply_fn, x, y, groups = three_group_problem()
    solver = fairalm(apply_fn, optax.sgd, constraints="dp", num_groups=3, surrogate="probability", inner_steps=1)
    run = jax.jit(lambda state: full_batch_steps(solver.step, state, x, y, groups, num_steps=800))
    small, _ = run(solver.init(None, jnp.zeros(3), constrained.constrained_hyperparams(1.0, 0.5, 1.0)))
    large, _ = run(solver.init(None, jnp.zeros(3), constrained.constrained_hyperparams(1.0, 5.0, 1.0)))
    p_small, p_large = np.asarray(jax.nn.sigmoid(small.params)), np.asarray(jax.nn.sigmoid(large.params))
    assert np.ptp(p_small) < 1e-2 and np.ptp(p_large) < 1e-2  # parity holds...
    assert p_large.mean() < p_small.mean() < y.mean() - 0.1  # ...at a rate far below the optimum


def test_full_batch_steps_equals_repeated_steps_on_the_whole_set():
    apply_fn, x, y, groups = three_group_problem()
    solver = fairalm(apply_fn, optax.sgd, constraints="dp", num_groups=3, surrogate="ramp", inner_steps=2,
                     augmentation="quadratic")
    state = solver.init(None, jnp.zeros(3), constrained.constrained_hyperparams(0.5, 1.0, 1.0, 0.05))
    scanned, metrics = full_batch_steps(solver.step, state, x, y, groups, num_steps=3)
    batch = Batch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(groups), jnp.ones(len(y), bool))
    for _ in range(3):
        state, last = solver.step(state, batch)
    np.testing.assert_allclose(scanned.params, state.params, rtol=1e-5)
    np.testing.assert_allclose(scanned.multipliers, state.multipliers, rtol=1e-5, atol=1e-7)
    assert float(metrics["loss"]) == pytest.approx(float(last["loss"]), rel=1e-5)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        full_batch_steps(solver.step, state, x, y, groups, num_steps=0)


def test_unknown_augmentation_is_named():
    apply_fn, *_ = three_group_problem()
    with pytest.raises(ValueError, match="augmentation must be one of paper, quadratic"):
        fairalm(apply_fn, augmentation="cubic")


def test_front_hypervolume_is_the_dominated_staircase_area():
    from fairopt.metrics import front_hypervolume

    reference = (0.75, 0.2)
    # One point: a rectangle (0.85 - 0.75) x (0.2 - 0.05).
    assert front_hypervolume([0.85], [0.05], reference) == pytest.approx(0.015)
    # Two non-dominated points: the union of their rectangles; a dominated point and one worse than
    # the reference on an axis add nothing, and NaN points are ignored.
    two = (0.80 - 0.75) * (0.10 - 0.02) + (0.85 - 0.75) * (0.2 - 0.10)
    assert front_hypervolume([0.80, 0.85], [0.02, 0.10], reference) == pytest.approx(two)
    assert front_hypervolume([0.80, 0.85, 0.79, 0.70, 0.9, float("nan")], [0.02, 0.10, 0.15, 0.01, 0.3, 0.0],
                             reference) == pytest.approx(two)
    assert front_hypervolume([], [], reference) == 0.0
