"""Sharpness-aware minimisation (SAM) and its adaptive variant (ASAM) on parameter pytrees.

SAM (Foret et al., ICLR 2021) replaces the gradient at ``w`` by the gradient at the
first-order worst-case point of a ball of radius ``rho``:

.. math::
    \\epsilon(w) = \\rho \\, \\frac{g}{\\|g\\|_2 + \\varepsilon_{num}}, \\quad g = \\nabla L(w),
    \\qquad \\text{update direction} = \\nabla L(w + \\epsilon(w)),

with the *global* L2 norm over all leaves of the pytree (SPEC §4). The step itself is then
applied at ``w`` by any optimiser. FACIMS (Tarzanagh et al., UAI 2023, eq. 7b) uses it as its
lower level with a per-subgroup radius ``beta^a``: ``rho`` may be a traced scalar, so one call
under :func:`jax.vmap` gives every group its own radius.

ASAM (Kwon et al., ICML 2021, eq. 9 with the element-wise operator ``T_w = |w|``):

.. math::
    \\epsilon(w) = \\rho \\, \\frac{T_w^2 g}{\\|T_w g\\|_2 + \\varepsilon_{num}}.

The official ASAM code uses ``T_w = |w| + eta`` with ``eta = 0.01`` so that zero weights
can still move; that offset is available as ``adaptive_offset`` (default 0, the paper's form).

The perturbation is treated as a constant (``jax.lax.stop_gradient``), as in SAM's
first-order approximation: no gradient flows through ``epsilon(w)``.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def _is_concrete_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_nonnegative(value, name: str) -> None:
    """ValueError for a concrete negative number; traced values pass (they are checked by nobody)."""
    if _is_concrete_number(value) and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def sam_perturbation(
    grads: PyTree,
    rho,
    *,
    adaptive: bool = False,
    params: PyTree | None = None,
    eps: float = 1e-12,
    adaptive_offset: float = 0.0,
) -> PyTree:
    """The SAM (or ASAM) ascent perturbation ``epsilon`` for gradients ``grads``.

    SAM: ``epsilon = rho * g / (||g||_2 + eps)`` with ``||g||_2`` the global norm over every
    leaf, so ``||epsilon|| = rho`` (up to ``eps``) and ``epsilon`` points along ``g``.
    ASAM (``adaptive=True``): with ``T = |params| + adaptive_offset`` element-wise,
    ``epsilon = rho * T^2 g / (||T g||_2 + eps)``, so ``||T^{-1} epsilon|| = rho``.

    A zero gradient gives a zero perturbation (no NaN) thanks to ``eps``.

    Args:
      grads: gradient pytree ``g``.
      rho: radius (float >= 0 or a traced scalar, e.g. a per-group radius under vmap).
      adaptive: use ASAM's scale-invariant perturbation (needs ``params``).
      params: the weights ``w`` (only for ``adaptive=True``), same structure as ``grads``.
      eps: added to the norm to avoid division by zero.
      adaptive_offset: ``eta`` in ``T_w = |w| + eta`` (ASAM's official code: 0.01).

    Returns:
      Pytree like ``grads``.

    Raises:
      ValueError: if ``rho`` / ``eps`` / ``adaptive_offset`` is a concrete negative number, if
        ``adaptive`` is set without ``params``, or if ``params`` and ``grads`` differ in
        structure.
    """
    _check_nonnegative(rho, "rho")
    _check_nonnegative(eps, "eps")
    _check_nonnegative(adaptive_offset, "adaptive_offset")
    if not adaptive:
        norm = optax.tree.norm(grads)
        return jax.tree_util.tree_map(lambda g: (rho / (norm + eps)).astype(g.dtype) * g, grads)
    if params is None:
        raise ValueError("sam_perturbation(adaptive=True) needs params= (ASAM scales by |w|)")
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(grads):
        raise ValueError(
            "params and grads must have the same pytree structure for adaptive SAM; got "
            f"{jax.tree_util.tree_structure(params)} and {jax.tree_util.tree_structure(grads)}"
        )
    scale = jax.tree_util.tree_map(lambda w: jnp.abs(w) + adaptive_offset, params)
    scaled_grads = jax.tree_util.tree_map(jnp.multiply, scale, grads)
    norm = optax.tree.norm(scaled_grads)
    return jax.tree_util.tree_map(
        lambda t, tg: (rho / (norm + eps)).astype(tg.dtype) * t * tg, scale, scaled_grads
    )


def sam_gradient(
    loss_fn: Callable[..., Any],
    params: PyTree,
    rho,
    *args,
    adaptive: bool = False,
    has_aux: bool = False,
    eps: float = 1e-12,
    adaptive_offset: float = 0.0,
):
    """Loss at ``w`` and the SAM gradient ``grad L(w + epsilon(w))``.

    ``epsilon(w)`` is :func:`sam_perturbation` of ``grad L(w)`` and is held constant (stop
    gradient). Apply the returned gradient at ``w`` with any optimiser, e.g.
    ``optax.sgd(lr).update(grads, state)``: this is one SAM step (Foret et al. 2021, Alg. 1).

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
      params: the weights ``w``.
      rho: SAM radius (float >= 0 or traced scalar). ``rho = 0`` gives the plain gradient.
      *args: passed to ``loss_fn`` after ``params``.
      adaptive: ASAM perturbation (see :func:`sam_perturbation`).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; aux is the one evaluated at ``w``.
      eps: added to the gradient norm.
      adaptive_offset: ASAM's ``eta``.

    Returns:
      ``(loss, grads)`` — ``loss = L(w)`` and ``grads = grad L(w + epsilon)`` with the structure
      of ``params``; with ``has_aux``, ``((loss, aux), grads)`` like ``jax.value_and_grad``.
    """
    value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, *args)
    perturbation = jax.lax.stop_gradient(
        sam_perturbation(
            grads, rho, adaptive=adaptive, params=params, eps=eps, adaptive_offset=adaptive_offset
        )
    )
    perturbed = jax.tree_util.tree_map(jnp.add, params, perturbation)
    sharp_grads = jax.grad(loss_fn, has_aux=has_aux)(perturbed, *args)
    if has_aux:
        sharp_grads = sharp_grads[0]
    return value, sharp_grads
