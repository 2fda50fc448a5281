"""Training-loop pieces (fairopt.train), the ERM solver and the experiment results helpers."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import common
from fairopt import losses, train
from fairopt.solvers.erm import erm, erm_hyperparams


def test_masked_mean_ignores_padding_and_is_zero_when_empty():
    values = jnp.array([1.0, 2.0, 100.0])
    assert float(losses.masked_mean(values, jnp.array([True, True, False]))) == pytest.approx(1.5)
    assert float(losses.masked_mean(values, None)) == pytest.approx(103.0 / 3)
    empty = jnp.zeros(3, bool)
    assert float(losses.masked_mean(values, empty)) == 0.0
    grad = jax.grad(lambda v: losses.masked_mean(v, empty))(values)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


@pytest.mark.parametrize("num_rows,batch_size", [(10, 3), (9, 3), (2, 5)])
def test_shuffled_batch_indices_cover_every_row_once(num_rows, batch_size):
    indices, mask = train.shuffled_batch_indices(jax.random.key(0), num_rows, batch_size)
    steps = -(-num_rows // batch_size)
    assert indices.shape == mask.shape == (steps, batch_size)
    chosen = np.asarray(indices)[np.asarray(mask)]
    np.testing.assert_array_equal(np.sort(chosen), np.arange(num_rows))
    assert int(mask.sum()) == num_rows


def test_check_finite_names_the_leaf_and_epoch():
    train.check_finite({"a": jnp.ones(2), "key": jax.random.key(0)}, what="state ", epoch=1)
    with pytest.raises(train.NonFiniteError, match=r"state \['b'\] at the end of epoch 7"):
        train.check_finite({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.nan])}, what="state ", epoch=7)


def _logistic_problem(seed=0, n=200, d=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = np.array([2.0, -1.0, 0.5], np.float32)
    y = (x @ w + 0.3 * rng.normal(size=n) > 0).astype(np.int32)
    groups = (x[:, 0] > 0).astype(np.int32)
    return x, y, groups


def _linear_apply(params, x):
    return x @ params["w"] + params["b"]


def _ce(logits, labels, groups, epoch):
    del groups, epoch
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def test_erm_fit_learns_a_separable_problem_and_is_deterministic():
    x, y, groups = _logistic_problem()
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    solver = erm(_linear_apply, _ce, optax.sgd(0.5), steps_per_epoch=4)
    runs = []
    for _ in range(2):
        state = solver.init(jax.random.key(0), params)
        state, history = train.fit(
            solver, state, x, y, groups, epochs=20, batch_size=64, key=jax.random.key(1)
        )
        runs.append(state)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    accuracy = np.mean(np.argmax(train.predict_in_batches(solver.predict, runs[0], x), -1) == y)
    assert accuracy > 0.9
    assert int(runs[0].step) == 20 * 4
    jax.tree_util.tree_map(np.testing.assert_array_equal, runs[0].params, runs[1].params)


def test_fit_stops_with_a_named_error_on_divergence():
    x, y, groups = _logistic_problem()
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}

    def exploding(logits, labels, groups, epoch):
        return _ce(logits, labels, groups, epoch) * jnp.inf

    solver = erm(_linear_apply, exploding, optax.sgd(0.1))
    with pytest.raises(train.NonFiniteError, match="epoch 1"):
        train.fit(solver, solver.init(None, params), x, y, groups, epochs=3, batch_size=50, key=jax.random.key(0))


def test_fit_rejects_bad_arguments():
    x, y, groups = _logistic_problem()
    solver = erm(_linear_apply, _ce, optax.sgd(0.1))
    state = solver.init(None, {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)})
    with pytest.raises(ValueError, match="batch_size"):
        train.fit(solver, state, x, y, groups, epochs=1, batch_size=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="epochs"):
        train.fit(solver, state, x, y, groups, epochs=-1, batch_size=4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="steps_per_epoch"):
        erm(_linear_apply, _ce, optax.sgd(0.1), steps_per_epoch=0)


def test_erm_factory_optimizer_with_traced_learning_rate_matches_a_ready_optimizer():
    x, y, groups = _logistic_problem(n=64)
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    batch = train.Batch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(groups), jnp.ones(64, bool))
    ready = erm(_linear_apply, _ce, optax.adam(0.05))
    factory = erm(_linear_apply, _ce, optax.adam, learning_rate=0.05)
    step = jax.jit(factory.step)
    states = [ready.init(None, params), factory.init(None, params)]
    for _ in range(2):
        states = [jax.jit(ready.step)(states[0], batch)[0], step(states[1], batch)[0]]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), states[0].params, states[1].params)
    other = factory.init(None, params, erm_hyperparams(learning_rate=0.5))  # another number, same program
    step(other, batch)
    assert step._cache_size() == 1


def test_check_group_ids_names_the_bad_ids_and_the_fix():
    train.check_group_ids(np.array([0, 1, 1]), 2)
    with pytest.raises(ValueError, match=r"ids \[2, 5\] outside \[0, num_groups=2\); build the solver with num_groups=6"):
        train.check_group_ids(np.array([0, 2, 5, 1]), 2, what="groups")
    with pytest.raises(ValueError, match="integer group ids"):
        train.check_group_ids(np.array([0.0, 1.0]), 2)
    calls = []
    solver = erm(_linear_apply, _ce, optax.sgd(0.1))._replace(check_data=lambda x, y, g: calls.append(len(g)))
    x, y, groups = _logistic_problem(n=20)
    train.fit(solver, solver.init(None, {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}), x, y, groups, epochs=1,
              batch_size=10, key=jax.random.key(0))
    assert calls == [20]  # fit validates the data with the solver's check before training


def test_predict_in_batches_matches_one_call_with_padding():
    x, _, _ = _logistic_problem(n=50)
    state = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    predict = lambda s, x: jax.nn.softmax(_linear_apply(s, x))  # noqa: E731
    np.testing.assert_allclose(
        train.predict_in_batches(predict, state, x, batch_size=16), np.asarray(predict(state, x)), rtol=1e-6
    )


def test_parse_seeds_validates():
    assert common.parse_seeds(["0", "42"]) == (0, 42)
    for bad, message in ((["x"], "integers"), (["-1"], ">= 0"), ([], "empty"), (["1", "1"], "repeated")):
        with pytest.raises(ValueError, match=message):
            common.parse_seeds(bad)


def test_write_results_is_atomic_and_refuses_to_overwrite(tmp_path):
    rows = [dict(method="a", seed=0, x=1.0), dict(method="a", seed=1, x=3.0), dict(method="b", seed=0, x=float("nan"))]
    summary = common.summarize(rows, by="method", columns=["x"])
    assert summary.loc["a", "x_mean"] == pytest.approx(2.0)
    assert summary.loc["a", "x_std"] == pytest.approx(1.0)
    markdown = common.markdown_table(summary, ["x"], paper={"a": {"x": 2.5}})
    assert "2.0000 ± 1.0000" in markdown and "2.5000" in markdown
    targets = common.write_results(tmp_path, "run", rows, summary, markdown, config={"k": 1}, overwrite=False)
    payload = json.loads(targets["json"].read_text())
    assert payload["config"] == {"k": 1}
    assert payload["runs"][2]["x"] is None  # NaN is written as null, never as invalid JSON
    before = targets["csv"].read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        common.write_results(tmp_path, "run", rows[:1], summary, markdown, overwrite=False)
    assert targets["csv"].read_text() == before
    assert not list(tmp_path.glob(".*.tmp"))
    common.write_results(tmp_path, "run", rows[:1], summary, markdown, overwrite=True)
    assert targets["csv"].read_text() != before


def test_best_iterate_keeps_the_strictly_best_validation_iterate_per_run():
    """The tracker keeps the state of highest validation balanced accuracy (ties keep the earlier
    epoch); vmapped over runs with padded, masked validation sets it equals the per-run result."""
    from fairopt.train import best_iterate_tracker

    predict = lambda state, x: jax.nn.softmax(state["w"] * x, axis=-1)  # noqa: E731
    init, update = best_iterate_tracker(predict, num_classes=2)
    x = jnp.array([[1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [5.0, -5.0]])
    y = jnp.array([0, 1, 1, 1])
    mask = jnp.array([True, True, True, False])  # the padded row would flip the score if it counted
    # w = 1 gets rows 0, 1 right (BA 3/4), w = -1 gets row 2 only (BA 1/4), w = 2 ties w = 1.
    trajectory = [1.0, -1.0, 2.0]
    best = init({"w": jnp.zeros(())})
    assert float(best.score) == -np.inf and int(best.epoch) == 0
    for epoch, w in enumerate(trajectory, start=1):
        best = update(best, {"w": jnp.asarray(w)}, epoch, x, y, mask)
    assert (float(best.state["w"]), float(best.score), int(best.epoch)) == (1.0, 0.75, 1)

    # Two runs at once: the second run's trajectory is the negation, so its best is epoch 2.
    batched = jax.jit(jax.vmap(update, in_axes=(0, 0, None, 0, 0, 0)))
    best = jax.vmap(init)({"w": jnp.zeros(2)})
    for epoch, w in enumerate(trajectory, start=1):
        best = batched(best, {"w": jnp.asarray([w, -w])}, epoch, jnp.stack([x, x]), jnp.stack([y, y]),
                       jnp.stack([mask, mask]))
    np.testing.assert_array_equal(best.epoch, [1, 2])
    np.testing.assert_allclose(best.score, [0.75, 0.75])
    np.testing.assert_allclose(best.state["w"], [1.0, 1.0])


def test_erm_with_loss_params_sweeps_la_tau_in_one_program_and_matches_fixed_la_runs():
    x, y, groups = _logistic_problem(n=64)
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    batch = train.Batch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(groups), jnp.ones(64, bool))
    counts = np.bincount(y, minlength=2)
    taus = (0.5, 2.0)
    builds = [losses.make_parametric_loss("la", counts, tau=tau) for tau in taus]
    solver = erm(_linear_apply, builds[0][0], optax.sgd(0.5), loss_params=builds[0][1])
    hyperparams = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[erm_hyperparams(loss_params=p) for _, p in builds])
    states = jax.vmap(lambda h: solver.init(None, params, h))(hyperparams)
    step = jax.jit(jax.vmap(solver.step, in_axes=(0, None)))
    for _ in range(3):
        states, _ = step(states, batch)
    assert step._cache_size() == 1
    for index, tau in enumerate(taus):  # each run = erm with the fixed LA loss at that tau
        fixed = erm(_linear_apply, losses.make_loss("la", counts, tau=tau), optax.sgd(0.5))
        state = fixed.init(None, params)
        for _ in range(3):
            state, _ = fixed.step(state, batch)
        np.testing.assert_allclose(states.params["w"][index], state.params["w"], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="loss_params must be given exactly when the solver was built with loss_params"):
        solver.init(None, params, erm_hyperparams())
