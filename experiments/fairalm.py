r"""FairALM and its baselines on tabular data (FairALM paper §6, DEO constraint).

Methods (``--methods``; one compiled, vmapped program per method and static setting):

* ``unconstrained`` — ERM with cross-entropy;
* ``l2_penalty`` — ``CE + (eta/2) d^2`` (official ``L2_PENALTY``);
* ``reweighting`` — cross-entropy weighted ``∝ 1/n_{y,g}`` per (class, group) cell (the same
  ERM program as ``unconstrained``: the cell weights are a traced hyperparameter);
* ``lagrangian`` — gradient descent-ascent on ``CE + lambda d`` (ascent step ``eta``);
* ``fairalm`` — paper Alg. 2;
* ``group_dro`` — online group DRO over the (class, group) cells.

Protocol: stratified 49/21/30 split per seed (``fairopt.data.split``), features standardised
on the training split, the 400-200-100 ELU MLP, minibatches of ``--batch_size``. Every run is
evaluated on the validation split (``val_`` columns) and the test split: accuracy, DEO
``|TPR_0 - TPR_1|`` (``metrics.report(reduce="between_groups")`` — the paper's DEO for two
groups, the max-min TPR gap for more), DP and EO gaps, and the FNR of every group.

**Settings.** The solver settings are the fields of
:class:`fairopt.solvers.constrained.FairnessConfig` (one flag per field, same name and default).
``--grid=NAME=v1,v2,...`` (repeatable) sweeps settings: the Cartesian product of the grids,
times ``--seeds``, runs as one ``jax.vmap``-ped program per method (numbers such as ``eta`` and
``learning_rate`` are traced hyperparameters, so the whole grid compiles once), in chunks of
``--grid_chunk`` runs. A grid only multiplies the methods it concerns (``eta`` does not change
``unconstrained``). ``--select=METRIC`` (a validation metric such as ``val_deo_gap``) picks one
setting per method on the validation split and adds its test numbers as a row
``"<method> (selected on METRIC)"``. In a sweep, a run whose state or loss stops being finite is
recorded with ``diverged=1`` and no metrics while the other runs of its program go on (a
single setting stops with a ``FATAL`` message, as before).

``--eta_grid=v1,...`` is ``--grid=eta=v1,...`` for ``l2_penalty``, ``lagrangian`` and
``fairalm`` with the selection rule of docs/results_fairalm.md: per method, on the *validation*
split of the first seed, the eta with the smallest validation DEO among those whose validation
accuracy is within ``--max_accuracy_drop`` of the unconstrained model's (a variant of the
paper's NVP rule); the table then reports every seed's test numbers at that eta.

    python -m experiments.fairalm --dataset=adult --seeds=0,1,2
    python -m experiments.fairalm --dataset=adult --group=sex,race            # intersectional groups
    python -m experiments.fairalm --data=loans.csv --label=default --group=sex --positive=yes
    python -m experiments.fairalm --dataset=celeba_attributes --methods=unconstrained,fairalm \
        --constraint=deo --eta=0.1 --epochs=3
    python -m experiments.fairalm --dataset=german --methods=fairalm --seeds=0,1,2 \
        --grid=eta=0.001,0.003,0.01,0.03,0.1,0.3,1,3 --select=val_deo_gap

Writes ``<output_dir>/fairalm_<dataset>.{json,csv,md}`` and ``..._summary.csv`` (refusing to
overwrite without ``--overwrite``) and prints the Markdown table. Training states (one stacked
state per chunk of runs) are saved every ``--checkpoint_every`` epochs under
``<output_dir>/checkpoints/fairalm_<dataset>``; ``--resume`` (with the same flags) skips the
finished chunks and continues the interrupted one, ending with the same numbers as an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import cli, common, data_flags
from fairopt import data, losses, metrics, models, sweep
from fairopt.solvers import constrained
from fairopt.solvers.constrained import FairnessConfig
from fairopt.solvers.erm import ERMHyperparams, erm
from fairopt.solvers.fairalm import fairalm
from fairopt.train import Batch, NonFiniteError, Progress, check_finite, predict_in_batches, shuffled_batch_indices

METHODS = ("unconstrained", "l2_penalty", "reweighting", "lagrangian", "fairalm", "group_dro")
DEFAULT_METHODS = ("unconstrained", "l2_penalty", "reweighting", "lagrangian", "fairalm")
ETA_METHODS = ("l2_penalty", "lagrangian", "fairalm")
DATASETS = tuple(common.FAIRNESS_LOADERS)

# The FairnessConfig fields that change each method (a grid over other fields leaves it alone).
_CONSTRAINED_FIELDS = ("optimizer", "learning_rate", "constraint", "surrogate", "positive_class", "eta", "eta_growth",
                      "tolerance")
METHOD_FIELDS = {
    "unconstrained": ("optimizer", "learning_rate"),
    "reweighting": ("optimizer", "learning_rate"),
    "l2_penalty": _CONSTRAINED_FIELDS,
    "lagrangian": _CONSTRAINED_FIELDS,
    "fairalm": _CONSTRAINED_FIELDS + ("inner_steps", "augmentation"),
    "group_dro": ("optimizer", "learning_rate", "dro_step_size"),
}

FLAGS = flags.FLAGS
_ABSL_FLAGS = set(FLAGS)  # flags defined by absl itself, before this module's
flags.DEFINE_enum("dataset", "adult", DATASETS, "Built-in dataset (protected attribute: sex for adult/german, Male for celeba_attributes; see --group), or --data=PATH.csv.")
data_flags.define_data_flags()  # --data, --label, --group, --features, --positive, --impute, --drop_missing...
flags.DEFINE_list("methods", list(DEFAULT_METHODS), f"Methods, comma-separated, any of: {', '.join(METHODS)}.")
CONFIG_FLAGS = common.define_config_flags(FairnessConfig)
SWEEP_FLAGS = common.define_sweep_flags()
for _name in CONFIG_FLAGS + SWEEP_FLAGS:  # defined in experiments.common: list them in this module's --helpshort
    flags.declare_key_flag(_name)
flags.DEFINE_list("eta_grid", [], "If set: --grid=eta=... for l2_penalty, lagrangian and fairalm, each method's eta chosen "
                  "on the first seed's validation split (see the module docstring).")
flags.DEFINE_float("max_accuracy_drop", 0.02, "Validation accuracy an eta may lose vs unconstrained (with --eta_grid).",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds (split, initialisation, shuffling).")
flags.DEFINE_integer("epochs", 5, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 256, "Rows per minibatch (official: 256).", lower_bound=1)
flags.DEFINE_enum("model", "mlp", ("mlp", "linear"), "Model (mlp: 400-200-100 ELU).")
flags.DEFINE_string("output_dir", "results", "Folder for the results files.")
flags.DEFINE_bool("overwrite", False, "Replace existing results files.")
flags.DEFINE_integer("checkpoint_every", 1, "Save the training state every N epochs (0: never).", lower_bound=0)
flags.DEFINE_bool("resume", False, "Continue an interrupted run from <output_dir>/checkpoints (same flags).")

_OWN_FLAGS = set(FLAGS) - _ABSL_FLAGS  # the flags of this entry point (what a resume must match)

EVALUATED = ("accuracy", "balanced_accuracy", "deo_gap", "dp_gap", "eo_gap", "pp_gap")  # and fnr_<group>

# Compiled vmapped epochs, one per (method, static settings, shapes): a sweep test reads their
# ``_cache_size()`` to check that a whole grid compiled once.
EPOCH_FNS: dict = {}


def parse_eta_grid(values) -> tuple[float, ...]:
    """The values of ``--eta_grid``: finite numbers >= 0, none repeated (empty: no selection)."""
    return common.parse_numbers("eta_grid", values, valid=lambda eta: eta >= 0, requirement="finite numbers >= 0",
                                example="0.01,0.1,1", distinct=True)


def base_config() -> FairnessConfig:
    """The :class:`FairnessConfig` of the flags (validated by the class)."""
    return common.config_from_flags(FairnessConfig, FLAGS, CONFIG_FLAGS)


def method_settings(method: str, grid: dict) -> list[dict]:
    """The grid settings that concern ``method`` (``[{}]``: the flags' setting only)."""
    relevant = {name: values for name, values in grid.items() if name in METHOD_FIELDS[method]}
    return sweep.product(relevant) if relevant else [{}]


def setup(argv):
    """Validate every flag and open the checkpoints; errors become usage errors (one line, no
    traceback, exit code 1). Returns ``(seeds, methods, grid, eta grid, results stem, checkpoints)``."""
    try:
        if len(argv) > 1:
            raise ValueError(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --helpshort)")
        seeds = common.parse_seeds(FLAGS.seeds)
        methods = common.parse_choices("methods", FLAGS.methods, METHODS)
        common.parse_choices("constraint", [c.strip() for c in FLAGS.constraint.replace("+", ",").split(",")],
                             constrained.CONSTRAINTS)
        common.check_number_flags(FLAGS, _OWN_FLAGS)
        for name in ("learning_rate", "dro_step_size", "eta_growth"):
            if not FLAGS[name].value > 0:
                raise ValueError(f"--{name} must be > 0, got {FLAGS[name].value}")
        for name in ("eta", "inner_steps", "positive_class"):
            if FLAGS[name].value < (1 if name == "inner_steps" else 0):
                raise ValueError(f"--{name} must be >= {1 if name == 'inner_steps' else 0}, got {FLAGS[name].value}")
        config = base_config()
        eta_grid = parse_eta_grid(FLAGS.eta_grid)
        if eta_grid and not set(methods) & set(ETA_METHODS):
            raise ValueError(f"--eta_grid tunes {', '.join(ETA_METHODS)}; add one of them to --methods or drop --eta_grid")
        if eta_grid and (FLAGS.grid or FLAGS.select):
            raise ValueError("--eta_grid is --grid=eta=... with its own selection rule; use either --eta_grid or "
                             "--grid/--select")
        grid = common.parse_grid(FLAGS.grid, FairnessConfig)
        if eta_grid:
            grid = {"eta": list(eta_grid)}
        unused = [name for name in grid if not any(name in METHOD_FIELDS[m] for m in methods)]
        if unused:
            raise ValueError(f"--grid {', '.join(unused)} changes none of --methods={','.join(methods)}")
        for method in methods:  # every setting of the grid is valid (ValueError naming the field)
            for setting in method_settings(method, grid):
                dataclasses.replace(config, **setting)
        # The data are there, readable and splittable (parsed once: the CSV is cached for the runs).
        DESCRIBED.clear()
        DESCRIBED.update(data_flags.check_data_flags(FLAGS, default_dataset=FLAGS.dataset, seeds=seeds, prepare=split))
        stem = f"fairalm_{DESCRIBED['name']}"
        common.check_results_writable(FLAGS.output_dir, stem, overwrite=FLAGS.overwrite)
        dataset, _ = data_flags.load_from_flags(FLAGS, default_dataset=FLAGS.dataset, seed=seeds[0])
        if FLAGS.select:
            metric, _ = common.metric_direction(FLAGS.select)
            known = [f"val_{name}" for name in EVALUATED] + [f"val_fnr_{name}" for name in dataset.group_names]
            if not metric.startswith("val_"):
                raise ValueError(f"--select={FLAGS.select}: choose with a validation metric (val_...), never a test one")
            if metric not in known:
                raise ValueError(f"--select: no metric {metric!r}; validation metrics: {', '.join(known)}")
        if config.positive_class >= dataset.num_classes:
            raise ValueError(f"--positive_class={config.positive_class} but {DESCRIBED['name']} has {dataset.num_classes} classes")
        checkpoints = common.open_checkpointer(FLAGS, _OWN_FLAGS, stem)
    except (ValueError, FileExistsError) as error:
        raise app.UsageError(str(error)) from None
    return seeds, methods, grid, eta_grid, stem, checkpoints


def make_solver(method: str, apply_fn, *, num_classes: int, num_groups: int, config: FairnessConfig,
                steps_per_epoch: int):
    """The :class:`fairopt.train.Solver` of ``method`` for the static fields of ``config``; its
    numbers come from :func:`method_hyperparams` at ``init``."""
    optimizer = config.optimizer_factory()
    shared = dict(
        constraints=config.constraints,
        num_groups=num_groups,
        positive_class=config.positive_class,
        surrogate=config.surrogate,
        steps_per_epoch=steps_per_epoch,
    )
    if method in ("unconstrained", "reweighting"):
        return erm(apply_fn, lambda logits, labels, groups, epoch: losses.cross_entropy(logits, labels), optimizer,
                   steps_per_epoch=steps_per_epoch)
    if method == "l2_penalty":
        return constrained.penalty(apply_fn, optimizer, **shared)
    if method == "lagrangian":
        return constrained.lagrangian(apply_fn, optimizer, **shared)
    if method == "fairalm":
        return fairalm(apply_fn, optimizer, inner_steps=config.inner_steps, augmentation=config.augmentation, **shared)
    if method == "group_dro":
        return constrained.group_dro(apply_fn, optimizer, num_classes=num_classes, num_groups=num_groups)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def method_hyperparams(method: str, config: FairnessConfig, train: data.Dataset):
    """The hyperparameter pytree that ``init`` of ``method``'s solver takes, for one run."""
    h = config.hyperparams()
    if method == "unconstrained":
        return ERMHyperparams(h.learning_rate, jnp.ones((train.num_classes, train.num_groups), jnp.float32))
    if method == "reweighting":
        return ERMHyperparams(h.learning_rate, jnp.asarray(losses.cell_balanced_weights(train.cell_counts)))
    if method == "group_dro":
        return FairnessConfig.group_dro_hyperparams(h)
    return FairnessConfig.constrained_hyperparams(h)


def evaluate_split(solver, state, split: data.Dataset) -> dict[str, float]:
    """Accuracy, DEO (|TPR_0 - TPR_1| for two groups), DP/EO/PP gaps and the FNR per group."""
    probs = predict_in_batches(solver.predict, state, split.features)
    report = metrics.report(
        probs,
        split.labels,
        split.groups,
        num_classes=split.num_classes,
        num_groups=split.num_groups,
        reduce="between_groups",
    )
    row = {k: report[k] for k in EVALUATED}
    fnr, present = constrained.hard_group_rates(
        probs.argmax(axis=1), split.labels, split.groups, atoms=("deo",), num_groups=split.num_groups
    )
    for g, name in enumerate(split.group_names):
        row[f"fnr_{name}"] = float(fnr[0, g]) if bool(present[0, g]) else float("nan")
    return row


DESCRIBED: dict = {}  # the data of this run (experiments.data_flags), filled by setup


def split(dataset: data.Dataset, seed: int) -> data.Splits:
    return data.split(dataset, seed=seed)


@functools.lru_cache(maxsize=None)
def prepare(seed: int) -> data.Splits:
    dataset, _ = data_flags.load_from_flags(FLAGS, default_dataset=FLAGS.dataset, seed=seed)
    return data.standardize(split(dataset, seed))


def sweep_epoch_fn(step, *, num_rows: int, batch_size: int):
    """One epoch of ``step`` for a batch of runs, jitted: ``epoch(states, seed_index, keys, xs,
    ys, groups, valid)`` with the states, seed indices and keys of the runs stacked on a leading
    axis and the data of every seed stacked (``[S, N, ...]``, rows padded to a common ``N`` with
    ``valid`` False). A run's batches are the rows of :func:`fairopt.train.shuffled_batch_indices`
    of its key, as :func:`fairopt.train.make_epoch_fn` (padding rows are masked out)."""

    def run_epoch(state, seed_index, key, xs, ys, gs, valid):
        indices, mask = shuffled_batch_indices(key, num_rows, batch_size)

        def body(state, rows_and_mask):
            rows, rows_mask = rows_and_mask
            batch = Batch(xs[seed_index, rows], ys[seed_index, rows], gs[seed_index, rows],
                          rows_mask & valid[seed_index, rows])
            return step(state, batch)

        state, epoch_metrics = jax.lax.scan(body, state, (indices, mask))
        return state, jax.tree_util.tree_map(jnp.mean, epoch_metrics)

    return jax.jit(jax.vmap(run_epoch, in_axes=(0, 0, 0, None, None, None, None)))


def finite_runs(tree, num_runs: int) -> np.ndarray:
    """``[R]`` bool: the runs (leading axis) whose every floating-point leaf of ``tree`` is finite."""
    ok = np.ones(num_runs, bool)
    for leaf in jax.tree_util.tree_leaves(tree):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            continue
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.inexact) and array.ndim >= 1 and array.shape[0] == num_runs:
            ok &= np.isfinite(array.reshape(num_runs, -1)).all(axis=1)
    return ok


def _pad(array: np.ndarray, rows: int) -> np.ndarray:
    padding = rows - array.shape[0]
    return np.concatenate([array, np.zeros((padding,) + array.shape[1:], array.dtype)]) if padding else array


class SeedData:
    """Every seed's splits and training arrays padded to one row count (one program for all)."""

    def __init__(self, seeds):
        self.seeds = tuple(seeds)
        self.splits = [prepare(seed) for seed in self.seeds]
        trains = [s.train for s in self.splits]
        self.num_rows = max(len(t) for t in trains)
        self.xs = jnp.asarray(np.stack([_pad(np.asarray(t.features, np.float32), self.num_rows) for t in trains]))
        self.ys = jnp.asarray(np.stack([_pad(np.asarray(t.labels, np.int32), self.num_rows) for t in trains]))
        self.gs = jnp.asarray(np.stack([_pad(np.asarray(t.groups, np.int32), self.num_rows) for t in trains]))
        self.valid = jnp.asarray(np.stack([np.arange(self.num_rows) < len(t) for t in trains]))
        first = trains[0]
        self.num_classes, self.num_groups, self.num_features = first.num_classes, first.num_groups, first.num_features


def run_method(method: str, settings: list[dict], seed_data: SeedData, checkpoints, progress, finished: dict):
    """Every (setting, seed) run of ``method``: one compiled program per static group of
    settings, chunks of ``--grid_chunk`` runs. Returns the result rows in (setting, seed) order."""
    base = base_config()
    configs = [dataclasses.replace(base, **setting) for setting in settings]
    # In a sweep a diverging run is recorded (diverged=1) and the others go on; a single setting stops.
    swept = len(settings) > 1
    seeds = seed_data.seeds
    rows_by_run: dict[tuple[int, int], dict] = {}
    static_groups = sweep.group_by_static(configs)
    for group_index, members in enumerate(static_groups):
        runs = [(c, s) for c in members for s in range(len(seeds))]  # (config index, seed index)
        chunk = FLAGS.grid_chunk or len(runs)
        config = configs[members[0]]
        params0, apply_fn = models.make_model(FLAGS.model, seed_data.num_classes, seed_data.num_features,
                                              jax.random.key(seeds[0]))
        steps_per_epoch = max(1, math.ceil(seed_data.num_rows / FLAGS.batch_size))
        solver = make_solver(method, apply_fn, num_classes=seed_data.num_classes, num_groups=seed_data.num_groups,
                             config=config, steps_per_epoch=steps_per_epoch)
        if solver.check_data is not None:  # group ids outside [0, num_groups): an error before training
            for split in seed_data.splits:
                solver.check_data(split.train.features, split.train.labels, split.train.groups)
        key = (method, repr(sorted(config.static_settings().items())), seed_data.num_rows, seed_data.num_features)
        if key not in EPOCH_FNS:
            EPOCH_FNS[key] = sweep_epoch_fn(solver.step, num_rows=seed_data.num_rows, batch_size=FLAGS.batch_size)
        epoch_fn = EPOCH_FNS[key]
        suffix = f"_static{group_index}" if len(static_groups) > 1 else ""
        for chunk_index, start in enumerate(range(0, len(runs), chunk)):
            part = runs[start : start + chunk]
            name = f"{method}{suffix}_chunk{chunk_index}"
            if name in finished:
                for (c, s), row in zip(part, finished[name]):
                    rows_by_run[(c, s)] = row
                progress.update(progress.done + FLAGS.epochs * len(part))
                continue
            start_time = time.perf_counter()
            real = len(part)
            if len(runs) > chunk:  # the last chunk is padded with copies of its last run: one program for all chunks
                part = part + [part[-1]] * (chunk - len(part))
            part_seeds = [seeds[s] for _, s in part]
            params = sweep.stack([models.make_model(FLAGS.model, seed_data.num_classes, seed_data.num_features,
                                                    jax.random.key(seed))[0] for seed in part_seeds])
            hyperparams = sweep.stack([method_hyperparams(method, configs[c], seed_data.splits[s].train) for c, s in part])
            init_keys = jnp.stack([jax.random.key_data(jax.random.key(seed + 1)) for seed in part_seeds])
            state = jax.vmap(lambda k, p, h: solver.init(jax.random.wrap_key_data(k), p, h))(init_keys, params, hyperparams)
            done, state = checkpoints.restore(name, state)
            progress.update(progress.done + done * real)
            reported = ~finite_runs(state, len(part))  # runs that diverged before an interruption
            seed_index = jnp.asarray([s for _, s in part], jnp.int32)
            shuffle_keys = [jax.random.key(seed + 2) for seed in part_seeds]
            for epoch in range(done + 1, FLAGS.epochs + 1):
                keys = jnp.stack([jax.random.key_data(jax.random.fold_in(k, epoch)) for k in shuffle_keys])
                state, epoch_metrics = epoch_fn(state, seed_index, jax.random.wrap_key_data(keys), seed_data.xs,
                                                seed_data.ys, seed_data.gs, seed_data.valid)
                epoch_metrics = {k: np.asarray(v) for k, v in epoch_metrics.items()}
                diverged = ~(finite_runs(epoch_metrics, len(part)) & finite_runs(state, len(part)))
                if diverged[:real].any() and not swept:
                    try:
                        check_finite(epoch_metrics, what="training metric ", epoch=epoch)
                        check_finite(state, what="solver state ", epoch=epoch)
                    except NonFiniteError as error:
                        raise NonFiniteError(f"run {name} ({method}, settings default): {error}") from None
                for index in np.flatnonzero(diverged[:real] & ~reported[:real]):
                    c, s = part[index]
                    print(f"[diverged {method} {common.setting_label(settings[c])} seed={seeds[s]}] non-finite at "
                          f"epoch {epoch}; recorded with diverged=1 and no metrics (the other runs go on)",
                          file=sys.stderr, flush=True)
                reported |= diverged
                checkpoints.save(name, epoch, state)
                finite_metrics = {k: float(np.mean(v[~diverged])) for k, v in epoch_metrics.items()} if (~diverged).any() else {}
                progress.update(progress.done + real, finite_metrics)
            diverged = ~finite_runs(state, len(part))
            seconds = (time.perf_counter() - start_time) / real
            part = part[:real]
            chunk_rows = []
            for index, (c, s) in enumerate(part):
                run_state = sweep.take(state, index)
                splits = seed_data.splits[s]
                row = dict(method=method, seed=seeds[s], setting=common.setting_label(settings[c]),
                           eta=configs[c].eta if method in ETA_METHODS else float("nan"))
                row.update({k: v for k, v in settings[c].items() if k != "eta"})
                if diverged[index] or reported[index]:
                    names = list(EVALUATED) + [f"fnr_{g}" for g in splits.test.group_names]
                    row.update({f"val_{k}": float("nan") for k in names})
                    row.update({k: float("nan") for k in names})
                else:
                    row.update({f"val_{k}": v for k, v in evaluate_split(solver, run_state, splits.val).items()})
                    row.update(evaluate_split(solver, run_state, splits.test))
                if swept:
                    row["diverged"] = int(diverged[index] or reported[index])
                row["seconds"] = seconds
                chunk_rows.append(row)
                rows_by_run[(c, s)] = row
            checkpoints.add_finished_run(dict(chunk=name, rows=chunk_rows))
            finished[name] = chunk_rows
    return [rows_by_run[(c, s)] for c in range(len(configs)) for s in range(len(seeds))]


def select_eta(rows, seed: int, methods) -> tuple[dict, list[dict]]:
    """``--eta_grid``'s rule on the validation split of ``seed`` (module docstring):
    ``({method: eta}, grid rows)``."""
    def val_row(row):
        return dict(method=row["method"], seed=row["seed"], eta=row["eta"], accuracy=row["val_accuracy"],
                    deo_gap=row["val_deo_gap"], seconds=row["seconds"])

    reference = next(r for r in rows if r["method"] == "unconstrained" and r["seed"] == seed)
    grid_rows = [val_row(reference)]
    choices = {}
    if reference.get("diverged"):
        raise NonFiniteError(f"the unconstrained reference of --eta_grid diverged on seed {seed}")
    for method in methods:
        candidates = [r for r in rows if r["method"] == method and r["seed"] == seed]
        for r in candidates:
            grid_rows.append(val_row(r))
            print(f"[eta-grid {method} eta={r['eta']:g}] val accuracy={r['val_accuracy']:.4f} deo={r['val_deo_gap']:.4f}",
                  file=sys.stderr, flush=True)
        candidates = [r for r in candidates if not r.get("diverged")]
        if not candidates:
            raise NonFiniteError(f"every --eta_grid value of {method} diverged on seed {seed}; lower the learning rate")
        admissible = [r for r in candidates if r["val_accuracy"] >= reference["val_accuracy"] - FLAGS.max_accuracy_drop]
        pool = admissible or [max(candidates, key=lambda r: r["val_accuracy"])]
        choices[method] = min(pool, key=lambda r: r["val_deo_gap"])["eta"]
    return choices, grid_rows


def train_all(checkpoints, seeds, methods, grid, eta_grid):
    """Every method's runs; returns ``(rows, etas, eta-grid rows, seconds)``."""
    start_all = time.perf_counter()
    seed_data = SeedData(seeds)
    finished = {entry["chunk"]: entry["rows"] for entry in checkpoints.finished_runs()}
    trained = list(methods)
    if eta_grid and "unconstrained" not in trained:
        trained.insert(0, "unconstrained")  # the reference of the eta rule
    plans = {method: method_settings(method, grid) for method in trained}
    total = sum(len(settings) for settings in plans.values()) * len(seeds) * FLAGS.epochs
    progress = Progress(f"fairalm:{DESCRIBED.get('name', FLAGS.dataset)}", total, every=FLAGS.epochs)
    rows = []
    for method in trained:
        method_rows = run_method(method, plans[method], seed_data, checkpoints, progress, finished)
        for row in method_rows:
            label = f" [{row['setting']}]" if row["setting"] else ""
            print(f"[{method}{label} seed={row['seed']}] accuracy={row['accuracy']:.4f} deo={row['deo_gap']:.4f} "
                  f"val_accuracy={row['val_accuracy']:.4f} val_deo={row['val_deo_gap']:.4f} ({row['seconds']:.1f}s)",
                  file=sys.stderr, flush=True)
        rows.extend(method_rows)
    etas = {m: FLAGS.eta for m in ETA_METHODS}
    grid_rows = []
    if eta_grid:
        tuned = [m for m in methods if m in ETA_METHODS]
        chosen, grid_rows = select_eta(rows, seeds[0], tuned)
        etas.update(chosen)
        print(f"chosen eta per method (validation, seed {seeds[0]}): {chosen}", file=sys.stderr, flush=True)
        rows = [r for r in rows if r["method"] in methods and (r["method"] not in tuned or r["eta"] == etas[r["method"]])]
    order = {method: index for index, method in enumerate(trained)}
    rows.sort(key=lambda r: (seeds.index(r["seed"]), order[r["method"]]))  # per seed, as before sweeps (stable)
    return rows, etas, grid_rows, time.perf_counter() - start_all


def main(argv):
    seeds, methods, grid, eta_grid, stem, checkpoints = setup(argv)
    common.enable_compilation_cache()
    try:
        rows, etas, grid_rows, total_seconds = train_all(checkpoints, seeds, methods, grid, eta_grid)
    except NonFiniteError as error:
        print(f"FATAL {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    write(rows, etas, grid_rows, total_seconds, seeds, methods, grid, eta_grid, stem)


def write(rows, etas, grid_rows, total_seconds, seeds, methods, grid, eta_grid, stem):
    """The summary table (printed) and the results files."""
    fnr_columns = [k for k in rows[0] if k.startswith("fnr_")]
    columns = ["accuracy", "deo_gap", *fnr_columns, "dp_gap", "eo_gap", "seconds"]
    swept = bool(grid) and not eta_grid
    for row in rows:
        row["label"] = f"{row['method']} [{row['setting']}]" if swept and row["setting"] else row["method"]
    table_rows = list(rows)
    selected = []
    if FLAGS.select:
        metric, _ = common.metric_direction(FLAGS.select)
        for method, setting, value in common.select_on_validation(rows, FLAGS.select, by="method"):
            label = f"{method} (selected on {metric})"
            selected.append(dict(method=method, setting=setting, metric=metric, validation_mean=value))
            table_rows += [dict(r, label=label) for r in rows if r["method"] == method and r["setting"] == setting]
            print(f"[select {method}] {setting or 'default'}: mean {metric}={value:.4f} (validation)", file=sys.stderr)
    if swept and any(row.get("diverged") for row in rows):
        columns.insert(-1, "diverged")  # the fraction of a setting's seeds that diverged (excluded from the means)
    summary = common.summarize(table_rows, by="label", columns=["val_accuracy", "val_deo_gap", *columns])
    shown = (["val_accuracy", "val_deo_gap"] if swept else []) + columns
    lines = [
        f"# FairALM baselines on {data_flags.describe(DESCRIBED) if DESCRIBED else FLAGS.dataset} (constraint {FLAGS.constraint}; "
        f"{len(seeds)} seeds: {', '.join(map(str, seeds))})\n",
        f"{'flags (the grid overrides them): ' if swept else ''}"
        f"eta per method: {', '.join(f'{m}={etas[m]:g}' for m in methods if m in ETA_METHODS) or 'n/a'}; "
        f"{FLAGS.epochs} epochs, batch {FLAGS.batch_size}, {FLAGS.optimizer} lr {FLAGS.learning_rate:g}, "
        f"FairALM inner steps {FLAGS.inner_steps}; wall time of this process {total_seconds:.0f} s\n",
    ]
    if swept:
        described = "; ".join(f"{name}=" + ",".join(map(str, values)) for name, values in grid.items())
        lines.append(f"grid: {described} (one row per setting; test columns unless prefixed val_)\n")
    lines.append(common.markdown_table(summary, shown))
    if not swept and "unconstrained" in summary.index and "fairalm" in summary.index:
        base, ours = summary.loc["unconstrained"], summary.loc["fairalm"]
        cut = 1.0 - ours["deo_gap_mean"] / base["deo_gap_mean"] if base["deo_gap_mean"] > 0 else float("nan")
        drop = (base["accuracy_mean"] - ours["accuracy_mean"]) * 100
        met = cut >= 0.70 and drop <= 2.0
        lines.append(
            f"\nFairALM vs unconstrained: DEO cut {cut * 100:.1f} % (target >= 70 %), accuracy change "
            f"{-drop:+.2f} points (target >= -2): {'met' if met else 'NOT met'}.\n"
        )
    if grid_rows:
        lines.append("\nValidation grid (seed %d):\n\n| method | eta | val accuracy | val DEO |\n|---|---|---|---|\n" % seeds[0])
        for r in grid_rows:
            lines.append(f"| {r['method']} | {r['eta']:g} | {r['accuracy']:.4f} | {r['deo_gap']:.4f} |\n")
    markdown = "".join(lines)
    config = dict(
        flags={name: FLAGS[name].value for name in sorted(_OWN_FLAGS)},
        fairness=dataclasses.asdict(base_config()),
        grid=grid,
        eta_per_method={m: etas[m] for m in methods if m in ETA_METHODS},
        eta_grid_rows=grid_rows,
        selected=selected,
        compiled_epochs={"|".join(map(str, k[:2])): fn._cache_size() for k, fn in EPOCH_FNS.items()},
        total_seconds=total_seconds,
        data=dict(DESCRIBED),
    )
    for row in rows:
        row.pop("label", None)
    targets = common.write_results(
        FLAGS.output_dir, stem, rows, summary, markdown, config=config, overwrite=FLAGS.overwrite
    )
    print(markdown)
    print(f"wrote {', '.join(str(p) for p in targets.values())}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
