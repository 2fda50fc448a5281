"""Hessian-vector products, inverse-Hessian-vector products and implicit hypergradients.

For an inner problem ``theta*(h) = argmin_theta G(theta, h)`` and an outer objective
``F(theta, h, *outer_args)``, the implicit function theorem (``grad_theta G(theta*(h), h) = 0``
implies ``d theta*/dh = -H^{-1} d^2_{theta,h} G``) gives the total derivative (SPEC §5;
AutoBalance, Li et al. NeurIPS 2021, eq. 3.2; FACIMS, Tarzanagh et al. UAI 2023, §4):

.. math::
    \\frac{dF}{dh} = \\partial_h F - \\partial^2_{h,\\theta} G \\; H^{-1} \\nabla_\\theta F,
    \\qquad H = \\nabla^2_\\theta G(\\theta^*, h).

Conventions: every derivative is a *gradient* (the pytree that ascends the function), so the
result is used as ``h <- h - lr * dF/dh`` to decrease ``F``. The vector ``H^{-1} grad_theta F`` is
computed from Hessian-vector products only (forward-over-reverse, :func:`hvp`), never by
forming ``H`` (except in :func:`exact_inverse_hvp`, for tests and tiny problems). The mixed
term ``d^2_{h,theta} G . u`` is a vector-Jacobian product of ``grad_theta G`` with respect to
``h``, i.e. ``grad_h <grad_theta G(theta*, h), u>`` with ``u`` held fixed.

Groups: under :func:`jax.vmap` over a leading group axis of ``theta_star`` / ``inner_hparams``
/ ``outer_args``, every group solves with *its own* Hessian (the block-diagonal system of all
groups). The official FACIMS code instead summed the Hessian-vector products of all groups into
one shared vector, which is not the implicit function theorem; fairopt does not copy that.

The Neumann series (Lorraine et al., AISTATS 2020, Alg. 3; AutoBalance appendix Alg. 2) is
``H^{-1} v ≈ alpha sum_{j=0}^{J} (I - alpha H)^j v``; it converges when
``0 < alpha < 2 / lambda_max(H)`` and ``H`` is positive definite. Lorraine et al.'s Alg. 3 and
AutoBalance's Alg. 2 (step ``eta``; its code uses ``eta = 1``) return the sum without the
leading factor; fairopt multiplies by ``alpha`` so the result approximates ``H^{-1} v`` for
every ``alpha`` (identical at ``alpha = 1``; an implementation without the factor returns
``1 / alpha`` times fairopt's vector, which matters for ``alpha != 1``).

Sign: AutoBalance's §2 text writes ``d theta/d alpha = +H^{-1} d^2 L_train / d theta d alpha``
(the minus sign of the implicit function theorem is missing there); its Alg. 2 has the minus
(``v_2 = -p d^2 L_train / d theta d alpha``), as does fairopt.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

PyTree = Any

INVERSES = ("neumann", "cg", "exact")


def _is_concrete_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a Python int (it fixes a loop length), got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_positive(value, name: str) -> None:
    if _is_concrete_number(value) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_nonnegative(value, name: str) -> None:
    if _is_concrete_number(value) and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def hvp(f: Callable[..., jax.Array], primals: PyTree, tangents: PyTree, *args) -> PyTree:
    """Hessian-vector product ``nabla^2_x f(x, *args) . t`` by forward-over-reverse differentiation.

    ``jax.jvp`` of ``jax.grad(f)``: one forward pass over the reverse-mode gradient, so the cost
    is a small multiple of a gradient and ``H`` is never formed (the JAX autodiff cookbook's
    recommended HVP).

    Args:
      f: scalar function ``f(x, *args)``; differentiated with respect to its first argument.
      primals: the point ``x`` (any pytree).
      tangents: the vector ``t`` (same structure and dtypes as ``primals``).
      *args: further arguments of ``f``, held fixed.

    Returns:
      Pytree like ``primals``.
    """
    return jax.jvp(lambda x: jax.grad(f)(x, *args), (primals,), (tangents,))[1]


def linearized_hvp(f: Callable[..., jax.Array], primals: PyTree, *args) -> Callable[[PyTree], PyTree]:
    """``t -> nabla^2_x f(x, *args) . t`` at a fixed point, for many products.

    ``jax.linearize`` of ``jax.grad(f)``: the forward and reverse passes at ``x`` run once and
    each product evaluates only the tangent computation, where :func:`hvp` redoes the primal work
    every time (inside a Neumann or CG loop XLA cannot hoist it out). Same values as :func:`hvp`.
    """
    _, product = jax.linearize(lambda x: jax.grad(f)(x, *args), primals)
    return product


def neumann_inverse_hvp(hvp_fn: Callable[[PyTree], PyTree], v: PyTree, *, alpha, num_terms: int) -> PyTree:
    """Neumann-series approximation ``H^{-1} v ≈ alpha sum_{j=0}^{J} (I - alpha H)^j v``.

    Uses ``J = num_terms`` Hessian-vector products in a ``lax.fori_loop``:
    ``p_0 = v``, ``p_{j+1} = p_j - alpha H p_j``, result ``alpha (p_0 + ... + p_J)``.
    The error is ``(I - alpha H)^{J+1} H^{-1} v``, so it shrinks geometrically with ``J`` when
    ``0 < alpha < 2 / lambda_max(H)`` and ``H`` is positive definite.

    Args:
      hvp_fn: ``t -> H t`` (e.g. a closure over :func:`hvp`).
      v: right-hand side (pytree).
      alpha: step size, > 0 (float or traced scalar). AutoBalance code: 1; FACIMS code: 0.1.
      num_terms: ``J``, a Python int >= 0 (``J = 0`` returns ``alpha v``).

    Returns:
      Pytree like ``v``.

    Raises:
      ValueError: ``alpha`` a concrete number <= 0 or ``num_terms < 0``.
      TypeError: ``num_terms`` not a Python int.
    """
    _check_positive(alpha, "alpha")
    _check_int(num_terms, "num_terms", 0)

    def body(_, carry):
        term, total = carry
        curvature = hvp_fn(term)
        term = jax.tree_util.tree_map(lambda p, hp: p - alpha * hp, term, curvature)
        total = jax.tree_util.tree_map(jnp.add, total, term)
        return term, total

    _, total = jax.lax.fori_loop(0, num_terms, body, (v, v))
    return jax.tree_util.tree_map(lambda leaf: alpha * leaf, total)


def cg_inverse_hvp(
    hvp_fn: Callable[[PyTree], PyTree], v: PyTree, *, max_iters: int, tol: float = 1e-10, damping=0.0
) -> PyTree:
    """Conjugate-gradient solve of ``(H + damping I) x = v`` from ``x_0 = 0``, one HVP per iteration.

    The textbook recursion (Nocedal & Wright, Alg. 5.2) on pytrees, in a ``lax.while_loop``:

    .. math::
        x_0 = 0,\\; r_0 = p_0 = v;\\quad
        a_k = \\frac{r_k^\\top r_k}{p_k^\\top A p_k},\\;
        x_{k+1} = x_k + a_k p_k,\\; r_{k+1} = r_k - a_k A p_k,\\;
        p_{k+1} = r_{k+1} + \\frac{r_{k+1}^\\top r_{k+1}}{r_k^\\top r_k} p_k,

    with ``A = H + damping I``. It stops after ``max_iters`` iterations or when
    ``||r_k|| <= tol ||v||``. Same iterates as :func:`jax.scipy.sparse.linalg.cg` from ``x0 = 0``,
    which spends one more product on the initial residual ``v - A x0`` (so k iterations cost k
    HVPs here, k + 1 there). CG needs ``A`` symmetric positive definite; ``damping > 0``
    regularises an indefinite or singular ``H`` (then the result is the damped inverse, a biased
    hypergradient). On an indefinite ``H`` the iterates are still finite as long as no
    ``p^T A p`` is exactly 0 (then the step is 0 and the loop stops).

    Args:
      hvp_fn: ``t -> H t``.
      v: right-hand side (pytree).
      max_iters: Python int >= 1 (one Hessian-vector product per iteration).
      tol: relative residual tolerance, >= 0.
      damping: Tikhonov damping ``lambda >= 0`` (float or traced scalar).

    Returns:
      Pytree like ``v``.
    """
    _check_int(max_iters, "max_iters", 1)
    _check_nonnegative(tol, "tol")
    _check_nonnegative(damping, "damping")
    tree_map = jax.tree_util.tree_map

    def damped(t):
        return tree_map(lambda ht, ti: ht + damping * ti, hvp_fn(t), t)

    threshold = jnp.square(tol) * tree_dot(v, v)  # stop when r.r <= tol^2 v.v

    def unfinished(carry):
        iteration, _, _, _, residual_norm2 = carry
        return (iteration < max_iters) & (residual_norm2 > threshold)

    def body(carry):
        iteration, x, residual, direction, residual_norm2 = carry
        curvature = damped(direction)
        denominator = tree_dot(direction, curvature)
        step = jnp.where(denominator != 0, residual_norm2 / jnp.where(denominator != 0, denominator, 1), 0)
        x = tree_map(lambda xi, pi: xi + step * pi, x, direction)
        residual = tree_map(lambda ri, api: ri - step * api, residual, curvature)
        new_norm2 = tree_dot(residual, residual)
        beta = new_norm2 / jnp.where(residual_norm2 != 0, residual_norm2, 1)
        direction = tree_map(lambda ri, pi: ri + beta * pi, residual, direction)
        iteration = jnp.where(denominator != 0, iteration + 1, max_iters)  # a zero curvature step ends the loop
        return iteration, x, residual, direction, new_norm2

    zeros = tree_map(jnp.zeros_like, v)
    initial = (jnp.zeros((), jnp.int32), zeros, v, v, tree_dot(v, v))
    return jax.lax.while_loop(unfinished, body, initial)[1]


def exact_inverse_hvp(hvp_fn: Callable[[PyTree], PyTree], v: PyTree, *, damping=0.0) -> PyTree:
    """``(H + damping I)^{-1} v`` by materialising ``H`` (``n`` HVPs) and ``jnp.linalg.solve``.

    ``O(n^2)`` memory and ``O(n^3)`` time in the number of parameters ``n``: for tests and tiny
    problems. ``H`` is built column by column (``vmap`` of ``hvp_fn`` over the unit vectors,
    flattened with ``jax.flatten_util.ravel_pytree``) and symmetrised, ``(H + H^T) / 2``, to
    remove float round-off asymmetry.

    Args:
      hvp_fn: ``t -> H t``.
      v: right-hand side (pytree).
      damping: added to the diagonal, >= 0.

    Returns:
      Pytree like ``v``.
    """
    _check_nonnegative(damping, "damping")
    flat_v, unravel = ravel_pytree(v)
    size = flat_v.shape[0]

    def column(unit):
        return ravel_pytree(hvp_fn(unravel(unit)))[0]

    hessian = jax.vmap(column, out_axes=1)(jnp.eye(size, dtype=flat_v.dtype))
    hessian = 0.5 * (hessian + hessian.T) + damping * jnp.eye(size, dtype=flat_v.dtype)
    return unravel(jnp.linalg.solve(hessian, flat_v))


def inverse_hvp(
    hvp_fn: Callable[[PyTree], PyTree],
    v: PyTree,
    *,
    inverse: str = "neumann",
    alpha=1.0,
    num_terms: int = 5,
    cg_iters: int = 20,
    tol: float = 1e-10,
    damping=0.0,
) -> PyTree:
    """``H^{-1} v`` with the method named ``inverse`` (``"neumann"``, ``"cg"`` or ``"exact"``).

    ``damping`` adds ``damping * I`` to ``H`` for every method (for Neumann through the HVP).

    Raises:
      ValueError: unknown ``inverse`` (the message lists the choices) or bad numbers.
    """
    if inverse not in INVERSES:
        raise ValueError(f"inverse must be one of {', '.join(map(repr, INVERSES))}, got {inverse!r}")
    _check_nonnegative(damping, "damping")
    if inverse == "cg":
        return cg_inverse_hvp(hvp_fn, v, max_iters=cg_iters, tol=tol, damping=damping)
    if inverse == "exact":
        return exact_inverse_hvp(hvp_fn, v, damping=damping)

    def damped(t):
        return jax.tree_util.tree_map(lambda ht, ti: ht + damping * ti, hvp_fn(t), t)

    return neumann_inverse_hvp(damped, v, alpha=alpha, num_terms=num_terms)


def implicit_hypergradient(
    inner_loss: Callable[[PyTree, PyTree], jax.Array],
    outer_loss: Callable[..., jax.Array],
    theta_star: PyTree,
    inner_hparams: PyTree,
    outer_args: tuple = (),
    *,
    inverse: str = "neumann",
    alpha=1.0,
    num_terms: int = 5,
    cg_iters: int = 20,
    damping=0.0,
    tol: float = 1e-10,
):
    """Implicit hypergradient of ``F(theta*(h), h, *outer_args)`` (module docstring).

    .. math::
        \\frac{dF}{dh} = \\partial_h F - \\partial^2_{h,\\theta} G \\; H^{-1} \\nabla_\\theta F,
        \\qquad H = \\nabla^2_\\theta G(\\theta^*, h)

    Steps: ``v = grad_theta F(theta*)``; ``u ≈ H^{-1} v`` (Neumann, CG or exact, from HVPs of
    ``G`` at ``theta*``); the mixed term is the VJP ``grad_h <grad_theta G(theta*, h), u>``
    with ``u`` fixed; the result is ``grad_h F - mixed``. ``theta_star`` must be (close to) a
    stationary point of ``inner_loss`` — the formula assumes ``grad_theta G(theta*, h) = 0``.
    ``outer_args`` (e.g. a validation batch) do not enter the inner problem, so their total
    derivative is the partial one.

    Pure and jit-able; under :func:`jax.vmap` over a leading group axis of ``theta_star``,
    ``inner_hparams`` and/or ``outer_args`` each group uses its own Hessian.

    Integer or boolean leaves (labels, group indices, masks) may sit in ``inner_hparams`` and
    ``outer_args``: like ``jax.grad(..., allow_int=True)`` their "gradient" is a ``float0``
    array of zeros (``jax.dtypes.float0``) of the leaf's shape. ``theta_star`` must be floating.

    Args:
      inner_loss: ``G(theta, inner_hparams) -> scalar``.
      outer_loss: ``F(theta, inner_hparams, *outer_args) -> scalar``.
      theta_star: inner solution (any pytree; e.g. a :class:`fairopt.posterior.Gaussian`).
      inner_hparams: hyperparameters ``h`` (any pytree; e.g. ``(global_posterior, vs_params)``).
      outer_args: tuple of further arguments of ``outer_loss`` only.
      inverse: ``"neumann"``, ``"cg"`` or ``"exact"``.
      alpha: Neumann step size (> 0). num_terms: Neumann terms ``J`` (>= 0).
      cg_iters: CG iterations (>= 1). damping: ``H + damping I`` (>= 0). tol: CG tolerance.

    Returns:
      ``(dF/d inner_hparams, dF/d outer_args)`` with the structures of ``inner_hparams`` and
      ``outer_args`` (a tuple).

    Raises:
      ValueError / TypeError: unknown ``inverse``, ``outer_args`` not a tuple, concrete
        ``damping < 0``; for ``"neumann"`` concrete ``alpha <= 0`` or ``num_terms < 0``; for
        ``"cg"`` ``cg_iters < 1``. Settings of the methods not chosen are ignored.
    """
    if inverse not in INVERSES:
        raise ValueError(f"inverse must be one of {', '.join(map(repr, INVERSES))}, got {inverse!r}")
    if not isinstance(outer_args, tuple):
        raise TypeError(
            f"outer_args must be a tuple of extra arguments of outer_loss, got {type(outer_args).__name__}; "
            "wrap a single argument as (arg,)."
        )
    # Only the settings of the chosen inverse are validated (e.g. cg_iters=0 is fine for Neumann).
    if inverse == "neumann":
        _check_positive(alpha, "alpha")
        _check_int(num_terms, "num_terms", 0)
    if inverse == "cg":
        _check_int(cg_iters, "cg_iters", 1)
    _check_nonnegative(damping, "damping")

    outer_grad_theta, outer_grad_hparams, outer_grad_args = jax.grad(
        lambda theta, hparams, args: outer_loss(theta, hparams, *args), argnums=(0, 1, 2), allow_int=True
    )(theta_star, inner_hparams, outer_args)

    inverse_product = inverse_hvp(
        linearized_hvp(inner_loss, theta_star, inner_hparams),
        outer_grad_theta,
        inverse=inverse,
        alpha=alpha,
        num_terms=num_terms,
        cg_iters=cg_iters,
        tol=tol,
        damping=damping,
    )
    _, mixed_vjp = jax.vjp(lambda hparams: jax.grad(inner_loss)(theta_star, hparams), inner_hparams)
    (mixed,) = mixed_vjp(inverse_product)
    hypergradient = jax.tree_util.tree_map(_subtract_unless_float0, outer_grad_hparams, mixed)
    return hypergradient, outer_grad_args


def _subtract_unless_float0(direct, mixed):
    """``direct - mixed``; integer leaves carry ``float0`` zero tangents and are passed through."""
    if jnp.result_type(direct) == jax.dtypes.float0:
        return direct
    return direct - mixed


def tree_dot(first: PyTree, second: PyTree) -> jax.Array:
    """``<first, second>`` summed over all leaves (CG's inner products; tests and diagnostics)."""
    return optax.tree.vdot(first, second)
