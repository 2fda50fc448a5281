"""Tests of FairALM (fairopt.solvers.fairalm) and the constrained baselines (constrained.py)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fairopt import losses, metrics, models, sweep
from fairopt.solvers import constrained
from fairopt.solvers.erm import ERMHyperparams, erm, erm_hyperparams
from fairopt.solvers.fairalm import (
    augmentation_term,
    constrained_hyperparams,
    fairalm,
    fairalm_finite,
    fairalm_objective,
    hypothesis_statistics,
)
from fairopt.train import Batch, fit

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Alg. 1: finite hypothesis set
# ---------------------------------------------------------------------------------------------


def constrained_optimum_by_enumeration(errors, deviations):
    """min_q q.e s.t. q.d = 0 over the simplex: the LP optimum sits on a vertex, i.e. a single
    hypothesis with d = 0 or a two-point mixture of hypotheses with d of opposite signs."""
    best = np.inf
    for i in range(len(errors)):
        if deviations[i] == 0:
            best = min(best, errors[i])
    for i, j in itertools.permutations(range(len(errors)), 2):
        if deviations[i] > 0 > deviations[j]:
            q_i = -deviations[j] / (deviations[i] - deviations[j])
            best = min(best, q_i * errors[i] + (1 - q_i) * errors[j])
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alg1_average_play_reaches_the_enumerated_constrained_optimum(seed):
    rng = np.random.default_rng(seed)
    num_hypotheses = 7
    errors = rng.uniform(0.1, 0.5, num_hypotheses)
    tpr_gap = rng.uniform(-0.3, 0.3, num_hypotheses)
    # The unconstrained best hypothesis must violate the constraint, or the test is vacuous.
    tpr_gap[np.argmin(errors)] = 0.25
    rates = np.stack([0.5 + tpr_gap / 2, 0.5 - tpr_gap / 2], axis=-1)  # [N, G=2], d = mu0 - mu1
    optimum = constrained_optimum_by_enumeration(errors, tpr_gap)
    assert optimum > errors.min() + 1e-3

    result = fairalm_finite(errors, rates, eta=1.0, num_rounds=4000)
    q = np.asarray(result.average_play)
    np.testing.assert_allclose(q.sum(), 1.0, atol=1e-6)
    assert abs(q @ tpr_gap) < 3e-3, "average play must (nearly) satisfy the constraint"
    assert abs(q @ errors - optimum) < 3e-3, (q @ errors, optimum)
    # Two groups: the per-group multipliers stay antisymmetric (one paper multiplier).
    np.testing.assert_allclose(result.multipliers[:, 0, 0], -result.multipliers[:, 0, 1], atol=1e-6)


def test_alg1_dual_update_is_follow_the_leader():
    rng = np.random.default_rng(3)
    errors = rng.uniform(0.1, 0.5, 5)
    gap = rng.uniform(-0.3, 0.3, 5)
    rates = np.stack([0.5 + gap / 2, 0.5 - gap / 2], axis=-1)
    eta, rounds = 0.7, 50
    result = fairalm_finite(errors, rates, eta=eta, num_rounds=rounds)
    lam = np.asarray(result.multipliers[:, 0, 0])  # lambda_1 .. lambda_{T+1}
    rewards = gap[np.asarray(result.choices)]
    for t in range(1, rounds + 1):
        # argmax_lambda sum_{s<=t} lambda r_s - (1/2 eta)(lambda - lambda_s)^2
        ftl = lam[:t].mean() + eta * rewards[:t].mean()
        np.testing.assert_allclose(lam[t], ftl, rtol=1e-4, atol=1e-5)
    # the best responses minimise the Lagrangian at the current multiplier
    for t in range(rounds):
        assert result.choices[t] == np.argmin(errors + lam[t] * gap)


def test_hypothesis_statistics_match_numpy():
    rng = np.random.default_rng(4)
    n, num_hypotheses, num_groups = 60, 4, 3
    labels = rng.integers(0, 2, n)
    groups = rng.integers(0, num_groups, n)
    groups[:3] = [0, 1, 2]
    labels[:6] = [1, 1, 1, 0, 0, 0]
    predictions = rng.integers(0, 2, (num_hypotheses, n))
    errors, rates, present = hypothesis_statistics(
        predictions, labels, groups, constraints=("eo", "dp"), num_groups=num_groups
    )
    assert rates.shape == (3, num_hypotheses, num_groups)  # atoms deo, fpr, dp
    for i, g in itertools.product(range(num_hypotheses), range(num_groups)):
        p, in_g = predictions[i], groups == g
        np.testing.assert_allclose(errors[i], np.mean(p != labels), rtol=1e-6)
        np.testing.assert_allclose(rates[0, i, g], np.mean(p[in_g & (labels == 1)] == 0), rtol=1e-6)  # FNR
        np.testing.assert_allclose(rates[1, i, g], np.mean(p[in_g & (labels == 0)] == 1), rtol=1e-6)  # FPR
        np.testing.assert_allclose(rates[2, i, g], np.mean(p[in_g] == 1), rtol=1e-6)  # positive rate
    assert bool(np.all(present))


def test_alg1_on_thresholded_linear_scores_cuts_the_tpr_gap():
    """Alg. 1 as a 'linear classifier' method: candidates are one linear score with a shared
    threshold and a per-group offset; the final play must have a much smaller TPR gap."""
    rng = np.random.default_rng(5)
    n = 4000
    groups = (rng.random(n) < 0.4).astype(np.int32)
    labels = (rng.random(n) < 0.45).astype(np.int32)
    score = labels * np.where(groups == 1, 0.8, 2.0) + rng.normal(size=n)
    offsets = np.linspace(-1.5, 1.5, 13)
    predictions = np.stack(
        [(score - t - o * groups > 0).astype(np.int32) for t in np.linspace(0.0, 1.5, 7) for o in offsets]
    )
    errors, rates, present = hypothesis_statistics(predictions, labels, groups, constraints="deo", num_groups=2)
    gaps = np.asarray(rates[0, :, 0] - rates[0, :, 1])
    best = int(np.argmin(errors))
    result = fairalm_finite(errors, rates, present, eta=2.0, num_rounds=3000)
    q = np.asarray(result.average_play)
    assert abs(gaps[best]) > 0.2
    assert abs(q @ gaps) < 0.02
    assert q @ np.asarray(errors) < errors[best] + 0.05


# ---------------------------------------------------------------------------------------------
# Multi-group constraint reduces to the paper's two-group one
# ---------------------------------------------------------------------------------------------


def test_group_deviations_two_groups_and_absent_groups():
    rates = jnp.array([[0.3, 0.1], [0.2, 0.6]])
    present = jnp.ones((2, 2), bool)
    np.testing.assert_allclose(constrained.group_deviations(rates, present), [[0.2, -0.2], [-0.4, 0.4]], atol=1e-7)
    # three groups with the third absent equals two groups
    rates3 = jnp.array([[0.3, 0.1, 0.9]])
    present3 = jnp.array([[True, True, False]])
    np.testing.assert_allclose(constrained.group_deviations(rates3, present3), [[0.2, -0.2, 0.0]], atol=1e-7)
    # three present groups: d_g = mu_g - mean of the others
    all3 = constrained.group_deviations(rates3, jnp.ones((1, 3), bool))
    np.testing.assert_allclose(all3, [[0.3 - 0.5, 0.1 - 0.6, 0.9 - 0.2]], atol=1e-6)
    # one group present: no constraint
    np.testing.assert_allclose(constrained.group_deviations(rates3, jnp.array([[True, False, False]])), 0.0)


def test_fairalm_objective_is_the_paper_objective_for_two_groups():
    mu = jnp.array([[0.7, 0.2]])
    lam, eta = 0.37, 1.5
    value = fairalm_objective(mu, jnp.ones((1, 2), bool), jnp.array([[lam, -lam]]), jnp.float32(eta))
    np.testing.assert_allclose(value, (lam + eta) * 0.7 - (lam - eta) * 0.2, rtol=1e-6)
    np.testing.assert_allclose(augmentation_term(mu, jnp.array([[True, False]])), 0.0)


def _synthetic(n, seed, num_groups=2):
    """Labels and a group-dependent signal strength: group 1's positives are harder to see."""
    rng = np.random.default_rng(seed)
    groups = (rng.random(n) < 0.3).astype(np.int32) if num_groups == 2 else rng.integers(0, num_groups, n)
    labels = (rng.random(n) < np.where(groups == 1, 0.3, 0.5)).astype(np.int32)
    signal = labels * np.where(groups == 1, 0.8, 2.0) + rng.normal(size=n)
    x = np.stack([signal, groups + 0.5 * rng.normal(size=n), rng.normal(size=n)], axis=1).astype(np.float32)
    return x, labels, groups.astype(np.int32)


def _paper_alg2_reference(apply_fn, params, batches, *, eta, lr, inner_steps):
    """Paper Alg. 2 written out for two groups with one scalar lambda (independent of the solver)."""
    lam = 0.0

    def mu(p, batch, s):
        ce = -jax.nn.log_softmax(apply_fn(p, batch.x))[:, 1]
        rows = (batch.y == 1) & (batch.groups == s) & batch.mask
        return jnp.sum(jnp.where(rows, ce, 0.0)) / jnp.sum(rows)

    def objective(p, batch, lam):
        logits = apply_fn(p, batch.x)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch.y[:, None], axis=1)[:, 0]
        e_hat = jnp.sum(jnp.where(batch.mask, ce, 0.0)) / jnp.sum(batch.mask)
        return e_hat + (lam + eta) * mu(p, batch, 0) - (lam - eta) * mu(p, batch, 1)

    grad_fn = jax.jit(jax.grad(objective))
    gap_fn = jax.jit(lambda p, batch: mu(p, batch, 0) - mu(p, batch, 1))
    for batch in batches:
        for _ in range(inner_steps):
            grads = grad_fn(params, batch, lam)
            params = jax.tree_util.tree_map(lambda w, g: w - lr * g, params, grads)
        lam = lam + eta * float(gap_fn(params, batch))
    return params, lam


@pytest.mark.parametrize("extra_empty_group", [False, True])
def test_alg2_with_groups_reduces_to_the_paper_two_group_algorithm(extra_empty_group):
    x, y, g = _synthetic(96, 1)
    params, apply_fn = models.make_model("linear", 2, 3, jax.random.key(0))
    # every batch holds all four (class, group) cells, so the written-out reference is defined
    for i in range(0, 96, 32):
        assert (np.bincount(y[i : i + 32] * 2 + g[i : i + 32], minlength=4) > 0).all()
    batches = [
        Batch(jnp.asarray(x[i : i + 32]), jnp.asarray(y[i : i + 32]), jnp.asarray(g[i : i + 32]), jnp.ones(32, bool))
        for i in range(0, 96, 32)
    ]
    eta, lr, inner = 0.8, 0.1, 3
    ref_params, ref_lam = _paper_alg2_reference(apply_fn, params, batches, eta=eta, lr=lr, inner_steps=inner)
    num_groups = 3 if extra_empty_group else 2  # a third group that never appears must change nothing
    solver = fairalm(apply_fn, optax.sgd(lr), num_groups=num_groups, eta=eta, eta_growth=1.0, inner_steps=inner)
    state = solver.init(jax.random.key(1), params)
    step = jax.jit(solver.step)
    for batch in batches:
        state, _ = step(state, batch)
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)  # noqa: E731
    jax.tree_util.tree_map(chex_close, state.params, ref_params)
    assert abs(ref_lam) > 1e-3
    np.testing.assert_allclose(state.multipliers[0, :2], [ref_lam, -ref_lam], rtol=1e-4, atol=1e-6)
    if extra_empty_group:
        assert float(state.multipliers[0, 2]) == 0.0


def test_penalty_matches_official_l2_for_two_groups():
    mu = jnp.array([[0.7, 0.2]])
    d = constrained.group_deviations(mu, jnp.ones((1, 2), bool))
    eta = 3.0
    np.testing.assert_allclose(0.5 * eta * constrained.penalty_term(d), 0.5 * eta * (0.7 - 0.2) ** 2, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Empty cells in a batch
# ---------------------------------------------------------------------------------------------


def _tree_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(tree))


def test_no_nan_with_empty_cells_in_a_batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    # group 0: rows 0-3 (labels 1,1,0,0); group 1: rows 4-5 (label 0 only: no positives, so no
    # FNR cell); group 2: absent; rows 6-7 are padding (mask False) of group 2 with label 1.
    y = jnp.array([1, 1, 0, 0, 0, 0, 1, 1])
    g = jnp.array([0, 0, 0, 0, 1, 1, 2, 2])
    mask = jnp.array([True] * 6 + [False] * 2)
    params, apply_fn = models.make_model("linear", 2, 3, jax.random.key(0))
    atoms = ("deo", "fpr", "dp", "pp")

    def rates_fn(p):
        return constrained.smooth_group_rates(apply_fn(p, x), y, g, mask, atoms=atoms, num_groups=3)

    for fn in (rates_fn, jax.jit(rates_fn)):
        rates, present = fn(params)
        np.testing.assert_array_equal(
            present, [[True, False, False], [True, True, False], [True, True, False], [True, True, False]]
        )
        assert _tree_finite(rates)
        assert float(jnp.max(jnp.abs(jnp.where(present, 0.0, rates)))) == 0.0  # absent cells are 0
    for atom in range(len(atoms)):  # gradients through every cell, empty ones included, are finite
        assert _tree_finite(jax.grad(lambda p: jnp.sum(rates_fn(p)[0][atom]))(params))
    # Small steps: the point is that empty cells give no NaN, not how big a step is stable.
    sgd = optax.sgd(0.01)
    makers = {
        "fairalm": lambda: fairalm(apply_fn, sgd, constraints=("eo", "dp", "pp"), num_groups=3, eta=0.1),
        "lagrangian": lambda: constrained.lagrangian(
            apply_fn, sgd, constraints=("eo", "dp", "pp"), num_groups=3, dual_learning_rate=0.1
        ),
        "penalty": lambda: constrained.penalty(apply_fn, sgd, constraints=("eo", "dp", "pp"), num_groups=3, eta=0.1),
        "group_dro": lambda: constrained.group_dro(apply_fn, sgd, num_classes=2, num_groups=3),
    }
    for name, make in makers.items():
        solver = make()
        state = solver.init(jax.random.key(0), params)
        step = jax.jit(solver.step)
        for _ in range(3):
            state, metrics_ = step(state, Batch(x, y, g, mask))
        assert _tree_finite(state), name
        assert _tree_finite(metrics_), name
        if hasattr(state, "multipliers"):
            # absent cells never receive a dual step: FNR of groups 1, 2 and everything of group 2
            np.testing.assert_array_equal(state.multipliers[0, 1:], 0.0)
            np.testing.assert_array_equal(state.multipliers[:, 2], 0.0)
            if name != "penalty":
                assert float(jnp.max(jnp.abs(state.multipliers))) > 0  # present cells did move
    # A batch of only padding is a no-op for the constraints and stays finite.
    solver = fairalm(apply_fn, optax.sgd(0.1), num_groups=3)
    state, metrics_ = solver.step(solver.init(None, params), Batch(x, y, g, jnp.zeros(8, bool)))
    assert _tree_finite(state) and _tree_finite(metrics_)


# ---------------------------------------------------------------------------------------------
# A short run reduces DEO
# ---------------------------------------------------------------------------------------------


def _deo(solver, state, x, y, g):
    probs = np.asarray(solver.predict(state, jnp.asarray(x)))
    deo = metrics.deo_gap(probs, y, g, num_classes=2, num_groups=2, reduce="between_groups")
    return float(deo), float(np.mean(probs.argmax(1) == y))


def test_short_fairalm_run_reduces_deo_on_a_biased_synthetic_problem():
    x, y, g = _synthetic(2000, 0)
    x_test, y_test, g_test = _synthetic(4000, 1)
    params, apply_fn = models.make_model("linear", 2, 3, jax.random.key(0))
    steps_per_epoch = 2000 // 200
    runs = {
        "unconstrained": erm(apply_fn, losses.make_loss("ce", np.bincount(y)), optax.sgd(0.1)),
        "fairalm": fairalm(
            apply_fn, optax.sgd(0.1), eta=0.3, eta_growth=1.01, inner_steps=2, steps_per_epoch=steps_per_epoch
        ),
    }
    results = {}
    for name, solver in runs.items():
        state, history = fit(
            solver, solver.init(None, params), x, y, g, epochs=8, batch_size=200, key=jax.random.key(1)
        )
        results[name] = _deo(solver, state, x_test, y_test, g_test)
    (deo_base, acc_base), (deo_fair, acc_fair) = results["unconstrained"], results["fairalm"]
    assert deo_base > 0.25, "the synthetic problem must have a large built-in TPR gap"
    assert deo_fair < 0.5 * deo_base, results
    assert acc_fair > 0.6, results  # still a classifier, not a constant


# ---------------------------------------------------------------------------------------------
# Boundary checks
# ---------------------------------------------------------------------------------------------


def test_bad_arguments_raise_value_errors_naming_the_argument():
    _, apply_fn = models.make_model("linear", 2, 3, jax.random.key(0))
    sgd = optax.sgd(0.1)
    cases = [
        (lambda: fairalm(apply_fn, sgd, constraints="fairness"), "constraints"),
        (lambda: fairalm(apply_fn, sgd, constraints=()), "constraints"),
        (lambda: fairalm(apply_fn, sgd, num_groups=1), "num_groups"),
        (lambda: fairalm(apply_fn, sgd, eta=-1.0), "eta"),
        (lambda: fairalm(apply_fn, sgd, eta_growth=0.0), "eta_growth"),
        (lambda: fairalm(apply_fn, sgd, inner_steps=0), "inner_steps"),
        (lambda: fairalm(apply_fn, sgd, surrogate="hinge"), "surrogate"),
        (lambda: constrained.penalty(apply_fn, sgd, steps_per_epoch=0), "steps_per_epoch"),
        (lambda: constrained.group_dro(apply_fn, sgd, num_classes=2, num_groups=2, cell_counts=np.ones(3)), "cell_counts"),
        (lambda: fairalm_finite(np.zeros(3), np.zeros((4, 2)), eta=1.0, num_rounds=5), "errors"),
        (lambda: fairalm_finite(np.zeros(3), np.zeros((3, 2)), eta=0.0, num_rounds=5), "eta"),
        (lambda: fairalm_finite(np.zeros(3), np.zeros((3, 2)), eta=1.0, num_rounds=0), "num_rounds"),
        (lambda: hypothesis_statistics(np.zeros(5), np.zeros(5), np.zeros(5)), "predictions"),
    ]
    for make, argument in cases:
        with pytest.raises(ValueError, match=argument):
            make()
    with pytest.raises(ValueError, match="positive_class"):
        solver = fairalm(apply_fn, sgd, positive_class=2)
        solver.step(solver.init(None, models.make_model("linear", 2, 3, jax.random.key(0))[0]),
                    Batch(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32), jnp.ones(2, bool)))


def test_constraint_atoms_expand_and_deduplicate():
    assert constrained.constraint_atoms("eo") == ("deo", "fpr")
    assert constrained.constraint_atoms(("pp", "deo", "eo")) == ("deo", "fpr", "pp")


@pytest.mark.parametrize(
    "flag, allowed", [("--methods=fairalm,bogus", "unconstrained"), ("--dataset=mnist", "celeba_attributes")]
)
def test_experiment_rejects_bad_flags_listing_the_allowed_values(flag, allowed, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "experiments.fairalm", flag, f"--output_dir={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode != 0
    assert allowed in completed.stderr
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Hyperparameters as data: numbers in the state, one program per static setting
# ---------------------------------------------------------------------------------------------


def _differ(a, b):
    return any(not np.allclose(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _tiny_batches(num_groups=2, n=32, seed=3):
    x, y, g = _synthetic(n * 2, seed, num_groups)
    return [Batch(jnp.asarray(x[i : i + n]), jnp.asarray(y[i : i + n]), jnp.asarray(g[i : i + n]), jnp.ones(n, bool))
            for i in (0, n)]


def test_fairalm_eta_is_traced_vmap_over_etas_matches_separate_runs_and_compiles_once():
    params, apply_fn = models.make_model("linear", 2, 3, jax.random.key(0))
    solver = fairalm(apply_fn, optax.sgd, eta_growth=1.0, inner_steps=1, learning_rate=0.1)
    batches = _tiny_batches()
    etas = (0.05, 0.8)
    step = jax.jit(solver.step)
    separate = []
    for eta in etas:  # a changed eta reuses the compiled step
        state = solver.init(None, params, constrained_hyperparams(learning_rate=0.1, eta=eta, eta_growth=1.0))
        for batch in batches:
            state, _ = step(state, batch)
        separate.append(state)
    assert step._cache_size() == 1
    hyperparams = sweep.stack([constrained_hyperparams(learning_rate=0.1, eta=eta, eta_growth=1.0) for eta in etas])
    states = jax.vmap(lambda h: solver.init(None, params, h))(hyperparams)
    vstep = jax.jit(jax.vmap(solver.step, in_axes=(0, None)))
    for batch in batches:
        states, _ = vstep(states, batch)
    for index, state in enumerate(separate):
        np.testing.assert_allclose(states.multipliers[index], state.multipliers, rtol=1e-5, atol=1e-7)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                               sweep.take(states.params, index), state.params)
    assert not np.allclose(states.multipliers[0], states.multipliers[1])


def test_every_constrained_solver_and_erm_vmaps_over_hyperparams():
    params, apply_fn = models.make_model("linear", 2, 3, jax.random.key(0))
    batch = _tiny_batches(num_groups=3)[0]
    # (l2 penalty and Lagrangian share FairALM's builder, vmapped in the test above)
    cases = {
        "group_dro": (constrained.group_dro(apply_fn, optax.sgd, num_classes=2, num_groups=3),
                      [constrained.group_dro_hyperparams(0.1, 0.01), constrained.group_dro_hyperparams(0.1, 1.0)]),
        "erm": (erm(apply_fn, lambda logits, y, g, e: losses.cross_entropy(logits, y), optax.sgd),
                [erm_hyperparams(0.1, np.ones(2)), erm_hyperparams(0.1, np.array([0.2, 1.8]))]),
    }
    for name, (solver, settings) in cases.items():
        states = jax.vmap(lambda h: solver.init(None, params, h))(sweep.stack(settings))
        states, out = jax.jit(jax.vmap(solver.step, in_axes=(0, None)))(states, batch)
        assert _tree_finite(states), name
        assert _differ(*(sweep.take(states.params, i) for i in (0, 1))), name


def test_erm_and_balanced_erm_share_one_program_and_match_weighted_ce():
    x, y, g = _synthetic(64, 4)
    counts = np.bincount(y, minlength=2)
    params, apply_fn = models.make_model("linear", 2, 3, jax.random.key(0))
    batch = Batch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(g), jnp.ones(64, bool))
    solver = erm(apply_fn, lambda logits, labels, groups, epoch: losses.cross_entropy(logits, labels), optax.sgd)
    step = jax.jit(solver.step)
    balanced = losses.inverse_frequency_weights(counts)
    plain_state, _ = step(solver.init(None, params, erm_hyperparams(0.5, np.ones(2))), batch)
    balanced_state, _ = step(solver.init(None, params, erm_hyperparams(0.5, balanced)), batch)
    assert step._cache_size() == 1
    reference = erm(apply_fn, losses.make_loss("weighted_ce", counts), optax.sgd(0.5))
    reference_state, _ = jax.jit(reference.step)(reference.init(None, params), batch)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           balanced_state.params, reference_state.params)
    assert _differ(plain_state.params, balanced_state.params)


def test_finite_game_vmaps_over_eta():
    errors = jnp.array([0.1, 0.2, 0.3])
    rates = jnp.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]])
    play = jax.vmap(lambda eta: fairalm_finite(errors, rates, eta=eta, num_rounds=20).average_play)(jnp.array([0.1, 5.0]))
    for index, eta in enumerate((0.1, 5.0)):
        np.testing.assert_allclose(play[index], fairalm_finite(errors, rates, eta=eta, num_rounds=20).average_play)


def test_step_input_type_is_checked_with_a_message_naming_batch():
    params, apply_fn = models.make_model("linear", 2, 3, jax.random.key(0))
    batch = _tiny_batches()[0]
    solvers = {
        "FairALM": fairalm(apply_fn, optax.sgd(0.1)),
        "Lagrangian": constrained.lagrangian(apply_fn, optax.sgd(0.1)),
        "group DRO": constrained.group_dro(apply_fn, optax.sgd(0.1), num_classes=2, num_groups=2),
        "ERM": erm(apply_fn, lambda logits, y, g, e: losses.cross_entropy(logits, y), optax.sgd(0.1)),
    }
    for name, solver in solvers.items():
        state = solver.init(None, params)
        for bad in ((batch.x, batch.y), tuple(batch), {"x": batch.x}):
            with pytest.raises(TypeError, match=rf"the {name} step takes a fairopt.train.Batch"):
                jax.jit(solver.step)(state, bad)
        with pytest.raises(ValueError, match="Batch.groups must have shape"):
            solver.step(state, batch._replace(groups=batch.groups[:3]))
    with pytest.raises(TypeError, match="hyperparams must be a ConstrainedHyperparams"):
        solvers["FairALM"].init(None, params, erm_hyperparams())


def test_group_ids_outside_num_groups_are_an_error_before_training():
    x, y, g = _synthetic(60, 0, num_groups=3)
    assert g.max() == 2
    params, apply_fn = models.make_model("linear", 2, 3, jax.random.key(0))
    for solver in (fairalm(apply_fn, optax.sgd(0.1), num_groups=2),
                   constrained.penalty(apply_fn, optax.sgd(0.1), num_groups=2),
                   constrained.group_dro(apply_fn, optax.sgd(0.1), num_classes=2, num_groups=2)):
        with pytest.raises(ValueError, match=r"ids \[2\] outside \[0, num_groups=2\).*num_groups=3"):
            fit(solver, solver.init(None, params), x, y, g, epochs=1, batch_size=30, key=jax.random.key(0))
    with pytest.raises(ValueError, match="outside"):
        fit(*(lambda s: (s, s.init(None, params)))(fairalm(apply_fn, optax.sgd(0.1), num_groups=3)),
            x, y, np.where(g == 2, -1, g), epochs=1, batch_size=30, key=jax.random.key(0))


def test_bad_hyperparameter_values_are_rejected_in_python_before_tracing():
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        constrained_hyperparams(eta=-1.0)
    with pytest.raises(ValueError, match="eta_growth must be a finite number > 0"):
        constrained_hyperparams(eta_growth=0.0)
    with pytest.raises(ValueError, match="learning_rate"):
        erm_hyperparams(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="class_weights"):
        erm_hyperparams(class_weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="FairnessConfig.eta must be >= 0"):
        constrained.FairnessConfig(eta=-0.1)
    with pytest.raises(ValueError, match="constraints has unknown 'bogus'"):
        constrained.FairnessConfig(constraint="deo+bogus")
    assert constrained.FairnessConfig(constraint="eo+dp").constraints == ("eo", "dp")
    assert isinstance(erm_hyperparams(), ERMHyperparams)


def _run_experiment(tmp_path, *flags):
    return subprocess.run(
        [sys.executable, "-m", "experiments.fairalm", "--dataset=german", "--model=linear", "--epochs=1",
         "--batch_size=200", f"--output_dir={tmp_path}", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_experiment_eta_grid_of_8_values_times_3_seeds_is_one_compiled_program(tmp_path):
    etas = "0.001,0.003,0.01,0.03,0.1,0.3,1,3"
    completed = _run_experiment(tmp_path, "--methods=reweighting,fairalm", "--seeds=0,1,2", f"--grid=eta={etas}",
                                "--grid_chunk=10", "--select=val_deo_gap", "--inner_steps=1")
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "fairalm_german.json").read_text())
    runs = results["runs"]
    fairalm_runs = [r for r in runs if r["method"] == "fairalm"]
    assert len(fairalm_runs) == 24 and len([r for r in runs if r["method"] == "reweighting"]) == 3
    assert sorted({r["eta"] for r in fairalm_runs}) == sorted(float(v) for v in etas.split(","))
    assert {"setting", "val_deo_gap", "val_accuracy", "deo_gap"} <= set(fairalm_runs[0])
    compiled = results["config"]["compiled_epochs"]
    # one program per method for the whole grid: chunks of 10, 10 and 4 runs (padded to 10)
    assert sorted(compiled.values()) == [1, 1], compiled
    assert [(r["seed"], r["eta"]) for r in fairalm_runs] == [(s, float(e)) for s in (0, 1, 2) for e in etas.split(",")]
    assert [s["method"] for s in results["config"]["selected"]] == ["reweighting", "fairalm"]
    labels = [row["label"] for row in results["summary"]]
    assert "fairalm (selected on val_deo_gap)" in labels and "fairalm [eta=0.3]" in labels
    assert len(labels) == 1 + 8 + 2


# Bad --grid / --select / --methods values: FAIRALM_BAD_FLAGS in tests/test_resume_autobalance_fairalm.py
# (one forked driver for every case instead of a Python start-up per case).
