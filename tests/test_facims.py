"""FACIMS solver: vmapped group step vs a loop, reductions, hypergradient vs finite differences,
partial groups, and a short run against ERM."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fairopt import data, losses, metrics, models, posterior, sweep
from fairopt.solvers.erm import erm
from fairopt.solvers.facims import FacimsConfig, VSParams, facims, facims_parts
from fairopt.losses import masked_mean
from fairopt.train import fit

NUM_FEATURES, NUM_CLASSES, NUM_GROUPS, BATCH = 4, 2, 3, 8


def _tiny_problem(seed=0, rows=300):
    dataset = data.synthetic_subgroups(
        rows,
        num_features=NUM_FEATURES,
        class_proportions=(0.8, 0.2),
        group_proportions=(0.5, 0.3, 0.2),
        seed=seed,
    )
    params, apply_fn = models.make_model("linear", NUM_CLASSES, NUM_FEATURES, jax.random.key(seed))
    return dataset, params, apply_fn


def _group_inputs(dataset, parts, params, key):
    """One group-stacked batch / noise / posterior set as the solver builds them."""
    grouped = data.group_arrays(dataset)
    batch = data.sample_group_batch(key, grouped, BATCH)
    global_q = posterior.gaussian_init(params, init_std=0.08)
    local_q = jax.tree_util.tree_map(lambda leaf: jnp.stack([leaf * (1 + 0.1 * g) for g in range(NUM_GROUPS)]), global_q)
    noise = jax.vmap(lambda k: posterior.standard_normal_like(k, global_q, 2))(jax.random.split(key, NUM_GROUPS))
    opt_state = jax.vmap(parts.local_optimizer.init)(local_q)
    return grouped, batch, global_q, local_q, noise, opt_state


def _index(tree, g):
    return jax.tree_util.tree_map(lambda leaf: leaf[g], tree)


def test_vmapped_middle_step_equals_a_loop_over_groups():
    dataset, params, apply_fn = _tiny_problem()
    config = FacimsConfig(num_mc=2, sharpness=0.1)
    parts = facims_parts(apply_fn, config, class_counts=dataset.class_counts, group_counts=dataset.group_counts)
    _, batch, global_q, local_q, noise, opt_state = _group_inputs(dataset, parts, params, jax.random.key(3))
    groups = jnp.arange(NUM_GROUPS)
    active = jnp.ones(NUM_GROUPS, bool)
    vmapped = jax.jit(jax.vmap(parts.middle_step, in_axes=(0, 0, None, None, 0, 0, 0, 0, 0)))(
        local_q, opt_state, global_q, parts.v_bar, batch, noise, groups, parts.sharpness, active
    )
    for g in range(NUM_GROUPS):
        looped = parts.middle_step(
            _index(local_q, g), _index(opt_state, g), global_q, parts.v_bar, _index(batch, g),
            _index(noise, g), g, parts.sharpness[g], True,
        )
        for got, want in zip(jax.tree_util.tree_leaves(_index(vmapped, g)), jax.tree_util.tree_leaves(looped)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=1e-6)


def test_without_sharpness_the_middle_step_is_kl_regularised_vs_training():
    """beta = 0, v frozen at v_bar: one middle step is one Adagrad step on
    alpha_low KL(Z^a || Z) + mean_xi L_vs(mu^a + noise_scale sigma^a xi), written here independently."""
    dataset, params, apply_fn = _tiny_problem()
    config = FacimsConfig(method="facims_ii", num_mc=2, alpha_low=0.3, local_learning_rate=0.05)
    parts = facims_parts(apply_fn, config, class_counts=dataset.class_counts, group_counts=dataset.group_counts)
    _, batch, global_q, local_q, noise, opt_state = _group_inputs(dataset, parts, params, jax.random.key(4))
    g = 1
    q, xi, (x, y, mask) = _index(local_q, g), _index(noise, g), _index(batch, g)
    prior = np.asarray(dataset.class_counts, np.float64)
    shift = jnp.asarray(config.tau * np.log(prior / prior.sum()), jnp.float32)  # v_bar = tau log pi

    def objective(q):
        def loss_at(n):
            w = jax.tree_util.tree_map(lambda m, s, e: m + config.noise_scale * jnp.exp(s) * e, q.mean, q.log_std, n)
            return masked_mean(losses.vs_loss(apply_fn(w, x), y, shift=shift), mask)

        return 0.3 * posterior.kl(q, global_q) + jnp.mean(jax.vmap(loss_at)(xi))

    grads = jax.grad(objective)(q)
    optimizer = optax.adagrad(0.05)
    updates, _ = optimizer.update(grads, optimizer.init(q), q)
    expected = optax.apply_updates(q, updates)
    got, _, _ = parts.middle_step(q, _index(opt_state, g), global_q, parts.v_bar, (x, y, mask), xi, g, 0.0, True)
    chex_close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)  # noqa: E731
    jax.tree_util.tree_map(chex_close, got, expected)
    assert float(parts.sharpness.max()) == 0.0


def test_hypergradient_of_v_matches_finite_differences():
    """d/dv of the upper objective through Z^a*(Z, v): implicit (exact inverse) vs central
    differences of the objective at the re-solved inner optimum, on a tiny linear model."""
    dataset, params, apply_fn = _tiny_problem(seed=1)
    config = FacimsConfig(method="facims_i", num_mc=1, alpha_low=1.0, inverse="exact", init_std=0.3, damping=0.0)
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params)
        parts = facims_parts(apply_fn, config, class_counts=dataset.class_counts, group_counts=dataset.group_counts)
        grouped = data.group_arrays(dataset)
        g = 0
        train_batch = jax.tree_util.tree_map(
            lambda a: a[g], data.sample_group_batch(jax.random.key(0), grouped, 32)
        )
        train_batch = (jnp.asarray(train_batch.x, jnp.float64), train_batch.y, train_batch.mask)
        val_batch = jax.tree_util.tree_map(lambda a: a[g], data.sample_group_batch(jax.random.key(1), grouped, 32))
        val_batch = (jnp.asarray(val_batch.x, jnp.float64), val_batch.y, val_batch.mask)
        global_q = posterior.gaussian_init(params, init_std=0.3)
        noise = posterior.standard_normal_like(jax.random.key(2), global_q, 1)
        global_noise = posterior.standard_normal_like(jax.random.key(3), global_q, 1)
        v = VSParams(jnp.array([-0.2, -1.5], jnp.float64), jnp.array([0.1, -0.1], jnp.float64))

        @jax.jit
        def solve_inner(v):
            inner = lambda q: parts.inner_objective(q, global_q, v, train_batch, noise, g)  # noqa: E731
            optimizer = optax.lbfgs()
            state = optimizer.init(global_q)

            def body(carry, _):
                q, state = carry
                value, grad = optax.value_and_grad_from_state(inner)(q, state=state)
                updates, state = optimizer.update(grad, state, q, value=value, grad=grad, value_fn=inner)
                return (optax.apply_updates(q, updates), state), None

            (q, _), _ = jax.lax.scan(body, (global_q, state), None, length=200)
            return q

        def upper_at(v):
            return parts.upper_objective(solve_inner(v), global_q, val_batch, global_noise, g)

        q_star = solve_inner(v)
        grad_norm = optax.tree.norm(jax.grad(lambda q: parts.inner_objective(q, global_q, v, train_batch, noise, g))(q_star))
        assert float(grad_norm) < 1e-7
        _, implicit_grad_v, _ = parts.group_hypergradient(
            q_star, global_q, v, train_batch, noise, val_batch, global_noise, g
        )
        flat_v, unravel = jax.flatten_util.ravel_pytree(v)
        eps = 1e-4
        finite = []
        for i in range(flat_v.size):
            step = jnp.zeros_like(flat_v).at[i].set(eps)
            finite.append((upper_at(unravel(flat_v + step)) - upper_at(unravel(flat_v - step))) / (2 * eps))
        implicit_flat = jax.flatten_util.ravel_pytree(implicit_grad_v)[0]
        np.testing.assert_allclose(np.asarray(implicit_flat), np.asarray(finite), rtol=1e-3, atol=1e-7)
        assert np.abs(np.asarray(finite)).max() > 1e-4  # a real signal, not a vacuous match


def test_partial_group_step_changes_only_the_sampled_groups():
    dataset, params, apply_fn = _tiny_problem()
    config = FacimsConfig(num_mc=1, middle_steps=2, upper_steps=1, groups_per_step=1, cg_iters=3, group_mapping="vmap")
    solver = facims(apply_fn, config, class_counts=dataset.class_counts, group_counts=dataset.group_counts, batch_size=BATCH, val_batch_size=BATCH)
    state = solver.init(jax.random.key(0), params)
    grouped = data.group_arrays(dataset)
    step = jax.jit(solver.step)
    changed_sets = set()
    for _ in range(4):
        new_state, _ = step(state, (grouped, grouped))
        changed = [
            g
            for g in range(NUM_GROUPS)
            if any(
                not np.array_equal(np.asarray(a[g]), np.asarray(b[g]))
                for a, b in zip(jax.tree_util.tree_leaves(new_state.local_posteriors), jax.tree_util.tree_leaves(state.local_posteriors))
            )
        ]
        assert len(changed) == 1
        changed_sets.add(changed[0])
        state = new_state
    assert len(changed_sets) > 1  # the sampled group varies between steps


def test_group_mappings_give_the_vmapped_round():
    """A traced loop over groups ("unroll") and lax.map ("map") give the vmapped round's state,
    in FACIMS and in FAMS (no hypergradient)."""
    dataset, params, apply_fn = _tiny_problem()
    grouped = data.group_arrays(dataset)
    for method in ("facims", "fams"):
        results = {}
        for mapping in ("vmap", "unroll", "map"):
            config = FacimsConfig(method=method, num_mc=2, middle_steps=3, upper_steps=2, cg_iters=3, group_mapping=mapping)
            solver = facims(apply_fn, config, class_counts=dataset.class_counts, group_counts=dataset.group_counts,
                            batch_size=BATCH, val_batch_size=BATCH)
            state = solver.init(jax.random.key(0), params)
            step = jax.jit(solver.step)
            for _ in range(2):
                state, metrics = step(state, (grouped, grouped))
            results[mapping] = (state, metrics)
        vmapped, vmapped_metrics = results["vmap"]
        for mapping in ("unroll", "map"):
            mapped, mapped_metrics = results[mapping]
            for name in ("global_posterior", "local_posteriors", "vs_params"):
                chex.assert_trees_all_close(getattr(mapped, name), getattr(vmapped, name), rtol=1e-5, atol=1e-6)
            chex.assert_trees_all_close(mapped_metrics, vmapped_metrics, rtol=1e-5, atol=1e-6)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="method='bogus'; choose one of facims"):
        FacimsConfig(method="bogus")
    with pytest.raises(ValueError, match="alpha_low must be >= 0"):
        FacimsConfig(alpha_low=-1.0)
    dataset, params, apply_fn = _tiny_problem()
    with pytest.raises(ValueError, match="groups_per_step=5 exceeds the 3 groups"):
        facims(apply_fn, FacimsConfig(groups_per_step=5), class_counts=dataset.class_counts, group_counts=dataset.group_counts)
    with pytest.raises(ValueError, match="class_counts"):
        facims(apply_fn, FacimsConfig(), class_counts=[10, 0], group_counts=dataset.group_counts)
    with pytest.raises(ValueError, match="group_mapping='loop'; choose one of vmap, unroll, map, auto"):
        FacimsConfig(group_mapping="loop")


@pytest.mark.slow
def test_short_run_beats_erm_on_balanced_accuracy():
    dataset = data.synthetic_subgroups(
        3000, num_features=6, class_proportions=(0.9, 0.1), group_proportions=(0.6, 0.3, 0.1), seed=0
    )
    splits = data.standardize(data.split(dataset, (0.5, 0.2, 0.3), seed=0))
    train = splits.train
    hidden = dict(hidden=(32,))
    params, apply_fn = models.make_model("mlp", 2, train.num_features, jax.random.key(0), **hidden)

    erm_solver = erm(apply_fn, losses.make_loss("ce", class_counts=train.class_counts), optax.adam(1e-2))
    erm_state, _ = fit(erm_solver, erm_solver.init(None, params), train.features, train.labels, train.groups,
                       epochs=20, batch_size=64, key=jax.random.key(1))

    config = FacimsConfig(num_mc=2, middle_steps=5, upper_steps=2, cg_iters=5, num_eval_samples=5, group_mapping="vmap")
    solver = facims(apply_fn, config, class_counts=train.class_counts, group_counts=train.group_counts)
    state = solver.init(jax.random.key(2), params)
    step = jax.jit(solver.step)
    inputs = (data.group_arrays(data.resample_per_group(train, 200, seed=0)), data.group_arrays(splits.val))
    for _ in range(30):
        state, _ = step(state, inputs)

    def balanced_accuracy(predict, state):
        probs = predict(state, splits.test.features)
        return metrics.report(np.asarray(probs), splits.test.labels, splits.test.groups,
                              num_classes=2, num_groups=3)["balanced_accuracy"]

    assert balanced_accuracy(solver.predict, state) > balanced_accuracy(erm_solver.predict, erm_state) + 0.02


# ---- hyperparameters as data ------------------------------------------------------------------


def _sweep_inputs(seeds=(0, 1)):
    """Per-seed datasets (different class/group counts) padded to one shape, and a solver."""
    problems = [_tiny_problem(seed, rows=300 - 50 * seed) for seed in seeds]
    pad_to = max(int(p[0].group_counts.max()) for p in problems)
    grouped = [data.group_arrays(p[0], pad_to=pad_to) for p in problems]
    dataset, _, apply_fn = problems[0]
    config = FacimsConfig(num_mc=2, middle_steps=2, upper_steps=1, cg_iters=3, num_eval_samples=3, group_mapping="vmap")
    solver = facims(apply_fn, config, class_counts=dataset.class_counts, group_counts=dataset.group_counts,
                    batch_size=BATCH, val_batch_size=BATCH)
    return problems, grouped, config, solver


def test_a_vmapped_sweep_equals_separate_runs_and_compiles_once():
    """4 alpha_low values x 2 seeds (different class and group counts) as one vmapped program:
    each run's state after 2 rounds equals the same run alone, and the round compiled once."""
    import dataclasses

    from fairopt import sweep

    problems, grouped, config, solver = _sweep_inputs()
    settings = [dataclasses.replace(config, alpha_low=a) for a in (0.1, 0.4, 0.7, 1.0)]
    runs = [(c, s) for c in settings for s in range(len(problems))]
    assert problems[0][0].class_counts.tolist() != problems[1][0].class_counts.tolist()  # the counts are data too

    def init_args(c, s):
        dataset, params, _ = problems[s]
        return jax.random.key(s), params, c.hyperparams(), dataset.class_counts, dataset.group_counts

    stacked = [sweep.stack(parts) for parts in zip(*(init_args(c, s) for c, s in runs))]
    states = jax.vmap(lambda k, p, h, cc, gc: solver.init(k, p, h, class_counts=cc, group_counts=gc))(*stacked)
    inputs = sweep.stack([(grouped[s], grouped[s]) for _, s in runs])
    round_ = jax.jit(jax.vmap(solver.step))
    for _ in range(2):
        states, _ = round_(states, inputs)
    assert round_._cache_size() == 1

    single_round = jax.jit(solver.step)
    for index, (c, s) in enumerate(runs):
        key, params, hyperparams, class_counts, group_counts = init_args(c, s)
        alone = solver.init(key, params, hyperparams, class_counts=class_counts, group_counts=group_counts)
        for _ in range(2):
            alone, _ = single_round(alone, (grouped[s], grouped[s]))
        chex.assert_trees_all_close(sweep.take(states, index).global_posterior, alone.global_posterior, rtol=2e-4, atol=2e-5)
        chex.assert_trees_all_close(sweep.take(states, index).vs_params, alone.vs_params, rtol=2e-4, atol=2e-5)
    assert single_round._cache_size() == 1  # new numbers (settings, counts) never recompile
    # the settings really differ: alpha_low 0.1 and 1.0 end in different posteriors
    first, last = sweep.take(states, 0).global_posterior.mean, sweep.take(states, 6).global_posterior.mean
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(last))) > 1e-4


def test_step_rejects_inputs_of_the_wrong_type_with_the_expected_type_named():
    problems, grouped, config, solver = _sweep_inputs(seeds=(0,))
    dataset, params, _ = problems[0]
    state = solver.init(jax.random.key(0), params)
    with pytest.raises(TypeError, match=r"takes FacimsData\(train, val\).*got GroupedArrays"):
        solver.step(state, grouped[0])
    batch = (dataset.features, dataset.labels)
    with pytest.raises(TypeError, match=r"got tuple\(ndarray, ndarray\)"):
        solver.step(state, batch)
    two_groups = data.group_arrays(data.synthetic_subgroups(100, num_features=NUM_FEATURES, class_proportions=(0.8, 0.2),
                                                             group_proportions=(0.5, 0.5), seed=0))
    with pytest.raises(ValueError, match="have 2 groups but the solver was built for 3"):
        solver.step(state, (two_groups, two_groups))
    with pytest.raises(TypeError, match="hyperparams must be a FacimsHyperparams"):
        solver.init(jax.random.key(0), params, {"alpha_low": 0.1})


def test_config_splits_neumann_terms_and_cg_iters_and_checks_every_number():
    with pytest.raises(ValueError, match="cg_iters must be >= 1, got 0"):
        FacimsConfig(cg_iters=0)
    FacimsConfig(inverse="neumann", neumann_terms=0)  # J = 0 is the one-term series alpha v
    with pytest.raises(ValueError, match="neumann_terms must be >= 0"):
        FacimsConfig(neumann_terms=-1)
    with pytest.raises(ValueError, match="alpha_up must be a finite number"):
        FacimsConfig(alpha_up=float("nan"))
    with pytest.raises(ValueError, match="log_std_min=2.0 must be below log_std_max=1.0"):
        FacimsConfig(log_std_min=2.0, log_std_max=1.0)
    assert set(FacimsConfig.hyperparameter_names()) <= {f.name for f in __import__("dataclasses").fields(FacimsConfig)}


def test_optimizer_slots_take_factories_and_ready_transformations():
    problems, grouped, config, solver = _sweep_inputs(seeds=(0,))
    dataset, params, apply_fn = problems[0]
    counts = dict(class_counts=dataset.class_counts, group_counts=dataset.group_counts)
    q = posterior.gaussian_init(params, init_std=0.5)
    grads = jax.tree_util.tree_map(lambda leaf: jnp.full_like(leaf, 0.3), q)

    def first_update(parts):
        optimizer = parts.local_optimizer
        return optimizer.update(grads, optimizer.init(q), q)[0]

    default = first_update(facims_parts(apply_fn, config, **counts))
    factory = first_update(facims_parts(apply_fn, config, local_optimizer=optax.adagrad, **counts))
    chex.assert_trees_all_close(default, factory)  # the default is optax.adagrad(local_learning_rate)
    faster = first_update(facims_parts(apply_fn, config, hyperparams=config.hyperparams()._replace(local_learning_rate=jnp.float32(0.8)), **counts))
    chex.assert_trees_all_close(faster, jax.tree_util.tree_map(lambda u: 2 * u, default), rtol=1e-6)  # the rate is data
    ready = optax.adam(1e-2)
    assert facims_parts(apply_fn, config, local_optimizer=ready, **counts).local_optimizer is ready
    with pytest.raises(TypeError, match="local_optimizer must be an optax GradientTransformation or a factory"):
        facims(apply_fn, config, local_optimizer=0.1, **counts)
    # predict takes a key; without one it draws from the state's own key (deterministic per state)
    state = solver.init(jax.random.key(0), params)
    x = jnp.asarray(dataset.features[:5])
    predict = jax.jit(solver.predict)
    np.testing.assert_array_equal(predict(state, x), predict(state, x))
    assert not np.allclose(predict(state, x, jax.random.key(1)), predict(state, x, jax.random.key(2)))


def test_mean_prediction_is_the_softmax_at_the_posterior_mean():
    import dataclasses

    problems, _, config, _ = _sweep_inputs(seeds=(0,))
    dataset, params, apply_fn = problems[0]
    solver = facims(apply_fn, dataclasses.replace(config, prediction="mean"), class_counts=dataset.class_counts,
                    group_counts=dataset.group_counts)
    state = solver.init(jax.random.key(0), params)
    x = jnp.asarray(dataset.features[:7])
    np.testing.assert_allclose(solver.predict(state, x), jax.nn.softmax(apply_fn(params, x), axis=-1), rtol=1e-6)


def test_damping_is_a_traced_hyperparameter_of_the_hypergradient():
    """``damping`` solves (H + damping I) u = v: with a huge damping the hypergradient of v
    shrinks like 1 / damping (u -> v / damping), and a negative value is refused."""
    import dataclasses

    with pytest.raises(ValueError, match="damping must be >= 0"):
        FacimsConfig(damping=-1.0)
    dataset, params, apply_fn = _tiny_problem()
    config = FacimsConfig(num_mc=2, cg_iters=5)
    grouped, batch, global_q, local_q, noise, _ = _group_inputs(
        dataset, facims_parts(apply_fn, config, class_counts=dataset.class_counts, group_counts=dataset.group_counts),
        params, jax.random.key(5),
    )

    one = lambda tree: jax.tree_util.tree_map(lambda leaf: leaf[1], tree)  # noqa: E731  (group 1: Z^1 != Z)

    @jax.jit
    def vs_hypergradient(damping):  # one compiled function of the traced damping
        hyperparams = config.hyperparams()._replace(damping=damping)
        parts = facims_parts(apply_fn, config, class_counts=dataset.class_counts, group_counts=dataset.group_counts,
                             hyperparams=hyperparams)
        _, grad_vs, _ = parts.group_hypergradient(one(local_q), global_q, parts.v_bar, one(batch), one(noise),
                                                  one(batch), one(noise), 1)
        return jax.flatten_util.ravel_pytree(grad_vs)[0]

    undamped, large, larger = (vs_hypergradient(jnp.float32(d)) for d in (0.0, 1e4, 1e5))
    assert float(jnp.linalg.norm(undamped)) > 1e-6
    np.testing.assert_allclose(np.asarray(larger) * 10, np.asarray(large), rtol=2e-2, atol=1e-9)


# ---- the official code's upper objective and layers as options ---------------------------------


def test_whole_validation_upper_objective_averages_every_row_of_the_group():
    """upper_objective on data.whole_group_batch = alpha_up KL + the VS loss at v_bar averaged over
    all of the group's rows (picked here with numpy), padding excluded; a whole_validation round
    is the same for the validation rows reordered inside each group (a sampled batch would
    change), so every row and no padding enters."""
    dataset, params, apply_fn = _tiny_problem()
    config = FacimsConfig(num_mc=1, middle_steps=1, upper_steps=1, cg_iters=2, whole_validation=True, group_mapping="vmap")
    counts = dict(class_counts=dataset.class_counts, group_counts=dataset.group_counts)
    solver = facims(apply_fn, config, **counts, batch_size=BATCH, val_batch_size=BATCH)
    pad = int(dataset.group_counts.max()) + 5
    g, global_q = 1, posterior.gaussian_init(params, init_std=0.5)
    local_q = global_q._replace(mean=jax.tree_util.tree_map(lambda m: 1.1 * m, global_q.mean))
    noise = posterior.standard_normal_like(jax.random.key(6), global_q, 1)

    @jax.jit
    def upper_and_round(grouped, reordered):
        parts = facims_parts(apply_fn, config, **counts)
        value = parts.upper_objective(local_q, global_q, _index(data.whole_group_batch(grouped), g), noise, g)
        state = solver.init(jax.random.key(0), params)
        rounds = jax.vmap(lambda val: solver.step(state, (grouped, val))[0].global_posterior)(
            sweep.stack([grouped, reordered])
        )
        weights = parts.sample_weights(global_q, _index(noise, 0))
        return value, posterior.kl(local_q, global_q), apply_fn(weights, jnp.asarray(dataset.features)), rounds

    reordered = data.group_arrays(dataset.subset(np.random.default_rng(0).permutation(len(dataset))), pad_to=pad)
    value, divergence, logits, rounds = upper_and_round(data.group_arrays(dataset, pad_to=pad), reordered)
    rows = dataset.groups == g
    prior = np.asarray(dataset.class_counts, np.float64) / np.sum(dataset.class_counts)
    log_probs = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)[rows] + config.tau * np.log(prior)))
    expected = config.alpha_up * float(divergence) - np.mean(log_probs[np.arange(rows.sum()), dataset.labels[rows]])
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    chex.assert_trees_all_close(sweep.take(rounds, 0), sweep.take(rounds, 1), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="validation_draws must be None or >= 1, got 0"):
        FacimsConfig(validation_draws=0)


def test_local_reparameterisation_keeps_the_expected_objective():
    """local_reparameterisation: the Monte-Carlo noise is one key per forward pass; the inner
    objective averaged over many passes equals weight sampling's (each row's logits have the
    same distribution) and differs from the noise-free loss; prediction averages keyed passes."""
    import dataclasses

    from fairopt.solvers.facims import monte_carlo_noise

    dataset, params, apply_fn = _tiny_problem()
    config = FacimsConfig(num_mc=1, num_eval_samples=3, local_reparameterisation=True)
    counts = dict(class_counts=dataset.class_counts, group_counts=dataset.group_counts)
    hyperparams = config.hyperparams()._replace(noise_scale=jnp.float32(1.0))
    global_q = posterior.gaussian_init(params, init_std=0.7)
    batch = _index(data.sample_group_batch(jax.random.key(1), data.group_arrays(dataset), 64), 0)
    solver = facims(apply_fn, config, **counts)
    x = jnp.asarray(dataset.features[:6])

    @jax.jit
    def objectives_and_predictions(key):
        values = []
        for local in (True, False):  # 400 x 5 passes (sample_draws unrolls its draws)
            chosen = dataclasses.replace(config, local_reparameterisation=local)
            parts = facims_parts(apply_fn, chosen, hyperparams=hyperparams, **counts)
            estimate = lambda k: parts.inner_objective(  # noqa: E731
                global_q, global_q, parts.v_bar, batch, monte_carlo_noise(chosen, k, global_q, 5), 0
            )
            values.append(jnp.mean(jax.vmap(estimate)(jax.random.split(key, 400))))
        noiseless = jax.tree_util.tree_map(jnp.zeros_like, posterior.standard_normal_like(key, global_q, 1))
        values.append(parts.inner_objective(global_q, global_q, parts.v_bar, batch, noiseless, 0))
        state = solver.init(jax.random.key(0), params)
        return values, solver.predict(state, x), solver.predict(state, x, key)

    (local, sampled, noiseless), probs, other = objectives_and_predictions(jax.random.key(2))
    assert abs(float(local) - float(sampled)) < 0.02 < abs(float(sampled) - float(noiseless))
    np.testing.assert_allclose(np.sum(probs, -1), 1.0, rtol=1e-5)
    assert not np.allclose(probs, other)
