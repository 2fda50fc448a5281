"""Personalised (per-class) spherical data augmentation for tabular inputs.

AutoBalance (Li, Zhang, Thrampoulidis, Chen, Oymak, NeurIPS 2021), §2.1 "Personalized data
augmentation" and Lemma 2: the augmentation ``A_y(x)`` of an example with label ``y`` draws a
point uniformly from the l2-ball of radius ``eps_y`` around ``x``,

.. math::
    A_y(x) = x + \\varepsilon_y \\, u, \\qquad u \\sim \\mathrm{Uniform}(\\{u : \\|u\\|_2 \\le 1\\}).

Lemma 2: for a linearly separable binary problem, logistic regression on data augmented with
class-dependent radii returns the same (max-margin) classifier as the parametric loss (2.1) for
suitable radii — a larger radius on the minority class enlarges its margin. The radius is a
loss hyperparameter learnt by the upper level of :mod:`fairopt.solvers.autobalance` through
the reparameterisation above (``u`` is drawn once per step and held fixed while
differentiating in ``eps``).

The official AutoBalance code searches AutoAugment image policies per class cluster (the
paper's Table 2); that policy space does not exist for tabular features, so fairopt implements
the spherical augmentation that Lemma 2 analyses instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def unit_ball_noise(key: jax.Array, shape: tuple[int, int], dtype=jnp.float32) -> jax.Array:
    """Points drawn uniformly from the unit l2-ball in ``R^d``, one per row.

    A uniform direction (a normalised standard normal vector) times a radius ``r = U^{1/d}``
    with ``U ~ Uniform(0, 1)`` — the radius law of the uniform distribution on the d-ball
    (its CDF is ``r^d``).

    Args:
      key: PRNG key.
      shape: ``(n, d)``, static.
      dtype: floating dtype of the result.

    Returns:
      ``[n, d]`` array with every row inside the unit ball.

    Raises:
      ValueError: ``shape`` is not a pair of positive integers.
    """
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (num_rows, num_features) with both >= 1, got {shape}")
    direction_key, radius_key = jax.random.split(key)
    direction = jax.random.normal(direction_key, shape, dtype)
    direction = direction / jnp.maximum(jnp.linalg.norm(direction, axis=-1, keepdims=True), 1e-12)
    radius = jax.random.uniform(radius_key, (shape[0], 1), dtype) ** (1.0 / shape[1])
    return direction * radius


def spherical_augment(features: jax.Array, labels: jax.Array, radius: jax.Array, noise: jax.Array) -> jax.Array:
    """``x_i + eps_{y_i} u_i``: per-class spherical augmentation with fixed noise ``u``.

    Differentiable in ``radius`` (the gradient is ``<grad_x, u_i>`` summed over the rows of each
    class), which is what the hypergradient of the radius needs.

    Args:
      features: ``[B, d]`` inputs.
      labels: ``[B]`` integer labels in ``[0, K)``.
      radius: ``[K]`` non-negative radii ``eps_y``.
      noise: ``[B, d]`` points of the unit ball (:func:`unit_ball_noise`).

    Returns:
      ``[B, d]`` augmented inputs.

    Raises:
      ValueError: inconsistent shapes.
    """
    if features.ndim != 2 or noise.shape != features.shape:
        raise ValueError(
            f"features must be [B, d] and noise the same shape; got features {features.shape}, noise {noise.shape}"
        )
    if radius.ndim != 1:
        raise ValueError(f"radius must be a [K] vector of per-class radii, got shape {radius.shape}")
    return features + radius[labels][:, None] * noise
