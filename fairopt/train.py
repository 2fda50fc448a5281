"""Shared training-loop pieces: solvers, compiled epochs, the fit loop, evaluation.

Every solver in :mod:`fairopt.solvers` is a :class:`Solver` — a small NamedTuple of pure
functions in the style of an optax ``GradientTransformation``::

    solver = fairopt.solvers.erm(apply_fn, loss_fn, optax.adam(1e-3))
    state = solver.init(key, params)
    state, metrics = solver.step(state, batch)      # jit-able; metrics: dict of scalars
    probs = solver.predict(state, x)                # [n, K] class probabilities

Python only drives epochs; an epoch (shuffle, slice into minibatches, ``lax.scan`` over the
steps) is one compiled function, built once per (solver, data shape) and reused.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class Batch(NamedTuple):
    """A minibatch of rows; ``mask`` is False on padded rows (the last batch of an epoch)."""

    x: jax.Array  # [B, d]
    y: jax.Array  # [B]
    groups: jax.Array  # [B]
    mask: jax.Array  # bool [B]


class Solver(NamedTuple):
    """Pure functions of a training method (see module docstring).

    ``check_data(x, y, groups)`` (optional) validates training arrays on the host, before any
    tracing — what a compiled step cannot do on values (e.g. group ids outside
    ``[0, num_groups)``, which a one-hot would silently drop); :func:`fit` calls it.
    """

    init: Callable[..., PyTree]
    step: Callable[[PyTree, Any], tuple[PyTree, dict]]
    predict: Callable[[PyTree, jax.Array], jax.Array]
    check_data: Callable[..., None] | None = None


def check_group_ids(groups, num_groups: int, *, what: str = "groups") -> None:
    """Raise a ValueError if an id of ``groups`` lies outside ``[0, num_groups)`` (host-side).

    A jitted step cannot raise on values, and ``jax.nn.one_hot`` maps an out-of-range id to a
    zero row: a group the solver was not built for would silently leave the constraint.
    """
    groups = np.asarray(groups)
    if groups.size == 0:
        return
    if not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"{what} must hold integer group ids, got dtype {groups.dtype}")
    low, high = int(groups.min()), int(groups.max())
    if low < 0 or high >= num_groups:
        bad = sorted(set(np.unique(groups[(groups < 0) | (groups >= num_groups)]).tolist()))[:10]
        raise ValueError(
            f"{what} has ids {bad} outside [0, num_groups={num_groups}); build the solver with "
            f"num_groups={max(high + 1, num_groups)} (e.g. Dataset.num_groups) or remap the group ids"
        )


class NonFiniteError(FloatingPointError):
    """Raised when a loss or parameter becomes NaN or infinite during training."""


class CheckpointStore(Protocol):
    """Where a resumable training loop keeps its state (e.g. ``experiments.common.Checkpointer``).

    ``restore(run, like)`` returns ``(epochs done, state)`` of the last checkpoint of ``run``
    shaped like ``like`` (``(0, like)`` if there is none); ``save(run, epoch, state)`` is called
    after every epoch and decides itself whether to write.
    """

    def restore(self, run: str, like: PyTree) -> tuple[int, PyTree]: ...

    def save(self, run: str, epoch: int, state: PyTree) -> None: ...


def shuffled_batch_indices(key: jax.Array, num_rows: int, batch_size: int):
    """Row indices of one epoch of shuffled minibatches, padded to whole batches.

    Args:
      key: PRNG key of the epoch.
      num_rows: rows in the training set (static).
      batch_size: rows per minibatch (static).

    Returns:
      ``(indices [S, B], mask [S, B])`` with ``S = ceil(num_rows / batch_size)``; every row
      appears exactly once with ``mask`` True, padding rows point at row 0 with ``mask`` False.
    """
    num_steps = max(1, math.ceil(num_rows / batch_size))
    permutation = jax.random.permutation(key, num_rows)
    padding = num_steps * batch_size - num_rows
    indices = jnp.concatenate([permutation, jnp.zeros((padding,), permutation.dtype)])
    mask = jnp.arange(num_steps * batch_size) < num_rows
    return indices.reshape(num_steps, batch_size), mask.reshape(num_steps, batch_size)


def make_epoch_fn(step: Callable, *, num_rows: int, batch_size: int) -> Callable:
    """Compile one epoch of ``step`` over shuffled minibatches of ``(x, y, groups)``.

    Returns:
      ``run_epoch(state, x, y, groups, key) -> (state, mean metrics over the epoch's steps)``,
      jitted; every call with the same shapes reuses the compiled function.
    """

    def run_epoch(state, x, y, groups, key):
        indices, mask = shuffled_batch_indices(key, num_rows, batch_size)

        def body(state, batch_indices_and_mask):
            rows, rows_mask = batch_indices_and_mask
            return step(state, Batch(x[rows], y[rows], groups[rows], rows_mask))

        state, metrics = jax.lax.scan(body, state, (indices, mask))
        return state, jax.tree_util.tree_map(jnp.mean, metrics)

    return jax.jit(run_epoch)


def full_batch_steps(step: Callable, state, x, y, groups, *, num_steps: int):
    """``num_steps`` calls of ``step`` on the whole training set (full-batch optimisation).

    Deterministic (no shuffling, no minibatch noise): every group and every rate of a
    constraint is measured on all its rows at every step, which is what the dual updates of the
    constrained solvers need when a group is small. Pure and jit-able: wrap it in ``jax.jit``
    (``num_steps`` static) and ``jax.vmap`` it over stacked states to run a grid of
    hyperparameters as one program.

    Returns:
      ``(state, metrics)``: the final state and the metrics of the last step.
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    batch = Batch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(groups), jnp.ones(jnp.shape(y), bool))
    state, metrics = jax.lax.scan(lambda state, _: step(state, batch), state, None, length=int(num_steps))
    return state, jax.tree_util.tree_map(lambda m: m[-1], metrics)


def check_finite(tree: PyTree, *, what: str, epoch: int) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` and the epoch if any leaf is NaN/inf."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    for path, leaf in leaves:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            continue  # typed PRNG keys carry no floating-point values
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.inexact) and not np.all(np.isfinite(array)):
            name = jax.tree_util.keystr(path)
            raise NonFiniteError(
                f"non-finite {what}{name} at the end of epoch {epoch}; lower the learning rate "
                f"or check the inputs (the last good checkpoint, if any, is kept on disk)"
            )


class Progress:
    """Prints ``[name] epoch e/E metrics | elapsed | ETA`` lines to stderr."""

    def __init__(self, name: str, total: int, *, every: int = 1, stream=None, enabled: bool = True):
        self.name, self.total, self.every = name, total, max(1, every)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.start = time.perf_counter()
        self.done = 0

    def advance(self, metrics: Mapping[str, float] | None = None) -> None:
        """One more unit of work done."""
        self.update(self.done + 1, metrics)

    def update(self, done: int, metrics: Mapping[str, float] | None = None) -> None:
        self.done = done
        if not self.enabled or done == 0 or (done % self.every and done != self.total):
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        shown = " ".join(f"{k}={float(v):.4f}" for k, v in (metrics or {}).items())
        print(
            f"[{self.name}] {done}/{self.total} {shown} | {elapsed:.1f}s elapsed, ETA {eta:.1f}s",
            file=self.stream,
            flush=True,
        )


def fit(
    solver: Solver,
    state: PyTree,
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    key: jax.Array,
    epoch_fn: Callable | None = None,
    on_epoch_end: Callable[[int, PyTree, dict], None] | None = None,
    progress: Progress | None = None,
    start_epoch: int = 0,
) -> tuple[PyTree, list[dict]]:
    """Train ``solver`` for ``epochs`` epochs of shuffled minibatches.

    Args:
      solver: the method; its ``step`` consumes :class:`Batch`.
      state: the solver state from ``solver.init``.
      x, y, groups: training arrays (rows in the first axis).
      epochs: number of passes over the data.
      batch_size: rows per minibatch (the last batch of an epoch is padded and masked).
      key: PRNG key; epoch ``e`` uses ``fold_in(key, e)`` so a resumed run is identical.
      epoch_fn: a compiled epoch from :func:`make_epoch_fn` to reuse across seeds/methods.
      on_epoch_end: called as ``on_epoch_end(epoch, state, metrics)`` (epochs count from 1).
      progress: a :class:`Progress` printer.
      start_epoch: epochs already done (resuming from a checkpoint taken after that epoch).

    Returns:
      The final state and the per-epoch metrics (floats).

    Raises:
      ValueError: if ``solver.check_data`` rejects the arrays (e.g. group ids outside
        ``[0, num_groups)`` of a constrained solver), before any training.
      NonFiniteError: if the epoch metrics or the state stop being finite (checked after every
        epoch, before ``on_epoch_end``, so a checkpoint saved there is always finite).
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if getattr(solver, "check_data", None) is not None:
        solver.check_data(x, y, groups)
    x, y, groups = jnp.asarray(x), jnp.asarray(y), jnp.asarray(groups)
    if epoch_fn is None:
        epoch_fn = make_epoch_fn(solver.step, num_rows=int(x.shape[0]), batch_size=batch_size)
    history = []
    if not 0 <= start_epoch <= epochs:
        raise ValueError(f"start_epoch must be in [0, epochs={epochs}], got {start_epoch}")
    for epoch in range(start_epoch + 1, epochs + 1):
        state, metrics = epoch_fn(state, x, y, groups, jax.random.fold_in(key, epoch))
        metrics = {k: float(v) for k, v in metrics.items()}
        check_finite(metrics, what="training metric ", epoch=epoch)
        check_finite(state, what="solver state ", epoch=epoch)
        history.append(metrics)
        if progress is not None:
            progress.update(epoch, metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch, state, metrics)
    return state, history


def fit_resumable(
    solver: Solver,
    state: PyTree,
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    checkpoints: CheckpointStore | None,
    run: str,
    progress: Progress | None = None,
    on_epoch_end: Callable[[int, PyTree, dict], None] | None = None,
    **fit_kwargs,
) -> tuple[PyTree, list[dict]]:
    """:func:`fit` continued from the last checkpoint of ``run`` and checkpointed after every epoch.

    Args:
      solver, state, x, y, groups: as in :func:`fit` (``state`` is the fresh initial state; it
        also gives the structure that the checkpoint must match).
      checkpoints: a :class:`CheckpointStore`, or None for a plain :func:`fit`.
      run: the name of this training run in ``checkpoints``.
      progress: a :class:`Progress` shared by several runs: advanced once per epoch; the epochs
        restored from the checkpoint count as done.
      on_epoch_end: called as ``on_epoch_end(epoch, state, metrics)`` after the checkpoint.
      **fit_kwargs: ``epochs``, ``batch_size``, ``key``, ``epoch_fn`` of :func:`fit`.

    Returns:
      The final state and the metrics of the epochs trained by this call.
    """
    done = 0
    if checkpoints is not None:
        done, state = checkpoints.restore(run, state)
    if progress is not None and done:
        progress.update(progress.done + done)

    def after_epoch(epoch, state, metrics):
        if checkpoints is not None:
            checkpoints.save(run, epoch, state)
        if progress is not None:
            progress.advance(metrics)
        if on_epoch_end is not None:
            on_epoch_end(epoch, state, metrics)

    return fit(solver, state, x, y, groups, start_epoch=done, on_epoch_end=after_epoch, **fit_kwargs)


def predict_in_batches(predict: Callable, state: PyTree, x: np.ndarray, *, batch_size: int = 8192):
    """``predict(state, x)`` over large inputs in fixed-size chunks (one compilation)."""
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    jitted = jax.jit(predict)
    outputs = []
    for start in range(0, n, batch_size):
        chunk = x[start : start + batch_size]
        pad = batch_size - chunk.shape[0] if n > batch_size else 0
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out = np.asarray(jitted(state, chunk))
        outputs.append(out[: out.shape[0] - pad] if pad else out)
    return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)


def evaluate(predict: Callable, state: PyTree, dataset, **report_kwargs) -> dict[str, float]:
    """All metrics of :func:`fairopt.metrics.report` of ``predict`` on a :class:`Dataset`."""
    from fairopt import metrics  # local import: metrics is a sibling module

    probs = predict_in_batches(predict, state, dataset.features)
    return metrics.report(
        probs,
        dataset.labels,
        dataset.groups,
        num_classes=dataset.num_classes,
        num_groups=dataset.num_groups,
        **report_kwargs,
    )


class BestIterate(NamedTuple):
    """The iterate with the highest validation score seen so far (early stopping on validation)."""

    state: PyTree  # the solver state of that round / epoch
    score: jax.Array  # float32: its validation score (-inf before the first update)
    epoch: jax.Array  # int32: its round / epoch, counted from 1 (0 before the first update)


def best_iterate_tracker(predict: Callable, *, num_classes: int) -> tuple[Callable, Callable]:
    """Keep the iterate of highest validation balanced accuracy: ``(init, update)``, both pure.

    ``init(state) -> BestIterate`` and ``update(best, state, epoch, x, y, mask) -> BestIterate``
    with ``score = BA(predict(state, x), y; mask)``; the new iterate replaces the kept one only if
    its score is strictly higher (ties keep the earlier, shorter-trained iterate). ``mask`` marks
    real rows, so validation sets of different sizes padded to one shape share one compiled
    ``jax.vmap(update)`` (one run per seed or setting). Reads validation only: the epoch it picks
    is a model choice made on validation, like any other setting.
    """
    from fairopt import metrics  # local import: metrics is a sibling module

    def init(state) -> BestIterate:
        return BestIterate(state, jnp.asarray(-jnp.inf, jnp.float32), jnp.asarray(0, jnp.int32))

    def update(best: BestIterate, state, epoch, x, y, mask) -> BestIterate:
        score = metrics.balanced_accuracy(predict(state, x), y, num_classes=num_classes, mask=mask)
        improved = score > best.score
        keep = lambda new, old: jnp.where(improved, new, old)  # noqa: E731
        return BestIterate(
            jax.tree_util.tree_map(keep, state, best.state), keep(score, best.score),
            keep(jnp.asarray(epoch, jnp.int32), best.epoch),
        )

    return init, update
