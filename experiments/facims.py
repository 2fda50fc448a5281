r"""FACIMS and its baselines on a real dataset: the paper's Table 2 protocol.

With no flags: FACIMS on the credit-card data, paper protocol (SPEC §7): split stratified by
label (30 % test, then 30 % of the rest validation), the training set resampled to 400 rows
per education group, the 400-200-100 ELU MLP, 50 rounds, seeds 0, 42, 666, 777, 1009.

    python -m experiments.facims                                   # FACIMS on credit
    python -m experiments.facims --methods=facims,facims_i,facims_ii,fams,erm,berm
    python -m experiments.facims --dataset=drug --drug_path=../shared/data/drug_consumption.csv
    python -m experiments.facims --data=loans.csv --label=default --group=sex,race --methods=facims,erm

Your own CSV (``--data``, ``--label``, ``--group``...) or another sensitive attribute of a built-in
dataset (``--group``): see ``experiments/data_flags.py``.

Prints progress with an ETA, then a table of mean ± std over seeds (balanced accuracy,
accuracy, DP, EO, sufficiency gap, recall per class, wall time) and writes
``<output_dir>/facims_<dataset>.{json,csv,md}`` (refusing to overwrite without --overwrite).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import numpy as np
import optax
from absl import app, flags

from experiments import cli, common, data_flags
from fairopt import data, losses, models
from fairopt.solvers.erm import erm
from fairopt.solvers.facims import (
    DIVERGENCES,
    GROUP_MAPPINGS,
    INVERSES,
    METHODS,
    VALIDATION_LOSSES,
    FacimsConfig,
    facims,
    group_sharpness,
)
from fairopt.train import Progress, check_finite, evaluate, fit_resumable

BASELINES = ("erm", "berm")
DATASETS = ("credit", "drug", "adult", "compas", "german", "celeba_attributes", "synthetic")

# Paper Table 2 (credit card rows) for the side-by-side columns. The paper's "EO" column is the
# official evaluation code's mean over groups of |TPR - TPR_g| (our ``deo_gap``), and its SGap
# comes from the official estimator (our ``sufficiency_gap_official``; SPEC §2).
_PAPER_ROWS = {
    "facims": (0.6799, 0.0593, 0.1567, 0.1264),
    "facims_i": (0.6768, 0.0750, 0.1951, 0.1396),
    "facims_ii": (0.6446, 0.0707, 0.1973, 0.1340),
    "fams": (0.6542, 0.0746, 0.1859, 0.1352),
    "erm": (0.6104, 0.0599, 0.1577, 0.2760),
    "berm": (0.6570, 0.1060, 0.1631, 0.2315),
}
PAPER_CREDIT = {
    method: dict(zip(("balanced_accuracy", "dp_gap", "deo_gap", "sufficiency_gap_official"), values))
    for method, values in _PAPER_ROWS.items()
}

FLAGS = flags.FLAGS
_ABSL_FLAGS = set(FLAGS)  # flags defined by absl itself, before this module's
DEFAULTS = FacimsConfig()  # flag defaults are the solver defaults (one place)
flags.DEFINE_enum("dataset", "credit", DATASETS, "Built-in dataset to run on (or --data=PATH.csv).")
flags.DEFINE_list("methods", ["facims"], f"Methods, any of {', '.join(METHODS + BASELINES)}.")
flags.DEFINE_list("seeds", [str(s) for s in common.PAPER_SEEDS], "Random seeds.")
flags.DEFINE_string("output_dir", "results", "Folder for the results files.")
flags.DEFINE_bool("overwrite", False, "Replace existing results files.")
flags.DEFINE_integer("checkpoint_every", 10, "Save the training state every N rounds/epochs (0: never).", lower_bound=0)
flags.DEFINE_bool("resume", False, "Continue an interrupted run from <output_dir>/checkpoints (same flags).")
data_flags.define_data_flags()  # --data, --label, --group, --features, --positive, --impute, --drop_missing, --drug_path...
flags.DEFINE_integer("samples_per_group", 400, "Training rows per group after resampling (0: no resampling).", lower_bound=0)
flags.DEFINE_integer("epochs", 50, "Rounds (the official code's epochs).", lower_bound=1)
flags.DEFINE_integer("batch_size", 50, "Rows per group per step.", lower_bound=1)
flags.DEFINE_float("alpha_low", DEFAULTS.alpha_low, "Weight of D(Z^a||Z) in the lower level.", lower_bound=0.0)
flags.DEFINE_float("alpha_up", DEFAULTS.alpha_up, "Weight of D(Z^a*||Z) in the upper level.", lower_bound=0.0)
flags.DEFINE_float("sharpness", DEFAULTS.sharpness, "SAM radius beta (FACIMS only).", lower_bound=0.0)
flags.DEFINE_enum("sharpness_scaling", "uniform", ("uniform", "frequency"), "Per-group SAM radius.")
flags.DEFINE_integer("middle_steps", DEFAULTS.middle_steps, "Middle-level steps per round.", lower_bound=1)
flags.DEFINE_integer("upper_steps", DEFAULTS.upper_steps, "Upper-level steps per round.", lower_bound=0)
flags.DEFINE_integer("num_mc", DEFAULTS.num_mc, "Monte-Carlo draws per loss.", lower_bound=1)
flags.DEFINE_integer(
    "hypergradient_samples", DEFAULTS.hypergradient_samples, "Monte-Carlo draws inside the hypergradient's Hessian.", lower_bound=1
)
flags.DEFINE_bool(
    "common_noise", DEFAULTS.common_noise, "All groups share one Monte-Carlo weight draw per step (faster; see FacimsConfig)."
)
flags.DEFINE_float("local_lr", DEFAULTS.local_learning_rate, "Adagrad step of the local posteriors.", lower_bound=0.0)
flags.DEFINE_float("global_lr", DEFAULTS.global_learning_rate, "Adagrad step of the global posterior.", lower_bound=0.0)
flags.DEFINE_float("global_decay", DEFAULTS.global_decay, "Per-round decay of the global step.", lower_bound=0.0)
flags.DEFINE_float("hparam_lr", DEFAULTS.hparam_learning_rate, "SGD step of the VS hyperparameters.", lower_bound=0.0)
flags.DEFINE_enum("divergence", DEFAULTS.divergence, DIVERGENCES, "Divergence between posteriors.")
flags.DEFINE_enum("inverse", DEFAULTS.inverse, INVERSES, "Inverse-Hessian-vector product of the hypergradient.")
flags.DEFINE_float("neumann_alpha", DEFAULTS.neumann_alpha, "Neumann series step.", lower_bound=0.0)
flags.DEFINE_integer("inverse_terms", DEFAULTS.inverse_terms, "Neumann terms / CG iterations.", lower_bound=0)
flags.DEFINE_float("init_std", DEFAULTS.init_std, "Initial posterior standard deviation.", lower_bound=0.0)
flags.DEFINE_enum("validation_loss", DEFAULTS.validation_loss, VALIDATION_LOSSES, "Upper-level balanced loss L_bal.")
flags.DEFINE_bool("hparams_per_group", False, "VS hyperparameters per (class, group).")
flags.DEFINE_integer("groups_per_step", None, "Partial-group setting: groups sampled per step.", lower_bound=1)
flags.DEFINE_enum(
    "group_mapping", "auto", GROUP_MAPPINGS,
    "How the groups run in a round: vmap, unroll (faster on a CPU), map (least memory), auto (unroll on CPU if G <= 16).",
)
flags.DEFINE_float("baseline_lr", 1e-3, "Adam step of the ERM/BERM baselines.", lower_bound=0.0)
flags.DEFINE_integer("num_bins", 10, "Bins of the sufficiency gap.", lower_bound=2)

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


def prepare(dataset: data.Dataset, seed: int, samples_per_group: int) -> tuple[data.Splits, data.Dataset]:
    """Paper protocol: label-stratified split, train-only standardisation, per-group resampling.

    Returns the splits (train resampled) and the training split before resampling (whose class
    and group counts set the loss hyperparameters)."""
    splits = data.standardize(data.facims_split(dataset, seed=seed))
    original_train = splits.train
    if samples_per_group:
        splits = splits._replace(train=data.resample_per_group(original_train, samples_per_group, seed=seed))
    return splits, original_train


def facims_config(method: str) -> FacimsConfig:
    return FacimsConfig(
        method=method,
        alpha_low=FLAGS.alpha_low,
        alpha_up=FLAGS.alpha_up,
        sharpness=FLAGS.sharpness,
        sharpness_scaling=FLAGS.sharpness_scaling,
        middle_steps=FLAGS.middle_steps,
        upper_steps=FLAGS.upper_steps,
        num_mc=FLAGS.num_mc,
        hypergradient_samples=FLAGS.hypergradient_samples,
        common_noise=FLAGS.common_noise,
        local_learning_rate=FLAGS.local_lr,
        global_learning_rate=FLAGS.global_lr,
        global_decay=FLAGS.global_decay,
        hparam_learning_rate=FLAGS.hparam_lr,
        divergence=FLAGS.divergence,
        inverse=FLAGS.inverse,
        neumann_alpha=FLAGS.neumann_alpha,
        inverse_terms=FLAGS.inverse_terms,
        init_std=FLAGS.init_std,
        validation_loss=FLAGS.validation_loss,
        hparams_per_group=FLAGS.hparams_per_group,
        groups_per_step=FLAGS.groups_per_step,
        group_mapping=FLAGS.group_mapping,
    )


_ROUNDS: dict = {}  # compiled rounds, shared by the seeds of a method (see compiled_round)


def compiled_round(solver, *, method: str, dataset: data.Dataset, original_train: data.Dataset):
    """``jax.jit(solver.step)``, shared by the seeds whose rounds are the same program.

    The round's program depends on the flags, the method, the model's shape and the constants
    the solver derives from the training counts (``v_bar`` and the per-group SAM radii), not on
    the seed. Seeds usually agree on those constants (the split is stratified on the label) even
    when their group counts differ, so they share one jitted round. A fresh ``jax.jit`` per seed
    would trace the round again and reload it from the compilation cache: 8 s of tracing plus
    9 s of loading per seed for the unrolled credit round."""
    radii = group_sharpness(facims_config(method), original_train.group_counts)
    key = (
        method,
        dataset.num_features,
        np.asarray(original_train.class_counts).tobytes(),  # v_bar is a function of these
        np.asarray(radii).tobytes(),
    )
    if key not in _ROUNDS:
        _ROUNDS[key] = jax.jit(solver.step)
    return _ROUNDS[key]


def run_facims_method(method, splits, original_train, seed, progress, checkpoints, run):
    dataset = splits.train
    params, apply_fn = models.make_model("mlp", dataset.num_classes, dataset.num_features, jax.random.key(seed))
    solver = facims(
        apply_fn,
        facims_config(method),
        class_counts=original_train.class_counts,
        group_counts=original_train.group_counts,
        batch_size=FLAGS.batch_size,
        val_batch_size=FLAGS.batch_size,
    )
    done, state = checkpoints.restore(run, solver.init(jax.random.key(seed + 1), params))
    progress.update(progress.done + done)
    # One padded size for every seed (the dataset's largest group; padding is never sampled), so
    # the compiled round is reused across seeds instead of recompiled for each split's shapes.
    pad_to = int(max(
        (original_train.group_counts + splits.val.group_counts + splits.test.group_counts).max(),
        splits.train.group_counts.max(),
    ))
    train_groups = data.group_arrays(splits.train, pad_to=pad_to)
    val_groups = data.group_arrays(splits.val, pad_to=pad_to)
    step = compiled_round(solver, method=method, dataset=dataset, original_train=original_train)
    for epoch in range(done + 1, FLAGS.epochs + 1):
        state, metrics = step(state, (train_groups, val_groups))
        metrics = {k: float(v) for k, v in metrics.items()}
        check_finite(metrics, what=f"{method} training metric ", epoch=epoch)
        checkpoints.save(run, epoch, state)
        progress.advance(metrics)
    return solver, state


def run_baseline(method, splits, original_train, seed, progress, checkpoints, run):
    dataset = splits.train
    params, apply_fn = models.make_model("mlp", dataset.num_classes, dataset.num_features, jax.random.key(seed))
    loss_name = "ce" if method == "erm" else "weighted_ce"
    loss_fn = losses.make_loss(loss_name, class_counts=original_train.class_counts)
    steps_per_epoch = -(-len(dataset) // FLAGS.batch_size)
    solver = erm(apply_fn, loss_fn, optax.adam(FLAGS.baseline_lr), steps_per_epoch=steps_per_epoch)
    state, _ = fit_resumable(
        solver,
        solver.init(jax.random.key(seed + 1), params),
        dataset.features,
        dataset.labels,
        dataset.groups,
        checkpoints=checkpoints,
        run=run,
        progress=progress,
        epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size,
        key=jax.random.key(seed + 2),
    )
    return solver, state


def setup(argv):
    """Validate the flags and open the checkpoints; errors become usage errors (no traceback)."""
    try:
        if len(argv) > 1:
            raise ValueError(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --helpshort)")
        seeds = common.parse_seeds(FLAGS.seeds)
        common.parse_choices("methods", FLAGS.methods, METHODS + BASELINES)
        common.check_number_flags(FLAGS, _OWN_FLAGS)
        facims_config(FLAGS.methods[0] if FLAGS.methods[0] in METHODS else "facims")  # validates the values
        described = data_flags.check_data_flags(  # the data load and split for every seed, or a usage error
            FLAGS, default_dataset=FLAGS.dataset, seeds=seeds, prepare=lambda d, s: prepare(d, s, FLAGS.samples_per_group)
        )
        stem = f"facims_{described['name']}"
        common.check_results_writable(FLAGS.output_dir, stem, overwrite=FLAGS.overwrite)
        checkpoints = common.open_checkpointer(FLAGS, _OWN_FLAGS, stem)
    except (ValueError, FileExistsError) as error:
        raise app.UsageError(str(error)) from None
    return seeds, stem, checkpoints, described


def main(argv):
    seeds, stem, checkpoints, described = setup(argv)
    common.enable_compilation_cache()
    rows = checkpoints.finished_runs()
    finished = {(row["method"], row["seed"]) for row in rows}
    total = len(seeds) * len(FLAGS.methods) * FLAGS.epochs
    progress = Progress(f"facims:{described['name']}", total, every=max(1, FLAGS.epochs // 5))
    progress.update(len(finished) * FLAGS.epochs)
    for seed in seeds:
        if all((method, seed) in finished for method in FLAGS.methods):
            continue
        dataset, _ = data_flags.load_from_flags(FLAGS, default_dataset=FLAGS.dataset, seed=seed)
        splits, original_train = prepare(dataset, seed, FLAGS.samples_per_group)
        for method in FLAGS.methods:
            if (method, seed) in finished:
                continue
            start = time.perf_counter()
            runner = run_baseline if method in BASELINES else run_facims_method
            solver, state = runner(method, splits, original_train, seed, progress, checkpoints, f"{method}_seed{seed}")
            seconds = time.perf_counter() - start
            report = evaluate(solver.predict, state, splits.test, num_bins=FLAGS.num_bins)
            row = dict(method=method, seed=seed, seconds=seconds, **report)
            checkpoints.add_finished_run(row)
            rows.append(row)
            print(
                f"[{method} seed={seed}] balanced_accuracy={report['balanced_accuracy']:.4f} "
                f"sgap_official={report['sufficiency_gap_official']:.4f} sgap={report['sufficiency_gap']:.4f} "
                f"dp_gap={report['dp_gap']:.4f} deo_gap={report['deo_gap']:.4f} ({seconds:.1f}s)",
                file=sys.stderr,
                flush=True,
            )
    recall_columns = sorted({k for row in rows for k in row if k.startswith("recall_")})
    columns = [c for c in REPORT_COLUMNS if c in rows[0]] + recall_columns + ["seconds"]
    summary = common.summarize(rows, by="method", columns=columns)
    paper = PAPER_CREDIT if described["name"] == "credit" and described["source"] == "builtin" else None
    markdown = (
        f"# FACIMS on {data_flags.describe(described)} ({len(seeds)} seeds: {', '.join(map(str, seeds))})\n\n"
        + common.markdown_table(summary, columns, paper=paper)
    )
    config = dict(
        flags={name: FLAGS[name].value for name in FLAGS if FLAGS[name].present or name in ("dataset", "methods")},
        facims=dataclasses.asdict(facims_config(FLAGS.methods[0] if FLAGS.methods[0] in METHODS else "facims")),
        data=described,
    )
    targets = common.write_results(
        FLAGS.output_dir, stem, rows, summary, markdown, config=config, overwrite=FLAGS.overwrite
    )
    print(markdown)
    print(f"wrote {', '.join(str(p) for p in targets.values())}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
