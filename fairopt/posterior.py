"""Diagonal Gaussian posteriors over an arbitrary parameter pytree.

A posterior ``q = N(mu, diag(s^2))`` over every weight of a model is stored as two pytrees of
the same structure as the model parameters: the means ``mu`` and the log standard deviations
``log s`` (so ``s = exp(log_std) > 0`` for any real ``log_std``; this is the parameterisation
all of fairopt uses, SPEC §3).

This is the posterior of FACIMS (Tarzanagh et al., UAI 2023, §3: a global posterior
``Z = N(theta, sigma^2)`` and per-subgroup local posteriors ``Z^a``) and of FAMS (Shui et al.
2022). Every function is pure, jit-able and works unchanged under :func:`jax.vmap` over a
stacked leading group axis (e.g. local posteriors whose leaves are ``[G, ...]``).

Deviation from the official FACIMS code: the code parameterises by a log-variance and samples
with ``0.08 * exp(log_var / 2)`` while it measures the divergence with ``exp(log_var / 2)``;
here the std used for sampling is the std used in :func:`kl` / :func:`w2`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any

DIVERGENCES = ("kl", "w2")


class Gaussian(NamedTuple):
    """A diagonal Gaussian over a parameter pytree.

    Attributes:
      mean: pytree of means ``mu`` (same structure and shapes as the model parameters).
      log_std: pytree of log standard deviations; the standard deviation is
        ``std = exp(log_std)``.
    """

    mean: PyTree
    log_std: PyTree


def _is_concrete_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_same_structure(first: PyTree, second: PyTree, first_name: str, second_name: str) -> None:
    """Raise ValueError unless two pytrees have the same structure and leaf shapes."""
    first_leaves, first_def = jax.tree_util.tree_flatten(first)
    second_leaves, second_def = jax.tree_util.tree_flatten(second)
    if first_def != second_def:
        raise ValueError(
            f"{first_name} and {second_name} must have the same pytree structure; got "
            f"{first_def} and {second_def}. Build both from the same parameter pytree."
        )
    for index, (a, b) in enumerate(zip(first_leaves, second_leaves)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"{first_name} and {second_name} differ in the shape of leaf {index}: "
                f"{jnp.shape(a)} vs {jnp.shape(b)}. Both must describe the same parameters "
                "(under vmap, map over the group axis of both or of neither)."
            )


def _check_gaussian(q, name: str) -> None:
    if not isinstance(q, Gaussian):
        raise TypeError(
            f"{name} must be a fairopt.posterior.Gaussian(mean, log_std), got {type(q).__name__}; "
            "build one with gaussian_init(params)."
        )
    _check_same_structure(q.mean, q.log_std, f"{name}.mean", f"{name}.log_std")


def gaussian_init(params: PyTree, init_std: float = 1e-3) -> Gaussian:
    """A Gaussian centred at ``params`` with the same standard deviation on every weight.

    ``q = N(params, init_std^2 I)``, i.e. ``mean = params`` and
    ``log_std = log(init_std)`` on every leaf (in the leaf's floating dtype).

    Args:
      params: parameter pytree (e.g. flax params); leaves must be floating arrays.
      init_std: initial standard deviation, > 0. (FACIMS' official code samples with std 0.08.)

    Returns:
      :class:`Gaussian`.

    Raises:
      ValueError: if ``init_std`` is a concrete number <= 0.
      TypeError: if a leaf is not a floating-point array.
    """
    if _is_concrete_number(init_std) and not init_std > 0:
        raise ValueError(f"init_std must be > 0 (it is a standard deviation), got {init_std}")
    for leaf in jax.tree_util.tree_leaves(params):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"gaussian_init needs floating-point parameter leaves, got dtype {jnp.result_type(leaf)}; "
                "cast the parameters to float32 first."
            )
    mean = jax.tree_util.tree_map(jnp.asarray, params)
    log_std = jax.tree_util.tree_map(
        lambda leaf: jnp.full(jnp.shape(leaf), jnp.log(init_std), jnp.result_type(leaf)), mean
    )
    return Gaussian(mean, log_std)


def std(q: Gaussian) -> PyTree:
    """The standard deviations ``exp(log_std)`` as a pytree."""
    return jax.tree_util.tree_map(jnp.exp, q.log_std)


def standard_normal_like(key: jax.Array, q: Gaussian, num_samples: int) -> PyTree:
    """Independent standard-normal noise shaped like ``q.mean`` with a leading ``[num_samples]`` axis.

    Each leaf gets its own key (``jax.random.split`` over the leaves), so the draws of
    different leaves are independent. Pass the result to :func:`sample_with_noise` to reuse one
    fixed draw (e.g. the same noise for every Hessian-vector product of a Neumann series).

    Args:
      key: a PRNG key.
      q: :class:`Gaussian` (only the structure, shapes and dtypes of ``q.mean`` are used).
      num_samples: number of draws, a Python int >= 1 (*static*).

    Returns:
      Pytree like ``q.mean`` whose leaves are ``[num_samples, *leaf.shape]``.
    """
    _check_num_samples(num_samples)
    leaves, treedef = jax.tree_util.tree_flatten(q.mean)
    keys = jax.random.split(key, max(len(leaves), 1))
    noise = [
        jax.random.normal(k, (num_samples,) + jnp.shape(leaf), jnp.result_type(leaf))
        for k, leaf in zip(keys, leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, noise)


def sample_with_noise(q: Gaussian, noise: PyTree) -> PyTree:
    """Reparameterised weights ``w = mu + exp(log_std) * xi`` for given standard-normal ``xi``.

    Differentiable in ``q`` (the reparameterisation trick, Kingma & Welling 2014). ``noise`` may
    carry extra leading axes (e.g. the ``[num_samples]`` axis of :func:`standard_normal_like`);
    they broadcast against the parameter shapes.

    Args:
      q: :class:`Gaussian`.
      noise: pytree with the structure of ``q.mean``.

    Returns:
      Pytree of sampled weights with the shapes of ``noise``.
    """
    return jax.tree_util.tree_map(
        lambda mean, log_std, xi: mean + jnp.exp(log_std) * xi, q.mean, q.log_std, noise
    )


def sample_draws(q: Gaussian, noise: PyTree) -> PyTree:
    """Weights of every draw along the leading axis of ``noise``: ``w_m = mu + exp(log_std) * xi_m``.

    The same values as :func:`sample_with_noise`, written as a stack of one sample per draw, so
    that reverse-mode autodiff sums the draws' gradients with elementwise adds instead of a
    reduction over the draw axis. On XLA:CPU such a reduction (with the ``* xi`` of the
    ``log_std`` gradient fused into it) is about 10x slower than the adds and took half the time
    of a FACIMS middle step (``benchmarks/`` and ``docs/performance.md``).

    Args:
      q: :class:`Gaussian`.
      noise: pytree like ``q.mean`` whose leaves have a leading ``[num_draws]`` axis (static size).

    Returns:
      Pytree like ``noise``: the sampled weights of each draw.
    """

    def draws(mean, log_std, xi):
        std = jnp.exp(log_std)
        return jnp.stack([mean + std * xi[m] for m in range(xi.shape[0])])

    return jax.tree_util.tree_map(draws, q.mean, q.log_std, noise)


def sample(key: jax.Array, q: Gaussian, num_samples: int) -> PyTree:
    """``num_samples`` reparameterised draws ``w_i = mu + exp(log_std) * xi_i``, ``xi_i ~ N(0, I)``.

    Args:
      key: a PRNG key.
      q: :class:`Gaussian`.
      num_samples: Python int >= 1 (*static*).

    Returns:
      Pytree like ``q.mean`` with a leading ``[num_samples]`` axis on every leaf.
    """
    return sample_with_noise(q, standard_normal_like(key, q, num_samples))


def kl(q: Gaussian, p: Gaussian) -> jax.Array:
    """Closed-form ``KL(q || p)`` between diagonal Gaussians, summed over all parameters.

    .. math::
        KL(q\\|p) = \\sum_i \\log\\frac{s_{p,i}}{s_{q,i}}
                    + \\frac{s_{q,i}^2 + (\\mu_{q,i} - \\mu_{p,i})^2}{2 s_{p,i}^2} - \\frac12

    This is the divergence ``D`` of FACIMS eq. (7) as written in the paper (SPEC §3: fairopt's
    default). It is computed from ``log_std`` directly (``s_q^2/s_p^2 = exp(2(log s_q - log s_p))``)
    so it stays finite for very small standard deviations.

    Args:
      q, p: :class:`Gaussian` over the same parameter pytree.

    Returns:
      Scalar (float32 for float32 parameters).

    Raises:
      TypeError / ValueError: if ``q`` or ``p`` is not a Gaussian, or their structures or leaf
        shapes differ.
    """
    _check_gaussian(q, "q")
    _check_gaussian(p, "p")
    _check_same_structure(q.mean, p.mean, "q", "p")

    def leaf_kl(mean_q, log_std_q, mean_p, log_std_p):
        variance_ratio = jnp.exp(2.0 * (log_std_q - log_std_p))
        scaled_square = jnp.square(mean_q - mean_p) * jnp.exp(-2.0 * log_std_p)
        return jnp.sum(log_std_p - log_std_q + 0.5 * (variance_ratio + scaled_square) - 0.5)

    terms = jax.tree_util.tree_map(leaf_kl, q.mean, q.log_std, p.mean, p.log_std)
    return _sum_leaves(terms)


def w2(q: Gaussian, p: Gaussian) -> jax.Array:
    """Squared 2-Wasserstein distance between diagonal Gaussians, summed over all parameters.

    .. math::
        W_2^2(q, p) = \\sum_i (\\mu_{q,i} - \\mu_{p,i})^2 + (s_{q,i} - s_{p,i})^2

    The FACIMS official code uses this (although the paper writes KL); SPEC §3 keeps it as an
    option.

    Args:
      q, p: :class:`Gaussian` over the same parameter pytree.

    Returns:
      Scalar.

    Raises:
      TypeError / ValueError: as :func:`kl`.
    """
    _check_gaussian(q, "q")
    _check_gaussian(p, "p")
    _check_same_structure(q.mean, p.mean, "q", "p")

    def leaf_w2(mean_q, log_std_q, mean_p, log_std_p):
        return jnp.sum(jnp.square(mean_q - mean_p) + jnp.square(jnp.exp(log_std_q) - jnp.exp(log_std_p)))

    terms = jax.tree_util.tree_map(leaf_w2, q.mean, q.log_std, p.mean, p.log_std)
    return _sum_leaves(terms)


def _sum_leaves(terms: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(terms)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return sum(leaves[1:], leaves[0])


def divergence(name: str) -> Callable[[Gaussian, Gaussian], jax.Array]:
    """The divergence function ``D(q, p)`` named ``name``: ``"kl"`` (:func:`kl`) or ``"w2"`` (:func:`w2`).

    Raises:
      ValueError: for any other name (the message lists the choices).
    """
    if name == "kl":
        return kl
    if name == "w2":
        return w2
    raise ValueError(f"divergence name must be one of {', '.join(map(repr, DIVERGENCES))}, got {name!r}")


def mc_predict(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    q: Gaussian,
    x: jax.Array,
    key: jax.Array,
    num_samples: int,
) -> jax.Array:
    """Monte-Carlo posterior predictive ``(1/S) sum_s softmax(f(x; w_s))``, ``w_s ~ q``.

    This is the Bayesian model average that FACIMS evaluates (an average of probabilities,
    not of logits).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits [..., K]``.
      q: :class:`Gaussian` over the parameters of ``apply_fn``.
      x: inputs ``[B, d]``.
      key: PRNG key of the weight draws.
      num_samples: number of draws ``S`` (Python int >= 1, *static*).

    Returns:
      Class probabilities ``[B, K]`` (rows sum to 1).
    """
    weights = sample(key, q, num_samples)
    probabilities = jax.vmap(lambda w: jax.nn.softmax(apply_fn(w, x), axis=-1))(weights)
    return jnp.mean(probabilities, axis=0)


def local_reparameterisation_apply(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    q: Gaussian,
    x: jax.Array,
    key: jax.Array,
    noise_scale=1.0,
) -> jax.Array:
    """One Monte-Carlo forward pass with the local reparameterisation trick (Kingma, Salimans &
    Welling, NeurIPS 2015): noise on every dense layer's pre-activations, fresh per example.

    For a ``flax.linen.Dense`` layer with weights ``W ~ N(M, S^2)`` and bias ``b ~ N(m, s^2)``
    (elementwise, drawn as ``M + noise_scale S xi``) and input rows ``x``, the pre-activation of
    each row is drawn directly:

    .. math::
        a = x M + m + \\text{noise\\_scale} \\sqrt{x^2 S^2 + s^2} \\odot \\varepsilon,
        \\qquad \\varepsilon \\sim N(0, I) \\text{ of } a\\text{'s shape},

    the exact distribution of ``x W + b`` for one row. Layer by layer the output of each row
    therefore has the same distribution as under :func:`sample` (one weight draw for the whole
    batch); the rows' outputs become independent instead of sharing one draw, which lowers the
    variance of a batch-mean loss and of its gradient. (The official FACIMS code's
    ``StochasticLinear`` layers do this.)

    ``apply_fn(params, x)`` must apply a flax module (e.g. :func:`fairopt.models.make_model`'s)
    whose every parameter belongs to an ``nn.Dense`` layer: the layers are intercepted
    (``flax.linen.intercept_methods``) and ``q.mean`` is passed as the parameters. Pure,
    jit-/vmap-able; the same ``key`` gives the same draw (so a Hessian sees one fixed function).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits``.
      q: :class:`Gaussian` over the parameters of ``apply_fn``.
      x: inputs ``[B, d]``.
      key: PRNG key of this forward pass (layer ``l`` uses ``fold_in(key, l)``).
      noise_scale: the ``noise_scale`` of the weight draws (FACIMS samples ``M + 0.08 S xi``).

    Returns:
      Logits ``[B, K]``.

    Raises:
      ValueError: a parameter outside any ``nn.Dense`` layer (or no flax layer at all).
    """
    _check_gaussian(q, "q")
    stds = std(q)
    covered: list[tuple] = []

    def noisy_dense(next_fun, args, kwargs, context):
        if not (isinstance(context.module, nn.Dense) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        path = tuple(context.module.scope.path)
        layer = stds
        for name in path:
            if not isinstance(layer, dict) or name not in layer:
                raise ValueError(
                    f"local reparameterisation: the dense layer {'/'.join(path)} has no entry in the posterior; "
                    "apply_fn must apply the module with q.mean as its parameters (module.apply({'params': p}, x))"
                )
            layer = layer[name]
        inputs = args[0] if args else kwargs["inputs"]
        mean_output = next_fun(*args, **kwargs)
        variance = jnp.matmul(jnp.square(inputs), jnp.square(layer["kernel"]))
        if "bias" in layer:
            variance = variance + jnp.square(layer["bias"])
        noise = jax.random.normal(jax.random.fold_in(key, len(covered)), mean_output.shape, mean_output.dtype)
        covered.append(path)
        # the floor keeps d sqrt / d variance finite on an all-zero (padding) row of a bias-free layer
        return mean_output + noise_scale * jnp.sqrt(jnp.maximum(variance, jnp.finfo(variance.dtype).tiny)) * noise

    with nn.intercept_methods(noisy_dense):
        logits = apply_fn(q.mean, x)
    parameters = {
        tuple(getattr(entry, "key", entry) for entry in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(q.mean)[0]
    }
    uncovered = sorted("/".join(map(str, path)) for path in parameters if path[:-1] not in set(covered))
    if uncovered:
        raise ValueError(
            "local reparameterisation draws the pre-activations of flax nn.Dense layers only, but the parameters "
            f"{', '.join(uncovered)} are not in a dense layer apply_fn called; sample weights instead "
            "(FacimsConfig.local_reparameterisation=False)"
        )
    return logits


def mean_predict(apply_fn: Callable[[PyTree, jax.Array], jax.Array], q: Gaussian, x: jax.Array) -> jax.Array:
    """Plug-in prediction at the posterior mean: ``softmax(f(x; mu))``.

    Deterministic and cheaper than :func:`mc_predict`, but it ignores the posterior variance
    (it is not the posterior predictive; with zero variance the two coincide).

    Args:
      apply_fn: ``apply_fn(params, x) -> logits``.
      q: :class:`Gaussian`.
      x: inputs ``[B, d]``.

    Returns:
      Class probabilities ``[B, K]``.
    """
    return jax.nn.softmax(apply_fn(q.mean, x), axis=-1)


def num_parameters(q: Gaussian) -> int:
    """Number of scalar weights the posterior is over (the size of ``q.mean``)."""
    return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree_util.tree_leaves(q.mean))


def _check_num_samples(num_samples) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(
            f"num_samples must be a Python int (it fixes an array shape), got {type(num_samples).__name__}"
        )
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
