"""Several processes (one per host) as one JAX program: JAX's multi-controller runtime.

Every process runs the same Python program. :func:`initialize` connects them through
``jax.distributed.initialize`` (a coordinator at ``host:port`` that process 0 serves; on CPUs
the cross-process collectives are Gloo's TCP ones); ``jax.devices()`` then lists the devices of
every process and a :class:`jax.sharding.Mesh` over them (:func:`fairopt.sharding.sweep_mesh`)
spans the hosts. Each process holds only its shards of an array placed on that mesh, so
reading a result needs a collective:

* :func:`gather`: every leaf of a pytree as a full host array in every process (one jitted
  all-gather to a replicated sharding, what ``multihost_utils.process_allgather`` does per leaf);
* :func:`broadcast`: process 0's values of a pytree in every process (``broadcast_one_to_all``),
  e.g. a checkpoint that only process 0 read;
* :func:`broadcast_json`: a JSON-able value of process 0 (a list of result rows, an error).

Each is a collective: every process must call it at the same point of the program (the entry
points do: they run the same steps in the same order everywhere). With one process all three
return their input and communicate nothing, so single-process code is unchanged.

Failure: if a process dies, a collective in the others fails at once (Gloo: "Connection closed
by peer"), and a process busy with local work is stopped by JAX's coordination service once the
dead process has missed its heartbeats for ``heartbeat_timeout_seconds``. Either way nothing
hangs longer than that timeout.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["initialize", "is_primary", "gather", "broadcast", "broadcast_json"]

PyTree = Any


def initialize(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout_seconds: int = 30, initialization_timeout: int = 120) -> None:
    """``jax.distributed.initialize`` with Gloo collectives on CPU and bounded failure detection.

    Must run before any other JAX call of the process. ``None`` arguments are found by JAX:
    the address from ``$JAX_COORDINATOR_ADDRESS``, and all three on SLURM, Open MPI and TPU
    pods from the scheduler's environment.

    Args:
      coordinator_address: ``host:port`` of process 0 (which serves the coordinator there).
      num_processes: processes in the run.
      process_id: this process's index in ``[0, num_processes)``.
      heartbeat_timeout_seconds: a process silent for this long counts as dead, and the others
        stop with an error (JAX's default is 100 s).
      initialization_timeout: seconds to wait for every process to connect.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id, initialization_timeout=int(initialization_timeout),
        heartbeat_timeout_seconds=int(heartbeat_timeout_seconds),
    )


def is_primary() -> bool:
    """True in process 0 (the one that writes results and checkpoints), and with one process."""
    return jax.process_index() == 0


def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _through_key_data(tree: PyTree, transfer) -> PyTree:
    """``transfer`` applied to the leaves, typed PRNG keys passed as their key data and re-wrapped."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = [_is_key(leaf) for leaf in leaves]
    moved = transfer([jax.random.key_data(leaf) if key else leaf for leaf, key in zip(leaves, keys)])
    out = [
        jax.random.wrap_key_data(value, impl=jax.random.key_impl(leaf)) if key else value
        for value, leaf, key in zip(moved, leaves, keys)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def gather(tree: PyTree) -> PyTree:
    """Every leaf as a full array in every process (typed keys stay keys); a collective.

    Leaves that this process holds completely (replicated, or one process) are left alone;
    the others (which must live on NamedShardings) come back as NumPy arrays.
    """
    if jax.process_count() == 1:
        return tree

    def transfer(leaves):
        partial = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable]
        if not partial:
            return leaves
        # one compiled all-gather for the whole tree: every partial leaf made replicated on its mesh
        replicated = [NamedSharding(leaves[i].sharding.mesh, PartitionSpec()) for i in partial]
        gathered = jax.jit(lambda values: values, out_shardings=replicated)([leaves[i] for i in partial])
        leaves = list(leaves)
        for i, value in zip(partial, gathered):
            leaves[i] = np.asarray(value.addressable_data(0))
        return leaves

    return _through_key_data(tree, transfer)


def broadcast(tree: PyTree) -> PyTree:
    """Process 0's value of every leaf, in every process (typed keys stay keys); a collective.

    The leaves must have the same shapes and dtypes in every process. Identity with one process.
    """
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    def transfer(leaves):
        dtypes = [np.asarray(leaf).dtype for leaf in leaves]
        values = multihost_utils.broadcast_one_to_all([np.asarray(leaf) for leaf in leaves])
        return [np.asarray(value).astype(dtype, copy=False) for value, dtype in zip(values, dtypes)]

    return _through_key_data(tree, transfer)


def broadcast_json(value: Any) -> Any:
    """Process 0's ``value`` (anything ``json.dumps`` takes, NaN included) in every process.

    The other processes' ``value`` is ignored. Identity with one process.
    """
    if jax.process_count() == 1:
        return value
    payload = np.frombuffer(json.dumps(value).encode("utf-8"), dtype=np.uint8) if is_primary() else np.zeros(0, np.uint8)
    size = int(broadcast(np.int32(payload.size)))
    buffer = np.zeros(size, np.uint8)
    buffer[: payload.size] = payload[:size]
    return json.loads(broadcast(buffer).tobytes().decode("utf-8"))
