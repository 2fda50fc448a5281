"""Sharding the group axis (and optionally the rows axis) of FACIMS over several devices.

The FACIMS solver keeps every per-group quantity on a leading group axis ``[G, ...]``
(``local_posteriors``, ``local_opt_state``, the :class:`~fairopt.data.GroupedArrays` data)
and ``jax.vmap``s its per-group functions over that axis. Placing those arrays on a
:class:`jax.sharding.Mesh` with ``NamedSharding(mesh, P("groups"))`` and replicating the
rest (global posterior, VS parameters, optimiser states of the global level, the key) is all
it takes to run the step on several devices: ``jax.jit(solver.step)`` propagates the input
shardings through the program (GSPMD), each device runs the vmapped body on its own groups,
and the only cross-device communication is the average of the groups' hypergradients in the
upper level (an all-reduce). The solver code does not change::

    from fairopt import sharding
    mesh = sharding.group_mesh()                        # all devices on the axis "groups"
    state = sharding.shard_group_axis(solver.init(key, params), mesh)
    data = sharding.shard_group_axis((train, val), mesh)   # GroupedArrays, group axis sharded
    step = jax.jit(solver.step)
    state, metrics = step(state, data)                  # local posteriors stay sharded

The number of groups must be a multiple of the number of devices on the ``"groups"`` axis
(:func:`shard_group_axis` raises a ValueError otherwise). :func:`pad_groups` appends empty
groups (``count = 0``; FACIMS marks them inactive: they neither move nor enter the
hypergradient average) to reach a multiple; pass the same padded ``group_counts`` (zeros
appended) to :func:`fairopt.solvers.facims.facims`.

Optionally a second mesh axis ``"rows"`` (``group_mesh(batch_devices=b)``) splits the rows of
the data arrays ``GroupedArrays.x / y`` ``[G, N, ...]`` over ``b`` devices; the posterior
state is replicated along it. ``N`` must then be a multiple of ``b`` (``group_arrays(...,
pad_to=...)``).

Sweeps: a vmapped sweep (:mod:`fairopt.sweep`: states, hyperparameters and data stacked on a
leading run axis ``[R, ...]``) is split over a mesh with axes ``("runs", "groups")``
(:func:`sweep_mesh`): :func:`shard_runs` places the run axis over ``"runs"`` and, in FACIMS
states and data, the group axis behind it over ``"groups"``. ``jax.jit(jax.vmap(solver.step))``
then runs each device's runs (and groups) where they live; runs never communicate, groups only
in the hypergradient average.

Multi-host (several processes, one per host): :func:`fairopt.distributed.initialize` first in
every process; ``jax.devices()`` then lists the devices of all hosts and :func:`group_mesh` /
:func:`sweep_mesh` span them (see ``docs/multi_device.md``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fairopt.data.batching import GroupBatch, GroupedArrays

__all__ = [
    "GROUP_AXIS",
    "ROWS_AXIS",
    "RUNS_AXIS",
    "sweep_mesh",
    "shard_runs",
    "group_mesh",
    "group_sharding",
    "replicated_sharding",
    "shard_group_axis",
    "replicate",
    "pad_groups",
    "padded_group_count",
]

PyTree = Any

#: Mesh axis over which the group axis is split.
GROUP_AXIS = "groups"
#: Optional second mesh axis over which the rows of the data arrays are split.
ROWS_AXIS = "rows"
#: Mesh axis over which the runs of a vmapped sweep are split.
RUNS_AXIS = "runs"


def group_mesh(num_devices: int | None = None, *, batch_devices: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A device mesh with axis ``"groups"`` (and ``"rows"`` if ``batch_devices > 1``).

    Args:
      num_devices: how many devices in total (the first ``num_devices`` of ``devices``);
        default all of them.
      batch_devices: devices along the ``"rows"`` axis (splitting the data rows); the
        ``"groups"`` axis gets ``num_devices // batch_devices``. With the default 1 the mesh is
        one-dimensional, axis ``("groups",)``.
      devices: the devices to use (default :func:`jax.devices`, i.e. every device of every
        process after ``jax.distributed.initialize()``).

    Returns:
      :class:`jax.sharding.Mesh` with axis names ``("groups",)`` or ``("groups", "rows")``.

    Raises:
      ValueError: ``num_devices`` not in ``[1, len(devices)]`` or not a multiple of
        ``batch_devices``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_devices is None:
        num_devices = len(devices)
    if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) or not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices must be an integer in [1, {len(devices)}] (the available devices), got {num_devices!r}")
    if isinstance(batch_devices, bool) or not isinstance(batch_devices, (int, np.integer)) or batch_devices < 1:
        raise ValueError(f"batch_devices must be a positive integer, got {batch_devices!r}")
    if num_devices % batch_devices:
        raise ValueError(f"num_devices={num_devices} is not a multiple of batch_devices={batch_devices}")
    chosen = np.asarray(devices[: int(num_devices)], dtype=object)
    if batch_devices == 1:
        return Mesh(chosen, (GROUP_AXIS,))
    return Mesh(chosen.reshape(int(num_devices) // int(batch_devices), int(batch_devices)), (GROUP_AXIS, ROWS_AXIS))


def group_sharding(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P("groups"))``: the leading axis split over the ``"groups"`` devices."""
    return NamedSharding(mesh, PartitionSpec(GROUP_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """``NamedSharding(mesh, P())``: a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def _group_axis_size(mesh: Mesh) -> int:
    if GROUP_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh must have an axis named {GROUP_AXIS!r} (use fairopt.sharding.group_mesh), got {mesh.axis_names}")
    return int(mesh.shape[GROUP_AXIS])


def padded_group_count(num_groups: int, mesh: Mesh) -> int:
    """The smallest multiple of the ``"groups"`` axis size that is >= ``num_groups``."""
    size = _group_axis_size(mesh)
    return -(-int(num_groups) // size) * size


def _check_divisible(num_groups: int, mesh: Mesh, where: str) -> None:
    size = _group_axis_size(mesh)
    if num_groups % size:
        raise ValueError(
            f"{where}: {num_groups} groups cannot be split evenly over the {size} devices of mesh axis "
            f"{GROUP_AXIS!r}. Either use a mesh whose 'groups' axis divides {num_groups} "
            f"(fairopt.sharding.group_mesh(num_devices=...)) or pad to {padded_group_count(num_groups, mesh)} "
            "groups with fairopt.sharding.pad_groups (empty groups are inactive in FACIMS; pad the "
            "group_counts given to facims() with zeros too)."
        )


def _rows_spec(mesh: Mesh, num_rows: int, where: str):
    """The spec of a data array's rows axis: ``"rows"`` if the mesh has that axis, else None."""
    if ROWS_AXIS not in mesh.axis_names:
        return None
    size = int(mesh.shape[ROWS_AXIS])
    if num_rows % size:
        raise ValueError(
            f"{where}: {num_rows} rows per group cannot be split evenly over the {size} devices of mesh axis "
            f"{ROWS_AXIS!r}; build the data with fairopt.data.group_arrays(dataset, pad_to=<a multiple of {size}>)"
        )
    return ROWS_AXIS


def _put(leaf, mesh: Mesh, spec: PartitionSpec):
    sharding = NamedSharding(mesh, spec)
    if jax.process_count() > 1 and isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
        # Multi-host: device_put onto a mesh spanning other processes accepts host (numpy) values
        # (the same on every process, which JAX checks) but not arrays committed to a local device.
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(leaf)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        leaf = np.asarray(leaf)
    return jax.device_put(leaf, sharding)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array leaf of ``tree`` copied to all devices of ``mesh``."""
    return jax.tree_util.tree_map(lambda leaf: _put(leaf, mesh, PartitionSpec()), tree)


def _shard_leading(tree: PyTree, mesh: Mesh, where: str) -> PyTree:
    """Every leaf's leading (group) axis split over ``"groups"``; all leaves must share it."""
    leaves = jax.tree_util.tree_leaves(tree)
    sizes = {int(np.shape(leaf)[0]) for leaf in leaves if np.ndim(leaf) >= 1}
    if any(np.ndim(leaf) == 0 for leaf in leaves) or len(sizes) > 1:
        raise ValueError(f"{where}: every leaf must have the same leading group axis, got shapes {[np.shape(l) for l in leaves]}")
    if sizes:
        _check_divisible(sizes.pop(), mesh, where)
    return jax.tree_util.tree_map(lambda leaf: _put(leaf, mesh, PartitionSpec(GROUP_AXIS)), tree)


def _shard_data(data, mesh: Mesh):
    """GroupedArrays / GroupBatch: group axis over ``"groups"``, rows over ``"rows"`` if present."""
    if isinstance(data, GroupedArrays):
        num_groups, num_rows = data.y.shape
        _check_divisible(num_groups, mesh, "GroupedArrays")
        rows = _rows_spec(mesh, num_rows, "GroupedArrays")
        return GroupedArrays(
            _put(data.x, mesh, PartitionSpec(GROUP_AXIS, rows)),
            _put(data.y, mesh, PartitionSpec(GROUP_AXIS, rows)),
            _put(data.count, mesh, PartitionSpec(GROUP_AXIS)),
        )
    # GroupBatch: [..., G, B, ...]; the group axis is at y.ndim - 2.
    lead = data.y.ndim - 2
    num_groups, num_rows = data.y.shape[lead:]
    _check_divisible(num_groups, mesh, "GroupBatch")
    rows = _rows_spec(mesh, num_rows, "GroupBatch")
    spec = PartitionSpec(*([None] * lead), GROUP_AXIS, rows)
    return GroupBatch(*(_put(leaf, mesh, spec) for leaf in data))


def _is_data(node) -> bool:
    return isinstance(node, (GroupedArrays, GroupBatch))


def shard_group_axis(tree: PyTree, mesh: Mesh, *, num_groups: int | None = None) -> PyTree:
    """Place ``tree`` on ``mesh``: group-axis arrays split over ``"groups"``, the rest replicated.

    Which arrays carry the group axis:

    * a :class:`fairopt.solvers.facims.FacimsState`: ``local_posteriors`` and
      ``local_opt_state`` (leaves ``[G, ...]``); everything else (global posterior and its
      optimiser state, VS parameters, hyper-optimiser state, round counter, key) replicated.
      With ``hparams_per_group`` the ``[K, G]`` VS parameters stay replicated (they are tiny);
    * :class:`~fairopt.data.GroupedArrays` and :class:`~fairopt.data.GroupBatch` anywhere in
      ``tree`` (e.g. the ``(train, val)`` pair of the FACIMS step): all of their arrays, with
      the rows axis also split over ``"rows"`` if the mesh has that axis;
    * any other array leaf: split iff ``num_groups`` is given and its leading dimension equals
      it (an explicit opt-in: a replicated array could have a leading dimension equal to G by
      coincidence), else replicated.

    Sharding changes where arrays live, not their values: ``jax.jit(solver.step)`` on the
    result computes the same numbers as on one device (up to float reassociation in the
    cross-group average).

    Args:
      tree: any pytree (a FacimsState, data, a tuple of both, ...).
      mesh: from :func:`group_mesh` (must have the axis ``"groups"``).
      num_groups: optional G for the generic rule above.

    Returns:
      The same pytree with every leaf a ``jax.Array`` placed with a ``NamedSharding`` on ``mesh``.

    Raises:
      ValueError: a group axis not divisible by the ``"groups"`` mesh axis (the message names
        the fixes), or a rows axis not divisible by ``"rows"``.
    """
    _group_axis_size(mesh)
    from fairopt.solvers.facims import FacimsState  # local import: keeps the data layer independent

    def place(node):
        if isinstance(node, FacimsState):
            rest = node._replace(local_posteriors=None, local_opt_state=None)
            rest = replicate(rest, mesh)
            return rest._replace(
                local_posteriors=_shard_leading(node.local_posteriors, mesh, "FacimsState.local_posteriors"),
                local_opt_state=_shard_leading(node.local_opt_state, mesh, "FacimsState.local_opt_state"),
            )
        if _is_data(node):
            return _shard_data(node, mesh)
        if num_groups is not None and np.ndim(node) >= 1 and np.shape(node)[0] == num_groups:
            _check_divisible(num_groups, mesh, f"array of shape {np.shape(node)}")
            return _put(node, mesh, PartitionSpec(GROUP_AXIS))
        return _put(node, mesh, PartitionSpec())

    return jax.tree_util.tree_map(place, tree, is_leaf=lambda node: isinstance(node, FacimsState) or _is_data(node))


def sweep_mesh(group_devices: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``("runs", "groups")`` mesh over ``devices`` (default all, of every process).

    ``group_devices`` devices split the group axis of each run; the remaining factor
    ``len(devices) // group_devices`` splits the runs. ``group_devices=1`` (the default) puts
    every device on the run axis: whole runs per device, no communication at all.

    Raises:
      ValueError: ``group_devices`` is not a positive divisor of the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(group_devices, bool) or not isinstance(group_devices, (int, np.integer)) or group_devices < 1 \
            or len(devices) % group_devices:
        divisors = [d for d in range(1, len(devices) + 1) if len(devices) % d == 0]
        raise ValueError(
            f"the group axis can be split over a divisor of the {len(devices)} devices ({', '.join(map(str, divisors))}), "
            f"got {group_devices!r}"
        )
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // int(group_devices), int(group_devices))
    return Mesh(grid, (RUNS_AXIS, GROUP_AXIS))


def shard_runs(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place a stacked sweep on a :func:`sweep_mesh`: every leaf's leading run axis over
    ``"runs"``; in a :class:`~fairopt.solvers.facims.FacimsState` (``local_posteriors``,
    ``local_opt_state``) and in :class:`~fairopt.data.GroupedArrays` the group axis behind it
    over ``"groups"`` too.

    The number of runs must be a multiple of the ``"runs"`` axis size (pad the sweep by
    repeating a run) and the number of groups a multiple of the ``"groups"`` axis size.

    Raises:
      ValueError: either axis does not divide evenly (the message says which and the fix).
    """
    from fairopt.solvers.facims import FacimsState  # local import: keeps the data layer independent

    runs_size, groups_size = int(mesh.shape[RUNS_AXIS]), _group_axis_size(mesh)

    def put(leaf, group_axis: bool):
        shape = np.shape(leaf)
        if not shape or shape[0] % runs_size:
            raise ValueError(
                f"a sweep leaf of shape {shape}: its leading run axis must be a multiple of the {runs_size} devices "
                f"of mesh axis {RUNS_AXIS!r}; pad the sweep to a multiple by repeating a run"
            )
        if group_axis and shape[1] % groups_size:
            raise ValueError(
                f"{shape[1]} groups cannot be split evenly over the {groups_size} devices of mesh axis {GROUP_AXIS!r}; "
                f"split the groups over a divisor of {shape[1]} devices"
            )
        return _put(leaf, mesh, PartitionSpec(RUNS_AXIS, GROUP_AXIS) if group_axis else PartitionSpec(RUNS_AXIS))

    def place(node):
        if isinstance(node, FacimsState):
            split = lambda tree: jax.tree_util.tree_map(lambda leaf: put(leaf, True), tree)  # noqa: E731
            rest = node._replace(local_posteriors=None, local_opt_state=None)
            return jax.tree_util.tree_map(lambda leaf: put(leaf, False), rest)._replace(
                local_posteriors=split(node.local_posteriors), local_opt_state=split(node.local_opt_state)
            )
        if isinstance(node, GroupedArrays):
            return GroupedArrays(*(put(leaf, True) for leaf in node))
        return put(node, False)

    return jax.tree_util.tree_map(place, tree, is_leaf=lambda node: isinstance(node, (FacimsState, GroupedArrays)))


def pad_groups(grouped: GroupedArrays, multiple: int | Mesh) -> GroupedArrays:
    """Append empty groups (``count = 0``, zero rows) so that G is a multiple of ``multiple``.

    ``multiple`` may be a mesh (its ``"groups"`` axis size). FACIMS treats an empty group as
    inactive: its local posterior never moves and it has weight 0 in the hypergradient
    average. Pass ``np.pad(group_counts, (0, extra))`` as ``group_counts`` to ``facims`` so the
    solver's G matches. The random draws depend on G, so a padded run is statistically, not
    bitwise, equivalent to the unpadded one; and the step's ``"divergence"`` metric averages
    over all G slots, padded ones included.
    """
    if isinstance(multiple, Mesh):
        multiple = _group_axis_size(multiple)
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer or a mesh, got {multiple!r}")
    num_groups = grouped.y.shape[0]
    extra = (-num_groups) % int(multiple)
    if extra == 0:
        return grouped
    pad = lambda a: np.concatenate([np.asarray(a), np.zeros((extra,) + a.shape[1:], a.dtype)])  # noqa: E731
    return GroupedArrays(*(jax.numpy.asarray(pad(a)) for a in grouped))
