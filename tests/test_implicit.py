"""Tests of fairopt.implicit: HVPs, inverse-HVPs and implicit hypergradients against closed forms.

Reference hypergradients come from problems whose inner solution has a closed form (weighted
ridge regression; a Gaussian posterior with a KL prior and a quadratic data term) or is a
converged, unrolled Newton solver (weighted logistic regression): ``jax.grad`` through that
solution is the exact ``dF/dh``. Tolerances are for float32.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fairopt import implicit, posterior
from fairopt.posterior import Gaussian

NUM_EXAMPLE_GROUPS = 4


def relative_error(got, expected):
    got, expected = ravel_pytree(got)[0], ravel_pytree(expected)[0]
    return float(jnp.linalg.norm(got - expected) / jnp.linalg.norm(expected))


# ---------------------------------------------------------------- HVP and inverse-HVP


def nonquadratic(params, scale):
    return scale * jnp.sum(jnp.sin(params["a"]) * params["b"] ** 2) + jnp.sum(params["a"] ** 4)


def test_hvp_equals_dense_hessian_product():
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=3), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    tangent = {"a": jnp.asarray(rng.normal(size=3), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    flat_params, unravel = ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda x: nonquadratic(unravel(x), 1.5)))(flat_params)
    expected = unravel(hessian @ ravel_pytree(tangent)[0])
    chex.assert_trees_all_close(implicit.hvp(nonquadratic, params, tangent, 1.5), expected, rtol=1e-5, atol=1e-6)
    jitted = jax.jit(implicit.hvp, static_argnums=0)(nonquadratic, params, tangent, 1.5)
    chex.assert_trees_all_close(jitted, expected, rtol=1e-5, atol=1e-6)


def spd_problem(seed=0, size=6):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(size, size)))[0]
    eigenvalues = np.linspace(0.5, 2.0, size)
    matrix = (basis * eigenvalues) @ basis.T
    vector = rng.normal(size=size)
    hvp_fn = lambda t: {"x": jnp.asarray(matrix, jnp.float32) @ t["x"]}  # noqa: E731
    return matrix, vector, hvp_fn


def test_neumann_equals_its_series_definition():
    matrix, vector, hvp_fn = spd_problem()
    alpha, num_terms = 0.4, 7
    step = np.eye(len(vector)) - alpha * matrix
    expected = alpha * sum(np.linalg.matrix_power(step, j) @ vector for j in range(num_terms + 1))
    got = implicit.neumann_inverse_hvp(hvp_fn, {"x": jnp.asarray(vector, jnp.float32)}, alpha=alpha, num_terms=num_terms)
    np.testing.assert_allclose(got["x"], expected, rtol=1e-5, atol=1e-6)
    zero_terms = implicit.neumann_inverse_hvp(hvp_fn, {"x": jnp.asarray(vector, jnp.float32)}, alpha=alpha, num_terms=0)
    np.testing.assert_allclose(zero_terms["x"], alpha * vector, rtol=1e-6)


def test_neumann_error_shrinks_with_terms():
    """With alpha = 1 / lambda_max every eigen-component of the error (I - alpha H)^{J+1} H^{-1} v shrinks."""
    matrix, vector, hvp_fn = spd_problem(1)
    exact = np.linalg.solve(matrix, vector)
    errors = [
        np.linalg.norm(implicit.neumann_inverse_hvp(hvp_fn, {"x": jnp.asarray(vector, jnp.float32)}, alpha=0.5, num_terms=j)["x"] - exact)
        for j in (0, 2, 5, 10, 20, 40)
    ]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4 * np.linalg.norm(exact)


def test_cg_and_exact_solve_damped_system():
    matrix, vector, hvp_fn = spd_problem(2)
    v = {"x": jnp.asarray(vector, jnp.float32)}
    for damping in (0.0, 0.3):
        expected = np.linalg.solve(matrix + damping * np.eye(len(vector)), vector)
        cg = implicit.cg_inverse_hvp(hvp_fn, v, max_iters=20, damping=damping)
        exact = implicit.exact_inverse_hvp(hvp_fn, v, damping=damping)
        np.testing.assert_allclose(cg["x"], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(exact["x"], expected, rtol=1e-4, atol=1e-5)


def counted_spd_problem(seed):
    """:func:`spd_problem` whose HVP records every call in the returned list (jit-safe)."""
    matrix, vector, _ = spd_problem(seed)
    matrix_j = jnp.asarray(matrix, jnp.float32)
    calls = []

    def counted_hvp(t):
        jax.debug.callback(lambda: calls.append(1))
        return {"x": matrix_j @ t["x"]}

    return matrix, vector, counted_hvp, calls


def test_cg_matches_jax_scipy_cg_iterate_by_iterate_with_one_hvp_per_iteration():
    """fairopt's CG has jax.scipy's iterates (from x0 = 0) after every k, but makes k HVPs, not k + 1."""
    matrix, vector, counted_hvp, calls = counted_spd_problem(3)
    matrix_j = jnp.asarray(matrix, jnp.float32)
    v = {"x": jnp.asarray(vector, jnp.float32)}
    for iterations in (1, 2, 4):
        reference, _ = jax.scipy.sparse.linalg.cg(lambda t: {"x": matrix_j @ t["x"]}, v, tol=0.0, maxiter=iterations)
        calls.clear()
        got = jax.jit(lambda v: implicit.cg_inverse_hvp(counted_hvp, v, max_iters=iterations, tol=0.0))(v)
        jax.effects_barrier()
        np.testing.assert_allclose(got["x"], reference["x"], rtol=1e-5, atol=1e-6)
        assert len(calls) == iterations


def test_cg_stops_at_tolerance_and_survives_zero_curvature():
    matrix, vector, counted_hvp, calls = counted_spd_problem(4)
    v = {"x": jnp.asarray(vector, jnp.float32)}
    solution = implicit.cg_inverse_hvp(counted_hvp, v, max_iters=500, tol=1e-4)
    jax.effects_barrier()
    residual = np.linalg.norm(matrix @ np.asarray(solution["x"]) - vector) / np.linalg.norm(vector)
    assert residual < 1e-3 and len(calls) <= len(vector) + 2  # stopped by the tolerance, not max_iters
    # H = 0: the first curvature p^T H p is 0; the loop stops with x = 0 instead of dividing by 0
    zero = implicit.cg_inverse_hvp(lambda t: jax.tree_util.tree_map(jnp.zeros_like, t), v, max_iters=5)
    np.testing.assert_array_equal(zero["x"], np.zeros_like(vector))


def test_inverse_hvp_of_multi_leaf_pytree():
    """A pytree right-hand side with leaves of different shapes (block-diagonal H)."""
    params = {"a": jnp.array([0.3, -0.2, 0.5]), "b": jnp.array([[1.0, 0.4], [-0.7, 0.2]])}
    v = {"a": jnp.array([1.0, 2.0, -1.0]), "b": jnp.array([[0.5, -0.5], [1.0, 0.0]])}
    f = lambda p: jnp.sum(jnp.exp(p["a"])) + jnp.sum(jnp.cosh(p["b"])) + jnp.sum(p["a"]) * jnp.sum(p["b"])  # noqa: E731
    flat, unravel = ravel_pytree(params)

    @jax.jit
    def solves(params, v):
        expected = unravel(jnp.linalg.solve(jax.hessian(lambda x: f(unravel(x)))(flat), ravel_pytree(v)[0]))
        hvp_fn = lambda t: implicit.hvp(f, params, t)  # noqa: E731
        return expected, implicit.exact_inverse_hvp(hvp_fn, v), implicit.cg_inverse_hvp(hvp_fn, v, max_iters=30)

    expected, exact, cg = solves(params, v)
    chex.assert_trees_all_close(exact, expected, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(cg, expected, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- weighted ridge regression


def ridge_data(seed, num_train=40, num_val=30, num_features=4):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=num_features)
    x = rng.normal(size=(num_train, num_features))
    y = x @ w_true + 0.5 * rng.normal(size=num_train)
    x_val = rng.normal(size=(num_val, num_features))
    y_val = x_val @ w_true + 0.3 * rng.normal(size=num_val) + 0.5
    example_group = np.arange(num_train) % NUM_EXAMPLE_GROUPS
    weights = rng.uniform(0.5, 2.0, size=NUM_EXAMPLE_GROUPS)
    as32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return as32(weights), as32(x), as32(y), jnp.asarray(example_group), as32(x_val), as32(y_val)


RIDGE_LAMBDA = 0.5


def ridge_inner(theta, weights, x, y, example_group):
    """G = 1/(2n) sum_i h_{g(i)} (x_i theta - y_i)^2 + lam/2 ||theta||^2."""
    residual = x @ theta - y
    return 0.5 * jnp.mean(weights[example_group] * residual**2) + 0.5 * RIDGE_LAMBDA * jnp.sum(theta**2)


def ridge_solution(weights, x, y, example_group):
    """theta*(h) = (X^T W X / n + lam I)^{-1} X^T W y / n."""
    w = weights[example_group] / x.shape[0]
    system = x.T @ (w[:, None] * x) + RIDGE_LAMBDA * jnp.eye(x.shape[1])
    return jnp.linalg.solve(system, x.T @ (w * y))


def ridge_outer(theta, weights, x_val, y_val):
    """F = 1/(2m) ||X_val theta - y_val||^2 + 0.05 ||h||^2 (the last term gives a direct d_h F)."""
    return 0.5 * jnp.mean((x_val @ theta - y_val) ** 2) + 0.05 * jnp.sum(weights**2)


@jax.jit
def ridge_exact(weights, x, y, example_group, x_val, y_val):
    return jax.grad(
        lambda h, xv, yv: ridge_outer(ridge_solution(h, x, y, example_group), h, xv, yv), argnums=(0, 1, 2)
    )(weights, x_val, y_val)


def ridge_hypergradient(weights, x, y, example_group, x_val, y_val, **options):
    theta_star = ridge_solution(weights, x, y, example_group)
    return implicit.implicit_hypergradient(
        lambda theta, h: ridge_inner(theta, h, x, y, example_group),
        ridge_outer,
        theta_star,
        weights,
        (x_val, y_val),
        **options,
    )


NEUMANN = dict(inverse="neumann", alpha=0.5, num_terms=60)
RIDGE_INVERSES = {"exact": dict(inverse="exact"), "cg": dict(inverse="cg", cg_iters=10), "neumann": NEUMANN}


def test_ridge_hypergradient_matches_closed_form():
    data = ridge_data(0)
    exact_h, exact_xv, exact_yv = ridge_exact(*data)
    results = jax.jit(lambda *d: {name: ridge_hypergradient(*d, **opts) for name, opts in RIDGE_INVERSES.items()})(*data)
    for name, (grad_h, (grad_xv, grad_yv)) in results.items():
        assert relative_error(grad_h, exact_h) < 1e-4, name
        # outer_args do not enter the inner problem: their derivative is the partial one
        assert relative_error(grad_xv, exact_xv) < 1e-5, name
        assert relative_error(grad_yv, exact_yv) < 1e-5, name


def test_ridge_indirect_term_matters():
    """The implicit term is not negligible here: dropping it (d_h F alone) is far from exact."""
    data = ridge_data(0)
    exact_h = ridge_exact(*data)[0]
    direct_only = 0.1 * data[0]  # d/dh of 0.05 ||h||^2
    assert relative_error(direct_only, exact_h) > 0.1


def test_ridge_neumann_error_shrinks_with_terms():
    data = ridge_data(1)
    exact_h = ridge_exact(*data)[0]
    terms = (0, 3, 10, 40)
    results = jax.jit(lambda *d: [ridge_hypergradient(*d, inverse="neumann", alpha=0.5, num_terms=j)[0] for j in terms])(*data)
    errors = [relative_error(result, exact_h) for result in results]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3


def test_ridge_jit_equals_no_jit():
    data = ridge_data(2)
    for options in (dict(inverse="cg"), NEUMANN):
        jitted = jax.jit(lambda *d: ridge_hypergradient(*d, **options))(*data)
        chex.assert_trees_all_close(jitted, ridge_hypergradient(*data, **options), rtol=1e-5, atol=1e-7)


def stack(trees):
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


@pytest.mark.parametrize("inverse", ["cg", "neumann"])
def test_vmapped_groups_equal_loop_and_use_own_hessians(inverse):
    """Three groups with their own data and inner solutions; hparams h shared (in_axes None) as in
    FACIMS. vmap equals a loop, and the sum over groups equals the exact gradient of
    sum_g F_g(theta_g*(h)) — which needs each group's own Hessian (block-diagonal system)."""
    options = dict(inverse=inverse, alpha=0.5, num_terms=60, cg_iters=10)
    groups = [ridge_data(seed) for seed in (3, 4, 5)]
    shared_weights = groups[0][0]
    per_group = [data[1:] for data in groups]
    stacked = stack(per_group)

    def one_group(weights, x, y, example_group, x_val, y_val):
        return ridge_hypergradient(weights, x, y, example_group, x_val, y_val, **options)

    vmapped = jax.jit(jax.vmap(one_group, in_axes=(None, 0, 0, 0, 0, 0)))(shared_weights, *stacked)
    one_group_compiled = jax.jit(one_group)
    loop = stack([one_group_compiled(shared_weights, *d) for d in per_group])
    chex.assert_trees_all_close(vmapped, loop, rtol=1e-5, atol=1e-7)
    assert relative_error(jnp.sum(vmapped[0], axis=0), ridge_total_exact(shared_weights, per_group)) < 1e-4


def ridge_total_exact(weights, per_group):
    """Exact gradient of sum_g F_g(theta_g*(h), h) through the closed-form solutions."""

    def total_outer(h):
        return sum(ridge_outer(ridge_solution(h, x, y, g), h, xv, yv) for x, y, g, xv, yv in per_group)

    return jax.jit(jax.grad(total_outer))(weights)


def test_summed_hessian_shortcut_of_official_code_is_wrong():
    """The official FACIMS shortcut — one solve with the groups' summed Hessian applied to the
    summed outer gradients — is not the implicit function theorem: measurably off the exact
    gradient that the per-group (vmapped) solves reproduce."""
    groups = [ridge_data(seed) for seed in (3, 4, 5)]
    shared_weights = groups[0][0]
    per_group = [data[1:] for data in groups]

    @jax.jit
    def shortcut(weights):
        thetas = [ridge_solution(weights, x, y, g) for x, y, g, _, _ in per_group]
        summed_hessian = sum(jax.hessian(ridge_inner)(t, weights, x, y, g) for t, (x, y, g, _, _) in zip(thetas, per_group))
        summed_v = sum(jax.grad(ridge_outer)(t, weights, xv, yv) for t, (_, _, _, xv, yv) in zip(thetas, per_group))
        shared_u = jnp.linalg.solve(summed_hessian, summed_v)
        result = jax.grad(lambda h: sum(ridge_outer(t, h, xv, yv) for t, (_, _, _, xv, yv) in zip(thetas, per_group)))(weights)
        for t, (x, y, g, _, _) in zip(thetas, per_group):
            result -= jax.grad(lambda h: jnp.dot(jax.grad(ridge_inner)(t, h, x, y, g), shared_u))(weights)
        return result

    assert relative_error(shortcut(shared_weights), ridge_total_exact(shared_weights, per_group)) > 0.05


# ---------------------------------------------------------------- weighted logistic regression


LOGISTIC_LAMBDA = 0.1


def logistic_data(seed=0, num_train=60, num_features=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_train, num_features))
    signs = np.where(x @ rng.normal(size=num_features) + 0.8 * rng.normal(size=num_train) > 0, 1.0, -1.0)
    x_val = rng.normal(size=(40, num_features))
    signs_val = np.where(x_val @ rng.normal(size=num_features) > 0, 1.0, -1.0)
    example_group = np.arange(num_train) % NUM_EXAMPLE_GROUPS
    as32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return as32(x), as32(signs), jnp.asarray(example_group), as32(x_val), as32(signs_val)


def logistic_inner(theta, weights, x, signs, example_group):
    """G = mean_i h_{g(i)} log(1 + exp(-s_i x_i theta)) + lam/2 ||theta||^2."""
    return jnp.mean(weights[example_group] * jax.nn.softplus(-signs * (x @ theta))) + 0.5 * LOGISTIC_LAMBDA * jnp.sum(theta**2)


def logistic_outer(theta, weights, x_val, signs_val):
    return jnp.mean(jax.nn.softplus(-signs_val * (x_val @ theta)))


def newton_solve(weights, x, signs, example_group, iterations=12):
    """Newton's method from 0 (to float32 precision); differentiable by unrolling."""

    def step(_, theta):
        gradient = jax.grad(logistic_inner)(theta, weights, x, signs, example_group)
        hessian = jax.hessian(logistic_inner)(theta, weights, x, signs, example_group)
        return theta - jnp.linalg.solve(hessian, gradient)

    return jax.lax.fori_loop(0, iterations, step, jnp.zeros(x.shape[1]))


LOGISTIC_INVERSES = {
    "exact": dict(inverse="exact"),
    "cg": dict(inverse="cg", cg_iters=10),
    "neumann": dict(inverse="neumann", alpha=2.0, num_terms=80),
}


def test_logistic_hypergradient_matches_unrolled_newton():
    data = logistic_data()
    weights = jnp.array([0.5, 1.0, 1.5, 2.0])

    @jax.jit
    def compare(weights, x, signs, example_group, x_val, signs_val):
        theta_star = newton_solve(weights, x, signs, example_group)
        stationarity = jnp.linalg.norm(jax.grad(logistic_inner)(theta_star, weights, x, signs, example_group))
        # Differentiating through converged Newton iterations gives the exact dF/dh.
        reference = jax.grad(lambda h: logistic_outer(newton_solve(h, x, signs, example_group), h, x_val, signs_val))(weights)
        results = {
            name: implicit.implicit_hypergradient(
                lambda theta, h: logistic_inner(theta, h, x, signs, example_group),
                logistic_outer,
                theta_star,
                weights,
                (x_val, signs_val),
                **options,
            )[0]
            for name, options in LOGISTIC_INVERSES.items()
        }
        return stationarity, reference, results

    stationarity, reference, results = compare(weights, *data)
    assert float(stationarity) < 1e-6
    for name, grad_h in results.items():
        assert relative_error(grad_h, reference) < 1e-3, name


# ---------------------------------------------------------------- posterior-valued theta (FACIMS shape)


def gaussian_inner(q, hparams):
    """KL(q || p) + 1/2 sum_i c_i ((mu_i - t_i)^2 + s_i^2): a Gaussian local posterior pulled to a
    prior p and a target t with per-parameter precision c. Minimiser (closed form):
    1/s*^2 = 1/s_p^2 + c,  mu* = (mu_p / s_p^2 + c t) / (1/s_p^2 + c)."""
    prior, precision = hparams
    data = 0.5 * jnp.sum(precision * ((q.mean["w"] - GAUSSIAN_TARGET) ** 2 + jnp.exp(2 * q.log_std["w"])))
    return posterior.kl(q, prior) + data


GAUSSIAN_TARGET = jnp.array([1.0, -0.5, 2.0])


def gaussian_solution(hparams):
    prior, precision = hparams
    prior_precision = jnp.exp(-2 * prior.log_std["w"])
    total = prior_precision + precision
    mean = (prior.mean["w"] * prior_precision + precision * GAUSSIAN_TARGET) / total
    return Gaussian({"w": mean}, {"w": -0.5 * jnp.log(total)})


def gaussian_outer(q, hparams, validation_mean):
    prior, _ = hparams
    return jnp.sum((q.mean["w"] - validation_mean) ** 2) + jnp.sum(jnp.exp(q.log_std["w"])) + 0.1 * posterior.kl(q, prior)


GAUSSIAN_INVERSES = {
    "exact": dict(inverse="exact"),
    "cg": dict(inverse="cg", cg_iters=12),
    "neumann": dict(inverse="neumann", alpha=0.3, num_terms=80),
}


def test_gaussian_posterior_hypergradient_with_tuple_hparams():
    prior = Gaussian({"w": jnp.array([0.2, 0.1, -0.3])}, {"w": jnp.array([0.1, -0.2, 0.0])})
    hparams = (prior, jnp.array([0.5, 1.0, 2.0]))
    validation_mean = jnp.array([0.0, 1.0, 1.0])

    @jax.jit
    def compare(hparams, validation_mean):
        q_star = gaussian_solution(hparams)
        stationarity = jax.grad(gaussian_inner)(q_star, hparams)
        exact = jax.grad(lambda h, m: gaussian_outer(gaussian_solution(h), h, m), argnums=(0, 1))(hparams, validation_mean)
        results = {
            name: implicit.implicit_hypergradient(gaussian_inner, gaussian_outer, q_star, hparams, (validation_mean,), **options)
            for name, options in GAUSSIAN_INVERSES.items()
        }
        return stationarity, exact, results

    stationarity, (exact_h, exact_val), results = compare(hparams, validation_mean)
    assert max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree_util.tree_leaves(stationarity)) < 1e-5
    for name, (grad_h, (grad_val,)) in results.items():
        chex.assert_trees_all_equal_structs(grad_h, hparams)
        assert isinstance(grad_h[0], Gaussian), name
        assert relative_error(grad_h, exact_h) < 1e-4, name
        np.testing.assert_allclose(grad_val, exact_val, rtol=1e-5, err_msg=name)


# ---------------------------------------------------------------- errors


def test_bad_arguments_raise():
    data = ridge_data(0)
    with pytest.raises(ValueError, match="inverse must be one of 'neumann', 'cg', 'exact'"):
        ridge_hypergradient(*data, inverse="lissa")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        ridge_hypergradient(*data, alpha=0.0)
    with pytest.raises(ValueError, match="num_terms must be >= 0"):
        ridge_hypergradient(*data, num_terms=-1)
    with pytest.raises(TypeError, match="num_terms must be a Python int"):
        ridge_hypergradient(*data, num_terms=2.5)
    with pytest.raises(ValueError, match="cg_iters must be >= 1"):
        ridge_hypergradient(*data, inverse="cg", cg_iters=0)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        ridge_hypergradient(*data, damping=-1e-3)
    # settings of an inverse that is not used are not validated (FACIMS passes cg_iters=num_terms)
    jax.eval_shape(lambda *d: ridge_hypergradient(*d, inverse="neumann", num_terms=0, cg_iters=0), *data)
    with pytest.raises(TypeError, match="outer_args must be a tuple"):
        implicit.implicit_hypergradient(lambda t, h: jnp.sum(t**2), lambda t, h, v: jnp.sum(t), jnp.ones(2), 1.0, [1.0])
    _, _, hvp_fn = spd_problem()
    v = {"x": jnp.ones(6)}
    with pytest.raises(ValueError, match="alpha must be > 0"):
        implicit.neumann_inverse_hvp(hvp_fn, v, alpha=-0.1, num_terms=3)
    with pytest.raises(ValueError, match="max_iters must be >= 1"):
        implicit.cg_inverse_hvp(hvp_fn, v, max_iters=0)


def test_traced_alpha_and_damping_do_not_raise():
    data = ridge_data(0)
    fn = jax.jit(lambda alpha, damping: ridge_hypergradient(*data, inverse="neumann", alpha=alpha, num_terms=60, damping=damping))
    grad_h, _ = fn(0.5, 0.0)
    assert relative_error(grad_h, ridge_exact(*data)[0]) < 1e-4


def test_integer_leaves_in_outer_args_and_hparams():
    """Labels in outer_args and group indices in inner_hparams: float0 zero gradients, and the
    float hypergradient is unchanged (no need to close over integer batches)."""
    weights, x, y, example_group, x_val, y_val = ridge_data(0)
    val_rows = jnp.arange(x_val.shape[0])

    def outer(theta, hparams, x_val, y_val, rows):
        return ridge_outer(theta, hparams[0], x_val[rows], y_val[rows])

    @jax.jit
    def run(weights, example_group, x_val, y_val, rows):
        theta_star = ridge_solution(weights, x, y, example_group)
        return implicit.implicit_hypergradient(
            lambda theta, hparams: ridge_inner(theta, hparams[0], x, y, hparams[1]),
            outer,
            theta_star,
            (weights, example_group),
            (x_val, y_val, rows),
            inverse="cg",
        )

    (grad_weights, grad_groups), (grad_x_val, _, grad_rows) = run(weights, example_group, x_val, y_val, val_rows)
    assert grad_groups.dtype == jax.dtypes.float0 and grad_groups.shape == example_group.shape
    assert grad_rows.dtype == jax.dtypes.float0 and grad_rows.shape == val_rows.shape
    exact_h, exact_xv, _ = ridge_exact(weights, x, y, example_group, x_val, y_val)
    assert relative_error(grad_weights, exact_h) < 1e-4
    assert relative_error(grad_x_val, exact_xv) < 1e-5
