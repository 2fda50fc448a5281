"""Default models behind the ``apply_fn(params, x) -> logits`` convention (flax.linen).

* :func:`mlp` — the fully connected network of the FACIMS and FAMS experiments on tabular data
  (credit card, drug consumption): ``d -> 400 -> 200 -> 100 -> K`` with ELU activations
  (Tarzanagh et al., UAI 2023, appendix; the official code's ``400-200-100`` ELU network).
  Unlike the official FACIMS code there is **no sigmoid on the output**: the network returns raw
  logits for a softmax cross-entropy (SPEC §7 lists the sigmoid as a defect). The defect is
  available as ``output_activation="sigmoid"`` for diagnosis only (the FACIMS ablation measures it).
* :func:`linear` — a linear classifier ``x W + b`` (FairALM's linear experiments, sanity checks).

Every layer is a ``flax.linen.Dense`` with flax's default initialisation (LeCun-normal kernel,
zero bias). :func:`make_model` initialises a model and returns the bare parameter pytree (the
``"params"`` collection) and a pure ``apply_fn``, which works for a batch ``x [B, d]`` (or any
leading axes) and under :func:`jax.vmap` over a stacked parameter pytree (one model per group or
per Monte-Carlo sample).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "elu": nn.elu,
    "relu": nn.relu,
    "gelu": nn.gelu,
    "tanh": nn.tanh,
    "sigmoid": nn.sigmoid,
    "silu": nn.silu,
}

PAPER_HIDDEN = (400, 200, 100)
OUTPUT_ACTIVATIONS = ("none", "sigmoid")


class MLP(nn.Module):
    """Fully connected network ``Dense -> activation`` per hidden layer, then a linear ``Dense(K)``.

    Attributes:
      num_classes: output width ``K`` (logits).
      hidden: widths of the hidden layers.
      activation: a key of :data:`ACTIVATIONS`.
      output_activation: ``"none"`` (logits) or ``"sigmoid"``: ``sigmoid(z)`` in place of the
        logits ``z``, the official FACIMS code's defect (a softmax over values in (0, 1) keeps
        binary probabilities within (0.27, 0.73)); for diagnosis, never a default.
    """

    num_classes: int
    hidden: Sequence[int] = PAPER_HIDDEN
    activation: str = "elu"
    output_activation: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        activation = ACTIVATIONS[self.activation]
        for width in self.hidden:
            x = activation(nn.Dense(width)(x))
        logits = nn.Dense(self.num_classes)(x)
        return nn.sigmoid(logits) if self.output_activation == "sigmoid" else logits


class Linear(nn.Module):
    """Linear classifier ``logits = x W + b`` with ``W [d, K]``."""

    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes)(x)


def _check_positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def mlp(num_classes: int, hidden: Sequence[int] = PAPER_HIDDEN, activation: str = "elu",
        output_activation: str = "none") -> MLP:
    """The papers' MLP (default ``400-200-100`` with ELU) as a ``flax.linen`` module.

    Args:
      num_classes: number of output logits ``K`` (>= 1).
      hidden: hidden-layer widths (each >= 1; ``()`` gives a linear model).
      activation: one of :data:`ACTIVATIONS` (``"elu"``: the papers').
      output_activation: one of :data:`OUTPUT_ACTIVATIONS` (``"none"``: logits; see :class:`MLP`).

    Returns:
      :class:`MLP` module; ``module.apply({"params": params}, x)`` returns logits ``[..., K]``.

    Raises:
      ValueError / TypeError: non-positive widths or an unknown activation (message lists choices).
    """
    _check_positive_int(num_classes, "num_classes")
    hidden = tuple(hidden)
    for index, width in enumerate(hidden):
        _check_positive_int(width, f"hidden[{index}]")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if output_activation not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"output_activation must be one of {', '.join(OUTPUT_ACTIVATIONS)}, got {output_activation!r}")
    return MLP(num_classes=num_classes, hidden=hidden, activation=activation, output_activation=output_activation)


def linear(num_classes: int) -> Linear:
    """A linear classifier ``x W + b`` as a ``flax.linen`` module (``K = num_classes`` logits)."""
    _check_positive_int(num_classes, "num_classes")
    return Linear(num_classes=num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "linear": linear}


@functools.partial(jax.jit, static_argnums=0)
def _initialise(module: nn.Module, key: jax.Array, example_input: jax.Array) -> PyTree:
    """``module.init(key, x)["params"]`` compiled once per (module, input shape): several times
    faster than op-by-op dispatch on CPU and reused across keys/seeds (modules are hashable)."""
    return module.init(key, example_input)["params"]


def make_model(
    name: str, num_classes: int, num_features: int, key: jax.Array, **options
) -> tuple[PyTree, Callable[[PyTree, jax.Array], jax.Array]]:
    """Initialise a named model and return ``(params, apply_fn)``.

    Args:
      name: ``"mlp"`` (400-200-100 ELU, the papers') or ``"linear"``.
      num_classes: number of logits ``K``.
      num_features: input width ``d``.
      key: PRNG key of the initialisation.
      **options: passed to the module factory (``hidden=``, ``activation=`` for ``"mlp"``).

    Returns:
      ``params``: the ``"params"`` collection (a dict pytree of float32 kernels/biases);
      ``apply_fn(params, x) -> logits [..., K]``, pure and jit/vmap-able.

    Raises:
      ValueError: unknown ``name`` (the message lists the choices) or bad sizes.
      TypeError: options the chosen model does not take.
    """
    if name not in MODELS:
        raise ValueError(f"model name must be one of {', '.join(map(repr, MODELS))}, got {name!r}")
    _check_positive_int(num_features, "num_features")
    try:
        module = MODELS[name](num_classes, **options)
    except TypeError as error:
        if "unexpected keyword" in str(error):
            raise TypeError(f"model {name!r} does not take option(s) {sorted(options)}: {error}") from None
        raise
    params = _initialise(module, key, jnp.zeros((1, num_features), jnp.float32))

    def apply_fn(params: PyTree, x: jax.Array) -> jax.Array:
        return module.apply({"params": params}, x)

    return params, apply_fn
