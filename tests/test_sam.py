"""Tests of fairopt.sam: perturbation norm/direction, ASAM formula, closed-form quadratic,
consistency with optax.contrib.sam, per-group radius under vmap, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

from fairopt import sam


def tree_norm(tree):
    return float(np.sqrt(sum(np.sum(np.asarray(leaf, np.float64) ** 2) for leaf in jax.tree_util.tree_leaves(tree))))


def random_tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(scale * rng.normal(size=(3, 2)), jnp.float32), "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}


# A small quadratic L(w) = 0.5 w^T A w - c^T w over a two-leaf pytree (flattened order: b, w).
A = jnp.asarray(np.diag(np.linspace(0.5, 3.0, 10)) + 0.1, jnp.float32)
C = jnp.asarray(np.linspace(-1.0, 1.0, 10), jnp.float32)


def flatten(params):
    return jnp.concatenate([params["b"], params["w"].ravel()])


def quadratic(params):
    w = flatten(params)
    return 0.5 * w @ A @ w - C @ w


def unflatten(vector):
    return {"b": vector[:4], "w": vector[4:].reshape(3, 2)}


# ---------------------------------------------------------------- perturbation


@pytest.mark.parametrize("rho", [0.01, 0.5, 3.0])
def test_perturbation_has_norm_rho_and_direction_of_gradient(rho):
    grads = random_tree(0)
    perturbation = sam.sam_perturbation(grads, rho)
    assert tree_norm(perturbation) == pytest.approx(rho, rel=1e-5)
    chex.assert_trees_all_close(perturbation, jax.tree_util.tree_map(lambda g: g * rho / tree_norm(grads), grads), rtol=1e-5)


def test_norm_is_global_over_leaves_not_per_leaf():
    grads = {"small": jnp.array([3.0]), "large": jnp.array([4.0])}
    perturbation = sam.sam_perturbation(grads, 1.0)
    np.testing.assert_allclose(perturbation["small"], [0.6], rtol=1e-6)
    np.testing.assert_allclose(perturbation["large"], [0.8], rtol=1e-6)


def test_zero_gradient_gives_zero_perturbation_without_nan():
    perturbation = sam.sam_perturbation({"w": jnp.zeros(3)}, 0.1)
    np.testing.assert_array_equal(perturbation["w"], np.zeros(3))


def test_adaptive_perturbation_formula():
    """ASAM: eps = rho T^2 g / ||T g|| with T = |w| (+ offset)."""
    grads, params = random_tree(1), random_tree(2)
    rho = 0.3
    for offset in (0.0, 0.01):
        t = jax.tree_util.tree_map(lambda w: np.abs(np.asarray(w, np.float64)) + offset, params)
        tg = jax.tree_util.tree_map(lambda a, g: a * np.asarray(g, np.float64), t, grads)
        expected = jax.tree_util.tree_map(lambda a, b: rho * a * b / tree_norm(tg), t, tg)
        got = sam.sam_perturbation(grads, rho, adaptive=True, params=params, adaptive_offset=offset)
        chex.assert_trees_all_close(got, jax.tree_util.tree_map(lambda e: e.astype(np.float32), expected), rtol=1e-5)
        # scale invariance: ||T^{-1} eps|| = rho
        assert tree_norm(jax.tree_util.tree_map(lambda e, a: np.asarray(e) / a, got, t)) == pytest.approx(rho, rel=1e-5)


def test_adaptive_is_invariant_to_rescaling_a_layer():
    """Scaling w by c and g by 1/c (a reparameterisation that leaves the loss unchanged for
    scale-invariant nets) scales ASAM's eps by c: eps / w is unchanged. Plain SAM is not."""
    grads, params = random_tree(3), random_tree(4)
    scaled_params = {"w": 10.0 * params["w"], "b": params["b"]}
    scaled_grads = {"w": grads["w"] / 10.0, "b": grads["b"]}
    eps = sam.sam_perturbation(grads, 0.2, adaptive=True, params=params)
    scaled_eps = sam.sam_perturbation(scaled_grads, 0.2, adaptive=True, params=scaled_params)
    np.testing.assert_allclose(scaled_eps["w"], 10.0 * eps["w"], rtol=1e-5)
    np.testing.assert_allclose(scaled_eps["b"], eps["b"], rtol=1e-5)
    plain, scaled_plain = sam.sam_perturbation(grads, 0.2), sam.sam_perturbation(scaled_grads, 0.2)
    assert not np.allclose(scaled_plain["w"], 10.0 * plain["w"], rtol=1e-2)


def test_bad_arguments_raise():
    grads = random_tree(0)
    with pytest.raises(ValueError, match="rho must be >= 0"):
        sam.sam_perturbation(grads, -0.1)
    with pytest.raises(ValueError, match="needs params="):
        sam.sam_perturbation(grads, 0.1, adaptive=True)
    with pytest.raises(ValueError, match="same pytree structure"):
        sam.sam_perturbation(grads, 0.1, adaptive=True, params={"w": grads["w"]})
    with pytest.raises(ValueError, match="rho must be >= 0"):
        sam.sam_gradient(quadratic, random_tree(0), -1.0)


def test_per_group_traced_rho_under_vmap():
    grads = [random_tree(seed) for seed in range(3)]
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *grads)
    radii = jnp.array([0.0, 0.1, 2.0])
    vmapped = jax.vmap(sam.sam_perturbation)(stacked, radii)
    for group, (g, rho) in enumerate(zip(grads, radii)):
        one = jax.tree_util.tree_map(lambda leaf: leaf[group], vmapped)
        chex.assert_trees_all_close(one, sam.sam_perturbation(g, float(rho)), rtol=1e-6, atol=1e-7)
        assert tree_norm(one) == pytest.approx(float(rho), rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- gradient


def test_sam_gradient_on_quadratic_matches_closed_form():
    params = random_tree(5)
    rho = 0.25
    w = flatten(params)
    g = A @ w - C
    eps = rho * g / jnp.linalg.norm(g)
    loss, grads = sam.sam_gradient(quadratic, params, rho)
    np.testing.assert_allclose(loss, quadratic(params), rtol=1e-6)
    chex.assert_trees_all_close(grads, unflatten(A @ (w + eps) - C), rtol=1e-5, atol=1e-6)


def test_sam_gradient_with_zero_rho_is_plain_gradient():
    params = random_tree(6)
    _, grads = sam.sam_gradient(quadratic, params, 0.0)
    chex.assert_trees_all_close(grads, jax.grad(quadratic)(params), rtol=1e-6)


def test_sam_gradient_passes_args_and_aux():
    params = random_tree(7)

    def loss_with_aux(p, shift):
        value = quadratic(p) + shift
        return value, {"shifted": value}

    (loss, aux), grads = sam.sam_gradient(loss_with_aux, params, 0.1, 2.0, has_aux=True)
    np.testing.assert_allclose(loss, quadratic(params) + 2.0, rtol=1e-6)
    np.testing.assert_allclose(aux["shifted"], loss)
    _, plain = sam.sam_gradient(quadratic, params, 0.1)
    chex.assert_trees_all_close(grads, plain, rtol=1e-6)


def test_sam_gradient_jit_equals_no_jit():
    params = random_tree(8)
    for adaptive in (False, True):
        fn = lambda p, r: sam.sam_gradient(quadratic, p, r, adaptive=adaptive)  # noqa: E731
        chex.assert_trees_all_close(jax.jit(fn)(params, 0.3), fn(params, 0.3), rtol=1e-6)


def test_one_sam_sgd_step_equals_optax_contrib_sam():
    """optax.contrib.sam(sgd(lr), chain(normalize(), sgd(rho)), sync_period=2): the first call moves
    to w + eps, the second applies sgd at w with the gradient at w + eps — fairopt's step."""
    params = random_tree(9)
    lr, rho = 0.1, 0.05
    _, grads = sam.sam_gradient(quadratic, params, rho)
    ours = optax.apply_updates(params, optax.sgd(lr).update(grads, optax.sgd(lr).init(params))[0])

    optimizer = optax.contrib.sam(optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)), sync_period=2)
    state = optimizer.init(params)
    updates, state = optimizer.update(jax.grad(quadratic)(params), state, params)
    adversarial = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(
        adversarial,
        jax.tree_util.tree_map(jnp.add, params, sam.sam_perturbation(jax.grad(quadratic)(params), rho)),
        rtol=1e-6,
    )
    updates, state = optimizer.update(jax.grad(quadratic)(adversarial), state, adversarial)
    theirs = optax.apply_updates(adversarial, updates)
    chex.assert_trees_all_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_sam_descends_on_quadratic():
    """A few SAM-SGD steps decrease a convex quadratic (sanity of sign conventions)."""
    params = random_tree(10)
    start = float(quadratic(params))
    step = jax.jit(lambda p: jax.tree_util.tree_map(lambda w, g: w - 0.1 * g, p, sam.sam_gradient(quadratic, p, 0.05)[1]))
    for _ in range(20):
        params = step(params)
    assert float(quadratic(params)) < start - 0.1
