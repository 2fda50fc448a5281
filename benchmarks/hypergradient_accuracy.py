r"""Accuracy of the implicit hypergradient against its cost in Hessian-vector products (HVPs).

For inner problems with a known exact hypergradient, the relative error
``||dF/dh_approx - dF/dh_exact|| / ||dF/dh_exact||`` of :func:`fairopt.implicit.implicit_hypergradient`
with

* ``inverse="neumann"``, step ``alpha`` in {0.01, 0.1, 0.5, 0.9} x ``2 / lambda_max(H)`` and the
  absolute values 0.01, 0.1 and 1 (the FACIMS config default is 0.1, AutoBalance's code uses 1),
  and ``num_terms`` J (J HVPs);
* ``inverse="cg"`` with ``cg_iters`` k (k HVPs, counted below; ``jax.scipy.sparse.linalg.cg``,
  which fairopt used before, spent one more on the initial residual ``b - H x_0`` from ``x_0 = 0``);

against the budget k or J in {1, 2, 5, 10, 20, 50}. Problems (the set-ups of
``tests/test_implicit.py``, enlarged so the Hessian has a spread of eigenvalues):

* ``ridge``: weighted ridge regression, hyperparameters = per-example-group loss weights;
  exact hypergradient by differentiating the closed-form solution (float64); the outer loss
  has no direct term in h (so for ridge, logistic and mlp the hypergradient is all implicit
  term and the partial derivative alone has error 1);
* ``logistic``: weighted L2-regularised logistic regression; exact = the implicit-function
  formula with the dense float64 Hessian at a Newton-converged optimum;
* ``mlp``: a weighted L2-regularised one-hidden-layer tanh MLP (binary logistic loss), inner
  problem solved by L-BFGS then damped Newton in float64 (a local minimum: the Hessian's
  eigenvalues are reported); exact as for ``logistic``;
* ``facims``: the FACIMS hypergradient of one group (``facims_parts``: the KL + VS-loss inner
  objective of a Gaussian posterior over a small MLP, the upper objective on a validation
  batch), taken where the solver takes it — after a few FACIMS rounds, NOT at a converged inner
  optimum (10 Adagrad steps per round) — so its Hessian may be indefinite; exact = dense float64
  solve of the same system; errors reported for the global-posterior part (``facims_Z``) and
  the VS-parameter part (``facims_v``) of the hypergradient separately.

Approximations run in float32 (as the solvers do) at the float32-rounded optimum; references in
float64. Errors are medians over ``--seeds`` problem instances. No timing: cost is counted in
HVPs (an HVP costs a small multiple of a gradient; all methods also pay one outer gradient and
one mixed VJP).

    python -m benchmarks.hypergradient_accuracy            # writes benchmarks/results/hypergradient_accuracy.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from jax.flatten_util import ravel_pytree

from fairopt import data, implicit, models, posterior
from fairopt.solvers.facims import FacimsConfig, facims, facims_parts

FLAGS = flags.FLAGS
flags.DEFINE_list("seeds", ["0", "1", "2"], "Problem instances (median over them).")
flags.DEFINE_list("problems", ["ridge", "logistic", "mlp", "facims", "facims_credit_mlp"], "Problems to run.")
flags.DEFINE_integer("large_seeds", 1, "Seeds (the first ones of --seeds) for facims_credit_mlp.", lower_bound=1)
flags.DEFINE_string("output", "benchmarks/results/hypergradient_accuracy.json", "JSON output.")
flags.DEFINE_string("markdown", "", "Optional Markdown output of the tables.")

BUDGETS = (1, 2, 5, 10, 20, 50)
RELATIVE_ALPHAS = (0.01, 0.1, 0.5, 0.9)  # times 2 / lambda_max
ABSOLUTE_ALPHAS = (0.01, 0.1, 1.0)
NUM_EXAMPLE_GROUPS = 4


def as64(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) if np.issubdtype(np.asarray(a).dtype, np.floating) else np.asarray(a), tree)


def as32(tree):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float32) if np.issubdtype(np.asarray(a).dtype, np.floating) else jnp.asarray(a), tree
    )


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree_util.tree_leaves(tree)])


def relative_error(got, exact):
    got, exact = flat(got), flat(exact)
    return float(np.linalg.norm(got - exact) / np.linalg.norm(exact))


# ------------------------------------------------------------------------------ problems
# Each builder returns a dict: float32 closures inner(theta, h) and outer(theta, h, *args);
# theta_star, hparams, outer_args (float64 values; cast to float32 for the approximations);
# exact (float64 hypergradient w.r.t. hparams); lambda_min, lambda_max, dimension of the inner
# Hessian; optionally stationarity (||grad_theta G|| at theta_star) and "parts": {name: selector}
# to report sub-blocks of the hypergradient separately.


def typed(arrays: dict, dtype) -> dict:
    """jnp copies of numpy arrays: floats in ``dtype``, integers as int32 (the same in both modes).

    The float32 closures (what is evaluated) and the float64 ones (the reference, built inside
    ``jax.enable_x64``) each capture their own copies, so no float64 constant leaks into the
    float32 computation.
    """
    return {
        k: jnp.asarray(v, dtype) if np.issubdtype(np.asarray(v).dtype, np.floating) else jnp.asarray(v, jnp.int32)
        for k, v in arrays.items()
    }


def ridge_problem(seed, num_train=200, num_val=100, num_features=40, lam=1e-2):
    """tests/test_implicit.py's weighted ridge, with feature scales 10^0 ... 10^-1 (spread spectrum)."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, -1, num_features)
    w_true = rng.normal(size=num_features)
    x = rng.normal(size=(num_train, num_features)) * scales
    arrays = dict(
        x=x, y=x @ w_true + 0.5 * rng.normal(size=num_train), group=np.arange(num_train) % NUM_EXAMPLE_GROUPS
    )
    x_val = rng.normal(size=(num_val, num_features)) * scales
    y_val = x_val @ w_true + 0.3 * rng.normal(size=num_val) + 0.5
    weights = rng.uniform(0.5, 2.0, size=NUM_EXAMPLE_GROUPS)

    def closures(dtype):
        d = typed(arrays, dtype)

        def inner(theta, h):
            residual = d["x"] @ theta - d["y"]
            return 0.5 * jnp.mean(h[d["group"]] * residual**2) + 0.5 * lam * jnp.sum(theta**2)

        def outer(theta, h, xv, yv):
            # tests/test_implicit.py adds 0.05 ||h||^2 (a direct term); left out here, so the
            # whole hypergradient is the implicit term whose accuracy is measured
            return 0.5 * jnp.mean((xv @ theta - yv) ** 2)

        def solution(h):
            w = h[d["group"]] / num_train
            system = d["x"].T @ (w[:, None] * d["x"]) + lam * jnp.eye(num_features, dtype=dtype)
            return jnp.linalg.solve(system, d["x"].T @ (w * d["y"]))

        return inner, outer, solution

    with jax.enable_x64(True):
        inner64, outer64, solution64 = closures(jnp.float64)
        h64 = jnp.asarray(weights, jnp.float64)
        xv, yv = jnp.asarray(x_val, jnp.float64), jnp.asarray(y_val, jnp.float64)
        theta = solution64(h64)
        exact = jax.grad(lambda h: outer64(solution64(h), h, xv, yv))(h64)
        hessian = jax.hessian(inner64)(theta, h64)
        reference = dict(theta_star=np.asarray(theta), exact=np.asarray(exact), **spectrum_of(hessian))
    inner, outer, _ = closures(jnp.float32)
    return dict(inner=inner, outer=outer, hparams=weights, outer_args=(x_val, y_val), **reference)


def spectrum_of(hessian) -> dict:
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessian, np.float64))
    return dict(lambda_min=float(eigenvalues[0]), lambda_max=float(eigenvalues[-1]), dimension=int(eigenvalues.size))


def power_spectrum(hvp_flat, dimension: int, iterations: int = 300, seed: int = 0) -> dict:
    """Estimates of lambda_max and lambda_min of H by power iteration on H and on lambda_max I - H
    (float64, under x64; for Hessians too large to form)."""
    start = jax.random.normal(jax.random.key(seed), (dimension,), jnp.float64)

    def power(matvec):
        def body(_, v):
            w = matvec(v)
            return w / jnp.linalg.norm(w)

        v = jax.lax.fori_loop(0, iterations, body, start / jnp.linalg.norm(start))
        return jnp.vdot(v, matvec(v))

    lambda_max = float(jax.jit(lambda: power(hvp_flat))())
    shifted = float(jax.jit(lambda: power(lambda v: lambda_max * v - hvp_flat(v)))())
    return dict(lambda_min=lambda_max - shifted, lambda_max=lambda_max, dimension=dimension, spectrum_estimated=True)


def dense_implicit(inner, outer, theta, hparams, outer_args):
    """The implicit-function-theorem hypergradient with a dense Hessian solve (call under x64)."""
    flat_theta, unravel = ravel_pytree(theta)
    inner_flat = lambda t, h: inner(unravel(t), h)  # noqa: E731
    hessian = jax.hessian(inner_flat)(flat_theta, hparams)
    hessian = 0.5 * (hessian + hessian.T)
    grad_theta, grad_h = jax.grad(lambda t, h: outer(unravel(t), h, *outer_args), argnums=(0, 1))(flat_theta, hparams)
    u = jnp.linalg.solve(hessian, grad_theta)
    _, vjp = jax.vjp(lambda h: jax.grad(inner_flat)(flat_theta, h), hparams)
    (mixed,) = vjp(u)
    exact = jax.tree_util.tree_map(lambda a, b: a - b, grad_h, mixed)
    return exact, hessian, jnp.linalg.norm(jax.grad(inner_flat)(flat_theta, hparams))


def minimise(inner, theta0, hparams, iterations=100, tol=1e-12, lbfgs_steps=0):
    """A local minimum of ``inner(., hparams)`` on a flat float64 vector (call under x64).

    ``lbfgs_steps`` of optax L-BFGS first (a descent method: it does not stop at the saddle
    ``theta = 0`` of a tanh network as Newton's method can), then damped (Levenberg-Marquardt)
    Newton steps to float64 precision.
    """
    theta = theta0
    if lbfgs_steps:
        solver = optax.lbfgs()
        value_and_grad = optax.value_and_grad_from_state(lambda t: inner(t, hparams))

        @jax.jit
        def lbfgs_step(theta, state):
            value, grad = value_and_grad(theta, state=state)
            updates, state = solver.update(grad, state, theta, value=value, grad=grad, value_fn=lambda t: inner(t, hparams))
            return optax.apply_updates(theta, updates), state

        state = solver.init(theta)
        for _ in range(lbfgs_steps):
            theta, state = lbfgs_step(theta, state)
    grad = jax.jit(jax.grad(inner))
    hess = jax.jit(jax.hessian(inner))
    value = jax.jit(inner)
    damping = 1e-3
    for _ in range(iterations):
        g = grad(theta, hparams)
        if float(jnp.linalg.norm(g)) < tol:
            break
        h = hess(theta, hparams)
        while True:
            step = jnp.linalg.solve(h + damping * jnp.eye(h.shape[0]), g)
            candidate = theta - step
            if float(value(candidate, hparams)) <= float(value(theta, hparams)):
                theta, damping = candidate, max(damping / 10, 1e-12)
                break
            damping *= 10
            if damping > 1e8:
                return theta
    return theta


def classification_problem(seed, arrays, x_val, signs_val, predict, theta0, lam, lbfgs_steps=0):
    """Weighted, L2-regularised binary logistic loss of ``predict(theta, x)``; exact by dense solve."""
    weights = np.random.default_rng(seed + 7).uniform(0.5, 2.0, size=NUM_EXAMPLE_GROUPS)

    def closures(dtype):
        d = typed(arrays, dtype)

        def inner(theta, h):
            margins = d["signs"] * predict(theta, d["x"])
            return jnp.mean(h[d["group"]] * jax.nn.softplus(-margins)) + 0.5 * lam * jnp.sum(theta**2)

        def outer(theta, h, xv, sv):
            return jnp.mean(jax.nn.softplus(-sv * predict(theta, xv)))

        return inner, outer

    with jax.enable_x64(True):
        inner64, outer64 = closures(jnp.float64)
        h64 = jnp.asarray(weights, jnp.float64)
        theta = minimise(inner64, jnp.asarray(theta0, jnp.float64), h64, lbfgs_steps=lbfgs_steps)
        outer_args = (jnp.asarray(x_val, jnp.float64), jnp.asarray(signs_val, jnp.float64))
        exact, hessian, stationarity = dense_implicit(inner64, outer64, theta, h64, outer_args)
        reference = dict(
            theta_star=np.asarray(theta), exact=np.asarray(exact), stationarity=float(stationarity), **spectrum_of(hessian)
        )
    inner, outer = closures(jnp.float32)
    return dict(inner=inner, outer=outer, hparams=weights, outer_args=(x_val, signs_val), **reference)


def logistic_problem(seed, num_train=300, num_val=200, num_features=20, lam=1e-2):
    """tests/test_implicit.py's weighted logistic regression, larger and with spread feature scales."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, -1, num_features)
    direction = rng.normal(size=num_features)
    x = rng.normal(size=(num_train, num_features)) * scales
    signs = np.where(x @ direction + 0.8 * rng.normal(size=num_train) > 0, 1.0, -1.0)
    x_val = rng.normal(size=(num_val, num_features)) * scales
    signs_val = np.where(x_val @ direction + 0.8 * rng.normal(size=num_val) > 0, 1.0, -1.0)
    arrays = dict(x=x, signs=signs, group=np.arange(num_train) % NUM_EXAMPLE_GROUPS)
    return classification_problem(
        seed, arrays, x_val, signs_val, lambda theta, a: a @ theta, np.zeros(num_features), lam
    )


def mlp_problem(seed, num_train=300, num_val=200, num_features=10, hidden=16, lam=1e-2):
    """A weighted, L2-regularised one-hidden-layer tanh MLP (binary logistic loss), a local minimum."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_train, num_features))
    teacher = rng.normal(size=(num_features, 4))
    score = lambda a: np.tanh(a @ teacher).sum(axis=1)  # noqa: E731
    signs = np.where(score(x) + 0.5 * rng.normal(size=num_train) > 0, 1.0, -1.0)
    x_val = rng.normal(size=(num_val, num_features))
    signs_val = np.where(score(x_val) + 0.5 * rng.normal(size=num_val) > 0, 1.0, -1.0)
    shapes = {"w1": (num_features, hidden), "b1": (hidden,), "w2": (hidden,), "b2": ()}
    init = {k: rng.normal(size=s) * (1 / np.sqrt(num_features) if k == "w1" else 0.1) for k, s in shapes.items()}
    flat_init = np.concatenate([np.ravel(init[k]) for k in shapes])
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes.values()])

    def predict(theta, a):  # theta: the flat parameter vector (any float dtype)
        params = {k: theta[offsets[i]: offsets[i + 1]].reshape(s) for i, (k, s) in enumerate(shapes.items())}
        return jnp.tanh(a @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

    arrays = dict(x=x, signs=signs, group=np.arange(num_train) % NUM_EXAMPLE_GROUPS)
    return classification_problem(seed, arrays, x_val, signs_val, predict, flat_init, lam, lbfgs_steps=2000)


def facims_problem(seed, rounds=3, num_features=6, hidden=(16,), dense=True):
    """One group's FACIMS hypergradient after ``rounds`` rounds of the solver (CG 5, defaults).

    ``dense``: exact reference by a dense float64 Hessian solve (small models); otherwise by
    float64 CG run to a relative residual of 1e-12 (its residual is checked) and the spectrum
    estimated by power iteration.
    """
    dataset = data.synthetic_subgroups(
        900, num_features=num_features, class_proportions=(0.8, 0.2), group_proportions=(0.5, 0.3, 0.2), seed=seed
    )
    val_set = data.synthetic_subgroups(
        450, num_features=num_features, class_proportions=(0.8, 0.2), group_proportions=(0.5, 0.3, 0.2), seed=seed + 100
    )
    params, apply_fn = models.make_model("mlp", 2, num_features, jax.random.key(seed), hidden=hidden)
    config = FacimsConfig()
    kwargs = dict(class_counts=dataset.class_counts, group_counts=dataset.group_counts)
    solver = facims(apply_fn, config, **kwargs)
    parts = facims_parts(apply_fn, config, **kwargs)
    train, val = data.group_arrays(dataset), data.group_arrays(val_set)
    state = solver.init(jax.random.key(seed), params)
    step = jax.jit(solver.step)
    for _ in range(rounds):
        state, _ = step(state, (train, val))
    group = 0
    key = jax.random.key(1000 + seed)
    batch_key, noise_key, val_key, global_key = jax.random.split(key, 4)
    local_q = jax.tree_util.tree_map(lambda leaf: leaf[group], state.local_posteriors)
    batch = jax.tree_util.tree_map(lambda leaf: leaf[group], data.sample_group_batch(batch_key, train, 50))
    val_batch = jax.tree_util.tree_map(lambda leaf: leaf[group], data.sample_group_batch(val_key, val, 50))
    noise = posterior.standard_normal_like(noise_key, local_q, config.hypergradient_samples)
    global_noise = posterior.standard_normal_like(global_key, state.global_posterior, config.num_mc)
    hparams = (state.global_posterior, state.vs_params)

    def inner(q, h):
        return parts.inner_objective(q, h[0], h[1], batch, noise, group)

    def outer(q, h, val_batch, global_noise):
        return parts.upper_objective(q, h[0], val_batch, global_noise, group)

    outer_args = (val_batch, global_noise)
    with jax.enable_x64(True):
        q64, h64, args64 = as64(local_q), as64(hparams), as64(outer_args)
        if dense:
            exact, hessian, stationarity = dense_implicit(inner, outer, q64, h64, args64)
            reference = dict(exact=jax.device_get(exact), stationarity=float(stationarity), **spectrum_of(hessian))
        else:
            flat_q, unravel = ravel_pytree(q64)
            hvp_flat = lambda v: ravel_pytree(implicit.hvp(inner, q64, unravel(v), h64))[0]  # noqa: E731
            exact = jax.jit(
                lambda q, h, a: implicit.implicit_hypergradient(
                    inner, outer, q, h, a, inverse="cg", cg_iters=20000, tol=1e-12
                )[0]
            )(q64, h64, args64)
            # residual of the reference solve: ||H u - v|| / ||v|| with u from CG
            v = jax.grad(lambda q: outer(q, h64, *args64))(q64)
            u = jax.scipy.sparse.linalg.cg(
                lambda t: implicit.hvp(inner, q64, t, h64), v, tol=1e-12, maxiter=20000
            )[0]
            residual = jnp.linalg.norm(hvp_flat(ravel_pytree(u)[0]) - ravel_pytree(v)[0]) / jnp.linalg.norm(ravel_pytree(v)[0])
            stationarity = jnp.linalg.norm(ravel_pytree(jax.grad(inner)(q64, h64))[0])
            reference = dict(
                exact=jax.device_get(exact), stationarity=float(stationarity), reference_residual=float(residual),
                **power_spectrum(jax.jit(hvp_flat), int(flat_q.size), seed=seed),
            )
    return dict(
        inner=inner, outer=outer, theta_star=as64(local_q), hparams=as64(hparams), outer_args=as64(outer_args),
        parts={"Z": lambda tree: tree[0], "v": lambda tree: tree[1]}, **reference,
    )


def facims_credit_mlp_problem(seed):
    """:func:`facims_problem` with the credit MLP (22-400-200-100-2, 2 x 111k posterior parameters)."""
    return facims_problem(seed, num_features=22, hidden=(400, 200, 100), dense=False)


PROBLEMS = {
    "ridge": ridge_problem,
    "logistic": logistic_problem,
    "mlp": mlp_problem,
    "facims": facims_problem,
    "facims_credit_mlp": facims_credit_mlp_problem,
}


# ------------------------------------------------------------------------------ methods


def count_hvps(problem, options) -> int:
    """HVPs one call of implicit_hypergradient makes, counted at run time: the ``hvp_fn`` that
    ``implicit_hypergradient`` hands to ``fairopt.implicit.inverse_hvp`` is wrapped with a
    ``jax.debug.callback`` that fires once per product (inside the Neumann / CG loops too)."""
    counter = [0]
    original = implicit.inverse_hvp

    def counting_inverse_hvp(hvp_fn, v, **kwargs):
        def counted(t):
            jax.debug.callback(lambda: counter.__setitem__(0, counter[0] + 1))
            return hvp_fn(t)

        return original(counted, v, **kwargs)

    implicit.inverse_hvp = counting_inverse_hvp
    try:
        result = implicit.implicit_hypergradient(
            problem["inner"], problem["outer"], as32(problem["theta_star"]), as32(problem["hparams"]),
            as32(problem["outer_args"]), **options,
        )
        jax.block_until_ready(result)
        jax.effects_barrier()
    finally:
        implicit.inverse_hvp = original
    return counter[0]


def method_grid(lambda_max: float):
    """(label, options, budget) for every Neumann / CG setting."""
    grid = []
    for budget in BUDGETS:
        for relative in RELATIVE_ALPHAS:
            alpha = relative * 2.0 / lambda_max
            grid.append((f"neumann a={relative}x2/lmax", dict(inverse="neumann", alpha=alpha, num_terms=budget), budget))
        for alpha in ABSOLUTE_ALPHAS:
            grid.append((f"neumann a={alpha}", dict(inverse="neumann", alpha=alpha, num_terms=budget), budget))
        grid.append(("cg", dict(inverse="cg", cg_iters=budget), budget))
    return grid


def evaluate(problem, grid):
    """Relative errors of every method in ``grid``: one compilation per (inverse, budget), the
    Neumann step sizes vmapped (``alpha`` may be traced)."""
    inner, outer = problem["inner"], problem["outer"]
    theta, hparams, outer_args = as32(problem["theta_star"]), as32(problem["hparams"]), as32(problem["outer_args"])

    def hypergradient(options):
        return implicit.implicit_hypergradient(inner, outer, theta, hparams, outer_args, **options)[0]

    neumann = jax.jit(
        lambda alphas, num_terms: jax.vmap(lambda a: hypergradient(dict(inverse="neumann", alpha=a, num_terms=num_terms)))(alphas),
        static_argnums=1,
    )
    cg = jax.jit(lambda cg_iters: hypergradient(dict(inverse="cg", cg_iters=cg_iters)), static_argnums=0)
    results = [None] * len(grid)
    for budget in sorted({b for _, _, b in grid}):
        indices = [i for i, (_, o, b) in enumerate(grid) if b == budget and o["inverse"] == "neumann"]
        if indices:
            alphas = jnp.asarray([grid[i][1]["alpha"] for i in indices], jnp.float32)
            stacked = jax.device_get(neumann(alphas, budget))
            for position, i in enumerate(indices):
                results[i] = jax.tree_util.tree_map(lambda leaf: leaf[position], stacked)
        for i, (_, options, b) in enumerate(grid):
            if b == budget and options["inverse"] == "cg":
                results[i] = jax.device_get(cg(options["cg_iters"]))
    # the implicit term left out entirely (0 HVPs): the partial derivative only
    partial = jax.device_get(jax.jit(lambda h: jax.grad(lambda h: outer(theta, h, *outer_args))(h))(hparams))
    selectors = problem.get("parts") or {None: lambda tree: tree}
    errors = {}
    for name, select in selectors.items():
        exact = select(problem["exact"])
        errors[name] = {
            "partial_only": relative_error(select(partial), exact),
            "methods": [relative_error(select(result), exact) for result in results],
        }
    return errors


# ------------------------------------------------------------------------------ report


def fmt(value: float) -> str:
    if not np.isfinite(value) or value >= 1e3:
        return "div."
    return f"{value:.1e}" if value < 0.01 else f"{value:.3f}"


def tables(summary) -> str:
    out = []
    for name, entry in summary["problems"].items():
        spectrum = entry["spectrum"]
        estimated = " (power-iteration estimates)" if spectrum["estimated"] else ""
        condition = f"{spectrum['condition']:.3g}" if spectrum["lambda_min"] > 0 else "indefinite"
        out.append(
            f"### {name}\n\nHessian{estimated}: lambda_min = {spectrum['lambda_min']:.3g}, lambda_max = "
            f"{spectrum['lambda_max']:.3g}, 2/lambda_max = {2 / spectrum['lambda_max']:.3g}, condition number {condition}; "
            f"dimension {spectrum['dimension']}; seeds {entry['seeds']} (median); partial derivative alone (0 HVPs): "
            f"error {fmt(entry['partial_only'])}.\n"
        )
        header = "| method \\ J or k | " + " | ".join(str(b) for b in BUDGETS) + " |"
        out.append(header)
        out.append("|---|" + "---:|" * len(BUDGETS))
        for label in entry["labels"]:
            cells = [fmt(entry["errors"][label][str(b)]) for b in BUDGETS]
            shown = label if label != "cg" else "cg (k HVPs)"
            out.append(f"| {shown} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv):
    del argv
    seeds = [int(s) for s in FLAGS.seeds]
    summary = {"budgets": list(BUDGETS), "seeds": seeds, "command": " ".join(sys.argv), "jax": jax.__version__, "problems": {}}
    hvp_checks = {}
    for problem_name in FLAGS.problems:
        per_seed = []
        problem_seeds = seeds[: FLAGS.large_seeds] if problem_name == "facims_credit_mlp" else seeds
        for seed in problem_seeds:
            problem = PROBLEMS[problem_name](seed)
            grid = method_grid(problem["lambda_max"])
            if not hvp_checks:  # HVPs per call of each method, counted once (the same for every problem)
                hvp_checks = {
                    "neumann J=5": count_hvps(problem, dict(inverse="neumann", alpha=0.1, num_terms=5)),
                    "cg k=5": count_hvps(problem, dict(inverse="cg", cg_iters=5, tol=0.0)),
                    "cg k=20": count_hvps(problem, dict(inverse="cg", cg_iters=20, tol=0.0)),
                }
            errors = evaluate(problem, grid)
            info = {k: problem.get(k) for k in ("lambda_min", "lambda_max", "dimension", "stationarity", "reference_residual", "spectrum_estimated")}
            per_seed.append((info, grid, errors))
            print(f"{problem_name} seed {seed}: {info}", flush=True)
        labels = list(dict.fromkeys(label for label, _, _ in per_seed[0][1]))
        for part in per_seed[0][2]:
            name = problem_name if part is None else f"{problem_name}_{part}"
            table = {label: {} for label in labels}
            for index, (label, _, budget) in enumerate(per_seed[0][1]):
                table[label][str(budget)] = statistics.median(errors[part]["methods"][index] for _, _, errors in per_seed)
            infos = [info for info, _, _ in per_seed]
            summary["problems"][name] = {
                "labels": labels,
                "errors": table,
                "partial_only": statistics.median(errors[part]["partial_only"] for _, _, errors in per_seed),
                "spectrum": {
                    "lambda_min": statistics.median(i["lambda_min"] for i in infos),
                    "lambda_max": statistics.median(i["lambda_max"] for i in infos),
                    "condition": statistics.median(i["lambda_max"] / i["lambda_min"] for i in infos),
                    "dimension": infos[0]["dimension"],
                    "estimated": bool(infos[0]["spectrum_estimated"]),
                },
                "seeds": problem_seeds,
                "per_seed": infos,
                "per_seed_errors": [errors[part] for _, _, errors in per_seed],
            }
    summary["hvp_counts"] = hvp_checks
    summary["method_grid"] = [[label, budget] for label, _, budget in per_seed[0][1]]
    text = tables(summary)
    print(f"HVPs per call (counted): {hvp_checks}\n")
    print(text)
    Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.output).write_text(json.dumps(summary, indent=1))
    if FLAGS.markdown:
        Path(FLAGS.markdown).write_text(text)


if __name__ == "__main__":
    app.run(main)
