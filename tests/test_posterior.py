"""Tests of fairopt.posterior: closed forms, sampling statistics, vmap/jit invariance, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from fairopt import posterior
from fairopt.posterior import Gaussian


def random_gaussian(seed, shapes=((3, 2), (4,))):
    """A Gaussian over a dict pytree with random means and log-stds (std in ~[0.3, 3])."""
    rng = np.random.default_rng(seed)
    mean = {f"leaf{i}": jnp.asarray(rng.normal(size=shape), jnp.float32) for i, shape in enumerate(shapes)}
    log_std = {f"leaf{i}": jnp.asarray(rng.uniform(-1.2, 1.1, size=shape), jnp.float32) for i, shape in enumerate(shapes)}
    return Gaussian(mean, log_std)


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree_util.tree_leaves(tree)])


def numpy_kl(q, p):
    mq, sq = flat(q.mean), np.exp(flat(q.log_std))
    mp, sp = flat(p.mean), np.exp(flat(p.log_std))
    return np.sum(np.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5)


def numpy_w2(q, p):
    return np.sum((flat(q.mean) - flat(p.mean)) ** 2 + (np.exp(flat(q.log_std)) - np.exp(flat(p.log_std))) ** 2)


# ---------------------------------------------------------------- construction


def test_gaussian_init_centres_on_params_with_constant_std():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    q = posterior.gaussian_init(params, init_std=0.08)
    chex.assert_trees_all_equal(q.mean, params)
    chex.assert_trees_all_close(posterior.std(q), jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.08), params))
    chex.assert_trees_all_equal_shapes_and_dtypes(q.log_std, params)
    assert posterior.num_parameters(q) == 9


@pytest.mark.parametrize("bad_std", [0.0, -0.1])
def test_gaussian_init_rejects_nonpositive_std(bad_std):
    with pytest.raises(ValueError, match="init_std must be > 0"):
        posterior.gaussian_init({"w": jnp.ones(2)}, init_std=bad_std)


def test_gaussian_init_rejects_integer_leaves():
    with pytest.raises(TypeError, match="floating-point"):
        posterior.gaussian_init({"w": jnp.arange(3)})


def test_gaussian_init_accepts_traced_std_under_jit():
    q = jax.jit(lambda s: posterior.gaussian_init({"w": jnp.zeros(2)}, init_std=s))(0.5)
    np.testing.assert_allclose(np.exp(q.log_std["w"]), 0.5, rtol=1e-6)


# ---------------------------------------------------------------- divergences


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_matches_closed_form(seed):
    q, p = random_gaussian(seed), random_gaussian(seed + 100)
    np.testing.assert_allclose(posterior.kl(q, p), numpy_kl(q, p), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_w2_matches_closed_form(seed):
    q, p = random_gaussian(seed), random_gaussian(seed + 100)
    np.testing.assert_allclose(posterior.w2(q, p), numpy_w2(q, p), rtol=1e-5)


def test_kl_scalar_example_by_hand():
    # KL(N(1, 2^2) || N(0, 1)) = log(1/2) + (4 + 1)/2 - 1/2 = 2 - log 2
    q = Gaussian({"w": jnp.array([1.0])}, {"w": jnp.log(jnp.array([2.0]))})
    p = Gaussian({"w": jnp.array([0.0])}, {"w": jnp.array([0.0])})
    np.testing.assert_allclose(posterior.kl(q, p), 2.0 - np.log(2.0), rtol=1e-6)
    # W2^2 = (1 - 0)^2 + (2 - 1)^2 = 2
    np.testing.assert_allclose(posterior.w2(q, p), 2.0, rtol=1e-6)


def test_divergences_vanish_on_identical_and_are_positive_otherwise():
    for seed in range(5):
        q, p = random_gaussian(seed), random_gaussian(seed + 50)
        assert float(posterior.kl(q, q)) == pytest.approx(0.0, abs=1e-6)
        assert float(posterior.w2(q, q)) == 0.0
        assert float(posterior.kl(q, p)) > 0.0
        assert float(posterior.w2(q, p)) > 0.0


def test_kl_is_asymmetric_and_w2_symmetric():
    q, p = random_gaussian(3), random_gaussian(4)
    assert abs(float(posterior.kl(q, p)) - float(posterior.kl(p, q))) > 1e-3
    np.testing.assert_allclose(posterior.w2(q, p), posterior.w2(p, q), rtol=1e-6)


def test_kl_matches_monte_carlo_estimate():
    """KL(q||p) = E_q[log q(w) - log p(w)]: 200k draws; tolerance 5 standard errors."""
    q, p = random_gaussian(7, shapes=((3,),)), random_gaussian(8, shapes=((3,),))
    draws = posterior.sample(jax.random.key(0), q, 200_000)["leaf0"]

    def log_density(g, w):
        mean, log_std = g.mean["leaf0"], g.log_std["leaf0"]
        return jnp.sum(-0.5 * ((w - mean) / jnp.exp(log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)

    log_ratio = np.asarray(log_density(q, draws) - log_density(p, draws), np.float64)
    standard_error = log_ratio.std() / np.sqrt(log_ratio.size)
    assert abs(log_ratio.mean() - float(posterior.kl(q, p))) < 5 * standard_error


def test_kl_stays_finite_for_tiny_stds():
    q = Gaussian({"w": jnp.zeros(3)}, {"w": jnp.full(3, -40.0)})
    p = Gaussian({"w": jnp.ones(3)}, {"w": jnp.full(3, -39.0)})
    value = posterior.kl(q, p)
    assert np.isfinite(value)
    np.testing.assert_allclose(value, numpy_kl(q, p), rtol=1e-5)


def test_divergence_selector():
    assert posterior.divergence("kl") is posterior.kl
    assert posterior.divergence("w2") is posterior.w2
    with pytest.raises(ValueError, match="'kl', 'w2'"):
        posterior.divergence("js")


def test_divergences_reject_mismatched_pytrees():
    q = random_gaussian(0)
    other_structure = random_gaussian(0, shapes=((3, 2),))
    other_shape = random_gaussian(0, shapes=((3, 2), (5,)))
    for fn in (posterior.kl, posterior.w2):
        with pytest.raises(ValueError, match="same pytree structure"):
            fn(q, other_structure)
        with pytest.raises(ValueError, match="shape of leaf"):
            fn(q, other_shape)
        with pytest.raises(TypeError, match="Gaussian"):
            fn(q, (q.mean, q.log_std))
    broken = Gaussian(q.mean, {"leaf0": q.log_std["leaf0"]})
    with pytest.raises(ValueError, match="q.mean and q.log_std"):
        posterior.kl(broken, q)


def test_divergence_gradients_match_closed_form():
    """d KL / d mu_q = (mu_q - mu_p) / s_p^2 ; d KL / d log s_q = s_q^2 / s_p^2 - 1."""
    q, p = random_gaussian(11), random_gaussian(12)
    grads = jax.grad(posterior.kl)(q, p)
    s_q, s_p = posterior.std(q), posterior.std(p)
    expected_mean = jax.tree_util.tree_map(lambda a, b, s: (a - b) / s**2, q.mean, p.mean, s_p)
    expected_log_std = jax.tree_util.tree_map(lambda a, b: a**2 / b**2 - 1.0, s_q, s_p)
    chex.assert_trees_all_close(grads.mean, expected_mean, rtol=1e-5)
    chex.assert_trees_all_close(grads.log_std, expected_log_std, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- sampling


def test_sample_shapes_and_dtypes():
    q = random_gaussian(0)
    draws = posterior.sample(jax.random.key(1), q, 4)
    chex.assert_trees_all_equal_structs(draws, q.mean)
    chex.assert_shape(draws["leaf0"], (4, 3, 2))
    chex.assert_shape(draws["leaf1"], (4, 4))
    noise = posterior.standard_normal_like(jax.random.key(1), q, 4)
    chex.assert_trees_all_close(draws, posterior.sample_with_noise(q, noise))


def test_sample_mean_and_variance():
    """n = 40,000 draws: the sample mean is within 5 standard errors (5 s / sqrt(n)) of mu and the
    sample variance within 5 standard errors (5 sqrt(2/n), relative) of s^2."""
    q = random_gaussian(5)
    n = 40_000
    draws = posterior.sample(jax.random.key(2), q, n)
    for name in q.mean:
        mean, std = np.asarray(q.mean[name], np.float64), np.exp(np.asarray(q.log_std[name], np.float64))
        values = np.asarray(draws[name], np.float64)
        assert np.all(np.abs(values.mean(0) - mean) < 5 * std / np.sqrt(n))
        assert np.all(np.abs(values.var(0) / std**2 - 1.0) < 5 * np.sqrt(2.0 / n))


def test_noise_is_independent_across_leaves_and_keys():
    q = Gaussian({"a": jnp.zeros(1000), "b": jnp.zeros(1000)}, {"a": jnp.zeros(1000), "b": jnp.zeros(1000)})
    noise = posterior.standard_normal_like(jax.random.key(0), q, 1)
    correlation = np.corrcoef(np.asarray(noise["a"][0]), np.asarray(noise["b"][0]))[0, 1]
    assert abs(correlation) < 0.15  # 4.7 standard errors of a correlation of 1000 pairs
    other = posterior.standard_normal_like(jax.random.key(1), q, 1)
    assert not np.allclose(noise["a"], other["a"])


def test_sample_with_noise_is_reparameterised():
    q = random_gaussian(9)
    noise = posterior.standard_normal_like(jax.random.key(3), q, 1)
    noise = jax.tree_util.tree_map(lambda x: x[0], noise)
    grads = jax.grad(lambda g: sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(posterior.sample_with_noise(g, noise))))(q)
    chex.assert_trees_all_close(grads.mean, jax.tree_util.tree_map(jnp.ones_like, q.mean))
    chex.assert_trees_all_close(grads.log_std, jax.tree_util.tree_map(lambda s, n: jnp.exp(s) * n, q.log_std, noise))


@pytest.mark.parametrize("bad", [0, -2])
def test_sample_rejects_bad_num_samples(bad):
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        posterior.sample(jax.random.key(0), random_gaussian(0), bad)
    with pytest.raises(TypeError, match="num_samples must be a Python int"):
        posterior.sample(jax.random.key(0), random_gaussian(0), 2.0)


# ---------------------------------------------------------------- prediction


def linear_apply(params, x):
    return x @ params["w"] + params["b"]


def test_mc_predict_is_average_of_sampled_probabilities():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3)}
    q = posterior.gaussian_init(params, init_std=0.5)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    probs = posterior.mc_predict(linear_apply, q, x, jax.random.key(4), 8)
    draws = posterior.sample(jax.random.key(4), q, 8)
    manual = np.mean([jax.nn.softmax(linear_apply(jax.tree_util.tree_map(lambda l: l[i], draws), x)) for i in range(8)], axis=0)
    np.testing.assert_allclose(probs, manual, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sum(probs, -1), 1.0, rtol=1e-5)
    # the average of probabilities differs from the plug-in mean prediction when std > 0
    assert not np.allclose(probs, posterior.mean_predict(linear_apply, q, x), atol=1e-3)


def test_mc_predict_equals_mean_predict_at_zero_variance():
    params = {"w": jnp.ones((2, 3)) * jnp.arange(3.0), "b": jnp.zeros(3)}
    q = posterior.gaussian_init(params, init_std=1e-12)
    x = jnp.array([[1.0, -1.0], [0.5, 2.0]])
    np.testing.assert_allclose(
        posterior.mc_predict(linear_apply, q, x, jax.random.key(0), 3),
        posterior.mean_predict(linear_apply, q, x),
        rtol=1e-6,
    )
    np.testing.assert_allclose(posterior.mean_predict(linear_apply, q, x), jax.nn.softmax(linear_apply(params, x)))


def _dense_posterior(widths, seed):
    """A random Gaussian over the parameters of flax Dense layers ``widths[0] -> ... -> widths[-1]``
    (the layout of fairopt.models' modules), built without an init call."""
    rng = np.random.default_rng(seed)
    layers = {}
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers[f"Dense_{index}"] = {"kernel": (fan_in, fan_out), "bias": (fan_out,)}
    mean = jax.tree_util.tree_map(lambda shape: jnp.asarray(rng.normal(size=shape), jnp.float32), layers,
                                  is_leaf=lambda node: isinstance(node, tuple))
    log_std = jax.tree_util.tree_map(lambda shape: jnp.asarray(rng.uniform(-2.0, -0.5, shape), jnp.float32), layers,
                                     is_leaf=lambda node: isinstance(node, tuple))
    return Gaussian(mean, log_std)


def test_local_reparameterisation_has_the_moments_of_weight_sampling_per_row():
    """One nn.Dense layer: a = x M + m + c sqrt(x^2 S^2 + s^2) eps has mean x M + m and variance
    c^2 (x^2 S^2 + s^2) per row and unit (c = noise_scale), the moments of x W + b with
    W = M + c S xi, and identical rows get independent draws (one weight draw would give them
    correlation 1). Through an ELU MLP each row's logits match weight sampling's mean and
    spread (Monte Carlo). The same key gives the same pass; a non-flax model is refused."""
    from fairopt import models

    linear, mlp = models.linear(3), models.mlp(2, hidden=(5,))
    linear_apply_fn = lambda p, x: linear.apply({"params": p}, x)  # noqa: E731
    mlp_apply_fn = lambda p, x: mlp.apply({"params": p}, x)  # noqa: E731
    q_linear, q_mlp = _dense_posterior((4, 3), 1), _dense_posterior((3, 5, 2), 4)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4)), jnp.float32).at[2].set(0.0)
    x = jnp.concatenate([x, x[:1]])  # row 3 repeats row 0; row 2 is zero (bias noise only)
    row = jnp.asarray([[0.7, -1.2, 0.4]], jnp.float32)
    scale, draws = 0.5, 4000

    @jax.jit  # one program: eager op-by-op dispatch would cost more than the draws
    def draw(key):
        keys = jax.random.split(key, (3, draws))
        local = lambda apply_fn, q, inputs: jax.vmap(  # noqa: E731
            lambda k: posterior.local_reparameterisation_apply(apply_fn, q, inputs, k, scale)
        )
        mean, unravel = ravel_pytree(q_mlp.mean)
        weights = mean + scale * jnp.exp(ravel_pytree(q_mlp.log_std)[0]) * jax.random.normal(keys[2, 0], (draws, mean.size))
        sampled = jax.vmap(lambda w: mlp_apply_fn(unravel(w), row))(weights)  # W = M + c S xi
        return local(linear_apply_fn, q_linear, x)(keys[0]), local(mlp_apply_fn, q_mlp, row)(keys[1])[:, 0], sampled[:, 0]

    dense, mlp_local, mlp_sampled = (np.asarray(a, np.float64) for a in draw(jax.random.key(3)))
    layer_mean, layer_std = (jax.tree_util.tree_map(np.asarray, tree["Dense_0"]) for tree in (q_linear.mean, q_linear.log_std))
    rows = np.asarray(x, np.float64)
    mean = rows @ layer_mean["kernel"] + layer_mean["bias"]
    variance = scale**2 * (rows**2 @ np.exp(2 * layer_std["kernel"]) + np.exp(2 * layer_std["bias"]))
    assert np.all(np.abs(dense.mean(0) - mean) < 5 * np.sqrt(variance / draws))
    np.testing.assert_allclose(dense.var(0), variance, rtol=0.12)  # 5 standard errors
    assert abs(np.corrcoef(dense[:, 0, 0], dense[:, 3, 0])[0, 1]) < 0.08
    spread = mlp_sampled.std(0)
    assert np.all(np.abs(mlp_local.mean(0) - mlp_sampled.mean(0)) < 5 * spread * np.sqrt(2 / draws))
    np.testing.assert_allclose(mlp_local.std(0), spread, rtol=0.08)
    np.testing.assert_array_equal(
        posterior.local_reparameterisation_apply(linear_apply_fn, q_linear, x, jax.random.key(7), scale),
        posterior.local_reparameterisation_apply(linear_apply_fn, q_linear, x, jax.random.key(7), scale),
    )
    with pytest.raises(ValueError, match="flax nn.Dense layers only, but the parameters b, w"):
        posterior.local_reparameterisation_apply(linear_apply, posterior.gaussian_init({"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}),
                                                 row, jax.random.key(0))


# ---------------------------------------------------------------- vmap and jit


def stack(trees):
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def test_vmapped_group_divergences_equal_loop():
    groups = [random_gaussian(seed) for seed in range(3)]
    stacked = stack(groups)
    prior = random_gaussian(99)
    for fn in (posterior.kl, posterior.w2):
        vmapped = jax.vmap(fn, in_axes=(0, None))(stacked, prior)
        loop = jnp.stack([fn(q, prior) for q in groups])
        np.testing.assert_allclose(vmapped, loop, rtol=1e-6)
        both = jax.vmap(fn)(stacked, stack([prior] * 3))
        np.testing.assert_allclose(both, loop, rtol=1e-6)


def test_vmapped_group_sampling_equals_loop():
    groups = [random_gaussian(seed) for seed in range(3)]
    keys = jax.random.split(jax.random.key(0), 3)
    vmapped = jax.vmap(lambda k, q: posterior.sample(k, q, 2))(keys, stack(groups))
    loop = stack([posterior.sample(k, q, 2) for k, q in zip(keys, groups)])
    chex.assert_trees_all_close(vmapped, loop, rtol=1e-6)


def test_jit_equals_no_jit():
    q, p = random_gaussian(1), random_gaussian(2)
    np.testing.assert_allclose(jax.jit(posterior.kl)(q, p), posterior.kl(q, p), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(posterior.w2)(q, p), posterior.w2(q, p), rtol=1e-6)
    sampler = jax.jit(posterior.sample, static_argnums=2)
    chex.assert_trees_all_close(sampler(jax.random.key(0), q, 3), posterior.sample(jax.random.key(0), q, 3), rtol=1e-6)
