"""AutoBalance solver (fairopt.solvers.autobalance) and personalised augmentation (fairopt.augment)."""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fairopt import augment, hparams, sweep
from fairopt.solvers import autobalance as ab
from fairopt.train import Batch


def _linear_apply(params, x):
    return x @ params["w"] + params["b"]


def _linear_params(num_features, num_classes):
    return {"w": jnp.zeros((num_features, num_classes)), "b": jnp.zeros(num_classes)}


def _rows(x, y, groups=None):
    x = jnp.asarray(x, jnp.float32)
    groups = jnp.zeros(len(y), jnp.int32) if groups is None else jnp.asarray(groups, jnp.int32)
    return Batch(x, jnp.asarray(y, jnp.int32), groups, jnp.ones(len(y), bool))


def _two_class_problem(seed=0, majority=400, minority=40, d=2):
    """Overlapping Gaussians, class 1 ten times rarer in train; balanced validation."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(-1, 1, (majority, d)), rng.normal(1, 1, (minority, d))])
    y = np.r_[np.zeros(majority), np.ones(minority)].astype(np.int32)
    xv = np.concatenate([rng.normal(-1, 1, (200, d)), rng.normal(1, 1, (200, d))])
    yv = np.r_[np.zeros(200), np.ones(200)].astype(np.int32)
    return _rows(x, y), _rows(xv, yv), np.array([majority, minority])


def _inner_solver(solver, rows, params_template, weight_decay, iterations=25):
    """Return ``solve(raw, start) -> theta*(raw)``: jitted Newton on the exact inner objective
    (train loss + L2), compiled once and reused for every finite-difference evaluation."""
    flat0, unravel = ravel_pytree(params_template)
    noise = jnp.zeros_like(rows.x)

    def inner(vector, raw):
        l2 = 0.5 * weight_decay * jnp.sum(vector**2)
        return solver.train_objective(unravel(vector), raw, rows.x, rows.y, rows.groups, rows.mask, noise) + l2

    steps = 0.5 ** jnp.arange(12.0)  # backtracking: the best of 12 step sizes along the Newton direction

    @jax.jit
    def newton(raw, start):
        def body(_, vector):
            direction = jnp.linalg.solve(jax.hessian(inner)(vector, raw), jax.grad(inner)(vector, raw))
            candidates = vector[None] - steps[:, None] * direction[None]
            values = jax.vmap(inner, in_axes=(0, None))(candidates, raw)
            return candidates[jnp.argmin(jnp.where(jnp.isfinite(values), values, jnp.inf))]

        vector = jax.lax.fori_loop(0, iterations, body, start)
        return vector, jnp.linalg.norm(jax.grad(inner)(vector, raw))

    def solve(raw, start=None):
        vector, residual = newton(raw, flat0 if start is None else ravel_pytree(start)[0])
        assert float(residual) < 1e-4, f"inner problem not converged (gradient norm {float(residual)})"
        return unravel(vector)

    return solve


def _toy_solver(space, class_counts, d, **overrides):
    config = ab.AutoBalanceConfig(
        search_space=space, inverse="exact", lower_weight_decay=1e-2, **overrides
    )
    return ab.autobalance(_linear_apply, config, class_counts=class_counts, num_features=d)


# ------------------------------------------------------------------------------------------------
# Hypergradient direction and accuracy.
# ------------------------------------------------------------------------------------------------


def test_hypergradient_direction_raises_the_minority_on_a_two_class_toy_problem():
    train, val, counts = _two_class_problem()
    majority, minority = 0, 1
    noise = jnp.zeros_like(train.x)
    theta = None  # every space starts from the same neutral loss, so theta* is shared
    moves = {}
    for space in ("weight", "shift", "la_tau"):
        solver = _toy_solver(space, counts, 2, val_objective="balanced_ce")
        raw = solver.initial_hparams()
        if theta is None:
            theta = _inner_solver(solver, train, _linear_params(2, 2), 1e-2)(raw)
        grads, value = jax.jit(solver.hypergradient)(theta, raw, train, val, noise)
        assert np.isfinite(float(value))
        step = jax.tree_util.tree_map(lambda h, g: h - 1.0 * g, raw, grads)  # one descent step
        moves[space] = (solver.loss_params(raw), solver.loss_params(step))
        # Frozen leaves of the search space get exactly zero hypergradient.
        for name, keep in zip(hparams.LossHparams._fields, hparams.trainable_mask(space)):
            if not keep:
                np.testing.assert_array_equal(np.asarray(getattr(grads.loss, name)), 0.0)
    before, after = moves["weight"]
    # w: the minority's weight rises relative to the majority's (re-weighting towards balance).
    assert after.weight[minority] / after.weight[majority] > before.weight[minority] / before.weight[majority] + 1e-3
    # l: the minority's additive margin l_maj - l_min rises (the logit-adjustment direction,
    # l_k = tau log pi_k, which gives the rare class the smaller shift).
    margin = lambda p: float(p.shift[majority] - p.shift[minority])
    before, after = moves["shift"]
    assert margin(after) > margin(before) + 1e-3
    # tau of LA: starts at 0 (plain CE) and grows towards logit adjustment.
    before, after = moves["la_tau"]
    assert margin(after) > 1e-3 and margin(before) == 0.0


@pytest.mark.parametrize(
    "space,per_group,objective",
    [("shift_scale", False, "balanced_ce"), ("weight", True, "blend"), ("shift", True, "worst_group_ce")],
)
def test_solver_hypergradient_matches_finite_differences(space, per_group, objective):
    rng = np.random.default_rng(1)
    num_classes, num_groups, d = 3, 2, 3
    centres = rng.normal(0, 1.5, (num_classes, d))
    y = np.repeat(np.arange(num_classes), [60, 25, 10])
    groups = rng.integers(0, num_groups, y.size)
    x = centres[y] + rng.normal(0, 1, (y.size, d)) + 0.5 * groups[:, None]
    yv = np.repeat(np.arange(num_classes), 30)
    gv = rng.integers(0, num_groups, yv.size)
    xv = centres[yv] + rng.normal(0, 1, (yv.size, d)) + 0.5 * gv[:, None]
    train, val = _rows(x, y, groups), _rows(xv, yv, gv)
    cells = np.zeros((num_classes, num_groups), int)
    np.add.at(cells, (y, groups), 1)
    weight_decay = 1e-2
    config = ab.AutoBalanceConfig(
        search_space=space, per_group=per_group, val_objective=objective, inverse="exact",
        lower_weight_decay=weight_decay, val_temperature=0.3,
    )  # fmt: skip
    solver = ab.autobalance(_linear_apply, config, class_counts=np.bincount(y), cell_counts=cells, num_features=d)
    # A generic point of the search space (not the symmetric init).
    raw = solver.initial_hparams()
    raw = raw._replace(loss=jax.tree_util.tree_map(lambda h: h + 0.3 * jnp.asarray(rng.normal(size=h.shape), h.dtype), raw.loss))
    params0 = _linear_params(d, num_classes)
    solve = _inner_solver(solver, train, params0, weight_decay)
    theta = solve(raw)
    grads, _ = jax.jit(solver.hypergradient)(theta, raw, train, val, jnp.zeros_like(train.x))
    val_objective = jax.jit(solver.val_objective)

    def validation_at(raw_h):
        return float(val_objective(solve(raw_h, theta), val.x, val.y, val.groups, val.mask))

    flat, unravel = ravel_pytree(raw)
    flat_grads = np.asarray(ravel_pytree(grads)[0])
    trainable = np.asarray(ravel_pytree(jax.tree_util.tree_map(lambda h, k: jnp.full(h.shape, float(k)), raw, ab.AutoBalanceHparams(hparams.trainable_mask(space), False)))[0])
    eps = 1e-2
    checked = 0
    for index in np.flatnonzero(trainable):
        unit = jnp.zeros_like(flat).at[index].set(eps)
        estimate = (validation_at(unravel(flat + unit)) - validation_at(unravel(flat - unit))) / (2 * eps)
        assert flat_grads[index] == pytest.approx(estimate, rel=3e-2, abs=3e-4), (space, index)
        checked += 1
    assert checked >= 2
    np.testing.assert_array_equal(flat_grads[trainable == 0], 0.0)  # frozen leaves


# ------------------------------------------------------------------------------------------------
# Clustering.
# ------------------------------------------------------------------------------------------------


def test_clusters_share_parameters_and_sum_their_members_hypergradients():
    counts = np.array([50, 5, 30, 10, 20])  # frequency order: 0, 2, 4, 3, 1
    rng = np.random.default_rng(2)
    d = 3
    centres = rng.normal(0, 1.5, (5, d))
    y = np.repeat(np.arange(5), counts)
    x = centres[y] + rng.normal(0, 1.5, (y.size, d))
    yv = np.repeat(np.arange(5), 12)
    xv = centres[yv] + rng.normal(0, 1.5, (yv.size, d))
    train, val = _rows(x, y), _rows(xv, yv)
    clustered = _toy_solver("shift_scale", counts, d, cluster_size=2)
    per_class = _toy_solver("shift_scale", counts, d, cluster_size=1)
    raw = clustered.initial_hparams()
    assert raw.loss.shift.shape == (3,)  # ceil(5 / 2): {0, 2}, {4, 3}, {1}
    raw = raw._replace(loss=raw.loss._replace(shift=jnp.array([1.0, 2.0, 3.0]), scale_logit=jnp.array([0.5, -0.5, 2.0])))
    effective = clustered.loss_params(raw)
    np.testing.assert_allclose(effective.shift, [1.0, 3.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(effective.scale, jax.nn.sigmoid(jnp.array([0.5, 2.0, 0.5, -0.5, -0.5])), rtol=1e-6)
    # The same loss expressed per class (cluster_size 1 orders classes by frequency).
    order = np.argsort(-counts, kind="stable")
    per_class_raw = per_class.initial_hparams()
    per_class_raw = per_class_raw._replace(
        loss=per_class_raw.loss._replace(shift=effective.shift[order], scale_logit=jnp.array([0.5, 0.5, -0.5, -0.5, 2.0]))
    )
    np.testing.assert_allclose(per_class.loss_params(per_class_raw).shift, effective.shift)
    np.testing.assert_allclose(per_class.loss_params(per_class_raw).scale, effective.scale, rtol=1e-6)
    theta = _inner_solver(clustered, train, _linear_params(d, 5), 1e-2)(raw)
    noise = jnp.zeros_like(train.x)
    cluster_grads, _ = jax.jit(clustered.hypergradient)(theta, raw, train, val, noise)
    class_grads, _ = jax.jit(per_class.hypergradient)(theta, per_class_raw, train, val, noise)
    # Chain rule through D: d/dl'_j = sum over the member classes of d/dl_k.
    to_classes = np.asarray(hparams.class_clusters(counts, 1))  # [K, K] (class, rank)
    dictionary = np.asarray(hparams.class_clusters(counts, 2))  # [K, 3]
    for leaf in ("shift", "scale_logit"):
        per_class_by_class = to_classes @ np.asarray(getattr(class_grads.loss, leaf))
        np.testing.assert_allclose(
            np.asarray(getattr(cluster_grads.loss, leaf)), dictionary.T @ per_class_by_class, rtol=1e-4, atol=1e-6
        )


# ------------------------------------------------------------------------------------------------
# Search then retrain, end to end.
# ------------------------------------------------------------------------------------------------


def _dataset(x, y, g):
    return types.SimpleNamespace(features=np.asarray(x, np.float32), labels=np.asarray(y), groups=np.asarray(g))


def test_search_then_retrain_runs_end_to_end_on_a_tiny_problem():
    rng = np.random.default_rng(3)
    counts = np.array([120, 40, 12])
    centres = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])

    def sample(per_class):
        y = np.repeat(np.arange(3), per_class)
        return centres[y] + rng.normal(0, 0.9, (y.size, 2)), y

    x, y = sample(counts)
    xv, yv = sample([30, 10, 3])
    xt, yt = sample([100, 100, 100])
    config = ab.AutoBalanceConfig(
        search_space="shift_scale", augment=True, augment_radius_init=0.2,
        iter_interval=1, train_batches=2, val_batches=2, lower_learning_rate=0.05, lower_weight_decay=1e-4,
        upper_learning_rate=0.05, upper_optimizer="adam", neumann_alpha=0.1,
    )  # fmt: skip
    result = ab.search_and_retrain(
        _linear_apply, lambda key: _linear_params(2, 3), config,
        _dataset(x, y, np.zeros_like(y)), _dataset(xv, yv, np.zeros_like(yv)), key=jax.random.key(0), num_classes=3,
        epochs=6, batch_size=32, warmup_epochs=3, lr_decay_fractions=(220 / 300, 260 / 300),
    )  # fmt: skip
    steps = -(-len(y) // 32)
    history = result.search_history
    assert len(history) == 6 and len(result.trajectory) == 7
    assert [h["upper_steps"] for h in history[:3]] == [0.0, 0.0, 0.0]  # warm-up
    assert all(h["upper_steps"] == steps for h in history[3:])  # iter_interval 1: every step
    # The hyperparameters stay at their init during the warm-up and move afterwards.
    initial = result.trajectory[0]
    for snapshot in result.trajectory[1:4]:
        np.testing.assert_array_equal(snapshot["shift"], initial["shift"])
    final = result.trajectory[-1]
    assert not np.allclose(final["shift"], initial["shift"]) and not np.allclose(final["delta"], initial["delta"])
    assert not np.allclose(final["radius"], initial["radius"])
    np.testing.assert_array_equal(final["weight"], 1.0)  # not searched
    # The learnt shifts end ordered by class frequency (majority largest: the LA direction).
    assert final["shift"][0] > final["shift"][1] > final["shift"][2]
    assert history[-1]["val_objective"] < history[3]["val_objective"]
    # Retrain: frozen hyperparameters, a fresh model trained on train + val for the same epochs.
    retrain_steps = -(-(len(y) + len(yv)) // 32)
    assert int(result.state.step) == 6 * retrain_steps
    jax.tree_util.tree_map(np.testing.assert_array_equal, result.state.hparams, result.hparams)
    probabilities = np.asarray(result.retrain_solver.predict(result.state, jnp.asarray(xt, jnp.float32)))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    recalls = [np.mean(probabilities.argmax(1)[yt == k] == k) for k in range(3)]
    assert np.mean(recalls) > 0.8


def test_retrain_phase_never_changes_the_hyperparameters():
    counts = np.array([30, 10])
    solver = ab.autobalance(
        _linear_apply, ab.AutoBalanceConfig(iter_interval=1), class_counts=counts, num_features=2, search=False,
    )  # fmt: skip
    raw = solver.initial_hparams()
    raw = raw._replace(loss=raw.loss._replace(shift=jnp.array([0.5, -0.5])))
    state = solver.init(jax.random.key(0), _linear_params(2, 2), hparams=raw)
    batch = _rows(np.random.default_rng(0).normal(size=(8, 2)), np.array([0, 1] * 4))
    new_state, metrics = jax.jit(solver.step)(state, batch)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_state.hparams, raw)
    assert not np.allclose(new_state.params["w"], 0.0) and np.isfinite(float(metrics["loss"]))


# ------------------------------------------------------------------------------------------------
# Augmentation and input validation.
# ------------------------------------------------------------------------------------------------


def test_unit_ball_noise_is_inside_the_ball_and_augmentation_uses_the_class_radius():
    noise = augment.unit_ball_noise(jax.random.key(0), (4000, 3))
    norms = np.linalg.norm(np.asarray(noise), axis=1)
    assert norms.max() <= 1.0 + 1e-6
    # Uniform in the 3-ball: P(||u|| <= 1/2) = 1/8.
    assert abs(np.mean(norms <= 0.5) - 0.125) < 0.02
    x = jnp.zeros((4000, 3))
    labels = jnp.asarray(np.arange(4000) % 2)
    out = augment.spherical_augment(x, labels, jnp.array([0.0, 2.0]), noise)
    np.testing.assert_array_equal(np.asarray(out[labels == 0]), 0.0)
    assert np.linalg.norm(np.asarray(out[labels == 1]), axis=1).max() <= 2.0 + 1e-5
    with pytest.raises(ValueError, match="radius"):
        augment.spherical_augment(x, labels, jnp.ones((2, 2)), noise)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(search_space="delta"), "search_space"),
        (dict(val_objective="ce_bal"), "val_objective"),
        (dict(lambda_val=1.5), "lambda_val"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(neumann_terms=-1), "neumann_terms"),
        (dict(cg_iters=0), "cg_iters must be >= 1"),
        (dict(lr_decay_steps=(50, 30)), "lr_decay_steps"),
        (dict(upper_learning_rate=float("nan")), "upper_learning_rate must be a finite number"),
        (dict(iter_interval=0), "iter_interval"),
        (dict(upper_optimizer="rmsprop"), "upper_optimizer"),
    ],
)
def test_bad_configuration_raises_value_error_naming_the_field(overrides, match):
    with pytest.raises(ValueError, match=match):
        ab.AutoBalanceConfig(**overrides)


def test_group_objective_without_cell_counts_is_rejected():
    config = dataclasses.replace(ab.AutoBalanceConfig(), val_objective="blend", lambda_val=0.1)
    with pytest.raises(ValueError, match="cell_counts"):
        ab.autobalance(_linear_apply, config, class_counts=[10, 5], num_features=2)


# ------------------------------------------------------------------------------------------------
# Hyperparameters as data: one program for a sweep; input checks.
# ------------------------------------------------------------------------------------------------


def _tiny_search_data(seed):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], [48, 16])
    x = rng.normal(0, 1, (y.size, 2)) + 1.5 * y[:, None]
    yv = np.repeat([0, 1], [16, 16])
    xv = rng.normal(0, 1, (yv.size, 2)) + 1.5 * yv[:, None]
    zeros = lambda a: np.zeros_like(a)  # noqa: E731
    return ab.HyperData(*(jnp.asarray(a) for a in (x.astype(np.float32), y, zeros(y), xv.astype(np.float32), yv, zeros(yv))))


def test_upper_step_grid_times_seeds_is_one_compiled_program_and_matches_separate_runs():
    config = ab.AutoBalanceConfig(search_space="shift", iter_interval=1, warmup_steps=1, lr_decay_steps=(3,), neumann_terms=1)
    solver = ab.autobalance(_linear_apply, config, class_counts=[48, 16], num_features=2)
    epoch = ab.make_search_epoch_fn(solver.step, num_rows=64, batch_size=16)
    rates, seeds = (0.01, 0.1, 1.0), (0, 1)
    runs = [(rate, seed) for rate in rates for seed in seeds]
    hyperparams = sweep.stack([dataclasses.replace(config, upper_learning_rate=r).hyperparams() for r, _ in runs])
    keys = jax.vmap(jax.random.key)(jnp.array([seed for _, seed in runs]))
    data = sweep.stack([_tiny_search_data(seed) for _, seed in runs])
    params = jax.tree_util.tree_map(lambda leaf: jnp.stack([leaf] * len(runs)), _linear_params(2, 2))
    states = jax.vmap(solver.init)(keys, params, hyperparams)
    grid_epoch = ab.make_lockstep_search_epoch_fn(solver, num_rows=64, batch_size=16)  # = jit(vmap(epoch))
    for e in range(2):
        states, metrics = grid_epoch(states, data, jax.vmap(lambda k: jax.random.fold_in(k, e))(keys))
    assert grid_epoch._cache_size() == 1  # 6 runs, 2 epochs: one compilation
    assert metrics["upper_steps"].shape == (6,) and np.all(np.asarray(metrics["upper_steps"]) == 4)
    shifts = np.asarray(jax.vmap(solver.loss_params)(states.hparams).shift)  # [6, K]
    assert len({round(float(s), 6) for s in shifts[:, 0] - shifts[:, 1]}) == 6  # every run moved differently
    # Run 4 (rate 1.0, seed 0) equals a separate run with that number (same program, no vmap).
    index = runs.index((1.0, 0))
    state = solver.init(jax.random.key(0), _linear_params(2, 2), sweep.take(hyperparams, index))
    for e in range(2):
        state, _ = epoch(state, _tiny_search_data(0), jax.random.fold_in(jax.random.key(0), e))
    np.testing.assert_allclose(np.asarray(solver.loss_params(state.hparams).shift), shifts[index], rtol=1e-4, atol=1e-6)
    assert epoch._cache_size() == 1  # the unbatched epoch: compiled once, whatever the numbers


def test_traced_tau_gives_the_la_init_of_every_temperature():
    counts = np.array([90, 30, 10])
    config = ab.AutoBalanceConfig(search_space="shift_scale", init="la", cluster_size=2)
    solver = ab.autobalance(_linear_apply, config, class_counts=counts, num_features=2)
    for tau in (0.0, 0.5, 2.0):
        expected = hparams.make_search_space("shift_scale", counts, init="la", cluster_size=2, tau=tau).hparams
        got = jax.jit(solver.initial_hparams)(dataclasses.replace(config, tau=tau).hyperparams()).loss
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6), got, expected)


def test_steps_name_their_expected_input_type_and_group_ids_are_checked_before_training():
    config = ab.AutoBalanceConfig()
    search = ab.autobalance(_linear_apply, config, class_counts=[30, 10], num_features=2)
    retrain = ab.retrain_solver(_linear_apply, search)
    state = search.init(jax.random.key(0), _linear_params(2, 2))
    batch = _rows(np.zeros((4, 2)), np.array([0, 1, 0, 1]))
    with pytest.raises(TypeError, match="takes fairopt.solvers.autobalance.SearchBatch.*got Batch"):
        search.step(state, batch)
    with pytest.raises(TypeError, match="takes a fairopt.train.Batch.*got tuple"):
        retrain.step(state, (batch.x, batch.y))
    data = _dataset(np.zeros((6, 2)), np.array([0, 1] * 3), np.array([0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match=r"group ids must lie in \[0, num_groups=2\), got 0..2"):
        ab.search_and_retrain(_linear_apply, lambda key: _linear_params(2, 2), config, data, data,
                              key=jax.random.key(0), num_classes=2, num_groups=2, epochs=1, batch_size=4)


_GRID_SCRIPT = r"""
import json
from experiments import autobalance as e

settings = e.dataset_settings("synthetic_lt", epochs=2, batch_size=512, hidden=(), config=e.ab.AutoBalanceConfig(neumann_terms=1))
cache = {}
rows = e.run_grid("synthetic_lt", settings, [0, 1], {"upper_learning_rate": [0.01, 0.1, 1.0]}, chunk=4, cache=cache)
programs = [value for key, value in cache.items() if key[0] == "grid"]
selected = e.selected_rows(rows, "val_balanced_error")
print("RESULT" + json.dumps(dict(
    programs=len(programs), search=programs[0][2]._cache_size(), retrain=programs[0][3]._cache_size(),
    rows=[{k: r[k] for k in ("setting", "upper_learning_rate", "seed", "balanced_error", "val_balanced_error")} for r in rows],
    selected=sorted({(r["method"], r["setting"]) for r in selected}),
)))
"""


def test_entry_point_grid_of_three_upper_steps_by_two_seeds_compiles_each_phase_once():
    import json
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _GRID_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    # 6 runs in chunks of 4 (the last one padded): one program, each phase compiled once.
    assert (result["programs"], result["search"], result["retrain"]) == (1, 1, 1)
    rows = result["rows"]
    assert [(r["upper_learning_rate"], r["seed"]) for r in rows] == [(v, s) for v in (0.01, 0.1, 1.0) for s in (0, 1)]
    assert all(np.isfinite(r["balanced_error"]) and np.isfinite(r["val_balanced_error"]) for r in rows)
    (method, setting), = result["selected"]
    assert method == "autobalance (selected on val_balanced_error)"
    means = {label: np.mean([r["val_balanced_error"] for r in rows if r["setting"] == label]) for label in {r["setting"] for r in rows}}
    assert means[setting] == min(means.values())  # the best validation mean (ties: the first setting)


def test_trust_radius_zero_keeps_the_initial_loss_and_a_radius_bounds_the_distance_to_it():
    base = ab.AutoBalanceConfig(search_space="shift_scale", init="la", iter_interval=1, warmup_steps=0,
                                upper_learning_rate=0.5, neumann_terms=1)
    solver = ab.autobalance(_linear_apply, base, class_counts=[48, 16], num_features=2)
    epoch = ab.make_lockstep_search_epoch_fn(solver, num_rows=64, batch_size=16)
    radii = (0.0, 0.05, None)  # None: no trust region
    hyperparams = sweep.stack([dataclasses.replace(base, trust_radius=r).hyperparams() for r in radii])
    keys = jax.vmap(jax.random.key)(jnp.zeros(3, jnp.int32))
    params = jax.tree_util.tree_map(lambda leaf: jnp.stack([leaf] * 3), _linear_params(2, 2))
    states = jax.vmap(solver.init)(keys, params, hyperparams)
    states, _ = epoch(states, sweep.stack([_tiny_search_data(0)] * 3), keys)
    initial = ravel_pytree(solver.initial_hparams(base.hyperparams()))[0]
    distance = [float(jnp.linalg.norm(ravel_pytree(sweep.take(states.hparams, i))[0] - initial)) for i in range(3)]
    assert distance[0] == 0.0  # the initial loss itself: a sweep's "no search" point
    assert distance[2] > 0.05  # unconstrained, the four upper steps go further than the radius
    np.testing.assert_allclose(distance[1], 0.05, rtol=1e-4)  # projected onto the sphere
    with pytest.raises(ValueError, match="trust_radius must be None or >= 0"):
        ab.AutoBalanceConfig(trust_radius=-1.0)


def test_group_la_init_is_the_group_la_loss_and_needs_per_group():
    cells = np.array([[40, 5], [10, 25]])
    config = ab.AutoBalanceConfig(search_space="shift_scale", init="group_la", tau=1.5, per_group=True,
                                  val_objective="group_balanced_ce")
    solver = ab.autobalance(_linear_apply, config, class_counts=cells.sum(1), cell_counts=cells, num_features=2)
    loss = solver.loss_params(solver.initial_hparams())
    from fairopt import losses

    weight, shift = losses.group_logit_adjustment_params(cells, 1.5)
    np.testing.assert_allclose(np.asarray(loss.weight), weight, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(loss.shift), shift, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="group_la.*needs per_group=True"):
        ab.autobalance(_linear_apply, dataclasses.replace(config, per_group=False, val_objective="balanced_ce"),
                       class_counts=cells.sum(1), cell_counts=cells, num_features=2)


def test_validation_folds_fit_on_equal_halves_and_score_every_row_once():
    from experiments import autobalance as entry
    from fairopt import data

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [20, 9, 4])
    val = data.Dataset(features=rng.normal(size=(33, 2)).astype(np.float32), labels=labels.astype(np.int32),
                       groups=np.zeros(33, np.int32), class_names=("a", "b", "c"), group_names=("all",),
                       feature_names=("x0", "x1"), name="toy")
    folds = entry.validation_folds(val, seed=0)
    (fit_a, held_a), (fit_b, held_b) = folds
    assert len(fit_a) == len(fit_b) == 16
    key = lambda d: {tuple(row) for row in np.asarray(d.features)}  # noqa: E731
    assert key(held_a) | key(held_b) == key(val) and not key(held_a) & key(held_b)  # a partition
    assert not key(fit_a) & key(held_a) and not key(fit_b) & key(held_b)  # never scored on what it fit
    for fit in (fit_a, fit_b):
        assert set(np.asarray(fit.labels)) == {0, 1, 2}  # stratified: every class fits in both folds


def test_selection_splits_equal_counts_disjoint_folds_and_pooled_scores():
    from experiments import autobalance as entry
    from fairopt import data

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), [23, 11, 7]).astype(np.int32)
    train = data.Dataset(features=rng.normal(size=(41, 2)).astype(np.float32), labels=labels,
                         groups=np.zeros(41, np.int32), class_names=("a", "b", "c"), group_names=("all",),
                         feature_names=("x0", "x1"), name="toy")
    prepared = entry.Prepared(train.subset(np.arange(30)), train.subset(np.arange(30, 41)), train, train)
    assert entry.selection_splits(prepared, 0, 1) == [(prepared.search_train, prepared.search_val)]
    splits = entry.selection_splits(prepared, seed=0, folds=3)
    key = lambda d: {tuple(row) for row in np.asarray(d.features)}  # noqa: E731
    held = [key(h) for _, h in splits]
    for (fit, held_out), rows in zip(splits, held):
        np.testing.assert_array_equal(held_out.class_counts, [7, 3, 2])  # floor(n_k / 3) per fold
        assert len(fit) == 41 - 12 and not key(fit) & rows and key(fit) | rows == key(train)
    assert not (held[0] & held[1] or held[0] & held[2] or held[1] & held[2])  # each row held out at most once
    # Pooled: the metrics of all held-out rows scored together, not a mean of the folds' metrics.
    perfect = [np.eye(3, dtype=np.float32)[h.labels] for _, h in splits]
    wrong = [np.roll(p, 1, axis=1) for p in perfect]
    pooled = entry.pooled_scores([perfect[0], wrong[1], perfect[2]], [h for _, h in splits])
    np.testing.assert_allclose(pooled["error"], 100 / 3, rtol=1e-6)
    assert entry.pooled_scores([perfect[0], None, perfect[2]], [h for _, h in splits]) is None
    with pytest.raises(ValueError, match="fewer than folds=8"):
        entry.selection_splits(prepared, 0, 8)


def test_choose_skips_a_setting_with_a_diverged_seed():
    from experiments import autobalance as entry

    rows = [dict(method="m", setting="a", seed=0, diverged=0, val_balanced_error=5.0),
            dict(method="m", setting="a", seed=1, diverged=1),
            dict(method="m", setting="b", seed=0, diverged=0, val_balanced_error=7.0),
            dict(method="m", setting="b", seed=1, diverged=0, val_balanced_error=9.0)]
    assert entry.choose(rows, "balanced_error") == ("b", 8.0)


def test_vs_gamma_reaches_every_stacked_baseline_run_and_the_autobalance_vs_init():
    """Suspected in the second pass (equal validation scores at every gamma): gamma must reach
    the loss of each run of the vmapped baseline grid and AutoBalance's vs init."""
    from experiments import autobalance as entry
    from fairopt import data, losses

    rng = np.random.default_rng(0)
    counts = np.array([40, 12, 4])
    labels = np.repeat(np.arange(3), counts).astype(np.int32)
    train = data.Dataset(features=(rng.normal(size=(56, 2)) + labels[:, None]).astype(np.float32), labels=labels,
                         groups=np.zeros(56, np.int32), class_names=("a", "b", "c"), group_names=("all",),
                         feature_names=("x0", "x1"), name="toy")
    settings = entry.Settings(epochs=2, batch_size=16, hidden=())
    model = entry._model(train, ())
    spec = next(t for t in entry.TUNED_ROWS["longtail"] if t.method == "vs")
    gammas, tau = (0.0, 1.0), 0.5
    builds = [entry.tuned_baseline(spec, model["apply"], train, ab.AutoBalanceConfig(), settings, dict(gamma=g, tau=tau))
              for g in gammas]
    solver = builds[0][0]
    stacked = entry.fit_runs(solver, [h for _, h in builds], [0, 0], [train, train], settings, model["init"], {}, "vs")
    logits = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    for gamma, (_, hyper), state in zip(gammas, builds, stacked):
        separate, = entry.fit_runs(solver, [hyper], [0], [train], settings, model["init"], {}, ("vs", gamma))
        for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(separate.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # a stacked run is its own run
        loss_fn, _ = losses.make_parametric_loss("vs", counts)
        np.testing.assert_allclose(  # the numbers the run trained with give Kini et al.'s loss at its gamma
            loss_fn(logits, labels[:8], None, 0, state.hyperparams.loss_params),
            losses.kini_vs_loss(logits, labels[:8], counts, gamma=gamma, tau=tau), rtol=1e-6)
    difference = max(float(jnp.abs(a - b).max()) for a, b in zip(*(jax.tree_util.tree_leaves(s.params) for s in stacked)))
    assert difference > 1e-3  # gamma 0 (LA) and gamma 1 train different models
    for gamma in (0.1, 0.5):  # AutoBalance's vs init: the CDT ratios of its gamma
        config = ab.AutoBalanceConfig(search_space="shift_scale", init="vs", gamma=gamma, tau=tau)
        searcher = ab.autobalance(_linear_apply, config, class_counts=counts, num_features=2)
        scale = np.asarray(searcher.loss_params(searcher.initial_hparams()).scale)
        np.testing.assert_allclose(scale / scale[0], losses.cdt_scale(counts, gamma), rtol=1e-5)


def test_a_fallback_to_the_init_baseline_writes_its_loss_as_the_trajectory():
    """The designated row that takes no search step records the tuned baseline's loss numbers
    (before: an empty _trajectory.csv)."""
    from experiments import autobalance as entry
    from fairopt import data, losses

    counts, cells = np.array([30, 9, 3]), np.array([[20, 10], [4, 5], [1, 2]])
    labels = np.repeat(np.arange(3), counts).astype(np.int32)
    groups = np.concatenate([np.repeat([0, 1], row) for row in cells]).astype(np.int32)
    train = data.Dataset(features=np.zeros((42, 2), np.float32), labels=labels, groups=groups,
                         class_names=("a", "b", "c"), group_names=("g0", "g1"), feature_names=("x0", "x1"), name="toy")
    la = entry.no_search_trajectory("la", {"tau": 1.5}, train, seed=3)
    assert [(r["cls"], r["group"], r["epoch"], r["seed"], r["method"]) for r in la] == [
        (k, -1, 0, 3, entry.AUTOBALANCE_ROW) for k in range(3)]
    np.testing.assert_allclose([r["shift"] for r in la], 1.5 * np.log(counts / counts.sum()), rtol=1e-5)
    assert [(r["weight"], r["delta"], r["radius"], r["class_count"]) for r in la] == [(1.0, 1.0, 0.0, n) for n in counts]
    vs = entry.no_search_trajectory("vs", {"gamma": 0.3, "tau": 1.0}, train, seed=0)
    np.testing.assert_allclose([r["delta"] for r in vs], losses.cdt_scale(counts, 0.3), rtol=1e-6)
    group_la = entry.no_search_trajectory("group_la", {"tau": 1.0}, train, seed=0)
    weight, shift = losses.group_logit_adjustment_params(cells, 1.0)
    assert [(r["cls"], r["group"]) for r in group_la] == [(k, g) for k in range(3) for g in range(2)]
    np.testing.assert_allclose([r["weight"] for r in group_la], weight.ravel(), rtol=1e-6)
    np.testing.assert_allclose([r["shift"] for r in group_la], shift.ravel(), rtol=1e-5, atol=1e-6)


def test_pruned_suite_grids_are_subsets_of_the_full_ones_and_a_bad_name_is_an_error():
    from experiments import autobalance as entry
    from fairopt import sweep as sweep_lib

    def points(grid):
        return {tuple(sorted(p.items())) for part in grid for p in sweep_lib.product(part)}

    for suite in entry.SUITE_DATASETS:
        pruned, full = points(entry.suite_grid(suite)), points(entry.suite_grid(suite, "full"))
        assert pruned and pruned < full  # coarse to fine: a strict subset of the second pass's grid
    with pytest.raises(ValueError, match="must be one of pruned, full"):
        entry.suite_grid("longtail", "all")
