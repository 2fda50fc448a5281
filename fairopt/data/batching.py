"""Per-group padded arrays and a jit-able per-group batch sampler (pure ``jax.random``).

The tri-level FACIMS solver works on all groups at once with a leading group axis:
:func:`group_arrays` lays a dataset out as ``[G, N_max, ...]`` arrays (group g's rows in
``x[g, :count[g]]``, zero padding after), and :func:`sample_group_batch` draws a ``[G, B, ...]``
batch from it inside ``jit``/``scan``, with a mask that is False for a group that has no rows.
Padded rows are never drawn.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fairopt.data.dataset import Dataset

__all__ = ["GroupedArrays", "GroupBatch", "group_arrays", "sample_group_batch", "sample_group_batches", "whole_group_batch"]


class GroupedArrays(NamedTuple):
    """Rows of each group, padded to a common length (a jax pytree).

    Attributes:
      x: float32 ``[G, N_max, d]``; group g's rows are ``x[g, :count[g]]``, the rest zeros.
      y: int32 ``[G, N_max]``; labels, padded with 0.
      count: int32 ``[G]``; rows per group (0 for an empty group).
    """

    x: jax.Array
    y: jax.Array
    count: jax.Array


class GroupBatch(NamedTuple):
    """A per-group batch (a jax pytree).

    Attributes:
      x: ``[..., G, B, d]`` features.
      y: ``[..., G, B]`` labels.
      mask: bool ``[..., G, B]``; False on every row of a group that has no rows (its x/y are
        then padding and must be ignored), True otherwise.
    """

    x: jax.Array
    y: jax.Array
    mask: jax.Array


def group_arrays(dataset: Dataset, *, pad_to: int | None = None) -> GroupedArrays:
    """Lays ``dataset`` out per group: ``[G, N_max, d]`` with ``N_max = max_g n_g``.

    Rows keep their order inside each group. Runs in numpy (outside jit) and returns device
    arrays.

    Args:
      dataset: the rows; every one of its ``G`` named groups gets a slot, even if empty.
      pad_to: optional fixed ``N_max`` (>= the largest group) so that datasets of different
        sizes (e.g. the val splits of different seeds) share one compiled step.

    Returns:
      :class:`GroupedArrays`.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a fairopt.data.Dataset, got {type(dataset).__name__}")
    counts = dataset.group_counts
    largest = max(int(counts.max(initial=0)), 1)
    if pad_to is None:
        pad_to = largest
    elif isinstance(pad_to, bool) or not isinstance(pad_to, (int, np.integer)) or pad_to < largest:
        raise ValueError(f"pad_to must be an integer >= the largest group ({largest} rows), got {pad_to!r}")
    num_groups = dataset.num_groups
    x = np.zeros((num_groups, int(pad_to), dataset.num_features), np.float32)
    y = np.zeros((num_groups, int(pad_to)), np.int32)
    for g in range(num_groups):
        rows = np.flatnonzero(dataset.groups == g)
        x[g, : rows.size] = dataset.features[rows]
        y[g, : rows.size] = dataset.labels[rows]
    return GroupedArrays(jnp.asarray(x), jnp.asarray(y), jnp.asarray(counts, jnp.int32))


def _check_grouped(grouped) -> GroupedArrays:
    """``grouped`` as GroupedArrays; any NamedTuple with fields x, y, count is accepted."""
    if not isinstance(grouped, GroupedArrays):
        if not all(hasattr(grouped, field) for field in GroupedArrays._fields):
            raise TypeError(
                f"grouped must be a GroupedArrays (from fairopt.data.group_arrays), got {type(grouped).__name__}"
            )
        grouped = GroupedArrays(grouped.x, grouped.y, grouped.count)
    if grouped.x.ndim != 3 or grouped.y.shape != grouped.x.shape[:2] or grouped.count.shape != grouped.x.shape[:1]:
        raise ValueError(
            f"grouped must have x [G, N, d], y [G, N], count [G]; got {grouped.x.shape}, {grouped.y.shape}, "
            f"{grouped.count.shape}"
        )
    return grouped


def _check_static_int(value, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{argument} must be a Python int (static under jit: jax.jit(..., static_argnames=({argument!r},))), "
            f"got {type(value).__name__}"
        )
    if value <= 0:
        raise ValueError(f"{argument} must be positive, got {value}")
    return int(value)


def _draw(key, grouped: GroupedArrays, leading_shape: tuple[int, ...], batch_size: int, replace: bool) -> GroupBatch:
    """``leading_shape + (G, B)`` row draws, uniform over each group's ``count`` real rows.

    One random call for all groups and steps (``randint`` broadcasts the per-group bound), which
    compiles far faster than a vmap over split keys.
    """
    num_groups, num_rows = grouped.y.shape
    safe_count = jnp.maximum(grouped.count, 1)[:, None]  # [G, 1]
    shape = (*leading_shape, num_groups, batch_size)
    if replace:
        index = jax.random.randint(key, shape, 0, safe_count)
    else:
        # A uniformly random permutation of each group's real rows (padding sorts last), read cyclically.
        scores = jax.random.uniform(key, (*leading_shape, num_groups, num_rows))
        scores = jnp.where(jnp.arange(num_rows) < grouped.count[:, None], scores, 2.0)
        order = jnp.argsort(scores, axis=-1)
        positions = jnp.broadcast_to(jnp.arange(batch_size) % safe_count, shape)
        index = jnp.take_along_axis(order, positions, axis=-1)
    group_index = jnp.arange(num_groups)[:, None]  # broadcasts against index [..., G, B]
    mask = jnp.broadcast_to(grouped.count[:, None] > 0, shape)
    return GroupBatch(grouped.x[group_index, index], grouped.y[group_index, index], mask)


def sample_group_batch(key: jax.Array, grouped: GroupedArrays, batch_size: int, *, replace: bool = True) -> GroupBatch:
    """One ``[G, B]`` batch: ``B`` rows drawn uniformly from each group's own rows.

    With ``replace=True`` (default, like the FACIMS sampler) every row is an independent
    uniform draw from ``{0, ..., count_g - 1}``. With ``replace=False`` the batch is a
    uniformly random ordering of the group's rows, read cyclically when ``B > count_g`` (so a
    group smaller than B contributes each row ``floor(B / count_g)`` or one more times).
    A group with ``count_g = 0`` gives an all-False mask row. Padded rows are never drawn.

    Jit-able: ``jax.jit(sample_group_batch, static_argnames=("batch_size", "replace"))``.

    Args:
      key: a PRNG key.
      grouped: from :func:`group_arrays` (or any NamedTuple with the same x, y, count fields).
      batch_size: B, a static positive int.
      replace: static; sample with (default) or without replacement.

    Returns:
      :class:`GroupBatch` with x ``[G, B, d]``, y ``[G, B]``, mask ``[G, B]``.
    """
    grouped = _check_grouped(grouped)
    batch_size = _check_static_int(batch_size, "batch_size")
    return _compiled_group_batch(key, grouped, batch_size, bool(replace))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _compiled_group_batch(key, grouped: GroupedArrays, batch_size: int, replace: bool) -> GroupBatch:
    # Jitted so that eager calls run one compiled program instead of dispatching op by op;
    # inside an outer jit/scan it is simply inlined.
    return _draw(key, grouped, (), batch_size, replace)


def whole_group_batch(grouped: GroupedArrays) -> GroupBatch:
    """Every real row of every group as one ``[G, N_max]`` batch: the arrays as they are, with the
    mask True on group g's first ``count[g]`` rows and False on the padding.

    A masked mean over this batch is the mean over each group's whole split (e.g. FACIMS's
    upper objective on all validation rows, ``FacimsConfig.whole_validation``). Jit-able; the
    cost scales with ``N_max``, so lay the split out with ``pad_to`` no larger than needed.
    """
    grouped = _check_grouped(grouped)
    mask = jnp.arange(grouped.y.shape[1])[None, :] < grouped.count[:, None]
    return GroupBatch(grouped.x, grouped.y, mask)


def sample_group_batches(
    key: jax.Array, grouped: GroupedArrays, batch_size: int, num_batches: int, *, replace: bool = True
) -> GroupBatch:
    """``num_batches`` independent per-group batches, stacked: ``[S, G, B, ...]``.

    Same distribution as ``num_batches`` calls of :func:`sample_group_batch` (drawn in one
    random call, so not the same numbers as calling it with split keys).

    Convenient as the ``xs`` of a ``jax.lax.scan`` over steps. ``batch_size``, ``num_batches``
    and ``replace`` are static under jit.
    """
    grouped = _check_grouped(grouped)
    num_batches = _check_static_int(num_batches, "num_batches")
    batch_size = _check_static_int(batch_size, "batch_size")
    return _compiled_group_batches(key, grouped, batch_size, num_batches, bool(replace))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _compiled_group_batches(key, grouped: GroupedArrays, batch_size: int, num_batches: int, replace: bool):
    return _draw(key, grouped, (num_batches,), batch_size, replace)
