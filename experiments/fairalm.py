r"""FairALM and its baselines on tabular data (FairALM paper §6, DEO constraint).

Methods (one compiled epoch per method, reused across seeds):

* ``unconstrained`` — ERM with cross-entropy;
* ``l2_penalty`` — ``CE + (eta/2) d^2`` (official ``L2_PENALTY``);
* ``reweighting`` — cross-entropy weighted ``∝ 1/n_{y,g}`` per (class, group) cell;
* ``lagrangian`` — gradient descent-ascent on ``CE + lambda d`` (ascent step ``eta``);
* ``fairalm`` — paper Alg. 2;
* ``group_dro`` — online group DRO over the (class, group) cells.

Protocol: stratified 49/21/30 split per seed (``fairopt.data.split``), features standardised
on the training split, the 400-200-100 ELU MLP, minibatches of ``--batch_size``. Reported on
the test split: accuracy, DEO ``|TPR_0 - TPR_1|`` (``metrics.report(reduce="between_groups")``
— the paper's DEO for two groups, the max-min TPR gap for more), DP and EO gaps, and the FNR
of every group. With ``--eta_grid``, the dual step ``eta`` of ``fairalm``, ``lagrangian`` and
``l2_penalty`` is chosen per method on the *validation* split of the first seed: the value with
the smallest validation DEO among those whose validation accuracy is within
``--max_accuracy_drop`` of the unconstrained model's (a variant of the paper's NVP rule, which
keeps accuracies within 90 % of the best); the chosen value is then used for every seed.

    python -m experiments.fairalm --dataset=adult --seeds=0,1,2
    python -m experiments.fairalm --dataset=celeba_attributes --method=unconstrained,fairalm \
        --constraint=deo --eta=0.1 --epochs=3
    python -m experiments.fairalm --dataset=adult --group=sex,race            # intersectional groups
    python -m experiments.fairalm --data=loans.csv --label=default --group=sex --positive=yes

Your own CSV (``--data``, ``--label``, ``--group``...) or another sensitive attribute of a built-in
dataset (``--group``): see ``experiments/data_flags.py``.

Writes ``<output_dir>/fairalm_<dataset>.{json,csv,md}`` and ``..._summary.csv`` (refusing to
overwrite without ``--overwrite``) and prints the Markdown table. Training states are saved every
``--checkpoint_every`` epochs under ``<output_dir>/checkpoints/fairalm_<dataset>``; ``--resume``
(with the same flags) skips the finished runs, including those of the ``--eta_grid`` selection,
and continues the interrupted one, ending with the same numbers as an uninterrupted run.
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import numpy as np
import optax
from absl import app, flags

from experiments import cli, common, data_flags
from fairopt import data, losses, metrics, models
from fairopt.solvers import constrained
from fairopt.solvers.erm import erm
from fairopt.solvers.fairalm import fairalm
from fairopt.train import NonFiniteError, Progress, fit_resumable, make_epoch_fn, predict_in_batches

METHODS = ("unconstrained", "l2_penalty", "reweighting", "lagrangian", "fairalm", "group_dro")
DEFAULT_METHODS = ("unconstrained", "l2_penalty", "reweighting", "lagrangian", "fairalm")
ETA_METHODS = ("l2_penalty", "lagrangian", "fairalm")
DATASETS = tuple(common.FAIRNESS_LOADERS)
OPTIMIZERS = ("adam", "sgd")

FLAGS = flags.FLAGS
_ABSL_FLAGS = set(FLAGS)  # flags defined by absl itself, before this module's
flags.DEFINE_enum("dataset", "adult", DATASETS, "Built-in dataset (protected attribute: sex for adult/german, Male for celeba_attributes; see --group), or --data=PATH.csv.")
data_flags.define_data_flags()  # --data, --label, --group, --features, --positive, --impute, --drop_missing...
flags.DEFINE_list("method", list(DEFAULT_METHODS), f"Methods, comma-separated, any of: {', '.join(METHODS)}.")
flags.DEFINE_list("constraint", ["deo"], f"Constraints, comma-separated, any of: {', '.join(constrained.CONSTRAINTS)}.")
flags.DEFINE_float("eta", 0.1, "Dual step / augmentation weight eta (official FairALM: 20 on CelebA images).", lower_bound=0.0)
flags.DEFINE_list("eta_grid", [], "If set: choose eta per method on the first seed's validation split from these values.")
flags.DEFINE_float("max_accuracy_drop", 0.02, "Validation accuracy an eta may lose vs unconstrained (with --eta_grid).",
                   lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_float("eta_growth", 1.01, "Per-epoch growth of eta (official: 1.01).", lower_bound=1e-6)
flags.DEFINE_integer("inner_steps", 5, "FairALM primal steps per batch (official: 5).", lower_bound=1)
flags.DEFINE_enum("surrogate", "cross_entropy", constrained.SURROGATES, "Smooth surrogate of the group rates.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds (split, initialisation, shuffling).")
flags.DEFINE_integer("epochs", 5, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", 256, "Rows per minibatch (official: 256).", lower_bound=1)
flags.DEFINE_enum("optimizer", "adam", OPTIMIZERS, "Primal optimizer (official: sgd with learning rate 0.01).")
flags.DEFINE_float("learning_rate", 1e-3, "Primal learning rate.", lower_bound=0.0)
flags.DEFINE_enum("model", "mlp", ("mlp", "linear"), "Model (mlp: 400-200-100 ELU).")
flags.DEFINE_float("dro_step_size", 0.01, "Group DRO step size.", lower_bound=0.0)
flags.DEFINE_string("output_dir", "results", "Folder for the results files.")
flags.DEFINE_bool("overwrite", False, "Replace existing results files.")
flags.DEFINE_integer("checkpoint_every", 1, "Save the training state every N epochs (0: never).", lower_bound=0)
flags.DEFINE_bool("resume", False, "Continue an interrupted run from <output_dir>/checkpoints (same flags).")

_OWN_FLAGS = set(FLAGS) - _ABSL_FLAGS  # the flags of this entry point (what a resume must match)


def parse_eta_grid(values) -> tuple[float, ...]:
    """The values of ``--eta_grid``: finite numbers >= 0, none repeated (empty: no selection)."""
    grid = []
    for value in values:
        try:
            eta = float(value)
        except ValueError:
            raise ValueError(f"--eta_grid must be numbers, got {value!r} (e.g. --eta_grid=0.01,0.1,1)") from None
        if not (np.isfinite(eta) and eta >= 0):
            raise ValueError(f"--eta_grid values must be finite and >= 0, got {value!r}")
        grid.append(eta)
    if len(set(grid)) != len(grid):
        raise ValueError(f"--eta_grid has repeated values: {list(values)}")
    return tuple(grid)


def setup(argv):
    """Validate every flag and open the checkpoints; errors become usage errors (one line, no
    traceback, exit code 1). Returns ``(seeds, methods, eta grid, results stem, checkpoints)``
    and sets :data:`DESCRIBED`."""
    global DESCRIBED
    try:
        if len(argv) > 1:
            raise ValueError(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --helpshort)")
        seeds = common.parse_seeds(FLAGS.seeds)
        methods = common.parse_choices("method", FLAGS.method, METHODS)
        common.parse_choices("constraint", FLAGS.constraint, constrained.CONSTRAINTS)
        grid = parse_eta_grid(FLAGS.eta_grid)
        if grid and not set(methods) & set(ETA_METHODS):
            raise ValueError(f"--eta_grid tunes {', '.join(ETA_METHODS)}; add one of them to --method or drop --eta_grid")
        common.check_number_flags(FLAGS, _OWN_FLAGS)
        for name in ("learning_rate", "dro_step_size"):
            if not FLAGS[name].value > 0:
                raise ValueError(f"--{name} must be > 0, got {FLAGS[name].value}")
        # The data are there, readable and splittable (parsed once: the CSV is cached for the runs).
        DESCRIBED = data_flags.check_data_flags(FLAGS, default_dataset=FLAGS.dataset, seeds=seeds, prepare=split)
        stem = f"fairalm_{DESCRIBED['name']}"
        common.check_results_writable(FLAGS.output_dir, stem, overwrite=FLAGS.overwrite)
        checkpoints = common.open_checkpointer(FLAGS, _OWN_FLAGS, stem)
    except (ValueError, FileExistsError) as error:
        raise app.UsageError(str(error)) from None
    return seeds, methods, grid, stem, checkpoints


def make_solver(method: str, apply_fn, train: data.Dataset, *, eta: float, steps_per_epoch: int):
    """The :class:`fairopt.train.Solver` of ``method`` (flags give the shared options)."""
    optimizer = optax.adam(FLAGS.learning_rate) if FLAGS.optimizer == "adam" else optax.sgd(FLAGS.learning_rate)
    shared = dict(
        constraints=tuple(FLAGS.constraint),
        num_groups=train.num_groups,
        surrogate=FLAGS.surrogate,
        steps_per_epoch=steps_per_epoch,
    )
    if method == "unconstrained":
        return erm(apply_fn, losses.make_loss("ce", train.class_counts), optimizer)
    if method == "reweighting":
        loss_fn = losses.make_loss("group_balanced_ce", train.class_counts, cell_counts=train.cell_counts)
        return erm(apply_fn, loss_fn, optimizer)
    if method == "l2_penalty":
        return constrained.penalty(apply_fn, optimizer, eta=eta, eta_growth=FLAGS.eta_growth, **shared)
    if method == "lagrangian":
        return constrained.lagrangian(
            apply_fn, optimizer, dual_learning_rate=eta, dual_growth=FLAGS.eta_growth, **shared
        )
    if method == "fairalm":
        return fairalm(
            apply_fn, optimizer, eta=eta, eta_growth=FLAGS.eta_growth, inner_steps=FLAGS.inner_steps, **shared
        )
    if method == "group_dro":
        return constrained.group_dro(
            apply_fn,
            optimizer,
            num_classes=train.num_classes,
            num_groups=train.num_groups,
            step_size=FLAGS.dro_step_size,
        )
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


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
    row = {k: report[k] for k in ("accuracy", "balanced_accuracy", "deo_gap", "dp_gap", "eo_gap", "pp_gap")}
    fnr, present = constrained.hard_group_rates(
        probs.argmax(axis=1), split.labels, split.groups, atoms=("deo",), num_groups=split.num_groups
    )
    for g, name in enumerate(split.group_names):
        row[f"fnr_{name}"] = float(fnr[0, g]) if bool(present[0, g]) else float("nan")
    return row


DESCRIBED: dict = {}  # the data of this run (experiments.data_flags), set by setup


def split(dataset: data.Dataset, seed: int) -> data.Splits:
    return data.split(dataset, seed=seed)


def prepare(seed: int) -> data.Splits:
    dataset, _ = data_flags.load_from_flags(FLAGS, default_dataset=FLAGS.dataset, seed=seed)
    return data.standardize(split(dataset, seed))


class Runner:
    """Trains methods, compiling each (method, eta, data shape) once; with checkpoints, a run
    finished before an interruption is not trained again and an interrupted one continues."""

    def __init__(self, checkpoints: common.Checkpointer):
        self.epoch_fns = {}
        self.checkpoints = checkpoints
        self.finished = {row.pop("run"): row for row in checkpoints.finished_runs()}
        self.splits = functools.lru_cache(maxsize=1)(prepare)

    def run(self, name: str, method: str, seed: int, eta: float | None, progress: Progress, *, evaluate_on: str):
        """The result row of run ``name``: ``method`` trained on the seed's training split and
        evaluated on its ``evaluate_on`` split ("val" or "test")."""
        if name in self.finished:
            progress.update(progress.done + FLAGS.epochs)
            return self.finished[name]
        splits = self.splits(seed)
        start = time.perf_counter()
        try:
            solver, state = self.train(name, method, splits, seed, eta, progress)
        except NonFiniteError as error:
            raise NonFiniteError(f"run {name}: {error}") from None
        row = dict(method=method, seed=seed, eta=float("nan") if eta is None else eta,
                   seconds=time.perf_counter() - start)
        row.update(evaluate_split(solver, state, getattr(splits, evaluate_on)))
        self.checkpoints.add_finished_run(dict(run=name, **row))
        return row

    def train(self, name, method, splits, seed, eta, progress):
        train = splits.train
        params, apply_fn = models.make_model(FLAGS.model, train.num_classes, train.num_features, jax.random.key(seed))
        steps_per_epoch = -(-len(train) // FLAGS.batch_size)
        solver = make_solver(method, apply_fn, train, eta=eta, steps_per_epoch=steps_per_epoch)
        key = (method, eta if method in ETA_METHODS else None, len(train), train.num_features)
        if key not in self.epoch_fns:
            self.epoch_fns[key] = (solver, make_epoch_fn(solver.step, num_rows=len(train), batch_size=FLAGS.batch_size))
        solver, epoch_fn = self.epoch_fns[key]
        state, _ = fit_resumable(
            solver,
            solver.init(jax.random.key(seed + 1), params),
            train.features,
            train.labels,
            train.groups,
            checkpoints=self.checkpoints,
            run=name,
            progress=progress,
            epochs=FLAGS.epochs,
            batch_size=FLAGS.batch_size,
            key=jax.random.key(seed + 2),
            epoch_fn=epoch_fn,
        )
        return solver, state


def select_eta(runner: Runner, seed: int, methods, grid):
    """Per-method eta on the validation split (see module docstring); returns choices and rows."""
    progress = Progress(f"eta-grid:{DESCRIBED.get('name', FLAGS.dataset)}", (1 + len(grid) * len(methods)) * FLAGS.epochs,
                        every=FLAGS.epochs)
    reference = runner.run("grid_unconstrained", "unconstrained", seed, None, progress, evaluate_on="val")
    rows = [reference]
    choices = {}
    for method in methods:
        candidates = []
        for eta in grid:
            val = runner.run(f"grid_{method}_eta{eta!r}", method, seed, eta, progress, evaluate_on="val")
            rows.append(val)
            print(f"[eta-grid {method} eta={eta:g}] val accuracy={val['accuracy']:.4f} deo={val['deo_gap']:.4f}",
                  file=sys.stderr, flush=True)
            candidates.append((eta, val))
        admissible = [c for c in candidates if c[1]["accuracy"] >= reference["accuracy"] - FLAGS.max_accuracy_drop]
        pool = admissible or [max(candidates, key=lambda c: c[1]["accuracy"])]
        choices[method] = min(pool, key=lambda c: c[1]["deo_gap"])[0]
    return choices, rows


def main(argv):
    seeds, methods, grid, stem, checkpoints = setup(argv)
    common.enable_compilation_cache()
    try:
        rows, etas, grid_rows, total_seconds = train_all(Runner(checkpoints), seeds, methods, grid)
    except NonFiniteError as error:
        print(f"FATAL {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    write(rows, etas, grid_rows, total_seconds, seeds, methods, stem)


def train_all(runner: Runner, seeds, methods, grid):
    """The eta selection (with a grid), then every (seed, method): ``(rows, etas, grid rows, seconds)``."""
    start_all = time.perf_counter()
    etas = {m: FLAGS.eta for m in ETA_METHODS}
    grid_rows = []
    tuned = [m for m in methods if m in ETA_METHODS]
    if grid:
        chosen, grid_rows = select_eta(runner, seeds[0], tuned, grid)
        etas.update(chosen)
        print(f"chosen eta per method (validation, seed {seeds[0]}): {chosen}", file=sys.stderr, flush=True)
    rows = []
    progress = Progress(f"fairalm:{DESCRIBED.get('name', FLAGS.dataset)}", len(seeds) * len(methods) * FLAGS.epochs, every=FLAGS.epochs)
    for seed in seeds:
        for method in methods:
            row = runner.run(f"{method}_seed{seed}", method, seed, etas.get(method), progress, evaluate_on="test")
            rows.append(row)
            print(
                f"[{method} seed={seed}] accuracy={row['accuracy']:.4f} deo={row['deo_gap']:.4f} ({row['seconds']:.1f}s)",
                file=sys.stderr,
                flush=True,
            )
    return rows, etas, grid_rows, time.perf_counter() - start_all


def write(rows, etas, grid_rows, total_seconds, seeds, methods, stem):
    """The summary table (printed) and the results files."""
    fnr_columns = [k for k in rows[0] if k.startswith("fnr_")]
    columns = ["accuracy", "deo_gap", *fnr_columns, "dp_gap", "eo_gap", "seconds"]
    summary = common.summarize(rows, by="method", columns=columns)
    lines = [
        f"# FairALM baselines on {data_flags.describe(DESCRIBED) if DESCRIBED else FLAGS.dataset} (constraint {'+'.join(FLAGS.constraint)}; "
        f"{len(seeds)} seeds: {', '.join(map(str, seeds))})\n",
        f"eta per method: {', '.join(f'{m}={etas[m]:g}' for m in methods if m in ETA_METHODS) or 'n/a'}; "
        f"{FLAGS.epochs} epochs, batch {FLAGS.batch_size}, {FLAGS.optimizer} lr {FLAGS.learning_rate:g}, "
        f"FairALM inner steps {FLAGS.inner_steps}; wall time of this process {total_seconds:.0f} s\n",
        common.markdown_table(summary, columns),
    ]
    if "unconstrained" in summary.index and "fairalm" in summary.index:
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
        eta_per_method={m: etas[m] for m in methods if m in ETA_METHODS},
        eta_grid_rows=grid_rows,
        total_seconds=total_seconds,
        data=DESCRIBED,
    )
    targets = common.write_results(
        FLAGS.output_dir, stem, rows, summary, markdown, config=config, overwrite=FLAGS.overwrite
    )
    print(markdown)
    print(f"wrote {', '.join(str(p) for p in targets.values())}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
