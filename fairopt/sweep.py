"""Hyperparameters as data: one compiled program per method, ``jax.vmap`` over settings and seeds.

Every solver config (``FacimsConfig``, ``AutoBalanceConfig``, ...) is a frozen dataclass that
mixes two kinds of field:

* **static** fields change the program (method variant, divergence, inverse kind, step and
  iteration counts, shapes). Two settings that differ in a static field compile twice.
* **hyperparameters** are numbers (step sizes, weights, radii, temperatures). They are listed by
  the config's ``Hyperparams`` NamedTuple; :meth:`HyperparameterConfig.hyperparams` turns them
  into float32 arrays that the solver's ``init`` stores in its state and ``step`` reads from
  there, so changing one never recompiles, and a batch of them can be ``jax.vmap``-ped::

      configs = [dataclasses.replace(base, alpha_low=a) for a in (0.1, 0.4, 0.7, 1.0)]  # validated
      hyperparams = sweep.stack([c.hyperparams() for c in configs])   # leaves [4]
      states = jax.vmap(solver.init)(keys, params, hyperparams)        # 4 runs, one program
      states, metrics = jax.jit(jax.vmap(solver.step, in_axes=(0, None)))(states, data)

This is the pattern of ``optax.inject_hyperparams`` (numbers in the state, structure in the
code), applied to whole solvers. The values are validated in Python when a config is built
(``__post_init__``); the traced arrays are never checked inside a compiled step.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, ClassVar, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

PyTree = Any


class HyperparameterConfig:
    """Mixin for frozen config dataclasses: ``Hyperparams`` names the traced (numeric) fields.

    A subclass sets ``Hyperparams`` to a NamedTuple whose field names are config fields; every
    other field is static.
    """

    Hyperparams: ClassVar[type[NamedTuple]]

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        return tuple(cls.Hyperparams._fields)

    @classmethod
    def static_names(cls) -> tuple[str, ...]:
        traced = set(cls.hyperparameter_names())
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in traced)

    def hyperparams(self):
        """The numeric fields as a ``Hyperparams`` pytree of float32 scalars."""
        return self.Hyperparams(
            **{name: jnp.asarray(getattr(self, name), jnp.float32) for name in self.hyperparameter_names()}
        )

    def static_settings(self) -> dict[str, Any]:
        """The static fields and their values (what decides the compiled program)."""
        return {name: getattr(self, name) for name in self.static_names()}


def as_hyperparams(hyperparams, cls: type, default):
    """``default`` if ``hyperparams`` is None, else ``hyperparams`` (which must be a ``cls``, the
    solver's hyperparameter NamedTuple, e.g. ``config.hyperparams()``) with every leaf a float32
    array (a field may itself be a pytree of numbers, or None)."""
    if hyperparams is None:
        return default
    if not isinstance(hyperparams, cls):
        raise TypeError(
            f"hyperparams must be a {cls.__name__} (e.g. config.hyperparams()), got {type(hyperparams).__name__}"
        )
    return jax.tree_util.tree_map(lambda value: jnp.asarray(value, jnp.float32), hyperparams)  # None leaves stay None


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack equally-shaped pytrees along a new leading axis (the sweep axis)."""
    if not trees:
        raise ValueError("stack needs at least one pytree")
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack([jnp.asarray(leaf) for leaf in leaves]), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`stack`: the pytrees along the leading axis."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        return []
    size = leaves[0].shape[0]
    return [jax.tree_util.tree_unflatten(treedef, [leaf[index] for leaf in leaves]) for index in range(size)]


def take(tree: PyTree, index) -> PyTree:
    """Element ``index`` (an int or an index array) of the leading axis of every leaf."""
    return jax.tree_util.tree_map(lambda leaf: leaf[index], tree)


def product(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of ``{name: values}`` as a list of settings, in the order of
    ``itertools.product`` over the names as given (the last name varies fastest)."""
    names = list(grid)
    for name, values in grid.items():
        if len(values) == 0:
            raise ValueError(f"the grid of {name!r} is empty; give at least one value")
    return [dict(zip(names, values)) for values in itertools.product(*(grid[name] for name in names))]


def group_by_static(configs: Iterable[Any]) -> list[list[int]]:
    """Indices of ``configs`` grouped by their static settings (one compiled program per group),
    in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, config in enumerate(configs):
        groups.setdefault(repr(sorted(config.static_settings().items())), []).append(index)
    return list(groups.values())


def optimizer_factory(optimizer, name: str = "optimizer", *, default=None):
    """An optimiser slot of a solver as a factory ``learning_rate -> optax.GradientTransformation``.

    * ``None`` gives ``default`` (a factory, or None to let the solver build its own);
    * a callable is taken as a factory (``optax.adam``, ``functools.partial(optax.sgd,
      momentum=0.9)``): the solver calls it inside ``init`` / ``step`` with the traced learning
      rate of its hyperparameters, so the rate stays data;
    * a ready ``optax.GradientTransformation`` is used as it is (the hyperparameters' learning
      rate for that slot then has no effect).
    """
    import optax

    if optimizer is None:
        return default
    if isinstance(optimizer, optax.GradientTransformation):
        return lambda learning_rate: optimizer
    if callable(optimizer):
        return optimizer
    raise TypeError(
        f"{name} must be an optax GradientTransformation or a factory learning_rate -> GradientTransformation "
        f"(e.g. optax.adam), got {type(optimizer).__name__}"
    )
