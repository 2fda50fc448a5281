r"""FACIMS and its baselines on a real dataset: the paper's Table 2 protocol, and sweeps.

With no flags: FACIMS on the credit-card data, paper protocol (SPEC §7): split stratified by
label (30 % test, then 30 % of the rest validation), the training set resampled to 400 rows
per education group, 50 rounds, seeds 0, 42, 666, 777, 1009; with the settings chosen on
held-out validation rows (docs/facims_ablation.md, fourth pass): a third of the validation split
held out of the upper level (``--selection_fraction``), on which each run's round is chosen, and
a one-layer ELU MLP of 32 units (the papers' network: ``--hidden=400,200,100``).

    python -m experiments.facims                                   # FACIMS on credit
    python -m experiments.facims --methods=facims,facims_i,facims_ii,fams,erm,berm
    python -m experiments.facims --dataset=drug --drug_path=../shared/data/drug_consumption.csv
    python -m experiments.facims --grid=alpha_low=0.1,0.4,0.7,1.0 --seeds=0,42 --select=val_balanced_accuracy
    python -m experiments.facims --data=loans.csv --label=default --group=sex,race --methods=facims,erm

Several processes or hosts (``jax.distributed``; one command per process, see
``docs/multi_device.md``): the runs of the sweep, and with ``--shard_groups`` each run's groups,
are split over every process's devices; process 0 evaluates and writes the results and checkpoints.

    python -m experiments.facims --grid=alpha_low=0.1,0.4 --seeds=0,42 --distributed \
        --coordinator_address=host0:12355 --num_processes=2 --process_id=0   # and =1 on the other host

Your own CSV (``--data``, ``--label``, ``--group``...) or another sensitive attribute of a built-in
dataset (``--group``): see ``experiments/data_flags.py``.

Every field of :class:`fairopt.solvers.facims.FacimsConfig` is a flag of the same name (the
config is the one place where defaults live). ``--grid=NAME=v1,v2,...`` (repeatable) sweeps
settings: the Cartesian product of the grids, times the seeds, runs as ONE compiled program per
method and static setting (hyperparameters are data, :mod:`fairopt.sweep`), ``jax.vmap``-ped
over runs in chunks of ``--grid_chunk``. Each run is evaluated on the validation split
(``val_`` columns) and on the test split; ``--select=METRIC`` picks one setting per method on a
validation metric and reports that setting's test numbers as a separate, labelled row.

Prints progress with an ETA, then a table of mean ± std over seeds (balanced accuracy,
accuracy, DP, EO, sufficiency gap, recall per class, wall time) and writes
``<output_dir>/facims_<dataset>.{json,csv,md}`` (refusing to overwrite without --overwrite).
The ERM / BERM baselines are trained per seed with Adam at each ``--baseline_lr`` and the step of
highest validation balanced accuracy is kept; ``logreg`` and
``hgb`` are scikit-learn's balanced logistic regression and histogram gradient boosting on the
same training rows, each tuned on the validation split (:mod:`experiments.sklearn_reference`).
Grids apply to the FACIMS methods.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from experiments import cli, common, data_flags, sklearn_reference
from experiments.paper import CLASS_COUNT_SOURCES, PAPER_FACIMS_CREDIT, PAPER_SEEDS, hold_out_selection, prepare
from fairopt import data, distributed, losses, models, sharding, sweep
from fairopt.solvers.erm import erm, erm_hyperparams
from fairopt.solvers.facims import METHODS, FacimsConfig, FacimsData, facims
from fairopt.train import Progress, best_iterate_tracker, check_finite, evaluate, fit_resumable, make_epoch_fn

BASELINES = ("erm", "berm") + sklearn_reference.METHODS
DATASETS = ("credit", "drug", "adult", "compas", "german", "celeba_attributes", "synthetic")

FLAGS = flags.FLAGS
_ABSL_FLAGS = set(FLAGS)  # flags defined by absl itself, before this module's
flags.DEFINE_enum("dataset", "credit", DATASETS, "Built-in dataset to run on (or --data=PATH.csv).")
flags.DEFINE_list("methods", ["facims"], f"Methods, any of {', '.join(METHODS + BASELINES)}.")
flags.DEFINE_list("seeds", [str(s) for s in PAPER_SEEDS], "Random seeds.")
flags.DEFINE_string("output_dir", "results", "Folder for the results files.")
flags.DEFINE_bool("overwrite", False, "Replace existing results files.")
flags.DEFINE_integer("checkpoint_every", 10, "Save the training state every N rounds/epochs (0: never).", lower_bound=0)
flags.DEFINE_bool("resume", False, "Continue an interrupted run from <output_dir>/checkpoints (same flags).")
data_flags.define_data_flags()  # --data, --label, --group, --features, --positive, --impute, --drop_missing, --drug_path...
flags.DEFINE_enum(
    "split", "per_seed", ("per_seed", "fixed"),
    "per_seed: a new label-stratified 49/21/30 split for every seed (fairopt's protocol); fixed: the official code's "
    "split (scikit-learn train_test_split, random_state 42), the same for every seed, which then varies the "
    "resampling and the training only - the protocol of the official numbers.",
)
flags.DEFINE_float(
    "selection_fraction", 1 / 3,
    "Fraction of the validation split held out from the FACIMS upper level (stratified by class and group): the "
    "upper level trains on the rest, and the FACIMS methods choose their round and report their val_ metrics on "
    "the held-out rows, which no method trains on. 0: the upper level uses the whole validation split (its val_ "
    "metrics are then in-sample). The baselines, which never train on validation, select on the whole split.",
    lower_bound=0.0, upper_bound=0.9,
)
flags.DEFINE_integer("samples_per_group", 400, "Training rows per group after resampling (0: no resampling).", lower_bound=0)
flags.DEFINE_integer("epochs", 50, "Rounds (the official code's epochs).", lower_bound=1)
flags.DEFINE_integer("batch_size", 50, "Rows per group per step.", lower_bound=1)
flags.DEFINE_list("hidden", ["32"], "Hidden widths of the ELU MLP (the papers': 400,200,100; the default 32, one "
                  "layer, was chosen on held-out validation rows: docs/facims_ablation.md, fourth pass).")
flags.DEFINE_list("baseline_lr", ["3e-4", "1e-3", "3e-3"], "Adam steps of the ERM/BERM baselines; the one of highest "
                  "validation balanced accuracy is kept (with --model_selection per step).")
flags.DEFINE_enum(
    "output_activation", "none", models.OUTPUT_ACTIVATIONS,
    "none: the MLP returns logits; sigmoid: sigmoid(logits), the official FACIMS code's defect, for diagnosis "
    "(every method's MLP).",
)
flags.DEFINE_integer("num_bins", 10, "Bins of the sufficiency gap.", lower_bound=2)
flags.DEFINE_enum(
    "class_counts_from", CLASS_COUNT_SOURCES[0], CLASS_COUNT_SOURCES,
    "Class counts that set the logit-adjusted VS loss v_bar, the balanced validation loss and BERM's class weights: "
    "resampled (the training rows the losses see, after --samples_per_group) or original (the training split "
    "before resampling; resampling to equal groups lowers the default rate on credit from 22 % to 13-14 %).",
)
flags.DEFINE_enum(
    "model_selection", "auto", ("auto", "last", "best_round"),
    "Which iterate a run reports: last (after the final round / epoch), best_round (the round / epoch of highest "
    "validation balanced accuracy, evaluated after every one: early stopping on validation) or auto: best_round for "
    "the methods that never train on the validation split (erm, berm, fams), and for facims, facims_i and "
    "facims_ii when --selection_fraction holds rows out of their upper level (they choose on those rows); last for "
    "the FACIMS methods otherwise (their upper level trains on the whole validation split, so its metrics are "
    "in-sample and choosing a round on them is choosing on training data).",
)
CONFIG_FLAGS = common.define_config_flags(FacimsConfig, skip=("method",))
common.define_sweep_flags()
common.define_distributed_flags()
flags.DEFINE_integer(
    "shard_groups", 1, "Devices (of all processes) that split each run's group axis; the others split the runs of "
    "the sweep. Must divide the number of devices and the number of groups. 1: whole runs per device.", lower_bound=1,
)

_OWN_FLAGS = set(FLAGS) - _ABSL_FLAGS  # the flags of this entry point (what a resume must match)

REPORT_COLUMNS = (
    "balanced_accuracy",
    "accuracy",
    "dp_gap",
    "deo_gap",
    "eo_gap",
    "sufficiency_gap_official",
    "sufficiency_gap",
)


def hidden_widths() -> tuple[int, ...]:
    widths = common.parse_numbers("hidden", FLAGS.hidden, kind=int, valid=lambda w: w >= 1,
                                  requirement="comma-separated integers >= 1", example="400,200,100")
    if not widths:
        raise ValueError("--hidden needs at least one width, e.g. --hidden=400,200,100")
    return widths


def model_options() -> dict:
    """The MLP's options from the flags (``models.mlp``): hidden widths and output activation."""
    return dict(hidden=hidden_widths(), output_activation=FLAGS.output_activation)


def facims_config(method: str, setting: dict | None = None) -> FacimsConfig:
    """The config of ``method`` from the flags, with a grid ``setting`` on top (validated).

    With the group axis sharded (``--shard_groups`` > 1), ``--group_mapping=auto`` means the
    vmapped round: that is the one GSPMD splits over the groups."""
    mapping = dict(group_mapping="vmap") if FLAGS.shard_groups > 1 and FLAGS.group_mapping == "auto" else {}
    return common.config_from_flags(FacimsConfig, FLAGS, CONFIG_FLAGS, method=method, **{**mapping, **(setting or {})})


_MESH: list = []


def sweep_mesh():
    """The ``("runs", "groups")`` mesh over every device of every process (None on one device)."""
    if not _MESH:
        wanted = jax.device_count() > 1 or FLAGS.shard_groups > 1
        _MESH.append(sharding.sweep_mesh(FLAGS.shard_groups) if wanted else None)
    return _MESH[0]


def runs_per_program(num_runs: int) -> int:
    """``--grid_chunk`` (or all runs), rounded up to a multiple of the mesh's ``"runs"`` axis."""
    mesh, chunk = sweep_mesh(), FLAGS.grid_chunk or num_runs
    size = 1 if mesh is None else int(mesh.shape[sharding.RUNS_AXIS])
    return -(-chunk // size) * size


def prepare_from_flags(dataset, seed: int):
    """:func:`experiments.paper.prepare` with ``--samples_per_group`` and ``--split``."""
    return prepare(dataset, seed, FLAGS.samples_per_group, fixed_split=FLAGS.split == "fixed")


class SeedData:
    """Everything a seed's runs share: splits, the counts that set the loss, grouped arrays."""

    def __init__(self, seed: int):
        dataset, _ = data_flags.load_from_flags(FLAGS, default_dataset=FLAGS.dataset, seed=seed)
        self.splits, self.original_train = prepare_from_flags(dataset, seed)
        counted = self.splits.train if FLAGS.class_counts_from == "resampled" else self.original_train
        self.class_counts = counted.class_counts  # v_bar, the balanced losses, BERM's weights
        # The FACIMS upper level's validation rows and the held-out rows its round is chosen on
        # (--selection_fraction; both the whole validation split when it is 0).
        self.upper_val, self.selection = hold_out_selection(self.splits.val, FLAGS.selection_fraction, seed)
        # One padded size for every seed (the dataset's largest group; padding is never sampled),
        # so that the seeds' arrays stack into one vmapped program.
        pad_to = int(max(
            (self.original_train.group_counts + self.splits.val.group_counts + self.splits.test.group_counts).max(),
            self.splits.train.group_counts.max(),
        ))
        self.grouped = FacimsData(
            data.group_arrays(self.splits.train, pad_to=pad_to), data.group_arrays(self.upper_val, pad_to=pad_to)
        )


_SEED_DATA: dict[int, SeedData] = {}


def seed_data(seed: int) -> SeedData:
    if seed not in _SEED_DATA:
        _SEED_DATA[seed] = SeedData(seed)
    return _SEED_DATA[seed]


def validation_rows() -> int:
    """The largest group's validation rows over the run's seeds. The validation arrays are cut to
    it: sampled batches are unchanged (padding is never drawn), and ``--whole_validation`` then
    costs the real rows, not the dataset's largest group (7 groups x 14,000 padded rows on credit)."""
    return max(int(seed_data(seed).upper_val.group_counts.max()) for seed in common.parse_seeds(FLAGS.seeds))


def run_chunk(solver, apply_fn, runs, chunk_size, progress, checkpoints, name):
    """Train ``runs`` (``(config, seed)`` pairs of one static setting) as one vmapped program.

    The chunk is padded to ``chunk_size`` runs by repeating its last run (the copies are
    dropped), so every chunk of a sweep has the same shapes and the round compiles once.
    Returns the final states of the real runs and the jitted round (for its compile count).
    """
    padded = list(runs) + [runs[-1]] * (chunk_size - len(runs))
    per_run = []
    for config, seed in padded:
        prepared = seed_data(seed)
        params = models.make_model(
            "mlp", prepared.splits.train.num_classes, prepared.splits.train.num_features, jax.random.key(seed),
            **model_options(),
        )[0]
        per_run.append((
            jax.random.key(seed + 1), params, config.hyperparams(), prepared.class_counts,
            prepared.original_train.group_counts, prepared.grouped,
        ))
    keys, params, hyperparams, class_counts, group_counts, grouped = (
        sweep.stack([run[i] for run in per_run]) for i in range(6)
    )
    rows = validation_rows()  # cut the validation padding (never sampled) to the largest group's rows
    grouped = grouped._replace(val=grouped.val._replace(x=grouped.val.x[:, :, :rows], y=grouped.val.y[:, :, :rows]))
    init = jax.vmap(lambda k, p, h, cc, gc: solver.init(k, p, h, class_counts=cc, group_counts=gc))
    states = init(keys, params, hyperparams, class_counts, group_counts)
    selection = BestRound(solver.predict, [seed for _, seed in padded]) if selects_round(runs[0][0]) else None
    done, (states, best) = checkpoints.restore(name, (states, selection and selection.init(states)))
    if sweep_mesh() is not None:  # runs (and with --shard_groups groups) split over every process's devices
        states, grouped = sharding.shard_runs((states, grouped), sweep_mesh())
    progress.update(progress.done + done * len(runs))
    step = compiled_round(solver)
    for epoch in range(done + 1, FLAGS.epochs + 1):
        states, metrics = step(states, grouped)
        metrics = {k: float(np.mean(np.asarray(v)[: len(runs)])) for k, v in distributed.gather(metrics).items()}
        check_finite(metrics, what="training metric (mean over the chunk's runs) ", epoch=epoch)
        if selection is not None:  # on every process, from the gathered states (host arrays)
            best = selection.update(best, distributed.gather(states) if sweep_mesh() is not None else states, epoch)
        checkpoints.save(name, epoch, (states, best))
        progress.update(progress.done + len(runs), metrics)
    if selection is None:
        states = distributed.gather(states)
        return [(sweep.take(states, index), FLAGS.epochs) for index in range(len(runs))]
    return [(sweep.take(best.state, index), int(best.epoch[index])) for index in range(len(runs))]


def selects_round(method) -> bool:
    """Whether ``method`` (a name or a FacimsConfig) reports its best validation round (``--model_selection``).

    ``auto``: yes for the methods that never train on the validation split, and for the FACIMS
    methods whose upper level leaves out ``--selection_fraction`` of it (they choose on those rows)."""
    if FLAGS.model_selection != "auto":
        return FLAGS.model_selection == "best_round"
    if isinstance(method, FacimsConfig):
        return not method.has_validation_level or FLAGS.selection_fraction > 0
    return method in ("erm", "berm")


class BestRound:
    """Early stopping on validation for a chunk of runs (``--model_selection=best_round``): after
    every round each run's state is kept if its balanced accuracy on the selection rows
    (``SeedData.selection``: the held-out part of the validation split, or all of it) beats its
    best so far (:func:`fairopt.train.best_iterate_tracker`, ``jax.vmap``-ped over the runs,
    whose selection sets are padded to one shape and masked)."""

    def __init__(self, predict, seeds):
        vals = [seed_data(seed).selection for seed in seeds]
        rows = max(len(v) for v in vals)
        pad = lambda a, v: np.concatenate([a, np.zeros((rows - len(v),) + a.shape[1:], a.dtype)])  # noqa: E731
        self.x = jnp.asarray(np.stack([pad(np.asarray(v.features, np.float32), v) for v in vals]))
        self.y = jnp.asarray(np.stack([pad(np.asarray(v.labels, np.int32), v) for v in vals]))
        self.mask = jnp.asarray(np.stack([pad(np.ones(len(v), bool), v) for v in vals]))
        init, update = best_iterate_tracker(predict, num_classes=vals[0].num_classes)
        self.init = jax.vmap(init)
        self._update = jax.jit(jax.vmap(update, in_axes=(0, 0, None, 0, 0, 0)))

    def update(self, best, states, epoch):
        return self._update(best, states, epoch, self.x, self.y, self.mask)


_ROUNDS: dict = {}


def compiled_round(solver):
    """``jax.jit(jax.vmap(solver.step))``, one per solver (one per method and static setting)."""
    if id(solver) not in _ROUNDS:
        _ROUNDS[id(solver)] = (solver, jax.jit(jax.vmap(solver.step)))
    return _ROUNDS[id(solver)][1]


def compile_counts() -> dict[str, int]:
    """Compiled programs per jitted round (1 each: a sweep never recompiles)."""
    return {f"round_{index}": int(step._cache_size()) for index, (_, step) in enumerate(_ROUNDS.values())}


def baseline_learning_rates() -> tuple[float, ...]:
    rates = common.parse_numbers("baseline_lr", FLAGS.baseline_lr, valid=lambda r: r > 0, distinct=True,
                                 requirement="distinct numbers > 0", example="3e-4,1e-3,3e-3")
    if not rates:
        raise ValueError("--baseline_lr needs at least one step size, e.g. --baseline_lr=1e-3")
    return rates


_BASELINE_PROGRAMS: dict = {}


def baseline_program(method, prepared):
    """ERM / BERM's solver (Adam, its step a traced hyperparameter), compiled epoch and validation
    tracker: built once and shared by every step size and every seed with the same class counts
    and shapes, so the baselines compile once per method rather than once per run."""
    train = prepared.splits.train
    key = (method, tuple(np.asarray(prepared.class_counts).tolist()), len(train), train.num_features)
    if key not in _BASELINE_PROGRAMS:
        _, apply_fn = models.make_model("mlp", train.num_classes, train.num_features, jax.random.key(0),
                                        **model_options())
        loss_fn = losses.make_loss("ce" if method == "erm" else "weighted_ce", class_counts=prepared.class_counts)
        solver = erm(apply_fn, loss_fn, optax.adam, steps_per_epoch=-(-len(train) // FLAGS.batch_size))
        epoch_fn = make_epoch_fn(solver.step, num_rows=len(train), batch_size=FLAGS.batch_size)
        init_best, update_best = best_iterate_tracker(solver.predict, num_classes=train.num_classes)
        _BASELINE_PROGRAMS[key] = (solver, epoch_fn, init_best, jax.jit(update_best))
    return _BASELINE_PROGRAMS[key]


def run_baseline(method, seed, progress, checkpoints, run):
    """ERM / BERM with Adam at every ``--baseline_lr`` (each with ``--model_selection``); returns
    the solver and state of the step size of highest validation balanced accuracy, and the
    choice (``lr=...,epoch=...``): the baselines get the same validation budget as FACIMS."""
    prepared = seed_data(seed)
    dataset, val = prepared.splits.train, prepared.splits.val
    params = models.make_model(
        "mlp", dataset.num_classes, dataset.num_features, jax.random.key(seed), **model_options()
    )[0]
    solver, epoch_fn, init_best, update_best = baseline_program(method, prepared)
    best = None
    for rate in baseline_learning_rates():
        name = f"{run}_lr{rate:g}"
        state = solver.init(jax.random.key(seed + 1), params, erm_hyperparams(rate))
        selection = BestEpoch(init_best, update_best, val, state, checkpoints, name) if selects_round(method) else None
        state, _ = fit_resumable(
            solver, state, dataset.features, dataset.labels, dataset.groups, checkpoints=checkpoints, run=name,
            progress=progress, on_epoch_end=selection and selection.update, epochs=FLAGS.epochs,
            batch_size=FLAGS.batch_size, key=jax.random.key(seed + 2), epoch_fn=epoch_fn,
        )
        if selection is None:
            epoch, score = FLAGS.epochs, evaluate(solver.predict, state, val)["balanced_accuracy"]
        else:
            state, score, epoch = selection.best.state, float(selection.best.score), int(selection.best.epoch)
        if best is None or score > best[0]:
            best = (score, state, f"lr={rate:g},epoch={epoch}", epoch)
    _, state, chosen, epoch = best
    return solver, state, chosen, epoch


class BestEpoch:
    """Early stopping on validation for one baseline run (``--model_selection=best_round``); the
    best state is checkpointed whenever it changes, so ``--resume`` keeps it."""

    def __init__(self, init_best, update_best, val, state, checkpoints, run):
        self._update = update_best
        self.x, self.y = jnp.asarray(val.features, jnp.float32), jnp.asarray(val.labels, jnp.int32)
        self.mask = jnp.ones(len(val), bool)
        self.checkpoints, self.run = checkpoints, f"{run}_best"
        self.best = checkpoints.restore(self.run, init_best(state))[1]

    def update(self, epoch, state, metrics):
        del metrics
        previous = int(self.best.epoch)
        self.best = self._update(self.best, state, epoch, self.x, self.y, self.mask)
        if int(self.best.epoch) != previous and self.checkpoints.every:
            self.checkpoints.save(self.run, epoch, self.best, force=True)


def evaluated_row(method, seed, setting, predict, state, seconds, reports=None) -> dict:
    """A results row: test metrics, ``val_`` metrics and the setting (``reports``: the
    ``(test, val)`` reports of a model evaluated elsewhere, e.g. scikit-learn's). The FACIMS
    methods' ``val_`` metrics are on their selection rows (``SeedData.selection``)."""
    prepared = seed_data(seed)
    val = prepared.selection if method in METHODS else prepared.splits.val
    if reports is None:
        reports = (evaluate(predict, state, prepared.splits.test, num_bins=FLAGS.num_bins),
                   evaluate(predict, state, val, num_bins=FLAGS.num_bins))
    test, val = reports
    row = dict(method=method, seed=seed, setting=common.setting_label(setting), **setting, seconds=seconds, **test)
    row.update({f"val_{name}": value for name, value in val.items()})
    print(
        f"[{method} {row['setting']} seed={seed}] balanced_accuracy={test['balanced_accuracy']:.4f} "
        f"(val {val['balanced_accuracy']:.4f}) sgap_official={test['sufficiency_gap_official']:.4f} "
        f"dp_gap={test['dp_gap']:.4f} deo_gap={test['deo_gap']:.4f} ({seconds:.1f}s)",
        file=sys.stderr,
        flush=True,
    )
    return row


def setup(argv):
    """Validate the flags and open the checkpoints; errors become usage errors (no traceback)."""
    try:
        if len(argv) > 1:
            raise ValueError(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --helpshort)")
        seeds = common.parse_seeds(FLAGS.seeds)
        common.parse_choices("methods", FLAGS.methods, METHODS + BASELINES)
        common.check_number_flags(FLAGS, _OWN_FLAGS)
        hidden_widths()
        baseline_learning_rates()
        grid = common.parse_grid(FLAGS.grid, FacimsConfig)
        if "method" in grid:
            raise ValueError("--grid cannot sweep method; list the methods in --methods")
        settings = sweep.product(grid) if grid else [{}]
        for method in FLAGS.methods:
            if method in METHODS:
                for setting in settings:
                    facims_config(method, setting)  # validates every setting before any training
        if FLAGS.select is not None:
            metric, _ = common.metric_direction(FLAGS.select)
            if not metric.startswith("val_"):
                raise ValueError(f"--select={FLAGS.select}: choose with a validation metric (val_...), never a test one")
        if FLAGS.shard_groups > 1:
            try:
                sweep_mesh()
            except ValueError as error:
                raise ValueError(f"--shard_groups: {error}") from None
        described = data_flags.check_data_flags(  # the data load and split for every seed, or a usage error
            FLAGS, default_dataset=FLAGS.dataset, seeds=seeds,
            prepare=prepare_from_flags,
        )
        num_groups = len(seed_data(seeds[0]).original_train.group_counts) if FLAGS.shard_groups > 1 else 1
        if num_groups % FLAGS.shard_groups:
            raise ValueError(f"--shard_groups={FLAGS.shard_groups} does not divide the {num_groups} groups of the data; "
                             f"use a divisor of {num_groups}")
        stem = f"facims_{described['name']}"
        common.check_results_writable(FLAGS.output_dir, stem, overwrite=FLAGS.overwrite)
        checkpoints = common.open_checkpointer(FLAGS, _OWN_FLAGS, stem)
    except (ValueError, TypeError, FileExistsError) as error:
        raise app.UsageError(str(error)) from None
    return seeds, settings, stem, checkpoints, described


def run_method(method, seeds, settings, rows, finished, progress, checkpoints):
    """Every (setting, seed) run of a FACIMS method: one compiled round per static setting."""
    configs = [facims_config(method, setting) for setting in settings]
    reference = seed_data(seeds[0])
    _, apply_fn = models.make_model(
        "mlp", reference.splits.train.num_classes, reference.splits.train.num_features, jax.random.key(0),
        **model_options(),
    )
    for static_index, members in enumerate(sweep.group_by_static(configs)):
        solver = facims(
            apply_fn, configs[members[0]], class_counts=reference.class_counts,
            group_counts=reference.original_train.group_counts, batch_size=FLAGS.batch_size,
            val_batch_size=FLAGS.batch_size,
        )
        runs = [(index, seed) for index in members for seed in seeds]
        chunk_size = runs_per_program(len(runs))
        for start in range(0, len(runs), chunk_size):
            chunk = runs[start : start + chunk_size]
            todo = [(i, s) for i, s in chunk if (method, common.setting_label(settings[i]), s) not in finished]
            if not todo:
                continue
            started = time.perf_counter()
            states = run_chunk(
                solver, apply_fn, [(configs[i], s) for i, s in chunk], chunk_size, progress, checkpoints,
                f"{method}_static{static_index}_chunk{start // chunk_size}",
            )
            seconds = (time.perf_counter() - started) / len(chunk)
            for (index, seed), (state, selected_round) in zip(chunk, states):
                if (index, seed) not in todo or not distributed.is_primary():  # process 0 evaluates and writes
                    continue
                row = evaluated_row(method, seed, settings[index], solver.predict, state, seconds)
                row["selected_round"] = selected_round
                checkpoints.add_finished_run(row)
                rows.append(row)


def selected_rows(rows, columns) -> tuple[list[dict], str]:
    """With ``--select``: per method, the test rows of the setting chosen on validation, relabelled."""
    if FLAGS.select is None:
        return [], ""
    metric, direction = common.metric_direction(FLAGS.select)
    chosen_rows, notes = [], []
    for method, label, value in common.select_on_validation(rows, FLAGS.select):
        name = f"{method} (selected on {metric})"
        chosen_rows += [dict(row, run=name) for row in rows if row["method"] == method and row["setting"] == label]
        notes.append(f"* {name}: {label or 'the flags'} ({direction} mean {metric} = {value:.4f})")
    return chosen_rows, "\n".join(notes) + "\n"


def main(argv):
    common.enable_compilation_cache()  # before the first compilation (JAX decides once whether to use the cache)
    common.start_distributed(FLAGS)
    with common.stop_together():
        run(argv)


def run(argv):
    seeds, settings, stem, checkpoints, described = setup(argv)
    rows = checkpoints.finished_runs()
    finished = {(row["method"], row["setting"], row["seed"]) for row in rows}
    facims_methods = [m for m in FLAGS.methods if m in METHODS]
    baseline_runs = sum(len(baseline_learning_rates()) if m in ("erm", "berm") else 1 for m in FLAGS.methods if m not in METHODS)
    total = len(seeds) * FLAGS.epochs * (len(settings) * len(facims_methods) + baseline_runs)
    progress = Progress(f"facims:{described['name']}", total, every=max(1, total // 10))
    progress.update(len(finished) * FLAGS.epochs)
    for method in FLAGS.methods:
        if method in METHODS:
            run_method(method, seeds, settings, rows, finished, progress, checkpoints)
            continue
        for seed in seeds:
            if (method, "", seed) in finished:
                continue
            started = time.perf_counter()
            if method in sklearn_reference.METHODS:
                if not distributed.is_primary():  # no JAX collective inside: process 0 alone fits and scores it
                    continue
                test, val, chosen = sklearn_reference.fit_and_evaluate(
                    method, seed_data(seed).splits, seed=seed, num_bins=FLAGS.num_bins
                )
                row = evaluated_row(method, seed, {}, None, None, time.perf_counter() - started, reports=(test, val))
                row["chosen_on_validation"] = chosen
                progress.update(progress.done + FLAGS.epochs)
            else:
                # trained in every process: its checkpoints are collectives (process 0 reads and writes them)
                solver, state, chosen, epoch = run_baseline(method, seed, progress, checkpoints, f"{method}_seed{seed}")
                if not distributed.is_primary():
                    continue
                row = evaluated_row(method, seed, {}, solver.predict, state, time.perf_counter() - started)
                row.update(chosen_on_validation=chosen, selected_round=epoch)
            checkpoints.add_finished_run(row)
            rows.append(row)
    if not distributed.is_primary():
        print(f"process {jax.process_index()}: done; process 0 evaluates the runs and writes the results", file=sys.stderr)
        return
    for row in rows:
        row["run"] = f"{row['method']} [{row['setting']}]" if row["setting"] else row["method"]
    recall_columns = sorted({k for row in rows for k in row if k.startswith("recall_")})
    columns = [c for c in REPORT_COLUMNS if c in rows[0]] + recall_columns + ["seconds"]
    chosen, selection_notes = selected_rows(rows, columns)
    summary = common.summarize(rows + chosen, by="run", columns=columns + ["val_balanced_accuracy"])
    paper = PAPER_FACIMS_CREDIT if described["name"] == "credit" and described["source"] == "builtin" and not FLAGS.grid else None
    markdown = (
        f"# FACIMS on {data_flags.describe(described)} ({len(seeds)} seeds: {', '.join(map(str, seeds))})\n\n"
        + common.markdown_table(summary, columns + ["val_balanced_accuracy"], paper=paper, index_name="run")
        + (f"\nSelected on the validation split only (test numbers read once):\n\n{selection_notes}" if chosen else "")
    )
    config = dict(
        flags={name: FLAGS[name].value for name in FLAGS if FLAGS[name].present or name in ("dataset", "methods")},
        facims=dataclasses.asdict(facims_config(facims_methods[0] if facims_methods else "facims")),
        grid={name: values for name, values in common.parse_grid(FLAGS.grid, FacimsConfig).items()},
        compiled_rounds=compile_counts(),
        data=described,
        processes=jax.process_count(),
        mesh=None if sweep_mesh() is None else dict(sweep_mesh().shape),
    )
    targets = common.write_results(
        FLAGS.output_dir, stem, rows, summary, markdown, config=config, overwrite=FLAGS.overwrite
    )
    print(markdown)
    print(f"wrote {', '.join(str(p) for p in targets.values())}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
